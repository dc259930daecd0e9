/**
 * The cluster's nodes as the proxy walks them: one order per process, shuffled once, so that many
 * proxy replicas given the same RABBITMQ_HOSTS spread their connections over the cluster; each
 * connection starts at its own offset and moves to the next node when its node is unreachable
 * or its connection drops.
 */
import type { BrokerNode } from "../config.js"

/** A Fisher–Yates shuffle of a copy (`random` in [0, 1), Math.random by default). */
export const shuffled = <A>(items: ReadonlyArray<A>, random: () => number = Math.random): ReadonlyArray<A> => {
  const copy = [...items]
  for (let i = copy.length - 1; i > 0; i--) {
    const j = Math.floor(random() * (i + 1))
    const held = copy[i]!
    copy[i] = copy[j]!
    copy[j] = held
  }
  return copy
}

/** `host:port`, IPv6 hosts in brackets: the `node` of log lines and metrics. */
export const nodeLabel = (node: BrokerNode): string =>
  node.host.includes(":") ? `[${node.host}]:${node.port}` : `${node.host}:${node.port}`

/** A position in the node order: `current` is where to connect next, `advance` moves on by one. */
export interface NodeCursor {
  readonly current: () => BrokerNode
  readonly advance: () => void
}

export const nodeCursor = (order: ReadonlyArray<BrokerNode>, start: number): NodeCursor => {
  let at = start % order.length
  return {
    current: () => order[at]!,
    advance: () => {
      at = (at + 1) % order.length
    }
  }
}
