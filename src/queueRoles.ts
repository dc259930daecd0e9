/**
 * The proxy's queues by role, as GetQueueInfo reports them and PurgeQueue takes them: the four
 * contract queues, the two dead-letter queues, and the delay queues of `nack_delayed`
 * (broker/delayQueues.ts). A role names a queue of this proxy's configuration and nothing else.
 */
import type { Duration } from "effect"
import { delayQueues } from "./broker/delayQueues.js"
import { deadLetterQueue, type ProxySettings } from "./config.js"

type Rabbit = ProxySettings["rabbit"]

export type QueueRole =
  | "schemas"
  | "validations"
  | "schema_results"
  | "validation_results"
  | "schemas_dead"
  | "validations_dead"
  /** A delay queue: `schemas_retry_5s` is the schemas queue's 5 s tier. */
  | `${"schemas" | "validations"}_retry_${string}`

/**
 * The queues GetQueueInfo reports, in the documented order: the six, then the delay queues
 * (`retryDelays`, MESSAGING_RETRY_DELAYS), the schemas queue's tiers ascending, then the
 * validations queue's.
 */
export const reportedQueues = (
  rabbit: Rabbit,
  retryDelays: ReadonlyArray<Duration.Duration>
): ReadonlyArray<{ readonly role: QueueRole; readonly queue: string }> => [
  { role: "schemas", queue: rabbit.schemas.queue },
  { role: "validations", queue: rabbit.validations.queue },
  { role: "schema_results", queue: rabbit.schemaResults.queue },
  { role: "validation_results", queue: rabbit.validationResults.queue },
  { role: "schemas_dead", queue: deadLetterQueue(rabbit, rabbit.schemas.queue) },
  { role: "validations_dead", queue: deadLetterQueue(rabbit, rabbit.validations.queue) },
  ...delayQueues(rabbit, retryDelays).map(({ source, label, queue }) => ({
    role: `${source === rabbit.schemas.queue ? "schemas" : "validations"}_retry_${label}` as const,
    queue
  }))
]
