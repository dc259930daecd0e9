/**
 * Issue 15 (part): PeekDeadLetters shows a dead-letter queue's messages with the proxy's reasons,
 * pages through them by id, and leaves every message in place and in order.
 */
import { assert, describe, it } from "@effect/vitest"
import * as grpc from "@grpc/grpc-js"
import { Effect } from "effect"
import { execFile } from "node:child_process"
import { fileURLToPath } from "node:url"
import {
  MessageKind,
  type MessagingServiceClient,
  type PeekDeadLettersRequest,
  type PeekDeadLettersResponse,
  type RedriveDeadLettersRequest,
  type RedriveDeadLettersResponse
} from "../gen/messaging.js"
import { schemaBody } from "./fixtures/bodies.js"
import { startRelay } from "./support/relay.js"
import { subscribeSchemas } from "./support/subscriber.js"
import { makeTestEnv, publishRaw, queueState, waitForQueue } from "./support/harness.js"

const cliScript = fileURLToPath(new URL("../dist/src/cli.js", import.meta.url))

const peek = (client: MessagingServiceClient, request: Partial<PeekDeadLettersRequest>) =>
  Effect.callback<PeekDeadLettersResponse, grpc.ServiceError>((resume) => {
    client.peekDeadLetters(
      { kind: MessageKind.MESSAGE_KIND_SCHEMA, limit: 0, after: "", ...request },
      (error, response) => resume(error === null ? Effect.succeed(response) : Effect.fail(error))
    )
  })

const redrive = (client: MessagingServiceClient, request: Partial<RedriveDeadLettersRequest>) =>
  Effect.callback<RedriveDeadLettersResponse, grpc.ServiceError>((resume) => {
    client.redriveDeadLetters(
      { kind: MessageKind.MESSAGE_KIND_SCHEMA, ids: [], all: false, limit: 0, ...request },
      (error, response) => resume(error === null ? Effect.succeed(response) : Effect.fail(error))
    )
  })

describe("RedriveDeadLetters", () => {
  it.live("moves the chosen messages back with the requeue count reset; a fixed one is delivered, a still-malformed one goes back to .dead; the rest stay in order", () =>
    Effect.gen(function*() {
      const env = yield* makeTestEnv()
      const dead = (messageId: string, body: string) =>
        publishRaw(env.admin, "", env.names.schemasDead, Buffer.from(body), {
          messageId,
          headers: { "x-dead-letter-reason": "requeued more than 5 times", "x-original-queue": env.names.schemas, "x-requeue-count": 6 }
        })
      yield* dead("fixed-1", JSON.stringify(schemaBody("fixed-1")))
      yield* dead("still-bad", "{still")
      yield* dead("fixed-2", JSON.stringify(schemaBody("fixed-2")))
      yield* dead("fixed-3", JSON.stringify(schemaBody("fixed-3")))
      const page = yield* peek(env.client, {})
      const idOf = (messageId: string) => page.messages.find((m) => m.messageId === messageId)?.id ?? ""

      const moved = yield* redrive(env.client, { ids: [idOf("still-bad"), idOf("fixed-1")] })
      assert.deepStrictEqual([moved.queue, moved.redriven, [...moved.ids].sort()], [env.names.schemas, 2, [idOf("fixed-1"), idOf("still-bad")].sort()])
      assert.deepStrictEqual((yield* peek(env.client, {})).messages.map((m) => m.messageId), ["fixed-2", "fixed-3"], "the others, in order")
      assert.strictEqual((yield* queueState(env.admin, env.names.schemas)).messageCount, 2)

      // Delivered again with its count reset; the still-malformed one is dead-lettered again.
      const sub = yield* subscribeSchemas(env.client, {})
      const [delivery] = yield* sub.deliveries(1)
      assert.strictEqual(delivery?.message?.id, "fixed-1")
      assert.strictEqual(delivery?.info?.deliveryCount, 1, "x-requeue-count reset")
      yield* sub.ack(delivery?.info?.deliveryId ?? "")
      yield* sub.settled
      yield* waitForQueue(env.admin, env.names.schemasDead, (q) => q.messageCount === 3)
      const after = yield* peek(env.client, {})
      assert.deepStrictEqual(after.messages.map((m) => m.messageId), ["fixed-2", "fixed-3", "still-bad"])
      assert.match(after.messages[2]?.reason ?? "", /^body is not valid JSON/)

      // all, with a limit: from the head.
      const head = yield* redrive(env.client, { all: true, limit: 1 })
      assert.strictEqual(head.redriven, 1)
      assert.deepStrictEqual((yield* peek(env.client, {})).messages.map((m) => m.messageId), ["fixed-3", "still-bad"])
      assert.strictEqual((yield* Effect.flip(redrive(env.client, {}))).code, grpc.status.INVALID_ARGUMENT, "neither ids nor all")
    }))
})

describe("RedriveDeadLetters under a connection cut", () => {
  it.live("a redrive whose broker connection is cut mid-way loses nothing: every message is in .dead or back in its queue", () =>
    Effect.gen(function*() {
      const relay = yield* startRelay()
      const env = yield* makeTestEnv({ RABBITMQ_PORT: String(relay.port) })
      const ids = Array.from({ length: 300 }, (_, i) => `cut-${i}`)
      for (const id of ids) yield* publishRaw(env.admin, "", env.names.schemasDead, Buffer.from(JSON.stringify(schemaBody(id))), { messageId: id })
      yield* waitForQueue(env.admin, env.names.schemasDead, (q) => q.messageCount === ids.length)
      const outcome = Effect.runPromise(Effect.result(redrive(env.client, { all: true })))
      // Cut the publishers' connection (the redrive's) once the first copies have landed.
      yield* waitForQueue(env.admin, env.names.schemas, (q) => q.messageCount > 0)
      yield* relay.severWhereClientSent("(publishing)")
      const result = yield* Effect.promise(() => outcome)
      // Whatever the call answered, the messages it held go back once the broker sees the cut.
      const counts = Effect.all([queueState(env.admin, env.names.schemasDead), queueState(env.admin, env.names.schemas)])
      while (true) {
        const [dead, back] = yield* counts
        if (dead.messageCount + back.messageCount >= ids.length) break
        yield* Effect.sleep("20 millis")
      }
      const seen = new Set<string>()
      for (const queue of [env.names.schemasDead, env.names.schemas]) {
        while (true) {
          const message = yield* Effect.promise(() => env.admin.channel.get(queue, { noAck: true }))
          if (message === false) break
          seen.add(String(message.properties.messageId))
        }
      }
      assert.deepStrictEqual(ids.filter((id) => !seen.has(id)), [], `lost; the call answered ${JSON.stringify(result)}`)
    }))
})

describe("PeekDeadLetters", () => {
  it.live.each(["classic", "quorum"] as const)("%s: shows the reasons, pages by id, and leaves every message in place and in order", (queueType) =>
    Effect.gen(function*() {
      const env = yield* makeTestEnv({ RABBITMQ_QUEUE_TYPE: queueType })
      // Five malformed bodies: the proxy dead-letters each with its reason.
      const bodies = ["{1", "{2", "{3", "{4", "{5"]
      for (const [i, body] of bodies.entries()) {
        yield* publishRaw(env.admin, env.names.exchange, "schemas.*", Buffer.from(body), { messageId: `bad-${i}` })
      }
      const stream = env.client.streamSchemaMessages({})
      stream.on("error", () => undefined)
      yield* waitForQueue(env.admin, env.names.schemasDead, (q) => q.messageCount === 5)
      stream.cancel()

      const first = yield* peek(env.client, { limit: 2 })
      assert.strictEqual(first.queue, env.names.schemasDead)
      assert.strictEqual(first.total, 5)
      assert.deepStrictEqual(first.messages.map((m) => m.messageId), ["bad-0", "bad-1"])
      assert.deepStrictEqual(first.messages.map((m) => m.body.toString()), ["{1", "{2"])
      for (const message of first.messages) {
        assert.match(message.reason, /^body is not valid JSON/)
        assert.strictEqual(message.originalQueue, env.names.schemas)
        assert.strictEqual(message.originalRoutingKey, "schemas.*")
        assert.match(message.deadLetteredAt, /^\d{4}-\d{2}-\d{2}T/)
        assert.match(message.id, /^[0-9a-f]{16}$/)
      }
      assert.strictEqual(first.next, first.messages[1]?.id)
      const second = yield* peek(env.client, { limit: 2, after: first.next })
      assert.deepStrictEqual(second.messages.map((m) => m.messageId), ["bad-2", "bad-3"])
      const third = yield* peek(env.client, { limit: 2, after: second.next })
      assert.deepStrictEqual(third.messages.map((m) => m.messageId), ["bad-4"])
      assert.strictEqual(third.next, "", "the end")
      // The same message, the same id, peek after peek.
      assert.deepStrictEqual((yield* peek(env.client, { limit: 5 })).messages.map((m) => m.id), [...first.messages, ...second.messages, ...third.messages].map((m) => m.id))

      // Nothing moved: all five are there, in their order.
      yield* waitForQueue(env.admin, env.names.schemasDead, (q) => q.messageCount === 5)
      const order: Array<string> = []
      for (let i = 0; i < 5; i++) {
        const message = yield* Effect.promise(() => env.admin.channel.get(env.names.schemasDead, { noAck: true }))
        order.push(message === false ? "none" : String(message.properties.messageId))
      }
      assert.deepStrictEqual(order, ["bad-0", "bad-1", "bad-2", "bad-3", "bad-4"])
      assert.strictEqual((yield* queueState(env.admin, env.names.schemasDead)).messageCount, 0)
    }))

  it.live("a stale page id, a kind without a dead-letter queue and a limit over 100 are INVALID_ARGUMENT", () =>
    Effect.gen(function*() {
      const env = yield* makeTestEnv()
      const stale = yield* Effect.flip(peek(env.client, { after: "0123456789abcdef" }))
      assert.strictEqual(stale.code, grpc.status.INVALID_ARGUMENT)
      assert.match(stale.details, /no message with id "0123456789abcdef"/)
      assert.strictEqual((yield* Effect.flip(peek(env.client, { kind: MessageKind.MESSAGE_KIND_SCHEMA_RESULT }))).code, grpc.status.INVALID_ARGUMENT)
      assert.strictEqual((yield* Effect.flip(peek(env.client, { limit: 101 }))).code, grpc.status.INVALID_ARGUMENT)
      assert.deepStrictEqual(yield* peek(env.client, {}), { queue: env.names.schemasDead, messages: [], next: "", total: 0 })
      // The CLI: one line per message, then where the next page starts.
      yield* publishRaw(env.admin, "", env.names.schemasDead, Buffer.from("{kept"), {
        messageId: "cli-1",
        headers: { "x-dead-letter-reason": "a reason", "x-original-queue": env.names.schemas }
      })
      const printed = yield* Effect.callback<string>((resume) => {
        execFile(process.execPath, [cliScript, "--port", String(env.port), "dead", "list", "schemas"], (_error, stdout) =>
          resume(Effect.succeed(stdout)))
      })
      const lines = printed.trim().split("\n").map((line) => JSON.parse(line) as Record<string, unknown>)
      assert.deepStrictEqual(lines.map(({ id: _id, ...rest }) => rest), [
        { messageId: "cli-1", reason: "a reason", originalQueue: env.names.schemas, deadLetteredAt: "", body: "{kept" },
        { queue: env.names.schemasDead, total: 1, shown: 1, next: "" }
      ])
      assert.strictEqual((yield* queueState(env.admin, env.names.schemasDead)).messageCount, 1, "still there")
      const shown = yield* Effect.callback<string>((resume) => {
        execFile(process.execPath, [cliScript, "--port", String(env.port), "dead", "show", "schemas", String(lines[0]?.["id"])], (_error, stdout) =>
          resume(Effect.succeed(stdout)))
      })
      const whole = JSON.parse(shown) as { body: string; headers: Record<string, string>; messageId: string }
      assert.deepStrictEqual([whole.messageId, whole.body, whole.headers["x-dead-letter-reason"]], ["cli-1", "{kept", "a reason"])
    }))
})
