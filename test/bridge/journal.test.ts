import t, { type Test } from 'tap';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, readdirSync, readFileSync, rmSync, statSync, truncateSync, writeFileSync, openSync, writeSync, closeSync } from 'node:fs';
import path from 'node:path';
import { Writable } from 'node:stream';
import { Registry } from 'prom-client';
import { Journal, type IncomingUpload, type JournalConfig, type JournalRecord } from '../../bridge/journal.js';
import { createLogger } from '../../core/logger.js';
import { errorCode } from '../../core/errors.js';
import type { UplinkMessageMeta } from '../../core/ports.js';
import { tempDir } from '../helpers/daemon.js';
import { appendUntilKilled } from '../helpers/journal-child.js';
import { DoneSet, SEGMENT_HEADER_BYTES as SEG_HEADER, parseAckRegion } from '../../bridge/journal/format.js';

type Tap = Test;
type LogLine = Record<string, unknown> & { msg?: string; code?: string };

const MiB = 1024 * 1024;

function config(over: Partial<JournalConfig> = {}): JournalConfig {
  return {
    max_bytes: 256 * MiB,
    overflow: 'reject',
    ttl_s: 0,
    max_message_bytes: 64 * MiB,
    segment_bytes: 65536,
    fsync: 'batch',
    fsync_max_delay_ms: 2,
    memory_cache_bytes: 8 * MiB,
    max_uploads_per_device: 4,
    ...over,
  };
}

function meta(deviceId = 'dev1', topic = `devices/${deviceId}/up`): UplinkMessageMeta {
  return { deviceId, topic, qos: 1, receivedAt: 1_700_000_000_000 };
}

interface Opened {
  j: Journal;
  registry: Registry;
  logs: LogLine[];
}

function make(t: Tap, dir: string, over: Partial<JournalConfig> = {}, now?: () => number): Opened {
  const logs: LogLine[] = [];
  const destination = new Writable({
    write(chunk: Buffer, _enc, cb) {
      for (const line of chunk.toString().split('\n')) if (line) logs.push(JSON.parse(line) as LogLine);
      cb();
    },
  });
  const registry = new Registry();
  const j = new Journal({ dir, config: config(over), logger: createLogger({ level: 'debug', destination }), metrics: registry, ...(now ? { now } : {}) });
  t.teardown(() => j.close());
  return { j, registry, logs };
}

async function open(t: Tap, dir: string, over: Partial<JournalConfig> = {}, now?: () => number): Promise<Opened> {
  const o = make(t, dir, over, now);
  await o.j.start();
  return o;
}

async function counter(registry: Registry, name: string, labels: Record<string, string> = {}): Promise<number> {
  const m = registry.getSingleMetric(name);
  if (!m) throw new Error(`no metric ${name}`);
  const v = await m.get();
  return v.values.filter((x) => Object.entries(labels).every(([k, val]) => x.labels[k] === val)).reduce((a, x) => a + x.value, 0);
}

function segments(dir: string): string[] {
  return readdirSync(dir).filter((n) => /^seg-\d+\.log$/.test(n)).sort();
}

async function payloads(j: Journal, recs: readonly JournalRecord[]): Promise<string[]> {
  return Promise.all(recs.map(async (r) => (await j.readPayload(r)).toString()));
}

async function* chunks(total: number, size: number, seed = 1): AsyncGenerator<Buffer> {
  let sent = 0;
  let i = seed;
  while (sent < total) {
    const n = Math.min(size, total - sent);
    const b = Buffer.alloc(n, i++ & 0xff);
    sent += n;
    yield b;
  }
}

function sha(total: number, size: number, seed = 1): Buffer {
  const h = createHash('sha256');
  let sent = 0;
  let i = seed;
  while (sent < total) {
    const n = Math.min(size, total - sent);
    h.update(Buffer.alloc(n, i++ & 0xff));
    sent += n;
  }
  return h.digest();
}

async function rejectsCode(t: Tap, p: Promise<unknown>, code: string, msg: string): Promise<void> {
  try {
    await p;
    t.fail(`${msg}: expected ${code}, it resolved`);
  } catch (err) {
    t.equal(errorCode(err), code, msg);
  }
}

t.test('append, restart, same records in order with stable ids and payloads', async (t) => {
  const dir = tempDir(t);
  const a = await open(t, dir);
  const ids: string[] = [];
  for (let i = 0; i < 20; i++) ids.push((await a.j.append(meta(), Buffer.from(`m${i}`))).id);
  t.equal(new Set(ids).size, 20, 'ids are unique');
  const r0 = await a.j.append(meta('dev2'), Buffer.alloc(0));
  t.equal(r0.size, 0);
  t.equal(r0.sha256, createHash('sha256').update(Buffer.alloc(0)).digest('hex'));
  const before = a.j.pending();
  t.same(before.map((r) => r.id), [...ids, r0.id]);
  t.same(before.map((r) => r.seq), [...before.map((r) => r.seq)].sort((x, y) => x - y), 'seq in append order');
  await a.j.close();

  const b = await open(t, dir);
  const after = b.j.pending();
  t.same(after.map((r) => r.id), [...ids, r0.id], 'same ids after restart');
  t.same(await payloads(b.j, after.slice(0, 20)), ids.map((_, i) => `m${i}`));
  t.same(after[20]!.meta, meta('dev2'));
  const next = await b.j.append(meta(), Buffer.from('new'));
  t.notOk(ids.includes(next.id), 'a new id after restart');
  const all = b.j.pending();
  t.equal(all[all.length - 1]!.id, next.id, 'new record is last');
  t.ok(all[all.length - 1]!.seq > all[all.length - 2]!.seq);
  t.equal(b.j.get(next.id)?.size, 3);
  t.equal(b.j.first()?.id, ids[0]);
  t.same(b.j.pending(all[5]!.seq, 2).map((r) => r.id), [all[6]!.id, all[7]!.id], 'pending(afterSeq, limit)');
  t.equal((await b.j.readPayload(all[3]!, 1, 2)).toString(), '3', 'byte range');
});

t.test('cachedPayload: a record written recently is served from memory, synchronously, until it is acknowledged', async (t) => {
  const a = await open(t, tempDir(t));
  const r = await a.j.append(meta(), Buffer.from('hot'));
  const rec = a.j.pending().find((x) => x.id === r.id)!;
  t.equal(a.j.cachedPayload(rec)?.toString(), 'hot', 'in memory after the append');
  t.equal(a.j.cachedPayload({ ...rec }), undefined, 'only for the record object the journal handed out');
  await a.j.ack(r.id);
  t.equal(a.j.cachedPayload(rec), undefined, 'gone once acknowledged');
  const big = await a.j.append(meta(), Buffer.alloc(a.j.stats().pendingBytes + 2 * 1024 * 1024, 1));
  const bigRec = a.j.pending().find((x) => x.id === big.id)!;
  t.equal(a.j.cachedPayload(bigRec), undefined, 'a payload above the cache share is never cached (read from disk instead)');
});

t.test('a torn tail is truncated at the last good record and logged', async (t) => {
  const dir = tempDir(t);
  const a = await open(t, dir);
  for (let i = 0; i < 5; i++) await a.j.append(meta(), Buffer.from(`rec-${i}-`.padEnd(100, 'x')));
  await a.j.close();
  const [seg] = segments(dir);
  const file = path.join(dir, seg!);
  const size = statSync(file).size;
  truncateSync(file, size - 30); // half of the last record
  const b = await open(t, dir);
  const recs = b.j.pending();
  t.equal(recs.length, 4, 'four complete records survive');
  t.same((await payloads(b.j, recs)).map((p) => p.slice(0, 6)), ['rec-0-', 'rec-1-', 'rec-2-', 'rec-3-']);
  const corrupt = b.logs.filter((l) => l.code === 'ECONN_JOURNAL_CORRUPT');
  t.equal(corrupt.length, 1, 'logged once with ECONN_JOURNAL_CORRUPT');
  t.match(corrupt[0], { segment: seg, reason: /torn/ });
  t.equal(statSync(file).size, SEG_HEADER + ((size - SEG_HEADER) / 5) * 4, 'file truncated to four records');
  t.equal(await counter(b.registry, 'connector_journal_corrupt_truncations_total'), 1);
  // the journal keeps working and a further restart is clean
  await b.j.append(meta(), Buffer.from('after'));
  await b.j.close();
  const c = await open(t, dir);
  t.equal(c.j.pending().length, 5);
  t.equal(c.logs.filter((l) => l.code === 'ECONN_JOURNAL_CORRUPT').length, 0, 'no corruption on the next start');
});

t.test('a bad checksum in the middle of a segment cuts only that record (resynchronised on the next valid one); the cut bytes are kept aside and counted', async (t) => {
  // issue 9 #5: before, one corrupt record dropped every later record of its segment, uncounted
  const dir = tempDir(t);
  const a = await open(t, dir);
  for (let i = 0; i < 10; i++) await a.j.append(meta(), Buffer.from(`payload-${i}`.padEnd(200, '.')));
  await a.j.close();
  const [seg] = segments(dir);
  const file = path.join(dir, seg!);
  const recLen = (statSync(file).size - SEG_HEADER) / 10;
  const fd = openSync(file, 'r+');
  writeSync(fd, Buffer.from('GARBAGE'), 0, 7, SEG_HEADER + recLen * 6 + recLen - 20); // inside the payload of record 7
  closeSync(fd);
  rmSync(path.join(dir, seg!.replace(/\.log$/, '.idx')), { force: true }); // as after a crash: no index, the segment is scanned
  const b = await open(t, dir);
  const recs = b.j.pending();
  t.equal(recs.length, 9, 'every record but the corrupt one survives');
  t.same((await payloads(b.j, recs)).map((p) => p.split('.')[0]), [0, 1, 2, 3, 4, 5, 7, 8, 9].map((i) => `payload-${i}`));
  t.match(b.logs.find((l) => l.code === 'ECONN_JOURNAL_CORRUPT'), { reason: /checksum/, offset: SEG_HEADER + recLen * 6, droppedBytes: recLen });
  const q = readdirSync(path.join(dir, 'quarantine'));
  t.equal(q.filter((n) => n.startsWith('corrupt-')).length, 1, 'cut bytes saved under quarantine/');
  t.equal(statSync(path.join(dir, 'quarantine', q[0]!)).size, recLen);
  t.equal(await counter(b.registry, 'connector_journal_corrupt_bytes_total'), recLen, 'what was cut is counted');
  t.equal(statSync(file).size, SEG_HEADER + recLen * 10, 'nothing truncated: the records after it stay');
});

t.test('garbage appended after valid records, and a garbage-only segment', async (t) => {
  const dir = tempDir(t);
  const a = await open(t, dir);
  await a.j.append(meta(), Buffer.from('one'));
  await a.j.append(meta(), Buffer.from('two'));
  await a.j.close();
  const [seg] = segments(dir);
  writeFileSync(path.join(dir, seg!), randomBytes(300), { flag: 'a' });
  writeFileSync(path.join(dir, 'seg-9999999999999999.log'), randomBytes(500));
  const b = await open(t, dir);
  t.same(await payloads(b.j, b.j.pending()), ['one', 'two']);
  t.equal(b.logs.filter((l) => l.code === 'ECONN_JOURNAL_CORRUPT').length, 2);
  t.notOk(existsSync(path.join(dir, 'seg-9999999999999999.log')), 'empty segment removed');
  await b.j.append(meta(), Buffer.from('three'));
  await b.j.close();
  const c = await open(t, dir);
  t.same(await payloads(c.j, c.j.pending()), ['one', 'two', 'three']);
});

t.test('acks persist across restarts, selective acks included; unknown ids are no-ops', async (t) => {
  const dir = tempDir(t);
  const a = await open(t, dir);
  const ids: string[] = [];
  for (let i = 0; i < 10; i++) ids.push((await a.j.append(meta(), Buffer.from(`m${i}`))).id);
  await a.j.ack(ids[0]!);
  await a.j.ack(ids[1]!);
  await a.j.ack(ids[5]!); // selective
  await a.j.ack(ids[7]!);
  await a.j.ack('nope-1-1');
  await a.j.ack(ids[0]!); // twice
  t.same(a.j.pending().map((r) => r.id), [2, 3, 4, 6, 8, 9].map((i) => ids[i]));
  t.equal(a.j.stats().pendingMessages, 6);
  await rejectsCode(t, a.j.readPayload({ ...a.j.pending()[0]!, id: ids[0]! }), 'ECONN_NOT_FOUND', 'payload of an acked record is gone');
  // no close: ack() resolved means persisted, so a crash now keeps the acks
  const ackLog = readFileSync(path.join(dir, 'ack.log'));
  const region = parseAckRegion(ackLog.subarray(0, ackLog.length / 2))!;
  t.ok(region.ranges.length >= 2, 'selective acks are in ack.log');
  const b = await open(t, dir);
  t.same(b.j.pending().map((r) => r.id), [2, 3, 4, 6, 8, 9].map((i) => ids[i]), 'acked records do not come back');
  await a.j.close();
  for (const i of [2, 3, 4, 6]) await b.j.ack(ids[i]!);
  await b.j.close();
  const c = await open(t, dir);
  t.same(c.j.pending().map((r) => r.id), [ids[8], ids[9]]);
  const next = await c.j.append(meta(), Buffer.from('x'));
  t.notOk(ids.includes(next.id));
});

t.test('segments are deleted once everything in them is acknowledged', async (t) => {
  const dir = tempDir(t);
  const a = await open(t, dir, { segment_bytes: 65536 });
  const recs = [];
  for (let i = 0; i < 40; i++) recs.push(await a.j.append(meta(), Buffer.alloc(8000, i)));
  const segs = segments(dir);
  t.ok(segs.length >= 4, `several segments (${segs.length})`);
  const firstSeg = segs[0]!;
  // ack everything except the last record: every closed segment goes
  for (const r of recs.slice(0, 39)) void a.j.ack(r.id);
  await a.j.ack(recs[38]!.id);
  const left = segments(dir);
  t.notOk(left.includes(firstSeg), 'first segment deleted');
  t.equal(left.length, 1, 'only the active segment is left');
  t.equal(a.j.stats().pendingMessages, 1);
  t.ok(a.j.stats().diskBytes < 70000, `disk bytes shrink (${a.j.stats().diskBytes})`);
  // a partially acked segment stays
  await a.j.close();
  const b = await open(t, dir);
  t.same(b.j.pending().map((r) => r.id), [recs[39]!.id]);
  t.same((await b.j.readPayload(b.j.pending()[0]!)).subarray(0, 3), Buffer.alloc(3, 39));
  await b.j.ack(recs[39]!.id);
  await b.j.close();
  const c = await open(t, dir);
  t.equal(segments(dir).length, 0, 'a fully acknowledged journal keeps no segment after restart');
  t.equal(c.j.pending().length, 0);
  const n = await c.j.append(meta(), Buffer.from('z'));
  t.notOk(recs.some((r) => r.id === n.id), 'ids not reused after every segment was deleted');
});

t.test('quarantine: moved to journal/quarantine with its reason, counted, logged, out of the queue', async (t) => {
  const dir = tempDir(t);
  const a = await open(t, dir);
  const bad = await a.j.append(meta(), Buffer.from('poison'));
  const good = await a.j.append(meta(), Buffer.from('fine'));
  const big = await a.j.appendStream(meta(), chunks(300_000, 65536), { maxBytes: MiB });
  const removed: unknown[] = [];
  a.j.on('removed', (e) => removed.push(e));
  await a.j.quarantine(bad.id, 'schema violation: field x');
  await a.j.quarantine(big.id, 'too big for the cloud');
  await a.j.quarantine('unknown-1-1', 'whatever'); // no-op
  t.same(a.j.pending().map((r) => r.id), [good.id], 'queue not blocked');
  const info = JSON.parse(readFileSync(path.join(dir, 'quarantine', `${bad.id}.json`), 'utf8')) as Record<string, unknown>;
  t.match(info, { id: bad.id, reason: 'schema violation: field x', size: 6, meta: { deviceId: 'dev1' } });
  t.equal(readFileSync(path.join(dir, 'quarantine', `${bad.id}.bin`), 'utf8'), 'poison');
  t.equal(statSync(path.join(dir, 'quarantine', `${big.id}.bin`)).size, 300_000);
  t.equal(await counter(a.registry, 'connector_journal_quarantined_total'), 2);
  t.equal(a.j.stats().quarantined, 2);
  t.same(removed, [
    { id: bad.id, seq: 0, reason: 'quarantine' },
    { id: big.id, seq: 2, reason: 'quarantine' },
  ]);
  t.ok(a.logs.some((l) => l.msg?.includes('quarantined') && l.reason === 'schema violation: field x'));
  t.equal(readdirSync(path.join(dir, 'blobs')).length, 0, 'blob of the quarantined record released from the queue');
  const b = await open(t, dir);
  await a.j.close();
  t.same(b.j.pending().map((r) => r.id), [good.id], 'quarantined records do not come back');
});

t.test('overflow=reject: ECONN_JOURNAL_FULL when the cap is reached, room again after acks', async (t) => {
  const dir = tempDir(t);
  const a = await open(t, dir, { max_bytes: MiB, segment_bytes: 65536 });
  const ok: string[] = [];
  let full: unknown;
  for (let i = 0; i < 40 && !full; i++) {
    try {
      ok.push((await a.j.append(meta(), Buffer.alloc(50_000, i))).id);
    } catch (err) {
      full = err;
    }
  }
  t.equal(errorCode(full), 'ECONN_JOURNAL_FULL');
  t.ok(ok.length >= 15 && ok.length <= 21, `accepted up to the cap (${ok.length})`);
  t.equal(a.j.stats().dropped, 0, 'nothing dropped');
  t.ok(a.j.stats().pendingBytes <= MiB);
  await rejectsCode(t, a.j.appendStream(meta(), chunks(200_000, 65536), { maxBytes: MiB }), 'ECONN_JOURNAL_FULL', 'streams are refused too');
  t.equal(readdirSync(path.join(dir, 'tmp')).length, 0, 'no staging file left');
  for (const id of ok.slice(0, 5)) await a.j.ack(id);
  await a.j.append(meta(), Buffer.alloc(50_000, 1));
  t.equal(a.j.stats().pendingMessages, ok.length - 5 + 1);
  // a message bigger than the whole cap can never fit
  await rejectsCode(t, a.j.append(meta(), Buffer.alloc(MiB + 1)), 'ECONN_PAYLOAD_TOO_LARGE', 'bigger than max_bytes');
});

t.test('overflow=drop-oldest: oldest dropped to make room, counted by reason, logged, event', async (t) => {
  const dir = tempDir(t);
  const a = await open(t, dir, { max_bytes: MiB, overflow: 'drop-oldest', segment_bytes: 65536 });
  const removed: Array<{ id: string; reason: string }> = [];
  a.j.on('removed', (e: { id: string; reason: string }) => removed.push(e));
  const ids: string[] = [];
  for (let i = 0; i < 60; i++) ids.push((await a.j.append(meta(), Buffer.alloc(50_000, i))).id);
  const pend = a.j.pending(-1, 1000).map((r) => r.id);
  t.ok(pend.length > 10 && pend.length < 60, `some kept (${pend.length})`);
  t.same(pend, ids.slice(ids.length - pend.length), 'the newest are kept, in order');
  const dropped = await counter(a.registry, 'connector_journal_dropped_total', { reason: 'overflow' });
  t.equal(dropped, 60 - pend.length, 'every drop counted with reason overflow');
  t.equal(a.j.stats().droppedByReason.overflow, dropped);
  t.same(removed.map((r) => r.id), ids.slice(0, dropped));
  t.ok(removed.every((r) => r.reason === 'overflow'));
  t.ok(a.logs.some((l) => l.reason === 'overflow' && typeof l.dropped === 'number'), 'logged');
  t.ok(a.j.stats().pendingBytes <= MiB);
  await a.j.close();
  const b = await open(t, dir, { max_bytes: MiB, overflow: 'drop-oldest' });
  t.same(b.j.pending(-1, 1000).map((r) => r.id), pend, 'drops are persistent');
});

t.test('TTL: records older than ttl_s are dropped by the sweep and when read (injected clock)', async (t) => {
  const dir = tempDir(t);
  let now = 1_000_000;
  const a = await open(t, dir, { ttl_s: 60 }, () => now);
  const old1 = await a.j.append(meta(), Buffer.from('old1'));
  const old2 = await a.j.append(meta(), Buffer.from('old2'));
  now += 30_000;
  const mid = await a.j.append(meta(), Buffer.from('mid'));
  t.equal(a.j.stats().oldestPendingAgeMs, 30_000);
  now += 31_000; // old ones are 61 s old, mid 31 s
  t.equal(a.j.sweep(), 2, 'sweep drops the two expired records');
  t.same(a.j.pending().map((r) => r.id), [mid.id]);
  t.equal(await counter(a.registry, 'connector_journal_dropped_total', { reason: 'ttl' }), 2);
  t.ok(a.logs.some((l) => l.reason === 'ttl'));
  t.notOk(a.j.get(old1.id) ?? a.j.get(old2.id));
  now += 30_000; // mid is 61 s old: reading drops it without a sweep
  t.same(a.j.pending(), [], 'expired record not returned by pending()');
  t.equal(a.j.stats().droppedByReason.ttl, 3);
  await a.j.close();
  const b = await open(t, dir, { ttl_s: 60 }, () => now);
  t.equal(b.j.pending().length, 0, 'TTL drops persist');
  // ttl 0 = never
  const c = await open(t, tempDir(t), { ttl_s: 0 }, () => now);
  await c.j.append(meta(), Buffer.from('x'));
  now += 1e12;
  t.equal(c.j.sweep(), 0);
  t.equal(c.j.pending().length, 1);
});

t.test('appendStream: large payload streamed to a blob with a good digest, readable in ranges and as a stream', async (t) => {
  const dir = tempDir(t);
  const a = await open(t, dir);
  const total = 5 * MiB + 123;
  const digest = sha(total, 65536);
  const r = await a.j.appendStream({ ...meta(), contentType: 'application/octet-stream' }, chunks(total, 65536), { maxBytes: 10 * MiB, expectedSha256: digest });
  t.equal(r.size, total);
  t.equal(r.sha256, digest.toString('hex'));
  t.equal(readdirSync(path.join(dir, 'blobs')).length, 1, 'payload in a blob file');
  t.equal(readdirSync(path.join(dir, 'tmp')).length, 0);
  const rec = a.j.get(r.id)!;
  t.equal(rec.meta.contentType, 'application/octet-stream');
  const mid = await a.j.readPayload(rec, 65530, 65542);
  t.same(mid, Buffer.concat([Buffer.alloc(6, 1), Buffer.alloc(6, 2)]), 'range across a chunk boundary');
  const h = createHash('sha256');
  for await (const c of a.j.createPayloadStream(rec)) h.update(c as Buffer);
  t.equal(h.digest('hex'), r.sha256, 'stream of the whole payload');
  const tail = createHash('sha256');
  let n = 0;
  for await (const c of a.j.createPayloadStream(rec, total - 1000)) {
    tail.update(c as Buffer);
    n += (c as Buffer).length;
  }
  t.equal(n, 1000, 'stream from an offset (resume)');
  // small body without a digest goes inline
  const small = await a.j.appendStream(meta(), chunks(1000, 100), { maxBytes: MiB });
  t.equal(readdirSync(path.join(dir, 'blobs')).length, 1, 'small stream stays inline');
  t.same(await a.j.readPayload(a.j.get(small.id)!), Buffer.concat([...Array(10).keys()].map((i) => Buffer.alloc(100, i + 1))));
  // Uint8Array chunks
  const u8 = await a.j.appendStream(meta(), (async function* () {
    yield new Uint8Array([1, 2, 3]);
  })(), { maxBytes: 10 });
  t.equal(u8.size, 3);
  // a large plain append() also goes to a blob
  const bigAppend = await a.j.append(meta(), Buffer.alloc(2 * MiB, 7));
  t.equal(readdirSync(path.join(dir, 'blobs')).length, 2);
  t.equal((await a.j.readPayload(a.j.get(bigAppend.id)!, 2 * MiB - 1)).toString('hex'), '07');
  await a.j.close();
  const b = await open(t, dir);
  const again = b.j.get(r.id)!;
  t.equal(again.size, total, 'blob record survives restart');
  t.same(await b.j.readPayload(again, total - 3), Buffer.alloc(3, (Math.ceil(total / 65536)) & 0xff));
  await b.j.ack(r.id);
  t.equal(readdirSync(path.join(dir, 'blobs')).length, 1, 'blob deleted after ack');
  t.equal(b.j.pending().map((x) => x.id).join(), [small.id, u8.id, bigAppend.id].join());
});

t.test('append: large MQTT payloads go to blobs and do not count against max_uploads_per_device', async (t) => {
  const dir = tempDir(t);
  const a = await open(t, dir);
  const payloads = Array.from({ length: 6 }, (_, i) => Buffer.alloc(2 * MiB, i + 1));
  const rs = await Promise.all(payloads.map((p) => a.j.append(meta(), p)));
  t.equal(rs.length, 6, 'six concurrent 2 MiB appends of one device, over the limit of 4 uploads');
  t.equal(readdirSync(path.join(dir, 'blobs')).length, 6);
  for (const [i, r] of rs.entries()) t.equal(r.sha256, createHash('sha256').update(payloads[i]!).digest('hex'), `digest ${i}`);
});

t.test('appendStream: digest mismatch and over-limit keep nothing', async (t) => {
  const dir = tempDir(t);
  const a = await open(t, dir, { max_message_bytes: 3 * MiB });
  const before = a.j.stats();
  await rejectsCode(t, a.j.appendStream(meta(), chunks(2 * MiB, 65536), { maxBytes: 10 * MiB, expectedSha256: Buffer.alloc(32) }), 'ECONN_DIGEST_MISMATCH', 'large body, wrong digest');
  await rejectsCode(t, a.j.appendStream(meta(), chunks(100, 10), { maxBytes: 10 * MiB, expectedSha256: Buffer.alloc(32) }), 'ECONN_DIGEST_MISMATCH', 'small body, wrong digest');
  await rejectsCode(t, a.j.appendStream(meta(), chunks(100, 10), { maxBytes: 10 * MiB, expectedSha256: Buffer.alloc(5) }), 'ECONN_DIGEST_MISMATCH', 'digest of the wrong length');
  await rejectsCode(t, a.j.appendStream(meta(), chunks(2 * MiB, 65536), { maxBytes: MiB }), 'ECONN_PAYLOAD_TOO_LARGE', 'over maxBytes');
  await rejectsCode(t, a.j.appendStream(meta(), chunks(4 * MiB, 65536), { maxBytes: 10 * MiB }), 'ECONN_PAYLOAD_TOO_LARGE', 'over max_message_bytes');
  await rejectsCode(t, a.j.append(meta(), Buffer.alloc(3 * MiB + 1)), 'ECONN_PAYLOAD_TOO_LARGE', 'append over max_message_bytes');
  // a body that fails midway
  const failing = (async function* () {
    yield Buffer.alloc(200_000);
    throw new Error('client went away');
  })();
  try {
    await a.j.appendStream(meta(), failing, { maxBytes: 10 * MiB });
    t.fail('should reject');
  } catch (err) {
    t.equal((err as Error).message, 'client went away', 'the body error is passed through');
  }
  t.equal(readdirSync(path.join(dir, 'tmp')).length, 0, 'no staging file');
  t.equal(readdirSync(path.join(dir, 'blobs')).length, 0, 'no blob');
  const after = a.j.stats();
  t.equal(after.pendingMessages, before.pendingMessages);
  t.equal(after.diskBytes, before.diskBytes, 'disk accounting back to where it was');
  // reservations were released: the full cap is usable
  await a.j.append(meta(), Buffer.from('still fine'));
  t.equal(a.j.stats().pendingMessages, 1);
});

t.test('group commit: concurrent appends share fsyncs under batch; always = one per record; never = none', async (t) => {
  for (const [policy, n] of [['batch', 200], ['always', 50], ['never', 50]] as const) {
    const a = await open(t, tempDir(t), { fsync: policy, segment_bytes: 4 * MiB });
    const base = await counter(a.registry, 'connector_journal_fsyncs_total', { kind: 'segment' });
    const res = await Promise.all(Array.from({ length: n }, (_, i) => a.j.append(meta(`d${i % 7}`), Buffer.from(`c${i}`))));
    const fsyncs = (await counter(a.registry, 'connector_journal_fsyncs_total', { kind: 'segment' })) - base;
    if (policy === 'batch') t.ok(fsyncs >= 1 && fsyncs < n / 4, `batch: ${n} appends shared ${fsyncs} fsyncs`);
    if (policy === 'always') t.equal(fsyncs, n, 'always: one fsync per record');
    if (policy === 'never') t.equal(fsyncs, 0, 'never: no fsync');
    t.same(a.j.pending(-1, 1000).map((r) => r.id), res.map((r) => r.id), `${policy}: order = append call order`);
    const hist = await a.registry.getSingleMetric('connector_journal_append_seconds')!.get();
    const h = hist.values.find((v) => (v as { metricName?: string }).metricName === 'connector_journal_append_seconds_count')?.value;
    t.equal(h, n, 'append latency observed for each');
  }
});

t.test('reload changes limits and policies without reinitialising', async (t) => {
  const dir = tempDir(t);
  const a = await open(t, dir);
  const r1 = await a.j.append(meta(), Buffer.from('one'));
  const next = { bridge: { journal: config({ max_message_bytes: 10, fsync: 'always', overflow: 'drop-oldest' }) } } as unknown as Parameters<Journal['reload']>[0];
  const changes = await a.j.reload(next);
  t.ok(changes.some((c) => c.startsWith('bridge.journal.max_message_bytes')));
  t.ok(changes.some((c) => c.startsWith('bridge.journal.fsync')));
  t.same(a.j.pending().map((r) => r.id), [r1.id], 'pending records kept');
  await rejectsCode(t, a.j.append(meta(), Buffer.alloc(11)), 'ECONN_PAYLOAD_TOO_LARGE', 'new limit applies');
  const base = await counter(a.registry, 'connector_journal_fsyncs_total', { kind: 'segment' });
  const r2 = await a.j.append(meta(), Buffer.from('two'));
  t.equal((await counter(a.registry, 'connector_journal_fsyncs_total', { kind: 'segment' })) - base, 1);
  t.ok(r2.id.split('-')[1] === r1.id.split('-')[1], 'same boot: not reinitialised');
  t.same(await a.j.reload(next), [], 'no change, nothing reported');
});

t.test('close is idempotent and bounded; use before start or after close is ECONN_CLOSED', async (t) => {
  const dir = tempDir(t);
  const o = make(t, dir);
  await rejectsCode(t, o.j.append(meta(), Buffer.from('x')), 'ECONN_CLOSED', 'before start');
  await o.j.start();
  await o.j.start(); // idempotent
  const pending = Array.from({ length: 20 }, (_, i) => o.j.append(meta(), Buffer.from(`p${i}`)));
  const c1 = o.j.close();
  const c2 = o.j.close();
  t.equal(c1, c2, 'same promise');
  await c1;
  const settled = await Promise.allSettled(pending);
  t.ok(settled.every((s) => s.status === 'fulfilled'), 'writes queued before close are flushed');
  await rejectsCode(t, o.j.append(meta(), Buffer.from('x')), 'ECONN_CLOSED', 'after close');
  await rejectsCode(t, o.j.appendStream(meta(), chunks(10, 10), { maxBytes: 100 }), 'ECONN_CLOSED', 'stream after close');
  await rejectsCode(t, o.j.start(), 'ECONN_CLOSED', 'start after close');
  await o.j.close();
  const b = await open(t, dir);
  t.equal(b.j.pending().length, 20);
  // closing a never-started journal is fine
  await make(t, tempDir(t)).j.close();
});

t.test('start-up repairs: orphan blobs and staging files removed, missing blob dropped as corrupt, bad ack.json and journal.json', async (t) => {
  const dir = tempDir(t);
  const a = await open(t, dir);
  const big = await a.j.append(meta(), Buffer.alloc(2 * MiB, 1));
  const small = await a.j.append(meta(), Buffer.from('s'));
  await a.j.ack(small.id);
  await a.j.close();
  writeFileSync(path.join(dir, 'blobs', 'orphan.bin'), 'x');
  writeFileSync(path.join(dir, 'tmp', 'left.part'), 'x');
  const b = await open(t, dir);
  t.same(readdirSync(path.join(dir, 'blobs')).length, 1, 'orphan blob removed');
  t.same(readdirSync(path.join(dir, 'tmp')), [], 'staging emptied');
  t.equal(b.j.get(big.id)?.size, 2 * MiB);
  await b.j.close();
  // blob of a pending record vanished
  for (const f of readdirSync(path.join(dir, 'blobs'))) writeFileSync(path.join(dir, 'blobs', f), 'short');
  const c = await open(t, dir);
  t.equal(c.j.pending().length, 0, 'record with a broken blob dropped');
  t.equal(c.j.stats().droppedByReason.corrupt, 1);
  await c.j.close();
  // unreadable ack.json: everything on disk is treated as pending again (resent, the cloud deduplicates)
  const d0 = tempDir(t);
  const d = await open(t, d0);
  const x = await d.j.append(meta(), Buffer.from('x'));
  await d.j.ack(x.id);
  const y = await d.j.append(meta(), Buffer.from('y'));
  await d.j.close();
  writeFileSync(path.join(d0, 'ack.log'), '{not json');
  writeFileSync(path.join(d0, 'journal.json'), '[]');
  const e = await open(t, d0);
  t.ok(e.logs.filter((l) => l.code === 'ECONN_JOURNAL_CORRUPT').length >= 2, 'both logged');
  t.ok(e.j.pending().some((r) => r.id === y.id), 'nothing lost');
  const z = await e.j.append(meta(), Buffer.from('z'));
  t.notOk([x.id, y.id].includes(z.id), 'new instance id, ids still unique');
});

t.test('metrics on the registry', async (t) => {
  let now = 5_000_000;
  const a = await open(t, tempDir(t), {}, () => now);
  await a.j.append(meta(), Buffer.alloc(100));
  await a.j.append(meta(), Buffer.alloc(100));
  now += 4000;
  const text = await a.registry.metrics();
  for (const name of [
    'connector_journal_depth_messages 2',
    'connector_journal_oldest_age_seconds 4',
    'connector_journal_depth_bytes',
    'connector_journal_disk_bytes',
    'connector_journal_dropped_total{reason="overflow"} 0',
    'connector_journal_quarantined_total 0',
    'connector_journal_fsyncs_total{kind="segment"}',
    'connector_journal_append_seconds_bucket',
  ]) {
    t.ok(text.includes(name), name);
  }
  t.match(a.j.status(), { pendingMessages: 2, fsync: 'batch', overflow: 'reject' });
});

t.test('crash: SIGKILL while appending loses no acknowledged record, keeps order, no duplicates', async (t) => {
  const dir = tempDir(t);
  const lines = await appendUntilKilled(t, dir, {
    writers: 8,
    base: 50,
    mod: 7,
    step: 300,
    ackEvery: 5,
    config: config({ segment_bytes: 65536 }),
    enough: (l) => l.length >= 1500,
  });
  if (!lines) return;
  const appended = lines.filter((l) => l.startsWith('A ')).map((l) => l.slice(2));
  const acked = new Set(lines.filter((l) => l.startsWith('K ')).map((l) => l.slice(2)));
  const b = await open(t, path.join(dir, 'j'), { segment_bytes: 65536 });
  const ids = b.j.pending(-1, 1e6).map((r) => r.id);
  t.equal(new Set(ids).size, ids.length, 'no duplicates');
  const pos = new Map(ids.map((id, i) => [id, i]));
  let last = -1;
  let missing = 0;
  let outOfOrder = 0;
  for (const id of appended) {
    if (acked.has(id)) continue;
    const p = pos.get(id);
    if (p === undefined) missing++;
    else if (p <= last) outOfOrder++;
    else last = p;
  }
  t.equal(missing, 0, `every printed (durable) id is present (${appended.length} appended, ${acked.size} acked)`);
  t.equal(outOfOrder, 0, 'in the order they were appended');
  t.notOk(ids.some((id) => acked.has(id)), 'acked records never come back');
  for (const r of b.j.pending(-1, 50)) {
    const p = await b.j.readPayload(r);
    t.equal(createHash('sha256').update(p).digest('hex'), r.sha256, 'payload intact');
  }
});

t.test('recentPublishes (redelivery seeding): newest QoS 1 records with a packet id first, inside the age and count bounds, corrupt ones skipped, nothing cached', async (t) => {
  const dir = tempDir(t);
  let clock = 1_700_000_000_000;
  const now = (): number => clock;
  const a = await open(t, dir, {}, now);
  const pub = (deviceId: string, packetId: number): UplinkMessageMeta => ({ ...meta(deviceId), packetId });
  for (let p = 1; p <= 3; p++) await a.j.append(pub('dev1', p), Buffer.from(`old-${p}`));
  clock += 11 * 60_000; // dev1's records are now more than 10 minutes older than the newest
  const ids: string[] = [];
  for (let p = 1; p <= 4; p++) ids.push((await a.j.append(pub('dev2', p), Buffer.from(`payload-${p}-of-dev2`))).id);
  await a.j.append({ ...meta('dev2'), qos: 0 }, Buffer.from('qos0'));
  await a.j.append(meta('dev3'), Buffer.from('qos1 without a packet id'));
  await a.j.ack(ids[0]!);
  await a.j.close();
  // flip a payload byte of dev2's packet id 3: that record fails its CRC
  const [seg] = segments(dir);
  const file = path.join(dir, seg!);
  const bytes = readFileSync(file);
  const at = bytes.indexOf('payload-3-of-dev2');
  t.ok(at > 0, 'record found on disk');
  bytes[at] = bytes[at]! ^ 0xff;
  writeFileSync(file, bytes);

  const b = await open(t, dir, {}, now);
  const seen = (opts: Parameters<Journal['recentPublishes']>[0], stopAfter = Infinity): { pids: string[]; examined: number } => {
    const pids: string[] = [];
    const examined = b.j.recentPublishes(opts, (p) => {
      t.equal(p.topic, `devices/${p.deviceId}/up`);
      pids.push(`${p.deviceId}:${p.packetId}`);
      return pids.length < stopAfter;
    });
    return { pids, examined };
  };
  const tenMin = 10 * 60_000;
  t.same(seen({ maxAgeMs: tenMin, maxRecords: 100 }), { pids: ['dev2:4', 'dev2:2'], examined: 5 }, 'newest first; acknowledged, corrupt, QoS 0, no packet id and too old left out');
  t.same(seen({ maxAgeMs: tenMin, maxRecords: 3 }).pids, ['dev2:4'], 'at most maxRecords records examined');
  t.same(seen({ maxAgeMs: tenMin, maxRecords: 100, wanted: (_d, p) => p !== 4 }).pids, ['dev2:2'], 'a record wanted() refuses is skipped');
  t.same(seen({ maxAgeMs: tenMin, maxRecords: 100 }, 1).pids, ['dev2:4'], 'visit returning false stops');
  t.same(seen({ maxAgeMs: 20 * 60_000, maxRecords: 100 }).pids, ['dev2:4', 'dev2:2', 'dev1:3', 'dev1:2', 'dev1:1'], 'a wider age bound reaches the older records');
  const p4 = b.j.recentPublishes({ maxAgeMs: tenMin, maxRecords: 1 }, () => true);
  t.equal(p4, 1);
  let first: { id: string; size: number; sha256: string } | undefined;
  b.j.recentPublishes({ maxAgeMs: tenMin, maxRecords: 100 }, (p) => ((first = p), false));
  t.same(first, { id: ids[3], deviceId: 'dev2', packetId: 4, topic: 'devices/dev2/up', size: 17, sha256: createHash('sha256').update('payload-4-of-dev2').digest('hex') }, 'id, size and digest of the record');
  t.equal(b.j.stats().cacheBytes, 0, 'nothing read for seeding stays in memory');
  t.equal(b.j.stats().pendingMessages, 8, 'seeding drops nothing (the corrupt record is dropped when the uplink reads it)');
  t.equal(b.logs.filter((l) => l.code === 'ECONN_JOURNAL_CORRUPT').length, 0);
});

t.test('replay of indexed segments: untouched segments marked live at once, partly acknowledged ones per record; same queue as before the restart', async (t) => {
  const dir = tempDir(t);
  // 64 KiB segments of ~120-byte records: several segments with indexes above 4 KiB (read into their own buffer, used in place)
  const a = await open(t, dir);
  const ids: string[] = [];
  for (let i = 0; i < 1500; i += 100) ids.push(...(await Promise.all(Array.from({ length: 100 }, (_, k) => a.j.append(meta(`dev${k % 3}`), Buffer.from(`r${i + k}`.padEnd(40, '.')))))).map((r) => r.id));
  t.ok(segments(dir).length >= 3, 'several segments');
  const acked = new Set([ids[700]!, ids[701]!, ids[900]!]);
  for (const id of acked) await a.j.ack(id);
  const before = a.j.pending(-1, 5000).map((r) => r.id);
  await a.j.close();
  t.ok(readdirSync(dir).filter((f) => f.endsWith('.idx')).some((f) => statSync(path.join(dir, f)).size > 8192), 'an index larger than the buffer pool');
  const b = await open(t, dir);
  t.same(b.j.pending(-1, 5000).map((r) => r.id), before, 'same records after the restart');
  t.equal(b.j.stats().pendingMessages, 1497);
  await b.j.ack(ids[0]!);
  await b.j.ack(ids[1499]!);
  await b.j.close();
  const c = await open(t, dir);
  t.same(c.j.pending(-1, 5000).map((r) => r.id), before.slice(1, -1), 'acks made after a replay persist too');
  t.same(await payloads(c.j, c.j.pending(-1, 2)), ['r1'.padEnd(40, '.'), 'r2'.padEnd(40, '.')]);
});

t.test('DoneSet.noneIn: whether any seq of a span is acknowledged', async (t) => {
  const d = new DoneSet(10, [
    [20, 24],
    [30, 30],
  ]);
  t.notOk(d.noneIn(5, 15), 'below the floor');
  t.ok(d.noneIn(10, 19));
  t.notOk(d.noneIn(15, 20), 'touches a range start');
  t.notOk(d.noneIn(24, 29), 'touches a range end');
  t.ok(d.noneIn(25, 29), 'between ranges');
  t.notOk(d.noneIn(22, 22), 'inside a range');
  t.notOk(d.noneIn(0, 100), 'spans everything');
  t.ok(d.noneIn(31, 1e9), 'above every range');
  t.ok(new DoneSet(0, []).noneIn(0, 5), 'nothing acknowledged');
});

t.test('appendStream: a body of many small pieces is staged in runs and kept byte for byte', async (t) => {
  const dir = tempDir(t);
  const a = await open(t, dir);
  // 3 MiB + 7 in 100-byte pieces: runs close on the piece count as well as on bytes
  const total = 3 * MiB + 7;
  const r = await a.j.appendStream(meta(), chunks(total, 100), { maxBytes: 10 * MiB, expectedSha256: sha(total, 100) });
  t.equal(r.size, total);
  const back = await a.j.readPayload(a.j.get(r.id)!, 0, total);
  t.equal(createHash('sha256').update(back).digest('hex'), r.sha256, 'the staged blob holds the body');
  t.equal(readdirSync(path.join(dir, 'tmp')).length, 0, 'no staging file left');
});

t.test('appendStream: a long body is fdatasynced while it arrives, not only at its end', async (t) => {
  const dir = tempDir(t);
  const a = await open(t, dir, { max_message_bytes: 128 * MiB });
  const before = await counter(a.registry, 'connector_journal_fsyncs_total', { kind: 'blob' });
  const total = 70 * MiB;
  const r = await a.j.appendStream(meta(), chunks(total, 65536), { maxBytes: 100 * MiB, expectedSha256: sha(total, 65536) });
  t.equal(r.size, total);
  const syncs = (await counter(a.registry, 'connector_journal_fsyncs_total', { kind: 'blob' })) - before;
  t.ok(syncs >= 2 && syncs <= 3, `every 32 MiB and at the end (${syncs} fdatasyncs of the staged body)`);
  const n = await open(t, tempDir(t), { fsync: 'never', max_message_bytes: 128 * MiB });
  const b0 = await counter(n.registry, 'connector_journal_fsyncs_total', { kind: 'blob' });
  await n.j.appendStream(meta(), chunks(40 * MiB, 65536), { maxBytes: 100 * MiB });
  t.equal((await counter(n.registry, 'connector_journal_fsyncs_total', { kind: 'blob' })) - b0, 0, 'fsync never: none');
});

t.test('openPayload: reads a blob into the caller\'s buffer through one open file; refuses once the record is gone or the reader closed', async (t) => {
  const dir = tempDir(t);
  const a = await open(t, dir);
  const total = 2 * MiB + 5;
  const r = await a.j.appendStream(meta(), chunks(total, 65536), { maxBytes: 10 * MiB });
  const rec = a.j.get(r.id)!;
  const reader = a.j.openPayload(rec);
  const target = Buffer.alloc(20, 0xee);
  await reader.read(target, 4, 65530, 12);
  t.same(target.subarray(4, 16), Buffer.concat([Buffer.alloc(6, 1), Buffer.alloc(6, 2)]), 'range across a piece boundary, at the target offset');
  t.same(target.subarray(0, 4), Buffer.alloc(4, 0xee), 'nothing written before the target offset');
  t.same(target.subarray(16), Buffer.alloc(4, 0xee), 'nothing written after the range');
  const whole = Buffer.alloc(total);
  await Promise.all([reader.read(whole, 0, 0, MiB), reader.read(whole, MiB, MiB, total - MiB)]);
  t.equal(createHash('sha256').update(whole).digest('hex'), r.sha256, 'concurrent reads of one reader');
  await t.rejects(reader.read(target, 0, total - 4, 8), RangeError, 'a range past the end is refused');
  // an inline record is served too
  const small = await a.j.append(meta(), Buffer.from('hello world'));
  const sr = a.j.openPayload(a.j.get(small.id)!);
  const sb = Buffer.alloc(5);
  await sr.read(sb, 0, 6, 5);
  t.equal(sb.toString(), 'world', 'inline record');
  await sr.close();
  await rejectsCode(t, sr.read(sb, 0, 0, 1), 'ECONN_CLOSED', 'read after close');
  // acknowledged: the open file is not read any more
  await a.j.ack(r.id);
  await rejectsCode(t, reader.read(target, 0, 0, 8), 'ECONN_NOT_FOUND', 'the record left the queue');
  await reader.close();
  await reader.close();
  t.pass('close is idempotent');
});

t.test('appendStream with a declared length: handed to "upload" listeners while it arrives, under the id its record keeps (also after a restart)', async (t) => {
  const dir = tempDir(t);
  const a = await open(t, dir);
  const seen: IncomingUpload[] = [];
  a.j.on('upload', (u: IncomingUpload) => seen.push(u));
  const total = 3 * MiB + 5;
  const data = randomBytes(total);
  let release!: () => void;
  const held = new Promise<void>((r) => (release = r));
  async function* body(): AsyncGenerator<Buffer> {
    yield data.subarray(0, 2 * MiB);
    await held; // the rest waits until the test has looked at the upload in progress
    yield data.subarray(2 * MiB);
  }
  const done = a.j.appendStream(meta(), body(), { maxBytes: 10 * MiB, declaredBytes: total });
  await new Promise<void>((resolve) => a.j.once('upload', () => resolve()));
  const u = seen[0]!;
  t.equal(u.total, total, 'with its declared length');
  t.match(u.id, /-u1$/, 'an id of its own, known before the commit');
  if (u.written < 2 * MiB) await new Promise<void>((resolve) => u.on('progress', (n: number) => n >= 2 * MiB && resolve()));
  const part = Buffer.alloc(MiB);
  await u.read(part, 0, MiB, MiB);
  t.ok(part.equals(data.subarray(MiB, 2 * MiB)), 'what is written reads back while the body still arrives');
  await t.rejects(u.read(Buffer.alloc(10), 0, 2 * MiB, 10), { code: 'ECONN_JOURNAL_IO' }, 'nothing beyond what is written');
  t.equal(a.j.has(u.id), false, 'no record yet');
  const ended = new Promise<string>((resolve) => u.once('end', resolve));
  release();
  const r = await done;
  t.equal(await ended, 'committed');
  t.equal(r.id, u.id, 'the record carries the id the upload was streamed under');
  t.equal(a.j.get(u.id)?.size, total);
  t.equal(a.j.pending()[0]?.id, u.id, 'and the uplink sees it under that id');
  await a.j.close();
  const b = await open(t, dir);
  t.equal(b.j.pending()[0]?.id, u.id, 'the id survives a restart (kept in the blob name)');
  const back = await b.j.readPayload(b.j.get(u.id)!, 0, total);
  t.ok(back.equals(data), 'payload intact');
  await b.j.ack(u.id);
  t.equal(b.j.has(u.id), false, 'acknowledged by that id');
  // a restart draws a new boot nonce: a new upload's id cannot be one the cloud may hold from before
  const ids: string[] = [];
  b.j.on('upload', (x: IncomingUpload) => ids.push(x.id));
  await b.j.appendStream(meta(), chunks(MiB, 65536), { maxBytes: 10 * MiB, declaredBytes: MiB });
  t.not(ids[0], u.id, 'a new id after the restart');
});

t.test('appendStream with a declared length: cut off, wrong digest, wrong length → the upload ends "aborted", nothing kept', async (t) => {
  const dir = tempDir(t);
  const a = await open(t, dir);
  const states: string[] = [];
  a.j.on('upload', (u: IncomingUpload) => u.once('end', (s: string) => states.push(s)));
  async function* cut(): AsyncGenerator<Buffer> {
    yield randomBytes(MiB);
    throw new Error('client went away');
  }
  await t.rejects(a.j.appendStream(meta(), cut(), { maxBytes: 10 * MiB, declaredBytes: 2 * MiB }), /client went away/);
  await t.rejects(a.j.appendStream(meta(), chunks(2 * MiB, 65536), { maxBytes: 10 * MiB, declaredBytes: 2 * MiB, expectedSha256: Buffer.alloc(32) }), { code: 'ECONN_DIGEST_MISMATCH' });
  await t.rejects(a.j.appendStream(meta(), chunks(MiB, 65536), { maxBytes: 10 * MiB, declaredBytes: 2 * MiB }), { code: 'ECONN_BAD_REQUEST' }, 'shorter than declared');
  await t.rejects(a.j.appendStream(meta(), chunks(MiB, 65536), { maxBytes: MiB / 2, declaredBytes: MiB }), { code: 'ECONN_PAYLOAD_TOO_LARGE' }, 'declared above the limit: refused before anything is read');
  t.same(states, ['aborted', 'aborted', 'aborted'], 'each streamed one ended aborted');
  t.equal(a.j.pending().length, 0, 'nothing kept');
  t.equal(readdirSync(path.join(dir, 'tmp')).length, 0, 'no staging file left');
});

t.test('appendStream with a declared length: the body waits while the link is more than its window behind', async (t) => {
  const dir = tempDir(t);
  const a = await open(t, dir);
  let u: IncomingUpload | undefined;
  a.j.on('upload', (x: IncomingUpload) => {
    u = x;
    x.startStreaming(2 * MiB); // as the uplink does
  });
  let pulled = 0;
  async function* body(): AsyncGenerator<Buffer> {
    for (let i = 0; i < 8; i++) {
      pulled += MiB;
      yield randomBytes(MiB);
    }
  }
  const done = a.j.appendStream(meta(), body(), { maxBytes: 10 * MiB, declaredBytes: 8 * MiB });
  // the journal waits for the link (it listens for 'sent') instead of reading on
  await new Promise<void>((resolve) => {
    const check = (): void => (u && u.listenerCount('sent') > 0 ? resolve() : void setImmediate(check));
    check();
  });
  t.ok(pulled < 8 * MiB && u!.written <= 4 * MiB, `the body is held (${pulled / MiB} MiB read, ${u!.written / MiB} MiB written, the link at 0)`);
  u!.noteSent(6 * MiB);
  u!.stopStreaming(); // the uplink let it go (e.g. the link went): the body runs free
  const r = await done;
  t.equal(r.size, 8 * MiB, 'then it completes');
});
