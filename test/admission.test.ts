/**
 * Admission is total (issue 10, fault 2): whatever body a publisher sends — deep, wide or odd JSON,
 * or bytes that are not JSON at all — admitting it either hands the message on or dead-letters
 * it with a reason. It never throws, so it can never end the calls on a queue and leave the body
 * at the queue's head. Property-based (fast-check) through the real decoders and encoders; the
 * broker side of a delivery is a stub here (pure logic), the rest of the path is tested elsewhere.
 */
import { Effect, Exit } from "effect"
import fc from "fast-check"
import { describe, expect, it } from "vitest"
import { transcodeSchemaMessage, transcodeValidationMessage } from "../src/codec.js"
import { admitAll, type AdmissionPolicy } from "../src/redelivery.js"
import { stubDelivery } from "./support/stubs.js"

const policy = (transcode: AdmissionPolicy["transcode"]): AdmissionPolicy => ({
  queue: "q",
  maxRequeues: 5,
  transcode,
  maxEncodedBytes: 4 * 1024 * 1024,
  maxEncodedBytesSource: "GRPC_CLIENT_MAX_RECEIVE_MESSAGE_BYTES",
  declaredAs: { durable: true }
})

const policies = [
  ["schema", policy(transcodeSchemaMessage)],
  ["validation", policy(transcodeValidationMessage)]
] as const

/** Admits one body; the outcome, or the defect that admission must never have. */
const admit = (content: Buffer, which: (typeof policies)[number][1]) => {
  const deadLettered: Array<string> = []
  const exit = Effect.runSyncExit(admitAll([stubDelivery({ content }, deadLettered)], which))
  return { exit, deadLettered }
}

/** A JSON text nested `depth` deep, built as text (JSON.stringify would itself overflow). */
const nestedText = (depth: number, open: string, close: string, inner: string) =>
  open.repeat(depth) + inner + close.repeat(depth)

// Any JSON value, deep and wide, and odd strings (unicode, lone surrogates survive as escapes).
const jsonValue = fc.jsonValue({ maxDepth: 6 })
const deepText = fc.record({
  depth: fc.integer({ min: 1, max: 20_000 }),
  kind: fc.constantFrom(["[", "]"], ['{"a":', "}"], ['[{"k":', "}]"])
}).map(({ depth, kind }) => nestedText(depth, kind[0], kind[1], "0"))
// The places of a body a publisher can fill, for both message kinds.
const bodyAround = (value: string) =>
  fc.constantFrom(
    `{"id":"p","schema":{"properties":{"p":{"type":"string","k":${value}}}}}`,
    `{"id":"p","schema":{"properties":{"p":{"type":"string","extra":${value}}}}}`,
    `{"id":"p","schema":${value}}`,
    `{"id":"p","extra":${value}}`,
    `{"id":"p","metadata":${value}}`,
    `{"id":${value}}`,
    `{"id":"p","date":${value},"file_data":${value}}`,
    value
  )

describe("admission is total", () => {
  for (const [name, which] of policies) {
    it(`${name}: any JSON value anywhere in a body is delivered or dead-lettered with a reason, never thrown`, () => {
      fc.assert(
        fc.property(jsonValue.chain((v) => bodyAround(JSON.stringify(v))), (body) => {
          const { exit, deadLettered } = admit(Buffer.from(body), which)
          expect(Exit.isSuccess(exit)).toBe(true)
          if (!Exit.isSuccess(exit)) return
          const [admission] = exit.value
          if (admission._tag === "DeadLettered") expect(deadLettered).toStrictEqual([admission.reason])
          else expect(deadLettered).toStrictEqual([])
        }),
        { numRuns: 500 }
      )
    })

    it(`${name}: values nested up to 20,000 deep are delivered or dead-lettered, never thrown`, () => {
      fc.assert(
        fc.property(deepText.chain(bodyAround), (body) => {
          const { exit, deadLettered } = admit(Buffer.from(body), which)
          expect(Exit.isSuccess(exit)).toBe(true)
          if (Exit.isSuccess(exit) && exit.value[0]._tag === "DeadLettered") expect(deadLettered.length).toBe(1)
        }),
        { numRuns: 60 }
      )
    })

    it(`${name}: arbitrary bytes are delivered or dead-lettered, never thrown`, () => {
      fc.assert(
        fc.property(fc.uint8Array({ maxLength: 2_000 }), (bytes) => {
          expect(Exit.isSuccess(admit(Buffer.from(bytes), which).exit)).toBe(true)
        }),
        { numRuns: 300 }
      )
    })
  }

  it("the issue's example: a keyword holding an array nested 5,000 deep is dead-lettered with a reason", () => {
    const body = `{"id":"dp","schema":{"properties":{"p":{"type":"string","k":${nestedText(5_000, "[", "]", "")}}}}}`
    const { exit, deadLettered } = admit(Buffer.from(body), policies[0][1])
    expect(Exit.isSuccess(exit)).toBe(true)
    expect(deadLettered).toHaveLength(1)
    expect(deadLettered[0]).toMatch(/^body cannot be decoded: Maximum call stack size exceeded/)
  })
})
