/**
 * The wire contract cannot drift: our descriptors (gen/messaging.binpb, what `npm run gen` built
 * from proto/messaging.proto) are held against the original clients' view of the contract
 * (test/fixtures/original/messaging.proto, compiled here with buf), for the five contract RPCs and
 * every message and enum they reach: method shapes, and per field its name, number, type, label,
 * referenced type and oneof. Any difference fails, whichever side has it. Package names are
 * compared away: the wire does not carry them (the original spreads its types over packages).
 */
import { fromBinary } from "@bufbuild/protobuf"
import {
  type DescriptorProto,
  type EnumDescriptorProto,
  FieldDescriptorProto_Label,
  FieldDescriptorProto_Type,
  type FileDescriptorSet,
  FileDescriptorSetSchema,
  type ServiceDescriptorProto
} from "@bufbuild/protobuf/wkt"
import { execFileSync } from "node:child_process"
import { mkdtempSync, readFileSync, rmSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { fileURLToPath } from "node:url"
import { describe, expect, it } from "vitest"

const root = fileURLToPath(new URL("..", import.meta.url))
const CONTRACT_RPCS = [
  "GetMessagingParams",
  "GetRoutingKeySchemas",
  "GetRoutingKeyValidations",
  "StreamSchemaMessages",
  "StreamValidationMessages"
]

/**
 * Fields the proxy added to contract messages, by message: allowed only with numbers the original
 * does not use (checked below), so an original client skips them as unknown fields.
 */
const ADDITIONS: Record<string, ReadonlyArray<string>> = {
  GetMessagingParamsResponse: ["nodes"]
}

const ours = fromBinary(FileDescriptorSetSchema, readFileSync(join(root, "gen/messaging.binpb")))

const original = (() => {
  const dir = mkdtempSync(join(tmpdir(), "original-contract-"))
  try {
    const out = join(dir, "original.binpb")
    execFileSync(join(root, "node_modules/.bin/buf"), ["build", "test/fixtures/original", "-o", out], { cwd: root })
    return fromBinary(FileDescriptorSetSchema, readFileSync(out))
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
})()

/** Every message and enum of a descriptor set by its name without package (".pkg.A.B" → "A.B"). */
const index = (set: FileDescriptorSet) => {
  const messages = new Map<string, DescriptorProto>()
  const enums = new Map<string, EnumDescriptorProto>()
  let service: ServiceDescriptorProto | undefined
  const addMessage = (prefix: string, message: DescriptorProto) => {
    const name = prefix + message.name
    messages.set(name, message)
    for (const nested of message.nestedType) addMessage(`${name}.`, nested)
    for (const e of message.enumType) enums.set(`${name}.${e.name}`, e)
  }
  for (const file of set.file) {
    for (const message of file.messageType) addMessage("", message)
    for (const e of file.enumType) enums.set(e.name, e)
    service ??= file.service.find((s) => s.name === "MessagingService")
  }
  if (service === undefined) throw new Error("no MessagingService in the descriptor set")
  return { messages, enums, service }
}

/** ".messaging.ExchangeInfo" / ".dtypes.ExchangeInfo" → "ExchangeInfo" (top-level types here). */
const shortName = (typeName: string) => typeName.replace(/^\.[^.]+\./, "")

/** What the wire and a generated client see of one descriptor set, from the five RPCs down. */
const contractView = (set: FileDescriptorSet) => {
  const { enums, messages, service } = index(set)
  const view: Record<string, unknown> = {}
  const visit = (name: string) => {
    if (name in view) return
    const message = messages.get(name)
    const enumType = enums.get(name)
    if (message !== undefined) {
      view[name] = message.field
        .map((f) => ({
          name: f.name,
          number: f.number,
          type: FieldDescriptorProto_Type[f.type],
          label: FieldDescriptorProto_Label[f.label],
          typeName: f.typeName === "" ? undefined : shortName(f.typeName),
          oneof: f.oneofIndex === undefined ? undefined : message.oneofDecl[f.oneofIndex]?.name,
          map: message.options?.mapEntry === true ? true : undefined
        }))
        .sort((a, b) => a.number - b.number)
      for (const f of message.field) if (f.typeName !== "") visit(shortName(f.typeName))
    } else if (enumType !== undefined) {
      view[name] = enumType.value.map((v) => ({ name: v.name, number: v.number }))
    } else {
      view[name] = "missing"
    }
  }
  const rpcs = CONTRACT_RPCS.map((rpc) => {
    const method = service.method.find((m) => m.name === rpc)
    if (method === undefined) return { rpc, missing: true }
    visit(shortName(method.inputType))
    visit(shortName(method.outputType))
    return {
      rpc,
      input: shortName(method.inputType),
      output: shortName(method.outputType),
      clientStreaming: method.clientStreaming === true,
      serverStreaming: method.serverStreaming === true
    }
  })
  return { rpcs, types: view }
}

describe("wire contract against the original clients' proto", () => {
  const want = contractView(original)
  const got = contractView(ours)

  it("the fixture covers the five RPCs and the messages the original clients use", () => {
    expect(want.rpcs.map((r) => r.rpc)).toStrictEqual(CONTRACT_RPCS)
    expect(Object.keys(want.types).sort()).toStrictEqual([
      "ExchangeInfo",
      "GetMessagingParamsRequest",
      "GetMessagingParamsResponse",
      "GetRoutingKeySchemasRequest",
      "GetRoutingKeyValidationsRequest",
      "JsonSchema",
      "JsonSchema.PropertiesEntry",
      "Metadata",
      "Properties",
      "Properties.ExtraEntry",
      "PropertyType",
      "QueueInfo",
      "RoutingKey",
      "SchemaMessageRequest",
      "SchemaMessageResponse",
      "SchemaMessageResponse.ExtraEntry",
      "SchemasTasks",
      "ValidationMessageRequest",
      "ValidationMessageResponse",
      "ValidationMessageResponse.ExtraEntry",
      "ValidationTasks"
    ])
  })

  it("the five RPCs have the original's names, request and response types and streaming", () => {
    expect(got.rpcs).toStrictEqual(want.rpcs)
  })

  type FieldView = { readonly name: string; readonly number: number }
  const withoutAdditions = (name: string, view: unknown) =>
    Array.isArray(view) ? (view as Array<FieldView>).filter((f) => !(ADDITIONS[name] ?? []).includes(f.name)) : view

  // One test per type, so a failure names the type and shows the field that moved.
  for (const name of Object.keys(want.types).sort()) {
    it(`${name}: every field's name, number, type and label are the original's`, () => {
      expect(withoutAdditions(name, got.types[name])).toStrictEqual(want.types[name])
    })
  }

  it("the proxy's additions use field numbers the original does not, and are listed on purpose", () => {
    for (const [name, added] of Object.entries(ADDITIONS)) {
      const original = want.types[name] as Array<FieldView>
      const ours = (got.types[name] as Array<FieldView>).filter((f) => added.includes(f.name))
      expect(ours.map((f) => f.name).sort()).toStrictEqual([...added].sort())
      for (const field of ours) expect(original.map((f) => f.number)).not.toContain(field.number)
    }
  })

  it("the original numbers of the three messages once mis-numbered (GetMessagingParamsResponse, QueueInfo, ValidationMessageResponse)", () => {
    const numbers = (type: string) =>
      Object.fromEntries((withoutAdditions(type, got.types[type]) as Array<FieldView>).map((f) => [f.name, f.number]))
    expect(numbers("GetMessagingParamsResponse")).toStrictEqual({
      host: 1, port: 2, virtual_host: 3, username: 4, password: 5, exchange: 6
    })
    expect(numbers("QueueInfo")).toStrictEqual({ queue: 1, routing_key: 2, durable: 3 })
    expect(numbers("ValidationMessageResponse")).toStrictEqual({
      id: 1, task: 2, file_data: 3, import_name: 4, metadata: 5, date: 6, extra: 7
    })
  })
})
