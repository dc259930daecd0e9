/**
 * messaging-proxy's client library for TypeScript services (`messaging-proxy/client`).
 *
 * `MessagingClient.layer(options)` owns one grpc-js `MessagingServiceClient` (plaintext, TLS or
 * mutual TLS; an optional API key sent as `authorization: Bearer …`) and closes it with the layer's
 * scope. The service offers:
 *
 * - `subscribe(kind, handler, options)`: an acknowledged subscription (see ./subscription.ts) that
 *   runs the handler for each message with bounded concurrency, acks on success, nacks on failure,
 *   dead-letters on `Reject`, extends each delivery's lease while it is held, and reconnects with
 *   backoff when the proxy goes away. It runs until interrupted.
 * - `publish` / `publishBatch`: the Publish and PublishBatch RPCs, answered after the broker's
 *   publisher confirm.
 *
 * Every gRPC failure is one of the typed errors of ./errors.ts (`Unavailable`, `InvalidArgument`, …).
 */
import * as grpc from "@grpc/grpc-js"
import { Context, Duration, Effect, Layer, Redacted } from "effect"
import { readFileSync } from "node:fs"
import { MessageKind, MessagingServiceClient, type PublishBatchResponse, type PublishRequest, type PublishResponse } from "../../gen/messaging.js"
import { ClientSetupError } from "../cli/ProxyClient.js"
import { fromStatus, type MessagingClientError } from "./errors.js"
import { type Handler, subscribe, type SubscribeOptions } from "./subscription.js"
import type { Kind } from "./subscription.js"

export { ClientSetupError } from "../cli/ProxyClient.js"
export * from "./errors.js"
export type { Delivery, Handler, Kind, MessageOf, SubscribeOptions } from "./subscription.js"

/** Where and how to reach the proxy. */
export interface MessagingClientOptions {
  /** host:port of messaging-proxy, e.g. "localhost:50055". */
  readonly address: string
  /** TLS (omit for plaintext): an optional CA to trust, and an optional client certificate (mutual TLS). */
  readonly tls?: {
    readonly caPath?: string | undefined
    readonly certPath?: string | undefined
    readonly keyPath?: string | undefined
  } | undefined
  /** Sent as `authorization: Bearer <key>` on every call. */
  readonly apiKey?: Redacted.Redacted<string> | undefined
  /** Deadline of unary calls (publish, a batch as a whole) and of a subscription's `opened`; default 30 s. */
  readonly timeout?: Duration.Input | undefined
  /** Extra grpc-js channel options (merged over the library's keepalive settings). */
  readonly channelOptions?: grpc.ChannelOptions | undefined
}

/** Which contract queue a published body is for (selects its routing key and body format). */
export type PublishKind = "schema" | "validation" | "schema-result" | "validation-result"

/** A body: JSON text, its UTF-8 bytes, or a value to be JSON-encoded. */
export type Body = string | Uint8Array | object

export interface PublishOptions {
  /** Defaults to the kind's routing key; must route to at least one queue. */
  readonly routingKey?: string | undefined
}

/** The proxy's RPCs for services: acknowledged subscriptions and publishing. */
export class MessagingClient extends Context.Service<MessagingClient, {
  /** host:port this client talks to. */
  readonly target: string
  /**
   * Runs `handler` for every message of the kind's queue until interrupted; see `SubscribeOptions`.
   * Fails only with an error no reconnect can fix (e.g. `PermissionDenied`, `InvalidArgument`).
   */
  readonly subscribe: <K extends Kind, E, R>(
    kind: K,
    handler: Handler<K, E, R>,
    options?: SubscribeOptions
  ) => Effect.Effect<never, MessagingClientError, R>
  /** Publishes one body; succeeds after the broker's publisher confirm. */
  readonly publish: (
    kind: PublishKind,
    body: Body,
    options?: PublishOptions
  ) => Effect.Effect<PublishResponse, MessagingClientError>
  /**
   * Publishes bodies in order, each validated and confirmed; the first failure ends the batch with its
   * status (its details say how many were published before it).
   */
  readonly publishBatch: (
    kind: PublishKind,
    bodies: Iterable<Body>,
    options?: PublishOptions
  ) => Effect.Effect<PublishBatchResponse, MessagingClientError>
}>()("messaging-proxy/client/MessagingClient") {
  /** Scoped: the grpc-js client is closed when the surrounding scope closes. */
  static readonly make = Effect.fn("MessagingClient.make")(function*(options: MessagingClientOptions) {
    const target = options.address
    const client = yield* Effect.acquireRelease(
      createGrpcClient(options),
      (client) => Effect.sync(() => client.close())
    )
    const timeoutMillis = Duration.toMillis(Duration.fromInputUnsafe(options.timeout ?? "30 seconds"))
    const metadata = () => {
      const md = new grpc.Metadata()
      if (options.apiKey !== undefined) md.set("authorization", `Bearer ${Redacted.value(options.apiKey)}`)
      return md
    }

    const toRequest = (kind: PublishKind, body: Body, publishOptions: PublishOptions | undefined): PublishRequest => ({
      kind: publishKinds[kind],
      body: encodeBody(body),
      routingKey: publishOptions?.routingKey ?? ""
    })

    const publish = (kind: PublishKind, body: Body, publishOptions?: PublishOptions) =>
      Effect.suspend(() => {
        const request = toRequest(kind, body, publishOptions)
        return Effect.callback<PublishResponse, MessagingClientError>((resume) => {
          const call = client.publish(request, metadata(), { deadline: Date.now() + timeoutMillis }, (error, response) =>
            resume(error === null ? Effect.succeed(response) : Effect.fail(fromStatus("Publish", target, error))))
          // Interrupted: cancel the RPC; its late CANCELLED callback is then ignored by resume.
          return Effect.sync(() => call.cancel())
        })
      }).pipe(Effect.withSpan("MessagingClient.publish", { attributes: { kind } }))

    const publishBatch = (kind: PublishKind, bodies: Iterable<Body>, publishOptions?: PublishOptions) =>
      Effect.suspend(() => {
        const requests = Array.from(bodies, (body) => toRequest(kind, body, publishOptions))
        return Effect.callback<PublishBatchResponse, MessagingClientError>((resume) => {
          const call = client.publishBatch(metadata(), { deadline: Date.now() + timeoutMillis }, (error, response) =>
            resume(error === null ? Effect.succeed(response) : Effect.fail(fromStatus("PublishBatch", target, error))))
          // Honour the call's flow control: write until grpc-js says its buffer is full, go on at 'drain'.
          let next = 0
          const writeMore = () => {
            while (next < requests.length) {
              if (!call.write(requests[next++]!)) {
                call.once("drain", writeMore)
                return
              }
            }
            call.end()
          }
          // A failed call also emits 'error' on the stream; the callback above reports it.
          call.on("error", () => {})
          writeMore()
          return Effect.sync(() => call.cancel())
        })
      }).pipe(Effect.withSpan("MessagingClient.publishBatch", { attributes: { kind } }))

    return MessagingClient.of({
      target,
      subscribe: (kind, handler, subscribeOptions) =>
        subscribe({ client, target, metadata, openTimeoutMillis: timeoutMillis }, kind, handler, subscribeOptions ?? {}),
      publish,
      publishBatch
    })
  })

  /** The client as a layer: built from `options`, closed with the layer's scope. */
  static readonly layer = (options: MessagingClientOptions): Layer.Layer<MessagingClient, ClientSetupError> =>
    Layer.effect(MessagingClient, MessagingClient.make(options))
}

// Internal

const publishKinds: Record<PublishKind, MessageKind> = {
  schema: MessageKind.MESSAGE_KIND_SCHEMA,
  validation: MessageKind.MESSAGE_KIND_VALIDATION,
  "schema-result": MessageKind.MESSAGE_KIND_SCHEMA_RESULT,
  "validation-result": MessageKind.MESSAGE_KIND_VALIDATION_RESULT
}

const encodeBody = (body: Body): Buffer =>
  typeof body === "string"
    ? Buffer.from(body, "utf8")
    : body instanceof Uint8Array
    ? Buffer.from(body)
    : Buffer.from(JSON.stringify(body), "utf8")

/**
 * Keepalive pings find a proxy that vanished without closing the connection (a dead host, a cut
 * network), so a subscription notices and reconnects. The server accepts pings every 10 s at most
 * (GRPC_KEEPALIVE_*), also on idle connections.
 */
const defaultChannelOptions: grpc.ChannelOptions = {
  "grpc.keepalive_time_ms": 30_000,
  "grpc.keepalive_timeout_ms": 10_000,
  "grpc.keepalive_permit_without_calls": 1
}

const readPem = (what: string, path: string | undefined) =>
  path === undefined ? Effect.succeed(undefined) : Effect.try({
    try: () => readFileSync(path),
    catch: (cause) =>
      new ClientSetupError({ reason: `${what} ${path}: ${cause instanceof Error ? cause.message : String(cause)}` })
  })

/** The single place where the channel is configured: plaintext, TLS, or mutual TLS. */
const createGrpcClient = (options: MessagingClientOptions) =>
  Effect.gen(function*() {
    const channelOptions = { ...defaultChannelOptions, ...options.channelOptions }
    const { tls } = options
    if (tls === undefined) {
      return new MessagingServiceClient(options.address, grpc.credentials.createInsecure(), channelOptions)
    }
    if ((tls.certPath === undefined) !== (tls.keyPath === undefined)) {
      return yield* new ClientSetupError({ reason: "tls.certPath and tls.keyPath go together" })
    }
    const ca = yield* readPem("tls.caPath", tls.caPath)
    const cert = yield* readPem("tls.certPath", tls.certPath)
    const key = yield* readPem("tls.keyPath", tls.keyPath)
    return new MessagingServiceClient(
      options.address,
      grpc.credentials.createSsl(ca ?? null, key ?? null, cert ?? null),
      channelOptions
    )
  })
