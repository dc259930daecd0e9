/**
 * The broker connections as a scoped service. A supervisor fiber keeps each amqplib connection
 * open: it connects with capped exponential backoff (logging every attempt), and when the
 * connection drops it starts over. There are two: consumers (and the topology) use one, the
 * Publish RPCs the other. RabbitMQ blocks a connection that publishes during a memory or disk
 * alarm, reads included, so sharing one would let publishers stall every stream's acks.
 * Both are closed when the layer's scope closes.
 */
import * as amqp from "amqplib"
import { Context, Deferred, Duration, Effect, Exit, Layer, Option, Redacted, Schedule, type Scope, Stream, SubscriptionRef } from "effect"
import { ProxyConfig, type ProxySettings } from "./config.js"
import { AmqpError } from "./errors.js"
import * as Metrics from "./metrics.js"
import { amqpTlsOptions } from "./tls.js"
import { declareTopology } from "./topology.js"

export class Broker extends Context.Service<Broker, {
  /** The consumers' live connection (topology declared on it); waits while the broker is away. */
  readonly connection: Effect.Effect<amqp.ChannelModel>
  /** The publishers' live connection; waits while the broker is away. */
  readonly publishingConnection: Effect.Effect<amqp.ChannelModel>
  /** `true` while both connections are up (and the topology declared); emits the current value first. */
  readonly connectedChanges: Stream.Stream<boolean>
  /** A confirm channel on the consumers' connection, closed with the caller's scope. */
  readonly openChannel: Effect.Effect<amqp.ConfirmChannel, AmqpError, Scope.Scope>
}>()("messaging-proxy/Broker") {
  static readonly layer = Layer.effect(Broker, Effect.suspend(() => make))
}

/** A live connection and the reason it closed, once it does. */
interface Session {
  readonly connection: amqp.ChannelModel
  readonly closed: Deferred.Deferred<string>
}

const connectOnce = (rabbit: ProxySettings["rabbit"], tls: amqp.SocketOptions | undefined, connectionName: string) =>
  Effect.tryPromise({
    try: async (): Promise<Session> => {
      const connection = await amqp.connect(
        {
          protocol: tls ? "amqps" : "amqp",
          hostname: rabbit.host,
          port: rabbit.port,
          username: rabbit.user,
          password: Redacted.value(rabbit.password),
          vhost: rabbit.vhost,
          heartbeat: rabbit.heartbeatSeconds
        },
        { ...tls, clientProperties: { connection_name: connectionName }, timeout: 10_000, noDelay: true }
      )
      // Listeners go on in the same tick as the connection: amqplib crashes the process on an
      // unheard 'error', and a broker restart emits only 'close', which must not be missed.
      const closed = Deferred.makeUnsafe<string>()
      let lastError = "connection closed"
      connection.on("error", (error: Error) => {
        lastError = error.message
      })
      connection.on("blocked", (reason: string) => {
        lastError = `broker blocked the connection: ${reason}`
      })
      connection.on("close", (error?: Error) => {
        Deferred.doneUnsafe(closed, Exit.succeed(error?.message ?? lastError))
      })
      return { connection, closed }
    },
    catch: (cause) =>
      new AmqpError({ operation: `connect to ${tls ? "amqps" : "amqp"}://${rabbit.host}:${rabbit.port}`, cause })
  })

/** Close, but never hang on a connection whose socket is already dead. */
const closeQuietly = (connection: amqp.ChannelModel) =>
  Effect.promise(() => connection.close().catch(() => undefined)).pipe(Effect.timeoutOption("2 seconds"))

type Role = "consumers" | "publishers"

/**
 * One supervised connection: its current value (None while away). The consumers' connection also
 * declares the topology, as one step with connecting, so a failed declaration is retried.
 */
const supervise = (
  rabbit: ProxySettings["rabbit"],
  tls: amqp.SocketOptions | undefined,
  role: Role,
  /** Runs after each successful connect (and, for the consumers, declaration). */
  onConnected: Effect.Effect<void>
) =>
  Effect.gen(function*() {
    const current = yield* SubscriptionRef.make<Option.Option<amqp.ChannelModel>>(Option.none())
    const connectionMetrics = yield* Metrics.trackBrokerConnection(role)
    const connectionName = role === "consumers" ? rabbit.connectionName : `${rabbit.connectionName} (publishing)`

    const backoff = Schedule.min([
      Schedule.exponential("200 millis", 2),
      Schedule.spaced(rabbit.reconnectMaxDelay)
    ]).pipe(
      Schedule.jittered,
      Schedule.setInputType<AmqpError>(),
      Schedule.tap(({ attempt, duration, input }) =>
        Effect.logWarning(input.operation === "declare topology" ? "topology declaration failed, retrying" : "broker unreachable, retrying", {
          connection: role,
          attempt,
          retryInMs: Math.round(Duration.toMillis(duration)),
          error: input.message
        })
      )
    )

    const open = connectOnce(rabbit, tls, connectionName).pipe(
      Effect.tap(({ connection }) =>
        role === "consumers"
          ? declareTopology(connection, rabbit).pipe(Effect.onError(() => closeQuietly(connection)))
          : Effect.void
      )
    )

    const session = Effect.gen(function*() {
      // The retry runs outside acquireRelease: an acquire cannot be interrupted, and shutdown must
      // be able to stop the retry loop while the broker is unreachable.
      const { connection, closed } = yield* open.pipe(Effect.retry(backoff))
      yield* Effect.addFinalizer(() => closeQuietly(connection))
      yield* SubscriptionRef.set(current, Option.some(connection))
      yield* onConnected
      yield* connectionMetrics.connected
      // "connected to broker" means the consumers' connection with the topology declared:
      // operators and scripts wait for that line.
      yield* Effect.logInfo(role === "consumers" ? "connected to broker" : "publishing connection to broker open", {
        host: rabbit.host,
        port: rabbit.port,
        vhost: rabbit.vhost
      })
      const reason = yield* Deferred.await(closed)
      yield* SubscriptionRef.set(current, Option.none())
      yield* connectionMetrics.lost
      yield* Effect.logWarning(
        role === "consumers" ? "broker connection lost, reconnecting" : "publishing connection to broker lost, reconnecting",
        { reason }
      )
    }).pipe(Effect.scoped)

    yield* session.pipe(Effect.forever, Effect.forkScoped)
    // On shutdown, say so before the connection goes (finalizers run in reverse order).
    yield* Effect.addFinalizer(() => SubscriptionRef.set(current, Option.none()))
    return current
  })

/** The current connection, waiting while there is none. */
const live = (current: SubscriptionRef.SubscriptionRef<Option.Option<amqp.ChannelModel>>): Effect.Effect<amqp.ChannelModel> =>
  SubscriptionRef.changes(current).pipe(
    Stream.filter(Option.isSome),
    Stream.runHead,
    Effect.flatMap((found) => Option.isSome(found) ? Effect.succeed(found.value.value) : Effect.never)
  )

const make = Effect.gen(function*() {
  const { rabbit } = yield* ProxyConfig
  // Read (and check) the TLS files once, at start: a bad path stops start-up.
  const tls = yield* amqpTlsOptions(rabbit)
  // Publishing before the exchange and bindings exist would get NOT_FOUND (or "unroutable") for
  // a broker that is merely fresh: publishers wait for the first declaration.
  const topologyDeclared = yield* Deferred.make<void>()
  const consumers = yield* supervise(rabbit, tls, "consumers", Deferred.done(topologyDeclared, Exit.void).pipe(Effect.asVoid))
  const publishers = yield* supervise(rabbit, tls, "publishers", Effect.void)
  const connection = live(consumers)

  // Waiting for the connection stays interruptible; only the channel creation is the acquire.
  const openChannel = Effect.flatMap(connection, (conn) =>
    Effect.acquireRelease(
      Effect.tryPromise({
        try: () => conn.createConfirmChannel(),
        catch: (cause) => new AmqpError({ operation: "create channel", cause })
      }),
      // Bounded: a close racing a dying connection can hang in amqplib.
      (channel) => Effect.promise(() => channel.close().catch(() => undefined)).pipe(Effect.timeoutOption("2 seconds"))
    )).pipe(
    // A default listener so a channel error can never escalate into a process crash.
    Effect.tap((channel) => Effect.sync(() => channel.on("error", () => undefined)))
  )

  const publishingConnection = Effect.andThen(Deferred.await(topologyDeclared), live(publishers))
  const isUp = (current: SubscriptionRef.SubscriptionRef<Option.Option<amqp.ChannelModel>>) =>
    SubscriptionRef.changes(current).pipe(Stream.map(Option.isSome))
  return Broker.of({
    connection,
    publishingConnection,
    connectedChanges: Stream.zipLatest(isUp(consumers), isUp(publishers)).pipe(
      Stream.map(([a, b]) => a && b),
      Stream.changes
    ),
    openChannel
  })
})
