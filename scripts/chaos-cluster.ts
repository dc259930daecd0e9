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
import { mkdirSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { fileURLToPath } from "node:url"
import { schemaBody } from "../test/fixtures/bodies.js"
import { makeNames, proxyEnv, type TestNames } from "../test/support/harness.js"
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
  type AckedLine,
  type ClientEvent,
  type ClientProcess,
  envNumber,
  errorText,
  formatTally,
  freePort,
  type ProxyInstance,
  type ProxyLogLine,
  sleep,
  startClientProcess,
  startProxyProcess,
  Tally,
  truncate,
  within
} from "./chaos-support.js"

// ---- settings ----------------------------------------------------------------------------------

const settings = (() => {
  const hold = (process.env["CHAOS_HOLD_MS"] ?? "20-300").split("-").map(Number)
  return {
    n: Math.floor(envNumber("CHAOS_N", 10_000, 1)),
    timeoutMs: envNumber("CHAOS_TIMEOUT_SECONDS", 120, 1) * 1000,
    clients: Math.floor(envNumber("CHAOS_CLIENTS", 6, 1)),
    publishMs: envNumber("CHAOS_PUBLISH_SECONDS", 60, 0) * 1000,
    faultIntervalMs: envNumber("CHAOS_FAULT_INTERVAL_SECONDS", 4, 0.5) * 1000,
    nodeDownMs: envNumber("CHAOS_NODE_DOWN_SECONDS", 8, 0) * 1000,
    maxInFlight: Math.floor(envNumber("CHAOS_MAX_IN_FLIGHT", 32, 1)),
    holdMin: Number.isFinite(hold[0]) ? hold[0]! : 20,
    holdMax: Number.isFinite(hold[1]) ? hold[1]! : Number.isFinite(hold[0]) ? hold[0]! : 300
  }
})()

type FaultKind = "kill-leader" | "kill-follower" | "kill-proxy" | "term-proxy" | "cancel-call" | "kill-client"
const allFaultKinds: ReadonlyArray<FaultKind> = ["kill-leader", "kill-follower", "kill-proxy", "term-proxy", "cancel-call", "kill-client"]
const defaultFaultKinds: ReadonlyArray<FaultKind> = allFaultKinds.filter((k) => k !== "term-proxy")
const isNodeFault = (kind: FaultKind): kind is "kill-leader" | "kill-follower" => kind === "kill-leader" || kind === "kill-follower"

const parseFaultKinds = (): ReadonlyArray<FaultKind> => {
  const raw = process.env["CHAOS_FAULTS"]
  if (raw === undefined || raw.trim() === "") return defaultFaultKinds
  const picked = raw.split(",").map((k) => k.trim()).filter((k) => k !== "")
  const unknown = picked.filter((k) => !allFaultKinds.some((f) => f === k))
  if (unknown.length > 0 || picked.length === 0) {
    process.stderr.write(`chaos --cluster: CHAOS_FAULTS: unknown fault(s) ${unknown.join(", ")}; known: ${allFaultKinds.join(", ")}\n`)
    process.exit(2)
  }
  return allFaultKinds.filter((k) => picked.includes(k))
}

const proxyMain = fileURLToPath(new URL("../src/main.js", import.meta.url))
const clientScript = fileURLToPath(new URL("./chaos-client.js", import.meta.url))
const t0 = Date.now()
const elapsed = (at = Date.now()): string => `+${((at - t0) / 1000).toFixed(1)}s`
const progress = (text: string): void => void process.stderr.write(`[chaos --cluster ${elapsed()}] ${text}\n`)

// ---- bookkeeping -------------------------------------------------------------------------------

interface FaultRecord {
  readonly at: number
  readonly kind: FaultKind | "restart-node" | "unexpected"
  detail: string
}

interface State {
  readonly published: Map<string, number> // id -> confirm time
  readonly received: Map<string, number> // id -> times reported
  lines: number
  lastProgressAt: number
  redeliveredFlag: number
  readonly deliveryCounts: Tally
  readonly perClient: Tally
  readonly settleErrors: Tally
  readonly callEnds: Tally
  readonly faults: Array<FaultRecord>
  readonly proxyNotable: Tally
  readonly proxySamples: Map<string, ProxyLogLine>
  readonly subscriptionEnds: Tally
  readonly proxyRaw: Array<string>
  readonly garbage: Array<string>
  readonly publisherEvents: Array<string>
}

const newState = (): State => ({
  published: new Map(),
  received: new Map(),
  lines: 0,
  lastProgressAt: Date.now(),
  redeliveredFlag: 0,
  deliveryCounts: new Tally(),
  perClient: new Tally(),
  settleErrors: new Tally(),
  callEnds: new Tally(),
  faults: [],
  proxyNotable: new Tally(),
  proxySamples: new Map(),
  subscriptionEnds: new Tally(),
  proxyRaw: [],
  garbage: [],
  publisherEvents: []
})

const quietLevels = new Set(["INFO", "DEBUG", "TRACE"])

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
  const faultKinds = parseFaultKinds()
  const logDir = join(tmpdir(), `messaging-proxy-chaos-${names.prefix}`)
  mkdirSync(logDir, { recursive: true })
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
      MESSAGING_SHUTDOWN_TIMEOUT_SECONDS: "2",
      RABBITMQ_RECONNECT_MAX_DELAY_SECONDS: "2"
    })
  let instanceCount = 0
  const historyOf = new Map<number, ProxySlot["history"][number]>()
  let shuttingDown = false
  let unexpectedRestarts = 0
  const sink = {
    onLog: (line: ProxyLogLine) => {
      const entry = historyOf.get(line.instance)
      if (line.text === "connected to broker" && entry !== undefined) entry.nodes.push(nodeName(line.fields["node"]))
      if (line.text === "broker connection lost, reconnecting" && entry !== undefined) entry.connectionLosses++
      if (line.text === "subscription ended") {
        state.subscriptionEnds.add(String(line.fields["reason"] ?? "?").replaceAll(names.prefix, "<prefix>"))
      }
      if (quietLevels.has(line.level)) return
      const key = `${line.level} ${line.text}`
      state.proxyNotable.add(key)
      if (!state.proxySamples.has(key)) state.proxySamples.set(key, line)
    },
    onRaw: (instance: number, stream: "stdout" | "stderr", line: string) => {
      if (state.proxyRaw.length < 200) state.proxyRaw.push(`proxy#${instance} ${stream}: ${line}`)
    }
  }
  const startProxy = async (slot: ProxySlot): Promise<ProxyInstance> => {
    const number = ++instanceCount
    const instance = startProxyProcess(number, proxyMain, envOf(slot), join(logDir, `proxy-${slot.slot}-${number}.log`), sink)
    const entry: ProxySlot["history"][number] = { instance, nodes: [], connectionLosses: 0 }
    historyOf.set(number, entry)
    slot.history.push(entry)
    slot.current = instance
    void instance.exited.then((exit) => {
      entry.exit = exit.signal ?? `code ${exit.code}`
      if (instance.expectedExit || shuttingDown) return
      state.faults.push({
        at: exit.at,
        kind: "unexpected",
        detail: `proxy #${number} (port ${slot.port}) pid=${instance.pid} exited on its own: code=${exit.code} signal=${exit.signal}`
      })
      if (slot.current !== instance) return
      if (++unexpectedRestarts > 10) return progress(`UNEXPECTED: proxy #${number} exited; too many restarts, giving up`)
      progress(`UNEXPECTED: proxy #${number} exited (code=${exit.code} signal=${exit.signal}); restarting`)
      void sleep(500).then(() => startProxy(slot)).catch((e) => progress(errorText(e)))
    })
    await instance.ready
    return instance
  }
  cleanup.push(async () => {
    shuttingDown = true
    await Promise.all(slots.map(async (slot) => {
      const p = slot.current
      if (p === undefined) return
      p.kill("SIGTERM")
      if ((await within(p.exited, 8_000)) === undefined) p.kill("SIGKILL")
    }))
  })
  await Promise.all(slots.map(startProxy))
  progress(`proxies connected: ${slots.map((s) => `#${s.current?.number} on port ${s.port} via ${s.history.at(-1)?.nodes[0] ?? "?"}`).join(", ")}`)
  // The proxy declares the topology before it says "connected"; make sure the queue is there
  // (else the first publishes come back unroutable).
  await admin.use("check the schemas queue", (ch) => ch.checkQueue(names.schemas), 15_000, 10)

  // -- consumers, spread over both proxies, supervised the same way.
  const clients = new Map<string, ClientProcess>()
  const clientSlot = new Map<string, ProxySlot>()
  const pendingCancels = new Map<string, FaultRecord>()
  let clientCount = 0
  const clientSink = {
    onAcked: (client: string, line: AckedLine) => {
      state.lines++
      const before = state.received.get(line.id) ?? 0
      state.received.set(line.id, before + 1)
      if (before === 0) state.lastProgressAt = Date.now()
      if (line.redelivered) state.redeliveredFlag++
      state.deliveryCounts.add(String(line.deliveryCount))
      state.perClient.add(client)
    },
    onEvent: (event: ClientEvent) => {
      if (event.event === "callEnded") {
        const by = event["endedBy"]
        state.callEnds.add(
          by === "cancel" ? "CANCELLED by the client (fault)"
          : by === "stop" ? `${String(event["code"])} after the client's half-close (end of run)`
          : `${String(event["code"])}: ${String(event["details"]).replaceAll(names.prefix, "<prefix>").replace(/ \(\d{4}-[^)]*\)/g, "")}`
        )
      } else if (event.event === "cancelling") {
        const entry = pendingCancels.get(event.client)
        pendingCancels.delete(event.client)
        if (entry !== undefined) entry.detail += `; it held ${String(event["held"])} unacked deliveries on call #${String(event["call"])}`
      } else if (event.event === "settleError") {
        const ids = Array.isArray(event["ids"]) ? event["ids"].length : 0
        state.settleErrors.add(String(event["reason"]), ids)
      }
    },
    onGarbage: (client: string, line: string) => {
      if (state.garbage.length < 50) state.garbage.push(`${client}: ${line}`)
    }
  }
  const startClient = (slot: ProxySlot): ClientProcess => {
    const name = `chaos-${++clientCount}`
    const client = startClientProcess(
      clientScript,
      name,
      [String(slot.port), String(settings.maxInFlight), String(settings.holdMin), String(settings.holdMax)],
      join(logDir, `client-${name}.log`),
      clientSink
    )
    clients.set(name, client)
    clientSlot.set(name, slot)
    void client.exited.then((exit) => {
      clients.delete(name)
      if (client.expectedExit || shuttingDown) return
      state.faults.push({
        at: exit.at,
        kind: "unexpected",
        detail: `${name} pid=${client.pid} exited on its own: code=${exit.code} signal=${exit.signal}; replaced`
      })
      if (++unexpectedRestarts > 10) return progress(`UNEXPECTED: ${name} exited; too many restarts, giving up`)
      progress(`UNEXPECTED: ${name} exited (code=${exit.code} signal=${exit.signal}); starting a replacement`)
      void sleep(500).then(() => {
        if (!shuttingDown) startClient(slot)
      })
    })
    return client
  }
  cleanup.push(async () => {
    shuttingDown = true
    const all = [...clients.values()]
    for (const c of all) c.kill("SIGKILL")
    await Promise.all(all.map((c) => c.exited))
  })
  for (let i = 0; i < settings.clients; i++) startClient(slots[i % 2]!)

  // -- the publisher, failing over among the nodes by itself.
  const ids = Array.from({ length: settings.n }, (_, i) => `${names.prefix}-${String(i).padStart(6, "0")}`)
  const stopPublisher = new AbortController()
  let publishDone = false
  let publisherResult: PublisherResult | undefined
  let publisherNode: ClusterNode | undefined
  const publisher = runPublisher({
    nodes,
    exchange: names.exchange,
    routingKey: "schemas.chaos",
    ids,
    body: (id) => Buffer.from(JSON.stringify(schemaBody(id))),
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
  const doneKinds = new Set<FaultKind>()
  const record = (kind: FaultRecord["kind"], detail: string): FaultRecord => {
    const entry: FaultRecord = { at: Date.now(), kind, detail }
    state.faults.push(entry)
    progress(`fault ${kind}: ${detail}`)
    return entry
  }
  const pickClient = (): ClientProcess | undefined => {
    const alive = [...clients.values()].filter((c) => c.alive && !c.expectedExit)
    return alive[Math.floor(Math.random() * alive.length)]
  }
  const restartProxy = async (signal: "SIGKILL" | "SIGTERM"): Promise<void> => {
    const slot = slots[Math.floor(Math.random() * slots.length)]!
    const old = slot.current
    if (old === undefined) return
    const entry = record(signal === "SIGKILL" ? "kill-proxy" : "term-proxy", `proxy #${old.number} (port ${slot.port}, on ${slot.history.at(-1)?.nodes.at(-1) ?? "?"}) pid=${old.pid} ${signal}`)
    const killedAt = Date.now()
    old.kill(signal)
    const exit = await within(old.exited, 10_000)
    if (exit === undefined) {
      entry.detail += "; still running 10 s later (SUSPICIOUS), SIGKILLed"
      old.kill("SIGKILL")
      await old.exited
    } else {
      entry.detail += `; exited code=${exit.code} signal=${exit.signal} after ${exit.at - killedAt} ms`
      if (signal === "SIGTERM" && exit.code !== 0) entry.detail += " (SUSPICIOUS: expected exit code 0)"
    }
    const next = await startProxy(slot)
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
      case "cancel-call": {
        const c = pickClient()
        if (c === undefined) {
          record(kind, "no live client")
          return true
        }
        pendingCancels.set(c.name, record(kind, `${c.name} (proxy port ${clientSlot.get(c.name)?.port}) told to cancel its call and open a new one`))
        c.send("cancel")
        return true
      }
      case "kill-client": {
        const c = pickClient()
        if (c === undefined) {
          record(kind, "no live client")
          return true
        }
        const slot = clientSlot.get(c.name) ?? slots[0]!
        const entry = record(kind, `${c.name} (proxy port ${slot.port}) pid=${c.pid} SIGKILL`)
        c.kill("SIGKILL")
        const exit = await c.exited
        const replacement = startClient(slot)
        entry.detail += `; exited signal=${exit.signal}; replacement ${replacement.name} started on the same proxy`
        return true
      }
      case "kill-proxy":
        await restartProxy("SIGKILL")
        return true
      case "term-proxy":
        await restartProxy("SIGTERM")
        return true
    }
  }
  const faultLoop = (async () => {
    await sleep(Math.min(3_000, settings.faultIntervalMs), stopFaults.signal)
    let round: Array<FaultKind> = []
    while (!stopFaults.signal.aborted) {
      if (publishDone && doneKinds.size === faultKinds.length) break
      if (round.length === 0) round = [...faultKinds].sort(() => Math.random() - 0.5)
      // A node fault waits while another one is in progress (never two nodes down).
      const index = round.findIndex((k) => !isNodeFault(k) || nodeFault === undefined)
      if (index < 0) {
        await Promise.race([nodeFault, sleep(60_000, stopFaults.signal)])
        continue
      }
      const kind = round.splice(index, 1)[0]!
      let done = true
      try {
        done = await runFault(kind)
      } catch (error) {
        record(kind, `FAILED: ${errorText(error)}`)
      }
      if (done) doneKinds.add(kind)
      else round.push(kind)
      await sleep(settings.faultIntervalMs * (0.75 + Math.random() * 0.5), stopFaults.signal)
    }
  })()
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
  let outcome = "all published ids received"
  let lastReport = 0
  let lastQueueCheck = 0
  while (true) {
    await sleep(100)
    const now = Date.now()
    if (now - lastReport >= 5_000) {
      lastReport = now
      progress(
        `published=${state.published.size} received-unique=${state.received.size} lines=${state.lines} ` +
          `clients=${clients.size} proxies=${slots.map((s) => `#${s.current?.number ?? "-"}`).join(",")} ` +
          `down=${[...down].map((i) => `mpc${i}`).join(",") || "none"} faults=${state.faults.length}`
      )
    }
    if (publishDone && state.received.size >= state.published.size) break
    if (now - state.lastProgressAt > settings.timeoutMs) {
      outcome = `no new id for ${settings.timeoutMs / 1000} s`
      break
    }
    // Everything not received is in the dead-letter queue and nothing is waiting: no point waiting.
    if (publishDone && now - state.lastProgressAt > 10_000 && now - lastQueueCheck > 2_000) {
      lastQueueCheck = now
      const counts = await Promise.all([names.schemas, names.schemasDead].map((q) =>
        admin.use(`check ${q}`, (ch) => ch.checkQueue(q)).catch(() => undefined)
      ))
      const [queue, dead] = counts
      if (queue !== undefined && dead !== undefined && queue.messageCount === 0 && state.received.size + dead.messageCount >= state.published.size) {
        outcome = "the ids not received are all in the dead-letter queue"
        break
      }
    }
  }
  progress(`done: ${outcome}`)
  stopFaults.abort()
  await faultLoop
  stopPublisher.abort()
  await publisher
  await allNodesUp()

  // -- drain: let the consumers take the duplicates still queued, then stop them gracefully.
  let emptySince: number | undefined
  const drainStarted = Date.now()
  while (Date.now() - drainStarted < 15_000) {
    const q = await admin.use("check queue", (ch) => ch.checkQueue(names.schemas)).catch(() => undefined)
    if (q?.messageCount === 0) {
      emptySince ??= Date.now()
      if (Date.now() - emptySince >= 1_500) break
    } else emptySince = undefined
    await sleep(250)
  }
  shuttingDown = true
  const stopping = [...clients.values()]
  for (const c of stopping) {
    c.expectedExit = true
    c.send("stop")
  }
  await within(Promise.all(stopping.map((c) => c.exited)), 8_000)
  for (const c of stopping) if (c.alive) c.kill("SIGKILL")
  await Promise.all(stopping.map((c) => c.exited))
  await sleep(200) // the last stdout lines

  // -- what is left in the broker, once the proxies hold no consumer any more.
  let queueDetail = ""
  const checkStarted = Date.now()
  const check = (queue: string) => admin.use(`check ${queue}`, (ch) => ch.checkQueue(queue))
  let q = await check(names.schemas)
  while (q.consumerCount > 0 && Date.now() - checkStarted < 10_000) {
    await sleep(100)
    q = await check(names.schemas)
  }
  if (q.consumerCount > 0) queueDetail += ` (SUSPICIOUS: still ${q.consumerCount} consumer(s) 10 s after the clients stopped)`
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
  const lost = [...state.published.keys()].filter((id) => !state.received.has(id))
  const duplicates = state.lines - state.received.size
  const leftIds = left.map((m) => m.id)
  const deadIds = deadMessages.map((m) => m.id)
  const out: Array<string> = []
  out.push(`published=${state.published.size} received-unique=${state.received.size} lost=${lost.length} duplicates=${duplicates}`)
  out.push(
    `outcome: ${outcome}; ${((Date.now() - t0) / 1000).toFixed(1)} s; ${instanceCount} proxy instance(s) on 2 ports, ` +
      `${clientCount} client process(es)`
  )
  out.push(`nodes: ${nodes.map((n) => `${n.name} 127.0.0.1:${n.port}`).join(", ")}; queue type quorum; schemas queue members now: ` +
    (members === undefined ? "unknown" : `leader ${members.leader}, online ${members.online.join(" ")}`))
  for (const slot of slots) {
    out.push(
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
    out.push(
      `publisher: ${pr.attempts} publishes for ${pr.confirmed} confirmed ids; ${pr.attempts - pr.confirmed} published again ` +
        `(${pr.cut} cut short by a closed channel, ${pr.nacked} nacked, ${pr.returned} returned, ${pr.timedOut} unconfirmed in time); ` +
        `connections: ${pr.connections.map((c) => c.split(" ")[1]).join(" -> ")}`
    )
    if (pr.unconfirmed.length > 0) out.push(`  NEVER CONFIRMED (not counted as published): ${pr.unconfirmed.length}: ${truncate(pr.unconfirmed.slice(0, 10).join(", "), 400)}`)
    for (const e of pr.errors.slice(0, 8)) out.push(`  publisher: ${truncate(e.replaceAll(names.prefix, "<prefix>"), 240)}`)
  }
  out.push(`faults (${state.faults.length}):`)
  for (const f of state.faults) out.push(`  ${elapsed(f.at)} ${new Date(f.at).toISOString()} ${f.kind}: ${f.detail}`)
  const missingKinds = faultKinds.filter((k) => !state.faults.some((f) => f.kind === k && !f.detail.includes("FAILED")))
  if (missingKinds.length > 0) out.push(`  NOT EXERCISED: ${missingKinds.join(", ")}`)
  out.push(`queue ${names.schemas}: ${q.messageCount} message(s) left${queueDetail}` + describeIds(leftIds, state))
  out.push(`dead-letter queue ${names.schemasDead}: ${dead.messageCount} message(s)` + describeIds(deadIds, state))
  const deadWhy = new Tally()
  for (const m of deadMessages) deadWhy.add(`${state.received.has(m.id) ? "received too" : "never received"}: ${m.why}`)
  if (deadWhy.size > 0) out.push(`  why dead-lettered: ${formatTally(deadWhy)}`)
  out.push(`other queues: ${others.join(", ")}`)
  if (lost.length > 0) {
    out.push(`LOST ids (${lost.length}; first 50, with confirm time):`)
    for (const id of lost.slice(0, 50)) {
      const at = state.published.get(id) ?? t0
      const where = deadIds.includes(id) ? " [in the dead-letter queue]" : leftIds.includes(id) ? " [still in the queue]" : ""
      out.push(`  ${id} confirmed ${elapsed(at)} ${new Date(at).toISOString()}${where}`)
    }
  }
  out.push(
    `deliveries: ${state.lines} acked lines, ${state.redeliveredFlag} flagged redelivered, delivery_count ` +
      state.deliveryCounts.entries().sort((a, b) => Number(a[0]) - Number(b[0])).map(([k, v]) => `${k}:${v}`).join(" ")
  )
  // A publish whose confirm was lost with its node may still have reached the queue.
  const foreign = [...state.received.keys()].filter((id) => !state.published.has(id))
  if (foreign.length > 0) out.push(`received ids never confirmed as published: ${foreign.length}: ${truncate(foreign.slice(0, 10).join(", "), 400)}`)
  out.push(`acked lines per client: ${state.perClient.entries().sort((a, b) => a[0].localeCompare(b[0], "en", { numeric: true })).map(([k, v]) => `${k}:${v}`).join(" ")}`)
  out.push(`settle errors seen by clients: ${formatTally(state.settleErrors)}`)
  out.push(`client calls ended: ${formatTally(state.callEnds)}`)
  out.push(`proxy "subscription ended" reasons: ${formatTally(state.subscriptionEnds)}`)
  out.push(`proxy log lines above INFO:${state.proxyNotable.size === 0 ? " none" : ""}`)
  for (const [key, count] of state.proxyNotable.entries()) {
    const sample = state.proxySamples.get(key)
    const fields = sample === undefined ? "" : ` e.g. proxy#${sample.instance} ${sample.timestamp} ${truncate(JSON.stringify(sample.fields).replaceAll(names.prefix, "<prefix>"), 300)}`
    out.push(`  ${count} x ${key}${fields}`)
  }
  if (state.proxyRaw.length > 0) {
    out.push(`proxy non-JSON output (${state.proxyRaw.length}${state.proxyRaw.length >= 200 ? "+" : ""} lines, first 20):`)
    for (const line of state.proxyRaw.slice(0, 20)) out.push(`  ${truncate(line, 300)}`)
  }
  if (state.garbage.length > 0) out.push(`unparsed client stdout: ${state.garbage.slice(0, 5).join(" | ")}`)
  out.push(`logs: ${logDir} (proxies, clients${nodeLogs.length > 0 ? `, ${nodeLogs.length} node logs` : ""})`)
  out.push(lost.length > 0 ? "RESULT: FAIL (messages lost)" : "RESULT: PASS (no message lost)")
  process.stdout.write(out.join("\n") + "\n")
  return lost.length > 0 ? 1 : 0
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
        const id = String(message.properties.messageId ?? JSON.parse(message.content.toString()).id)
        drained.push({ id, why: whyDead(message) })
      }
    }, 120_000)
  } catch (error) {
    drained.push({ id: `<could not read ${queue}: ${errorText(error)}>`, why: "" })
  }
  return drained
}

const describeIds = (ids: ReadonlyArray<string>, state: State): string => {
  if (ids.length === 0) return ""
  const received = ids.filter((id) => state.received.has(id)).length
  return ` — ${received} of them already received (duplicates), ${ids.length - received} never received; ids: ` +
    truncate(ids.slice(0, 20).join(", "), 600)
}

// ---- entry point (called by chaos.ts for --cluster) --------------------------------------------

export const runClusterChaos = async (): Promise<number> => {
  parseFaultKinds() // a bad CHAOS_FAULTS fails before anything starts
  const nodes = clusterNodes()
  progress(`cluster: ${await ensureCluster(progress)} (${nodes.map((n) => `${n.name}=127.0.0.1:${n.port}`).join(", ")})`)
  const names = makeNames("chaos")
  const admin = new FailoverAdmin(nodes, `messaging-proxy chaos admin ${names.prefix}`)
  const state = newState()
  const cleanup: Array<() => Promise<void>> = []
  // Runs last: every queue and the exchange of the run go, whoever declared them.
  cleanup.push(async () => {
    const queues = [names.schemas, names.validations, names.schemaResults, names.validationResults, names.schemasDead, names.validationsDead]
    const failed: Array<string> = []
    for (const queue of queues) {
      await admin.use(`delete ${queue}`, (ch) => ch.deleteQueue(queue)).catch((e: unknown) => void failed.push(`${queue}: ${errorText(e)}`))
    }
    await admin.use(`delete ${names.exchange}`, (ch) => ch.deleteExchange(names.exchange)).catch((e: unknown) => void failed.push(`${names.exchange}: ${errorText(e)}`))
    if (failed.length > 0) progress(`cleanup: could not delete ${failed.join("; ")}`)
    else progress(`cleanup: deleted the 6 queues and the exchange of ${names.prefix}`)
    await admin.close()
  })
  try {
    return await run(names, nodes, admin, state, cleanup)
  } finally {
    for (const step of cleanup.reverse()) await step().catch((e: unknown) => progress(`cleanup step failed: ${errorText(e)}`))
  }
}
