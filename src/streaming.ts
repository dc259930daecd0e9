/**
 * Serving one server-streaming call from one queue: deliveries are checked (see redelivery.ts),
 * written into the grpc-js call with backpressure, and acked only once grpc-js has accepted the
 * write. The consumer re-attaches after a broker connection loss without ending the call.
 */
import * as grpc from "@grpc/grpc-js"
import { Effect, Stream } from "effect"
import type { Broker } from "./broker.js"
import { finishCall, writeWithBackpressure } from "./callLifecycle.js"
import * as Metrics from "./metrics.js"
import { type AdmissionPolicy, admittedDeliveries } from "./redelivery.js"

export interface QueueStreamSpec<A> extends AdmissionPolicy<A> {
  readonly deadLetterQueue: string
  readonly prefetch: number
}

export const serveQueueStream = <Req, A>(
  call: grpc.ServerWritableStream<Req, A>,
  spec: QueueStreamSpec<A>
): Effect.Effect<void, never, Broker> => {
  const counts = { delivered: 0, deadLettered: 0 }
  const rpc = Metrics.rpcName(call)
  const outgoing = call as grpc.ServerWritableStream<unknown, A>
  return Effect.logInfo("stream opened", { queue: spec.queue }).pipe(
    Effect.andThen(
      admittedDeliveries({ queue: spec.queue, prefetch: spec.prefetch, deadLetterQueue: spec.deadLetterQueue }, spec)
        .pipe(
          Stream.runForEach((admission) => {
            if (admission._tag === "DeadLettered") counts.deadLettered++
            if (admission._tag !== "Deliver") return Effect.void
            const { delivery, message } = admission.admitted
            // Ack in the write callback: only then has grpc-js taken the message. A write that
            // never completes (cancel) leaves it unacked, and the channel's close requeues it.
            return writeWithBackpressure(outgoing, message, (error) => {
              if (error == null && delivery.ack()) {
                counts.delivered++
                Metrics.deliveredUnsafe(spec.queue, rpc)
              }
            })
          })
        )
    ),
    Effect.onExit((exit) => Effect.logInfo("stream ended", { queue: spec.queue, reason: finishCall(outgoing, exit), ...counts })),
    Metrics.trackActiveStream(rpc),
    Effect.ignore
  )
}
