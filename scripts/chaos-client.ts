/**
 * One consumer of the chaos run (see chaos.ts), as its own process so that it can be SIGKILLed.
 *
 *   node dist/scripts/chaos-client.js <port> [name] [maxInFlight] [holdMinMs] [holdMaxMs]
 *
 * Subscribes with SubscribeSchemaMessages, "processes" each delivery for a random hold time, acks
 * it and then prints one JSON line `{"id","deliveryId","redelivered","deliveryCount","call"}` to
 * stdout. Whenever the call fails (UNAVAILABLE while the proxy restarts, ...) it opens a new one
 * after a small backoff. Other lines on stdout carry an `event` field (call ended, settle error).
 *
 * Commands on stdin, one per line: `cancel` cancels the current call (a new one is opened at once);
 * `stop` acks what is held, half-closes the call and exits once the call has ended.
 *
 * stdout is written with a blocking writeSync on fd 1 (process.stdout is never touched, so the pipe
 * stays blocking): a line is in the kernel before the ack it reports can leave the process, so a
 * SIGKILL can never lose the line of an ack that went out.
 */
import * as grpc from "@grpc/grpc-js"
import { writeSync } from "node:fs"
import { createInterface } from "node:readline"
import {
  MessagingServiceClient,
  type SchemaDelivery,
  type SchemaSubscriptionEvent,
  type SubscriptionRequest
} from "../gen/messaging.js"

const argInt = (index: number, fallback: number): number => {
  const raw = process.argv[index]
  const value = raw === undefined ? Number.NaN : Number(raw)
  return Number.isFinite(value) ? value : fallback
}

const port = argInt(2, 0)
if (!(port > 0)) {
  process.stderr.write("usage: chaos-client <port> [name] [maxInFlight] [holdMinMs] [holdMaxMs]\n")
  process.exit(2)
}
const name = process.argv[3] ?? `chaos-client-${process.pid}`
const maxInFlight = argInt(4, 32)
const holdMin = argInt(5, 20)
const holdMax = Math.max(holdMin, argInt(6, 300))

/** Blocking write of whole lines to fd 1 (retrying if someone made the pipe non-blocking). */
const emit = (text: string): void => {
  const buffer = Buffer.from(text)
  let offset = 0
  while (offset < buffer.length) {
    try {
      offset += writeSync(1, buffer, offset)
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== "EAGAIN") throw error
    }
  }
}
const emitEvent = (event: Record<string, unknown>): void => emit(JSON.stringify({ event: event["event"], client: name, ...event }) + "\n")
const log = (text: string): void => void process.stderr.write(`[${new Date().toISOString()} ${name}] ${text}\n`)

const client = new MessagingServiceClient(`127.0.0.1:${port}`, grpc.credentials.createInsecure(), {
  // The proxy is restarted during the run: find it again quickly.
  "grpc.initial_reconnect_backoff_ms": 100,
  "grpc.min_reconnect_backoff_ms": 100,
  "grpc.max_reconnect_backoff_ms": 1000
})

interface Session {
  readonly number: number
  readonly call: grpc.ClientDuplexStream<SubscriptionRequest, SchemaSubscriptionEvent>
  /** False once the call is cancelled, half-closed or has a status: nothing is acked on it any more. */
  live: boolean
  /** How we ended it, if we did. */
  endedBy: "cancel" | "stop" | undefined
  delivered: number
  /** Deliveries being "processed" (their hold timer is running). */
  readonly held: Map<string, { delivery: SchemaDelivery; timer: NodeJS.Timeout }>
  /** Processed, to be acked at the next flush. */
  readonly ready: Array<SchemaDelivery>
  flushScheduled: boolean
}

let current: Session | undefined
let sessions = 0
let failuresInARow = 0
let stopping = false
let reopenTimer: NodeJS.Timeout | undefined

/** Acks what is ready on the session in one request, then reports each acked delivery. */
const flush = (session: Session): void => {
  session.flushScheduled = false
  if (session.ready.length === 0) return
  const batch = session.ready.splice(0)
  if (!session.live) return // the call is gone: these come back from the queue
  session.call.write({ action: { $case: "ack", value: { deliveryIds: batch.map((d) => d.info?.deliveryId ?? "0"), ranges: [] } } })
  emit(
    batch.map((d) =>
      JSON.stringify({
        id: d.message?.id ?? "",
        deliveryId: d.info?.deliveryId ?? "",
        redelivered: d.info?.redelivered ?? false,
        deliveryCount: d.info?.deliveryCount ?? 0,
        call: session.number
      }) + "\n"
    ).join("")
  )
}

const processed = (session: Session, deliveryId: string): void => {
  const entry = session.held.get(deliveryId)
  if (entry === undefined) return
  session.held.delete(deliveryId)
  session.ready.push(entry.delivery)
  if (!session.flushScheduled) {
    session.flushScheduled = true
    setImmediate(() => flush(session))
  }
}

const retire = (session: Session): void => {
  session.live = false
  for (const { timer } of session.held.values()) clearTimeout(timer)
  session.held.clear()
  session.ready.length = 0
}

const scheduleReopen = (): void => {
  if (stopping || reopenTimer !== undefined) return
  const base = Math.min(1000, 50 * 2 ** Math.min(failuresInARow, 5))
  const delay = Math.round(base / 2 + Math.random() * base / 2)
  failuresInARow++
  reopenTimer = setTimeout(() => {
    reopenTimer = undefined
    open()
  }, delay)
}

const open = (): void => {
  if (stopping) return
  const call = client.subscribeSchemaMessages()
  const session: Session = {
    number: ++sessions,
    call,
    live: true,
    endedBy: undefined,
    delivered: 0,
    held: new Map(),
    ready: [],
    flushScheduled: false
  }
  current = session
  /** Holds a delivery for a random while, as a worker would, then acks it. */
  const hold = (session: Session, delivery: SchemaDelivery) => {
    session.delivered++
    const deliveryId = delivery.info?.deliveryId ?? "0"
    const holdFor = holdMin + Math.random() * (holdMax - holdMin)
    const timer = setTimeout(() => processed(session, deliveryId), holdFor)
    session.held.set(deliveryId, { delivery, timer })
  }
  call.on("data", (event: SchemaSubscriptionEvent) => {
    if (!session.live) return
    const e = event.event
    if (e?.$case === "opened") failuresInARow = 0
    else if (e?.$case === "delivery") hold(session, e.value)
    else if (e?.$case === "deliveries") {
      for (const delivery of e.value.deliveries) hold(session, delivery)
    } else if (e?.$case === "settleError") {
      emitEvent({ event: "settleError", call: session.number, ids: e.value.deliveryIds, reason: e.value.reason })
    }
  })
  call.on("error", () => undefined) // the status event carries it
  call.on("status", (status: grpc.StatusObject) => {
    retire(session)
    emitEvent({
      event: "callEnded",
      call: session.number,
      code: grpc.status[status.code] ?? String(status.code),
      details: status.details,
      delivered: session.delivered,
      endedBy: session.endedBy ?? "server"
    })
    if (current === session) current = undefined
    if (stopping) finish()
    else scheduleReopen()
  })
  call.write({ action: { $case: "open", value: { maxInFlight, consumerName: `${name}.${session.number}`, maxMessageBytes: 0, ackDeadlineSeconds: 0,
    // Every other session takes ready deliveries several to an event: both paths get the faults.
    maxDeliveriesPerEvent: session.number % 2 === 0 ? maxInFlight : 0 } } })
}

const cancelCurrent = (): void => {
  const session = current
  if (session === undefined) return
  emitEvent({ event: "cancelling", call: session.number, held: session.held.size + session.ready.length })
  session.endedBy = "cancel"
  retire(session)
  session.call.cancel()
}

let finished = false
const finish = (): void => {
  if (finished) return
  finished = true
  client.close()
  // Give stderr a moment; stdout is written synchronously.
  setTimeout(() => process.exit(0), 20)
}

const stop = (): void => {
  if (stopping) return
  stopping = true
  if (reopenTimer !== undefined) clearTimeout(reopenTimer)
  const session = current
  if (session === undefined || !session.live) return finish()
  // Ack everything held now, then half-close: the proxy ends the call with OK.
  for (const [id, { timer }] of session.held) {
    clearTimeout(timer)
    processed(session, id)
  }
  flush(session)
  // Deliveries that still arrive are not acked: they go back to the queue when the call ends.
  session.endedBy = "stop"
  retire(session)
  session.call.end()
  setTimeout(() => {
    log("no status 5 s after half-close; exiting")
    finish()
  }, 5_000).unref()
}

createInterface({ input: process.stdin }).on("line", (line) => {
  const command = line.trim()
  if (command === "cancel") cancelCurrent()
  else if (command === "stop") stop()
  else if (command !== "") log(`unknown command ${JSON.stringify(command)}`)
}).on("close", () => {
  // The parent went away: do not linger.
  if (!stopping) stop()
})

process.on("SIGTERM", stop)
open()
