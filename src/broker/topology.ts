/**
 * Broker topology: the exchange, the four contract queues with their bindings, and one dead-letter
 * queue per consumed queue (the Broker adds the delay queues of delayQueues.ts). Declared on
 * every (re)connection of the primary consumers' connection; declaring is idempotent.
 *
 * Each queue is declared on its own, so one unavailable queue (say, a classic queue whose home
 * node is down: `404 NOT_FOUND - home node … is down or inaccessible`) leaves the others served;
 * the caller retries the ones that failed. Only the exchange is needed for everything.
 */
import type * as amqp from "amqplib"
import { Effect } from "effect"
import { contractQueues, deadLetterQueue, type ProxySettings } from "../config.js"
import { AmqpError, describe, replyCode } from "../errors.js"
import { onThrowawayChannel } from "./channels.js"
import { dropWarning, learnQueueLimits } from "./deliveryLimit.js"

type Rabbit = ProxySettings["rabbit"]

/** The queues the proxy consumes from, so the ones that get a dead-letter queue. */
export const consumedQueues = (rabbit: Rabbit): ReadonlyArray<string> => [
  rabbit.schemas.queue,
  rabbit.validations.queue
]

/** Every queue the proxy declares, in declaration order: the four contract queues, then the dead-letter queues. */
export const declaredQueues = (rabbit: Rabbit): ReadonlyArray<string> => [
  ...contractQueues(rabbit).map((b) => b.queue),
  ...consumedQueues(rabbit).map((q) => deadLetterQueue(rabbit, q))
]

/**
 * The arguments the proxy declares `queue` with. `classic`: none at all, as the contract requires
 * (older deployments declared these queues without arguments, and any difference fails with
 * PRECONDITION_FAILED). `quorum`: `x-queue-type: quorum`, and for a consumed queue a dead-letter
 * target of its own `.dead` queue, so that a message the broker itself gives up on (a delivery
 * limit, the default of 20 since RabbitMQ 4.0) is dead-lettered, never dropped.
 */
export const queueOptions = (rabbit: Rabbit, queue: string): amqp.Options.AssertQueue => {
  if (rabbit.queueType === "classic") return { durable: true }
  const consumed = consumedQueues(rabbit).includes(queue)
  return {
    durable: true,
    arguments: {
      "x-queue-type": "quorum",
      ...(consumed ? { "x-dead-letter-exchange": "", "x-dead-letter-routing-key": deadLetterQueue(rabbit, queue) } : {})
    }
  }
}

/** How a declaration went: as asked, or an existing queue that has other arguments (used as it is). */
export type Declared = "declared" | { readonly existingDiffers: string }

/**
 * How the proxy declares a queue, by name: `queueOptions` unless the caller knows more queues
 * (the delay queues, delayQueues.ts `declarationOptions`).
 */
export type OptionsOf = (queue: string) => amqp.Options.AssertQueue

/**
 * Declares `queue` with `options` (by default the configured type, `queueOptions`). A queue that
 * exists with other arguments (another type, a length limit, …) answers PRECONDITION_FAILED: it is
 * taken as it is, and the answer says how it differs. A declaration that fails closes its channel,
 * hence a channel per declaration.
 */
const declareQueueAsync = (connection: amqp.ChannelModel, queue: string, options: amqp.Options.AssertQueue): Promise<Declared> =>
  onThrowawayChannel(connection, (channel) =>
    channel.assertQueue(queue, options).then(
      (): Declared => "declared",
      (cause: unknown): Declared => {
        if (replyCode(cause) === 406) return { existingDiffers: brokerReason(describe(cause)) }
        throw cause
      }
    ))

/** The broker's own words from amqplib's `Operation failed: …; 406 (…) with message "…"`. */
const brokerReason = (message: string): string => /with message "(.*)"$/.exec(message)?.[1] ?? message

const timeoutMs = 10_000

/** A broker that never answers must not hang a reconnect: every topology step is bounded. */
const bounded = <A>(operation: string, run: () => Promise<A>) =>
  Effect.tryPromise({ try: run, catch: (cause) => new AmqpError({ operation, cause }) }).pipe(
    Effect.timeoutOrElse({
      duration: timeoutMs,
      orElse: () => Effect.fail(new AmqpError({ operation, cause: `no answer within ${timeoutMs / 1000} s` }))
    })
  )

/** `declareQueueAsync` as an Effect, bounded. */
export const declareQueue = (
  connection: amqp.ChannelModel,
  rabbit: Rabbit,
  queue: string,
  optionsOf: OptionsOf = (q) => queueOptions(rabbit, q)
) => bounded(`declare '${queue}'`, () => declareQueueAsync(connection, queue, optionsOf(queue)))

/** The exchange every contract queue is bound to; without it nothing works, so its failure fails the whole. */
export const declareExchange = (connection: amqp.ChannelModel, rabbit: Rabbit) =>
  bounded(`declare exchange '${rabbit.exchange}'`, () =>
    onThrowawayChannel(connection, (channel) => channel.assertExchange(rabbit.exchange, rabbit.exchangeType, { durable: true })))

const bindQueue = (connection: amqp.ChannelModel, rabbit: Rabbit, queue: string, routingKey: string) =>
  bounded(`bind '${queue}' to '${rabbit.exchange}' with '${routingKey}'`, () =>
    onThrowawayChannel(connection, (channel) => channel.bindQueue(queue, rabbit.exchange, routingKey)))

/** Consumed queues already warned about, per proxy (its settings): one line per queue and process, not per reconnect. */
const warnedDrops = new WeakMap<Rabbit, Set<string>>()

/**
 * For a consumed queue: reads its limits on this connection (deliveryLimit.ts; admission then finds
 * them read) and warns once when it can drop messages. Never fails the declaration: a queue whose
 * arguments cannot be read is only logged at debug.
 */
const checkDrops = (connection: amqp.ChannelModel, rabbit: Rabbit, queue: string) =>
  learnQueueLimits(connection, queue, queueOptions(rabbit, queue)).pipe(
    Effect.timeoutOrElse({
      duration: timeoutMs,
      orElse: () => Effect.fail(new AmqpError({ operation: `read '${queue}'`, cause: `no answer within ${timeoutMs / 1000} s` }))
    }),
    Effect.flatMap((limits) => {
      let warned = warnedDrops.get(rabbit)
      if (warned === undefined) warnedDrops.set(rabbit, warned = new Set())
      const fields = dropWarning(limits, deadLetterQueue(rabbit, queue))
      if (fields === undefined || warned.has(queue)) return Effect.void
      warned.add(queue)
      return Effect.logWarning("consumed queue can drop messages", fields)
    }),
    Effect.catch((error) => Effect.logDebug("could not read the queue's arguments", { queue, reason: error.message }))
  )

/**
 * Declares (and binds, for a contract queue) each of `queues`, one by one. Answers which failed,
 * with the reason: they stay unavailable until a later call succeeds. An existing queue with
 * other arguments is used as it is and reported through `onExistingDiffers`. A consumed queue that
 * can drop messages (a delivery limit, length limit or TTL without a dead-letter exchange) is
 * warned about once.
 */
export const declareQueues = (
  connection: amqp.ChannelModel,
  rabbit: Rabbit,
  queues: ReadonlyArray<string>,
  onExistingDiffers: (queue: string, difference: string) => Effect.Effect<void>,
  optionsOf: OptionsOf = (q) => queueOptions(rabbit, q)
): Effect.Effect<ReadonlyMap<string, string>> =>
  Effect.gen(function*() {
    const failed = new Map<string, string>()
    const bindings = new Map(contractQueues(rabbit).map((b) => [b.queue, b.routingKey]))
    const consumed = new Set(consumedQueues(rabbit))
    for (const queue of queues) {
      const routingKey = bindings.get(queue)
      const outcome = yield* declareQueue(connection, rabbit, queue, optionsOf).pipe(
        Effect.tap((declared) => declared === "declared" ? Effect.void : onExistingDiffers(queue, declared.existingDiffers)),
        Effect.tap(() => consumed.has(queue) ? checkDrops(connection, rabbit, queue) : Effect.void),
        Effect.andThen(routingKey === undefined ? Effect.void : bindQueue(connection, rabbit, queue, routingKey)),
        Effect.result
      )
      if (outcome._tag === "Failure") failed.set(queue, outcome.failure.message)
    }
    return failed
  })
