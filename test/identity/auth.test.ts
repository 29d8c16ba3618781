import t from 'tap';
import path from 'node:path';
import { writeFileSync, renameSync } from 'node:fs';
import { SignJWT, base64url } from 'jose';
import { createPublicKey, createHmac, type JsonWebKey as CryptoJwk } from 'node:crypto';
import { brokerFixture, collect, refused, waitEvent, waitFor, type BrokerFixture } from '../helpers/broker.js';
import { TestCA } from '../helpers/certs.js';
import { tempDir } from '../helpers/daemon.js';
import { X509Certificate } from 'node:crypto';
import { CrlStore, DeviceAuthenticator, certCommonName, certDeviceId, certSanUris } from '../../identity/auth.js';
import { TokenService } from '../../identity/tokens.js';
import { ConnectorError } from '../../core/errors.js';

t.test('certificate identity: CN or SAN URI', async (t) => {
  const ca = await TestCA.create();
  const plain = new X509Certificate((await ca.client({ cn: 'dev-1' })).cert);
  const withSan = new X509Certificate((await ca.client({ cn: 'ignored-cn', sanUri: 'urn:device:dev-2' })).cert);
  const badId = new X509Certificate((await ca.client({ cn: 'bad/id' })).cert);
  const cn = { identity_from: 'cn' as const, san_uri_prefix: 'urn:device:' };
  const san = { identity_from: 'san_uri' as const, san_uri_prefix: 'urn:device:' };
  t.equal(certCommonName(plain), 'dev-1');
  t.same(certDeviceId(plain, cn), { id: 'dev-1' });
  t.same(certDeviceId(withSan, san), { id: 'dev-2' });
  t.same(certDeviceId(withSan, cn), { id: 'ignored-cn' });
  t.same(certSanUris(withSan), ['urn:device:dev-2']);
  t.match(certDeviceId(plain, san), { error: /no SAN URI/ });
  t.match(certDeviceId(withSan, { identity_from: 'san_uri', san_uri_prefix: 'urn:other:' }), { error: /no SAN URI/ });
  t.match(certDeviceId(badId, cn), { error: /not a valid device id/ });
});

t.test('CrlStore: PEM (several blocks), DER, bad files', async (t) => {
  const dir = tempDir(t);
  const ca1 = await TestCA.create();
  const ca2 = await TestCA.create();
  const x = await ca1.client({ cn: 'x' });
  const y = await ca2.client({ cn: 'y' });
  const both = path.join(dir, 'both.pem');
  writeFileSync(both, (await ca1.crl([x.serial])) + '\n' + (await ca2.crl([y.serial])));
  const store = new CrlStore();
  t.equal(store.issuerOf(Buffer.from(x.certificate.rawData)), '', 'no CRL loaded yet: no issuer can match (and the parser is not loaded)');
  t.same(await store.load([]), { crls: 0, entries: 0, stale: [] });
  t.notOk(store.isRevoked(store.issuerOf(Buffer.from(x.certificate.rawData)), x.serial));
  const r = await store.load([both]);
  t.equal(r.crls, 2);
  t.equal(r.entries, 2);
  t.ok(store.isRevoked(store.issuerOf(Buffer.from(x.certificate.rawData)), x.serial));
  t.ok(store.isRevoked(store.issuerOf(Buffer.from(y.certificate.rawData)), y.serial.toUpperCase()), 'serial format does not matter');
  t.notOk(store.isRevoked(store.issuerOf(Buffer.from(y.certificate.rawData)), x.serial), 'keyed by issuer: same serial under another CA is not revoked');
  // DER
  const der = path.join(dir, 'one.der');
  const pem = await ca1.crl([x.serial]);
  writeFileSync(der, Buffer.from(pem.replace(/-----[^-]+-----/g, '').replace(/\s+/g, ''), 'base64'));
  const s2 = new CrlStore();
  await s2.load([der]);
  t.ok(s2.isRevoked(s2.issuerOf(Buffer.from(x.certificate.rawData)), x.serial), 'DER CRL');
  // OpenSSL's label
  const osslLabel = path.join(dir, 'x509.pem');
  writeFileSync(osslLabel, pem.replace(/BEGIN CRL/, 'BEGIN X509 CRL').replace(/END CRL/, 'END X509 CRL'));
  await t.resolves(new CrlStore().load([osslLabel]), '-----BEGIN X509 CRL----- accepted');
  // bad input: clear error naming the file, previous set kept
  const bad = path.join(dir, 'bad.pem');
  writeFileSync(bad, 'garbage');
  await t.rejects(s2.load([bad]), { code: 'ECONN_CRL', message: /bad\.pem/ });
  await t.rejects(s2.load([path.join(dir, 'missing.pem')]), { code: 'ECONN_CRL', message: /missing\.pem/ });
  writeFileSync(bad, '-----BEGIN CRL-----\nAAAA\n-----END CRL-----\n');
  await t.rejects(s2.load([bad]), { code: 'ECONN_CRL' });
  t.ok(s2.isRevoked(s2.issuerOf(Buffer.from(x.certificate.rawData)), x.serial), 'a failed load keeps the previous CRLs');
});

t.test('DeviceAuthenticator never throws and maps failures to CONNACK codes', async (t) => {
  const registry = {
    get: (id: string) => (id === 'dev' ? ({ id, status: 'active', metadata: {}, certificates: [], tokens: [], created_at: '', last_seen_at: null } as never) : undefined),
    isSerialRevoked: () => false,
  };
  const mk = (verify: (tok: string) => Promise<{ deviceId: string; jti: string; exp: number }>) =>
    new DeviceAuthenticator({ registry, tokens: { verify }, crls: new CrlStore(), tls: { identity_from: 'cn', san_uri_prefix: 'urn:device:' } });
  const exp = Math.floor(Date.now() / 1000) + 60;
  const attempt = { auth: 'jwt' as const, clientId: 'dev', username: 'dev', password: Buffer.from('tok'), tls: undefined };
  t.match(await mk(async () => ({ deviceId: 'dev', jti: 'j', exp })).authenticate(attempt), { ok: true, identity: { deviceId: 'dev', via: 'jwt' } });
  t.match(await mk(async () => { throw new TypeError('boom'); }).authenticate(attempt), { ok: false, returnCode: 4, code: 'ECONN_AUTH_TOKEN' }, 'unknown verify error: bad credentials');
  t.match(await mk(async () => { throw new ConnectorError('ECONN_CLOSED', 'closed'); }).authenticate(attempt), { ok: false, returnCode: 3 });
  t.match(await mk(async () => ({ deviceId: 'dev', jti: 'j', exp: exp - 120 })).authenticate(attempt), { ok: false, returnCode: 4, reason: /expired/ }, 'already expired per the broker clock');
  const throwingRegistry = { get: () => { throw new Error('db down'); }, isSerialRevoked: () => false };
  const a2 = new DeviceAuthenticator({ registry: throwingRegistry, tokens: { verify: async () => ({ deviceId: 'dev', jti: 'j', exp }) }, crls: new CrlStore(), tls: { identity_from: 'cn', san_uri_prefix: 'urn:device:' } });
  t.match(await a2.authenticate(attempt), { ok: false, returnCode: 3, code: 'ECONN_INTERNAL' }, 'internal failure: server unavailable');
  const anon = mk(async () => ({ deviceId: 'dev', jti: 'j', exp }));
  t.match(await anon.authenticate({ ...attempt, auth: 'none', clientId: 'app' }), { ok: true, identity: { kind: 'local' } });
  t.match(await anon.authenticate({ ...attempt, auth: 'none', clientId: 'dev' }), { ok: false, returnCode: 2 }, "anonymous clients cannot take a device's client id");
});

t.test('a CA certificate (basicConstraints CA:TRUE) is never a device certificate, even from the trusted CA', async (t) => {
  const ca = await TestCA.create();
  const registry = {
    get: (id: string) => (id === 'dev' ? ({ id, status: 'active', metadata: {}, certificates: [], tokens: [], created_at: '', last_seen_at: null } as never) : undefined),
    isSerialRevoked: () => false,
  };
  const auth = new DeviceAuthenticator({ registry, tokens: { verify: async () => { throw new Error('unused'); } }, crls: new CrlStore(), tls: { identity_from: 'cn', san_uri_prefix: 'urn:device:' } });
  const attempt = (cert: X509Certificate) => auth.authenticate({ auth: 'cert', clientId: 'dev', username: undefined, password: undefined, tls: { cert, authorized: true } });
  // the CA's own certificate re-used with CN=dev stands in for any CA:TRUE leaf the trusted CA signed
  const caLeaf = await TestCA.create({ cn: 'dev' });
  t.match(await attempt(new X509Certificate(caLeaf.cert)), { ok: false, returnCode: 4, code: 'ECONN_AUTH_CERT', reason: /CA certificate/ });
  t.match(await attempt(new X509Certificate((await ca.client({ cn: 'dev' })).cert)), { ok: true, identity: { deviceId: 'dev', via: 'cert' } }, 'an end-entity certificate is accepted');
});

t.test('a token-authenticated session is disconnected at the token expiry', async (t) => {
  const ttl = 86400;
  // the token service runs (ttl - 2) s in the past, so the token it issues expires 2 s from now
  const fx = await brokerFixture(t, { tokenNow: () => Date.now() - (ttl - 2) * 1000, overrides: { identity: { jwt: { ttl_s: ttl } } } });
  const a = await fx.addDevice('dev-a');
  const c = await fx.connect({ clientId: 'dev-a', username: 'dev-a', password: a.token });
  await waitEvent(c, 'close', 15_000);
  t.equal(fx.logs.find({ msg: 'device session dropped', code: 'ECONN_AUTH_TOKEN' }).length, 1, 'dropped for token expiry');
  t.equal((await refused(fx.connect({ clientId: 'dev-a', username: 'dev-a', password: a.token }))).code, 4, 'the expired token is refused afterwards');
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

t.test('identity from the SAN URI (broker.tls.identity_from: san_uri) end to end', async (t) => {
  const fx = await brokerFixture(t, { overrides: { broker: { tls: { identity_from: 'san_uri' } } } });
  const a = await fx.addDevice('dev-a');
  const c = await fx.connect({ clientId: 'dev-a', cert: a.cert, key: a.key });
  t.ok(c.connected, 'the local PKI puts urn:device:ID in the SAN');
  await c.endAsync();
  const other = await TestCA.create();
  const trustedless = await other.client({ cn: 'dev-a' });
  t.equal((await refused(fx.connect({ clientId: 'dev-a', cert: trustedless.cert, key: trustedless.key }))).code, 4);
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
