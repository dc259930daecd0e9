/**
 * The local 3-node RabbitMQ cluster of scripts/cluster.sh (mpc1..3@localhost on 127.0.0.1:5681..5683
 * unless CLUSTER_BASE_PORT moves them), for tests of failover and quorum queues. It runs beside the
 * machine's own broker on 5672 and never touches it. `ensureCluster` starts it (idempotent); tests
 * leave it running for the next file and `.ci/run` stops it at the end of CI
 * (`npm run cluster -- stop` by hand).
 *
 * Every command is a child process that does not block the event loop (the proxy under test may run
 * in this process); interrupting an Effect kills its command's whole process group.
 */
import { Effect } from "effect"
import { spawn } from "node:child_process"
import { resolve } from "node:path"
import { fileURLToPath } from "node:url"

const clusterScript = fileURLToPath(new URL("../../scripts/cluster.sh", import.meta.url))

export type ClusterNodeIndex = 1 | 2 | 3

export interface ClusterNode {
  /** 1, 2 or 3: the script's NODE argument. */
  readonly index: ClusterNodeIndex
  /** Erlang node name, e.g. `mpc1@localhost`. */
  readonly name: string
  /** The AMQP port, on 127.0.0.1. */
  readonly port: number
  readonly distPort: number
  /** RABBITMQ_PID_FILE: the pid of the node's beam.smp while it runs. */
  readonly pidFile: string
}

// The same defaults and overrides as scripts/cluster.sh.
const basePort = Number(process.env["CLUSTER_BASE_PORT"] || 5681)
const clusterDir = resolve(process.env["CLUSTER_DIR"] || `${process.env["TMPDIR"] || "/tmp"}/messaging-proxy-cluster`)

const node = (index: ClusterNodeIndex): ClusterNode => ({
  index,
  name: `mpc${index}@localhost`,
  port: basePort + index - 1,
  distPort: basePort + index - 1 + 20_000,
  pidFile: `${clusterDir}/mpc${index}/pid`
})

/** What every node reports as the AMQP server property `cluster_name` (set by cluster.sh start). */
export const clusterName = "messaging-proxy-cluster"

/** The three nodes, in order: `clusterNodes[0]` is mpc1, the one the others joined. */
export const clusterNodes: readonly [ClusterNode, ClusterNode, ClusterNode] = [node(1), node(2), node(3)]

/** Node n (1, 2 or 3; anything else throws a RangeError). */
export const clusterNode = (n: number): ClusterNode => {
  const found = clusterNodes.find((c) => c.index === n)
  if (found === undefined) throw new RangeError(`no cluster node ${n}: use 1, 2 or 3`)
  return found
}

/** `amqp://guest:guest@127.0.0.1:<port>` of node n: guest logs in from loopback only. */
export const nodeAmqpUrl = (n: number): string => `amqp://guest:guest@127.0.0.1:${clusterNode(n).port}`

/** The script's NODE argument for n, or a failure naming the bad index. */
const nodeArg = (n: number) =>
  Effect.try({ try: () => String(clusterNode(n).index), catch: (e) => (e instanceof Error ? e : new Error(String(e))) })

export interface ScriptOutput {
  readonly code: number | null
  readonly stdout: string
  readonly stderr: string
}

/** `bash scripts/cluster.sh ARGS`; never fails itself, the caller judges the exit code. */
const runScript = (args: ReadonlyArray<string>) =>
  Effect.callback<ScriptOutput, Error>((resume) => {
    // Its own process group, so that an interruption also ends the rabbitmqctl it waits for.
    const child = spawn("bash", [clusterScript, ...args], { stdio: ["ignore", "pipe", "pipe"], detached: true })
    let stdout = ""
    let stderr = ""
    child.stdout.on("data", (chunk: Buffer) => (stdout += chunk.toString()))
    child.stderr.on("data", (chunk: Buffer) => (stderr += chunk.toString()))
    child.on("error", (error) => resume(Effect.fail(new Error(`bash ${clusterScript}: ${error.message}`))))
    child.on("close", (code) => resume(Effect.succeed({ code, stdout, stderr })))
    return Effect.sync(() => {
      if (child.exitCode !== null || child.signalCode !== null || child.pid === undefined) return
      try {
        process.kill(-child.pid, "SIGKILL")
      } catch {
        child.kill("SIGKILL")
      }
    })
  })

/** Like `runScript`, but fails with everything the script printed unless it exits 0. */
const runScriptOk = (args: ReadonlyArray<string>) =>
  runScript(args).pipe(
    Effect.flatMap((out) =>
      out.code === 0
        ? Effect.succeed(out.stdout)
        : Effect.fail(
          new Error(`scripts/cluster.sh ${args.join(" ")} exited ${out.code}:\n${out.stdout}${out.stderr}`)
        )
    )
  )

let clusterStarted = false

/**
 * Starts the cluster unless this process already did (`cluster.sh start` itself is idempotent and
 * serialised by a lock, and rebuilds a cluster left incomplete). Allow it a few minutes: a cold
 * start takes about 15 s on two cores.
 */
export const ensureCluster: Effect.Effect<void, Error> = Effect.suspend(() =>
  clusterStarted
    ? Effect.void
    : runScriptOk(["start"]).pipe(Effect.tap(() => Effect.sync(() => (clusterStarted = true))), Effect.asVoid)
)

/** `kill -9` of node n's beam.smp; returns once its AMQP port is closed. */
export const killNode = (n: number): Effect.Effect<string, Error> =>
  nodeArg(n).pipe(Effect.flatMap((arg) => runScriptOk(["kill", arg])))

/** Starts a killed node again with its data dir; returns once its app has started (it rejoins). */
export const restartNode = (n: number): Effect.Effect<string, Error> =>
  nodeArg(n).pipe(Effect.flatMap((arg) => runScriptOk(["restart", arg])))

/** The script's `status` output; `running` is true when all three nodes run and are clustered. */
export const clusterStatus: Effect.Effect<{ readonly running: boolean; readonly output: string }, Error> = runScript(
  ["status"]
).pipe(Effect.map((out) => ({ running: out.code === 0, output: out.stdout + out.stderr })))

/**
 * `rabbitmqctl -n mpcN@localhost ARGS` as the rabbitmq user (a cluster node only: never the
 * machine's own broker, and no `-n`/`--node` among ARGS); its stdout, or a failure with stderr.
 */
export const rabbitmqctl = (n: number, ...args: ReadonlyArray<string>): Effect.Effect<string, Error> =>
  nodeArg(n).pipe(Effect.flatMap((arg) => runScriptOk(["ctl", arg, ...args])))
