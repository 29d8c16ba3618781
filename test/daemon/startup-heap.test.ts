/**
 * daemon/startup-heap.ts in a child process (V8 flags are per process): `start` holds the
 * young generation and TurboFan until released; other commands and an operator's compiler
 * flag are left alone. Needs `npm run build` (dist/daemon/startup-heap.js).
 */
import t from 'tap';
import { spawnSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { REPO, tempDir } from '../helpers/daemon.js';

const probe = (dir: string): string => {
  const file = path.join(dir, 'probe.mjs');
  const mod = pathToFileURL(path.join(REPO, 'dist/daemon/startup-heap.js')).href;
  writeFileSync(
    file,
    `const { releaseOptimizingCompiler, releaseYoungGeneration } = await import(${JSON.stringify(mod)});
const hot = (x) => { let s = 0; for (let i = 0; i < 50; i++) s += (x * i) % 7; return s; };
const optimized = () => { for (let i = 0; i < 3e5; i++) hot(i); return (%GetOptimizationStatus(hot) & 16) !== 0; };
const wait = () => new Promise((r) => setTimeout(r, 50));
const before = optimized(); await wait();
const held = optimized();
releaseOptimizingCompiler(); releaseYoungGeneration();
for (let k = 0; k < 20 && !optimized(); k++) await wait();
console.log(JSON.stringify({ held: !(before || held), after: optimized() }));
`,
  );
  return file;
};

const run = (file: string, node: string[], args: string[]): { held: boolean; after: boolean } => {
  const r = spawnSync(process.execPath, ['--allow-natives-syntax', ...node, file, ...args], { encoding: 'utf8', env: { ...process.env, NODE_OPTIONS: '' } });
  if (r.status !== 0) throw new Error(r.stderr);
  return JSON.parse(r.stdout.trim()) as { held: boolean; after: boolean };
};

t.test('start holds TurboFan until released; other commands and an operator flag are left alone', async (t) => {
  const file = probe(tempDir(t));
  t.same(run(file, [], ['start']), { held: true, after: true }, 'start: held, then optimized once released');
  t.same(run(file, [], ['status']), { held: false, after: true }, 'another command: never held');
  t.same(run(file, ['--opt'], ['start']), { held: false, after: true }, 'an operator compiler flag: never held');
});
