/**
 * PurgeQueue (scope admin): empties one of the proxy's queues, named by its role (queueRoles.ts),
 * and answers with how many ready messages went. A role is the only way to name a queue here, so
 * no other queue on the broker can be purged. Unacked deliveries (held by open streams and
 * subscriptions) are not touched by queue.purge: they go back or are acked as usual.
 */
import * as grpc from "@grpc/grpc-js"
import { Data, Effect } from "effect"
import type { PurgeQueueRequest, PurgeQueueResponse } from "../gen/messaging.js"
import { onThrowawayChannel } from "./broker/channels.js"
import type { Broker } from "./broker/Broker.js"
import type { ProxySettings } from "./config.js"
import { recordAudit } from "./audit.js"
import { AmqpError } from "./errors.js"
import { reportedQueues } from "./queueRoles.js"
import { brokerFailureStatus, type BrokerNotConnected, liveConnection, type RunHandler, runCall, type Status } from "./unaryCall.js"

/** A role that is not one of this proxy's queues. */
export class UnknownRole extends Data.TaggedError("UnknownRole")<{ readonly role: string; readonly roles: ReadonlyArray<string> }> {
  override get message(): string {
    return `role must be one of ${this.roles.join(", ")}; got ${JSON.stringify(this.role.slice(0, 64))}`
  }
}

export type PurgeError = UnknownRole | BrokerNotConnected | AmqpError

export const purgeStatus = (error: PurgeError): Status => {
  switch (error._tag) {
    case "UnknownRole":
      return { code: grpc.status.INVALID_ARGUMENT, details: error.message }
    case "AmqpError":
    case "BrokerNotConnected":
      return brokerFailureStatus(error)
  }
}

export const purgeQueue = (settings: ProxySettings, request: PurgeQueueRequest): Effect.Effect<PurgeQueueResponse, PurgeError, Broker> =>
  Effect.gen(function*() {
    const queues = reportedQueues(settings.rabbit, settings.subscriptions.retryDelays)
    const target = queues.find(({ role }) => role === request.role)
    if (target === undefined) return yield* new UnknownRole({ role: request.role, roles: queues.map(({ role }) => role) })
    const connection = yield* liveConnection("consumers")
    const { messageCount } = yield* Effect.tryPromise({
      try: () => onThrowawayChannel(connection, (channel) => channel.purgeQueue(target.queue)),
      catch: (cause) => new AmqpError({ operation: `purge '${target.queue}'`, cause })
    })
    yield* Effect.logWarning("queue purged", { role: target.role, queue: target.queue, purged: messageCount })
    return { queue: target.queue, purged: messageCount }
  })

export const purgeQueueHandler = (
  settings: ProxySettings,
  run: RunHandler
): grpc.handleUnaryCall<PurgeQueueRequest, PurgeQueueResponse> =>
(call, callback) => {
  recordAudit(call, { role: call.request.role.slice(0, 64) })
  runCall(
    run,
    call,
    "PurgeQueue",
    purgeQueue(settings, call.request).pipe(
      Effect.tap((purged) => Effect.sync(() => recordAudit(call, { queue: purged.queue, purged: purged.purged })))
    ),
    callback,
    purgeStatus
  )
}
