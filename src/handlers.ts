/**
 * The MessagingService handlers. Unary calls answer from the settings; each streaming call gets its
 * own consumer, run as a fiber that the call's 'cancelled' event interrupts.
 */
import type * as grpc from "@grpc/grpc-js"
import { Effect, type Fiber, Redacted } from "effect"
import { randomUUID } from "node:crypto"
import {
  type GetMessagingParamsResponse,
  type MessagingServiceServer,
  type RoutingKey
} from "../gen/messaging.js"
import type { Broker } from "./broker.js"
import { decodeSchemaMessage, decodeValidationMessage } from "./codec.js"
import { contractQueues, deadLetterQueue, type ProxySettings, type QueueBinding } from "./config.js"
import { type QueueStreamSpec, serveQueueStream } from "./streaming.js"

export type RunHandler = <A, E>(effect: Effect.Effect<A, E, Broker>) => Fiber.Fiber<A, E>

export const messagingParams = ({ rabbit }: ProxySettings): GetMessagingParamsResponse => ({
  host: rabbit.host,
  port: rabbit.port,
  username: rabbit.user,
  // The contract hands publishers the password; who may ask is the business of caller auth.
  password: Redacted.value(rabbit.password),
  virtualHost: rabbit.vhost,
  exchange: {
    exchange: rabbit.exchange,
    type: rabbit.exchangeType,
    durable: true,
    queues: contractQueues(rabbit).map(({ queue, routingKey }) => ({ queue, durable: true, routingKey }))
  }
})

const routingKey = (binding: QueueBinding): RoutingKey => ({ routingKey: binding.routingKey })

const queueSpec = <A>(
  settings: ProxySettings,
  binding: QueueBinding,
  decode: QueueStreamSpec<A>["decode"]
): QueueStreamSpec<A> => ({
  queue: binding.queue,
  deadLetterQueue: deadLetterQueue(settings.rabbit, binding.queue),
  prefetch: settings.rabbit.prefetch,
  decode
})

export const makeHandlers = (settings: ProxySettings, run: RunHandler): MessagingServiceServer => {
  const streamHandler = <Req, A>(rpc: string, spec: QueueStreamSpec<A>): grpc.handleServerStreamingCall<Req, A> =>
  (call) => {
    if (call.cancelled) return
    const fiber = run(
      serveQueueStream(call, spec).pipe(
        Effect.annotateLogs({ streamId: randomUUID().slice(0, 8), peer: call.getPeer(), rpc })
      )
    )
    // Also fires after a normal end; interrupting a finished fiber is a no-op.
    call.once("cancelled", () => fiber.interruptUnsafe())
  }
  const params = messagingParams(settings)
  const { rabbit } = settings
  return {
    getMessagingParams: (_call, callback) => callback(null, params),
    getRoutingKeySchemas: (call, callback) =>
      callback(null, routingKey(call.request.results ? rabbit.schemaResults : rabbit.schemas)),
    getRoutingKeyValidations: (call, callback) =>
      callback(null, routingKey(call.request.results ? rabbit.validationResults : rabbit.validations)),
    streamSchemaMessages: streamHandler(
      "StreamSchemaMessages",
      queueSpec(settings, rabbit.schemas, decodeSchemaMessage)
    ),
    streamValidationMessages: streamHandler(
      "StreamValidationMessages",
      queueSpec(settings, rabbit.validations, decodeValidationMessage)
    )
  }
}
