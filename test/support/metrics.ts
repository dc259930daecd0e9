/**
 * Metrics test support: a proxy like `makeTestEnv`'s that also reports its metrics port, a scrape
 * of GET /metrics, and a reader for one sample of the Prometheus text format.
 */
import { explainIfInterrupted } from "./waiting.js"
import { ConfigProvider, Context, Effect, Layer, Option, type Scope } from "effect"
import { ProxyLive } from "../../src/app.js"
import { GrpcServer } from "../../src/grpcServer.js"
import { MetricsServer } from "../../src/metrics.js"
import { type Admin, grpcClient, makeAdmin, makeNames, proxyEnv, type TestEnv, type TestNames, waitForQueue } from "./harness.js"

export type MetricsTestEnv = TestEnv["Service"] & {
  /** None when metrics are disabled. */
  readonly metricsPort: Option.Option<number>
}

/** Proxy (metrics on a free loopback port unless `extra` says otherwise) + admin + client. */
export const makeMetricsTestEnv = (
  extra: Record<string, string> = {},
  /** Runs before the proxy starts, e.g. to declare a queue the proxy will find. */
  before: (names: TestNames, admin: Admin) => Effect.Effect<void, Error> = () => Effect.void
): Effect.Effect<MetricsTestEnv, Error, Scope.Scope> =>
  Effect.gen(function*() {
    const names = makeNames()
    const admin = yield* makeAdmin(names)
    yield* before(names, admin)
    const env = proxyEnv(names, { METRICS_HOST: "127.0.0.1", METRICS_PORT: "0", ...extra })
    const context = yield* Layer.buildWithScope(
      ProxyLive.pipe(Layer.provide(ConfigProvider.layer(ConfigProvider.fromUnknown(env)))),
      yield* Effect.scope
    )
    const port = Context.get(context, GrpcServer).port
    const client = yield* grpcClient(port)
    yield* waitForQueue(admin, names.schemasDead)
    return { names, port, client, admin, metricsPort: Context.get(context, MetricsServer).port }
  })

export interface Scrape {
  readonly status: number
  readonly contentType: string | null
  readonly body: string
}

export const scrape = (port: number, path = "/metrics") =>
  Effect.tryPromise({
    try: async (): Promise<Scrape> => {
      const response = await fetch(`http://127.0.0.1:${port}${path}`)
      return { status: response.status, contentType: response.headers.get("content-type"), body: await response.text() }
    },
    catch: (cause) => new Error(`scrape ${path}: ${String(cause)}`)
  })

const sampleLine = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/
const labelPair = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g

/**
 * The value of the sample `name` whose labels are exactly `labels`, or undefined when the body
 * has no such sample.
 */
export const sample = (body: string, name: string, labels: Record<string, string> = {}): number | undefined => {
  const wanted = Object.entries(labels).sort(([a], [b]) => a < b ? -1 : 1)
  for (const line of body.split("\n")) {
    const match = sampleLine.exec(line)
    if (match === null || match[1] !== name) continue
    const found = [...(match[2] ?? "").matchAll(labelPair)]
      .map((m): [string, string] => [m[1]!, m[2]!.replace(/\\(.)/g, (_, c: string) => c === "n" ? "\n" : c)])
      .sort(([a], [b]) => a < b ? -1 : 1)
    if (JSON.stringify(found) === JSON.stringify(wanted)) return Number(match[3] === "+Inf" ? Infinity : match[3])
  }
  return undefined
}

/** Scrapes until `done` holds for the body (counters move after the client has seen the effect; no deadline: waiting.ts). */
export const scrapeUntil = (port: number, done: (body: string) => boolean) => {
  let last = ""
  return Effect.gen(function*() {
    while (true) {
      const { body } = yield* scrape(port)
      last = body
      if (done(body)) return body
      yield* Effect.sleep("20 millis")
    }
  }).pipe(explainIfInterrupted(`a metrics scrape of port ${port} to satisfy a condition`, () => last))
}
