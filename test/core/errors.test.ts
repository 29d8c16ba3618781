import t from 'tap';
import { readFileSync, readdirSync, statSync } from 'node:fs';
import path from 'node:path';
import { ERROR_CODES, ERROR_HTTP, ConnectorError, ConfigError, AuthenticationError, errorCode, httpErrorOf } from '../../core/errors.js';
import { REPO } from '../helpers/daemon.js';

const fullDoc = readFileSync(path.join(REPO, 'docs/errors.md'), 'utf8');
const httpHeading = fullDoc.indexOf('## HTTP status of each code');
const doc = httpHeading >= 0 ? fullDoc.slice(0, httpHeading) : fullDoc;
const httpDoc = httpHeading >= 0 ? fullDoc.slice(httpHeading) : '';
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

t.test('the HTTP table of docs/errors.md equals ERROR_HTTP (status and client-safe flag per code)', async (t) => {
  t.ok(httpHeading >= 0, 'docs/errors.md has the HTTP section');
  const rows = [...httpDoc.matchAll(/^\| `(ECONN_[A-Z0-9_]+)` \| (\d{3}) \| (yes|no) \|$/gm)].map((m) => ({ code: m[1]!, status: Number(m[2]), clientSafe: m[3] === 'yes' }));
  t.ok(rows.length >= 10, 'rows found');
  const fromDoc = Object.fromEntries(rows.map((r) => [r.code, { status: r.status, clientSafe: r.clientSafe }]));
  t.same(fromDoc, { ...ERROR_HTTP }, 'same codes, statuses and flags');
  for (const code of Object.keys(ERROR_HTTP)) t.ok(code in ERROR_CODES, `${code} is a registered code`);
});

t.test('httpErrorOf: listed codes map as registered; anything else is an internal 500, never client-safe', async (t) => {
  t.same(httpErrorOf('ECONN_NOT_FOUND'), { status: 404, clientSafe: true });
  t.same(httpErrorOf('ECONN_DEVICE_EXISTS'), { status: 409, clientSafe: true });
  t.same(httpErrorOf('ECONN_JOURNAL_IO'), { status: 503, clientSafe: false });
  for (const c of ['ECONN_INTERNAL', 'ECONN_REGISTRY_CORRUPT', 'ECONN_CONFIG_SECRET', 'EACCES', 'toString', '__proto__', undefined]) {
    t.same(httpErrorOf(c), { status: 500, clientSafe: false }, `${String(c)} -> 500`);
  }
  // codes whose messages may carry paths or internals are never shown to a client
  for (const c of ['ECONN_CONFIG_SECRET', 'ECONN_STATE_DIR', 'ECONN_REGISTRY_CORRUPT', 'ECONN_INTERNAL']) t.notOk(httpErrorOf(c).clientSafe, `${c} not client-safe`);
});

t.test('api/ maps no error code to a status by hand', async (t) => {
  const walk = (dir: string): string[] =>
    readdirSync(dir).flatMap((name) => {
      const p = path.join(dir, name);
      return statSync(p).isDirectory() ? walk(p) : p.endsWith('.ts') ? [p] : [];
    });
  for (const file of walk(path.join(REPO, 'api'))) {
    const src = readFileSync(file, 'utf8');
    t.notMatch(src, /case 'ECONN_[A-Z_]+':/, `${path.relative(REPO, file)} has no switch over codes`);
    t.notMatch(src, /RequestError\(\d{3}/, `${path.relative(REPO, file)} gives no status with a code`);
  }
});
