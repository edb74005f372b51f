// The reference PDS (@atproto/pds) behind roost's CLI/environment contract.
//
// Not part of the suite: it exists so that anyone can check that what the
// interop tests expect is what the official implementation does
// (`npm run test:reference` in tests/interop). When roost and the tests
// disagree, run this first to learn which side is wrong.
//
// It maps the PDS_* variables the harness sets onto the reference server,
// and creates the PDS_HANDLE account on first start, before /xrpc/_health
// answers 200 (the harness treats health as "ready to log in").

import fs from 'node:fs'
import path from 'node:path'
import { randomBytes } from 'node:crypto'
import { PDS, readEnv, envToCfg, envToSecrets } from '@atproto/pds'

const dir = process.env.PDS_DATA_DIRECTORY
// The PLC rotation key must survive restarts, like roost's own keys.
const keyFile = path.join(dir, 'reference-rotation-key.hex')
if (!fs.existsSync(keyFile)) fs.writeFileSync(keyFile, randomBytes(32).toString('hex'))
process.env.PDS_PLC_ROTATION_KEY_K256_PRIVATE_KEY_HEX = fs.readFileSync(keyFile, 'utf8')
process.env.PDS_BLOBSTORE_DISK_LOCATION = path.join(dir, 'blobs')
process.env.PDS_INVITE_REQUIRED = 'false'
// The reference resolver refuses IP-address hosts even in dev mode.
process.env.PDS_DID_PLC_URL = process.env.PDS_DID_PLC_URL.replace('//127.0.0.1:', '//localhost:')
if (!process.env.PDS_CRAWLERS) delete process.env.PDS_CRAWLERS

const env = readEnv()
const pds = await PDS.create(envToCfg(env), envToSecrets(env))

// 503 on /xrpc/_health until the account can log in.
let ready = false
const handle = pds.app.handle
pds.app.handle = function (req, res, next) {
  if (!ready && req.url.startsWith('/xrpc/_health')) {
    res.statusCode = 503
    return res.end()
  }
  return handle.call(this, req, res, next)
}
await pds.start()

const base = `http://127.0.0.1:${process.env.PDS_PORT}/xrpc`
const post = (nsid, body) =>
  fetch(`${base}/${nsid}`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(body),
  })
const credentials = { identifier: process.env.PDS_HANDLE, password: process.env.PDS_PASSWORD }
if ((await post('com.atproto.server.createSession', credentials)).status !== 200) {
  const res = await post('com.atproto.server.createAccount', {
    handle: process.env.PDS_HANDLE,
    email: process.env.PDS_EMAIL,
    password: process.env.PDS_PASSWORD,
  })
  console.log('createAccount', res.status, await res.text())
  // The reference PDS needs a moment after createAccount before login works.
  for (let i = 0; i < 100; i++) {
    if ((await post('com.atproto.server.createSession', credentials)).status === 200) break
    await new Promise((resolve) => setTimeout(resolve, 100))
  }
}
ready = true
console.log('reference PDS ready')

process.on('SIGTERM', async () => {
  await pds.destroy()
  process.exit(0)
})
