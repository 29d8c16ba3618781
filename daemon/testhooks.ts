/**
 * Test-only admin methods, registered ONLY when the daemon runs with
 * EDGE_CONNECTOR_TEST_HOOKS=1 in its environment (never set by the systemd unit or
 * the install script; documented in docs/operations.md). They let the test
 * suite reproduce faults a real process can't be asked for politely:
 *
 *   test.block_loop  {ms}                         block the event loop synchronously for ms
 *   test.starve_loop {block_ms, every_ms, for_ms} keep blocking it for block_ms every every_ms
 *                                                 during for_ms (a loop that turns, but badly)
 *
 * Both bracket the fault with STATUS= markers on the notify socket, so a test
 * can tell which datagrams were sent while the loop was unhealthy.
 */
import type { AdminServer } from './admin.js';
import type { Component } from '../core/component.js';
import type { Logger } from '../core/logger.js';
import type { SystemdNotifier } from './notify.js';
import { ConnectorError } from '../core/errors.js';

export function testHooksEnabled(env: NodeJS.ProcessEnv = process.env): boolean {
  return env.EDGE_CONNECTOR_TEST_HOOKS === '1';
}

function busyWait(ms: number): void {
  const end = performance.now() + ms;
  while (performance.now() < end) {
    // deliberately blocking
  }
}

function num(params: Record<string, unknown>, key: string, max: number): number {
  const v = params[key];
  if (typeof v !== 'number' || !Number.isFinite(v) || v < 0 || v > max) {
    throw new ConnectorError('ECONN_BAD_REQUEST', `${key} must be a number of milliseconds between 0 and ${max}`);
  }
  return v;
}

export function registerTestHooks(admin: AdminServer, logger: Logger, notifier: SystemdNotifier, env: NodeJS.ProcessEnv = process.env): boolean {
  if (!testHooksEnabled(env)) return false;
  const log = logger.child({ component: 'testhooks' });
  log.warn('EDGE_CONNECTOR_TEST_HOOKS=1: test-only admin methods are enabled (never use this in production)');

  admin.register('test.block_loop', async (params) => {
    const ms = num(params, 'ms', 60000);
    await notifier.status('test: event loop blocked');
    log.warn({ ms }, 'test hook: blocking the event loop');
    busyWait(ms);
    await notifier.status('test: event loop free');
    return { blocked_ms: ms };
  });

  admin.register('test.starve_loop', async (params) => {
    const blockMs = num(params, 'block_ms', 60000);
    const everyMs = num(params, 'every_ms', 60000);
    const forMs = num(params, 'for_ms', 600000);
    await notifier.status('test: event loop starved');
    log.warn({ block_ms: blockMs, every_ms: everyMs, for_ms: forMs }, 'test hook: starving the event loop');
    const end = performance.now() + forMs;
    await new Promise<void>((resolve) => {
      const step = (): void => {
        busyWait(blockMs);
        if (performance.now() >= end) resolve();
        else setTimeout(step, everyMs);
      };
      step();
    });
    await notifier.status('test: event loop free');
    return { starved_ms: forMs };
  });
  return true;
}

/**
 * Lifecycle faults for the process tests (same EDGE_CONNECTOR_TEST_HOOKS=1 guard):
 *   test.crash                     throw an uncaught exception on the next tick (→ exit 70)
 *   EDGE_CONNECTOR_TEST_HANG_CLOSE=1  a component whose close() never finishes (→ forced shutdown)
 * Returned as a component so the lifecycle closes it first.
 */
export function testHooksComponent(admin: AdminServer, env: NodeJS.ProcessEnv = process.env): Component {
  admin.register('test.crash', () => {
    setImmediate(() => {
      throw new Error('test hook: uncaught exception');
    });
    return { ok: true };
  });
  return {
    name: 'test-hooks',
    start: async () => {},
    close: () => (env.EDGE_CONNECTOR_TEST_HANG_CLOSE === '1' ? new Promise<void>(() => {}) : Promise.resolve()),
  };
}
