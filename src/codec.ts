/**
 * Decodes the JSON bodies the API publishes on RabbitMQ (CONTRACT.md §3) into the ts-proto
 * messages streamed to gRPC clients.
 *
 * Two steps, both synchronous:
 * 1. `Wire*` schemas validate the JSON exactly as the publisher writes it (snake_case keys,
 *    aliases, nulls). Every rejection comes from here (or from UTF-8/JSON parsing) and carries
 *    the path of the offending field.
 * 2. `to*` functions reshape the validated value into the proto type. They fail on nothing the
 *    schemas accept, short of a value nested deep enough to overflow the stack (caught below).
 *
 * ts-proto's `fromJSON` is deliberately not used: it coerces silently instead of validating.
 *
 * What a stream sends is the protobuf encoding of that message (`transcode*`). For the common
 * shapes (the guards below) the bytes are written straight from the parsed JSON, the same bytes
 * ts-proto's `encode` writes for the message `to*` would build (test/codec.test.ts compares them on
 * every fixture and generated body), without building the message or the map entries on the way:
 * that halves the proxy's own work per message after `JSON.parse`.
 */
import { Result, Schema } from "effect"
import {
  type JsonSchema,
  type Metadata,
  type Properties,
  PropertyType,
  SchemaMessageResponse,
  SchemasTasks,
  ValidationMessageResponse,
  ValidationTasks
} from "../gen/messaging.js"
import type { ProtobufWriter } from "./protobufWriter.js"
import { encodeWith, writeWith } from "./serialization.js"

/** A body that is not a message to stream; `reason` is short and never echoes the body. */
export class BodyRejected extends Schema.TaggedError<BodyRejected>()("BodyRejected", {
  reason: Schema.String
}) {}

// ---------------------------------------------------------------------------------------------
// Wire schemas
// ---------------------------------------------------------------------------------------------

// The publisher is Python: an optional field set to None arrives as null, so null means absent
// for every optional field (only `id` is required).
const nullable = <S extends Schema.Top>(schema: S) => Schema.optionalKey(Schema.NullOr(schema))

// map<string, string> in the proto; numbers and booleans are stringified later. Null values
// are skipped (a map entry cannot be "absent but present").
const Extra = Schema.Record(
  Schema.String,
  Schema.NullOr(Schema.Union([Schema.String, Schema.Number, Schema.Boolean]))
)

const Id = Schema.String.check(Schema.isNonEmpty())

// Fields the proxy only passes on (`date`, `file_data`, names, …) are checked for their JSON type
// and nothing else: the original proxy copied them through as they were, and publishers rely on
// it (a `date` of "25/06/2025 10:31" is theirs to mean). Only what the proxy itself converts is
// checked for content: the task names, property types, `metadata.size` (int64) and `id`.

// int64 in the proto (forceLong=string): a safe non-negative integer, or a decimal string for
// sizes beyond 2^53 (bounded by int64 so the protobuf writer cannot throw later).
const INT64_MAX = 9223372036854775807n
const DECIMAL = /^\d+$/
const isInt64String = (s: string): boolean => DECIMAL.test(s) && BigInt(s) <= INT64_MAX
const Size = Schema.Union([
  Schema.Int.check(Schema.isGreaterThanOrEqualTo(0)),
  Schema.String.check(
    Schema.makeFilter(isInt64String, { expected: "a non-negative decimal integer string within int64" })
  )
])

const WireProperty = Schema.StructWithRest(
  Schema.Struct({
    type: Schema.Literals(["string", "integer", "number", "boolean"]),
    extra: nullable(Extra)
  }),
  // Real JSON Schemas put keywords (minimum, format, enum, …) directly in the property.
  [Schema.Record(Schema.String, Schema.Unknown)]
)

const WireJsonSchema = Schema.Struct({
  schema: nullable(Schema.String),
  $schema: nullable(Schema.String),
  type: nullable(Schema.String),
  required: nullable(Schema.Array(Schema.String)),
  properties: nullable(Schema.Record(Schema.String, WireProperty))
})

// Unknown top-level keys are dropped by Struct (the default), which keeps us forward compatible.
const notAnObject = { message: "Expected a JSON object" }

const WireSchemaMessage = Schema.Struct({
  id: Id,
  tasks: nullable(Schema.String),
  task: nullable(Schema.String),
  schema: nullable(WireJsonSchema),
  import_name: nullable(Schema.String),
  raw: nullable(Schema.Boolean),
  date: nullable(Schema.String),
  extra: nullable(Extra)
}).annotate(notAnObject)

const WireValidationMessage = Schema.Struct({
  id: Id,
  task: nullable(Schema.String),
  tasks: nullable(Schema.String),
  file_data: nullable(Schema.String),
  import_name: nullable(Schema.String),
  date: nullable(Schema.String),
  extra: nullable(Extra),
  metadata: nullable(Schema.Struct({
    filename: nullable(Schema.String),
    content_type: nullable(Schema.String),
    size: nullable(Size)
  }))
}).annotate(notAnObject)

type WireProperty = typeof WireProperty.Type
type WireJsonSchema = typeof WireJsonSchema.Type
type WireSchemaMessage = typeof WireSchemaMessage.Type
type WireValidationMessage = typeof WireValidationMessage.Type
type WireMetadata = NonNullable<WireValidationMessage["metadata"]>

// ---------------------------------------------------------------------------------------------
// Wire → proto (total functions: everything was validated above)
// ---------------------------------------------------------------------------------------------

// Plain assignment of "__proto__" would change the prototype instead of adding an entry.
const setEntry = <V>(out: Record<string, V>, key: string, value: V): void => {
  if (key === "__proto__") {
    Object.defineProperty(out, key, { value, writable: true, enumerable: true, configurable: true })
  } else {
    out[key] = value
  }
}

/** Stringifies map values: scalars with String(), objects/arrays as JSON; null is skipped. */
const addEntries = (
  out: Record<string, string>,
  values: Readonly<Record<string, unknown>>,
  skip?: ReadonlySet<string>
): Record<string, string> => {
  for (const key in values) {
    if (skip?.has(key)) continue
    const value = values[key]
    if (value === null || value === undefined) continue
    setEntry(out, key, typeof value === "object" ? JSON.stringify(value) : String(value))
  }
  return out
}

const toExtra = (extra: Readonly<Record<string, unknown>> | null | undefined): Record<string, string> =>
  extra ? addEntries({}, extra) : {}

const PROPERTY_TYPES = {
  string: PropertyType.STRING,
  integer: PropertyType.INTEGER,
  number: PropertyType.NUMBER,
  boolean: PropertyType.BOOLEAN
} as const

const PROPERTY_OWN_KEYS: ReadonlySet<string> = new Set(["type", "extra"])

// Direct keywords first, then the explicit `extra`, so `extra` wins on a clash.
const toProperties = (p: WireProperty): Properties => {
  const extra = addEntries({}, p, PROPERTY_OWN_KEYS)
  if (p.extra) addEntries(extra, p.extra)
  return { type: PROPERTY_TYPES[p.type], extra }
}

const toJsonSchema = (s: WireJsonSchema): JsonSchema => {
  const properties: Record<string, Properties> = {}
  if (s.properties) for (const [key, p] of Object.entries(s.properties)) setEntry(properties, key, toProperties(p))
  return {
    schema: s.schema ?? s.$schema ?? "",
    type: s.type ?? "",
    required: s.required ? [...s.required] : [],
    properties
  }
}

// Task names are matched case-insensitively, so the proto enum names ("UPLOAD_SCHEMA") work too;
// any other string is the zero value, as the contract says.
const SCHEMA_TASKS: Readonly<Record<string, SchemasTasks>> = {
  upload_schema: SchemasTasks.UPLOAD_SCHEMA,
  remove_schema: SchemasTasks.REMOVE_SCHEMA
}
const VALIDATION_TASKS: Readonly<Record<string, ValidationTasks>> = {
  sample_validation: ValidationTasks.SAMPLE_VALIDATION
}
const lookupTask = <T>(table: Readonly<Record<string, T>>, name: string | null | undefined, unknown: T): T => {
  if (name == null) return unknown
  const key = name.toLowerCase()
  return Object.hasOwn(table, key) ? table[key]! : unknown
}

const toSchemaMessage = (m: WireSchemaMessage): SchemaMessageResponse => ({
  id: m.id,
  schema: m.schema ? toJsonSchema(m.schema) : undefined,
  importName: m.import_name ?? "",
  raw: m.raw ?? false,
  // the API writes `tasks`; `task` (the proto name) is the fallback
  task: lookupTask(SCHEMA_TASKS, m.tasks ?? m.task, SchemasTasks.SCHEMAS_TASKS_UNKNOWN),
  date: m.date ?? "",
  extra: toExtra(m.extra)
})

// A decimal string may carry leading zeros; BigInt gives the canonical form.
const toMetadata = (m: WireMetadata): Metadata => ({
  filename: m.filename ?? "",
  contentType: m.content_type ?? "",
  size: m.size == null ? "0" : typeof m.size === "number" ? String(m.size) : BigInt(m.size).toString()
})

const toValidationMessage = (m: WireValidationMessage): ValidationMessageResponse => ({
  id: m.id,
  // the API writes `task` here; `tasks` is the fallback
  task: lookupTask(VALIDATION_TASKS, m.task ?? m.tasks, ValidationTasks.VALIDATION_TASKS_UNKNOWN),
  fileData: m.file_data ?? "",
  importName: m.import_name ?? "",
  date: m.date ?? "",
  extra: toExtra(m.extra),
  metadata: m.metadata ? toMetadata(m.metadata) : undefined
})

// ---------------------------------------------------------------------------------------------
// Fast path: plain-JS guards for the common wire shapes
// ---------------------------------------------------------------------------------------------
//
// The Schema parser costs far more per message than JSON.parse (a profile of the proxy measured
// ~22 µs per 1 KiB schema message). These guards say `true` only when the matching `Wire*`
// schema would accept the value *and* decoding it would change nothing that `to*` reads (today
// they happen to cover every JSON body the schemas accept; being more conservative is allowed):
// - Struct/Record decoding of a JSON value only copies it: the decoded object has the same
//   values (nested `Unknown` values by reference), Record keys in `Object.keys` order and
//   `__proto__` kept as an own key; unknown keys of a Struct are dropped, and `to*` never reads
//   them. So `to*` applied to the parsed JSON gives the same proto object as applied to the
//   decoded value (test/codec.test.ts checks this on generated inputs).
// - The refinements reuse the very predicates of the schemas (isInt64String).
// Anything else (a wrong type anywhere, a failing refinement, a nested `extra` value, …) returns
// `false`, and the Schema path decides — so every rejection and its reason come from there.
//
// Precondition: the argument is a JSON.parse result (plain objects and arrays, no `undefined`,
// no accessors), so "absent" and "null" are the only values `== null` matches.

type JsonObject = Readonly<Record<string, unknown>>

const isJsonObject = (u: unknown): u is JsonObject => typeof u === "object" && u !== null && !Array.isArray(u)

/** `nullable(Schema.String)`: absent, null or a string. */
const isOptString = (u: unknown): boolean => u == null || typeof u === "string"

/** `nullable(Extra)`: absent, null, or an object of string | number | boolean | null. */
const isOptExtra = (u: unknown): boolean => {
  if (u == null) return true
  if (!isJsonObject(u)) return false
  for (const key in u) {
    const v = u[key]
    if (v !== null && typeof v !== "string" && typeof v !== "number" && typeof v !== "boolean") return false
  }
  return true
}

const isId = (u: unknown): boolean => typeof u === "string" && u.length > 0

/** `WireProperty`: a known `type`, an optional flat `extra`; every other key is any JSON value. */
const isWireProperty = (u: unknown): boolean => {
  if (!isJsonObject(u)) return false
  const type = u["type"]
  return (type === "string" || type === "integer" || type === "number" || type === "boolean") &&
    isOptExtra(u["extra"])
}

const isOptStringArray = (u: unknown): boolean => {
  if (u == null) return true
  if (!Array.isArray(u)) return false
  for (let i = 0; i < u.length; i++) if (typeof u[i] !== "string") return false
  return true
}

const isOptProperties = (u: unknown): boolean => {
  if (u == null) return true
  if (!isJsonObject(u)) return false
  for (const key in u) if (!isWireProperty(u[key])) return false
  return true
}

const isOptWireJsonSchema = (u: unknown): boolean => {
  if (u == null) return true
  return isJsonObject(u) &&
    isOptString(u["schema"]) &&
    isOptString(u["$schema"]) &&
    isOptString(u["type"]) &&
    isOptStringArray(u["required"]) &&
    isOptProperties(u["properties"])
}

const isWireSchemaMessage = (u: unknown): u is WireSchemaMessage => {
  if (!isJsonObject(u)) return false
  const raw = u["raw"]
  return isId(u["id"]) &&
    isOptString(u["tasks"]) &&
    isOptString(u["task"]) &&
    isOptString(u["import_name"]) &&
    (raw == null || typeof raw === "boolean") &&
    isOptString(u["date"]) &&
    isOptExtra(u["extra"]) &&
    isOptWireJsonSchema(u["schema"])
}

const isOptSize = (u: unknown): boolean =>
  u == null ||
  (typeof u === "number" ? Number.isSafeInteger(u) && u >= 0 : typeof u === "string" && isInt64String(u))

const isOptWireMetadata = (u: unknown): boolean => {
  if (u == null) return true
  return isJsonObject(u) &&
    isOptString(u["filename"]) &&
    isOptString(u["content_type"]) &&
    isOptSize(u["size"])
}

const isWireValidationMessage = (u: unknown): u is WireValidationMessage => {
  if (!isJsonObject(u)) return false
  return isId(u["id"]) &&
    isOptString(u["task"]) &&
    isOptString(u["tasks"]) &&
    isOptString(u["import_name"]) &&
    isOptString(u["date"]) &&
    isOptExtra(u["extra"]) &&
    isOptWireMetadata(u["metadata"]) &&
    isOptString(u["file_data"])
}

// ---------------------------------------------------------------------------------------------
// Fast path, bytes: the guarded JSON written as protobuf directly
// ---------------------------------------------------------------------------------------------
//
// Each writer emits exactly what ts-proto's generated `encode` emits for the `to*` result: fields
// in field-number order, proto3 defaults ("" / 0 / false) left out, map entries in the key order
// of the object `to*` builds (which is the JSON object's own order: both are ordinary objects
// filled in that order), each entry without an empty key or value. Only called on values a guard
// accepted.

/** A string field, left out when empty (proto3 default). */
const writeString = (w: ProtobufWriter, tag: number, value: string | null | undefined): void => {
  if (value != null && value !== "") w.uint32(tag).string(value)
}

/** One map<string, string> entry as its own length-delimited message { key = 1, value = 2 }. */
const writeEntry = (w: ProtobufWriter, tag: number, key: string, value: string): void => {
  w.uint32(tag).fork()
  if (key !== "") w.uint32(10).string(key)
  if (value !== "") w.uint32(18).string(value)
  w.join()
}

/** Map entries as `addEntries` stringifies them: nulls skipped, objects as JSON, scalars with String(). */
const writeEntries = (w: ProtobufWriter, tag: number, values: JsonObject, skip?: ReadonlySet<string>): void => {
  for (const key in values) {
    if (skip?.has(key)) continue
    const value = values[key]
    if (value === null || value === undefined) continue
    writeEntry(w, tag, key, typeof value === "object" ? JSON.stringify(value) : String(value))
  }
}

/** Properties { type = 1, extra = 2 }, as `toProperties` builds it. */
const writeProperties = (w: ProtobufWriter, p: JsonObject): void => {
  const type = PROPERTY_TYPES[p["type"] as WireProperty["type"]]
  if (type !== 0) w.uint32(8).int32(type)
  const extra = p["extra"]
  if (extra == null) return writeEntries(w, 18, p, PROPERTY_OWN_KEYS)
  // Keywords and `extra` merged (`extra` wins on a clash, in the keyword's place): build the map.
  writeEntries(w, 18, addEntries(addEntries({}, p, PROPERTY_OWN_KEYS), extra as JsonObject))
}

/** JsonSchema { schema = 1, type = 2, required = 3, properties = 4 }, as `toJsonSchema` builds it. */
const writeJsonSchema = (w: ProtobufWriter, s: JsonObject): void => {
  writeString(w, 10, (s["schema"] ?? s["$schema"]) as string | null | undefined)
  writeString(w, 18, s["type"] as string | null | undefined)
  const required = s["required"] as ReadonlyArray<string> | null | undefined
  // Repeated strings are written even when empty.
  if (required != null) for (const name of required) w.uint32(26).string(name)
  const properties = s["properties"] as Readonly<Record<string, JsonObject>> | null | undefined
  if (properties == null) return
  for (const key in properties) {
    w.uint32(34).fork()
    if (key !== "") w.uint32(10).string(key)
    w.uint32(18).fork()
    writeProperties(w, properties[key]!)
    w.join().join()
  }
}

/** SchemaMessageResponse, as `toSchemaMessage` builds it. */
const writeSchemaMessage = (w: ProtobufWriter, m: JsonObject): void => {
  w.uint32(10).string(m["id"] as string)
  const schema = m["schema"] as JsonObject | null | undefined
  if (schema != null) {
    w.uint32(18).fork()
    writeJsonSchema(w, schema)
    w.join()
  }
  writeString(w, 26, m["import_name"] as string | null | undefined)
  if (m["raw"] === true) w.uint32(32).bool(true)
  const task = lookupTask(SCHEMA_TASKS, (m["tasks"] ?? m["task"]) as string | null | undefined, SchemasTasks.SCHEMAS_TASKS_UNKNOWN)
  if (task !== 0) w.uint32(40).int32(task)
  writeString(w, 50, m["date"] as string | null | undefined)
  const extra = m["extra"] as JsonObject | null | undefined
  if (extra != null) writeEntries(w, 58, extra)
}

/** ValidationMessageResponse, as `toValidationMessage` builds it. */
const writeValidationMessage = (w: ProtobufWriter, m: JsonObject): void => {
  w.uint32(10).string(m["id"] as string)
  const task = lookupTask(VALIDATION_TASKS, (m["task"] ?? m["tasks"]) as string | null | undefined, ValidationTasks.VALIDATION_TASKS_UNKNOWN)
  if (task !== 0) w.uint32(16).int32(task)
  writeString(w, 26, m["file_data"] as string | null | undefined)
  writeString(w, 34, m["import_name"] as string | null | undefined)
  const metadata = m["metadata"] as JsonObject | null | undefined
  if (metadata != null) {
    w.uint32(42).fork()
    const { size } = toMetadata(metadata as WireMetadata)
    writeString(w, 10, metadata["filename"] as string | null | undefined)
    writeString(w, 18, metadata["content_type"] as string | null | undefined)
    if (size !== "0") w.uint32(24).int64(size)
    w.join()
  }
  writeString(w, 50, m["date"] as string | null | undefined)
  const extra = m["extra"] as JsonObject | null | undefined
  if (extra != null) writeEntries(w, 58, extra)
}

// ---------------------------------------------------------------------------------------------
// Body → Result
// ---------------------------------------------------------------------------------------------

const MAX_REASON = 300
const reject = (reason: string) =>
  new BodyRejected({ reason: reason.length > MAX_REASON ? `${reason.slice(0, MAX_REASON)}…` : reason })

// fatal: invalid UTF-8 is an error rather than silently becoming U+FFFD. A leading BOM is dropped.
const utf8 = new TextDecoder("utf-8", { fatal: true })

const errorMessage = (e: unknown) => (e instanceof Error ? e.message : String(e))

// With the default `errors: "first"` the message holds one issue: 'Expected string\n  at ["id"]'.
const schemaReason = (error: Schema.SchemaError) => reject(error.message.replace(/\s*\n\s*/g, " "))

interface Decoder<A> {
  /** The public decoder: UTF-8, JSON.parse, then the guard, else the Schema. */
  readonly decode: (body: Uint8Array) => Result.Result<A, BodyRejected>
  /**
   * The public validator: accepts and rejects exactly what `decode` does (same reasons), and
   * answers only the message's id, without building the message (PublishBatch needs no more).
   */
  readonly validateId: (body: Uint8Array) => Result.Result<string, BodyRejected>
  /** The public transcoder: as `decode`, then the message's protobuf encoding. */
  readonly transcode: (body: Uint8Array) => Result.Result<Uint8Array, BodyRejected>
  /** The Schema path alone, on a parsed JSON value (for tests). */
  readonly slow: (json: unknown) => Result.Result<A, BodyRejected>
  /** The guard path alone: the message, or undefined when the guard is not sure (for tests). */
  readonly fast: (json: unknown) => A | undefined
  /** The guard path's bytes alone, or undefined when the guard is not sure (for tests). */
  readonly fastBytes: (json: unknown) => Uint8Array | undefined
}

/** UTF-8 and JSON.parse of a body, or why it is neither. */
const parseBody = (body: Uint8Array): Result.Result<unknown, BodyRejected> => {
  let text: string
  try {
    text = utf8.decode(body)
  } catch (e) {
    return Result.fail(reject(`body is not valid UTF-8: ${errorMessage(e)}`))
  }
  try {
    return Result.succeed(JSON.parse(text))
  } catch (e) {
    return Result.fail(reject(`body is not valid JSON: ${errorMessage(e)}`))
  }
}

/** Builds a body decoder once: the compiled Schema parser is reused for every message. */
const makeDecoder = <W extends { readonly id: string }, A extends { readonly id: string }>(
  schema: Schema.Decoder<W>,
  isCommon: (json: unknown) => json is W,
  toProto: (wire: W) => A,
  writeCommon: (writer: ProtobufWriter, json: JsonObject) => void,
  encode: (message: A) => Uint8Array
): Decoder<A> => {
  const decodeWire = Schema.decodeUnknownResult(schema)
  const slow = (json: unknown): Result.Result<A, BodyRejected> => {
    const wire = decodeWire(json)
    return Result.isSuccess(wire) ? Result.succeed(toProto(wire.success)) : Result.fail(schemaReason(wire.failure))
  }
  // Plain try/catch rather than Result.try/pipe: no closures or intermediate Results per message.
  // Total: whatever a body makes validation or conversion do (a JSON value nested thousands deep
  // overflows the stack in the recursive walks), it is a rejection with a reason, never an
  // exception that would end every call on the queue with the body still at its head.
  const decode = (body: Uint8Array): Result.Result<A, BodyRejected> => {
    const json = parseBody(body)
    if (Result.isFailure(json)) return Result.fail(json.failure)
    try {
      return isCommon(json.success) ? Result.succeed(toProto(json.success)) : slow(json.success)
    } catch (e) {
      return Result.fail(reject(`body cannot be decoded: ${errorMessage(e)}`))
    }
  }
  // The guard's values convert without fail (see the guards), so the common case skips `toProto`.
  const validateId = (body: Uint8Array): Result.Result<string, BodyRejected> => {
    const json = parseBody(body)
    if (Result.isFailure(json)) return Result.fail(json.failure)
    try {
      if (isCommon(json.success)) return Result.succeed(json.success.id)
      const decoded = slow(json.success)
      return Result.isSuccess(decoded) ? Result.succeed(decoded.success.id) : Result.fail(decoded.failure)
    } catch (e) {
      return Result.fail(reject(`body cannot be decoded: ${errorMessage(e)}`))
    }
  }
  const transcode = (body: Uint8Array): Result.Result<Uint8Array, BodyRejected> => {
    const json = parseBody(body)
    if (Result.isFailure(json)) return Result.fail(json.failure)
    let message: A
    try {
      if (isCommon(json.success)) {
        const common: JsonObject = json.success as JsonObject
        return Result.succeed(writeWith((w) => writeCommon(w, common)))
      }
      const decoded = slow(json.success)
      if (Result.isFailure(decoded)) return Result.fail(decoded.failure)
      message = decoded.success
    } catch (e) {
      return Result.fail(reject(`body cannot be decoded: ${errorMessage(e)}`))
    }
    try {
      return Result.succeed(encode(message))
    } catch (e) {
      return Result.fail(reject(`cannot be encoded as protobuf: ${errorMessage(e)}`))
    }
  }
  const fast = (json: unknown): A | undefined => (isCommon(json) ? toProto(json) : undefined)
  const fastBytes = (json: unknown): Uint8Array | undefined =>
    isCommon(json) ? writeWith((w) => writeCommon(w, json as JsonObject)) : undefined
  return { decode, validateId, transcode, slow, fast, fastBytes }
}

const schemaDecoder = makeDecoder(
  WireSchemaMessage,
  isWireSchemaMessage,
  toSchemaMessage,
  writeSchemaMessage,
  encodeWith(SchemaMessageResponse)
)
const validationDecoder = makeDecoder(
  WireValidationMessage,
  isWireValidationMessage,
  toValidationMessage,
  writeValidationMessage,
  encodeWith(ValidationMessageResponse)
)

export const decodeSchemaMessage: (body: Uint8Array) => Result.Result<SchemaMessageResponse, BodyRejected> =
  schemaDecoder.decode

export const decodeValidationMessage: (body: Uint8Array) => Result.Result<ValidationMessageResponse, BodyRejected> =
  validationDecoder.decode

/** The id of a body `decodeSchemaMessage` accepts, or its reason to reject it; builds no message. */
export const schemaMessageId: (body: Uint8Array) => Result.Result<string, BodyRejected> = schemaDecoder.validateId

/** The id of a body `decodeValidationMessage` accepts, or its reason to reject it; builds no message. */
export const validationMessageId: (body: Uint8Array) => Result.Result<string, BodyRejected> = validationDecoder.validateId

/** A body's SchemaMessageResponse as protobuf bytes, or why it is not one (the reasons of `decodeSchemaMessage`). */
export const transcodeSchemaMessage: (body: Uint8Array) => Result.Result<Uint8Array, BodyRejected> =
  schemaDecoder.transcode

/** A body's ValidationMessageResponse as protobuf bytes, or why it is not one (the reasons of `decodeValidationMessage`). */
export const transcodeValidationMessage: (body: Uint8Array) => Result.Result<Uint8Array, BodyRejected> =
  validationDecoder.transcode

/** Internals for test/codec.test.ts only; not part of the module's API. */
export const __testing = {
  schemaMessage: { fast: schemaDecoder.fast, slow: schemaDecoder.slow, fastBytes: schemaDecoder.fastBytes, encode: encodeWith(SchemaMessageResponse) },
  validationMessage: {
    fast: validationDecoder.fast,
    slow: validationDecoder.slow,
    fastBytes: validationDecoder.fastBytes,
    encode: encodeWith(ValidationMessageResponse)
  }
} as const
