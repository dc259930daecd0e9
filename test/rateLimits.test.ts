/**
 * Issue 15 (part): rate limits per caller. Over a limit a call gets RESOURCE_EXHAUSTED naming it,
 * the refusal is counted, and the bucket refills; with Redis (127.0.0.1:6379, a key prefix of the
 * test's own) one caller's limit holds across two proxies.
 */
import { assert, describe, it } from "@effect/vitest"
import * as grpc from "@grpc/grpc-js"
import { Effect, Option } from "effect"
import { MessageKind, type MessagingServiceClient, type PublishRequest } from "../gen/messaging.js"
import { schemaBody } from "./fixtures/bodies.js"
import { randomBytes } from "node:crypto"
import { grpcClient, makeNames, makeTestEnv, proxyEnv, startProxy } from "./support/harness.js"
import { runProxy } from "./support/process.js"
import { makeMetricsTestEnv, sample, scrapeUntil } from "./support/metrics.js"

const request = (id: string): PublishRequest => ({ kind: MessageKind.MESSAGE_KIND_SCHEMA, body: Buffer.from(JSON.stringify(schemaBody(id))), routingKey: "" })

const publish = (client: MessagingServiceClient, id: string) =>
  Effect.callback<number>((resume) => {
    client.publish(request(id), (error) => resume(Effect.succeed(error?.code ?? grpc.status.OK)))
  })

const publishDetails = (client: MessagingServiceClient, id: string) =>
  Effect.callback<string>((resume) => {
    client.publish(request(id), (error) => resume(Effect.succeed(error?.details ?? "")))
  })

describe("rate limits", () => {
  it.live("MESSAGING_PUBLISH_RATE: a burst goes through, the next Publish is RESOURCE_EXHAUSTED naming the limit and counted; a batch stops at the limit", () =>
    Effect.gen(function*() {
      // 1 message per 10 s, a burst of 3: the bucket does not refill during the test.
      const env = yield* makeMetricsTestEnv({ MESSAGING_PUBLISH_RATE: "0.1/s:3" })
      const codes = [yield* publish(env.client, "r-1"), yield* publish(env.client, "r-2"), yield* publish(env.client, "r-3"), yield* publish(env.client, "r-4")]
      assert.deepStrictEqual(codes, [grpc.status.OK, grpc.status.OK, grpc.status.OK, grpc.status.RESOURCE_EXHAUSTED])
      assert.match(yield* publishDetails(env.client, "r-5"), /^rate limit MESSAGING_PUBLISH_RATE=0\.1\/s:3 reached for 127\.0\.0\.1: retry in \d+ ms$/)
      const body = yield* scrapeUntil(Option.getOrThrow(env.metricsPort), (b) =>
        (sample(b, "messaging_proxy_rate_limited_total", { limit: "MESSAGING_PUBLISH_RATE" }) ?? 0) >= 2)
      assert.strictEqual(sample(body, "messaging_proxy_rate_limited_total", { limit: "MESSAGING_PUBLISH_RATE" }), 2)
      // A batch from the same caller: its first message already finds the bucket empty.
      const batch = yield* Effect.callback<grpc.ServiceError | null>((resume) => {
        const call = env.client.publishBatch((error) => resume(Effect.succeed(error)))
        call.write(request("b-1"))
        call.end()
      })
      assert.strictEqual(batch?.code, grpc.status.RESOURCE_EXHAUSTED)
      assert.match(batch?.details ?? "", /MESSAGING_PUBLISH_RATE.*\(published 0 before this one\)$/)
    }))

  it.live("MESSAGING_PUBLISH_RATE: a batch of 8 against a burst of 5 publishes exactly the first 5, in order, then RESOURCE_EXHAUSTED", () =>
    Effect.gen(function*() {
      const env = yield* makeTestEnv({ MESSAGING_PUBLISH_RATE: "0.1/s:5" })
      const status = yield* Effect.callback<grpc.ServiceError | null>((resume) => {
        const call = env.client.publishBatch((error) => resume(Effect.succeed(error)))
        for (let i = 0; i < 8; i++) call.write(request(`t-${i}`))
        call.end()
      })
      assert.strictEqual(status?.code, grpc.status.RESOURCE_EXHAUSTED)
      assert.match(status?.details ?? "", /^rate limit MESSAGING_PUBLISH_RATE=0\.1\/s:5 reached for .*\(published 5 before this one\)$/)
      const ids: Array<string> = []
      for (let got = yield* Effect.promise(() => env.admin.channel.get(env.names.schemas, { noAck: true })); got !== false;
        got = yield* Effect.promise(() => env.admin.channel.get(env.names.schemas, { noAck: true }))) {
        ids.push(JSON.parse(got.content.toString()).id)
      }
      assert.deepStrictEqual(ids, ["t-0", "t-1", "t-2", "t-3", "t-4"])
    }))

  it.live("MESSAGING_CALL_RATE: calls over the rate are refused before their body, and the bucket refills", () =>
    Effect.gen(function*() {
      const env = yield* makeTestEnv({ MESSAGING_CALL_RATE: "5/s:2" })
      const call = () =>
        Effect.callback<number>((resume) => {
          env.client.getRoutingKeySchemas({ results: false }, (error) => resume(Effect.succeed(error?.code ?? grpc.status.OK)))
        })
      const first = [yield* call(), yield* call(), yield* call()]
      assert.deepStrictEqual(first, [grpc.status.OK, grpc.status.OK, grpc.status.RESOURCE_EXHAUSTED])
      // Refilled at 5/s: wait for the event (a call that goes through), not for a clock.
      while ((yield* call()) !== grpc.status.OK) yield* Effect.sleep("50 millis")
    }))

  it.live("an unreachable Redis stops start-up with one line naming the variable, never the URL's password", () =>
    Effect.gen(function*() {
      const password = `pw-${randomBytes(16).toString("hex")}`
      const result = yield* runProxy(proxyEnv(makeNames(), {
        MESSAGING_PUBLISH_RATE: "1/s",
        MESSAGING_RATE_LIMIT_REDIS_URL: `redis://user:${password}@127.0.0.1:1`
      }))
      assert.strictEqual(result.code, 1)
      assert.strictEqual(result.stderr.trim(), "messaging-proxy: MESSAGING_RATE_LIMIT_REDIS_URL: cannot connect to Redis: connect ECONNREFUSED 127.0.0.1:1")
      assert.notInclude(result.stdout + result.stderr, password)
    }))

  it.live("with Redis, one caller's limit holds across two proxies", () =>
    Effect.gen(function*() {
      const env = yield* makeTestEnv({
        MESSAGING_PUBLISH_RATE: "0.1/s:2",
        MESSAGING_RATE_LIMIT_REDIS_URL: "redis://127.0.0.1:6379"
      })
      // A second proxy on the same names and the same Redis.
      const secondPort = yield* startProxy(env.names, { MESSAGING_PUBLISH_RATE: "0.1/s:2", MESSAGING_RATE_LIMIT_REDIS_URL: "redis://127.0.0.1:6379" })
      const second = yield* grpcClient(secondPort)
      // The buckets are keyed by the run's own exchange name, so this caller starts with a full one
      // of 2, shared by both proxies.
      const codes = [yield* publish(env.client, "x-1"), yield* publish(second, "x-2"), yield* publish(env.client, "x-3"), yield* publish(second, "x-4")]
      assert.deepStrictEqual(codes, [grpc.status.OK, grpc.status.OK, grpc.status.RESOURCE_EXHAUSTED, grpc.status.RESOURCE_EXHAUSTED])
    }))
})
