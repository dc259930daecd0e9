/**
 * The benchmark's own side of RabbitMQ: random names, the proxy's environment, an admin
 * connection (confirmed publishing like the API, queue probes, clean-up) and the channels of the
 * proxy's connections as the broker sees them (rabbitmqctl). The broker is the machine's own
 * (RABBITMQ_HOST…, 127.0.0.1:5672) unless an endpoint of the local cluster is passed.
 */
import * as amqp from "amqplib"
import { execFile } from "node:child_process"
import { once } from "node:events"
import { randomBytes } from "node:crypto"
import { delayQueuesOf, namesUnder as testNamesUnder, type TestNames } from "../test/support/harness.js"
import { errorText, now, sleep } from "./util.js"

export interface BenchNames extends TestNames {
  /** A second queue bound like the schemas queue, for the direct consumer of the latency phase. */
  readonly directCopy: string
  /** The routing key the API publishes schema messages with (the binding pattern itself). */
  readonly schemasRoutingKey: string
}

/** The names the tests use (test/support/harness.ts), under `prefix`, plus the benchmark's own copy queue. */
export const namesUnder = (prefix: string): BenchNames => ({
  ...testNamesUnder(prefix),
  directCopy: `${prefix}.direct-copy.queue`,
  schemasRoutingKey: "schemas.*"
})

/** Names under a random `bench.<hex>` prefix. */
export const makeNames = (): BenchNames => namesUnder(`bench.${randomBytes(4).toString("hex")}`)

/** Where the benchmark and the proxy children connect to. */
export interface BrokerEndpoint {
  readonly host: string
  readonly port: number
  readonly user: string
  readonly password: string
  readonly vhost: string
}

/** The machine's broker for both the proxy and the benchmark; the RABBITMQ_* variables, else 127.0.0.1 guest/guest. */
export const brokerSettings = (): BrokerEndpoint => ({
  host: process.env["RABBITMQ_HOST"] ?? "127.0.0.1",
  port: Number(process.env["RABBITMQ_PORT"] ?? "5672"),
  user: process.env["RABBITMQ_USER"] ?? "guest",
  password: process.env["RABBITMQ_PASSWORD"] ?? "guest",
  vhost: process.env["RABBITMQ_VHOST"] ?? "/"
})

/**
 * The environment a deployment would set, pointing a proxy child at the benchmark's names on the
 * machine's broker. RABBITMQ_HOSTS and RABBITMQ_QUEUE_TYPE are always set, so that the children
 * never inherit a cluster or a queue type from the bench's own environment; the quorum phase
 * overrides them.
 */
export const proxyEnv = (names: BenchNames, connectionName: string): Record<string, string> => {
  const broker = brokerSettings()
  return {
    MESSAGING_CONNECTION_HOST: "127.0.0.1",
    MESSAGING_CONNECTION_PORT: "0",
    MESSAGING_CONNECTION_DEBUG: "false",
    RABBITMQ_HOST: broker.host,
    RABBITMQ_PORT: String(broker.port),
    RABBITMQ_HOSTS: `${broker.host.includes(":") ? `[${broker.host}]` : broker.host}:${broker.port}`,
    RABBITMQ_QUEUE_TYPE: "classic",
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

/** A connection of the benchmark's own (the admin, the direct consumers); the machine's broker by default. */
export const connect = async (connectionName: string, broker: BrokerEndpoint = brokerSettings()): Promise<amqp.ChannelModel> => {
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

export interface AdminOptions {
  /** The broker (node) to connect to; the machine's broker by default. */
  readonly endpoint?: BrokerEndpoint
  /** The arguments freshQueue declares a queue with, as the proxy would (none for classic queues). */
  readonly queueArguments?: (queue: string) => Record<string, unknown> | undefined
}

/** The arguments the proxy declares a consumed queue with under RABBITMQ_QUEUE_TYPE=quorum (src/broker/topology.ts). */
export const quorumQueueArguments = (names: BenchNames) => (queue: string): Record<string, unknown> => ({
  "x-queue-type": "quorum",
  ...(queue === names.schemas ? { "x-dead-letter-exchange": "", "x-dead-letter-routing-key": names.schemasDead } : {})
})

export class Admin {
  private probe: amqp.Channel | undefined

  private constructor(
    readonly names: BenchNames,
    readonly connection: amqp.ChannelModel,
    /** A confirm channel, as the API publishes with. */
    readonly publisher: amqp.ConfirmChannel,
    private readonly queueArguments: AdminOptions["queueArguments"]
  ) {}

  static async open(names: BenchNames, options: AdminOptions = {}): Promise<Admin> {
    const connection = await connect(`bench-admin ${names.prefix}`, options.endpoint)
    const publisher = await connection.createConfirmChannel()
    publisher.on("error", () => undefined)
    return new Admin(names, connection, publisher, options.queueArguments)
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

  /**
   * Deletes and re-declares a queue bound like the proxy binds the schemas queue, with the
   * arguments the proxy declares it with (none for a classic queue).
   */
  async freshQueue(queue: string, routingKey: string): Promise<void> {
    const channel = await this.connection.createChannel()
    channel.on("error", () => undefined)
    try {
      await channel.deleteQueue(queue)
      const args = this.queueArguments?.(queue)
      await channel.assertQueue(queue, args === undefined ? { durable: true } : { durable: true, arguments: args })
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

  /**
   * Deletes every queue and the exchange of the run, whoever declared them. A failed delete (a
   * classic queue whose home node is down answers 404) closes its channel: the next one gets a
   * new channel.
   */
  async cleanup(): Promise<Array<string>> {
    const problems: Array<string> = []
    let channel: amqp.Channel | undefined
    let open = false
    const attempt = async (what: string, f: (c: amqp.Channel) => Promise<unknown>) => {
      try {
        if (channel === undefined || !open) {
          const fresh = await this.connection.createChannel()
          fresh.on("error", () => undefined)
          fresh.on("close", () => { if (channel === fresh) open = false })
          channel = fresh
          open = true
        }
        await f(channel)
      } catch (error) {
        problems.push(`${what}: ${errorText(error)}`)
      }
    }
    const n = this.names
    for (const queue of [
      n.schemas, n.validations, n.schemaResults, n.validationResults, n.schemasDead, n.validationsDead, n.directCopy,
      // The proxy's delay queues (nack_delayed), for the default tiers.
      ...delayQueuesOf(n)
    ]) {
      await attempt(`delete ${queue}`, (c) => c.deleteQueue(queue))
    }
    await attempt(`delete ${n.exchange}`, (c) => c.deleteExchange(n.exchange))
    if (open) await channel?.close().catch(() => undefined)
    return problems
  }

  async close(): Promise<void> {
    await this.connection.close().catch(() => undefined)
  }
}

export interface BrokerConnectionInfo {
  /** Connections of the proxy: the one named exactly as asked, and every one named `<name> (…)`. */
  readonly connections: number
  /** Channels open on all of them. */
  readonly channels: number
  /** Each of them by name, with its role: "primary", "publishing" or "consumers N" (a pool member). */
  readonly byName: ReadonlyArray<{ readonly name: string; readonly role: string; readonly channels: number }>
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

/** Whether a connection belongs to the proxy named `connectionName`: the primary, `(publishing)`, `(consumers N)`. */
export const isProxyConnection = (connectionName: string, name: string | undefined): name is string =>
  name !== undefined && (name === connectionName || name.startsWith(`${connectionName} (`))

/**
 * Channels on every connection of the proxy whose RABBITMQ_CONNECTION_NAME is `connectionName`:
 * the primary consumers' connection, the pool's `(consumers N)` members and `(publishing)`.
 */
export const brokerConnectionInfo = async (connectionName: string): Promise<BrokerConnectionInfo | undefined> => {
  const all = await listBrokerConnections()
  if (all === undefined) return undefined
  const mine = all
    .filter((c): c is BrokerConnection & { name: string } => isProxyConnection(connectionName, c.name))
    .map((c) => ({
      name: c.name,
      role: c.name === connectionName ? "primary" : c.name.slice(connectionName.length).trim().replace(/^\((.*)\)$/, "$1"),
      channels: c.channels
    }))
    .sort((a, b) => a.name.localeCompare(b.name, "en", { numeric: true }))
  return { connections: mine.length, channels: mine.reduce((sum, c) => sum + c.channels, 0), byName: mine }
}
