/**
 * Credentials and scope, checked on a call's metadata before grpc-js reads a byte of its body.
 *
 * grpc-js runs a handler (and the guard around it, guard.ts) only once it has received the first
 * request message, so a caller without credentials could make the proxy receive and buffer a whole
 * request (a 15 MiB Publish: twenty at once grew the process by ~180 MiB) before being refused. A
 * server interceptor sees the metadata first: a refused call is answered there (UNAUTHENTICATED or
 * PERMISSION_DENIED) and its metadata is never passed on, so nothing calls for its messages; what
 * the client sent meanwhile is bounded by HTTP/2 flow control (the stream's window), and the stream
 * is reset once the status is out. The guard authorizes again, cheaply, for the calls let through
 * (it also needs the caller for the stream limits). The rate limits (rateLimits.ts) are checked
 * here too, before the body. Health and reflection are not checked.
 */
import * as grpc from "@grpc/grpc-js"
import { Effect } from "effect"
import type { Access } from "./access.js"
import type { CallObserver } from "./guard.js"
import { rpcTable } from "./guard.js"
import { resetAfterStatus } from "./http2Stream.js"

const byPath = new Map(Object.values(rpcTable).map((rpc) => [`/messaging.MessagingService/${rpc.method}`, rpc]))

/**
 * What the interceptor also checks, before the body: the call-rate limit (every RPC) and, for
 * Publish, the publish-rate limit (one message). `check` answers the RESOURCE_EXHAUSTED details,
 * or undefined; `run` runs it (the server's handler runtime).
 */
export interface RateChecks {
  readonly applies: (method: string) => boolean
  readonly check: (method: string, caller: string) => Effect.Effect<string | undefined>
  readonly run: (effect: Effect.Effect<void>) => void
}

/** The interceptor, for `new grpc.Server({ interceptors: [...] })`. */
export const authorizeBeforeBody = (access: Access, observer: CallObserver, rates: RateChecks): grpc.ServerInterceptor =>
(methodDescriptor, call) => {
  const rpc = byPath.get(methodDescriptor.path)
  if (rpc === undefined || (access.open && !rates.applies(rpc.method))) return new grpc.ServerInterceptingCall(call)
  const refuse = (code: grpc.status, details: string, who: string | undefined) => {
    observer.ended(rpc.method, code, 0, { who, peer: call.getPeer() })
    call.sendStatus({ code, details })
    resetAfterStatus(call)
  }
  return new grpc.ServerInterceptingCall(call, {
    start: (next) =>
      next({
        onReceiveMetadata: (metadata, passOn) => {
          const decision = access.authorize(
            { metadata, getPeer: () => call.getPeer(), getAuthContext: () => call.getAuthContext() },
            rpc.scope,
            rpc.method
          )
          if (decision._tag === "Denied") {
            observer.refused(rpc.method, call.getPeer(), decision)
            return refuse(decision.code, decision.details, decision.caller)
          }
          if (!rates.applies(rpc.method)) return passOn(metadata)
          // The buckets may be in Redis: the metadata is passed on (and the body read) once they answer.
          rates.run(Effect.map(rates.check(rpc.method, decision.caller), (exceeded) => {
            if (exceeded === undefined) passOn(metadata)
            else refuse(grpc.status.RESOURCE_EXHAUSTED, exceeded, decision.caller)
          }))
        }
      })
  })
}
