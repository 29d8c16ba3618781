/**
 * One segment of the journal and its compact in-memory index (issue 11: ≤ 64 B of heap per
 * queued message). Per record the index holds, in parallel typed arrays and nothing else:
 *
 *   seq (f64, 8) · createdAt (f64, 8) · offset (u32, 4) · record bytes (u32, 4) · meta bytes (u32, 4) · live (u8, 1)
 *
 * = 29 bytes, no object per record. The id is `idPrefix + seq` (one prefix per segment: a
 * segment is written by one boot); blob records (rare: payloads > 1 MiB) keep their blob
 * name and size in a Map. The arrays of the segment being written grow by doubling (≤ 2×
 * while it fills); a sealed segment's arrays are trimmed to their exact length.
 */
import fs from 'node:fs';
import type { IndexArrays } from './format.js';

export class Segment {
  readonly firstSeq: number;
  readonly name: string;
  readonly path: string;
  /** 2 = current format (segment header, binary meta); 1 = legacy records (JSON meta). */
  readonly version: 1 | 2;
  idPrefix: string;
  /** Bytes of the file that hold committed records (the next write goes exactly here). */
  size = 0;
  /** Bytes of indexed records (live or done): what a segment with a live record costs against the cap. */
  indexedBytes = 0;
  /** What this segment currently adds to the journal's charged bytes (indexedBytes while it holds a live record, else 0). */
  charged = 0;
  count = 0;
  liveCount = 0;
  /** First slot that may still be live. */
  head = 0;
  seqs: Float64Array;
  created: Float64Array;
  offsets: Uint32Array;
  lens: Uint32Array;
  metaLens: Uint32Array;
  live: Uint8Array;
  /** seq → blob (file name under blobs/, payload size). */
  blobs: Map<number, { name: string; size: number }> | undefined;
  /** Records whose id is not idPrefix + seq: legacy ones (format 1 after a journal.json reset) and streamed uploads (named by their blob). */
  ids: Map<number, string> | undefined;
  /** Write descriptor while this is the active segment. */
  wfd: number | undefined;
  /** Read descriptor, opened on first disk read, closed when the segment is deleted. */
  rfd: number | undefined;
  sealed = false;
  deleted = false;
  queuedForDelete = false;

  constructor(o: { firstSeq: number; name: string; path: string; version: 1 | 2; idPrefix: string; capacity?: number }) {
    this.firstSeq = o.firstSeq;
    this.name = o.name;
    this.path = o.path;
    this.version = o.version;
    this.idPrefix = o.idPrefix;
    const cap = Math.max(16, o.capacity ?? 1024);
    this.seqs = new Float64Array(cap);
    this.created = new Float64Array(cap);
    this.offsets = new Uint32Array(cap);
    this.lens = new Uint32Array(cap);
    this.metaLens = new Uint32Array(cap);
    this.live = new Uint8Array(cap);
  }

  /** Adopt a loaded .idx (sealed segment): no per-record work besides the live flags. */
  static fromIndex(o: { firstSeq: number; name: string; path: string; idPrefix: string; size: number }, a: IndexArrays): Segment {
    const s = new Segment({ ...o, version: 2, capacity: 16 });
    s.seqs = a.seqs;
    s.created = a.created;
    s.offsets = a.offsets;
    s.lens = a.lens;
    s.metaLens = a.metaLens;
    s.live = new Uint8Array(a.count);
    s.count = a.count;
    s.size = o.size;
    let bytes = 0;
    for (let i = 0; i < a.count; i++) bytes += a.lens[i]!;
    s.indexedBytes = bytes;
    if (a.blobs.length) s.blobs = new Map(a.blobs.map(([seq, name, size]) => [seq, { name, size }]));
    s.sealed = true;
    return s;
  }

  private grow(): void {
    const n = this.seqs.length * 2;
    const f = (a: Float64Array): Float64Array => {
      const b = new Float64Array(n);
      b.set(a);
      return b;
    };
    const u = (a: Uint32Array): Uint32Array => {
      const b = new Uint32Array(n);
      b.set(a);
      return b;
    };
    this.seqs = f(this.seqs);
    this.created = f(this.created);
    this.offsets = u(this.offsets);
    this.lens = u(this.lens);
    this.metaLens = u(this.metaLens);
    const l = new Uint8Array(n);
    l.set(this.live);
    this.live = l;
  }

  /** Append a slot; returns its index. Seqs must increase. */
  push(seq: number, offset: number, len: number, metaLen: number, createdAt: number): number {
    if (this.count === this.seqs.length) this.grow();
    const i = this.count++;
    this.seqs[i] = seq;
    this.offsets[i] = offset;
    this.lens[i] = len;
    this.metaLens[i] = metaLen;
    this.created[i] = createdAt;
    this.live[i] = 0;
    this.indexedBytes += len;
    return i;
  }

  /** Shrink the arrays to their length (the segment will not grow again). */
  trim(): void {
    if (this.seqs.length === this.count) return;
    const n = this.count;
    this.seqs = this.seqs.slice(0, n);
    this.created = this.created.slice(0, n);
    this.offsets = this.offsets.slice(0, n);
    this.lens = this.lens.slice(0, n);
    this.metaLens = this.metaLens.slice(0, n);
    this.live = this.live.slice(0, n);
  }

  arrays(): IndexArrays {
    return {
      count: this.count,
      seqs: this.seqs,
      created: this.created,
      offsets: this.offsets,
      lens: this.lens,
      metaLens: this.metaLens,
      blobs: this.blobs ? [...this.blobs].map(([seq, b]) => [seq, b.name, b.size] as [number, string, number]) : [],
    };
  }

  get lastSeq(): number {
    return this.count ? this.seqs[this.count - 1]! : -1;
  }

  /** Slot of `seq`, or -1. */
  slotOf(seq: number): number {
    let lo = 0;
    let hi = this.count - 1;
    const s = this.seqs;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      const v = s[mid]!;
      if (v < seq) lo = mid + 1;
      else if (v > seq) hi = mid - 1;
      else return mid;
    }
    return -1;
  }

  /** First slot with seq > afterSeq (count when none). */
  slotAfter(afterSeq: number): number {
    let lo = 0;
    let hi = this.count;
    const s = this.seqs;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (s[mid]! <= afterSeq) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  idOf(slot: number): string {
    const seq = this.seqs[slot]!;
    return this.ids?.get(seq) ?? this.idPrefix + seq;
  }

  blobOf(slot: number): { name: string; size: number } | undefined {
    return this.blobs?.get(this.seqs[slot]!);
  }

  /** Payload size of a slot. */
  sizeOf(slot: number, headerBytes: number): number {
    const b = this.blobOf(slot);
    return b ? b.size : this.lens[slot]! - headerBytes - this.metaLens[slot]!;
  }

  advanceHead(): void {
    while (this.head < this.count && this.live[this.head] === 0) this.head++;
  }

  readFd(): number {
    this.rfd ??= fs.openSync(this.path, 'r');
    return this.rfd;
  }

  closeFds(): void {
    for (const fd of [this.rfd, this.wfd]) if (fd !== undefined) fs.close(fd, () => {});
    this.rfd = undefined;
    this.wfd = undefined;
  }
}

/**
 * Read exactly `len` bytes at `pos` (synchronously: small reads from the page cache, no
 * thread-pool hop), into `into` (≥ len bytes; the result is a view of it) or a new buffer.
 */
export function preadExact(fd: number, len: number, pos: number, into?: Buffer): Buffer {
  const buf = into ? into.subarray(0, len) : Buffer.allocUnsafe(len);
  let got = 0;
  // bounded: each pass reads ≥ 1 byte or ends
  while (got < len) {
    const n = fs.readSync(fd, buf, got, len - got, pos + got);
    if (n === 0) break;
    got += n;
  }
  return got === len ? buf : buf.subarray(0, got);
}

/** fsync a directory (sync: used at segment creation, once per segment). */
export function syncDirSync(dir: string): void {
  const fd = fs.openSync(dir, 'r');
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}
