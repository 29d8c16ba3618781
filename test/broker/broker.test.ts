import t from 'tap';
import path from 'node:path';
import { once } from 'node:events';
import { writeFileSync } from 'node:fs';
import tls from 'node:tls';
import mqttPacket from 'mqtt-packet';
import { Registry } from 'prom-client';
import { brokerFixture, buildConfig, collect, FakeSink, rawDevice, refused, suback, waitEvent, waitFor, type RawDevice } from '../helpers/broker.js';
import { TestCA } from '../helpers/certs.js';
import { normalizeSerial } from '../../identity/registry.js';
import { ConnectorError } from '../../core/errors.js';
import type { PendingRecords, UplinkSink } from '../../core/ports.js';
import { payloadDigest } from '../../broker/redelivery.js';
import { brokerSettings } from '../../broker/broker.js';

t.test('device connects with its certificate and with its token (TLS and WSS)', async (t) => {
  const fx = await brokerFixture(t);
  const a = await fx.addDevice('dev-a');
  const r = await fx.addDevice('dev-rsa', { keyType: 'rsa' });

  const c1 = await fx.connect({ clientId: a.id, cert: a.cert, key: a.key });
  t.ok(c1.connected, 'EC certificate over MQTT/TLS');
  const got = await collect(c1, 'devices/dev-a/#');
  await c1.publishAsync('devices/dev-a/telemetry', 'x', { qos: 1 });
  await waitFor(() => got.includes('devices/dev-a/telemetry'), 5000, 'own message');
  t.ok(fx.broker.isConnected('dev-a'));
  t.same(fx.broker.connectedDevices(), ['dev-a']);
  t.ok(fx.registry.get('dev-a')!.last_seen_at, 'registry.touch() on connect');
  await c1.endAsync();
  await waitFor(() => !fx.broker.isConnected('dev-a'), 5000, 'disconnect noticed');

  const c2 = await fx.connect({ clientId: r.id, cert: r.cert, key: r.key });
  t.ok(c2.connected, 'RSA certificate');
  await c2.endAsync();

  const c3 = await fx.connect({ clientId: a.id, username: a.id, password: a.token });
  t.ok(c3.connected, 'JWT over MQTT/TLS');
  await c3.endAsync();

  const c4 = await fx.connect({ listener: 'wss', clientId: a.id, username: a.id, password: a.token });
  t.ok(c4.connected, 'JWT over MQTT/WSS');
  const got4 = await collect(c4, 'devices/dev-a/+');
  await c4.publishAsync('devices/dev-a/w', 'x', { qos: 1 });
  await waitFor(() => got4.includes('devices/dev-a/w'), 5000, 'own message over WSS');
  await c4.endAsync();

  const c5 = await fx.connect({ listener: 'wss', clientId: a.id, cert: a.cert, key: a.key });
  t.ok(c5.connected, 'certificate over MQTT/WSS');
  await c5.endAsync();

  const connected = fx.logs.find({ msg: 'device connected' });
  t.ok(connected.length >= 5, 'a log line per connection');
  t.notOk(fx.logs.raw.join('').includes(a.token), 'the token never reaches a log line');
  const st = fx.broker.status() as { listeners: Record<string, { port: number }> };
  t.ok(st.listeners.tls!.port > 0 && st.listeners.wss!.port > 0);
});

t.test('topic ACL on live connections', async (t) => {
  const fx = await brokerFixture(t, { overrides: { broker: { listeners: { local: { enabled: true } } } } });
  const a = await fx.addDevice('dev-a');
  const b = await fx.addDevice('dev-b');
  const cb = await fx.connect({ clientId: 'dev-b', cert: b.cert, key: b.key });
  const gotB = await collect(cb, 'devices/dev-b/#');
  const spy = await fx.connect({ listener: 'local', clientId: 'spy' });
  const gotSpy = await collect(spy, 'devices/#');

  // A publishes into B's namespace: connection closed (MQTT-3.3.5-2), nothing delivered
  const ca = await fx.connect({ clientId: 'dev-a', cert: a.cert, key: a.key });
  const closed = waitEvent(ca, 'close');
  ca.publish('devices/dev-b/telemetry', 'evil', { qos: 1 });
  await closed;
  // A publishes to its own commands topic: closed, not delivered
  const ca2 = await fx.connect({ clientId: 'dev-a', cert: a.cert, key: a.key });
  const closed2 = waitEvent(ca2, 'close');
  ca2.publish('devices/dev-a/commands/reboot', 'evil', { qos: 0 });
  await closed2;
  // marker: B's own traffic still flows and arrives after anything A sent
  await cb.publishAsync('devices/dev-b/marker', 'm', { qos: 1 });
  await waitFor(() => gotB.includes('devices/dev-b/marker') && gotSpy.includes('devices/dev-b/marker'), 5000, 'marker');
  t.notOk(gotB.includes('devices/dev-b/telemetry'), "A's message is not delivered to B");
  t.notOk(gotSpy.includes('devices/dev-b/telemetry'), "A's message is not delivered at all");
  t.notOk(gotSpy.includes('devices/dev-a/commands/reboot'), 'the commands publish is not delivered');
  t.ok(fx.logs.find({ code: 'ECONN_NOT_AUTHORIZED', what: 'publish' }).length >= 2, 'refusals logged');

  // subscriptions outside its namespace: SUBACK 0x80, connection stays, nothing delivered
  const ca3 = await fx.connect({ clientId: 'dev-a', cert: a.cert, key: a.key });
  const gotA: string[] = [];
  ca3.on('message', (topic) => gotA.push(topic));
  const filters = { 'devices/dev-b/#': { qos: 1 }, '#': { qos: 1 }, 'devices/+/telemetry': { qos: 1 }, '$SYS/#': { qos: 0 }, '+/dev-a/x': { qos: 0 }, 'devices/dev-a/commands/#': { qos: 1 } } as const;
  const codes = await suback(ca3, filters);
  const byTopic = Object.fromEntries(Object.keys(filters).map((f, i) => [f, codes[i]]));
  t.equal(byTopic['devices/dev-b/#'], 128, "B's namespace refused");
  t.equal(byTopic['#'], 128, '# refused');
  t.equal(byTopic['devices/+/telemetry'], 128, 'wildcard over devices refused');
  t.equal(byTopic['$SYS/#'], 128, '$SYS refused');
  t.equal(byTopic['+/dev-a/x'], 128, 'leading wildcard refused');
  t.equal(byTopic['devices/dev-a/commands/#'], 1, 'own commands allowed');
  await cb.publishAsync('devices/dev-b/telemetry', 'b', { qos: 1 });
  await spy.publishAsync('devices/dev-a/commands/hello', 'c', { qos: 1 });
  await waitFor(() => gotA.includes('devices/dev-a/commands/hello'), 5000, 'own command');
  t.same(gotA, ['devices/dev-a/commands/hello'], "nothing of B's reaches A");
  t.ok(ca3.connected, 'connection stays after refused subscriptions');
});


t.test('bridged publishes are journaled before the PUBACK, acknowledged in order; a full journal is not acknowledged', async (t) => {
  const sink = new FakeSink();
  const fx = await brokerFixture(t, { sink, overrides: { bridge: { enabled: true, topics: ['devices/+/telemetry/#', 'devices/+/events'] } } });
  const a = await fx.addDevice('dev-a');
  const b = await fx.addDevice('dev-b');
  const c = await fx.connect({ clientId: 'dev-a', cert: a.cert, key: a.key });
  const other = await fx.connect({ clientId: 'dev-b', cert: b.cert, key: b.key });

  // 1. no PUBACK while the append is pending
  sink.hold = true;
  let acked = false;
  c.publish('devices/dev-a/telemetry/t', 'one', { qos: 1 }, () => (acked = true));
  await waitFor(() => sink.held === 1, 5000, 'append started');
  const gotB = await collect(other, 'devices/dev-b/#');
  await other.publishAsync('devices/dev-b/x', 'roundtrip', { qos: 1 });
  await waitFor(() => gotB.length === 1, 5000, 'an unrelated round trip');
  t.notOk(acked, 'no PUBACK while the journal has not confirmed');
  sink.release();
  await waitFor(() => acked, 5000, 'PUBACK after the append resolved');
  t.match(sink.appended[0], { meta: { deviceId: 'dev-a', topic: 'devices/dev-a/telemetry/t', qos: 1 } });
  t.equal(sink.appended[0]!.payload.toString(), 'one');
  t.type(sink.appended[0]!.meta.receivedAt, 'number');

  // 2. order: appends resolved out of order still complete (PUBACK) in receive order
  sink.appended = [];
  const acks: number[] = [];
  let maxHeld = 0;
  for (let i = 0; i < 8; i++) c.publish(`devices/dev-a/telemetry/${i}`, String(i), { qos: 1 }, () => acks.push(i));
  await waitFor(
    () => {
      maxHeld = Math.max(maxHeld, sink.held);
      if (sink.held > 0) sink.release([...Array(sink.held).keys()].reverse());
      return acks.length === 8;
    },
    10_000,
    'eight PUBACKs',
  );
  t.same(sink.appended.map((x) => x.payload.toString()), ['0', '1', '2', '3', '4', '5', '6', '7'], 'appended in receive order');
  t.same(acks, [0, 1, 2, 3, 4, 5, 6, 7], 'PUBACKs in receive order');
  t.comment(`most appends pending at once: ${maxHeld}`);
  sink.hold = false;

  // 3. QoS 0 is journaled too (policy journal); topics outside bridge.topics are not
  sink.appended = [];
  const gotA = await collect(c, 'devices/dev-a/#');
  c.publish('devices/dev-a/events', 'q0', { qos: 0 });
  await c.publishAsync('devices/dev-a/not-bridged', 'nb', { qos: 1 });
  await waitFor(() => gotA.includes('devices/dev-a/not-bridged') && gotA.includes('devices/dev-a/events'), 5000, 'local delivery');
  t.same(sink.appended.map((x) => [x.meta.topic, x.meta.qos]), [['devices/dev-a/events', 0]], 'QoS 0 journaled, non-bridged topic not');

  // 4. journal full: no PUBACK, the connection is closed so the device retries later
  sink.failWith = new ConnectorError('ECONN_JOURNAL_FULL', 'journal full');
  let ackedFull = false;
  const closed = waitEvent(c, 'close');
  c.publish('devices/dev-a/telemetry/full', 'x', { qos: 1 }, (err) => (ackedFull = !err));
  await closed;
  t.notOk(ackedFull, 'not acknowledged');
  t.equal(fx.logs.find({ code: 'ECONN_JOURNAL_FULL' }).length, 1, 'logged once with its code');
  t.ok(other.connected, 'other devices unaffected');
});

t.test('bridge.qos0 best_effort: QoS 0 skips the journal and goes to the best-effort hook', async (t) => {
  const sink = new FakeSink();
  const forwarded: string[] = [];
  const fx = await brokerFixture(t, {
    sink,
    overrides: { bridge: { enabled: true, qos0: 'best_effort' } },
    broker: { bestEffort: (meta) => forwarded.push(meta.topic) },
  });
  const a = await fx.addDevice('dev-a');
  const c = await fx.connect({ clientId: 'dev-a', username: 'dev-a', password: a.token });
  c.publish('devices/dev-a/q0', 'x', { qos: 0 });
  await c.publishAsync('devices/dev-a/q1', 'y', { qos: 1 });
  await waitFor(() => forwarded.length === 1, 5000, 'best-effort forward');
  t.same(forwarded, ['devices/dev-a/q0']);
  t.same(sink.appended.map((x) => x.meta.topic), ['devices/dev-a/q1']);
  fx.broker.setSink(undefined);
  await c.publishAsync('devices/dev-a/q1', 'z', { qos: 1 });
  t.equal(sink.appended.length, 1, 'detached sink: nothing appended');
});

t.test('publishCommand: delivered on PUBACK; not connected, not subscribed, QoS 0, timeout', async (t) => {
  const fx = await brokerFixture(t);
  const a = await fx.addDevice('dev-a');
  const b = await fx.addDevice('dev-b');
  const d = await fx.addDevice('dev-slow');
  t.match(await fx.broker.publishCommand('dev-a', 'reboot', Buffer.from('x')), { delivered: false, reason: /not connected/ });

  const c = await fx.connect({ clientId: 'dev-a', cert: a.cert, key: a.key });
  await waitFor(() => fx.broker.isConnected('dev-a'), 5000, 'registered');
  t.match(await fx.broker.publishCommand('dev-a', 'reboot', Buffer.from('x')), { delivered: false, reason: /not subscribed/ });
  const payloads: string[] = [];
  c.on('message', (topic, payload, packet) => payloads.push(`${topic}|${payload.toString()}|${packet.qos}`));
  await c.subscribeAsync('devices/dev-a/commands/#', { qos: 1 });
  const r = await fx.broker.publishCommand('dev-a', 'reboot', Buffer.from('now'));
  t.same(r, { delivered: true });
  t.same(payloads, ['devices/dev-a/commands/reboot|now|1'], 'the device received it at QoS 1 before acknowledging');
  const many = await Promise.all([1, 2, 3].map((i) => fx.broker.publishCommand('dev-a', `n/${i}`, Buffer.from(String(i)))));
  t.same(many, [{ delivered: true }, { delivered: true }, { delivered: true }], 'concurrent commands each matched to their PUBACK');
  t.match(await fx.broker.publishCommand('dev-a', 'a/+', Buffer.from('x')), { delivered: false, reason: /invalid/ });
  t.match(await fx.broker.publishCommand('dev-a', '', Buffer.from('x')), { delivered: false, reason: /invalid/ });

  const cb = await fx.connect({ clientId: 'dev-b', cert: b.cert, key: b.key });
  await cb.subscribeAsync('devices/dev-b/commands/+', { qos: 0 });
  t.match(await fx.broker.publishCommand('dev-b', 'ping', Buffer.from('x')), { delivered: true, reason: /QoS 0/ });

  // a device that never acknowledges (raw MQTT: mqtt.js always acknowledges at protocol level 4)
  const { received, send: sendSlow } = await rawDevice(t, fx, d, 'dev-slow', true);
  sendSlow({ cmd: 'subscribe', messageId: 1, subscriptions: [{ topic: 'devices/dev-slow/commands/#', qos: 1 }] });
  await waitFor(() => received.some((p) => p.cmd === 'suback'), 5000, 'SUBACK');
  await waitFor(() => fx.broker.isConnected('dev-slow'), 5000, 'registered');
  t.match(await fx.broker.publishCommand('dev-slow', 'x', Buffer.from('x'), 300), { delivered: false, reason: /no PUBACK within 300 ms/ });
  const pending = fx.broker.publishCommand('dev-slow', 'y', Buffer.from('x'), 10_000);
  await waitFor(() => received.filter((p) => p.cmd === 'publish').length === 2, 5000, 'second command received');
  t.ok(fx.broker.disconnectDevice('dev-slow'));
  t.match(await pending, { delivered: false, reason: /disconnected/ }, 'a disconnect resolves a pending command');
});

t.test('limits: payload, connections, keepalive, topic depth; garbage does not hurt', async (t) => {
  const fx = await brokerFixture(t, {
    overrides: { broker: { limits: { max_payload_bytes: 100, max_connections: 3, keepalive_max_s: 30, max_topic_depth: 4 } } },
  });
  const a = await fx.addDevice('dev-a');
  const b = await fx.addDevice('dev-b');
  const c = await fx.connect({ clientId: 'dev-a', cert: a.cert, key: a.key, keepalive: 20 });
  let closed = waitEvent(c, 'close');
  c.publish('devices/dev-a/big', Buffer.alloc(101), { qos: 1 });
  await closed;
  t.equal(fx.logs.find({ code: 'ECONN_BROKER_LIMIT' }).length, 1, 'payload over the limit: closed and logged');

  const c2 = await fx.connect({ clientId: 'dev-a', cert: a.cert, key: a.key, keepalive: 20 });
  await c2.publishAsync('devices/dev-a/ok', Buffer.alloc(100), { qos: 1 });
  closed = waitEvent(c2, 'close');
  c2.publish('devices/dev-a/1/2/3', 'deep', { qos: 1 });
  await closed;
  t.pass('topic deeper than max_topic_depth: closed');

  t.equal((await refused(fx.connect({ clientId: 'dev-a', cert: a.cert, key: a.key, keepalive: 60 }))).code, 'CLOSED', 'keepalive above the bound: closed without CONNACK');

  const held = [
    await fx.connect({ clientId: 'dev-a', cert: a.cert, key: a.key, keepalive: 20 }),
    await fx.connect({ clientId: 'dev-b', cert: b.cert, key: b.key, keepalive: 20 }),
  ];
  // a raw third socket fills the last slot; the fourth is refused at accept
  const raw = tls.connect({ host: '127.0.0.1', port: fx.port('tls'), ca: fx.ca, servername: 'localhost' });
  t.teardown(() => raw.destroy());
  await once(raw, 'secureConnect');
  const over = await refused(fx.connect({ clientId: 'dev-b', cert: b.cert, key: b.key, keepalive: 20 }));
  t.ok(over, 'over max_connections: refused');
  t.match(fx.logs.find({ code: 'ECONN_BROKER_LIMIT' }).at(-1), { max_connections: 3 });
  // garbage on the raw socket: closed, the broker stays up
  raw.write(Buffer.from([0xff, 0xff, 0xff, 0xff, 0xff, 0x00]));
  await once(raw, 'close');
  for (const h of held) t.ok(h.connected, 'held connections unaffected');
  const after = await fx.connect({ clientId: 'dev-b', cert: b.cert, key: b.key, keepalive: 20 });
  t.ok(after.connected, 'a slot is free again after the garbage socket closed');
});

t.test('local listener: anonymous with and without rules, jwt mode', async (t) => {
  const fx = await brokerFixture(t, { overrides: { broker: { listeners: { local: { enabled: true } } } } });
  t.equal(fx.logs.find({ level: 'warn' }).filter((l) => String(l.msg).includes('ANONYMOUS')).length, 1, 'warned at start');
  const a = await fx.addDevice('dev-a');
  const app = await fx.connect({ listener: 'local', clientId: 'app-1' });
  const got = await collect(app, 'devices/+/telemetry');
  const dev = await fx.connect({ clientId: 'dev-a', cert: a.cert, key: a.key });
  await dev.publishAsync('devices/dev-a/telemetry', 't', { qos: 1 });
  await waitFor(() => got.length === 1, 5000, 'local app sees device telemetry');
  t.equal((await refused(fx.connect({ listener: 'local', clientId: 'dev-a' }))).code, 2, "an anonymous app cannot use a device's client id");
  t.ok(dev.connected, 'the device session was not taken over');
  t.same(await suback(app, { '$SYS/#': { qos: 0 } }), [0], 'no rules: everything allowed');

  const ruled = await brokerFixture(t, {
    overrides: { broker: { listeners: { local: { enabled: true, acl: [{ allow: 'subscribe', topic: 'devices/+/telemetry' }] } } } },
  });
  const app2 = await ruled.connect({ listener: 'local', clientId: 'app-2' });
  t.same(await suback(app2, { 'devices/+/telemetry': { qos: 1 }, '#': { qos: 1 } }), [1, 128], 'rules apply');
  const closed = waitEvent(app2, 'close');
  app2.publish('devices/x/commands/y', 'z', { qos: 1 });
  await closed;
  t.pass('publish outside the local rules: closed');

  const jwt = await brokerFixture(t, { overrides: { broker: { listeners: { local: { enabled: true, auth: 'jwt' } } } } });
  const j = await jwt.addDevice('dev-j');
  t.equal((await refused(jwt.connect({ listener: 'local', clientId: 'app' }))).code, 4, 'jwt mode: anonymous refused');
  const cj = await jwt.connect({ listener: 'local', clientId: 'dev-j', username: 'dev-j', password: j.token });
  t.ok(cj.connected, 'jwt mode: device token accepted');
});

t.test('reload: ACL rules, TLS certificate and limits change without dropping sessions', async (t) => {
  const fx = await brokerFixture(t);
  const a = await fx.addDevice('dev-a', { group: 'cams' });
  const c = await fx.connect({ clientId: 'dev-a', cert: a.cert, key: a.key });
  let dropped = false;
  c.on('close', () => (dropped = true));
  t.same(await suback(c, { 'broadcast/#': { qos: 1 } }), [128], 'before: no group rule');

  const other = await TestCA.create();
  const srv = await other.server();
  const certFile = path.join(fx.dir, 'srv.crt');
  const keyFile = path.join(fx.dir, 'srv.key');
  writeFileSync(certFile, srv.cert);
  writeFileSync(keyFile, srv.key, { mode: 0o600 });
  const next = buildConfig(fx.dir, {
    broker: {
      acl: { groups: { cams: [{ allow: 'subscribe', topic: 'broadcast/#' }] } },
      tls: { cert_file: certFile, key_file: keyFile },
      limits: { max_payload_bytes: 1000 },
    },
  });
  const changes = await fx.broker.reload(brokerSettings(next));
  t.match(changes.join('\n'), /ACL rules updated/);
  t.match(changes.join('\n'), /TLS context reloaded/);
  t.match(changes.join('\n'), /limits updated/);
  t.same(await suback(c, { 'broadcast/#': { qos: 1 } }), [1], 'after: the group rule applies to the live session');
  t.notOk(dropped, 'the session survived the reload');
  // new handshakes present the new certificate
  const s = tls.connect({ host: '127.0.0.1', port: fx.port('tls'), ca: other.cert, servername: 'localhost' });
  t.teardown(() => s.destroy());
  await once(s, 'secureConnect');
  t.equal(normalizeSerial(s.getPeerX509Certificate()!.serialNumber), normalizeSerial(srv.serial), 'new server certificate');
  s.destroy();
  // a broken TLS file on reload keeps the old context and says so
  writeFileSync(keyFile, 'not a key');
  const bad = await fx.broker.reload(brokerSettings(buildConfig(fx.dir, { broker: { tls: { cert_file: certFile, key_file: keyFile } } })));
  t.match(bad.join('\n'), /TLS reload failed/);
  t.notOk(dropped);
});

t.test('metrics: connects and refusals by listener and reason', async (t) => {
  const registry = new Registry();
  const fx = await brokerFixture(t, { broker: { metrics: registry } });
  const a = await fx.addDevice('dev-a');
  const c = await fx.connect({ clientId: 'dev-a', cert: a.cert, key: a.key });
  await waitFor(() => fx.broker.isConnected('dev-a'), 5000, 'registered');
  await c.endAsync();
  await refused(fx.connect({ clientId: 'dev-a', username: 'dev-a', password: 'bad' }));
  const text = await registry.metrics();
  t.match(text, /connector_broker_connects_total\{listener="tls",via="cert"\} 1/);
  t.match(text, /connector_broker_refusals_total\{listener="tls",code="ECONN_AUTH_TOKEN"\} 1/);
});

t.test('close is idempotent and bounded; refuses new work afterwards', async (t) => {
  const fx = await brokerFixture(t);
  const a = await fx.addDevice('dev-a');
  const c = await fx.connect({ clientId: 'dev-a', cert: a.cert, key: a.key });
  await c.subscribeAsync('devices/dev-a/commands/#', { qos: 1 });
  const closed = waitEvent(c, 'close');
  await Promise.all([fx.broker.close(), fx.broker.close()]);
  await closed;
  t.pass('clients disconnected');
  await fx.broker.close();
  t.same(fx.broker.boundPorts().size, 0);
  t.match(await fx.broker.publishCommand('dev-a', 'x', Buffer.from('x')), { delivered: false, reason: /not running/ });
  await t.rejects(fx.broker.start(), { code: 'ECONN_CLOSED' });
});

t.test('a port in use gives a clear ECONN_LISTEN error and start cleans up', async (t) => {
  const fx = await brokerFixture(t);
  const port = fx.port('tls');
  const { Broker, brokerSettings } = await import('../../broker/broker.js');
  const cfg = buildConfig(fx.dir, { broker: { listeners: { tls: { port } } } });
  const b2 = new Broker({ config: cfg.broker, bridge: brokerSettings(cfg).bridge, logger: fx.logs.logger, registry: fx.registry, pki: fx.pki, tokens: fx.tokens });
  t.teardown(() => b2.close());
  await t.rejects(b2.start(), { code: 'ECONN_LISTEN', message: /broker\.listeners\.tls\.port/ });
});

t.test('last will: published (and journaled) when a device vanishes, not when we drop it', async (t) => {
  const sink = new FakeSink();
  const fx = await brokerFixture(t, { sink, overrides: { bridge: { enabled: true }, broker: { listeners: { local: { enabled: true } } } } });
  const a = await fx.addDevice('dev-a');
  const b = await fx.addDevice('dev-b');
  const watcher = await fx.connect({ listener: 'local', clientId: 'watcher' });
  const got = await collect(watcher, 'devices/+/status');
  const will = (id: string) => ({ will: { topic: `devices/${id}/status`, payload: Buffer.from('offline'), qos: 1 as const, retain: false } });
  const ca = await fx.connect({ clientId: 'dev-a', cert: a.cert, key: a.key, extra: will('dev-a') });
  const closed = waitEvent(ca, 'close');
  ca.stream.destroy(); // no DISCONNECT: the network went away
  await closed;
  await waitFor(() => got.includes('devices/dev-a/status'), 5000, 'will delivered');
  t.ok(sink.appended.some((x) => x.meta.topic === 'devices/dev-a/status' && x.payload.toString() === 'offline'), 'will journaled for the cloud');

  const cb = await fx.connect({ clientId: 'dev-b', cert: b.cert, key: b.key, extra: will('dev-b') });
  const closedB = waitEvent(cb, 'close');
  await fx.registry.revoke('dev-b');
  await closedB;
  const ca2 = await fx.connect({ clientId: 'dev-a', cert: a.cert, key: a.key });
  await ca2.publishAsync('devices/dev-a/status', 'marker', { qos: 1 });
  await waitFor(() => got.filter((x) => x === 'devices/dev-a/status').length === 2, 5000, 'marker');
  t.notOk(got.includes('devices/dev-b/status'), "a revoked device's will is not published");
});

t.test('connect timeout: a connection that never sends CONNECT is closed', async (t) => {
  const fx = await brokerFixture(t, { overrides: { broker: { limits: { connect_timeout_ms: 1000 } } } });
  const raw = tls.connect({ host: '127.0.0.1', port: fx.port('tls'), ca: fx.ca, servername: 'localhost' });
  t.teardown(() => raw.destroy());
  await once(raw, 'secureConnect');
  await waitEvent(raw, 'close', 10_000);
  t.pass('closed by the broker');
  await waitFor(() => (fx.broker.status() as { listeners: { tls: { connections: number } } }).listeners.tls.connections === 0, 5000, 'server side closed');
  t.pass('no socket left behind');
});

t.test('QoS 1 redelivery (DUP 1) after a lost PUBACK is acknowledged but not journaled twice; new messages always are', async (t) => {
  const sink = new FakeSink();
  const fx = await brokerFixture(t, { sink, overrides: { bridge: { enabled: true, topics: ['devices/+/telemetry/#'] } } });
  const d = await fx.addDevice('dev-r');
  const topic = 'devices/dev-r/telemetry/t';

  const connectRaw = async (): Promise<RawDevice & { pub: (id: number, payload: string, dup: boolean) => void }> => {
    const c = await rawDevice(t, fx, d, 'dev-r');
    await waitFor(() => fx.broker.isConnected('dev-r'), 5000, 'registered');
    return { ...c, pub: (id, payload, dup) => c.send({ cmd: 'publish', topic, payload: Buffer.from(payload), qos: 1, dup, retain: false, messageId: id }) };
  };
  const dropped = async (c: { sock: tls.TLSSocket }): Promise<void> => {
    c.sock.destroy();
    await waitFor(() => !fx.broker.isConnected('dev-r'), 5000, 'old connection gone');
  };

  // 1. the PUBACK is lost: the connection drops while the append is pending; the append then completes
  sink.hold = true;
  const c1 = await connectRaw();
  c1.pub(7, 'reading-1', false);
  await waitFor(() => sink.held === 1, 5000, 'append started');
  await dropped(c1);
  sink.release();
  t.equal(c1.acked(7), 0, 'the device never saw the PUBACK');
  // the device reconnects and re-sends the same PUBLISH with DUP 1 and the same packet id
  sink.hold = false;
  const c2 = await connectRaw();
  c2.pub(7, 'reading-1', true);
  await waitFor(() => c2.acked(7) === 1, 5000, 'PUBACK for the redelivery');
  t.equal(sink.appended.length, 1, 'journaled exactly once');
  t.ok(fx.logs.find({ msg: 'QoS 1 redelivery (DUP 1) of a message already journaled: acknowledged, not journaled again', packet_id: 7 }).length === 1, 'logged');

  // 2. same packet id, DUP 1, but a different payload: genuinely new, appended
  c2.pub(7, 'reading-2', true);
  await waitFor(() => c2.acked(7) === 2, 5000, 'PUBACK');
  t.same(sink.appended.map((x) => x.payload.toString()), ['reading-1', 'reading-2'], 'a different payload under the same packet id is appended');
  // same id, same payload, DUP 0 (e.g. mosquitto_pub run twice, ids start at 1): a new message, appended
  c2.pub(7, 'reading-2', false);
  await waitFor(() => c2.acked(7) === 3, 5000, 'PUBACK');
  t.equal(sink.appended.length, 3, 'DUP 0 is never treated as a redelivery');
  // DUP 1 for a packet id never seen (the original never arrived): appended
  c2.pub(8, 'reading-3', true);
  await waitFor(() => c2.acked(8) === 1, 5000, 'PUBACK');
  t.equal(sink.appended.length, 4, 'a DUP 1 message we never journaled is appended');

  // 3. the redelivery arrives while the original append is still pending: it waits for it, no second append
  sink.hold = true;
  c2.pub(9, 'reading-4', false);
  await waitFor(() => sink.held === 1, 5000, 'append started');
  await dropped(c2);
  const c3 = await connectRaw();
  c3.pub(9, 'reading-4', true);
  // a round trip on the same connection proves the redelivery was processed (PINGREQ is answered in order)
  c3.sock.write(mqttPacket.generate({ cmd: 'pingreq' }));
  await waitFor(() => c3.received.some((p) => p.cmd === 'pingresp'), 5000, 'PINGRESP');
  t.equal(c3.acked(9), 0, 'no PUBACK while the original append is pending');
  sink.release();
  await waitFor(() => c3.acked(9) === 1, 5000, 'PUBACK once the original append resolved');
  t.equal(sink.appended.length, 5, 'still journaled once');

  // 4. the original append failed: the redelivery must be journaled
  sink.hold = true;
  c3.pub(10, 'reading-5', false);
  await waitFor(() => sink.held === 1, 5000, 'append started');
  await dropped(c3);
  sink.failHeld(new ConnectorError('ECONN_JOURNAL_IO', 'disk gone'));
  sink.hold = false;
  const c4 = await connectRaw();
  c4.pub(10, 'reading-5', true);
  await waitFor(() => c4.acked(10) === 1, 5000, 'PUBACK');
  t.same(sink.appended.slice(5).map((x) => x.payload.toString()), ['reading-5', 'reading-5'], 'failed original, then the redelivery appended');
});

/** A journal that records appends and offers `recent` to the broker's redelivery seeding at start. */
function seededSink(recent: PendingRecords['recentPublishes']): UplinkSink & PendingRecords & { appended: Buffer[] } {
  const appended: Buffer[] = [];
  return {
    appended,
    append: async (_meta, payload) => {
      appended.push(payload);
      return { id: `new-${appended.length}`, size: payload.length, sha256: payloadDigest(payload) };
    },
    appendStream: async () => {
      throw new Error('not used');
    },
    recentPublishes: recent,
  };
}

t.test('after a restart, the journal seeds the redelivery table: a DUP 1 resend of a journaled message is not journaled again', async (t) => {
  const topic = 'devices/dev-k/telemetry/t';
  const before = Buffer.from('journaled-before-the-crash');
  // the journal as the restarted daemon finds it: one unacknowledged QoS 1 record that carries its packet id
  const sink = seededSink((_opts, visit) => {
    visit({ id: 'old-1', deviceId: 'dev-k', packetId: 9, topic, size: before.length, sha256: payloadDigest(before) });
    return 1;
  });
  const appended = sink.appended;
  const fx = await brokerFixture(t, { sink, overrides: { bridge: { enabled: true, topics: ['devices/+/telemetry/#'] } } });
  const d = await fx.addDevice('dev-k');
  const { send, acked } = await rawDevice(t, fx, d, 'dev-k');
  const pub = (payload: Buffer): void => send({ cmd: 'publish', topic, payload, qos: 1, dup: true, retain: false, messageId: 9 });
  pub(before);
  await waitFor(() => acked(9) === 1, 5000, 'PUBACK for the resend');
  t.equal(appended.length, 0, 'the resend of the journaled message is not journaled again');
  pub(Buffer.from('something else'));
  await waitFor(() => acked(9) === 2, 5000, 'PUBACK');
  t.same(appended.map(String), ['something else'], 'a different payload under the same packet id is journaled');
});

t.test('the seeding reads only what the table holds: the newest 64 packet ids of a device, within the stated bounds', async (t) => {
  const topic = 'devices/dev-q/telemetry/t';
  const body = (pid: number): Buffer => Buffer.from(`journaled-${pid}`);
  let asked: { maxAgeMs: number; maxRecords: number } | undefined;
  let visited = 0;
  // newest first: packet ids 100 down to 1, then an older record reusing packet id 100 (a different payload)
  const sink = seededSink((opts, visit) => {
    asked = { maxAgeMs: opts.maxAgeMs, maxRecords: opts.maxRecords };
    const recs = [...Array.from({ length: 100 }, (_, i) => ({ pid: 100 - i, payload: body(100 - i) })), { pid: 100, payload: Buffer.from('older') }];
    for (const r of recs) {
      if (opts.wanted && !opts.wanted('dev-q', r.pid)) continue;
      visited++;
      if (!visit({ id: `old-${r.pid}`, deviceId: 'dev-q', packetId: r.pid, topic, size: r.payload.length, sha256: payloadDigest(r.payload) })) break;
    }
    return recs.length;
  });
  const appended = sink.appended;
  const fx = await brokerFixture(t, { sink, overrides: { bridge: { enabled: true, topics: ['devices/+/telemetry/#'] } } });
  t.same(asked, { maxAgeMs: 10 * 60_000, maxRecords: 65_536 }, 'bounded by the table age and the record cap');
  t.equal(visited, 64, 'records the table could not hold are skipped before they are decoded');
  const d = await fx.addDevice('dev-q');
  const { send, acked } = await rawDevice(t, fx, d, 'dev-q');
  const pub = (pid: number, payload: Buffer): void => send({ cmd: 'publish', topic, payload, qos: 1, dup: true, retain: false, messageId: pid });
  pub(100, body(100));
  pub(37, body(37));
  pub(36, body(36));
  await waitFor(() => acked(100) === 1 && acked(37) === 1 && acked(36) === 1, 5000, 'PUBACKs');
  t.same(appended.map(String), ['journaled-36'], 'the newest 64 (ids 100…37) are recognised; id 36 is beyond them and journaled again');
});

t.test('a connection that closes while its token is being verified leaves no session behind', async (t) => {
  // the token verifier holds every verification until the test lets it go (the real one is async too)
  let release: () => void = () => {};
  const gate = new Promise<void>((r) => (release = r));
  let verifying: Promise<unknown> | undefined;
  let started: () => void = () => {};
  const verifyStarted = new Promise<void>((r) => (started = r));
  const fx = await brokerFixture(t, {
    broker: {
      tokens: {
        verify: (token: string) => {
          started();
          verifying = gate.then(() => fx.tokens.verify(token));
          return verifying as ReturnType<typeof fx.tokens.verify>;
        },
      },
    },
  });
  const d = await fx.addDevice('dev-j');
  const sock = tls.connect({ host: '127.0.0.1', port: fx.port('tls'), ca: fx.ca, servername: 'localhost' });
  t.teardown(() => sock.destroy());
  await once(sock, 'secureConnect');
  sock.write(mqttPacket.generate({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 4, clean: true, clientId: 'dev-j', keepalive: 60, username: 'dev-j', password: Buffer.from(d.token) }));
  await verifyStarted;
  sock.destroy();
  await waitFor(() => (fx.broker.status() as { listeners: { tls: { connections: number } } }).listeners.tls.connections === 0, 5000, 'socket closed on the server');
  release();
  await verifying;
  await new Promise((r) => setImmediate(r)); // the authenticate continuation runs right after the verification settled
  t.equal((fx.broker.status() as { sessions: number }).sessions, 0, 'no session registered for the closed connection');
  t.notOk(fx.broker.isConnected('dev-j'), 'the device is not reported connected');
  // and the device can connect normally afterwards
  const c = await fx.connect({ clientId: 'dev-j', username: 'dev-j', password: d.token });
  t.ok(fx.broker.isConnected('dev-j'));
  await c.endAsync();
  await waitFor(() => (fx.broker.status() as { sessions: number }).sessions === 0, 5000, 'session removed on disconnect');
  t.pass('sessions back to 0');
});

t.test('a DUP 1 publish that reuses an ACKNOWLEDGED packet id with the same topic and payload is a new message: journaled', async (t) => {
  const sink = new FakeSink();
  const fx = await brokerFixture(t, { sink, overrides: { bridge: { enabled: true, topics: ['devices/+/telemetry/#'] } } });
  const d = await fx.addDevice('dev-u');
  const topic = 'devices/dev-u/telemetry/door';
  const pub = (c: RawDevice, dup: boolean): void => c.send({ cmd: 'publish', topic, payload: Buffer.from('open'), qos: 1, dup, retain: false, messageId: 5 });
  // first message, acknowledged
  const c1 = await rawDevice(t, fx, d, 'dev-u');
  await waitFor(() => fx.broker.isConnected('dev-u'), 5000, 'registered');
  pub(c1, false);
  await waitFor(() => c1.acked(5) === 1, 5000, 'PUBACK');
  // the device reuses id 5 (allowed after the PUBACK, MQTT-2.3.1-3) for a new, identical reading; that send is lost
  // with the connection, so it re-sends it with DUP 1 on the next one (MQTT-3.3.1-1)
  c1.sock.destroy();
  await waitFor(() => !fx.broker.isConnected('dev-u'), 5000, 'old connection gone');
  const c2 = await rawDevice(t, fx, d, 'dev-u');
  await waitFor(() => fx.broker.isConnected('dev-u'), 5000, 'registered');
  pub(c2, true);
  await waitFor(() => c2.acked(5) === 1, 5000, 'PUBACK');
  t.equal(sink.appended.length, 2, 'the new message was journaled, not acknowledged and dropped');
  // and on the same connection: after its PUBACK, the id is free again
  pub(c2, true);
  await waitFor(() => c2.acked(5) === 2, 5000, 'PUBACK');
  t.equal(sink.appended.length, 3, 'a DUP 1 re-use on the same connection after the PUBACK is journaled too');
  t.equal(fx.logs.find({ msg: 'QoS 1 redelivery (DUP 1) of a message already journaled: acknowledged, not journaled again' }).length, 0, 'never taken for a redelivery');
});

t.test('journal-seeded redelivery entries are honoured on the first connection after a start only', async (t) => {
  const topic = 'devices/dev-s/telemetry/t';
  const before = Buffer.from('journaled-before-the-crash');
  const sink = seededSink((_opts, visit) => {
    visit({ id: 'old-1', deviceId: 'dev-s', packetId: 3, topic, size: before.length, sha256: payloadDigest(before) });
    return 1;
  });
  const appended = sink.appended;
  const fx = await brokerFixture(t, { sink, overrides: { bridge: { enabled: true, topics: ['devices/+/telemetry/#'] } } });
  const d = await fx.addDevice('dev-s');
  const c1 = await rawDevice(t, fx, d, 'dev-s');
  await waitFor(() => fx.broker.isConnected('dev-s'), 5000, 'registered');
  c1.sock.destroy(); // the first connection re-sent nothing
  await waitFor(() => !fx.broker.isConnected('dev-s'), 5000, 'first connection gone');
  const c2 = await rawDevice(t, fx, d, 'dev-s');
  c2.send({ cmd: 'publish', topic, payload: before, qos: 1, dup: true, retain: false, messageId: 3 });
  await waitFor(() => c2.acked(3) === 1, 5000, 'PUBACK');
  t.same(appended.map(String), [before.toString()], 'on a later connection the same id, topic and payload is journaled (it may be a new message)');
});

t.test('retained messages are bounded per device (count and bytes); over the cap: refused and logged', async (t) => {
  const fx = await brokerFixture(t, {
    overrides: { broker: { limits: { max_retained_per_device: 2, max_retained_bytes_per_device: 200 }, listeners: { local: { enabled: true } } } },
  });
  const d = await fx.addDevice('dev-m');
  const e = await fx.addDevice('dev-n');
  const c = await fx.connect({ clientId: 'dev-m', cert: d.cert, key: d.key });
  await c.publishAsync('devices/dev-m/a', 'x', { qos: 1, retain: true });
  await c.publishAsync('devices/dev-m/b', 'x', { qos: 1, retain: true });
  await c.publishAsync('devices/dev-m/a', 'replaced', { qos: 1, retain: true });
  t.pass('two retained messages, and replacing one of them, are accepted');
  const closed = waitEvent(c, 'close');
  let acked = false;
  c.publish('devices/dev-m/c', 'x', { qos: 1, retain: true }, (err) => (acked = !err));
  await closed;
  t.notOk(acked, 'a third retained message is refused (not acknowledged, connection closed)');
  t.equal(fx.logs.find({ code: 'ECONN_BROKER_LIMIT', msg: 'retained publish refused: over the per-device retained limit; connection closed' }).length, 1, 'one log line');
  // what is retained is exactly what was accepted
  const watcher = await fx.connect({ listener: 'local', clientId: 'watcher' });
  const got: string[] = [];
  watcher.on('message', (topic, payload) => got.push(`${topic}=${payload.toString()}`));
  await watcher.subscribeAsync('devices/dev-m/#', { qos: 1 });
  await waitFor(() => got.length === 2, 5000, 'retained messages');
  t.same(got.sort(), ['devices/dev-m/a=replaced', 'devices/dev-m/b=x']);
  // deleting one frees its slot; a non-retained publish is never limited
  const c2 = await fx.connect({ clientId: 'dev-m', cert: d.cert, key: d.key });
  await c2.publishAsync('devices/dev-m/b', '', { qos: 1, retain: true });
  await c2.publishAsync('devices/dev-m/c', 'x', { qos: 1, retain: true });
  await c2.publishAsync('devices/dev-m/d', 'x', { qos: 1, retain: false });
  t.ok(c2.connected, 'after a delete, a new retained message fits');
  // bytes: payload + topic over 200 bytes
  const c3 = await fx.connect({ clientId: 'dev-n', cert: e.cert, key: e.key });
  const closed3 = waitEvent(c3, 'close');
  c3.publish('devices/dev-n/big', Buffer.alloc(300), { qos: 1, retain: true });
  await closed3;
  t.equal(fx.logs.find({ code: 'ECONN_BROKER_LIMIT', msg: 'retained publish refused: over the per-device retained limit; connection closed' }).length, 2, 'byte cap refused and logged');
  t.ok(c2.connected, 'the other device is unaffected');
});

t.test('revoking a device removes its retained messages and its persistent session; other devices keep theirs', async (t) => {
  const sink = new FakeSink();
  const fx = await brokerFixture(t, { sink, overrides: { bridge: { enabled: true }, broker: { listeners: { local: { enabled: true } } } } });
  const d = await fx.addDevice('dev-v');
  const o = await fx.addDevice('dev-w');
  // a persistent session with a subscription, a retained message, and another device's retained message
  const c = await fx.connect({ clientId: 'dev-v', cert: d.cert, key: d.key, clean: false });
  await c.subscribeAsync('devices/dev-v/commands/#', { qos: 1 });
  await c.publishAsync('devices/dev-v/state', 'on', { qos: 1, retain: true });
  const other = await fx.connect({ clientId: 'dev-w', cert: o.cert, key: o.key });
  await other.publishAsync('devices/dev-w/state', 'on', { qos: 1, retain: true });
  await c.endAsync();
  // while it is offline, a command is queued for it
  const app = await fx.connect({ listener: 'local', clientId: 'app' });
  await app.publishAsync('devices/dev-v/commands/reboot', 'now', { qos: 1 });
  t.equal(sink.appended.filter((x) => x.meta.deviceId === 'dev-v').length, 1, 'its acknowledged message is in the journal (it keeps flowing upstream)');

  const purged = waitEvent<{ deviceId: string; retained: number; subscriptions: number; queued: number }>(fx.broker, 'device-purged');
  await fx.registry.revoke('dev-v');
  const r = await purged;
  t.match(r, { deviceId: 'dev-v', retained: 1, subscriptions: 1, queued: 1 }, 'retained message, subscription and queued message removed');
  t.ok(fx.logs.find({ msg: 'revoked device: its retained messages and persistent session were removed from the broker', deviceId: 'dev-v' }).length === 1, 'logged');

  // a new subscriber sees the other device's retained message only
  const watcher = await fx.connect({ listener: 'local', clientId: 'watcher' });
  const got: string[] = [];
  watcher.on('message', (topic) => got.push(topic));
  await watcher.subscribeAsync('devices/+/state', { qos: 1 });
  await app.publishAsync('devices/dev-w/marker', 'm', { qos: 1 });
  await watcher.subscribeAsync('devices/dev-w/marker', { qos: 1 });
  await app.publishAsync('devices/dev-w/marker', 'm', { qos: 1 });
  await waitFor(() => got.includes('devices/dev-w/marker'), 5000, 'marker');
  t.same(got.filter((x) => x.endsWith('/state')), ['devices/dev-w/state'], "only the other device's retained message is left");

  // registered again (an operator's explicit action), the id starts from nothing: no session, no queued command
  await fx.registry.create('dev-v', {}, { reinstate: true });
  const b = await fx.pki.issueDeviceBundle('dev-v', 'ec');
  await fx.registry.addCertificate('dev-v', { serial: b.serial, fingerprint256: b.fingerprint256, not_after: b.notAfter.toISOString() });
  const raw = await rawDevice(t, fx, b, 'dev-v', false);
  t.match(raw.received[0], { cmd: 'connack', returnCode: 0, sessionPresent: false }, 'no session present');
  await waitFor(() => fx.broker.isConnected('dev-v'), 5000, 'registered');
  raw.send({ cmd: 'pingreq' });
  await waitFor(() => raw.received.some((p) => p.cmd === 'pingresp'), 5000, 'PINGRESP');
  t.same(raw.received.filter((p) => p.cmd === 'publish'), [], 'the command queued for the revoked device is not delivered');
});

t.test('a large publish holds its budget share until aedes is done with it; one whose device left, or a QoS 2 duplicate, gives it back at once', async (t) => {
  const sink = new FakeSink();
  const fx = await brokerFixture(t, { sink, overrides: { bridge: { enabled: true, topics: ['devices/+/telemetry/#'] }, broker: { limits: { large_publish_bytes: 1024 } } } });
  const inFlight = (): number => (fx.broker.status().large_publishes as { in_flight_bytes: number }).in_flight_bytes;
  const a = await fx.addDevice('dev-a');
  const c = await fx.connect({ clientId: 'dev-a', cert: a.cert, key: a.key });
  // aedes' own delivery of the publish (after its PUBACK is written, before it is done with the packet)
  const aedes = (fx.broker as unknown as { aedes: { subscribe(topic: string, fn: (p: unknown, cb: () => void) => void, done: () => void): void } }).aedes;
  const atDelivery: number[] = [];
  await new Promise<void>((resolve) => aedes.subscribe('devices/dev-a/telemetry/big', (_p, cb) => (atDelivery.push(inFlight()), cb()), resolve));

  await c.publishAsync('devices/dev-a/telemetry/big', Buffer.alloc(10_000, 7), { qos: 1 });
  await waitFor(() => atDelivery.length === 1, 5000, 'aedes delivered the publish');
  t.ok(atDelivery[0]! >= 10_000, `still counted while aedes delivers it, after it was authorized and acknowledged (${atDelivery[0]} bytes)`);
  await waitFor(() => inFlight() === 0, 5000, 'the share given back once aedes is done');
  t.equal(sink.appended.length, 1, 'journaled once');

  // the device leaves while its large publish is being journaled: aedes never publishes it, the share comes back
  sink.hold = true;
  c.publish('devices/dev-a/telemetry/big', Buffer.alloc(10_000, 8), { qos: 1 });
  await waitFor(() => sink.held === 1, 5000, 'append started');
  t.ok(inFlight() >= 10_000, 'counted while it is journaled');
  c.stream.destroy();
  await waitFor(() => fx.broker.status().devices_connected === 0, 5000, 'its session ended');
  sink.release();
  await waitFor(() => inFlight() === 0, 5000, 'the share of a publish aedes will not complete is given back');
  t.equal(atDelivery.length, 1, 'not delivered: its device left before the PUBACK');

  // QoS 2: a duplicate is answered with PUBREC and never published again; its share must not wait for the device to leave
  sink.hold = false;
  const b = await fx.addDevice('dev-b');
  const raw = await rawDevice(t, fx, b, 'dev-b', true);
  const big = { cmd: 'publish' as const, topic: 'devices/dev-b/telemetry/big', payload: Buffer.alloc(10_000, 9), qos: 2 as const, messageId: 7, retain: false, dup: false };
  raw.send(big);
  await waitFor(() => raw.received.filter((p) => p.cmd === 'pubrec').length === 1, 5000, 'PUBREC');
  raw.send({ ...big, dup: true });
  await waitFor(() => raw.received.filter((p) => p.cmd === 'pubrec').length === 2, 5000, 'PUBREC of the duplicate');
  await waitFor(() => inFlight() === 0, 5000, 'the duplicate\'s share given back while its device stays connected');
  t.notOk(raw.sock.destroyed, 'still connected');
});
