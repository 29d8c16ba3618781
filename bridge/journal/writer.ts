/**
 * Group commit (issue 10): every record that arrives while the previous batch is being made
 * durable, or within `fsync_max_delay_ms` of the first one, is written with ONE positioned
 * write of one buffer (each payload copied once) into the active segment, followed by ONE
 * fdatasync — a single thread-pool round trip per batch. Records wait in a plain array; the
 * only promise per record is the one append() returns.
 *
 * ## fsync_max_delay_ms: latency against flash wear
 * Every fdatasync writes the segment's last, partly filled 4 KiB page again, so each batch
 * costs about one page of device writes on top of its records. At R messages/s with a delay
 * of D ms (plus the fsync time F), a batch holds ≈ R·(D+F)/1000 records and each message
 * costs `record bytes + 4096 / batch size` of writes:
 *   5 000 msg/s, 64 B payloads (≈ 175 B records), F ≈ 0.85 ms:
 *     D = 0 → ≈ 4 per batch → ≈ 1 140 B/msg;  D = 2 (default) → ≈ 14 → ≈ 460 B/msg;
 *     D = 5 → ≈ 29 → ≈ 320 B/msg;  D = 10 → ≈ 54 → ≈ 250 B/msg.
 * A message is acknowledged to its device up to D ms later in exchange. A batch is written
 * at once, without waiting for the delay, when it reaches EARLY_FLUSH_BYTES.
 */
import fs from 'node:fs';
import { performance } from 'node:perf_hooks';
import type { UplinkMessageMeta } from '../../core/ports.js';
import { encodeRecordInto } from './format.js';
import { pwriteAllSync } from '../../core/fs.js';
import type { Segment } from './segment.js';

/**
 * Write a batch without waiting for the delay once it holds this much: the page rewritten by
 * the fsync is then ≤ 6 % of what is written, so holding it longer buys no wear, only latency.
 */
export const EARLY_FLUSH_BYTES = 64 * 1024;
/**
 * Largest batch in one write: building it is one memcpy on the event loop (4 MiB ≈ 1 ms) and
 * its fsync (≈ 20 ms at 200 MB/s) delays every record in it, so a backlog is cut in slices.
 */
export const MAX_BATCH_BYTES = 4 * 1024 * 1024;

export interface QueuedRecord {
  seq: number;
  createdAt: number;
  /** Payload size (inline length, or the blob's size). */
  size: number;
  sha: Buffer;
  shaHex: string;
  m: UplinkMessageMeta;
  metaBuf: Buffer;
  /** Inline payload (empty for blob records). */
  payload: Buffer;
  blob: { name: string; size: number } | undefined;
  /** Record bytes in the segment. */
  bytes: number;
  /** Bytes of the cap reserved for the blob (released into the index on commit). */
  blobBytes: number;
  /** performance.now() at append (latency histogram). */
  t0: number;
  resolve: (r: { id: string; size: number; sha256: string }) => void;
  reject: (err: Error) => void;
}

export interface WriterHost {
  policy(): 'batch' | 'always' | 'never';
  delayMs(): number;
  segmentBytes(): number;
  /** The segment to write a batch starting with `firstSeq` into (rolls over when `bytes` do not fit). Throws on I/O error. */
  segmentFor(firstSeq: number, bytes: number): Segment;
  committed(seg: Segment, base: number, batch: QueuedRecord[]): void;
  failed(batch: QueuedRecord[], err: unknown, stage: 'write' | 'fsync'): void;
  fsynced(bytes: number): void;
}

export class GroupWriter {
  private queue: QueuedRecord[] = [];
  private queuedBytes = 0;
  private firstQueuedAt = 0;
  private inFlight = false;
  private timer: NodeJS.Timeout | undefined;
  private immediate: NodeJS.Immediate | undefined;
  private forced = false;
  private idle: Array<() => void> = [];

  constructor(private readonly host: WriterHost) {}

  get length(): number {
    return this.queue.length;
  }

  push(r: QueuedRecord): void {
    if (this.queue.length === 0) this.firstQueuedAt = performance.now();
    this.queue.push(r);
    this.queuedBytes += r.bytes;
    this.schedule();
  }

  /** Write everything queued now (no delay) and resolve once nothing is queued or in flight. */
  drain(): Promise<void> {
    this.forced = true;
    if (!this.queue.length && !this.inFlight) return Promise.resolve();
    const p = new Promise<void>((resolve) => this.idle.push(resolve));
    this.schedule();
    return p;
  }

  /** Reject everything still queued (not yet written). */
  rejectAll(err: Error): QueuedRecord[] {
    const q = this.queue;
    this.queue = [];
    this.queuedBytes = 0;
    this.clearTimers();
    for (const r of q) r.reject(err);
    this.notifyIdle();
    return q;
  }

  private clearTimers(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
  }

  private schedule(): void {
    if (this.inFlight || this.immediate || !this.queue.length) return;
    const delay = this.host.delayMs();
    const waited = performance.now() - this.firstQueuedAt;
    if (this.forced || this.host.policy() !== 'batch' || delay <= 0 || this.queuedBytes >= EARLY_FLUSH_BYTES || waited >= delay) {
      this.clearTimers();
      this.immediate = setImmediate(() => this.flush());
      return;
    }
    this.timer ??= setTimeout(() => {
      this.timer = undefined;
      this.schedule();
    }, Math.max(1, Math.ceil(delay - waited)));
  }

  private notifyIdle(): void {
    if (this.queue.length || this.inFlight) return;
    this.forced = false;
    const w = this.idle.splice(0);
    for (const f of w) f();
  }

  private flush(): void {
    this.immediate = undefined;
    if (this.inFlight || !this.queue.length) return;
    const policy = this.host.policy();
    const first = this.queue[0]!;
    let seg: Segment;
    try {
      seg = this.host.segmentFor(first.seq, first.bytes);
    } catch (err) {
      this.fail(this.queue.splice(0), err, 'write');
      return;
    }
    const room = this.host.segmentBytes() - seg.size;
    let n = 0;
    let bytes = 0;
    const max = policy === 'always' ? 1 : this.queue.length;
    while (n < max) {
      const len = this.queue[n]!.bytes;
      if (n > 0 && (bytes + len > MAX_BATCH_BYTES || bytes + len > room)) break;
      bytes += len;
      n++;
    }
    const batch = this.queue.splice(0, n);
    this.queuedBytes -= bytes;
    if (this.queue.length) this.firstQueuedAt = performance.now();
    const buf = Buffer.allocUnsafe(bytes);
    let off = 0;
    for (const r of batch) off = encodeRecordInto(buf, off, r.seq, r.createdAt, r.size, r.sha, r.metaBuf, r.payload, r.blob !== undefined);
    const base = seg.size;
    try {
      pwriteAllSync(seg.wfd!, buf, base);
    } catch (err) {
      this.fail(batch, err, 'write');
      return;
    }
    if (policy === 'never') {
      this.host.committed(seg, base, batch);
      this.after();
      return;
    }
    this.inFlight = true;
    fs.fdatasync(seg.wfd!, (err) => {
      this.inFlight = false;
      if (err) {
        this.fail(batch, err, 'fsync');
        return;
      }
      this.host.fsynced(bytes);
      this.host.committed(seg, base, batch);
      this.after();
    });
  }

  private fail(batch: QueuedRecord[], err: unknown, stage: 'write' | 'fsync'): void {
    this.host.failed(batch, err, stage);
    this.after();
  }

  private after(): void {
    this.schedule();
    this.notifyIdle();
  }
}
