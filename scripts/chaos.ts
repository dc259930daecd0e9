/**
 * Chaos run: proves "no message lost" for acknowledged subscriptions under faults.
 *
 *   npm run chaos
 *
 * Starts a TCP relay in front of the broker and the proxy as a child process behind it (on a fixed
 * port, so that consumers find it again after each restart), publishes CHAOS_N schema messages with
 * unique ids straight to the broker over the run, and consumes them with CHAOS_CLIENTS consumer
 * processes (chaos-client.ts) on SubscribeSchemaMessages. Meanwhile it cancels a consumer's call,
 * SIGKILLs a consumer, SIGKILLs the proxy, SIGTERMs the proxy and severs the broker connection,
 * each at least once. A message counts as received once a consumer has acked it and reported it.
 *
 * It ends when every published id was received, or when nothing new arrived for
 * CHAOS_TIMEOUT_SECONDS, then prints `published=N received-unique=U lost=L duplicates=D`, the
 * fault log, the queue and dead-letter queue contents and what the proxy logged beyond INFO.
 * Exit code 1 when a message was lost, else 0 (duplicates are allowed: at-least-once).
 *
 * Knobs (env): CHAOS_N (10000), CHAOS_TIMEOUT_SECONDS (120), CHAOS_CLIENTS (4),
 * CHAOS_PUBLISH_SECONDS (40), CHAOS_FAULT_INTERVAL_SECONDS (4), CHAOS_MAX_IN_FLIGHT (32),
 * CHAOS_HOLD_MS ("20-300": how long a consumer "processes" a message before acking it),
 * CHAOS_FAULTS (comma-separated subset of cancel-call, kill-client, kill-proxy, term-proxy,
 * sever-broker; all by default).
 *
 *   npm run chaos -- --cluster
 *
 * runs the cluster variant instead (chaos-cluster.ts): quorum queues on the local 3-node cluster
 * (scripts/cluster.sh), two proxies, node kills and restarts; its own knobs are listed there.
 */
import { Effect } from "effect"
import { mkdirSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { fileURLToPath } from "node:url"
import { schemaBody } from "../test/fixtures/bodies.js"
import { type Admin, makeAdmin, makeNames, proxyEnv, queueState, type TestNames } from "../test/support/harness.js"
import { type Relay, startRelay } from "../test/support/relay.js"
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

// `--cluster` runs the cluster variant (chaos-cluster.ts) instead; see the entry point below.
const args = process.argv.slice(2)
const clusterMode = args.includes("--cluster")
const unknownArgs = args.filter((a) => a !== "--cluster")
if (unknownArgs.length > 0) {
  process.stderr.write(`chaos: unknown argument(s) ${unknownArgs.join(" ")}; usage: npm run chaos [-- --cluster]\n`)
  process.exit(2)
}

// ---- settings ----------------------------------------------------------------------------------

const settings = (() => {
  const hold = (process.env["CHAOS_HOLD_MS"] ?? "20-300").split("-").map(Number)
  return {
    n: Math.floor(envNumber("CHAOS_N", 10_000, 1)),
    timeoutMs: envNumber("CHAOS_TIMEOUT_SECONDS", 120, 1) * 1000,
    clients: Math.floor(envNumber("CHAOS_CLIENTS", 4, 1)),
    publishMs: envNumber("CHAOS_PUBLISH_SECONDS", 40, 0) * 1000,
    faultIntervalMs: envNumber("CHAOS_FAULT_INTERVAL_SECONDS", 4, 0.5) * 1000,
    maxInFlight: Math.floor(envNumber("CHAOS_MAX_IN_FLIGHT", 32, 1)),
    holdMin: Number.isFinite(hold[0]) ? hold[0]! : 20,
    holdMax: Number.isFinite(hold[1]) ? hold[1]! : Number.isFinite(hold[0]) ? hold[0]! : 300
  }
})()

const proxyMain = fileURLToPath(new URL("../src/main.js", import.meta.url))
const clientScript = fileURLToPath(new URL("./chaos-client.js", import.meta.url))
const t0 = Date.now()
const elapsed = (at = Date.now()): string => `+${((at - t0) / 1000).toFixed(1)}s`
const progress = (text: string): void => void process.stderr.write(`[chaos ${elapsed()}] ${text}\n`)

// ---- bookkeeping -------------------------------------------------------------------------------

type FaultKind = "cancel-call" | "kill-client" | "kill-proxy" | "term-proxy" | "sever-broker"
const allFaultKinds: ReadonlyArray<FaultKind> = ["cancel-call", "kill-client", "kill-proxy", "term-proxy", "sever-broker"]
const faultKinds: ReadonlyArray<FaultKind> = (() => {
  const raw = clusterMode ? undefined : process.env["CHAOS_FAULTS"] // the cluster run has fault kinds of its own
  if (raw === undefined || raw.trim() === "") return allFaultKinds
  const picked = raw.split(",").map((k) => k.trim()).filter((k) => k !== "")
  const unknown = picked.filter((k) => !allFaultKinds.some((f) => f === k))
  if (unknown.length > 0 || picked.length === 0) {
    process.stderr.write(`chaos: CHAOS_FAULTS: unknown fault(s) ${unknown.join(", ")}; known: ${allFaultKinds.join(", ")}\n`)
    process.exit(2)
  }
  return allFaultKinds.filter((k) => picked.includes(k))
})()

interface FaultRecord {
  readonly at: number
  readonly kind: FaultKind | "unexpected"
  detail: string
}

interface State {
  readonly published: Map<string, number> // id -> publish time
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
  readonly publishErrors: Array<string>
  readonly returned: Array<string>
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
  publishErrors: [],
  returned: []
})

const quietLevels = new Set(["INFO", "DEBUG", "TRACE"])

// ---- the run -----------------------------------------------------------------------------------

interface Env {
  readonly names: TestNames
  readonly admin: Admin
  readonly relay: Relay
}

const run = async ({ names, admin, relay }: Env, state: State, cleanup: Array<() => Promise<void>>): Promise<number> => {
  const logDir = join(tmpdir(), `messaging-proxy-chaos-${names.prefix}`)
  mkdirSync(logDir, { recursive: true })
  const grpcPort = await freePort()
  progress(`names ${names.prefix}, relay port ${relay.port}, proxy port ${grpcPort}, logs in ${logDir}`)
  progress(`settings ${JSON.stringify(settings)}`)

  // -- the proxy, supervised: an exit we did not cause is logged and the proxy restarted.
  const env = proxyEnv(names, {
    MESSAGING_CONNECTION_PORT: String(grpcPort),
    RABBITMQ_PORT: String(relay.port),
    MESSAGING_SHUTDOWN_TIMEOUT_SECONDS: "2",
    RABBITMQ_RECONNECT_MAX_DELAY_SECONDS: "2"
  })
  let proxyCount = 0
  let proxy: ProxyInstance | undefined
  let shuttingDown = false
  /** Restarts after exits we did not cause (proxy and clients), capped so a crash loop ends. */
  let unexpectedRestarts = 0
  const sink = {
    onLog: (line: ProxyLogLine) => {
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
  const startProxy = async (): Promise<ProxyInstance> => {
    const instance = startProxyProcess(++proxyCount, proxyMain, env, join(logDir, `proxy-${proxyCount}.log`), sink)
    proxy = instance
    void instance.exited.then((exit) => {
      if (instance.expectedExit || shuttingDown) return
      state.faults.push({
        at: exit.at,
        kind: "unexpected",
        detail: `proxy #${instance.number} pid=${instance.pid} exited on its own: code=${exit.code} signal=${exit.signal}`
      })
      if (proxy !== instance) return
      if (++unexpectedRestarts > 10) return progress(`UNEXPECTED: proxy #${instance.number} exited; too many restarts, giving up`)
      progress(`UNEXPECTED: proxy #${instance.number} exited (code=${exit.code} signal=${exit.signal}); restarting`)
      void sleep(500).then(startProxy).catch((e) => progress(errorText(e)))
    })
    await instance.ready
    return instance
  }
  cleanup.push(async () => {
    shuttingDown = true
    const p = proxy
    if (p === undefined) return
    p.kill("SIGTERM")
    const done = await within(p.exited, 8_000)
    if (done === undefined) p.kill("SIGKILL")
  })
  await startProxy()
  progress(`proxy #1 connected to the broker`)

  // -- consumers, supervised the same way.
  const clients = new Map<string, ClientProcess>()
  /** Cancel faults waiting for the client's report of what it held. */
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
          // Drop what varies from call to call (timestamps) so that equal reasons add up.
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
  const startClient = (): ClientProcess => {
    const name = `chaos-${++clientCount}`
    const client = startClientProcess(
      clientScript,
      name,
      [String(grpcPort), String(settings.maxInFlight), String(settings.holdMin), String(settings.holdMax)],
      join(logDir, `client-${name}.log`),
      clientSink
    )
    clients.set(name, client)
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
        if (!shuttingDown) startClient()
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
  for (let i = 0; i < settings.clients; i++) startClient()

  // -- publisher: batches every 250 ms over CHAOS_PUBLISH_SECONDS, confirmed, mandatory.
  admin.channel.on("return", (message: { properties: { messageId?: unknown } }) => {
    state.returned.push(String(message.properties.messageId))
  })
  const batches = Math.max(1, Math.round(settings.publishMs / 250))
  const batchSize = Math.ceil(settings.n / batches)
  let publishDone = false
  const publisher = (async () => {
    const started = Date.now()
    let next = 0
    try {
      for (let b = 0; next < settings.n; b++) {
        const due = started + b * 250
        if (due > Date.now()) await sleep(due - Date.now())
        const confirms: Array<Promise<void>> = []
        const now = Date.now()
        for (let i = 0; i < batchSize && next < settings.n; i++, next++) {
          const id = `${names.prefix}-${String(next).padStart(6, "0")}`
          const content = Buffer.from(JSON.stringify(schemaBody(id)))
          confirms.push(
            new Promise<void>((resolve) => {
              admin.channel.publish(
                names.exchange,
                "schemas.*",
                content,
                { persistent: true, messageId: id, mandatory: true },
                (error: unknown) => {
                  if (error == null) state.published.set(id, now)
                  else state.publishErrors.push(`${id}: ${String(error)}`)
                  resolve()
                }
              )
            })
          )
        }
        await Promise.all(confirms)
      }
    } catch (error) {
      state.publishErrors.push(`publisher stopped after ${next} messages: ${errorText(error)}`)
    }
    publishDone = true
    progress(`published ${state.published.size} (${state.publishErrors.length} publish errors)`)
  })()

  // -- faults
  const stopFaults = new AbortController()
  const doneKinds = new Set<FaultKind>()
  const record = (kind: FaultKind, detail: string): FaultRecord => {
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
    const old = proxy
    if (old === undefined) return
    const entry = record(signal === "SIGKILL" ? "kill-proxy" : "term-proxy", `proxy #${old.number} pid=${old.pid} ${signal}`)
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
    const next = await startProxy()
    entry.detail += `; proxy #${next.number} connected ${Date.now() - killedAt} ms after the kill`
  }
  const runFault = async (kind: FaultKind): Promise<void> => {
    switch (kind) {
      case "cancel-call": {
        const c = pickClient()
        if (c === undefined) return void record(kind, "no live client")
        pendingCancels.set(c.name, record(kind, `${c.name} told to cancel its call and open a new one`))
        c.send("cancel")
        return
      }
      case "kill-client": {
        const c = pickClient()
        if (c === undefined) return void record(kind, "no live client")
        const entry = record(kind, `${c.name} pid=${c.pid} SIGKILL`)
        c.kill("SIGKILL")
        const exit = await c.exited
        const replacement = startClient()
        entry.detail += `; exited signal=${exit.signal}; replacement ${replacement.name} started`
        return
      }
      case "kill-proxy":
        return restartProxy("SIGKILL")
      case "term-proxy":
        return restartProxy("SIGTERM")
      case "sever-broker": {
        const open = relay.connections()
        await Effect.runPromise(relay.sever)
        record(kind, `reset ${open} relayed broker connection(s)`)
        return
      }
    }
  }
  const faultLoop = (async () => {
    await sleep(Math.min(3_000, settings.faultIntervalMs), stopFaults.signal)
    let round: Array<FaultKind> = []
    while (!stopFaults.signal.aborted) {
      if (publishDone && doneKinds.size === faultKinds.length) break
      if (round.length === 0) round = [...faultKinds].sort(() => Math.random() - 0.5)
      const kind = round.shift()!
      try {
        await runFault(kind)
      } catch (error) {
        record(kind, `FAILED: ${errorText(error)}`)
      }
      doneKinds.add(kind)
      await sleep(settings.faultIntervalMs * (0.75 + Math.random() * 0.5), stopFaults.signal)
    }
  })()

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
          `clients=${clients.size} proxy=#${proxy?.number ?? "-"} faults=${state.faults.length}`
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
      const [queue, dead] = await Promise.all([
        Effect.runPromise(queueState(admin, names.schemas)),
        Effect.runPromise(queueState(admin, names.schemasDead))
      ])
      if (queue.messageCount === 0 && state.received.size + dead.messageCount >= state.published.size) {
        outcome = "the ids not received are all in the dead-letter queue"
        break
      }
    }
  }
  progress(`done: ${outcome}`)
  stopFaults.abort()
  await faultLoop
  await publisher

  // -- drain: let the consumers take the duplicates still queued, then stop them gracefully.
  let emptySince: number | undefined
  const drainStarted = Date.now()
  while (Date.now() - drainStarted < 15_000) {
    const q = await Effect.runPromise(queueState(admin, names.schemas))
    if (q.messageCount === 0) {
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

  // -- what is left in the broker, once the proxy holds no consumer any more.
  let queueDetail = ""
  const checkStarted = Date.now()
  let q = await Effect.runPromise(queueState(admin, names.schemas))
  while (q.consumerCount > 0 && Date.now() - checkStarted < 10_000) {
    await sleep(100)
    q = await Effect.runPromise(queueState(admin, names.schemas))
  }
  if (q.consumerCount > 0) queueDetail += ` (SUSPICIOUS: still ${q.consumerCount} consumer(s) 10 s after the clients stopped)`
  const dead = await Effect.runPromise(queueState(admin, names.schemasDead))
  const leftIds = await drainIds(admin, names.schemas)
  const deadIds = await drainIds(admin, names.schemasDead)

  // -- report
  const lost = [...state.published.keys()].filter((id) => !state.received.has(id))
  const duplicates = state.lines - state.received.size
  const out: Array<string> = []
  out.push(`published=${state.published.size} received-unique=${state.received.size} lost=${lost.length} duplicates=${duplicates}`)
  out.push(`outcome: ${outcome}; ${((Date.now() - t0) / 1000).toFixed(1)} s; ${proxyCount} proxy instance(s), ${clientCount} client process(es)`)
  out.push(`faults (${state.faults.length}):`)
  for (const f of state.faults) out.push(`  ${elapsed(f.at)} ${new Date(f.at).toISOString()} ${f.kind}: ${f.detail}`)
  const missingKinds = faultKinds.filter((k) => !state.faults.some((f) => f.kind === k))
  if (missingKinds.length > 0) out.push(`  NOT EXERCISED: ${missingKinds.join(", ")}`)
  out.push(
    `queue ${names.schemas}: ${q.messageCount} message(s) left${queueDetail}` +
      describeIds(leftIds, state)
  )
  out.push(`dead-letter queue ${names.schemasDead}: ${dead.messageCount} message(s)` + describeIds(deadIds, state))
  if (lost.length > 0) {
    out.push(`LOST ids (${lost.length}; first 50, with publish time):`)
    for (const id of lost.slice(0, 50)) {
      const at = state.published.get(id) ?? t0
      const where = deadIds.includes(id) ? " [in the dead-letter queue]" : leftIds.includes(id) ? " [still in the queue]" : ""
      out.push(`  ${id} published ${elapsed(at)} ${new Date(at).toISOString()}${where}`)
    }
  }
  out.push(
    `deliveries: ${state.lines} acked lines, ${state.redeliveredFlag} flagged redelivered, delivery_count ` +
      state.deliveryCounts.entries().sort((a, b) => Number(a[0]) - Number(b[0])).map(([k, v]) => `${k}:${v}`).join(" ")
  )
  // Checked only now: a delivery can reach a consumer before the publisher has its confirm.
  const foreign = [...state.received.keys()].filter((id) => !state.published.has(id))
  if (foreign.length > 0) {
    out.push(`received ids never confirmed as published (SUSPICIOUS): ${foreign.length}: ${truncate(foreign.slice(0, 10).join(", "), 400)}`)
  }
  if (state.publishErrors.length > 0) out.push(`publish errors: ${state.publishErrors.slice(0, 10).join("; ")}`)
  if (state.returned.length > 0) out.push(`returned as unroutable (SUSPICIOUS): ${state.returned.length}`)
  out.push(`acked lines per client: ${state.perClient.entries().sort((a, b) => a[0].localeCompare(b[0], "en", { numeric: true })).map(([k, v]) => `${k}:${v}`).join(" ")}`)
  out.push(`settle errors seen by clients: ${formatTally(state.settleErrors)}`)
  out.push(`client calls ended: ${formatTally(state.callEnds)}`)
  out.push(`proxy "subscription ended" reasons: ${formatTally(state.subscriptionEnds)}`)
  out.push(`proxy log lines above INFO:${state.proxyNotable.size === 0 ? " none" : ""}`)
  for (const [key, count] of state.proxyNotable.entries()) {
    const sample = state.proxySamples.get(key)
    const fields = sample === undefined ? "" : ` e.g. proxy#${sample.instance} ${sample.timestamp} ${truncate(JSON.stringify(sample.fields), 300)}`
    out.push(`  ${count} x ${key}${fields}`)
  }
  if (state.proxyRaw.length > 0) {
    out.push(`proxy non-JSON output (${state.proxyRaw.length}${state.proxyRaw.length >= 200 ? "+" : ""} lines, first 20):`)
    for (const line of state.proxyRaw.slice(0, 20)) out.push(`  ${truncate(line, 300)}`)
  }
  if (state.garbage.length > 0) out.push(`unparsed client stdout: ${state.garbage.slice(0, 5).join(" | ")}`)
  out.push(`logs: ${logDir}`)
  out.push(lost.length > 0 ? "RESULT: FAIL (messages lost)" : "RESULT: PASS (no message lost)")
  process.stdout.write(out.join("\n") + "\n")
  return lost.length > 0 ? 1 : 0
}

/** Takes every message off a queue (acking it) and returns their message ids. */
const drainIds = async (admin: Admin, queue: string): Promise<Array<string>> => {
  const ids: Array<string> = []
  const channel = await admin.connection.createChannel()
  channel.on("error", () => undefined)
  try {
    while (true) {
      const message = await channel.get(queue, { noAck: true })
      if (message === false) break
      ids.push(String(message.properties.messageId ?? JSON.parse(message.content.toString()).id))
    }
  } catch (error) {
    ids.push(`<could not read ${queue}: ${errorText(error)}>`)
  } finally {
    await channel.close().catch(() => undefined)
  }
  return ids
}

const describeIds = (ids: ReadonlyArray<string>, state: State): string => {
  if (ids.length === 0) return ""
  const received = ids.filter((id) => state.received.has(id)).length
  return ` — ${received} of them already received (duplicates), ${ids.length - received} never received; ids: ` +
    truncate(ids.slice(0, 20).join(", "), 600)
}

// ---- entry point -------------------------------------------------------------------------------

const main = Effect.gen(function*() {
  const names = makeNames()
  const admin = yield* makeAdmin(names)
  const relay = yield* startRelay()
  const state = newState()
  const cleanup: Array<() => Promise<void>> = []
  // Children go before the relay closes and the queues are deleted (finalizers run in reverse).
  yield* Effect.addFinalizer(() =>
    Effect.promise(async () => {
      for (const step of cleanup.reverse()) await step().catch(() => undefined)
    })
  )
  return yield* Effect.promise(() => run({ names, admin, relay }, state, cleanup))
}).pipe(Effect.scoped)

process.on("SIGINT", () => {
  progress("interrupted")
  process.exit(130)
})

const runMode = (): Promise<number> =>
  clusterMode ? import("./chaos-cluster.js").then((cluster) => cluster.runClusterChaos()) : Effect.runPromise(main)

runMode().then(
  (code) => {
    process.exitCode = code
  },
  (error: unknown) => {
    process.stderr.write(`chaos: run failed: ${errorText(error)}\n`)
    process.exitCode = 2
  }
)
