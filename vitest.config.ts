import { defineConfig } from "vitest/config"

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    // Integration tests share one real broker and spawn servers: keep files sequential on 2 cores.
    fileParallelism: false,
    // The only bound on a test: a guard against a wait that never ends, not a speed requirement.
    // The helpers that wait have no deadline of their own (test/support/waiting.ts), so a busy
    // machine makes a test slower, never wrong; a wait this bound interrupts says what it awaited.
    testTimeout: 300_000,
    hookTimeout: 300_000,
    // The proxies under test log every call; show a test's console output only when it fails.
    silent: "passed-only"
  }
})
