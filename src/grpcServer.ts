/**
 * The gRPC server as a scoped Layer: MessagingService, grpc.health.v1 (following the broker
 * connection) and reflection. On release it marks itself NOT_SERVING, interrupts the open
 * streams (they end with UNAVAILABLE), then shuts down, forcing it after the shutdown timeout.
 */
import * as grpc from "@grpc/grpc-js"
import { Context, Deferred, Duration, Effect, Exit, FiberSet, Layer, Stream } from "effect"
import { HealthImplementation } from "grpc-health-check"
import { MessagingServiceService } from "../gen/messaging.js"
import { Broker } from "./broker.js"
import { ProxyConfig } from "./config.js"
import { AmqpError } from "./errors.js"
import { makeHandlers } from "./handlers.js"
import { makeReflectionService } from "./reflection.js"

const serviceName = "messaging.MessagingService"

export class GrpcServer extends Context.Service<GrpcServer, {
  /** The bound port (differs from the configured one when that is 0). */
  readonly port: number
}>()("messaging-proxy/GrpcServer") {
  static readonly layer = Layer.effect(GrpcServer, Effect.suspend(() => make))
}

class BindError extends AmqpError {}

const make = Effect.gen(function*() {
  const settings = yield* ProxyConfig
  const broker = yield* Broker
  const handlerFibers = yield* FiberSet.make()
  const run = yield* FiberSet.runtime(handlerFibers)<Broker>()

  const server = new grpc.Server()
  server.addService(MessagingServiceService, makeHandlers(settings, run))
  const health = new HealthImplementation({ "": "NOT_SERVING", [serviceName]: "NOT_SERVING" })
  health.addToServer(server)
  makeReflectionService().addToServer(server)

  yield* broker.connectedChanges.pipe(
    Stream.runForEach((connected) =>
      Effect.sync(() => {
        const status = connected ? "SERVING" : "NOT_SERVING"
        health.setStatus("", status)
        health.setStatus(serviceName, status)
      }).pipe(Effect.andThen(Effect.logInfo("health", { status: connected ? "SERVING" : "NOT_SERVING" })))
    ),
    Effect.forkScoped
  )

  const address = `${settings.grpc.host}:${settings.grpc.port}`
  const port = yield* Effect.acquireRelease(
    Effect.callback<number, BindError>((resume) => {
      server.bindAsync(address, grpc.ServerCredentials.createInsecure(), (error, port) => {
        resume(error ? Effect.fail(new BindError({ operation: `bind gRPC server to ${address}`, cause: error })) : Effect.succeed(port))
      })
    }),
    () =>
      Effect.gen(function*() {
        health.setStatus("", "NOT_SERVING")
        health.setStatus(serviceName, "NOT_SERVING")
        yield* Effect.logInfo("shutting down: ending open streams")
        // Stop taking new calls first; tryShutdown then waits for the open ones to end.
        const stopped = Deferred.makeUnsafe<void>()
        server.tryShutdown(() => Deferred.doneUnsafe(stopped, Exit.void))
        // Interrupt the streams: each ends its call with UNAVAILABLE and requeues what is unacked.
        yield* FiberSet.clear(handlerFibers)
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
  yield* Effect.logInfo("gRPC server listening", { address, port })
  return GrpcServer.of({ port })
})
