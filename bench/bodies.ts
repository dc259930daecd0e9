/**
 * Schema-message bodies in the contract's format (CONTRACT.md §3), padded to a target size.
 * The schema is a realistic one: several properties, keywords both under `extra` and directly in
 * the property, numeric extras (stringified by the proxy), so the codec does its usual work.
 */
import { randomBytes } from "node:crypto"

const schema = {
  schema: "http://json-schema.org/draft-07/schema#",
  type: "object",
  required: ["customer_id", "name", "email", "created_at"],
  properties: {
    customer_id: { type: "integer", extra: { minimum: 1 } },
    name: { type: "string", extra: { minLength: 1, maxLength: 200 } },
    email: { type: "string", format: "email", maxLength: 320 },
    age: { type: "integer", minimum: 0, maximum: 150 },
    balance: { type: "number", extra: { minimum: -1000000, multipleOf: 0.01 } },
    vip: { type: "boolean", extra: {} },
    country: { type: "string", extra: { pattern: "^[A-Z]{2}$" } },
    created_at: { type: "string", format: "date-time" }
  }
} as const

/** A 32-hex-digit id, like the API's uuid4().hex. */
export const newId = (): string => randomBytes(16).toString("hex")

export interface BodyOptions {
  readonly id: string
  /** Extra string entries (sequence numbers, timestamps); they reach gRPC clients in `extra`. */
  readonly extra?: Readonly<Record<string, string>>
  /** Pad `extra.pad` so that the UTF-8 body is at least this many bytes. */
  readonly targetBytes: number
}

const render = (id: string, extra: Readonly<Record<string, string>>, pad: string): string =>
  JSON.stringify({
    id,
    schema,
    import_name: "customers",
    raw: false,
    tasks: "upload_schema",
    date: "2025-06-25T10:31:02.123456",
    extra: { ...extra, source: "bench", pad }
  })

/** One body. The padding is computed per body, so variable-length extras keep the size stable. */
export const schemaBody = ({ id, extra = {}, targetBytes }: BodyOptions): Buffer => {
  const bare = render(id, extra, "")
  const missing = Math.max(0, targetBytes - Buffer.byteLength(bare))
  return Buffer.from(missing === 0 ? bare : render(id, extra, "x".repeat(missing)))
}
