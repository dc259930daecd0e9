/**
 * Nack with delay (issue 11, part 4): a counted requeue that goes through a delay queue.
 *
 * The delivery is copied, with its requeue count raised and the reason in its history
 * (redelivery.ts `countedRequeue`, the same count a plain nack raises, so MESSAGING_MAX_REQUEUES
 * counts both), into the delay queue of its tier (broker/delayQueues.ts), with a publisher
 * confirm; only then is the original acked (consumer.ts `moveTo`, broker/copies.ts). The delay
 * queue's TTL expires it back into its own queue through the default exchange, where it is a new
 * message: the broker's `redelivered` flag is then false, but its `x-requeue-count` makes the
 * client see `redelivered: true` and a raised `delivery_count` (redelivery.ts `deliverable`).
 */
import { Duration, Effect } from "effect"
import { delayQueueFor } from "./broker/delayQueues.js"
import type { Delivery } from "./consumer.js"
import type { AmqpError, ConnectionLost } from "./errors.js"
import { type AdmissionPolicy, countedRequeue } from "./redelivery.js"

export interface DelayPolicy extends Pick<AdmissionPolicy, "queue" | "maxRequeues"> {
  /** MESSAGING_RETRY_DELAYS, ascending, non-empty: the delay tiers (one delay queue each). */
  readonly retryDelays: ReadonlyArray<Duration.Duration>
}

/**
 * Gives `delivery` back to `policy.queue` after at least `delay`, counted like a nack; `note` says
 * why, for the history. The delay rounds up to the next tier (above the largest tier: the
 * largest, so then it comes back earlier than asked). It comes back after the tier plus however
 * long the broker takes to dead-letter an expired message (classic queues at once when it reaches
 * the head, which with one TTL per queue is when it expires; quorum queues shortly after).
 *
 * Answers "Requeued" once the copy is in the delay queue (confirmed) and the original acked, or
 * "DeadLettered" when this requeue is past `maxRequeues` (it then goes to the dead-letter queue,
 * not the delay queue). The delay queue is declared first if it is missing. While the broker
 * blocks the publishers' connection (an alarm) it waits, the original unacked (holding one
 * prefetch slot); unlike a plain nack it never falls back to an immediate requeue, which would
 * defeat the delay. Fails with ConnectionLost when the delivery's channel or the publishers'
 * connection went away (the original is then back in its queue, or will be with its channel), or
 * AmqpError when the broker refused the declaration or the copy (the original is still unacked).
 */
export const requeueDelayed = (
  delivery: Delivery,
  policy: DelayPolicy,
  delay: Duration.Duration,
  note: string
): Effect.Effect<"Requeued" | "DeadLettered", AmqpError | ConnectionLost> => {
  const target = delayQueueFor(policy.queue, policy.retryDelays, delay)
  const asked = Math.round(Duration.toMillis(delay))
  return countedRequeue(
    delivery,
    policy,
    `${note} (delay ${asked} ms, tier ${target.label})`,
    target.queue
  ).pipe(
    Effect.tap((outcome) =>
      outcome === "Requeued"
        ? Effect.logDebug("requeued with a delay", {
          queue: policy.queue,
          delayQueue: target.queue,
          delayMs: asked,
          messageId: delivery.message.properties.messageId
        })
        : Effect.void
    )
  )
}
