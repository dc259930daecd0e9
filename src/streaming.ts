/**
 * Serving one server-streaming call (the contract's Stream* RPCs, which have no acks of their own)
 * from one queue: deliveries are checked (see redelivery.ts), written into the grpc-js call with
 * backpressure, and acked only once the client can be shown to have read them: once more than
 * what it can hold unread (readAhead.ts) has been written past them (unreadLedger.ts). What a
 * client never read, because it was slow, stalled, cancelled, past its deadline or killed, goes
 * back to the queue when the call ends. The consumer re-attaches after a broker connection loss
 * without ending the call.
 *
 * The broker's prefetch is a count (RabbitMQ has no byte prefetch) and must cover the client's
 * window, or the stream would stop with every in-flight message written and none shown read: it
 * starts at RABBITMQ_PREFETCH plus the window over the queue's typical message size, and when
 * the stream starves anyway a consumer with more prefetch is added on the same channel.
 *
 * A quiet stream (nothing more to write) cannot show its last messages read; they are acked once
 * it has been quiet for MESSAGING_QUIET_STREAM_ACK_SECONDS, not kept unacked for ever (every
 * reconnect would repeat them, and the broker's consumer timeout would close the channel). A
 * stream whose writes are held back by the client's window (its application is not reading) is
 * not quiet: its messages stay unacked.
 */
import * as grpc from "@grpc/grpc-js"
import type * as amqp from "amqplib"
import { Duration, Effect, Stream } from "effect"
import type { Broker } from "./broker/Broker.js"
import { batchWrites, drainOrCancel, finishCall } from "./callLifecycle.js"
import { endSpan, startDeliverySpan, type Tracing } from "./tracing.js"
import { ackThrough, type Delivery } from "./consumer.js"
import * as Metrics from "./metrics.js"
import { readAheadOf } from "./readAhead.js"
import { type Admitted, type AdmissionPolicy, admittedDeliveries, deadLetteredIn } from "./redelivery.js"
import { EncodedMessages } from "./serialization.js"
import { makeUnreadLedger } from "./unreadLedger.js"

export interface QueueStreamSpec extends AdmissionPolicy {
  readonly deadLetterQueue: string
  /** A span per delivery while tracing is on (tracing.ts). */
  readonly tracing: Tracing["Service"]
  /** RABBITMQ_PREFETCH: messages held ready beyond what the client's window takes. */
  readonly prefetch: number
  /** GRPC_CLIENT_READ_AHEAD_BYTES (readAhead.ts). */
  readonly clientReadAheadBytes: number
  /** MESSAGING_QUIET_STREAM_ACK_SECONDS. */
  readonly quietStreamAckAfter: Duration.Duration
}

/** basic.qos prefetch-count is a 16-bit field (AMQP 0-9-1). */
const maxPrefetch = 65_535
/** Consumers one stream may run on its channel: 8 × 65,535 covers a 6 MiB window of 12-byte messages. */
const maxConsumersPerStream = 8
/**
 * What the broker keeps in flight beyond the read-ahead, in bytes (at least RABBITMQ_PREFETCH
 * messages): enough that a fast client's pipeline never waits for a refill. Measured with
 * grpc-js on loopback, 30,000 × 1 KiB: 7–8k msg/s with 32 messages beyond, 10–12k with 256.
 */
const pipelineBytes = 256 * 1024
/** gRPC's length-prefixed framing: 1 byte compressed flag, 4 bytes length. */
const grpcFrameBytes = 5

/** Per queue, a running average of the bytes one message takes on the wire: sizes new streams' prefetch. */
const typicalMessageBytes = new Map<string, number>()

const rememberMessageSize = (queue: string, bytes: number) => {
  const typical = typicalMessageBytes.get(queue)
  typicalMessageBytes.set(queue, typical === undefined ? bytes : typical + (bytes - typical) / 64)
}

/** Where a written message is acked from: its channel and tag (not its body, so the body can go). */
interface Unread {
  readonly channel: amqp.Channel
  readonly deliveryTag: number
}

/** The consumers of the stream's current channel (a re-attach starts a new one). */
interface ChannelCapacity {
  readonly channel: amqp.Channel
  /** A delivery of this channel, through which consumers are added. */
  latest: Delivery
  /** Sum of its consumers' prefetch. */
  prefetch: number
  consumers: number
  /** Delivered to the stream and neither acked nor dead-lettered. */
  unacked: number
}

export const serveQueueStream = <Req, A>(
  call: grpc.ServerWritableStream<Req, A>,
  spec: QueueStreamSpec
): Effect.Effect<void, never, Broker> =>
  Effect.gen(function*() {
    const counts = { delivered: 0, deadLettered: 0, ackedQuiet: 0, consumersAdded: 0, givenBack: 0 }
    const rpc = Metrics.rpcName(call)
    // Messages go out as the bytes encoded at admission (see serialization.ts).
    const outgoing = call as unknown as grpc.ServerWritableStream<unknown, A | EncodedMessages>
    batchWrites(outgoing)
    const readAhead = readAheadOf(call as unknown as grpc.ServerWritableStream<unknown, unknown>, spec.clientReadAheadBytes)
    // Until a queue's sizes are known, start from RABBITMQ_PREFETCH alone and let the stream grow:
    // a guess too small for its messages could pull megabytes for a client that never reads.
    const typical = typicalMessageBytes.get(spec.queue)
    const beyondReadAhead = (messageBytes: number) => Math.max(spec.prefetch, Math.ceil(pipelineBytes / messageBytes))
    const firstPrefetch = typical === undefined
      ? spec.prefetch
      : Math.min(maxPrefetch, beyondReadAhead(typical) + Math.ceil(readAhead.bytes() / typical))
    const quietMs = Duration.toMillis(spec.quietStreamAckAfter)
    const ledger = makeUnreadLedger<Unread>()
    let capacity: ChannelCapacity | undefined
    // Admitted but not yet handed to grpc-js (waiting for a drain).
    let unwritten = 0
    let broken = false
    let lastProgressAt = Date.now()
    let growing = false
    // Adding a consumer is rare (a starved stream): a short fiber then, rather than one per stream.
    const runFork = Effect.runForkWith(yield* Effect.context<never>())

    // Acks go out batched: one multiple-ack per channel per 1 ms (or per quarter of the channel's
    // prefetch, which is what the broker waits on), not a frame per message. Messages are shown
    // read in write order, so the newest read one of a channel covers every earlier one still
    // unacked there.
    const toAck = new Map<amqp.Channel, { deliveryTag: number; count: number }>()
    let toAckCount = 0
    let ackTimer: NodeJS.Timeout | undefined
    const flushAcks = () => {
      if (ackTimer !== undefined) clearTimeout(ackTimer)
      ackTimer = undefined
      for (const [channel, { count, deliveryTag }] of toAck) {
        if (ackThrough(channel, deliveryTag)) {
          counts.delivered += count
          Metrics.deliveredUnsafe(spec.queue, rpc, count)
        }
      }
      toAck.clear()
      toAckCount = 0
    }
    const ack = (read: ReadonlyArray<Unread>) => {
      for (const { channel, deliveryTag } of read) {
        const pending = toAck.get(channel)
        if (pending === undefined) toAck.set(channel, { deliveryTag, count: 1 })
        else {
          pending.deliveryTag = deliveryTag
          pending.count++
        }
        if (capacity?.channel === channel) capacity.unacked--
      }
      toAckCount += read.length
      if (toAckCount >= Math.max(1, Math.floor((capacity?.prefetch ?? spec.prefetch) / 4))) flushAcks()
      else ackTimer ??= setTimeout(flushAcks, 1)
    }

    /**
     * Every delivery the consumers may hold is written and none more can be shown read: the
     * client's window is larger than the prefetch covers. Add a consumer for the rest of it.
     */
    const growIfStarved = () => {
      if (
        broken || growing || capacity === undefined || unwritten > 0 || ledger.pendingWrites() > 0 ||
        ledger.size() === 0 || capacity.unacked < capacity.prefetch || capacity.consumers >= maxConsumersPerStream
      ) return
      const averageBytes = ledger.bytes() / ledger.size()
      const missing = Math.max(0, readAhead.bytes() - ledger.bytes())
      const prefetch = Math.min(maxPrefetch, beyondReadAhead(averageBytes) + Math.ceil(missing / averageBytes))
      growing = true
      capacity.prefetch += prefetch
      capacity.consumers++
      runFork(
        capacity.latest.addConsumer(prefetch).pipe(
          Effect.tap(() => Effect.sync(() => counts.consumersAdded++)),
          Effect.tap(() => Effect.logDebug("stream starved with everything written: consumer added", { queue: spec.queue, prefetch })),
          Effect.catch((error) => Effect.logWarning("could not add a consumer", { queue: spec.queue, reason: error.message })),
          Effect.ensuring(Effect.sync(() => {
            growing = false
          }))
        )
      )
    }

    let quietTimer: NodeJS.Timeout | undefined
    const onQuiet = () => {
      quietTimer = undefined
      if (broken || ledger.size() === 0) return
      const idleMs = Date.now() - lastProgressAt
      // Writes held back mean the client is not reading: not quiet, keep them unacked.
      if (ledger.pendingWrites() > 0 || unwritten > 0 || idleMs < quietMs) {
        quietTimer = setTimeout(onQuiet, Math.max(1000, quietMs - idleMs))
        return
      }
      const all = ledger.takeAll()
      counts.ackedQuiet += all.length
      ack(all)
    }

    /** The write of `count` messages of `bytes` in all completed (or failed). */
    const written = (bytes: number, count: number) => (error: Error | null | undefined) => {
      ledger.completed(bytes, count)
      lastProgressAt = Date.now()
      if (error != null) broken = true
      if (broken) return
      const read = ledger.takeRead(readAhead.bytes())
      if (read.length > 0) ack(read)
      growIfStarved()
    }

    /**
     * Writes the admitted deliveries as one chunk (each its own gRPC message, see EncodedMessages);
     * returns grpc-js's answer (false: wait for a drain). A write that never completes (cancel)
     * leaves its messages unacked, and the channel's close requeues them.
     */
    const write = (admitted: ReadonlyArray<Admitted>): boolean => {
      let bytes = 0
      const messages: Array<Uint8Array> = []
      for (const { delivery, encoded, deliveryCount } of admitted) {
        const messageBytes = encoded.byteLength + grpcFrameBytes
        bytes += messageBytes
        messages.push(encoded)
        rememberMessageSize(spec.queue, messageBytes)
        readAhead.written(messageBytes)
        ledger.written({ channel: delivery.channel, deliveryTag: delivery.message.fields.deliveryTag }, messageBytes)
        // The contract's messages have no field for it: the trace continues in the proxy only.
        endSpan(startDeliverySpan(spec.tracing, spec.queue, delivery.message, deliveryCount)?.span)
      }
      unwritten -= admitted.length
      quietTimer ??= setTimeout(onQuiet, quietMs)
      return outgoing.write(new EncodedMessages(messages), written(bytes, admitted.length))
    }

    const deliveries = admittedDeliveries({
      queue: spec.queue,
      prefetch: firstPrefetch,
      deadLetterQueue: spec.deadLetterQueue,
      // The last batch of acks must go out on the channel before it closes, or those read
      // messages come back as duplicates.
      beforeChannelClose: flushAcks
    }, spec).pipe(
      Stream.runForEachArray((admissions) => {
        counts.deadLettered += deadLetteredIn(admissions)
        const admitted: Array<Admitted> = []
        for (const admission of admissions) {
          if (admission._tag === "DeadLettered") continue
          admitted.push(admission.admitted)
          const { delivery } = admission.admitted
          if (capacity === undefined || capacity.channel !== delivery.channel) {
            // A re-attached consumer: its channel starts from the first prefetch again.
            capacity = { channel: delivery.channel, latest: delivery, prefetch: firstPrefetch, consumers: 1, unacked: 0 }
          }
          capacity.latest = delivery
          capacity.unacked++
          unwritten++
        }
        // Once the client is gone nothing is written: the batch stays unacked on the channel,
        // which requeues it when the call's scope closes.
        if (admitted.length === 0 || call.cancelled) return Effect.void
        return write(admitted) ? Effect.void : drainOrCancel(outgoing)
      })
    )

    return yield* Effect.logInfo("stream opened", { queue: spec.queue, prefetch: firstPrefetch, readAheadBytes: readAhead.bytes() }).pipe(
      Effect.andThen(deliveries),
      Effect.ensuring(Effect.sync(() => {
        if (quietTimer !== undefined) clearTimeout(quietTimer)
        if (ackTimer !== undefined) clearTimeout(ackTimer)
        counts.givenBack = ledger.size()
      })),
      Effect.onExit((exit) =>
        Effect.logInfo("stream ended", { queue: spec.queue, reason: finishCall(outgoing, exit), ...counts })
      ),
      Metrics.trackActiveStream(rpc),
      Effect.ignore
    )
  })
