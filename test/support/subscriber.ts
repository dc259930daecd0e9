/** A test-side subscriber: a bidi call whose events land in a queue the test takes from. */
import { explainIfInterrupted } from "./waiting.js"
import * as grpc from "@grpc/grpc-js"
import { Cause, Effect, Queue, type Scope } from "effect"
import type {
  MessagingServiceClient,
  SchemaDelivery,
  SchemaSubscriptionEvent,
  SubscriptionRequest
} from "../../gen/messaging.js"

export interface Subscriber {
  readonly call: grpc.ClientDuplexStream<SubscriptionRequest, SchemaSubscriptionEvent>
  /** The next event (no deadline of its own: waiting.ts); fails if the call ends first. */
  readonly next: () => Effect.Effect<SchemaSubscriptionEvent, Error>
  /** The next `count` deliveries (other events are skipped). */
  readonly deliveries: (count: number) => Effect.Effect<Array<SchemaDelivery>, Error>
  readonly send: (request: SubscriptionRequest) => Effect.Effect<void>
  readonly ack: (...ids: Array<string>) => Effect.Effect<void>
  readonly nack: (...ids: Array<string>) => Effect.Effect<void>
  /** Waits until the server has handled every request sent so far. */
  readonly settled: Effect.Effect<void, Error>
  /** Resolves with the call's final status. */
  readonly status: Effect.Effect<grpc.StatusObject>
}

export const subscribeSchemas = (
  client: MessagingServiceClient,
  /** null: send no `open` (to test refusals). */
  open: { maxInFlight?: number; consumerName?: string; maxMessageBytes?: number; ackDeadlineSeconds?: number; maxDeliveriesPerEvent?: number } | null = {}
): Effect.Effect<Subscriber, never, Scope.Scope> =>
  Effect.gen(function*() {
    const events = yield* Queue.unbounded<SchemaSubscriptionEvent, Cause.Done>()
    const call = yield* Effect.acquireRelease(
      Effect.sync(() => client.subscribeSchemaMessages()),
      (call) => Effect.sync(() => call.cancel())
    )
    let finalStatus: grpc.StatusObject | undefined
    const statusWaiters: Array<(s: grpc.StatusObject) => void> = []
    call.on("data", (event: SchemaSubscriptionEvent) => Queue.offerUnsafe(events, event))
    call.on("error", () => undefined) // the status event carries it
    call.on("status", (status: grpc.StatusObject) => {
      finalStatus = status
      Queue.endUnsafe(events)
      statusWaiters.forEach((f) => f(status))
    })
    const send = (request: SubscriptionRequest) => Effect.sync(() => void call.write(request))
    if (open !== null) {
      yield* send({ action: { $case: "open", value: {
          maxInFlight: open.maxInFlight ?? 0,
          consumerName: open.consumerName ?? "",
          maxMessageBytes: open.maxMessageBytes ?? 0,
          ackDeadlineSeconds: open.ackDeadlineSeconds ?? 0,
          maxDeliveriesPerEvent: open.maxDeliveriesPerEvent ?? 0
        } } })
    }
    let lastEvent: SchemaSubscriptionEvent | undefined
    const next = () =>
      Queue.take(events).pipe(
        Effect.tap((event) => Effect.sync(() => { lastEvent = event })),
        Effect.catchIf(Cause.isDone, () => Effect.fail(new Error(`call ended: ${JSON.stringify(finalStatus)}`))),
        explainIfInterrupted("a subscription event", () => ({ lastEvent, finalStatus }))
      )
    const deliveries = (count: number) =>
      Effect.gen(function*() {
        const found: Array<SchemaDelivery> = []
        while (found.length < count) {
          const event = yield* next()
          if (event.event?.$case === "delivery") found.push(event.event.value)
          if (event.event?.$case === "deliveries") found.push(...event.event.value.deliveries)
        }
        return found
      })
    return {
      call,
      next,
      deliveries,
      send,
      ack: (...ids) => send({ action: { $case: "ack", value: { deliveryIds: ids, ranges: [] } } }),
      nack: (...ids) => send({ action: { $case: "nack", value: { deliveryIds: ids, ranges: [] } } }),
      settled: Effect.gen(function*() {
        // Requests are handled in order, so the answer to a bogus ack means all before it are done.
        yield* send({ action: { $case: "ack", value: { deliveryIds: ["0"], ranges: [] } } })
        while (true) {
          const event = yield* next()
          if (event.event?.$case === "settleError" && event.event.value.deliveryIds.includes("0")) return
        }
      }),
      status: Effect.callback<grpc.StatusObject>((resume) => {
        if (finalStatus) resume(Effect.succeed(finalStatus))
        else statusWaiters.push((s) => resume(Effect.succeed(s)))
      })
    }
  })

export const idsOf = (deliveries: ReadonlyArray<SchemaDelivery>): Array<string> =>
  deliveries.map((d) => d.info?.deliveryId ?? "?")
