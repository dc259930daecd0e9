/**
 * gRPC's server-side ping policy, which grpc-js 1.14's server does not implement (it reads neither
 * `grpc.http2.min_ping_interval_without_data_ms` nor `grpc.http2.max_ping_strikes`): a client may
 * ping a connection on which the server has sent nothing since its last ping at most once per
 * `minIntervalMs`; each ping sooner is a strike, and past `maxStrikes` the server answers
 * GOAWAY(ENHANCE_YOUR_CALM, "too_many_pings") and closes the connection, as gRPC C++ and grpc-go
 * do (gRPC A8 "Client-side Keepalive"; grpc-go's `keepalive.EnforcementPolicy`). Clients that
 * get that GOAWAY double their keepalive time (grpc-js, grpcio and grpc-go all do).
 *
 * "Sent nothing": the connection's socket has written no more than the ping acks since the last
 * ping. Pings on a connection that carries responses are never strikes, so the pings clients send
 * to size their flow-control window (BDP probes) while they receive a stream are not counted.
 */
import type * as grpc from "@grpc/grpc-js"
import * as http2 from "node:http2"

/** A PING ack on the wire: a 9-byte frame header and 8 bytes of payload. */
const pingAckBytes = 17

export interface PingPolicy {
  readonly minIntervalMs: number
  /** Early pings tolerated; the next one closes the connection (gRPC's default is 2). */
  readonly maxStrikes: number
}

/** Applies `policy` to one HTTP/2 session; `onViolation` is told of each connection closed. */
export const enforceOnSession = (session: http2.ServerHttp2Session, policy: PingPolicy, onViolation: (peer: string) => void): void => {
  let lastPingAt: number | undefined
  let writtenAtLastPing = 0
  let strikes = 0
  session.on("ping", () => {
    const now = performance.now()
    const written = session.socket?.bytesWritten ?? 0
    // Everything the server wrote since then beyond the ack of that ping counts as data.
    const sentData = written - writtenAtLastPing > pingAckBytes
    if (lastPingAt !== undefined && !sentData && now - lastPingAt < policy.minIntervalMs) {
      strikes++
    } else if (sentData) {
      strikes = 0
    }
    lastPingAt = now
    writtenAtLastPing = written
    if (strikes > policy.maxStrikes && !session.closed && !session.destroyed) {
      onViolation(`${session.socket?.remoteAddress ?? "?"}:${session.socket?.remotePort ?? "?"}`)
      // The GOAWAY names the reason; destroy then flushes it and ends the socket, and the
      // connection's calls end with it (their unsettled messages go back), as in gRPC C++.
      session.goaway(http2.constants.NGHTTP2_ENHANCE_YOUR_CALM, 0, Buffer.from("too_many_pings"))
      session.destroy(undefined, http2.constants.NGHTTP2_ENHANCE_YOUR_CALM)
    }
  })
}

/**
 * Applies `policy` to every connection the grpc-js server accepts from now on. grpc-js does not
 * expose its HTTP/2 servers: they are the keys of its private `http2Servers` map (grpc-js
 * 1.10+, server.ts), filled by `bindAsync`. Returns false, applying nothing, if that changes.
 */
export const enforcePingPolicy = (server: grpc.Server, policy: PingPolicy, onViolation: (peer: string) => void): boolean => {
  const servers: unknown = (server as unknown as { readonly http2Servers?: unknown }).http2Servers
  if (!(servers instanceof Map) || servers.size === 0) return false
  for (const http2Server of servers.keys()) {
    if (typeof http2Server !== "object" || http2Server === null || !("on" in http2Server)) return false
    ;(http2Server as http2.Http2Server).on("session", (session) => enforceOnSession(session, policy, onViolation))
  }
  return true
}
