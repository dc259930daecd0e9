/**
 * The streaming calls of the services the proxy serves but does not implement (grpc.health.v1
 * `Watch`, server reflection). They end only when their client ends them, and grpc-js's graceful
 * shutdown waits for every HTTP/2 stream to close: one `Watch` or one reflection stream that
 * `buf curl` keeps open for its whole run would hold the shutdown until its timeout. So shutdown
 * ends them with a status, as it does the proxy's own calls.
 */
import type * as grpc from "@grpc/grpc-js"
import { resetAfterStatus } from "./http2Stream.js"

type StreamingCall = grpc.ServerWritableStream<unknown, unknown> | grpc.ServerDuplexStream<unknown, unknown>

export interface ForeignStreams {
  /**
   * What `addToServer` of grpc-health-check and @grpc/reflection needs: registers the service on
   * the server with the calls of its server-streaming and bidi methods tracked.
   */
  readonly server: grpc.Server
  /** Ends every tracked call that is still open with `status` (grpc-js sends it as trailers). */
  readonly endAll: (status: { readonly code: grpc.status; readonly details: string }) => void
}

/** Tracks the streaming calls of the services registered through the returned `server`. */
export const trackForeignStreams = (server: grpc.Server): ForeignStreams => {
  const open = new Set<StreamingCall>()
  const track = (handler: (call: StreamingCall) => void) => (call: StreamingCall) => {
    open.add(call)
    // 'cancelled' follows every end of a grpc-js call, whoever ended it.
    call.once("cancelled", () => {
      open.delete(call)
      resetAfterStatus(call)
    })
    handler(call)
  }
  const addService: grpc.Server["addService"] = (definition, implementation) => {
    const tracked: grpc.UntypedServiceImplementation = { ...implementation }
    for (const [name, method] of Object.entries(definition)) {
      // grpc-js finds a handler by the method's name or by its `originalName` (proto-loader's
      // definitions, such as grpc-health-check's, name methods "Watch" and implement "watch").
      const key = name in implementation ? name : method.originalName
      const handler = key === undefined ? undefined : implementation[key]
      if (key !== undefined && method.responseStream && typeof handler === "function") {
        tracked[key] = track(handler as (call: StreamingCall) => void) as grpc.UntypedHandleCall
      }
    }
    server.addService(definition, tracked)
  }
  // Only addService is ever called by those libraries; the rest is the real server's.
  const registering = new Proxy(server, {
    get: (target, property, receiver) => property === "addService" ? addService : Reflect.get(target, property, receiver)
  })
  return {
    server: registering,
    endAll: (status) => {
      for (const call of open) call.emit("error", status)
    }
  }
}
