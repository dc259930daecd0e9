/**
 * A consumer as a scoped Stream: one confirm channel per stream, prefetch as the bound on what the
 * broker may push before we ack, and the consumer cancelled and channel closed when the stream's
 * scope closes, so every unacked delivery goes back to the queue at once.
 */
import type * as amqp from "amqplib"
import { Cause, Effect, Queue, Stream } from "effect"
import { Broker } from "./broker.js"
import { AmqpError, ConnectionLost, ConsumerClosedByBroker } from "./errors.js"

/** One message from the queue, with the ways to settle it on the channel it came from. */
export interface Delivery {
  readonly message: amqp.ConsumeMessage
  /** Ack now. Returns false when the channel is already gone (the broker then requeues it). */
  readonly ack: () => boolean
  /** Nack; with requeue=false the broker drops it, so use `deadLetter` to keep it. */
  readonly nack: (requeue: boolean) => boolean
  /** Publish a copy to the dead-letter queue with the reason, wait for the broker's confirm, then ack. */
  readonly deadLetter: (reason: string) => Effect.Effect<void, AmqpError>
}

export interface ConsumeOptions {
  readonly queue: string
  readonly prefetch: number
  readonly deadLetterQueue: string
  /** Shown in the broker's management UI next to the consumer. */
  readonly consumerTag?: string | undefined
}

export type ConsumeError = AmqpError | ConnectionLost | ConsumerClosedByBroker

const settle = (operation: () => void): boolean => {
  try {
    operation()
    return true
  } catch {
    // amqplib throws once the channel is closed; the broker has already requeued the message.
    return false
  }
}

/** Publishing properties worth keeping on the dead-lettered copy (no expiration, no user id check). */
const keptProperties = (message: amqp.ConsumeMessage): amqp.Options.Publish => {
  const p = message.properties
  return {
    contentType: p.contentType,
    contentEncoding: p.contentEncoding,
    correlationId: p.correlationId,
    messageId: p.messageId,
    timestamp: p.timestamp,
    type: p.type,
    appId: p.appId,
    persistent: true
  }
}

const publishConfirmed = (
  channel: amqp.ConfirmChannel,
  queue: string,
  content: Buffer,
  options: amqp.Options.Publish
) =>
  Effect.callback<void, AmqpError>((resume) => {
    try {
      channel.publish("", queue, content, options, (error: unknown) => {
        resume(
          error == null ? Effect.void : Effect.fail(new AmqpError({ operation: `publish to '${queue}'`, cause: error }))
        )
      })
    } catch (cause) {
      resume(Effect.fail(new AmqpError({ operation: `publish to '${queue}'`, cause })))
    }
  })

export const consume = (options: ConsumeOptions): Stream.Stream<Delivery, ConsumeError, Broker> =>
  Stream.callback<Delivery, ConsumeError, Broker>(
    (queue) =>
      Effect.gen(function*() {
        const broker = yield* Broker
        const channel = yield* broker.openChannel
        let closingOurselves = false
        // Runs before the channel's own finalizer (reverse order), so our close is not a failure.
        yield* Effect.addFinalizer(() => Effect.sync(() => { closingOurselves = true }))
        channel.on("error", (error: Error) => {
          Queue.failCauseUnsafe(
            queue,
            Cause.fail(new ConsumerClosedByBroker({ queue: options.queue, reason: error.message }))
          )
        })
        channel.on("close", () => {
          if (!closingOurselves) {
            Queue.failCauseUnsafe(queue, Cause.fail(new ConnectionLost({ reason: "channel closed" })))
          }
        })
        yield* Effect.tryPromise({
          try: () => channel.prefetch(options.prefetch),
          catch: (cause) => new AmqpError({ operation: "set prefetch", cause })
        })

        const toDelivery = (message: amqp.ConsumeMessage): Delivery => ({
          message,
          ack: () => settle(() => channel.ack(message)),
          nack: (requeue) => settle(() => channel.nack(message, false, requeue)),
          deadLetter: (reason) =>
            publishConfirmed(channel, options.deadLetterQueue, message.content, {
              ...keptProperties(message),
              headers: {
                ...message.properties.headers,
                "x-dead-letter-reason": reason,
                "x-original-queue": options.queue,
                "x-original-exchange": message.fields.exchange,
                "x-original-routing-key": message.fields.routingKey,
                "x-dead-lettered-at": new Date().toISOString()
              }
            }).pipe(Effect.andThen(Effect.sync(() => settle(() => channel.ack(message)))), Effect.asVoid)
        })

        yield* Effect.acquireRelease(
          Effect.tryPromise({
            try: () =>
              channel.consume(options.queue, (message) => {
                if (message === null) {
                  // basic.cancel from the broker: the queue was deleted or the node went away.
                  Queue.failCauseUnsafe(
                    queue,
                    Cause.fail(
                      new ConsumerClosedByBroker({ queue: options.queue, reason: "consumer cancelled by the broker" })
                    )
                  )
                  return
                }
                // Prefetch bounds what the broker sends unacked, and the buffer holds that many,
                // so this cannot overflow; if it ever did, hand the message back rather than drop it.
                if (!Queue.offerUnsafe(queue, toDelivery(message))) channel.nack(message, false, true)
              }, { noAck: false, ...(options.consumerTag ? { consumerTag: options.consumerTag } : {}) }),
            catch: (cause) => new AmqpError({ operation: `consume from '${options.queue}'`, cause })
          }),
          ({ consumerTag }) => Effect.promise(() => channel.cancel(consumerTag).catch(() => undefined))
        )
      }),
    { bufferSize: options.prefetch, strategy: "suspend" }
  )
