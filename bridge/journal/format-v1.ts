/**
 * Legacy (format version 1) codec of journal records and of ack.json (no I/O). The journal
 * still READS these on replay (segments and ack.json written by older versions); it writes
 * format 2 (bridge/journal/format.ts).
 *
 * Segment file = a sequence of records, each:
 *
 *   offset size  field
 *   0      4     magic 0x454A5231 ("EJR1")
 *   4      1     format version (1)
 *   5      1     flags (bit 0: payload lives in a blob file named in the meta; inline payload is then empty)
 *   6      2     reserved (0)
 *   8      8     seq (uint64 BE; strictly increasing within a journal)
 *   16     4     meta length M (uint32 BE, 2 ≤ M ≤ MAX_META_BYTES)
 *   20     4     inline payload length P (uint32 BE, ≤ MAX_INLINE_BYTES)
 *   24     8     createdAt, ms since the epoch (uint64 BE; = meta.t)
 *   32     8     payload size (uint64 BE; = P for inline records, the blob's size otherwise; = meta.size)
 *   40     4     CRC-32 (zlib/IEEE) over bytes 0..40, then the M meta bytes, then the P payload bytes
 *   44     M     meta: UTF-8 JSON (RecordMeta: id, message meta, size, sha256, createdAt, blob)
 *   44+M   P     payload
 *
 * Integers are big-endian. A record is valid only if magic, version, lengths and CRC all check
 * (and, where it is parsed, the meta agrees with the header); the first invalid record ends a
 * segment (torn or corrupt tail). createdAt and size sit in the binary header so that replay
 * can rebuild its index without parsing every record's JSON.
 */
import { crc32 } from 'node:zlib';
import type { UplinkMessageMeta } from '../../core/ports.js';

export const RECORD_MAGIC = 0x454a5231;
export const FORMAT_VERSION = 1;
export const HEADER_BYTES = 44;
const CRC_AT = 40;
export const FLAG_BLOB = 1;
/** Sanity bounds checked on decode: a length beyond them is corruption, not a record. */
export const MAX_META_BYTES = 1024 * 1024;
export const MAX_INLINE_BYTES = 64 * 1024 * 1024;

/** What the meta JSON of a record holds. */
export interface RecordMeta {
  /** Stable message id: `<instanceId>-<boot>-<seq>`. */
  id: string;
  m: UplinkMessageMeta;
  /** Payload size in bytes (inline length, or blob file size). */
  size: number;
  /** SHA-256 of the payload, lowercase hex. */
  sha256: string;
  /** When the journal accepted it, ms since the epoch (journal clock; TTL counts from here). */
  t: number;
  /** Blob file name under journal/blobs/ when the payload is not inline. */
  blob?: string;
}

export interface RecordHeader {
  version: number;
  flags: number;
  seq: number;
  metaLen: number;
  payloadLen: number;
  createdAt: number;
  size: number;
  crc: number;
}

export type HeaderCheck = { ok: true; header: RecordHeader } | { ok: false; reason: string };

/** Encode one record: header + meta + inline payload (pass an empty buffer for blob records). */
export function encodeRecord(seq: number, meta: RecordMeta, payload: Buffer): Buffer {
  const metaBuf = Buffer.from(JSON.stringify(meta), 'utf8');
  if (metaBuf.length > MAX_META_BYTES) throw new RangeError(`record meta is ${metaBuf.length} bytes, more than ${MAX_META_BYTES}`);
  if (payload.length > MAX_INLINE_BYTES) throw new RangeError(`inline payload is ${payload.length} bytes, more than ${MAX_INLINE_BYTES}`);
  if (!Number.isSafeInteger(seq) || seq < 0) throw new RangeError(`bad seq ${seq}`);
  if (!Number.isSafeInteger(meta.t) || meta.t < 0 || !Number.isSafeInteger(meta.size) || meta.size < 0) throw new RangeError('bad createdAt or size');
  if (!meta.blob && meta.size !== payload.length) throw new RangeError('inline payload length differs from meta.size');
  const out = Buffer.allocUnsafe(HEADER_BYTES + metaBuf.length + payload.length);
  out.writeUInt32BE(RECORD_MAGIC, 0);
  out.writeUInt8(FORMAT_VERSION, 4);
  out.writeUInt8(meta.blob ? FLAG_BLOB : 0, 5);
  out.writeUInt16BE(0, 6);
  out.writeBigUInt64BE(BigInt(seq), 8);
  out.writeUInt32BE(metaBuf.length, 16);
  out.writeUInt32BE(payload.length, 20);
  out.writeBigUInt64BE(BigInt(meta.t), 24);
  out.writeBigUInt64BE(BigInt(meta.size), 32);
  metaBuf.copy(out, HEADER_BYTES);
  payload.copy(out, HEADER_BYTES + metaBuf.length);
  let crc = crc32(out.subarray(0, CRC_AT));
  crc = crc32(out.subarray(HEADER_BYTES), crc);
  out.writeUInt32BE(crc >>> 0, CRC_AT);
  return out;
}

/** Parse and sanity-check a header (the CRC is checked later over the body). */
export function decodeHeader(buf: Buffer): HeaderCheck {
  if (buf.length < HEADER_BYTES) return { ok: false, reason: `short header (${buf.length} bytes)` };
  if (buf.readUInt32BE(0) !== RECORD_MAGIC) return { ok: false, reason: 'bad magic' };
  const version = buf.readUInt8(4);
  if (version !== FORMAT_VERSION) return { ok: false, reason: `unknown record version ${version}` };
  const flags = buf.readUInt8(5);
  if ((flags & ~FLAG_BLOB) !== 0 || buf.readUInt16BE(6) !== 0) return { ok: false, reason: 'unknown flags' };
  const seqBig = buf.readBigUInt64BE(8);
  if (seqBig > BigInt(Number.MAX_SAFE_INTEGER)) return { ok: false, reason: 'seq out of range' };
  const metaLen = buf.readUInt32BE(16);
  const payloadLen = buf.readUInt32BE(20);
  if (metaLen < 2 || metaLen > MAX_META_BYTES) return { ok: false, reason: `bad meta length ${metaLen}` };
  if (payloadLen > MAX_INLINE_BYTES) return { ok: false, reason: `bad payload length ${payloadLen}` };
  if ((flags & FLAG_BLOB) !== 0 && payloadLen !== 0) return { ok: false, reason: 'blob record with inline payload' };
  const createdAt = buf.readBigUInt64BE(24);
  const size = buf.readBigUInt64BE(32);
  if (createdAt > BigInt(Number.MAX_SAFE_INTEGER) || size > BigInt(Number.MAX_SAFE_INTEGER)) return { ok: false, reason: 'createdAt or size out of range' };
  if ((flags & FLAG_BLOB) === 0 && Number(size) !== payloadLen) return { ok: false, reason: 'size differs from the inline payload length' };
  return { ok: true, header: { version, flags, seq: Number(seqBig), metaLen, payloadLen, createdAt: Number(createdAt), size: Number(size), crc: buf.readUInt32BE(CRC_AT) } };
}

/** Start of the CRC over a record: the header bytes before the CRC field. Continue with crc32(body, state). */
export function headerCrc(header: Buffer): number {
  return crc32(header.subarray(0, CRC_AT));
}

export { crc32 };

const HEX64 = /^[0-9a-f]{64}$/;

/** Parse a record's meta JSON; null when it is not a well-formed RecordMeta. */
export function parseMeta(buf: Buffer, header: RecordHeader): RecordMeta | null {
  let v: unknown;
  try {
    v = JSON.parse(buf.toString('utf8'));
  } catch {
    return null;
  }
  if (!v || typeof v !== 'object') return null;
  const r = v as Partial<RecordMeta>;
  if (typeof r.id !== 'string' || !r.id || typeof r.sha256 !== 'string' || !HEX64.test(r.sha256)) return null;
  if (typeof r.size !== 'number' || !Number.isSafeInteger(r.size) || r.size < 0 || typeof r.t !== 'number') return null;
  if (!r.m || typeof r.m !== 'object' || typeof r.m.deviceId !== 'string' || typeof r.m.topic !== 'string') return null;
  const isBlob = (header.flags & FLAG_BLOB) !== 0;
  if (isBlob !== (typeof r.blob === 'string')) return null;
  if (isBlob && !/^[A-Za-z0-9._-]+$/.test(r.blob!)) return null;
  if (r.size !== header.size || r.t !== header.createdAt) return null;
  return r as RecordMeta;
}

/**
 * Decode every complete valid record in an in-memory segment image (tests and small
 * segments). Stops at the first invalid record; `validBytes` is where to truncate.
 */
export function decodeAll(buf: Buffer): { records: Array<{ offset: number; seq: number; meta: RecordMeta; payload: Buffer }>; validBytes: number; error?: string } {
  const records: Array<{ offset: number; seq: number; meta: RecordMeta; payload: Buffer }> = [];
  let off = 0;
  let lastSeq = -1;
  while (off < buf.length) {
    const h = decodeHeader(buf.subarray(off, off + HEADER_BYTES));
    if (!h.ok) return { records, validBytes: off, error: h.reason };
    const { metaLen, payloadLen, seq, crc } = h.header;
    const end = off + HEADER_BYTES + metaLen + payloadLen;
    if (end > buf.length) return { records, validBytes: off, error: 'record runs past the end of the segment (torn write)' };
    const body = buf.subarray(off + HEADER_BYTES, end);
    if ((crc32(body, headerCrc(buf.subarray(off, off + HEADER_BYTES))) >>> 0) !== crc) return { records, validBytes: off, error: 'checksum mismatch' };
    if (seq <= lastSeq) return { records, validBytes: off, error: 'sequence not increasing' };
    const meta = parseMeta(body.subarray(0, metaLen), h.header);
    if (!meta) return { records, validBytes: off, error: 'malformed record meta' };
    records.push({ offset: off, seq, meta, payload: body.subarray(metaLen) });
    lastSeq = seq;
    off = end;
  }
  return { records, validBytes: off };
}

/** Segment file name for a segment whose first record has `firstSeq` (sorts by name). */
export function segmentName(firstSeq: number): string {
  return `seg-${String(firstSeq).padStart(16, '0')}.log`;
}

export function parseSegmentName(name: string): number | null {
  const m = /^seg-(\d{16})\.log$/.exec(name);
  return m ? Number(m[1]) : null;
}

/**
 * Persisted acknowledgement state: every seq < floor is done (acknowledged, dropped or
 * quarantined), plus the inclusive seq ranges in `done` above the floor (selective acks).
 * `next` is the next seq the journal would assign (ids are never reused).
 */
export interface AckState {
  version: 1;
  floor: number;
  done: Array<[number, number]>;
  next: number;
}

export function encodeAckState(s: AckState): string {
  return JSON.stringify(s) + '\n';
}

export function decodeAckState(text: string): AckState | null {
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch {
    return null;
  }
  if (!v || typeof v !== 'object') return null;
  const s = v as Partial<AckState>;
  if (s.version !== 1 || !Number.isSafeInteger(s.floor) || !Number.isSafeInteger(s.next) || !Array.isArray(s.done)) return null;
  for (const r of s.done) {
    if (!Array.isArray(r) || r.length !== 2 || !Number.isSafeInteger(r[0]) || !Number.isSafeInteger(r[1]) || r[0] > r[1]) return null;
  }
  return s as AckState;
}

/** True when `seq` is done under an ack state. `done` must be sorted (as encoded). */
export function isDone(s: AckState, seq: number): boolean {
  if (seq < s.floor) return true;
  let lo = 0;
  let hi = s.done.length - 1;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    const [a, b] = s.done[mid]!;
    if (seq < a) hi = mid - 1;
    else if (seq > b) lo = mid + 1;
    else return true;
  }
  return false;
}
