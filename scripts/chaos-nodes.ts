/**
 * The broker side of the cluster chaos run (chaos-cluster.ts): the local 3-node cluster driven
 * through scripts/cluster.sh (start, kill -9, restart, which node leads a quorum queue), AMQP
 * connections that fail over among its nodes, and a confirmed publisher that never skips an id.
 */
import * as amqp from "amqplib"
import { execFile } from "node:child_process"
import { copyFileSync } from "node:fs"
import * as net from "node:net"
import { join, resolve } from "node:path"
import { fileURLToPath } from "node:url"
import { errorText, sleep, within } from "./chaos-support.js"

// ---- the nodes ---------------------------------------------------------------------------------

export interface ClusterNode {
  /** 1, 2 or 3: cluster.sh's NODE argument. */
  readonly index: number
  /** mpcN@localhost */
  readonly name: string
  readonly port: number
}

/** The cluster's nodes as cluster.sh lays them out (CLUSTER_BASE_PORT, 5681 by default). */
export const clusterNodes = (): ReadonlyArray<ClusterNode> => {
  const base = Number(process.env["CLUSTER_BASE_PORT"] ?? "5681")
  return [1, 2, 3].map((index) => ({ index, name: `mpc${index}@localhost`, port: base + index - 1 }))
}

export const nodeUrl = (node: ClusterNode): string => `amqp://guest:guest@127.0.0.1:${node.port}`
export const hostPort = (node: ClusterNode): string => `127.0.0.1:${node.port}`

const clusterScript = fileURLToPath(new URL("../../scripts/cluster.sh", import.meta.url))

export interface ShellResult {
  readonly code: number
  readonly stdout: string
  readonly stderr: string
  readonly ms: number
}

/** `bash scripts/cluster.sh ARGS`, bounded by `timeoutMs` (then killed: code 124). */
export const clusterSh = (args: ReadonlyArray<string>, timeoutMs: number): Promise<ShellResult> =>
  new Promise((resolve) => {
    const started = Date.now()
    execFile("bash", [clusterScript, ...args], { timeout: timeoutMs, killSignal: "SIGKILL", maxBuffer: 4 << 20 }, (error, stdout, stderr) => {
      const code = error === null ? 0 : typeof error.code === "number" ? error.code : 124
      resolve({ code, stdout: String(stdout), stderr: String(stderr), ms: Date.now() - started })
    })
  })

const oneLine = (r: ShellResult): string => `${r.stdout}${r.stderr}`.trim().split("\n").filter((l) => l !== "").slice(-3).join(" | ")

/** Indexes of the nodes cluster.sh status reports as not serving AMQP. */
const downInStatus = (status: string): Array<number> =>
  status.split("\n").flatMap((line) => {
    const m = /^mpc(\d)@\S+\s+\S+\s+(.*)$/.exec(line.trim())
    return m !== null && !m[2]!.startsWith("running") ? [Number(m[1])] : []
  })

/**
 * Makes sure all three nodes run and are clustered: nothing if they do; restarts a node that is
 * down (a killed node keeps its data and rejoins); `start` (from scratch) if that is not enough.
 * Returns what it did.
 */
export const ensureCluster = async (log: (text: string) => void): Promise<string> => {
  const status = await clusterSh(["status"], 120_000)
  if (status.code === 0) return "the cluster was already up"
  const down = downInStatus(status.stdout)
  if (down.length > 0 && down.length < 3) {
    for (const n of down) {
      log(`cluster node mpc${n} is down; restarting it`)
      const r = await clusterSh(["restart", String(n)], 300_000)
      if (r.code !== 0) log(`restart mpc${n} failed (${r.code}): ${oneLine(r)}`)
    }
    if ((await clusterSh(["status"], 120_000)).code === 0) return `restarted mpc${down.join(", mpc")}`
  }
  log("starting the cluster (bash scripts/cluster.sh start)")
  const started = await clusterSh(["start"], 900_000)
  if (started.code !== 0) throw new Error(`cluster.sh start failed (${started.code}): ${oneLine(started)}`)
  const after = await clusterSh(["status"], 120_000)
  if (after.code !== 0) throw new Error(`cluster still not complete after start: ${oneLine(after)}`)
  return `started it (${(started.ms / 1000).toFixed(1)} s)`
}

/** Whether the node accepts TCP connections on its AMQP port (bounded to 1 s). */
export const portOpen = (node: ClusterNode): Promise<boolean> =>
  new Promise((resolvePromise) => {
    const socket = net.connect({ host: "127.0.0.1", port: node.port })
    const done = (open: boolean) => {
      socket.destroy()
      resolvePromise(open)
    }
    socket.setTimeout(1_000, () => done(false))
    socket.once("connect", () => done(true))
    socket.once("error", () => done(false))
  })

/** Copies each node's RabbitMQ log into `dir` (best effort: cluster.sh start wipes them). */
export const copyNodeLogs = (nodes: ReadonlyArray<ClusterNode>, dir: string): Array<string> => {
  const clusterDir = resolve(process.env["CLUSTER_DIR"] || `${process.env["TMPDIR"] || "/tmp"}/messaging-proxy-cluster`)
  return nodes.flatMap((node) => {
    const name = `mpc${node.index}`
    try {
      const target = join(dir, `node-${name}.log`)
      copyFileSync(join(clusterDir, name, "log", `${node.name}.log`), target)
      return [target]
    } catch {
      return []
    }
  })
}

export const killNode = (node: ClusterNode): Promise<ShellResult> => clusterSh(["kill", String(node.index)], 120_000)
export const restartNode = (node: ClusterNode): Promise<ShellResult> => clusterSh(["restart", String(node.index)], 300_000)
export const describeShell = oneLine

export interface QueueMembers {
  readonly leader: string
  readonly members: ReadonlyArray<string>
  readonly online: ReadonlyArray<string>
}

/** Leader, members and online members of a quorum queue, asked of the first node that answers. */
export const quorumMembers = async (
  queue: string,
  nodes: ReadonlyArray<ClusterNode>
): Promise<QueueMembers | undefined> => {
  for (const node of nodes) {
    const r = await clusterSh(["ctl", String(node.index), "list_queues", "name", "leader", "members", "online", "--quiet", "--formatter", "json"], 30_000)
    if (r.code !== 0) continue
    try {
      const rows = JSON.parse(r.stdout) as Array<Record<string, unknown>>
      const row = rows.find((q) => q["name"] === queue)
      if (row === undefined) return undefined
      const list = (v: unknown): Array<string> => Array.isArray(v) ? v.map(String) : []
      return { leader: String(row["leader"] ?? ""), members: list(row["members"]), online: list(row["online"]) }
    } catch {
      continue
    }
  }
  return undefined
}

// ---- connections that fail over ---------------------------------------------------------------

/** A node order shuffled once, walked from `start`; `advance` moves to the next node. */
export class NodeOrder {
  private at: number
  readonly order: ReadonlyArray<ClusterNode>
  constructor(nodes: ReadonlyArray<ClusterNode>, start = 0) {
    const copy = [...nodes]
    for (let i = copy.length - 1; i > 0; i--) {
      const j = Math.floor(Math.random() * (i + 1))
      ;[copy[i], copy[j]] = [copy[j]!, copy[i]!]
    }
    this.order = copy
    this.at = start % copy.length
  }
  current(): ClusterNode {
    return this.order[this.at]!
  }
  advance(): void {
    this.at = (this.at + 1) % this.order.length
  }
}

export interface Connected {
  readonly connection: amqp.ChannelModel
  readonly node: ClusterNode
  /** Resolves (with the reason) when the connection closes or fails. */
  readonly closed: Promise<string>
}

/**
 * Connects to the order's current node, moving on to the next node after each failure, until one
 * accepts or `deadlineMs` passes. Every attempt is bounded (a node that is booting may hang).
 */
export const connectFailover = async (
  order: NodeOrder,
  name: string,
  deadlineMs: number,
  onAttemptFailed: (node: ClusterNode, error: string) => void = () => undefined
): Promise<Connected> => {
  const until = Date.now() + deadlineMs
  let round = 0
  while (true) {
    for (let i = 0; i < order.order.length; i++) {
      const node = order.current()
      try {
        const attempt = amqp.connect(nodeUrl(node), { clientProperties: { connection_name: name } })
        const connection = await within(attempt, 5_000)
        if (connection === undefined) {
          void attempt.then((c) => c.close()).catch(() => undefined)
          throw new Error("connect timed out after 5 s")
        }
        const closed = new Promise<string>((resolve) => {
          connection.on("error", (e: unknown) => resolve(errorText(e)))
          connection.on("close", (e: unknown) => resolve(e === undefined ? "closed" : errorText(e)))
        })
        return { connection, node, closed }
      } catch (error) {
        onAttemptFailed(node, errorText(error))
        order.advance()
      }
    }
    if (Date.now() > until) throw new Error(`no cluster node accepted a connection for ${deadlineMs / 1000} s`)
    await sleep(Math.min(2_000, 200 * 2 ** round++))
  }
}

/**
 * An admin connection to whichever node is up: `use` runs `f` on a fresh channel of the current
 * connection, reconnecting to the next node when the connection is gone or the call fails with
 * a closed connection; each try is bounded by `timeoutMs`.
 */
export class FailoverAdmin {
  private live: Connected | undefined
  private readonly order: NodeOrder
  constructor(nodes: ReadonlyArray<ClusterNode>, private readonly name: string) {
    this.order = new NodeOrder(nodes)
  }

  private async connection(): Promise<Connected> {
    if (this.live !== undefined) return this.live
    const live = await connectFailover(this.order, this.name, 60_000)
    this.live = live
    void live.closed.then(() => {
      if (this.live === live) {
        this.live = undefined
        this.order.advance()
      }
    })
    return live
  }

  async use<A>(what: string, f: (channel: amqp.Channel) => Promise<A>, timeoutMs = 15_000, tries = 3): Promise<A> {
    let last: unknown
    for (let attempt = 0; attempt < tries; attempt++) {
      const live = await this.connection()
      let channel: amqp.Channel | undefined
      try {
        const result = await within(
          (async () => {
            channel = await live.connection.createChannel()
            channel.on("error", () => undefined)
            return { value: await f(channel) }
          })(),
          timeoutMs
        )
        if (result === undefined) throw new Error(`${what}: no answer in ${timeoutMs} ms`)
        return result.value
      } catch (error) {
        last = error
        // A timeout or a closed connection: try again on another node.
        if (this.live === live && (/no answer|closed|CONNECTION|ECONN/i.test(errorText(error)))) {
          this.live = undefined
          this.order.advance()
          void live.connection.close().catch(() => undefined)
        }
        if (!/no answer|closed|CONNECTION|ECONN/i.test(errorText(error))) break
      } finally {
        const c = channel
        if (c !== undefined) void within(c.close().catch(() => undefined), 2_000)
      }
    }
    throw new Error(`${what}: ${errorText(last)}`)
  }

  node(): ClusterNode | undefined {
    return this.live?.node
  }

  async close(): Promise<void> {
    const live = this.live
    this.live = undefined
    if (live !== undefined) await within(live.connection.close().catch(() => undefined), 5_000)
  }
}

// ---- the publisher -----------------------------------------------------------------------------

export interface PublisherOptions {
  readonly nodes: ReadonlyArray<ClusterNode>
  readonly exchange: string
  readonly routingKey: string
  readonly ids: ReadonlyArray<string>
  readonly body: (id: string) => Buffer
  /** Fresh ids go out evenly (a few every 20 ms) over this long. */
  readonly spreadMs: number
  /** A publish not confirmed in this long is published again, on the next node. */
  readonly confirmTimeoutMs: number
  /** Stop retrying after this long past the schedule (ids still unconfirmed are reported). */
  readonly giveUpMs: number
  readonly onConfirmed: (id: string, at: number) => void
  readonly onEvent: (text: string) => void
  /** The node the publisher is connected to now (undefined while it has no connection). */
  readonly onNode: (node: ClusterNode | undefined) => void
  readonly stop: AbortSignal
}

export interface PublisherResult {
  readonly confirmed: number
  /** Ids that were published more than once (a retry after a failed or unconfirmed publish). */
  readonly retried: number
  readonly attempts: number
  readonly nacked: number
  readonly returned: number
  /** Publishes cut short by a closed channel or connection (their node died). */
  readonly cut: number
  readonly timedOut: number
  readonly connections: Array<string>
  readonly unconfirmed: Array<string>
  readonly errors: Array<string>
}

interface PublishSession extends Connected {
  /** 1 for the publisher's first connection, 2 for the next, ... */
  readonly seq: number
  readonly channel: amqp.ConfirmChannel
  readonly returned: Set<string>
}

/**
 * Publishes every id, persistent and mandatory, on a confirm channel to one node at a time,
 * pipelined: fresh ids go out on schedule while earlier ones still wait for their confirms, so a
 * node that dies always takes publishes in flight with it. An id counts once the broker confirmed
 * it without returning it. Any other outcome (nack, return, channel or connection closed, no
 * confirm within `confirmTimeoutMs`) puts it back in line, to go out again before any fresh id;
 * a closed channel, a nack or a timeout also moves the publisher to the next node. Ids go out in
 * order and none is skipped: a retry may make a duplicate, never a gap.
 */
export const runPublisher = async (options: PublisherOptions): Promise<PublisherResult> => {
  const order = new NodeOrder(options.nodes)
  const started = Date.now()
  const total = options.ids.length
  const retry: Array<string> = []
  const confirmed = new Set<string>()
  /** id -> the attempt whose outcome counts, and when it went out. */
  const outstanding = new Map<string, { attempt: number; at: number; session: PublishSession }>()
  let attempts = 0
  const result = {
    confirmed: 0,
    retried: 0,
    attempts: 0,
    nacked: 0,
    returned: 0,
    cut: 0,
    timedOut: 0,
    connections: [] as Array<string>,
    unconfirmed: [] as Array<string>,
    errors: [] as Array<string>
  }
  const sentBefore = new Set<string>()
  const error = (text: string) => {
    if (result.errors.length < 30) result.errors.push(`${new Date().toISOString()} ${text}`)
  }
  let next = 0
  let live: PublishSession | undefined
  const drop = (session: PublishSession, why: string) => {
    if (live !== session) return
    live = undefined
    options.onNode(undefined)
    options.onEvent(`publisher: leaving ${session.node.name} (${why}); ${[...outstanding.values()].filter((o) => o.session === session).length} publish(es) unconfirmed on it`)
    order.advance()
    // Closing the channel fails its outstanding confirms: they go back in line.
    void within(session.connection.close().catch(() => undefined), 3_000)
  }
  /** Failures of one kind on one session, counted once per session and kind in the error log. */
  const reported = new Set<string>()
  const failed = (id: string, session: PublishSession, why: string) => {
    const key = `${session.seq} ${why}`
    if (!reported.has(key)) {
      reported.add(key)
      error(`publish of ${id} on ${session.node.name} (connection ${session.seq}) failed (${why}); it and any others like it are published again`)
    }
    if (!confirmed.has(id)) retry.push(id)
  }
  const settle = (id: string, attempt: number, session: PublishSession, outcome: string | undefined) => {
    const current = outstanding.get(id)
    if (current === undefined || current.attempt !== attempt) return // given up on already (timeout)
    outstanding.delete(id)
    if (outcome === undefined && !session.returned.delete(id)) {
      if (!confirmed.has(id)) {
        confirmed.add(id)
        options.onConfirmed(id, Date.now())
      }
      return
    }
    if (outcome === undefined) {
      result.returned++
      failed(id, session, "returned as unroutable")
    } else if (outcome === "message nacked") {
      result.nacked++
      failed(id, session, "nacked")
      drop(session, "nack")
    } else {
      result.cut++
      failed(id, session, outcome)
      drop(session, outcome)
    }
  }
  const connect = async (): Promise<PublishSession | undefined> => {
    try {
      const c = await connectFailover(order, "messaging-proxy chaos publisher", 30_000, (node, e) => error(`connect ${node.name}: ${e}`))
      const channel = await c.connection.createConfirmChannel()
      channel.on("error", () => undefined)
      const returned = new Set<string>()
      channel.on("return", (message: amqp.Message) => void returned.add(String(message.properties.messageId)))
      const session: PublishSession = { ...c, seq: result.connections.length + 1, channel, returned }
      void c.closed.then((reason) => drop(session, `connection closed: ${reason}`))
      result.connections.push(`${new Date().toISOString()} ${c.node.name}`)
      options.onNode(c.node)
      options.onEvent(`publisher: connected to ${c.node.name}`)
      return session
    } catch (e) {
      error(errorText(e))
      order.advance()
      return undefined
    }
  }

  while (next < total || retry.length > 0 || outstanding.size > 0) {
    if (options.stop.aborted || Date.now() - started > options.spreadMs + options.giveUpMs) break
    await sleep(20)
    const now = Date.now()
    // No confirm in time: publish again elsewhere (the broker may still have it: a duplicate).
    for (const [id, o] of outstanding) {
      if (now - o.at < options.confirmTimeoutMs) continue
      outstanding.delete(id)
      result.timedOut++
      failed(id, o.session, `no confirm in ${options.confirmTimeoutMs} ms`)
      drop(o.session, "confirm timeout")
    }
    const due = options.spreadMs <= 0 ? total : Math.min(total, Math.ceil(((now - started) / options.spreadMs) * total))
    if (retry.length === 0 && next >= due) continue
    live ??= await connect()
    const session = live
    if (session === undefined) continue
    const batch = [...new Set(retry.splice(0))].filter((id) => !confirmed.has(id) && !outstanding.has(id)).sort()
    while (next < due) batch.push(options.ids[next++]!)
    for (const id of batch) {
      if (live !== session) {
        if (!confirmed.has(id)) retry.push(id)
        continue
      }
      const attempt = ++attempts
      result.attempts++
      if (sentBefore.has(id)) result.retried++
      sentBefore.add(id)
      outstanding.set(id, { attempt, at: Date.now(), session })
      try {
        session.channel.publish(
          options.exchange,
          options.routingKey,
          options.body(id),
          { persistent: true, messageId: id, mandatory: true },
          (e: unknown) => settle(id, attempt, session, e == null ? undefined : errorText(e))
        )
      } catch (e) {
        settle(id, attempt, session, errorText(e))
      }
    }
  }
  if (live !== undefined) drop(live, "done")
  result.confirmed = confirmed.size
  result.unconfirmed = options.ids.filter((id) => !confirmed.has(id))
  return result
}
