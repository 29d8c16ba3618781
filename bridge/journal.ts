/**
 * The durable journal (outbox) between the device side and the uplink. Implements
 * UplinkSink (core/ports.ts) for the broker and the HTTPS upload, and the consumer
 * API below for the uplink.
 *
 * ## On disk (<state_dir>/journal, mode 0700)
 *   journal.json      {version, instanceId, createdAt, boots}: random instance id, boot counter (atomic write)
 *   ack.json          AckState {floor, done ranges, next} (bridge/journal-format.ts; atomic write:
 *                     tmp + fsync + rename + dir fsync)
 *   seg-<seq>.log     append-only segments of records (format in bridge/journal-format.ts)
 *   blobs/<id>.bin    payloads larger than INLINE_MAX; the record in the segment names the blob
 *   tmp/              staging files of streams in progress (emptied on start)
 *   quarantine/       dead letters: <id>.json (meta + reason) and <id>.bin (payload); corrupt tails
 *
 * ## Ids and order
 * id = `<instanceId>-<boot>-<seq>`; seq increases in append (commit) order and `boot` is
 * bumped on every start, so an id is never reused even when a torn tail is cut away.
 *
 * ## Consumer API (the uplink)
 *   journal.on('append', (rec: JournalRecord) => …)   a record became durable and pending
 *   journal.on('removed', (ev: {id, seq, reason}) => …) a pending record left without an ack:
 *                                                      reason 'overflow' | 'ttl' | 'corrupt' | 'quarantine'
 *   journal.pending(afterSeq = -1, limit = 1024): JournalRecord[]
 *        unacknowledged records with seq > afterSeq, in order (expired ones are dropped, not returned).
 *        A sender keeps the seq of the last record it took and asks again with it.
 *   journal.first(): JournalRecord | undefined          oldest unacknowledged record
 *   journal.get(id): JournalRecord | undefined          a pending record by id
 *   journal.readPayload(rec, start = 0, end = rec.size): Promise<Buffer>
 *        bytes [start, end) of the payload, read from disk (at most 64 MiB per call).
 *        Rejects ECONN_NOT_FOUND once the record was acknowledged/dropped/quarantined.
 *   journal.createPayloadStream(rec, start = 0): Readable   the payload from `start` to the end, from disk
 *   journal.ack(id): Promise<void>        selective acks allowed; unknown or already-acked id = no-op. The record leaves
 *        the queue at once; the promise resolves when the ack state is persisted (coalesced, ~10 ms).
 *        After a crash, acks not yet persisted come back (the cloud drops them as duplicates).
 *   journal.quarantine(id, reason): Promise<void>   permanent rejection: payload + reason copied to
 *        journal/quarantine/, counted, logged, removed from the queue. Unknown id = no-op.
 *   journal.stats(): JournalStats
 *
 * JournalRecord = {id, seq, meta: UplinkMessageMeta, size, sha256 (hex), createdAt (ms, journal clock)}.
 */
import { EventEmitter } from 'node:events';
import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import fsSync, { createReadStream, createWriteStream } from 'node:fs';
import { promisify } from 'node:util';
import fs, { type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { Counter, Gauge, Histogram, type Registry } from 'prom-client';
import type { Config } from '../core/config/schema.js';
import type { Component } from '../core/component.js';
import type { Logger } from '../core/logger.js';
import { syncDir, writeAtomic } from '../core/fs.js';
import { RequestError, StorageError, errorCode } from '../core/errors.js';
import type { AppendResult, UplinkMessageMeta, UplinkSink } from '../core/ports.js';
import {
  FLAG_BLOB,
  HEADER_BYTES,
  crc32,
  decodeAckState,
  decodeHeader,
  encodeAckState,
  encodeRecord,
  headerCrc,
  isDone,
  parseMeta,
  parseSegmentName,
  segmentName,
  type AckState,
  type RecordMeta,
} from './journal-format.js';

export type JournalConfig = Config['bridge']['journal'];

/** append() payloads larger than this go to a blob file instead of inline in a segment. */
export const INLINE_MAX = 1024 * 1024;
/** appendStream keeps up to this much in memory; a longer body spills to a staging file. */
export const STREAM_INLINE_MAX = 64 * 1024;
const MAX_BATCH_BYTES = 8 * 1024 * 1024;
const MAX_READ_BYTES = 64 * 1024 * 1024;
const ACK_PERSIST_DELAY_MS = 10;
const SCAN_BLOCK = 1024 * 1024;

export interface JournalRecord {
  readonly id: string;
  readonly seq: number;
  readonly meta: UplinkMessageMeta;
  readonly size: number;
  readonly sha256: string;
  readonly createdAt: number;
}

export type RemovalReason = 'overflow' | 'ttl' | 'corrupt' | 'quarantine';

export interface JournalStats {
  pendingMessages: number;
  pendingBytes: number;
  oldestPendingAgeMs: number;
  diskBytes: number;
  dropped: number;
  droppedByReason: Record<'overflow' | 'ttl' | 'corrupt', number>;
  quarantined: number;
}

export interface JournalOptions {
  /** The journal directory (<state_dir>/journal). */
  dir: string;
  config: JournalConfig;
  logger: Logger;
  /** prom-client registry for connector_journal_* metrics (none = metrics kept but not exported). */
  metrics?: Registry;
  /** Clock (ms since the epoch) for createdAt and TTL; tests inject one. */
  now?: () => number;
  /** How long close() waits for writes in flight (default 5000 ms). */
  closeTimeoutMs?: number;
}

interface Segment {
  readonly firstSeq: number;
  readonly name: string;
  readonly path: string;
  /** Bytes in the file (written, maybe not yet fsynced). */
  size: number;
  /** Bytes of indexed records (live or done). */
  indexedBytes: number;
  live: number;
  /** Id prefix (`<instance>-<boot>-`) of the records in this segment (one boot writes a segment). */
  idPrefix: string;
  wfh?: FileHandle;
  /** Read descriptor (metadata read synchronously, payloads asynchronously); closed when unused after deletion. */
  fd?: number;
  readers: number;
  deleted: boolean;
  queuedForDelete: boolean;
}

/**
 * One slot of the in-memory index: positions and sizes only (≈100 bytes of heap). The message
 * metadata stays on disk and is read when a record is handed out (a bounded cache keeps the
 * recently appended ones).
 */
interface Entry {
  readonly seq: number;
  readonly seg: Segment;
  /** Offset of the record in its segment. */
  readonly offset: number;
  readonly recordBytes: number;
  readonly metaLen: number;
  /** Payload size (inline or blob). */
  readonly size: number;
  readonly createdAt: number;
  readonly blob: string | undefined;
  /** Only when the id is not seg.idPrefix + seq. */
  readonly id: string | undefined;
  live: boolean;
}

const REC_CACHE = 4096;
const readFd = promisify(fsSync.read);

function idOfEntry(e: Entry): string {
  return e.id ?? e.seg.idPrefix + e.seq;
}

function payloadOffset(e: Entry): number {
  return e.offset + HEADER_BYTES + e.metaLen;
}

interface PendingWrite {
  seq: number;
  rm: RecordMeta;
  buf: Buffer;
  /** Bytes of the blob this record names (reserved by the stream that wrote it). */
  blobBytes: number;
  resolve: (r: AppendResult) => void;
  reject: (err: Error) => void;
}

interface Deferred {
  promise: Promise<void>;
  resolve: () => void;
  reject: (err: Error) => void;
}

function deferred(): Deferred {
  let resolve!: () => void;
  let reject!: (err: Error) => void;
  const promise = new Promise<void>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  promise.catch(() => {}); // callers may ignore ack promises
  return { promise, resolve, reject };
}


async function writeFully(fh: FileHandle, buf: Buffer, position?: number): Promise<void> {
  let off = 0;
  while (off < buf.length) {
    const { bytesWritten } = await fh.write(buf, off, buf.length - off, position === undefined ? null : position + off);
    if (bytesWritten <= 0) throw new Error('write returned 0 bytes');
    off += bytesWritten;
  }
}

async function readFully(fh: FileHandle, len: number, position: number): Promise<Buffer> {
  const buf = Buffer.allocUnsafe(len);
  let off = 0;
  while (off < len) {
    const { bytesRead } = await fh.read(buf, off, len - off, position + off);
    if (bytesRead === 0) break;
    off += bytesRead;
  }
  return off === len ? buf : buf.subarray(0, off);
}

/** Sequential reader over a file with a 1 MiB window (replay scans). */
class BlockReader {
  private win: Buffer = Buffer.alloc(0);
  private winStart = 0;
  constructor(
    private readonly fh: FileHandle,
    readonly size: number,
  ) {}
  async read(pos: number, len: number): Promise<Buffer> {
    if (pos >= this.winStart && pos + len <= this.winStart + this.win.length) return this.win.subarray(pos - this.winStart, pos - this.winStart + len);
    if (len > SCAN_BLOCK) return readFully(this.fh, len, pos);
    this.win = await readFully(this.fh, Math.min(SCAN_BLOCK, this.size - pos), pos);
    this.winStart = pos;
    return this.win.subarray(0, Math.min(len, this.win.length));
  }
}


/** Run a journal file operation; its failure becomes ECONN_JOURNAL_IO. */
async function io<T>(what: string, p: Promise<T>): Promise<T> {
  try {
    return await p;
  } catch (err) {
    throw errorCode(err) && !(err as NodeJS.ErrnoException).syscall ? err : ioError(what, err);
  }
}

function ioError(what: string, err: unknown): StorageError {
  return new StorageError('ECONN_JOURNAL_IO', `journal ${what} failed (${(err as NodeJS.ErrnoException).code ?? (err as Error).message}); check free disk space and the disk's health`, { cause: err });
}

export class Journal extends EventEmitter implements UplinkSink, Component {
  readonly name = 'journal';
  readonly dir: string;
  private cfg: JournalConfig;
  private readonly log: Logger;
  private readonly now: () => number;
  private readonly closeTimeoutMs: number;

  private started = false;
  private startPromise: Promise<void> | undefined;
  private closed = false;
  private closePromise: Promise<void> | undefined;
  private broken: Error | undefined;

  private instanceId = '';
  private boot = 0;
  private nextSeq = 0;
  /** Seq below which every seq is indexed or will never exist (floor when nothing is pending). */
  private indexedNext = 0;

  private readonly segments = new Map<string, Segment>();
  private active: Segment | undefined;
  private order: Entry[] = [];
  private head = 0;
  private readonly recCache = new Map<number, JournalRecord>();

  // accounting (bytes)
  private segCharged = 0; // indexedBytes of segments holding a live record
  private liveBlobBytes = 0;
  private reservedBytes = 0; // queued records, blobs being committed, streams in progress
  private pendingCount = 0;
  private pendingBytes = 0;
  private blobDiskBytes = 0;
  private stagingBytes = 0;
  private quarantineBytes = 0;
  private readonly droppedBy = { overflow: 0, ttl: 0, corrupt: 0 };
  private quarantinedCount = 0;

  // writer
  private queue: PendingWrite[] = [];
  private flushing: Promise<void> | undefined;
  private flushTimer: NodeJS.Timeout | NodeJS.Immediate | undefined;

  // ack persistence
  private persistDeferred: Deferred = deferred();
  private persistTimer: NodeJS.Timeout | undefined;
  private persisting: Promise<void> | undefined;
  private persistDirty = false;
  private blobsToDelete: Array<{ name: string; size: number }> = [];
  private segsToDelete: Segment[] = [];

  private sweepTimer: NodeJS.Timeout | undefined;

  private readonly m: {
    depth: Gauge;
    bytes: Gauge;
    age: Gauge;
    disk: Gauge;
    drops: Counter<'reason'>;
    quarantined: Counter;
    fsyncs: Counter<'kind'>;
    corrupt: Counter;
    appendSeconds: Histogram;
  };

  constructor(opts: JournalOptions) {
    super();
    this.dir = opts.dir;
    this.cfg = opts.config;
    this.log = opts.logger.child({ component: 'journal' });
    this.now = opts.now ?? Date.now;
    this.closeTimeoutMs = opts.closeTimeoutMs ?? 5000;
    const registers = opts.metrics ? [opts.metrics] : [];
    // eslint-disable-next-line @typescript-eslint/no-this-alias
    const self = this;
    this.m = {
      depth: new Gauge({ name: 'connector_journal_depth_messages', help: 'unacknowledged messages in the journal', registers, collect() { this.set(self.pendingCount); } }),
      bytes: new Gauge({ name: 'connector_journal_depth_bytes', help: 'bytes of unacknowledged messages in the journal', registers, collect() { this.set(self.pendingBytes); } }),
      age: new Gauge({ name: 'connector_journal_oldest_age_seconds', help: 'age of the oldest unacknowledged message (0 when empty)', registers, collect() { this.set(self.oldestAgeMs() / 1000); } }),
      disk: new Gauge({ name: 'connector_journal_disk_bytes', help: 'bytes the journal uses on disk (segments, blobs, staging, quarantine)', registers, collect() { this.set(self.diskBytes()); } }),
      drops: new Counter({ name: 'connector_journal_dropped_total', help: 'messages dropped without a cloud acknowledgement, by reason (overflow, ttl, corrupt)', labelNames: ['reason'], registers }),
      quarantined: new Counter({ name: 'connector_journal_quarantined_total', help: 'messages moved to the quarantine (dead-letter) area', registers }),
      fsyncs: new Counter({ name: 'connector_journal_fsyncs_total', help: 'fsyncs issued by the journal, by kind (segment, blob, dir, ack)', labelNames: ['kind'], registers }),
      corrupt: new Counter({ name: 'connector_journal_corrupt_truncations_total', help: 'corrupt or torn segment tails truncated on replay', registers }),
      appendSeconds: new Histogram({
        name: 'connector_journal_append_seconds',
        help: 'time from append() to durable (under the fsync policy)',
        buckets: [0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5],
        registers,
      }),
    };
    for (const r of ['overflow', 'ttl', 'corrupt']) this.m.drops.inc({ reason: r }, 0);
    for (const k of ['segment', 'blob', 'dir', 'ack']) this.m.fsyncs.inc({ kind: k }, 0);
  }

  // ───────────────────────────── lifecycle ─────────────────────────────

  start(): Promise<void> {
    if (this.closed) return Promise.reject(new StorageError('ECONN_CLOSED', 'journal is closed'));
    this.startPromise ??= this.replay().then(() => {
      this.started = true;
      this.restartSweep();
    });
    return this.startPromise;
  }

  close(): Promise<void> {
    this.closePromise ??= this.doClose();
    return this.closePromise;
  }

  private async doClose(): Promise<void> {
    this.closed = true;
    if (this.sweepTimer) clearInterval(this.sweepTimer);
    this.sweepTimer = undefined;
    if (this.startPromise) await this.startPromise.catch(() => {});
    let timer: NodeJS.Timeout | undefined;
    const bounded = new Promise<void>((resolve) => {
      timer = setTimeout(() => {
        this.log.warn({ code: 'ECONN_SHUTDOWN_TIMEOUT', queued: this.queue.length }, 'journal close timed out waiting for writes in flight');
        resolve();
      }, this.closeTimeoutMs);
    });
    try {
      await Promise.race([this.drainAndFinish(), bounded]);
    } finally {
      clearTimeout(timer);
    }
    for (const p of this.queue.splice(0)) p.reject(new StorageError('ECONN_CLOSED', 'journal closed before the message was written'));
    for (const seg of this.segments.values()) {
      await seg.wfh?.close().catch(() => {});
      seg.wfh = undefined;
      this.closeReader(seg);
    }
  }

  private async drainAndFinish(): Promise<void> {
    if (this.flushTimer) {
      this.clearFlushTimer();
      this.runFlush();
    }
    while (this.flushing) await this.flushing;
    if (this.active?.wfh && !this.broken) {
      // with fsync=never, make what was written durable now
      await this.active.wfh.datasync().catch((err: unknown) => this.log.error({ err, code: 'ECONN_JOURNAL_IO' }, 'final journal fsync failed'));
    }
    if (this.started) {
      if (this.persistTimer) clearTimeout(this.persistTimer);
      this.persistTimer = undefined;
      await this.persistNow().catch(() => {});
    }
  }

  async reload(next: Config): Promise<string[]> {
    const n = next.bridge.journal;
    const changes: string[] = [];
    for (const k of Object.keys(n) as Array<keyof JournalConfig>) {
      if (n[k] !== this.cfg[k]) changes.push(`bridge.journal.${k}: ${String(this.cfg[k])} -> ${String(n[k])}`);
    }
    const ttlChanged = n.ttl_s !== this.cfg.ttl_s;
    this.cfg = n;
    if (ttlChanged && this.started && !this.closed) this.restartSweep();
    return changes;
  }

  status(): Record<string, unknown> {
    return { ...this.stats(), fsync: this.cfg.fsync, overflow: this.cfg.overflow, maxBytes: this.cfg.max_bytes };
  }

  // ───────────────────────────── replay ─────────────────────────────

  private async replay(): Promise<void> {
    const t0 = this.now();
    try {
      for (const d of [this.dir, this.blobDir, this.quarantineDir, this.tmpDir]) await fs.mkdir(d, { recursive: true, mode: 0o700 });
      for (const f of await fs.readdir(this.tmpDir)) await fs.rm(path.join(this.tmpDir, f), { force: true, recursive: true });
    } catch (err) {
      throw ioError(`directory set-up in ${this.dir}`, err);
    }
    await this.loadIdentity();
    const ack = await this.loadAckState();

    const names = (await fs.readdir(this.dir)).filter((n) => parseSegmentName(n) !== null).sort();
    let lastSeq = -1;
    const brokenBlobs: Entry[] = [];
    for (const name of names) {
      const seg: Segment = { firstSeq: parseSegmentName(name)!, name, path: path.join(this.dir, name), idPrefix: '', size: 0, indexedBytes: 0, live: 0, readers: 0, deleted: false, queuedForDelete: false };
      this.segments.set(name, seg);
      lastSeq = await this.scanSegment(seg, ack, lastSeq, brokenBlobs);
    }
    this.nextSeq = Math.max(ack.next, lastSeq + 1);
    this.indexedNext = this.nextSeq;

    // blobs of live records must exist with their size; a missing one is corruption (outside tampering)
    for (const e of brokenBlobs) this.drop(e, 'corrupt');
    this.advanceHead();

    // ack state first (covers anything marked done above), then delete what it makes garbage
    await this.persistNow();
    for (const seg of [...this.segments.values()]) {
      if (seg.live === 0 && !seg.deleted) await this.deleteSegment(seg);
    }
    const referenced = new Set<string>();
    for (let i = this.head; i < this.order.length; i++) {
      const e = this.order[i]!;
      if (e.live && e.blob) referenced.add(e.blob);
    }
    let orphans = 0;
    for (const f of await fs.readdir(this.blobDir)) {
      if (referenced.has(f)) continue;
      await fs.rm(path.join(this.blobDir, f), { force: true });
      orphans++;
    }
    for (let i = this.head; i < this.order.length; i++) {
      const e = this.order[i]!;
      if (e.live && e.blob) this.blobDiskBytes += e.size;
    }
    this.quarantineBytes = await dirBytes(this.quarantineDir);
    this.log.info(
      { pending: this.pendingCount, pendingBytes: this.pendingBytes, segments: this.segments.size, orphanBlobs: orphans, boot: this.boot, ms: this.now() - t0 },
      'journal replayed',
    );
  }

  private async loadIdentity(): Promise<void> {
    const file = path.join(this.dir, 'journal.json');
    let ident: { version: 1; instanceId: string; createdAt: number; boots: number } | undefined;
    try {
      const v = JSON.parse(await fs.readFile(file, 'utf8')) as Partial<{ version: number; instanceId: string; createdAt: number; boots: number }>;
      if (v.version === 1 && typeof v.instanceId === 'string' && /^[0-9a-f]{12,32}$/.test(v.instanceId) && Number.isSafeInteger(v.boots) && typeof v.createdAt === 'number') {
        ident = { version: 1, instanceId: v.instanceId, createdAt: v.createdAt, boots: v.boots! };
      } else {
        this.log.error({ code: 'ECONN_JOURNAL_CORRUPT', file }, 'journal.json is malformed; a new instance id is used (existing records keep their ids)');
      }
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') {
        if (err instanceof SyntaxError) this.log.error({ code: 'ECONN_JOURNAL_CORRUPT', file }, 'journal.json is not JSON; a new instance id is used (existing records keep their ids)');
        else throw ioError('read of journal.json', err);
      }
    }
    ident ??= { version: 1, instanceId: randomBytes(6).toString('hex'), createdAt: this.now(), boots: 0 };
    ident.boots += 1;
    try {
      await writeAtomic(file, JSON.stringify(ident) + '\n');
    } catch (err) {
      throw ioError('write of journal.json', err);
    }
    this.instanceId = ident.instanceId;
    this.boot = ident.boots;
  }

  private async loadAckState(): Promise<AckState> {
    const file = path.join(this.dir, 'ack.json');
    let text: string;
    try {
      text = await fs.readFile(file, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return { version: 1, floor: 0, done: [], next: 0 };
      throw ioError('read of ack.json', err);
    }
    const s = decodeAckState(text);
    if (s) return s;
    this.log.error({ code: 'ECONN_JOURNAL_CORRUPT', file }, 'ack.json is malformed; every record on disk is treated as unacknowledged (the cloud drops the duplicates)');
    return { version: 1, floor: 0, done: [], next: 0 };
  }

  /** Index every valid record of a segment; truncate at the first invalid one. Returns the last seq. */
  private async scanSegment(seg: Segment, ack: AckState, lastSeqIn: number, brokenBlobs: Entry[]): Promise<number> {
    let lastSeq = lastSeqIn;
    let fh: FileHandle;
    try {
      fh = await fs.open(seg.path, 'r+');
    } catch (err) {
      throw ioError(`open of ${seg.name}`, err);
    }
    let off = 0;
    let problem: string | undefined;
    let size: number;
    try {
      size = (await fh.stat()).size;
      const r = new BlockReader(fh, size);
      while (off < size) {
        if (size - off < HEADER_BYTES) {
          problem = 'partial record header (torn write)';
          break;
        }
        const hb = await r.read(off, HEADER_BYTES);
        const h = decodeHeader(hb);
        if (!h.ok) {
          problem = h.reason;
          break;
        }
        let crc = headerCrc(hb);
        const { metaLen, payloadLen, seq } = h.header;
        const recLen = HEADER_BYTES + metaLen + payloadLen;
        if (off + recLen > size) {
          problem = 'record runs past the end of the segment (torn write)';
          break;
        }
        const isBlob = (h.header.flags & FLAG_BLOB) !== 0;
        const first = seg.indexedBytes === 0;
        const metaBuf = await r.read(off + HEADER_BYTES, metaLen);
        crc = crc32(metaBuf, crc);
        // the JSON is parsed only where the index needs it: the first record (id prefix) and blob records (file name)
        const meta = first || isBlob ? parseMeta(Buffer.from(metaBuf), h.header) : undefined;
        for (let p = 0; p < payloadLen; p += SCAN_BLOCK) {
          crc = crc32(await r.read(off + HEADER_BYTES + metaLen + p, Math.min(SCAN_BLOCK, payloadLen - p)), crc);
        }
        if (crc >>> 0 !== h.header.crc) {
          problem = 'checksum mismatch';
          break;
        }
        if (meta === null) {
          problem = 'malformed record meta';
          break;
        }
        if (seq <= lastSeq) {
          problem = `sequence ${seq} not after ${lastSeq}`;
          break;
        }
        let id: string | undefined;
        if (meta) {
          const suffix = `-${seq}`;
          if (first && meta.id.endsWith(suffix)) seg.idPrefix = meta.id.slice(0, -String(seq).length);
          if (meta.id !== seg.idPrefix + seq) id = meta.id;
        }
        const live = !isDone(ack, seq);
        const e: Entry = { seq, seg, offset: off, recordBytes: recLen, metaLen, size: h.header.size, createdAt: h.header.createdAt, blob: meta?.blob, id, live: false };
        this.index(e, live);
        if (live && e.blob) {
          const st = await fs.stat(path.join(this.blobDir, e.blob)).catch(() => undefined);
          if (!st || st.size !== e.size) brokenBlobs.push(e);
        }
        lastSeq = seq;
        off += recLen;
      }
      seg.size = off;
      if (problem) {
        this.m.corrupt.inc();
        this.log.error(
          { code: 'ECONN_JOURNAL_CORRUPT', segment: seg.name, offset: off, droppedBytes: size - off, reason: problem },
          'journal segment has a corrupt or torn record; truncated at the last good record (the cut bytes are kept in journal/quarantine)',
        );
        await this.saveCorruptTail(seg, off, size);
        await fh.truncate(off);
        await fh.sync();
      }
    } catch (err) {
      if (errorCode(err)) throw err;
      throw ioError(`replay of ${seg.name}`, err);
    } finally {
      await fh.close();
    }
    return lastSeq;
  }

  private async saveCorruptTail(seg: Segment, from: number, to: number): Promise<void> {
    try {
      await pipeline(createReadStream(seg.path, { start: from, end: to - 1 }), createWriteStream(path.join(this.quarantineDir, `corrupt-${seg.name}-${from}.bin`), { mode: 0o600 }));
    } catch (err) {
      this.log.warn({ err, segment: seg.name }, 'could not keep a copy of the corrupt journal tail');
    }
  }

  // ───────────────────────────── producer API (UplinkSink) ─────────────────────────────

  append(meta: UplinkMessageMeta, payload: Buffer): Promise<AppendResult> {
    const t0 = process.hrtime.bigint();
    try {
      this.checkWritable();
      if (payload.length > this.cfg.max_message_bytes) throw this.tooLarge(payload.length, this.cfg.max_message_bytes, 'bridge.journal.max_message_bytes');
    } catch (err) {
      return Promise.reject(err as Error);
    }
    if (payload.length > INLINE_MAX) return this.appendStream(meta, Readable.from([payload], { objectMode: true }), { maxBytes: this.cfg.max_message_bytes });
    const sha = createHash('sha256').update(payload).digest('hex');
    return this.appendInline(meta, payload, sha, t0);
  }

  async appendStream(meta: UplinkMessageMeta, body: AsyncIterable<Buffer | Uint8Array>, opts: { maxBytes: number; expectedSha256?: Buffer }): Promise<AppendResult> {
    const t0 = process.hrtime.bigint();
    this.checkWritable();
    const limit = Math.min(opts.maxBytes, this.cfg.max_message_bytes);
    const limitKey = opts.maxBytes < this.cfg.max_message_bytes ? 'the upload limit' : 'bridge.journal.max_message_bytes';
    const hash = createHash('sha256');
    let mem: Buffer[] = [];
    let memLen = 0;
    let total = 0;
    let reserved = 0; // bytes of the cap this stream holds (released on failure, handed to the record on commit)
    let staged = 0; // bytes in the staging file
    let staging: { fh: FileHandle; path: string } | undefined;
    let blobPath: string | undefined;
    try {
      for await (const c of body) {
        const b = Buffer.isBuffer(c) ? c : Buffer.from(c.buffer, c.byteOffset, c.byteLength);
        if (b.length === 0) continue;
        if (total + b.length > limit) throw this.tooLarge(total + b.length, limit, limitKey);
        this.checkWritable();
        this.makeRoom(b.length);
        this.reservedBytes += b.length;
        reserved += b.length;
        total += b.length;
        hash.update(b);
        if (!staging && memLen + b.length <= STREAM_INLINE_MAX) {
          mem.push(Buffer.from(b));
          memLen += b.length;
          continue;
        }
        if (!staging) {
          const p = path.join(this.tmpDir, `${randomBytes(8).toString('hex')}.part`);
          staging = { fh: await io('create of a staging file', fs.open(p, 'wx', 0o600)), path: p };
          if (memLen) await io('write of a staging file', writeFully(staging.fh, Buffer.concat(mem, memLen)));
          staged += memLen;
          this.stagingBytes += memLen;
          mem = [];
          memLen = 0;
        }
        await io('write of a staging file', writeFully(staging.fh, b));
        staged += b.length;
        this.stagingBytes += b.length;
      }
      const digest = hash.digest();
      if (opts.expectedSha256 && (opts.expectedSha256.length !== digest.length || !timingSafeEqual(opts.expectedSha256, digest))) {
        throw new RequestError(400, 'ECONN_DIGEST_MISMATCH', `payload SHA-256 ${digest.toString('hex')} does not match the expected digest ${opts.expectedSha256.toString('hex')}; nothing was kept`);
      }
      if (!staging) {
        this.reservedBytes -= reserved;
        reserved = 0;
        return await this.appendInline(meta, Buffer.concat(mem, memLen), digest.toString('hex'), t0);
      }
      this.checkWritable();
      if (this.cfg.fsync !== 'never') {
        await io('fsync of a staged payload', staging.fh.datasync());
        this.m.fsyncs.inc({ kind: 'blob' });
      }
      await io('close of a staged payload', staging.fh.close());
      const blob = `${randomBytes(12).toString('hex')}.bin`;
      await io('rename of a staged payload', fs.rename(staging.path, path.join(this.blobDir, blob)));
      blobPath = path.join(this.blobDir, blob);
      staging = undefined;
      this.stagingBytes -= staged;
      this.blobDiskBytes += total;
      if (this.cfg.fsync !== 'never') {
        await io('fsync of the blob directory', syncDir(this.blobDir));
        this.m.fsyncs.inc({ kind: 'dir' });
      }
      // synchronous: the seq is assigned and the reservation handed over in one step
      const pending = this.enqueue(meta, total, digest.toString('hex'), Buffer.alloc(0), blob, total);
      reserved = 0;
      const result = await pending;
      blobPath = undefined;
      this.m.appendSeconds.observe(Number(process.hrtime.bigint() - t0) / 1e9);
      return result;
    } catch (err) {
      this.reservedBytes -= reserved;
      if (staging) {
        await staging.fh.close().catch(() => {});
        await fs.rm(staging.path, { force: true }).catch(() => {});
        this.stagingBytes -= staged;
      }
      if (blobPath) {
        await fs.rm(blobPath, { force: true }).catch(() => {});
        this.blobDiskBytes -= total;
      }
      throw err; // our own I/O failures are already ECONN_JOURNAL_IO; a failing body passes through as is
    }
  }

  private async appendInline(meta: UplinkMessageMeta, payload: Buffer, sha256: string, t0: bigint): Promise<AppendResult> {
    const result = await this.enqueue(meta, payload.length, sha256, payload, undefined, 0);
    this.m.appendSeconds.observe(Number(process.hrtime.bigint() - t0) / 1e9);
    return result;
  }

  private checkWritable(): void {
    if (this.closed) throw new StorageError('ECONN_CLOSED', 'journal is closed');
    if (!this.started) throw new StorageError('ECONN_CLOSED', 'journal is not started');
    if (this.broken) throw this.brokenError();
  }

  private tooLarge(size: number, limit: number, key: string): RequestError {
    return new RequestError(413, 'ECONN_PAYLOAD_TOO_LARGE', `message of ${size} bytes or more exceeds ${key} (${limit} bytes); send less or raise the limit; nothing was kept`);
  }

  private idOf(seq: number): string {
    return `${this.instanceId}-${this.boot}-${seq}`;
  }

  /**
   * Make room for `bytes` more under the byte cap: reject (ECONN_JOURNAL_FULL) or drop the
   * oldest pending records, by policy. Synchronous, so callers reserve right after.
   */
  private makeRoom(bytes: number): void {
    const cap = this.cfg.max_bytes;
    if (bytes > cap) throw this.tooLarge(bytes, cap, 'bridge.journal.max_bytes');
    if (this.used() + bytes <= cap) return;
    if (this.cfg.overflow === 'reject') {
      throw new RequestError(503, 'ECONN_JOURNAL_FULL', `journal is full (${this.used()} of ${cap} bytes, bridge.journal.max_bytes) and the overflow policy is reject; the message was not accepted`);
    }
    let n = 0;
    let first: string | undefined;
    let last: string | undefined;
    while (this.used() + bytes > cap) {
      const oldest = this.head < this.order.length ? this.order[this.head] : undefined;
      if (!oldest || !oldest.live) break;
      first ??= idOfEntry(oldest);
      last = idOfEntry(oldest);
      this.drop(oldest, 'overflow');
      n++;
    }
    if (n) {
      this.log.warn({ dropped: n, firstId: first, lastId: last, reason: 'overflow', maxBytes: cap }, 'journal full: dropped the oldest unacknowledged messages (overflow policy drop-oldest)');
      this.schedulePersist();
    }
    if (this.used() + bytes > cap) {
      throw new RequestError(503, 'ECONN_JOURNAL_FULL', `journal is full (${this.used()} of ${cap} bytes) with messages still being written; the message was not accepted`);
    }
  }

  private used(): number {
    return this.segCharged + this.liveBlobBytes + this.reservedBytes;
  }

  // ───────────────────────────── writer (group commit) ─────────────────────────────

  /**
   * Assign the next seq and queue the record for the writer. Synchronous up to the returned
   * promise: it throws (full, closed) before anything is queued, so seq order = queue order =
   * file order. `blobBytes` were reserved by the caller and are owned by the queue from here.
   */
  private enqueue(meta: UplinkMessageMeta, size: number, sha256: string, payload: Buffer, blob: string | undefined, blobBytes: number): Promise<AppendResult> {
    this.checkWritable();
    const seq = this.nextSeq;
    const rm: RecordMeta = { id: this.idOf(seq), m: meta, size, sha256, t: this.now(), ...(blob ? { blob } : {}) };
    const buf = encodeRecord(seq, rm, payload);
    this.makeRoom(buf.length);
    this.nextSeq++;
    this.reservedBytes += buf.length;
    return new Promise<AppendResult>((resolve, reject) => {
      this.queue.push({ seq, rm, buf, blobBytes, resolve, reject });
      this.kick();
    });
  }

  private kick(): void {
    if (this.flushing || this.flushTimer) return;
    const delay = this.cfg.fsync === 'batch' ? this.cfg.fsync_max_delay_ms : 0;
    if (delay <= 0) {
      this.flushTimer = setImmediate(() => this.runFlush());
      return;
    }
    // Hold the batch open only while writers keep arriving (each event-loop turn that added a
    // record extends it), never longer than fsync_max_delay_ms: a lone or closed-loop writer is
    // not delayed, a stream of arrivals shares one fsync.
    const until = performance.now() + delay;
    let seen = this.queue.length;
    const check = (): void => {
      if (this.queue.length > seen && performance.now() < until) {
        seen = this.queue.length;
        this.flushTimer = setImmediate(check);
        return;
      }
      this.runFlush();
    };
    this.flushTimer = setImmediate(check);
  }

  private clearFlushTimer(): void {
    if (!this.flushTimer) return;
    clearTimeout(this.flushTimer as NodeJS.Timeout);
    clearImmediate(this.flushTimer as NodeJS.Immediate);
    this.flushTimer = undefined;
  }

  private runFlush(): void {
    this.flushTimer = undefined;
    if (this.flushing) return;
    this.flushing = (async () => {
      while (this.queue.length) await this.flushOnce();
    })().finally(() => {
      this.flushing = undefined;
      if (this.queue.length) this.kick();
    });
  }

  /** Write one batch (all into the active segment), fsync it once per policy, then index and resolve it. */
  private async flushOnce(): Promise<void> {
    const segBytes = this.segmentBytes();
    const firstLen = this.queue[0]!.buf.length;
    try {
      if (this.broken) throw this.brokenError();
      if (!this.active || (this.active.size > 0 && this.active.size + firstLen > segBytes)) await this.roll(this.queue[0]!.seq);
    } catch (err) {
      this.fail(this.queue.splice(0), err);
      return;
    }
    const seg = this.active!;
    const batch: PendingWrite[] = [];
    let bytes = 0;
    const max = this.cfg.fsync === 'always' ? 1 : Infinity;
    while (this.queue.length && batch.length < max) {
      const len = this.queue[0]!.buf.length;
      if (batch.length && (bytes + len > MAX_BATCH_BYTES || seg.size + bytes + len > segBytes)) break;
      batch.push(this.queue.shift()!);
      bytes += len;
    }
    const base = seg.size;
    try {
      try {
        await writeFully(seg.wfh!, batch.length === 1 ? batch[0]!.buf : Buffer.concat(batch.map((p) => p.buf), bytes));
      } catch (err) {
        await seg.wfh!.truncate(base).catch(() => {});
        throw ioError(`write to ${seg.name}`, err);
      }
      seg.size += bytes;
      if (this.cfg.fsync !== 'never') {
        try {
          await seg.wfh!.datasync();
          this.m.fsyncs.inc({ kind: 'segment' });
        } catch (err) {
          // after a failed fsync the page cache state is unknown: stop accepting (a restart replays)
          this.broken = err as Error;
          this.log.error({ err, code: 'ECONN_JOURNAL_IO', segment: seg.name }, 'journal fsync failed; the journal stops accepting messages until restart');
          throw ioError(`fsync of ${seg.name}`, err);
        }
      }
    } catch (err) {
      this.fail(batch, err);
      return;
    }
    let offset = base;
    const entries: Entry[] = [];
    const recs: JournalRecord[] = [];
    for (const p of batch) {
      const entry: Entry = {
        seq: p.seq,
        seg,
        offset,
        recordBytes: p.buf.length,
        metaLen: p.buf.readUInt32BE(16),
        size: p.rm.size,
        createdAt: p.rm.t,
        blob: p.rm.blob,
        id: p.rm.id === seg.idPrefix + p.seq ? undefined : p.rm.id,
        live: false,
      };
      offset += p.buf.length;
      this.reservedBytes -= p.buf.length + p.blobBytes;
      this.index(entry, true);
      const rec: JournalRecord = { id: p.rm.id, seq: p.seq, meta: p.rm.m, size: p.rm.size, sha256: p.rm.sha256, createdAt: p.rm.t };
      this.cacheRecord(rec);
      recs.push(rec);
      this.indexedNext = p.seq + 1;
      entries.push(entry);
    }
    // resolve after indexing all: a listener that acks from 'append' sees a consistent index
    for (let i = 0; i < batch.length; i++) {
      const { rm } = batch[i]!;
      batch[i]!.resolve({ id: rm.id, size: rm.size, sha256: rm.sha256 });
      if (entries[i]!.live) this.emit('append', recs[i]!);
    }
  }

  private fail(batch: PendingWrite[], err: unknown): void {
    const e = errorCode(err) ? (err as Error) : ioError('write', err);
    for (const p of batch) {
      this.reservedBytes -= p.buf.length + p.blobBytes;
      p.reject(e);
    }
    // unwritten records leave a gap in seq; move past them so the floor can advance
    if (batch.length) this.indexedNext = Math.max(this.indexedNext, batch[batch.length - 1]!.seq + 1);
  }

  private brokenError(): StorageError {
    return new StorageError('ECONN_JOURNAL_IO', `journal is unusable after an fsync failure (${this.broken?.message ?? 'unknown'}); restart the daemon after checking the disk`);
  }

  private async roll(firstSeq: number): Promise<void> {
    const old = this.active;
    if (old) {
      await old.wfh?.close().catch(() => {});
      old.wfh = undefined;
      this.active = undefined;
      if (old.live === 0) this.queueSegmentDelete(old);
    }
    const name = segmentName(firstSeq);
    const seg: Segment = { firstSeq, name, path: path.join(this.dir, name), idPrefix: `${this.instanceId}-${this.boot}-`, size: 0, indexedBytes: 0, live: 0, readers: 0, deleted: false, queuedForDelete: false };
    try {
      seg.wfh = await fs.open(seg.path, 'wx', 0o600);
      if (this.cfg.fsync !== 'never') {
        await syncDir(this.dir);
        this.m.fsyncs.inc({ kind: 'dir' });
      }
    } catch (err) {
      await seg.wfh?.close().catch(() => {});
      throw ioError(`creation of segment ${name}`, err);
    }
    this.segments.set(name, seg);
    this.active = seg;
  }

  /** Effective segment size: at most a quarter of the byte cap, so the unaccounted acked part stays small. */
  private segmentBytes(): number {
    return Math.max(64 * 1024, Math.min(this.cfg.segment_bytes, Math.floor(this.cfg.max_bytes / 4)));
  }

  // ───────────────────────────── index ─────────────────────────────

  private index(e: Entry, live: boolean): void {
    const seg = e.seg;
    const before = seg.live > 0 ? seg.indexedBytes : 0;
    seg.indexedBytes += e.recordBytes;
    if (live) {
      e.live = true;
      seg.live++;
      this.pendingCount++;
      this.pendingBytes += e.recordBytes + (e.blob ? e.size : 0);
      if (e.blob) this.liveBlobBytes += e.size;
    }
    this.segCharged += (seg.live > 0 ? seg.indexedBytes : 0) - before;
    this.order.push(e);
  }

  /** Take a live record out of the queue (ack, drop, quarantine). Deletion happens after the ack state is persisted. */
  private markDone(e: Entry): void {
    if (!e.live) return;
    e.live = false;
    this.recCache.delete(e.seq);
    this.pendingCount--;
    this.pendingBytes -= e.recordBytes + (e.blob ? e.size : 0);
    const seg = e.seg;
    const before = seg.live > 0 ? seg.indexedBytes : 0;
    seg.live--;
    this.segCharged += (seg.live > 0 ? seg.indexedBytes : 0) - before;
    if (e.blob) {
      this.liveBlobBytes -= e.size;
      this.blobsToDelete.push({ name: e.blob, size: e.size });
    }
    if (seg.live === 0 && seg !== this.active) this.queueSegmentDelete(seg);
    this.advanceHead();
  }

  private drop(e: Entry, reason: 'overflow' | 'ttl' | 'corrupt'): void {
    if (!e.live) return;
    this.markDone(e);
    this.droppedBy[reason]++;
    this.m.drops.inc({ reason });
    this.emit('removed', { id: idOfEntry(e), seq: e.seq, reason });
  }

  private queueSegmentDelete(seg: Segment): void {
    if (seg.queuedForDelete || seg.deleted) return;
    seg.queuedForDelete = true;
    this.segsToDelete.push(seg);
  }

  private advanceHead(): void {
    while (this.head < this.order.length && !this.order[this.head]!.live) this.head++;
  }

  /** Forget index slots before the head (never while iterating the index). */
  private compact(): void {
    if (this.head > 4096 && this.head * 2 > this.order.length) {
      this.order = this.order.slice(this.head);
      this.head = 0;
    }
  }

  private ackState(): AckState {
    const floor = this.head < this.order.length ? this.order[this.head]!.seq : this.indexedNext;
    const done: Array<[number, number]> = [];
    let run: [number, number] | undefined;
    for (let i = this.head; i < this.order.length; i++) {
      const e = this.order[i]!;
      if (e.live) {
        run = undefined;
        continue;
      }
      if (run) run[1] = e.seq;
      else done.push((run = [e.seq, e.seq]));
    }
    return { version: 1, floor, done, next: this.nextSeq };
  }

  // ───────────────────────────── consumer API ─────────────────────────────

  /** Unacknowledged records with seq > afterSeq, in append order (expired ones are dropped instead). */
  pending(afterSeq = -1, limit = 1024): JournalRecord[] {
    this.compact();
    const out: JournalRecord[] = [];
    let lo = this.head;
    let hi = this.order.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.order[mid]!.seq <= afterSeq) lo = mid + 1;
      else hi = mid;
    }
    let expired = 0;
    for (let i = lo; i < this.order.length && out.length < limit; i++) {
      const e = this.order[i]!;
      if (!e.live) continue;
      if (this.isExpired(e)) {
        this.drop(e, 'ttl');
        expired++;
        continue;
      }
      out.push(this.recordOf(e));
    }
    if (expired) {
      this.log.warn({ dropped: expired, reason: 'ttl', ttlS: this.cfg.ttl_s }, 'dropped unacknowledged messages older than bridge.journal.ttl_s');
      this.schedulePersist();
    }
    return out;
  }

  first(): JournalRecord | undefined {
    return this.pending(-1, 1)[0];
  }

  get(id: string): JournalRecord | undefined {
    const e = this.find(id);
    return e ? this.recordOf(e) : undefined;
  }

  async readPayload(rec: JournalRecord, start = 0, end = rec.size): Promise<Buffer> {
    const e = this.liveEntry(rec);
    if (!Number.isSafeInteger(start) || !Number.isSafeInteger(end) || start < 0 || end > e.size || start > end) {
      throw new RangeError(`bad payload range [${start}, ${end}) of a ${e.size}-byte message`);
    }
    if (end - start > MAX_READ_BYTES) throw new RangeError(`read payloads in chunks of at most ${MAX_READ_BYTES} bytes`);
    if (start === end) return Buffer.alloc(0);
    try {
      if (e.blob) {
        const fh = await fs.open(path.join(this.blobDir, e.blob), 'r');
        try {
          return await this.checkedRead(fh, end - start, start);
        } finally {
          await fh.close();
        }
      }
      const seg = e.seg;
      const fd = this.readerFd(seg);
      seg.readers++;
      try {
        const buf = Buffer.allocUnsafe(end - start);
        let got = 0;
        while (got < buf.length) {
          const { bytesRead } = await readFd(fd, buf, got, buf.length - got, payloadOffset(e) + start + got);
          if (bytesRead === 0) break;
          got += bytesRead;
        }
        if (got !== buf.length) throw new StorageError('ECONN_JOURNAL_CORRUPT', `journal segment ${seg.name} is shorter than its index says (${got} of ${buf.length} bytes)`);
        return buf;
      } finally {
        seg.readers--;
        if (seg.deleted && seg.readers === 0) this.closeReader(seg);
      }
    } catch (err) {
      if (errorCode(err) && !(err as NodeJS.ErrnoException).syscall) throw err;
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') throw this.gone(rec);
      throw ioError(`read of message ${rec.id}`, err);
    }
  }

  private readerFd(seg: Segment): number {
    seg.fd ??= fsSync.openSync(seg.path, 'r');
    return seg.fd;
  }

  /** The public record of an index slot: from the cache, else its metadata read from disk. */
  private recordOf(e: Entry): JournalRecord {
    const hit = this.recCache.get(e.seq);
    if (hit) return hit;
    const buf = Buffer.allocUnsafe(e.metaLen);
    try {
      const n = fsSync.readSync(this.readerFd(e.seg), buf, 0, e.metaLen, e.offset + HEADER_BYTES);
      if (n !== e.metaLen) throw new Error(`short read (${n} of ${e.metaLen} bytes)`);
    } catch (err) {
      throw ioError(`read of the metadata of record ${e.seq} in ${e.seg.name}`, err);
    }
    let m: RecordMeta;
    try {
      m = JSON.parse(buf.toString('utf8')) as RecordMeta;
    } catch (err) {
      throw new StorageError('ECONN_JOURNAL_CORRUPT', `record ${e.seq} in ${e.seg.name} has unreadable metadata after passing its checksum`, { cause: err });
    }
    const rec: JournalRecord = { id: idOfEntry(e), seq: e.seq, meta: m.m, size: e.size, sha256: m.sha256, createdAt: e.createdAt };
    this.cacheRecord(rec);
    return rec;
  }

  private cacheRecord(rec: JournalRecord): void {
    if (this.recCache.size >= REC_CACHE) {
      const oldest = this.recCache.keys().next();
      if (!oldest.done) this.recCache.delete(oldest.value);
    }
    this.recCache.set(rec.seq, rec);
  }

  /** The live index slot of an id (`<prefix>-<seq>`): binary search by seq, then the whole id must match. */
  private find(id: string): Entry | undefined {
    if (typeof id !== 'string') return undefined;
    const dash = id.lastIndexOf('-');
    const seq = dash >= 0 ? Number(id.slice(dash + 1)) : NaN;
    if (!Number.isSafeInteger(seq)) return undefined;
    let lo = this.head;
    let hi = this.order.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      const e = this.order[mid]!;
      if (e.seq < seq) lo = mid + 1;
      else if (e.seq > seq) hi = mid - 1;
      else return e.live && idOfEntry(e) === id ? e : undefined;
    }
    return undefined;
  }

  private async checkedRead(fh: FileHandle, len: number, pos: number): Promise<Buffer> {
    const b = await readFully(fh, len, pos);
    if (b.length !== len) throw new StorageError('ECONN_JOURNAL_CORRUPT', `journal file is shorter than the record says (${b.length} of ${len} bytes)`);
    return b;
  }

  /** The payload from `start` to its end as a stream of chunks read from disk. */
  createPayloadStream(rec: JournalRecord, start = 0): Readable {
    const e = this.liveEntry(rec);
    if (!Number.isSafeInteger(start) || start < 0 || start > e.size) throw new RangeError(`bad payload offset ${start} of a ${e.size}-byte message`);
    if (start === e.size) return Readable.from([]);
    if (e.blob) return createReadStream(path.join(this.blobDir, e.blob), { start, end: e.size - 1, highWaterMark: 256 * 1024 });
    return createReadStream(e.seg.path, { start: payloadOffset(e) + start, end: payloadOffset(e) + e.size - 1, highWaterMark: 256 * 1024 });
  }

  private liveEntry(rec: JournalRecord): Entry {
    const e = this.find(rec.id);
    if (!e) throw this.gone(rec);
    return e;
  }

  private gone(rec: JournalRecord): StorageError {
    return new StorageError('ECONN_NOT_FOUND', `message ${rec.id} is no longer in the journal (acknowledged, dropped or quarantined)`);
  }

  /** The cloud acknowledged `id`. Unknown ids are ignored. Resolves once the ack state is on disk. */
  ack(id: string): Promise<void> {
    const e = this.find(id);
    if (!e || this.closed) return this.acksSettled();
    this.markDone(e);
    return this.schedulePersist();
  }

  /** Resolves when every ack made so far is on disk (an ack of an already-acked id waits for it too). */
  private acksSettled(): Promise<void> {
    if (this.persistDirty) return this.persistDeferred.promise;
    if (this.persisting) return this.persisting.catch(() => {});
    return Promise.resolve();
  }

  /** The cloud rejected `id` as permanently invalid: keep it in journal/quarantine/ with the reason, take it out of the queue. */
  async quarantine(id: string, reason: string): Promise<void> {
    const e = this.find(id);
    if (!e) return;
    const rec = this.recordOf(e);
    const why = String(reason).slice(0, 2000);
    const base = path.join(this.quarantineDir, id);
    try {
      if (e.blob) {
        await fs.link(path.join(this.blobDir, e.blob), `${base}.bin`).catch(async (err: NodeJS.ErrnoException) => {
          if (err.code === 'EEXIST') return;
          await fs.copyFile(path.join(this.blobDir, e.blob!), `${base}.bin`);
        });
      } else {
        await fs.writeFile(`${base}.bin`, await this.readPayload(rec), { mode: 0o600 });
      }
      const info = JSON.stringify({ ...rec, reason: why, quarantinedAt: this.now() }, null, 2) + '\n';
      await fs.writeFile(`${base}.json`, info, { mode: 0o600 });
      this.quarantineBytes += rec.size + info.length;
    } catch (err) {
      this.log.error({ err, id }, 'could not copy a quarantined message to journal/quarantine; it is removed from the queue anyway');
    }
    if (!e.live) return; // acked or dropped meanwhile
    this.markDone(e);
    this.quarantinedCount++;
    this.m.quarantined.inc();
    this.log.warn({ id, seq: e.seq, deviceId: rec.meta.deviceId, topic: rec.meta.topic, size: rec.size, reason: why }, 'message quarantined (rejected by the cloud as permanently invalid)');
    this.emit('removed', { id, seq: e.seq, reason: 'quarantine' });
    await this.schedulePersist();
  }

  stats(): JournalStats {
    const d = this.droppedBy;
    return {
      pendingMessages: this.pendingCount,
      pendingBytes: this.pendingBytes,
      oldestPendingAgeMs: this.oldestAgeMs(),
      diskBytes: this.diskBytes(),
      dropped: d.overflow + d.ttl + d.corrupt,
      droppedByReason: { ...d },
      quarantined: this.quarantinedCount,
    };
  }

  private oldestAgeMs(): number {
    const e = this.head < this.order.length ? this.order[this.head] : undefined;
    return e?.live ? Math.max(0, this.now() - e.createdAt) : 0;
  }

  private diskBytes(): number {
    let n = this.blobDiskBytes + this.stagingBytes + this.quarantineBytes;
    for (const s of this.segments.values()) if (!s.deleted) n += s.size;
    return n;
  }

  // ───────────────────────────── TTL ─────────────────────────────

  private isExpired(e: Entry): boolean {
    return this.cfg.ttl_s > 0 && this.now() - e.createdAt > this.cfg.ttl_s * 1000;
  }

  /** Drop pending records older than ttl_s (oldest first). Runs periodically; public for tests. Returns how many. */
  sweep(): number {
    if (this.cfg.ttl_s <= 0) return 0;
    let n = 0;
    let first: string | undefined;
    while (this.head < this.order.length) {
      const e = this.order[this.head]!;
      if (!this.isExpired(e)) break;
      first ??= idOfEntry(e);
      this.drop(e, 'ttl');
      n++;
    }
    if (n) {
      this.log.warn({ dropped: n, firstId: first, reason: 'ttl', ttlS: this.cfg.ttl_s }, 'dropped unacknowledged messages older than bridge.journal.ttl_s');
      this.schedulePersist();
    }
    return n;
  }

  private restartSweep(): void {
    if (this.sweepTimer) clearInterval(this.sweepTimer);
    this.sweepTimer = undefined;
    if (this.cfg.ttl_s <= 0) return;
    const every = Math.min(60_000, Math.max(1000, (this.cfg.ttl_s * 1000) / 10));
    this.sweepTimer = setInterval(() => this.sweep(), every);
    this.sweepTimer.unref();
    this.sweep();
  }

  // ───────────────────────────── ack persistence and deletion ─────────────────────────────

  private schedulePersist(): Promise<void> {
    this.persistDirty = true;
    const d = this.persistDeferred;
    if (!this.persistTimer && !this.persisting) {
      this.persistTimer = setTimeout(() => {
        this.persistTimer = undefined;
        void this.persistNow().catch(() => {});
      }, ACK_PERSIST_DELAY_MS);
    }
    return d.promise;
  }

  /** Write ack.json now (waiting for one in flight), then delete the files it made garbage. */
  private async persistNow(): Promise<void> {
    while (this.persisting) await this.persisting.catch(() => {});
    const d = this.persistDeferred;
    this.persistDeferred = deferred();
    this.persistDirty = false;
    const state = this.ackState();
    const blobs = this.blobsToDelete.splice(0);
    const segs = this.segsToDelete.splice(0);
    this.persisting = (async () => {
      try {
        await writeAtomic(path.join(this.dir, 'ack.json'), encodeAckState(state));
        this.m.fsyncs.inc({ kind: 'ack' }, 2);
      } catch (err) {
        this.blobsToDelete.unshift(...blobs);
        this.segsToDelete.unshift(...segs);
        const e = ioError('write of ack.json', err);
        this.log.error({ err, code: 'ECONN_JOURNAL_IO' }, 'could not persist journal acknowledgements; acknowledged messages may be re-sent after a restart');
        d.reject(e);
        throw e;
      }
      for (const b of blobs) {
        await fs.rm(path.join(this.blobDir, b.name), { force: true }).catch(() => {});
        this.blobDiskBytes -= b.size;
      }
      for (const s of segs) if (s.live === 0 && s !== this.active) await this.deleteSegment(s);
      d.resolve();
    })().finally(() => {
      this.persisting = undefined;
      if (this.persistDirty && !this.persistTimer && !this.closed) this.schedulePersist();
    });
    return this.persisting;
  }

  private async deleteSegment(seg: Segment): Promise<void> {
    if (seg.deleted) return;
    seg.deleted = true;
    this.segments.delete(seg.name);
    // forget done entries of this segment at the head of the index
    await fs.rm(seg.path, { force: true }).catch((err: unknown) => this.log.warn({ err, segment: seg.name }, 'could not delete an acknowledged journal segment'));
    if (seg.readers === 0) this.closeReader(seg);
  }

  private closeReader(seg: Segment): void {
    const fd = seg.fd;
    seg.fd = undefined;
    if (fd !== undefined) fsSync.close(fd, () => {});
  }

  private get blobDir(): string {
    return path.join(this.dir, 'blobs');
  }
  private get quarantineDir(): string {
    return path.join(this.dir, 'quarantine');
  }
  private get tmpDir(): string {
    return path.join(this.dir, 'tmp');
  }
}

async function dirBytes(dir: string): Promise<number> {
  let n = 0;
  for (const f of await fs.readdir(dir).catch(() => [] as string[])) {
    const st = await fs.stat(path.join(dir, f)).catch(() => undefined);
    if (st?.isFile()) n += st.size;
  }
  return n;
}

