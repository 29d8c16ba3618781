/**
 * The `connector` command line. `connector help` lists the commands;
 * `connector COMMAND --help` shows one. Exit codes: see EXIT in core/errors.ts.
 * Loaded by cli.ts (the executable) once the young generation is held.
 */
import { parseArgs } from 'node:util';
import { readFileSync } from 'node:fs';
import { commands } from './commands/index.js';
import type { Command } from './commands/types.js';
import { ConnectorError, EXIT, errorCode } from '../core/errors.js';
import { explain, exitCodeFor } from './explain.js';

function version(): string {
  const pkg = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string };
  return pkg.version;
}

function helpText(): string {
  const width = Math.max(...commands.map((c) => c.path.join(' ').length));
  const lines = commands.map((c) => `  ${c.path.join(' ').padEnd(width)}  ${c.summary}`);
  return [
    'usage: connector COMMAND [options]',
    '',
    'commands:',
    ...lines,
    '',
    'options for every command:',
    '  -c, --config FILE  configuration file (default: ./connector.yaml, else $CONNECTOR_CONFIG, else /etc/edge-connector/connector.yaml)',
    '  -h, --help         show help for the command',
    '',
    'connector --version prints the version. Docs: README.md, docs/.',
  ].join('\n');
}

function find(argv: string[]): { cmd: Command; rest: string[] } | undefined {
  let best: { cmd: Command; rest: string[] } | undefined;
  for (const cmd of commands) {
    if (cmd.path.every((w, i) => argv[i] === w) && (!best || cmd.path.length > best.cmd.path.length)) {
      best = { cmd, rest: argv.slice(cmd.path.length) };
    }
  }
  return best;
}

export async function main(argv: string[]): Promise<number> {
  if (argv.length === 0 || argv[0] === 'help' || argv[0] === '--help' || argv[0] === '-h') {
    if (argv[0] === 'help' && argv.length > 1) {
      const found = find(argv.slice(1));
      if (found) {
        process.stdout.write(`${found.cmd.usage}\n`);
        return EXIT.OK;
      }
    }
    process.stdout.write(helpText() + '\n');
    return argv.length === 0 ? EXIT.USAGE : EXIT.OK;
  }
  if (argv[0] === '--version' || argv[0] === '-V' || argv[0] === 'version') {
    process.stdout.write(`${version()}\n`);
    return EXIT.OK;
  }
  const found = find(argv);
  if (!found) {
    // a group word alone (e.g. `connector device`) lists its subcommands
    const group = commands.filter((c) => c.path[0] === argv[0]);
    if (group.length > 0 && (argv.length === 1 || argv[1] === '--help' || argv[1] === '-h')) {
      process.stdout.write(group.map((c) => `  connector ${c.path.join(' ')}  ${c.summary}`).join('\n') + '\n');
      return argv.length === 1 ? EXIT.USAGE : EXIT.OK;
    }
    process.stderr.write(`connector: unknown command "${argv.slice(0, 2).join(' ')}"; run "connector help" for the list\n`);
    return EXIT.USAGE;
  }
  const { cmd, rest } = found;
  let parsed;
  try {
    parsed = parseArgs({
      args: rest,
      options: { help: { type: 'boolean', short: 'h' }, config: { type: 'string', short: 'c' }, ...(cmd.options ?? {}) },
      allowPositionals: true,
      strict: true,
    });
  } catch (err) {
    process.stderr.write(`connector ${cmd.path.join(' ')}: ${(err as Error).message}\n\n${cmd.usage}\n`);
    return EXIT.USAGE;
  }
  if (parsed.values.help) {
    process.stdout.write(`${cmd.usage}\n`);
    return EXIT.OK;
  }
  const { min, max } = cmd.positionals ?? { min: 0, max: 0 };
  if (parsed.positionals.length < min || parsed.positionals.length > max) {
    process.stderr.write(`connector ${cmd.path.join(' ')}: expected ${min === max ? min : `${min} to ${max}`} argument(s), got ${parsed.positionals.length}\n\n${cmd.usage}\n`);
    return EXIT.USAGE;
  }
  try {
    return await cmd.run({ values: parsed.values, positionals: parsed.positionals });
  } catch (err) {
    explain(err);
    if (errorCode(err) === 'ECONN_ADMIN') return EXIT.UNAVAILABLE;
    const code = exitCodeFor(err);
    if (code !== EXIT.FAILURE) return code; // config (78), state dir / listener (73), corrupt state (70)
    if (err instanceof ConnectorError) return EXIT.FAILURE;
    return EXIT.SOFTWARE;
  }
}

const code = await main(process.argv.slice(2));
// long-running commands (start, cloud) return only once they have shut down; exit once stdout is flushed
process.exitCode = code;
process.stdout.write('', () => process.exit(code));
