/**
 * What the proxy's dependencies print, routed through the proxy's logger with secrets redacted.
 *
 * - grpc-js logs to stderr by itself, and what it logs can hold a credential: a header value it
 *   refuses (a tab or a non-ASCII character in it) is printed whole, twice, in `Failed to add
 *   metadata entry authorization: Bearer<TAB><key>. Metadata string value "…" contains illegal
 *   characters` (grpc-js 1.14, metadata.ts), for any header name. Its logger (`grpc.setLogger`)
 *   becomes ours: each line a JSON log line (`grpc-js log`), with every metadata value and every
 *   credential-shaped header redacted.
 * - Node's process warnings (deprecations, listener leaks, also those of amqplib and
 *   @cloudamqp/amqp-client) become WARN lines (`process warning`) instead of raw stderr, redacted
 *   the same way. amqplib itself prints nothing: it reports through errors and events, which the
 *   proxy logs itself.
 */
import * as grpc from "@grpc/grpc-js"
import { Effect, Layer } from "effect"
import { format } from "node:util"

/** Header names whose values are credentials wherever they appear in a line. */
const credentialHeader = /\b(authorization|x-api-key|proxy-authorization|cookie)(["']?\s*[:=]\s*["']?)[^\r\n"',}]*/gi

/**
 * `line` without metadata values or credentials (pure). grpc-js names the header and prints its
 * value(s) in its "Failed to add metadata entry" line and again in the validation error it
 * quotes; both go. The header name stays: it says which header was refused.
 */
export const redactDependencyLine = (line: string): string => {
  const kept = line
    .replace(/(Metadata string value )"[\s\S]*?"( contains illegal characters)/g, "$1<redacted>$2")
    .replace(credentialHeader, "$1$2<redacted>")
  const refused = /(Failed to add metadata entry )([^:\s]*)(:)[\s\S]*/.exec(kept)
  return refused === null
    ? kept
    : `${kept.slice(0, refused.index)}${refused[1]}${refused[2]}${refused[3]} <value redacted>: it contains characters not allowed in a header value (https://github.com/grpc/grpc-node/issues/1173)`
}

/** Installs the routing for the life of the process (grpc-js has one logger per process). */
export const DependencyLogsLive = Layer.effectDiscard(Effect.gen(function*() {
  const context = yield* Effect.context<never>()
  const runSync = Effect.runSyncWith(context)
  const line = (args: ReadonlyArray<unknown>) => redactDependencyLine(format(...args))
  grpc.setLogger({
    error: (...args: Array<unknown>) => runSync(Effect.logWarning("grpc-js log", { line: line(args) })),
    info: (...args: Array<unknown>) => runSync(Effect.logInfo("grpc-js log", { line: line(args) })),
    debug: (...args: Array<unknown>) => runSync(Effect.logDebug("grpc-js log", { line: line(args) }))
  })
  // Node prints warnings to stderr through a 'warning' listener of its own; this one replaces it.
  process.removeAllListeners("warning")
  process.on("warning", (warning: Error) => {
    runSync(Effect.logWarning("process warning", { name: warning.name, line: redactDependencyLine(warning.message) }))
  })
}))
