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
import { join } from "node:path"
import { type Admin, makeAdmin, makeNames, proxyEnv, queueState, type TestNames } from "../test/support/harness.js"
import { type Relay, startRelay } from "../test/support/relay.js"
import {
  chaosProxyTimeouts,
  ClientPool,
  makeClock,
  makeLogDir,
  messageBody,
  messageId,
  messageIdOf,
  newRunState,
  parseFaultKinds,
  proxyLogSink,
  proxyMain,
  queueAfterClients,
  readSettings,
  runFaultLoop,
  type RunState,
  signalAndRestartProxy,
  stopProxy,
  Supervisor,
  waitForEnd,
  waitQueueEmpty,
  writeReport
} from "./chaos-run.js"
import { errorText, freePort, type ProxyInstance, sleep, startProxyProcess } from "./chaos-support.js"

// `--cluster` runs the cluster variant (chaos-cluster.ts) instead; see the entry point below.
const args = process.argv.slice(2)
const clusterMode = args.includes("--cluster")
const unknownArgs = args.filter((a) => a !== "--cluster")
if (unknownArgs.length > 0) {
  process.stderr.write(`chaos: unknown argument(s) ${unknownArgs.join(" ")}; usage: npm run chaos [-- --cluster]\n`)
  process.exit(2)
}

// ---- settings ----------------------------------------------------------------------------------

const settings = readSettings({ clients: 4, publishSeconds: 40 }, () => ({}))

const clock = makeClock("chaos")
const { t0, progress } = clock

// ---- bookkeeping -------------------------------------------------------------------------------

type FaultKind = "cancel-call" | "kill-client" | "kill-proxy" | "term-proxy" | "sever-broker"
const allFaultKinds: ReadonlyArray<FaultKind> = ["cancel-call", "kill-client", "kill-proxy", "term-proxy", "sever-broker"]
// The cluster run has fault kinds of its own.
const faultKinds: ReadonlyArray<FaultKind> = clusterMode ? allFaultKinds : parseFaultKinds("chaos", allFaultKinds, allFaultKinds)

interface State extends RunState<FaultKind> {
  readonly publishErrors: Array<string>
  readonly returned: Array<string>
}

const newState = (): State => ({ ...newRunState<FaultKind>(), publishErrors: [], returned: [] })

// ---- the run -----------------------------------------------------------------------------------

interface Env {
  readonly names: TestNames
  readonly admin: Admin
  readonly relay: Relay
}

const run = async ({ names, admin, relay }: Env, state: State, cleanup: Array<() => Promise<void>>): Promise<number> => {
  const logDir = makeLogDir(names.prefix)
  const grpcPort = await freePort()
  progress(`names ${names.prefix}, relay port ${relay.port}, proxy port ${grpcPort}, logs in ${logDir}`)
  progress(`settings ${JSON.stringify(settings)}`)

  // -- the proxy, supervised: an exit we did not cause is logged and the proxy restarted.
  const env = proxyEnv(names, {
    MESSAGING_CONNECTION_PORT: String(grpcPort),
    RABBITMQ_PORT: String(relay.port),
    ...chaosProxyTimeouts
  })
  let proxyCount = 0
  let proxy: ProxyInstance | undefined
  const supervisor = new Supervisor(state, progress)
  const sink = proxyLogSink(state, names.prefix)
  const startProxy = async (): Promise<ProxyInstance> => {
    const instance = startProxyProcess(++proxyCount, proxyMain, env, join(logDir, `proxy-${proxyCount}.log`), sink)
    proxy = instance
    supervisor.watchProxy(instance, "", () => proxy === instance, startProxy)
    await instance.ready
    return instance
  }
  cleanup.push(async () => {
    supervisor.shuttingDown = true
    await stopProxy(proxy)
  })
  await startProxy()
  progress(`proxy #1 connected to the broker`)

  // -- consumers, supervised the same way.
  const clients = new ClientPool<FaultKind, number>({
    state,
    supervisor,
    settings,
    logDir,
    prefix: names.prefix,
    port: (port) => port,
    where: () => "",
    replacementNote: ""
  })
  cleanup.push(() => clients.killAll())
  for (let i = 0; i < settings.clients; i++) clients.start(grpcPort)

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
          const id = messageId(names.prefix, next)
          const content = messageBody(id)
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
  const record = (kind: FaultKind, detail: string) => supervisor.record(kind, detail)
  const restartProxy = async (signal: "SIGKILL" | "SIGTERM"): Promise<void> => {
    const old = proxy
    if (old === undefined) return
    const entry = record(signal === "SIGKILL" ? "kill-proxy" : "term-proxy", `proxy #${old.number} pid=${old.pid} ${signal}`)
    const { next, killedAt } = await signalAndRestartProxy(old, signal, entry, startProxy)
    entry.detail += `; proxy #${next.number} connected ${Date.now() - killedAt} ms after the kill`
  }
  const runFault = async (kind: FaultKind): Promise<void> => {
    switch (kind) {
      case "cancel-call":
        return clients.cancelCall((detail) => record(kind, detail))
      case "kill-client":
        return clients.killClient((detail) => record(kind, detail))
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
  const faultLoop = runFaultLoop({
    kinds: faultKinds,
    intervalMs: settings.faultIntervalMs,
    stop: stopFaults.signal,
    publishDone: () => publishDone,
    run: async (kind) => {
      await runFault(kind)
      return true
    },
    record
  })

  // -- wait until everything arrived, or nothing new did for CHAOS_TIMEOUT_SECONDS.
  const outcome = await waitForEnd({
    state,
    timeoutMs: settings.timeoutMs,
    publishDone: () => publishDone,
    status: () => `clients=${clients.size} proxy=#${proxy?.number ?? "-"} faults=${state.faults.length}`,
    queueCounts: async () => {
      const [queue, dead] = await Promise.all([
        Effect.runPromise(queueState(admin, names.schemas)),
        Effect.runPromise(queueState(admin, names.schemasDead))
      ])
      return { queue: queue.messageCount, dead: dead.messageCount }
    },
    progress
  })
  stopFaults.abort()
  await faultLoop
  await publisher

  // -- drain: let the consumers take the duplicates still queued, then stop them gracefully.
  await waitQueueEmpty(async () => (await Effect.runPromise(queueState(admin, names.schemas))).messageCount)
  await clients.stopAll()

  // -- what is left in the broker, once the proxy holds no consumer any more.
  const { queue: q, detail: queueDetail } = await queueAfterClients(() => Effect.runPromise(queueState(admin, names.schemas)))
  const dead = await Effect.runPromise(queueState(admin, names.schemasDead))
  const leftIds = await drainIds(admin, names.schemas)
  const deadIds = await drainIds(admin, names.schemasDead)

  // -- report
  return writeReport({
    state,
    clock,
    head: [`outcome: ${outcome}; ${((Date.now() - t0) / 1000).toFixed(1)} s; ${proxyCount} proxy instance(s), ${clients.count} client process(es)`],
    missingKinds: faultKinds.filter((k) => !state.faults.some((f) => f.kind === k)),
    queue: { name: names.schemas, messageCount: q.messageCount, ids: leftIds },
    queueDetail,
    dead: { name: names.schemasDead, messageCount: dead.messageCount, ids: deadIds },
    afterQueues: [],
    publishedAs: { noun: "publish", verb: "published" },
    foreignNote: " (SUSPICIOUS)",
    afterForeign: [
      ...(state.publishErrors.length > 0 ? [`publish errors: ${state.publishErrors.slice(0, 10).join("; ")}`] : []),
      ...(state.returned.length > 0 ? [`returned as unroutable (SUSPICIOUS): ${state.returned.length}`] : [])
    ],
    maskSample: (fields) => fields,
    logs: `logs: ${logDir}`
  })
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
      ids.push(messageIdOf(message))
    }
  } catch (error) {
    ids.push(`<could not read ${queue}: ${errorText(error)}>`)
  } finally {
    await channel.close().catch(() => undefined)
  }
  return ids
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
