/**
 * A memory alarm on a node of the local 3-node cluster (scripts/cluster.sh; never the shared
 * broker on 5672): RabbitMQ blocks every connection that publishes while it lasts. The proxy's
 * copies (counted requeues, dead-letters) go out on its publishers' connection, so the consumers'
 * connection is never blocked: deliveries and acks go on, health and metrics show the block, and
 * a message nacked (or rejected) during the alarm ends up in its queue (or .dead) exactly once
 * (issue 10, fault 6).
 * The watermark is restored whatever happens, so the next test finds the cluster as it was.
 */
import { assert, describe, it } from "@effect/vitest"
import * as grpc from "@grpc/grpc-js"
import { ConfigProvider, Context, Effect, Layer, Option } from "effect"
import { MessageKind, type ValidationMessageResponse } from "../gen/messaging.js"
import { ProxyLive } from "../src/app.js"
import { GrpcServer, publishingEntry } from "../src/grpcServer.js"
import { MetricsServer } from "../src/metrics.js"
import { schemaBody, validationBody } from "./fixtures/bodies.js"
import { clusterNodes, ensureCluster, nodeAmqpUrl, rabbitmqctl } from "./support/cluster.js"
import {
  grpcClient,
  makeAdmin,
  makeNames,
  proxyEnv,
  publishJson,
  readMessages,
  unary,
  waitForQueue
} from "./support/harness.js"
import { type HealthCheckRequest, type HealthCheckResponse, healthClient, NOT_SERVING, SERVING, waitForHealth } from "./support/health.js"
import { sample, scrapeUntil } from "./support/metrics.js"
import { subscribeSchemas } from "./support/subscriber.js"

/** The node the proxy is on and the alarm is raised on. */
const alarmed = clusterNodes[0]
const alarmedNode = `127.0.0.1:${alarmed.port}`

/** The watermark at which the node raises its memory alarm at once, and the default it goes back to. */
const watermark = (fraction: string) => rabbitmqctl(alarmed.index, "set_vm_memory_high_watermark", fraction)

/** The node's alarms (rabbit_alarm), as rabbitmqctl prints them. */
const alarms = rabbitmqctl(alarmed.index, "eval", "rabbit_alarm:get_alarms().")

/** Polls the node until its memory alarm is in (or out of) effect. */
const memoryAlarm = (on: boolean) =>
  Effect.gen(function*() {
    while (/memory/.test(yield* alarms) !== on) yield* Effect.sleep("100 millis")
  })

describe("a memory alarm (issue 10, fault 6)", () => {
  it.live("a nack during a memory alarm blocks no stream: deliveries and acks go on, health and metrics show the blocked publishers' connection, and a message nacked or rejected meanwhile exists exactly once afterwards", () =>
    Effect.gen(function*() {
      yield* ensureCluster
      const names = makeNames()
      // The test's own connection is on another node, and publishes only before the alarm.
      const admin = yield* makeAdmin(names, nodeAmqpUrl(2))
      const env = proxyEnv(names, { METRICS_HOST: "127.0.0.1", METRICS_PORT: "0", RABBITMQ_HOSTS: alarmedNode })
      const context = yield* Layer.buildWithScope(
        ProxyLive.pipe(Layer.provide(ConfigProvider.layer(ConfigProvider.fromUnknown(env)))),
        yield* Effect.scope
      )
      const port = Context.get(context, GrpcServer).port
      const metricsPort = Option.getOrElse(Context.get(context, MetricsServer).port, () => assert.fail("no metrics port"))
      yield* waitForQueue(admin, names.validationsDead)
      const client = yield* grpcClient(port)
      const health = yield* healthClient(port)
      const check = (service: string) =>
        unary<HealthCheckRequest, HealthCheckResponse>(health.check.bind(health), { service }).pipe(
          Effect.map((response) => response.status)
        )
      yield* waitForHealth(health, SERVING, publishingEntry)

      for (const id of ["victim", "s-2", "s-3", "s-4"]) yield* publishJson(admin, names.exchange, "schemas.*", schemaBody(id))
      for (const id of ["v-1", "v-2", "v-3"]) yield* publishJson(admin, names.exchange, "validation.*", validationBody(id))
      // One Publish through the proxy before the alarm: its publishing channel exists from then on.
      const publishValidation = (id: string) =>
        unary(client.publish.bind(client), {
          kind: MessageKind.MESSAGE_KIND_VALIDATION,
          body: Buffer.from(JSON.stringify(validationBody(id))),
          routingKey: ""
        })
      yield* publishValidation("v-0")
      const sub = yield* subscribeSchemas(client, { maxInFlight: 2, consumerName: "nacker" })
      const [victim, second] = yield* sub.deliveries(2)
      assert.deepStrictEqual([victim?.message?.id, second?.message?.id], ["victim", "s-2"])

      // The alarm, restored whatever happens (0.4 is RabbitMQ's default and the cluster's).
      yield* Effect.acquireRelease(watermark("0.0001"), () => Effect.orDie(watermark("0.4")))
      yield* memoryAlarm(true)

      // The nack's counted requeue is a copy: the broker blocks the connection it goes out on.
      yield* sub.nack(victim!.info!.deliveryId)
      // The same subscription goes on: an ack frees a slot, and the next message arrives.
      yield* sub.ack(second!.info!.deliveryId)
      const [third] = yield* sub.deliveries(1)
      assert.strictEqual(third?.message?.id, "s-3")
      // Another call opened during the alarm receives everything.
      const stream = client.streamValidationMessages({})
      const streamed = yield* readMessages(stream, 4)
      assert.deepStrictEqual(streamed.map((m: ValidationMessageResponse) => m.id).sort(), ["v-0", "v-1", "v-2", "v-3"])

      // Health: publishing is NOT_SERVING while blocked; the server and its queues stay SERVING.
      yield* waitForHealth(health, NOT_SERVING, publishingEntry)
      assert.strictEqual(yield* check(""), SERVING)
      assert.strictEqual(yield* check("messaging.MessagingService"), SERVING)
      assert.strictEqual(yield* check(names.schemas), SERVING)
      // Metrics: the publishers' connection is blocked, the consumers' is not.
      const blocked = (connection: string) => (body: string) =>
        sample(body, "messaging_proxy_broker_blocked", { connection, node: alarmedNode })
      const during = yield* scrapeUntil(metricsPort, (body) => blocked("publishers")(body) === 1)
      assert.strictEqual(blocked("publishers")(during), 1)
      assert.strictEqual(blocked("consumers")(during), 0)

      // A Publish while blocked: its confirm cannot come, and the wait for it ends (the channel's
      // confirm timeout, 30 s) with UNAVAILABLE saying the message may or may not be in the queue.
      // (A validation: once the alarm clears it is published after all, and the schemas queue's
      // counts below stay the subscription's.)
      const unconfirmed = yield* Effect.flip(publishValidation("during-alarm"))
      assert.strictEqual(unconfirmed.code, grpc.status.UNAVAILABLE)
      assert.match(unconfirmed.details, /no confirm from the broker for message 'during-alarm' within 30 s; it may or may not have been published/)

      // A nack now that the block is known: a plain requeue, back at once (uncounted, flagged).
      yield* sub.nack(third!.info!.deliveryId)
      const [thirdAgain] = yield* sub.deliveries(1)
      assert.deepStrictEqual(
        [thirdAgain?.message?.id, thirdAgain?.info?.redelivered, thirdAgain?.info?.deliveryCount],
        ["s-3", true, 2]
      )
      yield* sub.ack(thirdAgain!.info!.deliveryId)
      // A reject now: a dead-letter cannot fall back to a plain requeue (it would come straight
      // back), so it is held, unacked and not yet copied, until the alarm clears.
      const [fourth] = yield* sub.deliveries(1)
      assert.strictEqual(fourth?.message?.id, "s-4")
      yield* sub.send({ action: { $case: "reject", value: { deliveryIds: [fourth!.info!.deliveryId], reason: "rejected during the alarm" } } })
      yield* sub.settled
      assert.strictEqual((yield* waitForQueue(admin, names.schemasDead)).messageCount, 0)

      // The alarm clears: the victim's copy is confirmed and its original acked; it comes back once, counted.
      yield* watermark("0.4")
      yield* memoryAlarm(false)
      yield* waitForHealth(health, SERVING, publishingEntry)
      const after = yield* scrapeUntil(metricsPort, (body) => blocked("publishers")(body) === 0)
      assert.strictEqual(blocked("publishers")(after), 0)
      const [back] = yield* sub.deliveries(1)
      assert.deepStrictEqual([back?.message?.id, back?.info?.deliveryCount], ["victim", 2])
      yield* sub.ack(back!.info!.deliveryId)
      yield* sub.settled
      sub.call.end()
      assert.strictEqual((yield* sub.status).code, grpc.status.OK)

      // Exactly once: nothing left in the queue, no second copy; the rejected one is in .dead once.
      const schemas = yield* waitForQueue(admin, names.schemas, (q) => q.consumerCount === 0)
      assert.strictEqual(schemas.messageCount, 0)
      assert.strictEqual((yield* waitForQueue(admin, names.schemasDead, (q) => q.messageCount > 0)).messageCount, 1)
      const dead = yield* Effect.promise(() => admin.channel.get(names.schemasDead, { noAck: true }))
      if (dead === false) return assert.fail("nothing dead-lettered")
      assert.strictEqual(JSON.parse(dead.content.toString()).id, "s-4")
      assert.strictEqual(dead.properties.headers?.["x-dead-letter-reason"], "rejected during the alarm")
    }), 240_000)
})
