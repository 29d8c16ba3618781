/**
 * Durable message store of the reference cloud.
 *
 * Layout of STORE_DIR (created 0700):
 *   index.jsonl           one JSON line per stored message, in store order:
 *                         {seq, id, gateway_id, device_id, topic, qos, size, sha256,
 *                          received_at, stored_at, content_type, payload_file}
 *   payloads/ID.bin       the payload of every stored message
 *   partials/ID.part      bytes received so far of a message in progress
 *   partials/ID.json      {id, gateway_id, meta, total, offset, next_seq}: the DURABLE
 *                         prefix (the .part file is fsynced before this is written)
 *
 * A message is stored when: its .part is fsynced, renamed to payloads/ID.bin,
 * the payloads directory fsynced, and its index line appended and fsynced.
 * Group commit: every message completed while a round is in flight shares the
 * next round (payload fsyncs in parallel, ONE directory fsync, ONE index write
 * and fsync). Only then is it acknowledged. On open, a torn last index line is cut off, and each partial is
 * truncated to its durable offset (a partial whose data is shorter is dropped).
 */
import { EventEmitter } from 'node:events';
import { createReadStream, mkdirSync, chmodSync } from 'node:fs';
import { open, readFile, readdir, rename, rm, stat, truncate, type FileHandle } from 'node:fs/promises';
import { createHash } from 'node:crypto';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { StorageError } from '../core/errors.js';
import type { Logger } from '../core/logger.js';
import { writeAtomic } from '../core/fs.js';
import { MessageAssembly, isValidMessageId, parseMeta, type MessageMeta, type PartialInfo } from '../protocol/codec.js';

export interface StoredEntry {
  /** 1-based position in index.jsonl. */
  seq: number;
  id: string;
  gateway_id: string;
  device_id: string;
  topic: string;
  qos: 0 | 1;
  size: number;
  sha256: string;
  received_at: number;
  stored_at: number;
  content_type?: string;
  /** Relative to the store directory. */
  payload_file: string;
}

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
  /** Bytes written since the last persist. */
  dirty: number;
  /** Last time a chunk of it arrived (ms); partials loaded from disk start at load time. */
  lastTouched: number;
}

interface PendingCommit {
  id: string;
  /** A message assembled in partials/ID.part (its open file), or … */
  p?: Partial;
  fh?: FileHandle;
  /** … a whole payload in memory (a message of one chunk), written straight to payloads/ID.bin in the round. */
  data?: Buffer;
  entry: StoredEntry;
  resolve: () => void;
  reject: (e: Error) => void;
  onFail?: ((e: Error) => void) | undefined;
}

export class CloudStore extends EventEmitter {
  readonly dir: string;
  private readonly payloadDir: string;
  private readonly partialDir: string;
  private readonly ids = new Set<string>();
  private readonly partials = new Map<string, Partial>();
  private index?: FileHandle;
  private seq = 0;
  /** Highest seq whose index line is durable and announced ('stored' emitted). */
  private committed = 0;
  private pending: PendingCommit[] = [];
  private flushing?: Promise<void>;
  private readonly committing = new Map<string, Promise<StoredEntry>>();
  /** Group commit rounds run so far (each: payload fsyncs, one directory fsync, one index fsync). */
  rounds = 0;
  private closed = false;

  constructor(
    dir: string,
    private readonly log: Logger,
  ) {
    super();
    this.dir = dir;
    this.payloadDir = path.join(dir, 'payloads');
    this.partialDir = path.join(dir, 'partials');
  }

  /** Messages stored so far (= the seq of the last index line). */
  get count(): number {
    return this.committed;
  }

  async open(): Promise<void> {
    for (const d of [this.dir, this.payloadDir, this.partialDir]) mkdirSync(d, { recursive: true, mode: 0o700 });
    chmodSync(this.dir, 0o700);
    const indexFile = path.join(this.dir, 'index.jsonl');
    let text = '';
    try {
      text = await readFile(indexFile, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw new StorageError('ECONN_JOURNAL_IO', `cloud store: cannot read ${indexFile}`, { cause: err });
    }
    let good = 0;
    let pos = 0;
    while (pos < text.length) {
      const nl = text.indexOf('\n', pos);
      if (nl < 0) break;
      try {
        const e = JSON.parse(text.slice(pos, nl)) as StoredEntry;
        this.ids.add(e.id);
        this.seq = e.seq;
      } catch {
        break;
      }
      pos = nl + 1;
      good = Buffer.byteLength(text.slice(0, pos));
    }
    if (good < Buffer.byteLength(text)) {
      this.log.warn({ file: indexFile, kept_bytes: good }, 'cloud store: torn index tail cut off');
      await truncate(indexFile, good);
    }
    this.committed = this.seq;
    this.index = await open(indexFile, 'a', 0o600);
    await this.loadPartials();
    this.log.info({ dir: this.dir, stored: this.seq, partials: this.partials.size }, 'cloud store open');
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
        if (j.id !== id || !isValidMessageId(id) || this.ids.has(id)) throw new Error('stale');
        const meta = parseMeta(j.meta);
        const st = await stat(dataFile);
        if (st.size < j.offset) throw new Error('data shorter than its durable offset');
        if (st.size > j.offset) await truncate(dataFile, j.offset);
        this.partials.set(id, { id, gatewayId: j.gateway_id, meta, total: j.total, durableOffset: j.offset, durableNextSeq: j.next_seq, dirty: 0, lastTouched: Date.now() });
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

  isStored(id: string): boolean {
    return this.ids.has(id);
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
    const fh = p.fh;
    delete p.fh;
    delete p.asm;
    await fh?.close().catch(() => undefined);
  }

  async write(p: Partial, offset: number, data: Buffer): Promise<void> {
    if (!p.fh) throw new StorageError('ECONN_JOURNAL_IO', `partial ${p.id} is not open`);
    let done = 0;
    while (done < data.length) {
      const { bytesWritten } = await p.fh.write(data, done, data.length - done, offset + done);
      done += bytesWritten;
    }
    p.dirty += data.length;
  }

  /** Make everything received of a partial durable and record it. */
  async persist(p: Partial): Promise<void> {
    if (!p.fh || !p.asm) return;
    if (p.asm.offset === p.durableOffset && p.asm.nextSeq === p.durableNextSeq) return;
    await p.fh.sync();
    const json = path.join(this.partialDir, `${p.id}.json`);
    const body = JSON.stringify({ id: p.id, gateway_id: p.gatewayId, meta: p.meta, total: p.total, offset: p.asm.offset, next_seq: p.asm.nextSeq });
    await writeAtomic(json, body, 0o600);
    p.durableOffset = p.asm.offset;
    p.durableNextSeq = p.asm.nextSeq;
    p.dirty = 0;
  }

  async discard(id: string): Promise<void> {
    const p = this.partials.get(id);
    this.partials.delete(id);
    if (p) await this.unload(p);
    await rm(path.join(this.partialDir, `${id}.json`), { force: true });
    await rm(path.join(this.partialDir, `${id}.part`), { force: true });
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
   * Store a complete, verified message durably; resolves once its payload file,
   * the payloads directory and its index line are fsynced. Group commit: the
   * commit is queued synchronously (index order = call order) and every commit
   * queued while an fsync round is in flight shares the next round (payload
   * fsyncs in parallel, renames, ONE directory fsync, ONE index write + fsync).
   * `onFail` is called synchronously, in queue order, when the round fails —
   * before any later commit can be queued — so a caller can refuse what follows.
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
   * Store a complete, verified message of one chunk straight from memory (no
   * partial files): same group commit and guarantees as commit(). The caller
   * makes sure no partial of this id exists.
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
      payload_file: path.join('payloads', `${id}.bin`),
    };
    if (meta.content_type !== undefined) entry.content_type = meta.content_type;
    return entry;
  }

  private enqueue(src: Pick<PendingCommit, 'id' | 'p' | 'fh' | 'data'>, entry: StoredEntry, onFail?: (err: Error) => void): Promise<StoredEntry> {
    const { id } = src;
    const done = new Promise<StoredEntry>((resolve, reject) => {
      this.pending.push({ ...src, entry, resolve: () => resolve(entry), reject, onFail });
      this.kick();
    });
    this.committing.set(id, done);
    const clear = (): void => {
      if (this.committing.get(id) === done) this.committing.delete(id);
    };
    done.then(clear, clear);
    return done;
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
      try {
        await Promise.all(
          batch.map(async (b) => {
            // a torn payloads/ID.bin without an index line is harmless: not stored, overwritten by the resend
            const fh = b.fh ?? (await open(path.join(this.dir, b.entry.payload_file), 'w', 0o600));
            delete b.fh;
            try {
              if (b.data) {
                let done = 0;
                while (done < b.data.length) done += (await fh.write(b.data, done, b.data.length - done)).bytesWritten;
              }
              await fh.datasync(); // data and size (all a reader needs); the directory fsync below covers the name
            } finally {
              await fh.close();
            }
          }),
        );
        await Promise.all(batch.filter((b) => b.p).map((b) => rename(path.join(this.partialDir, `${b.id}.part`), path.join(this.dir, b.entry.payload_file))));
        const dirFh = await open(this.payloadDir, 'r');
        try {
          await dirFh.sync();
        } finally {
          await dirFh.close();
        }
        const lines: string[] = [];
        for (const b of batch) {
          if (this.ids.has(b.entry.id)) continue; // two connections raced on one id: store once
          b.entry.seq = ++this.seq;
          this.ids.add(b.entry.id);
          lines.push(JSON.stringify(b.entry) + '\n');
        }
        if (lines.length > 0) {
          await this.index!.write(lines.join(''));
          await this.index!.datasync(); // an append: data and the new size
        }
        for (const b of batch) {
          if (b.p && this.partials.get(b.id) === b.p) this.partials.delete(b.id);
          if (b.entry.seq > 0) {
            this.committed = b.entry.seq;
            this.emit('stored', b.entry);
          }
          b.resolve();
        }
        // the partial's record is stale once the index line is durable (open() drops it anyway)
        await Promise.all(batch.filter((b) => b.p).map((b) => rm(path.join(this.partialDir, `${b.id}.json`), { force: true }).catch(() => undefined)));
      } catch (err) {
        const e = new StorageError('ECONN_JOURNAL_IO', 'cloud store: could not store a message durably', { cause: err });
        this.log.error({ err, messages: batch.length }, 'cloud store: group commit failed');
        // everything queued behind the failed round fails too: nothing may be stored after an earlier message that failed
        const failed = [...batch, ...this.pending];
        this.pending = [];
        for (const b of failed) b.onFail?.(e);
        for (const b of failed) {
          await b.fh?.close().catch(() => undefined);
          delete b.fh;
          b.reject(e);
        }
      }
    }
  }

  /** Path of a stored payload. */
  payloadPath(entry: Pick<StoredEntry, 'payload_file'>): string {
    return path.join(this.dir, entry.payload_file);
  }

  async readPayload(entry: Pick<StoredEntry, 'payload_file'>): Promise<Buffer> {
    return readFile(this.payloadPath(entry));
  }

  /** Read the first `upTo` index entries in order (for --from-start replays). */
  async *replay(upTo: number): AsyncGenerator<StoredEntry> {
    if (upTo <= 0) return;
    const rl = createInterface({ input: createReadStream(path.join(this.dir, 'index.jsonl'), 'utf8'), crlfDelay: Infinity });
    try {
      for await (const line of rl) {
        if (!line) continue;
        let e: StoredEntry;
        try {
          e = JSON.parse(line) as StoredEntry;
        } catch {
          return;
        }
        if (e.seq > upTo) return;
        yield e;
      }
    } finally {
      rl.close();
    }
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.idle();
    for (const p of this.partials.values()) {
      await this.persist(p).catch((err: unknown) => this.log.warn({ err, id: p.id }, 'cloud store: could not persist a partial'));
      await this.unload(p);
    }
    await this.index?.close().catch(() => undefined);
  }

  private assertOpen(): void {
    if (this.closed || !this.index) throw new StorageError('ECONN_CLOSED', 'cloud store is closed');
  }

}
