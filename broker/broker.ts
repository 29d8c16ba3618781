/**
 * The Broker component: an embedded aedes (MQTT 3.1.1) behind our own listeners. It wires the
 * parts, each in its own file:
 *
 *  - listeners.ts — the device listeners (MQTT/TLS, MQTT/WSS, local) and their TLS context;
 *  - crl-watch.ts — the device CRLs, reloaded on change;
 *  - conformance.ts — the MQTT 3.1.1 guard in front of every connection (and its hook fix-ups);
 *    it also asks inflight-budget.ts for room before reading the body of a large PUBLISH;
 *  - hooks.ts — the aedes hooks and the device sessions: auth, ACL, journal before PUBACK,
 *    redelivery (redelivery.ts), retained limits (retained.ts), revocation;
 *  - commands.ts — CommandTarget: cloud commands to devices, resolved on PUBACK;
 *  - aedes-internals.ts — the aedes internals all of this relies on (pinned aedes ~1.2).
 *
 * Healthy sessions survive reload() (new TLS context, CRLs, ACL rules, limits). The broker reads
 * its own configuration section and the bridge routing only (settings.ts).
 */
import { EventEmitter } from 'node:events';
import type { IncomingMessage } from 'node:http';
import type { Duplex } from 'node:stream';
import { Counter, Gauge, type Registry } from 'prom-client';
import { Aedes } from 'aedes';
import type { Logger } from '../core/logger.js';
import type { Component } from '../core/component.js';
import { ConnectorError } from '../core/errors.js';
import { RefusalLog, SourceBudget } from '../core/refusals.js';
import type { CommandTarget, UplinkSink } from '../core/ports.js';
import { CrlStore, DeviceAuthenticator, type TokenVerifier } from '../identity/auth.js';
import { SessionTracker, conformanceHooks } from './conformance.js';
import { RedeliveryTable } from './redelivery.js';
import { RetainedLedger, type RetainedLimits } from './retained.js';
import { DeviceListeners, type ListenerName, type ListenerPki, type StreamOrigin } from './listeners.js';
import { CrlWatch } from './crl-watch.js';
import { CommandSender } from './commands.js';
import { DeviceSessions, packetLimit, topicLimits, type BestEffortForward, type BrokerRegistry } from './hooks.js';
import { aedesInternals, aedesMqttPacket } from './aedes-internals.js';
import { InflightBudget } from './inflight-budget.js';
import { RECLAIM_EVERY_BYTES, collectNow } from '../core/reclaim.js';
import type { BridgeRouting, BrokerConfig, BrokerSettings } from './settings.js';

export { PORT_KEYS, type ListenerName } from './listeners.js';
export { brokerSettings, type BridgeRouting, type BrokerConfig, type BrokerSettings } from './settings.js';
export type { BestEffortForward, BrokerRegistry } from './hooks.js';

/** What the broker needs from the local PKI (LocalPki satisfies it). */
export interface BrokerPki extends ListenerPki {
  on?(event: string, listener: () => void): unknown;
  off?(event: string, listener: () => void): unknown;
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

function retainedLimits(l: BrokerConfig['limits']): RetainedLimits {
  return { maxCount: l.max_retained_per_device, maxBytes: l.max_retained_bytes_per_device };
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
  private readonly closeTimeoutMs: number;
  private readonly crls = new CrlStore();
  private readonly auth: DeviceAuthenticator;
  private readonly deviceListeners: DeviceListeners;
  private readonly crlWatch: CrlWatch;
  private readonly commands: CommandSender;
  private readonly sessions: DeviceSessions;
  private readonly retained: RetainedLedger;
  private readonly budget: InflightBudget;
  /** refused connections: the first few of an interval logged in full, then one summary line per interval */
  private readonly refusals: RefusalLog;
  /** refused attempts per source address (broker.limits.refused_per_source_*) */
  private readonly sourceBudget: SourceBudget;
  private aedes: Aedes | undefined;
  private tracker = new SessionTracker();
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
    const now = opts.now ?? Date.now;
    this.closeTimeoutMs = opts.closeTimeoutMs ?? 3000;
    this.retained = new RetainedLedger(retainedLimits(opts.config.limits));
    this.budget = new InflightBudget(opts.config.limits.large_inflight_budget_bytes, collectNow, RECLAIM_EVERY_BYTES);
    let mConnects: Counter<'listener' | 'via'> | undefined;
    let mRefusals: Counter<'listener' | 'code'> | undefined;
    if (opts.metrics) {
      const registers = [opts.metrics];
      mConnects = new Counter({ name: 'connector_broker_connects_total', help: 'accepted MQTT connections, by listener and credential (cert, jwt, cert+jwt, anonymous)', labelNames: ['listener', 'via'], registers });
      mRefusals = new Counter({ name: 'connector_broker_refusals_total', help: 'refused MQTT connections, by listener and reason code (ECONN_…)', labelNames: ['listener', 'code'], registers });
      const budget = this.budget;
      new Gauge({
        name: 'connector_broker_large_inflight_bytes',
        help: 'bytes of large publishes held in memory now (broker.limits.large_inflight_budget_bytes caps it)',
        registers,
        collect() {
          this.set(budget.status().in_flight_bytes);
        },
      });
      new Gauge({
        name: 'connector_broker_large_waiting',
        help: 'large publishes waiting for room in the in-flight budget (their sockets are not read meanwhile)',
        registers,
        collect() {
          this.set(budget.status().waiting);
        },
      });
    }
    this.auth = new DeviceAuthenticator({ registry: opts.registry, tokens: opts.tokens, crls: this.crls, tls: opts.config.tls, now });
    const closing = (): boolean => this.closing !== undefined;
    this.refusals = new RefusalLog({ log: this.log, msg: 'MQTT connection refused', what: 'MQTT connections' });
    const budget = new SourceBudget(() => ({ perS: this.config.limits.refused_per_source_per_s, burst: this.config.limits.refused_per_source_burst }), now);
    this.sourceBudget = budget;
    this.commands = new CommandSender({
      log: this.log,
      sessionOf: (id) => this.sessions.liveSession(id),
      limits: () => topicLimits(this.config.limits),
      running: () => this.aedes !== undefined && !closing(),
    });
    this.sessions = new DeviceSessions({
      log: this.log,
      registry: opts.registry,
      auth: this.auth,
      crls: this.crls,
      commands: this.commands,
      redelivery: new RedeliveryTable({ ...opts.redelivery, now }),
      retained: this.retained,
      now,
      config: () => this.config,
      bridge: () => this.bridge,
      sink: () => this.sink,
      bestEffort: () => this.bestEffort,
      aedes: () => this.aedes,
      tracker: () => this.tracker,
      closing,
      emit: (event, payload) => this.emit(event, payload),
      budget: this.budget,
      mConnects,
      mRefusals,
      refusals: this.refusals,
      sourceBudget: budget,
    });
    this.deviceListeners = new DeviceListeners({
      log: this.log,
      pki: opts.pki,
      config: () => this.config,
      maxPacketBytes: () => packetLimit(this.config.limits),
      onStream: (stream: Duplex, origin: StreamOrigin, req?: IncomingMessage) => this.sessions.handleStream(stream, { ...origin }, req),
      onRefused: (listener) => mRefusals?.inc({ listener, code: 'ECONN_BROKER_LIMIT' }),
      refusals: this.refusals,
      budget,
      closing,
    });
    this.crlWatch = new CrlWatch({
      crls: this.crls,
      log: this.log,
      pollMs: opts.crlPollMs ?? 2000,
      files: () => this.config.tls.crl_files,
      afterLoad: () => this.sessions.dropRevokedCertificates(),
      onReloaded: (r) => this.emit('crl-reloaded', r),
      closing,
    });
  }

  /** Attach the uplink journal (and the QoS 0 best-effort path) once it exists. */
  setSink(sink: UplinkSink | undefined, bestEffort?: BestEffortForward): void {
    this.sink = sink;
    this.bestEffort = bestEffort;
  }

  /** Ports actually bound, by listener. */
  boundPorts(): ReadonlyMap<ListenerName, number> {
    return this.deviceListeners.ports;
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

  private async doStart(): Promise<void> {
    const b = this.config;
    await this.crlWatch.load();
    this.sessions.rememberJournaled();
    const s = this.sessions;
    // mqtt-packet writes packet ids and topic lengths from a cache of all 65 536 2-byte Buffers, made on the first
    // packet written: ~7 MiB of heap held for the life of the daemon (measured, issue 11) to save one 2-byte
    // allocation per number written (tens of ns against ~80 µs of CPU per message)
    aedesMqttPacket().writeToStream.cacheNumbers = false;
    const aedes = new Aedes({
      id: `edge-connector-${process.pid}`,
      connectTimeout: b.limits.connect_timeout_ms,
      queueLimit: b.limits.queue_limit,
      maxClientsIdLength: 128,
      maxTopicLevels: 100, // our own max_topic_depth is checked in the ACL (aedes clamps to 100)
      preConnect: (client, packet, cb) => s.hookPreConnect(client, packet, cb),
      authenticate: (client, username, password, cb) => s.hookAuthenticate(client, username, password, cb),
      authorizePublish: (client, packet, cb) => s.hookPublish(client, packet, cb),
      published: (packet, _client, cb) => s.hookPublished(packet, cb),
      // our ACL runs first, then the MQTT 3.1.1 fix-ups of broker/conformance.ts (QoS cap, $-topics, SUBACK 0x80 on error)
      ...conformanceHooks({
        authorizeSubscribe: (client, sub, cb) => s.hookSubscribe(client, sub, cb),
        authorizeForward: (client, packet) => s.hookForward(client, packet),
      }),
    });
    this.aedes = aedes;
    this.tracker = new SessionTracker();
    await aedes.listen();
    // register the session as soon as its CONNACK is written (before aedes' 'clientReady'), so a command can follow at once
    aedes.on('connackSent', (packet, c) => s.guard('connackSent', () => packet.returnCode === 0 && s.onClientReady(c)));
    aedes.on('clientDisconnect', (c) => s.guard('clientDisconnect', () => s.endSession(c)));
    aedes.on('clientError', (c, err) => s.guard('clientError', () => s.onClientError(c, err)));
    aedes.on('connectionError', (c, err) => s.guard('connectionError', () => s.onClientError(c, err)));
    (aedes as EventEmitter).on('error', (err: unknown) => this.log.error({ err }, 'aedes error'));

    await this.deviceListeners.start();
    this.registry.on('revoked', s.onDeviceRevoked);
    this.registry.on('token-revoked', s.onTokenRevoked);
    this.registry.on('certificate-revoked', s.onCertRevoked);
    this.pki.on?.('server-cert', this.onServerCert);
    this.crlWatch.watch();
    this.log.info({ ports: Object.fromEntries(this.deviceListeners.ports) }, 'broker listening');
  }

  close(): Promise<void> {
    this.closing ??= this.doClose();
    return this.closing;
  }

  private async doClose(): Promise<void> {
    const s = this.sessions;
    this.registry.off('revoked', s.onDeviceRevoked);
    this.registry.off('token-revoked', s.onTokenRevoked);
    this.registry.off('certificate-revoked', s.onCertRevoked);
    this.pki.off?.('server-cert', this.onServerCert);
    this.crlWatch.unwatch();
    this.commands.closeAll();
    this.refusals.close();
    const serversClosed = this.deviceListeners.stopAccepting();
    const aedes = this.aedes;
    if (aedes && !aedes.closed) {
      await Promise.race([new Promise<void>((r) => aedes.close(() => r())), new Promise<void>((r) => setTimeout(r, this.closeTimeoutMs).unref())]);
    }
    this.deviceListeners.destroySockets();
    s.clearTimers();
    await Promise.race([serversClosed, new Promise<void>((r) => setTimeout(r, this.closeTimeoutMs).unref())]);
    this.deviceListeners.ports.clear();
  }

  status(): Record<string, unknown> {
    const l = this.deviceListeners.status();
    return {
      listeners: l.listeners,
      devices_connected: this.sessions.byDevice.size,
      sessions: this.sessions.size,
      max_connections: this.config.limits.max_connections,
      crl_entries: this.crls.size,
      refused_over_limit: l.refused_over_limit,
      refused_total: this.refusals.total,
      sources_over_budget: this.sourceBudget.tracked,
      turned_away: this.sourceBudget.turnedAway,
      handshakes: l.handshakes,
      retained_by_devices: this.retained.size,
      large_publishes: this.budget.status(),
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
      if (await this.deviceListeners.refreshSecureContext()) changes.push('broker: TLS context reloaded (server certificate, trusted CAs or min version)');
    } catch (err) {
      this.log.error({ err }, 'TLS context reload failed; the previous one stays in use');
      changes.push(`broker: TLS reload failed (${(err as Error).message}); previous TLS context kept`);
    }
    // CRLs
    this.crlWatch.rewatchIfChanged();
    const crl = await this.crlWatch.reload('reload');
    if (crl) changes.push(crl);
    this.auth.setCertIdentity(b.tls);
    // limits
    if (this.aedes) {
      const a = aedesInternals(this.aedes);
      a.queueLimit = b.limits.queue_limit;
      a.connectTimeout = b.limits.connect_timeout_ms;
    }
    this.retained.setLimits(retainedLimits(b.limits));
    this.budget.setLimit(b.limits.large_inflight_budget_bytes);
    if (JSON.stringify(prev.broker.limits) !== JSON.stringify(b.limits)) changes.push('broker: limits updated (apply to new packets and connections)');
    // ACL: recompute every live session's principal; existing subscriptions are re-checked at delivery
    const aclChanged = JSON.stringify(prev.broker.acl) !== JSON.stringify(b.acl) || JSON.stringify(prev.broker.listeners.local.acl) !== JSON.stringify(b.listeners.local.acl);
    this.sessions.reconfigure(aclChanged);
    if (aclChanged) changes.push('broker: ACL rules updated');
    if (JSON.stringify(prev.bridge.topics) !== JSON.stringify(next.bridge.topics) || prev.bridge.qos0 !== next.bridge.qos0) {
      changes.push('broker: bridge topics / qos0 policy updated');
    }
    return changes;
  }

  /** Reload the CRLs now (also done on file change and on reload); resolves with a line for the report. */
  reloadCrls(why: string): Promise<string | undefined> {
    return this.crlWatch.reload(why);
  }

  private readonly onServerCert = (): void => {
    this.deviceListeners.refreshSecureContext().then(
      (changed) => changed && this.log.info('server certificate renewed by the local PKI; new TLS handshakes use it'),
      (err: unknown) => this.log.error({ err }, 'cannot apply the renewed server certificate'),
    );
  };

  // ───────────────────────────── CommandTarget and operator API ─────────────────────────────

  isConnected(deviceId: string): boolean {
    return this.sessions.isConnected(deviceId);
  }

  connectedDevices(): string[] {
    return this.sessions.connectedDevices();
  }

  /** Close a device's live session (operator action); false when it was not connected. */
  disconnectDevice(deviceId: string, reason = 'disconnected by the operator'): boolean {
    return this.sessions.disconnectDevice(deviceId, reason);
  }

  publishCommand(deviceId: string, name: string, payload: Buffer, timeoutMs = 10_000): Promise<{ delivered: boolean; reason?: string }> {
    return this.commands.publish(deviceId, name, payload, timeoutMs);
  }
}
