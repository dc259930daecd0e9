/**
 * Process plumbing for the chaos runs (chaos.ts, chaos-cluster.ts): the proxy as a restartable
 * child process on a fixed port, consumer child processes (chaos-client.ts) and small helpers. Every
 * child still alive when the run's process exits is SIGKILLed. What the runs share beyond the
 * processes (bookkeeping, supervision, faults, report) is in chaos-run.ts.
 */
import { type ChildProcess, spawn } from "node:child_process"
import { createWriteStream, type WriteStream } from "node:fs"
import * as net from "node:net"
import { createInterface } from "node:readline"
import { setTimeout as sleepTimer } from "node:timers/promises"

const live = new Set<ChildProcess>()
process.on("exit", () => {
  for (const child of live) {
    try {
      child.kill("SIGKILL")
    } catch {
      // already gone
    }
  }
})

/** Resolves after `ms`, or early (without failing) when `signal` aborts. */
export const sleep = (ms: number, signal?: AbortSignal): Promise<void> =>
  sleepTimer(ms, undefined, signal === undefined ? {} : { signal }).catch(() => undefined)

/** The promise's value, or undefined if it takes longer than `ms` (the timer does not linger). */
export const within = async <A>(promise: Promise<A>, ms: number): Promise<A | undefined> => {
  let timer: NodeJS.Timeout | undefined
  try {
    return await Promise.race([promise, new Promise<undefined>((resolve) => { timer = setTimeout(() => resolve(undefined), ms) })])
  } finally {
    clearTimeout(timer)
  }
}

export const errorText = (error: unknown): string => error instanceof Error ? error.message : String(error)

/** A port that was free a moment ago (listen on 0, then close). */
export const freePort = (): Promise<number> =>
  new Promise((resolve, reject) => {
    const server = net.createServer()
    server.once("error", reject)
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address() as net.AddressInfo
      server.close(() => resolve(port))
    })
  })

export interface Exited {
  readonly code: number | null
  readonly signal: NodeJS.Signals | null
  readonly at: number
}

/** Spawns `node <script> ...args` with the Node that runs us; tracks it for the exit hook. */
const spawnNode = (script: string, args: ReadonlyArray<string>, env: Record<string, string>, stdin: "pipe" | "ignore") => {
  const child = spawn(process.execPath, [script, ...args], {
    env: { ...process.env, ...env },
    stdio: [stdin, "pipe", "pipe"]
  })
  live.add(child)
  const exited = new Promise<Exited>((resolve) => {
    child.once("exit", (code, signal) => {
      live.delete(child)
      resolve({ code, signal, at: Date.now() })
    })
  })
  return { child, exited }
}

const eachLine = (stream: NodeJS.ReadableStream | null, onLine: (line: string) => void): void => {
  if (stream === null) return
  createInterface({ input: stream, crlfDelay: Infinity }).on("line", onLine)
}

// ---- the proxy ---------------------------------------------------------------------------------

/** One JSON log line of the proxy, as Logger.consoleJson writes it. */
export interface ProxyLogLine {
  readonly instance: number
  readonly level: string
  readonly text: string
  readonly fields: Record<string, unknown>
  readonly annotations: Record<string, unknown>
  readonly timestamp: string
}

const parseLogLine = (instance: number, line: string): ProxyLogLine | undefined => {
  let raw: unknown
  try {
    raw = JSON.parse(line)
  } catch {
    return undefined
  }
  if (typeof raw !== "object" || raw === null) return undefined
  const record = raw as Record<string, unknown>
  const message = record["message"]
  let text: string
  let fields: Record<string, unknown> = {}
  if (typeof message === "string") text = message
  else if (Array.isArray(message) && typeof message[0] === "string") {
    text = message[0]
    const extra: unknown = message[1]
    if (typeof extra === "object" && extra !== null) fields = extra as Record<string, unknown>
  } else text = JSON.stringify(message)
  const annotations = record["annotations"]
  return {
    instance,
    level: String(record["level"] ?? "?"),
    text,
    fields,
    annotations: typeof annotations === "object" && annotations !== null ? annotations as Record<string, unknown> : {},
    timestamp: String(record["timestamp"] ?? "")
  }
}

export interface ProxyInstance {
  readonly number: number
  readonly pid: number
  readonly startedAt: number
  readonly exited: Promise<Exited>
  /** Resolves once it logged "connected to broker"; rejects if it exits first or takes over 30 s. */
  readonly ready: Promise<number>
  /** Set before we kill it, so the supervisor knows the exit was ours. */
  expectedExit: boolean
  readonly kill: (signal: NodeJS.Signals) => void
}

export interface ProxyLogSink {
  readonly onLog: (line: ProxyLogLine) => void
  /** Lines that are not JSON (stderr, a crash's stack trace). */
  readonly onRaw: (instance: number, stream: "stdout" | "stderr", line: string) => void
}

export const startProxyProcess = (
  number: number,
  mainScript: string,
  env: Record<string, string>,
  logPath: string,
  sink: ProxyLogSink
): ProxyInstance => {
  const { child, exited } = spawnNode(mainScript, [], env, "ignore")
  const file: WriteStream = createWriteStream(logPath, { flags: "a" })
  const startedAt = Date.now()
  let markReady: (at: number) => void = () => undefined
  const ready = new Promise<number>((resolve, reject) => {
    markReady = resolve
    void exited.then((e) => reject(new Error(`proxy #${number} exited before it was ready: code=${e.code} signal=${e.signal}`)))
    setTimeout(() => reject(new Error(`proxy #${number} not connected to the broker after 30 s`)), 30_000).unref()
  })
  ready.catch(() => undefined)
  eachLine(child.stdout, (line) => {
    file.write(line + "\n")
    const parsed = parseLogLine(number, line)
    if (parsed === undefined) return sink.onRaw(number, "stdout", line)
    if (parsed.text === "connected to broker") markReady(Date.now())
    sink.onLog(parsed)
  })
  eachLine(child.stderr, (line) => {
    file.write(`[stderr] ${line}\n`)
    sink.onRaw(number, "stderr", line)
  })
  void exited.then((e) => {
    file.write(`[chaos] exited code=${e.code} signal=${e.signal}\n`)
    file.end()
  })
  const instance: ProxyInstance = {
    number,
    pid: child.pid ?? -1,
    startedAt,
    exited,
    ready,
    expectedExit: false,
    kill: (signal) => {
      instance.expectedExit = true
      child.kill(signal)
    }
  }
  return instance
}

// ---- consumers ---------------------------------------------------------------------------------

/** A line a consumer printed for a delivery it processed and acked. */
export interface AckedLine {
  readonly id: string
  readonly deliveryId: string
  readonly redelivered: boolean
  readonly deliveryCount: number
  readonly call: number
}

/** Any other line of a consumer (call ended, settle error, cancelling). */
export interface ClientEvent {
  readonly event: string
  readonly client: string
  readonly [key: string]: unknown
}

export interface ClientProcess {
  readonly name: string
  readonly pid: number
  readonly exited: Promise<Exited>
  alive: boolean
  expectedExit: boolean
  readonly send: (command: "cancel" | "stop") => void
  readonly kill: (signal: NodeJS.Signals) => void
}

export interface ClientSink {
  readonly onAcked: (client: string, line: AckedLine) => void
  readonly onEvent: (event: ClientEvent) => void
  readonly onGarbage: (client: string, line: string) => void
}

const isAckedLine = (value: unknown): value is AckedLine =>
  typeof value === "object" && value !== null && typeof (value as Record<string, unknown>)["id"] === "string" &&
  !("event" in value)

const isClientEvent = (value: unknown): value is ClientEvent =>
  typeof value === "object" && value !== null && typeof (value as Record<string, unknown>)["event"] === "string"

export const startClientProcess = (
  script: string,
  name: string,
  args: ReadonlyArray<string>,
  logPath: string,
  sink: ClientSink
): ClientProcess => {
  const { child, exited } = spawnNode(script, [args[0] ?? "0", name, ...args.slice(1)], {}, "pipe")
  const file = createWriteStream(logPath, { flags: "a" })
  child.stdin?.on("error", () => undefined) // EPIPE once it is gone
  eachLine(child.stdout, (line) => {
    let parsed: unknown
    try {
      parsed = JSON.parse(line)
    } catch {
      return sink.onGarbage(name, line)
    }
    if (isAckedLine(parsed)) sink.onAcked(name, parsed)
    else if (isClientEvent(parsed)) sink.onEvent(parsed)
    else sink.onGarbage(name, line)
  })
  eachLine(child.stderr, (line) => file.write(line + "\n"))
  const proc: ClientProcess = {
    name,
    pid: child.pid ?? -1,
    exited,
    alive: true,
    expectedExit: false,
    send: (command) => {
      if (proc.alive) child.stdin?.write(command + "\n")
    },
    kill: (signal) => {
      proc.expectedExit = true
      child.kill(signal)
    }
  }
  void exited.then((e) => {
    proc.alive = false
    file.write(`[chaos] exited code=${e.code} signal=${e.signal}\n`)
    file.end()
  })
  return proc
}

// ---- settings and report helpers ---------------------------------------------------------------

/** A numeric knob from the environment (`fallback` when unset); exits 2 on a bad value. */
export const envNumber = (name: string, fallback: number, min: number): number => {
  const raw = process.env[name]
  if (raw === undefined || raw.trim() === "") return fallback
  const value = Number(raw)
  if (!Number.isFinite(value) || value < min) {
    process.stderr.write(`chaos: ${name}=${JSON.stringify(raw)} is not a number >= ${min}\n`)
    process.exit(2)
  }
  return value
}

/** Counts by key, listed most frequent first. */
export class Tally {
  private readonly counts = new Map<string, number>()
  add(key: string, by = 1): void {
    this.counts.set(key, (this.counts.get(key) ?? 0) + by)
  }
  entries(): Array<[string, number]> {
    return [...this.counts].sort((a, b) => b[1] - a[1])
  }
  get size(): number {
    return this.counts.size
  }
}

export const truncate = (text: string, max: number): string => text.length <= max ? text : `${text.slice(0, max)}…`

export const formatTally = (tally: Tally): string =>
  tally.size === 0 ? "none" : tally.entries().map(([k, v]) => `${v} x ${truncate(k, 160)}`).join("; ")
