/**
 * The client side of an acknowledged subscription (SubscribeSchemaMessages /
 * SubscribeValidationMessages), as a worker loop.
 *
 * One session is one call: `open`, wait for `opened` (it states the ack deadline in force), then for
 * each delivery run the handler in its own fiber, at most `concurrency` at once, and settle it by
 * the handler's exit: success → `ack`; `Reject` → `reject {reason}` (dead-lettered); any other failure
 * or defect → `nack` (or `nack_delayed` when `retryDelay` gives a delay). Interrupted handlers are not
 * settled: the proxy requeues what a call held when it ends.
 *
 * Leases: every delivery the session holds (waiting for a permit or being handled) is extended by one
 * `extend` request for all of them every half ack deadline, to the full deadline again. An id leaves
 * the set in the same synchronous step that writes its settle, so an `extend` never names an id
 * settled before it on the wire.
 *
 * Reconnects: a session that ends with a retryable status (UNAVAILABLE when the proxy shuts down or
 * cannot be reached, ABORTED, …), or that the proxy ends unasked, is opened again at once; attempts
 * that fail before `opened` are retried on the `reconnect` schedule (jittered exponential, 200 ms to
 * 10 s by default), which starts over after every successful open. Deliveries of a lost session are
 * void (the proxy requeued them): their handlers are interrupted. Other errors end the subscription.
 *
 * Stopping: interrupting the subscription interrupts the handlers, then half-closes the call and waits
 * (up to 5 s) for the proxy's status, so the acks already written are applied before the call ends.
 *
 * `settle_error` events (a settle the proxy could not apply, e.g. a deadline that expired anyway) are
 * logged as warnings; the message is redelivered by the proxy.
 */
import * as grpc from "@grpc/grpc-js"
import { Cause, Duration, Effect, Exit, FiberSet, Queue, Result, Schedule, Semaphore } from "effect"
import type {
  DeliveryInfo,
  MessagingServiceClient,
  SchemaMessageResponse,
  SchemaSubscriptionEvent,
  SubscriptionRequest,
  ValidationMessageResponse,
  ValidationSubscriptionEvent
} from "../../gen/messaging.js"
import { fromStatus, type MessagingClientError, Reject, Unavailable, Unknown } from "./errors.js"

/** Which queue family a subscription, stream or routing key is about. */
export type Kind = "schemas" | "validations"

/** The contract message of a kind's queue. */
export type MessageOf<K extends Kind> = K extends "schemas" ? SchemaMessageResponse : ValidationMessageResponse

/** One message handed to a handler. */
export interface Delivery<K extends Kind> {
  /** The subscription's id for it (unique within one call). */
  readonly id: string
  /** True when it was delivered before and not acked. */
  readonly redelivered: boolean
  /** 1 on the first delivery, +1 for each earlier one that was not acked. */
  readonly deliveryCount: number
  readonly message: MessageOf<K>
}

/** Succeed to ack; fail with `Reject` to dead-letter; fail otherwise (or die) to have it retried. */
export type Handler<K extends Kind, E, R> = (delivery: Delivery<K>) => Effect.Effect<void, E | Reject, R>

export interface SubscribeOptions {
  /** Deliveries held at once (the subscription's prefetch); default 10. */
  readonly maxInFlight?: number | undefined
  /** Handlers running at once; default `maxInFlight`. */
  readonly concurrency?: number | undefined
  /** Each delivery's ack deadline, renewed while it is held; default 0 = the proxy's (MESSAGING_ACK_DEADLINE_SECONDS). */
  readonly ackDeadlineSeconds?: number | undefined
  /** Shown in the proxy's logs and in the AMQP consumer tag. */
  readonly consumerName?: string | undefined
  /**
   * Backoff for failed messages: the delay before a failed delivery comes back, from its
   * `deliveryCount` (sent as `nack_delayed`, rounded up by the proxy to its next delay tier; 0 sends
   * a plain `nack`, back at once). Default: 1 s, doubling with each delivery, at most 10 minutes.
   */
  readonly retryDelay?: ((deliveryCount: number) => Duration.Input) | undefined
  /** When to try again after a failed (re)connect; it gets the error. Default: jittered exponential 200 ms … 10 s, for ever. */
  readonly reconnect?: Schedule.Schedule<unknown, MessagingClientError> | undefined
}

/** 1 s, 2 s, 4 s, … by delivery, at most 10 minutes. */
const defaultRetryDelay = (deliveryCount: number): Duration.Input =>
  Duration.millis(Math.min(1000 * 2 ** Math.max(0, deliveryCount - 1), 600_000))

/** What the subscription needs from the client. */
export interface SubscriptionContext {
  readonly client: MessagingServiceClient
  readonly target: string
  readonly metadata: () => grpc.Metadata
  readonly openTimeoutMillis: number
}

/** Runs the subscription until interrupted, or until it fails with an error no reconnect can fix. */
export const subscribe = <K extends Kind, E, R>(
  context: SubscriptionContext,
  kind: K,
  handler: Handler<K, E, R>,
  options: SubscribeOptions
): Effect.Effect<never, MessagingClientError, R> => {
  const method = kind === "schemas" ? "SubscribeSchemaMessages" : "SubscribeValidationMessages"
  const reconnect = (options.reconnect ?? defaultReconnect).pipe(
    Schedule.tap(({ input, duration }) =>
      Effect.logWarning("messaging-proxy subscription: could not open, trying again", {
        method,
        target: context.target,
        inMillis: Math.round(Duration.toMillis(duration)),
        error: input.message
      })
    )
  )
  // One attempt: a session that fails before `opened` fails (the schedule decides when to try
  // again); one that is lost after `opened` succeeds, so the next starts at once with a fresh schedule.
  const attempt = Effect.suspend(() => {
    const state = { opened: false }
    return session(context, method, kind, handler, options, state).pipe(
      Effect.catchIf(
        (error) => state.opened && error.isRetryable,
        (error) =>
          Effect.logWarning("messaging-proxy subscription lost, reconnecting", {
            method,
            target: context.target,
            error: error.message
          })
      )
    )
  })
  return attempt.pipe(
    Effect.retry({ schedule: reconnect, while: (error) => error.isRetryable }),
    Effect.forever,
    Effect.annotateLogs({ subscription: kind })
  )
}

// Internal

type SubscriptionEvent = SchemaSubscriptionEvent | ValidationSubscriptionEvent

const defaultReconnect: Schedule.Schedule<unknown, MessagingClientError> = Schedule.min([
  Schedule.exponential("200 millis"),
  Schedule.spaced("10 seconds")
]).pipe(Schedule.jittered)

/** How long a stopping subscription waits for the proxy to confirm the end of the call. */
const closeTimeout = "5 seconds"

/** One call, from `open` until it fails (it never ends otherwise). */
const session = <K extends Kind, E, R>(
  context: SubscriptionContext,
  method: string,
  kind: K,
  handler: Handler<K, E, R>,
  options: SubscribeOptions,
  state: { opened: boolean }
): Effect.Effect<never, MessagingClientError, R> =>
  Effect.gen(function*() {
    const { target } = context
    const events = yield* Queue.unbounded<SubscriptionEvent, MessagingClientError | Cause.Done>()
    /** Set once the call has its final status: nothing more may be written. */
    let ended = false
    const onEnd: Array<() => void> = []

    const call = yield* Effect.acquireRelease(
      Effect.sync(() => {
        const call: grpc.ClientDuplexStream<SubscriptionRequest, SubscriptionEvent> = kind === "schemas"
          ? context.client.subscribeSchemaMessages(context.metadata())
          : context.client.subscribeValidationMessages(context.metadata())
        call.on("data", (event: SubscriptionEvent) => {
          Queue.offerUnsafe(events, event)
        })
        // The outcome comes with 'status'; a Readable 'error' without a listener would crash the process.
        call.on("error", () => {})
        call.on("status", (status: grpc.StatusObject) => {
          ended = true
          if (status.code === grpc.status.OK) Queue.endUnsafe(events)
          else Queue.failCauseUnsafe(events, Cause.fail(fromStatus(method, target, status)))
          for (const f of onEnd.splice(0)) f()
        })
        return call
      }),
      // Stopping (or failing on our side): half-close, so the proxy applies every request written so
      // far before it ends the call, then wait for its status; cancel if it does not come.
      (call) =>
        ended ? Effect.void : Effect.callback<void>((resume) => {
          onEnd.push(() => resume(Effect.void))
          call.end()
        }).pipe(
          Effect.timeoutOption(closeTimeout),
          Effect.andThen(Effect.sync(() => call.cancel()))
        )
    )
    const write = (request: SubscriptionRequest) => {
      if (!ended) call.write(request)
    }
    const take = Queue.take(events).pipe(
      Effect.catchIf(Cause.isDone, () =>
        Effect.fail(new Unavailable({ method, target, code: grpc.status.UNAVAILABLE, details: "the proxy ended the subscription" })))
    )

    write({
      action: {
        $case: "open",
        value: {
          maxInFlight: options.maxInFlight ?? 10,
          consumerName: options.consumerName ?? "",
          maxMessageBytes: 0,
          ackDeadlineSeconds: options.ackDeadlineSeconds ?? 0,
          // Ready messages several to an event (a proxy before this field sends one each).
          maxDeliveriesPerEvent: options.maxInFlight ?? 10
        }
      }
    })
    const first = yield* take.pipe(
      Effect.timeoutOrElse({
        duration: Duration.millis(context.openTimeoutMillis),
        orElse: () =>
          Effect.fail(
            new Unavailable({ method, target, code: grpc.status.UNAVAILABLE, details: "no answer to `open` in time" })
          )
      })
    )
    if (first.event?.$case !== "opened") {
      return yield* new Unknown({ method, target, code: grpc.status.UNKNOWN, details: "the proxy did not answer `open` with `opened`" })
    }
    const opened = first.event.value
    state.opened = true
    yield* Effect.logInfo("messaging-proxy subscription opened", {
      method,
      target,
      maxInFlight: opened.maxInFlight,
      ackDeadlineSeconds: opened.ackDeadlineSeconds
    })

    // Leases: one `extend` for everything held, every half deadline. (A proxy that states no deadline
    // predates them and would refuse `extend`.)
    const held = new Set<string>()
    const deadlineSeconds = opened.ackDeadlineSeconds
    const extendHeld = Effect.sync(() => {
      if (held.size > 0) write({ action: { $case: "extend", value: { deliveryIds: [...held], seconds: deadlineSeconds } } })
    })
    if (deadlineSeconds > 0) {
      yield* Effect.forkScoped(Effect.forever(Effect.andThen(Effect.sleep(Duration.millis(deadlineSeconds * 500)), extendHeld)))
    }

    /**
     * Settles one delivery by its handler's exit (run uninterruptibly: a decided settle is always
     * written). The id leaves `held` in the same step that writes the settle (see the module comment).
     */
    const settle = (delivery: Delivery<K>, exit: Exit.Exit<void, E | Reject>) =>
      Effect.gen(function*() {
        const ids = [delivery.id]
        // Interrupted (stopping, or the session is gone): not ours to settle any more.
        if (Exit.isFailure(exit) && Cause.hasInterruptsOnly(exit.cause)) return
        let request: SubscriptionRequest
        if (Exit.isSuccess(exit)) request = { action: { $case: "ack", value: { deliveryIds: ids, ranges: [] } } }
        else {
          const error = Cause.findError(exit.cause)
          if (Result.isSuccess(error) && error.success instanceof Reject) {
            const reason = error.success.reason
            yield* Effect.logWarning("message rejected by its handler: dead-lettered", { reason })
            request = { action: { $case: "reject", value: { deliveryIds: ids, reason } } }
          } else {
            const delay = (options.retryDelay ?? defaultRetryDelay)(delivery.deliveryCount)
            const delayMs = delay === undefined ? 0 : Math.max(0, Math.round(Duration.toMillis(Duration.fromInputUnsafe(delay))))
            yield* Effect.logWarning("message handler failed: the message will be retried", {
              deliveryCount: delivery.deliveryCount,
              retryInMillis: delayMs,
              cause: Cause.pretty(exit.cause)
            })
            request = delayMs > 0
              ? { action: { $case: "nackDelayed", value: { deliveryIds: ids, delayMs } } }
              : { action: { $case: "nack", value: { deliveryIds: ids, ranges: [] } } }
          }
        }
        held.delete(delivery.id)
        write(request)
        yield* Effect.logDebug("delivery settled", {
          outcome: request.action?.$case,
          messageId: delivery.message.id,
          deliveryCount: delivery.deliveryCount
        })
      })

    const handlers = yield* FiberSet.make<void, never>()
    const permits = yield* Semaphore.make(Math.max(1, options.concurrency ?? opened.maxInFlight))
    /** Runs the handler on one delivery (bounded by the permits), then settles it. */
    const dispatch = (value: { readonly info?: DeliveryInfo | undefined; readonly message?: unknown }) =>
      Effect.suspend(() => {
        const { info, message } = value
        if (info === undefined || message === undefined) return Effect.void
        const delivery: Delivery<K> = {
          id: info.deliveryId,
          redelivered: info.redelivered,
          deliveryCount: info.deliveryCount,
          message: message as MessageOf<K>
        }
        held.add(delivery.id)
        return FiberSet.run(
          handlers,
          Effect.uninterruptibleMask((restore) =>
            restore(Semaphore.withPermits(permits, 1)(Effect.suspend(() => handler(delivery)))).pipe(
              Effect.exit,
              Effect.flatMap((exit) => settle(delivery, exit))
            )
          ).pipe(Effect.annotateLogs({ deliveryId: delivery.id, messageId: delivery.message.id }))
        ).pipe(Effect.asVoid)
      })
    while (true) {
      const event = (yield* take).event
      switch (event?.$case) {
        case "delivery":
          yield* dispatch(event.value)
          break
        case "deliveries":
          for (const value of event.value.deliveries) yield* dispatch(value)
          break
        case "settleError": {
          const { deliveryIds, reason } = event.value
          // Those ids are void (unknown, expired, or their channel is gone): stop extending them.
          for (const id of deliveryIds) held.delete(id)
          yield* Effect.logWarning("messaging-proxy could not settle deliveries", { deliveryIds, reason })
          break
        }
        default:
          break
      }
    }
  }).pipe(Effect.scoped)
