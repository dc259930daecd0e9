/**
 * The publishers' confirm channel: Publish and PublishBatch put every message on ONE long-lived
 * confirm channel per publishing connection, opened on first use and reopened after it closes
 * (a channel per message would cost a round trip each).
 *
 * Unroutable messages: with `mandatory` the broker sends basic.return for a message bound to no
 * queue, and always before that message's ack on the same channel (AMQP 0-9-1 and RabbitMQ's
 * "Publisher Confirms" guide). basic.return carries no delivery tag, so a return is matched to
 * the OLDEST pending publish with the same exchange, routing key and message id (returns arrive
 * in publish order). Publishes therefore need not be serialized and can be pipelined. The one
 * ambiguity: two publishes in flight at once with the same exchange, routing key and message id,
 * where a binding changes between the two; then the "unroutable" verdict can land on the wrong
 * one of those two duplicates. Serializing every publish would rule that out, but would cap all
 * publishes of the process at one confirm round trip (incl. the broker's fsync) at a time.
 *
 * Each publish reports its outcome to a plain callback, in the tick its confirm arrives: a
 * PublishBatch publishes its next message from there, as a direct amqplib publisher does, with no
 * fiber hop between a confirm and the publish it makes room for.
 */
import type * as amqp from "amqplib"
import { Data } from "effect"
import { AmqpError } from "../errors.js"

/** The broker returned the mandatory message: no queue is bound for it. */
export class Unroutable extends Data.TaggedError("Unroutable")<{
  readonly messageId: string
  readonly exchange: string
  readonly routingKey: string
}> {
  override get message(): string {
    return `message '${this.messageId}' routed to no queue (routing key '${this.routingKey}' on exchange '${this.exchange}')`
  }
}

/** The broker nacked the publish (it could not take responsibility for it). */
export class PublishNacked extends Data.TaggedError("PublishNacked")<{ readonly messageId: string }> {
  override get message(): string {
    return `the broker refused message '${this.messageId}' (nack)`
  }
}

/** No confirm in time (broker blocked or stuck); the message may or may not be in the queue. */
export class ConfirmTimeout extends Data.TaggedError("ConfirmTimeout")<{
  readonly messageId: string
  readonly seconds: number
}> {
  override get message(): string {
    return `no confirm from the broker for message '${this.messageId}' within ${this.seconds} s; it may or may not have been published`
  }
}

/** Why one publish was not confirmed: the broker's answer, or the channel's end (AmqpError). */
export type ConfirmError = Unroutable | PublishNacked | ConfirmTimeout | AmqpError

/** One message as it goes on the wire: persistent, mandatory, `message_id` = its id. */
export interface OutgoingMessage {
  readonly messageId: string
  readonly routingKey: string
  readonly body: Buffer
  /** AMQP headers (the caller's `traceparent`, when tracing is on). */
  readonly headers?: Record<string, string> | undefined
}

/** Told once per publish: undefined when confirmed, the reason otherwise. */
export type OnConfirm = (error: ConfirmError | undefined) => void

/** One publish waiting for its confirm. */
interface Pending {
  readonly exchange: string
  readonly routingKey: string
  readonly messageId: string
  /** Set when a basic.return was matched to this publish (it precedes the ack). */
  returned: boolean
  /** When it went out (epoch ms), for the confirm timeout. */
  readonly sentAt: number
  /** Set once its callback has been told (by the timeout, or by the confirm). */
  told: boolean
  readonly onConfirm: OnConfirm
}

/** Bounds the wait for one confirm (a blocked broker would otherwise hold the call forever). */
export const CONFIRM_TIMEOUT_SECONDS = 30
/** How often a channel with confirms pending looks for overdue ones: a wait ends 30–31 s after its publish. */
const CONFIRM_SWEEP_MS = 1_000

export class PublishChannel {
  /** In publish order, so a return is matched to the oldest candidate. */
  private readonly pending: Array<Pending> = []
  /** The broker's reason when it closed the channel (e.g. 404 no exchange), for the in-flight publishes. */
  private closedBy: Error | undefined
  private closed = false
  /** Nacked once: no new publishes; closed when the last pending confirm arrives. */
  private retired = false
  /** Fails the waits of confirms older than CONFIRM_TIMEOUT_SECONDS; runs while any are pending. */
  private sweep: NodeJS.Timeout | undefined

  /** Whether new publishes may go out on it (not closed, not retired after a nack). */
  get usable(): boolean {
    return !this.closed && !this.retired
  }

  constructor(private readonly channel: amqp.ConfirmChannel, private readonly onClosed: () => void) {
    // Listeners in the same tick: an unheard 'error' would escalate and crash the process.
    channel.on("error", (error: Error) => {
      this.closedBy = error
    })
    // amqplib fails every unconfirmed callback with "channel closed" in its own 'close' listener,
    // which runs before this one; here we only make the next publish open a fresh channel.
    channel.on("close", () => this.markClosed())
    channel.on("return", (message: amqp.Message) => {
      const fields = message.fields
      const messageId: unknown = message.properties.messageId
      const match = this.pending.find((p) =>
        !p.returned && p.exchange === fields.exchange && p.routingKey === fields.routingKey && p.messageId === messageId
      )
      if (match !== undefined) match.returned = true
    })
  }

  /**
   * Publishes now (synchronously, so callers control the order); `onConfirm` is told once, in the
   * tick the confirm (or the channel's close, or the timeout) arrives. Answers an AmqpError, and
   * never calls `onConfirm`, when the message could not even be sent (the channel is closing).
   */
  send(exchange: string, message: OutgoingMessage, onConfirm: OnConfirm): AmqpError | undefined {
    const entry: Pending = {
      exchange,
      routingKey: message.routingKey,
      messageId: message.messageId,
      returned: false,
      sentAt: Date.now(),
      told: false,
      onConfirm
    }
    const settle = (error: unknown) => {
      // Publish order is confirm order on one channel, so this is nearly always the first entry.
      const index = this.pending.indexOf(entry)
      if (index >= 0) this.pending.splice(index, 1)
      if (this.pending.length === 0) this.stopSweep()
      const outcome = this.outcome(entry, error)
      // Not closed by the broker (that would have settled everything with an error of its own),
      // so closing it ourselves sends nothing on a channel the broker closed.
      if (this.retired && this.pending.length === 0 && !this.closed) void this.channel.close().catch(() => undefined)
      if (!entry.told) {
        entry.told = true
        onConfirm(outcome)
      }
    }
    try {
      // The return value (write buffer full) is not a reason to wait: every caller waits for the
      // confirm anyway, and PublishBatch bounds its own window.
      this.channel.publish(exchange, message.routingKey, message.body, {
        persistent: true,
        mandatory: true,
        messageId: message.messageId,
        contentType: "application/json",
        ...(message.headers === undefined ? {} : { headers: message.headers })
      }, settle)
    } catch (cause) {
      // amqplib throws synchronously once the channel is closed or closing; should its 'close'
      // have gone unseen, this still makes the next publish open a fresh channel.
      this.markClosed()
      return new AmqpError({ operation: `publish '${message.messageId}'`, cause })
    }
    this.pending.push(entry)
    this.sweep ??= setInterval(() => this.failOverdue(), CONFIRM_SWEEP_MS).unref()
    return undefined
  }

  /**
   * A confirm that has not come within CONFIRM_TIMEOUT_SECONDS fails its wait (a blocked broker
   * would otherwise hold the call forever); the publish stays pending, so a late return or
   * confirm still finds it. One timer per channel, not one per publish: a PublishBatch keeps 64
   * in flight, and a timer each cost the proxy ~15 µs per message.
   */
  private failOverdue(): void {
    const overdue = Date.now() - CONFIRM_TIMEOUT_SECONDS * 1000
    // In publish order: the first one not overdue ends the search.
    for (const entry of this.pending) {
      if (entry.sentAt > overdue) break
      // Already failed by an earlier sweep (it stays pending until its confirm or the channel's close).
      if (entry.told) continue
      entry.told = true
      entry.onConfirm(new ConfirmTimeout({ messageId: entry.messageId, seconds: CONFIRM_TIMEOUT_SECONDS }))
    }
  }

  private stopSweep(): void {
    if (this.sweep !== undefined) clearInterval(this.sweep)
    this.sweep = undefined
  }

  private markClosed(): void {
    this.stopSweep()
    this.closed = true
    this.onClosed()
  }

  /**
   * After a nack the next publish takes a fresh channel. A nack can be the channel's state, not
   * the message's: on RabbitMQ 3.10, a channel whose first publish to a quorum queue came while
   * the queue had no leader (its node just died, and the proxy reconnected within milliseconds)
   * gets every later publish to that queue nacked until that node returns, while a new channel
   * works as soon as a new leader is elected (about 0.5 s).
   */
  private retire(): void {
    if (this.retired) return
    this.retired = true
    this.onClosed()
  }

  private outcome(entry: Pending, error: unknown): ConfirmError | undefined {
    if (error === null || error === undefined) {
      return entry.returned
        ? new Unroutable({ messageId: entry.messageId, exchange: entry.exchange, routingKey: entry.routingKey })
        : undefined
    }
    // amqplib reports a basic.nack as exactly this message, and a closed channel otherwise.
    if (error instanceof Error && error.message === "message nacked") {
      this.retire()
      return new PublishNacked({ messageId: entry.messageId })
    }
    return new AmqpError({ operation: `publish '${entry.messageId}'`, cause: this.closedBy ?? error })
  }
}

// One channel per connection object: a reconnect brings a new connection and so a new channel,
// and the WeakMap lets a dead connection's entry go with it. A module-level cache (rather than a
// service in the app's Layer) keeps the handlers' `run` (which provides only Broker) sufficient.
const publishChannels = new WeakMap<amqp.ChannelModel, Promise<PublishChannel>>()

/**
 * The connection's shared confirm channel, opened on first use (concurrent first publishes share
 * one), and again after it closed or was retired. Rejects with amqplib's error when the broker
 * refuses to open it.
 */
export const channelFor = (connection: amqp.ChannelModel): Promise<PublishChannel> => {
  const cached = publishChannels.get(connection)
  if (cached !== undefined) return cached
  const forget = () => {
    if (publishChannels.get(connection) === created) publishChannels.delete(connection)
  }
  const created = connection.createConfirmChannel().then((channel) => new PublishChannel(channel, forget))
  void created.catch(forget)
  publishChannels.set(connection, created)
  return created
}
