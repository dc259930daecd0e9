/**
 * messaging-proxy-cli: a command-line client for messaging-proxy.
 *
 *   params                                   GetMessagingParams (password redacted unless --show-password)
 *   routing-key schemas|validations          GetRoutingKeySchemas / GetRoutingKeyValidations [--results]
 *   stream schemas|validations               StreamSchemaMessages / StreamValidationMessages [--count N]
 *   publish schema|validation --file F|-     publish a JSON body straight to RabbitMQ, with the broker
 *                                            parameters and routing key obtained from the proxy
 *   send schema|validation|schema-result|validation-result --file F|-
 *                                            publish a JSON body through the proxy (Publish RPC: validated,
 *                                            answered after the broker's confirm) [--routing-key K]
 *   queues                                   GetQueueInfo: message and consumer counts of the six queues and the delay queues, and whether each is available
 *   dead list schemas|validations            PeekDeadLetters: the dead-letter queue from its head, left in place [--limit N] [--after ID]
 *   dead show schemas|validations ID        one dead-lettered message whole (body, every header)
 *   dead redrive schemas|validations --id ID… | --all   RedriveDeadLetters: back to their queue [--limit N]
 *   purge ROLE                               PurgeQueue: empty one of the proxy's queues by its role (as `queues` names it)
 *   health [--service S]                     grpc.health.v1 Check: prints the status, exits 0 when SERVING (for probes)
 *
 * Shared flags: --host, --port (env MESSAGING_CONNECTION_HOST / _PORT), --timeout (unary deadline, seconds).
 * Output is JSON on stdout (one object per line for streams). Failures are one `error: ...` line on
 * stderr and exit code 1; Ctrl-C cancels the running call and exits 130.
 */
import { NodeRuntime, NodeServices } from "@effect/platform-node"
import {
  Cause,
  Config,
  Console,
  Duration,
  Effect,
  FileSystem,
  Layer,
  Option,
  PlatformError,
  Runtime,
  Schema,
  Stdio,
  Stream
} from "effect"
import { Argument, Command, Flag } from "effect/cli"
import { GetMessagingParamsResponse, SchemaMessageResponse, ValidationMessageResponse } from "../gen/messaging.js"
import { BrokerError, publishConfirmed } from "./cli/Publisher.js"
import {
  ClientSetupError,
  isMessagingClientError,
  MessagingClient,
  type MessagingClientError
} from "./client/MessagingClient.js"

const VERSION = "0.1.0" // keep in step with package.json

/** Bad local input: unreadable file, not JSON, bad server answer we cannot publish with. */
class InputError extends Schema.TaggedError<InputError>()("InputError", { message: Schema.String }) {}

// ---------------------------------------------------------------------------------------------------------
// Root command and shared flags

const root = Command.make("messaging-proxy-cli").pipe(
  // Shared flags are accepted before or after the subcommand name. Precedence: flag > env > default.
  // No short aliases: -v and -h are taken by the built-in --version and --help.
  Command.withSharedFlags({
    host: Flag.String("host").pipe(
      Flag.withDescription("messaging-proxy host (default 127.0.0.1, env MESSAGING_CONNECTION_HOST)"),
      Flag.withFallbackConfig(Config.String("MESSAGING_CONNECTION_HOST")),
      Flag.withDefault("127.0.0.1")
    ),
    port: Flag.Int("port").pipe(
      Flag.withDescription("messaging-proxy port (default 50055, env MESSAGING_CONNECTION_PORT)"),
      Flag.withFallbackConfig(Config.Port("MESSAGING_CONNECTION_PORT")),
      Flag.withDefault(50055),
      Flag.filter((port) => port >= 1 && port <= 65535, (port) => `port ${port} is out of range (1-65535)`)
    ),
    timeout: Flag.Finite("timeout").pipe(
      Flag.withDescription("deadline in seconds for unary calls and for the broker publish (default 10)"),
      Flag.withDefault(10),
      Flag.filter((seconds) => seconds > 0, (seconds) => `timeout must be positive, got ${seconds}`)
    ),
    tls: Flag.Boolean("tls").pipe(
      Flag.withDescription("connect with TLS (implied by --ca, --cert, --key)"),
      Flag.withDefault(false)
    ),
    ca: Flag.String("ca").pipe(Flag.withDescription("CA certificate (PEM) to trust"), Flag.optional),
    cert: Flag.String("cert").pipe(Flag.withDescription("client certificate (PEM), for mutual TLS"), Flag.optional),
    key: Flag.String("key").pipe(Flag.withDescription("client key (PEM), for mutual TLS"), Flag.optional),
    apiKey: Flag.Redacted("api-key").pipe(
      Flag.withDescription("API key sent as 'authorization: Bearer' (env MESSAGING_API_KEY)"),
      Flag.withFallbackConfig(Config.Redacted("MESSAGING_API_KEY")),
      Flag.optional
    )
  }),
  Command.withDescription("Command-line client for messaging-proxy (gRPC in front of RabbitMQ)")
)

/**
 * The gRPC client for the subcommands (the client library's `MessagingClient`), built from the root's
 * shared flags. Provided per subcommand (not on the root) because the root's parsed flags are only in
 * context inside a subcommand handler. `--cert` without `--key` (or the reverse) is refused here, in
 * the flags' own words.
 */
const ClientLive = Layer.unwrap(
  Effect.flatMap(root, ({ host, port, timeout, tls, ca, cert, key, apiKey }) =>
    Option.isSome(cert) !== Option.isSome(key)
      ? Effect.fail(new InputError({ message: "--cert and --key go together" }))
      : Effect.succeed(MessagingClient.layer({
        address: `${host}:${port}`,
        timeout: Duration.seconds(timeout),
        tls: tls || Option.isSome(ca) || Option.isSome(cert)
          ? { caPath: Option.getOrUndefined(ca), certPath: Option.getOrUndefined(cert), keyPath: Option.getOrUndefined(key) }
          : undefined,
        apiKey: Option.getOrUndefined(apiKey)
      }).pipe(
        // The library names its options; a CLI user typed flags.
        Layer.catch((error) => Layer.effect(MessagingClient, Effect.fail(new ClientSetupError({ reason: cliWords(error.reason) }))))
      )))
)

const cliWords = (reason: string): string =>
  reason.replace(/\btls\.caPath\b/g, "--ca").replace(/\btls\.certPath\b/g, "--cert").replace(/\btls\.keyPath\b/g, "--key")

/**
 * Writes each value as one line of JSON to stdout. When stdout goes away (EPIPE, e.g. `| head -1`)
 * output simply ends: for `stream` that stops the stream and so cancels the call, then exits 0.
 */
const writeJsonLines = <E, R>(values: Stream.Stream<unknown, E, R>) =>
  Effect.flatMap(Stdio.Stdio, (stdio) =>
    values.pipe(
      Stream.map((value) => `${JSON.stringify(value)}\n`),
      Stream.run(stdio.stdout()),
      Effect.catchIf(isBrokenPipe, () => Effect.void)
    ))

const printJson = (value: unknown) => writeJsonLines(Stream.succeed(value))

const isBrokenPipe = (error: unknown): error is PlatformError.PlatformError =>
  error instanceof PlatformError.PlatformError && typeof error.reason.cause === "object" &&
  error.reason.cause !== null && "code" in error.reason.cause && error.reason.cause.code === "EPIPE"

// ---------------------------------------------------------------------------------------------------------
// params

const params = Command.make("params", {
  showPassword: Flag.Boolean("show-password").pipe(
    Flag.withDescription("print the broker password instead of <redacted>"),
    Flag.withDefault(false)
  )
}, Effect.fn("cli.params")(function*({ showPassword }) {
  const response = yield* (yield* MessagingClient).getMessagingParams
  // toJSON omits an empty password, so an unset one stays visibly unset rather than "<redacted>".
  const shown = showPassword || response.password === "" ? response : { ...response, password: "<redacted>" }
  yield* printJson(GetMessagingParamsResponse.toJSON(shown))
})).pipe(
  Command.withDescription("Print the broker connection parameters and exchange/queue layout (GetMessagingParams)"),
  Command.provide(ClientLive)
)

// ---------------------------------------------------------------------------------------------------------
// routing-key

const routingKey = Command.make("routing-key", {
  kind: Argument.Literals("kind", ["schemas", "validations"]).pipe(
    Argument.withDescription("schemas → GetRoutingKeySchemas, validations → GetRoutingKeyValidations")
  ),
  results: Flag.Boolean("results").pipe(
    Flag.withDescription("ask for the results routing key instead of the request one"),
    Flag.withDefault(false)
  )
}, Effect.fn("cli.routingKey")(function*({ kind, results }) {
  const key = yield* (yield* MessagingClient).getRoutingKey(kind, results)
  yield* printJson({ routingKey: key })
})).pipe(
  Command.withDescription("Print a routing key (GetRoutingKeySchemas / GetRoutingKeyValidations)"),
  Command.provide(ClientLive)
)

// ---------------------------------------------------------------------------------------------------------
// stream

const stream = Command.make("stream", {
  kind: Argument.Literals("kind", ["schemas", "validations"]).pipe(
    Argument.withDescription("schemas → StreamSchemaMessages, validations → StreamValidationMessages")
  ),
  count: Flag.Int("count").pipe(
    Flag.withDescription("stop (and cancel the call) after N messages; default: run until Ctrl-C"),
    Flag.filter((n) => n >= 1, (n) => `count must be at least 1, got ${n}`),
    Flag.optional
  )
}, Effect.fn("cli.stream")(function*({ kind, count }) {
  const client = yield* MessagingClient
  const messages: Stream.Stream<unknown, MessagingClientError> = kind === "schemas"
    ? Stream.map(client.streamSchemaMessages, SchemaMessageResponse.toJSON)
    : Stream.map(client.streamValidationMessages, ValidationMessageResponse.toJSON)
  // Stream.take ends the stream after N elements, whose finalizer then cancels the gRPC call.
  const limited = Option.match(count, { onNone: () => messages, onSome: (n) => Stream.take(messages, n) })
  yield* writeJsonLines(limited)
})).pipe(
  Command.withDescription("Print queue messages as they arrive, one JSON object per line"),
  Command.provide(ClientLive)
)

// ---------------------------------------------------------------------------------------------------------
// publish

const publish = Command.make("publish", {
  kind: Argument.Literals("kind", ["schema", "validation"]).pipe(
    Argument.withDescription("schema → schemas routing key, validation → validations routing key")
  ),
  file: Flag.String("file").pipe(
    Flag.withAlias("f"),
    Flag.withDescription("JSON message body to publish; - reads stdin")
  ),
  routingKey: Flag.String("routing-key").pipe(
    Flag.withDescription("routing key to publish with (default: asked from the proxy)"),
    Flag.optional
  )
}, Effect.fn("cli.publish")(function*({ kind, file, routingKey }) {
  const body = yield* readBody(file)
  const messageId = yield* parseMessageId(file, body)
  const client = yield* MessagingClient
  const { timeout } = yield* root

  // Both lookups are independent unary calls: run them together.
  const [params, key] = yield* Effect.all([
    client.getMessagingParams,
    Option.match(routingKey, {
      onSome: Effect.succeed,
      onNone: () => client.getRoutingKey(kind === "schema" ? "schemas" : "validations", false)
    })
  ], { concurrency: "unbounded" })

  const exchange = params.exchange?.exchange ?? ""
  if (exchange === "") {
    return yield* new InputError({ message: `messaging-proxy at ${client.target} returned no exchange name` })
  }
  yield* publishConfirmed({
    host: params.host === "" ? "localhost" : params.host,
    port: params.port === 0 ? 5672 : params.port,
    username: params.username,
    password: params.password,
    vhost: params.virtualHost === "" ? "/" : params.virtualHost,
    exchange,
    routingKey: key,
    body,
    messageId,
    timeoutSeconds: timeout
  })
  yield* printJson({ published: true, id: messageId ?? null, exchange, routingKey: key })
})).pipe(
  Command.withDescription(
    "Publish a JSON body straight to RabbitMQ (persistent, mandatory, with publisher confirm), " +
      "using the broker parameters and routing key from the proxy"
  ),
  Command.withExamples([
    { command: "messaging-proxy-cli publish schema --file schema.json", description: "Publish a schema message" },
    {
      command: "cat v.json | messaging-proxy-cli publish validation -f - --routing-key validation.x",
      description: "Publish a validation message from stdin with an explicit routing key"
    }
  ]),
  Command.provide(ClientLive)
)

// ---------------------------------------------------------------------------------------------------------
// send

const send = Command.make("send", {
  kind: Argument.Literals("kind", ["schema", "validation", "schema-result", "validation-result"]).pipe(
    Argument.withDescription("which body format to validate against, and the default routing key")
  ),
  file: Flag.String("file").pipe(
    Flag.withAlias("f"),
    Flag.withDescription("JSON message body to publish; - reads stdin")
  ),
  routingKey: Flag.String("routing-key").pipe(
    Flag.withDescription("routing key to publish with (default: the kind's configured one)"),
    Flag.optional
  )
}, Effect.fn("cli.send")(function*({ kind, file, routingKey }) {
  // No local checks: the proxy validates the body and says exactly what is wrong with it.
  const body = yield* readBody(file)
  const response = yield* (yield* MessagingClient).publish(kind, body, {
    routingKey: Option.getOrUndefined(routingKey)
  })
  yield* printJson({ published: true, id: response.messageId, routingKey: response.routingKey })
})).pipe(
  Command.withDescription(
    "Publish a JSON body through the proxy (Publish RPC): validated like the streams decode it, " +
      "answered after the broker's confirm; gRPC only, no broker credentials needed"
  ),
  Command.withExamples([
    { command: "messaging-proxy-cli send schema --file schema.json", description: "Publish a schema message" },
    {
      command: "echo '{\"id\":\"r1\",\"ok\":true}' | messaging-proxy-cli send schema-result -f -",
      description: "Publish a schema result from stdin"
    }
  ]),
  Command.provide(ClientLive)
)

// ---------------------------------------------------------------------------------------------------------
// queues

const queues = Command.make("queues", {}, Effect.fn("cli.queues")(function*() {
  const response = yield* (yield* MessagingClient).getQueueInfo
  // Fields spelled out: toJSON would drop zero counts, and 0 is often the interesting answer here.
  yield* printJson({
    queues: response.queues.map(({ queue, role, messageCount, consumerCount, available, unavailableReason }) => ({
      queue,
      role,
      messageCount,
      consumerCount,
      available,
      // Only when there is one: an available queue has none.
      ...(available ? {} : { unavailableReason })
    }))
  })
})).pipe(
  Command.withDescription(
    "Print message and consumer counts of the contract queues and the dead-letter queues (GetQueueInfo)"
  ),
  Command.provide(ClientLive)
)

// ---------------------------------------------------------------------------------------------------------
// purge

const purge = Command.make("purge", {
  role: Argument.String("role").pipe(
    Argument.withDescription("the queue's role, as `queues` shows it: schemas, validations, schemas_dead, …")
  )
}, Effect.fn("cli.purge")(function*({ role }) {
  const response = yield* (yield* MessagingClient).purgeQueue(role)
  // Spelled out: toJSON would drop a zero count.
  yield* printJson({ queue: response.queue, purged: response.purged })
})).pipe(
  Command.withDescription("Empty one of the proxy's queues by its role (PurgeQueue, scope admin); prints how many went"),
  Command.provide(ClientLive)
)

// ---------------------------------------------------------------------------------------------------------
// dead (dead-letter queues)

/** The dead-letter queue's kind, as `dead list` and `dead redrive` take it. */
const deadKind = Argument.Literals("kind", ["schemas", "validations"]).pipe(Argument.withDescription("whose dead-letter queue"))

const deadList = Command.make("list", {
  kind: deadKind,
  limit: Flag.Int("limit").pipe(Flag.withDescription("at most this many (default 10, at most 100)"), Flag.withDefault(10)),
  after: Flag.String("after").pipe(Flag.withDescription("the id the previous page ended with"), Flag.withDefault(""))
}, Effect.fn("cli.dead.list")(function*({ kind, limit, after }) {
  const page = yield* (yield* MessagingClient).peekDeadLetters(kind, limit, after)
  // One line per message, the body as text; then where the next page starts.
  yield* writeJsonLines(Stream.fromIterable([
    ...page.messages.map((m) => ({
      id: m.id,
      messageId: m.messageId,
      reason: m.reason,
      originalQueue: m.originalQueue,
      deadLetteredAt: m.deadLetteredAt,
      body: Buffer.from(m.body).toString("utf8")
    })),
    { queue: page.queue, total: page.total, shown: page.messages.length, next: page.next }
  ]))
})).pipe(
  Command.withDescription("Show messages of a dead-letter queue from its head, leaving them in place (PeekDeadLetters, scope admin)"),
  Command.provide(ClientLive)
)

const deadRedrive = Command.make("redrive", {
  kind: deadKind,
  ids: Flag.String("id").pipe(Flag.withDescription("a message id from `dead list` (repeat the flag for several)"), Flag.atLeast(0)),
  all: Flag.Boolean("all").pipe(Flag.withDescription("every message, from the head"), Flag.withDefault(false)),
  limit: Flag.Int("limit").pipe(Flag.withDescription("at most this many (default: no limit)"), Flag.withDefault(0))
}, Effect.fn("cli.dead.redrive")(function*({ kind, ids, all, limit }) {
  if (!all && ids.length === 0) return yield* new InputError({ message: "name the messages with --id, or use --all" })
  const result = yield* (yield* MessagingClient).redriveDeadLetters(kind, all ? { all: true, limit } : { ids, limit })
  yield* printJson({ queue: result.queue, redriven: result.redriven, ids: result.ids })
})).pipe(
  Command.withDescription("Move dead-lettered messages back to their queue, each copy confirmed first (RedriveDeadLetters, scope admin)"),
  Command.provide(ClientLive)
)

const deadShow = Command.make("show", {
  kind: deadKind,
  id: Argument.String("id").pipe(Argument.withDescription("a message id from `dead list`"))
}, Effect.fn("cli.dead.show")(function*({ kind, id }) {
  const client = yield* MessagingClient
  // Pages from the head until the id turns up (or the queue ends).
  let after = ""
  while (true) {
    const page = yield* client.peekDeadLetters(kind, 100, after)
    const found = page.messages.find((m) => m.id === id)
    if (found !== undefined) {
      return yield* printJson({ ...found, body: Buffer.from(found.body).toString("utf8") })
    }
    if (page.next === "") return yield* new InputError({ message: `no message with id ${id} in ${page.queue}` })
    after = page.next
  }
})).pipe(
  Command.withDescription("Show one dead-lettered message whole: body and every header (PeekDeadLetters, scope admin)"),
  Command.provide(ClientLive)
)

const dead = Command.make("dead").pipe(
  Command.withDescription("Dead-letter queues"),
  Command.withSubcommands([deadList, deadShow, deadRedrive])
)

// ---------------------------------------------------------------------------------------------------------
// health

/** The proxy is up but not serving what was asked: exit 1, for probes (the image's HEALTHCHECK). */
class NotServing extends Schema.TaggedError<NotServing>()("NotServing", { message: Schema.String }) {}

const health = Command.make("health", {
  service: Flag.String("service").pipe(
    Flag.withDescription("the health entry: \"\" (default) the proxy, or messaging.MessagingService, publishing, a queue"),
    Flag.withDefault("")
  )
}, Effect.fn("cli.health")(function*({ service }) {
  const client = yield* MessagingClient
  const status = yield* client.checkHealth(service)
  yield* printJson({ service, status })
  if (status !== "SERVING") {
    return yield* new NotServing({ message: `messaging-proxy at ${client.target} reports '${service}' ${status}` })
  }
})).pipe(
  Command.withDescription("Check the proxy's health (grpc.health.v1 Check): exit 0 when SERVING, 1 otherwise"),
  Command.provide(ClientLive)
)

/** The message body as bytes, from a file or from stdin ("-"). Published unchanged. */
const readBody = Effect.fnUntraced(function*(file: string) {
  const chunks = file === "-"
    ? yield* Stream.runCollect((yield* Stdio.Stdio).stdin)
    : [yield* (yield* FileSystem.FileSystem).readFile(file)]
  return Buffer.concat(chunks)
}, (effect, file) =>
  Effect.mapError(effect, (error) => new InputError({ message: `cannot read ${describeFile(file)}: ${error.message}` })))

/** Checks that the body is UTF-8 JSON and returns its `id` (the AMQP message id), if it has one. */
const parseMessageId = (file: string, body: Buffer): Effect.Effect<string | undefined, InputError> =>
  Effect.try({
    try: (): unknown => JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(body)),
    catch: (error) =>
      new InputError({
        message: `${describeFile(file)} is not valid JSON: ${error instanceof Error ? error.message : String(error)}`
      })
  }).pipe(Effect.map((json) => {
    const id = typeof json === "object" && json !== null && "id" in json ? json.id : undefined
    return typeof id === "string" || typeof id === "number" ? String(id) : undefined
  }))

const describeFile = (file: string) => file === "-" ? "stdin" : file

// ---------------------------------------------------------------------------------------------------------
// main

const cli = root.pipe(Command.withSubcommands([params, routingKey, stream, publish, send, queues, purge, dead, health]))

/**
 * Prints a failure as a single `error: ...` line (no stack, no pretty cause). Errors the CLI framework
 * has already shown (usage errors with help) are marked `Runtime.errorReported = false` and skipped.
 * Exit codes come from runMain's default teardown: 1 on failure, 130 on Ctrl-C.
 */
const reportFailure = <A, E, R>(self: Effect.Effect<A, E, R>): Effect.Effect<A, E, R> =>
  Effect.tapCause(self, (cause) => {
    if (Cause.hasInterruptsOnly(cause)) return Effect.void
    const error = Cause.squash(cause)
    if (!Runtime.getErrorReported(error)) return Effect.void
    const known = isMessagingClientError(error) || error instanceof ClientSetupError ||
      error instanceof BrokerError || error instanceof InputError || error instanceof NotServing
    // Anything else is a bug: keep the full cause (with stack) for it.
    const text = known ? error.message : Cause.pretty(cause)
    return Console.error(`error: ${known ? text.replace(/\s*\n\s*/g, " ") : text}`)
  })

cli.pipe(
  Command.run({ version: VERSION }),
  reportFailure,
  Effect.provide(NodeServices.layer),
  NodeRuntime.runMain({ disableErrorReporting: true })
)
