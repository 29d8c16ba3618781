/**
 * WSS /subscribe: cloud consumers receive stored messages as JSON text frames.
 *
 * The filters (MQTT-style, `+` one level, `#` the rest) come as query
 * parameters: /subscribe?filter=devices/%2B/telemetry&filter=…&from_start=1.
 * Every stored message that matches is sent once, in store order, as
 *   {"type":"message","seq","id","gateway_id","device_id","topic","qos","size",
 *    "sha256","received_at","stored_at","content_type"?,"payload"?}
 * with `payload` (base64) for payloads up to 64 KiB. With from_start=1 the
 * index is replayed first, then {"type":"replayed","count":N} marks the switch
 * to live messages (no gap, no duplicate at the switch). Live messages are
 * fed from memory (the store's bounded ring of recent payloads); a replay
 * streams the segments. A subscriber that is caught up gets each message as it
 * is stored, its JSON built once for all such subscribers from the meta JSON the
 * store has just written; one that is behind queues the entry and builds the
 * text when it gets to it. A subscriber that falls more than MAX_QUEUE messages
 * behind is closed with 4029.
 */
import type { WebSocket } from 'ws';
import type { Logger } from '../core/logger.js';
import { corkUntilNextTick } from '../core/net.js';
import { compileFilter } from '../core/topic.js';
import type { CloudStore, StoredEntry } from './store.js';
import { storedFields } from './store/format.js';

export const INLINE_PAYLOAD_MAX = 64 * 1024;
const MAX_QUEUE = 100_000;
export const CLOSE_TOO_SLOW = 4029;

/** Validate an MQTT topic filter; returns an error text or undefined. */
export function filterError(f: string): string | undefined {
  if (f.length === 0 || Buffer.byteLength(f) > 4096) return 'filter must be 1..4096 bytes';
  if (f.includes('\u0000')) return 'filter must not contain NUL';
  const levels = f.split('/');
  for (const [i, l] of levels.entries()) {
    if (l.includes('#') && (l !== '#' || i !== levels.length - 1)) return '"#" must be a whole last level';
    if (l.includes('+') && l !== '+') return '"+" must be a whole level';
  }
  return undefined;
}

/** Send without waiting for each frame's write callback while less than this is buffered. */
const HIGH_WATER_BYTES = 4 * 1024 * 1024;

/**
 * The JSON text of a stored message as subscribers receive it (the same text for every subscriber).
 * The base64 payload, last, is appended to the text of the other fields rather than passed through
 * JSON.stringify: base64 needs no escaping, and stringify scanned and copied it once more — for a
 * 4 KiB payload that was 12 of the 16 µs this costs per message (measured on Node 20).
 * `meta`, the store's record meta of the entry (recordMeta: JSON.stringify(storedFields(e)), the
 * same fields in the same order), spares stringifying the fields a second time; it is not used for
 * a message stored as a blob, whose record meta also names its file.
 */
export function messageText(e: StoredEntry, payload: Buffer | undefined, meta?: string): string {
  const head = meta !== undefined && e.payload_file === undefined ? `{"type":"message",${meta.slice(1)}` : JSON.stringify(storedFields(e, { type: 'message' }));
  if (payload === undefined || e.size > INLINE_PAYLOAD_MAX) return head;
  return `${head.slice(0, -1)},"payload":"${payload.toString('base64')}"}`;
}

/**
 * ws writes every frame to its socket at once: one TLS record and one write syscall per message
 * (on loopback the write also runs the subscriber's TCP receive path). A group commit stores many
 * messages in one turn of the event loop, so the subscriber's socket is corked for that turn
 * (corkUntilNextTick) and its frames leave in one writev. ws keeps its socket as `_socket`
 * (test/cloud/subscribers.test.ts checks it is there).
 */
function socketOf(ws: WebSocket): { cork(): void; uncork(): void } | undefined {
  const s = (ws as unknown as { _socket?: { cork?: unknown; uncork?: unknown } })._socket;
  return s && typeof s.cork === 'function' && typeof s.uncork === 'function' ? (s as { cork(): void; uncork(): void }) : undefined;
}

class Subscriber {
  private queue: StoredEntry[] = [];
  private head = 0;
  private running = false;
  private closed = false;
  private replaying: boolean;
  private readonly replayUpTo: number;
  private readonly matchers: Array<(topic: string) => boolean>;

  constructor(
    private readonly ws: WebSocket,
    filters: string[],
    fromStart: boolean,
    private readonly store: CloudStore,
    private readonly log: Logger,
  ) {
    this.replaying = fromStart;
    this.replayUpTo = fromStart ? store.count : 0;
    this.matchers = filters.map(compileFilter);
  }

  matches(e: StoredEntry): boolean {
    for (const m of this.matchers) if (m(e.topic)) return true;
    return false;
  }

  /** A newly stored message (live) is for this subscriber. */
  wants(e: StoredEntry): boolean {
    return !this.closed && e.seq > this.replayUpTo && this.matches(e);
  }

  /** Nothing queued, replayed or waiting for the socket: a live message can be sent at once. */
  caughtUp(): boolean {
    return !this.running && this.head === this.queue.length && !this.replaying && this.ws.readyState === this.ws.OPEN && this.ws.bufferedAmount < HIGH_WATER_BYTES;
  }

  /** A live message this subscriber wants, sent at once (caughtUp() is true). */
  sendNow(text: string): void {
    void this.send(text);
  }

  /** A live message this subscriber wants, queued behind what it has not been sent yet. */
  offer(e: StoredEntry): void {
    if (this.queue.length - this.head >= MAX_QUEUE) {
      this.log.warn('subscriber too slow: closing');
      this.close(CLOSE_TOO_SLOW, 'subscriber too slow');
      return;
    }
    this.queue.push(e);
    if (!this.replaying) void this.pump();
  }

  async start(): Promise<void> {
    if (this.replaying) {
      let n = 0;
      try {
        // replayed from the segments on disk (streamed, inline payloads read in the same pass)
        for await (const r of this.store.replayWithPayloads(this.replayUpTo)) {
          if (this.closed) return;
          if (!this.matches(r.entry)) continue;
          const payload = r.payload ?? (r.entry.size <= INLINE_PAYLOAD_MAX ? await this.store.readPayload(r.entry) : undefined);
          await this.send(messageText(r.entry, payload));
          n++;
        }
      } catch (err) {
        this.log.error({ err }, 'subscriber replay failed');
        this.close(1011, 'replay failed');
        return;
      }
      await this.sendJson({ type: 'replayed', count: n });
      this.replaying = false;
    }
    void this.pump();
  }

  private async pump(): Promise<void> {
    if (this.running) return;
    this.running = true;
    try {
      while (!this.closed && this.head < this.queue.length) {
        const e = this.queue[this.head++]!;
        if (this.head >= 1024 && this.head * 2 >= this.queue.length) {
          this.queue = this.queue.slice(this.head);
          this.head = 0;
        }
        // recent payloads are in memory (the store's ring); older ones are read from disk
        const payload = e.size <= INLINE_PAYLOAD_MAX ? (this.store.cachedPayload(e) ?? (await this.store.readPayload(e))) : undefined;
        const waiting = this.send(messageText(e, payload));
        if (waiting) await waiting;
      }
    } catch (err) {
      this.log.warn({ err }, 'subscriber delivery failed: closing');
      this.close(1011, 'delivery failed');
    } finally {
      this.running = false;
    }
  }

  /**
   * Send a frame. Returns a promise to wait for only while the socket buffers more than
   * HIGH_WATER_BYTES (resolved once this frame is written); otherwise nothing, so the
   * common case costs no promise and no microtask per message.
   */
  private send(text: string): Promise<void> | undefined {
    if (this.closed || this.ws.readyState !== this.ws.OPEN) return undefined;
    if (this.ws.bufferedAmount < HIGH_WATER_BYTES) {
      const sock = socketOf(this.ws);
      if (sock) corkUntilNextTick(sock);
      this.ws.send(text, this.onSent);
      return undefined;
    }
    return this.sendJsonText(text);
  }

  private readonly onSent = (err?: Error): void => {
    if (err) this.close(1011, 'send failed');
  };

  private sendJson(o: unknown): Promise<void> {
    return this.sendJsonText(JSON.stringify(o));
  }

  private sendJsonText(text: string): Promise<void> {
    return new Promise((resolve) => {
      if (this.closed || this.ws.readyState !== this.ws.OPEN) return resolve();
      this.ws.send(text, (err) => {
        if (err) this.close(1011, 'send failed');
        resolve();
      });
    });
  }

  close(code: number, reason: string): void {
    if (this.closed) return;
    this.closed = true;
    this.queue = [];
    this.head = 0;
    try {
      this.ws.close(code, reason);
    } catch {
      this.ws.terminate();
    }
  }

  markClosed(): void {
    this.closed = true;
    this.queue = [];
    this.head = 0;
  }
}

export class SubscriberHub {
  private readonly subs = new Set<Subscriber>();
  /**
   * A message is stored: sent at once to the subscribers that are caught up, its text built once
   * for all of them (from `meta`, the record meta the store wrote, and the payload, still in the
   * store's ring); queued for the others. A payload no longer in memory (a ring too small for a
   * round) is read from disk by each subscriber's queue instead.
   */
  private readonly onStored = (e: StoredEntry, meta?: string): void => {
    let text: string | undefined;
    let payload: Buffer | undefined;
    let inMemory = true;
    for (const s of this.subs) {
      if (!s.wants(e)) continue;
      if (text === undefined && inMemory && s.caughtUp()) {
        payload = e.size <= INLINE_PAYLOAD_MAX ? this.store.cachedPayload(e) : undefined;
        inMemory = payload !== undefined || e.size > INLINE_PAYLOAD_MAX;
        if (inMemory) text = messageText(e, payload, meta);
      }
      if (text !== undefined && s.caughtUp()) s.sendNow(text);
      else s.offer(e);
    }
  };

  constructor(
    private readonly store: CloudStore,
    private readonly log: Logger,
  ) {
    store.on('stored', this.onStored);
  }

  get size(): number {
    return this.subs.size;
  }

  attach(ws: WebSocket, filters: string[], fromStart: boolean, remote: string): void {
    const log = this.log.child({ subscriber: remote });
    const sub = new Subscriber(ws, filters, fromStart, this.store, log);
    this.subs.add(sub);
    ws.on('close', () => {
      sub.markClosed();
      this.subs.delete(sub);
    });
    ws.on('error', () => undefined);
    // inbound frames are not part of the API; ignore them
    ws.on('message', () => undefined);
    log.info({ filters, from_start: fromStart }, 'subscriber attached');
    void sub.start();
  }

  close(): void {
    this.store.off('stored', this.onStored);
    for (const s of this.subs) s.close(1001, 'cloud shutting down');
    this.subs.clear();
  }
}
