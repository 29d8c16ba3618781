/**
 * Redelivery table: stops a device's QoS 1 redelivery from being journaled twice, without ever
 * dropping a genuinely new message.
 *
 * The broker journals a bridged QoS 1 PUBLISH and sends the PUBACK only after the append
 * resolved. When the connection ends before that PUBACK was written (the append was still
 * pending, or it resolved after the socket closed), the device never got it and re-sends the
 * same PUBLISH on its next connection with DUP 1 and the same packet id (MQTT-4.4.0-1).
 * Without this table it would be journaled again under a new message id and the cloud would
 * store it twice.
 *
 * Only UNACKNOWLEDGED publishes are remembered: the broker moves a session's publishes whose
 * PUBACK was never written into this table when the session ends (Broker.endSession). A publish
 * that was acknowledged is never here, so a device that reuses the packet id afterwards (which
 * MQTT-2.3.1-3 allows) for the same topic and payload, even with DUP 1, is journaled as the new
 * message it is. Per entry: topic, payload length and SHA-256 (computed once, when the entry is
 * made, never per message on the hot path), and the original append (a redelivery that arrives
 * while it is still pending waits for it instead of appending again).
 *
 * A PUBLISH is treated as a redelivery (PUBACK without a new append) only when ALL hold:
 *  - it carries DUP 1 (MQTT-3.3.1-1: a client sets DUP on every re-delivery), and
 *  - an entry for the same device (client id = device id) and packet id exists, younger than
 *    `maxAgeMs`, and
 *  - topic, payload length and payload SHA-256 are identical.
 * A matched entry is taken out of the table (its redelivery is now what is pending; if that one
 * loses its PUBACK too, the broker puts it back). Anything else is appended. A DUP 0 PUBLISH
 * with the packet id of an entry removes the entry (the device moved on).
 *
 * Bounds (documented in docs/devices.md): `perDevice` entries per device (default 64, the oldest
 * is evicted), `maxAgeMs` (default 10 min; older entries neither match nor survive a sweep),
 * `maxDevices` devices (default 10 000; the least recently used device's table is evicted).
 *
 * Across a restart: each journaled QoS 1 record keeps its packet id in its meta, and the broker
 * seeds this table at start from the journal's newest unacknowledged records
 * (DeviceSessions.rememberJournaled in broker/hooks.ts: what the table would hold, no more).
 * Whether the previous process wrote their PUBACKs is unknown, so seeded entries are honoured
 * only during the device's FIRST connection after the start (when a client re-sends what it
 * has in flight, MQTT-4.4.0-1) and are dropped when that connection ends. Not covered
 * (journaled and delivered a second time, never lost): a PUBACK written but lost on the wire, a
 * redelivery from a client that does not set DUP 1, or one later than `maxAgeMs` or after more
 * than `perDevice` newer unacknowledged messages of the same device, or (across a restart) of a
 * record followed by more than SEED_MAX_RECORDS newer records in the journal.
 */
import { hash } from 'node:crypto';

export interface RedeliveryOptions {
  /** entries kept per device (most recent packet ids); default 64 */
  perDevice?: number;
  /** entries older than this never match (ms); default 10 minutes */
  maxAgeMs?: number;
  /** device tables kept at most (least recently used evicted); default 10 000 */
  maxDevices?: number;
  now?: () => number;
}

export interface RedeliveryEntry {
  topic: string;
  length: number;
  sha256: string;
  at: number;
  /** the append of the original; settles when it is durable (or failed) */
  done: Promise<unknown>;
  /** from the journal at start: honoured only during the device's first connection */
  seeded?: boolean;
}

export const REDELIVERY_DEFAULTS = { perDevice: 64, maxAgeMs: 10 * 60_000, maxDevices: 10_000 } as const;

export function payloadDigest(payload: Buffer): string {
  return hash('sha256', payload, 'hex');
}

export class RedeliveryTable {
  private readonly perDevice: number;
  private readonly maxAgeMs: number;
  private readonly maxDevices: number;
  private readonly now: () => number;
  /** device id → (packet id → entry); Map iteration order = insertion order, used for LRU/oldest */
  private readonly devices = new Map<string, Map<number, RedeliveryEntry>>();
  private sinceSweep = 0;

  constructor(opts: RedeliveryOptions = {}) {
    this.perDevice = Math.max(1, opts.perDevice ?? REDELIVERY_DEFAULTS.perDevice);
    this.maxAgeMs = Math.max(0, opts.maxAgeMs ?? REDELIVERY_DEFAULTS.maxAgeMs);
    this.maxDevices = Math.max(1, opts.maxDevices ?? REDELIVERY_DEFAULTS.maxDevices);
    this.now = opts.now ?? Date.now;
  }

  /** The table's bounds (the broker seeds at most this much from the journal at start). */
  get limits(): { perDevice: number; maxAgeMs: number; maxDevices: number } {
    return { perDevice: this.perDevice, maxAgeMs: this.maxAgeMs, maxDevices: this.maxDevices };
  }

  /**
   * The unacknowledged entry a DUP 1 PUBLISH is a redelivery of, or undefined (then it must be
   * appended). The payload is hashed only when an entry with the same topic and length exists.
   */
  match(deviceId: string, packetId: number, topic: string, payload: Buffer): RedeliveryEntry | undefined {
    const t = this.devices.get(deviceId);
    const e = t?.get(packetId);
    if (!t || !e) return undefined;
    if (this.now() - e.at > this.maxAgeMs) {
      t.delete(packetId);
      if (t.size === 0) this.devices.delete(deviceId);
      return undefined;
    }
    if (e.topic !== topic || e.length !== payload.length || e.sha256 !== payloadDigest(payload)) return undefined;
    return e;
  }

  /** Is anything remembered for this device? (one Map lookup: the hot path asks before doing more) */
  has(deviceId: string): boolean {
    return this.devices.has(deviceId);
  }

  /** Remember a journaled (or being journaled) QoS 1 PUBLISH; replaces an older entry for the packet id. */
  remember(deviceId: string, packetId: number, entry: Omit<RedeliveryEntry, 'at'>): RedeliveryEntry {
    if (++this.sinceSweep >= 1024) {
      this.sinceSweep = 0;
      this.sweep();
    }
    let t = this.devices.get(deviceId);
    if (t) {
      this.devices.delete(deviceId); // re-insert: most recently used last
    } else {
      t = new Map();
    }
    this.devices.set(deviceId, t);
    const e: RedeliveryEntry = { ...entry, at: this.now() };
    t.delete(packetId);
    t.set(packetId, e);
    while (t.size > this.perDevice) t.delete(t.keys().next().value!);
    while (this.devices.size > this.maxDevices) this.devices.delete(this.devices.keys().next().value!);
    return e;
  }

  /** Forget the entry of a packet id (taken by its redelivery, or the device moved on); only `entry` when given. */
  forget(deviceId: string, packetId: number, entry?: RedeliveryEntry): void {
    const t = this.devices.get(deviceId);
    if (!t || (entry !== undefined && t.get(packetId) !== entry)) return;
    t.delete(packetId);
    if (t.size === 0) this.devices.delete(deviceId);
  }

  /** Drop a device's entries seeded from the journal (its first connection after the start ended). */
  forgetSeeded(deviceId: string): void {
    const t = this.devices.get(deviceId);
    if (!t) return;
    for (const [pid, e] of t) if (e.seeded) t.delete(pid);
    if (t.size === 0) this.devices.delete(deviceId);
  }

  /** Drop a device's table (device revoked or deleted). */
  forgetDevice(deviceId: string): void {
    this.devices.delete(deviceId);
  }

  /** Drop expired entries (called periodically; bounded by the table size). */
  sweep(): void {
    const limit = this.now() - this.maxAgeMs;
    for (const [id, t] of this.devices) {
      for (const [pid, e] of t) if (e.at < limit) t.delete(pid);
      if (t.size === 0) this.devices.delete(id);
    }
  }

  /** entries held, over all devices (status/tests) */
  get size(): number {
    let n = 0;
    for (const t of this.devices.values()) n += t.size;
    return n;
  }
}
