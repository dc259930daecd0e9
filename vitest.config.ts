import { defineConfig } from "vitest/config"

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    // Integration tests share one real broker and spawn servers: keep files sequential on 2 cores.
    fileParallelism: false,
    testTimeout: 30_000,
    hookTimeout: 60_000,
    // The proxies under test log every call; show a test's console output only when it fails.
    silent: "passed-only"
  }
})
