/**
 * Issue 15 (part): the audit trail. The built proxy, with keys required: each publishing or
 * administrative call, refused ones included, gives exactly one line annotated logger=audit with
 * who, what and the outcome, and no line holds a body or a key.
 */
import { assert, describe, it } from "@effect/vitest"
import * as grpc from "@grpc/grpc-js"
import { Effect } from "effect"
import { createHash, randomBytes } from "node:crypto"
import { MessageKind, MessagingServiceClient, type PublishRequest } from "../gen/messaging.js"
import { schemaBody } from "./fixtures/bodies.js"
import { makeAdmin, makeNames, proxyEnv } from "./support/harness.js"
import { grpcPortOf, runProxy } from "./support/process.js"

interface AuditLine {
  readonly rpc: string
  readonly who: string
  readonly peer: string
  readonly outcome: string
  readonly [key: string]: unknown
}

const auditLines = (stdout: string): Array<AuditLine> =>
  stdout.split("\n").filter((line) => line.includes('"logger":"audit"')).map((line) => {
    const parsed = JSON.parse(line) as { message: [string, AuditLine] }
    return parsed.message[1]
  })

const withKey = (key: string | undefined) => {
  const metadata = new grpc.Metadata()
  if (key !== undefined) metadata.set("authorization", `Bearer ${key}`)
  return metadata
}

const body = (value: unknown) => Buffer.from(JSON.stringify(value))

describe("audit trail", () => {
  it.live("one audit line per publishing or admin call, refused ones included, with who, what and the outcome; no body, no key", () =>
    Effect.gen(function*() {
      const publisherKey = `key-${randomBytes(16).toString("hex")}`
      const adminKey = `key-${randomBytes(16).toString("hex")}`
      const hash = (key: string) => createHash("sha256").update(key).digest("hex")
      const names = makeNames()
      yield* makeAdmin(names)
      const secretBody = `secret-body-${randomBytes(8).toString("hex")}`
      const env = { ...proxyEnv(names), MESSAGING_API_KEYS: `api:${hash(publisherKey)}:publish,ops:${hash(adminKey)}:admin` }
      const result = yield* runProxy(env, (kill, stdout) => {
        const client = new MessagingServiceClient(`127.0.0.1:${grpcPortOf(stdout)}`, grpc.credentials.createInsecure())
        const unary = <Req, Res>(call: (request: Req, metadata: grpc.Metadata, callback: (error: grpc.ServiceError | null, response: Res) => void) => unknown, request: Req, key: string | undefined) =>
          new Promise<void>((resolve) => {
            call.call(client, request, withKey(key), () => resolve())
          })
        const request = (value: unknown): PublishRequest => ({ kind: MessageKind.MESSAGE_KIND_SCHEMA, body: body(value), routingKey: "" })
        const batch = (key: string) =>
          new Promise<void>((resolve) => {
            const stream = client.publishBatch(withKey(key), () => resolve())
            stream.write(request(schemaBody("b-1")))
            stream.write(request(schemaBody("b-2")))
            stream.end()
          })
        void (async () => {
          await unary(client.publish, request(schemaBody("a-1")), publisherKey)
          await unary(client.publish, request({ id: 42, note: secretBody }), publisherKey)
          await batch(publisherKey)
          await unary(client.purgeQueue, { role: "schemas" }, publisherKey)
          await unary(client.purgeQueue, { role: "schemas" }, adminKey)
          await unary(client.getQueueInfo, {}, undefined)
          await unary(client.peekDeadLetters, { kind: MessageKind.MESSAGE_KIND_SCHEMA, limit: 0, after: "" }, adminKey)
          await unary(client.redriveDeadLetters, { kind: MessageKind.MESSAGE_KIND_SCHEMA, ids: [], all: true, limit: 0 }, adminKey)
          await unary(client.getRoutingKeySchemas, { results: false }, publisherKey) // not audited: a lookup
          client.close()
          kill()
        })()
      })
      assert.strictEqual(result.code, 0, result.stderr)
      const lines = auditLines(result.stdout)
      const summary = lines.map(({ rpc, who, outcome }) => `${rpc} ${who} ${outcome}`)
      assert.deepStrictEqual(summary, [
        "Publish key:api OK",
        "Publish key:api INVALID_ARGUMENT",
        "PublishBatch key:api OK",
        "PurgeQueue key:api PERMISSION_DENIED",
        "PurgeQueue key:ops OK",
        "GetQueueInfo unauthenticated UNAUTHENTICATED",
        "PeekDeadLetters key:ops OK",
        "RedriveDeadLetters key:ops OK"
      ])
      // The malformed Publish was refused, not dead-lettered: the dead-letter queue is empty.
      assert.deepStrictEqual([lines[6]?.["queue"], lines[6]?.["shown"]], [names.schemasDead, 0])
      assert.deepStrictEqual([lines[7]?.["queue"], lines[7]?.["redriven"]], [names.schemas, 0])
      assert.strictEqual(lines[0]?.["messageId"], "a-1")
      assert.strictEqual(lines[0]?.["routingKey"], "schemas.*")
      assert.deepStrictEqual([lines[2]?.["published"], lines[2]?.["messageIds"]], [2, ["b-1", "b-2"]])
      assert.deepStrictEqual([lines[4]?.["role"], lines[4]?.["queue"], lines[4]?.["purged"]], ["schemas", names.schemas, 3])
      for (const line of lines) assert.match(line.peer, /^127\.0\.0\.1:\d+$/)
      const all = result.stdout + result.stderr
      for (const secret of [secretBody, publisherKey, adminKey]) assert.notInclude(all, secret)
    }))
})
