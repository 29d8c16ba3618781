/**
 * Retained messages per device: who set which retained topic, and how much each device holds.
 *
 * aedes keeps every retained message in memory without a bound, so one device could fill the
 * gateway's memory by publishing retained messages to ever new topics. The broker asks this
 * ledger before it accepts a retained PUBLISH from a device (`admit`) and records it once
 * accepted (`commit`); a device over `broker.limits.max_retained_per_device` messages or
 * `max_retained_bytes_per_device` bytes (payload + topic) is refused. Replacing one of its own
 * retained messages is always allowed when the new size fits; a zero-byte retained PUBLISH
 * (which deletes the retained message, MQTT-3.3.1-10/11) always is.
 *
 * A retained topic has one owner: the last device that set it. A local application that sets
 * or clears it takes it out of the ledger (local applications are not bounded here). When a
 * device is revoked, the broker removes the retained messages it owns (`topicsOf`) and forgets
 * it (`forgetOwner`).
 */

export interface RetainedLimits {
  /** retained messages one device may hold */
  maxCount: number;
  /** payload + topic bytes of the retained messages one device may hold */
  maxBytes: number;
}

interface Owned {
  count: number;
  bytes: number;
  topics: Map<string, number>;
}

export class RetainedLedger {
  private readonly owner = new Map<string, string>();
  private readonly owners = new Map<string, Owned>();

  constructor(private limits: RetainedLimits) {}

  setLimits(limits: RetainedLimits): void {
    this.limits = limits;
  }

  /** undefined when the device may set this retained message; otherwise why not. */
  admit(deviceId: string, topic: string, payloadBytes: number): string | undefined {
    if (payloadBytes === 0) return undefined;
    const o = this.owners.get(deviceId);
    const size = payloadBytes + Buffer.byteLength(topic);
    const prev = o?.topics.get(topic);
    const count = (o?.count ?? 0) + (prev === undefined ? 1 : 0);
    const bytes = (o?.bytes ?? 0) - (prev ?? 0) + size;
    if (count > this.limits.maxCount) return `the device holds ${o?.count ?? 0} retained messages, the limit is ${this.limits.maxCount} (broker.limits.max_retained_per_device)`;
    if (bytes > this.limits.maxBytes) return `the device's retained messages would take ${bytes} bytes, the limit is ${this.limits.maxBytes} (broker.limits.max_retained_bytes_per_device)`;
    return undefined;
  }

  /** A retained PUBLISH was accepted (payloadBytes 0: the retained message was deleted). `deviceId` undefined: a local application. */
  commit(deviceId: string | undefined, topic: string, payloadBytes: number): void {
    const prevOwner = this.owner.get(topic);
    if (prevOwner !== undefined) {
      const o = this.owners.get(prevOwner);
      const size = o?.topics.get(topic);
      if (o && size !== undefined) {
        o.topics.delete(topic);
        o.count--;
        o.bytes -= size;
        if (o.count === 0) this.owners.delete(prevOwner);
      }
      this.owner.delete(topic);
    }
    if (deviceId === undefined || payloadBytes === 0) return;
    let o = this.owners.get(deviceId);
    if (!o) {
      o = { count: 0, bytes: 0, topics: new Map() };
      this.owners.set(deviceId, o);
    }
    const size = payloadBytes + Buffer.byteLength(topic);
    o.topics.set(topic, size);
    o.count++;
    o.bytes += size;
    this.owner.set(topic, deviceId);
  }

  /** The retained topics a device set and still owns. */
  topicsOf(deviceId: string): string[] {
    return [...(this.owners.get(deviceId)?.topics.keys() ?? [])];
  }

  forgetOwner(deviceId: string): void {
    const o = this.owners.get(deviceId);
    if (!o) return;
    for (const t of o.topics.keys()) this.owner.delete(t);
    this.owners.delete(deviceId);
  }

  /** { count, bytes } a device holds (status, tests) */
  usage(deviceId: string): { count: number; bytes: number } {
    const o = this.owners.get(deviceId);
    return { count: o?.count ?? 0, bytes: o?.bytes ?? 0 };
  }

  /** retained messages owned by devices */
  get size(): number {
    return this.owner.size;
  }
}
