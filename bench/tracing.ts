/**
 * Phase "tracing": what tracing costs per message. The throughput drains (b) StreamSchemaMessages
 * and (c) SubscribeSchemaMessages run twice, each time with a proxy child of its own: tracing off,
 * then tracing on (OTEL_TRACES_SAMPLER=always_on: every RPC and every delivery gets a span)
 * exporting over OTLP/HTTP to a receiver in this process that answers and drops everything.
 */
import { createServer, type Server } from "node:http"
import type { AddressInfo } from "node:net"
import type { PhaseOutcome } from "./util.js"
import type { Mode, ThroughputResult } from "./throughput.js"

export interface TracingResult {
  readonly off: ThroughputResult
  readonly on: ThroughputResult
  /** Spans the receiver was sent while tracing was on (0 would mean nothing was traced). */
  readonly spansReceived: number
  /** Proxy CPU per message, on minus off, for (b) and (c), in µs. */
  readonly costUsPerMsg: Record<"stream" | "subscribe", number | null>
}

/** An OTLP/HTTP receiver that counts spans and drops them. */
export const dropAllReceiver = async (): Promise<{ readonly url: string; readonly spans: () => number; readonly close: () => Promise<void> }> => {
  let spans = 0
  const server: Server = createServer((request, response) => {
    let body = ""
    request.on("data", (chunk: Buffer) => (body += chunk.toString()))
    request.on("end", () => {
      spans += body.split('"spanId"').length - 1
      response.writeHead(200, { "content-type": "application/json" })
      response.end("{}")
    })
  })
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve))
  const { port } = server.address() as AddressInfo
  return { url: `http://127.0.0.1:${port}`, spans: () => spans, close: () => new Promise((resolve) => server.close(() => resolve())) }
}

export const tracingModes: ReadonlyArray<Mode> = ["stream", "subscribe"]

/** The cost per message from the two runs' median proxy CPU. */
export const tracingCost = (off: ThroughputResult, on: ThroughputResult): TracingResult["costUsPerMsg"] => {
  const cost = (mode: "stream" | "subscribe") => {
    const a = off.medianProxyCpuUsPerMsg[mode]
    const b = on.medianProxyCpuUsPerMsg[mode]
    return a === null || b === null ? null : b - a
  }
  return { stream: cost("stream"), subscribe: cost("subscribe") }
}

export type TracingOutcome = PhaseOutcome<TracingResult>
