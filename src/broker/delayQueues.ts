/**
 * Delay queues behind `nack_delayed` (issue 11, part 4), with no broker plugin: one durable queue
 * per delay tier (MESSAGING_RETRY_DELAYS) per consumed queue, named `<queue>.retry.<tier>` (e.g.
 * `typechecking.schemas.queue.retry.5s`). Nobody consumes it. Its `x-message-ttl` is the tier,
 * and an expired message is dead-lettered back to `<queue>` through the default exchange
 * (`x-dead-letter-exchange: ""`, `x-dead-letter-routing-key: <queue>`).
 *
 * Why a queue per tier, not one queue with a per-message `expiration`: a classic queue expires
 * (and dead-letters) messages only once they reach its head (https://www.rabbitmq.com/docs/ttl,
 * "Per-Message TTL and Dead Lettering"), so a 1 h message at the head would hold back every 1 s
 * message behind it. With one TTL per queue, the head is always the message that expires first.
 *
 * The queue type follows RABBITMQ_QUEUE_TYPE:
 * - classic: the broker republishes an expired message without a publisher confirm
 *   (https://www.rabbitmq.com/docs/dlx#safety, at-most-once): it is lost only if the source
 *   queue cannot take it at that moment (its node is down).
 * - quorum (message TTL since RabbitMQ 3.10; declared and measured on 3.10.8): dead-lettering is
 *   at-most-once by default too, so the tiers ask for `x-dead-letter-strategy: at-least-once`
 *   (RabbitMQ 3.10+, needs the `stream_queue` feature flag, on by default since 3.9), which
 *   keeps a message in the delay queue until the source queue confirmed it. It requires
 *   `x-overflow: reject-publish` (with the default `drop-head` it silently falls back to
 *   at-most-once); without a length limit that rejects nothing. A source queue away for long
 *   means messages pile up in the delay queue rather than vanish, and may come back twice.
 *   https://www.rabbitmq.com/docs/quorum-queues#dead-lettering
 */
import type * as amqp from "amqplib"
import { Duration } from "effect"
import type { ProxySettings } from "../config.js"
import { consumedQueues, queueOptions } from "./topology.js"

type Rabbit = ProxySettings["rabbit"]

/** One tier's delay queue for one consumed queue. */
export interface DelayQueue {
  /** The consumed queue its messages go back to. */
  readonly source: string
  /** The tier's delay: the queue's `x-message-ttl`. */
  readonly tier: Duration.Duration
  /** `1s`, `5s`, `2m`, `1h`, `1500ms`: the name's last part. */
  readonly label: string
  /** `<source>.retry.<label>`. */
  readonly queue: string
}

const units: ReadonlyArray<readonly [string, number]> = [["h", 3_600_000], ["m", 60_000], ["s", 1_000]]

/** A tier as a name part: the largest unit that divides it (`120000` ms → `2m`, `90000` → `90s`). */
export const tierLabel = (tier: Duration.Duration): string => {
  const ms = Math.round(Duration.toMillis(tier))
  for (const [unit, size] of units) if (ms % size === 0) return `${ms / size}${unit}`
  return `${ms}ms`
}

export const delayQueueName = (source: string, tier: Duration.Duration): string => `${source}.retry.${tierLabel(tier)}`

/**
 * The tier a delay rounds up to: the smallest tier of at least `delay` (a delay of 0 or less: the
 * smallest tier); above the largest tier, the largest (the message then comes back early, after
 * that tier). `tiers` ascending and non-empty (config.ts checks both).
 */
export const tierFor = (tiers: ReadonlyArray<Duration.Duration>, delay: Duration.Duration): Duration.Duration => {
  for (const tier of tiers) if (Duration.isGreaterThanOrEqualTo(tier, delay)) return tier
  return tiers[tiers.length - 1]!
}

/** `source`'s delay queue for `delay`, rounded up to a tier (`tierFor`). */
export const delayQueueFor = (
  source: string,
  tiers: ReadonlyArray<Duration.Duration>,
  delay: Duration.Duration
): DelayQueue => {
  const tier = tierFor(tiers, delay)
  return { source, tier, label: tierLabel(tier), queue: delayQueueName(source, tier) }
}

/** Every delay queue the proxy declares: each consumed queue's tiers, ascending, schemas first. */
export const delayQueues = (rabbit: Rabbit, tiers: ReadonlyArray<Duration.Duration>): ReadonlyArray<DelayQueue> =>
  consumedQueues(rabbit).flatMap((source) =>
    tiers.map((tier) => ({ source, tier, label: tierLabel(tier), queue: delayQueueName(source, tier) }))
  )

/**
 * How a delay queue is declared (see the module comment): durable, the configured type, TTL =
 * the tier (ms), dead-lettering to `source` through the default exchange; for quorum queues
 * at-least-once dead-lettering.
 */
export const delayQueueOptions = (rabbit: Rabbit, delay: DelayQueue): amqp.Options.AssertQueue => ({
  durable: true,
  arguments: {
    ...(rabbit.queueType === "quorum"
      ? { "x-queue-type": "quorum", "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish" }
      : {}),
    "x-message-ttl": Math.round(Duration.toMillis(delay.tier)),
    "x-dead-letter-exchange": "",
    "x-dead-letter-routing-key": delay.source
  }
})

/**
 * How the proxy declares any of its queues: a delay queue as above, every other one as
 * topology.ts `queueOptions` says.
 */
export const declarationOptions = (
  rabbit: Rabbit,
  tiers: ReadonlyArray<Duration.Duration>
): (queue: string) => amqp.Options.AssertQueue => {
  const delays = new Map(delayQueues(rabbit, tiers).map((delay) => [delay.queue, delay]))
  return (queue) => {
    const delay = delays.get(queue)
    return delay === undefined ? queueOptions(rabbit, queue) : delayQueueOptions(rabbit, delay)
  }
}
