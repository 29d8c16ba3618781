/**
 * Registries held against their doc tables, both directions (as
 * test/core/errors.test.ts does for error codes):
 *   - WebSocket close codes (protocol/codec.ts CLOSE_CODES) ↔ docs/PROTOCOL.md §7
 *   - wire error reasons (WIRE_ERROR_REASONS) ↔ docs/PROTOCOL.md §8
 *   - frame types (FRAME_TYPES) ↔ docs/PROTOCOL.md's frame table
 *   - process exit codes (core/errors.ts EXIT) ↔ README.md and docs/operations.md
 * plus: no close code or exit code written as a bare number in the product.
 */
import t, { type Test } from 'tap';
import { readFileSync, readdirSync, statSync } from 'node:fs';
import path from 'node:path';
import { CLOSE_CODES, FRAME_TYPES, WIRE_ERROR_REASONS } from '../../protocol/codec.js';
import { EXIT } from '../../core/errors.js';
import { REPO } from '../helpers/daemon.js';

const read = (rel: string): string => readFileSync(path.join(REPO, rel), 'utf8');

/** The rows (cells trimmed, `\|` unescaped) of the first markdown table after the heading matching `heading`. */
function tableAfter(doc: string, heading: RegExp): string[][] {
  const lines = doc.split('\n');
  const at = lines.findIndex((l) => /^#{1,6} /.test(l) && heading.test(l));
  if (at < 0) throw new Error(`no heading ${heading}`);
  const rows: string[][] = [];
  let inTable = false;
  for (const line of lines.slice(at + 1)) {
    if (/^#{1,6} /.test(line)) break;
    if (line.startsWith('|')) {
      inTable = true;
      const cells = line.split(/(?<!\\)\|/).slice(1, -1).map((c) => c.replace(/\\\|/g, '|').trim());
      if (cells.every((c) => /^:?-+:?$/.test(c))) continue;
      rows.push(cells);
    } else if (inTable) break;
  }
  if (rows.length < 2) throw new Error(`no table after heading ${heading}`);
  return rows.slice(1); // without the header row
}

function bothWays(t: Test, what: string, code: Iterable<string>, docs: Iterable<string>, where: string): void {
  const inCode = new Set(code);
  const inDocs = new Set(docs);
  for (const c of inCode) t.ok(inDocs.has(c), `${what} ${c} is in ${where}`);
  for (const d of inDocs) t.ok(inCode.has(d), `${what} ${d} (${where}) is in the code`);
  t.ok(inCode.size > 0 && inDocs.size > 0, `${what}: both lists found`);
}

const protocol = read('docs/PROTOCOL.md');

t.test('WebSocket close codes: CLOSE_CODES ↔ docs/PROTOCOL.md §7', async (t) => {
  const rows = tableAfter(protocol, /WebSocket close codes/);
  bothWays(t, 'close code', Object.values(CLOSE_CODES).map(String), rows.map((r) => r[0]!), 'docs/PROTOCOL.md');
});

t.test('wire error reasons: WIRE_ERROR_REASONS ↔ docs/PROTOCOL.md §8', async (t) => {
  const rows = tableAfter(protocol, /ERROR frame codes/);
  bothWays(t, 'error reason', WIRE_ERROR_REASONS, rows.map((r) => r[0]!.replace(/^`|`$/g, '')), 'docs/PROTOCOL.md');
});

t.test('frame types: FRAME_TYPES ↔ docs/PROTOCOL.md frame table (code and name)', async (t) => {
  const rows = tableAfter(protocol, /^## 3\. /).filter((r) => /^0x[0-9A-Fa-f]{2}$/.test(r[0]!));
  bothWays(
    t,
    'frame type',
    Object.entries(FRAME_TYPES).map(([name, v]) => `0x${v.toString(16).padStart(2, '0').toUpperCase()} ${name}`),
    rows.map((r) => `0x${r[0]!.slice(2).toUpperCase()} ${r[1]}`),
    'docs/PROTOCOL.md',
  );
});

t.test('exit codes: EXIT ↔ README.md and docs/operations.md', async (t) => {
  const codes = Object.values(EXIT).map(String);
  for (const doc of ['README.md', 'docs/operations.md']) {
    const rows = tableAfter(read(doc), /^## Exit codes$/);
    bothWays(t, 'exit code', codes, rows.map((r) => r[0]!), doc);
  }
});

function sources(dir: string): string[] {
  return readdirSync(dir).flatMap((name) => {
    const p = path.join(dir, name);
    return statSync(p).isDirectory() ? sources(p) : p.endsWith('.ts') ? [p] : [];
  });
}
const product = ['core', 'protocol', 'identity', 'broker', 'api', 'bridge', 'cloud', 'daemon'].flatMap((d) => sources(path.join(REPO, d)));

t.test('every close code the product sends as a number is registered', async (t) => {
  const registered = new Set<number>(Object.values(CLOSE_CODES));
  let seen = 0;
  for (const f of product) {
    for (const m of readFileSync(f, 'utf8').matchAll(/\.close\(\s*(\d{4})\b/g)) {
      seen++;
      t.ok(registered.has(Number(m[1])), `${path.relative(REPO, f)}: close(${m[1]}) is in CLOSE_CODES`);
    }
  }
  t.pass(`${seen} literal close codes checked`);
});

t.test('the product exits only with EXIT codes, never a bare number', async (t) => {
  for (const f of product) {
    const text = readFileSync(f, 'utf8');
    for (const m of text.matchAll(/process\.exit\(\s*(\d+)\s*\)|process\.exitCode\s*=\s*(\d+)/g)) {
      t.fail(`${path.relative(REPO, f)}: ${m[0]} (use EXIT from core/errors.ts)`);
    }
  }
  t.pass('checked');
});

t.test('tableAfter reads a table and stops at the next heading', async (t) => {
  const doc = '# A\n\ntext\n\n| a | b |\n|---|---|\n| 1 | x \\| y |\n| 2 | z |\n\n## B\n\n| c |\n|---|\n| 3 |\n';
  t.same(tableAfter(doc, /^# A$/), [
    ['1', 'x | y'],
    ['2', 'z'],
  ]);
  t.same(tableAfter(doc, /^## B$/), [['3']]);
  t.throws(() => tableAfter(doc, /^## C$/));
});
