/**
 * Publish, and what PublishBatch shares with it: validate a body in the contract's format, publish
 * it unchanged to the exchange (persistent, mandatory, message_id = its id) on the publishers'
 * shared confirm channel (broker/publishChannel.ts) and answer only after the broker's confirm.
 */
import * as grpc from "@grpc/grpc-js"
import { Data, Effect, Option, Result, Schema } from "effect"
import { MessageKind, type PublishRequest, type PublishResponse } from "../gen/messaging.js"
import { Broker } from "./broker/Broker.js"
import {
  channelFor,
  CONFIRM_TIMEOUT_SECONDS,
  type ConfirmError,
  type OutgoingMessage,
  type PublishChannel
} from "./broker/publishChannel.js"
import { schemaMessageId, validationMessageId } from "./codec.js"
import { contractQueues, type ProxySettings, type QueueBinding } from "./config.js"
import { AmqpError, describe } from "./errors.js"
import { recordAudit } from "./audit.js"
import { formatTraceparent } from "./tracing.js"
import { brokerFailureStatus, BrokerNotConnected, liveConnection, type RunHandler, runCall, type Status } from "./unaryCall.js"

type Rabbit = ProxySettings["rabbit"]

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/** The request itself is wrong (kind, body, routing key): INVALID_ARGUMENT. */
export class PublishInvalid extends Data.TaggedError("PublishInvalid")<{ readonly reason: string }> {
  override get message(): string {
    return this.reason
  }
}

/** Why a publish failed: the request, the broker's answer, or no connection. */
export type PublishError = PublishInvalid | ConfirmError | BrokerNotConnected

export const publishStatus = (error: PublishError): Status => {
  switch (error._tag) {
    case "PublishInvalid":
      return { code: grpc.status.INVALID_ARGUMENT, details: error.message }
    case "Unroutable":
      return { code: grpc.status.FAILED_PRECONDITION, details: error.message }
    case "PublishNacked":
    case "ConfirmTimeout":
      return { code: grpc.status.UNAVAILABLE, details: error.message }
    case "BrokerNotConnected":
    case "AmqpError":
      // A missing exchange closes the channel with 404: NOT_FOUND.
      return brokerFailureStatus(error)
  }
}

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------

/** A request that passed validation: what goes on the wire. */
export type ValidPublish = OutgoingMessage

/**
 * The current span's `traceparent` as AMQP headers (the Publish RPC's server span), so that a
 * consumer of the message, the proxy's own included, continues the trace; none when tracing is off.
 */
export const traceHeaders: Effect.Effect<Record<string, string> | undefined> = Effect.map(
  Effect.option(Effect.currentParentSpan),
  Option.match({ onNone: () => undefined, onSome: (span) => ({ traceparent: formatTraceparent(span) }) })
)

const MAX_REASON = 300
const reject = (reason: string) =>
  new PublishInvalid({ reason: reason.length > MAX_REASON ? `${reason.slice(0, MAX_REASON)}…` : reason })

// Results are not decoded by the proxy, so the contract asks only for an object with an `id`.
// Unknown keys are allowed (and the body is published unchanged anyway).
const ResultBody = Schema.Struct({ id: Schema.String.check(Schema.isNonEmpty()) })
  .annotate({ message: "Expected a JSON object" })
const decodeResult = Schema.decodeUnknownResult(ResultBody)
// fatal: invalid UTF-8 is a rejection, as in the codec, not silently U+FFFD.
const utf8 = new TextDecoder("utf-8", { fatal: true })

/** The id of a result body; the reasons read like the codec's. */
const resultId = (body: Uint8Array): Result.Result<string, string> => {
  let json: unknown
  try {
    json = JSON.parse(utf8.decode(body))
  } catch (error) {
    // TextDecoder throws a TypeError, JSON.parse a SyntaxError: tell the two apart for the client.
    return Result.fail(
      error instanceof SyntaxError ? `body is not valid JSON: ${error.message}` : `body is not valid UTF-8: ${describe(error)}`
    )
  }
  return decodeResult(json).pipe(
    Result.map((body) => body.id),
    Result.mapError((error) => error.message.replace(/\s*\n\s*/g, " "))
  )
}

interface KindSpec {
  readonly binding: QueueBinding
  readonly idOf: (body: Uint8Array) => Result.Result<string, string>
}

const kindSpec = (rabbit: Rabbit, kind: MessageKind): Option.Option<KindSpec> => {
  switch (kind) {
    case MessageKind.MESSAGE_KIND_SCHEMA:
      // The same decoder the streams use: what Publish accepts, StreamSchemaMessages can deliver.
      return Option.some({ binding: rabbit.schemas, idOf: (body) => Result.mapError(schemaMessageId(body), (e) => e.reason) })
    case MessageKind.MESSAGE_KIND_VALIDATION:
      return Option.some({ binding: rabbit.validations, idOf: (body) => Result.mapError(validationMessageId(body), (e) => e.reason) })
    case MessageKind.MESSAGE_KIND_SCHEMA_RESULT:
      return Option.some({ binding: rabbit.schemaResults, idOf: resultId })
    case MessageKind.MESSAGE_KIND_VALIDATION_RESULT:
      return Option.some({ binding: rabbit.validationResults, idOf: resultId })
    default:
      // UNSPECIFIED, and numbers this build does not know (ts-proto keeps them as they are).
      return Option.none()
  }
}

// AMQP shortstr: a longer routing key would make amqplib throw while encoding the frame.
const MAX_ROUTING_KEY_BYTES = 255

/** AMQP topic matching: `*` is exactly one word, `#` zero or more. */
export const topicMatches = (pattern: string, key: string): boolean => {
  const match = (p: ReadonlyArray<string>, k: ReadonlyArray<string>): boolean => {
    if (p.length === 0) return k.length === 0
    const [head, ...rest] = p
    if (head === "#") return match(rest, k) || (k.length > 0 && match(p, k.slice(1)))
    return k.length > 0 && (head === "*" || head === k[0]) && match(rest, k.slice(1))
  }
  return match(pattern.split("."), key.split("."))
}

export const validatePublish = (rabbit: Rabbit, request: PublishRequest): Result.Result<ValidPublish, PublishInvalid> => {
  const spec = kindSpec(rabbit, request.kind)
  if (Option.isNone(spec)) return Result.fail(reject("kind is required"))
  const routingKey = request.routingKey === "" ? spec.value.binding.routingKey : request.routingKey
  if (Buffer.byteLength(routingKey, "utf8") > MAX_ROUTING_KEY_BYTES) {
    return Result.fail(reject(`routing key is longer than ${MAX_ROUTING_KEY_BYTES} bytes`))
  }
  // An override must still route to the kind's own queue: otherwise a lenient kind (results need
  // only an id) could put an unvalidated body on the schemas or validations queue.
  const pattern = spec.value.binding.routingKey
  const routesTo = (bindingKey: string) =>
    rabbit.exchangeType === "topic" ? topicMatches(bindingKey, routingKey) : bindingKey === routingKey
  if (request.routingKey !== "") {
    if (rabbit.exchangeType === "fanout" || rabbit.exchangeType === "headers") {
      return Result.fail(reject(`a routing key override means nothing on a ${rabbit.exchangeType} exchange`))
    }
    if (!routesTo(pattern)) {
      return Result.fail(reject(`routing key '${routingKey}' does not match this kind's binding '${pattern}'`))
    }
    const other = contractQueues(rabbit).find((b) => b.routingKey !== pattern && routesTo(b.routingKey))
    if (other !== undefined) {
      return Result.fail(reject(`routing key '${routingKey}' would also reach '${other.queue}' (binding '${other.routingKey}')`))
    }
  }
  return spec.value.idOf(request.body).pipe(
    Result.map((messageId): ValidPublish => ({ messageId, routingKey, body: request.body })),
    Result.mapError((reason) => reject(`body rejected: ${reason}`))
  )
}

// ---------------------------------------------------------------------------------------------
// The channel and Publish
// ---------------------------------------------------------------------------------------------

/**
 * The publishing connection's shared confirm channel; BrokerNotConnected after the connect grace,
 * AmqpError when the broker refuses it or does not answer within CONFIRM_TIMEOUT_SECONDS.
 */
export const publishChannel: Effect.Effect<PublishChannel, BrokerNotConnected | AmqpError, Broker> = Effect.gen(function*() {
  const connection = yield* liveConnection("publishers")
  return yield* Effect.tryPromise({
    try: () => channelFor(connection),
    catch: (cause) => new AmqpError({ operation: "open publishing channel", cause })
  }).pipe(
    // A connection the broker blocked (a resource alarm) answers no channel.open until the alarm
    // clears: bounded like a confirm, or a Publish would wait for as long as the alarm lasts.
    Effect.timeoutOrElse({
      duration: `${CONFIRM_TIMEOUT_SECONDS} seconds`,
      orElse: () =>
        Effect.fail(new AmqpError({
          operation: "open publishing channel",
          cause: new Error(`no answer from the broker within ${CONFIRM_TIMEOUT_SECONDS} s (a resource alarm blocks the publishing connection?)`)
        }))
    })
  )
})

/**
 * Publishes one validated message and waits for its confirm. The publish goes out when this
 * Effect runs; interrupting the wait leaves it pending on the channel, so a later return or
 * confirm still finds it.
 */
const publishConfirmed = (channel: PublishChannel, exchange: string, message: ValidPublish): Effect.Effect<void, ConfirmError> =>
  Effect.callback<void, ConfirmError>((resume) => {
    const unsent = channel.send(exchange, message, (error) => resume(error === undefined ? Effect.void : Effect.fail(error)))
    if (unsent !== undefined) resume(Effect.fail(unsent))
  })

export const publishOne = (rabbit: Rabbit, request: PublishRequest): Effect.Effect<PublishResponse, PublishError, Broker> =>
  Effect.gen(function*() {
    const message = { ...yield* Effect.fromResult(validatePublish(rabbit, request)), headers: yield* traceHeaders }
    yield* publishConfirmed(yield* publishChannel, rabbit.exchange, message)
    yield* Effect.logDebug("published", { messageId: message.messageId, routingKey: message.routingKey })
    return { messageId: message.messageId, routingKey: message.routingKey }
  })

export const publishHandler = (settings: ProxySettings, run: RunHandler): grpc.handleUnaryCall<PublishRequest, PublishResponse> =>
(call, callback) =>
  runCall(
    run,
    call,
    "Publish",
    publishOne(settings.rabbit, call.request).pipe(
      Effect.tap((published) => Effect.sync(() => recordAudit(call, { messageId: published.messageId, routingKey: published.routingKey })))
    ),
    callback,
    publishStatus
  )
