/**
 * The HTTP/2 stream under a grpc-js server call, for the few things grpc-js does not expose: the
 * peer's flow-control settings (readAhead.ts), the status grpc-js sent on its own (a deadline),
 * and resetting a stream whose client still has its input open once the call has ended.
 *
 * grpc-js does not expose the stream: a server call holds (`call`) its chain of intercepting calls,
 * one `ServerInterceptingCall` per server interceptor (`nextCall`), down to the
 * `BaseServerInterceptingCall` whose `stream` is the `ServerHttp2Stream` (grpc-js 1.10+,
 * server-interceptors.ts). Every function here does nothing (or answers `undefined`) if that
 * ever changes.
 */
import type * as grpc from "@grpc/grpc-js"
import * as http2 from "node:http2"

/** A grpc-js server call of any kind, or one of its intercepting calls. */
type AnyServerCall =
  | grpc.ServerUnaryCall<unknown, unknown>
  | grpc.ServerReadableStream<unknown, unknown>
  | grpc.ServerWritableStream<unknown, unknown>
  | grpc.ServerDuplexStream<unknown, unknown>
  | grpc.ServerInterceptingCallInterface

const isObject = (value: unknown): value is Record<string, unknown> => typeof value === "object" && value !== null

/** The call's `ServerHttp2Stream`, or `undefined` if grpc-js's internals moved. */
export const http2StreamOf = (call: AnyServerCall): http2.ServerHttp2Stream | undefined => {
  let current: unknown = call
  // A handler's call, its intercepting calls (one per interceptor), the base call: a short chain.
  for (let depth = 0; depth < 8 && isObject(current); depth++) {
    const stream = current["stream"]
    if (isObject(stream) && "session" in stream && "respond" in stream) return stream as unknown as http2.ServerHttp2Stream
    current = "nextCall" in current ? current["nextCall"] : current["call"]
  }
  return undefined
}

/** The HTTP/2 session the call runs on, or `undefined`. */
export const http2SessionOf = (call: AnyServerCall): http2.Http2Session | undefined => http2StreamOf(call)?.session

/**
 * The `grpc-status` already sent on the call's stream (in its trailers, or in a trailers-only
 * response), or `undefined` if none was. grpc-js sends DEADLINE_EXCEEDED itself when the
 * `grpc-timeout` a client sent runs out, before the handler hears of it.
 */
export const sentStatusCode = (call: AnyServerCall): number | undefined => {
  const stream = http2StreamOf(call)
  if (stream === undefined) return undefined
  // Node's types say otherwise, but both are undefined until sent.
  const trailers: http2.OutgoingHttpHeaders | undefined = stream.sentTrailers
  const headers: http2.OutgoingHttpHeaders | undefined = stream.sentHeaders
  const sent = trailers?.["grpc-status"] ?? headers?.["grpc-status"]
  return sent === undefined ? undefined : Number(sent)
}

/** How often `closeAfterStatus` looks whether the status has left, and for how long. */
const sentCheckIntervalMs = 5
const sentCheckLimit = 2_000

/**
 * Once the call's status has left (the stream's END_STREAM is sent), resets a stream whose client
 * still has its input open with RST_STREAM(NO_ERROR), as RFC 9113 §8.1 lets a server that has
 * sent its complete response do, and as grpc-go's server does. Without it the stream stays
 * half-closed until the client ends its side: it holds one of the connection's concurrent
 * streams, and the server's graceful shutdown, which waits for every stream to close, waits for it
 * (e.g. `(echo …; sleep 30) | buf curl …` on a subscription).
 *
 * The reset must not overtake the status: nghttp2 sends a RST_STREAM ahead of the stream's
 * remaining DATA and trailers, and grpc-js, grpcio and buf curl then report INTERNAL instead of
 * the status. Node has no event for "END_STREAM sent", so this looks at the stream's state every
 * 5 ms, for at most 10 s (a client that reads nothing may never let the last DATA out; the stream
 * then stays as it was, and shutdown's timeout covers it).
 */
export const resetAfterStatus = (call: AnyServerCall): void => {
  const stream = http2StreamOf(call)
  if (stream === undefined) return
  let checks = 0
  const check = () => {
    if (stream.closed || stream.destroyed || stream.readableEnded) return
    if (stream.state.localClose === 1) return void stream.close(http2.constants.NGHTTP2_NO_ERROR)
    if (++checks < sentCheckLimit) setTimeout(check, sentCheckIntervalMs).unref()
  }
  check()
}

/** Sessions whose receive windows were already widened. */
const widened = new WeakSet<http2.Http2Session>()

/**
 * Widens what the client may send on the call's HTTP/2 session before the proxy reads it: each
 * stream's initial window (SETTINGS_INITIAL_WINDOW_SIZE, RFC 9113 §6.5.2; existing streams grow by
 * the difference, §6.9.2) to `streamBytes`, and the session's own window to `sessionBytes`, which
 * bounds what the proxy may buffer for the whole connection. Once per session; nothing if grpc-js's
 * internals moved. Node's default is 64 KiB for both, which makes a fast client stop every ~60
 * requests of 1 KiB and wait a round trip for a WINDOW_UPDATE; grpc-go and gRPC C-core grow their
 * windows the same way (BDP estimation), grpc-js does not.
 */
export const widenReceiveWindow = (call: AnyServerCall, streamBytes: number, sessionBytes: number): void => {
  const session = http2SessionOf(call)
  if (session === undefined || widened.has(session) || session.destroyed) return
  widened.add(session)
  try {
    session.setLocalWindowSize(sessionBytes)
    session.settings({ initialWindowSize: streamBytes })
  } catch {
    // A session closing meanwhile (ERR_HTTP2_INVALID_SESSION): nothing to widen.
  }
}
