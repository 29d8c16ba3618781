/**
 * The durable acknowledged position: `ack.log`, an append-only log of fixed 32-byte entries
 * (format in bridge/journal/format.ts) in a file PREALLOCATED once at creation.
 *
 * Why this shape (issue 10, issue 9 #5):
 *  - an ack costs nothing on the hot path: the journal marks the record done in memory and
 *    the acks gathered over ACK_FLUSH_MS become one write of a few entries (a FLOOR entry when
 *    the oldest pending record moved, RANGE entries for selective acks above it) plus one
 *    fdatasync — no tmp file, rename and directory fsync several times a second;
 *  - writes land at explicit positions inside blocks allocated when the file was created, so
 *    acknowledging (and then deleting what was acknowledged) keeps working on a full disk;
 *  - compaction is rare and needs no new file either: the file has two regions; when the
 *    current one is full, a checkpoint (HEAD with the floor + the done ranges above it) is
 *    written at the start of the OTHER region with the next generation, then appends continue
 *    there. Replay takes the region with the highest generation whose checkpoint is complete;
 *    a compaction cut by a crash leaves the old region intact.
 *
 * With 256 KiB regions (8 192 entries) and in-order acks the journal compacts once per
 * 8 192 flushes: every ~7 minutes at full load. A checkpoint that does not fit half a region
 * (more than 4 096 separate holes of unacknowledged records) grows the file — the one path
 * that needs free space.
 */
import fs from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { ACK_ENTRY_BYTES, ACK_FLOOR, ACK_HEAD, ACK_RANGE, encodeAckEntry, parseAckRegion, type AckEntry, type AckRegionState } from './format.js';

export const ACK_REGION_BYTES = 256 * 1024;

export interface AckLoad {
  /** The state found (null: no file, or no valid region). */
  state: AckRegionState | null;
  /** The file existed but neither region held a valid checkpoint. */
  corrupt: boolean;
}

export class AckLog {
  readonly file: string;
  private fh: FileHandle | undefined;
  private regionBytes = ACK_REGION_BYTES;
  /** 0 or 1: the region appends go to. */
  private region = 0;
  private gen = 0;
  private used = 0;

  constructor(dir: string) {
    this.file = path.join(dir, 'ack.log');
  }

  async load(): Promise<AckLoad> {
    let buf: Buffer;
    try {
      buf = await fsp.readFile(this.file);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return { state: null, corrupt: false };
      throw err;
    }
    const half = Math.floor(buf.length / 2 / ACK_ENTRY_BYTES) * ACK_ENTRY_BYTES;
    const regions = half > 0 ? [parseAckRegion(buf.subarray(0, half)), parseAckRegion(buf.subarray(half, 2 * half))] : [null, null];
    let best = -1;
    for (let i = 0; i < 2; i++) if (regions[i] && (best < 0 || regions[i]!.gen > regions[best]!.gen)) best = i;
    if (best < 0) return { state: null, corrupt: true };
    this.regionBytes = half;
    this.region = best;
    this.gen = regions[best]!.gen;
    this.used = regions[best]!.used;
    return { state: regions[best]!, corrupt: false };
  }

  /** Open for appends after load(); a missing or unusable file is (re)created with `checkpoint`. */
  async open(loaded: AckLoad, checkpoint: () => { floor: number; ranges: Array<[number, number]> }, sync: boolean): Promise<void> {
    if (loaded.state) {
      this.fh = await fsp.open(this.file, 'r+');
      return;
    }
    await this.create(checkpoint(), sync, ACK_REGION_BYTES);
  }

  /** Entries still free in the current region. */
  get room(): number {
    return Math.floor(this.regionBytes / ACK_ENTRY_BYTES) - this.used;
  }

  /** Append entries at their explicit positions (no new blocks: the file is preallocated). */
  async append(entries: Array<Omit<AckEntry, 'gen'>>, sync: boolean): Promise<number> {
    if (!this.fh) throw new Error('ack log not open');
    if (entries.length > this.room) throw new RangeError('ack log region full');
    const buf = Buffer.allocUnsafe(entries.length * ACK_ENTRY_BYTES);
    entries.forEach((e, i) => encodeAckEntry(buf, i * ACK_ENTRY_BYTES, { ...e, gen: this.gen }));
    const pos = this.region * this.regionBytes + this.used * ACK_ENTRY_BYTES;
    await writeAll(this.fh, buf, pos);
    this.used += entries.length;
    if (sync) await this.fh.datasync();
    return sync ? 1 : 0;
  }

  /**
   * Compaction: write the checkpoint into the other region (next generation), fdatasync,
   * continue there. Returns the fsyncs issued.
   */
  async compact(cp: { floor: number; ranges: Array<[number, number]> }, sync: boolean): Promise<number> {
    if (!this.fh) throw new Error('ack log not open');
    const need = cp.ranges.length + 1;
    if (need * 2 > Math.floor(this.regionBytes / ACK_ENTRY_BYTES)) {
      // pathological fragmentation: a bigger file (needs free space; the old one stays valid until the rename)
      let size = this.regionBytes;
      while (need * 2 > Math.floor(size / ACK_ENTRY_BYTES)) size *= 2;
      await this.fh.close();
      this.fh = undefined;
      await this.create(cp, sync, size);
      return sync ? 3 : 0;
    }
    const other = 1 - this.region;
    const buf = checkpointBytes(cp, this.gen + 1);
    await writeAll(this.fh, buf, other * this.regionBytes);
    // invalidate the entry after the checkpoint (stale entries of an older generation are ignored anyway)
    if (sync) await this.fh.datasync();
    this.region = other;
    this.gen += 1;
    this.used = need;
    return sync ? 1 : 0;
  }

  private async create(cp: { floor: number; ranges: Array<[number, number]> }, sync: boolean, regionBytes: number): Promise<void> {
    const tmp = `${this.file}.tmp`;
    const buf = Buffer.alloc(regionBytes * 2);
    const gen = this.gen + 1;
    checkpointBytes(cp, gen).copy(buf, 0);
    const fh = await fsp.open(tmp, 'w', 0o600);
    try {
      await writeAll(fh, buf, 0);
      if (sync) await fh.datasync();
    } finally {
      await fh.close();
    }
    await fsp.rename(tmp, this.file);
    if (sync) await syncDir(path.dirname(this.file));
    this.fh = await fsp.open(this.file, 'r+');
    this.regionBytes = regionBytes;
    this.region = 0;
    this.gen = gen;
    this.used = cp.ranges.length + 1;
  }

  async close(): Promise<void> {
    const fh = this.fh;
    this.fh = undefined;
    await fh?.close().catch(() => {});
  }
}

function checkpointBytes(cp: { floor: number; ranges: Array<[number, number]> }, gen: number): Buffer {
  const buf = Buffer.alloc((cp.ranges.length + 1) * ACK_ENTRY_BYTES);
  encodeAckEntry(buf, 0, { type: ACK_HEAD, gen, a: cp.floor, b: cp.ranges.length });
  cp.ranges.forEach(([a, b], i) => encodeAckEntry(buf, (i + 1) * ACK_ENTRY_BYTES, { type: ACK_RANGE, gen, a, b }));
  return buf;
}

/**
 * Write in pieces of at most one 4 KiB page. Measured on Linux 6.x (ext4 with large folios):
 * a file written with ONE 512 KiB write is cached as one large folio, and every later
 * 32-byte ack write then dirties — and writes back — the whole 512 KiB (write_bytes grew by
 * 524 288 per ack flush). Written page by page, an ack flush dirties one 4 KiB page.
 */
const PAGE = 4096;

async function writeAll(fh: FileHandle, buf: Buffer, pos: number): Promise<void> {
  let off = 0;
  while (off < buf.length) {
    const len = Math.min(buf.length - off, PAGE - ((pos + off) % PAGE));
    const { bytesWritten } = await fh.write(buf, off, len, pos + off);
    if (bytesWritten <= 0) throw Object.assign(new Error('write returned 0 bytes'), { code: 'EIO' });
    off += bytesWritten;
  }
}

async function syncDir(dir: string): Promise<void> {
  const fh = await fsp.open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

export { ACK_FLOOR, ACK_RANGE };
export const ackLogExists = (dir: string): boolean => fs.existsSync(path.join(dir, 'ack.log'));
