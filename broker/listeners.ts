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
 *  - A source address that caused more refusals (failed handshakes, refused credentials) than
 *    broker.limits.refused_per_source_burst is closed at accept, before the TLS handshake,
 *    until its budget refills (core/refusals.ts); refusals are logged in full for the first
 *    few of an interval, then as one summary line per interval.
 *  - A new TLS context (reload, renewed server certificate) applies to new handshakes; live
 *    sessions keep theirs.
 * Each accepted MQTT byte stream (TLS socket, WebSocket stream, loopback socket) is handed to
 * `onStream`, which puts the conformance guard and aedes behind it (broker.ts).
 */
import { readFile } from 'node:fs/promises';
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

export class DeviceListeners {
  private tlsServer: tls.Server | undefined;
  private httpsServer: https.Server | undefined;
  private wss: WebSocketServer | undefined;
  private localServer: net.Server | undefined;
  private readonly sockets: Record<ListenerName, Set<net.Socket>> = { tls: new Set(), wss: new Set(), local: new Set() };
  readonly ports = new Map<ListenerName, number>();
  private tlsPems = '';
  private limitRefusals = 0;
  private lastLimitLog = 0;

  constructor(private readonly o: ListenersOptions) {}

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
      server.on('connection', (s: net.Socket) => this.onRawConnection('tls', s));
      server.on('secureConnection', (s: tls.TLSSocket) => this.accept(s, { listener: 'tls', auth: this.auth('tls'), tls: s, remote: remoteOf(s) }));
      server.on('tlsClientError', (err: Error, s: tls.TLSSocket) => this.handshakeFailed('tls', err, s));
      server.on('error', (err) => this.log.error({ err }, 'MQTT/TLS listener error'));
      this.ports.set('tls', await listen(server, L.tls.host, L.tls.port, 'MQTT/TLS', 'broker.listeners.tls.port'));
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
      server.on('connection', (s: net.Socket) => this.onRawConnection('wss', s));
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
      this.ports.set('wss', await listen(server as unknown as net.Server, L.wss.host, L.wss.port, 'MQTT/WSS', 'broker.listeners.wss.port'));
    }
    if (L.local.enabled) {
      const server = net.createServer((s) => this.accept(s, { listener: 'local', auth: this.auth('local'), tls: undefined, remote: remoteOf(s) }));
      this.localServer = server;
      server.on('connection', (s: net.Socket) => this.onRawConnection('local', s));
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
    const servers = [this.tlsServer, this.httpsServer, this.localServer].filter((s): s is net.Server => s !== undefined && s.listening);
    const closed = Promise.all(servers.map((s) => new Promise<void>((r) => s.close(() => r())))).then(() => {});
    this.wss?.close();
    return closed;
  }

  /** Destroy every socket still open. */
  destroySockets(): void {
    for (const set of Object.values(this.sockets)) for (const s of set) s.destroy();
  }

  status(): { listeners: Record<string, unknown>; refused_over_limit: number } {
    const listeners: Record<string, unknown> = {};
    for (const [name, port] of this.ports) listeners[name] = { port, connections: this.sockets[name].size, auth: this.auth(name) };
    return { listeners, refused_over_limit: this.limitRefusals };
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
    const source = s.remoteAddress ?? 'unknown';
    // a socket turned away at accept fails its handshake too: that refusal is already counted
    if (s.destroyed && this.o.budget.spent(source)) return;
    this.o.budget.refused(source);
    // one debug line per attempt (scanners make them all day); at info they show in the interval's summary line
    this.log.debug({ listener, remote: remoteOf(s), err: err.message }, 'TLS handshake failed');
    this.o.refusals.count('ECONN_TLS_HANDSHAKE', source);
  }

  private onRawConnection(listener: ListenerName, s: net.Socket): void {
    try {
      const source = s.remoteAddress ?? 'unknown';
      if (!this.o.closing() && !this.o.budget.admit(source)) {
        s.destroy();
        this.o.refusals.refused('ECONN_RATE_LIMITED', source, {
          listener,
          remote: remoteOf(s),
          reason: 'too many refused attempts from this address (broker.limits.refused_per_source_burst); closed before the TLS handshake',
        });
        return;
      }
      const max = this.o.config().limits.max_connections;
      if (this.o.closing() || this.totalSockets() >= max) {
        s.destroy();
        if (this.o.closing()) return;
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
        return;
      }
      s.setNoDelay(true);
      const set = this.sockets[listener];
      set.add(s);
      s.once('close', () => set.delete(s));
    } catch (err) {
      this.log.error({ err }, 'error accepting a connection');
      s.destroy();
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
