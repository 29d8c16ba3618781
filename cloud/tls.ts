/**
 * TLS material of the reference cloud. With no configured certificate it
 * generates, once, a private CA and a server certificate (EC P-256, SAN
 * localhost, 127.0.0.1, ::1 and the listen host) under STORE_DIR/tls/:
 * ca.crt (what the connector trusts: bridge.uplink.ca_file), ca.key,
 * server.crt, server.key. Existing files are reused, never overwritten.
 */
import { existsSync, mkdirSync, readFileSync, renameSync } from 'node:fs';
import path from 'node:path';
import { isIP } from 'node:net';
import { x509, createSelfSignedCa, generateKeyPair, privateKeyToPem, signingAlgorithm, randomSerial, importPrivateKeyPem } from '../core/x509.js';
import { StartupError } from '../core/errors.js';
import { writeAtomicSync } from '../core/fs.js';

const DAY = 86_400_000;

export interface CloudTls {
  cert: string;
  key: string;
  /** The CA file clients should trust (generated case), else undefined. */
  caFile?: string;
  /** Files created now. */
  created: string[];
}

function read(file: string, key: string): string {
  try {
    return readFileSync(file, 'utf8');
  } catch (err) {
    throw new StartupError('ECONN_CONFIG_INVALID', `cloud: cannot read ${file} (${key}): ${(err as NodeJS.ErrnoException).code ?? 'error'}`, { cause: err });
  }
}

export async function loadOrCreateTls(opts: { storeDir: string; certFile: string; keyFile: string; hostnames: string[] }): Promise<CloudTls> {
  if (opts.certFile) return { cert: read(opts.certFile, 'tls.cert_file'), key: read(opts.keyFile, 'tls.key_file'), created: [] };
  const dir = path.join(opts.storeDir, 'tls');
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const caCrt = path.join(dir, 'ca.crt');
  const caKey = path.join(dir, 'ca.key');
  const srvCrt = path.join(dir, 'server.crt');
  const srvKey = path.join(dir, 'server.key');
  const created: string[] = [];
  if (!existsSync(caCrt) || !existsSync(caKey)) {
    const ca = await createSelfSignedCa({
      name: `CN=edge-connector reference cloud CA ${randomSerial().slice(0, 8)}`,
      notBefore: new Date(Date.now() - DAY),
      notAfter: new Date(Date.now() + 3650 * DAY),
    });
    writeAtomicSync(caKey, ca.keyPem, 0o600);
    writeAtomicSync(caCrt, `${ca.certificate.toString('pem').trim()}\n`, 0o644);
    created.push(caCrt, caKey);
    // a new CA invalidates an old server certificate
    if (existsSync(srvCrt)) renameSync(srvCrt, `${srvCrt}.old`);
  }
  if (!existsSync(srvCrt) || !existsSync(srvKey)) {
    const ca = new x509.X509Certificate(readFileSync(caCrt, 'utf8'));
    const caPriv = await importPrivateKeyPem(readFileSync(caKey, 'utf8'));
    const keys = await generateKeyPair('ec');
    const names = [...new Set(['localhost', '127.0.0.1', '::1', ...opts.hostnames.filter((h) => h && h !== '0.0.0.0' && h !== '::')])];
    const san = names.map((n) => (isIP(n) ? { type: 'ip' as const, value: n } : { type: 'dns' as const, value: n }));
    const cert = await x509.X509CertificateGenerator.create({
      serialNumber: randomSerial(),
      subject: 'CN=localhost',
      issuer: ca.subject,
      notBefore: new Date(Date.now() - DAY),
      notAfter: new Date(Date.now() + 825 * DAY),
      publicKey: keys.publicKey,
      signingKey: caPriv,
      signingAlgorithm: signingAlgorithm(caPriv),
      extensions: [
        new x509.BasicConstraintsExtension(false, undefined, true),
        await x509.AuthorityKeyIdentifierExtension.create(ca, false),
        new x509.SubjectAlternativeNameExtension(san),
        new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.serverAuth]),
        new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature | x509.KeyUsageFlags.keyEncipherment, true),
      ],
    });
    writeAtomicSync(srvKey, await privateKeyToPem(keys.privateKey), 0o600);
    writeAtomicSync(srvCrt, `${cert.toString('pem').trim()}\n${ca.toString('pem').trim()}\n`, 0o644);
    created.push(srvCrt, srvKey);
  }
  return { cert: readFileSync(srvCrt, 'utf8'), key: readFileSync(srvKey, 'utf8'), caFile: caCrt, created };
}
