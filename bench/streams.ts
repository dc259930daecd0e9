/**
 * Phase 3, many streams: S concurrent StreamSchemaMessages calls (10,000 by default) compete on
 * the one schemas queue (one queue per kind is the contract), opened over ⌈S / per-channel⌉ grpc-js
 * channels of their own (the proxy's GRPC_MAX_CONCURRENT_STREAMS_PER_CONNECTION is 1,000). Publish
 * M messages and check that all arrive, none twice; cancel every call; report how long opening all
 * took, the proxy's peak RSS, how long until the broker shows 0 consumers, and the connections and
 * channels of the proxy as the broker sees them (rabbitmqctl; every connection whose name is
 * RABBITMQ_CONNECTION_NAME or starts with "RABBITMQ_CONNECTION_NAME (": the primary, the pool's
 * "(consumers N)" members and "(publishing)").
 */
import * as grpc from "@grpc/grpc-js"
import type { ClientReadableStream } from "@grpc/grpc-js"
import type { MessagingServiceClient, SchemaMessageResponse } from "../gen/messaging.js"
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
  /** Calls per grpc-js channel (HTTP/2 connection); the proxy admits 1,000 per connection by default. */
  readonly streamsPerChannel: number
  readonly messages: number
  readonly bodyBytes: number
}

export interface StreamsResult {
  readonly streams: number
  readonly messages: number
  /** grpc-js channels (HTTP/2 connections to the proxy) the calls were spread over. */
  readonly grpcChannels: number
  /** Broker view of the proxy's connections while idle, with all streams open, and after the cancel. */
  readonly channelsIdle: BrokerConnectionInfo | null
  readonly channelsOpen: BrokerConnectionInfo | null
  readonly channelsAfterCancel: BrokerConnectionInfo | null
  /** Time from the cancel until a rabbitmqctl check showed 0 channels (one check takes ~0.4-1 s). */
  readonly channelsZeroAfterMs: number | null
  /** How many rabbitmqctl checks that took (1 = the first check after the cancel already showed 0). */
  readonly channelsChecks: number
  /** Time to issue all calls on the client (synchronous; the calls are then under way). */
  readonly startCallsSeconds: number
  /** First call issued → the broker shows all S consumers on the queue. */
  readonly openAllSeconds: number | null
  /** Consumers the broker showed when the open wait ended (S unless it timed out or streams failed). */
  readonly consumersOpen: number
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
  /** (peak − idle) / S: what one open stream costs the proxy in resident memory. */
  readonly proxyRssPerStream: number | null
  readonly proxyHeapUsedPeak: number | null
  /** Worst event-loop delay of the proxy while sampled (opening, delivering, cancelling). */
  readonly proxyLoopDelayMaxMs: number | null
  readonly proxyLogLinesPerStream: number
}

export const runStreams = async (options: StreamsOptions): Promise<StreamsResult> => {
  const { admin, proxy, streams, messages } = options
  const { names } = admin
  await admin.freshQueue(names.schemas, names.schemasRoutingKey)
  const idleStatus = await proxy.procStatus()
  const channelsIdle = (await brokerConnectionInfo(options.connectionName)) ?? null
  const grpcChannels = Math.ceil(streams / options.streamsPerChannel)
  const clients: Array<MessagingServiceClient> = []
  const sampler = new ResourceSampler(proxy, 200)
  const logLinesBefore = proxy.logLines
  // Opening, delivering and cancelling S streams takes longer the more there are.
  const scaledMs = (minimum: number, perStream: number) => Math.max(minimum, streams * perStream)

  const perStream = new Array<number>(streams).fill(0)
  const seen = new Set<string>()
  let received = 0
  let duplicates = 0
  let streamErrors = 0
  let firstStreamError: string | null = null
  let cancelling = false
  const calls: Array<ClientReadableStream<SchemaMessageResponse>> = []
  try {
    for (let c = 0; c < grpcChannels; c++) clients.push(await makeClient(proxy.port, { ownConnection: true }))
    const openStarted = now()
    for (let i = 0; i < streams; i++) {
      const call = clients[Math.floor(i / options.streamsPerChannel)]!.streamSchemaMessages({})
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
    const startCallsSeconds = (now() - openStarted) / 1000
    log(`streams: ${streams} calls started over ${grpcChannels} gRPC connection(s) in ${startCallsSeconds.toFixed(2)} s; ` +
      `waiting for ${streams} consumers on the queue`)
    let openAllSeconds: number | null = null
    let consumersOpen = 0
    try {
      const { state } = await admin.waitQueue(names.schemas, (s) => s.consumerCount >= streams || streamErrors > 0, scaledMs(120_000, 30), 20)
      consumersOpen = state.consumerCount
      if (state.consumerCount >= streams) openAllSeconds = (now() - openStarted) / 1000
      else log(`streams: ${streamErrors} stream(s) failed while opening (first: ${firstStreamError}); ${state.consumerCount} consumers`)
    } catch (error) {
      log(`streams: ${String(error)}`)
      consumersOpen = (await admin.queueState(names.schemas).catch(() => undefined))?.consumerCount ?? 0
    }
    const channelsOpen = (await brokerConnectionInfo(options.connectionName)) ?? null
    if (channelsOpen) {
      log(`streams: ${openAllSeconds === null ? "NOT all open" : `all open after ${openAllSeconds.toFixed(2)} s`}; ` +
        `${channelsOpen.channels} channels on ${channelsOpen.connections} proxy connection(s); publishing ${messages}`)
    }

    const deliverStarted = now()
    const body = bodyFactory(options.bodyBytes)
    await admin.publishMany(messages, () => body())
    const deadline = now() + scaledMs(60_000, 10)
    while (received < messages && now() < deadline) await sleep(10)
    const deliverAllSeconds = received >= messages ? (now() - deliverStarted) / 1000 : null
    if (deliverAllSeconds === null) log(`streams: only ${received} of ${messages} arrived within ${Math.round((deadline - deliverStarted) / 1000)} s`)
    // Duplicates would show up late: give them a moment.
    await sleep(500)

    const beforeCancel = await proxy.procStatus()
    log("streams: cancelling every call")
    const cancelStarted = now()
    cancelling = true
    for (const call of calls) call.cancel()
    let cancelToZeroConsumersMs: number | null = null
    let leftInQueue: number | null = null
    try {
      const { elapsedMs, state } = await admin.waitQueue(names.schemas, (s) => s.consumerCount === 0, scaledMs(60_000, 10), 0)
      cancelToZeroConsumersMs = elapsedMs
      leftInQueue = state.messageCount
    } catch (error) {
      log(`streams: ${String(error)}`)
    }
    // Channels as the broker sees them; rabbitmqctl takes ~0.4 s per call.
    let channelsAfterCancel: BrokerConnectionInfo | null = null
    let channelsZeroAfterMs: number | null = null
    let channelsChecks = 0
    const channelsDeadline = now() + scaledMs(20_000, 5)
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
    // VmHWM is the kernel's own peak; the sampler's maximum is a lower bound of it.
    const proxyRssPeak = Math.max(finalStatus?.rssPeak ?? 0, beforeCancel?.rss ?? 0, resources.rssMax) || null
    const proxyRssIdle = idleStatus?.rss ?? null
    return {
      streams,
      messages,
      grpcChannels,
      channelsIdle,
      channelsOpen,
      channelsAfterCancel,
      channelsZeroAfterMs,
      channelsChecks,
      startCallsSeconds,
      openAllSeconds,
      consumersOpen,
      deliverAllSeconds,
      received,
      duplicates,
      streamsWithMessages: perStream.filter((n) => n > 0).length,
      maxPerStream: perStream.reduce((a, b) => Math.max(a, b), 0),
      streamErrors,
      firstStreamError,
      cancelToZeroConsumersMs,
      leftInQueue,
      proxyRssIdle,
      proxyRssPeak,
      proxyRssPerStream: proxyRssPeak !== null && proxyRssIdle !== null ? (proxyRssPeak - proxyRssIdle) / streams : null,
      proxyHeapUsedPeak: resources.heapUsedMax,
      proxyLoopDelayMaxMs: resources.loopDelayMaxMs,
      proxyLogLinesPerStream: (proxy.logLines - logLinesBefore) / streams
    }
  } finally {
    cancelling = true
    for (const call of calls) call.cancel()
    await sampler.stop()
    for (const client of clients) client.close()
  }
}
