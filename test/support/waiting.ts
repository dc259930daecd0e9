/**
 * Waiting for an event in a test, never for a clock. The helpers that wait (for a queue state, a
 * metric, a subscription event, a health status) have no deadline of their own: on a busy
 * machine an event can take any time to come, and a bound in the helper turns that into a
 * failure. The test's own timeout (vitest.config.ts) is the one guard against a wait that never
 * ends; when it interrupts a wait, this says what was awaited and what was seen last, which
 * vitest shows with the failure.
 */
import { Effect } from "effect"

/** Prints what `self` was waiting for, and the last thing it saw, if the test's timeout interrupts it. */
export const explainIfInterrupted = (what: string, lastSeen: () => unknown) =>
<A, E, R>(self: Effect.Effect<A, E, R>): Effect.Effect<A, E, R> =>
  self.pipe(Effect.onInterrupt(() =>
    Effect.sync(() => {
      let seen: string
      try {
        seen = JSON.stringify(lastSeen()) ?? "nothing"
      } catch {
        seen = String(lastSeen())
      }
      console.error(`interrupted while waiting for ${what}; last seen: ${seen}`)
    })
  ))
