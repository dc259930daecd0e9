/**
 * How far a gRPC client can be behind what the server has written to it: the bytes it may hold
 * unread. A contract stream acks a message only once it has written more than that past it
 * (streaming.ts), since only then must the client's application have read it.
 *
 * A write completes (grpc-js calls back) once HTTP/2 flow control let it out, so completed bytes
 * run ahead of the application's reads by at most the client's stream window plus what the client
 * library returned window for before its application read it. Measured on loopback (README,
 * "Delivery guarantee"), largest lead seen:
 * - grpcio 1.51, BDP probing on (the default): 4,194,303 (its SETTINGS_INITIAL_WINDOW_SIZE) plus up
 *   to ~1.22 MB more it grants a stream that its application is reading;
 * - grpcio, BDP probing off: 65,535 plus ~9 KB;
 * - grpc-js 1.14: 65,535 plus the 16 messages its call stream buffers (Node's objectMode
 *   highWaterMark) whatever their size.
 * Hence: the largest SETTINGS_INITIAL_WINDOW_SIZE the peer sent on this connection, plus
 * `GRPC_CLIENT_READ_AHEAD_BYTES`, plus 17 of the largest messages written on the stream.
 * Sources: RFC 9113 §6.9 (flow control), Node.js http2 `session.remoteSettings`.
 */
import type * as grpc from "@grpc/grpc-js"
import type * as http2 from "node:http2"
import { http2SessionOf } from "./http2Stream.js"

/** grpc-js's call stream buffers 16 messages (objectMode highWaterMark), plus one being parsed. */
const clientBufferedMessages = 17

/** When the HTTP/2 session cannot be found: larger than any window a client library opens by default. */
const unknownWindowBytes = 16 * 1024 * 1024

/** The largest SETTINGS_INITIAL_WINDOW_SIZE each peer sent: one listener per session, not per call. */
const largestWindows = new WeakMap<http2.Http2Session, { bytes: number }>()

const windowOf = (session: http2.Http2Session): { bytes: number } => {
  let largest = largestWindows.get(session)
  if (largest === undefined) {
    const tracked = { bytes: session.remoteSettings.initialWindowSize ?? 65_535 }
    largest = tracked
    largestWindows.set(session, tracked)
    session.on("remoteSettings", (settings: http2.Settings) => {
      tracked.bytes = Math.max(tracked.bytes, settings.initialWindowSize ?? 0)
    })
  }
  return largest
}

export interface ReadAhead {
  /** Records a message of `bytes` (gRPC framing included) written on the stream. */
  readonly written: (bytes: number) => void
  /** Bytes the client may hold unread right now: see the module comment. */
  readonly bytes: () => number
}

/**
 * The read-ahead bound of one server-streaming call. `allowanceBytes` is
 * `GRPC_CLIENT_READ_AHEAD_BYTES`. Falls back to a 16 MiB window if grpc-js's internals move.
 */
export const readAheadOf = (call: grpc.ServerWritableStream<unknown, unknown>, allowanceBytes: number): ReadAhead => {
  const session = http2SessionOf(call)
  const window = session === undefined ? { bytes: unknownWindowBytes } : windowOf(session)
  let largestMessage = 0
  return {
    written: (bytes) => {
      if (bytes > largestMessage) largestMessage = bytes
    },
    bytes: () => window.bytes + allowanceBytes + clientBufferedMessages * largestMessage
  }
}
