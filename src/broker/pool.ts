/**
 * The consumers' connection pool. Every stream and subscription has an AMQP channel of its own,
 * and RabbitMQ allows `channel_max` channels per connection (2047 by default, negotiated in
 * connection.tune), so one connection caps a process at about 2,000 streams. The pool hands out
 * channels from the first live connection with room, and opens another connection (supervised
 * like the first, starting at the next node of the order) when all are full. Members are never
 * closed while the pool lives: a connection with no channels costs one socket and heartbeats.
 *
 * The first member is the primary: topology, declarations and queue probes use it, so it keeps
 * `primaryReserve` channels free for those short-lived channels.
 */
import type * as amqp from "amqplib"
import { Effect, Option, Scope, Semaphore, SubscriptionRef } from "effect"
import { AmqpError } from "../errors.js"
import { type Live, whenLive } from "./connection.js"

interface Member {
  readonly current: SubscriptionRef.SubscriptionRef<Option.Option<Live>>
  /** Channels handed out on this member and not yet closed. */
  inUse: number
  readonly reserve: (channelMax: number) => number
}

/**
 * Channels the primary keeps free for declarations, dead-letter queue checks and GetQueueInfo
 * probes: 32, or a quarter of a small channel_max.
 */
const primaryReserve = (channelMax: number) => Math.min(32, Math.floor(channelMax / 4))

export interface ChannelPool {
  /** A confirm channel on a live member with room, closed with the caller's scope. */
  readonly openChannel: Effect.Effect<amqp.ConfirmChannel, AmqpError, Scope.Scope>
  /** How many connections the pool holds (live or reconnecting). */
  readonly size: Effect.Effect<number>
}

/**
 * `primary` is the first member; `addMember(index)` supervises member `index` (1, 2, …) for as
 * long as the pool's scope and returns its current value.
 */
export const makeChannelPool = (
  primary: SubscriptionRef.SubscriptionRef<Option.Option<Live>>,
  addMember: (index: number) => Effect.Effect<SubscriptionRef.SubscriptionRef<Option.Option<Live>>, never, Scope.Scope>
): Effect.Effect<ChannelPool, never, Scope.Scope> =>
  Effect.gen(function*() {
    const scope = yield* Effect.scope
    const members: Array<Member> = [{ current: primary, inUse: 0, reserve: primaryReserve }]
    // Choosing a member and counting the channel happen under one permit, so concurrent opens
    // never overfill a connection, and only one of them grows the pool.
    const choosing = yield* Semaphore.make(1)

    const liveWithRoom = Effect.gen(function*() {
      for (const member of members) {
        const live = yield* SubscriptionRef.get(member.current)
        if (Option.isSome(live) && member.inUse < live.value.channelMax - member.reserve(live.value.channelMax)) return Option.some({ member, live: live.value })
      }
      return Option.none<{ member: Member; live: Live }>()
    })

    const choose: Effect.Effect<{ member: Member; live: Live }> = Effect.gen(function*() {
      while (true) {
        const found = yield* liveWithRoom
        if (Option.isSome(found)) {
          found.value.member.inUse++
          return found.value
        }
        const primaryLive = yield* SubscriptionRef.get(primary)
        if (Option.isNone(primaryLive)) {
          // The broker is away: wait for the primary rather than open members that cannot connect.
          yield* whenLive(primary)
          continue
        }
        // Every live member is full: grow, and wait for the new member to connect.
        const current = yield* addMember(members.length).pipe(Scope.provide(scope))
        const member: Member = { current, inUse: 0, reserve: () => 0 }
        members.push(member)
        yield* Effect.logInfo("consumer connection pool grows", { connections: members.length })
        yield* whenLive(current)
      }
    })

    const openChannel = Effect.acquireRelease(
      choosing.withPermits(1)(choose),
      ({ member }) => Effect.sync(() => { member.inUse-- })
    ).pipe(
      Effect.flatMap(({ live }) =>
        Effect.acquireRelease(
          Effect.tryPromise({
            try: () => live.connection.createConfirmChannel(),
            catch: (cause) => new AmqpError({ operation: "create channel", cause })
          }),
          // Bounded: a close racing a dying connection can hang in amqplib.
          (channel) => Effect.promise(() => channel.close().catch(() => undefined)).pipe(Effect.timeoutOption("2 seconds"))
        )
      ),
      // A default listener so a channel error can never escalate into a process crash.
      Effect.tap((channel) => Effect.sync(() => channel.on("error", () => undefined)))
    )

    return { openChannel, size: Effect.sync(() => members.length) }
  })
