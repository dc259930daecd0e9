/**
 * A TCP relay between the proxy and the broker that the test can sever and restore, so a broker
 * connection loss can be made without disturbing anyone else using the shared broker.
 */
import { Effect } from "effect"
import * as net from "node:net"

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
