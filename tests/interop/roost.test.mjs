// Interop tests: the real roost binary driven by the official atproto
// TypeScript packages (@atproto/api's AtpAgent, @atproto/repo's verifiers,
// @did-plc/lib's PLC validation). What passes here is what the reference
// client stack accepts, not what our own Rust code believes.
//
// One roost (and one PLC directory) is shared by the whole file; the tests
// run in order and the restart test must stay last.

import { describe, it as test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { setTimeout as sleep } from 'node:timers/promises'
import { AtpAgent, jsonToLex } from '@atproto/api'
import {
  verifyRepoCar,
  readCarWithRoot,
  verifyProofs,
  verifyRecords,
  cidForRecord,
  MemoryBlockstore,
  MST,
  def as repoDef,
  formatDataKey,
} from '@atproto/repo'
import { verifySignature } from '@atproto/crypto'
import { cborEncode } from '@atproto/common'
import * as plc from '@did-plc/lib'
import { startPlc, plcGet, didKeyFromDidDoc } from './plc.mjs'
import { startRoost, roostBinPath, roostBinAvailable } from './harness.mjs'

const BIN = roostBinPath()
// Skip only when there is no binary at all. ROOST_REQUIRE_BIN=1 (for CI once
// roost builds) turns a missing binary into a failure instead.
let skip = false
if (!roostBinAvailable(BIN) && process.env.ROOST_REQUIRE_BIN !== '1') {
  skip = `SKIP: roost binary not found at ${BIN}`
  console.error(`\n*** ${skip} ***\n`)
}

// A syntactically valid DID that nobody here owns; follows only need a DID.
const SOMEONE_ELSE = 'did:plc:ewvi7nxzyoun6zhxrhs64oiz'
const TEST_TIMEOUT_MS = 60_000
const TID_RE = /^[234567abcdefghij][234567abcdefghijklmnopqrstuvwxyz]{12}$/

/** Assert that `promise` rejects with XRPC error `name` and one of `statuses`. */
async function assertXrpcError(promise, names, statuses) {
  names = [names].flat()
  statuses = [statuses].flat()
  await assert.rejects(promise, (err) => {
    assert.ok(
      names.includes(err.error) && statuses.includes(err.status),
      `expected XRPC error ${names.join('|')} with status ${statuses.join('|')}, ` +
        `got error=${JSON.stringify(err.error)} status=${err.status} message=${JSON.stringify(err.message)}`,
    )
    return true
  })
}

/** All records of one collection via listRecords, following cursors. */
async function listAll(agent, repo, collection, { limit = 100, reverse } = {}) {
  const pages = []
  let cursor
  for (let i = 0; i < 1000; i++) {
    const { data } = await agent.com.atproto.repo.listRecords({ repo, collection, limit, cursor, reverse })
    assert.ok(data.records.length <= limit, `page of ${data.records.length} > limit ${limit}`)
    pages.push(data.records)
    if (!data.cursor) return { records: pages.flat(), pages }
    // A cursor that does not move would loop forever.
    assert.notEqual(data.cursor, cursor, 'listRecords returned the same cursor twice')
    cursor = data.cursor
  }
  assert.fail('listRecords did not finish within 1000 pages')
}

const rkeyOf = (uri) => uri.split('/').pop()

describe('roost with the official @atproto clients', () => {
  // Each test carries the skip (rather than the suite) so that the runner's
  // summary counts them as skipped instead of not mentioning them at all.
  // The timeout turns a hung request into a failure instead of a stuck run.
  const it = (name, fn) => test(name, { skip, timeout: TEST_TIMEOUT_MS }, fn)

  let plcDir
  let roost
  let did // the account's DID, learned at first login

  before(async () => {
    if (skip) return
    plcDir = await startPlc()
    roost = await startRoost({ plcUrl: plcDir.url })
  }, { timeout: 60_000 })

  after(async () => {
    // Teardown must run even if startup failed half-way.
    await roost?.cleanup()
    await plcDir?.stop()
  })

  async function login() {
    const agent = new AtpAgent({ service: roost.url })
    await agent.login({ identifier: roost.handle, password: roost.password })
    did ??= agent.session.did
    return agent
  }

  it('logs in, describes itself and resolves the handle', async () => {
    const agent = new AtpAgent({ service: roost.url })
    const res = await agent.login({ identifier: 'alice.test', password: roost.password })
    assert.match(agent.session.did, /^did:plc:[a-z2-7]{24}$/)
    assert.equal(agent.session.handle, 'alice.test')
    assert.equal(agent.session.active, true)
    did = agent.session.did
    // didDoc is optional in createSession, but when present the agent
    // re-routes requests to its PDS endpoint, so it must point back here.
    if (res.data.didDoc) {
      assert.equal(res.data.didDoc.id, did)
      const pds = res.data.didDoc.service?.find((s) => s.id === '#atproto_pds' || s.id === `${did}#atproto_pds`)
      assert.equal(pds?.serviceEndpoint, roost.url)
    }

    // The DID can be used as identifier too.
    const byDid = new AtpAgent({ service: roost.url })
    await byDid.login({ identifier: did, password: roost.password })
    assert.equal(byDid.session.did, did)

    // A wrong password is refused the way the reference PDS does.
    const wrong = new AtpAgent({ service: roost.url })
    await assertXrpcError(
      wrong.login({ identifier: 'alice.test', password: `${roost.password}x` }),
      'AuthenticationRequired',
      401,
    )
    assert.equal(wrong.session, undefined)

    const { data: server } = await agent.com.atproto.server.describeServer()
    assert.match(server.did, /^did:/)
    assert.ok(Array.isArray(server.availableUserDomains), 'availableUserDomains is a list')
    assert.ok(server.availableUserDomains.includes('.test'), JSON.stringify(server.availableUserDomains))

    const { data: resolved } = await agent.com.atproto.identity.resolveHandle({ handle: 'alice.test' })
    assert.equal(resolved.did, did)
    // resolveHandle needs no session.
    const anon = new AtpAgent({ service: roost.url })
    const { data: anonResolved } = await anon.com.atproto.identity.resolveHandle({ handle: 'alice.test' })
    assert.equal(anonResolved.did, did)
  })

  it('creates, reads, updates and deletes bsky records', async () => {
    const agent = await login()
    const getRecord = async (uri) => {
      const [, , repo, collection, rkey] = uri.split('/')
      const { data } = await agent.com.atproto.repo.getRecord({ repo, collection, rkey })
      assert.equal(data.uri, uri)
      // The CID must be the one of the record as served: this catches any
      // difference between the stored DAG-CBOR and the JSON rendering.
      assert.equal((await cidForRecord(jsonToLex(data.value))).toString(), data.cid, `CID of ${uri}`)
      return data
    }

    const post = await agent.post({ text: 'hello from the interop suite' })
    assert.match(post.uri, new RegExp(`^at://${did}/app\\.bsky\\.feed\\.post/`))
    assert.match(rkeyOf(post.uri), TID_RE)
    const gotPost = await getRecord(post.uri)
    assert.equal(gotPost.cid, post.cid)
    assert.equal(gotPost.value.$type, 'app.bsky.feed.post')
    assert.equal(gotPost.value.text, 'hello from the interop suite')

    const ref = { uri: post.uri, cid: post.cid }
    const reply = await agent.post({ text: 'a reply', reply: { root: ref, parent: ref } })
    const gotReply = await getRecord(reply.uri)
    assert.equal(gotReply.cid, reply.cid)
    assert.deepEqual(gotReply.value.reply, { root: ref, parent: ref })

    const like = await agent.like(post.uri, post.cid)
    assert.match(like.uri, new RegExp(`^at://${did}/app\\.bsky\\.feed\\.like/`))
    const gotLike = await getRecord(like.uri)
    assert.equal(gotLike.cid, like.cid)
    assert.deepEqual(gotLike.value.subject, ref)

    const follow = await agent.follow(SOMEONE_ELSE)
    const gotFollow = await getRecord(follow.uri)
    assert.equal(gotFollow.cid, follow.cid)
    assert.equal(gotFollow.value.subject, SOMEONE_ELSE)

    // upsertProfile = getRecord + putRecord with swapRecord (null the first
    // time: "must not exist yet"), so this exercises both swap flavours.
    await agent.upsertProfile(() => ({ displayName: 'Alice' }))
    const profile1 = await getRecord(`at://${did}/app.bsky.actor.profile/self`)
    assert.equal(profile1.value.displayName, 'Alice')
    await agent.upsertProfile((existing) => {
      assert.equal(existing?.displayName, 'Alice', 'upsertProfile saw the first version')
      return { ...existing, description: 'Testing interop' }
    })
    const profile2 = await getRecord(`at://${did}/app.bsky.actor.profile/self`)
    assert.equal(profile2.value.displayName, 'Alice')
    assert.equal(profile2.value.description, 'Testing interop')
    assert.notEqual(profile2.cid, profile1.cid)

    await agent.deleteLike(like.uri)
    await assertXrpcError(
      agent.com.atproto.repo.getRecord({ repo: did, collection: 'app.bsky.feed.like', rkey: rkeyOf(like.uri) }),
      'RecordNotFound',
      400,
    )
    // Deleting did not take anything else with it.
    assert.equal((await getRecord(post.uri)).cid, post.cid)
  })

  it('pages through listRecords in both orders', async () => {
    const agent = await login()
    const created = []
    for (let i = 0; i < 25; i++) {
      const res = await agent.post({ text: `paging post ${i}` })
      created.push(res)
    }
    // rkeys are TIDs, so creation order must be rkey order.
    for (let i = 1; i < created.length; i++) {
      assert.ok(rkeyOf(created[i].uri) > rkeyOf(created[i - 1].uri), `TIDs not increasing at ${i}`)
    }

    const collection = 'app.bsky.feed.post'
    const newestFirst = await listAll(agent, did, collection, { limit: 10 })
    const oldestFirst = await listAll(agent, did, collection, { limit: 10, reverse: true })
    const oneGo = await listAll(agent, did, collection, { limit: 100 })

    for (const [name, list] of [['default', newestFirst], ['reverse', oldestFirst]]) {
      assert.ok(list.pages.length >= 3, `${name}: expected ≥3 pages of 10, got ${list.pages.length}`)
      const uris = list.records.map((r) => r.uri)
      assert.equal(new Set(uris).size, uris.length, `${name}: duplicates across pages`)
      for (const r of list.records) assert.equal(r.uri.split('/')[3], collection)
    }
    // Same set of records whatever the page size or order.
    const sortedUris = (l) => l.records.map((r) => r.uri).sort()
    assert.deepEqual(sortedUris(newestFirst), sortedUris(oneGo))
    assert.deepEqual(sortedUris(oldestFirst), sortedUris(oneGo))
    // Nothing we created is missing, with the CIDs createRecord returned.
    const byUri = new Map(oneGo.records.map((r) => [r.uri, r]))
    for (const c of created) {
      assert.equal(byUri.get(c.uri)?.cid, c.cid, `missing or wrong CID: ${c.uri}`)
    }

    const rkeys = (l) => l.records.map((r) => rkeyOf(r.uri))
    const desc = rkeys(newestFirst)
    assert.deepEqual(desc, [...desc].sort().reverse(), 'default order is newest (highest rkey) first')
    assert.deepEqual(rkeys(oldestFirst), [...desc].reverse(), 'reverse: true is oldest first')
    // Our 25 are the newest posts, so they open the default listing.
    assert.deepEqual(
      newestFirst.records.slice(0, 25).map((r) => r.uri),
      created.map((c) => c.uri).reverse(),
    )
  })

  it('refuses writes with a stale swapRecord or swapCommit', async () => {
    const agent = await login()
    const collection = 'app.bsky.feed.post'
    const v1 = await agent.com.atproto.repo.createRecord({
      repo: did,
      collection,
      record: { $type: collection, text: 'version 1', createdAt: new Date().toISOString() },
    })
    const rkey = rkeyOf(v1.data.uri)
    const v2 = await agent.com.atproto.repo.putRecord({
      repo: did,
      collection,
      rkey,
      swapRecord: v1.data.cid,
      record: { $type: collection, text: 'version 2', createdAt: new Date().toISOString() },
    })
    assert.notEqual(v2.data.cid, v1.data.cid)

    // v1's CID is stale now.
    await assertXrpcError(
      agent.com.atproto.repo.putRecord({
        repo: did,
        collection,
        rkey,
        swapRecord: v1.data.cid,
        record: { $type: collection, text: 'version 3', createdAt: new Date().toISOString() },
      }),
      'InvalidSwap',
      400,
    )
    await assertXrpcError(
      agent.com.atproto.repo.deleteRecord({ repo: did, collection, rkey, swapRecord: v1.data.cid }),
      'InvalidSwap',
      400,
    )
    const { data: current } = await agent.com.atproto.repo.getRecord({ repo: did, collection, rkey })
    assert.equal(current.cid, v2.data.cid)
    assert.equal(current.value.text, 'version 2')

    // swapCommit: take the head, move it with another write, then use the
    // old head.
    const { data: head } = await agent.com.atproto.sync.getLatestCommit({ did })
    await agent.post({ text: 'moves the head' })
    const blockedRkey = '3jzfcijpj2z2a' // a valid TID we never use elsewhere
    await assertXrpcError(
      agent.com.atproto.repo.applyWrites({
        repo: did,
        swapCommit: head.cid,
        writes: [
          {
            $type: 'com.atproto.repo.applyWrites#create',
            collection,
            rkey: blockedRkey,
            value: { $type: collection, text: 'must not land', createdAt: new Date().toISOString() },
          },
        ],
      }),
      'InvalidSwap',
      400,
    )
    await assertXrpcError(
      agent.com.atproto.repo.getRecord({ repo: did, collection, rkey: blockedRkey }),
      'RecordNotFound',
      400,
    )

    // ...while the current head as swapCommit is accepted.
    const { data: newHead } = await agent.com.atproto.sync.getLatestCommit({ did })
    await agent.com.atproto.repo.applyWrites({
      repo: did,
      swapCommit: newHead.cid,
      writes: [
        {
          $type: 'com.atproto.repo.applyWrites#update',
          collection,
          rkey,
          value: { $type: collection, text: 'version 3', createdAt: new Date().toISOString() },
        },
      ],
    })
    const { data: after3 } = await agent.com.atproto.repo.getRecord({ repo: did, collection, rkey })
    assert.equal(after3.value.text, 'version 3')
  })

  it('refreshes, checks and deletes sessions', async () => {
    const agent = await login()
    const server = agent.com.atproto.server
    const bearer = (jwt) => ({ headers: { authorization: `Bearer ${jwt}` } })

    // Access tokens carry second-resolution timestamps; wait so that a
    // correct server cannot hand back a byte-identical token.
    await sleep(1100)

    // The client's own refresh path, as apps use it.
    const before = agent.session
    await agent.sessionManager.refreshSession()
    assert.equal(agent.session.did, did)
    assert.notEqual(agent.session.refreshJwt, before.refreshJwt)
    assert.notEqual(agent.session.accessJwt, before.accessJwt)
    assert.equal((await server.getSession()).data.did, did)

    // The same by hand, with the refresh JWT as bearer.
    await sleep(1100)
    const { accessJwt, refreshJwt } = agent.session
    const { data: refreshed } = await server.refreshSession(undefined, bearer(refreshJwt))
    assert.equal(refreshed.did, did)
    assert.equal(refreshed.handle, 'alice.test')
    assert.notEqual(refreshed.accessJwt, accessJwt)
    assert.notEqual(refreshed.refreshJwt, refreshJwt)

    const { data: me } = await server.getSession(undefined, bearer(refreshed.accessJwt))
    assert.equal(me.did, did)
    assert.equal(me.handle, 'alice.test')

    // Token types are not interchangeable.
    await assert.rejects(server.refreshSession(undefined, bearer(refreshed.accessJwt)), (err) => {
      assert.ok([400, 401].includes(err.status), `access token accepted as refresh token? ${err.status} ${err.error}`)
      return true
    })
    await assert.rejects(server.getSession(undefined, bearer(refreshed.refreshJwt)), (err) => {
      assert.ok([400, 401].includes(err.status), `refresh token accepted as access token? ${err.status} ${err.error}`)
      return true
    })
    // A garbage token is refused, not a 500.
    await assert.rejects(server.getSession(undefined, bearer('not.a.jwt')), (err) => {
      assert.ok([400, 401].includes(err.status), `garbage bearer: ${err.status} ${err.error}`)
      return true
    })

    await server.deleteSession(undefined, bearer(refreshed.refreshJwt))
    await assertXrpcError(
      server.refreshSession(undefined, bearer(refreshed.refreshJwt)),
      ['ExpiredToken', 'InvalidToken'],
      [400, 401],
    )
  })

  it('serves a repository that verifies against the DID document', async () => {
    const agent = await login()
    // Own records, so that this test also stands alone (the proof checks
    // below need at least two records).
    await agent.post({ text: 'to be verified 1' })
    await agent.post({ text: 'to be verified 2' })
    // Sync endpoints are public: use a client without a session.
    const anon = new AtpAgent({ service: roost.url })

    const docRes = await plcGet(plcDir.url, `/${did}`)
    assert.equal(docRes.status, 200, `DID document for ${did}: ${JSON.stringify(docRes.body)}`)
    const didKey = didKeyFromDidDoc(docRes.body)

    const { data: car } = await anon.com.atproto.sync.getRepo({ did })
    assert.ok(car instanceof Uint8Array && car.length > 0, 'getRepo returns CAR bytes')
    // Checks the commit signature with the key from PLC, the DID in the
    // commit, and walks the whole MST (fails on any missing block).
    const verified = await verifyRepoCar(car, did, didKey)

    const { root, blocks } = await readCarWithRoot(car)
    assert.equal(verified.commit.cid.toString(), root.toString())
    const commit = await new MemoryBlockstore(blocks).readObj(root, repoDef.commit)
    assert.equal(commit.version, 3)
    assert.equal(commit.did, did)
    assert.match(commit.rev, TID_RE)

    // The MST must be the canonical one for its contents: rebuilding it from
    // the leaves with the reference implementation gives the same root.
    let mst = await MST.create(new MemoryBlockstore())
    for (const c of verified.creates) mst = await mst.add(formatDataKey(c.collection, c.rkey), c.cid)
    assert.equal((await mst.getPointer()).toString(), commit.data.toString(), 'MST root differs from reference build')

    // Every record listRecords knows is in the verified repo with the same
    // CID, and nothing else is.
    const inCar = new Map(verified.creates.map((c) => [`${c.collection}/${c.rkey}`, c.cid.toString()]))
    const { data: described } = await agent.com.atproto.repo.describeRepo({ repo: did })
    assert.equal(described.did, did)
    assert.equal(described.handle, 'alice.test')
    const listed = new Map()
    for (const collection of described.collections) {
      for (const r of (await listAll(agent, did, collection)).records) {
        listed.set(`${collection}/${rkeyOf(r.uri)}`, r.cid)
      }
    }
    assert.ok(listed.size >= 2, 'records are listed')
    assert.deepEqual([...listed.entries()].sort(), [...inCar.entries()].sort())
    const collectionsInCar = [...new Set(verified.creates.map((c) => c.collection))].sort()
    assert.deepEqual([...described.collections].sort(), collectionsInCar)

    const { data: latest } = await anon.com.atproto.sync.getLatestCommit({ did })
    assert.equal(latest.cid, root.toString())
    assert.equal(latest.rev, commit.rev)

    // Inclusion proof for a single record.
    const [key, cid] = [...listed.entries()].find(([k]) => k.startsWith('app.bsky.feed.post/'))
    const [collection, rkey] = key.split('/')
    const { data: proof } = await anon.com.atproto.sync.getRecord({ did, collection, rkey })
    const claim = { collection, rkey, cid: verified.creates.find((c) => c.rkey === rkey && c.collection === collection).cid }
    assert.equal(claim.cid.toString(), cid)
    const checked = await verifyProofs(proof, [claim], did, didKey)
    assert.equal(checked.verified.length, 1, 'proof verifies')
    assert.equal(checked.unverified.length, 0)
    const records = await verifyRecords(proof, did, didKey)
    assert.ok(records.some((r) => r.collection === collection && r.rkey === rkey && r.record))
    // The same proof does not vouch for a different CID (the check has teeth).
    const otherCid = verified.creates.find((c) => c.cid.toString() !== cid).cid
    const wrong = await verifyProofs(proof, [{ collection, rkey, cid: otherCid }], did, didKey)
    assert.equal(wrong.verified.length, 0)

    // A proof that a record does not exist verifies too.
    const absent = await anon.com.atproto.sync.getRecord({ did, collection, rkey: '2222222222222' })
      .then((r) => r.data)
      .catch((err) => err)
    if (absent instanceof Uint8Array) {
      const none = await verifyProofs(absent, [{ collection, rkey: '2222222222222', cid: null }], did, didKey)
      assert.equal(none.verified.length, 1, 'non-existence proof verifies')
    } else {
      // The reference PDS answers RecordNotFound for a missing record.
      assert.equal(absent.error, 'RecordNotFound', `sync.getRecord of a missing record: ${absent}`)
    }
  })

  it('registered a valid genesis operation with the PLC directory', async () => {
    if (!did) await login()
    const audit = await plcGet(plcDir.url, `/${did}/log/audit`)
    assert.equal(audit.status, 200, JSON.stringify(audit.body))
    const ops = audit.body.filter((e) => !e.nullified).map((e) => e.operation)
    assert.ok(ops.length >= 1)
    const genesis = ops[0]
    assert.equal(genesis.type, 'plc_operation')
    assert.equal(genesis.prev, null)
    assert.equal(await plc.didForCreateOp(genesis), did, 'DID is the hash of the genesis op')
    // The reference validator: hash, signatures, prev chain.
    const data = await plc.validateOperationLog(did, ops)
    assert.deepEqual(data.alsoKnownAs, ['at://alice.test'])
    assert.deepEqual(data.services, { atproto_pds: { type: 'AtprotoPersonalDataServer', endpoint: roost.url } })
    assert.match(data.verificationMethods.atproto, /^did:key:z/)
    assert.ok(data.rotationKeys.length >= 1)

    // The PLC's validator is lenient about signature encoding; today's
    // plc.directory is not. Require a compact low-S signature by one of the
    // rotation keys, checked with the current @atproto/crypto (strict mode).
    const { sig, ...unsigned } = genesis
    assert.match(sig, /^[A-Za-z0-9_-]{86}$/, 'sig is unpadded base64url of 64 bytes')
    const sigBytes = Buffer.from(sig, 'base64url')
    const bytes = cborEncode(unsigned)
    let signer = null
    for (const key of data.rotationKeys) {
      if (await verifySignature(key, bytes, sigBytes)) signer = key
    }
    assert.ok(signer, 'genesis signature verifies strictly against a rotation key')

    const doc = await plcGet(plcDir.url, `/${did}`)
    assert.equal(doc.body.id, did)
    assert.deepEqual(doc.body.alsoKnownAs, ['at://alice.test'])
    assert.equal(doc.body.service.find((s) => s.id === '#atproto_pds')?.serviceEndpoint, roost.url)
  })

  // Must stay last: restarts the shared server.
  it('keeps identity and data across a restart', async () => {
    const agent = await login()
    const post = await agent.post({ text: 'written before the restart' })
    const { data: headBefore } = await agent.com.atproto.sync.getLatestCommit({ did })
    const auditBefore = await plcGet(plcDir.url, `/${did}/log/audit`)
    // The in-process PLC's storage: DID -> operations. A server that forgot
    // its identity would register a fresh DID on start.
    const didsBefore = Object.keys(plcDir.db.contents).sort()

    const stopped = await roost.stop('SIGTERM')
    assert.equal(stopped.killed, false, 'roost exited on SIGTERM without needing SIGKILL')
    await roost.restart()

    const again = await login()
    assert.equal(again.session.did, did)
    assert.equal(again.session.handle, 'alice.test')
    const { data: got } = await again.com.atproto.repo.getRecord({
      repo: did,
      collection: 'app.bsky.feed.post',
      rkey: rkeyOf(post.uri),
    })
    assert.equal(got.cid, post.cid)
    const { data: headAfter } = await again.com.atproto.sync.getLatestCommit({ did })
    assert.deepEqual(headAfter, headBefore)

    // Still the one identity: no new genesis, no extra operations.
    const auditAfter = await plcGet(plcDir.url, `/${did}/log/audit`)
    assert.deepEqual(auditAfter.body, auditBefore.body)
    assert.equal(auditAfter.body.filter((e) => e.operation.prev === null).length, 1)
    assert.deepEqual(Object.keys(plcDir.db.contents).sort(), didsBefore, 'no DID registered by the restart')

    // And it keeps working: a new write lands on top of the old head.
    await again.post({ text: 'written after the restart' })
    const docRes = await plcGet(plcDir.url, `/${did}`)
    const { data: car } = await again.com.atproto.sync.getRepo({ did })
    const verified = await verifyRepoCar(car, did, didKeyFromDidDoc(docRes.body))
    assert.ok(verified.commit.rev > headBefore.rev, 'rev moves forward after restart')
    assert.ok(verified.creates.some((c) => c.rkey === rkeyOf(post.uri)))
  })
})
