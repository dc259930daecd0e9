/** The unread ledger's bookkeeping (pure logic, see src/unreadLedger.ts). */
import { assert, describe, it } from "@effect/vitest"
import { makeUnreadLedger } from "../src/unreadLedger.js"

describe("unread ledger", () => {
  it("a message is read once more than the read-ahead completed after it, in write order", () => {
    const ledger = makeUnreadLedger<string>()
    for (const id of ["a", "b", "c"]) ledger.written(id, 100)
    assert.strictEqual(ledger.pendingWrites(), 3)
    ledger.completed(100)
    ledger.completed(100)
    // 200 completed: "a" ends at 100, so 100 bytes past it; a read-ahead of 100 is not exceeded.
    assert.deepStrictEqual(ledger.takeRead(100), [])
    assert.deepStrictEqual(ledger.takeRead(99), ["a"])
    ledger.completed(100)
    assert.deepStrictEqual(ledger.takeRead(0), ["b"], "the last one has nothing written past it")
    assert.strictEqual(ledger.size(), 1)
    assert.strictEqual(ledger.bytes(), 100)
    assert.strictEqual(ledger.pendingWrites(), 0)
    assert.deepStrictEqual(ledger.takeAll(), ["c"])
    assert.strictEqual(ledger.size(), 0)
    assert.strictEqual(ledger.bytes(), 0)
  })

  it("stays in order across compactions of its storage", () => {
    const ledger = makeUnreadLedger<number>()
    const taken: Array<number> = []
    for (let i = 0; i < 5000; i++) {
      ledger.written(i, 10)
      ledger.completed(10)
      taken.push(...ledger.takeRead(50))
    }
    taken.push(...ledger.takeAll())
    assert.deepStrictEqual(taken, Array.from({ length: 5000 }, (_, i) => i))
  })
})
