/**
 * Publish and PublishBatch: validate a body in the contract's format, publish it unchanged to the
 * exchange (persistent, mandatory, message_id = its id) and answer only after the broker's confirm.
 *
 * They go out on the publishers' own broker connection (see broker.ts), where all publishes share
 * ONE long-lived confirm channel, opened on first use and reopened after it closes (opening a
 * channel per message would cost a round trip each).
 *
 * Unroutable messages: with `mandatory` the broker sends basic.return for a message bound to no
 * queue, and always before that message's ack on the same channel. basic.return carries no
 * delivery tag, so a return is matched to the OLDEST pending publish with the same exchange,
 * routing key and message id (returns arrive in publish order). Publishes therefore need not be
 * serialized and can be pipelined. The one ambiguity: two publishes in flight at once with the
 * same exchange, routing key and message id, where a binding changes between the two; then the
 * "unroutable" verdict can land on the wrong one of those two duplicates. Serializing every
 * publish behind a Semaphore(1) would rule that out, but would cap all Publish calls of the
 * process at one confirm round trip (incl. the broker's fsync) at a time.
 */
import * as grpc from "@grpc/grpc-js"
import type * as amqp from "amqplib"
import { Data, Deferred, Effect, Exit, Option, Result, Schema } from "effect"
import {
  MessageKind,
  type PublishBatchResponse,
  type PublishRequest,
  type PublishResponse
} from "../gen/messaging.js"
import { Broker } from "./broker/Broker.js"
import { decodeSchemaMessage, decodeValidationMessage } from "./codec.js"
import { contractQueues, type ProxySettings, type QueueBinding } from "./config.js"
import { AmqpError, describe } from "./errors.js"
import { callerOf } from "./access.js"
import { idsForAudit, recordAudit } from "./audit.js"
import type { RateLimits } from "./rateLimits.js"
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

/** The broker returned the mandatory message: no queue is bound for it. FAILED_PRECONDITION. */
export class Unroutable extends Data.TaggedError("Unroutable")<{
  readonly messageId: string
  readonly exchange: string
  readonly routingKey: string
}> {
  override get message(): string {
    return `message '${this.messageId}' routed to no queue (routing key '${this.routingKey}' on exchange '${this.exchange}')`
  }
}

/** The broker nacked the publish (it could not take responsibility for it). UNAVAILABLE. */
export class PublishNacked extends Data.TaggedError("PublishNacked")<{ readonly messageId: string }> {
  override get message(): string {
    return `the broker refused message '${this.messageId}' (nack)`
  }
}

/** No confirm in time (broker blocked or stuck); the message may or may not be in the queue. */
export class ConfirmTimeout extends Data.TaggedError("ConfirmTimeout")<{
  readonly messageId: string
  readonly seconds: number
}> {
  override get message(): string {
    return `no confirm from the broker for message '${this.messageId}' within ${this.seconds} s; it may or may not have been published`
  }
}

export type PublishError = PublishInvalid | Unroutable | PublishNacked | ConfirmTimeout | BrokerNotConnected | AmqpError

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
export interface ValidPublish {
  readonly messageId: string
  readonly routingKey: string
  readonly body: Buffer
  /** AMQP headers: the caller's trace context (`traceparent`), when tracing is on. */
  readonly headers?: Record<string, string> | undefined
}

/**
 * The current span's `traceparent` as AMQP headers (the Publish RPC's server span), so that a
 * consumer of the message, the proxy's own included, continues the trace; none when tracing is off.
 */
const traceHeaders: Effect.Effect<Record<string, string> | undefined> = Effect.map(
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
      return Option.some({
        binding: rabbit.schemas,
        idOf: (body) => Result.mapBoth(decodeSchemaMessage(body), { onSuccess: (m) => m.id, onFailure: (e) => e.reason })
      })
    case MessageKind.MESSAGE_KIND_VALIDATION:
      return Option.some({
        binding: rabbit.validations,
        idOf: (body) =>
          Result.mapBoth(decodeValidationMessage(body), { onSuccess: (m) => m.id, onFailure: (e) => e.reason })
      })
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
// The shared publishing channel
// ---------------------------------------------------------------------------------------------

/** One publish waiting for its confirm. */
interface Pending {
  readonly exchange: string
  readonly routingKey: string
  readonly messageId: string
  /** Set when a basic.return was matched to this publish (it precedes the ack). */
  returned: boolean
  /** When it went out (epoch ms), for the confirm timeout. */
  readonly sentAt: number
  readonly confirmed: Deferred.Deferred<void, PublishError>
}

/** Bounds the wait for one confirm (a blocked broker would otherwise hold the call forever). */
const CONFIRM_TIMEOUT_SECONDS = 30
/** How often a channel with confirms pending looks for overdue ones: a wait ends 30–31 s after its publish. */
const CONFIRM_SWEEP_MS = 1_000

class PublishChannel {
  /** In publish order, so a return is matched to the oldest candidate. */
  private readonly pending: Array<Pending> = []
  /** The broker's reason when it closed the channel (e.g. 404 no exchange), for the in-flight publishes. */
  private closedBy: Error | undefined
  closed = false
  /** Nacked once: no new publishes; closed when the last pending confirm arrives. */
  private retired = false
  /** Fails the waits of confirms older than CONFIRM_TIMEOUT_SECONDS; runs while any are pending. */
  private sweep: NodeJS.Timeout | undefined

  /** Whether new publishes may go out on it (not closed, not retired after a nack). */
  get usable(): boolean {
    return !this.closed && !this.retired
  }

  constructor(private readonly channel: amqp.ConfirmChannel, private readonly onClosed: () => void) {
    // Listeners in the same tick: an unheard 'error' would escalate and crash the process.
    channel.on("error", (error: Error) => {
      this.closedBy = error
    })
    // amqplib fails every unconfirmed callback with "channel closed" in its own 'close' listener,
    // which runs before this one; here we only make the next publish open a fresh channel.
    channel.on("close", () => this.markClosed())
    channel.on("return", (message: amqp.Message) => {
      const fields = message.fields
      const messageId: unknown = message.properties.messageId
      const match = this.pending.find((p) =>
        !p.returned && p.exchange === fields.exchange && p.routingKey === fields.routingKey && p.messageId === messageId
      )
      if (match !== undefined) match.returned = true
    })
  }

  /**
   * Publishes now (synchronously, so callers control the order) and returns the wait for the
   * confirm. Interrupting the wait leaves the publish pending, so later returns still match.
   */
  send(exchange: string, message: ValidPublish): Result.Result<Effect.Effect<void, PublishError>, AmqpError> {
    const confirmed = Deferred.makeUnsafe<void, PublishError>()
    const entry: Pending = {
      exchange,
      routingKey: message.routingKey,
      messageId: message.messageId,
      returned: false,
      sentAt: Date.now(),
      confirmed
    }
    const settle = (error: unknown) => {
      const index = this.pending.indexOf(entry)
      if (index >= 0) this.pending.splice(index, 1)
      if (this.pending.length === 0) this.stopSweep()
      Deferred.doneUnsafe(confirmed, this.outcome(entry, error))
      // Not closed by the broker (that would have settled everything with an error of its own),
      // so closing it ourselves sends nothing on a channel the broker closed.
      if (this.retired && this.pending.length === 0 && !this.closed) void this.channel.close().catch(() => undefined)
    }
    try {
      // The return value (write buffer full) is not a reason to wait: every caller waits for the
      // confirm anyway, and PublishBatch bounds its own window.
      this.channel.publish(exchange, message.routingKey, message.body, {
        persistent: true,
        mandatory: true,
        messageId: message.messageId,
        contentType: "application/json",
        ...(message.headers === undefined ? {} : { headers: message.headers })
      }, settle)
    } catch (cause) {
      // amqplib throws synchronously once the channel is closed or closing; should its 'close'
      // have gone unseen, this still makes the next publish open a fresh channel.
      this.markClosed()
      return Result.fail(new AmqpError({ operation: `publish '${message.messageId}'`, cause }))
    }
    this.pending.push(entry)
    this.sweep ??= setInterval(() => this.failOverdue(), CONFIRM_SWEEP_MS).unref()
    return Result.succeed(Deferred.await(confirmed))
  }

  /**
   * A confirm that has not come within CONFIRM_TIMEOUT_SECONDS fails its wait (a blocked broker
   * would otherwise hold the call forever); the publish stays pending, so a late return or
   * confirm still finds it. One timer per channel, not one per publish: a PublishBatch keeps 64
   * in flight, and a timer each cost the proxy ~15 µs per message.
   */
  private failOverdue(): void {
    const overdue = Date.now() - CONFIRM_TIMEOUT_SECONDS * 1000
    // In publish order: the first one not overdue ends the search.
    for (const entry of this.pending) {
      if (entry.sentAt > overdue) break
      // Already failed by an earlier sweep (it stays pending until its confirm or the channel's close).
      if (Deferred.isDoneUnsafe(entry.confirmed)) continue
      Deferred.doneUnsafe(entry.confirmed, Effect.fail(new ConfirmTimeout({ messageId: entry.messageId, seconds: CONFIRM_TIMEOUT_SECONDS })))
    }
  }

  private stopSweep(): void {
    if (this.sweep !== undefined) clearInterval(this.sweep)
    this.sweep = undefined
  }

  private markClosed(): void {
    this.stopSweep()
    this.closed = true
    this.onClosed()
  }

  /**
   * After a nack the next publish takes a fresh channel. A nack can be the channel's state, not
   * the message's: on RabbitMQ 3.10, a channel whose first publish to a quorum queue came while
   * the queue had no leader (its node just died, and the proxy reconnected within milliseconds)
   * gets every later publish to that queue nacked until that node returns, while a new channel
   * works as soon as a new leader is elected (about 0.5 s).
   */
  private retire(): void {
    if (this.retired) return
    this.retired = true
    this.onClosed()
  }

  private outcome(entry: Pending, error: unknown): Effect.Effect<void, PublishError> {
    if (error === null || error === undefined) {
      return entry.returned
        ? Effect.fail(new Unroutable({ messageId: entry.messageId, exchange: entry.exchange, routingKey: entry.routingKey }))
        : Effect.void
    }
    // amqplib reports a basic.nack as exactly this message, and a closed channel otherwise.
    if (error instanceof Error && error.message === "message nacked") {
      this.retire()
      return Effect.fail(new PublishNacked({ messageId: entry.messageId }))
    }
    return Effect.fail(new AmqpError({ operation: `publish '${entry.messageId}'`, cause: this.closedBy ?? error }))
  }
}

// One channel per connection object: a reconnect brings a new connection and so a new channel,
// and the WeakMap lets a dead connection's entry go with it. A module-level cache (rather than a
// service in the app's Layer) keeps the handlers' `run` (which provides only Broker) sufficient.
const publishChannels = new WeakMap<amqp.ChannelModel, Promise<PublishChannel>>()

const channelFor = (connection: amqp.ChannelModel): Promise<PublishChannel> => {
  const cached = publishChannels.get(connection)
  if (cached !== undefined) return cached
  const forget = () => {
    if (publishChannels.get(connection) === created) publishChannels.delete(connection)
  }
  // Cached as a promise so that concurrent first publishes share one channel.
  const created = connection.createConfirmChannel().then((channel) => new PublishChannel(channel, forget))
  void created.catch(forget)
  publishChannels.set(connection, created)
  return created
}

// ---------------------------------------------------------------------------------------------
// Publish
// ---------------------------------------------------------------------------------------------

export const publishOne = (rabbit: Rabbit, request: PublishRequest): Effect.Effect<PublishResponse, PublishError, Broker> =>
  Effect.gen(function*() {
    const message = { ...yield* Effect.fromResult(validatePublish(rabbit, request)), headers: yield* traceHeaders }
    const confirmed = yield* send(rabbit.exchange, message)
    yield* confirmed
    yield* Effect.logDebug("published", { messageId: message.messageId, routingKey: message.routingKey })
    return { messageId: message.messageId, routingKey: message.routingKey }
  })

// ---------------------------------------------------------------------------------------------
// PublishBatch
// ---------------------------------------------------------------------------------------------

/** The first failure of a batch, with how far the batch got. */
/** The caller's publish-rate bucket is empty (MESSAGING_PUBLISH_RATE). */
export class PublishRateExceeded extends Data.TaggedError("PublishRateExceeded")<{ readonly details: string }> {
  override get message(): string {
    return this.details
  }
}

export class BatchStopped extends Data.TaggedError("BatchStopped")<{
  readonly error: PublishError | BatchTooLarge | PublishRateExceeded
  /** Confirmed before the failing request (= its index). */
  readonly published: number
  /** Requests after the failing one that were already in flight and were confirmed too. */
  readonly publishedAfter: number
}> {}

/** The response would not fit in a gRPC message; checked before publishing, so nothing is lost. */
export class BatchTooLarge extends Data.TaggedError("BatchTooLarge")<{ readonly limitBytes: number }> {
  override get message(): string {
    return `batch too large: the message ids would exceed ${this.limitBytes} bytes in the response; split the batch`
  }
}

/** Reading the client's stream failed (client went away mid-stream). */
export class ClientStreamFailed extends Data.TaggedError("ClientStreamFailed")<{ readonly cause: unknown }> {
  override get message(): string {
    return `reading the request stream failed: ${describe(this.cause)}`
  }
}

export type BatchError = BatchStopped | ClientStreamFailed

export const batchStatus = (error: BatchError): Status => {
  if (error._tag === "ClientStreamFailed") return { code: grpc.status.CANCELLED, details: error.message }
  const cause = error.error._tag === "BatchTooLarge" || error.error._tag === "PublishRateExceeded"
    ? { code: grpc.status.RESOURCE_EXHAUSTED, details: error.error.message }
    : publishStatus(error.error)
  const after = error.publishedAfter > 0
    ? `; ${error.publishedAfter} later ones were already in flight and were published too`
    : ""
  return { code: cause.code, details: `${cause.details} (published ${error.published} before this one${after})` }
}

/** Confirms outstanding at once within one batch. */
const BATCH_WINDOW = 64
// grpc-js clients refuse responses over 4 MiB by default; keep a margin for the framing.
const MAX_RESPONSE_ID_BYTES = 3 * 1024 * 1024

interface InFlight {
  readonly messageId: string
  readonly confirmed: Effect.Effect<void, PublishError>
}

/**
 * Reads the requests in order, validates and publishes each, with up to BATCH_WINDOW confirms
 * outstanding. Results are taken in request order, so the first failure reported is the earliest
 * one; after it, the batch stops reading and publishing.
 */
export const publishBatch = (
  rabbit: Rabbit,
  /** The requests that have arrived since the last take (at least one), or undefined once the client half-closed. */
  nextRequests: Effect.Effect<ReadonlyArray<PublishRequest> | undefined, ClientStreamFailed>,
  /** One message's token from the caller's publish-rate bucket: the details when it is empty. */
  takeToken: Effect.Effect<string | undefined> = Effect.succeed(undefined)
): Effect.Effect<PublishBatchResponse, BatchError, Broker> =>
  Effect.gen(function*() {
    const messageIds: Array<string> = []
    const inFlight: Array<InFlight> = []
    let idBytes = 0
    let channel: PublishChannel | undefined

    // Waits for whatever is still in flight after a failure, to count what went through anyway.
    // Everything before the failing request has been settled by then (results are taken in order).
    const stop = (error: PublishError | BatchTooLarge | PublishRateExceeded) =>
      Effect.gen(function*() {
        const published = messageIds.length
        let publishedAfter = 0
        for (const later of inFlight.splice(0)) {
          if (Exit.isSuccess(yield* Effect.exit(later.confirmed))) publishedAfter++
        }
        return yield* new BatchStopped({ error, published, publishedAfter })
      })

    // A failed confirm ends the batch; defects and interrupts pass through untouched.
    const settleOldest = Effect.suspend(() => {
      const oldest = inFlight.shift()
      if (oldest === undefined) return Effect.void
      return Effect.matchEffect(oldest.confirmed, {
        onFailure: stop,
        onSuccess: () => Effect.sync(() => { messageIds.push(oldest.messageId) })
      })
    })

    const settleAll = Effect.gen(function*() {
      while (inFlight.length > 0) yield* settleOldest
    })

    // One context for the batch: its server span.
    const headers = yield* traceHeaders
    while (true) {
      const arrived = yield* nextRequests
      if (arrived === undefined) break
      for (const request of arrived) {
        if (inFlight.length >= BATCH_WINDOW) yield* settleOldest
        const valid = validatePublish(rabbit, request)
        if (Result.isFailure(valid)) {
          // Earlier requests come first: one of them may fail and be the one to report.
          yield* settleAll
          return yield* stop(valid.failure)
        }
        const exceeded = yield* takeToken
        if (exceeded !== undefined) {
          yield* settleAll
          return yield* stop(new PublishRateExceeded({ details: exceeded }))
        }
        const message = { ...valid.success, headers }
        // + protobuf tag and length of the repeated field, generously
        const size = Buffer.byteLength(message.messageId) + 8
        if (idBytes + size > MAX_RESPONSE_ID_BYTES) {
          yield* settleAll
          return yield* stop(new BatchTooLarge({ limitBytes: MAX_RESPONSE_ID_BYTES }))
        }
        idBytes += size
        // Looked up once per batch, again only when it has closed (then what was in flight failed).
        if (channel === undefined || !channel.usable) {
          channel = yield* publishChannel.pipe(Effect.catch((error) => settleAll.pipe(Effect.andThen(stop(error)))))
        }
        const confirmed = yield* sendOn(channel, rabbit.exchange, message).pipe(
          // A publish that could not even be sent: report it after the ones before it.
          Effect.catch((error) => settleAll.pipe(Effect.andThen(stop(error))))
        )
        inFlight.push({ messageId: message.messageId, confirmed })
      }
    }
    yield* settleAll
    yield* Effect.logDebug("batch published", { published: messageIds.length })
    return { published: messageIds.length, messageIds }
  })

const publishChannel: Effect.Effect<PublishChannel, BrokerNotConnected | AmqpError, Broker> = Effect.gen(function*() {
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

/** Publishes one validated message on `channel`; the returned Effect waits for its confirm. */
const sendOn = (channel: PublishChannel, exchange: string, message: ValidPublish) =>
  Effect.fromResult(channel.send(exchange, message))

/** Publishes one validated message on the connection's shared channel. */
const send = (exchange: string, message: ValidPublish): Effect.Effect<Effect.Effect<void, PublishError>, PublishError, Broker> =>
  Effect.flatMap(publishChannel, (channel) => sendOn(channel, exchange, message))

// ---------------------------------------------------------------------------------------------
// gRPC handlers
// ---------------------------------------------------------------------------------------------

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

/**
 * Takes what the client's stream has buffered, as one array, waiting for a first request if none
 * is there; undefined once the client half-closed and everything was taken. Reading only when
 * the batch asks for more keeps grpc-js's flow control in charge of the client, and taking the
 * buffer at once costs no promise and no Effect step per request (an async iterator did: ~10 %
 * of PublishBatch's CPU per message). The stream is never destroyed here: that would end the call
 * before its status is sent.
 */
const arrivedRequests = (call: grpc.ServerReadableStream<PublishRequest, unknown>) =>
  Effect.callback<ReadonlyArray<PublishRequest> | undefined, ClientStreamFailed>((resume) => {
    const take = (): boolean => {
      const arrived: Array<PublishRequest> = []
      for (let request: PublishRequest | null = call.read(); request !== null; request = call.read()) arrived.push(request)
      if (arrived.length > 0) resume(Effect.succeed(arrived))
      else if (call.readableEnded) resume(Effect.succeed(undefined))
      else if (call.errored !== null) resume(Effect.fail(new ClientStreamFailed({ cause: call.errored })))
      else return false
      return true
    }
    if (take()) return
    const detach = () => {
      call.off("readable", onReadable)
      call.off("end", onReadable)
      call.off("error", onError)
    }
    const onReadable = () => {
      if (take()) detach()
    }
    const onError = (cause: unknown) => {
      detach()
      resume(Effect.fail(new ClientStreamFailed({ cause })))
    }
    call.on("readable", onReadable)
    call.on("end", onReadable)
    call.on("error", onError)
    return Effect.sync(detach)
  })

export const publishBatchHandler = (
  settings: ProxySettings,
  run: RunHandler,
  rateLimits: RateLimits["Service"]
): grpc.handleClientStreamingCall<PublishRequest, PublishBatchResponse> =>
(call, callback) => {
  // Each message takes a token from the caller's publish-rate bucket (rateLimits.ts).
  const caller = callerOf(call) ?? call.getPeer()
  const takeToken = rateLimits.take(rateLimits.publish, caller, 1)
  runCall(
    run,
    call,
    "PublishBatch",
    publishBatch(settings.rabbit, arrivedRequests(call), takeToken).pipe(
      Effect.tap((batch) => Effect.sync(() => recordAudit(call, { published: batch.published, ...idsForAudit(batch.messageIds) })))
    ),
    callback,
    batchStatus
  )
}
