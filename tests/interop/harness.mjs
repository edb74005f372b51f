// Starts the real `roost` binary for the interop tests.
//
// The contract with the server (environment variables, `serve` subcommand,
// `/xrpc/_health`) is the one the PDS is configured with in production; the
// tests only ever talk to it over HTTP like any other client would.

import { spawn } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { accessSync, constants as fsConstants } from 'node:fs'
import { mkdtemp, rm } from 'node:fs/promises'
import net from 'node:net'
import os from 'node:os'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import { once } from 'node:events'
import { setTimeout as sleep } from 'node:timers/promises'

// The official @atproto packages need Node >= 22. Running the suite with an
// older node (e.g. /usr/bin/node) fails in confusing ways deep inside those
// packages, so say so up front.
const nodeMajor = Number(process.versions.node.split('.')[0])
if (nodeMajor < 22) {
  throw new Error(
    `Node ${process.versions.node} is too old for the interop suite: run it with ` +
      `tests/interop/node_modules/.bin/node (Node 22), e.g. via "npm test".`,
  )
}

const HEALTH_TIMEOUT_MS = 30_000
const STOP_TIMEOUT_MS = 10_000
// Keep at most this much of the child's output; enough to explain a failure.
const OUTPUT_LIMIT = 256 * 1024

// Children still running when this process exits (a crash, or a test run
// interrupted before its `after` hooks) are killed rather than left behind
// holding their port.
const liveChildren = new Set()
process.on('exit', () => {
  for (const child of liveChildren) child.kill('SIGKILL')
})

/** Path of the roost binary under test: $ROOST_BIN or the debug build. */
export function roostBinPath() {
  if (process.env.ROOST_BIN) return path.resolve(process.env.ROOST_BIN)
  return fileURLToPath(new URL('../../target/debug/roost', import.meta.url))
}

/** True when the binary exists and is executable. */
export function roostBinAvailable(bin = roostBinPath()) {
  try {
    accessSync(bin, fsConstants.X_OK)
    return true
  } catch {
    return false
  }
}

/** Ask the OS for a free TCP port on 127.0.0.1 (listen on 0, then close). */
export async function freePort() {
  const srv = net.createServer()
  srv.listen(0, '127.0.0.1')
  await once(srv, 'listening')
  const { port } = srv.address()
  srv.close()
  await once(srv, 'close')
  return port
}

function randomHex(bytes) {
  return randomBytes(bytes).toString('hex')
}

/**
 * Start roost.
 *
 * @param {object} opts
 * @param {string} opts.plcUrl      PLC directory the PDS registers DIDs with
 * @param {string} [opts.bin]       binary (default: roostBinPath())
 * @param {string} [opts.handle]    default alice.test
 * @param {string} [opts.password]  default: random
 * @param {object} [opts.env]       extra/overriding environment variables
 */
export async function startRoost(opts = {}) {
  if (!opts.plcUrl) throw new Error('startRoost: opts.plcUrl is required')
  // Absolute, because the child runs with the data directory as its cwd.
  const bin = path.resolve(opts.bin ?? roostBinPath())
  const port = await freePort()
  const dataDir = await mkdtemp(path.join(os.tmpdir(), 'roost-interop-'))
  const handle = opts.handle ?? 'alice.test'
  const password = opts.password ?? randomHex(12)
  // Fixed for the lifetime of this instance so that a restart sees the same
  // configuration (tokens issued before a restart must stay verifiable).
  const env = {
    PDS_DEV_MODE: 'true',
    PDS_HOSTNAME: 'localhost',
    PDS_PORT: String(port),
    PDS_DATA_DIRECTORY: dataDir,
    PDS_DID_PLC_URL: opts.plcUrl,
    PDS_HANDLE: handle,
    PDS_PASSWORD: password,
    PDS_EMAIL: 'alice@example.com',
    PDS_SERVICE_HANDLE_DOMAINS: '.test',
    PDS_JWT_SECRET: randomHex(32),
    PDS_ADMIN_PASSWORD: randomHex(12),
    PDS_CRAWLERS: '',
    // A fresh data directory per instance: no lexicon bundle download per
    // start. scripts/test installs the pinned bundle once and passes it in
    // ROOST_LEXICON_BUNDLE, so records are validated as in production.
    PDS_LEXICON_AUTO_INSTALL: 'false',
    ...(process.env.ROOST_LEXICON_BUNDLE ? { PDS_LEXICON_BUNDLE: process.env.ROOST_LEXICON_BUNDLE } : {}),
    // Several instances run at once: no fixed metrics port (tests/ops.rs covers /metrics).
    PDS_METRICS_LISTEN: '',
    RUST_LOG: 'info',
    ...opts.env,
  }

  const instance = {
    url: `http://localhost:${port}`,
    port,
    dataDir,
    handle,
    password,
    bin,
    env,
    process: null,
    /** Everything the current and previous runs printed (stdout+stderr). */
    output: '',
    stop: (signal) => stopChild(instance, signal),
    restart: async () => {
      await stopChild(instance, 'SIGTERM')
      await spawnAndWait(instance)
    },
    /** Stop (SIGKILL if need be) and delete the data directory. */
    cleanup: async () => {
      await stopChild(instance, 'SIGTERM')
      await rm(dataDir, { recursive: true, force: true })
    },
  }
  try {
    await spawnAndWait(instance)
  } catch (err) {
    await instance.cleanup().catch(() => {})
    throw err
  }
  return instance
}

async function spawnAndWait(instance) {
  // Start from the parent environment minus any PDS_* settings, so that a
  // developer's shell cannot change what the tests configure.
  const baseEnv = Object.fromEntries(
    Object.entries(process.env).filter(([k]) => !k.startsWith('PDS_')),
  )
  const child = spawn(instance.bin, ['serve'], {
    env: { ...baseEnv, ...instance.env },
    cwd: instance.dataDir,
    stdio: ['ignore', 'pipe', 'pipe'],
  })
  instance.process = child
  liveChildren.add(child)
  child.once('exit', () => liveChildren.delete(child))
  instance.output += `\n--- roost started (pid ${child.pid}) ---\n`
  const append = (chunk) => {
    instance.output += chunk.toString()
    if (instance.output.length > OUTPUT_LIMIT) {
      instance.output = instance.output.slice(-OUTPUT_LIMIT)
    }
  }
  child.stdout.on('data', append)
  child.stderr.on('data', append)
  // Record how it ended; `exited` resolves either way and never rejects.
  child.exited = new Promise((resolve) => {
    child.once('exit', (code, signal) => resolve({ code, signal }))
    child.once('error', (err) => {
      append(`spawn error: ${err.message}\n`)
      resolve({ code: null, signal: null, error: err })
    })
  })

  const healthUrl = `http://127.0.0.1:${instance.port}/xrpc/_health`
  const deadline = Date.now() + HEALTH_TIMEOUT_MS
  let lastProblem = 'no attempt yet'
  let exitInfo = null
  child.exited.then((info) => (exitInfo = info))
  while (Date.now() < deadline) {
    if (exitInfo) {
      throw new Error(
        `roost exited before becoming healthy (code ${exitInfo.code}, signal ${exitInfo.signal}).\n` +
          `binary: ${instance.bin}\noutput:\n${instance.output}`,
      )
    }
    try {
      const res = await fetch(healthUrl, { signal: AbortSignal.timeout(2000) })
      if (res.status === 200) {
        await res.body?.cancel()
        return
      }
      lastProblem = `HTTP ${res.status}: ${await res.text()}`
    } catch (err) {
      lastProblem = `${err.message}${err.cause ? ` (${err.cause.code ?? err.cause.message})` : ''}`
    }
    await sleep(100)
  }
  await stopChild(instance, 'SIGKILL')
  throw new Error(
    `roost did not answer 200 on ${healthUrl} within ${HEALTH_TIMEOUT_MS / 1000}s ` +
      `(last: ${lastProblem}).\noutput:\n${instance.output}`,
  )
}

/**
 * Send `signal` (default SIGTERM) and wait for the process to exit; SIGKILL
 * after STOP_TIMEOUT_MS. Returns {code, signal, killed} where killed says
 * whether SIGKILL was needed.
 */
async function stopChild(instance, signal = 'SIGTERM') {
  const child = instance.process
  if (!child) return { code: null, signal: null, killed: false }
  if (child.exitCode !== null || child.signalCode !== null) {
    instance.process = null
    return { code: child.exitCode, signal: child.signalCode, killed: false }
  }
  child.kill(signal)
  // The timer is cancelled once the child is gone so it does not keep the
  // test process alive.
  const ac = new AbortController()
  const timeout = sleep(STOP_TIMEOUT_MS, 'timeout', { signal: ac.signal }).catch(() => null)
  let result = await Promise.race([child.exited, timeout])
  ac.abort()
  let killed = false
  if (result === 'timeout') {
    killed = true
    child.kill('SIGKILL')
    result = await child.exited
  }
  instance.process = null
  return { ...result, killed }
}
