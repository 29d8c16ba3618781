/**
 * `connector start`: load and validate the config, init the state directory,
 * build and start every component, then serve until SIGTERM/SIGINT (graceful
 * close within daemon.shutdown_timeout_ms, a second signal forces). SIGHUP
 * reloads the configuration. Exit codes are listed in EXIT (core/errors.ts)
 * and in the README.
 */
import type { Config } from '../core/config/schema.js';
import { deepFreeze, valueAt, walkConfig } from '../core/config/walk.js';
import { loadConfig } from '../core/config/load.js';
import { createLogger, LogRing } from '../core/logger.js';
import { runInit } from './init.js';
import { buildDaemon, initSteps } from './app.js';
import { Lifecycle } from './lifecycle.js';
import { ConfigError, EXIT } from '../core/errors.js';
import type { AdminRegistry, Component } from '../core/component.js';
import type { Logger } from '../core/logger.js';
import { explain, exitCodeFor } from './explain.js';

import { SystemdNotifier } from './notify.js';
import { daemonStatus, statusLine, summarize, type DaemonStatus } from './status.js';
import { registerRotation } from './rotation.js';
import { DaemonMetrics } from './metrics.js';
import { StatusPage, statusPageHtml } from './status-page.js';
import { releaseOptimizingCompiler, releaseYoungGeneration } from './startup-heap.js';

/** Keys marked x-restart keep their running value on reload; returns the merged (frozen) config and what was kept. */
export function mergeRestartKeys(running: Config, next: Config): { merged: Config; needsRestart: string[] } {
  const needsRestart: string[] = [];
  const merged = structuredClone(next) as unknown as Record<string, unknown>;
  walkConfig(merged, ({ node, path: keys, dotted }, holder, key) => {
    if (!node['x-restart']) return;
    const a = valueAt(running, keys);
    if (JSON.stringify(a) === JSON.stringify(holder[key])) return;
    needsRestart.push(`${dotted} (${JSON.stringify(a)} → ${JSON.stringify(holder[key])})`);
    holder[key] = structuredClone(a);
  });
  return { merged: deepFreeze(merged) as unknown as Config, needsRestart };
}

/** What an extra component may use: the admin socket, the root logger, the systemd notifier. */
export interface DaemonSeamContext {
  admin: AdminRegistry;
  logger: Logger;
  /** Sends STATUS= (and the other notify messages) to $NOTIFY_SOCKET; a no-op without it. */
  notifier: Pick<SystemdNotifier, 'status'>;
}

/**
 * Ways to extend a daemon without changing it: `connector start` passes none.
 * The test suite's process entry point (test/helpers/daemon-hooks.mjs) adds
 * fault-injection components here, so that no test code ships in the product.
 */
export interface DaemonSeam {
  /** Components started after every built-in one (so closed before them), before the daemon-level metrics. */
  extraComponents?: (ctx: DaemonSeamContext) => Component[];
}

export async function runDaemon(configFile: string, seam: DaemonSeam = {}): Promise<number> {
  let config: Config;
  let warnings: string[];
  try {
    ({ config, warnings } = loadConfig(configFile));
  } catch (err) {
    explain(err);
    return exitCodeFor(err);
  }
  // the last warnings and errors, as written (redacted), for the status page
  const logRing = new LogRing(20);
  const logger = createLogger({ level: config.log.level, format: config.log.format, ring: logRing });
  const log = logger.child({ component: 'daemon' });
  for (const w of warnings) log.warn(`configuration: ${w}`);

  const fatal = (err: unknown, what: string): void => {
    log.fatal({ err }, `${what}; exiting so that systemd restarts the daemon`);
    explain(err);
    logger.flush();
    process.exitCode = EXIT.SOFTWARE;
    setImmediate(() => process.exit(EXIT.SOFTWARE));
  };
  process.on('uncaughtException', (err) => fatal(err, 'uncaught exception'));
  process.on('unhandledRejection', (err) => fatal(err, 'unhandled promise rejection'));

  try {
    await runInit(config, logger, initSteps());
  } catch (err) {
    log.error({ err }, 'initialisation failed');
    explain(err);
    return exitCodeFor(err);
  }

  const daemon = buildDaemon(config, configFile, logger);
  // systemd notify + watchdog (a no-op without $NOTIFY_SOCKET): READY after start, RELOADING around reload, STOPPING on shutdown
  const notifier: SystemdNotifier = new SystemdNotifier({ logger, statusText: (): string => statusLine(summarize(lifecycle.status(), Object.fromEntries(daemon.ctx.ports)), daemon.ctx.health.readiness().ready) });
  const extra = seam.extraComponents?.({ admin: daemon.ctx.admin, logger, notifier }) ?? [];
  const components = [...daemon.components, ...extra];
  // daemon-level metrics (daemon/metrics.ts) start last, after every component registered its own
  const daemonMetrics: DaemonMetrics = new DaemonMetrics({
    registry: daemon.ctx.metrics,
    componentStatus: (): Record<string, unknown> => lifecycle.status(),
    ready: () => daemon.ctx.health.readiness().ready,
    watchdog: () => (notifier.active ? notifier.watchdog() : undefined),
    devices: () => daemon.ctx.identity?.registry,
    journal: () => daemon.ctx.journal,
  });
  // the status page (GET / and /status.json on the metrics listener) samples counters, so it starts after them
  const statusPage: StatusPage = new StatusPage({ registry: daemon.ctx.metrics, status: (): DaemonStatus => statusOf(), logs: logRing });
  daemon.ctx.health.setStatusPage({ ...statusPageHtml(), json: () => statusPage.json() });
  const lifecycle = new Lifecycle([...components, daemonMetrics, statusPage], logger, config.daemon.shutdown_timeout_ms);
  const startedAt = Date.now();
  // the drain rate shown by `connector status` is the status page's (one sampler, one computation)
  const statusOf = () => daemonStatus(daemon.ctx, lifecycle, { startedAt, watchdog: notifier.active ? notifier.watchdog() : undefined, rates: () => statusPage.rates() });

  let stopping: Promise<number> | undefined;
  const stop = (signal: string): Promise<number> => {
    if (stopping) {
      log.warn({ signal }, 'second signal: forcing exit');
      logger.flush();
      process.exit(EXIT.FAILURE);
    }
    log.info({ signal }, 'shutting down');
    daemon.ctx.health.setReady(false);
    void notifier.stopping();
    stopping = lifecycle.close().finally(() => notifier.close()).then(
      () => {
        log.info('stopped');
        return EXIT.OK;
      },
      (err: unknown) => {
        log.error({ err }, 'shutdown was forced');
        return EXIT.FAILURE;
      },
    );
    return stopping;
  };

  let reloading = Promise.resolve();
  const reload = (): Promise<void> => {
    reloading = reloading.then(async () => {
      await notifier.reloading();
      try {
        await applyReload();
      } finally {
        await notifier.reloaded();
      }
    });
    return reloading;
  };
  const applyReload = async (): Promise<void> => {
    {
      let next: Config;
      try {
        next = loadConfig(configFile).config;
      } catch (err) {
        const problems = err instanceof ConfigError ? err.problems : [(err as Error).message];
        log.error({ problems }, 'reload refused: the new configuration is invalid; the running one keeps serving');
        return;
      }
      const { merged, needsRestart } = mergeRestartKeys(config, next);
      for (const k of needsRestart) log.warn({ key: k }, `changed key needs a restart and was not applied: ${k}`);
      if (merged.log.level !== config.log.level) {
        // said at the old level, so that it is seen even when the new level is quieter
        log[config.log.level === 'silent' ? 'info' : config.log.level]({ old_level: config.log.level, new_level: merged.log.level }, 'log level changed');
        logger.level = merged.log.level;
      }
      const changes = await lifecycle.reload(merged);
      config = merged;
      daemon.ctx.config = merged;
      log.info({ changes, needs_restart: needsRestart }, `configuration reloaded (${changes.length} change${changes.length === 1 ? '' : 's'} applied)`);
    }
  };
  daemon.ctx.admin.register('reload', async () => {
    await reload();
    return { ok: true };
  });
  daemon.ctx.admin.register('status', () => statusOf());
  // ca.rotate: new device CA, then every component reloads its TLS context with the running config
  if (daemon.ctx.identity) {
    registerRotation(daemon.ctx.admin, { pki: daemon.ctx.identity.pki, serverName: () => config.daemon.server_name, reloadTls: () => lifecycle.reload(config), logger });
  }

  const done = new Promise<number>((resolve) => {
    process.on('SIGTERM', () => void stop('SIGTERM').then(resolve));
    process.on('SIGINT', () => void stop('SIGINT').then(resolve));
  });
  process.on('SIGHUP', () => void reload());

  notifier.start();
  releaseOptimizingCompiler(); // modules and configuration are loaded: the components' work (journal replay) is optimized as before
  try {
    await lifecycle.start();
  } catch (err) {
    notifier.close();
    explain(err);
    logger.flush();
    return exitCodeFor(err);
  }
  daemon.ctx.health.setReady(true);
  releaseYoungGeneration(); // start-up is over: traffic grows the young generation as V8 would
  log.info({ ports: Object.fromEntries(daemon.ctx.ports), config: configFile, state_dir: config.daemon.state_dir }, 'ready');
  void notifier.ready();
  const code = await done;
  logger.flush();
  return code;
}
