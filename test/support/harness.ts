/**
 * Integration harness: a real proxy (the service's own Layer) on a free loopback port, against the
 * real broker, with names under a random prefix so concurrent runs never share a queue; plus an
 * amqplib admin channel (publish like the API, inspect queues) and a grpc-js client built from the
 * generated stubs. Everything declared is deleted when the test's scope closes.
 */
import { explainIfInterrupted } from "./waiting.js"
import * as grpc from "@grpc/grpc-js"
import * as amqp from "amqplib"
import { ConfigProvider, Context, Duration, Effect, Layer, type Scope } from "effect"
import { randomBytes } from "node:crypto"
import { MessagingServiceClient } from "../../gen/messaging.js"
import { ProxyLive } from "../../src/app.js"
import { delayQueueName } from "../../src/broker/delayQueues.js"
import { GrpcServer } from "../../src/grpcServer.js"

export const brokerUrl = process.env["TEST_AMQP_URL"] ?? "amqp://guest:guest@127.0.0.1:5672"

export interface TestNames {
  readonly prefix: string
  readonly exchange: string
  readonly schemas: string
  readonly validations: string
  readonly schemaResults: string
  readonly validationResults: string
  readonly schemasDead: string
  readonly validationsDead: string
}

/** Names under a random prefix (`test.<hex>` unless another kind of run is named). */
export const makeNames = (kind = "test"): TestNames => namesUnder(`${kind}.${randomBytes(4).toString("hex")}`)

/** The proxy's queue and exchange names under `prefix`, as the tests configure them. */
export const namesUnder = (prefix: string): TestNames => {
  return {
    prefix,
    exchange: `${prefix}.exchange`,
    schemas: `${prefix}.schemas.queue`,
    validations: `${prefix}.validations.queue`,
    schemaResults: `${prefix}.schemas.results.queue`,
    validationResults: `${prefix}.validation.results.queue`,
    schemasDead: `${prefix}.schemas.queue.dead`,
    validationsDead: `${prefix}.validations.queue.dead`
  }
}

/** MESSAGING_RETRY_DELAYS's default: the delay tiers a proxy declares unless told otherwise. */
const defaultRetryDelays = "1s,5s,30s,2m,10m,1h"

/** Every MESSAGING_RETRY_DELAYS a run's proxies were given, by prefix: their delay queues are deleted too. */
const retryDelaysUsed = new Map<string, Set<string>>()

const delayUnits: Record<string, number> = { ms: 1, s: 1_000, m: 60_000, h: 3_600_000 }

/** The delay queues a proxy with these tiers declares for the two consumed queues (see src/broker/delayQueues.ts). */
export const delayQueuesOf = (
  names: Pick<TestNames, "schemas" | "validations">,
  retryDelays = defaultRetryDelays
): Array<string> =>
  retryDelays.split(",").flatMap((part) => {
    const match = /^(\d+)(ms|s|m|h)$/.exec(part.trim())
    if (match === null) return []
    const tier = Duration.millis(Number(match[1]) * delayUnits[match[2]!]!)
    return [delayQueueName(names.schemas, tier), delayQueueName(names.validations, tier)]
  })

/** The environment a deployment would set, pointing the proxy at the test's own names. */
export const proxyEnv = (names: TestNames, extra: Record<string, string> = {}): Record<string, string> => {
  const delays = retryDelaysUsed.get(names.prefix) ?? new Set([defaultRetryDelays])
  delays.add(extra["MESSAGING_RETRY_DELAYS"] ?? defaultRetryDelays)
  retryDelaysUsed.set(names.prefix, delays)
  return proxyEnvOf(names, extra)
}

const proxyEnvOf = (names: TestNames, extra: Record<string, string>): Record<string, string> => ({
  MESSAGING_CONNECTION_HOST: "127.0.0.1",
  MESSAGING_CONNECTION_PORT: "0",
  METRICS_PORT: "0",
  RABBITMQ_HOST: "127.0.0.1",
  RABBITMQ_EXCHANGE: names.exchange,
  RABBITMQ_QUEUE_SCHEMAS: names.schemas,
  RABBITMQ_QUEUE_VALIDATIONS: names.validations,
  RABBITMQ_QUEUE_RESULTS_SCHEMAS: names.schemaResults,
  RABBITMQ_QUEUE_RESULTS_VALIDATIONS: names.validationResults,
  RABBITMQ_CONNECTION_NAME: `messaging-proxy ${names.prefix}`,
  ...extra
})

const promise = <A>(operation: string, f: () => Promise<A>) =>
  Effect.tryPromise({ try: f, catch: (cause) => new Error(`${operation}: ${String(cause)}`) })

export interface Admin {
  readonly connection: amqp.ChannelModel
  /** A confirm channel, as the API publishes with. */
  readonly channel: amqp.ConfirmChannel
}

/** An admin connection of the test's own, as the API service would have (to `url`: the shared broker by default). */
export const makeAdmin = (names: TestNames, url = brokerUrl): Effect.Effect<Admin, Error, Scope.Scope> =>
  Effect.gen(function*() {
    const connection = yield* Effect.acquireRelease(
      promise("admin connect", () => amqp.connect(url)),
      (c) => Effect.promise(() => c.close().catch(() => undefined))
    )
    connection.on("error", () => undefined)
    const channel = yield* promise("admin channel", () => connection.createConfirmChannel())
    channel.on("error", () => undefined)
    // Delete everything the run declared, whoever declared it.
    yield* Effect.addFinalizer(() =>
      Effect.promise(async () => {
        const cleanup = await connection.createChannel()
        cleanup.on("error", () => undefined)
        const queues = [
          names.schemas,
          names.validations,
          names.schemaResults,
          names.validationResults,
          names.schemasDead,
          names.validationsDead,
          ...[...retryDelaysUsed.get(names.prefix) ?? [defaultRetryDelays]].flatMap((delays) => delayQueuesOf(names, delays))
        ]
        for (const queue of queues) await cleanup.deleteQueue(queue).catch(() => undefined)
        await cleanup.deleteExchange(names.exchange).catch(() => undefined)
        await cleanup.close().catch(() => undefined)
      })
    )
    return { connection, channel }
  })

/** Publishes a body the way the API does: persistent, message_id = id, confirmed by the broker. */
export const publishJson = (admin: Admin, exchange: string, routingKey: string, body: unknown) =>
  publishRaw(admin, exchange, routingKey, Buffer.from(JSON.stringify(body)), {
    messageId: typeof body === "object" && body !== null && "id" in body ? String(body.id) : undefined
  })

export const publishRaw = (
  admin: Admin,
  exchange: string,
  routingKey: string,
  content: Buffer,
  options: amqp.Options.Publish = {}
) =>
  Effect.callback<void, Error>((resume) => {
    admin.channel.publish(exchange, routingKey, content, { persistent: true, ...options }, (error: unknown) => {
      resume(error == null ? Effect.void : Effect.fail(new Error(`publish: ${String(error)}`)))
    })
  })

/** messageCount and consumerCount, from a passive declare on a throwaway channel (a 404 closes it). */
export const queueState = (admin: Admin, queue: string) =>
  promise(`check ${queue}`, async () => {
    const probe = await admin.connection.createChannel()
    probe.on("error", () => undefined)
    try {
      return await probe.checkQueue(queue)
    } finally {
      await probe.close().catch(() => undefined)
    }
  })

/**
 * Polls until the queue satisfies `predicate` (no deadline of its own: see waiting.ts). A failed
 * check (the queue does not exist yet) is polled again too.
 */
export const waitForQueue = (
  admin: Admin,
  queue: string,
  predicate: (state: amqp.Replies.AssertQueue) => boolean = () => true
) => {
  let last: unknown
  return Effect.gen(function*() {
    while (true) {
      const state = yield* Effect.result(queueState(admin, queue))
      last = state
      if (state._tag === "Success" && predicate(state.success)) return state.success
      yield* Effect.sleep("5 millis")
    }
  }).pipe(explainIfInterrupted(`queue ${queue}`, () => last))
}

export class TestEnv extends Context.Service<TestEnv, {
  readonly names: TestNames
  readonly port: number
  readonly client: MessagingServiceClient
  readonly admin: Admin
}>()("test/TestEnv") {}

/** Starts the proxy in this process with the given extra env, inside the caller's scope. */
export const startProxy = (names: TestNames, extra: Record<string, string> = {}) =>
  Effect.gen(function*() {
    const scope = yield* Effect.scope
    const context = yield* Layer.buildWithScope(
      ProxyLive.pipe(Layer.provide(ConfigProvider.layer(ConfigProvider.fromUnknown(proxyEnv(names, extra))))),
      scope
    )
    return Context.get(context, GrpcServer).port
  })

export const grpcClient = (port: number) =>
  Effect.acquireRelease(
    Effect.sync(() => new MessagingServiceClient(`127.0.0.1:${port}`, grpc.credentials.createInsecure())),
    (client) => Effect.sync(() => client.close())
  )

/** Proxy + admin connection + client, once the proxy has declared its topology. */
export const makeTestEnv = (
  extra: Record<string, string> = {}
): Effect.Effect<TestEnv["Service"], Error, Scope.Scope> =>
  Effect.gen(function*() {
    const names = makeNames()
    const admin = yield* makeAdmin(names)
    const port = yield* startProxy(names, extra)
    const client = yield* grpcClient(port)
    // The last queue the proxy declares (one by one): the validations queue's largest delay tier.
    yield* waitForQueue(admin, delayQueuesOf(names, extra["MESSAGING_RETRY_DELAYS"]).at(-1) ?? names.validationsDead)
    return { names, port, client, admin }
  })

/**
 * Reads `count` messages from a server stream, then cancels it. Fails on a stream error or when
 * the stream ends early. Resolves with the messages in arrival order.
 */
export const readMessages = <A>(call: grpc.ClientReadableStream<A>, count: number) =>
  Effect.callback<Array<A>, Error>((resume) => {
    const received: Array<A> = []
    if (count === 0) {
      call.cancel()
      return resume(Effect.succeed(received))
    }
    let settled = false
    const settle = (effect: Effect.Effect<Array<A>, Error>) => {
      if (settled) return
      settled = true
      resume(effect)
    }
    call.on("data", (message: A) => {
      received.push(message)
      if (received.length === count) {
        call.cancel()
        settle(Effect.succeed(received))
      }
    })
    call.on("error", (error: grpc.ServiceError) => {
      if (settled && error.code === grpc.status.CANCELLED) return
      settle(Effect.fail(new Error(`stream failed after ${received.length}: ${error.code} ${error.details}`)))
    })
    call.on("end", () => settle(Effect.fail(new Error(`stream ended after ${received.length} of ${count}`))))
    return Effect.sync(() => call.cancel())
  })

/** A unary call as an Effect. */
export const unary = <Req, Res>(
  f: (request: Req, callback: (error: grpc.ServiceError | null, response: Res) => void) => grpc.ClientUnaryCall,
  request: Req
) =>
  Effect.callback<Res, grpc.ServiceError>((resume) => {
    f(request, (error, response) => resume(error ? Effect.fail(error) : Effect.succeed(response)))
  })

/** For calls the test cancels itself: grpc-js reports our own cancel as an 'error' event. */
export const quiet = <A>(call: grpc.ClientReadableStream<A>): grpc.ClientReadableStream<A> => {
  call.on("error", (error: grpc.ServiceError) => {
    if (error.code !== grpc.status.CANCELLED) throw error
  })
  return call
}
