/**
 * A TCP relay between the proxy and the broker that the test can sever and restore, so a broker
 * connection loss can be made without disturbing anyone else using the shared broker.
 */
import { Effect } from "effect"
import * as net from "node:net"
import * as tls from "node:tls"

export interface Relay {
  readonly port: number
  /** Resets every open connection (both sides see ECONNRESET). */
  readonly sever: Effect.Effect<void>
  /** While refusing, new connections are reset at once (the broker looks down). */
  readonly setRefusing: (refusing: boolean) => Effect.Effect<void>
  readonly connections: () => number
}

export const startRelay = (targetPort = 5672, targetHost = "127.0.0.1") =>
  Effect.acquireRelease(
    Effect.callback<{ relay: Relay; server: net.Server }>((resume) => {
      const sockets = new Set<net.Socket>()
      let refusing = false
      const server = net.createServer((client) => {
        if (refusing) {
          client.resetAndDestroy()
          return
        }
        const upstream = net.connect(targetPort, targetHost)
        for (const [a, b] of [[client, upstream], [upstream, client]] as const) {
          sockets.add(a)
          a.on("error", () => b.destroy())
          a.on("close", () => {
            sockets.delete(a)
            b.destroy()
          })
          a.pipe(b)
        }
      })
      server.listen(0, "127.0.0.1", () => {
        const address = server.address() as net.AddressInfo
        resume(Effect.succeed({
          server,
          relay: {
            port: address.port,
            sever: Effect.sync(() => sockets.forEach((s) => s.resetAndDestroy())),
            setRefusing: (value) => Effect.sync(() => { refusing = value }),
            connections: () => sockets.size / 2
          }
        }))
      })
    }),
    ({ relay, server }) =>
      relay.sever.pipe(Effect.andThen(Effect.callback<void>((resume) => {
        server.close(() => resume(Effect.void))
      })))
  ).pipe(Effect.map(({ relay }) => relay))

/** A TLS-terminating relay: amqps:// on the outside, the broker's plain AMQP behind it. */
export const startTlsRelay = (cert: Buffer, key: Buffer, targetPort = 5672, targetHost = "127.0.0.1") =>
  Effect.acquireRelease(
    Effect.callback<{ port: number; server: tls.Server; handshakes: () => number; attempts: () => number }>((resume) => {
      let handshakes = 0
      let attempts = 0
      const server = tls.createServer({ cert, key }, (client) => {
        handshakes++
        const upstream = net.connect(targetPort, targetHost)
        client.on("error", () => upstream.destroy())
        upstream.on("error", () => client.destroy())
        client.on("close", () => upstream.destroy())
        upstream.on("close", () => client.destroy())
        client.pipe(upstream).pipe(client)
      })
      server.on("tlsClientError", () => undefined)
      server.on("connection", () => attempts++)
      server.listen(0, "127.0.0.1", () => {
        const { port } = server.address() as net.AddressInfo
        resume(Effect.succeed({ port, server, handshakes: () => handshakes, attempts: () => attempts }))
      })
    }),
    ({ server }) => Effect.callback<void>((resume) => {
      server.close(() => resume(Effect.void))
    })
  ).pipe(Effect.map(({ port, handshakes, attempts }) => ({ port, handshakes, attempts })))
