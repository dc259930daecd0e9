/**
 * What the two chaos runs share: the plain run (chaos.ts, one broker behind a relay) and the cluster
 * run (chaos-cluster.ts, three nodes, two proxies). Both read the same knobs, keep the same tally
 * of what was published, received and done to them, supervise their proxies and consumer processes
 * the same way, run faults in shuffled rounds, wait for the end by the same rules and print the
 * same report around the lines of their own. Each mode keeps only what really differs: how it
 * publishes, which proxies it runs, its fault kinds and the lines about its broker.
 */
import type * as amqp from "amqplib"
import { mkdirSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { fileURLToPath } from "node:url"
import { schemaBody } from "../test/fixtures/bodies.js"
import {
  type AckedLine,
  type ClientEvent,
  type ClientProcess,
  type ClientSink,
  envNumber,
  errorText,
  type Exited,
  formatTally,
  type ProxyInstance,
  type ProxyLogLine,
  type ProxyLogSink,
  sleep,
  startClientProcess,
  Tally,
  truncate,
  within
} from "./chaos-support.js"

/** The proxy's entry point and the consumer script, as built next to this file. */
export const proxyMain = fileURLToPath(new URL("../src/main.js", import.meta.url))
export const clientScript = fileURLToPath(new URL("./chaos-client.js", import.meta.url))

/** Proxy settings of every chaos proxy: a short graceful shutdown and quick broker reconnects. */
export const chaosProxyTimeouts: Readonly<Record<string, string>> = {
  MESSAGING_SHUTDOWN_TIMEOUT_SECONDS: "2",
  RABBITMQ_RECONNECT_MAX_DELAY_SECONDS: "2"
}

/** The run's log folder in the temp dir (created), named after the run's queue prefix. */
export const makeLogDir = (prefix: string): string => {
  const logDir = join(tmpdir(), `messaging-proxy-chaos-${prefix}`)
  mkdirSync(logDir, { recursive: true })
  return logDir
}

/** The id of the run's `index`-th message: the queue prefix and a zero-padded number. */
export const messageId = (prefix: string, index: number): string => `${prefix}-${String(index).padStart(6, "0")}`

/** The body published for a message id: a schema message that carries the id. */
export const messageBody = (id: string): Buffer => Buffer.from(JSON.stringify(schemaBody(id)))

/** A message's id: its message-id property, else the id in its JSON body. */
export const messageIdOf = (message: amqp.GetMessage): string =>
  String(message.properties.messageId ?? (JSON.parse(message.content.toString()) as { readonly id?: unknown }).id)

// ---- settings ----------------------------------------------------------------------------------

/** The knobs both runs read from the environment (see the header of chaos.ts for their meaning). */
export interface RunSettings {
  readonly n: number
  readonly timeoutMs: number
  readonly clients: number
  readonly publishMs: number
  readonly faultIntervalMs: number
  readonly maxInFlight: number
  readonly holdMin: number
  readonly holdMax: number
}

/**
 * Reads the shared knobs with the mode's defaults for CHAOS_CLIENTS and CHAOS_PUBLISH_SECONDS; `more`
 * reads the mode's own knobs, in this order among them (so they are checked and listed after
 * CHAOS_FAULT_INTERVAL_SECONDS). Exits 2 on a bad value.
 */
export const readSettings = <E extends Record<string, number>>(
  defaults: { readonly clients: number; readonly publishSeconds: number },
  more: () => E
): RunSettings & E => {
  const hold = (process.env["CHAOS_HOLD_MS"] ?? "20-300").split("-").map(Number)
  return {
    n: Math.floor(envNumber("CHAOS_N", 10_000, 1)),
    timeoutMs: envNumber("CHAOS_TIMEOUT_SECONDS", 120, 1) * 1000,
    clients: Math.floor(envNumber("CHAOS_CLIENTS", defaults.clients, 1)),
    publishMs: envNumber("CHAOS_PUBLISH_SECONDS", defaults.publishSeconds, 0) * 1000,
    faultIntervalMs: envNumber("CHAOS_FAULT_INTERVAL_SECONDS", 4, 0.5) * 1000,
    ...more(),
    maxInFlight: Math.floor(envNumber("CHAOS_MAX_IN_FLIGHT", 32, 1)),
    holdMin: Number.isFinite(hold[0]) ? hold[0]! : 20,
    holdMax: Number.isFinite(hold[1]) ? hold[1]! : Number.isFinite(hold[0]) ? hold[0]! : 300
  }
}

/**
 * The fault kinds picked by CHAOS_FAULTS (comma-separated; `defaults` when unset), in the order of
 * `all`. Exits 2, naming `mode` ("chaos", "chaos --cluster"), on an unknown kind.
 */
export const parseFaultKinds = <K extends string>(mode: string, all: ReadonlyArray<K>, defaults: ReadonlyArray<K>): ReadonlyArray<K> => {
  const raw = process.env["CHAOS_FAULTS"]
  if (raw === undefined || raw.trim() === "") return defaults
  const picked = raw.split(",").map((k) => k.trim()).filter((k) => k !== "")
  const unknown = picked.filter((k) => !all.some((f) => f === k))
  if (unknown.length > 0 || picked.length === 0) {
    process.stderr.write(`${mode}: CHAOS_FAULTS: unknown fault(s) ${unknown.join(", ")}; known: ${all.join(", ")}\n`)
    process.exit(2)
  }
  return all.filter((k) => picked.includes(k))
}

/** The run's start, times relative to it, and progress lines on stderr (`[mode +12.3s] text`). */
export interface Clock {
  readonly t0: number
  readonly elapsed: (at?: number) => string
  readonly progress: (text: string) => void
}

export const makeClock = (mode: string): Clock => {
  const t0 = Date.now()
  const elapsed = (at = Date.now()): string => `+${((at - t0) / 1000).toFixed(1)}s`
  return { t0, elapsed, progress: (text) => void process.stderr.write(`[${mode} ${elapsed()}] ${text}\n`) }
}

// ---- bookkeeping -------------------------------------------------------------------------------

/** One entry of the fault log; `detail` grows as the fault goes on (exit, restart, ...). */
export interface FaultRecord<K extends string> {
  readonly at: number
  readonly kind: K | "unexpected"
  detail: string
}

/** What a run counts: ids published and received, deliveries, faults and what the children said. */
export interface RunState<K extends string> {
  readonly published: Map<string, number> // id -> publish (confirm) time
  readonly received: Map<string, number> // id -> times reported
  lines: number
  lastProgressAt: number
  redeliveredFlag: number
  readonly deliveryCounts: Tally
  readonly perClient: Tally
  readonly settleErrors: Tally
  readonly callEnds: Tally
  readonly faults: Array<FaultRecord<K>>
  readonly proxyNotable: Tally
  readonly proxySamples: Map<string, ProxyLogLine>
  readonly subscriptionEnds: Tally
  readonly proxyRaw: Array<string>
  readonly garbage: Array<string>
}

export const newRunState = <K extends string>(): RunState<K> => ({
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
  garbage: []
})

const quietLevels = new Set(["INFO", "DEBUG", "TRACE"])

/**
 * Where the proxies' output goes: "subscription ended" reasons (the run's `prefix` masked), the
 * lines above INFO (counted, one sample each) and up to 200 non-JSON lines. `first` sees every log
 * line before that (the cluster run follows which node each proxy is on).
 */
export const proxyLogSink = <K extends string>(
  state: RunState<K>,
  prefix: string,
  first: (line: ProxyLogLine) => void = () => undefined
): ProxyLogSink => ({
  onLog: (line) => {
    first(line)
    if (line.text === "subscription ended") {
      state.subscriptionEnds.add(String(line.fields["reason"] ?? "?").replaceAll(prefix, "<prefix>"))
    }
    if (quietLevels.has(line.level)) return
    const key = `${line.level} ${line.text}`
    state.proxyNotable.add(key)
    if (!state.proxySamples.has(key)) state.proxySamples.set(key, line)
  },
  onRaw: (instance, stream, line) => {
    if (state.proxyRaw.length < 200) state.proxyRaw.push(`proxy#${instance} ${stream}: ${line}`)
  }
})

/**
 * Where the consumers' output goes: acked ids into the tally, how calls ended (the run's `prefix`
 * and timestamps masked, so that equal reasons add up), settle errors, and the held count a
 * cancelling client reports, added to its cancel fault in `pendingCancels`.
 */
const clientLogSink = <K extends string>(
  state: RunState<K>,
  prefix: string,
  pendingCancels: Map<string, FaultRecord<K>>
): ClientSink => ({
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
        // Drop what varies from call to call (timestamps) so that equal reasons add up.
        : `${String(event["code"])}: ${String(event["details"]).replaceAll(prefix, "<prefix>").replace(/ \(\d{4}-[^)]*\)/g, "")}`
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
})

// ---- supervision -------------------------------------------------------------------------------

/**
 * The run's fault log and its watch over the children: an exit we did not cause (no kill of ours,
 * not shutting down) is logged as an "unexpected" fault and the child restarted after 500 ms, at
 * most 10 times in all, so that a crash loop ends.
 */
export class Supervisor<K extends string> {
  /** Set once the run ends: exits from then on are ours and nothing is restarted. */
  shuttingDown = false
  private unexpectedRestarts = 0

  constructor(private readonly state: RunState<K>, private readonly progress: (text: string) => void) {}

  /** Logs a fault (with the time, also as a progress line) and returns its entry for more detail. */
  record(kind: K | "unexpected", detail: string): FaultRecord<K> {
    const entry: FaultRecord<K> = { at: Date.now(), kind, detail }
    this.state.faults.push(entry)
    this.progress(`fault ${kind}: ${detail}`)
    return entry
  }

  /**
   * Watches a proxy instance; `where` follows its number in the fault (" (port 1234)" or ""). It is
   * restarted by `restart` only while `isCurrent` (no newer instance took its place).
   */
  watchProxy(instance: ProxyInstance, where: string, isCurrent: () => boolean, restart: () => Promise<unknown>): void {
    this.watch(instance, {
      label: `proxy #${instance.number}`,
      where,
      note: "",
      isCurrent,
      action: "restarting",
      restart: () => void restart().catch((e) => this.progress(errorText(e)))
    })
  }

  /** Watches a consumer process; `replace` starts another in its place (unless the run is ending by then). */
  watchClient(client: ClientProcess, replace: () => void): void {
    this.watch(client, {
      label: client.name,
      where: "",
      note: "; replaced",
      isCurrent: () => true,
      action: "starting a replacement",
      restart: () => {
        if (!this.shuttingDown) replace()
      }
    })
  }

  /**
   * On an exit we did not cause: logs `<label><where> pid=… exited on its own: code=… signal=…<note>`
   * and, if the child is still `isCurrent` and the cap allows, announces `action` and runs `restart` 500 ms later.
   */
  private watch(
    child: { readonly exited: Promise<Exited>; readonly expectedExit: boolean; readonly pid: number },
    o: {
      readonly label: string
      readonly where: string
      readonly note: string
      readonly isCurrent: () => boolean
      readonly action: string
      readonly restart: () => void
    }
  ): void {
    void child.exited.then((exit) => {
      if (child.expectedExit || this.shuttingDown) return
      this.state.faults.push({
        at: exit.at,
        kind: "unexpected",
        detail: `${o.label}${o.where} pid=${child.pid} exited on its own: code=${exit.code} signal=${exit.signal}${o.note}`
      })
      if (!o.isCurrent()) return
      if (++this.unexpectedRestarts > 10) return this.progress(`UNEXPECTED: ${o.label} exited; too many restarts, giving up`)
      this.progress(`UNEXPECTED: ${o.label} exited (code=${exit.code} signal=${exit.signal}); ${o.action}`)
      void sleep(500).then(o.restart)
    })
  }
}

/** Ends a proxy at cleanup: SIGTERM, and SIGKILL if it is still there 8 s later. */
export const stopProxy = async (proxy: ProxyInstance | undefined): Promise<void> => {
  if (proxy === undefined) return
  proxy.kill("SIGTERM")
  if ((await within(proxy.exited, 8_000)) === undefined) proxy.kill("SIGKILL")
}

/**
 * The kill-proxy and term-proxy faults once logged as `entry`: sends `signal`, waits up to 10 s for
 * the exit (then SIGKILLs it, SUSPICIOUS), notes how it exited (a SIGTERM must give code 0) and
 * starts the next instance with `start`. Returns it and when the signal went.
 */
export const signalAndRestartProxy = async (
  old: ProxyInstance,
  signal: "SIGKILL" | "SIGTERM",
  entry: FaultRecord<string>,
  start: () => Promise<ProxyInstance>
): Promise<{ readonly next: ProxyInstance; readonly killedAt: number }> => {
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
  return { next: await start(), killedAt }
}

// ---- consumers ---------------------------------------------------------------------------------

export interface ClientPoolOptions<K extends string, T> {
  readonly state: RunState<K>
  readonly supervisor: Supervisor<K>
  readonly settings: RunSettings
  readonly logDir: string
  /** The run's queue prefix, masked in the call-end reasons. */
  readonly prefix: string
  /** The gRPC port of the proxy a client on `target` talks to. */
  readonly port: (target: T) => number
  /** What follows a client's name in its faults: its proxy (" (proxy port 1234)"), or "". */
  readonly where: (target: T) => string
  /** What follows "replacement chaos-N started" in a kill-client fault. */
  readonly replacementNote: string
}

/**
 * The consumer processes (chaos-client.ts), named chaos-1, chaos-2, ..., each bound to a `target`
 * (the proxy it talks to) and supervised: one that exits on its own is replaced on the same target.
 * Also the two consumer faults, cancel-call and kill-client, and the stop at the end.
 */
export class ClientPool<K extends string, T> {
  private readonly live = new Map<string, { readonly process: ClientProcess; readonly target: T }>()
  /** Cancel faults waiting for the client's report of what it held. */
  private readonly pendingCancels = new Map<string, FaultRecord<K>>()
  private readonly sink: ClientSink
  private started = 0

  constructor(private readonly options: ClientPoolOptions<K, T>) {
    this.sink = clientLogSink(options.state, options.prefix, this.pendingCancels)
  }

  /** Clients alive now. */
  get size(): number {
    return this.live.size
  }

  /** Client processes started over the run. */
  get count(): number {
    return this.started
  }

  start(target: T): ClientProcess {
    const { settings, logDir } = this.options
    const name = `chaos-${++this.started}`
    const client = startClientProcess(
      clientScript,
      name,
      [String(this.options.port(target)), String(settings.maxInFlight), String(settings.holdMin), String(settings.holdMax)],
      join(logDir, `client-${name}.log`),
      this.sink
    )
    this.live.set(name, { process: client, target })
    void client.exited.then(() => this.live.delete(name))
    this.options.supervisor.watchClient(client, () => this.start(target))
    return client
  }

  private pick(): { readonly process: ClientProcess; readonly target: T } | undefined {
    const alive = [...this.live.values()].filter((c) => c.process.alive && !c.process.expectedExit)
    return alive[Math.floor(Math.random() * alive.length)]
  }

  /** The cancel-call fault: a random live client cancels its call and opens a new one. */
  cancelCall(record: (detail: string) => FaultRecord<K>): void {
    const c = this.pick()
    if (c === undefined) return void record("no live client")
    const name = c.process.name
    this.pendingCancels.set(name, record(`${name}${this.options.where(c.target)} told to cancel its call and open a new one`))
    c.process.send("cancel")
  }

  /** The kill-client fault: a random live client is SIGKILLed and replaced on the same target. */
  async killClient(record: (detail: string) => FaultRecord<K>): Promise<void> {
    const c = this.pick()
    if (c === undefined) return void record("no live client")
    const entry = record(`${c.process.name}${this.options.where(c.target)} pid=${c.process.pid} SIGKILL`)
    c.process.kill("SIGKILL")
    const exit = await c.process.exited
    const replacement = this.start(c.target)
    entry.detail += `; exited signal=${exit.signal}; replacement ${replacement.name} started${this.options.replacementNote}`
  }

  /** At the end of the run: tells every client to stop (half-close, drain), SIGKILLs the ones left after 8 s. */
  async stopAll(): Promise<void> {
    this.options.supervisor.shuttingDown = true
    const stopping = [...this.live.values()].map((c) => c.process)
    for (const c of stopping) {
      c.expectedExit = true
      c.send("stop")
    }
    await within(Promise.all(stopping.map((c) => c.exited)), 8_000)
    for (const c of stopping) if (c.alive) c.kill("SIGKILL")
    await Promise.all(stopping.map((c) => c.exited))
    await sleep(200) // the last stdout lines
  }

  /** At cleanup: SIGKILLs every client still alive. */
  async killAll(): Promise<void> {
    this.options.supervisor.shuttingDown = true
    const all = [...this.live.values()].map((c) => c.process)
    for (const c of all) c.kill("SIGKILL")
    await Promise.all(all.map((c) => c.exited))
  }
}

// ---- faults and the end ------------------------------------------------------------------------

export interface FaultLoopOptions<K extends string> {
  readonly kinds: ReadonlyArray<K>
  readonly intervalMs: number
  readonly stop: AbortSignal
  /** Whether the publisher is done: the loop ends once it is and every kind ran at least once. */
  readonly publishDone: () => boolean
  /** Runs one fault; false when it could not run now (it goes to the end of the round). */
  readonly run: (kind: K) => Promise<boolean>
  readonly record: (kind: K, detail: string) => unknown
  /** A kind that must not start now (another fault of its sort is in progress), and how to wait for that to pass. */
  readonly hold?: { readonly blocked: (kind: K) => boolean; readonly wait: () => Promise<unknown> }
}

/**
 * The fault loop: after min(3 s, interval), runs the kinds in shuffled rounds, one every 0.75 to
 * 1.25 intervals, until `stop` aborts or the publisher is done and every kind has run; a fault that
 * throws is logged as FAILED.
 */
export const runFaultLoop = async <K extends string>(o: FaultLoopOptions<K>): Promise<void> => {
  const doneKinds = new Set<K>()
  await sleep(Math.min(3_000, o.intervalMs), o.stop)
  let round: Array<K> = []
  while (!o.stop.aborted) {
    if (o.publishDone() && doneKinds.size === o.kinds.length) break
    if (round.length === 0) round = [...o.kinds].sort(() => Math.random() - 0.5)
    const hold = o.hold
    const index = hold === undefined ? 0 : round.findIndex((k) => !hold.blocked(k))
    if (index < 0 && hold !== undefined) {
      await hold.wait()
      continue
    }
    const kind = round.splice(index, 1)[0]!
    let done = true
    try {
      done = await o.run(kind)
    } catch (error) {
      o.record(kind, `FAILED: ${errorText(error)}`)
    }
    if (done) doneKinds.add(kind)
    else round.push(kind)
    await sleep(o.intervalMs * (0.75 + Math.random() * 0.5), o.stop)
  }
}

export interface WaitOptions<K extends string> {
  readonly state: RunState<K>
  readonly timeoutMs: number
  readonly publishDone: () => boolean
  /** The end of the 5-second progress line, after `published=… received-unique=… lines=… `. */
  readonly status: () => string
  /** Messages in the queue and its dead-letter queue (undefined when they could not be asked). */
  readonly queueCounts: () => Promise<{ readonly queue: number; readonly dead: number } | undefined>
  readonly progress: (text: string) => void
}

/**
 * Waits until every published id was received, or nothing new arrived for `timeoutMs`, or (10 s
 * without a new id) the queue is empty and the ids not received are all dead-lettered. Returns
 * the outcome, also printed as `done: …`.
 */
export const waitForEnd = async <K extends string>(o: WaitOptions<K>): Promise<string> => {
  const { state } = o
  let outcome = "all published ids received"
  let lastReport = 0
  let lastQueueCheck = 0
  while (true) {
    await sleep(100)
    const now = Date.now()
    if (now - lastReport >= 5_000) {
      lastReport = now
      o.progress(`published=${state.published.size} received-unique=${state.received.size} lines=${state.lines} ` + o.status())
    }
    if (o.publishDone() && state.received.size >= state.published.size) break
    if (now - state.lastProgressAt > o.timeoutMs) {
      outcome = `no new id for ${o.timeoutMs / 1000} s`
      break
    }
    // Everything not received is in the dead-letter queue and nothing is waiting: no point waiting.
    if (o.publishDone() && now - state.lastProgressAt > 10_000 && now - lastQueueCheck > 2_000) {
      lastQueueCheck = now
      const counts = await o.queueCounts()
      if (counts !== undefined && counts.queue === 0 && state.received.size + counts.dead >= state.published.size) {
        outcome = "the ids not received are all in the dead-letter queue"
        break
      }
    }
  }
  o.progress(`done: ${outcome}`)
  return outcome
}

/** Lets the consumers take the duplicates still queued: until the queue has been empty for 1.5 s, at most 15 s. */
export const waitQueueEmpty = async (messageCount: () => Promise<number | undefined>): Promise<void> => {
  let emptySince: number | undefined
  const drainStarted = Date.now()
  while (Date.now() - drainStarted < 15_000) {
    if ((await messageCount()) === 0) {
      emptySince ??= Date.now()
      if (Date.now() - emptySince >= 1_500) break
    } else emptySince = undefined
    await sleep(250)
  }
}

/**
 * The queue once the proxies hold no consumer on it any more (asked every 100 ms, at most 10 s),
 * with a SUSPICIOUS note for the report's queue line when some are still there.
 */
export const queueAfterClients = async <Q extends { readonly consumerCount: number }>(
  check: () => Promise<Q>
): Promise<{ readonly queue: Q; readonly detail: string }> => {
  const checkStarted = Date.now()
  let q = await check()
  while (q.consumerCount > 0 && Date.now() - checkStarted < 10_000) {
    await sleep(100)
    q = await check()
  }
  const detail = q.consumerCount > 0 ? ` (SUSPICIOUS: still ${q.consumerCount} consumer(s) 10 s after the clients stopped)` : ""
  return { queue: q, detail }
}

// ---- report ------------------------------------------------------------------------------------

/** A queue in the report: its name, its message count at the end, and the ids then taken off it. */
export interface QueueReport {
  readonly name: string
  readonly messageCount: number
  readonly ids: ReadonlyArray<string>
}

export interface ReportParts<K extends string> {
  readonly state: RunState<K>
  readonly clock: Clock
  /** After the counts line: the outcome and what the run ran on. */
  readonly head: ReadonlyArray<string>
  /** Fault kinds asked for that never ran. */
  readonly missingKinds: ReadonlyArray<K>
  readonly queue: QueueReport
  /** Appended to the queue's count (the SUSPICIOUS note of queueAfterClients). */
  readonly queueDetail: string
  readonly dead: QueueReport
  /** After the two queue lines (dead-letter reasons, other queues). */
  readonly afterQueues: ReadonlyArray<string>
  /** What a message's time in `state.published` is: its publish or its confirm. */
  readonly publishedAs: { readonly noun: "publish"; readonly verb: "published" } | { readonly noun: "confirm"; readonly verb: "confirmed" }
  /** Appended to the line of received ids never confirmed as published (" (SUSPICIOUS)" or ""). */
  readonly foreignNote: string
  /** After that line (the publisher's errors). */
  readonly afterForeign: ReadonlyArray<string>
  /** Applied to a proxy log sample's fields (to mask the queue prefix, or not). */
  readonly maskSample: (fields: string) => string
  /** The `logs: …` line. */
  readonly logs: string
}

const describeIds = (ids: ReadonlyArray<string>, received: ReadonlyMap<string, number>): string => {
  if (ids.length === 0) return ""
  const already = ids.filter((id) => received.has(id)).length
  return ` — ${already} of them already received (duplicates), ${ids.length - already} never received; ids: ` +
    truncate(ids.slice(0, 20).join(", "), 600)
}

/**
 * Prints the report on stdout: `published=N received-unique=U lost=L duplicates=D`, the mode's
 * head, the fault log, the queues, the lost ids, the deliveries, what clients and proxies said and
 * `RESULT: PASS|FAIL`. Returns the exit code: 1 when a message was lost, else 0.
 */
export const writeReport = <K extends string>(p: ReportParts<K>): number => {
  const { state, clock } = p
  const lost = [...state.published.keys()].filter((id) => !state.received.has(id))
  const duplicates = state.lines - state.received.size
  const out: Array<string> = []
  out.push(`published=${state.published.size} received-unique=${state.received.size} lost=${lost.length} duplicates=${duplicates}`)
  out.push(...p.head)
  out.push(`faults (${state.faults.length}):`)
  for (const f of state.faults) out.push(`  ${clock.elapsed(f.at)} ${new Date(f.at).toISOString()} ${f.kind}: ${f.detail}`)
  if (p.missingKinds.length > 0) out.push(`  NOT EXERCISED: ${p.missingKinds.join(", ")}`)
  out.push(`queue ${p.queue.name}: ${p.queue.messageCount} message(s) left${p.queueDetail}` + describeIds(p.queue.ids, state.received))
  out.push(`dead-letter queue ${p.dead.name}: ${p.dead.messageCount} message(s)` + describeIds(p.dead.ids, state.received))
  out.push(...p.afterQueues)
  if (lost.length > 0) {
    out.push(`LOST ids (${lost.length}; first 50, with ${p.publishedAs.noun} time):`)
    for (const id of lost.slice(0, 50)) {
      const at = state.published.get(id) ?? clock.t0
      const where = p.dead.ids.includes(id) ? " [in the dead-letter queue]" : p.queue.ids.includes(id) ? " [still in the queue]" : ""
      out.push(`  ${id} ${p.publishedAs.verb} ${clock.elapsed(at)} ${new Date(at).toISOString()}${where}`)
    }
  }
  out.push(
    `deliveries: ${state.lines} acked lines, ${state.redeliveredFlag} flagged redelivered, delivery_count ` +
      state.deliveryCounts.entries().sort((a, b) => Number(a[0]) - Number(b[0])).map(([k, v]) => `${k}:${v}`).join(" ")
  )
  // Checked only now: a delivery can reach a consumer before the publisher has its confirm (and in
  // the cluster, a publish whose confirm was lost with its node may still have reached the queue).
  const foreign = [...state.received.keys()].filter((id) => !state.published.has(id))
  if (foreign.length > 0) {
    out.push(`received ids never confirmed as published${p.foreignNote}: ${foreign.length}: ${truncate(foreign.slice(0, 10).join(", "), 400)}`)
  }
  out.push(...p.afterForeign)
  out.push(`acked lines per client: ${state.perClient.entries().sort((a, b) => a[0].localeCompare(b[0], "en", { numeric: true })).map(([k, v]) => `${k}:${v}`).join(" ")}`)
  out.push(`settle errors seen by clients: ${formatTally(state.settleErrors)}`)
  out.push(`client calls ended: ${formatTally(state.callEnds)}`)
  out.push(`proxy "subscription ended" reasons: ${formatTally(state.subscriptionEnds)}`)
  out.push(`proxy log lines above INFO:${state.proxyNotable.size === 0 ? " none" : ""}`)
  for (const [key, count] of state.proxyNotable.entries()) {
    const sample = state.proxySamples.get(key)
    const fields = sample === undefined ? "" : ` e.g. proxy#${sample.instance} ${sample.timestamp} ${truncate(p.maskSample(JSON.stringify(sample.fields)), 300)}`
    out.push(`  ${count} x ${key}${fields}`)
  }
  if (state.proxyRaw.length > 0) {
    out.push(`proxy non-JSON output (${state.proxyRaw.length}${state.proxyRaw.length >= 200 ? "+" : ""} lines, first 20):`)
    for (const line of state.proxyRaw.slice(0, 20)) out.push(`  ${truncate(line, 300)}`)
  }
  if (state.garbage.length > 0) out.push(`unparsed client stdout: ${state.garbage.slice(0, 5).join(" | ")}`)
  out.push(p.logs)
  out.push(lost.length > 0 ? "RESULT: FAIL (messages lost)" : "RESULT: PASS (no message lost)")
  process.stdout.write(out.join("\n") + "\n")
  return lost.length > 0 ? 1 : 0
}
