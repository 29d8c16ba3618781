/**
 * Refusals of unauthenticated clients (failed TLS handshakes, refused MQTT
 * credentials, HTTP requests with bad tokens) under a flood:
 *
 *  - RefusalLog: the log stays readable and cheap. In each interval the first
 *    few refusals are logged in full (a misconfigured device is diagnosed from
 *    its own line); every further one is only counted, and when the interval
 *    ends ONE summary line says how many were not logged, by code and by the
 *    busiest sources. A flood therefore costs at most detailLines + 1 lines per
 *    interval, whatever its rate. Nothing runs while nothing is refused.
 *  - SourceBudget: a token bucket per source address, charged by refusals
 *    only (a source whose clients authenticate is never limited). A source that
 *    has spent its burst is turned away before any expensive work (TLS
 *    handshake, signature check) until the bucket refills at its rate; once
 *    limited, its attempts pay when admitted, so those in flight count too.
 *
 * Both are bounded in memory whatever the number of sources (see the limits
 * below) and take their configuration through getters, so a reload applies.
 */
import type { Logger } from './logger.js';

/** Length of a summary interval: long enough that a flood is a handful of lines a minute, short enough to follow an attack live. */
export const REFUSAL_LOG_INTERVAL_MS = 10_000;
/** Refusals per interval logged in full before the rest is only counted (a device retrying with a wrong token fills a few, not pages). */
export const REFUSAL_DETAIL_LINES = 20;
/** Distinct sources counted per interval; beyond it they share one "other" entry (a spoofed-address flood cannot grow the map). */
export const REFUSAL_MAX_SOURCES = 1000;
/** Busiest sources named in a summary line. */
export const REFUSAL_TOP_SOURCES = 5;
/**
 * Sources tracked by a SourceBudget. An entry is ~100 bytes, so ≤ 1 MB. When full, the
 * entry used least recently goes; a flood from more addresses than this resets the budget of
 * the oldest — spread that wide, it needs a firewall in front, not a per-address budget.
 */
export const BUDGET_MAX_SOURCES = 10_000;

export interface RefusalLogOptions {
  log: Logger;
  /** Message of a refusal logged in full, e.g. 'MQTT connection refused'. */
  msg: string;
  /** What is refused, plural, for the summary line: 'MQTT connections', 'HTTP requests'. */
  what: string;
  intervalMs?: number;
  detailLines?: number;
  /** Injectable timers (tests). */
  setTimer?: (fn: () => void, ms: number) => { unref?: () => unknown };
  clearTimer?: (t: unknown) => void;
}

export class RefusalLog {
  private readonly intervalMs: number;
  private readonly detailLines: number;
  private timer: { unref?: () => unknown } | undefined;
  private logged = 0;
  private suppressed = 0;
  private byCode = new Map<string, number>();
  private bySource = new Map<string, number>();
  /** Refusals seen in total (status, metrics). */
  total = 0;

  constructor(private readonly o: RefusalLogOptions) {
    this.intervalMs = o.intervalMs ?? REFUSAL_LOG_INTERVAL_MS;
    this.detailLines = o.detailLines ?? REFUSAL_DETAIL_LINES;
  }

  /** One refusal: logged in full while the interval's detail lines last, else counted for the summary. */
  refused(code: string, source: string, fields: Record<string, unknown> = {}): void {
    this.total++;
    this.arm();
    if (this.logged < this.detailLines) {
      this.logged++;
      this.o.log.warn({ code, ...fields }, this.o.msg);
      return;
    }
    this.tally(code, source);
  }

  /**
   * A refusal that is only counted, never logged in full here (e.g. a failed TLS handshake:
   * per attempt it is a debug line, as port scanners make them all day); it appears in the
   * interval's summary line.
   */
  count(code: string, source: string): void {
    this.total++;
    this.arm();
    this.tally(code, source);
  }

  private arm(): void {
    if (this.timer) return;
    const set = this.o.setTimer ?? setTimeout;
    this.timer = set(() => this.flush(), this.intervalMs);
    this.timer.unref?.();
  }

  private tally(code: string, source: string): void {
    this.suppressed++;
    this.byCode.set(code, (this.byCode.get(code) ?? 0) + 1);
    const key = this.bySource.has(source) || this.bySource.size < REFUSAL_MAX_SOURCES ? source : 'other';
    this.bySource.set(key, (this.bySource.get(key) ?? 0) + 1);
  }

  /** End of an interval: the summary line (when something was not logged), then quiet until the next refusal. */
  flush(): void {
    if (this.timer) (this.o.clearTimer ?? clearTimeout)(this.timer as ReturnType<typeof setTimeout>);
    this.timer = undefined;
    if (this.suppressed > 0) {
      const top = [...this.bySource.entries()]
        .sort((a, b) => b[1] - a[1])
        .slice(0, REFUSAL_TOP_SOURCES)
        .map(([source, count]) => ({ source, count }));
      const s = Math.round(this.intervalMs / 1000);
      this.o.log.warn(
        { code: 'ECONN_RATE_LIMITED', not_logged: this.suppressed, codes: Object.fromEntries(this.byCode), top_sources: top, sources: this.bySource.size, interval_s: s },
        `${this.suppressed} more ${this.o.what} refused in the last ${s} s (not logged one by one)`,
      );
    }
    this.logged = 0;
    this.suppressed = 0;
    this.byCode = new Map();
    this.bySource = new Map();
  }

  /** Write what is pending and stop the timer (shutdown). */
  close(): void {
    this.flush();
  }
}

export interface BudgetLimits {
  /** Refusals a source may cause per second on average; 0 = no limit. */
  perS: number;
  /** Refusals a source may cause in a burst before it is turned away. */
  burst: number;
}

/**
 * A token bucket per source address, charged by refusals. A source that was never refused
 * has no bucket and is never limited or charged (valid devices behind one address are not
 * slowed down by their own number). Once a source has a bucket, each attempt it makes takes a
 * token when it is ADMITTED (before the handshake), and gets it back if it authenticates: so
 * attempts in flight count too, and a flood with many connections at once gets no more
 * through than the configured rate.
 */
export class SourceBudget {
  private readonly buckets = new Map<string, { tokens: number; at: number; pending: number }>();
  /** Attempts turned away because their source had no budget left. */
  turnedAway = 0;

  constructor(
    private readonly limits: () => BudgetLimits,
    private readonly now: () => number = Date.now,
    private readonly maxSources = BUDGET_MAX_SOURCES,
  ) {}

  private refill(source: string): { tokens: number; at: number; pending: number } | undefined {
    const b = this.buckets.get(source);
    if (!b) return undefined;
    const { perS, burst } = this.limits();
    const t = this.now();
    b.tokens = Math.min(burst, b.tokens + ((t - b.at) * perS) / 1000);
    b.at = t;
    if (b.tokens >= burst && b.pending === 0) {
      this.buckets.delete(source); // full again and nothing in flight: as good as never seen
      return undefined;
    }
    return b;
  }

  /** Most recently used last: eviction takes the least recently used. */
  private touch(source: string, b: { tokens: number; at: number; pending: number }): void {
    this.buckets.delete(source);
    this.buckets.set(source, b);
  }

  /**
   * A new attempt (connection) of this source: false while it has spent its budget (counted as
   * turned away); a source with a bucket pays one token now, given back by succeeded().
   */
  admit(source: string): boolean {
    if (this.limits().perS <= 0) return true;
    const b = this.refill(source);
    if (!b) return true;
    if (b.tokens < 1) {
      this.turnedAway++;
      return false;
    }
    b.tokens -= 1;
    b.pending++;
    this.touch(source, b);
    return true;
  }

  /**
   * admit() for an attempt that may wait (the broker's handshake queue): 'wait' while the source
   * is short of budget only because attempts of its own are still in flight (each gives its token
   * back if it authenticates), so valid devices behind one address wait for their neighbours'
   * outcome instead of being turned away; 'refuse' once its budget is spent by refusals.
   */
  tryAdmit(source: string): 'admit' | 'wait' | 'refuse' {
    if (this.limits().perS <= 0) return 'admit';
    const b = this.refill(source);
    if (!b) return 'admit';
    if (b.tokens < 1) {
      if (b.pending > 0) return 'wait';
      this.turnedAway++;
      return 'refuse';
    }
    b.tokens -= 1;
    b.pending++;
    this.touch(source, b);
    return 'admit';
  }

  /**
   * At accept, before an attempt waits for its turn (tryAdmit() decides when it comes): true
   * (counted as turned away) when the source spent its budget on refusals and has no attempt in
   * flight that could give a token back.
   */
  turnAway(source: string): boolean {
    if (this.limits().perS <= 0) return false;
    const b = this.refill(source);
    if (b === undefined || b.tokens >= 1 || b.pending > 0) return false;
    this.turnedAway++;
    return true;
  }

  /** Has this source spent its budget (no counting, nothing taken)? */
  spent(source: string): boolean {
    if (this.limits().perS <= 0) return false;
    const b = this.refill(source);
    return b !== undefined && b.tokens < 1;
  }

  /** An attempt of this source was refused: one token, unless its admission already paid it. */
  refused(source: string): void {
    const { perS, burst } = this.limits();
    if (perS <= 0) return;
    const b = this.refill(source);
    if (b) {
      if (b.pending > 0) b.pending--;
      else b.tokens = Math.max(0, b.tokens - 1);
      this.touch(source, b);
      return;
    }
    if (this.buckets.size >= this.maxSources) this.buckets.delete(this.buckets.keys().next().value!);
    this.buckets.set(source, { tokens: burst - 1, at: this.now(), pending: 0 });
  }

  /** An admitted attempt of this source authenticated: the token its admission took is given back. */
  succeeded(source: string): void {
    const b = this.buckets.get(source);
    if (!b || b.pending === 0) return;
    b.pending--;
    b.tokens = Math.min(this.limits().burst, b.tokens + 1);
  }

  /** The limits in force (they follow a reload). */
  limitsNow(): BudgetLimits {
    return this.limits();
  }

  /** Sources currently short of budget or recovering (status). */
  get tracked(): number {
    return this.buckets.size;
  }
}

/** The address part of "ADDRESS:PORT" (IPv6 addresses keep their colons). */
export function sourceOf(remote: string | undefined): string {
  if (!remote) return 'unknown';
  const i = remote.lastIndexOf(':');
  return i > 0 ? remote.slice(0, i) : remote;
}
