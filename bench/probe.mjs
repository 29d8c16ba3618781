#!/usr/bin/env node
/**
 * Where the time goes at one load: the connector and the reference cloud on a
 * scratch copy of the bundled config (as `npm run bench` runs them), 10 mTLS
 * devices publishing open loop at --rate for --seconds, and for each process
 * user and system CPU per delivered message (/proc/PID/stat) and, with
 * --strace, `strace -c -f` syscall counts per message over the same window.
 * A profiling aid for the figures of `npm run bench`, not a goal of its own.
 *
 *   node bench/probe.mjs [--rate 500 | --closed 100] [--seconds 6] [--size 64] [--strace]
 *
 * --closed N: a closed loop instead (N messages per device published and not yet at the subscriber,
 * as the bench's closed-loop row); CPU is then per message delivered at whatever rate that reaches.
 *
 * Profiles: BENCH_DAEMON_NODE_ARGS="--cpu-prof --cpu-prof-dir=DIR" for the connector and
 * BENCH_CLOUD_NODE_ARGS (same form) for the reference cloud; both stop gracefully, so both write theirs.
 */
import fs from 'node:fs';
import { performance } from 'node:perf_hooks';
import os from 'node:os';
import path from 'node:path';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { connectDevices, endDevices, newCase, makeReceiver, openLoop, closedLoop, drain, stats } from './lib/load.mjs';
import { ConnectorStack } from './lib/stacks.mjs';
import { killAll } from './lib/procs.mjs';

const REPO = path.join(path.dirname(fileURLToPath(import.meta.url)), '..');
const args = process.argv.slice(2);
const opt = (f, d) => (args.includes(f) ? args[args.indexOf(f) + 1] : d);
const RATE = Number(opt('--rate', 500));
const SECONDS = Number(opt('--seconds', 6));
const SIZE = Number(opt('--size', 64));
const CLOSED = args.includes('--closed') ? Number(opt('--closed', 100)) : 0;
const STRACE = args.includes('--strace');
const TICK_US = 1e6 / 100; // USER_HZ

function cpu(pid) {
  const f = fs.readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
  const io = /^write_bytes: (\d+)$/m.exec(fs.readFileSync(`/proc/${pid}/io`, 'utf8'));
  return { user: Number(f[11]) * TICK_US, sys: Number(f[12]) * TICK_US, written: Number(io?.[1] ?? NaN) };
}
/** CPU ticks of the main thread (tid = pid) and of all other threads together (V8's platform workers, libuv's pool). */
function threads(pid) {
  let main = 0;
  let other = 0;
  for (const t of fs.readdirSync(`/proc/${pid}/task`)) {
    let f;
    try {
      f = fs.readFileSync(`/proc/${pid}/task/${t}/stat`, 'utf8').split(') ')[1].split(' ');
    } catch {
      continue; // a thread that ended meanwhile
    }
    const us = (Number(f[11]) + Number(f[12])) * TICK_US;
    if (Number(t) === pid) main += us;
    else other += us;
  }
  return { main, other };
}
function straceStart(pid, out) {
  const p = spawn('strace', ['-c', '-f', '-o', out, '-p', String(pid)], { stdio: 'ignore' });
  return p;
}

const root = fs.mkdtempSync(path.join(os.tmpdir(), 'ec-probe-'));
const conn = new ConnectorStack(REPO, path.join(root, 'connector'));
try {
  fs.mkdirSync(conn.root, { recursive: true });
  await conn.prepare();
  await conn.startCloud();
  await conn.startDaemon();
  await conn.uplinkConnected();
  const ids = Array.from({ length: 10 }, (_, i) => `probe-dev-${i}`);
  const files = await conn.addDevices(ids, 10);
  const devs = await connectDevices(conn.ports.mqtt_tls, files);
  const recv = makeReceiver();
  await conn.subscribe(recv);
  const warm = newCase(RATE * 2 + 100);
  recv.current = warm;
  await openLoop(warm, devs, { rate: RATE, size: SIZE, qos: 1, seconds: 1 });
  const c = newCase(CLOSED ? 100_000 * (SECONDS + 1) : RATE * (SECONDS + 1) + 100);
  recv.current = c;
  const pids = { connector: conn.daemon.pid, cloud: conn.cloud.pid };
  const st = STRACE ? Object.fromEntries(Object.entries(pids).map(([k, pid]) => [k, { p: straceStart(pid, path.join(root, `${k}.strace`)), file: path.join(root, `${k}.strace`) }])) : {};
  if (STRACE) await new Promise((r) => setTimeout(r, 300));
  const M = ['connector_uplink_messages_sent_total', 'connector_uplink_messages_acked_total', 'connector_uplink_batches_total', 'connector_uplink_reconnects_total', 'connector_journal_fsyncs_total', 'connector_journal_disk_reads_total', 'connector_journal_append_seconds_sum', 'connector_journal_append_seconds_count', 'connector_uplink_ack_latency_seconds_sum', 'connector_uplink_ack_latency_seconds_count'];
  const metricsNow = async () => Object.fromEntries(await Promise.all(M.map(async (m) => [m, (await conn.metric(m).catch(() => NaN)) ?? NaN])));
  const m0 = await metricsNow();
  const a = Object.fromEntries(Object.entries(pids).map(([k, pid]) => [k, { ...cpu(pid), th: threads(pid) }]));
  const r0 = c.received;
  const t0 = performance.now();
  if (CLOSED) await closedLoop(c, devs, { window: CLOSED, size: SIZE, qos: 1, seconds: SECONDS });
  else await openLoop(c, devs, { rate: RATE, size: SIZE, qos: 1, seconds: SECONDS });
  const b = Object.fromEntries(Object.entries(pids).map(([k, pid]) => [k, { ...cpu(pid), th: threads(pid) }]));
  const m1 = await metricsNow();
  const secs = (performance.now() - t0) / 1000;
  const n = c.received - r0;
  for (const s of Object.values(st)) s.p.kill('SIGINT');
  await Promise.all(Object.values(st).map((s) => new Promise((r) => s.p.once('exit', r))));
  console.log(`${CLOSED ? `closed loop ${CLOSED}/device` : `rate ${RATE} msg/s`}, ${SIZE} B: sent ${c.sent}, delivered in window ${n} (${(n / secs).toFixed(0)}/s)`);
  const d = (m) => m1[m] - m0[m];
  console.log(`in the window: ${M.filter((m) => m.endsWith('_total')).map((m) => `${m.replace(/^connector_/, '')} ${d(m)}`).join(', ')}`);
  const mean = (h) => ((1000 * d(`${h}_sum`)) / d(`${h}_count`)).toFixed(2);
  console.log(`inside the connector, means: append → durable ${mean('connector_journal_append_seconds')} ms, sent → cloud ACK ${mean('connector_uplink_ack_latency_seconds')} ms`);
  for (const k of Object.keys(pids)) {
    const u = (b[k].user - a[k].user) / n;
    const s = (b[k].sys - a[k].sys) / n;
    console.log(`${k}: user ${u.toFixed(1)} µs/msg, sys ${s.toFixed(1)} µs/msg, total ${(u + s).toFixed(1)}; write_bytes ${((b[k].written - a[k].written) / n).toFixed(0)} B/msg; main thread ${((b[k].th.main - a[k].th.main) / n).toFixed(1)} µs/msg, other threads ${((b[k].th.other - a[k].th.other) / n).toFixed(1)}`);
    if (STRACE) {
      const text = fs.readFileSync(st[k].file, 'utf8');
      const rows = text.split('\n').filter((l) => /^\s*\d/.test(l)).map((l) => l.trim().split(/\s+/)).filter((f) => f.length >= 5);
      rows.sort((x, y) => Number(y[3]) - Number(x[3]));
      console.log(`  syscalls per message: ${rows.slice(0, 14).map((f) => `${f[f.length - 1]} ${(Number(f[3]) / n).toFixed(2)}`).join(', ')}`);
    }
  }
  await drain(c, 10_000);
  // latency, and the longest pause in deliveries to the subscriber (a stall anywhere on the path shows here)
  const lat = stats(c, t0, t0 + secs * 1000);
  const times = Array.from(c.recvT.subarray(0, c.sent)).filter((x) => x >= t0 && x < t0 + secs * 1000).sort((x, y) => x - y);
  let gap = 0;
  let gapAt = 0;
  for (let i = 1; i < times.length; i++) if (times[i] - times[i - 1] > gap) [gap, gapAt] = [times[i] - times[i - 1], times[i - 1] - t0];
  console.log(`publish → subscriber p50 / p99 ${lat.p50.toFixed(1)} / ${lat.p99.toFixed(1)} ms; longest pause in deliveries ${gap.toFixed(1)} ms (at ${(gapAt / 1000).toFixed(2)} s)`);
  // where the latency is spent: publish → PUBACK (the edge's journal, its fsync included) against
  // PUBACK → subscriber (uplink, reference cloud, its fsync, delivery)
  const edge = [];
  const rest = [];
  for (let i = 0; i < c.sent; i++) {
    const s = c.sendT[i];
    if (s < t0 || s >= t0 + secs * 1000 || !c.ackAt[i]) continue;
    edge.push(c.ackAt[i] - s);
    if (c.recvT[i]) rest.push(c.recvT[i] - c.ackAt[i]);
  }
  const pc = (a, p) => (a.length ? a.sort((x, y) => x - y)[Math.min(a.length - 1, Math.floor((a.length * p) / 100))] : NaN);
  console.log(`publish → PUBACK p50 / p99 ${pc(edge, 50).toFixed(1)} / ${pc(edge, 99).toFixed(1)} ms; PUBACK → subscriber p50 / p99 ${pc(rest, 50).toFixed(1)} / ${pc(rest, 99).toFixed(1)} ms`);
  endDevices(devs);
} finally {
  // a graceful stop, so that a daemon started with --cpu-prof (BENCH_DAEMON_NODE_ARGS) writes its profile
  await conn.stopDaemon().catch(() => undefined);
  await conn.stopCloud('SIGTERM').catch(() => undefined);
  killAll();
  fs.rmSync(root, { recursive: true, force: true });
}
process.exit(0);
