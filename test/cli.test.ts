/**
 * The CLI (dist/src/cli.js) as a user runs it, against a real proxy and broker: publish a body
 * straight to RabbitMQ, stream it back, the gRPC-only publish and queue info, TLS and API keys,
 * and a readable one-line error when the server is down.
 */
import { assert, describe, it } from "@effect/vitest"
import { statusMessage } from "../src/client/errors.js"
import { Effect } from "effect"
import { execFile } from "node:child_process"
import { createHash, randomBytes } from "node:crypto"
import { rm, writeFile } from "node:fs/promises"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { fileURLToPath } from "node:url"
import { schemaBody } from "./fixtures/bodies.js"
import { makePki } from "./support/certs.js"
import { makeTestEnv } from "./support/harness.js"

const cliScript = fileURLToPath(new URL("../dist/src/cli.js", import.meta.url))

interface Ran {
  readonly code: number
  readonly stdout: string
  readonly stderr: string
}

const cli = (...args: Array<string>) =>
  Effect.callback<Ran>((resume) => {
    execFile(process.execPath, [cliScript, ...args], { env: { PATH: process.env["PATH"] ?? "" } }, (error, stdout, stderr) =>
      resume(Effect.succeed({ code: error ? Number(error.code ?? 1) : 0, stdout, stderr })))
  })

const bodyFile = (body: unknown) =>
  Effect.acquireRelease(
    Effect.promise(async () => {
      const path = join(tmpdir(), `mp-cli-${randomBytes(4).toString("hex")}.json`)
      await writeFile(path, JSON.stringify(body))
      return path
    }),
    (path) => Effect.promise(() => rm(path, { force: true }))
  )

describe("CLI", () => {
  it.live("publish straight to RabbitMQ, then stream it back", () =>
    Effect.gen(function*() {
      const env = yield* makeTestEnv()
      const at = ["--host", "127.0.0.1", "--port", String(env.port)]
      const file = yield* bodyFile(schemaBody("cli-1"))
      const published = yield* cli(...at, "publish", "schema", "--file", file)
      assert.strictEqual(published.code, 0, published.stderr)
      assert.deepInclude(JSON.parse(published.stdout), { published: true, id: "cli-1", routingKey: "schemas.*" })
      const streamed = yield* cli(...at, "stream", "schemas", "--count", "1")
      assert.strictEqual(streamed.code, 0, streamed.stderr)
      const message = JSON.parse(streamed.stdout.trim())
      assert.strictEqual(message.id, "cli-1")
      assert.strictEqual(message.task, "UPLOAD_SCHEMA")
    }))

  it.live("send (gRPC publish) and queues", () =>
    Effect.gen(function*() {
      const env = yield* makeTestEnv()
      const at = ["--host", "127.0.0.1", "--port", String(env.port)]
      const file = yield* bodyFile(schemaBody("cli-2"))
      const sent = yield* cli(...at, "send", "schema", "--file", file)
      assert.strictEqual(sent.code, 0, sent.stderr)
      const queues = yield* cli(...at, "queues")
      assert.strictEqual(queues.code, 0, queues.stderr)
      const info = JSON.parse(queues.stdout) as { queues: Array<{ queue: string; messageCount: number }> }
      assert.strictEqual(info.queues.find((q) => q.queue === env.names.schemas)?.messageCount, 1)
    }))

  it.live("--tls --ca --cert --key and --api-key reach a proxy that requires them", () =>
    Effect.gen(function*() {
      const pki = yield* makePki
      const key = randomBytes(16).toString("hex")
      const env = yield* makeTestEnv({
        GRPC_TLS_ENABLED: "true",
        GRPC_TLS_CERT_PATH: pki.path("server.crt"),
        GRPC_TLS_KEY_PATH: pki.path("server.key"),
        GRPC_TLS_CA_PATH: pki.path("ca.crt"),
        MESSAGING_API_KEYS: `cli:${createHash("sha256").update(key).digest("hex")}:params`
      })
      const at = ["--host", "localhost", "--port", String(env.port)]
      const tls = ["--ca", pki.path("ca.crt"), "--cert", pki.path("client.crt"), "--key", pki.path("client.key")]
      const ok = yield* cli(...at, ...tls, "--api-key", key, "routing-key", "schemas", "--results")
      assert.strictEqual(ok.code, 0, ok.stderr)
      assert.deepStrictEqual(JSON.parse(ok.stdout), { routingKey: "schemas.result.*" })
      const noKey = yield* cli(...at, ...tls, "routing-key", "schemas")
      assert.strictEqual(noKey.code, 1)
      assert.match(noKey.stderr.trim(), /^error: .*UNAUTHENTICATED/)
      assert.notInclude(ok.stdout + ok.stderr + noKey.stderr, key)
    }))

  it.live("a server that is down gives one readable line and exit 1", () =>
    Effect.gen(function*() {
      const result = yield* cli("--port", "1", "params")
      assert.strictEqual(result.code, 1)
      assert.match(result.stderr.trim(), /^error: cannot reach messaging-proxy at 127\.0\.0\.1:1 \(UNAVAILABLE/)
      assert.strictEqual(result.stderr.trim().split("\n").length, 1)
    }))

  it("UNAVAILABLE from the proxy itself is not read as an unreachable proxy (issue 12)", () => {
    assert.strictEqual(
      statusMessage("GetMessagingParams", "localhost:50055", "UNAVAILABLE", "messaging-proxy is shutting down"),
      "GetMessagingParams failed at localhost:50055: messaging-proxy is unavailable (UNAVAILABLE: messaging-proxy is shutting down)"
    )
    for (const local of ["No connection established. Last error: connect ECONNREFUSED 127.0.0.1:1", "Connection dropped", "read ECONNRESET"]) {
      assert.match(statusMessage("Publish", "h:1", "UNAVAILABLE", local), /^cannot reach messaging-proxy at h:1 \(UNAVAILABLE: /)
    }
  })
})
