/**
 * The broker as a scoped service: supervised connections (connection.ts) to the nodes of the
 * cluster (nodes.ts), closed when the layer's scope closes.
 *
 * - Consumers: a pool of connections (pool.ts). Its first member, the primary, declares the
 *   topology on every (re)connect and serves declarations and queue probes.
 * - Publishers: a connection of their own, for the Publish RPCs and for the copies behind
 *   requeues and dead-letters (copies.ts). RabbitMQ blocks a connection that publishes during a
 *   memory or disk alarm, reads included, so sharing one would let publishers stall every
 *   stream's deliveries and acks; the consumers' connections never publish.
 *
 * The topology is declared queue by queue (topology.ts), the delay queues of `nack_delayed`
 * (delayQueues.ts) after the others: a queue that cannot be declared (its node is down) is
 * retried in the background while the others are served, and `unavailableQueues` says which and
 * why.
 */
import type * as amqp from "amqplib"
import { Context, Deferred, Duration, Effect, Exit, Layer, Option, Schedule, type Scope, Stream, SubscriptionRef } from "effect"
import { ProxyConfig } from "../config.js"
import { AmqpError } from "../errors.js"
import { amqpTlsOptions } from "../tls.js"
import { blockedChanges, type Live, supervise, whenLive } from "./connection.js"
import { type Copies, makeCopies } from "./copies.js"
import { shuffled } from "./nodes.js"
import { makeChannelPool } from "./pool.js"
import { type ConnectFailure, isRefusal } from "./refusal.js"
import { declarationOptions, delayQueues } from "./delayQueues.js"
import { declaredQueues, declareExchange, declareQueue, declareQueues } from "./topology.js"

export class Broker extends Context.Service<Broker, {
  /** The primary consumers' connection (topology declared on it); waits while the broker is away. */
  readonly connection: Effect.Effect<amqp.ChannelModel>
  /** The publishers' live connection, once the topology was first declared; waits while away. */
  readonly publishingConnection: Effect.Effect<amqp.ChannelModel>
  /** `true` while the primary and the publishers' connections are up; emits the current value first. */
  readonly connectedChanges: Stream.Stream<boolean>
  /**
   * The broker's reason while it blocks the publishers' connection (a memory or disk alarm:
   * `connection.blocked`), None otherwise; emits the current value first. Streams and
   * subscriptions go on meanwhile; copies and the Publish RPCs wait.
   */
  readonly publishingBlockedChanges: Stream.Stream<Option.Option<string>>
  /** Copies of deliveries (requeues, dead-letters) on the publishers' connection; see copies.ts. */
  readonly copies: Copies
  /** A confirm channel on a pooled consumers' connection with room, closed with the caller's scope. */
  readonly openChannel: Effect.Effect<amqp.ConfirmChannel, AmqpError, Scope.Scope>
  /**
   * Declares `queue` as the proxy would (configured type; a delay queue with its TTL and
   * dead-lettering), if it is missing; used before a copy to a dead-letter or delay queue.
   */
  readonly ensureQueue: (queue: string) => Effect.Effect<void, AmqpError>
  /**
   * Why the consumers' or the publishers' connection could not be opened, while it cannot (None
   * while connected, and before the first attempt failed); refusal.ts.
   */
  readonly connectFailure: (role: "consumers" | "publishers") => Effect.Effect<Option.Option<ConnectFailure>>
  /**
   * `effect` (which waits for the consumers' connection), failing with an AmqpError naming the
   * cause once `connectGrace` has passed while the broker refuses that connection (credentials,
   * vhost, TLS; `brokerRefused` tells it apart). While the broker is merely unreachable it waits
   * on, as a stream opened during a failover should.
   */
  readonly unlessRefused: <A, E, R>(effect: Effect.Effect<A, E, R>) => Effect.Effect<A, E | AmqpError, R>
  /** Queues the proxy could not declare, by name, with the broker's reason; emits the current value first. */
  readonly unavailableQueueChanges: Stream.Stream<ReadonlyMap<string, string>>
  readonly unavailableQueues: Effect.Effect<ReadonlyMap<string, string>>
}>()("messaging-proxy/Broker") {
  static readonly layer = Layer.effect(Broker, Effect.suspend(() => make))
}

const make = Effect.gen(function*() {
  const settings = yield* ProxyConfig
  const { rabbit } = settings
  // Every queue the proxy declares, and how: the topology's, then the delay tiers.
  const queuesToDeclare = [
    ...declaredQueues(rabbit),
    ...delayQueues(rabbit, settings.subscriptions.retryDelays).map((delay) => delay.queue)
  ]
  const optionsOf = declarationOptions(rabbit, settings.subscriptions.retryDelays)
  // Read (and check) the TLS files once, at start: a bad path stops start-up.
  const tls = yield* amqpTlsOptions(rabbit)
  // One order per process: replicas given the same list spread over the cluster.
  const order = shuffled(rabbit.nodes)
  // Publishing before the exchange and bindings exist would get NOT_FOUND (or "unroutable") for
  // a broker that is merely fresh: publishers wait for the first declaration.
  const topologyDeclared = yield* Deferred.make<void>()
  const unavailable = yield* SubscriptionRef.make<ReadonlyMap<string, string>>(new Map())
  // One warning per queue and process, not one per reconnect.
  const warnedDiffers = new Set<string>()
  const warnDiffers = (queue: string, difference: string) =>
    warnedDiffers.has(queue)
      ? Effect.void
      : Effect.sync(() => warnedDiffers.add(queue)).pipe(
        Effect.andThen(Effect.logWarning("queue exists with other arguments than the proxy declares; used as it is", {
          queue,
          queueType: rabbit.queueType,
          difference
        }))
      )

  /**
   * Declares `queues`; records which failed (and says when one comes back). Failures because the
   * connection itself closed meanwhile say nothing about the queues: that is a failed setup.
   */
  const declareAndRecord = ({ connection, isOpen }: Live, queues: ReadonlyArray<string>) =>
    Effect.gen(function*() {
      const failed = yield* declareQueues(connection, rabbit, queues, warnDiffers, optionsOf)
      if (!isOpen()) {
        return yield* new AmqpError({ operation: "declare the queues", cause: "the connection closed meanwhile" })
      }
      const before = yield* SubscriptionRef.get(unavailable)
      const after = new Map(before)
      for (const queue of queues) {
        const reason = failed.get(queue)
        if (reason !== undefined && !before.has(queue)) {
          yield* Effect.logWarning("queue unavailable; the others are served, it is retried in the background", { queue, reason })
        }
        if (reason === undefined && before.has(queue)) yield* Effect.logInfo("queue available again", { queue })
        if (reason === undefined) after.delete(queue)
        else after.set(queue, reason)
      }
      yield* SubscriptionRef.set(unavailable, after)
      return after
    })

  /**
   * While some queue is unavailable, declare it again: 1 s, doubling up to the reconnect cap (at
   * least 1 s). Ends with the connection (its session's scope), or once every queue is back.
   */
  const retryUnavailable = (live: Live) =>
    Effect.gen(function*() {
      const still = yield* SubscriptionRef.get(unavailable)
      if (still.size === 0) return
      const after = yield* declareAndRecord(live, [...still.keys()])
      if (after.size > 0) return yield* Effect.fail("still unavailable")
    }).pipe(
      Effect.retry(Schedule.min([
        Schedule.exponential("1 second", 2),
        Schedule.spaced(Duration.max(rabbit.reconnectMaxDelay, Duration.seconds(1)))
      ])),
      Effect.ignore
    )

  const consumersFailure = yield* SubscriptionRef.make(Option.none<ConnectFailure>())
  const publishersFailure = yield* SubscriptionRef.make(Option.none<ConnectFailure>())
  const primary = yield* supervise({
    rabbit,
    tls,
    order,
    startAt: 0,
    lastFailure: consumersFailure,
    label: "consumers",
    connectionName: rabbit.connectionName,
    prepare: (live) =>
      declareExchange(live.connection, rabbit).pipe(
        Effect.andThen(declareAndRecord(live, queuesToDeclare)),
        Effect.andThen(Effect.logDebug("topology declared", { exchange: rabbit.exchange }))
      ),
    onConnected: (live) =>
      Deferred.done(topologyDeclared, Exit.void).pipe(
        Effect.andThen(Effect.forkScoped(retryUnavailable(live))),
        Effect.asVoid
      ),
    connectedLine: "connected to broker",
    lostLine: "broker connection lost, reconnecting"
  })

  const publishers = yield* supervise({
    rabbit,
    tls,
    order,
    startAt: 0,
    lastFailure: publishersFailure,
    label: "publishers",
    connectionName: `${rabbit.connectionName} (publishing)`,
    connectedLine: "publishing connection to broker open",
    lostLine: "publishing connection to broker lost, reconnecting"
  })

  const copies = yield* makeCopies(publishers)

  const pool = yield* makeChannelPool(primary, (index) =>
    supervise({
      rabbit,
      tls,
      order,
      // Each member starts one node further on: one process's streams spread over the cluster.
      startAt: index,
      label: `consumers-${index + 1}`,
      connectionName: `${rabbit.connectionName} (consumers ${index + 1})`,
      connectedLine: "pooled consumers' connection open",
      lostLine: "pooled consumers' connection lost, reconnecting"
    }))

  const connection = Effect.map(whenLive(primary), (live) => live.connection)
  const isUp = (current: SubscriptionRef.SubscriptionRef<Option.Option<Live>>) =>
    SubscriptionRef.changes(current).pipe(Stream.map(Option.isSome))
  return Broker.of({
    connection,
    publishingConnection: Effect.andThen(Deferred.await(topologyDeclared), Effect.map(whenLive(publishers), (l) => l.connection)),
    connectedChanges: Stream.zipLatest(isUp(primary), isUp(publishers)).pipe(
      Stream.map(([a, b]) => a && b),
      Stream.changes
    ),
    publishingBlockedChanges: blockedChanges(publishers),
    copies,
    openChannel: failFastWhileRefused(pool.openChannel, consumersFailure),
    unlessRefused: (effect) => failFastWhileRefused(effect, consumersFailure),
    connectFailure: (role) => SubscriptionRef.get(role === "consumers" ? consumersFailure : publishersFailure),
    ensureQueue: (queue) => {
      // On the primary, which may not be the caller's connection: when the primary goes away
      // meanwhile, declare again on the next one rather than fail a call whose own channel is fine.
      const attempt = Effect.flatMap(whenLive(primary), (live) =>
        declareQueue(live.connection, rabbit, queue, optionsOf).pipe(Effect.mapError((error) => ({ error, live }))))
      return attempt.pipe(
        Effect.retry({ while: ({ live }) => !live.isOpen(), times: 5 }),
        Effect.mapError(({ error }) => error),
        Effect.flatMap((declared) => declared === "declared" ? Effect.void : warnDiffers(queue, declared.existingDiffers))
      )
    },
    // Watchers (health) hear when the set of unavailable queues changes, not of every retry.
    unavailableQueueChanges: SubscriptionRef.changes(unavailable).pipe(
      Stream.changesWith((a, b) => a.size === b.size && [...a.keys()].every((queue) => b.has(queue)))
    ),
    unavailableQueues: SubscriptionRef.get(unavailable)
  })
})

const refusedOperation = "connect to the broker"

/** Whether `openChannel` failed because the broker refuses the connection (not worth a re-attach). */
export const brokerRefused = (error: AmqpError): boolean => error.operation === refusedOperation

/** How long a caller waits for a connection before a refusal in progress fails it. */
export const connectGrace = Duration.seconds(2)

/**
 * `waiting`, failing once `connectGrace` has passed while `failure` holds a refusal: a stream
 * opened then gets UNAVAILABLE naming the cause, not a silent wait until its deadline.
 */
const failFastWhileRefused = <A, E, R>(
  waiting: Effect.Effect<A, E, R>,
  failure: SubscriptionRef.SubscriptionRef<Option.Option<ConnectFailure>>
): Effect.Effect<A, E | AmqpError, R> => {
  const refused = SubscriptionRef.changes(failure).pipe(
    Stream.map(Option.filter(isRefusal)),
    Stream.filter(Option.isSome),
    Stream.runHead,
    Effect.flatMap(Option.match({
      onNone: () => Effect.never,
      onSome: (refusal) => Effect.fail(new AmqpError({ operation: refusedOperation, cause: refusal.value.description }))
    }))
  )
  return Effect.raceFirst(waiting, Effect.andThen(Effect.sleep(connectGrace), refused))
}
