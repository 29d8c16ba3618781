import t from 'tap';
import path from 'node:path';
import { once } from 'node:events';
import { writeFileSync, renameSync } from 'node:fs';
import tls from 'node:tls';
import { SignJWT, base64url } from 'jose';
import { createPublicKey, createHmac, type JsonWebKey as CryptoJwk } from 'node:crypto';
import { brokerFixture, collect, FakeSink, refused, suback, waitEvent, waitFor } from '../helpers/broker.js';
import { TestCA } from '../helpers/certs.js';
import { TokenService } from '../../broker/tokens.js';
import { ConnectorError } from '../../daemon/errors.js';

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

