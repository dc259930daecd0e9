/**
 * The CLI's gRPC client for messaging-proxy.
 *
 * Owns one grpc-js `MessagingServiceClient` as a scoped resource (closed when the scope ends) and exposes
 * its RPCs as Effects/Streams. Every failure is a `GrpcError` carrying the status code name and details;
 * unary calls get a deadline, streams run until the server ends them or the consumer stops.
 */
import * as grpc from "@grpc/grpc-js"
import { Cause, Context, Effect, Layer, Queue, Redacted, Schema, Stream } from "effect"
import { readFileSync } from "node:fs"
import {
  type GetMessagingParamsResponse,
  type GetQueueInfoResponse,
  MessagingServiceClient,
  type PublishRequest,
  type PublishResponse,
  type RoutingKey,
  type SchemaMessageResponse,
  type ValidationMessageResponse
} from "../../gen/messaging.js"

/** Where and how to reach the proxy. */
export interface ConnectionOptions {
  readonly host: string
  readonly port: number
  /** Deadline for unary calls, in seconds. */
  readonly timeoutSeconds: number
  /** TLS: on, with an optional CA to trust and an optional client certificate (mutual TLS). */
  readonly tls: { readonly ca?: string | undefined; readonly cert?: string | undefined; readonly key?: string | undefined } | undefined
  /** Sent as `authorization: Bearer <key>` on every call. */
  readonly apiKey: Redacted.Redacted<string> | undefined
}

/** The client could not be set up (e.g. a TLS file is missing). */
export class ClientSetupError extends Schema.TaggedError<ClientSetupError>()("ClientSetupError", {
  reason: Schema.String
}) {
  override get message(): string {
    return this.reason
  }
}

/** Which queue family a routing-key / stream command is about. */
export type Kind = "schemas" | "validations"

/** A gRPC call that did not end with status OK. */
export class GrpcError extends Schema.TaggedError<GrpcError>()("GrpcError", {
  method: Schema.String,
  target: Schema.String,
  /** Status code name, e.g. "UNAVAILABLE". */
  code: Schema.String,
  details: Schema.String
}) {
  override get message(): string {
    // grpc-js appends an often empty "Resolution note:" to connection errors; drop the empty one.
    const status = `${this.code}: ${this.details.replace(/\s*Resolution note:\s*$/, "")}`
    switch (this.code) {
      case "UNAVAILABLE":
        return `cannot reach messaging-proxy at ${this.target} (${status})`
      case "DEADLINE_EXCEEDED":
        return `${this.method} timed out at ${this.target} (${status})`
      default:
        return `${this.method} failed at ${this.target} (${status})`
    }
  }

  static fromStatus(method: string, target: string, status: Pick<grpc.StatusObject, "code" | "details">): GrpcError {
    // grpc.status is a numeric TS enum, so indexing by the code gives its name.
    const code = grpc.status[status.code] ?? `CODE_${status.code}`
    return new GrpcError({ method, target, code, details: status.details })
  }
}

/** The proxy's RPCs as Effects (unary) and Streams (server streaming). */
export class ProxyClient extends Context.Service<ProxyClient, {
  /** host:port this client talks to, for messages. */
  readonly target: string
  readonly getMessagingParams: Effect.Effect<GetMessagingParamsResponse, GrpcError>
  /** `results=false`: the routing key to publish to; `true`: the results routing key. */
  readonly getRoutingKey: (kind: Kind, results: boolean) => Effect.Effect<string, GrpcError>
  readonly streamSchemaMessages: Stream.Stream<SchemaMessageResponse, GrpcError>
  readonly streamValidationMessages: Stream.Stream<ValidationMessageResponse, GrpcError>
  /** Publish through the proxy: validated, then confirmed by the broker before it answers. */
  readonly publish: (request: PublishRequest) => Effect.Effect<PublishResponse, GrpcError>
  readonly getQueueInfo: Effect.Effect<GetQueueInfoResponse, GrpcError>
}>()("messaging-proxy-cli/ProxyClient") {
  /** Scoped: the grpc-js client is closed when the surrounding scope closes. */
  static readonly make = Effect.fnUntraced(function*(options: ConnectionOptions) {
    const target = `${options.host}:${options.port}`
    const client = yield* Effect.acquireRelease(
      createGrpcClient(target, options),
      (client) => Effect.sync(() => client.close())
    )
    const metadata = () => {
      const md = new grpc.Metadata()
      if (options.apiKey) md.set("authorization", `Bearer ${Redacted.value(options.apiKey)}`)
      return md
    }
    const timeoutMillis = Math.round(options.timeoutSeconds * 1000)

    // Unary call with a deadline. The ts-proto overloads have no (req, options, cb) form, hence the
    // empty Metadata. The callback receives an error exactly when the final status is not OK.
    const unary = <Res>(
      method: string,
      invoke: (
        metadata: grpc.Metadata,
        callOptions: Partial<grpc.CallOptions>,
        callback: (error: grpc.ServiceError | null, response: Res) => void
      ) => grpc.ClientUnaryCall
    ): Effect.Effect<Res, GrpcError> =>
      Effect.callback<Res, GrpcError>((resume) => {
        const call = invoke(metadata(), { deadline: Date.now() + timeoutMillis }, (error, response) =>
          resume(error === null ? Effect.succeed(response) : Effect.fail(GrpcError.fromStatus(method, target, error))))
        // On interruption (Ctrl-C) cancel the RPC; its late CANCELLED callback is then ignored by resume.
        return Effect.sync(() => call.cancel())
      })

    // Server stream → Effect Stream. The call lives in the stream's scope: when the consumer stops
    // (take N, failure, Ctrl-C) the finalizer cancels it, and the CANCELLED status we caused is not an error.
    const serverStream = <A>(method: string, open: () => grpc.ClientReadableStream<A>): Stream.Stream<A, GrpcError> =>
      Stream.callback<A, GrpcError>((queue) => {
        let cancelledByUs = false
        return Effect.acquireRelease(
          Effect.sync(() => {
            const call = open()
            // Unbounded queue: a CLI printing lines keeps up, and grpc-js only reads more as we consume.
            call.on("data", (message: A) => {
              Queue.offerUnsafe(queue, message)
            })
            // Success or failure is decided from 'status' (it carries the code); a Readable 'error'
            // without a listener would still crash the process, so swallow it here.
            call.on("error", () => {})
            call.on("status", (status: grpc.StatusObject) => {
              if (status.code === grpc.status.OK || (cancelledByUs && status.code === grpc.status.CANCELLED)) {
                Queue.endUnsafe(queue)
              } else {
                Queue.failCauseUnsafe(queue, Cause.fail(GrpcError.fromStatus(method, target, status)))
              }
            })
            return call
          }),
          (call) =>
            Effect.sync(() => {
              cancelledByUs = true
              call.cancel() // no-op when the call already has a status
            })
        )
      })

    return ProxyClient.of({
      target,
      getMessagingParams: unary<GetMessagingParamsResponse>(
        "GetMessagingParams",
        (md, opts, cb) => client.getMessagingParams({}, md, opts, cb)
      ),
      getRoutingKey: (kind, results) =>
        Effect.map(
          kind === "schemas"
            ? unary<RoutingKey>("GetRoutingKeySchemas", (md, opts, cb) =>
              client.getRoutingKeySchemas({ results }, md, opts, cb))
            : unary<RoutingKey>("GetRoutingKeyValidations", (md, opts, cb) =>
              client.getRoutingKeyValidations({ results }, md, opts, cb)),
          (response) => response.routingKey
        ),
      streamSchemaMessages: serverStream("StreamSchemaMessages", () => client.streamSchemaMessages({}, metadata())),
      streamValidationMessages: serverStream(
        "StreamValidationMessages",
        () => client.streamValidationMessages({}, metadata())
      ),
      publish: (request) =>
        unary<PublishResponse>("Publish", (md, opts, cb) => client.publish(request, md, opts, cb)),
      getQueueInfo: unary<GetQueueInfoResponse>("GetQueueInfo", (md, opts, cb) => client.getQueueInfo({}, md, opts, cb))
    })
  })

  static readonly layer = (options: ConnectionOptions): Layer.Layer<ProxyClient, ClientSetupError> =>
    Layer.effect(ProxyClient, ProxyClient.make(options))
}

// Internal

const readPem = (flag: string, path: string | undefined) =>
  path === undefined ? Effect.succeed(undefined) : Effect.try({
    try: () => readFileSync(path),
    catch: (cause) =>
      new ClientSetupError({ reason: `${flag} ${path}: ${cause instanceof Error ? cause.message : String(cause)}` })
  })

/** The single place where the channel is configured: plaintext, TLS, or mutual TLS. */
const createGrpcClient = (target: string, options: ConnectionOptions) =>
  Effect.gen(function*() {
    const { tls } = options
    if (tls === undefined) return new MessagingServiceClient(target, grpc.credentials.createInsecure())
    if ((tls.cert === undefined) !== (tls.key === undefined)) {
      return yield* new ClientSetupError({ reason: "--cert and --key go together" })
    }
    const ca = yield* readPem("--ca", tls.ca)
    const cert = yield* readPem("--cert", tls.cert)
    const key = yield* readPem("--key", tls.key)
    return new MessagingServiceClient(target, grpc.credentials.createSsl(ca ?? null, key ?? null, cert ?? null))
  })
