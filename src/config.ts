/**
 * Configuration: every environment variable of the contract plus the proxy's own knobs, each read
 * through the ambient `ConfigProvider` and validated with `Schema`. An invalid value fails start-up
 * with one line naming the variable and the offending value (never a secret's value).
 */
import { Config, Context, Data, Duration, Effect, Layer, Option, Redacted, Schema } from "effect"

export class ConfigInvalid extends Data.TaggedError("ConfigInvalid")<{
  readonly variable: string
  /** The raw value; undefined for secrets, so it can never reach a log line. */
  readonly value: string | undefined
  readonly expected: string
}> {
  override get message(): string {
    return this.value === undefined
      ? `invalid configuration: ${this.variable} (value not shown: it may hold a secret): expected ${this.expected}`
      : `invalid configuration: ${this.variable}=${JSON.stringify(this.value)}: expected ${this.expected}`
  }
}

export const ExchangeTypes = ["topic", "direct", "fanout", "headers"] as const
export type ExchangeType = (typeof ExchangeTypes)[number]

/** RabbitMQ queue types the proxy declares (`x-queue-type`); classic declares with no arguments. */
export const QueueTypes = ["classic", "quorum"] as const
export type QueueType = (typeof QueueTypes)[number]

/**
 * OpenTelemetry's sampler (`OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`): `always_on`,
 * `always_off`, `traceidratio`, or one of them `parentbased_` (the default, parentbased_always_on:
 * follow the caller's sampled flag, decide alone for a trace that starts here).
 */
export interface TraceSampler {
  readonly root: "always_on" | "always_off" | "traceidratio"
  readonly parentBased: boolean
  /** For traceidratio: the share of traces kept, 0 to 1. */
  readonly ratio: number
}

/** OTEL_RESOURCE_ATTRIBUTES values are percent-encoded; a malformed one is taken as written. */
const decodedOrAsIs = (value: string): string => {
  try {
    return decodeURIComponent(value)
  } catch {
    return value
  }
}

/** A token bucket: `perSecond` refill, `burst` capacity. */
export interface RateLimit {
  readonly variable: string
  readonly perSecond: number
  readonly burst: number
}

/** `100/s`, or `100/s:200` with a burst of 200 (the burst defaults to one second's worth). */
const parseRate = (variable: string) => (raw: string): Parsed<RateLimit> => {
  const match = /^\s*(\d+(?:\.\d+)?)\s*\/\s*s\s*(?::\s*(\d+)\s*)?$/.exec(raw)
  const perSecond = Number(match?.[1])
  const burst = match?.[2] === undefined ? Math.max(1, Math.ceil(perSecond)) : Number(match[2])
  return match === null || !(perSecond > 0) || !(burst >= 1)
    ? { expected: "a rate as <n>/s, optionally :<burst>, e.g. 100/s or 100/s:200" }
    : { value: { variable, perSecond, burst } }
}

const samplers = ["always_on", "always_off", "traceidratio", "parentbased_always_on", "parentbased_always_off", "parentbased_traceidratio"] as const

/** One RabbitMQ node of the cluster (AMQP listener). */
export interface BrokerNode {
  readonly host: string
  readonly port: number
}

/** A queue of the contract with the routing key that binds it to the exchange. */
export interface QueueBinding {
  readonly queue: string
  readonly routingKey: string
}

/** Paths of PEM files; read (and checked) when the server or connection starts. */
export interface TlsFiles {
  readonly certPath: string
  readonly keyPath: string
  readonly caPath?: string | undefined
}

export const Scopes = ["params", "consume", "publish", "admin"] as const
/** params: GetMessagingParams + routing keys; consume: streams + subscriptions; publish; admin: all. */
export type Scope = (typeof Scopes)[number]

/** An API key, configured by the SHA-256 of its value (never the value itself). */
export interface ApiKey {
  readonly name: string
  readonly sha256: Buffer
  readonly scopes: ReadonlySet<Scope>
}

/** With mutual TLS, a client certificate whose subject CN is `commonName` stands for a key. */
export interface CertificateIdentity {
  readonly commonName: string
  readonly scopes: ReadonlySet<Scope>
}

export interface ProxySettings {
  readonly grpc: {
    readonly host: string
    readonly port: number
    /** How long SIGTERM waits for open calls to end before forcing the server down. */
    readonly shutdownTimeout: Duration.Duration
    /** Off, server TLS, or mutual TLS when a CA for client certificates is given. */
    readonly tls: Option.Option<TlsFiles>
    readonly maxMessageBytes: number
    /**
     * The largest message the proxy's clients accept (their max receive message length; gRPC
     * libraries default to 4 MiB). Larger messages are dead-lettered, never sent.
     */
    readonly clientMaxReceiveMessageBytes: number
    /**
     * Bytes a client may hold unread beyond its HTTP/2 stream window (bytes it returned window
     * for before its application read them), on top of 17 of its largest messages. With the peer's
     * window it bounds what a contract stream has written that the client may not have read
     * (readAhead.ts).
     */
    readonly clientReadAheadBytes: number
    readonly keepaliveTimeSeconds: number
    readonly keepaliveTimeoutSeconds: number
    readonly maxConcurrentStreamsPerConnection: number
  }
  readonly limits: {
    /** Open streams and subscriptions over all callers. */
    readonly maxStreamsTotal: number
    /** Open streams and subscriptions of one caller (API key, certificate, or peer address). */
    readonly maxStreamsPerCaller: number
    /** The largest max_in_flight a subscription may ask for. */
    readonly maxInFlight: number
    /**
     * How long a contract stream with nothing more to write keeps messages it cannot show were
     * read unacked before acking them anyway (streaming.ts).
     */
    readonly quietStreamAckAfter: Duration.Duration
  }
  readonly auth: {
    readonly apiKeys: ReadonlyArray<ApiKey>
    readonly certificateIdentities: ReadonlyArray<CertificateIdentity>
  }
  readonly metrics: Option.Option<{ readonly host: string; readonly port: number }>
  /**
   * OpenTelemetry traces over OTLP/HTTP: on when `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
   * `OTEL_EXPORTER_OTLP_ENDPOINT` is set (and `OTEL_SDK_DISABLED` is not true, and
   * `OTEL_TRACES_EXPORTER` is unset or includes `otlp`); None otherwise. The exporter reads the
   * endpoint, headers, `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` itself (tracing.ts).
   */
  readonly tracing: Option.Option<{
    readonly sampler: TraceSampler
    /** `OTEL_SERVICE_NAME`, else `service.name` in `OTEL_RESOURCE_ATTRIBUTES`, else messaging-proxy. */
    readonly serviceName: string
  }>
  /**
   * Rate limits per caller (API key, certificate, or client address when open), token buckets:
   * `publish` for the messages of Publish/PublishBatch (MESSAGING_PUBLISH_RATE), `calls` for the
   * calls a caller opens (MESSAGING_CALL_RATE); in Redis when MESSAGING_RATE_LIMIT_REDIS_URL is set
   * (one limit across replicas), in memory otherwise.
   */
  readonly rateLimits: {
    readonly publish: Option.Option<RateLimit>
    readonly calls: Option.Option<RateLimit>
    readonly redisUrl: Option.Option<Redacted.Redacted<string>>
  }
  readonly debug: boolean
  /** Requeues (nacks, lost consumers) after which a message is dead-lettered instead. */
  readonly maxRequeues: number
  readonly subscriptions: {
    /** The ack deadline of a subscription whose `open` states none. */
    readonly ackDeadline: Duration.Duration
    /** The longest ack deadline or lease extension a subscription may ask for. */
    readonly maxAckDeadline: Duration.Duration
    /**
     * The broker's consumer timeout (RabbitMQ's default 30 min): leases stay below it, and
     * consumers ask for more with `x-consumer-timeout` (RabbitMQ 3.12+).
     */
    readonly brokerConsumerTimeout: Duration.Duration
    /** Delay tiers of `nack_delayed`, ascending: a delay rounds up to the next one. */
    readonly retryDelays: ReadonlyArray<Duration.Duration>
    /**
     * MESSAGING_NACK_BACKOFF: when set, a plain `nack` is delayed too, by `first` × `factor` to the
     * power of the requeues so far (through the same delay tiers).
     */
    readonly nackBackoff: Option.Option<{ readonly first: Duration.Duration; readonly factor: number }>
  }
  readonly rabbit: {
    /** The first configured node: what GetMessagingParams hands out as `host`/`port`. */
    readonly host: string
    readonly port: number
    /** Every configured node (RABBITMQ_HOSTS, else the one RABBITMQ_HOST:RABBITMQ_PORT), in order. */
    readonly nodes: ReadonlyArray<BrokerNode>
    readonly queueType: QueueType
    readonly vhost: string
    readonly user: string
    readonly password: Redacted.Redacted<string>
    readonly heartbeatSeconds: number
    /** The channel_max the proxy asks for (0 = the broker's); the lower of the two applies. */
    readonly channelMax: number
    readonly connectionName: string
    readonly reconnectMaxDelay: Duration.Duration
    readonly prefetch: number
    readonly tls: Option.Option<Partial<TlsFiles> & { readonly enabled: true }>
    readonly exchange: string
    readonly exchangeType: ExchangeType
    readonly deadLetterSuffix: string
    readonly schemas: QueueBinding
    readonly validations: QueueBinding
    readonly schemaResults: QueueBinding
    readonly validationResults: QueueBinding
  }
}

const Port = Schema.NumberFromString.check(Schema.isInt(), Schema.isBetween({ minimum: 1, maximum: 65535 }))
/** 0 lets the system pick a free port (used by tests); the bound port is logged. */
const ListenPort = Schema.NumberFromString.check(Schema.isInt(), Schema.isBetween({ minimum: 0, maximum: 65535 }))
const PositiveInt = (maximum: number) =>
  Schema.NumberFromString.check(Schema.isInt(), Schema.isBetween({ minimum: 1, maximum }))
const NonNegativeInt = Schema.NumberFromString.check(Schema.isInt(), Schema.isGreaterThanOrEqualTo(0))
const Name = Schema.String.check(Schema.isTrimmed(), Schema.isNonEmpty())

/** Reads one variable; absent means the default, present means it must decode. */
const setting = <A>(
  variable: string,
  schema: Schema.Decoder<A>,
  expected: string,
  fallback: A,
  secret = false
): Effect.Effect<A, ConfigInvalid | Config.ConfigError> =>
  Effect.flatMap(Config.option(Config.String(variable)), (raw) =>
    Option.match(raw, {
      onNone: () => Effect.succeed(fallback),
      onSome: (value) =>
        Schema.decodeUnknownEffect(schema)(value).pipe(
          Effect.mapError(() => new ConfigInvalid({ variable, value: secret ? undefined : value, expected }))
        )
    }))

/** A parse: the value, or what was expected (for a secret-bearing variable, also where it failed, never what it held). */
type Parsed<A> = { readonly value: A } | { readonly expected: string }

/** A variable whose value is parsed by hand; `parse` returns the value or what was expected. */
const parsed = <A>(
  variable: string,
  fallback: A,
  parse: (raw: string) => Parsed<A>,
  /** Its value may hold a secret (a key pasted where a hash belongs): never echo it. */
  secret = false
): Effect.Effect<A, ConfigInvalid | Config.ConfigError> =>
  Effect.flatMap(Config.option(Config.String(variable)), (raw) => {
    if (Option.isNone(raw) || raw.value.trim() === "") return Effect.succeed(fallback)
    const result = parse(raw.value)
    return "value" in result
      ? Effect.succeed(result.value)
      : Effect.fail(new ConfigInvalid({ variable, value: secret ? undefined : raw.value, expected: result.expected }))
  })

/** 1s, 5s, 30s, 2m, 10m, 1h. */
const defaultRetryDelays: ReadonlyArray<Duration.Duration> = [1_000, 5_000, 30_000, 120_000, 600_000, 3_600_000]
  .map((ms) => Duration.millis(ms))

const delayUnits: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 }

/** `1s,5s,30s,2m,10m,1h`: whole numbers with a unit (ms, s, m, h), strictly ascending. */
const parseRetryDelays = (raw: string): Parsed<ReadonlyArray<Duration.Duration>> => {
  const expected = "comma-separated delays with a unit (ms, s, m, h), ascending, e.g. 1s,5s,30s,2m"
  const millis: Array<number> = []
  for (const part of raw.split(",").map((p) => p.trim())) {
    const match = /^(\d+)(ms|s|m|h)$/.exec(part)
    if (match === null) return { expected }
    const value = Number(match[1]) * delayUnits[match[2]!]!
    if (value < 1 || (millis.length > 0 && value <= millis[millis.length - 1]!)) return { expected }
    millis.push(value)
  }
  return millis.length === 0 ? { expected } : { value: millis.map((ms) => Duration.millis(ms)) }
}

/** `off`, or a first delay with an optional growth factor: `1s` (always 1 s), `1s*2` (1 s, 2 s, 4 s, …). */
const parseNackBackoff = (
  raw: string
): Parsed<Option.Option<{ readonly first: Duration.Duration; readonly factor: number }>> => {
  if (raw.trim() === "off") return { value: Option.none() }
  const match = /^(\d+)(ms|s|m|h)(?:\*(\d+(?:\.\d+)?))?$/.exec(raw.trim())
  const factor = match?.[3] === undefined ? 1 : Number(match[3])
  if (match === null || Number(match[1]) < 1 || factor < 1) {
    return { expected: "off, or a first delay with a unit and an optional factor of at least 1, e.g. 1s*2" }
  }
  return { value: Option.some({ first: Duration.millis(Number(match[1]) * delayUnits[match[2]!]!), factor }) }
}

const parseScopes = (raw: string): ReadonlySet<Scope> | undefined => {
  const scopes = raw.split("+").map((s) => s.trim())
  return scopes.length > 0 && scopes.every((s): s is Scope => (Scopes as ReadonlyArray<string>).includes(s))
    ? new Set(scopes)
    : undefined
}

const entries = (raw: string) => raw.split(",").map((e) => e.trim()).filter((e) => e !== "")

const apiKeysExpected = "comma-separated name:sha256-hex:scope[+scope…] entries, scopes from " + Scopes.join(", ")
/**
 * `name:sha256-hex:scope[+scope…]` entries. A bad entry is described by its position and the part
 * that is wrong, never by its text: someone may have pasted a key where its hash belongs.
 */
const parseApiKeys = (raw: string): Parsed<ReadonlyArray<ApiKey>> => {
  const keys: Array<ApiKey> = []
  const all = entries(raw)
  for (const [index, entry] of all.entries()) {
    const fields = entry.split(":")
    const [name, hash, scopeList] = fields
    const scopes = parseScopes(scopeList ?? "")
    const problem = fields.length !== 3
      ? `it has ${fields.length} ':'-separated field${fields.length === 1 ? "" : "s"}, not 3`
      : !name
      ? "its name is empty"
      : !hash || !/^[0-9a-fA-F]{64}$/.test(hash)
      ? `its second field is not a SHA-256 digest in hex (64 hex digits; it has ${hash?.length ?? 0} characters)`
      : !scopes
      ? `its scopes are not from ${Scopes.join(", ")}`
      : undefined
    if (problem !== undefined) return { expected: `${apiKeysExpected} (entry ${index + 1} of ${all.length}: ${problem})` }
    keys.push({ name: name!, sha256: Buffer.from(hash!, "hex"), scopes: scopes! })
  }
  return { value: keys }
}

const identitiesExpected = "comma-separated certificate-CN:scope[+scope…] entries, scopes from " + Scopes.join(", ")
const parseIdentities = (raw: string): Parsed<ReadonlyArray<CertificateIdentity>> => {
  const identities: Array<CertificateIdentity> = []
  for (const entry of entries(raw)) {
    const separator = entry.lastIndexOf(":")
    const scopes = parseScopes(entry.slice(separator + 1))
    const commonName = entry.slice(0, separator).trim()
    if (separator <= 0 || !scopes || commonName === "") return { expected: identitiesExpected }
    identities.push({ commonName, scopes })
  }
  return { value: identities }
}

const hostsExpected = "comma-separated host[:port] entries (IPv6 as [address]:port), ports 1-65535"
/** RABBITMQ_HOSTS: `a:5672,b,[::1]:5673`; a node without a port takes `defaultPort`. */
export const parseHosts = (raw: string, defaultPort: number): Parsed<ReadonlyArray<BrokerNode>> => {
  const nodes: Array<BrokerNode> = []
  for (const entry of entries(raw)) {
    const match = /^(?:\[([^\]]+)\]|([^:[\]\s]+))(?::(\d{1,5}))?$/.exec(entry)
    const host = match?.[1] ?? match?.[2]
    const port = match?.[3] === undefined ? defaultPort : Number(match[3])
    if (host === undefined || !Number.isInteger(port) || port < 1 || port > 65535) return { expected: hostsExpected }
    nodes.push({ host, port })
  }
  return nodes.length > 0 ? { value: nodes } : { expected: hostsExpected }
}

/** A variable's text, undefined when unset or blank. */
const optionalText = (variable: string, expected: string) =>
  setting(variable, Schema.String, expected, "").pipe(Effect.map((p) => p.trim() === "" ? undefined : p))

const optionalPath = (variable: string) => optionalText(variable, "a file path")

const bool = (variable: string, fallback: boolean) =>
  setting(variable, Schema.Literals(["true", "false", "1", "0", "yes", "no"]), "true or false", fallback ? "true" : "false")
    .pipe(Effect.map((v) => v === "true" || v === "1" || v === "yes"))

const seconds = (variable: string, fallback: number, maximum: number) =>
  setting(variable, Schema.NumberFromString.check(Schema.isFinite(), Schema.isBetween({ minimum: 0, maximum })),
    `a number of seconds between 0 and ${maximum}`, fallback)

const name = (variable: string, fallback: string) => setting(variable, Name, "a non-empty name without surrounding spaces", fallback)

const binding = (queueVar: string, queueDefault: string, keyVar: string, keyDefault: string) =>
  Effect.all({ queue: name(queueVar, queueDefault), routingKey: name(keyVar, keyDefault) })

export const loadSettings: Effect.Effect<ProxySettings, ConfigInvalid | Config.ConfigError> = Effect.gen(function*() {
  const grpc = yield* Effect.all({
    host: name("MESSAGING_CONNECTION_HOST", "localhost"),
    port: setting("MESSAGING_CONNECTION_PORT", ListenPort, "a port number between 0 and 65535", 50055),
    shutdownTimeout: seconds("MESSAGING_SHUTDOWN_TIMEOUT_SECONDS", 10, 3600).pipe(Effect.map(Duration.seconds)),
    tls: Effect.gen(function*() {
      const enabled = yield* bool("GRPC_TLS_ENABLED", false)
      const certPath = yield* optionalPath("GRPC_TLS_CERT_PATH")
      const keyPath = yield* optionalPath("GRPC_TLS_KEY_PATH")
      const caPath = yield* optionalPath("GRPC_TLS_CA_PATH")
      if (!enabled) return Option.none<TlsFiles>()
      if (certPath === undefined) {
        return yield* new ConfigInvalid({ variable: "GRPC_TLS_CERT_PATH", value: "", expected: "a certificate file when GRPC_TLS_ENABLED=true" })
      }
      if (keyPath === undefined) {
        return yield* new ConfigInvalid({ variable: "GRPC_TLS_KEY_PATH", value: "", expected: "a key file when GRPC_TLS_ENABLED=true" })
      }
      return Option.some<TlsFiles>({ certPath, keyPath, caPath })
    }),
    // At least 256: a delivery's envelope and a settle_error need room besides the message.
    maxMessageBytes: setting(
      "GRPC_MAX_MESSAGE_BYTES",
      Schema.NumberFromString.check(Schema.isInt(), Schema.isBetween({ minimum: 256, maximum: 1024 * 1024 * 1024 })),
      "a number of bytes between 256 and 1 GiB",
      16 * 1024 * 1024
    ),
    // grpcio, grpc-js, grpc-go, grpcurl and buf all refuse a received message over 4 MiB unless
    // told otherwise (grpc's GRPC_DEFAULT_MAX_RECV_MESSAGE_LENGTH).
    clientMaxReceiveMessageBytes: setting(
      "GRPC_CLIENT_MAX_RECEIVE_MESSAGE_BYTES",
      Schema.NumberFromString.check(Schema.isInt(), Schema.isBetween({ minimum: 256, maximum: 1024 * 1024 * 1024 })),
      "a number of bytes between 256 and 1 GiB",
      4 * 1024 * 1024
    ),
    // Measured (README, "Delivery guarantee"): grpcio with BDP probing holds up to 1.2 MB past its
    // 4 MiB window, grpcio without it and grpc-js a few KB.
    clientReadAheadBytes: setting(
      "GRPC_CLIENT_READ_AHEAD_BYTES",
      Schema.NumberFromString.check(Schema.isInt(), Schema.isBetween({ minimum: 0, maximum: 1024 * 1024 * 1024 })),
      "a number of bytes between 0 and 1 GiB",
      2 * 1024 * 1024
    ),
    keepaliveTimeSeconds: setting("GRPC_KEEPALIVE_TIME_SECONDS", PositiveInt(86_400), "a whole number of seconds", 30),
    keepaliveTimeoutSeconds: setting("GRPC_KEEPALIVE_TIMEOUT_SECONDS", PositiveInt(3600), "a whole number of seconds", 10),
    maxConcurrentStreamsPerConnection: setting(
      "GRPC_MAX_CONCURRENT_STREAMS_PER_CONNECTION", PositiveInt(1_000_000), "a whole number of streams", 1000
    )
  })
  const limits = yield* Effect.all({
    // Each stream has its own AMQP channel; the consumer connection pool grows past one
    // connection's channel_max (broker/pool.ts), so this bounds memory, not channels.
    maxStreamsTotal: setting("MESSAGING_MAX_STREAMS_TOTAL", PositiveInt(1_000_000), "a whole number of streams", 10_000),
    maxInFlight: setting("MESSAGING_MAX_IN_FLIGHT", PositiveInt(65_535), "a whole number between 1 and 65535", 1024),
    maxStreamsPerCaller: setting("MESSAGING_MAX_STREAMS_PER_CALLER", PositiveInt(1_000_000), "a whole number of streams", 1000),
    // Well below RabbitMQ's default consumer timeout (30 min), which would close the channel.
    quietStreamAckAfter: seconds("MESSAGING_QUIET_STREAM_ACK_SECONDS", 300, 86_400).pipe(Effect.map(Duration.seconds))
  })
  const auth = yield* Effect.all({
    apiKeys: parsed("MESSAGING_API_KEYS", [] as ReadonlyArray<ApiKey>, parseApiKeys, true),
    certificateIdentities: parsed("MESSAGING_TLS_CLIENT_IDENTITIES", [] as ReadonlyArray<CertificateIdentity>, parseIdentities)
  })
  const metrics = yield* Effect.gen(function*() {
    const enabled = yield* bool("METRICS_ENABLED", true)
    const host = yield* name("METRICS_HOST", "localhost")
    const port = yield* setting("METRICS_PORT", ListenPort, "a port number between 0 and 65535", 9464)
    return enabled ? Option.some({ host, port }) : Option.none()
  })
  const tracing = yield* Effect.gen(function*() {
    const endpoint = (yield* optionalText("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "a URL")) ??
      (yield* optionalText("OTEL_EXPORTER_OTLP_ENDPOINT", "a URL"))
    const disabled = yield* bool("OTEL_SDK_DISABLED", false)
    const exporters = (yield* setting("OTEL_TRACES_EXPORTER", Schema.String, "a list of exporters", "otlp")).split(",").map((e) => e.trim())
    const kind = yield* setting("OTEL_TRACES_SAMPLER", Schema.Literals(samplers), `one of ${samplers.join(", ")}`, "parentbased_always_on")
    const ratio = yield* setting(
      "OTEL_TRACES_SAMPLER_ARG",
      Schema.NumberFromString.check(Schema.isBetween({ minimum: 0, maximum: 1 })),
      "a ratio between 0 and 1",
      1
    )
    const explicitName = (yield* optionalText("OTEL_SERVICE_NAME", "a service name"))?.trim()
    const attributes = yield* setting("OTEL_RESOURCE_ATTRIBUTES", Schema.String, "key=value pairs", "")
    const attributeName = /(?:^|,)\s*service\.name\s*=\s*([^,]+)/.exec(attributes)?.[1]?.trim()
    const serviceName = explicitName || (attributeName ? decodedOrAsIs(attributeName) : "messaging-proxy")
    if (endpoint === undefined || disabled || !exporters.includes("otlp")) return Option.none()
    const sampler: TraceSampler = {
      root: kind.replace("parentbased_", "") as TraceSampler["root"],
      parentBased: kind.startsWith("parentbased_"),
      ratio
    }
    return Option.some({ sampler, serviceName })
  })
  const rateLimits = yield* Effect.gen(function*() {
    const publish = yield* parsed("MESSAGING_PUBLISH_RATE", undefined as RateLimit | undefined, parseRate("MESSAGING_PUBLISH_RATE"))
    const calls = yield* parsed("MESSAGING_CALL_RATE", undefined as RateLimit | undefined, parseRate("MESSAGING_CALL_RATE"))
    // A URL may hold a password: held as Redacted, and never echoed.
    const redisUrl = yield* Config.option(Config.Redacted("MESSAGING_RATE_LIMIT_REDIS_URL"))
    return {
      publish: Option.fromNullishOr(publish),
      calls: Option.fromNullishOr(calls),
      redisUrl: Option.filter(redisUrl, (url) => Redacted.value(url).trim() !== "")
    }
  })
  const debug = yield* bool("MESSAGING_CONNECTION_DEBUG", false)
  const maxRequeues = yield* setting("MESSAGING_MAX_REQUEUES", NonNegativeInt, "a whole number (0 = never requeue)", 5)
  const subscriptions = yield* Effect.gen(function*() {
    const brokerConsumerTimeout = yield* seconds("RABBITMQ_CONSUMER_TIMEOUT_SECONDS", 1800, 604_800)
    const maxAckDeadline = yield* seconds("MESSAGING_MAX_ACK_DEADLINE_SECONDS", Math.min(1500, brokerConsumerTimeout), 604_800)
    const ackDeadline = yield* seconds("MESSAGING_ACK_DEADLINE_SECONDS", Math.min(600, maxAckDeadline), 604_800)
    // A lease the broker would cut short is no lease: keep every deadline below its timeout.
    if (maxAckDeadline >= brokerConsumerTimeout) {
      return yield* new ConfigInvalid({
        variable: "MESSAGING_MAX_ACK_DEADLINE_SECONDS",
        value: String(maxAckDeadline),
        expected: `fewer seconds than RABBITMQ_CONSUMER_TIMEOUT_SECONDS (${brokerConsumerTimeout})`
      })
    }
    if (ackDeadline < 1 || ackDeadline > maxAckDeadline) {
      return yield* new ConfigInvalid({
        variable: "MESSAGING_ACK_DEADLINE_SECONDS",
        value: String(ackDeadline),
        expected: `between 1 and MESSAGING_MAX_ACK_DEADLINE_SECONDS (${maxAckDeadline})`
      })
    }
    const retryDelays = yield* parsed("MESSAGING_RETRY_DELAYS", defaultRetryDelays, parseRetryDelays)
    const nackBackoff = yield* parsed("MESSAGING_NACK_BACKOFF", Option.none(), parseNackBackoff)
    return {
      nackBackoff,
      ackDeadline: Duration.seconds(ackDeadline),
      maxAckDeadline: Duration.seconds(maxAckDeadline),
      brokerConsumerTimeout: Duration.seconds(brokerConsumerTimeout),
      retryDelays
    }
  })
  const host = yield* name("RABBITMQ_HOST", "localhost")
  const port = yield* setting("RABBITMQ_PORT", Port, "a port number between 1 and 65535", 5672)
  const nodes = yield* parsed("RABBITMQ_HOSTS", [{ host, port }] as ReadonlyArray<BrokerNode>, (raw) => parseHosts(raw, port))
  const rabbit = yield* Effect.all({
    host: Effect.succeed(nodes[0]!.host),
    port: Effect.succeed(nodes[0]!.port),
    nodes: Effect.succeed(nodes),
    queueType: setting("RABBITMQ_QUEUE_TYPE", Schema.Literals(QueueTypes), `one of ${QueueTypes.join(", ")}`, "classic"),
    vhost: setting("RABBITMQ_VHOST", Schema.String.check(Schema.isNonEmpty()), "a non-empty virtual host", "/"),
    user: name("RABBITMQ_USER", "guest"),
    password: setting("RABBITMQ_PASSWORD", Schema.String, "a string", "guest", true).pipe(Effect.map(Redacted.make)),
    heartbeatSeconds: setting("RABBITMQ_HEARTBEAT_SECONDS", NonNegativeInt, "a whole number of seconds (0 disables)", 15),
    channelMax: setting(
      "RABBITMQ_CHANNEL_MAX",
      Schema.NumberFromString.check(Schema.isInt(), Schema.isBetween({ minimum: 0, maximum: 65535 })),
      "a whole number of channels between 0 (the broker's limit) and 65535",
      0
    ),
    connectionName: name("RABBITMQ_CONNECTION_NAME", "messaging-proxy"),
    reconnectMaxDelay: seconds("RABBITMQ_RECONNECT_MAX_DELAY_SECONDS", 30, 3600).pipe(Effect.map(Duration.seconds)),
    prefetch: setting("RABBITMQ_PREFETCH", PositiveInt(65535), "a whole number between 1 and 65535", 32),
    tls: Effect.gen(function*() {
      const enabled = yield* bool("RABBITMQ_TLS_ENABLED", false)
      const caPath = yield* optionalPath("RABBITMQ_TLS_CA_PATH")
      const certPath = yield* optionalPath("RABBITMQ_TLS_CERT_PATH")
      const keyPath = yield* optionalPath("RABBITMQ_TLS_KEY_PATH")
      if (!enabled) return Option.none()
      if ((certPath === undefined) !== (keyPath === undefined)) {
        return yield* new ConfigInvalid({
          variable: certPath === undefined ? "RABBITMQ_TLS_CERT_PATH" : "RABBITMQ_TLS_KEY_PATH",
          value: "",
          expected: "both RABBITMQ_TLS_CERT_PATH and RABBITMQ_TLS_KEY_PATH, or neither"
        })
      }
      return Option.some({ enabled: true as const, caPath, certPath, keyPath })
    }),
    exchange: name("RABBITMQ_EXCHANGE", "typechecking.exchange"),
    exchangeType: setting("RABBITMQ_EXCHANGE_TYPE", Schema.Literals(ExchangeTypes), `one of ${ExchangeTypes.join(", ")}`, "topic"),
    deadLetterSuffix: name("RABBITMQ_DEAD_LETTER_SUFFIX", ".dead"),
    schemas: binding("RABBITMQ_QUEUE_SCHEMAS", "typechecking.schemas.queue", "RABBITMQ_ROUTING_KEY_SCHEMAS", "schemas.*"),
    validations: binding(
      "RABBITMQ_QUEUE_VALIDATIONS", "typechecking.validations.queue",
      "RABBITMQ_ROUTING_KEY_VALIDATIONS", "validation.*"
    ),
    schemaResults: binding(
      "RABBITMQ_QUEUE_RESULTS_SCHEMAS", "typechecking.schemas.results.queue",
      "RABBITMQ_ROUTING_KEY_RESULTS_SCHEMAS", "schemas.result.*"
    ),
    validationResults: binding(
      "RABBITMQ_QUEUE_RESULTS_VALIDATIONS", "typechecking.validation.results.queue",
      "RABBITMQ_ROUTING_KEY_RESULTS_VALIDATIONS", "validation.result.*"
    )
  })
  return { grpc, limits, auth, metrics, tracing, rateLimits, debug, maxRequeues, subscriptions, rabbit }
})

export class ProxyConfig extends Context.Service<ProxyConfig, ProxySettings>()("messaging-proxy/ProxyConfig") {
  /** Reads the ambient ConfigProvider (the process environment by default). */
  static readonly layer = Layer.effect(ProxyConfig, loadSettings)
}

/** The four contract queues, in the order `ExchangeInfo.queues` lists them. */
export const contractQueues = (rabbit: ProxySettings["rabbit"]): ReadonlyArray<QueueBinding> => [
  rabbit.schemas,
  rabbit.validations,
  rabbit.schemaResults,
  rabbit.validationResults
]

export const deadLetterQueue = (rabbit: ProxySettings["rabbit"], queue: string): string => queue + rabbit.deadLetterSuffix
