/**
 * What the machine and each process did over a window of a phase: the load average before it, the
 * cores busy during it (/proc/stat), and the CPU seconds (user + system) of the proxy child
 * (/proc/<pid>/stat), this bench process (process.cpuUsage) and the broker (its beam.smp
 * processes). Divided by the messages the window moved, that is the CPU per message of each.
 */
import { loadavg } from "node:os"
import { findBrokerPid, machineCpuSeconds, processCpuSeconds } from "./proxyProcess.js"
import { now } from "./util.js"

export interface CpuWindow {
  /** The 1-minute load average just before the window. */
  readonly loadBefore: number
  readonly seconds: number
  /** Mean cores busy during the window, all processes (of os.cpus().length). */
  readonly coresBusy: number | null
  readonly cpuSeconds: {
    readonly proxy: number | null
    readonly bench: number
    readonly broker: number | null
    readonly machine: number | null
  }
}

/** CPU µs per message of each process and of the whole machine, over a window that moved `messages`. */
export const perMessage = (window: CpuWindow, messages: number) => {
  const us = (seconds: number | null) => (seconds === null || messages <= 0 ? null : (seconds * 1e6) / messages)
  return {
    proxy: us(window.cpuSeconds.proxy),
    bench: us(window.cpuSeconds.bench),
    broker: us(window.cpuSeconds.broker),
    machine: us(window.cpuSeconds.machine)
  }
}

/** The CPU seconds of all `pids` together (user + system), or null if one cannot be read. */
export const sumCpuSeconds = async (pids: ReadonlyArray<number>): Promise<number | null> => {
  let sum = 0
  for (const pid of pids) {
    const seconds = await processCpuSeconds(pid)
    if (seconds === undefined) return null
    sum += seconds
  }
  return sum
}

/**
 * Starts a window; the returned function ends it. `proxyPid` is the proxy child (none for a window
 * without one); `brokerPids` defaults to the machine's own broker.
 */
export const startCpuWindow = async (
  proxyPid: number | undefined,
  brokerPids?: ReadonlyArray<number>
): Promise<() => Promise<CpuWindow>> => {
  const brokers = brokerPids ?? [await findBrokerPid()].filter((p): p is number => p !== undefined)
  const loadBefore = loadavg()[0] ?? 0
  const proxyBefore = proxyPid === undefined ? undefined : await processCpuSeconds(proxyPid)
  const brokerBefore = brokers.length === 0 ? null : await sumCpuSeconds(brokers)
  const machineBefore = await machineCpuSeconds()
  const benchBefore = process.cpuUsage()
  const startedAt = now()
  return async () => {
    const bench = process.cpuUsage(benchBefore)
    const seconds = (now() - startedAt) / 1000
    const machineAfter = await machineCpuSeconds()
    const brokerAfter = brokers.length === 0 ? null : await sumCpuSeconds(brokers)
    const proxyAfter = proxyPid === undefined ? undefined : await processCpuSeconds(proxyPid)
    const machine = machineBefore && machineAfter ? machineAfter.busy - machineBefore.busy : null
    return {
      loadBefore,
      seconds,
      coresBusy: machine === null || seconds <= 0 ? null : machine / seconds,
      cpuSeconds: {
        proxy: proxyBefore === undefined || proxyAfter === undefined ? null : proxyAfter - proxyBefore,
        bench: (bench.user + bench.system) / 1e6,
        broker: brokerBefore === null || brokerAfter === null ? null : brokerAfter - brokerBefore,
        machine
      }
    }
  }
}
