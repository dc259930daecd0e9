/**
 * The five contract RPCs end to end: a real proxy on loopback, the real broker, a grpc-js client
 * built from the generated stubs, and bodies published with amqplib exactly as the API does.
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect, Fiber } from "effect"
import { healthClient, SERVING, waitForHealth } from "./support/health.js"
import { subscribeSchemas } from "./support/subscriber.js"
import type { SchemaMessageResponse } from "../gen/messaging.js"
import { schemaBody, schemaMessage, validationBody, validationMessage } from "./fixtures/bodies.js"
import {
  grpcClient,
  makeAdmin,
  makeNames,
  makeTestEnv,
  publishJson,
  publishRaw,
  quiet,
  readMessages,
  startProxy,
  unary,
  waitForQueue
} from "./support/harness.js"

describe("unary RPCs", () => {
  it.live("GetMessagingParams and the routing keys return the configured values", () =>
    Effect.gen(function*() {
      const env = yield* makeTestEnv({ RABBITMQ_ROUTING_KEY_SCHEMAS: "schemas.custom.*" })
      const { names, client } = env
      const params = yield* unary(client.getMessagingParams.bind(client), {})
      assert.deepStrictEqual(params, {
        host: "127.0.0.1",
        port: 5672,
        username: "guest",
        password: "guest",
        virtualHost: "/",
        exchange: {
          exchange: names.exchange,
          type: "topic",
          durable: true,
          queues: [
            { queue: names.schemas, durable: true, routingKey: "schemas.custom.*" },
            { queue: names.validations, durable: true, routingKey: "validation.*" },
            { queue: names.schemaResults, durable: true, routingKey: "schemas.result.*" },
            { queue: names.validationResults, durable: true, routingKey: "validation.result.*" }
          ]
        },
        nodes: [{ host: "127.0.0.1", port: 5672 }]
      })
      const keys = yield* Effect.all([
        unary(client.getRoutingKeySchemas.bind(client), { results: false }),
        unary(client.getRoutingKeySchemas.bind(client), { results: true }),
        unary(client.getRoutingKeyValidations.bind(client), { results: false }),
        unary(client.getRoutingKeyValidations.bind(client), { results: true })
      ])
      assert.deepStrictEqual(keys.map((k) => k.routingKey), [
        "schemas.custom.*",
        "schemas.result.*",
        "validation.*",
        "validation.result.*"
      ])
    }))

  it.live("health reports SERVING once the broker is connected", () =>
    Effect.gen(function*() {
      const { port } = yield* makeTestEnv()
      const health = yield* healthClient(port)
      // Health follows the broker connection in its own fiber; wait for the flip, then Check agrees.
      yield* waitForHealth(health, SERVING)
      for (const service of ["", "messaging.MessagingService"]) {
        const response = yield* unary(health.check.bind(health), { service })
        assert.strictEqual(response.status, SERVING, `status of '${service}'`)
      }
    }))
})

describe("streams", () => {
  it.live("a schema and a validation body arrive field for field", () =>
    Effect.gen(function*() {
      const { names, client, admin } = yield* makeTestEnv()
      yield* publishJson(admin, names.exchange, "schemas.*", schemaBody("6f1c-schema"))
      yield* publishJson(admin, names.exchange, "validation.*", validationBody("9a2e-validation"))
      const [schema] = yield* readMessages(client.streamSchemaMessages({}), 1)
      const [validation] = yield* readMessages(client.streamValidationMessages({}), 1)
      assert.deepStrictEqual(schema, schemaMessage("6f1c-schema"))
      assert.deepStrictEqual(validation, validationMessage("9a2e-validation"))
      // Read, but cancelled before anything more was written past them: nothing shows the client
      // read them, so both go back to their queues (a duplicate at worst, never a loss).
      yield* waitForQueue(admin, names.schemas, (q) => q.messageCount === 1 && q.consumerCount === 0)
      yield* waitForQueue(admin, names.validations, (q) => q.messageCount === 1 && q.consumerCount === 0)
    }))

  it.live("500 messages published while no client is connected arrive in order, none missing", () =>
    Effect.gen(function*() {
      const { names, client, admin } = yield* makeTestEnv()
      const ids = Array.from({ length: 500 }, (_, i) => `m-${String(i).padStart(3, "0")}`)
      for (const id of ids) yield* publishJson(admin, names.exchange, "schemas.*", schemaBody(id))
      yield* waitForQueue(admin, names.schemas, (q) => q.messageCount === 500)
      const received = yield* readMessages(client.streamSchemaMessages({}), 500)
      assert.deepStrictEqual(received.map((m) => m.id), ids)
      // 500 small messages are within what a client can hold unread: none is shown read, and the
      // cancel gives every one back.
      yield* waitForQueue(admin, names.schemas, (q) => q.messageCount === 500 && q.consumerCount === 0)
    }))

  it.live("two concurrent streams on one queue share the messages, none duplicated", () =>
    Effect.gen(function*() {
      const { names, client, admin } = yield* makeTestEnv({ RABBITMQ_PREFETCH: "4" })
      const total = 200
      const received: Array<string> = []
      const streams = [quiet(client.streamSchemaMessages({})), quiet(client.streamSchemaMessages({}))]
      const perStream = [0, 0]
      streams.forEach((call, i) =>
        call.on("data", (m: SchemaMessageResponse) => {
          received.push(m.id)
          perStream[i]!++
        })
      )
      const done = Effect.callback<void>((resume) => {
        streams.forEach((call) => call.on("data", () => received.length === total && resume(Effect.void)))
      })
      const waiter = yield* Effect.forkChild(done)
      yield* waitForQueue(admin, names.schemas, (q) => q.consumerCount === 2)
      for (let i = 0; i < total; i++) yield* publishJson(admin, names.exchange, "schemas.*", schemaBody(`c-${i}`))
      yield* Fiber.join(waiter)
      streams.forEach((call) => call.cancel())
      assert.strictEqual(new Set(received).size, total, "every id exactly once")
      assert.strictEqual(received.length, total)
      assert.isAbove(perStream[0]!, 0, "first stream got a share")
      assert.isAbove(perStream[1]!, 0, "second stream got a share")
      // None can be shown read (see above): all go back on cancel.
      yield* waitForQueue(admin, names.schemas, (q) => q.messageCount === total && q.consumerCount === 0)
    }))

  // How fast is the bench's business (its cancel phase: median 0.44 ms); a test on a busy machine
  // only waits for the event.
  it.live("a client cancel releases the stream's broker consumer", () =>
    Effect.gen(function*() {
      const { names, client, admin } = yield* makeTestEnv()
      const call = quiet(client.streamSchemaMessages({}))
      yield* waitForQueue(admin, names.schemas, (q) => q.consumerCount === 1)
      call.cancel()
      const after = yield* waitForQueue(admin, names.schemas, (q) => q.consumerCount === 0)
      assert.strictEqual(after.consumerCount, 0)
    }))

  it.live("a stalled client holds at most the prefetch; on cancel every message it never read is requeued (issue 10, fault 8)", () =>
    Effect.gen(function*() {
      const { names, client, admin } = yield* makeTestEnv({ RABBITMQ_PREFETCH: "8" })
      // 256 KiB bodies: HTTP/2 flow control stops grpc-js from taking more than a few of them.
      const big = "ab".repeat(128 * 1024)
      for (let i = 0; i < 20; i++) {
        yield* publishJson(admin, names.exchange, "validation.*", { ...validationBody(`big-${i}`), file_data: big })
      }
      const stalled = quiet(client.streamValidationMessages({}))
      stalled.pause() // never reads: the proxy must not pull more than the prefetch from the broker
      yield* waitForQueue(admin, names.validations, (q) => q.consumerCount === 1 && q.messageCount === 12)
      stalled.cancel()
      // Before: what grpc-js had taken into its HTTP/2 buffers was acked and lost. Now nothing the
      // client never read is acked: all 20 are back.
      const back = yield* waitForQueue(admin, names.validations, (q) => q.consumerCount === 0 && q.messageCount === 20)
      const rest = yield* readMessages(client.streamValidationMessages({}), back.messageCount)
      const requeued = new Set(rest.map((m) => m.id))
      assert.strictEqual(requeued.size, 20, "no requeued message twice")
      for (const id of requeued) assert.match(id, /^big-\d+$/)
    }))

  it.live("a malformed body lands in the dead-letter queue with its reason; the next good one streams", () =>
    Effect.gen(function*() {
      const { names, client, admin } = yield* makeTestEnv()
      yield* publishRaw(admin, names.exchange, "schemas.*", Buffer.from("{not json"), { messageId: "bad-1" })
      yield* publishJson(admin, names.exchange, "schemas.*", { ...schemaBody("bad-2"), id: 42 })
      yield* publishJson(admin, names.exchange, "schemas.*", schemaBody("good-1"))
      const [message] = yield* readMessages(client.streamSchemaMessages({}), 1)
      assert.strictEqual(message?.id, "good-1")
      yield* waitForQueue(admin, names.schemasDead, (q) => q.messageCount === 2)
      const dead = []
      for (let i = 0; i < 2; i++) {
        const got = yield* Effect.promise(() => admin.channel.get(names.schemasDead, { noAck: true }))
        assert.notStrictEqual(got, false)
        if (got !== false) dead.push(got)
      }
      assert.strictEqual(dead[0]?.content.toString(), "{not json", "body kept byte for byte")
      assert.strictEqual(dead[0]?.properties.messageId, "bad-1")
      assert.match(String(dead[0]?.properties.headers?.["x-dead-letter-reason"]), /not valid JSON/)
      assert.match(String(dead[1]?.properties.headers?.["x-dead-letter-reason"]), /Expected string.*\["id"\]/)
      assert.strictEqual(dead[1]?.properties.headers?.["x-original-queue"], names.schemas)
      // good-1 is back (the cancel came before it could be shown read); the bad ones are not.
      yield* waitForQueue(admin, names.schemas, (q) => q.messageCount === 1 && q.consumerCount === 0)
    }))
})

describe("messages over the gRPC size limit", () => {
  it.live("are dead-lettered with the reason instead of ending the call; the stream and the subscription go on", () =>
    Effect.gen(function*() {
      const { names, client, admin } = yield* makeTestEnv({ GRPC_MAX_MESSAGE_BYTES: "4096" })
      const big = (id: string) => ({ ...schemaBody(id), import_name: "x".repeat(5000) })
      yield* publishJson(admin, names.exchange, "schemas.*", big("big-1"))
      yield* publishJson(admin, names.exchange, "schemas.*", schemaBody("fits-1"))
      const [streamed] = yield* readMessages(client.streamSchemaMessages({}), 1)
      assert.strictEqual(streamed?.id, "fits-1")
      // The cancelled stream must be gone before the next two, or it could take them.
      yield* waitForQueue(admin, names.schemas, (q) => q.consumerCount === 0)

      yield* publishJson(admin, names.exchange, "schemas.*", big("big-2"))
      yield* publishJson(admin, names.exchange, "schemas.*", schemaBody("fits-2"))
      const sub = yield* subscribeSchemas(client)
      // fits-1 first: the cancelled stream could not show it was read, so it went back.
      const delivered = yield* sub.deliveries(2)
      assert.deepStrictEqual(delivered.map((d) => d.message?.id), ["fits-1", "fits-2"])
      for (const d of delivered) yield* sub.ack(d.info!.deliveryId)

      yield* waitForQueue(admin, names.schemasDead, (q) => q.messageCount === 2)
      // A stream sends the message itself; a subscription wraps it in a 64-byte envelope.
      for (const [id, room] of [["big-1", 4096], ["big-2", 4032]] as const) {
        const dead = yield* Effect.promise(() => admin.channel.get(names.schemasDead, { noAck: true }))
        assert.notStrictEqual(dead, false)
        if (dead === false) return
        assert.strictEqual(JSON.parse(dead.content.toString()).id, id)
        assert.match(
          String(dead.properties.headers?.["x-dead-letter-reason"]),
          new RegExp(`^too large for gRPC: \\d+ bytes encoded, at most ${room} can be sent \\(GRPC_MAX_MESSAGE_BYTES\\)$`)
        )
      }
    }))
})

describe("topology owned by operators", () => {
  it.live("a dead-letter queue deleted by an operator is declared again before a malformed body goes to it", () =>
    Effect.gen(function*() {
      const { names, client, admin } = yield* makeTestEnv()
      yield* Effect.promise(() => admin.channel.deleteQueue(names.schemasDead))
      yield* publishRaw(admin, names.exchange, "schemas.*", Buffer.from("not json"), { messageId: "bad-after-purge" })
      yield* publishJson(admin, names.exchange, "schemas.*", schemaBody("good-after-purge"))
      const [message] = yield* readMessages(client.streamSchemaMessages({}), 1)
      assert.strictEqual(message?.id, "good-after-purge")
      const dead = yield* waitForQueue(admin, names.schemasDead, (q) => q.messageCount === 1)
      assert.strictEqual(dead.messageCount, 1, "kept, not dropped")
    }))

  it.live("a body nested 5,000 deep is dead-lettered with its reason; the stream and the queue go on (issue 10, fault 2)", () =>
    Effect.gen(function*() {
      const { names, client, admin } = yield* makeTestEnv()
      const deep = `{"id":"dp","schema":{"properties":{"p":{"type":"string","k":${"[".repeat(5_000)}${"]".repeat(5_000)}}}}}`
      yield* publishRaw(admin, names.exchange, "schemas.*", Buffer.from(deep), { messageId: "dp" })
      yield* publishJson(admin, names.exchange, "schemas.*", schemaBody("behind-dp"))
      const [message] = yield* readMessages(client.streamSchemaMessages({}), 1)
      assert.strictEqual(message?.id, "behind-dp")
      yield* waitForQueue(admin, names.schemasDead, (q) => q.messageCount === 1)
      const dead = yield* Effect.promise(() => admin.channel.get(names.schemasDead, { noAck: true }))
      assert.notStrictEqual(dead, false)
      if (dead === false) return
      assert.strictEqual(dead.content.toString(), deep)
      assert.match(String(dead.properties.headers?.["x-dead-letter-reason"]), /^body cannot be decoded: Maximum call stack size exceeded/)
    }))

  it.live("pass-through fields keep any string: a date of 25/06/2025 10:31 and non-hex file_data stream unchanged (issue 10, fault 7)", () =>
    Effect.gen(function*() {
      const { names, client, admin } = yield* makeTestEnv()
      yield* publishJson(admin, names.exchange, "schemas.*", { ...schemaBody("d-1"), date: "25/06/2025 10:31" })
      yield* publishJson(admin, names.exchange, "validation.*", { ...validationBody("d-2"), date: "25/06/2025 10:31", file_data: "not hex" })
      const [schema] = yield* readMessages(client.streamSchemaMessages({}), 1)
      const [validation] = yield* readMessages(client.streamValidationMessages({}), 1)
      assert.deepStrictEqual(schema, { ...schemaMessage("d-1"), date: "25/06/2025 10:31" })
      assert.deepStrictEqual(validation, { ...validationMessage("d-2"), date: "25/06/2025 10:31", fileData: "not hex" })
      assert.strictEqual((yield* waitForQueue(admin, names.schemasDead)).messageCount, 0)
      assert.strictEqual((yield* waitForQueue(admin, names.validationsDead)).messageCount, 0)
    }))

  it.live("queues that already exist as quorum queues are accepted as they are", () =>
    Effect.gen(function*() {
      const names = makeNames()
      const admin = yield* makeAdmin(names)
      yield* Effect.promise(() =>
        admin.channel.assertQueue(names.schemas, { durable: true, arguments: { "x-queue-type": "quorum", "x-delivery-limit": 10 } })
      )
      const port = yield* startProxy(names)
      const client = yield* grpcClient(port)
      yield* waitForQueue(admin, names.schemasDead)
      yield* publishJson(admin, names.exchange, "schemas.*", schemaBody("in-quorum"))
      const [message] = yield* readMessages(client.streamSchemaMessages({}), 1)
      assert.strictEqual(message?.id, "in-quorum")
    }))
})
