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
    const shown = this.value === undefined ? "<redacted>" : JSON.stringify(this.value)
    return `invalid configuration: ${this.variable}=${shown}: expected ${this.expected}`
  }
}

export const ExchangeTypes = ["topic", "direct", "fanout", "headers"] as const
export type ExchangeType = (typeof ExchangeTypes)[number]

/** A queue of the contract with the routing key that binds it to the exchange. */
export interface QueueBinding {
  readonly queue: string
  readonly routingKey: string
}

export interface ProxySettings {
  readonly grpc: {
    readonly host: string
    readonly port: number
    /** How long SIGTERM waits for open calls to end before forcing the server down. */
    readonly shutdownTimeout: Duration.Duration
  }
  readonly debug: boolean
  /** Requeues (nacks, lost consumers) after which a message is dead-lettered instead. */
  readonly maxRequeues: number
  readonly rabbit: {
    readonly host: string
    readonly port: number
    readonly vhost: string
    readonly user: string
    readonly password: Redacted.Redacted<string>
    readonly heartbeatSeconds: number
    readonly connectionName: string
    readonly reconnectMaxDelay: Duration.Duration
    readonly prefetch: number
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
    shutdownTimeout: seconds("MESSAGING_SHUTDOWN_TIMEOUT_SECONDS", 10, 3600).pipe(Effect.map(Duration.seconds))
  })
  const debug = yield* bool("MESSAGING_CONNECTION_DEBUG", false)
  const maxRequeues = yield* setting("MESSAGING_MAX_REQUEUES", NonNegativeInt, "a whole number (0 = never requeue)", 5)
  const rabbit = yield* Effect.all({
    host: name("RABBITMQ_HOST", "localhost"),
    port: setting("RABBITMQ_PORT", Port, "a port number between 1 and 65535", 5672),
    vhost: setting("RABBITMQ_VHOST", Schema.String.check(Schema.isNonEmpty()), "a non-empty virtual host", "/"),
    user: name("RABBITMQ_USER", "guest"),
    password: setting("RABBITMQ_PASSWORD", Schema.String, "a string", "guest", true).pipe(Effect.map(Redacted.make)),
    heartbeatSeconds: setting("RABBITMQ_HEARTBEAT_SECONDS", NonNegativeInt, "a whole number of seconds (0 disables)", 15),
    connectionName: name("RABBITMQ_CONNECTION_NAME", "messaging-proxy"),
    reconnectMaxDelay: seconds("RABBITMQ_RECONNECT_MAX_DELAY_SECONDS", 30, 3600).pipe(Effect.map(Duration.seconds)),
    prefetch: setting("RABBITMQ_PREFETCH", PositiveInt(65535), "a whole number between 1 and 65535", 32),
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
  return { grpc, debug, maxRequeues, rabbit }
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
