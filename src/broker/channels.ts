/**
 * Short-lived channels on a connection the pool also fills with stream channels (the primary):
 * declarations, bindings, dead-letter queue checks and GetQueueInfo probes each take one, since an
 * operation the broker refuses (404, 406) closes its channel. The pool keeps `reserveFor(channelMax)`
 * channels of the primary free for them, and at most that many run at once per connection, so a
 * burst of dead-letters or probes waits instead of failing with "No channels left to allocate".
 */
import type * as amqp from "amqplib"

/** Channels the primary keeps for short-lived ones: 32, or a quarter of a small channel_max. */
export const reserveFor = (channelMax: number): number => Math.max(1, Math.min(32, Math.floor(channelMax / 4)))

/** channel_max as negotiated in connection.tune; amqplib keeps it on its internal connection. */
export const negotiatedChannelMax = (model: amqp.ChannelModel): number => {
  const inner: unknown = (model as unknown as { connection?: unknown }).connection
  const value = typeof inner === "object" && inner !== null && "channelMax" in inner ? inner.channelMax : undefined
  // 0 (or absent) means "no limit" in AMQP; amqplib then uses 65535 itself.
  return typeof value === "number" && value > 0 ? value : 0xffff
}

/**
 * Runs an ack or nack; false when amqplib refused it because the channel is closed (the broker
 * has then already requeued the message, so there is nothing left to settle).
 */
export const settleQuietly = (operation: () => void): boolean => {
  try {
    operation()
    return true
  } catch {
    return false
  }
}

/** Close, waiting at most 2 s: amqplib never settles a close that races a dying connection. */
export const closeWithin = (channel: amqp.Channel) =>
  Promise.race([
    channel.close().catch(() => undefined),
    new Promise<void>((resolve) => setTimeout(resolve, 2_000).unref())
  ])

interface Limiter {
  active: number
  readonly waiting: Array<() => void>
}

const limiters = new WeakMap<amqp.ChannelModel, Limiter>()

const acquire = async (connection: amqp.ChannelModel): Promise<() => void> => {
  let limiter = limiters.get(connection)
  if (limiter === undefined) {
    limiter = { active: 0, waiting: [] }
    limiters.set(connection, limiter)
  }
  const held = limiter
  if (held.active >= reserveFor(negotiatedChannelMax(connection))) {
    await new Promise<void>((resolve) => held.waiting.push(resolve))
  } else held.active++
  // The slot passes straight to the next waiter, so `active` stays counted for it.
  return () => {
    const next = held.waiting.shift()
    if (next) next()
    else held.active--
  }
}

/**
 * Runs `use` on a channel of its own (at most the reserve at once per connection). The channel is
 * closed afterwards unless the broker already did: a second close would make the broker close the
 * whole connection (504 CHANNEL_ERROR).
 */
export const onThrowawayChannel = async <A>(
  connection: amqp.ChannelModel,
  use: (channel: amqp.Channel) => Promise<A>
): Promise<A> => {
  const release = await acquire(connection)
  try {
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
  } finally {
    release()
  }
}
