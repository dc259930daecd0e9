/**
 * What the broker may do to a consumed queue's messages on its own: drop (or dead-letter) a
 * message by its delivery limit, drop one by a length limit or a TTL. The proxy learns it per
 * queue when its consumers' primary connection comes up (topology.ts, which also warns about a
 * queue that can drop messages) and again when a consumer (re)attaches (redelivery.ts), and
 * dead-letters a message itself before the broker's last delivery of it.
 *
 * AMQP shows a queue's arguments only indirectly: a passive declare returns none, but a declare
 * with other arguments answers 406 PRECONDITION_FAILED naming the first argument that differs
 * and its current value. Measured on RabbitMQ 3.10.8: `x-queue-type`, `x-delivery-limit`,
 * `x-dead-letter-exchange`, `x-dead-letter-routing-key`, `x-dead-letter-strategy`,
 * `x-max-length`, `x-overflow` and `x-message-ttl` are all part of that check, e.g.
 *   `inequivalent arg 'x-delivery-limit' for queue 'q' in vhost '/': received none but current is the value '3' of type 'byte'`
 *   `inequivalent arg 'x-delivery-limit' for queue 'q' in vhost '/': received '99' but current is '3'`
 *   `inequivalent arg 'x-dead-letter-exchange' for queue 'q' in vhost '/': received the value '' of type 'longstr' but current is none`
 * So declaring again with each answer applied, until the broker accepts, reads every argument it
 * checks. Policies (`delivery-limit`, `dead-letter-exchange`, `max-length`, `message-ttl`, set
 * by a policy or an operator policy) are not queue arguments and cannot be seen over AMQP.
 *
 * RabbitMQ 4.x facts relied on:
 * - quorum queues have a delivery limit of 20 when none is set, since 4.0 ("Quorum queues now
 *   have a default redelivery limit set to 20", release-notes/4.0.0.md, rabbitmq-server commit
 *   c2bb67a); `x-delivery-limit: -1` turns it off.
 * - from 4.3 the limit is compared with `x-delivery-count`, which counts failed deliveries only
 *   (basic.reject; not basic.nack), while the new `x-acquired-count` counts every delivery to a
 *   consumer (rabbitmq-server PR #15387, rabbitmq-website PR #2508 "QQ v8 documentation",
 *   rabbitmq-server discussion #18226). Before 4.3 `x-delivery-count` counted every return.
 *   Either way the limit is measured on `x-delivery-count`.
 */
import type * as amqp from "amqplib"
import { Effect } from "effect"
import { AmqpError, describe, replyCode } from "../errors.js"
import { onThrowawayChannel } from "./channels.js"

/** What the broker may do on its own to the messages of one queue, as far as AMQP shows it. */
export interface QueueLimits {
  readonly queue: string
  /**
   * The queue's delivery limit L, if it has one: the broker drops (or dead-letters) a message
   * that comes back with more than L deliveries counted. Measured on RabbitMQ 3.10.8 with
   * `x-delivery-limit: 3` and no dead-letter exchange, each delivery returned by a lost
   * connection or a closed channel: the deliveries carried `x-delivery-count` none, 1, 2, 3,
   * and the return of the one with 3 removed the message. So a delivery with
   * `x-delivery-count >= L` is the broker's last (with L = 0, the first is).
   */
  readonly deliveryLimit: number | undefined
  /** Where `deliveryLimit` comes from: "x-delivery-limit" or "RabbitMQ 4.x default for quorum queues". */
  readonly deliveryLimitSource: string
  /** The queue's `x-dead-letter-exchange` ("" is the default exchange); undefined: none, so what the broker gives up is dropped. */
  readonly deadLetterExchange: string | undefined
  /** Each way the queue can remove a message without dead-lettering it, as a phrase for the warning. */
  readonly drops: ReadonlyArray<string>
  /** false: the queue's arguments could not be read, and these are the proxy's own declaration's. */
  readonly argumentsRead: boolean
}

/** No limit known: what admission assumes for a queue nothing was learned about. */
export const noLimits = (queue: string): QueueLimits => ({
  queue,
  deliveryLimit: undefined,
  deliveryLimitSource: "",
  deadLetterExchange: undefined,
  drops: [],
  argumentsRead: false
})

type Arguments = Readonly<Record<string, unknown>>

/** The broker's major version from connection.start's server properties ("3.10.8" → 3); 0 when unknown. */
export const brokerMajorVersion = (connection: amqp.ChannelModel): number => {
  const version = connection.connection.serverProperties.version
  const major = Number(/^(\d+)\./.exec(version ?? "")?.[1])
  return Number.isSafeInteger(major) ? major : 0
}

const numberArg = (args: Arguments, key: string): number | undefined => {
  const raw = args[key]
  const value = typeof raw === "number" ? raw : typeof raw === "string" ? Number(raw) : Number.NaN
  return Number.isFinite(value) ? value : undefined
}

/** The limits that follow from a queue's arguments on a broker of `majorVersion`. */
export const limitsOf = (queue: string, args: Arguments, majorVersion: number, argumentsRead: boolean): QueueLimits => {
  const quorum = args["x-queue-type"] === "quorum"
  const dlxRaw = args["x-dead-letter-exchange"]
  const deadLetterExchange = typeof dlxRaw === "string" ? dlxRaw : undefined
  const explicit = numberArg(args, "x-delivery-limit")
  // A negative limit is none (4.x documents -1 for "unlimited"); without one, 4.x quorum queues default to 20.
  const [deliveryLimit, deliveryLimitSource] = !quorum
    ? [undefined, ""]
    : explicit !== undefined
    ? [explicit >= 0 ? Math.floor(explicit) : undefined, "x-delivery-limit"]
    : majorVersion >= 4
    ? [20, "RabbitMQ 4.x default for quorum queues"]
    : [undefined, ""]
  const drops: Array<string> = []
  if (deadLetterExchange === undefined) {
    if (deliveryLimit !== undefined) {
      drops.push(`drops a message returned once its x-delivery-count is past ${deliveryLimit} (${deliveryLimitSource})`)
    }
    const maxLength = numberArg(args, "x-max-length")
    const maxBytes = numberArg(args, "x-max-length-bytes")
    const overflow = args["x-overflow"] ?? "drop-head"
    if ((maxLength !== undefined || maxBytes !== undefined) && overflow === "drop-head") {
      drops.push(`drops its oldest messages beyond x-max-length ${maxLength ?? "-"} / x-max-length-bytes ${maxBytes ?? "-"} (x-overflow drop-head)`)
    }
    const ttl = numberArg(args, "x-message-ttl")
    if (ttl !== undefined) drops.push(`drops messages older than x-message-ttl ${ttl} ms`)
  }
  // Queue expiry deletes the queue with its messages, dead-letter exchange or not.
  const expires = numberArg(args, "x-expires")
  if (expires !== undefined) drops.push(`is deleted with its messages after x-expires ${expires} ms unused`)
  return { queue, deliveryLimit, deliveryLimitSource, deadLetterExchange, drops, argumentsRead }
}

/** One PRECONDITION_FAILED answer: the argument that differs, and its current value (undefined: none). */
interface Inequivalent {
  readonly key: string
  readonly current: { readonly value: unknown } | undefined
}

/**
 * Reads `inequivalent arg 'K' for queue … : received R but current is C` (the formats above). A
 * current value without its type has the type class of what was sent. Undefined: another answer.
 */
export const parseInequivalent = (message: string, sent: Arguments): Inequivalent | undefined => {
  const match = /inequivalent arg '([^']+)' for queue .*: received (.*) but current is (.*?)"?$/.exec(message)
  if (match === null) return undefined
  const [, key, , current] = match as unknown as [string, string, string, string]
  if (current === "none") return { key, current: undefined }
  const typed = /^the value '(.*)' of type '(\w+)'$/.exec(current)
  if (typed !== null) {
    const [, text, type] = typed as unknown as [string, string, string]
    if (type === "longstr" || type === "shortstr") return { key, current: { value: text } }
    if (type === "bool") return { key, current: { value: text === "true" } }
    if (/^(byte|short|signedint|long|unsignedbyte|unsignedshort|unsignedint|double|float|decimal)$/.test(type)) {
      return { key, current: { value: Number(text) } }
    }
    return undefined
  }
  const bare = /^'(.*)'$/.exec(current)?.[1]
  if (bare === undefined) return undefined
  const was = sent[key]
  if (typeof was === "number") return { key, current: { value: Number(bare) } }
  if (typeof was === "boolean") return { key, current: { value: bare === "true" } }
  return { key, current: { value: bare } }
}

/** Declares at most this many times: a queue has fewer checked arguments than this. */
const maxProbes = 24

/**
 * The arguments `queue` has, read by declaring it on throwaway channels, starting from how the
 * proxy declares it (so a queue that vanished meanwhile is created as the proxy would) and
 * applying each PRECONDITION_FAILED answer until the broker accepts. Undefined: an answer it could
 * not read (say, `durable` differs). Fails with amqplib's error for anything but 406.
 */
const readArguments = async (
  connection: amqp.ChannelModel,
  queue: string,
  declaredAs: amqp.Options.AssertQueue
): Promise<Arguments | undefined> => {
  const args: Record<string, unknown> = { ...declaredAs.arguments }
  for (let attempt = 0; attempt < maxProbes; attempt++) {
    const answer = await onThrowawayChannel(connection, (channel) =>
      channel.assertQueue(queue, { ...declaredAs, arguments: { ...args } }).then(
        () => undefined,
        (cause: unknown) => {
          if (replyCode(cause) === 406) return describe(cause)
          throw cause
        }
      ))
    if (answer === undefined) return args
    const differs = parseInequivalent(answer, args)
    if (differs === undefined || differs.key.startsWith("x-") === false) return undefined
    if (differs.current === undefined) delete args[differs.key]
    else args[differs.key] = differs.current.value
  }
  return undefined
}

/** Learned limits per connection (arguments are fixed for a queue's life; a reconnect learns again). */
const learned = new WeakMap<amqp.ChannelModel, Map<string, Promise<QueueLimits>>>()

const learnAsync = (connection: amqp.ChannelModel, queue: string, declaredAs: amqp.Options.AssertQueue) => {
  let perQueue = learned.get(connection)
  if (perQueue === undefined) {
    perQueue = new Map()
    learned.set(connection, perQueue)
  }
  const cached = perQueue.get(queue)
  if (cached !== undefined) return cached
  const major = brokerMajorVersion(connection)
  const learning = readArguments(connection, queue, declaredAs).then((args) =>
    args === undefined
      ? limitsOf(queue, declaredAs.arguments ?? {}, major, false)
      : limitsOf(queue, args, major, true)
  )
  perQueue.set(queue, learning)
  // A failure is not kept: the next caller tries again.
  learning.catch(() => perQueue.delete(queue))
  return learning
}

/**
 * The limits of `queue` (declared by the proxy as `declaredAs`, see topology.ts queueOptions) on
 * `connection`, read once per connection. Errors: AmqpError when the broker refuses the declare
 * otherwise than with PRECONDITION_FAILED (404 home node down, 405 exclusive elsewhere) or the
 * connection goes away meanwhile.
 */
export const learnQueueLimits = (
  connection: amqp.ChannelModel,
  queue: string,
  declaredAs: amqp.Options.AssertQueue
): Effect.Effect<QueueLimits, AmqpError> =>
  Effect.tryPromise({
    try: () => learnAsync(connection, queue, declaredAs),
    catch: (cause) => new AmqpError({ operation: `read the arguments of '${queue}'`, cause })
  })

const readTimeoutMs = 10_000

/**
 * The limits admission applies: what was learned, or, when the queue could not be read (within
 * 10 s: a broker that never answers must not hold a consumer back), what follows from the proxy's
 * own declaration (logged at debug; the consumer reports the queue's own failure).
 */
export const queueLimitsOrDeclared = (
  connection: amqp.ChannelModel,
  queue: string,
  declaredAs: amqp.Options.AssertQueue
): Effect.Effect<QueueLimits> =>
  learnQueueLimits(connection, queue, declaredAs).pipe(
    Effect.timeoutOrElse({
      duration: readTimeoutMs,
      orElse: () =>
        Effect.fail(new AmqpError({ operation: `read the arguments of '${queue}'`, cause: `no answer within ${readTimeoutMs / 1000} s` }))
    }),
    Effect.catch((error) =>
      Effect.logDebug("queue arguments unreadable; assuming the proxy's declaration", { queue, reason: error.message }).pipe(
        Effect.as(limitsOf(queue, declaredAs.arguments ?? {}, brokerMajorVersion(connection), false))
      )
    )
  )

/**
 * The WARN line's fields for a queue that can drop messages, or undefined when it cannot (as far
 * as its arguments show).
 */
export const dropWarning = (limits: QueueLimits, deadLetterQueue: string): Record<string, unknown> | undefined => {
  if (limits.drops.length === 0) return undefined
  return {
    queue: limits.queue,
    deliveryLimit: limits.deliveryLimit ?? "none",
    drops: limits.drops.join("; "),
    todo: `give the queue a dead-letter target (x-dead-letter-exchange "" and x-dead-letter-routing-key "${deadLetterQueue}", ` +
      `or a policy with dead-letter-exchange/dead-letter-routing-key): the proxy dead-letters a message to '${deadLetterQueue}' ` +
      `itself on the broker's last delivery of it, but not one the broker gives up on while the proxy is down or mid-way`,
    ...(limits.argumentsRead ? {} : { argumentsRead: false }),
    note: "policies (delivery-limit, dead-letter-exchange, max-length, message-ttl) cannot be seen over AMQP: " +
      "check `rabbitmqctl list_queues name policy arguments` and `rabbitmqctl list_policies` too"
  }
}
