/**
 * Preloaded into the proxy child with `node --import` (nothing in src/ changes): on SIGUSR2 it
 * writes one line to stderr with the child's `process.memoryUsage()`, plus what happened since the
 * previous report: event-loop delay (how late a 10 ms timer fired; catches any blocking) and GC
 * pauses. A signal listener, an unref'd histogram timer and a GC observer keep nothing alive.
 */
import { writeSync } from "node:fs"
import { monitorEventLoopDelay, PerformanceObserver } from "node:perf_hooks"

const delay = monitorEventLoopDelay({ resolution: 10 })
delay.enable()

let gcCount = 0
let gcTotalMs = 0
let gcMaxMs = 0
new PerformanceObserver((list) => {
  for (const entry of list.getEntries()) {
    gcCount++
    gcTotalMs += entry.duration
    gcMaxMs = Math.max(gcMaxMs, entry.duration)
  }
}).observe({ entryTypes: ["gc"] })

process.on("SIGUSR2", () => {
  const m = process.memoryUsage()
  const sample = {
    rss: m.rss,
    heapUsed: m.heapUsed,
    heapTotal: m.heapTotal,
    external: m.external,
    arrayBuffers: m.arrayBuffers,
    loopDelayP99Ms: delay.count > 0 ? delay.percentile(99) / 1e6 : 0,
    loopDelayMaxMs: delay.count > 0 ? delay.max / 1e6 : 0,
    gcCount,
    gcTotalMs,
    gcMaxMs
  }
  delay.reset()
  gcCount = 0
  gcTotalMs = 0
  gcMaxMs = 0
  try {
    writeSync(2, `BENCH_MEM ${JSON.stringify(sample)}\n`)
  } catch {
    // stderr gone: the benchmark stopped listening.
  }
})
