/**
 * The daemon's cloud side as one component (name 'uplink'): the cloud token
 * client plus the uplink, wired to the journal (the outbox) and the broker
 * (CommandTarget, and the QoS 0 best-effort hook). The journal and the broker
 * are looked up when it starts, so its place in app.ts only has to be after
 * both in the start order.
 *
 * Readiness (/readyz): judged by cloud acknowledgements (Uplink.readiness), not
 * by the socket being open.
 */
import type { Registry } from 'prom-client';
import type { Config } from '../core/config/schema.js';
import type { Component } from '../core/component.js';
import type { Logger } from '../core/logger.js';
import { StartupError } from '../core/errors.js';
import type { CommandTarget, UplinkMessageMeta, UplinkSink } from '../core/ports.js';
import { CloudTokenClient } from './cloud-token.js';
import { Uplink, uplinkSettings, type UplinkJournal } from './uplink.js';

export interface CloudLinkDeps {
  config: () => Config;
  logger: Logger;
  metrics: Registry;
  /** Register the readiness check (health.addReadinessCheck). */
  addReadinessCheck?: (name: string, check: () => { ok: boolean; reason?: string }) => void;
  /** Looked up at start. */
  journal: () => (UplinkJournal & UplinkSink) | undefined;
  broker: () => (CommandTarget & { setSink?(sink: UplinkSink | undefined, bestEffort?: (meta: UplinkMessageMeta, payload: Buffer) => void): void }) | undefined;
  software?: string;
}

export class CloudLink implements Component {
  readonly name = 'uplink';
  private tokens: CloudTokenClient | undefined;
  private uplink: Uplink | undefined;

  constructor(private readonly deps: CloudLinkDeps) {}

  get link(): Uplink | undefined {
    return this.uplink;
  }

  async start(): Promise<void> {
    if (this.uplink) return;
    const config = this.deps.config();
    const journal = this.deps.journal();
    if (!journal) throw new StartupError('ECONN_INTERNAL', 'bridge.enabled is true but the journal is not built (app.ts must start the journal before the uplink)');
    const broker = this.deps.broker();
    // a token endpoint outage backs off like the uplink itself (bridge.uplink.reconnect_min_ms … reconnect_max_ms)
    const tokens = new CloudTokenClient({
      token: config.bridge.token,
      uplink: config.bridge.uplink,
      logger: this.deps.logger,
      retryMinMs: config.bridge.uplink.reconnect_min_ms,
      retryMaxMs: config.bridge.uplink.reconnect_max_ms,
    });
    const uplink = new Uplink({ settings: uplinkSettings(config), journal, tokens, commands: broker, logger: this.deps.logger, metrics: this.deps.metrics, software: this.deps.software });
    this.tokens = tokens;
    this.uplink = uplink;
    // the broker journals uplink topics already; this adds the best-effort path for QoS 0 (used when bridge.qos0=best_effort)
    broker?.setSink?.(journal, (meta, payload) => void uplink.sendBestEffort(meta, payload));
    this.deps.addReadinessCheck?.('uplink', () => uplink.readiness());
    await uplink.start();
  }

  async reload(next: Config): Promise<string[]> {
    return this.uplink ? this.uplink.reconfigure(uplinkSettings(next)) : [];
  }

  status(): Record<string, unknown> {
    return this.uplink ? this.uplink.status() : { state: 'stopped' };
  }

  async close(): Promise<void> {
    await this.uplink?.close();
    await this.tokens?.close();
  }
}
