/**
 * The daemon with fault-injection hooks, for the child-process tests only
 * (test/daemon/main.test.ts, test/daemon/notify.test.ts through
 * spawnDaemon({ hooks })). It runs the built product (dist/daemon/main.js) the
 * way `connector start -c FILE` does and adds components through the daemon's
 * seam (runDaemon(file, { extraComponents })); nothing of this ships in dist/.
 *
 *   node test/helpers/daemon-hooks.mjs CONFIG_FILE [--hang-close] [--record-syncs DIR [--sync-latency-ms N]]
 *
 * Admin methods it adds:
 *   test.block_loop  {ms}                         block the event loop synchronously for ms
 *   test.starve_loop {block_ms, every_ms, for_ms} keep blocking it for block_ms every every_ms
 *                                                 during for_ms (a loop that turns, but badly)
 *   test.crash                                    throw an uncaught exception on the next tick (→ exit 70)
 *   test.gc                                       a full garbage collection, then process.memoryUsage()
 *                                                 (what is retained, not what the heap has not collected yet)
 * The loop faults are bracketed with STATUS= markers on the notify socket, so a
 * test can tell which datagrams were sent while the loop was unhealthy.
 * --hang-close adds a component whose close() never finishes (→ forced shutdown).
 * --record-syncs DIR records every successful fsync in DIR (test/helpers/sync-recorder.mjs),
 * so that a test can cut the power after a SIGKILL (test/helpers/power-cut.ts);
 * --sync-latency-ms N makes each asynchronous sync report success N ms late (a slow disk).
 */
import { runDaemon } from '../../dist/daemon/main.js';
import { ConnectorError } from '../../dist/core/errors.js';
import { performance } from 'node:perf_hooks';
import v8 from 'node:v8';
import vm from 'node:vm';
import { recordSyncs } from './sync-recorder.mjs';

const [configFile, ...flags] = process.argv.slice(2);
if (!configFile) {
  process.stderr.write('usage: node test/helpers/daemon-hooks.mjs CONFIG_FILE [--hang-close] [--record-syncs DIR [--sync-latency-ms N]]\n');
  process.exit(64);
}
const hangClose = flags.includes('--hang-close');
const syncsAt = flags.indexOf('--record-syncs');
if (syncsAt >= 0) {
  if (!flags[syncsAt + 1]) {
    process.stderr.write('--record-syncs needs a directory\n');
    process.exit(64);
  }
  const latAt = flags.indexOf('--sync-latency-ms');
  await recordSyncs(flags[syncsAt + 1], latAt >= 0 ? Number(flags[latAt + 1]) || 0 : 0);
}

function busyWait(ms) {
  const end = performance.now() + ms;
  while (performance.now() < end) {
    // deliberately blocking
  }
}

function num(params, key, max) {
  const v = params[key];
  if (typeof v !== 'number' || !Number.isFinite(v) || v < 0 || v > max) {
    throw new ConnectorError('ECONN_BAD_REQUEST', `${key} must be a number of milliseconds between 0 and ${max}`);
  }
  return v;
}

function testHooks({ admin, logger, notifier }) {
  const log = logger.child({ component: 'testhooks' });
  log.warn('test entry point: test-only admin methods are enabled');
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
    await new Promise((resolve) => {
      const step = () => {
        busyWait(blockMs);
        if (performance.now() >= end) resolve();
        else setTimeout(step, everyMs);
      };
      step();
    });
    await notifier.status('test: event loop free');
    return { starved_ms: forMs };
  });
  admin.register('test.gc', () => {
    v8.setFlagsFromString('--expose-gc');
    const gc = vm.runInNewContext('gc');
    gc();
    return process.memoryUsage();
  });
  admin.register('test.crash', () => {
    setImmediate(() => {
      throw new Error('test hook: uncaught exception');
    });
    return { ok: true };
  });
  return [
    {
      name: 'test-hooks',
      start: async () => {},
      close: () => (hangClose ? new Promise(() => {}) : Promise.resolve()),
    },
  ];
}

const code = await runDaemon(configFile, { extraComponents: testHooks });
// as dist/daemon/cli.js does: exit once stdout is flushed
process.exitCode = code;
process.stdout.write('', () => process.exit(code));
