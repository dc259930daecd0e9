/**
 * The benchmark's own side of RabbitMQ: random names, the proxy's environment, an admin
 * connection (confirmed publishing like the API, queue probes, clean-up) and the channel count of
 * the proxy's connection as the broker sees it (rabbitmqctl).
 */
import * as amqp from "amqplib"
import { execFile } from "node:child_process"
import { once } from "node:events"
import { makeNames as makeTestNames, type TestNames } from "../test/support/harness.js"
import { errorText, now, sleep } from "./util.js"

export interface BenchNames extends TestNames {
  /** A second queue bound like the schemas queue, for the direct consumer of the latency phase. */
  readonly directCopy: string
  /** The routing key the API publishes schema messages with (the binding pattern itself). */
  readonly schemasRoutingKey: string
}

/** The tests' names under a `bench.<hex>` prefix, plus the benchmark's own copy queue. */
export const makeNames = (): BenchNames => {
  const names = makeTestNames("bench")
  return { ...names, directCopy: `${names.prefix}.direct-copy.queue`, schemasRoutingKey: "schemas.*" }
}

/** Broker address for both the proxy and the benchmark; the RABBITMQ_* variables, else 127.0.0.1 guest/guest. */
export const brokerSettings = () => ({
  host: process.env["RABBITMQ_HOST"] ?? "127.0.0.1",
  port: Number(process.env["RABBITMQ_PORT"] ?? "5672"),
  user: process.env["RABBITMQ_USER"] ?? "guest",
  password: process.env["RABBITMQ_PASSWORD"] ?? "guest",
  vhost: process.env["RABBITMQ_VHOST"] ?? "/"
})

/** The environment a deployment would set, pointing a proxy child at the benchmark's names. */
export const proxyEnv = (names: BenchNames, connectionName: string): Record<string, string> => {
  const broker = brokerSettings()
  return {
    MESSAGING_CONNECTION_HOST: "127.0.0.1",
    MESSAGING_CONNECTION_PORT: "0",
    MESSAGING_CONNECTION_DEBUG: "false",
    RABBITMQ_HOST: broker.host,
    RABBITMQ_PORT: String(broker.port),
    RABBITMQ_USER: broker.user,
    RABBITMQ_PASSWORD: broker.password,
    RABBITMQ_VHOST: broker.vhost,
    RABBITMQ_EXCHANGE: names.exchange,
    RABBITMQ_QUEUE_SCHEMAS: names.schemas,
    RABBITMQ_QUEUE_VALIDATIONS: names.validations,
    RABBITMQ_QUEUE_RESULTS_SCHEMAS: names.schemaResults,
    RABBITMQ_QUEUE_RESULTS_VALIDATIONS: names.validationResults,
    RABBITMQ_PREFETCH: "32",
    RABBITMQ_CONNECTION_NAME: connectionName,
    // Metrics stay on, as deployed, but on a free port: several proxies may run on this machine.
    METRICS_HOST: "127.0.0.1",
    METRICS_PORT: "0"
  }
}

/** A connection of the benchmark's own (the admin, the direct consumers). */
export const connect = async (connectionName: string): Promise<amqp.ChannelModel> => {
  const broker = brokerSettings()
  const connection = await amqp.connect(
    {
      protocol: "amqp",
      hostname: broker.host,
      port: broker.port,
      username: broker.user,
      password: broker.password,
      vhost: broker.vhost
    },
    { clientProperties: { connection_name: connectionName }, noDelay: true }
  )
  connection.on("error", () => undefined)
  return connection
}

export interface QueueState {
  readonly messageCount: number
  readonly consumerCount: number
}

export class Admin {
  private probe: amqp.Channel | undefined

  private constructor(
    readonly names: BenchNames,
    readonly connection: amqp.ChannelModel,
    /** A confirm channel, as the API publishes with. */
    readonly publisher: amqp.ConfirmChannel
  ) {}

  static async open(names: BenchNames): Promise<Admin> {
    const connection = await connect(`bench-admin ${names.prefix}`)
    const publisher = await connection.createConfirmChannel()
    publisher.on("error", () => undefined)
    return new Admin(names, connection, publisher)
  }

  /** messageCount (ready only) and consumerCount by a passive declare on a dedicated channel. */
  async queueState(queue: string): Promise<QueueState> {
    if (this.probe === undefined) {
      const probe = await this.connection.createChannel()
      probe.on("error", () => undefined)
      // A 404 closes the channel: open a new one next time.
      probe.on("close", () => { if (this.probe === probe) this.probe = undefined })
      this.probe = probe
    }
    const { messageCount, consumerCount } = await this.probe.checkQueue(queue)
    return { messageCount, consumerCount }
  }

  /** Polls as fast as the broker answers until `predicate` holds; returns the state and the time it took. */
  async waitQueue(
    queue: string,
    predicate: (state: QueueState) => boolean,
    timeoutMs: number,
    intervalMs = 0
  ): Promise<{ state: QueueState; elapsedMs: number; polls: number }> {
    const started = now()
    let polls = 0
    for (;;) {
      const state = await this.queueState(queue)
      polls++
      const elapsedMs = now() - started
      if (predicate(state)) return { state, elapsedMs, polls }
      if (elapsedMs > timeoutMs) {
        throw new Error(`queue ${queue}: not as expected after ${timeoutMs} ms (last ${JSON.stringify(state)})`)
      }
      if (intervalMs > 0) await sleep(intervalMs)
    }
  }

  /** Deletes and re-declares a queue bound like the proxy binds the schemas queue (no arguments). */
  async freshQueue(queue: string, routingKey: string): Promise<void> {
    const channel = await this.connection.createChannel()
    channel.on("error", () => undefined)
    try {
      await channel.deleteQueue(queue)
      await channel.assertQueue(queue, { durable: true })
      await channel.bindQueue(queue, this.names.exchange, routingKey)
    } finally {
      await channel.close().catch(() => undefined)
    }
  }

  /** Publishes one body the way the API does: persistent, message_id = id, confirmed. */
  publish(content: Buffer, messageId: string, onConfirm: (error: unknown) => void): boolean {
    return this.publisher.publish(
      this.names.exchange,
      this.names.schemasRoutingKey,
      content,
      { persistent: true, messageId },
      (error: unknown) => onConfirm(error)
    )
  }

  /** Publishes `count` bodies with at most `window` unconfirmed; resolves once all are confirmed. */
  async publishMany(
    count: number,
    body: (index: number) => { readonly content: Buffer; readonly messageId: string },
    window = 2_000
  ): Promise<void> {
    let outstanding = 0
    let failure: unknown
    let wake: (() => void) | undefined
    const onConfirm = (error: unknown) => {
      outstanding--
      if (error != null && failure === undefined) failure = error
      const resume = wake
      wake = undefined
      resume?.()
    }
    for (let i = 0; i < count; i++) {
      if (failure !== undefined) throw new Error(`publish not confirmed: ${errorText(failure)}`)
      while (outstanding >= window) await new Promise<void>((resolve) => { wake = resolve })
      const { content, messageId } = body(i)
      outstanding++
      if (!this.publish(content, messageId, onConfirm)) await once(this.publisher, "drain")
    }
    await this.publisher.waitForConfirms()
    if (failure !== undefined) throw new Error(`publish not confirmed: ${errorText(failure)}`)
  }

  /** Deletes every queue and the exchange of the run, whoever declared them. */
  async cleanup(): Promise<Array<string>> {
    const problems: Array<string> = []
    const channel = await this.connection.createChannel()
    channel.on("error", () => undefined)
    const n = this.names
    for (const queue of [
      n.schemas, n.validations, n.schemaResults, n.validationResults, n.schemasDead, n.validationsDead, n.directCopy
    ]) {
      await channel.deleteQueue(queue).catch((error: unknown) => { problems.push(`delete ${queue}: ${errorText(error)}`) })
    }
    await channel.deleteExchange(n.exchange).catch((error: unknown) => {
      problems.push(`delete ${n.exchange}: ${errorText(error)}`)
    })
    await channel.close().catch(() => undefined)
    return problems
  }

  async close(): Promise<void> {
    await this.connection.close().catch(() => undefined)
  }
}

export interface BrokerConnectionInfo {
  /** Connections whose client-provided name is the one asked for. */
  readonly connections: number
  /** Channels open on them. */
  readonly channels: number
}

export interface BrokerConnection {
  readonly name: string | undefined
  readonly channels: number
}

const isArray = (value: unknown): value is ReadonlyArray<unknown> => Array.isArray(value)

/**
 * Every connection on the broker with its client-provided name and channel count, from
 * `rabbitmqctl list_connections client_properties channels` (~0.4 s a call). Undefined when
 * rabbitmqctl is not usable (BENCH_RABBITMQCTL names another binary).
 */
export const listBrokerConnections = (): Promise<ReadonlyArray<BrokerConnection> | undefined> =>
  new Promise((resolve) => {
    const rabbitmqctl = process.env["BENCH_RABBITMQCTL"] ?? "rabbitmqctl"
    execFile(
      rabbitmqctl,
      ["-q", "list_connections", "client_properties", "channels", "--formatter", "json"],
      { timeout: 15_000, maxBuffer: 16 * 1024 * 1024 },
      (error, stdout) => {
        if (error) return resolve(undefined)
        try {
          const rows: unknown = JSON.parse(stdout)
          if (!isArray(rows)) return resolve(undefined)
          const connections: Array<BrokerConnection> = []
          for (const row of rows) {
            if (typeof row !== "object" || row === null) continue
            const props: unknown = Reflect.get(row, "client_properties")
            const entry = isArray(props) ? props.find((p) => isArray(p) && p[0] === "connection_name") : undefined
            const name: unknown = isArray(entry) ? entry[2] : undefined
            const count: unknown = Reflect.get(row, "channels")
            connections.push({
              name: typeof name === "string" ? name : undefined,
              channels: typeof count === "number" ? count : 0
            })
          }
          resolve(connections)
        } catch {
          resolve(undefined)
        }
      }
    )
  })

/** Channels on the connection(s) named `connectionName` (the proxy's RABBITMQ_CONNECTION_NAME). */
export const brokerConnectionInfo = async (connectionName: string): Promise<BrokerConnectionInfo | undefined> => {
  const all = await listBrokerConnections()
  if (all === undefined) return undefined
  const mine = all.filter((c) => c.name === connectionName)
  return { connections: mine.length, channels: mine.reduce((sum, c) => sum + c.channels, 0) }
}
