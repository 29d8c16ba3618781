/**
 * Operations commands (talk to the running daemon over the admin socket):
 *   connector status [--json]   what the daemon is doing; exit 0 ready, 1 running but not ready,
 *                               69 not running (admin socket unreachable)
 *   connector ca rotate         new device CA; the previous one stays trusted (and issues the server certificate)
 *   connector ca retire         finish a rotation: only the new CA is trusted and issues the server certificate
 *   connector keys rotate       new JWT signing key; the previous one keeps verifying its tokens
 */
import { EXIT } from '../../core/errors.js';
import type { DaemonStatus, Expiry } from '../status.js';
import type { CaRetireResult, CaRotateResult } from '../rotation.js';
import { CONFIG_OPTION, adminCall, type Command } from './types.js';

function duration(s: number): string {
  const neg = s < 0;
  let v = Math.abs(Math.round(s));
  const parts: string[] = [];
  const d = Math.floor(v / 86400);
  v -= d * 86400;
  const h = Math.floor(v / 3600);
  v -= h * 3600;
  const m = Math.floor(v / 60);
  v -= m * 60;
  if (d) parts.push(`${d}d`);
  if (h && parts.length < 2) parts.push(`${h}h`);
  if (m && parts.length < 2 && !d) parts.push(`${m}m`);
  if (parts.length === 0) parts.push(`${v}s`);
  return neg ? `-${parts.join('')}` : parts.join('');
}

function bytes(n: number | null): string {
  if (n === null) return '?';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${i === 0 ? v : v.toFixed(1)} ${units[i]}`;
}

/** "15000 msg/s", "2.5 msg/s", "—" when unknown. */
function rate(n: number | null): string {
  if (n === null) return '—';
  return `${n >= 10 ? Math.round(n) : n.toFixed(1)} msg/s`;
}

function expiryLine(e: Expiry): string {
  const left = e.seconds_left <= 0 ? `EXPIRED ${duration(-e.seconds_left)} ago` : `in ${duration(e.seconds_left)}`;
  return `${e.what.padEnd(30)} ${e.expires_at}  (${left})`;
}

/** The human table of `connector status`. */
export function formatStatus(s: DaemonStatus): string {
  const sum = s.summary;
  const rows: [string, string][] = [];
  rows.push(['daemon', `edge-connector ${s.version}, pid ${s.pid}, up ${duration(s.uptime_s)}, ${s.ready.ready ? 'READY' : 'NOT READY'}`]);
  if (!s.ready.ready) for (const r of s.ready.reasons) rows.push(['', `not ready: ${r}`]);
  rows.push(['config', s.config]);
  rows.push(['state dir', s.state_dir]);
  const dev: string[] = [];
  dev.push(sum.devices_connected === null ? 'broker not running' : `${sum.devices_connected} connected`);
  if (sum.devices_registered !== null) dev.push(`${sum.devices_registered} registered`);
  rows.push(['devices', dev.join(', ')]);
  const listeners = Object.entries(sum.listeners);
  rows.push(['listeners', listeners.length ? listeners.map(([k, p]) => `${k}:${p}`).join('  ') : 'none']);
  if (sum.journal) {
    const oldest = sum.journal.oldest_unacked_age_s ? `oldest unacknowledged ${duration(sum.journal.oldest_unacked_age_s)} old` : 'nothing waiting';
    rows.push(['journal', `backlog ${sum.journal.messages ?? '?'} messages (${bytes(sum.journal.bytes)}), ${oldest}, draining ${rate(sum.journal.drain_rate_msg_s)}`]);
  } else rows.push(['journal', 'off (bridge.enabled: false)']);
  if (sum.uplink) {
    const ack = sum.uplink.last_ack_age_s !== null ? `last ack ${duration(sum.uplink.last_ack_age_s)} ago` : 'no ack yet';
    rows.push(['uplink', `${sum.uplink.state ?? 'unknown'}, ${ack}, ${sum.uplink.reconnects ?? 0} reconnects`]);
  } else rows.push(['uplink', 'off']);
  const expiries = [...sum.expiries];
  if (s.device_certificates) expiries.push(...s.device_certificates.soonest);
  expiries.forEach((e, i) => rows.push([i === 0 ? 'expiries' : '', expiryLine(e)]));
  if (s.device_certificates && s.device_certificates.count > s.device_certificates.soonest.length) {
    rows.push(['', `(${s.device_certificates.count} device certificates, ${s.device_certificates.expiring_within_30d} expiring within 30 days)`]);
  }
  if (s.watchdog?.enabled) rows.push(['watchdog', `ping every ${duration(s.watchdog.interval_ms / 1000)}, ${s.watchdog.pings} sent, ${s.watchdog.withheld} withheld`]);
  return rows.map(([k, v]) => `${k.padEnd(10)} ${v}`).join('\n');
}

export const opsCommands: Command[] = [
  {
    path: ['status'],
    summary: 'show what the running daemon is doing (--json for scripts)',
    usage:
      'connector status [-c FILE] [--json]\n\nDevices, listeners, journal backlog and drain rate (acknowledged by the cloud, msg/s over the last minute), uplink state and last ack, certificate and token expiries.\nExit 0 when ready, 1 when running but not ready, 69 when the daemon is not running.',
    options: { ...CONFIG_OPTION, json: { type: 'boolean' } },
    run: async ({ values }) => {
      const s = (await adminCall(values, 'status')) as DaemonStatus;
      process.stdout.write(values.json ? `${JSON.stringify(s, null, 2)}\n` : `${formatStatus(s)}\n`);
      return s.ready?.ready ? EXIT.OK : EXIT.FAILURE;
    },
  },
  {
    path: ['ca', 'rotate'],
    summary: 'start a new device CA; the previous one stays trusted until `connector ca retire`',
    usage:
      'connector ca rotate [-c FILE] [--json]\n\nNew device certificates are signed by the new CA at once; certificates from the previous CA keep\nworking, and the server certificate stays issued by the previous CA, until `connector ca retire`.\nMeanwhile devices get a ca.crt bundle of both CAs: give it to every device, then retire.',
    options: { ...CONFIG_OPTION, json: { type: 'boolean' } },
    run: async ({ values }) => {
      const r = (await adminCall(values, 'ca.rotate')) as CaRotateResult;
      if (values.json) {
        process.stdout.write(`${JSON.stringify(r, null, 2)}\n`);
        return EXIT.OK;
      }
      process.stdout.write(`new device CA: serial ${r.serial}, valid until ${r.not_after}\n`);
      process.stdout.write('trusted for device certificates now:\n');
      for (const t of r.trusted) process.stdout.write(`  ${t.serial}  until ${t.not_after}  ${t.subject}\n`);
      return EXIT.OK;
    },
  },
  {
    path: ['ca', 'retire'],
    summary: 'finish a CA rotation: the server certificate moves to the new CA, previous CAs are no longer trusted',
    usage:
      'connector ca retire [-c FILE] [--json]\n\nRun it once every device has the new CA (the ca.crt bundle handed out since `connector ca rotate`).\nThe server certificate is re-issued by the current CA; device certificates from the previous CAs\nstop working. Without an open rotation nothing changes.',
    options: { ...CONFIG_OPTION, json: { type: 'boolean' } },
    run: async ({ values }) => {
      const r = (await adminCall(values, 'ca.retire')) as CaRetireResult;
      if (values.json) {
        process.stdout.write(`${JSON.stringify(r, null, 2)}\n`);
        return EXIT.OK;
      }
      if (r.retired.length === 0) {
        process.stdout.write(`no CA rotation to retire: device CA ${r.serial} is the only one trusted\n`);
        return EXIT.OK;
      }
      process.stdout.write(`retired device CA${r.retired.length > 1 ? 's' : ''}: ${r.retired.join(', ')}\n`);
      process.stdout.write(`device CA ${r.serial} is now the only one trusted and issues the server certificate\n`);
      return EXIT.OK;
    },
  },
  {
    path: ['keys', 'rotate'],
    summary: 'new JWT signing key; tokens signed by the previous key stay valid until they expire',
    usage: 'connector keys rotate [-c FILE]\n\nPrints the new key id (kid). The previous key only verifies from now on and is dropped after its last token expired.',
    options: CONFIG_OPTION,
    run: async ({ values }) => {
      const r = (await adminCall(values, 'token.rotate-key')) as { kid: string };
      process.stdout.write(`new signing key: kid ${r.kid}\n`);
      return EXIT.OK;
    },
  },
];
