/**
 * Benchmark: messaging-proxy against a direct RabbitMQ consumer.
 *
 *   npm run bench                       (builds, then node dist/bench/run.js)
 *   BENCH_N=10000 BENCH_LATENCY_SECONDS=5 BENCH_STREAMS=200 npm run bench      (quick)
 *
 * The proxy runs as a child process (`node dist/src/main.js`, or BENCH_PROXY_MAIN), one per phase,
 * on the real broker under random names (bench.<hex>.*) that are deleted at the end. Results go to
 * stdout (a table) and to bench/results/latest.json (BENCH_RESULTS_DIR). Progress goes to stderr.
 *
 * Knobs: BENCH_N (100000), BENCH_REPEATS (3), BENCH_WARMUP_N (10000), BENCH_BODY_BYTES (1024), BENCH_LATENCY_SECONDS (30),
 * BENCH_PREFETCH (32: the proxy's RABBITMQ_PREFETCH, the direct consumer's prefetch, (c)'s max_in_flight),
 * BENCH_LATENCY_RATE (1000), BENCH_LATENCY_WARMUP_SECONDS (2), BENCH_STREAMS (10000),
 * BENCH_STREAMS_PER_CHANNEL (1000), BENCH_STREAMS_MESSAGES (2 × BENCH_STREAMS, at least 5000),
 * BENCH_CANCEL_CYCLES (100), BENCH_QUORUM_N (50000), BENCH_QUORUM_REPEATS (3), BENCH_QUORUM_WARMUP_N (5000),
 * BENCH_PHASES (throughput,publish,latency,streams,cancel,quorum,tracing[,profile]), BENCH_PUBLISH_N and BENCH_PUBLISH_BATCH (the publish phase), BENCH_PROFILE=1 (adds the profile phase: one
 * StreamSchemaMessages drain with the child under --cpu-prof, analysed), BENCH_PROFILE_DIR (/tmp/prof),
 * BENCH_PROXY_MAIN (the proxy entry point), BENCH_PROXY_NODE_ARGS (extra node arguments for the child),
 * BENCH_PROXY_LOG_DIR (keep each child's raw output there).
 */
import { access, mkdir, readdir, readFile, writeFile } from "node:fs/promises"
import { cpus, loadavg } from "node:os"
import { join } from "node:path"
import { analyzeProfile, formatSummary, type ProfileSummary } from "./analyzeProfile.js"
import { perMessage, startCpuWindow } from "./cpuWindow.js"
import { Admin, type BenchNames, listBrokerConnections, makeNames, proxyEnv } from "./broker.js"
import { runCancel } from "./cancel.js"
import { drainStream, drainSubscribe, makeClient } from "./drains.js"
import { runLatency } from "./latency.js"
import { defaultProxyMain, ProxyChild, stopAllChildren } from "./proxyProcess.js"
import { QUEUE_TYPES, type QuorumResult, runQuorum } from "./quorum.js"
import { runStreams } from "./streams.js"
import { bodyFactory, MODE_LABEL, MODES, prefill, type RunRecord, runThroughput } from "./throughput.js"
import { dropAllReceiver, tracingCost, tracingModes, type TracingOutcome } from "./tracing.js"
import { type PublishResult, runPublish } from "./publish.js"
import { envFlag, envInt, errorText, fmt, fmtInt, log, mb, now, type PhaseOutcome, sleep, table } from "./util.js"

type Phase = "throughput" | "latency" | "streams" | "cancel" | "profile" | "quorum" | "tracing" | "publish"
const ALL_PHASES: ReadonlyArray<Phase> = ["throughput", "profile", "publish", "latency", "streams", "cancel", "quorum", "tracing"]

const settings = () => {
  const profile = envFlag("BENCH_PROFILE")
  const requested = (process.env["BENCH_PHASES"] ?? "throughput,publish,latency,streams,cancel,quorum,tracing")
    .split(",").map((p) => p.trim()).filter((p) => p.length > 0)
  for (const p of requested) {
    if (!ALL_PHASES.includes(p as Phase)) throw new Error(`BENCH_PHASES: unknown phase ${JSON.stringify(p)}`)
  }
  const phases = ALL_PHASES.filter((p) => requested.includes(p) || (p === "profile" && profile))
  const streams = envInt("BENCH_STREAMS", 10_000)
  return {
    messages: envInt("BENCH_N", 100_000),
    repetitions: envInt("BENCH_REPEATS", 3),
    warmupMessages: envInt("BENCH_WARMUP_N", 10_000, 0),
    bodyBytes: envInt("BENCH_BODY_BYTES", 1024),
    // The proxy's default RABBITMQ_PREFETCH; the child, the direct consumer and (c)'s max_in_flight all get it.
    prefetch: envInt("BENCH_PREFETCH", 32),
    latencySeconds: envInt("BENCH_LATENCY_SECONDS", 30),
    latencyRate: envInt("BENCH_LATENCY_RATE", 1000),
    latencyWarmupSeconds: envInt("BENCH_LATENCY_WARMUP_SECONDS", 2, 0),
    streams,
    // 1,000 is the proxy's default GRPC_MAX_CONCURRENT_STREAMS_PER_CONNECTION.
    streamsPerChannel: envInt("BENCH_STREAMS_PER_CHANNEL", 1000),
    // Two per stream on average, so that every stream is seen to deliver.
    streamsMessages: envInt("BENCH_STREAMS_MESSAGES", Math.max(5000, 2 * streams)),
    cancelCycles: envInt("BENCH_CANCEL_CYCLES", 100),
    quorumMessages: envInt("BENCH_QUORUM_N", 50_000),
    quorumRepetitions: envInt("BENCH_QUORUM_REPEATS", 3),
    quorumWarmupMessages: envInt("BENCH_QUORUM_WARMUP_N", 5_000, 0),
    profileDir: process.env["BENCH_PROFILE_DIR"] ?? "/tmp/prof",
    resultsDir: process.env["BENCH_RESULTS_DIR"] ?? join(process.cwd(), "bench", "results"),
    proxyMain: defaultProxyMain(),
    /** Extra node arguments for every proxy child (e.g. "--import ./experiment.mjs"); whitespace-separated. */
    proxyNodeArgs: (process.env["BENCH_PROXY_NODE_ARGS"] ?? "").split(/\s+/).filter((a) => a.length > 0),
    phases
  }
}
type Settings = ReturnType<typeof settings>

/**
 * An idle proxy child is ~150 MB RSS; with 10,000 streams open its peak measured 710-855 MB (56-70
 * kB per stream). The target allows a 200 MB base and 80 kB per stream: 280 MB for 1,000 streams
 * (the old flat target was 300 MB) and 1 GB for 10,000. See bench/README.md.
 */
const RSS_BASE_BYTES = 200e6
const RSS_PER_STREAM_BYTES = 80e3
/** The peak RSS target of the many-streams phase for S streams. */
const rssTarget = (streams: number) => RSS_BASE_BYTES + RSS_PER_STREAM_BYTES * streams

const TARGETS = {
  /** Issue 14: (b) StreamSchemaMessages / (a) direct consumer, msg/s. */
  streamRatio: 0.95,
  /** Issue 14: the proxy's CPU per streamed message over the direct consumer's own. */
  streamCpuRatio: 1.3,
  /** Issue 14: (c) SubscribeSchemaMessages with per-message client acks / (a), msg/s. */
  subscribeRatio: 0.85,
  /** Issue 14: PublishBatch / a direct confirmed publisher, msg/s. */
  publishRatio: 0.8,
  /** The quorum phase's (b)/(a) on each queue type. */
  ratio: 0.9,
  addedP99Ms: 1,
  /** Peak RSS of the proxy with S streams open: a base plus a budget per stream (see rssTarget). */
  rssBaseBytes: RSS_BASE_BYTES,
  rssPerStreamBytes: RSS_PER_STREAM_BYTES,
  cancelMs: 100
} as const

/**
 * The limits of the many-streams child: all its calls come from one caller (127.0.0.1), so the
 * per-caller limit (default 1,000) and the total (default 10,000) must admit S, plus room for the
 * other phases' calls; each grpc-js channel carries at most `perChannel` of them, within the
 * per-connection limit (default 1,000).
 */
const streamLimits = (streams: number, perChannel: number): Record<string, string> => {
  const limit = String(Math.max(10_000, streams + 100))
  return {
    MESSAGING_MAX_STREAMS_TOTAL: limit,
    MESSAGING_MAX_STREAMS_PER_CALLER: limit,
    GRPC_MAX_CONCURRENT_STREAMS_PER_CONNECTION: String(Math.max(1000, perChannel))
  }
}

interface ChildOptions {
  readonly nodeArgs?: ReadonlyArray<string>
  /** Names other than the run's own (the quorum phase's per queue type). */
  readonly names?: BenchNames
  /** Added to (and overriding) the child's environment. */
  readonly env?: Record<string, string>
  /** The child's label in logs and log file names; the phase by default. */
  readonly label?: string
}

const hrtimeUs = () => Number(process.hrtime.bigint() / 1000n)

class Bench {
  readonly names: BenchNames = makeNames()
  admin: Admin | undefined
  readonly children = new Set<ProxyChild>()
  /** Clean-ups of other names (the quorum phase's, on the cluster) to run on an interrupt too. */
  readonly extraCleanups = new Set<() => Promise<ReadonlyArray<string>>>()
  private shutdownStarted: Promise<void> | undefined
  benchRssMax = 0
  benchHeapUsedMax = 0

  constructor(readonly settings: Settings) {}

  connectionName(phase: Phase, names: BenchNames = this.names): string {
    return `messaging-proxy ${names.prefix} ${phase}`
  }

  get stopping(): boolean {
    return this.shutdownStarted !== undefined
  }

  async startChild(phase: Phase, options: ChildOptions = {}): Promise<ProxyChild> {
    if (this.stopping) throw new Error("the benchmark is stopping")
    const names = options.names ?? this.names
    const child = await ProxyChild.start({
      label: options.label ?? phase,
      env: {
        ...proxyEnv(names, this.connectionName(phase, names)),
        RABBITMQ_PREFETCH: String(this.settings.prefetch),
        // The stream limits must not be what the many-streams phase measures.
        ...streamLimits(this.settings.streams, this.settings.streamsPerChannel),
        ...options.env
      },
      nodeArgs: [...this.settings.proxyNodeArgs, ...(options.nodeArgs ?? [])],
      main: this.settings.proxyMain
    })
    this.children.add(child)
    // A signal may have arrived while it started: shutdown() has then already run past it.
    if (this.stopping) {
      await this.stopChild(child)
      throw new Error("the benchmark is stopping")
    }
    return child
  }

  async stopChild(child: ProxyChild): Promise<number | null> {
    const code = await child.stop()
    this.children.delete(child)
    return code
  }

  /** Runs one phase with its own proxy child; a failure is recorded and the benchmark goes on. */
  async phase<A>(
    phase: Phase,
    run: (child: ProxyChild) => Promise<A>,
    options: ChildOptions = {}
  ): Promise<PhaseOutcome<A>> {
    const label = options.label ?? phase
    log(`phase ${label}: starting proxy child`)
    let child: ProxyChild | undefined
    try {
      child = await this.startChild(phase, options)
      log(`phase ${label}: proxy pid ${child.pid} on port ${child.port}`)
      const endWindow = await startCpuWindow(child.pid)
      const result = await run(child)
      const window = await endWindow()
      const exitCode = await this.stopChild(child)
      return { result, window, proxy: { exitCode, logLines: child.logLines, warnings: child.warnings, problems: child.problems } }
    } catch (error) {
      log(`phase ${label} failed: ${errorText(error)}`)
      const exitCode = child ? await this.stopChild(child) : null
      return {
        error: errorText(error),
        ...(child
          ? {
            proxy: { exitCode, logLines: child.logLines, warnings: child.warnings, problems: child.problems, tail: child.tail.slice(-20) }
          }
          : {})
      }
    }
  }

  /** Stops every child and deletes everything declared; idempotent. */
  shutdown(): Promise<void> {
    this.shutdownStarted ??= (async () => {
      for (const child of [...this.children]) await this.stopChild(child).catch(() => undefined)
      await stopAllChildren()
      if (this.admin) {
        const problems = await this.admin.cleanup().catch((error: unknown) => [errorText(error)])
        for (const problem of problems) log(`cleanup: ${problem}`)
        await this.admin.close()
      }
      for (const cleanup of [...this.extraCleanups]) {
        const problems = await cleanup().catch((error: unknown) => [errorText(error)])
        for (const problem of problems) log(`cleanup: ${problem}`)
      }
    })()
    return this.shutdownStarted
  }
}

const main = async () => {
  const s = settings()
  const bench = new Bench(s)
  const startedAt = new Date()
  const started = now()
  const onSignal = (signal: NodeJS.Signals) => {
    log(`${signal}: stopping the proxy children and cleaning up`)
    void bench.shutdown().finally(() => process.exit(130))
  }
  process.once("SIGINT", onSignal)
  process.once("SIGTERM", onSignal)
  const memoryTimer = setInterval(() => {
    const m = process.memoryUsage()
    bench.benchRssMax = Math.max(bench.benchRssMax, m.rss)
    bench.benchHeapUsedMax = Math.max(bench.benchHeapUsedMax, m.heapUsed)
  }, 500)
  memoryTimer.unref()
  // Tests and the chaos script share this 2-core machine: note any that ran during a phase.
  let currentPhase = "start"
  const competitors = new Map<string, Set<string>>()
  let scanning = false
  const competitorTimer = setInterval(() => {
    if (scanning) return
    scanning = true
    void competingProcesses().then((found) => {
      if (found.length > 0) {
        const seen = competitors.get(currentPhase) ?? new Set<string>()
        for (const name of found) seen.add(name)
        competitors.set(currentPhase, seen)
      }
    }).finally(() => { scanning = false })
  }, 2_000)
  competitorTimer.unref()

  await access(s.proxyMain).catch(() => {
    throw new Error(`proxy entry point ${s.proxyMain} not found: build first (npm run build) or set BENCH_PROXY_MAIN`)
  })
  const othersBefore = await listBrokerConnections()
  const environment = {
    node: process.version,
    cpus: cpus().length,
    cpuModel: cpus()[0]?.model ?? "?",
    loadavgAtStart: loadavg(),
    otherBrokerConnectionsAtStart: othersBefore?.length ?? null,
    proxyMain: s.proxyMain,
    prefix: bench.names.prefix
  }
  log(`names ${bench.names.prefix}.*; proxy ${s.proxyMain}; phases ${s.phases.join(",")}; ` +
    `load ${environment.loadavgAtStart.map((l) => l.toFixed(2)).join(" ")}; broker connections ${environment.otherBrokerConnectionsAtStart}`)

  const results: Record<string, unknown> = {}
  try {
    bench.admin = await Admin.open(bench.names)
    const admin = bench.admin
    for (const phase of s.phases) {
      if (bench.stopping) break
      currentPhase = phase
      switch (phase) {
        case "throughput":
          results["throughput"] = await bench.phase("throughput", (proxy) =>
            runThroughput({ admin, proxy, ...drainSettings(s) }))
          break
        case "profile":
          results["profile"] = await runProfilePhase(bench, admin, s)
          break
        case "latency":
          results["latency"] = await bench.phase("latency", (proxy) =>
            runLatency({
              admin,
              proxy,
              ratePerSecond: s.latencyRate,
              seconds: s.latencySeconds,
              warmupSeconds: s.latencyWarmupSeconds,
              bodyBytes: s.bodyBytes,
              prefetch: s.prefetch
            }))
          break
        case "streams":
          results["streams"] = await bench.phase("streams", (proxy) =>
            runStreams({
              admin,
              proxy,
              connectionName: bench.connectionName("streams"),
              streams: s.streams,
              streamsPerChannel: s.streamsPerChannel,
              messages: s.streamsMessages,
              bodyBytes: s.bodyBytes
            }))
          break
        case "quorum":
          results["quorum"] = await runQuorumPhase(bench, s)
          break
        case "tracing":
          results["tracing"] = await runTracingPhase(bench, admin, s)
          break
        case "publish":
          results["publish"] = await bench.phase("publish", (proxy) =>
            runPublish({
              admin,
              proxy,
              messages: envInt("BENCH_PUBLISH_N", Math.min(s.messages, 50_000)),
              bodyBytes: s.bodyBytes,
              repetitions: s.repetitions,
              batchSize: envInt("BENCH_PUBLISH_BATCH", 1_000)
            }))
          break
        case "cancel":
          results["cancel"] = await bench.phase("cancel", (proxy) =>
            runCancel({ admin, proxy, connectionName: bench.connectionName("cancel"), cycles: s.cancelCycles }))
          break
      }
    }
  } finally {
    await bench.shutdown()
  }

  clearInterval(competitorTimer)
  const othersAfter = await listBrokerConnections()
  const report = {
    startedAt: startedAt.toISOString(),
    durationSeconds: (now() - started) / 1000,
    settings: { ...s },
    environment: {
      ...environment,
      loadavgAtEnd: loadavg(),
      otherBrokerConnectionsAtEnd: othersAfter?.length ?? null,
      benchRssMax: bench.benchRssMax,
      benchHeapUsedMax: bench.benchHeapUsedMax,
      /** Test runners or chaos scripts seen running during each phase (checked every 2 s). */
      competingProcesses: Object.fromEntries([...competitors].map(([phase, names]) => [phase, [...names]]))
    },
    targets: TARGETS,
    ...results
  }
  const text = render(report, results)
  process.stdout.write(text + "\n")
  await mkdir(s.resultsDir, { recursive: true })
  const file = join(s.resultsDir, "latest.json")
  await writeFile(file, JSON.stringify(report, null, 2) + "\n")
  log(`wrote ${file} (${report.durationSeconds.toFixed(0)} s in all)`)
}

/** Test runners (vitest) and chaos scripts running on this machine now, by a short name. */
const competingProcesses = async (): Promise<Array<string>> => {
  const found = new Set<string>()
  for (const entry of await readdir("/proc").catch(() => [] as Array<string>)) {
    if (!/^\d+$/.test(entry) || Number(entry) === process.pid) continue
    const cmdline = (await readFile(`/proc/${entry}/cmdline`, "utf8").catch(() => "")).split("\0").join(" ")
    const match = /\b(vitest|chaos[\w.-]*)/.exec(cmdline)
    if (match?.[1] !== undefined && !cmdline.includes("vitest-watchdog")) found.add(match[1].replace(/\.js$/, ""))
  }
  return [...found]
}

interface ProfilePhaseResult {
  readonly file: string
  readonly messages: number
  readonly msgPerSecProfiled: number
  readonly windowAligned: boolean
  readonly summary: ProfileSummary
  readonly reportFile: string
}

/** One StreamSchemaMessages drain with the child under --cpu-prof; the profile is cut to the drain. */
const runProfilePhase = async (bench: Bench, admin: Admin, s: Settings): Promise<PhaseOutcome<ProfilePhaseResult>> => {
  await mkdir(s.profileDir, { recursive: true })
  const name = `proxy-${bench.names.prefix}-${Date.now()}.cpuprofile`
  const file = join(s.profileDir, name)
  let window: { fromUs: number; toUs: number; seconds: number } | undefined
  const outcome = await bench.phase("profile", async (proxy) => {
    const client = await makeClient(proxy.port)
    try {
      await prefill(admin, s.messages, bodyFactory(s.bodyBytes))
      const offsetUs = hrtimeUs() - now() * 1000
      // BENCH_PROFILE_RPC=subscribe profiles the acknowledged subscription instead.
      const drained = process.env["BENCH_PROFILE_RPC"] === "subscribe"
        ? await drainSubscribe(client, s.messages, { maxInFlight: s.prefetch, ackBatch: 16 })
        : await drainStream(client, s.messages)
      window = { fromUs: drained.startedAt * 1000 + offsetUs, toUs: drained.finishedAt * 1000 + offsetUs, seconds: drained.seconds }
      await admin.waitQueue(admin.names.schemas, (q) => q.consumerCount === 0, 10_000, 5)
    } finally {
      client.close()
    }
  }, { nodeArgs: ["--cpu-prof", `--cpu-prof-dir=${s.profileDir}`, `--cpu-prof-name=${name}`] })
  if (outcome.error !== undefined || window === undefined) return { error: outcome.error ?? "no drain window" }
  // The child writes the profile on exit (phase() has stopped it); give the file a moment.
  for (let i = 0; i < 50; i++) {
    if (await access(file).then(() => true, () => false)) break
    await sleep(100)
  }
  try {
    const w = window
    let summary = await analyzeProfile(file, { fromUs: w.fromUs, toUs: w.toUs, messages: s.messages, top: 30 })
    // V8's profile clock and process.hrtime are both CLOCK_MONOTONIC on Linux; if not, use it all.
    const windowAligned = summary.windowMs > 0.5 * w.seconds * 1000
    if (!windowAligned) summary = await analyzeProfile(file, { messages: s.messages, top: 30 })
    const reportFile = join(s.resultsDir, "profile-latest.txt")
    await mkdir(s.resultsDir, { recursive: true })
    await writeFile(reportFile, formatSummary(summary) + "\n")
    log(`profile: ${file} analysed into ${reportFile}`)
    return {
      result: { file, messages: s.messages, msgPerSecProfiled: s.messages / w.seconds, windowAligned, summary, reportFile },
      ...(outcome.proxy ? { proxy: outcome.proxy } : {})
    }
  } catch (error) {
    return { error: `analyse ${file}: ${errorText(error)}` }
  }
}

/** The quorum phase: one proxy child per queue type on the local cluster (quorum.ts). */
/** The throughput drains' sizes, as the settings give them (the throughput and tracing phases). */
const drainSettings = (s: Settings) => ({
  messages: s.messages,
  bodyBytes: s.bodyBytes,
  prefetch: s.prefetch,
  repetitions: s.repetitions,
  warmupMessages: s.warmupMessages
})

/** Tracing off, then on (always_on, to a receiver that drops everything): bench/tracing.ts. */
const runTracingPhase = async (bench: Bench, admin: Admin, s: Settings): Promise<TracingOutcome> => {
  const receiver = await dropAllReceiver()
  try {
    const drains = (label: string, env: Record<string, string>) =>
      bench.phase("tracing", (proxy) =>
        runThroughput({ admin, proxy, ...drainSettings(s), modes: tracingModes, label }), { label, env })
    const off = await drains("tracing off", {})
    const on = await drains("tracing on", { OTEL_EXPORTER_OTLP_ENDPOINT: receiver.url, OTEL_TRACES_SAMPLER: "always_on" })
    if (off.result === undefined || on.result === undefined) return { error: off.error ?? on.error ?? "no result" }
    return { result: { off: off.result, on: on.result, spansReceived: receiver.spans(), costUsPerMsg: tracingCost(off.result, on.result) } }
  } catch (error) {
    log(`phase tracing failed: ${errorText(error)}`)
    return { error: errorText(error) }
  } finally {
    await receiver.close()
  }
}

const runQuorumPhase = async (bench: Bench, s: Settings): Promise<PhaseOutcome<QuorumResult>> => {
  try {
    const result = await runQuorum({
      prefix: bench.names.prefix,
      prefetch: s.prefetch,
      bodyBytes: s.bodyBytes,
      withChild: (label, names, env, body) => bench.phase("quorum", body, { label, names, env }),
      track: (cleanup) => {
        bench.extraCleanups.add(cleanup)
        return () => { bench.extraCleanups.delete(cleanup) }
      }
    }, { messages: s.quorumMessages, repetitions: s.quorumRepetitions, warmupMessages: s.quorumWarmupMessages })
    return { result }
  } catch (error) {
    log(`phase quorum failed: ${errorText(error)}`)
    return { error: errorText(error) }
  }
}

// ---------------------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------------------

const verdict = (ok: boolean | null) => (ok === null ? "n/a" : ok ? "PASS" : "FAIL")

/** One row per drain of the throughput method (the throughput and quorum phases). */
const runRows = (runs: ReadonlyArray<RunRecord>, prefix = ""): Array<Array<string>> => {
  const rows: Array<Array<string>> = [["run", "drain msg/s", "drain s", "publish s", "proxy CPU µs/msg", "client CPU µs/msg", "broker CPU µs/msg", "all CPU µs/msg", "load before", "cores busy", "proxy peak RSS", "proxy GC", "left", "note"]]
  for (const run of runs) {
    rows.push([
      `${prefix}${MODE_LABEL[run.mode]} #${run.repetition}`,
      fmtInt(run.msgPerSec),
      fmt(run.seconds, 2),
      fmt(run.publishSeconds, 1),
      fmt(run.proxyCpuUsPerMsg, 1),
      fmt(run.clientCpuUsPerMsg, 1),
      fmt(run.brokerCpuUsPerMsg, 1),
      fmt(run.machineCpuUsPerMsg, 1),
      fmt(run.loadBefore, 2),
      fmt(run.machineCoresBusy, 2),
      run.proxyRssMax === null ? "" : mb(run.proxyRssMax),
      run.proxyGcPercent === null ? "" : `${fmt(run.proxyGcPercent, 1)}%`,
      run.leftInQueue === null ? "?" : String(run.leftInQueue),
      [run.error ?? "", run.malformed ? `malformed ${run.malformed}` : "", run.redelivered ? `redelivered ${run.redelivered}` : "",
        run.settleErrors ? `settle errors ${run.settleErrors}` : ""].filter((x) => x).join("; ")
    ])
  }
  return rows
}

/** Messages a phase moved through the broker (published and consumed counted once), where it has a count. */
const phaseMessages = (phase: string, result: unknown): number | null => {
  if (typeof result !== "object" || result === null) return null
  const r = result as Record<string, unknown>
  switch (phase) {
    case "throughput":
    case "publish": {
      const runs = r["runs"] as ReadonlyArray<{ readonly messages?: number }> | undefined
      const per = phase === "publish" ? (r["messages"] as number) : undefined
      // Each run moved its messages once; the warm-up runs are not in `runs`.
      return runs === undefined ? null : runs.reduce((sum, run) => sum + (run.messages ?? per ?? 0), 0)
    }
    case "latency":
      return typeof r["proxy"] === "object" && r["proxy"] !== null ? ((r["proxy"] as { count: number }).count) : null
    case "streams":
      return typeof r["messages"] === "number" ? r["messages"] : null
    default:
      return null
  }
}

const phaseWindowRows = (results: Record<string, unknown>): Array<Array<string>> => {
  const rows: Array<Array<string>> = [["phase", "seconds", "load before", "cores busy", "proxy CPU s", "bench CPU s", "broker CPU s", "messages", "proxy / bench / broker µs/msg"]]
  for (const [phase, o] of Object.entries(results)) {
    const window = (o as PhaseOutcome<unknown> | undefined)?.window
    if (window === undefined) continue
    const messages = phaseMessages(phase, (o as PhaseOutcome<unknown>).result)
    const per = messages === null ? null : perMessage(window, messages)
    rows.push([
      phase,
      fmt(window.seconds, 1),
      fmt(window.loadBefore, 2),
      fmt(window.coresBusy, 2),
      fmt(window.cpuSeconds.proxy, 1),
      fmt(window.cpuSeconds.bench, 1),
      fmt(window.cpuSeconds.broker, 1),
      messages === null ? "n/a" : fmtInt(messages),
      per === null ? "" : `${fmt(per.proxy, 1)} / ${fmt(per.bench, 1)} / ${fmt(per.broker, 1)}`
    ])
  }
  return rows
}

const render = (report: { environment: Record<string, unknown>; durationSeconds: number }, results: Record<string, unknown>) => {
  const out: Array<string> = []
  const env = report.environment
  out.push(`messaging-proxy benchmark — ${report.durationSeconds.toFixed(0)} s, node ${String(env["node"])}, ${String(env["cpus"])} CPUs`)
  const loads = (key: string) => (env[key] as ReadonlyArray<number>).map((l) => l.toFixed(2)).join(" ")
  out.push(`load average at start ${loads("loadavgAtStart")}, at end ${loads("loadavgAtEnd")}; ` +
    `broker connections (all users) at start ${String(env["otherBrokerConnectionsAtStart"])}, at end ${String(env["otherBrokerConnectionsAtEnd"])}`)
  out.push(`bench process: peak RSS ${mb(env["benchRssMax"] as number)}, peak heap used ${mb(env["benchHeapUsedMax"] as number)}`)
  const competing = Object.entries(env["competingProcesses"] as Record<string, ReadonlyArray<string>>)
  out.push(competing.length === 0
    ? "no test runner or chaos script seen running during the phases"
    : `WARNING: busy machine: ${competing.map(([phase, names]) => `${names.join(", ")} during ${phase}`).join("; ")}`)

  const summary: Array<Array<string>> = [["metric", "result", "target", ""]]
  const t = results["throughput"] as PhaseOutcome<Awaited<ReturnType<typeof runThroughput>>> | undefined
  if (t?.result) {
    const r = t.result
    out.push("", `1. Throughput: ${fmtInt(r.messages)} × ${r.bodyBytes} B messages, prefetch ${r.prefetch}, ${r.repetitions} repetitions (a,b,c alternating) after an untimed warm-up drain of ${fmtInt(r.warmupMessages)} through each`)
    out.push(table(runRows(r.runs)))
    if (!r.subscribe.available) out.push(`(c) n/a: ${r.subscribe.reason}`)
    for (const mode of MODES) {
      summary.push([`throughput ${MODE_LABEL[mode]} (median)`, `${fmtInt(r.medianMsgPerSec[mode])} msg/s`, "", ""])
    }
    summary.push(["throughput ratio b/a (median of each repetition's)", fmt(r.ratioStreamToDirect, 3), `≥ ${TARGETS.streamRatio}`,
      verdict(r.ratioStreamToDirect === null ? null : r.ratioStreamToDirect >= TARGETS.streamRatio)])
    summary.push(["throughput ratio c/a (per-message client acks)", fmt(r.ratioSubscribeToDirect, 3), `≥ ${TARGETS.subscribeRatio}`,
      verdict(r.ratioSubscribeToDirect === null ? null : r.ratioSubscribeToDirect >= TARGETS.subscribeRatio)])
    summary.push(["proxy CPU per message (b / c, median)",
      `${fmt(r.medianProxyCpuUsPerMsg.stream, 1)} / ${fmt(r.medianProxyCpuUsPerMsg.subscribe, 1)} µs`, "", ""])
    summary.push(["direct consumer's own CPU per message (a, median)", `${fmt(r.medianClientCpuUsPerMsg.direct, 1)} µs`, "", ""])
    summary.push(["proxy CPU per streamed message / direct consumer's (b / a)", fmt(r.cpuRatioStreamToDirect, 2), `≤ ${TARGETS.streamCpuRatio}`,
      verdict(r.cpuRatioStreamToDirect === null ? null : r.cpuRatioStreamToDirect <= TARGETS.streamCpuRatio)])
    const m = r.medianMachineCpuUsPerMsg
    const c = r.medianMachineCoresBusy
    summary.push(["machine CPU per message, all processes (a / b / c)",
      `${fmt(m.direct, 1)} / ${fmt(m.stream, 1)} / ${fmt(m.subscribe, 1)} µs`, "", ""])
    summary.push([`cores busy during the drains (a / b / c, of ${String(report.environment["cpus"])})`,
      `${fmt(c.direct, 2)} / ${fmt(c.stream, 2)} / ${fmt(c.subscribe, 2)}`, "", ""])
  } else if (t?.error) summary.push(["throughput", `failed: ${t.error}`, "", "FAIL"])

  const p = results["profile"] as PhaseOutcome<ProfilePhaseResult> | undefined
  if (p?.result) {
    const r = p.result
    out.push("", `Profile (${fmtInt(r.messages)} messages through StreamSchemaMessages under --cpu-prof, ${fmtInt(r.msgPerSecProfiled)} msg/s; ` +
      `${r.windowAligned ? "cut to the drain window" : "whole process lifetime"}): ${r.file}`)
    out.push(`full report: ${r.reportFile}`)
    const top = r.summary.selfByPackage.slice(0, 12).map((e) => `  ${e.percent.toFixed(1).padStart(5)}%  ${fmt(e.usPerMessage, 2).padStart(6)} µs/msg  ${e.key}`)
    out.push(`busy ${r.summary.busyMs.toFixed(0)} ms, idle ${r.summary.idleMs.toFixed(0)} ms, GC ${r.summary.gcMs.toFixed(0)} ms; self time by package/file:`, ...top)
  } else if (p?.error) out.push("", `Profile failed: ${p.error}`)

  const l = results["latency"] as PhaseOutcome<Awaited<ReturnType<typeof runLatency>>> | undefined
  if (l?.result) {
    const r = l.result
    out.push("", `2. Latency: ${r.ratePerSecond} msg/s for ${r.seconds} s (after ${r.warmupSeconds} s warm-up), achieved ${fmt(r.achievedRate, 0)} msg/s; ` +
      `publisher lag p99 ${fmt(r.publisherLagMs.p99, 2)} ms, max ${fmt(r.publisherLagMs.max, 1)} ms; proxy CPU ${fmt(r.proxyCpuPercent, 0)}%`)
    const pr = r.proxyResources
    if (pr) {
      out.push(`proxy during the window: event-loop delay max ${fmt(pr.loopDelayMaxMs, 1)} ms (worst 0.5 s interval p99 ${fmt(pr.loopDelayP99MaxMs, 1)} ms); ` +
        `GC ${pr.gcCount ?? "n/a"} pauses, ${fmt(pr.gcTotalMs, 0)} ms in all, longest ${fmt(pr.gcMaxMs, 1)} ms; peak RSS ${mb(pr.rssMax)}`)
    }
    out.push(`runnable but waiting for a CPU during the window: proxy main thread ${fmt(r.proxyCpuWaitMs, 0)} ms, bench process ${fmt(r.benchCpuWaitMs, 0)} ms ` +
      `(of ${r.seconds * 1000} ms; high values = a busy machine)`)
    const row = (label: string, d: typeof r.direct) =>
      [label, fmt(d.p50, 3), fmt(d.p90, 3), fmt(d.p99, 3), fmt(d.p999, 3), fmt(d.max, 2), fmtInt(d.count), String(d.missing), String(d.duplicates)]
    out.push(table([
      ["path (ms)", "p50", "p90", "p99", "p99.9", "max", "received", "missing", "dups"],
      row("direct consumer", r.direct),
      row("proxy stream", r.proxy)
    ]))
    summary.push(["latency p50 / p99 / max direct", `${fmt(r.direct.p50, 2)} / ${fmt(r.direct.p99, 2)} / ${fmt(r.direct.max, 1)} ms`, "", ""])
    summary.push(["latency p50 / p99 / max proxy", `${fmt(r.proxy.p50, 2)} / ${fmt(r.proxy.p99, 2)} / ${fmt(r.proxy.max, 1)} ms`, "", ""])
    summary.push(["added p99 at 1k msg/s (proxy − direct)", `${fmt(r.addedP99Ms, 3)} ms`, `≤ ${TARGETS.addedP99Ms} ms`,
      verdict(r.proxy.missing > 0 ? false : r.addedP99Ms <= TARGETS.addedP99Ms)])
  } else if (l?.error) summary.push(["latency", `failed: ${l.error}`, "", "FAIL"])

  const st = results["streams"] as PhaseOutcome<Awaited<ReturnType<typeof runStreams>>> | undefined
  if (st?.result) {
    const r = st.result
    const ch = (c: typeof r.channelsIdle) =>
      c === null
        ? "n/a (rabbitmqctl)"
        : `${fmtInt(c.channels)} channels on ${c.connections} connection(s)` +
          (c.byName.length ? ` (${c.byName.map((x) => `${x.role} ${x.channels}`).join(", ")})` : "")
    const allArrived = r.received === r.messages && r.duplicates === 0
    out.push("", `3. Many streams: ${fmtInt(r.streams)} StreamSchemaMessages calls on one queue over ${r.grpcChannels} gRPC connection(s), ${fmtInt(r.messages)} messages`)
    out.push(table([
      ["what", "value"],
      ["all calls started on the client in", `${fmt(r.startCallsSeconds, 2)} s`],
      ["all consumers registered (opened) after", r.openAllSeconds === null ? `not all: ${fmtInt(r.consumersOpen)} consumers` : `${fmt(r.openAllSeconds, 2)} s`],
      ["all messages arrived after", r.deliverAllSeconds === null ? "not all arrived" : `${fmt(r.deliverAllSeconds, 2)} s`],
      ["received / duplicates", `${fmtInt(r.received)} / ${r.duplicates}`],
      ["streams that got ≥ 1 message / max per stream", `${fmtInt(r.streamsWithMessages)} / ${r.maxPerStream}`],
      ["stream errors", r.streamErrors ? `${r.streamErrors} (first: ${r.firstStreamError})` : "0"],
      ["proxy RSS idle → peak", `${mb(r.proxyRssIdle)} → ${mb(r.proxyRssPeak)}`],
      ["proxy RSS per open stream ((peak − idle) / streams)", r.proxyRssPerStream === null ? "n/a" : `${fmt(r.proxyRssPerStream / 1e3, 1)} kB`],
      ["proxy heap used peak", mb(r.proxyHeapUsedPeak)],
      ["proxy event-loop delay max", r.proxyLoopDelayMaxMs === null ? "n/a" : `${fmt(r.proxyLoopDelayMaxMs, 0)} ms`],
      ["proxy log lines per stream", fmt(r.proxyLogLinesPerStream, 1)],
      ["broker: proxy connections idle", ch(r.channelsIdle)],
      ["broker: with all streams open", ch(r.channelsOpen)],
      ["broker: after cancel", ch(r.channelsAfterCancel) + (r.channelsZeroAfterMs === null ? "" : ` (seen by check #${r.channelsChecks}, done ${fmt(r.channelsZeroAfterMs, 0)} ms after the cancel)`)],
      ["cancel all → 0 consumers", r.cancelToZeroConsumersMs === null ? "timed out" : `${fmt(r.cancelToZeroConsumersMs, 0)} ms`],
      ["ready messages left in the queue", r.leftInQueue === null ? "?" : String(r.leftInQueue)]
    ]))
    const n = fmtInt(r.streams)
    summary.push([`${n} streams: opened (all consumers on the broker)`, r.openAllSeconds === null ? `not all (${fmtInt(r.consumersOpen)})` : `${fmt(r.openAllSeconds, 2)} s`, "all",
      verdict(r.openAllSeconds !== null)])
    summary.push([`${n} streams: all ${fmtInt(r.messages)} messages arrived, none twice`, `${fmtInt(r.received)}/${fmtInt(r.messages)}, ${r.duplicates} dups`, "all", verdict(allArrived)])
    const target = rssTarget(r.streams)
    summary.push([`${n} streams: proxy peak RSS`, mb(r.proxyRssPeak), `< ${mb(target)}`,
      verdict(r.proxyRssPeak === null ? null : r.proxyRssPeak < target)])
    summary.push([`${n} streams: proxy connections used (with all open)`, r.channelsOpen === null ? "n/a" : String(r.channelsOpen.connections), "", ""])
    summary.push([`${n} streams: proxy channels open / after cancel`,
      `${r.channelsOpen === null ? "n/a" : fmtInt(r.channelsOpen.channels)} / ${r.channelsAfterCancel === null ? "n/a" : fmtInt(r.channelsAfterCancel.channels)}`, "… / 0",
      verdict(r.channelsAfterCancel === null ? null : r.channelsAfterCancel.channels === 0)])
    summary.push([`${n} streams: cancel all → 0 consumers`, r.cancelToZeroConsumersMs === null ? "timed out" : `${fmt(r.cancelToZeroConsumersMs, 0)} ms`, "", ""])
  } else if (st?.error) summary.push(["many streams", `failed: ${st.error}`, "", "FAIL"])

  const c = results["cancel"] as PhaseOutcome<Awaited<ReturnType<typeof runCancel>>> | undefined
  if (c?.result) {
    const r = c.result
    out.push("", `4. Cancel latency: ${r.cycles} cycles; checkQueue round trip ${fmt(r.pollRoundTripMs, 3)} ms (the resolution)`)
    out.push(table([
      ["ms", "p50", "p90", "p99", "max"],
      ["call → consumer on broker", fmt(r.openMs.p50, 2), fmt(r.openMs.p90, 2), fmt(r.openMs.p99, 2), fmt(r.openMs.max, 2)],
      ["cancel → 0 consumers", fmt(r.cancelMs.p50, 2), fmt(r.cancelMs.p90, 2), fmt(r.cancelMs.p99, 2), fmt(r.cancelMs.max, 2)]
    ]))
    summary.push(["cancel → 0 consumers (median of " + r.cycles + ")", `${fmt(r.cancelMs.p50, 2)} ms (max ${fmt(r.cancelMs.max, 1)})`, `≤ ${TARGETS.cancelMs} ms`,
      verdict(r.cancelMs.p50 <= TARGETS.cancelMs)])
  } else if (c?.error) summary.push(["cancel latency", `failed: ${c.error}`, "", "FAIL"])

  const q = results["quorum"] as PhaseOutcome<QuorumResult> | undefined
  const outcomes: Array<[string, PhaseOutcome<unknown>]> = Object.entries(results)
    .filter(([phase]) => phase !== "quorum")
    .map(([phase, o]) => [phase, o as PhaseOutcome<unknown>])
  if (q?.result) {
    const r = q.result
    const cl = r.cluster
    out.push("", `5. Quorum vs classic queue on the local 3-node cluster (${cl.nodes.join(", ")}; ` +
      `${cl.wasUp ? "was up" : "started"}, cluster.sh start took ${fmt(cl.startSeconds, 1)} s): ` +
      `${fmtInt(r.messages)} messages, (a) and (b) alternating, ${r.repetitions} repetitions after a warm-up drain of ${fmtInt(r.warmupMessages)} through each; ` +
      `broker CPU = the 3 nodes' beam.smp (${cl.pids.length} seen)`)
    const rows: Array<Array<string>> = [["queue type", "proxy/admin/direct node", "queue leader", "(a) direct msg/s", "(b) stream msg/s", "b/a", "publish msg/s (confirmed)",
      "proxy CPU µs/msg (b)", "broker CPU µs/msg (a / b)", "all CPU µs/msg (a / b)", "cores busy (a / b)"]]
    const runs: Array<Array<string>> = []
    for (const type of QUEUE_TYPES) {
      const o = r.byType[type]
      if (o === undefined) continue
      outcomes.push([`quorum (${type} queue)`, o])
      if (!o.result) {
        rows.push([type, `failed: ${o.error ?? "?"}`])
        summary.push([`${type} queue drains`, `failed: ${o.error ?? "?"}`, "", "FAIL"])
        continue
      }
      const t = o.result.throughput
      const med = (pick: (run: RunRecord) => number | null, mode: "direct" | "stream") => {
        const values = t.runs.filter((x) => x.mode === mode).map(pick).filter((v): v is number => v !== null).sort((a, b) => a - b)
        if (values.length === 0) return null
        const mid = Math.floor(values.length / 2)
        return values.length % 2 ? values[mid]! : (values[mid - 1]! + values[mid]!) / 2
      }
      const placement = o.result.placement
      rows.push([
        type,
        o.result.node,
        placement === null ? "?" : `${placement.leader ?? "n/a"}${placement.members.length > 1 ? ` (${placement.members.length} members)` : ""}`,
        fmtInt(t.medianMsgPerSec.direct),
        fmtInt(t.medianMsgPerSec.stream),
        fmt(t.ratioStreamToDirect, 3),
        fmtInt(o.result.publishMsgPerSec),
        fmt(t.medianProxyCpuUsPerMsg.stream, 1),
        `${fmt(med((x) => x.brokerCpuUsPerMsg, "direct"), 1)} / ${fmt(med((x) => x.brokerCpuUsPerMsg, "stream"), 1)}`,
        `${fmt(t.medianMachineCpuUsPerMsg.direct, 1)} / ${fmt(t.medianMachineCpuUsPerMsg.stream, 1)}`,
        `${fmt(t.medianMachineCoresBusy.direct, 2)} / ${fmt(t.medianMachineCoresBusy.stream, 2)}`
      ])
      runs.push(...runRows(t.runs, `${type} `).slice(runs.length === 0 ? 0 : 1))
      summary.push([`${type} queue (a) direct / (b) stream (median)`, `${fmtInt(t.medianMsgPerSec.direct)} / ${fmtInt(t.medianMsgPerSec.stream)} msg/s`, "", ""])
      summary.push([`${type} queue ratio b/a`, fmt(t.ratioStreamToDirect, 3), `≥ ${TARGETS.ratio}`,
        verdict(t.ratioStreamToDirect === null ? null : t.ratioStreamToDirect >= TARGETS.ratio)])
    }
    rows.push(["quorum / classic", "", "", fmt(r.quorumToClassic.direct, 3), fmt(r.quorumToClassic.stream, 3)])
    out.push(table(rows))
    if (runs.length > 0) out.push(table(runs))
    summary.push(["quorum / classic msg/s ((a) / (b))", `${fmt(r.quorumToClassic.direct, 3)} / ${fmt(r.quorumToClassic.stream, 3)}`, "", ""])
  } else if (q?.error) summary.push(["quorum vs classic", `failed: ${q.error}`, "", "FAIL"])

  const pub = results["publish"] as PhaseOutcome<PublishResult> | undefined
  if (pub?.result) {
    const r = pub.result
    out.push("", `Publishing: ${fmtInt(r.messages)} × ~1 KiB, direct amqplib with 64 confirms in flight vs PublishBatch calls of ${fmtInt(r.batchSize)} (medians)`)
    summary.push(["publish (a) direct confirmed / PublishBatch (median)", `${fmtInt(r.medianMsgPerSec.direct)} / ${fmtInt(r.medianMsgPerSec.proxy)} msg/s`, "", ""])
    out.push(table([
      ["run", "msg/s", "proxy CPU µs/msg", "bench CPU µs/msg", "broker CPU µs/msg", "all CPU µs/msg", "load before", "cores busy"],
      ...r.runs.map((run) => [
        `${run.mode === "direct" ? "(a) direct confirmed publisher" : "(b) PublishBatch"} #${run.repetition}`,
        fmtInt(run.msgPerSec),
        run.mode === "direct" ? "(idle) " + fmt(run.cpuUsPerMsg.proxy, 1) : fmt(run.cpuUsPerMsg.proxy, 1),
        fmt(run.cpuUsPerMsg.bench, 1),
        fmt(run.cpuUsPerMsg.broker, 1),
        fmt(run.cpuUsPerMsg.machine, 1),
        fmt(run.window.loadBefore, 2),
        fmt(run.window.coresBusy, 2)
      ])
    ]))
    summary.push(["publish ratio PublishBatch / direct (median of each repetition's)", fmt(r.ratio, 3), `≥ ${TARGETS.publishRatio}`,
      verdict(r.ratio === null ? null : r.ratio >= TARGETS.publishRatio)])
  } else if (pub?.error) summary.push(["publish", `failed: ${pub.error}`, "", "FAIL"])

  const tr = results["tracing"] as TracingOutcome | undefined
  if (tr?.result) {
    const { off, on, spansReceived, costUsPerMsg } = tr.result
    out.push("", "Tracing: off, then on (always_on, OTLP/HTTP to a receiver that drops everything)")
    const rows = [["", "msg/s off", "msg/s on", "proxy CPU µs/msg off", "proxy CPU µs/msg on", "cost µs/msg"]]
    for (const mode of ["stream", "subscribe"] as const) {
      rows.push([MODE_LABEL[mode], fmtInt(off.medianMsgPerSec[mode]), fmtInt(on.medianMsgPerSec[mode]),
        fmt(off.medianProxyCpuUsPerMsg[mode], 1), fmt(on.medianProxyCpuUsPerMsg[mode], 1), fmt(costUsPerMsg[mode], 1)])
      summary.push([`tracing cost per message ${MODE_LABEL[mode]}`, `${fmt(costUsPerMsg[mode], 1)} µs proxy CPU`, "", ""])
    }
    out.push(table(rows), `spans received while on: ${spansReceived}`)
  } else if (tr?.error) summary.push(["tracing", `failed: ${tr.error}`, "", "FAIL"])

  const windows = phaseWindowRows(results)
  if (windows.length > 1) {
    out.push("", "The machine and each process over each phase (proxy child start and stop excluded; the per-message figures divide by the messages the phase moved, set-up included)")
    out.push(table(windows))
  }
  if (summary.length > 1) out.push("", "Summary", table(summary))
  for (const [phase, o] of outcomes) {
    if (o.proxy && (o.proxy.warnings > 0 || (o.proxy.exitCode !== 0 && o.proxy.exitCode !== null))) {
      out.push(`note: ${phase} proxy child exited ${String(o.proxy.exitCode)} with ${o.proxy.warnings} warning/error log lines` +
        (o.proxy.problems.length ? `: ${o.proxy.problems.map((p) => JSON.stringify(p)).join(", ")}` : ""))
    }
    if (o.proxy?.tail?.length) out.push(`${phase} proxy output (last lines):`, ...o.proxy.tail.map((line) => `  ${line}`))
  }
  return out.join("\n")
}

main().catch((error: unknown) => {
  process.stderr.write(`bench failed: ${error instanceof Error ? error.stack ?? error.message : String(error)}\n`)
  process.exitCode = 1
})
