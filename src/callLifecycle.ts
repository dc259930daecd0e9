/**
 * What server-streaming and bidi calls share: writing with backpressure, and ending the call with
 * the status that matches how the work ended, plus the reason for the log line.
 */
import * as grpc from "@grpc/grpc-js"
import type { Writable } from "node:stream"
import { Cause, Effect, Exit } from "effect"
import { channelsExhausted, type ConsumeError } from "./consumer.js"
import type { AmqpError } from "./errors.js"
import { sentStatusCode } from "./http2Stream.js"

/** The part of a grpc-js server call (writable or duplex) the proxy writes to. */
export type OutgoingCall<A> = grpc.ServerWritableStream<unknown, A> | grpc.ServerDuplexStream<unknown, A>

/** The status of every call the proxy ends because it is shutting down. */
export const shuttingDown = { code: grpc.status.UNAVAILABLE, details: "messaging-proxy is shutting down" } as const

/** A failure that ends a call with a chosen status (e.g. a bad first message). */
export class CallRejected {
  readonly _tag = "CallRejected"
  constructor(readonly code: grpc.status, readonly details: string) {}
}

export type CallError = ConsumeError | AmqpError | CallRejected

/** What a failure means to the client, as a gRPC status. */
export const statusOf = (error: CallError): { code: grpc.status; details: string } => {
  switch (error._tag) {
    case "CallRejected":
      return { code: error.code, details: error.details }
    case "ConnectionLost":
      return { code: grpc.status.UNAVAILABLE, details: error.message }
    case "ConsumerClosedByBroker":
      return {
        // A classic queue whose home node is down answers 404 too, but it comes back: retryable.
        code: /down or inaccessible/.test(error.reason)
          ? grpc.status.UNAVAILABLE
          : /NOT_FOUND|\b404\b/.test(error.reason)
          ? grpc.status.NOT_FOUND
          : grpc.status.ABORTED,
        details: error.message
      }
    case "AmqpError":
      return channelsExhausted(error)
        ? { code: grpc.status.RESOURCE_EXHAUSTED, details: `broker channel limit reached: ${error.message}` }
        : { code: grpc.status.UNAVAILABLE, details: error.message }
  }
}

/**
 * Lets grpc-js hand several queued messages to HTTP/2 at once. Its call is a Writable with only
 * `_write`, so Node waits for each message's socket write before starting the next: one syscall
 * (and one TCP segment to the client) per message. With `_writev`, what queued up during that
 * write goes down together, in order. Node calls the batch's write callbacks together, once the
 * whole batch is written.
 *
 * This relies on grpc-js's `sendMessage` never refusing a message here: a refusal (too large,
 * or a serializer that throws) ends the HTTP/2 stream, and the next write of the same batch would
 * then fail without a status. So sizes are checked at admission, before anything is written
 * (redelivery.ts), and the one server interceptor (authInterceptor.ts) passes messages through.
 */
export const batchWrites = <A>(call: OutgoingCall<A>): void => {
  const writable: Writable = call
  writable._writev = function(chunks, callback) {
    let remaining = chunks.length
    let failed = false
    for (const { chunk, encoding } of chunks) {
      this._write(chunk, encoding, (error?: Error | null) => {
        if (failed) return
        if (error != null) {
          failed = true
          return callback(error)
        }
        if (--remaining === 0) callback()
      })
    }
  }
}

/** Resolves when the call can take more writes, or when it is cancelled (no 'drain' follows a cancel). */
export const drainOrCancel = <A>(call: OutgoingCall<A>) =>
  Effect.callback<void>((resume) => {
    if (call.cancelled) return resume(Effect.void)
    const detach = () => {
      call.off("drain", done)
      call.off("cancelled", done)
    }
    // Detach both on either event: a listener left behind per wait would pile up on long streams.
    const done = () => {
      detach()
      resume(Effect.void)
    }
    call.on("drain", done)
    call.on("cancelled", done)
    return Effect.sync(detach)
  })

/** Writes one message; suspends only when grpc-js asks us to wait. */
export const writeWithBackpressure = <A>(
  call: OutgoingCall<A>,
  message: A,
  onAccepted?: (error: Error | null | undefined) => void
): Effect.Effect<void> => call.write(message, onAccepted) ? Effect.void : drainOrCancel(call)

/**
 * Writes `items` in order through `write` (which returns grpc-js's answer: false = wait), waiting
 * for a drain only when grpc-js asks; a chunk that fits costs no Effect step per item.
 */
export const writeAllWithBackpressure = <A, I>(
  call: OutgoingCall<A>,
  items: ReadonlyArray<I>,
  write: (item: I) => boolean
): Effect.Effect<void> => {
  const from = (start: number): Effect.Effect<void> => {
    for (let i = start; i < items.length; i++) {
      // Once the client is gone nothing is written (or handed out): the rest stays unacked on
      // the channel, which requeues it when the call's scope closes.
      if (call.cancelled) return Effect.void
      if (!write(items[i]!)) {
        return Effect.flatMap(drainOrCancel(call), () => from(i + 1))
      }
    }
    return Effect.void
  }
  return from(0)
}

/**
 * How much earlier than the server's deadline a client's cancel still counts as its deadline. The
 * client's clock starts when it sends the call and the server's when it receives it, so a client
 * that gives up at its deadline resets the stream before the server's own deadline (by the time
 * the call's first frame took to arrive, longer on a busy machine).
 */
const deadlineSlackMs = 1_000

/**
 * Whether a call that ended without the handler ending it ended on its deadline (grpc-js reports a
 * client's cancel and its own deadline alike, as a cancel): the deadline is at most
 * `deadlineSlackMs` away, or grpc-js already sent DEADLINE_EXCEEDED on the stream.
 */
export const deadlinePassed = (
  call: Parameters<typeof sentStatusCode>[0] & { readonly getDeadline: () => grpc.Deadline }
): boolean => {
  if (sentStatusCode(call) === grpc.status.DEADLINE_EXCEEDED) return true
  const deadline = call.getDeadline()
  const at = deadline instanceof Date ? deadline.getTime() : deadline
  return Number.isFinite(at) && at - deadlineSlackMs <= Date.now()
}

/**
 * Ends the call to match `exit` (unless the client already went away) and returns why it ended:
 * OK on success, the failure's status, or UNAVAILABLE when the server interrupted it (shutdown).
 */
export const finishCall = <A>(call: OutgoingCall<A>, exit: Exit.Exit<unknown, CallError>): string => {
  if (call.cancelled) return deadlinePassed(call) ? "deadline exceeded" : "client cancelled"
  // grpc-js sends DEADLINE_EXCEEDED before the handler hears of it: a subscription can see its
  // requests end and complete in between.
  if (sentStatusCode(call) === grpc.status.DEADLINE_EXCEEDED) return "deadline exceeded"
  if (Exit.isSuccess(exit)) {
    call.end()
    return "completed"
  }
  const failure = Exit.findErrorOption(exit)
  if (failure._tag === "Some") {
    const status = statusOf(failure.value)
    call.emit("error", status)
    return `${grpc.status[status.code]}: ${status.details}`
  }
  if (Cause.hasInterruptsOnly(exit.cause)) {
    call.emit("error", shuttingDown)
    return "server shutting down"
  }
  call.emit("error", { code: grpc.status.INTERNAL, details: "internal error" })
  return Cause.pretty(exit.cause).split("\n")[0] ?? "defect"
}
