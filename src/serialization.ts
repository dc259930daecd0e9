/**
 * The service definition the server registers: the generated one, with the four streaming
 * responses written without the generated code's extra copy. Messages are encoded once, when they
 * are admitted (so their size can be checked against the gRPC limit before anything is sent): the
 * streams write those bytes as they are, and a subscription's delivery event embeds them next to
 * its delivery info. The writers are shared: encoding is synchronous and `finish()` returns a
 * copy, so sharing them between calls is safe.
 */
import { BinaryWriter, WireType } from "@bufbuild/protobuf/wire"
import {
  type DeliveryInfo,
  type TraceContext,
  MessagingServiceService,
  SchemaMessageResponse,
  SchemaSubscriptionEvent,
  ValidationMessageResponse,
  ValidationSubscriptionEvent
} from "../gen/messaging.js"
import { ProtobufWriter } from "./protobufWriter.js"

/** For the generated encoders, which take @bufbuild/protobuf's writer. */
const generatedWriter = new BinaryWriter()
/** For the hot path: the fast transcoder and the delivery envelopes (protobufWriter.ts). */
const writer = new ProtobufWriter()

const asBuffer = (bytes: Uint8Array): Buffer => Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength)

interface Codec<A> {
  encode(message: A, writer?: BinaryWriter): BinaryWriter
}

/**
 * Runs `write` on the shared writer and returns what it wrote, as a fresh Buffer. If it throws
 * part-way (e.g. a number out of range), the half-written bytes are discarded, or they would
 * prefix the next message encoded anywhere.
 */
export const writeWith = (write: (writer: ProtobufWriter) => void): Buffer => {
  try {
    write(writer)
    return writer.finish()
  } catch (error) {
    writer.reset()
    throw error
  }
}

/** Encodes a message with the generated code on a shared writer; the result is a fresh copy. */
export const encodeWith = <A>(codec: Codec<A>) => (value: A): Uint8Array => {
  try {
    return codec.encode(value, generatedWriter).finish()
  } catch (error) {
    generatedWriter.finish()
    throw error
  }
}

const encoder = <A>(codec: Codec<A>) => {
  const encode = encodeWith(codec)
  return (value: A): Buffer => asBuffer(encode(value))
}

/** A stream response already encoded at admission: written as it is. */
const responseEncoder = <A>(codec: Codec<A>) => {
  const encode = encoder(codec)
  return (value: A | Uint8Array): Buffer => value instanceof Uint8Array ? asBuffer(value) : encode(value)
}

/**
 * Several stream responses encoded at admission, written to the call as one chunk: each is still
 * its own gRPC message on the wire (callLifecycle.ts frames them), but the call's Writable and
 * its callbacks are paid once per batch, not once per message.
 */
export class EncodedMessages {
  constructor(readonly messages: ReadonlyArray<Uint8Array>) {}
}

/** A subscription's delivery event around a message encoded at admission. */
export class EncodedDelivery {
  constructor(
    readonly info: DeliveryInfo,
    readonly message: Uint8Array,
    readonly traceContext?: TraceContext | undefined
  ) {}
}

/** Several deliveries in one event (`deliveries`, field 4), each as in EncodedDelivery. */
export class EncodedDeliveries {
  constructor(readonly deliveries: ReadonlyArray<EncodedDelivery>) {}
}

/**
 * The most bytes the delivery event adds around its message: tags, lengths and DeliveryInfo (64),
 * and while tracing is on a trace context (a 55-character traceparent and a tracestate of at most
 * 512, W3C trace context §3.3.1.5, with their tags and lengths: 640).
 */
export const deliveryEnvelopeBytes = (tracing: boolean): number => tracing ? 64 + 640 : 64

const eventEncoder = <A>(codec: Codec<A>) => {
  const encode = encoder(codec)
  return (value: A | EncodedDelivery | EncodedDeliveries): Buffer =>
    value instanceof EncodedDelivery
      ? encodeDelivery(value)
      : value instanceof EncodedDeliveries
      ? encodeDeliveries(value)
      : encode(value)
}

/**
 * A delivery's fields { info (1), message (2), trace_context (3) }, as the generated code writes
 * them: DeliveryInfo { delivery_id (1, uint64), redelivered (2), delivery_count (3, uint32) } and
 * TraceContext { traceparent (1), tracestate (2) }, proto3 defaults left out.
 */
const writeDeliveryFields = (w: ProtobufWriter, value: EncodedDelivery): void => {
  const { deliveryCount, deliveryId, redelivered } = value.info
  w.uint32((1 << 3) | WireType.LengthDelimited).fork()
  if (deliveryId !== "0") w.uint32(8).uint64(deliveryId)
  if (redelivered) w.uint32(16).bool(true)
  if (deliveryCount !== 0) w.uint32(24).uint32(deliveryCount)
  w.join()
  w.uint32((2 << 3) | WireType.LengthDelimited).bytes(value.message)
  const trace = value.traceContext
  if (trace !== undefined) {
    w.uint32((3 << 3) | WireType.LengthDelimited).fork()
    if (trace.traceparent !== "") w.uint32(10).string(trace.traceparent)
    if (trace.tracestate !== "") w.uint32(18).string(trace.tracestate)
    w.join()
  }
}

/** event.delivery (field 2) { the delivery's fields }. */
const encodeDelivery = (value: EncodedDelivery): Buffer =>
  writeWith((w) => {
    w.uint32((2 << 3) | WireType.LengthDelimited).fork()
    writeDeliveryFields(w, value)
    w.join()
  })

/** event.deliveries (field 4) { deliveries (field 1, repeated) { the delivery's fields } }: one encode for the batch. */
const encodeDeliveries = (value: EncodedDeliveries): Buffer =>
  writeWith((w) => {
    w.uint32((4 << 3) | WireType.LengthDelimited).fork()
    for (const delivery of value.deliveries) {
      w.uint32((1 << 3) | WireType.LengthDelimited).fork()
      writeDeliveryFields(w, delivery)
      w.join()
    }
    w.join()
  })

const { streamSchemaMessages, streamValidationMessages, subscribeSchemaMessages, subscribeValidationMessages } =
  MessagingServiceService

export const MessagingServiceDefinition: typeof MessagingServiceService = {
  ...MessagingServiceService,
  streamSchemaMessages: { ...streamSchemaMessages, responseSerialize: responseEncoder(SchemaMessageResponse) },
  streamValidationMessages: { ...streamValidationMessages, responseSerialize: responseEncoder(ValidationMessageResponse) },
  subscribeSchemaMessages: { ...subscribeSchemaMessages, responseSerialize: eventEncoder(SchemaSubscriptionEvent) },
  subscribeValidationMessages: {
    ...subscribeValidationMessages,
    responseSerialize: eventEncoder(ValidationSubscriptionEvent)
  }
}

/**
 * The response serializer of the RPC at `path` ("/<package>.MessagingService/<Method>"), as the
 * server registers it, or `undefined` for a path the service does not have.
 */
export const responseSerializer = (path: string): ((value: unknown) => Buffer) | undefined =>
  serializersByPath.get(path)

const serializersByPath: ReadonlyMap<string, (value: unknown) => Buffer> = new Map(
  Object.values(MessagingServiceDefinition).map((method) => [method.path, method.responseSerialize as (value: unknown) => Buffer])
)
