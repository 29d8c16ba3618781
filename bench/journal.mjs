#!/usr/bin/env node
/**
 * Journal benchmark. Run after `npm run build`:
 *
 *   node bench/journal.mjs            # full run (streams 1 GiB)
 *   BENCH_STREAM_MB=256 node bench/journal.mjs
 *
 * Prints ratios against baselines measured in the same run on the same disk
 * (absolute figures drift on shared machines):
 *  1. durable small appends: raw `write + fdatasync` loop (one fsync per message: the
 *     ceiling without group commit) vs the journal with fsync=always / batch / never,
 *     64 concurrent writers (many devices) and 1 writer;
 *  2. a large payload through appendStream (64 KiB chunks, SHA-256 checked) vs raw
 *     sequential write + fdatasync + SHA-256 of the same bytes, with the RSS growth;
 *     then reading it back with createPayloadStream (what the uplink does).
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createHash } from 'node:crypto';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const dist = path.join(here, '..', 'dist');
if (!fs.existsSync(path.join(dist, 'bridge/journal.js'))) {
  console.error('dist/bridge/journal.js is missing: run `npm run build` first');
  process.exit(1);
}
const { Journal } = await import(path.join(dist, 'bridge/journal.js'));
const { silentLogger } = await import(path.join(dist, 'daemon/logger.js'));
const { Registry } = await import('prom-client');

const MiB = 1024 * 1024;
const STREAM_MB = Number(process.env.BENCH_STREAM_MB ?? 1024);
const root = fs.mkdtempSync(path.join(os.tmpdir(), 'bench-journal-'));
process.on('exit', () => fs.rmSync(root, { recursive: true, force: true }));
let dirN = 0;
const freshDir = () => path.join(root, `j${dirN++}`);

const meta = (i) => ({ deviceId: `dev${i % 64}`, topic: `devices/dev${i % 64}/telemetry`, qos: 1, receivedAt: Date.now() });
const PAYLOAD = Buffer.alloc(256, 0x61);

function config(over = {}) {
  return { max_bytes: 8 * 1024 * MiB, overflow: 'reject', ttl_s: 0, max_message_bytes: 4 * 1024 * MiB, segment_bytes: 64 * MiB, fsync: 'batch', fsync_max_delay_ms: 2, ...over };
}

async function fsyncCount(registry) {
  const v = await registry.getSingleMetric('connector_journal_fsyncs_total').get();
  return v.values.filter((x) => x.labels.kind === 'segment').reduce((a, x) => a + x.value, 0);
}

function pct(sorted, p) {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

/** Baseline: one message = one write + one fdatasync, sequentially. */
function rawLoop(n) {
  const file = path.join(root, `raw-${dirN++}.log`);
  const fd = fs.openSync(file, 'a');
  const rec = Buffer.alloc(PAYLOAD.length + 120, 0x61); // about the size of a journal record
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

console.log(`# journal benchmark — node ${process.version}, ${os.cpus().length} CPUs, dir ${root}`);
console.log('## 1. durable 256-byte appends (3 rounds alternating, medians)\n');

const cases = [
  ['raw write+fdatasync loop (baseline, 1 writer)', () => rawLoop(1500)],
  ['journal fsync=always, 64 writers', () => journalRun('always', 1500, 64)],
  ['journal fsync=batch (2 ms), 64 writers', () => journalRun('batch', 30000, 64)],
  ['journal fsync=batch (0 ms), 64 writers', () => journalRun('batch', 30000, 64, 0)],
  ['journal fsync=never, 64 writers', () => journalRun('never', 30000, 64)],
  ['journal fsync=always, 1 writer', () => journalRun('always', 1000, 1)],
  ['journal fsync=batch (2 ms), 1 writer', () => journalRun('batch', 1000, 1)],
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
// ── 2. large payload ──
console.log(`\n## 2. one ${STREAM_MB} MiB payload in 64 KiB chunks\n`);
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
