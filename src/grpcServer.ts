/**
 * The gRPC server as a scoped Layer: MessagingService, grpc.health.v1 (following the broker
 * connections, the queues, and whether the broker blocks publishing) and reflection. On release it marks itself NOT_SERVING, interrupts the open
 * streams (they end with UNAVAILABLE), then shuts down, forcing it after the shutdown timeout.
 */
import * as grpc from "@grpc/grpc-js"
import { Context, Deferred, Duration, Effect, Exit, FiberSet, Layer, Option, Stream } from "effect"
import { HealthImplementation } from "grpc-health-check"
import { Broker } from "./broker/Broker.js"
import { declaredQueues } from "./broker/topology.js"
import { ProxyConfig } from "./config.js"
import { shuttingDown } from "./callLifecycle.js"
import { AmqpError } from "./errors.js"
import { trackForeignStreams } from "./foreignStreams.js"
import { makeHandlers } from "./handlers.js"
import { makeReflectionService } from "./reflection.js"
import { MessagingServiceDefinition } from "./serialization.js"
import { makeAccess } from "./access.js"
import { auditedMethods, auditLine } from "./audit.js"
import { authorizeBeforeBody } from "./authInterceptor.js"
import { type CallObserver, guardHandlers } from "./guard.js"
import { recordRpc } from "./metrics.js"
import { enforcePingPolicy, type PingPolicy } from "./pingPolicy.js"
import { serverCredentials } from "./tls.js"
import { Tracing } from "./tracing.js"
import { RateLimits } from "./rateLimits.js"

const serviceName = "messaging.MessagingService"
/** The health entry of publishing: Publish/PublishBatch, and the copies behind requeues and dead-letters. */
export const publishingEntry = "publishing"
/**
 * The health entry that is SERVING from start to shutdown whatever the broker does: for liveness
 * probes, which must not restart every replica while the broker is away (Kubernetes' grpc probe
 * names it as `service`).
 */
export const livenessEntry = "liveness"

/** gRPC's defaults for a server that permits keepalive pings: one per 10 s (C++ allows 5 min). */
const clientPingPolicy: PingPolicy = { minIntervalMs: 10_000, maxStrikes: 2 }

export class GrpcServer extends Context.Service<GrpcServer, {
  /** The bound port (differs from the configured one when that is 0). */
  readonly port: number
}>()("messaging-proxy/GrpcServer") {
  static readonly layer = Layer.effect(GrpcServer, Effect.suspend(() => make))
}

class BindError extends AmqpError {}

/**
 * Node's HTTP/2 flood limits, sized for real clients. A grpcio client that opens and cancels
 * 2,000 calls at once on one connection trips two of them, and then Node closes the whole
 * session: every other call on that connection dies with `UNAVAILABLE: Socket closed`.
 * - `streamResetBurst`/`streamResetRate` (defaults 1,000 and 33/s): streams the client reset, the
 *   rapid-reset mitigation of CVE-2023-44487;
 * - `maxSessionRejectedStreams` (default 100): streams Node refused because cancelled ones were
 *   not yet cleaned up and its own count of open streams was at the HTTP/2 limit;
 * - `maxSessionInvalidFrames` (default 1,000): frames for streams already closed, which a busy
 *   server sees more of (the client's frames for a call it cancelled cross the server's end).
 * All three become 4 × the HTTP/2 max concurrent streams (4,400 by default: a connection may cancel
 * every stream it may have open four times over at once), and resets refill at 200/s, so a client
 * that keeps resetting streams still loses its session; beyond those, calls are refused one by
 * one (our per-connection limit answers RESOURCE_EXHAUSTED). grpc-js (1.14.7) does not expose
 * these options: they go into the options object it hands to `http2.createServer` when the
 * server binds (its `commonServerOptions`). Measured with test/fixtures/original/cancel_flood.py
 * (`immediate`: 2,000 calls each cancelled as it opens) on an idle machine: with Node's defaults
 * the long call died in 3 of 3 runs, with these it lived in 5 of 5. Under CPU load nghttp2 still
 * ends the session now and then with a protocol error (-505, via `onSessionInternalError`) that
 * no option here changes: 1 of 10 runs beside four busy loops, and about as often with
 * `maxSessionMemory` at 100 MB or the HTTP/2 stream limit at 4×. Open.
 * Source: Node.js http2 docs, `http2.createServer` options.
 */
const allowStreamResetBurst = (server: grpc.Server, http2MaxConcurrentStreams: number) => {
  const internals = server as unknown as { commonServerOptions?: Record<string, unknown> }
  if (internals.commonServerOptions === undefined) throw new Error("grpc-js no longer has Server.commonServerOptions")
  internals.commonServerOptions["streamResetBurst"] = 4 * http2MaxConcurrentStreams
  internals.commonServerOptions["streamResetRate"] = 200
  internals.commonServerOptions["maxSessionRejectedStreams"] = 4 * http2MaxConcurrentStreams
  internals.commonServerOptions["maxSessionInvalidFrames"] = 4 * http2MaxConcurrentStreams
}

const make = Effect.gen(function*() {
  const settings = yield* ProxyConfig
  const broker = yield* Broker
  const tracing = yield* Tracing
  const rateLimits = yield* RateLimits
  const handlerFibers = yield* FiberSet.make()
  const run = yield* FiberSet.runtime(handlerFibers)<Broker>()

  const credentials = yield* serverCredentials(settings.grpc)
  const access = makeAccess(settings)
  if (access.open) {
    yield* Effect.logWarning(
      "no API keys or client certificate identities configured: every caller may call every RPC " +
        "(set MESSAGING_API_KEYS to require keys)"
    )
  }
  const observer: CallObserver = {
    ended: (method, code, seconds, audit) => {
      run(recordRpc(method, grpc.status[code] ?? String(code), seconds))
      if (audit !== undefined && auditedMethods.has(method)) run(auditLine({ method, code, ...audit }))
    },
    refused: (method, peer, decision) =>
      run(Effect.logWarning("call refused", { method, peer, code: grpc.status[decision.code], reason: decision.details }))
  }

  const { grpc: limits } = settings
  const http2MaxConcurrentStreams = limits.maxConcurrentStreamsPerConnection + 100
  const server = new grpc.Server({
    // Credentials and scope on the metadata, before any request message is read.
    interceptors: [authorizeBeforeBody(access, observer, {
      applies: (method) => Option.isSome(rateLimits.calls) || (method === "Publish" && Option.isSome(rateLimits.publish)),
      // One call, and for Publish its one message.
      check: (method, caller) =>
        Effect.flatMap(rateLimits.take(rateLimits.calls, caller, 1), (exceeded) =>
          exceeded === undefined && method === "Publish" ? rateLimits.take(rateLimits.publish, caller, 1) : Effect.succeed(exceeded)),
      run: (effect) => void run(effect)
    })],
    "grpc.max_receive_message_length": limits.maxMessageBytes,
    "grpc.max_send_message_length": limits.maxMessageBytes,
    "grpc.keepalive_time_ms": limits.keepaliveTimeSeconds * 1000,
    "grpc.keepalive_timeout_ms": limits.keepaliveTimeoutSeconds * 1000,
    // Our own per-connection stream limit answers RESOURCE_EXHAUSTED first; HTTP/2's is a backstop
    // with headroom for unary calls, since above it clients queue instead of getting an error.
    "grpc.max_concurrent_streams": http2MaxConcurrentStreams
  })
  allowStreamResetBurst(server, http2MaxConcurrentStreams)
  server.addService(MessagingServiceDefinition, guardHandlers(makeHandlers(settings, run, tracing, rateLimits), access, observer, tracing))
  // The server ("" and the service) follows the broker connections; each declared queue has an
  // entry of its own, named by the queue, that is also NOT_SERVING while that queue is unavailable.
  // `publishing` is NOT_SERVING also while the broker blocks the publishers' connection (a memory
  // or disk alarm): Publish waits, and so do the copies behind dead-letters. The others stay
  // SERVING then, since streams, subscriptions, acks and nacks go on (the consumers' connections
  // never publish, so the broker never blocks them). An alarm blocks publishers on every node of
  // the cluster at once, so a readiness probe on "" that followed it would take every replica
  // out of service together, and with them the consumers that drain the queues, which is what
  // ends a memory alarm.
  const queues = declaredQueues(settings.rabbit)
  const entries = ["", serviceName, publishingEntry, livenessEntry, ...queues]
  const health = new HealthImplementation(Object.fromEntries(entries.map((name) => [name, "NOT_SERVING" as const])))
  health.setStatus(livenessEntry, "SERVING")
  const foreignStreams = trackForeignStreams(server)
  health.addToServer(foreignStreams.server)
  makeReflectionService().addToServer(foreignStreams.server)

  yield* Stream.zipLatest(
    Stream.zipLatest(broker.connectedChanges, broker.publishingBlockedChanges),
    broker.unavailableQueueChanges
  ).pipe(
    Stream.runForEach(([[connected, blocked], unavailable]) =>
      Effect.sync(() => {
        const status = connected ? "SERVING" : "NOT_SERVING"
        health.setStatus("", status)
        health.setStatus(serviceName, status)
        health.setStatus(publishingEntry, connected && Option.isNone(blocked) ? "SERVING" : "NOT_SERVING")
        for (const queue of queues) health.setStatus(queue, connected && !unavailable.has(queue) ? "SERVING" : "NOT_SERVING")
      }).pipe(Effect.andThen(Effect.logInfo("health", {
        status: connected ? "SERVING" : "NOT_SERVING",
        ...(Option.isSome(blocked) ? { publishing: "NOT_SERVING", publishingBlocked: blocked.value } : {}),
        ...(unavailable.size > 0 ? { unavailableQueues: [...unavailable.keys()] } : {})
      })))
    ),
    Effect.forkScoped
  )

  const address = `${settings.grpc.host}:${settings.grpc.port}`
  const port = yield* Effect.acquireRelease(
    Effect.callback<number, BindError>((resume) => {
      server.bindAsync(address, credentials, (error, port) => {
        resume(error ? Effect.fail(new BindError({ operation: `bind gRPC server to ${address}`, cause: error })) : Effect.succeed(port))
      })
    }),
    () =>
      Effect.gen(function*() {
        for (const name of entries) health.setStatus(name, "NOT_SERVING")
        yield* Effect.logInfo("shutting down: ending open streams")
        // Stop taking new calls first; tryShutdown then waits for the open ones to end.
        const stopped = Deferred.makeUnsafe<void>()
        server.tryShutdown(() => Deferred.doneUnsafe(stopped, Exit.void))
        // Interrupt the streams: each ends its call with UNAVAILABLE and requeues what is unacked.
        yield* FiberSet.clear(handlerFibers)
        // Then health Watch and reflection streams, which would otherwise hold their connections
        // open. Every stream whose client keeps its input open is reset once its status is out
        // (http2Stream.ts), so the connections close as soon as the statuses are sent.
        foreignStreams.endAll(shuttingDown)
        yield* Deferred.await(stopped)
        yield* Effect.logInfo("gRPC server stopped")
      }).pipe(
        Effect.timeoutOrElse({
          duration: settings.grpc.shutdownTimeout,
          orElse: () =>
            Effect.logWarning("shutdown timeout reached, forcing", {
              timeoutMs: Duration.toMillis(settings.grpc.shutdownTimeout)
            }).pipe(Effect.andThen(Effect.sync(() => server.forceShutdown())))
        })
      )
  )
  // Clients may ping (their keepalive), but not more often than every 10 s while nothing is sent
  // to them; grpc-js does not enforce this itself (pingPolicy.ts).
  const pingPolicyApplied = enforcePingPolicy(server, clientPingPolicy, (peer) =>
    run(Effect.logWarning("connection closed: too many pings", {
      peer,
      minIntervalMs: clientPingPolicy.minIntervalMs,
      maxStrikes: clientPingPolicy.maxStrikes
    })))
  if (!pingPolicyApplied) yield* Effect.logWarning("client ping policy not enforced: grpc-js internals changed")
  yield* Effect.logInfo("gRPC server listening", {
    address,
    port,
    tls: Option.match(settings.grpc.tls, { onNone: () => "off", onSome: (t) => t.caPath ? "mutual" : "server" })
  })
  return GrpcServer.of({ port })
})
