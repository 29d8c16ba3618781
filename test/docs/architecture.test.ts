/**
 * docs/ARCHITECTURE.md held against the tree, so the map cannot drift from the territory:
 *   - every file path it names (`dir/file.ts`, `.mjs`, `.js`, `.md`) exists;
 *   - its layer table lists exactly the top-level source folders (those holding .ts files,
 *     test/ aside), and its "may import" column equals the LAYERS table of the eslint rule
 *     local/layers in eslint.config.js (parsed from the file: it is plain JS outside the
 *     TypeScript project), which no layer may list daemon/ in;
 *   - in the message-path and start-order tables, every function or class named in a row is
 *     defined in one of the files named in that row.
 */
import t from 'tap';
import { existsSync, readFileSync, readdirSync, statSync } from 'node:fs';
import path from 'node:path';
import { REPO } from '../helpers/daemon.js';

const read = (rel: string): string => readFileSync(path.join(REPO, rel), 'utf8');
const doc = read('docs/ARCHITECTURE.md');

/** The header and rows (cells trimmed) of the first markdown table after the heading matching `heading`. */
function tableAfter(heading: RegExp): { header: string[]; rows: string[][] } {
  const lines = doc.split('\n');
  const at = lines.findIndex((l) => /^#{1,6} /.test(l) && heading.test(l));
  if (at < 0) throw new Error(`no heading ${heading} in docs/ARCHITECTURE.md`);
  const rows: string[][] = [];
  for (const line of lines.slice(at + 1)) {
    if (/^#{1,6} /.test(line)) break;
    if (line.startsWith('|')) {
      const cells = line.split('|').slice(1, -1).map((c) => c.trim());
      if (!cells.every((c) => /^:?-+:?$/.test(c))) rows.push(cells);
    } else if (rows.length > 0) break;
  }
  if (rows.length < 2) throw new Error(`no table after heading ${heading}`);
  return { header: rows[0]!, rows: rows.slice(1) };
}

/** The backticked spans of a markdown cell. */
const ticks = (cell: string): string[] => [...cell.matchAll(/`([^`]+)`/g)].map((m) => m[1]!);

/** The LAYERS table of eslint.config.js: `folder: ['a', 'b'],` lines inside `const LAYERS = { … };`. */
function eslintLayers(): Map<string, string[]> {
  const src = read('eslint.config.js');
  const body = /const LAYERS = \{\n([\s\S]*?)\n\};/.exec(src)?.[1];
  if (body === undefined) throw new Error('no `const LAYERS = { … };` in eslint.config.js');
  const out = new Map<string, string[]>();
  for (const line of body.split('\n')) {
    const m = /^\s*(\w+): \[([^\]]*)\],?\s*$/.exec(line);
    if (!m) throw new Error(`unexpected line in LAYERS of eslint.config.js: ${line}`);
    out.set(m[1]!, [...m[2]!.matchAll(/'(\w+)'/g)].map((x) => x[1]!));
  }
  return out;
}

/** Whether `dir` (relative to the repo) holds a .ts file at any depth. */
function holdsTs(dir: string): boolean {
  for (const e of readdirSync(path.join(REPO, dir), { withFileTypes: true })) {
    if (e.isFile() && e.name.endsWith('.ts')) return true;
    if (e.isDirectory() && holdsTs(path.join(dir, e.name))) return true;
  }
  return false;
}

t.test('every file path named in docs/ARCHITECTURE.md exists', async (t) => {
  const paths = new Set([...doc.matchAll(/(?<![\w./-])((?:[\w.-]+\/)+[\w.-]+\.(?:ts|mjs|js|md))(?![\w/])/g)].map((m) => m[1]!));
  t.ok(paths.size >= 30, `found the paths (${paths.size})`);
  t.same([...paths].filter((p) => !existsSync(path.join(REPO, p))), [], 'no path is missing from the tree');
});

t.test('the layer table lists every top-level source folder, and its "may import" column is the eslint rule', async (t) => {
  const { header, rows } = tableAfter(/^## Layers$/);
  t.same(header, ['folder', 'holds', 'may import']);
  const doc = new Map<string, string>(rows.map((r) => [ticks(r[0]!)[0]!.replace(/\/$/, ''), r[2]!]));

  const sourceFolders = readdirSync(REPO)
    .filter((d) => !['node_modules', 'dist', 'test', '.git', '.tap'].includes(d) && statSync(path.join(REPO, d)).isDirectory())
    .filter((d) => holdsTs(d))
    .sort();
  t.same([...doc.keys()].sort(), sourceFolders, 'the table has one row per top-level folder holding TypeScript source');

  const layers = eslintLayers();
  t.same([...layers.keys()].sort(), sourceFolders, 'and so has the LAYERS table of eslint.config.js');
  for (const [folder, cell] of doc) {
    // "everything; …" is every other layer; otherwise the backticked folders; "nothing internal" is none
    const allowed = cell.startsWith('everything')
      ? [...layers.keys()].filter((l) => l !== folder)
      : ticks(cell).map((x) => x.replace(/\/$/, ''));
    t.same(allowed.sort(), [...(layers.get(folder) ?? [])].sort(), `${folder}/ may import the same in the doc and in the rule`);
  }
  t.same([...layers].filter(([, allowed]) => allowed.includes('daemon')).map(([l]) => l), [], 'nothing may import daemon/ (composition root)');
});

/** Whether `name` is defined (class, function, method, arrow property) in the source `src`. */
function defines(src: string, name: string): boolean {
  return new RegExp(
    `(?:^|\\s)(?:class|function|interface|type|const)\\s+${name}\\b|^\\s+(?:(?:private|readonly|public|protected|static|async|override|get)\\s+)*${name}\\s*(?:<[^>]*>)?\\s*[(=]`,
    'm',
  ).test(src);
}

for (const [heading, fileCol, nameCol] of [
  [/^## The path of one device message$/, 'file', 'function'],
  [/^## Start and close order$/, 'built from', 'built from'],
] as const) {
  t.test(`the functions and classes of the table under "${heading.source}" are defined in the files of their row`, async (t) => {
    const { header, rows } = tableAfter(heading);
    const fi = header.indexOf(fileCol);
    const ni = header.indexOf(nameCol);
    t.ok(fi >= 0 && ni >= 0, 'the table has its columns');
    let checked = 0;
    for (const row of rows) {
      const files = ticks(row[fi]!).filter((x) => x.endsWith('.ts'));
      const names = ticks(row[ni]!)
        .filter((x) => !x.includes('/') && !x.includes(' '))
        .flatMap((x) => x.split('.'));
      if (names.length === 0) continue;
      const srcs = files.map(read);
      for (const n of names) {
        checked++;
        t.ok(
          srcs.some((s) => defines(s, n)),
          `${n} is defined in ${files.join(' or ')}`,
        );
      }
    }
    t.ok(checked >= 10, `checked the names (${checked})`);
  });
}

t.test("README.md's Layout section lists every top-level folder and links docs/ARCHITECTURE.md", async (t) => {
  const readme = read('README.md');
  const section = /^## Layout\n([\s\S]*?)(?=^## )/m.exec(readme)?.[1];
  if (section === undefined) throw new Error('README.md has no "## Layout" section');
  t.match(section, '(docs/ARCHITECTURE.md)', 'links docs/ARCHITECTURE.md');
  const listed = [...section.matchAll(/^\| `([\w-]+)\/` \|/gm)].map((m) => m[1]!).sort();
  const folders = readdirSync(REPO)
    .filter((d) => !d.startsWith('.') && !['node_modules', 'dist', 'state', 'cloud-data'].includes(d) && statSync(path.join(REPO, d)).isDirectory())
    .sort();
  t.same(listed, folders, 'one row per top-level folder (build output and local state aside)');
});
