/**
 * Rate limits per caller, with Effect's RateLimiter (`effect/persistence`, token buckets): how
 * many messages a caller may publish (MESSAGING_PUBLISH_RATE) and how many calls it may open
 * (MESSAGING_CALL_RATE). The buckets live in Redis when MESSAGING_RATE_LIMIT_REDIS_URL is set, so
 * one caller's limit holds across every replica; in this process's memory otherwise.
 *
 * A bucket of `burst` tokens refilled at `perSecond`: RateLimiter's token bucket takes `limit`
 * tokens per `window`, so limit = burst and window = burst / perSecond seconds. A store that
 * fails (Redis away) lets the call through and says so in a WARN: the limits protect the broker,
 * they must not take the service down with Redis. At start-up Redis must answer: the proxy stops
 * with one line naming the variable otherwise.
 */
import { NodeRedis } from "@effect/platform-node"
import { Context, Duration, Effect, Layer, Option, Redacted } from "effect"
import { RateLimiter } from "effect/persistence"
import { ProxyConfig, type RateLimit } from "./config.js"
import { describe } from "./errors.js"
import * as Metrics from "./metrics.js"

export class RateLimits extends Context.Service<RateLimits, {
  /**
   * Takes `tokens` from `caller`'s bucket of `limit` (None: no such limit configured); fails
   * nothing: answers the RESOURCE_EXHAUSTED details when the bucket is empty, undefined otherwise.
   */
  readonly take: (limit: Option.Option<RateLimit>, caller: string, tokens: number) => Effect.Effect<string | undefined>
  readonly publish: Option.Option<RateLimit>
  readonly calls: Option.Option<RateLimit>
}>()("messaging-proxy/RateLimits") {}

const make = Effect.gen(function*() {
  const { rateLimits } = yield* ProxyConfig
  const limiter = yield* RateLimiter.RateLimiter
  const take = (limit: Option.Option<RateLimit>, caller: string, tokens: number): Effect.Effect<string | undefined> => {
    if (Option.isNone(limit)) return Effect.succeed(undefined)
    const { variable, perSecond, burst } = limit.value
    return limiter.consume({
      algorithm: "token-bucket",
      onExceeded: "fail",
      limit: burst,
      window: Duration.millis((burst / perSecond) * 1000),
      key: `${variable}:${caller}`,
      tokens
    }).pipe(
      Effect.as(undefined),
      Effect.catch((error) =>
        error.reason._tag === "RateLimitExceeded"
          ? Metrics.rateLimited(variable).pipe(Effect.as(
            `rate limit ${variable}=${perSecond}/s:${burst} reached for ${caller}: retry in ${
              Math.ceil(Duration.toMillis(error.reason.retryAfter))
            } ms`
          ))
          : Effect.logWarning("rate limit store failed; the call goes through", { limit: variable, error: error.reason.message })
            .pipe(Effect.as(undefined))
      )
    )
  }
  return RateLimits.of({ take, publish: rateLimits.publish, calls: rateLimits.calls })
})

/** The limits as configured, their buckets in Redis or in memory. */
export const RateLimitsLive: Layer.Layer<RateLimits, never, ProxyConfig> = Layer.unwrap(
  Effect.map(ProxyConfig, ({ rateLimits, rabbit }) => {
    const store = Option.match(rateLimits.redisUrl, {
      onNone: () => RateLimiter.layerStoreMemory,
      // Keyed by the system's exchange too: the replicas of one deployment share buckets, other
      // deployments on the same Redis do not.
      onSome: (url) =>
        RateLimiter.layerStoreRedis({ prefix: `messaging-proxy:ratelimit:${rabbit.exchange}:` }).pipe(
          Layer.provide(NodeRedis.layer({ url: Redacted.value(url) })),
          // Start-up stops with one line naming the variable (never the URL: it may hold a password).
          Layer.catch((error) =>
            Layer.effect(
              RateLimiter.RateLimiterStore,
              Effect.die(new Error(`MESSAGING_RATE_LIMIT_REDIS_URL: cannot connect to Redis: ${describe(error.cause)}`))
            )
          )
        )
    })
    return Layer.effect(RateLimits, make).pipe(Layer.provide(RateLimiter.layer), Layer.provide(store))
  })
)
