/**
 * Secrets never reach the logs: the built proxy runs with a broker user of its own (random
 * password), API keys required and debug logging on; after traffic that exercises every log path
 * (good and bad keys, streams, a subscription, a malformed body, shutdown) neither the password
 * nor any key, presented or configured, appears in anything it printed.
 */
import { assert, describe, it } from "@effect/vitest"
import * as grpc from "@grpc/grpc-js"
import { Effect } from "effect"
import { createHash, randomBytes } from "node:crypto"
import { MessagingServiceClient } from "../gen/messaging.js"
import { schemaBody } from "./fixtures/bodies.js"
import { clusterNode, ensureCluster, nodeAmqpUrl, rabbitmqctl } from "./support/cluster.js"
import { makeAdmin, makeNames, proxyEnv, publishJson, publishRaw, waitForQueue } from "./support/harness.js"
import { grpcPortOf, runProxy } from "./support/process.js"

/**
 * A broker user of the test's own, so its password is a secret nothing else prints. It lives on
 * node 1 of the local cluster: tests never change the users of the shared broker.
 */
const brokerUser = Effect.acquireRelease(
  Effect.gen(function*() {
    yield* ensureCluster
    const user = `mp-test-${randomBytes(4).toString("hex")}`
    const password = `pw-${randomBytes(16).toString("hex")}`
    yield* rabbitmqctl(1, "add_user", user, password)
    yield* rabbitmqctl(1, "set_permissions", "-p", "/", user, ".*", ".*", ".*")
    return { user, password }
  }),
  ({ user }) => Effect.ignore(rabbitmqctl(1, "delete_user", user))
)

const metadataWith = (key: string) => {
  const metadata = new grpc.Metadata()
  metadata.set("authorization", `Bearer ${key}`)
  return metadata
}

describe("secrets", () => {
  it.live("the broker password and API keys appear in no log line", () =>
    Effect.gen(function*() {
      const { user, password } = yield* brokerUser
      const names = makeNames()
      const admin = yield* makeAdmin(names, nodeAmqpUrl(1))
      const goodKey = `key-${randomBytes(16).toString("hex")}`
      const wrongKey = `wrong-${randomBytes(16).toString("hex")}`
      const hash = createHash("sha256").update(goodKey).digest("hex")
      const env = proxyEnv(names, {
        RABBITMQ_HOST: "127.0.0.1",
        RABBITMQ_PORT: String(clusterNode(1).port),
        RABBITMQ_USER: user,
        RABBITMQ_PASSWORD: password,
        MESSAGING_API_KEYS: `tester:${hash}:admin`,
        MESSAGING_CONNECTION_DEBUG: "true"
      })
      const traffic: Array<string> = []
      const result = yield* runProxy(env, (kill, stdout) => {
        const port = grpcPortOf(stdout)
        const client = new MessagingServiceClient(`127.0.0.1:${port}`, grpc.credentials.createInsecure())
        client.getMessagingParams({}, metadataWith(goodKey), (error, response) => {
          traffic.push(error ? `params failed ${error.code}` : `params ok ${response.password === password}`)
          client.getMessagingParams({}, metadataWith(wrongKey), (refused) => {
            traffic.push(`wrong key ${refused?.code}`)
            const stream = client.streamSchemaMessages({}, metadataWith(goodKey))
            stream.on("error", () => undefined)
            stream.on("data", () => {
              traffic.push("streamed")
              kill() // shutdown with the stream open: its log lines too
            })
            Effect.runFork(
              Effect.gen(function*() {
                yield* waitForQueue(admin, names.schemas, (q) => q.consumerCount === 1)
                yield* publishRaw(admin, names.exchange, "schemas.*", Buffer.from(`{"id": 1, "p": "${password}"`))
                yield* publishJson(admin, names.exchange, "schemas.*", schemaBody("secret-test"))
              })
            )
          })
        })
      }, "connected to broker")
      assert.deepStrictEqual(traffic, ["params ok true", `wrong key ${grpc.status.UNAUTHENTICATED}`, "streamed"])
      assert.strictEqual(result.code, 0, result.stderr)
      const output = result.stdout + result.stderr
      assert.include(output, "call refused", "the refusal was logged")
      assert.include(output, "malformed body dead-lettered", "the dead-lettering was logged")
      assert.isAbove(output.split("\n").length, 8)
      for (const secret of [password, goodKey, wrongKey, hash]) assert.notInclude(output, secret)
    }))
})
