/**
 * The device-facing listeners of the broker and their TLS context.
 *
 *  - MQTT over TLS (tls.Server), MQTT over secure WebSocket (https.Server + ws, path
 *    broker.listeners.wss.path), and an optional plain listener on loopback for local
 *    applications (auth `none` or `jwt`).
 *  - TLS ≥ 1.2; server certificate from broker.tls.cert_file/key_file or the local PKI; client
 *    certificates are requested but not required by OpenSSL (rejectUnauthorized: false) so a
 *    token-only device can connect in `cert|jwt` mode; identity/auth.ts decides.
 *  - Every accepted socket gets TCP_NODELAY (neither aedes nor mqtt.js sets it; Nagle adds
 *    milliseconds to small packets) and counts against broker.limits.max_connections; over it,
 *    the socket is destroyed at once and the refusal logged at most every 10 s.
 *  - TLS handshakes are paced (handshake-gate.ts): each TLS listener is a plain net.Server that
 *    accepts every connection at once and hands at most broker.limits.max_handshakes of them to
 *    its tls.Server / https.Server (`emit('connection')`, never listening itself) at a time; the
 *    rest wait in arrival order, and their handshake timeout starts when they leave the queue.
 *  - A source address that caused more refusals (failed handshakes, refused credentials) than
 *    broker.limits.refused_per_source_burst is closed at accept, before the TLS handshake,
 *    until its budget refills (core/refusals.ts); a waiting connection asks its source's budget
 *    again when its turn comes. Refusals are logged in full for the first few of an interval,
 *    then as one summary line per interval.
 *  - A new TLS context (reload, renewed server certificate) applies to new handshakes; live
 *    sessions keep theirs.
 * Each accepted MQTT byte stream (TLS socket, WebSocket stream, loopback socket) is handed to
 * `onStream`, which puts the conformance guard and aedes behind it (broker.ts).
 */
import { readFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import net from 'node:net';
import tls from 'node:tls';
import https from 'node:https';
import type { IncomingMessage } from 'node:http';
import type { Duplex } from 'node:stream';
import { WebSocketServer, createWebSocketStream, type WebSocket } from 'ws';
import type { Config } from '../core/config/schema.js';
import type { Logger } from '../core/logger.js';
import { listen } from '../core/net.js';
import { ConnectorError } from '../core/errors.js';
import type { RefusalLog, SourceBudget } from '../core/refusals.js';
import type { ListenerAuth } from '../identity/auth.js';
import { loadServerCredentials } from '../identity/server-cert.js';
import { HandshakeGate, type GateStatus } from './handshake-gate.js';

/**
 * Whether ws unmasks what devices send over MQTT/WSS with its native helper, bufferutil (an
 * optional dependency with prebuilt binaries for Linux x64 and arm64). Every client → server
 * WebSocket frame is masked, and ws's JavaScript fallback XORs it a byte at a time: 1.97 ms of CPU
 * per MiB on the 2-vCPU reference machine, against 0.04 ms native — about 2 ms per MiB received
 * over MQTT/WSS, next to the 10–12 ms per MiB the daemon spends on a large publish over MQTT/TLS
 * (`npm run bench`). The same rule as ws's own: WS_NO_BUFFER_UTIL turns it off. Asked once, at start.
 */
export function nativeUnmask(): boolean {
  if (process.env.WS_NO_BUFFER_UTIL) return false;
  try {
    const require = createRequire(import.meta.url);
    require('bufferutil');
    return true;
  } catch {
    return false;
  }
}

export type ListenerName = 'tls' | 'wss' | 'local';
export const PORT_KEYS: Record<ListenerName, string> = { tls: 'mqtt_tls', wss: 'mqtt_wss', local: 'mqtt_local' };

/** What the listeners need from the local PKI (LocalPki satisfies it). */
export interface ListenerPki {
  trustedDeviceCaPems(): string[];
  serverCredentials(): { cert: string; key: string };
}

/** Who is on the other end of an accepted stream. */
export interface StreamOrigin {
  listener: ListenerName;
  auth: ListenerAuth;
  tls: tls.TLSSocket | undefined;
  remote: string;
}

export interface ListenersOptions {
  log: Logger;
  pki: ListenerPki;
  /** the current `broker:` section (it changes on reload) */
  config: () => Config['broker'];
  /** largest WebSocket message accepted (an MQTT packet) */
  maxPacketBytes: () => number;
  /** an accepted MQTT byte stream */
  onStream: (stream: Duplex, origin: StreamOrigin, req?: IncomingMessage) => void;
  /** a connection refused over broker.limits.max_connections */
  onRefused?: (listener: ListenerName) => void;
  /** refused connections (failed handshakes, sources over budget) are logged through it (core/refusals.ts) */
  refusals: RefusalLog;
  /** refusals per source address (broker.limits.refused_per_source_*): a source over it is closed before the TLS handshake */
  budget: SourceBudget;
  /** are we shutting down (new sockets are destroyed) */
  closing: () => boolean;
}

export function remoteOf(s: net.Socket | undefined): string {
  if (!s) return 'unknown';
  return `${s.remoteAddress ?? '?'}:${s.remotePort ?? '?'}`;
}

/**
 * Listen backlog of a device listener: connections the kernel completes before the daemon accepts
 * them. Node's default (511) overflows in a reconnect storm while the event loop is busy with
 * handshakes, and a SYN dropped there is retried by the client only after 1, 3, 7, 15 s: devices
 * pass their connect timeout without ever reaching the gate. The kernel caps it at
 * net.core.somaxconn (4096 on current kernels).
 */
export function listenBacklog(maxConnections: number): number {
  return Math.max(511, Math.min(65535, maxConnections));
}

export class DeviceListeners {
  private tlsServer: tls.Server | undefined;
  private httpsServer: https.Server | undefined;
  /** the listening fronts of tlsServer and httpsServer (they take their connections from the gate) */
  private tlsFront: net.Server | undefined;
  private wssFront: net.Server | undefined;
  private readonly gate: HandshakeGate;
  private wss: WebSocketServer | undefined;
  private wssNativeUnmask = false;
  private localServer: net.Server | undefined;
  private readonly sockets: Record<ListenerName, Set<net.Socket>> = { tls: new Set(), wss: new Set(), local: new Set() };
  readonly ports = new Map<ListenerName, number>();
  private tlsPems = '';
  private limitRefusals = 0;
  private lastLimitLog = 0;

  constructor(private readonly o: ListenersOptions) {
    this.gate = new HandshakeGate({
      limits: () => {
        const l = this.o.config().limits;
        return { maxHandshakes: l.max_handshakes, queueTimeoutMs: l.handshake_queue_timeout_ms, silentTimeoutMs: l.connect_timeout_ms };
      },
      admit: (source) => (this.o.closing() ? 'refuse' : this.o.budget.tryAdmit(source)),
      // silent for connect_timeout_ms after accept: charged like the handshake timeout it stands for
      silent: (sock, source) => {
        this.o.budget.refused(source);
        this.log.debug({ remote: remoteOf(sock) }, 'TLS handshake failed: nothing received within broker.limits.connect_timeout_ms');
        this.o.refusals.count('ECONN_TLS_HANDSHAKE', source);
      },
    });
  }

  private get log(): Logger {
    return this.o.log;
  }

  auth(l: ListenerName): ListenerAuth {
    return this.o.config().listeners[l].auth;
  }

  /** Bind every enabled listener (throws ECONN_LISTEN / ECONN_CONFIG_INVALID). */
  async start(): Promise<void> {
    const b = this.o.config();
    const tlsOpts = await this.secureContextOptions();
    const L = b.listeners;
    if (L.tls.enabled) {
      const server = tls.createServer({
        ...tlsOpts,
        requestCert: true,
        rejectUnauthorized: false,
        handshakeTimeout: b.limits.connect_timeout_ms,
      });
      this.tlsServer = server;
      server.on('secureConnection', (s: tls.TLSSocket) => {
        this.gate.done(remoteOf(s));
        this.accept(s, { listener: 'tls', auth: this.auth('tls'), tls: s, remote: remoteOf(s) });
      });
      server.on('tlsClientError', (err: Error, s: tls.TLSSocket) => this.handshakeFailed('tls', err, s));
      server.on('error', (err) => this.log.error({ err }, 'MQTT/TLS listener error'));
      const front = net.createServer((s) => this.onRawConnection('tls', s, server));
      this.tlsFront = front;
      front.on('error', (err) => this.log.error({ err }, 'MQTT/TLS listener error'));
      this.ports.set('tls', await listen(front, L.tls.host, L.tls.port, 'MQTT/TLS', 'broker.listeners.tls.port', listenBacklog(b.limits.max_connections)));
    }
    if (L.wss.enabled) {
      const server = https.createServer(
        { ...tlsOpts, requestCert: true, rejectUnauthorized: false, handshakeTimeout: b.limits.connect_timeout_ms, requestTimeout: b.limits.connect_timeout_ms },
        (_req, res) => {
          res.writeHead(426, { 'content-type': 'text/plain', connection: 'close', upgrade: 'websocket' });
          res.end(`MQTT over WebSocket only (path ${this.o.config().listeners.wss.path})\n`);
        },
      );
      this.httpsServer = server;
      server.on('secureConnection', (s: tls.TLSSocket) => this.gate.done(remoteOf(s)));
      server.on('tlsClientError', (err: Error, s: tls.TLSSocket) => this.handshakeFailed('wss', err, s));
      server.on('error', (err) => this.log.error({ err }, 'MQTT/WSS listener error'));
      const wss = new WebSocketServer({
        server,
        path: L.wss.path,
        maxPayload: this.o.maxPacketBytes(),
        perMessageDeflate: false,
        handleProtocols: (protocols) => (protocols.has('mqtt') ? 'mqtt' : protocols.has('mqttv3.1') ? 'mqttv3.1' : false),
      });
      this.wss = wss;
      wss.on('connection', (ws: WebSocket, req: IncomingMessage) => {
        try {
          const sock = req.socket as tls.TLSSocket;
          const stream = createWebSocketStream(ws);
          stream.on('error', () => {}); // aedes reports errors through its own listener; never unhandled
          this.accept(stream, { listener: 'wss', auth: this.auth('wss'), tls: sock, remote: remoteOf(sock) }, req);
        } catch (err) {
          this.log.error({ err }, 'error accepting a WebSocket connection');
          ws.terminate();
        }
      });
      wss.on('error', (err) => this.log.error({ err }, 'WebSocket server error'));
      const front = net.createServer((s) => this.onRawConnection('wss', s, server));
      this.wssFront = front;
      front.on('error', (err) => this.log.error({ err }, 'MQTT/WSS listener error'));
      this.ports.set('wss', await listen(front, L.wss.host, L.wss.port, 'MQTT/WSS', 'broker.listeners.wss.port', listenBacklog(b.limits.max_connections)));
      // the https server itself never listens: 'listening' starts its request-timeout checks as listen() would
      server.emit('listening');
      this.wssNativeUnmask = nativeUnmask();
      if (!this.wssNativeUnmask) {
        this.log.info(
          { listener: 'wss', native_unmask: false },
          "MQTT/WSS: device frames are unmasked in JavaScript (ws's optional native helper bufferutil is not installed, cannot load on this platform, or WS_NO_BUFFER_UTIL is set); that costs about 2 ms more CPU per MiB received over WebSocket. `npm install bufferutil` in the installation directory adds it",
        );
      }
    }
    if (L.local.enabled) {
      const server = net.createServer((s) => {
        if (this.onRawConnection('local', s)) this.accept(s, { listener: 'local', auth: this.auth('local'), tls: undefined, remote: remoteOf(s) });
      });
      this.localServer = server;
      server.on('error', (err) => this.log.error({ err }, 'local MQTT listener error'));
      this.ports.set('local', await listen(server, L.local.host, L.local.port, 'local MQTT', 'broker.listeners.local.port'));
      if (L.local.auth === 'none') {
        this.log.warn(
          { host: L.local.host, port: this.ports.get('local'), rules: L.local.acl.length },
          'plain local MQTT listener accepts ANONYMOUS clients (broker.listeners.local.auth: none); every process on this host can connect',
        );
      }
    }
  }

  /** Stop accepting; resolves when the servers closed (bounded by the caller). */
  stopAccepting(): Promise<void> {
    const servers = [this.tlsFront, this.wssFront, this.localServer].filter((s): s is net.Server => s !== undefined && s.listening);
    const closed = Promise.all(servers.map((s) => new Promise<void>((r) => s.close(() => r())))).then(() => {});
    this.gate.close();
    this.wss?.close();
    // stops the https server's request-timeout checks (it never listened itself, so the callback gets ERR_SERVER_NOT_RUNNING)
    this.httpsServer?.close(() => {});
    return closed;
  }

  /** Destroy every socket still open. */
  destroySockets(): void {
    for (const set of Object.values(this.sockets)) for (const s of set) s.destroy();
  }

  status(): { listeners: Record<string, unknown>; refused_over_limit: number; handshakes: GateStatus } {
    const listeners: Record<string, unknown> = {};
    for (const [name, port] of this.ports) {
      listeners[name] = { port, connections: this.sockets[name].size, auth: this.auth(name), ...(name === 'wss' ? { native_unmask: this.wssNativeUnmask } : {}) };
    }
    return { listeners, refused_over_limit: this.limitRefusals, handshakes: this.gate.status() };
  }

  private accept(stream: Duplex, origin: StreamOrigin, req?: IncomingMessage): void {
    try {
      this.o.onStream(stream, origin, req);
    } catch (err) {
      this.log.error({ err, listener: origin.listener }, 'error accepting an MQTT connection');
      stream.destroy();
    }
  }

  private totalSockets(): number {
    return this.sockets.tls.size + this.sockets.wss.size + this.sockets.local.size;
  }

  /** A failed TLS handshake: charged to its source, counted in the refusal log's summary. */
  private handshakeFailed(listener: ListenerName, err: Error, s: tls.TLSSocket): void {
    this.gate.done(remoteOf(s));
    const source = s.remoteAddress ?? 'unknown';
    // every handshake here was admitted by the gate (a connection turned away never reaches TLS): its refusal
    // gives back what the admission took (an attempt in flight) or spends a token
    this.o.budget.refused(source);
    // one debug line per attempt (scanners make them all day); at info they show in the interval's summary line
    this.log.debug({ listener, remote: remoteOf(s), err: err.message }, 'TLS handshake failed');
    this.o.refusals.count('ECONN_TLS_HANDSHAKE', source);
  }

  /** A source over its budget of refusals is turned away before the TLS handshake (logged through the refusal log). */
  private turnAway(listener: ListenerName, s: net.Socket, source: string): void {
    s.destroy();
    this.o.refusals.refused('ECONN_RATE_LIMITED', source, {
      listener,
      remote: remoteOf(s),
      reason: 'too many refused attempts from this address (broker.limits.refused_per_source_burst); closed before the TLS handshake',
    });
  }

  /**
   * A new TCP connection: limits first (source budget, max_connections); a TLS listener's then waits in
   * the handshake gate for its turn with `tlsServer`. True when it is admitted (the local listener's).
   */
  private onRawConnection(listener: ListenerName, s: net.Socket, tlsServer?: tls.Server): boolean {
    try {
      const source = s.remoteAddress ?? 'unknown';
      // a TLS connection asks its budget again when its handshake may start (the gate); at accept it is only
      // turned away when its source spent its budget and has nothing in flight that could give a token back
      const over = this.o.closing() ? false : tlsServer ? this.o.budget.turnAway(source) : !this.o.budget.admit(source);
      if (over) {
        this.turnAway(listener, s, source);
        return false;
      }
      const max = this.o.config().limits.max_connections;
      if (this.o.closing() || this.totalSockets() >= max) {
        s.destroy();
        if (this.o.closing()) return false;
        this.limitRefusals++;
        this.o.onRefused?.(listener);
        const t = Date.now();
        if (t - this.lastLimitLog > 10_000) {
          this.lastLimitLog = t;
          this.log.warn(
            { code: 'ECONN_BROKER_LIMIT', listener, remote: remoteOf(s), max_connections: max, refused_total: this.limitRefusals },
            'connection refused: broker.limits.max_connections reached (logged at most every 10 s)',
          );
        }
        return false;
      }
      s.setNoDelay(true);
      const set = this.sockets[listener];
      set.add(s);
      s.once('close', () => set.delete(s));
      s.on('error', () => {}); // a reset while waiting for the handshake; TLS reports its own errors
      if (tlsServer) {
        this.gate.submit(
          s,
          source,
          (sock) => tlsServer.emit('connection', sock),
          (sock) => this.turnAway(listener, sock, source),
        );
      }
      return true;
    } catch (err) {
      this.log.error({ err }, 'error accepting a connection');
      s.destroy();
      return false;
    }
  }

  // ───────────────────────────── TLS context ─────────────────────────────

  private async secureContextOptions(): Promise<tls.SecureContextOptions> {
    const t = this.o.config().tls;
    const { cert, key } = await loadServerCredentials(t, this.o.pki);
    const ca = [...this.o.pki.trustedDeviceCaPems()];
    for (const f of t.trusted_ca_files) {
      try {
        ca.push(await readFile(f, 'utf8'));
      } catch (err) {
        throw new ConnectorError('ECONN_CONFIG_INVALID', `trusted CA file ${f} cannot be read (${(err as NodeJS.ErrnoException).code ?? 'error'}) (broker.tls.trusted_ca_files)`, { cause: err });
      }
    }
    const opts: tls.SecureContextOptions = { cert, key, ca, minVersion: t.min_version };
    try {
      tls.createSecureContext(opts);
    } catch (err) {
      throw new ConnectorError('ECONN_CONFIG_INVALID', `broker TLS certificate, key or CA is not usable (${(err as Error).message})`, { cause: err });
    }
    this.tlsPems = JSON.stringify([cert, ca, t.min_version]);
    return opts;
  }

  /** Rebuild the TLS context for new handshakes; true when something changed. */
  async refreshSecureContext(): Promise<boolean> {
    const before = this.tlsPems;
    const opts = await this.secureContextOptions();
    if (this.tlsPems === before) return false;
    this.tlsServer?.setSecureContext(opts);
    this.httpsServer?.setSecureContext(opts);
    return true;
  }
}
