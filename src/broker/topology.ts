/**
 * Broker topology: the exchange, the four contract queues with their bindings, and one dead-letter
 * queue per consumed queue. Declared on every (re)connection of the primary consumers'
 * connection; declaring is idempotent.
 *
 * Each queue is declared on its own, so one unavailable queue (say, a classic queue whose home
 * node is down: `404 NOT_FOUND - home node … is down or inaccessible`) leaves the others served;
 * the caller retries the ones that failed. Only the exchange is needed for everything.
 */
import type * as amqp from "amqplib"
import { Effect } from "effect"
import { contractQueues, deadLetterQueue, type ProxySettings } from "../config.js"
import { AmqpError, describe, replyCode } from "../errors.js"

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

/** Close, waiting at most 2 s: amqplib never settles a close that races a dying connection. */
const closeWithin = (channel: amqp.Channel) =>
  Promise.race([
    channel.close().catch(() => undefined),
    new Promise<void>((resolve) => setTimeout(resolve, 2_000).unref())
  ])

/** How a declaration went: as asked, or an existing queue that has other arguments (used as it is). */
export type Declared = "declared" | { readonly existingDiffers: string }

/**
 * Declares `queue` with the configured type. A queue that exists with other arguments (another
 * type, a length limit, …) answers PRECONDITION_FAILED: it is taken as it is, and the answer says
 * how it differs. A declaration that fails closes its channel, hence a channel per declaration.
 */
/**
 * Runs `use` on a channel of its own: an operation the broker refuses (404, 406) closes its
 * channel, and must not take a shared one with it. The channel is closed afterwards unless the
 * broker already did (a second close would make it close the whole connection).
 */
export const onThrowawayChannel = async <A>(connection: amqp.ChannelModel, use: (channel: amqp.Channel) => Promise<A>) => {
  const channel = await connection.createChannel()
  channel.on("error", () => undefined)
  let open = true
  channel.on("close", () => {
    open = false
  })
  try {
    return await use(channel)
  } finally {
    if (open) await closeWithin(channel)
  }
}

const declareQueueAsync = (connection: amqp.ChannelModel, rabbit: Rabbit, queue: string): Promise<Declared> =>
  onThrowawayChannel(connection, (channel) =>
    channel.assertQueue(queue, queueOptions(rabbit, queue)).then(
      (): Declared => "declared",
      (cause: unknown): Declared => {
        if (replyCode(cause) === 406) return { existingDiffers: brokerReason(describe(cause)) }
        throw cause
      }
    ))

/** The broker's own words from amqplib's `Operation failed: …; 406 (…) with message "…"`. */
const brokerReason = (message: string): string => /with message "(.*)"$/.exec(message)?.[1] ?? message

const timeoutMs = 10_000

/** `declareQueueAsync` as an Effect, bounded (a broker that never answers must not hang a reconnect). */
export const declareQueue = (connection: amqp.ChannelModel, rabbit: Rabbit, queue: string) =>
  Effect.tryPromise({
    try: () => declareQueueAsync(connection, rabbit, queue),
    catch: (cause) => new AmqpError({ operation: `declare '${queue}'`, cause })
  }).pipe(
    Effect.timeoutOrElse({
      duration: timeoutMs,
      orElse: () => Effect.fail(new AmqpError({ operation: `declare '${queue}'`, cause: `no answer within ${timeoutMs / 1000} s` }))
    })
  )

/** The exchange every contract queue is bound to; without it nothing works, so its failure fails the whole. */
export const declareExchange = (connection: amqp.ChannelModel, rabbit: Rabbit) =>
  Effect.acquireUseRelease(
    Effect.tryPromise({
      try: () => connection.createChannel(),
      catch: (cause) => new AmqpError({ operation: "create topology channel", cause })
    }),
    (channel) =>
      Effect.tryPromise({
        try: async () => {
          channel.on("error", () => undefined)
          await channel.assertExchange(rabbit.exchange, rabbit.exchangeType, { durable: true })
        },
        catch: (cause) => new AmqpError({ operation: `declare exchange '${rabbit.exchange}'`, cause })
      }),
    (channel) => Effect.promise(() => closeWithin(channel))
  )

const bindQueue = (connection: amqp.ChannelModel, rabbit: Rabbit, queue: string, routingKey: string) =>
  Effect.tryPromise({
    try: () => onThrowawayChannel(connection, (channel) => channel.bindQueue(queue, rabbit.exchange, routingKey)),
    catch: (cause) => new AmqpError({ operation: `bind '${queue}' to '${rabbit.exchange}' with '${routingKey}'`, cause })
  })

/**
 * Declares (and binds, for a contract queue) each of `queues`, one by one. Answers which failed,
 * with the reason: they stay unavailable until a later call succeeds. An existing queue with
 * other arguments is used as it is and reported through `onExistingDiffers`.
 */
export const declareQueues = (
  connection: amqp.ChannelModel,
  rabbit: Rabbit,
  queues: ReadonlyArray<string>,
  onExistingDiffers: (queue: string, difference: string) => Effect.Effect<void>
): Effect.Effect<ReadonlyMap<string, string>> =>
  Effect.gen(function*() {
    const failed = new Map<string, string>()
    const bindings = new Map(contractQueues(rabbit).map((b) => [b.queue, b.routingKey]))
    for (const queue of queues) {
      const routingKey = bindings.get(queue)
      const outcome = yield* declareQueue(connection, rabbit, queue).pipe(
        Effect.tap((declared) => declared === "declared" ? Effect.void : onExistingDiffers(queue, declared.existingDiffers)),
        Effect.andThen(routingKey === undefined ? Effect.void : bindQueue(connection, rabbit, queue, routingKey)),
        Effect.result
      )
      if (outcome._tag === "Failure") failed.set(queue, outcome.failure.message)
    }
    return failed
  })
