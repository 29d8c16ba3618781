/**
 * Uploads sent upstream while they still arrive (issue 11; docs/PROTOCOL.md §13.10, feature `stream`).
 *
 * The journal hands over an upload of known length as soon as it starts to be staged
 * (bridge/journal/upload.ts). When the cloud confirmed the `stream` feature, its chunks go out as the
 * journal writes them — each as a BATCH frame of its own, read from the staging file straight into the
 * frame, at the pace of the slower of the disk and the link (the socket's back-pressure) — so that
 * receiving the body and sending it overlap instead of running one after the other.
 *
 * Never the last chunk: it carries the payload digest and the position that makes the cloud store the
 * message, and it waits for the journal's commit (the 202's durability). Once the record is committed
 * the sender takes the message over where this left off (Sender.sendMessage, `takeOver`) and sends the
 * rest, last chunk included, at its turn in journal order.
 *
 * An upload that ends without a record (cut off, too large, wrong digest, journal error) is DISCARDed,
 * so the cloud drops what it received and stores nothing of it. One streamed on a connection that is
 * gone is DISCARDed after the next WELCOME that lists it; one the cloud holds after a crash of the
 * daemon is DISCARDed at the next WELCOME too (no record of that id exists), and the cloud expires it
 * anyway (partial_ttl_s). A REJECT of a message being streamed stops it and DISCARDs it: the record,
 * once committed, is sent from its first chunk like any other.
 */
import { WebSocket } from 'ws';
import { WireError, chunkRanges, sha256, type ChunkRange } from '../../protocol/codec.js';
import { FEATURE_STREAM, sealBatchFrame, type BatchChunkHead } from '../../protocol/v2.js';
import type { IncomingUpload } from '../journal/upload.js';
import type { UplinkCore } from './core.js';
import { chunkFrame, chunkFrameCap, readAheadDepth, wireMeta } from './sender.js';
import type { Session, StreamState } from './types.js';

/** Aborted uploads remembered for a DISCARD after the next WELCOME (bounded: the cloud expires the rest). */
const MAX_REMEMBERED = 1024;
/**
 * How far the body of a streamed upload may run ahead of the link (at least 4 chunks): enough to keep the
 * link busy across the journal's 1 MiB writes, small enough that little is left to send after the 202.
 */
const LEAD_BYTES = 16 * 1024 * 1024;
/** Bytes of frame buffers kept for reuse (at least two buffers, whatever the chunk size). */
const FREE_BYTES = 8 * 1024 * 1024;

export { FEATURE_STREAM };

export class Streamer {
  /** Uploads arriving now, by id: a WELCOME partial of one of them is not garbage. */
  private readonly arriving = new Map<string, IncomingUpload>();
  /** Aborted uploads the cloud may still hold (streamed on a connection that is gone). */
  private readonly toDiscard = new Set<string>();

  constructor(private readonly up: UplinkCore) {}

  /** The journal's 'upload' listener. */
  readonly onUpload = (u: IncomingUpload): void => {
    this.arriving.set(u.id, u);
    u.once('end', (state: string) => {
      this.arriving.delete(u.id);
      if (state === 'aborted') this.aborted(u.id);
    });
    const s = this.up.session;
    if (!s || !s.welcomed || s.closing || !s.streamFeature) return; // sent once committed, as before
    if (u.total <= s.chunkSize || u.total > s.maxMessageBytes) return; // one chunk (it is the last one), or the cloud refuses it anyway
    this.run(s, u).catch((err: unknown) => {
      // not fatal: what was sent stays valid, the sender takes over from there once the record is committed
      this.up.log.debug({ err, id: u.id }, 'uplink: streaming an upload while it arrives stopped');
    });
  };

  /** A WELCOME: DISCARD partials the cloud holds of messages this connector will never complete. */
  onWelcome(s: Session, partials: ReadonlyArray<{ id: string }>): void {
    if (!s.streamFeature) return;
    const has = this.up.journal.has?.bind(this.up.journal);
    for (const p of partials) {
      const orphan = this.toDiscard.has(p.id) || (has !== undefined && !has(p.id) && !this.arriving.has(p.id));
      if (!orphan) continue;
      this.toDiscard.delete(p.id);
      s.resume.delete(p.id);
      this.up.sendControl(s, { type: 'DISCARD', id: p.id });
      this.up.log.info({ id: p.id }, 'uplink: the cloud holds part of a message this connector will never complete: discarded');
    }
  }

  /** A REJECT for a message being streamed: stop it and DISCARD what the cloud holds; true when it was one. */
  onReject(s: Session, id: string, reason: string): boolean {
    const st = s.streams.get(id);
    if (!st || s.inflight.has(id)) return false;
    st.stop = true;
    s.streams.delete(id);
    s.resume.delete(id);
    // the cloud blocks the device's later messages behind a message REJECTed for retry until it is complete; a
    // DISCARD lifts that, and the committed record goes out from its first chunk at its turn
    this.up.sendControl(s, { type: 'DISCARD', id });
    this.up.log.info({ id, reason }, 'uplink: the cloud refused an upload streamed while it arrives: discarded there, sent whole once committed');
    return true;
  }

  /** The sender reached the committed record: stop streaming it; where to go on from, if anything was sent. */
  takeOver(s: Session, id: string, total: number): { offset: number; nextSeq: number } | undefined {
    const st = s.streams.get(id);
    if (!st) return undefined;
    st.stop = true;
    s.streams.delete(id);
    return st.sentOffset > 0 && st.total === total ? { offset: st.sentOffset, nextSeq: st.nextSeq } : undefined;
  }

  private aborted(id: string): void {
    const s = this.up.session;
    const st = s?.streams.get(id);
    if (st) {
      st.stop = true;
      s!.streams.delete(id);
    }
    if (s && s.welcomed && !s.closing && s.streamFeature && s.ws.readyState === WebSocket.OPEN && (st !== undefined || s.resume.has(id))) {
      // behind every chunk of it already handed to this socket: the cloud handles frames in order
      s.resume.delete(id);
      this.up.sendControl(s, { type: 'DISCARD', id });
      this.up.log.info({ id, sentBytes: st?.sentOffset ?? 0 }, 'uplink: an upload streamed while it arrived was aborted: discarded at the cloud');
      return;
    }
    if (this.toDiscard.size >= MAX_REMEMBERED) this.toDiscard.delete(this.toDiscard.values().next().value as string);
    this.toDiscard.add(id);
  }

  private async run(s: Session, u: IncomingUpload): Promise<void> {
    const st: StreamState = { id: u.id, total: u.total, sentOffset: 0, nextSeq: 0, stop: false };
    s.streams.set(u.id, st);
    u.startStreaming(Math.max(LEAD_BYTES, 4 * s.chunkSize));
    try {
      await this.send(s, u, st);
    } finally {
      u.stopStreaming();
    }
  }

  private async send(s: Session, u: IncomingUpload, st: StreamState): Promise<void> {
    const up = this.up;
    const meta = wireMeta(u.meta);
    // frame buffers are used again once the socket has written them (as in Sender.sendFrames): a 1 GiB upload
    // would otherwise allocate 4 096 of 256 KiB for the GC to find
    const cap = chunkFrameCap(s.chunkSize);
    const free: Buffer[] = [];
    const keep = Math.max(2, Math.floor(FREE_BYTES / cap));
    const live = (): boolean => !st.stop && up.session === s && !s.closing && s.ws.readyState === WebSocket.OPEN && u.state === 'receiving';
    // reads of written chunks in flight ahead of the socket (as Sender.sendFrames does): one read at a time left
    // the link waiting for a thread-pool round trip per chunk, which a busy machine makes long
    const depth = readAheadDepth(s.chunkSize);
    const ranges = chunkRanges(u.total, s.chunkSize);
    let next = ranges.next();
    const ahead: Array<{ r: ChunkRange; base: Buffer; frame: Buffer; at: number; read: Promise<{ err?: unknown }> }> = [];
    const fill = (): void => {
      // never the last chunk: it waits for the commit, and the sender sends it from the record
      while (ahead.length < depth && !next.done && !next.value.last && u.written >= next.value.offset + next.value.length) {
        const r = next.value;
        next = ranges.next();
        const { at, base, frame } = chunkFrame(u.id, u.total, meta, r, cap, free);
        // never rejects: an abandoned read (the upload ended, the link went) cannot go unhandled
        const read = u.read(frame, at, r.offset, r.length).then(
          () => ({}),
          (err: unknown) => ({ err }),
        );
        ahead.push({ r, base, frame, at, read });
      }
    };
    for (;;) {
      fill();
      if (ahead.length === 0) {
        if (next.done || next.value.last || !live()) return;
        await this.progress(u); // the journal has not written the next chunk yet
        continue;
      }
      while (live() && up.conn.holdForToken(s)) await up.waitWake(50);
      if (!live()) return;
      const { r, base, frame, at, read } = ahead.shift()!;
      const got = await read;
      if (!live()) return; // committed (the sender goes on from sentOffset), aborted, or the link went
      if (got.err !== undefined) throw got.err;
      fill();
      const c: BatchChunkHead = { id: u.id, seq: r.seq, offset: r.offset, total: u.total, chunk_sha256: sha256(frame.subarray(at)) };
      if (r.first) c.meta = meta;
      try {
        sealBatchFrame(frame, c, r.length);
      } catch (err) {
        if (err instanceof WireError) return; // the record will fail the same way in the sender, which quarantines it
        throw err;
      }
      st.sentOffset = r.offset + r.length;
      st.nextSeq = r.seq + 1;
      up.counts.bytesSent += r.length;
      up.m.bytesSent.inc(r.length);
      // what is batched goes first, then this frame, in the same turn (as Sender.sendFrames does)
      const written = (): void => {
        if (base.length === cap && free.length < keep) free.push(base);
      };
      await Promise.all([up.sender.flush(s), up.sender.writeFrame(s, frame, written)]);
      u.noteSent(st.sentOffset);
    }
  }

  /** Until the journal wrote more of the upload, it ended, or a second passed (the session may have gone). */
  private progress(u: IncomingUpload): Promise<void> {
    return new Promise((resolve) => {
      const done = (): void => {
        clearTimeout(t);
        u.off('progress', done);
        u.off('end', done);
        resolve();
      };
      const t = setTimeout(done, 1000);
      u.on('progress', done);
      u.on('end', done);
    });
  }
}
