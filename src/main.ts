/**
 * Entry point: runs the service until SIGINT/SIGTERM, then releases every layer (streams end with
 * UNAVAILABLE, unacked messages go back to their queues, the connection closes) and exits 0.
 * A start-up failure (bad config, port taken) prints one line to stderr and exits 1.
 */
import { NodeRuntime } from "@effect/platform-node"
import { Cause, Context, Duration, Effect, Exit, Layer, type Runtime } from "effect"
import { ProxyLive } from "./app.js"
import { ProxyConfig } from "./config.js"

const teardown: Runtime.Teardown = (exit, onExit) =>
  onExit(Exit.isSuccess(exit) || Cause.hasInterruptsOnly(exit.cause) ? 0 : 1)

/**
 * The last resort behind the bounded shutdown: if releasing the layers has not finished a few
 * seconds after the shutdown timeout (a broker that went silent mid-close), exit anyway (code 1).
 * The broker requeues whatever was unacked when the connection drops, so nothing is lost.
 */
const armHardExit = (timeout: Duration.Duration) =>
  Effect.sync(() => {
    setTimeout(() => {
      // Exit 1: the bounded shutdown did not hold, which a supervisor should notice.
      process.stderr.write("messaging-proxy: shutdown did not finish in time; exiting\n")
      process.exit(1)
    }, Duration.toMillis(timeout) + 5_000).unref()
  })

Effect.gen(function*() {
  const services = yield* Layer.build(ProxyLive)
  const { grpc } = Context.get(services, ProxyConfig)
  return yield* Effect.never.pipe(Effect.onInterrupt(() => armHardExit(grpc.shutdownTimeout)))
}).pipe(
  Effect.scoped,
  Effect.tapCause((cause) =>
    Cause.hasInterruptsOnly(cause) ? Effect.void : Effect.sync(() => {
      const error = Cause.squash(cause)
      process.stderr.write(`messaging-proxy: ${error instanceof Error ? error.message : String(error)}\n`)
    })
  ),
  NodeRuntime.runMain({ disableErrorReporting: true, teardown })
)
