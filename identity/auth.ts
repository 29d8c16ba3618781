/**
 * Device authentication for the broker's MQTT CONNECT: client certificate and/or JWT
 * (token as the MQTT password, username = device id), per listener auth mode.
 *
 * Outcome → CONNACK return code (MQTT 3.1.1, 3.2.2.3):
 *  - 2 identifier rejected: the client id differs from the authenticated device id (or is
 *    empty), or an anonymous local application uses a registered device's id  (ECONN_AUTH_CLIENT_ID);
 *  - 4 bad user name or password: credentials missing or invalid — no/unknown-CA/expired/
 *    not-yet-valid/revoked certificate, certificate without a usable identity, missing/bad/
 *    expired/revoked token, token of another device, cert and token naming different devices
 *    (ECONN_AUTH_FAILED, ECONN_AUTH_CERT, ECONN_AUTH_TOKEN);
 *  - 5 not authorized: the credentials are genuine but the device is not registered or is
 *    revoked (ECONN_DEVICE_UNKNOWN, ECONN_DEVICE_REVOKED);
 *  - 3 server unavailable: an internal failure while checking (ECONN_INTERNAL).
 *
 * Auth modes: `cert` (certificate required; username/password ignored), `jwt` (token required;
 * a certificate is ignored), `cert+jwt` (both, naming the same device), `cert|jwt` (either; every
 * credential presented must be valid, and when both are presented they must name the same device).
 */
import { X509Certificate } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { ConnectorError, errorCode, type ErrorCode } from '../core/errors.js';
import type { x509 } from '../core/x509.js';
import { DEVICE_ID_RE, normalizeSerial, type DeviceRecord } from './registry.js';

export type ListenerAuth = 'cert' | 'jwt' | 'cert+jwt' | 'cert|jwt' | 'none';

/** What the authenticator needs from the registry (DeviceRegistry satisfies it). */
export interface RegistryView {
  get(id: string): DeviceRecord | undefined;
  isSerialRevoked(serial: string): boolean;
  deviceForSerial?(serial: string): string | undefined;
}

/** What the authenticator needs from the token service (TokenService satisfies it). */
export interface TokenVerifier {
  verify(token: string): Promise<{ deviceId: string; jti: string; exp: number }>;
}

/** The TLS facts of a connection (from the TLSSocket, for MQTT/TLS and for MQTT/WSS). */
export interface TlsPeer {
  /** the client certificate, when one was presented */
  cert: X509Certificate | undefined;
  /** did OpenSSL verify the chain against the configured CAs */
  authorized: boolean;
  authorizationError?: string | Error | null;
}

export interface ConnectAttempt {
  auth: ListenerAuth;
  /** client id as sent in CONNECT ('' when empty) */
  clientId: string;
  username: string | undefined;
  password: Buffer | undefined;
  tls: TlsPeer | undefined;
}

export interface AuthenticatedIdentity {
  kind: 'device';
  deviceId: string;
  via: 'cert' | 'jwt' | 'cert+jwt';
  record: DeviceRecord;
  cert?: { serial: string; issuer: string; notAfter: number; raw: Buffer };
  token?: { jti: string; exp: number };
}
export interface AnonymousIdentity {
  kind: 'local';
}

export type AuthResult =
  | { ok: true; identity: AuthenticatedIdentity | AnonymousIdentity }
  | { ok: false; returnCode: 2 | 3 | 4 | 5; code: ErrorCode; reason: string; deviceId?: string };

export interface CertIdentityConfig {
  identity_from: 'cn' | 'san_uri';
  san_uri_prefix: string;
}

const refuse = (returnCode: 2 | 3 | 4 | 5, code: ErrorCode, reason: string, deviceId?: string): AuthResult => ({
  ok: false,
  returnCode,
  code,
  reason,
  ...(deviceId !== undefined ? { deviceId } : {}),
});

/**
 * Certificate revocation lists from files (PEM, possibly several blocks, or DER).
 * @peculiar/x509 parses them; it is loaded by the first load() that has a file, so a
 * gateway without broker.tls.crl_files never loads it (~12 MiB RSS with its dependencies).
 */
export class CrlStore {
  /** issuer (RFC 4514 string as @peculiar/x509 renders it) -> revoked serials (normalised) */
  private revoked = new Map<string, Set<string>>();
  private count = 0;
  private lib: typeof x509 | undefined;

  get size(): number {
    return this.count;
  }

  /** Parse every file; throws ConnectorError ECONN_CRL naming the file on any problem (the previous set stays). */
  async load(files: readonly string[]): Promise<{ crls: number; entries: number; stale: string[] }> {
    const next = new Map<string, Set<string>>();
    let crls = 0;
    let entries = 0;
    const stale: string[] = [];
    if (files.length > 0) this.lib ??= (await import('../core/x509.js')).x509;
    for (const file of files) {
      let data: Buffer;
      try {
        data = await readFile(file);
      } catch (err) {
        throw new ConnectorError('ECONN_CRL', `CRL file ${file} cannot be read (${(err as NodeJS.ErrnoException).code ?? 'error'}) (broker.tls.crl_files)`, { cause: err });
      }
      const text = data.toString('latin1');
      const blocks = text.includes('-----BEGIN')
        ? (text.match(/-----BEGIN (?:X509 )?CRL-----[\s\S]*?-----END (?:X509 )?CRL-----/g) ?? []).map((pem) =>
            Buffer.from(pem.replace(/-----(BEGIN|END) (X509 )?CRL-----/g, '').replace(/\s+/g, ''), 'base64'),
          )
        : [data];
      if (blocks.length === 0) throw new ConnectorError('ECONN_CRL', `CRL file ${file} holds no "BEGIN X509 CRL" block (broker.tls.crl_files)`);
      for (const b of blocks) {
        let crl: x509.X509Crl;
        try {
          crl = new this.lib!.X509Crl(new Uint8Array(b));
        } catch (err) {
          throw new ConnectorError('ECONN_CRL', `CRL file ${file} cannot be parsed as an X.509 CRL (PEM or DER) (broker.tls.crl_files)`, { cause: err });
        }
        crls++;
        if (crl.nextUpdate && crl.nextUpdate.getTime() < Date.now()) stale.push(file);
        let set = next.get(crl.issuer);
        if (!set) next.set(crl.issuer, (set = new Set()));
        for (const e of crl.entries) {
          set.add(normalizeSerial(e.serialNumber));
          entries++;
        }
      }
    }
    this.revoked = next;
    this.count = entries;
    return { crls, entries, stale };
  }

  isRevoked(issuer: string, serial: string): boolean {
    return this.revoked.get(issuer)?.has(normalizeSerial(serial)) ?? false;
  }

  /**
   * The issuer of a DER certificate as this store keys it; '' while no CRL file was ever
   * loaded (no issuer can match then, and a later load() makes the library available).
   */
  issuerOf(raw: Buffer): string {
    return this.lib ? new this.lib.X509Certificate(new Uint8Array(raw)).issuer : '';
  }
}

/** Node renders `subject` as lines `KEY=value`; the last CN wins like in most TLS stacks. */
export function certCommonName(cert: X509Certificate): string | undefined {
  let cn: string | undefined;
  for (const line of cert.subject.split('\n')) if (line.startsWith('CN=')) cn = line.slice(3);
  return cn;
}

/** SAN URIs of a certificate (Node renders `URI:value, DNS:value`, quoting values with separators). */
export function certSanUris(cert: X509Certificate): string[] {
  const san = cert.subjectAltName;
  if (!san) return [];
  const out: string[] = [];
  const re = /(?:^|,\s*)URI:("(?:[^"\\]|\\.)*"|[^,]*)/g;
  for (let m = re.exec(san); m; m = re.exec(san)) {
    let v = m[1]!;
    if (v.startsWith('"')) {
      try {
        v = JSON.parse(v) as string;
      } catch {
        continue;
      }
    }
    out.push(v);
  }
  return out;
}

/** The device id a certificate names, or a reason why it names none. */
export function certDeviceId(cert: X509Certificate, cfg: CertIdentityConfig): { id: string } | { error: string } {
  let id: string | undefined;
  if (cfg.identity_from === 'cn') {
    id = certCommonName(cert);
    if (id === undefined) return { error: 'certificate has no subject CN (broker.tls.identity_from: cn)' };
  } else {
    const ids = certSanUris(cert)
      .filter((u) => u.startsWith(cfg.san_uri_prefix))
      .map((u) => u.slice(cfg.san_uri_prefix.length));
    if (ids.length === 0) return { error: `certificate has no SAN URI starting with ${cfg.san_uri_prefix} (broker.tls.identity_from: san_uri)` };
    if (new Set(ids).size > 1) return { error: 'certificate names several device ids in its SAN URIs' };
    id = ids[0]!;
  }
  if (!DEVICE_ID_RE.test(id)) return { error: 'the device id in the certificate is not a valid device id' };
  return { id };
}

function tlsReason(err: string | Error | null | undefined): string {
  const code = typeof err === 'string' ? err : err ? ((err as NodeJS.ErrnoException).code ?? err.message) : 'unknown';
  switch (code) {
    case 'CERT_HAS_EXPIRED':
      return 'client certificate has expired';
    case 'CERT_NOT_YET_VALID':
      return 'client certificate is not yet valid';
    case 'UNABLE_TO_GET_ISSUER_CERT':
    case 'UNABLE_TO_GET_ISSUER_CERT_LOCALLY':
    case 'UNABLE_TO_VERIFY_LEAF_SIGNATURE':
    case 'SELF_SIGNED_CERT_IN_CHAIN':
    case 'DEPTH_ZERO_SELF_SIGNED_CERT':
      return `client certificate does not chain to a trusted device CA (${code})`;
    default:
      return `client certificate verification failed (${code})`;
  }
}

export interface AuthenticatorOptions {
  registry: RegistryView;
  tokens: TokenVerifier;
  crls: CrlStore;
  tls: CertIdentityConfig;
  now?: () => number;
}

export class DeviceAuthenticator {
  private readonly registry: RegistryView;
  private readonly tokens: TokenVerifier;
  private readonly crls: CrlStore;
  private tlsCfg: CertIdentityConfig;
  private readonly now: () => number;

  constructor(opts: AuthenticatorOptions) {
    this.registry = opts.registry;
    this.tokens = opts.tokens;
    this.crls = opts.crls;
    this.tlsCfg = opts.tls;
    this.now = opts.now ?? Date.now;
  }

  setCertIdentity(cfg: CertIdentityConfig): void {
    this.tlsCfg = cfg;
  }

  /** Never throws: every failure becomes a refusal. */
  async authenticate(a: ConnectAttempt): Promise<AuthResult> {
    try {
      return await this.run(a);
    } catch (err) {
      return refuse(3, 'ECONN_INTERNAL', `internal error while authenticating (${(err as Error)?.name ?? 'error'})`);
    }
  }

  private async run(a: ConnectAttempt): Promise<AuthResult> {
    if (a.auth === 'none') {
      if (a.clientId !== '' && this.registry.get(a.clientId)) {
        return refuse(2, 'ECONN_AUTH_CLIENT_ID', 'the client id of an anonymous local application equals a registered device id');
      }
      return { ok: true, identity: { kind: 'local' } };
    }
    const wantCert = a.auth === 'cert' || a.auth === 'cert+jwt' || a.auth === 'cert|jwt';
    const wantJwt = a.auth === 'jwt' || a.auth === 'cert+jwt' || a.auth === 'cert|jwt';
    const hasCert = wantCert && a.tls?.cert !== undefined;
    const hasToken = wantJwt && a.password !== undefined && a.password.length > 0;

    if (a.auth === 'cert' && !hasCert) return refuse(4, 'ECONN_AUTH_FAILED', 'no client certificate presented (this listener requires one)');
    if (a.auth === 'jwt' && !hasToken) return refuse(4, 'ECONN_AUTH_FAILED', 'no token presented as the MQTT password (this listener requires one)');
    if (a.auth === 'cert+jwt' && (!hasCert || !hasToken)) {
      return refuse(4, 'ECONN_AUTH_FAILED', `this listener requires a client certificate and a token; missing: ${!hasCert ? 'certificate' : 'token'}`);
    }
    if (a.auth === 'cert|jwt' && !hasCert && !hasToken) {
      return refuse(4, 'ECONN_AUTH_FAILED', 'neither a client certificate nor a token (MQTT password) was presented');
    }

    let certId: { id: string; serial: string; issuer: string; notAfter: number; raw: Buffer } | undefined;
    if (hasCert) {
      const r = this.checkCert(a.tls!);
      if ('refusal' in r) return r.refusal;
      certId = r;
    }
    let tokenId: { id: string; jti: string; exp: number } | undefined;
    if (hasToken) {
      const r = await this.checkToken(a.password!, a.username);
      if ('refusal' in r) return r.refusal;
      tokenId = r;
    }
    if (certId && tokenId && certId.id !== tokenId.id) {
      return refuse(4, 'ECONN_AUTH_FAILED', 'the certificate and the token name different devices', certId.id);
    }
    const deviceId = (certId?.id ?? tokenId?.id)!;
    const record = this.registry.get(deviceId);
    if (!record) return refuse(5, 'ECONN_DEVICE_UNKNOWN', 'the device is not registered', deviceId);
    if (record.status !== 'active') return refuse(5, 'ECONN_DEVICE_REVOKED', 'the device is revoked', deviceId);
    if (a.clientId !== deviceId) {
      return refuse(2, 'ECONN_AUTH_CLIENT_ID', a.clientId === '' ? 'empty client id; it must equal the device id' : 'the client id differs from the device id', deviceId);
    }
    return {
      ok: true,
      identity: {
        kind: 'device',
        deviceId,
        via: certId && tokenId ? 'cert+jwt' : certId ? 'cert' : 'jwt',
        record,
        ...(certId ? { cert: { serial: certId.serial, issuer: certId.issuer, notAfter: certId.notAfter, raw: certId.raw } } : {}),
        ...(tokenId ? { token: { jti: tokenId.jti, exp: tokenId.exp } } : {}),
      },
    };
  }

  private checkCert(tls: TlsPeer): { id: string; serial: string; issuer: string; notAfter: number; raw: Buffer } | { refusal: AuthResult } {
    const cert = tls.cert!;
    if (!tls.authorized) return { refusal: refuse(4, 'ECONN_AUTH_CERT', tlsReason(tls.authorizationError)) };
    const now = this.now();
    const notBefore = Date.parse(cert.validFrom);
    const notAfter = Date.parse(cert.validTo);
    if (!(notBefore <= now)) return { refusal: refuse(4, 'ECONN_AUTH_CERT', 'client certificate is not yet valid') };
    if (!(now <= notAfter)) return { refusal: refuse(4, 'ECONN_AUTH_CERT', 'client certificate has expired') };
    // OpenSSL accepts a CA certificate as a TLS client's leaf; a device holding one could sign certificates
    // for other ids (refused today only because the device CA has pathlen:0). A device is an end entity.
    if (cert.ca) return { refusal: refuse(4, 'ECONN_AUTH_CERT', 'client certificate is a CA certificate (basicConstraints CA:TRUE); a device certificate must be an end-entity certificate') };
    const ident = certDeviceId(cert, this.tlsCfg);
    if ('error' in ident) return { refusal: refuse(4, 'ECONN_AUTH_CERT', ident.error) };
    const serial = normalizeSerial(cert.serialNumber);
    if (this.registry.isSerialRevoked(serial)) return { refusal: refuse(4, 'ECONN_AUTH_CERT', `client certificate ${serial} is revoked`, ident.id) };
    let issuer = '';
    if (this.crls.size > 0) {
      issuer = this.crls.issuerOf(cert.raw);
      if (this.crls.isRevoked(issuer, serial)) {
        return { refusal: refuse(4, 'ECONN_AUTH_CERT', `client certificate ${serial} is revoked by a CRL (broker.tls.crl_files)`, ident.id) };
      }
    }
    const owner = this.registry.deviceForSerial?.(serial);
    if (owner !== undefined && owner !== ident.id) {
      return { refusal: refuse(4, 'ECONN_AUTH_CERT', 'client certificate was issued to another device', ident.id) };
    }
    return { id: ident.id, serial, issuer, notAfter, raw: cert.raw };
  }

  private async checkToken(password: Buffer, username: string | undefined): Promise<{ id: string; jti: string; exp: number } | { refusal: AuthResult }> {
    const token = password.toString('utf8');
    let claims: { deviceId: string; jti: string; exp: number };
    try {
      claims = await this.tokens.verify(token);
    } catch (err) {
      const code = errorCode(err);
      const msg = err instanceof ConnectorError ? err.message : 'token verification failed';
      if (code === 'ECONN_DEVICE_UNKNOWN') return { refusal: refuse(5, 'ECONN_DEVICE_UNKNOWN', msg) };
      if (code === 'ECONN_DEVICE_REVOKED') return { refusal: refuse(5, 'ECONN_DEVICE_REVOKED', msg) };
      if (code === 'ECONN_CLOSED') return { refusal: refuse(3, 'ECONN_CLOSED', 'the token service is closed') };
      return { refusal: refuse(4, 'ECONN_AUTH_TOKEN', msg) };
    }
    if (username === undefined || username !== claims.deviceId) {
      return {
        refusal: refuse(4, 'ECONN_AUTH_TOKEN', username ? 'the token belongs to another device than the MQTT username' : 'the MQTT username must be the device id', claims.deviceId),
      };
    }
    if (claims.exp * 1000 <= this.now()) return { refusal: refuse(4, 'ECONN_AUTH_TOKEN', 'token has expired', claims.deviceId) };
    return { id: claims.deviceId, jti: claims.jti, exp: claims.exp };
  }
}
