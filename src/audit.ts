/**
 * The audit trail: one log line per publishing or administrative call (Publish, PublishBatch,
 * GetQueueInfo, PurgeQueue, PeekDeadLetters, RedriveDeadLetters), refused ones included, with who (the API key's name, the client
 * certificate's CN, or the peer's address when the proxy is open), what (the RPC, and what the
 * handler recorded: message ids, counts, the queue) and the outcome (the status code's name).
 * Never a body, a key or a status' details (which can quote a client's input). The lines carry
 * the annotation `logger: "audit"`, so a log shipper can route them apart.
 */
import * as grpc from "@grpc/grpc-js"
import { Effect } from "effect"

/** The RPCs that get an audit line. */
export const auditedMethods: ReadonlySet<string> = new Set(["Publish", "PublishBatch", "GetQueueInfo", "PurgeQueue", "PeekDeadLetters", "RedriveDeadLetters"])

const detailsByCall = new WeakMap<object, Record<string, unknown>>()

/** What the call did, for its audit line (ids, counts, a queue): never a body or a secret. */
export const recordAudit = (call: object, fields: Record<string, unknown>): void => {
  detailsByCall.set(call, { ...detailsByCall.get(call), ...fields })
}

/** At most this many message ids in one line; the count says how many there were. */
const maxIdsPerLine = 100

export const idsForAudit = (ids: ReadonlyArray<string>): { readonly messageIds: ReadonlyArray<string>; readonly messageIdsOmitted?: number } =>
  ids.length <= maxIdsPerLine
    ? { messageIds: ids }
    : { messageIds: ids.slice(0, maxIdsPerLine), messageIdsOmitted: ids.length - maxIdsPerLine }

export interface AuditEntry {
  readonly method: string
  readonly code: grpc.status
  /** `key:<name>`, `cert:<CN>`, the client's address when open, or undefined when unknown. */
  readonly who: string | undefined
  readonly peer: string
  readonly call?: object | undefined
}

/** The audit line of one call. */
export const auditLine = ({ method, code, who, peer, call }: AuditEntry): Effect.Effect<void> =>
  Effect.logInfo("audit", {
    rpc: method,
    who: who ?? "unauthenticated",
    peer,
    outcome: grpc.status[code] ?? String(code),
    ...(call === undefined ? {} : detailsByCall.get(call))
  }).pipe(Effect.annotateLogs({ logger: "audit" }))
