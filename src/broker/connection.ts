/**
 * One supervised AMQP connection: a fiber keeps it open, connecting with capped exponential
 * backoff and jitter (logging every attempt), and starts over when it drops. Each attempt goes to
 * the next node of the cluster (nodes.ts), so a dead node costs one attempt, and a dropped
 * connection comes back on another node. The current connection is published in a
 * SubscriptionRef (None while away); it is closed when the scope closes.
 */
import * as amqp from "amqplib"
import { coalesceWrites } from "./coalescedWrites.js"
import { Deferred, Duration, Effect, Exit, Option, Queue, Redacted, Schedule, type Scope, Stream, SubscriptionRef } from "effect"
import { isIP } from "node:net"
import type { BrokerNode, ProxySettings } from "../config.js"
import { AmqpError } from "../errors.js"
import * as Metrics from "../metrics.js"
import { negotiatedChannelMax } from "./channels.js"
import { nodeCursor, nodeLabel } from "./nodes.js"
import {
  classifyConnectError,
  type ConnectFailure,
  type ConnectFailureReason,
  explainOpenRefusal,
  isRefusal,
  openRefusedByAmqplib
} from "./refusal.js"

type Rabbit = ProxySettings["rabbit"]

/** A live connection, the node it is on, and how many channels the broker lets it open. */
export interface Live {
  readonly connection: amqp.ChannelModel
  readonly node: BrokerNode
  /** channel_max as negotiated in connection.tune (RabbitMQ's default is 2047). */
  readonly channelMax: number
  /** False once the connection has closed (before the supervisor has noticed, too). */
  readonly isOpen: () => boolean
  /**
   * The broker's reason while it blocks this connection (`connection.blocked`, e.g. "low on
   * memory"), undefined once `connection.unblocked` came or before any `connection.blocked`.
   * RabbitMQ blocks a connection that publishes while a memory or disk alarm is in effect: it
   * stops reading from its socket, so nothing more is sent on it (acks included) until the alarm
   * clears. It says so only to a connection that publishes during the alarm (3.10 measured: one
   * that only published before it heard nothing), so a connection that never publishes is never
   * blocked, and one that does learns of the alarm with its first publish.
   * Source: https://www.rabbitmq.com/docs/connection-blocked, https://www.rabbitmq.com/docs/alarms
   */
  readonly blocked: () => string | undefined
  /** Calls `watcher` after each `connection.blocked` / `connection.unblocked`; returns the unwatch. */
  readonly watchBlocked: (watcher: () => void) => () => void
}

interface Session extends Live {
  /** Completes with the reason once the connection closes. */
  readonly closed: Deferred.Deferred<string>
}

/** A failed attempt: the error, why (for a failed connect; undefined when the setup after it failed), and the node. */
class AttemptFailed {
  constructor(readonly error: AmqpError, readonly failure: ConnectFailure | undefined, readonly node: string) {}
}

const connectOnce = (rabbit: Rabbit, node: BrokerNode, tls: amqp.SocketOptions | undefined, connectionName: string) =>
  Effect.tryPromise({
    try: async (): Promise<Session> => {
      const connection = await amqp.connect(
        {
          protocol: tls ? "amqps" : "amqp",
          hostname: node.host,
          port: node.port,
          username: rabbit.user,
          password: Redacted.value(rabbit.password),
          vhost: rabbit.vhost,
          heartbeat: rabbit.heartbeatSeconds,
          // connection.tune takes the lower of ours and the broker's; 0 leaves the broker's.
          channelMax: rabbit.channelMax
        },
        {
          ...tls,
          // SNI takes names only; an IP host is still checked against the certificate's IP SANs.
          ...(tls && isIP(node.host) === 0 ? { servername: node.host } : {}),
          clientProperties: { connection_name: connectionName },
          timeout: 10_000,
          noDelay: true
        }
      )
      coalesceWrites(connection)
      // Listeners go on in the same tick as the connection: amqplib crashes the process on an
      // unheard 'error', and a broker restart emits only 'close', which must not be missed.
      const closed = Deferred.makeUnsafe<string>()
      let lastError = "connection closed"
      connection.on("error", (error: Error) => {
        lastError = error.message
      })
      let blocked: string | undefined
      // Watchers of the block (every copy waiting for publishers to be usable): a set of our own,
      // not one listener each on the connection, whose emitter warns past ten.
      const blockWatchers = new Set<() => void>()
      connection.on("blocked", (reason: string) => {
        blocked = reason
        lastError = `broker blocked the connection: ${reason}`
        for (const watcher of blockWatchers) watcher()
      })
      connection.on("unblocked", () => {
        blocked = undefined
        for (const watcher of blockWatchers) watcher()
      })
      let open = true
      connection.on("close", (error?: Error) => {
        open = false
        Deferred.doneUnsafe(closed, Exit.succeed(error?.message ?? lastError))
      })
      return {
        connection,
        node,
        channelMax: negotiatedChannelMax(connection),
        isOpen: () => open,
        blocked: () => blocked,
        watchBlocked: (watcher) => {
          blockWatchers.add(watcher)
          return () => blockWatchers.delete(watcher)
        },
        closed
      }
    },
    catch: (cause) =>
      new AmqpError({ operation: `connect to ${tls ? "amqps" : "amqp"}://${nodeLabel(node)}`, cause })
  })

/** Close, but never hang on a connection whose socket is already dead. */
export const closeQuietly = (connection: amqp.ChannelModel) =>
  Effect.promise(() => connection.close().catch(() => undefined)).pipe(Effect.timeoutOption("2 seconds"))

export interface SuperviseOptions {
  readonly rabbit: Rabbit
  readonly tls: amqp.SocketOptions | undefined
  /** The nodes in this process's order; the connection starts at `startAt` in it. */
  readonly order: ReadonlyArray<BrokerNode>
  readonly startAt: number
  /** The `connection` label of metrics and log lines ("consumers", "publishers", "consumers-2", …). */
  readonly label: string
  /** Shown in the broker's management UI and `rabbitmqctl list_connections`. */
  readonly connectionName: string
  /** Runs on each new connection before it is published; a failure closes it and moves on. */
  readonly prepare?: (live: Live) => Effect.Effect<void, AmqpError>
  /** Runs after each successful connect (and `prepare`), inside the connection's lifetime. */
  readonly onConnected?: (live: Live) => Effect.Effect<void, never, Scope.Scope>
  /**
   * Holds why the last attempt to connect failed (None once connected), for callers' statuses:
   * see refusal.ts.
   */
  readonly lastFailure?: SubscriptionRef.SubscriptionRef<Option.Option<ConnectFailure>>
  /** The INFO line once connected; operators and scripts wait for the primary's "connected to broker". */
  readonly connectedLine: string
  readonly lostLine: string
}

/** Keeps one connection open for as long as the caller's scope; its current value, None while away. */
export const supervise = (options: SuperviseOptions) =>
  Effect.gen(function*() {
    const { rabbit, tls, label } = options
    const current = yield* SubscriptionRef.make<Option.Option<Live>>(Option.none())
    const connectionMetrics = yield* Metrics.trackBrokerConnection(label)
    const cursor = nodeCursor(options.order, options.startAt)
    // A series from the start, at 0: a proxy that never reaches the broker still exports one.
    yield* connectionMetrics.lost(nodeLabel(cursor.current()))

    // The refusal last logged as an ERROR: the same one again is a WARN, a new one an ERROR.
    let refusalLogged: ConnectFailureReason | undefined
    const backoff = Schedule.min([
      Schedule.exponential("200 millis", 2),
      Schedule.spaced(rabbit.reconnectMaxDelay)
    ]).pipe(
      Schedule.jittered,
      Schedule.setInputType<AttemptFailed>(),
      Schedule.tap(({ attempt, duration, input: { error, failure, node } }) => {
        const fields = {
          connection: label,
          attempt,
          retryInMs: Math.round(Duration.toMillis(duration)),
          nextNode: nodeLabel(cursor.current())
        }
        if (failure === undefined) {
          return Effect.logWarning("broker connection setup failed, retrying", { ...fields, error: error.message })
        }
        if (!isRefusal(failure)) {
          refusalLogged = undefined
          return Effect.logWarning("broker unreachable, retrying", { ...fields, reason: failure.reason, error: error.message })
        }
        const first = refusalLogged !== failure.reason
        refusalLogged = failure.reason
        return (first ? Effect.logError : Effect.logWarning)(
          first ? `broker refused the connection: ${failure.description}` : "broker still refuses the connection, retrying",
          { ...fields, node, reason: failure.reason, user: rabbit.user, vhost: rabbit.vhost, ...(first ? {} : { error: failure.description }) }
        )
      })
    )

    /** Why an attempt failed: amqplib's error, classified (connect errors only), and the node. */
    const classify = (error: AmqpError, node: BrokerNode) =>
      Effect.gen(function*() {
        if (!error.operation.startsWith("connect to")) return new AttemptFailed(error, undefined, nodeLabel(node))
        const classified = classifyConnectError(error.cause, rabbit.user, rabbit.vhost)
        const failure = openRefusedByAmqplib(error.cause)
          ? yield* explainOpenRefusal(classified, rabbit, node, tls)
          : classified
        yield* connectionMetrics.failed(failure.reason)
        if (options.lastFailure) yield* SubscriptionRef.set(options.lastFailure, Option.some(failure))
        return new AttemptFailed(error, failure, nodeLabel(node))
      })

    const open = Effect.suspend(() => {
      const node = cursor.current()
      return connectOnce(rabbit, node, tls, options.connectionName).pipe(
        Effect.tap((session) =>
          options.prepare ? options.prepare(session).pipe(Effect.onError(() => closeQuietly(session.connection))) : Effect.void
        ),
        Effect.catch((error) => Effect.flatMap(classify(error, node), Effect.fail))
      )
    }).pipe(
      // Whatever failed (node down, refused, declaration), the next attempt goes to the next node.
      Effect.tapError(() => Effect.sync(cursor.advance))
    )

    const session = Effect.gen(function*() {
      // The retry runs outside acquireRelease: an acquire cannot be interrupted, and shutdown must
      // be able to stop the retry loop while the broker is unreachable.
      const live = yield* open.pipe(Effect.retry(backoff))
      const node = nodeLabel(live.node)
      refusalLogged = undefined
      if (options.lastFailure) yield* SubscriptionRef.set(options.lastFailure, Option.none())
      yield* Effect.addFinalizer(() => closeQuietly(live.connection))
      yield* SubscriptionRef.set(current, Option.some<Live>(live))
      if (options.onConnected) yield* options.onConnected(live)
      yield* connectionMetrics.connected(node)
      // For as long as this connection lives: the broker's block in metrics, and a line per change.
      let wasBlocked = false
      yield* blockedStates(live).pipe(
        Stream.runForEach((state) =>
          Effect.suspend(() => {
            const unblocked = wasBlocked && Option.isNone(state)
            wasBlocked = Option.isSome(state)
            return connectionMetrics.blocked(node, Option.isSome(state)).pipe(
              Effect.andThen(
                Option.isSome(state)
                  ? Effect.logWarning("broker blocked the connection (resource alarm): it sends nothing until the alarm clears", {
                    connection: label,
                    node,
                    reason: state.value
                  })
                  : unblocked
                  ? Effect.logInfo("broker unblocked the connection", { connection: label, node })
                  : Effect.void
              )
            )
          })
        ),
        Effect.forkScoped
      )
      yield* Effect.logInfo(options.connectedLine, {
        connection: label,
        node,
        host: live.node.host,
        port: live.node.port,
        vhost: rabbit.vhost,
        channelMax: live.channelMax
      })
      const reason = yield* Deferred.await(live.closed)
      yield* SubscriptionRef.set(current, Option.none())
      yield* connectionMetrics.lost(node)
      // A dropped connection comes back on the next node: its own may be the one that went away.
      cursor.advance()
      yield* Effect.logWarning(options.lostLine, { connection: label, node, reason, nextNode: nodeLabel(cursor.current()) })
    }).pipe(Effect.scoped)

    yield* session.pipe(Effect.forever, Effect.forkScoped)
    // On shutdown, say so before the connection goes (finalizers run in reverse order).
    yield* Effect.addFinalizer(() => SubscriptionRef.set(current, Option.none()))
    return current
  })

const sameBlock = (a: Option.Option<string>, b: Option.Option<string>): boolean =>
  Option.isNone(a) ? Option.isNone(b) : Option.isSome(b) && a.value === b.value

/**
 * Whether the broker blocks `live` (the reason) now, then at each `connection.blocked` /
 * `connection.unblocked`; ends never (the connection's close ends its use, not this stream).
 */
export const blockedStates = (live: Live): Stream.Stream<Option.Option<string>> =>
  Stream.callback<Option.Option<string>>((queue) =>
    Effect.gen(function*() {
      // connectOnce's own listeners were attached first, so `live.blocked()` is already current here.
      const emit = () => {
        Queue.offerUnsafe(queue, Option.fromNullishOr(live.blocked()))
      }
      emit()
      const unwatch = live.watchBlocked(emit)
      yield* Effect.addFinalizer(() => Effect.sync(unwatch))
    }), { bufferSize: 16, strategy: "sliding" }).pipe(Stream.changesWith(sameBlock))

/**
 * The broker's block on whichever connection `current` holds: None while it is not blocked or
 * there is none (a connection that is away blocks nothing; its absence shows elsewhere).
 */
export const blockedChanges = (
  current: SubscriptionRef.SubscriptionRef<Option.Option<Live>>
): Stream.Stream<Option.Option<string>> =>
  SubscriptionRef.changes(current).pipe(
    Stream.switchMap(Option.match({ onNone: () => Stream.make(Option.none<string>()), onSome: blockedStates })),
    Stream.changesWith(sameBlock)
  )

/** The current connection, waiting while there is none. */
export const whenLive = (current: SubscriptionRef.SubscriptionRef<Option.Option<Live>>): Effect.Effect<Live> =>
  SubscriptionRef.changes(current).pipe(
    Stream.filter(Option.isSome),
    Stream.runHead,
    Effect.flatMap((found) => Option.isSome(found) ? Effect.succeed(found.value.value) : Effect.never)
  )
