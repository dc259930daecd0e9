/**
 * Chaos run against the local 3-node RabbitMQ cluster (scripts/cluster.sh): proves "no message
 * lost" for acknowledged subscriptions on quorum queues while broker nodes, proxies and consumers
 * die.
 *
 *   npm run chaos -- --cluster
 *
 * Makes sure the cluster runs (starts it, or restarts a node that is down; it is left running),
 * then starts TWO proxies as child processes, each on a fixed gRPC port of its own and each given
 * all three nodes in RABBITMQ_HOSTS, with RABBITMQ_QUEUE_TYPE=quorum and queue names under a random
 * `chaos.<hex>` prefix. CHAOS_CLIENTS consumer processes (chaos-client.ts, SubscribeSchemaMessages
 * with acks) are spread over both proxies. CHAOS_N schema messages with unique ids are published
 * straight to the cluster by a publisher that fails over among the nodes itself: confirmed,
 * mandatory, and an id whose publish failed or was not confirmed (its node died) is published
 * again, on the next node if its connection went away. It may make duplicates, never a gap; only
 * confirmed ids count as published.
 *
 * Faults, each at least once, with time: kill -9 of the node that leads the schemas queue
 * (kill-leader) and of a node that follows it (kill-follower), each restarted CHAOS_NODE_DOWN_SECONDS
 * later (restart-node); never two nodes down at once (a node is only killed while all three members
 * of the schemas queue are online); SIGKILL of one of the proxies and its restart on the same port
 * (kill-proxy); a consumer cancelling its call (cancel-call) and a consumer SIGKILLed and replaced
 * (kill-client). Optional: SIGTERM of a proxy (term-proxy).
 *
 * It ends when every published id was received, or nothing new arrived for CHAOS_TIMEOUT_SECONDS,
 * then prints `published=N received-unique=U lost=L duplicates=D`, the nodes and proxies used, the
 * fault log, what is left in the queue and in its `.dead` queue (a never-received message there
 * counts as lost, with the reason it was dead-lettered), deletes every queue and the exchange of
 * the run, and exits 1 when a message was lost (duplicates are allowed: at-least-once).
 *
 * Knobs (env): CHAOS_N (10000), CHAOS_TIMEOUT_SECONDS (120), CHAOS_CLIENTS (6),
 * CHAOS_PUBLISH_SECONDS (60), CHAOS_FAULT_INTERVAL_SECONDS (4), CHAOS_NODE_DOWN_SECONDS (8),
 * CHAOS_MAX_IN_FLIGHT (32), CHAOS_HOLD_MS ("20-300"), CHAOS_FAULTS (comma-separated subset of
 * kill-leader, kill-follower, kill-proxy, term-proxy, cancel-call, kill-client; all but term-proxy
 * by default), CLUSTER_BASE_PORT (as for cluster.sh: 5681).
 */
import type * as amqp from "amqplib"
import { join } from "node:path"
import { delayQueuesOf, makeNames, proxyEnv, type TestNames } from "../test/support/harness.js"
import {
  type ClusterNode,
  clusterNodes,
  copyNodeLogs,
  describeShell,
  ensureCluster,
  FailoverAdmin,
  hostPort,
  killNode,
  portOpen,
  type PublisherResult,
  quorumMembers,
  restartNode,
  runPublisher
} from "./chaos-nodes.js"
import {
  chaosProxyTimeouts,
  ClientPool,
  makeClock,
  makeLogDir,
  messageBody,
  messageId,
  messageIdOf,
  newRunState,
  parseFaultKinds,
  proxyLogSink,
  proxyMain,
  queueAfterClients,
  readSettings,
  runFaultLoop,
  type RunState,
  signalAndRestartProxy,
  stopProxy,
  Supervisor,
  waitForEnd,
  waitQueueEmpty,
  writeReport
} from "./chaos-run.js"
import {
  envNumber,
  errorText,
  formatTally,
  freePort,
  type ProxyInstance,
  sleep,
  startProxyProcess,
  Tally,
  truncate
} from "./chaos-support.js"

// ---- settings ----------------------------------------------------------------------------------

const settings = readSettings({ clients: 6, publishSeconds: 60 }, () => ({
  nodeDownMs: envNumber("CHAOS_NODE_DOWN_SECONDS", 8, 0) * 1000
}))

type FaultKind = "kill-leader" | "kill-follower" | "kill-proxy" | "term-proxy" | "cancel-call" | "kill-client"
const allFaultKinds: ReadonlyArray<FaultKind> = ["kill-leader", "kill-follower", "kill-proxy", "term-proxy", "cancel-call", "kill-client"]
const defaultFaultKinds: ReadonlyArray<FaultKind> = allFaultKinds.filter((k) => k !== "term-proxy")
const isNodeFault = (kind: FaultKind): kind is "kill-leader" | "kill-follower" => kind === "kill-leader" || kind === "kill-follower"

const parseClusterFaultKinds = (): ReadonlyArray<FaultKind> => parseFaultKinds("chaos --cluster", allFaultKinds, defaultFaultKinds)

const clock = makeClock("chaos --cluster")
const { t0, elapsed, progress } = clock

// ---- bookkeeping -------------------------------------------------------------------------------

interface State extends RunState<FaultKind | "restart-node"> {
  readonly publisherEvents: Array<string>
}

const newState = (): State => ({ ...newRunState<FaultKind | "restart-node">(), publisherEvents: [] })

/** One of the two proxies: a fixed port, and the instances that served on it one after another. */
interface ProxySlot {
  readonly slot: number
  readonly port: number
  current: ProxyInstance | undefined
  readonly history: Array<{ readonly instance: ProxyInstance; readonly nodes: Array<string>; connectionLosses: number; exit?: string }>
}

/** A message taken off a queue at the end: its id and, for the dead-letter queue, why it is there. */
interface Drained {
  readonly id: string
  readonly why: string
}

// ---- the run -----------------------------------------------------------------------------------

const run = async (
  names: TestNames,
  nodes: ReadonlyArray<ClusterNode>,
  admin: FailoverAdmin,
  state: State,
  cleanup: Array<() => Promise<void>>
): Promise<number> => {
  const faultKinds = parseClusterFaultKinds()
  const logDir = makeLogDir(names.prefix)
  const nodeName = (label: unknown): string => {
    const port = Number(String(label).split(":").pop())
    return nodes.find((n) => n.port === port)?.name ?? String(label)
  }
  const up = (): Array<ClusterNode> => nodes.filter((n) => !down.has(n.index))
  /** Nodes we killed and have not restarted yet (never more than one). */
  const down = new Set<number>()

  const slots: Array<ProxySlot> = []
  for (const slot of [1, 2]) slots.push({ slot, port: await freePort(), current: undefined, history: [] })
  progress(`names ${names.prefix}, proxies on ports ${slots.map((s) => s.port).join(" and ")}, logs in ${logDir}`)
  progress(`settings ${JSON.stringify({ ...settings, faults: faultKinds })}`)

  // -- the proxies, supervised: an exit we did not cause is logged and the proxy restarted.
  const hosts = nodes.map(hostPort).join(",")
  const envOf = (slot: ProxySlot) =>
    proxyEnv(names, {
      MESSAGING_CONNECTION_PORT: String(slot.port),
      RABBITMQ_HOSTS: hosts,
      RABBITMQ_QUEUE_TYPE: "quorum",
      RABBITMQ_CONNECTION_NAME: `messaging-proxy ${names.prefix} #${slot.slot}`,
      ...chaosProxyTimeouts
    })
  let instanceCount = 0
  const historyOf = new Map<number, ProxySlot["history"][number]>()
  const supervisor = new Supervisor(state, progress)
  const sink = proxyLogSink(state, names.prefix, (line) => {
    const entry = historyOf.get(line.instance)
    if (line.text === "connected to broker" && entry !== undefined) entry.nodes.push(nodeName(line.fields["node"]))
    if (line.text === "broker connection lost, reconnecting" && entry !== undefined) entry.connectionLosses++
  })
  const startProxy = async (slot: ProxySlot): Promise<ProxyInstance> => {
    const number = ++instanceCount
    const instance = startProxyProcess(number, proxyMain, envOf(slot), join(logDir, `proxy-${slot.slot}-${number}.log`), sink)
    const entry: ProxySlot["history"][number] = { instance, nodes: [], connectionLosses: 0 }
    historyOf.set(number, entry)
    slot.history.push(entry)
    slot.current = instance
    void instance.exited.then((exit) => {
      entry.exit = exit.signal ?? `code ${exit.code}`
    })
    supervisor.watchProxy(instance, ` (port ${slot.port})`, () => slot.current === instance, () => startProxy(slot))
    await instance.ready
    return instance
  }
  cleanup.push(async () => {
    supervisor.shuttingDown = true
    await Promise.all(slots.map((slot) => stopProxy(slot.current)))
  })
  await Promise.all(slots.map(startProxy))
  progress(`proxies connected: ${slots.map((s) => `#${s.current?.number} on port ${s.port} via ${s.history.at(-1)?.nodes[0] ?? "?"}`).join(", ")}`)
  // The proxy declares the topology before it says "connected"; make sure the queue is there
  // (else the first publishes come back unroutable).
  await admin.use("check the schemas queue", (ch) => ch.checkQueue(names.schemas), 15_000, 10)

  // -- consumers, spread over both proxies, supervised the same way.
  const clients = new ClientPool<FaultKind | "restart-node", ProxySlot>({
    state,
    supervisor,
    settings,
    logDir,
    prefix: names.prefix,
    port: (slot) => slot.port,
    where: (slot) => ` (proxy port ${slot.port})`,
    replacementNote: " on the same proxy"
  })
  cleanup.push(() => clients.killAll())
  for (let i = 0; i < settings.clients; i++) clients.start(slots[i % 2]!)

  // -- the publisher, failing over among the nodes by itself.
  const ids = Array.from({ length: settings.n }, (_, i) => messageId(names.prefix, i))
  const stopPublisher = new AbortController()
  let publishDone = false
  let publisherResult: PublisherResult | undefined
  let publisherNode: ClusterNode | undefined
  const publisher = runPublisher({
    nodes,
    exchange: names.exchange,
    routingKey: "schemas.chaos",
    ids,
    body: messageBody,
    spreadMs: settings.publishMs,
    confirmTimeoutMs: 20_000,
    giveUpMs: settings.timeoutMs,
    onConfirmed: (id, at) => state.published.set(id, at),
    onEvent: (text) => {
      state.publisherEvents.push(`${elapsed()} ${text}`)
      progress(text)
    },
    onNode: (node) => {
      publisherNode = node
    },
    stop: stopPublisher.signal
  }).then((result) => {
    publisherResult = result
    publishDone = true
    progress(`published ${state.published.size} confirmed (${result.attempts} publishes, ${result.unconfirmed.length} never confirmed)`)
    return result
  })

  // -- faults
  const stopFaults = new AbortController()
  const record = (kind: FaultKind | "restart-node" | "unexpected", detail: string) => supervisor.record(kind, detail)
  const restartProxy = async (signal: "SIGKILL" | "SIGTERM"): Promise<void> => {
    const slot = slots[Math.floor(Math.random() * slots.length)]!
    const old = slot.current
    if (old === undefined) return
    const entry = record(signal === "SIGKILL" ? "kill-proxy" : "term-proxy", `proxy #${old.number} (port ${slot.port}, on ${slot.history.at(-1)?.nodes.at(-1) ?? "?"}) pid=${old.pid} ${signal}`)
    const { next, killedAt } = await signalAndRestartProxy(old, signal, entry, () => startProxy(slot))
    entry.detail += `; proxy #${next.number} on the same port connected via ${slot.history.at(-1)?.nodes[0] ?? "?"} ${Date.now() - killedAt} ms after the kill`
  }

  /** The node fault in progress (kill, time down, restart, members back online), if any. */
  let nodeFault: Promise<void> | undefined
  /** Starts a node fault; false when it cannot start now (a member of the queue is not online). */
  const startNodeFault = async (kind: "kill-leader" | "kill-follower"): Promise<boolean> => {
    const members = await quorumMembers(names.schemas, up())
    if (members === undefined || members.online.length < nodes.length || down.size > 0) {
      progress(`${kind} postponed: schemas queue members online: ${members?.online.join(", ") ?? "unknown"}`)
      return false
    }
    const leader = nodes.find((n) => n.name === members.leader)
    if (leader === undefined) {
      progress(`${kind} postponed: no leader for the schemas queue (${members.leader})`)
      return false
    }
    // A follower that the publisher or a proxy is connected to, if there is one: its failover is
    // part of what the run checks.
    const followers = nodes.filter((n) => n !== leader)
    const usedBy = (node: ClusterNode): Array<string> => [
      ...(publisherNode === node ? ["the publisher"] : []),
      ...slots.filter((s) => s.history.at(-1)?.nodes.at(-1) === node.name).map((s) => `proxy #${s.current?.number}`)
    ]
    const preferred = followers.find((n) => publisherNode === n) ?? followers.find((n) => usedBy(n).length > 0)
    const target = kind === "kill-leader" ? leader : preferred ?? followers[Math.floor(Math.random() * followers.length)]!
    const users = usedBy(target)
    const entry = record(
      kind,
      `kill -9 ${target.name} (port ${target.port}), ${target === leader ? "the leader" : "a follower"} of ${names.schemas} ` +
        `(leader ${leader.name}); connected to it: ${users.length > 0 ? users.join(", ") : "nobody of ours"}`
    )
    down.add(target.index)
    const killed = await killNode(target)
    entry.detail += `; cluster.sh kill: exit ${killed.code} after ${killed.ms} ms: ${describeShell(killed)}`
    if (killed.code !== 0) entry.detail += " (FAILED)"
    const killedAt = Date.now()
    nodeFault = (async () => {
      await sleep(Math.max(0, killedAt + settings.nodeDownMs - Date.now()), stopFaults.signal)
      const during = await quorumMembers(names.schemas, up())
      const restart = record("restart-node", `${target.name} after ${((Date.now() - killedAt) / 1000).toFixed(1)} s down (leader meanwhile: ${during?.leader ?? "?"})`)
      let restarted = await restartNode(target)
      if (restarted.code !== 0) {
        restart.detail += `; first restart failed (${restarted.code}: ${describeShell(restarted)}), trying again`
        await sleep(2_000)
        restarted = await restartNode(target)
      }
      restart.detail += `; cluster.sh restart: exit ${restarted.code} after ${restarted.ms} ms`
      if (restarted.code !== 0) {
        restart.detail += ` (FAILED: ${describeShell(restarted)})`
        return
      }
      down.delete(target.index)
      // Wait until the schemas queue has all its members online again before the next node fault.
      const since = Date.now()
      while (Date.now() - since < 60_000) {
        const now = await quorumMembers(names.schemas, up())
        if (now !== undefined && now.online.length === nodes.length) {
          restart.detail += `; all ${nodes.length} members online ${Date.now() - since} ms later, leader ${now.leader}`
          return
        }
        await sleep(500)
      }
      restart.detail += "; NOT all members online 60 s later"
    })().catch((e) => void record("restart-node", `FAILED: ${errorText(e)}`)).finally(() => {
      nodeFault = undefined
    })
    return true
  }

  const runFault = async (kind: FaultKind): Promise<boolean> => {
    switch (kind) {
      case "kill-leader":
      case "kill-follower":
        return startNodeFault(kind)
      case "cancel-call":
        clients.cancelCall((detail) => record(kind, detail))
        return true
      case "kill-client":
        await clients.killClient((detail) => record(kind, detail))
        return true
      case "kill-proxy":
        await restartProxy("SIGKILL")
        return true
      case "term-proxy":
        await restartProxy("SIGTERM")
        return true
    }
  }
  const faultLoop = runFaultLoop({
    kinds: faultKinds,
    intervalMs: settings.faultIntervalMs,
    stop: stopFaults.signal,
    publishDone: () => publishDone,
    run: runFault,
    record,
    // A node fault waits while another one is in progress (never two nodes down).
    hold: {
      blocked: (kind) => isNodeFault(kind) && nodeFault !== undefined,
      wait: () => Promise.race([nodeFault, sleep(60_000, stopFaults.signal)])
    }
  })
  /** Waits for the node fault in progress, then makes sure every node runs again. */
  const allNodesUp = async (): Promise<void> => {
    while (nodeFault !== undefined) await nodeFault
    if (down.size > 0) {
      progress(`nodes still down: ${[...down].join(", ")}; bringing the cluster back`)
      progress(await ensureCluster(progress))
      down.clear()
    }
  }
  cleanup.push(allNodesUp)

  // -- a node that goes down without our kill (someone else's cluster.sh, a crash) is a fault too.
  const watchNodes = new AbortController()
  const watcher = (async () => {
    const seenDown = new Set<number>()
    while (!watchNodes.signal.aborted) {
      for (const node of nodes) {
        if (down.has(node.index)) {
          seenDown.delete(node.index)
          continue
        }
        const open = await portOpen(node)
        if (!open && !seenDown.has(node.index) && !down.has(node.index)) {
          seenDown.add(node.index)
          record("unexpected", `${node.name} (port ${node.port}) is down, and this run did not kill it (another cluster.sh user?)`)
        } else if (open && seenDown.delete(node.index)) {
          record("unexpected", `${node.name} (port ${node.port}) is up again`)
        }
      }
      await sleep(1_000, watchNodes.signal)
    }
  })()
  cleanup.push(async () => {
    watchNodes.abort()
    await watcher
  })

  // -- wait until everything arrived, or nothing new did for CHAOS_TIMEOUT_SECONDS.
  const check = (queue: string) => admin.use(`check ${queue}`, (ch) => ch.checkQueue(queue))
  const outcome = await waitForEnd({
    state,
    timeoutMs: settings.timeoutMs,
    publishDone: () => publishDone,
    status: () =>
      `clients=${clients.size} proxies=${slots.map((s) => `#${s.current?.number ?? "-"}`).join(",")} ` +
      `down=${[...down].map((i) => `mpc${i}`).join(",") || "none"} faults=${state.faults.length}`,
    queueCounts: async () => {
      const [queue, dead] = await Promise.all([names.schemas, names.schemasDead].map((q) => check(q).catch(() => undefined)))
      return queue === undefined || dead === undefined ? undefined : { queue: queue.messageCount, dead: dead.messageCount }
    },
    progress
  })
  stopFaults.abort()
  await faultLoop
  stopPublisher.abort()
  await publisher
  await allNodesUp()

  // -- drain: let the consumers take the duplicates still queued, then stop them gracefully.
  await waitQueueEmpty(async () => (await admin.use("check queue", (ch) => ch.checkQueue(names.schemas)).catch(() => undefined))?.messageCount)
  await clients.stopAll()

  // -- what is left in the broker, once the proxies hold no consumer any more.
  const { queue: q, detail: queueDetail } = await queueAfterClients(() => check(names.schemas))
  const dead = await check(names.schemasDead)
  const left = await drainMessages(admin, names.schemas)
  const deadMessages = await drainMessages(admin, names.schemasDead)
  const others = await Promise.all(
    [names.validations, names.schemaResults, names.validationResults, names.validationsDead].map(async (queue) => {
      const s = await check(queue).catch((e: unknown) => errorText(e))
      return `${queue.replace(names.prefix, "<prefix>")}: ${typeof s === "string" ? s : s.messageCount}`
    })
  )
  const members = await quorumMembers(names.schemas, nodes)
  watchNodes.abort()
  await watcher
  const nodeLogs = copyNodeLogs(nodes, logDir)

  // -- report
  const head: Array<string> = []
  head.push(
    `outcome: ${outcome}; ${((Date.now() - t0) / 1000).toFixed(1)} s; ${instanceCount} proxy instance(s) on 2 ports, ` +
      `${clients.count} client process(es)`
  )
  head.push(`nodes: ${nodes.map((n) => `${n.name} 127.0.0.1:${n.port}`).join(", ")}; queue type quorum; schemas queue members now: ` +
    (members === undefined ? "unknown" : `leader ${members.leader}, online ${members.online.join(" ")}`))
  for (const slot of slots) {
    head.push(
      `proxy port ${slot.port}: ` +
        slot.history.map((h) =>
          `#${h.instance.number} pid=${h.instance.pid} on ${h.nodes.join(" -> ") || "?"}` +
          (h.connectionLosses > 0 ? ` (${h.connectionLosses} connection loss(es))` : "") +
          (h.exit !== undefined ? ` [${h.exit}]` : "")
        ).join("; ")
    )
  }
  const pr = publisherResult
  if (pr !== undefined) {
    head.push(
      `publisher: ${pr.attempts} publishes for ${pr.confirmed} confirmed ids; ${pr.attempts - pr.confirmed} published again ` +
        `(${pr.cut} cut short by a closed channel, ${pr.nacked} nacked, ${pr.returned} returned, ${pr.timedOut} unconfirmed in time); ` +
        `connections: ${pr.connections.map((c) => c.split(" ")[1]).join(" -> ")}`
    )
    if (pr.unconfirmed.length > 0) head.push(`  NEVER CONFIRMED (not counted as published): ${pr.unconfirmed.length}: ${truncate(pr.unconfirmed.slice(0, 10).join(", "), 400)}`)
    for (const e of pr.errors.slice(0, 8)) head.push(`  publisher: ${truncate(e.replaceAll(names.prefix, "<prefix>"), 240)}`)
  }
  const deadWhy = new Tally()
  for (const m of deadMessages) deadWhy.add(`${state.received.has(m.id) ? "received too" : "never received"}: ${m.why}`)
  return writeReport({
    state,
    clock,
    head,
    // A fault that FAILED does not count as exercised.
    missingKinds: faultKinds.filter((k) => !state.faults.some((f) => f.kind === k && !f.detail.includes("FAILED"))),
    queue: { name: names.schemas, messageCount: q.messageCount, ids: left.map((m) => m.id) },
    queueDetail,
    dead: { name: names.schemasDead, messageCount: dead.messageCount, ids: deadMessages.map((m) => m.id) },
    afterQueues: [
      ...(deadWhy.size > 0 ? [`  why dead-lettered: ${formatTally(deadWhy)}`] : []),
      `other queues: ${others.join(", ")}`
    ],
    publishedAs: { noun: "confirm", verb: "confirmed" },
    foreignNote: "",
    afterForeign: [],
    maskSample: (fields) => fields.replaceAll(names.prefix, "<prefix>"),
    logs: `logs: ${logDir} (proxies, clients${nodeLogs.length > 0 ? `, ${nodeLogs.length} node logs` : ""})`
  })
}

const headerText = (value: unknown): string => {
  if (value === undefined || value === null) return ""
  if (Buffer.isBuffer(value)) return value.toString()
  return typeof value === "object" ? JSON.stringify(value) : String(value)
}

/** Why a message is in a dead-letter queue: the proxy's reason header, else the broker's x-death. */
const whyDead = (message: amqp.GetMessage): string => {
  const headers = message.properties.headers ?? {}
  const reason = headerText(headers["x-dead-letter-reason"])
  if (reason !== "") return `proxy: ${reason}`
  const death: unknown = headers["x-death"]
  if (Array.isArray(death) && death.length > 0) {
    const first = death[0] as Record<string, unknown>
    return `broker x-death: ${headerText(first["reason"])} from ${headerText(first["queue"])} (count ${headerText(first["count"])})`
  }
  return "no reason header"
}

/** Takes every message off a queue (no ack needed) and returns their ids and dead-letter reasons. */
const drainMessages = async (admin: FailoverAdmin, queue: string): Promise<Array<Drained>> => {
  const drained: Array<Drained> = []
  try {
    await admin.use(`drain ${queue}`, async (channel) => {
      while (true) {
        const message = await channel.get(queue, { noAck: true })
        if (message === false) return
        drained.push({ id: messageIdOf(message), why: whyDead(message) })
      }
    }, 120_000)
  } catch (error) {
    drained.push({ id: `<could not read ${queue}: ${errorText(error)}>`, why: "" })
  }
  return drained
}

// ---- entry point (called by chaos.ts for --cluster) --------------------------------------------

export const runClusterChaos = async (): Promise<number> => {
  parseClusterFaultKinds() // a bad CHAOS_FAULTS fails before anything starts
  const nodes = clusterNodes()
  progress(`cluster: ${await ensureCluster(progress)} (${nodes.map((n) => `${n.name}=127.0.0.1:${n.port}`).join(", ")})`)
  const names = makeNames("chaos")
  const admin = new FailoverAdmin(nodes, `messaging-proxy chaos admin ${names.prefix}`)
  const state = newState()
  const cleanup: Array<() => Promise<void>> = []
  // Runs last: every queue and the exchange of the run go, whoever declared them.
  cleanup.push(async () => {
    const queues = [
      names.schemas, names.validations, names.schemaResults, names.validationResults, names.schemasDead, names.validationsDead,
      ...delayQueuesOf(names)
    ]
    const failed: Array<string> = []
    for (const queue of queues) {
      await admin.use(`delete ${queue}`, (ch) => ch.deleteQueue(queue)).catch((e: unknown) => void failed.push(`${queue}: ${errorText(e)}`))
    }
    await admin.use(`delete ${names.exchange}`, (ch) => ch.deleteExchange(names.exchange)).catch((e: unknown) => void failed.push(`${names.exchange}: ${errorText(e)}`))
    if (failed.length > 0) progress(`cleanup: could not delete ${failed.join("; ")}`)
    else progress(`cleanup: deleted the ${queues.length} queues and the exchange of ${names.prefix}`)
    await admin.close()
  })
  try {
    return await run(names, nodes, admin, state, cleanup)
  } finally {
    for (const step of cleanup.reverse()) await step().catch((e: unknown) => progress(`cleanup step failed: ${errorText(e)}`))
  }
}
