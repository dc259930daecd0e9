/**
 * A consumer as a scoped Stream: one confirm channel per stream, prefetch as the bound on what the
 * broker may push before we ack, and the consumer cancelled and channel closed when the stream's
 * scope closes, so every unacked delivery goes back to the queue at once.
 */
import type * as amqp from "amqplib"
import { Cause, Duration, Effect, Queue, Schedule, Stream } from "effect"
import { Broker } from "./broker/Broker.js"
import { AmqpError, ConnectionLost, ConsumerClosedByBroker } from "./errors.js"

/** One message from the queue, with the ways to settle it on the channel it came from. */
export interface Delivery {
  readonly message: amqp.ConsumeMessage
  /** The channel it came from: delivery tags are only comparable within one channel. */
  readonly channel: amqp.Channel
  /** Ack now. Returns false when the channel is already gone (the broker then requeues it). */
  readonly ack: () => boolean
  /** Ack this and every earlier unacked delivery of its channel, in one frame. */
  readonly ackUpTo: () => boolean
  /** Nack; with requeue=false the broker drops it, so use `deadLetter` to keep it. */
  readonly nack: (requeue: boolean) => boolean
  /**
   * Publish a copy (same body and properties, plus `headers`) to `queue` through the default
   * exchange on this delivery's channel, wait for the broker's confirm, then ack this delivery:
   * the message is never in neither place. Used to dead-letter and to requeue with a delivery
   * count.
   */
  readonly moveTo: (queue: string, headers: Record<string, unknown>) => Effect.Effect<void, AmqpError | ConnectionLost>
  /** Stops the broker pushing more on this delivery's channel (the consumer is cancelled). */
  readonly stopConsuming: Effect.Effect<void>
  /** `moveTo` the dead-letter queue with the reason and where the message came from. */
  readonly deadLetter: (
    reason: string,
    headers?: Record<string, unknown>
  ) => Effect.Effect<void, AmqpError | ConnectionLost>
}

export interface ConsumeOptions {
  readonly queue: string
  readonly prefetch: number
  readonly deadLetterQueue: string
  /** Shown in the broker's management UI next to the consumer. */
  readonly consumerTag?: string | undefined
  /** Runs when the stream ends, after the consumer is cancelled but while the channel is open. */
  readonly beforeChannelClose?: (() => void) | undefined
}

export type ConsumeError = AmqpError | ConnectionLost | ConsumerClosedByBroker

/** amqplib's answer when the connection has used up the broker's channel_max. */
export const channelsExhausted = (error: AmqpError): boolean => error.message.includes("No channels left")

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

/**
 * The headers a copy keeps: all but quorum queues' `x-delivery-count`, which belongs to the
 * broker and counts deliveries of the original; a copy starts again from none.
 */
const withoutBrokerCount = (headers: amqp.MessagePropertyHeaders | undefined): Record<string, unknown> => {
  if (headers === undefined) return {}
  const { "x-delivery-count": _counted, ...kept } = headers
  return kept
}

/** Cancel a consumer, but never hang on a channel whose connection died mid-way (amqplib can). */
const cancelQuietly = (channel: amqp.Channel, consumerTag: string) =>
  Effect.promise(() => channel.cancel(consumerTag).catch(() => undefined)).pipe(
    Effect.timeoutOption("2 seconds"),
    Effect.asVoid
  )

const confirmTimeout = "30 seconds"

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
  }).pipe(
    // A blocked broker (memory or disk alarm) may hold confirms back: give up, the original stays unacked.
    Effect.timeoutOrElse({
      duration: confirmTimeout,
      orElse: () => Effect.fail(new AmqpError({ operation: `publish to '${queue}'`, cause: `no confirm within ${confirmTimeout}` }))
    })
  )

export const consume = (options: ConsumeOptions): Stream.Stream<Delivery, ConsumeError, Broker> =>
  Stream.callback<Delivery, ConsumeError, Broker>(
    (queue) =>
      Effect.gen(function*() {
        const broker = yield* Broker
        // A channel that cannot be opened right after a drop means the connection is gone too.
        const channel = yield* broker.openChannel.pipe(
          Effect.mapError((error) => channelsExhausted(error) ? error : new ConnectionLost({ reason: error.message }))
        )
        let closingOurselves = false
        let channelClosed = false
        // Runs before the channel's own finalizer (reverse order), so our close is not a failure.
        yield* Effect.addFinalizer(() => Effect.sync(() => { closingOurselves = true }))
        const beforeChannelClose = options.beforeChannelClose
        if (beforeChannelClose) yield* Effect.addFinalizer(() => Effect.sync(beforeChannelClose))
        // Never send on a channel the broker closed: its answer to any frame there is 504
        // CHANNEL_ERROR, which closes the whole connection and every other stream's channel on
        // it. amqplib emits 'error' while it can still send on the channel (before it marks it
        // closed), and failing the stream there would run its finalizers (basic.cancel, the
        // last acks, channel.close) in that window. So 'error' only records the broker's reason;
        // the stream fails on 'close', once amqplib refuses every send on the channel.
        let closedByBroker: Error | undefined
        channel.on("error", (error: Error) => {
          closedByBroker = error
        })
        channel.on("close", () => {
          channelClosed = true
          if (closedByBroker !== undefined) {
            Queue.failCauseUnsafe(
              queue,
              Cause.fail(new ConsumerClosedByBroker({ queue: options.queue, reason: closedByBroker.message }))
            )
          } else if (!closingOurselves) {
            Queue.failCauseUnsafe(queue, Cause.fail(new ConnectionLost({ reason: "channel closed" })))
          }
        })
        /**
         * The channel went with its connection (not closed by the broker on its own): a publish
         * cut short then is no failure of the message; the broker requeues the original and the
         * consumer re-attaches.
         */
        const lostWithConnection = () => channelClosed && closedByBroker === undefined
        yield* Effect.tryPromise({
          try: () => channel.prefetch(options.prefetch),
          catch: (cause) => new AmqpError({ operation: "set prefetch", cause })
        })

        // Set once the consumer exists; bounded, since a close racing a dead connection can hang.
        const consumer = { tag: undefined as string | undefined }
        const stopConsuming = Effect.suspend(() =>
          consumer.tag === undefined ? Effect.void : cancelQuietly(channel, consumer.tag)
        )
        const toDelivery = (message: amqp.ConsumeMessage): Delivery => {
          // The copy goes out on this delivery's own channel: once that channel is gone (and the
          // broker has requeued the original), the publish fails too instead of adding a second
          // copy. The price: during a memory alarm these rare copies block this connection.
          const moveTo = (target: string, headers: Record<string, unknown>) =>
            publishConfirmed(channel, target, message.content, {
              ...keptProperties(message),
              headers: {
                // Copies travel through the default exchange: keep where the message first came from.
                "x-original-exchange": message.fields.exchange,
                "x-original-routing-key": message.fields.routingKey,
                ...withoutBrokerCount(message.properties.headers),
                ...headers
              }
            }).pipe(
              // A publish cut short by a lost connection is not a failure of this message: the
              // broker requeues the original, and the consumer re-attaches.
              Effect.mapError((error) => lostWithConnection() ? new ConnectionLost({ reason: error.message }) : error),
              Effect.andThen(Effect.sync(() => settle(() => channel.ack(message)))),
              Effect.asVoid
            )
          return {
            message,
            channel,
            ackUpTo: () => settle(() => channel.ack(message, true)),
            stopConsuming,
            ack: () => settle(() => channel.ack(message)),
            nack: (requeue) => settle(() => channel.nack(message, false, requeue)),
            moveTo,
            deadLetter: (reason, headers = {}) =>
              // The default exchange drops a message for a missing queue (after confirming it!),
              // and an operator may have deleted the dead-letter queue: make sure it exists first.
              broker.ensureQueue(options.deadLetterQueue).pipe(
                Effect.andThen(moveTo(options.deadLetterQueue, {
                ...headers,
                "x-dead-letter-reason": reason,
                "x-original-queue": options.queue,
                "x-dead-lettered-at": new Date().toISOString()
              }))).pipe(
                // A cut during the declaration is a lost connection too: re-attach, don't fail.
                Effect.mapError((error) =>
                  lostWithConnection() && error._tag === "AmqpError" ? new ConnectionLost({ reason: error.message }) : error
                )
              )
          }
        }

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
                if (!Queue.offerUnsafe(queue, toDelivery(message))) settle(() => channel.nack(message, false, true))
              }, { noAck: false, ...(options.consumerTag ? { consumerTag: options.consumerTag } : {}) }),
            catch: (cause) => new AmqpError({ operation: `consume from '${options.queue}'`, cause })
          }).pipe(Effect.tap(({ consumerTag }) => Effect.sync(() => { consumer.tag = consumerTag }))),
          ({ consumerTag }) => cancelQuietly(channel, consumerTag)
        )
      }),
    { bufferSize: options.prefetch, strategy: "suspend" }
  )

/**
 * Runs `stream` again on a new channel whenever the broker connection is lost, so it (and the gRPC
 * call it feeds) outlives broker restarts. Other failures end it.
 */
export const reattachOnConnectionLoss = <A, R>(
  queue: string,
  stream: Stream.Stream<A, ConsumeError, R>
): Stream.Stream<A, ConsumeError, R> =>
  stream.pipe(
    Stream.retry(
      Schedule.min([Schedule.exponential("100 millis", 2), Schedule.spaced("2 seconds")]).pipe(
        Schedule.setInputType<ConsumeError>(),
        Schedule.while(({ input }) => input._tag === "ConnectionLost"),
        Schedule.tap(({ attempt, duration, input }) =>
          Effect.logWarning("consumer lost its channel; re-attaching", {
            queue,
            attempt,
            retryInMs: Math.round(Duration.toMillis(duration)),
            reason: input.message
          })
        )
      )
    )
  )
