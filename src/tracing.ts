/**
 * OpenTelemetry traces, exported over OTLP/HTTP with Effect's own exporter (`effect/observability`
 * OtlpTracer), on only when an OTLP endpoint is configured (config.ts `tracing`). Off, nothing is
 * created: no span, no exporter, no timer, and every function here returns at its first line.
 *
 * - W3C trace context (https://www.w3.org/TR/trace-context/): `traceparent`
 *   (`00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`, flag 01 = sampled) and
 *   `tracestate`, read from gRPC metadata and AMQP headers and written to AMQP headers.
 * - Sampling as OpenTelemetry's `OTEL_TRACES_SAMPLER` (config.ts TraceSampler); for a trace that
 *   arrives from a caller or publisher the ratio sampler decides from its trace id, so every
 *   replica keeps the same traces.
 * - Server spans of RPCs are started and ended by the guard (it sees every call and its final
 *   status) and handed to the call's work through `rpcSpanOf`.
 */
import * as grpc from "@grpc/grpc-js"
import type * as amqp from "amqplib"
import type { TraceContext as TraceContextField } from "../gen/messaging.js"
import { ConfigProvider, Context, Effect, Exit, Layer, Option, Tracer } from "effect"
import { FetchHttpClient } from "effect/http"
import { OtlpSerialization, OtlpTracer } from "effect/observability"
import { ProxyConfig, type TraceSampler } from "./config.js"

/** A W3C trace context: the caller's span, as a parent. */
export interface TraceContext {
  readonly traceId: string
  readonly spanId: string
  readonly sampled: boolean
  readonly traceState?: string | undefined
}

const traceparentPattern = /^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$/

/**
 * Parses a `traceparent` value (and `tracestate`, kept as it is). Undefined for anything that is
 * not one: version ff, an all-zero id, wrong lengths, upper-case hex (W3C trace context §3.2).
 */
export const parseTraceparent = (traceparent: unknown, tracestate?: unknown): TraceContext | undefined => {
  const text = Buffer.isBuffer(traceparent) ? traceparent.toString("latin1") : traceparent
  if (typeof text !== "string") return undefined
  const match = traceparentPattern.exec(text.trim())
  if (match === null) return undefined
  const [, version, traceId, spanId, flags, rest] = match
  if (version === "ff" || (version === "00" && rest !== undefined)) return undefined
  if (/^0+$/.test(traceId!) || /^0+$/.test(spanId!)) return undefined
  const state = Buffer.isBuffer(tracestate) ? tracestate.toString("latin1") : tracestate
  return {
    traceId: traceId!,
    spanId: spanId!,
    sampled: (parseInt(flags!, 16) & 1) === 1,
    traceState: typeof state === "string" && state.trim() !== "" ? state.trim() : undefined
  }
}

/** `traceparent` for a span, version 00. */
export const formatTraceparent = (span: { readonly traceId: string; readonly spanId: string; readonly sampled: boolean }): string =>
  `00-${span.traceId}-${span.spanId}-${span.sampled ? "01" : "00"}`

/**
 * The sampler's decision for a new span. With a parent and a parent-based sampler, the parent's
 * flag decides; otherwise the root sampler does (traceidratio: the trace id's last 8 hex digits,
 * as a fraction of 2^32, below the ratio). A trace that starts here has no id yet (the tracer
 * makes it with the span): `traceId` undefined, and traceidratio keeps it at random, at the ratio.
 */
export const sampled = (
  sampler: TraceSampler,
  parent: { readonly sampled: boolean } | undefined,
  traceId: string | undefined
): boolean => {
  if (parent !== undefined && sampler.parentBased) return parent.sampled
  switch (sampler.root) {
    case "always_on":
      return true
    case "always_off":
      return false
    case "traceidratio":
      return (traceId === undefined ? Math.random() : parseInt(traceId.slice(-8), 16) / 0x1_0000_0000) < sampler.ratio
  }
}

/** A span the proxy starts by hand (server and consumer spans), and ends with `endSpan`. */
export type StartedSpan = Tracer.Span

export class Tracing extends Context.Service<Tracing, {
  readonly enabled: boolean
  /**
   * Starts a span under `parent` (a caller's or publisher's context, or one of ours), or a new
   * trace without one; undefined while tracing is off. `attributes` are OpenTelemetry's.
   */
  readonly startSpan: (
    name: string,
    options: {
      readonly kind: Tracer.SpanKind
      readonly parent?: TraceContext | Tracer.AnySpan | undefined
      readonly attributes?: Record<string, unknown>
    }
  ) => StartedSpan | undefined
}>()("messaging-proxy/Tracing") {}

const off = Tracing.of({ enabled: false, startSpan: () => undefined })

/** Nanoseconds since the epoch, for span times. */
export const nowNanos = (): bigint => BigInt(Math.round((performance.timeOrigin + performance.now()) * 1_000_000))

/** Ends `span` (no-op for undefined), failed when `failed` says why (OpenTelemetry status ERROR). */
export const endSpan = (span: StartedSpan | undefined, failed?: string): void => {
  if (span === undefined) return
  span.end(nowNanos(), failed === undefined ? Exit.void : Exit.fail(failed))
}

const makeOn = (sampler: TraceSampler) =>
  Effect.gen(function*() {
    const tracer = yield* Tracer.Tracer
    return Tracing.of({
      enabled: true,
      startSpan: (name, { kind, parent, attributes }) => {
        const external = parent !== undefined && "_tag" in parent
          ? parent
          : parent === undefined
          ? undefined
          : Tracer.externalSpan({ traceId: parent.traceId, spanId: parent.spanId, sampled: parent.sampled })
        const span = tracer.span({
          name,
          parent: Option.fromNullishOr(external),
          annotations: Context.empty(),
          links: [],
          startTime: nowNanos(),
          kind,
          root: external === undefined,
          // A root's trace id is made with the span: the sampler decides without it.
          sampled: sampled(sampler, external, external?.traceId)
        })
        if (attributes !== undefined) for (const [key, value] of Object.entries(attributes)) span.attribute(key, value)
        return span
      }
    })
  })

/**
 * Tracing as configured: off (no exporter at all), or Effect's OTLP/HTTP trace exporter (JSON
 * encoding; endpoint, headers, timeouts, batch settings, `OTEL_SERVICE_NAME` and
 * `OTEL_RESOURCE_ATTRIBUTES` read by `OtlpTracer.layerFromConfig`), which also becomes the tracer
 * of every Effect span below it. It flushes what is pending when the layer's scope closes.
 */
export const TracingLive: Layer.Layer<Tracing, never, ProxyConfig> = Layer.unwrap(
  Effect.map(ProxyConfig, ({ tracing }) =>
    Option.match(tracing, {
      onNone: () => Layer.succeed(Tracing, off),
      onSome: ({ sampler, serviceName }) =>
        Layer.effect(Tracing, makeOn(sampler)).pipe(
          Layer.provideMerge(OtlpTracer.layerFromConfig({ resource: { serviceName, serviceVersion: "0.1.0" } }).pipe(
            // Effect 4.1 reads an unset OTEL_TRACES_EXPORTER as "none"; OpenTelemetry's default is
            // "otlp", and config.ts only turns tracing on when it is unset or includes otlp.
            Layer.provide(ConfigProvider.layerAdd(ConfigProvider.fromUnknown({ OTEL_TRACES_EXPORTER: "otlp" })))
          )),
          Layer.provide(OtlpSerialization.layerJson),
          Layer.provide(FetchHttpClient.layer),
          Layer.orDie
        )
    }))
)

const rpcSpans = new WeakMap<object, StartedSpan>()

/** Records `span` as the server span of `call` (guard.ts), for the call's work to run under. */
export const setRpcSpan = (call: object, span: StartedSpan | undefined): void => {
  if (span !== undefined) rpcSpans.set(call, span)
}

/** Runs `effect` under the server span of `call`, if it has one (tracing on). */
export const underRpcSpan = (call: object) => <A, E, R>(effect: Effect.Effect<A, E, R>): Effect.Effect<A, E, R> => {
  const span = rpcSpans.get(call)
  return span === undefined ? effect : Effect.withParentSpan(effect, span)
}

/**
 * The server span of an RPC (OpenTelemetry's RPC semantic conventions: `rpc.system`,
 * `rpc.service`, `rpc.method`), continuing the caller's `traceparent`/`tracestate` metadata.
 */
export const startRpcSpan = (tracing: Tracing["Service"], method: string, metadata: grpc.Metadata): StartedSpan | undefined => {
  if (!tracing.enabled) return undefined
  const parent = parseTraceparent(metadata.get("traceparent")[0], metadata.get("tracestate")[0])
  return tracing.startSpan(`messaging.MessagingService/${method}`, {
    kind: "server",
    parent,
    attributes: { "rpc.system": "grpc", "rpc.service": "messaging.MessagingService", "rpc.method": method }
  })
}

/** Status codes that mark a gRPC server span as failed (OpenTelemetry's gRPC conventions). */
const serverErrorCodes: ReadonlySet<grpc.status> = new Set([
  grpc.status.UNKNOWN,
  grpc.status.DEADLINE_EXCEEDED,
  grpc.status.UNIMPLEMENTED,
  grpc.status.INTERNAL,
  grpc.status.UNAVAILABLE,
  grpc.status.DATA_LOSS
])

/** Ends an RPC's server span with `rpc.grpc.status_code`. */
export const endRpcSpan = (span: StartedSpan | undefined, code: grpc.status): void => {
  if (span === undefined) return
  span.attribute("rpc.grpc.status_code", code)
  endSpan(span, serverErrorCodes.has(code) ? grpc.status[code] : undefined)
}

/**
 * The span of one delivery (kind consumer; OpenTelemetry's messaging conventions), a child of the
 * publisher's context when the AMQP message carries `traceparent`/`tracestate` headers (what
 * OpenTelemetry-instrumented publishers write, pika's instrumentation among them), and the trace
 * context to hand the client: this span's, with the publisher's tracestate. Undefined while
 * tracing is off. From the proxy's receipt of the message to its hand-off to the client.
 */
export const startDeliverySpan = (
  tracing: Tracing["Service"],
  queue: string,
  message: amqp.ConsumeMessage,
  deliveryCount: number
): { readonly span: StartedSpan; readonly context: TraceContextField } | undefined => {
  if (!tracing.enabled) return undefined
  const headers = message.properties.headers ?? {}
  const parent = parseTraceparent(headers["traceparent"], headers["tracestate"])
  const span = tracing.startSpan(`${queue} deliver`, {
    kind: "consumer",
    parent,
    attributes: {
      "messaging.system": "rabbitmq",
      "messaging.operation.type": "deliver",
      "messaging.destination.name": queue,
      "messaging.rabbitmq.destination.routing_key": message.fields.routingKey,
      "messaging.rabbitmq.message.delivery_tag": message.fields.deliveryTag,
      ...(typeof message.properties.messageId === "string" ? { "messaging.message.id": message.properties.messageId } : {}),
      // Not an OpenTelemetry name: the proxy's count (x-delivery-count, x-requeue-count; redelivery.ts).
      "messaging.rabbitmq.message.delivery_count": deliveryCount
    }
  })
  if (span === undefined) return undefined
  return { span, context: { traceparent: formatTraceparent(span), tracestate: parent?.traceState ?? "" } }
}
