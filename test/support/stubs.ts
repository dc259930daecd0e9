/**
 * A delivery whose broker side is a stub, for tests of admission (pure logic): its dead-letters
 * are recorded in `deadLettered` instead of published, every settle succeeds.
 */
import type * as amqp from "amqplib"
import { Effect } from "effect"
import type { Delivery } from "../../src/consumer.js"

export const stubDelivery = (
  { content, headers = {}, redelivered = false }: {
    readonly content: Buffer
    readonly headers?: Record<string, unknown>
    readonly redelivered?: boolean
  },
  deadLettered: Array<string>
): Delivery => {
  const message = {
    content,
    fields: { deliveryTag: 1, redelivered, exchange: "x", routingKey: "schemas.*", consumerTag: "c" },
    properties: { headers }
  } as unknown as amqp.ConsumeMessage
  return {
    message,
    channel: {} as amqp.Channel,
    ack: () => true,
    ackUpTo: () => true,
    nack: () => true,
    moveTo: () => Effect.void,
    stopConsuming: Effect.void,
    addConsumer: () => Effect.void,
    deadLetter: (reason) => Effect.sync(() => void deadLettered.push(reason))
  }
}
