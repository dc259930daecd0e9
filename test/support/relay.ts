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
  /**
   * Resets only the connections whose client sent `text` in its first bytes (the AMQP handshake
   * carries the connection name in the clear). Resolves with how many it reset.
   */
  readonly severWhereClientSent: (text: string) => Effect.Effect<number>
  /** Stops forwarding in both directions without closing anything: the peer goes silent. */
  readonly freeze: Effect.Effect<void>
}

export const startRelay = (targetPort = 5672, targetHost = "127.0.0.1") =>
  Effect.acquireRelease(
    Effect.callback<{ relay: Relay; server: net.Server }>((resume) => {
      const sockets = new Set<net.Socket>()
      // The first bytes each client sent, kept up to 4 KiB (enough for the AMQP handshake).
      const preamble = new Map<net.Socket, string>()
      const partner = new Map<net.Socket, net.Socket>()
      let refusing = false
      const server = net.createServer((client) => {
        if (refusing) {
          client.resetAndDestroy()
          return
        }
        const upstream = net.connect(targetPort, targetHost)
        preamble.set(client, "")
        const record = (chunk: Buffer) => {
          const seen = (preamble.get(client) ?? "") + chunk.toString("latin1")
          preamble.set(client, seen.slice(0, 4096))
          if (seen.length >= 4096) client.off("data", record)
        }
        client.on("data", record)
        client.on("close", () => preamble.delete(client))
        for (const [a, b] of [[client, upstream], [upstream, client]] as const) {
          sockets.add(a)
          partner.set(a, b)
          a.on("error", () => b.destroy())
          a.on("close", () => {
            sockets.delete(a)
            partner.delete(a)
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
            connections: () => sockets.size / 2,
            freeze: Effect.sync(() =>
              sockets.forEach((socket) => {
                const to = partner.get(socket)
                if (to) socket.unpipe(to)
                socket.pause()
              })
            ),
            severWhereClientSent: (text) =>
              Effect.sync(() => {
                const matching = [...preamble].filter(([, seen]) => seen.includes(text)).map(([client]) => client)
                matching.forEach((client) => client.resetAndDestroy())
                return matching.length
              })
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
    Effect.callback<tls.Server>((resume) => {
      const server = tls.createServer({ cert, key }, (client) => {
        const upstream = net.connect(targetPort, targetHost)
        client.on("error", () => upstream.destroy())
        upstream.on("error", () => client.destroy())
        client.on("close", () => upstream.destroy())
        upstream.on("close", () => client.destroy())
        client.pipe(upstream).pipe(client)
      })
      server.on("tlsClientError", () => undefined)
      server.listen(0, "127.0.0.1", () => resume(Effect.succeed(server)))
    }),
    (server) => Effect.callback<void>((resume) => {
      server.close(() => resume(Effect.void))
    })
  ).pipe(Effect.map((server) => {
    let handshakes = 0
    let attempts = 0
    server.on("secureConnection", () => handshakes++)
    server.on("connection", () => attempts++)
    return {
      port: (server.address() as net.AddressInfo).port,
      /** TLS sessions the relay completed. */
      handshakes: () => handshakes,
      /** Resolves once `n` TCP connections have reached the relay (counted from its start). */
      attemptsReached: (n: number) =>
        Effect.callback<void>((resume) => {
          if (attempts >= n) return resume(Effect.void)
          const onConnection = () => {
            if (attempts < n) return
            server.off("connection", onConnection)
            resume(Effect.void)
          }
          // Registered after the counter, so `attempts` already includes this connection.
          server.on("connection", onConnection)
          return Effect.sync(() => server.off("connection", onConnection))
        })
    }
  }))
