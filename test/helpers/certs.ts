/**
 * Certificate factory for tests: CAs, server and client certificates, CRLs and
 * CSRs generated at test time (EC P-256 by default, RSA on request), including
 * the expired / not-yet-valid / wrong-CA variants the auth tests need.
 */
import { x509, createSelfSignedCa, generateKeyPair, privateKeyToPem, signingAlgorithm, randomSerial, type KeyType } from '../../core/x509.js';

const DAY = 86400_000;

export interface Issued {
  cert: string; // PEM
  key: string; // PEM (PKCS#8)
  serial: string; // hex
  certificate: x509.X509Certificate;
}

export interface ClientOptions {
  cn: string;
  sanUri?: string;
  keyType?: KeyType;
  notBefore?: Date;
  notAfter?: Date;
}

export class TestCA {
  private constructor(
    readonly name: string,
    readonly cert: string,
    readonly key: string,
    readonly certificate: x509.X509Certificate,
    private readonly keys: CryptoKeyPair,
  ) {}

  static async create(opts: { cn?: string; keyType?: KeyType; notBefore?: Date; notAfter?: Date } = {}): Promise<TestCA> {
    const cn = opts.cn ?? `Test CA ${randomSerial().slice(0, 8)}`;
    const { certificate, keys, keyPem } = await createSelfSignedCa({
      name: `CN=${cn}`,
      notBefore: opts.notBefore ?? new Date(Date.now() - DAY),
      notAfter: opts.notAfter ?? new Date(Date.now() + 365 * DAY),
      keyType: opts.keyType ?? 'ec',
    });
    return new TestCA(cn, certificate.toString('pem'), keyPem, certificate, keys);
  }

  private async issue(subject: string, keyType: KeyType, notBefore: Date, notAfter: Date, extensions: x509.Extension[]): Promise<Issued> {
    const keys = await generateKeyPair(keyType);
    const serial = randomSerial();
    const certificate = await x509.X509CertificateGenerator.create({
      serialNumber: serial,
      subject,
      issuer: this.certificate.subject,
      notBefore,
      notAfter,
      publicKey: keys.publicKey,
      signingKey: this.keys.privateKey,
      signingAlgorithm: signingAlgorithm(this.keys.privateKey),
      extensions: [
        new x509.BasicConstraintsExtension(false, undefined, true),
        await x509.AuthorityKeyIdentifierExtension.create(this.certificate, false),
        ...extensions,
      ],
    });
    return { cert: certificate.toString('pem'), key: await privateKeyToPem(keys.privateKey), serial, certificate };
  }

  /** Server certificate with DNS and IP SANs (default localhost, 127.0.0.1, ::1). */
  async server(names: string[] = ['localhost', '127.0.0.1', '::1'], keyType: KeyType = 'ec'): Promise<Issued> {
    const san = names.map((n) => (/^[\d.]+$/.test(n) || n.includes(':') ? { type: 'ip' as const, value: n } : { type: 'dns' as const, value: n }));
    return this.issue(`CN=${names[0] ?? 'localhost'}`, keyType, new Date(Date.now() - DAY), new Date(Date.now() + 30 * DAY), [
      new x509.SubjectAlternativeNameExtension(san),
      new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.serverAuth]),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature | x509.KeyUsageFlags.keyEncipherment, true),
    ]);
  }

  /** Client (device) certificate; identity in CN and optionally a SAN URI. */
  async client(opts: ClientOptions): Promise<Issued> {
    const ext: x509.Extension[] = [
      new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.clientAuth]),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature | x509.KeyUsageFlags.keyEncipherment, true),
    ];
    if (opts.sanUri) ext.push(new x509.SubjectAlternativeNameExtension([{ type: 'url', value: opts.sanUri }]));
    return this.issue(
      `CN=${opts.cn}`,
      opts.keyType ?? 'ec',
      opts.notBefore ?? new Date(Date.now() - DAY),
      opts.notAfter ?? new Date(Date.now() + 30 * DAY),
      ext,
    );
  }

  async expiredClient(cn: string): Promise<Issued> {
    return this.client({ cn, notBefore: new Date(Date.now() - 10 * DAY), notAfter: new Date(Date.now() - DAY) });
  }

  async notYetValidClient(cn: string): Promise<Issued> {
    return this.client({ cn, notBefore: new Date(Date.now() + DAY), notAfter: new Date(Date.now() + 10 * DAY) });
  }

  /** A CRL (PEM) revoking the given serials (hex). */
  async crl(revokedSerials: string[]): Promise<string> {
    const crl = await x509.X509CrlGenerator.create({
      issuer: this.certificate.subject,
      thisUpdate: new Date(Date.now() - 60_000),
      nextUpdate: new Date(Date.now() + 7 * DAY),
      entries: revokedSerials.map((serialNumber) => ({ serialNumber, revocationDate: new Date(Date.now() - 60_000) })),
      signingKey: this.keys.privateKey,
      signingAlgorithm: signingAlgorithm(this.keys.privateKey),
    });
    return crl.toString('pem');
  }
}

/** A PKCS#10 CSR (PEM) for a device whose key stays "on the device"; returns the key too. */
export async function createCsr(cn: string, keyType: KeyType = 'ec'): Promise<{ csr: string; key: string }> {
  const keys = await generateKeyPair(keyType);
  const csr = await x509.Pkcs10CertificateRequestGenerator.create({
    name: `CN=${cn}`,
    keys,
    signingAlgorithm: signingAlgorithm(keys.privateKey),
  });
  return { csr: csr.toString('pem'), key: await privateKeyToPem(keys.privateKey) };
}
