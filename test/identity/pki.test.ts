import t, { type Test } from 'tap';
import { X509Certificate, createPrivateKey } from 'node:crypto';
import { readFileSync, statSync, writeFileSync, unlinkSync, readdirSync } from 'node:fs';
import tls from 'node:tls';
import path from 'node:path';
import { createLogger } from '../../core/logger.js';
import { parseConfigText } from '../../core/config/load.js';
import type { Config } from '../../core/config/schema.js';
import { LocalPki, initPki, pkiPaths } from '../../identity/pki.js';
import { x509, generateKeyPair, signingAlgorithm } from '../../core/x509.js';
import { createCsr, TestCA } from '../helpers/certs.js';
import { tempDir } from '../helpers/daemon.js';
import { normalizeSerial } from '../../identity/registry.js';
import { ConnectorError } from '../../core/errors.js';

const logger = createLogger({ level: 'silent' });
const DAY = 86400_000;

function config(stateDir: string, extra = ''): Config {
  return parseConfigText(`daemon: { state_dir: ${JSON.stringify(stateDir)} }\n${extra}`, 'test.yaml', { checkSecrets: false }).config;
}

async function started(t: Test, extra = ''): Promise<{ pki: LocalPki; stateDir: string; cfg: Config }> {
  const stateDir = tempDir(t);
  const cfg = config(stateDir, extra);
  await LocalPki.initStep().run(cfg, logger);
  const pki = new LocalPki({ stateDir, config: cfg.identity.pki, logger });
  t.teardown(() => pki.close());
  await pki.start();
  return { pki, stateDir, cfg };
}

t.test('init creates CA and server certificate (keys 0600) and never overwrites', async (t) => {
  const stateDir = tempDir(t);
  const cfg = config(stateDir);
  const created = await LocalPki.initStep().run(cfg, logger);
  const p = pkiPaths(stateDir);
  t.same(created.sort(), [p.caCert, p.caKey, p.serverCert, p.serverKey].sort());
  t.equal(statSync(p.caKey).mode & 0o777, 0o600);
  t.equal(statSync(p.serverKey).mode & 0o777, 0o600);
  const before = readFileSync(p.caCert, 'utf8');
  t.same(await LocalPki.initStep().run(cfg, logger), [], 'second run creates nothing');
  t.equal(readFileSync(p.caCert, 'utf8'), before);

  const ca = new X509Certificate(before);
  t.ok(ca.ca, 'CA basic constraint');
  t.ok(ca.verify(ca.publicKey), 'self-signed');
  t.ok(new Date(ca.validTo).getTime() > Date.now() + 3000 * DAY, 'ca_validity_days default 3650');

  // a half-present pair is an error, not a silent re-creation
  unlinkSync(p.serverKey);
  await t.rejects(initPki(stateDir, cfg.identity.pki, 'x'), { code: 'ECONN_PKI', message: /server\.key|server\.crt/ });
  unlinkSync(p.caKey);
  await t.rejects(initPki(stateDir, cfg.identity.pki, 'x'), { code: 'ECONN_PKI', message: /ca\.key/ });
  // the init step runs initPki in a child process when something is missing: same error, same class
  const fromWorker = await LocalPki.initStep().run(cfg, logger).catch((err: unknown) => err);
  t.type(fromWorker, ConnectorError);
  t.match(fromWorker, { code: 'ECONN_PKI', message: /ca\.key/ }, 'the child process reports the error with its code');
  t.equal(readFileSync(p.caCert, 'utf8'), before, 'CA certificate not replaced');
});

t.test('start without init says to run connector init', async (t) => {
  const stateDir = tempDir(t);
  const pki = new LocalPki({ stateDir, config: config(stateDir).identity.pki, logger });
  await t.rejects(pki.start(), { code: 'ECONN_PKI', message: /connector init/ });
  t.throws(() => pki.caCertificatePem(), { code: 'ECONN_CLOSED' });
});

t.test('server certificate: SAN from server_names, signed by the device CA, works for TLS to 127.0.0.1 and localhost', async (t) => {
  const { pki } = await started(t);
  const { cert, key } = pki.serverCredentials();
  const c = new X509Certificate(cert);
  const ca = new X509Certificate(pki.caCertificatePem());
  t.match(c.subjectAltName, /DNS:localhost/);
  t.match(c.subjectAltName, /IP Address:127\.0\.0\.1/);
  t.ok(c.verify(ca.publicKey), 'signed by the device CA');
  t.ok(c.checkPrivateKey(createPrivateKey(key)));
  t.notOk(c.ca);

  const server = tls.createServer({ cert, key, minVersion: 'TLSv1.2' }, (s) => s.end('hi'));
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  t.teardown(() => new Promise<void>((r) => server.close(() => r())));
  const port = (server.address() as { port: number }).port;
  for (const servername of ['127.0.0.1', 'localhost']) {
    const got = await new Promise<string>((resolve, reject) => {
      const s = tls.connect({ host: '127.0.0.1', port, ca: pki.caCertificatePem(), servername: servername === '127.0.0.1' ? undefined : servername }, () => {
        s.setEncoding('utf8');
        let d = '';
        s.on('data', (x: string) => (d += x));
        s.on('end', () => resolve(d));
      });
      s.on('error', reject);
    });
    t.equal(got, 'hi', `verified as ${servername}`);
  }
});

t.test('server certificate is renewed when server_names change (event), kept otherwise', async (t) => {
  const stateDir = tempDir(t);
  const cfg = config(stateDir);
  await LocalPki.initStep().run(cfg, logger);
  const first = readFileSync(pkiPaths(stateDir).serverCert, 'utf8');
  const same = new LocalPki({ stateDir, config: cfg.identity.pki, logger });
  t.teardown(() => same.close());
  await same.start();
  t.equal(same.serverCredentials().cert, first, 'unchanged names: same certificate');
  await same.close();

  const cfg2 = config(stateDir, 'identity: { pki: { server_names: [gateway.example, 10.1.2.3, localhost] } }');
  const pki = new LocalPki({ stateDir, config: cfg2.identity.pki, logger });
  t.teardown(() => pki.close());
  let renewed = 0;
  pki.on('server-cert', () => renewed++);
  await pki.start();
  t.equal(renewed, 1);
  const c = new X509Certificate(pki.serverCredentials().cert);
  t.match(c.subjectAltName, /DNS:gateway\.example/);
  t.match(c.subjectAltName, /IP Address:10\.1\.2\.3/);
  t.equal(readFileSync(pkiPaths(stateDir).serverCert, 'utf8'), pki.serverCredentials().cert, 'written to disk');
  t.equal(statSync(pkiPaths(stateDir).serverKey).mode & 0o777, 0o600);
});

for (const keyType of ['ec', 'rsa'] as const) {
  t.test(`CSR round trip (${keyType}): verified, signed, CN/SAN/serial/validity, key never leaves the device`, async (t) => {
    const { pki } = await started(t, 'identity: { pki: { device_cert_validity_days: 30 } }');
    const { csr, key } = await createCsr('sensor-1', keyType);
    const issued = await pki.signCsr(csr, 'sensor-1');
    const cert = new X509Certificate(issued.cert);
    const ca = new X509Certificate(pki.caCertificatePem());
    t.ok(cert.verify(ca.publicKey), 'verifies with the CA public key');
    t.ok(cert.checkIssued(ca));
    t.equal(cert.subject, 'CN=sensor-1');
    t.match(cert.subjectAltName, /URI:urn:device:sensor-1/);
    t.equal(issued.serial, cert.serialNumber.toLowerCase().replace(/^0+/, ''), 'serial reported = serial in the certificate');
    t.equal(issued.fingerprint256, cert.fingerprint256);
    const notAfter = new Date(cert.validTo).getTime();
    t.ok(Math.abs(notAfter - (Date.now() + 30 * DAY)) < 2 * DAY, 'validity from device_cert_validity_days');
    t.ok(new Date(cert.validFrom).getTime() <= Date.now(), 'valid now');
    t.equal(issued.notAfter.toISOString().slice(0, 16), new Date(notAfter).toISOString().slice(0, 16));
    t.ok(cert.checkPrivateKey(createPrivateKey(key)), 'the device key matches: its public key came from the CSR');
    t.equal(cert.publicKey.asymmetricKeyType, keyType === 'ec' ? 'ec' : 'rsa');
    t.match(cert.keyUsage ?? [], ['1.3.6.1.5.5.7.3.2'], 'clientAuth');
    t.notOk(cert.ca);
    // a second CSR gets another serial
    const again = await pki.signCsr((await createCsr('sensor-1', keyType)).csr, 'sensor-1');
    t.not(again.serial, issued.serial);
  });
}

t.test('CSR bad input: garbage, tampered signature, wrong CN, weak RSA, unsupported curve', async (t) => {
  const { pki } = await started(t);
  await t.rejects(pki.signCsr('hello', 'd'), { code: 'ECONN_PKI' });
  await t.rejects(pki.signCsr('-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n', 'd'), { code: 'ECONN_PKI' });
  await t.rejects(pki.signCsr(123 as unknown as string, 'd'), { code: 'ECONN_PKI' });

  for (const keyType of ['ec', 'rsa'] as const) {
    // a CSR whose signature does not match its content: swap the subject key of a valid CSR
    const a = new x509.Pkcs10CertificateRequest((await createCsr('d', keyType)).csr);
    const other = await generateKeyPair(keyType);
    const forged = await x509.Pkcs10CertificateRequestGenerator.create({ name: 'CN=d', keys: other, signingAlgorithm: signingAlgorithm(other.privateKey) });
    // take the signed body from `forged` but the signature from `a`
    const fDer = Buffer.from(forged.rawData);
    const aSig = Buffer.from(a.signature);
    const fSig = Buffer.from(forged.signature);
    const idx = fDer.lastIndexOf(fSig);
    t.ok(idx > 0, 'found signature bytes');
    let tampered: Buffer;
    if (aSig.length === fSig.length) {
      tampered = Buffer.concat([fDer.subarray(0, idx), aSig, fDer.subarray(idx + fSig.length)]);
    } else {
      // DER lengths differ (ECDSA); flip a byte of the signature instead
      tampered = Buffer.from(fDer);
      tampered[idx + 5] = tampered[idx + 5]! ^ 0xff;
    }
    const pem = `-----BEGIN CERTIFICATE REQUEST-----\n${tampered.toString('base64').replace(/(.{64})/g, '$1\n')}\n-----END CERTIFICATE REQUEST-----\n`;
    await t.rejects(pki.signCsr(pem, 'd'), { code: 'ECONN_PKI' }, `${keyType}: tampered CSR refused`);
  }

  await t.rejects(pki.signCsr((await createCsr('other-device')).csr, 'd'), { code: 'ECONN_PKI', message: /does not match/ });
  await t.rejects(pki.signCsr((await createCsr('d')).csr, 'a/b'), { code: 'ECONN_BAD_REQUEST' });

  const weak = await webcryptoRsaCsr(1024);
  await t.rejects(pki.signCsr(weak, 'd'), { code: 'ECONN_PKI', message: /2048/ });

  const p521 = await ecCsr('P-521');
  await t.rejects(pki.signCsr(p521, 'd'), { code: 'ECONN_PKI', message: /curve/ });
});

async function webcryptoRsaCsr(bits: number): Promise<string> {
  const { webcrypto } = await import('node:crypto');
  const keys = (await webcrypto.subtle.generateKey(
    { name: 'RSASSA-PKCS1-v1_5', hash: 'SHA-256', publicExponent: new Uint8Array([1, 0, 1]), modulusLength: bits },
    true,
    ['sign', 'verify'],
  )) as CryptoKeyPair;
  const csr = await x509.Pkcs10CertificateRequestGenerator.create({ name: 'CN=d', keys, signingAlgorithm: { name: 'RSASSA-PKCS1-v1_5' } });
  return csr.toString('pem');
}

async function ecCsr(curve: string): Promise<string> {
  const { webcrypto } = await import('node:crypto');
  const keys = (await webcrypto.subtle.generateKey({ name: 'ECDSA', namedCurve: curve }, true, ['sign', 'verify'])) as CryptoKeyPair;
  const csr = await x509.Pkcs10CertificateRequestGenerator.create({ name: 'CN=d', keys, signingAlgorithm: { name: 'ECDSA', hash: 'SHA-256' } as EcdsaParams });
  return csr.toString('pem');
}

for (const keyType of ['ec', 'rsa'] as const) {
  t.test(`device bundle (${keyType}): key matches certificate, chains to the CA`, async (t) => {
    const { pki } = await started(t);
    const b = await pki.issueDeviceBundle('cam-7', keyType);
    const cert = new X509Certificate(b.cert);
    t.ok(cert.checkPrivateKey(createPrivateKey(b.key)));
    t.ok(cert.verify(new X509Certificate(pki.caCertificatePem()).publicKey));
    t.equal(cert.subject, 'CN=cam-7');
    t.equal(createPrivateKey(b.key).asymmetricKeyType, keyType);
  });
}

t.test('certificates of a foreign CA do not verify with ours', async (t) => {
  const { pki } = await started(t);
  const foreign = await TestCA.create();
  const ours = new X509Certificate(pki.caCertificatePem());
  t.notOk(new X509Certificate(foreign.cert).verify(ours.publicKey));
  t.equal(pki.trustedDeviceCaPems().length, 1);
});

t.test('CA rotation: new CA signs, previous stays trusted (also after restart), server certificate kept', async (t) => {
  const { pki, stateDir, cfg } = await started(t);
  const oldCa = pki.caCertificatePem();
  const serverBefore = pki.serverCredentials().cert;
  const oldDevice = await pki.issueDeviceBundle('d1');
  await pki.rotateCa('gw');
  t.not(pki.caCertificatePem(), oldCa);
  const trusted = pki.trustedDeviceCaPems();
  t.equal(trusted.length, 2);
  t.equal(trusted[0], pki.caCertificatePem(), 'current first');
  t.ok(trusted.includes(oldCa));
  const newDevice = await pki.issueDeviceBundle('d2');
  t.ok(new X509Certificate(newDevice.cert).verify(new X509Certificate(pki.caCertificatePem()).publicKey));
  t.ok(new X509Certificate(oldDevice.cert).verify(new X509Certificate(oldCa).publicKey));
  t.equal(pki.serverCredentials().cert, serverBefore);
  t.equal(statSync(path.join(pkiPaths(stateDir).trustedDir, readdirKey(stateDir))).mode & 0o777, 0o600, 'previous CA key 0600');
  await pki.close();

  const again = new LocalPki({ stateDir, config: cfg.identity.pki, logger });
  t.teardown(() => again.close());
  await again.start();
  t.equal(again.trustedDeviceCaPems().length, 2);
  t.equal(again.serverCredentials().cert, serverBefore, 'server certificate from the previous CA is still ours: not renewed');
});

function readdirKey(stateDir: string): string {
  return readdirSync(pkiPaths(stateDir).trustedDir).find((n) => n.endsWith('.key'))!;
}

t.test('an operator-provided server certificate is never renewed', async (t) => {
  const stateDir = tempDir(t);
  const cfg = config(stateDir, 'identity: { pki: { server_names: [other.example] } }');
  await LocalPki.initStep().run(config(stateDir), logger);
  const foreign = await TestCA.create();
  const srv = await foreign.server(['localhost']);
  const p = pkiPaths(stateDir);
  writeFileSync(p.serverCert, srv.cert);
  writeFileSync(p.serverKey, srv.key, { mode: 0o600 });
  const pki = new LocalPki({ stateDir, config: cfg.identity.pki, logger });
  t.teardown(() => pki.close());
  await pki.start();
  t.equal(pki.serverCredentials().cert, srv.cert);
  t.equal(readFileSync(p.serverCert, 'utf8'), srv.cert);
});

/** TLS handshake against the given server credentials, verifying with `ca` (a PEM or a bundle); true when it verified. */
async function tlsVerifies(t: Test, srv: { cert: string; key: string }, ca: string): Promise<boolean> {
  const server = tls.createServer({ cert: srv.cert, key: srv.key, minVersion: 'TLSv1.2' }, (s) => s.end('hi'));
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  t.teardown(() => new Promise<void>((r) => server.close(() => r())));
  const port = (server.address() as { port: number }).port;
  return new Promise<boolean>((resolve) => {
    const s = tls.connect({ host: '127.0.0.1', port, ca, servername: 'localhost' }, () => {
      s.destroy();
      resolve(true);
    });
    s.on('error', () => resolve(false));
  });
}

function pemsOf(bundle: string): string[] {
  return bundle.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? [];
}

function issuedBy(certPem: string, caPem: string): boolean {
  const c = new X509Certificate(certPem);
  const ca = new X509Certificate(caPem);
  return c.checkIssued(ca) && c.verify(ca.publicKey);
}

t.test('CA rotation: renewed server certificates stay on the old CA until retireCa; devices get a bundle meanwhile', async (t) => {
  const { pki, stateDir } = await started(t);
  const p = pkiPaths(stateDir);
  const oldCa = pki.caCertificatePem();
  t.equal(pki.deviceCaBundlePem(), oldCa, 'no rotation open: the bundle is the single CA');
  t.same(await pki.retireCa(), { serial: normalizeSerial(new X509Certificate(oldCa).serialNumber), retired: [] }, 'nothing to retire');

  const oldDevice = await pki.issueDeviceBundle('d-old');
  await pki.rotateCa('gw');
  const newCa = pki.caCertificatePem();
  t.not(newCa, oldCa);

  // during the rotation devices are handed both CAs, current first
  const bundle = pemsOf(pki.deviceCaBundlePem());
  t.equal(bundle.length, 2, 'bundle of both CAs');
  t.equal(new X509Certificate(bundle[0]!).fingerprint256, new X509Certificate(newCa).fingerprint256, 'current CA first');
  t.equal(new X509Certificate(bundle[1]!).fingerprint256, new X509Certificate(oldCa).fingerprint256, 'previous CA second');

  // a renewal during the rotation (here: server_names changed) is still issued by the OLD CA
  let renewed = 0;
  pki.on('server-cert', () => renewed++);
  await pki.reload(config(stateDir, 'identity: { pki: { server_names: [localhost, 127.0.0.1, gw-a.example] } }'));
  t.equal(renewed, 1, 'renewed');
  const duringRotation = pki.serverCredentials();
  t.match(new X509Certificate(duringRotation.cert).subjectAltName, /gw-a\.example/);
  t.ok(issuedBy(duringRotation.cert, oldCa), 'renewed server certificate issued by the old CA');
  t.notOk(issuedBy(duringRotation.cert, newCa), 'not by the new CA');
  t.ok(await tlsVerifies(t, duringRotation, oldCa), 'a device that only has the old ca.crt verifies the server');
  t.ok(await tlsVerifies(t, duringRotation, pki.deviceCaBundlePem()), 'a device with the bundle verifies the server');
  t.notOk(await tlsVerifies(t, duringRotation, newCa), 'control: the new CA alone does not verify it yet');

  // a restart keeps it (the issuing CA did not change): no renewal
  const cfgA = config(stateDir, 'identity: { pki: { server_names: [localhost, 127.0.0.1, gw-a.example] } }');
  await pki.close();
  const again = new LocalPki({ stateDir, config: cfgA.identity.pki, logger });
  t.teardown(() => again.close());
  await again.start();
  t.equal(again.serverCredentials().cert, duringRotation.cert, 'restart during the rotation: same server certificate');
  t.equal(pemsOf(again.deviceCaBundlePem()).length, 2, 'bundle survives a restart');

  // retire: server certificate re-issued by the new CA, the old CA no longer trusted nor issuing
  let renewedAgain = 0;
  again.on('server-cert', () => renewedAgain++);
  const r = await again.retireCa();
  t.same(r, { serial: normalizeSerial(new X509Certificate(newCa).serialNumber), retired: [normalizeSerial(new X509Certificate(oldCa).serialNumber)] });
  t.equal(renewedAgain, 1, 'server-cert emitted so listeners reload');
  const afterRetire = again.serverCredentials();
  t.ok(issuedBy(afterRetire.cert, newCa), 'server certificate now issued by the new CA');
  t.ok(await tlsVerifies(t, afterRetire, newCa), 'a device with the new CA verifies the server');
  t.notOk(await tlsVerifies(t, afterRetire, oldCa), 'the old CA alone no longer verifies it');
  t.same(again.trustedDeviceCaPems(), [newCa], 'only the new CA is trusted');
  t.equal(again.deviceCaBundlePem(), newCa, 'devices get the new CA only');
  t.notOk(again.trustedDeviceCaPems().some((ca) => new X509Certificate(oldDevice.cert).verify(new X509Certificate(ca).publicKey)), 'old-CA device certificates no longer chain to a trusted CA');
  t.same(readdirSync(p.trustedDir), [], 'previous CA certificate and key removed from trusted/');
  t.same(readdirSync(path.join(p.dir, 'retired')).filter((n) => n.endsWith('.key')), [], 'the retired key is deleted');
  t.equal(readdirSync(path.join(p.dir, 'retired')).length, 1, 'the retired certificate is kept for reference');

  // a later renewal uses the new CA, and a restart keeps the retirement
  await again.reload(config(stateDir, 'identity: { pki: { server_names: [localhost, 127.0.0.1, gw-b.example] } }'));
  t.ok(issuedBy(again.serverCredentials().cert, newCa), 'renewal after retire: new CA');
  await again.close();
  const third = new LocalPki({ stateDir, config: config(stateDir, 'identity: { pki: { server_names: [localhost, 127.0.0.1, gw-b.example] } }').identity.pki, logger });
  t.teardown(() => third.close());
  await third.start();
  t.equal(third.trustedDeviceCaPems().length, 1, 'restart: still only the new CA');
  t.equal(third.serverCredentials().cert, again.serverCredentials().cert, 'restart: server certificate kept');
  t.same((await third.retireCa()).retired, [], 'retiring again: nothing to do');
});

t.test('CA rotation: a previous CA whose key is gone does not issue the server certificate', async (t) => {
  const { pki, stateDir } = await started(t);
  const oldCa = pki.caCertificatePem();
  await pki.rotateCa('gw');
  const newCa = pki.caCertificatePem();
  unlinkSync(path.join(pkiPaths(stateDir).trustedDir, readdirKey(stateDir)));
  await pki.reload(config(stateDir, 'identity: { pki: { server_names: [localhost, 127.0.0.1, gw-c.example] } }'));
  t.ok(issuedBy(pki.serverCredentials().cert, newCa), 'falls back to the current CA');
  t.equal(pki.trustedDeviceCaPems().length, 2, 'the previous CA is still trusted for device certificates');
  t.ok(pki.trustedDeviceCaPems().includes(oldCa));
});
