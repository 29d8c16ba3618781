/**
 * Redelivery table: stops a device's QoS 1 redelivery from being journaled twice.
 *
 * The broker journals a bridged QoS 1 PUBLISH and sends the PUBACK only after the append
 * resolved. When the PUBACK is lost (the connection drops after the append), the device
 * re-sends the same PUBLISH on its next connection with DUP 1 and the same packet id
 * (MQTT-4.4.0-1). Without this table it would be journaled again under a new message id and
 * the cloud would store it twice.
 *
 * Per device we remember the recent journaled QoS 1 PUBLISHes by packet id: topic, payload
 * SHA-256 and length, the journal's message id, and the append itself (a redelivery that
 * arrives while the original append is still pending waits for it instead of appending again).
 *
 * A PUBLISH is treated as a redelivery (PUBACK without a new append) only when ALL hold:
 *  - it carries DUP 1 (MQTT-3.3.1-1: a client sets DUP on every re-delivery), and
 *  - an entry for the same device and packet id exists, younger than `maxAgeMs`, and
 *  - topic, payload length and payload SHA-256 are identical.
 * Anything else is appended: a genuinely new message is never dropped. A DUP 0 PUBLISH that
 * reuses a packet id (the device got the PUBACK, MQTT-2.3.1-3) replaces the entry.
 *
 * Bounds (documented in docs/devices.md): `perDevice` entries per device (default 64, the oldest
 * is evicted), `maxAgeMs` (default 10 min; older entries neither match nor survive a sweep),
 * `maxDevices` devices (default 10 000; the least recently used device's table is evicted).
 * Entries outlive a connection on purpose: the redelivery arrives on the NEXT connection.
 *
 * Across a restart: each journaled QoS 1 record keeps its packet id in its meta, and the broker
 * seeds this table at start from the journal's unacknowledged records (Broker.rememberJournaled),
 * so a PUBACK lost to a crash or kill -9 is covered as long as the cloud had not yet acknowledged
 * the message. Not covered (journaled and delivered a second time): a message the cloud had
 * already acknowledged before the restart (it left the journal), a redelivery from a client that
 * does not set DUP 1, or one later than `maxAgeMs` or after more than `perDevice` newer QoS 1
 * messages of the same device.
 */
import { createHash } from 'node:crypto';

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
  /** the append of the original; resolves with the journal's message id */
  done: Promise<string | undefined>;
}

export const REDELIVERY_DEFAULTS = { perDevice: 64, maxAgeMs: 10 * 60_000, maxDevices: 10_000 } as const;

export function payloadDigest(payload: Buffer): string {
  return createHash('sha256').update(payload).digest('hex');
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

  /** The entry a DUP 1 PUBLISH is a redelivery of, or undefined (then it must be appended). */
  match(deviceId: string, packetId: number, topic: string, length: number, sha256: string): RedeliveryEntry | undefined {
    const t = this.devices.get(deviceId);
    const e = t?.get(packetId);
    if (!t || !e) return undefined;
    if (this.now() - e.at > this.maxAgeMs) {
      t.delete(packetId);
      if (t.size === 0) this.devices.delete(deviceId);
      return undefined;
    }
    if (e.topic !== topic || e.length !== length || e.sha256 !== sha256) return undefined;
    return e;
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

  /** Forget an entry (its append failed: the redelivery must be appended). Only if it is still `entry`. */
  forget(deviceId: string, packetId: number, entry: RedeliveryEntry): void {
    const t = this.devices.get(deviceId);
    if (t?.get(packetId) !== entry) return;
    t.delete(packetId);
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
