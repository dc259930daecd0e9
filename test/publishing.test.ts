/**
 * Publish, PublishBatch and GetQueueInfo end to end: a real proxy on loopback and the real broker.
 * What arrived is read back with the admin channel (basic.get), so the properties are checked too.
 */
import { assert, describe, it } from "@effect/vitest"
import * as grpc from "@grpc/grpc-js"
import type * as amqp from "amqplib"
import * as http2 from "node:http2"
import { Effect } from "effect"
import {
  type GetQueueInfoRequest,
  type GetQueueInfoResponse,
  MessageKind,
  type MessagingServiceClient,
  type PublishBatchResponse,
  PublishRequest
} from "../gen/messaging.js"
import { schemaBody, validationBody } from "./fixtures/bodies.js"
import {
  type Admin,
  grpcClient,
  makeAdmin,
  makeNames,
  makeTestEnv,
  startProxy,
  publishRaw,
  queueState,
  quiet,
  readMessages,
  unary,
  waitForQueue
} from "./support/harness.js"
import { startRelay } from "./support/relay.js"
import { healthClient, SERVING, waitForHealth } from "./support/health.js"
import { subscribeSchemas } from "./support/subscriber.js"

const json = (body: unknown) => Buffer.from(JSON.stringify(body))

// CONTRACT.md §3, verbatim
const CONTRACT_SCHEMA_BODY = `{"id": "6f1c…", "schema": {"schema": "http://json-schema.org/draft-07/schema#", "type": "object",
  "required": ["name"], "properties": {"name": {"type": "string", "extra": {}},
  "age": {"type": "integer", "extra": {"minimum": 0}}}},
 "import_name": "customers", "raw": false, "tasks": "upload_schema",
 "date": "2025-06-25T10:31:02.123456", "extra": {}}`

const request = (kind: MessageKind, body: unknown, routingKey = ""): PublishRequest => ({
  kind,
  body: Buffer.isBuffer(body) ? body : json(body),
  routingKey
})

const publish = (client: MessagingServiceClient, req: PublishRequest) => unary(client.publish.bind(client), req)

/** The status of a call that must fail. */
const failure = <A>(effect: Effect.Effect<A, grpc.ServiceError>) =>
  Effect.flip(effect).pipe(Effect.map((error) => ({ code: error.code, details: error.details })))

const queueInfo = (client: MessagingServiceClient) =>
  unary<GetQueueInfoRequest, GetQueueInfoResponse>(client.getQueueInfo.bind(client), {})

/** A client-streaming call: writes every request, half-closes, resolves with the answer. */
const publishBatch = (client: MessagingServiceClient, requests: ReadonlyArray<PublishRequest>) =>
  Effect.callback<PublishBatchResponse, grpc.ServiceError>((resume) => {
    const call = client.publishBatch((error, response) => resume(error ? Effect.fail(error) : Effect.succeed(response)))
    for (const req of requests) call.write(req)
    call.end()
    return Effect.sync(() => call.cancel())
  })

/** Takes every message currently in `queue` (basic.get, auto-ack), in queue order. */
const drain = (admin: Admin, queue: string) =>
  Effect.promise(async () => {
    const got: Array<amqp.GetMessage> = []
    while (true) {
      const message = await admin.channel.get(queue, { noAck: true })
      if (message === false) return got
      got.push(message)
    }
  })

const idsIn = (messages: ReadonlyArray<amqp.GetMessage>) => messages.map((m) => JSON.parse(m.content.toString()).id as string)

describe("Publish", () => {
  it.live("a contract schema body arrives on the schemas queue unchanged, persistent, with message_id", () =>
    Effect.gen(function*() {
      const { names, client, admin } = yield* makeTestEnv()
      // The contract's example, byte for byte (whitespace included): it must not be re-encoded.
      const body = Buffer.from(CONTRACT_SCHEMA_BODY.replace("6f1c…", "p-1"))
      const response = yield* publish(client, request(MessageKind.MESSAGE_KIND_SCHEMA, body))
      assert.deepStrictEqual(response, { messageId: "p-1", routingKey: "schemas.*" })
      // Answered after the confirm: the message is already in the queue.
      const [message, ...rest] = yield* drain(admin, names.schemas)
      assert.strictEqual(rest.length, 0)
      assert.isTrue(message?.content.equals(body), "body bytes unchanged")
      assert.strictEqual(message?.properties.messageId, "p-1")
      assert.strictEqual(message?.properties.contentType, "application/json")
      assert.strictEqual(message?.properties.deliveryMode, 2)
      assert.strictEqual(message?.fields.exchange, names.exchange)
      assert.strictEqual(message?.fields.routingKey, "schemas.*")
    }))

  it.live("a nacked publish is UNAVAILABLE naming the nack; the next publishes go out on a fresh channel and are confirmed", () =>
    Effect.gen(function*() {
      // A full queue with overflow reject-publish nacks every publish routed to it.
      const names = makeNames()
      const admin = yield* makeAdmin(names)
      yield* Effect.promise(() =>
        admin.channel.assertQueue(names.schemaResults, {
          durable: true,
          arguments: { "x-max-length": 0, "x-overflow": "reject-publish" }
        })
      )
      const client = yield* grpcClient(yield* startProxy(names))
      yield* waitForQueue(admin, names.schemasDead)
      const status = yield* failure(publish(client, request(MessageKind.MESSAGE_KIND_SCHEMA_RESULT, { id: "nacked-1" })))
      assert.deepStrictEqual(status, {
        code: grpc.status.UNAVAILABLE,
        details: "the broker refused message 'nacked-1' (nack)"
      })
      for (const id of ["after-nack-1", "after-nack-2"]) {
        yield* publish(client, request(MessageKind.MESSAGE_KIND_SCHEMA, schemaBody(id)))
      }
      assert.deepStrictEqual(idsIn(yield* drain(admin, names.schemas)), ["after-nack-1", "after-nack-2"])
    }))

  it.live("what Publish accepts, StreamSchemaMessages and StreamValidationMessages deliver", () =>
    Effect.gen(function*() {
      const { client } = yield* makeTestEnv()
      yield* publish(client, request(MessageKind.MESSAGE_KIND_SCHEMA, schemaBody("s-1")))
      yield* publish(client, request(MessageKind.MESSAGE_KIND_VALIDATION, validationBody("v-1")))
      const [schema] = yield* readMessages(client.streamSchemaMessages({}), 1)
      const [validation] = yield* readMessages(client.streamValidationMessages({}), 1)
      assert.strictEqual(schema?.id, "s-1")
      assert.strictEqual(validation?.id, "v-1")
      assert.strictEqual(validation?.fileData, "48656c6c6f20576f726c6421")
    }))

  it.live("a body the codec rejects is INVALID_ARGUMENT with the reason, and nothing is published", () =>
    Effect.gen(function*() {
      const { names, client, admin } = yield* makeTestEnv()
      const cases: Array<[MessageKind, Buffer | object, string]> = [
        [MessageKind.MESSAGE_KIND_SCHEMA, { ...schemaBody("x"), id: 42 }, "body rejected: Expected string at [\"id\"]"],
        [MessageKind.MESSAGE_KIND_SCHEMA, Buffer.from("{not json"), "body rejected: body is not valid JSON: "],
        [MessageKind.MESSAGE_KIND_VALIDATION, { ...validationBody("x"), file_data: 5 }, "body rejected: Expected string | null at [\"file_data\"]"],
        [MessageKind.MESSAGE_KIND_SCHEMA_RESULT, { ok: true }, "body rejected: Missing key at [\"id\"]"],
        [MessageKind.MESSAGE_KIND_VALIDATION_RESULT, { id: "" }, "body rejected: Expected a value with a length of at least 1 at [\"id\"]"],
        [MessageKind.MESSAGE_KIND_VALIDATION_RESULT, [1, 2], "body rejected: Expected a JSON object"],
        [MessageKind.MESSAGE_KIND_SCHEMA_RESULT, Buffer.from([0x7b, 0xff, 0x7d]), "body rejected: body is not valid UTF-8: "]
      ]
      for (const [kind, body, reason] of cases) {
        const status = yield* failure(publish(client, request(kind, body)))
        assert.strictEqual(status.code, grpc.status.INVALID_ARGUMENT, reason)
        assert.isTrue(status.details.startsWith(reason), `${status.details} starts with ${reason}`)
      }
      for (const queue of [names.schemas, names.validations, names.schemaResults, names.validationResults]) {
        assert.strictEqual((yield* queueState(admin, queue)).messageCount, 0, queue)
      }
    }))

  it.live("an unspecified or unknown kind is INVALID_ARGUMENT 'kind is required'", () =>
    Effect.gen(function*() {
      const { client } = yield* makeTestEnv()
      for (const kind of [MessageKind.MESSAGE_KIND_UNSPECIFIED, 99 as MessageKind]) {
        const status = yield* failure(publish(client, request(kind, schemaBody("k-1"))))
        assert.deepStrictEqual(status, { code: grpc.status.INVALID_ARGUMENT, details: "kind is required" })
      }
    }))

  it.live("a routing key outside the kind's binding is INVALID_ARGUMENT, nothing published", () =>
    Effect.gen(function*() {
      const { names, client, admin } = yield* makeTestEnv()
      const status = yield* failure(publish(client, request(MessageKind.MESSAGE_KIND_SCHEMA_RESULT, { id: "sneak" }, "schemas.x")))
      assert.strictEqual(status.code, grpc.status.INVALID_ARGUMENT)
      assert.strictEqual(status.details, "routing key 'schemas.x' does not match this kind's binding 'schemas.result.*'")
      assert.strictEqual((yield* queueState(admin, names.schemas)).messageCount, 0)
    }))

  it.live("an override that would also reach another contract queue is INVALID_ARGUMENT", () =>
    Effect.gen(function*() {
      // An operator widened the schemas binding so it overlaps the schema-results one.
      const { names, client, admin } = yield* makeTestEnv({ RABBITMQ_ROUTING_KEY_SCHEMAS: "schemas.#" })
      const status = yield* failure(
        publish(client, request(MessageKind.MESSAGE_KIND_SCHEMA_RESULT, { id: "overlap" }, "schemas.result.x"))
      )
      assert.strictEqual(status.code, grpc.status.INVALID_ARGUMENT)
      assert.strictEqual(
        status.details,
        `routing key 'schemas.result.x' would also reach '${names.schemas}' (binding 'schemas.#')`
      )
      assert.strictEqual((yield* queueState(admin, names.schemas)).messageCount, 0)
    }))

  it.live("a routing key bound to no queue is FAILED_PRECONDITION; the shared channel keeps working", () =>
    Effect.gen(function*() {
      const { names, client, admin } = yield* makeTestEnv()
      // An operator removed the schemas binding: schema messages now route nowhere.
      yield* Effect.promise(() => admin.channel.unbindQueue(names.schemas, names.exchange, "schemas.*"))
      const status = yield* failure(publish(client, request(MessageKind.MESSAGE_KIND_SCHEMA, schemaBody("u-1"), "schemas.x")))
      assert.strictEqual(status.code, grpc.status.FAILED_PRECONDITION)
      assert.include(status.details, "message 'u-1' routed to no queue (routing key 'schemas.x'")
      // Concurrent publishes, routable and not, each get their own verdict.
      const results = yield* Effect.forEach(
        Array.from({ length: 20 }, (_, i) => i),
        (i) =>
          Effect.result(publish(
            client,
            i % 2 === 0
              ? request(MessageKind.MESSAGE_KIND_VALIDATION, validationBody(`c-${i}`))
              : request(MessageKind.MESSAGE_KIND_SCHEMA, schemaBody(`c-${i}`))
          )),
        { concurrency: "unbounded" }
      )
      results.forEach((result, i) => {
        if (i % 2 === 0) assert.strictEqual(result._tag, "Success", `c-${i}`)
        else {
          assert.strictEqual(result._tag, "Failure", `c-${i}`)
          if (result._tag === "Failure") assert.strictEqual(result.failure.code, grpc.status.FAILED_PRECONDITION)
        }
      })
      const arrived = yield* drain(admin, names.validations)
      assert.deepStrictEqual(idsIn(arrived).sort(), ["c-0", "c-10", "c-12", "c-14", "c-16", "c-18", "c-2", "c-4", "c-6", "c-8"])
    }))

  it.live("the result kinds route to the results queues with their configured routing keys", () =>
    Effect.gen(function*() {
      const { names, client, admin } = yield* makeTestEnv()
      const schemaResult = yield* publish(client, request(MessageKind.MESSAGE_KIND_SCHEMA_RESULT, { id: "sr-1", ok: true }))
      const validationResult = yield* publish(
        client,
        request(MessageKind.MESSAGE_KIND_VALIDATION_RESULT, { id: "vr-1", errors: [] })
      )
      assert.deepStrictEqual(schemaResult, { messageId: "sr-1", routingKey: "schemas.result.*" })
      assert.deepStrictEqual(validationResult, { messageId: "vr-1", routingKey: "validation.result.*" })
      assert.deepStrictEqual(idsIn(yield* drain(admin, names.schemaResults)), ["sr-1"])
      assert.deepStrictEqual(idsIn(yield* drain(admin, names.validationResults)), ["vr-1"])
      // Nothing leaked into the request queues (schemas.* does not match schemas.result.*).
      assert.strictEqual((yield* queueState(admin, names.schemas)).messageCount, 0)
      assert.strictEqual((yield* queueState(admin, names.validations)).messageCount, 0)
    }))

  it.live("a deleted exchange is NOT_FOUND; once it is back, a fresh channel publishes again", () =>
    Effect.gen(function*() {
      const { names, client, admin } = yield* makeTestEnv()
      yield* publish(client, request(MessageKind.MESSAGE_KIND_SCHEMA, schemaBody("e-1")))
      yield* Effect.promise(() => admin.channel.deleteExchange(names.exchange))
      const status = yield* failure(publish(client, request(MessageKind.MESSAGE_KIND_SCHEMA, schemaBody("e-2"))))
      assert.strictEqual(status.code, grpc.status.NOT_FOUND)
      assert.include(status.details, "no exchange")
      yield* Effect.promise(async () => {
        await admin.channel.assertExchange(names.exchange, "topic", { durable: true })
        await admin.channel.bindQueue(names.schemas, names.exchange, "schemas.*")
      })
      yield* publish(client, request(MessageKind.MESSAGE_KIND_SCHEMA, schemaBody("e-3")))
      assert.deepStrictEqual(idsIn(yield* drain(admin, names.schemas)), ["e-1", "e-3"])
    }))

  it.live("without a broker connection Publish and GetQueueInfo fail fast with UNAVAILABLE; after it returns they work", () =>
    Effect.gen(function*() {
      const relay = yield* startRelay()
      const { names, client, admin, port } = yield* makeTestEnv({ RABBITMQ_PORT: String(relay.port) })
      yield* publish(client, request(MessageKind.MESSAGE_KIND_SCHEMA, schemaBody("d-1")))
      yield* relay.setRefusing(true)
      yield* relay.sever
      // "broker not connected" is the answer after the short grace wait (unaryCall.ts), not a
      // confirm timeout: the status itself shows it failed fast, with no clock in the test.
      // The reason is the last failed attempt's, if one failed yet: the relay closes each socket.
      const notConnected = /^broker not connected(: broker unreachable: .+)?$/
      const status = yield* failure(publish(client, request(MessageKind.MESSAGE_KIND_SCHEMA, schemaBody("d-2"))))
      assert.strictEqual(status.code, grpc.status.UNAVAILABLE)
      assert.match(status.details, notConnected)
      const info = yield* failure(queueInfo(client))
      assert.strictEqual(info.code, grpc.status.UNAVAILABLE)
      assert.match(info.details, notConnected)
      const batch = yield* failure(publishBatch(client, [request(MessageKind.MESSAGE_KIND_SCHEMA, schemaBody("d-b"))]))
      assert.strictEqual(batch.code, grpc.status.UNAVAILABLE)
      assert.match(batch.details, /^broker not connected(: broker unreachable: .+)? \(published 0 before this one\)$/)
      yield* relay.setRefusing(false)
      // Once health is back the connection is; the old publishing channel died with the old
      // connection, so this first publish must open a fresh one on the new connection.
      yield* waitForHealth(yield* healthClient(port), SERVING)
      yield* publish(client, request(MessageKind.MESSAGE_KIND_SCHEMA, schemaBody("d-3")))
      assert.deepStrictEqual(idsIn(yield* drain(admin, names.schemas)), ["d-1", "d-3"])
    }))
})

describe("the publishers' own connection", () => {
  it.live("cutting only the Publish connection leaves streams and unsettled deliveries untouched", () =>
    Effect.gen(function*() {
      const relay = yield* startRelay()
      const { names, client, admin } = yield* makeTestEnv({ RABBITMQ_PORT: String(relay.port) })
      yield* publish(client, request(MessageKind.MESSAGE_KIND_SCHEMA, schemaBody("own-1")))
      assert.strictEqual(relay.connections(), 2, "one connection for consumers, one for publishers")
      const sub = yield* subscribeSchemas(client)
      const [held] = yield* sub.deliveries(1)
      assert.strictEqual(held?.message?.id, "own-1")

      assert.strictEqual(yield* relay.severWhereClientSent("(publishing)"), 1)
      // The delivery's channel lives on the consumers' connection: acking it still works (a lost
      // channel would answer with a settle_error).
      yield* sub.ack(held!.info!.deliveryId)
      yield* sub.send({ action: { $case: "ack", value: { deliveryIds: ["0"], ranges: [] } } }) // a marker
      const answer = yield* sub.next()
      assert.deepStrictEqual(answer.event, {
        $case: "settleError",
        value: { deliveryIds: ["0"], reason: "unknown or already settled delivery id" }
      })
      yield* waitForQueue(admin, names.schemas, (q) => q.messageCount === 0 && q.consumerCount === 1)
      // Publish reconnects on its own and the same subscription receives what it publishes.
      yield* publish(client, request(MessageKind.MESSAGE_KIND_SCHEMA, schemaBody("own-2")))
      const [next] = yield* sub.deliveries(1)
      assert.deepStrictEqual([next?.message?.id, next?.info?.redelivered], ["own-2", false])
    }))
})

describe("PublishBatch", () => {
  it.live("50 requests: published=50 with their ids, all 50 in the queue in order", () =>
    Effect.gen(function*() {
      const { names, client, admin } = yield* makeTestEnv()
      const ids = Array.from({ length: 50 }, (_, i) => `b-${String(i).padStart(2, "0")}`)
      const response = yield* publishBatch(client, ids.map((id) => request(MessageKind.MESSAGE_KIND_SCHEMA, schemaBody(id))))
      assert.deepStrictEqual(response, { published: 50, messageIds: ids })
      const arrived = yield* drain(admin, names.schemas)
      assert.deepStrictEqual(idsIn(arrived), ids)
      assert.deepStrictEqual(arrived.map((m) => m.properties.messageId), ids)
    }))

  it.live("a session that publishes in batches gets HTTP/2 windows of 1 MiB per stream and 4 MiB for the session (Node's default: 64 KiB)", () =>
    Effect.gen(function*() {
      const { port } = yield* makeTestEnv()
      const session = yield* Effect.acquireRelease(
        Effect.sync(() => http2.connect(`http://127.0.0.1:${port}`)),
        (s) => Effect.sync(() => s.close())
      )
      // The proxy's SETTINGS frame (after the preface, then the one the first PublishBatch sends).
      const settings: Array<number | undefined> = []
      session.on("remoteSettings", (s) => settings.push(s.initialWindowSize))
      const body = PublishRequest.encode(request(MessageKind.MESSAGE_KIND_SCHEMA, schemaBody("h2-1"))).finish()
      const frame = Buffer.concat([Buffer.from([0, 0, 0, 0, 0]), Buffer.from(body)])
      frame.writeUInt32BE(body.length, 1)
      const status = yield* Effect.callback<string | undefined>((resume) => {
        const stream = session.request({
          ":method": "POST",
          ":path": "/messaging.MessagingService/PublishBatch",
          "content-type": "application/grpc",
          te: "trailers"
        })
        stream.on("trailers", (trailers) => resume(Effect.succeed(String(trailers["grpc-status"]))))
        stream.on("data", () => undefined)
        stream.end(frame)
      })
      assert.strictEqual(status, "0")
      assert.deepStrictEqual(settings.slice(-1), [1024 * 1024])
      // What this client may still send on the session, without a WINDOW_UPDATE: 4 MiB less what it sent.
      assert.isAbove(session.state.remoteWindowSize ?? 0, 4 * 1024 * 1024 - 64 * 1024)
    }))

  it.live("an empty batch answers published=0", () =>
    Effect.gen(function*() {
      const { client } = yield* makeTestEnv()
      assert.deepStrictEqual(yield* publishBatch(client, []), { published: 0, messageIds: [] })
    }))

  it.live("a bad body at index 3 ends the batch with INVALID_ARGUMENT after exactly 3", () =>
    Effect.gen(function*() {
      const { names, client, admin } = yield* makeTestEnv()
      const requests = Array.from({ length: 10 }, (_, i) =>
        request(MessageKind.MESSAGE_KIND_SCHEMA, i === 3 ? { ...schemaBody("bad"), id: 7 } : schemaBody(`i-${i}`)))
      const status = yield* failure(publishBatch(client, requests))
      assert.strictEqual(status.code, grpc.status.INVALID_ARGUMENT)
      assert.strictEqual(status.details, "body rejected: Expected string at [\"id\"] (published 3 before this one)")
      assert.deepStrictEqual(idsIn(yield* drain(admin, names.schemas)), ["i-0", "i-1", "i-2"])
    }))

  it.live("a bad body at index 150 (behind the window of 64 and the read-ahead) ends the batch after exactly the 150 before it, in order", () =>
    Effect.gen(function*() {
      const { names, client, admin } = yield* makeTestEnv()
      const ids = Array.from({ length: 300 }, (_, i) => `w-${String(i).padStart(3, "0")}`)
      const requests = ids.map((id, i) => request(MessageKind.MESSAGE_KIND_SCHEMA, i === 150 ? "not json" : schemaBody(id)))
      const status = yield* failure(publishBatch(client, requests))
      assert.strictEqual(status.code, grpc.status.INVALID_ARGUMENT)
      assert.match(status.details, /^body rejected: .*\(published 150 before this one\)$/)
      assert.deepStrictEqual(idsIn(yield* drain(admin, names.schemas)), ids.slice(0, 150))
    }))

  it.live("2,000 requests: all confirmed, the ids in request order, the queue in the same order", () =>
    Effect.gen(function*() {
      const { names, client, admin } = yield* makeTestEnv()
      const ids = Array.from({ length: 2000 }, (_, i) => `l-${String(i).padStart(4, "0")}`)
      const response = yield* publishBatch(client, ids.map((id) => request(MessageKind.MESSAGE_KIND_SCHEMA, schemaBody(id))))
      assert.deepStrictEqual(response, { published: 2000, messageIds: ids })
      assert.deepStrictEqual(idsIn(yield* drain(admin, names.schemas)), ids)
    }))

  it.live("an unroutable request ends the batch with FAILED_PRECONDITION; the count covers what was in flight", () =>
    Effect.gen(function*() {
      const { names, client, admin } = yield* makeTestEnv()
      yield* Effect.promise(() => admin.channel.unbindQueue(names.schemas, names.exchange, "schemas.*"))
      const requests = Array.from({ length: 20 }, (_, i) =>
        i === 5
          ? request(MessageKind.MESSAGE_KIND_SCHEMA, schemaBody(`r-${i}`))
          : request(MessageKind.MESSAGE_KIND_VALIDATION, validationBody(`r-${i}`)))
      const status = yield* failure(publishBatch(client, requests))
      assert.strictEqual(status.code, grpc.status.FAILED_PRECONDITION)
      const match = /routing key 'schemas\.\*'.*\(published 5 before this one(?:; (\d+) later ones were already in flight and were published too)?\)$/
        .exec(status.details)
      assert.isNotNull(match, status.details)
      const after = Number(match?.[1] ?? 0)
      const arrived = idsIn(yield* drain(admin, names.validations))
      // Exactly what the details say: the 5 before, then the later ones that were already sent.
      assert.deepStrictEqual(arrived, [
        ...Array.from({ length: 5 }, (_, i) => `r-${i}`),
        ...Array.from({ length: after }, (_, i) => `r-${i + 6}`)
      ])
    }))

  it.live("kind missing in the first request: nothing published", () =>
    Effect.gen(function*() {
      const { names, client, admin } = yield* makeTestEnv()
      const status = yield* failure(publishBatch(client, [request(MessageKind.MESSAGE_KIND_UNSPECIFIED, schemaBody("z"))]))
      assert.deepStrictEqual(status, {
        code: grpc.status.INVALID_ARGUMENT,
        details: "kind is required (published 0 before this one)"
      })
      assert.strictEqual((yield* queueState(admin, names.schemas)).messageCount, 0)
    }))
})

describe("GetQueueInfo", () => {
  it.live("exact counts for the six queues, in the documented order, then the delay queues", () =>
    Effect.gen(function*() {
      const { names, client, admin } = yield* makeTestEnv()
      for (const id of ["q-1", "q-2", "q-3"]) {
        yield* publish(client, request(MessageKind.MESSAGE_KIND_SCHEMA, schemaBody(id)))
      }
      yield* publish(client, request(MessageKind.MESSAGE_KIND_SCHEMA_RESULT, { id: "q-r" }))
      yield* publishRaw(admin, "", names.schemasDead, Buffer.from("{not json"))
      yield* publishRaw(admin, "", names.validationsDead, Buffer.from("{}"))
      yield* publishRaw(admin, "", names.validationsDead, Buffer.from("[]"))
      // One consumer on the (empty) validations queue.
      const stream = quiet(client.streamValidationMessages({}))
      yield* Effect.addFinalizer(() => Effect.sync(() => stream.cancel()))
      yield* waitForQueue(admin, names.validations, (q) => q.consumerCount === 1)
      const info = yield* queueInfo(client)
      // The delay queues of nack_delayed (default tiers), after the six: schemas' tiers, then validations'.
      const tiers = ["1s", "5s", "30s", "2m", "10m", "1h"]
      assert.deepStrictEqual(info.queues.slice(6), ["schemas", "validations"].flatMap((kind) =>
        tiers.map((tier) => ({
          queue: `${kind === "schemas" ? names.schemas : names.validations}.retry.${tier}`,
          role: `${kind}_retry_${tier}`,
          messageCount: 0,
          consumerCount: 0,
          available: true,
          unavailableReason: ""
        }))
      ))
      assert.deepStrictEqual(info.queues.slice(0, 6), [
        { queue: names.schemas, role: "schemas", messageCount: 3, consumerCount: 0, available: true, unavailableReason: "" },
        { queue: names.validations, role: "validations", messageCount: 0, consumerCount: 1, available: true, unavailableReason: "" },
        { queue: names.schemaResults, role: "schema_results", messageCount: 1, consumerCount: 0, available: true, unavailableReason: "" },
        { queue: names.validationResults, role: "validation_results", messageCount: 0, consumerCount: 0, available: true, unavailableReason: "" },
        { queue: names.schemasDead, role: "schemas_dead", messageCount: 1, consumerCount: 0, available: true, unavailableReason: "" },
        { queue: names.validationsDead, role: "validations_dead", messageCount: 2, consumerCount: 0, available: true, unavailableReason: "" }
      ])
    }))

  it.live("a missing queue is reported unavailable with the broker's reason, the others as usual; the proxy's connection survives", () =>
    Effect.gen(function*() {
      const { names, client, admin } = yield* makeTestEnv()
      yield* Effect.promise(() => admin.channel.deleteQueue(names.validationResults))
      const info = yield* queueInfo(client)
      const missing = info.queues.find((q) => q.role === "validation_results")
      assert.deepStrictEqual({ ...missing, unavailableReason: undefined }, {
        queue: names.validationResults,
        role: "validation_results",
        messageCount: 0,
        consumerCount: 0,
        available: false,
        unavailableReason: undefined
      })
      assert.include(missing?.unavailableReason, `no queue '${names.validationResults}'`)
      assert.deepStrictEqual(info.queues.filter((q) => !q.available).length, 1)
      // The 404 closed only the probe's channel: the same connection still publishes.
      yield* publish(client, request(MessageKind.MESSAGE_KIND_SCHEMA, schemaBody("after-404")))
      assert.deepStrictEqual(idsIn(yield* drain(admin, names.schemas)), ["after-404"])
    }))
})
