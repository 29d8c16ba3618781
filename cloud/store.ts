/**
 * Durable message store of the reference cloud: an append-only segment log
 * with group commit (see cloud/store/format.ts for the bytes).
 *
 * Layout of STORE_DIR (created 0700):
 *   segments/<first seq>.seg   records of stored messages in store order (meta + inline payload)
 *   segments/<first seq>.seg.fp  sealed segments only: sorted dedup fingerprints (rebuilt when missing)
 *   blobs/<seq>.bin            payload of a message that arrived in several chunks (streamed to disk as it came)
 *   partials/ID.part           bytes received so far of a message in progress
 *   partials/ID.json           {id, gateway_id, meta, total, offset, next_seq}: its DURABLE prefix
 *
 * Group commit: every message completed while a round is in flight shares the
 * next round — ONE write of all their records at an explicit position of the
 * active segment and ONE fdatasync (plus, only when the round holds multi-chunk
 * messages, their files' fdatasync, renames into blobs/ and one directory
 * fsync). Only then is a message acknowledged and announced: 'stored' with its
 * entry and its record's meta JSON (recordMeta), which subscribers reuse.
 * The segment is rolled at `segmentBytes` or `segmentRecords`; a new segment's
 * name is made durable (directory fsync) before anything is written to it.
 *
 * Duplicates are dropped by (gateway, message id). Bounded memory: the 64-bit
 * key fingerprints of the active segment only (≤ segmentRecords, in typed
 * arrays: store/active-index.ts), and per sealed segment a Bloom filter (20 bits
 * ≈ 2.5 B per message) backed by its on-disk sorted fingerprint file; any match
 * is confirmed by reading the record itself. Recently stored payloads stay in a
 * bounded ring of bytes for subscribers (store/ring.ts); older ones are read back
 * from the segment.
 *
 * On open: a store in the old format (index.jsonl + payloads/) is imported
 * (cloud/store/legacy.ts); the last segment is scanned (streamed, CRC and seq
 * continuity checked) and a torn tail cut off; each partial is truncated to its
 * durable offset.
 */
import { EventEmitter } from 'node:events';
import { createReadStream, mkdirSync, chmodSync } from 'node:fs';
import { open, readFile, readdir, rename, rm, stat, truncate, type FileHandle } from 'node:fs/promises';
import { createHash } from 'node:crypto';
import path from 'node:path';
import { StorageError } from '../core/errors.js';
import type { Logger } from '../core/logger.js';
import { pwriteAllSync, writeAtomic, syncDir } from '../core/fs.js';
import { MessageAssembly, isValidMessageId, parseMeta, type MessageMeta, type PartialInfo } from '../protocol/codec.js';
import {
  Bloom,
  HEADER_BYTES,
  checkFingerprints,
  dedupKey,
  encodeFingerprints,
  recordLength,
  recordMeta,
  writeRecord,
  findFingerprint,
  fingerprint,
  parseSegmentName,
  segmentName,
  type StoredEntry,
} from './store/format.js';
import { scanSegment, readRecordAt } from './store/segments.js';
import { importLegacyStore } from './store/legacy.js';
import { PayloadRing } from './store/ring.js';
import { ActiveIndex } from './store/active-index.js';

export type { StoredEntry } from './store/format.js';

/** A message in progress (durable state plus, while loaded, its open file and assembly). */
export interface Partial {
  id: string;
  gatewayId: string;
  meta: MessageMeta;
  total: number;
  /** Durable prefix (reported in WELCOME / progress ACKs). */
  durableOffset: number;
  durableNextSeq: number;
  /** Loaded state: the open .part file and the receive state (may be ahead of the durable prefix). */
  fh?: FileHandle;
  asm?: MessageAssembly;
  /** Bytes written since the last persist started. */
  dirty: number;
  /** The persist in progress, if any (persists of one partial run one after the other). */
  persisting?: Promise<void>;
  /** Last time a chunk of it arrived (ms); partials loaded from disk start at the time their state was last made durable. */
  lastTouched: number;
}

export interface CloudStoreOptions {
  /** Roll the active segment once it holds this many bytes (default 64 MiB). */
  segmentBytes?: number;
  /** … or this many records (default 131 072; bounds the active segment's in-memory index). */
  segmentRecords?: number;
  /** Recent payloads kept in memory for subscribers: count and bytes (defaults 65 536 and 32 MiB). */
  ringMessages?: number;
  ringBytes?: number;
}

interface PendingCommit {
  id: string;
  key: string;
  /** A message assembled in partials/ID.part (its open file), or … */
  p?: Partial;
  fh?: FileHandle;
  /** … a whole payload in memory (a message of one chunk), written inline into the segment. */
  data?: Buffer;
  entry: StoredEntry;
  /** the fingerprint of `key`, once computed (round) */
  fp?: [number, number];
  /** its record's meta JSON (recordMeta), once written: announced with it for subscribers to reuse */
  metaText?: string;
  resolve: () => void;
  reject: (e: Error) => void;
  onFail?: ((e: Error) => void) | undefined;
  done: Promise<StoredEntry> | undefined;
}

interface Segment {
  first: number;
  file: string;
  /** Bytes of durable records. */
  size: number;
  count: number;
  /** Sealed segments: Bloom filter of their dedup keys. */
  bloom?: Bloom;
}

const MAX_SEGMENT_BYTES = 2 ** 31; // record positions in the fingerprint file are u32
const FP_CACHE = 4;

export class CloudStore extends EventEmitter {
  readonly dir: string;
  private readonly segDir: string;
  private readonly blobDir: string;
  private readonly partialDir: string;
  private readonly segmentBytes: number;
  private readonly segmentRecords: number;
  private readonly ringMessages: number;
  private readonly ringBytes: number;
  private readonly partials = new Map<string, Partial>();
  private readonly segments: Segment[] = [];
  private active?: Segment;
  private activeFh?: FileHandle;
  /** The active segment's records by the fingerprint of their dedup key (and its sidecar's input when sealed). */
  private activeIdx = new ActiveIndex(0);
  /** Fingerprint files of segments sealed but not yet written (lookups read them from here meanwhile). */
  private readonly unwrittenFps = new Map<number, Buffer>();
  /** The writes of those files, one after the other; close() waits for them. */
  private sealing: Promise<void> | undefined;
  /** Inline payload position of each record of the active segment (index = seq - first). */
  private activePayloadPos: number[] = [];
  private readonly fpCache = new Map<number, Buffer>();
  /** Recent payloads by seq (FIFO, bounded). */
  private readonly ring: PayloadRing;
  private seq = 0;
  /** Highest seq whose record is durable and announced ('stored' emitted). */
  private committed = 0;
  private pending: PendingCommit[] = [];
  private flushing?: Promise<void>;
  private readonly committing = new Map<string, Promise<StoredEntry>>();
  /** Group commit rounds run so far (each: one segment write + one fdatasync). */
  rounds = 0;
  private closed = false;

  constructor(
    dir: string,
    private readonly log: Logger,
    opts: CloudStoreOptions = {},
  ) {
    super();
    this.dir = dir;
    this.segDir = path.join(dir, 'segments');
    this.blobDir = path.join(dir, 'blobs');
    this.partialDir = path.join(dir, 'partials');
    this.segmentBytes = Math.min(opts.segmentBytes ?? 64 * 1024 * 1024, MAX_SEGMENT_BYTES);
    this.segmentRecords = opts.segmentRecords ?? 131_072;
    this.ringMessages = opts.ringMessages ?? 65_536;
    this.ringBytes = opts.ringBytes ?? 32 * 1024 * 1024;
    this.ring = new PayloadRing(this.ringMessages, this.ringBytes);
  }

  /** Messages stored so far (= the seq of the last durable record). */
  get count(): number {
    return this.committed;
  }

  async open(): Promise<void> {
    for (const d of [this.dir, this.segDir, this.blobDir, this.partialDir]) mkdirSync(d, { recursive: true, mode: 0o700 });
    chmodSync(this.dir, 0o700);
    const t0 = Date.now();
    try {
      await importLegacyStore(this.dir, this.segDir, this.blobDir, this.log);
      await this.loadSegments();
    } catch (err) {
      if (err instanceof StorageError) throw err;
      throw new StorageError('ECONN_JOURNAL_IO', `cloud store: cannot open ${this.dir}: ${(err as Error).message}`, { cause: err });
    }
    await this.loadPartials();
    this.log.info({ dir: this.dir, stored: this.seq, segments: this.segments.length, partials: this.partials.size, ms: Date.now() - t0 }, 'cloud store open');
  }

  private async loadSegments(): Promise<void> {
    const names = await readdir(this.segDir);
    for (const n of names) if (n.endsWith('.tmp')) await rm(path.join(this.segDir, n), { force: true });
    const firsts = names.map(parseSegmentName).filter((n): n is number => n !== undefined).sort((a, b) => a - b);
    let expect = 1;
    for (const [i, first] of firsts.entries()) {
      const file = path.join(this.segDir, segmentName(first));
      const last = i === firsts.length - 1;
      if (first !== expect) throw new StorageError('ECONN_JOURNAL_CORRUPT', `cloud store: segment ${file} starts at seq ${first}, expected ${expect} (a segment is missing); restore it from a backup or move the later segments away`);
      const seg: Segment = { first, file, size: 0, count: 0 };
      if (!last) {
        await this.loadSealed(seg);
      } else {
        const size = (await stat(file)).size;
        const r = await scanSegment(file, (rec) => {
          const [hi, lo] = fingerprint(dedupKey(rec.entry.gateway_id, rec.entry.id));
          this.activeIdx.add(hi, lo, rec.pos);
          this.activePayloadPos.push(rec.payloadPos);
          seg.count++;
        }, { expectSeq: first });
        seg.size = r.validBytes;
        if (r.validBytes < size) {
          this.log.warn({ file, kept_bytes: r.validBytes, cut_bytes: size - r.validBytes, reason: r.stop }, 'cloud store: torn segment tail cut off');
          await truncate(file, r.validBytes);
        }
      }
      this.segments.push(seg);
      expect = first + seg.count;
    }
    this.seq = expect - 1;
    this.committed = this.seq;
    if (this.segments.length === 0) await this.createSegment(1);
    else {
      this.active = this.segments[this.segments.length - 1]!;
      this.activeFh = await open(this.active.file, 'r+');
    }
    // blobs of rounds that failed or were cut off: not stored
    for (const n of await readdir(this.blobDir)) {
      const m = /^(\d+)\.bin$/.exec(n);
      if (!m || Number(m[1]) > this.seq) await rm(path.join(this.blobDir, n), { force: true });
    }
  }

  /** A sealed segment: count and Bloom from its fingerprint file (rebuilt by a scan when missing or stale). */
  private async loadSealed(seg: Segment): Promise<void> {
    seg.size = (await stat(seg.file)).size;
    const fpFile = `${seg.file}.fp`;
    let buf: Buffer | undefined;
    try {
      buf = await readFile(fpFile);
    } catch {
      // missing: rebuilt below
    }
    let n = buf ? checkFingerprints(buf, seg.size) : undefined;
    if (n === undefined || !buf) {
      const fps: number[] = [];
      const r = await scanSegment(seg.file, (rec) => {
        const [hi, lo] = fingerprint(dedupKey(rec.entry.gateway_id, rec.entry.id));
        fps.push(hi, lo, rec.pos);
      }, { expectSeq: seg.first });
      if (r.validBytes !== seg.size) throw new StorageError('ECONN_JOURNAL_CORRUPT', `cloud store: sealed segment ${seg.file} is damaged at byte ${r.validBytes} (${r.stop ?? 'short'}); restore it from a backup`);
      buf = encodeFingerprints(fps, seg.size);
      await writeAtomic(fpFile, buf, 0o600);
      n = fps.length / 3;
      this.log.info({ file: fpFile, records: n }, 'cloud store: fingerprint file rebuilt');
    }
    seg.count = n;
    seg.bloom = new Bloom(n);
    for (let i = 0, o = 16; i < n; i++, o += 12) seg.bloom.add(buf.readUInt32BE(o), buf.readUInt32BE(o + 4));
  }

  private async createSegment(first: number): Promise<void> {
    const file = path.join(this.segDir, segmentName(first));
    const fh = await open(file, 'w+', 0o600);
    try {
      await syncDir(this.segDir); // the new name is durable before any record in it is acknowledged
    } catch (err) {
      await fh.close().catch(() => undefined);
      throw err;
    }
    const seg: Segment = { first, file, size: 0, count: 0 };
    this.segments.push(seg);
    this.active = seg;
    this.activeFh = fh;
    this.activeIdx = new ActiveIndex(this.segmentRecords);
    this.activePayloadPos = [];
  }

  /** Seal the active segment (fingerprint file, Bloom) and start the next one. */
  private async roll(): Promise<void> {
    const seg = this.active!;
    const flat = this.activeIdx.fps;
    const fp = encodeFingerprints(flat, seg.size);
    seg.bloom = new Bloom(flat.length / 3);
    for (let i = 0; i < flat.length; i += 3) seg.bloom.add(flat[i]!, flat[i + 1]!);
    // the sealed segment's handle stays the active one until the next segment is created: commits arriving
    // meanwhile are queued for the next round, not refused (leaving it unset made them fail with "cloud store is
    // closed" and the connector resend them after a second: a 1 s stall in deliveries at every roll)
    const sealedFh = this.activeFh!;
    await this.createSegment(seg.first + seg.count);
    // The sidecar is an index of records already durable: a crash before it is written costs a rebuild at open
    // (open() rebuilds a missing one), so commit rounds do not wait for its write, fsync and rename (~75 ms of
    // paused deliveries at every roll when they did); lookups use it from memory until it is on disk.
    this.unwrittenFps.set(seg.first, fp);
    const before = this.sealing;
    this.sealing = (async () => {
      await before;
      try {
        await sealedFh.close();
        await writeAtomic(`${seg.file}.fp`, fp, 0o600);
      } catch (err) {
        this.log.warn({ err, file: `${seg.file}.fp` }, 'cloud store: could not write a fingerprint file (rebuilt at the next start)');
      } finally {
        this.unwrittenFps.delete(seg.first);
      }
    })();
    this.log.info({ sealed: path.basename(seg.file), records: seg.count, bytes: seg.size }, 'cloud store: segment rolled');
  }

  private async loadPartials(): Promise<void> {
    for (const name of await readdir(this.partialDir)) {
      const full = path.join(this.partialDir, name);
      if (name.endsWith('.tmp')) {
        await rm(full, { force: true });
        continue;
      }
      if (!name.endsWith('.json')) continue;
      const id = name.slice(0, -5);
      const dataFile = path.join(this.partialDir, `${id}.part`);
      try {
        const j = JSON.parse(await readFile(full, 'utf8')) as { id: string; gateway_id: string; meta: unknown; total: number; offset: number; next_seq: number };
        if (j.id !== id || !isValidMessageId(id) || typeof j.gateway_id !== 'string' || (await this.isStored(j.gateway_id, id))) throw new Error('stale');
        const meta = parseMeta(j.meta);
        const st = await stat(dataFile);
        if (st.size < j.offset) throw new Error('data shorter than its durable offset');
        if (st.size > j.offset) await truncate(dataFile, j.offset);
        // its age survives a restart (partial expiry, §13.10): the last time its durable state was written
        const touched = Math.min(Date.now(), (await stat(full)).mtimeMs);
        this.partials.set(id, { id, gatewayId: j.gateway_id, meta, total: j.total, durableOffset: j.offset, durableNextSeq: j.next_seq, dirty: 0, lastTouched: touched });
      } catch (err) {
        this.log.warn({ id, err: (err as Error).message }, 'cloud store: dropping an unusable partial message');
        await rm(full, { force: true });
        await rm(dataFile, { force: true });
      }
    }
    // .part files without .json hold nothing durable
    for (const name of await readdir(this.partialDir)) {
      if (name.endsWith('.part') && !this.partials.has(name.slice(0, -5))) await rm(path.join(this.partialDir, name), { force: true });
    }
  }

  /**
   * Is a message of this gateway with this id stored? Exact: the active
   * segment's keys in memory; older segments through their Bloom filter and,
   * on a hit, the fingerprint file and the record itself.
   */
  async isStored(gatewayId: string, id: string): Promise<boolean> {
    const key = dedupKey(gatewayId, id);
    const [hi, lo] = fingerprint(key);
    if (await this.inActive(gatewayId, id, hi, lo)) return true;
    return this.inSealed(key, gatewayId, id);
  }

  /** In the active segment: a fingerprint match confirmed against the record itself (rare: duplicates only). */
  private async inActive(gatewayId: string, id: string, hi: number, lo: number): Promise<boolean> {
    const positions = this.activeIdx.positions(hi, lo);
    if (positions.length === 0 || !this.activeFh) return false;
    for (const pos of positions) {
      const r = await readRecordAt(this.activeFh, pos);
      if (r && r.entry.gateway_id === gatewayId && r.entry.id === id) return true;
    }
    return false;
  }

  /** Whether a sealed segment's Bloom filter holds this fingerprint (synchronous; inSealed confirms). */
  private mayBeSealed(hi: number, lo: number): boolean {
    for (let i = this.segments.length - 2; i >= 0; i--) if (this.segments[i]!.bloom?.has(hi, lo)) return true;
    return false;
  }

  private async inSealed(key: string, gatewayId: string, id: string): Promise<boolean> {
    if (this.segments.length <= 1) return false;
    const [hi, lo] = fingerprint(key);
    for (let i = this.segments.length - 2; i >= 0; i--) {
      const seg = this.segments[i]!;
      if (seg.bloom?.has(hi, lo) && (await this.confirm(seg, gatewayId, id, hi, lo))) return true;
    }
    return false;
  }

  /** A sealed segment's fingerprint file (a few recently used ones cached). */
  private async fingerprints(seg: Segment): Promise<Buffer> {
    let fp = this.unwrittenFps.get(seg.first) ?? this.fpCache.get(seg.first);
    if (!fp) {
      fp = await readFile(`${seg.file}.fp`);
      this.fpCache.set(seg.first, fp);
      if (this.fpCache.size > FP_CACHE) this.fpCache.delete(this.fpCache.keys().next().value as number);
    }
    return fp;
  }

  private async confirm(seg: Segment, gatewayId: string, id: string, hi: number, lo: number): Promise<boolean> {
    const positions = findFingerprint(await this.fingerprints(seg), hi, lo);
    if (positions.length === 0) return false;
    const fh = await open(seg.file, 'r');
    try {
      for (const pos of positions) {
        const r = await readRecordAt(fh, pos);
        if (r && r.entry.gateway_id === gatewayId && r.entry.id === id) return true;
      }
    } finally {
      await fh.close();
    }
    return false;
  }

  /** Sizes of the bounded in-memory structures (for logs, health and tests). */
  stats(): { stored: number; segments: number; sealedSegments: number; activeKeys: number; bloomBytes: number; ringMessages: number; ringBytes: number } {
    let bloomBytes = 0;
    for (const seg of this.segments) bloomBytes += seg.bloom?.bytes ?? 0;
    return {
      stored: this.committed,
      segments: this.segments.length,
      sealedSegments: this.segments.filter((x) => x.bloom).length,
      activeKeys: this.activeIdx.size,
      bloomBytes,
      ringMessages: this.ring.stats().messages,
      ringBytes: this.ring.stats().bytes,
    };
  }

  getPartial(id: string): Partial | undefined {
    return this.partials.get(id);
  }

  partialsOf(gatewayId: string, max: number): PartialInfo[] {
    const out: PartialInfo[] = [];
    for (const p of this.partials.values()) {
      if (p.gatewayId === gatewayId && p.durableOffset > 0) out.push({ id: p.id, offset: p.durableOffset, next_seq: p.durableNextSeq, total: p.total });
      if (out.length >= max) break;
    }
    return out;
  }

  partialCount(gatewayId: string): number {
    let n = 0;
    for (const p of this.partials.values()) if (p.gatewayId === gatewayId) n++;
    return n;
  }

  /** Partials of a gateway, least recently touched first. */
  partialsByAge(gatewayId: string): Partial[] {
    return [...this.partials.values()].filter((p) => p.gatewayId === gatewayId).sort((a, b) => a.lastTouched - b.lastTouched);
  }

  /** Start (or restart) a message: any previous partial of this id is discarded. */
  async begin(id: string, gatewayId: string, meta: MessageMeta, total: number, asm: MessageAssembly): Promise<Partial> {
    this.assertOpen();
    if (this.partials.has(id)) await this.discard(id); // no partial, no files (open() removes orphans)
    const fh = await open(path.join(this.partialDir, `${id}.part`), 'w', 0o600);
    const p: Partial = { id, gatewayId, meta, total, durableOffset: 0, durableNextSeq: 0, fh, asm, dirty: 0, lastTouched: Date.now() };
    this.partials.set(id, p);
    return p;
  }

  /**
   * Make a partial loaded from disk usable: open its file and hash its durable
   * prefix into a resumed assembly. Bytes beyond the durable prefix (written by
   * an earlier connection but not persisted) are dropped.
   */
  async load(p: Partial): Promise<void> {
    if (p.fh && p.asm) return;
    const file = path.join(this.partialDir, `${p.id}.part`);
    await truncate(file, p.durableOffset);
    const hash = createHash('sha256');
    if (p.durableOffset > 0) {
      for await (const chunk of createReadStream(file, { start: 0, end: p.durableOffset - 1 })) hash.update(chunk as Buffer);
    }
    p.fh = await open(file, 'r+');
    p.asm = MessageAssembly.resume({ id: p.id, total: p.total, meta: p.meta, offset: p.durableOffset, nextSeq: p.durableNextSeq, heldHash: hash });
    p.dirty = 0;
  }

  /** Unload a partial so that the next use resumes from its durable prefix (after a failed write or a bad chunk). */
  async unload(p: Partial): Promise<void> {
    await p.persisting?.catch(() => undefined);
    const fh = p.fh;
    delete p.fh;
    delete p.asm;
    await fh?.close().catch(() => undefined);
  }

  /**
   * Write a chunk into its partial's file. Synchronously, into the page cache (as segment records are):
   * the frame is then dead when the ingest is done with it, and the scavenge ingest.ts runs every few MiB
   * of frames frees it (core/reclaim.ts). A thread-pool write kept it alive across the round trip, where a
   * scavenge could promote it, and dead frames in the old generation wait for a full collection — V8 ran
   * one every ~12 MiB of a large upload (~1 s of CPU per GiB). The copy itself is ~50 µs per 256 KiB chunk.
   */
  async write(p: Partial, offset: number, data: Buffer): Promise<void> {
    if (!p.fh) throw new StorageError('ECONN_JOURNAL_IO', `partial ${p.id} is not open`);
    pwriteAllSync(p.fh.fd, data, offset);
    p.dirty += data.length;
  }

  /**
   * Make everything received of a partial so far durable and record it. Writes may go on while it runs
   * (the ingest does not wait for a periodic persist): it records the offset reached when it was called,
   * whose bytes were all written by then. Persists of one partial run one after the other; a commit
   * round, discard() and unload() wait for the one in progress (so its record is never written after
   * the message was stored or dropped).
   */
  persist(p: Partial): Promise<void> {
    const prev = p.persisting;
    // what to record is fixed now: every byte the assembly accepted so far has been written (callers await store.write)
    const fh = p.fh;
    const asm = p.asm;
    if (!fh || !asm) return prev ?? Promise.resolve();
    const at = { offset: asm.offset, nextSeq: asm.nextSeq };
    p.dirty = 0;
    const run = (async () => {
      await prev?.catch(() => undefined);
      await this.persistNow(p, fh, at);
    })();
    const clear = (): void => {
      if (p.persisting === run) delete p.persisting;
    };
    run.then(clear, clear);
    p.persisting = run;
    return run;
  }

  private async persistNow(p: Partial, fh: FileHandle, at: { offset: number; nextSeq: number }): Promise<void> {
    const { offset, nextSeq } = at;
    if (offset <= p.durableOffset) return;
    await fh.sync();
    const json = path.join(this.partialDir, `${p.id}.json`);
    const body = JSON.stringify({ id: p.id, gateway_id: p.gatewayId, meta: p.meta, total: p.total, offset, next_seq: nextSeq });
    await writeAtomic(json, body, 0o600);
    p.durableOffset = offset;
    p.durableNextSeq = nextSeq;
  }

  async discard(id: string): Promise<void> {
    const p = this.partials.get(id);
    this.partials.delete(id);
    await p?.persisting?.catch(() => undefined);
    if (p) await this.unload(p);
    await rm(path.join(this.partialDir, `${id}.json`), { force: true });
    await rm(path.join(this.partialDir, `${id}.part`), { force: true });
  }

  /**
   * Drop partials no chunk has reached for `maxAgeMs` (§13.10): a message the connector will never
   * complete — its upload was cut off by a connector crash, so no DISCARD came — must not be held (nor
   * reported in WELCOME, nor count against max_partials) forever. A partial being persisted or committed
   * is left alone. Returns the ids dropped.
   */
  async expirePartials(maxAgeMs: number, now = Date.now()): Promise<string[]> {
    const old = [...this.partials.values()].filter((p) => now - p.lastTouched > maxAgeMs && !p.persisting && !this.committing.has(p.id));
    const out: string[] = [];
    for (const p of old) {
      if (this.partials.get(p.id) !== p || now - p.lastTouched <= maxAgeMs) continue; // touched or replaced meanwhile
      await this.discard(p.id);
      out.push(p.id);
      this.log.info({ id: p.id, gateway: p.gatewayId, offset: p.durableOffset, total: p.total, idleMs: now - p.lastTouched }, 'cloud store: partial message expired (no chunk of it within partial_ttl_s)');
    }
    return out;
  }

  /** True while a commit of this id is queued or in an fsync round. */
  isCommitting(id: string): boolean {
    return this.committing.has(id);
  }

  /** Resolves (never rejects) when the commit of this id in flight, if any, has finished either way. */
  async whenSettled(id: string): Promise<void> {
    await this.committing.get(id)?.catch(() => undefined);
  }

  /**
   * Store a complete, verified message (assembled in its partial file) durably;
   * resolves once its record is fdatasynced. Group commit: the commit is queued
   * synchronously (store order = call order) and every commit queued while a
   * round is in flight shares the next round. `onFail` is called synchronously,
   * in queue order, when the round fails — before any later commit can be
   * queued — so a caller can refuse what follows.
   */
  commit(p: Partial, sha256: string, storedAt = Date.now(), onFail?: (err: Error) => void): Promise<StoredEntry> {
    try {
      this.assertOpen();
      if (!p.fh) throw new StorageError('ECONN_JOURNAL_IO', `partial ${p.id} is not open`);
    } catch (err) {
      return Promise.reject(err as Error);
    }
    const fh = p.fh;
    delete p.fh;
    return this.enqueue({ id: p.id, p, fh }, this.entryFor(p.id, p.gatewayId, p.meta, p.total, sha256, storedAt), onFail);
  }

  /**
   * Store a complete, verified message of one chunk straight from memory
   * (inline in the segment): same group commit and guarantees as commit(). The
   * caller makes sure no partial of this id exists.
   */
  commitData(id: string, gatewayId: string, meta: MessageMeta, data: Buffer, sha256: string, storedAt = Date.now(), onFail?: (err: Error) => void): Promise<StoredEntry> {
    try {
      this.assertOpen();
      if (this.partials.has(id)) throw new StorageError('ECONN_JOURNAL_IO', `message ${id} is in progress as a partial`);
    } catch (err) {
      return Promise.reject(err as Error);
    }
    return this.enqueue({ id, data }, this.entryFor(id, gatewayId, meta, data.length, sha256, storedAt), onFail);
  }

  private entryFor(id: string, gatewayId: string, meta: MessageMeta, size: number, sha256: string, storedAt: number): StoredEntry {
    const entry: StoredEntry = {
      seq: 0,
      id,
      gateway_id: gatewayId,
      device_id: meta.device_id,
      topic: meta.topic,
      qos: meta.qos,
      size,
      sha256,
      received_at: meta.received_at,
      stored_at: storedAt,
    };
    if (meta.content_type !== undefined) entry.content_type = meta.content_type;
    return entry;
  }

  private enqueue(src: Pick<PendingCommit, 'id' | 'p' | 'fh' | 'data'>, entry: StoredEntry, onFail?: (err: Error) => void): Promise<StoredEntry> {
    const { id } = src;
    let item!: PendingCommit;
    const done = new Promise<StoredEntry>((resolve, reject) => {
      item = { id, key: dedupKey(entry.gateway_id, id), p: src.p, fh: src.fh, data: src.data, entry, resolve: () => resolve(entry), reject, onFail, done: undefined };
    });
    item.done = done;
    this.pending.push(item);
    this.committing.set(id, done);
    this.kick();
    return done;
  }

  /** A commit is settled: resolve or reject it and forget it (unless a newer commit of the id is in flight). */
  private settle(b: PendingCommit, err?: Error): void {
    if (this.committing.get(b.id) === b.done) this.committing.delete(b.id);
    if (err) b.reject(err);
    else b.resolve();
  }

  /** Resolves when no commit is queued or in flight. */
  async idle(): Promise<void> {
    while (this.flushing) await this.flushing;
  }

  private kick(): void {
    if (this.flushing) return;
    this.flushing = this.flush().finally(() => {
      this.flushing = undefined;
      if (this.pending.length > 0) this.kick(); // queued after the last round's check
    });
  }

  /** Group commit rounds until nothing is queued. */
  private async flush(): Promise<void> {
    // let every commit of the current tick (e.g. several frames of one socket read) join the first round
    await new Promise<void>((r) => setImmediate(r));
    while (this.pending.length > 0) {
      const batch = this.pending;
      this.pending = [];
      this.rounds++;
      const seqBefore = this.seq;
      try {
        await this.round(batch);
      } catch (err) {
        this.seq = seqBefore;
        const e = new StorageError('ECONN_JOURNAL_IO', 'cloud store: could not store a message durably', { cause: err });
        this.log.error({ err, messages: batch.length }, 'cloud store: group commit failed');
        // whatever the failed write left beyond the last durable record must not be read back as records
        if (this.activeFh && this.active) await this.activeFh.truncate(this.active.size).catch(() => undefined);
        for (const b of batch) if (b.entry.payload_file !== undefined) await rm(path.join(this.dir, b.entry.payload_file), { force: true }).catch(() => undefined);
        // everything queued behind the failed round fails too: nothing may be stored after an earlier message that failed
        const failed = [...batch, ...this.pending];
        this.pending = [];
        for (const b of failed) b.onFail?.(e);
        for (const b of failed) {
          await b.fh?.close().catch(() => undefined);
          delete b.fh;
          this.settle(b, e);
        }
      }
    }
  }

  private async round(batch: PendingCommit[]): Promise<void> {
    if (this.active!.size >= this.segmentBytes || this.active!.count >= this.segmentRecords) await this.roll();
    const seg = this.active!;
    const fh = this.activeFh!;
    // assign seqs; two connections racing on one key store it once
    const inRound = new Set<string>();
    const storing: PendingCommit[] = [];
    for (const b of batch) {
      if (inRound.has(b.key)) continue;
      const [hi, lo] = fingerprint(b.key);
      b.fp = [hi, lo];
      // no promise per message: only a fingerprint match (a duplicate, or a rare collision) awaits a read
      if (this.activeIdx.has(hi, lo) && (await this.inActive(b.entry.gateway_id, b.id, hi, lo))) continue;
      if (this.mayBeSealed(hi, lo) && (await this.inSealed(b.key, b.entry.gateway_id, b.id))) continue;
      inRound.add(b.key);
      b.entry.seq = ++this.seq;
      if (b.p) b.entry.payload_file = path.join('blobs', `${b.entry.seq}.bin`);
      storing.push(b);
    }
    // multi-chunk messages: their files are durable and in blobs/ before their records are written
    const blobs = batch.filter((b) => b.fh);
    if (blobs.length > 0) {
      // a periodic persist still running: its record must be written before the message's files move
      await Promise.all(blobs.map((b) => b.p?.persisting?.catch(() => undefined)));
      await Promise.all(
        blobs.map(async (b) => {
          const bfh = b.fh!;
          delete b.fh;
          try {
            await bfh.datasync();
          } finally {
            await bfh.close();
          }
        }),
      );
      const renamed = storing.filter((b) => b.p);
      await Promise.all(renamed.map((b) => rename(path.join(this.partialDir, `${b.id}.part`), path.join(this.dir, b.entry.payload_file!))));
      if (renamed.length > 0) await syncDir(this.blobDir);
    }
    // every record of the round in ONE buffer, written with ONE call
    const metas: string[] = new Array<string>(storing.length);
    const metaLengths: number[] = new Array<number>(storing.length);
    let total = 0;
    for (const [i, b] of storing.entries()) {
      const meta = recordMeta(b.entry);
      const r = recordLength(meta, b.data?.length ?? 0);
      metas[i] = meta;
      b.metaText = meta;
      metaLengths[i] = r.metaLength;
      total += r.length;
    }
    const positions: number[] = new Array<number>(storing.length);
    const payloadPositions: number[] = new Array<number>(storing.length);
    if (total > 0) {
      const buf = Buffer.allocUnsafe(total);
      let off = 0;
      for (const [i, b] of storing.entries()) {
        positions[i] = seg.size + off;
        payloadPositions[i] = seg.size + off + HEADER_BYTES + metaLengths[i]!;
        off = writeRecord(buf, off, metas[i]!, metaLengths[i]!, b.data);
      }
      // one write at an explicit position (never the file offset: a failed round must not shift the next),
      // synchronous: it only copies into the page cache (≈ 10 µs for a round of small messages), cheaper than a
      // thread-pool round trip and its promise; the fdatasync, which waits for the disk, stays off the event loop
      pwriteAllSync(fh.fd, buf, seg.size);
      await fh.datasync();
    }
    const pos = seg.size + total;
    // durable: index, announce, acknowledge
    seg.size = pos;
    for (const [i, b] of storing.entries()) {
      const [hi, lo] = b.fp ?? fingerprint(b.key);
      this.activeIdx.add(hi, lo, positions[i]!);
      this.activePayloadPos.push(payloadPositions[i]!);
      seg.count++;
      if (b.data) this.remember(b.entry.seq, b.data);
    }
    const stored = new Set(storing);
    for (const b of batch) {
      if (b.p && this.partials.get(b.id) === b.p) this.partials.delete(b.id);
      if (stored.has(b)) {
        this.committed = b.entry.seq;
        this.emit('stored', b.entry, b.metaText);
      }
      this.settle(b);
    }
    // a partial's record is stale once its message is durable (open() drops it anyway); so is the data of a duplicate
    const done = batch.filter((b) => b.p);
    if (done.length > 0) {
      await Promise.all(
        done.map(async (b) => {
          await rm(path.join(this.partialDir, `${b.id}.json`), { force: true }).catch(() => undefined);
          if (!stored.has(b)) await rm(path.join(this.partialDir, `${b.id}.part`), { force: true }).catch(() => undefined);
        }),
      );
    }
  }

  private remember(seq: number, data: Buffer): void {
    this.ring.put(seq, data);
  }

  /**
   * The payload of a recently stored message, from memory (undefined: not in the ring; use
   * readPayload). A view into the ring, valid until the next commit round: use it at once.
   */
  cachedPayload(entry: Pick<StoredEntry, 'seq'>): Buffer | undefined {
    return this.ring.get(entry.seq);
  }

  /** Path of a payload stored in its own file (multi-chunk messages), else undefined. */
  payloadPath(entry: Pick<StoredEntry, 'payload_file'>): string | undefined {
    return entry.payload_file === undefined ? undefined : path.join(this.dir, entry.payload_file);
  }

  async readPayload(entry: StoredEntry): Promise<Buffer> {
    const cached = this.ring.get(entry.seq);
    // a copy: the caller gets it after an await, when the ring may have been written again
    if (cached) return Buffer.from(cached);
    if (entry.payload_file !== undefined) return readFile(path.join(this.dir, entry.payload_file));
    if (entry.size === 0) return Buffer.alloc(0);
    const active = this.active;
    if (active && entry.seq >= active.first && entry.seq < active.first + active.count) {
      // the position is taken before any await: a roll meanwhile starts the next segment's positions afresh
      const pos = this.activePayloadPos[entry.seq - active.first]!;
      const fh = await open(active.file, 'r');
      try {
        const buf = Buffer.alloc(entry.size);
        const { bytesRead } = await fh.read(buf, 0, entry.size, pos);
        if (bytesRead !== entry.size) throw new StorageError('ECONN_JOURNAL_IO', `message seq ${entry.seq}: payload short`);
        return buf;
      } finally {
        await fh.close();
      }
    }
    // a sealed segment: its fingerprint file gives the record's position
    const seg = this.segments.find((x, i) => x.first <= entry.seq && (this.segments[i + 1]?.first ?? Infinity) > entry.seq);
    if (seg) {
      const [hi, lo] = fingerprint(dedupKey(entry.gateway_id, entry.id));
      const fh = await open(seg.file, 'r');
      try {
        for (const pos of findFingerprint(await this.fingerprints(seg), hi, lo)) {
          const r = await readRecordAt(fh, pos, true);
          if (r?.entry.seq === entry.seq && r.payload) return r.payload;
        }
      } finally {
        await fh.close();
      }
    }
    throw new StorageError('ECONN_NOT_FOUND', `message seq ${entry.seq} is not in the store`);
  }

  /** Stream records with seq in [from, upTo] (durable ones only), in store order, inline payloads included; bounded batches. */
  private async *scanFrom(from: number, upTo: number): AsyncGenerator<{ entry: StoredEntry; payload?: Buffer; seg: number; payloadPos: number }> {
    type Item = { entry: StoredEntry; payload?: Buffer; seg: number; payloadPos: number };
    const segs = this.segments.filter((s, i) => s.first <= upTo && (this.segments[i + 1]?.first ?? Infinity) > from);
    for (const seg of segs) {
      let start = 0;
      let done = false;
      while (!done && start < seg.size) {
        const got: Item[] = [];
        let bytes = 0;
        let next = start;
        const r = await scanSegment(seg.file, (rec) => {
          next = rec.end;
          if (rec.entry.seq < from) return true;
          if (rec.entry.seq > upTo) {
            done = true;
            return false;
          }
          const item: Item = { entry: rec.entry, seg: seg.first, payloadPos: rec.payloadPos };
          if (rec.payload) item.payload = rec.payload;
          got.push(item);
          bytes += rec.payload?.length ?? 0;
          return got.length < 4096 && bytes < 8 * 1024 * 1024;
        }, { start, limit: seg.size, payloads: true });
        for (const g of got) yield g;
        if (next === start || r.stop !== undefined) break;
        start = next;
      }
      if (done) return;
    }
  }

  /** Read the first `upTo` stored messages in order (for --from-start replays), streamed from the segments. */
  async *replay(upTo: number): AsyncGenerator<StoredEntry> {
    for await (const r of this.replayWithPayloads(upTo)) yield r.entry;
  }

  /** Like replay(), with each inline payload (read in the same pass; blob payloads: readPayload). */
  async *replayWithPayloads(upTo: number): AsyncGenerator<{ entry: StoredEntry; payload?: Buffer }> {
    if (upTo <= 0) return;
    for await (const r of this.scanFrom(1, Math.min(upTo, this.committed))) {
      yield r.payload ? { entry: r.entry, payload: r.payload } : { entry: r.entry };
    }
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.idle();
    await this.sealing;
    for (const p of this.partials.values()) {
      await this.persist(p).catch((err: unknown) => this.log.warn({ err, id: p.id }, 'cloud store: could not persist a partial'));
      await this.unload(p);
    }
    await this.activeFh?.close().catch(() => undefined);
    this.activeFh = undefined;
  }

  private assertOpen(): void {
    if (this.closed || !this.activeFh) throw new StorageError('ECONN_CLOSED', 'cloud store is closed');
  }
}
