/**
 * Acknowledged subscriptions and failure handling, over the real broker and server: ack, nack,
 * reject, poison messages, flow control, cancel and half-close, a broker connection cut (through a
 * relay the test severs) and a queue deleted under a stream.
 */
import { assert, describe, it } from "@effect/vitest"
import * as grpc from "@grpc/grpc-js"
import { Effect, Option } from "effect"
import { MessagingServiceClient } from "../gen/messaging.js"
import { schemaBody, schemaMessage } from "./fixtures/bodies.js"
import { makeTestEnv, publishJson, publishRaw, queueState, quiet, readMessages, waitForQueue } from "./support/harness.js"
import { healthClient, NOT_SERVING, SERVING, waitForHealth } from "./support/health.js"
import { makeMetricsTestEnv, sample, scrape } from "./support/metrics.js"
import { startRelay } from "./support/relay.js"
import { idsOf, subscribeSchemas } from "./support/subscriber.js"

const publishSchemas = (env: { admin: Parameters<typeof publishJson>[0]; names: { exchange: string } }, ids: Array<string>) =>
  Effect.forEach(ids, (id) => publishJson(env.admin, env.names.exchange, "schemas.*", schemaBody(id)), { discard: true })

describe("acknowledged subscriptions", () => {
  it.live("opened, delivered with ids, acked: the queue is empty afterwards", () =>
    Effect.gen(function*() {
      const env = yield* makeTestEnv()
      yield* publishSchemas(env, ["a", "b", "c"])
      const sub = yield* subscribeSchemas(env.client, { maxInFlight: 10, consumerName: "typechecker-1" })
      const opened = yield* sub.next()
      assert.deepStrictEqual(opened.event, {
        $case: "opened",
        // The size limit in force: gRPC's 4 MiB default for clients (GRPC_CLIENT_MAX_RECEIVE_MESSAGE_BYTES).
        value: { maxInFlight: 10, consumerName: "typechecker-1", maxMessageBytes: 4 * 1024 * 1024, ackDeadlineSeconds: 600, maxDeliveriesPerEvent: 1 }
      })
      const got = yield* sub.deliveries(3)
      assert.deepStrictEqual(got.map((d) => d.message?.id), ["a", "b", "c"])
      assert.deepStrictEqual(got.map((d) => d.info), [
        { deliveryId: "1", redelivered: false, deliveryCount: 1 },
        { deliveryId: "2", redelivered: false, deliveryCount: 1 },
        { deliveryId: "3", redelivered: false, deliveryCount: 1 }
      ])
      // Nothing acked yet: all three are still held by the broker for us.
      const held = yield* queueState(env.admin, env.names.schemas)
      assert.strictEqual(held.messageCount, 0)
      yield* sub.ack("3", "1") // any order, batched
      yield* sub.ack("2")
      sub.call.end() // half-close: the subscription ends cleanly
      const status = yield* sub.status
      assert.strictEqual(status.code, grpc.status.OK)
      const after = yield* waitForQueue(env.admin, env.names.schemas, (q) => q.consumerCount === 0)
      assert.strictEqual(after.messageCount, 0, "acked messages are gone")
    }))

  it.live("max_deliveries_per_event: ready deliveries come several to an event, in order; ranges ack them, skipping ids not pending (issue 14)", () =>
    Effect.gen(function*() {
      const env = yield* makeTestEnv()
      const ids = Array.from({ length: 25 }, (_, i) => `batched-${i}`)
      yield* publishSchemas(env, ids)
      const sub = yield* subscribeSchemas(env.client, { maxInFlight: 32, maxDeliveriesPerEvent: 10 })
      const opened = yield* sub.next()
      assert.strictEqual(opened.event?.$case === "opened" ? opened.event.value.maxDeliveriesPerEvent : undefined, 10)
      const sizes: Array<number> = []
      const got: Array<string> = []
      const deliveryIds: Array<string> = []
      while (got.length < ids.length) {
        const event = yield* sub.next()
        assert.strictEqual(event.event?.$case, "deliveries", "only batched events")
        if (event.event?.$case !== "deliveries") continue
        sizes.push(event.event.value.deliveries.length)
        for (const delivery of event.event.value.deliveries) {
          got.push(delivery.message?.id ?? "")
          deliveryIds.push(delivery.info?.deliveryId ?? "")
        }
      }
      assert.deepStrictEqual(got, ids, "every message once, in order")
      assert.isTrue(sizes.every((n) => n >= 1 && n <= 10), JSON.stringify(sizes))
      assert.isBelow(sizes.length, ids.length, "fewer events than messages")
      assert.deepStrictEqual(deliveryIds, ids.map((_, i) => String(i + 1)))
      // Ack 1..10 by id, then everything through 1000 by one range: 1..10 are skipped, no error.
      yield* sub.ack(...deliveryIds.slice(0, 10))
      yield* sub.send({ action: { $case: "ack", value: { deliveryIds: [], ranges: [{ first: "1", last: "1000" }] } } })
      yield* sub.settled
      sub.call.end()
      assert.strictEqual((yield* sub.status).code, grpc.status.OK)
      const after = yield* waitForQueue(env.admin, env.names.schemas, (q) => q.consumerCount === 0)
      assert.strictEqual(after.messageCount, 0, "all 25 acked")
    }))

  it.live("a nacked delivery comes back flagged redelivered with its count raised", () =>
    Effect.gen(function*() {
      const env = yield* makeTestEnv()
      yield* publishSchemas(env, ["n-1"])
      const sub = yield* subscribeSchemas(env.client)
      const [first] = yield* sub.deliveries(1)
      yield* sub.nack(first!.info!.deliveryId)
      const [second] = yield* sub.deliveries(1)
      assert.strictEqual(second?.message?.id, "n-1")
      assert.deepStrictEqual(second?.info, { deliveryId: "2", redelivered: true, deliveryCount: 2 })
      yield* sub.ack("2")
      sub.call.end()
      assert.strictEqual((yield* sub.status).code, grpc.status.OK)
      const after = yield* waitForQueue(env.admin, env.names.schemas, (q) => q.consumerCount === 0)
      assert.strictEqual(after.messageCount, 0)
    }))

  it.live("a rejected delivery is kept in the dead-letter queue with the subscriber's reason", () =>
    Effect.gen(function*() {
      const env = yield* makeTestEnv()
      yield* publishSchemas(env, ["r-1", "r-2"])
      const sub = yield* subscribeSchemas(env.client, { consumerName: "checker" })
      const got = yield* sub.deliveries(2)
      yield* sub.send({ action: { $case: "reject", value: { deliveryIds: [got[0]!.info!.deliveryId], reason: "schema conflicts" } } })
      yield* sub.ack(got[1]!.info!.deliveryId)
      yield* waitForQueue(env.admin, env.names.schemasDead, (q) => q.messageCount === 1)
      const dead = yield* Effect.promise(() => env.admin.channel.get(env.names.schemasDead, { noAck: true }))
      assert.notStrictEqual(dead, false)
      if (dead === false) return
      assert.strictEqual(JSON.parse(dead.content.toString()).id, "r-1")
      assert.strictEqual(dead.properties.headers?.["x-dead-letter-reason"], "schema conflicts")
      assert.strictEqual(dead.properties.headers?.["x-rejected-by"], "checker")
      assert.strictEqual(dead.properties.headers?.["x-original-queue"], env.names.schemas)
    }))

  it.live("a requeue count header beyond uint32 is clamped, and the next delivery is intact", () =>
    Effect.gen(function*() {
      const env = yield* makeTestEnv()
      yield* publishRaw(env.admin, env.names.exchange, "schemas.*", Buffer.from(JSON.stringify(schemaBody("h-1"))), {
        headers: { "x-requeue-count": 5_000_000_000 }
      })
      yield* publishSchemas(env, ["h-2"])
      const sub = yield* subscribeSchemas(env.client)
      const got = yield* sub.deliveries(2)
      assert.deepStrictEqual(got.map((d) => [d.message?.id, d.info?.deliveryCount, d.info?.redelivered]), [
        ["h-1", 4_294_967_295, true],
        ["h-2", 1, false]
      ])
      assert.deepStrictEqual(got[1]?.message, schemaMessage("h-2"))
    }))

  it.live("unknown and already-settled ids get a settle error; the subscription goes on", () =>
    Effect.gen(function*() {
      const env = yield* makeTestEnv()
      yield* publishSchemas(env, ["u-1"])
      const sub = yield* subscribeSchemas(env.client)
      const [first] = yield* sub.deliveries(1)
      yield* sub.ack(first!.info!.deliveryId, "999")
      const error = yield* sub.next()
      assert.deepStrictEqual(error.event, {
        $case: "settleError",
        value: { deliveryIds: ["999"], reason: "unknown or already settled delivery id" }
      })
      yield* sub.ack(first!.info!.deliveryId)
      const again = yield* sub.next()
      assert.deepStrictEqual(again.event?.$case === "settleError" ? again.event.value.deliveryIds : [], ["1"])
      yield* publishSchemas(env, ["u-2"])
      const [next] = yield* sub.deliveries(1)
      assert.strictEqual(next?.message?.id, "u-2")
    }))

  it.live("requests are settled in the order sent: an ack right behind a nack of the same id does not overtake it (acks settle inline, issue 14)", () =>
    Effect.gen(function*() {
      const env = yield* makeTestEnv()
      yield* publishSchemas(env, ["o-1"])
      const sub = yield* subscribeSchemas(env.client)
      const [first] = yield* sub.deliveries(1)
      const id = first!.info!.deliveryId
      // Back to back, in one go: the nack is queued (it moves a copy), so the ack must wait behind it.
      sub.call.write({ action: { $case: "nack", value: { deliveryIds: [id], ranges: [] } } })
      sub.call.write({ action: { $case: "ack", value: { deliveryIds: [id], ranges: [] } } })
      const error = yield* sub.next()
      assert.deepStrictEqual(error.event, {
        $case: "settleError",
        value: { deliveryIds: [id], reason: "unknown or already settled delivery id" }
      })
      const [again] = yield* sub.deliveries(1)
      assert.strictEqual(again?.message?.id, "o-1", "the nack won: the message came back")
      assert.strictEqual(again?.info?.redelivered, true)
      yield* sub.ack(again!.info!.deliveryId)
      yield* sub.settled
    }))

  it.live("100,000 unknown ids in one ack, and an ack of 20,000 one-id ranges: every unknown id is reported once, the ranged ones are acked, the subscription goes on (both were quadratic)", () =>
    Effect.gen(function*() {
      const env = yield* makeTestEnv()
      const ids = Array.from({ length: 40 }, (_, i) => `q-${i}`)
      yield* publishSchemas(env, ids)
      const sub = yield* subscribeSchemas(env.client, { maxInFlight: 40 })
      const got = yield* sub.deliveries(40)
      const unknown = Array.from({ length: 100_000 }, (_, i) => String(1_000_000 + i))
      sub.call.write({ action: { $case: "ack", value: { deliveryIds: unknown, ranges: [] } } })
      const reported: Array<string> = []
      while (reported.length < unknown.length) {
        const event = yield* sub.next()
        assert.strictEqual(event.event?.$case, "settleError")
        if (event.event?.$case === "settleError") reported.push(...event.event.value.deliveryIds)
      }
      assert.deepStrictEqual(reported, unknown)
      // 20,000 one-id ranges, of which the 40 pending ones are a small part, plus a range backwards.
      const ranges = Array.from({ length: 20_000 }, (_, i) => ({ first: String(20_000 - i), last: String(20_000 - i) }))
      yield* sub.send({ action: { $case: "ack", value: { deliveryIds: [], ranges: [...ranges, { first: "9", last: "3" }] } } })
      yield* sub.settled
      sub.call.end()
      assert.strictEqual((yield* sub.status).code, grpc.status.OK)
      const after = yield* waitForQueue(env.admin, env.names.schemas, (q) => q.consumerCount === 0)
      assert.strictEqual(after.messageCount, 0, `all ${got.length} acked through the ranges`)
    }))

  it.live("a message requeued more than MESSAGING_MAX_REQUEUES times is dead-lettered with its history", () =>
    Effect.gen(function*() {
      const env = yield* makeTestEnv({ MESSAGING_MAX_REQUEUES: "2" })
      yield* publishSchemas(env, ["poison"])
      const sub = yield* subscribeSchemas(env.client, { consumerName: "crashy" })
      const counts: Array<number> = []
      for (let i = 0; i < 3; i++) {
        const [d] = yield* sub.deliveries(1)
        counts.push(d!.info!.deliveryCount)
        yield* sub.nack(d!.info!.deliveryId)
      }
      assert.deepStrictEqual(counts, [1, 2, 3])
      yield* waitForQueue(env.admin, env.names.schemasDead, (q) => q.messageCount === 1)
      const dead = yield* Effect.promise(() => env.admin.channel.get(env.names.schemasDead, { noAck: true }))
      if (dead === false) return assert.fail("nothing dead-lettered")
      const headers = dead.properties.headers ?? {}
      assert.strictEqual(headers["x-dead-letter-reason"], "requeued more than 2 times")
      assert.strictEqual(headers["x-requeue-count"], 3)
      const history = headers["x-requeue-history"] as Array<unknown>
      assert.strictEqual(history.length, 3)
      for (const entry of history) assert.match(String(entry), /nacked by crashy$/)
      assert.strictEqual(headers["x-original-exchange"], env.names.exchange, "first origin kept")
      const source = yield* queueState(env.admin, env.names.schemas)
      assert.strictEqual(source.messageCount, 0, "not looping in the source queue")
    }))

  it.live("a subscriber that leaves holding what it never settled does not dead-letter it: 10 rounds of 32 in flight, one ack each (issue 10, fault 3)", () =>
    Effect.gen(function*() {
      const env = yield* makeTestEnv()
      const ids = Array.from({ length: 40 }, (_, i) => `r-${i}`)
      yield* publishSchemas(env, ids)
      const acked: Array<string> = []
      for (let round = 0; round < 10; round++) {
        const sub = yield* subscribeSchemas(env.client, { maxInFlight: 32 })
        const got = yield* sub.deliveries(Math.min(32, 40 - round))
        yield* sub.ack(got[0]!.info!.deliveryId)
        yield* sub.settled
        acked.push(got[0]!.message!.id)
        // The client leaves (its deadline, a restart) holding the rest, unsettled.
        sub.call.cancel()
        yield* waitForQueue(env.admin, env.names.schemas, (q) => q.consumerCount === 0 && q.messageCount === 39 - round)
      }
      // Only the delivery after the last one settled was counted each round (the one the client
      // was presumably working on): nothing reached the requeue limit, nothing was dead-lettered.
      assert.strictEqual((yield* waitForQueue(env.admin, env.names.schemasDead)).messageCount, 0)
      assert.strictEqual(new Set(acked).size, 10)
    }))

  it.live("max_in_flight bounds what the proxy holds; an ack lets the next one through", () =>
    Effect.gen(function*() {
      const env = yield* makeTestEnv()
      yield* publishSchemas(env, Array.from({ length: 10 }, (_, i) => `f-${i}`))
      const sub = yield* subscribeSchemas(env.client, { maxInFlight: 2 })
      const firstTwo = yield* sub.deliveries(2)
      const state = yield* waitForQueue(env.admin, env.names.schemas, (q) => q.messageCount === 8)
      assert.strictEqual(state.messageCount, 8, "the broker pushed only max_in_flight")
      yield* sub.ack(firstTwo[0]!.info!.deliveryId)
      const [third] = yield* sub.deliveries(1)
      assert.strictEqual(third?.message?.id, "f-2")
      yield* waitForQueue(env.admin, env.names.schemas, (q) => q.messageCount === 7)
    }))

  it.live("unsettled deliveries go back to the queue when the client cancels", () =>
    Effect.gen(function*() {
      const env = yield* makeTestEnv()
      yield* publishSchemas(env, ["x-1", "x-2", "x-3"])
      const first = yield* Effect.scoped(
        Effect.gen(function*() {
          const sub = yield* subscribeSchemas(env.client)
          const got = yield* sub.deliveries(3)
          yield* sub.ack(got[0]!.info!.deliveryId)
          yield* sub.settled
          return got
        })
      ) // scope close = client cancel
      assert.strictEqual(first.length, 3)
      yield* waitForQueue(env.admin, env.names.schemas, (q) => q.consumerCount === 0 && q.messageCount === 2)
      const sub = yield* subscribeSchemas(env.client)
      const again = yield* sub.deliveries(2)
      assert.deepStrictEqual(again.map((d) => d.message?.id).sort(), ["x-2", "x-3"])
      for (const d of again) {
        assert.isTrue(d.info?.redelivered, "flagged redelivered")
        assert.strictEqual(d.info?.deliveryCount, 2)
      }
    }))

  it.live("a first message other than open is refused with INVALID_ARGUMENT", () =>
    Effect.gen(function*() {
      const env = yield* makeTestEnv()
      const sub = yield* subscribeSchemas(env.client, null)
      yield* sub.ack("1")
      const status = yield* sub.status
      assert.strictEqual(status.code, grpc.status.INVALID_ARGUMENT)
      assert.strictEqual(status.details, "the first message must be `open`")
      const tooMany = yield* subscribeSchemas(env.client, { maxInFlight: 70000 })
      const refused = yield* tooMany.status
      assert.strictEqual(refused.code, grpc.status.INVALID_ARGUMENT)
      assert.match(refused.details, /max_in_flight must be at most 1024 \(MESSAGING_MAX_IN_FLIGHT\), got 70000/)
      for (const maxMessageBytes of [100, 4 * 1024 * 1024 - 1, 16 * 1024 * 1024 + 1]) {
        const badSize = yield* (yield* subscribeSchemas(env.client, { maxMessageBytes })).status
        assert.strictEqual(badSize.code, grpc.status.INVALID_ARGUMENT)
        assert.strictEqual(
          badSize.details,
          `max_message_bytes must be 0 (the server default) or between 4194304 (GRPC_CLIENT_MAX_RECEIVE_MESSAGE_BYTES) and 16777216 (GRPC_MAX_MESSAGE_BYTES), got ${maxMessageBytes}`
        )
      }
    }))

  it.live("the client's message size limit: 4 MiB unless open states another; a bigger message is dead-lettered, never sent (issue 10, fault 1)", () =>
    Effect.gen(function*() {
      const env = yield* makeTestEnv()
      const big = (id: string) => ({ ...schemaBody(id), import_name: "x".repeat(5 * 1024 * 1024) })
      yield* publishJson(env.admin, env.names.exchange, "schemas.*", big("big-1"))
      yield* publishJson(env.admin, env.names.exchange, "schemas.*", schemaBody("small-1"))
      // A default grpc-js client (4 MiB receive limit) and a default open.
      const sub = yield* subscribeSchemas(env.client)
      const [first] = yield* sub.deliveries(1)
      assert.strictEqual(first?.message?.id, "small-1")
      yield* sub.ack(first!.info!.deliveryId)
      yield* waitForQueue(env.admin, env.names.schemasDead, (q) => q.messageCount === 1)
      const dead = yield* Effect.promise(() => env.admin.channel.get(env.names.schemasDead, { noAck: true }))
      assert.notStrictEqual(dead, false)
      if (dead === false) return
      assert.match(
        String(dead.properties.headers?.["x-dead-letter-reason"]),
        /^too large for gRPC: \d+ bytes encoded, at most 4194240 can be sent \(GRPC_CLIENT_MAX_RECEIVE_MESSAGE_BYTES\)$/
      )
      // Gone before the next message, or it could take (and dead-letter) it.
      sub.call.cancel()
      yield* waitForQueue(env.admin, env.names.schemas, (q) => q.consumerCount === 0)

      // A client that takes 8 MiB and says so in open gets the same kind of message.
      const roomy = yield* Effect.acquireRelease(
        Effect.sync(() =>
          new MessagingServiceClient(`127.0.0.1:${env.port}`, grpc.credentials.createInsecure(), {
            "grpc.max_receive_message_length": 8 * 1024 * 1024
          })
        ),
        (client) => Effect.sync(() => client.close())
      )
      const large = yield* subscribeSchemas(roomy, { maxMessageBytes: 8 * 1024 * 1024 })
      const opened = yield* large.next()
      assert.strictEqual(opened.event?.$case === "opened" ? opened.event.value.maxMessageBytes : -1, 8 * 1024 * 1024)
      yield* publishJson(env.admin, env.names.exchange, "schemas.*", big("big-2"))
      const [got] = yield* large.deliveries(1)
      assert.strictEqual(got?.message?.id, "big-2")
      yield* large.ack(got!.info!.deliveryId)
      yield* large.settled
      assert.strictEqual((yield* waitForQueue(env.admin, env.names.schemasDead)).messageCount, 0)
    }))
})

describe("broker failures", () => {
  it.live("a cut broker connection: health goes NOT_SERVING and back, the same calls keep receiving", () =>
    Effect.gen(function*() {
      const relay = yield* startRelay()
      const env = yield* makeTestEnv({ RABBITMQ_PORT: String(relay.port) })
      const health = yield* healthClient(env.port)
      const sub = yield* subscribeSchemas(env.client)
      const stream = quiet(env.client.streamValidationMessages({}))
      yield* publishSchemas(env, ["before-1", "before-2"])
      const held = yield* sub.deliveries(2)
      yield* sub.ack(held[0]!.info!.deliveryId) // before-2 stays unacked across the cut
      yield* sub.settled
      yield* waitForQueue(env.admin, env.names.validations, (q) => q.consumerCount === 1)

      yield* relay.setRefusing(true)
      yield* relay.sever
      yield* waitForHealth(health, NOT_SERVING)
      yield* relay.setRefusing(false)
      yield* waitForHealth(health, SERVING)

      // The unacked one is redelivered, flagged, on the same call; new messages follow.
      yield* publishSchemas(env, ["after-1"])
      const after = yield* sub.deliveries(2)
      assert.deepStrictEqual(after.map((d) => d.message?.id).sort(), ["after-1", "before-2"])
      const redelivered = after.find((d) => d.message?.id === "before-2")
      assert.isTrue(redelivered?.info?.redelivered)
      assert.strictEqual(redelivered?.info?.deliveryCount, 2)
      yield* sub.ack(...idsOf(after))
      // The server stream re-attached too.
      yield* waitForQueue(env.admin, env.names.validations, (q) => q.consumerCount === 1)
      yield* publishJson(env.admin, env.names.exchange, "validation.*", { id: "v-after", task: "sample_validation" })
      const [v] = yield* readMessages(stream, 1)
      assert.strictEqual(v?.id, "v-after")
    }))

  it.live("a nack while the publishers' connection is away still requeues: a plain requeue, uncounted, since no copy can go out", () =>
    Effect.gen(function*() {
      const relay = yield* startRelay()
      const env = yield* makeTestEnv({ RABBITMQ_PORT: String(relay.port) })
      yield* publishSchemas(env, ["pc-1"])
      const sub = yield* subscribeSchemas(env.client)
      const [first] = yield* sub.deliveries(1)
      // Take only the publishers' connection away, and keep it away.
      yield* relay.setRefusing(true)
      assert.strictEqual(yield* relay.severWhereClientSent("(publishing)"), 1)
      yield* sub.nack(first!.info!.deliveryId)
      const [again] = yield* sub.deliveries(1)
      assert.deepStrictEqual([again?.message?.id, again?.info?.redelivered, again?.info?.deliveryCount], ["pc-1", true, 2])
      yield* sub.ack(again!.info!.deliveryId)
      yield* waitForQueue(env.admin, env.names.schemas, (q) => q.messageCount === 0 && q.consumerCount === 1)
    }))

  it.live("a queue deleted under a stream ends only that stream, with a precise status: the broker's cancel is followed by one re-attach, which finds the queue gone (NOT_FOUND)", () =>
    Effect.gen(function*() {
      const env = yield* makeTestEnv()
      const doomed = env.client.streamSchemaMessages({})
      const status = Effect.callback<grpc.ServiceError>((resume) => {
        doomed.on("error", (error: grpc.ServiceError) => resume(Effect.succeed(error)))
      })
      const survivor = quiet(env.client.streamValidationMessages({}))
      yield* waitForQueue(env.admin, env.names.schemas, (q) => q.consumerCount === 1)
      yield* waitForQueue(env.admin, env.names.validations, (q) => q.consumerCount === 1)
      yield* Effect.promise(() => env.admin.channel.deleteQueue(env.names.schemas))
      const error = yield* status
      assert.strictEqual(error.code, grpc.status.NOT_FOUND, error.details)
      assert.include(error.details, `'${env.names.schemas}'`)
      yield* publishJson(env.admin, env.names.exchange, "validation.*", { id: "still-here", task: "sample_validation" })
      const [v] = yield* readMessages(survivor, 1)
      assert.strictEqual(v?.id, "still-here")
    }))

  it.live("a channel the broker closes (consume from a missing queue) ends only that call: nothing is sent on it, so the connection stays", () =>
    Effect.gen(function*() {
      const env = yield* makeMetricsTestEnv()
      const metricsPort = Option.getOrElse(env.metricsPort, () => assert.fail("metrics are not served"))
      // The registry is process-global (other tests' proxies count too): compare with a baseline.
      const reconnects = Effect.map(scrape(metricsPort), ({ body }) =>
        sample(body, "messaging_proxy_broker_reconnects_total", { connection: "consumers" }))
      const survivor = quiet(env.client.streamSchemaMessages({}))
      yield* waitForQueue(env.admin, env.names.schemas, (q) => q.consumerCount === 1)
      const before = yield* reconnects
      yield* Effect.promise(() => env.admin.channel.deleteQueue(env.names.validations))
      // The broker answers basic.consume with a channel close (404). Any frame the proxy then sends
      // on that channel (basic.cancel, an ack, channel.close) makes the broker close the whole
      // connection with 504 CHANNEL_ERROR, and every other stream re-attach.
      for (let i = 0; i < 3; i++) {
        const refused = yield* Effect.callback<grpc.StatusObject>((resume) => {
          const call = env.client.streamValidationMessages({})
          call.on("error", () => undefined)
          call.on("status", (status: grpc.StatusObject) => resume(Effect.succeed(status)))
        })
        assert.strictEqual(refused.code, grpc.status.NOT_FOUND, refused.details)
      }
      yield* publishJson(env.admin, env.names.exchange, "schemas.*", schemaBody("after-404"))
      const [s] = yield* readMessages(survivor, 1)
      assert.strictEqual(s?.id, "after-404")
      // Had the connection been closed, the survivor could only have received after a reconnect.
      assert.strictEqual(yield* reconnects, before)
    }))
})
