/**
 * Pacing of TLS handshakes (broker/handshake-gate.ts through broker/listeners.ts): a reconnect
 * storm of valid devices from one address is admitted in full, a client that leaves while it
 * waits costs nothing and is not charged, and a failed-auth flood from one address is still
 * turned away before the TLS handshake.
 */
import t from 'tap';
import net from 'node:net';
import tls from 'node:tls';
import mqttPacket from 'mqtt-packet';
import type { MqttClient } from 'mqtt';
import { brokerFixture, waitFor, type Device } from '../helpers/broker.js';
import { TestCA } from '../helpers/certs.js';

interface GateFigures {
  in_progress: number;
  queued: number;
  queue_timeouts: number;
  silent_timeouts: number;
  left_while_queued: number;
  max_wait_ms: number;
}
interface StatusFigures {
  refused_total: number;
  turned_away: number;
  sources_over_budget: number;
  handshakes: GateFigures;
  devices_connected: number;
}

t.test('300 mTLS devices connecting at once from one address are all admitted, none refused', async (t) => {
  const N = 300;
  const MAX = 2; // small: mqtt.js clients made in one loop reach the server a few at a time (each costs the client CPU too)
  // a strict budget: a handful of refusals from 127.0.0.1 would turn the rest of the storm away
  const fx = await brokerFixture(t, { overrides: { broker: { limits: { max_handshakes: MAX, refused_per_source_burst: 3, refused_per_source_per_s: 1 } } } });
  const devs: Device[] = [];
  for (let i = 0; i < N; i++) devs.push(await fx.addDevice(`storm-${String(i).padStart(3, '0')}`));
  const st = (): StatusFigures => fx.broker.status() as unknown as StatusFigures;
  let peak = 0;
  let peakQueued = 0;
  const sampler = setInterval(() => {
    const h = st().handshakes;
    peak = Math.max(peak, h.in_progress);
    peakQueued = Math.max(peakQueued, h.queued);
  }, 1);
  const clients = await Promise.allSettled(devs.map((d) => fx.connect({ clientId: d.id, cert: d.cert, key: d.key, extra: { connectTimeout: 60_000 } })));
  clearInterval(sampler);
  const ok = clients.filter((c): c is PromiseFulfilledResult<MqttClient> => c.status === 'fulfilled').map((c) => c.value);
  const failed = clients.filter((c) => c.status === 'rejected').map((c) => String((c as PromiseRejectedResult).reason));
  t.equal(ok.length, N, `every device got its CONNACK (${failed.slice(0, 3).join('; ')})`);
  await waitFor(() => st().devices_connected === N, 10_000, 'every session registered');
  const s = st();
  t.equal(s.refused_total, 0, 'no attempt refused');
  t.equal(s.turned_away, 0, 'no attempt turned away');
  t.equal(s.sources_over_budget, 0, 'the source was never charged');
  t.equal(s.handshakes.queued, 0, 'the queue is empty');
  t.equal(s.handshakes.queue_timeouts, 0);
  t.ok(peak <= MAX, `at most max_handshakes in progress (peak ${peak})`);
  t.ok(peakQueued > 0 || s.handshakes.max_wait_ms > 0, `connections waited their turn (up to ${peakQueued} at once, longest ${s.handshakes.max_wait_ms} ms)`);
  t.equal(fx.logs.find({ msg: 'MQTT connection refused' }).length, 0, 'no refusal logged');
  await Promise.all(ok.map((c) => c.endAsync(true)));
});

t.test('a client that leaves while it waits is dropped from the queue, not charged; a wait over the queue timeout closes it', async (t) => {
  const fx = await brokerFixture(t, {
    overrides: { broker: { limits: { max_handshakes: 1, connect_timeout_ms: 3000, handshake_queue_timeout_ms: 1000, refused_per_source_burst: 3, refused_per_source_per_s: 1 } } },
  });
  const st = (): StatusFigures => fx.broker.status() as unknown as StatusFigures;
  const port = fx.port('tls');
  // holds the only handshake slot: the first byte of a TLS record, then nothing (the handshake waits for the rest)
  const holder = net.connect({ host: '127.0.0.1', port }, () => holder.write(Buffer.from([0x16])));
  holder.on('error', () => undefined);
  t.teardown(() => holder.destroy());
  await waitFor(() => st().handshakes.in_progress === 1, 5000, 'the slot taken');
  // 20 TLS clients that queue (their ClientHello is read and kept) and give up before their turn
  const leavers = Array.from({ length: 20 }, () => {
    const c = tls.connect({ host: '127.0.0.1', port, rejectUnauthorized: false });
    c.on('error', () => undefined);
    return c;
  });
  await waitFor(() => st().handshakes.queued === 20, 5000, '20 waiting');
  for (const c of leavers) c.destroy();
  await waitFor(() => st().handshakes.left_while_queued === 20 && st().handshakes.queued === 0, 5000, 'the leavers dropped from the queue');
  // one more waits past handshake_queue_timeout_ms (the holder still has the slot): closed by the gate
  const late = net.connect({ host: '127.0.0.1', port }, () => late.write(Buffer.from([0x16])));
  late.on('error', () => undefined);
  await new Promise<void>((resolve) => late.once('close', () => resolve()));
  t.equal(st().handshakes.queue_timeouts, 1, 'closed after waiting handshake_queue_timeout_ms');
  t.equal(st().refused_total, 0, 'none of them counted as a refusal');
  t.equal(st().sources_over_budget, 0, 'their source was not charged');
  // the holder gives up in the middle of its handshake: that one is a failed handshake, as before
  holder.destroy();
  await waitFor(() => st().refused_total === 1, 5000, "the holder's abandoned handshake counted");
  // one that connects and says nothing for connect_timeout_ms is closed and charged, as a handshake timeout was
  const mute = net.connect({ host: '127.0.0.1', port });
  mute.on('error', () => undefined);
  await new Promise<void>((resolve) => mute.once('close', () => resolve()));
  t.equal(st().handshakes.silent_timeouts, 1, 'a silent connection is closed after connect_timeout_ms');
  t.equal(st().refused_total, 2, 'and counted against its source like a handshake timeout');
  // the slot is free again: a valid device connects
  const d = await fx.addDevice('after-1');
  const c = await fx.connect({ clientId: d.id, cert: d.cert, key: d.key });
  t.ok(c.connected, 'a valid device connects once the slot is free');
  await c.endAsync(true);
});

/** One MQTT CONNECT over TLS from `localAddress` with a certificate of a foreign CA: 'refused' (CONNACK ≠ 0 / handshake done) or 'turned away' (closed before any TLS byte). */
function foreignAttempt(port: number, localAddress: string, cred: { cert: string; key: string }): Promise<'refused' | 'turned away'> {
  return new Promise((resolve) => {
    let handshaken = false;
    const sock = tls.connect({ socket: net.connect({ host: '127.0.0.1', port, localAddress }), rejectUnauthorized: false, cert: cred.cert, key: cred.key }, () => {
      handshaken = true;
      sock.write(mqttPacket.generate({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 4, clean: true, clientId: 'flood', keepalive: 60 }));
    });
    sock.on('error', () => undefined);
    sock.on('close', () => resolve(handshaken ? 'refused' : 'turned away'));
    sock.on('data', () => sock.destroy());
  });
}

t.test('a failed-auth flood from one address is still turned away before the TLS handshake; another address is not', async (t) => {
  const fx = await brokerFixture(t, { overrides: { broker: { limits: { max_handshakes: 4, refused_per_source_burst: 5, refused_per_source_per_s: 1 } } } });
  const st = (): StatusFigures => fx.broker.status() as unknown as StatusFigures;
  const foreign = await (await TestCA.create({ cn: 'Foreign CA' })).client({ cn: 'flood' });
  const port = fx.port('tls');
  const outcomes = { refused: 0, 'turned away': 0 };
  // 60 attempts, 8 at a time (more than max_handshakes: some of them wait in the queue)
  let next = 0;
  await Promise.all(
    Array.from({ length: 8 }, async () => {
      while (next < 60) {
        next++;
        outcomes[await foreignAttempt(port, '127.0.0.2', foreign)]++;
      }
    }),
  );
  t.ok(outcomes['turned away'] >= 40, `most of the flood turned away before the handshake (${JSON.stringify(outcomes)})`);
  t.ok(outcomes.refused <= 5 + 8, `refusals bounded by the burst and the attempts in flight (${outcomes.refused})`);
  t.ok(st().turned_away >= 40, 'counted as turned away');
  // a valid device from another address is not affected
  const d = await fx.addDevice('valid-1');
  const c = await fx.connect({ clientId: d.id, cert: d.cert, key: d.key });
  t.ok(c.connected, 'a valid device on 127.0.0.1 connects during the limit');
  await c.endAsync(true);
});
