/**
 * TLS material for the rival (mosquitto edge + bridge + cloud mosquitto),
 * generated at run time with @peculiar/x509 through the product's own wrapper
 * (dist/core/x509.js): one EC P-256 CA, a server certificate for 127.0.0.1 /
 * localhost, and one client certificate per device (CN = device id) — the
 * same key type `connector device add` issues by default.
 */
import { writeFileSync } from 'node:fs';
import path from 'node:path';

const DAY = 86400_000;

export async function rivalCerts(dist, dir, deviceIds) {
  const { x509, generateKeyPair, privateKeyToPem, signingAlgorithm, randomSerial } = await import(path.join(dist, 'core/x509.js'));
  const caKeys = await generateKeyPair('ec');
  const ca = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: randomSerial(),
    name: 'CN=bench rival CA',
    notBefore: new Date(Date.now() - DAY),
    notAfter: new Date(Date.now() + 2 * DAY),
    keys: caKeys,
    signingAlgorithm: signingAlgorithm(caKeys.privateKey),
    extensions: [new x509.BasicConstraintsExtension(true, 0, true), new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true)],
  });
  const issue = async (cn, ext) => {
    const keys = await generateKeyPair('ec');
    const cert = await x509.X509CertificateGenerator.create({
      serialNumber: randomSerial(),
      subject: `CN=${cn}`,
      issuer: ca.subject,
      notBefore: new Date(Date.now() - DAY),
      notAfter: new Date(Date.now() + 2 * DAY),
      publicKey: keys.publicKey,
      signingKey: caKeys.privateKey,
      signingAlgorithm: signingAlgorithm(caKeys.privateKey),
      extensions: [new x509.BasicConstraintsExtension(false, undefined, true), ...ext],
    });
    return { cert: cert.toString('pem'), key: await privateKeyToPem(keys.privateKey) };
  };
  const write = (name, text) => {
    const f = path.join(dir, name);
    writeFileSync(f, text, { mode: 0o600 });
    return f;
  };
  const caFile = write('ca.crt', ca.toString('pem'));
  const srv = await issue('localhost', [
    new x509.SubjectAlternativeNameExtension([
      { type: 'ip', value: '127.0.0.1' },
      { type: 'dns', value: 'localhost' },
    ]),
    new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.serverAuth]),
  ]);
  const out = { caFile, certFile: write('server.crt', srv.cert), keyFile: write('server.key', srv.key), devices: [] };
  for (const id of deviceIds) {
    const c = await issue(id, [new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.clientAuth])]);
    out.devices.push({ id, ca: ca.toString('pem'), cert: c.cert, key: c.key });
  }
  return out;
}
