/**
 * The composition root: builds every component with its dependencies passed
 * in (config slice, logger, metrics registry, admin socket), in start order.
 * The lifecycle closes them in reverse.
 */
import type { Registry } from 'prom-client';
import type { Config } from '../core/config/schema.js';
import type { Logger } from '../core/logger.js';
import type { Component } from '../core/component.js';
import type { InitStep } from './init.js';
import { AdminServer, adminSocketPath } from './admin.js';
import { HealthServer, createMetricsRegistry } from './health.js';
import path from 'node:path';
import { DeviceRegistry } from '../identity/registry.js';
import { LocalPki } from '../identity/pki.js';
import { TokenService } from '../identity/tokens.js';
import { EnrollmentStore } from '../identity/enrollment.js';
import { registerIdentityAdmin, type Identity } from '../identity/admin.js';
import { ApiServer } from '../api/api.js';
import { CloudTokenClient } from '../bridge/cloud-token.js';
import { Uplink, uplinkSettings } from '../bridge/uplink.js';
import { Journal } from '../bridge/journal.js';
import { Broker, PORT_KEYS, brokerSettings } from '../broker/broker.js';

/** Ports actually bound (differs from the config when it says 0), reported in the `ready` log line. */
export type BoundPorts = Map<string, number>;

export interface DaemonContext {
  config: Config;
  configFile: string;
  logger: Logger;
  metrics: Registry;
  admin: AdminServer;
  health: HealthServer;
  ports: BoundPorts;
  /** Device identity: registry, local PKI, device tokens, enrollment tokens (started first). */
  identity?: Identity;
  /** The durable outbox (bridge/journal.ts), when bridge.enabled; replayed before the broker and the API listen. */
  journal?: Journal;
  /** The embedded MQTT broker (broker/broker.ts): device listeners, auth, ACL; CommandTarget for the uplink. */
  broker?: Broker;
  /** The cloud uplink (bridge/uplink.ts), when bridge.enabled: sends the journal to the cloud, takes its commands. */
  uplink?: Uplink;
}

export interface Daemon {
  ctx: DaemonContext;
  components: Component[];
}

/** Steps of `connector init` (state directory and secrets come first, in runInit). */
export function initSteps(): InitStep[] {
  return [LocalPki.initStep(), TokenService.initStep()];
}

export function buildDaemon(config: Config, configFile: string, logger: Logger): Daemon {
  const metrics = createMetricsRegistry();
  const admin = new AdminServer(adminSocketPath(config.daemon.state_dir), logger);
  const health = new HealthServer(config.metrics, metrics, logger);
  const ports: BoundPorts = new Map();
  const ctx: DaemonContext = { config, configFile, logger, metrics, admin, health, ports };

  const stateDir = config.daemon.state_dir;
  const registry = new DeviceRegistry({ file: path.join(stateDir, 'registry.json'), logger });
  const pki = new LocalPki({ stateDir, config: config.identity.pki, logger });
  const tokens = new TokenService({ stateDir, config: config.identity.jwt, registry, logger });
  const enrollment = new EnrollmentStore({ registry, logger });
  ctx.identity = { registry, pki, tokens, enrollment };

  // the journal is replayed before any device-facing listener binds (PUBACK / 202 only once durable)
  const journal = config.bridge.enabled
    ? new Journal({ dir: path.join(stateDir, 'journal'), config: config.bridge.journal, logger, metrics })
    : undefined;
  if (journal) ctx.journal = journal;
  // the cloud side (bridge.enabled): the token client and the uplink. Built before the broker so that the
  // broker's QoS 0 best-effort path (bridge.qos0=best_effort) can reach the uplink; the uplink takes the
  // broker as its CommandTarget. Constructors do no I/O: nothing connects before the lifecycle starts them.
  let uplink: Uplink | undefined;
  // a token endpoint outage backs off like the uplink itself (bridge.uplink.reconnect_min_ms … reconnect_max_ms)
  const cloudTokens = journal
    ? new CloudTokenClient({
        token: config.bridge.token,
        uplink: config.bridge.uplink,
        logger,
        retryMinMs: config.bridge.uplink.reconnect_min_ms,
        retryMaxMs: config.bridge.uplink.reconnect_max_ms,
      })
    : undefined;
  // the MQTT broker: after identity and the journal (it appends before PUBACK), before the API and the uplink;
  // the journal is its sink for uplink topics, the uplink its best-effort path for QoS 0
  const broker = new Broker({
    config: config.broker,
    bridge: brokerSettings(config).bridge,
    logger,
    metrics,
    registry,
    pki,
    tokens,
    ...(journal ? { sink: journal, bestEffort: (meta, payload) => void uplink?.sendBestEffort(meta, payload) } : {}),
  });
  // the lifecycle reloads with the whole config; the broker gets its own sections only
  const brokerComponent: Component = { name: broker.name, start: () => broker.start(), close: () => broker.close(), status: () => broker.status(), reload: (next) => broker.reload(brokerSettings(next)) };
  ctx.broker = broker;
  if (journal && cloudTokens) {
    uplink = new Uplink({ settings: uplinkSettings(config), journal, tokens: cloudTokens, commands: broker, logger, metrics });
    ctx.uplink = uplink;
    // /readyz judges the uplink by the age of the last cloud ack (Uplink.readiness), not by an open socket
    const link = uplink;
    health.addReadinessCheck('uplink', () => link.readiness());
  }
  registerIdentityAdmin(admin, ctx.identity, logger, { enrollmentDefaultTtlS: () => ctx.config.identity.enrollment_default_ttl_s });

  // HTTPS registration/upload API: device status asks the broker; uploads go to the journal
  const api = new ApiServer({
    config,
    identity: ctx.identity,
    logger,
    ports,
    sink: () => ctx.journal,
    isConnected: (id) => broker.isConnected(id),
  });

  const portsOf: Component = {
    name: 'ports',
    start: async () => {
      for (const [l, port] of broker.boundPorts()) ports.set(PORT_KEYS[l], port);
      if (api.boundPort) ports.set('api', api.boundPort);
      if (health.boundPort) ports.set('metrics', health.boundPort);
    },
    close: async () => {},
  };

  // the token client has nothing to start (it fetches on the uplink's first getToken) and closes after the uplink
  const tokenClient: Component | undefined = cloudTokens ? { name: 'cloud-token', start: async () => {}, close: () => cloudTokens.close() } : undefined;

  // start order: state first, then device-facing and cloud-facing parts, health and admin last
  // like the broker, the uplink is reloaded with its own sections only
  const link = uplink;
  const uplinkComponent: Component | undefined = link
    ? { name: link.name, start: () => link.start(), close: () => link.close(), status: () => link.status(), reload: (next) => link.reconfigure(uplinkSettings(next)) }
    : undefined;
  const components: Component[] = [registry, pki, tokens, ...(journal ? [journal] : []), brokerComponent, api, ...(tokenClient && uplinkComponent ? [tokenClient, uplinkComponent] : []), health, portsOf, admin];
  return { ctx, components };
}
