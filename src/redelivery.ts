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
 *
 * A queue with a delivery limit (quorum queues: `x-delivery-limit`, 20 by default since RabbitMQ
 * 4.0) has the broker drop, or dead-letter elsewhere, a message it has delivered too often, the
 * proxy's own restarts included. So the broker's last delivery of a message is dead-lettered here
 * instead, with the reason, and never handed to a client (broker/deliveryLimit.ts).
 */
import type * as amqp from "amqplib"
import { Effect, Result, Stream } from "effect"
import type { NonEmptyReadonlyArray } from "effect/Array"
import type { BodyRejected } from "./codec.js"
import { Broker } from "./broker/Broker.js"
import { noLimits, type QueueLimits, queueLimitsOrDeclared } from "./broker/deliveryLimit.js"
import { consume, type ConsumeError, type ConsumeOptions, type Delivery, reattachOnConnectionLoss } from "./consumer.js"
import { type AmqpError, type ConnectionLost, describe } from "./errors.js"
import * as Metrics from "./metrics.js"

export interface AdmissionPolicy {
  readonly queue: string
  readonly maxRequeues: number
  /** The body as the message goes on the wire (protobuf), or why it cannot go (codec.ts `transcode*`). */
  readonly transcode: (body: Buffer) => Result.Result<Uint8Array, BodyRejected>
  /**
   * The most encoded bytes a client can be sent. A bigger message would end the call it reached
   * (grpc-js refuses to send it, or the client refuses to receive it, after what was written
   * before it was already acked), so it is dead-lettered instead.
   */
  readonly maxEncodedBytes: number
  /** What sets `maxEncodedBytes`, for the dead-letter reason (a variable, or the subscription's `open`). */
  readonly maxEncodedBytesSource: string
  /**
   * How the proxy declares `queue` (topology.ts `queueOptions`): where reading the queue's
   * arguments starts, and what is assumed when they cannot be read. From them the broker's
   * delivery limit, if any, is learned on every (re)attach.
   */
  readonly declaredAs: amqp.Options.AssertQueue
}

/** A delivery that passed the checks, ready to hand to a client. */
export interface Admitted {
  readonly delivery: Delivery
  /** The decoded message, encoded once here: what is written to the client. */
  readonly encoded: Uint8Array
  /** 1 on the first delivery. */
  readonly deliveryCount: number
  readonly redelivered: boolean
}

export type Admission =
  | { readonly _tag: "Deliver"; readonly admitted: Admitted }
  | { readonly _tag: "DeadLettered"; readonly reason: string }

const countHeader = "x-requeue-count"
const historyHeader = "x-requeue-history"
const historyLimit = 20

/** A count header (the proxy's or the broker's): 0 when absent or not a count (publishers set headers too). */
const countIn = (delivery: Delivery, header: string): number => {
  const raw: unknown = delivery.message.properties.headers?.[header]
  const count = typeof raw === "number" ? raw : typeof raw === "string" ? Number(raw) : Number.NaN
  return Number.isSafeInteger(count) && count > 0 ? count : 0
}

export const requeueCountOf = (delivery: Delivery): number => countIn(delivery, countHeader)

const historyOf = (delivery: Delivery): Array<string> => {
  const raw: unknown = delivery.message.properties.headers?.[historyHeader]
  return Array.isArray(raw) ? raw.map(String) : []
}

const deadLetterLines = {
  malformed: "malformed body dead-lettered",
  too_large: "message too large for gRPC dead-lettered",
  requeue_limit: "poison message dead-lettered",
  delivery_limit: "message at the broker's delivery limit dead-lettered"
} as const

/** Dead-letters with the reason, counts it, and says so in one WARN line. */
const deadLetterLogged = (
  delivery: Delivery,
  queue: string,
  kind: keyof typeof deadLetterLines,
  reason: string,
  headers?: Record<string, unknown>
) =>
  delivery.deadLetter(reason, headers).pipe(
    Effect.tap(() => Metrics.deadLettered(queue, kind)),
    Effect.tap(() =>
      Effect.logWarning(deadLetterLines[kind], {
        queue,
        messageId: delivery.message.properties.messageId,
        reason
      })
    )
  )

/**
 * Counts one requeue of the delivery: past `maxRequeues` requeues it is dead-lettered (reason
 * `requeued more than N times`), else a copy goes to `target` (its own queue, or a delay queue
 * that leads back there) with `x-requeue-count` raised by one and `note` (why, for the history)
 * appended, with a timestamp, to `x-requeue-history` (the last 20). Shared by a plain counted requeue and one with a delay
 * (delayedRequeue.ts), so both count toward the same limit.
 */
export const countedRequeue = (
  delivery: Delivery,
  policy: Pick<AdmissionPolicy, "queue" | "maxRequeues">,
  note: string,
  target: string
): Effect.Effect<"Requeued" | "DeadLettered", AmqpError | ConnectionLost> => {
  const requeues = requeueCountOf(delivery) + 1
  const history = [...historyOf(delivery), `${new Date().toISOString()} ${note}`].slice(-historyLimit)
  const headers = { [countHeader]: requeues, [historyHeader]: history }
  if (requeues > policy.maxRequeues) {
    return deadLetterLogged(delivery, policy.queue, "requeue_limit", `requeued more than ${policy.maxRequeues} times`, headers)
      .pipe(Effect.as("DeadLettered" as const))
  }
  return delivery.moveTo(target, headers).pipe(Effect.as("Requeued" as const))
}

/**
 * Gives the delivery back to the queue with its count raised, or dead-letters it once it has been
 * requeued more than `maxRequeues` times. `note` says why, for the history.
 */
export const requeueCounted = (
  delivery: Delivery,
  policy: Pick<AdmissionPolicy, "queue" | "maxRequeues">,
  note: string
): Effect.Effect<"Requeued" | "DeadLettered", AmqpError | ConnectionLost> =>
  countedRequeue(delivery, policy, note, policy.queue)

/** The broker's `x-delivery-count` of this copy: what its delivery limit is measured on (deliveryLimit.ts). */
export const brokerDeliveryCountOf = (delivery: Delivery): number => countIn(delivery, "x-delivery-count")

/**
 * Redeliveries of this copy that the broker counted: quorum queues set `x-delivery-count` on
 * every redelivery (RabbitMQ 3.8 to 4.2); from 4.3 that counts failed deliveries only and
 * `x-acquired-count` counts every earlier delivery to a consumer (rabbitmq-website PR #2508), so
 * the larger of the two. Classic queues keep no count, only the `redelivered` flag, which stands
 * for at least one.
 */
export const brokerRedeliveriesOf = (delivery: Delivery): number => {
  const count = Math.max(brokerDeliveryCountOf(delivery), countIn(delivery, "x-acquired-count"))
  if (count > 0) return count
  return delivery.message.fields.redelivered ? 1 : 0
}

/** A delivery whose body decoded: what the client sees of its history. */
const deliverable = (delivery: Delivery, encoded: Uint8Array, queue: string): Admission => {
  const requeues = requeueCountOf(delivery)
  // Earlier deliveries of this copy that the proxy's header does not count (see above).
  const brokerRedeliveries = brokerRedeliveriesOf(delivery)
  const brokerRedelivered = delivery.message.fields.redelivered || brokerRedeliveries > 0
  if (brokerRedelivered) Metrics.redeliveredUnsafe(queue)
  return {
    _tag: "Deliver",
    admitted: {
      delivery,
      encoded,
      // A uint32 on the wire; the headers come from whoever published, so clamp it.
      deliveryCount: Math.min(requeues + 1 + brokerRedeliveries, 0xffff_ffff),
      redelivered: brokerRedelivered || requeues > 0
    }
  }
}

/** A body ready to send (decoded, encoded, within the size limit), or why it cannot be sent. */
type Checked = Result.Result<
  { readonly encoded: Uint8Array },
  { readonly kind: "malformed" | "too_large" | "delivery_limit"; readonly reason: string }
>

const check = (delivery: Delivery, policy: AdmissionPolicy, limits: QueueLimits): Checked => {
  // The broker's last delivery of this message (x-delivery-count >= limit, measured on 3.10.8, see
  // QueueLimits.deliveryLimit): if it came back once more, the broker would drop it (no dead-letter
  // exchange) or dead-letter it without a reason. Counted before the body: it goes either way.
  const limit = limits.deliveryLimit
  if (limit !== undefined) {
    const count = brokerDeliveryCountOf(delivery)
    if (count >= limit) {
      return Result.fail({
        kind: "delivery_limit",
        reason: `at the broker's delivery limit: x-delivery-count ${count}, delivery limit ${limit} ` +
          `(${limits.deliveryLimitSource}); the broker would ${limits.deadLetterExchange === undefined ? "drop" : "dead-letter"} it if it came back once more`
      })
    }
  }
  // Admission is total: a decoder that throws (whatever the body) dead-letters that body; it
  // must never end the calls on the queue and leave the body at its head.
  let transcoded: Result.Result<Uint8Array, BodyRejected>
  try {
    transcoded = policy.transcode(delivery.message.content)
  } catch (error) {
    return Result.fail({ kind: "malformed", reason: `cannot be decoded: ${describe(error)}` })
  }
  if (Result.isFailure(transcoded)) return Result.fail({ kind: "malformed", reason: transcoded.failure.reason })
  const encoded = transcoded.success
  if (encoded.byteLength > policy.maxEncodedBytes) {
    return Result.fail({
      kind: "too_large",
      reason: `too large for gRPC: ${encoded.byteLength} bytes encoded, at most ${policy.maxEncodedBytes} can be sent (${policy.maxEncodedBytesSource})`
    })
  }
  return Result.succeed({ encoded })
}

const decided = (
  delivery: Delivery,
  checked: Checked,
  queue: string
): Effect.Effect<Admission, AmqpError | ConnectionLost> => {
  if (Result.isSuccess(checked)) {
    return Effect.succeed(deliverable(delivery, checked.success.encoded, queue))
  }
  const { kind, reason } = checked.failure
  return deadLetterLogged(delivery, queue, kind, reason).pipe(Effect.as({ _tag: "DeadLettered", reason } as const))
}

/**
 * Admits a chunk of deliveries in order. Good bodies are decided synchronously; only a chunk with
 * a bad body pays for effects (the dead-letter publish), from that body on.
 */
export const admitAll = (
  deliveries: NonEmptyReadonlyArray<Delivery>,
  policy: AdmissionPolicy,
  /** The queue's limits as learned from the broker (none known by default). */
  limits: QueueLimits = noLimits(policy.queue)
): Effect.Effect<NonEmptyReadonlyArray<Admission>, AmqpError | ConnectionLost> => {
  // Same length as `deliveries`, hence non-empty.
  const admissions = [] as unknown as [Admission, ...Array<Admission>]
  for (let i = 0; i < deliveries.length; i++) {
    const delivery = deliveries[i]!
    const checked = check(delivery, policy, limits)
    if (Result.isFailure(checked)) {
      return Effect.gen(function*() {
        for (let j = i; j < deliveries.length; j++) {
          const rest = deliveries[j]!
          admissions.push(yield* decided(rest, j === i ? checked : check(rest, policy, limits), policy.queue))
        }
        return admissions
      })
    }
    admissions.push(deliverable(delivery, checked.success.encoded, policy.queue))
  }
  return Effect.succeed(admissions)
}

export const deadLetteredIn = (admissions: ReadonlyArray<Admission>): number => {
  let count = 0
  for (const admission of admissions) if (admission._tag === "DeadLettered") count++
  return count
}

/**
 * The queue's deliveries, each admitted (or dead-lettered) on the channel it came from; consuming
 * and admitting re-attach together after a lost connection, since a cut can land in the middle
 * of a dead-letter publish. Each (re)attach first learns the queue's limits on the primary
 * connection (read once per connection, usually already at start-up by the topology).
 */
export const admittedDeliveries = (
  options: ConsumeOptions,
  policy: AdmissionPolicy
): Stream.Stream<Admission, ConsumeError, Broker> =>
  reattachOnConnectionLoss(
    options.queue,
    Stream.unwrap(Effect.gen(function*() {
      const broker = yield* Broker
      const connection = yield* broker.unlessRefused(broker.connection)
      const limits = yield* queueLimitsOrDeclared(connection, policy.queue, policy.declaredAs)
      return consume(options).pipe(Stream.mapArrayEffect((chunk) => admitAll(chunk, policy, limits)))
    })),
    options.onReattach
  )
