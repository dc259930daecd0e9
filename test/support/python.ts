/**
 * Real third-party clients for compatibility tests: Debian's python3 with python3-grpcio,
 * python3-pika and python3-protobuf, and protoc (protobuf-compiler) to build their classes from
 * a fixture .proto. `.ci/run` installs them. The Debian interpreter is named by path because a
 * `python3` earlier on PATH (pyenv, a virtualenv) does not see Debian's packages.
 */
import { Effect } from "effect"
import { spawn } from "node:child_process"
import { createInterface } from "node:readline"
import { mkdtemp, rm } from "node:fs/promises"
import { tmpdir } from "node:os"
import { dirname, join } from "node:path"

export const python = process.env["TEST_PYTHON"] ?? "/usr/bin/python3"

export interface ProcessOutput {
  readonly code: number | null
  readonly stdout: string
  readonly stderr: string
}

/** Runs a command without blocking the event loop (the proxy under test may run in this process). */
export const run = (command: string, args: ReadonlyArray<string>) =>
  Effect.callback<ProcessOutput, Error>((resume) => {
    const child = spawn(command, args, { stdio: ["ignore", "pipe", "pipe"] })
    let stdout = ""
    let stderr = ""
    child.stdout.on("data", (chunk: Buffer) => (stdout += chunk.toString()))
    child.stderr.on("data", (chunk: Buffer) => (stderr += chunk.toString()))
    child.on("error", (error) => resume(Effect.fail(new Error(`${command}: ${error.message}`))))
    child.on("close", (code) => resume(Effect.succeed({ code, stdout, stderr })))
    return Effect.sync(() => child.kill("SIGKILL"))
  })

/** Like `run`, but fails with the process's stderr unless it exits 0. */
export const runOk = (command: string, args: ReadonlyArray<string>) =>
  run(command, args).pipe(
    Effect.flatMap((out) =>
      out.code === 0
        ? Effect.succeed(out.stdout)
        : Effect.fail(new Error(`${command} ${args.join(" ")} exited ${out.code}:\n${out.stderr}`))
    )
  )

/**
 * Compiles `protoFile` with protoc's Python generator into a temporary directory that lives as
 * long as the caller's scope; returns that directory (holding `<name>_pb2.py`).
 */
export const compilePythonProto = (protoFile: string) =>
  Effect.gen(function*() {
    const out = yield* Effect.acquireRelease(
      Effect.promise(() => mkdtemp(join(tmpdir(), "pb2-"))),
      (dir) => Effect.promise(() => rm(dir, { recursive: true, force: true }))
    )
    yield* runOk("protoc", [`-I${dirname(protoFile)}`, `--python_out=${out}`, protoFile])
    return out
  })

/** A child process spoken to line by line: `line()` is its next stdout line, `send` writes one. */
export const interactive = (command: string, args: ReadonlyArray<string>) =>
  Effect.acquireRelease(
    Effect.sync(() => {
      const child = spawn(command, args, { stdio: ["pipe", "pipe", "pipe"] })
      const lines: Array<string> = []
      const waiting: Array<(line: string) => void> = []
      let stderr = ""
      child.stderr.on("data", (chunk: Buffer) => (stderr += chunk.toString()))
      createInterface({ input: child.stdout }).on("line", (l) => {
        const waiter = waiting.shift()
        if (waiter) waiter(l)
        else lines.push(l)
      })
      const line = Effect.callback<string, Error>((resume) => {
        const ready = lines.shift()
        if (ready !== undefined) return resume(Effect.succeed(ready))
        waiting.push((l) => resume(Effect.succeed(l)))
        child.once("exit", (code) => resume(Effect.fail(new Error(`${command} exited ${code}: ${stderr}`))))
      })
      return { child, line, send: (text: string) => Effect.sync(() => void child.stdin.write(`${text}\n`)) }
    }),
    ({ child }) => Effect.sync(() => child.kill("SIGKILL"))
  )
