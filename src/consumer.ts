/**
 * A consumer as a scoped Stream: one confirm channel per stream, prefetch as the bound on what the
 * broker may push before we ack, and the consumer cancelled and channel closed when the stream's
 * scope closes, so every unacked delivery goes back to the queue at once.
 */
import type * as amqp from "amqplib"
import { Cause, Duration, Effect, Queue, Schedule, Stream } from "effect"
import { Broker, brokerRefused } from "./broker/Broker.js"
import * as Metrics from "./metrics.js"
import { settleQuietly } from "./broker/channels.js"
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
   * exchange on the publishers' connection, wait for the broker's confirm (no timeout), then ack
   * this delivery: the message is never in neither place, and in two only if a connection is lost
   * with the copy unconfirmed. Used to dead-letter and to requeue with a delivery count. While
   * copies cannot go out (the publishers' connection is blocked by an alarm, or away), a move to
   * the delivery's own queue is a plain basic.nack(requeue), uncounted, and any other waits.
   * Fails with ConnectionLost when this delivery's channel or the publishers' connection went
   * away meanwhile, and with AmqpError when the broker refused the copy; either way this delivery
   * is then still unacked (or already back in the queue). A move to another queue than the
   * delivery's own first declares that queue if it is missing (Broker.ensureQueue), since the
   * default exchange confirms, then drops, a copy to a missing queue. See broker/copies.ts.
   */
  readonly moveTo: (queue: string, headers: Record<string, unknown>) => Effect.Effect<void, AmqpError | ConnectionLost>
  /** Stops the broker pushing more on this delivery's channel (its consumers are cancelled). */
  readonly stopConsuming: Effect.Effect<void>
  /**
   * Adds a consumer of the same queue on this delivery's channel, with a prefetch (messages) of
   * its own: more deliveries in flight without touching the existing consumers, whose prefetch
   * RabbitMQ fixes when they start (basic.qos with global=false applies to later consumers
   * only). The queue hands messages out in order, and one channel carries them in that order.
   */
  readonly addConsumer: (prefetch: number) => Effect.Effect<void, AmqpError>
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
  /** basic.consume arguments, e.g. `x-consumer-timeout` (milliseconds; RabbitMQ 3.12+). */
  readonly consumerArguments?: Record<string, unknown> | undefined
  /**
   * Runs when the consumer lost its channel and is about to re-attach on a new one, with why:
   * whatever was delivered on the old channel and not settled is back in the queue.
   */
  readonly onReattach?: ((error: ConsumeError) => void) | undefined
}

/**
 * Whether the broker ended the consumer for holding a delivery past its consumer timeout:
 * RabbitMQ 3.x and 4.0–4.2 close the channel with `406 PRECONDITION_FAILED - delivery
 * acknowledgement on channel N timed out` (https://www.rabbitmq.com/docs/consumers#acknowledgement-timeout).
 * The queue is fine, so the consumer can re-attach.
 */
export const brokerConsumerTimeout = (error: ConsumeError): boolean =>
  error._tag === "ConsumerClosedByBroker" && /delivery acknowledgement on channel \d+ timed out/.test(error.reason)

const brokerCancelReason = "consumer cancelled by the broker"

/**
 * Whether the broker cancelled the consumer (basic.cancel) with its channel still open: RabbitMQ
 * 4.3 does so for a consumer timeout, every version when the queue is deleted or its node is gone.
 * Worth one re-attach: if the queue is gone, the new basic.consume says so (404) and the call
 * ends with that.
 */
export const brokerCancelled = (error: ConsumeError): boolean =>
  error._tag === "ConsumerClosedByBroker" && error.reason === brokerCancelReason

export type ConsumeError = AmqpError | ConnectionLost | ConsumerClosedByBroker

/** amqplib's answer when the connection has used up the broker's channel_max. */
export const channelsExhausted = (error: AmqpError): boolean => error.message.includes("No channels left")


/**
 * Acks delivery `deliveryTag` and every earlier unacked delivery of `channel`, in one frame, from
 * the tag alone (so a caller need not keep the message body). False once the channel is gone.
 */
export const ackThrough = (channel: amqp.Channel, deliveryTag: number): boolean =>
  // amqplib reads only `fields.deliveryTag` of the message it is given to ack.
  settleQuietly(() => channel.ack({ fields: { deliveryTag } } as unknown as amqp.Message, true))

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
 * Headers that belong to the broker: quorum queues' `x-delivery-count` (and, from RabbitMQ 4.3,
 * `x-acquired-count`), which count deliveries of the message in its queue and are rewritten on
 * every return.
 */
export const brokerCountHeaders: ReadonlySet<string> = new Set(["x-delivery-count", "x-acquired-count"])

/**
 * `headers` without those in `dropped`. A copy keeps all but the broker's counts: they counted
 * deliveries of the original, and a copy starts again from none.
 */
export const headersWithout = (
  headers: amqp.MessagePropertyHeaders | undefined,
  dropped: ReadonlySet<string> = brokerCountHeaders
): Record<string, unknown> => {
  const kept: Record<string, unknown> = {}
  for (const [key, value] of Object.entries(headers ?? {})) if (!dropped.has(key)) kept[key] = value
  return kept
}

/** Cancel a consumer, but never hang on a channel whose connection died mid-way (amqplib can). */
const cancelQuietly = (channel: amqp.Channel, consumerTag: string) =>
  Effect.promise(() => channel.cancel(consumerTag).catch(() => undefined)).pipe(
    Effect.timeoutOption("2 seconds"),
    Effect.asVoid
  )

/** What every delivery of one consumer's channel shares: kept once per channel, not per message. */
interface ChannelConsumer {
  readonly channel: amqp.Channel
  readonly stopConsuming: Effect.Effect<void>
  readonly startConsumer: (prefetch: number) => Effect.Effect<void, AmqpError>
  readonly moveTo: (
    message: amqp.ConsumeMessage,
    queue: string,
    headers: Record<string, unknown>
  ) => Effect.Effect<void, AmqpError | ConnectionLost>
  readonly deadLetter: (
    message: amqp.ConsumeMessage,
    reason: string,
    headers: Record<string, unknown>
  ) => Effect.Effect<void, AmqpError | ConnectionLost>
}

/** A Delivery as one small object per message: its methods live on the prototype and the channel's consumer. */
class ChannelDelivery implements Delivery {
  constructor(readonly message: amqp.ConsumeMessage, private readonly consumer: ChannelConsumer) {}
  get channel(): amqp.Channel {
    return this.consumer.channel
  }
  get stopConsuming(): Effect.Effect<void> {
    return this.consumer.stopConsuming
  }
  ack(): boolean {
    return settleQuietly(() => this.consumer.channel.ack(this.message))
  }
  ackUpTo(): boolean {
    return ackThrough(this.consumer.channel, this.message.fields.deliveryTag)
  }
  nack(requeue: boolean): boolean {
    return settleQuietly(() => this.consumer.channel.nack(this.message, false, requeue))
  }
  moveTo(queue: string, headers: Record<string, unknown>): Effect.Effect<void, AmqpError | ConnectionLost> {
    return this.consumer.moveTo(this.message, queue, headers)
  }
  addConsumer(prefetch: number): Effect.Effect<void, AmqpError> {
    return this.consumer.startConsumer(prefetch)
  }
  deadLetter(reason: string, headers: Record<string, unknown> = {}): Effect.Effect<void, AmqpError | ConnectionLost> {
    return this.consumer.deadLetter(this.message, reason, headers)
  }
}

export const consume = (options: ConsumeOptions): Stream.Stream<Delivery, ConsumeError, Broker> =>
  Stream.callback<Delivery, ConsumeError, Broker>(
    (queue) =>
      Effect.gen(function*() {
        const broker = yield* Broker
        // A channel that cannot be opened right after a drop means the connection is gone too;
        // a broker that refuses the connection ends the call (UNAVAILABLE, naming why).
        const channel = yield* broker.openChannel.pipe(
          Effect.mapError((error) =>
            channelsExhausted(error) || brokerRefused(error) ? error : new ConnectionLost({ reason: error.message })
          )
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
        // Every consumer on this channel (the first and any added), cancelled together; each
        // cancel is bounded, since a close racing a dead connection can hang.
        const consumerTags: Array<string> = []
        const stopConsuming = Effect.suspend(() =>
          Effect.forEach(consumerTags, (tag) => cancelQuietly(channel, tag), { discard: true })
        )
        // The copy goes out on the publishers' connection, never on this one (copies.ts): a
        // publish during a memory alarm would make the broker block this connection, and with it
        // every stream's deliveries and acks. A requeue to its own queue while copies cannot go
        // out is a plain nack (uncounted); a dead-letter then waits for them.
        const copyTo = (message: amqp.ConsumeMessage, target: string, headers: Record<string, unknown>) =>
          broker.copies.move({
            original: { channel, message, held: () => !channelClosed && closedByBroker === undefined },
            target,
            content: message.content,
            options: {
              ...keptProperties(message),
              headers: {
                // Copies travel through the default exchange: keep where the message first came from.
                "x-original-exchange": message.fields.exchange,
                "x-original-routing-key": message.fields.routingKey,
                ...headersWithout(message.properties.headers),
                ...headers
              }
            },
            whenBlocked: target === options.queue ? "requeue" : "hold"
          }).pipe(Effect.asVoid)
        // The default exchange drops a copy for a missing queue (after confirming it!), and an
        // operator may have deleted the target (a dead-letter or delay queue): make sure it
        // exists first. The delivery's own queue exists while it is consumed.
        const moveTo = (message: amqp.ConsumeMessage, target: string, headers: Record<string, unknown>) =>
          (target === options.queue ? copyTo(message, target, headers) : broker.ensureQueue(target).pipe(
            Effect.andThen(copyTo(message, target, headers))
          )).pipe(
            // A cut during the declaration or the copy is a lost connection too: re-attach, don't fail.
            Effect.mapError((error) =>
              lostWithConnection() && error._tag === "AmqpError" ? new ConnectionLost({ reason: error.message }) : error
            )
          )
        const deadLetter = (message: amqp.ConsumeMessage, reason: string, headers: Record<string, unknown>) =>
          // moveTo declares the dead-letter queue first, if it is missing.
          moveTo(message, options.deadLetterQueue, {
            ...headers,
            "x-dead-letter-reason": reason,
            "x-original-queue": options.queue,
            "x-dead-lettered-at": new Date().toISOString()
          }).pipe(
            // The dead-letter queue refused the copy (a max-length with reject-publish, say):
            // the message stays where it is, and an operator has to know. A lost connection
            // says nothing about the dead-letter queue; it is logged where it is handled.
            Effect.tapError((error) =>
              error._tag === "ConnectionLost" ? Effect.void : Metrics.deadLetterFailed(options.queue).pipe(
                Effect.andThen(Effect.logWarning("dead-letter failed; the message stays in its queue", {
                  queue: options.queue,
                  deadLetterQueue: options.deadLetterQueue,
                  messageId: message.properties.messageId,
                  reason,
                  error: error.message
                }))
              )
            )
          )
        const consumer: ChannelConsumer = { channel, stopConsuming, startConsumer, moveTo, deadLetter }

        const onMessage = (message: amqp.ConsumeMessage | null) => {
          if (message === null) {
            // basic.cancel from the broker: the queue was deleted or the node went away.
            Queue.failCauseUnsafe(
              queue,
              Cause.fail(new ConsumerClosedByBroker({ queue: options.queue, reason: brokerCancelReason }))
            )
            return
          }
          // The consumers' prefetch bounds what the broker sends unacked, and the buffer is not
          // bounded below that; if an offer ever failed, hand the message back rather than drop it.
          if (!Queue.offerUnsafe(queue, new ChannelDelivery(message, consumer))) settleQuietly(() => channel.nack(message, false, true))
        }
        // basic.qos then basic.consume: the prefetch applies to this consumer only.
        function startConsumer(prefetch: number): Effect.Effect<void, AmqpError> {
          const tag = options.consumerTag === undefined
            ? {}
            : { consumerTag: consumerTags.length === 0 ? options.consumerTag : `${options.consumerTag}-${consumerTags.length + 1}` }
          return Effect.tryPromise({
            try: async () => {
              await channel.prefetch(prefetch)
              const args = options.consumerArguments === undefined ? {} : { arguments: options.consumerArguments }
              const { consumerTag } = await channel.consume(options.queue, onMessage, { noAck: false, ...tag, ...args })
              consumerTags.push(consumerTag)
            },
            catch: (cause) => new AmqpError({ operation: `consume from '${options.queue}'`, cause })
          })
        }

        yield* Effect.acquireRelease(startConsumer(options.prefetch), () => stopConsuming)
      }),
    // Unbounded here: what the broker may push unacked (the consumers' prefetch) bounds it.
    { bufferSize: Number.POSITIVE_INFINITY, strategy: "suspend" }
  )

/**
 * Runs `stream` again on a new channel whenever the broker connection is lost, the broker's
 * consumer timeout closed the channel, or the broker cancelled the consumer, so it (and the gRPC
 * call it feeds) outlives broker restarts and timeouts. `onReattach` hears of each. Other
 * failures (a queue found missing on the new channel, say) end it.
 */
export const reattachOnConnectionLoss = <A, R>(
  queue: string,
  stream: Stream.Stream<A, ConsumeError, R>,
  onReattach?: (error: ConsumeError) => void
): Stream.Stream<A, ConsumeError, R> =>
  stream.pipe(
    Stream.retry(
      Schedule.min([Schedule.exponential("100 millis", 2), Schedule.spaced("2 seconds")]).pipe(
        Schedule.setInputType<ConsumeError>(),
        Schedule.while(({ input }) => input._tag === "ConnectionLost" || brokerConsumerTimeout(input) || brokerCancelled(input)),
        Schedule.tap(({ input }) => Effect.sync(() => onReattach?.(input))),
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
