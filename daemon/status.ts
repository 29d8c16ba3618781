/**
 * One picture of what the daemon is doing, built from every component's
 * status(): returned by the admin method `status` (→ `connector status`,
 * `--json`), condensed into the systemd STATUS= line, and read by the
 * daemon-level metrics (daemon/metrics.ts).
 *
 * Components own their status() shapes; this module only reads them, by the
 * names documented in `componentFacts` below, and tolerates anything missing
 * (a component that is off or not built yet shows as null, never as 0).
 */
import { readFileSync } from 'node:fs';
import type { DaemonContext } from './app.js';
import type { Lifecycle } from './lifecycle.js';
import type { WatchdogState } from './notify.js';

export interface Expiry {
  /** e.g. "server certificate", "cloud token", "device sensor-1 certificate" */
  what: string;
  expires_at: string;
  seconds_left: number;
}

export interface StatusSummary {
  /** Connected device sessions, or null when the broker does not run. */
  devices_connected: number | null;
  /** Registered devices (active), or null when unknown. */
  devices_registered: number | null;
  /** Bound ports by listener name. */
  listeners: Record<string, number>;
  journal: {
    messages: number | null;
    bytes: number | null;
    oldest_unacked_age_s: number | null;
    /**
     * Messages the cloud acknowledged per second, mean over the last minute (the status page's
     * sampler, daemon/status-page.ts `rates()`); 0 when nothing was acknowledged in that minute,
     * null while unknown (less than one sampling interval since start, or no sampler).
     */
    drain_rate_msg_s: number | null;
  } | null;
  uplink: { state: string | null; last_ack_age_s: number | null; reconnects: number | null } | null;
  expiries: Expiry[];
}

export interface DaemonStatus {
  pid: number;
  version: string;
  uptime_s: number;
  config: string;
  state_dir: string;
  ready: { ready: boolean; reasons: string[] };
  ports: Record<string, number>;
  summary: StatusSummary;
  /** Device certificates: how many, and the ones expiring soonest (at most 5). */
  device_certificates?: { count: number; expiring_within_30d: number; soonest: (Expiry & { device_id: string })[] };
  watchdog?: WatchdogState;
  components: Record<string, unknown>;
}

type Obj = Record<string, unknown>;
const isObj = (v: unknown): v is Obj => typeof v === 'object' && v !== null && !Array.isArray(v);

/** First finite number found at any of the dotted paths. */
export function numAt(o: unknown, ...paths: string[]): number | null {
  for (const p of paths) {
    let v: unknown = o;
    for (const k of p.split('.')) v = isObj(v) ? v[k] : undefined;
    if (typeof v === 'number' && Number.isFinite(v)) return v;
  }
  return null;
}

export function strAt(o: unknown, ...paths: string[]): string | null {
  for (const p of paths) {
    let v: unknown = o;
    for (const k of p.split('.')) v = isObj(v) ? v[k] : undefined;
    if (typeof v === 'string') return v;
  }
  return null;
}

function toExpiry(what: string, v: unknown, now: number): Expiry | undefined {
  let ms: number | undefined;
  if (typeof v === 'number' && Number.isFinite(v)) ms = v > 1e11 ? v : v * 1000; // ms or s since the epoch
  else if (typeof v === 'string' && !Number.isNaN(Date.parse(v))) ms = Date.parse(v);
  else if (v instanceof Date) ms = v.getTime();
  if (ms === undefined) return undefined;
  return { what, expires_at: new Date(ms).toISOString(), seconds_left: Math.round((ms - now) / 1000) };
}

/**
 * Read the facts out of the components' status() results. Names read (first match wins):
 *  broker:   connected | clients | devices_connected
 *  registry: active | devices
 *  journal:  pendingMessages | messages | backlog_messages, pendingBytes | bytes | backlog_bytes,
 *            oldestPendingAgeMs (ms) | oldest_unacked_age_s (s) — falling back to the uplink's backlog_* fields
 *  uplink:   state, last_ack_age_s (or last_ack_at as epoch ms), reconnects;
 *            token_expires_at | token.expires_at
 *  pki:      server_not_after | server_cert_not_after, ca_not_after
 * The drain rate is not a component fact: it comes from `rates` (the status page's sampler).
 * Device certificates come from the registry (identity), see deviceCertExpiries().
 */
export function summarize(components: Obj, ports: Record<string, number>, now = Date.now(), rates: { drain_per_s: number | null } = { drain_per_s: null }): StatusSummary {
  const broker = components.broker;
  const registry = components.registry;
  const journal = components.journal;
  const uplink = components.uplink;
  const pki = components.pki;

  const ageFrom = (o: unknown, agePaths: string[], atPaths: string[]): number | null => {
    const age = numAt(o, ...agePaths);
    if (age !== null) return age;
    const at = numAt(o, ...atPaths);
    return at !== null ? Math.max(0, Math.round((now - at) / 1000)) : null;
  };

  const expiries: Expiry[] = [];
  const add = (what: string, v: unknown): void => {
    const e = toExpiry(what, v, now);
    if (e) expiries.push(e);
  };
  if (isObj(pki)) {
    add('server certificate', pki.server_not_after ?? pki.server_cert_not_after);
    add('device CA', pki.ca_not_after);
  }
  if (isObj(uplink)) add('cloud token', uplink.token_expires_at ?? (isObj(uplink.token) ? uplink.token.expires_at : undefined));

  const oldestMs = numAt(journal, 'oldestPendingAgeMs');
  return {
    devices_connected: numAt(broker, 'devices_connected', 'connected', 'clients'),
    devices_registered: numAt(registry, 'active', 'devices'),
    listeners: ports,
    journal: isObj(journal)
      ? {
          messages: numAt(journal, 'pendingMessages', 'messages', 'backlog_messages') ?? numAt(uplink, 'backlog_messages'),
          bytes: numAt(journal, 'pendingBytes', 'bytes', 'backlog_bytes') ?? numAt(uplink, 'backlog_bytes'),
          oldest_unacked_age_s:
            oldestMs !== null ? Math.round(oldestMs / 1000) : (ageFrom(journal, ['oldest_unacked_age_s'], ['oldest_unacked_at']) ?? numAt(uplink, 'oldest_unacked_age_s')),
          drain_rate_msg_s: rates.drain_per_s,
        }
      : null,
    uplink: isObj(uplink)
      ? {
          state: strAt(uplink, 'state'),
          last_ack_age_s: ageFrom(uplink, ['last_ack_age_s'], ['last_ack_at']),
          reconnects: numAt(uplink, 'reconnects'),
        }
      : null,
    expiries,
  };
}

/** The systemd STATUS= line: "12 devices, uplink connected (ack 2s ago), backlog 0". */
export function statusLine(s: StatusSummary, ready: boolean): string {
  const parts: string[] = [];
  if (!ready) parts.push('starting');
  if (s.devices_connected !== null) parts.push(`${s.devices_connected} device${s.devices_connected === 1 ? '' : 's'}`);
  if (s.uplink) {
    const ack = s.uplink.last_ack_age_s !== null ? ` (ack ${s.uplink.last_ack_age_s}s ago)` : '';
    parts.push(`uplink ${s.uplink.state ?? 'unknown'}${ack}`);
  } else parts.push('uplink off');
  if (s.journal) {
    const oldest = s.journal.oldest_unacked_age_s ? `, oldest ${s.journal.oldest_unacked_age_s}s` : '';
    parts.push(`backlog ${s.journal.messages ?? '?'}${oldest}`);
  }
  if (parts.length === 0 || (parts.length === 1 && parts[0] === 'uplink off')) {
    parts.push(`listening on ${Object.entries(s.listeners).map(([k, p]) => `${k}:${p}`).join(' ') || 'nothing'}`);
  }
  return parts.join(', ');
}

/** What deviceCertExpiries() reads of the device registry. */
export interface DeviceCertSource {
  list(): { id: string; status: string; certificates: { serial: string; not_after: string; revoked: boolean }[] }[];
}

/** The latest valid (not revoked) certificate of every active device, soonest expiry first. */
export function deviceCertExpiries(registry: DeviceCertSource, now = Date.now()): (Expiry & { device_id: string; serial: string })[] {
  const out: (Expiry & { device_id: string; serial: string })[] = [];
  for (const d of registry.list()) {
    if (d.status !== 'active') continue;
    let best: { serial: string; ms: number } | undefined;
    for (const c of d.certificates) {
      const ms = Date.parse(c.not_after);
      if (c.revoked || Number.isNaN(ms)) continue;
      if (!best || ms > best.ms) best = { serial: c.serial, ms };
    }
    if (best) {
      out.push({ what: `device ${d.id} certificate`, device_id: d.id, serial: best.serial, expires_at: new Date(best.ms).toISOString(), seconds_left: Math.round((best.ms - now) / 1000) });
    }
  }
  return out.sort((a, b) => a.seconds_left - b.seconds_left);
}

let version: string | undefined;
export function packageVersion(): string {
  try {
    version ??= (JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string }).version;
  } catch {
    version = 'unknown';
  }
  return version;
}

export function daemonStatus(
  ctx: DaemonContext,
  lifecycle: Lifecycle,
  extra: { startedAt: number; watchdog?: WatchdogState; rates?: () => { drain_per_s: number | null } },
): DaemonStatus {
  const components = lifecycle.status();
  const ports = Object.fromEntries(ctx.ports);
  let deviceCerts: DaemonStatus['device_certificates'];
  try {
    const all = ctx.identity ? deviceCertExpiries(ctx.identity.registry) : undefined;
    if (all) deviceCerts = { count: all.length, expiring_within_30d: all.filter((e) => e.seconds_left < 30 * 86400).length, soonest: all.slice(0, 5) };
  } catch {
    // registry not started (yet): no device certificate facts
  }
  return {
    pid: process.pid,
    version: packageVersion(),
    uptime_s: Math.round((Date.now() - extra.startedAt) / 1000),
    config: ctx.configFile,
    state_dir: ctx.config.daemon.state_dir,
    ready: ctx.health.readiness(),
    ports,
    summary: summarize(components, ports, Date.now(), extra.rates?.()),
    ...(deviceCerts ? { device_certificates: deviceCerts } : {}),
    ...(extra.watchdog ? { watchdog: extra.watchdog } : {}),
    components,
  };
}
