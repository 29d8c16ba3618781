import type { ParseArgsConfig } from 'node:util';
import { loadConfig, defaultConfigPath } from '../../core/config/load.js';
import { adminRequest, adminSocketPath } from '../admin.js';

export type Options = NonNullable<ParseArgsConfig['options']>;
export type Values = Record<string, string | boolean | string[] | boolean[] | undefined>;

export interface CommandArgs {
  values: Values;
  positionals: string[];
}

/** One `connector …` command. Every command gets --help and -c/--config. */
export interface Command {
  /** Words that select the command, e.g. ['device', 'add']. */
  readonly path: readonly string[];
  readonly summary: string;
  /** Full usage line(s) and a short description of options. */
  readonly usage: string;
  readonly options?: Options;
  /** Allowed positional arguments (default 0..0). */
  readonly positionals?: { min: number; max: number };
  run(args: CommandArgs): Promise<number>;
}

export const CONFIG_OPTION: Options = {
  config: { type: 'string', short: 'c' },
};

export function configPathOf(values: Values): string {
  return typeof values.config === 'string' ? values.config : defaultConfigPath();
}

/** Call the running daemon (the admin socket of the config's state directory). Secrets are not resolved for this. */
export async function adminCall(values: Values, method: string, params: Record<string, unknown> = {}): Promise<unknown> {
  const { config } = loadConfig(configPathOf(values), { checkSecrets: false });
  return adminRequest(adminSocketPath(config.daemon.state_dir), method, params);
}
