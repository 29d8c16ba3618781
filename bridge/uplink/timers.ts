/**
 * Timers the uplink can trust: Node fires a setTimeout whose delay exceeds
 * 2^31−1 ms after 1 ms (with a TimeoutOverflowWarning), so a token living
 * longer than ~24.9 days would renew in a tight loop. Every delay goes through
 * clampDelay; a far deadline is reached by re-arming.
 */

/** The largest delay setTimeout honours (2^31 − 1 ms ≈ 24.86 days). */
export const MAX_TIMER_MS = 2 ** 31 - 1;

/** A delay setTimeout honours: 0 … MAX_TIMER_MS (NaN → 0). */
export function clampDelay(ms: number): number {
  if (!(ms > 0)) return 0;
  return Math.min(Math.ceil(ms), MAX_TIMER_MS);
}

/**
 * The shortest interval between two in-band token renewals for a token of this
 * lifetime: a quarter of it, within 1 s … 60 s. Whatever the clocks say (a
 * gateway clock ahead of the cloud's makes every token look expired), the
 * uplink never renews faster than this.
 */
export function minRenewalIntervalMs(lifetimeMs: number): number {
  return Math.min(60_000, Math.max(1000, Math.floor((lifetimeMs > 0 ? lifetimeMs : 0) / 4)));
}
