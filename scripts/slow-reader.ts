/**
 * Bounded memory under a slow reader: 50,000 messages queued, a client that takes one message per
 * 10 ms, first through StreamSchemaMessages, then through SubscribeSchemaMessages (acking each).
 * The proxy runs in this process; the heap is sampled after a forced GC every second and must stay
 * flat (the broker keeps the backlog, the proxy holds at most prefetch + what grpc-js buffers).
 *
 *   npm run slow-reader            (SLOW_N=50000 SLOW_SECONDS=20 by default)
 */
import { Effect } from "effect"
import type { SchemaMessageResponse, SchemaSubscriptionEvent } from "../gen/messaging.js"
import { schemaBody } from "../test/fixtures/bodies.js"
import { type Admin, grpcClient, makeAdmin, makeNames, startProxy, waitForQueue } from "../test/support/harness.js"

const total = Number(process.env["SLOW_N"] ?? 50_000)
const seconds = Number(process.env["SLOW_SECONDS"] ?? 20)
const readEveryMs = 10

const gc = (globalThis as { gc?: () => void }).gc
const heapMiB = () => {
  gc?.()
  return process.memoryUsage().heapUsed / 1024 / 1024
}

const publishBacklog = (admin: Admin, exchange: string) =>
  Effect.promise(async () => {
    for (let i = 0; i < total; i++) {
      const body = Buffer.from(JSON.stringify(schemaBody(`slow-${i}`)))
      if (!admin.channel.publish(exchange, "schemas.*", body, { persistent: true })) {
        await new Promise((resolve) => admin.channel.once("drain", resolve))
      }
      if (i % 5000 === 4999) await admin.channel.waitForConfirms()
    }
    await admin.channel.waitForConfirms()
  })

interface Sampled {
  readonly read: number
  readonly samples: Array<number>
}

/** Runs `reader` for `seconds`, sampling the heap every second. */
const sample = (start: (onRead: () => void) => () => void) =>
  Effect.callback<Sampled>((resume) => {
    let read = 0
    const samples = [heapMiB()]
    const stop = start(() => read++)
    const timer = setInterval(() => {
      samples.push(heapMiB())
      if (samples.length > seconds) {
        clearInterval(timer)
        stop()
        resume(Effect.succeed({ read, samples }))
      }
    }, 1000)
  })

const report = (name: string, { read, samples }: Sampled) => {
  const rest = samples.slice(2) // after warm-up
  const min = Math.min(...rest)
  const max = Math.max(...rest)
  console.log(
    `${name.padEnd(26)} read ${String(read).padStart(5)} msgs in ${seconds}s; heap after GC: ` +
      `start ${samples[0]!.toFixed(1)} MiB, min ${min.toFixed(1)}, max ${max.toFixed(1)}, ` +
      `last ${samples.at(-1)!.toFixed(1)} (spread ${(max - min).toFixed(1)} MiB)`
  )
  return { name, read, startMiB: samples[0], minMiB: min, maxMiB: max, lastMiB: samples.at(-1) }
}

const program = Effect.gen(function*() {
  if (!gc) console.log("(run with --expose-gc for exact figures)")
  const names = makeNames()
  const admin = yield* makeAdmin(names)
  const port = yield* startProxy(names, { MESSAGING_CONNECTION_DEBUG: "false" })
  const client = yield* grpcClient(port)
  yield* waitForQueue(admin, names.schemas)
  console.log(`publishing ${total} messages…`)
  yield* publishBacklog(admin, names.exchange)
  yield* waitForQueue(admin, names.schemas, (q) => q.messageCount === total)

  const streamResult = yield* sample((onRead) => {
    const call = client.streamSchemaMessages({})
    call.on("error", () => undefined)
    call.on("data", (_: SchemaMessageResponse) => {
      onRead()
      call.pause() // one message per 10 ms
      setTimeout(() => call.resume(), readEveryMs)
    })
    return () => call.cancel()
  })
  const subscriptionResult = yield* sample((onRead) => {
    const call = client.subscribeSchemaMessages()
    call.on("error", () => undefined)
    call.write({ action: { $case: "open", value: { maxInFlight: 32, consumerName: "slow-reader", maxMessageBytes: 0, ackDeadlineSeconds: 0, maxDeliveriesPerEvent: 0 } } })
    call.on("data", (event: SchemaSubscriptionEvent) => {
      if (event.event?.$case !== "delivery") return
      const id = event.event.value.info?.deliveryId ?? "0"
      call.pause()
      setTimeout(() => {
        onRead()
        call.write({ action: { $case: "ack", value: { deliveryIds: [id], ranges: [] } } })
        call.resume()
      }, readEveryMs)
    })
    return () => call.cancel()
  })
  const state = yield* waitForQueue(admin, names.schemas, (q) => q.consumerCount === 0)
  console.log(`backlog ${total} messages; ${total - state.messageCount} consumed; ${state.messageCount} left in the broker`)
  const results = [report("StreamSchemaMessages", streamResult), report("SubscribeSchemaMessages", subscriptionResult)]
  console.log(JSON.stringify({ total, seconds, readEveryMs, results }))
})

await Effect.runPromise(Effect.scoped(program))
