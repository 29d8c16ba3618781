import t from 'tap';
import { readFileSync, readdirSync, statSync } from 'node:fs';
import path from 'node:path';
import { ERROR_CODES, ConnectorError, ConfigError, AuthenticationError, errorCode } from '../../core/errors.js';
import { REPO } from '../helpers/daemon.js';

const doc = readFileSync(path.join(REPO, 'docs/errors.md'), 'utf8');
const documented = new Set([...doc.matchAll(/^\| `(ECONN_[A-Z0-9_]+)` \|/gm)].map((m) => m[1]!));

t.test('every registered code is documented in docs/errors.md and vice versa', async (t) => {
  for (const code of Object.keys(ERROR_CODES)) t.ok(documented.has(code), `${code} is documented`);
  for (const code of documented) t.ok(code in ERROR_CODES, `${code} in docs is registered in core/errors.ts`);
});

t.test('every ECONN_ code used in source is registered', async (t) => {
  const used = new Set<string>();
  const walk = (dir: string): void => {
    for (const name of readdirSync(dir)) {
      const p = path.join(dir, name);
      if (statSync(p).isDirectory()) walk(p);
      else if (p.endsWith('.ts')) for (const m of readFileSync(p, 'utf8').matchAll(/['"`](ECONN_[A-Z0-9_]+)['"`]/g)) used.add(m[1]!);
    }
  };
  for (const d of ['core', 'protocol', 'identity', 'broker', 'api', 'bridge', 'cloud', 'daemon']) walk(path.join(REPO, d));
  t.ok(used.size > 5, 'found codes in source');
  for (const code of used) t.ok(code in ERROR_CODES, `${code} (used in source) is registered`);
});

t.test('error classes carry their code and name', async (t) => {
  const e = new AuthenticationError('ECONN_AUTH_TOKEN', 'expired');
  t.equal(e.code, 'ECONN_AUTH_TOKEN');
  t.equal(e.name, 'AuthenticationError');
  t.ok(e instanceof ConnectorError);
  t.equal(errorCode(e), 'ECONN_AUTH_TOKEN');
  t.equal(errorCode(new Error('x')), undefined);
  const c = new ConfigError('ECONN_CONFIG_INVALID', ['a', 'b']);
  t.same(c.problems, ['a', 'b']);
  t.equal(c.message, 'a\nb');
});
