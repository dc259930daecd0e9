/**
 * Who may call what, and how much: API keys (configured as SHA-256 hashes, compared in constant
 * time) or mutual-TLS certificate identities grant scopes; open streams are counted per caller,
 * per connection and in total. Every decision is made before a call reaches the broker.
 */
import * as grpc from "@grpc/grpc-js"
import { createHash, timingSafeEqual } from "node:crypto"
import type { ProxySettings, Scope } from "./config.js"

export type Decision =
  | { readonly _tag: "Allowed"; readonly caller: string }
  | {
    readonly _tag: "Denied"
    readonly code: grpc.status
    readonly details: string
    /** Who was refused, when known (a valid key or certificate without the scope). */
    readonly caller?: string | undefined
  }

/** The part of any grpc-js server call that identifies its caller. */
export interface CallerEvidence {
  readonly metadata: grpc.Metadata
  getPeer(): string
  getAuthContext(): grpc.ServerUnaryCall<unknown, unknown> extends { getAuthContext(): infer C } ? C : never
}

const keyFromMetadata = (metadata: grpc.Metadata): string | undefined => {
  const authorization = metadata.get("authorization")[0]
  if (typeof authorization === "string") {
    const match = /^Bearer\s+(.+)$/i.exec(authorization.trim())
    if (match?.[1]) return match[1]
  }
  const apiKey = metadata.get("x-api-key")[0]
  return typeof apiKey === "string" && apiKey !== "" ? apiKey : undefined
}

/** Peer "ip:port" identifies one HTTP/2 connection; the caller without auth is its address. */
const hostOf = (peer: string): string => peer.replace(/:\d+$/, "")

export interface StreamSlot {
  readonly release: () => void
}

export const makeAccess = (settings: Pick<ProxySettings, "auth" | "limits" | "grpc">) => {
  const { apiKeys, certificateIdentities } = settings.auth
  const open = apiKeys.length === 0 && certificateIdentities.length === 0

  const keyByHash = (presented: string) => {
    const digest = createHash("sha256").update(presented).digest()
    // Compare against every key, so the time taken does not tell which one (or none) matched.
    let found: (typeof apiKeys)[number] | undefined
    for (const key of apiKeys) if (timingSafeEqual(digest, key.sha256) && found === undefined) found = key
    return found
  }

  const identityOf = (call: CallerEvidence) => {
    if (certificateIdentities.length === 0) return undefined
    const commonName = call.getAuthContext()?.sslPeerCertificate?.subject?.CN
    return typeof commonName === "string"
      ? certificateIdentities.find((identity) => identity.commonName === commonName)
      : undefined
  }

  const authorize = (call: CallerEvidence, scope: Scope, method: string): Decision => {
    if (open) return { _tag: "Allowed", caller: hostOf(call.getPeer()) }
    const presented = keyFromMetadata(call.metadata)
    const key = presented === undefined ? undefined : keyByHash(presented)
    const identity = key === undefined ? identityOf(call) : undefined
    const grant = key
      ? { caller: `key:${key.name}`, scopes: key.scopes }
      : identity
      ? { caller: `cert:${identity.commonName}`, scopes: identity.scopes }
      : undefined
    if (grant === undefined) {
      return {
        _tag: "Denied",
        code: grpc.status.UNAUTHENTICATED,
        details: presented === undefined
          ? "missing credentials: send 'authorization: Bearer <api key>' (or 'x-api-key') metadata"
          : "invalid API key"
      }
    }
    if (!grant.scopes.has(scope) && !grant.scopes.has("admin")) {
      return {
        _tag: "Denied",
        code: grpc.status.PERMISSION_DENIED,
        details: `${grant.caller} lacks the '${scope}' scope that ${method} needs`,
        caller: grant.caller
      }
    }
    return { _tag: "Allowed", caller: grant.caller }
  }

  const total = { count: 0 }
  const byCaller = new Map<string, number>()
  const byConnection = new Map<string, number>()
  const bump = (map: Map<string, number>, key: string, delta: number) => {
    const next = (map.get(key) ?? 0) + delta
    if (next === 0) map.delete(key)
    else map.set(key, next)
  }

  /** Takes a stream slot, or says which limit is full. */
  const acquireStreamSlot = (caller: string, peer: string): StreamSlot | Decision => {
    const { maxStreamsTotal, maxStreamsPerCaller } = settings.limits
    const perConnection = settings.grpc.maxConcurrentStreamsPerConnection
    const full = (limit: string, value: number, whose: string): Decision => ({
      _tag: "Denied",
      code: grpc.status.RESOURCE_EXHAUSTED,
      details: `limit ${limit}=${value} reached${whose}: close a stream first`
    })
    if (total.count >= maxStreamsTotal) return full("MESSAGING_MAX_STREAMS_TOTAL", maxStreamsTotal, "")
    if ((byCaller.get(caller) ?? 0) >= maxStreamsPerCaller) {
      return full("MESSAGING_MAX_STREAMS_PER_CALLER", maxStreamsPerCaller, ` for ${caller}`)
    }
    if ((byConnection.get(peer) ?? 0) >= perConnection) {
      return full("GRPC_MAX_CONCURRENT_STREAMS_PER_CONNECTION", perConnection, ` on connection ${peer}`)
    }
    total.count++
    bump(byCaller, caller, 1)
    bump(byConnection, peer, 1)
    let released = false
    return {
      release: () => {
        if (released) return
        released = true
        total.count--
        bump(byCaller, caller, -1)
        bump(byConnection, peer, -1)
      }
    }
  }

  return { open, authorize, acquireStreamSlot, openStreams: () => total.count }
}

export type Access = ReturnType<typeof makeAccess>

const callers = new WeakMap<object, string>()

/** Records who a call was allowed as (guard.ts), for what a handler limits per caller. */
export const rememberCaller = (call: object, caller: string): void => {
  callers.set(call, caller)
}

/** Who `call` was allowed as: `key:<name>`, `cert:<CN>`, or the client's address when open. */
export const callerOf = (call: object): string | undefined => callers.get(call)
