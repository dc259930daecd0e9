/**
 * One socket write per burst of AMQP frames, not one per frame set. amqplib's multiplexer writes
 * each publish (method, header and body frames) and each ack to the socket on its own, and the
 * connection runs with Nagle off (`noDelay`), so each is a syscall and a TCP segment: a
 * `PublishBatch` of 1,000 made 1,000 writes. Here the socket is corked at the first write of a
 * tick and uncorked at the end of that tick (`process.nextTick`), so what amqplib writes in one go
 * leaves in one `writev`, and nothing waits beyond the code already running (Node's
 * `writable.cork()`, "to buffer writes until the end of the current tick").
 *
 * amqplib does not expose its socket: `ChannelModel.connection.stream` (amqplib 0.10–2.x). If
 * that moves, nothing changes.
 */
import type * as amqp from "amqplib"
import { Duplex } from "node:stream"

const socketOf = (model: amqp.ChannelModel): Duplex | undefined => {
  const connection: unknown = Reflect.get(model, "connection")
  const stream: unknown = typeof connection === "object" && connection !== null ? Reflect.get(connection, "stream") : undefined
  return stream instanceof Duplex ? stream : undefined
}

/** Coalesces the connection's writes within each tick (see above). */
export const coalesceWrites = (model: amqp.ChannelModel): void => {
  const socket = socketOf(model)
  if (socket === undefined) return
  const write = socket.write
  let corked = false
  const uncork = () => {
    corked = false
    socket.uncork()
  }
  socket.write = function(this: Duplex, ...args: Parameters<Duplex["write"]>) {
    if (!corked && !socket.destroyed) {
      corked = true
      socket.cork()
      process.nextTick(uncork)
    }
    return write.apply(this, args)
  } as Duplex["write"]
}
