/**
 * The load generator of `npm run bench`: mqtt.js devices (mTLS, a TLS context
 * built once per device and reused, TCP_NODELAY), open-loop and closed-loop
 * publishing, and the receiving side (a cloud subscriber) that measures
 * publish → subscriber latency from a timestamp carried in every payload.
 *
 * Payload layout (little endian), padded to the case's size:
 *   [0,8)  f64 send time (performance.now() of this process, ms)
 *   [8,12) u32 case id     [12,16) u32 device index     [16,20) u32 sequence within the case
 */
import tls from 'node:tls';
import { performance } from 'node:perf_hooks';
import mqtt from 'mqtt';

export const HEADER = 20;

/** Connect `files` ({id, ca, cert, key}) as mqtt.js clients to mqtts://127.0.0.1:port. */
export async function connectDevices(port, files, { topic = (id) => `devices/${id}/telemetry`, wssPath } = {}) {
  return Promise.all(
    files.map(
      (f, idx) =>
        new Promise((resolve, reject) => {
          // wssPath: MQTT over secure WebSocket (the same client certificate), else MQTT over TLS
          const c = mqtt.connect(wssPath ? `wss://127.0.0.1:${port}${wssPath}` : `mqtts://127.0.0.1:${port}`, {
            clientId: f.id,
            ...(wssPath
              ? { ca: f.ca, cert: f.cert, key: f.key, servername: 'localhost' }
              : { secureContext: tls.createSecureContext({ ca: f.ca, cert: f.cert, key: f.key, minVersion: 'TLSv1.2' }) }),
            rejectUnauthorized: true,
            protocolVersion: 4,
            clean: true,
            reconnectPeriod: 0,
            keepalive: 60,
            connectTimeout: 30_000,
          });
          const t = setTimeout(() => reject(new Error(`device ${f.id}: no CONNACK from port ${port} within 30 s`)), 30_000);
          c.once('connect', () => {
            clearTimeout(t);
            c.stream.setNoDelay?.(true);
            // a broker stopping later must not crash the bench with an unhandled 'error'
            c.on('error', () => {});
            resolve({ client: c, idx, id: f.id, topic: topic(f.id), inflight: 0 });
          });
          c.once('error', (err) => {
            clearTimeout(t);
            reject(new Error(`device ${f.id}: ${err.message}`));
          });
        }),
    ),
  );
}

export function endDevices(devices) {
  for (const d of devices ?? []) d.client.end(true);
}

let nextCaseId = 1;

/**
 * One measured case. The receiver side calls `c.receive(buf)` for every payload
 * of this case; the publisher side fills `sendT`.
 */
export function newCase(max) {
  return {
    id: nextCaseId++,
    max,
    sent: 0,
    sendT: new Float64Array(max), // send time per sequence number
    recvT: new Float64Array(max), // receive time per sequence number (0 = not yet)
    acked: 0,
    ackT: [], // PUBACK (or write, QoS 0) times
    ackAt: new Float64Array(max), // PUBACK time per sequence number (0 = not acknowledged); open and closed loop only
    received: 0,
    duplicates: 0,
    onReceive: undefined,
  };
}

/**
 * Route a received payload to the case it belongs to: `current`, or one of
 * `also` (earlier cases whose messages may still arrive, e.g. a backlog).
 */
export function makeReceiver() {
  const r = {
    current: undefined,
    also: [],
    stray: 0,
    receive(buf) {
      const now = performance.now();
      if (buf.length < HEADER) return void r.stray++;
      const caseId = buf.readUInt32LE(8);
      const c = r.current?.id === caseId ? r.current : r.also.find((x) => x.id === caseId);
      if (!c) return void r.stray++;
      const seq = buf.readUInt32LE(16);
      if (seq >= c.max) return void r.stray++;
      if (c.recvT[seq] !== 0) return void c.duplicates++;
      c.recvT[seq] = now;
      c.received++;
      c.onReceive?.(buf.readUInt32LE(12));
    },
  };
  return r;
}

function payloadFor(c, size, devIdx, seq) {
  const b = Buffer.alloc(size < HEADER ? HEADER : size, 0x61);
  const t = performance.now();
  b.writeDoubleLE(t, 0);
  b.writeUInt32LE(c.id, 8);
  b.writeUInt32LE(devIdx, 12);
  b.writeUInt32LE(seq, 16);
  c.sendT[seq] = t;
  return b;
}

function publishOne(c, d, size, qos) {
  const seq = c.sent++;
  d.inflight++;
  d.client.publish(d.topic, payloadFor(c, size, d.idx, seq), { qos }, (err) => {
    d.inflight--;
    if (!err) {
      const t = performance.now();
      c.acked++;
      c.ackT.push(t);
      c.ackAt[seq] = t;
    }
  });
}

/**
 * Open loop: `rate` msg/s in total, spread round-robin over the devices, for
 * `seconds` (warm-up included), at most `c.max` messages. A device with
 * `maxInflight` unacknowledged publishes is skipped (the load generator does not
 * queue without bound); a schedule more than 250 ms behind drops what is older.
 * Both show up as an achieved rate below the asked one — reported, never hidden.
 * `stop()` (optional, asked every tick) ends it before `seconds`.
 */
export function openLoop(c, devices, { rate, size, qos, seconds, maxInflight = 5000, stop }) {
  return new Promise((resolve) => {
    const t0 = performance.now();
    let due = 0; // messages the schedule asked for so far
    let skipped = 0;
    let rr = 0;
    const timer = setInterval(() => {
      const el = performance.now() - t0;
      if (el >= seconds * 1000 || c.sent >= c.max || stop?.()) {
        clearInterval(timer);
        resolve({ t0, t1: performance.now(), skipped });
        return;
      }
      const target = Math.floor((el / 1000) * rate);
      const slack = Math.floor(rate * 0.25); // at most 250 ms of schedule is caught up
      if (target - due > slack) {
        skipped += target - due - slack;
        due = target - slack;
      }
      while (due < target && c.sent < c.max) {
        let tries = 0;
        while (devices[rr % devices.length].inflight >= maxInflight && tries < devices.length) {
          rr++;
          tries++;
        }
        due++;
        if (tries === devices.length) {
          skipped++;
          continue;
        }
        publishOne(c, devices[rr++ % devices.length], size, qos);
      }
    }, 1);
  });
}

/**
 * Closed loop, end to end: each device keeps `window` messages published but
 * not yet seen by the cloud subscriber; a receipt releases the next publish.
 * Runs `seconds` or until `c.max` messages are sent.
 */
export function closedLoop(c, devices, { window, size, qos, seconds }) {
  return new Promise((resolve) => {
    const t0 = performance.now();
    let running = true;
    const outstanding = new Int32Array(devices.length);
    const pump = (i) => {
      while (running && outstanding[i] < window && c.sent < c.max) {
        outstanding[i]++;
        publishOne(c, devices[i], size, qos);
      }
    };
    c.onReceive = (devIdx) => {
      if (devIdx < outstanding.length) outstanding[devIdx]--;
      if (running) pump(devIdx);
    };
    for (let i = 0; i < devices.length; i++) pump(i);
    const check = setInterval(() => {
      if (c.sent >= c.max || performance.now() - t0 >= seconds * 1000) {
        clearInterval(check);
        running = false;
        c.onReceive = undefined;
        resolve({ t0, t1: performance.now(), skipped: 0 });
      }
    }, 5);
  });
}

/**
 * Closed loop on PUBACK only (the write path: nothing has to reach the cloud):
 * each device keeps `window` publishes without PUBACK; stops after `count`
 * messages or `seconds`.
 */
export function ackLoop(c, devices, { window, size, qos = 1, seconds, count }) {
  return new Promise((resolve) => {
    const t0 = performance.now();
    let running = true;
    const limit = Math.min(count, c.max);
    let done = false;
    const finish = () => {
      if (done) return;
      done = true;
      running = false;
      const wait = () => (devices.every((d) => d.inflight === 0) || performance.now() - t0 > seconds * 1000 + 30_000 ? resolve({ t0, t1: performance.now() }) : setTimeout(wait, 5));
      wait();
    };
    const pump = (d) => {
      while (running && d.inflight < window && c.sent < limit) {
        const seq = c.sent++;
        d.inflight++;
        d.client.publish(d.topic, payloadFor(c, size, d.idx, seq), { qos }, (err) => {
          d.inflight--;
          if (!err) c.acked++;
          if (c.sent >= limit) finish();
          else pump(d);
        });
      }
    };
    for (const d of devices) pump(d);
    setTimeout(finish, seconds * 1000);
  });
}

/** Wait (bounded) until every message of the case was received, or `ms` pass. */
export async function drain(c, ms) {
  const end = performance.now() + ms;
  while (c.received < c.sent && performance.now() < end) await new Promise((r) => setTimeout(r, 20));
  return c.received >= c.sent;
}

/** p-th percentile of a sorted array. */
export function pct(sorted, p) {
  if (!sorted.length) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

/**
 * Statistics of a case between tw and te (performance.now() ms): messages sent,
 * PUBACKed and received inside the window, and the latency of the messages sent
 * inside it (each only if it arrived).
 */
export function stats(c, tw, te) {
  let sentW = 0;
  let recvW = 0;
  let lostW = 0;
  const lat = [];
  for (let i = 0; i < c.sent; i++) {
    const s = c.sendT[i];
    const r = c.recvT[i];
    if (r >= tw && r < te) recvW++;
    if (s >= tw && s < te) {
      sentW++;
      if (r) lat.push(r - s);
      else lostW++;
    }
  }
  let ackW = 0;
  for (const t of c.ackT) if (t >= tw && t < te) ackW++;
  lat.sort((a, b) => a - b);
  return { sentW, recvW, ackW, notArrived: lostW, p50: pct(lat, 50), p99: pct(lat, 99), samples: lat.length };
}
