/**
 * Replay: rebuild a segment's index at start (issue 11: ready in ≤ 2 s with 1 M queued).
 *
 *  - A sealed segment with a valid `.idx` (CRC, same segment size) is loaded in one read:
 *    no record is touched. Records are checked (CRC) when they are read for the uplink.
 *  - Otherwise (the segment a crash left open, a missing or stale .idx, a format 1 segment)
 *    every record is scanned: header, length, CRC, increasing seq. A bad record is cut up to
 *    the next valid record found by its magic (a corrupt record in the middle costs only
 *    itself — issue 9 #5), or, when no valid record follows, the tail is truncated (a torn
 *    write). Cut bytes are copied to quarantine/corrupt-<segment>-<offset>.bin, counted and
 *    logged with ECONN_JOURNAL_CORRUPT. An index is then written so the next start is fast.
 *
 * Reads are synchronous: replay runs before anything else listens, and positioned reads of
 * 8 MiB windows are the fastest way through the page cache.
 */
import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from '../../core/logger.js';
import {
  FLAG_BLOB,
  RECORD_HEADER_BYTES,
  SEGMENT_HEADER_BYTES,
  decodeHeaderV2,
  decodeIndex,
  decodeMeta,
  decodeSegmentHeader,
  encodeIndex,
  findMagicV2,
  indexName,
  recordCrcOk,
} from './format.js';
import { HEADER_BYTES as V1_HEADER_BYTES, RECORD_MAGIC as V1_MAGIC, crc32 as v1crc, decodeHeader as decodeHeaderV1, headerCrc as v1HeaderCrc, parseMeta as parseMetaV1 } from './format-v1.js';
import { Segment, preadExact } from './segment.js';

/** Scan window: large sequential reads, bounded memory (a record larger than this gets its own read). */
const WINDOW = 8 * 1024 * 1024;

export interface ReplayContext {
  dir: string;
  quarantineDir: string;
  log: Logger;
  /** A cut region (offset, bytes, reason) was found; its bytes are saved by replay. */
  onCut(seg: string, offset: number, bytes: number, reason: string, tail: boolean): void;
  onQuarantineBytes(bytes: number): void;
  onIndexWritten(bytes: number): void;
}

interface Decoded {
  seq: number;
  len: number;
  metaLen: number;
  createdAt: number;
  blob?: { name: string; size: number };
  id?: string;
}

type DecodeResult = { ok: true; r: Decoded } | { ok: false; reason: string; need?: number };

/** Decode the record at `off` of `buf` (`avail` bytes valid from off). */
type Decoder = (buf: Buffer, off: number) => DecodeResult;

const decodeV2: Decoder = (buf, off) => {
  const h = decodeHeaderV2(buf, off);
  if (!h.ok) return h.reason.startsWith('short header') ? { ok: false, reason: 'partial record header (torn write)', need: RECORD_HEADER_BYTES } : h;
  const len = RECORD_HEADER_BYTES + h.header.metaLen + h.header.payloadLen;
  if (buf.length - off < len) return { ok: false, reason: 'record runs past the end of the segment (torn write)', need: len };
  if (!recordCrcOk(buf, off, len)) return { ok: false, reason: 'checksum mismatch' };
  const r: Decoded = { seq: h.header.seq, len, metaLen: h.header.metaLen, createdAt: h.header.createdAt };
  if (h.header.flags & FLAG_BLOB) {
    const m = decodeMeta(buf.subarray(off + RECORD_HEADER_BYTES, off + RECORD_HEADER_BYTES + h.header.metaLen));
    if (!m?.blob) return { ok: false, reason: 'malformed record meta' };
    r.blob = { name: m.blob, size: h.header.size };
  }
  return { ok: true, r };
};

const decodeV1: Decoder = (buf, off) => {
  const hb = buf.subarray(off, off + V1_HEADER_BYTES);
  const h = decodeHeaderV1(hb);
  if (!h.ok) return h.reason.startsWith('short header') ? { ok: false, reason: 'partial record header (torn write)', need: V1_HEADER_BYTES } : h;
  const len = V1_HEADER_BYTES + h.header.metaLen + h.header.payloadLen;
  if (buf.length - off < len) return { ok: false, reason: 'record runs past the end of the segment (torn write)', need: len };
  const body = buf.subarray(off + V1_HEADER_BYTES, off + len);
  if ((v1crc(body, v1HeaderCrc(hb)) >>> 0) !== h.header.crc) return { ok: false, reason: 'checksum mismatch' };
  const meta = parseMetaV1(body.subarray(0, h.header.metaLen), h.header);
  if (!meta) return { ok: false, reason: 'malformed record meta' };
  const r: Decoded = { seq: h.header.seq, len, metaLen: h.header.metaLen, createdAt: h.header.createdAt, id: meta.id };
  if (meta.blob) r.blob = { name: meta.blob, size: meta.size };
  return { ok: true, r };
};

const V1_MAGIC_BYTES = Buffer.from([(V1_MAGIC >>> 24) & 0xff, (V1_MAGIC >>> 16) & 0xff, (V1_MAGIC >>> 8) & 0xff, V1_MAGIC & 0xff, 1]);

function findMagic(version: 1 | 2, buf: Buffer, from: number): number {
  return version === 2 ? findMagicV2(buf, from) : buf.indexOf(V1_MAGIC_BYTES, from);
}

export interface LoadedSegment {
  seg: Segment | null;
  lastSeq: number;
  newestCreatedAt: number;
  scanned: boolean;
}

/** Load one segment file (index fast path or scan). Returns seg null when it held no valid record (the file is removed). */
export function loadSegment(ctx: ReplayContext, name: string, firstSeq: number, lastSeqIn: number): LoadedSegment {
  const file = path.join(ctx.dir, name);
  const fd = fs.openSync(file, 'r+');
  try {
    const size = fs.fstatSync(fd).size;
    const head = preadExact(fd, Math.min(size, SEGMENT_HEADER_BYTES), 0);
    const sh = decodeSegmentHeader(head);
    let version: 1 | 2;
    let start: number;
    let prefix = '';
    if (sh) {
      version = 2;
      start = SEGMENT_HEADER_BYTES;
      prefix = sh.idPrefix;
      const idx = tryIndex(ctx, name, size, sh.firstSeq, prefix, lastSeqIn);
      if (idx) return idx;
    } else if (head.length >= 5 && head.subarray(0, 5).equals(V1_MAGIC_BYTES)) {
      version = 1;
      start = 0;
    } else {
      // neither format: the whole file is garbage (or a segment header destroyed)
      if (size > 0) {
        saveCut(ctx, fd, name, 0, size);
        ctx.onCut(name, 0, size, 'no valid segment header', true);
      }
      fs.closeSync(fd);
      removeSegmentFiles(ctx.dir, name);
      return { seg: null, lastSeq: lastSeqIn, newestCreatedAt: 0, scanned: true };
    }
    const seg = new Segment({ firstSeq, name, path: file, version, idPrefix: prefix, capacity: 1024 });
    const dec = version === 2 ? decodeV2 : decodeV1;
    let lastSeq = lastSeqIn;
    let newest = 0;
    let pos = start;
    let win: Buffer = Buffer.alloc(0);
    let winStart = start;
    const view = (p: number, need: number): Buffer => {
      if (p < winStart || p + need > winStart + win.length) {
        win = preadExact(fd, Math.min(size - p, Math.max(WINDOW, need)), p);
        winStart = p;
      }
      return win;
    };
    let guard = 0;
    while (pos < size && guard++ < 1e9) {
      let buf = view(pos, Math.min(size - pos, RECORD_HEADER_BYTES));
      let d = dec(buf, pos - winStart);
      if (!d.ok && d.need !== undefined && pos + d.need <= size) {
        buf = view(pos, d.need);
        d = dec(buf, pos - winStart);
      }
      let reason = d.ok ? undefined : d.reason;
      if (d.ok && d.r.seq <= lastSeq) reason = `sequence ${d.r.seq} not after ${lastSeq}`;
      if (d.ok && !reason) {
        const r = d.r;
        const slot = seg.push(r.seq, pos, r.len, r.metaLen, r.createdAt);
        void slot;
        if (r.blob) (seg.blobs ??= new Map()).set(r.seq, r.blob);
        if (version === 1) {
          if (seg.count === 1) seg.idPrefix = r.id!.endsWith(`-${r.seq}`) ? r.id!.slice(0, -String(r.seq).length) : '';
          if (r.id !== seg.idPrefix + r.seq) (seg.ids ??= new Map()).set(r.seq, r.id!);
        }
        lastSeq = r.seq;
        if (r.createdAt > newest) newest = r.createdAt;
        pos += r.len;
        continue;
      }
      // resynchronise: the next position where a complete valid record with a higher seq starts
      const next = resync(fd, size, pos + 1, version, dec, lastSeq);
      if (next < 0) {
        saveCut(ctx, fd, name, pos, size);
        ctx.onCut(name, pos, size - pos, reason!, true);
        fs.ftruncateSync(fd, pos);
        fs.fdatasyncSync(fd);
        break;
      }
      saveCut(ctx, fd, name, pos, next);
      ctx.onCut(name, pos, next - pos, reason!, false);
      pos = next;
    }
    seg.size = Math.min(pos, size);
    fs.closeSync(fd);
    if (seg.count === 0) {
      removeSegmentFiles(ctx.dir, name);
      return { seg: null, lastSeq, newestCreatedAt: newest, scanned: true };
    }
    seg.trim();
    seg.sealed = true;
    if (version === 2) writeIndex(ctx, seg);
    return { seg, lastSeq, newestCreatedAt: newest, scanned: true };
  } catch (err) {
    try {
      fs.closeSync(fd);
    } catch {
      // already closed
    }
    throw err;
  }
}

function tryIndex(ctx: ReplayContext, name: string, size: number, firstSeq: number, prefix: string, lastSeqIn: number): LoadedSegment | null {
  let buf: Buffer;
  try {
    buf = fs.readFileSync(path.join(ctx.dir, indexName(name)));
  } catch {
    return null;
  }
  const a = decodeIndex(buf, size);
  if (!a || a.count === 0 || a.seqs[0]! <= lastSeqIn || a.seqs[0]! < firstSeq) return null;
  const seg = Segment.fromIndex({ firstSeq, name, path: path.join(ctx.dir, name), idPrefix: prefix, size }, a);
  let newest = 0;
  for (let i = 0; i < a.count; i++) if (a.created[i]! > newest) newest = a.created[i]!;
  return { seg, lastSeq: a.seqs[a.count - 1]!, newestCreatedAt: newest, scanned: false };
}

function resync(fd: number, size: number, from: number, version: 1 | 2, dec: Decoder, lastSeq: number): number {
  let p = from;
  // bounded: p strictly increases each pass
  while (p < size) {
    const win = preadExact(fd, Math.min(WINDOW, size - p), p);
    let i = findMagic(version, win, 0);
    while (i >= 0) {
      const at = p + i;
      // verify with a read of the candidate record itself
      const hdr = preadExact(fd, Math.min(size - at, version === 2 ? RECORD_HEADER_BYTES : V1_HEADER_BYTES), at);
      let d = dec(hdr, 0);
      if (!d.ok && d.need !== undefined && at + d.need <= size) d = dec(preadExact(fd, d.need, at), 0);
      if (d.ok && d.r.seq > lastSeq) return at;
      i = findMagic(version, win, i + 1);
    }
    if (win.length < WINDOW) break;
    p += win.length - 8; // overlap so that a magic across the boundary is found
  }
  return -1;
}

function saveCut(ctx: ReplayContext, fd: number, name: string, from: number, to: number): void {
  const out = path.join(ctx.quarantineDir, `corrupt-${name}-${from}.bin`);
  try {
    const wfd = fs.openSync(out, 'w', 0o600);
    try {
      for (let p = from; p < to; p += WINDOW) {
        const b = preadExact(fd, Math.min(WINDOW, to - p), p);
        fs.writeSync(wfd, b, 0, b.length, p - from);
      }
      fs.fdatasyncSync(wfd);
    } finally {
      fs.closeSync(wfd);
    }
    ctx.onQuarantineBytes(to - from);
  } catch (err) {
    ctx.log.warn({ err, segment: name }, 'could not keep a copy of the corrupt journal bytes');
  }
}

/** Write a sealed segment's index (tmp + rename, no fsync: a torn or stale one only means a rescan). */
export function writeIndex(ctx: Pick<ReplayContext, 'dir' | 'log' | 'onIndexWritten'>, seg: Segment): void {
  try {
    const buf = encodeIndex(seg.size, seg.arrays());
    const file = path.join(ctx.dir, indexName(seg.name));
    fs.writeFileSync(`${file}.tmp`, buf, { mode: 0o600 });
    fs.renameSync(`${file}.tmp`, file);
    ctx.onIndexWritten(buf.length);
  } catch (err) {
    ctx.log.warn({ err, segment: seg.name }, 'could not write a journal segment index (the next start scans the segment instead)');
  }
}

export function removeSegmentFiles(dir: string, name: string): void {
  for (const f of [name, indexName(name), `${indexName(name)}.tmp`]) {
    try {
      fs.rmSync(path.join(dir, f), { force: true });
    } catch {
      // best effort
    }
  }
}
