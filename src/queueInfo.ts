/**
 * GetQueueInfo: message and consumer counts of the four contract queues, the two dead-letter
 * queues and the delay queues of `nack_delayed` (broker/delayQueues.ts), from a passive
 * queue.declare each, and whether each is available (a queue the proxy
 * could not declare, or that is gone, is reported with the reason instead of failing the call). A passive declare of a missing queue makes the
 * broker close the channel (404), so every probe gets a throwaway channel of its own.
 */
import * as grpc from "@grpc/grpc-js"
import type * as amqp from "amqplib"
import { type Duration, Effect } from "effect"
import type { GetQueueInfoRequest, GetQueueInfoResponse, QueueStatus } from "../gen/messaging.js"
import { Broker } from "./broker/Broker.js"
import { onThrowawayChannel } from "./broker/channels.js"
import type { ProxySettings } from "./config.js"
import { AmqpError, describe, replyCode } from "./errors.js"
import { type QueueRole, reportedQueues } from "./queueRoles.js"
import { type BrokerNotConnected, liveConnection, type RunHandler, runCall, type Status } from "./unaryCall.js"

type Rabbit = ProxySettings["rabbit"]

export type QueueInfoError = BrokerNotConnected | AmqpError

export const queueInfoStatus = (error: QueueInfoError): Status => ({ code: grpc.status.UNAVAILABLE, details: error.message })

/** One passive declare on a channel of its own (a 404 closes it). */
const probe = (connection: amqp.ChannelModel, role: QueueRole, queue: string) =>
  Effect.tryPromise({
    try: () => onThrowawayChannel(connection, (channel) => channel.checkQueue(queue)),
    catch: (cause) => new AmqpError({ operation: `check '${queue}'`, cause })
  }).pipe(
    Effect.map(({ messageCount, consumerCount }): QueueStatus => ({
      queue,
      role,
      messageCount,
      consumerCount,
      available: true,
      unavailableReason: ""
    })),
    // 404: deleted behind the proxy's back, or a classic queue whose node is down. The others
    // are still reported; any other failure is broker trouble and fails the call.
    Effect.catchIf(
      (error) => replyCode(error.cause) === 404,
      (error) => Effect.succeed(unavailableStatus(queue, role, describe(error.cause)))
    )
  )

const unavailableStatus = (queue: string, role: QueueRole, reason: string): QueueStatus => ({
  queue,
  role,
  messageCount: 0,
  consumerCount: 0,
  available: false,
  unavailableReason: reason
})

export const queueInfo = (
  rabbit: Rabbit,
  retryDelays: ReadonlyArray<Duration.Duration>
): Effect.Effect<GetQueueInfoResponse, QueueInfoError, Broker> =>
  Effect.gen(function*() {
    // Passive declarations only: the consumers' connection, which publishers can never block.
    const connection = yield* liveConnection("consumers")
    const unavailable = yield* (yield* Broker).unavailableQueues
    // All at once; the first failure interrupts the others, whose channels are then closed.
    const queues = yield* Effect.forEach(
      reportedQueues(rabbit, retryDelays),
      ({ role, queue }) => {
        // A queue whose declaration failed is not probed: the broker's reason says more than a 404.
        const reason = unavailable.get(queue)
        return reason === undefined ? probe(connection, role, queue) : Effect.succeed(unavailableStatus(queue, role, reason))
      },
      { concurrency: "unbounded" }
    )
    return { queues }
  })

export const queueInfoHandler = (
  settings: ProxySettings,
  run: RunHandler
): grpc.handleUnaryCall<GetQueueInfoRequest, GetQueueInfoResponse> =>
(call, callback) => runCall(run, call, "GetQueueInfo", queueInfo(settings.rabbit, settings.subscriptions.retryDelays), callback, queueInfoStatus)
