/**
 * What every unary-response RPC shares (GetQueueInfo, Publish, PublishBatch, and the handlers'
 * fibers): running the call's work as a fiber its cancel interrupts, answering from the work's
 * exit with a precise status, and waiting briefly for a broker connection.
 */
import * as grpc from "@grpc/grpc-js"
import type * as amqp from "amqplib"
import { Cause, Data, Effect, Exit, type Fiber, Option } from "effect"
import { Broker, connectGrace } from "./broker/Broker.js"
import { shuttingDown } from "./callLifecycle.js"
import { type AmqpError, replyCode } from "./errors.js"
import { underRpcSpan } from "./tracing.js"

/** Runs an Effect needing the broker as a handler fiber (the `run` the handlers get). */
export type RunHandler = <A, E>(effect: Effect.Effect<A, E, Broker>) => Fiber.Fiber<A, E>

export interface Status {
  readonly code: grpc.status
  readonly details: string
}

/**
 * The proxy has no broker connection right now (and none came up within the grace period);
 * `reason` says why the last attempt failed, when one did (refusal.ts), e.g. "broker not
 * connected: the broker refused the credentials of user 'api': ACCESS_REFUSED - …".
 */
export class BrokerNotConnected extends Data.TaggedError("BrokerNotConnected")<{ readonly reason: string | undefined }> {
  override get message(): string {
    return this.reason === undefined ? "broker not connected" : `broker not connected: ${this.reason}`
  }
}

/**
 * The live connection (the publishers' own, or the consumers'), or BrokerNotConnected once the
 * grace period passes without one.
 */
export const liveConnection = (
  role: "consumers" | "publishers"
): Effect.Effect<amqp.ChannelModel, BrokerNotConnected, Broker> =>
  Effect.gen(function*() {
    const broker = yield* Broker
    const connection = yield* (role === "publishers" ? broker.publishingConnection : broker.connection).pipe(
      Effect.timeoutOption(connectGrace)
    )
    if (Option.isSome(connection)) return connection.value
    const failure = yield* broker.connectFailure(role)
    return yield* new BrokerNotConnected({ reason: Option.isSome(failure) ? failure.value.description : undefined })
  })


/**
 * The status of a broker failure of a unary call: NOT_FOUND when the broker answered 404 (a queue
 * or exchange that is not there: retrying will not help until it exists), UNAVAILABLE otherwise.
 */
export const brokerFailureStatus = (error: AmqpError | BrokerNotConnected): Status => ({
  code: error._tag === "AmqpError" && replyCode(error.cause) === 404 ? grpc.status.NOT_FOUND : grpc.status.UNAVAILABLE,
  details: error.message
})

/** Answers a unary-response call from the work's exit and logs how it ended. */
export const replyWith = <A, E>(callback: grpc.sendUnaryData<A>, statusOf: (error: E) => Status) =>
(exit: Exit.Exit<A, E>): Effect.Effect<void> => {
  if (Exit.isSuccess(exit)) return Effect.sync(() => callback(null, exit.value))
  const error = Exit.findErrorOption(exit)
  if (Option.isSome(error)) {
    const status = statusOf(error.value)
    // Bad requests are the client's business; broker trouble is ours.
    const log = status.code === grpc.status.UNAVAILABLE ? Effect.logWarning : Effect.logInfo
    return log("call failed", { code: grpc.status[status.code], details: status.details }).pipe(
      Effect.andThen(Effect.sync(() => callback(status)))
    )
  }
  if (Cause.hasInterruptsOnly(exit.cause)) {
    // Client cancel (grpc-js drops the answer) or server shutdown.
    return Effect.sync(() => callback(shuttingDown))
  }
  return Effect.logError("call failed with a defect", { cause: Cause.pretty(exit.cause) }).pipe(
    Effect.andThen(Effect.sync(() => callback({ code: grpc.status.INTERNAL, details: "internal error" })))
  )
}

/** Runs a call's work as a handler fiber that the call's cancel (or deadline) interrupts. */
export const runCall = <A, E>(
  run: RunHandler,
  call: grpc.ServerUnaryCall<unknown, A> | grpc.ServerReadableStream<unknown, A>,
  rpc: string,
  work: Effect.Effect<A, E, Broker>,
  callback: grpc.sendUnaryData<A>,
  statusOf: (error: E) => Status
): void => {
  if (call.cancelled) return
  const fiber = run(
    work.pipe(
      Effect.onExit(replyWith(callback, statusOf)),
      Effect.annotateLogs({ rpc, peer: call.getPeer() }),
      underRpcSpan(call)
    )
  )
  // Also fires after a normal end; interrupting a finished fiber is a no-op.
  call.once("cancelled", () => fiber.interruptUnsafe())
}

