import { describe, expect, it } from "@effect/vitest"
import { Result } from "effect"
import { type BodyRejected, decodeSchemaMessage, decodeValidationMessage } from "../src/codec.js"
import {
  PropertyType,
  SchemaMessageResponse,
  SchemasTasks,
  ValidationMessageResponse,
  ValidationTasks
} from "../gen/messaging.js"

const bytes = (body: string | object): Uint8Array =>
  new TextEncoder().encode(typeof body === "string" ? body : JSON.stringify(body))

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
    expect(ok(decodeSchemaMessage(bytes(CONTRACT_SCHEMA_BODY)))).toStrictEqual({
      id: "6f1c…",
      schema: {
        schema: "http://json-schema.org/draft-07/schema#",
        type: "object",
        required: ["name"],
        properties: {
          name: { type: PropertyType.STRING, extra: {} },
          age: { type: PropertyType.INTEGER, extra: { minimum: "0" } }
        }
      },
      importName: "customers",
      raw: false,
      task: SchemasTasks.UPLOAD_SCHEMA,
      date: "2025-06-25T10:31:02.123456",
      extra: {}
    } satisfies SchemaMessageResponse)
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
    "2025-06-25T10:31:02,5Z"
  ])("accepts date %j and keeps it unchanged", (date) => {
    expect(schemaMsg({ date }).date).toBe(date)
  })
})

describe("decodeValidationMessage", () => {
  it("decodes the contract example field for field", () => {
    expect(ok(decodeValidationMessage(bytes(CONTRACT_VALIDATION_BODY)))).toStrictEqual({
      id: "9a2e…",
      task: ValidationTasks.SAMPLE_VALIDATION,
      fileData: "48656c6c6f20576f726c6421",
      importName: "customers",
      date: "2025-06-25T10:31:02.123456",
      extra: { priority: "high" },
      metadata: { filename: "a.csv", contentType: "text/csv", size: "12" }
    } satisfies ValidationMessageResponse)
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
    it.each(["", "00", "deadBEEF", "48656c6c6f"])("passes hex %j through unchanged", (hex) => {
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
      ["date", "\"yesterday\"", "Expected an ISO-8601 date string"],
      ["date", "\"2025-13-01\"", "Expected an ISO-8601 date string"],
      ["date", "\"2025-06-25T25:00:00\"", "Expected an ISO-8601 date string"],
      ["date", "\"1\"", "Expected an ISO-8601 date string"],
      ["date", "\"\"", "Expected an ISO-8601 date string"],
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
      const body = `{"id":"x","date":"${"9".repeat(100_000)}","file_data":"${"ab".repeat(50_000)}"}`
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
      [{ file_data: "abc" }, "Expected a hex string of even length at [\"file_data\"]"],
      [{ file_data: "Hello World!" }, "Expected a hex string of even length at [\"file_data\"]"],
      [{ file_data: "0x48" }, "Expected a hex string of even length at [\"file_data\"]"],
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
