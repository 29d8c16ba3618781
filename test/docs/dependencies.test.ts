/**
 * package.json says what each dependency is: every package the product
 * (the folders that build into dist/) imports is a dependency (or optional),
 * every dependency is imported by the product, and packages only tests and
 * benchmarks import are devDependencies. aedes stays on 1.2.x: broker/ reaches
 * into its internals.
 */
import t from 'tap';
import { readFileSync, readdirSync, statSync } from 'node:fs';
import { builtinModules } from 'node:module';
import path from 'node:path';
import { REPO } from '../helpers/daemon.js';

interface Pkg {
  dependencies: Record<string, string>;
  devDependencies: Record<string, string>;
  optionalDependencies?: Record<string, string>;
}
const pkg = JSON.parse(readFileSync(path.join(REPO, 'package.json'), 'utf8')) as Pkg;

function sources(dir: string): string[] {
  return readdirSync(dir).flatMap((name) => {
    const p = path.join(dir, name);
    return statSync(p).isDirectory() ? sources(p) : /\.(ts|mjs|js)$/.test(p) ? [p] : [];
  });
}

/** Package names a file imports (static, dynamic, side-effect, `import type`, require), builtins left out. */
export function importedPackages(text: string): Set<string> {
  const out = new Set<string>();
  const patterns = [
    /^\s*(?:import|export)\s[^;]*?\sfrom\s*['"]([^'"]+)['"]/gm,
    /^\s*import\s*['"]([^'"]+)['"]/gm,
    /\bimport\(\s*['"]([^'"]+)['"]\s*\)/g,
    /\brequire\(\s*['"]([^'"]+)['"]\s*\)/g,
  ];
  for (const re of patterns) {
    for (const m of text.matchAll(re)) {
      const spec = m[1]!;
      if (spec.startsWith('.') || spec.startsWith('/') || spec.startsWith('node:') || builtinModules.includes(spec.split('/')[0]!)) continue;
      out.add(spec.startsWith('@') ? spec.split('/').slice(0, 2).join('/') : spec.split('/')[0]!);
    }
  }
  return out;
}

const PRODUCT = ['core', 'protocol', 'identity', 'broker', 'api', 'bridge', 'cloud', 'daemon'];
const productImports = new Map<string, string>(); // package -> first file importing it
for (const d of PRODUCT) {
  for (const f of sources(path.join(REPO, d))) {
    for (const p of importedPackages(readFileSync(f, 'utf8'))) if (!productImports.has(p)) productImports.set(p, path.relative(REPO, f));
  }
}

t.test('every package the product imports is a dependency, never a devDependency', async (t) => {
  const runtime = { ...pkg.dependencies, ...(pkg.optionalDependencies ?? {}) };
  t.ok(productImports.size > 5, 'found the product imports');
  for (const [p, file] of productImports) {
    t.ok(p in runtime, `${p} (imported by ${file}) is in dependencies`);
    t.notOk(p in pkg.devDependencies, `${p} (imported by ${file}) is not only a devDependency`);
  }
});

t.test('every dependency is imported by the product', async (t) => {
  for (const p of Object.keys({ ...pkg.dependencies, ...(pkg.optionalDependencies ?? {}) })) {
    t.ok(productImports.has(p), `${p} is used by the product (else it belongs in devDependencies or nowhere)`);
  }
});

t.test('packages only tests use are devDependencies', async (t) => {
  for (const p of ['mqtt', 'mqtt-packet']) {
    t.notOk(productImports.has(p), `${p}: the product does not import it`);
    t.ok(p in pkg.devDependencies, `${p} is a devDependency`);
    t.notOk(p in pkg.dependencies, `${p} is not a dependency`);
  }
});

t.test('aedes is pinned to 1.2.x (the broker uses its internals)', async (t) => {
  t.match(pkg.dependencies.aedes, /^~1\.2\.\d+$/);
});

t.test('importedPackages', async (t) => {
  const src = [
    "import 'reflect-metadata';",
    "import { x } from '@scope/pkg/sub';",
    "import type { Y } from \"yaml\";",
    "const m = await import('mqtt');",
    "import fs from 'node:fs';",
    "import path from 'path';",
    "import { a } from './local.js';",
    "export { b } from 'ws';",
    "const u = require('unix-dgram');",
    "// a listener that acks from 'append' sees a consistent index",
    "import {\n  c,\n  d,\n} from 'pino';",
  ].join('\n');
  t.same([...importedPackages(src)].sort(), ['@scope/pkg', 'mqtt', 'pino', 'reflect-metadata', 'unix-dgram', 'ws', 'yaml']);
});
