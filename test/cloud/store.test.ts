import t from 'tap';
import { appendFileSync, existsSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { silentLogger } from '../../core/logger.js';
import { CloudStore, type Partial, type StoredEntry } from '../../cloud/store.js';
import { MessageAssembly, chunkMessage, sha256Hex, type MessageMeta } from '../../protocol/codec.js';
import { tempDir } from '../helpers/daemon.js';
import { checkFingerprints, decodeSegment, encodeFingerprints, encodeRecord, segmentName } from '../../cloud/store/format.js';

const META: MessageMeta = { device_id: 'd1', topic: 'devices/d1/x', qos: 1, received_at: 1 };

async function open(t: Tap, dir: string): Promise<CloudStore> {
  const s = new CloudStore(dir, silentLogger());
  await s.open();
  t.teardown(() => s.close());
  return s;
}
type Tap = { teardown(fn: () => unknown): void };

/** Feed chunks of a message into the store like the ingest does; commit when complete. */
async function feed(s: CloudStore, id: string, payload: Buffer, chunkSize: number, upToChunk?: number): Promise<StoredEntry | undefined> {
  const chunks = chunkMessage(id, META, payload, chunkSize);
  const p = await s.begin(id, 'gw', META, payload.length, MessageAssembly.begin(chunks[0]!));
  for (const c of chunks.slice(0, upToChunk ?? chunks.length)) {
    p.asm!.accept(c);
    await s.write(p, c.offset, c.data);
  }
  if (p.asm!.complete) return s.commit(p, sha256Hex(payload));
  return undefined;
}

t.test('stores, counts, replays; the directory is 0700', async (t) => {
  const dir = path.join(tempDir(t), 'store');
  const s = await open(t, dir);
  const stored: StoredEntry[] = [];
  s.on('stored', (e: StoredEntry) => stored.push(e));
  const payloads = [Buffer.alloc(0), Buffer.from('hello'), randomBytes(100_000)];
  const entries = await Promise.all(payloads.map((p, i) => feed(s, `m${i}`, p, 30_000)));
  t.equal(s.count, 3);
  t.same(stored.map((e) => e.seq).sort(), [1, 2, 3]);
  for (const [i, e] of entries.entries()) {
    t.equal(e!.sha256, sha256Hex(payloads[i]!));
    t.ok((await s.readPayload(e!)).equals(payloads[i]!));
  }
  t.ok(await s.isStored('gw', 'm1'));
  const replayed: string[] = [];
  for await (const e of s.replay(2)) replayed.push(e.id);
  t.equal(replayed.length, 2, 'replay stops at upTo');
  t.equal(statSync(dir).mode & 0o777, 0o700);
});

t.test('reopen: a torn segment tail is cut off; stored ids are remembered', async (t) => {
  const dir = path.join(tempDir(t), 'store');
  {
    const s = new CloudStore(dir, silentLogger());
    await s.open();
    await feed(s, 'a', Buffer.from('1'), 1024);
    await feed(s, 'b', Buffer.from('2'), 1024);
    await s.close();
  }
  const seg = path.join(dir, 'segments', segmentName(1));
  const good = statSync(seg).size;
  const torn = encodeRecord({ seq: 3, id: 'c', gateway_id: 'gw', device_id: 'd1', topic: 't', qos: 1, size: 3, sha256: 'x', received_at: 1, stored_at: 1 }, Buffer.from('abc'));
  appendFileSync(seg, torn.subarray(0, torn.length - 2));
  const s = await open(t, dir);
  t.equal(s.count, 2);
  t.ok((await s.isStored('gw', 'a')) && (await s.isStored('gw', 'b')));
  t.notOk(await s.isStored('gw', 'c'));
  t.equal(statSync(seg).size, good, 'tail cut at the last good record');
  const e = await feed(s, 'c', Buffer.from('3'), 1024);
  t.equal(e!.seq, 3, 'numbering continues');
});

t.test('reopen: a record with a bad CRC or a seq out of line ends the segment', async (t) => {
  const dir = path.join(tempDir(t), 'store');
  {
    const s = new CloudStore(dir, silentLogger());
    await s.open();
    for (const id of ['a', 'b', 'c']) await s.commitData(id, 'gw', META, Buffer.from(id), sha256Hex(Buffer.from(id)));
    await s.close();
  }
  const seg = path.join(dir, 'segments', segmentName(1));
  const recs = decodeSegment(readFileSync(seg));
  t.equal(recs.length, 3);
  const buf = readFileSync(seg);
  buf[buf.length - 1] ^= 0xff; // last payload byte of "c"
  writeFileSync(seg, buf);
  const s = await open(t, dir);
  t.equal(s.count, 2, 'the corrupt record and everything after it are cut');
  t.equal(statSync(seg).size, recs[2]!.pos);
  // a stray record with a seq that does not follow (left by a failed round) is not read back
  const stray = encodeRecord({ seq: 9, id: 'z', gateway_id: 'gw', device_id: 'd1', topic: 't', qos: 1, size: 0, sha256: 'x', received_at: 1, stored_at: 1 }, undefined);
  await s.close();
  appendFileSync(seg, stray);
  const s2 = await open(t, dir);
  t.equal(s2.count, 2);
  t.notOk(await s2.isStored('gw', 'z'));
});

t.test('partials: durable prefix survives a reopen, bytes beyond it are cut, unusable partials are dropped', async (t) => {
  const dir = path.join(tempDir(t), 'store');
  const payload = randomBytes(50_000);
  {
    const s = new CloudStore(dir, silentLogger());
    await s.open();
    await feed(s, 'p1', payload, 10_000, 2);
    const p = s.getPartial('p1')!;
    await s.persist(p);
    // a third chunk written but not persisted (crash before the progress point)
    const c3 = chunkMessage('p1', META, payload, 10_000)[2]!;
    p.asm!.accept(c3);
    await s.write(p, c3.offset, c3.data);
    await p.fh!.sync();
    // simulate a crash: do not close (which would persist); just drop the handle
    await p.fh!.close();
    delete p.fh;
  }
  writeFileSync(path.join(dir, 'partials', 'orphan.part'), 'x');
  writeFileSync(path.join(dir, 'partials', 'bad.json'), '{not json');
  writeFileSync(path.join(dir, 'partials', 'bad.part'), 'x');
  const s = await open(t, dir);
  const p = s.getPartial('p1')!;
  t.same([p.durableOffset, p.durableNextSeq, p.total], [20_000, 2, 50_000]);
  t.equal(statSync(path.join(dir, 'partials', 'p1.part')).size, 20_000, 'cut to the durable offset');
  t.same(s.partialsOf('gw', 10), [{ id: 'p1', offset: 20_000, next_seq: 2, total: 50_000 }]);
  t.same(s.partialsOf('other', 10), []);
  t.notOk(existsSync(path.join(dir, 'partials', 'orphan.part')), 'orphan data removed');
  t.notOk(existsSync(path.join(dir, 'partials', 'bad.json')), 'corrupt partial removed');
  await s.load(p);
  for (const c of chunkMessage('p1', META, payload, 10_000, 20_000, 2)) {
    p.asm!.accept(c);
    await s.write(p, c.offset, c.data);
  }
  const e = await s.commit(p, sha256Hex(payload));
  t.ok((await s.readPayload(e)).equals(payload), 'resumed from the durable prefix');
  t.equal(s.getPartial('p1'), undefined);
});

/** Begin and write a whole message without committing it. */
async function prepare(s: CloudStore, id: string, payload: Buffer): Promise<Partial> {
  const chunks = chunkMessage(id, META, payload, 64 * 1024);
  const p = await s.begin(id, 'gw', META, payload.length, MessageAssembly.begin(chunks[0]!));
  for (const c of chunks) {
    p.asm!.accept(c);
    await s.write(p, c.offset, c.data);
  }
  return p;
}

t.test('group commit: concurrent commits share fsync rounds; index order is commit order; ACK-able only when durable', async (t) => {
  const dir = path.join(tempDir(t), 'store');
  const s = await open(t, dir);
  const ids = Array.from({ length: 20 }, (_, i) => `g${i}`);
  const parts = await Promise.all(ids.map((id) => prepare(s, id, Buffer.from(id))));
  t.equal(s.rounds, 0);
  const all = parts.map((p) => s.commit(p, sha256Hex(Buffer.from(p.id))));
  t.ok(s.isCommitting('g0'), 'committing until durable');
  t.notOk(await s.isStored('gw', 'g0'), 'not stored before its round');
  const entries = await Promise.all(all);
  t.equal(s.rounds, 1, '20 commits queued together: one round (one segment write, one fdatasync)');
  t.same(entries.map((e) => e.seq), ids.map((_, i) => i + 1), 'seq in commit order');
  t.same(decodeSegment(readFileSync(path.join(dir, 'segments', segmentName(1)))).map((r) => r.entry.id), ids, 'segment in commit order');
  t.notOk(s.isCommitting('g0'));
  t.equal(s.count, 20);

  // commits made while a round is in flight all share the next round
  const [first, ...rest] = await Promise.all(Array.from({ length: 11 }, (_, i) => prepare(s, `h${i}`, Buffer.from(`h${i}`))));
  const firstDone = s.commit(first!, sha256Hex(Buffer.from('h0')));
  for (let i = 0; i < 1000 && s.rounds < 2; i++) await new Promise((r) => setImmediate(r));
  t.equal(s.rounds, 2, 'the first commit has its round');
  const later = rest.map((p) => s.commit(p, sha256Hex(Buffer.from(p.id))));
  await Promise.all([firstDone, ...later]);
  t.equal(s.rounds, 3, 'ten commits queued during (or after) that round share one more round');
  t.equal(s.count, 31);
  for (const e of await Promise.all(later)) t.ok(existsSync(path.join(dir, e.payload_file!)), `${e.id} payload in place`);
});

t.test('group commit: a failed round fails everything queued with or behind it, and onFail runs first, in order', async (t) => {
  const dir = path.join(tempDir(t), 'store');
  const s = await open(t, dir);
  const a = await prepare(s, 'fa', Buffer.from('a'));
  const b = await prepare(s, 'fb', Buffer.from('b'));
  rmSync(path.join(dir, 'partials', 'fa.part')); // the rename of the round fails
  const failed: string[] = [];
  const results = await Promise.allSettled([
    s.commit(a, sha256Hex(Buffer.from('a')), undefined, () => failed.push('fa')),
    s.commit(b, sha256Hex(Buffer.from('b')), undefined, () => failed.push('fb')),
  ]);
  t.same(results.map((r) => r.status), ['rejected', 'rejected']);
  t.match((results[0] as PromiseRejectedResult).reason, { code: 'ECONN_JOURNAL_IO' });
  t.same(failed, ['fa', 'fb'], 'onFail in queue order');
  t.equal(s.count, 0);
  t.notOk(await s.isStored('gw', 'fb'), 'nothing behind a failed message is stored');
  // the store goes on
  const e = await feed(s, 'fc', Buffer.from('c'), 1024);
  t.equal(e!.seq, 1);
});

t.test('commitData: a one-chunk message from memory shares the round with assembled ones, in call order', async (t) => {
  const dir = path.join(tempDir(t), 'store');
  const s = await open(t, dir);
  const big = randomBytes(100_000);
  const p = await prepare(s, 'asm', big);
  const results = await Promise.all([
    s.commitData('mem-1', 'gw', META, Buffer.from('one'), sha256Hex(Buffer.from('one'))),
    s.commit(p, sha256Hex(big)),
    s.commitData('mem-2', 'gw', META, Buffer.alloc(0), sha256Hex(Buffer.alloc(0))),
  ]);
  t.equal(s.rounds, 1);
  t.same(results.map((e) => [e.id, e.seq, e.size]), [['mem-1', 1, 3], ['asm', 2, 100_000], ['mem-2', 3, 0]]);
  t.same(await s.readPayload(results[0]), Buffer.from('one'));
  t.ok((await s.readPayload(results[1])).equals(big));
  t.equal((await s.readPayload(results[2])).length, 0);
  await prepare(s, 'busy', Buffer.from('b'));
  await t.rejects(s.commitData('busy', 'gw', META, Buffer.from('b'), sha256Hex(Buffer.from('b'))), { code: 'ECONN_JOURNAL_IO' }, 'refused while a partial of the id is in progress');
});

t.test('persist in the background: it records the offset reached when it was called while writes go on; a commit and a discard wait for it', async (t) => {
  const dir = path.join(tempDir(t), 'store');
  const payload = randomBytes(60_000);
  const chunks = chunkMessage('bg', META, payload, 10_000);
  const s = await open(t, dir);
  const p = await s.begin('bg', 'gw', META, payload.length, MessageAssembly.begin(chunks[0]!));
  for (const c of chunks.slice(0, 2)) {
    p.asm!.accept(c);
    await s.write(p, c.offset, c.data);
  }
  const first = s.persist(p);
  t.ok(p.persisting, 'a persist is in progress');
  // the ingest goes on receiving while it runs
  for (const c of chunks.slice(2, 4)) {
    p.asm!.accept(c);
    await s.write(p, c.offset, c.data);
  }
  await first;
  t.same([p.durableOffset, p.durableNextSeq], [20_000, 2], 'the offset of the call, not of the writes that followed');
  const rec = JSON.parse(readFileSync(path.join(dir, 'partials', 'bg.json'), 'utf8')) as { offset: number; next_seq: number };
  t.same([rec.offset, rec.next_seq], [20_000, 2], 'and so on disk');
  await new Promise((r) => setImmediate(r));
  t.equal(p.persisting, undefined, 'none in progress once it resolved');
  // a persist still running when the message completes: its record is written before the commit, never after
  const second = s.persist(p);
  for (const c of chunks.slice(4)) {
    p.asm!.accept(c);
    await s.write(p, c.offset, c.data);
  }
  const e = await s.commit(p, sha256Hex(payload));
  await second;
  t.ok((await s.readPayload(e)).equals(payload), 'stored whole');
  t.notOk(existsSync(path.join(dir, 'partials', 'bg.json')), 'no partial record left behind the stored message');
  t.equal(s.getPartial('bg'), undefined);
  // a discard waits for the persist in progress: no record reappears after it
  const c0 = chunkMessage('gone', META, payload, 10_000)[0]!;
  const q = await s.begin('gone', 'gw', META, payload.length, MessageAssembly.begin(c0));
  q.asm!.accept(c0);
  await s.write(q, c0.offset, c0.data);
  const third = s.persist(q);
  await s.discard('gone');
  await third;
  t.notOk(existsSync(path.join(dir, 'partials', 'gone.json')), 'discarded: no record');
  t.notOk(existsSync(path.join(dir, 'partials', 'gone.part')), 'discarded: no data');
});

t.test('fingerprint sidecar: entries sorted by (hi, lo), equal keys in insertion order, as a comparator sort gives them', async (t) => {
  let seed = 12345;
  const rnd = (): number => (seed = (Math.imul(seed, 1103515245) + 12345) >>> 0);
  const flat: number[] = [];
  for (let i = 0; i < 5000; i++) {
    // few distinct values in some fields so that every radix digit and equal keys are exercised
    const hi = i % 7 === 0 ? 0xffffffff : i % 5 === 0 ? rnd() & 0xffff : rnd();
    const lo = i % 3 === 0 ? 0x10000 * (rnd() % 4) : rnd();
    flat.push(hi, lo, i);
  }
  flat.push(flat[0]!, flat[1]!, 5000, flat[3]!, flat[4]!, 5001); // exact duplicates of keys seen earlier
  const triples = Array.from({ length: flat.length / 3 }, (_, i) => ({ hi: flat[3 * i]!, lo: flat[3 * i + 1]!, pos: flat[3 * i + 2]! }));
  const want = [...triples].sort((a, b) => a.hi - b.hi || a.lo - b.lo);
  const buf = encodeFingerprints(flat, 123_456);
  t.equal(checkFingerprints(buf, 123_456), triples.length, 'a valid sidecar of every entry');
  const got = Array.from({ length: triples.length }, (_, i) => ({ hi: buf.readUInt32BE(16 + 12 * i), lo: buf.readUInt32BE(20 + 12 * i), pos: buf.readUInt32BE(24 + 12 * i) }));
  t.same(got, want, 'same order as the comparator sort');
  t.equal(encodeFingerprints([], 0).length, 16, 'an empty segment: the header alone');
});

t.test('commits that arrive while a segment is being rolled wait for the next round; none is refused', async (t) => {
  const dir = path.join(tempDir(t), 'store');
  const s = new CloudStore(dir, silentLogger(), { segmentRecords: 5 });
  await s.open();
  t.teardown(() => s.close());
  // one commit per turn of the event loop, without waiting for the earlier ones, as frames from the network
  // arrive: many land while a round is rolling the segment over (every 5 records) and waits for the disk
  const results: Promise<unknown>[] = [];
  // bounded by time (10 s) and a generous count: on a loaded machine an fsync round takes long enough that
  // 20 000 commits (one turn each, ~1 s) were all queued after 7 rolls
  const until = Date.now() + 10_000;
  for (let i = 0; i < 200_000 && s.stats().sealedSegments < 10 && Date.now() < until; i++) {
    const p = Buffer.from(`m${i}`);
    results.push(s.commitData(`m${i}`, 'gw', META, p, sha256Hex(p)));
    await new Promise((r) => setImmediate(r));
  }
  const settled = await Promise.allSettled(results);
  const refused = settled.filter((r) => r.status === 'rejected').map((r) => String((r as PromiseRejectedResult).reason?.message));
  t.same(refused.slice(0, 3), [], `no commit refused (${refused.length} were)`);
  t.equal(s.count, results.length, `all ${results.length} stored`);
  t.ok(s.stats().sealedSegments >= 10, `rolled ${s.stats().sealedSegments} times meanwhile`);
});

t.test('partial expiry: a partial no chunk reached for the TTL is dropped with its files; its age survives a reopen', async (t) => {
  const dir = path.join(tempDir(t), 'store');
  let s = await open(t, dir);
  await feed(s, 'old-1', randomBytes(300_000), 100_000, 2);
  await s.persist(s.getPartial('old-1')!);
  t.same(await s.expirePartials(60_000), [], 'young: kept');
  t.ok(s.getPartial('old-1'), 'still held');
  await s.close();
  s = await open(t, dir);
  const p = s.getPartial('old-1');
  t.ok(p, 'held after a reopen');
  t.ok(p!.lastTouched <= Date.now() && p!.lastTouched > Date.now() - 60_000, 'its age comes from its durable state, not from the reopen');
  await feed(s, 'new-1', randomBytes(300_000), 100_000, 1);
  const later = p!.lastTouched + 10_000;
  s.getPartial('new-1')!.lastTouched = later; // a chunk of it arrived "later"
  t.same(await s.expirePartials(5_000, later + 1), ['old-1'], 'only the one idle longer than the TTL goes');
  t.notOk(s.getPartial('old-1'));
  t.notOk(existsSync(path.join(dir, 'partials', 'old-1.part')), 'its data file is gone');
  t.notOk(existsSync(path.join(dir, 'partials', 'old-1.json')), 'its state file is gone');
  t.ok(s.getPartial('new-1'), 'the recent one stays');
});
