/**
 * The Prometheus endpoint, over the real broker and server: what a scrape serves, and that the
 * counters of this test's queue move by exactly what the traffic did. The metric registry is
 * process-global, so every assertion is on a series whose `queue` (random per test) or `method`
 * is this test's own, or on a delta from a baseline.
 */
import { assert, describe, it } from "@effect/vitest"
import * as grpc from "@grpc/grpc-js"
import { Effect, Exit, Layer, ConfigProvider, Option } from "effect"
import { randomBytes } from "node:crypto"
import { type AddressInfo, createServer, type Server } from "node:net"
import { ProxyLive } from "../src/app.js"
import * as Metrics from "../src/metrics.js"
import { schemaBody } from "./fixtures/bodies.js"
import { makeNames, proxyEnv, publishJson, publishRaw, queueState, quiet, waitForQueue } from "./support/harness.js"
import { makeMetricsTestEnv, sample, scrape, scrapeUntil } from "./support/metrics.js"
import { healthClient, SERVING, waitForHealth } from "./support/health.js"
import { startRelay } from "./support/relay.js"
import { subscribeSchemas } from "./support/subscriber.js"

const m = (name: string) => `messaging_proxy_${name}`

const metricsPortOf = (env: { metricsPort: Option.Option<number> }) =>
  Option.getOrElse(env.metricsPort, () => assert.fail("metrics are not served"))

const publishSchemas = (env: { admin: Parameters<typeof publishJson>[0]; names: { exchange: string } }, ids: Array<string>) =>
  Effect.forEach(ids, (id) => publishJson(env.admin, env.names.exchange, "schemas.*", schemaBody(id)), { discard: true })

/** A TCP server on a free loopback port, holding it until the scope closes. */
const holdPort = Effect.acquireRelease(
  Effect.callback<Server>((resume) => {
    const server = createServer()
    server.listen(0, "127.0.0.1", () => resume(Effect.succeed(server)))
  }),
  (server) => Effect.callback<void>((resume) => void server.close(() => resume(Effect.void)))
).pipe(Effect.map((server) => (server.address() as AddressInfo).port))

/** A loopback port that was free a moment ago. */
const freePort = Effect.scoped(holdPort)

describe("metrics endpoint", () => {
  it.live("GET /metrics: Prometheus text, broker connected, memory gauges, RPC outcomes", () =>
    Effect.gen(function*() {
      const env = yield* makeMetricsTestEnv()
      const port = metricsPortOf(env)
      assert.notStrictEqual(port, 0)
      const method = `TestMethod_${randomBytes(4).toString("hex")}`
      yield* Metrics.recordRpc(method, "OK", 0.02)
      yield* Metrics.recordRpc(method, "OK", 0.02)
      yield* Metrics.recordRpc(method, "UNAVAILABLE", 3)

      const up = (b: string) =>
        sample(b, m("broker_connected"), { connection: "consumers", node: "127.0.0.1:5672" }) === 1 &&
        sample(b, m("broker_connected"), { connection: "publishers", node: "127.0.0.1:5672" }) === 1
      const body = yield* scrapeUntil(port, up)
      const response = yield* scrape(port)
      assert.strictEqual(response.status, 200)
      assert.match(response.contentType ?? "", /^text\/plain; version=0\.0\.4/)
      assert.isTrue(up(body), "both broker connections are up")
      assert.include(body, `# TYPE ${m("broker_connected")} gauge`)
      assert.include(body, `# TYPE ${m("broker_reconnects_total")} counter`)
      assert.isAbove(sample(body, m("process_resident_memory_bytes")) ?? 0, 1024 * 1024)
      assert.isAbove(sample(body, m("process_heap_used_bytes")) ?? 0, 1024 * 1024)
      assert.include(body, `# TYPE ${m("process_resident_memory_bytes")} gauge`)

      assert.strictEqual(sample(body, m("rpc_requests_total"), { method, code: "OK" }), 2)
      assert.strictEqual(sample(body, m("rpc_requests_total"), { method, code: "UNAVAILABLE" }), 1)
      assert.include(body, `# TYPE ${m("rpc_duration_seconds")} histogram`)
      assert.strictEqual(sample(body, m("rpc_duration_seconds_count"), { method, code: "OK" }), 2)
      assert.closeTo(sample(body, m("rpc_duration_seconds_sum"), { method, code: "OK" }) ?? -1, 0.04, 1e-9)
      assert.strictEqual(sample(body, m("rpc_duration_seconds_bucket"), { method, code: "OK", le: "0.01" }), 0)
      assert.strictEqual(sample(body, m("rpc_duration_seconds_bucket"), { method, code: "OK", le: "0.025" }), 2)
      assert.strictEqual(sample(body, m("rpc_duration_seconds_bucket"), { method, code: "UNAVAILABLE", le: "2.5" }), 0)
      assert.strictEqual(sample(body, m("rpc_duration_seconds_bucket"), { method, code: "UNAVAILABLE", le: "5" }), 1)
      assert.strictEqual(sample(body, m("rpc_duration_seconds_bucket"), { method, code: "UNAVAILABLE", le: "+Inf" }), 1)

      assert.strictEqual((yield* scrape(port, "/other")).status, 404)
    }))

  it.live("a stream: delivered and malformed dead-lettered counted on its queue; active_streams up and back", () =>
    Effect.gen(function*() {
      // Acked once quiet right away: nothing is written after the 5th, so nothing else shows it read.
      const env = yield* makeMetricsTestEnv({ MESSAGING_QUIET_STREAM_ACK_SECONDS: "0" })
      const port = metricsPortOf(env)
      const queue = env.names.schemas
      const rpc = "StreamSchemaMessages"
      const active = (body: string) => sample(body, m("active_streams"), { rpc }) ?? 0
      const before = active((yield* scrape(port)).body)

      const call = quiet(env.client.streamSchemaMessages({}))
      yield* waitForQueue(env.admin, queue, (q) => q.consumerCount === 1)
      const during = yield* scrapeUntil(port, (b) => active(b) === before + 1)
      assert.strictEqual(active(during), before + 1, "the open stream is counted")

      // The malformed body first, so it is handled before the client cancels after the 5th.
      yield* publishRaw(env.admin, env.names.exchange, "schemas.*", Buffer.from("{not json"), { messageId: "bad" })
      yield* publishSchemas(env, ["s-1", "s-2", "s-3", "s-4", "s-5"])
      const got: Array<string> = []
      call.on("data", (message: { readonly id: string }) => got.push(message.id))

      const delivered = (body: string) => sample(body, m("messages_delivered_total"), { queue, rpc })
      const malformed = (body: string) =>
        sample(body, m("messages_dead_lettered_total"), { queue, reason_kind: "malformed" })
      const acked = yield* scrapeUntil(port, (b) => delivered(b) === 5 && malformed(b) === 1)
      assert.strictEqual(delivered(acked), 5)
      assert.strictEqual(malformed(acked), 1)
      assert.deepStrictEqual(got, ["s-1", "s-2", "s-3", "s-4", "s-5"])
      call.cancel()
      const after = yield* scrapeUntil(port, (b) => active(b) === before)
      assert.strictEqual(active(after), before, "the ended stream is no longer counted")
      assert.isUndefined(sample(after, m("messages_acked_total"), { queue }), "streams count as delivered only")
      assert.isUndefined(sample(after, m("messages_redelivered_total"), { queue }))
      yield* waitForQueue(env.admin, env.names.schemasDead, (q) => q.messageCount === 1)
    }))

  it.live("a subscription: 2 acked, 1 nacked (acked when it returns), 1 rejected", () =>
    Effect.gen(function*() {
      const env = yield* makeMetricsTestEnv()
      const port = metricsPortOf(env)
      const queue = env.names.schemas
      const rpc = "SubscribeSchemaMessages"
      const active = (body: string) => sample(body, m("active_streams"), { rpc }) ?? 0
      const before = active((yield* scrape(port)).body)

      yield* publishSchemas(env, ["a", "b", "c", "d"])
      const sub = yield* subscribeSchemas(env.client, { consumerName: "metrics" })
      const got = yield* sub.deliveries(4)
      assert.strictEqual(active((yield* scrape(port)).body), before + 1, "the open subscription is counted")
      const [a, b, c, d] = got.map((g) => g.info!.deliveryId)
      yield* sub.ack(a!, b!)
      yield* sub.nack(c!)
      yield* sub.send({ action: { $case: "reject", value: { deliveryIds: [d!], reason: "no" } } })
      const [again] = yield* sub.deliveries(1)
      assert.strictEqual(again?.message?.id, "c")
      yield* sub.ack(again!.info!.deliveryId)
      yield* sub.settled
      sub.call.end()
      assert.strictEqual((yield* sub.status).code, grpc.status.OK)

      const body = yield* scrapeUntil(port, (b) => active(b) === before)
      assert.strictEqual(sample(body, m("messages_delivered_total"), { queue, rpc }), 5, "4 + the nacked one again")
      assert.strictEqual(sample(body, m("messages_acked_total"), { queue }), 3)
      assert.strictEqual(sample(body, m("messages_nacked_total"), { queue }), 1)
      assert.strictEqual(sample(body, m("messages_dead_lettered_total"), { queue, reason_kind: "rejected" }), 1)
      assert.isUndefined(sample(body, m("messages_dead_lettered_total"), { queue, reason_kind: "requeue_limit" }))
      assert.isUndefined(sample(body, m("messages_dead_lettered_total"), { queue, reason_kind: "malformed" }))
      assert.isUndefined(sample(body, m("messages_redelivered_total"), { queue }))
      assert.strictEqual(active(body), before, "the ended subscription is no longer counted")
    }))

  it.live("a delivery a client had when it left is a counted requeue, the next one goes back uncounted (a broker redelivery); a nack past the limit is requeue_limit", () =>
    Effect.gen(function*() {
      const env = yield* makeMetricsTestEnv({ MESSAGING_MAX_REQUEUES: "1" })
      const port = metricsPortOf(env)
      const queue = env.names.schemas
      const rpc = "SubscribeSchemaMessages"
      yield* publishSchemas(env, ["r-1", "r-2"])
      yield* Effect.scoped(
        Effect.gen(function*() {
          const sub = yield* subscribeSchemas(env.client)
          yield* sub.deliveries(2)
        })
      ) // scope close = client cancel, nothing settled: r-1 (the one it was working on) is a
      // counted requeue (a copy at the back), r-2 may never have been read: the broker requeues it
      yield* waitForQueue(env.admin, queue, (q) => q.consumerCount === 0 && q.messageCount === 2)

      const sub = yield* subscribeSchemas(env.client)
      const got = yield* sub.deliveries(2)
      const byId = new Map(got.map((g) => [g.message?.id, g] as const))
      assert.deepStrictEqual(got.map((g) => g.message?.id), ["r-2", "r-1"])
      assert.deepStrictEqual(got.map((g) => [g.info?.deliveryCount, g.info?.redelivered]), [[2, true], [2, true]])
      yield* sub.nack(byId.get("r-1")!.info!.deliveryId) // a second counted requeue is one more than MESSAGING_MAX_REQUEUES=1
      yield* sub.ack(byId.get("r-2")!.info!.deliveryId)
      yield* sub.settled

      const body = yield* scrapeUntil(
        port,
        (b) => sample(b, m("messages_dead_lettered_total"), { queue, reason_kind: "requeue_limit" }) === 1
      )
      assert.strictEqual(sample(body, m("messages_redelivered_total"), { queue }), 1, "r-2, given back by the broker")
      assert.strictEqual(sample(body, m("messages_delivered_total"), { queue, rpc }), 4)
      assert.strictEqual(sample(body, m("messages_dead_lettered_total"), { queue, reason_kind: "requeue_limit" }), 1)
      assert.isUndefined(sample(body, m("messages_nacked_total"), { queue }), "not requeued, so not a nack count")
      assert.strictEqual(sample(body, m("messages_acked_total"), { queue }), 1)
    }))

  it.live("a cut broker connection: broker_connected drops to 0 and back, one reconnect counted", () =>
    Effect.gen(function*() {
      const relay = yield* startRelay()
      const env = yield* makeMetricsTestEnv({ RABBITMQ_PORT: String(relay.port) })
      const port = metricsPortOf(env)
      // The relay carries both connections; follow the consumers' one.
      const connected = (body: string) =>
        sample(body, m("broker_connected"), { connection: "consumers", node: `127.0.0.1:${relay.port}` })
      const reconnects = (body: string) => sample(body, m("broker_reconnects_total"), { connection: "consumers" }) ?? -1
      const before = yield* scrapeUntil(port, (b) => connected(b) === 1)
      assert.strictEqual(connected(before), 1)

      yield* relay.setRefusing(true)
      yield* relay.sever
      const down = yield* scrapeUntil(port, (b) => connected(b) === 0)
      assert.strictEqual(connected(down), 0)
      assert.strictEqual(reconnects(down), reconnects(before), "a loss alone is not a reconnect")
      yield* relay.setRefusing(false)
      const up = yield* scrapeUntil(port, (b) => connected(b) === 1)
      assert.strictEqual(connected(up), 1)
      assert.strictEqual(reconnects(up), reconnects(before) + 1)
    }))

  it.live("METRICS_ENABLED=false serves nothing", () =>
    Effect.gen(function*() {
      const port = yield* freePort
      const env = yield* makeMetricsTestEnv({ METRICS_ENABLED: "false", METRICS_PORT: String(port) })
      assert.isTrue(Option.isNone(env.metricsPort))
      const result = yield* Effect.exit(scrape(port))
      assert.isTrue(Exit.isFailure(result), "nothing listens on the metrics port")
    }))

  it.live("a metrics port already taken stops start-up with one clear error", () =>
    Effect.gen(function*() {
      const taken = yield* holdPort
      const names = makeNames()
      const env = proxyEnv(names, { METRICS_HOST: "127.0.0.1", METRICS_PORT: String(taken) })
      const exit = yield* Effect.exit(
        Effect.scoped(Layer.build(ProxyLive.pipe(Layer.provide(ConfigProvider.layer(ConfigProvider.fromUnknown(env))))))
      )
      assert.isTrue(Exit.isFailure(exit))
      const error = Exit.findErrorOption(exit as Exit.Exit<unknown, unknown>)
      assert.isTrue(Option.isSome(error))
      assert.match(
        error.pipe(Option.map((e) => (e as Error).message), Option.getOrElse(() => "")),
        new RegExp(`^bind metrics server to 127\\.0\\.0\\.1:${taken} failed: .*EADDRINUSE`)
      )
    }))
})

describe("dead-letter failures (issue 12)", () => {
  it.live("a dead-letter queue that refuses the copy (max-length 0, reject-publish): counted per queue, the message stays, the stream ends UNAVAILABLE", () =>
    Effect.gen(function*() {
      const env = yield* makeMetricsTestEnv({}, (names, admin) =>
        Effect.promise(() =>
          admin.channel.assertQueue(names.schemasDead, { durable: true, arguments: { "x-max-length": 0, "x-overflow": "reject-publish" } })
        ).pipe(Effect.asVoid))
      const port = Option.getOrThrow(env.metricsPort)
      const queue = env.names.schemas
      // The dead-letter queue existed before the proxy: wait for the rest of its topology.
      yield* waitForHealth(yield* healthClient(env.port), SERVING)
      yield* publishRaw(env.admin, env.names.exchange, "schemas.*", Buffer.from("{not json"), { messageId: "bad" })
      const status = yield* Effect.callback<grpc.StatusObject>((resume) => {
        const call = env.client.streamSchemaMessages({})
        call.on("error", () => undefined)
        call.on("data", () => undefined)
        call.on("status", (s: grpc.StatusObject) => resume(Effect.succeed(s)))
      })
      assert.strictEqual(status.code, grpc.status.UNAVAILABLE, status.details)
      const failures = (body: string) => sample(body, m("dead_letter_failures_total"), { queue })
      const body = yield* scrapeUntil(port, (b) => (failures(b) ?? 0) >= 1)
      assert.isAtLeast(failures(body) ?? 0, 1)
      assert.isUndefined(sample(body, m("messages_dead_lettered_total"), { queue, reason_kind: "malformed" }))
      // Nothing lost: the body is back in its queue once the stream's channel has closed.
      yield* waitForQueue(env.admin, queue, (q) => q.consumerCount === 0 && q.messageCount === 1)
      assert.strictEqual((yield* queueState(env.admin, env.names.schemasDead)).messageCount, 0)
    }))
})
