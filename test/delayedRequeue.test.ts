/**
 * Nack with delay (issue 11, part 4): delay tiers, their queues (declared idempotently, with
 * their TTL and dead-lettering back to the source queue), and `nack_delayed` end to end through a
 * subscription: the message comes back no sooner than its tier, counted like a nack, flagged
 * redelivered, and past MESSAGING_MAX_REQUEUES it is dead-lettered instead. Real broker (3.10.8
 * here), real gRPC server over loopback; short tiers (1s,2s).
 */
import { assert, describe, it } from "@effect/vitest"
import type * as amqp from "amqplib"
import { Duration, Effect } from "effect"
import { performance } from "node:perf_hooks"
import { delayQueueFor, delayQueueOptions, delayQueues, tierFor, tierLabel } from "../src/broker/delayQueues.js"
import type { ProxySettings } from "../src/config.js"
import { schemaBody } from "./fixtures/bodies.js"
import {
  type Admin,
  delayQueuesOf,
  grpcClient,
  makeAdmin,
  makeNames,
  makeTestEnv,
  publishJson,
  queueState,
  startProxy,
  type TestNames,
  unary,
  waitForQueue
} from "./support/harness.js"
import { subscribeSchemas } from "./support/subscriber.js"
import type { GetQueueInfoRequest, GetQueueInfoResponse, SubscriptionRequest } from "../gen/messaging.js"

const tiers = [Duration.seconds(1), Duration.seconds(2)]
const shortTiers = { MESSAGING_RETRY_DELAYS: "1s,2s" }

/** Just what delayQueues.ts reads of the settings. */
const rabbitOf = (names: TestNames, queueType: "classic" | "quorum") =>
  ({
    queueType,
    schemas: { queue: names.schemas, routingKey: "schemas.*" },
    validations: { queue: names.validations, routingKey: "validation.*" }
  }) as unknown as ProxySettings["rabbit"]

/**
 * Declares `queue` with `options` on a throwaway channel (a 406 closes it): "equivalent" when the
 * broker accepts it as it is, else the broker's words. The passive-declare-by-406 trick: a
 * declaration with the same arguments is accepted only if the queue has exactly those.
 */
const declareAs = (admin: Admin, queue: string, options: amqp.Options.AssertQueue) =>
  Effect.promise(async () => {
    const channel = await admin.connection.createChannel()
    channel.on("error", () => undefined)
    try {
      await channel.assertQueue(queue, options)
      return "equivalent"
    } catch (error) {
      return String(error instanceof Error ? error.message : error)
    } finally {
      await channel.close().catch(() => undefined)
    }
  })

const publishSchema = (admin: Admin, names: TestNames, id: string) =>
  publishJson(admin, names.exchange, "schemas.*", schemaBody(id))

const nackDelayed = (deliveryId: string, delayMs: number): SubscriptionRequest => ({
  action: { $case: "nackDelayed", value: { deliveryIds: [deliveryId], delayMs } }
})

describe("delay tiers", () => {
  it("a delay rounds up to the next tier; above the largest, the largest", () => {
    const ms = (delay: number) => Duration.toMillis(tierFor(tiers, Duration.millis(delay)))
    assert.deepStrictEqual([0, 1, 1000, 1001, 2000, 2001, 3_600_000].map(ms), [1000, 1000, 1000, 2000, 2000, 2000, 2000])
  })

  it("names a tier by the largest unit that divides it", () => {
    assert.deepStrictEqual(
      [1000, 5000, 30_000, 120_000, 600_000, 3_600_000, 90_000, 1500, 5_400_000].map((ms) => tierLabel(Duration.millis(ms))),
      ["1s", "5s", "30s", "2m", "10m", "1h", "90s", "1500ms", "90m"]
    )
    assert.strictEqual(delayQueueFor("q", tiers, Duration.millis(1500)).queue, "q.retry.2s")
  })

  it("classic tiers: TTL and dead-lettering back to the source only; quorum tiers add at-least-once dead-lettering", () => {
    const names = makeNames()
    const [classic] = delayQueues(rabbitOf(names, "classic"), tiers)
    assert.deepStrictEqual(delayQueueOptions(rabbitOf(names, "classic"), classic!), {
      durable: true,
      arguments: { "x-message-ttl": 1000, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": names.schemas }
    })
    assert.deepStrictEqual(delayQueueOptions(rabbitOf(names, "quorum"), classic!).arguments, {
      "x-queue-type": "quorum",
      "x-dead-letter-strategy": "at-least-once",
      "x-overflow": "reject-publish",
      "x-message-ttl": 1000,
      "x-dead-letter-exchange": "",
      "x-dead-letter-routing-key": names.schemas
    })
  })
})

describe("delay queues on the broker", () => {
  it.live.each(["classic", "quorum"] as const)("%s: declared at start-up with their arguments, again by a second proxy without complaint", (queueType) =>
    Effect.gen(function*() {
      const names = makeNames()
      const admin = yield* makeAdmin(names)
      const env = { ...shortTiers, RABBITMQ_QUEUE_TYPE: queueType }
      yield* startProxy(names, env)
      const expected = delayQueues(rabbitOf(names, queueType), tiers)
      // The harness deletes exactly these.
      assert.deepStrictEqual(expected.map((d) => d.queue).sort(), delayQueuesOf(names, "1s,2s").sort())
      for (const delay of expected) yield* waitForQueue(admin, delay.queue)
      // A second proxy on the same names declares them again: idempotent.
      yield* startProxy(names, env)
      yield* waitForQueue(admin, expected.at(-1)!.queue)
      for (const delay of expected) {
        const options = delayQueueOptions(rabbitOf(names, queueType), delay)
        // Exactly these arguments: the same declaration is accepted …
        assert.strictEqual(yield* declareAs(admin, delay.queue, options), "equivalent", delay.queue)
        // … and one TTL off is refused, naming the TTL the queue has.
        const ttl = Duration.toMillis(delay.tier)
        const refused = yield* declareAs(admin, delay.queue, { ...options, arguments: { ...options.arguments, "x-message-ttl": ttl + 1 } })
        assert.include(refused, "PRECONDITION_FAILED")
        assert.include(refused, `received '${ttl + 1}' but current is '${ttl}'`)
      }
    }))

  it.live("an existing delay queue with other arguments does not stop start-up: it is used as it is, and GetQueueInfo lists the tiers", () =>
    Effect.gen(function*() {
      const names = makeNames()
      const admin = yield* makeAdmin(names)
      const taken = `${names.schemas}.retry.1s`
      yield* declareAs(admin, taken, { durable: true, arguments: { "x-message-ttl": 5000 } })
      const port = yield* startProxy(names, shortTiers)
      yield* waitForQueue(admin, `${names.validations}.retry.2s`)
      assert.include(yield* declareAs(admin, taken, { durable: true, arguments: { "x-message-ttl": 1000 } }), "current is '5000'")
      const client = yield* grpcClient(port)
      const info = yield* unary<GetQueueInfoRequest, GetQueueInfoResponse>(client.getQueueInfo.bind(client), {})
      assert.deepStrictEqual(info.queues.slice(6).map((q) => [q.role, q.queue, q.available]), [
        ["schemas_retry_1s", taken, true],
        ["schemas_retry_2s", `${names.schemas}.retry.2s`, true],
        ["validations_retry_1s", `${names.validations}.retry.1s`, true],
        ["validations_retry_2s", `${names.validations}.retry.2s`, true]
      ])
    }))
})

describe("nack_delayed through a subscription", () => {
  it.live.each(["classic", "quorum"] as const)("%s: back no sooner than its tier, counted and flagged redelivered; the copy waited in the tier's queue", (queueType) =>
    Effect.gen(function*() {
      const env = yield* makeTestEnv({ ...shortTiers, RABBITMQ_QUEUE_TYPE: queueType })
      const { names, admin } = env
      const tierQueue = `${names.schemas}.retry.2s`
      yield* publishSchema(admin, names, "later")
      const sub = yield* subscribeSchemas(env.client, { consumerName: "retrier" })
      const [first] = yield* sub.deliveries(1)
      assert.deepStrictEqual(first?.info, { deliveryId: "1", redelivered: false, deliveryCount: 1 })
      // 1.5 s rounds up to the 2 s tier. Measured from before the nack: the tier's TTL starts when
      // the broker enqueues the copy, which is after this and before its confirm.
      const nackedAt = performance.now()
      yield* sub.send(nackDelayed("1", 1500))
      // The copy waits in the 2 s tier's queue (the subscription moves it in the background).
      yield* waitForQueue(admin, tierQueue, (q) => q.messageCount === 1)
      const movedAt = performance.now()
      assert.strictEqual((yield* queueState(admin, names.schemas)).messageCount, 0)
      const [second] = yield* sub.deliveries(1)
      const backAt = performance.now()
      assert.strictEqual(second?.message?.id, "later")
      assert.deepStrictEqual(second?.info, { deliveryId: "2", redelivered: true, deliveryCount: 2 })
      assert.isAtLeast(backAt - nackedAt, 2000, "no sooner than the tier")
      yield* Effect.logInfo("nack_delayed measured", {
        queueType,
        tierMs: 2000,
        seenInTierQueueMs: Math.round(movedAt - nackedAt),
        backAfterNackMs: Math.round(backAt - nackedAt),
        backAfterSeenMs: Math.round(backAt - movedAt)
      })
      yield* sub.ack("2")
      yield* sub.settled
      assert.strictEqual((yield* queueState(admin, tierQueue)).messageCount, 0)
      assert.strictEqual((yield* queueState(admin, names.schemasDead)).messageCount, 0)
    }))

  it.live("the poison limit counts delayed nacks (and plain ones): past MESSAGING_MAX_REQUEUES it goes to .dead with the reason, not to the delay queue", () =>
    Effect.gen(function*() {
      const env = yield* makeTestEnv({ ...shortTiers, MESSAGING_MAX_REQUEUES: "3" })
      const { names, admin } = env
      yield* publishSchema(admin, names, "poison")
      const sub = yield* subscribeSchemas(env.client, { consumerName: "crashy" })
      const seen: Array<[number, boolean]> = []
      // Delayed (1 s) twice through the same tier, plain, then delayed: the fourth requeue is past the limit of 3.
      for (const how of ["delayed", "delayed", "plain", "delayed"] as const) {
        const [d] = yield* sub.deliveries(1)
        seen.push([d!.info!.deliveryCount, d!.info!.redelivered])
        if (how === "plain") yield* sub.nack(d!.info!.deliveryId)
        else yield* sub.send(nackDelayed(d!.info!.deliveryId, 1000))
      }
      assert.deepStrictEqual(seen, [[1, false], [2, true], [3, true], [4, true]])

      yield* waitForQueue(admin, names.schemasDead, (q) => q.messageCount === 1)
      assert.strictEqual((yield* queueState(admin, `${names.schemas}.retry.1s`)).messageCount, 0, "not sent to wait")
      assert.strictEqual((yield* queueState(admin, names.schemas)).messageCount, 0)
      const dead = yield* Effect.promise(() => admin.channel.get(names.schemasDead, { noAck: true }))
      if (dead === false) return assert.fail("nothing dead-lettered")
      const headers = dead.properties.headers ?? {}
      assert.strictEqual(headers["x-dead-letter-reason"], "requeued more than 3 times")
      assert.strictEqual(headers["x-requeue-count"], 4)
      const history = (headers["x-requeue-history"] as Array<unknown>).map(String)
      assert.strictEqual(history.length, 4)
      assert.match(history[0]!, /nacked by crashy with a delay of 1000 ms \(delay 1000 ms, tier 1s\)$/)
      assert.match(history[1]!, /with a delay of 1000 ms/)
      assert.match(history[2]!, /nacked by crashy$/)
      assert.match(history[3]!, /with a delay of 1000 ms/)
      // Two trips through the same delay queue: the broker's own record (a second expiry from the
      // same queue is no dead-letter cycle, since the target, the source queue, is not in it).
      const deaths = headers["x-death"] as unknown as Array<Record<string, unknown>>
      assert.deepStrictEqual(deaths.map((d) => [d["queue"], d["reason"], d["count"]]), [[`${names.schemas}.retry.1s`, "expired", 2]])
    }))

  it.live("MESSAGING_NACK_BACKOFF delays plain nacks, growing with the requeues: 1 s, then 2 s", () =>
    Effect.gen(function*() {
      const env = yield* makeTestEnv({ ...shortTiers, MESSAGING_NACK_BACKOFF: "1s*2" })
      const { names, admin } = env
      yield* publishSchema(admin, names, "flaky")
      const sub = yield* subscribeSchemas(env.client, { consumerName: "backoff" })
      const [first] = yield* sub.deliveries(1)
      yield* sub.nack(first!.info!.deliveryId)
      // The first plain nack waits in the 1 s tier, the second (one requeue so far) in the 2 s one.
      yield* waitForQueue(admin, `${names.schemas}.retry.1s`, (q) => q.messageCount === 1)
      const [second] = yield* sub.deliveries(1)
      assert.deepStrictEqual([second!.info!.deliveryCount, second!.info!.redelivered], [2, true])
      yield* sub.nack(second!.info!.deliveryId)
      yield* waitForQueue(admin, `${names.schemas}.retry.2s`, (q) => q.messageCount === 1)
      const [third] = yield* sub.deliveries(1)
      assert.strictEqual(third!.info!.deliveryCount, 3)
      yield* sub.ack(third!.info!.deliveryId)
      yield* sub.settled
      yield* waitForQueue(admin, names.schemas, (q) => q.messageCount === 0)
    }))

  it.live("a delay queue deleted behind the proxy's back is declared again before the copy goes in", () =>
    Effect.gen(function*() {
      const env = yield* makeTestEnv(shortTiers)
      const { names, admin } = env
      const tierQueue = `${names.schemas}.retry.1s`
      yield* Effect.promise(() => admin.channel.deleteQueue(tierQueue))
      yield* publishSchema(admin, names, "kept")
      const sub = yield* subscribeSchemas(env.client)
      const [first] = yield* sub.deliveries(1)
      yield* sub.send(nackDelayed(first!.info!.deliveryId, 1))
      const [back] = yield* sub.deliveries(1)
      assert.strictEqual(back?.message?.id, "kept")
      assert.strictEqual(back?.info?.deliveryCount, 2)
      assert.strictEqual(yield* declareAs(admin, tierQueue, delayQueueOptions(rabbitOf(names, "classic"), delayQueueFor(names.schemas, tiers, Duration.seconds(1)))), "equivalent")
    }))
})
