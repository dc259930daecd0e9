/**
 * What happens to a delivery before a client sees it, and when a client gives it back.
 *
 * Classic queues keep no delivery count, so the proxy keeps its own in the `x-requeue-count`
 * header (not quorum queues' `x-delivery-count`, which the broker sets and would overwrite).
 * A requeue is a confirmed republish of the message with the count raised, then an ack of the
 * original. What counts as a requeue is what a client did with a message it had: a nack, or
 * leaving it unsettled when its subscription ended (cancel, crash, half-close), so a message that
 * kills its consumers cannot loop forever. Redeliveries the broker makes after the proxy itself
 * went away or lost the connection (messages a client may never have seen) are flagged but not
 * counted. Past `maxRequeues` the message goes to the dead-letter queue with its history.
 */
import { Effect, Result, Stream } from "effect"
import type { BodyRejected } from "./codec.js"
import type { Broker } from "./broker.js"
import { consume, type ConsumeError, type ConsumeOptions, type Delivery, reattachOnConnectionLoss } from "./consumer.js"
import type { AmqpError, ConnectionLost } from "./errors.js"
import * as Metrics from "./metrics.js"

export interface AdmissionPolicy<A> {
  readonly queue: string
  readonly maxRequeues: number
  readonly decode: (body: Buffer) => Result.Result<A, BodyRejected>
}

/** A delivery that passed the checks, ready to hand to a client. */
export interface Admitted<A> {
  readonly delivery: Delivery
  readonly message: A
  /** 1 on the first delivery. */
  readonly deliveryCount: number
  readonly redelivered: boolean
}

export type Admission<A> =
  | { readonly _tag: "Deliver"; readonly admitted: Admitted<A> }
  | { readonly _tag: "DeadLettered"; readonly reason: string }

const countHeader = "x-requeue-count"
const historyHeader = "x-requeue-history"
const historyLimit = 20

export const requeueCountOf = (delivery: Delivery): number => {
  const raw: unknown = delivery.message.properties.headers?.[countHeader]
  const count = typeof raw === "number" ? raw : typeof raw === "string" ? Number(raw) : 0
  return Number.isSafeInteger(count) && count > 0 ? count : 0
}

const historyOf = (delivery: Delivery): Array<string> => {
  const raw: unknown = delivery.message.properties.headers?.[historyHeader]
  return Array.isArray(raw) ? raw.map(String) : []
}

/** Dead-letters with the reason, counts it, and says so in one WARN line. */
const deadLetterLogged = (
  delivery: Delivery,
  queue: string,
  kind: "malformed" | "requeue_limit",
  reason: string,
  headers?: Record<string, unknown>
) =>
  delivery.deadLetter(reason, headers).pipe(
    Effect.tap(() => Metrics.deadLettered(queue, kind)),
    Effect.tap(() =>
      Effect.logWarning(kind === "malformed" ? "malformed body dead-lettered" : "poison message dead-lettered", {
        queue,
        messageId: delivery.message.properties.messageId,
        reason
      })
    )
  )

/**
 * Gives the delivery back to the queue with its count raised, or dead-letters it once it has been
 * requeued more than `maxRequeues` times. `note` says why, for the history.
 */
export const requeueCounted = (
  delivery: Delivery,
  policy: Pick<AdmissionPolicy<unknown>, "queue" | "maxRequeues">,
  note: string
): Effect.Effect<"Requeued" | "DeadLettered", AmqpError | ConnectionLost> => {
  const requeues = requeueCountOf(delivery) + 1
  const history = [...historyOf(delivery), `${new Date().toISOString()} ${note}`].slice(-historyLimit)
  const headers = { [countHeader]: requeues, [historyHeader]: history }
  if (requeues > policy.maxRequeues) {
    return deadLetterLogged(delivery, policy.queue, "requeue_limit", `requeued more than ${policy.maxRequeues} times`, headers)
      .pipe(Effect.as("DeadLettered" as const))
  }
  return delivery.moveTo(policy.queue, headers).pipe(Effect.as("Requeued" as const))
}

export const admit = <A>(
  delivery: Delivery,
  policy: AdmissionPolicy<A>
): Effect.Effect<Admission<A>, AmqpError | ConnectionLost> => {
  const decoded = policy.decode(delivery.message.content)
  if (Result.isFailure(decoded)) {
    const reason = decoded.failure.reason
    return deadLetterLogged(delivery, policy.queue, "malformed", reason).pipe(
      Effect.as({ _tag: "DeadLettered", reason } as const)
    )
  }
  const requeues = requeueCountOf(delivery)
  // The broker's flag means at least one earlier delivery that the header does not count.
  const brokerRedelivered = delivery.message.fields.redelivered
  if (brokerRedelivered) Metrics.redeliveredUnsafe(policy.queue)
  return Effect.succeed({
    _tag: "Deliver",
    admitted: {
      delivery,
      message: decoded.success,
      deliveryCount: requeues + 1 + (brokerRedelivered ? 1 : 0),
      redelivered: brokerRedelivered || requeues > 0
    }
  })
}

/**
 * The queue's deliveries, each admitted (or dead-lettered) on the channel it came from; consuming
 * and admitting re-attach together after a lost connection, since a cut can land in the middle
 * of a dead-letter publish.
 */
export const admittedDeliveries = <A>(
  options: ConsumeOptions,
  policy: AdmissionPolicy<A>
): Stream.Stream<Admission<A>, ConsumeError, Broker> =>
  reattachOnConnectionLoss(options.queue, consume(options).pipe(Stream.mapEffect((delivery) => admit(delivery, policy))))
