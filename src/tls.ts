/**
 * TLS material: PEM files named by the configuration are read at start, and a missing or
 * unreadable one stops start-up with a line naming the variable and the path.
 */
import * as grpc from "@grpc/grpc-js"
import { Data, Effect, Option } from "effect"
import { readFile } from "node:fs/promises"
import type { ProxySettings } from "./config.js"

export class TlsFileUnreadable extends Data.TaggedError("TlsFileUnreadable")<{
  readonly variable: string
  readonly path: string
  readonly reason: string
}> {
  override get message(): string {
    return `invalid configuration: ${this.variable}=${JSON.stringify(this.path)}: cannot read the file (${this.reason})`
  }
}

export const readPem = (variable: string, path: string) =>
  Effect.tryPromise({
    try: async () => {
      const pem = await readFile(path)
      if (!pem.toString("latin1").includes("-----BEGIN ")) throw new Error("not a PEM file")
      return pem
    },
    catch: (cause) =>
      new TlsFileUnreadable({ variable, path, reason: cause instanceof Error ? cause.message : String(cause) })
  })

const readOptional = (variable: string, path: string | undefined) =>
  path === undefined ? Effect.succeed(undefined) : readPem(variable, path)

/** Insecure, TLS, or mutual TLS (client certificates required and checked against the CA). */
export const serverCredentials = (grpcSettings: ProxySettings["grpc"]) =>
  Option.match(grpcSettings.tls, {
    onNone: () => Effect.succeed(grpc.ServerCredentials.createInsecure()),
    onSome: (files) =>
      Effect.gen(function*() {
        const cert = yield* readPem("GRPC_TLS_CERT_PATH", files.certPath)
        const key = yield* readPem("GRPC_TLS_KEY_PATH", files.keyPath)
        const ca = yield* readOptional("GRPC_TLS_CA_PATH", files.caPath)
        return grpc.ServerCredentials.createSsl(ca ?? null, [{ cert_chain: cert, private_key: key }], ca !== undefined)
      })
  })

/** Socket options for amqps://, or undefined for plain AMQP. */
export const amqpTlsOptions = (rabbit: ProxySettings["rabbit"]) =>
  Option.match(rabbit.tls, {
    onNone: () => Effect.succeed(undefined),
    onSome: (files) =>
      Effect.all({
        ca: readOptional("RABBITMQ_TLS_CA_PATH", files.caPath),
        cert: readOptional("RABBITMQ_TLS_CERT_PATH", files.certPath),
        key: readOptional("RABBITMQ_TLS_KEY_PATH", files.keyPath)
      }).pipe(
        Effect.map(({ ca, cert, key }) => ({
          ...(ca ? { ca: [ca] } : {}),
          ...(cert ? { cert } : {}),
          ...(key ? { key } : {})
        }))
      )
  })
