/**
 * Pure codecs of the journal's files, format version 2 (no I/O).
 *
 * ## Segment file `seg-<firstSeq>.log`
 * A 64-byte segment header, then records back to back (one sequential append stream).
 *
 *   segment header (64 bytes)
 *   0   4  magic 0x454A5332 ("EJS2")
 *   4   1  version (2)
 *   5   1  id prefix length L (1..48)
 *   6   2  reserved (0)
 *   8   8  first seq (uint64 BE) = the number in the file name
 *   16  48 id prefix `<instanceId>-<bootNonce>-` (ASCII, zero padded): the id of every record of
 *          the segment is prefix + seq, so neither the record nor the in-memory index stores it
 *   60  4  CRC-32 of bytes 0..60
 *
 *   record (72-byte header + binary meta + inline payload)
 *   0   4  magic 0x454A5232 ("EJR2")
 *   4   1  version (2)
 *   5   1  flags (bit 0: payload in a blob file named in the meta; inline payload is then empty)
 *   6   2  meta length M (uint16 BE)
 *   8   8  seq (uint64 BE; strictly increasing within a journal)
 *   16  4  inline payload length P (uint32 BE, ≤ MAX_INLINE_BYTES)
 *   20  8  createdAt, journal clock ms (uint64 BE; see bridge/journal/clock.ts)
 *   28  8  payload size (uint64 BE; = P inline, the blob's size otherwise)
 *   36  32 SHA-256 of the payload (raw)
 *   68  4  CRC-32 over bytes 0..68, then the M meta bytes, then the P payload bytes
 *   72  M  meta (binary, encodeMeta below)
 *   72+M P payload
 *
 * Why binary and not JSON: the record is what each message costs in disk writes (flash
 * wear) and in replay time. A 64 B MQTT message is ≈175 bytes on disk in this format
 * (format 1 with JSON meta and a hex digest: ≈330).
 *
 * ## Segment index `seg-<firstSeq>.idx`
 * Written once when a segment is sealed (rolled over or closed): the in-memory index of the
 * segment as typed arrays, so that replay loads it in one read instead of scanning every
 * record (issue 11: ready in ≤ 2 s with a million queued messages). Not fsynced: a missing,
 * stale or torn index fails its CRC or size check and the segment is scanned instead.
 *
 * ## Ack log `ack.log`
 * See bridge/journal/ack-log.ts: two preallocated regions of fixed 32-byte entries.
 *
 * Integers in records and ack entries are big-endian; the .idx arrays are in the host's
 * byte order (checked by a marker, a mismatch just means a rescan).
 */
import { crc32 } from 'node:zlib';
import os from 'node:os';
import type { UplinkMessageMeta } from '../../core/ports.js';

export { crc32 };

// ───────────────────────────── segment header ─────────────────────────────

export const SEGMENT_MAGIC = 0x454a5332;
export const SEGMENT_HEADER_BYTES = 64;
export const MAX_PREFIX_BYTES = 48;

export function encodeSegmentHeader(firstSeq: number, idPrefix: string): Buffer {
  const p = Buffer.from(idPrefix, 'ascii');
  if (p.length < 1 || p.length > MAX_PREFIX_BYTES) throw new RangeError(`id prefix of ${p.length} bytes (1..${MAX_PREFIX_BYTES})`);
  const b = Buffer.alloc(SEGMENT_HEADER_BYTES);
  b.writeUInt32BE(SEGMENT_MAGIC, 0);
  b.writeUInt8(2, 4);
  b.writeUInt8(p.length, 5);
  b.writeBigUInt64BE(BigInt(firstSeq), 8);
  p.copy(b, 16);
  b.writeUInt32BE(crc32(b.subarray(0, 60)) >>> 0, 60);
  return b;
}

/** The id prefix and first seq of a v2 segment header; null when `buf` does not start with a valid one. */
export function decodeSegmentHeader(buf: Buffer): { firstSeq: number; idPrefix: string } | null {
  if (buf.length < SEGMENT_HEADER_BYTES || buf.readUInt32BE(0) !== SEGMENT_MAGIC || buf.readUInt8(4) !== 2) return null;
  if ((crc32(buf.subarray(0, 60)) >>> 0) !== buf.readUInt32BE(60)) return null;
  const len = buf.readUInt8(5);
  if (len < 1 || len > MAX_PREFIX_BYTES) return null;
  const first = buf.readBigUInt64BE(8);
  if (first > BigInt(Number.MAX_SAFE_INTEGER)) return null;
  return { firstSeq: Number(first), idPrefix: buf.toString('ascii', 16, 16 + len) };
}

// ───────────────────────────── record ─────────────────────────────

export const RECORD_MAGIC_V2 = 0x454a5232;
export const RECORD_HEADER_BYTES = 72;
const CRC_AT = 68;
export const FLAG_BLOB = 1;
export const MAX_META_BYTES_V2 = 0xffff;
/** Sanity bound on an inline payload when decoding (the writer puts at most 1 MiB inline). */
export const MAX_INLINE_BYTES_V2 = 64 * 1024 * 1024;

export interface RecordHeaderV2 {
  flags: number;
  metaLen: number;
  seq: number;
  payloadLen: number;
  createdAt: number;
  size: number;
  crc: number;
}

/** What the binary meta of a record holds. */
export interface RecordMetaV2 {
  m: UplinkMessageMeta;
  /** Blob file name under journal/blobs/ when the payload is not inline. */
  blob?: string;
}

/**
 * Binary meta: u16 deviceId len + bytes, u16 topic len + bytes, u8 qos, u8 opts, f64 receivedAt, [u16 packetId], [u8 len + contentType], [u8 len + blob].
 * Strings are measured with Buffer.byteLength and written straight into the one buffer: this runs for every
 * message, and encoding each string into a temporary array first was 4 short-lived allocations per record.
 */
export function encodeMeta(meta: UplinkMessageMeta, blob?: string): Buffer {
  const devLen = Buffer.byteLength(meta.deviceId, 'utf8');
  const topicLen = Buffer.byteLength(meta.topic, 'utf8');
  const ctLen = meta.contentType !== undefined ? Buffer.byteLength(meta.contentType, 'utf8') : -1;
  const blLen = blob !== undefined ? Buffer.byteLength(blob, 'utf8') : -1;
  if (devLen > 0xffff || topicLen > 0xffff) throw new RangeError('device id or topic longer than 65535 bytes');
  if (ctLen > 255 || blLen > 255) throw new RangeError('content type or blob name longer than 255 bytes');
  const hasPid = meta.packetId !== undefined;
  const len = 2 + devLen + 2 + topicLen + 1 + 1 + 8 + (hasPid ? 2 : 0) + (ctLen >= 0 ? 1 + ctLen : 0) + (blLen >= 0 ? 1 + blLen : 0);
  if (len > MAX_META_BYTES_V2) throw new RangeError(`record meta of ${len} bytes, more than ${MAX_META_BYTES_V2}`);
  const b = Buffer.allocUnsafe(len);
  let o = b.writeUInt16BE(devLen, 0);
  o += b.write(meta.deviceId, o, devLen, 'utf8');
  o = b.writeUInt16BE(topicLen, o);
  o += b.write(meta.topic, o, topicLen, 'utf8');
  o = b.writeUInt8(meta.qos, o);
  o = b.writeUInt8((hasPid ? 1 : 0) | (ctLen >= 0 ? 2 : 0) | (blLen >= 0 ? 4 : 0), o);
  o = b.writeDoubleBE(meta.receivedAt, o);
  if (hasPid) o = b.writeUInt16BE(meta.packetId! & 0xffff, o);
  if (ctLen >= 0) {
    o = b.writeUInt8(ctLen, o);
    o += b.write(meta.contentType!, o, ctLen, 'utf8');
  }
  if (blLen >= 0) {
    o = b.writeUInt8(blLen, o);
    b.write(blob!, o, blLen, 'utf8');
  }
  return b;
}

/** Decode a binary meta; null when malformed. */
export function decodeMeta(b: Buffer): RecordMetaV2 | null {
  try {
    let o = 0;
    const devLen = b.readUInt16BE(o);
    o += 2;
    const deviceId = b.toString('utf8', o, o + devLen);
    o += devLen;
    const topicLen = b.readUInt16BE(o);
    o += 2;
    const topic = b.toString('utf8', o, o + topicLen);
    o += topicLen;
    const qos = b.readUInt8(o++);
    const opts = b.readUInt8(o++);
    const receivedAt = b.readDoubleBE(o);
    o += 8;
    if ((qos !== 0 && qos !== 1) || (opts & ~7) !== 0 || !Number.isFinite(receivedAt)) return null;
    const m: UplinkMessageMeta = { deviceId, topic, qos, receivedAt };
    if (opts & 1) {
      m.packetId = b.readUInt16BE(o);
      o += 2;
    }
    if (opts & 2) {
      const l = b.readUInt8(o++);
      m.contentType = b.toString('utf8', o, o + l);
      o += l;
    }
    let blob: string | undefined;
    if (opts & 4) {
      const l = b.readUInt8(o++);
      blob = b.toString('utf8', o, o + l);
      o += l;
      if (!/^[A-Za-z0-9._-]+$/.test(blob)) return null;
    }
    if (o !== b.length) return null;
    return blob !== undefined ? { m, blob } : { m };
  } catch {
    return null;
  }
}

/**
 * Device id and packet id of a QoS 1 binary meta at [off, off+len) of `b`, read without
 * decoding the rest (the redelivery seeding skips most records on these two alone); null
 * when the meta has no packet id, is not QoS 1 or does not fit. Not a validity check: a record
 * that is used must still pass its CRC and decodeMeta.
 */
export function peekDevicePid(b: Buffer, off: number, len: number): { deviceId: string; packetId: number } | null {
  const end = off + len;
  if (len < 14 || end > b.length) return null;
  const devLen = b.readUInt16BE(off);
  let o = off + 2 + devLen;
  if (o + 2 > end) return null;
  const topicLen = b.readUInt16BE(o);
  o += 2 + topicLen;
  if (o + 12 > end) return null;
  if (b[o] !== 1 || (b[o + 1]! & 1) === 0) return null;
  return { deviceId: b.toString('utf8', off + 2, off + 2 + devLen), packetId: b.readUInt16BE(o + 10) };
}

/** Bytes of a record with this meta and inline payload length. */
export function recordBytes(metaLen: number, payloadLen: number): number {
  return RECORD_HEADER_BYTES + metaLen + payloadLen;
}

/**
 * Encode one record into `out` at `off` (the group commit builds a whole batch in one buffer:
 * one copy of each payload, one write). Returns the offset after the record.
 */
export function encodeRecordInto(out: Buffer, off: number, seq: number, createdAt: number, size: number, sha256: Buffer, meta: Buffer, payload: Buffer, blob: boolean): number {
  if (sha256.length !== 32) throw new RangeError('sha256 must be 32 bytes');
  if (meta.length > MAX_META_BYTES_V2) throw new RangeError('meta too long');
  out.writeUInt32BE(RECORD_MAGIC_V2, off);
  out.writeUInt8(2, off + 4);
  out.writeUInt8(blob ? FLAG_BLOB : 0, off + 5);
  out.writeUInt16BE(meta.length, off + 6);
  out.writeBigUInt64BE(BigInt(seq), off + 8);
  out.writeUInt32BE(payload.length, off + 16);
  out.writeBigUInt64BE(BigInt(Math.max(0, Math.floor(createdAt))), off + 20);
  out.writeBigUInt64BE(BigInt(size), off + 28);
  sha256.copy(out, off + 36);
  meta.copy(out, off + RECORD_HEADER_BYTES);
  payload.copy(out, off + RECORD_HEADER_BYTES + meta.length);
  const end = off + RECORD_HEADER_BYTES + meta.length + payload.length;
  let crc = crc32(out.subarray(off, off + CRC_AT));
  crc = crc32(out.subarray(off + RECORD_HEADER_BYTES, end), crc);
  out.writeUInt32BE(crc >>> 0, off + CRC_AT);
  return end;
}

/** Convenience for tests and tools: one record in its own buffer. */
export function encodeRecordV2(seq: number, createdAt: number, meta: UplinkMessageMeta, payload: Buffer, sha256: Buffer, blob?: { name: string; size: number }): Buffer {
  const mb = encodeMeta(meta, blob?.name);
  const inline = blob ? Buffer.alloc(0) : payload;
  const out = Buffer.allocUnsafe(recordBytes(mb.length, inline.length));
  encodeRecordInto(out, 0, seq, createdAt, blob ? blob.size : payload.length, sha256, mb, inline, !!blob);
  return out;
}

export type HeaderCheckV2 = { ok: true; header: RecordHeaderV2 } | { ok: false; reason: string };

/** Parse and sanity-check a v2 record header at `off` (the CRC is checked separately). */
export function decodeHeaderV2(buf: Buffer, off = 0): HeaderCheckV2 {
  if (buf.length - off < RECORD_HEADER_BYTES) return { ok: false, reason: `short header (${buf.length - off} bytes)` };
  if (buf.readUInt32BE(off) !== RECORD_MAGIC_V2) return { ok: false, reason: 'bad magic' };
  if (buf.readUInt8(off + 4) !== 2) return { ok: false, reason: `unknown record version ${buf.readUInt8(off + 4)}` };
  const flags = buf.readUInt8(off + 5);
  if ((flags & ~FLAG_BLOB) !== 0) return { ok: false, reason: 'unknown flags' };
  const metaLen = buf.readUInt16BE(off + 6);
  const seqBig = buf.readBigUInt64BE(off + 8);
  const payloadLen = buf.readUInt32BE(off + 16);
  const created = buf.readBigUInt64BE(off + 20);
  const size = buf.readBigUInt64BE(off + 28);
  if (seqBig > BigInt(Number.MAX_SAFE_INTEGER) || created > BigInt(Number.MAX_SAFE_INTEGER) || size > BigInt(Number.MAX_SAFE_INTEGER)) return { ok: false, reason: 'seq, createdAt or size out of range' };
  if (metaLen < 14) return { ok: false, reason: `bad meta length ${metaLen}` };
  if (payloadLen > MAX_INLINE_BYTES_V2) return { ok: false, reason: `bad payload length ${payloadLen}` };
  if ((flags & FLAG_BLOB) !== 0 && payloadLen !== 0) return { ok: false, reason: 'blob record with inline payload' };
  if ((flags & FLAG_BLOB) === 0 && Number(size) !== payloadLen) return { ok: false, reason: 'size differs from the inline payload length' };
  return { ok: true, header: { flags, metaLen, seq: Number(seqBig), payloadLen, createdAt: Number(created), size: Number(size), crc: buf.readUInt32BE(off + CRC_AT) } };
}

/** True when the CRC of the complete record at [off, off+len) checks. */
export function recordCrcOk(buf: Buffer, off: number, len: number): boolean {
  let crc = crc32(buf.subarray(off, off + CRC_AT));
  crc = crc32(buf.subarray(off + RECORD_HEADER_BYTES, off + len), crc);
  return (crc >>> 0) === buf.readUInt32BE(off + CRC_AT);
}

export function shaOfRecord(buf: Buffer, off = 0): Buffer {
  return buf.subarray(off + 36, off + 68);
}

/** Where the next plausible v2 record starts at or after `from` (magic + version), or -1. */
export function findMagicV2(buf: Buffer, from: number): number {
  const pat = Buffer.from([0x45, 0x4a, 0x52, 0x32, 0x02]);
  return buf.indexOf(pat, from);
}

// ───────────────────────────── segment index (.idx) ─────────────────────────────

export const IDX_MAGIC = 0x454a5832;
const IDX_HEADER = 32;
const LE = os.endianness() === 'LE' ? 1 : 2;

/** The per-segment index arrays (exactly `count` long). */
export interface IndexArrays {
  count: number;
  seqs: Float64Array;
  created: Float64Array;
  offsets: Uint32Array;
  lens: Uint32Array;
  metaLens: Uint32Array;
  /** Blob records: seq → [file name, size]. */
  blobs: Array<[number, string, number]>;
}

function bytesOf(a: Float64Array | Uint32Array): Buffer {
  return Buffer.from(a.buffer, a.byteOffset, a.byteLength);
}

export function encodeIndex(segBytes: number, a: IndexArrays): Buffer {
  const n = a.count;
  const extra = Buffer.from(JSON.stringify({ blobs: a.blobs }), 'utf8');
  const body = [bytesOf(a.seqs.subarray(0, n)), bytesOf(a.created.subarray(0, n)), bytesOf(a.offsets.subarray(0, n)), bytesOf(a.lens.subarray(0, n)), bytesOf(a.metaLens.subarray(0, n)), extra];
  const h = Buffer.alloc(IDX_HEADER);
  h.writeUInt32BE(IDX_MAGIC, 0);
  h.writeUInt8(2, 4);
  h.writeUInt8(LE, 5);
  h.writeUInt32BE(n, 8);
  h.writeBigUInt64BE(BigInt(segBytes), 16);
  h.writeUInt32BE(extra.length, 24);
  const all = Buffer.concat([h, ...body, Buffer.alloc(4)]);
  all.writeUInt32BE(crc32(all.subarray(0, all.length - 4)) >>> 0, all.length - 4);
  return all;
}

/** Decode an index file; null when it is not a valid index of a segment of `segBytes` bytes. */
export function decodeIndex(buf: Buffer, segBytes: number): IndexArrays | null {
  if (buf.length < IDX_HEADER + 4 || buf.readUInt32BE(0) !== IDX_MAGIC || buf.readUInt8(4) !== 2 || buf.readUInt8(5) !== LE) return null;
  if ((crc32(buf.subarray(0, buf.length - 4)) >>> 0) !== buf.readUInt32BE(buf.length - 4)) return null;
  if (Number(buf.readBigUInt64BE(16)) !== segBytes) return null;
  const n = buf.readUInt32BE(8);
  const extraLen = buf.readUInt32BE(24);
  if (buf.length !== IDX_HEADER + n * 28 + extraLen + 4) return null;
  // The arrays are views of the file's buffer when it is its own (readFileSync of an index
  // above the pool size gets a buffer of its own at offset 0; IDX_HEADER and the f64 arrays
  // keep every array aligned): no second copy of 28 B per record, no garbage of that size at
  // start (issue 11: 1 M records = 28 MB). Otherwise they are copied into fresh arrays.
  const own = buf.byteOffset === 0 && buf.buffer.byteLength === buf.length; // not a slice of a shared pool
  let o = IDX_HEADER;
  const f64 = (): Float64Array => {
    const out = own ? new Float64Array(buf.buffer, buf.byteOffset + o, n) : new Float64Array(n);
    if (!own) bytesOf(out).set(buf.subarray(o, o + n * 8));
    o += n * 8;
    return out;
  };
  const u32 = (): Uint32Array => {
    const out = own ? new Uint32Array(buf.buffer, buf.byteOffset + o, n) : new Uint32Array(n);
    if (!own) bytesOf(out).set(buf.subarray(o, o + n * 4));
    o += n * 4;
    return out;
  };
  const seqs = f64();
  const created = f64();
  const offsets = u32();
  const lens = u32();
  const metaLens = u32();
  let blobs: Array<[number, string, number]>;
  try {
    const x = JSON.parse(buf.toString('utf8', o, o + extraLen)) as { blobs?: unknown };
    if (!Array.isArray(x.blobs)) return null;
    blobs = x.blobs as Array<[number, string, number]>;
    for (const b of blobs) if (!Array.isArray(b) || typeof b[0] !== 'number' || typeof b[1] !== 'string' || !/^[A-Za-z0-9._-]+$/.test(b[1]) || typeof b[2] !== 'number') return null;
  } catch {
    return null;
  }
  for (let i = 1; i < n; i++) if (!(seqs[i]! > seqs[i - 1]!)) return null;
  return { count: n, seqs, created, offsets, lens, metaLens, blobs };
}

export function indexName(segName: string): string {
  return segName.replace(/\.log$/, '.idx');
}

// ───────────────────────────── ack log entries ─────────────────────────────

export const ACK_ENTRY_BYTES = 32;
const ACK_MAGIC = 0xa7c5;
export const ACK_HEAD = 1;
export const ACK_RANGE = 2;
export const ACK_FLOOR = 3;

export interface AckEntry {
  type: number;
  gen: number;
  a: number;
  b: number;
}

export function encodeAckEntry(out: Buffer, off: number, e: AckEntry): void {
  out.fill(0, off, off + ACK_ENTRY_BYTES);
  out.writeUInt16BE(ACK_MAGIC, off);
  out.writeUInt8(e.type, off + 2);
  out.writeUInt32BE(e.gen >>> 0, off + 4);
  out.writeBigUInt64BE(BigInt(e.a), off + 8);
  out.writeBigUInt64BE(BigInt(e.b), off + 16);
  out.writeUInt32BE(crc32(out.subarray(off, off + 24)) >>> 0, off + 24);
}

export function decodeAckEntry(buf: Buffer, off: number): AckEntry | null {
  if (buf.length - off < ACK_ENTRY_BYTES || buf.readUInt16BE(off) !== ACK_MAGIC) return null;
  if ((crc32(buf.subarray(off, off + 24)) >>> 0) !== buf.readUInt32BE(off + 24)) return null;
  const type = buf.readUInt8(off + 2);
  if (type !== ACK_HEAD && type !== ACK_RANGE && type !== ACK_FLOOR) return null;
  const a = buf.readBigUInt64BE(off + 8);
  const b = buf.readBigUInt64BE(off + 16);
  if (a > BigInt(Number.MAX_SAFE_INTEGER) || b > BigInt(Number.MAX_SAFE_INTEGER)) return null;
  return { type, gen: buf.readUInt32BE(off + 4), a: Number(a), b: Number(b) };
}

/** The acknowledged state a region of the ack log describes. */
export interface AckRegionState {
  gen: number;
  floor: number;
  /** Done ranges [a, b] (inclusive), as written (not merged). */
  ranges: Array<[number, number]>;
  /** Entries used in the region (where the next entry goes). */
  used: number;
}

/**
 * Parse one region: a HEAD (a = floor, b = number of RANGE entries of the checkpoint), the
 * checkpoint's ranges, then appended FLOOR/RANGE entries of the same generation until the
 * first invalid one. null when the checkpoint is incomplete (a compaction cut by a crash).
 */
export function parseAckRegion(buf: Buffer): AckRegionState | null {
  const head = decodeAckEntry(buf, 0);
  if (!head || head.type !== ACK_HEAD) return null;
  const cap = Math.floor(buf.length / ACK_ENTRY_BYTES);
  if (head.b + 1 > cap) return null;
  const s: AckRegionState = { gen: head.gen, floor: head.a, ranges: [], used: 1 };
  for (let i = 1; i <= head.b; i++) {
    const e = decodeAckEntry(buf, i * ACK_ENTRY_BYTES);
    if (!e || e.type !== ACK_RANGE || e.gen !== head.gen || e.a > e.b) return null;
    s.ranges.push([e.a, e.b]);
  }
  let i = head.b + 1;
  for (; i < cap; i++) {
    const e = decodeAckEntry(buf, i * ACK_ENTRY_BYTES);
    if (!e || e.gen !== head.gen || e.type === ACK_HEAD) break;
    if (e.type === ACK_FLOOR) s.floor = Math.max(s.floor, e.a);
    else if (e.a <= e.b) s.ranges.push([e.a, e.b]);
    else break;
  }
  s.used = i;
  return s;
}

/** Sorted, merged done ranges above a floor: what replay tests each seq against. */
export class DoneSet {
  readonly floor: number;
  private readonly starts: Float64Array;
  private readonly ends: Float64Array;
  readonly maxSeen: number;
  constructor(floor: number, ranges: ReadonlyArray<readonly [number, number]>) {
    const rs = ranges.filter((r) => r[1] >= floor).map((r) => [Math.max(r[0], floor), r[1]] as [number, number]).sort((x, y) => x[0] - y[0]);
    const merged: Array<[number, number]> = [];
    for (const r of rs) {
      const last = merged[merged.length - 1];
      if (last && r[0] <= last[1] + 1) last[1] = Math.max(last[1], r[1]);
      else merged.push([r[0], r[1]]);
    }
    let f = floor;
    while (merged.length && merged[0]![0] <= f) f = Math.max(f, merged.shift()![1] + 1);
    this.floor = f;
    this.starts = Float64Array.from(merged.map((r) => r[0]));
    this.ends = Float64Array.from(merged.map((r) => r[1]));
    let max = f - 1;
    for (const r of ranges) if (r[1] > max) max = r[1];
    this.maxSeen = max;
  }
  has(seq: number): boolean {
    if (seq < this.floor) return true;
    let lo = 0;
    let hi = this.starts.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      if (seq < this.starts[mid]!) hi = mid - 1;
      else if (seq > this.ends[mid]!) lo = mid + 1;
      else return true;
    }
    return false;
  }
  /** True when no seq of [lo, hi] is done (replay then marks a whole segment live at once). */
  noneIn(lo: number, hi: number): boolean {
    if (lo < this.floor) return false;
    // the first range ending at or after lo must start after hi
    let a = 0;
    let b = this.starts.length;
    while (a < b) {
      const mid = (a + b) >> 1;
      if (this.ends[mid]! < lo) a = mid + 1;
      else b = mid;
    }
    return a === this.starts.length || this.starts[a]! > hi;
  }
  get rangeCount(): number {
    return this.starts.length;
  }
}
