/**
 * The durable journal (outbox) between the device side and the uplink — the facade. It
 * implements UplinkSink (core/ports.ts) for the broker and the HTTPS upload, PendingRecords
 * for the broker's redelivery seeding, and the consumer API below for the uplink
 * (UplinkJournal in bridge/uplink.ts). The parts live in bridge/journal/:
 *
 *   format.ts     record, segment header, segment index and ack-log codecs (format 2)
 *   format-v1.ts  the legacy format, still read on replay
 *   writer.ts     group commit: one write + one fdatasync per batch
 *   segment.ts    a segment and its compact typed-array index (29 B per record)
 *   replay.ts     start-up: index files or a scan with resynchronisation
 *   ack-log.ts    the acknowledged position: a preallocated append-only log
 *   cache.ts      recent records served from memory
 *   clock.ts      the monotonic journal clock (createdAt, TTL)
 *   metrics.ts    connector_journal_*
 *
 * ## On disk (<state_dir>/journal, mode 0700)
 *   journal.json      {version, instanceId, createdAt, boots, nonce}: written (atomically,
 *                     fsynced) at every start, before the first append
 *   seg-<seq>.log     segments (format in bridge/journal/format.ts); seg-<seq>.idx their index
 *   ack.log           acknowledged position (bridge/journal/ack-log.ts)
 *   blobs/<name>.bin  payloads larger than INLINE_MAX; the record names the blob
 *   tmp/              staging files of uploads in progress (emptied on start)
 *   quarantine/       dead letters: <id>.json (meta + reason) and <id>.bin; cut corrupt bytes
 *
 * ## Ids (issue 9 #1)
 * id = `<instanceId>-<bootNonce>-<seq>`. The nonce is 8 random bytes drawn at every start and
 * written durably to journal.json before the first append, so ids never repeat — not after
 * a torn tail is cut, not after the state directory is restored from a backup, not on two
 * gateways cloned from one image (their seqs and instance ids agree, their nonces do not).
 *
 * ## Consumer API (the uplink)
 *   journal.on('append', (rec: JournalRecord) => …)   a record became durable and pending
 *   journal.on('removed', (ev: {id, seq, reason}) => …) a pending record left without an ack:
 *                                                      reason 'overflow' | 'ttl' | 'corrupt' | 'quarantine'
 *   journal.on('unwritable', (err) => …) / on('writable', () => …)   a write failed (appends are
 *        refused with ECONN_JOURNAL_IO) / a probe write succeeded (appends accepted again)
 *   journal.pending(afterSeq = -1, limit = 1024): JournalRecord[]
 *        unacknowledged records with seq > afterSeq, in order (expired ones are dropped, records
 *        whose bytes fail their CRC are dropped as corrupt — never returned, never retried).
 *   journal.first(), journal.get(id)
 *   journal.readPayload(rec, start = 0, end = rec.size): Promise<Buffer>
 *        from memory for recent records, else from disk (CRC checked; a corrupt record is
 *        dropped and ECONN_JOURNAL_CORRUPT thrown). ECONN_NOT_FOUND once it left the queue.
 *   journal.createPayloadStream(rec, start = 0): Readable
 *   journal.ack(id): Promise<void>   cheap: marks done in memory; acks of ACK_FLUSH_MS are
 *        made durable together (one ack-log write + one fdatasync); resolves then.
 *   journal.quarantine(id, reason): Promise<void>   payload + reason fsynced to quarantine/,
 *        counted, logged, removed from the queue. Unknown id = no-op.
 *   journal.stats(): JournalStats
 */
import { EventEmitter } from 'node:events';
import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import fs from 'node:fs';
import fsp, { type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { Readable } from 'node:stream';
import type { Registry } from 'prom-client';
import type { Config } from '../core/config/schema.js';
import type { Component } from '../core/component.js';
import type { Logger } from '../core/logger.js';
import { preadFully, pwriteAllSync, syncDir, writeAtomic } from '../core/fs.js';
import { STREAM_RECLAIM_EVERY_BYTES, reclaimer } from '../core/reclaim.js';
import { RequestError, StorageError, errorCode } from '../core/errors.js';
import type { AppendResult, JournaledPublish, PendingRecords, UplinkMessageMeta, UplinkSink } from '../core/ports.js';
import { LIMITS, parseMeta as parseWireMeta, sha256 } from '../protocol/codec.js';
import {
  ACK_FLOOR,
  ACK_RANGE,
  DoneSet,
  RECORD_HEADER_BYTES,
  decodeHeaderV2,
  decodeMeta,
  encodeMeta,
  encodeSegmentHeader,
  peekDevicePid,
  recordBytes,
  recordCrcOk,
  shaOfRecord,
} from './journal/format.js';
import { HEADER_BYTES as V1_HEADER_BYTES, crc32 as v1crc, decodeAckState, decodeHeader as decodeHeaderV1, headerCrc as v1HeaderCrc, parseMeta as parseMetaV1, parseSegmentName, segmentName } from './journal/format-v1.js';
import { AckLog } from './journal/ack-log.js';
import { RecentCache } from './journal/cache.js';
import { JournalClock, type Clocks } from './journal/clock.js';
import { createJournalMetrics, type JournalMetrics } from './journal/metrics.js';
import { loadSegment, removeSegmentFiles, writeIndex, type ReplayContext } from './journal/replay.js';
import { Segment, preadExact, syncDirSync } from './journal/segment.js';
import { GroupWriter, type QueuedRecord, type WriterHost } from './journal/writer.js';
import { IncomingUpload, STREAM_BLOB_PREFIX, streamIdOfBlob } from './journal/upload.js';

export { IncomingUpload };

export type JournalConfig = Config['bridge']['journal'];

/** append() payloads larger than this go to a blob file instead of inline in a segment. */
export const INLINE_MAX = 1024 * 1024;
/** appendStream keeps up to this much in memory; a longer body spills to a staging file. */
export const STREAM_INLINE_MAX = 64 * 1024;
/**
 * A staged body goes to its file in runs of this many bytes (one writev each): an HTTPS body arrives in
 * pieces of 16-64 KiB, and one awaited write per piece cost a syscall and a pause of the body each.
 */
const STAGE_WRITE_BYTES = 1024 * 1024;
/** …or of this many pieces, whichever comes first (a body of tiny pieces must not gather a huge iovec). */
const STAGE_WRITE_BUFFERS = 256;
/**
 * A staged body is fdatasynced every this many bytes while it still arrives (fsync policy not `never`):
 * the kernel would otherwise start writing back only at the final sync (dirty_background_ratio is 10 %
 * of RAM), and the 202 would wait for the whole body to reach the disk.
 */
const STAGE_SYNC_BYTES = 32 * 1024 * 1024;
/** Upload bodies staged on every journal: one scavenge per STREAM_RECLAIM_EVERY_BYTES of them (core/reclaim.ts). */
const reclaimBody = reclaimer(STREAM_RECLAIM_EVERY_BYTES);
const MAX_READ_BYTES = 64 * 1024 * 1024;
/**
 * Acks are gathered this long before one ack-log write + fdatasync: 20 flushes/s cost
 * ≈ 80 KiB/s of page rewrites (≈ 16 B per message at 5 000 msg/s) and a crash re-sends at
 * most this window of acknowledged messages (the cloud drops them as duplicates).
 */
const ACK_FLUSH_MS = 50;
/** Records read back from disk for pending() in spans of up to this many bytes (one pread). */
const READ_SPAN = 1024 * 1024;
/** While the journal is broken by a write error, probe the disk this often. */
const PROBE_INTERVAL_MS = 1000;
/** The quarantine may hold at most this share of max_bytes; the oldest entries go first beyond it. */
const QUARANTINE_SHARE = 1 / 8;

export interface JournalRecord {
  readonly id: string;
  readonly seq: number;
  readonly meta: UplinkMessageMeta;
  readonly size: number;
  readonly sha256: string;
  readonly createdAt: number;
}

/**
 * Reads one record's payload into the caller's buffers (Journal.openPayload keeps a blob file open from
 * the first read to close()). read() rejects like readPayload: ECONN_NOT_FOUND once the record left the
 * queue, ECONN_JOURNAL_CORRUPT when its bytes are not all there, ECONN_JOURNAL_IO on a read error.
 */
export interface PayloadReader {
  /** Payload bytes [start, start + length) into target[targetOffset …]. */
  read(target: Buffer, targetOffset: number, start: number, length: number): Promise<void>;
  /** Release the file; waits for reads in flight; idempotent. Reads after it reject ECONN_CLOSED. */
  close(): Promise<void>;
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
  /** Bytes of recent records held in memory for the uplink. */
  cacheBytes: number;
  /** False after a write or fsync error until a probe write succeeds. */
  writable: boolean;
}

export interface JournalOptions {
  /** The journal directory (<state_dir>/journal). */
  dir: string;
  config: JournalConfig;
  logger: Logger;
  /** prom-client registry for connector_journal_* metrics (none = metrics kept but not exported). */
  metrics?: Registry;
  /** Wall clock (ms since the epoch). When given without `monotonic` it is the only clock (tests). */
  now?: () => number;
  /** Monotonic clock (ms) TTL and ages follow (default performance.now). */
  monotonic?: () => number;
  /** How long close() waits for writes in flight (default 5000 ms). */
  closeTimeoutMs?: number;
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

function ioError(what: string, err: unknown): StorageError {
  return new StorageError('ECONN_JOURNAL_IO', `journal ${what} failed (${(err as NodeJS.ErrnoException).code ?? (err as Error).message}); check free disk space and the disk's health`, { cause: err });
}

async function io<T>(what: string, p: Promise<T>): Promise<T> {
  try {
    return await p;
  } catch (err) {
    throw errorCode(err) && !(err as NodeJS.ErrnoException).syscall ? err : ioError(what, err);
  }
}

/** A record decoded from disk bytes. */
interface DiskRecord {
  rec: JournalRecord;
  payload: Buffer | undefined;
}

export class Journal extends EventEmitter implements UplinkSink, PendingRecords, Component {
  readonly name = 'journal';
  readonly dir: string;
  private cfg: JournalConfig;
  private readonly log: Logger;
  private readonly wall: () => number;
  private readonly clock: JournalClock;
  private readonly closeTimeoutMs: number;

  private started = false;
  private startPromise: Promise<void> | undefined;
  private closed = false;
  private closePromise: Promise<void> | undefined;
  private broken: { err: Error; since: number; stage: string } | undefined;
  private probeTimer: NodeJS.Timeout | undefined;
  private rollNext = false;

  private instanceId = '';
  private boot = 0;
  private idPrefix = '';
  private nextSeq = 0;

  private segs: Segment[] = [];
  private active: Segment | undefined;
  private readonly cache: RecentCache<JournalRecord>;
  private readonly writer: GroupWriter;

  // accounting (bytes)
  private segCharged = 0;
  private liveBlobBytes = 0;
  private reservedBytes = 0;
  private pendingCount = 0;
  private pendingBytes = 0;
  private blobDiskBytes = 0;
  private stagingBytes = 0;
  private quarantineBytes = 0;
  private quarantineFiles: Array<{ base: string; bytes: number }> = [];
  private readonly droppedBy = { overflow: 0, ttl: 0, corrupt: 0 };
  private quarantinedCount = 0;
  private readonly uploads = new Map<string, number>();
  /** Uploads streamed while they arrive (journal/upload.ts): a per-boot counter for their ids, and id → seq once committed. */
  private streamCounter = 0;
  private readonly streamSeqs = new Map<string, number>();

  // acks
  private readonly ackLog: AckLog;
  private ackOpen = false;
  private doneSince: number[] = [];
  private floorWritten = 0;
  private ackDeferred: Deferred = deferred();
  private ackTimer: NodeJS.Timeout | undefined;
  private ackFlushing: Promise<void> | undefined;
  private ackDirty = false;
  private blobsToDelete: Array<{ name: string; size: number }> = [];

  private sweepTimer: NodeJS.Timeout | undefined;
  private readonly m: JournalMetrics;
  /** Work started without a caller waiting for it (quarantine copies); close() waits for it. */
  private readonly bg = new Set<Promise<void>>();

  private background(p: Promise<void>): void {
    this.bg.add(p);
    void p.finally(() => this.bg.delete(p));
  }

  constructor(opts: JournalOptions) {
    super();
    this.dir = opts.dir;
    this.cfg = opts.config;
    this.log = opts.logger.child({ component: 'journal' });
    this.wall = opts.now ?? Date.now;
    const clocks: Clocks = { wall: this.wall, monotonic: opts.monotonic ?? (opts.now ? opts.now : () => performance.now()) };
    this.clock = new JournalClock(clocks);
    this.closeTimeoutMs = opts.closeTimeoutMs ?? 5000;
    this.cache = new RecentCache<JournalRecord>(this.cfg.memory_cache_bytes);
    this.ackLog = new AckLog(this.dir);
    this.m = createJournalMetrics(opts.metrics, {
      pendingMessages: () => this.pendingCount,
      pendingBytes: () => this.pendingBytes,
      oldestAgeMs: () => this.oldestAgeMs(),
      diskBytes: () => this.diskBytes(),
      writable: () => !this.broken,
      cacheBytes: () => this.cache.usedBytes,
    });
    const host: WriterHost = {
      policy: () => this.cfg.fsync,
      delayMs: () => this.cfg.fsync_max_delay_ms,
      segmentBytes: () => this.segmentBytes(),
      segmentFor: (firstSeq, bytes) => this.segmentFor(firstSeq, bytes),
      committed: (seg, base, batch) => this.committed(seg, base, batch),
      failed: (batch, err, stage) => this.writeFailed(batch, err, stage),
      fsynced: (bytes) => {
        this.m.fsyncs.inc({ kind: 'segment' });
        this.m.writes.inc({ kind: 'segment' }, bytes);
      },
    };
    this.writer = new GroupWriter(host);
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
    if (this.probeTimer) clearInterval(this.probeTimer);
    this.probeTimer = undefined;
    if (this.startPromise) await this.startPromise.catch(() => {});
    let timer: NodeJS.Timeout | undefined;
    const bounded = new Promise<void>((resolve) => {
      timer = setTimeout(() => {
        this.log.warn({ code: 'ECONN_SHUTDOWN_TIMEOUT', queued: this.writer.length }, 'journal close timed out waiting for writes in flight');
        resolve();
      }, this.closeTimeoutMs);
    });
    try {
      await Promise.race([this.drainAndFinish(), bounded]);
    } finally {
      clearTimeout(timer);
    }
    this.writer.rejectAll(new StorageError('ECONN_CLOSED', 'journal closed before the message was written'));
    await Promise.race([Promise.allSettled([...this.bg]), bounded]);
    await this.ackLog.close();
    for (const seg of this.segs) seg.closeFds();
  }

  private async drainAndFinish(): Promise<void> {
    await this.writer.drain();
    const seg = this.active;
    if (seg?.wfd !== undefined && !this.broken) {
      try {
        if (this.cfg.fsync === 'never') fs.fdatasyncSync(seg.wfd); // make what was written durable now
      } catch (err) {
        this.log.error({ err, code: 'ECONN_JOURNAL_IO' }, 'final journal fsync failed');
      }
      this.seal(seg); // its index makes the next start fast
      this.active = undefined;
    }
    if (this.started && this.ackOpen) {
      if (this.ackTimer) clearTimeout(this.ackTimer);
      this.ackTimer = undefined;
      await this.flushAcks().catch(() => {});
    }
    this.ackOpen = false;
  }

  async reload(next: Config): Promise<string[]> {
    const n = next.bridge.journal;
    const changes: string[] = [];
    for (const k of Object.keys(n) as Array<keyof JournalConfig>) {
      if (n[k] !== this.cfg[k]) changes.push(`bridge.journal.${k}: ${String(this.cfg[k])} -> ${String(n[k])}`);
    }
    const ttlChanged = n.ttl_s !== this.cfg.ttl_s;
    this.cfg = n;
    this.cache.setBudget(n.memory_cache_bytes);
    if (ttlChanged && this.started && !this.closed) this.restartSweep();
    return changes;
  }

  status(): Record<string, unknown> {
    return { ...this.stats(), fsync: this.cfg.fsync, overflow: this.cfg.overflow, maxBytes: this.cfg.max_bytes, ...(this.broken ? { brokenSince: new Date(this.broken.since).toISOString(), brokenReason: this.broken.err.message } : {}) };
  }

  // ───────────────────────────── replay ─────────────────────────────

  private async replay(): Promise<void> {
    const t0 = performance.now();
    try {
      for (const d of [this.dir, this.blobDir, this.quarantineDir, this.tmpDir]) await fsp.mkdir(d, { recursive: true, mode: 0o700 });
      for (const f of await fsp.readdir(this.tmpDir)) await fsp.rm(path.join(this.tmpDir, f), { force: true, recursive: true });
      for (const f of await fsp.readdir(this.dir)) if (f.endsWith('.tmp')) await fsp.rm(path.join(this.dir, f), { force: true });
    } catch (err) {
      throw ioError(`directory set-up in ${this.dir}`, err);
    }
    await this.loadIdentity();
    const done = await this.loadAckState();

    const ctx: ReplayContext = {
      dir: this.dir,
      quarantineDir: this.quarantineDir,
      log: this.log,
      onCut: (segment, offset, bytes, reason, tail) => {
        this.m.corrupt.inc();
        this.m.corruptBytes.inc(bytes);
        this.log.error(
          { code: 'ECONN_JOURNAL_CORRUPT', segment, offset, droppedBytes: bytes, reason, tail },
          tail
            ? 'journal segment has a corrupt or torn tail; truncated at the last good record (the cut bytes are kept in journal/quarantine)'
            : 'journal segment has a corrupt record; skipped up to the next valid record (the cut bytes are kept in journal/quarantine)',
        );
      },
      onQuarantineBytes: () => {},
      onIndexWritten: (bytes) => this.m.writes.inc({ kind: 'index' }, bytes),
    };
    const names = (await fsp.readdir(this.dir))
      .filter((n) => parseSegmentName(n) !== null)
      .sort();
    let lastSeq = -1;
    let newest = 0;
    let scanned = 0;
    const brokenBlobs: Array<[Segment, number]> = [];
    try {
      for (const name of names) {
        const r = loadSegment(ctx, name, parseSegmentName(name)!, lastSeq);
        if (r.scanned) scanned++;
        newest = Math.max(newest, r.newestCreatedAt);
        if (!r.seg) continue;
        lastSeq = r.lastSeq;
        const seg = r.seg;
        this.segs.push(seg);
        if (!seg.blobs && seg.count > 0 && seg.liveCount === 0 && done.noneIn(seg.seqs[0]!, seg.seqs[seg.count - 1]!)) {
          // the common case of a backlog: nothing of the segment acknowledged yet, no blob to
          // check; all live at once instead of one setLive per record (1 M records)
          seg.live.fill(1, 0, seg.count);
          seg.liveCount = seg.count;
          seg.head = 0;
          this.pendingCount += seg.count;
          this.pendingBytes += seg.indexedBytes;
          this.recharge(seg);
          seg.advanceHead();
          continue;
        }
        for (let i = 0; i < seg.count; i++) {
          if (done.has(seg.seqs[i]!)) continue;
          this.setLive(seg, i);
          const b = seg.blobOf(i);
          if (b) {
            let st: fs.Stats | undefined;
            try {
              st = fs.statSync(path.join(this.blobDir, b.name));
            } catch {
              st = undefined;
            }
            if (!st || st.size !== b.size) brokenBlobs.push([seg, i]);
          }
        }
        seg.advanceHead();
        this.recharge(seg);
      }
    } catch (err) {
      if (errorCode(err)) throw err;
      throw ioError('replay', err);
    }
    this.nextSeq = Math.max(lastSeq + 1, done.maxSeen + 1, done.floor);
    this.clock.anchor(newest);
    for (const [seg, i] of brokenBlobs) {
      this.log.error({ code: 'ECONN_JOURNAL_CORRUPT', id: seg.idOf(i), blob: seg.blobOf(i)!.name }, 'the blob of a pending journal record is missing or has the wrong size; the record is dropped');
      this.drop(seg, i, 'corrupt');
    }
    for (const seg of this.segs) seg.advanceHead();

    try {
      await this.ackLog.open(this.ackLoad!, () => this.checkpoint(), this.cfg.fsync !== 'never');
      this.ackOpen = true;
      this.floorWritten = done.floor;
      await fsp.rm(path.join(this.dir, 'ack.json'), { force: true });
      if (this.doneSince.length) await this.flushAcks();
    } catch (err) {
      throw ioError('set-up of ack.log', err);
    }
    this.ackLoad = undefined;
    // segments with nothing pending go (their acks are durable now)
    for (const seg of [...this.segs]) if (seg.liveCount === 0) this.deleteSegment(seg);
    const referenced = new Set<string>();
    for (const seg of this.segs) {
      if (!seg.blobs) continue;
      for (const [seq, b] of seg.blobs) {
        const slot = seg.slotOf(seq);
        if (slot >= 0 && seg.live[slot]) {
          referenced.add(b.name);
          this.blobDiskBytes += b.size;
          const streamId = streamIdOfBlob(b.name);
          if (streamId !== undefined) this.noteStreamId(seg, seq, streamId);
        }
      }
    }
    let orphans = 0;
    for (const f of await fsp.readdir(this.blobDir)) {
      if (referenced.has(f)) continue;
      await fsp.rm(path.join(this.blobDir, f), { force: true });
      orphans++;
    }
    await this.loadQuarantine();
    this.log.info(
      { pending: this.pendingCount, pendingBytes: this.pendingBytes, segments: this.segs.length, scanned, orphanBlobs: orphans, boot: this.boot, ms: Math.round(performance.now() - t0) },
      'journal replayed',
    );
  }

  private ackLoad: Awaited<ReturnType<AckLog['load']>> | undefined;

  private async loadIdentity(): Promise<void> {
    const file = path.join(this.dir, 'journal.json');
    let ident: { version: 2; instanceId: string; createdAt: number; boots: number; nonce: string } | undefined;
    try {
      const v = JSON.parse(await fsp.readFile(file, 'utf8')) as Partial<{ version: number; instanceId: string; createdAt: number; boots: number }>;
      if ((v.version === 1 || v.version === 2) && typeof v.instanceId === 'string' && /^[0-9a-f]{12,32}$/.test(v.instanceId) && Number.isSafeInteger(v.boots) && typeof v.createdAt === 'number') {
        ident = { version: 2, instanceId: v.instanceId, createdAt: v.createdAt, boots: v.boots!, nonce: '' };
      } else {
        this.log.error({ code: 'ECONN_JOURNAL_CORRUPT', file }, 'journal.json is malformed; a new instance id is used (existing records keep their ids)');
      }
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') {
        if (err instanceof SyntaxError) this.log.error({ code: 'ECONN_JOURNAL_CORRUPT', file }, 'journal.json is not JSON; a new instance id is used (existing records keep their ids)');
        else throw ioError('read of journal.json', err);
      }
    }
    ident ??= { version: 2, instanceId: randomBytes(6).toString('hex'), createdAt: this.wall(), boots: 0, nonce: '' };
    ident.boots += 1;
    // a fresh nonce every start, durable before the first append (issue 9 #1)
    ident.nonce = randomBytes(8).toString('hex');
    try {
      await writeAtomic(file, JSON.stringify(ident) + '\n');
    } catch (err) {
      throw ioError('write of journal.json', err);
    }
    this.instanceId = ident.instanceId;
    this.boot = ident.boots;
    this.idPrefix = `${ident.instanceId}-${ident.nonce}-`;
  }

  private async loadAckState(): Promise<DoneSet> {
    let loaded;
    try {
      loaded = await this.ackLog.load();
    } catch (err) {
      throw ioError('read of ack.log', err);
    }
    this.ackLoad = loaded;
    if (loaded.state) return new DoneSet(loaded.state.floor, loaded.state.ranges);
    if (loaded.corrupt) {
      this.log.error({ code: 'ECONN_JOURNAL_CORRUPT', file: this.ackLog.file }, 'ack.log is unreadable; every record on disk is treated as unacknowledged (the cloud drops the duplicates)');
      return new DoneSet(0, []);
    }
    // an older version's ack.json (migrated into ack.log, then removed)
    const legacy = path.join(this.dir, 'ack.json');
    let text: string;
    try {
      text = await fsp.readFile(legacy, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return new DoneSet(0, []);
      throw ioError('read of ack.json', err);
    }
    const s = decodeAckState(text);
    if (s) return new DoneSet(Math.min(s.floor, s.next), s.done);
    this.log.error({ code: 'ECONN_JOURNAL_CORRUPT', file: legacy }, 'ack.json is malformed; every record on disk is treated as unacknowledged (the cloud drops the duplicates)');
    return new DoneSet(0, []);
  }

  private async loadQuarantine(): Promise<void> {
    const files = new Map<string, { bytes: number; mtime: number }>();
    for (const f of await fsp.readdir(this.quarantineDir).catch(() => [] as string[])) {
      const st = await fsp.stat(path.join(this.quarantineDir, f)).catch(() => undefined);
      if (!st?.isFile()) continue;
      const base = f.replace(/\.(json|bin)$/, '');
      const e = files.get(base) ?? { bytes: 0, mtime: 0 };
      e.bytes += st.size;
      e.mtime = Math.max(e.mtime, st.mtimeMs);
      files.set(base, e);
    }
    this.quarantineFiles = [...files].sort((a, b) => a[1].mtime - b[1].mtime).map(([base, e]) => ({ base, bytes: e.bytes }));
    this.quarantineBytes = this.quarantineFiles.reduce((a, q) => a + q.bytes, 0);
  }

  // ───────────────────────────── producer API (UplinkSink) ─────────────────────────────

  append(meta: UplinkMessageMeta, payload: Buffer): Promise<AppendResult> {
    const t0 = performance.now();
    try {
      this.checkWritable();
      if (payload.length > this.cfg.max_message_bytes) throw this.tooLarge(payload.length, this.cfg.max_message_bytes, 'bridge.journal.max_message_bytes');
      this.validate(meta);
      // a large MQTT publish (already whole in memory) goes to a blob like an upload, but is not an HTTP upload:
      // it does not count against max_uploads_per_device (a device pipelining QoS 1 frames is bounded by the
      // broker's in-flight budget instead, and a 429 has no MQTT equivalent but closing the connection)
      if (payload.length > INLINE_MAX) return this.receiveStream(meta, [payload], { maxBytes: this.cfg.max_message_bytes }, t0);
      const sha = sha256(payload);
      return this.enqueue(meta, payload, sha, undefined, 0, t0);
    } catch (err) {
      return Promise.reject(err as Error);
    }
  }

  async appendStream(meta: UplinkMessageMeta, body: AsyncIterable<Buffer | Uint8Array>, opts: { maxBytes: number; expectedSha256?: Buffer; declaredBytes?: number }): Promise<AppendResult> {
    const t0 = performance.now();
    this.checkWritable();
    this.validate(meta);
    const dev = meta.deviceId;
    const running = this.uploads.get(dev) ?? 0;
    const maxUploads = this.cfg.max_uploads_per_device;
    if (running >= maxUploads) {
      throw new RequestError(429, 'ECONN_TOO_MANY_UPLOADS', `device ${dev} already has ${running} uploads in progress (bridge.journal.max_uploads_per_device = ${maxUploads}); retry when one has finished`);
    }
    this.uploads.set(dev, running + 1);
    try {
      return await this.receiveStream(meta, body, opts, t0);
    } finally {
      const n = (this.uploads.get(dev) ?? 1) - 1;
      if (n > 0) this.uploads.set(dev, n);
      else this.uploads.delete(dev);
    }
  }

  /**
   * Receive a body: in memory up to STREAM_INLINE_MAX, else in a staging file. Nothing of the
   * byte cap is reserved while the body arrives (issue 9 #5): a failing upload cannot make
   * drop-oldest drop acknowledged messages, and a slow one does not hold the cap under
   * reject. Room is made, by policy, only when the complete, verified body is committed.
   */
  private async receiveStream(
    meta: UplinkMessageMeta,
    body: AsyncIterable<Buffer | Uint8Array> | Iterable<Buffer>,
    opts: { maxBytes: number; expectedSha256?: Buffer; declaredBytes?: number },
    t0: number,
  ): Promise<AppendResult> {
    const limit = Math.min(opts.maxBytes, this.cfg.max_message_bytes, this.cfg.max_bytes);
    const limitKey = opts.maxBytes < Math.min(this.cfg.max_message_bytes, this.cfg.max_bytes) ? 'the upload limit' : this.cfg.max_bytes < this.cfg.max_message_bytes ? 'bridge.journal.max_bytes' : 'bridge.journal.max_message_bytes';
    if (this.cfg.overflow === 'reject' && this.used() >= this.cfg.max_bytes) throw this.fullError();
    const declared = opts.declaredBytes;
    if (declared !== undefined && declared > limit) throw this.tooLarge(declared, limit, limitKey);
    // a body of known length beyond what is kept in memory is handed to the uplink while it arrives (journal/upload.ts)
    const streamed = declared !== undefined && declared > STREAM_INLINE_MAX && this.listenerCount('upload') > 0;
    let upload: IncomingUpload | undefined;
    const hash = createHash('sha256');
    let mem: Buffer[] = [];
    let memLen = 0;
    let total = 0;
    let staged = 0;
    let counted = 0;
    let staging: { fh: FileHandle; path: string } | undefined;
    let blobPath: string | undefined;
    let reserved = 0;
    // staged bytes are written in runs of STAGE_WRITE_BYTES (one writev of the received buffers, no copy),
    // one run on its way to the disk while the next is received: the body is not held up by each write
    let run: Buffer[] = [];
    let runLen = 0;
    let writing: Promise<void> | undefined;
    let syncing: Promise<void> | undefined;
    let syncedUpTo = 0;
    let syncFailed: unknown;
    const writeRun = async (): Promise<void> => {
      const st = staging as { fh: FileHandle };
      const bufs = run;
      const at = staged;
      staged += runLen;
      run = [];
      runLen = 0;
      if (writing) await writing;
      writing = io('write of a staging file', writevAt(st.fh, bufs, at));
      writing.catch(() => undefined); // seen by the next await of it; never an unhandled rejection meanwhile
      // the received buffers of the run are garbage once written: reclaimed every few MiB (core/reclaim.ts)
      const n = staged - at;
      writing.then(() => reclaimBody(n), () => undefined);
      if (upload) {
        const u = upload;
        const end = staged;
        writing.then(() => u.progress(end), () => undefined);
      }
      // every STAGE_SYNC_BYTES an fdatasync of what is written so far, while the body goes on arriving: the
      // final one, which the 202 waits for, then has only the tail to write back (one sync at a time)
      if (this.cfg.fsync !== 'never' && staged - syncedUpTo >= STAGE_SYNC_BYTES && !syncing) {
        const w = writing;
        syncedUpTo = staged;
        syncing = (async () => {
          await w;
          await io('fsync of a staging file', st.fh.datasync());
          this.m.fsyncs.inc({ kind: 'blob' });
        })().finally(() => {
          syncing = undefined;
        });
        syncing.catch((err: unknown) => {
          syncFailed ??= err; // a failed fdatasync may have dropped dirty pages: the upload fails, even if a later sync passes
        });
      }
    };
    try {
      for await (const c of body) {
        const b = Buffer.isBuffer(c) ? c : Buffer.from(c.buffer, c.byteOffset, c.byteLength);
        if (b.length === 0) continue;
        if (total + b.length > limit) throw this.tooLarge(total + b.length, limit, limitKey);
        this.checkWritable();
        total += b.length;
        hash.update(b);
        if (!staging && !streamed && memLen + b.length <= STREAM_INLINE_MAX) {
          mem.push(Buffer.from(b));
          memLen += b.length;
          continue;
        }
        if (!staging) {
          const p = path.join(this.tmpDir, `${randomBytes(8).toString('hex')}.part`);
          staging = { fh: await io('create of a staging file', fsp.open(p, 'wx', 0o600)), path: p };
          if (streamed) {
            // its id now (the record gets it at commit, through the blob's name): the uplink sends under it from the start
            const id = `${this.idPrefix}u${++this.streamCounter}`;
            const rfh = await io('open of a staging file', fsp.open(p, 'r'));
            upload = new IncomingUpload(id, meta, declared, rfh);
            this.emit('upload', upload);
          }
          run = mem;
          runLen = memLen;
          counted += memLen;
          this.stagingBytes += memLen;
          mem = [];
          memLen = 0;
        }
        run.push(b);
        runLen += b.length;
        // counted as staged (disk) from the moment it is taken, not only once its run is written
        counted += b.length;
        this.stagingBytes += b.length;
        if (runLen >= STAGE_WRITE_BYTES || run.length >= STAGE_WRITE_BUFFERS) {
          await writeRun();
          // streamed upstream while it arrives: no further ahead of the link than the uplink allows
          if (upload?.streaming) await upload.linkCaughtUp(staged);
        }
      }
      if (staging && runLen > 0) await writeRun();
      if (writing) await writing;
      writing = undefined;
      if (syncing) await syncing.catch(() => undefined);
      if (syncFailed !== undefined) throw syncFailed;
      if (declared !== undefined && total !== declared) {
        throw new RequestError(400, 'ECONN_BAD_REQUEST', `the body has ${total} bytes, ${declared} were declared (Content-Length); nothing was kept`);
      }
      const digest = hash.digest();
      if (opts.expectedSha256 && (opts.expectedSha256.length !== digest.length || !timingSafeEqual(opts.expectedSha256, digest))) {
        throw new RequestError(400, 'ECONN_DIGEST_MISMATCH', `payload SHA-256 ${digest.toString('hex')} does not match the expected digest ${opts.expectedSha256.toString('hex')}; nothing was kept`);
      }
      if (!staging) return await this.enqueue(meta, Buffer.concat(mem, memLen), digest, undefined, 0, t0);
      this.checkWritable();
      if (this.cfg.fsync !== 'never') {
        await io('fsync of a staged payload', staging.fh.datasync());
        this.m.fsyncs.inc({ kind: 'blob' });
      }
      this.m.writes.inc({ kind: 'blob' }, total);
      await io('close of a staged payload', staging.fh.close());
      // commit: room for the whole blob now, by policy (synchronous with the reservation)
      this.makeRoom(total);
      this.reservedBytes += total;
      reserved = total;
      const blob = upload ? `${STREAM_BLOB_PREFIX}${upload.id}.bin` : `${randomBytes(12).toString('hex')}.bin`;
      await io('rename of a staged payload', fsp.rename(staging.path, path.join(this.blobDir, blob)));
      blobPath = path.join(this.blobDir, blob);
      staging = undefined;
      this.stagingBytes -= counted;
      counted = 0;
      staged = 0;
      this.blobDiskBytes += total;
      if (this.cfg.fsync !== 'never') {
        await io('fsync of the blob directory', syncDir(this.blobDir));
        this.m.fsyncs.inc({ kind: 'dir' });
      }
      const pending = this.enqueue(meta, Buffer.alloc(0), digest, { name: blob, size: total }, total, t0);
      reserved = 0; // owned by the queued record now
      const result = await pending;
      blobPath = undefined;
      upload?.end('committed');
      return result;
    } catch (err) {
      upload?.end('aborted');
      this.reservedBytes -= reserved;
      if (writing) await writing.catch(() => {});
      if (syncing) await syncing.catch(() => {});
      if (staging) {
        await staging.fh.close().catch(() => {});
        await fsp.rm(staging.path, { force: true }).catch(() => {});
        this.stagingBytes -= counted;
      }
      if (blobPath) {
        await fsp.rm(blobPath, { force: true }).catch(() => {});
        this.blobDiskBytes -= total;
      }
      throw err;
    }
  }

  /**
   * Refuse at append time what the uplink could never encode (issue 9 #2): the record's
   * metadata as the wire carries it must pass the protocol's own validation and limits
   * (protocol/codec.ts LIMITS: device id ≤ 256 B, topic ≤ 4096 B, content type ≤ 255 B,
   * metadata JSON ≤ 8192 B).
   */
  private validate(meta: UplinkMessageMeta): void {
    const wire: Record<string, unknown> = { device_id: meta.deviceId, topic: meta.topic, qos: meta.qos, received_at: Math.floor(meta.receivedAt) };
    if (meta.contentType !== undefined) wire.content_type = meta.contentType;
    try {
      parseWireMeta(wire);
      const raw = Buffer.byteLength(meta.topic) + Buffer.byteLength(meta.deviceId) + (meta.contentType ? Buffer.byteLength(meta.contentType) : 0);
      // JSON escaping can grow a string up to 6×: only then is the exact length worth computing
      if (raw * 6 + 128 > LIMITS.maxMetadataBytes) {
        const n = Buffer.byteLength(JSON.stringify(wire));
        if (n > LIMITS.maxMetadataBytes) throw new Error(`metadata of ${n} bytes exceeds the protocol limit of ${LIMITS.maxMetadataBytes}`);
      }
      if (meta.packetId !== undefined && (!Number.isInteger(meta.packetId) || meta.packetId < 0 || meta.packetId > 0xffff)) throw new Error('packet id out of range');
    } catch (err) {
      throw new RequestError(400, 'ECONN_BAD_REQUEST', `message refused: ${(err as Error).message} (the uplink protocol allows a device id of ${LIMITS.maxDeviceIdBytes} bytes, a topic of ${LIMITS.maxTopicBytes}, a content type of ${LIMITS.maxContentTypeBytes}); nothing was kept`);
    }
  }

  private checkWritable(): void {
    if (this.closed) throw new StorageError('ECONN_CLOSED', 'journal is closed');
    if (!this.started) throw new StorageError('ECONN_CLOSED', 'journal is not started');
    if (this.broken) throw this.brokenError();
  }

  private tooLarge(size: number, limit: number, key: string): RequestError {
    return new RequestError(413, 'ECONN_PAYLOAD_TOO_LARGE', `message of ${size} bytes or more exceeds ${key} (${limit} bytes); send less or raise the limit; nothing was kept`);
  }

  private fullError(): RequestError {
    return new RequestError(503, 'ECONN_JOURNAL_FULL', `journal is full (${this.used()} of ${this.cfg.max_bytes} bytes, bridge.journal.max_bytes) and the overflow policy is reject; the message was not accepted`);
  }

  /**
   * Make room for `bytes` more under the byte cap: reject (ECONN_JOURNAL_FULL) or drop the
   * oldest pending records, by policy. Synchronous, so callers reserve right after.
   */
  private makeRoom(bytes: number): void {
    const cap = this.cfg.max_bytes;
    if (bytes > cap) throw this.tooLarge(bytes, cap, 'bridge.journal.max_bytes');
    if (this.used() + bytes <= cap) return;
    if (this.cfg.overflow === 'reject') throw this.fullError();
    let n = 0;
    let first: string | undefined;
    let last: string | undefined;
    // bounded: each pass drops one pending record
    while (this.used() + bytes > cap) {
      const o = this.oldest();
      if (!o) break;
      const id = o.seg.idOf(o.slot);
      first ??= id;
      last = id;
      this.drop(o.seg, o.slot, 'overflow');
      n++;
    }
    if (n) {
      this.log.warn({ dropped: n, firstId: first, lastId: last, reason: 'overflow', maxBytes: cap }, 'journal full: dropped the oldest unacknowledged messages (overflow policy drop-oldest)');
      this.scheduleAckFlush();
    }
    if (this.used() + bytes > cap) {
      throw new RequestError(503, 'ECONN_JOURNAL_FULL', `journal is full (${this.used()} of ${cap} bytes) with messages still being written; the message was not accepted`);
    }
  }

  private used(): number {
    return this.segCharged + this.liveBlobBytes + this.reservedBytes + this.quarantineBytes;
  }

  /** Assign the next seq and queue the record. Synchronous up to the returned promise (seq order = queue order = file order). */
  private enqueue(meta: UplinkMessageMeta, payload: Buffer, sha: Buffer, blob: { name: string; size: number } | undefined, blobBytes: number, t0: number): Promise<AppendResult> {
    try {
      this.checkWritable();
      const metaBuf = encodeMeta(meta, blob?.name);
      const bytes = recordBytes(metaBuf.length, blob ? 0 : payload.length);
      this.makeRoom(bytes);
      const seq = this.nextSeq++;
      this.reservedBytes += bytes;
      return new Promise<AppendResult>((resolve, reject) => {
        this.writer.push({
          seq,
          createdAt: Math.floor(this.clock.now()),
          size: blob ? blob.size : payload.length,
          sha,
          shaHex: sha.toString('hex'),
          m: meta,
          metaBuf,
          payload,
          blob,
          bytes,
          blobBytes,
          t0,
          resolve,
          reject,
        });
      });
    } catch (err) {
      return Promise.reject(err as Error);
    }
  }

  // ───────────────────────────── writer host ─────────────────────────────

  /** Effective segment size: at most a quarter of the byte cap, so the unaccounted acked part stays small. */
  private segmentBytes(): number {
    return Math.max(64 * 1024, Math.min(this.cfg.segment_bytes, Math.floor(this.cfg.max_bytes / 4)));
  }

  private segmentFor(firstSeq: number, bytes: number): Segment {
    const cur = this.active;
    if (cur && !this.rollNext && (cur.count === 0 || cur.size + bytes <= this.segmentBytes())) return cur;
    if (cur) {
      this.seal(cur);
      this.active = undefined;
    }
    this.rollNext = false;
    const name = segmentName(firstSeq);
    const file = path.join(this.dir, name);
    let fd: number | undefined;
    try {
      fd = fs.openSync(file, 'wx', 0o600);
      pwriteAllSync(fd, encodeSegmentHeader(firstSeq, this.idPrefix), 0);
      if (this.cfg.fsync !== 'never') {
        fs.fdatasyncSync(fd);
        syncDirSync(this.dir);
        this.m.fsyncs.inc({ kind: 'dir' });
      }
    } catch (err) {
      if (fd !== undefined) fs.closeSync(fd);
      fs.rmSync(file, { force: true });
      throw ioError(`creation of segment ${name}`, err);
    }
    const seg = new Segment({ firstSeq, name, path: file, version: 2, idPrefix: this.idPrefix, capacity: 1024 });
    seg.size = encodeSegmentHeader(firstSeq, this.idPrefix).length;
    seg.wfd = fd;
    this.segs.push(seg);
    this.active = seg;
    return seg;
  }

  /** The segment will not be written again: close its write descriptor, trim its index, write its .idx. */
  private seal(seg: Segment): void {
    if (seg.sealed) return;
    seg.sealed = true;
    if (seg.wfd !== undefined) fs.close(seg.wfd, () => {});
    seg.wfd = undefined;
    seg.trim();
    if (seg.count) writeIndex({ dir: this.dir, log: this.log, onIndexWritten: (b) => this.m.writes.inc({ kind: 'index' }, b) }, seg);
    if (seg.liveCount === 0) this.scheduleAckFlush();
  }

  private committed(seg: Segment, base: number, batch: QueuedRecord[]): void {
    let off = base;
    const recs: JournalRecord[] = [];
    const now = performance.now();
    for (const r of batch) {
      const slot = seg.push(r.seq, off, r.bytes, r.metaBuf.length, r.createdAt);
      off += r.bytes;
      if (r.blob) (seg.blobs ??= new Map()).set(r.seq, r.blob);
      const streamId = streamIdOfBlob(r.blob?.name);
      if (streamId !== undefined) this.noteStreamId(seg, r.seq, streamId);
      this.reservedBytes -= r.bytes + r.blobBytes;
      this.setLive(seg, slot);
      const rec: JournalRecord = { id: streamId ?? this.idPrefix + r.seq, seq: r.seq, meta: r.m, size: r.size, sha256: r.shaHex, createdAt: r.createdAt };
      this.cache.put(r.seq, rec, r.blob ? undefined : r.payload);
      recs.push(rec);
      this.m.appendSeconds.observe((now - r.t0) / 1000);
    }
    seg.size = off;
    // resolve after indexing all: a listener that acks from 'append' sees a consistent index
    for (let i = 0; i < batch.length; i++) {
      const rec = recs[i]!;
      batch[i]!.resolve({ id: rec.id, size: rec.size, sha256: rec.sha256 });
      this.emit('append', rec);
    }
  }

  /**
   * A write or fsync failed (disk full, I/O error — issue 9 #3): nothing of the batch is
   * acknowledged, everything queued is refused, and the journal refuses appends until a probe
   * shows the disk writable again. The next write goes to a fresh segment, after the failed
   * bytes are cut off the old one (they were never acknowledged).
   */
  private writeFailed(batch: QueuedRecord[], err: unknown, stage: 'write' | 'fsync'): void {
    const e = errorCode(err) && !(err as NodeJS.ErrnoException).syscall ? (err as Error) : ioError(stage === 'fsync' ? 'fsync' : 'write', err);
    this.m.writeErrors.inc();
    const first = !this.broken;
    this.broken ??= { err: e, since: this.wall(), stage };
    const refused = [...batch, ...this.writer.rejectAll(this.brokenError())];
    for (const r of batch) r.reject(e);
    for (const r of refused) this.reservedBytes -= r.bytes + r.blobBytes;
    this.rollNext = true;
    if (first) {
      this.log.error({ err: e, code: 'ECONN_JOURNAL_IO', stage, refused: refused.length }, 'journal write failed: new messages are refused (not acknowledged) until the disk accepts writes again; nothing acknowledged is lost');
      this.emit('unwritable', e);
    }
    this.startProbe();
  }

  private brokenError(): StorageError {
    const b = this.broken;
    return new StorageError('ECONN_JOURNAL_IO', `journal is not accepting messages since a ${b?.stage ?? 'write'} failed (${(b?.err.cause as NodeJS.ErrnoException | undefined)?.code ?? b?.err.message ?? 'unknown'}); it retries every ${PROBE_INTERVAL_MS / 1000} s and recovers by itself once the disk accepts writes (free some space)`);
  }

  private startProbe(): void {
    if (this.probeTimer || this.closed) return;
    this.probeTimer = setInterval(() => this.probe(), PROBE_INTERVAL_MS);
    this.probeTimer.unref();
  }

  /** Cut unacknowledged bytes off the active segment, then write + fsync + remove a 4 KiB probe file. */
  probe(): boolean {
    if (!this.broken) return true;
    const probeFile = path.join(this.dir, 'probe.tmp');
    try {
      const seg = this.active;
      if (seg?.wfd !== undefined) {
        fs.ftruncateSync(seg.wfd, seg.size);
        fs.fdatasyncSync(seg.wfd);
      }
      const fd = fs.openSync(probeFile, 'w', 0o600);
      try {
        pwriteAllSync(fd, Buffer.alloc(4096), 0);
        fs.fdatasyncSync(fd);
      } finally {
        fs.closeSync(fd);
        fs.rmSync(probeFile, { force: true });
      }
    } catch (err) {
      this.log.debug({ err }, 'journal probe write failed; still refusing messages');
      return false;
    }
    this.log.warn({ code: 'ECONN_JOURNAL_IO', since: new Date(this.broken.since).toISOString() }, 'journal writable again: accepting messages');
    this.broken = undefined;
    this.emit('writable');
    if (this.probeTimer) clearInterval(this.probeTimer);
    this.probeTimer = undefined;
    if (this.doneSince.length || this.ackDirty) this.scheduleAckFlush();
    return true;
  }

  // ───────────────────────────── index ─────────────────────────────

  private setLive(seg: Segment, slot: number): void {
    if (seg.live[slot]) return;
    seg.live[slot] = 1;
    seg.liveCount++;
    this.pendingCount++;
    const b = seg.blobOf(slot);
    this.pendingBytes += seg.lens[slot]! + (b ? b.size : 0);
    if (b) this.liveBlobBytes += b.size;
    this.recharge(seg);
    if (slot < seg.head) seg.head = slot;
  }

  /** A segment counts against the cap in full while it holds a live record. */
  private recharge(seg: Segment): void {
    const want = seg.liveCount > 0 ? seg.indexedBytes : 0;
    this.segCharged += want - seg.charged;
    seg.charged = want;
  }

  /** Take a live record out of the queue (ack, drop, quarantine). Files go after the ack log says so. */
  private markDone(seg: Segment, slot: number): void {
    if (!seg.live[slot]) return;
    seg.live[slot] = 0;
    const seq = seg.seqs[slot]!;
    this.cache.delete(seq);
    this.pendingCount--;
    const b = seg.blobOf(slot);
    this.pendingBytes -= seg.lens[slot]! + (b ? b.size : 0);
    seg.liveCount--;
    this.recharge(seg);
    if (b) {
      this.liveBlobBytes -= b.size;
      this.blobsToDelete.push(b);
      const streamId = streamIdOfBlob(b.name);
      if (streamId !== undefined) this.streamSeqs.delete(streamId);
    }
    this.doneSince.push(seq);
    seg.advanceHead();
  }

  private drop(seg: Segment, slot: number, reason: 'overflow' | 'ttl' | 'corrupt'): void {
    if (!seg.live[slot]) return;
    const id = seg.idOf(slot);
    const seq = seg.seqs[slot]!;
    this.markDone(seg, slot);
    this.droppedBy[reason]++;
    this.m.drops.inc({ reason });
    this.emit('removed', { id, seq, reason });
  }

  /** The oldest live record. */
  private oldest(): { seg: Segment; slot: number } | undefined {
    for (const seg of this.segs) {
      seg.advanceHead();
      if (seg.head < seg.count) return { seg, slot: seg.head };
    }
    return undefined;
  }

  /** The live slot of an id (`<prefix><seq>`): segment by seq, slot by seq, then the whole id must match. */
  private find(id: string): { seg: Segment; slot: number } | undefined {
    if (typeof id !== 'string') return undefined;
    const dash = id.lastIndexOf('-');
    const seq = this.streamSeqs.get(id) ?? (dash >= 0 ? Number(id.slice(dash + 1)) : NaN);
    if (!Number.isSafeInteger(seq)) return undefined;
    const seg = this.segmentOf(seq);
    if (!seg) return undefined;
    const slot = seg.slotOf(seq);
    if (slot < 0 || !seg.live[slot] || seg.idOf(slot) !== id) return undefined;
    return { seg, slot };
  }

  /** A streamed upload's record keeps the id it was sent under (not prefix + seq): found by it, named by it. */
  private noteStreamId(seg: Segment, seq: number, id: string): void {
    (seg.ids ??= new Map()).set(seq, id);
    this.streamSeqs.set(id, seq);
  }

  /** The segment that would hold `seq` (the last one whose first seq is ≤ seq). */
  private segmentOf(seq: number): Segment | undefined {
    let lo = 0;
    let hi = this.segs.length - 1;
    let best: Segment | undefined;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      const s = this.segs[mid]!;
      if (s.count && s.seqs[0]! <= seq) {
        best = s;
        lo = mid + 1;
      } else if (!s.count && s.firstSeq <= seq) {
        lo = mid + 1;
      } else hi = mid - 1;
    }
    return best;
  }

  // ───────────────────────────── consumer API ─────────────────────────────

  /** Unacknowledged records with seq > afterSeq, in append order (expired and corrupt ones are dropped instead). */
  pending(afterSeq = -1, limit = 1024): JournalRecord[] {
    const out: Array<JournalRecord | undefined> = [];
    const misses: Array<{ seg: Segment; slot: number; at: number }> = [];
    let expired = 0;
    const ttlMs = this.cfg.ttl_s > 0 ? this.cfg.ttl_s * 1000 : 0;
    const now = this.clock.now();
    let si = 0;
    const first = this.segmentOf(afterSeq);
    if (first) si = this.segs.indexOf(first);
    for (; si < this.segs.length && out.length < limit; si++) {
      const seg = this.segs[si]!;
      seg.advanceHead();
      for (let i = Math.max(seg.head, seg.slotAfter(afterSeq)); i < seg.count && out.length < limit; i++) {
        if (!seg.live[i]) continue;
        if (ttlMs && now - seg.created[i]! > ttlMs) {
          this.drop(seg, i, 'ttl');
          expired++;
          continue;
        }
        const c = this.cache.get(seg.seqs[i]!);
        if (c) out.push(c.rec);
        else {
          misses.push({ seg, slot: i, at: out.length });
          out.push(undefined);
        }
      }
    }
    if (misses.length) this.loadMisses(misses, out);
    if (expired) {
      this.log.warn({ dropped: expired, reason: 'ttl', ttlS: this.cfg.ttl_s }, 'dropped unacknowledged messages older than bridge.journal.ttl_s');
      this.scheduleAckFlush();
    }
    return out.filter((r): r is JournalRecord => r !== undefined);
  }

  /**
   * PendingRecords (the broker's redelivery seeding at start): pending QoS 1 records with a
   * packet id, newest first, within `maxAgeMs` of the newest pending record and among the
   * newest `maxRecords` pending ones. The age and count bounds are decided from the in-memory
   * index alone; only the records inside them are read, backwards in spans of READ_SPAN bytes,
   * and none of it is cached or kept: seeding a table of at most a few thousand entries must
   * not pull a million records through memory (issue 11: it read every pending record and
   * filled the read cache, ≈ 600 B of heap per queued message and 45 µs per record). A record
   * that fails its checks is skipped here; pending() drops it as corrupt when the uplink gets
   * to it.
   */
  recentPublishes(opts: { maxAgeMs: number; maxRecords: number; wanted?: (deviceId: string, packetId: number) => boolean }, visit: (p: JournaledPublish) => boolean): number {
    let examined = 0;
    let cutoff = -Infinity;
    let scratch: Buffer | undefined; // one read buffer for every span (nothing read is kept)
    // bounded: every segment once, every slot at most once, and at most maxRecords records
    for (let si = this.segs.length - 1; si >= 0 && examined < opts.maxRecords; si--) {
      const seg = this.segs[si]!;
      seg.advanceHead();
      let hi = seg.count - 1;
      while (hi >= seg.head && examined < opts.maxRecords) {
        // the next span: live slots from hi downwards, at most READ_SPAN bytes, inside the bounds
        const slots: number[] = [];
        let lo = hi;
        let stop = false;
        for (let i = hi; i >= seg.head && examined < opts.maxRecords; i--) {
          if (!seg.live[i]) {
            lo = i;
            continue;
          }
          if (cutoff === -Infinity) cutoff = seg.created[i]! - opts.maxAgeMs;
          if (seg.created[i]! < cutoff) {
            stop = true;
            break;
          }
          if (slots.length && seg.offsets[slots[0]!]! + seg.lens[slots[0]!]! - seg.offsets[i]! > READ_SPAN) break;
          slots.push(i);
          examined++;
          lo = i;
        }
        if (slots.length && !this.visitSpan(seg, slots, (scratch ??= Buffer.allocUnsafe(READ_SPAN)), opts.wanted, visit)) return examined;
        if (stop) return examined;
        hi = lo - 1;
      }
    }
    return examined;
  }

  /** Read the records of `slots` (descending, one segment, ≤ READ_SPAN apart) in one pread and visit those with a packet id. */
  private visitSpan(seg: Segment, slots: number[], scratch: Buffer, wanted: ((deviceId: string, packetId: number) => boolean) | undefined, visit: (p: JournaledPublish) => boolean): boolean {
    const last = slots[0]!;
    const start = seg.offsets[slots[slots.length - 1]!]!;
    const end = seg.offsets[last]! + seg.lens[last]!;
    let buf: Buffer;
    try {
      // a span is ≤ READ_SPAN unless it is one record larger than that (then read on its own)
      buf = end - start <= scratch.length ? preadExact(seg.readFd(), end - start, start, scratch) : preadExact(seg.readFd(), end - start, start);
    } catch (err) {
      this.log.warn({ err, segment: seg.name }, 'journal read failed while seeding the redelivery table; older records are not seeded');
      return false;
    }
    this.m.diskReads.inc(slots.length);
    for (const slot of slots) {
      const p = this.peekPublish(seg, slot, buf, seg.offsets[slot]! - start, wanted);
      if (p && !visit(p)) return false;
    }
    return true;
  }

  /** The packet-id part of a record at `off` of `buf`, checked (CRC, seq, length), without side effects; null otherwise. */
  private peekPublish(seg: Segment, slot: number, buf: Buffer, off: number, wanted: ((deviceId: string, packetId: number) => boolean) | undefined): JournaledPublish | null {
    const len = seg.lens[slot]!;
    const seq = seg.seqs[slot]!;
    if (buf.length - off < len) return null;
    if (wanted && seg.version === 2) {
      // most records are skipped on device and packet id alone, before the CRC and the full decode
      const q = peekDevicePid(buf, off + RECORD_HEADER_BYTES, Math.min(seg.metaLens[slot]!, len - RECORD_HEADER_BYTES));
      if (!q || !wanted(q.deviceId, q.packetId)) return null;
    }
    let meta: UplinkMessageMeta;
    let size: number;
    let sha256: string;
    if (seg.version === 2) {
      const h = decodeHeaderV2(buf, off);
      if (!h.ok || h.header.seq !== seq || RECORD_HEADER_BYTES + h.header.metaLen + h.header.payloadLen !== len || !recordCrcOk(buf, off, len)) return null;
      const mb = decodeMeta(buf.subarray(off + RECORD_HEADER_BYTES, off + RECORD_HEADER_BYTES + h.header.metaLen));
      if (!mb) return null;
      meta = mb.m;
      size = h.header.size;
      if (meta.qos !== 1 || meta.packetId === undefined) return null;
      sha256 = shaOfRecord(buf, off).toString('hex');
    } else {
      const hb = buf.subarray(off, off + V1_HEADER_BYTES);
      const h = decodeHeaderV1(hb);
      if (!h.ok) return null;
      const body = buf.subarray(off + V1_HEADER_BYTES, off + len);
      if ((v1crc(body, v1HeaderCrc(hb)) >>> 0) !== h.header.crc) return null;
      const mm = parseMetaV1(body.subarray(0, h.header.metaLen), h.header);
      if (!mm) return null;
      meta = mm.m;
      size = mm.size;
      sha256 = mm.sha256;
    }
    if (meta.qos !== 1 || meta.packetId === undefined) return null;
    if (wanted && seg.version !== 2 && !wanted(meta.deviceId, meta.packetId)) return null;
    return { id: seg.idOf(slot), deviceId: meta.deviceId, packetId: meta.packetId, topic: meta.topic, size, sha256 };
  }

  /** Read records not in memory in large contiguous spans (one pread each), check them, cache them. */
  private loadMisses(misses: Array<{ seg: Segment; slot: number; at: number }>, out: Array<JournalRecord | undefined>): void {
    let i = 0;
    while (i < misses.length) {
      const { seg } = misses[i]!;
      let j = i + 1;
      const start = seg.offsets[misses[i]!.slot]!;
      let end = start + seg.lens[misses[i]!.slot]!;
      while (j < misses.length && misses[j]!.seg === seg) {
        const s = misses[j]!.slot;
        const e = seg.offsets[s]! + seg.lens[s]!;
        if (e - start > READ_SPAN) break;
        end = e;
        j++;
      }
      let buf: Buffer | undefined;
      try {
        buf = preadExact(seg.readFd(), end - start, start);
      } catch (err) {
        this.log.error({ err, code: 'ECONN_JOURNAL_IO', segment: seg.name }, 'journal read failed; the records are offered again on the next read');
      }
      for (let k = i; k < j; k++) {
        const { slot, at } = misses[k]!;
        if (!buf) continue;
        const off = seg.offsets[slot]! - start;
        const d = this.decodeAt(seg, slot, buf, off);
        if (!d) continue;
        out[at] = d.rec;
      }
      this.m.diskReads.inc(j - i);
      i = j;
    }
  }

  /** Decode and check the record of `slot` found at `off` of `buf`; a bad one is dropped as corrupt (null). */
  private decodeAt(seg: Segment, slot: number, buf: Buffer, off: number): DiskRecord | null {
    const len = seg.lens[slot]!;
    const seq = seg.seqs[slot]!;
    let problem: string | undefined;
    let result: DiskRecord | undefined;
    if (buf.length - off < len) problem = 'segment shorter than its index says';
    else if (seg.version === 2) {
      const h = decodeHeaderV2(buf, off);
      if (!h.ok) problem = h.reason;
      else if (h.header.seq !== seq || RECORD_HEADER_BYTES + h.header.metaLen + h.header.payloadLen !== len) problem = 'record does not match the index';
      else if (!recordCrcOk(buf, off, len)) problem = 'checksum mismatch';
      else {
        const mb = decodeMeta(buf.subarray(off + RECORD_HEADER_BYTES, off + RECORD_HEADER_BYTES + h.header.metaLen));
        if (!mb) problem = 'malformed record meta';
        else {
          const payload = mb.blob ? undefined : Buffer.from(buf.subarray(off + RECORD_HEADER_BYTES + h.header.metaLen, off + len));
          const rec: JournalRecord = { id: seg.idOf(slot), seq, meta: mb.m, size: h.header.size, sha256: shaOfRecord(buf, off).toString('hex'), createdAt: seg.created[slot]! };
          result = { rec, payload };
        }
      }
    } else {
      const hb = buf.subarray(off, off + V1_HEADER_BYTES);
      const h = decodeHeaderV1(hb);
      if (!h.ok) problem = h.reason;
      else {
        const body = buf.subarray(off + V1_HEADER_BYTES, off + len);
        if ((v1crc(body, v1HeaderCrc(hb)) >>> 0) !== h.header.crc) problem = 'checksum mismatch';
        else {
          const mm = parseMetaV1(body.subarray(0, h.header.metaLen), h.header);
          if (!mm) problem = 'malformed record meta';
          else {
            const rec: JournalRecord = { id: seg.idOf(slot), seq, meta: mm.m, size: mm.size, sha256: mm.sha256, createdAt: seg.created[slot]! };
            result = { rec, payload: mm.blob ? undefined : Buffer.from(body.subarray(h.header.metaLen)) };
          }
        }
      }
    }
    if (problem || !result) {
      this.dropCorrupt(seg, slot, buf.subarray(off, Math.min(buf.length, off + len)), problem ?? 'unreadable');
      return null;
    }
    this.cache.put(seq, result.rec, result.payload);
    return result;
  }

  /** A record the reader refuses: dropped (counted, logged), its bytes kept in the quarantine — never retried. */
  private dropCorrupt(seg: Segment, slot: number, raw: Buffer, reason: string): void {
    const id = seg.idOf(slot);
    this.log.error({ code: 'ECONN_JOURNAL_CORRUPT', id, segment: seg.name, offset: seg.offsets[slot], reason }, 'a journal record cannot be read back; it is dropped (its bytes are kept in journal/quarantine)');
    this.m.corruptBytes.inc(seg.lens[slot]!);
    this.drop(seg, slot, 'corrupt');
    this.scheduleAckFlush();
    const base = `corrupt-${id}`;
    this.background(
      this.writeQuarantine(base, Buffer.from(raw), JSON.stringify({ id, segment: seg.name, offset: seg.offsets[slot], reason, at: new Date(this.wall()).toISOString() }) + '\n').catch((err: unknown) =>
        this.log.warn({ err, id }, 'could not keep the bytes of a corrupt journal record'),
      ),
    );
  }

  first(): JournalRecord | undefined {
    return this.pending(-1, 1)[0];
  }

  /** Whether a pending record has this id. */
  has(id: string): boolean {
    return this.find(id) !== undefined;
  }

  get(id: string): JournalRecord | undefined {
    const f = this.find(id);
    if (!f) return undefined;
    return this.recordOf(f.seg, f.slot);
  }

  private recordOf(seg: Segment, slot: number): JournalRecord | undefined {
    const c = this.cache.get(seg.seqs[slot]!);
    if (c) return c.rec;
    const out: Array<JournalRecord | undefined> = [undefined];
    this.loadMisses([{ seg, slot, at: 0 }], out);
    return out[0];
  }

  /**
   * The whole payload from the memory cache, synchronously: the uplink's path for a message it sends in
   * one chunk right after it was written. An entry leaves the cache when its record is acknowledged or
   * dropped, so a hit is a live record.
   */
  cachedPayload(rec: JournalRecord): Buffer | undefined {
    const c = this.cache.get(rec.seq);
    return c !== undefined && c.rec === rec ? c.payload : undefined;
  }

  async readPayload(rec: JournalRecord, start = 0, end = rec.size): Promise<Buffer> {
    const f = this.find(rec.id);
    if (!f) throw this.gone(rec);
    const { seg, slot } = f;
    const size = seg.sizeOf(slot, seg.version === 2 ? RECORD_HEADER_BYTES : V1_HEADER_BYTES);
    if (!Number.isSafeInteger(start) || !Number.isSafeInteger(end) || start < 0 || end > size || start > end) {
      throw new RangeError(`bad payload range [${start}, ${end}) of a ${size}-byte message`);
    }
    if (end - start > MAX_READ_BYTES) throw new RangeError(`read payloads in chunks of at most ${MAX_READ_BYTES} bytes`);
    if (start === end) return Buffer.alloc(0);
    const blob = seg.blobOf(slot);
    if (blob) {
      try {
        const fh = await fsp.open(path.join(this.blobDir, blob.name), 'r');
        try {
          const b = Buffer.allocUnsafe(end - start);
          const got = await preadFully(fh, b, 0, b.length, start);
          if (got !== b.length) throw new StorageError('ECONN_JOURNAL_CORRUPT', `blob of ${rec.id} is shorter than its record says (${got} of ${b.length} bytes)`);
          return b;
        } finally {
          await fh.close();
        }
      } catch (err) {
        if (errorCode(err) && !(err as NodeJS.ErrnoException).syscall) throw err;
        if ((err as NodeJS.ErrnoException).code === 'ENOENT') throw this.gone(rec);
        throw ioError(`read of message ${rec.id}`, err);
      }
    }
    const c = this.cache.get(seg.seqs[slot]!);
    if (c?.payload) return c.payload.subarray(start, end);
    // from disk: the whole record (≤ INLINE_MAX + meta), checked, then served (and cached when small)
    let buf: Buffer;
    try {
      buf = preadExact(seg.readFd(), seg.lens[slot]!, seg.offsets[slot]!);
    } catch (err) {
      throw ioError(`read of message ${rec.id}`, err);
    }
    this.m.diskReads.inc();
    const d = this.decodeAt(seg, slot, buf, 0);
    if (!d?.payload) throw new StorageError('ECONN_JOURNAL_CORRUPT', `message ${rec.id} failed its checksum when read back from ${seg.name}; it was dropped and its bytes kept in journal/quarantine`);
    return d.payload.subarray(start, end);
  }

  /**
   * A reader of one record's payload into buffers the caller owns (PayloadReader):
   * the uplink reads a large message chunk by chunk straight into the frames it sends. A blob is opened at
   * the first read and stays open until close() (readPayload opens and closes it for every chunk); every
   * read first checks that the record is still in the queue, so an acknowledged, dropped or quarantined
   * record is not read from a file that is already unlinked. An inline record is served by readPayload.
   */
  openPayload(rec: JournalRecord): PayloadReader {
    let fh: Promise<FileHandle> | undefined;
    let closed = false;
    const read = async (target: Buffer, targetOffset: number, start: number, length: number): Promise<void> => {
      if (closed) throw new StorageError('ECONN_CLOSED', `the payload reader of ${rec.id} is closed`);
      if (!Number.isSafeInteger(targetOffset) || !Number.isSafeInteger(length) || targetOffset < 0 || length < 0 || targetOffset + length > target.length) {
        throw new RangeError(`bad target range [${targetOffset}, ${targetOffset + length}) of a ${target.length}-byte buffer`);
      }
      const f = this.find(rec.id);
      if (!f) throw this.gone(rec);
      const blob = f.seg.blobOf(f.slot);
      if (!blob) {
        const b = await this.readPayload(rec, start, start + length);
        b.copy(target, targetOffset);
        return;
      }
      if (!Number.isSafeInteger(start) || start < 0 || start + length > blob.size) throw new RangeError(`bad payload range [${start}, ${start + length}) of a ${blob.size}-byte message`);
      try {
        fh ??= fsp.open(path.join(this.blobDir, blob.name), 'r');
        const got = await preadFully(await fh, target, targetOffset, length, start);
        if (got !== length) throw new StorageError('ECONN_JOURNAL_CORRUPT', `blob of ${rec.id} is shorter than its record says (${start + got} of ${start + length} bytes)`);
      } catch (err) {
        if (errorCode(err) && !(err as NodeJS.ErrnoException).syscall) throw err;
        if ((err as NodeJS.ErrnoException).code === 'ENOENT') throw this.gone(rec);
        throw ioError(`read of message ${rec.id}`, err);
      }
    };
    const close = async (): Promise<void> => {
      closed = true;
      const p = fh;
      fh = undefined;
      // FileHandle.close waits for the reads still in flight on it
      if (p) await p.then((h) => h.close(), () => undefined).catch(() => undefined);
    };
    return { read, close };
  }

  /** The payload from `start` to its end as a stream of chunks. */
  createPayloadStream(rec: JournalRecord, start = 0): Readable {
    const f = this.find(rec.id);
    if (!f) throw this.gone(rec);
    const { seg, slot } = f;
    const hdr = seg.version === 2 ? RECORD_HEADER_BYTES : V1_HEADER_BYTES;
    const size = seg.sizeOf(slot, hdr);
    if (!Number.isSafeInteger(start) || start < 0 || start > size) throw new RangeError(`bad payload offset ${start} of a ${size}-byte message`);
    if (start === size) return Readable.from([]);
    const blob = seg.blobOf(slot);
    if (blob) return fs.createReadStream(path.join(this.blobDir, blob.name), { start, end: size - 1, highWaterMark: 256 * 1024 });
    const c = this.cache.get(seg.seqs[slot]!);
    if (c?.payload) return Readable.from([c.payload.subarray(start)]);
    const po = seg.offsets[slot]! + hdr + seg.metaLens[slot]!;
    return fs.createReadStream(seg.path, { start: po + start, end: po + size - 1, highWaterMark: 256 * 1024 });
  }

  private gone(rec: JournalRecord): StorageError {
    return new StorageError('ECONN_NOT_FOUND', `message ${rec.id} is no longer in the journal (acknowledged, dropped or quarantined)`);
  }

  /** The cloud acknowledged `id`. Unknown ids are ignored. Resolves once the ack is in the ack log. */
  ack(id: string): Promise<void> {
    const f = this.find(id);
    if (!f || this.closed) return this.acksSettled();
    this.markDone(f.seg, f.slot);
    return this.scheduleAckFlush();
  }

  private acksSettled(): Promise<void> {
    if (this.ackDirty || this.doneSince.length) return this.ackDeferred.promise;
    if (this.ackFlushing) return this.ackFlushing.catch(() => {});
    return Promise.resolve();
  }

  /** The cloud (or the uplink's encoder) rejected `id` as permanently invalid: kept in journal/quarantine/ with the reason (fsynced), taken out of the queue. */
  async quarantine(id: string, reason: string): Promise<void> {
    const f = this.find(id);
    if (!f) return;
    const { seg, slot } = f;
    const why = String(reason).slice(0, 2000);
    const rec = this.recordOf(seg, slot);
    if (!rec) return; // unreadable: already dropped as corrupt (and kept)
    const blob = seg.blobOf(slot);
    let payload: Buffer | undefined;
    if (!blob) payload = await this.readPayload(rec).catch(() => undefined);
    const info = JSON.stringify({ ...rec, reason: why, quarantinedAt: this.wall() }, null, 2) + '\n';
    if (!seg.live[slot]) return; // acked or dropped meanwhile
    // out of the queue first: a quarantine that cannot be written must not block the queue either
    this.markDone(seg, slot);
    this.quarantinedCount++;
    this.m.quarantined.inc();
    this.log.warn({ id, seq: rec.seq, deviceId: rec.meta.deviceId, topic: rec.meta.topic, size: rec.size, reason: why }, 'message quarantined (rejected as permanently invalid)');
    this.emit('removed', { id, seq: rec.seq, reason: 'quarantine' });
    try {
      if (blob) {
        // the blob file moves into the quarantine (it is not deleted with the record)
        const i = this.blobsToDelete.findIndex((b) => b.name === blob.name);
        if (i >= 0) this.blobsToDelete.splice(i, 1);
        await fsp.rename(path.join(this.blobDir, blob.name), path.join(this.quarantineDir, `${id}.bin`));
        this.blobDiskBytes -= blob.size;
        await this.writeQuarantine(id, undefined, info, blob.size);
      } else {
        await this.writeQuarantine(id, payload ?? Buffer.alloc(0), info);
      }
    } catch (err) {
      this.log.error({ err, id }, 'could not write a quarantined message to journal/quarantine; it is removed from the queue anyway');
    }
    await this.scheduleAckFlush();
  }

  /** Write `<base>.bin` (unless already there) and `<base>.json`, fsynced, counted inside the byte cap; evict the oldest beyond its share. */
  private async writeQuarantine(base: string, bin: Buffer | undefined, info: string, existingBinBytes = 0): Promise<void> {
    const files: Array<[string, Buffer]> = [[`${base}.json`, Buffer.from(info)]];
    if (bin) files.unshift([`${base}.bin`, bin]);
    for (const [name, data] of files) {
      const fh = await fsp.open(path.join(this.quarantineDir, name), 'w', 0o600);
      try {
        await writeAt(fh, data, 0);
        if (this.cfg.fsync !== 'never') await fh.datasync();
      } finally {
        await fh.close();
      }
    }
    if (this.cfg.fsync !== 'never') {
      await syncDir(this.quarantineDir);
      this.m.fsyncs.inc({ kind: 'quarantine' }, files.length + 1);
    }
    const bytes = existingBinBytes + files.reduce((a, [, d]) => a + d.length, 0);
    this.quarantineFiles.push({ base, bytes });
    this.quarantineBytes += bytes;
    // bounded: each pass removes one entry
    const share = Math.floor(this.cfg.max_bytes * QUARANTINE_SHARE);
    while (this.quarantineBytes > share && this.quarantineFiles.length > 1) {
      const old = this.quarantineFiles.shift()!;
      for (const ext of ['.bin', '.json']) await fsp.rm(path.join(this.quarantineDir, old.base + ext), { force: true }).catch(() => {});
      this.quarantineBytes -= old.bytes;
      this.m.quarantineEvicted.inc();
      this.log.warn({ evicted: old.base, quarantineBytes: this.quarantineBytes, share }, 'quarantine over its share of bridge.journal.max_bytes: deleted its oldest entry');
    }
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
      cacheBytes: this.cache.usedBytes,
      writable: !this.broken,
    };
  }

  private oldestAgeMs(): number {
    const o = this.oldest();
    return o ? Math.max(0, this.clock.now() - o.seg.created[o.slot]!) : 0;
  }

  private diskBytes(): number {
    let n = this.blobDiskBytes + this.stagingBytes + this.quarantineBytes;
    for (const s of this.segs) if (!s.deleted) n += s.size;
    return n;
  }

  // ───────────────────────────── TTL ─────────────────────────────

  /** Drop pending records older than ttl_s (oldest first). Runs periodically; public for tests. Returns how many. */
  sweep(): number {
    if (this.cfg.ttl_s <= 0) return 0;
    const ttlMs = this.cfg.ttl_s * 1000;
    const now = this.clock.now();
    let n = 0;
    let first: string | undefined;
    // bounded: each pass drops one record
    for (;;) {
      const o = this.oldest();
      if (!o || now - o.seg.created[o.slot]! <= ttlMs) break;
      first ??= o.seg.idOf(o.slot);
      this.drop(o.seg, o.slot, 'ttl');
      n++;
    }
    if (n) {
      this.log.warn({ dropped: n, firstId: first, reason: 'ttl', ttlS: this.cfg.ttl_s }, 'dropped unacknowledged messages older than bridge.journal.ttl_s');
      this.scheduleAckFlush();
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

  private scheduleAckFlush(): Promise<void> {
    this.ackDirty = true;
    const d = this.ackDeferred;
    if (this.ackOpen && !this.ackTimer && !this.ackFlushing && !this.closed) {
      this.ackTimer = setTimeout(() => {
        this.ackTimer = undefined;
        void this.flushAcks().catch(() => {});
      }, ACK_FLUSH_MS);
    }
    return d.promise;
  }

  /** The floor (every seq below is done) and the done ranges above it, from the index. */
  private checkpoint(): { floor: number; ranges: Array<[number, number]> } {
    const o = this.oldest();
    const floor = o ? o.seg.seqs[o.slot]! : this.nextSeq;
    const ranges: Array<[number, number]> = [];
    let run: [number, number] | undefined;
    for (const seg of this.segs) {
      for (let i = seg.head; i < seg.count; i++) {
        const seq = seg.seqs[i]!;
        if (seq < floor) continue;
        if (seg.live[i]) {
          run = undefined;
          continue;
        }
        if (run) run[1] = seq;
        else ranges.push((run = [seq, seq]));
      }
    }
    return { floor, ranges };
  }

  /** Write the acks gathered since the last flush (one write + one fdatasync), then delete the files they made garbage. */
  private async flushAcks(): Promise<void> {
    // bounded: at most one flush runs; a waiting one follows it
    while (this.ackFlushing) await this.ackFlushing.catch(() => {});
    if (!this.ackOpen) return;
    const d = this.ackDeferred;
    this.ackDeferred = deferred();
    this.ackDirty = false;
    const seqs = this.doneSince.splice(0).sort((a, b) => a - b);
    const blobs = this.blobsToDelete.splice(0);
    const o = this.oldest();
    const floor = o ? o.seg.seqs[o.slot]! : this.nextSeq;
    const entries: Array<{ type: number; a: number; b: number }> = [];
    if (floor > this.floorWritten) entries.push({ type: ACK_FLOOR, a: floor, b: 0 });
    let run: [number, number] | undefined;
    for (const s of seqs) {
      if (s < floor) continue;
      if (run && s <= run[1] + 1) run[1] = Math.max(run[1], s);
      else {
        if (run) entries.push({ type: ACK_RANGE, a: run[0], b: run[1] });
        run = [s, s];
      }
    }
    if (run) entries.push({ type: ACK_RANGE, a: run[0], b: run[1] });
    const sync = this.cfg.fsync !== 'never';
    this.ackFlushing = (async () => {
      try {
        if (entries.length) {
          const fsyncs = entries.length <= this.ackLog.room ? await this.ackLog.append(entries, sync) : await this.ackLog.compact(this.checkpoint(), sync);
          this.m.fsyncs.inc({ kind: 'ack' }, fsyncs);
          this.m.writes.inc({ kind: 'ack' }, entries.length * 32);
          this.floorWritten = Math.max(this.floorWritten, floor);
        }
      } catch (err) {
        this.doneSince.unshift(...seqs);
        this.blobsToDelete.unshift(...blobs);
        const e = ioError('write of ack.log', err);
        this.log.error({ err, code: 'ECONN_JOURNAL_IO' }, 'could not persist journal acknowledgements; retrying (acknowledged messages may be re-sent after a restart)');
        d.reject(e);
        setTimeout(() => {
          if (!this.closed) this.scheduleAckFlush();
        }, PROBE_INTERVAL_MS).unref();
        throw e;
      }
      for (const b of blobs) {
        await fsp.rm(path.join(this.blobDir, b.name), { force: true }).catch(() => {});
        this.blobDiskBytes -= b.size;
      }
      for (const seg of [...this.segs]) if (seg.liveCount === 0 && seg.sealed && seg !== this.active) this.deleteSegment(seg);
      d.resolve();
    })().finally(() => {
      this.ackFlushing = undefined;
      if ((this.ackDirty || this.doneSince.length) && !this.ackTimer && !this.closed) this.scheduleAckFlush();
    });
    return this.ackFlushing;
  }

  private deleteSegment(seg: Segment): void {
    if (seg.deleted) return;
    seg.deleted = true;
    const i = this.segs.indexOf(seg);
    if (i >= 0) this.segs.splice(i, 1);
    this.segCharged -= seg.charged;
    seg.charged = 0;
    seg.closeFds();
    removeSegmentFiles(this.dir, seg.name);
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

async function writeAt(fh: FileHandle, buf: Buffer, pos: number): Promise<void> {
  let off = 0;
  while (off < buf.length) {
    const { bytesWritten } = await fh.write(buf, off, buf.length - off, pos + off);
    if (bytesWritten <= 0) throw Object.assign(new Error('write returned 0 bytes'), { code: 'EIO' });
    off += bytesWritten;
  }
}

/** Write `bufs` back to back at `pos`, whatever the kernel takes per call. */
async function writevAt(fh: FileHandle, bufs: Buffer[], pos: number): Promise<void> {
  let total = 0;
  for (const b of bufs) total += b.length;
  const { bytesWritten } = await fh.writev(bufs, pos);
  if (bytesWritten === total) return;
  if (bytesWritten < 0) throw Object.assign(new Error('writev returned a negative count'), { code: 'EIO' });
  // a short write (rare on a regular file): the rest one buffer after the other
  let skip = bytesWritten;
  let at = pos + bytesWritten;
  for (const b of bufs) {
    if (skip >= b.length) {
      skip -= b.length;
      continue;
    }
    const rest = skip > 0 ? b.subarray(skip) : b;
    skip = 0;
    await writeAt(fh, rest, at);
    at += rest.length;
  }
}
