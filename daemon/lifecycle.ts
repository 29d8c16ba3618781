/**
 * Start components in order, close them in reverse order, each bounded by the
 * remaining shutdown budget; a component that overruns it is destroyed
 * (Component.destroy) and the next one is closed. If a start fails, what
 * already started is closed (reverse order) and the error is rethrown.
 * Total time is bounded by shutdown_timeout_ms + 2 × graceMs per component.
 */
import type { Logger } from '../core/logger.js';
import type { Component } from '../core/component.js';
import type { Config } from '../core/config/schema.js';
import { ConnectorError } from '../core/errors.js';

export class Lifecycle {
  private readonly started: Component[] = [];
  private closing: Promise<void> | undefined;
  private readonly log: Logger;

  constructor(
    private readonly components: readonly Component[],
    logger: Logger,
    private readonly shutdownTimeoutMs: number,
    /** Least time a component gets to close once the budget is spent, and to destroy. */
    private readonly graceMs = Math.min(1000, Math.max(50, Math.floor(shutdownTimeoutMs / 10))),
  ) {
    this.log = logger.child({ component: 'lifecycle' });
  }

  async start(): Promise<void> {
    for (const c of this.components) {
      if (this.closing) throw new ConnectorError('ECONN_CLOSED', 'shutdown requested during start');
      const t0 = Date.now();
      try {
        await c.start();
      } catch (err) {
        this.log.error({ err, failed: c.name }, `component ${c.name} failed to start; closing what started`);
        await this.close();
        throw err;
      }
      this.started.push(c);
      this.log.debug({ started: c.name, ms: Date.now() - t0 }, 'component started');
    }
  }

  /**
   * Graceful, idempotent, bounded. Components close in reverse start order,
   * each within what is left of shutdown_timeout_ms (at least `graceMs` once
   * the budget is spent, so that every component gets a chance). A component
   * whose close() overruns gets destroy(err) and the next one is closed.
   * Rejects with ECONN_SHUTDOWN_TIMEOUT naming the first component that overran.
   */
  close(): Promise<void> {
    this.closing ??= this.closeAll();
    return this.closing;
  }

  private async closeAll(): Promise<void> {
    const deadline = Date.now() + this.shutdownTimeoutMs;
    let timedOut: string | undefined;
    for (const c of [...this.started].reverse()) {
      const budget = Math.max(deadline - Date.now(), this.graceMs);
      const result = await within(
        c.close().then(
          () => 'ok' as const,
          (err: unknown) => {
            this.log.error({ err, component_name: c.name }, `component ${c.name} failed to close cleanly`);
            return 'error' as const;
          },
        ),
        budget,
      );
      if (result !== 'timeout') {
        this.log.debug({ closed: c.name }, 'component closed');
        continue;
      }
      timedOut ??= c.name;
      const err = new ConnectorError('ECONN_SHUTDOWN_TIMEOUT', `component ${c.name} did not close within ${budget} ms`);
      if (!c.destroy) {
        this.log.error({ component_name: c.name, budget_ms: budget }, `component ${c.name} did not close within ${budget} ms and cannot be destroyed; moving on`);
        continue;
      }
      this.log.error({ component_name: c.name, budget_ms: budget }, `component ${c.name} did not close within ${budget} ms; destroying it`);
      const destroyed = await within(
        Promise.resolve()
          .then(() => c.destroy!(err))
          .then(
            () => 'ok' as const,
            (e: unknown) => {
              this.log.error({ err: e, component_name: c.name }, `component ${c.name} failed to destroy`);
              return 'error' as const;
            },
          ),
        this.graceMs,
      );
      if (destroyed === 'timeout') this.log.error({ component_name: c.name }, `component ${c.name} did not finish destroy within ${this.graceMs} ms; moving on`);
    }
    this.started.length = 0;
    if (timedOut) {
      throw new ConnectorError('ECONN_SHUTDOWN_TIMEOUT', `shutdown did not finish within ${this.shutdownTimeoutMs} ms (stuck in ${timedOut})`);
    }
  }

  /** Hand a validated new config to every component that can reload; returns what changed. */
  async reload(next: Config): Promise<string[]> {
    const changes: string[] = [];
    for (const c of this.started) {
      if (!c.reload) continue;
      try {
        for (const line of await c.reload(next)) changes.push(`${c.name}: ${line}`);
      } catch (err) {
        this.log.error({ err, component_name: c.name }, `component ${c.name} could not apply the new configuration; it keeps the old one`);
      }
    }
    return changes;
  }

  status(): Record<string, unknown> {
    const out: Record<string, unknown> = {};
    for (const c of this.started) if (c.status) out[c.name] = c.status();
    return out;
  }
}

/** The promise's result, or 'timeout' after ms (the timer never outlives the race). */
async function within<T>(p: Promise<T>, ms: number): Promise<T | 'timeout'> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([p, new Promise<'timeout'>((r) => (timer = setTimeout(() => r('timeout'), ms)))]);
  } finally {
    clearTimeout(timer);
  }
}
