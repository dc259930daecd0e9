/**
 * The built service as a process: bad configuration stops start-up with one line naming the
 * variable and the value; SIGTERM shuts it down cleanly with exit code 0.
 */
import { assert, describe, it } from "@effect/vitest"
import { Deferred, Effect, Exit } from "effect"
import { type AddressInfo, createServer } from "node:net"
import * as grpc from "@grpc/grpc-js"
import { MessagingServiceClient, type SchemaSubscriptionEvent } from "../gen/messaging.js"
import { schemaBody } from "./fixtures/bodies.js"
import { HealthClient } from "./support/health.js"
import { grpcPortOf, runProxy } from "./support/process.js"
import { type Admin, makeAdmin, makeNames, proxyEnv, publishJson, type TestNames, waitForQueue } from "./support/harness.js"

/** Declares the test's topology the way the proxy does, so messages can wait before it starts. */
const declareSchemasQueue = (names: TestNames, admin: Admin) =>
  Effect.promise(async () => {
    await admin.channel.assertExchange(names.exchange, "topic", { durable: true })
    await admin.channel.assertQueue(names.schemas, { durable: true })
    await admin.channel.bindQueue(names.schemas, names.exchange, "schemas.*")
  })

describe("start-up", () => {
  it.live.each([
    ["MESSAGING_CONNECTION_PORT", "abc", "a port number between 0 and 65535"],
    ["MESSAGING_CONNECTION_PORT", "70000", "a port number between 0 and 65535"],
    ["RABBITMQ_PORT", "-1", "a port number between 1 and 65535"],
    ["RABBITMQ_EXCHANGE_TYPE", "fanoutt", "one of topic, direct, fanout, headers"],
    ["RABBITMQ_PREFETCH", "0", "a whole number between 1 and 65535"],
    ["MESSAGING_CONNECTION_DEBUG", "maybe", "true or false"],
    ["RABBITMQ_QUEUE_TYPE", "stream", "one of classic, quorum"],
    ["RABBITMQ_HOSTS", "a:1,b:99999", "comma-separated host[:port] entries (IPv6 as [address]:port), ports 1-65535"],
    ["RABBITMQ_CHANNEL_MAX", "70000", "a whole number of channels between 0 (the broker's limit) and 65535"]
  ] as const)("%s=%s stops start-up with one clear line", ([variable, value, expected]) =>
    Effect.gen(function*() {
      const result = yield* runProxy({ [variable]: value })
      assert.strictEqual(result.code, 1)
      assert.strictEqual(
        result.stderr.trim(),
        `messaging-proxy: invalid configuration: ${variable}="${value}": expected ${expected}`
      )
    }))

  it.live("an invalid password is never echoed", () =>
    Effect.gen(function*() {
      // A password cannot be invalid, so force the redaction path through the only check it has:
      // the error for a bad value elsewhere must not mention the password either.
      const result = yield* runProxy({ RABBITMQ_PASSWORD: "s3cret-value", RABBITMQ_PORT: "x" })
      assert.strictEqual(result.code, 1)
      assert.notInclude(result.stderr + result.stdout, "s3cret-value")
    }))

  it.live("RABBITMQ_QUEUE_TYPE=quorum: an existing classic queue is used as it is, with one warning naming it", () =>
    Effect.gen(function*() {
      const names = makeNames()
      const admin = yield* makeAdmin(names)
      yield* Effect.promise(() => admin.channel.assertQueue(names.validations, { durable: true }))
      const result = yield* runProxy(proxyEnv(names, { RABBITMQ_QUEUE_TYPE: "quorum" }), (kill) => kill())
      assert.strictEqual(result.code, 0, result.stderr)
      const warnings = result.stdout.split("\n").filter((l) => l.includes("queue exists with other arguments"))
      assert.strictEqual(warnings.length, 1, result.stdout)
      assert.include(warnings[0], names.validations)
      assert.include(warnings[0], `"difference":"PRECONDITION_FAILED - inequivalent arg`)
      assert.notInclude(result.stdout, "queue unavailable")
      // The others were declared as quorum queues: only a quorum declaration is accepted for them.
      const accepted = yield* Effect.promise(async () => {
        const channel = await admin.connection.createChannel()
        channel.on("error", () => undefined)
        return channel.assertQueue(names.schemas, {
          durable: true,
          arguments: { "x-queue-type": "quorum", "x-dead-letter-exchange": "", "x-dead-letter-routing-key": names.schemasDead }
        }).then(() => channel.close().then(() => true), () => false)
      })
      assert.isTrue(accepted)
    }))

  it.live("SIGTERM shuts down cleanly with exit code 0", () =>
    Effect.gen(function*() {
      const names = makeNames()
      const admin = yield* makeAdmin(names)
      const result = yield* runProxy(proxyEnv(names), (kill) => kill())
      assert.strictEqual(result.code, 0, result.stderr)
      assert.include(result.stdout, "gRPC server stopped", result.stdout.split("\n").filter((l) => !l.includes("unreachable")).join("\n"))
      yield* waitForQueue(admin, names.schemas, (q) => q.consumerCount === 0)
    }))

  it.live("SIGTERM ends open calls with UNAVAILABLE (a subscription whose client keeps its input open, a health Watch), requeues what is unsettled, and stops the server without waiting for the clients (issue 12)", () =>
    Effect.gen(function*() {
      const names = makeNames()
      const admin = yield* makeAdmin(names)
      yield* declareSchemasQueue(names, admin)
      for (const id of ["s-1", "s-2", "s-3"]) yield* publishJson(admin, names.exchange, "schemas.*", schemaBody(id))
      const statuses: Array<grpc.StatusObject> = []
      const watchStatuses: Array<grpc.StatusObject> = []
      const result = yield* runProxy(proxyEnv(names), (kill, stdout) => {
        const port = grpcPortOf(stdout)
        const client = new MessagingServiceClient(`127.0.0.1:${port}`, grpc.credentials.createInsecure())
        // Never half-closed: the client keeps its input open, as `(echo …; sleep 30) | buf curl` does.
        const subscription = client.subscribeSchemaMessages()
        subscription.on("error", () => undefined)
        subscription.on("status", (s: grpc.StatusObject) => statuses.push(s))
        // A health Watch never ends by itself either.
        const watch = new HealthClient(`127.0.0.1:${port}`, grpc.credentials.createInsecure()).watch({ service: "" })
        watch.on("data", () => undefined)
        watch.on("error", () => undefined)
        watch.on("status", (s: grpc.StatusObject) => watchStatuses.push(s))
        subscription.write({ action: { $case: "open", value: { maxInFlight: 10, consumerName: "", maxMessageBytes: 0, ackDeadlineSeconds: 0, maxDeliveriesPerEvent: 0 } } })
        let delivered = 0
        subscription.on("data", (e: SchemaSubscriptionEvent) => {
          // Kill once all three are held unsettled by this subscription.
          if (e.event?.$case === "delivery" && ++delivered === 3) kill()
        })
      }, "gRPC server listening")
      assert.strictEqual(result.code, 0, result.stderr)
      // Prompt, shown by the events rather than a clock: every call ended, so the server closed
      // its connections and stopped on its own, not at the shutdown timeout.
      assert.include(result.stdout, "gRPC server stopped", result.stdout.split("\n").filter((l) => !l.includes("unreachable")).join("\n"))
      assert.notInclude(result.stdout, "shutdown timeout reached")
      yield* Effect.callback<void>((resume) => {
        const check = () => statuses.length > 0 && watchStatuses.length > 0 ? resume(Effect.void) : setImmediate(check)
        check()
      })
      // The status itself, not the stream reset that follows it.
      assert.deepStrictEqual([statuses[0]?.code, statuses[0]?.details], [grpc.status.UNAVAILABLE, "messaging-proxy is shutting down"])
      assert.deepStrictEqual([watchStatuses[0]?.code, watchStatuses[0]?.details], [grpc.status.UNAVAILABLE, "messaging-proxy is shutting down"])
      const state = yield* waitForQueue(admin, names.schemas, (q) => q.consumerCount === 0 && q.messageCount === 3)
      assert.strictEqual(state.messageCount, 3, "the unsettled deliveries are back in the queue")
    }))

  it.live("a call that ends on its deadline is logged as such, a cancel as a cancel (issue 12)", () =>
    Effect.gen(function*() {
      const names = makeNames()
      yield* makeAdmin(names)
      let toCancel: grpc.ClientReadableStream<unknown> | undefined
      const endedLines = (stdout: string) => stdout.split("\n").filter((l) => /"(stream|subscription) ended"/.test(l))
      const result = yield* runProxy(proxyEnv(names), (_kill, stdout) => {
        const client = new MessagingServiceClient(`127.0.0.1:${grpcPortOf(stdout)}`, grpc.credentials.createInsecure())
        const onDeadline = { deadline: Date.now() + 1_000 }
        client.streamSchemaMessages({}, onDeadline).on("error", () => undefined)
        const subscription = client.subscribeSchemaMessages(onDeadline)
        subscription.on("error", () => undefined)
        subscription.write({ action: { $case: "open", value: { maxInFlight: 1, consumerName: "on-deadline", maxMessageBytes: 0, ackDeadlineSeconds: 0, maxDeliveriesPerEvent: 0 } } })
        toCancel = client.streamValidationMessages({})
        toCancel.on("error", () => undefined)
      }, "gRPC server listening", (stdout, kill) => {
        // Cancelled once its consumer is up, so the proxy sees a cancel, not a call that never began.
        if (stdout.includes(`"stream opened",{"queue":"${names.validations}"`)) toCancel?.cancel()
        if (endedLines(stdout).length === 3) kill()
      })
      assert.strictEqual(result.code, 0, result.stderr)
      const reasons = endedLines(result.stdout).map((line) => {
        const [, fields] = (JSON.parse(line) as { message: [string, { queue: string; reason: string }] }).message
        return `${fields.queue === names.validations ? "validations" : "schemas"}: ${fields.reason}`
      })
      assert.sameMembers(reasons, ["schemas: deadline exceeded", "schemas: deadline exceeded", "validations: client cancelled"])
    }))

  it.live("SIGTERM while the broker is unreachable, with a stream waiting for it, still exits 0 without the shutdown timeout", () =>
    Effect.gen(function*() {
      const names = makeNames()
      const closedPort = yield* freePort
      let killed = false
      const streamStatus = Deferred.makeUnsafe<grpc.StatusObject>()
      const result = yield* runProxy(
        proxyEnv(names, { RABBITMQ_PORT: String(closedPort) }),
        (_kill, stdout) => {
          // The stream waits for a broker channel that cannot come.
          const client = new MessagingServiceClient(`127.0.0.1:${grpcPortOf(stdout)}`, grpc.credentials.createInsecure())
          const stream = client.streamSchemaMessages({})
          stream.on("error", () => undefined)
          stream.on("status", (status: grpc.StatusObject) => Deferred.doneUnsafe(streamStatus, Exit.succeed(status)))
        },
        "gRPC server listening",
        (stdout, kill) => {
          if (!killed && stdout.includes('"stream opened"')) {
            killed = true
            kill()
          }
        }
      )
      assert.strictEqual(result.code, 0, result.stderr)
      // Prompt, shown by the events rather than a clock: the server stopped on its own.
      assert.include(result.stdout, "gRPC server stopped", result.stdout.split("\n").filter((l) => !l.includes("unreachable")).join("\n"))
      assert.notInclude(result.stdout, "shutdown timeout reached")
      const status = yield* Deferred.await(streamStatus)
      assert.strictEqual(status.code, grpc.status.UNAVAILABLE, status.details)
    }))
})

/** A port nothing listens on (bound, then released). */
const freePort = Effect.callback<number>((resume) => {
  const server = createServer()
  server.listen(0, "127.0.0.1", () => {
    const { port } = server.address() as AddressInfo
    server.close(() => resume(Effect.succeed(port)))
  })
})
