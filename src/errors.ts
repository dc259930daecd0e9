/** Tagged errors shared by the broker-facing modules. */
import { Data } from "effect"

/** An amqplib operation failed; `operation` says which, for the log line and the gRPC status. */
export class AmqpError extends Data.TaggedError("AmqpError")<{
  readonly operation: string
  readonly cause: unknown
}> {
  override get message(): string {
    return `${this.operation} failed: ${describe(this.cause)}`
  }
}

/** The connection to the broker went away under a consumer; the consumer may re-attach. */
export class ConnectionLost extends Data.TaggedError("ConnectionLost")<{ readonly reason: string }> {
  override get message(): string {
    return `broker connection lost: ${this.reason}`
  }
}

/** The broker closed a consumer's channel or cancelled its consumer (e.g. the queue was deleted). */
export class ConsumerClosedByBroker extends Data.TaggedError("ConsumerClosedByBroker")<{
  readonly queue: string
  readonly reason: string
}> {
  override get message(): string {
    return `the broker ended the consumer on queue '${this.queue}': ${this.reason}`
  }
}

/** AMQP reply code of an amqplib error (404 NOT_FOUND, 406 PRECONDITION_FAILED, …), if any. */
export const replyCode = (cause: unknown): number | undefined =>
  typeof cause === "object" && cause !== null && "code" in cause && typeof cause.code === "number"
    ? cause.code
    : undefined

export const describe = (cause: unknown): string => {
  if (cause instanceof Error) return cause.message
  if (typeof cause === "object" && cause !== null && "message" in cause) return String(cause.message)
  try {
    return typeof cause === "string" ? cause : JSON.stringify(cause) ?? String(cause)
  } catch {
    return Object.prototype.toString.call(cause)
  }
}
