/**
 * Pacing of TLS handshakes (a reconnect storm after a restart: thousands of devices at once).
 *
 * A TLS handshake costs milliseconds of CPU on the one event-loop thread. Started all at once,
 * 10 000 handshakes would each wait for the others: most would pass their handshake timeout,
 * fail, be charged to their source address (core/refusals.ts) and, behind one address (the
 * bench, a site NAT), get every later device of that address turned away. So the listeners
 * accept every TCP connection at once (the kernel's listen backlog stays empty) but hand at most
 * `broker.limits.max_handshakes` of them to TLS at a time; the others wait here, first come first
 * served, until a handshake ends. The handshake timeout starts when a connection leaves the
 * queue, so waiting is never a failure.
 *
 * Every connection is read first (its ClientHello is kept, at most MAX_BUFFERED bytes, and put
 * back with `unshift` before TLS takes the socket) and joins the queue only once its first bytes
 * arrived, so:
 *  - a client that gives up while it waits (its own connect timeout), or connects and closes
 *    without a word, is dropped at once without costing a handshake and without being charged;
 *  - a connection that stays silent for `connect_timeout_ms` after accept is closed and reported
 *    through `silent` (the listener charges it to its source, as the TLS handshake timeout it
 *    replaces would have been);
 *  - a connection whose ClientHello waited longer than `handshake_queue_timeout_ms` for a slot is
 *    closed (counted, never charged: the wait was the gateway's doing).
 * Bounded: every waiting connection is a socket counted against `broker.limits.max_connections`.
 * Cost: a connection reaches TLS one event-loop turn later than it would straight from accept.
 */
import type net from 'node:net';

/**
 * Handshakes started per event-loop turn. Starting one processes its ClientHello at once (~1 ms of
 * CPU), and Node accepts new connections between turns only (measured here: with a busy loop, about
 * one accept per turn), so a long turn leaves devices in the kernel's accept queue past their connect
 * timeout. The rest of the slots are filled on the next turns.
 */
export const STARTS_PER_TURN = 16;

/** Bytes read ahead from a waiting connection (a ClientHello is a few hundred; more waits in the kernel). */
export const MAX_BUFFERED = 16 * 1024;

export interface GateLimits {
  /** handshakes in progress at once */
  maxHandshakes: number;
  /** longest a connection waits for its handshake to start */
  queueTimeoutMs: number;
  /** longest a connection may stay silent after accept */
  silentTimeoutMs: number;
}

/** What the gate asks before a waiting connection starts its handshake (the source budget). */
export type AdmitAnswer = 'admit' | 'wait' | 'refuse';

export interface HandshakeGateOptions {
  limits: () => GateLimits;
  /** may this connection start its handshake now ('wait': leave it queued, try the next one) */
  admit: (source: string) => AdmitAnswer;
  /** a connection closed for staying silent for silentTimeoutMs (the gate destroyed it) */
  silent?: (sock: net.Socket, source: string) => void;
  now?: () => number;
}

interface Waiting {
  sock: net.Socket;
  source: string;
  /** accepted at */
  at: number;
  /** its first bytes arrived at (queued for a slot since) */
  readyAt: number;
  chunks: Buffer[];
  bytes: number;
  onData: (b: Buffer) => void;
  onClose: () => void;
  onEnd: () => void;
  start: (sock: net.Socket) => void;
  refused: (sock: net.Socket) => void;
}

export interface GateStatus {
  in_progress: number;
  /** connections whose ClientHello waits for a slot */
  queued: number;
  /** connections accepted that have not sent a byte yet */
  silent: number;
  /** connections that waited longer than handshake_queue_timeout_ms (closed) */
  queue_timeouts: number;
  /** connections closed for staying silent connect_timeout_ms */
  silent_timeouts: number;
  /** connections whose client left before their handshake started */
  left_while_queued: number;
  /** the longest any connection waited for its slot, ms */
  max_wait_ms: number;
}

export class HandshakeGate {
  /** accepted, nothing received yet (in accept order) */
  private readonly silentSet = new Set<Waiting>();
  /** ClientHello received, waiting for a slot (in arrival order) */
  private readonly queue = new Set<Waiting>();
  /** raw sockets whose handshake is in progress, by remote ADDRESS:PORT (how the TLS socket names them too) */
  private readonly running = new Map<string, net.Socket>();
  private sweepTimer: ReturnType<typeof setInterval> | undefined;
  private queueTimeouts = 0;
  private silentTimeouts = 0;
  private left = 0;
  private maxWait = 0;
  private closed = false;
  private pumpScheduled = false;
  private readonly now: () => number;

  constructor(private readonly o: HandshakeGateOptions) {
    this.now = o.now ?? Date.now;
  }

  /**
   * A new connection: `start` is called with it (its first bytes put back) once it may begin its
   * TLS handshake, `refused` when its source is turned away by the budget meanwhile; the gate
   * closes the socket itself when the client leaves, stays silent or waits too long.
   */
  submit(sock: net.Socket, source: string, start: (sock: net.Socket) => void, refused: (sock: net.Socket) => void): void {
    if (this.closed) {
      sock.destroy();
      return;
    }
    const w: Waiting = {
      sock,
      source,
      at: this.now(),
      readyAt: 0,
      chunks: [],
      bytes: 0,
      start,
      refused,
      onData: (b: Buffer) => {
        w.chunks.push(b);
        w.bytes += b.length;
        if (w.bytes >= MAX_BUFFERED) sock.pause(); // the rest stays in the kernel until the handshake
        if (this.silentSet.delete(w)) {
          w.readyAt = this.now();
          this.queue.add(w);
          this.schedulePump();
        }
      },
      onClose: () => {
        if (this.silentSet.delete(w) || this.queue.delete(w)) this.left++;
      },
      // the client closed (FIN or reset) before its turn: gone, whatever it sent (the pump runs a turn later so
      // that a ClientHello read together with its client's FIN — a client that gave up in the kernel's accept
      // queue — is dropped here instead of costing a handshake that fails and is charged to its source)
      onEnd: () => {
        if (!this.silentSet.has(w) && !this.queue.has(w)) return;
        this.unqueue(w);
        this.left++;
        w.sock.destroy();
      },
    };
    sock.on('data', w.onData);
    sock.once('close', w.onClose);
    sock.once('end', w.onEnd);
    sock.once('error', w.onEnd);
    this.silentSet.add(w);
    this.armSweep();
  }

  private begin(sock: net.Socket, start: (sock: net.Socket) => void): void {
    const key = `${sock.remoteAddress ?? '?'}:${sock.remotePort ?? '?'}`;
    this.running.set(key, sock);
    // the slot frees when the handshake is over (done(), from the listener) or the socket closed
    sock.once('close', () => this.done(key, sock));
    start(sock);
  }

  /** The handshake of the connection from `remote` (ADDRESS:PORT) ended, either way: its slot goes to the next waiting one. */
  done(remote: string, sock?: net.Socket): void {
    const s = this.running.get(remote);
    if (s === undefined || (sock !== undefined && s !== sock)) return;
    this.running.delete(remote);
    this.pump();
  }

  /** One pump per event-loop turn, after this turn's reads (and the FINs that came with them). */
  private schedulePump(): void {
    if (this.pumpScheduled) return;
    this.pumpScheduled = true;
    setImmediate(() => {
      this.pumpScheduled = false;
      this.pump();
    });
  }

  private pump(): void {
    const { maxHandshakes } = this.o.limits();
    let waiting: Set<string> | undefined;
    let started = 0;
    for (const w of this.queue) {
      if (this.running.size >= maxHandshakes) break;
      if (started >= STARTS_PER_TURN) {
        this.schedulePump();
        break;
      }
      if (waiting?.has(w.source)) continue;
      const a = this.o.admit(w.source);
      if (a === 'wait') {
        (waiting ??= new Set()).add(w.source);
        continue;
      }
      this.unqueue(w);
      if (a === 'refuse') {
        w.refused(w.sock);
        continue;
      }
      this.maxWait = Math.max(this.maxWait, this.now() - w.readyAt);
      const { sock } = w;
      sock.unshift(w.chunks.length === 1 ? w.chunks[0]! : Buffer.concat(w.chunks));
      started++;
      this.begin(sock, w.start);
    }
    this.maybeDisarm();
  }

  /** Stop reading for the gate: TLS takes the socket (paused, the bytes read put back by the caller). */
  private unqueue(w: Waiting): void {
    this.queue.delete(w);
    this.silentSet.delete(w);
    w.sock.off('data', w.onData);
    w.sock.off('close', w.onClose);
    w.sock.off('end', w.onEnd);
    w.sock.off('error', w.onEnd);
    w.sock.pause();
  }

  private armSweep(): void {
    if (this.sweepTimer) return;
    const l = this.o.limits();
    const every = Math.max(100, Math.min(1000, Math.floor(Math.min(l.queueTimeoutMs, l.silentTimeoutMs) / 4)));
    this.sweepTimer = setInterval(() => this.sweep(), every);
    this.sweepTimer.unref();
  }

  private maybeDisarm(): void {
    if (this.queue.size > 0 || this.silentSet.size > 0 || !this.sweepTimer) return;
    clearInterval(this.sweepTimer);
    this.sweepTimer = undefined;
  }

  /** Close the connections that stayed silent or waited too long (oldest first: both sets are in time order). */
  sweep(): void {
    const { queueTimeoutMs, silentTimeoutMs } = this.o.limits();
    const t = this.now();
    for (const w of this.silentSet) {
      if (w.at > t - silentTimeoutMs) break;
      this.unqueue(w);
      this.silentTimeouts++;
      w.sock.destroy();
      this.o.silent?.(w.sock, w.source);
    }
    for (const w of this.queue) {
      if (w.readyAt > t - queueTimeoutMs) break;
      this.unqueue(w);
      this.queueTimeouts++;
      w.sock.destroy();
    }
    // a source that was waiting for its attempts in flight may be admissible now (time refills budgets)
    this.pump();
  }

  status(): GateStatus {
    return {
      in_progress: this.running.size,
      queued: this.queue.size,
      silent: this.silentSet.size,
      queue_timeouts: this.queueTimeouts,
      silent_timeouts: this.silentTimeouts,
      left_while_queued: this.left,
      max_wait_ms: this.maxWait,
    };
  }

  /** Shutdown: every waiting connection is closed; no new one is taken. */
  close(): void {
    this.closed = true;
    if (this.sweepTimer) clearInterval(this.sweepTimer);
    this.sweepTimer = undefined;
    for (const w of [...this.silentSet, ...this.queue]) {
      this.unqueue(w);
      w.sock.destroy();
    }
  }
}
