#!/usr/bin/env node
/**
 * Uplink benchmark: device → connector → cloud throughput, against raw `ws`
 * over TLS measured in the same run (the ratio is the figure to compare across
 * machines), and the connector's memory while a large upload streams through.
 *
 *   npm run build && node bench/uplink.mjs [--size-mib 1024] [--msgs 20000] [--msg-bytes 4096] [--clients 10] [--raw-mib 512]
 *
 * Phases (real processes on loopback, like production):
 *  1. raw: one `ws` client → a `ws` server in another process over TLS, 64 KiB binary
 *     frames (the BASELINES.md "ws over TLS" figure);
 *  2. upload: one HTTP upload of --size-mib (streamed, Content-Digest, Content-Length — the
 *     connector forwards it upstream while it arrives; --chunked sends it without a length,
 *     which the connector stores whole and then sends) to POST /api/publish/ID;
 *     reports upload MB/s (journal durable), uplink MB/s (journal → cloud stored, from the
 *     cloud's index), end-to-end MB/s, and the connector's RSS sampled every 50 ms;
 *  3. mqtt: --clients mqtt.js devices publish --msgs QoS 1 messages of --msg-bytes in total;
 *     reports msg/s and MB/s until the cloud stored the last one (skipped if the broker is not wired).
 * With both raw and upload, raw is measured again once the connector and cloud have stopped: the
 * upload's ratio is then against the mean of the two, so a machine that got busier or quieter
 * during the upload (shared CI hosts) moves the baseline with it; both raw figures are printed.
 */
import { spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, writeFileSync, rmSync } from 'node:fs';
import https from 'node:https';
import http from 'node:http';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { performance } from 'node:perf_hooks';
import { stringify } from 'yaml';

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const CLI = path.join(REPO, 'dist/daemon/cli.js');
const { values: args } = parseArgs({
  options: {
    'size-mib': { type: 'string', default: '1024' },
    msgs: { type: 'string', default: '20000' },
    'msg-bytes': { type: 'string', default: '4096' },
    clients: { type: 'string', default: '10' },
    'raw-mib': { type: 'string', default: '512' },
    'chunk-kib': { type: 'string', default: '256' },
    chunked: { type: 'boolean', default: false },
    cloud: { type: 'string', default: 'both' },
    phases: { type: 'string', default: 'raw,upload,mqtt,drain' },
    'drain-msgs': { type: 'string', default: '20000' },
    'drain-bytes': { type: 'string', default: '64' },
  },
});
const PHASES = new Set(args.phases.split(',').map((s) => s.trim()));
const DRAIN_MSGS = Number(args['drain-msgs']);
const DRAIN_BYTES = Number(args['drain-bytes']);
const SIZE = Number(args['size-mib']) * 1024 * 1024;
const MSGS = Number(args.msgs);
const MSG_BYTES = Number(args['msg-bytes']);
const CLIENTS = Number(args.clients);
const RAW = Number(args['raw-mib']) * 1024 * 1024;
const MB = 1e6;

const dir = mkdtempSync(path.join(tmpdir(), 'ec-bench-uplink-'));
const children = new Set();
process.on('exit', () => {
  for (const c of children) c.kill('SIGKILL');
  rmSync(dir, { recursive: true, force: true });
});
process.on('SIGINT', () => process.exit(130));

function run(argv, opts = {}) {
  const p = spawn(process.execPath, argv, { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'], ...opts });
  children.add(p);
  p.on('exit', () => children.delete(p));
  p.logs = [];
  let partial = '';
  p.stdout.setEncoding('utf8').on('data', (s) => {
    partial += s;
    let nl;
    while ((nl = partial.indexOf('\n')) >= 0) {
      const line = partial.slice(0, nl);
      partial = partial.slice(nl + 1);
      try {
        p.logs.push(JSON.parse(line));
      } catch {
        p.logs.push({ raw: line });
      }
    }
  });
  p.stderr.setEncoding('utf8').on('data', (s) => process.stderr.write(s));
  return p;
}

async function waitFor(what, cond, ms = 60_000, every = 20) {
  const end = Date.now() + ms;
  for (;;) {
    const v = await cond();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, every));
  }
}

const readyOf = (p, what) => waitFor(`${what} ready`, () => p.logs.find((l) => l.msg === 'ready'), 60_000);

function rssMiB(pid) {
  try {
    const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) / 1024 : NaN;
  } catch {
    return NaN;
  }
}

/** CPU time (user + system) of a process so far, in µs (from /proc/PID/stat, clock ticks of 10 ms). */
function cpuUs(pid) {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(f[11]) + Number(f[12])) * 10_000;
  } catch {
    return NaN;
  }
}

/** A free TCP port on 127.0.0.1 (to start a cloud after the connector that points at it). */
function freePort() {
  return new Promise((resolve, reject) => {
    const s = http.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

// ─── 1. raw ws over TLS ──────────────────────────────────────────────────────

let certs;
async function selfSigned() {
  if (certs) return certs;
  const cert = path.join(dir, 'bench.crt');
  const key = path.join(dir, 'bench.key');
  await new Promise((resolve, reject) => {
    const p = spawn('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', key, '-out', cert, '-days', '1', '-subj', '/CN=localhost', '-addext', 'subjectAltName=IP:127.0.0.1'], { stdio: 'ignore' });
    p.on('exit', (c) => (c === 0 ? resolve() : reject(new Error('openssl failed'))));
  });
  return (certs = { cert, key });
}

async function rawWs() {
  const server = `
    import https from 'node:https';
import http from 'node:http';
    import { WebSocketServer } from 'ws';
    import { readFileSync } from 'node:fs';
    const [cert, key] = [readFileSync(process.argv[2]), readFileSync(process.argv[3])];
    const s = https.createServer({ cert, key });
    const wss = new WebSocketServer({ server: s, maxPayload: 1 << 26, perMessageDeflate: false });
    wss.on('connection', (ws) => { let n = 0; ws.on('message', (d) => { n += d.length; if (n >= ${RAW}) ws.send('done'); }); });
    s.listen(0, '127.0.0.1', () => console.log(JSON.stringify({ msg: 'ready', port: s.address().port })));`;
  const { cert, key } = await selfSigned();
  const file = path.join(REPO, 'bench', `.raw-ws-server-${process.pid}.mjs`);
  writeFileSync(file, server);
  const p = run([file, cert, key], { cwd: REPO });
  try {
    const ready = await waitFor('raw server', () => p.logs.find((l) => l.msg === 'ready'));
    const { WebSocket } = await import('ws');
    const ws = new WebSocket(`wss://127.0.0.1:${ready.port}/`, { ca: readFileSync(cert), perMessageDeflate: false });
    await new Promise((r, j) => (ws.once('open', r), ws.once('error', j)));
    ws._socket.setNoDelay(true);
    const frame = randomBytes(64 * 1024);
    const t0 = performance.now();
    const done = new Promise((r) => ws.once('message', r));
    let sent = 0;
    while (sent < RAW) {
      ws.send(frame);
      sent += frame.length;
      if (ws.bufferedAmount > 4 * 1024 * 1024) await new Promise((r) => setImmediate(r));
      while (ws.bufferedAmount > 8 * 1024 * 1024) await new Promise((r) => setTimeout(r, 1));
    }
    await done;
    const s = (performance.now() - t0) / 1000;
    ws.close();
    return RAW / MB / s;
  } finally {
    p.kill('SIGKILL');
    rmSync(file, { force: true });
  }
}

// ─── 2 + 3. connector + reference cloud ─────────────────────────────────────

async function startPair(kind, opts = {}) {
  const sub = mkdtempSync(path.join(dir, `${kind}-`));
  const secret = path.join(sub, 'client.secret');
  writeFileSync(secret, randomBytes(24).toString('base64url'), { mode: 0o600 });
  let caFile;
  let startCloud;
  const fixedPort = opts.deferCloud ? await freePort() : 0;
  if (kind === 'reference') {
    const cloudCfg = path.join(sub, 'cloud.yaml');
    writeFileSync(cloudCfg, stringify({ listen: { host: '127.0.0.1', port: fixedPort }, store_dir: path.join(sub, 'cloud-data'), clients: [{ id: 'edge-connector', secret: `file:${secret}` }], log_level: 'info' }), { mode: 0o600 });
    // BENCH_CLOUD_NODE_ARGS: node options for the reference cloud (e.g. --cpu-prof --cpu-prof-dir=DIR)
    const cloudArgs = process.env.BENCH_CLOUD_NODE_ARGS ? process.env.BENCH_CLOUD_NODE_ARGS.split(' ').filter(Boolean) : [];
    startCloud = () => run([...cloudArgs, CLI, 'cloud', '-c', cloudCfg], { cwd: sub });
    caFile = path.join(sub, 'cloud-data/tls/ca.crt');
  } else {
    const { cert, key } = await selfSigned();
    startCloud = () => run([path.join(REPO, 'bench/null-cloud.mjs'), cert, key, String(fixedPort)], { cwd: sub });
    caFile = cert;
  }
  const pair = { kind, sub, cfg: path.join(sub, 'connector.yaml'), startCloud };
  let cport = fixedPort;
  if (!opts.deferCloud) {
    pair.cloud = startCloud();
    cport = (await readyOf(pair.cloud, `${kind} cloud`)).ports.cloud;
  }
  const cfg = pair.cfg;
  writeFileSync(
    cfg,
    stringify({
      daemon: { state_dir: path.join(sub, 'state'), server_name: 'bench-gw' },
      log: { level: 'info' },
      broker: { listeners: { tls: { host: '127.0.0.1', port: 0 }, wss: { host: '127.0.0.1', port: 0 } }, limits: { max_connections: 1000 } },
      api: { host: '127.0.0.1', port: 0, max_upload_bytes: Math.max(SIZE, 1024) * 2 },
      metrics: { host: '127.0.0.1', port: 0 },
      bridge: {
        enabled: true,
        journal: { max_bytes: Math.max(4 * SIZE, 1 << 30), max_message_bytes: Math.max(SIZE, 1024) * 2 },
        uplink: { url: `wss://127.0.0.1:${cport}/ingest`, ca_file: caFile, chunk_size: Number(args['chunk-kib']) * 1024, ...(opts.deferCloud ? { reconnect_min_ms: 50, reconnect_max_ms: 100 } : {}) },
        token: { url: `https://127.0.0.1:${cport}/oauth/token`, client_secret: `file:${secret}` },
      },
    }),
    { mode: 0o600 },
  );
  // BENCH_NODE_ARGS="--cpu-prof --cpu-prof-dir=/tmp/prof" profiles the connector (written when it stops)
  const nodeArgs = process.env.BENCH_NODE_ARGS ? process.env.BENCH_NODE_ARGS.split(' ').filter(Boolean) : [];
  pair.conn = run([...nodeArgs, CLI, 'start', '-c', cfg], { cwd: sub });
  pair.ports = (await readyOf(pair.conn, 'connector')).ports;
  const add = await cli(['device', 'add', 'bench-dev', '--out', path.join(sub, 'dev'), '-c', cfg]);
  if (add.code !== 0) throw new Error(`device add: ${add.stderr}`);
  return pair;
}

async function acked(pair) {
  const text = await new Promise((resolve, reject) => {
    http
      .get(`http://127.0.0.1:${pair.ports.metrics}/metrics`, (r) => {
        let b = '';
        r.setEncoding('utf8').on('data', (x) => (b += x));
        r.on('end', () => resolve(b));
      })
      .on('error', reject);
  });
  const m = /^connector_uplink_messages_acked_total ([0-9.e+]+)$/m.exec(text);
  return m ? Number(m[1]) : 0;
}

async function stop(pair) {
  // SIGTERM both (a --cpu-prof profile is written only on a clean exit), SIGKILL after 10 s
  const procs = [pair.conn, pair.cloud].filter(Boolean);
  for (const p of procs) p.kill('SIGTERM');
  const t = setTimeout(() => procs.forEach((p) => p.kill('SIGKILL')), 10_000);
  await Promise.all(procs.map((p) => new Promise((r) => (p.exitCode !== null || p.signalCode !== null ? r() : p.once('exit', r)))));
  clearTimeout(t);
}

function cli(argv) {
  return new Promise((resolve) => {
    const p = spawn(process.execPath, [CLI, ...argv], { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    p.stdout.setEncoding('utf8').on('data', (s) => (stdout += s));
    p.stderr.setEncoding('utf8').on('data', (s) => (stderr += s));
    p.on('exit', (code) => resolve({ code, stdout, stderr }));
  });
}

async function uploadBench(pair) {
  const dev = path.join(pair.sub, 'dev');
  const token = readFileSync(path.join(dev, 'bench-dev.token'), 'utf8').trim();
  const ca = readFileSync(path.join(dev, 'ca.crt'));
  // the body: a pseudo-random stream generated on the fly (no 1 GiB file, no 1 GiB buffer)
  const block = randomBytes(1024 * 1024);
  const digest = createHash('sha256');
  for (let off = 0; off < SIZE; off += block.length) digest.update(block.subarray(0, Math.min(block.length, SIZE - off)));
  const sha = digest.digest();
  const pid = pair.conn.pid;
  const rss = [];
  const baseRss = rssMiB(pid);
  const sampler = setInterval(() => rss.push(rssMiB(pid)), 50);
  const before = await acked(pair);
  const cloudPid = pair.cloud?.pid;
  const cpu = () => ({ conn: cpuUs(pid), cloud: cloudPid ? cpuUs(cloudPid) : NaN, self: process.cpuUsage() });
  const c0 = cpu();
  const t0 = performance.now();
  const res = await new Promise((resolve, reject) => {
    const req = https.request(`https://127.0.0.1:${pair.ports.api}/api/publish/bench-dev`, {
      method: 'POST',
      ca,
      headers: {
        authorization: `Bearer ${token}`,
        'content-digest': `sha-256=:${sha.toString('base64')}:`,
        'content-type': 'application/octet-stream',
        ...(args.chunked ? {} : { 'content-length': String(SIZE) }),
      },
    }, (r) => {
      let body = '';
      r.setEncoding('utf8').on('data', (s) => (body += s));
      r.on('end', () => resolve({ status: r.statusCode, body }));
    });
    req.on('error', reject);
    let off = 0;
    const pump = () => {
      while (off < SIZE) {
        const b = block.subarray(0, Math.min(block.length, SIZE - off));
        off += b.length;
        if (!req.write(b)) return void req.once('drain', pump);
      }
      req.end();
    };
    pump();
  });
  const t1 = performance.now();
  const c1 = cpu();
  if (res.status !== 202) throw new Error(`upload answered ${res.status}: ${res.body}`);
  if (JSON.parse(res.body).sha256 !== sha.toString('hex')) throw new Error('digest mismatch at the connector');
  await waitFor('the cloud to acknowledge the upload', async () => (await acked(pair)) > before, 30 * 60_000, 20);
  const t2 = performance.now();
  const c2 = cpu();
  clearInterval(sampler);
  const ok = rss.filter((x) => !Number.isNaN(x));
  return {
    uploadMBs: SIZE / MB / ((t1 - t0) / 1000),
    uplinkMBs: SIZE / MB / ((t2 - t1) / 1000),
    e2eMBs: SIZE / MB / ((t2 - t0) / 1000),
    seconds: (t2 - t0) / 1000,
    rssBase: baseRss,
    rssMax: Math.max(...ok),
    rssP50: ok.sort((a, b) => a - b)[Math.floor(ok.length / 2)],
    // CPU ms per MiB: steadier than MB/s on a busy machine (the bench's own /metrics polling every 20 ms included)
    cpuMsPerMiB: {
      connUpload: (c1.conn - c0.conn) / 1000 / (SIZE / 2 ** 20),
      connUplink: (c2.conn - c1.conn) / 1000 / (SIZE / 2 ** 20),
      cloud: (c2.cloud - c0.cloud) / 1000 / (SIZE / 2 ** 20),
      client: (c1.self.user + c1.self.system - c0.self.user - c0.self.system) / 1000 / (SIZE / 2 ** 20),
    },
  };
}

async function mqttBench(pair, msgs = MSGS, msgBytes = MSG_BYTES, onPublished = async () => undefined) {
  if (!pair.ports.mqtt_tls) return undefined;
  const mqtt = (await import('mqtt')).default;
  const dev = path.join(pair.sub, 'dev');
  const before = await acked(pair);
  const ids = [];
  for (let i = 0; i < CLIENTS; i++) ids.push(i === 0 ? 'bench-dev' : `bench-dev-${i}`);
  const files = [];
  for (const id of ids) {
    if (id !== 'bench-dev') {
      const r = await cli(['device', 'add', id, '--out', path.join(pair.sub, id), '-c', pair.cfg]);
      if (r.code !== 0) throw new Error(r.stderr);
    }
    const d = id === 'bench-dev' ? dev : path.join(pair.sub, id);
    files.push({ id, ca: readFileSync(path.join(d, 'ca.crt')), cert: readFileSync(path.join(d, `${id}.crt`)), key: readFileSync(path.join(d, `${id}.key`)) });
  }
  const clients = await Promise.all(
    files.map(
      (f) =>
        new Promise((resolve, reject) => {
          const c = mqtt.connect(`mqtts://127.0.0.1:${pair.ports.mqtt_tls}`, { clientId: f.id, ca: f.ca, cert: f.cert, key: f.key, protocolVersion: 4, reconnectPeriod: 0 });
          c.once('connect', () => resolve(c));
          c.once('error', reject);
        }),
    ),
  );
  const payload = randomBytes(msgBytes);
  const per = Math.ceil(msgs / CLIENTS);
  const cpu0 = { conn: cpuUs(pair.conn.pid), cloud: pair.cloud ? cpuUs(pair.cloud.pid) : NaN };
  const t0 = performance.now();
  await Promise.all(
    clients.map(async (c, k) => {
      const inflight = new Set();
      for (let i = 0; i < per; i++) {
        const p = c.publishAsync(`devices/${files[k].id}/bench`, payload, { qos: 1 });
        inflight.add(p);
        p.finally(() => inflight.delete(p));
        if (inflight.size >= 64) await Promise.race(inflight);
      }
      await Promise.all(inflight);
    }),
  );
  const t1 = performance.now();
  const total = per * CLIENTS;
  const drain = await onPublished();
  await waitFor('the cloud to acknowledge every message', async () => (await acked(pair)) - before >= total, 10 * 60_000, 20);
  const t2 = performance.now();
  const cpu1 = { conn: cpuUs(pair.conn.pid), cloud: pair.cloud ? cpuUs(pair.cloud.pid) : NaN };
  for (const c of clients) c.end(true);
  const r = {
    msgs: total,
    pubackMsgS: total / ((t1 - t0) / 1000),
    e2eMsgS: total / ((t2 - t0) / 1000),
    e2eMBs: (total * msgBytes) / MB / ((t2 - t0) / 1000),
    connUsPerMsg: (cpu1.conn - cpu0.conn) / total,
    cloudUsPerMsg: (cpu1.cloud - cpu0.cloud) / total,
  };
  if (drain) {
    r.drainMsgS = total / ((t2 - drain.t) / 1000);
    r.drainConnUsPerMsg = (cpu1.conn - drain.conn) / total;
    r.drainCloudUsPerMsg = (cpu1.cloud - drain.cloud) / total;
  }
  return r;
}

/**
 * Journal → cloud alone: devices publish --drain-msgs QoS 1 messages while the cloud is down (each PUBACK
 * means journaled), then the cloud starts; reports how fast the backlog reaches the cloud's ACK and the
 * connector's CPU per message over that drain (journal read-back, framing, TLS, ACK handling only).
 */
async function drainBench(kind) {
  const pair = await startPair(kind, { deferCloud: true });
  try {
    const m = await mqttBench(pair, DRAIN_MSGS, DRAIN_BYTES, async () => {
      pair.cloud = pair.startCloud();
      await readyOf(pair.cloud, `${kind} cloud`);
      return { t: performance.now(), conn: cpuUs(pair.conn.pid), cloud: cpuUs(pair.cloud.pid) };
    });
    return m;
  } finally {
    await stop(pair);
  }
}

const raw = PHASES.has('raw') ? await rawWs() : NaN;
if (PHASES.has('raw')) console.log(`raw ws over TLS (64 KiB frames, ${RAW / 1024 / 1024} MiB, one connection): ${raw.toFixed(0)} MB/s`);
const kinds = args.cloud === 'both' ? ['null', 'reference'] : [args.cloud];
/** End-to-end MB/s of the last upload, for the ratio against raw measured again after it. */
let upE2e;
for (const kind of kinds) {
  const what = kind === 'null' ? 'null cloud (acks at once: the connector alone)' : 'reference cloud (fsyncs every message before its ACK)';
  console.log(`\n== connector + ${what}`);
  if (PHASES.has('upload') || PHASES.has('mqtt')) {
    const pair = await startPair(kind);
    try {
      if (PHASES.has('upload')) {
        const up = await uploadBench(pair);
        upE2e = up.e2eMBs;
        console.log(
          `upload ${SIZE / 1024 / 1024} MiB: ${up.seconds.toFixed(1)} s end to end; HTTP upload → journal (durable) ${up.uploadMBs.toFixed(0)} MB/s, ` +
            `journal → cloud ACK ${up.uplinkMBs.toFixed(0)} MB/s (${((up.uplinkMBs / raw) * 100).toFixed(0)} % of raw ws/TLS), end to end ${up.e2eMBs.toFixed(0)} MB/s`,
        );
        // with Content-Length the connector sends the upload while it arrives: what was already upstream at the 202
        const took = pair.conn.logs.find((l) => l.msg === 'uplink: an upload sent while it arrived is committed: sending the rest');
        const streamedMiB = took ? took.streamedBytes / 2 ** 20 : 0;
        console.log(
          `upload streamed upstream before the 202: ${streamedMiB.toFixed(0)} of ${SIZE / 2 ** 20} MiB; after the 202 until the cloud ACK ${(SIZE / MB / up.uplinkMBs).toFixed(2)} s; ` +
            `end to end ${(up.e2eMBs / raw).toFixed(2)}× raw ws/TLS`,
        );
        const c = up.cpuMsPerMiB;
        console.log(`CPU ms per MiB: connector ${(c.connUpload + c.connUplink).toFixed(2)} (while the body arrived ${c.connUpload.toFixed(2)}, after the 202 until the cloud ACK ${c.connUplink.toFixed(2)}), cloud ${c.cloud.toFixed(2)}, HTTP client ${c.client.toFixed(2)}`);
        console.log(`connector RSS during the upload: ${up.rssBase.toFixed(0)} MiB before, median ${up.rssP50.toFixed(0)} MiB, max ${up.rssMax.toFixed(0)} MiB`);
      }
      const m = PHASES.has('mqtt') ? await mqttBench(pair) : undefined;
      if (m) {
        console.log(
          `mqtt QoS 1 closed loop, ${CLIENTS} devices, ${m.msgs} × ${MSG_BYTES} B: PUBACKed ${m.pubackMsgS.toFixed(0)} msg/s, acknowledged by the cloud ${m.e2eMsgS.toFixed(0)} msg/s (${m.e2eMBs.toFixed(1)} MB/s); ` +
            `CPU µs/msg: connector ${m.connUsPerMsg.toFixed(0)}, cloud ${m.cloudUsPerMsg.toFixed(0)}`,
        );
      } else if (PHASES.has('mqtt')) console.log('mqtt: skipped (the daemon reports no mqtt_tls port: broker not wired)');
    } finally {
      await stop(pair);
    }
    if (upE2e !== undefined && PHASES.has('raw')) {
      const after = await rawWs();
      const mean = (raw + after) / 2;
      console.log(`raw ws over TLS after the upload: ${after.toFixed(0)} MB/s; end to end ${(upE2e / mean).toFixed(2)}× the mean of before and after (${mean.toFixed(0)} MB/s)`);
      upE2e = undefined;
    }
  }
  if (PHASES.has('drain')) {
    const d = await drainBench(kind);
    if (d) {
      console.log(
        `backlog drain (journal → cloud ACK), ${d.msgs} × ${DRAIN_BYTES} B journaled while the cloud was down: ${d.drainMsgS.toFixed(0)} msg/s; ` +
          `CPU µs/msg during the drain: connector ${d.drainConnUsPerMsg.toFixed(1)}, cloud ${d.drainCloudUsPerMsg.toFixed(1)}`,
      );
    }
  }
}
process.exit(0);
