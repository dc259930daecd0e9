/**
 * The proxy under test as a child process (`node dist/src/main.js`), so that its RSS, heap and CPU
 * are its own. The bound port comes from its JSON log line "gRPC server listening"; it is ready
 * once it has also logged "connected to broker" (topology declared). Stopped with SIGTERM, then
 * SIGKILL; every child still alive when the benchmark exits is killed.
 */
import { type ChildProcess, execFile, spawn } from "node:child_process"
import { createWriteStream, mkdirSync } from "node:fs"
import { readdir, readFile } from "node:fs/promises"
import { join } from "node:path"
import { createInterface } from "node:readline"
import { fileURLToPath, pathToFileURL } from "node:url"
import { errorText, sleep } from "./util.js"

/** What the preloaded probe (childProbe.ts) reports; the delay and GC figures cover the time since its previous report. */
export interface MemorySample {
  readonly rss: number
  readonly heapUsed: number
  readonly heapTotal: number
  readonly external: number
  readonly arrayBuffers: number
  readonly loopDelayP99Ms: number
  readonly loopDelayMaxMs: number
  readonly gcCount: number
  readonly gcTotalMs: number
  readonly gcMaxMs: number
}

export interface ProcStatus {
  /** Current resident set size, bytes. */
  readonly rss: number
  /** Peak resident set size since the process started (VmHWM), bytes. */
  readonly rssPeak: number
}

const live = new Set<ChildProcess>()
let exitHookInstalled = false
const installExitHook = () => {
  if (exitHookInstalled) return
  exitHookInstalled = true
  process.on("exit", () => {
    for (const child of live) {
      try {
        child.kill("SIGKILL")
      } catch {
        // already gone
      }
    }
  })
}

/**
 * Stops every child still alive, including one that is still starting (not yet handed to the
 * caller): SIGTERM, then SIGKILL after `graceMs`. Used before the clean-up on an interrupt, so no
 * child can re-declare the topology after it was deleted.
 */
export const stopAllChildren = async (graceMs = 10_000): Promise<void> => {
  const children = [...live]
  const exited = children.map((child) =>
    child.exitCode !== null || child.signalCode !== null
      ? Promise.resolve()
      : new Promise<void>((resolve) => child.once("exit", () => resolve()))
  )
  for (const child of children) {
    try {
      child.kill("SIGTERM")
    } catch {
      // already gone
    }
  }
  const all = Promise.all(exited)
  if ((await Promise.race([all.then(() => "done" as const), sleep(graceMs).then(() => "timeout" as const)])) === "timeout") {
    for (const child of children) {
      try {
        child.kill("SIGKILL")
      } catch {
        // already gone
      }
    }
    await all
  }
}

/** Where the proxy's entry point is: BENCH_PROXY_MAIN, else ../src/main.js next to this file (dist/bench → dist/src). */
export const defaultProxyMain = (): string =>
  process.env["BENCH_PROXY_MAIN"] ?? fileURLToPath(new URL("../src/main.js", import.meta.url))

const probeModule = (): string => pathToFileURL(fileURLToPath(new URL("./childProbe.js", import.meta.url))).href

let clockTicks: number | undefined
const clockTicksPerSecond = async (): Promise<number> => {
  if (clockTicks !== undefined) return clockTicks
  clockTicks = await new Promise<number>((resolve) => {
    execFile("getconf", ["CLK_TCK"], (error, stdout) => {
      const value = Number(stdout.trim())
      resolve(error || !Number.isFinite(value) || value <= 0 ? 100 : value)
    })
  })
  return clockTicks
}

/** User + system CPU seconds a process has used so far, from /proc/<pid>/stat. */
export const processCpuSeconds = async (pid: number): Promise<number | undefined> => {
  try {
    const stat = await readFile(`/proc/${pid}/stat`, "utf8")
    // The command name (field 2) may contain spaces: count fields after its closing parenthesis.
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ")
    const ticks = Number(fields[11]) + Number(fields[12]) // utime, stime (fields 14, 15 of the line)
    return ticks / (await clockTicksPerSecond())
  } catch {
    return undefined
  }
}

export interface BrokerProcess {
  readonly pid: number
  /** RABBITMQ_NODENAME from its environment (the local cluster's mpcN@localhost); undefined if unset or unreadable. */
  readonly node: string | undefined
}

/**
 * The RabbitMQ nodes (beam.smp running `rabbit boot`, not a rabbitmqctl escript) this machine
 * runs and we can see, with their node names where the environment says so. The machine's own
 * broker is started without RABBITMQ_NODENAME; scripts/cluster.sh sets it for each cluster node.
 */
export const findBrokerProcesses = async (): Promise<ReadonlyArray<BrokerProcess>> => {
  const found: Array<BrokerProcess> = []
  for (const entry of await readdir("/proc").catch(() => [] as Array<string>)) {
    if (!/^\d+$/.test(entry)) continue
    const comm = await readFile(`/proc/${entry}/comm`, "utf8").catch(() => "")
    if (comm.trim() !== "beam.smp") continue
    const cmdline = await readFile(`/proc/${entry}/cmdline`, "utf8").catch(() => "")
    if (!cmdline.split("\0").includes("boot") || !cmdline.includes("rabbit")) continue
    const environ = await readFile(`/proc/${entry}/environ`, "utf8").catch(() => "")
    const node = environ.split("\0").find((v) => v.startsWith("RABBITMQ_NODENAME="))?.slice("RABBITMQ_NODENAME=".length)
    found.push({ pid: Number(entry), node: node || undefined })
  }
  return found
}

/**
 * The machine's own broker's Erlang VM: the RabbitMQ node that is not one of the local cluster's
 * (scripts/cluster.sh names them mpcN@…); the first one if none can be told apart.
 */
export const findBrokerPid = async (): Promise<number | undefined> => {
  const all = await findBrokerProcesses()
  return (all.find((b) => b.node === undefined || !/^mpc\d+@/.test(b.node)) ?? all[0])?.pid
}

/** The local cluster's nodes (mpcN@…), by pid. */
export const findClusterPids = async (): Promise<ReadonlyArray<number>> =>
  (await findBrokerProcesses()).filter((b) => b.node !== undefined && /^mpc\d+@/.test(b.node)).map((b) => b.pid)

/** CPU time of the whole machine so far (all cores), busy and total, from /proc/stat. */
export const machineCpuSeconds = async (): Promise<{ busy: number; total: number } | undefined> => {
  try {
    const line = (await readFile("/proc/stat", "utf8")).split("\n")[0] ?? ""
    const ticks = line.trim().split(/\s+/).slice(1).map(Number)
    const total = ticks.reduce((a, b) => a + b, 0)
    const idle = (ticks[3] ?? 0) + (ticks[4] ?? 0) // idle, iowait
    const hz = await clockTicksPerSecond()
    return { busy: (total - idle) / hz, total: total / hz }
  } catch {
    return undefined
  }
}

export interface SchedStat {
  /** Time on a CPU and time runnable but waiting for one (ms), from /proc/<pid>/schedstat (main thread). */
  readonly runMs: number
  readonly waitMs: number
}

/** /proc/<pid>/schedstat of a process's main thread; "self" for this process. */
export const schedStat = async (pid: number | "self"): Promise<SchedStat | undefined> => {
  try {
    const [run, wait] = (await readFile(`/proc/${pid}/schedstat`, "utf8")).trim().split(/\s+/).map(Number)
    return run === undefined || wait === undefined ? undefined : { runMs: run / 1e6, waitMs: wait / 1e6 }
  } catch {
    return undefined
  }
}

export interface StartOptions {
  readonly label: string
  readonly env: Record<string, string>
  readonly nodeArgs?: ReadonlyArray<string>
  readonly main?: string
  readonly readyTimeoutMs?: number
}

/** A log line of the proxy: Effect's consoleJson writes `message` as a string or [text, fields]. */
interface LogLine {
  readonly text: string
  readonly fields: Record<string, unknown>
  readonly level: string
}

const parseLogLine = (line: string): LogLine | undefined => {
  try {
    const parsed: unknown = JSON.parse(line)
    if (typeof parsed !== "object" || parsed === null) return undefined
    const message: unknown = Reflect.get(parsed, "message")
    const level: unknown = Reflect.get(parsed, "level")
    const levelText = typeof level === "string" ? level : ""
    if (typeof message === "string") return { text: message, fields: {}, level: levelText }
    if (Array.isArray(message) && typeof message[0] === "string") {
      const second: unknown = message[1]
      const fields = typeof second === "object" && second !== null ? (second as Record<string, unknown>) : {}
      return { text: message[0], fields, level: levelText }
    }
    return undefined
  } catch {
    return undefined
  }
}

export class ProxyChild {
  /** The last lines of stdout/stderr (warnings and errors are always kept), for error reports. */
  readonly tail: Array<string> = []
  /** Log lines (and bytes) the proxy wrote to stdout since start, and how many were warnings or errors. */
  logLines = 0
  logBytes = 0
  warnings = 0
  /** The first distinct warning/error messages the proxy logged. */
  readonly problems: Array<string> = []
  /** The bound gRPC port, known once the child is ready. */
  port = 0
  /** The node its primary consumers' connection went to ("connected to broker" line), once ready. */
  brokerNode: { readonly host: string; readonly port: number } | undefined
  private readonly memoryWaiters: Array<(sample: MemorySample) => void> = []
  private exitCode: number | null | undefined
  private readonly exited: Promise<number | null>

  private constructor(readonly label: string, readonly process: ChildProcess) {
    this.exited = new Promise<number | null>((resolve) => {
      process.once("exit", (code, signal) => {
        live.delete(process)
        this.exitCode = code ?? (signal ? -1 : null)
        resolve(this.exitCode)
      })
    })
  }

  get pid(): number {
    return this.process.pid ?? -1
  }

  get running(): boolean {
    return this.exitCode === undefined
  }

  private remember(line: string): void {
    this.tail.push(line.length > 500 ? `${line.slice(0, 500)}…` : line)
    if (this.tail.length > 60) this.tail.shift()
  }

  static async start(options: StartOptions): Promise<ProxyChild> {
    installExitHook()
    const main = options.main ?? defaultProxyMain()
    const args = [...(options.nodeArgs ?? []), "--import", probeModule(), main]
    const child = spawn(process.execPath, args, {
      env: { ...process.env, ...options.env },
      stdio: ["ignore", "pipe", "pipe"]
    })
    live.add(child)
    const proxy = new ProxyChild(options.label, child)
    // BENCH_PROXY_LOG_DIR: keep each child's raw stdout+stderr (e.g. with --trace-gc in BENCH_PROXY_NODE_ARGS).
    const logDir = process.env["BENCH_PROXY_LOG_DIR"]
    if (logDir) {
      mkdirSync(logDir, { recursive: true })
      const file = createWriteStream(join(logDir, `${options.label}-${child.pid}.log`))
      child.stdout!.pipe(file, { end: false })
      child.stderr!.pipe(file, { end: false })
      child.once("exit", () => file.end())
    }

    let resolveReady: ((port: number) => void) | undefined
    const ready = new Promise<number>((resolve) => { resolveReady = resolve })
    let connected = false
    let port: number | undefined
    createInterface({ input: child.stdout! }).on("line", (line) => {
      proxy.logLines++
      proxy.logBytes += Buffer.byteLength(line) + 1
      const parsed = parseLogLine(line)
      const problem = parsed !== undefined && (parsed.level === "WARN" || parsed.level === "ERROR" || parsed.level === "FATAL")
      if (problem) {
        proxy.warnings++
        if (proxy.problems.length < 5 && !proxy.problems.includes(parsed.text)) proxy.problems.push(parsed.text)
      }
      // Keep start-up lines and every problem; routine per-stream lines would flood the tail.
      if (problem || resolveReady !== undefined) proxy.remember(line)
      if (!parsed || resolveReady === undefined) return
      if (parsed.text === "gRPC server listening" && typeof parsed.fields["port"] === "number") port = parsed.fields["port"]
      if (parsed.text === "connected to broker") {
        connected = true
        const { host, port: brokerPort } = parsed.fields
        if (typeof host === "string" && typeof brokerPort === "number") proxy.brokerNode = { host, port: brokerPort }
      }
      if (port !== undefined && connected) {
        const resolve = resolveReady
        resolveReady = undefined
        resolve(port)
      }
    })
    createInterface({ input: child.stderr! }).on("line", (line) => {
      if (line.startsWith("BENCH_MEM ")) {
        try {
          const sample = JSON.parse(line.slice("BENCH_MEM ".length)) as MemorySample
          for (const waiter of proxy.memoryWaiters.splice(0)) waiter(sample)
        } catch {
          // ignore a torn line
        }
        return
      }
      proxy.remember(`stderr: ${line}`)
    })

    const timeoutMs = options.readyTimeoutMs ?? 30_000
    const outcome = await Promise.race([
      ready.then((p) => ({ kind: "ready" as const, port: p })),
      proxy.exited.then((code) => ({ kind: "exited" as const, code })),
      sleep(timeoutMs).then(() => ({ kind: "timeout" as const }))
    ])
    if (outcome.kind !== "ready") {
      child.kill("SIGKILL")
      const why = outcome.kind === "exited" ? `exited with ${outcome.code}` : `not ready after ${timeoutMs} ms`
      throw new Error(`proxy child (${main}) ${why}; last output:\n  ${proxy.tail.join("\n  ")}`)
    }
    proxy.port = outcome.port
    return proxy
  }

  /** RSS now and its peak (VmHWM), from /proc/<pid>/status. */
  async procStatus(): Promise<ProcStatus | undefined> {
    try {
      const status = await readFile(`/proc/${this.pid}/status`, "utf8")
      const kib = (key: string) => {
        const match = new RegExp(`^${key}:\\s+(\\d+) kB`, "m").exec(status)
        return match ? Number(match[1]) * 1024 : Number.NaN
      }
      return { rss: kib("VmRSS"), rssPeak: kib("VmHWM") }
    } catch {
      return undefined
    }
  }

  /** User + system CPU seconds used so far, from /proc/<pid>/stat. */
  cpuSeconds(): Promise<number | undefined> {
    return processCpuSeconds(this.pid)
  }

  /** Scheduler statistics of the child's main thread (see schedStat). */
  schedStat(): Promise<SchedStat | undefined> {
    return schedStat(this.pid)
  }

  /** The child's process.memoryUsage(), via the preloaded probe; undefined if it does not answer in time. */
  async memory(timeoutMs = 1_000): Promise<MemorySample | undefined> {
    if (!this.running) return undefined
    const answer = new Promise<MemorySample>((resolve) => this.memoryWaiters.push(resolve))
    try {
      this.process.kill("SIGUSR2")
    } catch {
      return undefined
    }
    return Promise.race([answer, sleep(timeoutMs).then(() => undefined)])
  }

  /** SIGTERM (the proxy's graceful shutdown), SIGKILL after `graceMs`. Resolves with the exit code. */
  async stop(graceMs = 15_000): Promise<number | null> {
    if (this.running) {
      try {
        this.process.kill("SIGTERM")
      } catch (error) {
        this.tail.push(`SIGTERM failed: ${errorText(error)}`)
      }
      const code = await Promise.race([this.exited, sleep(graceMs).then(() => "timeout" as const)])
      if (code !== "timeout") return code
      this.process.kill("SIGKILL")
    }
    return this.exited
  }
}

export interface SamplerReport {
  readonly rssMax: number
  readonly heapUsedMax: number | null
  readonly heapTotalMax: number | null
  /** Event-loop delay of the proxy while sampled: the worst interval's p99 and the overall max. */
  readonly loopDelayP99MaxMs: number | null
  readonly loopDelayMaxMs: number | null
  /** GC pauses of the proxy while sampled. */
  readonly gcCount: number | null
  readonly gcTotalMs: number | null
  readonly gcMaxMs: number | null
  readonly samples: number
}

/**
 * Samples a child's RSS (and, through the probe, heap, event-loop delay and GC) every `intervalMs`
 * until stopped. The probe's first report covers the time before the sampler started: its delay and
 * GC figures are dropped.
 */
export class ResourceSampler {
  private rssMax = 0
  private heapUsedMax = 0
  private heapTotalMax = 0
  private loopDelayP99Max = 0
  private loopDelayMax = 0
  private gcCount = 0
  private gcTotalMs = 0
  private gcMaxMs = 0
  private probed = 0
  private samples = 0
  private running = true
  private readonly loop: Promise<void>

  constructor(child: ProxyChild, intervalMs = 200) {
    this.loop = (async () => {
      while (this.running && child.running) {
        const status = await child.procStatus()
        if (status) this.rssMax = Math.max(this.rssMax, status.rss)
        const memory = await child.memory(Math.max(intervalMs, 500))
        if (memory) {
          this.heapUsedMax = Math.max(this.heapUsedMax, memory.heapUsed)
          this.heapTotalMax = Math.max(this.heapTotalMax, memory.heapTotal)
          if (this.probed++ > 0) {
            this.loopDelayP99Max = Math.max(this.loopDelayP99Max, memory.loopDelayP99Ms)
            this.loopDelayMax = Math.max(this.loopDelayMax, memory.loopDelayMaxMs)
            this.gcCount += memory.gcCount
            this.gcTotalMs += memory.gcTotalMs
            this.gcMaxMs = Math.max(this.gcMaxMs, memory.gcMaxMs)
          }
        }
        this.samples++
        if (this.running) await sleep(intervalMs)
      }
    })()
  }

  async stop(): Promise<SamplerReport> {
    this.running = false
    await this.loop
    const probed = this.probed > 1
    return {
      rssMax: this.rssMax,
      heapUsedMax: this.heapUsedMax || null,
      heapTotalMax: this.heapTotalMax || null,
      loopDelayP99MaxMs: probed ? this.loopDelayP99Max : null,
      loopDelayMaxMs: probed ? this.loopDelayMax : null,
      gcCount: probed ? this.gcCount : null,
      gcTotalMs: probed ? this.gcTotalMs : null,
      gcMaxMs: probed ? this.gcMaxMs : null,
      samples: this.samples
    }
  }
}
