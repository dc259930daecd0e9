/**
 * Phase 4, cancel latency: open one StreamSchemaMessages call, wait until the broker shows its
 * consumer, cancel it, and time until the broker's consumer count is 0 again (checkQueue polled
 * back-to-back on a dedicated channel, so the resolution is one broker round trip). Repeated.
 */
import * as grpc from "@grpc/grpc-js"
import type { SchemaMessageResponse } from "../gen/messaging.js"
import { type Admin, type BrokerConnectionInfo, brokerConnectionInfo } from "./broker.js"
import { makeClient } from "./drains.js"
import type { ProxyChild } from "./proxyProcess.js"
import { type Distribution, distribution, log } from "./util.js"

export interface CancelOptions {
  readonly admin: Admin
  readonly proxy: ProxyChild
  readonly connectionName: string
  readonly cycles: number
}

export interface CancelResult {
  readonly cycles: number
  /** Call start → consumer visible on the broker. */
  readonly openMs: Distribution
  /** call.cancel() → broker consumer count 0. */
  readonly cancelMs: Distribution
  /** One checkQueue round trip (the measurement's resolution). */
  readonly pollRoundTripMs: number
  readonly streamErrors: number
  readonly channelsAfter: BrokerConnectionInfo | null
}

export const runCancel = async (options: CancelOptions): Promise<CancelResult> => {
  const { admin, proxy, cycles } = options
  const { names } = admin
  await admin.freshQueue(names.schemas, names.schemasRoutingKey)
  const client = await makeClient(proxy.port)
  const open: Array<number> = []
  const cancel: Array<number> = []
  let polls = 0
  let polledMs = 0
  let streamErrors = 0
  try {
    for (let i = 0; i < cycles; i++) {
      let cancelling = false
      const call = client.streamSchemaMessages({})
      call.on("data", (_: SchemaMessageResponse) => undefined)
      call.on("error", (error: grpc.ServiceError) => {
        if (!(cancelling && error.code === grpc.status.CANCELLED)) streamErrors++
      })
      const opened = await admin.waitQueue(names.schemas, (s) => s.consumerCount === 1, 10_000, 0)
      open.push(opened.elapsedMs)
      cancelling = true
      call.cancel()
      const closed = await admin.waitQueue(names.schemas, (s) => s.consumerCount === 0, 10_000, 0)
      cancel.push(closed.elapsedMs)
      polls += opened.polls + closed.polls
      polledMs += opened.elapsedMs + closed.elapsedMs
    }
  } finally {
    client.close()
  }
  const channelsAfter = (await brokerConnectionInfo(options.connectionName)) ?? null
  log(`cancel: ${cycles} cycles done`)
  return {
    cycles,
    openMs: distribution(open),
    cancelMs: distribution(cancel),
    pollRoundTripMs: polls ? polledMs / polls : Number.NaN,
    streamErrors,
    channelsAfter
  }
}
