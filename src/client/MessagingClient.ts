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
 * - `getMessagingParams`, `getRoutingKey`, `getQueueInfo`: the unary lookups, and
 *   `streamSchemaMessages` / `streamValidationMessages`: the unacknowledged server streams (the CLI
 *   uses these).
 *
 * Every gRPC failure is one of the typed errors of ./errors.ts (`Unavailable`, `InvalidArgument`, …).
 * Unary calls (and a batch as a whole) get the `timeout` deadline; streams have none.
 */
import * as grpc from "@grpc/grpc-js"
import { service as healthService } from "grpc-health-check"
import { Cause, Context, Duration, Effect, Layer, Queue, Redacted, Stream } from "effect"
import { readFileSync } from "node:fs"
import {
  type GetMessagingParamsResponse,
  type GetQueueInfoResponse,
  type PeekDeadLettersResponse,
  type PurgeQueueResponse,
  type RedriveDeadLettersResponse,
  MessageKind,
  MessagingServiceClient,
  type PublishBatchResponse,
  type PublishRequest,
  type PublishResponse,
  type RoutingKey,
  type SchemaMessageResponse,
  type ValidationMessageResponse
} from "../../gen/messaging.js"
import { ClientSetupError, fromStatus, type MessagingClientError } from "./errors.js"
import { type Handler, subscribe, type SubscribeOptions } from "./subscription.js"
import type { Kind } from "./subscription.js"

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
  /**
   * Deadline of unary calls (publish, the lookups, a batch as a whole) and of a subscription's
   * `opened`; default 30 s. Streams and subscriptions themselves have none.
   */
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

/** The proxy's RPCs: acknowledged subscriptions, publishing, the lookups and the plain streams. */
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
  /** GetMessagingParams: the broker's address, credentials, exchange and queue layout. */
  readonly getMessagingParams: Effect.Effect<GetMessagingParamsResponse, MessagingClientError>
  /**
   * GetRoutingKeySchemas / GetRoutingKeyValidations: `results = false` gives the routing key to
   * publish the kind's requests with, `true` the one of its results.
   */
  readonly getRoutingKey: (kind: Kind, results: boolean) => Effect.Effect<string, MessagingClientError>
  /** GetQueueInfo: message and consumer counts of the contract, dead-letter and delay queues. */
  readonly getQueueInfo: Effect.Effect<GetQueueInfoResponse, MessagingClientError>
  /**
   * PeekDeadLetters: up to `limit` (0 = 10, at most 100) messages of the schemas' or validations'
   * dead-letter queue from its head, after the message with id `after`; nothing moves. Scope admin.
   */
  readonly peekDeadLetters: (kind: Kind, limit?: number, after?: string) => Effect.Effect<PeekDeadLettersResponse, MessagingClientError>
  /**
   * RedriveDeadLetters: moves dead-lettered messages (by their PeekDeadLetters ids, or all from the
   * head) back to their queue, each copy confirmed before its original leaves; at most `limit`
   * (0/undefined = no limit). Scope admin.
   */
  readonly redriveDeadLetters: (
    kind: Kind,
    selection: ({ readonly ids: ReadonlyArray<string> } | { readonly all: true }) & { readonly limit?: number }
  ) => Effect.Effect<RedriveDeadLettersResponse, MessagingClientError>
  /** PurgeQueue: empties the queue of `role` (as GetQueueInfo names roles); scope admin. */
  readonly purgeQueue: (role: string) => Effect.Effect<PurgeQueueResponse, MessagingClientError>
  /**
   * grpc.health.v1.Health/Check of `service` ("" = the proxy as a whole, the default; also
   * "messaging.MessagingService", "publishing", or a queue's name): "SERVING" or "NOT_SERVING"
   * (the grpc-health-check names). An unknown service fails with NotFound.
   */
  readonly checkHealth: (service?: string) => Effect.Effect<string, MessagingClientError>
  /**
   * StreamSchemaMessages: the schemas queue's messages as they arrive (acked by the proxy once read,
   * no settling here). Ends when the server ends the call with OK; ending the stream early (take N,
   * failure, interruption) cancels the call.
   */
  readonly streamSchemaMessages: Stream.Stream<SchemaMessageResponse, MessagingClientError>
  /** StreamValidationMessages: as `streamSchemaMessages`, for the validations queue. */
  readonly streamValidationMessages: Stream.Stream<ValidationMessageResponse, MessagingClientError>
}>()("messaging-proxy/client/MessagingClient") {
  /** Scoped: the grpc-js client is closed when the surrounding scope closes. */
  static readonly make = Effect.fn("MessagingClient.make")(function*(options: MessagingClientOptions) {
    const target = options.address
    const client = yield* Effect.acquireRelease(
      createGrpcClient(options),
      (client) => Effect.sync(() => client.close())
    )
    // The health service on the same channel (its own connection would be a second one to open).
    const health = new HealthServiceClient(target, grpc.credentials.createInsecure(), { channelOverride: client.getChannel() }) as unknown as HealthCheckClient
    const timeoutMillis = Duration.toMillis(Duration.fromInputUnsafe(options.timeout ?? "30 seconds"))
    const metadata = () => {
      const md = new grpc.Metadata()
      if (options.apiKey !== undefined) md.set("authorization", `Bearer ${Redacted.value(options.apiKey)}`)
      return md
    }

    /**
     * A unary call with the `timeout` deadline. ts-proto's overloads have no (request, options,
     * callback) form, hence the Metadata argument. The callback gets an error exactly when the final
     * status is not OK.
     */
    const unary = <Res>(
      method: string,
      invoke: (
        metadata: grpc.Metadata,
        callOptions: Partial<grpc.CallOptions>,
        callback: (error: grpc.ServiceError | null, response: Res) => void
      ) => grpc.ClientUnaryCall
    ): Effect.Effect<Res, MessagingClientError> =>
      Effect.callback<Res, MessagingClientError>((resume) => {
        const call = invoke(metadata(), { deadline: Date.now() + timeoutMillis }, (error, response) =>
          resume(error === null ? Effect.succeed(response) : Effect.fail(fromStatus(method, target, error))))
        // Interrupted: cancel the RPC; its late CANCELLED callback is then ignored by resume.
        return Effect.sync(() => call.cancel())
      })

    /**
     * A server stream as an Effect Stream. The call lives in the stream's scope: when the consumer
     * stops (take N, failure, interruption) the finalizer cancels it, and the CANCELLED status that
     * causes is not an error. The queue is unbounded, but grpc-js reads more from the network only as
     * messages are taken from it.
     */
    const serverStream = <A>(
      method: string,
      open: () => grpc.ClientReadableStream<A>
    ): Stream.Stream<A, MessagingClientError> =>
      Stream.callback<A, MessagingClientError>((queue) => {
        let cancelledByUs = false
        return Effect.acquireRelease(
          Effect.sync(() => {
            const call = open()
            call.on("data", (message: A) => {
              Queue.offerUnsafe(queue, message)
            })
            // Success or failure is decided from 'status' (it carries the code); a Readable 'error'
            // without a listener would crash the process, so it is swallowed here.
            call.on("error", () => {})
            call.on("status", (status: grpc.StatusObject) => {
              if (status.code === grpc.status.OK || (cancelledByUs && status.code === grpc.status.CANCELLED)) {
                Queue.endUnsafe(queue)
              } else {
                Queue.failCauseUnsafe(queue, Cause.fail(fromStatus(method, target, status)))
              }
            })
            return call
          }),
          (call) =>
            Effect.sync(() => {
              cancelledByUs = true
              call.cancel() // a no-op when the call already has its status
            })
        )
      })

    const toRequest = (kind: PublishKind, body: Body, publishOptions: PublishOptions | undefined): PublishRequest => ({
      kind: publishKinds[kind],
      body: encodeBody(body),
      routingKey: publishOptions?.routingKey ?? ""
    })

    const publish = (kind: PublishKind, body: Body, publishOptions?: PublishOptions) =>
      Effect.suspend(() => {
        const request = toRequest(kind, body, publishOptions)
        return unary<PublishResponse>("Publish", (md, callOptions, callback) =>
          client.publish(request, md, callOptions, callback))
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
      publishBatch,
      getMessagingParams: unary<GetMessagingParamsResponse>(
        "GetMessagingParams",
        (md, callOptions, callback) => client.getMessagingParams({}, md, callOptions, callback)
      ),
      getRoutingKey: (kind, results) =>
        Effect.map(
          kind === "schemas"
            ? unary<RoutingKey>("GetRoutingKeySchemas", (md, callOptions, callback) =>
              client.getRoutingKeySchemas({ results }, md, callOptions, callback))
            : unary<RoutingKey>("GetRoutingKeyValidations", (md, callOptions, callback) =>
              client.getRoutingKeyValidations({ results }, md, callOptions, callback)),
          (response) => response.routingKey
        ),
      getQueueInfo: unary<GetQueueInfoResponse>(
        "GetQueueInfo",
        (md, callOptions, callback) => client.getQueueInfo({}, md, callOptions, callback)
      ),
      peekDeadLetters: (kind, limit = 0, after = "") =>
        unary<PeekDeadLettersResponse>("PeekDeadLetters", (md, callOptions, callback) =>
          client.peekDeadLetters(
            { kind: deadLetterKinds[kind], limit, after },
            md,
            callOptions,
            callback
          )),
      redriveDeadLetters: (kind, selection) =>
        unary<RedriveDeadLettersResponse>("RedriveDeadLetters", (md, callOptions, callback) =>
          client.redriveDeadLetters(
            {
              kind: deadLetterKinds[kind],
              ids: "ids" in selection ? [...selection.ids] : [],
              all: "all" in selection,
              limit: selection.limit ?? 0
            },
            md,
            callOptions,
            callback
          )),
      purgeQueue: (role) =>
        unary<PurgeQueueResponse>("PurgeQueue", (md, callOptions, callback) => client.purgeQueue({ role }, md, callOptions, callback)),
      checkHealth: (service = "") =>
        Effect.map(
          unary<{ readonly status: string }>("Check", (md, callOptions, callback) => health.Check({ service }, md, callOptions, callback)),
          (response) => response.status
        ),
      streamSchemaMessages: serverStream("StreamSchemaMessages", () => client.streamSchemaMessages({}, metadata())),
      streamValidationMessages: serverStream(
        "StreamValidationMessages",
        () => client.streamValidationMessages({}, metadata())
      )
    })
  })

  /** The client as a layer: built from `options`, closed with the layer's scope. */
  static readonly layer = (options: MessagingClientOptions): Layer.Layer<MessagingClient, ClientSetupError> =>
    Layer.effect(MessagingClient, MessagingClient.make(options))
}

// Internal

/** grpc.health.v1.Health as grpc-health-check defines it (proto-loader: enums as their names). */
const HealthServiceClient = grpc.makeClientConstructor(healthService as grpc.ServiceDefinition, "grpc.health.v1.Health")
interface HealthCheckClient {
  Check(
    request: { readonly service: string },
    metadata: grpc.Metadata,
    options: Partial<grpc.CallOptions>,
    callback: (error: grpc.ServiceError | null, response: { readonly status: string }) => void
  ): grpc.ClientUnaryCall
}

/** Whose dead-letter queue: the message kind the dead-letter RPCs take. */
const deadLetterKinds: Record<Kind, MessageKind> = {
  schemas: MessageKind.MESSAGE_KIND_SCHEMA,
  validations: MessageKind.MESSAGE_KIND_VALIDATION
}

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
