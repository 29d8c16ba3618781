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
 * fed from memory (the store's bounded ring of recent payloads, each message's
 * JSON built once for all subscribers); a replay streams the segments. A
 * subscriber that falls more than MAX_QUEUE messages behind is closed with 4029.
 */
import type { WebSocket } from 'ws';
import type { Logger } from '../core/logger.js';
import { corkUntilNextTick } from '../core/net.js';
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

/** MQTT topic matching (filters starting with a wildcard do not match topics starting with "$"). */
export function topicMatches(filter: string, topic: string): boolean {
  const f = filter.split('/');
  const t = topic.split('/');
  if ((f[0] === '+' || f[0] === '#') && topic.startsWith('$')) return false;
  for (let i = 0; i < f.length; i++) {
    if (f[i] === '#') return true;
    if (i >= t.length) return false;
    if (f[i] !== '+' && f[i] !== t[i]) return false;
  }
  return f.length === t.length;
}

/** Send without waiting for each frame's write callback while less than this is buffered. */
const HIGH_WATER_BYTES = 4 * 1024 * 1024;

/**
 * The JSON text of a stored message as subscribers receive it (the same text for every subscriber).
 * The base64 payload, last, is appended to the text of the other fields rather than passed through
 * JSON.stringify: base64 needs no escaping, and stringify scanned and copied it once more — for a
 * 4 KiB payload that was 12 of the 16 µs this costs per message (measured on Node 20).
 */
export function messageText(e: StoredEntry, payload: Buffer | undefined): string {
  const head = JSON.stringify(storedFields(e, { type: 'message' }));
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

  constructor(
    private readonly ws: WebSocket,
    private readonly filters: string[],
    fromStart: boolean,
    private readonly store: CloudStore,
    private readonly texts: WeakMap<StoredEntry, string>,
    private readonly log: Logger,
  ) {
    this.replaying = fromStart;
    this.replayUpTo = fromStart ? store.count : 0;
  }

  matches(e: StoredEntry): boolean {
    return this.filters.some((f) => topicMatches(f, e.topic));
  }

  /** A newly stored message (live). */
  offer(e: StoredEntry): void {
    if (this.closed || e.seq <= this.replayUpTo || !this.matches(e)) return;
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
        let text = this.texts.get(e);
        if (text === undefined) {
          // live messages are fed from memory (the store's ring of recent payloads); older ones from disk
          const payload = e.size <= INLINE_PAYLOAD_MAX ? (this.store.cachedPayload(e) ?? (await this.store.readPayload(e))) : undefined;
          text = messageText(e, payload);
          this.texts.set(e, text);
        }
        await this.send(text);
      }
    } catch (err) {
      this.log.warn({ err }, 'subscriber delivery failed: closing');
      this.close(1011, 'delivery failed');
    } finally {
      this.running = false;
    }
  }

  /** Send a frame; waits for it to be written only while the socket buffers more than HIGH_WATER_BYTES. */
  private send(text: string): Promise<void> {
    if (this.closed || this.ws.readyState !== this.ws.OPEN) return Promise.resolve();
    if (this.ws.bufferedAmount < HIGH_WATER_BYTES) {
      const sock = socketOf(this.ws);
      if (sock) corkUntilNextTick(sock);
      this.ws.send(text, (err) => {
        if (err) this.close(1011, 'send failed');
      });
      return Promise.resolve();
    }
    return this.sendJsonText(text);
  }

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
  /** The JSON text of each live message, built once for all subscribers (dropped with the entry). */
  private readonly texts = new WeakMap<StoredEntry, string>();
  private readonly onStored = (e: StoredEntry): void => {
    for (const s of this.subs) s.offer(e);
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
    const sub = new Subscriber(ws, filters, fromStart, this.store, this.texts, log);
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
