/**
 * Exponential backoff with full jitter (pure: no timers, no I/O).
 *
 * The n-th delay (n = 0, 1, …) is drawn uniformly from [minMs, cap_n] where
 * cap_n = min(maxMs, minMs · factor^n): "full jitter" (AWS architecture blog,
 * "Exponential Backoff And Jitter") spreads a fleet of gateways that lost the
 * same cloud at the same moment, and the floor at minMs avoids hot retry loops.
 *
 * A server's `Retry-After` (delta-seconds or an HTTP-date, RFC 9110 §10.2.3)
 * is honoured: the delay is never shorter than what the server asked for
 * (bounded by maxRetryAfterMs so a hostile or broken server cannot park us for
 * days). reset() after a success starts over at minMs.
 */

export interface BackoffOptions {
  minMs: number;
  maxMs: number;
  /** Growth per attempt (default 2). */
  factor?: number;
  /** Longest Retry-After honoured (default 1 hour). */
  maxRetryAfterMs?: number;
  /** Uniform random in [0, 1); injectable for tests. */
  random?: () => number;
}

export class Backoff {
  private n = 0;
  private readonly minMs: number;
  private readonly maxMs: number;
  private readonly factor: number;
  private readonly maxRetryAfterMs: number;
  private readonly random: () => number;

  constructor(opts: BackoffOptions) {
    if (!(opts.minMs >= 0) || !(opts.maxMs >= 0)) throw new RangeError('backoff: minMs and maxMs must be >= 0');
    this.minMs = opts.minMs;
    this.maxMs = Math.max(opts.minMs, opts.maxMs);
    this.factor = opts.factor ?? 2;
    if (!(this.factor >= 1)) throw new RangeError('backoff: factor must be >= 1');
    this.maxRetryAfterMs = opts.maxRetryAfterMs ?? 3600_000;
    this.random = opts.random ?? Math.random;
  }

  /** Attempts made since the last reset. */
  get attempts(): number {
    return this.n;
  }

  /** Upper bound of the next delay (before Retry-After). */
  cap(): number {
    // factor^n overflows to Infinity for large n; min() keeps it at maxMs
    return Math.min(this.maxMs, this.minMs * Math.pow(this.factor, this.n));
  }

  /**
   * The delay before the next attempt, in ms; counts the attempt.
   * retryAfterMs: what the server asked for (from parseRetryAfter), if anything.
   */
  next(retryAfterMs?: number): number {
    const cap = this.cap();
    let r = this.random();
    if (!(r >= 0) || r >= 1) r = 0;
    let delay = Math.round(this.minMs + r * (cap - this.minMs));
    if (retryAfterMs !== undefined && Number.isFinite(retryAfterMs) && retryAfterMs > 0) {
      delay = Math.max(delay, Math.min(Math.ceil(retryAfterMs), this.maxRetryAfterMs));
    }
    if (this.n < 1000) this.n++;
    return delay;
  }

  reset(): void {
    this.n = 0;
  }
}

/**
 * Parse a Retry-After header value into milliseconds from `now`.
 * Accepts delta-seconds ("120") and an HTTP-date ("Wed, 21 Oct 2015 07:28:00 GMT").
 * Returns undefined for a missing or malformed value; 0 for a date in the past.
 */
export function parseRetryAfter(value: string | readonly string[] | number | undefined | null, now: number = Date.now()): number | undefined {
  if (value === undefined || value === null) return undefined;
  if (typeof value === 'number') return Number.isFinite(value) && value >= 0 ? Math.round(value * 1000) : undefined;
  const v = (typeof value === 'string' ? value : value[0] ?? '').trim();
  if (v === '') return undefined;
  if (/^\d+$/.test(v)) {
    const s = Number(v);
    return Number.isSafeInteger(s) ? s * 1000 : undefined;
  }
  // HTTP-date: IMF-fixdate (and the obsolete forms Date.parse understands); must name a weekday or month to avoid
  // accepting arbitrary numbers like "1.5" or "-3" as dates
  if (!/[A-Za-z]{3}/.test(v)) return undefined;
  const t = Date.parse(v);
  if (Number.isNaN(t)) return undefined;
  return Math.max(0, t - now);
}
