/**
 * The registration API over real HTTPS on 127.0.0.1 with the real identity
 * components (registry, PKI, tokens, enrollment) in a temp state dir.
 * Uploads are in api-upload.test.ts.
 */
import t, { type Test } from 'tap';
import { X509Certificate } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { spawn } from 'node:child_process';
import path from 'node:path';
import { Writable } from 'node:stream';
import tls from 'node:tls';
import { createLogger } from '../../core/logger.js';
import { SECURITY_HEADERS, hostFromHeader, parseContentDigest } from '../../api/api.js';
import { validateRegisterBody } from '../../api/schemas.js';
import { TestCA, createCsr } from '../helpers/certs.js';
import { apiEnv, buildConfig, type Response } from './api-fixtures.js';
import { x509, importPrivateKeyPem, signingAlgorithm } from '../../core/x509.js';
import { startDaemon, runCli, tempDir, REPO } from '../helpers/daemon.js';
import { decodeJwt } from 'jose';

function checkSecurityHeaders(t: Test, r: Response): void {
  for (const [k, v] of Object.entries(SECURITY_HEADERS)) t.equal(r.headers[k], v, `${k} header`);
  t.notOk(r.headers['x-powered-by'], 'no X-Powered-By');
  t.notOk(r.headers.server, 'no Server header');
}

function checkError(t: Test, r: Response, status: number, code: string): void {
  t.equal(r.status, status, `status ${status} (${r.text.slice(0, 200)})`);
  t.equal(r.json.code, code, `code ${code}`);
  t.type(r.json.error, 'string', 'error field');
  t.type(r.json.message, 'string', 'message field');
  t.notMatch(r.text, /\bat .+\.(ts|js):\d+/, 'no stack trace');
  t.match(String(r.headers['content-type']), /^application\/json/, 'JSON content type');
  checkSecurityHeaders(t, r);
}

t.test('pure helpers', async (t) => {
  t.equal(hostFromHeader('gw.example:8443'), 'gw.example');
  t.equal(hostFromHeader('[::1]:8443'), '[::1]');
  t.equal(hostFromHeader('127.0.0.1'), '127.0.0.1');
  t.equal(hostFromHeader('evil.example/path'), undefined);
  t.equal(hostFromHeader('a b'), undefined);
  t.equal(hostFromHeader(undefined), undefined);
  const d = Buffer.alloc(32, 7);
  t.same(parseContentDigest(`sha-256=:${d.toString('base64')}:`), d);
  t.same(parseContentDigest(`sha-512=:${Buffer.alloc(64).toString('base64')}:, sha-256=:${d.toString('base64')}:`), d);
  t.equal(parseContentDigest(`sha-512=:${Buffer.alloc(64).toString('base64')}:`), undefined, 'no sha-256: ignored');
  t.equal(parseContentDigest(undefined), undefined);
  t.throws(() => parseContentDigest('sha-256=abc'), { code: 'ECONN_BAD_REQUEST' });
  t.throws(() => parseContentDigest(`sha-256=:${Buffer.alloc(16).toString('base64')}:`), { code: 'ECONN_BAD_REQUEST' });
  const v = validateRegisterBody({ device_id: 'ok-1', metadata: { capabilities: 'x' } });
  t.equal(v.ok, false);
  if (!v.ok) t.match(v.message, /metadata\.capabilities must be of type array/);
  const w = validateRegisterBody({ device_id: 'a/b' });
  if (!w.ok) t.match(w.message, /^device_id must be/);
  const x = validateRegisterBody({ device_id: 'a', extra: 1 });
  if (!x.ok) t.match(x.message, /extra is not a known field/);
});

t.test('register with an enrollment token (no CSR): token works, enrollment token is single-use', async (t) => {
  const logLines: string[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, cb) {
      logLines.push(chunk.toString());
      cb();
    },
  });
  const env = await apiEnv(t, { logger: createLogger({ level: 'info', destination: sink }) });
  const enr = await env.enroll();
  const r = await env.request({ path: '/api/register', bearer: enr, json: { device_id: 'sensor-1', metadata: { description: 'boiler room', capabilities: ['temp'] } } });
  t.equal(r.status, 201, r.text);
  checkSecurityHeaders(t, r);
  // issue 13: the documented answer, field by field
  t.equal(r.json.status, 'success');
  t.equal(r.json.device_id, 'sensor-1');
  t.type(r.json.token, 'string');
  t.ok(!Number.isNaN(Date.parse(String(r.json.expires_at))), 'expires_at is a date');
  t.match(String(r.json.expires_at), /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$/, 'ISO 8601');
  t.equal(r.json.certificate, undefined, 'no certificate without a CSR');
  t.equal(r.json.ca_certificate, env.pki.caCertificatePem());
  t.same(r.json.cloud_endpoints, { pub_sub: 'wss://127.0.0.1:18884/mqtt', api: `https://127.0.0.1:${env.port}`, mqtts: 'mqtts://127.0.0.1:18883' });
  t.same(Object.keys(r.json).sort(), ['ca_certificate', 'cloud_endpoints', 'device_id', 'expires_at', 'status', 'token'], 'no old fields (endpoints, "registered")');
  const claims = await env.tokens.verify(String(r.json.token));
  t.equal(claims.deviceId, 'sensor-1');
  t.same(env.registry.get('sensor-1')?.metadata, { description: 'boiler room', capabilities: ['temp'] });

  const again = await env.request({ path: '/api/register', bearer: enr, json: { device_id: 'sensor-2' } });
  checkError(t, again, 401, 'ECONN_ENROLL_TOKEN');
  t.match(String(again.headers['www-authenticate']), /^Bearer/);
  t.equal(env.registry.get('sensor-2'), undefined, 'second device not created');

  const none = await env.request({ path: '/api/register', json: { device_id: 'sensor-3' } });
  checkError(t, none, 401, 'ECONN_ENROLL_TOKEN');
  t.match(String(none.headers['www-authenticate']), /^Bearer/);

  const all = logLines.join('');
  t.notOk(all.includes(enr), 'enrollment token never logged');
  t.notOk(all.includes(String(r.json.token)), 'device token never logged');
  t.match(all, /"code":"ECONN_ENROLL_TOKEN"/, 'refusal logged with its code');
});

t.test('an enrollment token with several uses; an expired one is refused', async (t) => {
  const env = await apiEnv(t);
  const multi = await env.enroll({ uses: 2 });
  t.equal((await env.request({ path: '/api/register', bearer: multi, json: { device_id: 'm1' } })).status, 201);
  t.equal((await env.request({ path: '/api/register', bearer: multi, json: { device_id: 'm2' } })).status, 201);
  checkError(t, await env.request({ path: '/api/register', bearer: multi, json: { device_id: 'm3' } }), 401, 'ECONN_ENROLL_TOKEN');

  const short = await env.enroll({ ttlS: 60 });
  env.clock.t += 61_000;
  checkError(t, await env.request({ path: '/api/register', bearer: short, json: { device_id: 'late' } }), 401, 'ECONN_ENROLL_TOKEN');
  t.equal(env.registry.get('late'), undefined);
  checkError(t, await env.request({ path: '/api/register', bearer: 'enr_not-a-real-token', json: { device_id: 'x' } }), 401, 'ECONN_ENROLL_TOKEN');
});

t.test('CSR round trip, EC and RSA: the certificate chains to ca_certificate and names the device', async (t) => {
  const env = await apiEnv(t);
  for (const keyType of ['ec', 'rsa'] as const) {
    const id = `cam-${keyType}`;
    const { csr } = await createCsr(id, keyType);
    const r = await env.request({ path: '/api/register', bearer: await env.enroll(), json: { device_id: id, csr } });
    t.equal(r.status, 201, r.text);
    const cert = new X509Certificate(String(r.json.certificate));
    const ca = new X509Certificate(String(r.json.ca_certificate));
    t.ok(cert.checkIssued(ca), `${keyType}: issued by the CA`);
    t.ok(cert.verify(ca.publicKey), `${keyType}: CA signature verifies`);
    t.match(cert.subject, new RegExp(`CN=${id}`));
    t.equal(cert.publicKey.asymmetricKeyType, keyType, `${keyType} key kept`);
    const rec = env.registry.get(id)!;
    t.equal(rec.certificates.length, 1, 'serial recorded');
    t.equal(rec.certificates[0]!.fingerprint256, cert.fingerprint256);
  }
  // a CSR naming another device, a tampered CSR, garbage: 400 and the enrollment token is not used up
  const enr = await env.enroll();
  const other = await createCsr('somebody-else');
  checkError(t, await env.request({ path: '/api/register', bearer: enr, json: { device_id: 'cam-x', csr: other.csr } }), 400, 'ECONN_PKI');
  checkError(t, await env.request({ path: '/api/register', bearer: enr, json: { device_id: 'cam-x', csr: 'hello' } }), 400, 'ECONN_PKI');
  const good = await createCsr('cam-x');
  const lines = good.csr.trim().split('\n');
  const body = lines.slice(1, -1).join('');
  const tampered = [lines[0], body.slice(0, 60) + (body[60] === 'A' ? 'B' : 'A') + body.slice(61), lines.at(-1)].join('\n');
  const tr = await env.request({ path: '/api/register', bearer: enr, json: { device_id: 'cam-x', csr: tampered } });
  checkError(t, tr, 400, 'ECONN_PKI');
  t.equal(env.registry.get('cam-x'), undefined, 'nothing registered');
  const ok = await env.request({ path: '/api/register', bearer: enr, json: { device_id: 'cam-x', csr: good.csr } });
  t.equal(ok.status, 201, 'the enrollment token was still unused');
});

t.test('device-held certificate: recorded when it chains to a trusted CA and names the device', async (t) => {
  const env = await apiEnv(t);
  const bundle = await env.pki.issueDeviceBundle('held-1');
  const r = await env.request({ path: '/api/register', bearer: await env.enroll(), json: { device_id: 'held-1', certificate: bundle.cert } });
  t.equal(r.status, 201, r.text);
  t.equal(r.json.certificate, undefined);
  t.equal(env.registry.get('held-1')!.certificates[0]!.serial, bundle.serial);
  const foreign = await (await TestCA.create()).client({ cn: 'held-2' });
  const enr = await env.enroll();
  checkError(t, await env.request({ path: '/api/register', bearer: enr, json: { device_id: 'held-2', certificate: foreign.cert } }), 400, 'ECONN_PKI');
  const misnamed = await env.pki.issueDeviceBundle('held-3');
  checkError(t, await env.request({ path: '/api/register', bearer: enr, json: { device_id: 'held-2', certificate: misnamed.cert } }), 400, 'ECONN_PKI');
  const both = await createCsr('held-2');
  checkError(t, await env.request({ path: '/api/register', bearer: enr, json: { device_id: 'held-2', certificate: misnamed.cert, csr: both.csr } }), 400, 'ECONN_BAD_REQUEST');
});

t.test('bootstrap CA client certificate registers without an enrollment token; other client certs do not', async (t) => {
  const boot = await TestCA.create({ cn: 'Factory CA' });
  const dir = t.testdir();
  const bootFile = path.join(dir, 'bootstrap.crt');
  writeFileSync(bootFile, boot.cert);
  const env = await apiEnv(t, { config: { api: { bootstrap_ca_files: [bootFile] } } });
  const factory = await boot.client({ cn: 'boot-1' });
  const { csr } = await createCsr('boot-1');
  const r = await env.request({ path: '/api/register', cert: factory.cert, key: factory.key, json: { device_id: 'boot-1', csr } });
  t.equal(r.status, 201, r.text);
  t.ok(new X509Certificate(String(r.json.certificate)).verify(new X509Certificate(env.ca).publicKey));

  // issue 9 #4: a factory certificate registers only the identity it names (CN here, as the broker reads it)
  const other = await env.request({ path: '/api/register', cert: factory.cert, key: factory.key, json: { device_id: 'boot-other' } });
  checkError(t, other, 403, 'ECONN_NOT_AUTHORIZED');
  t.match(String(other.json.message), /only the device it names/);
  t.equal(env.registry.get('boot-other'), undefined, 'one factory certificate cannot mint other ids');
  // ...and cannot bring its device back after a revocation
  await env.registry.revoke('boot-1');
  const back = await env.request({ path: '/api/register', cert: factory.cert, key: factory.key, json: { device_id: 'boot-1' } });
  checkError(t, back, 409, 'ECONN_DEVICE_EXISTS');
  t.match(String(back.json.message), /--reinstate/);
  t.equal(env.registry.get('boot-1')?.status, 'revoked', 'revocation not undone through the API');
  const nameless = await boot.client({ cn: 'not a valid id!' });
  checkError(t, await env.request({ path: '/api/register', cert: nameless.cert, key: nameless.key, json: { device_id: 'boot-5' } }), 403, 'ECONN_NOT_AUTHORIZED');

  const stranger = await (await TestCA.create()).client({ cn: 'stranger' });
  checkError(t, await env.request({ path: '/api/register', cert: stranger.cert, key: stranger.key, json: { device_id: 'boot-2' } }), 401, 'ECONN_ENROLL_TOKEN');
  // a device certificate of the local CA is not a bootstrap credential
  const dev = await env.pki.issueDeviceBundle('boot-1');
  checkError(t, await env.request({ path: '/api/register', cert: dev.cert, key: dev.key, json: { device_id: 'boot-3' } }), 401, 'ECONN_ENROLL_TOKEN');
  const expired = await boot.expiredClient('old-factory');
  checkError(t, await env.request({ path: '/api/register', cert: expired.cert, key: expired.key, json: { device_id: 'boot-4' } }), 401, 'ECONN_ENROLL_TOKEN');
});

t.test('duplicate device: 409, and a refused registration does not use up the enrollment token', async (t) => {
  const env = await apiEnv(t);
  await env.register('dup-1');
  const enr = await env.enroll();
  const r = await env.request({ path: '/api/register', bearer: enr, json: { device_id: 'dup-1' } });
  checkError(t, r, 409, 'ECONN_DEVICE_EXISTS');
  // issue 9: the one-time token is still good for a registration that succeeds
  const ok = await env.request({ path: '/api/register', bearer: enr, json: { device_id: 'dup-2' } });
  t.equal(ok.status, 201, `the token survived the 409: ${ok.text}`);
  checkError(t, await env.request({ path: '/api/register', bearer: enr, json: { device_id: 'dup-3' } }), 401, 'ECONN_ENROLL_TOKEN');
  // without a valid enrollment token, an existing id is not revealed: 401, not 409
  checkError(t, await env.request({ path: '/api/register', bearer: 'enr_not-a-real-token', json: { device_id: 'dup-1' } }), 401, 'ECONN_ENROLL_TOKEN');
  checkError(t, await env.request({ path: '/api/register', bearer: enr, json: { device_id: 'dup-1' } }), 401, 'ECONN_ENROLL_TOKEN');
});

t.test('a revoked (deregistered) id cannot be registered again with an enrollment token; the operator reinstates it', async (t) => {
  const env = await apiEnv(t);
  const reg = await env.register('comeback');
  const d = await env.request({ path: '/api/deregister/comeback', bearer: String(reg.token) });
  t.equal(d.status, 200, d.text);
  const enr = await env.enroll();
  const again = await env.request({ path: '/api/register', bearer: enr, json: { device_id: 'comeback' } });
  checkError(t, again, 409, 'ECONN_DEVICE_EXISTS');
  t.match(String(again.json.message), /connector device add comeback --reinstate/);
  t.equal(env.registry.get('comeback')?.status, 'revoked');
  t.ok(await env.enrollment.check(enr), 'the enrollment token was not used up by the refusal');
  // the explicit operator action (what `connector device add ID --reinstate` does through the admin socket)
  await env.registry.create('comeback', {}, { reinstate: true });
  t.equal(env.registry.get('comeback')?.status, 'active');
  checkError(t, await env.request({ method: 'GET', path: '/api/devices/comeback/status', bearer: String(reg.token) }), 401, 'ECONN_AUTH_TOKEN');
});

t.test('a registration that fails after the enrollment check gives the use back and leaves no device behind', async (t) => {
  const env = await apiEnv(t);
  const enr = await env.enroll();
  // a CSR that passes the API's checks but that the PKI refuses to sign: simulate with a PKI failure
  const { csr } = await createCsr('fail-1');
  const orig = env.pki.signCsr.bind(env.pki);
  env.pki.signCsr = async () => {
    throw new Error('disk full while signing');
  };
  const r = await env.request({ path: '/api/register', bearer: enr, json: { device_id: 'fail-1', csr } });
  checkError(t, r, 500, 'ECONN_INTERNAL');
  t.equal(env.registry.get('fail-1'), undefined, 'no half-registered (or revoked) device left');
  env.pki.signCsr = orig;
  const ok = await env.request({ path: '/api/register', bearer: enr, json: { device_id: 'fail-1', csr } });
  t.equal(ok.status, 201, `same token, same id, now succeeds: ${ok.text}`);
});

t.test('token renewal within the grace period, refused after it; the old token is retired by the renewal', async (t) => {
  const env = await apiEnv(t, { config: { identity: { jwt: { ttl_s: 600, renew_grace_s: 300, clock_skew_s: 5 } } } });
  const reg = await env.register('renew-1');
  const old = String(reg.token);
  const r1 = await env.request({ path: '/api/token/renew', bearer: old });
  t.equal(r1.status, 200, r1.text);
  checkSecurityHeaders(t, r1);
  t.equal(r1.json.device_id, 'renew-1');
  t.not(r1.json.token, old);
  t.match(String(r1.json.expires_at), /Z$/);
  // issue 9: a renewed token retires the old one
  checkError(t, await env.request({ method: 'GET', path: '/api/devices/renew-1/status', bearer: old }), 401, 'ECONN_AUTH_TOKEN');
  checkError(t, await env.request({ path: '/api/token/renew', bearer: old }), 401, 'ECONN_AUTH_TOKEN');
  const cur = String(r1.json.token);
  t.equal((await env.request({ method: 'GET', path: '/api/devices/renew-1/status', bearer: cur })).status, 200, 'the new token works');

  env.clock.t += 700_000; // current token expired 100 s ago: inside the 300 s grace
  await t.rejects(env.tokens.verify(cur), { code: 'ECONN_AUTH_TOKEN' }, 'expired token no longer valid');
  const r2 = await env.request({ path: '/api/token/renew', bearer: cur, json: {} });
  t.equal(r2.status, 200, `renewed inside the grace: ${r2.text}`);

  env.clock.t += 400_000; // 500 s after expiry
  const late = await env.tokens.issue('renew-1');
  env.clock.t += 1_100_000; // this one expired 500 s ago: past grace
  const r3 = await env.request({ path: '/api/token/renew', bearer: late.token });
  checkError(t, r3, 401, 'ECONN_AUTH_TOKEN');
  t.match(String(r3.headers['www-authenticate']), /invalid_token/);
  checkError(t, await env.request({ path: '/api/token/renew' }), 401, 'ECONN_AUTH_FAILED');
  checkError(t, await env.request({ path: '/api/token/renew', headers: { authorization: 'Basic dXNlcjpwYXNz' } }), 401, 'ECONN_AUTH_FAILED');
  checkError(t, await env.request({ path: '/api/token/renew', bearer: 'eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.' }), 401, 'ECONN_AUTH_TOKEN');
});

t.test('deregister: only the device itself; afterwards its token is refused', async (t) => {
  const env = await apiEnv(t);
  const a = await env.register('dereg-a');
  const b = await env.register('dereg-b');
  checkError(t, await env.request({ path: '/api/deregister/dereg-a', bearer: String(b.token) }), 403, 'ECONN_NOT_AUTHORIZED');
  checkError(t, await env.request({ path: '/api/deregister/dereg-a' }), 401, 'ECONN_AUTH_FAILED');
  const revokedEvents: string[] = [];
  env.registry.on('revoked', (id: string) => revokedEvents.push(id));
  const r = await env.request({ path: '/api/deregister/dereg-a', bearer: String(a.token) });
  t.equal(r.status, 200, r.text);
  t.same(r.json, { status: 'success', message: 'Device deregistered', device_id: 'dereg-a' }, 'the documented answer');
  checkSecurityHeaders(t, r);
  t.same(revokedEvents, ['dereg-a'], "registry emitted 'revoked' (the broker drops live sessions on it)");
  t.equal(env.registry.get('dereg-a')?.status, 'revoked');
  checkError(t, await env.request({ method: 'GET', path: '/api/devices/dereg-a/status', bearer: String(a.token) }), 401, 'ECONN_DEVICE_REVOKED');
  checkError(t, await env.request({ path: '/api/token/renew', bearer: String(a.token) }), 401, 'ECONN_DEVICE_REVOKED');
  t.equal((await env.request({ method: 'GET', path: '/api/devices/dereg-b/status', bearer: String(b.token) })).status, 200, 'the other device is untouched');
});

t.test('deregister and status with the device certificate (no token)', async (t) => {
  const env = await apiEnv(t, { isConnected: (id) => id === 'certdev' });
  const { csr, key } = await createCsr('certdev');
  const reg = await env.register('certdev', { csr });
  const cert = String(reg.certificate);
  const s = await env.request({ method: 'GET', path: '/api/devices/certdev/status', cert, key });
  t.equal(s.status, 200, s.text);
  t.equal(s.json.connected, true);
  const other = await env.register('other');
  checkError(t, await env.request({ method: 'GET', path: '/api/devices/other/status', cert, key }), 403, 'ECONN_NOT_AUTHORIZED');
  void other;
  const d = await env.request({ path: '/api/deregister/certdev', cert, key });
  t.equal(d.status, 200, d.text);
  checkError(t, await env.request({ method: 'GET', path: '/api/devices/certdev/status', cert, key }), 401, 'ECONN_AUTH_CERT');
});

t.test('status: a device sees itself, not another device', async (t) => {
  const env = await apiEnv(t);
  const a = await env.register('stat-a', { metadata: { url: 'http://10.0.0.5/', capabilities: ['camera'] } });
  await env.register('stat-b');
  const r = await env.request({ method: 'GET', path: '/api/devices/stat-a/status', bearer: String(a.token) });
  t.equal(r.status, 200, r.text);
  checkSecurityHeaders(t, r);
  t.same(r.json, { device_id: 'stat-a', status: 'active', connected: null, last_seen: null, metadata: { url: 'http://10.0.0.5/', capabilities: ['camera'] } });
  env.registry.touch('stat-a');
  const r2 = await env.request({ method: 'GET', path: '/api/devices/stat-a/status', bearer: String(a.token) });
  t.type(r2.json.last_seen, 'string');
  checkError(t, await env.request({ method: 'GET', path: '/api/devices/stat-b/status', bearer: String(a.token) }), 403, 'ECONN_NOT_AUTHORIZED');
  checkError(t, await env.request({ method: 'GET', path: '/api/devices/nobody/status', bearer: String(a.token) }), 403, 'ECONN_NOT_AUTHORIZED');
  checkError(t, await env.request({ method: 'GET', path: '/api/devices/stat-a/status' }), 401, 'ECONN_AUTH_FAILED');
  checkError(t, await env.request({ method: 'POST', path: '/api/devices/stat-a/status', bearer: String(a.token) }), 405, 'ECONN_METHOD_NOT_ALLOWED');
  checkError(t, await env.request({ method: 'GET', path: '/api/devices/a%2Fb/status', bearer: String(a.token) }), 400, 'ECONN_BAD_REQUEST');
});

t.test('bad requests: JSON, schema, content type, size, routes', async (t) => {
  const env = await apiEnv(t, { config: { api: { max_body_bytes: 2048 } } });
  const enr = await env.enroll();
  const post = (body: string, ct = 'application/json'): Promise<Response> => env.request({ path: '/api/register', bearer: enr, body, headers: { 'content-type': ct } });

  checkError(t, await post('{"device_id": "x",'), 400, 'ECONN_BAD_REQUEST');
  const wrongType = await post(JSON.stringify({ device_id: 42 }));
  checkError(t, wrongType, 400, 'ECONN_BAD_REQUEST');
  t.match(String(wrongType.json.message), /device_id must be of type string/);
  const wrongMeta = await post(JSON.stringify({ device_id: 'ok', metadata: { capabilities: [1] } }));
  checkError(t, wrongMeta, 400, 'ECONN_BAD_REQUEST');
  t.match(String(wrongMeta.json.message), /metadata\.capabilities\.0/);
  const missing = await post(JSON.stringify({ metadata: {} }));
  t.match(String(missing.json.message), /device_id is required/);
  const badId = await post(JSON.stringify({ device_id: 'dev/+/#' }));
  checkError(t, badId, 400, 'ECONN_BAD_REQUEST');
  t.match(String(badId.json.message), /device_id must be/);
  const group = await post(JSON.stringify({ device_id: 'g', metadata: { group: 'admins' } }));
  checkError(t, group, 400, 'ECONN_BAD_REQUEST');
  t.match(String(group.json.message), /operator/);
  checkError(t, await post('[1,2]'), 400, 'ECONN_BAD_REQUEST');
  checkError(t, await post('null'), 400, 'ECONN_BAD_REQUEST');
  checkError(t, await post(JSON.stringify({ device_id: 'x' }), 'text/plain'), 415, 'ECONN_UNSUPPORTED_MEDIA_TYPE');
  checkError(t, await env.request({ path: '/api/register', bearer: enr }), 400, 'ECONN_BAD_REQUEST');

  const big = JSON.stringify({ device_id: 'big', metadata: { description: 'x'.repeat(5000) } });
  checkError(t, await post(big), 413, 'ECONN_PAYLOAD_TOO_LARGE');
  // the same without Content-Length: the reader stops at the limit
  const chunked = await env.request({
    path: '/api/register',
    bearer: enr,
    headers: { 'content-type': 'application/json' },
    body: (async function* () {
      for (let i = 0; i < 64; i++) yield Buffer.from('x'.repeat(1024));
    })(),
  });
  checkError(t, chunked, 413, 'ECONN_PAYLOAD_TOO_LARGE');

  const nf = await env.request({ method: 'GET', path: '/nope' });
  checkError(t, nf, 404, 'ECONN_NOT_FOUND');
  checkError(t, await env.request({ method: 'GET', path: '/api/register' }), 405, 'ECONN_METHOD_NOT_ALLOWED');
  const m = await env.request({ method: 'DELETE', path: '/api/register' });
  t.equal(m.headers.allow, 'POST');

  // the enrollment token survived all of this: nothing consumed it
  t.equal((await post(JSON.stringify({ device_id: 'finally' }))).status, 201);
  t.equal(env.registry.list().length, 1);
});

t.test('malformed HTTP gets a JSON 400 with security headers; the server stays up', async (t) => {
  const env = await apiEnv(t);
  const raw = await new Promise<string>((resolve, reject) => {
    const s = tls.connect({ host: '127.0.0.1', port: env.port, ca: env.ca, servername: 'localhost' }, () => s.write('GARBAGE / HTTP/1.1\r\nHost: x\r\n\r\n'));
    let out = '';
    s.on('data', (d: Buffer) => (out += d.toString()));
    s.on('end', () => resolve(out));
    s.on('error', reject);
  });
  t.match(raw, /^HTTP\/1\.1 400/);
  t.match(raw, /x-content-type-options: nosniff/i);
  t.match(raw, /"code":"ECONN_BAD_REQUEST"/);
  const ok = await env.request({ method: 'GET', path: '/nope' });
  t.equal(ok.status, 404, 'still serving');
});

t.test('a request without Host (or with Host past the 64 headers kept) gets a JSON 400 with a code, not Node\'s bare 400', async (t) => {
  const env = await apiEnv(t);
  const raw = (request: string): Promise<string> =>
    new Promise<string>((resolve, reject) => {
      const s = tls.connect({ host: '127.0.0.1', port: env.port, ca: env.ca, servername: 'localhost' }, () => s.write(request));
      let out = '';
      s.on('data', (d: Buffer) => (out += d.toString()));
      s.on('end', () => resolve(out));
      s.on('error', reject);
    });
  const many = Array.from({ length: 100 }, (_, i) => `x-h${i}: v\r\n`).join('');
  for (const [name, req] of [
    ['no Host', 'GET /api/devices/x/status HTTP/1.1\r\nConnection: close\r\n\r\n'],
    ['Host after 100 other headers', `GET /api/devices/x/status HTTP/1.1\r\n${many}Host: localhost\r\nConnection: close\r\n\r\n`],
  ]) {
    const out = await raw(req!);
    t.match(out, /^HTTP\/1\.1 400/, `${name}: 400`);
    t.match(out, /x-content-type-options: nosniff/i, `${name}: security headers`);
    t.match(out, /"code":"ECONN_BAD_REQUEST"/, `${name}: a code`);
    t.match(out, /Host header/, `${name}: says why`);
  }
  const ok = await env.request({ method: 'GET', path: '/nope' });
  t.equal(ok.status, 404, 'still serving');
});

t.test('TLS: the minimum version is enforced, the Host header shapes endpoints', async (t) => {
  const connect = (port: number, ca: string, opts: tls.ConnectionOptions): Promise<string> =>
    new Promise((resolve, reject) => {
      const s = tls.connect({ host: '127.0.0.1', port, ca, servername: 'localhost', ...opts }, () => {
        resolve(s.getProtocol() ?? '');
        s.end();
      });
      s.on('error', reject);
    });
  const strict = await apiEnv(t, { config: { broker: { tls: { min_version: 'TLSv1.3' } } } });
  await t.rejects(connect(strict.port, strict.ca, { maxVersion: 'TLSv1.2' }), 'TLS 1.2 refused when the minimum is 1.3');
  t.equal(await connect(strict.port, strict.ca, {}), 'TLSv1.3');
  const env = await apiEnv(t);
  t.equal(await connect(env.port, env.ca, { maxVersion: 'TLSv1.2' }), 'TLSv1.2', 'TLS 1.2 accepted by default');
  await t.rejects(connect(env.port, env.ca, { minVersion: 'TLSv1', maxVersion: 'TLSv1.1', ciphers: 'DEFAULT:@SECLEVEL=0' }), 'TLS 1.1 refused');
  const enr = await env.enroll();
  const r = await env.request({ path: '/api/register', bearer: enr, headers: { host: 'gw.example:8443' }, json: { device_id: 'hosty' } });
  t.equal(r.status, 201);
  t.same(r.json.cloud_endpoints, { pub_sub: 'wss://gw.example:18884/mqtt', api: `https://gw.example:${env.port}`, mqtts: 'mqtts://gw.example:18883' });
});

t.test('in the daemon, driven by curl and openssl as the docs show', async (t) => {
  const d = await startDaemon(t);
  t.type(d.ports.api, 'number', 'the ready line reports the api port');
  const ca = path.join(d.stateDir, 'pki', 'ca.crt');
  const enroll = await runCli(['enroll', 'create', '-c', d.configFile]);
  t.equal(enroll.code, 0, enroll.stderr);
  const enr = enroll.stdout.split('\n')[0]!;
  const dir = t.testdir();
  const sh = (cmd: string, args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> =>
    new Promise((resolve, reject) => {
      const p = spawn(cmd, args, { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] });
      let stdout = '';
      let stderr = '';
      p.stdout.setEncoding('utf8').on('data', (s: string) => (stdout += s));
      p.stderr.setEncoding('utf8').on('data', (s: string) => (stderr += s));
      p.on('error', reject);
      p.on('close', (code) => resolve({ code, stdout, stderr }));
    });
  const req = await sh('openssl', ['req', '-new', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', 'curl-dev.key', '-out', 'curl-dev.csr', '-subj', '/CN=curl-dev']);
  t.equal(req.code, 0, req.stderr);
  writeFileSync(path.join(dir, 'register.json'), JSON.stringify({ device_id: 'curl-dev', csr: readFileSync(path.join(dir, 'curl-dev.csr'), 'utf8') }));
  const url = `https://127.0.0.1:${d.ports.api}`;
  const reg = await sh('curl', ['-sS', '--cacert', ca, '-H', `Authorization: Bearer ${enr}`, '-H', 'Content-Type: application/json', '--data-binary', '@register.json', '-w', '\n%{http_code}', `${url}/api/register`]);
  const [body, code] = [reg.stdout.slice(0, reg.stdout.lastIndexOf('\n')), reg.stdout.slice(reg.stdout.lastIndexOf('\n') + 1)];
  t.equal(code, '201', `register answered ${code} ${reg.stderr}`);
  const json = JSON.parse(body) as Record<string, unknown>;
  t.equal(json.device_id, 'curl-dev');
  t.equal(json.status, 'success');
  const endpoints = json.cloud_endpoints as Record<string, string>;
  t.equal(endpoints.api, url);
  // the broker's bound ports, when it is wired in (read from ctx.ports at request time)
  if (d.ports.mqtt_tls) t.equal(endpoints.mqtts, `mqtts://127.0.0.1:${d.ports.mqtt_tls}`);
  if (d.ports.mqtt_wss) t.equal(endpoints.pub_sub, `wss://127.0.0.1:${d.ports.mqtt_wss}/mqtt`);
  writeFileSync(path.join(dir, 'curl-dev.crt'), String(json.certificate));
  writeFileSync(path.join(dir, 'curl-dev.token'), String(json.token));

  const status = await sh('curl', ['-sS', '--cacert', ca, '--cert', 'curl-dev.crt', '--key', 'curl-dev.key', `${url}/api/devices/curl-dev/status`]);
  t.equal((JSON.parse(status.stdout) as Record<string, unknown>).status, 'active', status.stderr);
  const renew = await sh('curl', ['-sS', '--cacert', ca, '-X', 'POST', '-H', `Authorization: Bearer ${String(json.token)}`, `${url}/api/token/renew`]);
  t.equal((JSON.parse(renew.stdout) as Record<string, unknown>).device_id, 'curl-dev', renew.stderr);
  const head = await sh('curl', ['-sS', '-i', '--cacert', ca, `${url}/nope`]);
  t.match(head.stdout, /^HTTP\/1\.1 404/);
  t.match(head.stdout, /strict-transport-security: max-age=31536000; includeSubDomains/i);
  t.match(head.stdout, /x-xss-protection: 1; mode=block/i);

  // deregistration, then only the operator brings the id back (connector device add ID --reinstate)
  const dereg = await sh('curl', ['-sS', '--cacert', ca, '--cert', 'curl-dev.crt', '--key', 'curl-dev.key', '-X', 'POST', `${url}/api/deregister/curl-dev`]);
  t.same(JSON.parse(dereg.stdout), { status: 'success', message: 'Device deregistered', device_id: 'curl-dev' }, dereg.stderr);
  const enroll2 = await runCli(['enroll', 'create', '-c', d.configFile]);
  const enr2 = enroll2.stdout.split('\n')[0]!;
  const rereg = await sh('curl', ['-sS', '--cacert', ca, '-H', `Authorization: Bearer ${enr2}`, '-H', 'Content-Type: application/json', '--data-binary', '@register.json', '-w', '\n%{http_code}', `${url}/api/register`]);
  t.match(rereg.stdout, /"code":"ECONN_DEVICE_EXISTS".*\n409$/s, 'a deregistered id cannot register again with an enrollment token');
  const plainAdd = await runCli(['device', 'add', 'curl-dev', '--out', path.join(dir, 'op'), '-c', d.configFile]);
  t.not(plainAdd.code, 0, 'device add without --reinstate is refused');
  t.match(plainAdd.stderr, /--reinstate/);
  const reinstate = await runCli(['device', 'add', 'curl-dev', '--reinstate', '--out', path.join(dir, 'op2'), '-c', d.configFile]);
  t.equal(reinstate.code, 0, reinstate.stderr);
  const newTok = readFileSync(path.join(dir, 'op2', 'curl-dev.token'), 'utf8').trim();
  const st2 = await sh('curl', ['-sS', '--cacert', ca, '-H', `Authorization: Bearer ${newTok}`, `${url}/api/devices/curl-dev/status`]);
  t.equal((JSON.parse(st2.stdout) as Record<string, unknown>).status, 'active', 'reinstated with new credentials');
  const oldCert = await sh('curl', ['-sS', '--cacert', ca, '--cert', 'curl-dev.crt', '--key', 'curl-dev.key', `${url}/api/devices/curl-dev/status`]);
  t.equal((JSON.parse(oldCert.stdout) as Record<string, unknown>).code, 'ECONN_AUTH_CERT', 'the old certificate stays revoked');
  const logs = JSON.stringify(d.logs);
  t.notOk(logs.includes(enr), 'enrollment token not in the daemon log');
  t.notOk(logs.includes(enr2), 'second enrollment token not in the daemon log');
  t.notOk(logs.includes(String(json.token)), 'device token not in the daemon log');
  t.notOk(logs.includes(newTok), 'reinstated device token not in the daemon log');
});

t.test('a device certificate revoked by a CRL (broker.tls.crl_files) is refused; reload picks the CRL up', async (t) => {
  const env = await apiEnv(t);
  const { csr, key } = await createCsr('crl-dev');
  const reg = await env.register('crl-dev', { csr });
  const cert = String(reg.certificate);
  t.equal((await env.request({ method: 'GET', path: '/api/devices/crl-dev/status', cert, key })).status, 200);
  const caKey = await importPrivateKeyPem(readFileSync(path.join(env.stateDir, 'pki', 'ca.key'), 'utf8'));
  const caCert = new x509.X509Certificate(env.ca);
  const crl = await x509.X509CrlGenerator.create({
    issuer: caCert.subject,
    thisUpdate: new Date(Date.now() - 60_000),
    nextUpdate: new Date(Date.now() + 86400_000),
    entries: [{ serialNumber: new X509Certificate(cert).serialNumber, revocationDate: new Date(Date.now() - 60_000) }],
    signingKey: caKey,
    signingAlgorithm: signingAlgorithm(caKey),
  });
  const crlFile = path.join(env.dir, 'devices.crl');
  writeFileSync(crlFile, crl.toString('pem'));
  const changes = await env.api.reload(buildConfig(env.stateDir, { broker: { tls: { crl_files: [crlFile] } } }));
  t.ok(changes.length > 0, 'reload reports what it did');
  checkError(t, await env.request({ method: 'GET', path: '/api/devices/crl-dev/status', cert, key }), 401, 'ECONN_AUTH_CERT');
  t.equal((await env.request({ method: 'GET', path: '/api/devices/crl-dev/status', bearer: String(reg.token) })).status, 200, 'its token still works');
  // a reload with an unreadable CA file is refused and the running config stays
  await t.rejects(env.api.reload(buildConfig(env.stateDir, { api: { bootstrap_ca_files: [path.join(env.dir, 'missing.crt')] } })), { code: 'ECONN_CONFIG_INVALID' });
  t.equal((await env.request({ method: 'GET', path: '/nope' })).status, 404, 'still serving');
});

t.test('a JSON body that does not arrive in time gets 408 and the connection is closed', async (t) => {
  const env = await apiEnv(t, { timeouts: { jsonBodyMs: 300 } });
  const enr = await env.enroll();
  const raw = await new Promise<string>((resolve, reject) => {
    const s = tls.connect({ host: '127.0.0.1', port: env.port, ca: env.ca, servername: 'localhost' }, () =>
      s.write(`POST /api/register HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer ${enr}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"device_id"`),
    );
    let out = '';
    s.on('data', (d: Buffer) => (out += d.toString()));
    s.on('close', () => resolve(out));
    s.on('error', reject);
  });
  t.match(raw, /^HTTP\/1\.1 408/);
  t.match(raw, /"code":"ECONN_REQUEST_TIMEOUT"/);
  t.match(raw, /x-frame-options: DENY/i);
  t.equal(env.registry.list().length, 0);
});

t.test('operator-provided server certificate (broker.tls.cert_file/key_file) is served by the API too', async (t) => {
  const operatorCa = await TestCA.create({ cn: 'Operator CA' });
  const server = await operatorCa.server(['localhost', '127.0.0.1']);
  const dir = tempDir(t);
  const certFile = path.join(dir, 'server.crt');
  const keyFile = path.join(dir, 'server.key');
  writeFileSync(certFile, server.cert);
  writeFileSync(keyFile, server.key, { mode: 0o600 });
  const env = await apiEnv(t, { config: { broker: { tls: { cert_file: certFile, key_file: keyFile } } } });
  const peer = await new Promise<X509Certificate>((resolve, reject) => {
    const s = tls.connect({ host: '127.0.0.1', port: env.port, ca: operatorCa.cert, servername: 'localhost' }, () => {
      const c = s.getPeerX509Certificate();
      s.end();
      if (c) resolve(c);
      else reject(new Error('no peer certificate'));
    });
    s.on('error', reject);
  });
  t.equal(peer.fingerprint256, new X509Certificate(server.cert).fingerprint256, 'the operator certificate is presented');
});

t.test('a CRL file that changes is picked up by the API without SIGHUP or reload (as the broker does)', async (t) => {
  const dir = t.testdir();
  const crlFile = path.join(dir, 'devices.crl');
  // start with a CRL (of another CA) that revokes nothing relevant
  writeFileSync(crlFile, await (await TestCA.create()).crl(['01']));
  // the API logs each CRL reload: that line is the event the test waits for
  let onReload: () => void = () => {};
  const logSink = new Writable({
    write(chunk: Buffer, _enc, cb) {
      if (chunk.toString().includes('API CRLs reloaded')) onReload();
      cb();
    },
  });
  const env = await apiEnv(t, { config: { broker: { tls: { crl_files: [crlFile] } } }, api: { crlPollMs: 20 }, logger: createLogger({ level: 'info', destination: logSink }) });
  const { csr, key } = await createCsr('crl-watch');
  const reg = await env.register('crl-watch', { csr });
  const cert = String(reg.certificate);
  t.equal((await env.request({ method: 'GET', path: '/api/devices/crl-watch/status', cert, key })).status, 200);
  const caKey = await importPrivateKeyPem(readFileSync(path.join(env.stateDir, 'pki', 'ca.key'), 'utf8'));
  const crl = await x509.X509CrlGenerator.create({
    issuer: new x509.X509Certificate(env.ca).subject,
    thisUpdate: new Date(Date.now() - 60_000),
    nextUpdate: new Date(Date.now() + 86400_000),
    entries: [{ serialNumber: new X509Certificate(cert).serialNumber, revocationDate: new Date(Date.now() - 60_000) }],
    signingKey: caKey,
    signingAlgorithm: signingAlgorithm(caKey),
  });
  const reloads = Number(env.api.status().crlReloads);
  let timer: NodeJS.Timeout | undefined;
  const reloaded = Promise.race([
    new Promise<void>((resolve) => (onReload = resolve)),
    new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error('no "API CRLs reloaded" within 15 s of the file change')), 15_000))),
  ]).finally(() => clearTimeout(timer));
  writeFileSync(crlFile, crl.toString('pem'));
  // barrier: the API's poller saw the change and reloaded (its log line), bounded in time
  await reloaded;
  t.ok(Number(env.api.status().crlReloads) > reloads, 'the API reloaded its CRLs on the file change');
  checkError(t, await env.request({ method: 'GET', path: '/api/devices/crl-watch/status', cert, key }), 401, 'ECONN_AUTH_CERT');
  // a broken CRL file keeps the previous set in force
  const n = Number(env.api.status().crlReloads);
  writeFileSync(crlFile, 'not a CRL, and longer than the previous one would be? no: different size anyway');
  await env.api.reloadCrls();
  t.equal(Number(env.api.status().crlReloads), n, 'the broken file was not taken');
  checkError(t, await env.request({ method: 'GET', path: '/api/devices/crl-watch/status', cert, key }), 401, 'ECONN_AUTH_CERT');
});

t.test('the documented security headers, to the letter, on success, error and malformed-request answers', async (t) => {
  const documented: Record<string, string> = {
    'x-content-type-options': 'nosniff',
    'x-frame-options': 'DENY',
    'x-xss-protection': '1; mode=block',
    'strict-transport-security': 'max-age=31536000; includeSubDomains',
  };
  const doc = readFileSync(path.join(REPO, 'docs/devices.md'), 'utf8');
  for (const [k, v] of Object.entries(SECURITY_HEADERS)) {
    const name = k.replace(/(^|-)([a-z])/g, (_m, d: string, c: string) => d + c.toUpperCase()).replace('Xss', 'XSS');
    t.ok(doc.includes(`| \`${name}\` | \`${v}\` |`), `docs/devices.md lists ${name}: ${v}`);
  }
  const env = await apiEnv(t);
  const reg = await env.register('hdr-1');
  const answers = [
    await env.request({ method: 'GET', path: '/api/devices/hdr-1/status', bearer: String(reg.token) }),
    await env.request({ method: 'GET', path: '/nope' }),
    await env.request({ method: 'GET', path: '/api/register' }),
    await env.request({ path: '/api/register', json: { device_id: 'x' } }),
  ];
  for (const r of answers) for (const [k, v] of Object.entries(documented)) t.equal(r.headers[k], v, `${r.status}: ${k}`);
  // malformed HTTP is answered by the parser hook, with the same headers
  const raw = await new Promise<string>((resolve, reject) => {
    const s = tls.connect({ host: '127.0.0.1', port: env.port, ca: env.ca, servername: 'localhost' }, () => s.write('GARBAGE / HTTP/1.1\r\n\r\n'));
    let out = '';
    s.setEncoding('utf8').on('data', (d: string) => (out += d));
    s.on('end', () => resolve(out));
    s.on('error', reject);
  });
  t.match(raw, /^HTTP\/1\.1 400/);
  t.match(raw, /\r\nx-xss-protection: 1; mode=block\r\n/);
});

t.test('the device token payload holds the documented claims (device_id, iat, exp, metadata.url/description)', async (t) => {
  const env = await apiEnv(t);
  const reg = await env.register('claims-1', { metadata: { url: 'http://10.0.0.9/', description: 'pump', capabilities: ['flow'] } });
  const p = decodeJwt(String(reg.token));
  t.equal(p.device_id, 'claims-1');
  t.type(p.iat, 'number');
  t.type(p.exp, 'number');
  t.equal(p.exp! - p.iat!, env.config.identity.jwt.ttl_s, 'exp = iat + identity.jwt.ttl_s');
  t.equal(new Date(p.exp! * 1000).toISOString(), reg.expires_at, 'expires_at of the answer is the token exp');
  t.same(p.metadata, { url: 'http://10.0.0.9/', description: 'pump', capabilities: ['flow'] });
  t.equal(p.sub, 'claims-1');
  const doc = readFileSync(path.join(REPO, 'docs/devices.md'), 'utf8');
  const section = doc.slice(doc.indexOf('### Device token payload'), doc.indexOf('### Errors'));
  for (const claim of ['device_id', 'iat', 'exp', 'metadata', 'sub', 'jti']) t.match(section, new RegExp(`\\| \`${claim}\` \\|`), `docs list ${claim}`);
  const example = JSON.parse(/```json\n([\s\S]+?)\n```/.exec(section)![1]!) as Record<string, unknown>;
  t.same(Object.keys(example).sort(), Object.keys(p).sort(), 'the documented example has exactly the claims a token has');
});

t.test('the documented answers: register, deregister and status shapes as docs/devices.md shows them', async (t) => {
  const doc = readFileSync(path.join(REPO, 'docs/devices.md'), 'utf8');
  const env = await apiEnv(t);
  const reg = await env.register('doc-1', { metadata: { description: 'x' } });
  const regDoc = doc.slice(doc.indexOf('### `POST /api/register`'), doc.indexOf('### `POST /api/token/renew`'));
  const example = JSON.parse(/```json\n([\s\S]+?)\n```/.exec(regDoc)![1]!) as Record<string, unknown>;
  t.same(Object.keys(reg).sort(), Object.keys(example).filter((k) => k !== 'certificate').sort(), 'register: the documented fields (certificate only with a CSR)');
  t.same(Object.keys(reg.cloud_endpoints as object).sort(), Object.keys(example.cloud_endpoints as object).sort());
  t.equal(example.status, 'success');
  const s = await env.request({ method: 'GET', path: '/api/devices/doc-1/status', bearer: String(reg.token) });
  const stDoc = doc.slice(doc.indexOf('### `GET /api/devices/{device_id}/status`'), doc.indexOf('### `POST /api/publish/{device_id}`'));
  const stFields = [...stDoc.matchAll(/^\| `([a-z_]+)` \|/gm)].map((m) => m[1]);
  t.same(Object.keys(s.json).sort(), [...stFields].sort(), 'status: exactly the documented fields');
  const d = await env.request({ path: '/api/deregister/doc-1', bearer: String(reg.token) });
  t.ok(doc.includes(`# ${JSON.stringify(d.json)}`.replace('doc-1', 'sensor-17')), 'deregister: the documented answer');
});
