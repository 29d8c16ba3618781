/**
 * The one CA builder (core/x509.ts createSelfSignedCa) and its three users:
 * the device PKI (identity/pki.ts), the reference cloud's TLS (cloud/tls.ts)
 * and the test certificates (test/helpers/certs.ts). Each keeps the
 * certificate properties it had: key type, CA extensions, validity.
 */
import t, { type Test } from 'tap';
import { X509Certificate, createPrivateKey } from 'node:crypto';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { createSelfSignedCa, x509 } from '../../core/x509.js';
import { loadOrCreateTls } from '../../cloud/tls.js';
import { TestCA } from '../helpers/certs.js';
import { tempDir } from '../helpers/daemon.js';

const DAY = 86_400_000;

/** What every CA from the builder must be, read back with node:crypto and @peculiar/x509. */
function checkCa(t: Test, pem: string, keyPem: string, keyType: 'ec' | 'rsa'): x509.X509Certificate {
  const node = new X509Certificate(pem);
  t.ok(node.ca, 'CA:TRUE');
  t.ok(node.checkIssued(node) && node.verify(node.publicKey), 'self-signed, signature verifies');
  t.equal(node.publicKey.asymmetricKeyType, keyType, `${keyType} key`);
  if (keyType === 'ec') t.equal(node.publicKey.asymmetricKeyDetails?.namedCurve, 'prime256v1', 'P-256');
  t.ok(node.checkPrivateKey(createPrivateKey(keyPem)), 'the key PEM belongs to the certificate');
  t.equal(Buffer.from(node.serialNumber, 'hex')[0]! & 0x80, 0, 'serial is positive');
  const cert = new x509.X509Certificate(pem);
  const bc = cert.getExtension(x509.BasicConstraintsExtension);
  t.ok(bc?.ca && bc.pathLength === 0 && bc.critical, 'basicConstraints CA:TRUE, pathlen:0, critical');
  const ku = cert.getExtension(x509.KeyUsagesExtension);
  t.equal(ku?.usages, x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, 'keyUsage keyCertSign, cRLSign');
  t.ok(ku?.critical, 'keyUsage critical');
  t.ok(cert.getExtension(x509.SubjectKeyIdentifierExtension), 'subject key identifier');
  return cert;
}

t.test('createSelfSignedCa: EC P-256 by default, the CA extensions, the validity asked for', async (t) => {
  const notBefore = new Date(Math.floor((Date.now() - DAY) / 1000) * 1000);
  const notAfter = new Date(notBefore.getTime() + 10 * DAY);
  const ca = await createSelfSignedCa({ name: 'CN=unit CA, O=edge-connector', notBefore, notAfter });
  const cert = checkCa(t, ca.certificate.toString('pem'), ca.keyPem, 'ec');
  t.equal(cert.subject, 'CN=unit CA, O=edge-connector');
  t.equal(cert.issuer, cert.subject);
  t.equal(cert.notBefore.getTime(), notBefore.getTime());
  t.equal(cert.notAfter.getTime(), notAfter.getTime());
  t.equal(ca.keys.privateKey.algorithm.name, 'ECDSA');
});

t.test('createSelfSignedCa: RSA on request', async (t) => {
  const ca = await createSelfSignedCa({ name: 'CN=rsa CA', notBefore: new Date(Date.now() - DAY), notAfter: new Date(Date.now() + DAY), keyType: 'rsa' });
  checkCa(t, ca.certificate.toString('pem'), ca.keyPem, 'rsa');
});

t.test('two CAs never share a serial or a key', async (t) => {
  const o = { name: 'CN=x', notBefore: new Date(Date.now() - DAY), notAfter: new Date(Date.now() + DAY) };
  const [a, b] = await Promise.all([createSelfSignedCa(o), createSelfSignedCa(o)]);
  t.not(a.certificate.serialNumber, b.certificate.serialNumber);
  t.not(a.keyPem, b.keyPem);
});

t.test('the reference cloud TLS CA: EC, 10 years, its name', async (t) => {
  const dir = tempDir(t);
  const tls = await loadOrCreateTls({ storeDir: dir, certFile: '', keyFile: '', hostnames: [] });
  const pem = readFileSync(tls.caFile!, 'utf8');
  t.ok(pem.endsWith('-----END CERTIFICATE-----\n'), 'one trailing newline, as before');
  const cert = checkCa(t, pem, readFileSync(path.join(dir, 'tls/ca.key'), 'utf8'), 'ec');
  t.match(cert.subject, /^CN=edge-connector reference cloud CA [0-9a-f]{8}$/);
  const days = (cert.notAfter.getTime() - cert.notBefore.getTime()) / DAY;
  t.ok(days > 3650 && days < 3652, `valid ~3651 days (${days})`);
  const server = new X509Certificate(tls.cert);
  t.ok(server.checkIssued(new X509Certificate(pem)), 'the server certificate is issued by it');
});

t.test('the test CA: EC by default, RSA on request, one year by default', async (t) => {
  const ec = await TestCA.create({ cn: 'helper CA' });
  const cert = checkCa(t, ec.cert, ec.key, 'ec');
  t.equal(cert.subject, 'CN=helper CA');
  const days = (cert.notAfter.getTime() - cert.notBefore.getTime()) / DAY;
  t.ok(days > 365 && days < 367, `valid ~366 days (${days})`);
  const rsa = await TestCA.create({ keyType: 'rsa' });
  checkCa(t, rsa.cert, rsa.key, 'rsa');
});
