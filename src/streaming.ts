/**
 * Serving one server-streaming call from one queue: deliveries are checked (see redelivery.ts),
 * written into the grpc-js call with backpressure, and acked only once grpc-js has accepted the
 * write. The consumer re-attaches after a broker connection loss without ending the call.
 */
import * as grpc from "@grpc/grpc-js"
import { Effect, Stream } from "effect"
import type { Broker } from "./broker/Broker.js"
import { batchWrites, finishCall, writeAllWithBackpressure } from "./callLifecycle.js"
import type { Delivery } from "./consumer.js"
import * as Metrics from "./metrics.js"
import { type AdmissionPolicy, admittedDeliveries, deadLetteredIn } from "./redelivery.js"

export interface QueueStreamSpec<A> extends AdmissionPolicy<A> {
  readonly deadLetterQueue: string
  readonly prefetch: number
}

/**
 * Acks what grpc-js has taken, batched: one multiple-ack per quarter of the prefetch window, or
 * after 1 ms, instead of a frame (and a socket write) per message. Safe because grpc-js completes
 * writes in order and every delivery before a written one was either written too or dead-lettered
 * (acked) already; after a failed write nothing more is acked, so a multiple-ack can never cover
 * an unwritten message.
 */
const makeAckBatcher = (prefetch: number, onAcked: (count: number) => void) => {
  // Small enough that the broker always has most of the window to refill.
  const batch = Math.max(1, Math.floor(prefetch / 4))
  let last: Delivery | undefined
  let count = 0
  let timer: NodeJS.Timeout | undefined
  let broken = false
  const flush = () => {
    if (timer !== undefined) clearTimeout(timer)
    timer = undefined
    if (last === undefined) return
    const upTo = last
    const acked = count
    last = undefined
    count = 0
    if (!broken && upTo.ackUpTo()) onAcked(acked)
  }
  return {
    written: (delivery: Delivery, error: Error | null | undefined) => {
      if (error != null) broken = true
      if (broken) return
      if (last !== undefined && last.channel !== delivery.channel) flush() // re-attached: new tags
      last = delivery
      count++
      if (count >= batch) flush()
      else timer ??= setTimeout(flush, 1)
    },
    flush
  }
}

export const serveQueueStream = <Req, A>(
  call: grpc.ServerWritableStream<Req, A>,
  spec: QueueStreamSpec<A>
): Effect.Effect<void, never, Broker> => {
  const counts = { delivered: 0, deadLettered: 0 }
  const rpc = Metrics.rpcName(call)
  // Messages go out as the bytes encoded at admission (see serialization.ts).
  const outgoing = call as unknown as grpc.ServerWritableStream<unknown, A | Uint8Array>
  const acks = makeAckBatcher(spec.prefetch, (acked) => {
    counts.delivered += acked
    Metrics.deliveredUnsafe(spec.queue, rpc, acked)
  })
  batchWrites(outgoing)
  return Effect.logInfo("stream opened", { queue: spec.queue }).pipe(
    Effect.andThen(
      admittedDeliveries({
        queue: spec.queue,
        prefetch: spec.prefetch,
        deadLetterQueue: spec.deadLetterQueue,
        // The last batch of acks must go out on the channel before it closes, or those written
        // messages come back as duplicates.
        beforeChannelClose: () => acks.flush()
      }, spec)
        .pipe(
          Stream.runForEachArray((admissions) => {
            counts.deadLettered += deadLetteredIn(admissions)
            return writeAllWithBackpressure(outgoing, admissions, (admission) => {
              if (admission._tag === "DeadLettered") return true
              const { delivery, encoded } = admission.admitted
              // Ack in the write callback: only then has grpc-js taken the message. A write that
              // never completes (cancel) leaves it unacked, and the channel's close requeues it.
              return outgoing.write(encoded, (error: Error | null | undefined) => acks.written(delivery, error))
            })
          })
        )
    ),
    Effect.onExit((exit) => Effect.logInfo("stream ended", { queue: spec.queue, reason: finishCall(outgoing, exit), ...counts })),
    Metrics.trackActiveStream(rpc),
    Effect.ignore
  )
}
