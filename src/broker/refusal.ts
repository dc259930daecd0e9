/**
 * Why a connection attempt to the broker failed, told apart for operators: the node could not be
 * reached, or it was reached and refused us (credentials, the virtual host, TLS). A refusal does
 * not heal by retrying: someone has to change the configuration or the broker's users, so it is
 * logged as an ERROR naming the cause, counted by reason, and given to callers in the status.
 *
 * Sources: AMQP 0-9-1 (connection.start-ok answered by connection.close 403 ACCESS_REFUSED when
 * the credentials are refused; connection.open answered by connection.close 530 NOT_ALLOWED when
 * the vhost is missing or the user has no permissions on it), https://www.rabbitmq.com/docs/access-control.
 */
import { AMQPClient } from "@cloudamqp/amqp-client"
import { Effect, Redacted } from "effect"
import type { BrokerNode, ProxySettings } from "../config.js"
import { describe } from "../errors.js"

/** The `reason` label of the connection metrics, and the kind in log lines. */
export type ConnectFailureReason =
  | "unreachable"
  | "credentials_refused"
  | "vhost_not_found"
  | "vhost_access_refused"
  | "tls_failed"
  | "other"

export interface ConnectFailure {
  readonly reason: ConnectFailureReason
  /** One line for people: what happened, with the broker's own words where it gave any. */
  readonly description: string
}

/** Whether retrying the same configuration can succeed without anyone doing anything. */
export const isRefusal = (failure: ConnectFailure): boolean => failure.reason !== "unreachable"

const unreachableCodes = new Set([
  "ECONNREFUSED",
  "ECONNRESET",
  "ETIMEDOUT",
  "EHOSTUNREACH",
  "ENETUNREACH",
  "EHOSTDOWN",
  "ENOTFOUND",
  "EAI_AGAIN",
  "EPIPE"
])

/** Node's and OpenSSL's codes for a TLS handshake or certificate check that failed. */
const isTlsCode = (code: string): boolean =>
  /^ERR_(SSL|TLS)_/.test(code) || /CERT|SELF_SIGNED|UNABLE_TO_(GET|VERIFY)|HOSTNAME_MISMATCH|DEPTH_ZERO/.test(code)

const codeOf = (cause: unknown): string | undefined =>
  typeof cause === "object" && cause !== null && "code" in cause && typeof cause.code === "string" ? cause.code : undefined

/** amqplib's error when the broker answers connection.open with connection.close: it drops the reason. */
export const openRefusedByAmqplib = (cause: unknown): boolean =>
  /Expected ConnectionOpenOk; got <ConnectionClose/.test(describe(cause))

/**
 * Classifies an amqplib connect error (pure). `user` and `vhost` only go into the description;
 * the password never does (amqplib's messages do not carry it either).
 */
export const classifyConnectError = (cause: unknown, user: string, vhost: string): ConnectFailure => {
  const message = describe(cause)
  const code = codeOf(cause)
  if (/ACCESS.REFUSED|\b403\b/.test(message)) {
    return { reason: "credentials_refused", description: `the broker refused the credentials of user '${user}': ${brokerWords(message)}` }
  }
  if (/NOT_ALLOWED|\b530\b/.test(message)) return vhostRefusal(message, user, vhost)
  if (openRefusedByAmqplib(cause)) {
    return {
      reason: "vhost_access_refused",
      description: `the broker refused virtual host '${vhost}' to user '${user}' (it does not exist, or the user has no permissions on it)`
    }
  }
  if (code !== undefined && isTlsCode(code) || /\bSSL\b|\bTLS\b|certificate/i.test(message)) {
    return { reason: "tls_failed", description: `TLS with the broker failed: ${message.trim()}` }
  }
  if (code !== undefined && unreachableCodes.has(code) || /Socket closed abruptly|timeout|timed out/i.test(message)) {
    return { reason: "unreachable", description: `broker unreachable: ${message}` }
  }
  return { reason: "other", description: message }
}

/** The broker's reply text out of amqplib's or amqp-client's message, e.g. `ACCESS_REFUSED - Login was refused …`. */
const brokerWords = (message: string): string => /"([A-Z_]+ - [^"]*)"/.exec(message)?.[1] ?? /([A-Z_]{6,} - .*)/.exec(message)?.[1] ?? message

const vhostRefusal = (message: string, user: string, vhost: string): ConnectFailure => {
  const words = brokerWords(message).replace(/\s*\(530\)$/, "")
  return /not found/i.test(words)
    ? { reason: "vhost_not_found", description: `virtual host '${vhost}' does not exist on the broker: ${words}` }
    : { reason: "vhost_access_refused", description: `the broker refused virtual host '${vhost}' to user '${user}': ${words}` }
}

type Rabbit = ProxySettings["rabbit"]

/**
 * When amqplib hid why connection.open was refused (amqplib issue #602: it reports only
 * `Expected ConnectionOpenOk; got <ConnectionClose channel:0>`), asks once more with
 * @cloudamqp/amqp-client, which reports the broker's reply (`NOT_ALLOWED - vhost x not found`,
 * `NOT_ALLOWED - access to vhost 'x' refused for user 'y'`). Falls back to `failure` if that
 * attempt fails otherwise or connects after all (the broker changed meanwhile). Never fails.
 */
export const explainOpenRefusal = (
  failure: ConnectFailure,
  rabbit: Rabbit,
  node: BrokerNode,
  tls: { readonly ca?: unknown; readonly cert?: unknown; readonly key?: unknown } | undefined
): Effect.Effect<ConnectFailure> => {
  const url = `${tls ? "amqps" : "amqp"}://${encodeURIComponent(rabbit.user)}:${
    encodeURIComponent(Redacted.value(rabbit.password))
  }@${node.host.includes(":") ? `[${node.host}]` : node.host}:${node.port}/${encodeURIComponent(rabbit.vhost)}`
  return Effect.tryPromise(async () => {
    const client = new AMQPClient(url, tls as ConstructorParameters<typeof AMQPClient>[1], null)
    await client.connect()
    await client.close().catch(() => undefined)
  }).pipe(
    Effect.timeoutOption("10 seconds"),
    Effect.match({
      onSuccess: () => failure,
      onFailure: (error) => {
        const message = describe(error.cause)
        return /NOT_ALLOWED|\b530\b/.test(message) ? vhostRefusal(message, rabbit.user, rabbit.vhost) : failure
      }
    })
  )
}
