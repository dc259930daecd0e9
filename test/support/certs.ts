/** Throwaway PKI for TLS tests: a CA, a server cert for localhost/127.0.0.1, client certs, and a rogue CA. */
import { Effect } from "effect"
import { execFile } from "node:child_process"
import { mkdtemp, rm, writeFile } from "node:fs/promises"
import { tmpdir } from "node:os"
import { join } from "node:path"

const openssl = (cwd: string, ...args: Array<string>) =>
  Effect.callback<void, Error>((resume) => {
    execFile("openssl", args, { cwd }, (error, _stdout, stderr) => {
      resume(error ? Effect.fail(new Error(`openssl ${args[0]}: ${stderr || error.message}`)) : Effect.void)
    })
  })

export interface Pki {
  readonly dir: string
  readonly path: (file: string) => string
}

const makeCa = (dir: string, name: string) =>
  openssl(dir, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "2", "-keyout", `${name}.key`,
    "-out", `${name}.crt`, "-subj", `/CN=${name}`, "-addext", "basicConstraints=critical,CA:TRUE",
    "-addext", "keyUsage=critical,keyCertSign,cRLSign")

const makeLeaf = (dir: string, ca: string, name: string, subject: string, extensions: string) =>
  Effect.gen(function*() {
    yield* openssl(dir, "req", "-newkey", "rsa:2048", "-nodes", "-sha256", "-keyout", `${name}.key`, "-out",
      `${name}.csr`, "-subj", subject)
    yield* Effect.promise(() => writeFile(join(dir, `${name}.ext`), extensions))
    yield* openssl(dir, "x509", "-req", "-sha256", "-days", "2", "-in", `${name}.csr`, "-CA", `${ca}.crt`, "-CAkey",
      `${ca}.key`, "-CAcreateserial", "-out", `${name}.crt`, "-extfile", `${name}.ext`)
  })

const clientExt = "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"

/** ca, server (localhost + 127.0.0.1), client (CN=client-1), rogue-ca and rogue (CN=client-1 from the rogue CA). */
export const makePki = Effect.acquireRelease(
  Effect.gen(function*() {
    const dir = yield* Effect.promise(() => mkdtemp(join(tmpdir(), "mp-pki-")))
    yield* makeCa(dir, "ca")
    yield* makeLeaf(dir, "ca", "server", "/CN=localhost",
      "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n")
    yield* makeLeaf(dir, "ca", "client", "/CN=client-1/O=typechecking", clientExt)
    yield* makeCa(dir, "rogue-ca")
    yield* makeLeaf(dir, "rogue-ca", "rogue", "/CN=client-1", clientExt)
    return { dir, path: (file: string) => join(dir, file) } satisfies Pki
  }),
  ({ dir }) => Effect.promise(() => rm(dir, { recursive: true, force: true }))
)
