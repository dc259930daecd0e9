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
 * (it also needs the caller for the stream limits). Health and reflection are not checked.
 */
import * as grpc from "@grpc/grpc-js"
import type { Access } from "./access.js"
import type { CallObserver } from "./guard.js"
import { rpcTable } from "./guard.js"
import { resetAfterStatus } from "./http2Stream.js"

const byPath = new Map(Object.values(rpcTable).map((rpc) => [`/messaging.MessagingService/${rpc.method}`, rpc]))

/** The interceptor, for `new grpc.Server({ interceptors: [...] })`. */
export const authorizeBeforeBody = (access: Access, observer: CallObserver): grpc.ServerInterceptor =>
(methodDescriptor, call) => {
  const rpc = byPath.get(methodDescriptor.path)
  if (rpc === undefined || access.open) return new grpc.ServerInterceptingCall(call)
  return new grpc.ServerInterceptingCall(call, {
    start: (next) =>
      next({
        onReceiveMetadata: (metadata, passOn) => {
          const decision = access.authorize(
            { metadata, getPeer: () => call.getPeer(), getAuthContext: () => call.getAuthContext() },
            rpc.scope,
            rpc.method
          )
          if (decision._tag === "Allowed") return passOn(metadata)
          observer.refused(rpc.method, call.getPeer(), decision)
          observer.ended(rpc.method, decision.code, 0, { who: decision.caller, peer: call.getPeer() })
          call.sendStatus({ code: decision.code, details: decision.details })
          resetAfterStatus(call)
        }
      })
  })
}
