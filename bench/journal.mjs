#!/usr/bin/env node
/**
 * Journal benchmark. Run after `npm run build`:
 *
 *   node --expose-gc bench/journal.mjs            # full run (≈ 3–5 min)
 *   node --expose-gc bench/journal.mjs --quick    # shorter phases, 200 k instead of 1 M records for replay
 *   BENCH_STREAM_MB=1024 BENCH_REPLAY_N=1000000 node --expose-gc bench/journal.mjs
 *
 * Prints ratios against baselines measured in the same run on the same disk
 * (absolute figures drift on shared machines):
 *  1. durable small appends: raw `write + fdatasync` loop (one fsync per message: the
 *     ceiling without group commit) vs the journal with fsync=always / batch / never,
 *     64 concurrent writers (many devices) and 1 writer;
 *  2. bytes written to disk per message (`write_bytes` of /proc/self/io: pages the process
 *     dirtied, i.e. what wears flash) at open-loop rates of 500 / 2 000 / 5 000 msg/s of
 *     64 B messages from 10 writers, each record acknowledged ~5 ms after it became durable
 *     (as the uplink does), for several `fsync_max_delay_ms`; goal ≤ 512 B at 5 000 msg/s;
 *  3. replay of 1 M queued 64 B messages in a fresh child process: time to ready and heap
 *     (V8 heap + array buffers) per queued message, after a clean stop (segment indexes),
 *     after a crash (the open segment has no index: scanned) and with every index removed
 *     (full scan); goals ≤ 2 s and ≤ 64 B per message;
 *  4. a large payload through appendStream vs raw sequential write + fdatasync + SHA-256.
 */
import { performance } from 'node:perf_hooks';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { fileURLToPath, pathToFileURL } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const dist = path.join(here, '..', 'dist');
if (!fs.existsSync(path.join(dist, 'bridge/journal.js'))) {
  console.error('dist/bridge/journal.js is missing: run `npm run build` first');
  process.exit(1);
}
const QUICK = process.argv.includes('--quick');
const { Journal } = await import(pathToFileURL(path.join(dist, 'bridge/journal.js')).href);
const { silentLogger } = await import(pathToFileURL(path.join(dist, 'core/logger.js')).href);
const { Registry } = await import('prom-client');

const MiB = 1024 * 1024;
const STREAM_MB = Number(process.env.BENCH_STREAM_MB ?? (QUICK ? 128 : 512));
const REPLAY_N = Number(process.env.BENCH_REPLAY_N ?? (QUICK ? 200_000 : 1_000_000));
const PHASE_S = QUICK ? 2 : 4;
const root = fs.mkdtempSync(path.join(process.env.BENCH_DIR ?? os.tmpdir(), 'bench-journal-'));
process.on('exit', () => fs.rmSync(root, { recursive: true, force: true }));
let dirN = 0;
const freshDir = () => path.join(root, `j${dirN++}`);

const meta = (i) => ({ deviceId: `dev${i % 10}`, topic: `devices/dev${i % 10}/telemetry`, qos: 1, receivedAt: Date.now(), packetId: (i % 65535) + 1 });
const PAYLOAD = Buffer.alloc(64, 0x61);

function config(over = {}) {
  return { max_bytes: 64 * 1024 * MiB, overflow: 'reject', ttl_s: 0, max_message_bytes: 4 * 1024 * MiB, segment_bytes: 64 * MiB, fsync: 'batch', fsync_max_delay_ms: 2, memory_cache_bytes: 8 * MiB, max_uploads_per_device: 4, ...over };
}

async function metricSum(registry, name, labels = {}) {
  const v = await registry.getSingleMetric(name).get();
  return v.values.filter((x) => Object.entries(labels).every(([k, val]) => x.labels[k] === val)).reduce((a, x) => a + x.value, 0);
}
const fsyncCount = (registry) => metricSum(registry, 'connector_journal_fsyncs_total', { kind: 'segment' });

function pct(sorted, p) {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

function writeBytes() {
  const m = /write_bytes: (\d+)/.exec(fs.readFileSync('/proc/self/io', 'utf8'));
  return m ? Number(m[1]) : NaN;
}

/** Baseline: one message = one write + one fdatasync, sequentially. */
function rawLoop(n) {
  const file = path.join(root, `raw-${dirN++}.log`);
  const fd = fs.openSync(file, 'a');
  const rec = Buffer.alloc(PAYLOAD.length + 110, 0x61); // about the size of a journal record
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < n; i++) {
    fs.writeSync(fd, rec);
    fs.fdatasyncSync(fd);
  }
  const s = Number(process.hrtime.bigint() - t0) / 1e9;
  fs.closeSync(fd);
  fs.rmSync(file);
  return { n, rate: n / s, fsyncs: n };
}

async function journalRun(policy, n, writers, delayMs = 2) {
  const registry = new Registry();
  const j = new Journal({ dir: freshDir(), config: config({ fsync: policy, fsync_max_delay_ms: delayMs }), logger: silentLogger(), metrics: registry });
  await j.start();
  const lat = [];
  let next = 0;
  const t0 = process.hrtime.bigint();
  await Promise.all(
    Array.from({ length: writers }, async () => {
      for (;;) {
        const i = next++;
        if (i >= n) return;
        const a = process.hrtime.bigint();
        await j.append(meta(i), PAYLOAD);
        lat.push(Number(process.hrtime.bigint() - a) / 1e6);
      }
    }),
  );
  const s = Number(process.hrtime.bigint() - t0) / 1e9;
  const fsyncs = await fsyncCount(registry);
  await j.close();
  lat.sort((a, b) => a - b);
  return { n, rate: n / s, fsyncs, p50: pct(lat, 50), p99: pct(lat, 99) };
}

function median(xs) {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
}

function fmt(n, d = 0) {
  return n.toLocaleString('en-US', { maximumFractionDigits: d, minimumFractionDigits: d });
}

console.log(`# journal benchmark — node ${process.version}, ${os.cpus().length} CPUs, dir ${root}${QUICK ? ' (--quick)' : ''}`);
console.log('## 1. durable 64-byte appends (3 rounds alternating, medians)\n');

const cases = [
  ['raw write+fdatasync loop (baseline, 1 writer)', () => rawLoop(QUICK ? 500 : 1500)],
  ['journal fsync=always, 64 writers', () => journalRun('always', QUICK ? 500 : 1500, 64)],
  ['journal fsync=batch (2 ms), 64 writers', () => journalRun('batch', QUICK ? 10000 : 30000, 64)],
  ['journal fsync=batch (0 ms), 64 writers', () => journalRun('batch', QUICK ? 10000 : 30000, 64, 0)],
  ['journal fsync=never, 64 writers', () => journalRun('never', QUICK ? 10000 : 30000, 64)],
  ['journal fsync=always, 1 writer', () => journalRun('always', QUICK ? 300 : 1000, 1)],
  ['journal fsync=batch (2 ms), 1 writer', () => journalRun('batch', QUICK ? 300 : 1000, 1)],
];
const results = new Map(cases.map(([name]) => [name, []]));
for (let round = 0; round < 3; round++) {
  for (const [name, fn] of cases) results.get(name).push(await fn());
}
const base = median(results.get(cases[0][0]).map((r) => r.rate));
console.log('| case | appends/s | × baseline | msgs per fsync | p50 ms | p99 ms |');
console.log('|---|---:|---:|---:|---:|---:|');
for (const [name] of cases) {
  const rs = results.get(name);
  const rate = median(rs.map((r) => r.rate));
  const perFsync = median(rs.map((r) => (r.fsyncs ? r.n / r.fsyncs : Infinity)));
  const p50 = rs[0].p50 === undefined ? '' : fmt(median(rs.map((r) => r.p50)), 2);
  const p99 = rs[0].p99 === undefined ? '' : fmt(median(rs.map((r) => r.p99)), 2);
  console.log(`| ${name} | ${fmt(rate)} | ${fmt(rate / base, 1)} | ${perFsync === Infinity ? 'no fsync' : fmt(perFsync, 1)} | ${p50} | ${p99} |`);
}

// ── 2. bytes written per message at fixed rates ──
async function openLoop(rate, delayMs, seconds) {
  const registry = new Registry();
  const j = new Journal({ dir: freshDir(), config: config({ fsync_max_delay_ms: delayMs }), logger: silentLogger(), metrics: registry });
  await j.start();
  // the uplink's part: acknowledge what became durable, in batches every 5 ms
  let toAck = [];
  j.on('append', (rec) => toAck.push(rec.id));
  const acker = setInterval(() => {
    const ids = toAck;
    toAck = [];
    for (const id of ids) void j.ack(id);
  }, 5);
  const lat = [];
  let sent = 0;
  let done = 0;
  const wb0 = writeBytes();
  const cpu0 = process.cpuUsage();
  const t0 = performance.now();
  const total = Math.round(rate * seconds);
  await new Promise((resolve) => {
    const tick = () => {
      const due = Math.min(total, Math.floor(((performance.now() - t0) / 1000) * rate));
      while (sent < due) {
        const i = sent++;
        const a = performance.now();
        j.append(meta(i), PAYLOAD).then(() => {
          lat.push(performance.now() - a);
          if (++done === total) resolve();
        });
      }
      if (sent < total) setTimeout(tick, 1);
    };
    tick();
  });
  const elapsed = (performance.now() - t0) / 1000;
  await new Promise((r) => setTimeout(r, 100)); // let the last acks flush
  clearInterval(acker);
  for (const id of toAck) void j.ack(id);
  const fsyncs = await fsyncCount(registry);
  const ackFsyncs = await metricSum(registry, 'connector_journal_fsyncs_total', { kind: 'ack' });
  await j.close();
  const wb = writeBytes() - wb0;
  const cpu = process.cpuUsage(cpu0);
  lat.sort((a, b) => a - b);
  return { rate: total / elapsed, bytesPerMsg: wb / total, perFsync: total / Math.max(1, fsyncs), ackFsyncs, cpuUs: (cpu.user + cpu.system) / total, p50: pct(lat, 50), p99: pct(lat, 99) };
}

console.log(`\n## 2. bytes written to disk per 64 B message (write_bytes of /proc/self/io), open loop, ${PHASE_S} s each, acks included\n`);
console.log('| rate msg/s | fsync_max_delay_ms | achieved msg/s | write B/msg | goal | msgs per fsync | ack fsyncs | process CPU µs/msg (incl. load generator) | append→durable p50 / p99 ms |');
console.log('|---:|---:|---:|---:|---|---:|---:|---:|---:|');
for (const [rate, delay] of [[500, 2], [2000, 2], [5000, 2], [5000, 0], [5000, 5], [5000, 10]]) {
  const r = await openLoop(rate, delay, PHASE_S);
  const goal = rate === 5000 && delay === 2 ? (r.bytesPerMsg <= 512 ? 'PASS ≤ 512' : 'MISS > 512') : '';
  console.log(`| ${fmt(rate)} | ${delay} | ${fmt(r.rate)} | ${fmt(r.bytesPerMsg)} | ${goal} | ${fmt(r.perFsync, 1)} | ${r.ackFsyncs} | ${fmt(r.cpuUs, 1)} | ${fmt(r.p50, 2)} / ${fmt(r.p99, 2)} |`);
}

// ── 3. replay of a large backlog ──
console.log(`\n## 3. replay of ${fmt(REPLAY_N)} queued 64 B messages (fresh child process per case)\n`);
const replayDir = freshDir();
{
  const j = new Journal({ dir: replayDir, config: config({ fsync: 'never' }), logger: silentLogger(), metrics: new Registry() });
  await j.start();
  const B = 2000;
  for (let i = 0; i < REPLAY_N; i += B) {
    const ps = [];
    for (let k = i; k < Math.min(REPLAY_N, i + B); k++) ps.push(j.append(meta(k), PAYLOAD));
    await Promise.all(ps);
  }
  await j.close();
}
const segs = fs.readdirSync(replayDir).filter((f) => f.endsWith('.log')).sort();
const segBytes = segs.reduce((a, f) => a + fs.statSync(path.join(replayDir, f)).size, 0);
const childSrc = `
const { Journal } = await import(${JSON.stringify(pathToFileURL(path.join(dist, 'bridge/journal.js')).href)});
const { silentLogger } = await import(${JSON.stringify(pathToFileURL(path.join(dist, 'core/logger.js')).href)});
const mem = () => { globalThis.gc(); const m = process.memoryUsage(); return m.heapUsed + m.arrayBuffers; };
const j = new Journal({ dir: process.argv[1], config: ${JSON.stringify(config())}, logger: silentLogger() });
const m0 = mem();
const t0 = performance.now();
await j.start();
const ms = performance.now() - t0;
const m1 = mem();
const n = j.stats().pendingMessages;
// drain speed from disk (records not in memory after a restart)
const t1 = performance.now();
let last = -1, read = 0;
for (;;) { const recs = j.pending(last, 4096); if (!recs.length || read >= 200000) break; read += recs.length; last = recs[recs.length - 1].seq; }
const readMs = performance.now() - t1;
console.log(JSON.stringify({ ms, bytes: m1 - m0, n, readRate: read / (readMs / 1000) }));
await j.close();
`;
function replayCase(prepare) {
  const dir = `${replayDir}-case${dirN++}`;
  fs.cpSync(replayDir, dir, { recursive: true });
  prepare(dir);
  const r = spawnSync(process.execPath, ['--expose-gc', '--input-type=module', '-e', childSrc, dir], { encoding: 'utf8', maxBuffer: 16 * MiB });
  fs.rmSync(dir, { recursive: true, force: true });
  if (r.status !== 0) throw new Error(`replay child failed: ${r.stderr}`);
  return JSON.parse(r.stdout.trim().split('\n').pop());
}
console.log(`${segs.length} segments, ${fmt(segBytes / MiB)} MiB on disk (${fmt(segBytes / REPLAY_N)} B per message)\n`);
console.log('| case | ready in ms | goal ≤ 2 000 ms | heap + array buffers per queued message | goal ≤ 64 B | pending() from disk, msg/s |');
console.log('|---|---:|---|---:|---|---:|');
for (const [name, prepare] of [
  ['clean stop (every segment indexed)', () => {}],
  ['after a crash (open segment scanned)', (dir) => {
    const last = fs.readdirSync(dir).filter((f) => f.endsWith('.idx')).sort().pop();
    if (last) fs.rmSync(path.join(dir, last));
  }],
  ['no index at all (full scan, e.g. journal of an older version)', (dir) => {
    for (const f of fs.readdirSync(dir)) if (f.endsWith('.idx')) fs.rmSync(path.join(dir, f));
  }],
]) {
  const r = replayCase(prepare);
  const per = r.bytes / r.n;
  console.log(`| ${name} | ${fmt(r.ms)} | ${r.ms <= 2000 ? 'PASS' : 'MISS'} | ${fmt(per, 1)} B | ${per <= 64 ? 'PASS' : 'MISS'} | ${fmt(r.readRate)} |`);
}
fs.rmSync(replayDir, { recursive: true, force: true });

// ── 2. large payload ──
console.log(`\n## 4. one ${STREAM_MB} MiB payload in 64 KiB chunks\n`);
const total = STREAM_MB * MiB;
const chunk = Buffer.alloc(64 * 1024, 0x5a);
const expected = (() => {
  const h = createHash('sha256');
  for (let i = 0; i < total / chunk.length; i++) h.update(chunk);
  return h.digest();
})();

function rssSampler() {
  const start = process.memoryUsage().rss;
  let peak = start;
  const timer = setInterval(() => {
    peak = Math.max(peak, process.memoryUsage().rss);
  }, 20);
  return {
    stop() {
      clearInterval(timer);
      peak = Math.max(peak, process.memoryUsage().rss);
      return { start, peak, delta: peak - start };
    },
  };
}

async function rawStream() {
  const file = path.join(root, 'raw-stream.bin');
  const fh = await fs.promises.open(file, 'w');
  const h = createHash('sha256');
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < total / chunk.length; i++) {
    h.update(chunk);
    await fh.write(chunk);
  }
  await fh.datasync();
  h.digest();
  const s = Number(process.hrtime.bigint() - t0) / 1e9;
  await fh.close();
  fs.rmSync(file);
  return total / MiB / s;
}

async function* body() {
  for (let i = 0; i < total / chunk.length; i++) yield chunk;
}

const rawMBs = await rawStream();
const j = new Journal({ dir: freshDir(), config: config(), logger: silentLogger(), metrics: new Registry() });
await j.start();
globalThis.gc?.();
let sampler = rssSampler();
let t0 = process.hrtime.bigint();
const res = await j.appendStream(meta(0), body(), { maxBytes: total, expectedSha256: expected });
const inS = Number(process.hrtime.bigint() - t0) / 1e9;
const inMem = sampler.stop();
const rec = j.get(res.id);
sampler = rssSampler();
t0 = process.hrtime.bigint();
const h = createHash('sha256');
for await (const c of j.createPayloadStream(rec)) h.update(c);
const outS = Number(process.hrtime.bigint() - t0) / 1e9;
const outMem = sampler.stop();
const ok = h.digest('hex') === res.sha256;
await j.ack(res.id);
await j.close();

console.log('| what | MB/s | × baseline | RSS growth (peak − start) |');
console.log('|---|---:|---:|---:|');
console.log(`| raw write + fdatasync + SHA-256 (baseline) | ${fmt(rawMBs)} | 1.0 | |`);
console.log(`| appendStream (SHA-256 checked, blob + fsync) | ${fmt(total / MiB / inS)} | ${fmt(total / MiB / inS / rawMBs, 2)} | ${fmt(inMem.delta / MiB, 1)} MiB |`);
console.log(`| createPayloadStream + SHA-256 (uplink read) | ${fmt(total / MiB / outS)} | | ${fmt(outMem.delta / MiB, 1)} MiB |`);
console.log(`\nread-back digest ${ok ? 'matches' : 'DOES NOT MATCH'}; RSS at start ${fmt(inMem.start / MiB)} MiB`);
