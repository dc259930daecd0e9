/**
 * Leak check: drains N messages through SubscribeSchemaMessages (acking in batches) and through
 * StreamSchemaMessages, several rounds, with the proxy in this process; prints the heap after a
 * forced GC after each round. Steady figures mean nothing accumulates per message or per call.
 *
 *   npm run build:tools && node --expose-gc dist/scripts/leak-check.js   (LEAK_N, LEAK_ROUNDS)
 */
import { Effect } from "effect"
import type { SchemaSubscriptionEvent } from "../gen/messaging.js"
import { schemaBody } from "../test/fixtures/bodies.js"
import { grpcClient, makeAdmin, makeNames, readMessages, startProxy, waitForQueue } from "../test/support/harness.js"

const n = Number(process.env["LEAK_N"] ?? 20_000)
const rounds = Number(process.env["LEAK_ROUNDS"] ?? 4)
const gc = (globalThis as { gc?: () => void }).gc
const heapMiB = () => {
  gc?.()
  gc?.()
  return (process.memoryUsage().heapUsed / 1024 / 1024).toFixed(1)
}

const program = Effect.gen(function*() {
  const names = makeNames()
  const admin = yield* makeAdmin(names)
  const port = yield* startProxy(names)
  const client = yield* grpcClient(port)
  yield* waitForQueue(admin, names.schemasDead)
  const publish = Effect.promise(async () => {
    for (let i = 0; i < n; i++) {
      admin.channel.publish(names.exchange, "schemas.*", Buffer.from(JSON.stringify(schemaBody(`l-${i}`))))
      if (i % 2000 === 1999) await admin.channel.waitForConfirms()
    }
    await admin.channel.waitForConfirms()
  })
  const subscribe = Effect.callback<void>((resume) => {
    const call = client.subscribeSchemaMessages()
    call.on("error", () => undefined)
    let received = 0
    let batch: Array<string> = []
    call.write({ action: { $case: "open", value: { maxInFlight: 32, consumerName: "leak", maxMessageBytes: 0, ackDeadlineSeconds: 0, maxDeliveriesPerEvent: 0 } } })
    call.on("data", (event: SchemaSubscriptionEvent) => {
      if (event.event?.$case !== "delivery") return
      batch.push(event.event.value.info?.deliveryId ?? "0")
      received++
      if (batch.length === 16 || received === n) {
        call.write({ action: { $case: "ack", value: { deliveryIds: batch, ranges: [] } } })
        batch = []
      }
      if (received === n) call.end()
    })
    call.on("status", () => resume(Effect.void))
  })
  console.log(`start: heap ${heapMiB()} MiB`)
  for (let round = 1; round <= rounds; round++) {
    yield* publish
    yield* subscribe
    yield* waitForQueue(admin, names.schemas, (q) => q.messageCount === 0 && q.consumerCount === 0)
    const afterSubscribe = heapMiB()
    yield* publish
    yield* readMessages(client.streamSchemaMessages({}), n)
    yield* waitForQueue(admin, names.schemas, (q) => q.messageCount === 0 && q.consumerCount === 0)
    console.log(`round ${round}: heap after ${n} subscribed ${afterSubscribe} MiB, after ${n} streamed ${heapMiB()} MiB`)
  }
})

await Effect.runPromise(Effect.scoped(program))
