import t from 'tap';
import path from 'node:path';
import { once } from 'node:events';
import { writeFileSync, renameSync } from 'node:fs';
import tls from 'node:tls';
import type { MqttClient } from 'mqtt';
import { SignJWT, base64url } from 'jose';
import { createPublicKey, createHmac, type JsonWebKey as CryptoJwk } from 'node:crypto';
import { brokerFixture, FakeSink, suback, waitEvent, waitFor, type BrokerFixture } from '../helpers/broker.js';
import { TestCA } from '../helpers/certs.js';
import { TokenService } from '../../broker/tokens.js';
import { ConnectorError } from '../../daemon/errors.js';

type Refusal = Error & { code?: number | string };

async function refused(p: Promise<MqttClient>): Promise<Refusal> {
  try {
    const c = await p;
    c.end(true);
  } catch (err) {
    return err as Refusal;
  }
  throw new Error('connection was accepted but should have been refused');
}

/** Publish a marker from `sub`'s side and wait until it arrives: everything sent before it was processed. */
async function collect(sub: MqttClient, filter: string): Promise<string[]> {
  const got: string[] = [];
  sub.on('message', (topic) => got.push(topic));
  await sub.subscribeAsync(filter, { qos: 1 });
  return got;
}

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

t.test('refused connections get the right CONNACK code and one log line with a reason code', async (t) => {
  const other = await TestCA.create();
  const trusted = await TestCA.create();
  const fx = await brokerFixture(t, {
    before: (dir) => {
      const f = path.join(dir, 'extra-ca.pem');
      writeFileSync(f, trusted.cert);
      return { broker: { tls: { trusted_ca_files: [f] } } };
    },
  });
  const a = await fx.addDevice('dev-a');
  const b = await fx.addDevice('dev-b');
  const gone = await fx.addDevice('dev-gone');
  await fx.registry.revoke('dev-gone');
  const revokedCert = await fx.addDevice('dev-rc');
  await fx.registry.revokeCertificate(revokedCert.serial);
  const unregistered = await fx.pki.issueDeviceBundle('nobody');
  const foreign = await other.client({ cn: 'dev-a' });
  const expired = await trusted.expiredClient('dev-a');
  const notYet = await trusted.notYetValidClient('dev-a');

  // token forgeries
  const [header, payload, sig] = a.token.split('.') as [string, string, string];
  const claims = JSON.parse(Buffer.from(payload, 'base64url').toString()) as Record<string, unknown>;
  const algNone = `${base64url.encode(JSON.stringify({ alg: 'none', typ: 'JWT' }))}.${payload}.`;
  const tampered = `${header}.${base64url.encode(JSON.stringify({ ...claims, sub: 'dev-b', device_id: 'dev-b' }))}.${sig}`;
  const jwk = (await fx.tokens.publicJwks()).keys[0]!;
  const pubPem = createPublicKey({ key: jwk as unknown as CryptoJwk, format: 'jwk' }).export({ type: 'spki', format: 'pem' }).toString();
  const hsHeader = base64url.encode(JSON.stringify({ alg: 'HS256', typ: 'JWT', kid: JSON.parse(Buffer.from(header, 'base64url').toString()).kid }));
  const hsSig = createHmac('sha256', pubPem).update(`${hsHeader}.${payload}`).digest('base64url');
  const hsConfusion = `${hsHeader}.${payload}.${hsSig}`;
  const pastTokens = new TokenService({ stateDir: fx.dir, config: fx.config.identity.jwt, registry: fx.registry, logger: fx.logs.logger, now: () => Date.now() - 3 * 86400_000 });
  await pastTokens.start();
  const expiredToken = (await pastTokens.issue('dev-a')).token;
  const unsignedForeign = await new SignJWT({ device_id: 'dev-a' }).setProtectedHeader({ alg: 'HS256' }).setSubject('dev-a').setExpirationTime('1h').sign(new TextEncoder().encode('x'.repeat(32)));

  const cases: { name: string; opts: Parameters<BrokerFixture['connect']>[0]; rc: number; code: string }[] = [
    { name: 'no credentials at all', opts: { clientId: 'dev-a' }, rc: 4, code: 'ECONN_AUTH_FAILED' },
    { name: 'certificate from another CA', opts: { clientId: 'dev-a', cert: foreign.cert, key: foreign.key }, rc: 4, code: 'ECONN_AUTH_CERT' },
    { name: 'expired certificate', opts: { clientId: 'dev-a', cert: expired.cert, key: expired.key }, rc: 4, code: 'ECONN_AUTH_CERT' },
    { name: 'not yet valid certificate', opts: { clientId: 'dev-a', cert: notYet.cert, key: notYet.key }, rc: 4, code: 'ECONN_AUTH_CERT' },
    { name: 'revoked certificate (registry)', opts: { clientId: 'dev-rc', cert: revokedCert.cert, key: revokedCert.key }, rc: 4, code: 'ECONN_AUTH_CERT' },
    { name: 'certificate of an unregistered id', opts: { clientId: 'nobody', cert: unregistered.cert, key: unregistered.key }, rc: 5, code: 'ECONN_DEVICE_UNKNOWN' },
    { name: 'certificate of a revoked device', opts: { clientId: 'dev-gone', cert: gone.cert, key: gone.key }, rc: 4, code: 'ECONN_AUTH_CERT' },
    { name: 'client id differs from the certificate identity', opts: { clientId: 'dev-b', cert: a.cert, key: a.key }, rc: 2, code: 'ECONN_AUTH_CLIENT_ID' },
    { name: 'alg none token', opts: { clientId: 'dev-a', username: 'dev-a', password: algNone }, rc: 4, code: 'ECONN_AUTH_TOKEN' },
    { name: 'HS256 token signed with the public key', opts: { clientId: 'dev-a', username: 'dev-a', password: hsConfusion }, rc: 4, code: 'ECONN_AUTH_TOKEN' },
    { name: 'HS256 token with some secret', opts: { clientId: 'dev-a', username: 'dev-a', password: unsignedForeign }, rc: 4, code: 'ECONN_AUTH_TOKEN' },
    { name: 'expired token', opts: { clientId: 'dev-a', username: 'dev-a', password: expiredToken }, rc: 4, code: 'ECONN_AUTH_TOKEN' },
    { name: 'token of a revoked device', opts: { clientId: 'dev-gone', username: 'dev-gone', password: gone.token }, rc: 5, code: 'ECONN_DEVICE_REVOKED' },
    { name: 'tampered token payload', opts: { clientId: 'dev-b', username: 'dev-b', password: tampered }, rc: 4, code: 'ECONN_AUTH_TOKEN' },
    { name: 'token of device A used as device B', opts: { clientId: 'dev-b', username: 'dev-b', password: a.token }, rc: 4, code: 'ECONN_AUTH_TOKEN' },
    { name: 'token garbage', opts: { clientId: 'dev-a', username: 'dev-a', password: 'not-a-token' }, rc: 4, code: 'ECONN_AUTH_TOKEN' },
    { name: 'token ok, client id of another device', opts: { clientId: 'dev-b', username: 'dev-a', password: a.token }, rc: 2, code: 'ECONN_AUTH_CLIENT_ID' },
    { name: 'token ok, client id differs', opts: { clientId: 'other-id', username: 'dev-a', password: a.token }, rc: 2, code: 'ECONN_AUTH_CLIENT_ID' },
    { name: 'empty client id', opts: { clientId: '', username: 'dev-a', password: a.token }, rc: 2, code: 'ECONN_AUTH_CLIENT_ID' },
    { name: 'certificate and token of different devices', opts: { clientId: 'dev-a', cert: a.cert, key: a.key, username: 'dev-b', password: b.token }, rc: 4, code: 'ECONN_AUTH_FAILED' },
  ];
  for (const c of cases) {
    const before = fx.logs.find({ msg: 'MQTT connection refused' }).length;
    const err = await refused(fx.connect(c.opts));
    t.equal(err.code, c.rc, `${c.name}: CONNACK ${c.rc}`);
    await waitFor(() => fx.logs.find({ msg: 'MQTT connection refused' }).length > before, 2000, 'refusal log line');
    const lines = fx.logs.find({ msg: 'MQTT connection refused' }).slice(before);
    t.equal(lines.length, 1, `${c.name}: exactly one log line`);
    t.equal(lines[0]!.code, c.code, `${c.name}: reason code ${c.code}`);
  }
  const all = fx.logs.raw.join('');
  for (const tok of [a.token, b.token, gone.token, expiredToken, tampered, hsConfusion]) t.notOk(all.includes(tok), 'no token in the logs');
  t.notOk(all.includes(payload), 'not even the token payload');
  t.equal(fx.broker.connectedDevices().length, 0);
});

t.test('listener auth modes: cert, jwt, cert+jwt', async (t) => {
  const fx = await brokerFixture(t, { overrides: { broker: { listeners: { tls: { auth: 'cert' }, wss: { auth: 'cert+jwt' } } } } });
  const a = await fx.addDevice('dev-a');
  t.equal((await refused(fx.connect({ clientId: 'dev-a', username: 'dev-a', password: a.token }))).code, 4, 'cert mode: token alone refused');
  const c = await fx.connect({ clientId: 'dev-a', cert: a.cert, key: a.key, username: 'ignored', password: 'ignored' });
  t.ok(c.connected, 'cert mode: certificate accepted, password ignored');
  await c.endAsync();
  t.equal((await refused(fx.connect({ listener: 'wss', clientId: 'dev-a', cert: a.cert, key: a.key }))).code, 4, 'cert+jwt: cert alone refused');
  t.equal((await refused(fx.connect({ listener: 'wss', clientId: 'dev-a', username: 'dev-a', password: a.token }))).code, 4, 'cert+jwt: token alone refused');
  const both = await fx.connect({ listener: 'wss', clientId: 'dev-a', cert: a.cert, key: a.key, username: 'dev-a', password: a.token });
  t.ok(both.connected, 'cert+jwt: both accepted');
  await both.endAsync();
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

t.test('revocation drops live sessions at once', async (t) => {
  const fx = await brokerFixture(t);
  const a = await fx.addDevice('dev-a');
  const b = await fx.addDevice('dev-b');
  const c = await fx.addDevice('dev-c');
  const ca = await fx.connect({ clientId: 'dev-a', cert: a.cert, key: a.key });
  const cb = await fx.connect({ clientId: 'dev-b', username: 'dev-b', password: b.token });
  const cc = await fx.connect({ clientId: 'dev-c', cert: c.cert, key: c.key });
  await waitFor(() => fx.broker.connectedDevices().length === 3, 5000, 'three devices');

  const closedA = waitEvent(ca, 'close');
  await fx.registry.revoke('dev-a');
  await closedA;
  t.pass('device revocation drops its certificate session');
  const closedB = waitEvent(cb, 'close');
  await fx.tokens.revoke(b.jti);
  await closedB;
  t.pass('token revocation drops the session that used it');
  const closedC = waitEvent(cc, 'close');
  await fx.registry.revokeCertificate(c.serial);
  await closedC;
  t.pass('certificate revocation drops the session that used it');
  t.ok(fx.logs.find({ msg: 'device session dropped', code: 'ECONN_DEVICE_REVOKED' }).length >= 1);
  t.equal((await refused(fx.connect({ clientId: 'dev-a', cert: a.cert, key: a.key }))).code, 4, 'revoked device cannot come back');
  t.equal((await refused(fx.connect({ clientId: 'dev-b', username: 'dev-b', password: b.token }))).code, 4, 'revoked token cannot come back');
  t.equal(fx.broker.disconnectDevice('dev-a'), false);
});

t.test('a CRL update is picked up without restart; healthy sessions stay', async (t) => {
  const ext = await TestCA.create();
  let crlFile = '';
  const fx = await brokerFixture(t, {
    before: async (dir) => {
      const caFile = path.join(dir, 'ext-ca.pem');
      writeFileSync(caFile, ext.cert);
      crlFile = path.join(dir, 'ext.crl');
      writeFileSync(crlFile, await ext.crl([]));
      return { broker: { tls: { trusted_ca_files: [caFile], crl_files: [crlFile] } } };
    },
  });
  await fx.registry.create('ext-x', {});
  await fx.registry.create('ext-y', {});
  const x = await ext.client({ cn: 'ext-x' });
  const y = await ext.client({ cn: 'ext-y' });
  const cx = await fx.connect({ clientId: 'ext-x', cert: x.cert, key: x.key });
  const cy = await fx.connect({ clientId: 'ext-y', cert: y.cert, key: y.key });
  const closedX = waitEvent(cx, 'close', 10_000);
  let yClosed = false;
  cy.on('close', () => (yClosed = true));

  // rewrite the CRL (write + rename, as tools do) revoking X only
  writeFileSync(crlFile + '.tmp', await ext.crl([x.serial]));
  renameSync(crlFile + '.tmp', crlFile);
  await closedX;
  t.pass("the session of the now-revoked certificate is dropped");
  const gotY = await collect(cy, 'devices/ext-y/#');
  await cy.publishAsync('devices/ext-y/still-here', 'y', { qos: 1 });
  await waitFor(() => gotY.includes('devices/ext-y/still-here'), 5000, 'Y still works');
  t.notOk(yClosed, "the healthy session stays up");
  t.equal((await refused(fx.connect({ clientId: 'ext-x', cert: x.cert, key: x.key }))).code, 4, 'X is refused from now on');

  // a broken CRL file keeps the previous CRLs in force
  const reloaded = waitEvent<{ error?: unknown }>(fx.broker, 'crl-reloaded', 10_000);
  writeFileSync(crlFile, 'garbage');
  t.ok((await reloaded).error, 'reload failed');
  t.ok(fx.logs.find({ code: 'ECONN_CRL' }).length >= 1, 'logged with ECONN_CRL');
  t.equal((await refused(fx.connect({ clientId: 'ext-x', cert: x.cert, key: x.key }))).code, 4, 'X still refused');
  t.notOk(yClosed, 'Y still up');
  // SIGHUP path: reload() reads the fixed file
  writeFileSync(crlFile, await ext.crl([]));
  const changes = await fx.broker.reload(fx.config);
  t.match(changes.join('\n'), /CRLs reloaded/);
  const again = await fx.connect({ clientId: 'ext-x', cert: x.cert, key: x.key });
  t.ok(again.connected, 'unrevoked by the new CRL');
});
