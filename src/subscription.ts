/**
 * Acknowledged subscriptions: a bidi call where the client settles each delivery by id. Nothing is
 * acked on the broker until the client says so, so a client crash, a cancel, a proxy restart or a
 * broker cut loses nothing: whatever is unsettled when the call or the channel ends is requeued.
 *
 * Flow control is the channel's prefetch (the client's max_in_flight): the broker stops pushing
 * once that many deliveries are unsettled, so the proxy holds at most that many per subscription.
 */
import * as grpc from "@grpc/grpc-js"
import { Cause, Duration, Effect, Exit, Fiber, FiberSet, Option, Queue, Schedule, Stream } from "effect"
import type { DeliveryInfo, DeliveryRange, SettleError, SubscriptionOpened, SubscriptionRequest } from "../gen/messaging.js"
import type { Broker } from "./broker/Broker.js"
import { batchWrites, CallRejected, finishCall, writeAllWithBackpressure, writeWithBackpressure } from "./callLifecycle.js"
import { brokerCancelled, brokerConsumerTimeout, type Delivery } from "./consumer.js"
import { requeueDelayed } from "./delayedRequeue.js"
import * as Metrics from "./metrics.js"
import { deliveryEnvelopeBytes, EncodedDeliveries, EncodedDelivery } from "./serialization.js"
import { endSpan, startDeliverySpan, type StartedSpan, type Tracing } from "./tracing.js"
import { type Admitted, type AdmissionPolicy, admittedDeliveries, deadLetteredIn, requeueCounted, requeueCountOf } from "./redelivery.js"

/** The event shape both subscription RPCs share (SchemaSubscriptionEvent, ValidationSubscriptionEvent). */
export interface SubscriptionEvent<A> {
  event?:
    | { $case: "opened"; value: SubscriptionOpened }
    | { $case: "delivery"; value: { info?: DeliveryInfo | undefined; message?: A | undefined } }
    | { $case: "settleError"; value: SettleError }
    | { $case: "deliveries"; value: { deliveries: Array<{ info?: DeliveryInfo | undefined; message?: A | undefined }> } }
    | undefined
}

export interface SubscriptionSpec extends AdmissionPolicy {
  readonly deadLetterQueue: string
  /** A span per delivery while tracing is on (tracing.ts). */
  readonly tracing: Tracing["Service"]
  readonly defaultMaxInFlight: number
  /** The most a client may ask for: what one subscription may make the proxy hold. */
  readonly maxInFlightLimit: number
  /** The size limit of a subscription whose `open` states none (GRPC_CLIENT_MAX_RECEIVE_MESSAGE_BYTES). */
  readonly defaultClientMaxMessageBytes: number
  /** What grpc-js may send at all (GRPC_MAX_MESSAGE_BYTES): the most `open` may ask for. */
  readonly serverMaxMessageBytes: number
  /** MESSAGING_ACK_DEADLINE_SECONDS: the deadline of a subscription whose `open` states none. */
  readonly ackDeadline: Duration.Duration
  /** MESSAGING_MAX_ACK_DEADLINE_SECONDS: the longest deadline or extension. */
  readonly maxAckDeadline: Duration.Duration
  /** MESSAGING_RETRY_DELAYS, for `nack_delayed`. */
  readonly retryDelays: ReadonlyArray<Duration.Duration>
  /** MESSAGING_NACK_BACKOFF: when set, plain nacks are delayed too, growing with the requeues. */
  readonly nackBackoff: Option.Option<{ readonly first: Duration.Duration; readonly factor: number }>
  /** The consumers' `x-consumer-timeout`, in milliseconds: above the longest lease. */
  readonly consumerTimeoutMs: number
}

/** Expired ids remembered to answer a late settle precisely (older ones read as unknown). */
const expiredIdsKept = 10_000

/** Smallest `max_message_bytes` worth having: a settle_error and an envelope must fit. */
const minMessageBytes = 256

const consumerNameLimit = 128

type SubscriptionCall<A> = grpc.ServerDuplexStream<SubscriptionRequest, SubscriptionEvent<A>>


/** Requests buffered before the call stops reading (HTTP/2 flow control then holds the client). */
const requestBuffer = 64

/**
 * Requests as they arrive, ending when the client half-closes. Reading pauses while `requestBuffer`
 * requests wait, so a client that floods requests (and never reads our answers) cannot grow memory.
 *
 * `handleInline` installs a handler tried on each request as it arrives, when no earlier request
 * is still waiting or being handled (so requests are still handled in order); it returns whether
 * it handled the request. A plain ack then settles in the tick it arrives, without a fiber hop.
 */
const incomingRequests = (call: SubscriptionCall<unknown>) =>
  Effect.gen(function*() {
    const requests = yield* Queue.unbounded<SubscriptionRequest, Cause.Done>()
    let inline: ((request: SubscriptionRequest) => boolean) | undefined
    /** Offered to `requests` and not yet handled to the end. */
    let outstanding = 0
    call.on("data", (request: SubscriptionRequest) => {
      if (outstanding === 0 && inline !== undefined && inline(request)) return
      outstanding++
      Queue.offerUnsafe(requests, request)
      if (Queue.sizeUnsafe(requests) >= requestBuffer) call.pause()
    })
    call.on("end", () => Queue.endUnsafe(requests))
    call.on("error", () => Queue.endUnsafe(requests))
    const handled = (count: number) =>
      Effect.sync(() => {
        outstanding -= count
        if (call.isPaused() && Queue.sizeUnsafe(requests) < requestBuffer / 2) call.resume()
      })
    return {
      first: Queue.take(requests).pipe(Effect.option, Effect.tap((request) => request._tag === "Some" ? handled(1) : Effect.void)),
      /** Handles what has arrived since the last take, as one array, until the client half-closes. */
      handleEach: <E, R>(handle: (batch: ReadonlyArray<SubscriptionRequest>) => Effect.Effect<void, E, R>) =>
        Stream.fromQueue(requests).pipe(
          Stream.runForEachArray((batch) => Effect.andThen(handle(batch), handled(batch.length)))
        ),
      handleInline: (handler: (request: SubscriptionRequest) => boolean) => {
        inline = handler
      }
    }
  })

const openOptions = (
  request: SubscriptionRequest | undefined,
  spec: Pick<
    SubscriptionSpec,
    | "defaultMaxInFlight"
    | "maxInFlightLimit"
    | "defaultClientMaxMessageBytes"
    | "serverMaxMessageBytes"
    | "ackDeadline"
    | "maxAckDeadline"
  >
) => {
  const { defaultMaxInFlight, maxInFlightLimit } = spec
  if (request?.action?.$case !== "open") {
    return Effect.fail(new CallRejected(grpc.status.INVALID_ARGUMENT, "the first message must be `open`"))
  }
  const { maxInFlight, consumerName, maxMessageBytes, ackDeadlineSeconds, maxDeliveriesPerEvent } = request.action.value
  const maxDeadlineSeconds = Math.floor(Duration.toSeconds(spec.maxAckDeadline))
  if (ackDeadlineSeconds > maxDeadlineSeconds) {
    return Effect.fail(
      new CallRejected(
        grpc.status.INVALID_ARGUMENT,
        `ack_deadline_seconds must be at most ${maxDeadlineSeconds} (MESSAGING_MAX_ACK_DEADLINE_SECONDS), got ${ackDeadlineSeconds}`
      )
    )
  }
  // Only upwards: a message over the limit is dead-lettered out of the queue every subscriber
  // shares, so one client's smaller limit must not take messages its peers can read.
  const floor = Math.max(minMessageBytes, Math.min(spec.defaultClientMaxMessageBytes, spec.serverMaxMessageBytes))
  if (maxMessageBytes !== 0 && (maxMessageBytes < floor || maxMessageBytes > spec.serverMaxMessageBytes)) {
    return Effect.fail(
      new CallRejected(
        grpc.status.INVALID_ARGUMENT,
        `max_message_bytes must be 0 (the server default) or between ${floor} (GRPC_CLIENT_MAX_RECEIVE_MESSAGE_BYTES) and ${spec.serverMaxMessageBytes} (GRPC_MAX_MESSAGE_BYTES), got ${maxMessageBytes}`
      )
    )
  }
  if (maxInFlight > maxInFlightLimit) {
    return Effect.fail(
      new CallRejected(
        grpc.status.INVALID_ARGUMENT,
        `max_in_flight must be at most ${maxInFlightLimit} (MESSAGING_MAX_IN_FLIGHT), got ${maxInFlight}`
      )
    )
  }
  // The AMQP consumer tag (name + suffix) is a short string: at most 255 bytes.
  if (Buffer.byteLength(consumerName) > consumerNameLimit || /[\u0000-\u001f]/.test(consumerName)) {
    return Effect.fail(
      new CallRejected(
        grpc.status.INVALID_ARGUMENT,
        `consumer_name must be at most ${consumerNameLimit} bytes of printable characters`
      )
    )
  }
  const limit = maxMessageBytes !== 0
    ? { bytes: maxMessageBytes, source: "the subscription's max_message_bytes" }
    : spec.defaultClientMaxMessageBytes <= spec.serverMaxMessageBytes
    ? { bytes: spec.defaultClientMaxMessageBytes, source: "GRPC_CLIENT_MAX_RECEIVE_MESSAGE_BYTES" }
    : { bytes: spec.serverMaxMessageBytes, source: "GRPC_MAX_MESSAGE_BYTES" }
  const inFlight = maxInFlight === 0 ? defaultMaxInFlight : maxInFlight
  return Effect.succeed({
    maxInFlight: inFlight,
    consumerName,
    limit,
    ackDeadlineSeconds: ackDeadlineSeconds === 0 ? Math.ceil(Duration.toSeconds(spec.ackDeadline)) : ackDeadlineSeconds,
    // More than max_in_flight can never be ready at once.
    maxDeliveriesPerEvent: Math.max(1, Math.min(maxDeliveriesPerEvent, inFlight))
  })
}

export const serveSubscription = <A>(
  call: SubscriptionCall<A>,
  spec: SubscriptionSpec
): Effect.Effect<void, never, Broker> => {
  const counts = { delivered: 0, acked: 0, requeued: 0, deadLettered: 0 }
  // Known once `open` arrives; kept out here so the final log line carries it too.
  const opened = { consumerName: "" }
  const rpc = Metrics.rpcName(call)
  // Deliveries go out around the bytes encoded at admission (see serialization.ts).
  const outgoing = call as unknown as grpc.ServerDuplexStream<unknown, SubscriptionEvent<A> | EncodedDelivery | EncodedDeliveries>
  const write = (event: SubscriptionEvent<A>) => writeWithBackpressure(outgoing, event)
  batchWrites(outgoing)

  const program = Effect.gen(function*() {
    const requests = yield* incomingRequests(call as SubscriptionCall<unknown>)
    const first = yield* requests.first
    // A client that half-closes before opening simply gets an empty, successful call.
    if (first._tag === "None") return
    const { maxInFlight, consumerName, limit, ackDeadlineSeconds, maxDeliveriesPerEvent } = yield* openOptions(first.value, spec)
    const envelopeBytes = deliveryEnvelopeBytes(spec.tracing.enabled)
    opened.consumerName = consumerName
    // Who settled, in requeue histories and dead-letter headers.
    const subscriber = consumerName || "a subscriber"
    /** Where a counted requeue of the subscription's went: the message's queue, or past the limit `.dead`. */
    const tally = (outcome: "Requeued" | "DeadLettered") => {
      if (outcome === "Requeued") counts.requeued++
      else counts.deadLettered++
    }
    /** A client's nack (plain or delayed) done: tallied, and counted as a nack when requeued. */
    const nacked = (outcome: "Requeued" | "DeadLettered") => {
      if (outcome === "Requeued") Metrics.nackedUnsafe(spec.queue)
      tally(outcome)
      return true
    }
    yield* Effect.annotateLogsScoped({ consumerName })
    yield* Effect.logInfo("subscription opened", { queue: spec.queue, maxInFlight, ackDeadlineSeconds })
    yield* write({
      event: { $case: "opened", value: { maxInFlight, consumerName, maxMessageBytes: limit.bytes, ackDeadlineSeconds, maxDeliveriesPerEvent } }
    })

    // Unsettled deliveries by id. Ids are ours, not AMQP delivery tags, so they stay unique
    // across the channels a subscription goes through when the broker connection is re-made.
    const pending = new Map<string, Delivery>()
    /** Each pending delivery's ack deadline (epoch ms): past it the proxy hands it back itself. */
    const deadlines = new Map<string, number>()
    const ackDeadlineMs = ackDeadlineSeconds * 1000
    const maxAckDeadlineMs = Duration.toMillis(spec.maxAckDeadline)
    /** Ids handed back by the proxy, and why: a late settle of one gets that reason. */
    const gone = new Map<string, string>()
    const remember = (id: string, reason: string) => {
      gone.set(id, reason)
      if (gone.size > expiredIdsKept) gone.delete(gone.keys().next().value!)
    }
    const forget = (id: string) => {
      pending.delete(id)
      deadlines.delete(id)
    }
    let nextId = 1n
    /**
     * The highest delivery id the client settled: it had read every delivery up to it (a gRPC
     * stream is ordered). What lies beyond it and the one after it may never have been read.
     */
    let highestSettled = 0n
    /**
     * settle_error events to send from outside the request handler (ids voided by a channel the
     * broker's consumer timeout closed, acks settled inline): sent in order by one fiber.
     */
    const reports = yield* Queue.unbounded<Effect.Effect<void>>()

    const pump = admittedDeliveries({
      queue: spec.queue,
      prefetch: maxInFlight,
      deadLetterQueue: spec.deadLetterQueue,
      consumerTag: consumerName ? `${consumerName}.${crypto.randomUUID().slice(0, 8)}` : undefined,
      consumerArguments: { "x-consumer-timeout": spec.consumerTimeoutMs },
      // The broker's consumer timeout closed the channel anyway (a broker before 3.12 ignores the
      // argument, or one set lower): what it held is back in the queue, its ids are void.
      onReattach: (error) => {
        if (!(brokerConsumerTimeout(error) || brokerCancelled(error)) || pending.size === 0) return
        const ids = [...pending.keys()]
        const reason = brokerConsumerTimeout(error)
          ? `the broker's consumer timeout closed the subscription's channel (${error.message}); the delivery went back to the queue`
          : `the broker cancelled the subscription's consumer (RabbitMQ 4.3's consumer timeout, or the queue went away: ${error.message}); the delivery went back to the queue`
        for (const id of ids) {
          forget(id)
          remember(id, reason)
        }
        Queue.offerUnsafe(reports, settleError(ids, reason))
      }
    }, {
      ...spec,
      // A delivery event is the message plus its envelope; the whole must fit the client's limit.
      maxEncodedBytes: limit.bytes - envelopeBytes,
      maxEncodedBytesSource: limit.source
    }).pipe(
      Stream.runForEachArray((admissions) => {
        counts.deadLettered += deadLetteredIn(admissions)
        /** Registers a delivery as pending and gives its event part; its span ends with `end`. */
        const prepare = (admitted: Admitted) => {
          const { delivery, deliveryCount, redelivered, encoded } = admitted
          const deliveryId = String(nextId++)
          pending.set(deliveryId, delivery)
          deadlines.set(deliveryId, Date.now() + ackDeadlineMs)
          counts.delivered++
          Metrics.deliveredUnsafe(spec.queue, rpc)
          const traced = startDeliverySpan(spec.tracing, spec.queue, delivery.message, deliveryCount)
          return { part: new EncodedDelivery({ deliveryId, redelivered, deliveryCount }, encoded, traced?.context), span: traced?.span }
        }
        if (maxDeliveriesPerEvent === 1) {
          return writeAllWithBackpressure(outgoing, admissions, (admission) => {
            if (admission._tag === "DeadLettered") return true
            const { part, span } = prepare(admission.admitted)
            const accepted = outgoing.write(part)
            endSpan(span)
            return accepted
          })
        }
        // Ready deliveries in events of up to maxDeliveriesPerEvent, each event within the client's limit.
        const events: Array<EncodedDeliveries> = []
        let current: Array<EncodedDelivery> = []
        let bytes = 0
        const spans: Array<StartedSpan | undefined> = []
        for (const admission of admissions) {
          if (admission._tag === "DeadLettered") continue
          const { part, span } = prepare(admission.admitted)
          spans.push(span)
          const size = part.message.byteLength + envelopeBytes
          if (current.length > 0 && (current.length === maxDeliveriesPerEvent || bytes + size > limit.bytes)) {
            events.push(new EncodedDeliveries(current))
            current = []
            bytes = 0
          }
          current.push(part)
          bytes += size
        }
        if (current.length > 0) events.push(new EncodedDeliveries(current))
        return writeAllWithBackpressure(outgoing, events, (event) => outgoing.write(event)).pipe(
          Effect.ensuring(Effect.sync(() => {
            for (const span of spans) endSpan(span)
          }))
        )
      })
    )

    /**
     * Reports ids that could not be settled, as many per event as fit the message size limit
     * (at most 10 bytes each, plus room for the reason): acks merged from many requests must not
     * add up to an event grpc-js would refuse.
     */
    const settleErrorIds = Math.max(1, Math.floor((limit.bytes - envelopeBytes - 256) / 10))
    const settleError = (deliveryIds: Array<string>, reason: string) =>
      Effect.forEach(
        Array.from({ length: Math.ceil(deliveryIds.length / settleErrorIds) }, (_, i) =>
          deliveryIds.slice(i * settleErrorIds, (i + 1) * settleErrorIds)),
        (ids) => write({ event: { $case: "settleError", value: { deliveryIds: ids, reason } } }),
        { discard: true }
      )

    /** Tells the client why these ids are not pending: handed back by the proxy (and why), or unknown. */
    const reportNotPending = (ids: ReadonlyArray<string>) => {
      const byReason = new Map<string, Array<string>>()
      for (const id of ids) {
        const reason = gone.get(id) ?? "unknown or already settled delivery id"
        const grouped = byReason.get(reason)
        if (grouped === undefined) byReason.set(reason, [id])
        else grouped.push(id)
      }
      return Effect.forEach(byReason, ([reason, grouped]) => settleError(grouped, reason), { discard: true })
    }

    /** Takes the ids out of `pending`; gives the others back. */
    const claimNow = (ids: ReadonlyArray<string>) => {
      const found: Array<[string, Delivery]> = []
      const notPending: Array<string> = []
      for (const id of ids) {
        const delivery = pending.get(id)
        if (delivery === undefined) notPending.push(id)
        else {
          forget(id)
          found.push([id, delivery])
          const n = BigInt(id)
          if (n > highestSettled) highestSettled = n
        }
      }
      return { found, notPending }
    }

    /** Takes the ids out of `pending`; reports the others. */
    const claim = (ids: ReadonlyArray<string>) =>
      Effect.suspend(() => {
        const { found, notPending } = claimNow(ids)
        return reportNotPending(notPending).pipe(Effect.as(found))
      })

    /**
     * Deliveries being moved (a nack's counted requeue, a reject's dead-letter): claimed, so no
     * request settles them twice, but unacked on their channel until the broker confirms the copy,
     * which during a memory alarm is when the alarm clears (broker/copies.ts). A multiple-ack must
     * not cover them.
     */
    const moving = new Set<Delivery>()
    // Ended with the call; a copy already published settles its original regardless (copies.ts).
    const moves = yield* FiberSet.make()

    /**
     * Settles each delivery in the background, so one waiting for its copy's confirm holds up
     * neither the requests after it (acks) nor the deliveries; ids that could not be settled are
     * reported.
     */
    const settleEach = (
      ids: ReadonlyArray<string>,
      settle: (delivery: Delivery) => Effect.Effect<boolean, unknown>
    ) =>
      Effect.gen(function*() {
        for (const [id, delivery] of yield* claim(ids)) {
          moving.add(delivery)
          yield* settle(delivery).pipe(
            Effect.catch(() => Effect.succeed(false)),
            Effect.flatMap((ok) =>
              ok ? Effect.void : Effect.andThen(
                // The move failed but the original may still be unacked on a live channel: hand it
                // back now, so a later multiple-ack can never settle it (no-op if the channel is gone).
                Effect.sync(() => delivery.nack(true)),
                settleError([id], "could not settle (broker channel gone or the broker refused); the message will be redelivered")
              )
            ),
            Effect.ensuring(Effect.sync(() => moving.delete(delivery))),
            FiberSet.run(moves)
          )
        }
      })

    /**
     * Acks a batch at once and returns the ids it could not settle, by reason. Where the batch
     * covers every delivery of a channel up to its highest tag (the usual in-order case) one
     * multiple-ack frame settles them all, instead of a frame each; deliveries still being
     * admitted always have higher tags, so they are never covered.
     */
    const ackNow = (ids: ReadonlyArray<string>): { readonly notPending: Array<string>; readonly lost: Array<string> } => {
      const lost: Array<string> = []
      const { found, notPending } = claimNow(ids)
      const byChannel = new Map<Delivery["channel"], Array<[string, Delivery]>>()
      for (const entry of found) {
        const group = byChannel.get(entry[1].channel)
        if (group) group.push(entry)
        else byChannel.set(entry[1].channel, [entry])
      }
      const tagOf = (delivery: Delivery) => delivery.message.fields.deliveryTag
      for (const [channel, group] of byChannel) {
        const highest = group.reduce((a, b) => tagOf(b[1]) > tagOf(a[1]) ? b : a)[1]
        let lowerUnsettled = false
        // `pending` is in delivery order, so the first of this channel in it has its lowest tag:
        // one look, not a walk of every pending delivery per ack.
        for (const delivery of pending.values()) {
          if (delivery.channel !== channel) continue
          lowerUnsettled = tagOf(delivery) < tagOf(highest)
          break
        }
        for (const delivery of moving) {
          if (delivery.channel === channel && tagOf(delivery) < tagOf(highest)) lowerUnsettled = true
        }
        const settled = lowerUnsettled
          ? group.map(([id, delivery]) => [id, delivery.ack()] as const)
          : ((ok) => group.map(([id]) => [id, ok] as const))(highest.ackUpTo())
        for (const [id, ok] of settled) {
          if (!ok) lost.push(id)
          else {
            counts.acked++
            Metrics.ackedUnsafe(spec.queue)
          }
        }
      }
      return { notPending, lost }
    }
    const channelGone = "the delivery's broker channel is gone; the message will be redelivered"
    /** Reports what `ackNow` could not settle. */
    const reportUnacked = ({ lost, notPending }: ReturnType<typeof ackNow>) =>
      notPending.length === 0 && lost.length === 0
        ? Effect.void
        : Effect.andThen(reportNotPending(notPending), settleError(lost, channelGone))
    const ackAll = (ids: ReadonlyArray<string>) => Effect.suspend(() => reportUnacked(ackNow(ids)))

    /**
     * A lease extension: the deliveries' deadlines become now + `seconds` (0: the subscription's
     * deadline), at most MESSAGING_MAX_ACK_DEADLINE_SECONDS.
     */
    const extend = (ids: ReadonlyArray<string>, seconds: number) =>
      Effect.gen(function*() {
        const until = Date.now() + Math.min(seconds === 0 ? ackDeadlineMs : seconds * 1000, maxAckDeadlineMs)
        const unknown: Array<string> = []
        for (const id of ids) {
          if (pending.has(id)) deadlines.set(id, until)
          else unknown.push(id)
        }
        yield* reportNotPending(unknown)
      })

    /**
     * Hands back every delivery past its ack deadline, each counted as a requeue ("ack deadline
     * expired" in its history), in the background like a nack; the others go on.
     */
    const expired = `ack deadline of ${ackDeadlineSeconds} s expired; the message went back to the queue`
    const expireOverdue = Effect.suspend(() => {
      const now = Date.now()
      const overdue: Array<Delivery> = []
      for (const [id, deadline] of deadlines) {
        const delivery = pending.get(id)
        if (deadline > now || delivery === undefined) continue
        forget(id)
        remember(id, expired)
        overdue.push(delivery)
      }
      return Effect.forEach(overdue, (delivery) => {
        moving.add(delivery)
        return requeueCounted(delivery, spec, "ack deadline expired").pipe(
          Effect.tap((outcome) => Effect.sync(() => tally(outcome))),
          // Not moved: hand it back plainly, so a later multiple-ack can never settle it.
          Effect.catch(() => Effect.sync(() => delivery.nack(true))),
          Effect.ensuring(Effect.sync(() => moving.delete(delivery))),
          FiberSet.run(moves)
        )
      }, { discard: true })
    })
    // Checked ten times per deadline, at most once per 100 ms and at least once a second.
    const sweepEvery = Duration.millis(Math.min(1000, Math.max(100, ackDeadlineMs / 10)))
    yield* Effect.forkScoped(Effect.repeat(expireOverdue, Schedule.spaced(sweepEvery)))
    yield* Effect.forkScoped(Effect.forever(
      Queue.take(reports).pipe(Effect.flatten)
    ))

    const handle = (request: SubscriptionRequest) => {
      const action = request.action
      switch (action?.$case) {
        case "ack":
          return ackAll(action.value.deliveryIds)
        case "nack":
          return settleEach([...action.value.deliveryIds, ...pendingIn(action.value.ranges)], (delivery) =>
            Option.match(spec.nackBackoff, {
              onNone: () => requeueCounted(delivery, spec, `nacked by ${subscriber}`),
              // The delay grows with the requeues so far: first × factor^requeues (rounded up to a tier).
              onSome: ({ factor, first }) => {
                const delay = Duration.millis(Duration.toMillis(first) * factor ** requeueCountOf(delivery))
                return requeueDelayed(delivery, spec, delay, `nacked by ${subscriber} (MESSAGING_NACK_BACKOFF)`)
              }
            }).pipe(
              Effect.map(nacked)
            ))
        case "reject": {
          const reason = action.value.reason.trim() || "rejected by the subscriber"
          return settleEach(action.value.deliveryIds, (delivery) =>
            delivery.deadLetter(reason, { "x-rejected-by": subscriber }).pipe(
              Effect.tap(() => Metrics.deadLettered(spec.queue, "rejected")),
              Effect.map(() => {
                counts.deadLettered++
                return true
              })
            ))
        }
        case "extend":
          return extend(action.value.deliveryIds, action.value.seconds)
        case "nackDelayed": {
          const delay = Duration.millis(action.value.delayMs)
          return settleEach(action.value.deliveryIds, (delivery) =>
            requeueDelayed(delivery, spec, delay, `nacked by ${subscriber} with a delay of ${action.value.delayMs} ms`).pipe(
              Effect.map(nacked)
            ))
        }
        case "open":
          return Effect.fail(new CallRejected(grpc.status.INVALID_ARGUMENT, "`open` may only be the first message"))
        case undefined:
          return Effect.fail(
            new CallRejected(grpc.status.INVALID_ARGUMENT, "empty request: set open, ack, nack, reject, extend or nack_delayed")
          )
      }
    }

    /**
     * The pending ids within `ranges` (inclusive), each once, in delivery order; ids of a range
     * that are not pending are skipped (a range is a claim on what is pending, not a list of ids
     * to check). The ranges are sorted and merged, then walked beside `pending` (in delivery
     * order, so ascending ids): linear in both, whatever ranges a client sends.
     */
    const pendingIn = (ranges: ReadonlyArray<DeliveryRange>): Array<string> => {
      if (ranges.length === 0 || pending.size === 0) return []
      const sorted = ranges
        .map((range) => [BigInt(range.first), BigInt(range.last)] as const)
        .filter(([first, last]) => first <= last)
        .sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0))
      const merged: Array<[bigint, bigint]> = []
      for (const [first, last] of sorted) {
        const previous = merged[merged.length - 1]
        if (previous !== undefined && first <= previous[1] + 1n) {
          if (last > previous[1]) previous[1] = last
        } else merged.push([first, last])
      }
      const ids: Array<string> = []
      let next = 0
      for (const id of pending.keys()) {
        const n = BigInt(id)
        while (next < merged.length && merged[next]![1] < n) next++
        if (next === merged.length) break
        if (merged[next]![0] <= n) ids.push(id)
      }
      return ids
    }

    /** Adds the ids an ack names to `into`: those it lists and the pending ones in its ranges. */
    const addAcked = (into: Set<string>, ack: { readonly deliveryIds: ReadonlyArray<string>; readonly ranges: ReadonlyArray<DeliveryRange> }) => {
      for (const id of ack.deliveryIds) into.add(id)
      for (const id of pendingIn(ack.ranges)) into.add(id)
      return into
    }

    /**
     * Handles what arrived together, in order, but with consecutive acks merged into one ack
     * request: a client that acks each message on its own then still costs one AMQP frame per
     * batch, not one per message.
     */
    const handleBatch = (batch: ReadonlyArray<SubscriptionRequest>) =>
      Effect.gen(function*() {
        // A set: a range may cover ids listed (or ranged) before it in the same batch.
        let acks = new Set<string>()
        const flushAcks = () => {
          const merged: SubscriptionRequest = { action: { $case: "ack", value: { deliveryIds: [...acks], ranges: [] } } }
          acks = new Set()
          return handle(merged)
        }
        for (const request of batch) {
          if (request.action?.$case === "ack") {
            addAcked(acks, request.action.value)
            continue
          }
          if (acks.size > 0) yield* flushAcks()
          yield* handle(request)
        }
        if (acks.size > 0) yield* flushAcks()
      })

    // A plain ack of pending ids with nothing before it waiting (the usual request) is settled in
    // the tick it arrives, without a fiber hop: the broker hears of it sooner and can send the next
    // messages. Anything else takes the queued way, which answers unknown ids in order, with
    // backpressure; only a channel found gone meanwhile is reported from here (once per id).
    // Decoded ids are decimal strings, so nothing here throws; if anything did, the request would
    // go the queued way.
    requests.handleInline((request) => {
      if (request.action?.$case !== "ack") return false
      const ack = request.action.value
      try {
        const ids = ack.deliveryIds.length <= 1 && ack.ranges.length === 0 ? ack.deliveryIds : [...addAcked(new Set(), ack)]
        for (const id of ids) if (!pending.has(id)) return false
        const { lost } = ackNow(ids)
        if (lost.length > 0) Queue.offerUnsafe(reports, settleError(lost, channelGone))
        return true
      } catch {
        return false
      }
    })

    const pumpFiber = yield* Effect.forkScoped(pump)
    // A client that leaves (cancel, crash, half-close) holding deliveries it had gave them back:
    // count that, so a message that kills its consumers reaches the requeue limit. "Had" means
    // every unsettled delivery up to the highest id it settled, plus the next one (the one it was
    // most likely working on when it left: a poison message at the head is counted every time).
    // The rest may never have been read (written into the call, buffered on the way, never taken
    // by the client app): they go back uncounted with the channel's close, flagged `redelivered`,
    // so a slow client that leaves often does not dead-letter messages nobody read. This
    // finalizer runs before the pump's channel closes. On shutdown or a lost connection the broker
    // requeues all of them itself, flagged but uncounted: those are not the message's fault.
    yield* Effect.addFinalizer((exit) => {
      if (pending.size === 0 || !(call.cancelled || Exit.isSuccess(exit))) return Effect.void
      const had = (id: string) => BigInt(id) <= highestSettled + 1n
      const unsettled = [...pending].filter(([id]) => had(id)).map(([, delivery]) => delivery)
      const unread = [...pending].filter(([id]) => !had(id)).map(([, delivery]) => delivery)
      pending.clear()
      const note = `unsettled when ${subscriber} left`
      // Stop the broker pushing first (on every channel involved), or it could hand a requeued
      // copy straight back to us.
      const channels = new Map([...unsettled, ...unread].map((delivery) => [delivery.channel, delivery.stopConsuming] as const))
      const stop = Effect.forEach(channels.values(), (stopConsuming) => stopConsuming, { discard: true })
      // The unread go back at once (uncounted), not after the counted copies' confirms: a node that
      // dies meanwhile must not take them with it. On a 3.10 quorum queue, what a consumer on a
      // node that died held can stay checked out to it long after (a chaos run lost 5 this way).
      const giveBackUnread = Effect.sync(() => {
        for (const delivery of unread) delivery.nack(true)
      })
      // The timeout only stops waiting: a copy already published still settles its original, and
      // the channel closes only after that (broker/copies.ts), so the message is never in two places.
      return Effect.andThen(Effect.andThen(stop, giveBackUnread), Effect.forEach(unsettled, (delivery) =>
        requeueCounted(delivery, spec, note).pipe(
          Effect.tap((outcome) => Effect.sync(() => tally(outcome))),
          Effect.ignore
        ), { discard: true, concurrency: 16 })).pipe(Effect.timeoutOption("5 seconds"))
    })
    // Settle requests until the client half-closes; the pump runs beside it and its failure
    // (e.g. the queue was deleted) ends the call.
    yield* requests.handleEach(handleBatch).pipe(
      Effect.raceFirst(Fiber.join(pumpFiber))
    )
    // A client that half-closes right after a nack or reject meant them: let those moves finish
    // (copies confirmed) before the call ends and its scope interrupts them. Bounded, since a copy
    // waits out a memory alarm; what is left then goes back with the channel.
    yield* FiberSet.awaitEmpty(moves).pipe(Effect.timeoutOption("30 seconds"))
  }).pipe(Effect.scoped)

  return Effect.logInfo("subscription call started", { queue: spec.queue }).pipe(
    Effect.andThen(program),
    Effect.onExit((exit) =>
      Effect.logInfo("subscription ended", {
        queue: spec.queue,
        consumerName: opened.consumerName,
        reason: finishCall(outgoing, exit),
        ...counts
      })
    ),
    Metrics.trackActiveStream(rpc),
    Effect.ignore
  )
}
