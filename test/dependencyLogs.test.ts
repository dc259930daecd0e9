/**
 * Issue 16: secrets never leave through a dependency, and a caller without credentials costs
 * nothing. The built proxy runs as a process, with API keys required; everything it prints is
 * searched for the key.
 */
import { assert, describe, it } from "@effect/vitest"
import * as grpc from "@grpc/grpc-js"
import { Effect } from "effect"
import { createHash, randomBytes } from "node:crypto"
import { readFileSync } from "node:fs"
import * as http2 from "node:http2"
import { MessageKind, MessagingServiceClient } from "../gen/messaging.js"
import { redactDependencyLine } from "../src/dependencyLogs.js"
import { makeAdmin, makeNames, proxyEnv } from "./support/harness.js"
import { grpcPortOf, runProxy } from "./support/process.js"

/** A key in the shape CI's secret grep looks for (`key-` + 32 hex digits). */
const newKey = () => `key-${randomBytes(16).toString("hex")}`
const keysFor = (key: string) => `tester:${createHash("sha256").update(key).digest("hex")}:admin`

/** One unary call over a raw HTTP/2 session with `headers` as they are (grpc-js clients refuse illegal values). */
const rawCall = (session: http2.ClientHttp2Session, headers: http2.OutgoingHttpHeaders) =>
  new Promise<string | undefined>((resolve) => {
    const request = session.request({
      ":method": "POST",
      ":path": "/messaging.MessagingService/GetRoutingKeySchemas",
      "content-type": "application/grpc",
      te: "trailers",
      ...headers
    })
    let status: string | undefined
    request.on("response", (h) => (status = h["grpc-status"] as string | undefined ?? status))
    request.on("trailers", (t) => (status = t["grpc-status"] as string | undefined))
    request.on("data", () => undefined)
    request.on("error", () => undefined)
    request.on("close", () => resolve(status))
    request.end(Buffer.alloc(5))
  })

/** VmRSS or VmHWM (peak) of a process, in bytes, from /proc. */
const memoryOf = (pid: number, field: "VmRSS" | "VmHWM"): number => {
  const line = readFileSync(`/proc/${pid}/status`, "utf8").split("\n").find((l) => l.startsWith(`${field}:`)) ?? ""
  return Number(/(\d+) kB/.exec(line)?.[1]) * 1024
}

describe("what dependencies print", () => {
  it("grpc-js's refused-header line keeps the header's name and loses its value; credential headers lose theirs anywhere", () => {
    const key = newKey()
    const line = `Failed to add metadata entry authorization: Bearer\t${key}. Metadata string value "Bearer\t${key}" contains illegal characters. For more information see https://github.com/grpc/grpc-node/issues/1173`
    const redacted = redactDependencyLine(line)
    assert.notInclude(redacted, key)
    assert.match(redacted, /^Failed to add metadata entry authorization: <value redacted>/)
    assert.notInclude(redactDependencyLine(`headers: {"x-api-key": "${key}", "authorization": "Bearer ${key}"}`), key)
    assert.strictEqual(redactDependencyLine("Connection dropped by client 127.0.0.1"), "Connection dropped by client 127.0.0.1")
  })

  it.live("a valid key in a header value grpc-js refuses (tab, non-ASCII; authorization, x-api-key, another header) is refused and printed nowhere", () =>
    Effect.gen(function*() {
      const key = newKey()
      let statuses: Promise<Array<string | undefined>> | undefined
      const names = makeNames()
      yield* makeAdmin(names) // deletes the topology the proxy declares
      const result = yield* runProxy(proxyEnv(names, { MESSAGING_API_KEYS: keysFor(key) }), (kill, stdout) => {
        const session = http2.connect(`http://127.0.0.1:${grpcPortOf(stdout)}`)
        session.on("error", () => undefined)
        const variants: Array<http2.OutgoingHttpHeaders> = [
          { authorization: `Bearer\t${key}` },
          { authorization: `Bearer ${key}\u00e9` },
          { "x-api-key": `${key}\u00ff` },
          { "x-forwarded-credentials": `v\t${key}` }
        ]
        statuses = Promise.all(variants.map((headers) => rawCall(session, headers)))
        void statuses.finally(() => {
          session.close()
          kill()
        })
      }, "gRPC server listening")
      assert.strictEqual(result.code, 0, result.stderr)
      assert.deepStrictEqual(yield* Effect.promise(() => statuses!), ["16", "16", "16", "16"])
      const output = result.stdout + result.stderr
      assert.notInclude(output, key)
      assert.notInclude(output, key.slice(4), "not even the key's hex part")
      // grpc-js did complain, through the proxy's logger, naming the header.
      assert.include(output, "Failed to add metadata entry authorization: <value redacted>")
      assert.strictEqual(result.stderr, "", "grpc-js printed nothing to stderr itself")
    }))

  it.live("an invalid MESSAGING_API_KEYS holding a key-shaped value stops start-up naming the entry, not echoing it", () =>
    Effect.gen(function*() {
      const key = newKey()
      // A key pasted where its hash belongs.
      const result = yield* runProxy({ ...proxyEnv(makeNames()), MESSAGING_API_KEYS: `ok:${"a".repeat(64)}:params,typechecking:${key}:consume` })
      assert.strictEqual(result.code, 1)
      assert.notInclude(result.stdout + result.stderr, key)
      assert.strictEqual(
        result.stderr.trim(),
        "messaging-proxy: invalid configuration: MESSAGING_API_KEYS (value not shown: it may hold a secret): expected comma-separated " +
          "name:sha256-hex:scope[+scope…] entries, scopes from params, consume, publish, admin (entry 2 of 2: its second field is not " +
          "a SHA-256 digest in hex (64 hex digits; it has 36 characters))"
      )
    }))
})

describe("callers without credentials", () => {
  it.live("twenty concurrent unauthenticated 15 MiB Publish calls are refused before their bodies are read: the proxy's peak RSS grows by less than 20 MiB", () =>
    Effect.gen(function*() {
      let outcome: Promise<{ codes: Array<number | undefined>; before: number; peak: number }> | undefined
      const names = makeNames()
      yield* makeAdmin(names) // deletes the topology the proxy declares
      const result = yield* runProxy(proxyEnv(names, { MESSAGING_API_KEYS: keysFor(newKey()) }), (kill, stdout, pid) => {
        const before = memoryOf(pid, "VmRSS")
        const client = new MessagingServiceClient(`127.0.0.1:${grpcPortOf(stdout)}`, grpc.credentials.createInsecure(), {
          "grpc.max_send_message_length": 32 << 20
        })
        const body = Buffer.alloc(15 << 20, 0x61)
        const calls = Array.from({ length: 20 }, () =>
          new Promise<number | undefined>((resolve) =>
            client.publish({ kind: MessageKind.MESSAGE_KIND_SCHEMA, body, routingKey: "" }, (error) => resolve(error?.code))))
        outcome = Promise.all(calls).then((codes) => ({ codes, before, peak: memoryOf(pid, "VmHWM") }))
        void outcome.finally(() => {
          client.close()
          kill()
        })
      })
      assert.strictEqual(result.code, 0, result.stderr)
      const { codes, before, peak } = yield* Effect.promise(() => outcome!)
      assert.deepStrictEqual(codes, Array.from({ length: 20 }, () => grpc.status.UNAUTHENTICATED))
      assert.isBelow(peak - before, 20 * 1024 * 1024, `peak RSS ${peak} against ${before} before the calls`)
    }))
})
