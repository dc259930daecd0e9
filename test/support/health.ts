/** A minimal grpc.health.v1 client for the tests (two one-field messages, encoded by hand). */
import * as grpc from "@grpc/grpc-js"
import { BinaryReader, BinaryWriter } from "@bufbuild/protobuf/wire"

export interface HealthCheckRequest {
  readonly service: string
}
export interface HealthCheckResponse {
  /** 0 UNKNOWN, 1 SERVING, 2 NOT_SERVING, 3 SERVICE_UNKNOWN */
  readonly status: number
}

const definition = {
  check: {
    path: "/grpc.health.v1.Health/Check",
    requestStream: false,
    responseStream: false,
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
} satisfies grpc.ServiceDefinition

export interface HealthClient extends grpc.Client {
  check(
    request: HealthCheckRequest,
    callback: (error: grpc.ServiceError | null, response: HealthCheckResponse) => void
  ): grpc.ClientUnaryCall
}

export const HealthClient = grpc.makeGenericClientConstructor(definition, "grpc.health.v1.Health") as unknown as {
  new(address: string, credentials: grpc.ChannelCredentials): HealthClient
}
