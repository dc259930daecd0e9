/**
 * Broker topology: the exchange, the four contract queues with their bindings, and one dead-letter
 * queue per consumed queue. Declared on every (re)connection; asserting is idempotent.
 */
import type * as amqp from "amqplib"
import { Effect } from "effect"
import { contractQueues, deadLetterQueue, type ProxySettings } from "./config.js"
import { AmqpError } from "./errors.js"

/** The queues the proxy consumes from, so the ones that get a dead-letter queue. */
export const consumedQueues = (rabbit: ProxySettings["rabbit"]): ReadonlyArray<string> => [
  rabbit.schemas.queue,
  rabbit.validations.queue
]

/**
 * Declares a durable queue only if it is missing. An existing queue is taken as it is (a passive
 * check), so queues an operator declared with arguments (quorum type, delivery limit, …) are
 * accepted, where re-declaring them without those arguments would fail with PRECONDITION_FAILED.
 */
/** Close, waiting at most 2 s: amqplib never settles a close that races a dying connection. */
const closeWithin = (channel: amqp.Channel) =>
  Promise.race([
    channel.close().catch(() => undefined),
    new Promise<void>((resolve) => setTimeout(resolve, 2_000).unref())
  ])

const ensureQueueAsync = async (connection: amqp.ChannelModel, queue: string) => {
  // A failed passive check (404) closes its channel, hence one channel per check.
  const probe = await connection.createChannel()
  probe.on("error", () => undefined)
  const exists = await probe.checkQueue(queue).then(() => true, () => false)
  if (exists) await closeWithin(probe)
  else {
    const declarer = await connection.createChannel()
    declarer.on("error", () => undefined)
    try {
      await declarer.assertQueue(queue, { durable: true })
    } finally {
      await closeWithin(declarer)
    }
  }
}

export const ensureQueue = (connection: amqp.ChannelModel, queue: string) =>
  Effect.tryPromise({
    try: () => ensureQueueAsync(connection, queue),
    catch: (cause) => new AmqpError({ operation: `declare '${queue}'`, cause })
  }).pipe(
    Effect.timeoutOrElse({
      duration: "10 seconds",
      orElse: () => Effect.fail(new AmqpError({ operation: `declare '${queue}'`, cause: "no answer within 10 s" }))
    })
  )

export const declareTopology = (connection: amqp.ChannelModel, rabbit: ProxySettings["rabbit"]) =>
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
          for (const { queue, routingKey } of contractQueues(rabbit)) {
            // Never with arguments of our own: older deployments declared these queues without any.
            await ensureQueueAsync(connection, queue)
            await channel.bindQueue(queue, rabbit.exchange, routingKey)
          }
          for (const queue of consumedQueues(rabbit)) await ensureQueueAsync(connection, deadLetterQueue(rabbit, queue))
        },
        catch: (cause) => new AmqpError({ operation: "declare topology", cause })
      }),
    // Bounded: a close racing a dying connection can hang in amqplib.
    (channel) => Effect.promise(() => closeWithin(channel))
  ).pipe(Effect.tap(() => Effect.logDebug("topology declared", { exchange: rabbit.exchange })))
