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
      assert.include(result.stdout, "gRPC server stopped")
      yield* waitForQueue(admin, names.schemas, (q) => q.consumerCount === 0)
    }))

  it.live("SIGTERM ends open calls with UNAVAILABLE, requeues what is unsettled, exits 0", () =>
    Effect.gen(function*() {
      const names = makeNames()
      const admin = yield* makeAdmin(names)
      yield* declareSchemasQueue(names, admin)
      for (const id of ["s-1", "s-2", "s-3"]) yield* publishJson(admin, names.exchange, "schemas.*", schemaBody(id))
      const statuses: Array<grpc.StatusObject> = []
      const result = yield* runProxy(proxyEnv(names), (kill, stdout) => {
        const port = grpcPortOf(stdout)
        const client = new MessagingServiceClient(`127.0.0.1:${port}`, grpc.credentials.createInsecure())
        const subscription = client.subscribeSchemaMessages()
        subscription.on("error", () => undefined)
        subscription.on("status", (s: grpc.StatusObject) => statuses.push(s))
        subscription.write({ action: { $case: "open", value: { maxInFlight: 10, consumerName: "", maxMessageBytes: 0, ackDeadlineSeconds: 0 } } })
        let delivered = 0
        subscription.on("data", (e: SchemaSubscriptionEvent) => {
          // Kill once all three are held unsettled by this subscription.
          if (e.event?.$case === "delivery" && ++delivered === 3) kill()
        })
      }, "gRPC server listening")
      assert.strictEqual(result.code, 0, result.stderr)
      yield* Effect.callback<void>((resume) => {
        const check = () => statuses.length > 0 ? resume(Effect.void) : setImmediate(check)
        check()
      })
      assert.strictEqual(statuses[0]?.code, grpc.status.UNAVAILABLE)
      assert.strictEqual(statuses[0]?.details, "messaging-proxy is shutting down")
      const state = yield* waitForQueue(admin, names.schemas, (q) => q.consumerCount === 0 && q.messageCount === 3)
      assert.strictEqual(state.messageCount, 3, "the unsettled deliveries are back in the queue")
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
      assert.include(result.stdout, "gRPC server stopped")
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
