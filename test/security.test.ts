/**
 * Security over the real server: TLS and mutual TLS handshakes, the API-key auth matrix (with
 * certificate identities), stream and message-size limits, and health/reflection staying open.
 */
import { assert, describe, it } from "@effect/vitest"
import * as grpc from "@grpc/grpc-js"
import { Deferred, Effect, Exit } from "effect"
import { createHash, randomBytes } from "node:crypto"
import { readFileSync } from "node:fs"
import * as http2 from "node:http2"
import { MessagingServiceClient } from "../gen/messaging.js"
import { makePki, type Pki } from "./support/certs.js"
import { schemaBody } from "./fixtures/bodies.js"
import {
  grpcClient,
  makeNames,
  makeTestEnv,
  publishJson,
  queueState,
  readMessages,
  startProxy,
  unary,
  waitForQueue
} from "./support/harness.js"
import { startRelay, startTlsRelay } from "./support/relay.js"
import { healthClient, NOT_SERVING, SERVING, waitForHealth } from "./support/health.js"

const sha256 = (value: string) => createHash("sha256").update(value).digest("hex")
const newKey = () => `test-key-${randomBytes(12).toString("hex")}`

const withKey = (key: string | undefined) => {
  const metadata = new grpc.Metadata()
  if (key !== undefined) metadata.set("authorization", `Bearer ${key}`)
  return metadata
}

const clientFor = (port: number, credentials: grpc.ChannelCredentials) =>
  Effect.acquireRelease(
    Effect.sync(() => new MessagingServiceClient(`127.0.0.1:${port}`, credentials)),
    (c) => Effect.sync(() => c.close())
  )

const params = (client: MessagingServiceClient, metadata = new grpc.Metadata()) =>
  Effect.callback<string, grpc.ServiceError>((resume) => {
    client.getMessagingParams({}, metadata, { deadline: Date.now() + 5000 }, (error, response) =>
      resume(error ? Effect.fail(error) : Effect.succeed(response.exchange?.exchange ?? "")))
  })

/** The status a server stream ends with (reading nothing). */
const streamStatus = (call: grpc.ClientReadableStream<unknown>) =>
  Effect.callback<grpc.StatusObject>((resume) => {
    call.on("data", () => undefined)
    call.on("error", () => undefined)
    call.on("status", (status: grpc.StatusObject) => resume(Effect.succeed(status)))
  })

const codeOf = <A>(effect: Effect.Effect<A, grpc.ServiceError>) =>
  Effect.exit(effect).pipe(
    Effect.map((exit) => Exit.isSuccess(exit) ? grpc.status.OK : (Exit.findErrorOption(exit).pipe((o) => o._tag === "Some" ? o.value.code : -1)))
  )

const pem = (pki: Pki, file: string) => readFileSync(pki.path(file))

/** The proxy's TLS variables for the throwaway PKI; `mutual` adds the CA for client certificates. */
const tlsEnv = (pki: Pki, mutual: boolean): Record<string, string> => ({
  GRPC_TLS_ENABLED: "true",
  GRPC_TLS_CERT_PATH: pki.path("server.crt"),
  GRPC_TLS_KEY_PATH: pki.path("server.key"),
  ...(mutual ? { GRPC_TLS_CA_PATH: pki.path("ca.crt") } : {})
})

describe("TLS", () => {
  it.live("server TLS: a client trusting the CA is served, a plaintext or untrusting client is not", () =>
    Effect.gen(function*() {
      const pki = yield* makePki
      const env = yield* makeTestEnv(tlsEnv(pki, false))
      const trusting = yield* clientFor(env.port, grpc.credentials.createSsl(pem(pki, "ca.crt")))
      assert.strictEqual(yield* params(trusting), env.names.exchange)
      const plaintext = yield* clientFor(env.port, grpc.credentials.createInsecure())
      assert.strictEqual(yield* codeOf(params(plaintext)), grpc.status.UNAVAILABLE)
      const untrusting = yield* clientFor(env.port, grpc.credentials.createSsl(pem(pki, "rogue-ca.crt")))
      assert.strictEqual(yield* codeOf(params(untrusting)), grpc.status.UNAVAILABLE)
    }))

  it.live("mutual TLS: only clients with a certificate from the configured CA get through", () =>
    Effect.gen(function*() {
      const pki = yield* makePki
      const env = yield* makeTestEnv(tlsEnv(pki, true))
      const ca = pem(pki, "ca.crt")
      const good = yield* clientFor(env.port, grpc.credentials.createSsl(ca, pem(pki, "client.key"), pem(pki, "client.crt")))
      assert.strictEqual(yield* params(good), env.names.exchange)
      const noCert = yield* clientFor(env.port, grpc.credentials.createSsl(ca))
      assert.strictEqual(yield* codeOf(params(noCert)), grpc.status.UNAVAILABLE)
      const rogue = yield* clientFor(env.port, grpc.credentials.createSsl(ca, pem(pki, "rogue.key"), pem(pki, "rogue.crt")))
      assert.strictEqual(yield* codeOf(params(rogue)), grpc.status.UNAVAILABLE)
    }))

  it.live("a missing or unreadable TLS file stops start-up with a line naming it", () =>
    Effect.gen(function*() {
      const pki = yield* makePki
      const failure = yield* Effect.flip(Effect.scoped(startProxy(makeNames(), {
        GRPC_TLS_ENABLED: "true",
        GRPC_TLS_CERT_PATH: pki.path("server.crt"),
        GRPC_TLS_KEY_PATH: pki.path("missing.key")
      })))
      assert.match(
        failure.message,
        /^invalid configuration: GRPC_TLS_KEY_PATH=".*missing\.key": cannot read the file \(ENOENT/
      )
      const notPem = yield* Effect.flip(Effect.scoped(startProxy(makeNames(), {
        GRPC_TLS_ENABLED: "true",
        GRPC_TLS_CERT_PATH: pki.path("server.ext"),
        GRPC_TLS_KEY_PATH: pki.path("server.key")
      })))
      assert.match(notPem.message, /GRPC_TLS_CERT_PATH=".*server\.ext": cannot read the file \(not a PEM file\)/)
    }))
})

describe("caller authentication and authorization", () => {
  const keys = { params: newKey(), consume: newKey(), publish: newKey(), admin: newKey() }
  const apiKeys = [
    `api:${sha256(keys.params)}:params`,
    `typechecker:${sha256(keys.consume)}:consume`,
    `publisher:${sha256(keys.publish)}:publish`,
    `ops:${sha256(keys.admin)}:admin`
  ].join(",")

  it.live("no key → UNAUTHENTICATED, wrong key → UNAUTHENTICATED, key without the scope → PERMISSION_DENIED", () =>
    Effect.gen(function*() {
      const env = yield* makeTestEnv({ MESSAGING_API_KEYS: apiKeys })
      const call = (key: string | undefined) => codeOf(params(env.client, withKey(key)))
      assert.strictEqual(yield* call(undefined), grpc.status.UNAUTHENTICATED)
      assert.strictEqual(yield* call("not-a-key"), grpc.status.UNAUTHENTICATED)
      assert.strictEqual(yield* call(keys.consume), grpc.status.PERMISSION_DENIED)
      assert.strictEqual(yield* call(keys.publish), grpc.status.PERMISSION_DENIED)
      assert.strictEqual(yield* call(keys.params), grpc.status.OK)
      assert.strictEqual(yield* call(keys.admin), grpc.status.OK, "admin holds every scope")
      // x-api-key works as well as the bearer form
      const metadata = new grpc.Metadata()
      metadata.set("x-api-key", keys.params)
      assert.strictEqual(yield* codeOf(params(env.client, metadata)), grpc.status.OK)
      const denied = yield* Effect.flip(params(env.client, withKey(keys.consume)))
      assert.strictEqual(denied.details, "key:typechecker lacks the 'params' scope that GetMessagingParams needs")
    }))

  it.live("streams need the consume scope, and a refused stream never reaches the broker", () =>
    Effect.gen(function*() {
      const env = yield* makeTestEnv({ MESSAGING_API_KEYS: apiKeys })
      const refused = yield* streamStatus(env.client.streamSchemaMessages({}, withKey(keys.params)))
      assert.strictEqual(refused.code, grpc.status.PERMISSION_DENIED)
      const anonymous = yield* streamStatus(env.client.subscribeSchemaMessages(withKey(undefined)))
      assert.strictEqual(anonymous.code, grpc.status.UNAUTHENTICATED)
      assert.strictEqual((yield* queueState(env.admin, env.names.schemas)).consumerCount, 0)
      const allowed = env.client.streamSchemaMessages({}, withKey(keys.consume))
      allowed.on("error", () => undefined)
      yield* waitForQueue(env.admin, env.names.schemas, (q) => q.consumerCount === 1)
      allowed.cancel()
    }))

  it.live("with mutual TLS, a client certificate's CN can stand for a key", () =>
    Effect.gen(function*() {
      const pki = yield* makePki
      const env = yield* makeTestEnv({
        ...tlsEnv(pki, true),
        MESSAGING_API_KEYS: apiKeys,
        MESSAGING_TLS_CLIENT_IDENTITIES: "client-1:consume"
      })
      const client = yield* clientFor(
        env.port,
        grpc.credentials.createSsl(pem(pki, "ca.crt"), pem(pki, "client.key"), pem(pki, "client.crt"))
      )
      const stream = client.streamSchemaMessages({})
      stream.on("error", () => undefined)
      yield* waitForQueue(env.admin, env.names.schemas, (q) => q.consumerCount === 1)
      stream.cancel()
      const denied = yield* Effect.flip(params(client))
      assert.strictEqual(denied.code, grpc.status.PERMISSION_DENIED)
      assert.strictEqual(denied.details, "cert:client-1 lacks the 'params' scope that GetMessagingParams needs")
      assert.strictEqual(yield* params(client, withKey(keys.params)), env.names.exchange, "a key still works")
    }))

  it.live("health and reflection stay open when keys are required", () =>
    Effect.gen(function*() {
      const env = yield* makeTestEnv({ MESSAGING_API_KEYS: apiKeys })
      const health = yield* healthClient(env.port)
      yield* waitForHealth(health, SERVING)
      assert.strictEqual((yield* unary(health.check.bind(health), { service: "" })).status, SERVING)
      // A reflection request (ServerReflectionInfo, list_services = field 7, "*") answers without a key.
      const listed = yield* Effect.callback<string, Error>((resume) => {
        const channel = new grpc.Client(`127.0.0.1:${env.port}`, grpc.credentials.createInsecure())
        const call = channel.makeBidiStreamRequest(
          "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
          (b: Buffer) => b,
          (b: Buffer) => b
        )
        call.on("data", (response: Buffer) => {
          resume(Effect.succeed(response.toString("latin1")))
          call.end()
          channel.close()
        })
        call.on("error", (e: Error) => resume(Effect.fail(e)))
        call.write(Buffer.from([0x3a, 0x01, 0x2a]))
      })
      assert.include(listed, "messaging.MessagingService")
    }))
})

describe("AMQPS to the broker", () => {
  it.live("with RABBITMQ_TLS_ENABLED the proxy speaks amqps:// and verifies the broker's certificate", () =>
    Effect.gen(function*() {
      const pki = yield* makePki
      const relay = yield* startTlsRelay(pem(pki, "server.crt"), pem(pki, "server.key"))
      const env = yield* makeTestEnv({
        RABBITMQ_HOST: "127.0.0.1",
        RABBITMQ_PORT: String(relay.port),
        RABBITMQ_TLS_ENABLED: "true",
        RABBITMQ_TLS_CA_PATH: pki.path("ca.crt")
      })
      assert.isAtLeast(relay.handshakes(), 1, "the connection went through TLS")
      yield* publishJson(env.admin, env.names.exchange, "schemas.*", schemaBody("over-tls"))
      const [message] = yield* readMessages(env.client.streamSchemaMessages({}), 1)
      assert.strictEqual(message?.id, "over-tls")
    }))

  it.live("a broker certificate from an untrusted CA is refused (health stays NOT_SERVING)", () =>
    Effect.gen(function*() {
      const pki = yield* makePki
      const relay = yield* startTlsRelay(pem(pki, "server.crt"), pem(pki, "server.key"))
      const port = yield* startProxy(makeNames(), {
        RABBITMQ_HOST: "127.0.0.1",
        RABBITMQ_PORT: String(relay.port),
        RABBITMQ_TLS_ENABLED: "true",
        RABBITMQ_TLS_CA_PATH: pki.path("rogue-ca.crt")
      })
      const health = yield* healthClient(port)
      yield* relay.attemptsReached(2) // it keeps retrying
      assert.strictEqual(relay.handshakes(), 0, "no TLS session was accepted by the proxy")
      assert.strictEqual((yield* unary(health.check.bind(health), { service: "" })).status, NOT_SERVING)
    }))
})

describe("limits", () => {
  it.live("keepalive: a client that stops answering pings is dropped, and its stream's consumer with it", () =>
    Effect.gen(function*() {
      const env = yield* makeTestEnv({ GRPC_KEEPALIVE_TIME_SECONDS: "1", GRPC_KEEPALIVE_TIMEOUT_SECONDS: "1" })
      // The client reaches the proxy through a relay that can go silent without closing anything.
      const relay = yield* startRelay(env.port)
      const client = yield* grpcClient(relay.port)
      const stream = client.streamSchemaMessages({})
      stream.on("error", () => undefined) // the client side never hears of it: that is the point
      yield* waitForQueue(env.admin, env.names.schemas, (q) => q.consumerCount === 1)
      yield* relay.freeze
      // Pings every 1 s, 1 s to answer: the proxy gives up on the connection within a few seconds.
      yield* waitForQueue(env.admin, env.names.schemas, (q) => q.consumerCount === 0)
    }))

  it.live("client pings: back-to-back pings on a connection that gets nothing are refused with GOAWAY too_many_pings; pings between responses are not (issue 12)", () =>
    Effect.gen(function*() {
      const env = yield* makeTestEnv()
      const connect = Effect.acquireRelease(
        Effect.callback<http2.ClientHttp2Session>((resume) => {
          const session = http2.connect(`http://127.0.0.1:${env.port}`)
          session.on("error", () => undefined)
          session.once("connect", () => resume(Effect.succeed(session)))
        }),
        (session) => Effect.sync(() => session.destroy())
      )
      const ping = (session: http2.ClientHttp2Session) =>
        Effect.callback<boolean>((resume) => {
          const sent = session.ping((error) => resume(Effect.succeed(error === null)))
          if (!sent) resume(Effect.succeed(false))
        })
      /** A GetRoutingKeySchemas call over the raw session: the server writes a response. */
      const call = (session: http2.ClientHttp2Session) =>
        Effect.callback<string>((resume) => {
          const request = session.request({
            ":method": "POST",
            ":path": "/messaging.MessagingService/GetRoutingKeySchemas",
            "content-type": "application/grpc",
            te: "trailers"
          })
          request.on("error", () => undefined)
          request.on("trailers", (trailers) => resume(Effect.succeed(String(trailers["grpc-status"]))))
          request.on("data", () => undefined)
          request.end(Buffer.alloc(5)) // one empty message: no compression flag, length 0
        })

      // Pings between responses (what flow-control probes of a receiving client look like).
      const busy = yield* connect
      for (let i = 0; i < 10; i++) {
        assert.strictEqual(yield* call(busy), "0")
        assert.isTrue(yield* ping(busy), `ping ${i} after a response was answered`)
      }
      assert.isFalse(busy.closed || busy.destroyed)

      // Back-to-back pings with nothing sent: the third early one (two strikes allowed) ends it.
      const idle = yield* connect
      const goaway = Deferred.makeUnsafe<{ code: number; data: string }>()
      idle.once("goaway", (code, _lastStreamId, data) => Deferred.doneUnsafe(goaway, Exit.succeed({ code, data: data?.toString() ?? "" })))
      for (let i = 0; i < 5 && !idle.closed && !idle.destroyed; i++) yield* ping(idle)
      assert.deepStrictEqual(yield* Deferred.await(goaway), { code: http2.constants.NGHTTP2_ENHANCE_YOUR_CALM, data: "too_many_pings" })
    }))

  it.live("streams over MESSAGING_MAX_STREAMS_PER_CALLER get RESOURCE_EXHAUSTED naming the limit", () =>
    Effect.gen(function*() {
      const env = yield* makeTestEnv({ MESSAGING_MAX_STREAMS_PER_CALLER: "2" })
      const first = env.client.streamSchemaMessages({})
      const second = env.client.streamValidationMessages({})
      for (const c of [first, second]) c.on("error", () => undefined)
      yield* waitForQueue(env.admin, env.names.schemas, (q) => q.consumerCount === 1)
      yield* waitForQueue(env.admin, env.names.validations, (q) => q.consumerCount === 1)
      const third = yield* streamStatus(env.client.subscribeSchemaMessages())
      assert.strictEqual(third.code, grpc.status.RESOURCE_EXHAUSTED)
      assert.strictEqual(third.details, "limit MESSAGING_MAX_STREAMS_PER_CALLER=2 reached for 127.0.0.1: close a stream first")
      first.cancel()
      yield* waitForQueue(env.admin, env.names.schemas, (q) => q.consumerCount === 0)
      // The slot is free again once the first stream has ended.
      const again = env.client.streamSchemaMessages({})
      again.on("error", () => undefined)
      yield* waitForQueue(env.admin, env.names.schemas, (q) => q.consumerCount === 1)
      again.cancel()
      second.cancel()
    }))

  it.live("streams over MESSAGING_MAX_STREAMS_TOTAL get RESOURCE_EXHAUSTED naming the limit", () =>
    Effect.gen(function*() {
      const env = yield* makeTestEnv({ MESSAGING_MAX_STREAMS_TOTAL: "1" })
      const first = env.client.streamSchemaMessages({})
      first.on("error", () => undefined)
      yield* waitForQueue(env.admin, env.names.schemas, (q) => q.consumerCount === 1)
      const second = yield* streamStatus(env.client.streamValidationMessages({}))
      assert.strictEqual(second.code, grpc.status.RESOURCE_EXHAUSTED)
      assert.match(second.details, /^limit MESSAGING_MAX_STREAMS_TOTAL=1 reached/)
      first.cancel()
    }))

  it.live("a request over GRPC_MAX_MESSAGE_BYTES gets RESOURCE_EXHAUSTED with the limit", () =>
    Effect.gen(function*() {
      const env = yield* makeTestEnv({ GRPC_MAX_MESSAGE_BYTES: "1000" })
      const status = yield* Effect.callback<grpc.ServiceError | null>((resume) => {
        // GetRoutingKeySchemasRequest with a 2000-byte unknown field (field 15, length-delimited).
        const big = Buffer.concat([Buffer.from([0x7a, 0xd0, 0x0f]), Buffer.alloc(2000, 0x61)])
        env.client.makeUnaryRequest(
          "/messaging.MessagingService/GetRoutingKeySchemas",
          (b: Buffer) => b,
          (b: Buffer) => b,
          big,
          (error) => resume(Effect.succeed(error))
        )
      })
      assert.strictEqual(status?.code, grpc.status.RESOURCE_EXHAUSTED)
      assert.match(status?.details ?? "", /larger than max \(2003 vs\.? 1000\)/)
    }))
})



