/**
 * Fault suite — an MQTT 3.1.1 fuzzer against a running daemon, from outside.
 * Valid packets (CONNECT, PUBLISH at every QoS, SUBSCRIBE, UNSUBSCRIBE,
 * PINGREQ, PUBREL, DISCONNECT) built with mqtt-packet are mutated (bit flips,
 * truncation, remaining-length lies, type/flag nibbles rewritten, random bytes
 * spliced in, pure garbage) and written over raw TLS sockets (and, in a second
 * case, as binary messages on MQTT/WSS) that present a valid device certificate, so the bytes reach the MQTT parser and the
 * conformance guard instead of stopping at the handshake. For a bounded time
 * (fast ~5 s each, SOAK=full 60 s TLS + 15 s WSS; seed printed, SOAK_SEED
 * replays each worker's sequence of connections) while another
 * device publishes QoS 1 and must keep getting PUBACKs; afterwards the daemon is
 * up, its memory is bounded, violations were logged with a code, and the valid
 * device still publishes.
 */
import t from 'tap';
import { readFileSync } from 'node:fs';
import tls from 'node:tls';
import mqttPacket from 'mqtt-packet';
import { WebSocket } from 'ws';
import { startDaemon, tempDir } from '../helpers/daemon.js';
import { addDevice, Publisher } from '../helpers/fleet.js';
import { FULL, seeded } from '../helpers/soak.js';

t.setTimeout(FULL ? 240_000 : 120_000);

/** Resident memory of a process in bytes (Linux), 0 when unknown. */
function rss(pid: number | undefined): number {
  if (!pid) return 0;
  try {
    const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) * 1024 : 0;
  } catch {
    return 0;
  }
}

type Rnd = () => number;
/** The same linear congruential generator as test/helpers/soak.ts seeded(), from a given seed. */
function lcg(seed: number): Rnd {
  let s = seed % 2 ** 31;
  return () => {
    s = (s * 1103515245 + 12345) % 2 ** 31;
    return s / 2 ** 31;
  };
}
const pick = <T>(rnd: Rnd, xs: readonly T[]): T => xs[Math.floor(rnd() * xs.length)]!;
const int = (rnd: Rnd, n: number): number => Math.floor(rnd() * n);

/** Valid MQTT 3.1.1 packets of the fuzzing device (its own namespace and others'). */
function validPackets(id: string, rnd: Rnd): { connect: Buffer; others: Buffer[] } {
  const g = (p: object): Buffer => mqttPacket.generate(p as mqttPacket.Packet);
  const topic = pick(rnd, [`devices/${id}/fuzz`, 'devices/victim/seq', '#', '$SYS/x', `devices/${id}/+`, '']);
  const payload = Buffer.alloc(int(rnd, 200), 0x61);
  return {
    connect: g({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 4, clean: rnd() < 0.5, clientId: id, keepalive: pick(rnd, [0, 5, 60, 65535]) }),
    others: [
      g({ cmd: 'publish', topic, payload, qos: 0, retain: false, dup: false }),
      g({ cmd: 'publish', topic: `devices/${id}/fuzz`, payload, qos: 1, messageId: 1 + int(rnd, 65535), retain: rnd() < 0.2, dup: rnd() < 0.2 }),
      g({ cmd: 'publish', topic, payload, qos: 2, messageId: 1 + int(rnd, 65535), retain: false, dup: false }),
      g({ cmd: 'subscribe', messageId: 1 + int(rnd, 65535), subscriptions: [{ topic: topic || 'x', qos: int(rnd, 3) as 0 | 1 | 2 }] }),
      g({ cmd: 'unsubscribe', messageId: 1 + int(rnd, 65535), unsubscriptions: [topic || 'x'] }),
      g({ cmd: 'pubrel', messageId: 1 + int(rnd, 65535) }),
      g({ cmd: 'pingreq' }),
      g({ cmd: 'disconnect' }),
    ],
  };
}

/** The remaining-length varint of an MQTT packet: [offset of the body, value]. */
function remainingLength(b: Buffer): [number, number] {
  let v = 0;
  let mul = 1;
  let i = 1;
  for (; i < Math.min(b.length, 5); i++) {
    v += (b[i]! & 0x7f) * mul;
    mul *= 128;
    if ((b[i]! & 0x80) === 0) return [i + 1, v];
  }
  return [i, v];
}

function encodeLength(n: number): Buffer {
  const out: number[] = [];
  do {
    let byte = n % 128;
    n = Math.floor(n / 128);
    if (n > 0) byte |= 0x80;
    out.push(byte);
  } while (n > 0 && out.length < 4);
  return Buffer.from(out);
}

const MUTATIONS = ['bitflip', 'truncate', 'length-lie', 'type-nibble', 'splice-random', 'garbage', 'intact'] as const;
type Mutation = (typeof MUTATIONS)[number];

function mutate(p: Buffer, rnd: Rnd, kind: Mutation): Buffer {
  const b = Buffer.from(p);
  switch (kind) {
    case 'bitflip':
      for (let k = 1 + int(rnd, 8); k > 0; k--) {
        const i = int(rnd, b.length);
        b[i] = b[i]! ^ (1 << int(rnd, 8));
      }
      return b;
    case 'truncate':
      return b.subarray(0, int(rnd, b.length));
    case 'length-lie': {
      const [body, len] = remainingLength(b);
      // shorter, longer, the 4-byte maximum (268 435 455), or a non-terminating 5-byte varint
      const lie = pick(rnd, [Math.max(0, len - 1 - int(rnd, 10)), len + 1 + int(rnd, 1000), 268_435_455, -1]);
      const enc = lie < 0 ? Buffer.from([0xff, 0xff, 0xff, 0xff, 0x7f]) : encodeLength(lie);
      return Buffer.concat([b.subarray(0, 1), enc, b.subarray(body)]);
    }
    case 'type-nibble':
      b[0] = int(rnd, 256);
      return b;
    case 'splice-random': {
      const at = int(rnd, b.length + 1);
      const junk = Buffer.from(Array.from({ length: 1 + int(rnd, 64) }, () => int(rnd, 256)));
      return Buffer.concat([b.subarray(0, at), junk, b.subarray(at)]);
    }
    case 'garbage':
      return Buffer.from(Array.from({ length: 1 + int(rnd, 512) }, () => int(rnd, 256)));
    default:
      return b;
  }
}

interface Tally {
  connections: number;
  packets: number;
  bytes: number;
  closedByServer: number;
  timedOut: number;
  handshakeFailed: number;
  byMutation: Record<string, number>;
}

type Transport = 'tls' | 'wss';

/**
 * One fuzz connection: a (maybe mutated) CONNECT then 1–6 mutated packets; ends when the server closes or after
 * `holdMs`. Over TLS the bytes are split at random points; over WSS each random piece is one binary message.
 */
function fuzzOnce(transport: Transport, port: number, creds: { ca: Buffer; cert: Buffer; key: Buffer }, id: string, rnd: Rnd, tally: Tally, holdMs: number): Promise<void> {
  const { connect, others } = validPackets(id, rnd);
  const out: Buffer[] = [];
  const first = rnd() < 0.5 ? 'intact' : pick(rnd, MUTATIONS);
  out.push(mutate(connect, rnd, first));
  tally.byMutation[first] = (tally.byMutation[first] ?? 0) + 1;
  for (let k = 1 + int(rnd, 6); k > 0; k--) {
    const m = pick(rnd, MUTATIONS);
    tally.byMutation[m] = (tally.byMutation[m] ?? 0) + 1;
    out.push(mutate(pick(rnd, others), rnd, m));
  }
  const pieces = (all: Buffer): Buffer[] => {
    const out: Buffer[] = [];
    for (let at = 0; at < all.length; ) {
      const n = 1 + int(rnd, all.length - at);
      out.push(all.subarray(at, at + n));
      at += n;
    }
    return out;
  };
  // both transports: the bytes split at random points (the parser must handle any fragmentation), counted
  const sendAll = (write: (piece: Buffer) => void): void => {
    tally.connections++;
    const all = Buffer.concat(out);
    tally.packets += out.length;
    tally.bytes += all.length;
    for (const piece of pieces(all)) write(piece);
  };
  const ended = (opened: boolean, gaveUp: boolean): void => {
    if (!opened) tally.handshakeFailed++;
    else if (!gaveUp) tally.closedByServer++;
  };
  if (transport === 'wss') {
    return new Promise((resolve) => {
      let open = false;
      let gaveUp = false;
      const ws = new WebSocket(`wss://127.0.0.1:${port}/mqtt`, 'mqtt', { ca: creds.ca, cert: creds.cert, key: creds.key });
      const timer = setTimeout(() => {
        gaveUp = true;
        tally.timedOut++;
        ws.terminate();
      }, holdMs);
      ws.on('open', () => {
        open = true;
        sendAll((piece) => ws.send(piece));
      });
      ws.on('error', () => undefined);
      ws.on('close', () => {
        clearTimeout(timer);
        ended(open, gaveUp);
        resolve();
      });
    });
  }
  return new Promise((resolve) => {
    let secure = false;
    const s = tls.connect({ host: '127.0.0.1', port, ca: creds.ca, cert: creds.cert, key: creds.key, servername: 'localhost' }, () => {
      secure = true;
      sendAll((piece) => s.write(piece));
    });
    let gaveUp = false;
    const timer = setTimeout(() => {
      gaveUp = true;
      tally.timedOut++;
      s.destroy();
    }, holdMs);
    s.on('data', () => undefined);
    s.on('error', () => undefined);
    s.on('close', () => {
      clearTimeout(timer);
      ended(secure, gaveUp);
      resolve();
    });
    s.on('end', () => s.end());
  });
}

for (const transport of ['tls', 'wss'] as const) {
  t.test(`MQTT fuzzer over ${transport.toUpperCase()} with a valid device certificate: daemon up, memory bounded, a valid device keeps its PUBACKs`, async (t) => {
    const rnd = seeded();
    // the full minute goes to MQTT/TLS; MQTT/WSS (the same parser behind WebSocket framing) gets a quarter of it
    const durationMs = (FULL ? 60_000 : 5_000) / (transport === 'tls' ? 1 : FULL ? 4 : 1);
    t.comment(`MQTT/${transport} fuzzer seed ${rnd.seed} (replay with SOAK_SEED=${rnd.seed}), ${durationMs} ms`);
    // this case hunts for parser faults, so the per-source refusal budget (which turns a source that keeps
    // failing away before its TLS handshake — test/soak/load.test.ts holds it) is off: every mutant reaches
    // the parser, however many the run sends from 127.0.0.1
    const d = await startDaemon(t, { dir: tempDir(t, 'ec-soak-mqttfuzz-'), config: { broker: { limits: { refused_per_source_per_s: 0 } } } });
    const victim = await addDevice(d, 'victim');
    const fuzzer = await addDevice(d, 'fuzzer');
    const creds = { ca: readFileSync(fuzzer.ca), cert: readFileSync(fuzzer.cert), key: readFileSync(fuzzer.key) };
    const pub = new Publisher(victim);
    await pub.run(d);
    await pub.waitAcked(20, 20_000);
    const pid = d.proc.pid;
    const rssBefore = rss(pid);
    let rssMax = rssBefore;
    const tally: Tally = { connections: 0, packets: 0, bytes: 0, closedByServer: 0, timedOut: 0, handshakeFailed: 0, byMutation: {} };
    const ackedAtStart = pub.acked.length;
    // progress of the valid device, sampled every 2 s (tight enough to catch a stalled device, loose enough
    // for a 2-core machine under a full test run): it must advance in every window
    const stalls: string[] = [];
    let lastAcked = ackedAtStart;
    const sampler = setInterval(() => {
      rssMax = Math.max(rssMax, rss(pid));
      if (pub.acked.length === lastAcked) stalls.push(`no PUBACK for the valid device for 2 s after ${lastAcked}`);
      lastAcked = pub.acked.length;
    }, 2000);
    const deadline = Date.now() + durationMs;
    // four concurrent fuzz connections: enough to overlap parsers on a 2-core machine shared with other tests
    const WORKERS = 4;
    // a connection the server neither answers nor closes is given up after this long (a length lie makes the parser wait for bytes that never come)
    const HOLD_MS = 400;
    await Promise.all(
      Array.from({ length: WORKERS }, async (_, w) => {
        // each worker its own generator derived from the printed seed: a replay gives every worker the same
        // sequence of connections whatever the timing (only how many fit in the time varies)
        const next = lcg(rnd.seed + w * 7919);
        // bounded in count as well as time
        for (let i = 0; i < 100_000 && Date.now() < deadline; i++) await fuzzOnce(transport, transport === 'tls' ? d.ports.mqtt_tls! : d.ports.mqtt_wss!, creds, fuzzer.id, next, tally, HOLD_MS);
      }),
    );
    clearInterval(sampler);
    rssMax = Math.max(rssMax, rss(pid));
    const ackedDuring = pub.acked.length - ackedAtStart;
    t.equal(d.proc.exitCode, null, 'the daemon is still running');
    t.ok(pub.running, 'the valid device was never disconnected');
    t.same(stalls, [], 'the valid device got PUBACKs in every 2 s window of the fuzzing');
    await pub.waitAcked(pub.acked.length + 50, 20_000);
    t.pass('the valid device publishes 50 more messages after the fuzzing');
    const violations = d.logs.filter((l) => l.code === 'ECONN_MQTT_PROTOCOL').length;
    const codes = new Map<string, number>();
    for (const l of d.logs) if (typeof l.code === 'string') codes.set(l.code, (codes.get(l.code) ?? 0) + 1);
    const mib = (n: number): string => (n / 1048576).toFixed(1);
    t.comment(
      `MQTT/${transport} fuzzer (seed ${rnd.seed}): ${tally.connections} connections, ${tally.packets} packets, ${tally.bytes} bytes in ${durationMs} ms; ` +
        `server closed ${tally.closedByServer}, held to ${HOLD_MS} ms ${tally.timedOut}, handshake failed ${tally.handshakeFailed}; ` +
        `mutations ${JSON.stringify(tally.byMutation)}; log codes ${JSON.stringify(Object.fromEntries(codes))}; ` +
        `valid device PUBACKs during ${ackedDuring}; daemon RSS ${mib(rssBefore)} MiB before, ${mib(rssMax)} MiB max`,
    );
    t.ok(tally.connections >= (FULL ? 200 : 20), `the fuzzer got through the handshake often enough (${tally.connections})`);
    const errors = d.logs.filter((l) => Number(l.level) >= 50 || l.code === 'ECONN_INTERNAL').map((l) => `${String(l.code)} ${String(l.msg)}`);
    t.same(errors.slice(0, 5), [], `no error-level or internal-error log line (${errors.length})`);
    t.ok(violations > 0, `protocol violations are logged with code ECONN_MQTT_PROTOCOL (${violations})`);
    // what the daemon holds per connection is small; a leak per fuzz connection would show as tens of MiB after thousands
    if (rssBefore > 0) t.ok(rssMax - rssBefore < 128 * 1048576, `daemon memory bounded: +${mib(rssMax - rssBefore)} MiB (limit 128 MiB)`);
    await pub.finish();
  });
}
