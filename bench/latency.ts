/**
 * Phase 2, latency: publish at a steady rate (confirm channel, like the API) with the publish time
 * embedded in the body's `extra`; measure publish→receive for a direct consumer and through the
 * proxy's StreamSchemaMessages. Both run at once on the same messages: the exchange routes each
 * message to the schemas queue (proxy) and to a copy queue bound the same way (direct consumer),
 * so both paths see identical load and broker conditions.
 */
import * as grpc from "@grpc/grpc-js"
import type * as amqp from "amqplib"
import type { SchemaMessageResponse } from "../gen/messaging.js"
import { newId, schemaBody } from "./bodies.js"
import { type Admin, connect } from "./broker.js"
import { makeClient } from "./drains.js"
import { type ProxyChild, ResourceSampler, type SamplerReport, type SchedStat, schedStat } from "./proxyProcess.js"
import { type Distribution, distribution, errorText, log, now, sleep } from "./util.js"

export interface LatencyOptions {
  readonly admin: Admin
  readonly proxy: ProxyChild
  readonly ratePerSecond: number
  readonly seconds: number
  readonly warmupSeconds: number
  readonly bodyBytes: number
  readonly prefetch: number
}

export interface LatencyResult {
  readonly ratePerSecond: number
  readonly seconds: number
  readonly warmupSeconds: number
  readonly published: number
  /** Achieved publish rate over the measured window. */
  readonly achievedRate: number
  /** How late the publisher ran against its schedule (ms): a sign of a busy client machine. */
  readonly publisherLagMs: Distribution
  readonly direct: Distribution & { readonly missing: number; readonly duplicates: number }
  readonly proxy: Distribution & { readonly missing: number; readonly duplicates: number }
  readonly addedP50Ms: number
  readonly addedP99Ms: number
  readonly proxyCpuPercent: number | null
  /** The proxy process during the measured window: RSS, event-loop delay and GC pauses. */
  readonly proxyResources: SamplerReport | null
  /**
   * Main-thread time spent runnable but waiting for a CPU during the window (ms), for the proxy and
   * for this process: large values mean the machine, not the code, is what delays messages.
   */
  readonly proxyCpuWaitMs: number | null
  readonly benchCpuWaitMs: number | null
}

interface Track {
  readonly latencies: Float64Array
  received: number
  duplicates: number
}

const newTrack = (size: number): Track => ({ latencies: new Float64Array(size).fill(Number.NaN), received: 0, duplicates: 0 })

const record = (track: Track, seq: number, sentAt: number, at: number) => {
  if (!Number.isInteger(seq) || seq < 0 || seq >= track.latencies.length) return
  if (!Number.isNaN(track.latencies[seq]!)) {
    track.duplicates++
    return
  }
  track.latencies[seq] = at - sentAt
  track.received++
}

const summarize = (track: Track, from: number, to: number) => {
  const values: Array<number> = []
  let missing = 0
  for (let i = from; i < to; i++) {
    const v = track.latencies[i]!
    if (Number.isNaN(v)) missing++
    else values.push(v)
  }
  return { ...distribution(values), missing, duplicates: track.duplicates }
}

export const runLatency = async (options: LatencyOptions): Promise<LatencyResult> => {
  const { admin, proxy, ratePerSecond } = options
  const { names } = admin
  const warmupCount = Math.round(options.warmupSeconds * ratePerSecond)
  const total = warmupCount + Math.round(options.seconds * ratePerSecond)

  await admin.freshQueue(names.schemas, names.schemasRoutingKey)
  await admin.freshQueue(names.directCopy, names.schemasRoutingKey)

  const direct = newTrack(total)
  const viaProxy = newTrack(total)

  // Direct consumer: its own connection, manual ack, same prefetch as the proxy.
  const connection: amqp.ChannelModel = await connect(`bench-latency-direct ${names.prefix}`)
  const channel = await connection.createChannel()
  channel.on("error", () => undefined)
  await channel.prefetch(options.prefetch)
  await channel.consume(names.directCopy, (message) => {
    if (message === null) return
    const at = now()
    const body = JSON.parse(message.content.toString("utf8")) as { extra?: Record<string, string> }
    channel.ack(message)
    const extra = body.extra ?? {}
    record(direct, Number(extra["seq"]), Number(extra["t"]), at)
  }, { noAck: false })

  // Through the proxy.
  const client = await makeClient(proxy.port)
  const call = client.streamSchemaMessages({})
  let streamError: string | undefined
  let cancelling = false
  call.on("data", (message: SchemaMessageResponse) => {
    const at = now()
    record(viaProxy, Number(message.extra["seq"]), Number(message.extra["t"]), at)
  })
  call.on("error", (error: grpc.ServiceError) => {
    if (cancelling && error.code === grpc.status.CANCELLED) return
    streamError = `${grpc.status[error.code]} ${error.details}`
  })

  let sampler: ResourceSampler | undefined
  try {
    await admin.waitQueue(names.schemas, (s) => s.consumerCount === 1, 10_000, 5)
    await admin.waitQueue(names.directCopy, (s) => s.consumerCount === 1, 10_000, 5)

    // Steady publisher: every tick, publish what the schedule says is due, each stamped as sent.
    let published = 0
    let confirmFailures = 0
    const lag: Array<number> = []
    const intervalMs = 1000 / ratePerSecond
    const started = now()
    let measuredStart = started
    let proxyCpuStart = await proxy.cpuSeconds()
    let proxySchedStart: SchedStat | undefined
    let benchSchedStart: SchedStat | undefined
    log(`latency: publishing ${total} messages at ${ratePerSecond}/s (${options.warmupSeconds} s warm-up)`)
    while (published < total) {
      const elapsed = now() - started
      const due = Math.min(total, Math.floor(elapsed / intervalMs) + 1)
      while (published < due) {
        const seq = published
        const scheduled = started + seq * intervalMs
        if (seq === warmupCount) {
          measuredStart = now()
          proxyCpuStart = await proxy.cpuSeconds()
          sampler = new ResourceSampler(proxy, 500)
          proxySchedStart = await proxy.schedStat()
          benchSchedStart = await schedStat("self")
        }
        const sentAt = now()
        if (seq >= warmupCount) lag.push(sentAt - scheduled)
        const id = newId()
        const content = schemaBody({ id, extra: { seq: String(seq), t: sentAt.toFixed(4) }, targetBytes: options.bodyBytes })
        admin.publish(content, id, (error) => { if (error != null) confirmFailures++ })
        published++
      }
      if (streamError) throw new Error(`proxy stream failed: ${streamError}`)
      await sleep(1)
    }
    const measuredSeconds = (now() - measuredStart) / 1000
    const proxyCpuEnd = await proxy.cpuSeconds()
    const proxySchedEnd = await proxy.schedStat()
    const benchSchedEnd = await schedStat("self")
    const waited = (start: SchedStat | undefined, end: SchedStat | undefined) =>
      start && end ? end.waitMs - start.waitMs : null
    await admin.publisher.waitForConfirms()
    if (confirmFailures > 0) throw new Error(`${confirmFailures} publishes were not confirmed`)

    // Let the stragglers arrive.
    const deadline = now() + 10_000
    while ((direct.received < total || viaProxy.received < total) && now() < deadline && !streamError) await sleep(20)

    const directSummary = summarize(direct, warmupCount, total)
    const proxySummary = summarize(viaProxy, warmupCount, total)
    const resources = (await sampler?.stop()) ?? null
    return {
      ratePerSecond,
      seconds: options.seconds,
      warmupSeconds: options.warmupSeconds,
      published,
      achievedRate: (total - warmupCount) / measuredSeconds,
      publisherLagMs: distribution(lag),
      direct: directSummary,
      proxy: proxySummary,
      addedP50Ms: proxySummary.p50 - directSummary.p50,
      addedP99Ms: proxySummary.p99 - directSummary.p99,
      proxyCpuPercent: proxyCpuStart !== undefined && proxyCpuEnd !== undefined
        ? ((proxyCpuEnd - proxyCpuStart) / measuredSeconds) * 100
        : null,
      proxyResources: resources,
      proxyCpuWaitMs: waited(proxySchedStart, proxySchedEnd),
      benchCpuWaitMs: waited(benchSchedStart, benchSchedEnd)
    }
  } catch (error) {
    throw new Error(`latency phase: ${errorText(error)}`)
  } finally {
    await sampler?.stop()
    cancelling = true
    call.cancel()
    client.close()
    await channel.close().catch(() => undefined)
    await connection.close().catch(() => undefined)
  }
}
