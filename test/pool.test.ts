/**
 * The consumers' connection pool, on the real broker: with a channel_max the proxy asks for
 * (RABBITMQ_CHANNEL_MAX=8, so 6 stream channels on the primary connection, which keeps 2 for
 * declarations, and 8 on each further one), 20 streams need 3 connections. Every stream consumes,
 * every message arrives exactly once, and cancelling all of them leaves no consumer.
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect, Option } from "effect"
import type { SchemaMessageResponse } from "../gen/messaging.js"
import { schemaBody } from "./fixtures/bodies.js"
import { publishJson, quiet, waitForQueue } from "./support/harness.js"
import { makeMetricsTestEnv, sample, scrapeUntil } from "./support/metrics.js"

const m = (name: string) => `messaging_proxy_${name}`

describe("consumers' connection pool", () => {
  it.live("20 streams past a channel_max of 8 open 3 connections; all consume, nothing is lost or doubled", () =>
    Effect.gen(function*() {
      const env = yield* makeMetricsTestEnv({ RABBITMQ_CHANNEL_MAX: "8" })
      const { names, client, admin } = env
      const metricsPort = Option.getOrElse(env.metricsPort, () => assert.fail("metrics are not served"))
      const received: Array<string> = []
      const streams = Array.from({ length: 20 }, () => {
        const call = quiet(client.streamSchemaMessages({}))
        call.on("data", (message: SchemaMessageResponse) => received.push(message.id))
        return call
      })
      yield* Effect.addFinalizer(() => Effect.sync(() => streams.forEach((s) => s.cancel())))
      yield* waitForQueue(admin, names.schemas, (q) => q.consumerCount === 20)

      const node = "127.0.0.1:5672"
      const body = yield* scrapeUntil(metricsPort, (b) =>
        ["consumers", "consumers-2", "consumers-3"].every((connection) =>
          sample(b, m("broker_connected"), { connection, node }) === 1
        ))
      assert.isUndefined(sample(body, m("broker_connected"), { connection: "consumers-4", node }))

      const ids = Array.from({ length: 60 }, (_, i) => `pool-${i}`)
      yield* Effect.forEach(ids, (id) => publishJson(admin, names.exchange, "schemas.*", schemaBody(id)), { discard: true })
      yield* waitForQueue(admin, names.schemas, (q) => q.messageCount === 0 && received.length >= 60)
      assert.deepStrictEqual([...received].sort(), [...ids].sort())

      for (const stream of streams) stream.cancel()
      yield* waitForQueue(admin, names.schemas, (q) => q.consumerCount === 0)
    }))
})
