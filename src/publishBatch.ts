/**
 * PublishBatch: a client stream of PublishRequests, each validated and published like Publish
 * (publishing.ts), with up to BATCH_WINDOW confirms outstanding; one answer with the ids, in
 * request order, once every publish is confirmed. The first failure in request order ends the
 * batch: nothing after it is read or published, and the status says how many went through.
 *
 * The steady state runs in plain callbacks, as a direct amqplib publisher does: the confirm that
 * frees a place in the window publishes the next request, already read and validated, in the same
 * tick, and reads the next one ahead. The batch's fiber only starts it, opens the channel when
 * there is none, takes rate-limit tokens (an Effect, in Redis when configured) and waits for the
 * end. Before (a fiber step per request and per confirm, reading only when the window had room),
 * the window ran with no request ready ~20 % of the time, and the proxy spent ~35 µs per message.
 */
import * as grpc from "@grpc/grpc-js"
import { Data, Effect, Result } from "effect"
import type { Readable } from "node:stream"
import type { PublishBatchResponse, PublishRequest } from "../gen/messaging.js"
import type { Broker } from "./broker/Broker.js"
import type { ConfirmError, PublishChannel } from "./broker/publishChannel.js"
import { callerOf } from "./access.js"
import { idsForAudit, recordAudit } from "./audit.js"
import type { ProxySettings } from "./config.js"
import { describe } from "./errors.js"
import { widenReceiveWindow } from "./http2Stream.js"
import {
  publishChannel,
  type PublishError,
  publishStatus,
  traceHeaders,
  type ValidPublish,
  validatePublish
} from "./publishing.js"
import type { RateLimits } from "./rateLimits.js"
import { type RunHandler, runCall, type Status } from "./unaryCall.js"

type Rabbit = ProxySettings["rabbit"]

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/** The caller's publish-rate bucket is empty (MESSAGING_PUBLISH_RATE). */
export class PublishRateExceeded extends Data.TaggedError("PublishRateExceeded")<{ readonly details: string }> {
  override get message(): string {
    return this.details
  }
}

/** The response would not fit in a gRPC message; checked before publishing, so nothing is lost. */
export class BatchTooLarge extends Data.TaggedError("BatchTooLarge")<{ readonly limitBytes: number }> {
  override get message(): string {
    return `batch too large: the message ids would exceed ${this.limitBytes} bytes in the response; split the batch`
  }
}

/** Why the request at some place in the batch was not published, or not confirmed. */
export type BatchCause = PublishError | BatchTooLarge | PublishRateExceeded

/** The first failure of a batch, with how far the batch got. */
export class BatchStopped extends Data.TaggedError("BatchStopped")<{
  readonly error: BatchCause
  /** Confirmed before the failing request (= its index). */
  readonly published: number
  /** Requests after the failing one that were already in flight and were confirmed too. */
  readonly publishedAfter: number
}> {}

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

// ---------------------------------------------------------------------------------------------
// The batch
// ---------------------------------------------------------------------------------------------

/** Confirms outstanding at once within one batch. */
const BATCH_WINDOW = 64
/**
 * Requests read and validated ahead of the window, at most (and at most READ_AHEAD_BYTES of
 * bodies, but always one): a burst of confirms frees up to a window's places at once, and
 * grpc-js holds only 16 parsed requests (then pauses the HTTP/2 stream); without them the
 * window ran below 40 in flight for ~20 % of a batch.
 */
const READ_AHEAD = 64
const READ_AHEAD_BYTES = 1024 * 1024
/**
 * The HTTP/2 receive windows of a session that publishes in batches: 1 MiB per stream (~1,000
 * requests of 1 KiB in flight from the client, so it need not wait for a window update in the
 * middle of a batch), 4 MiB for the session: what the proxy may hold unread per client connection.
 */
const STREAM_WINDOW_BYTES = 1024 * 1024
const SESSION_WINDOW_BYTES = 4 * 1024 * 1024
// grpc-js clients refuse responses over 4 MiB by default; keep a margin for the framing.
const MAX_RESPONSE_ID_BYTES = 3 * 1024 * 1024

/** The client's request stream: a grpc-js ServerReadableStream, or any object-mode Readable of requests. */
export type RequestStream = Omit<Readable, "read"> & { read(size?: number): PublishRequest | null }

const PENDING = 0
const CONFIRMED = 1

/** A request that went out, in request order: its confirm outstanding, in, or failed. */
interface Sent {
  readonly messageId: string
  outcome: typeof PENDING | typeof CONFIRMED | ConfirmError
}

/** A request that was not published (invalid, over the rate, too large, no channel): the batch ends at its place. */
interface Refused {
  readonly refused: BatchCause
}

/** What the batch's fiber is asked to do next (`done` once the answer is there). */
type Need = "channel" | "tokens" | "done"

/**
 * One batch's state. Every method runs synchronously, in a confirm's callback, a stream event or
 * a step of the fiber; `next` is the fiber's only wait.
 */
class BatchRun {
  /** Confirmed, in request order: the answer. */
  readonly messageIds: Array<string> = []
  /** Sent or refused and not yet taken in order; at most BATCH_WINDOW + 1. */
  private readonly places: Array<Sent | Refused> = []
  private inFlight = 0
  private idBytes = 0
  /** Read, validated (and, with a rate limit, paid for) and not yet sent, in order. */
  private readonly ahead: Array<ValidPublish> = []
  /** Rate-limit mode: read and validated, in order after `ahead`, waiting for the fiber to take their tokens. */
  private readonly unpaid: Array<ValidPublish> = []
  /** Bodies' bytes in `ahead` and `unpaid`. */
  private aheadBytes = 0
  /** Why the request after the last of `ahead` and `unpaid` is not published; nothing is read after it. */
  private refusedAhead: BatchCause | undefined
  /** Set once nothing more is sent: a request was refused or a confirm failed. */
  private halted = false
  /** The client half-closed and every request was read. */
  private ended = false
  private needsChannel = false
  private channel: PublishChannel | undefined
  /** The answer, once there. */
  private result: Effect.Effect<PublishBatchResponse, BatchError> | undefined
  private wake: ((need: Effect.Effect<Need, BatchError>) => void) | undefined

  constructor(
    private readonly rabbit: Rabbit,
    private readonly requests: RequestStream,
    private readonly headers: Record<string, string> | undefined,
    /** Tokens are taken by the fiber (MESSAGING_PUBLISH_RATE is set): validated requests wait in `unpaid` for it. */
    private readonly paidByFiber: boolean
  ) {
    requests.on("readable", this.onReadable)
    requests.on("end", this.onReadable)
    requests.on("error", this.onError)
    if (requests.errored !== null) this.onError(requests.errored)
  }

  /** Waits until the fiber has something to do; fails when the batch does. */
  readonly next: Effect.Effect<Need, BatchError> = Effect.callback<Need, BatchError>((resume) => {
    this.wake = resume
    this.pump()
    this.signal()
    return Effect.sync(() => {
      this.wake = undefined
    })
  })

  /** The answer, once `next` said `done`. */
  get answer(): Effect.Effect<PublishBatchResponse, BatchError> {
    return this.result ?? Effect.die(new Error("PublishBatch: no answer yet"))
  }

  /** Stops listening; later confirms change nothing. Runs whenever the fiber ends, however. */
  readonly detach = (): void => {
    this.result ??= Effect.interrupt
    this.requests.off("readable", this.onReadable)
    this.requests.off("end", this.onReadable)
    this.requests.off("error", this.onError)
  }

  /** The channel to send on, or the reason none could be opened (the waiting request's). */
  setChannel(channel: Result.Result<PublishChannel, PublishError>): void {
    this.needsChannel = false
    if (Result.isSuccess(channel)) this.channel = channel.success
    else this.refuse(channel.failure)
  }

  /**
   * Rate-limit mode: whether a validated request waits for its token. The first of them stays in
   * `unpaid` until `pay`: while its token is awaited, the batch is not over.
   */
  hasUnpaid(): boolean {
    return !this.halted && this.unpaid.length > 0
  }

  /**
   * Rate-limit mode: the first request in `unpaid` paid for, or refused with the details of the
   * empty bucket; then the batch ends at its place, before any later request's refusal.
   */
  pay(exceeded: string | undefined): void {
    const message = this.unpaid.shift()
    if (message === undefined) return
    if (exceeded === undefined) this.ahead.push(message)
    else {
      this.unpaid.length = 0
      this.refusedAhead = new PublishRateExceeded({ details: exceeded })
    }
    this.pump()
  }

  /**
   * Validates a request and counts its id against the response's size; undefined when refused
   * (then it ends the batch at its place, and nothing after it is read).
   */
  private admit(request: PublishRequest): ValidPublish | undefined {
    if (this.refusedAhead !== undefined) return undefined
    const valid = validatePublish(this.rabbit, request)
    if (Result.isFailure(valid)) {
      this.refusedAhead = valid.failure
      return undefined
    }
    // + protobuf tag and length of the repeated field, generously
    const size = Buffer.byteLength(valid.success.messageId) + 8
    if (this.idBytes + size > MAX_RESPONSE_ID_BYTES) {
      this.refusedAhead = new BatchTooLarge({ limitBytes: MAX_RESPONSE_ID_BYTES })
      return undefined
    }
    this.idBytes += size
    return this.headers === undefined ? valid.success : { ...valid.success, headers: this.headers }
  }

  private readonly onReadable = (): void => {
    this.pump()
    this.signal()
  }

  private readonly onError = (cause: unknown): void => {
    this.finish(Effect.fail(new ClientStreamFailed({ cause })))
  }

  private hasRoomAhead(): boolean {
    const held = this.ahead.length + this.unpaid.length
    return !this.halted && this.refusedAhead === undefined &&
      (held === 0 || (held < READ_AHEAD && this.aheadBytes < READ_AHEAD_BYTES))
  }

  /**
   * Reads and validates what the stream holds, as far as the read-ahead has room: ready to send,
   * or, with a rate limit, for the fiber to take tokens for first.
   */
  private readAhead(): void {
    while (this.hasRoomAhead()) {
      const request = this.requests.read()
      if (request === null) {
        if (this.requests.readableEnded) this.ended = true
        return
      }
      const message = this.admit(request)
      if (message === undefined) return
      this.aheadBytes += message.body.length
      if (this.paidByFiber) this.unpaid.push(message)
      else this.ahead.push(message)
    }
  }

  /** Sends what the window has room for, reads ahead again, then takes what has settled in order. */
  private pump(): void {
    if (this.result !== undefined) return
    this.readAhead()
    while (!this.halted && this.inFlight < BATCH_WINDOW) {
      const message = this.ahead.shift()
      if (message === undefined) {
        // A refusal takes its place once everything before it has gone out.
        if (this.refusedAhead !== undefined && this.unpaid.length === 0) this.refuse(this.refusedAhead)
        break
      }
      if (this.channel === undefined || !this.channel.usable) {
        // It waits, first in line, for the fiber to open one.
        this.ahead.unshift(message)
        this.needsChannel = true
        break
      }
      this.aheadBytes -= message.body.length
      const sent: Sent = { messageId: message.messageId, outcome: PENDING }
      const unsent = this.channel.send(this.rabbit.exchange, message, (error) => this.confirmed(sent, error))
      if (unsent !== undefined) {
        this.refuse(unsent)
        break
      }
      this.places.push(sent)
      this.inFlight++
    }
    this.readAhead()
    this.takeInOrder()
  }

  private confirmed(sent: Sent, error: ConfirmError | undefined): void {
    sent.outcome = error ?? CONFIRMED
    this.inFlight--
    // The batch ends at the first failure in request order; nothing more goes out.
    if (error !== undefined) this.halted = true
    this.pump()
    this.signal()
  }

  /** Ends the batch at the next place: nothing more is sent. */
  private refuse(cause: BatchCause): void {
    if (this.halted) return
    this.halted = true
    this.places.push({ refused: cause })
  }

  /** Moves confirmed ids to the answer in request order; ends the batch at the first failure or the end. */
  private takeInOrder(): void {
    while (this.places.length > 0) {
      const first = this.places[0]!
      if ("refused" in first) return this.stopAt(first.refused)
      if (first.outcome === PENDING) return
      if (first.outcome !== CONFIRMED) return this.stopAt(first.outcome)
      this.messageIds.push(first.messageId)
      this.places.shift()
    }
    if (this.ended && this.ahead.length === 0 && this.unpaid.length === 0 && this.refusedAhead === undefined && !this.halted) {
      this.finish(Effect.succeed({ published: this.messageIds.length, messageIds: this.messageIds }))
    }
  }

  /** The first failure in order: answered once everything sent after it has settled, to count those. */
  private stopAt(error: BatchCause): void {
    if (this.inFlight > 0) return
    let publishedAfter = 0
    for (const place of this.places) if ("outcome" in place && place.outcome === CONFIRMED) publishedAfter++
    this.finish(Effect.fail(new BatchStopped({ error, published: this.messageIds.length, publishedAfter })))
  }

  private finish(result: Effect.Effect<PublishBatchResponse, BatchError>): void {
    if (this.result !== undefined) return
    this.result = result
    this.detach()
    this.signal()
  }

  /** Wakes the fiber when it has something to do. */
  private signal(): void {
    const wake = this.wake
    if (wake === undefined) return
    let need: Need | undefined
    if (this.result !== undefined) need = "done"
    else if (this.halted) need = undefined
    else if (this.needsChannel) need = "channel"
    else if (this.hasUnpaid()) need = "tokens"
    if (need === undefined) return
    this.wake = undefined
    wake(Effect.succeed(need))
  }
}

/**
 * Reads the client's stream of requests in order, validates and publishes each, with up to
 * BATCH_WINDOW confirms outstanding, and answers `{ published, messageIds }` once all are
 * confirmed. Fails with BatchStopped at the first failure in request order (what it was, how many
 * were published before it, how many already sent after it were confirmed too), or with
 * ClientStreamFailed. `takeToken` (one message's token from the caller's publish-rate bucket:
 * the details when it is empty) is taken for each request after it is validated.
 */
export const publishBatch = (
  rabbit: Rabbit,
  requests: RequestStream,
  takeToken: Effect.Effect<string | undefined> | undefined
): Effect.Effect<PublishBatchResponse, BatchError, Broker> =>
  Effect.suspend(() => {
    let run: BatchRun | undefined
    return Effect.gen(function*() {
      // One context for the batch: its server span.
      const batch = new BatchRun(rabbit, requests, yield* traceHeaders, takeToken !== undefined)
      run = batch
      while (true) {
        const need = yield* batch.next
        if (need === "done") break
        if (need === "channel") batch.setChannel(yield* Effect.result(publishChannel))
        else if (takeToken !== undefined) {
          while (batch.hasUnpaid()) batch.pay(yield* takeToken)
        }
      }
      const response = yield* batch.answer
      yield* Effect.logDebug("batch published", { published: response.published })
      return response
    }).pipe(Effect.ensuring(Effect.sync(() => run?.detach())))
  })

export const publishBatchHandler = (
  settings: ProxySettings,
  run: RunHandler,
  rateLimits: RateLimits["Service"]
): grpc.handleClientStreamingCall<PublishRequest, PublishBatchResponse> =>
(call, callback) => {
  // Each message takes a token from the caller's publish-rate bucket (rateLimits.ts), when one is set.
  const caller = callerOf(call) ?? call.getPeer()
  const takeToken = rateLimits.publish._tag === "Some" ? rateLimits.take(rateLimits.publish, caller, 1) : undefined
  widenReceiveWindow(call, STREAM_WINDOW_BYTES, SESSION_WINDOW_BYTES)
  runCall(
    run,
    call,
    "PublishBatch",
    publishBatch(settings.rabbit, call, takeToken).pipe(
      Effect.tap((batch) => Effect.sync(() => recordAudit(call, { published: batch.published, ...idsForAudit(batch.messageIds) })))
    ),
    callback,
    batchStatus
  )
}
