// Tests of the test-support PLC directory itself (plc.mjs). The Roost suite
// trusts this server to reject what plc.directory would reject, so prove
// that here: a valid genesis is accepted and served, forged ones are not.

import { describe, it, before, after } from 'node:test'
import assert from 'node:assert/strict'
import * as plc from '@did-plc/lib'
import { Secp256k1Keypair, P256Keypair } from '@atproto/crypto'
import { startPlc, plcGet, plcPost, didKeyFromDidDoc } from './plc.mjs'

describe('local PLC directory', () => {
  let dir
  before(async () => {
    dir = await startPlc()
  })
  after(async () => {
    await dir?.stop()
  })

  // A fresh identity per test keeps the tests independent of each other.
  async function genesis(opts = {}) {
    const signingKey = await Secp256k1Keypair.create()
    const rotationKey = await Secp256k1Keypair.create()
    const { op, did } = await plc.createOp({
      signingKey: signingKey.did(),
      handle: opts.handle ?? 'someone.test',
      pds: opts.pds ?? 'http://localhost:2583',
      rotationKeys: [rotationKey.did()],
      signer: opts.signer ?? rotationKey,
    })
    return { op, did, signingKey, rotationKey }
  }

  it('accepts a valid genesis operation and serves it back', async () => {
    const { op, did, signingKey, rotationKey } = await genesis({ handle: 'valid.test' })
    assert.match(did, /^did:plc:[a-z2-7]{24}$/)

    const posted = await plcPost(dir.url, did, op)
    assert.equal(posted.status, 200, JSON.stringify(posted.body))

    const doc = await plcGet(dir.url, `/${did}`)
    assert.equal(doc.status, 200)
    assert.equal(doc.body.id, did)
    assert.deepEqual(doc.body.alsoKnownAs, ['at://valid.test'])
    assert.deepEqual(doc.body.service, [
      { id: '#atproto_pds', type: 'AtprotoPersonalDataServer', serviceEndpoint: 'http://localhost:2583' },
    ])
    assert.equal(didKeyFromDidDoc(doc.body), signingKey.did())

    const data = await plcGet(dir.url, `/${did}/data`)
    assert.equal(data.status, 200)
    assert.deepEqual(data.body.rotationKeys, [rotationKey.did()])
    assert.deepEqual(data.body.verificationMethods, { atproto: signingKey.did() })

    const log = await plcGet(dir.url, `/${did}/log`)
    assert.equal(log.status, 200)
    assert.deepEqual(log.body, [op])
    // The served log must itself validate with the reference library.
    const validated = await plc.validateOperationLog(did, log.body)
    assert.equal(validated.did, did)

    const audit = await plcGet(dir.url, `/${did}/log/audit`)
    assert.equal(audit.status, 200)
    assert.equal(audit.body.length, 1)
    assert.equal(audit.body[0].did, did)
    assert.equal(audit.body[0].nullified, false)
    assert.deepEqual(audit.body[0].operation, op)

    const last = await plcGet(dir.url, `/${did}/log/last`)
    assert.equal(last.status, 200)
    assert.deepEqual(last.body, op)
  })

  it('rejects a genesis operation whose content was changed after signing', async () => {
    const { op } = await genesis({ handle: 'honest.test' })
    // Change the handle but keep the signature: the DID is recomputed from
    // the tampered bytes so that only the signature check can catch it.
    const tampered = { ...op, alsoKnownAs: ['at://mallory.test'] }
    const tamperedDid = await plc.didForCreateOp(tampered)

    const res = await plcPost(dir.url, tamperedDid, tampered)
    assert.equal(res.status, 400, JSON.stringify(res.body))
    assert.match(res.body.message, /signature/i)
    assert.equal((await plcGet(dir.url, `/${tamperedDid}`)).status, 404)
  })

  it('rejects a genesis operation signed by a key that is not a rotation key', async () => {
    const outsider = await Secp256k1Keypair.create()
    const { op, did } = await genesis({ signer: outsider })
    const res = await plcPost(dir.url, did, op)
    assert.equal(res.status, 400, JSON.stringify(res.body))
    assert.match(res.body.message, /signature/i)
    assert.equal((await plcGet(dir.url, `/${did}`)).status, 404)
  })

  it('rejects a valid genesis operation posted under another DID', async () => {
    const { op } = await genesis()
    const { did: otherDid } = await genesis()
    const res = await plcPost(dir.url, otherDid, op)
    assert.equal(res.status, 400, JSON.stringify(res.body))
    assert.match(res.body.message, /hash of genesis/i)
    assert.equal((await plcGet(dir.url, `/${otherDid}`)).status, 404)
  })

  it('rejects something that is not an operation at all', async () => {
    const { did } = await genesis()
    const res = await plcPost(dir.url, did, { hello: 'world' })
    assert.equal(res.status, 400)
  })

  it('chains updates via prev and only from rotation keys', async () => {
    const { op, did, rotationKey } = await genesis({ handle: 'before.test' })
    assert.equal((await plcPost(dir.url, did, op)).status, 200)

    // An update signed by a stranger is refused.
    const stranger = await P256Keypair.create()
    const forged = await plc.updateHandleOp(op, stranger, 'stolen.test')
    const forgedRes = await plcPost(dir.url, did, forged)
    assert.equal(forgedRes.status, 400, JSON.stringify(forgedRes.body))

    // An update whose prev does not point into the log is refused.
    const update = await plc.updateHandleOp(op, rotationKey, 'after.test')
    const unrelated = (await genesis()).op
    const badPrev = await plc.updateHandleOp(unrelated, rotationKey, 'nowhere.test')
    const badPrevRes = await plcPost(dir.url, did, badPrev)
    assert.equal(badPrevRes.status, 400, JSON.stringify(badPrevRes.body))

    // The properly chained one is accepted and changes the document.
    const okRes = await plcPost(dir.url, did, update)
    assert.equal(okRes.status, 200, JSON.stringify(okRes.body))
    const doc = await plcGet(dir.url, `/${did}`)
    assert.deepEqual(doc.body.alsoKnownAs, ['at://after.test'])
    const log = await plcGet(dir.url, `/${did}/log`)
    assert.equal(log.body.length, 2)
    await plc.validateOperationLog(did, log.body)
  })

  it('answers 404 for an unknown DID', async () => {
    const res = await plcGet(dir.url, '/did:plc:aaaaaaaaaaaaaaaaaaaaaaaa')
    assert.equal(res.status, 404)
  })
})
