// Interop tests for blobs: the real roost binary driven by @atproto/api's
// AtpAgent (uploadBlob, a post with an images embed, upsertProfile with an
// avatar, sync.getBlob, sync.listBlobs), and the repository checked with
// @atproto/repo's verifyRepoCar afterwards. The PNGs are real ones, made here.
//
// One roost (and one PLC directory) is shared by the file; the tests run in
// order.

import { describe, it as test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { randomBytes, createHash } from 'node:crypto'
import { readdir } from 'node:fs/promises'
import path from 'node:path'
import zlib from 'node:zlib'
import { setTimeout as sleep } from 'node:timers/promises'
import { AtpAgent } from '@atproto/api'
import { verifyRepoCar, readCarWithRoot, MemoryBlockstore } from '@atproto/repo'
import { startPlc, plcGet, didKeyFromDidDoc } from './plc.mjs'
import { startRoost, roostBinPath, roostBinAvailable } from './harness.mjs'

const BIN = roostBinPath()
let skip = false
if (!roostBinAvailable(BIN) && process.env.ROOST_REQUIRE_BIN !== '1') {
  skip = `SKIP: roost binary not found at ${BIN}`
  console.error(`\n*** ${skip} ***\n`)
}
const TEST_TIMEOUT_MS = 60_000

// ---------------------------------------------------------------------------
// A real PNG encoder (RGB, 8 bits, no interlace), enough for test images.

function pngChunk(type, data) {
  const len = Buffer.alloc(4)
  len.writeUInt32BE(data.length)
  const body = Buffer.concat([Buffer.from(type, 'ascii'), data])
  const crc = Buffer.alloc(4)
  crc.writeUInt32BE(zlib.crc32(body))
  return Buffer.concat([len, body, crc])
}

/** A `width`×`height` PNG; `pixels(x, y)` gives [r, g, b]. */
function makePng(width, height, pixels) {
  const ihdr = Buffer.alloc(13)
  ihdr.writeUInt32BE(width, 0)
  ihdr.writeUInt32BE(height, 4)
  ihdr[8] = 8 // bit depth
  ihdr[9] = 2 // colour type: RGB
  const rows = Buffer.alloc(height * (1 + width * 3))
  let o = 0
  for (let y = 0; y < height; y++) {
    rows[o++] = 0 // filter: none
    for (let x = 0; x < width; x++) {
      const [r, g, b] = pixels(x, y)
      rows[o++] = r
      rows[o++] = g
      rows[o++] = b
    }
  }
  return new Uint8Array(
    Buffer.concat([
      Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
      pngChunk('IHDR', ihdr),
      pngChunk('IDAT', zlib.deflateSync(rows)),
      pngChunk('IEND', Buffer.alloc(0)),
    ]),
  )
}

/** Checks the PNG structure: signature, chunk CRCs, IHDR size, pixel data inflates. */
function checkPng(bytes, width, height) {
  const buf = Buffer.from(bytes)
  assert.deepEqual([...buf.subarray(0, 8)], [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a])
  let o = 8
  const idat = []
  for (;;) {
    const len = buf.readUInt32BE(o)
    const type = buf.toString('ascii', o + 4, o + 8)
    assert.equal(buf.readUInt32BE(o + 8 + len), zlib.crc32(buf.subarray(o + 4, o + 8 + len)), `${type} CRC`)
    if (type === 'IHDR') {
      assert.equal(buf.readUInt32BE(o + 8), width)
      assert.equal(buf.readUInt32BE(o + 12), height)
    }
    if (type === 'IDAT') idat.push(buf.subarray(o + 8, o + 8 + len))
    o += 12 + len
    if (type === 'IEND') break
  }
  assert.equal(zlib.inflateSync(Buffer.concat(idat)).length, height * (1 + width * 3))
}

/**
 * The CID a blob must get, computed here from first principles: CIDv1 (0x01),
 * raw codec (0x55), sha2-256 multihash (0x12, 32 bytes), multibase base32
 * lower without padding ('b' prefix).
 */
function rawCid(bytes) {
  const digest = createHash('sha256').update(bytes).digest()
  const cid = Buffer.concat([Buffer.from([0x01, 0x55, 0x12, 0x20]), digest])
  const alphabet = 'abcdefghijklmnopqrstuvwxyz234567'
  let out = 'b'
  let bits = 0
  let value = 0
  for (const byte of cid) {
    value = (value << 8) | byte
    bits += 8
    while (bits >= 5) {
      out += alphabet[(value >>> (bits - 5)) & 31]
      bits -= 5
    }
  }
  if (bits > 0) out += alphabet[(value << (5 - bits)) & 31]
  return out
}

/** Every file under `dir` (recursively); [] when it does not exist. */
async function filesUnder(dir) {
  try {
    const entries = await readdir(dir, { recursive: true, withFileTypes: true })
    return entries.filter((e) => e.isFile()).map((e) => path.join(e.parentPath ?? e.path, e.name))
  } catch (err) {
    if (err.code === 'ENOENT') return []
    throw err
  }
}

async function assertXrpcError(promise, name, status) {
  await assert.rejects(promise, (err) => {
    assert.equal(err.error, name, `expected ${name}, got ${err.error} (${err.status}: ${err.message})`)
    assert.equal(err.status, status)
    return true
  })
}

describe('roost blobs with the official @atproto clients', () => {
  const it = (name, fn) => test(name, { skip, timeout: TEST_TIMEOUT_MS }, fn)

  let plcDir
  let roost
  let agent
  let did
  // Shared across the ordered tests.
  const small = { width: 8, height: 8 }
  const large = { width: 200, height: 150 }
  const avatar = { width: 64, height: 64 }
  let post // { uri, cid } of the post with both images

  before(async () => {
    if (skip) return
    plcDir = await startPlc()
    roost = await startRoost({ plcUrl: plcDir.url })
    agent = new AtpAgent({ service: roost.url })
    await agent.login({ identifier: roost.handle, password: roost.password })
    did = agent.session.did
  }, { timeout: 60_000 })

  after(async () => {
    await roost?.cleanup()
    await plcDir?.stop()
  })

  it('uploads a small and a large PNG and gets raw sha256 CIDs back', async () => {
    small.bytes = makePng(small.width, small.height, (x, y) => [x * 30, y * 30, 128])
    // Noise does not compress: well over the 64 KiB SQLite tier.
    const noise = randomBytes(large.width * large.height * 3)
    large.bytes = makePng(large.width, large.height, (x, y) => {
      const i = (y * large.width + x) * 3
      return [noise[i], noise[i + 1], noise[i + 2]]
    })
    avatar.bytes = makePng(avatar.width, avatar.height, (x, y) => [255 - x * 4, y * 4, (x * y) & 255])
    checkPng(small.bytes, small.width, small.height)
    checkPng(large.bytes, large.width, large.height)
    assert.ok(small.bytes.length < 1024, `small PNG is ${small.bytes.length} bytes`)
    assert.ok(large.bytes.length > 64 * 1024, `large PNG is ${large.bytes.length} bytes`)

    for (const img of [small, large, avatar]) {
      const res = await agent.uploadBlob(img.bytes, { encoding: 'image/png' })
      img.blob = res.data.blob
      img.cid = rawCid(img.bytes)
      assert.equal(img.blob.ref.toString(), img.cid, 'CID is CIDv1 raw sha256 of the bytes')
      assert.equal(img.blob.mimeType, 'image/png')
      assert.equal(img.blob.size, img.bytes.length)
    }

    // Declared wrongly, a PNG is still a PNG.
    const res = await agent.uploadBlob(small.bytes, { encoding: 'application/octet-stream' })
    assert.equal(res.data.blob.ref.toString(), small.cid)
    assert.equal(res.data.blob.mimeType, 'image/png')

    // The large one is a file in the data directory's blob store; the
    // small one is not.
    const files = await filesUnder(path.join(roost.dataDir, 'blobs'))
    assert.ok(files.some((f) => f.includes(large.cid)), `no file for the large blob in ${files}`)
    assert.ok(!files.some((f) => f.includes(small.cid)), 'the small blob should stay in SQLite')
  })

  it('posts with an images embed and sets an avatar with upsertProfile', async () => {
    post = await agent.post({
      text: 'two pictures',
      createdAt: new Date().toISOString(),
      embed: {
        $type: 'app.bsky.embed.images',
        images: [
          { image: small.blob, alt: 'a small gradient', aspectRatio: { width: small.width, height: small.height } },
          { image: large.blob, alt: 'some noise', aspectRatio: { width: large.width, height: large.height } },
        ],
      },
    })
    assert.match(post.uri, new RegExp(`^at://${did}/app\\.bsky\\.feed\\.post/`))

    await agent.upsertProfile((existing) => ({ ...(existing ?? {}), displayName: 'Alice', avatar: avatar.blob }))
    const { data: profile } = await agent.com.atproto.repo.getRecord({
      repo: did,
      collection: 'app.bsky.actor.profile',
      rkey: 'self',
    })
    assert.equal(profile.value.avatar.ref.toString(), avatar.cid)
    assert.equal(profile.value.avatar.mimeType, 'image/png')
    assert.equal(profile.value.avatar.size, avatar.bytes.length)

    const { data: rec } = await agent.com.atproto.repo.getRecord({
      repo: did,
      collection: 'app.bsky.feed.post',
      rkey: post.uri.split('/').pop(),
    })
    assert.deepEqual(
      rec.value.embed.images.map((i) => i.image.ref.toString()),
      [small.cid, large.cid],
    )
  })

  it('serves every blob with sync.getBlob, byte for byte', async () => {
    const anon = new AtpAgent({ service: roost.url })
    for (const img of [small, large, avatar]) {
      const res = await anon.com.atproto.sync.getBlob({ did, cid: img.cid })
      assert.equal(res.headers['content-type'], 'image/png')
      assert.equal(res.headers['x-content-type-options'], 'nosniff')
      assert.ok(res.headers['content-security-policy'], 'content-security-policy header')
      assert.equal(Number(res.headers['content-length']), img.bytes.length)
      assert.ok(Buffer.from(res.data).equals(Buffer.from(img.bytes)), `bytes of ${img.cid} differ`)
      checkPng(res.data, img.width, img.height)
    }
    // A byte range of the large one.
    const url = `${roost.url}/xrpc/com.atproto.sync.getBlob?did=${encodeURIComponent(did)}&cid=${large.cid}`
    const res = await fetch(url, { headers: { range: 'bytes=100-199' } })
    assert.equal(res.status, 206)
    assert.equal(res.headers.get('content-range'), `bytes 100-199/${large.bytes.length}`)
    assert.ok(Buffer.from(await res.arrayBuffer()).equals(Buffer.from(large.bytes.subarray(100, 200))))
  })

  it('lists the referenced blobs with sync.listBlobs', async () => {
    const anon = new AtpAgent({ service: roost.url })
    const { data } = await anon.com.atproto.sync.listBlobs({ did })
    assert.deepEqual([...data.cids].sort(), [small.cid, large.cid, avatar.cid].sort())
    // Paging gives the same list.
    const paged = []
    let cursor
    for (let i = 0; i < 10; i++) {
      const { data: page } = await anon.com.atproto.sync.listBlobs({ did, limit: 1, cursor })
      paged.push(...page.cids)
      if (!page.cursor) break
      cursor = page.cursor
    }
    assert.deepEqual(paged, [...data.cids])
  })

  it('deleting the post deletes its blobs but keeps the avatar', async () => {
    await agent.deletePost(post.uri)
    const anon = new AtpAgent({ service: roost.url })
    for (const img of [small, large]) {
      await assertXrpcError(anon.com.atproto.sync.getBlob({ did, cid: img.cid }), 'BlobNotFound', 400)
    }
    const res = await anon.com.atproto.sync.getBlob({ did, cid: avatar.cid })
    assert.ok(Buffer.from(res.data).equals(Buffer.from(avatar.bytes)))
    const { data } = await anon.com.atproto.sync.listBlobs({ did })
    assert.deepEqual(data.cids, [avatar.cid])

    // The large blob's file goes from disk shortly after the commit.
    const blobDir = path.join(roost.dataDir, 'blobs')
    const deadline = Date.now() + 3000
    while ((await filesUnder(blobDir)).some((f) => f.includes(large.cid))) {
      assert.ok(Date.now() < deadline, 'the deleted post’s large blob is still on disk')
      await sleep(50)
    }

    // A new post cannot reference a deleted blob.
    await assertXrpcError(
      agent.post({
        text: 'late',
        embed: { $type: 'app.bsky.embed.images', images: [{ image: large.blob, alt: 'gone' }] },
      }),
      'BlobNotFound',
      400,
    )
  })

  it('the repository still verifies with @atproto/repo', async () => {
    const docRes = await plcGet(plcDir.url, `/${did}`)
    const didKey = didKeyFromDidDoc(docRes.body)
    const { data: car } = await agent.com.atproto.sync.getRepo({ did })
    const verified = await verifyRepoCar(car, did, didKey)
    const profile = verified.creates.find((c) => c.collection === 'app.bsky.actor.profile' && c.rkey === 'self')
    assert.ok(profile, 'the profile is in the repo')
    // The avatar ref inside the signed repo, read from the CAR's blocks.
    const { blocks } = await readCarWithRoot(car)
    const record = await new MemoryBlockstore(blocks).readRecord(profile.cid)
    assert.equal(record.avatar.ref.toString(), avatar.cid)
    assert.equal(record.avatar.mimeType, 'image/png')
    assert.equal(record.avatar.size, avatar.bytes.length)
    assert.ok(!verified.creates.some((c) => c.collection === 'app.bsky.feed.post'), 'the post is gone')
    const { data: head } = await agent.com.atproto.sync.getLatestCommit({ did })
    assert.equal(verified.commit.cid.toString(), head.cid)
  })

  it('re-uploading deleted bytes brings the blob back', async () => {
    const res = await agent.uploadBlob(large.bytes, { encoding: 'image/png' })
    assert.equal(res.data.blob.ref.toString(), large.cid)
    const got = await agent.com.atproto.sync.getBlob({ did, cid: large.cid })
    assert.ok(Buffer.from(got.data).equals(Buffer.from(large.bytes)))
    // Unreferenced, it is not listed.
    const { data } = await agent.com.atproto.sync.listBlobs({ did })
    assert.deepEqual(data.cids, [avatar.cid])
  })
})

// A second roost with a two-second unused-blob TTL: what replacing an avatar
// leaves behind, and the sweep of uploads no record ever used. Its own
// instance, because the TTL would sweep the first describe's unreferenced
// uploads in the middle of its tests.
describe('roost blob lifetimes with a short unused TTL (@atproto/api)', () => {
  const it = (name, fn) => test(name, { skip, timeout: TEST_TIMEOUT_MS }, fn)
  const TTL_SECONDS = 2

  let plcDir
  let roost
  let agent
  let anon
  let did
  // Over the 64 KiB SQLite tier, so the disk store is checked too.
  const oldAvatar = { width: 200, height: 150 }
  const newAvatar = { width: 64, height: 64 }

  /** A PNG of random pixels (incompressible). */
  function noisePng(width, height) {
    const noise = randomBytes(width * height * 3)
    return makePng(width, height, (x, y) => {
      const i = (y * width + x) * 3
      return [noise[i], noise[i + 1], noise[i + 2]]
    })
  }

  async function assertServed(img) {
    const res = await anon.com.atproto.sync.getBlob({ did, cid: img.cid })
    assert.ok(Buffer.from(res.data).equals(Buffer.from(img.bytes)), `bytes of ${img.cid} differ`)
  }

  async function upload(img) {
    const res = await agent.uploadBlob(img.bytes, { encoding: 'image/png' })
    img.blob = res.data.blob
    img.cid = rawCid(img.bytes)
    assert.equal(img.blob.ref.toString(), img.cid)
  }

  before(async () => {
    if (skip) return
    plcDir = await startPlc()
    roost = await startRoost({
      plcUrl: plcDir.url,
      env: { PDS_BLOB_UNUSED_TTL_SECONDS: String(TTL_SECONDS) },
    })
    agent = new AtpAgent({ service: roost.url })
    await agent.login({ identifier: roost.handle, password: roost.password })
    anon = new AtpAgent({ service: roost.url })
    did = agent.session.did
  }, { timeout: 60_000 })

  after(async () => {
    await roost?.cleanup()
    await plcDir?.stop()
  })

  it('a replaced avatar is deleted; the new one is served and listed', async () => {
    oldAvatar.bytes = noisePng(oldAvatar.width, oldAvatar.height)
    assert.ok(oldAvatar.bytes.length > 64 * 1024, `old avatar is ${oldAvatar.bytes.length} bytes`)
    newAvatar.bytes = makePng(newAvatar.width, newAvatar.height, (x, y) => [x * 4, 255 - y * 4, 77])

    await upload(oldAvatar)
    await agent.upsertProfile((existing) => ({ ...(existing ?? {}), displayName: 'Alice', avatar: oldAvatar.blob }))
    await assertServed(oldAvatar)
    const blobDir = path.join(roost.dataDir, 'blobs')
    assert.ok(
      (await filesUnder(blobDir)).some((f) => f.includes(oldAvatar.cid)),
      'the old avatar is a file in the disk store',
    )
    assert.deepEqual((await anon.com.atproto.sync.listBlobs({ did })).data.cids, [oldAvatar.cid])

    // Referenced, it outlives the TTL and the sweeps that run meanwhile
    // (every TTL/2 = 1 s).
    await sleep((TTL_SECONDS + 2) * 1000)
    await assertServed(oldAvatar)

    // Edit the profile to a new avatar, the way an app does.
    await upload(newAvatar)
    await agent.upsertProfile((existing) => ({ ...existing, displayName: 'Alice again', avatar: newAvatar.blob }))
    const { data: profile } = await agent.com.atproto.repo.getRecord({
      repo: did,
      collection: 'app.bsky.actor.profile',
      rkey: 'self',
    })
    assert.equal(profile.value.avatar.ref.toString(), newAvatar.cid)
    assert.equal(profile.value.displayName, 'Alice again')

    await assertXrpcError(anon.com.atproto.sync.getBlob({ did, cid: oldAvatar.cid }), 'BlobNotFound', 400)
    await assertServed(newAvatar)
    assert.deepEqual((await anon.com.atproto.sync.listBlobs({ did })).data.cids, [newAvatar.cid])
    // Its file goes from the disk store right after the commit.
    const deadline = Date.now() + 3000
    while ((await filesUnder(blobDir)).some((f) => f.includes(oldAvatar.cid))) {
      assert.ok(Date.now() < deadline, 'the replaced avatar is still on disk')
      await sleep(50)
    }
    // A record can no longer reference the old avatar.
    await assertXrpcError(
      agent.upsertProfile((existing) => ({ ...existing, avatar: oldAvatar.blob })),
      'BlobNotFound',
      400,
    )
  })

  it('an upload no record uses is swept within seconds of the TTL', async () => {
    const unused = [
      { bytes: noisePng(200, 150) }, // disk store
      { bytes: makePng(8, 8, (x, y) => [x * 30, y * 30, 1]) }, // SQLite
    ]
    // Taken before the uploads: the deadline counts them, and no blob is older than this.
    const uploaded = Date.now()
    for (const img of unused) await upload(img)
    for (const img of unused) await assertServed(img)
    const blobDir = path.join(roost.dataDir, 'blobs')
    assert.ok((await filesUnder(blobDir)).some((f) => f.includes(unused[0].cid)), 'the large upload is on disk')

    // Gone once older than the TTL (whole seconds) and a sweep ran: about
    // 3–4 s. The deadline leaves room for a loaded machine; with the former
    // fixed ten-minute sweep this fails.
    const deadline = uploaded + 15_000
    for (const img of unused) {
      for (;;) {
        try {
          await anon.com.atproto.sync.getBlob({ did, cid: img.cid })
        } catch (err) {
          assert.equal(err.error, 'BlobNotFound', `unexpected ${err.status} ${err.error}: ${err.message}`)
          assert.equal(err.status, 400)
          break
        }
        assert.ok(Date.now() < deadline, `unused blob ${img.cid} still served 15 s after upload`)
        await sleep(200)
      }
      img.goneAfter = Date.now() - uploaded
    }
    // Not before the TTL: the sweep deletes only uploads older than it.
    assert.ok(unused[0].goneAfter >= (TTL_SECONDS - 0.5) * 1000, `swept after ${unused[0].goneAfter} ms`)
    const fileDeadline = Date.now() + 3000
    while ((await filesUnder(blobDir)).some((f) => f.includes(unused[0].cid))) {
      assert.ok(Date.now() < fileDeadline, 'the swept upload is still on disk')
      await sleep(50)
    }
    // The sweep that took them left the avatar a record references.
    await assertServed(newAvatar)
    assert.deepEqual((await anon.com.atproto.sync.listBlobs({ did })).data.cids, [newAvatar.cid])
  })
})
