/**
 * The consumers' connection pool. Every stream and subscription has an AMQP channel of its own,
 * and RabbitMQ allows `channel_max` channels per connection (2047 by default, negotiated in
 * connection.tune), so one connection caps a process at about 2,000 streams. The pool hands out
 * channels from the first live connection with room, and opens another connection (supervised
 * like the first, starting at the next node of the order) when every member is live and full.
 * Members are never closed while the pool lives: a connection with no channels costs one socket
 * and heartbeats.
 *
 * The first member is the primary: topology, declarations and queue probes use it, so it keeps
 * `reserveFor(channelMax)` channels free for those short-lived channels (channels.ts).
 *
 * Waiting (for the broker, for a new member) is always interruptible and never holds a lock: a
 * client that cancels, or a shutdown, ends the wait at once, and a member that never connects
 * only makes the calls that need room wait, never those a live member can serve.
 */
import type * as amqp from "amqplib"
import { Effect, Option, Scope, Semaphore, Stream, SubscriptionRef } from "effect"
import { AmqpError } from "../errors.js"
import { reserveFor } from "./channels.js"
import { copiesInFlightOn, copiesSettledOn } from "./copies.js"
import type { Live } from "./connection.js"

interface Member {
  readonly current: SubscriptionRef.SubscriptionRef<Option.Option<Live>>
  /** Channels handed out on this member and not yet closed. */
  inUse: number
  readonly reserve: (channelMax: number) => number
}

export interface ChannelPool {
  /** A confirm channel on a live member with room, closed with the caller's scope. */
  readonly openChannel: Effect.Effect<amqp.ConfirmChannel, AmqpError, Scope.Scope>
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
    const poolScope = yield* Effect.scope
    const members: Array<Member> = []
    // Bumped whenever a member connects or drops, or a channel is given back: what a waiter waits for.
    const version = yield* SubscriptionRef.make(0)
    const bump = SubscriptionRef.update(version, (v) => v + 1)
    const join = (current: SubscriptionRef.SubscriptionRef<Option.Option<Live>>, reserve: Member["reserve"]) =>
      Effect.gen(function*() {
        members.push({ current, inUse: 0, reserve })
        yield* SubscriptionRef.changes(current).pipe(Stream.runForEach(() => bump), Effect.forkIn(poolScope))
      })
    yield* join(primary, reserveFor)

    const hasRoom = (member: Member, live: Live) => member.inUse < live.channelMax - member.reserve(live.channelMax)

    /** A live member with room, counted at once (no await between the look and the count); fails when none. */
    const take = Effect.gen(function*() {
      for (const member of members) {
        const live = yield* SubscriptionRef.get(member.current)
        if (Option.isSome(live) && hasRoom(member, live.value)) {
          member.inUse++
          return { member, live: live.value }
        }
      }
      return yield* Effect.fail("no room" as const)
    })

    // Looking and adding under one permit, so concurrent callers add one member, not one each.
    // Nothing waits for a connection under it.
    const growing = yield* Semaphore.make(1)
    /** Every member live and full: grow. While one is connecting (or reconnecting), wait for it instead. */
    const growIfAllFull = growing.withPermits(1)(Effect.gen(function*() {
      for (const member of members) {
        const live = yield* SubscriptionRef.get(member.current)
        if (Option.isNone(live) || hasRoom(member, live.value)) return
      }
      yield* join(yield* addMember(members.length).pipe(Scope.provide(poolScope)), () => 0)
      yield* Effect.logInfo("consumer connection pool grows", { connections: members.length })
    }))

    const waitForChange = (seen: number) =>
      SubscriptionRef.changes(version).pipe(Stream.filter((v) => v !== seen), Stream.runHead, Effect.asVoid)

    /** Takes a member with room, growing or waiting (interruptibly) as needed; released with the scope. */
    const reserveChannel: Effect.Effect<{ member: Member; live: Live }, never, Scope.Scope> = Effect.gen(function*() {
      while (true) {
        const seen = yield* SubscriptionRef.get(version)
        // Taking and registering the release happen together, uninterruptibly, without waiting.
        const taken = yield* Effect.acquireRelease(take, ({ member }) =>
          Effect.sync(() => {
            member.inUse--
          }).pipe(Effect.andThen(bump))).pipe(Effect.option)
        if (Option.isSome(taken)) return taken.value
        yield* growIfAllFull
        yield* waitForChange(seen)
      }
    })

    const openChannel = Effect.flatMap(reserveChannel, ({ live }) =>
      Effect.acquireRelease(
        Effect.tryPromise({
          try: () => live.connection.createConfirmChannel(),
          catch: (cause) => new AmqpError({ operation: "create channel", cause })
        }),
        (channel) => {
          // Bounded: a close racing a dying connection can hang in amqplib.
          const close = Effect.promise(() => channel.close().catch(() => undefined)).pipe(
            Effect.timeoutOption("2 seconds"),
            Effect.asVoid
          )
          // Closing requeues what is unacked, and a copy still awaiting its confirm may land later:
          // such a channel closes once its copies are settled (copies.ts), without holding up the
          // call that used it (the consumer is already cancelled, so nothing new arrives on it).
          return copiesInFlightOn(channel) === 0
            ? close
            : Effect.andThen(copiesSettledOn(channel), close).pipe(Effect.forkIn(poolScope), Effect.asVoid)
        }
      )).pipe(
        // A default listener so a channel error can never escalate into a process crash.
        Effect.tap((channel) => Effect.sync(() => channel.on("error", () => undefined)))
      )

    return { openChannel }
  })
