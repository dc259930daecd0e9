/**
 * Sums a V8 .cpuprofile (node --cpu-prof): self time by function and by package/file, and
 * inclusive ("total") time by function, optionally restricted to a window of the monotonic clock.
 *
 *   node dist/bench/analyzeProfile.js /tmp/prof/proxy.cpuprofile [--top 30] [--messages N]
 */
import { readFile } from "node:fs/promises"
import { basename } from "node:path"
import { fileURLToPath } from "node:url"

interface CallFrame {
  readonly functionName: string
  readonly url: string
  readonly lineNumber: number
  readonly columnNumber: number
}

interface ProfileNode {
  readonly id: number
  readonly callFrame: CallFrame
  readonly children?: ReadonlyArray<number>
}

interface CpuProfile {
  readonly nodes: ReadonlyArray<ProfileNode>
  readonly startTime: number
  readonly endTime: number
  readonly samples: ReadonlyArray<number>
  readonly timeDeltas: ReadonlyArray<number>
}

export interface Entry {
  readonly key: string
  readonly ms: number
  readonly percent: number
  /** Microseconds per message, when the number of messages is known. */
  readonly usPerMessage: number | null
}

export interface ProfileSummary {
  readonly file: string
  /** Sampled time inside the window (ms) and how much of it was idle. */
  readonly windowMs: number
  readonly busyMs: number
  readonly idleMs: number
  readonly gcMs: number
  readonly messages: number | null
  readonly selfByFunction: ReadonlyArray<Entry>
  readonly selfByPackage: ReadonlyArray<Entry>
  readonly totalByFunction: ReadonlyArray<Entry>
  /** For the hottest self-time functions: the caller chains (innermost first) that account for them. */
  readonly hotStacks: ReadonlyArray<{ readonly function: string; readonly stacks: ReadonlyArray<Entry> }>
}

/** Where a frame comes from: a package under node_modules, a proxy file, node's internals, or V8. */
export const packageOf = (url: string, functionName: string): string => {
  if (url === "") return functionName.startsWith("(") ? functionName : `native ${functionName || "(anonymous)"}`
  if (url.startsWith("node:")) return url.replace(/^node:internal\//, "node:").replace(/\/.*$/, "")
  const nm = url.lastIndexOf("/node_modules/")
  if (nm >= 0) {
    const rest = url.slice(nm + "/node_modules/".length).split("/")
    const name = rest[0]?.startsWith("@") ? `${rest[0]}/${rest[1]}` : rest[0] ?? "?"
    // effect is one package but its modules tell apart Stream/Queue/Schema/... work.
    if (name === "effect") {
      const file = rest.slice(-1)[0]?.replace(/\.js$/, "") ?? "?"
      return `effect/${rest.includes("internal") ? "internal/" : ""}${file}`
    }
    return name
  }
  const match = /\/(src|gen|bench)\/(.*)$/.exec(url)
  if (match) return `${match[1]}/${match[2]}`
  return basename(url)
}

const shortUrl = (url: string): string => {
  if (url === "") return ""
  const nm = url.lastIndexOf("/node_modules/")
  if (nm >= 0) return url.slice(nm + "/node_modules/".length)
  const match = /\/((?:src|gen|bench)\/.*)$/.exec(url)
  return match?.[1] ?? url.replace(/^file:\/\//, "")
}

const functionKey = (frame: CallFrame): string => {
  const name = frame.functionName || "(anonymous)"
  const where = shortUrl(frame.url)
  return where ? `${name} ${where}:${frame.lineNumber + 1}` : name
}

const isProfile = (value: unknown): value is CpuProfile =>
  typeof value === "object" && value !== null &&
  Array.isArray(Reflect.get(value, "nodes")) && Array.isArray(Reflect.get(value, "samples")) &&
  Array.isArray(Reflect.get(value, "timeDeltas"))

export interface AnalyzeOptions {
  /** Monotonic-clock window in microseconds (process.hrtime / V8 TimeTicks); samples outside are skipped. */
  readonly fromUs?: number
  readonly toUs?: number
  readonly top?: number
  readonly messages?: number
  /** How many of the hottest functions get their caller chains listed, and how many frames deep. */
  readonly stackFunctions?: number
  readonly stackDepth?: number
}

export const analyzeProfile = async (file: string, options: AnalyzeOptions = {}): Promise<ProfileSummary> => {
  const parsed: unknown = JSON.parse(await readFile(file, "utf8"))
  if (!isProfile(parsed)) throw new Error(`${file}: not a .cpuprofile`)
  const profile = parsed
  const byId = new Map<number, ProfileNode>()
  const parent = new Map<number, number>()
  for (const node of profile.nodes) {
    byId.set(node.id, node)
    for (const child of node.children ?? []) parent.set(child, node.id)
  }

  const self = new Map<string, number>()
  const selfPackage = new Map<string, number>()
  const total = new Map<string, number>()
  const callers = new Map<string, Map<string, number>>()
  const depth = options.stackDepth ?? 6
  const frameName = (frame: CallFrame) => {
    const where = shortUrl(frame.url).replace(/^.*\//, "")
    return `${frame.functionName || "(anonymous)"}${where ? `@${where}:${frame.lineNumber + 1}` : ""}`
  }
  const add = (map: Map<string, number>, key: string, us: number) => map.set(key, (map.get(key) ?? 0) + us)

  // Sample i was taken at startTime + Σ timeDeltas[0..i]; it stands for the time until the next one.
  const times: Array<number> = []
  let t = profile.startTime
  for (const delta of profile.timeDeltas) {
    t += delta
    times.push(t)
  }
  let windowUs = 0
  let idleUs = 0
  let gcUs = 0
  const from = options.fromUs ?? Number.NEGATIVE_INFINITY
  const to = options.toUs ?? Number.POSITIVE_INFINITY
  for (let i = 0; i < profile.samples.length; i++) {
    const at = times[i]!
    if (at < from || at > to) continue
    const next = times[i + 1] ?? profile.endTime
    const us = Math.max(0, next - at)
    const node = byId.get(profile.samples[i]!)
    if (node === undefined) continue
    windowUs += us
    const name = node.callFrame.functionName
    if (name === "(idle)") {
      idleUs += us
      continue
    }
    if (name === "(garbage collector)") gcUs += us
    add(self, functionKey(node.callFrame), us)
    add(selfPackage, packageOf(node.callFrame.url, name), us)
    // Inclusive time: every distinct function on the stack gets the sample once.
    const onStack = new Set<string>()
    for (let id: number | undefined = node.id; id !== undefined; id = parent.get(id)) {
      const frame = byId.get(id)?.callFrame
      if (frame === undefined || frame.functionName === "(root)") continue
      onStack.add(functionKey(frame))
    }
    for (const key of onStack) add(total, key, us)
    // The caller chain of this sample's function, a few frames up.
    const chain: Array<string> = []
    for (let id = parent.get(node.id); id !== undefined && chain.length < depth; id = parent.get(id)) {
      const frame = byId.get(id)?.callFrame
      if (frame === undefined || frame.functionName === "(root)") break
      chain.push(frameName(frame))
    }
    const selfKey = functionKey(node.callFrame)
    let perFunction = callers.get(selfKey)
    if (perFunction === undefined) callers.set(selfKey, perFunction = new Map())
    add(perFunction, chain.join(" ← ") || "(top level)", us)
  }

  const busyUs = windowUs - idleUs
  const top = options.top ?? 30
  const messages = options.messages ?? null
  const entries = (map: Map<string, number>): Array<Entry> =>
    [...map.entries()]
      .sort((a, b) => b[1] - a[1])
      .slice(0, top)
      .map(([key, us]) => ({
        key,
        ms: us / 1000,
        percent: busyUs > 0 ? (us / busyUs) * 100 : 0,
        usPerMessage: messages ? us / messages : null
      }))
  const hotStacks = entries(self)
    .filter((e) => !e.key.startsWith("("))
    .slice(0, options.stackFunctions ?? 10)
    .map((e) => ({ function: e.key, stacks: entries(callers.get(e.key) ?? new Map()).slice(0, 4) }))
  return {
    file,
    hotStacks,
    windowMs: windowUs / 1000,
    busyMs: busyUs / 1000,
    idleMs: idleUs / 1000,
    gcMs: gcUs / 1000,
    messages,
    selfByFunction: entries(self),
    selfByPackage: entries(selfPackage),
    totalByFunction: entries(total)
  }
}

export const formatSummary = (summary: ProfileSummary): string => {
  const lines: Array<string> = []
  lines.push(`profile ${summary.file}`)
  lines.push(
    `window ${summary.windowMs.toFixed(0)} ms: busy ${summary.busyMs.toFixed(0)} ms, idle ${summary.idleMs.toFixed(0)} ms, ` +
      `GC ${summary.gcMs.toFixed(0)} ms` + (summary.messages ? `, ${summary.messages} messages` : "")
  )
  const section = (title: string, entries: ReadonlyArray<Entry>) => {
    lines.push("", `${title} (% of busy time${summary.messages ? ", µs per message" : ""})`)
    for (const e of entries) {
      const perMessage = e.usPerMessage === null ? "" : `${e.usPerMessage.toFixed(2).padStart(8)} µs/msg  `
      lines.push(`${e.ms.toFixed(1).padStart(9)} ms ${e.percent.toFixed(1).padStart(5)}%  ${perMessage}${e.key}`)
    }
  }
  section("self time by package/file", summary.selfByPackage)
  section("self time by function", summary.selfByFunction)
  section("total (inclusive) time by function", summary.totalByFunction)
  lines.push("", "callers of the hottest functions (innermost caller first)")
  for (const hot of summary.hotStacks) {
    lines.push(`  ${hot.function}`)
    for (const e of hot.stacks) lines.push(`    ${e.ms.toFixed(1).padStart(8)} ms ${e.percent.toFixed(1).padStart(5)}%  ← ${e.key}`)
  }
  return lines.join("\n")
}

// CLI
if (process.argv[1] !== undefined && fileURLToPath(import.meta.url) === process.argv[1]) {
  const args = process.argv.slice(2)
  const file = args.find((a) => !a.startsWith("--"))
  const flag = (name: string) => {
    const i = args.indexOf(name)
    const value = i >= 0 ? Number(args[i + 1]) : Number.NaN
    return Number.isFinite(value) ? value : undefined
  }
  if (file === undefined) {
    process.stderr.write("usage: analyzeProfile <file.cpuprofile> [--top N] [--messages N] [--from µs] [--to µs]\n")
    process.exit(2)
  }
  const fromUs = flag("--from")
  const toUs = flag("--to")
  const top = flag("--top")
  const messages = flag("--messages")
  const summary = await analyzeProfile(file, {
    ...(fromUs !== undefined ? { fromUs } : {}),
    ...(toUs !== undefined ? { toUs } : {}),
    ...(top !== undefined ? { top } : {}),
    ...(messages !== undefined ? { messages } : {})
  })
  process.stdout.write(formatSummary(summary) + "\n")
}
