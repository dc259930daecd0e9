/**
 * The three ways to drain a pre-filled queue: (a) a direct amqplib consumer, (b) the proxy's
 * StreamSchemaMessages, (c) the proxy's acknowledged SubscribeSchemaMessages. Each measures from
 * the moment it starts consuming until the N-th message has been received (and, for (a) and (c),
 * acked by the client), then stops consuming.
 */
import * as grpc from "@grpc/grpc-js"
import type * as amqp from "amqplib"
import {
  MessagingServiceClient,
  type SchemaDelivery,
  type SchemaMessageResponse,
  type SchemaSubscriptionEvent,
  type SubscriptionRequest
} from "../gen/messaging.js"
import { errorText, now, sleep } from "./util.js"

/** The server does not implement the RPC (yet). */
export class Unimplemented extends Error {}

export interface DrainOutcome {
  /** From the start of consuming to the N-th message. */
  readonly seconds: number
  /** performance.now() at start and at the N-th message (for profile windows). */
  readonly startedAt: number
  readonly finishedAt: number
  readonly received: number
  /** Messages whose body or id did not look right (should be 0). */
  readonly malformed: number
  /** (c) only: deliveries flagged redelivered, and ids the server refused to settle. */
  readonly redelivered?: number
  readonly settleErrors?: number
}

/**
 * A client on the proxy's port. grpc-js shares one HTTP/2 connection between all clients of a
 * target unless `ownConnection` gives the client a subchannel pool (so a connection) of its own.
 */
export const makeClient = async (port: number, options: { readonly ownConnection?: boolean } = {}): Promise<MessagingServiceClient> => {
  const client = new MessagingServiceClient(
    `127.0.0.1:${port}`,
    grpc.credentials.createInsecure(),
    options.ownConnection ? { "grpc.use_local_subchannel_pool": 1 } : {}
  )
  await new Promise<void>((resolve, reject) =>
    client.waitForReady(Date.now() + 10_000, (error) => (error ? reject(error) : resolve()))
  )
  return client
}

export const isServiceError = (error: unknown): error is grpc.ServiceError =>
  error instanceof Error && typeof Reflect.get(error, "code") === "number"

/**
 * Waits for `done`, failing when `progress()` has not moved for `stallMs` (a stuck drain must not
 * hang the whole benchmark).
 */
export const untilDone = async (done: Promise<void>, progress: () => number, stallMs: number, what: string) => {
  let finished = false
  done.then(() => { finished = true }, () => { finished = true })
  let last = progress()
  let lastChange = now()
  while (!finished) {
    await Promise.race([done, sleep(250)])
    if (finished) break
    const current = progress()
    if (current !== last) {
      last = current
      lastChange = now()
    } else if (now() - lastChange > stallMs) {
      throw new Error(`${what}: no progress for ${stallMs} ms (at ${current})`)
    }
  }
  await done
}

/** (a) A direct consumer on its own channel: manual ack, the given prefetch, JSON.parse of each body. */
export const drainDirect = async (
  connection: amqp.ChannelModel,
  queue: string,
  count: number,
  prefetch: number
): Promise<DrainOutcome> => {
  const channel = await connection.createChannel()
  channel.on("error", () => undefined)
  try {
    await channel.prefetch(prefetch)
    let received = 0
    let malformed = 0
    let finishedAt = 0
    let resolveDone: (() => void) | undefined
    let rejectDone: ((error: Error) => void) | undefined
    const done = new Promise<void>((resolve, reject) => {
      resolveDone = resolve
      rejectDone = reject
    })
    const startedAt = now()
    const { consumerTag } = await channel.consume(queue, (message) => {
      if (message === null) return rejectDone?.(new Error("consumer cancelled by the broker"))
      const body: unknown = JSON.parse(message.content.toString("utf8"))
      if (typeof body !== "object" || body === null || typeof Reflect.get(body, "id") !== "string") malformed++
      channel.ack(message)
      if (++received === count) {
        finishedAt = now()
        resolveDone?.()
      }
    }, { noAck: false })
    await untilDone(done, () => received, 15_000, "direct drain")
    await channel.cancel(consumerTag)
    return { seconds: (finishedAt - startedAt) / 1000, startedAt, finishedAt, received, malformed }
  } finally {
    await channel.close().catch(() => undefined)
  }
}

/** (b) One StreamSchemaMessages call, cancelled after `count` messages. */
export const drainStream = async (client: MessagingServiceClient, count: number): Promise<DrainOutcome> => {
  let received = 0
  let malformed = 0
  let finishedAt = 0
  let cancelledByUs = false
  const startedAt = now()
  const call = client.streamSchemaMessages({})
  const done = new Promise<void>((resolve, reject) => {
    call.on("data", (message: SchemaMessageResponse) => {
      if (message.id.length === 0 || message.schema === undefined) malformed++
      if (++received === count) {
        finishedAt = now()
        cancelledByUs = true
        call.cancel()
        resolve()
      }
    })
    call.on("error", (error: grpc.ServiceError) => {
      if (cancelledByUs && error.code === grpc.status.CANCELLED) return
      reject(new Error(`stream failed after ${received}: ${grpc.status[error.code]} ${error.details}`))
    })
    call.on("end", () => {
      if (!cancelledByUs) reject(new Error(`stream ended after ${received} of ${count}`))
    })
  })
  try {
    await untilDone(done, () => received, 15_000, "StreamSchemaMessages drain")
  } finally {
    cancelledByUs = true
    call.cancel()
  }
  return { seconds: (finishedAt - startedAt) / 1000, startedAt, finishedAt, received, malformed }
}

export interface SubscribeOptions {
  readonly maxInFlight: number
  /** Ack as soon as this many ids are pending; otherwise at the end of the current microtask. */
  readonly ackBatch: number
  /**
   * open.max_deliveries_per_event (BENCH_DELIVERIES_PER_EVENT, default max_in_flight; 1 = one
   * event per message). Acks go out as id ranges (every message is still acked by the client).
   */
  readonly maxDeliveriesPerEvent?: number
}

/** Ascending ids as inclusive ranges of consecutive ids. */
const asRanges = (ids: ReadonlyArray<string>): Array<{ first: string; last: string }> => {
  const ranges: Array<{ first: string; last: string }> = []
  for (const id of ids) {
    const previous = ranges.at(-1)
    if (previous !== undefined && BigInt(previous.last) + 1n === BigInt(id)) previous.last = id
    else ranges.push({ first: id, last: id })
  }
  return ranges
}

const unimplemented = (error: grpc.ServiceError) =>
  new Unimplemented(`SubscribeSchemaMessages: ${grpc.status[error.code]} ${error.details}`)

/**
 * (c) One SubscribeSchemaMessages call: `open`, then acks in batches (every `ackBatch` ids or on a
 * microtask), until `count` deliveries; then the last acks, a half-close, and a cancel if the
 * server has not ended the call within a second.
 */
export const drainSubscribe = async (
  client: MessagingServiceClient,
  count: number,
  options: SubscribeOptions
): Promise<DrainOutcome> => {
  let received = 0
  let malformed = 0
  let redelivered = 0
  let settleErrors = 0
  let finishedAt = 0
  let finishing = false
  let pending: Array<string> = []
  let flushScheduled = false
  const startedAt = now()
  const call = client.subscribeSchemaMessages()
  const send = (request: SubscriptionRequest) => {
    if (!call.writable) return
    call.write(request)
  }
  const flush = () => {
    flushScheduled = false
    if (pending.length === 0) return
    send({ action: { $case: "ack", value: { deliveryIds: [], ranges: asRanges(pending) } } })
    pending = []
  }
  const status = new Promise<grpc.StatusObject>((resolve) => call.once("status", resolve))
  let resolveDone: () => void = () => undefined
  const onDelivery = (delivery: SchemaDelivery) => {
    const info = delivery.info
    if (info === undefined || delivery.message === undefined || delivery.message.id.length === 0) malformed++
    if (info?.redelivered) redelivered++
    if (info !== undefined) pending.push(info.deliveryId)
    if (pending.length >= options.ackBatch) flush()
    else if (!flushScheduled) {
      flushScheduled = true
      queueMicrotask(flush)
    }
    if (++received === count) {
      finishedAt = now()
      resolveDone()
    }
  }
  const done = new Promise<void>((resolve, reject) => {
    resolveDone = resolve
    call.on("data", (event: SchemaSubscriptionEvent) => {
      const e = event.event
      if (e === undefined) return
      switch (e.$case) {
        case "opened":
          return
        case "settleError":
          settleErrors += e.value.deliveryIds.length
          return
        case "delivery":
          return onDelivery(e.value)
        case "deliveries":
          for (const delivery of e.value.deliveries) onDelivery(delivery)
          return
      }
    })
    call.on("error", (error: grpc.ServiceError) => {
      if (error.code === grpc.status.UNIMPLEMENTED) return reject(unimplemented(error))
      if (finishing && error.code === grpc.status.CANCELLED) return
      reject(new Error(`subscription failed after ${received}: ${grpc.status[error.code]} ${error.details}`))
    })
    call.on("end", () => {
      if (!finishing) reject(new Error(`subscription ended after ${received} of ${count}`))
    })
  })
  send({ action: { $case: "open", value: { maxInFlight: options.maxInFlight, consumerName: "bench", maxMessageBytes: 0, ackDeadlineSeconds: 0, maxDeliveriesPerEvent: options.maxDeliveriesPerEvent ?? options.maxInFlight } } })
  try {
    await untilDone(done, () => received, 15_000, "SubscribeSchemaMessages drain")
    flush()
    finishing = true
    call.end()
    await Promise.race([status, sleep(1_000)])
  } finally {
    finishing = true
    call.cancel()
  }
  return {
    seconds: (finishedAt - startedAt) / 1000,
    startedAt,
    finishedAt,
    received,
    malformed,
    redelivered,
    settleErrors
  }
}

export type Availability = { readonly available: true } | { readonly available: false; readonly reason: string }

/**
 * Whether the server implements SubscribeSchemaMessages: opens one on an empty queue and waits for
 * the first event (or an error) for up to `timeoutMs`. No event and no error counts as available.
 */
export const probeSubscribe = async (client: MessagingServiceClient, timeoutMs = 3_000): Promise<Availability> => {
  const call = client.subscribeSchemaMessages()
  let finishing = false
  const outcome = new Promise<Availability>((resolve) => {
    call.on("data", () => resolve({ available: true }))
    call.on("error", (error: grpc.ServiceError) => {
      if (finishing) return resolve({ available: true })
      resolve({
        available: false,
        reason: error.code === grpc.status.UNIMPLEMENTED ? "UNIMPLEMENTED" : `${grpc.status[error.code]}: ${error.details}`
      })
    })
  })
  call.write({ action: { $case: "open", value: { maxInFlight: 32, consumerName: "bench-probe", maxMessageBytes: 0, ackDeadlineSeconds: 0, maxDeliveriesPerEvent: 0 } } })
  try {
    return await Promise.race([outcome, sleep(timeoutMs).then((): Availability => ({ available: true }))])
  } catch (error) {
    return { available: false, reason: errorText(error) }
  } finally {
    finishing = true
    call.cancel()
  }
}
