/**
 * Publishes one message straight to RabbitMQ, as the API's publisher does (the proxy only hands out the
 * broker parameters). Connection and confirm channel are scoped and closed when the scope ends.
 *
 * Fails with `BrokerError` when the broker is unreachable, refuses the credentials, closes the channel
 * (e.g. unknown exchange), nacks the message, returns it as unroutable, or does not confirm in time.
 */
import * as amqp from "amqplib"
import { Effect, Schema } from "effect"

/** A broker operation that failed. */
export class BrokerError extends Schema.TaggedError<BrokerError>()("BrokerError", {
  /** What we were doing: "connect", "channel", "publish". */
  op: Schema.String,
  /** Broker address and vhost, for messages. */
  broker: Schema.String,
  reason: Schema.String
}) {
  override get message(): string {
    return `RabbitMQ ${this.op} failed at ${this.broker}: ${this.reason}`
  }
}

export interface PublishRequest {
  readonly host: string
  readonly port: number
  readonly username: string
  readonly password: string
  readonly vhost: string
  readonly exchange: string
  readonly routingKey: string
  readonly body: Buffer
  readonly messageId: string | undefined
  /** Bounds connecting and waiting for the confirm. */
  readonly timeoutSeconds: number
}

/**
 * Publish with confirm (persistent, mandatory, JSON); succeeds once the broker has acked a routed message.
 * Opens its own connection and closes it again: the CLI publishes one message per run.
 */
export const publishConfirmed = Effect.fn("Publisher.publishConfirmed")(function*(request: PublishRequest) {
  const broker = `amqp://${request.host}:${request.port} (vhost ${request.vhost})`
  const brokerError = (op: string) => (cause: unknown) => new BrokerError({ op, broker, reason: describe(cause) })
  const timeoutMillis = Math.round(request.timeoutSeconds * 1000)

  // amqplib emits 'error' (then 'close') when the broker or the network closes a connection or channel,
  // and an 'error' without a listener crashes the process. The failure itself still reaches us through
  // the pending promise/callback, so the listeners only note that the object is gone.
  let connectionOpen = false
  const connection = yield* Effect.acquireRelease(
    Effect.tryPromise({
      try: () =>
        amqp.connect({
          protocol: "amqp",
          hostname: request.host,
          port: request.port,
          username: request.username,
          password: request.password,
          vhost: request.vhost
        }, { timeout: timeoutMillis }),
      catch: brokerError("connect")
    }).pipe(Effect.tap((connection) =>
      Effect.sync(() => {
        connectionOpen = true
        connection.on("error", () => { connectionOpen = false })
        connection.on("close", () => { connectionOpen = false })
      })
    )),
    (connection) => closeQuietly(() => connectionOpen, () => connection.close())
  )

  let channelOpen = false
  const channel = yield* Effect.acquireRelease(
    Effect.tryPromise({ try: () => connection.createConfirmChannel(), catch: brokerError("channel") }).pipe(
      Effect.tap((channel) =>
        Effect.sync(() => {
          channelOpen = true
          // Without this listener a channel error (e.g. 404 unknown exchange) is escalated to the connection.
          channel.on("error", () => { channelOpen = false })
          channel.on("close", () => { channelOpen = false })
        })
      )
    ),
    (channel) => closeQuietly(() => channelOpen, () => channel.close())
  )

  yield* Effect.callback<void, BrokerError>((resume) => {
    // With mandatory=true an unroutable message comes back as basic.return, which the broker sends
    // before its ack: a confirm alone only means "accepted", not "routed".
    let returned: amqp.Message | undefined
    const onReturn = (message: amqp.Message) => {
      returned = message
    }
    // A channel error (404 no exchange, 403 access refused) carries the broker's reason; the confirm
    // callback would only see a generic "channel closed".
    const onError = (error: Error) => finish(Effect.fail(brokerError("publish")(error)))
    const detach = () => {
      channel.off("return", onReturn)
      channel.off("error", onError)
    }
    const finish = (result: Effect.Effect<void, BrokerError>) => {
      detach()
      resume(result)
    }
    channel.on("return", onReturn)
    channel.once("error", onError)
    try {
      channel.publish(request.exchange, request.routingKey, request.body, {
        persistent: true,
        mandatory: true,
        contentType: "application/json",
        ...(request.messageId === undefined ? {} : { messageId: request.messageId })
      }, (error: unknown) => {
        if (error !== null && error !== undefined) {
          finish(Effect.fail(brokerError("publish")(error)))
        } else if (returned !== undefined) {
          finish(Effect.fail(brokerError("publish")(unroutable(returned, request.exchange, request.routingKey))))
        } else {
          finish(Effect.void)
        }
      })
    } catch (error) {
      // publish throws synchronously when the channel is already closed
      finish(Effect.fail(brokerError("publish")(error)))
    }
    return Effect.sync(detach) // interrupted (timeout, Ctrl-C)
  }).pipe(
    Effect.timeoutOrElse({
      duration: timeoutMillis,
      orElse: () => Effect.fail(brokerError("publish")(`no confirm from the broker within ${request.timeoutSeconds}s`))
    })
  )
}, Effect.scoped) // channel and connection are closed before the caller reports success

// Internal

/**
 * Best-effort, bounded close. Closing a channel the broker is already closing makes amqplib send a
 * second channel.close: RabbitMQ then kills the connection (504 CHANNEL_ERROR) and the close promise
 * never settles (observed), so skip objects known to be gone and never wait more than 2 s.
 */
const closeQuietly = (isOpen: () => boolean, close: () => Promise<void>): Effect.Effect<void> =>
  Effect.suspend(() =>
    isOpen() ? Effect.tryPromise(close).pipe(Effect.timeout("2 seconds"), Effect.ignore) : Effect.void
  )

const describe = (cause: unknown): string => cause instanceof Error ? cause.message : String(cause)

const unroutable = (message: amqp.Message, exchange: string, routingKey: string): string => {
  // The bundled types omit the reply fields of a basic.return.
  const fields = message.fields as amqp.MessageFields & { readonly replyCode?: number; readonly replyText?: string }
  const reply = fields.replyCode === undefined ? "" : ` (${fields.replyCode} ${fields.replyText ?? ""})`
  return `unroutable: no queue is bound to exchange "${exchange}" for routing key "${routingKey}"${reply}`
}
