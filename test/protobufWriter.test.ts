/**
 * The hot path's protobuf writer against @bufbuild/protobuf's BinaryWriter (what the generated
 * code uses): the same calls must give the same bytes, whatever the values and nesting. And the
 * subscription events written around pre-encoded messages against the generated encoder.
 */
import { BinaryWriter } from "@bufbuild/protobuf/wire"
import { describe, expect, it } from "@effect/vitest"
import fc from "fast-check"
import { SchemaMessageResponse, SchemaSubscriptionEvent, SchemasTasks } from "../gen/messaging.js"
import { ProtobufWriter } from "../src/protobufWriter.js"
import { EncodedDeliveries, EncodedDelivery, MessagingServiceDefinition } from "../src/serialization.js"

type Field =
  | { readonly op: "uint32"; readonly value: number }
  | { readonly op: "int32"; readonly value: number }
  | { readonly op: "int64"; readonly value: string }
  | { readonly op: "uint64"; readonly value: string }
  | { readonly op: "bool"; readonly value: boolean }
  | { readonly op: "string"; readonly value: string }
  | { readonly op: "bytes"; readonly value: Uint8Array }
  | { readonly op: "nested"; readonly fields: ReadonlyArray<Field> }

/** Calls the same methods on either writer (they share these signatures). */
interface Writer {
  uint32(value: number): unknown
  int32(value: number): unknown
  int64(value: string): unknown
  uint64(value: string): unknown
  bool(value: boolean): unknown
  string(value: string): unknown
  bytes(value: Uint8Array): unknown
  fork(): unknown
  join(): unknown
}

const write = (w: Writer, fields: ReadonlyArray<Field>, tag: number): void => {
  for (const field of fields) {
    w.uint32(tag)
    if (field.op === "nested") {
      w.fork()
      write(w, field.fields, tag + 1)
      w.join()
    } else if (field.op === "uint32" || field.op === "int32" || field.op === "bool") {
      ;(w[field.op] as (v: number | boolean) => unknown).call(w, field.value)
    } else if (field.op === "int64" || field.op === "uint64" || field.op === "string") {
      ;(w[field.op] as (v: string) => unknown).call(w, field.value)
    } else {
      w.bytes(field.value)
    }
  }
}

// Strings from a few characters to past the one- and two-byte length boundaries (128, 16,384
// bytes), ASCII and not, lone surrogates included (both writers make them U+FFFD).
const text = fc.oneof(
  fc.string({ maxLength: 70 }),
  fc.string({ unit: "binary", maxLength: 70 }),
  fc.string({ unit: "grapheme", minLength: 40, maxLength: 200 }),
  fc.nat({ max: 20_000 }).map((n) => "x".repeat(n) + "é"),
  fc.constantFrom("", "\ud800", "a\udfffb", "€".repeat(50))
)

const { field } = fc.letrec<{ field: Field }>((tie) => ({
  field: fc.oneof(
    { depthSize: "small", withCrossShrink: true },
    fc.nat().map((value) => ({ op: "uint32" as const, value: value * 2 + (value % 2) })),
    fc.integer({ min: -0x80000000, max: 0x7fffffff }).map((value) => ({ op: "int32" as const, value })),
    fc.bigInt({ min: -(1n << 63n), max: (1n << 63n) - 1n }).map((value) => ({ op: "int64" as const, value: String(value) })),
    fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }).map((value) => ({ op: "uint64" as const, value: String(value) })),
    fc.boolean().map((value) => ({ op: "bool" as const, value })),
    text.map((value) => ({ op: "string" as const, value })),
    fc.uint8Array({ maxLength: 300 }).map((value) => ({ op: "bytes" as const, value })),
    fc.array(tie("field"), { maxLength: 6 }).map((fields) => ({ op: "nested" as const, fields }))
  )
}))

const hex = (bytes: Uint8Array) => Buffer.from(bytes).toString("hex")

describe("ProtobufWriter", () => {
  it("writes what BinaryWriter writes for the same calls", () => {
    const ours = new ProtobufWriter()
    fc.assert(
      fc.property(fc.array(field, { maxLength: 8 }), (fields) => {
        const theirs = new BinaryWriter()
        write(theirs, fields, 1)
        write(ours, fields, 1)
        expect(hex(ours.finish())).toBe(hex(theirs.finish()))
      }),
      { numRuns: 500 }
    )
  })

  it("grows past its buffer and, after a large message, writes small ones as before", () => {
    const w = new ProtobufWriter()
    const large = "y".repeat(3 * 1024 * 1024)
    w.uint32(10).fork().uint32(18).string(large).join()
    const bytes = w.finish()
    const theirs = new BinaryWriter().uint32(10).fork().uint32(18).string(large).join().finish()
    expect(bytes.equals(Buffer.from(theirs))).toBe(true)
    expect(hex(w.uint32(8).int32(-1).finish())).toBe(hex(new BinaryWriter().uint32(8).int32(-1).finish()))
  })

  it("refuses values outside a field's range, as BinaryWriter does", () => {
    const w = new ProtobufWriter()
    expect(() => w.uint32(-1)).toThrow(RangeError)
    expect(() => w.uint32(2 ** 32)).toThrow(RangeError)
    expect(() => w.int32(2 ** 31)).toThrow(RangeError)
    expect(() => w.int32(1.5)).toThrow(RangeError)
    expect(() => w.int64("9223372036854775808")).toThrow(RangeError)
    expect(() => w.uint64("-1")).toThrow(RangeError)
    expect(() => w.join()).toThrow("join without fork")
    w.reset()
    expect(w.finish().byteLength).toBe(0)
  })
})

describe("subscription events around pre-encoded messages", () => {
  const serialize = MessagingServiceDefinition.subscribeSchemaMessages.responseSerialize as (value: unknown) => Buffer
  const message = (id: string, pad: number): SchemaMessageResponse => ({
    ...SchemaMessageResponse.fromPartial({ id, importName: "customers", task: SchemasTasks.UPLOAD_SCHEMA }),
    extra: { pad: "p".repeat(pad) }
  })
  const delivery = (n: number, pad: number, traced: boolean) => {
    const info = { deliveryId: String(n), redelivered: n % 2 === 0, deliveryCount: n % 3 }
    const traceContext = traced ? { traceparent: `00-${"a".repeat(32)}-${"b".repeat(16)}-01`, tracestate: n % 2 ? "" : "k=v" } : undefined
    const decoded = message(`m-${n}`, pad)
    return {
      encoded: new EncodedDelivery(info, SchemaMessageResponse.encode(decoded).finish(), traceContext),
      generated: { info, message: decoded, traceContext }
    }
  }

  it("writes one delivery as the generated encoder writes its event", () => {
    for (const [n, pad, traced] of [[0, 0, false], [1, 10, true], [2, 200, false], [7, 20_000, true]] as const) {
      const { encoded, generated } = delivery(n, pad, traced)
      const expected = SchemaSubscriptionEvent.encode({ event: { $case: "delivery", value: generated } }).finish()
      expect(hex(serialize(encoded))).toBe(hex(expected))
    }
  })

  it("writes a batch of deliveries as the generated encoder writes its event", () => {
    const batch = Array.from({ length: 40 }, (_, n) => delivery(n + 1, (n * 37) % 400, n % 4 === 0))
    const expected = SchemaSubscriptionEvent.encode({
      event: { $case: "deliveries", value: { deliveries: batch.map((d) => d.generated) } }
    }).finish()
    expect(hex(serialize(new EncodedDeliveries(batch.map((d) => d.encoded))))).toBe(hex(expected))
  })
})
