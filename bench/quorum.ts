/**
 * Phase 5, quorum: the throughput phase's (a) direct amqplib consumer and (b) StreamSchemaMessages
 * drains against the local 3-node cluster (scripts/cluster.sh, started if it is not up), once with
 * RABBITMQ_QUEUE_TYPE=quorum and once with RABBITMQ_QUEUE_TYPE=classic, each with a proxy child of
 * its own given RABBITMQ_HOSTS = all three nodes, and names of its own
 * (`bench.<hex>.quorum.*`, `bench.<hex>.classic.*`, deleted at the end).
 *
 * The proxy shuffles its node order per process, so its primary consumers' connection (which
 * serves the one stream of a drain) lands on any node. The bench's admin connection (which
 * re-declares the queue before each drain, so a classic queue lives there and a quorum queue's
 * leader starts there) and the direct consumer go to that same node: both paths read a queue that
 * is local to the node they are connected to, and the comparison is like for like.
 */
import { execFile } from "node:child_process"
import { fileURLToPath } from "node:url"
import { Admin, type BrokerEndpoint, type BenchNames, namesUnder, quorumQueueArguments } from "./broker.js"
import { findClusterPids, type ProxyChild } from "./proxyProcess.js"
import { runThroughput, type ThroughputResult } from "./throughput.js"
import { errorText, log, median, now, type PhaseOutcome } from "./util.js"

export type QueueType = "quorum" | "classic"
export const QUEUE_TYPES: ReadonlyArray<QueueType> = ["quorum", "classic"]

/** scripts/cluster.sh next to this file's repository (dist/bench → ../../scripts), or BENCH_CLUSTER_SCRIPT. */
export const clusterScript = (): string =>
  process.env["BENCH_CLUSTER_SCRIPT"] ?? fileURLToPath(new URL("../../scripts/cluster.sh", import.meta.url))

/** The cluster's nodes as scripts/cluster.sh places them: 127.0.0.1:CLUSTER_BASE_PORT (5681) + 0..2, guest/guest. */
export const clusterNodes = (): ReadonlyArray<BrokerEndpoint> => {
  const base = Number(process.env["CLUSTER_BASE_PORT"] ?? "5681")
  return [0, 1, 2].map((i) => ({ host: "127.0.0.1", port: base + i, user: "guest", password: "guest", vhost: "/" }))
}

/** mpcN@localhost for a node of clusterNodes(). */
const nodeName = (endpoint: { readonly port: number }): string =>
  `mpc${endpoint.port - Number(process.env["CLUSTER_BASE_PORT"] ?? "5681") + 1}@localhost`

const run = (args: ReadonlyArray<string>, timeoutMs: number): Promise<{ code: number; stdout: string; stderr: string }> =>
  new Promise((resolve) => {
    execFile("bash", [...args], { timeout: timeoutMs, maxBuffer: 16 * 1024 * 1024 }, (error, stdout, stderr) => {
      const code = error === null ? 0 : typeof error.code === "number" ? error.code : 1
      resolve({ code, stdout, stderr: stderr || (error && error.code !== undefined && typeof error.code !== "number" ? error.message : "") })
    })
  })

export interface ClusterInfo {
  readonly script: string
  /** What `cluster.sh start` said (its last lines), and how long it took. */
  readonly startOutput: ReadonlyArray<string>
  readonly startSeconds: number
  /** True if the cluster was up already (start returned at once). */
  readonly wasUp: boolean
  readonly nodes: ReadonlyArray<string>
  /** beam.smp pids of the cluster's nodes when it was up (their CPU is the broker's CPU in this phase). */
  readonly pids: ReadonlyArray<number>
}

/** `bash scripts/cluster.sh start` (idempotent: returns at once when the cluster is up and complete). */
export const ensureCluster = async (): Promise<ClusterInfo> => {
  const script = clusterScript()
  const started = now()
  log(`quorum: bash ${script} start`)
  const { code, stdout, stderr } = await run([script, "start"], 600_000)
  const lines = `${stdout}\n${stderr}`.split("\n").map((l) => l.trim()).filter((l) => l.length > 0)
  if (code !== 0) throw new Error(`cluster.sh start exited ${code}: ${lines.slice(-8).join(" | ")}`)
  const startSeconds = (now() - started) / 1000
  const pids = await findClusterPids()
  log(`quorum: cluster up (${startSeconds.toFixed(1)} s; ${pids.length} node processes seen)`)
  return {
    script,
    startOutput: lines.slice(-6),
    startSeconds,
    wasUp: lines.some((l) => l.includes("already up")),
    nodes: clusterNodes().map((n) => `${nodeName(n)} ${n.host}:${n.port}`),
    pids
  }
}

export interface QueuePlacement {
  readonly type: string
  /** The quorum queue's leader, or a classic queue's node as far as rabbitmqctl tells. */
  readonly leader: string | null
  readonly members: ReadonlyArray<string>
}

/** `cluster.sh ctl 1 list_queues name type leader members` for one queue. */
export const queuePlacement = async (queue: string): Promise<QueuePlacement | undefined> => {
  const { code, stdout } = await run([clusterScript(), "ctl", "1", "-q", "list_queues", "name", "type", "leader", "members", "--formatter", "json"], 30_000)
  if (code !== 0) return undefined
  try {
    const rows: unknown = JSON.parse(stdout)
    if (!Array.isArray(rows)) return undefined
    const row: unknown = rows.find((r: unknown) => typeof r === "object" && r !== null && Reflect.get(r, "name") === queue)
    if (typeof row !== "object" || row === null) return undefined
    const type: unknown = Reflect.get(row, "type")
    const leader: unknown = Reflect.get(row, "leader")
    const members: unknown = Reflect.get(row, "members")
    return {
      type: typeof type === "string" ? type : "?",
      leader: typeof leader === "string" && leader.length > 0 ? leader : null,
      members: Array.isArray(members) ? members.filter((m): m is string => typeof m === "string") : []
    }
  } catch {
    return undefined
  }
}

export interface QuorumTypeResult {
  readonly queueType: QueueType
  readonly prefix: string
  /** The node of the proxy's primary consumers' connection; the admin and the direct consumer use it too. */
  readonly node: string
  readonly placement: QueuePlacement | null
  readonly throughput: ThroughputResult
  /** Median confirmed publish rate of the prefills (the bench's admin publisher, window 2,000). */
  readonly publishMsgPerSec: number | null
}

export interface QuorumResult {
  readonly cluster: ClusterInfo
  readonly messages: number
  readonly repetitions: number
  readonly warmupMessages: number
  readonly byType: Partial<Record<QueueType, PhaseOutcome<QuorumTypeResult>>>
  /** quorum / classic for (a) and (b) medians. */
  readonly quorumToClassic: { readonly direct: number | null; readonly stream: number | null }
}

/** What the quorum phase needs from the driver: a proxy child per queue type, and clean-up on interrupt. */
export interface QuorumHost {
  readonly prefix: string
  readonly prefetch: number
  readonly bodyBytes: number
  /** Runs `body` with a new proxy child (its env adds `env`, its names are `names`), like every phase. */
  readonly withChild: <A>(
    label: string,
    names: BenchNames,
    env: Record<string, string>,
    body: (proxy: ProxyChild) => Promise<A>
  ) => Promise<PhaseOutcome<A>>
  /** A clean-up to run if the benchmark is interrupted (after the children stopped); returns its untrack. */
  readonly track: (cleanup: () => Promise<ReadonlyArray<string>>) => () => void
}

/**
 * Deletes `names` on the cluster: through `admin` if its connection still works, else through a
 * new connection to each node in turn (a node may have gone away meanwhile, a test or the chaos
 * script may kill one). Returns what could not be deleted.
 */
const cleanupNames = async (names: BenchNames, admin: Admin | undefined, nodes: ReadonlyArray<BrokerEndpoint>): Promise<ReadonlyArray<string>> => {
  let problems: ReadonlyArray<string> = ["no admin connection"]
  if (admin !== undefined) {
    problems = await admin.cleanup().catch((error: unknown) => [errorText(error)])
    await admin.close()
    if (problems.length === 0) return problems
  }
  for (const endpoint of nodes) {
    try {
      const other = await Admin.open(names, { endpoint })
      problems = await other.cleanup().catch((error: unknown) => [errorText(error)])
      await other.close()
      if (problems.length === 0) return problems
    } catch (error) {
      problems = [`${nodeName(endpoint)}: ${errorText(error)}`]
    }
  }
  return problems
}

export interface QuorumOptions {
  readonly messages: number
  readonly repetitions: number
  readonly warmupMessages: number
}

export const runQuorum = async (host: QuorumHost, options: QuorumOptions): Promise<QuorumResult> => {
  const cluster = await ensureCluster()
  const nodes = clusterNodes()
  const byType: Partial<Record<QueueType, PhaseOutcome<QuorumTypeResult>>> = {}
  for (const queueType of QUEUE_TYPES) {
    const names = namesUnder(`${host.prefix}.${queueType}`)
    let admin: Admin | undefined
    let nodeOfAdmin: BrokerEndpoint | undefined
    const cleanup = () => cleanupNames(names, admin, [...(nodeOfAdmin ? [nodeOfAdmin] : []), ...nodes.filter((n) => n !== nodeOfAdmin)])
    const untrack = host.track(cleanup)
    const env = {
      RABBITMQ_HOST: nodes[0]!.host,
      RABBITMQ_PORT: String(nodes[0]!.port),
      RABBITMQ_HOSTS: nodes.map((n) => `${n.host}:${n.port}`).join(","),
      RABBITMQ_QUEUE_TYPE: queueType,
      RABBITMQ_USER: nodes[0]!.user,
      RABBITMQ_PASSWORD: nodes[0]!.password,
      RABBITMQ_VHOST: nodes[0]!.vhost
    }
    byType[queueType] = await host.withChild(`quorum-${queueType}`, names, env, async (proxy) => {
      const at = proxy.brokerNode
      const endpoint = nodes.find((n) => at !== undefined && n.port === at.port) ?? nodes[0]!
      log(`quorum: ${queueType} proxy pid ${proxy.pid} is on ${nodeName(endpoint)}; admin and direct consumer go there too`)
      nodeOfAdmin = endpoint
      admin = await Admin.open(names, {
        endpoint,
        ...(queueType === "quorum" ? { queueArguments: quorumQueueArguments(names) } : {})
      })
      const throughput = await runThroughput({
        admin,
        proxy,
        messages: options.messages,
        bodyBytes: host.bodyBytes,
        prefetch: host.prefetch,
        repetitions: options.repetitions,
        warmupMessages: options.warmupMessages,
        modes: ["direct", "stream"],
        directEndpoint: endpoint,
        // Re-read: a node restarted since the start (by a test or the chaos script) has a new pid.
        brokerPids: await findClusterPids(),
        label: `quorum ${queueType}`
      })
      const placement = (await queuePlacement(names.schemas)) ?? null
      const rates = throughput.runs.filter((r) => r.publishSeconds > 0 && r.messages > 0).map((r) => r.messages / r.publishSeconds)
      return {
        queueType,
        prefix: names.prefix,
        node: `${nodeName(endpoint)} ${endpoint.host}:${endpoint.port}`,
        placement,
        throughput,
        publishMsgPerSec: rates.length ? median(rates) : null
      }
    })
    // The child has stopped (it would declare the topology again): delete this type's names.
    untrack()
    for (const problem of await cleanup()) log(`quorum cleanup of ${names.prefix}.*: ${problem}`)
  }
  const medianOf = (type: QueueType, mode: "direct" | "stream") => byType[type]?.result?.throughput.medianMsgPerSec[mode] ?? null
  const ratio = (mode: "direct" | "stream") => {
    const q = medianOf("quorum", mode)
    const c = medianOf("classic", mode)
    return q !== null && c ? q / c : null
  }
  return {
    cluster,
    messages: options.messages,
    repetitions: options.repetitions,
    warmupMessages: options.warmupMessages,
    byType,
    quorumToClassic: { direct: ratio("direct"), stream: ratio("stream") }
  }
}
