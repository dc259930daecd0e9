/** The whole service as one Layer: config → logging (and dependencies' logs) → metrics endpoint → tracing → broker (+ topology) → gRPC server. */
import { Layer } from "effect"
import { Broker } from "./broker/Broker.js"
import { ProxyConfig } from "./config.js"
import { DependencyLogsLive } from "./dependencyLogs.js"
import { GrpcServer } from "./grpcServer.js"
import { LoggingLive } from "./logging.js"
import { MetricsLive } from "./metrics.js"
import { TracingLive } from "./tracing.js"
import { RateLimitsLive } from "./rateLimits.js"

export const ProxyLive = GrpcServer.layer.pipe(
  Layer.provideMerge(Broker.layer),
  Layer.provideMerge(TracingLive),
  Layer.provideMerge(RateLimitsLive),
  Layer.provideMerge(MetricsLive),
  Layer.provideMerge(DependencyLogsLive),
  Layer.provideMerge(LoggingLive),
  Layer.provideMerge(ProxyConfig.layer)
)
