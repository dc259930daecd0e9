/**
 * Decodes the JSON bodies the API publishes on RabbitMQ (CONTRACT.md §3) into the ts-proto
 * messages streamed to gRPC clients.
 *
 * Two steps, both synchronous:
 * 1. `Wire*` schemas validate the JSON exactly as the publisher writes it (snake_case keys,
 *    aliases, nulls). Every rejection comes from here (or from UTF-8/JSON parsing) and carries
 *    the path of the offending field.
 * 2. `to*` functions reshape the validated value into the proto type. They cannot fail.
 *
 * ts-proto's `fromJSON` is deliberately not used: it coerces silently instead of validating.
 */
import { Result, Schema } from "effect"
import {
  type JsonSchema,
  type Metadata,
  type Properties,
  PropertyType,
  type SchemaMessageResponse,
  SchemasTasks,
  type ValidationMessageResponse,
  ValidationTasks
} from "../gen/messaging.js"

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

// ISO-8601 calendar date, optionally with time (`T` or Python's `str()` space) and zone.
// The regex enforces the shape (Date.parse alone accepts "1" or "June 25"); Date.parse then
// rejects impossible values such as month 13 or hour 25. The string is kept unchanged.
const ISO_DATE = /^\d{4}-\d{2}-\d{2}(?:[Tt ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?(?:[Zz]|[+-]\d{2}(?::?\d{2})?)?)?$/
const IsoDate = Schema.String.check(
  Schema.makeFilter((s: string) => ISO_DATE.test(s) && !Number.isNaN(Date.parse(s.replace(",", "."))), {
    expected: "an ISO-8601 date string"
  })
)

// Only hex is accepted: consumers hex-decode `file_data`, so anything else would fail later
// and far from its cause; dead-lettering it here keeps the reason next to the message.
const HEX = /^[0-9a-fA-F]*$/
const HexString = Schema.String.check(
  Schema.makeFilter((s: string) => s.length % 2 === 0 && HEX.test(s), { expected: "a hex string of even length" })
)

// int64 in the proto (forceLong=string): a safe non-negative integer, or a decimal string for
// sizes beyond 2^53 (bounded by int64 so the protobuf writer cannot throw later).
const INT64_MAX = 9223372036854775807n
const DECIMAL = /^\d+$/
const Size = Schema.Union([
  Schema.Int.check(Schema.isGreaterThanOrEqualTo(0)),
  Schema.String.check(
    Schema.makeFilter((s: string) => DECIMAL.test(s) && BigInt(s) <= INT64_MAX, {
      expected: "a non-negative decimal integer string within int64"
    })
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
  date: nullable(IsoDate),
  extra: nullable(Extra)
}).annotate(notAnObject)

const WireValidationMessage = Schema.Struct({
  id: Id,
  task: nullable(Schema.String),
  tasks: nullable(Schema.String),
  file_data: nullable(HexString),
  import_name: nullable(Schema.String),
  date: nullable(IsoDate),
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
// Body → Result
// ---------------------------------------------------------------------------------------------

const MAX_REASON = 300
const reject = (reason: string) =>
  new BodyRejected({ reason: reason.length > MAX_REASON ? `${reason.slice(0, MAX_REASON)}…` : reason })

// fatal: invalid UTF-8 is an error rather than silently becoming U+FFFD. A leading BOM is dropped.
const utf8 = new TextDecoder("utf-8", { fatal: true })

const errorMessage = (e: unknown) => (e instanceof Error ? e.message : String(e))

const parseBody = (body: Uint8Array): Result.Result<unknown, BodyRejected> =>
  Result.try({
    try: () => utf8.decode(body),
    catch: (e) => reject(`body is not valid UTF-8: ${errorMessage(e)}`)
  }).pipe(
    Result.flatMap((text) =>
      Result.try({
        try: (): unknown => JSON.parse(text),
        catch: (e) => reject(`body is not valid JSON: ${errorMessage(e)}`)
      })
    )
  )

// With the default `errors: "first"` the message holds one issue: 'Expected string\n  at ["id"]'.
const schemaReason = (error: Schema.SchemaError) => reject(error.message.replace(/\s*\n\s*/g, " "))

/** Builds a body decoder once: the compiled Schema parser is reused for every message. */
const makeDecoder = <W, A>(schema: Schema.Decoder<W>, toProto: (wire: W) => A) => {
  const decodeWire = Schema.decodeUnknownResult(schema)
  return (body: Uint8Array): Result.Result<A, BodyRejected> =>
    parseBody(body).pipe(
      Result.flatMap((json) => Result.mapError(decodeWire(json), schemaReason)),
      Result.map(toProto)
    )
}

export const decodeSchemaMessage: (body: Uint8Array) => Result.Result<SchemaMessageResponse, BodyRejected> =
  makeDecoder(WireSchemaMessage, toSchemaMessage)

export const decodeValidationMessage: (body: Uint8Array) => Result.Result<ValidationMessageResponse, BodyRejected> =
  makeDecoder(WireValidationMessage, toValidationMessage)
