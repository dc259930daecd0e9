/**
 * Metrics: Effect `Metric`s for what the proxy moves, exported in the Prometheus text format by
 * `effect/observability`'s `PrometheusMetrics.layerHttp` on an Effect HTTP router served by
 * `NodeHttpServer` (GET /metrics on METRICS_HOST:METRICS_PORT, unless METRICS_ENABLED=false).
 *
 * Every series lives in the process-global metric registry (the default of `Metric.MetricRegistry`,
 * which the proxy never overrides). Call sites are one line: Effect helpers (`delivered`, `acked`,
 * …) where the code is an Effect, and `…Unsafe` twins for grpc-js callbacks and `Effect.sync`
 * blocks. Each metric instance is built once per attribute set and kept in a Map, so the hot path
 * is a Map lookup plus the registry's own lookup by a precomputed key (`withAttributes` would
 * allocate a new context on every update).
 */
import { NodeHttpServer } from "@effect/platform-node"
import { Context, Data, Effect, Layer, Metric, Option, type Scope } from "effect"
import { HttpRouter, HttpServer } from "effect/http"
import { PrometheusMetrics } from "effect/observability"
import { createServer } from "node:http"
import { ProxyConfig } from "./config.js"
import { describe } from "./errors.js"

const prefix = "messaging_proxy_"

/** Why a message went to the dead-letter queue. */
export type DeadLetterKind = "delivery_limit" | "malformed" | "rejected" | "requeue_limit" | "too_large"

/** One metric instance per attribute set, built on first use. */
const perKey = <M>(make: (key: string) => M): (key: string) => M => {
  const instances = new Map<string, M>()
  return (key) => {
    let instance = instances.get(key)
    if (instance === undefined) {
      instance = make(key)
      instances.set(key, instance)
    }
    return instance
  }
}

/** Attribute values never contain NUL, so it separates the parts of a two-attribute key. */
const sep = "\u0000"
const split2 = (key: string): [string, string] => {
  const at = key.indexOf(sep)
  return [key.slice(0, at), key.slice(at + 1)]
}

const counter = (name: string, description: string, attributes?: Metric.Metric.AttributeSet) =>
  Metric.counter(prefix + name, { description, incremental: true, attributes })

const deliveredMetric = perKey((key) => {
  const [queue, rpc] = split2(key)
  return counter("messages_delivered_total", "messages a client took and the proxy acked (streams: shown read, or written before the stream went quiet)", { queue, rpc })
})
const ackedMetric = perKey((queue) => counter("messages_acked_total", "subscription deliveries acked by the client", { queue }))
const nackedMetric = perKey((queue) =>
  counter("messages_nacked_total", "subscription deliveries nacked by the client and requeued", { queue })
)
const deadLetteredMetric = perKey((key) => {
  const [queue, reason_kind] = split2(key)
  return counter("messages_dead_lettered_total", "messages moved to the dead-letter queue", { queue, reason_kind })
})
const deadLetterFailuresMetric = perKey((queue) =>
  counter(
    "dead_letter_failures_total",
    "dead-letters that failed (the dead-letter queue refused the copy, e.g. max-length with reject-publish): the message stayed in its queue",
    { queue }
  )
)
const redeliveredMetric = perKey((queue) =>
  counter("messages_redelivered_total", "deliveries the broker flagged as redelivered", { queue })
)
const activeStreamsMetric = perKey((rpc) =>
  Metric.gauge(prefix + "active_streams", { description: "open streaming calls (streams and subscriptions)", attributes: { rpc } })
)
const brokerConnectedMetric = perKey((key) => {
  const [connection, node] = split2(key)
  return Metric.gauge(prefix + "broker_connected", {
    description: "1 while the broker connection is up on that node (0 for a node it was on before)",
    attributes: { connection, node }
  })
})
const brokerBlockedMetric = perKey((key) => {
  const [connection, node] = split2(key)
  return Metric.gauge(prefix + "broker_blocked", {
    description: "1 while the broker blocks that connection (connection.blocked: a memory or disk alarm), else 0",
    attributes: { connection, node }
  })
})
const brokerReconnectsMetric = perKey((connection) =>
  counter("broker_reconnects_total", "broker connections re-established after a loss", { connection })
)
const brokerConnectFailuresMetric = perKey((key) => {
  const [connection, reason] = split2(key)
  return counter(
    "broker_connect_failures_total",
    "failed attempts to connect to the broker, by reason: unreachable, credentials_refused, vhost_not_found, vhost_access_refused, tls_failed, other",
    { connection, reason }
  )
})
const rateLimitedMetric = perKey((limit) =>
  counter("rate_limited_total", "calls or messages refused with RESOURCE_EXHAUSTED by a rate limit", { limit })
)
const rpcRequestsMetric = perKey((key) => {
  const [method, code] = split2(key)
  return counter("rpc_requests_total", "gRPC calls by method and final status code", { method, code })
})
const rpcDurationBoundaries = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600]
const rpcDurationMetric = perKey((key) => {
  const [method, code] = split2(key)
  return Metric.histogram(prefix + "rpc_duration_seconds", {
    description: "gRPC call duration in seconds (streams: until the call ends)",
    boundaries: rpcDurationBoundaries,
    attributes: { method, code }
  })
})
const residentMemoryMetric = Metric.gauge(prefix + "process_resident_memory_bytes", {
  description: "resident set size of the process, sampled at scrape"
})
const heapUsedMetric = Metric.gauge(prefix + "process_heap_used_bytes", {
  description: "V8 heap in use, sampled at scrape"
})

/** For updates outside a fiber: the default context resolves to the same global registry. */
const globalContext = Context.empty()

// --- call-site helpers -------------------------------------------------------------------------

/** The RPC's short name ("StreamSchemaMessages") from the call's path. */
export const rpcName = (call: { getPath(): string }): string => {
  const path = call.getPath()
  return path.slice(path.lastIndexOf("/") + 1)
}

export const deliveredUnsafe = (queue: string, rpc: string, count = 1): void =>
  deliveredMetric(queue + sep + rpc).updateUnsafe(count, globalContext)

export const ackedUnsafe = (queue: string): void => ackedMetric(queue).updateUnsafe(1, globalContext)

/** A client nack that requeued the message (past the requeue limit it counts as dead-lettered). */
export const nackedUnsafe = (queue: string): void => nackedMetric(queue).updateUnsafe(1, globalContext)

export const deadLettered = (queue: string, kind: DeadLetterKind): Effect.Effect<void> =>
  Metric.update(deadLetteredMetric(queue + sep + kind), 1)

/** A call or message refused by the rate limit `limit` (its variable's name). */
export const rateLimited = (limit: string): Effect.Effect<void> => Metric.update(rateLimitedMetric(limit), 1)

/** A dead-letter of a message of `queue` that failed: the message stayed in `queue`. */
export const deadLetterFailed = (queue: string): Effect.Effect<void> => Metric.update(deadLetterFailuresMetric(queue), 1)

/** A delivery the broker flagged as redelivered (a consumer before it was lost or let go). */
export const redeliveredUnsafe = (queue: string): void => redeliveredMetric(queue).updateUnsafe(1, globalContext)

/** Counts the call as an open stream while `self` runs. */
export const trackActiveStream = (rpc: string) => <A, E, R>(self: Effect.Effect<A, E, R>): Effect.Effect<A, E, R> => {
  const gauge = activeStreamsMetric(rpc)
  return Effect.acquireUseRelease(Metric.modify(gauge, 1), () => self, () => Metric.modify(gauge, -1))
}

/** One gRPC call's outcome: `code` is the status name ("OK", "UNAVAILABLE", …). */
export const recordRpc = (method: string, code: string, durationSeconds: number): Effect.Effect<void> => {
  const key = method + sep + code
  return Effect.andThen(Metric.update(rpcRequestsMetric(key), 1), Metric.update(rpcDurationMetric(key), durationSeconds))
}

/**
 * One broker connection's gauges and reconnect counter (label `connection`; the gauges also name
 * the `node`): `connected(node)` after each (re)connect (every one after the first counts as a
 * reconnect), `blocked(node, on)` when the broker blocks or unblocks it, `lost(node)` when it
 * drops. Gauges read 0 from here on and again when the scope closes.
 */
export const trackBrokerConnection = (connection: string): Effect.Effect<
  {
    readonly connected: (node: string) => Effect.Effect<void>
    readonly blocked: (node: string, on: boolean) => Effect.Effect<void>
    readonly lost: (node: string) => Effect.Effect<void>
    /** One failed attempt to connect, and why (refusal.ts). */
    readonly failed: (reason: string) => Effect.Effect<void>
  },
  never,
  Scope.Scope
> =>
  Effect.gen(function*() {
    let connectedBefore = false
    const nodesSeen = new Set<string>()
    const reconnects = brokerReconnectsMetric(connection)
    const blocked = (node: string, on: boolean) => Metric.update(brokerBlockedMetric(connection + sep + node), on ? 1 : 0)
    // A connection that is gone is blocked no more: its next one starts unblocked.
    const lost = (node: string) =>
      Metric.update(brokerConnectedMetric(connection + sep + node), 0).pipe(Effect.andThen(blocked(node, false)))
    yield* Metric.update(reconnects, 0) // present from the start, at 0
    yield* Effect.addFinalizer(() => Effect.forEach([...nodesSeen], lost, { discard: true }))
    const connected = (node: string) =>
      Effect.suspend(() => {
        const reconnect = connectedBefore
        connectedBefore = true
        nodesSeen.add(node)
        return Metric.update(brokerConnectedMetric(connection + sep + node), 1).pipe(
          Effect.andThen(reconnect ? Metric.update(reconnects, 1) : Effect.void)
        )
      })
    const failed = (reason: string) => Metric.update(brokerConnectFailuresMetric(connection + sep + reason), 1)
    return { connected, blocked, lost, failed }
  })

// --- exporter -------------------------------------------------------------------------------------

export class MetricsServer extends Context.Service<MetricsServer, {
  /** The bound port (differs from the configured one when that is 0); None when metrics are off. */
  readonly port: Option.Option<number>
}>()("messaging-proxy/MetricsServer") {}

export class MetricsBindError extends Data.TaggedError("MetricsBindError")<{
  readonly address: string
  readonly cause: unknown
}> {
  override get message(): string {
    return `bind metrics server to ${this.address} failed: ${describe(this.cause)}`
  }
}

/** The memory gauges read the process when scraped; removed again when the scope closes. */
const registerProcessGauges = Effect.gen(function*() {
  const context = yield* Effect.context<never>()
  const sampled = (metric: Metric.Gauge<number>, read: () => number) =>
    Effect.acquireRelease(
      Effect.sync(() =>
        Metric.registerUnsafe(metric, context, { get: () => ({ value: read() }), update: () => {}, modify: () => {} })
      ),
      (registration) => Effect.sync(() => registration.remove())
    )
  yield* sampled(residentMemoryMetric, () => process.memoryUsage.rss())
  yield* sampled(heapUsedMetric, () => process.memoryUsage().heapUsed)
})

const httpLayer = (host: string, port: number) =>
  HttpRouter.serve(PrometheusMetrics.layerHttp({ path: "/metrics" }), { disableLogger: true, disableListenLog: true }).pipe(
    Layer.provideMerge(NodeHttpServer.layer(createServer, { host, port, gracefulShutdownTimeout: "2 seconds" }))
  )

const make = Effect.gen(function*() {
  const { metrics } = yield* ProxyConfig
  if (Option.isNone(metrics)) return MetricsServer.of({ port: Option.none() })
  const { host, port } = metrics.value
  const address = `${host}:${port}`
  const built = yield* Layer.build(httpLayer(host, port)).pipe(
    Effect.mapError((error) => new MetricsBindError({ address, cause: error.cause }))
  )
  const bound = Context.get(built, HttpServer.HttpServer).address
  const boundPort = bound._tag === "UnixPathAddress" ? port : bound.port
  yield* registerProcessGauges
  yield* Effect.logInfo("metrics listening", { address: `${host}:${boundPort}`, port: boundPort, path: "/metrics" })
  return MetricsServer.of({ port: Option.some(boundPort) })
})

/** GET /metrics on the configured address when metrics are enabled; otherwise nothing. */
export const MetricsLive: Layer.Layer<MetricsServer, MetricsBindError, ProxyConfig> = Layer.effect(MetricsServer, make)
