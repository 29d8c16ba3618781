#!/usr/bin/env node
/**
 * Broker path benchmark: what the connector's broker (mTLS, device auth, topic ACL, MQTT 3.1.1
 * conformance guard, redelivery table, metrics, bridge hand-off) costs per PUBLISH against bare
 * aedes behind the same TLS listener with no hooks at all. Run after `npm run build`:
 *
 *   node bench/broker-path.mjs                       # 3 rounds, alternating bare / connector
 *   BENCH_MSGS=100000 BENCH_DEVICES=10 BENCH_WINDOW=20 BENCH_PAYLOAD=64 BENCH_ROUNDS=3 node bench/broker-path.mjs
 *   node bench/broker-path.mjs --profile             # also a CPU profile of the connector's measured phase
 *
 * In-process server, out-of-process load: the broker runs in this process; the N mqtt.js
 * publishers (one mTLS connection and certificate each, QoS 1, a window of W messages in flight
 * per device) run in a child process. The figure is this process's CPU time (user + system, from
 * process.cpuUsage) over the measured phase divided by the messages acknowledged: µs/msg. The
 * connector's bridge sink resolves at once (a cloud that acknowledges immediately), so the
 * journal is not measured here (bench/journal.mjs does that).
 *
 * Every round is bounded: BENCH_MSGS messages, and at most BENCH_TIMEOUT_S seconds.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import tls from 'node:tls';
import { fork } from 'node:child_process';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const dist = path.join(here, '..', 'dist');
const role = process.argv[2] === '--load' ? 'load' : 'server';

const N = Number(process.env.BENCH_DEVICES ?? 10);
const MSGS = Number(process.env.BENCH_MSGS ?? 60_000);
const WINDOW = Number(process.env.BENCH_WINDOW ?? 20);
const PAYLOAD = Number(process.env.BENCH_PAYLOAD ?? 64);
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 3);
const TIMEOUT_S = Number(process.env.BENCH_TIMEOUT_S ?? 120);
const PROFILE = process.argv.includes('--profile');

if (role === 'load') await loadGenerator();
else await server();

// ───────────────────────────── load generator (child process) ─────────────────────────────

async function loadGenerator() {
  const { default: mqtt } = await import('mqtt');
  /** @type {{ port: number, ca: string, devices: {id: string, cert: string, key: string}[], msgs: number, window: number, payload: number }} */
  const job = await new Promise((resolve) => process.once('message', resolve));
  const clients = await Promise.all(
    job.devices.map(
      (d) =>
        new Promise((resolve, reject) => {
          const secureContext = tls.createSecureContext({ ca: job.ca, cert: d.cert, key: d.key });
          const c = mqtt.connect(`mqtts://127.0.0.1:${job.port}`, {
            protocolVersion: 4,
            clientId: d.id,
            clean: true,
            reconnectPeriod: 0,
            keepalive: 60,
            secureContext,
            servername: 'localhost',
            rejectUnauthorized: true,
          });
          c.once('connect', () => {
            c.stream.setNoDelay?.(true);
            resolve(c);
          });
          c.once('error', reject);
        }),
    ),
  );
  process.send({ ready: true });
  await new Promise((resolve) => process.once('message', resolve));
  const payload = Buffer.alloc(job.payload, 0x61);
  const perDevice = Math.ceil(job.msgs / clients.length);
  const t0 = process.hrtime.bigint();
  let acked = 0;
  await Promise.all(
    clients.map(async (c, i) => {
      const topic = `devices/${job.devices[i].id}/telemetry/t`;
      let sent = 0;
      await new Promise((resolve, reject) => {
        let inflight = 0;
        const pump = () => {
          while (inflight < job.window && sent < perDevice) {
            inflight++;
            sent++;
            c.publish(topic, payload, { qos: 1 }, (err) => {
              if (err) return reject(err);
              inflight--;
              acked++;
              if (sent >= perDevice && inflight === 0) resolve();
              else pump();
            });
          }
        };
        pump();
      });
    }),
  );
  const ms = Number(process.hrtime.bigint() - t0) / 1e6;
  process.send({ done: true, acked, ms });
  await Promise.all(clients.map((c) => c.endAsync(true).catch(() => {})));
  process.exit(0);
}

// ───────────────────────────── server (this process) ─────────────────────────────

async function server() {
  if (!fs.existsSync(path.join(dist, 'broker/broker.js'))) {
    console.error('dist/broker/broker.js is missing: run `npm run build` first');
    process.exit(1);
  }
  const { Broker, brokerSettings } = await import(path.join(dist, 'broker/broker.js'));
  const { DeviceRegistry } = await import(path.join(dist, 'identity/registry.js'));
  const { LocalPki, initPki } = await import(path.join(dist, 'identity/pki.js'));
  const { TokenService, initTokenKeys } = await import(path.join(dist, 'identity/tokens.js'));
  const { parseConfigText } = await import(path.join(dist, 'core/config/load.js'));
  const { silentLogger } = await import(path.join(dist, 'core/logger.js'));
  const { Aedes } = await import('aedes');
  const { Registry } = await import('prom-client');
  const { stringify } = await import('yaml');

  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bench-broker-'));
  process.on('exit', () => fs.rmSync(dir, { recursive: true, force: true }));
  const cfgText = stringify({
    daemon: { state_dir: dir, server_name: 'bench-gateway' },
    log: { level: 'silent' },
    broker: { listeners: { tls: { host: '127.0.0.1', port: 0, auth: 'cert' }, wss: { enabled: false }, local: { enabled: false } } },
    api: { enabled: false },
    bridge: { enabled: true, topics: ['devices/+/#'] },
    metrics: { host: '127.0.0.1', port: 0 },
  });
  const { config } = parseConfigText(cfgText, path.join(dir, 'connector.yaml'), { checkSecrets: false });
  await initPki(dir, config.identity.pki, config.daemon.server_name);
  await initTokenKeys(dir, config.identity.jwt.algorithm);
  const logger = silentLogger();
  const registry = new DeviceRegistry({ file: path.join(dir, 'registry.json'), logger });
  await registry.start();
  const pki = new LocalPki({ stateDir: dir, config: config.identity.pki, logger });
  await pki.start();
  const tokens = new TokenService({ stateDir: dir, config: config.identity.jwt, registry, logger });
  await tokens.start();
  const ca = pki.caCertificatePem();
  const devices = [];
  for (let i = 0; i < N; i++) {
    const id = `bench-dev-${i}`;
    await registry.create(id, {});
    const b = await pki.issueDeviceBundle(id, 'ec');
    await registry.addCertificate(id, { serial: b.serial, fingerprint256: b.fingerprint256, not_after: b.notAfter.toISOString() });
    devices.push({ id, cert: b.cert, key: b.key });
  }

  /** a cloud that acknowledges at once */
  let seq = 0;
  const sink = {
    append: (meta, payload) => Promise.resolve({ id: `m${++seq}`, size: payload.length, sha256: '' }),
    appendStream: () => Promise.reject(new Error('not used')),
  };

  const targets = {
    async bare() {
      const { cert, key } = pki.serverCredentials();
      const aedes = await Aedes.createBroker({ connectTimeout: 10_000 });
      const srv = tls.createServer({ cert, key, ca: pki.trustedDeviceCaPems(), requestCert: true, rejectUnauthorized: true, minVersion: 'TLSv1.2' }, (s) => {
        s.setNoDelay(true);
        aedes.handle(s);
      });
      await new Promise((r) => srv.listen(0, '127.0.0.1', r));
      return {
        port: srv.address().port,
        close: async () => {
          await new Promise((r) => aedes.close(r));
          await new Promise((r) => srv.close(r));
        },
      };
    },
    async connector() {
      const broker = new Broker({ config: config.broker, bridge: brokerSettings(config).bridge, logger, registry, pki, tokens, sink, metrics: new Registry() });
      await broker.start();
      return { port: broker.boundPorts().get('tls'), close: () => broker.close() };
    },
  };

  async function round(name, profile) {
    const target = await targets[name]();
    const child = fork(fileURLToPath(import.meta.url), ['--load'], { stdio: 'inherit' });
    const timer = setTimeout(() => {
      console.error(`round ${name}: no result within ${TIMEOUT_S} s`);
      child.kill('SIGKILL');
      process.exit(2);
    }, TIMEOUT_S * 1000);
    child.send({ port: target.port, ca, devices, msgs: MSGS, window: WINDOW, payload: PAYLOAD });
    await new Promise((resolve) => child.once('message', resolve));
    globalThis.gc?.();
    let session;
    if (profile) {
      const inspector = await import('node:inspector/promises');
      session = new inspector.Session();
      session.connect();
      await session.post('Profiler.enable');
      await session.post('Profiler.setSamplingInterval', { interval: 100 });
      await session.post('Profiler.start');
    }
    const cpu0 = process.cpuUsage();
    child.send({ go: true });
    const res = await new Promise((resolve) => child.once('message', resolve));
    const cpu = process.cpuUsage(cpu0);
    let prof;
    if (session) {
      prof = (await session.post('Profiler.stop')).profile;
      session.disconnect();
    }
    clearTimeout(timer);
    await new Promise((r) => child.once('exit', r));
    await target.close();
    const us = (cpu.user + cpu.system) / res.acked;
    return { name, us, rate: (res.acked / res.ms) * 1000, acked: res.acked, prof };
  }

  console.log(`broker path: ${N} mTLS devices, QoS 1, ${PAYLOAD} B, window ${WINDOW}/device, ${MSGS} msgs per round, ${ROUNDS} rounds (node ${process.version}, ${os.cpus().length} cpus)`);
  const results = { bare: [], connector: [] };
  for (let r = 0; r < ROUNDS; r++) {
    for (const name of r % 2 === 0 ? ['bare', 'connector'] : ['connector', 'bare']) {
      const x = await round(name, false);
      results[name].push(x);
      console.log(`  round ${r + 1} ${name.padEnd(9)} ${x.us.toFixed(1).padStart(7)} µs/msg  ${Math.round(x.rate).toString().padStart(6)} msg/s`);
    }
  }
  const median = (a) => [...a].sort((x, y) => x - y)[Math.floor(a.length / 2)];
  const bare = median(results.bare.map((x) => x.us));
  const conn = median(results.connector.map((x) => x.us));
  console.log(`median: bare aedes ${bare.toFixed(1)} µs/msg, connector ${conn.toFixed(1)} µs/msg, ratio ${(conn / bare).toFixed(3)}× (target ≤ 1.15×: ${conn / bare <= 1.15 ? 'PASS' : 'MISS'}); connector overhead ${(conn - bare).toFixed(1)} µs/msg`);

  if (PROFILE) {
    const x = await round('connector', true);
    const file = path.join(process.cwd(), `broker-path-${Date.now()}.cpuprofile`);
    fs.writeFileSync(file, JSON.stringify(x.prof));
    console.log(`profile (connector, ${x.us.toFixed(1)} µs/msg) written to ${file}; top self time:`);
    summarize(x.prof, 25);
  }
  await broker_cleanup();

  async function broker_cleanup() {
    await tokens.close();
    await pki.close();
    await registry.close();
  }
}

/** Print the functions with the most self time, and the share per source area. */
function summarize(prof, top) {
  const byId = new Map(prof.nodes.map((n) => [n.id, n]));
  const self = new Map();
  const dt = prof.timeDeltas;
  const total = dt.reduce((a, b) => a + b, 0);
  for (let i = 0; i < prof.samples.length; i++) {
    const n = byId.get(prof.samples[i]);
    const cf = n.callFrame;
    const key = `${cf.functionName || '(anonymous)'} ${cf.url.replace(/^.*node_modules\//, '').replace(/^file:\/\/.*\/dist\//, 'dist/')}:${cf.lineNumber + 1}`;
    self.set(key, (self.get(key) ?? 0) + (dt[i] ?? 0));
  }
  const area = new Map();
  for (const [k, v] of self) {
    const a = /dist\/broker\//.test(k) ? 'connector broker/' : /dist\/identity\//.test(k) ? 'connector identity/' : /^\S+ (aedes|mqtt-packet|aedes-[a-z-]+|bl|readable-stream|fastfall|fastparallel|fastseries|reusify|hyperid|qlobber|retimer)[/@]/.test(k) ? 'aedes + deps' : /prom-client/.test(k) ? 'prom-client' : /^\((garbage collector|program|idle)\)/.test(k) ? k.split(' ')[0] : /node:/.test(k) || / :0$/.test(k) ? 'node core / native' : 'other';
    area.set(a, (area.get(a) ?? 0) + v);
  }
  for (const [a, v] of [...area].sort((x, y) => y[1] - x[1])) console.log(`  ${((v / total) * 100).toFixed(1).padStart(5)} %  ${a}`);
  console.log('  --');
  for (const [k, v] of [...self].sort((x, y) => y[1] - x[1]).slice(0, top)) console.log(`  ${((v / total) * 100).toFixed(1).padStart(5)} %  ${k}`);
}
