/** The whole service as one Layer: config → logging → broker (+ topology) → gRPC server. */
import { Layer } from "effect"
import { Broker } from "./broker.js"
import { ProxyConfig } from "./config.js"
import { GrpcServer } from "./grpcServer.js"
import { LoggingLive } from "./logging.js"

export const ProxyLive = GrpcServer.layer.pipe(
  Layer.provideMerge(Broker.layer),
  Layer.provideMerge(LoggingLive),
  Layer.provideMerge(ProxyConfig.layer)
)
