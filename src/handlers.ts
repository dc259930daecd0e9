/**
 * The MessagingService handlers. Unary calls answer from the settings; each streaming call gets its
 * own consumer, run as a fiber that the call's 'cancelled' event interrupts.
 */
import * as grpc from "@grpc/grpc-js"
import { Duration, Effect, Redacted } from "effect"
import { randomUUID } from "node:crypto"
import {
  type GetMessagingParamsResponse,
  type MessagingServiceServer,
  type RoutingKey,
  SchemaMessageResponse,
  type SchemaSubscriptionEvent,
  type SubscriptionRequest,
  ValidationMessageResponse,
  type ValidationSubscriptionEvent
} from "../gen/messaging.js"
import type { Broker } from "./broker/Broker.js"
import { queueOptions } from "./broker/topology.js"
import { transcodeSchemaMessage, transcodeValidationMessage } from "./codec.js"
import { contractQueues, deadLetterQueue, type ProxySettings, type QueueBinding } from "./config.js"
import { publishBatchHandler } from "./publishBatch.js"
import { publishHandler } from "./publishing.js"
import { peekDeadLettersHandler, redriveDeadLettersHandler } from "./deadLetters.js"
import { purgeQueueHandler } from "./purgeQueue.js"
import type { RateLimits } from "./rateLimits.js"
import { queueInfoHandler } from "./queueInfo.js"
import type { RunHandler } from "./unaryCall.js"
import type { AdmissionPolicy } from "./redelivery.js"
import { type QueueStreamSpec, serveQueueStream } from "./streaming.js"
import { type Tracing, underRpcSpan } from "./tracing.js"
import { serveSubscription, type SubscriptionEvent, type SubscriptionSpec } from "./subscription.js"

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
  },
  nodes: rabbit.nodes.map(({ host, port }) => ({ host, port }))
})

const routingKey = (binding: QueueBinding): RoutingKey => ({ routingKey: binding.routingKey })

const queueSpec = (
  settings: ProxySettings,
  tracing: Tracing["Service"],
  binding: QueueBinding,
  transcode: AdmissionPolicy["transcode"]
): QueueStreamSpec & SubscriptionSpec => ({
  queue: binding.queue,
  deadLetterQueue: deadLetterQueue(settings.rabbit, binding.queue),
  tracing,
  prefetch: settings.rabbit.prefetch,
  clientReadAheadBytes: settings.grpc.clientReadAheadBytes,
  quietStreamAckAfter: settings.limits.quietStreamAckAfter,
  defaultMaxInFlight: Math.min(settings.rabbit.prefetch, settings.limits.maxInFlight),
  maxInFlightLimit: settings.limits.maxInFlight,
  maxRequeues: settings.maxRequeues,
  ackDeadline: settings.subscriptions.ackDeadline,
  maxAckDeadline: settings.subscriptions.maxAckDeadline,
  retryDelays: settings.subscriptions.retryDelays,
  nackBackoff: settings.subscriptions.nackBackoff,
  // Above the longest lease, so the broker's own timeout never fires first (honoured from 3.12).
  consumerTimeoutMs: Duration.toMillis(settings.subscriptions.maxAckDeadline) + 60_000,
  declaredAs: queueOptions(settings.rabbit, binding.queue),
  transcode,
  // Streams send the message itself: the smaller of what grpc-js may send and what clients take.
  ...clientLimit(settings.grpc),
  defaultClientMaxMessageBytes: settings.grpc.clientMaxReceiveMessageBytes,
  serverMaxMessageBytes: settings.grpc.maxMessageBytes
})

const clientLimit = ({ clientMaxReceiveMessageBytes, maxMessageBytes }: ProxySettings["grpc"]) =>
  clientMaxReceiveMessageBytes <= maxMessageBytes
    ? { maxEncodedBytes: clientMaxReceiveMessageBytes, maxEncodedBytesSource: "GRPC_CLIENT_MAX_RECEIVE_MESSAGE_BYTES" }
    : { maxEncodedBytes: maxMessageBytes, maxEncodedBytesSource: "GRPC_MAX_MESSAGE_BYTES" }

/** Runs one call's work as a fiber that the call's cancel (or deadline) interrupts. */
const runForCall = (
  run: RunHandler,
  call: grpc.ServerWritableStream<unknown, unknown> | grpc.ServerDuplexStream<unknown, unknown>,
  rpc: string,
  work: Effect.Effect<void, never, Broker>
) => {
  if (call.cancelled) return
  const fiber = run(work.pipe(Effect.annotateLogs({ streamId: randomUUID().slice(0, 8), peer: call.getPeer(), rpc }), underRpcSpan(call)))
  // Also fires after a normal end; interrupting a finished fiber is a no-op.
  call.once("cancelled", () => fiber.interruptUnsafe())
}

export const makeHandlers = (
  settings: ProxySettings,
  run: RunHandler,
  tracing: Tracing["Service"],
  rateLimits: RateLimits["Service"]
): MessagingServiceServer => {
  const streamHandler = <Req, A>(rpc: string, spec: QueueStreamSpec): grpc.handleServerStreamingCall<Req, A> =>
  (call) => runForCall(run, call as grpc.ServerWritableStream<unknown, unknown>, rpc, serveQueueStream(call, spec))
  const subscriptionHandler = <A, Event extends SubscriptionEvent<A>>(
    rpc: string,
    spec: SubscriptionSpec
  ): grpc.handleBidiStreamingCall<SubscriptionRequest, Event> =>
  (call) =>
    runForCall(
      run,
      call as grpc.ServerDuplexStream<unknown, unknown>,
      rpc,
      serveSubscription(call as unknown as grpc.ServerDuplexStream<SubscriptionRequest, SubscriptionEvent<A>>, spec)
    )
  const params = messagingParams(settings)
  const { rabbit } = settings
  const schemas = queueSpec(settings, tracing, rabbit.schemas, transcodeSchemaMessage)
  const validations = queueSpec(settings, tracing, rabbit.validations, transcodeValidationMessage)
  return {
    getMessagingParams: (_call, callback) => callback(null, params),
    getRoutingKeySchemas: (call, callback) =>
      callback(null, routingKey(call.request.results ? rabbit.schemaResults : rabbit.schemas)),
    getRoutingKeyValidations: (call, callback) =>
      callback(null, routingKey(call.request.results ? rabbit.validationResults : rabbit.validations)),
    streamSchemaMessages: streamHandler("StreamSchemaMessages", schemas),
    streamValidationMessages: streamHandler("StreamValidationMessages", validations),
    subscribeSchemaMessages: subscriptionHandler<SchemaMessageResponse, SchemaSubscriptionEvent>(
      "SubscribeSchemaMessages",
      schemas
    ),
    subscribeValidationMessages: subscriptionHandler<ValidationMessageResponse, ValidationSubscriptionEvent>(
      "SubscribeValidationMessages",
      validations
    ),
    publish: publishHandler(settings, run),
    publishBatch: publishBatchHandler(settings, run, rateLimits),
    getQueueInfo: queueInfoHandler(settings, run),
    purgeQueue: purgeQueueHandler(settings, run),
    peekDeadLetters: peekDeadLettersHandler(settings, run),
    redriveDeadLetters: redriveDeadLettersHandler(settings, run)
  }
}
