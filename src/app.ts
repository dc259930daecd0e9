/** The whole service as one Layer: config → logging (and dependencies' logs) → metrics endpoint → broker (+ topology) → gRPC server. */
import { Layer } from "effect"
import { Broker } from "./broker/Broker.js"
import { ProxyConfig } from "./config.js"
import { DependencyLogsLive } from "./dependencyLogs.js"
import { GrpcServer } from "./grpcServer.js"
import { LoggingLive } from "./logging.js"
import { MetricsLive } from "./metrics.js"

export const ProxyLive = GrpcServer.layer.pipe(
  Layer.provideMerge(Broker.layer),
  Layer.provideMerge(MetricsLive),
  Layer.provideMerge(DependencyLogsLive),
  Layer.provideMerge(LoggingLive),
  Layer.provideMerge(ProxyConfig.layer)
)
