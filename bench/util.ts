/** Small helpers for the benchmark driver: env knobs, statistics, waiting, table printing. */
import type { CpuWindow } from "./cpuWindow.js"
import { setTimeout as delay } from "node:timers/promises"

export const sleep = (ms: number): Promise<void> => delay(ms)

export const now = (): number => performance.now()

/** An integer ≥ `minimum` (default 1) from the environment, or the default. */
export const envInt = (name: string, fallback: number, minimum = 1): number => {
  const raw = process.env[name]
  if (raw === undefined || raw.trim() === "") return fallback
  const value = Number(raw)
  if (!Number.isInteger(value) || value < minimum) {
    throw new Error(`${name}=${JSON.stringify(raw)}: expected a whole number ≥ ${minimum}`)
  }
  return value
}

export const envFlag = (name: string): boolean => {
  const raw = (process.env[name] ?? "").trim().toLowerCase()
  return raw === "1" || raw === "true" || raw === "yes"
}

export const errorText = (error: unknown): string => (error instanceof Error ? error.message : String(error))

/** Value at quantile q (0..1) of an ascending array, nearest-rank. */
export const quantile = (sorted: ReadonlyArray<number>, q: number): number => {
  if (sorted.length === 0) return Number.NaN
  const rank = Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))
  return sorted[rank]!
}

export const median = (values: ReadonlyArray<number>): number => {
  if (values.length === 0) return Number.NaN
  const sorted = [...values].sort((a, b) => a - b)
  const mid = Math.floor(sorted.length / 2)
  return sorted.length % 2 === 1 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2
}

export interface Distribution {
  readonly count: number
  readonly p50: number
  readonly p90: number
  readonly p99: number
  readonly p999: number
  readonly max: number
  readonly min: number
  readonly mean: number
}

export const distribution = (values: ReadonlyArray<number>): Distribution => {
  const sorted = [...values].sort((a, b) => a - b)
  const sum = sorted.reduce((acc, v) => acc + v, 0)
  return {
    count: sorted.length,
    p50: quantile(sorted, 0.5),
    p90: quantile(sorted, 0.9),
    p99: quantile(sorted, 0.99),
    p999: quantile(sorted, 0.999),
    max: sorted.length ? sorted[sorted.length - 1]! : Number.NaN,
    min: sorted.length ? sorted[0]! : Number.NaN,
    mean: sorted.length ? sum / sorted.length : Number.NaN
  }
}

/** Polls `probe` until it returns a value that is not undefined; throws after `timeoutMs`. */
export const waitFor = async <A>(
  what: string,
  probe: () => Promise<A | undefined>,
  timeoutMs: number,
  intervalMs = 5
): Promise<A> => {
  const deadline = now() + timeoutMs
  for (;;) {
    const value = await probe()
    if (value !== undefined) return value
    if (now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`)
    if (intervalMs > 0) await sleep(intervalMs)
  }
}

export const fmt = (value: number | null | undefined, digits = 1): string =>
  value === null || value === undefined || Number.isNaN(value) ? "n/a" : value.toFixed(digits)

export const fmtInt = (value: number | null | undefined): string =>
  value === null || value === undefined || Number.isNaN(value) ? "n/a" : Math.round(value).toLocaleString("en-US")

/** Bytes as decimal megabytes (the unit of the 300 MB target). */
export const mb = (bytes: number | null | undefined): string =>
  bytes === null || bytes === undefined || Number.isNaN(bytes) ? "n/a" : `${(bytes / 1e6).toFixed(1)} MB`

/** Renders rows as an aligned text table; the first row is the header. */
export const table = (rows: ReadonlyArray<ReadonlyArray<string>>): string => {
  const widths: Array<number> = []
  for (const row of rows) row.forEach((cell, i) => { widths[i] = Math.max(widths[i] ?? 0, cell.length) })
  const line = (row: ReadonlyArray<string>) => row.map((cell, i) => cell.padEnd(widths[i] ?? 0)).join("  ").trimEnd()
  const [header, ...body] = rows
  if (header === undefined) return ""
  return [line(header), widths.map((w) => "-".repeat(w)).join("  "), ...body.map(line)].join("\n")
}

export const log = (message: string): void => {
  process.stderr.write(`[bench ${new Date().toISOString().slice(11, 23)}] ${message}\n`)
}

/** What a phase (or one proxy child's part of it) came to: a result or an error, and how the proxy child fared. */
export interface PhaseOutcome<A> {
  readonly result?: A
  readonly error?: string
  /** The machine and each process over the whole phase (cpuWindow.ts), proxy child start and stop excluded. */
  readonly window?: CpuWindow
  readonly proxy?: {
    readonly exitCode: number | null
    readonly logLines: number
    readonly warnings: number
    readonly problems: ReadonlyArray<string>
    readonly tail?: ReadonlyArray<string>
  }
}
