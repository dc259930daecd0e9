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
import { type DeadLetter, MessageKind, type PeekDeadLettersRequest, type PeekDeadLettersResponse } from "../gen/messaging.js"
import type { Broker } from "./broker/Broker.js"
import { onThrowawayChannel } from "./broker/channels.js"
import { deadLetterQueue, type ProxySettings } from "./config.js"
import { AmqpError, replyCode } from "./errors.js"
import { recordAudit } from "./audit.js"
import { type BrokerNotConnected, liveConnection, type RunHandler, runCall, type Status } from "./unaryCall.js"

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
      return { code: replyCode(error.cause) === 404 ? grpc.status.NOT_FOUND : grpc.status.UNAVAILABLE, details: error.message }
    case "BrokerNotConnected":
      return { code: grpc.status.UNAVAILABLE, details: error.message }
  }
}

const headerText = (value: unknown): string =>
  typeof value === "string" ? value : Buffer.isBuffer(value) ? value.toString("utf8") : JSON.stringify(value) ?? String(value)

/** Headers a quorum queue rewrites each time a message returns (a peek is one such return). */
const brokerCounts: ReadonlySet<string> = new Set(["x-delivery-count", "x-acquired-count"])

/**
 * A message's stable id: the first 16 hex digits of SHA-256 over its body and headers (in key
 * order), without the counts the broker rewrites on every return. The same message gives the same id on every peek; two messages differ in their
 * dead-lettering time or body.
 */
export const deadLetterId = (message: amqp.GetMessage): string => {
  const headers = message.properties.headers ?? {}
  const hash = createHash("sha256").update(message.content)
  for (const key of Object.keys(headers).sort()) {
    if (brokerCounts.has(key)) continue
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

/** The dead-letter queue of a kind: schemas or validations. */
export const deadLetterQueueOf = (rabbit: ProxySettings["rabbit"], kind: MessageKind): string | undefined =>
  kind === MessageKind.MESSAGE_KIND_SCHEMA
    ? deadLetterQueue(rabbit, rabbit.schemas.queue)
    : kind === MessageKind.MESSAGE_KIND_VALIDATION
    ? deadLetterQueue(rabbit, rabbit.validations.queue)
    : undefined

export const peekDeadLetters = (
  settings: ProxySettings,
  request: PeekDeadLettersRequest
): Effect.Effect<PeekDeadLettersResponse, PeekError, Broker> =>
  Effect.gen(function*() {
    const queue = deadLetterQueueOf(settings.rabbit, request.kind)
    if (queue === undefined) {
      return yield* new PeekInvalid({ reason: "kind must be MESSAGE_KIND_SCHEMA or MESSAGE_KIND_VALIDATION (the queues with a dead-letter queue)" })
    }
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
