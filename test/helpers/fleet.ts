/**
 * A whole site on loopback, as real processes: the reference cloud
 * (`connector cloud -c FILE`), the connector (`connector start`), devices made
 * with `connector device add` publishing over mTLS with mqtt.js, and the
 * subscriber side read with `connector cloud tail`. Used by the end-to-end
 * tests and the fault (soak) suite. Every wait is bounded and event-driven.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import type { IncomingMessage } from 'node:http';
import path from 'node:path';
import { stringify } from 'yaml';
import mqtt, { type MqttClient } from 'mqtt';
import { CLI, nodeCommand, childEnv, startDaemon, runCli, type DaemonHandle, type Json, type StartOptions, type TestLike } from './daemon.js';

export const CLIENT_SECRET = randomBytes(24).toString('base64url');

export interface Cloud {
  proc: DaemonHandle;
  port: number;
  dir: string;
  storeDir: string;
  caFile: string;
  secretFile: string;
  configFile: string;
}

/** The reference cloud as a child process; `port` reuses a port across restarts. */
export async function startCloud(t: TestLike, dir: string, opts: { port?: number; tokenTtlS?: number } = {}): Promise<Cloud> {
  const secretFile = path.join(dir, 'cloud-client.secret');
  if (!existsSync(secretFile)) writeFileSync(secretFile, CLIENT_SECRET, { mode: 0o600 });
  const storeDir = path.join(dir, 'cloud-data');
  const configFile = path.join(dir, 'cloud.yaml');
  writeFileSync(
    configFile,
    stringify({
      listen: { host: '127.0.0.1', port: opts.port ?? 0 },
      store_dir: storeDir,
      clients: [{ id: 'edge-connector', secret: `file:${secretFile}` }],
      token_ttl_s: opts.tokenTtlS ?? 300,
      heartbeat_ms: 1000,
      log_level: 'info',
    }),
    { mode: 0o600 },
  );
  const proc = await startDaemon(t, { dir, configFile, args: ['cloud', '-c', configFile], readyTimeoutMs: 20000 });
  return { proc, port: proc.ports.cloud!, dir, storeDir, caFile: path.join(storeDir, 'tls', 'ca.crt'), secretFile, configFile };
}

export function merge(a: Json, b: Json): Json {
  const out: Json = { ...a };
  for (const [k, v] of Object.entries(b)) {
    const cur = out[k];
    out[k] = v && typeof v === 'object' && !Array.isArray(v) && cur && typeof cur === 'object' && !Array.isArray(cur) ? merge(cur as Json, v as Json) : v;
  }
  return out;
}

/** Ports the connector uses to reach the cloud (a test may put a proxy in front of either). */
export interface CloudPorts {
  uplink?: number;
  token?: number;
}

/** A connector configuration bridged to `cloud` (uplink and token URLs overridable, e.g. through a proxy). */
export function connectorConfig(cloud: { port: number; caFile: string }, secretFile: string, over: Json = {}, ports: CloudPorts = {}): Json {
  const base: Json = {
    broker: { limits: { max_payload_bytes: 2 * 1024 * 1024 } },
    bridge: {
      enabled: true,
      uplink: {
        url: `wss://127.0.0.1:${ports.uplink ?? cloud.port}/ingest`,
        ca_file: cloud.caFile,
        heartbeat_ms: 500,
        dead_after_ms: 3000,
        reconnect_min_ms: 50,
        reconnect_max_ms: 1000,
      },
      token: { url: `https://127.0.0.1:${ports.token ?? cloud.port}/oauth/token`, client_secret: `file:${secretFile}`, renew_before_s: 1 },
    },
  };
  return merge(base, over);
}

export interface Site {
  dir: string;
  cloud: Cloud;
  d: DaemonHandle;
  secretFile: string;
}

/** Cloud + connector in one temp directory. */
export async function startSite(
  t: TestLike,
  dir: string,
  opts: { tokenTtlS?: number; over?: Json; ports?: (cloud: Cloud) => Promise<CloudPorts>; hooks?: StartOptions['hooks'] } = {},
): Promise<Site> {
  const cloud = await startCloud(t, dir, { tokenTtlS: opts.tokenTtlS });
  const secretFile = path.join(dir, 'connector-client.secret');
  writeFileSync(secretFile, CLIENT_SECRET, { mode: 0o600 });
  const ports = opts.ports ? await opts.ports(cloud) : {};
  const d = await startDaemon(t, { dir, config: connectorConfig(cloud, secretFile, opts.over ?? {}, ports), hooks: opts.hooks });
  return { dir, cloud, d, secretFile };
}

export interface DeviceFiles {
  id: string;
  cert: string;
  key: string;
  ca: string;
  token: string;
}

/** `connector device add ID --out DIR` against the daemon's config. */
export async function addDevice(d: DaemonHandle, id: string): Promise<DeviceFiles> {
  const out = path.join(d.dir, `dev-${id}`);
  const r = await runCli(['device', 'add', id, '--out', out, '-c', d.configFile], { cwd: d.dir });
  if (r.code !== 0) throw new Error(`device add ${id} failed: ${r.stderr}`);
  const f = (n: string): string => readFileSync(path.join(out, n), 'utf8');
  return { id, cert: path.join(out, `${id}.crt`), key: path.join(out, `${id}.key`), ca: path.join(out, 'ca.crt'), token: f(`${id}.token`).trim() };
}

/** An mTLS MQTT 3.1.1 connection of a device (no automatic reconnect). */
export async function mqttConnect(d: DaemonHandle, dev: DeviceFiles): Promise<MqttClient> {
  const port = d.ports.mqtt_tls;
  if (!port) throw new Error(`the daemon reports no mqtt_tls port (ports: ${JSON.stringify(d.ports)})`);
  const c = mqtt.connect(`mqtts://127.0.0.1:${port}`, {
    clientId: dev.id,
    ca: readFileSync(dev.ca),
    cert: readFileSync(dev.cert),
    key: readFileSync(dev.key),
    protocolVersion: 4,
    reconnectPeriod: 0,
    connectTimeout: 10_000,
    rejectUnauthorized: true,
  });
  await new Promise<void>((resolve, reject) => {
    c.once('connect', () => resolve());
    c.once('error', reject);
    c.once('close', () => reject(new Error(`${dev.id}: connection closed before CONNACK`)));
  });
  c.on('error', () => undefined);
  return c;
}

/** A message as `connector cloud tail` prints it. */
export interface Delivered {
  id: string;
  device_id: string;
  topic: string;
  size: number;
  sha256: string;
  payload?: string;
}

/**
 * Run `connector cloud tail --from-start` until pred(lines) holds (bounded), then stop it.
 * With `soft`, a timeout resolves with what arrived so far (the caller's assertions then say what is missing).
 */
export async function tail(t: TestLike, cloud: Cloud, pred: (m: Delivered[]) => boolean, what: string, timeoutMs = 30_000, soft = false): Promise<Delivered[]> {
  const [cmd, argv] = nodeCommand([CLI, 'cloud', 'tail', '--from-start', '--url', `https://127.0.0.1:${cloud.port}`, '--ca', cloud.caFile, '--secret', `file:${cloud.secretFile}`]);
  const p: ChildProcess = spawn(cmd, argv, { stdio: ['ignore', 'pipe', 'pipe'], env: childEnv() });
  t.teardown(() => void p.kill('SIGKILL'));
  const got: Delivered[] = [];
  let partial = '';
  let stderr = '';
  p.stderr!.setEncoding('utf8').on('data', (s: string) => (stderr += s));
  return new Promise((resolve, reject) => {
    let settled = false;
    const settle = (fn: () => void): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      p.kill('SIGKILL');
      fn();
    };
    const timer = setTimeout(
      () => settle(() => (soft ? resolve(got) : reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}; got ${got.length} messages; tail stderr: ${stderr.slice(-500)}`)))),
      timeoutMs,
    );
    p.stdout!.setEncoding('utf8').on('data', (s: string) => {
      partial += s;
      let nl: number;
      while ((nl = partial.indexOf('\n')) >= 0) {
        const line = partial.slice(0, nl);
        partial = partial.slice(nl + 1);
        if (line.trim()) got.push(JSON.parse(line) as Delivered);
      }
      if (pred(got)) settle(() => resolve(got));
    });
    p.on('exit', () => settle(() => reject(new Error(`cloud tail exited before ${what} (${got.length} messages); stderr: ${stderr.slice(-500)}`))));
  });
}

/** Messages are "DEV:SEQ" (zero-padded) so order per device can be checked from the subscriber's side. */
export const seqMsg = (dev: string, i: number): Buffer => Buffer.from(`${dev}:${String(i).padStart(6, '0')}`);
export const decode = (m: Delivered): string => Buffer.from(m.payload ?? '', 'base64').toString().replace(/\.+$/, '');
/** The last message a device sends: once it is delivered, everything the device sent before it was (order per device). */
export const SENTINEL = 999_999;

export interface DeliveryFigures {
  /** Messages handed to the broker (acknowledged or not). */
  sent: number;
  /** PUBACKed. */
  acked: number;
  /** Distinct messages the cloud subscriber received (sentinels excluded). */
  delivered: number;
  /** Extra copies the subscriber received. */
  duplicated: number;
  /** PUBACKed but never delivered. */
  lost: number;
  /** Deliveries that went backwards within a device. */
  outOfOrder: number;
  /** Delivered messages the devices never sent. */
  unknown: number;
}

/** Compare what the devices sent and had acknowledged with what the subscriber received. */
export function deliveryFigures(got: Delivered[], sent: Map<string, number>, acked: Map<string, number[]>): DeliveryFigures {
  const perDevice = new Map<string, number[]>();
  const seen = new Set<string>();
  let duplicated = 0;
  let unknown = 0;
  for (const m of got) {
    const text = decode(m);
    const [dev, n] = text.split(':');
    if (!dev || n === undefined) continue;
    const num = Number(n);
    if (num === SENTINEL) continue;
    if (seen.has(text)) {
      duplicated++;
      continue;
    }
    seen.add(text);
    if (!sent.has(dev) || num >= sent.get(dev)!) unknown++;
    if (!perDevice.has(dev)) perDevice.set(dev, []);
    perDevice.get(dev)!.push(num);
  }
  let lost = 0;
  let outOfOrder = 0;
  let ackedCount = 0;
  for (const [dev, nums] of acked) {
    ackedCount += nums.length;
    const have = new Set(perDevice.get(dev) ?? []);
    lost += nums.filter((x) => !have.has(x)).length;
  }
  for (const recv of perDevice.values()) for (let i = 1; i < recv.length; i++) if (recv[i]! < recv[i - 1]!) outOfOrder++;
  let sentCount = 0;
  for (const n of sent.values()) sentCount += n;
  return { sent: sentCount, acked: ackedCount, delivered: seen.size, duplicated, lost, outOfOrder, unknown };
}

export function formatFigures(name: string, f: DeliveryFigures, extra = ''): string {
  return `${name}: sent ${f.sent} / acknowledged ${f.acked} / delivered ${f.delivered} / duplicated ${f.duplicated} / lost ${f.lost} / out of order ${f.outOfOrder} / unknown ${f.unknown}${extra ? ` — ${extra}` : ''}`;
}

/**
 * A device that publishes QoS 1 "DEV:SEQ" messages one after another while it
 * is connected, reconnecting (to the daemon's current port) when told to.
 * `sent` counts messages handed to the broker, `acked` the PUBACKed ones.
 */
export class Publisher {
  sent = 0;
  readonly acked: number[] = [];
  private client: MqttClient | undefined;
  private loop: Promise<void> | undefined;
  private stopped = false;
  private waiters: { n: number; orDrop: boolean; resolve: () => void }[] = [];

  /** `pad` bytes are appended to each payload (to fill a disk or a link faster). */
  constructor(
    readonly dev: DeviceFiles,
    private readonly pad = 0,
  ) {}

  /** True while the publish loop runs on a live connection. */
  get running(): boolean {
    return this.loop !== undefined && this.client !== undefined && !this.client.disconnected;
  }

  /** Connect to `d` and publish until the connection drops or stop() is called. */
  async run(d: DaemonHandle): Promise<void> {
    const c = await mqttConnect(d, this.dev);
    this.client = c;
    // without reconnection mqtt.js keeps a QoS 1 publish in flight when the connection closes (its promise never
    // settles): the loop ends on the close itself, so a broker that drops the connection ends it at once
    const closed = new Promise<never>((_, reject) => c.once('close', () => reject(new Error('connection closed'))));
    closed.catch(() => undefined);
    this.loop = (async () => {
      try {
        while (!this.stopped && this.sent < SENTINEL) {
          const i = this.sent++;
          await Promise.race([c.publishAsync(`devices/${this.dev.id}/seq`, this.pad ? Buffer.concat([seqMsg(this.dev.id, i), Buffer.alloc(this.pad, 0x2e)]) : seqMsg(this.dev.id, i), { qos: 1 }), closed]);
          this.acked.push(i);
          this.notify();
        }
      } catch {
        // the connection dropped (daemon killed): the message in flight may or may not have been journaled
      }
      this.loop = undefined;
      this.notify();
    })();
  }

  private notify(): void {
    const n = this.acked.length;
    this.waiters = this.waiters.filter((w) => (n >= w.n || (w.orDrop && !this.loop) ? (w.resolve(), false) : true));
  }

  /**
   * Keep publishing until `n` messages in total are acknowledged, reconnecting
   * whenever the broker closes the connection (e.g. it could not journal a
   * message and told the device to retry later). Bounded in time.
   */
  async publishUntil(d: DaemonHandle, n: number, timeoutMs = 60_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (this.acked.length < n) {
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`${this.dev.id}: ${this.acked.length} of ${n} messages acknowledged within ${timeoutMs} ms (reconnecting)`);
      if (!this.running) await this.run(d).catch(() => undefined);
      await this.waitAcked(n, left, true).catch(() => undefined);
    }
  }

  /** Resolve once `n` messages in total are acknowledged (or, with orDrop, the connection dropped); bounded. */
  waitAcked(n: number, timeoutMs = 30_000, orDrop = false): Promise<void> {
    if (this.acked.length >= n || (orDrop && !this.loop)) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const w = { n, orDrop, resolve: () => (clearTimeout(timer), resolve()) };
      const timer = setTimeout(() => {
        this.waiters = this.waiters.filter((x) => x !== w);
        reject(new Error(`${this.dev.id}: ${this.acked.length} of ${n} messages acknowledged within ${timeoutMs} ms`));
      }, timeoutMs);
      this.waiters.push(w);
    });
  }

  /** Drop the connection (after the daemon died) and wait for the publish loop to end. */
  async disconnect(): Promise<void> {
    this.client?.end(true);
    await this.loop;
    this.client = undefined;
  }

  /** Stop publishing, send the sentinel (so the subscriber knows everything before it arrived) and disconnect. */
  async finish(): Promise<void> {
    this.stopped = true;
    await this.loop;
    await this.client?.publishAsync(`devices/${this.dev.id}/seq`, seqMsg(this.dev.id, SENTINEL), { qos: 1 });
    await new Promise<void>((resolve) => this.client!.end(false, {}, () => resolve()));
  }
}

/** True once every publisher's sentinel was delivered. */
export const sentinelsIn =
  (pubs: Publisher[]) =>
  (got: Delivered[]): boolean =>
    pubs.every((p) => got.some((m) => m.device_id === p.dev.id && decode(m) === seqMsg(p.dev.id, SENTINEL).toString()));

export const MARKER = 'marker-after-everything';

/**
 * "Nothing more arrives" bounded by an event, not a sleep: publish a marker
 * through the same connector after everything else and read until it is
 * delivered. The uplink sends the journal in order, so anything still on its
 * way (a resend, a duplicate) would have reached the cloud before the marker.
 */
export async function throughMarker(t: TestLike, d: DaemonHandle, cloud: Cloud, dev: DeviceFiles, what: string): Promise<Delivered[]> {
  const c = await mqttConnect(d, dev);
  try {
    await c.publishAsync(`devices/${dev.id}/marker`, Buffer.from(MARKER), { qos: 1 });
  } finally {
    c.end(true);
  }
  const got = await tail(t, cloud, (m) => m.some((x) => decode(x) === MARKER), `${what}, then the marker`, 45_000);
  return got.filter((x) => decode(x) !== MARKER);
}

/** An https.request response callback that resolves with the status and the JSON body (an empty body: {}). */
export function jsonAnswer(resolve: (a: { status: number; body: Json }) => void): (res: IncomingMessage) => void {
  return (res) => {
    let text = '';
    res.setEncoding('utf8');
    res.on('data', (s: string) => (text += s));
    res.on('end', () => resolve({ status: res.statusCode ?? 0, body: text ? (JSON.parse(text) as Json) : {} }));
  };
}
