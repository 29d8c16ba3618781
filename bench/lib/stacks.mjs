/**
 * The systems under test, as real processes on 127.0.0.1 with free ports:
 *  - the connector: `connector start` on a scratch copy of the bundled
 *    connector.yaml (state in a temp dir, fsync as bundled) + `connector cloud`
 *    (the reference cloud) + a `/subscribe` subscriber;
 *  - the rival: mosquitto edge (mTLS) bridged over TLS (QoS 1, cleansession
 *    false) to a cloud mosquitto, subscriber on the cloud side;
 *  - bare aedes (bench/bare-aedes.mjs) and the null cloud (bench/null-cloud.mjs).
 */
import https from 'node:https';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { chmodSync, mkdirSync, readFileSync, writeFileSync, existsSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { spawn } from 'node:child_process';
import { performance } from 'node:perf_hooks';
import { URLSearchParams } from 'node:url';
import { parseDocument, stringify } from 'yaml';
import { WebSocket } from 'ws';
import mqtt from 'mqtt';
import { spawnChild, stopChild, logLine, freePort, waitFor, track } from './procs.mjs';

function httpGet(url) {
  return new Promise((resolve, reject) => {
    http
      .get(url, (r) => {
        let b = '';
        r.setEncoding('utf8').on('data', (x) => (b += x));
        r.on('end', () => resolve(b));
      })
      .on('error', reject);
  });
}

/** Run `connector ARGS` to completion (bounded). */
export function cli(REPO, argv, cwd, ms = 60_000) {
  return new Promise((resolve) => {
    const p = track(spawn(process.execPath, [path.join(REPO, 'dist/daemon/cli.js'), ...argv], { cwd, stdio: ['ignore', 'pipe', 'pipe'] }));
    let stdout = '';
    let stderr = '';
    const t = setTimeout(() => p.kill('SIGKILL'), ms);
    p.stdout.setEncoding('utf8').on('data', (s) => (stdout += s));
    p.stderr.setEncoding('utf8').on('data', (s) => (stderr += s));
    p.on('exit', (code) => {
      clearTimeout(t);
      resolve({ code, stdout, stderr });
    });
  });
}

export class ConnectorStack {
  constructor(REPO, root) {
    this.REPO = REPO;
    this.CLI = path.join(REPO, 'dist/daemon/cli.js');
    this.root = root;
    this.cfg = path.join(root, 'connector.yaml');
    this.cloudCfg = path.join(root, 'cloud.yaml');
    this.stateDir = path.join(root, 'state');
    this.caFile = path.join(root, 'cloud-data/tls/ca.crt');
  }

  /** Write cloud.yaml and the scratch connector.yaml (a copy of the bundled one, loopback + free ports). */
  async prepare() {
    mkdirSync(this.stateDir, { recursive: true, mode: 0o700 });
    chmodSync(this.stateDir, 0o700);
    writeFileSync(path.join(this.stateDir, 'cloud-client.secret'), randomBytes(24).toString('base64url'), { mode: 0o600 });
    this.cloudPort = await freePort();
    writeFileSync(
      this.cloudCfg,
      stringify({
        listen: { host: '127.0.0.1', port: this.cloudPort },
        store_dir: './cloud-data',
        clients: [{ id: 'edge-connector', secret: 'file:./state/cloud-client.secret' }],
        token_ttl_s: 3600,
      }),
      { mode: 0o600 },
    );
    this.writeDaemonConfig(`wss://127.0.0.1:${this.cloudPort}/ingest`, `https://127.0.0.1:${this.cloudPort}/oauth/token`);
  }

  writeDaemonConfig(uplinkUrl, tokenUrl) {
    const doc = parseDocument(readFileSync(path.join(this.REPO, 'connector.yaml'), 'utf8'));
    for (const l of ['tls', 'wss']) {
      doc.setIn(['broker', 'listeners', l, 'host'], '127.0.0.1');
      doc.setIn(['broker', 'listeners', l, 'port'], 0);
    }
    doc.setIn(['api', 'host'], '127.0.0.1');
    doc.setIn(['api', 'port'], 0);
    doc.setIn(['metrics', 'port'], 0);
    doc.setIn(['bridge', 'uplink', 'url'], uplinkUrl);
    doc.setIn(['bridge', 'token', 'url'], tokenUrl);
    writeFileSync(this.cfg, doc.toString(), { mode: 0o600 });
  }

  /** BENCH_CLOUD_NODE_ARGS="--cpu-prof --cpu-prof-dir=/tmp/prof" profiles the reference cloud (written when it stops gracefully). */
  async startCloud(nodeArgs = (process.env.BENCH_CLOUD_NODE_ARGS ?? '').split(' ').filter(Boolean)) {
    this.cloud = spawnChild(process.execPath, [...nodeArgs, this.CLI, 'cloud', '-c', this.cloudCfg], { cwd: this.root });
    await logLine(this.cloud, 'ready', 60_000);
    return this.cloud;
  }

  async stopCloud(signal = 'SIGKILL') {
    await stopChild(this.cloud, 10_000, signal);
  }

  /**
   * Start the daemon; resolves with the time from spawn to its `ready` log line (ms).
   * BENCH_DAEMON_NODE_ARGS="--cpu-prof --cpu-prof-dir=/tmp/prof" profiles it (written when it stops).
   */
  async startDaemon(nodeArgs = (process.env.BENCH_DAEMON_NODE_ARGS ?? '').split(' ').filter(Boolean)) {
    const t0 = performance.now();
    this.daemon = spawnChild(process.execPath, [...nodeArgs, this.CLI, 'start', '-c', this.cfg], { cwd: this.root });
    const ready = await logLine(this.daemon, 'ready', 180_000);
    this.ports = ready.ports;
    return ready.at - t0;
  }

  /** Wait for the daemon's `uplink connected` log line (after its latest start). */
  async uplinkConnected(ms = 30_000) {
    return logLine(this.daemon, 'uplink connected', ms);
  }

  async stopDaemon() {
    await stopChild(this.daemon, 30_000);
  }

  async metrics() {
    return httpGet(`http://127.0.0.1:${this.ports.metrics}/metrics`);
  }

  async metric(name) {
    const text = await this.metrics();
    const m = new RegExp(`^${name}(?:\\{[^}]*\\})? ([0-9.e+-]+)$`, 'm').exec(text);
    return m ? Number(m[1]) : NaN;
  }

  /** Register devices with `connector device add` (what a user does); returns {id, ca, cert, key} per device. */
  async addDevices(ids, parallel = 4) {
    const out = path.join(this.root, 'devices');
    const add = async (id) => {
      const r = await cli(this.REPO, ['device', 'add', id, '--out', out, '-c', this.cfg], this.root);
      if (r.code !== 0) throw new Error(`connector device add ${id}: ${r.stderr || r.stdout}`);
    };
    for (let i = 0; i < ids.length; i += parallel) await Promise.all(ids.slice(i, i + parallel).map(add));
    return this.deviceFiles(ids);
  }

  /** The credentials `connector device add` wrote for `ids`. */
  deviceFiles(ids) {
    const out = path.join(this.root, 'devices');
    const ca = readFileSync(path.join(out, 'ca.crt'));
    return ids.map((id) => ({ id, ca, cert: readFileSync(path.join(out, `${id}.crt`)), key: readFileSync(path.join(out, `${id}.key`)) }));
  }

  async token(scope) {
    const secret = readFileSync(path.join(this.stateDir, 'cloud-client.secret'), 'utf8').trim();
    const form = new URLSearchParams({ grant_type: 'client_credentials', client_id: 'edge-connector', client_secret: secret, scope }).toString();
    const body = await new Promise((resolve, reject) => {
      const req = https.request(
        `https://127.0.0.1:${this.cloudPort}/oauth/token`,
        { method: 'POST', ca: readFileSync(this.caFile), headers: { 'content-type': 'application/x-www-form-urlencoded', 'content-length': Buffer.byteLength(form) } },
        (r) => {
          let b = '';
          r.setEncoding('utf8').on('data', (x) => (b += x));
          r.on('end', () => (r.statusCode === 200 ? resolve(b) : reject(new Error(`token endpoint answered ${r.statusCode}: ${b}`))));
        },
      );
      req.on('error', reject);
      req.end(form);
    });
    return JSON.parse(body).access_token;
  }

  /** A `/subscribe` subscriber (filter devices/#) feeding `receiver`. */
  async subscribe(receiver) {
    const token = await this.token('subscribe');
    const ws = new WebSocket(`wss://127.0.0.1:${this.cloudPort}/subscribe?filter=${encodeURIComponent('devices/#')}`, {
      ca: readFileSync(this.caFile),
      headers: { authorization: `Bearer ${token}` },
      perMessageDeflate: false,
    });
    await new Promise((resolve, reject) => {
      ws.once('open', resolve);
      ws.once('error', reject);
      ws.once('unexpected-response', (_q, res) => reject(new Error(`/subscribe refused: HTTP ${res.statusCode}`)));
    });
    ws._socket?.setNoDelay(true);
    ws.on('error', () => {});
    ws.on('message', (data, isBinary) => {
      if (isBinary) return;
      const m = JSON.parse(data.toString());
      if (m.type === 'message' && typeof m.payload === 'string') receiver.receive(Buffer.from(m.payload, 'base64'));
    });
    this.sub = ws;
    return ws;
  }
}

/** Is the rival installed? */
export const MOSQUITTO = '/usr/sbin/mosquitto';
export const haveMosquitto = () => existsSync(MOSQUITTO);

function tcpUp(port) {
  return new Promise((resolve) => {
    const s = net.connect(port, '127.0.0.1');
    s.once('connect', () => (s.destroy(), resolve(true)));
    s.once('error', () => resolve(false));
  });
}

export class MosquittoStack {
  constructor(root, certs) {
    this.root = root;
    this.certs = certs;
  }

  async start() {
    const { caFile, certFile, keyFile } = this.certs;
    const user = os.userInfo().username;
    this.cloudPort = await freePort();
    this.edgePort = await freePort();
    for (const d of ['edge-db', 'cloud-db']) mkdirSync(path.join(this.root, d), { recursive: true });
    // the cloud broker: TLS, no client certificate, persistence like Debian's default
    const cloudConf = path.join(this.root, 'cloud.conf');
    writeFileSync(
      cloudConf,
      [
        `user ${user}`,
        'per_listener_settings false',
        'allow_anonymous true',
        'persistence true',
        `persistence_location ${path.join(this.root, 'cloud-db')}/`,
        'log_dest stderr',
        'log_type error',
        'log_type warning',
        `listener ${this.cloudPort} 127.0.0.1`,
        `cafile ${caFile}`,
        `certfile ${certFile}`,
        `keyfile ${keyFile}`,
        '',
      ].join('\n'),
    );
    // the edge broker: mTLS devices, bridged to the cloud over TLS, QoS 1, cleansession false
    const edgeConf = path.join(this.root, 'edge.conf');
    writeFileSync(
      edgeConf,
      [
        `user ${user}`,
        'per_listener_settings false',
        'allow_anonymous true',
        'persistence true',
        `persistence_location ${path.join(this.root, 'edge-db')}/`,
        'log_dest stderr',
        'log_type error',
        'log_type warning',
        `listener ${this.edgePort} 127.0.0.1`,
        `cafile ${caFile}`,
        `certfile ${certFile}`,
        `keyfile ${keyFile}`,
        'require_certificate true',
        'connection cloud',
        `address 127.0.0.1:${this.cloudPort}`,
        `bridge_cafile ${caFile}`,
        'bridge_protocol_version mqttv311',
        'cleansession false',
        'clientid bench-edge-bridge',
        'topic devices/# out 1',
        '',
      ].join('\n'),
    );
    this.cloud = spawnChild(MOSQUITTO, ['-c', cloudConf], { cwd: this.root });
    await waitFor('cloud mosquitto to listen', () => tcpUp(this.cloudPort), 15_000, 20);
    this.edge = spawnChild(MOSQUITTO, ['-c', edgeConf], { cwd: this.root });
    await waitFor('edge mosquitto to listen', () => tcpUp(this.edgePort), 15_000, 20);
  }

  /** A subscriber on the cloud broker (devices/#, QoS 1) feeding `receiver`. */
  async subscribe(receiver) {
    const c = mqtt.connect(`mqtts://127.0.0.1:${this.cloudPort}`, { ca: readFileSync(this.certs.caFile), protocolVersion: 4, clientId: `bench-sub-${process.pid}`, clean: true, reconnectPeriod: 0 });
    await new Promise((resolve, reject) => {
      c.once('connect', resolve);
      c.once('error', reject);
    });
    c.stream.setNoDelay?.(true);
    c.on('error', () => {});
    await c.subscribeAsync('devices/#', { qos: 1 });
    c.on('message', (_t, payload) => receiver.receive(payload));
    this.sub = c;
    return c;
  }

  async stop() {
    this.sub?.end(true);
    await stopChild(this.edge, 5000);
    await stopChild(this.cloud, 5000);
  }
}

/** bench/bare-aedes.mjs on the connector's own server certificate and device CA (so the same device certs work). */
export async function startBareAedes(REPO, cert, key, ca, { tlsOnly = false } = {}) {
  const p = spawnChild(process.execPath, [path.join(REPO, 'bench/bare-aedes.mjs'), cert, key, ca, ...(tlsOnly ? ['--tls-only'] : [])], { cwd: REPO });
  const ready = await logLine(p, 'ready', 30_000);
  return { proc: p, port: ready.port };
}

/** bench/null-cloud.mjs (acks every message at once, stores nothing). */
export async function startNullCloud(REPO, cert, key) {
  const p = spawnChild(process.execPath, [path.join(REPO, 'bench/null-cloud.mjs'), cert, key], { cwd: REPO });
  const ready = await logLine(p, 'ready', 30_000);
  return { proc: p, port: ready.ports.cloud };
}
