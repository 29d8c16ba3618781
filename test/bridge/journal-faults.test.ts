/**
 * Regression tests for the journal defects of issue 9 (each fails on the journal before the
 * rewrite) and crash-safety fault cases: ids after a state restore or a cloned image,
 * append-time protocol validation, records the reader refuses, disk full on a real
 * size-limited filesystem, uploads and the byte cap, TTL across clock steps, the quarantine
 * inside the cap, a power cut (segment cut back to what was fsynced).
 */
import t, { type Test } from 'tap';
import { execFileSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { cpSync, existsSync, mkdirSync, mkdtempSync, openSync, readdirSync, readFileSync, rmSync, statSync, statfsSync, closeSync, writeFileSync, writeSync, ftruncateSync } from 'node:fs';
import path from 'node:path';
import { tmpdir } from 'node:os';
import { Writable } from 'node:stream';
import { once } from 'node:events';
import { Registry } from 'prom-client';
import { Journal, type JournalConfig } from '../../bridge/journal.js';
import { RECORD_HEADER_BYTES, SEGMENT_HEADER_BYTES, decodeHeaderV2 } from '../../bridge/journal/format.js';
import { createLogger } from '../../core/logger.js';
import { errorCode } from '../../core/errors.js';
import type { UplinkMessageMeta } from '../../core/ports.js';
import { tempDir } from '../helpers/daemon.js';
import { appendUntilKilled } from '../helpers/journal-child.js';

type LogLine = Record<string, unknown> & { msg?: string; code?: string };
const MiB = 1024 * 1024;

function config(over: Partial<JournalConfig> = {}): JournalConfig {
  return { max_bytes: 256 * MiB, overflow: 'reject', ttl_s: 0, max_message_bytes: 64 * MiB, segment_bytes: 65536, fsync: 'batch', fsync_max_delay_ms: 2, memory_cache_bytes: 8 * MiB, max_uploads_per_device: 4, ...over };
}

function meta(deviceId = 'dev1', topic = `devices/${deviceId}/up`): UplinkMessageMeta {
  return { deviceId, topic, qos: 1, receivedAt: 1_700_000_000_000 };
}

interface Opened {
  j: Journal;
  registry: Registry;
  logs: LogLine[];
}

async function open(t: Test, dir: string, over: Partial<JournalConfig> = {}, clocks: { now?: () => number; monotonic?: () => number } = {}): Promise<Opened> {
  const logs: LogLine[] = [];
  const destination = new Writable({
    write(chunk: Buffer, _enc, cb) {
      for (const line of chunk.toString().split('\n')) if (line) logs.push(JSON.parse(line) as LogLine);
      cb();
    },
  });
  const registry = new Registry();
  const j = new Journal({ dir, config: config(over), logger: createLogger({ level: 'debug', destination }), metrics: registry, ...clocks });
  t.teardown(() => j.close());
  await j.start();
  return { j, registry, logs };
}

async function counter(registry: Registry, name: string, labels: Record<string, string> = {}): Promise<number> {
  const m = registry.getSingleMetric(name);
  if (!m) throw new Error(`no metric ${name}`);
  const v = await m.get();
  return v.values.filter((x) => Object.entries(labels).every(([k, val]) => x.labels[k] === val)).reduce((a, x) => a + x.value, 0);
}

async function rejectsCode(t: Test, p: Promise<unknown>, code: string, msg: string): Promise<unknown> {
  try {
    await p;
    t.fail(`${msg}: expected ${code}, it resolved`);
    return undefined;
  } catch (err) {
    t.equal(errorCode(err), code, msg);
    return err;
  }
}

/** An event, or an error after `ms` (a timer keeps the process alive while waiting). */
async function eventWithin(emitter: NodeJS.EventEmitter, name: string, ms: number): Promise<void> {
  let guard: NodeJS.Timeout | undefined;
  try {
    await Promise.race([once(emitter, name), new Promise((_, reject) => (guard = setTimeout(() => reject(new Error(`no '${name}' event within ${ms} ms`)), ms)))]);
  } finally {
    clearTimeout(guard);
  }
}

function segments(dir: string): string[] {
  return readdirSync(dir).filter((n) => /^seg-\d+\.log$/.test(n)).sort();
}

/** A body that yields `first` bytes, then waits for `gate` before finishing (or failing). */
function gatedBody(first: number, gate: Promise<'finish' | 'fail'>, rest = 1000, reached?: () => void): AsyncIterable<Buffer> {
  return (async function* () {
    for (let sent = 0; sent < first; sent += 65536) yield Buffer.alloc(Math.min(65536, first - sent), 7);
    reached?.(); // the consumer has taken (and written) everything before
    if ((await gate) === 'fail') throw new Error('client went away');
    yield Buffer.alloc(rest, 8);
  })();
}

function gate(): { p: Promise<'finish' | 'fail'>; open: (v: 'finish' | 'fail') => void } {
  let open!: (v: 'finish' | 'fail') => void;
  const p = new Promise<'finish' | 'fail'>((r) => (open = r));
  return { p, open };
}

t.test('issue 9 #1: ids never repeat after the state directory is restored from a backup', async (t) => {
  const root = tempDir(t);
  const dir = path.join(root, 'journal');
  const backup = path.join(root, 'backup');
  const a = await open(t, dir);
  await a.j.append(meta(), Buffer.from('before backup'));
  await a.j.close();
  cpSync(dir, backup, { recursive: true });
  const b = await open(t, dir);
  const first: string[] = [];
  for (let i = 0; i < 20; i++) first.push((await b.j.append(meta(), Buffer.from(`m${i}`))).id);
  await b.j.close();
  // the operator restores the backup (docs/operations.md) and devices keep publishing
  rmSync(dir, { recursive: true });
  cpSync(backup, dir, { recursive: true });
  const c = await open(t, dir);
  const second: string[] = [];
  for (let i = 0; i < 20; i++) second.push((await c.j.append(meta(), Buffer.from(`n${i}`))).id);
  const clash = second.filter((id) => first.includes(id));
  t.same(clash, [], 'no id of the restored journal repeats one the cloud already holds');
  for (const id of second) t.match(id, /^[A-Za-z0-9._:-]{1,128}$/, 'a valid protocol message id');
});

t.test('issue 9 #1: two gateways cloned from one image do not produce the same ids', async (t) => {
  const root = tempDir(t);
  const image = path.join(root, 'image');
  const a = await open(t, image);
  await a.j.append(meta(), Buffer.from('x'));
  await a.j.close();
  cpSync(image, path.join(root, 'g1'), { recursive: true });
  cpSync(image, path.join(root, 'g2'), { recursive: true });
  const g1 = await open(t, path.join(root, 'g1'));
  const g2 = await open(t, path.join(root, 'g2'));
  const ids1 = new Set<string>();
  for (let i = 0; i < 10; i++) ids1.add((await g1.j.append(meta(), Buffer.from(`a${i}`))).id);
  for (let i = 0; i < 10; i++) t.notOk(ids1.has((await g2.j.append(meta(), Buffer.from(`b${i}`))).id), `clone 2 id ${i} is new`);
});

t.test('issue 9 #2: records the uplink protocol cannot carry are refused at append time, nothing kept', async (t) => {
  const a = await open(t, tempDir(t));
  const cases: Array<[string, UplinkMessageMeta]> = [
    ['content type of 256 bytes', { ...meta(), contentType: `application/${'x'.repeat(244)}` }],
    ['topic of 4097 bytes', meta('dev1', `devices/dev1/${'t'.repeat(4097 - 13)}`)],
    ['device id of 257 bytes', meta('d'.repeat(257), 'devices/x/up')],
    ['empty topic', meta('dev1', '')],
    ['metadata over 8192 bytes once JSON-escaped', meta('dev1', `devices/dev1/${'\u0001'.repeat(2000)}`)],
  ];
  for (const [what, m] of cases) {
    const err = await rejectsCode(t, a.j.append(m, Buffer.from('p')), 'ECONN_BAD_REQUEST', what);
    t.match((err as Error).message, /refused.*nothing was kept/, `${what}: a clear message`);
    await rejectsCode(t, a.j.appendStream(m, (async function* () { yield Buffer.from('p'); })(), { maxBytes: 10 }), 'ECONN_BAD_REQUEST', `${what} (upload)`);
  }
  t.equal(a.j.stats().pendingMessages, 0, 'nothing was journaled');
  const ok = await a.j.append({ ...meta(), contentType: `application/${'x'.repeat(243)}` }, Buffer.from('fine'));
  t.same(a.j.pending().map((r) => r.id), [ok.id], 'a message at the limits is accepted and not blocked');
});

t.test('issue 9 #2/#5: a record the reader refuses (bit rot after it was indexed) is dropped as corrupt, counted, kept aside — never retried', async (t) => {
  const dir = tempDir(t);
  const a = await open(t, dir);
  const ids: string[] = [];
  for (let i = 0; i < 10; i++) ids.push((await a.j.append(meta(), Buffer.from(`payload-${i}`.padEnd(200, '.')))).id);
  await a.j.close();
  const [seg] = segments(dir);
  const file = path.join(dir, seg!);
  t.ok(existsSync(file.replace(/\.log$/, '.idx')), 'a sealed segment has an index: replay does not read the records');
  const recLen = (statSync(file).size - SEGMENT_HEADER_BYTES) / 10;
  const fd = openSync(file, 'r+');
  writeSync(fd, Buffer.from('ROT'), 0, 3, SEGMENT_HEADER_BYTES + recLen * 3 + recLen - 10); // payload of record 4
  closeSync(fd);
  const b = await open(t, dir);
  const recs = b.j.pending();
  t.same(recs.map((r) => r.id), ids.filter((_, i) => i !== 3), 'every other record is offered, in order');
  t.equal(b.j.stats().droppedByReason.corrupt, 1, 'counted as a corrupt drop');
  t.ok(b.logs.some((l) => l.code === 'ECONN_JOURNAL_CORRUPT' && l.id === ids[3]), 'logged with its id');
  t.equal(b.j.pending().length, 9, 'not offered again');
  await b.j.close(); // waits for the quarantine copy
  t.ok(readdirSync(path.join(dir, 'quarantine')).some((n) => n.startsWith(`corrupt-${ids[3]}`)), 'its bytes are kept in the quarantine');
});

t.test('issue 9 #2: readPayload of a record whose bytes rotted on disk fails with ECONN_JOURNAL_CORRUPT once, then it is gone', async (t) => {
  const dir = tempDir(t);
  const a = await open(t, dir, { memory_cache_bytes: 0 }); // nothing served from memory: every read goes to disk
  const r0 = await a.j.append(meta(), Buffer.from('good'.padEnd(100, '.')));
  const r1 = await a.j.append(meta(), Buffer.from('rots'.padEnd(100, '.')));
  const [seg] = segments(dir);
  const file = path.join(dir, seg!);
  const recs = a.j.pending();
  const fd = openSync(file, 'r+');
  writeSync(fd, Buffer.from('X'), 0, 1, statSync(file).size - 5);
  closeSync(fd);
  t.equal((await a.j.readPayload(recs[0]!)).toString().slice(0, 4), 'good');
  await rejectsCode(t, a.j.readPayload(recs[1]!), 'ECONN_JOURNAL_CORRUPT', 'corrupt bytes are never handed to the uplink');
  await rejectsCode(t, a.j.readPayload(recs[1]!), 'ECONN_NOT_FOUND', 'and it left the queue');
  t.same(a.j.pending().map((r) => r.id), [r0.id]);
  t.equal(a.j.stats().droppedByReason.corrupt, 1);
  void r1;
});

t.test('issue 9 #3: a full disk (size-limited tmpfs) stops acknowledging, loses nothing acknowledged, frees acknowledged data, recovers by itself', { skip: process.getuid?.() !== 0 ? 'needs root to mount a size-limited tmpfs' : false }, async (t) => {
  const mnt = mkdtempSync(path.join(tmpdir(), 'ec-tmpfs-'));
  try {
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=4m,mode=0700', 'tmpfs', mnt]);
  } catch (err) {
    rmSync(mnt, { recursive: true, force: true });
    // reported as a skip (with its reason), not as a pass
    t.plan(0, `cannot mount a tmpfs here (${(err as Error).message.split('\n')[0]})`);
    return;
  }
  t.teardown(() => {
    try {
      execFileSync('umount', ['-l', mnt]);
    } catch {
      // already unmounted
    }
    rmSync(mnt, { recursive: true, force: true });
  });
  const dir = path.join(mnt, 'journal');
  const a = await open(t, dir, { segment_bytes: 65536, max_bytes: 64 * MiB });
  // leave about 600 KiB free
  const free = statfsSync(mnt).bavail * statfsSync(mnt).bsize;
  writeFileSync(path.join(mnt, 'filler'), Buffer.alloc(Math.max(0, free - 600 * 1024)));
  const acked: string[] = [];
  let failure: unknown;
  const unwritable = eventWithin(a.j, 'unwritable', 20_000);
  for (let i = 0; i < 400 && !failure; i++) {
    try {
      acked.push((await a.j.append(meta(), Buffer.alloc(8000, i & 0xff))).id);
    } catch (err) {
      failure = err;
    }
  }
  await unwritable.catch((err: unknown) => t.fail(String(err)));
  t.equal(errorCode(failure), 'ECONN_JOURNAL_IO', 'the append that hit the full disk is refused (no PUBACK)');
  t.ok(acked.length > 20, `${acked.length} messages acknowledged before the disk filled`);
  t.equal(a.j.stats().writable, false);
  const err = await rejectsCode(t, a.j.append(meta(), Buffer.from('while full')), 'ECONN_JOURNAL_IO', 'later appends are refused at once');
  t.match((err as Error).message, /recovers by itself/);
  t.equal(await counter(a.registry, 'connector_journal_writable'), 0);
  // the cloud acknowledges most of the backlog while the disk is still full: the ack state is
  // persisted in place and the acknowledged segments are deleted
  const before = statfsSync(mnt).bavail;
  const keep = acked.slice(-3);
  for (const id of acked.slice(0, -3)) void a.j.ack(id);
  await a.j.ack(acked[acked.length - 4]!);
  t.ok(statfsSync(mnt).bavail > before, 'acknowledged data was freed on a full disk');
  // the probe runs every second (an unref'd timer): wait for its event, bounded
  await eventWithin(a.j, 'writable', 20_000);
  const after = await a.j.append(meta(), Buffer.from('after recovery'));
  t.same(a.j.pending().map((r) => r.id), [...keep, after.id], 'nothing acknowledged lost, refused ones absent');
  await a.j.close();
  rmSync(path.join(mnt, 'filler'));
  const b = await open(t, dir, { segment_bytes: 65536, max_bytes: 64 * MiB });
  t.same(b.j.pending().map((r) => r.id), [...keep, after.id], 'after a restart too');
  for (const r of b.j.pending()) {
    const p = await b.j.readPayload(r);
    t.equal(createHash('sha256').update(p).digest('hex'), r.sha256, `${r.id} intact`);
  }
  t.equal(b.logs.filter((l) => l.code === 'ECONN_JOURNAL_CORRUPT').length, 0, 'no corruption: every write went to its explicit position');
  await b.j.close();
});

t.test('issue 9 #5: a failing upload under drop-oldest does not drop acknowledged messages', async (t) => {
  const a = await open(t, tempDir(t), { max_bytes: MiB, overflow: 'drop-oldest', segment_bytes: 65536 });
  for (let i = 0; i < 12; i++) await a.j.append(meta(), Buffer.alloc(50_000, i));
  const before = a.j.pending(-1, 100).map((r) => r.id);
  const g = gate();
  let reached!: () => void;
  const atGate = new Promise<void>((r) => (reached = r));
  const up = a.j.appendStream(meta('cam'), gatedBody(600_000, g.p, 1000, reached), { maxBytes: 2 * MiB });
  await atGate;
  g.open('fail');
  await t.rejects(up, { message: 'client went away' });
  t.same(a.j.pending(-1, 100).map((r) => r.id), before, 'nothing dropped for an upload that never completed');
  t.equal(a.j.stats().droppedByReason.overflow, 0);
});

t.test('issue 9 #5: under reject, one slow upload does not block the other devices', async (t) => {
  const a = await open(t, tempDir(t), { max_bytes: MiB, overflow: 'reject', segment_bytes: 65536 });
  const g = gate();
  let reached!: () => void;
  const atGate = new Promise<void>((r) => (reached = r));
  const up = a.j.appendStream(meta('cam'), gatedBody(700_000, g.p, 1000, reached), { maxBytes: 2 * MiB });
  await atGate;
  t.ok(a.j.stats().diskBytes >= 600_000, 'the upload is in progress, 700 kB staged');
  for (let i = 0; i < 15; i++) await a.j.append(meta(`d${i}`), Buffer.alloc(50_000, i));
  t.equal(a.j.pending(-1, 100).length, 15, 'devices kept being acknowledged while the upload was in progress');
  g.open('finish');
  await rejectsCode(t, up, 'ECONN_JOURNAL_FULL', 'the upload that does not fit when it completes is refused (503), nothing kept');
  t.equal(readdirSync(path.join(a.j.dir, 'tmp')).length, 0);
  t.equal(readdirSync(path.join(a.j.dir, 'blobs')).length, 0);
});

t.test('issue 9 #5: concurrent uploads per device are bounded (429 ECONN_TOO_MANY_UPLOADS)', async (t) => {
  const a = await open(t, tempDir(t), { max_uploads_per_device: 2 });
  const g = gate();
  const u1 = a.j.appendStream(meta('cam'), gatedBody(100_000, g.p), { maxBytes: MiB });
  const u2 = a.j.appendStream(meta('cam'), gatedBody(100_000, g.p), { maxBytes: MiB });
  const err = await rejectsCode(t, a.j.appendStream(meta('cam'), gatedBody(10, g.p), { maxBytes: MiB }), 'ECONN_TOO_MANY_UPLOADS', 'a third upload of the same device');
  t.equal((err as { status?: number }).status, 429);
  const other = gate();
  other.open('finish');
  await a.j.appendStream(meta('cam2'), gatedBody(10, other.p), { maxBytes: MiB });
  g.open('finish');
  await Promise.all([u1, u2]);
  await a.j.appendStream(meta('cam'), gatedBody(10, other.p), { maxBytes: MiB });
  t.equal(a.j.stats().pendingMessages, 4, 'finished uploads free their slot');
});

t.test('issue 9 #5: TTL follows a monotonic clock, not wall-clock steps', async (t) => {
  const dir = tempDir(t);
  let wall = 1_700_000_000_000;
  let mono = 1000;
  const clocks = { now: () => wall, monotonic: () => mono };
  const a = await open(t, dir, { ttl_s: 60 }, clocks);
  const r = await a.j.append(meta(), Buffer.from('x'));
  wall += 365 * 86_400_000; // NTP steps the clock a year forward
  t.equal(a.j.sweep(), 0, 'a forward wall-clock step expires nothing');
  t.same(a.j.pending().map((x) => x.id), [r.id]);
  wall -= 2 * 365 * 86_400_000; // and back
  t.ok(a.j.stats().oldestPendingAgeMs >= 0 && a.j.stats().oldestPendingAgeMs < 1000, 'ages never go negative');
  mono += 61_000; // a real minute passes
  t.equal(a.j.sweep(), 1, 'real elapsed time expires it');
  // across a restart: a wall clock that went back while the daemon was down counts as no downtime
  const b0 = await a.j.append(meta(), Buffer.from('y'));
  await a.j.close();
  wall -= 3_600_000;
  const b = await open(t, dir, { ttl_s: 60 }, clocks);
  t.same(b.j.pending().map((x) => x.id), [b0.id], 'not expired');
  t.ok(b.j.stats().oldestPendingAgeMs >= 0);
});

t.test('issue 9 #5: the quarantine counts inside the byte cap, is fsynced, and keeps within its share', async (t) => {
  const dir = tempDir(t);
  const a = await open(t, dir, { max_bytes: 4 * MiB, overflow: 'reject', segment_bytes: 65536 });
  const big = await a.j.appendStream(meta(), (async function* () {
    for (let i = 0; i < 6; i++) yield Buffer.alloc(65536, i);
  })(), { maxBytes: MiB });
  const usedBefore = a.j.stats().diskBytes;
  await a.j.quarantine(big.id, 'schema violation');
  t.ok(a.j.stats().diskBytes >= usedBefore, 'the quarantined payload still counts');
  t.ok((await counter(a.registry, 'connector_journal_fsyncs_total', { kind: 'quarantine' })) >= 2, 'quarantine files are fsynced');
  // fill up to the cap: the quarantined bytes take their part of it
  let accepted = 0;
  let full: unknown;
  for (let i = 0; i < 100 && !full; i++) {
    try {
      await a.j.append(meta(), Buffer.alloc(50_000, i));
      accepted++;
    } catch (err) {
      full = err;
    }
  }
  t.equal(errorCode(full), 'ECONN_JOURNAL_FULL');
  t.ok(accepted * 50_000 < 4 * MiB - 393_216 + 60_000, `fewer accepted (${accepted}) because the quarantine holds part of the cap`);
  // more quarantined than its share (1/8 of max_bytes = 512 KiB): the oldest entries go
  const ids = a.j.pending(-1, 20).map((r) => r.id);
  for (const id of ids.slice(0, 12)) await a.j.quarantine(id, 'bad');
  t.ok((await counter(a.registry, 'connector_journal_quarantine_evicted_total')) >= 1, 'oldest quarantine entries evicted');
  t.notOk(existsSync(path.join(dir, 'quarantine', `${big.id}.bin`)), 'the oldest one first');
  const q = readdirSync(path.join(dir, 'quarantine')).reduce((n, f) => n + statSync(path.join(dir, 'quarantine', f)).size, 0);
  t.ok(q <= 4 * MiB / 8, `quarantine within its share (${q} bytes)`);
});

t.test('acks are cheap and durable without rewriting a file: ack.log keeps its inode and size', async (t) => {
  const dir = tempDir(t);
  const a = await open(t, dir);
  const ids: string[] = [];
  for (let i = 0; i < 300; i++) ids.push((await a.j.append(meta(), Buffer.from(`m${i}`))).id);
  const st0 = statSync(path.join(dir, 'ack.log'));
  for (let i = 0; i < 300; i += 2) await a.j.ack(ids[i]!); // selective: every other one
  const st1 = statSync(path.join(dir, 'ack.log'));
  t.equal(st1.ino, st0.ino, 'same file (no tmp + rename)');
  t.equal(st1.size, st0.size, 'preallocated: writes land inside it');
  t.notOk(existsSync(path.join(dir, 'ack.json')), 'no ack.json');
  const fsyncs = await counter(a.registry, 'connector_journal_fsyncs_total', { kind: 'ack' });
  t.ok(fsyncs <= 150, `one fsync per ack flush, not per rename (${fsyncs})`);
  const b = await open(t, dir); // while a is still open: what ack() resolved is on disk
  t.same(b.j.pending(-1, 1000).map((r) => r.id), ids.filter((_, i) => i % 2 === 1));
});

t.test('recent records are served from memory; only evicted ones are read from disk', async (t) => {
  const a = await open(t, tempDir(t));
  const recs = [];
  for (let i = 0; i < 50; i++) recs.push(await a.j.append(meta(), Buffer.from(`m${i}`)));
  for (const r of a.j.pending()) t.equal((await a.j.readPayload(r)).toString(), `m${r.seq}`);
  t.equal(await counter(a.registry, 'connector_journal_disk_reads_total'), 0, 'no disk read for recent records');
  const b = await open(t, tempDir(t), { memory_cache_bytes: 0 });
  await b.j.append(meta(), Buffer.from('z'));
  t.equal((await b.j.readPayload(b.j.pending()[0]!)).toString(), 'z');
  t.ok((await counter(b.registry, 'connector_journal_disk_reads_total')) >= 1, 'with no memory budget it reads the disk');
});

t.test('replay loads sealed segments from their index without reading records; a stale index means a rescan', async (t) => {
  const dir = tempDir(t);
  const a = await open(t, dir, { segment_bytes: 65536 });
  const ids: string[] = [];
  for (let i = 0; i < 400; i++) ids.push((await a.j.append(meta(`d${i % 3}`), Buffer.alloc(500, i & 0xff))).id);
  for (const id of ids.slice(0, 100)) void a.j.ack(id);
  await a.j.ack(ids[99]!);
  await a.j.close();
  const b = await open(t, dir, { segment_bytes: 65536 });
  const line = b.logs.find((l) => l.msg === 'journal replayed');
  t.equal(line?.scanned, 0, 'no segment scanned');
  t.same(b.j.pending(-1, 1000).map((r) => r.id), ids.slice(100));
  t.same(b.j.pending(-1, 1000).map((r) => r.meta.deviceId), ids.slice(100).map((_, i) => `d${(i + 100) % 3}`), 'meta read back');
  await b.j.close();
  // append garbage to one segment: its index no longer matches, it is scanned and repaired
  const seg = segments(dir)[1]!;
  writeFileSync(path.join(dir, seg), randomBytes(100), { flag: 'a' });
  const c = await open(t, dir, { segment_bytes: 65536 });
  t.equal(c.logs.find((l) => l.msg === 'journal replayed')?.scanned, 1);
  t.same(c.j.pending(-1, 1000).map((r) => r.id), ids.slice(100));
});

t.test('a journal written by the previous format (JSON meta, ack.json) is read and migrated', async (t) => {
  const dir = tempDir(t);
  mkdirSync(dir, { recursive: true });
  const v1 = await import('../../bridge/journal/format-v1.js');
  const recs = [0, 1, 2, 3].map((seq) => {
    const payload = Buffer.from(`old-${seq}`);
    return v1.encodeRecord(seq, { id: `abcdef012345-3-${seq}`, m: meta(), size: payload.length, sha256: createHash('sha256').update(payload).digest('hex'), t: Date.now() }, payload);
  });
  writeFileSync(path.join(dir, v1.segmentName(0)), Buffer.concat(recs));
  writeFileSync(path.join(dir, 'ack.json'), v1.encodeAckState({ version: 1, floor: 1, done: [[2, 2]], next: 4 }));
  writeFileSync(path.join(dir, 'journal.json'), JSON.stringify({ version: 1, instanceId: 'abcdef012345', createdAt: 1, boots: 3 }));
  const a = await open(t, dir);
  const p = a.j.pending();
  t.same(p.map((r) => r.id), ['abcdef012345-3-1', 'abcdef012345-3-3'], 'old ids and acks kept');
  t.equal((await a.j.readPayload(p[1]!)).toString(), 'old-3');
  t.notOk(existsSync(path.join(dir, 'ack.json')), 'ack.json migrated into ack.log');
  const n = await a.j.append(meta(), Buffer.from('new'));
  t.ok(a.j.get(n.id)!.seq > 3, 'new seqs continue after the old ones');
  await a.j.ack('abcdef012345-3-1');
  await a.j.close();
  const b = await open(t, dir);
  t.same(b.j.pending().map((r) => r.id), ['abcdef012345-3-3', n.id]);
});

t.test('power cut: after kill -9 the newest segment is cut back to what was acknowledged (fsynced) plus a torn page; nothing acknowledged is lost', async (t) => {
  const dir = tempDir(t);
  const lines = await appendUntilKilled(t, dir, {
    writers: 6,
    base: 40,
    mod: 5,
    step: 200,
    config: config({ segment_bytes: 65536 }),
    enough: (l) => l.length >= 1200,
  });
  if (!lines) return;
  const acked = lines.filter((l) => l.startsWith('A ')).map((l) => l.slice(2));
  // lose the page cache: cut the newest segment right after the last acknowledged record, then add a torn page
  const jdir = path.join(dir, 'j');
  const ackedSet = new Set(acked);
  const newest = segments(jdir).pop()!;
  const file = path.join(jdir, newest);
  const data = readFileSync(file);
  const prefix = data.toString('ascii', 16, 16 + data.readUInt8(5));
  let off = SEGMENT_HEADER_BYTES;
  let cut = SEGMENT_HEADER_BYTES;
  // bounded by the file's length
  while (off < data.length) {
    const h = decodeHeaderV2(data, off);
    if (!h.ok) break;
    const len = RECORD_HEADER_BYTES + h.header.metaLen + h.header.payloadLen;
    if (off + len > data.length) break;
    off += len;
    if (ackedSet.has(prefix + h.header.seq)) cut = off;
  }
  const fd = openSync(file, 'r+');
  ftruncateSync(fd, cut);
  writeSync(fd, randomBytes(1500), 0, 1500, cut);
  closeSync(fd);
  const b = await open(t, jdir, { segment_bytes: 65536 });
  const ids = b.j.pending(-1, 1e6).map((r) => r.id);
  const have = new Set(ids);
  t.equal(have.size, ids.length, 'no duplicates');
  t.same(acked.filter((id) => !have.has(id)), [], `all ${acked.length} acknowledged messages survive`);
  const pos = new Map(ids.map((id, i) => [id, i]));
  const perDevice = new Map<string, number>();
  let disorder = 0;
  for (const r of b.j.pending(-1, 1e6)) {
    const last = perDevice.get(r.meta.deviceId) ?? -1;
    if (r.meta.receivedAt <= last) disorder++;
    perDevice.set(r.meta.deviceId, r.meta.receivedAt);
  }
  t.equal(disorder, 0, 'order per device kept');
  void pos;
});
