/**
 * Issue 11, parts 1 and 2: ack deadlines and lease extension on the acknowledged subscriptions.
 * Time passing is shown by events, not measured: a delivery whose deadline was not extended comes
 * back first, and that proves its deadline (and so the others' first one) has passed.
 */
import { assert, describe, it } from "@effect/vitest"
import * as grpc from "@grpc/grpc-js"
import { Effect } from "effect"
import { schemaBody } from "./fixtures/bodies.js"
import { makeTestEnv, publishJson, queueState, waitForQueue } from "./support/harness.js"
import { subscribeSchemas } from "./support/subscriber.js"

describe("ack deadlines (issue 11)", () => {
  it.live("a delivery past its deadline is requeued alone, counted; the subscription goes on; a late ack gets settle_error", () =>
    Effect.gen(function*() {
      const { names, client, admin } = yield* makeTestEnv()
      const sub = yield* subscribeSchemas(client, { maxInFlight: 10, ackDeadlineSeconds: 1 })
      const opened = yield* sub.next()
      assert.strictEqual(opened.event?.$case === "opened" && opened.event.value.ackDeadlineSeconds, 1)
      yield* publishJson(admin, names.exchange, "schemas.*", schemaBody("slow"))
      yield* publishJson(admin, names.exchange, "schemas.*", schemaBody("quick"))
      const [slow, quick] = yield* sub.deliveries(2)
      assert.deepStrictEqual([slow?.message?.id, quick?.message?.id], ["slow", "quick"])
      yield* sub.ack(quick!.info!.deliveryId)
      // The proxy hands "slow" back by itself; it comes to the same subscription again, counted.
      const [again] = yield* sub.deliveries(1)
      assert.strictEqual(again?.message?.id, "slow")
      assert.strictEqual(again?.info?.redelivered, true)
      assert.strictEqual(again?.info?.deliveryCount, 2)
      // The late ack of the first delivery is refused with the reason; the new one is acked.
      yield* sub.ack(slow!.info!.deliveryId)
      const late = yield* sub.next()
      assert.strictEqual(late.event?.$case, "settleError")
      if (late.event?.$case !== "settleError") return
      assert.deepStrictEqual(late.event.value.deliveryIds, [slow!.info!.deliveryId])
      assert.match(late.event.value.reason, /ack deadline of 1 s expired/)
      yield* sub.ack(again!.info!.deliveryId)
      yield* sub.settled
      yield* waitForQueue(admin, names.schemas, (q) => q.messageCount === 0)
    }))

  it.live("extend keeps a delivery past its first deadline", () =>
    Effect.gen(function*() {
      const { names, client, admin } = yield* makeTestEnv()
      const sub = yield* subscribeSchemas(client, { maxInFlight: 10, ackDeadlineSeconds: 1 })
      yield* sub.next() // opened
      yield* publishJson(admin, names.exchange, "schemas.*", schemaBody("leased"))
      yield* publishJson(admin, names.exchange, "schemas.*", schemaBody("unleased"))
      const [leased, unleased] = yield* sub.deliveries(2)
      yield* sub.send({ action: { $case: "extend", value: { deliveryIds: [leased!.info!.deliveryId], seconds: 600 } } })
      // "unleased" came after "leased" and was not extended: its return shows that leased's first
      // deadline has passed too.
      const [back] = yield* sub.deliveries(1)
      assert.strictEqual(back?.message?.id, "unleased")
      yield* sub.ack(leased!.info!.deliveryId, back!.info!.deliveryId)
      yield* sub.settled
      yield* waitForQueue(admin, names.schemas, (q) => q.messageCount === 0)
      assert.strictEqual(unleased?.message?.id, "unleased")
    }))

  it.live("extend of unknown ids gets settle_error; a deadline over the maximum is refused at open", () =>
    Effect.gen(function*() {
      const { client } = yield* makeTestEnv({ MESSAGING_MAX_ACK_DEADLINE_SECONDS: "60", MESSAGING_ACK_DEADLINE_SECONDS: "30" })
      const sub = yield* subscribeSchemas(client, {})
      const opened = yield* sub.next()
      assert.strictEqual(opened.event?.$case === "opened" && opened.event.value.ackDeadlineSeconds, 30)
      yield* sub.send({ action: { $case: "extend", value: { deliveryIds: ["42"], seconds: 10 } } })
      const refused = yield* sub.next()
      assert.deepStrictEqual(refused.event, {
        $case: "settleError",
        value: { deliveryIds: ["42"], reason: "unknown or already settled delivery id" }
      })
      const tooLong = yield* subscribeSchemas(client, { ackDeadlineSeconds: 61 })
      const status = yield* tooLong.status
      assert.strictEqual(status.code, grpc.status.INVALID_ARGUMENT)
      assert.match(status.details, /ack_deadline_seconds must be at most 60 \(MESSAGING_MAX_ACK_DEADLINE_SECONDS\), got 61/)
    }))

  it.live("a reject followed at once by a half-close is done before the call ends: the message is in .dead", () =>
    Effect.gen(function*() {
      const { names, client, admin } = yield* makeTestEnv()
      const sub = yield* subscribeSchemas(client, { maxInFlight: 1 })
      yield* publishJson(admin, names.exchange, "schemas.*", schemaBody("bad-file"))
      const [delivery] = yield* sub.deliveries(1)
      yield* sub.send({ action: { $case: "reject", value: { deliveryIds: [delivery!.info!.deliveryId], reason: "unreadable" } } })
      sub.call.end()
      const ended = yield* sub.status
      assert.strictEqual(ended.code, grpc.status.OK)
      // Before: the half-close ended the call and interrupted the move; the message went back.
      const dead = yield* queueState(admin, names.schemasDead)
      assert.strictEqual(dead.messageCount, 1)
    }))
})
