/**
 * Secret references in the configuration: `env:NAME`, `file:/path` (must not be
 * readable by group or others), `credential:NAME` (a systemd credential, read
 * from $CREDENTIALS_DIRECTORY/NAME: `LoadCredential=` for a root-only file, or
 * `LoadCredentialEncrypted=` / `SetCredentialEncrypted=` for one sealed with
 * `systemd-creds encrypt` — host key and TPM2 — which systemd decrypts into the
 * same place at start). Plain-text secrets are refused by the schema.
 *
 * Secrets are resolved when they are used, so a rotated file or credential is
 * picked up on the next use (and on SIGHUP). Errors name the reference, never the value.
 */
import { readFileSync, statSync, writeFileSync, linkSync, unlinkSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import path from 'node:path';
import { SecurityError } from './errors.js';

export type SecretRef = string;

function fail(ref: string, what: string): never {
  throw new SecurityError('ECONN_CONFIG_SECRET', `secret ${ref}: ${what}`);
}

function readSecretFile(ref: string, file: string): string {
  let st;
  try {
    st = statSync(file);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    fail(ref, code === 'ENOENT' ? `file ${file} does not exist` : `cannot read ${file} (${code})`);
  }
  if (!st.isFile()) fail(ref, `${file} is not a regular file`);
  if ((st.mode & 0o077) !== 0) {
    const mode = (st.mode & 0o777).toString(8).padStart(4, '0');
    fail(ref, `file ${file} is readable by group or others (mode ${mode}); run: chmod 600 ${file}`);
  }
  let raw: Buffer;
  try {
    raw = readFileSync(file);
  } catch (err) {
    fail(ref, `cannot read ${file} (${(err as NodeJS.ErrnoException).code})`);
  }
  if (raw.includes(0)) {
    // e.g. a `systemd-creds encrypt` output referenced as file: — only systemd can decrypt it
    fail(
      ref,
      `${file} holds binary data, not a text secret; if it is an encrypted systemd credential, load it with LoadCredentialEncrypted=NAME:${file} in the unit and reference it as credential:NAME`,
    );
  }
  const text = raw.toString('utf8');
  const value = text.replace(/\r?\n$/, '');
  if (value.length === 0) fail(ref, `file ${file} is empty`);
  return value;
}

/** Resolve a reference to the secret value. Throws SecurityError ECONN_CONFIG_SECRET. */
export function resolveSecret(ref: SecretRef, env: NodeJS.ProcessEnv = process.env): string {
  const colon = ref.indexOf(':');
  const kind = colon > 0 ? ref.slice(0, colon) : '';
  const name = ref.slice(colon + 1);
  switch (kind) {
    case 'env': {
      const v = env[name];
      if (v === undefined || v === '') fail(ref, `environment variable ${name} is not set`);
      return v;
    }
    case 'file':
      return readSecretFile(ref, name);
    case 'credential': {
      const dir = env.CREDENTIALS_DIRECTORY;
      if (!dir) {
        fail(ref, `$CREDENTIALS_DIRECTORY is not set (use LoadCredential=${name}:/path or LoadCredentialEncrypted=${name}:/path.cred in the systemd unit)`);
      }
      if (name.includes('/') || name === '..' || name === '.') fail(ref, 'a credential name must not contain "/"');
      const file = path.join(dir, name);
      try {
        statSync(file);
      } catch {
        fail(ref, `no credential "${name}" in $CREDENTIALS_DIRECTORY (${dir}); the unit needs LoadCredential=${name}:… or LoadCredentialEncrypted=${name}:…`);
      }
      return readSecretFile(ref, file);
    }
    default:
      // not a reference: it may be the secret itself, so it is not repeated
      throw new SecurityError('ECONN_CONFIG_SECRET', 'a secret must be given as env:NAME, file:/path or credential:NAME, not in plain text');
  }
}

/**
 * Create a random secret file (mode 0600) if it does not exist yet; never
 * overwrites. Atomic against a concurrent creator (write a temp file, then
 * link(2), which fails if the target exists). Returns true if it created it.
 */
export function ensureSecretFile(file: string, bytes = 32): boolean {
  const tmp = `${file}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`;
  writeFileSync(tmp, randomBytes(bytes).toString('base64url') + '\n', { mode: 0o600, flag: 'wx' });
  try {
    linkSync(tmp, file);
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') return false;
    throw err;
  } finally {
    unlinkSync(tmp);
  }
}
