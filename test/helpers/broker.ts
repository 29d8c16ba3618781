/**
 * In-process Broker fixture for the broker tests: real DeviceRegistry, LocalPki and
 * TokenService in a temp state dir (initialised like `connector init`), the Broker on
 * 127.0.0.1 port 0, a log capture, device provisioning helpers, and bounded waits.
 */
import path from 'node:path';
import type { EventEmitter } from 'node:events';
import { once } from 'node:events';
import tls from 'node:tls';
import mqttPacket from 'mqtt-packet';
import { writeFileSync } from 'node:fs';
import { stringify } from 'yaml';
import mqtt, { type MqttClient, type IClientOptions } from 'mqtt';
import { parseConfigText } from '../../core/config/load.js';
import type { Config } from '../../core/config/schema.js';
import { createLogger, type Logger } from '../../core/logger.js';
import { DeviceRegistry } from '../../identity/registry.js';
import { LocalPki, initPki } from '../../identity/pki.js';
import { TokenService, initTokenKeys } from '../../identity/tokens.js';
import { Broker, brokerSettings, type BrokerOptions } from '../../broker/broker.js';
import type { UplinkSink } from '../../core/ports.js';
import { tempDir, testConfig, type Json, type TestLike } from './daemon.js';

export interface LogCapture {
  lines: Record<string, unknown>[];
  raw: string[];
  logger: Logger;
  /** lines whose fields include all of `match` */
  find(match: Record<string, unknown>): Record<string, unknown>[];
}

export function captureLogs(level: 'debug' | 'info' = 'info'): LogCapture {
  const lines: Record<string, unknown>[] = [];
  const raw: string[] = [];
  const logger = createLogger({
    level,
    destination: {
      write(s: string) {
        raw.push(s);
        for (const l of s.split('\n')) if (l.trim()) lines.push(JSON.parse(l) as Record<string, unknown>);
      },
    },
  });
  return {
    lines,
    raw,
    logger,
    find: (match) => lines.filter((l) => Object.entries(match).every(([k, v]) => l[k] === v)),
  };
}

export interface Device {
  id: string;
  cert: string;
  key: string;
  serial: string;
  token: string;
  jti: string;
}

export interface BrokerFixture {
  dir: string;
  config: Config;
  registry: DeviceRegistry;
  pki: LocalPki;
  tokens: TokenService;
  broker: Broker;
  logs: LogCapture;
  ca: string;
  port: (l: 'tls' | 'wss' | 'local') => number;
  /** register a device, issue a certificate bundle and a token */
  addDevice(id: string, opts?: { keyType?: 'ec' | 'rsa'; group?: string }): Promise<Device>;
  /** connect with mqtt.js (never reconnects); rejects with the CONNACK error */
  connect(opts: ConnectOpts): Promise<MqttClient>;
}

export interface ConnectOpts {
  listener?: 'tls' | 'wss' | 'local';
  clientId: string;
  cert?: string;
  key?: string;
  username?: string;
  password?: string;
  keepalive?: number;
  clean?: boolean;
  extra?: Partial<IClientOptions>;
}

export function buildConfig(dir: string, overrides: Json = {}): Config {
  const file = path.join(dir, 'connector.yaml');
  return parseConfigText(stringify(testConfig(dir, overrides)), file, { checkSecrets: false }).config;
}

export async function brokerFixture(
  t: TestLike,
  opts: { overrides?: Json; sink?: UplinkSink; broker?: Partial<BrokerOptions>; tokenNow?: () => number; logLevel?: 'debug' | 'info'; before?: (dir: string) => Json | void | Promise<Json | void> } = {},
): Promise<BrokerFixture> {
  const dir = tempDir(t, 'ec-broker-');
  const extra = (await opts.before?.(dir)) ?? {};
  const config = buildConfig(dir, deepMergeJson(opts.overrides ?? {}, extra));
  await initPki(dir, config.identity.pki, config.daemon.server_name);
  await initTokenKeys(dir, config.identity.jwt.algorithm);
  const logs = captureLogs(opts.logLevel ?? 'info');
  const logger = logs.logger;
  const registry = new DeviceRegistry({ file: path.join(dir, 'registry.json'), logger });
  await registry.start();
  t.teardown(() => registry.close());
  const pki = new LocalPki({ stateDir: dir, config: config.identity.pki, logger });
  await pki.start();
  t.teardown(() => pki.close());
  const tokens = new TokenService({ stateDir: dir, config: config.identity.jwt, registry, logger, ...(opts.tokenNow ? { now: opts.tokenNow } : {}) });
  await tokens.start();
  t.teardown(() => tokens.close());
  const broker = new Broker({ config: config.broker, bridge: brokerSettings(config).bridge, logger, registry, pki, tokens, crlPollMs: 50, ...(opts.sink ? { sink: opts.sink } : {}), ...opts.broker });
  t.teardown(() => broker.close());
  await broker.start();
  const ca = pki.caCertificatePem();
  const clients: MqttClient[] = [];
  t.teardown(() => Promise.all(clients.map((c) => c.endAsync(true).catch(() => {}))));

  const fx: BrokerFixture = {
    dir,
    config,
    registry,
    pki,
    tokens,
    broker,
    logs,
    ca,
    port: (l) => {
      const p = broker.boundPorts().get(l);
      if (p === undefined) throw new Error(`listener ${l} is not bound`);
      return p;
    },
    async addDevice(id, o = {}) {
      await registry.create(id, o.group ? { group: o.group } : {});
      const b = await pki.issueDeviceBundle(id, o.keyType ?? 'ec');
      await registry.addCertificate(id, { serial: b.serial, fingerprint256: b.fingerprint256, not_after: b.notAfter.toISOString() });
      const tok = await tokens.issue(id);
      return { id, cert: b.cert, key: b.key, serial: b.serial, token: tok.token, jti: tok.jti };
    },
    connect(c) {
      const listener = c.listener ?? 'tls';
      const url =
        listener === 'tls'
          ? `mqtts://127.0.0.1:${fx.port('tls')}`
          : listener === 'wss'
            ? `wss://127.0.0.1:${fx.port('wss')}${config.broker.listeners.wss.path}`
            : `mqtt://127.0.0.1:${fx.port('local')}`;
      const client = mqtt.connect(url, {
        protocolVersion: 4,
        clientId: c.clientId,
        reconnectPeriod: 0,
        connectTimeout: 5000,
        keepalive: c.keepalive ?? 60,
        clean: c.clean ?? true,
        ...(listener !== 'local' ? { ca, rejectUnauthorized: true, servername: 'localhost' } : {}),
        ...(c.cert ? { cert: c.cert, key: c.key } : {}),
        ...(c.username !== undefined ? { username: c.username } : {}),
        ...(c.password !== undefined ? { password: c.password } : {}),
        ...c.extra,
      });
      clients.push(client);
      return new Promise((resolve, reject) => {
        const onErr = (err: Error): void => {
          cleanup();
          client.end(true);
          reject(err);
        };
        const onClose = (): void => {
          cleanup();
          reject(Object.assign(new Error('connection closed before CONNACK'), { code: 'CLOSED' }));
        };
        const onConnect = (): void => {
          cleanup();
          resolve(client);
        };
        const cleanup = (): void => {
          client.off('error', onErr);
          client.off('close', onClose);
          client.off('connect', onConnect);
        };
        client.once('error', onErr);
        client.once('close', onClose);
        client.once('connect', onConnect);
      });
    },
  };
  return fx;
}

function deepMergeJson(a: Json, b: Json): Json {
  const out: Json = { ...a };
  for (const [k, v] of Object.entries(b)) {
    const cur = out[k];
    out[k] =
      v && typeof v === 'object' && !Array.isArray(v) && cur && typeof cur === 'object' && !Array.isArray(cur) ? deepMergeJson(cur as Json, v as Json) : v;
  }
  return out;
}

/** Resolve when `emitter` emits `event`, reject after `ms` (bounded wait, no sleeps). */
export function waitEvent<T = unknown>(emitter: EventEmitter | MqttClient, event: string, ms = 5000): Promise<T> {
  const em = emitter as EventEmitter;
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      em.off(event, on);
      reject(new Error(`timed out after ${ms} ms waiting for "${event}"`));
    }, ms);
    const on = (arg: T): void => {
      clearTimeout(timer);
      resolve(arg);
    };
    em.once(event, on);
  });
}

/** SUBSCRIBE and return the granted codes in order (mqtt.js rejects when any is 0x80; the SUBACK is on the error). */
export async function suback(client: MqttClient, filters: Record<string, { qos: 0 | 1 | 2 }>): Promise<number[]> {
  try {
    const granted = await client.subscribeAsync(filters);
    return granted.map((g) => g.qos);
  } catch (err) {
    const packet = (err as { packet?: { granted?: number[] } }).packet;
    if (!packet?.granted) throw err;
    return packet.granted;
  }
}

/** Expect a refused connection; returns the mqtt.js error (code = CONNACK return code, or 'CLOSED'). */
export async function refused(p: Promise<MqttClient>): Promise<Error & { code?: number | string }> {
  try {
    const c = await p;
    c.end(true);
  } catch (err) {
    return err as Error & { code?: number | string };
  }
  throw new Error('connection was accepted but should have been refused');
}

/** Subscribe and collect the topics of every message received from now on. */
export async function collect(sub: MqttClient, filter: string, qos: 0 | 1 = 1): Promise<string[]> {
  const got: string[] = [];
  sub.on('message', (topic) => got.push(topic));
  await sub.subscribeAsync(filter, { qos });
  return got;
}

/**
 * Poll `cond` until true, bounded in time (`ms`). Kept as polling on purpose: the conditions are
 * broker state with no event (isConnected, connectedDevices, listener counts), a test sink's
 * counters, or messages collected by several clients at once (one condition over many emitters);
 * a test that waits for ONE event uses `once` instead.
 */
export async function waitFor(cond: () => boolean, ms = 5000, what = 'condition'): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** An in-memory UplinkSink test double (the real journal is bridge/journal.ts, built separately). */
export class FakeSink implements UplinkSink {
  appended: { meta: Parameters<UplinkSink['append']>[0]; payload: Buffer }[] = [];
  /** when set, append waits for release() (or fails with the given error) */
  hold = false;
  failWith: Error | undefined;
  private waiting: { resolve: () => void; reject: (e: Error) => void }[] = [];
  private n = 0;

  async append(meta: Parameters<UplinkSink['append']>[0], payload: Buffer) {
    if (this.failWith) throw this.failWith;
    this.appended.push({ meta, payload });
    if (this.hold) await new Promise<void>((resolve, reject) => this.waiting.push({ resolve, reject }));
    return { id: `m${++this.n}`, size: payload.length, sha256: '' };
  }
  get held(): number {
    return this.waiting.length;
  }
  /** release held appends, in the given order of indexes (default: arrival order) */
  release(order?: number[]): void {
    const w = this.waiting;
    this.waiting = [];
    for (const i of order ?? w.map((_, i) => i)) w[i]!.resolve();
  }
  failHeld(err: Error): void {
    const w = this.waiting;
    this.waiting = [];
    for (const x of w) x.reject(err);
  }
  appendStream(): never {
    throw new Error('not used by the broker');
  }
}

export function writeText(file: string, text: string): void {
  writeFileSync(file, text);
}

export interface RawDevice {
  sock: tls.TLSSocket;
  /** every packet the broker sent, in order */
  received: mqttPacket.Packet[];
  send(packet: mqttPacket.Packet): void;
  /** how many PUBACKs arrived for this packet id */
  acked(id: number): number;
}

/**
 * A raw MQTT 3.1.1 device over mTLS, connected (CONNACK received): for what mqtt.js cannot be
 * made to do on purpose (lose a PUBACK, never acknowledge, set DUP by hand).
 */
export async function rawDevice(
  t: TestLike,
  fx: { port(l: 'tls'): number; ca: string },
  device: { cert: string; key: string },
  clientId: string,
  clean = false,
): Promise<RawDevice> {
  const sock = tls.connect({ host: '127.0.0.1', port: fx.port('tls'), ca: fx.ca, servername: 'localhost', cert: device.cert, key: device.key });
  t.teardown(() => sock.destroy());
  await once(sock, 'secureConnect');
  const parser = mqttPacket.parser({ protocolVersion: 4 });
  const received: mqttPacket.Packet[] = [];
  parser.on('packet', (p) => received.push(p));
  sock.on('data', (b: Buffer) => parser.parse(b));
  const send = (p: mqttPacket.Packet): void => {
    sock.write(mqttPacket.generate(p));
  };
  send({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 4, clean, clientId, keepalive: 60 });
  await waitFor(() => received.some((p) => p.cmd === 'connack'), 5000, 'CONNACK');
  return { sock, received, send, acked: (id) => received.filter((p) => p.cmd === 'puback' && p.messageId === id).length };
}
