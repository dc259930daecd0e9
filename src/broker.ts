/**
 * The broker connection as a scoped service. A supervisor fiber keeps one amqplib connection open:
 * it connects with capped exponential backoff (logging every attempt), declares the topology, and
 * when the connection drops it starts over. Consumers wait for the current connection and open
 * their own channels on it; the connection is closed when the layer's scope closes.
 */
import * as amqp from "amqplib"
import { Context, Deferred, Duration, Effect, Exit, Layer, Option, Redacted, Schedule, type Scope, Stream, SubscriptionRef } from "effect"
import { ProxyConfig, type ProxySettings } from "./config.js"
import { AmqpError } from "./errors.js"
import * as Metrics from "./metrics.js"
import { amqpTlsOptions } from "./tls.js"
import { declareTopology } from "./topology.js"

export class Broker extends Context.Service<Broker, {
  /** The live connection; waits while the broker is away. */
  readonly connection: Effect.Effect<amqp.ChannelModel>
  /** `true` while a connection with declared topology is up; emits the current value first. */
  readonly connectedChanges: Stream.Stream<boolean>
  /** A confirm channel on the live connection, closed with the caller's scope. */
  readonly openChannel: Effect.Effect<amqp.ConfirmChannel, AmqpError, Scope.Scope>
}>()("messaging-proxy/Broker") {
  static readonly layer = Layer.effect(Broker, Effect.suspend(() => make))
}

/** A live connection and the reason it closed, once it does. */
interface Session {
  readonly connection: amqp.ChannelModel
  readonly closed: Deferred.Deferred<string>
}

const connectOnce = (rabbit: ProxySettings["rabbit"], tls: amqp.SocketOptions | undefined) =>
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
        { ...tls, clientProperties: { connection_name: rabbit.connectionName }, timeout: 10_000, noDelay: true }
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

const make = Effect.gen(function*() {
  const { rabbit } = yield* ProxyConfig
  // Read (and check) the TLS files once, at start: a bad path stops start-up.
  const tls = yield* amqpTlsOptions(rabbit)
  const current = yield* SubscriptionRef.make<Option.Option<amqp.ChannelModel>>(Option.none())
  const connectionMetrics = yield* Metrics.trackBrokerConnection

  const backoff = Schedule.min([
    Schedule.exponential("200 millis", 2),
    Schedule.spaced(rabbit.reconnectMaxDelay)
  ]).pipe(
    Schedule.jittered,
    Schedule.setInputType<AmqpError>(),
    Schedule.tap(({ attempt, duration, input }) =>
      Effect.logWarning(input.operation === "declare topology" ? "topology declaration failed, retrying" : "broker unreachable, retrying", {
        attempt,
        retryInMs: Math.round(Duration.toMillis(duration)),
        error: input.message
      })
    )
  )

  // Connect and declare as one step, so a failed declaration closes its connection and is retried.
  const open = connectOnce(rabbit, tls).pipe(
    Effect.tap(({ connection }) =>
      declareTopology(connection, rabbit).pipe(Effect.onError(() => closeQuietly(connection)))
    )
  )

  const session = Effect.gen(function*() {
    // The retry runs outside acquireRelease: an acquire cannot be interrupted, and shutdown must
    // be able to stop the retry loop while the broker is unreachable.
    const { connection, closed } = yield* open.pipe(Effect.retry(backoff))
    yield* Effect.addFinalizer(() => closeQuietly(connection))
    yield* SubscriptionRef.set(current, Option.some(connection))
    yield* connectionMetrics.connected
    yield* Effect.logInfo("connected to broker", { host: rabbit.host, port: rabbit.port, vhost: rabbit.vhost })
    const reason = yield* Deferred.await(closed)
    yield* SubscriptionRef.set(current, Option.none())
    yield* connectionMetrics.lost
    yield* Effect.logWarning("broker connection lost, reconnecting", { reason })
  }).pipe(Effect.scoped)

  yield* session.pipe(Effect.forever, Effect.forkScoped)
  // On shutdown, say so before the connection goes (finalizers run in reverse order).
  yield* Effect.addFinalizer(() => SubscriptionRef.set(current, Option.none()))

  const connection: Effect.Effect<amqp.ChannelModel> = SubscriptionRef.changes(current).pipe(
    Stream.filter(Option.isSome),
    Stream.runHead,
    Effect.flatMap((found) => Option.isSome(found) ? Effect.succeed(found.value.value) : Effect.never)
  )

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

  return Broker.of({
    connection,
    connectedChanges: SubscriptionRef.changes(current).pipe(Stream.map(Option.isSome), Stream.changes),
    openChannel
  })
})
