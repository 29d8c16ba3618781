/**
 * The inbound half of the conformance guard: frames the bytes a device sends, incrementally and
 * whatever the chunk boundaries, and checks every packet against the MQTT 3.1.1 statements a
 * server must enforce (conformance-statements.ts) before aedes sees it. Valid bytes are passed
 * on unchanged (`forward`), except that the DUP flag of an incoming QoS>0 PUBLISH is cleared
 * (MQTT-3.3.1-3; it is remembered per packet id for the broker's redelivery check). A PUBLISH
 * payload is never scanned: only the fixed header, topic name and packet id are looked at. Payloads
 * stream through as they arrive, except a large PUBLISH (above the large-publish threshold, when
 * the connection has an in-flight budget): it first waits for room in the budget, then is gathered
 * into one buffer of its size and handed on whole (see `assembly`). A violation is recorded in the shared
 * GuardState (`failure`) and reported through `onFail`; the connection does the rest.
 */
import { isUtf8 } from 'node:buffer';
import { largeBuffer, transientBytes } from '../core/reclaim.js';
import type { StatementId } from './conformance-statements.js';
import {
  CONNECT,
  PUBLISH,
  PUBACK,
  PUBREC,
  PUBREL,
  PUBCOMP,
  SUBSCRIBE,
  UNSUBSCRIBE,
  PINGREQ,
  DISCONNECT,
  MAX_REMAINING_LENGTH,
  SLASH,
  PLUS,
  HASH,
  Phase,
  u16,
  type GuardState,
} from './conformance-state.js';

/** What the inbound validator needs from the connection options. */
export interface InboundOptions {
  maxPacketBytes?: number;
  keepaliveMinS?: number;
  keepaliveMaxS?: number;
  allowMqtt31?: boolean;
}

/**
 * Asked when a PUBLISH header announces a remaining length above the large-publish threshold,
 * before its body is read: true to let it through now, false when it must wait (the connection
 * pauses its socket and calls {@link InboundValidator.resume} once room was granted).
 */
export type AdmitLarge = (remainingLength: number, topic: string, payloadBytes: number) => boolean;

/** SUBSCRIBEs with repeated filters awaiting their SUBACK, per connection */
const MAX_FIXUPS = 256;
const NEED = -1;
const FAIL = -2;
/** a large PUBLISH waits for room in the in-flight budget */
const WAIT = -3;

/** client → server packet types and the flags their fixed header must carry (-1: PUBLISH, checked apart) */
const REQUIRED_FLAGS: Array<number | undefined> = [];
REQUIRED_FLAGS[CONNECT] = 0;
REQUIRED_FLAGS[PUBLISH] = -1;
REQUIRED_FLAGS[PUBACK] = 0;
REQUIRED_FLAGS[PUBREC] = 0;
REQUIRED_FLAGS[PUBREL] = 2;
REQUIRED_FLAGS[PUBCOMP] = 0;
REQUIRED_FLAGS[SUBSCRIBE] = 2;
REQUIRED_FLAGS[UNSUBSCRIBE] = 2;
REQUIRED_FLAGS[PINGREQ] = 0;
REQUIRED_FLAGS[DISCONNECT] = 0;
const FLAG_STATEMENT: Partial<Record<number, StatementId>> = {
  [PUBREL]: 'MQTT-3.6.1-1',
  [SUBSCRIBE]: 'MQTT-3.8.1-1',
  [UNSUBSCRIBE]: 'MQTT-3.10.1-1',
  [DISCONNECT]: 'MQTT-3.14.1-1',
};
const TYPE_NAMES = ['reserved(0)', 'CONNECT', 'CONNACK', 'PUBLISH', 'PUBACK', 'PUBREC', 'PUBREL', 'PUBCOMP', 'SUBSCRIBE', 'SUBACK', 'UNSUBSCRIBE', 'UNSUBACK', 'PINGREQ', 'PINGRESP', 'DISCONNECT', 'reserved(15)'];

// ---------------------------------------------------------------------------
// string and topic checks (byte level; UTF-8 multi-byte sequences never contain bytes < 0x80,
// so scanning for '/', '+', '#' and 0x00 byte by byte is safe)
// ---------------------------------------------------------------------------

/** A topic name: non-empty, no U+0000, no wildcard, well-formed UTF-8. Hot path: one pass, no allocation. */
export function checkTopicName(b: Buffer, start: number, end: number, wildcardStatement: StatementId): StatementId | undefined {
  if (end === start) return 'MQTT-4.7.3-1';
  let high = 0;
  for (let i = start; i < end; i++) {
    const c = b[i]!;
    high |= c;
    // 0x00, '#' (0x23) and '+' (0x2b) are all <= 0x2b; letters, digits, '/', '-', '_' are above
    if (c <= PLUS && (c === 0 || c === PLUS || c === HASH)) return c === 0 ? 'MQTT-1.5.3-2' : wildcardStatement;
  }
  if (high & 0x80 && !isUtf8(b.subarray(start, end))) return 'MQTT-1.5.3-1';
  return undefined;
}


/** A topic filter: non-empty, no U+0000, well-formed wildcards, well-formed UTF-8. */
function checkTopicFilter(b: Buffer, start: number, end: number): StatementId | undefined {
  if (end === start) return 'MQTT-4.7.3-1';
  let high = false;
  for (let i = start; i < end; i++) {
    const c = b[i]!;
    if (c === 0) return 'MQTT-1.5.3-2';
    if (c === HASH) {
      if (i !== end - 1 || (i > start && b[i - 1] !== SLASH)) return 'MQTT-4.7.1-2';
    } else if (c === PLUS) {
      if ((i > start && b[i - 1] !== SLASH) || (i < end - 1 && b[i + 1] !== SLASH)) return 'MQTT-4.7.1-3';
    } else if (c >= 0x80) high = true;
  }
  if (high && !isUtf8(b.subarray(start, end))) return 'MQTT-1.5.3-1';
  return undefined;
}

function checkUtf8String(b: Buffer, start: number, end: number): StatementId | undefined {
  let high = false;
  for (let i = start; i < end; i++) {
    const c = b[i]!;
    if (c === 0) return 'MQTT-1.5.3-2';
    if (c >= 0x80) high = true;
  }
  if (high && !isUtf8(b.subarray(start, end))) return 'MQTT-1.5.3-1';
  return undefined;
}

export class InboundValidator {
  private readonly maxPacket: number;
  private pendingParts: Buffer[] = [];
  private pendingLen = 0;
  /** bytes (from the start of the pending packet) needed before it can be examined again */
  private need = 0;
  /** payload bytes of the current PUBLISH still to pass through */
  private streamLeft = 0;
  /**
   * packet ids of incoming QoS>0 PUBLISHes that carried DUP 1 (the flag itself is cleared), not yet
   * taken; made on the first DUP 1 (rare: an empty Map costs ~200 B on every idle connection)
   */
  private dupIn: Map<number, number> | undefined;
  /** bytes from the start of a large PUBLISH waiting for the budget (plus whatever arrived after it) */
  private held: Buffer[] | undefined;
  /** the next large PUBLISH examined was already admitted (it waited, then was granted) */
  private admitted = false;
  /**
   * A large PUBLISH being gathered into one buffer of its exact size and handed on whole: aedes'
   * parser (mqtt-packet, a BufferList) then takes the payload as a view of that single buffer
   * instead of concatenating hundreds of socket chunks into a second copy, so the memory of a
   * large publish is one copy of it, the size the in-flight budget counts.
   */
  private assembly: Buffer | undefined;
  private assemblyOff = 0;
  /** set by examinePublish when it started an assembly: the caller must not forward the packet's first bytes */
  private assemblyStarted = false;

  constructor(
    private readonly st: GuardState,
    private readonly opts: InboundOptions,
    /** checked bytes, in order */
    private readonly forward: (b: Buffer) => void,
    /** a violation was recorded in st.failure */
    private readonly onFail: () => void,
    /** publishes with a remaining length above this ask `admitLarge` first */
    private readonly largeBytes = Infinity,
    private readonly admitLarge?: AdmitLarge,
  ) {
    this.maxPacket = Math.min(opts.maxPacketBytes ?? MAX_REMAINING_LENGTH, MAX_REMAINING_LENGTH);
  }

  /** Drop what is buffered (the connection is closing). */
  reset(): void {
    this.pendingParts = [];
    this.pendingLen = 0;
    this.streamLeft = 0;
    this.held = undefined;
    this.assembly = undefined;
  }

  /** Whether a large PUBLISH is waiting for the budget (the socket must stay paused). */
  get waiting(): boolean {
    return this.held !== undefined;
  }

  /** The waiting large PUBLISH was granted: process it and what arrived after it. */
  resume(): void {
    const held = this.held;
    if (!held) return;
    this.held = undefined;
    this.admitted = true;
    this.inbound(held.length === 1 ? held[0]! : Buffer.concat(held));
  }

  inbound(c: Buffer): void {
    if (this.st.phase >= Phase.Done) return; // refused, disconnected or closing: discard
    if (this.held) {
      // the socket is paused; a chunk already on its way is kept in order (not copied: over WebSocket a
      // chunk is a whole message, possibly the large packet itself, and a copy would double it)
      this.held.push(c);
      return;
    }
    const n = c.length;
    let off = 0;
    let runStart = 0; // c[runStart, off) is checked and waits to be forwarded
    while (off < n) {
      if (this.assembly) {
        const a = this.assembly;
        const k = Math.min(a.length - this.assemblyOff, n - off);
        c.copy(a, this.assemblyOff, off, off + k);
        transientBytes(k); // the chunk is garbage once copied (core/reclaim.ts)
        this.assemblyOff += k;
        off += k;
        runStart = off;
        if (this.assemblyOff === a.length) {
          this.assembly = undefined;
          this.forward(a);
        }
        continue;
      }
      if (this.streamLeft > 0) {
        const k = Math.min(this.streamLeft, n - off);
        off += k;
        this.streamLeft -= k;
        continue;
      }
      if (this.pendingLen > 0) {
        // complete the packet prefix that straddles chunks; runStart === off here
        const take = Math.min(this.need - this.pendingLen, n - off);
        this.pendingParts.push(c.subarray(off, off + take));
        this.pendingLen += take;
        off += take;
        runStart = off;
        if (this.pendingLen < this.need) continue;
        const held = this.pendingParts.length === 1 ? Buffer.from(this.pendingParts[0]!) : Buffer.concat(this.pendingParts, this.pendingLen);
        this.pendingParts = [];
        this.pendingLen = 0;
        const r = this.examine(held, 0, held.length);
        if (r === FAIL) return this.onFail();
        if (r === WAIT) {
          this.held = off < n ? [held, c.subarray(off)] : [held];
          return;
        }
        if (r === NEED) {
          this.pendingParts = [held];
          this.pendingLen = held.length;
          continue;
        }
        if (this.assemblyStarted) {
          this.assemblyStarted = false; // held is copied into the assembly
          continue;
        }
        this.forward(held);
        if (this.st.phase >= Phase.Done) return;
        continue;
      }
      const r = this.examine(c, off, n);
      if (r === FAIL) {
        this.forward(c.subarray(runStart, off));
        return this.onFail();
      }
      if (r === WAIT) {
        this.forward(c.subarray(runStart, off));
        this.held = [c.subarray(off)]; // at most one socket chunk (or WebSocket message) is held while waiting; not copied
        return;
      }
      if (r === NEED) {
        this.forward(c.subarray(runStart, off));
        this.pendingParts = [Buffer.from(c.subarray(off))]; // copy: never keep a reference into the socket's chunk
        this.pendingLen = n - off;
        off = n;
        runStart = n;
        break;
      }
      if (this.assemblyStarted) {
        // a large PUBLISH starts at `off`: forward what precedes it; the rest is gathered from here on
        this.assemblyStarted = false;
        this.forward(c.subarray(runStart, off));
        off = r;
        runStart = r;
        continue;
      }
      off = r;
      if (this.st.phase >= Phase.Done) {
        // DISCONNECT: forward it, drop what follows (MQTT-3.14.4-2)
        this.forward(c.subarray(runStart, off));
        return;
      }
    }
    if (off > runStart) this.forward(runStart === 0 && off === n ? c : c.subarray(runStart, off));
  }

  /**
   * Examine the packet starting at b[s] with bytes up to b[e]. Returns the offset
   * up to which bytes are checked (the packet end, or e for a PUBLISH whose
   * payload continues in later chunks, with streamLeft set), NEED (this.need set:
   * bytes of this packet required first), WAIT (a large PUBLISH waits for the in-flight
   * budget) or FAIL (this.st.failure set).
   */
  private examine(b: Buffer, s: number, e: number): number {
    const avail = e - s;
    const b0 = b[s]!;
    const type = b0 >> 4;
    const flags = b0 & 0x0f;
    // what may arrive at all, and when
    const required = REQUIRED_FLAGS[type];
    if (required === undefined) return this.violation('MQTT-4.8.0-1', `${TYPE_NAMES[type]} packet from a client`);
    if (this.st.phase === Phase.Connect && type !== CONNECT) return this.violation('MQTT-3.1.0-1', `first packet is ${TYPE_NAMES[type]}`);
    if (this.st.phase !== Phase.Connect && type === CONNECT) return this.violation('MQTT-3.1.0-2', 'second CONNECT');
    if (required >= 0) {
      if (flags !== required) return this.violation(FLAG_STATEMENT[type] ?? 'MQTT-2.2.2-2', `${TYPE_NAMES[type]} with fixed-header flags ${flags.toString(2).padStart(4, '0')}`);
    } else {
      const qos = (flags >> 1) & 3;
      if (qos === 3) return this.violation('MQTT-3.3.1-4', 'PUBLISH with QoS 3');
      if (qos === 0 && flags & 0x08) return this.violation('MQTT-3.3.1-2', 'QoS 0 PUBLISH with DUP 1');
    }
    // remaining length
    let len = 0;
    let mul = 1;
    let h = 1;
    for (;;) {
      if (h >= avail) {
        this.need = h + 1;
        return NEED;
      }
      const byte = b[s + h]!;
      len += (byte & 0x7f) * mul;
      h++;
      if ((byte & 0x80) === 0) break;
      if (h === 5) return this.violation('MQTT-4.8.0-1', 'remaining length longer than 4 bytes');
      mul *= 128;
    }
    if (len > this.maxPacket) return this.violation('limit:max_packet_bytes', `${TYPE_NAMES[type]} of ${len} bytes exceeds ${this.maxPacket}`);
    const total = h + len;
    switch (type) {
      case PUBACK:
      case PUBREC:
      case PUBREL:
      case PUBCOMP:
        if (len !== 2) return this.violation('MQTT-4.8.0-1', `${TYPE_NAMES[type]} with remaining length ${len}`);
        break;
      case PINGREQ:
      case DISCONNECT:
        if (len !== 0) return this.violation('MQTT-4.8.0-1', `${TYPE_NAMES[type]} with remaining length ${len}`);
        break;
      case SUBSCRIBE:
        if (len === 2) return this.violation('MQTT-3.8.3-3', 'SUBSCRIBE without topic filters');
        break;
      case UNSUBSCRIBE:
        if (len === 2) return this.violation('MQTT-3.10.3-2', 'UNSUBSCRIBE without topic filters');
        break;
      case PUBLISH:
        return this.examinePublish(b, s, e, h, total, flags);
    }
    if (avail < total) {
      this.need = total;
      return NEED;
    }
    const p = s + h;
    const end = s + total;
    let ok: boolean;
    switch (type) {
      case CONNECT:
        ok = this.checkConnect(b, p, end);
        break;
      case SUBSCRIBE:
        ok = this.checkSubscribe(b, p, end);
        break;
      case UNSUBSCRIBE:
        ok = this.checkUnsubscribe(b, p, end);
        break;
      case PUBACK:
      case PUBREC:
        if (this.st.session) this.st.session.unacked.delete(u16(b, p));
        ok = true;
        break;
      case DISCONNECT:
        this.st.phase = Phase.Done;
        ok = true;
        break;
      default:
        ok = true;
    }
    return ok ? end : FAIL;
  }

  /**
   * Whether the incoming QoS>0 PUBLISH with this packet id carried DUP 1 (the guard clears the
   * flag before aedes sees it, MQTT-3.3.1-3). Call once per PUBLISH, in receive order: it consumes.
   */
  takeIncomingDup(packetId: number): boolean {
    const n = this.dupIn?.get(packetId);
    if (n === undefined) return false;
    if (n <= 1) this.dupIn!.delete(packetId);
    else this.dupIn!.set(packetId, n - 1);
    return true;
  }

  /** PUBLISH: check the topic name and packet id; the payload streams through unexamined. */
  private examinePublish(b: Buffer, s: number, e: number, h: number, total: number, flags: number): number {
    const avail = e - s;
    const qos = (flags >> 1) & 3;
    if (total < h + 2 + (qos > 0 ? 2 : 0)) return this.violation('MQTT-4.8.0-1', 'PUBLISH shorter than its variable header');
    if (avail < h + 2) {
      this.need = h + 2;
      return NEED;
    }
    const topicLen = u16(b, s + h);
    const prefix = h + 2 + topicLen + (qos > 0 ? 2 : 0);
    if (prefix > total) return this.violation('MQTT-4.8.0-1', 'PUBLISH topic name or packet id runs past the packet');
    if (avail < prefix) {
      this.need = prefix;
      return NEED;
    }
    const t0 = s + h + 2;
    const bad = checkTopicName(b, t0, t0 + topicLen, 'MQTT-3.3.2-2');
    if (bad) return this.violation(bad, 'PUBLISH topic name');
    if (qos > 0 && u16(b, t0 + topicLen) === 0) return this.violation('MQTT-2.3.1-1', `QoS ${qos} PUBLISH with packet identifier 0`);
    // a large PUBLISH needs room in the in-flight budget before its body is read (aedes holds it whole);
    // asked before the DUP bookkeeping below so that a packet examined again after its wait counts once
    const large = total - h > this.largeBytes && this.admitLarge !== undefined;
    if (large) {
      if (this.admitted) this.admitted = false;
      else if (!this.admitLarge!(total - h, b.toString('utf8', t0, t0 + topicLen), total - prefix)) return WAIT;
    }
    if (qos > 0) {
      // MQTT-3.3.1-3: the DUP of an incoming PUBLISH must not reach subscribers; aedes copies it.
      // The broker still needs to know it (redelivery dedup), so it is remembered per packet id.
      if (flags & 0x08) {
        b[s] = b[s]! & ~0x08;
        const id = u16(b, t0 + topicLen);
        const dupIn = (this.dupIn ??= new Map());
        if (dupIn.size < 65536) dupIn.set(id, (dupIn.get(id) ?? 0) + 1);
      }
    }
    if (avail >= total) return s + total;
    if (large) {
      const a = largeBuffer(total); // its memory goes back to the system once freed (core/reclaim.ts)
      b.copy(a, 0, s, e);
      this.assembly = a;
      this.assemblyOff = avail;
      this.assemblyStarted = true;
      return e;
    }
    this.streamLeft = total - avail;
    return e;
  }

  private checkConnect(b: Buffer, p: number, end: number): boolean {
    const malformed = (what: string): false => this.no('MQTT-3.1.4-1', `malformed CONNECT: ${what}`);
    if (end - p < 2) return malformed('no protocol name');
    const nameLen = u16(b, p);
    if (p + 2 + nameLen + 1 > end) return malformed('truncated protocol name or level');
    const name = b.toString('latin1', p + 2, p + 2 + nameLen);
    p += 2 + nameLen;
    const level = b[p++]!;
    if (name === 'MQTT') {
      if (level !== 4) return this.refuse('MQTT-3.1.2-2', 1, `protocol level ${level}`);
    } else if (name === 'MQIsdp') {
      if (level !== 3 || this.opts.allowMqtt31 === false) return this.refuse('MQTT-3.1.2-2', 1, `MQIsdp protocol level ${level}`);
    } else {
      return this.no('MQTT-3.1.2-1', `protocol name ${JSON.stringify(name.slice(0, 16))}`);
    }
    if (end - p < 3) return malformed('truncated flags or keepalive');
    const cf = b[p]!;
    const keepalive = u16(b, p + 1);
    p += 3;
    const will = (cf & 0x04) !== 0;
    const willQos = (cf >> 3) & 3;
    const willRetain = (cf & 0x20) !== 0;
    const hasPassword = (cf & 0x40) !== 0;
    const hasUser = (cf & 0x80) !== 0;
    const clean = (cf & 0x02) !== 0;
    if (cf & 0x01) return this.no('MQTT-3.1.2-3', 'reserved CONNECT flag is 1');
    if (!will && willQos !== 0) return this.no('MQTT-3.1.2-13', `Will QoS ${willQos} with Will Flag 0`);
    if (!will && willRetain) return this.no('MQTT-3.1.2-15', 'Will Retain 1 with Will Flag 0');
    if (will && willQos === 3) return this.no('MQTT-3.1.2-14', 'Will QoS 3');
    if (hasPassword && !hasUser) return this.no('MQTT-3.1.2-22', 'Password Flag 1 with User Name Flag 0');
    // payload: client id, will topic, will message, user name, password (MQTT-3.1.3-1)
    const field = (): [number, number] | undefined => {
      if (end - p < 2) return undefined;
      const l = u16(b, p);
      if (p + 2 + l > end) return undefined;
      const r: [number, number] = [p + 2, p + 2 + l];
      p += 2 + l;
      return r;
    };
    const id = field();
    if (!id) return this.no('MQTT-3.1.3-3', 'no client identifier');
    const idBad = checkUtf8String(b, id[0], id[1]);
    if (idBad) return this.no(idBad, 'client identifier');
    if (will) {
      const topic = field();
      if (!topic) return this.no('MQTT-3.1.2-9', 'Will Flag 1 without Will Topic');
      const bad = checkTopicName(b, topic[0], topic[1], 'MQTT-4.7.1-1');
      if (bad) return this.no(bad, 'will topic');
      if (!field()) return this.no('MQTT-3.1.2-9', 'Will Flag 1 without Will Message');
    }
    if (hasUser) {
      const user = field();
      if (!user) return this.no('MQTT-3.1.2-19', 'User Name Flag 1 without user name');
      const bad = checkUtf8String(b, user[0], user[1]);
      if (bad) return this.no(bad, 'user name');
    }
    if (hasPassword && !field()) return this.no('MQTT-3.1.2-21', 'Password Flag 1 without password');
    if (p !== end) {
      if (!hasUser) return this.no('MQTT-3.1.2-18', 'bytes after the payload (a user name with User Name Flag 0?)');
      if (!hasPassword) return this.no('MQTT-3.1.2-20', 'bytes after the payload (a password with Password Flag 0?)');
      return malformed('bytes after the password');
    }
    const clientId = b.toString('utf8', id[0], id[1]);
    this.st.clientId = clientId;
    this.st.clean = clean;
    if (clientId === '') {
      if (!clean) return this.refuse('MQTT-3.1.3-8', 2, 'empty client identifier with CleanSession 0');
      if (name === 'MQIsdp') return this.refuse('MQTT-3.1.3-9', 2, 'empty client identifier (MQTT 3.1 requires 1-23 characters)');
    }
    const min = this.opts.keepaliveMinS ?? 0;
    const max = this.opts.keepaliveMaxS ?? 0;
    if ((max > 0 && (keepalive === 0 || keepalive > max)) || (keepalive !== 0 && keepalive < min)) {
      return this.no('MQTT-3.2.2-6', `keepalive ${keepalive} s outside the accepted range [${min}, ${max || 'unlimited'}] (3.1.1 has no return code for it)`);
    }
    this.st.phase = Phase.Connected;
    return true;
  }

  private checkSubscribe(b: Buffer, p: number, end: number): boolean {
    const id = u16(b, p);
    if (id === 0) return this.no('MQTT-2.3.1-1', 'SUBSCRIBE with packet identifier 0');
    p += 2;
    let filters: string[] | undefined;
    const requested: number[] = [];
    let count = 0;
    while (p < end) {
      if (end - p < 2) return this.no('MQTT-4.8.0-1', 'truncated SUBSCRIBE topic filter');
      const l = u16(b, p);
      if (p + 2 + l + 1 > end) return this.no('MQTT-4.8.0-1', 'SUBSCRIBE topic filter without requested QoS');
      const bad = checkTopicFilter(b, p + 2, p + 2 + l);
      if (bad) return this.no(bad, 'SUBSCRIBE topic filter');
      const options = b[p + 2 + l]!;
      if (options & 0xfc || (options & 3) === 3) return this.no('MQTT-3.8.3-4', `SUBSCRIBE options byte 0x${options.toString(16)}`);
      // filter strings are only needed to find duplicates, i.e. when there is more than one
      if (count > 0 || p + 2 + l + 1 < end) (filters ??= []).push(b.toString('utf8', p + 2, p + 2 + l));
      requested.push(options);
      count++;
      p += 2 + l + 1;
    }
    if (filters && new Set(filters).size !== filters.length) {
      // aedes keeps the last occurrence of each filter at the position of the first and answers once per distinct filter
      const pos = new Map<string, number>();
      const index: number[] = [];
      const lastRequested: number[] = [];
      filters.forEach((f, i) => {
        let k = pos.get(f);
        if (k === undefined) {
          k = pos.size;
          pos.set(f, k);
        }
        index.push(k);
        lastRequested[k] = requested[i]!;
      });
      const fixups = (this.st.fixups ??= new Map());
      if (fixups.size < MAX_FIXUPS) fixups.set(id, { requested, index, lastRequested });
    }
    return true;
  }

  private checkUnsubscribe(b: Buffer, p: number, end: number): boolean {
    if (u16(b, p) === 0) return this.no('MQTT-2.3.1-1', 'UNSUBSCRIBE with packet identifier 0');
    p += 2;
    while (p < end) {
      if (end - p < 2) return this.no('MQTT-4.8.0-1', 'truncated UNSUBSCRIBE topic filter');
      const l = u16(b, p);
      if (p + 2 + l > end) return this.no('MQTT-4.8.0-1', 'UNSUBSCRIBE topic filter runs past the packet');
      const bad = checkTopicFilter(b, p + 2, p + 2 + l);
      if (bad) return this.no(bad, 'UNSUBSCRIBE topic filter');
      p += 2 + l;
    }
    return true;
  }

  private violation(statement: StatementId, detail: string): typeof FAIL {
    this.st.failure ??= { statement, detail };
    return FAIL;
  }

  /** Record a violation from a packet check. */
  private no(statement: StatementId, detail: string): false {
    this.st.failure ??= { statement, detail };
    return false;
  }

  /** Refuse the CONNECT with a CONNACK return code, then close. */
  private refuse(statement: StatementId, returnCode: number, detail: string): false {
    this.st.failure ??= { statement, detail, connack: returnCode };
    return false;
  }
}
