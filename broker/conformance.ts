/**
 * MQTT 3.1.1 conformance guard for the embedded aedes broker.
 *
 * aedes 1.2 accepts things a 3.1.1 server must refuse (empty client id with
 * CleanSession 0, ill-formed UTF-8, `a+` filters, empty SUBSCRIBE …) and gets a
 * few outbound details wrong (CONNACK code 6, DUP flags, SUBACK length …).
 * This module sits between each device connection and `aedes.handle()` and
 * fixes what can be fixed from outside aedes. docs/mqtt-conformance.md lists
 * every statement, what aedes does alone and what this guard changes.
 *
 * ## API the broker calls
 *
 * ```ts
 * const sessions = new SessionTracker();                      // ONE per aedes instance
 * const aedes = await Aedes.createBroker({
 *   ...brokerOptions,                                         // no keepaliveLimit (see below)
 *   ...conformanceHooks({ authorizeForward: myForward, authorizeSubscribe: mySubscribe }),
 * });
 * server.on('secureConnection', (sock) => {                  // net/tls socket, or ws's createWebSocketStream()
 *   sock.setNoDelay(true);
 *   aedes.handle(wrapConnection(sock, { logger, sessions, maxPacketBytes, keepaliveMinS, keepaliveMaxS }));
 * });
 * ```
 *
 * - `wrapConnection(stream, opts)` returns a {@link ConformantConnection}: a
 *   Duplex that aedes reads and writes instead of the socket. Inbound bytes are
 *   framed incrementally; each packet is checked and passed on unchanged (a
 *   PUBLISH payload is never copied or scanned: only the fixed header, topic
 *   name and packet id are looked at, and large payloads stream through as they
 *   arrive). On a violation the guard logs one line (code ECONN_MQTT_PROTOCOL,
 *   `statement`: the MQTT-x.y.z-n id), writes a CONNACK where the spec demands
 *   one, and closes the connection; aedes then sees the stream close (and
 *   publishes the will, as the spec requires for a connection that ends without
 *   DISCONNECT). Back-pressure is kept both ways (the socket is paused while
 *   aedes does not read; aedes sees `write() === false` while the socket is
 *   full); close, end, error and destroy are forwarded both ways.
 * - The underlying stream stays reachable as `conn.socket` — inside aedes hooks
 *   use `(client.conn as ConformantConnection).socket`, e.g. for
 *   `(socket as TLSSocket).getPeerCertificate()`; {@link underlyingSocket} does
 *   the cast safely for a conn that may or may not be wrapped.
 * - `conformanceHooks(inner)` decorates two aedes hooks. The broker passes its
 *   own `authorizeForward` / `authorizeSubscribe` (ACL) as `inner`; they run
 *   first, then the conformance fix-ups are applied to their result:
 *   `authorizeForward` caps the delivery QoS at the granted QoS of the matching
 *   subscriptions (aedes only caps for exact-match filters) and keeps `$` topics
 *   away from filters that start with a wildcard (aedes leaks retained ones);
 *   `authorizeSubscribe` turns a hook error (which makes aedes drop the
 *   connection) into a refused subscription, SUBACK 0x80. Both catch everything.
 * - `SessionTracker` is shared by all connections of one broker: it remembers
 *   which client ids hold a CleanSession 0 session (aedes reports session
 *   present 0 for a session without subscriptions) and which QoS>0 packet ids
 *   were sent but not acknowledged (re-deliveries then carry DUP 1).
 *
 * Do not set aedes `keepaliveLimit`: aedes answers it with CONNACK return code
 * 6, which MQTT 3.1.1 does not have. Use `keepaliveMinS`/`keepaliveMaxS` here
 * (out of range: closed without CONNACK, MQTT-3.2.2-6). If a code above 5 still
 * comes out of aedes the guard drops it and closes.
 */
import { Duplex } from 'node:stream';
import { isUtf8 } from 'node:buffer';
import type { AedesOptions, AedesPublishPacket, Client, Subscription } from 'aedes';
import type { Logger } from '../core/logger.js';

/** The normative statements this guard enforces (id → what it says, as logged). */
export const STATEMENTS = {
  'MQTT-1.5.3-1': 'strings must be well-formed UTF-8 (no surrogates, no overlongs)',
  'MQTT-1.5.3-2': 'strings must not contain U+0000',
  'MQTT-2.2.2-2': 'reserved fixed-header flags must have their listed value',
  'MQTT-2.3.1-1': 'SUBSCRIBE, UNSUBSCRIBE and QoS>0 PUBLISH need a non-zero packet identifier',
  'MQTT-3.1.0-1': 'the first packet must be CONNECT',
  'MQTT-3.1.0-2': 'a second CONNECT is a protocol violation',
  'MQTT-3.1.2-1': 'the protocol name must be "MQTT"',
  'MQTT-3.1.2-2': 'the protocol level must be one the server supports (4; 3 for MQIsdp)',
  'MQTT-3.1.2-3': 'the reserved CONNECT flag must be 0',
  'MQTT-3.1.2-9': 'Will Flag 1 requires Will Topic and Will Message',
  'MQTT-3.1.2-13': 'Will QoS must be 0 when Will Flag is 0',
  'MQTT-3.1.2-14': 'Will QoS must not be 3',
  'MQTT-3.1.2-15': 'Will Retain must be 0 when Will Flag is 0',
  'MQTT-3.1.2-18': 'no user name may follow when User Name Flag is 0',
  'MQTT-3.1.2-19': 'User Name Flag 1 requires a user name',
  'MQTT-3.1.2-20': 'no password may follow when Password Flag is 0',
  'MQTT-3.1.2-21': 'Password Flag 1 requires a password',
  'MQTT-3.1.2-22': 'Password Flag must be 0 when User Name Flag is 0',
  'MQTT-3.1.3-3': 'the client identifier must be present',
  'MQTT-3.1.3-8': 'an empty client id requires CleanSession 1',
  'MQTT-3.1.3-9': 'the server may reject a client id',
  'MQTT-3.1.4-1': 'the CONNECT must be well-formed',
  'MQTT-3.2.2-6': 'refusals without a matching 3.1.1 return code get no CONNACK',
  'MQTT-3.3.1-2': 'a QoS 0 PUBLISH must have DUP 0',
  'MQTT-3.3.1-4': 'a PUBLISH must not have both QoS bits set',
  'MQTT-3.3.2-2': 'a topic name must not contain wildcards',
  'MQTT-3.6.1-1': 'PUBREL fixed-header flags must be 0010',
  'MQTT-3.8.1-1': 'SUBSCRIBE fixed-header flags must be 0010',
  'MQTT-3.8.3-3': 'a SUBSCRIBE must contain at least one topic filter',
  'MQTT-3.8.3-4': 'SUBSCRIBE options: reserved bits 0 and QoS 0, 1 or 2',
  'MQTT-3.10.1-1': 'UNSUBSCRIBE fixed-header flags must be 0010',
  'MQTT-3.10.3-2': 'an UNSUBSCRIBE must contain at least one topic filter',
  'MQTT-3.14.1-1': 'DISCONNECT fixed-header flags must be 0000',
  'MQTT-4.7.1-1': 'wildcards are not allowed in a topic name',
  'MQTT-4.7.1-2': '# must be the last character and occupy a whole level',
  'MQTT-4.7.1-3': '+ must occupy a whole level',
  'MQTT-4.7.3-1': 'topic names and filters must be at least one character long',
  'MQTT-4.8.0-1': 'protocol violation (malformed or unexpected packet)',
  'limit:max_packet_bytes': 'packet larger than the configured maximum',
} as const;
export type StatementId = keyof typeof STATEMENTS;

export interface ConformanceOptions {
  /** Root or component logger; the guard logs through `logger.child({ component: 'mqtt-conformance', … })`. */
  logger: Logger;
  /** Shared per broker. Without it the session-present and DUP-on-redelivery fixes only see this connection. */
  sessions?: SessionTracker;
  /** Largest remaining length accepted for any packet; bigger ones are refused from their header alone. Default 268435455. */
  maxPacketBytes?: number;
  /** Smallest keepalive accepted in seconds (0 = any). Out of range: closed without CONNACK (MQTT-3.2.2-6). */
  keepaliveMinS?: number;
  /** Largest keepalive accepted in seconds (0 = no limit); keepalive 0 (never) exceeds any limit. */
  keepaliveMaxS?: number;
  /** Serve MQTT 3.1 (protocol name MQIsdp, level 3) as aedes does. Default true. */
  allowMqtt31?: boolean;
  /** Peer description for log lines (defaults to the socket's remote address). */
  peer?: string;
  /** How long a refused connection may take to read its CONNACK before it is destroyed. Default 2000 ms. */
  closeGraceMs?: number;
}

// packet types
const CONNECT = 1;
const CONNACK = 2;
const PUBLISH = 3;
const PUBACK = 4;
const PUBREC = 5;
const PUBREL = 6;
const PUBCOMP = 7;
const SUBSCRIBE = 8;
const SUBACK = 9;
const UNSUBSCRIBE = 10;
const PINGREQ = 12;
const DISCONNECT = 14;

const MAX_REMAINING_LENGTH = 268_435_455;
/** outbound pieces up to this many bytes in all are joined into one socket write */
const SMALL_WRITE = 1024;
const SLASH = 0x2f;
const PLUS = 0x2b;
const HASH = 0x23;

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
function checkTopicName(b: Buffer, start: number, end: number, wildcardStatement: StatementId): StatementId | undefined {
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

/** big-endian 16-bit read without Buffer#readUInt16BE's argument validation (callers checked the bounds) */
const u16 = (b: Buffer, i: number): number => (b[i]! << 8) | b[i + 1]!;

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

/** MQTT topic matching (3.1.1 section 4.7), without the $ rule. */
export function topicMatches(filter: string, topic: string): boolean {
  const f = filter.split('/');
  const t = topic.split('/');
  for (let i = 0; i < f.length; i++) {
    const level = f[i];
    if (level === '#') return true; // also matches the parent level ("a/#" matches "a")
    if (i >= t.length) return false;
    if (level !== '+' && level !== t[i]) return false;
  }
  return f.length === t.length;
}

// ---------------------------------------------------------------------------
// session tracking shared by the connections of one broker
// ---------------------------------------------------------------------------

interface SessionState {
  /** QoS>0 packet ids sent to the client and not acknowledged yet */
  unacked: Set<number>;
}

/**
 * Which client ids hold a CleanSession 0 session, and what they have in flight.
 * One instance per aedes broker, shared by every wrapped connection. Bounded:
 * beyond `maxSessions` the oldest entries are forgotten (their next CONNACK then
 * reports what aedes reports).
 */
export class SessionTracker {
  private readonly sessions = new Map<string, SessionState>();
  constructor(private readonly maxSessions = 100_000) {}

  has(clientId: string): boolean {
    return this.sessions.has(clientId);
  }

  /** A CleanSession 0 connection was accepted. */
  open(clientId: string): SessionState {
    let s = this.sessions.get(clientId);
    if (!s) {
      if (this.sessions.size >= this.maxSessions) {
        const oldest = this.sessions.keys().next().value;
        if (oldest !== undefined) this.sessions.delete(oldest);
      }
      s = { unacked: new Set() };
      this.sessions.set(clientId, s);
    }
    return s;
  }

  /** A CleanSession 1 connection was accepted: any previous session is gone (MQTT-3.1.2-6). */
  discard(clientId: string): void {
    this.sessions.delete(clientId);
  }

  get size(): number {
    return this.sessions.size;
  }
}

// ---------------------------------------------------------------------------
// the wrapped connection
// ---------------------------------------------------------------------------

const enum Phase {
  /** waiting for CONNECT */
  Connect,
  /** CONNECT passed to aedes */
  Connected,
  /** aedes refused the CONNECT, or the client sent DISCONNECT: nothing more is processed */
  Done,
  /** a violation closed the connection */
  Closing,
}

/** Duplicate filters in one SUBSCRIBE: aedes answers once per distinct filter, the client expects one code per filter. */
interface SubackFixup {
  requested: number[];
  /** for each filter of the packet: index of its distinct filter in aedes's answer */
  index: number[];
  /** requested QoS of the last occurrence of each distinct filter (the one aedes keeps) */
  lastRequested: number[];
}

/** SUBSCRIBEs with repeated filters awaiting their SUBACK, per connection */
const MAX_FIXUPS = 256;
const NEED = -1;
// outbound handling of a packet
const PASS = 0;
const PEEK = 1;
const HOLD = 2;
/** oPeek value between the first byte and the end of the remaining length of a peeked PUBLISH */
const PEEK_NEXT = -1;
const FAIL = -2;

/** A Duplex between one device socket and aedes; see the module header. */
export class ConformantConnection extends Duplex {
  /** The wrapped stream (net.Socket, tls.TLSSocket or a WebSocket stream). */
  readonly socket: Duplex;
  /** Set by aedes (`conn.client = client`). */
  client?: unknown;

  private readonly opts: ConformanceOptions;
  private readonly maxPacket: number;
  private phase = Phase.Connect;
  private clientId: string | undefined;
  private clean = true;

  // inbound framing
  private pendingParts: Buffer[] = [];
  private pendingLen = 0;
  /** bytes (from the start of the pending packet) needed before it can be examined again */
  private need = 0;
  /** payload bytes of the current PUBLISH still to pass through */
  private streamLeft = 0;
  private failure: { statement: StatementId; detail: string; connack?: number } | undefined;
  private readPaused = false;

  // outbound framing
  private oLeft = 0;
  /** > 0 while reading the remaining length of a pass-through packet: the current multiplier */
  private oVarMul = 0;
  private oVarLen = 0;
  /** > 0 while reading a passing PUBLISH's topic length and packet id (see peek()) */
  private oPeek = 0;
  private oPeekLeft = 0;
  private oPeekVal = 0;
  private oPeekSkip = 0;
  private oHold: Buffer[] | null = null;
  private oHoldLen = 0;
  private oNeed = 0;
  private oOut: Buffer[] = [];
  private connackSeen = false;

  // session state
  private session: SessionState | undefined;
  /** ids unacknowledged in the previous connection of this session: re-sent with DUP 1 */
  private redeliver: Set<number> | undefined;
  private readonly fixups = new Map<number, SubackFixup>();
  /** packet ids of incoming QoS>0 PUBLISHes that carried DUP 1 (the flag itself is cleared), not yet taken */
  private readonly dupIn = new Map<number, number>();

  private graceTimer: NodeJS.Timeout | undefined;
  private graceful = false;

  private readonly onData = (chunk: Buffer): void => this.inbound(chunk);

  constructor(socket: Duplex, opts: ConformanceOptions) {
    super({
      allowHalfOpen: false,
      readableHighWaterMark: socket.readableHighWaterMark,
      writableHighWaterMark: socket.writableHighWaterMark,
    });
    this.socket = socket;
    this.opts = opts;
    this.maxPacket = Math.min(opts.maxPacketBytes ?? MAX_REMAINING_LENGTH, MAX_REMAINING_LENGTH);
    socket.on('data', this.onData);
    socket.on('end', () => {
      if (this.phase !== Phase.Closing) this.push(null);
    });
    socket.on('error', (err: Error) => this.destroy(err));
    socket.on('close', () => {
      if (this.graceTimer) clearTimeout(this.graceTimer);
      if (!this.destroyed) this.destroy();
    });
  }

  // ---- readable side (socket → aedes) ----

  override _read(): void {
    if (this.readPaused && this.phase !== Phase.Closing) {
      this.readPaused = false;
      this.socket.resume();
    }
  }

  private forward(b: Buffer): void {
    if (b.length === 0) return;
    if (!this.push(b) && !this.readPaused) {
      this.readPaused = true;
      this.socket.pause();
    }
  }

  private inbound(c: Buffer): void {
    if (this.phase >= Phase.Done) return; // refused, disconnected or closing: discard
    const n = c.length;
    let off = 0;
    let runStart = 0; // c[runStart, off) is checked and waits to be forwarded
    while (off < n) {
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
        if (r === FAIL) return this.fail();
        if (r === NEED) {
          this.pendingParts = [held];
          this.pendingLen = held.length;
          continue;
        }
        this.forward(held);
        if (this.phase >= Phase.Done) return;
        continue;
      }
      const r = this.examine(c, off, n);
      if (r === FAIL) {
        this.forward(c.subarray(runStart, off));
        return this.fail();
      }
      if (r === NEED) {
        this.forward(c.subarray(runStart, off));
        this.pendingParts = [Buffer.from(c.subarray(off))]; // copy: never keep a reference into the socket's chunk
        this.pendingLen = n - off;
        off = n;
        runStart = n;
        break;
      }
      off = r;
      if (this.phase >= Phase.Done) {
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
   * bytes of this packet required first) or FAIL (this.failure set).
   */
  private examine(b: Buffer, s: number, e: number): number {
    const avail = e - s;
    const b0 = b[s]!;
    const type = b0 >> 4;
    const flags = b0 & 0x0f;
    // what may arrive at all, and when
    const required = REQUIRED_FLAGS[type];
    if (required === undefined) return this.violation('MQTT-4.8.0-1', `${TYPE_NAMES[type]} packet from a client`);
    if (this.phase === Phase.Connect && type !== CONNECT) return this.violation('MQTT-3.1.0-1', `first packet is ${TYPE_NAMES[type]}`);
    if (this.phase !== Phase.Connect && type === CONNECT) return this.violation('MQTT-3.1.0-2', 'second CONNECT');
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
        if (this.session) this.session.unacked.delete(u16(b, p));
        ok = true;
        break;
      case DISCONNECT:
        this.phase = Phase.Done;
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
    const n = this.dupIn.get(packetId);
    if (n === undefined) return false;
    if (n <= 1) this.dupIn.delete(packetId);
    else this.dupIn.set(packetId, n - 1);
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
    if (qos > 0) {
      if (u16(b, t0 + topicLen) === 0) return this.violation('MQTT-2.3.1-1', `QoS ${qos} PUBLISH with packet identifier 0`);
      // MQTT-3.3.1-3: the DUP of an incoming PUBLISH must not reach subscribers; aedes copies it.
      // The broker still needs to know it (redelivery dedup), so it is remembered per packet id.
      if (flags & 0x08) {
        b[s] = b[s]! & ~0x08;
        const id = u16(b, t0 + topicLen);
        if (this.dupIn.size < 65536) this.dupIn.set(id, (this.dupIn.get(id) ?? 0) + 1);
      }
    }
    if (avail >= total) return s + total;
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
    this.clientId = clientId;
    this.clean = clean;
    if (clientId === '') {
      if (!clean) return this.refuse('MQTT-3.1.3-8', 2, 'empty client identifier with CleanSession 0');
      if (name === 'MQIsdp') return this.refuse('MQTT-3.1.3-9', 2, 'empty client identifier (MQTT 3.1 requires 1-23 characters)');
    }
    const min = this.opts.keepaliveMinS ?? 0;
    const max = this.opts.keepaliveMaxS ?? 0;
    if ((max > 0 && (keepalive === 0 || keepalive > max)) || (keepalive !== 0 && keepalive < min)) {
      return this.no('MQTT-3.2.2-6', `keepalive ${keepalive} s outside the accepted range [${min}, ${max || 'unlimited'}] (3.1.1 has no return code for it)`);
    }
    this.phase = Phase.Connected;
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
      if (this.fixups.size < MAX_FIXUPS) this.fixups.set(id, { requested, index, lastRequested });
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
    this.failure ??= { statement, detail };
    return FAIL;
  }

  /** Record a violation from a packet check. */
  private no(statement: StatementId, detail: string): false {
    this.failure ??= { statement, detail };
    return false;
  }

  /** Refuse the CONNECT with a CONNACK return code, then close. */
  private refuse(statement: StatementId, returnCode: number, detail: string): false {
    this.failure ??= { statement, detail, connack: returnCode };
    return false;
  }

  /** Log the recorded violation once, answer it, close the connection and let aedes see the close. */
  private fail(): void {
    const f = this.failure ?? { statement: 'MQTT-4.8.0-1' as StatementId, detail: 'protocol violation' };
    if (this.phase === Phase.Closing) return;
    this.phase = Phase.Closing;
    this.pendingParts = [];
    this.pendingLen = 0;
    this.streamLeft = 0;
    this.log(f.statement, f.detail, f.connack);
    this.closeSocket(f.connack);
    this.destroy();
  }

  private log(statement: StatementId, detail: string, connack?: number): void {
    try {
      const s = this.socket as Duplex & { remoteAddress?: string; remotePort?: number };
      const peer = this.opts.peer ?? (s.remoteAddress !== undefined ? `${s.remoteAddress}:${s.remotePort ?? ''}` : undefined);
      this.opts.logger
        .child({ component: 'mqtt-conformance', ...(peer ? { peer } : {}), ...(this.clientId !== undefined ? { clientId: this.clientId } : {}) })
        .warn(
          { code: 'ECONN_MQTT_PROTOCOL', statement, ...(connack !== undefined ? { connackReturnCode: connack } : {}) },
          `MQTT connection refused (${statement}: ${STATEMENTS[statement]}): ${detail}; ${connack !== undefined ? `CONNACK ${connack} sent and ` : ''}connection closed`,
        );
    } catch {
      // logging must never break the connection handling
    }
  }

  private closeSocket(connack?: number): void {
    const sock = this.socket;
    if (connack === undefined || sock.destroyed) {
      sock.destroy();
      return;
    }
    // write the CONNACK, half-close, keep reading (and discarding) so the kernel does not
    // answer with a RST that could discard the CONNACK; destroy after a grace period
    this.graceful = true;
    sock.end(Buffer.from([0x20, 0x02, 0x00, connack]));
    sock.resume();
    this.graceTimer = setTimeout(() => sock.destroy(), this.opts.closeGraceMs ?? 2000);
    this.graceTimer.unref();
  }

  // ---- writable side (aedes → socket) ----

  override _write(chunk: Buffer, _enc: BufferEncoding, cb: (error?: Error | null) => void): void {
    this.outbound(chunk);
    this.flushOut(cb);
  }

  override _writev(chunks: Array<{ chunk: Buffer; encoding: BufferEncoding }>, cb: (error?: Error | null) => void): void {
    for (const c of chunks) this.outbound(c.chunk);
    this.flushOut(cb);
  }

  override _final(cb: (error?: Error | null) => void): void {
    if (!this.graceful) this.socket.end();
    cb();
  }

  override _destroy(err: Error | null, cb: (error?: Error | null) => void): void {
    this.socket.removeListener('data', this.onData);
    if (!this.graceful) this.socket.destroy();
    cb(err);
  }

  private flushOut(cb: (error?: Error | null) => void): void {
    const out = this.oOut;
    if (out.length === 0 || this.phase === Phase.Closing || this.socket.destroyed) {
      out.length = 0;
      cb();
      return;
    }
    let ok = true;
    if (out.length === 1) ok = this.socket.write(out[0]);
    else {
      let total = 0;
      for (const b of out) total += b.length;
      if (total <= SMALL_WRITE) {
        // mqtt-packet writes a small packet in several pieces: one socket write (one TLS record) instead of a corked batch
        ok = this.socket.write(Buffer.concat(out, total));
      } else {
        this.socket.cork();
        for (const b of out) ok = this.socket.write(b);
        this.socket.uncork();
      }
    }
    out.length = 0;
    if (ok) cb();
    else {
      const onDrain = (): void => {
        this.socket.removeListener('close', onDrain);
        this.socket.removeListener('drain', onDrain);
        cb();
      };
      this.socket.once('drain', onDrain);
      this.socket.once('close', onDrain);
    }
  }

  /** How an outbound packet starting with this byte is handled: passed through, peeked at (id tracking) or held back. */
  private outboundMode(b0: number): number {
    const type = b0 >> 4;
    if (type === CONNACK) return HOLD;
    if (type === SUBACK) return this.fixups.size > 0 ? HOLD : PASS;
    if (type === PUBLISH && this.session !== undefined && (b0 & 0x06) !== 0) return this.redeliver ? HOLD : PEEK;
    return PASS;
  }

  /**
   * Track packet boundaries of what aedes writes. Bytes pass through untouched
   * (mqtt-packet writes header, length, topic, id and payload as separate chunks,
   * some of them shared constant buffers: never mutated) and without allocation,
   * except for the few packets held back to be rewritten: CONNACK, SUBACK while a
   * duplicate-filter fix-up is pending, and re-deliveries right after a
   * CleanSession 0 reconnect (DUP 1). The packet id of a QoS>0 PUBLISH to a
   * CleanSession 0 session is read on the fly (peeked) for the DUP tracking.
   */
  private outbound(c: Buffer): void {
    const n = c.length;
    let off = 0;
    let runStart = 0;
    while (off < n) {
      if (this.oLeft > 0) {
        const k = Math.min(this.oLeft, n - off);
        off += k;
        this.oLeft -= k;
        continue;
      }
      if (this.oVarMul > 0) {
        // remaining length of a packet that is not held
        const byte = c[off++]!;
        this.oVarLen += (byte & 0x7f) * this.oVarMul;
        if ((byte & 0x80) === 0 || this.oVarMul >= 0x200000) {
          this.oVarMul = 0;
          if (this.oPeek === PEEK_NEXT) {
            this.oPeek = 1;
            this.oPeekLeft = this.oVarLen;
          } else this.oLeft = this.oVarLen;
        } else this.oVarMul *= 128;
        continue;
      }
      if (this.oPeek > 0) {
        off = this.peek(c, off, n);
        continue;
      }
      if (this.oHold === null) {
        const mode = this.outboundMode(c[off]!);
        if (mode !== HOLD) {
          off++;
          this.oVarMul = 1;
          this.oVarLen = 0;
          this.oPeek = mode === PEEK ? PEEK_NEXT : 0;
          continue;
        }
        if (off > runStart) this.oOut.push(c.subarray(runStart, off));
        this.oHold = [];
        this.oHoldLen = 0;
        this.oNeed = 2;
      }
      const take = Math.min(this.oNeed - this.oHoldLen, n - off);
      this.oHold.push(c.subarray(off, off + take));
      this.oHoldLen += take;
      off += take;
      runStart = off;
      if (this.oHoldLen >= this.oNeed) this.resolveHold();
    }
    if (off > runStart) this.oOut.push(runStart === 0 && off === n ? c : c.subarray(runStart, off));
  }

  /** Read a passing PUBLISH's topic length and packet id without holding it. Returns the new offset. */
  private peek(c: Buffer, off: number, n: number): number {
    // stages: 1 topic length MSB, 2 LSB, 3 skipping the topic, 4 packet id MSB, 5 LSB
    while (off < n && this.oPeek > 0 && this.oPeekLeft > 0) {
      if (this.oPeek === 3) {
        const k = Math.min(this.oPeekSkip, n - off, this.oPeekLeft);
        off += k;
        this.oPeekSkip -= k;
        this.oPeekLeft -= k;
        if (this.oPeekSkip === 0) this.oPeek = 4;
        continue;
      }
      const byte = c[off++]!;
      this.oPeekLeft--;
      if (this.oPeek === 1) {
        this.oPeekVal = byte << 8;
        this.oPeek = 2;
      } else if (this.oPeek === 2) {
        this.oPeekSkip = this.oPeekVal | byte;
        this.oPeek = this.oPeekSkip > 0 ? 3 : 4;
      } else if (this.oPeek === 4) {
        this.oPeekVal = byte << 8;
        this.oPeek = 5;
      } else {
        this.session?.unacked.add(this.oPeekVal | byte);
        this.oPeek = 0;
      }
    }
    if (this.oPeek === 0 || this.oPeekLeft === 0) {
      this.oPeek = 0;
      this.oLeft = this.oPeekLeft;
      this.oPeekLeft = 0;
    }
    return off;
  }

  private holdMore(held: Buffer, need: number): void {
    this.oHold = [held];
    this.oHoldLen = held.length;
    this.oNeed = need;
  }

  private release(buf: Buffer, heldLen: number, total: number): void {
    this.oHold = null;
    this.oHoldLen = 0;
    this.oOut.push(buf);
    this.oLeft = total - heldLen;
  }

  /** Enough bytes of a held outbound packet: decide, or ask for more (holdMore). */
  private resolveHold(): void {
    const held = Buffer.concat(this.oHold!, this.oHoldLen); // a copy: safe to modify
    const b0 = held[0]!;
    const type = b0 >> 4;
    let len = 0;
    let mul = 1;
    let h = 1;
    for (;;) {
      if (h >= held.length) return this.holdMore(held, h + 1);
      const byte = held[h]!;
      len += (byte & 0x7f) * mul;
      mul *= 128;
      h++;
      if ((byte & 0x80) === 0 || h === 5) break;
    }
    const total = h + len;
    if (type === PUBLISH) {
      if (total < h + 2 || (b0 & 0x06) === 0) return this.release(held, held.length, total);
      if (held.length < h + 2) return this.holdMore(held, h + 2);
      const idAt = h + 2 + u16(held, h);
      if (idAt + 2 > total) return this.release(held, held.length, total); // malformed: not ours to judge
      if (held.length < idAt + 2) return this.holdMore(held, idAt + 2);
      const id = u16(held, idAt);
      const r = this.redeliver;
      if (r) {
        // re-deliveries of the previous connection's in-flight messages come first (aedes sends in order)
        if (r.has(id)) {
          held[0] = b0 | 0x08;
          r.delete(id);
          if (r.size === 0) this.redeliver = undefined;
        } else this.redeliver = undefined;
      }
      this.session?.unacked.add(id);
      return this.release(held, held.length, total);
    }
    if (type !== CONNACK && type !== SUBACK) return this.release(held, held.length, total);
    if (held.length < total) return this.holdMore(held, total);
    if (type === CONNACK) return this.resolveConnack(held, h, total);
    // SUBACK
    const id = u16(held, h);
    const fix = this.fixups.get(id);
    if (!fix) return this.release(held, held.length, total);
    this.fixups.delete(id);
    const codes = held.subarray(h + 2, total);
    if (codes.length !== fix.lastRequested.length) return this.release(held, held.length, total);
    const expanded = fix.index.map((k, i) => {
      const g = codes[k]!;
      if (g === 0x80) return 0x80;
      // the server capped the QoS of the kept occurrence: apply the same cap to the others
      return g < fix.lastRequested[k]! ? Math.min(fix.requested[i]!, g) : fix.requested[i]!;
    });
    const body = Buffer.concat([held.subarray(h, h + 2), Buffer.from(expanded)]);
    this.release(Buffer.concat([Buffer.from([0x90]), encodeLength(body.length), body]), held.length, total);
  }

  private resolveConnack(held: Buffer, h: number, total: number): void {
    const first = !this.connackSeen;
    this.connackSeen = true;
    const rc = held[h + 1]!;
    if (rc > 5) {
      // aedes keepaliveLimit answers with 6, a code 3.1.1 does not have
      this.oHold = null;
      this.oHoldLen = 0;
      this.failure = { statement: 'MQTT-3.2.2-6', detail: `aedes refused the CONNECT with return code ${rc}, which MQTT 3.1.1 does not have (do not set aedes keepaliveLimit)` };
      this.fail();
      return;
    }
    if (rc !== 0) {
      this.phase = Phase.Done; // MQTT-3.1.4-5: nothing after a refused CONNECT is processed
      return this.release(held, held.length, total);
    }
    const sessions = this.opts.sessions;
    if (first && this.clientId !== undefined && sessions) {
      if (this.clean) sessions.discard(this.clientId);
      else {
        const existed = sessions.has(this.clientId);
        this.session = sessions.open(this.clientId);
        if (existed) {
          // MQTT-3.2.2-2: aedes reports a session only when it has subscriptions
          held[h] = held[h]! | 0x01;
          if (this.session.unacked.size > 0) this.redeliver = new Set(this.session.unacked);
        }
      }
    }
    this.release(held, held.length, total);
  }
}

/** MQTT variable-length integer (remaining length), also used by the tests' raw packet builders. */
export function encodeLength(n: number): Buffer {
  const out: number[] = [];
  do {
    let b = n % 128;
    n = Math.floor(n / 128);
    if (n > 0) b |= 0x80;
    out.push(b);
  } while (n > 0);
  return Buffer.from(out);
}

/** Wrap one device connection (net/TLS socket or WebSocket stream) for `aedes.handle()`. */
export function wrapConnection(stream: Duplex, opts: ConformanceOptions): ConformantConnection {
  return new ConformantConnection(stream, opts);
}

/** The socket under an aedes `client.conn`, wrapped or not (for TLS: getPeerCertificate()). */
export function underlyingSocket(conn: unknown): Duplex | undefined {
  if (conn instanceof ConformantConnection) return conn.socket;
  return conn instanceof Duplex ? conn : undefined;
}

// ---------------------------------------------------------------------------
// aedes hooks
// ---------------------------------------------------------------------------

type ForwardHook = NonNullable<AedesOptions['authorizeForward']>;
type SubscribeHook = NonNullable<AedesOptions['authorizeSubscribe']>;

/** aedes keeps the client's subscriptions (filter → { qos }) on the client object; not in its typings. */
function subscriptionsOf(client: Client): Record<string, { qos: number }> | undefined {
  const subs = (client as unknown as { subscriptions?: unknown }).subscriptions;
  return subs && typeof subs === 'object' ? (subs as Record<string, { qos: number }>) : undefined;
}

/**
 * The conformance fix-ups of `authorizeForward`, applied to what the inner hook
 * (the broker's ACL) returned:
 * - MQTT-4.7.2-1: a topic starting with `$` is delivered only through a filter
 *   that does not start with a wildcard (aedes lets retained and offline-queued
 *   `$` messages through `#` and `+/…`);
 * - MQTT-3.8.4-6 / MQTT-3.3.5-1: the delivery QoS is capped at the highest
 *   granted QoS of the client's matching subscriptions (aedes caps only when the
 *   filter equals the topic, so a QoS 1 `a/#` subscriber received QoS 2).
 * The packet handed to this hook is aedes's per-client copy, so capping it in
 * place also fixes the offline-queue path, which ignores a returned packet.
 */
function forwardFixups(client: Client, packet: AedesPublishPacket): AedesPublishPacket | null {
  const subs = subscriptionsOf(client);
  if (!subs) return packet;
  const topic = packet.topic;
  if (topic.charCodeAt(0) === 36 /* $ */) {
    let allowed = false;
    for (const f in subs) {
      const c = f.charCodeAt(0);
      if (c !== PLUS && c !== HASH && topicMatches(f, topic)) {
        allowed = true;
        break;
      }
    }
    if (!allowed) return null;
  }
  const qos = packet.qos;
  if (qos === 0) return packet;
  let lower = false;
  for (const f in subs) {
    if (subs[f]!.qos < qos) {
      lower = true;
      break;
    }
  }
  if (!lower) return packet; // fast path: no subscription could cap it
  let max = -1;
  for (const f in subs) {
    const q = subs[f]!.qos;
    if (q > max && topicMatches(f, topic)) {
      max = q;
      if (max >= qos) return packet;
    }
  }
  if (max < 0) return packet; // not delivered through a subscription (e.g. client.publish())
  // a message already in the offline queue has its id; capping it to 0 there would leave it in flight forever
  if (max === 0 && packet.messageId !== undefined) return packet;
  packet.qos = max as 0 | 1 | 2;
  return packet;
}

/**
 * aedes hooks with the conformance fix-ups, composed around the broker's own
 * hooks (`inner`), which run first. Spread the result into the aedes options.
 */
export function conformanceHooks(inner: Pick<AedesOptions, 'authorizeForward' | 'authorizeSubscribe'> = {}): Required<Pick<AedesOptions, 'authorizeForward' | 'authorizeSubscribe'>> {
  const innerForward: ForwardHook | undefined = inner.authorizeForward;
  const innerSubscribe: SubscribeHook | undefined = inner.authorizeSubscribe;
  const authorizeForward: ForwardHook = (client, packet) => {
    try {
      const r = innerForward ? innerForward(client, packet) : packet;
      if (!r) return null;
      return forwardFixups(client, r);
    } catch {
      return null; // a throw here would take the process down
    }
  };
  const authorizeSubscribe: SubscribeHook = (client, sub, done) => {
    let called = false;
    const once = (err: Error | null, granted?: Subscription | null): void => {
      if (called) return;
      called = true;
      // MQTT-3.8.4-1: aedes closes the connection on a hook error; refuse the filter (SUBACK 0x80) instead
      if (err) done(null, null);
      else done(null, granted === undefined ? sub : granted);
    };
    try {
      if (innerSubscribe) innerSubscribe(client, sub, once);
      else once(null, sub);
    } catch {
      once(null, null);
    }
  };
  return { authorizeForward, authorizeSubscribe };
}
