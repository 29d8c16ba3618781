/** Foundation commands: start, check-config, init, status, reload. */
import { loadConfig } from '../../core/config/load.js';
import { createLogger } from '../../core/logger.js';
import { explain, exitCodeFor } from '../explain.js';
import { EXIT } from '../../core/errors.js';
import { CONFIG_OPTION, adminCall, configPathOf, type Command } from './types.js';

export const baseCommands: Command[] = [
  {
    path: ['start'],
    summary: 'run the daemon (foreground; systemd runs this)',
    usage: 'connector start [-c FILE]\n\nRuns init first (creates missing keys and certificates), then serves until SIGTERM/SIGINT.\nSIGHUP reloads the configuration.',
    options: CONFIG_OPTION,
    run: async ({ values }) => {
      // the daemon's modules (every component) load only for the commands that need them: CLI calls stay fast
      const { runDaemon } = await import('../main.js');
      return runDaemon(configPathOf(values));
    },
  },
  {
    path: ['check-config'],
    summary: 'validate the configuration and print ok or every error',
    usage: 'connector check-config [-c FILE]\n\nPrints "ok" and exits 0, or prints every problem as FILE:LINE:COL key.path: message and exits 78.\nWarnings (valid settings worth a look, e.g. the metrics listener off loopback) go to stderr and do not change the exit code.',
    options: CONFIG_OPTION,
    run: async ({ values }) => {
      let warnings: string[];
      try {
        ({ warnings } = loadConfig(configPathOf(values)));
      } catch (err) {
        explain(err);
        return exitCodeFor(err);
      }
      for (const w of warnings) process.stderr.write(`warning: ${w}\n`);
      process.stdout.write('ok\n');
      return EXIT.OK;
    },
  },
  {
    path: ['init'],
    summary: 'create the state directory (0700), keys and certificates; never overwrites',
    usage: 'connector init [-c FILE]\n\nIdempotent: prints what it created, or that everything already existed.',
    options: CONFIG_OPTION,
    run: async ({ values }) => {
      try {
        const { config } = loadConfig(configPathOf(values), { checkSecrets: false });
        const [{ runInit }, { initSteps }] = await Promise.all([import('../init.js'), import('../app.js')]);
        const created = await runInit(config, createLogger({ level: 'warn' }), initSteps());
        if (created.length === 0) process.stdout.write(`nothing to do: ${config.daemon.state_dir} is initialised\n`);
        for (const f of created) process.stdout.write(`created ${f}\n`);
        return EXIT.OK;
      } catch (err) {
        explain(err);
        return exitCodeFor(err);
      }
    },
  },
  {
    path: ['reload'],
    summary: 'ask the running daemon to reload its configuration (like SIGHUP)',
    usage: 'connector reload [-c FILE]',
    options: CONFIG_OPTION,
    run: async ({ values }) => {
      await adminCall(values, 'reload');
      process.stdout.write('reloaded (see the daemon log for what changed)\n');
      return EXIT.OK;
    },
  },
];
