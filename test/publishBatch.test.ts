/**
 * PublishBatch's bookkeeping when a rate-limit token is slow to come (a Redis-held bucket), in
 * process against the real broker: the batch must not be answered while a request waits for its
 * token, however many confirms arrive meanwhile.
 */
import { assert, describe, it } from "@effect/vitest"
import { ConfigProvider, Context, Effect, Fiber, Layer } from "effect"
import { PassThrough } from "node:stream"
import { MessageKind, type PublishRequest } from "../gen/messaging.js"
import { Broker } from "../src/broker/Broker.js"
import { ProxyConfig } from "../src/config.js"
import { publishBatch } from "../src/publishBatch.js"
import { publishOne } from "../src/publishing.js"
import { schemaBody } from "./fixtures/bodies.js"
import { makeAdmin, makeNames, proxyEnv, queueState, waitForQueue } from "./support/harness.js"

const schemaRequest = (id: string): PublishRequest => ({
  kind: MessageKind.MESSAGE_KIND_SCHEMA,
  body: Buffer.from(JSON.stringify(schemaBody(id))),
  routingKey: ""
})

describe("PublishBatch with a rate limit", () => {
  it.live("confirms that arrive while the last request waits for its token do not end the batch without it", () =>
    Effect.gen(function*() {
      const names = makeNames()
      const admin = yield* makeAdmin(names)
      const context = yield* Layer.build(
        Broker.layer.pipe(
          Layer.provideMerge(ProxyConfig.layer),
          Layer.provide(ConfigProvider.layer(ConfigProvider.fromUnknown(proxyEnv(names))))
        )
      )
      const { rabbit } = Context.get(context, ProxyConfig)
      yield* waitForQueue(admin, names.schemas)

      const ids = ["slow-1", "slow-2"]
      // The last token comes only once a Publish on the same shared confirm channel is confirmed:
      // a channel confirms in publish order, so meanwhile the first request's confirm arrives,
      // and the stream's end is read.
      let tokens = 0
      const takeToken = Effect.suspend(() =>
        ++tokens < ids.length
          ? Effect.succeed(undefined)
          : publishOne(rabbit, schemaRequest("barrier")).pipe(Effect.orDie, Effect.as(undefined), Effect.provide(context))
      )
      const requests = new PassThrough({ objectMode: true })
      requests.write(schemaRequest("slow-1"))
      const batch = yield* Effect.forkChild(publishBatch(rabbit, requests, takeToken).pipe(Effect.provide(context)))
      // The first request is published (so the batch has its channel) before the last is sent.
      yield* waitForQueue(admin, names.schemas, (queue) => queue.messageCount === 1)
      requests.end(schemaRequest("slow-2"))

      const response = yield* Fiber.join(batch)
      assert.deepStrictEqual(response, { published: 2, messageIds: ids })
      assert.strictEqual(tokens, 2)
      assert.strictEqual((yield* queueState(admin, names.schemas)).messageCount, 3)
    }).pipe(Effect.scoped))
})
