/**
 * The global budget of bytes of large publishes held in memory at once (broker.limits.
 * large_inflight_budget_bytes), shared by every connection of one broker.
 *
 * aedes (mqtt-packet) assembles a whole PUBLISH in memory before the broker sees it, and the
 * payload stays referenced until its journal append settles. Ten devices sending 16 MiB frames at
 * once would therefore hold 160 MiB. The conformance guard asks this budget for the packet's
 * remaining length as soon as the PUBLISH header announces it, before any of its body is read:
 *
 *  - granted: the body streams to aedes; the bytes are given back once aedes is done with the
 *    publish (after its PUBACK and delivery; a refusal or a QoS 2 publish: when answered) or its
 *    connection ends first (broker/hooks.ts);
 *  - not granted: the guard pauses that socket (TCP back-pressure to the device) and the packet
 *    waits in FIFO order; it never fails for lack of room. Small publishes never ask, so other
 *    devices keep flowing.
 *
 * Grant rule: a request fits when the bytes in flight plus its own (plus the reserve for transient
 * memory, below) stay within the limit, or when nothing is in flight at all (one publish larger than the whole budget still passes, alone). The
 * queue is strict FIFO so a large request is not starved by a stream of smaller ones.
 */

export interface BudgetTicket {
  readonly bytes: number;
  /** true once the bytes are counted as in flight */
  readonly granted: boolean;
  /** Give the bytes back (granted) or leave the queue (waiting). Idempotent. */
  release(): void;
}

interface Entry extends BudgetTicket {
  granted: boolean;
  done: boolean;
  onGrant: (() => void) | undefined;
}

export class InflightBudget {
  private inFlight = 0;
  private grantedCount = 0;
  /** waiting requests in arrival order; bounded by the connections (one waiting packet each) */
  private readonly queue: Entry[] = [];
  private waits = 0;

  /** a collection is scheduled before the next grant */
  private reclaiming = false;

  /**
   * `reclaim` (optional): called before bytes given back are granted to a waiting request. A large
   * publish's buffer is still referenced while aedes finishes the publish, and once dead it is old
   * (it outlived the young-generation collections of its gathering), so V8 would free it only at
   * its next full collection: the next publish's buffer was allocated next to it, and four 16 MiB
   * publishes under a 64 MiB budget peaked 70+ MiB over the daemon's RSS before them. With
   * `reclaim`, a waiter is granted on the turn after the release (aedes is done with the packet by
   * then), after `reclaim` ran (the broker passes core/reclaim.ts collectNow: one full collection,
   * only when someone waits for the budget, the path where memory is what they wait for).
   */
  constructor(
    private limit: number,
    private readonly reclaim?: () => void,
    /**
     * Bytes of the limit kept for what gathering costs besides the publishes' own buffers: the
     * decrypted chunks copied into them and not yet collected (core/reclaim.ts RECLAIM_EVERY_BYTES,
     * across all connections). Without it, four 16 MiB publishes under a 64 MiB budget peaked up to
     * 7 MiB over the budget; with it the fourth waits for the first (measured: bench/run.mjs).
     */
    private readonly reserve = 0,
  ) {}

  /** A new limit (reload) applies to the next grants. */
  setLimit(limit: number): void {
    this.limit = limit;
    this.pump();
  }

  /**
   * Ask for `bytes`. The ticket is granted at once when it fits and nobody is waiting; otherwise
   * `onGrant` is called later (from a microtask, never inside the caller's stack) once it is.
   */
  acquire(bytes: number, onGrant: () => void): BudgetTicket {
    const e: Entry = {
      bytes,
      granted: false,
      done: false,
      onGrant,
      release: () => this.release(e),
    };
    if (this.queue.length === 0 && this.fits(bytes)) this.grant(e);
    else {
      this.waits++;
      this.queue.push(e);
    }
    return e;
  }

  status(): { limit_bytes: number; in_flight_bytes: number; in_flight: number; waiting: number; waits_total: number } {
    return { limit_bytes: this.limit, in_flight_bytes: this.inFlight, in_flight: this.grantedCount, waiting: this.queue.length, waits_total: this.waits };
  }

  private fits(bytes: number): boolean {
    return this.grantedCount === 0 || this.inFlight + bytes + this.reserve <= this.limit;
  }

  private grant(e: Entry): void {
    e.granted = true;
    this.inFlight += e.bytes;
    this.grantedCount++;
  }

  private release(e: Entry): void {
    if (e.done) return;
    e.done = true;
    e.onGrant = undefined;
    if (e.granted) {
      this.inFlight -= e.bytes;
      this.grantedCount--;
      this.afterRelease();
    } else {
      const i = this.queue.indexOf(e);
      if (i >= 0) this.queue.splice(i, 1);
      if (i === 0) this.pump();
    }
  }

  private afterRelease(): void {
    const reclaim = this.reclaim;
    if (!reclaim || this.queue.length === 0) return this.pump();
    if (this.reclaiming) return;
    this.reclaiming = true;
    setImmediate(() => {
      this.reclaiming = false;
      if (this.queue.length === 0) return;
      reclaim();
      this.pump();
    });
  }

  private pump(): void {
    while (this.queue.length > 0 && this.fits(this.queue[0]!.bytes)) {
      const e = this.queue.shift()!;
      this.grant(e);
      const cb = e.onGrant;
      e.onGrant = undefined;
      // never re-enter the releasing connection's code path (a release happens inside aedes callbacks)
      if (cb) queueMicrotask(cb);
    }
  }
}
