/**
 * Wraps the MessagingService handlers with what every call goes through before it may touch the
 * broker: authentication and scope (access.ts), the stream limits, and the per-RPC outcome
 * (method, status code, duration) for metrics. Health and reflection are not wrapped: they stay
 * open.
 */
import * as grpc from "@grpc/grpc-js"
import type { MessagingServiceServer, MessagingServiceService } from "../gen/messaging.js"
import { type Access, type Decision, rememberCaller } from "./access.js"
import type { AuditEntry } from "./audit.js"
import { deadlinePassed } from "./callLifecycle.js"
import type { Scope } from "./config.js"
import { resetAfterStatus } from "./http2Stream.js"
import { endRpcSpan, setRpcSpan, startRpcSpan, type Tracing } from "./tracing.js"

type Kind = "unary" | "clientStream" | "serverStream" | "bidi"

/** Every RPC with the scope it needs; an RPC added to the proto without an entry is a type error. */
export const rpcTable = {
  getMessagingParams: { method: "GetMessagingParams", scope: "params", kind: "unary" },
  getRoutingKeySchemas: { method: "GetRoutingKeySchemas", scope: "params", kind: "unary" },
  getRoutingKeyValidations: { method: "GetRoutingKeyValidations", scope: "params", kind: "unary" },
  streamSchemaMessages: { method: "StreamSchemaMessages", scope: "consume", kind: "serverStream" },
  streamValidationMessages: { method: "StreamValidationMessages", scope: "consume", kind: "serverStream" },
  subscribeSchemaMessages: { method: "SubscribeSchemaMessages", scope: "consume", kind: "bidi" },
  subscribeValidationMessages: { method: "SubscribeValidationMessages", scope: "consume", kind: "bidi" },
  publish: { method: "Publish", scope: "publish", kind: "unary" },
  publishBatch: { method: "PublishBatch", scope: "publish", kind: "clientStream" },
  getQueueInfo: { method: "GetQueueInfo", scope: "admin", kind: "unary" },
  purgeQueue: { method: "PurgeQueue", scope: "admin", kind: "unary" },
  peekDeadLetters: { method: "PeekDeadLetters", scope: "admin", kind: "unary" },
  redriveDeadLetters: { method: "RedriveDeadLetters", scope: "admin", kind: "unary" }
} as const satisfies Record<keyof typeof MessagingServiceService, { method: string; scope: Scope; kind: Kind }>

export interface CallObserver {
  /** Once per call, when it ends: the status code it ended with and how long it took. */
  readonly ended: (method: string, code: grpc.status, seconds: number, audit?: Omit<AuditEntry, "method" | "code">) => void
  /** A call refused before it reached the handler. */
  readonly refused: (method: string, peer: string, decision: Extract<Decision, { _tag: "Denied" }>) => void
}

type UnaryLike = (
  call: grpc.ServerUnaryCall<unknown, unknown> | grpc.ServerReadableStream<unknown, unknown>,
  callback: grpc.sendUnaryData<unknown>
) => void
type StreamLike = (call: grpc.ServerWritableStream<unknown, unknown> | grpc.ServerDuplexStream<unknown, unknown>) => void

const secondsSince = (started: number) => (performance.now() - started) / 1000

const guardUnary = (method: string, scope: Scope, handler: UnaryLike, access: Access, observer: CallObserver, tracing: Tracing["Service"]): UnaryLike =>
(call, callback) => {
  const started = performance.now()
  const span = startRpcSpan(tracing, method, call.metadata)
  setRpcSpan(call, span)
  const decision = access.authorize(call, scope, method)
  const respond: grpc.sendUnaryData<unknown> = (error, value, trailer, flags) => {
    const code = error ? (error.code ?? grpc.status.UNKNOWN) : grpc.status.OK
    observer.ended(method, code, secondsSince(started), { who: decision.caller, peer: call.getPeer(), call })
    endRpcSpan(span, code)
    callback(error, value, trailer, flags)
  }
  if (decision._tag === "Denied") {
    observer.refused(method, call.getPeer(), decision)
    return respond({ code: decision.code, details: decision.details })
  }
  rememberCaller(call, decision.caller)
  handler(call, respond)
}

const guardStream = (method: string, scope: Scope, handler: StreamLike, access: Access, observer: CallObserver, tracing: Tracing["Service"]): StreamLike =>
(call) => {
  const started = performance.now()
  const span = startRpcSpan(tracing, method, call.metadata)
  setRpcSpan(call, span)
  const refuse = (decision: Extract<Decision, { _tag: "Denied" }>) => {
    observer.refused(method, call.getPeer(), decision)
    observer.ended(method, decision.code, secondsSince(started))
    endRpcSpan(span, decision.code)
    call.emit("error", { code: decision.code, details: decision.details })
  }
  const decision = access.authorize(call, scope, method)
  if (decision._tag === "Denied") return refuse(decision)
  const slot = access.acquireStreamSlot(decision.caller, call.getPeer())
  if ("_tag" in slot) return slot._tag === "Denied" ? refuse(slot) : undefined
  // The handlers end calls by emitting 'error' with a status; 'cancelled' fires after every end.
  let code: grpc.status | undefined
  call.on("error", (error: Partial<grpc.StatusObject>) => {
    code ??= error.code ?? grpc.status.UNKNOWN
  })
  call.once("finish", () => {
    code ??= grpc.status.OK
  })
  call.once("cancelled", () => {
    slot.release()
    // The status is out: a client that keeps its input open must not keep the stream open too.
    resetAfterStatus(call)
    const expired = deadlinePassed(call)
    const final = code ?? (expired ? grpc.status.DEADLINE_EXCEEDED : grpc.status.CANCELLED)
    observer.ended(method, final, secondsSince(started))
    endRpcSpan(span, final)
  })
  handler(call)
}

export const guardHandlers = (
  handlers: MessagingServiceServer,
  access: Access,
  observer: CallObserver,
  tracing: Tracing["Service"]
): MessagingServiceServer => {
  const guarded: Record<string, UnaryLike | StreamLike> = {}
  for (const [key, { method, scope, kind }] of Object.entries(rpcTable)) {
    const handler = handlers[key]
    if (handler === undefined) throw new Error(`no handler for ${method}`)
    guarded[key] = kind === "unary" || kind === "clientStream"
      ? guardUnary(method, scope, handler as UnaryLike, access, observer, tracing)
      : guardStream(method, scope, handler as StreamLike, access, observer, tracing)
  }
  return guarded as unknown as MessagingServiceServer
}
