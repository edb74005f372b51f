// Everything the Bluesky app needs besides the repository, driven by the
// official clients: AppView proxying with service auth (checked by the
// official verifier in @atproto/xrpc-server, resolving the signing key
// through the official PLC directory), preferences, app passwords, handle
// changes (the PLC update validated by @did-plc/server) and account status.

import { describe, it as test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import http from 'node:http'
import { AtpAgent } from '@atproto/api'
import { cborDecodeMulti } from '@atproto/common'
import WebSocket from 'ws'
import { IdResolver } from '@atproto/identity'
import { verifyJwt } from '@atproto/xrpc-server'
import { startPlc, plcGet } from './plc.mjs'
import { startRoost, roostBinPath, roostBinAvailable, freePort } from './harness.mjs'

const BIN = roostBinPath()
let skip = false
if (!roostBinAvailable(BIN) && process.env.ROOST_REQUIRE_BIN !== '1') {
  skip = `SKIP: roost binary not found at ${BIN}`
  console.error(`\n*** ${skip} ***\n`)
}
const TEST_TIMEOUT_MS = 60_000
const APPVIEW_DID = 'did:web:appview.test'

/**
 * A stand-in AppView: every request must carry a service token that the
 * official `verifyJwt` accepts for this audience and method.
 */
async function startAppView(idResolver) {
  const seen = []
  // The rev the stand-in claims to have indexed up to (set by the tests).
  const state = { staleRev: '2222222222222' }
  const server = http.createServer(async (req, res) => {
    const url = new URL(req.url, 'http://x')
    const nsid = url.pathname.replace('/xrpc/', '')
    const entry = { nsid, query: url.search, headers: req.headers }
    seen.push(entry)
    try {
      const token = (req.headers.authorization ?? '').replace(/^Bearer /, '')
      entry.payload = await verifyJwt(token, APPVIEW_DID, nsid, (iss, force) =>
        idResolver.did.resolveAtprotoKey(iss, force),
      )
    } catch (err) {
      entry.error = err.message
      res.writeHead(401, { 'content-type': 'application/json' })
      res.end(JSON.stringify({ error: 'AuthenticationRequired', message: err.message }))
      return
    }
    // An AppView that has indexed nothing of this account yet (rev far behind).
    const stale = { 'content-type': 'application/json; charset=utf-8', 'atproto-repo-rev': state.staleRev }
    if (nsid === 'app.bsky.actor.getProfile') {
      const actor = url.searchParams.get('actor')
      res.writeHead(200, stale)
      res.end(JSON.stringify({ did: actor, handle: 'stale.test', displayName: 'Old name', followersCount: 3 }))
      return
    }
    if (nsid === 'app.bsky.feed.getPostThread') {
      res.writeHead(400, { 'content-type': 'application/json', 'atproto-repo-rev': state.staleRev })
      res.end(JSON.stringify({ error: 'NotFound', message: 'Post not found' }))
      return
    }
    if (nsid === 'app.bsky.feed.getAuthorFeed') {
      res.writeHead(200, stale)
      res.end(JSON.stringify({ feed: [] }))
      return
    }
    if (nsid === 'app.bsky.feed.getTimeline' && url.searchParams.get('algorithm') === 'stale') {
      res.writeHead(200, stale)
      res.end(JSON.stringify({ feed: [] }))
      return
    }
    if (nsid === 'app.bsky.feed.getTimeline') {
      res.writeHead(200, { 'content-type': 'application/json; charset=utf-8', 'atproto-repo-rev': '3kaaaaaaaaaaa' })
      res.end(JSON.stringify({ feed: [], cursor: 'next' }))
      return
    }
    res.writeHead(400, { 'content-type': 'application/json' })
    res.end(JSON.stringify({ error: 'MethodNotImplemented', message: `mock has no ${nsid}` }))
  })
  const port = await freePort()
  await new Promise((resolve) => server.listen(port, '127.0.0.1', resolve))
  return { url: `http://127.0.0.1:${port}`, seen, state, stop: () => new Promise((r) => { server.close(r); server.closeAllConnections() }) }
}

/**
 * A stand-in chat service reached only through `atproto-proxy`: it serves
 * its own did:web document (did:web:localhost%3A<port>, the harness's
 * stand-in for did:web:api.bsky.chat) and checks every service token.
 */
async function startChat(idResolver) {
  const seen = []
  let did
  const server = http.createServer(async (req, res) => {
    const url = new URL(req.url, 'http://x')
    if (url.pathname === '/.well-known/did.json') {
      res.writeHead(200, { 'content-type': 'application/json' })
      res.end(JSON.stringify({
        '@context': ['https://www.w3.org/ns/did/v1'],
        id: did,
        service: [{ id: '#bsky_chat', type: 'BskyChatService', serviceEndpoint: `http://localhost:${port}` }],
      }))
      return
    }
    const nsid = url.pathname.replace('/xrpc/', '')
    const entry = { nsid }
    seen.push(entry)
    try {
      const token = (req.headers.authorization ?? '').replace(/^Bearer /, '')
      entry.payload = await verifyJwt(token, `${did}#bsky_chat`, nsid, (iss, force) =>
        idResolver.did.resolveAtprotoKey(iss, force),
      )
    } catch (err) {
      entry.error = err.message
      res.writeHead(401, { 'content-type': 'application/json' })
      res.end(JSON.stringify({ error: 'AuthenticationRequired', message: err.message }))
      return
    }
    res.writeHead(200, { 'content-type': 'application/json' })
    res.end(JSON.stringify({ convos: [] }))
  })
  const port = await freePort()
  did = `did:web:localhost%3A${port}`
  // All interfaces: "localhost" may resolve to ::1 or 127.0.0.1.
  await new Promise((resolve) => server.listen(port, resolve))
  return { did, seen, stop: () => new Promise((r) => { server.close(r); server.closeAllConnections() }) }
}

describe('account features with the official clients', () => {
  const it = (name, fn) => test(name, { skip, timeout: TEST_TIMEOUT_MS }, fn)
  let plcDir
  let roost
  let appview
  let idResolver

  before(async () => {
    if (skip) return
    plcDir = await startPlc()
    // The PLC directory is plain http on loopback; the default fetch refuses it.
    idResolver = new IdResolver({ plcUrl: plcDir.url, fetch: (i, o) => fetch(i, o), timeout: 10_000 })
    appview = await startAppView(idResolver)
    roost = await startRoost({
      plcUrl: plcDir.url,
      env: {
        PDS_BSKY_APP_VIEW_URL: appview.url,
        PDS_BSKY_APP_VIEW_DID: APPVIEW_DID,
        PDS_DISABLE_SSRF_PROTECTION: 'true',
      },
    })
  }, { timeout: 60_000 })

  after(async () => {
    await roost?.cleanup()
    await appview?.stop()
    await plcDir?.stop()
  })

  async function login(password = roost.password) {
    const agent = new AtpAgent({ service: roost.url })
    await agent.login({ identifier: roost.handle, password })
    return agent
  }

  it('proxies AppView calls with a service token the official verifier accepts', async () => {
    const agent = await login()
    const before = appview.seen.length
    const res = await agent.app.bsky.feed.getTimeline({ limit: 7 }, { headers: { 'accept-language': 'de' } })
    assert.deepEqual(res.data, { feed: [], cursor: 'next' })
    assert.equal(res.headers['atproto-repo-rev'], '3kaaaaaaaaaaa')
    const call = appview.seen[before]
    assert.equal(call.error, undefined, `verifyJwt refused the token: ${call.error}`)
    assert.equal(call.payload.iss, agent.session.did)
    assert.equal(call.payload.aud, APPVIEW_DID)
    assert.equal(call.payload.lxm, 'app.bsky.feed.getTimeline')
    assert.equal(call.query, '?limit=7')
    assert.equal(call.headers['accept-language'], 'de')
    // Upstream errors keep their name.
    await assert.rejects(agent.app.bsky.feed.getSuggestedFeeds({}), (err) => {
      assert.equal(err.error, 'MethodNotImplemented')
      return true
    })
  })

  it('proxies chat through atproto-proxy to a did:web service, privileged sessions only', async () => {
    const chat = await startChat(idResolver)
    try {
      const agent = await login()
      const proxied = agent.withProxy('bsky_chat', chat.did)
      const { data } = await proxied.chat.bsky.convo.listConvos({})
      assert.deepEqual(data, { convos: [] })
      const call = chat.seen.at(-1)
      assert.equal(call.error, undefined, `verifyJwt refused the token: ${call.error}`)
      assert.equal(call.payload.aud, `${chat.did}#bsky_chat`)
      assert.equal(call.payload.lxm, 'chat.bsky.convo.listConvos')
      // App passwords reach DMs only when privileged.
      const { data: plain } = await agent.com.atproto.server.createAppPassword({ name: 'chat-plain' })
      const { data: priv } = await agent.com.atproto.server.createAppPassword({ name: 'chat-priv', privileged: true })
      const before = chat.seen.length
      const plainAgent = (await login(plain.password)).withProxy('bsky_chat', chat.did)
      await assert.rejects(plainAgent.chat.bsky.convo.listConvos({}), /Bad token method/)
      assert.equal(chat.seen.length, before, 'refused before reaching the chat service')
      const privAgent = (await login(priv.password)).withProxy('bsky_chat', chat.did)
      await privAgent.chat.bsky.convo.listConvos({})
      // A malformed header or an unknown service id: clear errors.
      // (@atproto/api refuses to build a malformed header, so send one by hand.)
      const raw = await fetch(`${roost.url}/xrpc/chat.bsky.convo.listConvos`, {
        headers: { authorization: `Bearer ${agent.session.accessJwt}`, 'atproto-proxy': 'not-a-did#bsky_chat' },
      })
      assert.equal(raw.status, 400)
      assert.equal((await raw.json()).error, 'InvalidRequest')
      await assert.rejects(agent.withProxy('nope', chat.did).chat.bsky.convo.listConvos({}), /could not resolve proxy did service url/)
    } finally {
      await chat.stop()
    }
  })

  it('mints getServiceAuth tokens the official verifier accepts', async () => {
    const agent = await login()
    const { data } = await agent.com.atproto.server.getServiceAuth({ aud: APPVIEW_DID, lxm: 'app.bsky.feed.getFeedSkeleton' })
    const payload = await verifyJwt(data.token, APPVIEW_DID, 'app.bsky.feed.getFeedSkeleton', (iss, force) =>
      idResolver.did.resolveAtprotoKey(iss, force),
    )
    assert.equal(payload.iss, agent.session.did)
    await assert.rejects(
      verifyJwt(data.token, APPVIEW_DID, 'app.bsky.feed.getTimeline', (iss, f) => idResolver.did.resolveAtprotoKey(iss, f)),
      'a token for one method is refused for another',
    )
  })

  it('keeps preferences through the official client helpers', async () => {
    const agent = await login()
    await agent.setAdultContentEnabled(true)
    await agent.setContentLabelPref('nsfw', 'warn')
    await agent.addSavedFeeds([{ type: 'feed', value: 'at://did:plc:abc/app.bsky.feed.generator/cats', pinned: true }])
    const prefs = await (await login()).getPreferences()
    assert.equal(prefs.moderationPrefs.adultContentEnabled, true)
    assert.equal(prefs.moderationPrefs.labels.nsfw, 'warn')
    assert.ok(prefs.savedFeeds.some((f) => f.value === 'at://did:plc:abc/app.bsky.feed.generator/cats'))
    await assert.rejects(
      agent.app.bsky.actor.putPreferences({ preferences: [{ $type: 'com.example.pref' }] }),
      /not in the app.bsky namespace/,
    )
  })

  it('creates app passwords whose sessions are restricted, and revokes them', async () => {
    const agent = await login()
    const { data: created } = await agent.com.atproto.server.createAppPassword({ name: 'interop' })
    assert.match(created.password, /^[a-z2-7]{4}(-[a-z2-7]{4}){3}$/)
    const { data: list } = await agent.com.atproto.server.listAppPasswords()
    assert.ok(list.passwords.some((p) => p.name === 'interop' && p.privileged === false))
    const app = await login(created.password)
    assert.equal(app.session.did, agent.session.did)
    await app.app.bsky.feed.getTimeline({})
    await assert.rejects(app.com.atproto.server.createAppPassword({ name: 'nested' }), /Bad token scope/)
    await agent.com.atproto.server.revokeAppPassword({ name: 'interop' })
    await assert.rejects(app.com.atproto.server.getSession(), 'revoked sessions end at once')
    await assert.rejects(login(created.password), 'the revoked password no longer logs in')
  })

  it('changes the handle through a PLC update the official directory accepts', async () => {
    const agent = await login()
    const did = agent.session.did
    // Watch the firehose for the #identity event.
    const ws = new WebSocket(`${roost.url.replace('http', 'ws')}/xrpc/com.atproto.sync.subscribeRepos`)
    const identity = new Promise((resolve, reject) => {
      ws.on('message', (data) => {
        const [header, body] = cborDecodeMulti(new Uint8Array(data))
        if (header.t === '#identity' && body.did === did) resolve(body)
      })
      ws.on('error', reject)
    })
    await new Promise((resolve) => ws.once('open', resolve))
    await agent.com.atproto.identity.updateHandle({ handle: 'bob.test' })
    const event = await identity
    ws.close()
    assert.equal(event.handle, 'bob.test')
    assert.equal(typeof event.seq, 'number')
    const { body: doc } = await plcGet(plcDir.url, `/${did}`)
    assert.deepEqual(doc.alsoKnownAs, ['at://bob.test'])
    const { body: log } = await plcGet(plcDir.url, `/${did}/log/audit`)
    assert.equal(log.length, 2, 'genesis + update, chained and signed (validated by @did-plc/server)')
    const { data } = await agent.com.atproto.identity.resolveHandle({ handle: 'bob.test' })
    assert.equal(data.did, did)
    const session = await agent.com.atproto.server.getSession()
    assert.equal(session.data.handle, 'bob.test')
    // And back, so other tests keep their handle.
    await agent.com.atproto.identity.updateHandle({ handle: roost.handle })
    assert.equal((await plcGet(plcDir.url, `/${did}/log/audit`)).body.length, 3)
  })

  it('signs up a second account with an invite code, through the official client', async () => {
    const basic = 'Basic ' + Buffer.from(`admin:${roost.env.PDS_ADMIN_PASSWORD}`).toString('base64')
    const res = await fetch(`${roost.url}/xrpc/com.atproto.server.createInviteCode`, {
      method: 'POST',
      headers: { authorization: basic, 'content-type': 'application/json' },
      body: JSON.stringify({ useCount: 1 }),
    })
    assert.equal(res.status, 200)
    const { code } = await res.json()
    const agent = new AtpAgent({ service: roost.url })
    await assert.rejects(
      agent.createAccount({ handle: 'carol.test', password: 'carol-password', email: 'carol@example.com' }),
      /invite/i,
    )
    await agent.createAccount({ handle: 'carol.test', password: 'carol-password', email: 'carol@example.com', inviteCode: code })
    assert.match(agent.session.did, /^did:plc:/)
    const { body: doc } = await plcGet(plcDir.url, `/${agent.session.did}`)
    assert.deepEqual(doc.alsoKnownAs, ['at://carol.test'], 'registered with the official PLC directory')
    await agent.post({ text: 'carol was here' })
    const again = new AtpAgent({ service: roost.url })
    await assert.rejects(
      again.createAccount({ handle: 'dan.test', password: 'dan-password', email: 'dan@example.com', inviteCode: code }),
      /invite code/i,
      'a one-use code is spent',
    )
  })

  it('shows a fresh post and profile edit at once (read-after-write), through the official client', async () => {
    const agent = await login()
    const did = agent.session.did
    // The AppView has indexed everything up to now (one older post), and
    // nothing after. (With no indexed record at all Roost splices nothing,
    // like the reference: the rev may predate a migrated-in repository.)
    await agent.post({ text: 'an older post the AppView knows' })
    appview.state.staleRev = (await agent.com.atproto.sync.getLatestCommit({ did })).data.rev
    await agent.upsertProfile((p) => ({ ...p, displayName: 'Fresh name' }))
    const { uri } = await agent.post({ text: 'the AppView has not seen this yet' })
    const { data: tl, headers } = await agent.app.bsky.feed.getTimeline({ algorithm: 'stale' })
    const mine = tl.feed.find((item) => item.post.uri === uri)
    assert.ok(mine, `the new post is spliced into the timeline: ${JSON.stringify(tl)}`)
    assert.equal(mine.post.record.text, 'the AppView has not seen this yet')
    assert.equal(mine.post.author.did, did)
    assert.equal(mine.post.author.displayName, 'Fresh name')
    assert.ok(Number(headers['atproto-upstream-lag']) >= 0, 'Atproto-Upstream-Lag is set')
    const { data: profile } = await agent.getProfile({ actor: did })
    assert.equal(profile.displayName, 'Fresh name', 'the local profile record wins over the stale view')
    assert.equal(profile.followersCount, 3, 'the AppView fields stay')
    const { data: thread } = await agent.getPostThread({ uri })
    assert.equal(thread.thread.post.uri, uri, 'the thread of a post the AppView does not know is built locally')
    const { data: feed } = await agent.getAuthorFeed({ actor: did })
    assert.ok(feed.feed.some((item) => item.post.uri === uri))
  })

  it('deactivates and reactivates the account', async () => {
    const agent = await login()
    const did = agent.session.did
    await agent.com.atproto.server.deactivateAccount({})
    const { data: status } = await agent.com.atproto.sync.getRepoStatus({ did })
    assert.equal(status.active, false)
    assert.equal(status.status, 'deactivated')
    await assert.rejects(
      agent.com.atproto.repo.createRecord({ repo: did, collection: 'app.bsky.feed.post', record: { text: 'x', createdAt: new Date().toISOString() } }),
    )
    await agent.com.atproto.server.activateAccount()
    const { data: check } = await agent.com.atproto.server.checkAccountStatus()
    assert.equal(check.activated, true)
    assert.equal(check.validDid, true)
    await agent.com.atproto.repo.createRecord({ repo: did, collection: 'app.bsky.feed.post', record: { text: 'back', createdAt: new Date().toISOString() } })
  })
})
