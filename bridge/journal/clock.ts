/**
 * The journal clock: what createdAt and TTL are measured in (issue 9 #5: TTL must not
 * follow wall-clock steps).
 *
 *   journalNow() = base + (monotonic() - monotonicAtStart)
 *   base         = max(wall clock at start, newest createdAt found on disk)
 *
 * Within a process it advances with the monotonic clock only, so an NTP step (forward or
 * back) neither expires nor rejuvenates anything. Across a restart it continues from the
 * wall clock, never going backwards past what was already written: downtime counts toward a
 * message's age as the wall clock measures it (a gateway that was off for 3 days holds
 * 3-day-old messages), and a wall clock that went back while the daemon was down counts as
 * no downtime. createdAt stays close to wall time so that ages shown to operators read naturally.
 */
export interface Clocks {
  /** Wall clock, ms since the epoch. */
  wall: () => number;
  /** Monotonic clock, ms (any origin). */
  monotonic: () => number;
}

export class JournalClock {
  private base: number;
  private mono0: number;
  constructor(private readonly clocks: Clocks) {
    this.base = clocks.wall();
    this.mono0 = clocks.monotonic();
  }
  /** Re-anchor at start, after replay found `newestCreatedAt` on disk. */
  anchor(newestCreatedAt: number): void {
    this.base = Math.max(this.clocks.wall(), newestCreatedAt);
    this.mono0 = this.clocks.monotonic();
  }
  now(): number {
    return this.base + (this.clocks.monotonic() - this.mono0);
  }
}
