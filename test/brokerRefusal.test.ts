/**
 * Issue 12: a broker that refuses the proxy (credentials, a missing vhost, no permissions on the
 * vhost, TLS) is told apart from one that cannot be reached: one ERROR line naming the cause
 * (never the password), a `reason` on the connection metrics, and the cause in the status of
 * Publish, GetQueueInfo and a stream opened meanwhile. The built proxy runs as a process; the
 * user without permissions lives on a node of the local cluster, never on the shared broker.
 */
import { assert, describe, it } from "@effect/vitest"
import * as grpc from "@grpc/grpc-js"
import { Effect } from "effect"
import { randomBytes } from "node:crypto"
import { MessageKind, MessagingServiceClient } from "../gen/messaging.js"
import { schemaBody } from "./fixtures/bodies.js"
import { clusterNode, ensureCluster, rabbitmqctl } from "./support/cluster.js"
import { makeNames, proxyEnv } from "./support/harness.js"
import { sample } from "./support/metrics.js"
import { grpcPortOf, runProxy } from "./support/process.js"

interface Seen {
  readonly publish: grpc.StatusObject
  readonly queueInfo: grpc.StatusObject
  readonly stream: grpc.StatusObject
  readonly metrics: string
}

const metricsPortOf = (stdout: string): number => {
  const line = stdout.split("\n").find((l) => l.includes("metrics listening")) ?? ""
  return Number(/"port":(\d+)/.exec(line)?.[1])
}

const statusOf = (start: (done: (status: grpc.StatusObject) => void) => void) =>
  new Promise<grpc.StatusObject>((resolve) => start(resolve))

/**
 * Runs the proxy with `env` until the broker's refusal is logged, then calls Publish,
 * GetQueueInfo and StreamSchemaMessages and scrapes the metrics; stops it and returns its output
 * with what the calls got.
 */
const refusedRun = (env: Record<string, string>) =>
  Effect.gen(function*() {
    let seen: Promise<Seen> | undefined
    const result = yield* runProxy(env, undefined, undefined, (stdout, kill) => {
      if (seen !== undefined || !stdout.includes("broker refused the connection")) return
      const client = new MessagingServiceClient(`127.0.0.1:${grpcPortOf(stdout)}`, grpc.credentials.createInsecure())
      const publish = statusOf((done) =>
        client.publish(
          { kind: MessageKind.MESSAGE_KIND_SCHEMA, body: Buffer.from(JSON.stringify(schemaBody("refused-1"))), routingKey: "" },
          (error) => done(error ?? { code: grpc.status.OK, details: "", metadata: new grpc.Metadata() })
        ))
      const queueInfo = statusOf((done) =>
        client.getQueueInfo({}, (error) => done(error ?? { code: grpc.status.OK, details: "", metadata: new grpc.Metadata() })))
      const stream = statusOf((done) => {
        const call = client.streamSchemaMessages({})
        call.on("error", () => undefined)
        call.on("status", done)
      })
      seen = Promise.all([publish, queueInfo, stream, fetch(`http://127.0.0.1:${metricsPortOf(stdout)}/metrics`).then((r) => r.text())])
        .then(([publish, queueInfo, stream, metrics]) => ({ publish, queueInfo, stream, metrics }))
      void seen.finally(() => {
        client.close()
        kill()
      })
    })
    assert.isDefined(seen, result.stdout + result.stderr)
    return { ...result, seen: yield* Effect.promise(() => seen!) }
  })

const refusalLines = (stdout: string) => stdout.split("\n").filter((l) => l.includes('"level":"ERROR"'))

describe("broker refusals", () => {
  it.live.each([
    {
      case: "a wrong password",
      env: (): Record<string, string> => ({ RABBITMQ_PASSWORD: `wrong-${randomBytes(8).toString("hex")}` }),
      reason: "credentials_refused",
      cause: /the broker refused the credentials of user 'guest': ACCESS_REFUSED - Login was refused/
    },
    {
      case: "a missing vhost",
      env: (): Record<string, string> => ({ RABBITMQ_VHOST: `missing-${randomBytes(4).toString("hex")}` }),
      reason: "vhost_not_found",
      cause: /virtual host 'missing-[0-9a-f]+' does not exist on the broker: NOT_ALLOWED - vhost missing-[0-9a-f]+ not found/
    },
    {
      case: "TLS to a port that speaks plain AMQP",
      env: (): Record<string, string> => ({ RABBITMQ_TLS_ENABLED: "true" }),
      reason: "tls_failed",
      cause: /TLS with the broker failed: .*wrong version number/
    }
  ])("$case: one ERROR line naming it, its reason in the metrics, and in the statuses of calls made meanwhile", ({ env, reason, cause }) =>
    Effect.gen(function*() {
      const extra = env()
      const { code, stdout, stderr, seen } = yield* refusedRun(proxyEnv(makeNames(), { ...extra, RABBITMQ_HOST: "127.0.0.1" }))
      assert.strictEqual(code, 0, stderr)
      // One ERROR line per connection (consumers, publishers), each naming the cause.
      const errors = refusalLines(stdout)
      assert.isAtLeast(errors.length, 1, stdout)
      for (const line of errors) {
        assert.match(line, /broker refused the connection: /)
        assert.match(line, cause)
        assert.include(line, `"reason":"${reason}"`)
      }
      assert.notInclude(stdout, "broker unreachable")
      for (const status of [seen.publish, seen.queueInfo, seen.stream]) {
        assert.strictEqual(status.code, grpc.status.UNAVAILABLE, status.details)
        assert.match(status.details, cause)
      }
      assert.isAtLeast(sample(seen.metrics, "messaging_proxy_broker_connect_failures_total", { connection: "consumers", reason }) ?? 0, 1)
      if (extra["RABBITMQ_PASSWORD"] !== undefined) assert.notInclude(stdout + stderr, extra["RABBITMQ_PASSWORD"])
    }))

  it.live("a user without permissions on the vhost (on a node of the local cluster)", () =>
    Effect.gen(function*() {
      yield* ensureCluster
      const node = clusterNode(1)
      const user = `mp-noperm-${randomBytes(4).toString("hex")}`
      const password = `pw-${randomBytes(12).toString("hex")}`
      yield* Effect.acquireRelease(
        rabbitmqctl(1, "add_user", user, password),
        () => Effect.ignore(rabbitmqctl(1, "delete_user", user))
      )
      const { code, stdout, stderr, seen } = yield* refusedRun(proxyEnv(makeNames(), {
        RABBITMQ_HOST: "127.0.0.1",
        RABBITMQ_PORT: String(node.port),
        RABBITMQ_USER: user,
        RABBITMQ_PASSWORD: password
      }))
      assert.strictEqual(code, 0, stderr)
      const cause = new RegExp(`the broker refused virtual host '/' to user '${user}': NOT_ALLOWED - access to vhost '/' refused for user '${user}'`)
      const errors = refusalLines(stdout)
      assert.isAtLeast(errors.length, 1, stdout)
      for (const line of errors) assert.match(line, cause)
      for (const status of [seen.publish, seen.queueInfo, seen.stream]) {
        assert.strictEqual(status.code, grpc.status.UNAVAILABLE, status.details)
        assert.match(status.details, cause)
      }
      assert.isAtLeast(
        sample(seen.metrics, "messaging_proxy_broker_connect_failures_total", { connection: "consumers", reason: "vhost_access_refused" }) ?? 0,
        1
      )
      assert.notInclude(stdout + stderr, password)
    }))

  it.live("a broker that cannot be reached stays a WARN with reason unreachable", () =>
    Effect.gen(function*() {
      let metrics: Promise<string> | undefined
      const result = yield* runProxy(proxyEnv(makeNames(), { RABBITMQ_HOST: "127.0.0.1", RABBITMQ_PORT: "1" }), undefined, undefined, (stdout, kill) => {
        if (metrics !== undefined || !stdout.includes("broker unreachable, retrying")) return
        metrics = fetch(`http://127.0.0.1:${metricsPortOf(stdout)}/metrics`).then((r) => r.text())
        void metrics.finally(kill)
      })
      assert.strictEqual(result.code, 0, result.stderr)
      assert.deepStrictEqual(refusalLines(result.stdout), [])
      const body = yield* Effect.promise(() => metrics!)
      assert.isAtLeast(sample(body, "messaging_proxy_broker_connect_failures_total", { connection: "consumers", reason: "unreachable" }) ?? 0, 1)
    }))
})
