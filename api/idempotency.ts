/**
 * Memory of upload answers by `Idempotency-Key`, so a device that lost a 202
 * and sends the same upload again gets the same answer (same message id)
 * instead of a second journal record.
 *
 * Bounded: at most `maxEntries` keys (the oldest is forgotten first) and each
 * for at most `windowMs`; so memory stays under roughly maxEntries × 400 bytes.
 * Not persisted: after a daemon restart a repeat is journaled again (and gets a
 * new message id). Keys are scoped to the device: one device cannot see or
 * block another's keys.
 */
import { ConnectorError } from '../core/errors.js';

export interface StoredAnswer {
  message_id: string;
  size: number;
  sha256: string;
}

interface Entry {
  at: number;
  topic: string;
  /** undefined while the first request is in progress */
  answer?: StoredAnswer;
}

/** Visible ASCII without spaces, 1..255 characters (RFC draft-ietf-httpapi-idempotency-key-header: a string, often a UUID). */
export const IDEMPOTENCY_KEY_RE = /^[\x21-\x7e]{1,255}$/;

export class IdempotencyCache {
  private readonly entries = new Map<string, Entry>();

  constructor(
    private readonly opts: { maxEntries: number; windowMs: number; now: () => number },
  ) {}

  get size(): number {
    return this.entries.size;
  }

  private slot(deviceId: string, key: string): string {
    return `${deviceId}\n${key}`;
  }

  private expire(): void {
    const cutoff = this.opts.now() - this.opts.windowMs;
    // insertion order = age order: stop at the first young entry (bounded by the map size)
    for (const [k, e] of this.entries) {
      if (e.at > cutoff) break;
      if (e.answer) this.entries.delete(k);
      else break;
    }
  }

  /**
   * Look a key up before an upload. Returns the stored answer for a repeat, or
   * undefined when the caller should go ahead (the key is then marked in progress
   * until finish() or abandon()). Throws ECONN_IDEMPOTENCY_CONFLICT while the first
   * request with this key is still running, or when the key was used for another topic.
   */
  begin(deviceId: string, key: string, topic: string): StoredAnswer | undefined {
    this.expire();
    const slot = this.slot(deviceId, key);
    const e = this.entries.get(slot);
    if (e) {
      if (!e.answer) throw new ConnectorError('ECONN_IDEMPOTENCY_CONFLICT', 'a request with this Idempotency-Key is still in progress; retry with the same key once it is answered');
      if (e.topic !== topic) throw new ConnectorError('ECONN_IDEMPOTENCY_CONFLICT', 'this Idempotency-Key was used for an upload to another topic; use a new key for a new message');
      return e.answer;
    }
    while (this.entries.size >= this.opts.maxEntries) {
      const oldest = this.entries.keys().next();
      if (oldest.done) break;
      this.entries.delete(oldest.value);
    }
    this.entries.set(slot, { at: this.opts.now(), topic });
    return undefined;
  }

  /** Record the answer of the request that began with this key. */
  finish(deviceId: string, key: string, answer: StoredAnswer): void {
    const slot = this.slot(deviceId, key);
    const e = this.entries.get(slot);
    if (!e) return; // evicted meanwhile: nothing to remember
    e.answer = answer;
    // the window runs from the answer, not from the start of a long upload
    this.entries.delete(slot);
    this.entries.set(slot, { ...e, at: this.opts.now() });
  }

  /** The request failed: forget the key so a retry runs again. */
  abandon(deviceId: string, key: string): void {
    const slot = this.slot(deviceId, key);
    const e = this.entries.get(slot);
    if (e && !e.answer) this.entries.delete(slot);
  }
}
