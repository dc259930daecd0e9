/**
 * Entry point: runs the service until SIGINT/SIGTERM, then releases every layer (streams end with
 * UNAVAILABLE, unacked messages go back to their queues, the connection closes) and exits 0.
 * A start-up failure (bad config, port taken) prints one line to stderr and exits 1.
 */
import { NodeRuntime } from "@effect/platform-node"
import { Cause, Effect, Exit, Layer, type Runtime } from "effect"
import { ProxyLive } from "./app.js"

const teardown: Runtime.Teardown = (exit, onExit) =>
  onExit(Exit.isSuccess(exit) || Cause.hasInterruptsOnly(exit.cause) ? 0 : 1)

Layer.launch(ProxyLive).pipe(
  Effect.tapCause((cause) =>
    Cause.hasInterruptsOnly(cause) ? Effect.void : Effect.sync(() => {
      const error = Cause.squash(cause)
      process.stderr.write(`messaging-proxy: ${error instanceof Error ? error.message : String(error)}\n`)
    })
  ),
  NodeRuntime.runMain({ disableErrorReporting: true, teardown })
)
