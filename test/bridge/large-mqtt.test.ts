/**
 * Large MQTT publishes end to end, real processes on loopback: devices (mqtt.js and a raw TLS
 * client) → broker → journal blob → uplink in chunks → the reference cloud → `connector cloud
 * tail`, digests compared. The in-flight budget for large publishes is made to fill
 * deterministically: a device sends the header and the start of a 60 MiB publish and then stops,
 * so its bytes stay granted while four 16 MiB publishes from other devices must wait, and a small
 * QoS 1 message from a fifth device is acknowledged and delivered meanwhile. Every wait is bounded.
 */
import t from 'tap';
import tls from 'node:tls';
import { createHash, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import mqttPacket from 'mqtt-packet';
import { runCli, tempDir, type DaemonHandle, type TestLike } from '../helpers/daemon.js';
import { addDevice, mqttConnect, startSite, tail, type DeviceFiles } from '../helpers/fleet.js';

const MiB = 1024 * 1024;
const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

interface BudgetStatus {
  limit_bytes: number;
  in_flight_bytes: number;
  waiting: number;
  waits_total: number;
}

async function budget(d: DaemonHandle): Promise<BudgetStatus> {
  const r = await runCli(['status', '--json', '-c', d.configFile], { cwd: d.dir });
  const s = JSON.parse(r.stdout) as { components: { broker: { large_publishes: BudgetStatus } } };
  return s.components.broker.large_publishes;
}

/** Ask `connector status` until pred holds: at most 60 times and 60 s. */
async function untilBudget(d: DaemonHandle, pred: (b: BudgetStatus) => boolean, what: string): Promise<BudgetStatus> {
  const end = Date.now() + 60_000;
  let last: BudgetStatus | undefined;
  for (let i = 0; i < 60 && Date.now() < end; i++) {
    last = await budget(d);
    if (pred(last)) return last;
  }
  throw new Error(`timed out waiting for ${what}; last budget status: ${JSON.stringify(last)}`);
}

/** A device speaking raw MQTT over mTLS, to send a PUBLISH in two parts with a pause between. */
async function rawDevice(t: TestLike, d: DaemonHandle, dev: DeviceFiles): Promise<{ sock: tls.TLSSocket; packets: mqttPacket.Packet[]; wait: (cmd: string) => Promise<void> }> {
  const sock = tls.connect({ host: '127.0.0.1', port: d.ports.mqtt_tls!, ca: readFileSync(dev.ca), cert: readFileSync(dev.cert), key: readFileSync(dev.key) });
  t.teardown(() => sock.destroy());
  sock.on('error', () => undefined);
  const packets: mqttPacket.Packet[] = [];
  const parser = mqttPacket.parser({ protocolVersion: 4 });
  const waiters: Array<() => void> = [];
  parser.on('packet', (p) => {
    packets.push(p);
    for (const w of waiters.splice(0)) w();
  });
  sock.on('data', (b: Buffer) => parser.parse(b));
  const wait = (cmd: string): Promise<void> =>
    new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no ${cmd} within 60 s`)), 60_000);
      const check = (): void => {
        if (packets.some((p) => p.cmd === cmd)) {
          clearTimeout(timer);
          resolve();
        } else waiters.push(check);
      };
      check();
    });
  await new Promise<void>((resolve, reject) => {
    sock.once('secureConnect', resolve);
    sock.once('error', reject);
  });
  sock.write(mqttPacket.generate({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 4, clean: true, clientId: dev.id, keepalive: 120 }));
  await wait('connack');
  return { sock, packets, wait };
}

t.test('a 64 MiB publish and four concurrent 16 MiB ones reach the cloud intact; the budget makes them wait, small messages flow', async (t) => {
  const dir = tempDir(t, 'ec-large-');
  // the 64 MiB payload needs the limit raised; the budget keeps its default (64 MiB)
  const site = await startSite(t, dir, { over: { broker: { limits: { max_payload_bytes: 64 * MiB } } } });
  const d = site.d;
  const ids = ['stall', 'f1', 'f2', 'f3', 'f4', 'small', 'big'];
  const devs = new Map<string, DeviceFiles>();
  for (const id of ids) devs.set(id, await addDevice(d, id));
  t.equal((await budget(d)).limit_bytes, 64 * MiB, 'default budget 64 MiB');

  // 1. a device announces 60 MiB and sends only the first 64 KiB: 60 MiB of the budget stay granted
  const raw = await rawDevice(t, d, devs.get('stall')!);
  const stallPayload = randomBytes(60 * MiB);
  const stallPacket = mqttPacket.generate({ cmd: 'publish', topic: 'devices/stall/frame', payload: stallPayload, qos: 1, messageId: 1, dup: false, retain: false });
  raw.sock.write(stallPacket.subarray(0, 64 * 1024));
  await untilBudget(d, (b) => b.in_flight_bytes >= 60 * MiB, '60 MiB granted');

  // 2. four 16 MiB publishes: none fits beside it, all four wait (their sockets are not read)
  const frames = new Map<string, Buffer>();
  const clients = await Promise.all(['f1', 'f2', 'f3', 'f4'].map((id) => mqttConnect(d, devs.get(id)!)));
  t.teardown(() => Promise.all(clients.map((c) => c.endAsync(true).catch(() => undefined))));
  const acks = clients.map((c, i) => {
    const p = randomBytes(16 * MiB);
    frames.set(`devices/f${i + 1}/frame`, p);
    return c.publishAsync(`devices/f${i + 1}/frame`, p, { qos: 1 });
  });
  const waiting = await untilBudget(d, (b) => b.waiting === 4, 'four publishes waiting');
  t.ok(waiting.in_flight_bytes < 64 * MiB + MiB, 'nothing more granted while they wait');

  // 3. meanwhile a small QoS 1 message from another device is acknowledged (journaled)
  const small = await mqttConnect(d, devs.get('small')!);
  t.teardown(() => small.endAsync(true).catch(() => undefined));
  await small.publishAsync('devices/small/telemetry', 'still flowing', { qos: 1 });
  t.equal((await budget(d)).waiting, 4, 'PUBACK of the small message while the four still wait');

  // 4. the stalled device finishes: its publish is journaled and acknowledged, the four follow
  raw.sock.write(stallPacket.subarray(64 * 1024));
  await raw.wait('puback');
  await Promise.all(acks);
  t.pass('the four 16 MiB publishes were acknowledged');

  // 5. a 64 MiB publish (over the budget once its header is counted) passes alone
  const big = await mqttConnect(d, devs.get('big')!);
  t.teardown(() => big.endAsync(true).catch(() => undefined));
  const bigPayload = randomBytes(64 * MiB);
  await big.publishAsync('devices/big/frame', bigPayload, { qos: 1 });
  t.pass('64 MiB publish acknowledged');

  // 6. the cloud subscriber sees all of them, each with its size and SHA-256
  const expected = new Map<string, Buffer>([...frames, ['devices/stall/frame', stallPayload], ['devices/big/frame', bigPayload], ['devices/small/telemetry', Buffer.from('still flowing')]]);
  const got = await tail(t, site.cloud, (m) => [...expected.keys()].every((topic) => m.some((x) => x.topic === topic)), 'all seven messages', 120_000);
  for (const [topic, payload] of expected) {
    const m = got.find((x) => x.topic === topic)!;
    t.equal(m.size, payload.length, `${topic}: size`);
    t.equal(m.sha256, sha(payload), `${topic}: SHA-256 matches end to end`);
  }
  const after = await budget(d);
  t.match(after, { in_flight_bytes: 0, waiting: 0 }, 'everything given back');
  t.ok(after.waits_total >= 4, `publishes that waited: ${after.waits_total} (the 64 MiB one came to an empty budget)`);
  try {
    const st = readFileSync(`/proc/${d.proc.pid}/status`, 'utf8');
    t.comment(`connector peak RSS ${/VmHWM:\s+(\d+ kB)/.exec(st)?.[1] ?? '?'}, now ${/VmRSS:\s+(\d+ kB)/.exec(st)?.[1] ?? '?'} (not asserted: bench measures memory)`);
  } catch {
    // /proc is Linux only; the figure is informative
  }
});
