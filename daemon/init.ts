/**
 * `connector init` (also run by `connector start` before anything else):
 * creates the state directory (0700) and every key and certificate the daemon
 * needs. Idempotent: existing files are never overwritten.
 */
import { mkdirSync, statSync, chmodSync, writeFileSync, unlinkSync } from 'node:fs';
import path from 'node:path';
import type { Config } from '../core/config/schema.js';
import type { Logger } from '../core/logger.js';
import { StartupError } from '../core/errors.js';
import { ensureSecretFile } from '../core/secrets.js';
import { isGeneratedSecret } from '../core/config/load.js';
import type { InitStep } from '../core/component.js';

export type { InitStep };


function ensureStateDir(dir: string): boolean {
  let created = false;
  try {
    const st = statSync(dir);
    if (!st.isDirectory()) throw new StartupError('ECONN_STATE_DIR', `state directory ${dir} exists but is not a directory (daemon.state_dir)`);
  } catch (err) {
    if (err instanceof StartupError) throw err;
    const code = (err as NodeJS.ErrnoException).code;
    if (code !== 'ENOENT' && code !== 'ENOTDIR') throw new StartupError('ECONN_STATE_DIR', `state directory ${dir} cannot be inspected (${code}); check daemon.state_dir`);
    try {
      mkdirSync(dir, { recursive: true, mode: 0o700 });
      created = true;
    } catch (e) {
      const c = (e as NodeJS.ErrnoException).code;
      throw new StartupError(
        'ECONN_STATE_DIR',
        `state directory ${dir} cannot be created (${c}); create it for the daemon user with mode 0700 or change daemon.state_dir`,
      );
    }
  }
  // 0700 always: it holds private keys and the admin socket
  try {
    if ((statSync(dir).mode & 0o077) !== 0) chmodSync(dir, 0o700);
  } catch {
    // not our directory: the write probe below reports the problem
  }
  const probe = path.join(dir, `.write-probe-${process.pid}`);
  try {
    writeFileSync(probe, '', { mode: 0o600 });
    unlinkSync(probe);
  } catch (e) {
    const c = (e as NodeJS.ErrnoException).code;
    throw new StartupError(
      'ECONN_STATE_DIR',
      `state directory ${dir} is not writable (${c}); give the daemon user write access (chown it, mode 0700) or change daemon.state_dir`,
    );
  }
  return created;
}

/** Secrets referenced as file: inside the state directory are generated when missing (fresh installs, loopback cloud). */
function generatedSecretRefs(config: Config): string[] {
  const refs = [config.bridge.token.client_secret, config.bridge.token.password, config.bridge.uplink.signing_secret];
  return refs.filter((r): r is string => isGeneratedSecret(r, config.daemon.state_dir));
}

export async function runInit(config: Config, logger: Logger, steps: readonly InitStep[]): Promise<string[]> {
  const log = logger.child({ component: 'init' });
  const created: string[] = [];
  if (ensureStateDir(config.daemon.state_dir)) created.push(config.daemon.state_dir);
  for (const ref of generatedSecretRefs(config)) {
    const file = ref.slice('file:'.length);
    mkdirSync(path.dirname(file), { recursive: true, mode: 0o700 });
    if (ensureSecretFile(file)) created.push(file);
  }
  for (const step of steps) {
    const made = await step.run(config, log);
    created.push(...made);
  }
  for (const f of created) log.info({ created: f }, 'created');
  return created;
}
