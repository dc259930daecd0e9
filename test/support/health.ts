/** A minimal grpc.health.v1 client for the tests (two one-field messages, encoded by hand). */
import { explainIfInterrupted } from "./waiting.js"
import * as grpc from "@grpc/grpc-js"
import { BinaryReader, BinaryWriter } from "@bufbuild/protobuf/wire"
import { Effect } from "effect"

export interface HealthCheckRequest {
  readonly service: string
}
export interface HealthCheckResponse {
  /** 0 UNKNOWN, 1 SERVING, 2 NOT_SERVING, 3 SERVICE_UNKNOWN */
  readonly status: number
}

const codec = {
  requestSerialize: (r: HealthCheckRequest) => Buffer.from(new BinaryWriter().uint32(10).string(r.service).finish()),
  requestDeserialize: (b: Buffer): HealthCheckRequest => {
    const reader = new BinaryReader(b)
    return { service: reader.pos < reader.len && reader.uint32() === 10 ? reader.string() : "" }
  },
  responseSerialize: (r: HealthCheckResponse) => Buffer.from(new BinaryWriter().uint32(8).int32(r.status).finish()),
  responseDeserialize: (b: Buffer): HealthCheckResponse => {
    const reader = new BinaryReader(b)
    let status = 0
    while (reader.pos < reader.len) {
      const tag = reader.uint32()
      if (tag >>> 3 === 1) status = reader.int32()
      else reader.skip(tag & 7)
    }
    return { status }
  }
}

const definition = {
  check: { path: "/grpc.health.v1.Health/Check", requestStream: false, responseStream: false, ...codec },
  watch: { path: "/grpc.health.v1.Health/Watch", requestStream: false, responseStream: true, ...codec }
} satisfies grpc.ServiceDefinition

export interface HealthClient extends grpc.Client {
  check(
    request: HealthCheckRequest,
    callback: (error: grpc.ServiceError | null, response: HealthCheckResponse) => void
  ): grpc.ClientUnaryCall
  watch(request: HealthCheckRequest): grpc.ClientReadableStream<HealthCheckResponse>
}

export const HealthClient = grpc.makeGenericClientConstructor(definition, "grpc.health.v1.Health") as unknown as {
  new(address: string, credentials: grpc.ChannelCredentials): HealthClient
}

export const SERVING = 1
export const NOT_SERVING = 2

/** A health client for the proxy on `port`, closed with the scope. */
export const healthClient = (port: number) =>
  Effect.acquireRelease(
    Effect.sync(() => new HealthClient(`127.0.0.1:${port}`, grpc.credentials.createInsecure())),
    (client) => Effect.sync(() => client.close())
  )

/**
 * Waits, through Watch (which sends the current status, then every change), until `service`
 * reports `status` (no deadline of its own: waiting.ts).
 */
export const waitForHealth = (health: HealthClient, status: number, service = "") =>
  Effect.suspend(() => {
    let last: number | undefined
    return Effect.callback<void, Error>((resume) => {
      const call = health.watch({ service })
      call.on("data", (response: HealthCheckResponse) => {
        last = response.status
        if (response.status === status) {
          call.cancel()
          resume(Effect.void)
        }
      })
      call.on("error", (error: grpc.ServiceError) => {
        if (error.code !== grpc.status.CANCELLED) resume(Effect.fail(new Error(`health watch failed: ${error.message}`)))
      })
      return Effect.sync(() => call.cancel())
    }).pipe(explainIfInterrupted(`health of '${service}' to be ${status}`, () => last ?? "unreported"))
  })

/**
 * Records every status `service` reports through one Watch opened now, so that a dip shorter than
 * the time it takes to open a Watch is still seen. `until(predicate)` waits (event-driven) until
 * the statuses so far satisfy it (no deadline of its own: waiting.ts).
 */
export const recordHealth = (health: HealthClient, service = "") =>
  Effect.acquireRelease(
    Effect.sync(() => {
      const statuses: Array<number> = []
      const waiters = new Set<() => void>()
      const call = health.watch({ service })
      call.on("data", (response: HealthCheckResponse) => {
        statuses.push(response.status)
        for (const wake of waiters) wake()
      })
      call.on("error", () => undefined)
      const until = (predicate: (seen: ReadonlyArray<number>) => boolean) =>
        Effect.callback<void>((resume) => {
          const check = () => {
            if (!predicate(statuses)) return
            waiters.delete(check)
            resume(Effect.void)
          }
          waiters.add(check)
          check()
          return Effect.sync(() => waiters.delete(check))
        }).pipe(explainIfInterrupted(`health statuses of '${service}' to satisfy a condition`, () => statuses))
      return { statuses, until, call }
    }),
    ({ call }) => Effect.sync(() => call.cancel())
  )

/** The statuses went NOT_SERVING and, after that, SERVING again. */
export const dippedAndRecovered = (seen: ReadonlyArray<number>): boolean => {
  const dip = seen.indexOf(NOT_SERVING)
  return dip >= 0 && seen.indexOf(SERVING, dip) > dip
}
