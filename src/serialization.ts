/**
 * The service definition the server registers: the generated one, with the four streaming
 * responses encoded through one reused writer (its buffer stays grown, so no regrowth per message)
 * and wrapped without the generated code's extra copy. Encoding is synchronous and `finish()`
 * returns a copy, so sharing the writer between calls is safe.
 */
import { BinaryWriter } from "@bufbuild/protobuf/wire"
import {
  MessagingServiceService,
  SchemaMessageResponse,
  SchemaSubscriptionEvent,
  ValidationMessageResponse,
  ValidationSubscriptionEvent
} from "../gen/messaging.js"

const writer = new BinaryWriter()

const encoder = <A>(codec: { encode(message: A, writer?: BinaryWriter): BinaryWriter }) => (value: A): Buffer => {
  const bytes = codec.encode(value, writer).finish()
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength)
}

const { streamSchemaMessages, streamValidationMessages, subscribeSchemaMessages, subscribeValidationMessages } =
  MessagingServiceService

export const MessagingServiceDefinition: typeof MessagingServiceService = {
  ...MessagingServiceService,
  streamSchemaMessages: { ...streamSchemaMessages, responseSerialize: encoder(SchemaMessageResponse) },
  streamValidationMessages: { ...streamValidationMessages, responseSerialize: encoder(ValidationMessageResponse) },
  subscribeSchemaMessages: { ...subscribeSchemaMessages, responseSerialize: encoder(SchemaSubscriptionEvent) },
  subscribeValidationMessages: {
    ...subscribeValidationMessages,
    responseSerialize: encoder(ValidationSubscriptionEvent)
  }
}
