/**
 * Phase "publish": N ~1 KiB schema bodies published (a) directly by amqplib on a confirm channel,
 * with up to 64 publishes awaiting their confirm (what PublishBatch keeps in flight), and (b)
 * through the proxy in PublishBatch calls of `batchSize`; alternating a, b, a, b, …; the queue is
 * emptied before each run; medians reported. The ratio b/a is issue 14's target (≥ 0.8).
 */
import type * as amqp from "amqplib"
import * as grpc from "@grpc/grpc-js"
import { MessageKind, type MessagingServiceClient } from "../gen/messaging.js"
import { type Admin, connect } from "./broker.js"
import { makeClient } from "./drains.js"
import { type CpuWindow, perMessage, startCpuWindow } from "./cpuWindow.js"
import type { ProxyChild } from "./proxyProcess.js"
import { bodyFactory } from "./throughput.js"
import { log, median, now } from "./util.js"

/** Publishes awaiting their confirm at once, as PublishBatch's window (src/publishBatch.ts). */
const WINDOW = 64

export interface PublishRun {
  readonly mode: "direct" | "proxy"
  readonly repetition: number
  readonly msgPerSec: number
  /** The machine during the run, and each process's CPU per message published (µs). */
  readonly window: CpuWindow
  readonly cpuUsPerMsg: ReturnType<typeof perMessage>
}

export interface PublishResult {
  readonly messages: number
  readonly batchSize: number
  readonly runs: ReadonlyArray<PublishRun>
  readonly medianMsgPerSec: { readonly direct: number | null; readonly proxy: number | null }
  readonly ratio: number | null
}

const publishDirect = async (channel: amqp.ConfirmChannel, exchange: string, routingKey: string, messages: number, body: () => { content: Buffer; messageId: string }) => {
  let inFlight = 0
  let sent = 0
  let confirmed = 0
  await new Promise<void>((resolve, reject) => {
    const pump = () => {
      while (inFlight < WINDOW && sent < messages) {
        const { content, messageId } = body()
        sent++
        inFlight++
        channel.publish(exchange, routingKey, content, { persistent: true, mandatory: true, messageId, contentType: "application/json" }, (error: unknown) => {
          if (error != null) return reject(new Error(`publish nacked: ${String(error)}`))
          inFlight--
          if (++confirmed === messages) resolve()
          else pump()
        })
      }
    }
    pump()
  })
}

const publishBatches = async (client: MessagingServiceClient, messages: number, batchSize: number, body: () => { content: Buffer; messageId: string }) => {
  for (let done = 0; done < messages; done += batchSize) {
    const size = Math.min(batchSize, messages - done)
    await new Promise<void>((resolve, reject) => {
      const call = client.publishBatch((error: grpc.ServiceError | null, response) => {
        if (error !== null) reject(new Error(`PublishBatch: ${grpc.status[error.code]} ${error.details}`))
        else if (response.published !== size) reject(new Error(`PublishBatch published ${response.published} of ${size}`))
        else resolve()
      })
      const write = (i: number): void => {
        for (; i < size; i++) {
          const ok = call.write({ kind: MessageKind.MESSAGE_KIND_SCHEMA, body: body().content, routingKey: "" })
          if (!ok) {
            call.once("drain", () => write(i + 1))
            return
          }
        }
        call.end()
      }
      write(0)
    })
  }
}

export const runPublish = async (options: {
  readonly admin: Admin
  readonly proxy: ProxyChild
  readonly messages: number
  readonly bodyBytes: number
  readonly repetitions: number
  readonly batchSize: number
}): Promise<PublishResult> => {
  const { admin, proxy, messages, batchSize } = options
  const { names } = admin
  const body = bodyFactory(options.bodyBytes)
  const direct = await connect(`bench-publisher ${names.prefix}`)
  const channel = await direct.createConfirmChannel()
  const client = await makeClient(proxy.port)
  const runs: Array<PublishRun> = []
  try {
    for (let repetition = 0; repetition <= options.repetitions; repetition++) {
      for (const mode of ["direct", "proxy"] as const) {
        await admin.freshQueue(names.schemas, names.schemasRoutingKey)
        const started = now()
        const endWindow = await startCpuWindow(proxy.pid)
        if (mode === "direct") await publishDirect(channel, names.exchange, names.schemasRoutingKey, messages, body)
        else await publishBatches(client, messages, batchSize, body)
        const msgPerSec = messages / ((now() - started) / 1000)
        const window = await endWindow()
        // The first round warms both paths up and is not counted.
        if (repetition > 0) runs.push({ mode, repetition, msgPerSec, window, cpuUsPerMsg: perMessage(window, messages) })
        log(`publish ${mode}${repetition === 0 ? " warm-up" : ` #${repetition}`}: ${Math.round(msgPerSec)} msg/s`)
      }
    }
  } finally {
    client.close()
    await direct.close().catch(() => undefined)
  }
  const medianOf = (mode: "direct" | "proxy") => {
    const values = runs.filter((r) => r.mode === mode).map((r) => r.msgPerSec)
    return values.length === 0 ? null : median(values)
  }
  const d = medianOf("direct")
  const p = medianOf("proxy")
  // The median of each repetition's own ratio (as in the throughput phase: a drifting machine moves both).
  const ratios = runs.filter((r) => r.mode === "proxy").flatMap((r) => {
    const base = runs.find((x) => x.mode === "direct" && x.repetition === r.repetition)
    return base === undefined ? [] : [r.msgPerSec / base.msgPerSec]
  })
  return { messages, batchSize, runs, medianMsgPerSec: { direct: d, proxy: p }, ratio: ratios.length === 0 ? null : median(ratios) }
}
