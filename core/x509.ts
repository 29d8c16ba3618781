/**
 * The one import of @peculiar/x509 (EC and RSA certificates, CSRs, CRLs).
 * node-forge handles RSA only (it cannot parse an EC key or CSR), so EC device
 * CSRs and EC issuance go through this library on Node's WebCrypto. It needs
 * the reflect-metadata polyfill loaded first and the crypto provider set once.
 */
import 'reflect-metadata';
import { webcrypto } from 'node:crypto';
import * as x509 from '@peculiar/x509';

x509.cryptoProvider.set(webcrypto as unknown as Crypto);

export { x509 };

export type KeyType = 'ec' | 'rsa';

function keyAlgorithm(type: KeyType): RsaHashedKeyGenParams | EcKeyGenParams {
  return type === 'rsa'
    ? { name: 'RSASSA-PKCS1-v1_5', hash: 'SHA-256', publicExponent: new Uint8Array([1, 0, 1]), modulusLength: 2048 }
    : ({ name: 'ECDSA', namedCurve: 'P-256', hash: 'SHA-256' } as EcKeyGenParams);
}

/** Signing algorithm for a key pair's private key (ECDSA needs the hash given here). */
export function signingAlgorithm(key: CryptoKey): Algorithm {
  return key.algorithm.name === 'ECDSA' ? ({ name: 'ECDSA', hash: 'SHA-256' } as EcdsaParams) : { name: 'RSASSA-PKCS1-v1_5' };
}

export async function generateKeyPair(type: KeyType): Promise<CryptoKeyPair> {
  return (await webcrypto.subtle.generateKey(keyAlgorithm(type), true, ['sign', 'verify'])) as CryptoKeyPair;
}

export async function privateKeyToPem(key: CryptoKey): Promise<string> {
  const der = Buffer.from(await webcrypto.subtle.exportKey('pkcs8', key));
  return `-----BEGIN PRIVATE KEY-----\n${der.toString('base64').replace(/(.{64})/g, '$1\n').replace(/\n$/, '')}\n-----END PRIVATE KEY-----\n`;
}

/** Import a PKCS#8 PEM private key (EC P-256 or RSA) as a signing CryptoKey. */
export async function importPrivateKeyPem(pem: string): Promise<CryptoKey> {
  const { createPrivateKey } = await import('node:crypto');
  const ko = createPrivateKey(pem);
  const der = ko.export({ type: 'pkcs8', format: 'der' });
  const alg = ko.asymmetricKeyType === 'ec' ? { name: 'ECDSA', namedCurve: 'P-256' } : { name: 'RSASSA-PKCS1-v1_5', hash: 'SHA-256' };
  return webcrypto.subtle.importKey('pkcs8', der, alg, true, ['sign']);
}

export function randomSerial(): string {
  // 16 random bytes, top bit cleared so the INTEGER stays positive
  const b = webcrypto.getRandomValues(new Uint8Array(16));
  b[0] = (b[0]! & 0x7f) | 0x01;
  return Buffer.from(b).toString('hex');
}

export interface SelfSignedCaOptions {
  /** Subject (= issuer) distinguished name, e.g. `CN=edge-connector device CA gw1, O=edge-connector`. */
  name: string;
  notBefore: Date;
  notAfter: Date;
  /** Default 'ec' (P-256). */
  keyType?: KeyType;
}

export interface SelfSignedCa {
  certificate: x509.X509Certificate;
  keys: CryptoKeyPair;
  /** The private key as PKCS#8 PEM. */
  keyPem: string;
}

/**
 * The one CA builder (device PKI, the reference cloud's TLS, the test
 * certificates): a fresh key pair and a self-signed CA certificate with a
 * random positive serial, basicConstraints CA:TRUE pathlen:0 (critical),
 * keyUsage keyCertSign + cRLSign (critical) and a subject key identifier.
 */
export async function createSelfSignedCa(opts: SelfSignedCaOptions): Promise<SelfSignedCa> {
  const keys = await generateKeyPair(opts.keyType ?? 'ec');
  const certificate = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: randomSerial(),
    name: opts.name,
    notBefore: opts.notBefore,
    notAfter: opts.notAfter,
    keys,
    signingAlgorithm: signingAlgorithm(keys.privateKey),
    extensions: [
      new x509.BasicConstraintsExtension(true, 0, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true),
      await x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
    ],
  });
  return { certificate, keys, keyPem: await privateKeyToPem(keys.privateKey) };
}
