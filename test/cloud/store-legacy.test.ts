/**
 * A store directory in the old format (index.jsonl + payloads/ID.bin, one file
 * per message) is imported on open: same seqs, payloads, dedup; an interrupted
 * import is redone; a directory holding both formats is refused with a message
 * that names the fix.
 */
import t from 'tap';
import path from 'node:path';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { silentLogger } from '../../core/logger.js';
import { CloudStore, type StoredEntry } from '../../cloud/store.js';
import { sha256Hex } from '../../protocol/codec.js';
import { tempDir } from '../helpers/daemon.js';

/** Write a store exactly as the old cloud/store.ts laid it out. */
function oldStore(dir: string, payloads: Buffer[], tail = ''): StoredEntry[] {
  mkdirSync(path.join(dir, 'payloads'), { recursive: true });
  mkdirSync(path.join(dir, 'partials'), { recursive: true });
  const entries = payloads.map((p, i) => {
    const e = { seq: i + 1, id: `old-${i}`, gateway_id: i % 2 ? 'gw-b' : 'gw-a', device_id: 'd1', topic: 'devices/d1/x', qos: 1 as const, size: p.length, sha256: sha256Hex(p), received_at: 1000 + i, stored_at: 2000 + i, payload_file: path.join('payloads', `old-${i}.bin`), content_type: 'text/plain' };
    writeFileSync(path.join(dir, e.payload_file), p);
    return e;
  });
  writeFileSync(path.join(dir, 'index.jsonl'), entries.map((e) => JSON.stringify(e) + '\n').join('') + tail);
  return entries;
}

t.test('an old-format store is imported on open and reads back the same', async (t) => {
  const dir = path.join(tempDir(t), 'store');
  const payloads = [Buffer.from('a'), Buffer.alloc(0), randomBytes(70_000), randomBytes(1_200_000), Buffer.from('e')];
  const old = oldStore(dir, payloads, '{"seq":6,"id":"torn');
  const s = new CloudStore(dir, silentLogger());
  await s.open();
  t.teardown(() => s.close());
  t.equal(s.count, 5, 'all complete lines imported, the torn tail ignored');
  t.ok(existsSync(path.join(dir, 'index.jsonl.imported')), 'old index kept, renamed');
  t.notOk(existsSync(path.join(dir, 'index.jsonl')));
  const got: StoredEntry[] = [];
  for await (const e of s.replay(10)) got.push(e);
  t.same(got.map((e) => [e.seq, e.id, e.gateway_id, e.size, e.sha256, e.received_at, e.stored_at, e.content_type]), old.map((e) => [e.seq, e.id, e.gateway_id, e.size, e.sha256, e.received_at, e.stored_at, e.content_type]));
  for (const [i, e] of got.entries()) t.ok((await s.readPayload(e)).equals(payloads[i]!), `payload ${i}`);
  t.ok(await s.isStored('gw-a', 'old-0'), 'imported ids are deduplicated');
  t.notOk(await s.isStored('gw-b', 'old-0'), '… per gateway');
  const e = await s.commitData('new-1', 'gw-a', { device_id: 'd1', topic: 't', qos: 1, received_at: 1 }, Buffer.from('n'), sha256Hex(Buffer.from('n')));
  t.equal(e.seq, 6, 'numbering continues');
  await s.close();
  const again = new CloudStore(dir, silentLogger());
  await again.open();
  t.teardown(() => again.close());
  t.equal(again.count, 6, 'a second open does not import again');
});

t.test('an interrupted import is redone; both formats at once are refused with the fix named', async (t) => {
  const dir = path.join(tempDir(t), 'store');
  oldStore(dir, [Buffer.from('x'), Buffer.from('y')]);
  // a crash mid-import leaves segments.import/ behind
  mkdirSync(path.join(dir, 'segments.import'), { recursive: true });
  writeFileSync(path.join(dir, 'segments.import', '00000000000000000001.seg'), 'garbage');
  const s = new CloudStore(dir, silentLogger());
  await s.open();
  t.equal(s.count, 2);
  await s.close();

  const both = path.join(tempDir(t), 'store');
  oldStore(both, [Buffer.from('x')]);
  mkdirSync(path.join(both, 'segments'));
  writeFileSync(path.join(both, 'segments', '00000000000000000001.seg'), '');
  const b = new CloudStore(both, silentLogger());
  await t.rejects(b.open(), { code: 'ECONN_JOURNAL_CORRUPT', message: /both the old format \(index\.jsonl\) and the new one.*move index\.jsonl and payloads\//s });
  t.ok(readFileSync(path.join(both, 'index.jsonl'), 'utf8').length > 0, 'nothing was changed');

  const missing = path.join(tempDir(t), 'store');
  oldStore(missing, [Buffer.from('x')]);
  const { rmSync } = await import('node:fs');
  rmSync(path.join(missing, 'payloads', 'old-0.bin'));
  const m = new CloudStore(missing, silentLogger());
  await t.rejects(m.open(), { code: 'ECONN_JOURNAL_IO', message: /payload of message old-0 .* cannot be read.*restore the file or remove its line/s });
  t.ok(existsSync(path.join(missing, 'index.jsonl')), 'the old store is untouched');
});
