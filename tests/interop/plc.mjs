// A throw-away PLC directory for the interop tests.
//
// This is the official `@did-plc/server` (the code behind plc.directory) run
// in-process with its in-memory `MockDatabase`: every operation Roost submits
// goes through the reference validation (`assureValidNextOp`: genesis hash ==
// DID, signature by a rotation key, `prev` chaining) and the DID document is
// rendered by the reference `formatDidDoc`. Nothing here re-implements PLC.
//
// Note: the npm release of @did-plc/lib renders verification methods in the
// legacy form (`EcdsaSecp256k1VerificationKey2019`, raw key in
// publicKeyMultibase) rather than today's `Multikey`; `didKeyFromDidDoc`
// below understands both.

import plcServer from '@did-plc/server'
import * as crypto from '@atproto/crypto'

const { PlcServer, Database } = plcServer

/**
 * Start a PLC directory on 127.0.0.1 with a random port.
 * @returns {Promise<{url: string, port: number, db: object, stop: () => Promise<void>}>}
 */
export async function startPlc() {
  const db = Database.mock()
  // port 0: let the OS pick; the server binds all interfaces, we only ever
  // talk to it through 127.0.0.1.
  const server = PlcServer.create({ db, port: 0 })
  const httpServer = await server.start()
  const { port } = httpServer.address()
  let stopped = false
  return {
    url: `http://127.0.0.1:${port}`,
    port,
    db,
    async stop() {
      if (stopped) return
      stopped = true
      await server.destroy()
    },
  }
}

/**
 * The `did:key` of the `#atproto` verification method of a DID document,
 * accepting both the `Multikey` form (multibase carries the multicodec
 * prefix) and the legacy 2019 key types (multibase is the bare compressed
 * key), as the atproto DID spec asks resolvers to.
 */
export function didKeyFromDidDoc(doc) {
  const vm = (doc.verificationMethod ?? []).find(
    (m) => m.id === '#atproto' || m.id === `${doc.id}#atproto`,
  )
  if (!vm) throw new Error(`no #atproto verification method in ${JSON.stringify(doc)}`)
  const mb = vm.publicKeyMultibase
  switch (vm.type) {
    case 'Multikey':
      return `did:key:${mb}`
    case 'EcdsaSecp256k1VerificationKey2019':
      return crypto.formatDidKey(crypto.SECP256K1_JWT_ALG, crypto.multibaseToBytes(mb))
    case 'EcdsaSecp256r1VerificationKey2019':
      return crypto.formatDidKey(crypto.P256_JWT_ALG, crypto.multibaseToBytes(mb))
    default:
      throw new Error(`unsupported verification method type ${vm.type}`)
  }
}

/** GET a JSON document from the PLC; returns {status, body}. */
export async function plcGet(plcUrl, path) {
  const res = await fetch(`${plcUrl}${path}`)
  const text = await res.text()
  let body
  try {
    body = JSON.parse(text)
  } catch {
    body = text
  }
  return { status: res.status, body }
}

/** POST an operation to the PLC; returns {status, body}. */
export async function plcPost(plcUrl, did, op) {
  const res = await fetch(`${plcUrl}/${did}`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(op),
  })
  const text = await res.text()
  let body
  try {
    body = JSON.parse(text)
  } catch {
    body = text
  }
  return { status: res.status, body }
}
