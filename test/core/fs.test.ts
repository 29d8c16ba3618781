import t from 'tap';
import { mkdtempSync, readFileSync, readdirSync, statSync, writeFileSync, chmodSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { writeAtomic, writeAtomicSync, syncDir, preadFully } from '../../core/fs.js';
import { open } from 'node:fs/promises';

function scratch(t: { teardown(fn: () => void): void }): string {
  const dir = mkdtempSync(path.join(tmpdir(), 'ec-fs-'));
  t.teardown(() => {
    chmodSync(dir, 0o700);
  });
  return dir;
}

for (const [name, write] of [
  ['writeAtomic', (f: string, d: string, m?: number) => writeAtomic(f, d, m)],
  ['writeAtomicSync', async (f: string, d: string, m?: number) => writeAtomicSync(f, d, m)],
] as const) {
  t.test(`${name}: creates, replaces, applies the mode, leaves no temporary file`, async (t) => {
    const dir = scratch(t);
    const file = path.join(dir, 'sub', 'state.json');
    await write(file, 'one');
    t.equal(readFileSync(file, 'utf8'), 'one');
    t.equal(statSync(file).mode & 0o777, 0o600, 'default mode 0600');
    t.equal(statSync(path.dirname(file)).mode & 0o777, 0o700, 'missing directory created 0700');
    writeFileSync(file, 'old', { mode: 0o644 });
    chmodSync(file, 0o644);
    await write(file, 'two', 0o600);
    t.equal(readFileSync(file, 'utf8'), 'two');
    t.equal(statSync(file).mode & 0o777, 0o600, 'mode applied to an existing file');
    await write(path.join(dir, 'pub.crt'), 'cert', 0o644);
    t.equal(statSync(path.join(dir, 'pub.crt')).mode & 0o777, 0o644);
    t.same(readdirSync(path.dirname(file)), ['state.json'], 'no temporary file left');
  });

  t.test(`${name}: a failure leaves the old content and no temporary file`, async (t) => {
    const dir = scratch(t);
    const target = path.join(dir, 'is-a-dir');
    mkdirSync(path.join(target, 'child'), { recursive: true });
    await t.rejects(Promise.resolve().then(() => write(target, 'x')), { code: /EISDIR|ENOTEMPTY|EEXIST/ });
    t.same(readdirSync(dir), ['is-a-dir'], 'temporary file removed');
  });
}

t.test('syncDir: a missing directory is an error, not silently ignored', async (t) => {
  await t.rejects(syncDir(path.join(tmpdir(), 'ec-fs-does-not-exist-' + process.pid)), { code: 'ENOENT' });
  await syncDir(tmpdir());
});

t.test('preadFully: the bytes asked at a position, into the target at an offset; fewer only at the end of the file', async (t) => {
  const file = path.join(scratch(t), 'data.bin');
  const data = Buffer.from(Array.from({ length: 1000 }, (_, i) => i % 251));
  writeFileSync(file, data);
  const fh = await open(file, 'r');
  t.teardown(() => fh.close());
  const target = Buffer.alloc(310, 0xee);
  t.equal(await preadFully(fh, target, 10, 300, 500), 300);
  t.ok(target.subarray(10, 310).equals(data.subarray(500, 800)), 'the range, at the offset');
  t.equal(target[9], 0xee, 'nothing written before the offset');
  t.equal(await preadFully(fh, Buffer.alloc(100), 0, 100, 950), 50, 'a short file: the bytes there were');
  t.equal(await preadFully(fh, Buffer.alloc(10), 0, 10, 2000), 0, 'past the end: none');
});
