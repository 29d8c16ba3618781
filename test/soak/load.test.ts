/**
 * Fault suite — load: many device connections at once (half mTLS, half JWT),
 * each publishing QoS 1; then, with all of them connected, floods from
 * unauthenticated clients on other loopback addresses:
 *  - MQTT/TLS: CONNECTs with bad JWTs (127.0.0.2), client certificates from a
 *    foreign CA (127.0.0.3), bytes that are not TLS at all (127.0.0.4);
 *  - HTTPS API: registrations with bad enrollment tokens, a new TLS connection
 *    each (127.0.0.5).
 * During the flood valid devices keep publishing and a valid device connects
 * anew and gets its PUBACK. Checked: every PUBACKed message is in the cloud
 * exactly once; the daemon's memory stays bounded (its heap after a full GC,
 * through the test.gc hook of test/helpers/daemon-hooks.mjs; RSS printed);
 * the flood is rate-limited (its sources are turned away before the TLS
 * handshake once their budget of refusals is spent) and logged per interval
 * (at most REFUSAL_DETAIL_LINES full lines plus one summary per 10 s and
 * component), not per attempt.
 * Fast level (npm test): 300 devices, a 5 s flood; SOAK=full: 5 000 devices, 20 s.
 */
import t from 'tap';
import net from 'node:net';
import tls from 'node:tls';
import https from 'node:https';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import mqtt, { type MqttClient } from 'mqtt';
import mqttPacket from 'mqtt-packet';
import { tempDir, type DaemonHandle } from '../helpers/daemon.js';
import { startSite, tail, seqMsg, deliveryFigures, formatFigures, decode, type Delivered } from '../helpers/fleet.js';
import { TestCA } from '../helpers/certs.js';
import { FULL } from '../helpers/soak.js';
import { adminRequest, adminSocketPath } from '../../daemon/admin.js';
import { REFUSAL_DETAIL_LINES, REFUSAL_LOG_INTERVAL_MS } from '../../core/refusals.js';

const DEVICES = Number(process.env.SOAK_DEVICES) > 0 && FULL ? Math.min(Number(process.env.SOAK_DEVICES), 10_000) : FULL ? 5000 : 300;
const FLOOD_MS = FULL ? 20_000 : 5_000;
/** Registrations / connections in flight at once: registrations share registry rewrites (group commit), so more in flight means fewer rewrites of a file that grows with the fleet; bounded so one slow step does not time out the rest. */
const REGISTER_CONCURRENCY = 32;
const CONNECT_CONCURRENCY = 64;
/** Flood clients in flight per kind (each retries at once when its attempt ends: as fast as the gateway lets it). */
const FLOOD_CONCURRENCY = 16;
/** One flood attempt never waits longer than this. */
const ATTEMPT_TIMEOUT_MS = 5_000;

t.setTimeout((FULL ? 600 : 120) * 1000);

interface Device {
  id: string;
  key: string;
  cert: string;
  ca: string;
  token: string;
  viaCert: boolean;
}

function rssMiB(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) / 1024 : NaN;
}

/** Run `fn` over `items` with at most `n` at once. */
async function pool<T>(items: T[], n: number, fn: (x: T, i: number) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(n, items.length) }, async () => {
      while (next < items.length) {
        const i = next++;
        await fn(items[i]!, i);
      }
    }),
  );
}

function connectDevice(d: DaemonHandle, dev: Device): Promise<MqttClient> {
  const c = mqtt.connect(`mqtts://127.0.0.1:${d.ports.mqtt_tls}`, {
    clientId: dev.id,
    ca: dev.ca,
    ...(dev.viaCert ? { cert: dev.cert, key: dev.key } : { username: dev.id, password: dev.token }),
    protocolVersion: 4,
    reconnectPeriod: 0,
    keepalive: 600,
    connectTimeout: 60_000,
  });
  return new Promise((resolve, reject) => {
    c.once('connect', () => {
      c.on('error', () => undefined);
      resolve(c);
    });
    c.once('error', reject);
    c.once('close', () => reject(new Error(`${dev.id}: closed before CONNACK`)));
  });
}

type Outcome = 'refused' | 'turned away' | 'timeout';

/** One unauthenticated MQTT attempt from `localAddress`: what became of it. */
function mqttAttempt(port: number, localAddress: string, kind: 'jwt' | 'cert' | 'garbage', foreign: { cert: string; key: string }): Promise<Outcome> {
  return new Promise((resolve) => {
    let handshaken = false;
    let done = false;
    const finish = (o: Outcome): void => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      sock.destroy();
      resolve(o);
    };
    const timer = setTimeout(() => finish('timeout'), ATTEMPT_TIMEOUT_MS);
    const connect = mqttPacket.generate({
      cmd: 'connect',
      protocolId: 'MQTT',
      protocolVersion: 4,
      clean: true,
      clientId: `flood-${kind}`,
      keepalive: 60,
      ...(kind === 'jwt' ? { username: 'flood', password: Buffer.from('eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJmbG9vZCJ9.bm90LWEtc2lnbmF0dXJl') } : {}),
    });
    let sock: net.Socket;
    if (kind === 'garbage') {
      sock = net.connect({ host: '127.0.0.1', port, localAddress }, () => sock.write(Buffer.alloc(512, 0x47)));
      // not TLS: the server answers with a TLS alert and closes; a source turned away at accept gets no answer at all
      sock.on('data', () => (handshaken = true));
      sock.on('close', () => finish(handshaken ? 'refused' : 'turned away'));
    } else {
      sock = tls.connect(
        { socket: net.connect({ host: '127.0.0.1', port, localAddress }), rejectUnauthorized: false, ...(kind === 'cert' ? { cert: foreign.cert, key: foreign.key } : {}) },
        () => {
          handshaken = true;
          (sock as tls.TLSSocket).write(connect);
        },
      );
      sock.on('data', () => finish('refused')); // a CONNACK (never 0 for these)
      sock.on('close', () => finish(handshaken ? 'refused' : 'turned away'));
    }
    sock.on('error', () => undefined);
  });
}

/** One registration with a bad enrollment token over a new TLS connection: the HTTP status, or 0 when turned away before an answer. */
function registerAttempt(port: number, localAddress: string, ca: string): Promise<number> {
  return new Promise((resolve) => {
    const body = JSON.stringify({ device_id: 'flood-dev' });
    const req = https.request(
      {
        host: '127.0.0.1',
        port,
        localAddress,
        path: '/api/register',
        method: 'POST',
        ca,
        agent: false,
        timeout: ATTEMPT_TIMEOUT_MS,
        headers: { authorization: 'Bearer enr_not-a-real-enrollment-token', 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) },
      },
      (res) => {
        res.resume();
        res.on('end', () => resolve(res.statusCode ?? 0));
        res.on('error', () => resolve(res.statusCode ?? 0));
      },
    );
    req.on('timeout', () => req.destroy());
    req.on('error', () => resolve(0));
    req.end(body);
  });
}

t.test(`load: ${DEVICES} device connections (mTLS and JWT), publishing, and floods of unauthenticated clients`, async (t) => {
  const dir = tempDir(t, 'ec-soak-load-');
  // under test/helpers/daemon-hooks.mjs for test.gc: memory is compared after a full GC (what the flood left retained)
  const site = await startSite(t, dir, { over: { broker: { limits: { max_connections: DEVICES + 1000 } } }, hooks: true });
  const d = site.d;
  const pid = d.proc.pid!;
  const rss0 = rssMiB(pid);

  // ── register: the admin socket, as `connector device add` does (key, certificate and token per device)
  let t0 = Date.now();
  const sock = adminSocketPath(d.stateDir);
  const devs: Device[] = [];
  await pool(
    Array.from({ length: DEVICES }, (_, i) => i),
    REGISTER_CONCURRENCY,
    async (i) => {
      const id = `load-${String(i).padStart(5, '0')}`;
      const b = (await adminRequest(sock, 'device.add', { id }, 60_000)) as { key: string; cert: string; ca: string; token: string };
      devs.push({ id, key: b.key, cert: b.cert, ca: b.ca, token: b.token, viaCert: i % 2 === 0 });
    },
  );
  const registerS = (Date.now() - t0) / 1000;

  // ── connect all of them
  t0 = Date.now();
  const clients = new Map<string, MqttClient>();
  await pool(devs, CONNECT_CONCURRENCY, async (dev) => void clients.set(dev.id, await connectDevice(d, dev)));
  const connectS = (Date.now() - t0) / 1000;
  const rssConnected = rssMiB(pid);
  t.equal(clients.size, DEVICES, `${DEVICES} devices connected`);

  // ── every device publishes one message at once
  t0 = Date.now();
  const acked = new Map<string, number[]>();
  const sent = new Map<string, number>();
  await Promise.all(
    devs.map(async (dev) => {
      sent.set(dev.id, 1);
      await clients.get(dev.id)!.publishAsync(`devices/${dev.id}/seq`, seqMsg(dev.id, 0), { qos: 1 });
      acked.set(dev.id, [0]);
    }),
  );
  const publishS = (Date.now() - t0) / 1000;
  t.equal(acked.size, DEVICES, 'every device got its PUBACK');

  // ── floods, while valid devices keep publishing
  const foreign = await (await TestCA.create({ cn: 'Foreign CA' })).client({ cn: 'load-00000' });
  const apiCa = readFileSync(path.join(d.stateDir, 'pki', 'ca.crt'), 'utf8');
  const logsBefore = d.logs.length;
  const heapMiB = async (): Promise<number> => ((await adminRequest(sock, 'test.gc', {}, 30_000)) as { heapUsed: number }).heapUsed / 2 ** 20;
  const heapBeforeFlood = await heapMiB();
  const rssBeforeFlood = rssMiB(pid);
  const floodStart = Date.now();
  const floodEnd = floodStart + FLOOD_MS;
  // the daemon's RSS through the flood (a sample every 250 ms): it must level off, not grow with the attempts
  const rssSamples: { at: number; mib: number }[] = [];
  const sampler = setInterval(() => rssSamples.push({ at: Date.now() - floodStart, mib: rssMiB(pid) }), 250);
  const counts = { jwt: new Map<Outcome, number>(), cert: new Map<Outcome, number>(), garbage: new Map<Outcome, number>(), api: new Map<number, number>() };
  const inc = <K>(m: Map<K, number>, k: K): void => void m.set(k, (m.get(k) ?? 0) + 1);
  const floods: Promise<void>[] = [];
  for (const [kind, addr] of [['jwt', '127.0.0.2'], ['cert', '127.0.0.3'], ['garbage', '127.0.0.4']] as const) {
    for (let k = 0; k < FLOOD_CONCURRENCY; k++) {
      floods.push(
        (async () => {
          while (Date.now() < floodEnd) inc(counts[kind], await mqttAttempt(d.ports.mqtt_tls!, addr, kind, foreign));
        })(),
      );
    }
  }
  for (let k = 0; k < FLOOD_CONCURRENCY; k++) {
    floods.push(
      (async () => {
        while (Date.now() < floodEnd) inc(counts.api, await registerAttempt(d.ports.api!, '127.0.0.5', apiCa));
      })(),
    );
  }
  // valid traffic during the flood: the first 10 devices publish one after another; a device reconnects anew
  const during = devs.slice(0, 10);
  let duringAcked = 0;
  let worstPubackMs = 0;
  const valid = (async () => {
    for (let n = 1; Date.now() < floodEnd; n++) {
      await Promise.all(
        during.map(async (dev) => {
          const p0 = Date.now();
          sent.set(dev.id, n + 1);
          await clients.get(dev.id)!.publishAsync(`devices/${dev.id}/seq`, seqMsg(dev.id, n), { qos: 1 });
          acked.get(dev.id)!.push(n);
          duringAcked++;
          worstPubackMs = Math.max(worstPubackMs, Date.now() - p0);
        }),
      );
    }
  })();
  // a new connection of a valid device in the middle of the flood (its own address is not flooding)
  const fresh = devs[devs.length - 1]!;
  await new Promise((r) => setTimeout(r, FLOOD_MS / 2)); // the middle of the flood: a moment, not a wait for a condition
  clients.get(fresh.id)!.end(true);
  const c0 = Date.now();
  const again = await connectDevice(d, fresh);
  clients.set(fresh.id, again);
  await again.publishAsync(`devices/${fresh.id}/seq`, seqMsg(fresh.id, 1), { qos: 1 });
  const freshMs = Date.now() - c0;
  sent.set(fresh.id, 2);
  acked.get(fresh.id)!.push(1);
  await Promise.all([...floods, valid]);
  clearInterval(sampler);
  const rssAfterFlood = rssMiB(pid);
  // once the attempts have ended (closed sockets are released by the next turns of the loop), what stays retained
  const heapAfterFlood = await heapMiB();
  const peak = (from: number, to: number): number => Math.max(...rssSamples.filter((x) => x.at >= from && x.at < to).map((x) => x.mib));
  const firstHalfPeak = peak(0, FLOOD_MS / 2);
  const secondHalfPeak = peak(FLOOD_MS / 2, FLOOD_MS + 1000);
  const timeline = rssSamples.filter((_, i) => i % 8 === 0).map((x) => `${(x.at / 1000).toFixed(0)} s ${x.mib.toFixed(0)}`);

  // the summary lines come at the end of each 10 s interval (bounded wait for the last one)
  const summary = (l: Record<string, unknown>): boolean => l.code === 'ECONN_RATE_LIMITED' && typeof l.not_logged === 'number';
  await d.waitForLog((l) => summary(l) && l.component === 'broker' && d.logs.indexOf(l) >= logsBefore, REFUSAL_LOG_INTERVAL_MS + 5000, 'the broker refusal summary');
  await d.waitForLog((l) => summary(l) && l.component === 'api' && d.logs.indexOf(l) >= logsBefore, REFUSAL_LOG_INTERVAL_MS + 5000, 'the API refusal summary');
  const floodLogs = d.logs.slice(logsBefore);
  const lines = (component: string): { detail: number; summaries: number; notLogged: number } => {
    const mine = floodLogs.filter((l) => l.component === component);
    const detail = mine.filter((l) => l.msg === 'MQTT connection refused' || l.msg === 'request refused').length;
    const sums = mine.filter(summary);
    return { detail, summaries: sums.length, notLogged: sums.reduce((a, l) => a + (l.not_logged as number), 0) };
  };
  const broker = lines('broker');
  const api = lines('api');
  const sum = <K>(m: Map<K, number>): number => [...m.values()].reduce((a, b) => a + b, 0);
  const mqttAttempts = sum(counts.jwt) + sum(counts.cert) + sum(counts.garbage);
  const apiAttempts = sum(counts.api);
  const turnedAway = (counts.jwt.get('turned away') ?? 0) + (counts.cert.get('turned away') ?? 0);
  const intervals = Math.ceil((FLOOD_MS + REFUSAL_LOG_INTERVAL_MS) / REFUSAL_LOG_INTERVAL_MS) + 1;
  const maxLines = intervals * (REFUSAL_DETAIL_LINES + 1);

  // ── everything acknowledged reached the cloud exactly once
  const total = [...acked.values()].reduce((a, v) => a + v.length, 0);
  const want = new Set<string>();
  for (const [id, nums] of acked) for (const n of nums) want.add(seqMsg(id, n).toString());
  const got: Delivered[] = await tail(t, site.cloud, (g) => new Set(g.map(decode).filter((x) => want.has(x))).size >= want.size, `${total} acknowledged messages`, FULL ? 180_000 : 60_000, true);
  const f = deliveryFigures(got, sent, acked);

  t.comment(
    formatFigures(`load (${DEVICES} devices, half mTLS half JWT)`, f) +
      `\n  registered in ${registerS.toFixed(1)} s (${(DEVICES / registerS).toFixed(0)}/s, admin socket), connected in ${connectS.toFixed(1)} s (${(DEVICES / connectS).toFixed(0)}/s), ${DEVICES} PUBACKs in ${publishS.toFixed(1)} s` +
      `\n  daemon RSS: ${rss0.toFixed(0)} MiB at start, ${rssConnected.toFixed(0)} MiB with ${DEVICES} connections (${(((rssConnected - rss0) * 1024) / DEVICES).toFixed(1)} KiB each), ${rssBeforeFlood.toFixed(0)} MiB before the flood, ${rssAfterFlood.toFixed(0)} MiB after it (during it, MiB: ${timeline.join(', ')}; peak ${firstHalfPeak.toFixed(0)} in the first half, ${secondHalfPeak.toFixed(0)} in the second); heap after a full GC ${heapBeforeFlood.toFixed(1)} MiB before the flood, ${heapAfterFlood.toFixed(1)} MiB after it` +
      `\n  flood ${FLOOD_MS / 1000} s: MQTT ${mqttAttempts} attempts (bad JWT ${JSON.stringify(Object.fromEntries(counts.jwt))}, foreign certificate ${JSON.stringify(Object.fromEntries(counts.cert))}, not TLS ${JSON.stringify(Object.fromEntries(counts.garbage))}); API ${apiAttempts} registrations (by status, 0 = turned away: ${JSON.stringify(Object.fromEntries(counts.api))})` +
      `\n  log lines: broker ${broker.detail} full + ${broker.summaries} summaries (${broker.notLogged} not logged one by one), API ${api.detail} full + ${api.summaries} summaries (${api.notLogged} not logged one by one)` +
      `\n  valid traffic during the flood: ${duringAcked} PUBACKs, slowest ${worstPubackMs} ms; a fresh connection + PUBACK in ${freshMs} ms`,
  );
  t.equal(f.lost, 0, 'no acknowledged message lost');
  t.equal(f.duplicated, 0, 'no message delivered twice');
  t.equal(f.outOfOrder, 0, 'order per device kept');
  t.equal(f.unknown, 0, 'nothing delivered that no device sent');
  t.ok(duringAcked > 0, 'connected devices were served during the flood');
  t.ok(turnedAway > 0, 'flooding MQTT sources were turned away before the TLS handshake');
  t.ok((counts.api.get(0) ?? 0) + (counts.api.get(429) ?? 0) > 0, 'the flooding API source was turned away (429 or closed before the handshake)');
  t.ok(mqttAttempts > 10 * (broker.detail + broker.summaries), `MQTT refusals are not logged per attempt (${mqttAttempts} attempts, ${broker.detail + broker.summaries} lines)`);
  t.ok(broker.detail + broker.summaries <= maxLines, `broker refusal lines bounded per interval (${broker.detail + broker.summaries} ≤ ${maxLines})`);
  t.ok(api.detail + api.summaries <= maxLines, `API refusal lines bounded per interval (${api.detail + api.summaries} ≤ ${maxLines})`);
  // bounded = nothing per attempt stays behind: the heap after a full GC is where it was before thousands of attempts
  // (RSS, printed above, also holds garbage not yet collected and heap the allocator keeps; it is no measure of retention)
  t.ok(heapAfterFlood - heapBeforeFlood < 16, `daemon memory bounded: heap after GC +${(heapAfterFlood - heapBeforeFlood).toFixed(1)} MiB over ${mqttAttempts + apiAttempts} flood attempts`);
  for (const c of clients.values()) c.end(true);
});
