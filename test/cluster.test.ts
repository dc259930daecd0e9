/**
 * Smoke test of the local 3-node cluster (scripts/cluster.sh, test/support/cluster.ts): each node
 * takes an AMQP login on its own port, all three are one cluster, and a quorum queue declared on
 * mpc1 is seen from mpc3. The cluster is left running for the next file; CI stops it at the end.
 */
import { assert, beforeAll, describe, it } from "@effect/vitest"
import * as amqp from "amqplib"
import { Effect } from "effect"
import { randomBytes } from "node:crypto"
import { clusterName, clusterNodes, ensureCluster, nodeAmqpUrl, rabbitmqctl } from "./support/cluster.js"

const promise = <A>(operation: string, f: () => Promise<A>) =>
  Effect.tryPromise({ try: f, catch: (cause) => new Error(`${operation}: ${String(cause)}`) })

const connect = (n: number) =>
  Effect.acquireRelease(
    promise(`connect to ${nodeAmqpUrl(n)}`, () => amqp.connect(nodeAmqpUrl(n))),
    (c) => Effect.promise(() => c.close().catch(() => undefined))
  ).pipe(Effect.tap((c) => Effect.sync(() => c.on("error", () => undefined))))

const channelOf = (connection: amqp.ChannelModel) =>
  promise("channel", () => connection.createChannel()).pipe(
    Effect.tap((ch) => Effect.sync(() => ch.on("error", () => undefined)))
  )

/** Whether `queue` exists, by a passive declare on a throwaway channel (a 404 closes the channel). */
const queueExists = (connection: amqp.ChannelModel, queue: string) =>
  Effect.promise(async () => {
    const probe = await connection.createChannel()
    probe.on("error", () => undefined)
    try {
      await probe.checkQueue(queue)
      await probe.close().catch(() => undefined)
      return true
    } catch {
      return false
    }
  })

describe("local RabbitMQ cluster", () => {
  // A cold start (or the rebuild of a cluster a previous run left incomplete) takes ~15 s on two
  // cores; allow for a loaded CI machine.
  beforeAll(() => Effect.runPromise(ensureCluster), 300_000)

  it.live("three nodes, one cluster: a quorum queue declared on mpc1 is visible from mpc3", () =>
    Effect.gen(function*() {
      const c1 = yield* connect(1)
      const c2 = yield* connect(2)
      const c3 = yield* connect(3)
      // Three logins, all to nodes of this cluster (not to the machine's own broker).
      for (const c of [c1, c2, c3]) assert.strictEqual(c.connection.serverProperties["cluster_name"], clusterName)

      const queue = `cluster.smoke.${randomBytes(4).toString("hex")}`
      const ch1 = yield* channelOf(c1)
      yield* Effect.acquireRelease(
        promise(`declare ${queue}`, () =>
          ch1.assertQueue(queue, { durable: true, arguments: { "x-queue-type": "quorum" } })),
        // Deleted again whatever happens below.
        () => Effect.promise(() => ch1.deleteQueue(queue).catch(() => undefined))
      )

      const ch3 = yield* channelOf(c3)
      const seen = yield* promise(`check ${queue} on mpc3`, () => ch3.checkQueue(queue))
      assert.strictEqual(seen.queue, queue)
      assert.strictEqual(seen.messageCount, 0)

      // A quorum queue, with a member on every node.
      const listed = yield* rabbitmqctl(3, "-q", "list_queues", "name", "type", "members", "--formatter", "json")
      const row = (JSON.parse(listed) as ReadonlyArray<{ name: string; type: string; members: ReadonlyArray<string> }>)
        .find((q) => q.name === queue)
      assert.strictEqual(row?.type, "quorum")
      assert.deepStrictEqual([...(row?.members ?? [])].sort(), clusterNodes.map((node) => node.name))

      yield* promise(`delete ${queue}`, () => ch1.deleteQueue(queue))
      assert.isFalse(yield* queueExists(c2, queue), "deleted on mpc1, gone from mpc2")
    }))
})
