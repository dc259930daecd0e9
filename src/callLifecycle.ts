/**
 * What server-streaming and bidi calls share: writing with backpressure, and ending the call with
 * the status that matches how the work ended, plus the reason for the log line.
 */
import * as grpc from "@grpc/grpc-js"
import type { Writable } from "node:stream"
import { Cause, Effect, Exit } from "effect"
import { channelsExhausted, type ConsumeError } from "./consumer.js"
import type { AmqpError } from "./errors.js"
import { http2StreamOf, sentStatusCode } from "./http2Stream.js"
import { EncodedMessages, responseSerializer } from "./serialization.js"

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
 * Writes the call's messages to its HTTP/2 stream ourselves, and lets several queued messages go
 * out as one HTTP/2 write. grpc-js's call is a Writable with only `_write`, so Node waits for each
 * message's write before starting the next, and each message costs grpc-js's layers (one
 * `sendMessage` per interceptor), its framing copy, a write through the HTTP/2 stream's own
 * Writable and nghttp2's bookkeeping for it. With `_writev`, what queued up during a write goes
 * down together, in order: each message is serialized by the RPC's own response serializer,
 * framed the way grpc-js frames it (1 byte compressed flag 0, 4 bytes big-endian length, the
 * bytes: gRPC over HTTP/2, "Length-Prefixed-Message"), and the frames go to the HTTP/2 stream in
 * one write. Node calls the batch's write callbacks together, once the whole batch is written. A
 * chunk that is an EncodedMessages (serialization.ts) carries several messages, each framed on its own.
 *
 * grpc-js's own `sendMessage` still sends the first message (it sends the response headers
 * first) and any batch while the stream is closing, so its cancellation behaviour (a write on a
 * cancelled call never completes) holds. What the batch path skips from it: the per-message size
 * check and a serializer that throws, both excluded at admission (redelivery.ts checks sizes before
 * anything is written; a serializer that throws falls back to grpc-js), and channelz's
 * messages-sent count, which the proxy does not expose. The one server interceptor
 * (authInterceptor.ts) passes messages through, so bypassing the interceptor chain changes nothing.
 */
export const batchWrites = <A>(call: OutgoingCall<A>): void => {
  const writable: Writable = call
  const serialize = responseSerializer(call.getPath())
  const stream = http2StreamOf(call)
  const throughGrpc = writable._write.bind(writable)
  /** Each chunk through grpc-js, an EncodedMessages as its messages one by one; `callback` once all are written. */
  const oneByOne = (chunks: ReadonlyArray<{ chunk: unknown; encoding: BufferEncoding }>, callback: (error?: Error | null) => void) => {
    const messages = chunks.flatMap(({ chunk, encoding }) =>
      chunk instanceof EncodedMessages ? chunk.messages.map((message) => ({ chunk: message, encoding })) : [{ chunk, encoding }]
    )
    let remaining = messages.length
    if (remaining === 0) return callback()
    let failed = false
    for (const { chunk, encoding } of messages) {
      throughGrpc(chunk, encoding, (error?: Error | null) => {
        if (failed) return
        if (error != null) {
          failed = true
          return callback(error)
        }
        if (--remaining === 0) callback()
      })
    }
  }
  /** The frames of `chunks` written at once, or false where grpc-js has to write them (see above). */
  const direct = (chunks: ReadonlyArray<{ chunk: unknown }>, callback: (error?: Error | null) => void): boolean => {
    if (serialize === undefined || stream === undefined || !stream.headersSent || stream.destroyed || stream.closed) return false
    const messages: Array<Uint8Array> = []
    try {
      for (const { chunk } of chunks) {
        if (chunk instanceof EncodedMessages) messages.push(...chunk.messages)
        else messages.push(serialize(chunk))
      }
    } catch {
      return false
    }
    stream.write(grpcFrames(messages), (error?: Error | null) => callback(error))
    return true
  }
  writable._write = (chunk, encoding, callback) => {
    if (!direct([{ chunk }], callback)) oneByOne([{ chunk, encoding }], callback)
  }
  writable._writev = (chunks, callback) => {
    if (!direct(chunks, callback)) oneByOne(chunks, callback)
  }
}

/** gRPC length-prefixed frames (uncompressed) of the given messages, in one buffer. */
const grpcFrames = (messages: ReadonlyArray<Uint8Array>): Buffer => {
  let size = 0
  for (const message of messages) size += message.byteLength + 5
  const frames = Buffer.allocUnsafe(size)
  let offset = 0
  for (const message of messages) {
    frames[offset] = 0
    frames.writeUInt32BE(message.byteLength, offset + 1)
    frames.set(message, offset + 5)
    offset += message.byteLength + 5
  }
  return frames
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
