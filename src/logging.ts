/**
 * JSON-lines logging through Effect's logger; debug level when MESSAGING_CONNECTION_DEBUG=true.
 * With tracing on, a line logged under a span also carries `trace_id` and `span_id` (OpenTelemetry's
 * log correlation fields), so a backend can join the logs of a call or a message to its trace.
 */
import { Context, Effect, Formatter, Layer, Logger, Option, References, Tracer } from "effect"
import { ProxyConfig } from "./config.js"

/** Effect's structured line, plus the current span's ids when there is one. */
const withTraceIds = Logger.make((options) => {
  const line = Logger.formatStructured.log(options)
  const span = Context.getOption(options.fiber.context, Tracer.ParentSpan)
  return Option.isSome(span) ? { ...line, trace_id: span.value.traceId, span_id: span.value.spanId } : line
})

export const LoggingLive = Layer.unwrap(
  Effect.map(ProxyConfig, ({ debug, tracing }) =>
    Layer.mergeAll(
      Logger.layer([
        Option.isSome(tracing) ? Logger.withConsoleLog(Logger.map(withTraceIds, Formatter.formatJson)) : Logger.consoleJson
      ]),
      Layer.succeed(References.MinimumLogLevel, debug ? "Debug" : "Info")
    ))
)
