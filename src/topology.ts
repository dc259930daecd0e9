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

export const declareTopology = (connection: amqp.ChannelModel, rabbit: ProxySettings["rabbit"]) =>
  Effect.acquireUseRelease(
    Effect.tryPromise({
      try: () => connection.createChannel(),
      catch: (cause) => new AmqpError({ operation: "create topology channel", cause })
    }),
    (channel) =>
      Effect.tryPromise({
        try: async () => {
          await channel.assertExchange(rabbit.exchange, rabbit.exchangeType, { durable: true })
          for (const { queue, routingKey } of contractQueues(rabbit)) {
            // No arguments: older deployments declared these queues without any, and a declaration
            // with different arguments fails with PRECONDITION_FAILED.
            await channel.assertQueue(queue, { durable: true })
            await channel.bindQueue(queue, rabbit.exchange, routingKey)
          }
          for (const queue of consumedQueues(rabbit)) {
            await channel.assertQueue(deadLetterQueue(rabbit, queue), { durable: true })
          }
        },
        catch: (cause) => new AmqpError({ operation: "declare topology", cause })
      }),
    // Bounded: a close racing a dying connection can hang in amqplib.
    (channel) => Effect.promise(() => channel.close().catch(() => undefined)).pipe(Effect.timeoutOption("2 seconds"))
  ).pipe(Effect.tap(() => Effect.logDebug("topology declared", { exchange: rabbit.exchange })))
