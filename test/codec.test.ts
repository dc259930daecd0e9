import { describe, expect, it } from "@effect/vitest"
import { Result } from "effect"
import {
  __testing,
  type BodyRejected,
  decodeSchemaMessage as publicDecodeSchemaMessage,
  decodeValidationMessage as publicDecodeValidationMessage,
  schemaMessageId,
  transcodeSchemaMessage,
  transcodeValidationMessage,
  validationMessageId
} from "../src/codec.js"
import {
  PropertyType,
  SchemaMessageResponse,
  SchemasTasks,
  ValidationMessageResponse,
  ValidationTasks
} from "../gen/messaging.js"
import {
  schemaBody,
  schemaMessage as expectedSchemaMessage,
  validationBody,
  validationMessage as expectedValidationMessage
} from "./fixtures/bodies.js"

const bytes = (body: string | object): Uint8Array =>
  new TextEncoder().encode(typeof body === "string" ? body : JSON.stringify(body))

// ---------------------------------------------------------------------------------------------
// Fast path vs Schema path
// ---------------------------------------------------------------------------------------------

/** The two internal paths of one decoder, on a parsed JSON value. */
interface Paths<A> {
  readonly fast: (json: unknown) => A | undefined
  readonly slow: (json: unknown) => Result.Result<A, BodyRejected>
  /** The fast path written straight to protobuf bytes. */
  readonly fastBytes: (json: unknown) => Uint8Array | undefined
  /** ts-proto's encode of a message (what the bytes must equal). */
  readonly encode: (message: A) => Uint8Array
}

/** Deep-equal, same classes, and the same key order (map entries are encoded in that order). */
const expectSameMessage = (actual: unknown, expected: unknown, label?: string) => {
  expect(actual, label).toStrictEqual(expected)
  expect(JSON.stringify(actual), label).toBe(JSON.stringify(expected))
}

const NOT_JSON = Symbol("not JSON")
const parseLikeTheDecoder = (body: Uint8Array): unknown => {
  try {
    return JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(body))
  } catch {
    return NOT_JSON
  }
}

/**
 * Checks the public decoder's result for `json` against both internal paths:
 * - Schema accepts → the public result is deep-equal to the Schema path's, and so is the fast
 *   path's whenever it answers; the guard answering on every accepted body is checked too when
 *   `requireFast` (it does for every body the Schema accepts today — see src/codec.ts);
 * - Schema rejects → the fast path does not answer, and the public decoder gives the same reason;
 * - the fast path's bytes, when it answers, are ts-proto's encoding of the Schema path's message.
 * Returns whether the Schema accepted and whether the fast path answered.
 */
const comparePaths = <A>(
  paths: Paths<A>,
  json: unknown,
  result: Result.Result<A, BodyRejected>,
  options: { readonly requireFast: boolean; readonly label?: string }
): { readonly accepted: boolean; readonly fast: boolean } => {
  const { label } = options
  const slow = paths.slow(json)
  const fast = paths.fast(json)
  const fastBytes = paths.fastBytes(json)
  if (Result.isFailure(slow)) {
    expect(fast, `fast path answered for a body the Schema rejects: ${label}`).toBeUndefined()
    expect(fastBytes, `fast bytes for a body the Schema rejects: ${label}`).toBeUndefined()
    expect(Result.isFailure(result), label).toBe(true)
    if (Result.isFailure(result)) expect(result.failure.reason, label).toBe(slow.failure.reason)
    return { accepted: false, fast: false }
  }
  if (Result.isFailure(result)) throw new Error(`public decoder rejected what the Schema accepts: ${label}`)
  expectSameMessage(result.success, slow.success, label)
  if (fast !== undefined) expectSameMessage(fast, slow.success, label)
  expect(fastBytes === undefined, `the two fast paths disagree on answering: ${label}`).toBe(fast === undefined)
  if (fastBytes !== undefined) expect(Buffer.from(fastBytes).toString("hex"), label).toBe(Buffer.from(paths.encode(slow.success)).toString("hex"))
  else if (options.requireFast) throw new Error(`fast path did not cover an accepted body: ${label}`)
  return { accepted: true, fast: fast !== undefined }
}

/**
 * The public decoder, with every call cross-checked against both internal paths and against the
 * public transcoder (what streams send): the same rejection, or ts-proto's encoding of the message;
 * and against the id validator (what Publish and PublishBatch accept): the same rejection, or the id.
 */
const checked = <A extends { readonly id: string }>(
  decode: (body: Uint8Array) => Result.Result<A, BodyRejected>,
  transcode: (body: Uint8Array) => Result.Result<Uint8Array, BodyRejected>,
  validateId: (body: Uint8Array) => Result.Result<string, BodyRejected>,
  paths: Paths<A>
) =>
(body: Uint8Array): Result.Result<A, BodyRejected> => {
  const result = decode(body)
  const label = new TextDecoder().decode(body)
  const json = parseLikeTheDecoder(body)
  if (json !== NOT_JSON) comparePaths(paths, json, result, { requireFast: true, label })
  const transcoded = transcode(body)
  const id = validateId(body)
  expect(Result.isFailure(id) ? `rejected: ${id.failure.reason}` : id.success, label)
    .toBe(Result.isFailure(result) ? `rejected: ${result.failure.reason}` : result.success.id)
  if (Result.isFailure(result)) {
    expect(Result.isFailure(transcoded) ? transcoded.failure.reason : "accepted", label).toBe(result.failure.reason)
  } else {
    if (Result.isFailure(transcoded)) throw new Error(`transcoder rejected what the decoder accepts (${transcoded.failure.reason}): ${label}`)
    expect(Buffer.from(transcoded.success).toString("hex"), label).toBe(Buffer.from(paths.encode(result.success)).toString("hex"))
  }
  return result
}

// Every decode in this file goes through these, so every fixture below also checks the fast path
// and the transcoder.
const decodeSchemaMessage = checked(publicDecodeSchemaMessage, transcodeSchemaMessage, schemaMessageId, __testing.schemaMessage)
const decodeValidationMessage = checked(publicDecodeValidationMessage, transcodeValidationMessage, validationMessageId, __testing.validationMessage)

const ok = <A>(result: Result.Result<A, BodyRejected>): A => {
  if (Result.isFailure(result)) throw new Error(`unexpected rejection: ${result.failure.reason}`)
  return result.success
}

const rejected = <A>(result: Result.Result<A, BodyRejected>): string => {
  if (Result.isSuccess(result)) throw new Error(`unexpected success: ${JSON.stringify(result.success)}`)
  expect(result.failure._tag).toBe("BodyRejected")
  return result.failure.reason
}

const schemaMsg = (fields: object) => ok(decodeSchemaMessage(bytes({ id: "s1", ...fields })))
const validationMsg = (fields: object) => ok(decodeValidationMessage(bytes({ id: "v1", ...fields })))
const schemaReason = (fields: object) => rejected(decodeSchemaMessage(bytes({ id: "s1", ...fields })))
const validationReason = (fields: object) => rejected(decodeValidationMessage(bytes({ id: "v1", ...fields })))

// CONTRACT.md §3, verbatim
const CONTRACT_SCHEMA_BODY = `{"id": "6f1c…", "schema": {"schema": "http://json-schema.org/draft-07/schema#", "type": "object",
  "required": ["name"], "properties": {"name": {"type": "string", "extra": {}},
  "age": {"type": "integer", "extra": {"minimum": 0}}}},
 "import_name": "customers", "raw": false, "tasks": "upload_schema",
 "date": "2025-06-25T10:31:02.123456", "extra": {}}`

const CONTRACT_VALIDATION_BODY = `{"id": "9a2e…", "task": "sample_validation", "file_data": "48656c6c6f20576f726c6421",
 "import_name": "customers", "metadata": {"filename": "a.csv", "content_type": "text/csv", "size": 12},
 "date": "2025-06-25T10:31:02.123456", "extra": {"priority": "high"}}`

describe("decodeSchemaMessage", () => {
  it("decodes the contract example field for field", () => {
    expect(ok(decodeSchemaMessage(bytes(CONTRACT_SCHEMA_BODY)))).toStrictEqual(expectedSchemaMessage("6f1c…"))
  })

  it("produces a message the protobuf encoder round-trips", () => {
    const msg = ok(decodeSchemaMessage(bytes(CONTRACT_SCHEMA_BODY)))
    expect(SchemaMessageResponse.decode(SchemaMessageResponse.encode(msg).finish())).toStrictEqual(msg)
  })

  it("accepts a Node Buffer body", () => {
    expect(ok(decodeSchemaMessage(Buffer.from(CONTRACT_SCHEMA_BODY, "utf8"))).id).toBe("6f1c…")
  })

  it("fills proto defaults for missing optional fields", () => {
    expect(schemaMsg({})).toStrictEqual({
      id: "s1",
      schema: undefined,
      importName: "",
      raw: false,
      task: SchemasTasks.SCHEMAS_TASKS_UNKNOWN,
      date: "",
      extra: {}
    } satisfies SchemaMessageResponse)
  })

  it("treats null optional fields as absent", () => {
    expect(schemaMsg({ schema: null, import_name: null, raw: null, tasks: null, date: null, extra: null }))
      .toStrictEqual(schemaMsg({}))
  })

  it("ignores unknown top-level keys", () => {
    expect(schemaMsg({ tasks: "upload_schema", future_field: { a: [1] }, version: 2 }))
      .toStrictEqual(schemaMsg({ tasks: "upload_schema" }))
  })

  it("keeps raw = true", () => {
    expect(schemaMsg({ raw: true }).raw).toBe(true)
  })

  describe("task", () => {
    it.each([
      ["upload_schema", SchemasTasks.UPLOAD_SCHEMA],
      ["remove_schema", SchemasTasks.REMOVE_SCHEMA],
      ["Upload_Schema", SchemasTasks.UPLOAD_SCHEMA],
      ["REMOVE_SCHEMA", SchemasTasks.REMOVE_SCHEMA],
      ["UPLOAD_SCHEMA", SchemasTasks.UPLOAD_SCHEMA],
      ["delete_everything", SchemasTasks.SCHEMAS_TASKS_UNKNOWN],
      ["", SchemasTasks.SCHEMAS_TASKS_UNKNOWN],
      ["toString", SchemasTasks.SCHEMAS_TASKS_UNKNOWN],
      ["__proto__", SchemasTasks.SCHEMAS_TASKS_UNKNOWN]
    ])("tasks %j maps to %s", (name, task) => {
      expect(schemaMsg({ tasks: name }).task).toBe(task)
    })

    it("accepts the proto field name `task`", () => {
      expect(schemaMsg({ task: "remove_schema" }).task).toBe(SchemasTasks.REMOVE_SCHEMA)
    })

    it("prefers `tasks` when both keys are present", () => {
      expect(schemaMsg({ tasks: "upload_schema", task: "remove_schema" }).task).toBe(SchemasTasks.UPLOAD_SCHEMA)
      expect(schemaMsg({ tasks: null, task: "remove_schema" }).task).toBe(SchemasTasks.REMOVE_SCHEMA)
    })

    it("is the zero value when missing", () => {
      expect(schemaMsg({}).task).toBe(SchemasTasks.SCHEMAS_TASKS_UNKNOWN)
    })
  })

  describe("schema", () => {
    it("may be absent or null for remove_schema", () => {
      expect(schemaMsg({ tasks: "remove_schema" }).schema).toBeUndefined()
      const msg = schemaMsg({ tasks: "remove_schema", schema: null })
      expect(msg.schema).toBeUndefined()
      expect(msg.task).toBe(SchemasTasks.REMOVE_SCHEMA)
    })

    it("an empty object gives an empty JsonSchema", () => {
      expect(schemaMsg({ schema: {} }).schema).toStrictEqual({ schema: "", type: "", required: [], properties: {} })
    })

    it("accepts `$schema` and prefers `schema` when both are present", () => {
      expect(schemaMsg({ schema: { $schema: "https://json-schema.org/draft/2020-12/schema" } }).schema?.schema)
        .toBe("https://json-schema.org/draft/2020-12/schema")
      expect(schemaMsg({ schema: { schema: "a", $schema: "b" } }).schema?.schema).toBe("a")
    })

    it("ignores JSON Schema keywords the proto has no field for", () => {
      expect(schemaMsg({ schema: { type: "object", title: "T", additionalProperties: false } }).schema)
        .toStrictEqual({ schema: "", type: "object", required: [], properties: {} })
    })

    it("maps every property type", () => {
      const props = schemaMsg({
        schema: {
          properties: { s: { type: "string" }, i: { type: "integer" }, n: { type: "number" }, b: { type: "boolean" } }
        }
      }).schema?.properties
      expect(props).toStrictEqual({
        s: { type: PropertyType.STRING, extra: {} },
        i: { type: PropertyType.INTEGER, extra: {} },
        n: { type: PropertyType.NUMBER, extra: {} },
        b: { type: PropertyType.BOOLEAN, extra: {} }
      })
    })

    it("stringifies property extra values", () => {
      const props = schemaMsg({
        schema: {
          properties: {
            age: { type: "integer", extra: { minimum: 0, maximum: 150.5, exclusive: true, format: "int32", gone: null } }
          }
        }
      }).schema?.properties
      expect(props?.["age"]?.extra).toStrictEqual({ minimum: "0", maximum: "150.5", exclusive: "true", format: "int32" })
    })

    it("collects keywords placed directly in the property into extra", () => {
      const props = schemaMsg({
        schema: {
          properties: {
            age: { type: "integer", minimum: 0, format: "x", nullable: false, skipped: null },
            color: { type: "string", enum: ["red", "green"], items: { type: "string" } }
          }
        }
      }).schema?.properties
      expect(props).toStrictEqual({
        age: { type: PropertyType.INTEGER, extra: { minimum: "0", format: "x", nullable: "false" } },
        color: {
          type: PropertyType.STRING,
          extra: { enum: "[\"red\",\"green\"]", items: "{\"type\":\"string\"}" }
        }
      })
    })

    it("merges direct keywords with extra, extra winning on a clash", () => {
      const props = schemaMsg({
        schema: { properties: { age: { type: "integer", minimum: 1, format: "x", extra: { minimum: 0 } } } }
      }).schema?.properties
      expect(props?.["age"]?.extra).toStrictEqual({ minimum: "0", format: "x" })
    })

    it("keeps a `__proto__` key as an ordinary map entry", () => {
      const msg = ok(decodeSchemaMessage(bytes(`{"id":"s1","extra":{"__proto__":"x"},
        "schema":{"properties":{"__proto__":{"type":"string"}}}}`)))
      expect(Object.entries(msg.extra)).toStrictEqual([["__proto__", "x"]])
      expect(Object.getPrototypeOf(msg.extra)).toBe(Object.prototype)
      expect(Object.keys(msg.schema?.properties ?? {})).toStrictEqual(["__proto__"])
    })
  })

  it("stringifies top-level extra values and skips nulls", () => {
    expect(schemaMsg({ extra: { a: "x", n: 0, f: 1.5, t: true, no: false, skip: null } }).extra)
      .toStrictEqual({ a: "x", n: "0", f: "1.5", t: "true", no: "false" })
  })

  it.each([
    "2025-06-25T10:31:02.123456",
    "2025-06-25T10:31:02Z",
    "2025-06-25",
    "2025-06-25T10:31:02+02:00",
    "2025-06-25T10:31:02.123456+0000",
    "2025-06-25 10:31:02.123456",
    "2025-06-25T10:31",
    "2025-06-25T10:31:02,5Z",
    // A pass-through field: any string, as the original proxy copied it (issue 10, fault 7).
    "25/06/2025 10:31",
    "yesterday",
    "2025-13-01",
    ""
  ])("accepts date %j and keeps it unchanged", (date) => {
    expect(schemaMsg({ date }).date).toBe(date)
  })
})

describe("decodeValidationMessage", () => {
  it("decodes the contract example field for field", () => {
    expect(ok(decodeValidationMessage(bytes(CONTRACT_VALIDATION_BODY)))).toStrictEqual(expectedValidationMessage("9a2e…"))
  })

  it("produces a message the protobuf encoder round-trips", () => {
    const msg = ok(decodeValidationMessage(bytes(CONTRACT_VALIDATION_BODY)))
    expect(ValidationMessageResponse.decode(ValidationMessageResponse.encode(msg).finish())).toStrictEqual(msg)
  })

  it("fills proto defaults for missing optional fields", () => {
    expect(validationMsg({})).toStrictEqual({
      id: "v1",
      task: ValidationTasks.VALIDATION_TASKS_UNKNOWN,
      fileData: "",
      importName: "",
      date: "",
      extra: {},
      metadata: undefined
    } satisfies ValidationMessageResponse)
  })

  it("treats null optional fields as absent and ignores unknown keys", () => {
    expect(validationMsg({ task: null, file_data: null, import_name: null, date: null, extra: null, metadata: null, x: 1 }))
      .toStrictEqual(validationMsg({}))
  })

  describe("task", () => {
    it.each([
      ["sample_validation", ValidationTasks.SAMPLE_VALIDATION],
      ["SAMPLE_VALIDATION", ValidationTasks.SAMPLE_VALIDATION],
      ["Sample_Validation", ValidationTasks.SAMPLE_VALIDATION],
      ["upload_schema", ValidationTasks.VALIDATION_TASKS_UNKNOWN],
      ["", ValidationTasks.VALIDATION_TASKS_UNKNOWN]
    ])("task %j maps to %s", (name, task) => {
      expect(validationMsg({ task: name }).task).toBe(task)
    })

    it("accepts `tasks` too, preferring `task`", () => {
      expect(validationMsg({ tasks: "sample_validation" }).task).toBe(ValidationTasks.SAMPLE_VALIDATION)
      expect(validationMsg({ task: "other", tasks: "sample_validation" }).task)
        .toBe(ValidationTasks.VALIDATION_TASKS_UNKNOWN)
    })

    it("is the zero value when missing", () => {
      expect(validationMsg({}).task).toBe(ValidationTasks.VALIDATION_TASKS_UNKNOWN)
    })
  })

  describe("file_data", () => {
    // Passed on, not decoded: any string (the consumers decode it; the original proxy copied it).
    it.each(["", "00", "deadBEEF", "48656c6c6f", "abc", "Hello World!", "0x48"])("passes %j through unchanged", (hex) => {
      expect(validationMsg({ file_data: hex }).fileData).toBe(hex)
    })

    it("passes a large hex payload through unchanged", () => {
      const hex = "ab".repeat(512 * 1024)
      expect(validationMsg({ file_data: hex }).fileData).toBe(hex)
    })
  })

  describe("metadata", () => {
    it("may be absent or null", () => {
      expect(validationMsg({}).metadata).toBeUndefined()
      expect(validationMsg({ metadata: null }).metadata).toBeUndefined()
    })

    it("fills defaults for missing metadata fields", () => {
      expect(validationMsg({ metadata: {} }).metadata).toStrictEqual({ filename: "", contentType: "", size: "0" })
    })

    it.each([
      [0, "0"],
      [12, "12"],
      [Number.MAX_SAFE_INTEGER, "9007199254740991"],
      ["12", "12"],
      ["0012", "12"],
      ["9223372036854775807", "9223372036854775807"]
    ])("size %j becomes the int64 string %j", (size, expected) => {
      const msg = validationMsg({ metadata: { filename: "a.csv", size } })
      expect(msg.metadata?.size).toBe(expected)
      expect(ValidationMessageResponse.decode(ValidationMessageResponse.encode(msg).finish()).metadata?.size)
        .toBe(expected)
    })
  })

  it("stringifies extra values and skips nulls", () => {
    expect(validationMsg({ extra: { priority: "high", retries: 3, urgent: true, none: null } }).extra)
      .toStrictEqual({ priority: "high", retries: "3", urgent: "true" })
  })

  it("accepts a zoned date and keeps it unchanged", () => {
    expect(validationMsg({ date: "2025-06-25T10:31:02Z" }).date).toBe("2025-06-25T10:31:02Z")
  })
})

describe("rejections", () => {
  type Decode = (body: Uint8Array) => Result.Result<unknown, BodyRejected>
  const both: ReadonlyArray<readonly [string, Decode]> = [
    ["decodeSchemaMessage", decodeSchemaMessage],
    ["decodeValidationMessage", decodeValidationMessage]
  ]

  describe.each(both)("%s", (_, decode) => {
    const reason = (body: string | Uint8Array) => rejected(decode(typeof body === "string" ? bytes(body) : body))

    it("rejects bytes that are not UTF-8", () => {
      expect(reason(new Uint8Array([0x7b, 0x22, 0x69, 0x64, 0x22, 0x3a, 0x22, 0xff, 0x22, 0x7d])))
        .toMatch(/^body is not valid UTF-8: /)
    })

    it.each(["", "hello", "{\"id\": \"x\"", "{'id': 'x'}", "{\"id\":\"x\"} trailing"])("rejects non-JSON %j", (body) => {
      expect(reason(body)).toMatch(/^body is not valid JSON: \S/)
    })

    it.each(["null", "[]", "[{\"id\":\"x\"}]", "42", "\"id\"", "true"])("rejects the non-object JSON %s", (body) => {
      expect(reason(body)).toBe("Expected a JSON object")
    })

    it("rejects a missing id", () => {
      expect(reason("{\"tasks\":\"upload_schema\",\"task\":\"sample_validation\"}")).toBe("Missing key at [\"id\"]")
    })

    it.each([["5", "Expected string"], ["null", "Expected string"], ["\"\"", "Expected a value with a length of at least 1"]])(
      "rejects id %s",
      (id, message) => {
        expect(reason(`{"id": ${id}}`)).toBe(`${message} at ["id"]`)
      }
    )

    it.each([
      ["import_name", "5", "Expected string | null"],
      ["date", "20250625", "Expected string | null"],
      ["extra", "[]", "Expected object | null"],
      ["extra", "\"x\"", "Expected object | null"],
      ["task", "1", "Expected string | null"],
      ["tasks", "true", "Expected string | null"]
    ])("rejects %s = %s", (key, value, message) => {
      expect(reason(`{"id":"x","${key}":${value}}`)).toBe(`${message} at ["${key}"]`)
    })

    it.each(["{\"a\":1}", "[1]"])("rejects a nested extra value %s", (value) => {
      expect(reason(`{"id":"x","extra":{"ok":"y","bad":${value}}}`)).toMatch(/^Expected .* at \["extra"\]\["bad"\]$/)
    })

    it("keeps the reason short and never echoes the body", () => {
      const body = `{"id":"x","date":"${"9".repeat(100_000)}","extra":{"k":[${"9".repeat(100_000)}]}}`
      const r = reason(body)
      expect(r.length).toBeLessThanOrEqual(301)
      expect(r).not.toContain("9999999999")
      const notJson = reason(`{"id": ${"x".repeat(100_000)}}`)
      expect(notJson.length).toBeLessThanOrEqual(301)
    })
  })

  describe("schema message fields", () => {
    it.each([
      [{ raw: "false" }, "Expected boolean | null at [\"raw\"]"],
      [{ schema: "{}" }, "Expected object | null at [\"schema\"]"],
      [{ schema: [] }, "Expected object | null at [\"schema\"]"],
      [{ schema: { schema: 7 } }, "Expected string | null at [\"schema\"][\"schema\"]"],
      [{ schema: { $schema: 7 } }, "Expected string | null at [\"schema\"][\"$schema\"]"],
      [{ schema: { type: ["object"] } }, "Expected string | null at [\"schema\"][\"type\"]"],
      [{ schema: { required: "name" } }, "Expected array | null at [\"schema\"][\"required\"]"],
      [{ schema: { required: ["name", 1] } }, "Expected string at [\"schema\"][\"required\"][1]"],
      [{ schema: { properties: [] } }, "Expected object | null at [\"schema\"][\"properties\"]"],
      [{ schema: { properties: { age: "integer" } } }, "Expected object at [\"schema\"][\"properties\"][\"age\"]"],
      [
        { schema: { properties: { age: { type: "date" } } } },
        "Expected \"string\" | \"integer\" | \"number\" | \"boolean\" at [\"schema\"][\"properties\"][\"age\"][\"type\"]"
      ],
      [
        { schema: { properties: { age: { type: "INTEGER" } } } },
        "Expected \"string\" | \"integer\" | \"number\" | \"boolean\" at [\"schema\"][\"properties\"][\"age\"][\"type\"]"
      ],
      [
        { schema: { properties: { age: { minimum: 0 } } } },
        "Missing key at [\"schema\"][\"properties\"][\"age\"][\"type\"]"
      ],
      [
        { schema: { properties: { age: { type: "integer", extra: [] } } } },
        "Expected object | null at [\"schema\"][\"properties\"][\"age\"][\"extra\"]"
      ]
    ])("rejects %j", (fields, expected) => {
      expect(schemaReason(fields)).toBe(expected)
    })

    it("rejects a nested value in a property's extra", () => {
      expect(schemaReason({ schema: { properties: { age: { type: "integer", extra: { enum: [1, 2] } } } } }))
        .toMatch(/^Expected .* at \["schema"\]\["properties"\]\["age"\]\["extra"\]\["enum"\]$/)
    })
  })

  describe("validation message fields", () => {
    it.each([
      [{ file_data: 48 }, "Expected string | null at [\"file_data\"]"],
      [{ metadata: "a.csv" }, "Expected object | null at [\"metadata\"]"],
      [{ metadata: { filename: 1 } }, "Expected string | null at [\"metadata\"][\"filename\"]"],
      [{ metadata: { content_type: false } }, "Expected string | null at [\"metadata\"][\"content_type\"]"],
      [{ metadata: { size: -1 } }, "Expected a value greater than or equal to 0 at [\"metadata\"][\"size\"]"],
      [{ metadata: { size: 1.5 } }, "Expected an integer at [\"metadata\"][\"size\"]"],
      [{ metadata: { size: 2 ** 53 } }, "Expected an integer at [\"metadata\"][\"size\"]"],
      [{ metadata: { size: true } }, "Expected number | string | null at [\"metadata\"][\"size\"]"],
      [
        { metadata: { size: "-1" } },
        "Expected a non-negative decimal integer string within int64 at [\"metadata\"][\"size\"]"
      ],
      [
        { metadata: { size: "1.5" } },
        "Expected a non-negative decimal integer string within int64 at [\"metadata\"][\"size\"]"
      ],
      [
        { metadata: { size: "" } },
        "Expected a non-negative decimal integer string within int64 at [\"metadata\"][\"size\"]"
      ],
      [
        { metadata: { size: "9223372036854775808" } },
        "Expected a non-negative decimal integer string within int64 at [\"metadata\"][\"size\"]"
      ]
    ])("rejects %j", (fields, expected) => {
      expect(validationReason(fields)).toBe(expected)
    })
  })
})

describe("fast path", () => {
  const { schemaMessage, validationMessage } = __testing

  const covered = <A>(paths: Paths<A>, body: string | object) => {
    const json: unknown = typeof body === "string" ? JSON.parse(body) : JSON.parse(JSON.stringify(body))
    const fast = paths.fast(json)
    expect(fast).toBeDefined()
    const slow = paths.slow(json)
    if (Result.isFailure(slow)) throw new Error(`Schema rejected: ${slow.failure.reason}`)
    expectSameMessage(fast, slow.success)
  }

  it.each([
    ["the contract example", CONTRACT_SCHEMA_BODY],
    ["the fixture body", schemaBody("s1")],
    ["only an id", { id: "s1" }],
    ["remove_schema without schema", { id: "s1", tasks: "remove_schema" }],
    ["`task` instead of `tasks`, all nulls", { id: "s1", task: "upload_schema", tasks: null, raw: null, extra: null }],
    ["`$schema`, direct keywords, scalar extras", {
      id: "s1",
      schema: {
        $schema: "https://json-schema.org/draft/2020-12/schema",
        type: "object",
        title: "ignored",
        properties: {
          age: { type: "integer", minimum: 0, enum: [1, 2], extra: { maximum: 150.5, exclusive: true, gone: null } },
          name: { type: "string", format: "email", items: { type: "string" } }
        }
      },
      raw: true,
      date: "2025-06-25 10:31:02,5+02:00",
      extra: { source: "api", priority: 3, retry: false, none: null },
      unknown_top_level: { a: [1] }
    }]
  ])("covers the schema message: %s", (_, body) => covered(schemaMessage, body))

  it.each([
    ["the contract example", CONTRACT_VALIDATION_BODY],
    ["the fixture body", validationBody("v1")],
    ["only an id", { id: "v1" }],
    ["`tasks`, string size, empty metadata fields", {
      id: "v1",
      tasks: "sample_validation",
      file_data: "",
      metadata: { size: "0012" },
      extra: { retries: 3, urgent: true }
    }],
    ["nulls everywhere", { id: "v1", task: null, file_data: null, metadata: { filename: null, size: null }, date: null }]
  ])("covers the validation message: %s", (_, body) => covered(validationMessage, body))

  it("does not answer for a body the Schema rejects", () => {
    expect(schemaMessage.fast({ id: "" })).toBeUndefined()
    expect(schemaMessage.fast({ id: "s1", extra: { bad: [1] } })).toBeUndefined()
    expect(schemaMessage.fast({ id: "s1", schema: { properties: { a: { type: "date" } } } })).toBeUndefined()
    expect(validationMessage.fast({ id: "v1", file_data: 5 })).toBeUndefined()
    expect(validationMessage.fast({ id: "v1", metadata: { size: 2 ** 53 } })).toBeUndefined()
    expect(validationMessage.fast([{ id: "v1" }])).toBeUndefined()
  })
})

// ---------------------------------------------------------------------------------------------
// Generated bodies: fast path ⊆ Schema path, same rejections
// ---------------------------------------------------------------------------------------------

describe("fast path on generated bodies", () => {
  // mulberry32: small, seeded, deterministic
  const prng = (seed: number) => () => {
    seed = (seed + 0x6d2b79f5) | 0
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed)
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }

  const MISSING = Symbol("missing")
  // A JSON number token JSON.stringify cannot produce (-0, 1e400, 12.0, …), spliced in verbatim.
  const raw = (token: string) => `@@RAW:${token}@@`
  const toJsonText = (value: unknown) => JSON.stringify(value).replace(/"@@RAW:([^@"]*)@@"/g, "$1")

  const makeGenerator = (seed: number) => {
    const rng = prng(seed)
    let pBad = 0
    const chance = (p: number) => rng() < p
    const bad = () => chance(pBad)
    const pick = <T>(xs: ReadonlyArray<T>): T => xs[Math.floor(rng() * xs.length)]!
    const times = <T>(max: number, f: () => T): Array<T> => Array.from({ length: Math.floor(rng() * (max + 1)) }, f)

    /** An object with the given entries in random order; MISSING values are left out. */
    const object = (entries: ReadonlyArray<readonly [string, unknown]>): Record<string, unknown> => {
      const kept = entries.filter(([, v]) => v !== MISSING)
      for (let i = kept.length - 1; i > 0; i--) {
        const j = Math.floor(rng() * (i + 1))
        ;[kept[i], kept[j]] = [kept[j]!, kept[i]!]
      }
      return Object.fromEntries(kept) // own keys, `__proto__` included
    }

    /** An optional field: usually missing, null or good; a wrong value with probability pBad. */
    const optional = (good: () => unknown, wrong: ReadonlyArray<unknown>): unknown =>
      bad() ? pick(wrong) : chance(0.3) ? MISSING : chance(0.15) ? null : good()

    const WRONG_SCALARS = [5, 0, true, false, [], {}, ["x"], { a: 1 }, raw("-0"), raw("1e400")]
    const STRINGS = ["customers", "", "é…", "upload_schema", "remove_schema", "UPLOAD_SCHEMA", "sample_validation",
      "toString", "__proto__", "http://json-schema.org/draft-07/schema#"]
    const optString = () => optional(() => pick(STRINGS), WRONG_SCALARS)

    const DATES = ["2025-06-25T10:31:02.123456", "2025-06-25T10:31:02Z", "2025-06-25", "2025-06-25T10:31:02+02:00",
      "2025-06-25T10:31:02.123456+0000", "2025-06-25 10:31:02.123456", "2025-06-25T10:31", "2025-06-25T10:31:02,5Z"]
    const BAD_DATES = ["yesterday", "2025-13-01", "2025-06-25T25:00:00", "1", "", 20250625, "2025-02-30T00:00:00Z",
      "2025-06-25T10:31:02.123456+02:0", true]
    const date = () => optional(() => pick(DATES), BAD_DATES)

    const KEYS = ["priority", "source", "minimum", "format", "1", "0", "__proto__", "toString", "a b", "é", "type",
      "extra"]
    const EXTRA_VALUES = ["high", "", "0", 0, 3, -7, 1.5, 1e21, true, false, null, raw("-0"), raw("1e400"), raw("1E2"),
      raw("12.0")]
    const NESTED_VALUES = [{ a: 1 }, [1], [], {}]
    const extra = () =>
      optional(
        () => object(times(4, () => [pick(KEYS), bad() ? pick(NESTED_VALUES) : pick(EXTRA_VALUES)] as const)),
        ["x", [], 5, true, ["a"]]
      )

    const KEYWORDS: ReadonlyArray<readonly [string, unknown]> = [
      ["minimum", 0], ["maximum", raw("1e400")], ["format", "x"], ["enum", ["red", "green"]],
      ["items", { type: "string" }], ["nullable", false], ["skipped", null], ["__proto__", { a: 1 }],
      ["description", "d"], ["1", "one"], ["default", raw("-0")]
    ]
    const property = () =>
      bad() && chance(0.3)
        ? pick(["integer", null, [], 5])
        : object([
          ["type", bad() ? pick(["date", "INTEGER", "", 5, null, MISSING]) : pick(["string", "integer", "number", "boolean"])],
          ["extra", extra()],
          ...times(3, () => pick(KEYWORDS))
        ])

    const jsonSchema = () =>
      optional(
        () =>
          object([
            ["schema", optString()],
            ["$schema", optString()],
            ["type", optString()],
            ["required", optional(() => times(3, () => pick(STRINGS)), ["name", ["name", 1], [null], {}])],
            ["properties", optional(() => object(times(5, () => [pick(KEYS), property()] as const)), [[], "x", 5])],
            ["title", chance(0.2) ? "T" : MISSING],
            ["additionalProperties", chance(0.2) ? false : MISSING]
          ]),
        ["{}", [], 5]
      )

    const id = () => (bad() ? pick([MISSING, 5, null, "", [], true]) : pick(["s1", "6f1c…", "x", "__proto__"]))
    const unknownKeys: ReadonlyArray<readonly [string, unknown]> = [["future_field", { a: [1] }], ["version", 2]]
    const maybeNotAnObject = (message: () => unknown) =>
      chance(pBad / 5) ? pick([null, [], 42, "id", true, [{ id: "x" }]]) : message()

    const schemaMessage = () =>
      maybeNotAnObject(() =>
        object([
          ["id", id()],
          ["tasks", optString()],
          ["task", optString()],
          ["schema", jsonSchema()],
          ["import_name", optString()],
          ["raw", optional(() => pick([true, false]), ["false", 0, 1, []])],
          ["date", date()],
          ["extra", extra()],
          ...(chance(0.2) ? unknownKeys : [])
        ])
      )

    const HEX = ["", "00", "deadBEEF", "48656c6c6f20576f726c6421", "ab".repeat(100)]
    const BAD_HEX = ["abc", "0x48", "Hello World!", 48, "zz", "a", " 00"]
    const SIZES = [0, 12, Number.MAX_SAFE_INTEGER, "12", "0012", "0", "9223372036854775807", raw("12.0"), raw("1E2"),
      raw("-0")]
    const BAD_SIZES = [-1, 1.5, 2 ** 53, true, "-1", "1.5", "", "9223372036854775808", " 12", "1e3", raw("1e400"), []]
    const validationMessage = () =>
      maybeNotAnObject(() =>
        object([
          ["id", id()],
          ["task", optString()],
          ["tasks", optString()],
          ["file_data", optional(() => pick(HEX), BAD_HEX)],
          ["import_name", optString()],
          ["date", date()],
          ["extra", extra()],
          ["metadata", optional(
            () =>
              object([
                ["filename", optString()],
                ["content_type", optString()],
                ["size", optional(() => pick(SIZES), BAD_SIZES)],
                ["unknown", chance(0.2) ? 1 : MISSING]
              ]),
            ["a.csv", [], 5, true]
          )],
          ...(chance(0.2) ? unknownKeys : [])
        ])
      )

    return {
      /** Each case draws its own corruption rate, so both valid and invalid bodies are common. */
      next: <T>(message: () => T): T => {
        pBad = pick([0, 0, 0.01, 0.03, 0.1, 0.3])
        return message()
      },
      schemaMessage,
      validationMessage,
      bom: () => chance(0.05)
    }
  }

  const CASES = 3000

  const run = <A>(
    seed: number,
    decode: (body: Uint8Array) => Result.Result<A, BodyRejected>,
    paths: Paths<A>,
    message: (g: ReturnType<typeof makeGenerator>) => unknown
  ) => {
    const g = makeGenerator(seed)
    let accepted = 0
    let fastHits = 0
    for (let i = 0; i < CASES; i++) {
      const text = toJsonText(g.next(() => message(g)))
      const json: unknown = JSON.parse(text)
      const result = decode(bytes(g.bom() ? `\uFEFF${text}` : text))
      // requireFast: false — the contract is only "fast ⇒ Schema accepts, same message"; coverage
      // is asserted in aggregate below.
      const outcome = comparePaths(paths, json, result, { requireFast: false, label: `case ${i}: ${text}` })
      if (outcome.accepted) accepted++
      if (outcome.fast) fastHits++
    }
    return { accepted, fastHits }
  }

  it("schema messages: the fast path agrees with the Schema path", () => {
    const { accepted, fastHits } = run(0x5eed, publicDecodeSchemaMessage, __testing.schemaMessage, (g) => g.schemaMessage())
    // enough of both outcomes to mean something
    expect(accepted).toBeGreaterThan(CASES / 4)
    expect(accepted).toBeLessThan((CASES * 3) / 4)
    // today the guard answers for every body the Schema accepts
    expect(fastHits).toBe(accepted)
  })

  it("validation messages: the fast path agrees with the Schema path", () => {
    const { accepted, fastHits } = run(
      0xc0dec,
      publicDecodeValidationMessage,
      __testing.validationMessage,
      (g) => g.validationMessage()
    )
    expect(accepted).toBeGreaterThan(CASES / 4)
    expect(accepted).toBeLessThan((CASES * 3) / 4)
    expect(fastHits).toBe(accepted)
  })
})
