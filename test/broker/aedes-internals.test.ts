/**
 * Every aedes internal the broker relies on (broker/aedes-internals.ts), exercised against the
 * installed aedes with real sockets on 127.0.0.1: an aedes upgrade that renames or changes one
 * of them fails here, loudly, instead of silently breaking commands, revocation or reload.
 * The last case reads the member lists of broker/aedes-internals.ts and fails if one of them
 * was not exercised above, so a new internal cannot be added without a check here.
 */
import t, { type Test } from 'tap';
import net from 'node:net';
import { once } from 'node:events';
import { Aedes, type AedesOptions, type Client } from 'aedes';
import mqtt from 'mqtt-packet';
import type { Packet } from 'mqtt-packet';
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { aedesInternals, aedesMqttPacket, clientInternals, takeNextPacketId } from '../../broker/aedes-internals.js';

/** `Interface.member` of every internal a case below checked against the installed aedes. */
const exercised = new Set<string>();

interface Harness {
  aedes: Aedes;
  port: number;
  /** the aedes Client of the n-th accepted connection, once aedes created it */
  clients: Client[];
}

async function harness(t: Test, opts: AedesOptions = {}): Promise<Harness> {
  const aedes = await Aedes.createBroker(opts);
  const clients: Client[] = [];
  const sockets = new Set<net.Socket>();
  const server = net.createServer((s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
    clients.push(aedes.handle(s));
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  t.teardown(async () => {
    for (const s of sockets) s.destroy();
    await new Promise<void>((r) => server.close(() => r()));
    await new Promise<void>((r) => aedes.close(() => r()));
  });
  return { aedes, port: (server.address() as net.AddressInfo).port, clients };
}

interface Raw {
  sock: net.Socket;
  received: Packet[];
  send(p: Packet): void;
  /** resolves with the first received packet matching `pred` (rejects after ms) */
  next(pred: (p: Packet) => boolean, ms?: number): Promise<Packet>;
  closed: Promise<void>;
}

async function raw(t: Test, port: number): Promise<Raw> {
  const sock = net.connect(port, '127.0.0.1');
  t.teardown(() => sock.destroy());
  await once(sock, 'connect');
  const parser = mqtt.parser({ protocolVersion: 4 });
  const received: Packet[] = [];
  const waiters: Array<{ pred: (p: Packet) => boolean; resolve: (p: Packet) => void }> = [];
  parser.on('packet', (p: Packet) => {
    received.push(p);
    for (const w of [...waiters]) {
      if (w.pred(p)) {
        waiters.splice(waiters.indexOf(w), 1);
        w.resolve(p);
      }
    }
  });
  sock.on('data', (b: Buffer) => parser.parse(b));
  sock.on('error', () => {});
  const closed = new Promise<void>((r) => sock.once('close', () => r()));
  return {
    sock,
    received,
    closed,
    send: (p) => {
      sock.write(mqtt.generate(p));
    },
    next: (pred, ms = 5000) => {
      const seen = received.find(pred);
      if (seen) return Promise.resolve(seen);
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`no matching packet within ${ms} ms`)), ms);
        waiters.push({ pred, resolve: (p) => (clearTimeout(timer), resolve(p)) });
      });
    },
  };
}

async function connected(t: Test, h: Harness, clientId: string, clean = true): Promise<{ c: Raw; client: Client }> {
  const c = await raw(t, h.port);
  const ready = new Promise<Client>((resolve) => {
    const on = (client: Client): void => {
      if (client.id === clientId) {
        h.aedes.off('clientReady', on);
        resolve(client);
      }
    };
    h.aedes.on('clientReady', on);
  });
  c.send({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 4, clean, clientId, keepalive: 60 });
  await c.next((p) => p.cmd === 'connack');
  return { c, client: await ready };
}

t.test('client.subscriptions: filter → { qos } after SUBSCRIBE', async (t) => {
  const h = await harness(t);
  const { c, client } = await connected(t, h, 'subs');
  c.send({ cmd: 'subscribe', messageId: 1, subscriptions: [{ topic: 'a/+', qos: 1 }, { topic: 'b/#', qos: 0 }] });
  await c.next((p) => p.cmd === 'suback');
  const subs = clientInternals(client).subscriptions;
  t.equal(subs['a/+']?.qos, 1);
  t.equal(subs['b/#']?.qos, 0);
  t.same(Object.keys(subs).sort(), ['a/+', 'b/#']);
  exercised.add('ClientInternals.subscriptions');
});

t.test('client._parser emits every incoming packet (the broker matches command PUBACKs on it)', async (t) => {
  const h = await harness(t);
  const { c, client } = await connected(t, h, 'parser');
  const seen = new Promise<{ cmd: string; messageId?: number }>((resolve) =>
    clientInternals(client)._parser.on('packet', (p: { cmd: string; messageId?: number }) => {
      if (p.cmd === 'puback') resolve(p);
    }),
  );
  c.send({ cmd: 'puback', messageId: 4242 });
  t.match(await seen, { cmd: 'puback', messageId: 4242 });
  exercised.add('ClientInternals._parser');
});

t.test('client._nextId is the id of the next QoS>0 delivery; a packet id chosen in authorizeForward is kept', async (t) => {
  let chosen: number | undefined;
  const h = await harness(t, {
    authorizeForward: (client, packet) => {
      if (packet.topic !== 'pick/me' || packet.qos === 0) return packet;
      chosen = takeNextPacketId(client);
      return { ...packet, messageId: chosen } as typeof packet;
    },
  });
  const { c, client } = await connected(t, h, 'ids');
  c.send({ cmd: 'subscribe', messageId: 1, subscriptions: [{ topic: 'plain/#', qos: 1 }, { topic: 'pick/#', qos: 1 }] });
  await c.next((p) => p.cmd === 'suback');
  const ci = clientInternals(client);
  t.type(ci._nextId, 'number');
  const expected = ci._nextId;
  h.aedes.publish({ cmd: 'publish', topic: 'plain/x', payload: Buffer.from('1'), qos: 1, retain: false, dup: false }, () => {});
  const first = (await c.next((p) => p.cmd === 'publish' && p.topic === 'plain/x')) as mqtt.IPublishPacket;
  t.equal(first.messageId, expected, 'aedes used _nextId for its delivery');
  t.equal(ci._nextId, expected >= 65535 ? 1 : expected + 1, 'and advanced it');
  h.aedes.publish({ cmd: 'publish', topic: 'pick/me', payload: Buffer.from('2'), qos: 1, retain: false, dup: false }, () => {});
  const second = (await c.next((p) => p.cmd === 'publish' && p.topic === 'pick/me')) as mqtt.IPublishPacket;
  t.equal(second.messageId, chosen, 'the id taken in authorizeForward went out on the wire');
  t.not(chosen, undefined);
  ci._nextId = 65535;
  t.equal(takeNextPacketId(client), 65535);
  t.equal(ci._nextId, 1, 'wraps 65535 → 1 as aedes does');
  exercised.add('ClientInternals._nextId');
});

t.test('client.closed turns true when the connection ends', async (t) => {
  const h = await harness(t);
  const { c, client } = await connected(t, h, 'closing');
  t.equal(clientInternals(client).closed, false);
  const gone = once(h.aedes, 'clientDisconnect');
  c.sock.destroy();
  await gone;
  t.equal(clientInternals(client).closed, true);
  exercised.add('ClientInternals.closed');
});

t.test('aedes.connectTimeout and aedes.queueLimit are read per connection (the broker changes them on reload)', async (t) => {
  const h = await harness(t, { connectTimeout: 60_000 });
  const a = aedesInternals(h.aedes);
  t.equal(a.connectTimeout, 60_000);
  a.connectTimeout = 200;
  const silent = await raw(t, h.port);
  await Promise.race([silent.closed, new Promise((_, reject) => setTimeout(() => reject(new Error('not closed after the lowered connect timeout')), 10_000))]);
  t.pass('a connection that sends nothing is closed after the new connect timeout');
  exercised.add('AedesInternals.connectTimeout');

  // queueLimit bounds the packets queued behind a CONNECT that is still being authenticated.
  // The client has no id yet at that point, so aedes reports it as a connectionError.
  const h2 = await harness(t, {
    authenticate: (_c, _u, _p, done) => {
      // answered only once the error is seen (below), so the packets stay queued until then
      void failed.then(() => done(null, true));
    },
  });
  const failed = new Promise<Error>((resolve) => {
    h2.aedes.once('connectionError', (_c: Client, err: Error) => resolve(err));
    h2.aedes.once('clientError', (_c: Client, err: Error) => resolve(err));
  });
  t.equal(aedesInternals(h2.aedes).queueLimit, 42, 'aedes default queueLimit is read from the instance');
  aedesInternals(h2.aedes).queueLimit = 1;
  const c = await raw(t, h2.port);
  // one write: the three PUBLISHes are parsed while the CONNECT is still authenticating
  c.sock.write(
    Buffer.concat([
      mqtt.generate({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 4, clean: true, clientId: 'q', keepalive: 60 }),
      ...[1, 2, 3].map((i) => mqtt.generate({ cmd: 'publish', topic: 'q/x', payload: Buffer.from(String(i)), qos: 0, retain: false, dup: false })),
    ]),
  );
  const err = await Promise.race([failed, c.closed.then(() => new Error('closed without a queue-limit error'))]);
  t.match(err.message, /queue limit/i, 'over the lowered queueLimit the connection errors out');
  await c.closed;
  exercised.add('AedesInternals.queueLimit');
});

t.test('aedes.persistence: subscriptions, offline queue, retained messages, will and QoS 2 state of a client id', async (t) => {
  const h = await harness(t);
  const p = aedesInternals(h.aedes).persistence;
  const id = { id: 'persist', brokerId: h.aedes.id };
  // a CleanSession 0 client subscribes, leaves; a message is queued for it
  const { c } = await connected(t, h, 'persist', false);
  c.send({ cmd: 'subscribe', messageId: 1, subscriptions: [{ topic: 'p/#', qos: 1 }] });
  await c.next((x) => x.cmd === 'suback');
  const gone = once(h.aedes, 'clientDisconnect');
  c.sock.destroy();
  await gone;
  await new Promise<void>((r) => h.aedes.publish({ cmd: 'publish', topic: 'p/queued', payload: Buffer.from('q'), qos: 1, retain: false, dup: false }, () => r()));
  await new Promise<void>((r) => h.aedes.publish({ cmd: 'publish', topic: 'p/retained', payload: Buffer.from('r'), qos: 0, retain: true, dup: false }, () => r()));

  exercised.add('AedesInternals.persistence');
  t.equal((await p.subscriptionsByClient(id))?.length, 1, 'subscriptionsByClient');
  const queued: Array<{ messageId?: number }> = [];
  for await (const x of p.outgoingStream(id)) queued.push(x);
  t.equal(queued.length, 1, 'outgoingStream yields the queued message');
  for (const x of queued) await p.outgoingClearMessageId(id, x);
  const after: unknown[] = [];
  for await (const x of p.outgoingStream(id)) after.push(x);
  t.equal(after.length, 0, 'outgoingClearMessageId removes it');

  const retained: string[] = [];
  for await (const x of p.createRetainedStream('p/#')) retained.push(x.topic);
  t.same(retained, ['p/retained'], 'createRetainedStream');
  await p.storeRetained({ cmd: 'publish', topic: 'p/retained', payload: Buffer.alloc(0), qos: 0, retain: true, dup: false });
  const none: string[] = [];
  for await (const x of p.createRetainedStream('p/#')) none.push(x.topic);
  t.same(none, [], 'storeRetained with an empty payload deletes it');

  await p.cleanSubscriptions(id);
  t.same((await p.subscriptionsByClient(id)) ?? [], [], 'cleanSubscriptions');
  t.type(p.cleanIncoming, 'function', 'cleanIncoming exists (aedes ≥ 1.2)');
  await p.cleanIncoming!(id);
  await p.delWill(id);
  // and the session is gone for aedes too: a CleanSession 0 reconnect finds nothing
  const again = await raw(t, h.port);
  again.send({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 4, clean: false, clientId: 'persist', keepalive: 60 });
  t.match(await again.next((x) => x.cmd === 'connack'), { cmd: 'connack', sessionPresent: false });

  // delWill removes the will aedes stored for a connected client (getWill is read only here, to see it)
  const getWill = (p as unknown as { getWill(c: { id: string; brokerId: string }): Promise<{ topic: string } | null | undefined> }).getWill.bind(p);
  const willing = await raw(t, h.port);
  willing.send({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 4, clean: true, clientId: 'willing', keepalive: 60, will: { topic: 'w/gone', payload: Buffer.from('x'), qos: 0, retain: false } });
  await willing.next((x) => x.cmd === 'connack');
  const wid = { id: 'willing', brokerId: h.aedes.id };
  t.match(await getWill(wid), { topic: 'w/gone' }, 'aedes stored the will in its persistence');
  await p.delWill(wid);
  t.notOk(await getWill(wid), 'delWill removed it');
  for (const m of ['subscriptionsByClient', 'cleanSubscriptions', 'cleanIncoming', 'outgoingStream', 'outgoingClearMessageId', 'delWill', 'createRetainedStream', 'storeRetained']) {
    exercised.add(`PersistenceInternals.${m}`);
  }
});

t.test('the mqtt-packet aedes writes with: its number cache turned off, packet ids and topics still go out right', async (t) => {
  const mp = aedesMqttPacket();
  t.equal(mp, createRequire(import.meta.url)('mqtt-packet'), 'the module aedes resolves (the hoisted one here)');
  t.equal(typeof mp.writeToStream.cacheNumbers, 'boolean');
  const before = mp.writeToStream.cacheNumbers;
  t.teardown(() => {
    mp.writeToStream.cacheNumbers = before;
  });
  mp.writeToStream.cacheNumbers = false;
  t.equal(mp.writeToStream.cacheNumbers, false, 'turned off');
  const h = await harness(t);
  const { c: sub } = await connected(t, h, 'numbers-sub');
  sub.send({ cmd: 'subscribe', messageId: 300, subscriptions: [{ topic: 'n/#', qos: 1 }] });
  t.match(await sub.next((p) => p.cmd === 'suback'), { cmd: 'suback', messageId: 300 });
  const { c: pub } = await connected(t, h, 'numbers-pub');
  pub.send({ cmd: 'publish', topic: 'n/x', payload: Buffer.from('hi'), qos: 1, messageId: 4242, retain: false, dup: false });
  t.match(await pub.next((p) => p.cmd === 'puback'), { cmd: 'puback', messageId: 4242 }, 'PUBACK carries the packet id');
  const got = (await sub.next((p) => p.cmd === 'publish')) as mqtt.IPublishPacket;
  t.equal(got.topic, 'n/x', 'topic length written right');
  t.equal(got.payload.toString(), 'hi');
  t.type(got.messageId, 'number');
  exercised.add('MqttPacketInternals.writeToStream');
});

t.test('every member of broker/aedes-internals.ts was exercised above', async (t) => {
  const src = readFileSync(new URL('../../broker/aedes-internals.ts', import.meta.url), 'utf8');
  const declared: string[] = [];
  for (const m of src.matchAll(/^export interface (\w+) \{\n([\s\S]*?)\n\}/gm)) {
    for (const member of m[2]!.matchAll(/^ {2}(\w+)\??[:(]/gm)) declared.push(`${m[1]}.${member[1]}`);
  }
  t.ok(declared.length >= 14, `found the members (${declared.length})`);
  t.same(declared.filter((d) => !exercised.has(d)), [], 'no internal of aedes-internals.ts is left unchecked');
  t.same([...exercised].filter((e) => !declared.includes(e)), [], 'and nothing checked here is gone from aedes-internals.ts');
});
