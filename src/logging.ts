/** JSON-lines logging through Effect's logger; debug level when MESSAGING_CONNECTION_DEBUG=true. */
import { Effect, Layer, Logger, References } from "effect"
import { ProxyConfig } from "./config.js"

export const LoggingLive = Layer.unwrap(
  Effect.map(ProxyConfig, ({ debug }) =>
    Layer.mergeAll(
      Logger.layer([Logger.consoleJson]),
      Layer.succeed(References.MinimumLogLevel, debug ? "Debug" : "Info")
    ))
)
