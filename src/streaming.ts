/**
 * Serving one server-streaming call from one queue: deliveries are decoded, written into the
 * grpc-js call with backpressure, and acked only once grpc-js has accepted the write. Bodies the
 * codec rejects are dead-lettered (confirmed) and then acked; the stream goes on.
 */
import * as grpc from "@grpc/grpc-js"
import { Cause, Effect, Exit, Result, Stream } from "effect"
import type { Broker } from "./broker.js"
import type { BodyRejected } from "./codec.js"
import { consume, type ConsumeError } from "./consumer.js"

export interface QueueStreamSpec<A> {
  readonly queue: string
  readonly deadLetterQueue: string
  readonly prefetch: number
  readonly decode: (body: Buffer) => Result.Result<A, BodyRejected>
}

/** What a consumer failure means to the client, as a gRPC status. */
export const statusOf = (error: ConsumeError): { code: grpc.status; details: string } => {
  switch (error._tag) {
    case "ConnectionLost":
      return { code: grpc.status.UNAVAILABLE, details: error.message }
    case "ConsumerClosedByBroker":
      return {
        code: /NOT_FOUND|\b404\b/.test(error.reason) ? grpc.status.NOT_FOUND : grpc.status.ABORTED,
        details: error.message
      }
    case "AmqpError":
      return { code: grpc.status.UNAVAILABLE, details: error.message }
  }
}

/** Resolves when the call can take more writes, or when it is cancelled (no 'drain' follows a cancel). */
const drainOrCancel = (call: grpc.ServerWritableStream<unknown, unknown>) =>
  Effect.callback<void>((resume) => {
    if (call.cancelled) return resume(Effect.void)
    const done = () => resume(Effect.void)
    call.once("drain", done)
    call.once("cancelled", done)
    return Effect.sync(() => {
      call.off("drain", done)
      call.off("cancelled", done)
    })
  })

const endReason = (call: grpc.ServerWritableStream<unknown, unknown>, exit: Exit.Exit<unknown, ConsumeError>) => {
  if (call.cancelled) {
    const deadline = call.getDeadline()
    const expired = deadline instanceof Date ? deadline.getTime() <= Date.now()
      : Number.isFinite(deadline) && deadline <= Date.now()
    return expired ? "deadline exceeded" : "client cancelled"
  }
  if (Exit.isSuccess(exit)) return "completed"
  if (Cause.hasInterruptsOnly(exit.cause)) return "server shutting down"
  return Cause.pretty(exit.cause).split("\n")[0] ?? "failed"
}

export const serveQueueStream = <Req, A>(
  call: grpc.ServerWritableStream<Req, A>,
  spec: QueueStreamSpec<A>
): Effect.Effect<void, never, Broker> => {
  const counts = { delivered: 0, deadLettered: 0 }
  const writable = call as grpc.ServerWritableStream<unknown, unknown>
  return Effect.logInfo("stream opened", { queue: spec.queue }).pipe(
    Effect.andThen(
      consume({ queue: spec.queue, prefetch: spec.prefetch, deadLetterQueue: spec.deadLetterQueue }).pipe(
        Stream.runForEach((delivery) => {
          const decoded = spec.decode(delivery.message.content)
          if (Result.isFailure(decoded)) {
            const reason = decoded.failure.reason
            return delivery.deadLetter(reason).pipe(
              Effect.tap(() => {
                counts.deadLettered++
                return Effect.logWarning("malformed body dead-lettered", {
                  queue: spec.queue,
                  deadLetterQueue: spec.deadLetterQueue,
                  messageId: delivery.message.properties.messageId,
                  reason
                })
              })
            )
          }
          // Ack in the write callback: only then has grpc-js taken the message; a write that never
          // completes (cancel) leaves it unacked, and closing the channel returns it to the queue.
          const accepted = call.write(decoded.success, (error: Error | null | undefined) => {
            if (error == null && delivery.ack()) counts.delivered++
          })
          return accepted ? Effect.void : drainOrCancel(writable)
        })
      )
    ),
    Effect.onExit((exit) =>
      Effect.gen(function*() {
        const reason = endReason(writable, exit)
        if (!call.cancelled) {
          if (Exit.isSuccess(exit)) call.end()
          else {
            const failure = Exit.findErrorOption(exit)
            const status = failure._tag === "Some"
              ? statusOf(failure.value)
              : { code: grpc.status.UNAVAILABLE, details: "messaging-proxy is shutting down" }
            call.emit("error", status)
          }
        }
        yield* Effect.logInfo("stream ended", { queue: spec.queue, reason, ...counts })
      })
    ),
    Effect.catch(() => Effect.void)
  )
}
