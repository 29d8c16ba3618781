import t from 'tap';
import {
  HEADER_BYTES,
  decodeAll,
  decodeAckState,
  decodeHeader,
  encodeAckState,
  encodeRecord,
  isDone,
  parseSegmentName,
  segmentName,
  type RecordMeta,
} from '../../bridge/journal-format.js';

const SHA = 'a'.repeat(64);
function meta(id: string, size: number, blob?: string): RecordMeta {
  return { id, m: { deviceId: 'd1', topic: 'devices/d1/up', qos: 1, receivedAt: 1 }, size, sha256: SHA, t: 5, ...(blob ? { blob } : {}) };
}

t.test('records round-trip, inline and blob', async (t) => {
  const a = encodeRecord(1, meta('x-1-1', 3), Buffer.from('abc'));
  const b = encodeRecord(2, meta('x-1-2', 1000, 'b.bin'), Buffer.alloc(0));
  const c = encodeRecord(7, meta('x-1-7', 0), Buffer.alloc(0));
  const d = decodeAll(Buffer.concat([a, b, c]));
  t.equal(d.error, undefined);
  t.equal(d.validBytes, a.length + b.length + c.length);
  t.same(d.records.map((r) => r.seq), [1, 2, 7]);
  t.equal(d.records[0]!.payload.toString(), 'abc');
  t.equal(d.records[1]!.meta.blob, 'b.bin');
  t.equal(d.records[1]!.meta.size, 1000);
  t.equal(d.records[2]!.payload.length, 0);
  t.equal(d.records[1]!.offset, a.length);
});

t.test('every single-byte corruption of a record is detected', async (t) => {
  const good = encodeRecord(1, meta('x-1-1', 5), Buffer.from('hello'));
  const next = encodeRecord(2, meta('x-1-2', 2), Buffer.from('hi'));
  for (let i = 0; i < next.length; i++) {
    const bad = Buffer.from(next);
    bad[i] = bad[i]! ^ 0x5a;
    const d = decodeAll(Buffer.concat([good, bad]));
    t.equal(d.records.length, 1, `flip at byte ${i} keeps only the good record`);
    t.equal(d.validBytes, good.length);
    t.ok(d.error, `flip at byte ${i} reported (${d.error})`);
  }
});

t.test('torn writes: every truncation point ends at the last complete record', async (t) => {
  const a = encodeRecord(1, meta('x-1-1', 4), Buffer.from('abcd'));
  const b = encodeRecord(2, meta('x-1-2', 4), Buffer.from('efgh'));
  const all = Buffer.concat([a, b]);
  for (let cut = a.length + 1; cut < all.length; cut++) {
    const d = decodeAll(all.subarray(0, cut));
    t.equal(d.records.length, 1);
    t.equal(d.validBytes, a.length);
    t.ok(d.error);
  }
});

t.test('headers with bad fields are refused with a reason', async (t) => {
  const r = encodeRecord(3, meta('x-1-3', 1), Buffer.from('z'));
  t.match(decodeHeader(r.subarray(0, 10)), { ok: false, reason: /short/ });
  const cases: Array<[number, (b: Buffer) => void, RegExp]> = [
    [0, (b) => b.writeUInt32BE(0, 0), /magic/],
    [1, (b) => b.writeUInt8(9, 4), /version/],
    [2, (b) => b.writeUInt8(0x80, 5), /flags/],
    [3, (b) => b.writeUInt32BE(0, 16), /meta length/],
    [4, (b) => b.writeUInt32BE(0xffffffff, 20), /payload length/],
    [5, (b) => b.writeBigUInt64BE(2n ** 60n, 8), /seq/],
  ];
  for (const [i, mutate, re] of cases) {
    const b = Buffer.from(r);
    mutate(b);
    t.match(decodeHeader(b), { ok: false, reason: re }, `case ${i}`);
  }
  const sz = Buffer.from(r);
  sz.writeBigUInt64BE(2n, 32);
  t.match(decodeHeader(sz), { ok: false, reason: /size differs/ });
  t.equal(decodeHeader(r).ok, true);
  t.match(decodeHeader(r), { header: { seq: 3, createdAt: 5, size: 1, payloadLen: 1 } });
  t.equal(HEADER_BYTES, 44);
});

t.test('non-increasing seq and malformed meta end the valid prefix', async (t) => {
  const a = encodeRecord(5, meta('x-1-5', 0), Buffer.alloc(0));
  const b = encodeRecord(5, meta('x-1-5b', 0), Buffer.alloc(0));
  t.match(decodeAll(Buffer.concat([a, b])), { validBytes: a.length, error: /sequence/ });
  // meta disagreeing with the header (a record written by a buggy writer)
  const c = encodeRecord(6, meta('x-1-6', 3), Buffer.from('abc'));
  const metaAt = c.indexOf('"t":5');
  c.write('"t":6', metaAt);
  const fixed = encodeRecord(6, meta('x-1-6', 3), Buffer.from('abc'));
  t.not(c.compare(fixed), 0);
  // recompute the CRC so that only the meta/header disagreement remains
  const { crc32 } = await import('node:zlib');
  c.writeUInt32BE(crc32(c.subarray(HEADER_BYTES), crc32(c.subarray(0, 40))) >>> 0, 40);
  t.match(decodeAll(c), { validBytes: 0, error: /meta/ });
  // blob name with a path separator
  const d = encodeRecord(7, meta('x-1-7', 10, '../evil'), Buffer.alloc(0));
  t.match(decodeAll(d), { validBytes: 0, error: /meta/ });
});

t.test('encodeRecord refuses impossible input', async (t) => {
  t.throws(() => encodeRecord(-1, meta('x', 0), Buffer.alloc(0)), RangeError);
  t.throws(() => encodeRecord(1.5, meta('x', 0), Buffer.alloc(0)), RangeError);
  t.throws(() => encodeRecord(1, meta('x', 5), Buffer.alloc(2)), RangeError, 'inline size mismatch');
});

t.test('segment names sort by first seq and parse back', async (t) => {
  t.equal(segmentName(42), 'seg-0000000000000042.log');
  t.equal(parseSegmentName(segmentName(42)), 42);
  t.equal(parseSegmentName('seg-42.log'), null);
  t.equal(parseSegmentName('ack.json'), null);
  const names = [1000, 2, 30].map(segmentName).sort();
  t.same(names.map(parseSegmentName), [2, 30, 1000]);
});

t.test('ack state encodes, decodes, and answers isDone', async (t) => {
  const s = { version: 1 as const, floor: 10, done: [[12, 14], [20, 20]] as Array<[number, number]>, next: 25 };
  const back = decodeAckState(encodeAckState(s));
  t.same(back, s);
  for (const [seq, want] of [[0, true], [9, true], [10, false], [11, false], [12, true], [14, true], [15, false], [20, true], [21, false]] as const) {
    t.equal(isDone(s, seq), want, `seq ${seq}`);
  }
  t.equal(decodeAckState('{'), null);
  t.equal(decodeAckState('null'), null);
  t.equal(decodeAckState(JSON.stringify({ ...s, version: 2 })), null);
  t.equal(decodeAckState(JSON.stringify({ ...s, done: [[5, 3]] })), null);
  t.equal(decodeAckState(JSON.stringify({ ...s, floor: 'x' })), null);
});
