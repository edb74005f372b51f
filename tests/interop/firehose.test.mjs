// Firehose interop: com.atproto.sync.subscribeRepos as the official
// consumers see it.
//
// Two kinds of consumer watch the real roost binary here:
//
// * the official `Firehose` class of @atproto/sync, with authenticated
//   commits (each commit's signature is checked against the key in the DID
//   document it resolves from the PLC directory, and every op is proven
//   against the new MST root with `verifyProofs`; ops that fail are silently
//   dropped, so every test compares what it emits with what was written) and
//   verified handles on `#identity`;
// * a raw `ws` client that decodes each frame itself (two concatenated
//   DAG-CBOR objects) and checks what @atproto/sync 0.4.x does not: the sync
//   v1.1 chain (`since` = previous rev, `prevData` = previous MST root) and the
//   inductive proof (inverting the ops on an MST loaded from the event's own
//   blocks must give back `prevData`: any block missing from the event fails).
//
// One roost (and one PLC directory) is shared by the whole file; the tests run
// in order and the restart test stays last.

import { describe, it as test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import http from 'node:http'
import { performance } from 'node:perf_hooks'
import { setTimeout as sleep } from 'node:timers/promises'
import WebSocket from 'ws'
import { AtpAgent } from '@atproto/api'
import { Firehose } from '@atproto/sync'
import { IdResolver, HandleResolver, parseToAtprotoDocument } from '@atproto/identity'
import {
  MST,
  MemoryBlockstore,
  readCarWithRoot,
  verifyCommitSig,
  cborToLexRecord,
  def as repoDef,
} from '@atproto/repo'
import { cborDecodeMulti } from '@atproto/common'
import { startPlc, plcGet, didKeyFromDidDoc } from './plc.mjs'
import { startRoost, roostBinPath, roostBinAvailable } from './harness.mjs'

const BIN = roostBinPath()
let skip = false
if (!roostBinAvailable(BIN) && process.env.ROOST_REQUIRE_BIN !== '1') {
  skip = `SKIP: roost binary not found at ${BIN}`
  console.error(`\n*** ${skip} ***\n`)
}

const TEST_TIMEOUT_MS = 120_000
const SUBSCRIBE = 'com.atproto.sync.subscribeRepos'
const POST = 'app.bsky.feed.post'
const PROFILE = 'app.bsky.actor.profile'
const DATETIME_RE = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$/
const TID_RE = /^[234567abcdefghij][234567abcdefghijklmnopqrstuvwxyz]{12}$/

const rkeyOf = (uri) => uri.split('/').pop()
const pathOf = (uri) => uri.split('/').slice(-2).join('/')
const str = (cid) => (cid == null ? null : cid.toString())

// ---------------------------------------------------------------------------
// Small utilities

/** A condition that can be awaited; `notify()` re-checks every waiter. */
function makeWaitable() {
  let waiters = []
  return {
    notify() {
      const ws = waiters
      waiters = []
      for (const wake of ws) wake()
    },
    async until(pred, timeoutMs, what) {
      const deadline = Date.now() + timeoutMs
      while (!pred()) {
        const left = deadline - Date.now()
        if (left <= 0) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`)
        await new Promise((resolve) => {
          const timer = setTimeout(resolve, left)
          waiters.push(() => {
            clearTimeout(timer)
            resolve()
          })
        })
      }
    },
  }
}

function percentile(values, p) {
  const sorted = [...values].sort((a, b) => a - b)
  const idx = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))
  return sorted[idx]
}

const fmtMs = (v) => `${v.toFixed(2)} ms`

// ---------------------------------------------------------------------------
// Raw frames

/**
 * Decodes one frame: a DAG-CBOR header followed by a DAG-CBOR body, nothing
 * else. Returns {op, t, body} (op -1: error frame, body {error, message}).
 */
function decodeFrame(bytes) {
  const parts = cborDecodeMulti(bytes)
  assert.equal(parts.length, 2, `a frame is exactly two CBOR objects, got ${parts.length}`)
  const [header, body] = parts
  assert.ok(header && typeof header === 'object', 'frame header is a map')
  assert.ok(body && typeof body === 'object', 'frame body is a map')
  if (header.op === -1) {
    assert.deepEqual(Object.keys(header), ['op'], 'error frame header has only op')
    return { op: -1, body }
  }
  assert.equal(header.op, 1, `frame op: ${JSON.stringify(header)}`)
  assert.equal(typeof header.t, 'string', 'message frame header carries t')
  return { op: 1, t: header.t, body }
}

/** A raw WebSocket subscriber that keeps every frame with its arrival time. */
class RawSub {
  constructor(port, cursor) {
    const qs = cursor === undefined ? '' : `?cursor=${encodeURIComponent(String(cursor))}`
    this.url = `ws://127.0.0.1:${port}/xrpc/${SUBSCRIBE}${qs}`
    this.frames = [] // {op, t, body, bytes, at}
    this.problems = [] // frames that did not decode, socket errors
    this.byCommit = new Map() // commit CID string -> frame
    this.closeInfo = null
    this.w = makeWaitable()
    this.ws = new WebSocket(this.url)
    this.ws.binaryType = 'nodebuffer'
    this.opened = new Promise((resolve, reject) => {
      this.ws.once('open', resolve)
      this.ws.once('error', reject)
    })
    this.opened.catch(() => {})
    this.ws.on('error', (err) => {
      this.problems.push(err)
      this.w.notify()
    })
    this.ws.on('message', (data, isBinary) => {
      const at = performance.now()
      try {
        assert.ok(isBinary, 'frames are binary')
        const frame = { ...decodeFrame(data), bytes: Buffer.from(data), at }
        this.frames.push(frame)
        if (frame.t === '#commit') this.byCommit.set(str(frame.body.commit), frame)
      } catch (err) {
        this.problems.push(err)
      }
      this.w.notify()
    })
    this.closed = new Promise((resolve) => {
      this.ws.once('close', (code, reason) => {
        this.closeInfo = { code, reason: reason.toString() }
        this.w.notify()
        resolve(this.closeInfo)
      })
    })
  }

  /** Message frames only (everything but error frames). */
  get events() {
    return this.frames.filter((f) => f.op === 1)
  }

  get seqs() {
    return this.events.filter((f) => typeof f.body.seq === 'number').map((f) => f.body.seq)
  }

  lastSeq() {
    const s = this.seqs
    return s.length ? s[s.length - 1] : null
  }

  until(pred, timeoutMs, what) {
    return this.w.until(
      () => {
        if (this.problems.length) throw this.problems[0]
        if (pred()) return true
        if (this.closeInfo) {
          throw new Error(`stream closed (${JSON.stringify(this.closeInfo)}) while waiting for ${what}`)
        }
        return false
      },
      timeoutMs,
      what,
    )
  }

  untilCommit(cid, timeoutMs = 10_000) {
    return this.until(() => this.byCommit.has(str(cid)), timeoutMs, `#commit ${cid}`).then(() =>
      this.byCommit.get(str(cid)),
    )
  }

  untilSeq(seq, timeoutMs = 10_000) {
    return this.until(() => (this.lastSeq() ?? -1) >= seq, timeoutMs, `seq ${seq}`)
  }

  async close() {
    if (this.ws.readyState === WebSocket.CLOSED) return
    this.ws.close()
    await Promise.race([this.closed, sleep(3000)])
    if (this.ws.readyState !== WebSocket.CLOSED) this.ws.terminate()
  }
}

/** Upgrade request that must be refused before the upgrade: {status, body}. */
function refusedUpgrade(port, query) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`ws://127.0.0.1:${port}/xrpc/${SUBSCRIBE}?${query}`)
    ws.on('error', () => {})
    ws.on('open', () => {
      ws.terminate()
      reject(new Error(`the upgrade was accepted for ?${query}`))
    })
    ws.on('unexpected-response', (req, res) => {
      let body = ''
      res.setEncoding('utf8')
      res.on('data', (c) => (body += c))
      res.on('end', () => {
        req.destroy()
        let json
        try {
          json = JSON.parse(body)
        } catch {
          json = body
        }
        resolve({ status: res.statusCode, body: json })
      })
    })
  })
}

// ---------------------------------------------------------------------------
// Verification of raw events

/**
 * Checks a stream of decoded frames in order: strictly increasing seq, the
 * shape of each event, and for `#commit` the signature, the ops against the
 * new tree, the inversion of the ops back to `prevData`, and the chain of
 * `since`/`prevData` from the previous commit (or `#sync`) of the same repo.
 */
class ChainVerifier {
  constructor(keyFor) {
    this.keyFor = keyFor
    this.repos = new Map() // did -> {rev, data, commit}
    this.lastSeq = null
    this.counts = {}
  }

  async check(frame) {
    const { t, body } = frame
    assert.equal(frame.op, 1, `unexpected error frame ${JSON.stringify(body)}`)
    assert.equal(typeof body.seq, 'number', `${t} has an integer seq`)
    if (this.lastSeq !== null) {
      assert.ok(body.seq > this.lastSeq, `seq ${body.seq} after ${this.lastSeq}: not strictly increasing`)
    }
    this.lastSeq = body.seq
    this.counts[t] = (this.counts[t] ?? 0) + 1
    assert.match(body.time, DATETIME_RE, `${t} seq ${body.seq}: time`)
    try {
      switch (t) {
        case '#identity':
          assert.match(body.did, /^did:plc:[a-z2-7]{24}$/)
          return
        case '#account':
          assert.match(body.did, /^did:plc:[a-z2-7]{24}$/)
          assert.equal(typeof body.active, 'boolean')
          return
        case '#sync':
          return await this.checkSync(body)
        case '#commit':
          return await this.checkCommit(body)
        default:
          assert.fail(`unexpected event type ${t}`)
      }
    } catch (err) {
      err.message = `${t} seq ${body.seq}: ${err.message}`
      throw err
    }
  }

  async readSignedCommit(blocks, did) {
    const car = await readCarWithRoot(blocks) // also checks every block against its CID
    const store = new MemoryBlockstore(car.blocks)
    const commit = await store.readObj(car.root, repoDef.commit)
    assert.equal(commit.did, did, 'commit.did')
    assert.equal(commit.version, 3, 'commit.version')
    const key = await this.keyFor(did)
    assert.ok(await verifyCommitSig(commit, key), 'commit signature verifies with the DID document key')
    return { root: car.root, blocks: car.blocks, store, commit }
  }

  async checkSync(body) {
    const { root, commit } = await this.readSignedCommit(body.blocks, body.did)
    assert.equal(commit.rev, body.rev, 'rev is the commit rev')
    this.repos.set(body.did, { rev: commit.rev, data: commit.data, commit: root })
  }

  async checkCommit(body) {
    const { root, blocks, store, commit } = await this.readSignedCommit(body.blocks, body.repo)
    assert.ok(root.equals(body.commit), `CAR root ${root} is the commit ${body.commit}`)
    assert.equal(commit.rev, body.rev, 'rev is the commit rev')
    assert.match(body.rev, TID_RE)
    assert.equal(body.rebase, false)
    assert.equal(body.tooBig, false)
    assert.deepEqual(body.blobs, [])
    assert.ok(body.prevData, 'sync v1.1: prevData present')
    assert.equal(typeof body.since, 'string', 'since present')
    assert.ok(body.rev > body.since, `rev ${body.rev} > since ${body.since}`)
    const prev = this.repos.get(body.repo)
    if (prev) {
      assert.equal(body.since, prev.rev, 'since is the previous commit rev of this repo')
      assert.ok(body.prevData.equals(prev.data), `prevData ${body.prevData} is the previous MST root ${prev.data}`)
    }

    assert.ok(Array.isArray(body.ops) && body.ops.length > 0, 'a commit has ops')
    const paths = body.ops.map((op) => op.path)
    assert.equal(new Set(paths).size, paths.length, 'no path twice in one commit')

    // Forward: each op is what the new tree holds.
    const after = MST.load(store, commit.data)
    for (const op of body.ops) {
      const got = await after.get(op.path)
      switch (op.action) {
        case 'create':
        case 'update':
          assert.ok(op.cid, `${op.action} ${op.path} has a cid`)
          assert.ok(got?.equals(op.cid), `${op.path}: tree has ${got}, op says ${op.cid}`)
          assert.ok(blocks.has(op.cid), `record block ${op.cid} for ${op.path} is in the event`)
          cborToLexRecord(blocks.get(op.cid))
          if (op.action === 'create') assert.ok(op.prev == null, `create ${op.path} has no prev`)
          else assert.ok(op.prev, `update ${op.path} has prev`)
          break
        case 'delete':
          assert.equal(op.cid, null, `delete ${op.path} has cid null`)
          assert.ok(op.prev, `delete ${op.path} has prev`)
          assert.equal(got, null, `${op.path} is gone from the tree`)
          break
        default:
          assert.fail(`unknown action ${op.action}`)
      }
    }

    // Backward: inverting the ops on the event's own blocks reaches prevData.
    let tree = MST.load(store, commit.data)
    for (const op of [...body.ops].reverse()) {
      if (op.action === 'create') tree = await tree.delete(op.path)
      else if (op.action === 'update') tree = await tree.update(op.path, op.prev)
      else tree = await tree.add(op.path, op.prev)
    }
    const inverted = await tree.getPointer()
    assert.ok(
      inverted.equals(body.prevData),
      `inverting ${body.ops.length} op(s) gives ${inverted}, prevData is ${body.prevData}`,
    )
    this.repos.set(body.repo, { rev: commit.rev, data: commit.data, commit: root })
  }

  async checkAll(frames) {
    for (const f of frames) await this.check(f)
  }
}

/** The ops of a raw `#commit` body as plain comparable values, by path. */
function opsOf(body) {
  return body.ops
    .map((op) => ({ action: op.action, path: op.path, cid: str(op.cid), prev: str(op.prev) }))
    .sort((a, b) => (a.path < b.path ? -1 : 1))
}

/**
 * What the official Firehose should emit for raw frames: one event per
 * commit op, and one per #identity/#account/#sync.
 */
function expectedFirehose(frames) {
  const out = []
  for (const { t, body } of frames) {
    if (t === '#commit') {
      for (const op of body.ops) {
        out.push({ seq: body.seq, event: op.action, did: body.repo, path: op.path, cid: str(op.cid), rev: body.rev })
      }
    } else if (t === '#identity' || t === '#account') {
      out.push({ seq: body.seq, event: t.slice(1), did: body.did })
    } else if (t === '#sync') {
      out.push({ seq: body.seq, event: 'sync', did: body.did, rev: body.rev })
    }
  }
  return out
}

function summarizeFirehose(events) {
  return events.map((e) => {
    if (e.event === 'create' || e.event === 'update' || e.event === 'delete') {
      return {
        seq: e.seq,
        event: e.event,
        did: e.did,
        path: `${e.collection}/${e.rkey}`,
        cid: e.event === 'delete' ? null : str(e.cid),
        rev: e.rev,
      }
    }
    if (e.event === 'sync') return { seq: e.seq, event: 'sync', did: e.did, rev: e.rev }
    return { seq: e.seq, event: e.event, did: e.did }
  })
}

// ---------------------------------------------------------------------------

describe('firehose (subscribeRepos) with the official @atproto/sync consumer', () => {
  const it = (name, fn) => test(name, { skip, timeout: TEST_TIMEOUT_MS }, fn)

  let plcDir
  let roost
  let did
  let idResolver
  const keys = new Map()
  // Every frame any raw subscriber received from the shared roost, by seq: a
  // frame seen twice (live, replayed, after a restart) must be byte-identical.
  const seen = new Map()
  const openSubs = new Set()
  const openFirehoses = new Set()

  async function keyFor(d) {
    if (!keys.has(d)) {
      const doc = await plcGet(plcDir.url, `/${d}`)
      assert.equal(doc.status, 200, `PLC has ${d}`)
      keys.set(d, didKeyFromDidDoc(doc.body))
    }
    return keys.get(d)
  }

  /**
   * The fetch the identity resolver uses: the PLC directory and the PDS are
   * plain http on 127.0.0.1 (the default fetch is SSRF-protected and refuses
   * both), and `https://<handle>/.well-known/atproto-did` for our `.test`
   * handles is answered by the PDS itself, chosen by Host as in production.
   */
  async function localFetch(input, init = {}) {
    const url = new URL(input instanceof Request ? input.url : input)
    if (url.protocol === 'https:' && url.hostname.endsWith('.test') && url.pathname === '/.well-known/atproto-did') {
      return new Promise((resolve, reject) => {
        const req = http.get(
          { host: '127.0.0.1', port: roost.port, path: url.pathname, headers: { host: url.hostname }, signal: init.signal },
          (res) => {
            const chunks = []
            res.on('data', (c) => chunks.push(c))
            res.on('end', () => resolve(new Response(Buffer.concat(chunks), { status: res.statusCode })))
            res.on('error', reject)
          },
        )
        req.on('error', reject)
      })
    }
    return fetch(input, init)
  }

  /** No DNS here: `.test` handles resolve over HTTP only (see localFetch). */
  class LocalHandleResolver extends HandleResolver {
    async resolveDns() {
      return undefined
    }
  }

  function sub(cursor, port = roost.port) {
    const s = new RawSub(port, cursor)
    openSubs.add(s)
    s.closed.then(() => openSubs.delete(s))
    return s
  }

  /** Records frames in `seen`, failing on a seq whose bytes differ. */
  function remember(frames) {
    for (const f of frames) {
      if (f.op !== 1 || typeof f.body.seq !== 'number') continue
      const prior = seen.get(f.body.seq)
      if (prior) {
        assert.ok(prior.equals(f.bytes), `seq ${f.body.seq} was delivered with different bytes before`)
      } else {
        seen.set(f.body.seq, f.bytes)
      }
    }
  }

  /**
   * The official consumer with every check it has switched on: authenticated
   * commits (signature + `verifyProofs`), verified handles, all event kinds.
   * `getCursor` resumes from the last event handled, as a real consumer does;
   * its calls are recorded, so a reconnect shows up.
   */
  function firehose({ cursor }) {
    const events = []
    const errors = []
    const cursorCalls = []
    let lastSeq = cursor
    const w = makeWaitable()
    const fh = new Firehose({
      service: `ws://127.0.0.1:${roost.port}`,
      idResolver,
      unauthenticatedCommits: false,
      unauthenticatedHandles: false,
      excludeIdentity: false,
      excludeAccount: false,
      excludeCommit: false,
      excludeSync: false,
      getCursor: () => {
        cursorCalls.push(lastSeq)
        return lastSeq
      },
      handleEvent: async (evt) => {
        events.push(evt)
        lastSeq = evt.seq
        w.notify()
      },
      onError: (err) => {
        errors.push(err)
        w.notify()
      },
    })
    const running = fh.start()
    const handle = {
      events,
      errors,
      cursorCalls,
      until(pred, timeoutMs, what) {
        return w.until(
          () => {
            assertNoFirehoseErrors(handle)
            return pred()
          },
          timeoutMs,
          what,
        )
      },
      untilSeq(seq, timeoutMs = 15_000) {
        return handle.until(() => events.some((e) => e.seq >= seq), timeoutMs, `a Firehose event with seq ${seq}`)
      },
      async stop() {
        openFirehoses.delete(handle)
        await fh.destroy()
        await running
      },
    }
    openFirehoses.add(handle)
    return handle
  }

  function assertNoFirehoseErrors(fh) {
    if (!fh.errors.length) return
    const err = fh.errors[0]
    const cause = err.cause ? ` (cause: ${err.cause.stack ?? err.cause})` : ''
    throw new Error(`Firehose onError (${fh.errors.length} in all): ${err.constructor.name}: ${err.message}${cause}`)
  }

  async function login() {
    const agent = new AtpAgent({ service: roost.url })
    await agent.login({ identifier: roost.handle, password: roost.password })
    did ??= agent.session.did
    return agent
  }

  async function createPost(agent, text) {
    const { data } = await agent.com.atproto.repo.createRecord({
      repo: did,
      collection: POST,
      record: { $type: POST, text, createdAt: new Date().toISOString() },
    })
    return data
  }

  /**
   * A full replay up to now: writes a marker post, replays from cursor 0
   * until the marker's commit, and returns the frames (checked by a fresh
   * ChainVerifier) and the marker.
   */
  async function replayAll(agent, label) {
    const marker = await createPost(agent, `marker: ${label}`)
    const s = sub(0)
    try {
      const head = (await s.untilCommit(marker.commit.cid, 30_000)).body.seq
      const frames = s.events
      assert.equal(frames.at(-1).body.seq, head, 'nothing after the marker')
      remember(frames)
      const verifier = new ChainVerifier(keyFor)
      await verifier.checkAll(frames)
      return { frames, marker, verifier, head }
    } finally {
      await s.close()
    }
  }

  before(async () => {
    if (skip) return
    plcDir = await startPlc()
    roost = await startRoost({ plcUrl: plcDir.url })
    idResolver = new IdResolver({ plcUrl: plcDir.url, fetch: localFetch, timeout: 10_000 })
    idResolver.handle = new LocalHandleResolver({ fetch: localFetch, timeout: 10_000 })
  }, { timeout: 60_000 })

  after(async () => {
    for (const fh of [...openFirehoses]) await fh.stop().catch(() => {})
    for (const s of [...openSubs]) await s.close().catch(() => {})
    await roost?.cleanup()
    await plcDir?.stop()
  })

  it('delivers every commit live, and each passes the official and the v1.1 checks', async () => {
    const agent = await login()
    const fh = firehose({ cursor: 0 })
    const raw = sub(0)
    try {
      // The account's creation (#identity, #account, #sync) replays from 0.
      await fh.untilSeq(3, 20_000)
      await raw.untilSeq(3)
      const [identity, account, sync] = fh.events
      assert.equal(identity.event, 'identity')
      assert.equal(identity.did, did)
      // Handle verified both ways by the official resolver: DID document
      // alsoKnownAs, and the handle's well-known answer from the PDS.
      assert.equal(identity.handle, 'alice.test')
      const doc = parseToAtprotoDocument(identity.didDocument)
      assert.equal(doc.pds, roost.url, 'the DID document points at this PDS (http://localhost:<port>)')
      assert.equal(doc.signingKey, await keyFor(did))
      assert.equal(account.event, 'account')
      assert.equal(account.did, did)
      assert.equal(account.active, true)
      assert.equal(account.status, undefined)
      assert.equal(sync.event, 'sync')
      assert.equal(sync.did, did)
      const { data: head0 } = await agent.com.atproto.sync.getLatestCommit({ did })
      assert.equal(str(sync.cid), head0.cid, '#sync carries the current commit')
      assert.equal(sync.rev, head0.rev)
      assert.deepEqual(
        raw.events.slice(0, 3).map((f) => [f.t, f.body.seq]),
        [['#identity', 1], ['#account', 2], ['#sync', 3]],
      )
      assert.equal(raw.events[0].body.handle, 'alice.test')
      const emptyTree = await (await MST.create(new MemoryBlockstore())).getPointer()
      const syncCommit = await readCarWithRoot(raw.events[2].body.blocks)
      assert.equal(str(syncCommit.root), head0.cid)
      const syncBody = await new MemoryBlockstore(syncCommit.blocks).readObj(syncCommit.root, repoDef.commit)
      assert.ok(syncBody.data.equals(emptyTree), 'a new repository starts from the empty tree')

      // The writes, each with the commit and ops it must produce.
      const writes = [] // {label, commit: {cid, rev}, ops: [{action, path, cid, prev}], texts}
      const posts = []
      for (let i = 0; i < 4; i++) {
        const res = await createPost(agent, `firehose post ${i}`)
        posts.push(res)
        writes.push({
          label: `create post ${i}`,
          commit: res.commit,
          ops: [{ action: 'create', path: pathOf(res.uri), cid: res.cid, prev: null }],
          texts: { [pathOf(res.uri)]: `firehose post ${i}` },
        })
      }
      let profileCid = null
      for (const [i, displayName] of ['Alice', 'Alice A.', 'Alice B.'].entries()) {
        const { data: res } = await agent.com.atproto.repo.putRecord({
          repo: did,
          collection: PROFILE,
          rkey: 'self',
          record: { $type: PROFILE, displayName, description: `profile version ${i}` },
        })
        writes.push({
          label: `put profile ${i}`,
          commit: res.commit,
          ops: [
            { action: profileCid ? 'update' : 'create', path: `${PROFILE}/self`, cid: res.cid, prev: profileCid },
          ],
        })
        profileCid = res.cid
      }
      {
        const { data: res } = await agent.com.atproto.repo.deleteRecord({
          repo: did,
          collection: POST,
          rkey: rkeyOf(posts[0].uri),
        })
        writes.push({
          label: 'delete post 0',
          commit: res.commit,
          ops: [{ action: 'delete', path: pathOf(posts[0].uri), cid: null, prev: posts[0].cid }],
        })
      }
      {
        const newRkey = '3kfirehose2aa'
        const { data: res } = await agent.com.atproto.repo.applyWrites({
          repo: did,
          writes: [
            {
              $type: 'com.atproto.repo.applyWrites#create',
              collection: POST,
              rkey: newRkey,
              value: { $type: POST, text: 'batch create', createdAt: new Date().toISOString() },
            },
            {
              $type: 'com.atproto.repo.applyWrites#update',
              collection: POST,
              rkey: rkeyOf(posts[1].uri),
              value: { $type: POST, text: 'batch update', createdAt: new Date().toISOString() },
            },
            {
              $type: 'com.atproto.repo.applyWrites#delete',
              collection: POST,
              rkey: rkeyOf(posts[2].uri),
            },
          ],
        })
        assert.equal(res.results.length, 3)
        writes.push({
          label: 'applyWrites create+update+delete',
          commit: res.commit,
          ops: [
            { action: 'create', path: `${POST}/${newRkey}`, cid: res.results[0].cid, prev: null },
            { action: 'update', path: pathOf(posts[1].uri), cid: res.results[1].cid, prev: posts[1].cid },
            { action: 'delete', path: pathOf(posts[2].uri), cid: null, prev: posts[2].cid },
          ],
          texts: { [`${POST}/${newRkey}`]: 'batch create', [pathOf(posts[1].uri)]: 'batch update' },
        })
      }

      // Every write arrives on the raw stream as its own #commit with
      // exactly the ops the API reported.
      const commitFrames = []
      for (const w of writes) {
        assert.ok(w.commit?.cid && w.commit?.rev, `${w.label}: the API returned the commit`)
        const frame = await raw.untilCommit(w.commit.cid)
        assert.equal(frame.body.rev, w.commit.rev, `${w.label}: rev`)
        assert.equal(frame.body.repo, did)
        const sorted = [...w.ops].sort((a, b) => (a.path < b.path ? -1 : 1))
        assert.deepEqual(opsOf(frame.body), sorted, `${w.label}: ops`)
        commitFrames.push(frame)
      }
      const seqs = commitFrames.map((f) => f.body.seq)
      assert.deepEqual(seqs, [...seqs].sort((a, b) => a - b), 'commits in write order')
      assert.deepEqual(raw.events.map((f) => f.body.seq), Array.from({ length: 3 + writes.length }, (_, i) => i + 1))
      const verifier = new ChainVerifier(keyFor)
      await verifier.checkAll(raw.events)
      remember(raw.events)

      // The official consumer emitted one verified event per op, no more, no
      // fewer, and never called onError.
      const lastSeq = seqs[seqs.length - 1]
      await fh.untilSeq(lastSeq).catch((err) => {
        throw new Error(`${err.message}; Firehose got ${JSON.stringify(summarizeFirehose(fh.events))}`)
      })
      assertNoFirehoseErrors(fh)
      assert.deepEqual(summarizeFirehose(fh.events), expectedFirehose(raw.events))
      for (const e of fh.events) {
        if (e.event !== 'create' && e.event !== 'update') continue
        const w = writes.find((x) => x.commit.cid === str(e.commit))
        const text = w?.texts?.[`${e.collection}/${e.rkey}`]
        if (text !== undefined) assert.equal(e.record.text, text, `record of ${e.uri}`)
        assert.equal(e.record.$type, e.collection)
      }
      assert.deepEqual(fh.cursorCalls, [0], 'one connection, no reconnect')
    } finally {
      await fh.stop()
      await raw.close()
    }
  })

  it('answers cursors: mid-log replays the rest, latest goes live, future and malformed are refused', async () => {
    const agent = await login()
    const all = await replayAll(agent, 'cursor test')
    const L = all.head
    assert.deepEqual(all.frames.map((f) => f.body.seq), Array.from({ length: L }, (_, i) => i + 1), 'seqs 1..L')

    // Mid-log cursors replay exactly what follows them, byte for byte.
    for (const k of [1, 2, 3, Math.floor(L / 2), L - 1]) {
      const s = sub(k)
      try {
        await s.untilSeq(L)
        await sleep(200) // nothing more may follow
        assert.deepEqual(s.seqs, Array.from({ length: L - k }, (_, i) => k + 1 + i), `cursor=${k}`)
        for (const f of s.events) {
          assert.ok(f.bytes.equals(all.frames[f.body.seq - 1].bytes), `cursor=${k}: seq ${f.body.seq} differs`)
        }
      } finally {
        await s.close()
      }
    }

    // The latest cursor: nothing to replay, then live events.
    const latest = sub(L)
    try {
      await latest.opened
      await sleep(500)
      assert.deepEqual(latest.frames, [], `cursor=${L} (latest) replays nothing`)
      const post = await createPost(agent, 'after the latest cursor')
      const frame = await latest.untilCommit(post.commit.cid)
      assert.equal(frame.body.seq, L + 1)
      assert.deepEqual(latest.seqs, [L + 1])
      await all.verifier.check(frame) // chains onto the replayed log
      remember(latest.events)
    } finally {
      await latest.close()
    }

    // Future cursors: an error frame, then the stream ends.
    for (const cursor of [L + 2, L + 1000, Number.MAX_SAFE_INTEGER]) {
      const s = sub(cursor)
      const closed = await Promise.race([s.closed, sleep(5000).then(() => null)])
      assert.ok(closed, `cursor=${cursor}: the server closes the stream`)
      assert.deepEqual(s.problems, [])
      assert.equal(s.frames.length, 1, `cursor=${cursor}: exactly one frame, got ${s.frames.length}`)
      assert.equal(s.frames[0].op, -1, 'an error frame')
      assert.equal(s.frames[0].body.error, 'FutureCursor')
      assert.equal(typeof s.frames[0].body.message, 'string')
    }

    // Malformed cursors are refused with HTTP 400 before the upgrade.
    for (const bad of ['abc', '1.5', '12abc', '0x10', '1e3']) {
      const res = await refusedUpgrade(roost.port, `cursor=${encodeURIComponent(bad)}`)
      assert.equal(res.status, 400, `cursor=${bad}: ${JSON.stringify(res)}`)
      assert.equal(res.body?.error, 'InvalidRequest', `cursor=${bad}: ${JSON.stringify(res.body)}`)
    }
  })

  it('measures write-to-event latency (100 sequential createRecord)', async () => {
    const agent = await login()
    const all = await replayAll(agent, 'latency test')
    const s = sub(all.head) // a cursor so that nothing can slip past the connect
    const fromResponse = []
    const fromRequest = []
    const requestTime = []
    try {
      await s.opened
      for (let i = 0; i < 100; i++) {
        const t0 = performance.now()
        const res = await createPost(agent, `latency ${i}`)
        const t1 = performance.now()
        const frame = await s.untilCommit(res.commit.cid, 10_000)
        fromResponse.push(frame.at - t1)
        fromRequest.push(frame.at - t0)
        requestTime.push(t1 - t0)
      }
      assert.equal(s.events.length, 100, 'exactly one event per write')
      remember(s.events)
      await all.verifier.checkAll(s.events)
    } finally {
      await s.close()
    }
    const line = (name, v) =>
      `  ${name.padEnd(34)} p50 ${fmtMs(percentile(v, 50))}  p99 ${fmtMs(percentile(v, 99))}  max ${fmtMs(Math.max(...v))}`
    console.log(
      [
        'firehose latency over 100 sequential createRecord calls:',
        line('HTTP response -> event', fromResponse),
        line('request start -> event', fromRequest),
        line('createRecord round trip', requestTime),
        `  events that arrived before the HTTP response: ${fromResponse.filter((v) => v < 0).length}/100`,
      ].join('\n'),
    )
  })

  it('delivers every commit exactly once to subscribers that join during writes', async () => {
    const agent = await login()
    const before = await replayAll(agent, 'race test start')
    const TOTAL = 50
    const WORKERS = 5
    const acked = []
    const subs = []
    let fh
    let next = 0
    // Join points: subscribers connect with cursor 0 while writes are in
    // flight, so their replay-to-live cutover happens among commits.
    const joinAt = new Set([2, 10, 25])
    const fhJoinAt = 5
    const writer = async () => {
      while (next < TOTAL) {
        const i = next++
        const res = await createPost(agent, `race ${i}`)
        acked.push(res)
        if (joinAt.has(acked.length)) subs.push(sub(0))
        if (acked.length === fhJoinAt) fh = firehose({ cursor: 0 })
      }
    }
    subs.push(sub(0))
    try {
      await Promise.all(Array.from({ length: WORKERS }, writer))
      assert.equal(acked.length, TOTAL)
      const { data: head } = await agent.com.atproto.sync.getLatestCommit({ did })
      assert.equal(
        head.rev,
        acked.map((a) => a.commit.rev).sort().at(-1),
        'the head is the newest acknowledged write',
      )

      const canonical = sub(0)
      await canonical.untilCommit(head.cid, 30_000)
      await canonical.close()
      const log = canonical.events
      remember(log)
      assert.equal(log.at(-1).body.rev, head.rev)
      const verifier = new ChainVerifier(keyFor)
      await verifier.checkAll(log)

      // Each acknowledged write is one #commit in the log.
      const commits = log.filter((f) => f.t === '#commit')
      for (const a of acked) {
        const matching = commits.filter((f) => str(f.body.commit) === a.commit.cid)
        assert.equal(matching.length, 1, `write ${a.uri} appears once`)
        assert.deepEqual(opsOf(matching[0].body), [
          { action: 'create', path: pathOf(a.uri), cid: a.cid, prev: null },
        ])
      }
      const logSeqs = log.map((f) => f.body.seq)
      assert.ok(logSeqs.at(-1) - before.head >= TOTAL)

      for (const [i, s] of subs.entries()) {
        await s.untilCommit(head.cid, 30_000)
        assert.deepEqual(s.problems, [], `subscriber ${i}`)
        assert.deepEqual(s.seqs, logSeqs, `subscriber ${i} got every event once, in order`)
        for (const [j, f] of s.events.entries()) {
          assert.ok(f.bytes.equals(log[j].bytes), `subscriber ${i}: seq ${f.body.seq} differs from the log`)
        }
        remember(s.events)
      }

      assert.ok(fh, 'the Firehose was started')
      await fh.untilSeq(logSeqs.at(-1), 30_000)
      assertNoFirehoseErrors(fh)
      assert.deepEqual(summarizeFirehose(fh.events), expectedFirehose(log))
      assert.deepEqual(fh.cursorCalls, [0], 'one connection, no reconnect')
    } finally {
      for (const s of subs) await s.close()
      await fh?.stop()
    }
  })

  it('reports OutdatedCursor for a cursor older than the retained log', async () => {
    // A second PDS that keeps events for 0 hours: what was written before a
    // restart is pruned at start-up.
    const other = await startRoost({
      plcUrl: plcDir.url,
      handle: 'bob.test',
      env: { PDS_FIREHOSE_RETENTION_HOURS: '0' },
    })
    try {
      const agent = new AtpAgent({ service: other.url })
      await agent.login({ identifier: 'bob.test', password: other.password })
      const bob = agent.session.did
      // created_at has second resolution and pruning drops `< now - 0`.
      await sleep(1100)
      await other.restart()
      await agent.login({ identifier: 'bob.test', password: other.password })

      const s = sub(0, other.port)
      try {
        await s.until(() => s.frames.length >= 1, 10_000, 'the #info frame')
        const [info] = s.frames
        assert.equal(info.op, 1)
        assert.equal(info.t, '#info')
        assert.equal(info.body.name, 'OutdatedCursor')
        // ...and the stream goes on live.
        const { data: res } = await agent.com.atproto.repo.createRecord({
          repo: bob,
          collection: POST,
          record: { $type: POST, text: 'after pruning', createdAt: new Date().toISOString() },
        })
        const frame = await s.untilCommit(res.commit.cid)
        assert.ok(frame.body.seq > 3, `seq ${frame.body.seq} continues after the pruned ones`)
        assert.deepEqual(s.frames.map((f) => f.t), ['#info', '#commit'])
        await new ChainVerifier(keyFor).check(frame)
      } finally {
        await s.close()
      }
    } finally {
      await other.cleanup()
    }
  })

  // Must stay last: restarts the shared server.
  it('replays the whole log from cursor 0 after a restart, and the Firehose resumes across it', async () => {
    const agent = await login()
    const pre = await replayAll(agent, 'before restart')
    const L = pre.head

    // A consumer connected across the restart, resuming by cursor.
    const resumed = firehose({ cursor: L })
    await sleep(500)

    const stopped = await roost.stop('SIGTERM')
    assert.equal(stopped.killed, false, 'roost stopped on SIGTERM with subscribers connected')
    await roost.restart()

    const again = await login()
    const post = await createPost(again, 'after the restart')

    const fh = firehose({ cursor: 0 })
    const raw = sub(0)
    try {
      const frame = await raw.untilCommit(post.commit.cid, 30_000)
      const frames = raw.events
      assert.equal(frame, frames.at(-1))
      assert.deepEqual(frames.map((f) => f.body.seq), Array.from({ length: L + 1 }, (_, i) => i + 1))
      assert.deepEqual(
        frames.slice(0, 3).map((f) => f.t),
        ['#identity', '#account', '#sync'],
        'the account creation events are still in the log',
      )
      for (const f of frames.slice(0, L)) {
        assert.ok(f.bytes.equals(pre.frames[f.body.seq - 1].bytes), `seq ${f.body.seq} changed across the restart`)
      }
      remember(frames)
      // Everything re-verified from scratch, the post-restart commit chaining
      // onto the pre-restart head.
      const verifier = new ChainVerifier(keyFor)
      await verifier.checkAll(frames)
      assert.equal(frame.body.since, pre.frames[L - 1].body.rev)
      assert.ok(verifier.counts['#commit'] > 100, JSON.stringify(verifier.counts))

      await fh.untilSeq(L + 1, 60_000)
      assertNoFirehoseErrors(fh)
      assert.deepEqual(summarizeFirehose(fh.events), expectedFirehose(frames))

      // The consumer that was connected during the restart reconnected with
      // its cursor and got the new commit, once.
      await resumed.untilSeq(L + 1, 60_000)
      assertNoFirehoseErrors(resumed)
      assert.deepEqual(summarizeFirehose(resumed.events), expectedFirehose([frame]))
      assert.ok(resumed.cursorCalls.length >= 2, `reconnected: getCursor calls ${JSON.stringify(resumed.cursorCalls)}`)
      assert.equal(resumed.cursorCalls[0], L)
      assert.ok(resumed.cursorCalls.slice(1).every((c) => c === L), JSON.stringify(resumed.cursorCalls))
    } finally {
      await fh.stop()
      await resumed.stop()
      await raw.close()
    }
  })
})
