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
 * While it waits, a connection is read (its ClientHello is kept, at most MAX_BUFFERED bytes) so
 * that a client which gives up (its own connect timeout) is noticed at once and dropped from the
 * queue without costing a handshake; the bytes read are put back (`unshift`) before TLS takes the
 * socket. A connection waiting longer than `broker.limits.handshake_queue_timeout_ms` is closed
 * (counted, never charged to its source). Bounded: every queued connection is a socket counted
 * against `broker.limits.max_connections`.
 */
import type net from 'node:net';

/** Bytes read ahead from a waiting connection (a ClientHello is a few hundred; more waits in the kernel). */
export const MAX_BUFFERED = 16 * 1024;

export interface GateLimits {
  /** handshakes in progress at once */
  maxHandshakes: number;
  /** longest a connection waits for its handshake to start */
  queueTimeoutMs: number;
}

/** What the gate asks before a waiting connection starts its handshake (the source budget). */
export type AdmitAnswer = 'admit' | 'wait' | 'refuse';

export interface HandshakeGateOptions {
  limits: () => GateLimits;
  /** may this connection start its handshake now ('wait': leave it queued, try the next one) */
  admit: (source: string) => AdmitAnswer;
  now?: () => number;
}

interface Waiting {
  sock: net.Socket;
  source: string;
  at: number;
  chunks: Buffer[];
  bytes: number;
  onData: (b: Buffer) => void;
  onClose: () => void;
  start: (sock: net.Socket) => void;
  refused: (sock: net.Socket) => void;
}

export interface GateStatus {
  in_progress: number;
  queued: number;
  /** connections that waited longer than handshake_queue_timeout_ms (closed) */
  queue_timeouts: number;
  /** connections whose client left while they waited */
  left_while_queued: number;
  /** the longest any connection waited, ms */
  max_wait_ms: number;
}

export class HandshakeGate {
  private readonly queue = new Set<Waiting>();
  /** raw sockets whose handshake is in progress, by remote ADDRESS:PORT (how the TLS socket names them too) */
  private readonly running = new Map<string, net.Socket>();
  private sweepTimer: ReturnType<typeof setInterval> | undefined;
  private queueTimeouts = 0;
  private left = 0;
  private maxWait = 0;
  private closed = false;
  private readonly now: () => number;

  constructor(private readonly o: HandshakeGateOptions) {
    this.now = o.now ?? Date.now;
  }

  /**
   * A new connection: `start` is called with it once it may begin its TLS handshake (at once when a
   * slot is free), `refused` when its source is turned away by the budget meanwhile; the gate
   * closes the socket itself when the client leaves or the wait times out.
   */
  submit(sock: net.Socket, source: string, start: (sock: net.Socket) => void, refused: (sock: net.Socket) => void): void {
    if (this.closed) {
      sock.destroy();
      return;
    }
    if (this.queue.size === 0 && this.running.size < this.o.limits().maxHandshakes) {
      const a = this.o.admit(source);
      if (a === 'admit') return this.begin(sock, start);
      if (a === 'refuse') return refused(sock);
    }
    const w: Waiting = {
      sock,
      source,
      at: this.now(),
      chunks: [],
      bytes: 0,
      start,
      refused,
      onData: (b: Buffer) => {
        w.chunks.push(b);
        w.bytes += b.length;
        if (w.bytes >= MAX_BUFFERED) sock.pause(); // the rest stays in the kernel until the handshake
      },
      onClose: () => {
        if (this.queue.delete(w)) this.left++;
      },
    };
    sock.on('data', w.onData);
    sock.once('close', w.onClose);
    this.queue.add(w);
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

  private pump(): void {
    const { maxHandshakes } = this.o.limits();
    let waiting: Set<string> | undefined;
    for (const w of this.queue) {
      if (this.running.size >= maxHandshakes) break;
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
      this.maxWait = Math.max(this.maxWait, this.now() - w.at);
      const { sock } = w;
      if (w.chunks.length > 0) sock.unshift(w.chunks.length === 1 ? w.chunks[0]! : Buffer.concat(w.chunks));
      this.begin(sock, w.start);
    }
    if (this.queue.size === 0) this.disarmSweep();
  }

  /** Stop reading for the gate: TLS takes the socket (paused, the bytes read put back by the caller). */
  private unqueue(w: Waiting): void {
    this.queue.delete(w);
    w.sock.off('data', w.onData);
    w.sock.off('close', w.onClose);
    w.sock.pause();
  }

  private armSweep(): void {
    if (this.sweepTimer) return;
    const every = Math.max(100, Math.min(1000, Math.floor(this.o.limits().queueTimeoutMs / 4)));
    this.sweepTimer = setInterval(() => this.sweep(), every);
    this.sweepTimer.unref();
  }

  private disarmSweep(): void {
    if (this.sweepTimer) clearInterval(this.sweepTimer);
    this.sweepTimer = undefined;
  }

  /** Close the connections that waited too long (oldest first: the queue is in arrival order). */
  sweep(): void {
    const limit = this.now() - this.o.limits().queueTimeoutMs;
    for (const w of this.queue) {
      if (w.at > limit) break;
      this.unqueue(w);
      this.queueTimeouts++;
      w.sock.destroy();
    }
    // a source that was waiting for its attempts in flight may be admissible now (time refills budgets)
    this.pump();
  }

  status(): GateStatus {
    return { in_progress: this.running.size, queued: this.queue.size, queue_timeouts: this.queueTimeouts, left_while_queued: this.left, max_wait_ms: this.maxWait };
  }

  /** Shutdown: every waiting connection is closed; no new one is taken. */
  close(): void {
    this.closed = true;
    this.disarmSweep();
    for (const w of [...this.queue]) {
      this.unqueue(w);
      w.sock.destroy();
    }
  }
}
