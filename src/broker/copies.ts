/**
 * Copies: the republishes behind counted requeues and dead-lettering (consumer.ts `moveTo`). A
 * move publishes a copy of a delivery and, once the broker confirms it, acks the original.
 *
 * Where copies go out, and why:
 * - On the publishers' connection (one confirm channel of its own), never on a consumers'
 *   connection. RabbitMQ blocks a connection that publishes during a memory or disk alarm: it
 *   stops reading its socket, acks and everything else included, until the alarm clears
 *   ("Connections that are only used to consume messages will not be blocked";
 *   https://www.rabbitmq.com/docs/alarms). One copy on a consumers' connection used to stall every
 *   stream and subscription on it for the whole alarm.
 * - A copy's confirm is waited for without a timeout while the publishers' connection lives. A
 *   blocked connection confirms nothing until the alarm clears, and the copy may still land then:
 *   giving the original back on a timeout put the message in two places. The original is given
 *   back only when the copy is known not to exist (the broker nacked it), or when the publishers'
 *   connection went away with the copy unconfirmed (then nobody can know: at-least-once, a
 *   duplicate is possible, as after any connection loss).
 * - Once published, a copy settles its original whatever happens to the caller (it may be
 *   interrupted: a call that ends, a shutdown): the confirm callback acks the original. The
 *   original's channel is not closed before its copies are settled (`copiesSettledOn`, pool.ts),
 *   or the broker would requeue an original whose copy lands later.
 * - While copies cannot go out now (the publishers' connection is blocked or away), a requeue is a
 *   plain `basic.nack(requeue)` of the original: it goes back uncounted (its `x-requeue-count`
 *   stays; quorum queues still count it in `x-delivery-count`), the queue keeps moving and
 *   nothing is copied, so nothing can be in two places. The price: a message nacked over and over
 *   during a long alarm is not dead-lettered as poison until the alarm ends. A dead-letter cannot
 *   do that (a plain nack would hand a malformed body straight back, in a loop), so it is held:
 *   the original stays unacked (one prefetch slot) until copies can go out again. Before its copy
 *   is published, holding is only waiting, so the caller may give up at any time and the original
 *   goes back with its channel, never copied.
 *
 * RabbitMQ 3.10 announces the block (`connection.blocked`) only to a connection that publishes
 * during the alarm: the first copy of an alarm finds out by being held (until the alarm clears),
 * the later ones see the block and fall back as above.
 */
import type * as amqp from "amqplib"
import { Deferred, Effect, Exit, Option, type Scope, Stream, SubscriptionRef } from "effect"
import { AmqpError, ConnectionLost, describe } from "../errors.js"
import { settleQuietly } from "./channels.js"
import { blockedStates, type Live } from "./connection.js"

/** The delivery a copy is made of. */
export interface Original {
  /** The consumers' channel it came on: it is acked (or given back) there. */
  readonly channel: amqp.Channel
  readonly message: amqp.ConsumeMessage
  /** False once that channel is gone: the broker then has the original back, and it must not be copied. */
  readonly held: () => boolean
}

export interface MoveRequest {
  readonly original: Original
  /** A queue, published to through the default exchange. */
  readonly target: string
  readonly content: Buffer
  readonly options: amqp.Options.Publish
  /**
   * While copies cannot go out now: "requeue" gives the original back with a plain
   * basic.nack(requeue) (a requeue to its own queue); "hold" waits until copies can go out (a
   * dead-letter).
   */
  readonly whenBlocked: "requeue" | "hold"
}

/** "Copied": the copy is confirmed and the original acked. "RequeuedUncounted": plain nack, no copy. */
export type Moved = "Copied" | "RequeuedUncounted"

export interface Copies {
  /**
   * Moves the original (see the module comment). Fails with ConnectionLost when the original's
   * channel is gone (the broker has it back) or the publishers' connection went away before the
   * copy was confirmed (the copy may exist; the original is still unacked, for the caller to give
   * back), and with AmqpError when the broker refused the copy (nack: it does not exist; the
   * original is still unacked). Interrupting it never leaves a copy whose original can come back.
   */
  readonly move: (request: MoveRequest) => Effect.Effect<Moved, AmqpError | ConnectionLost>
  /** True while a copy would go out at once: the publishers' connection is up and not blocked. */
  readonly ready: () => boolean
}

/** Copies published and not yet settled, by their original's channel. */
const inFlight = new WeakMap<amqp.Channel, Set<Deferred.Deferred<void>>>()

/** How many copies of deliveries of `channel` await their confirm. */
export const copiesInFlightOn = (channel: amqp.Channel): number => inFlight.get(channel)?.size ?? 0

/** Waits until every copy of a delivery of `channel` published so far is settled; no timeout (see above). */
export const copiesSettledOn = (channel: amqp.Channel): Effect.Effect<void> =>
  Effect.suspend(() => Effect.forEach([...(inFlight.get(channel) ?? [])], Deferred.await, { discard: true }))

const track = (channel: amqp.Channel): () => void => {
  const done = Deferred.makeUnsafe<void>()
  let set = inFlight.get(channel)
  if (set === undefined) {
    set = new Set()
    inFlight.set(channel, set)
  }
  const held = set
  held.add(done)
  return () => {
    held.delete(done)
    Deferred.doneUnsafe(done, Exit.void)
  }
}


/** amqplib's error for a basic.nack of a confirm channel (anything else: the channel closed). */
const isNack = (error: unknown): boolean => error instanceof Error && error.message === "message nacked"

/**
 * Copies on the publishers' connection `publishers` (the Broker's), on one confirm channel of
 * their own, opened on first use and again after it or its connection closed.
 */
export const makeCopies = (
  publishers: SubscriptionRef.SubscriptionRef<Option.Option<Live>>
): Effect.Effect<Copies, never, Scope.Scope> =>
  Effect.gen(function*() {
    let current: { readonly live: Live; readonly channel: Promise<amqp.ConfirmChannel>; open: boolean } | undefined

    const channelOn = (live: Live) =>
      Effect.tryPromise({
        try: () => {
          if (current !== undefined && current.live === live && current.open) return current.channel
          const entry = {
            live,
            open: true,
            channel: live.connection.createConfirmChannel().then((channel) => {
              channel.on("error", () => undefined)
              channel.on("close", () => {
                entry.open = false
              })
              return channel
            })
          }
          entry.channel.catch(() => {
            entry.open = false
          })
          current = entry
          return entry.channel
        },
        catch: (cause) => new AmqpError({ operation: "open the copies' channel", cause })
      })

    const ready = () => {
      const live = SubscriptionRef.getUnsafe(publishers)
      return Option.isSome(live) && live.value.isOpen() && live.value.blocked() === undefined
    }

    /** The publishers' connection once it is up and not blocked (interruptible; nothing is published yet). */
    const readyLive: Effect.Effect<Live> = SubscriptionRef.changes(publishers).pipe(
      Stream.switchMap(Option.match({
        onNone: () => Stream.make(Option.none<Live>()),
        onSome: (live) => blockedStates(live).pipe(Stream.map((blocked) => Option.isNone(blocked) ? Option.some(live) : Option.none()))
      })),
      Stream.filter(Option.isSome),
      Stream.runHead,
      Effect.flatMap((found) => Option.isSome(found) ? Effect.succeed(found.value.value) : Effect.never)
    )

    const publishAndSettle = (channel: amqp.ConfirmChannel, request: MoveRequest) =>
      Effect.callback<Moved, AmqpError | ConnectionLost>((resume) => {
        const { original, target } = request
        if (!original.held()) {
          resume(Effect.fail(new ConnectionLost({ reason: "the delivery's channel closed before its copy went out" })))
          return
        }
        // From the publish on, the copy may exist: only the confirm callback settles the
        // original, and the original's channel waits for it. No interrupt handler: a caller that
        // stops waiting changes nothing of this.
        const settled = track(original.channel)
        try {
          channel.publish("", target, request.content, request.options, (error: unknown) => {
            if (error == null) {
              const acked = settleQuietly(() => original.channel.ack(original.message))
              settled()
              resume(
                acked
                  ? Effect.succeed("Copied")
                  : Effect.logWarning("copy confirmed after its original's channel closed: the message may be there twice", {
                    queue: target
                  }).pipe(Effect.as("Copied" as const))
              )
            } else if (isNack(error)) {
              settled()
              resume(Effect.fail(new AmqpError({ operation: `copy to '${target}'`, cause: "the broker refused it (nack)" })))
            } else {
              settled()
              resume(Effect.fail(
                new ConnectionLost({ reason: `the publishers' connection closed before the copy to '${target}' was confirmed: ${describe(error)}` })
              ))
            }
          })
        } catch (cause) {
          // amqplib refused to send (its channel is closed): nothing went out.
          settled()
          resume(Effect.fail(new ConnectionLost({ reason: `copy to '${target}' not sent: ${describe(cause)}` })))
        }
      })

    const move = (request: MoveRequest): Effect.Effect<Moved, AmqpError | ConnectionLost> =>
      Effect.suspend(() => {
        if (request.whenBlocked === "requeue" && !ready()) {
          const { channel, message } = request.original
          return settleQuietly(() => channel.nack(message, false, true))
            ? Effect.succeed("RequeuedUncounted" as const)
            : Effect.fail(new ConnectionLost({ reason: "the delivery's channel is gone; the broker has the message back" }))
        }
        // Usually usable right now: skip watching for it (looked at again on each retry).
        const usable = Effect.suspend(() => {
          const now = SubscriptionRef.getUnsafe(publishers)
          return ready() && Option.isSome(now) ? Effect.succeed(now.value) : readyLive
        })
        return usable.pipe(
          Effect.flatMap((live) => channelOn(live).pipe(Effect.mapError((error) => ({ error, live })))),
          // The connection went away between the two: wait for the next one rather than fail.
          Effect.retry({ while: ({ live }) => !live.isOpen(), times: 5 }),
          Effect.mapError(({ error }) => error),
          Effect.flatMap((channel) => publishAndSettle(channel, request))
        )
      })

    return { move, ready }
  })
