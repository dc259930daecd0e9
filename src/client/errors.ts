/**
 * The client library's typed errors.
 *
 * A gRPC call that ends with a status other than OK fails with one tagged error per status code
 * (`Unavailable`, `InvalidArgument`, `PermissionDenied`, …), each carrying the method, the target,
 * the numeric `code` and the server's `details`; `isRetryable` says whether trying again later can
 * help (the subscription loop reconnects on exactly those). Their messages are what the CLI prints
 * (see `statusMessage`). `ClientSetupError` is the one failure of building the client (a TLS file
 * it cannot read). `Reject` is not a gRPC error: a subscription handler fails with it to dead-letter
 * the message it was given.
 */
import * as grpc from "@grpc/grpc-js"
import { Data, Schema } from "effect"

/** The client could not be set up (e.g. a TLS file is missing, or a certificate without its key). */
export class ClientSetupError extends Schema.TaggedError<ClientSetupError>()("ClientSetupError", {
  reason: Schema.String
}) {
  override get message(): string {
    return this.reason
  }
}

/** What every status error carries. */
export interface StatusFields {
  /** The RPC, e.g. "Publish", "SubscribeSchemaMessages". */
  readonly method: string
  /** host:port the client talks to. */
  readonly target: string
  /** The numeric gRPC status code (`grpc.status`). */
  readonly code: number
  readonly details: string
}

/**
 * Codes a later attempt can get past: the proxy or its broker is away or restarting (UNAVAILABLE),
 * a subscription's consumer was cancelled by the broker (ABORTED), a limit is reached for now
 * (RESOURCE_EXHAUSTED), the call timed out, or the server failed in a way it did not explain.
 */
const retryableCodes: ReadonlySet<number> = new Set([
  grpc.status.UNAVAILABLE,
  grpc.status.ABORTED,
  grpc.status.RESOURCE_EXHAUSTED,
  grpc.status.DEADLINE_EXCEEDED,
  grpc.status.INTERNAL,
  grpc.status.UNKNOWN,
  grpc.status.CANCELLED
])

/**
 * The details grpc-js gives an UNAVAILABLE it made itself, without a server's answer: no
 * connection (refused, name not resolved, TLS failed), or the connection dropped mid-call
 * (grpc-js 1.14, subchannel-call.ts and load-balancer-pick-first.ts).
 */
const notConnected = /^No connection established|^Connection dropped|^Name resolution failed|^Failed to connect|^Stream refused|^Write (error|failed)|\b(ECONNRESET|ETIMEDOUT|ECONNREFUSED)\b/

/**
 * One line for a failed call, e.g. `cannot reach messaging-proxy at localhost:50055 (UNAVAILABLE: No
 * connection established…)`, `Publish failed at …: messaging-proxy is unavailable (UNAVAILABLE:
 * messaging-proxy is shutting down)`,
 * `Publish timed out at … (DEADLINE_EXCEEDED: …)`, `Publish failed at … (INVALID_ARGUMENT: …)`.
 * `codeName` is the status code's name; grpc-js's empty trailing "Resolution note:" is dropped.
 */
export const statusMessage = (method: string, target: string, codeName: string, details: string): string => {
  const status = `${codeName}: ${details.replace(/\s*Resolution note:\s*$/, "")}`
  switch (codeName) {
    case "UNAVAILABLE":
      // UNAVAILABLE is also what the proxy answers itself (shutting down, broker unreachable):
      // only grpc-js's own connection failures mean the proxy could not be reached.
      return notConnected.test(details)
        ? `cannot reach messaging-proxy at ${target} (${status})`
        : `${method} failed at ${target}: messaging-proxy is unavailable (${status})`
    case "DEADLINE_EXCEEDED":
      return `${method} timed out at ${target} (${status})`
    default:
      return `${method} failed at ${target} (${status})`
  }
}

const StatusError = <const Tag extends string>(tag: Tag) =>
  class extends Data.TaggedError(tag)<StatusFields> {
    /** The status code's name, e.g. "UNAVAILABLE". */
    get codeName(): string {
      return grpc.status[this.code] ?? `CODE_${this.code}`
    }
    /** Whether trying the same call again later may succeed. */
    get isRetryable(): boolean {
      return retryableCodes.has(this.code)
    }
    override get message(): string {
      return statusMessage(this.method, this.target, this.codeName, this.details)
    }
  }

export class Cancelled extends StatusError("Cancelled") {}
export class Unknown extends StatusError("Unknown") {}
export class InvalidArgument extends StatusError("InvalidArgument") {}
export class DeadlineExceeded extends StatusError("DeadlineExceeded") {}
export class NotFound extends StatusError("NotFound") {}
export class AlreadyExists extends StatusError("AlreadyExists") {}
export class PermissionDenied extends StatusError("PermissionDenied") {}
export class ResourceExhausted extends StatusError("ResourceExhausted") {}
export class FailedPrecondition extends StatusError("FailedPrecondition") {}
export class Aborted extends StatusError("Aborted") {}
export class OutOfRange extends StatusError("OutOfRange") {}
export class Unimplemented extends StatusError("Unimplemented") {}
export class Internal extends StatusError("Internal") {}
export class Unavailable extends StatusError("Unavailable") {}
export class DataLoss extends StatusError("DataLoss") {}
export class Unauthenticated extends StatusError("Unauthenticated") {}

/** Any gRPC failure of a client call. */
export type MessagingClientError =
  | Cancelled
  | Unknown
  | InvalidArgument
  | DeadlineExceeded
  | NotFound
  | AlreadyExists
  | PermissionDenied
  | ResourceExhausted
  | FailedPrecondition
  | Aborted
  | OutOfRange
  | Unimplemented
  | Internal
  | Unavailable
  | DataLoss
  | Unauthenticated

const byCode: Record<number, new(fields: StatusFields) => MessagingClientError> = {
  [grpc.status.CANCELLED]: Cancelled,
  [grpc.status.UNKNOWN]: Unknown,
  [grpc.status.INVALID_ARGUMENT]: InvalidArgument,
  [grpc.status.DEADLINE_EXCEEDED]: DeadlineExceeded,
  [grpc.status.NOT_FOUND]: NotFound,
  [grpc.status.ALREADY_EXISTS]: AlreadyExists,
  [grpc.status.PERMISSION_DENIED]: PermissionDenied,
  [grpc.status.RESOURCE_EXHAUSTED]: ResourceExhausted,
  [grpc.status.FAILED_PRECONDITION]: FailedPrecondition,
  [grpc.status.ABORTED]: Aborted,
  [grpc.status.OUT_OF_RANGE]: OutOfRange,
  [grpc.status.UNIMPLEMENTED]: Unimplemented,
  [grpc.status.INTERNAL]: Internal,
  [grpc.status.UNAVAILABLE]: Unavailable,
  [grpc.status.DATA_LOSS]: DataLoss,
  [grpc.status.UNAUTHENTICATED]: Unauthenticated
}

/** The typed error for a call's final status (which must not be OK). */
export const fromStatus = (
  method: string,
  target: string,
  status: Pick<grpc.StatusObject, "code" | "details">
): MessagingClientError => {
  const ErrorClass = byCode[status.code] ?? Unknown
  return new ErrorClass({ method, target, code: status.code, details: status.details })
}

const tags: ReadonlySet<string> = new Set(Object.values(byCode).map((ErrorClass) => new ErrorClass({
  method: "",
  target: "",
  code: 0,
  details: ""
})._tag))

/** True for the gRPC status errors of this module (e.g. to print them without a stack, as the CLI does). */
export const isMessagingClientError = (u: unknown): u is MessagingClientError =>
  typeof u === "object" && u !== null && "_tag" in u && typeof u._tag === "string" && tags.has(u._tag) &&
  "code" in u && "details" in u

/**
 * Fail a subscription handler with this to dead-letter the message (the subscription's `reject`):
 * it goes to `<queue>.dead` with `x-dead-letter-reason: <reason>`. Use it for messages no retry can
 * fix (malformed input, a schema that can never validate); any other failure is retried.
 */
export class Reject extends Data.TaggedError("Reject")<{ readonly reason: string }> {
  override get message(): string {
    return `rejected: ${this.reason}`
  }
}
