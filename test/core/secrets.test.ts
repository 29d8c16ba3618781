import t from 'tap';
import { writeFileSync, chmodSync, readFileSync, statSync, mkdirSync } from 'node:fs';
import path from 'node:path';
import { resolveSecret, ensureSecretFile } from '../../core/secrets.js';
import { tempDir } from '../helpers/daemon.js';

t.test('env:, file: and credential: references', async (t) => {
  const dir = tempDir(t);
  t.equal(resolveSecret('env:S', { S: 'v1' }), 'v1');
  t.throws(() => resolveSecret('env:S', {}), { code: 'ECONN_CONFIG_SECRET', message: 'secret env:S: environment variable S is not set' });
  const f = path.join(dir, 's');
  writeFileSync(f, 'v2\n', { mode: 0o600 });
  t.equal(resolveSecret(`file:${f}`), 'v2', 'one trailing newline is dropped');
  chmodSync(f, 0o640);
  t.throws(() => resolveSecret(`file:${f}`), { message: /readable by group or others \(mode 0640\); run: chmod 600/ });
  writeFileSync(path.join(dir, 'empty'), '', { mode: 0o600 });
  t.throws(() => resolveSecret(`file:${path.join(dir, 'empty')}`), { message: /is empty/ });
  t.throws(() => resolveSecret(`file:${dir}`), { message: /not a regular file/ });
  const creds = path.join(dir, 'creds');
  mkdirSync(creds);
  writeFileSync(path.join(creds, 'cloud'), 'v3', { mode: 0o600 });
  t.equal(resolveSecret('credential:cloud', { CREDENTIALS_DIRECTORY: creds }), 'v3');
  t.throws(() => resolveSecret('credential:../s', { CREDENTIALS_DIRECTORY: creds }), { message: /must not contain "\/"/ });
  t.throws(() => resolveSecret('plain-secret'), { message: /must be given as env:NAME, file:\/path or credential:NAME, not in plain text/ });
  try {
    resolveSecret('hunter2');
  } catch (err) {
    t.notMatch((err as Error).message, 'hunter2', 'a plain-text value is not echoed');
  }
});

t.test('ensureSecretFile creates a 0600 random secret once and never overwrites', async (t) => {
  const f = path.join(tempDir(t), 'gen.secret');
  t.equal(ensureSecretFile(f), true);
  t.equal(statSync(f).mode & 0o777, 0o600);
  const v = readFileSync(f, 'utf8');
  t.ok(v.trim().length >= 40);
  t.equal(ensureSecretFile(f), false);
  t.equal(readFileSync(f, 'utf8'), v);
  t.equal(resolveSecret(`file:${f}`), v.trim());
});
