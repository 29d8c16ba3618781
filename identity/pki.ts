/**
 * Local PKI in `<state_dir>/pki/`:
 *
 *   ca.crt, ca.key            the current device CA (EC P-256, self-signed); it signs device
 *                             certificates (and the server certificate when no rotation is open)
 *   trusted/<serial>.crt,.key previous device CAs after a CA rotation: still trusted for device
 *                             certificates until `connector ca retire` (or they expire)
 *   retired/<serial>.crt      CAs dropped by retireCa() (certificate only, the key is deleted)
 *   server.crt, server.key    the broker/API server certificate (SAN from identity.pki.server_names)
 *
 * CA rotation is two steps. rotateCa(): a new CA signs device certificates; the previous one stays
 * trusted, and the server certificate keeps being issued (also on renewal) by the OLDEST still-
 * trusted CA whose key we hold and that has more than server_cert_renew_before_days left, because
 * devices that still only have the old ca.crt verify the server with it. Devices are handed a
 * bundle of all trusted CAs (deviceCaBundlePem()) meanwhile, so they can move over. retireCa():
 * the operator says every device has the new CA; the server certificate is re-issued by the
 * current CA and the previous CAs are dropped from trust and from issuing.
 *
 * Private keys are 0600, written atomically. `connector init` (LocalPki.initStep)
 * creates what is missing and never overwrites; start() only loads, except that
 * it renews the server certificate when it is within server_cert_renew_before_days
 * of expiry or its SAN no longer matches server_names (emits 'server-cert').
 *
 * Libraries: node-forge cannot parse EC keys, certificates or CSRs, and many devices
 * hold P-256 keys, so issuance runs on @peculiar/x509 (WebCrypto) for both key types.
 * node-forge is used where RSA suffices: an RSA CSR's self-signature is checked by
 * forge as well as by WebCrypto. Certificates are parsed back with node:crypto to
 * compute fingerprints exactly as TLS reports them.
 */
import { EventEmitter } from 'node:events';
import { X509Certificate, createPrivateKey } from 'node:crypto';
import { readFileSync, existsSync, mkdirSync, readdirSync, unlinkSync } from 'node:fs';
import { isIP } from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Config } from '../core/config/schema.js';
import type { Logger } from '../core/logger.js';
import type { Component } from '../core/component.js';
import type { InitStep } from '../core/component.js';
import { ConnectorError, StorageError, type ErrorCode } from '../core/errors.js';
import type { x509, KeyType } from '../core/x509.js';

/**
 * @peculiar/x509 and node-forge are loaded on first use: every `connector` CLI
 * invocation imports the composition root, and these two cost more start-up time
 * than the rest of the identity code together.
 */
type X509Lib = typeof import('../core/x509.js');
let x509Lib: Promise<X509Lib> | undefined;
function lib(): Promise<X509Lib> {
  x509Lib ??= import('../core/x509.js');
  return x509Lib;
}
async function forgeVerifiesCsr(csrPem: string): Promise<boolean> {
  const forge = (await import('node-forge')).default;
  return forge.pki.certificationRequestFromPem(csrPem).verify();
}
import { DEVICE_ID_RE, normalizeSerial } from './registry.js';
import { writeAtomic } from '../core/fs.js';

export type PkiConfig = Config['identity']['pki'];

export interface IssuedCert {
  cert: string;
  serial: string;
  fingerprint256: string;
  notAfter: Date;
}

const DAY = 86400_000;
/** Backdating of notBefore, for devices whose clock is a little behind. */
const BACKDATE_MS = 5 * 60_000;
const SERVER_CHECK_INTERVAL_MS = 12 * 3600_000;
export const DEVICE_SAN_URI_PREFIX = 'urn:device:';

export function pkiDir(stateDir: string): string {
  return path.join(stateDir, 'pki');
}

export function pkiPaths(stateDir: string) {
  const dir = pkiDir(stateDir);
  return {
    dir,
    caCert: path.join(dir, 'ca.crt'),
    caKey: path.join(dir, 'ca.key'),
    trustedDir: path.join(dir, 'trusted'),
    serverCert: path.join(dir, 'server.crt'),
    serverKey: path.join(dir, 'server.key'),
  };
}

function pkiError(message: string, cause?: unknown): ConnectorError {
  return new ConnectorError('ECONN_PKI', message, cause === undefined ? undefined : { cause });
}

function fingerprint256(pem: string): string {
  return new X509Certificate(pem).fingerprint256;
}

function sanOf(names: readonly string[]): x509.JsonGeneralName[] {
  return names.map((n) => (isIP(n) ? { type: 'ip', value: n } : { type: 'dns', value: n }) as x509.JsonGeneralName);
}

function x509Sans(cert: X509Certificate): string {
  return (cert.subjectAltName ?? '')
    .split(', ')
    .filter(Boolean)
    .map((s) => s.toLowerCase())
    .sort()
    .join(',');
}

function nodeSanString(names: readonly string[]): string {
  // node formats IPv6 SANs in full form; normalise by generating the same way node prints
  return names
    .map((n) => {
      const v = isIP(n);
      if (v === 4) return `ip address:${n}`;
      if (v === 6) return `ip address:${expandIpv6(n)}`;
      return `dns:${n.toLowerCase()}`;
    })
    .sort()
    .join(',');
}

function expandIpv6(ip: string): string {
  const [head, tail] = ip.split('::') as [string, string | undefined];
  const h = head ? head.split(':') : [];
  const t = tail ? tail.split(':') : [];
  const fill = tail === undefined ? [] : Array(8 - h.length - t.length).fill('0');
  return [...h, ...fill, ...t].map((p) => p.toUpperCase().replace(/^0+(?=.)/, '')).join(':');
}

async function createCa(cn: string, validityDays: number): Promise<{ cert: string; key: string }> {
  const L = await lib();
  const now = Date.now();
  const ca = await L.createSelfSignedCa({ name: `CN=${cn}, O=edge-connector`, notBefore: new Date(now - BACKDATE_MS), notAfter: new Date(now + validityDays * DAY) });
  return { cert: ca.certificate.toString('pem'), key: ca.keyPem };
}

/**
 * A CA as the running daemon holds it. Validity, subject and serial come from node:crypto,
 * which the idle daemon has anyway; the @peculiar/x509 certificate and the WebCrypto key
 * are only needed to sign, so they are built on the first issuance (signerOf): loading
 * @peculiar/x509 (+ reflect-metadata, asn1js, tsyringe) at start cost ~12 MiB RSS.
 */
interface CaMaterial {
  pem: string;
  cert: X509Certificate;
  keyPem: string;
  signer?: Promise<CaSigner>;
}

interface CaSigner {
  cert: x509.X509Certificate;
  key: CryptoKey;
}

/** Parse both halves with node:crypto so a broken CA still fails the start, not the first issuance. */
function loadCa(certPem: string, keyPem: string): CaMaterial {
  const cert = new X509Certificate(certPem);
  createPrivateKey(keyPem);
  return { pem: certPem, cert, keyPem };
}

function signerOf(ca: CaMaterial): Promise<CaSigner> {
  ca.signer ??= (async () => {
    const L = await lib();
    return { cert: new L.x509.X509Certificate(ca.pem), key: await L.importPrivateKeyPem(ca.keyPem) };
  })().catch((err: unknown) => {
    ca.signer = undefined; // a later issuance tries again
    throw pkiError(`device CA key cannot be loaded for signing (${(err as Error).message})`, err);
  });
  return ca.signer;
}

function notAfterOf(ca: CaMaterial): number {
  return Date.parse(ca.cert.validTo);
}

async function issueServerCert(ca: CaMaterial, names: readonly string[], validityDays: number): Promise<{ cert: string; key: string }> {
  const L = await lib();
  if (names.length === 0) throw pkiError('identity.pki.server_names is empty: list the DNS names and IP addresses devices use to reach the gateway');
  const signer = await signerOf(ca);
  const keys = await L.generateKeyPair('ec');
  const now = Date.now();
  const notAfter = new Date(Math.min(now + validityDays * DAY, notAfterOf(ca)));
  const cert = await L.x509.X509CertificateGenerator.create({
    serialNumber: L.randomSerial(),
    subject: `CN=${names[0]}`,
    issuer: signer.cert.subject,
    notBefore: new Date(now - BACKDATE_MS),
    notAfter,
    signingKey: signer.key,
    publicKey: keys.publicKey,
    signingAlgorithm: L.signingAlgorithm(signer.key),
    extensions: [
      new L.x509.BasicConstraintsExtension(false, undefined, true),
      new L.x509.KeyUsagesExtension(L.x509.KeyUsageFlags.digitalSignature | L.x509.KeyUsageFlags.keyEncipherment, true),
      new L.x509.ExtendedKeyUsageExtension([L.x509.ExtendedKeyUsage.serverAuth]),
      new L.x509.SubjectAlternativeNameExtension(sanOf(names)),
      await L.x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
      await L.x509.AuthorityKeyIdentifierExtension.create(signer.cert),
    ],
  });
  return { cert: cert.toString('pem'), key: await L.privateKeyToPem(keys.privateKey) };
}

function readIf(file: string): string | undefined {
  try {
    return readFileSync(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new StorageError('ECONN_PKI', `${file} cannot be read (${(err as NodeJS.ErrnoException).code}); check its owner and mode`, { cause: err });
  }
}

/**
 * Create the device CA and the server certificate when missing. Never overwrites:
 * a half-present pair (certificate without key or the reverse) is an error.
 */
export async function initPki(stateDir: string, cfg: PkiConfig, serverName: string): Promise<string[]> {
  const p = pkiPaths(stateDir);
  mkdirSync(p.dir, { recursive: true, mode: 0o700 });
  const created: string[] = [];
  const hasCaCert = existsSync(p.caCert);
  const hasCaKey = existsSync(p.caKey);
  if (hasCaCert !== hasCaKey) {
    throw pkiError(`${hasCaCert ? p.caCert : p.caKey} exists without ${hasCaCert ? p.caKey : p.caCert}; restore the missing file or move both away to create a new device CA`);
  }
  if (!hasCaCert) {
    const ca = await createCa(`edge-connector device CA ${serverName}`.trim(), cfg.ca_validity_days);
    await writeAtomic(p.caKey, ca.key, 0o600);
    await writeAtomic(p.caCert, ca.cert, 0o644);
    created.push(p.caKey, p.caCert);
  }
  const hasSrvCert = existsSync(p.serverCert);
  const hasSrvKey = existsSync(p.serverKey);
  if (hasSrvCert !== hasSrvKey) {
    throw pkiError(`${hasSrvCert ? p.serverCert : p.serverKey} exists without ${hasSrvCert ? p.serverKey : p.serverCert}; restore the missing file or move both away`);
  }
  if (!hasSrvCert) {
    const ca = loadCa(readFileSync(p.caCert, 'utf8'), readFileSync(p.caKey, 'utf8'));
    const srv = await issueServerCert(ca, cfg.server_names, cfg.server_cert_validity_days);
    await writeAtomic(p.serverKey, srv.key, 0o600);
    await writeAtomic(p.serverCert, srv.cert, 0o644);
    created.push(p.serverKey, p.serverCert);
  }
  return created;
}

export interface PkiInitJob {
  stateDir: string;
  cfg: PkiConfig;
  serverName: string;
}

/**
 * initPki, in a short-lived child process when something must be created. Creating the CA
 * and the server certificate needs @peculiar/x509, and an ES module stays loaded for the life
 * of the process: on a fresh state directory the daemon kept ~9 MiB RSS for a library it used
 * once. A worker thread was not enough: its heap went when it ended, but the C heap it grew
 * (its own malloc arena) stayed mapped in the daemon, ~6 MiB of idle RSS on every fresh start
 * (measured: 85-90 MiB idle after a fresh start, 80-82 MiB after a restart on the same state).
 * A child process gives all of it back. When every file exists there is nothing to create
 * and no child.
 */
export async function initPkiInChild(stateDir: string, cfg: PkiConfig, serverName: string): Promise<string[]> {
  const p = pkiPaths(stateDir);
  if ([p.caCert, p.caKey, p.serverCert, p.serverKey].every((f) => existsSync(f))) return initPki(stateDir, cfg, serverName);
  const { fork } = await import('node:child_process');
  // the entry sits next to this module: pki.js in dist/, pki.ts when run from source (tests,
  // which also need the parent's TypeScript loader flags; the built daemon passes none, so a
  // profiler or inspector flag of the daemon is not inherited)
  const ext = path.extname(new URL(import.meta.url).pathname);
  const entry = fileURLToPath(new URL(`./pki-init-child${ext}`, import.meta.url));
  const job: PkiInitJob = { stateDir, cfg, serverName };
  const child = fork(entry, [], { execArgv: ext === '.ts' ? process.execArgv : [], stdio: ['ignore', 'inherit', 'inherit', 'ipc'], serialization: 'json' });
  type Reply = { created: string[] } | { error: { name: string; code: string | undefined; message: string } };
  return new Promise<string[]>((resolve, reject) => {
    let reply: Reply | undefined;
    child.once('message', (m: Reply) => (reply = m));
    child.once('error', (err) => reject(pkiError(`the PKI could not be initialised (${err.message})`, err)));
    // 'close', not 'exit': it comes after the IPC channel has delivered every message
    child.once('close', (code, signal) => {
      if (!reply) return reject(pkiError(`the PKI initialisation process exited (${signal ?? code}) without a result`));
      if ('created' in reply) return resolve(reply.created);
      const e = reply.error;
      if (e.code?.startsWith('ECONN_')) {
        reject(e.name === 'StorageError' ? new StorageError(e.code as ErrorCode, e.message) : new ConnectorError(e.code as ErrorCode, e.message));
      } else {
        reject(Object.assign(new Error(e.message), e.code ? { code: e.code } : {}));
      }
    });
    child.send(job);
  });
}

type CsrKeyCheck = { type: KeyType };

function checkCsrKey(alg: Algorithm): CsrKeyCheck {
  if (alg.name === 'ECDSA') {
    const curve = (alg as EcKeyAlgorithm).namedCurve;
    if (curve !== 'P-256' && curve !== 'P-384') throw pkiError(`CSR key curve ${curve} is not supported (use P-256 or P-384, or RSA 2048+)`);
    return { type: 'ec' };
  }
  if (alg.name === 'RSASSA-PKCS1-v1_5' || alg.name === 'RSA-PSS' || alg.name === 'RSA-OAEP') {
    const bits = (alg as RsaKeyAlgorithm).modulusLength;
    if (!bits || bits < 2048) throw pkiError(`CSR RSA key has ${bits ?? '?'} bits; at least 2048 are required`);
    return { type: 'rsa' };
  }
  throw pkiError(`CSR key algorithm ${alg.name} is not supported (use EC P-256/P-384 or RSA 2048+)`);
}

export class LocalPki extends EventEmitter implements Component {
  readonly name = 'pki';
  private readonly stateDir: string;
  private config: PkiConfig;
  private readonly log: Logger;
  private readonly paths: ReturnType<typeof pkiPaths>;
  private ca: CaMaterial | undefined;
  /** previous CAs (rotation open), most recent first; `file` is trusted/<serial>.crt (its key: .key) */
  private previousCas: { pem: string; file: string }[] = [];
  private server: { cert: string; key: string } | undefined;
  private started: Promise<void> | undefined;
  private timer: NodeJS.Timeout | undefined;
  private closed = false;

  constructor(opts: { stateDir: string; config: PkiConfig; logger: Logger }) {
    super();
    this.stateDir = opts.stateDir;
    this.config = opts.config;
    this.log = opts.logger.child({ component: 'pki' });
    this.paths = pkiPaths(opts.stateDir);
  }

  static initStep(): InitStep {
    return {
      name: 'local PKI (device CA, server certificate)',
      run: (config) => initPkiInChild(config.daemon.state_dir, config.identity.pki, config.daemon.server_name),
    };
  }

  start(): Promise<void> {
    this.closed = false;
    this.started ??= this.load().catch((err: unknown) => {
      this.started = undefined;
      throw err;
    });
    return this.started;
  }

  private async load(): Promise<void> {
    const caPem = readIf(this.paths.caCert);
    const caKey = readIf(this.paths.caKey);
    if (!caPem || !caKey) throw pkiError(`device CA ${this.paths.caCert} or its key is missing; run "connector init" to create it`);
    try {
      this.ca = loadCa(caPem, caKey);
    } catch (err) {
      throw pkiError(`device CA ${this.paths.caCert} / ${this.paths.caKey} cannot be loaded (${(err as Error).message})`, err);
    }
    this.previousCas = this.loadTrusted();
    const cert = readIf(this.paths.serverCert);
    const key = readIf(this.paths.serverKey);
    if (!cert || !key) throw pkiError(`server certificate ${this.paths.serverCert} or its key is missing; run "connector init" to create it`);
    try {
      createPrivateKey(key);
      new X509Certificate(cert);
    } catch (err) {
      throw pkiError(`server certificate ${this.paths.serverCert} / key cannot be parsed (${(err as Error).message})`, err);
    }
    this.server = { cert, key };
    await this.maybeRenewServer();
    this.timer = setInterval(() => {
      this.maybeRenewServer().catch((err: unknown) => this.log.error({ err }, 'server certificate renewal failed'));
    }, SERVER_CHECK_INTERVAL_MS);
    this.timer.unref();
  }

  private loadTrusted(): { pem: string; file: string }[] {
    let names: string[];
    try {
      names = readdirSync(this.paths.trustedDir).filter((n) => n.endsWith('.crt'));
    } catch {
      return [];
    }
    const out: { pem: string; file: string; notBefore: number }[] = [];
    for (const n of names.sort()) {
      const file = path.join(this.paths.trustedDir, n);
      try {
        const pem = readFileSync(file, 'utf8');
        const c = new X509Certificate(pem);
        if (new Date(c.validTo).getTime() < Date.now()) {
          this.log.info({ file }, 'previous device CA has expired; no longer trusted');
          continue;
        }
        out.push({ pem, file, notBefore: new Date(c.validFrom).getTime() });
      } catch (err) {
        this.log.warn({ err, file }, 'previous device CA cannot be parsed; ignored');
      }
    }
    return out.sort((a, b) => b.notBefore - a.notBefore).map(({ pem, file }) => ({ pem, file }));
  }

  /**
   * The CA that issues the server certificate: the oldest previous CA (rotation not yet retired)
   * whose key we hold and that is valid for more than server_cert_renew_before_days (+1 day),
   * so devices that only know the old CA keep verifying the server; otherwise the current CA.
   */
  private async issuingCa(): Promise<CaMaterial> {
    const ca = this.requireCa();
    const minLeft = Date.now() + (this.config.server_cert_renew_before_days + 1) * DAY;
    for (const prev of [...this.previousCas].reverse()) {
      try {
        if (new Date(new X509Certificate(prev.pem).validTo).getTime() <= minLeft) continue;
        const keyPem = readIf(prev.file.replace(/\.crt$/, '.key'));
        if (!keyPem) continue;
        return loadCa(prev.pem, keyPem);
      } catch (err) {
        this.log.warn({ err, file: prev.file }, 'previous device CA key cannot be loaded; not used for the server certificate');
      }
    }
    return ca;
  }

  private async writeServer(ca: CaMaterial, reason: string): Promise<void> {
    const srv = await issueServerCert(ca, this.config.server_names, this.config.server_cert_validity_days);
    await writeAtomic(this.paths.serverKey, srv.key, 0o600);
    await writeAtomic(this.paths.serverCert, srv.cert, 0o644);
    this.server = srv;
    this.log.info({ reason, issuer: normalizeSerial(ca.cert.serialNumber), not_after: new X509Certificate(srv.cert).validTo }, 'server certificate renewed');
    this.emit('server-cert', srv);
  }

  /** Server certificate renewal: near expiry, or SAN no longer matching identity.pki.server_names. */
  private async maybeRenewServer(): Promise<void> {
    if (!this.server || !this.ca || this.closed) return;
    const cur = new X509Certificate(this.server.cert);
    const expires = new Date(cur.validTo).getTime();
    const renewAt = expires - this.config.server_cert_renew_before_days * DAY;
    if (!this.isOurServerCert(cur)) return; // operator-provided server certificate: not ours to renew
    const issuer = await this.issuingCa();
    const sanChanged = x509Sans(cur) !== nodeSanString(this.config.server_names);
    const issuerChanged = !cur.checkIssued(new X509Certificate(issuer.pem)) || !cur.verify(new X509Certificate(issuer.pem).publicKey);
    if (Date.now() < renewAt && !sanChanged && !issuerChanged) return;
    await this.writeServer(issuer, sanChanged ? 'server_names changed' : issuerChanged ? 'issuing CA changed' : 'near expiry');
  }

  private isOurServerCert(cur: X509Certificate): boolean {
    return [this.requireCa().pem, ...this.previousCas.map((p) => p.pem)].some((p) => {
      const ca = new X509Certificate(p);
      return cur.checkIssued(ca) && cur.verify(ca.publicKey);
    });
  }

  async reload(next: Config): Promise<string[]> {
    const before = this.config;
    this.config = next.identity.pki;
    if (JSON.stringify(before.server_names) === JSON.stringify(next.identity.pki.server_names) && before.server_cert_renew_before_days === next.identity.pki.server_cert_renew_before_days) {
      return [];
    }
    await this.maybeRenewServer();
    return ['identity.pki: server certificate checked against the new server_names'];
  }

  async close(): Promise<void> {
    this.closed = true;
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
  }

  status(): Record<string, unknown> {
    if (!this.ca || !this.server) return { loaded: false };
    return {
      ca_not_after: new Date(notAfterOf(this.ca)).toISOString(),
      previous_cas: this.previousCas.length,
      rotation_open: this.previousCas.length > 0,
      server_not_after: new Date(new X509Certificate(this.server.cert).validTo).toISOString(),
    };
  }

  private requireCa(): CaMaterial {
    if (!this.ca) throw new ConnectorError('ECONN_CLOSED', 'local PKI is not started');
    return this.ca;
  }

  caCertificatePem(): string {
    return this.requireCa().pem;
  }

  trustedDeviceCaPems(): string[] {
    return [this.requireCa().pem, ...this.previousCas.map((p) => p.pem)];
  }

  /**
   * The `ca.crt` handed to devices (registration API, `connector device add`): the current CA,
   * and while a rotation is open (before retireCa) every previous CA too, current first, so a
   * device verifies the server both before and after the rotation is retired.
   */
  deviceCaBundlePem(): string {
    const pems = this.trustedDeviceCaPems();
    if (pems.length === 1) return pems[0]!;
    return pems.map((p) => `${p.trim()}\n`).join('');
  }

  serverCredentials(): { cert: string; key: string } {
    if (!this.server) throw new ConnectorError('ECONN_CLOSED', 'local PKI is not started');
    return { ...this.server };
  }

  private async issue(deviceId: string, publicKey: x509.PublicKey | CryptoKey, keyType: KeyType): Promise<IssuedCert> {
    const L = await lib();
    if (!DEVICE_ID_RE.test(deviceId)) throw new ConnectorError('ECONN_BAD_REQUEST', `invalid device id for a certificate`);
    const ca = this.requireCa();
    const signer = await signerOf(ca);
    const now = Date.now();
    const notAfter = new Date(Math.min(now + this.config.device_cert_validity_days * DAY, notAfterOf(ca)));
    const serial = L.randomSerial();
    const usage = L.x509.KeyUsageFlags.digitalSignature | (keyType === 'rsa' ? L.x509.KeyUsageFlags.keyEncipherment : 0);
    let cert: x509.X509Certificate;
    try {
      cert = await L.x509.X509CertificateGenerator.create({
        serialNumber: serial,
        subject: `CN=${deviceId}`,
        issuer: signer.cert.subject,
        notBefore: new Date(now - BACKDATE_MS),
        notAfter,
        signingKey: signer.key,
        publicKey,
        signingAlgorithm: L.signingAlgorithm(signer.key),
        extensions: [
          new L.x509.BasicConstraintsExtension(false, undefined, true),
          new L.x509.KeyUsagesExtension(usage, true),
          new L.x509.ExtendedKeyUsageExtension([L.x509.ExtendedKeyUsage.clientAuth]),
          new L.x509.SubjectAlternativeNameExtension([{ type: 'url', value: `${DEVICE_SAN_URI_PREFIX}${deviceId}` }]),
          await L.x509.SubjectKeyIdentifierExtension.create(publicKey as CryptoKey),
          await L.x509.AuthorityKeyIdentifierExtension.create(signer.cert),
        ],
      });
    } catch (err) {
      throw pkiError(`the device certificate could not be signed (${(err as Error).message})`, err);
    }
    const pem = cert.toString('pem');
    this.log.info({ deviceId, serial: normalizeSerial(serial), not_after: notAfter.toISOString() }, 'device certificate issued');
    return { cert: pem, serial: normalizeSerial(serial), fingerprint256: fingerprint256(pem), notAfter };
  }

  /**
   * Sign a device CSR (PEM). The CSR's self-signature is verified (proof that the
   * requester holds the private key); the subject is replaced: CN = deviceId and
   * SAN URI urn:device:<deviceId>. A CSR whose CN names another device is refused.
   */
  async signCsr(csrPem: string, deviceId: string): Promise<IssuedCert> {
    const L = await lib();
    if (typeof deviceId !== 'string' || !DEVICE_ID_RE.test(deviceId)) throw new ConnectorError('ECONN_BAD_REQUEST', 'invalid device id for a certificate');
    if (typeof csrPem !== 'string' || !/-----BEGIN (NEW )?CERTIFICATE REQUEST-----/.test(csrPem) || csrPem.length > 64 * 1024) {
      throw pkiError('the CSR must be a PEM "CERTIFICATE REQUEST" (PKCS#10)');
    }
    let csr: x509.Pkcs10CertificateRequest;
    try {
      csr = new L.x509.Pkcs10CertificateRequest(csrPem);
    } catch (err) {
      throw pkiError('the CSR cannot be parsed as PKCS#10', err);
    }
    const { type } = checkCsrKey(csr.publicKey.algorithm);
    let ok: boolean;
    try {
      ok = await csr.verify();
    } catch (err) {
      throw pkiError('the CSR signature cannot be verified (unsupported signature algorithm?)', err);
    }
    if (ok && type === 'rsa') {
      // node-forge handles RSA: a second, independent check of the proof of possession
      try {
        ok = await forgeVerifiesCsr(csrPem);
      } catch {
        ok = false;
      }
    }
    if (!ok) throw pkiError('the CSR signature is invalid: it was not signed by the key it contains');
    const cns = csr.subjectName.getField('CN');
    if (cns.length > 0 && !cns.includes(deviceId)) {
      throw pkiError(`the CSR subject CN (${cns.join(', ').slice(0, 128)}) does not match the device id "${deviceId}"`);
    }
    return this.issue(deviceId, csr.publicKey, type);
  }

  /** Operator convenience: a new key pair and its certificate (the key leaves the gateway: prefer signCsr). */
  async issueDeviceBundle(deviceId: string, keyType: KeyType = 'ec'): Promise<IssuedCert & { key: string }> {
    const L = await lib();
    if (keyType !== 'ec' && keyType !== 'rsa') throw new ConnectorError('ECONN_BAD_REQUEST', 'key type must be "ec" or "rsa"');
    if (typeof deviceId !== 'string' || !DEVICE_ID_RE.test(deviceId)) throw new ConnectorError('ECONN_BAD_REQUEST', 'invalid device id for a certificate');
    const keys = await L.generateKeyPair(keyType);
    const issued = await this.issue(deviceId, keys.publicKey, keyType);
    return { ...issued, key: await L.privateKeyToPem(keys.privateKey) };
  }

  /**
   * CA rotation: a new device CA becomes current (signs new device certificates);
   * the previous one moves to trusted/ and stays in trustedDeviceCaPems() until
   * retireCa() (or it expires), so existing device certificates keep working. The server
   * certificate stays issued by the oldest still-trusted CA, also when it is renewed
   * (devices that only know the old CA keep verifying it), until retireCa().
   */
  async rotateCa(serverName = 'rotated'): Promise<{ serial: string }> {
    const old = this.requireCa();
    const fresh = await createCa(`edge-connector device CA ${serverName}`.trim(), this.config.ca_validity_days);
    mkdirSync(this.paths.trustedDir, { recursive: true, mode: 0o700 });
    const oldSerial = normalizeSerial(old.cert.serialNumber);
    await writeAtomic(path.join(this.paths.trustedDir, `${oldSerial}.crt`), old.pem, 0o644);
    await writeAtomic(path.join(this.paths.trustedDir, `${oldSerial}.key`), readFileSync(this.paths.caKey, 'utf8'), 0o600);
    await writeAtomic(this.paths.caKey, fresh.key, 0o600);
    await writeAtomic(this.paths.caCert, fresh.cert, 0o644);
    this.ca = loadCa(fresh.cert, fresh.key);
    this.previousCas = [{ pem: old.pem, file: path.join(this.paths.trustedDir, `${oldSerial}.crt`) }, ...this.previousCas.filter((p) => p.pem !== old.pem)];
    const serial = normalizeSerial(this.ca.cert.serialNumber);
    this.log.info({ serial, previous: oldSerial }, 'device CA rotated');
    this.emit('ca-rotated', { serial });
    return { serial };
  }

  /**
   * Finish a CA rotation once every device has the new CA: the server certificate is re-issued
   * by the current CA (if it is ours), then every previous CA is dropped from trust and from
   * issuing (certificate moved to retired/, key deleted). Device certificates from a retired CA
   * stop working. Nothing open: returns retired = []. Order matters for a crash in between: the
   * new server certificate is written first, and a second call finishes the job.
   */
  async retireCa(): Promise<{ serial: string; retired: string[] }> {
    const ca = this.requireCa();
    const serial = normalizeSerial(ca.cert.serialNumber);
    const prev = this.previousCas;
    if (prev.length === 0) return { serial, retired: [] };
    if (this.server) {
      const cur = new X509Certificate(this.server.cert);
      const byCurrent = cur.checkIssued(new X509Certificate(ca.pem)) && cur.verify(new X509Certificate(ca.pem).publicKey);
      if (!byCurrent && this.isOurServerCert(cur)) await this.writeServer(ca, 'device CA rotation retired');
    }
    const retiredDir = path.join(this.paths.dir, 'retired');
    mkdirSync(retiredDir, { recursive: true, mode: 0o700 });
    const retired: string[] = [];
    for (const p of prev) {
      const s = normalizeSerial(new X509Certificate(p.pem).serialNumber);
      await writeAtomic(path.join(retiredDir, path.basename(p.file)), p.pem, 0o644);
      for (const f of [p.file, p.file.replace(/\.crt$/, '.key')]) {
        try {
          unlinkSync(f);
        } catch (err) {
          if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw new StorageError('ECONN_PKI', `${f} cannot be removed (${(err as NodeJS.ErrnoException).code}); remove it by hand to finish retiring the CA`, { cause: err });
        }
      }
      retired.push(s);
    }
    this.previousCas = [];
    this.log.info({ serial, retired }, 'device CA rotation retired: only the current CA is trusted');
    this.emit('ca-retired', { serial, retired });
    return { serial, retired };
  }

  get stateDirectory(): string {
    return this.stateDir;
  }
}
