#!/usr/bin/env node
/**
 * Load generator of the reconnect-storm case (bench/storm.mjs), one of several child processes:
 * idle MQTT 3.1.1 devices over mTLS, written against node:tls directly (an mqtt.js client costs
 * far more memory and CPU than the connection it measures). Each device: TLS with its own
 * certificate (one SecureContext per device, built once and reused; no session resumption),
 * CONNECT (clean session, keepalive 1000 s: idle), wait for CONNACK. When its connection ends
 * or an attempt fails it reconnects with its own backoff (1 s doubling to 8 s, 50–100 % jitter),
 * as a device does. Each attempt is bounded (30 s, like mqtt.js's connectTimeout).
 *
 * Parent → child (IPC): {cmd: 'start', port, ca, devices: [{id, cert, key, localAddress?}]}, {cmd: 'stop'}
 * (localAddress: the loopback address a device connects from, 127.0.0.1 when absent).
 * Child → parent: {connected, counts} every 200 ms; counts by outcome of ended attempts:
 *   refused (CONNACK code ≠ 0: the daemon refused a valid device), tls (TCP connected, handshake
 *   failed or closed before it finished), noConnack (handshake done, closed before CONNACK),
 *   down (connection refused / reset at connect: no daemon listening), timeout (30 s bound),
 *   dropped (a connected device's connection ended); timeouts split by where they were stuck
 *   (stuckTcp: TCP not connected, stuckTls: handshake not done, stuckConnack: no CONNACK).
 */
import tls from 'node:tls';

const ATTEMPT_MS = 30_000;
let port = 0;
let stopped = false;
let connected = 0;
const counts = { refused: 0, tls: 0, noConnack: 0, down: 0, timeout: 0, dropped: 0, attempts: 0 };
/** where the attempts over ATTEMPT_MS were: TCP not connected, TLS handshake not done, no CONNACK */
const stuck = { tcp: 0, tls: 0, connack: 0 };
const lastErr = {};

function connectPacket(id) {
  const idb = Buffer.from(id, 'utf8');
  // fixed header 0x10, remaining length; variable header: "MQTT", level 4, flags 0x02 (clean), keepalive 1000
  const vh = Buffer.from([0, 4, 0x4d, 0x51, 0x54, 0x54, 4, 0x02, 0x03, 0xe8]);
  const rem = vh.length + 2 + idb.length;
  return Buffer.concat([Buffer.from([0x10, rem]), vh, Buffer.from([idb.length >> 8, idb.length & 0xff]), idb]);
}

function attempt(dev) {
  if (stopped) return;
  counts.attempts++;
  let secure = false;
  let up = false;
  let ended = false;
  let buf = Buffer.alloc(0);
  const sock = tls.connect({ host: '127.0.0.1', port, secureContext: dev.ctx, servername: 'localhost', rejectUnauthorized: true, ...(dev.localAddress ? { localAddress: dev.localAddress } : {}) });
  const timer = setTimeout(() => {
    stuck[sock.connecting ? 'tcp' : secure ? 'connack' : 'tls']++;
    end('timeout');
  }, ATTEMPT_MS);
  const end = (why, err) => {
    if (ended) return;
    ended = true;
    clearTimeout(timer);
    sock.destroy();
    if (up) {
      connected--;
      counts.dropped++;
      dev.failures = 0;
    } else {
      counts[why]++;
      if (err) lastErr[why] = err;
      dev.failures++;
    }
    if (stopped) return;
    const base = Math.min(8000, 1000 * 2 ** Math.min(3, dev.failures));
    setTimeout(() => attempt(dev), base * (0.5 + Math.random() * 0.5)).unref?.();
  };
  sock.on('secureConnect', () => {
    secure = true;
    sock.write(dev.connect);
  });
  sock.on('data', (b) => {
    if (up) return;
    buf = buf.length ? Buffer.concat([buf, b]) : b;
    if (buf.length < 4) return;
    if (buf[0] !== 0x20 || buf[3] !== 0) return end('refused', `CONNACK ${buf[3]}`);
    up = true;
    clearTimeout(timer);
    connected++;
  });
  sock.on('error', (e) => {
    if (!secure && (e.code === 'ECONNREFUSED' || (e.code === 'ECONNRESET' && sock.bytesWritten === 0))) return end('down', e.code);
    if (!secure) return end('tls', e.code ?? e.message);
    return end(up ? 'dropped' : 'noConnack', e.code ?? e.message);
  });
  sock.on('close', () => end(secure ? 'noConnack' : sock.connecting ? 'down' : 'tls', 'closed'));
}

process.on('message', (m) => {
  if (m.cmd === 'start') {
    port = m.port;
    for (const d of m.devices) {
      const dev = { id: d.id, failures: 0, connect: connectPacket(d.id), ctx: tls.createSecureContext({ ca: m.ca, key: d.key, cert: d.cert }), localAddress: d.localAddress };
      attempt(dev);
    }
  } else if (m.cmd === 'stop') {
    stopped = true;
    process.exit(0);
  }
});
setInterval(() => process.send?.({ connected, counts: { ...counts, stuckTcp: stuck.tcp, stuckTls: stuck.tls, stuckConnack: stuck.connack }, lastErr }), 200);
process.on('disconnect', () => process.exit(0));
