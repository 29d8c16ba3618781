/**
 * Daemon-level Prometheus metrics: facts no single component owns, read at
 * scrape time (collect callbacks) from the components' status() and the device
 * registry, so they cost nothing between scrapes.
 *
 * Who exports what (all on one registry, GET /metrics):
 *   connector_process_*                  process: CPU, resident memory, heap, event-loop lag
 *                                        (prom-client default metrics, daemon/health.ts)
 *   connector_journal_*                  journal depth msgs/bytes, oldest age, drops/quarantine by reason (bridge/journal.ts)
 *   connector_uplink_*                   state, reconnects, sent/acked msgs+bytes, rejects, ack latency
 *                                        histogram, token expiry, last ack age (bridge/uplink.ts)
 *   this module (skipping any name a component already registered):
 *   connector_up / connector_ready                        1 while running / while /readyz is 200
 *   connector_devices_connected                           live device sessions (broker status)
 *   connector_devices_registered{status}                  registry: active / revoked
 *   connector_messages_total{direction="in"}              messages accepted from devices into the journal
 *   connector_message_bytes_total{direction="in"}         their payload bytes
 *   connector_certificate_expiry_seconds{cert}            server certificate, device CA: seconds until notAfter
 *   connector_device_certificate_expiry_seconds{device_id} newest valid certificate of each active device
 *   connector_watchdog_pings_total / _withheld_total      systemd watchdog pings sent / withheld (blocked loop)
 */
import type { EventEmitter } from 'node:events';
import { Counter, Gauge, type Registry } from 'prom-client';
import type { Component } from '../core/component.js';
import type { WatchdogState } from './notify.js';
import { deviceCertExpiries, numAt, type DeviceCertSource } from './status.js';

export interface DaemonMetricsOptions {
  registry: Registry;
  /** lifecycle.status(): every started component's status() by name. */
  componentStatus: () => Record<string, unknown>;
  ready: () => boolean;
  watchdog?: () => WatchdogState | undefined;
  /** The device registry (identity), when it runs. */
  devices?: () => DeviceCertSource | undefined;
  /** The journal, when the bridge runs: its 'append' events count messages in. */
  journal?: () => EventEmitter | undefined;
  now?: () => number;
}

type Obj = Record<string, unknown>;
const isObj = (v: unknown): v is Obj => typeof v === 'object' && v !== null && !Array.isArray(v);

function secondsUntil(v: unknown, now: number): number | undefined {
  const ms = typeof v === 'string' ? Date.parse(v) : typeof v === 'number' ? v : NaN;
  return Number.isNaN(ms) ? undefined : (ms - now) / 1000;
}

export class DaemonMetrics implements Component {
  readonly name = 'daemon-metrics';
  private registered = false;
  private journal: EventEmitter | undefined;
  private messagesIn: Counter | undefined;
  private bytesIn: Counter | undefined;
  private readonly onAppend = (rec: { size?: number }): void => {
    this.messagesIn?.inc({ direction: 'in' });
    if (typeof rec?.size === 'number') this.bytesIn?.inc({ direction: 'in' }, rec.size);
  };
  /** Names this module registered (the others were already there). */
  readonly names: string[] = [];

  constructor(private readonly opts: DaemonMetricsOptions) {}

  /** Register the metrics; runs after every other component started, so their own metrics take precedence. */
  async start(): Promise<void> {
    if (!this.registered) {
      this.registered = true;
      this.register();
    }
    const j = this.opts.journal?.();
    if (j && j !== this.journal && this.messagesIn) {
      this.journal = j;
      j.on('append', this.onAppend);
    }
  }

  async close(): Promise<void> {
    this.journal?.off('append', this.onAppend);
    this.journal = undefined;
  }

  private free(name: string): boolean {
    if (this.opts.registry.getSingleMetric(name)) return false;
    this.names.push(name);
    return true;
  }

  private register(): void {
    const o = this.opts;
    const registers = [o.registry];
    const now = (): number => (o.now ?? Date.now)();
    const comp = (name: string): unknown => {
      try {
        return o.componentStatus()[name];
      } catch {
        return undefined;
      }
    };

    if (this.free('connector_up')) new Gauge({ name: 'connector_up', help: '1 while the daemon runs', registers }).set(1);
    if (this.free('connector_ready')) {
      new Gauge({
        name: 'connector_ready',
        help: '1 while the daemon is ready (/readyz answers 200), else 0',
        registers,
        collect() {
          this.set(o.ready() ? 1 : 0);
        },
      });
    }
    // only when a broker runs: without one, "0 devices connected" would be a lie
    if (isObj(comp('broker')) && this.free('connector_devices_connected')) {
      new Gauge({
        name: 'connector_devices_connected',
        help: 'device sessions currently connected to the broker',
        registers,
        collect() {
          this.reset();
          const v = numAt(comp('broker'), 'devices_connected', 'connected');
          if (v !== null) this.set(v);
        },
      });
    }
    if (this.free('connector_devices_registered')) {
      new Gauge({
        name: 'connector_devices_registered',
        help: 'devices in the registry, by status',
        labelNames: ['status'],
        registers,
        collect() {
          this.reset();
          const r = comp('registry');
          const all = numAt(r, 'devices');
          const active = numAt(r, 'active');
          if (all === null || active === null) return;
          this.set({ status: 'active' }, active);
          this.set({ status: 'revoked' }, all - active);
        },
      });
    }
    if (this.free('connector_messages_total') && this.free('connector_message_bytes_total')) {
      this.messagesIn = new Counter({ name: 'connector_messages_total', help: 'device messages accepted into the journal (direction="in"); messages out: connector_uplink_messages_acked_total', labelNames: ['direction'], registers });
      this.bytesIn = new Counter({ name: 'connector_message_bytes_total', help: 'payload bytes of device messages accepted into the journal (direction="in"); bytes out: connector_uplink_bytes_acked_total', labelNames: ['direction'], registers });
      this.messagesIn.inc({ direction: 'in' }, 0);
      this.bytesIn.inc({ direction: 'in' }, 0);
    }
    if (this.free('connector_certificate_expiry_seconds')) {
      new Gauge({
        name: 'connector_certificate_expiry_seconds',
        help: 'seconds until the certificate expires (negative: expired), cert="server" or "device_ca"',
        labelNames: ['cert'],
        registers,
        collect() {
          this.reset();
          const p = comp('pki');
          if (!isObj(p)) return;
          const server = secondsUntil(p.server_not_after, now());
          const ca = secondsUntil(p.ca_not_after, now());
          if (server !== undefined) this.set({ cert: 'server' }, server);
          if (ca !== undefined) this.set({ cert: 'device_ca' }, ca);
        },
      });
    }
    if (this.free('connector_device_certificate_expiry_seconds')) {
      new Gauge({
        name: 'connector_device_certificate_expiry_seconds',
        help: 'seconds until the newest valid certificate of each active device expires',
        labelNames: ['device_id'],
        registers,
        collect() {
          this.reset();
          const reg = o.devices?.();
          if (!reg) return;
          try {
            for (const e of deviceCertExpiries(reg, now())) this.set({ device_id: e.device_id }, e.seconds_left);
          } catch {
            // registry not started
          }
        },
      });
    }
    if (o.watchdog && this.free('connector_watchdog_pings_total') && this.free('connector_watchdog_withheld_total')) {
      const wd = o.watchdog;
      let seen = { pings: 0, withheld: 0 };
      const pings = new Counter({ name: 'connector_watchdog_pings_total', help: 'systemd watchdog pings (WATCHDOG=1) sent', registers, collect: () => sync() });
      const withheld = new Counter({ name: 'connector_watchdog_withheld_total', help: 'watchdog pings withheld because the event loop was blocked', registers, collect: () => sync() });
      const sync = (): void => {
        const s = wd();
        if (!s) return;
        pings.inc(Math.max(0, s.pings - seen.pings));
        withheld.inc(Math.max(0, s.withheld - seen.withheld));
        seen = { pings: s.pings, withheld: s.withheld };
      };
    }
  }
}
