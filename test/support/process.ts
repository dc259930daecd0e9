/** The built proxy (dist/src/main.js) as a child process, for tests of the real process. */
import { Effect } from "effect"
import { spawn } from "node:child_process"
import { fileURLToPath } from "node:url"

const mainScript = fileURLToPath(new URL("../../dist/src/main.js", import.meta.url))

export interface Exited {
  readonly code: number | null
  readonly stdout: string
  readonly stderr: string
}

/**
 * Runs the built proxy; `whenUp` is called once its output includes `marker`, and `onOutput`
 * (if any) after every chunk of stdout, with everything so far.
 */
export const runProxy = (
  env: Record<string, string>,
  whenUp?: (kill: () => void, stdout: string, pid: number) => void,
  marker = "connected to broker",
  onOutput?: (stdout: string, kill: () => void) => void
) =>
  Effect.callback<Exited>((resume) => {
    const child = spawn(process.execPath, [mainScript], {
      env: { PATH: process.env["PATH"] ?? "", ...env },
      stdio: ["ignore", "pipe", "pipe"]
    })
    let stdout = ""
    let stderr = ""
    child.stdout.on("data", (chunk: Buffer) => {
      stdout += chunk.toString()
      if (whenUp && stdout.includes(marker)) {
        const up = whenUp
        whenUp = undefined
        up(() => child.kill("SIGTERM"), stdout, child.pid ?? 0)
      }
      onOutput?.(stdout, () => child.kill("SIGTERM"))
    })
    child.stderr.on("data", (chunk: Buffer) => (stderr += chunk.toString()))
    child.on("exit", (code) => resume(Effect.succeed({ code, stdout, stderr })))
    return Effect.sync(() => child.kill("SIGKILL"))
  })


/** The bound gRPC port, from the proxy's "gRPC server listening" log line. */
export const grpcPortOf = (stdout: string): number => {
  const line = stdout.split("\n").find((l) => l.includes("gRPC server listening")) ?? ""
  return Number(/"port":(\d+)/.exec(line)?.[1])
}
