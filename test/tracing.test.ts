/**
 * Issue 13: OpenTelemetry traces. An OTLP/HTTP receiver inside the test records what the proxy
 * exports; a message published through amqplib with a `traceparent` header and consumed through
 * a subscription shows the delivery span under the publisher's span, the RPC's server span, and
 * the delivery's trace context pointing at the delivery span. Publish continues the caller's trace
 * into the AMQP headers. Without an endpoint nothing is exported.
 */
import { assert, describe, it } from "@effect/vitest"
import * as grpc from "@grpc/grpc-js"
import { Effect } from "effect"
import { randomBytes } from "node:crypto"
import { createServer } from "node:http"
import type { AddressInfo } from "node:net"
import { MessageKind, MessagingServiceClient } from "../gen/messaging.js"
import { formatTraceparent, parseTraceparent, sampled } from "../src/tracing.js"
import { schemaBody } from "./fixtures/bodies.js"
import { makeAdmin, makeNames, makeTestEnv, proxyEnv, publishRaw, readMessages, waitForQueue } from "./support/harness.js"
import { grpcPortOf, runProxy } from "./support/process.js"
import { subscribeSchemas } from "./support/subscriber.js"
import { explainIfInterrupted } from "./support/waiting.js"

interface ExportedSpan {
  readonly traceId: string
  readonly spanId: string
  readonly parentSpanId?: string | undefined
  readonly name: string
  readonly kind: number
  readonly attributes: ReadonlyArray<{ readonly key: string; readonly value: Record<string, unknown> }>
}

/** OTLP span kinds. */
const SERVER = 2
const CONSUMER = 5

/** A receiver of OTLP/HTTP JSON trace exports, closed with the scope. */
const otlpReceiver = Effect.acquireRelease(
  Effect.callback<{ readonly url: string; readonly spans: Array<ExportedSpan>; readonly posts: () => number; close: () => void }>((resume) => {
    const spans: Array<ExportedSpan> = []
    let posts = 0
    const server = createServer((request, response) => {
      let body = ""
      request.on("data", (chunk: Buffer) => (body += chunk.toString()))
      request.on("end", () => {
        posts++
        const data = JSON.parse(body) as { resourceSpans: Array<{ scopeSpans: Array<{ spans: Array<ExportedSpan> }> }> }
        for (const resource of data.resourceSpans) for (const scope of resource.scopeSpans) spans.push(...scope.spans)
        response.writeHead(200, { "content-type": "application/json" })
        response.end("{}")
      })
    })
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address() as AddressInfo
      resume(Effect.succeed({ url: `http://127.0.0.1:${port}`, spans, posts: () => posts, close: () => server.close() }))
    })
  }),
  (receiver) => Effect.sync(() => receiver.close())
)

/** Waits until a recorded span satisfies `predicate` (exports come every 100 ms here). */
const spanWhere = (spans: Array<ExportedSpan>, what: string, predicate: (span: ExportedSpan) => boolean) =>
  Effect.gen(function*() {
    while (true) {
      const found = spans.find(predicate)
      if (found !== undefined) return found
      yield* Effect.sleep("20 millis")
    }
  }).pipe(explainIfInterrupted(what, () => spans.map((s) => `${s.name} ${s.traceId}/${s.spanId}<-${s.parentSpanId ?? ""}`)))

const attribute = (span: ExportedSpan, key: string): unknown => {
  const value = span.attributes.find((a) => a.key === key)?.value
  return value === undefined ? undefined : Object.values(value)[0]
}

const newTraceparent = () => ({ traceId: randomBytes(16).toString("hex"), spanId: randomBytes(8).toString("hex"), sampled: true })

const tracingEnv = (url: string) => ({ OTEL_EXPORTER_OTLP_ENDPOINT: url, OTEL_BSP_SCHEDULE_DELAY: "100" })

const publishWithContext = (client: MessagingServiceClient, traceparent: string, id: string) =>
  Effect.callback<void, Error>((resume) => {
    const metadata = new grpc.Metadata()
    metadata.set("traceparent", traceparent)
    client.publish(
      { kind: MessageKind.MESSAGE_KIND_SCHEMA, body: Buffer.from(JSON.stringify(schemaBody(id))), routingKey: "" },
      metadata,
      (error) => resume(error === null ? Effect.void : Effect.fail(error))
    )
  })

describe("W3C trace context and sampling (pure)", () => {
  it("parses and formats traceparent; refuses what is not one", () => {
    const parsed = parseTraceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "vendor=x")
    assert.deepStrictEqual(parsed, { traceId: "0af7651916cd43dd8448eb211c80319c", spanId: "b7ad6b7169203331", sampled: true, traceState: "vendor=x" })
    assert.strictEqual(formatTraceparent(parsed!), "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    for (const bad of [
      "00-00000000000000000000000000000000-b7ad6b7169203331-01",
      "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
      "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
      "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
      "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
      "garbage",
      42
    ]) assert.isUndefined(parseTraceparent(bad), String(bad))
    assert.isFalse(parseTraceparent(Buffer.from("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"))!.sampled)
  })

  it("samples as OTEL_TRACES_SAMPLER says: parent-based follows the caller, the ratio decides from the trace id", () => {
    const parentBasedRatio = { root: "traceidratio", parentBased: true, ratio: 0.5 } as const
    assert.isTrue(sampled(parentBasedRatio, { sampled: true }, "ffffffffffffffffffffffffffffffff"))
    assert.isFalse(sampled(parentBasedRatio, { sampled: false }, "00000000000000000000000000000001"))
    assert.isTrue(sampled(parentBasedRatio, undefined, "000000000000000000000000" + "00000001"))
    assert.isFalse(sampled(parentBasedRatio, undefined, "000000000000000000000000" + "ffffffff"))
    assert.isFalse(sampled({ root: "always_off", parentBased: false, ratio: 1 }, { sampled: true }, "00000000000000000000000000000001"))
  })
})

describe("traces exported over OTLP/HTTP", () => {
  it.live("a published message with traceparent, consumed by a subscription: delivery span under the publisher's, the client gets its context; the RPC's server span", () =>
    Effect.gen(function*() {
      const receiver = yield* otlpReceiver
      const env = yield* makeTestEnv(tracingEnv(receiver.url))
      const publisher = newTraceparent()
      yield* publishRaw(env.admin, env.names.exchange, "schemas.*", Buffer.from(JSON.stringify(schemaBody("traced-1"))), {
        messageId: "traced-1",
        headers: { traceparent: formatTraceparent(publisher), tracestate: "vendor=publisher" }
      })
      const sub = yield* subscribeSchemas(env.client, { consumerName: "tracer" })
      const [delivery] = yield* sub.deliveries(1)
      const context = parseTraceparent(delivery?.traceContext?.traceparent, delivery?.traceContext?.tracestate)
      assert.isDefined(context)
      assert.strictEqual(context!.traceId, publisher.traceId, "the client's context is in the publisher's trace")
      assert.notStrictEqual(context!.spanId, publisher.spanId)
      assert.strictEqual(context!.traceState, "vendor=publisher")
      yield* sub.ack("1")
      yield* sub.settled

      const deliverSpan = yield* spanWhere(receiver.spans, "the delivery span", (s) => s.kind === CONSUMER && s.traceId === publisher.traceId)
      assert.strictEqual(deliverSpan.parentSpanId, publisher.spanId, "child of the publisher's span")
      assert.strictEqual(deliverSpan.spanId, context!.spanId, "the client's context is the delivery span")
      assert.strictEqual(deliverSpan.name, `${env.names.schemas} deliver`)
      assert.strictEqual(attribute(deliverSpan, "messaging.system"), "rabbitmq")
      assert.strictEqual(attribute(deliverSpan, "messaging.destination.name"), env.names.schemas)
      assert.strictEqual(attribute(deliverSpan, "messaging.message.id"), "traced-1")
      assert.strictEqual(Number(attribute(deliverSpan, "messaging.rabbitmq.message.delivery_count")), 1)

      // A copy keeps the headers: rejected to the dead-letter queue, it still names the publisher's span.
      yield* publishRaw(env.admin, env.names.exchange, "schemas.*", Buffer.from(JSON.stringify(schemaBody("traced-dead"))), {
        messageId: "traced-dead",
        headers: { traceparent: formatTraceparent(publisher) }
      })
      yield* sub.deliveries(1)
      yield* sub.send({ action: { $case: "reject", value: { deliveryIds: ["2"], reason: "test" } } })
      yield* sub.settled
      // The move runs beside the subscription: wait for the copy.
      yield* waitForQueue(env.admin, env.names.schemasDead, (q) => q.messageCount === 1)
      const dead = yield* Effect.promise(() => env.admin.channel.get(env.names.schemasDead, { noAck: true }))
      assert.strictEqual(parseTraceparent(dead === false ? undefined : dead.properties.headers?.["traceparent"])?.spanId, publisher.spanId)

      // The subscription's server span ends with the call.
      sub.call.end()
      yield* sub.status
      const rpcSpan = yield* spanWhere(receiver.spans, "the subscription's server span", (s) =>
        s.kind === SERVER && s.name === "messaging.MessagingService/SubscribeSchemaMessages")
      assert.strictEqual(attribute(rpcSpan, "rpc.system"), "grpc")
      assert.strictEqual(attribute(rpcSpan, "rpc.method"), "SubscribeSchemaMessages")
      assert.strictEqual(Number(attribute(rpcSpan, "rpc.grpc.status_code")), grpc.status.OK)
    }))

  it.live("Publish continues the caller's trace: its server span is the caller's child, and the AMQP message carries it as traceparent", () =>
    Effect.gen(function*() {
      const receiver = yield* otlpReceiver
      const env = yield* makeTestEnv(tracingEnv(receiver.url))
      const caller = newTraceparent()
      yield* publishWithContext(env.client, formatTraceparent(caller), "traced-2")
      const rpcSpan = yield* spanWhere(receiver.spans, "the Publish server span", (s) =>
        s.kind === SERVER && s.traceId === caller.traceId && s.name === "messaging.MessagingService/Publish")
      assert.strictEqual(rpcSpan.parentSpanId, caller.spanId)
      assert.strictEqual(Number(attribute(rpcSpan, "rpc.grpc.status_code")), grpc.status.OK)
      const message = yield* Effect.promise(() => env.admin.channel.get(env.names.schemas, { noAck: true }))
      assert.notStrictEqual(message, false)
      const header = parseTraceparent(message === false ? undefined : message.properties.headers?.["traceparent"])
      assert.deepStrictEqual(header, { traceId: caller.traceId, spanId: rpcSpan.spanId, sampled: true, traceState: undefined })
    }))

  it.live("log lines logged under a span carry its trace_id and span_id (the built proxy, debug logging)", () =>
    Effect.gen(function*() {
      const receiver = yield* otlpReceiver
      const names = makeNames()
      yield* makeAdmin(names)
      const caller = newTraceparent()
      const result = yield* runProxy({ ...proxyEnv(names), ...tracingEnv(receiver.url), MESSAGING_CONNECTION_DEBUG: "true" }, (kill, stdout) => {
        const client = new MessagingServiceClient(`127.0.0.1:${grpcPortOf(stdout)}`, grpc.credentials.createInsecure())
        void Effect.runPromise(Effect.ignore(publishWithContext(client, formatTraceparent(caller), "logged-1"))).then(() => {
          client.close()
          kill()
        })
      })
      assert.strictEqual(result.code, 0, result.stderr)
      const published = result.stdout.split("\n").find((line) => line.includes('"published"'))
      assert.isDefined(published, result.stdout)
      const fields = JSON.parse(published!) as { trace_id?: string; span_id?: string }
      assert.strictEqual(fields.trace_id, caller.traceId)
      assert.match(fields.span_id ?? "", /^[0-9a-f]{16}$/)
      assert.notStrictEqual(fields.span_id, caller.spanId, "the proxy's server span, under the caller's")
    }))

  it.live("without an endpoint nothing is exported, and Publish writes no traceparent", () =>
    Effect.gen(function*() {
      const receiver = yield* otlpReceiver
      const env = yield* makeTestEnv({ OTEL_BSP_SCHEDULE_DELAY: "100" })
      yield* publishWithContext(env.client, formatTraceparent(newTraceparent()), "untraced-1")
      const raw = yield* Effect.promise(() => env.admin.channel.get(env.names.schemas, { noAck: true }))
      assert.notStrictEqual(raw, false)
      assert.strictEqual(raw === false ? undefined : raw.properties.messageId, "untraced-1")
      assert.isUndefined(raw === false ? undefined : raw.properties.headers?.["traceparent"])
      // A delivery through a stream, too: still nothing is sent to the receiver.
      yield* publishRaw(env.admin, env.names.exchange, "schemas.*", Buffer.from(JSON.stringify(schemaBody("untraced-2"))), {
        headers: { traceparent: formatTraceparent(newTraceparent()) }
      })
      const [message] = yield* readMessages(env.client.streamSchemaMessages({}), 1)
      assert.strictEqual(message?.id, "untraced-2")
      assert.strictEqual(receiver.posts(), 0)
    }))
})
