/**
 * MQTT 3.1.1 conformance guard for the embedded aedes broker.
 *
 * aedes 1.2 accepts things a 3.1.1 server must refuse (empty client id with
 * CleanSession 0, ill-formed UTF-8, `a+` filters, empty SUBSCRIBE …) and gets a
 * few outbound details wrong (CONNACK code 6, DUP flags, SUBACK length …).
 * This module sits between each device connection and `aedes.handle()` and
 * fixes what can be fixed from outside aedes. By concern: conformance-inbound.ts (the inbound
 * validator), conformance-outbound.ts (outbound fix-ups), conformance-hooks.ts (aedes hook
 * decorators), conformance-state.ts (session tracker, shared state), conformance-statements.ts
 * (the statement ids); this file is the connection that ties them to the socket. docs/mqtt-conformance.md lists
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
 *   PUBLISH payload is never scanned: only the fixed header, topic
 *   name and packet id are looked at; payloads stream through as they arrive,
 *   except that a large PUBLISH first waits for room in the broker's in-flight
 *   budget (`largePublish`; the socket is paused meanwhile) and is then gathered
 *   into one buffer and handed on whole, so aedes holds one copy of it).
 *   On a violation the guard logs one line (code ECONN_MQTT_PROTOCOL,
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
import type { Logger } from '../core/logger.js';
import { corkUntilNextTick } from '../core/net.js';
import { STATEMENTS, type StatementId } from './conformance-statements.js';
import { GuardState, Phase, SMALL_WRITE, type SessionTracker } from './conformance-state.js';
import { InboundValidator } from './conformance-inbound.js';
import { OutboundFixups } from './conformance-outbound.js';
import type { BudgetTicket, InflightBudget } from './inflight-budget.js';

export { STATEMENTS, type StatementId } from './conformance-statements.js';
export { SessionTracker, encodeLength, type SessionState } from './conformance-state.js';
export { conformanceHooks, topicMatches } from './conformance-hooks.js';

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
  /**
   * The broker's budget of large publishes in memory: a PUBLISH whose remaining length is above
   * `thresholdBytes` is read only once the budget granted its length; until then the socket is
   * paused. The broker takes the ticket with {@link ConformantConnection.takeLargeTicket} when it
   * handles the publish and releases it once aedes is done with it; tickets not taken go back on close.
   */
  largePublish?: { thresholdBytes: number; budget: InflightBudget };
}

/** A granted (or waiting) share of the large-publish budget for one PUBLISH of this connection. */
interface LargeTicket {
  ticket: BudgetTicket;
  topic: string;
  payloadBytes: number;
}

/** A Duplex between one device socket and aedes; see the module header. */
export class ConformantConnection extends Duplex {
  /** The wrapped stream (net.Socket, tls.TLSSocket or a WebSocket stream). */
  readonly socket: Duplex;
  /** Set by aedes (`conn.client = client`). */
  client?: unknown;

  private readonly opts: ConformanceOptions;
  /** what the two directions share (phase, client id, session, SUBACK fix-ups, the violation found) */
  private readonly st = new GuardState();
  private readonly inbound: InboundValidator;
  private readonly outbound: OutboundFixups;
  private readPaused = false;
  /** large PUBLISHes admitted (or waiting) and not yet taken by the broker, in receive order */
  private readonly tickets: LargeTicket[] = [];

  private graceTimer: NodeJS.Timeout | undefined;
  private graceful = false;
  // writes of one event-loop turn go out together (corkUntilNextTick): the PUBACKs of a journal group commit
  // are all written in the same turn, so a device with several publishes in it gets them in one TLS record
  // and one write (measured at 5 000 msg/s over 10 devices: ~1.8 PUBACKs per device per commit)

  private readonly onData = (chunk: Buffer): void => this.inbound.inbound(chunk);

  constructor(socket: Duplex, opts: ConformanceOptions) {
    super({
      allowHalfOpen: false,
      readableHighWaterMark: socket.readableHighWaterMark,
      writableHighWaterMark: socket.writableHighWaterMark,
    });
    this.socket = socket;
    this.opts = opts;
    const lp = opts.largePublish;
    this.inbound = new InboundValidator(
      this.st,
      opts,
      (b) => this.forward(b),
      () => this.fail(),
      lp?.thresholdBytes,
      lp ? (len, topic, payloadBytes) => this.admitLarge(lp.budget, len, topic, payloadBytes) : undefined,
    );
    this.outbound = new OutboundFixups(this.st, opts.sessions, () => this.fail());
    socket.on('data', this.onData);
    socket.on('end', () => {
      if (this.st.phase !== Phase.Closing) this.push(null);
    });
    socket.on('error', (err: Error) => this.destroy(err));
    socket.on('close', () => {
      if (this.graceTimer) clearTimeout(this.graceTimer);
      if (!this.destroyed) this.destroy();
    });
  }

  // ---- readable side (socket → aedes) ----

  override _read(): void {
    if (this.readPaused && !this.inbound.waiting && this.st.phase !== Phase.Closing) {
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

  /** A large PUBLISH header arrived: ask the budget; false pauses the socket until it is granted. */
  private admitLarge(budget: InflightBudget, len: number, topic: string, payloadBytes: number): boolean {
    const ticket = budget.acquire(len, () => this.onGranted(ticket));
    this.tickets.push({ ticket, topic, payloadBytes });
    if (ticket.granted) return true;
    this.socket.pause();
    return false;
  }

  private onGranted(ticket: BudgetTicket): void {
    if (this.destroyed || this.st.phase === Phase.Closing) {
      ticket.release();
      return;
    }
    try {
      this.inbound.resume();
    } catch (err) {
      this.destroy(err as Error);
      return;
    }
    if (this.inbound.waiting || this.destroyed || (this.st.phase as Phase) === Phase.Closing) return; // another large PUBLISH waits in turn
    // aedes may have asked for more (_read) while this one waited: that request was not served then
    if (this.readPaused && this.readableLength < this.readableHighWaterMark) this.readPaused = false;
    if (!this.readPaused) this.socket.resume();
  }

  /**
   * The budget ticket of the large PUBLISH the broker is handling now (same topic and payload
   * size), or undefined for a publish that did not need one. Tickets before it in receive order
   * belong to publishes aedes never handed over (it dropped them): they are released here.
   * The caller releases the returned ticket once aedes is done with the publish (broker/hooks.ts).
   */
  takeLargeTicket(topic: string, payloadBytes: number): BudgetTicket | undefined {
    // every PUBLISH asks; almost none is large: no search (and no closure) when no ticket is held
    if (this.tickets.length === 0) return undefined;
    const i = this.tickets.findIndex((t) => t.payloadBytes === payloadBytes && t.topic === topic);
    if (i < 0) return undefined;
    const stale = this.tickets.splice(0, i + 1);
    const mine = stale.pop()!;
    for (const t of stale) t.ticket.release();
    return mine.ticket;
  }

  /**
   * Whether the incoming QoS>0 PUBLISH with this packet id carried DUP 1 (the guard clears the
   * flag before aedes sees it, MQTT-3.3.1-3). Call once per PUBLISH, in receive order: it consumes.
   */
  takeIncomingDup(packetId: number): boolean {
    return this.inbound.takeIncomingDup(packetId);
  }

  /** Log the recorded violation once, answer it, close the connection and let aedes see the close. */
  private fail(): void {
    const f = this.st.failure ?? { statement: 'MQTT-4.8.0-1' as StatementId, detail: 'protocol violation' };
    if (this.st.phase === Phase.Closing) return;
    this.st.phase = Phase.Closing;
    this.inbound.reset();
    this.log(f.statement, f.detail, f.connack);
    this.closeSocket(f.connack);
    this.destroy();
  }

  private log(statement: StatementId, detail: string, connack?: number): void {
    try {
      const s = this.socket as Duplex & { remoteAddress?: string; remotePort?: number };
      const peer = this.opts.peer ?? (s.remoteAddress !== undefined ? `${s.remoteAddress}:${s.remotePort ?? ''}` : undefined);
      this.opts.logger
        .child({ component: 'mqtt-conformance', ...(peer ? { peer } : {}), ...(this.st.clientId !== undefined ? { clientId: this.st.clientId } : {}) })
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
    this.outbound.write(chunk);
    this.flushOut(cb);
  }

  override _writev(chunks: Array<{ chunk: Buffer; encoding: BufferEncoding }>, cb: (error?: Error | null) => void): void {
    for (const c of chunks) this.outbound.write(c.chunk);
    this.flushOut(cb);
  }

  override _final(cb: (error?: Error | null) => void): void {
    if (!this.graceful) this.socket.end();
    cb();
  }

  override _destroy(err: Error | null, cb: (error?: Error | null) => void): void {
    this.socket.removeListener('data', this.onData);
    this.inbound.reset();
    for (const t of this.tickets.splice(0)) t.ticket.release();
    if (!this.graceful) this.socket.destroy();
    cb(err);
  }

  private flushOut(cb: (error?: Error | null) => void): void {
    const out = this.outbound.out;
    if (out.length === 0 || this.st.phase === Phase.Closing || this.socket.destroyed) {
      out.length = 0;
      cb();
      return;
    }
    let ok = true;
    corkUntilNextTick(this.socket);
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
