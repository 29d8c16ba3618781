#!/usr/bin/env node
/**
 * The whole reference cloud as a process (issue 10's figure "reference cloud
 * CPU per message at 5 000 msg/s ≤ 60 µs"): `connector cloud -c FILE` (dist/)
 * in a child, one gateway connection over WSS/TLS speaking protocol v2 as the
 * connector does: one-chunk QoS 1 messages open loop at a fixed rate, the
 * messages due every 5 ms in one BATCH frame (entries pre-encoded with the real
 * codec, cumulative ACKs counted), one `/subscribe` subscriber receiving them. Cloud CPU from
 * /proc/PID/stat over the measured phase (after a warm-up), divided by the
 * messages acknowledged in it; the subscriber's count is checked too.
 *
 *   node bench/cloud-process.mjs [--rate 5000] [--seconds 5] [--size 64] [--old REV]
 *
 * With --old REV the same run also measures the cloud of that revision: a copy
 * of dist/ whose cloud/ modules are that revision's sources with types stripped
 * (everything else is identical).
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import https from 'node:https';
import { spawn, execFileSync } from 'node:child_process';
import { URLSearchParams, fileURLToPath, pathToFileURL } from 'node:url';
import { WebSocket } from 'ws';

const here = path.dirname(fileURLToPath(import.meta.url));
const repo = path.join(here, '..');
const dist = path.join(repo, 'dist');
const args = process.argv.slice(2);
const opt = (f, d) => (args.includes(f) ? args[args.indexOf(f) + 1] : d);
const RATE = Number(opt('--rate', 5000));
const SECONDS = Number(opt('--seconds', 5));
const SIZES = opt('--size', '64,4096').split(',').map(Number);
const OLD = opt('--old', undefined);
const { SUBPROTOCOL_V2, encodeFrameV2, decodeFrameV2, encodeBatchChunk, encodeBatch } = await import(pathToFileURL(path.join(dist, 'protocol/v2.js')).href);
const { sha256 } = await import(pathToFileURL(path.join(dist, 'protocol/codec.js')).href);
const root = fs.mkdtempSync(path.join(os.tmpdir(), 'bench-cloud-proc-'));
process.on('exit', () => fs.rmSync(root, { recursive: true, force: true }));
const TICK = 1 / 100; // /proc clock ticks → s (USER_HZ 100)

async function oldDist(rev) {
  const out = path.join(root, `dist-${rev}`);
  fs.cpSync(dist, out, { recursive: true });
  const ts = (await import('typescript')).default;
  const files = execFileSync('git', ['-C', repo, 'ls-tree', '-r', '--name-only', rev, 'cloud/'], { encoding: 'utf8' }).split('\n').filter((f) => f.endsWith('.ts'));
  for (const f of files) {
    const src = execFileSync('git', ['-C', repo, 'show', `${rev}:${f}`], { encoding: 'utf8' });
    const js = ts.transpileModule(src, { compilerOptions: { module: ts.ModuleKind.ESNext, target: ts.ScriptTarget.ES2022 } }).outputText;
    fs.mkdirSync(path.dirname(path.join(out, f)), { recursive: true });
    fs.writeFileSync(path.join(out, f.replace(/\.ts$/, '.js')), js);
  }
  // node_modules resolution from the copy
  fs.symlinkSync(path.join(repo, 'node_modules'), path.join(root, 'node_modules'));
  return out;
}

function cpuTicks(pid) {
  const f = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  const rest = f.slice(f.lastIndexOf(')') + 2).split(' ');
  return Number(rest[11]) + Number(rest[12]); // utime + stime
}

function startCloud(distDir, dir) {
  fs.mkdirSync(dir, { recursive: true });
  fs.writeFileSync(path.join(dir, 'client.secret'), 'bench-secret-0123456789abcdef\n', { mode: 0o600 });
  const cfg = path.join(dir, 'cloud.yaml');
  fs.writeFileSync(cfg, `listen: {host: 127.0.0.1, port: 0}\nstore_dir: ./store\nclients: [{id: gw, secret: "file:./client.secret"}]\nlog_level: info\n`);
  const env = { ...process.env };
  delete env.NODE_OPTIONS;
  const proc = spawn(process.execPath, [path.join(distDir, 'daemon/cli.js'), 'cloud', '-c', cfg], { cwd: dir, env, stdio: ['ignore', 'pipe', 'inherit'] });
  return new Promise((resolve, reject) => {
    let buf = '';
    proc.stdout.on('data', (d) => {
      buf += d;
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        try {
          const j = JSON.parse(line);
          if (j.msg === 'ready') resolve({ proc, port: j.ports.cloud, ca: fs.readFileSync(path.join(dir, 'store/tls/ca.crt'), 'utf8') });
        } catch {
          // not JSON
        }
      }
    });
    proc.once('exit', (c) => reject(new Error(`cloud exited ${c}`)));
  });
}

function token(c, scope) {
  const body = new URLSearchParams({ grant_type: 'client_credentials', client_id: 'gw', client_secret: 'bench-secret-0123456789abcdef', scope }).toString();
  return new Promise((resolve, reject) => {
    const req = https.request({ host: '127.0.0.1', port: c.port, path: '/oauth/token', method: 'POST', ca: c.ca, headers: { 'content-type': 'application/x-www-form-urlencoded' } }, (res) => {
      let s = '';
      res.on('data', (d) => (s += d));
      res.on('end', () => resolve(JSON.parse(s).access_token));
    });
    req.on('error', reject);
    req.end(body);
  });
}

async function run(distDir, label, size) {
  const c = await startCloud(distDir, path.join(root, `${label}-${size}`));
  try {
    const sub = new WebSocket(`wss://127.0.0.1:${c.port}/subscribe?filter=%23`, { ca: c.ca, headers: { authorization: `Bearer ${await token(c, 'subscribe')}` }, perMessageDeflate: false });
    let received = 0;
    sub.on('message', () => received++);
    await new Promise((r, j) => (sub.once('open', r), sub.once('error', j)));
    const ws = new WebSocket(`wss://127.0.0.1:${c.port}/ingest`, [SUBPROTOCOL_V2], { ca: c.ca, headers: { authorization: `Bearer ${await token(c, 'ingest')}` }, perMessageDeflate: false });
    await new Promise((r, j) => (ws.once('open', r), ws.once('error', j)));
    let acked = 0;
    let welcome;
    const welcomed = new Promise((r) => (welcome = r));
    ws.on('message', (d) => {
      const f = decodeFrameV2(d);
      if (f.type === 'WELCOME') welcome();
      else if (f.type === 'ACK') acked = Math.max(acked, f.upto ?? 0); // positions 1..total, cumulative
      else if (f.type === 'PING') ws.send(encodeFrameV2({ type: 'PONG', t: f.t, t_reply: Date.now() }));
    });
    ws.send(encodeFrameV2({ type: 'HELLO', version: 2, gateway_id: 'gw-bench' }));
    await welcomed;
    const total = Math.round(RATE * (SECONDS + 1));
    const payload = Buffer.alloc(size, 5);
    const digest = sha256(payload);
    // pre-encode every BATCH entry: the client's own CPU stays out of the cloud's figure
    const entries = Array.from({ length: total }, (_, i) => {
      const dev = `dev${i % 10}`;
      const meta = { device_id: dev, topic: `devices/${dev}/telemetry`, qos: 1, received_at: Date.now() };
      return encodeBatchChunk({ id: `b-${i}`, seq: 0, offset: 0, total: size, meta, payload_sha256: digest, pos: i + 1, data: payload });
    });
    let sent = 0;
    const t0 = Date.now();
    let m0;
    await new Promise((resolve) => {
      const tick = () => {
        const due = Math.min(total, Math.floor(((Date.now() - t0) / 1000) * RATE));
        // what came due since the last tick in one BATCH (the connector sends one per group commit)
        while (sent < due) {
          const n = Math.min(due - sent, 4096);
          ws.send(encodeBatch(entries.slice(sent, sent + n)));
          sent += n;
        }
        if (!m0 && Date.now() - t0 >= 1000) m0 = { cpu: cpuTicks(c.proc.pid), acked, t: Date.now() }; // after 1 s of warm-up
        if (sent < total) setTimeout(tick, 5);
        else resolve();
      };
      tick();
    });
    const end = Date.now() + 30_000;
    while (acked < total && Date.now() < end) await new Promise((r) => setTimeout(r, 20));
    const m1 = { cpu: cpuTicks(c.proc.pid), acked, t: Date.now() };
    while (received < acked && Date.now() < end) await new Promise((r) => setTimeout(r, 20));
    const n = m1.acked - m0.acked;
    const r = { label, size, msgs: n, rate: n / ((m1.t - m0.t) / 1000), cpuUs: ((m1.cpu - m0.cpu) * TICK * 1e6) / n, acked, total, received };
    ws.close();
    sub.close();
    return r;
  } finally {
    c.proc.kill('SIGTERM');
    await new Promise((r) => c.proc.once('exit', r));
  }
}

const targets = [['new', dist]];
if (OLD) targets.unshift([`old ${OLD}`, await oldDist(OLD)]);
console.log(`reference cloud process at ${RATE} msg/s for ${SECONDS + 1} s (1 s warm-up), one gateway connection + one subscriber, ${os.cpus().length} CPU, node ${process.version}`);
console.log('| size | cloud | acked msg/s (measured phase) | cloud CPU µs/msg | acked / sent | subscriber received |');
console.log('|---:|---|---:|---:|---:|---:|');
for (const size of SIZES) {
  for (const [label, d] of targets) {
    const r = await run(d, label.split(' ')[0], size);
    console.log(`| ${size} B | ${label} | ${r.rate.toFixed(0)} | ${r.cpuUs.toFixed(1)} | ${r.acked} / ${r.total} | ${r.received} |`);
  }
}
