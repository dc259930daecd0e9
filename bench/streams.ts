/**
 * Phase 3, many streams: S concurrent StreamSchemaMessages calls compete on the one schemas queue
 * (one queue per kind is the contract). Publish M messages and check that all arrive; cancel every
 * call; report the proxy's peak RSS, how long until the broker shows 0 consumers, and the channels
 * left on the proxy's connection (rabbitmqctl, by RABBITMQ_CONNECTION_NAME).
 */
import * as grpc from "@grpc/grpc-js"
import type { ClientReadableStream } from "@grpc/grpc-js"
import type { SchemaMessageResponse } from "../gen/messaging.js"
import { type Admin, type BrokerConnectionInfo, brokerConnectionInfo } from "./broker.js"
import { makeClient } from "./drains.js"
import { type ProxyChild, ResourceSampler } from "./proxyProcess.js"
import { bodyFactory } from "./throughput.js"
import { log, now, sleep } from "./util.js"

export interface StreamsOptions {
  readonly admin: Admin
  readonly proxy: ProxyChild
  readonly connectionName: string
  readonly streams: number
  readonly messages: number
  readonly bodyBytes: number
}

export interface StreamsResult {
  readonly streams: number
  readonly messages: number
  /** Broker view of the proxy's connection while idle, with all streams open, and after the cancel. */
  readonly channelsIdle: BrokerConnectionInfo | null
  readonly channelsOpen: BrokerConnectionInfo | null
  readonly channelsAfterCancel: BrokerConnectionInfo | null
  /** Time from the cancel until a rabbitmqctl check showed 0 channels (one check takes ~0.4-1 s). */
  readonly channelsZeroAfterMs: number | null
  /** How many rabbitmqctl checks that took (1 = the first check after the cancel already showed 0). */
  readonly channelsChecks: number
  readonly openAllSeconds: number
  readonly deliverAllSeconds: number | null
  readonly received: number
  readonly duplicates: number
  readonly streamsWithMessages: number
  readonly maxPerStream: number
  readonly streamErrors: number
  readonly firstStreamError: string | null
  readonly cancelToZeroConsumersMs: number | null
  readonly leftInQueue: number | null
  readonly proxyRssIdle: number | null
  readonly proxyRssPeak: number | null
  readonly proxyHeapUsedPeak: number | null
  readonly proxyLogLinesPerStream: number
}

export const runStreams = async (options: StreamsOptions): Promise<StreamsResult> => {
  const { admin, proxy, streams, messages } = options
  const { names } = admin
  await admin.freshQueue(names.schemas, names.schemasRoutingKey)
  const idleStatus = await proxy.procStatus()
  const channelsIdle = (await brokerConnectionInfo(options.connectionName)) ?? null
  const client = await makeClient(proxy.port)
  const sampler = new ResourceSampler(proxy, 200)
  const logLinesBefore = proxy.logLines

  const perStream = new Array<number>(streams).fill(0)
  const seen = new Set<string>()
  let received = 0
  let duplicates = 0
  let streamErrors = 0
  let firstStreamError: string | null = null
  let cancelling = false
  const calls: Array<ClientReadableStream<SchemaMessageResponse>> = []
  try {
    const openStarted = now()
    for (let i = 0; i < streams; i++) {
      const call = client.streamSchemaMessages({})
      call.on("data", (message: SchemaMessageResponse) => {
        perStream[i]!++
        if (seen.has(message.id)) duplicates++
        else {
          seen.add(message.id)
          received++
        }
      })
      call.on("error", (error: grpc.ServiceError) => {
        if (cancelling && error.code === grpc.status.CANCELLED) return
        streamErrors++
        firstStreamError ??= `${grpc.status[error.code]} ${error.details}`
      })
      calls.push(call)
    }
    log(`streams: ${streams} calls started, waiting for ${streams} consumers on the queue`)
    await admin.waitQueue(names.schemas, (s) => s.consumerCount >= streams || streamErrors > 0, 120_000, 20)
    const openAllSeconds = (now() - openStarted) / 1000
    const channelsOpen = (await brokerConnectionInfo(options.connectionName)) ?? null

    log(`streams: all open after ${openAllSeconds.toFixed(2)} s; publishing ${messages}`)
    const deliverStarted = now()
    const body = bodyFactory(options.bodyBytes)
    await admin.publishMany(messages, () => body())
    const deadline = now() + 60_000
    while (received < messages && now() < deadline) await sleep(10)
    const deliverAllSeconds = received >= messages ? (now() - deliverStarted) / 1000 : null
    if (deliverAllSeconds === null) log(`streams: only ${received} of ${messages} arrived within 60 s`)

    const beforeCancel = await proxy.procStatus()
    log("streams: cancelling every call")
    const cancelStarted = now()
    cancelling = true
    for (const call of calls) call.cancel()
    let cancelToZeroConsumersMs: number | null = null
    let leftInQueue: number | null = null
    try {
      const { elapsedMs, state } = await admin.waitQueue(names.schemas, (s) => s.consumerCount === 0, 60_000, 0)
      cancelToZeroConsumersMs = elapsedMs
      leftInQueue = state.messageCount
    } catch (error) {
      log(`streams: ${String(error)}`)
    }
    // Channels as the broker sees them; rabbitmqctl takes ~0.4 s per call.
    let channelsAfterCancel: BrokerConnectionInfo | null = null
    let channelsZeroAfterMs: number | null = null
    let channelsChecks = 0
    const channelsDeadline = now() + 20_000
    for (;;) {
      channelsChecks++
      channelsAfterCancel = (await brokerConnectionInfo(options.connectionName)) ?? null
      if (channelsAfterCancel === null) break
      if (channelsAfterCancel.channels === 0) {
        channelsZeroAfterMs = now() - cancelStarted
        break
      }
      if (now() > channelsDeadline) break
      await sleep(200)
    }
    const resources = await sampler.stop()
    const finalStatus = await proxy.procStatus()
    return {
      streams,
      messages,
      channelsIdle,
      channelsOpen,
      channelsAfterCancel,
      channelsZeroAfterMs,
      channelsChecks,
      openAllSeconds,
      deliverAllSeconds,
      received,
      duplicates,
      streamsWithMessages: perStream.filter((n) => n > 0).length,
      maxPerStream: Math.max(...perStream),
      streamErrors,
      firstStreamError,
      cancelToZeroConsumersMs,
      leftInQueue,
      proxyRssIdle: idleStatus?.rss ?? null,
      // VmHWM is the kernel's own peak; the sampler's maximum is a lower bound of it.
      proxyRssPeak: Math.max(finalStatus?.rssPeak ?? 0, beforeCancel?.rss ?? 0, resources.rssMax) || null,
      proxyHeapUsedPeak: resources.heapUsedMax,
      proxyLogLinesPerStream: (proxy.logLines - logLinesBefore) / streams
    }
  } finally {
    cancelling = true
    for (const call of calls) call.cancel()
    await sampler.stop()
    client.close()
  }
}
