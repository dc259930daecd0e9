/**
 * The messages a stream has written that its client cannot yet be shown to have read, in write
 * order. Message m is shown read once the writes completed past it exceed what the client can hold
 * unread (readAhead.ts): the client must have returned that window, which its library does only
 * for bytes its application took. Pure bookkeeping; streaming.ts acks what `takeRead` hands back.
 */
export interface UnreadLedger<T> {
  /** Records an item of `bytes` as written (in write order); its write has not completed yet. */
  readonly written: (item: T, bytes: number) => void
  /**
   * A write of `items` items (default 1) and `bytes` completed; writes complete in the order they
   * were made (HTTP/2 stream, Node).
   */
  readonly completed: (bytes: number, items?: number) => void
  /**
   * Removes and returns, oldest first, the items followed by more than `readAheadBytes` of
   * completed writes: the ones the client has read.
   */
  readonly takeRead: (readAheadBytes: number) => ReadonlyArray<T>
  /** Removes and returns every item, oldest first (a quiet stream's last ones, see streaming.ts). */
  readonly takeAll: () => ReadonlyArray<T>
  /** Items written and not taken. */
  readonly size: () => number
  /** Their bytes. */
  readonly bytes: () => number
  /** Items written whose write has not completed yet. */
  readonly pendingWrites: () => number
}

export const makeUnreadLedger = <T>(): UnreadLedger<T> => {
  // A queue with a moving head: items[head..] are the unread ones; compacted now and then.
  let items: Array<{ readonly item: T; readonly end: number; readonly bytes: number }> = []
  let head = 0
  let issuedBytes = 0
  let completedBytes = 0
  let unreadBytes = 0
  let pending = 0
  const take = (until: (end: number) => boolean): ReadonlyArray<T> => {
    const taken: Array<T> = []
    while (head < items.length && until(items[head]!.end)) {
      const entry = items[head++]!
      unreadBytes -= entry.bytes
      taken.push(entry.item)
    }
    if (head > 1024 && head * 2 > items.length) {
      items = items.slice(head)
      head = 0
    }
    return taken
  }
  return {
    written: (item, bytes) => {
      issuedBytes += bytes
      unreadBytes += bytes
      pending++
      items.push({ item, end: issuedBytes, bytes })
    },
    completed: (bytes, items = 1) => {
      completedBytes += bytes
      pending -= items
    },
    takeRead: (readAheadBytes) => take((end) => completedBytes - end > readAheadBytes),
    takeAll: () => take(() => true),
    size: () => items.length - head,
    bytes: () => unreadBytes,
    pendingWrites: () => pending
  }
}
