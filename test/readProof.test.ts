/**
 * Issue 10, fault 8: the contract streams ack a message only once the client can be shown to have
 * read it, so a default Python grpcio client (the Typechecking service's) that is slow, stalled,
 * past its deadline or killed loses nothing: whatever it did not read is back in the queue.
 * The clients are the original system's (test/fixtures/original/slow_reader.py: grpcio, classes
 * built from the original proto), BDP probing on (grpcio's default) and off.
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect, Option } from "effect"
import { fileURLToPath } from "node:url"
import { schemaBody, validationBody } from "./fixtures/bodies.js"
import { type Admin, makeTestEnv, waitForQueue } from "./support/harness.js"
import { makeMetricsTestEnv, sample, scrapeUntil } from "./support/metrics.js"
import { compilePythonProto, interactive, python } from "./support/python.js"

const fixture = (name: string) => fileURLToPath(new URL(`./fixtures/original/${name}`, import.meta.url))

/** Publishes every body, then waits for the broker's confirms once (thousands of bodies at a time). */
const publishAll = (admin: Admin, exchange: string, routingKey: string, bodies: ReadonlyArray<{ readonly id: string }>) =>
  Effect.gen(function*() {
    for (const body of bodies) {
      admin.channel.publish(exchange, routingKey, Buffer.from(JSON.stringify(body)), { persistent: true, messageId: body.id })
    }
    yield* Effect.promise(() => admin.channel.waitForConfirms())
  })

/** Takes every ready message off `queue` (no ack needed): the ids left there. */
const drainIds = (admin: Admin, queue: string) =>
  Effect.gen(function*() {
    const ids: Array<string> = []
    while (true) {
      const message = yield* Effect.promise(() => admin.channel.get(queue, { noAck: true }))
      if (message === false) return ids
      ids.push(String(message.properties.messageId))
    }
  })

/** A slow_reader.py run: its lines as they come, and the ids it read. */
const slowReader = (port: number, which: "schemas" | "validations", options: ReadonlyArray<string>) =>
  Effect.gen(function*() {
    const pb2 = yield* compilePythonProto(fixture("messaging.proto"))
    const reader = yield* interactive(python, [fixture("slow_reader.py"), pb2, `127.0.0.1:${port}`, which, ...options])
    const read: Array<string> = []
    /** Reads lines until one that is not a message id (stalled / error), and returns it. */
    const until = Effect.gen(function*() {
      while (true) {
        const line: { readonly id?: string; readonly stalled?: number; readonly error?: string } = JSON.parse(yield* reader.line)
        if (line.id === undefined) return line
        read.push(line.id)
      }
    })
    return { reader, read, until }
  })

/** Every id is either read by the client or back in the queue: nothing acked and lost. */
const assertNoneLost = (all: ReadonlyArray<string>, read: ReadonlyArray<string>, back: ReadonlyArray<string>) => {
  const seen = new Set([...read, ...back])
  const lost = all.filter((id) => !seen.has(id))
  assert.deepStrictEqual(lost.slice(0, 10), [], `${lost.length} messages acked but never read`)
  assert.strictEqual(new Set(back).size, back.length, "nothing back twice")
}

describe("contract streams ack only what the client can be shown to have read (issue 10, fault 8)", () => {
  it.live("500 × ~200 B read one every 0.5 s with a 3 s deadline: every unread one is back", () =>
    Effect.gen(function*() {
      const { names, port, admin } = yield* makeTestEnv()
      const ids = Array.from({ length: 500 }, (_, i) => `slow-${i}`)
      yield* publishAll(admin, names.exchange, "schemas.*", ids.map((id) => schemaBody(id)))
      const { read, until } = yield* slowReader(port, "schemas", ["--interval", "0.5", "--deadline", "3"])
      assert.deepStrictEqual(yield* until, { error: "DEADLINE_EXCEEDED" })
      assert.isAbove(read.length, 0)
      yield* waitForQueue(admin, names.schemas, (q) => q.consumerCount === 0 && q.messageCount >= 500 - read.length)
      assertNoneLost(ids, read, yield* drainIds(admin, names.schemas))
    }))

  for (const bdp of ["on", "off"] as const) {
    it.live(`10,000 × 1.2 KiB, a client (BDP probing ${bdp}) that reads 1,000, stalls and is killed: every unread one is back`, () =>
      Effect.gen(function*() {
        const { names, port, admin } = yield* makeTestEnv()
        const ids = Array.from({ length: 10_000 }, (_, i) => `k-${i}`)
        // ~1.2 KiB on the wire each.
        yield* publishAll(admin, names.exchange, "validation.*", ids.map((id) => ({ ...validationBody(id), file_data: "ab".repeat(512) })))
        const { reader, read, until } = yield* slowReader(port, "validations", ["--bdp", bdp, "--stall-after", "1000"])
        assert.deepStrictEqual(yield* until, { stalled: 1000 })
        reader.child.kill("SIGKILL")
        yield* waitForQueue(admin, names.validations, (q) => q.consumerCount === 0 && q.messageCount >= 9_000)
        assertNoneLost(ids, read, yield* drainIds(admin, names.validations))
      }))
  }

  it.live("a client that reads everything at full speed gets it in order without a stall, and what it was shown to read is acked", () =>
    Effect.gen(function*() {
      const { names, port, admin } = yield* makeTestEnv()
      // 4,000 × ~2 KiB: more than grpcio's window (4 MiB + its read-ahead), so the stream must
      // grow its prefetch past RABBITMQ_PREFETCH's 32, or it would stop with everything written.
      const ids = Array.from({ length: 4000 }, (_, i) => `f-${i}`)
      yield* publishAll(admin, names.exchange, "validation.*", ids.map((id) => ({ ...validationBody(id), file_data: "ab".repeat(1000) })))
      const { reader, read, until } = yield* slowReader(port, "validations", ["--stall-after", "4000"])
      assert.deepStrictEqual(yield* until, { stalled: 4000 })
      assert.deepStrictEqual(read, ids, "all, in order, once")
      reader.child.kill("SIGKILL")
      // The last window's worth cannot be shown read: it comes back (duplicates, since this client
      // had read them) once the channel closes, a moment after the consumer is gone.
      const back = yield* waitForQueue(admin, names.validations, (q) => q.consumerCount === 0 && q.messageCount > 0)
      // Those written more than a window before the end were shown read and acked.
      assert.isBelow(back.messageCount, 4000, "some were shown read and acked")
      assertNoneLost(ids, read, yield* drainIds(admin, names.validations))
    }))

  it.live("a quiet stream acks its last messages after MESSAGING_QUIET_STREAM_ACK_SECONDS, not never", () =>
    Effect.gen(function*() {
      const { names, port, admin, metricsPort } = yield* makeMetricsTestEnv({ MESSAGING_QUIET_STREAM_ACK_SECONDS: "1" })
      const ids = Array.from({ length: 300 }, (_, i) => `q-${i}`)
      yield* publishAll(admin, names.exchange, "schemas.*", ids.map((id) => schemaBody(id)))
      const { reader, read, until } = yield* slowReader(port, "schemas", ["--stall-after", "300"])
      assert.deepStrictEqual(yield* until, { stalled: 300 })
      assert.strictEqual(read.length, 300)
      const metrics = Option.getOrThrow(metricsPort)
      const delivered = (body: string) => sample(body, "messaging_proxy_messages_delivered_total", { queue: names.schemas, rpc: "StreamSchemaMessages" })
      // Nothing more to write, so nothing more can be shown read: once quiet, they are acked.
      const body = yield* scrapeUntil(metrics, (b) => delivered(b) === 300)
      assert.strictEqual(delivered(body), 300)
      reader.child.kill("SIGKILL")
      const after = yield* waitForQueue(admin, names.schemas, (q) => q.consumerCount === 0)
      assert.strictEqual(after.messageCount, 0, "acked: not repeated to the next client")
    }))
})
