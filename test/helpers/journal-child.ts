/**
 * A journal in a child process (the built dist/bridge/journal.js) appending from several
 * concurrent writers until the test kills it with SIGKILL: the crash and power-cut tests of
 * the journal. The child prints `A <id>` once an append resolved (durable) and, every
 * `ackEvery`-th record, `K <id>` once it acknowledged it. Bounded: the child is killed as
 * soon as `enough(lines)` holds, and a child that exits first fails the wait.
 */
import { spawn } from 'node:child_process';
import { existsSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { REPO, type TestLike } from './daemon.js';

export interface AppendChild {
  writers: number;
  /** Payload of record i: `base + (i % mod) * step` bytes. */
  base: number;
  mod: number;
  step: number;
  /** Acknowledge every ackEvery-th record (0: never). */
  ackEvery?: number;
  /** The journal configuration (JournalConfig). */
  config: unknown;
  /** Kill the child once this holds for the lines printed so far. */
  enough: (lines: readonly string[]) => boolean;
}

/** Run the child on `dir`/j, kill it with SIGKILL when enough was printed; resolves with every line it printed. */
export async function appendUntilKilled(t: TestLike & { fail(msg: string): unknown }, dir: string, o: AppendChild): Promise<string[] | undefined> {
  const dist = path.join(REPO, 'dist/bridge/journal.js');
  if (!existsSync(dist)) {
    t.fail('dist/bridge/journal.js missing: run `npm run build` first');
    return undefined;
  }
  const script = path.join(dir, 'child.mjs');
  writeFileSync(
    script,
    `
import { Journal } from ${JSON.stringify(pathToFileURL(dist).href)};
import { silentLogger } from ${JSON.stringify(pathToFileURL(path.join(REPO, 'dist/core/logger.js')).href)};
const j = new Journal({ dir: process.argv[2], logger: silentLogger(), config: ${JSON.stringify(o.config)} });
await j.start();
let n = 0;
const out = (s) => process.stdout.write(s + '\\n');
async function writer(w) {
  for (;;) {
    const i = n++;
    const r = await j.append({ deviceId: 'd' + w, topic: 'devices/d' + w + '/up', qos: 1, receivedAt: i }, Buffer.alloc(${o.base} + (i % ${o.mod}) * ${o.step}, i & 255));
    out('A ' + r.id);
    ${o.ackEvery ? `if (i % ${o.ackEvery} === 0) { await j.ack(r.id); out('K ' + r.id); }` : ''}
  }
}
for (let w = 0; w < ${o.writers}; w++) void writer(w);
`,
  );
  const child = spawn(process.execPath, [script, path.join(dir, 'j')], { stdio: ['ignore', 'pipe', 'inherit'] });
  t.teardown(() => {
    if (child.exitCode === null) child.kill('SIGKILL');
  });
  let buf = '';
  const lines: string[] = [];
  await new Promise<void>((resolve, reject) => {
    child.on('exit', () => reject(new Error('child exited early')));
    child.stdout.on('data', (d: Buffer) => {
      buf += d.toString();
      const parts = buf.split('\n');
      buf = parts.pop()!;
      lines.push(...parts);
      if (o.enough(lines)) {
        child.kill('SIGKILL');
        resolve();
      }
    });
  });
  await new Promise((r) => child.once('exit', r));
  return lines;
}
