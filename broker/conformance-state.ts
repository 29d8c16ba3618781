/**
 * State of the conformance guard shared by the connections of one broker (SessionTracker) and
 * by the two directions of one connection (GuardState: what the inbound validator learned from
 * CONNECT and SUBSCRIBE, what the outbound fix-ups learned from CONNACK), plus the packet
 * constants both directions use.
 */
import type { StatementId } from './conformance-statements.js';

// packet types
export const CONNECT = 1;
export const CONNACK = 2;
export const PUBLISH = 3;
export const PUBACK = 4;
export const PUBREC = 5;
export const PUBREL = 6;
export const PUBCOMP = 7;
export const SUBSCRIBE = 8;
export const SUBACK = 9;
export const UNSUBSCRIBE = 10;
export const PINGREQ = 12;
export const DISCONNECT = 14;

export const MAX_REMAINING_LENGTH = 268_435_455;
/** outbound pieces up to this many bytes in all are joined into one socket write */
export const SMALL_WRITE = 1024;
export const SLASH = 0x2f;
export const PLUS = 0x2b;
export const HASH = 0x23;

/** big-endian 16-bit read without Buffer#readUInt16BE's argument validation (callers checked the bounds) */
export const u16 = (b: Buffer, i: number): number => (b[i]! << 8) | b[i + 1]!;

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


// ---------------------------------------------------------------------------
// session tracking shared by the connections of one broker
// ---------------------------------------------------------------------------

export interface SessionState {
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

export const enum Phase {
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
export interface SubackFixup {
  requested: number[];
  /** for each filter of the packet: index of its distinct filter in aedes's answer */
  index: number[];
  /** requested QoS of the last occurrence of each distinct filter (the one aedes keeps) */
  lastRequested: number[];
}

/** A violation found, to be logged and answered once. */
export interface Failure {
  statement: StatementId;
  detail: string;
  connack?: number;
}

/** What one connection's inbound validator and outbound fix-ups share. */
export class GuardState {
  phase: Phase = Phase.Connect;
  clientId: string | undefined;
  clean = true;
  /** the CleanSession 0 session of this connection (known once its CONNACK 0 went out) */
  session: SessionState | undefined;
  /**
   * SUBSCRIBEs with repeated filters awaiting their SUBACK, by packet id; made on the first one
   * (almost no connection ever needs it, and an empty Map costs ~200 B on every idle connection)
   */
  fixups: Map<number, SubackFixup> | undefined;
  failure: Failure | undefined;
}

