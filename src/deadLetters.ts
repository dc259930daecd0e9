/**
 * PeekDeadLetters (scope admin): the messages of a dead-letter queue, from its head, left where
 * they were.
 *
 * How it leaves them in place and in order: one channel takes a prefix of the queue with
 * basic.get (no auto-ack), up to the page asked for (skipping what earlier pages showed), and is
 * then closed without acking or nacking anything. The broker returns unacked messages to their
 * queue when their channel closes: a classic queue puts them back where they were, a quorum queue
 * delivers returned messages before the others, and since only a prefix from the head was taken
 * they come back in their order ahead of the rest in both. Closing rather than nacking: an
 * explicit requeue (basic.nack/reject) counts towards a quorum queue's delivery limit on every
 * version, a return by channel closure does not from RabbitMQ 4.3 (x-delivery-count counts only
 * explicit requeues there; x-acquired-count counts all). Known limit: on a quorum dead-letter
 * queue before 4.3, each peek is one delivery of the peeked messages, and 4.0–4.2 apply a default
 * delivery limit of 20 (the broker then drops or dead-letters them): peek such a queue sparingly,
 * or give it `x-delivery-limit: -1` by policy. Classic queues have no delivery limit. While a
 * peek holds its prefix, that prefix is invisible to other consumers of the queue (the proxy has
 * none on dead-letter queues).
 */
import * as grpc from "@grpc/grpc-js"
import type * as amqp from "amqplib"
import { Data, Effect } from "effect"
import { createHash } from "node:crypto"
import {
  type DeadLetter,
  MessageKind,
  type PeekDeadLettersRequest,
  type PeekDeadLettersResponse,
  type RedriveDeadLettersRequest,
  type RedriveDeadLettersResponse
} from "../gen/messaging.js"
import type { Broker } from "./broker/Broker.js"
import { onThrowawayChannel } from "./broker/channels.js"
import { brokerCountHeaders, headersWithout } from "./consumer.js"
import { deadLetterQueue, type ProxySettings } from "./config.js"
import { AmqpError } from "./errors.js"
import { recordAudit } from "./audit.js"
import { brokerFailureStatus, type BrokerNotConnected, liveConnection, type RunHandler, runCall, type Status } from "./unaryCall.js"

/** A page holds at most this many; one peek takes at most `maxScanned` messages off the head. */
const defaultLimit = 10
const maxLimit = 100
const maxScanned = 10_000

export class PeekInvalid extends Data.TaggedError("PeekInvalid")<{ readonly reason: string }> {
  override get message(): string {
    return this.reason
  }
}

export type PeekError = PeekInvalid | BrokerNotConnected | AmqpError

export const peekStatus = (error: PeekError): Status => {
  switch (error._tag) {
    case "PeekInvalid":
      return { code: grpc.status.INVALID_ARGUMENT, details: error.message }
    case "AmqpError":
    case "BrokerNotConnected":
      return brokerFailureStatus(error)
  }
}

const headerText = (value: unknown): string =>
  typeof value === "string" ? value : Buffer.isBuffer(value) ? value.toString("utf8") : JSON.stringify(value) ?? String(value)

/**
 * A message's stable id: the first 16 hex digits of SHA-256 over its body and headers (in key
 * order), without the counts the broker rewrites on every return. The same message gives the same id on every peek; two messages differ in their
 * dead-lettering time or body.
 */
export const deadLetterId = (message: amqp.GetMessage): string => {
  const headers = message.properties.headers ?? {}
  const hash = createHash("sha256").update(message.content)
  for (const key of Object.keys(headers).sort()) {
    // A quorum queue rewrites these on every return, and a peek is one.
    if (brokerCountHeaders.has(key)) continue
    hash.update(`\0${key}\0${headerText(headers[key])}`)
  }
  hash.update(`\0${message.properties.messageId ?? ""}`)
  return hash.digest("hex").slice(0, 16)
}

const toDeadLetter = (message: amqp.GetMessage): DeadLetter => {
  const headers = message.properties.headers ?? {}
  const text: Record<string, string> = {}
  for (const [key, value] of Object.entries(headers)) text[key] = headerText(value)
  return {
    id: deadLetterId(message),
    body: message.content,
    headers: text,
    reason: text["x-dead-letter-reason"] ?? "",
    originalQueue: text["x-original-queue"] ?? "",
    originalRoutingKey: text["x-original-routing-key"] ?? message.fields.routingKey,
    deadLetteredAt: text["x-dead-lettered-at"] ?? "",
    messageId: typeof message.properties.messageId === "string" ? message.properties.messageId : ""
  }
}

/** The queue of a kind (schemas or validations) and its dead-letter queue. */
export const queuesOf = (rabbit: ProxySettings["rabbit"], kind: MessageKind): { readonly source: string; readonly dead: string } | undefined => {
  const source = kind === MessageKind.MESSAGE_KIND_SCHEMA
    ? rabbit.schemas.queue
    : kind === MessageKind.MESSAGE_KIND_VALIDATION
    ? rabbit.validations.queue
    : undefined
  return source === undefined ? undefined : { source, dead: deadLetterQueue(rabbit, source) }
}

const kindInvalid = () =>
  new PeekInvalid({ reason: "kind must be MESSAGE_KIND_SCHEMA or MESSAGE_KIND_VALIDATION (the queues with a dead-letter queue)" })

export const peekDeadLetters = (
  settings: ProxySettings,
  request: PeekDeadLettersRequest
): Effect.Effect<PeekDeadLettersResponse, PeekError, Broker> =>
  Effect.gen(function*() {
    const queues = queuesOf(settings.rabbit, request.kind)
    if (queues === undefined) return yield* kindInvalid()
    const queue = queues.dead
    if (request.limit > maxLimit) return yield* new PeekInvalid({ reason: `limit must be at most ${maxLimit}, got ${request.limit}` })
    const limit = request.limit === 0 ? defaultLimit : request.limit
    const connection = yield* liveConnection("consumers")
    return yield* Effect.tryPromise({
      try: () =>
        onThrowawayChannel(connection, async (channel) => {
          const { messageCount } = await channel.checkQueue(queue)
          const page: Array<DeadLetter> = []
          let skipping = request.after !== ""
          let scanned = 0
          let more = false
          // Taken, never acked: the channel's close returns every one of them (see above).
          while (scanned < maxScanned) {
            const message = await channel.get(queue, { noAck: false })
            if (message === false) break
            scanned++
            if (page.length === limit) {
              more = true
              break
            }
            if (skipping) {
              if (deadLetterId(message) === request.after) skipping = false
              continue
            }
            page.push(toDeadLetter(message))
          }
          if (skipping) throw new PeekInvalid({ reason: `no message with id ${JSON.stringify(request.after.slice(0, 32))} in the first ${scanned} of ${queue}: it was removed, or the page is stale` })
          return { queue, messages: page, next: more ? page.at(-1)?.id ?? "" : "", total: messageCount }
        }),
      catch: (cause) => cause instanceof PeekInvalid ? cause : new AmqpError({ operation: `peek '${queue}'`, cause })
    })
  })

export const peekDeadLettersHandler = (
  settings: ProxySettings,
  run: RunHandler
): grpc.handleUnaryCall<PeekDeadLettersRequest, PeekDeadLettersResponse> =>
(call, callback) =>
  runCall(
    run,
    call,
    "PeekDeadLetters",
    peekDeadLetters(settings, call.request).pipe(
      Effect.tap((page) => Effect.sync(() => recordAudit(call, { queue: page.queue, shown: page.messages.length, messageIds: page.messages.map((m) => m.id) })))
    ),
    callback,
    peekStatus
  )

/** Headers a redriven copy drops: the proxy's requeue count (reset) and the broker's counts. */
const droppedOnRedrive: ReadonlySet<string> = new Set(["x-requeue-count", ...brokerCountHeaders])

/**
 * RedriveDeadLetters (scope admin): moves the chosen dead-lettered messages back to the queue of
 * their kind, never to any other (the `x-original-queue` header is not trusted for a target).
 * On one confirm channel of the publishers' connection, the head of `.dead` is taken with
 * basic.get; each chosen message is copied to its queue, and acked in `.dead` only once the
 * broker has confirmed the copy: it is never in neither place, and in both only between the
 * confirm and the ack (a cut there leaves a duplicate, as any at-least-once move). Messages not
 * chosen, and whatever was taken when a cut came, return to `.dead` in their order when the
 * channel closes (as in a peek). The copy keeps its headers and properties, without
 * `x-requeue-count` (reset) and the broker's delivery counts, plus `x-redriven-at`.
 */
export const redriveDeadLetters = (
  settings: ProxySettings,
  request: RedriveDeadLettersRequest
): Effect.Effect<RedriveDeadLettersResponse, PeekError, Broker> =>
  Effect.gen(function*() {
    const queues = queuesOf(settings.rabbit, request.kind)
    if (queues === undefined) return yield* kindInvalid()
    if (!request.all && request.ids.length === 0) {
      return yield* new PeekInvalid({ reason: "name the messages to redrive (ids, from PeekDeadLetters) or set all" })
    }
    const wanted = new Set(request.ids)
    const limit = request.limit === 0 ? Number.POSITIVE_INFINITY : request.limit
    const connection = yield* liveConnection("publishers")
    return yield* Effect.tryPromise({
      try: async () => {
        const channel = await connection.createConfirmChannel()
        channel.on("error", () => undefined)
        const moved: Array<string> = []
        try {
          let scanned = 0
          while (scanned < maxScanned && moved.length < limit && (request.all || moved.length < wanted.size)) {
            const message = await channel.get(queues.dead, { noAck: false })
            if (message === false) break
            scanned++
            const id = deadLetterId(message)
            if (!request.all && !wanted.has(id)) continue
            const headers = { ...headersWithout(message.properties.headers, droppedOnRedrive), "x-redriven-at": new Date().toISOString() }
            await new Promise<void>((resolve, reject) => {
              channel.publish("", queues.source, message.content, {
                persistent: true,
                messageId: message.properties.messageId,
                contentType: message.properties.contentType,
                headers
              }, (error: unknown) => (error == null ? resolve() : reject(error)))
            })
            channel.ack(message)
            moved.push(id)
          }
        } finally {
          // Returns what was taken and not moved, in order; waits for the acks to reach the broker.
          await channel.close().catch(() => undefined)
        }
        return { queue: queues.source, redriven: moved.length, ids: moved }
      },
      catch: (cause) => new AmqpError({ operation: `redrive '${queues.dead}'`, cause })
    })
  })

export const redriveDeadLettersHandler = (
  settings: ProxySettings,
  run: RunHandler
): grpc.handleUnaryCall<RedriveDeadLettersRequest, RedriveDeadLettersResponse> =>
(call, callback) =>
  runCall(
    run,
    call,
    "RedriveDeadLetters",
    redriveDeadLetters(settings, call.request).pipe(
      Effect.tap((result) => Effect.sync(() => recordAudit(call, { queue: result.queue, redriven: result.redriven, messageIds: result.ids.slice(0, 100) })))
    ),
    callback,
    peekStatus
  )
