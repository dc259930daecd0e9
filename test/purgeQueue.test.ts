/**
 * Issue 15 (part): PurgeQueue empties one of the proxy's queues by its role, counts what went,
 * refuses any other name, and needs the admin scope. Real broker, real server, and the CLI.
 */
import { assert, describe, it } from "@effect/vitest"
import * as grpc from "@grpc/grpc-js"
import { Effect } from "effect"
import { execFile } from "node:child_process"
import { createHash, randomBytes } from "node:crypto"
import { fileURLToPath } from "node:url"
import { MessageKind, type MessagingServiceClient, type PurgeQueueResponse } from "../gen/messaging.js"
import { schemaBody } from "./fixtures/bodies.js"
import { makeTestEnv, publishJson, publishRaw, queueState, waitForQueue } from "./support/harness.js"

const purge = (client: MessagingServiceClient, role: string, metadata = new grpc.Metadata()) =>
  Effect.callback<PurgeQueueResponse, grpc.ServiceError>((resume) => {
    client.purgeQueue({ role }, metadata, (error, response) => resume(error === null ? Effect.succeed(response) : Effect.fail(error)))
  })

const withKey = (key: string) => {
  const metadata = new grpc.Metadata()
  metadata.set("authorization", `Bearer ${key}`)
  return metadata
}

const cliScript = fileURLToPath(new URL("../dist/src/cli.js", import.meta.url))

describe("PurgeQueue", () => {
  it.live("empties the queue of a role and answers how many went; the other queues keep theirs", () =>
    Effect.gen(function*() {
      const env = yield* makeTestEnv()
      for (const id of ["p-1", "p-2", "p-3"]) yield* publishJson(env.admin, env.names.exchange, "schemas.*", schemaBody(id))
      yield* publishJson(env.admin, env.names.exchange, "validation.*", { id: "v-1", task: "sample_validation" })
      yield* publishRaw(env.admin, "", env.names.schemasDead, Buffer.from("{dead"))
      yield* waitForQueue(env.admin, env.names.schemas, (q) => q.messageCount === 3)
      yield* waitForQueue(env.admin, env.names.schemasDead, (q) => q.messageCount === 1)

      assert.deepStrictEqual(yield* purge(env.client, "schemas"), { queue: env.names.schemas, purged: 3 })
      assert.deepStrictEqual(yield* purge(env.client, "schemas_dead"), { queue: env.names.schemasDead, purged: 1 })
      assert.deepStrictEqual(yield* purge(env.client, "schemas"), { queue: env.names.schemas, purged: 0 }, "nothing left")
      assert.strictEqual((yield* queueState(env.admin, env.names.schemas)).messageCount, 0)
      assert.strictEqual((yield* queueState(env.admin, env.names.validations)).messageCount, 1, "another role's queue is untouched")
    }))

  it.live("a role that is not one of the proxy's queues, or a queue's name, is INVALID_ARGUMENT listing the roles", () =>
    Effect.gen(function*() {
      const env = yield* makeTestEnv()
      for (const role of [env.names.schemas, "amq.rabbitmq.trace", "", "SCHEMAS"]) {
        const error = yield* Effect.flip(purge(env.client, role))
        assert.strictEqual(error.code, grpc.status.INVALID_ARGUMENT, role)
        assert.match(error.details, /^role must be one of schemas, validations, schema_results, validation_results, schemas_dead, validations_dead, schemas_retry_/)
      }
    }))

  it.live("needs the admin scope, as do PeekDeadLetters and RedriveDeadLetters; the CLI prints the count", () =>
    Effect.gen(function*() {
      const admin = `key-${randomBytes(16).toString("hex")}`
      const consumer = `key-${randomBytes(16).toString("hex")}`
      const hash = (key: string) => createHash("sha256").update(key).digest("hex")
      const env = yield* makeTestEnv({ MESSAGING_API_KEYS: `ops:${hash(admin)}:admin,worker:${hash(consumer)}:consume+publish` })
      yield* publishJson(env.admin, env.names.exchange, "schemas.*", schemaBody("p-9"))
      yield* waitForQueue(env.admin, env.names.schemas, (q) => q.messageCount === 1)
      const denied = yield* Effect.flip(purge(env.client, "schemas", withKey(consumer)))
      assert.strictEqual(denied.code, grpc.status.PERMISSION_DENIED)
      assert.strictEqual((yield* Effect.flip(purge(env.client, "schemas"))).code, grpc.status.UNAUTHENTICATED)
      // The other admin RPCs of issue 15: the same matrix.
      const adminCall = (method: "peekDeadLetters" | "redriveDeadLetters", key: string | undefined) =>
        Effect.callback<number>((resume) => {
          const done = (error: grpc.ServiceError | null) => resume(Effect.succeed(error?.code ?? grpc.status.OK))
          const metadata = key === undefined ? new grpc.Metadata() : withKey(key)
          if (method === "peekDeadLetters") env.client.peekDeadLetters({ kind: MessageKind.MESSAGE_KIND_SCHEMA, limit: 0, after: "" }, metadata, done)
          else env.client.redriveDeadLetters({ kind: MessageKind.MESSAGE_KIND_SCHEMA, ids: [], all: true, limit: 0 }, metadata, done)
        })
      for (const method of ["peekDeadLetters", "redriveDeadLetters"] as const) {
        assert.deepStrictEqual(
          [yield* adminCall(method, undefined), yield* adminCall(method, consumer), yield* adminCall(method, admin)],
          [grpc.status.UNAUTHENTICATED, grpc.status.PERMISSION_DENIED, grpc.status.OK],
          method
        )
      }
      assert.strictEqual((yield* queueState(env.admin, env.names.schemas)).messageCount, 1, "refused calls purged nothing")
      const printed = yield* Effect.callback<{ code: number; stdout: string; stderr: string }>((resume) => {
        execFile(process.execPath, [cliScript, "--port", String(env.port), "--api-key", admin, "purge", "schemas"], (error, stdout, stderr) =>
          resume(Effect.succeed({ code: error ? Number(error.code ?? 1) : 0, stdout, stderr })))
      })
      assert.strictEqual(printed.code, 0, printed.stderr)
      assert.deepStrictEqual(JSON.parse(printed.stdout), { queue: env.names.schemas, purged: 1 })
    }))
})
