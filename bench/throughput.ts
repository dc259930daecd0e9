/**
 * Phase 1, throughput: N ~1 KiB schema messages are published (confirmed) to a freshly declared
 * schemas queue, then drained (a) directly, (b) through StreamSchemaMessages, (c) through
 * SubscribeSchemaMessages; repeated, alternating a,b,c,a,b,c,…; medians reported.
 */
import type * as amqp from "amqplib"
import { loadavg } from "node:os"
import type { MessagingServiceClient } from "../gen/messaging.js"
import { schemaBody } from "./bodies.js"
import { type Admin, type BrokerEndpoint, connect } from "./broker.js"
import {
  type Availability,
  type DrainOutcome,
  drainDirect,
  drainStream,
  drainSubscribe,
  makeClient,
  probeSubscribe,
  Unimplemented
} from "./drains.js"
import { sumCpuSeconds } from "./cpuWindow.js"
import { findBrokerPid, machineCpuSeconds, type ProxyChild, ResourceSampler } from "./proxyProcess.js"
import { envInt, errorText, log, median, now } from "./util.js"

/** BENCH_DELIVERIES_PER_EVENT: the (c) drain's open.max_deliveries_per_event (default: the prefetch; 1 = one event per message). */
const deliveriesPerEvent = (prefetch: number) => envInt("BENCH_DELIVERIES_PER_EVENT", prefetch)

export type Mode = "direct" | "stream" | "subscribe"
export const MODES: ReadonlyArray<Mode> = ["direct", "stream", "subscribe"]
export const MODE_LABEL: Record<Mode, string> = {
  direct: "(a) direct amqplib consumer",
  stream: "(b) StreamSchemaMessages",
  subscribe: "(c) SubscribeSchemaMessages"
}

export interface RunRecord {
  readonly mode: Mode
  readonly repetition: number
  readonly messages: number
  readonly publishSeconds: number
  readonly seconds: number | null
  readonly msgPerSec: number | null
  /** CPU the proxy child used during the drain, in µs per message (b, c). */
  readonly proxyCpuUsPerMsg: number | null
  /** CPU this (client) process used during the drain, in µs per message. */
  readonly clientCpuUsPerMsg: number | null
  /** CPU the broker (beam.smp) used during the drain, in µs per message. */
  readonly brokerCpuUsPerMsg: number | null
  /** CPU the whole machine used during the drain (all processes), in µs per message. */
  readonly machineCpuUsPerMsg: number | null
  /** Cores busy on average during the drain (the machine has `os.availableParallelism()`). */
  readonly machineCoresBusy: number | null
  /** The machine's 1-minute load average just before the drain. */
  readonly loadBefore: number
  readonly proxyRssMax: number | null
  readonly proxyHeapUsedMax: number | null
  /** Share of the drain the proxy spent in GC pauses, and its worst event-loop delay. */
  readonly proxyGcPercent: number | null
  readonly proxyLoopDelayMaxMs: number | null
  /** Ready messages left in the queue after the drain (should be 0). */
  readonly leftInQueue: number | null
  readonly malformed: number
  readonly redelivered?: number
  readonly settleErrors?: number
  readonly error?: string
}

export interface ThroughputResult {
  readonly messages: number
  readonly bodyBytes: number
  readonly prefetch: number
  readonly repetitions: number
  readonly warmupMessages: number
  readonly subscribe: Availability
  readonly runs: ReadonlyArray<RunRecord>
  readonly medianMsgPerSec: Record<Mode, number | null>
  readonly ratioStreamToDirect: number | null
  readonly ratioSubscribeToDirect: number | null
  readonly cpuRatioStreamToDirect: number | null
  readonly medianProxyCpuUsPerMsg: Record<Mode, number | null>
  readonly medianClientCpuUsPerMsg: Record<Mode, number | null>
  readonly medianMachineCpuUsPerMsg: Record<Mode, number | null>
  readonly medianMachineCoresBusy: Record<Mode, number | null>
  readonly proxyRssMax: number | null
}

export interface ThroughputOptions {
  readonly admin: Admin
  readonly proxy: ProxyChild
  readonly messages: number
  readonly bodyBytes: number
  readonly prefetch: number
  readonly repetitions: number
  /** Drained once through each path before the timed runs, so every path runs JIT-compiled code. */
  readonly warmupMessages: number
  /** The paths to run (all three by default); the quorum phase runs (a) and (b). */
  readonly modes?: ReadonlyArray<Mode>
  /** Where the direct consumer (a) connects; the machine's broker by default. */
  readonly directEndpoint?: BrokerEndpoint
  /** The broker processes whose CPU is counted as the broker's; the machine's broker by default. */
  readonly brokerPids?: ReadonlyArray<number>
  /** Prefix of the progress lines ("throughput" by default). */
  readonly label?: string
}

/** Bodies of one size, differing only in the id: the template is rendered once. */
export const bodyFactory = (bodyBytes: number) => {
  const placeholder = "#".repeat(32)
  const [head, tail] = schemaBody({ id: placeholder, targetBytes: bodyBytes }).toString("utf8").split(placeholder)
  if (head === undefined || tail === undefined) throw new Error("body template without id placeholder")
  let counter = 0
  const run = Math.floor(Math.random() * 0xffff).toString(16).padStart(4, "0")
  return () => {
    const messageId = `${run}${(counter++).toString(16).padStart(28, "0")}`
    return { content: Buffer.from(head + messageId + tail), messageId }
  }
}

/** Empties the stage: fresh queue, N bodies published and confirmed. Returns the publish time. */
export const prefill = async (admin: Admin, messages: number, body: () => { content: Buffer; messageId: string }) => {
  const { names } = admin
  await admin.freshQueue(names.schemas, names.schemasRoutingKey)
  const started = now()
  await admin.publishMany(messages, () => body())
  const publishSeconds = (now() - started) / 1000
  const { state } = await admin.waitQueue(names.schemas, (s) => s.messageCount >= messages, 30_000, 20)
  if (state.messageCount !== messages) throw new Error(`queue holds ${state.messageCount}, expected ${messages}`)
  return publishSeconds
}

const cpuSecondsOf = (usage: NodeJS.CpuUsage) => (usage.user + usage.system) / 1e6

export const runThroughput = async (options: ThroughputOptions): Promise<ThroughputResult> => {
  const { admin, proxy, messages, prefetch } = options
  const { names } = admin
  const body = bodyFactory(options.bodyBytes)
  const label = options.label ?? "throughput"
  const modes = options.modes ?? MODES
  const direct: amqp.ChannelModel = await connect(`bench-direct ${names.prefix}`, options.directEndpoint)
  const client: MessagingServiceClient = await makeClient(proxy.port)
  const runs: Array<RunRecord> = []
  // The broker's own CPU shows what the machine's two cores are shared with.
  const brokerPids: ReadonlyArray<number> = options.brokerPids ?? [await findBrokerPid()].filter((p): p is number => p !== undefined)
  const brokerCpuSeconds = async (): Promise<number | undefined> =>
    brokerPids.length === 0 ? undefined : (await sumCpuSeconds(brokerPids)) ?? undefined
  let subscribe: Availability = modes.includes("subscribe") ? { available: true } : { available: false, reason: "not run" }
  try {
    if (modes.includes("subscribe")) {
      subscribe = await probeSubscribe(client)
      await admin.waitQueue(names.schemas, (s) => s.consumerCount === 0, 10_000, 5)
      if (!subscribe.available) log(`SubscribeSchemaMessages not available (${subscribe.reason}): (c) is n/a`)
    }
    if (options.warmupMessages > 0) {
      for (const mode of modes) {
        if (mode === "subscribe" && !subscribe.available) continue
        const warm = await runOne(mode, 0, options.warmupMessages)
        log(`${label} warm-up ${MODE_LABEL[mode]}: ${warm.error ?? `${Math.round(warm.msgPerSec ?? 0)} msg/s (not counted)`}`)
      }
    }

    for (let repetition = 1; repetition <= options.repetitions; repetition++) {
      for (const mode of modes) {
        if (mode === "subscribe" && !subscribe.available) continue
        const record = await runOne(mode, repetition)
        runs.push(record)
        if (record.error?.startsWith("UNIMPLEMENTED") && mode === "subscribe") {
          subscribe = { available: false, reason: record.error }
        }
        log(
          `${label} ${MODE_LABEL[mode]} #${repetition}: ` +
            (record.msgPerSec === null ? `failed: ${record.error}` : `${Math.round(record.msgPerSec)} msg/s`) +
            ` (publish ${record.publishSeconds.toFixed(1)} s, left ${record.leftInQueue})`
        )
      }
    }
  } finally {
    client.close()
    await direct.close().catch(() => undefined)
  }

  const medianOf = (mode: Mode, pick: (r: RunRecord) => number | null) => {
    const values = runs.filter((r) => r.mode === mode).map(pick).filter((v): v is number => v !== null)
    return values.length ? median(values) : null
  }
  /** One median per mode (null where a mode has no figure, e.g. (c) when it is unavailable). */
  const mediansOf = (pick: (r: RunRecord) => number | null): Record<Mode, number | null> => ({
    direct: medianOf("direct", pick),
    stream: medianOf("stream", pick),
    subscribe: subscribe.available ? medianOf("subscribe", pick) : null
  })
  const medianMsgPerSec = mediansOf((r) => r.msgPerSec)
  /**
   * The median over repetitions of each repetition's own ratio: the runs of one repetition follow
   * each other within seconds, so a machine whose speed drifts during the phase (seen here: the
   * direct drain from 13,700 to 20,600 msg/s within one run) moves both sides of a ratio together.
   */
  const pairedRatio = (pick: (r: RunRecord) => number | null, mode: Mode, over: Mode, overPick = pick): number | null => {
    const ratios: Array<number> = []
    for (const run of runs) {
      if (run.mode !== mode) continue
      const x = pick(run)
      const base = runs.find((r) => r.mode === over && r.repetition === run.repetition)
      const y = base === undefined ? null : overPick(base)
      if (x !== null && y !== null && y > 0) ratios.push(x / y)
    }
    return ratios.length ? median(ratios) : null
  }
  const rssValues = runs.map((r) => r.proxyRssMax).filter((v): v is number => v !== null)
  return {
    messages,
    bodyBytes: options.bodyBytes,
    prefetch,
    repetitions: options.repetitions,
    warmupMessages: options.warmupMessages,
    subscribe,
    runs,
    medianMsgPerSec,
    ratioStreamToDirect: pairedRatio((r) => r.msgPerSec, "stream", "direct"),
    ratioSubscribeToDirect: subscribe.available ? pairedRatio((r) => r.msgPerSec, "subscribe", "direct") : null,
    /** The proxy's CPU per streamed message over the direct consumer's own (b's proxy CPU / a's client CPU). */
    cpuRatioStreamToDirect: pairedRatio((r) => r.proxyCpuUsPerMsg, "stream", "direct", (r) => r.clientCpuUsPerMsg),
    // (a) has no proxy, so its proxy CPU is null in every record.
    medianProxyCpuUsPerMsg: mediansOf((r) => r.proxyCpuUsPerMsg),
    medianClientCpuUsPerMsg: mediansOf((r) => r.clientCpuUsPerMsg),
    medianMachineCpuUsPerMsg: mediansOf((r) => r.machineCpuUsPerMsg),
    medianMachineCoresBusy: mediansOf((r) => r.machineCoresBusy),
    proxyRssMax: rssValues.length ? Math.max(...rssValues) : null
  }

  async function runOne(mode: Mode, repetition: number, messages = options.messages): Promise<RunRecord> {
    if (!proxy.running) throw new Error("the proxy child has exited")
    let publishSeconds = 0
    try {
      publishSeconds = await prefill(admin, messages, body)
    } catch (error) {
      return failed(mode, repetition, publishSeconds, `prefill: ${errorText(error)}`)
    }
    const viaProxy = mode !== "direct"
    const loadBefore = loadavg()[0] ?? 0
    const sampler = viaProxy ? new ResourceSampler(proxy) : undefined
    const proxyCpuBefore = await proxy.cpuSeconds()
    const brokerCpuBefore = await brokerCpuSeconds()
    const machineBefore = await machineCpuSeconds()
    const clientCpuBefore = process.cpuUsage()
    let outcome: DrainOutcome
    try {
      outcome = mode === "direct"
        ? await drainDirect(direct, names.schemas, messages, prefetch)
        : mode === "stream"
        ? await drainStream(client, messages)
        : await drainSubscribe(client, messages, { maxInFlight: prefetch, ackBatch: 16, maxDeliveriesPerEvent: deliveriesPerEvent(prefetch) })
    } catch (error) {
      await sampler?.stop()
      const text = error instanceof Unimplemented ? `UNIMPLEMENTED: ${error.message}` : errorText(error)
      await settle()
      return failed(mode, repetition, publishSeconds, text)
    }
    const clientCpu = cpuSecondsOf(process.cpuUsage(clientCpuBefore))
    const machineAfter = await machineCpuSeconds()
    const brokerCpuAfter = await brokerCpuSeconds()
    const proxyCpuAfter = await proxy.cpuSeconds()
    const resources = await sampler?.stop()
    const left = await settle()
    const perMessage = (seconds: number) => (seconds * 1e6) / outcome.received
    return {
      mode,
      repetition,
      messages,
      publishSeconds,
      seconds: outcome.seconds,
      msgPerSec: outcome.received / outcome.seconds,
      proxyCpuUsPerMsg: viaProxy && proxyCpuBefore !== undefined && proxyCpuAfter !== undefined
        ? perMessage(proxyCpuAfter - proxyCpuBefore)
        : null,
      clientCpuUsPerMsg: perMessage(clientCpu),
      brokerCpuUsPerMsg: brokerCpuBefore !== undefined && brokerCpuAfter !== undefined
        ? perMessage(brokerCpuAfter - brokerCpuBefore)
        : null,
      machineCpuUsPerMsg: machineBefore && machineAfter ? perMessage(machineAfter.busy - machineBefore.busy) : null,
      machineCoresBusy: machineBefore && machineAfter
        ? (machineAfter.busy - machineBefore.busy) / outcome.seconds
        : null,
      loadBefore,
      proxyRssMax: resources?.rssMax ?? null,
      proxyHeapUsedMax: resources?.heapUsedMax ?? null,
      proxyGcPercent: resources?.gcTotalMs != null ? (resources.gcTotalMs / 10) / outcome.seconds : null,
      proxyLoopDelayMaxMs: resources?.loopDelayMaxMs ?? null,
      leftInQueue: left,
      malformed: outcome.malformed,
      ...(outcome.redelivered !== undefined ? { redelivered: outcome.redelivered } : {}),
      ...(outcome.settleErrors !== undefined ? { settleErrors: outcome.settleErrors } : {})
    }
  }

  /** Waits for the consumer to be gone; returns the ready messages left in the queue. */
  async function settle(): Promise<number | null> {
    try {
      const { state } = await admin.waitQueue(names.schemas, (s) => s.consumerCount === 0, 10_000, 5)
      return state.messageCount
    } catch {
      return null
    }
  }
}

const failed = (mode: Mode, repetition: number, publishSeconds: number, error: string): RunRecord => ({
  mode,
  repetition,
  messages: 0,
  publishSeconds,
  seconds: null,
  msgPerSec: null,
  proxyCpuUsPerMsg: null,
  clientCpuUsPerMsg: null,
  brokerCpuUsPerMsg: null,
  machineCpuUsPerMsg: null,
  machineCoresBusy: null,
  loadBefore: loadavg()[0] ?? 0,
  proxyRssMax: null,
  proxyHeapUsedMax: null,
  proxyGcPercent: null,
  proxyLoopDelayMaxMs: null,
  leftInQueue: null,
  malformed: 0,
  error
})
