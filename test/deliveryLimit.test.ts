/**
 * The broker's delivery limit (issue 10, fault 5): a quorum queue with `x-delivery-limit` drops a
 * message the broker delivered too often, the proxy's own crashes included. The proxy reports the
 * broker's count as delivery_count, dead-letters a message itself on the broker's last delivery of
 * it, and warns at start-up about a consumed queue that can drop messages. Real broker (3.10 here),
 * real gRPC server over loopback; the process-level test SIGKILLs the built proxy.
 */
import { assert, describe, it } from "@effect/vitest"
import * as grpc from "@grpc/grpc-js"
import type * as amqp from "amqplib"
import { Deferred, Effect, Exit, Queue } from "effect"
import { spawn } from "node:child_process"
import { fileURLToPath } from "node:url"
import { MessagingServiceClient, SchemaMessageResponse, type SchemaSubscriptionEvent } from "../gen/messaging.js"
import { learnQueueLimits, limitsOf, parseInequivalent } from "../src/broker/deliveryLimit.js"
import { admitAll, type AdmissionPolicy } from "../src/redelivery.js"
import { transcodeSchemaMessage } from "../src/codec.js"
import { schemaBody } from "./fixtures/bodies.js"
import { stubDelivery } from "./support/stubs.js"
import {
  type Admin,
  grpcClient,
  makeAdmin,
  makeNames,
  proxyEnv,
  publishJson,
  queueState,
  startProxy,
  type TestNames,
  waitForQueue
} from "./support/harness.js"
import { grpcPortOf, runProxy } from "./support/process.js"

// --- pure: reading the broker's answers, and what follows from a queue's arguments -------------

describe("queue limits from the broker's answers", () => {
  it("reads the PRECONDITION_FAILED answers RabbitMQ 3.10.8 gives (the three formats)", () => {
    const prefix = `Operation failed: QueueDeclare; 406 (PRECONDITION-FAILED) with message "PRECONDITION_FAILED - inequivalent arg`
    assert.deepStrictEqual(
      parseInequivalent(`${prefix} 'x-delivery-limit' for queue 'q' in vhost '/': received none but current is the value '3' of type 'byte'"`, {}),
      { key: "x-delivery-limit", current: { value: 3 } }
    )
    assert.deepStrictEqual(
      parseInequivalent(`${prefix} 'x-delivery-limit' for queue 'q' in vhost '/': received '99' but current is '3'"`, { "x-delivery-limit": 99 }),
      { key: "x-delivery-limit", current: { value: 3 } }
    )
    assert.deepStrictEqual(
      parseInequivalent(`${prefix} 'x-dead-letter-exchange' for queue 'q' in vhost '/': received the value '' of type 'longstr' but current is none"`, {}),
      { key: "x-dead-letter-exchange", current: undefined }
    )
    assert.deepStrictEqual(
      parseInequivalent(`${prefix} 'x-queue-type' for queue 'q' in vhost '/': received none but current is the value 'quorum' of type 'longstr'"`, {}),
      { key: "x-queue-type", current: { value: "quorum" } }
    )
    assert.isUndefined(parseInequivalent("NOT_FOUND - no queue 'q' in vhost '/'", {}))
  })

  it("a quorum queue's limit: its argument, else 20 on RabbitMQ 4.x, else none; -1 is none; drops only without a dead-letter exchange", () => {
    const quorum = { "x-queue-type": "quorum" }
    const limited = limitsOf("q", { ...quorum, "x-delivery-limit": 3 }, 3, true)
    assert.strictEqual(limited.deliveryLimit, 3)
    assert.strictEqual(limited.drops.length, 1)
    assert.include(limited.drops[0], "past 3")
    assert.strictEqual(limitsOf("q", quorum, 3, true).deliveryLimit, undefined)
    assert.strictEqual(limitsOf("q", quorum, 4, true).deliveryLimit, 20)
    assert.strictEqual(limitsOf("q", quorum, 4, true).deliveryLimitSource, "RabbitMQ 4.x default for quorum queues")
    assert.strictEqual(limitsOf("q", { ...quorum, "x-delivery-limit": -1 }, 4, true).deliveryLimit, undefined)
    assert.strictEqual(limitsOf("q", { "x-delivery-limit": 3 }, 4, true).deliveryLimit, undefined, "classic queues have none")
    // The proxy's own quorum declaration dead-letters to its .dead queue: limited, but nothing dropped.
    const proxys = limitsOf("q", { ...quorum, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": "q.dead" }, 4, true)
    assert.strictEqual(proxys.deliveryLimit, 20)
    assert.deepStrictEqual(proxys.drops, [])
    // Length limits and TTLs drop too; queue expiry deletes the messages whatever the dead-lettering.
    assert.strictEqual(limitsOf("q", { "x-max-length": 10 }, 3, true).drops.length, 1)
    assert.strictEqual(limitsOf("q", { "x-max-length": 10, "x-overflow": "reject-publish" }, 3, true).drops.length, 0)
    assert.strictEqual(limitsOf("q", { "x-message-ttl": 1000 }, 3, true).drops.length, 1)
    assert.strictEqual(limitsOf("q", { "x-expires": 1000, "x-dead-letter-exchange": "" }, 3, true).drops.length, 1)
  })
})

// --- admission with a known limit (the broker side is a stub here) --------------------------------

const policy: AdmissionPolicy = {
  queue: "q",
  maxRequeues: 5,
  transcode: transcodeSchemaMessage,
  maxEncodedBytes: 4 * 1024 * 1024,
  maxEncodedBytesSource: "GRPC_CLIENT_MAX_RECEIVE_MESSAGE_BYTES",
  declaredAs: { durable: true }
}

describe("admission at the broker's delivery limit", () => {
  const limits = limitsOf("q", { "x-queue-type": "quorum", "x-delivery-limit": 3 }, 3, true)
  const admit = (headers: Record<string, unknown>) => {
    const deadLettered: Array<string> = []
    const [admission] = Effect.runSync(admitAll([stubDelivery({ content: Buffer.from(JSON.stringify(schemaBody("dl"))), headers, redelivered: "x-delivery-count" in headers }, deadLettered)], policy, limits))
    return { admission, deadLettered }
  }

  it("x-delivery-count below the limit is delivered with delivery_count = the broker's count + 1", () => {
    for (const [headers, expected] of [[{}, 1], [{ "x-delivery-count": 1 }, 2], [{ "x-delivery-count": 2 }, 3]] as const) {
      const { admission, deadLettered } = admit(headers)
      assert.strictEqual(admission._tag, "Deliver")
      if (admission._tag === "Deliver") assert.strictEqual(admission.admitted.deliveryCount, expected)
      assert.deepStrictEqual(deadLettered, [])
    }
  })

  it("x-delivery-count = the limit (the broker's last delivery) is dead-lettered with the limit and the count, not delivered", () => {
    const { admission, deadLettered } = admit({ "x-delivery-count": 3 })
    assert.strictEqual(admission._tag, "DeadLettered")
    assert.deepStrictEqual(deadLettered, [
      "at the broker's delivery limit: x-delivery-count 3, delivery limit 3 (x-delivery-limit); the broker would drop it if it came back once more"
    ])
  })

  it("RabbitMQ 4.3's x-acquired-count counts in delivery_count; only x-delivery-count counts towards the limit", () => {
    const { admission } = admit({ "x-delivery-count": 1, "x-acquired-count": 7 })
    assert.strictEqual(admission._tag, "Deliver")
    if (admission._tag === "Deliver") assert.strictEqual(admission.admitted.deliveryCount, 8)
  })
})

// --- the real broker --------------------------------------------------------------------------------

/** The test's own quorum queue as the issue declares it: a delivery limit, no dead-letter exchange. */
const limitedQueueArgs = (limit: number) => ({ "x-queue-type": "quorum", "x-delivery-limit": limit })

const declareLimitedSchemas = (names: TestNames, admin: Admin, limit: number) =>
  Effect.promise(async () => {
    await admin.channel.assertExchange(names.exchange, "topic", { durable: true })
    await admin.channel.assertQueue(names.schemas, { durable: true, arguments: limitedQueueArgs(limit) })
    await admin.channel.bindQueue(names.schemas, names.exchange, "schemas.*")
  })

/**
 * One delivery of the queue's head to a consumer of the test's own, which then gives it back by
 * closing its channel (the broker counts that return as a delivery, like a consumer that died).
 * Answers the delivery's x-delivery-count (0 when absent) and its message id.
 */
const takeAndReturn = (admin: Admin, queue: string) =>
  Effect.callback<{ readonly count: number; readonly id: string | undefined }, Error>((resume) => {
    void admin.connection.createChannel().then(async (channel) => {
      channel.on("error", () => undefined)
      await channel.prefetch(1)
      await channel.consume(queue, (message) => {
        if (message === null) return
        const raw: unknown = message.properties.headers?.["x-delivery-count"]
        void channel.close().catch(() => undefined).then(() =>
          resume(Effect.succeed({ count: typeof raw === "number" ? raw : 0, id: message.properties.messageId }))
        )
      })
    }, (error: unknown) => resume(Effect.fail(new Error(String(error)))))
  })

/** The dead-letter queue's messages, taken (and acked) by the admin. */
const takeAll = (admin: Admin, queue: string) =>
  Effect.promise(async () => {
    const found: Array<amqp.GetMessage> = []
    while (true) {
      const message = await admin.channel.get(queue, { noAck: true })
      if (message === false) return found
      found.push(message)
    }
  })

describe("the broker's delivery limit, measured", () => {
  it.live("RabbitMQ drops the message on the return of the delivery whose x-delivery-count equals the limit (3: none, 1, 2, 3, gone)", () =>
    Effect.gen(function*() {
      const names = makeNames()
      const admin = yield* makeAdmin(names)
      yield* declareLimitedSchemas(names, admin, 3)
      yield* publishJson(admin, names.exchange, "schemas.*", schemaBody("limited"))
      // Published after it: a quorum queue hands out returned messages before the others, so the
      // sentinel arriving means the first message did not come back.
      yield* publishJson(admin, names.exchange, "schemas.*", schemaBody("sentinel"))
      const seen: Array<{ count: number; id: string | undefined }> = []
      while (true) {
        const delivery = yield* takeAndReturn(admin, names.schemas)
        seen.push(delivery)
        if (delivery.id === "sentinel") break
      }
      assert.deepStrictEqual(seen, [
        { count: 0, id: "limited" },
        { count: 1, id: "limited" },
        { count: 2, id: "limited" },
        { count: 3, id: "limited" },
        { count: 0, id: "sentinel" }
      ])
      const state = yield* waitForQueue(admin, names.schemas, (q) => q.consumerCount === 0)
      assert.strictEqual(state.messageCount, 1, "only the sentinel is left: the limited message was dropped")
    }))

  it.live("the proxy reads an existing queue's delivery limit and dead-letter exchange (none) over AMQP, leaving the queue as it was", () =>
    Effect.gen(function*() {
      const names = makeNames()
      const admin = yield* makeAdmin(names)
      yield* declareLimitedSchemas(names, admin, 3)
      // From the classic declaration the proxy starts with: x-queue-type, then x-delivery-limit are read.
      const limits = yield* learnQueueLimits(admin.connection, names.schemas, { durable: true })
      assert.strictEqual(limits.argumentsRead, true)
      assert.strictEqual(limits.deliveryLimit, 3)
      assert.strictEqual(limits.deliveryLimitSource, "x-delivery-limit")
      assert.isUndefined(limits.deadLetterExchange)
      assert.strictEqual(limits.drops.length, 1)
      // Unchanged: only its own declaration is still accepted.
      const accepted = yield* Effect.promise(async () => {
        const channel = await admin.connection.createChannel()
        channel.on("error", () => undefined)
        return channel.assertQueue(names.schemas, { durable: true, arguments: limitedQueueArgs(3) })
          .then(() => channel.close().then(() => true), () => false)
      })
      assert.isTrue(accepted)
    }))
})

/** Waits (no clock) until `queue` holds `count` ready messages and no consumer. */
const waitForReady = (admin: Admin, queue: string, count: number) =>
  waitForQueue(admin, queue, (q) => q.messageCount === count && q.consumerCount === 0)

describe("the proxy at the broker's delivery limit", () => {
  it.live("StreamSchemaMessages: a message already delivered up to the limit is dead-lettered with the reason, the next one is streamed", () =>
    Effect.gen(function*() {
      const names = makeNames()
      const admin = yield* makeAdmin(names)
      yield* declareLimitedSchemas(names, admin, 3)
      yield* publishJson(admin, names.exchange, "schemas.*", schemaBody("worn"))
      // Three deliveries the broker counted, before the proxy ever saw the message.
      for (let i = 0; i < 3; i++) yield* takeAndReturn(admin, names.schemas)
      yield* publishJson(admin, names.exchange, "schemas.*", schemaBody("fresh"))
      const port = yield* startProxy(names)
      const client = yield* grpcClient(port)
      const received = yield* firstMessages(client.streamSchemaMessages({}), 1)
      assert.deepStrictEqual(received.map((m) => m.id), ["fresh"])
      const [dead] = yield* waitForReady(admin, names.schemasDead, 1).pipe(Effect.andThen(takeAll(admin, names.schemasDead)))
      assert.strictEqual(dead?.properties.messageId, "worn")
      assert.strictEqual(
        dead?.properties.headers?.["x-dead-letter-reason"],
        "at the broker's delivery limit: x-delivery-count 3, delivery limit 3 (x-delivery-limit); the broker would drop it if it came back once more"
      )
      assert.strictEqual(dead?.properties.headers?.["x-original-queue"], names.schemas)
      assert.deepStrictEqual(JSON.parse(dead!.content.toString()), schemaBody("worn"))
    }))

  it.live("the issue's example: a subscriber receives the message and the proxy is SIGKILLed, again and again: delivery_count 1, 2, 3, then it is in .dead with the reason, never dropped; one start-up warning names the queue and the limit", () =>
    Effect.gen(function*() {
      const names = makeNames()
      const admin = yield* makeAdmin(names)
      yield* declareLimitedSchemas(names, admin, 3)
      yield* publishJson(admin, names.exchange, "schemas.*", schemaBody("killer"))
      const seen: Array<{ readonly id: string | undefined; readonly deliveryCount: number; readonly redelivered: boolean }> = []
      let outputs: Array<string> = []
      // Each round: a proxy, a subscriber; on a delivery the proxy is SIGKILLed holding it.
      while (true) {
        const round = yield* killedOnDelivery(names, admin)
        outputs = [...outputs, round.stdout]
        if (round.delivery === undefined) break
        seen.push(round.delivery)
        assert.strictEqual(round.ready, 1, `after delivery ${seen.length} the broker took the message back, it did not drop it`)
      }
      assert.deepStrictEqual(seen, [
        { id: "killer", deliveryCount: 1, redelivered: false },
        { id: "killer", deliveryCount: 2, redelivered: true },
        { id: "killer", deliveryCount: 3, redelivered: true }
      ])
      const [dead, ...more] = yield* takeAll(admin, names.schemasDead)
      assert.strictEqual(more.length, 0)
      assert.strictEqual(dead?.properties.messageId, "killer")
      assert.strictEqual(
        dead?.properties.headers?.["x-dead-letter-reason"],
        "at the broker's delivery limit: x-delivery-count 3, delivery limit 3 (x-delivery-limit); the broker would drop it if it came back once more"
      )
      const source = yield* queueState(admin, names.schemas)
      assert.strictEqual(source.messageCount, 0)
      // Every start warned once about the queue, naming the limit and what to do.
      for (const stdout of outputs) {
        const warnings = stdout.split("\n").filter((l) => l.includes("consumed queue can drop messages"))
        assert.strictEqual(warnings.length, 1, stdout)
        const logged = JSON.parse(warnings[0]!) as { level: string; message: [string, Record<string, unknown>] }
        assert.strictEqual(logged.level, "WARN")
        const line = logged.message[1]
        assert.strictEqual(line["queue"], names.schemas)
        assert.strictEqual(line["deliveryLimit"], 3)
        assert.include(String(line["todo"]), `x-dead-letter-routing-key "${names.schemasDead}"`)
        assert.include(String(line["note"]), "policies")
        // The other consumed queue is the proxy's own: nothing to warn about.
        assert.notInclude(stdout.split("\n").filter((l) => l.includes("can drop")).join("\n"), names.validations)
      }
    }))

  it.live("RABBITMQ_QUEUE_TYPE=quorum: the proxy's own queues dead-letter to .dead, so no warning", () =>
    Effect.gen(function*() {
      const names = makeNames()
      yield* makeAdmin(names)
      // "connected to broker" is logged once the topology (and its check) is done.
      const result = yield* runProxy(proxyEnv(names, { RABBITMQ_QUEUE_TYPE: "quorum" }), (kill) => kill(), "connected to broker")
      assert.strictEqual(result.code, 0, result.stderr)
      assert.include(result.stdout, "connected to broker")
      assert.notInclude(result.stdout, "can drop messages")
    }))
})

/** The first `count` messages of a contract stream, then cancelled. */
const firstMessages = (call: grpc.ClientReadableStream<SchemaMessageResponse>, count: number) =>
  Effect.callback<Array<SchemaMessageResponse>, Error>((resume) => {
    const received: Array<SchemaMessageResponse> = []
    call.on("data", (message: SchemaMessageResponse) => {
      received.push(message)
      if (received.length === count) {
        call.cancel()
        resume(Effect.succeed(received))
      }
    })
    call.on("error", (error: grpc.ServiceError) => {
      if (error.code !== grpc.status.CANCELLED) resume(Effect.fail(new Error(`${error.code} ${error.details}`)))
    })
    return Effect.sync(() => call.cancel())
  })

const mainScript = fileURLToPath(new URL("../dist/src/main.js", import.meta.url))

interface Round {
  /** What the subscriber was given before the SIGKILL; undefined: nothing (the message went to .dead). */
  readonly delivery: { readonly id: string | undefined; readonly deliveryCount: number; readonly redelivered: boolean } | undefined
  readonly stdout: string
  /** Ready messages in the schemas queue once the proxy's consumer is gone. */
  readonly ready: number
}

/**
 * Runs the built proxy with a subscriber on the schemas queue. On the first delivery the proxy is
 * SIGKILLed (holding it unacked), and the round ends once the broker has dropped the proxy's
 * consumer (and taken back, or dropped, the message). If instead the message arrives in the dead-letter queue, the
 * proxy is stopped and the round ends with no delivery.
 */
const killedOnDelivery = (names: TestNames, admin: Admin): Effect.Effect<Round, Error> =>
  Effect.gen(function*() {
    const events = yield* Queue.unbounded<"exited">()
    const delivered = yield* Deferred.make<Round["delivery"]>()
    let stdout = ""
    const child = yield* Effect.acquireRelease(
      Effect.sync(() => spawn(process.execPath, [mainScript], { env: { PATH: process.env["PATH"] ?? "", ...proxyEnv(names) }, stdio: ["ignore", "pipe", "pipe"] })),
      (child) => Effect.sync(() => child.kill("SIGKILL"))
    )
    // 'close', not 'exit': everything it wrote has been read by then.
    child.on("close", () => Queue.offerUnsafe(events, "exited"))
    let subscribed = false
    child.stdout.on("data", (chunk: Buffer) => {
      stdout += chunk.toString()
      if (subscribed || !stdout.includes("gRPC server listening")) return
      subscribed = true
      const client = new MessagingServiceClient(`127.0.0.1:${grpcPortOf(stdout)}`, grpc.credentials.createInsecure())
      const call = client.subscribeSchemaMessages()
      call.on("error", () => undefined)
      call.on("data", (event: SchemaSubscriptionEvent) => {
        if (event.event?.$case !== "delivery") return
        const { info, message } = event.event.value
        child.kill("SIGKILL")
        Deferred.doneUnsafe(delivered, Exit.succeed({
          id: message?.id,
          deliveryCount: info?.deliveryCount ?? 0,
          redelivered: info?.redelivered ?? false
        }))
        client.close()
      })
      call.write({ action: { $case: "open", value: { maxInFlight: 1, consumerName: "", maxMessageBytes: 0, ackDeadlineSeconds: 0, maxDeliveriesPerEvent: 0 } } })
    })
    // Whichever comes first: a delivery (then the broker takes it back), or the message in .dead.
    const deadLettered = waitForQueue(admin, names.schemasDead, (q) => q.messageCount === 1).pipe(
      Effect.as(undefined)
    )
    const delivery = yield* Effect.raceFirst(Deferred.await(delivered), deadLettered)
    if (delivery === undefined) child.kill("SIGTERM")
    yield* Queue.take(events)
    // A quorum queue drops the proxy's consumer and takes back what it held in one step.
    const after = yield* waitForQueue(admin, names.schemas, (q) => q.consumerCount === 0)
    return { delivery, stdout, ready: after.messageCount }
  }).pipe(Effect.scoped)
