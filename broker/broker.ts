/**
 * The Broker component: an embedded aedes (MQTT 3.1.1) behind our own listeners.
 *
 *  - MQTT over TLS (tls.Server), MQTT over secure WebSocket (https.Server + ws, path config.path),
 *    and an optional plain listener on loopback for local applications (auth `none` or `jwt`).
 *  - TLS ≥ 1.2; server certificate from broker.tls.cert_file/key_file or the local PKI; client
 *    certificates are requested but not required by OpenSSL (rejectUnauthorized: false) so a
 *    token-only device can connect in `cert|jwt` mode; identity/auth.ts decides.
 *  - Every aedes hook catches everything (a throw inside a hook would crash the process).
 *  - Device publishes that match config.bridge.topics (never a command topic) are appended to
 *    the uplink journal (UplinkSink) and only then acknowledged: the aedes authorizePublish
 *    callback, which triggers the PUBACK, runs after append() resolved, in receive order per
 *    connection (MQTT-4.6.0-2). A failed append (ECONN_JOURNAL_FULL, …) is not acknowledged:
 *    the connection is closed so the device retries the unacknowledged message later.
 *  - Sessions die when their device is revoked, their token is revoked, their token or
 *    certificate expires, or a reloaded CRL revokes their certificate. Healthy sessions survive
 *    reload() (new TLS context, CRLs, ACL rules, limits).
 *  - Implements CommandTarget: publishCommand() sends QoS 1 to devices/ID/commands/NAME and
 *    resolves once the device's PUBACK arrived.
 */
import { EventEmitter } from 'node:events';
import { readFile } from 'node:fs/promises';
import { watchFile, unwatchFile, type Stats } from 'node:fs';
import net from 'node:net';
import tls from 'node:tls';
import https from 'node:https';
import type { IncomingMessage } from 'node:http';
import type { Duplex } from 'node:stream';
import { WebSocketServer, createWebSocketStream, type WebSocket } from 'ws';
import { Counter, type Registry } from 'prom-client';
import { Aedes, type Client, type PublishPacket, type Subscription, type ConnectPacket, type AedesPublishPacket } from 'aedes';
import type { Config } from '../core/config/schema.js';
import type { Logger } from '../core/logger.js';
import type { Component } from '../core/component.js';
import { listen } from '../core/net.js';
import { AuthorizationError, ConnectorError, ProtocolError, errorCode, type ErrorCode } from '../core/errors.js';
import type { CommandTarget, PendingRecords, UplinkMessageMeta, UplinkSink } from '../core/ports.js';
import {
  authorizeDelivery,
  authorizePublish,
  authorizeSubscribe,
  DEVICES_PREFIX,
  deviceRules,
  expandRules,
  isBridgedTopic,
  isValidTopicName,
  checkTopicLimits,
  topicMatches,
  type Principal,
  type TopicLimits,
} from './acl.js';
import {
  CrlStore,
  DeviceAuthenticator,
  certIssuer,
  type AuthenticatedIdentity,
  type ListenerAuth,
  type RegistryView,
  type TokenVerifier,
} from '../identity/auth.js';
import type { DeviceRecord } from '../identity/registry.js';
import { SessionTracker, conformanceHooks, wrapConnection, type ConformantConnection } from './conformance.js';
import { RedeliveryTable, payloadDigest } from './redelivery.js';
import { RetainedLedger, type RetainedLimits } from './retained.js';
import { loadServerCredentials } from '../identity/server-cert.js';

export type ListenerName = 'tls' | 'wss' | 'local';
export const PORT_KEYS: Record<ListenerName, string> = { tls: 'mqtt_tls', wss: 'mqtt_wss', local: 'mqtt_local' };

/** What the broker needs from the device registry (DeviceRegistry satisfies it). */
export interface BrokerRegistry extends RegistryView {
  on(event: string, listener: (...args: string[]) => void): unknown;
  off(event: string, listener: (...args: string[]) => void): unknown;
  touch(id: string): void;
  isTokenRevoked(jti: string): boolean;
}

/** What the broker needs from the local PKI (LocalPki satisfies it). */
export interface BrokerPki {
  trustedDeviceCaPems(): string[];
  serverCredentials(): { cert: string; key: string };
  on?(event: string, listener: () => void): unknown;
  off?(event: string, listener: () => void): unknown;
}

/** Called for bridged QoS 0 publishes when bridge.qos0 is best_effort (they skip the journal). */
export type BestEffortForward = (meta: UplinkMessageMeta, payload: Buffer) => void;

/** The broker's own configuration section (`broker:` in connector.yaml). */
export type BrokerConfig = Config['broker'];

/** What the broker needs from the bridge section: which device topics go upstream, and how QoS 0 does. */
export interface BridgeRouting {
  topics: readonly string[];
  qos0: Config['bridge']['qos0'];
}

/** What the broker reads from the configuration, at start and on reload. */
export interface BrokerSettings {
  broker: BrokerConfig;
  bridge: BridgeRouting;
}

/** The broker's sections of a whole configuration (the composition root passes nothing else). */
export function brokerSettings(c: Pick<Config, 'broker' | 'bridge'>): BrokerSettings {
  return { broker: c.broker, bridge: { topics: c.bridge.topics, qos0: c.bridge.qos0 } };
}

export interface BrokerOptions {
  /** the `broker:` section */
  config: BrokerConfig;
  /** which device topics are handed to the sink (bridge.topics, bridge.qos0) */
  bridge: BridgeRouting;
  logger: Logger;
  registry: BrokerRegistry;
  pki: BrokerPki;
  tokens: TokenVerifier;
  /** the uplink journal; without it nothing is handed upstream */
  sink?: UplinkSink;
  bestEffort?: BestEffortForward;
  /** clock for token/certificate expiry (ms epoch) */
  now?: () => number;
  /** how often CRL files are polled for changes (ms) */
  crlPollMs?: number;
  /** close() budget before remaining sockets are destroyed (ms) */
  closeTimeoutMs?: number;
  /** Prometheus registry for connector_broker_connects_total / connector_broker_refusals_total */
  metrics?: Registry;
  /** bounds of the QoS 1 redelivery table (broker/redelivery.ts); defaults: 64 per device, 10 min */
  redelivery?: { perDevice?: number; maxAgeMs?: number; maxDevices?: number };
}

interface ConnInfo {
  listener: ListenerName;
  auth: ListenerAuth;
  tls: tls.TLSSocket | undefined;
  remote: string;
  /** client id as sent in CONNECT (captured in preConnect) */
  clientId?: string;
  /** the conformance guard in front of aedes (knows the DUP flag of incoming PUBLISHes) */
  conn?: ConformantConnection;
}

interface PendingCommand {
  counter: number;
  session: Session;
  messageId: number | undefined;
  timer: NodeJS.Timeout;
  resolve: (r: { delivered: boolean; reason?: string }) => void;
}

/** One PUBLISH waiting for its journal append (or for an earlier one) before its PUBACK. */
interface PendingPublish {
  reply: (err?: Error | null) => void;
  /** packet id of a journaled QoS 1 publish (redelivery bookkeeping) */
  pid: number | undefined;
  topic: string;
  payload: Buffer;
  meta: UplinkMessageMeta | undefined;
  bestEffort: BestEffortForward | undefined;
  retain: boolean;
  /** the append (or the original's append for a redelivery); undefined when nothing is journaled */
  done: Promise<unknown> | undefined;
  settled: boolean;
  err: unknown;
  /** moved into the redelivery table (its PUBACK can no longer reach the device) */
  remembered?: boolean;
}

/** The ACL decision for a topic and whether it goes upstream (cached per session). */
interface Route {
  refusal: string | undefined;
  bridged: boolean;
}
/** topics cached per session, and the longest topic cached */
const ROUTE_CACHE = 16;
const ROUTE_CACHE_TOPIC_BYTES = 256;

/** Complete an aedes callback; a throw inside it must not escape into the hook. */
function safeReply(cb: (err?: Error | null) => void, err: Error | null, log: Logger): void {
  try {
    cb(err);
  } catch (e) {
    log.error({ err: e }, 'error completing a publish');
  }
}

interface Session {
  client: Client;
  info: ConnInfo;
  identity: AuthenticatedIdentity | undefined;
  principal: Principal;
  log: Logger;
  /** publishes awaiting the journal or an earlier one, in receive order (PUBACKs go out in this order, MQTT-4.6.0-2) */
  queue: PendingPublish[];
  /** topic → ACL decision and bridging, bounded (ROUTE_CACHE) */
  routes: Map<string, Route>;
  /** a journal append failed: nothing more is acknowledged on this connection */
  failed: boolean;
  /** dropped by us (revocation, expiry): its will is not published */
  dropped: boolean;
  ended: boolean;
  expiryTimer: NodeJS.Timeout | undefined;
  commands: Map<number, PendingCommand>;
  aclLogged: number;
}

/** aedes internals we rely on (pinned aedes ^1.2; covered by tests). */
interface ClientInternals {
  closed: boolean;
  connected: boolean;
  subscriptions: Record<string, { qos: number }>;
  _nextId: number;
  _parser: EventEmitter;
}
const internals = (c: Client): ClientInternals => c as unknown as ClientInternals;

/** The aedes persistence calls the broker uses to forget a revoked device (aedes-persistence 11 API). */
interface PersistenceInternals {
  subscriptionsByClient(client: { id: string }): Promise<unknown[] | null>;
  cleanSubscriptions(client: { id: string }): Promise<void>;
  cleanIncoming?(client: { id: string }): Promise<void>;
  outgoingStream(client: { id: string }): AsyncIterable<{ messageId?: number }>;
  outgoingClearMessageId(client: { id: string }, packet: { messageId?: number }): Promise<unknown>;
  delWill(client: { id: string; brokerId: string }): Promise<unknown>;
  createRetainedStream(pattern: string): AsyncIterable<{ topic: string }>;
  storeRetained(packet: { cmd: 'publish'; topic: string; payload: Buffer; qos: 0; retain: true; dup: false }): Promise<void>;
}
const persistenceOf = (a: Aedes): PersistenceInternals => (a as unknown as { persistence: PersistenceInternals }).persistence;

/** brokerId marking packets sent by publishCommand (recognised again in authorizeForward). */
const CMD_BROKER_ID = 'edge-connector:command';
const MAX_TIMER_MS = 2 ** 31 - 1;
/** room for CONNECT credentials (a token is up to 8 KiB) on top of the payload and topic limits */
const PACKET_SLACK_BYTES = 16384;

function connError(code: ErrorCode, message: string, returnCode?: number): Error & { returnCode?: number } {
  const e = new ConnectorError(code, message) as ConnectorError & { returnCode?: number };
  if (returnCode !== undefined) e.returnCode = returnCode;
  return e;
}

function retainedLimits(l: BrokerConfig['limits']): RetainedLimits {
  return { maxCount: l.max_retained_per_device, maxBytes: l.max_retained_bytes_per_device };
}

function remoteOf(s: net.Socket | undefined): string {
  if (!s) return 'unknown';
  return `${s.remoteAddress ?? '?'}:${s.remotePort ?? '?'}`;
}

export class Broker extends EventEmitter implements Component, CommandTarget {
  readonly name = 'broker';
  private config: BrokerConfig;
  private bridge: BridgeRouting;
  private readonly log: Logger;
  private readonly registry: BrokerRegistry;
  private readonly pki: BrokerPki;
  private sink: UplinkSink | undefined;
  private bestEffort: BestEffortForward | undefined;
  private readonly now: () => number;
  private readonly crlPollMs: number;
  private readonly closeTimeoutMs: number;
  private readonly crls = new CrlStore();
  private readonly auth: DeviceAuthenticator;

  private aedes: Aedes | undefined;
  private tlsServer: tls.Server | undefined;
  private httpsServer: https.Server | undefined;
  private wss: WebSocketServer | undefined;
  private localServer: net.Server | undefined;
  private readonly sockets: Record<ListenerName, Set<net.Socket>> = { tls: new Set(), wss: new Set(), local: new Set() };
  private readonly ports = new Map<ListenerName, number>();
  private readonly conns = new WeakMap<Client, ConnInfo>();
  /** live sessions */
  private readonly sessions = new Map<Client, Session>();
  /** every authenticated client's session, also after it ended (aedes publishes the will after the stream closed) */
  private readonly sessionOf = new WeakMap<Client, Session>();
  private readonly byDevice = new Map<string, Session>();
  private readonly commands = new Map<number, PendingCommand>();
  private cmdCounter = 0;
  private watchedCrls: string[] = [];
  private crlReload: Promise<void> = Promise.resolve();
  private tlsPems = '';
  private limitRefusals = 0;
  private lastLimitLog = 0;
  private conformanceSessions = new SessionTracker();
  /** recent journaled QoS 1 publishes per device: a DUP 1 redelivery is acknowledged, not journaled twice */
  private readonly redelivery: RedeliveryTable;
  /** retained messages per device, bounded by broker.limits.max_retained_* */
  private readonly retained: RetainedLedger;
  private readonly mConnects: Counter<'listener' | 'via'> | undefined;
  private readonly mRefusals: Counter<'listener' | 'code'> | undefined;
  private started: Promise<void> | undefined;
  private closing: Promise<void> | undefined;

  constructor(opts: BrokerOptions) {
    super();
    this.config = opts.config;
    this.bridge = opts.bridge;
    this.log = opts.logger.child({ component: 'broker' });
    this.registry = opts.registry;
    this.pki = opts.pki;
    this.sink = opts.sink;
    this.bestEffort = opts.bestEffort;
    this.now = opts.now ?? Date.now;
    this.crlPollMs = opts.crlPollMs ?? 2000;
    this.closeTimeoutMs = opts.closeTimeoutMs ?? 3000;
    this.redelivery = new RedeliveryTable({ ...opts.redelivery, now: this.now });
    this.retained = new RetainedLedger(retainedLimits(opts.config.limits));
    if (opts.metrics) {
      const registers = [opts.metrics];
      this.mConnects = new Counter({ name: 'connector_broker_connects_total', help: 'accepted MQTT connections, by listener and credential (cert, jwt, cert+jwt, anonymous)', labelNames: ['listener', 'via'], registers });
      this.mRefusals = new Counter({ name: 'connector_broker_refusals_total', help: 'refused MQTT connections, by listener and reason code (ECONN_…)', labelNames: ['listener', 'code'], registers });
    }
    this.auth = new DeviceAuthenticator({
      registry: opts.registry,
      tokens: opts.tokens,
      crls: this.crls,
      tls: opts.config.tls,
      now: this.now,
    });
  }

  /** Attach the uplink journal (and the QoS 0 best-effort path) once it exists. */
  setSink(sink: UplinkSink | undefined, bestEffort?: BestEffortForward): void {
    this.sink = sink;
    this.bestEffort = bestEffort;
  }

  /** Ports actually bound, by listener. */
  boundPorts(): ReadonlyMap<ListenerName, number> {
    return this.ports;
  }

  // ───────────────────────────── lifecycle ─────────────────────────────

  start(): Promise<void> {
    if (this.closing) return Promise.reject(new ConnectorError('ECONN_CLOSED', 'the broker is closed'));
    this.started ??= this.doStart().catch(async (err: unknown) => {
      await this.close().catch(() => {});
      throw err;
    });
    return this.started;
  }

  private get limits(): TopicLimits {
    const l = this.config.limits;
    return { maxDepth: l.max_topic_depth, maxBytes: l.max_topic_bytes };
  }

  private get packetLimit(): number {
    const l = this.config.limits;
    return l.max_payload_bytes + l.max_topic_bytes + PACKET_SLACK_BYTES;
  }

  private async doStart(): Promise<void> {
    const b = this.config;
    const r = await this.crls.load(b.tls.crl_files);
    if (b.tls.crl_files.length) this.log.info({ crls: r.crls, entries: r.entries }, 'CRLs loaded');
    for (const f of r.stale) this.log.warn({ file: f }, 'CRL is past its nextUpdate; publish a fresh one');

    this.rememberJournaled();
    const aedes = new Aedes({
      id: `edge-connector-${process.pid}`,
      connectTimeout: b.limits.connect_timeout_ms,
      queueLimit: b.limits.queue_limit,
      maxClientsIdLength: 128,
      maxTopicLevels: 100, // our own max_topic_depth is checked in the ACL (aedes clamps to 100)
      preConnect: (client, packet, cb) => this.hookPreConnect(client, packet, cb),
      authenticate: (client, username, password, cb) => this.hookAuthenticate(client, username, password, cb),
      authorizePublish: (client, packet, cb) => this.hookPublish(client, packet, cb),
      // our ACL runs first, then the MQTT 3.1.1 fix-ups of broker/conformance.ts (QoS cap, $-topics, SUBACK 0x80 on error)
      ...conformanceHooks({
        authorizeSubscribe: (client, sub, cb) => this.hookSubscribe(client, sub, cb),
        authorizeForward: (client, packet) => this.hookForward(client, packet),
      }),
    });
    this.aedes = aedes;
    this.conformanceSessions = new SessionTracker();
    await aedes.listen();
    // register the session as soon as its CONNACK is written (before aedes' 'clientReady'), so a command can follow at once
    aedes.on('connackSent', (packet, c) => this.guard('connackSent', () => packet.returnCode === 0 && this.onClientReady(c)));
    aedes.on('clientDisconnect', (c) => this.guard('clientDisconnect', () => this.endSession(c)));
    aedes.on('clientError', (c, err) => this.guard('clientError', () => this.onClientError(c, err)));
    aedes.on('connectionError', (c, err) => this.guard('connectionError', () => this.onClientError(c, err)));
    (aedes as EventEmitter).on('error', (err: unknown) => this.log.error({ err }, 'aedes error'));

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
      server.on('secureConnection', (s: tls.TLSSocket) => this.guard('secureConnection', () => this.handleStream(s, { listener: 'tls', auth: this.listenerAuth('tls'), tls: s, remote: remoteOf(s) })));
      server.on('tlsClientError', (err: Error, s: tls.TLSSocket) => this.log.debug({ listener: 'tls', remote: remoteOf(s), err: err.message }, 'TLS handshake failed'));
      server.on('error', (err) => this.log.error({ err }, 'MQTT/TLS listener error'));
      this.ports.set('tls', await listen(server, L.tls.host, L.tls.port, 'MQTT/TLS', 'broker.listeners.tls.port'));
    }
    if (L.wss.enabled) {
      const server = https.createServer(
        { ...tlsOpts, requestCert: true, rejectUnauthorized: false, handshakeTimeout: b.limits.connect_timeout_ms, requestTimeout: b.limits.connect_timeout_ms },
        (_req, res) => {
          res.writeHead(426, { 'content-type': 'text/plain', connection: 'close', upgrade: 'websocket' });
          res.end(`MQTT over WebSocket only (path ${this.config.listeners.wss.path})\n`);
        },
      );
      this.httpsServer = server;
      server.on('connection', (s: net.Socket) => this.onRawConnection('wss', s));
      server.on('tlsClientError', (err: Error, s: tls.TLSSocket) => this.log.debug({ listener: 'wss', remote: remoteOf(s), err: err.message }, 'TLS handshake failed'));
      server.on('error', (err) => this.log.error({ err }, 'MQTT/WSS listener error'));
      const wss = new WebSocketServer({
        server,
        path: L.wss.path,
        maxPayload: this.packetLimit,
        perMessageDeflate: false,
        handleProtocols: (protocols) => (protocols.has('mqtt') ? 'mqtt' : protocols.has('mqttv3.1') ? 'mqttv3.1' : false),
      });
      this.wss = wss;
      wss.on('connection', (ws: WebSocket, req: IncomingMessage) =>
        this.guard('wss connection', () => {
          const sock = req.socket as tls.TLSSocket;
          const stream = createWebSocketStream(ws);
          stream.on('error', () => {}); // aedes reports errors through its own listener; never unhandled
          this.handleStream(stream, { listener: 'wss', auth: this.listenerAuth('wss'), tls: sock, remote: remoteOf(sock) }, req);
        }),
      );
      wss.on('error', (err) => this.log.error({ err }, 'WebSocket server error'));
      this.ports.set('wss', await listen(server as unknown as net.Server, L.wss.host, L.wss.port, 'MQTT/WSS', 'broker.listeners.wss.port'));
    }
    if (L.local.enabled) {
      const server = net.createServer((s) =>
        this.guard('local connection', () => this.handleStream(s, { listener: 'local', auth: this.listenerAuth('local'), tls: undefined, remote: remoteOf(s) })),
      );
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

    this.registry.on('revoked', this.onDeviceRevoked);
    this.registry.on('token-revoked', this.onTokenRevoked);
    this.registry.on('certificate-revoked', this.onCertRevoked);
    this.pki.on?.('server-cert', this.onServerCert);
    this.watchCrls(b.tls.crl_files);
    this.log.info({ ports: Object.fromEntries(this.ports) }, 'broker listening');
  }

  close(): Promise<void> {
    this.closing ??= this.doClose();
    return this.closing;
  }

  private async doClose(): Promise<void> {
    this.registry.off('revoked', this.onDeviceRevoked);
    this.registry.off('token-revoked', this.onTokenRevoked);
    this.registry.off('certificate-revoked', this.onCertRevoked);
    this.pki.off?.('server-cert', this.onServerCert);
    this.unwatchCrls();
    for (const p of [...this.commands.values()]) this.finishCommand(p, false, 'the broker is shutting down');
    const servers = [this.tlsServer, this.httpsServer, this.localServer].filter((s): s is net.Server => s !== undefined && s.listening);
    const serversClosed = Promise.all(servers.map((s) => new Promise<void>((r) => s.close(() => r()))));
    this.wss?.close();
    const aedes = this.aedes;
    if (aedes && !aedes.closed) {
      await Promise.race([new Promise<void>((r) => aedes.close(() => r())), new Promise<void>((r) => setTimeout(r, this.closeTimeoutMs).unref())]);
    }
    for (const set of Object.values(this.sockets)) for (const s of set) s.destroy();
    for (const s of this.sessions.values()) this.clearSessionTimers(s);
    await Promise.race([serversClosed, new Promise<void>((r) => setTimeout(r, this.closeTimeoutMs).unref())]);
    this.ports.clear();
  }

  status(): Record<string, unknown> {
    const listeners: Record<string, unknown> = {};
    for (const [name, port] of this.ports) listeners[name] = { port, connections: this.sockets[name].size, auth: this.listenerAuth(name) };
    return {
      listeners,
      devices_connected: this.byDevice.size,
      sessions: this.sessions.size,
      max_connections: this.config.limits.max_connections,
      crl_entries: this.crls.size,
      refused_over_limit: this.limitRefusals,
      bridge: this.sink ? { topics: this.bridge.topics, qos0: this.bridge.qos0 } : 'not attached',
    };
  }

  /** Apply a new configuration (the broker's sections of it) without dropping healthy sessions. */
  async reload(next: BrokerSettings): Promise<string[]> {
    const prev = { broker: this.config, bridge: this.bridge };
    this.config = next.broker;
    this.bridge = next.bridge;
    const changes: string[] = [];
    const b = next.broker;
    // TLS: new certificate/key/CAs/min version for new handshakes; live sessions keep theirs
    try {
      if (await this.refreshSecureContext()) changes.push('broker: TLS context reloaded (server certificate, trusted CAs or min version)');
    } catch (err) {
      this.log.error({ err }, 'TLS context reload failed; the previous one stays in use');
      changes.push(`broker: TLS reload failed (${(err as Error).message}); previous TLS context kept`);
    }
    // CRLs
    if (JSON.stringify(prev.broker.tls.crl_files) !== JSON.stringify(b.tls.crl_files)) {
      this.unwatchCrls();
      this.watchCrls(b.tls.crl_files);
    }
    const crl = await this.reloadCrls('reload');
    if (crl) changes.push(crl);
    this.auth.setCertIdentity(b.tls);
    // limits
    if (this.aedes) {
      const a = this.aedes as unknown as { queueLimit: number; connectTimeout: number };
      a.queueLimit = b.limits.queue_limit;
      a.connectTimeout = b.limits.connect_timeout_ms;
    }
    this.retained.setLimits(retainedLimits(b.limits));
    if (JSON.stringify(prev.broker.limits) !== JSON.stringify(b.limits)) changes.push('broker: limits updated (apply to new packets and connections)');
    // topic decisions cached per session follow the new ACL, limits and bridge topics
    for (const s of this.sessions.values()) s.routes.clear();
    // ACL: recompute every live session's principal; existing subscriptions are re-checked at delivery
    if (JSON.stringify(prev.broker.acl) !== JSON.stringify(b.acl) || JSON.stringify(prev.broker.listeners.local.acl) !== JSON.stringify(b.listeners.local.acl)) {
      for (const s of this.sessions.values()) s.principal = this.principalFor(s.identity, s.info);
      changes.push('broker: ACL rules updated');
    }
    if (JSON.stringify(prev.bridge.topics) !== JSON.stringify(next.bridge.topics) || prev.bridge.qos0 !== next.bridge.qos0) {
      changes.push('broker: bridge topics / qos0 policy updated');
    }
    return changes;
  }

  // ───────────────────────────── TLS ─────────────────────────────

  private async secureContextOptions(): Promise<tls.SecureContextOptions> {
    const t = this.config.tls;
    const { cert, key } = await loadServerCredentials(t, this.pki);
    const ca = [...this.pki.trustedDeviceCaPems()];
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
  private async refreshSecureContext(): Promise<boolean> {
    const before = this.tlsPems;
    const opts = await this.secureContextOptions();
    if (this.tlsPems === before) return false;
    this.tlsServer?.setSecureContext(opts);
    this.httpsServer?.setSecureContext(opts);
    return true;
  }

  private readonly onServerCert = (): void => {
    this.refreshSecureContext().then(
      (changed) => changed && this.log.info('server certificate renewed by the local PKI; new TLS handshakes use it'),
      (err: unknown) => this.log.error({ err }, 'cannot apply the renewed server certificate'),
    );
  };

  // ───────────────────────────── CRLs ─────────────────────────────

  private watchCrls(files: readonly string[]): void {
    this.watchedCrls = [...files];
    for (const f of files) {
      watchFile(f, { interval: this.crlPollMs, persistent: false }, this.onCrlFileChange);
    }
  }

  private unwatchCrls(): void {
    for (const f of this.watchedCrls) unwatchFile(f, this.onCrlFileChange);
    this.watchedCrls = [];
  }

  private readonly onCrlFileChange = (cur: Stats, prev: Stats): void => {
    if (cur.mtimeMs === prev.mtimeMs && cur.size === prev.size && cur.ino === prev.ino) return;
    void this.reloadCrls('file change');
  };

  /** Reload CRLs, keeping the previous set on error; drop sessions whose certificate is now revoked. */
  reloadCrls(why: string): Promise<string | undefined> {
    const run = this.crlReload.then(async () => {
      if (this.closing) return undefined;
      try {
        const r = await this.crls.load(this.config.tls.crl_files);
        for (const f of r.stale) this.log.warn({ file: f }, 'CRL is past its nextUpdate; publish a fresh one');
        this.log.info({ why, crls: r.crls, entries: r.entries }, 'CRLs reloaded');
        let dropped = 0;
        for (const s of [...this.sessions.values()]) {
          const c = s.identity?.cert;
          if (!c) continue;
          if (!c.issuer) c.issuer = certIssuer(c.raw);
          if (this.crls.isRevoked(c.issuer, c.serial)) {
            this.dropSession(s, 'ECONN_AUTH_CERT', 'certificate revoked by a reloaded CRL');
            dropped++;
          }
        }
        this.emit('crl-reloaded', { entries: r.entries, dropped });
        return this.config.tls.crl_files.length ? `broker: CRLs reloaded (${r.entries} revoked serials)` : undefined;
      } catch (err) {
        this.log.error({ err, code: errorCode(err), why }, 'CRL reload failed; the previous CRLs stay in force');
        this.emit('crl-reloaded', { error: err });
        return `broker: CRL reload failed (${(err as Error).message}); previous CRLs kept`;
      }
    });
    this.crlReload = run.then(
      () => {},
      () => {},
    );
    return run;
  }

  // ───────────────────────────── connections ─────────────────────────────

  private listenerAuth(l: ListenerName): ListenerAuth {
    return this.config.listeners[l].auth;
  }

  private totalSockets(): number {
    return this.sockets.tls.size + this.sockets.wss.size + this.sockets.local.size;
  }

  private onRawConnection(listener: ListenerName, s: net.Socket): void {
    try {
      if (this.closing || this.totalSockets() >= this.config.limits.max_connections) {
        s.destroy();
        if (this.closing) return;
        this.limitRefusals++;
        this.mRefusals?.inc({ listener, code: 'ECONN_BROKER_LIMIT' });
        const t = Date.now();
        if (t - this.lastLimitLog > 10_000) {
          this.lastLimitLog = t;
          this.log.warn(
            { code: 'ECONN_BROKER_LIMIT', listener, remote: remoteOf(s), max_connections: this.config.limits.max_connections, refused_total: this.limitRefusals },
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

  private handleStream(stream: Duplex, info: ConnInfo, req?: IncomingMessage): void {
    const aedes = this.aedes;
    if (!aedes || this.closing) {
      stream.destroy();
      return;
    }
    const l = this.config.limits;
    // the MQTT 3.1.1 conformance guard frames every packet before aedes sees it: it refuses packets larger than
    // the limit from their header alone (memory stays bounded) and keepalives outside the bounds (no CONNACK)
    const conn = wrapConnection(stream, {
      logger: this.log,
      sessions: this.conformanceSessions,
      maxPacketBytes: this.packetLimit,
      keepaliveMinS: l.keepalive_min_s,
      keepaliveMaxS: l.keepalive_max_s,
      peer: `${info.listener} ${info.remote}`,
    });
    info.conn = conn;
    const client = aedes.handle(conn, req);
    this.conns.set(client, info);
    stream.once('close', () => this.guard('stream close', () => this.endSession(client)));
  }

  private refuseLog(info: ConnInfo | undefined, code: string, reason: string, extra: Record<string, unknown> = {}): void {
    this.mRefusals?.inc({ listener: info?.listener ?? 'unknown', code });
    this.log.warn({ code, reason, listener: info?.listener, remote: info?.remote, client_id: info?.clientId, ...extra }, 'MQTT connection refused');
  }

  // ───────────────────────────── aedes hooks ─────────────────────────────

  /** Run a callback-style hook body; anything thrown becomes a logged error, never a crash. */
  private guard(what: string, fn: () => void): void {
    try {
      fn();
    } catch (err) {
      this.log.error({ err, hook: what }, 'unexpected error in a broker hook');
    }
  }

  private hookPreConnect(client: Client, packet: ConnectPacket, cb: (err: Error | null, ok: boolean) => void): void {
    try {
      const info = this.conns.get(client);
      if (!info || this.closing) return cb(connError('ECONN_CLOSED', 'broker closing'), false);
      info.clientId = typeof packet.clientId === 'string' ? packet.clientId : '';
      cb(null, true);
    } catch (err) {
      this.log.error({ err }, 'error in preConnect');
      cb(err as Error, false);
    }
  }

  private hookAuthenticate(
    client: Client,
    username: string | undefined,
    password: Buffer | undefined,
    done: (err: (Error & { returnCode: number }) | null, ok: boolean | null) => void,
  ): void {
    const fail = (code: ErrorCode, message: string, returnCode: number): void => {
      try {
        done(connError(code, message, returnCode) as Error & { returnCode: number }, false);
      } catch (err) {
        this.log.error({ err }, 'error refusing a connection');
      }
    };
    try {
      const info = this.conns.get(client);
      if (!info || this.closing) return fail('ECONN_CLOSED', 'broker closing', 3);
      this.auth
        .authenticate({ auth: info.auth, clientId: info.clientId ?? client.id ?? '', username, password, tls: info.tls ? this.tlsPeer(info.tls) : undefined })
        .then((res) => {
          if (!res.ok) {
            this.refuseLog(info, res.code, res.reason, { return_code: res.returnCode, ...(res.deviceId ? { device_id: res.deviceId } : {}) });
            return fail(res.code, res.reason, res.returnCode);
          }
          if (info.conn?.destroyed === true || internals(client).closed) {
            // the socket closed while the token was being verified: aedes already forgot this client, so must we
            this.log.debug({ listener: info.listener, remote: info.remote, client_id: info.clientId }, 'connection closed during authentication: no session');
            return fail('ECONN_CLOSED', 'connection closed during authentication', 3);
          }
          const identity = res.identity.kind === 'device' ? res.identity : undefined;
          const session: Session = {
            client,
            info,
            identity,
            principal: this.principalFor(identity, info),
            log: identity ? this.log.child({ deviceId: identity.deviceId }) : this.log.child({ local_client: client.id }),
            queue: [],
            routes: new Map(),
            failed: false,
            dropped: false,
            ended: false,
            expiryTimer: undefined,
            commands: new Map(),
            aclLogged: 0,
          };
          this.sessions.set(client, session);
          this.sessionOf.set(client, session);
          done(null, true);
        })
        .catch((err: unknown) => {
          this.log.error({ err }, 'error while authenticating');
          fail('ECONN_INTERNAL', 'internal error', 3);
        });
    } catch (err) {
      this.log.error({ err }, 'error in authenticate');
      fail('ECONN_INTERNAL', 'internal error', 3);
    }
  }

  private tlsPeer(sock: tls.TLSSocket): { cert: import('node:crypto').X509Certificate | undefined; authorized: boolean; authorizationError: Error | null } {
    return { cert: sock.getPeerX509Certificate(), authorized: sock.authorized, authorizationError: sock.authorizationError ?? null };
  }

  private principalFor(identity: AuthenticatedIdentity | undefined, info: ConnInfo): Principal {
    if (identity) {
      const record: DeviceRecord = this.registry.get(identity.deviceId) ?? identity.record;
      return { kind: 'device', deviceId: identity.deviceId, rules: deviceRules(this.config.acl.groups, record.metadata.group, identity.deviceId) };
    }
    const rules = info.listener === 'local' ? this.config.listeners.local.acl : [];
    return { kind: 'local', rules: rules.length ? expandRules(rules, undefined) : null };
  }

  private onClientReady(client: Client): void {
    const s = this.sessions.get(client);
    if (!s) return;
    const id = s.identity?.deviceId;
    if (id !== undefined) {
      // the device or its token may have been revoked while the CONNECT was in flight
      const rec = this.registry.get(id);
      if (!rec || rec.status !== 'active') return this.dropSession(s, 'ECONN_DEVICE_REVOKED', 'device revoked during connect');
      if (s.identity?.token && this.registry.isTokenRevoked(s.identity.token.jti)) return this.dropSession(s, 'ECONN_AUTH_TOKEN', 'token revoked during connect');
      this.byDevice.set(id, s);
      this.registry.touch(id);
      this.mConnects?.inc({ listener: s.info.listener, via: s.identity?.via ?? 'unknown' });
      internals(client)._parser.on('packet', (p: { cmd: string; messageId?: number }) => {
        if (p.cmd === 'puback' && p.messageId !== undefined) this.onCommandAck(s, p.messageId);
      });
      this.armExpiry(s);
      s.log.info({ listener: s.info.listener, via: s.identity?.via, remote: s.info.remote }, 'device connected');
    } else {
      this.mConnects?.inc({ listener: s.info.listener, via: 'anonymous' });
      s.log.info({ listener: s.info.listener, remote: s.info.remote }, 'local application connected');
    }
  }

  private onClientError(client: Client, err: Error): void {
    const info = this.conns.get(client);
    const code = errorCode(err);
    if (code === 'ECONN_BROKER_LIMIT' || code === 'ECONN_CLOSED') return; // logged where raised
    this.log.debug({ listener: info?.listener, remote: info?.remote, client_id: client?.id, err: err?.message }, 'MQTT connection error');
  }

  private armExpiry(s: Session): void {
    const id = s.identity;
    if (!id) return;
    const deadlines: { at: number; code: ErrorCode; reason: string }[] = [];
    if (id.token) deadlines.push({ at: id.token.exp * 1000, code: 'ECONN_AUTH_TOKEN', reason: 'token expired' });
    if (id.cert && id.via !== 'jwt') deadlines.push({ at: id.cert.notAfter, code: 'ECONN_AUTH_CERT', reason: 'client certificate expired' });
    if (!deadlines.length) return;
    const first = deadlines.reduce((a, b) => (b.at < a.at ? b : a));
    const arm = (): void => {
      const ms = first.at - this.now();
      if (ms <= 0) return this.dropSession(s, first.code, first.reason);
      s.expiryTimer = setTimeout(() => this.guard('expiry', arm), Math.min(ms, MAX_TIMER_MS));
      s.expiryTimer.unref();
    };
    arm();
  }

  private clearSessionTimers(s: Session): void {
    if (s.expiryTimer) clearTimeout(s.expiryTimer);
    s.expiryTimer = undefined;
  }

  /** Close a session on our initiative (revocation, expiry); its will is not published. */
  private dropSession(s: Session, code: ErrorCode, reason: string, closed?: () => void): void {
    if (s.ended || s.dropped) {
      closed?.();
      return;
    }
    s.dropped = true;
    s.log.warn({ code, reason, listener: s.info.listener }, 'device session dropped');
    this.emit('session-dropped', { deviceId: s.identity?.deviceId, code, reason });
    s.client.close(closed);
  }

  private endSession(client: Client): void {
    const s = this.sessions.get(client);
    if (!s || s.ended) return;
    s.ended = true;
    this.sessions.delete(client);
    this.clearSessionTimers(s);
    for (const p of s.commands.values()) this.finishCommand(p, false, 'the device disconnected before acknowledging');
    const id = s.identity?.deviceId;
    if (id !== undefined) {
      // the journal's records from before the start are honoured for the first connection only
      this.redelivery.forgetSeeded(id);
      // journaled publishes whose PUBACK was not written yet will not reach the device: their redelivery is expected
      for (const item of s.queue) this.rememberUnacked(s, item);
    }
    if (id !== undefined && this.byDevice.get(id) === s) {
      this.byDevice.delete(id);
      s.log.info({ listener: s.info.listener }, 'device disconnected');
    }
  }

  private logRetained(s: Session, topic: string, reason: string): void {
    s.aclLogged++;
    if (s.aclLogged <= 5 || s.aclLogged % 100 === 0) {
      s.log.warn({ code: 'ECONN_BROKER_LIMIT', topic: topic.slice(0, 256), reason, ...this.retained.usage(s.identity?.deviceId ?? '') }, 'retained publish refused: over the per-device retained limit; connection closed');
    }
  }

  private logAcl(s: Session, what: 'publish' | 'subscribe', topic: string, reason: string): void {
    s.aclLogged++;
    if (s.aclLogged <= 5 || s.aclLogged % 100 === 0) {
      s.log.warn({ code: 'ECONN_NOT_AUTHORIZED', what, topic: topic.slice(0, 256), reason, refused_on_connection: s.aclLogged }, `${what} refused by the topic ACL`);
    }
  }

  private hookPublish(client: Client | null, packet: PublishPacket, cb: (err?: Error | null) => void): void {
    try {
      const s = client ? this.sessionOf.get(client) : undefined;
      const qos = packet.qos;
      const pid = qos > 0 ? packet.messageId : undefined;
      // consumed for every QoS>0 PUBLISH, also refused ones, so the guard's record stays in step
      const dup = pid !== undefined && s?.info.conn?.takeIncomingDup(pid) === true;
      if (!s) return safeReply(cb, new AuthorizationError('ECONN_NOT_AUTHORIZED', 'publish without an authenticated session'), this.log);
      if (s.dropped || this.closing) return safeReply(cb, new AuthorizationError('ECONN_NOT_AUTHORIZED', 'session closing: publish (or will) refused'), this.log);
      const topic = packet.topic;
      const route = this.routeOf(s, topic);
      if (route.refusal !== undefined) {
        this.logAcl(s, 'publish', topic, route.refusal);
        return safeReply(cb, new AuthorizationError('ECONN_NOT_AUTHORIZED', route.refusal), this.log);
      }
      const payload = Buffer.isBuffer(packet.payload) ? packet.payload : Buffer.from(packet.payload ?? '');
      const max = this.config.limits.max_payload_bytes;
      if (payload.length > max) {
        s.log.warn({ code: 'ECONN_BROKER_LIMIT', topic, bytes: payload.length, limit: max }, 'publish larger than broker.limits.max_payload_bytes; connection closed');
        return safeReply(cb, new ProtocolError('ECONN_BROKER_LIMIT', 'payload too large'), this.log);
      }
      const deviceId = s.identity?.deviceId;
      if (packet.retain && deviceId !== undefined) {
        const over = this.retained.admit(deviceId, topic, payload.length);
        if (over !== undefined) {
          this.logRetained(s, topic, over);
          return safeReply(cb, new ProtocolError('ECONN_BROKER_LIMIT', over), this.log);
        }
      }
      const bridge = this.bridge;
      const bridged = route.bridged && deviceId !== undefined;
      const journal = bridged && this.sink !== undefined && (qos > 0 || bridge.qos0 === 'journal');
      const bestEffort = bridged && !journal && qos === 0 && bridge.qos0 === 'best_effort' ? this.bestEffort : undefined;
      const meta: UplinkMessageMeta | undefined = bridged
        ? pid !== undefined
          ? { deviceId, topic, qos: 1, receivedAt: this.now(), packetId: pid }
          : { deviceId, topic, qos: qos > 0 ? 1 : 0, receivedAt: this.now() }
        : undefined;

      if (!journal && s.queue.length === 0) {
        // nothing in flight before it: complete at once (order is trivially kept)
        if (bestEffort && meta) this.safeBestEffort(s, bestEffort, meta, payload);
        if (packet.retain) this.retained.commit(deviceId, topic, payload.length);
        return safeReply(cb, null, this.log);
      }
      if (s.failed) return safeReply(cb, new ConnectorError('ECONN_JOURNAL_IO', 'an earlier message on this connection could not be journaled'), this.log);
      const item: PendingPublish = {
        reply: cb,
        pid: journal && deviceId !== undefined ? pid : undefined,
        topic,
        payload,
        meta,
        bestEffort,
        retain: packet.retain,
        done: undefined,
        settled: !journal,
        err: undefined,
      };
      s.queue.push(item);
      if (!journal) return;
      let work: Promise<unknown> | undefined;
      if (item.pid !== undefined && deviceId !== undefined) {
        const prev = dup ? this.unacknowledged(s, deviceId, item.pid, topic, payload) : undefined;
        if (prev) {
          s.log.info({ topic, packet_id: item.pid }, 'QoS 1 redelivery (DUP 1) of a message already journaled: acknowledged, not journaled again');
          // the original append may still be pending (its connection dropped): wait for it; if it failed, append now
          work = prev.then(undefined, () => this.sink!.append(meta!, payload));
        } else if (this.redelivery.has(deviceId)) {
          this.redelivery.forget(deviceId, item.pid); // not a redelivery of it: the device moved on
        }
      }
      work ??= this.sink!.append(meta!, payload);
      item.done = work;
      work.then(
        () => this.settle(s, item, undefined),
        (err: unknown) => this.settle(s, item, err ?? new ConnectorError('ECONN_JOURNAL_IO', 'journal append failed')),
      );
    } catch (err) {
      this.log.error({ err }, 'error in authorizePublish');
      safeReply(cb, err as Error, this.log);
    }
  }

  /**
   * Where a publish may go: the ACL decision and whether it is bridged, cached per session by
   * topic (devices publish to few topics; the cache is bounded and rebuilt when rules change).
   */
  private routeOf(s: Session, topic: string): Route {
    let r = s.routes.get(topic);
    if (r === undefined) {
      const d = authorizePublish(s.principal, topic, this.limits);
      r = d.ok ? { refusal: undefined, bridged: isBridgedTopic(topic, this.bridge.topics) } : { refusal: d.reason, bridged: false };
      if (topic.length <= ROUTE_CACHE_TOPIC_BYTES) {
        if (s.routes.size >= ROUTE_CACHE) s.routes.clear();
        s.routes.set(topic, r);
      }
    }
    return r;
  }

  /**
   * The append of an unacknowledged QoS 1 publish this DUP 1 publish re-sends: one still pending
   * on this connection, or one whose PUBACK an earlier connection of the device never wrote.
   */
  private unacknowledged(s: Session, deviceId: string, pid: number, topic: string, payload: Buffer): Promise<unknown> | undefined {
    for (const q of s.queue) {
      if (q.pid === pid && q.done !== undefined && q.topic === topic && q.payload.equals(payload)) return q.done;
    }
    const e = this.redelivery.match(deviceId, pid, topic, payload);
    if (!e) return undefined;
    this.redelivery.forget(deviceId, pid, e); // its redelivery is what is pending now
    return e.done;
  }

  /** An append settled: acknowledge (or refuse) the publishes at the head of the queue, in order. */
  private settle(s: Session, item: PendingPublish, err: unknown): void {
    item.settled = true;
    item.err = err;
    const q = s.queue;
    while (q.length > 0 && q[0]!.settled) {
      const head = q.shift()!;
      if (head.err === undefined) {
        if (head.bestEffort && head.meta) this.safeBestEffort(s, head.bestEffort, head.meta, head.payload);
        if (head.retain) this.retained.commit(s.identity?.deviceId, head.topic, head.payload.length);
        if (s.ended) this.rememberUnacked(s, head); // the PUBACK cannot reach the device any more
        safeReply(head.reply, null, this.log);
      } else {
        s.failed = true;
        const code = errorCode(head.err) ?? 'ECONN_JOURNAL_IO';
        s.log.warn(
          { code, topic: head.topic, qos: head.pid !== undefined ? 1 : 0 },
          code === 'ECONN_JOURNAL_FULL'
            ? 'journal full: message not acknowledged; closing the connection so the device retries later'
            : 'message could not be journaled: not acknowledged; closing the connection so the device retries later',
        );
        safeReply(head.reply, head.err instanceof Error ? head.err : new ConnectorError('ECONN_JOURNAL_IO', 'journal append failed'), this.log);
      }
    }
  }

  /** A journaled QoS 1 publish whose PUBACK was never written (the connection ended first): remember it for its redelivery. */
  private rememberUnacked(s: Session, item: PendingPublish): void {
    const deviceId = s.identity?.deviceId;
    const pid = item.pid;
    const done = item.done;
    if (deviceId === undefined || pid === undefined || done === undefined || item.remembered) return;
    item.remembered = true;
    const entry = this.redelivery.remember(deviceId, pid, { topic: item.topic, length: item.payload.length, sha256: payloadDigest(item.payload), done });
    // a failed append leaves nothing to redeliver against: the redelivery must be appended
    done.then(undefined, () => this.redelivery.forget(deviceId, pid, entry));
  }

  /**
   * After a restart, the journal's unacknowledged QoS 1 records (they carry their MQTT packet id)
   * seed the redelivery table: a device whose PUBACK was lost to a crash resends with DUP 1 and
   * gets its PUBACK without a second copy upstream. Bounded by the table's own limits.
   */
  private rememberJournaled(): void {
    const source = this.sink as (UplinkSink & Partial<PendingRecords>) | undefined;
    if (typeof source?.pending !== 'function') return;
    let after = -1;
    let seeded = 0;
    for (let page = 0; page < 10_000; page++) {
      const recs = source.pending(after, 1024);
      if (recs.length === 0) break;
      for (const r of recs) {
        const m = r.meta;
        if (m.qos === 1 && typeof m.packetId === 'number') {
          this.redelivery.remember(m.deviceId, m.packetId, { topic: m.topic, length: r.size, sha256: r.sha256, done: Promise.resolve(r.id), seeded: true });
          seeded++;
        }
      }
      after = recs[recs.length - 1]!.seq;
    }
    if (seeded > 0) this.log.info({ entries: seeded }, 'redelivery table seeded from the journal');
  }

  private safeBestEffort(s: Session, fn: BestEffortForward, meta: UplinkMessageMeta, payload: Buffer): void {
    try {
      fn(meta, payload);
    } catch (err) {
      s.log.error({ err }, 'best-effort forward failed');
    }
  }

  private hookSubscribe(client: Client, sub: Subscription, cb: (err: Error | null, sub?: Subscription | null) => void): void {
    try {
      const s = this.sessions.get(client);
      if (!s) return cb(null, null);
      const d = authorizeSubscribe(s.principal, sub.topic, this.limits);
      if (!d.ok) {
        this.logAcl(s, 'subscribe', sub.topic, d.reason);
        return cb(null, null); // SUBACK 0x80 for this filter; the connection stays
      }
      cb(null, sub);
    } catch (err) {
      this.log.error({ err }, 'error in authorizeSubscribe');
      try {
        cb(null, null);
      } catch {
        /* nothing more to do */
      }
    }
  }

  private hookForward(client: Client, packet: AedesPublishPacket): AedesPublishPacket | null {
    try {
      const s = this.sessions.get(client);
      if (!s || s.dropped) return null;
      if (!authorizeDelivery(s.principal, packet.topic)) return null;
      if (packet.brokerId === CMD_BROKER_ID && packet.qos > 0) {
        const p = this.commands.get(packet.brokerCounter);
        if (p && p.session === s && p.messageId === undefined) {
          // choose the packet identifier aedes will use (QoSPacket keeps a given messageId) so the PUBACK can be matched
          const c = internals(client);
          const messageId = c._nextId;
          c._nextId = messageId >= 65535 ? 1 : messageId + 1;
          p.messageId = messageId;
          s.commands.set(messageId, p);
          return { ...packet, messageId } as AedesPublishPacket;
        }
      }
      return packet;
    } catch (err) {
      this.log.error({ err }, 'error in authorizeForward');
      return null;
    }
  }

  // ───────────────────────────── revocation ─────────────────────────────

  private readonly onDeviceRevoked = (deviceId: string): void => {
    this.guard('revoked', () => {
      const closing: Promise<void>[] = [];
      const drop = (s: Session): void => {
        closing.push(new Promise<void>((resolve) => this.dropSession(s, 'ECONN_DEVICE_REVOKED', 'device revoked', resolve)));
      };
      const s = this.byDevice.get(deviceId);
      if (s) drop(s);
      for (const other of this.sessions.values()) if (other !== s && other.identity?.deviceId === deviceId) drop(other);
      // then what the broker still holds for it: retained messages, persistent session, queued messages
      void Promise.all(closing).then(() => this.purgeDevice(deviceId));
    });
  };

  /**
   * A revoked (or deregistered) device leaves nothing behind in the broker: its retained messages
   * (those it set anywhere, and any under devices/ID/…), its persistent session (subscriptions,
   * messages queued while it was offline, QoS 2 state, will) and its redelivery entries. What it
   * had published and got acknowledged is in the journal and keeps flowing upstream.
   */
  private async purgeDevice(deviceId: string): Promise<void> {
    const aedes = this.aedes;
    if (!aedes || this.closing) return;
    try {
      const p = persistenceOf(aedes);
      const client = { id: deviceId, brokerId: aedes.id };
      const subscriptions = (await p.subscriptionsByClient(client))?.length ?? 0;
      await p.cleanSubscriptions(client);
      await p.cleanIncoming?.(client);
      let queued = 0;
      for await (const packet of p.outgoingStream(client)) {
        if (++queued > 1_000_000) break;
        await p.outgoingClearMessageId(client, packet);
      }
      await p.delWill(client);
      this.conformanceSessions.discard(deviceId);
      const topics = new Set(this.retained.topicsOf(deviceId));
      for await (const packet of p.createRetainedStream(`${DEVICES_PREFIX}/${deviceId}/#`)) {
        topics.add(packet.topic);
        if (topics.size > 1_000_000) break;
      }
      for (const topic of topics) await p.storeRetained({ cmd: 'publish', topic, payload: Buffer.alloc(0), qos: 0, retain: true, dup: false });
      this.retained.forgetOwner(deviceId);
      this.redelivery.forgetDevice(deviceId);
      this.log.info({ deviceId, retained: topics.size, subscriptions, queued }, 'revoked device: its retained messages and persistent session were removed from the broker');
      this.emit('device-purged', { deviceId, retained: topics.size, subscriptions, queued });
    } catch (err) {
      this.log.error({ err, deviceId }, 'could not remove the broker state of a revoked device');
      this.emit('device-purged', { deviceId, error: err });
    }
  }

  private readonly onTokenRevoked = (deviceId: string, jti: string): void => {
    this.guard('token-revoked', () => {
      for (const s of this.sessions.values()) {
        if (s.identity?.deviceId === deviceId && s.identity.token?.jti === jti) this.dropSession(s, 'ECONN_AUTH_TOKEN', 'token revoked');
      }
    });
  };

  private readonly onCertRevoked = (deviceId: string, serial: string): void => {
    this.guard('certificate-revoked', () => {
      for (const s of this.sessions.values()) {
        if (s.identity?.deviceId === deviceId && s.identity.cert?.serial === serial) this.dropSession(s, 'ECONN_AUTH_CERT', 'certificate revoked');
      }
    });
  };

  // ───────────────────────────── CommandTarget and operator API ─────────────────────────────

  isConnected(deviceId: string): boolean {
    const s = this.byDevice.get(deviceId);
    return s !== undefined && !s.dropped && !s.ended && !internals(s.client).closed;
  }

  connectedDevices(): string[] {
    return [...this.byDevice.keys()].filter((id) => this.isConnected(id));
  }

  /** Close a device's live session (operator action); false when it was not connected. */
  disconnectDevice(deviceId: string, reason = 'disconnected by the operator'): boolean {
    let found = false;
    for (const s of [...this.sessions.values()]) {
      if (s.identity?.deviceId === deviceId) {
        this.dropSession(s, 'ECONN_NOT_AUTHORIZED', reason);
        found = true;
      }
    }
    return found;
  }

  async publishCommand(deviceId: string, name: string, payload: Buffer, timeoutMs = 10_000): Promise<{ delivered: boolean; reason?: string }> {
    if (!this.aedes || this.closing) return { delivered: false, reason: 'the broker is not running' };
    const topic = `devices/${deviceId}/commands/${name}`;
    if (!name || !isValidTopicName(topic) || name.split('/').some((l) => l === '')) return { delivered: false, reason: 'invalid command name' };
    const lim = checkTopicLimits(topic, this.limits);
    if (!lim.ok) return { delivered: false, reason: lim.reason };
    const s = this.byDevice.get(deviceId);
    if (!s || s.dropped || !this.isConnected(deviceId)) return { delivered: false, reason: 'the device is not connected' };
    const c = internals(s.client);
    let qos = -1;
    for (const [filter, sub] of Object.entries(c.subscriptions)) {
      if (topicMatches(filter, topic)) qos = Math.max(qos, sub.qos ?? 0);
    }
    if (qos < 0) return { delivered: false, reason: `the device is not subscribed to ${topic}` };
    if (qos === 0) {
      await new Promise<void>((resolve) => s.client.publish({ cmd: 'publish', topic, payload, qos: 0, retain: false, dup: false } as PublishPacket, () => resolve()));
      return { delivered: true, reason: 'sent at QoS 0 (the device subscribed with QoS 0), so no acknowledgement' };
    }
    const counter = ++this.cmdCounter;
    return new Promise((resolve) => {
      const p: PendingCommand = {
        counter,
        session: s,
        messageId: undefined,
        resolve,
        timer: setTimeout(() => this.finishCommand(p, false, `no PUBACK within ${timeoutMs} ms`), timeoutMs),
      };
      p.timer.unref();
      this.commands.set(counter, p);
      try {
        s.client.publish({ cmd: 'publish', topic, payload, qos: 1, retain: false, dup: false, brokerId: CMD_BROKER_ID, brokerCounter: counter } as unknown as PublishPacket, (err) => {
          if (err) this.finishCommand(p, false, 'the command could not be written to the device');
          else if (p.messageId === undefined) this.finishCommand(p, false, 'the command was not delivered (ACL or session state)');
        });
      } catch (err) {
        this.log.error({ err }, 'error publishing a command');
        this.finishCommand(p, false, 'internal error while sending the command');
      }
    });
  }

  private onCommandAck(s: Session, messageId: number): void {
    const p = s.commands.get(messageId);
    if (p) this.finishCommand(p, true);
  }

  private finishCommand(p: PendingCommand, delivered: boolean, reason?: string): void {
    if (!this.commands.delete(p.counter)) return;
    clearTimeout(p.timer);
    if (p.messageId !== undefined) p.session.commands.delete(p.messageId);
    p.resolve(reason === undefined ? { delivered } : { delivered, reason });
  }
}
