/**
 * The outbound half of the conformance guard: tracks the packet boundaries of what aedes writes
 * and rewrites the few packets aedes gets wrong for MQTT 3.1.1:
 *  - CONNACK: session present for a stored session without subscriptions (MQTT-3.2.2-2); a
 *    return code above 5 (aedes keepaliveLimit) is dropped and the connection closed (3.2.2-6);
 *  - SUBACK: one return code per filter when a SUBSCRIBE repeated a filter (3.8.4-4/5);
 *  - PUBLISH re-sent after a CleanSession 0 reconnect: DUP 1 (3.3.1-1), from the packet ids the
 *    session's tracker saw go out and not come back acknowledged.
 * Bytes pass through untouched and without allocation otherwise; `out` collects what to write.
 */
import { CONNACK, PUBLISH, SUBACK, Phase, u16, encodeLength, type GuardState, type SessionTracker } from './conformance-state.js';

// outbound handling of a packet
const PASS = 0;
const PEEK = 1;
const HOLD = 2;
/** oPeek value between the first byte and the end of the remaining length of a peeked PUBLISH */
const PEEK_NEXT = -1;

export class OutboundFixups {
  /** bytes ready to be written to the socket, in order */
  readonly out: Buffer[] = [];
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
  private connackSeen = false;
  /** ids unacknowledged in the previous connection of this session: re-sent with DUP 1 */
  private redeliver: Set<number> | undefined;

  constructor(
    private readonly st: GuardState,
    private readonly sessions: SessionTracker | undefined,
    /** a violation was recorded in st.failure */
    private readonly onFail: () => void,
  ) {}

  /** How an outbound packet starting with this byte is handled: passed through, peeked at (id tracking) or held back. */
  private outboundMode(b0: number): number {
    const type = b0 >> 4;
    if (type === CONNACK) return HOLD;
    if (type === SUBACK) return this.st.fixups !== undefined && this.st.fixups.size > 0 ? HOLD : PASS;
    if (type === PUBLISH && this.st.session !== undefined && (b0 & 0x06) !== 0) return this.redeliver ? HOLD : PEEK;
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
  write(c: Buffer): void {
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
        if (off > runStart) this.out.push(c.subarray(runStart, off));
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
    if (off > runStart) this.out.push(runStart === 0 && off === n ? c : c.subarray(runStart, off));
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
        this.st.session?.unacked.add(this.oPeekVal | byte);
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
    this.out.push(buf);
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
      this.st.session?.unacked.add(id);
      return this.release(held, held.length, total);
    }
    if (type !== CONNACK && type !== SUBACK) return this.release(held, held.length, total);
    if (held.length < total) return this.holdMore(held, total);
    if (type === CONNACK) return this.resolveConnack(held, h, total);
    // SUBACK
    const id = u16(held, h);
    const fix = this.st.fixups?.get(id);
    if (!fix) return this.release(held, held.length, total);
    this.st.fixups!.delete(id);
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
      this.st.failure = { statement: 'MQTT-3.2.2-6', detail: `aedes refused the CONNECT with return code ${rc}, which MQTT 3.1.1 does not have (do not set aedes keepaliveLimit)` };
      this.onFail();
      return;
    }
    if (rc !== 0) {
      this.st.phase = Phase.Done; // MQTT-3.1.4-5: nothing after a refused CONNECT is processed
      return this.release(held, held.length, total);
    }
    const sessions = this.sessions;
    if (first && this.st.clientId !== undefined && sessions) {
      if (this.st.clean) sessions.discard(this.st.clientId);
      else {
        const existed = sessions.has(this.st.clientId);
        this.st.session = sessions.open(this.st.clientId);
        if (existed) {
          // MQTT-3.2.2-2: aedes reports a session only when it has subscriptions
          held[h] = held[h]! | 0x01;
          if (this.st.session.unacked.size > 0) this.redeliver = new Set(this.st.session.unacked);
        }
      }
    }
    this.release(held, held.length, total);
  }
}
