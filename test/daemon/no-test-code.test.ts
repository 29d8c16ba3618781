/**
 * No test code in the product: nothing in dist/ (what `npm run build` ships)
 * mentions the old test hooks or reacts to a test environment variable. The
 * hooks live in test/helpers/daemon-hooks.mjs and reach the daemon through its
 * seam (runDaemon(file, { extraComponents })). Needs a build (npm test builds first).
 */
import t from 'tap';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { REPO } from '../helpers/daemon.js';

const DIST = path.join(REPO, 'dist');

/** What test-only code in the product looked like (daemon/testhooks.ts) and any env variable named like a test switch. */
const FORBIDDEN: [string, RegExp][] = [
  ['the old test-hooks env variables', /EDGE_CONNECTOR_TEST_HOOKS|EDGE_CONNECTOR_TEST_HANG_CLOSE/],
  ['a test-hooks module', /testhooks/i],
  ['a test-only admin method', /['"`]test\.(block_loop|starve_loop|crash)['"`]/],
  ['an environment variable named like a test switch', /\benv\s*(\.\s*[A-Z0-9_]*TEST[A-Z0-9_]*|\[\s*['"`][A-Z0-9_]*TEST[A-Z0-9_]*['"`]\s*\])/],
  ['a string naming a *_TEST_* variable', /['"`][A-Z0-9]+_TEST(_[A-Z0-9_]+)?['"`]/],
];

function files(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) => (e.isDirectory() ? files(path.join(dir, e.name)) : [path.join(dir, e.name)]));
}

t.test('dist/ holds no test hooks and reacts to no test environment variable', async (t) => {
  t.ok(existsSync(path.join(DIST, 'daemon/main.js')), 'dist/ is built (run npm run build)');
  const all = existsSync(DIST) ? files(DIST) : [];
  t.ok(all.length > 10, `dist/ has the product's files (${all.length})`);
  const found: string[] = [];
  for (const f of all) {
    const rel = path.relative(REPO, f);
    if (/testhooks/i.test(rel)) found.push(`${rel}: file name`);
    if (!/\.(js|mjs|cjs|map|json)$/.test(f)) continue;
    const text = readFileSync(f, 'utf8');
    for (const [what, re] of FORBIDDEN) {
      const m = re.exec(text);
      if (m) found.push(`${rel}: ${what} (${m[0]})`);
    }
  }
  t.same(found, [], 'nothing test-only in dist/');
});

t.test('the patterns catch what daemon/testhooks.ts shipped (the check can fail)', async (t) => {
  const old = [
    "return env.EDGE_CONNECTOR_TEST_HOOKS === '1';",
    "close: () => (env.EDGE_CONNECTOR_TEST_HANG_CLOSE === '1' ? new Promise(() => {}) : Promise.resolve()),",
    "admin.register('test.block_loop', async (params) => {",
    "import { registerTestHooks } from './testhooks.js';",
    "if (process.env.MY_TEST_MODE) enableFaults();",
  ];
  for (const line of old) t.ok(FORBIDDEN.some(([, re]) => re.test(line)), line);
  t.notOk(FORBIDDEN.some(([, re]) => re.test("const latest = env.CONNECTOR_LOG_LEVEL; // attestation")), 'ordinary code passes');
});
