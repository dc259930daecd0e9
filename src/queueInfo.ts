/**
 * GetQueueInfo: message and consumer counts of the four contract queues and the two dead-letter
 * queues, from a passive queue.declare each. A passive declare of a missing queue makes the
 * broker close the channel (404), so every probe gets a throwaway channel of its own.
 */
import * as grpc from "@grpc/grpc-js"
import type * as amqp from "amqplib"
import { Data, Effect } from "effect"
import type { GetQueueInfoRequest, GetQueueInfoResponse, QueueStatus } from "../gen/messaging.js"
import type { Broker } from "./broker.js"
import { deadLetterQueue, type ProxySettings } from "./config.js"
import { AmqpError } from "./errors.js"
import type { RunHandler } from "./handlers.js"
import { type BrokerNotConnected, liveConnection, replyCode, runCall, type Status } from "./publishing.js"

type Rabbit = ProxySettings["rabbit"]

export type QueueRole =
  | "schemas"
  | "validations"
  | "schema_results"
  | "validation_results"
  | "schemas_dead"
  | "validations_dead"

/** The queues GetQueueInfo reports, in the documented order. */
export const reportedQueues = (rabbit: Rabbit): ReadonlyArray<{ readonly role: QueueRole; readonly queue: string }> => [
  { role: "schemas", queue: rabbit.schemas.queue },
  { role: "validations", queue: rabbit.validations.queue },
  { role: "schema_results", queue: rabbit.schemaResults.queue },
  { role: "validation_results", queue: rabbit.validationResults.queue },
  { role: "schemas_dead", queue: deadLetterQueue(rabbit, rabbit.schemas.queue) },
  { role: "validations_dead", queue: deadLetterQueue(rabbit, rabbit.validations.queue) }
]

/** A queue the proxy should have declared is gone (deleted behind its back). NOT_FOUND. */
export class QueueNotFound extends Data.TaggedError("QueueNotFound")<{
  readonly queue: string
  readonly role: QueueRole
}> {
  override get message(): string {
    return `queue '${this.queue}' (${this.role}) does not exist`
  }
}

export type QueueInfoError = QueueNotFound | BrokerNotConnected | AmqpError

export const queueInfoStatus = (error: QueueInfoError): Status => {
  switch (error._tag) {
    case "QueueNotFound":
      return { code: grpc.status.NOT_FOUND, details: error.message }
    case "BrokerNotConnected":
    case "AmqpError":
      return { code: grpc.status.UNAVAILABLE, details: error.message }
  }
}

/** One passive declare on a channel of its own, closed afterwards unless the broker already did. */
const probe = (connection: amqp.ChannelModel, role: QueueRole, queue: string) =>
  Effect.acquireUseRelease(
    Effect.tryPromise({
      try: async () => {
        const channel = await connection.createChannel()
        const state = { channel, open: true }
        // A 404 arrives as an 'error' event too; without a listener it would crash the process.
        channel.on("error", () => undefined)
        channel.on("close", () => {
          state.open = false
        })
        return state
      },
      catch: (cause) => new AmqpError({ operation: `open channel to check '${queue}'`, cause })
    }),
    ({ channel }) =>
      Effect.tryPromise({
        try: () => channel.checkQueue(queue),
        catch: (cause): QueueNotFound | AmqpError =>
          replyCode(cause) === 404 ? new QueueNotFound({ queue, role }) : new AmqpError({ operation: `check '${queue}'`, cause })
      }),
    // Closing a channel the broker has closed would send a second channel.close, which the
    // broker answers by closing the whole (shared) connection: only close an open one.
    (state) =>
      state.open
        ? Effect.promise(() => state.channel.close().catch(() => undefined)).pipe(Effect.timeoutOption("2 seconds"))
        : Effect.void
  ).pipe(
    Effect.map(({ messageCount, consumerCount }): QueueStatus => ({ queue, role, messageCount, consumerCount }))
  )

export const queueInfo = (rabbit: Rabbit): Effect.Effect<GetQueueInfoResponse, QueueInfoError, Broker> =>
  Effect.gen(function*() {
    // Passive declarations only: the consumers' connection, which publishers can never block.
    const connection = yield* liveConnection("consumers")
    // All six at once; the first failure interrupts the others, whose channels are then closed.
    const queues = yield* Effect.forEach(
      reportedQueues(rabbit),
      ({ role, queue }) => probe(connection, role, queue),
      { concurrency: "unbounded" }
    )
    return { queues }
  })

export const queueInfoHandler = (
  settings: ProxySettings,
  run: RunHandler
): grpc.handleUnaryCall<GetQueueInfoRequest, GetQueueInfoResponse> =>
(call, callback) => runCall(run, call, "GetQueueInfo", queueInfo(settings.rabbit), callback, queueInfoStatus)
