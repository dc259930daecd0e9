/**
 * Issue 11, part 5: the client library (src/client) against the real proxy and broker.
 *
 * Nothing here waits on wall-clock time: "the ack deadline has passed" is shown by a canary delivery
 * with the same deadline coming back (twice), and "the client has settled" by the client's own debug
 * line, written right after the settle request. Stopping a worker half-closes its call and waits for
 * the proxy's status, so whatever it wrote has been applied before the queue is inspected.
 */
import { assert, describe, it } from "@effect/vitest"
import { explainIfInterrupted } from "./support/waiting.js"
import { Deferred, Effect, Exit, Fiber, Logger, Queue, References, Scope } from "effect"
import { schemaBody, validationBody } from "./fixtures/bodies.js"
import { delayQueuesOf, makeAdmin, makeNames, makeTestEnv, publishJson, startProxy, waitForQueue } from "./support/harness.js"
import { subscribeSchemas } from "./support/subscriber.js"
import {
  type Delivery,
  type Handler,
  type Kind,
  MessagingClient,
  Reject,
  type SubscribeOptions
} from "../src/client/MessagingClient.js"

interface LogLine {
  readonly level: string
  readonly text: string
  readonly fields: Record<string, unknown>
}

/** A worker running `subscribe` in a fiber of its own, with its log lines captured. */
const startWorker = <K extends Kind, E>(
  client: MessagingClient["Service"],
  kind: K,
  handler: Handler<K, E, never>,
  options: SubscribeOptions
) =>
  Effect.gen(function*() {
    const lines: Array<LogLine> = []
    const incoming = yield* Queue.unbounded<LogLine>()
    const capture = Logger.make((options) => {
      const parts = Array.isArray(options.message) ? options.message : [options.message]
      const line: LogLine = {
        level: String(options.logLevel),
        text: String(parts[0]),
        fields: typeof parts[1] === "object" && parts[1] !== null ? parts[1] as Record<string, unknown> : {}
      }
      lines.push(line)
      Queue.offerUnsafe(incoming, line)
    })
    const fiber = yield* Effect.forkChild(
      client.subscribe(kind, handler, options).pipe(
        Effect.provide(Logger.layer([capture])),
        Effect.provideService(References.MinimumLogLevel, "Debug")
      )
    )
    /** Takes log lines until `done` says so (no deadline of its own: support/waiting.ts). */
    const until = (done: (line: LogLine) => boolean) =>
      Effect.gen(function*() {
        while (!done(yield* Queue.take(incoming))) {}
      }).pipe(explainIfInterrupted("a log line of the client", () => lines))
    return {
      lines,
      until,
      /** Waits until the client has written a settle of `outcome` for message `id`. */
      settled: (id: string, outcome: "ack" | "nack" | "nackDelayed" | "reject") =>
        until((line) => line.text === "delivery settled" && line.fields["messageId"] === id && line.fields["outcome"] === outcome),
      /** Interrupts the worker: handlers stop, the call is half-closed and its end awaited. */
      stop: Fiber.interrupt(fiber),
      settleErrors: () => lines.filter((line) => line.text === "messaging-proxy could not settle deliveries")
    }
  })

const connect = (port: number) => MessagingClient.make({ address: `127.0.0.1:${port}` })

describe("client library (issue 11, part 5)", () => {
  it.live("a handler that runs past the ack deadline still acks exactly once: the lease is extended", () =>
    Effect.gen(function*() {
      const { names, port, client: raw, admin } = yield* makeTestEnv()
      const client = yield* connect(port)
      const started = yield* Deferred.make<void>()
      const release = yield* Deferred.make<void>()
      const calls: Array<[string, number]> = []
      const worker = yield* startWorker(client, "validations", (delivery: Delivery<"validations">) =>
        Effect.gen(function*() {
          calls.push([delivery.message.id, delivery.deliveryCount])
          yield* Deferred.succeed(started, undefined)
          yield* Deferred.await(release)
        }), { maxInFlight: 5, ackDeadlineSeconds: 1 })
      yield* worker.until((line) => line.text === "messaging-proxy subscription opened")
      yield* publishJson(admin, names.exchange, "validation.*", validationBody("long"))
      yield* Deferred.await(started)

      // A canary with the same 1 s deadline, delivered after the handler started and never settled:
      // each time it comes back, another deadline has passed. Two returns: "long"'s first deadline,
      // and the proxy's sweep after it, are certainly behind us.
      const canary = yield* subscribeSchemas(raw, { maxInFlight: 1, ackDeadlineSeconds: 1 })
      yield* canary.next() // opened
      yield* publishJson(admin, names.exchange, "schemas.*", schemaBody("canary"))
      yield* canary.deliveries(1)
      yield* canary.deliveries(1)
      const [third] = yield* canary.deliveries(1)
      assert.strictEqual(third?.info?.deliveryCount, 3)
      yield* canary.ack(third!.info!.deliveryId)
      yield* canary.settled

      yield* Deferred.succeed(release, undefined)
      yield* worker.settled("long", "ack")
      yield* worker.stop
      assert.deepStrictEqual(calls, [["long", 1]])
      assert.deepStrictEqual(worker.settleErrors(), [])
      const queue = yield* waitForQueue(admin, names.validations, (q) => q.consumerCount === 0)
      assert.strictEqual(queue.messageCount, 0)
    }))

  it.live("a failing handler's message comes back after the backoff (through the proxy's 1 s delay queue, delivery_count 2) and then succeeds", () =>
    Effect.gen(function*() {
      const { names, port, admin } = yield* makeTestEnv()
      const client = yield* connect(port)
      const calls: Array<[string, number]> = []
      const worker = yield* startWorker(client, "schemas", (delivery: Delivery<"schemas">) =>
        Effect.gen(function*() {
          calls.push([delivery.message.id, delivery.deliveryCount])
          if (delivery.deliveryCount === 1) return yield* Effect.fail(new Error("transient failure"))
        }), { maxInFlight: 5 })
      yield* publishJson(admin, names.exchange, "schemas.*", schemaBody("flaky"))
      yield* worker.settled("flaky", "nackDelayed")
      // The default backoff (1 s for a first failure) sends it through the 1 s tier.
      yield* waitForQueue(admin, `${names.schemas}.retry.1s`, (q) => q.messageCount === 1)
      yield* worker.settled("flaky", "ack")
      yield* worker.stop
      assert.deepStrictEqual(calls, [["flaky", 1], ["flaky", 2]])
      assert.strictEqual(worker.lines.filter((line) => line.text === "message handler failed: the message will be retried").length, 1)
      assert.deepStrictEqual(worker.settleErrors(), [])
      const queue = yield* waitForQueue(admin, names.schemas, (q) => q.consumerCount === 0)
      assert.strictEqual(queue.messageCount, 0)
    }))

  it.live("a Reject dead-letters the message with its reason", () =>
    Effect.gen(function*() {
      const { names, port, admin } = yield* makeTestEnv()
      const client = yield* connect(port)
      const worker = yield* startWorker(client, "schemas", (delivery: Delivery<"schemas">) =>
        delivery.message.id === "poison" ? Effect.fail(new Reject({ reason: "cannot be typechecked" })) : Effect.void, {
        consumerName: "client-test"
      })
      yield* publishJson(admin, names.exchange, "schemas.*", schemaBody("poison"))
      yield* worker.settled("poison", "reject")
      // The proxy moves a rejected message in the background (publish to .dead, confirm, then ack):
      // wait for it before stopping, as a call that ends first takes the move with it (back to the queue).
      yield* waitForQueue(admin, names.schemasDead, (q) => q.messageCount === 1)
      yield* worker.stop
      const dead = yield* Effect.promise(() => admin.channel.get(names.schemasDead, { noAck: true }))
      if (dead === false) return assert.fail("nothing dead-lettered")
      assert.strictEqual(JSON.parse(dead.content.toString()).id, "poison")
      assert.strictEqual(dead.properties.headers?.["x-dead-letter-reason"], "cannot be typechecked")
      assert.strictEqual(dead.properties.headers?.["x-rejected-by"], "client-test")
      const queue = yield* waitForQueue(admin, names.schemas, (q) => q.consumerCount === 0)
      assert.strictEqual(queue.messageCount, 0)
    }))

  it.live("the client resumes after the proxy restarts, and nothing is lost", () =>
    Effect.gen(function*() {
      const names = makeNames()
      const admin = yield* makeAdmin(names)
      const first = yield* Scope.make()
      const port = yield* startProxy(names).pipe(Scope.provide(first))
      yield* Effect.addFinalizer(() => Scope.close(first, Exit.void))
      yield* waitForQueue(admin, delayQueuesOf(names).at(-1)!)
      const client = yield* connect(port)
      const handled: Array<string> = []
      const acked = new Map<string, number>()
      const worker = yield* startWorker(client, "schemas", (delivery: Delivery<"schemas">) =>
        Effect.sync(() => {
          handled.push(delivery.message.id)
        }), { maxInFlight: 5 })
      const ids = ["before", "down-1", "down-2", "after"]

      yield* publishJson(admin, names.exchange, "schemas.*", schemaBody("before"))
      yield* worker.settled("before", "ack")

      // The proxy goes away (its calls end with UNAVAILABLE); messages keep arriving meanwhile.
      yield* Scope.close(first, Exit.void)
      yield* worker.until((line) => line.text === "messaging-proxy subscription lost, reconnecting")
      yield* publishJson(admin, names.exchange, "schemas.*", schemaBody("down-1"))
      yield* publishJson(admin, names.exchange, "schemas.*", schemaBody("down-2"))

      // A new proxy on the same port.
      const second = yield* Scope.make()
      yield* Effect.addFinalizer(() => Scope.close(second, Exit.void))
      yield* startProxy(names, { MESSAGING_CONNECTION_PORT: String(port) }).pipe(Scope.provide(second))
      yield* publishJson(admin, names.exchange, "schemas.*", schemaBody("after"))

      // Until every message was acked, and every delivery handled was settled.
      for (const line of worker.lines) {
        if (line.text === "delivery settled" && line.fields["outcome"] === "ack") {
          const id = String(line.fields["messageId"])
          acked.set(id, (acked.get(id) ?? 0) + 1)
        }
      }
      const allAcked = () =>
        ids.every((id) => (acked.get(id) ?? 0) > 0) &&
        handled.length === [...acked.values()].reduce((a, b) => a + b, 0)
      if (!allAcked()) {
        yield* worker.until((line) => {
          if (line.text === "delivery settled" && line.fields["outcome"] === "ack") {
            const id = String(line.fields["messageId"])
            acked.set(id, (acked.get(id) ?? 0) + 1)
          }
          return allAcked()
        })
      }
      yield* worker.stop
      assert.deepStrictEqual([...new Set(handled)].sort(), [...ids].sort())
      assert.isTrue(worker.lines.some((line) => line.text === "messaging-proxy subscription opened"))
      assert.deepStrictEqual(worker.settleErrors(), [])
      const queue = yield* waitForQueue(admin, names.schemas, (q) => q.consumerCount === 0)
      assert.strictEqual(queue.messageCount, 0)
    }))

  it.live("publish and publishBatch are confirmed; failures are typed by status code", () =>
    Effect.gen(function*() {
      const { names, port, admin } = yield* makeTestEnv()
      const client = yield* connect(port)
      const one = yield* client.publish("schema", schemaBody("p-1"))
      assert.strictEqual(one.messageId, "p-1")
      const batch = yield* client.publishBatch("schema", [schemaBody("p-2"), JSON.stringify(schemaBody("p-3"))])
      assert.deepStrictEqual([batch.published, batch.messageIds], [2, ["p-2", "p-3"]])
      yield* waitForQueue(admin, names.schemas, (q) => q.messageCount === 3)

      const invalid = yield* Effect.flip(client.publish("schema", { id: 42 }))
      assert.strictEqual(invalid._tag, "InvalidArgument")
      assert.isFalse(invalid.isRetryable)
      assert.match(invalid.message, /Publish failed at 127\.0\.0\.1:\d+ \(INVALID_ARGUMENT: body rejected/)
      const misrouted = yield* Effect.flip(client.publish("schema", schemaBody("p-4"), { routingKey: "nowhere" }))
      assert.strictEqual(misrouted._tag, "InvalidArgument")
      assert.match(misrouted.details, /routing key 'nowhere' does not match/)
      const halfBatch = yield* Effect.flip(client.publishBatch("schema", [schemaBody("p-5"), "{"]))
      assert.strictEqual(halfBatch._tag, "InvalidArgument")
      assert.match(halfBatch.details, /published 1 before this one/)
    }))
})
