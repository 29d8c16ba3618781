/**
 * Sender and window: journal records go out in journal order, each message's
 * chunks contiguously (order per device at the cloud), many of them per BATCH
 * frame (protocol v2: one WebSocket message and, mostly, one TLS write for a
 * whole run of small messages), within a bounded window of unacknowledged
 * messages and bytes, waiting on WebSocket back-pressure. Payloads are read
 * from the journal ahead of the socket (bounded), so disk latency overlaps
 * the network.
 *
 * A record the encoder refuses (metadata over the protocol limits, …) can
 * never be sent: it is quarantined (counted, logged) and the records behind
 * it go on — it must not be retried forever nor block the queue.
 */
import { randomBytes } from 'node:crypto';
import { WebSocket } from 'ws';
import { ConnectorError, errorCode } from '../../core/errors.js';
import type { UplinkMessageMeta } from '../../core/ports.js';
import { CLOSE_CODES, HEADER_BYTES, WireError, chunkRanges, sha256, type ChunkRange, type MessageMeta } from '../../protocol/codec.js';
import { LIMITS_V2, batchEntryHeaderBytes, encodeBatch, encodeBatchChunk, sealBatchFrame, type BatchChunk, type BatchChunkHead } from '../../protocol/v2.js';
import type { UplinkCore } from './core.js';
import type { OutMsg, OutboundRecord, PayloadReader, Session } from './types.js';

const EMPTY = Buffer.alloc(0);
/** Small messages read ahead of the socket, and their byte budget. */
const PREFETCH_MSGS = 256;
const PREFETCH_BYTES = 4 * 1024 * 1024;
/** Bytes of a large message read ahead of the socket. */
const READ_AHEAD_BYTES = 1024 * 1024;
/** Most bytes of the fields of a BATCH entry before its data (id 128, digests, metadata 4621, position). */
const ENTRY_FIELDS_MAX = 1 + 128 + 4 + 8 + 8 + 4 + 32 + 4621 + 32 + 8;

/** Chunk reads in flight ahead of the socket: READ_AHEAD_BYTES worth of chunks (at least two, at most 16). */
export function readAheadDepth(chunkSize: number): number {
  return Math.max(2, Math.min(16, Math.ceil(READ_AHEAD_BYTES / chunkSize)));
}

/** Bytes of a reusable chunk frame: any one chunk with its BATCH header and entry fields (at most ENTRY_FIELDS_MAX) fits. */
export function chunkFrameCap(chunkSize: number): number {
  return HEADER_BYTES + ENTRY_FIELDS_MAX + chunkSize;
}
/** A BATCH is handed to the socket once it holds this many bytes (or nothing more is ready to send). */
const BATCH_TARGET_BYTES = 64 * 1024;
type ChunkRead = Promise<{ data?: Buffer; err?: unknown }>;
interface Queued {
  rec: OutboundRecord;
  first?: ChunkRead;
  /** The whole payload, when the journal still held it in memory at prefetch (no read, no promise). */
  data?: Buffer;
  bytes: number;
}

/**
 * A frame for one chunk of a multi-chunk message, its data to be read straight into it at `at`
 * (after the BATCH header and the entry's fields, which sealBatchFrame writes once the data is in).
 * Buffers of `cap` bytes come from `free` (frames used again once the socket wrote them).
 */
export function chunkFrame(id: string, total: number, meta: MessageMeta, r: ChunkRange, cap: number, free: Buffer[]): { at: number; base: Buffer; frame: Buffer } {
  const at = HEADER_BYTES + batchEntryHeaderBytes({ id, seq: r.seq, offset: r.offset, total, ...(r.first ? { meta } : {}) }, r.length);
  const base = at + r.length <= cap ? (free.pop() ?? Buffer.allocUnsafe(cap)) : Buffer.allocUnsafe(at + r.length);
  return { at, base, frame: base.subarray(0, at + r.length) };
}

/** The wire metadata of a journal record. */
export function wireMeta(meta: UplinkMessageMeta): MessageMeta {
  const m: MessageMeta = { device_id: meta.deviceId, topic: meta.topic, qos: meta.qos, received_at: Math.floor(meta.receivedAt) };
  if (meta.contentType !== undefined) m.content_type = meta.contentType;
  return m;
}

export class Sender {
  constructor(private readonly up: UplinkCore) {}

  /**
   * Send journal records in order, one message after the other, until the session ends or rewinds.
   * Reads are issued ahead of the socket: up to PREFETCH_MSGS small messages (at most PREFETCH_BYTES) and
   * READ_AHEAD_BYTES within a large one; memory stays bounded by those constants.
   */
  async pump(s: Session, epoch: number): Promise<void> {
    const up = this.up;
    const queue: Queued[] = [];
    let head = 0;
    let queuedBytes = 0;
    let lastSeq = -1;
    try {
      while (up.live(s, epoch)) {
        const now = Date.now();
        if (s.pausedUntil > now) {
          await this.idle(s, s.pausedUntil - now);
          continue;
        }
        if (queue.length - head < PREFETCH_MSGS / 2) {
          if (head > 0) {
            queue.splice(0, head);
            head = 0;
          }
          for (const rec of up.journal.pending(lastSeq, PREFETCH_MSGS - queue.length)) {
            lastSeq = rec.seq;
            const e: Queued = { rec, bytes: 0 };
            if (rec.size <= s.chunkSize && !s.resume.has(rec.id) && queuedBytes + rec.size <= PREFETCH_BYTES) {
              const cached = rec.size > 0 ? up.journal.cachedPayload?.(rec) : undefined;
              if (cached !== undefined && cached.length === rec.size) e.data = cached;
              else e.first = this.startRead(rec, 0, rec.size);
              e.bytes = rec.size;
              queuedBytes += rec.size;
            }
            queue.push(e);
          }
        }
        if (head >= queue.length) {
          await this.idle(s, 1000);
          continue;
        }
        if (s.inflight.size >= up.settings.uplink.window_messages) {
          await this.idle(s, 1000);
          continue;
        }
        const e = queue[head++] as Queued;
        queuedBytes -= e.bytes;
        if (s.inflight.has(e.rec.id)) continue;
        if (e.data !== undefined) {
          const sent = this.sendWhole(s, e.rec, e.data);
          if (sent !== false) {
            if (sent) await sent;
            continue;
          }
        }
        await this.sendMessage(s, epoch, e.rec, e.first ?? (e.data !== undefined ? Promise.resolve({ data: e.data }) : undefined));
      }
    } catch (err) {
      if (!up.live(s, epoch)) return;
      // a journal read failure: the message is not lost; try again on a fresh connection after a backoff
      up.noteError(err);
      up.conn.dropSession(s, { code: CLOSE_CODES.NORMAL, reason: 'journal read failed' });
    }
  }

  /** Hand what is batched to the socket, then wait for a wake-up (or `ms`). */
  private async idle(s: Session, ms: number): Promise<void> {
    await this.flush(s);
    await this.up.waitWake(ms);
  }

  /** Restart sending from the first unacknowledged record (same connection), after `delayMs`. */
  rewind(s: Session, delayMs: number): void {
    const up = this.up;
    s.epoch++;
    s.pausedUntil = Date.now() + delayMs;
    // messages in flight are sent again (the cloud drops duplicates); partly stored ones resume at their last progress
    s.inflight.clear();
    s.unackedBytes = 0;
    up.wake();
    const epoch = s.epoch;
    const t = setTimeout(() => {
      if (up.session === s && s.epoch === epoch && !s.closing) void this.pump(s, epoch);
    }, delayMs);
    t.unref();
    s.timers.push(t);
  }

  /** Start reading a payload range; never rejects (errors are returned), so an abandoned read cannot go unhandled. */
  private startRead(rec: OutboundRecord, offset: number, length: number): ChunkRead {
    if (length === 0) return Promise.resolve({ data: EMPTY });
    return this.readChunk(rec, offset, length).then(
      (data) => ({ data }),
      (err: unknown) => ({ err }),
    );
  }

  /**
   * Append one encoded entry to the session's batch; the batch goes out when it is full. The entry joins the
   * batch synchronously (before any wait), so entries — and the positions they carry — keep their order.
   */
  private async append(s: Session, entry: Buffer): Promise<void> {
    const w = this.appendSync(s, entry);
    if (w) await w;
  }

  /** append() without a promise in the common case: a promise only when the entry made a batch go out. */
  private appendSync(s: Session, entry: Buffer): Promise<unknown> | undefined {
    let full: Promise<void> | undefined;
    if (s.batch.length > 0 && (s.batchBytes + entry.length > s.maxFrameBytes - HEADER_BYTES || s.batch.length >= LIMITS_V2.maxChunksPerBatch)) full = this.flush(s);
    s.batch.push(entry);
    s.batchBytes += entry.length;
    const target = s.batchBytes >= BATCH_TARGET_BYTES ? this.flush(s) : undefined;
    if (full && target) return Promise.all([full, target]);
    return full ?? target;
  }

  /**
   * The common case, without a promise or an await: a one-chunk message whose payload the journal still
   * holds in memory, with room in the window. Does what sendMessage does for it; returns false (nothing
   * changed) whenever anything is out of the ordinary — window full, token renewal pending, larger than
   * the cloud takes, unencodable — and sendMessage then handles it. Returns the back-pressure wait, if any.
   * Measured at 5 000 msg/s: the per-message generator, read promise and awaits of sendMessage were the
   * uplink's largest cost.
   */
  private sendWhole(s: Session, rec: OutboundRecord, data: Buffer): Promise<unknown> | undefined | false {
    const up = this.up;
    if (data.length !== rec.size || rec.size > s.chunkSize || rec.size > s.maxMessageBytes || s.resume.has(rec.id)) return false;
    if ((s.unackedBytes > 0 && s.unackedBytes + rec.size > up.settings.uplink.window_bytes) || up.conn.holdForToken(s)) return false;
    const pos = s.lastPos + 1;
    const c: BatchChunk = { id: rec.id, seq: 0, offset: 0, total: rec.size, data, meta: wireMeta(rec.meta), payload_sha256: Buffer.from(rec.sha256, 'hex'), pos };
    let entry: Buffer;
    try {
      entry = encodeBatchChunk(c);
    } catch (err) {
      if (err instanceof WireError) return false; // sendMessage quarantines it, with its log line
      throw err;
    }
    s.lastPos = pos;
    s.inflight.set(rec.id, { rec, sentOffset: rec.size, ackedOffset: 0, doneAt: performance.now(), pos });
    s.unackedBytes += rec.size;
    up.counts.bytesSent += rec.size;
    up.m.bytesSent.inc(rec.size);
    up.counts.messagesSent++;
    up.m.messagesSent.inc();
    return this.appendSync(s, entry);
  }

  /** A record the encoder refuses can never be sent: quarantined (logged, counted), the records behind it go on. */
  private unencodable(rec: OutboundRecord, err: WireError): void {
    const up = this.up;
    up.log.error(
      { code: err.code, reason: err.reason, id: rec.id, deviceId: rec.meta.deviceId, size: rec.size },
      `uplink: a journal record cannot be encoded (${err.message}): quarantined, the records behind it go on`,
    );
    up.quarantine(rec.id, `cannot be encoded: ${err.message}`);
    up.emit('quarantined', { id: rec.id, reason: err.message });
  }

  /** Account a chunk handed to the socket; its message's last chunk takes the position `pos` and counts it as sent. */
  private chunkSent(s: Session, o: OutMsg, range: ChunkRange, pos: number | undefined): void {
    const up = this.up;
    if (range.last) {
      s.lastPos = pos as number;
      o.pos = s.lastPos;
    }
    s.unackedBytes += range.length;
    o.sentOffset = range.offset + range.length;
    up.counts.bytesSent += range.length;
    up.m.bytesSent.inc(range.length);
    if (range.last) {
      o.doneAt = performance.now();
      up.counts.messagesSent++;
      up.m.messagesSent.inc();
    }
  }

  /** Send the batched entries as one BATCH frame; resolves at once unless the socket buffer is above the high-water mark. */
  flush(s: Session): Promise<void> {
    if (s.batch.length === 0) return Promise.resolve();
    const entries = s.batch;
    s.batch = [];
    s.batchBytes = 0;
    if (s.ws.readyState !== WebSocket.OPEN) return Promise.resolve();
    return this.writeFrame(s, encodeBatch(entries));
  }

  /** Hand one BATCH frame to the socket; resolves at once unless the socket buffer is above the high-water mark. */
  writeFrame(s: Session, frame: Buffer, onWritten?: () => void): Promise<void> {
    if (s.ws.readyState !== WebSocket.OPEN) return Promise.resolve();
    const up = this.up;
    up.counts.batches++;
    up.m.batches.inc();
    return new Promise((resolve) => {
      const hwm = Math.max(4 * 1024 * 1024, 4 * s.chunkSize);
      let waited = false;
      s.ws.send(frame, { binary: true }, (err) => {
        if (!err) onWritten?.();
        if (waited) resolve();
      });
      if (s.ws.bufferedAmount > hwm) waited = true;
      else resolve();
    });
  }

  private async sendMessage(s: Session, epoch: number, rec: OutboundRecord, firstRead?: ChunkRead): Promise<void> {
    const up = this.up;
    const u = up.settings.uplink;
    if (rec.size > s.maxMessageBytes) {
      // the cloud announced it would refuse it: quarantine without sending gigabytes for nothing
      up.log.warn({ id: rec.id, size: rec.size, limit: s.maxMessageBytes }, 'uplink: message larger than the cloud accepts: quarantined');
      up.counts.rejected++;
      up.m.rejected.inc({ kind: 'permanent' });
      up.quarantine(rec.id, `larger than the cloud's max_message_bytes (${s.maxMessageBytes})`);
      return;
    }
    let startOffset = 0;
    let startSeq = 0;
    // an upload sent while it arrived (streamer.ts) goes on where the streaming stopped, on this connection
    const streamed = up.streamer.takeOver(s, rec.id, rec.size);
    const r = s.resume.get(rec.id);
    if (streamed) {
      startOffset = streamed.offset;
      startSeq = streamed.nextSeq;
      up.log.info({ id: rec.id, streamedBytes: streamed.offset, total: rec.size }, 'uplink: an upload sent while it arrived is committed: sending the rest');
    } else if (r && r.total === rec.size && r.offset > 0 && r.offset <= rec.size && r.next_seq > 0) {
      startOffset = r.offset;
      startSeq = r.next_seq;
      up.log.info({ id: rec.id, offset: r.offset, total: rec.size }, 'uplink: resuming a partially sent message');
    }
    s.resume.delete(rec.id);
    const o: OutMsg = { rec, sentOffset: startOffset, ackedOffset: startOffset, doneAt: 0, pos: 0 };
    s.inflight.set(rec.id, o);
    const meta = wireMeta(rec.meta);
    const payloadSha = Buffer.from(rec.sha256, 'hex');
    if (up.journal.openPayload && rec.size > s.chunkSize) return this.sendFrames(s, epoch, o, meta, payloadSha, startOffset, startSeq);
    const depth = readAheadDepth(s.chunkSize);
    const ranges = chunkRanges(rec.size, s.chunkSize, startOffset, startSeq);
    const ahead: Array<{ range: ChunkRange; read: ChunkRead }> = [];
    const fill = (): void => {
      while (ahead.length < depth) {
        const step = ranges.next();
        if (step.done) return;
        const read = ahead.length === 0 && step.value.offset === 0 && firstRead ? firstRead : this.startRead(rec, step.value.offset, step.value.length);
        ahead.push({ range: step.value, read });
      }
    };
    fill();
    while (ahead.length > 0) {
      const { range, read } = ahead[0]!;
      // byte window: wait while the unacknowledged bytes would exceed it (one chunk always fits into an empty window)
      while (
        up.live(s, epoch) &&
        s.inflight.get(rec.id) === o &&
        ((s.unackedBytes > 0 && s.unackedBytes + range.length > u.window_bytes) || up.conn.holdForToken(s))
      ) {
        await this.idle(s, up.conn.holdForToken(s) ? 50 : u.heartbeat_ms);
      }
      if (!up.live(s, epoch) || s.inflight.get(rec.id) !== o) return; // dropped, rewound, or acknowledged early (duplicate)
      const got = await read;
      ahead.shift();
      fill();
      if (!up.live(s, epoch) || s.inflight.get(rec.id) !== o) return;
      if (got.err !== undefined) throw got.err;
      const data = got.data;
      if (!data) {
        // the record left the journal meanwhile (TTL, overflow, quarantine): nothing to send
        s.inflight.delete(rec.id);
        s.unackedBytes = Math.max(0, s.unackedBytes - (o.sentOffset - o.ackedOffset));
        return;
      }
      if (data.length !== range.length) throw new ConnectorError('ECONN_JOURNAL_IO', `journal returned ${data.length} bytes of message ${rec.id} at ${range.offset}, expected ${range.length}`);
      const c: BatchChunk = { id: rec.id, seq: range.seq, offset: range.offset, total: rec.size, data };
      if (!(range.first && range.last)) c.chunk_sha256 = sha256(data);
      if (range.first) c.meta = meta;
      if (range.last) {
        c.payload_sha256 = payloadSha;
        c.pos = s.lastPos + 1;
      }
      let entry: Buffer;
      try {
        entry = encodeBatchChunk(c);
      } catch (err) {
        if (!(err instanceof WireError)) throw err;
        // the record breaks the protocol's limits (e.g. metadata over the frame limit): it can never be sent
        s.inflight.delete(rec.id);
        s.unackedBytes = Math.max(0, s.unackedBytes - (o.sentOffset - o.ackedOffset));
        this.unencodable(rec, err);
        return;
      }
      this.chunkSent(s, o, range, c.pos);
      await this.append(s, entry);
    }
  }

  /**
   * A message of several chunks, each chunk its own BATCH frame: the frame is sized first (its fields
   * before the data do not depend on the digests), the journal reads the chunk straight into it through
   * one open payload reader, then the chunk digest and the fields are written in front of the data. So a
   * large payload is read once per chunk into the buffer that goes to the socket — no open/close per chunk,
   * no copy into an entry and again into a frame. Same order, window, positions and failure handling as
   * the general path of sendMessage.
   */
  private async sendFrames(s: Session, epoch: number, o: OutMsg, meta: MessageMeta, payloadSha: Buffer, startOffset: number, startSeq: number): Promise<void> {
    const up = this.up;
    const u = up.settings.uplink;
    const rec = o.rec;
    const reader = (up.journal.openPayload as (r: OutboundRecord) => PayloadReader)(rec);
    const drop = (): void => {
      s.inflight.delete(rec.id);
      s.unackedBytes = Math.max(0, s.unackedBytes - (o.sentOffset - o.ackedOffset));
    };
    try {
      const depth = readAheadDepth(s.chunkSize);
      const ranges = chunkRanges(rec.size, s.chunkSize, startOffset, startSeq);
      const ahead: Array<{ range: ChunkRange; frame: Buffer; base: Buffer; at: number; read: Promise<{ err?: unknown }> }> = [];
      // frame buffers of this message are used again once the socket has written them (fewer 256 KiB
      // allocations for the GC to find)
      const cap = chunkFrameCap(s.chunkSize);
      const free: Buffer[] = [];
      const fill = (): void => {
        while (ahead.length < depth) {
          const step = ranges.next();
          if (step.done) return;
          const r = step.value;
          const { at, base, frame } = chunkFrame(rec.id, rec.size, meta, r, cap, free);
          // never rejects: an abandoned read (the message was dropped or rewound) cannot go unhandled
          const read = reader.read(frame, at, r.offset, r.length).then(
            () => ({}),
            (err: unknown) => ({ err }),
          );
          ahead.push({ range: r, frame, base, at, read });
        }
      };
      fill();
      while (ahead.length > 0) {
        const { range, frame, base, at, read } = ahead[0]!;
        while (
          up.live(s, epoch) &&
          s.inflight.get(rec.id) === o &&
          ((s.unackedBytes > 0 && s.unackedBytes + range.length > u.window_bytes) || up.conn.holdForToken(s))
        ) {
          await this.idle(s, up.conn.holdForToken(s) ? 50 : u.heartbeat_ms);
        }
        if (!up.live(s, epoch) || s.inflight.get(rec.id) !== o) return;
        const got = await read;
        ahead.shift();
        fill();
        if (!up.live(s, epoch) || s.inflight.get(rec.id) !== o) return;
        if (got.err !== undefined) {
          const code = errorCode(got.err);
          if (code === 'ECONN_NOT_FOUND') return drop(); // the record left the journal meanwhile: nothing to send
          if (code === 'ECONN_JOURNAL_CORRUPT') {
            up.log.error({ err: got.err, id: rec.id }, 'uplink: a journal record cannot be read back: quarantined');
            drop();
            up.quarantine(rec.id, `unreadable in the journal: ${(got.err as Error).message}`);
            return;
          }
          throw got.err;
        }
        const c: BatchChunkHead = { id: rec.id, seq: range.seq, offset: range.offset, total: rec.size };
        if (!(range.first && range.last)) c.chunk_sha256 = sha256(frame.subarray(at));
        if (range.first) c.meta = meta;
        if (range.last) {
          c.payload_sha256 = payloadSha;
          c.pos = s.lastPos + 1;
        }
        try {
          sealBatchFrame(frame, c, range.length);
        } catch (err) {
          if (!(err instanceof WireError)) throw err;
          drop();
          this.unencodable(rec, err);
          return;
        }
        this.chunkSent(s, o, range, c.pos);
        // what is batched goes first (entries and positions keep their order), then this frame, in the same turn
        const before = this.flush(s);
        const mine = this.writeFrame(s, frame, () => {
          if (base.length === cap && free.length < depth + 2) free.push(base);
        });
        await Promise.all([before, mine]);
      }
    } finally {
      void reader.close();
    }
  }

  /**
   * QoS 0 with bridge.qos0=best_effort (the broker's hook): forwarded at once while the link is up and not
   * congested, never journaled, dropped (counted) otherwise. Not acknowledged to anyone; the cloud's ACK
   * covers its position and is otherwise ignored.
   */
  sendBestEffort(meta: UplinkMessageMeta, payload: Buffer): boolean {
    const up = this.up;
    const s = up.session;
    const hwm = Math.max(1024 * 1024, 2 * (s?.chunkSize ?? 0));
    if (!s || !s.welcomed || s.closing || s.ws.readyState !== WebSocket.OPEN || s.ws.bufferedAmount > hwm || payload.length > 4 * s.chunkSize) {
      up.counts.bestEffortDropped++;
      up.m.bestEffort.inc({ result: 'dropped' });
      return false;
    }
    const id = `be-${randomBytes(16).toString('hex')}`;
    const m = wireMeta(meta);
    const entries: Buffer[] = [];
    try {
      const payloadSha = sha256(payload);
      let pos = s.lastPos;
      for (const r of chunkRanges(payload.length, s.chunkSize)) {
        const data = payload.subarray(r.offset, r.offset + r.length);
        const c: BatchChunk = { id, seq: r.seq, offset: r.offset, total: payload.length, data };
        if (!(r.first && r.last)) c.chunk_sha256 = sha256(data);
        if (r.first) c.meta = m;
        if (r.last) {
          c.payload_sha256 = payloadSha;
          c.pos = ++pos;
        }
        entries.push(encodeBatchChunk(c));
      }
      s.lastPos = pos;
    } catch (err) {
      up.log.warn({ err, deviceId: meta.deviceId }, 'uplink: a best-effort message could not be sent');
      up.counts.bestEffortDropped++;
      up.m.bestEffort.inc({ result: 'dropped' });
      return false;
    }
    // into the session's batch, behind what is queued there (positions must reach the cloud in order)
    for (const e of entries) {
      if (s.batch.length > 0 && (s.batchBytes + e.length > s.maxFrameBytes - HEADER_BYTES || s.batch.length >= LIMITS_V2.maxChunksPerBatch)) void this.flush(s);
      s.batch.push(e);
      s.batchBytes += e.length;
    }
    void this.flush(s);
    up.counts.bestEffortSent++;
    up.m.bestEffort.inc({ result: 'sent' });
    return true;
  }

  /** A payload range from the journal; undefined when the record is gone; an unreadable record is quarantined (it must not block the queue). */
  private async readChunk(rec: OutboundRecord, offset: number, length: number): Promise<Buffer | undefined> {
    const up = this.up;
    try {
      return await up.journal.readPayload(rec, offset, offset + length);
    } catch (err) {
      const code = errorCode(err);
      if (code === 'ECONN_NOT_FOUND') return undefined;
      if (code === 'ECONN_JOURNAL_CORRUPT') {
        up.log.error({ err, id: rec.id }, 'uplink: a journal record cannot be read back: quarantined');
        up.quarantine(rec.id, `unreadable in the journal: ${(err as Error).message}`);
        return undefined;
      }
      throw err;
    }
  }
}
