/**
 * Start components in order, close them in reverse order, each bounded by the
 * remaining shutdown budget. If a start fails, what already started is closed
 * (reverse order) and the error is rethrown.
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

  /** Graceful, idempotent, bounded by shutdown_timeout_ms. Rejects with ECONN_SHUTDOWN_TIMEOUT when the budget runs out. */
  close(): Promise<void> {
    this.closing ??= this.closeAll();
    return this.closing;
  }

  private async closeAll(): Promise<void> {
    const deadline = Date.now() + this.shutdownTimeoutMs;
    let timedOut: string | undefined;
    for (const c of [...this.started].reverse()) {
      const left = deadline - Date.now();
      if (left <= 0) {
        timedOut ??= c.name;
        continue;
      }
      let timer: NodeJS.Timeout | undefined;
      const result = await Promise.race([
        c.close().then(
          () => 'ok' as const,
          (err: unknown) => {
            this.log.error({ err, component_name: c.name }, `component ${c.name} failed to close cleanly`);
            return 'error' as const;
          },
        ),
        new Promise<'timeout'>((r) => {
          timer = setTimeout(() => r('timeout'), left);
        }),
      ]);
      clearTimeout(timer);
      if (result === 'timeout') timedOut ??= c.name;
      else this.log.debug({ closed: c.name }, 'component closed');
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
