/**
 * The original system's own clients against the proxy, end to end: a Python grpcio + pika client
 * whose classes protoc builds at test time from the original numbering
 * (test/fixtures/original/messaging.proto, never our proto). It reads GetMessagingParams, logs in
 * to the broker with exactly what it got, publishes the contract's JSON bodies as the API does,
 * and reads one schema and one validation message through the contract streams; every field is
 * checked here as that client decoded it.
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import { fileURLToPath } from "node:url"
import { randomBytes } from "node:crypto"
import { validationBody } from "./fixtures/bodies.js"
import { makeTestEnv, publishJson, waitForQueue } from "./support/harness.js"
import { compilePythonProto, interactive, python, runOk } from "./support/python.js"

const fixture = (name: string) => fileURLToPath(new URL(`./fixtures/original/${name}`, import.meta.url))

/** A valid validation body whose file_data is `bytes` random bytes in hex (as the API writes files). */
const fileBody = (id: string, bytes: number) => ({ ...validationBody(id), file_data: randomBytes(bytes).toString("hex") })

describe("the original clients (Python grpcio + pika, original proto)", () => {
  it.live("2,000 calls opened and cancelled at once on one grpcio connection leave its other call alive (issue 10, fault 9)", () =>
    Effect.gen(function*() {
      const { names, port, admin } = yield* makeTestEnv()
      const pb2 = yield* compilePythonProto(fixture("messaging.proto"))
      const client = yield* interactive(python, [fixture("cancel_flood.py"), pb2, `127.0.0.1:${port}`, "2000", "wait"])
      assert.strictEqual(yield* client.line, "opened")
      // As many as the per-connection limit lets in (1,000 streams, the long one included).
      yield* waitForQueue(admin, names.validations, (q) => q.consumerCount === 1)
      yield* waitForQueue(admin, names.schemas, (q) => q.consumerCount === 999)
      yield* client.send("cancel")
      assert.strictEqual(yield* client.line, "cancelled")
      yield* waitForQueue(admin, names.schemas, (q) => q.consumerCount === 0)
      yield* publishJson(admin, names.exchange, "validation.*", validationBody("after-flood"))
      assert.deepStrictEqual(JSON.parse(yield* client.line), { id: "after-flood" })
    }))

  it.live("a message larger than a default client accepts (4 MiB) is dead-lettered, not sent; the client gets the next one (issue 10, fault 1)", () =>
    Effect.gen(function*() {
      const { names, port, admin } = yield* makeTestEnv()
      const pb2 = yield* compilePythonProto(fixture("messaging.proto"))
      // 3 MiB of file in hex: about 6 MiB encoded, over every gRPC library's default limit.
      yield* publishJson(admin, names.exchange, "validation.*", fileBody("too-big", 3 * 1024 * 1024))
      yield* publishJson(admin, names.exchange, "validation.*", fileBody("small", 1024))
      const out = yield* runOk(python, [fixture("read_stream.py"), pb2, `127.0.0.1:${port}`, "validations", "1"])
      assert.deepStrictEqual(out.trim().split("\n").map((l) => JSON.parse(l).id), ["small"])
      const dead = yield* waitForQueue(admin, names.validationsDead, (q) => q.messageCount === 1)
      assert.strictEqual(dead.messageCount, 1)
      const copy = yield* Effect.promise(() => admin.channel.get(names.validationsDead, { noAck: true }))
      assert.notStrictEqual(copy, false)
      if (copy === false) return
      assert.strictEqual(copy.properties.messageId, "too-big")
      assert.match(
        String(copy.properties.headers?.["x-dead-letter-reason"]),
        /^too large for gRPC: \d{7} bytes encoded, at most 4194304 can be sent \(GRPC_CLIENT_MAX_RECEIVE_MESSAGE_BYTES\)$/
      )
      // "small" was read, but the call ended before more was written past it: it goes back (a
      // duplicate at worst); the big one is only in the dead-letter queue.
      yield* waitForQueue(admin, names.validations, (q) => q.messageCount === 1 && q.consumerCount === 0)
    }))

  it.live("GetMessagingParams logs in to the broker; schema and validation messages arrive field for field", () =>
    Effect.gen(function*() {
      const { names, port } = yield* makeTestEnv()
      const pb2 = yield* compilePythonProto(fixture("messaging.proto"))
      const output = yield* runOk(python, [fixture("client.py"), pb2, `127.0.0.1:${port}`, "orig-s-1", "orig-v-1"])
      const seen: unknown = JSON.parse(output)
      assert.deepStrictEqual(seen, {
        params: {
          host: "127.0.0.1",
          port: 5672,
          virtual_host: "/",
          username: "guest",
          password: "guest",
          exchange: {
            exchange: names.exchange,
            type: "topic",
            durable: true,
            queues: [
              { queue: names.schemas, routing_key: "schemas.*", durable: true },
              { queue: names.validations, routing_key: "validation.*", durable: true },
              { queue: names.schemaResults, routing_key: "schemas.result.*", durable: true },
              { queue: names.validationResults, routing_key: "validation.result.*", durable: true }
            ]
          }
        },
        routing_keys: { schemas: "schemas.*", validations: "validation.*" },
        schema: {
          id: "orig-s-1",
          schema: {
            schema: "http://json-schema.org/draft-07/schema#",
            type: "object",
            required: ["name"],
            properties: {
              name: { type: "STRING", extra: {} },
              age: { type: "INTEGER", extra: { minimum: "0" } }
            }
          },
          import_name: "customers",
          raw: false,
          task: "UPLOAD_SCHEMA",
          date: "2025-06-25T10:31:02.123456",
          extra: {}
        },
        validation: {
          id: "orig-v-1",
          task: "SAMPLE_VALIDATION",
          file_data: "48656c6c6f20576f726c6421",
          import_name: "customers",
          metadata: { filename: "a.csv", content_type: "text/csv", size: "12" },
          date: "2025-06-25T10:31:02.123456",
          extra: { priority: "high" }
        }
      })
    }))
})
