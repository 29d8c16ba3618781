/**
 * Device JWTs (jose), signed by the connector's own key.
 *
 * Keys live in `<state_dir>/keys/`: `jwt-<kid>.key` (PKCS#8 PEM, 0600) and the
 * index `jwt-keys.json` (current kid, and per key its algorithm and, once rotated
 * out, the time after which no token it signed can verify or be renewed). The kid
 * is the key's RFC 7638 JWK thumbprint.
 *
 * Verification trusts nothing in the token before the signature is checked with
 * a key we chose: the header's alg must be on the allow-list (ES256, EdDSA) AND
 * equal the algorithm of the key its kid names, so `alg: none`, HS256 keyed with
 * our public key and RS* tokens are refused before any crypto runs.
 */
import { generateKeyPairSync, createPrivateKey, createPublicKey, randomUUID, type KeyObject } from 'node:crypto';
import { readFileSync, existsSync, mkdirSync } from 'node:fs';
import path from 'node:path';
import { SignJWT, jwtVerify, decodeProtectedHeader, decodeJwt, exportJWK, calculateJwkThumbprint, errors as joseErrors, type JWTPayload } from 'jose';
import type { Config } from '../core/config/schema.js';
import type { Logger } from '../core/logger.js';
import type { Component } from '../core/component.js';
import type { InitStep } from '../core/component.js';
import { AuthenticationError, ConnectorError, StorageError } from '../core/errors.js';
import { DEVICE_ID_RE, type DeviceRegistry } from './registry.js';
import { writeAtomic } from '../core/fs.js';

export type JwtConfig = Config['identity']['jwt'];
export type JwtAlgorithm = JwtConfig['algorithm'];

/** The only algorithms a device token may use. */
export const ALLOWED_ALGORITHMS: readonly JwtAlgorithm[] = ['ES256', 'EdDSA'];
const MAX_TOKEN_LENGTH = 8192;

export interface DeviceClaims {
  deviceId: string;
  jti: string;
  iat: number;
  exp: number;
  metadata?: Record<string, unknown>;
}

interface KeyEntry {
  kid: string;
  alg: JwtAlgorithm;
  created_at: string;
  /** epoch seconds; set when rotated out: after this the key is dropped */
  retire_after?: number;
}
interface KeyIndex {
  version: 1;
  current: string;
  keys: KeyEntry[];
}
interface LoadedKey extends KeyEntry {
  privateKey: KeyObject;
  publicKey: KeyObject;
}

export function keysDir(stateDir: string): string {
  return path.join(stateDir, 'keys');
}
const INDEX_NAME = 'jwt-keys.json';

function keyFile(dir: string, kid: string): string {
  return path.join(dir, `jwt-${kid}.key`);
}

async function generateKey(alg: JwtAlgorithm): Promise<{ kid: string; pem: string }> {
  const { privateKey, publicKey } = alg === 'EdDSA' ? generateKeyPairSync('ed25519') : generateKeyPairSync('ec', { namedCurve: 'prime256v1' });
  const kid = await calculateJwkThumbprint(await exportJWK(publicKey), 'sha256');
  return { kid, pem: privateKey.export({ type: 'pkcs8', format: 'pem' }).toString() };
}

function readIndex(dir: string): KeyIndex | undefined {
  const file = path.join(dir, INDEX_NAME);
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new StorageError('ECONN_STATE_DIR', `${file} cannot be read (${(err as NodeJS.ErrnoException).code})`, { cause: err });
  }
  try {
    const idx = JSON.parse(text) as KeyIndex;
    if (idx.version !== 1 || typeof idx.current !== 'string' || !Array.isArray(idx.keys) || !idx.keys.some((k) => k.kid === idx.current)) {
      throw new Error('unexpected shape');
    }
    return idx;
  } catch (err) {
    throw new StorageError('ECONN_STATE_DIR', `token key index ${file} is corrupt (${(err as Error).message}); restore it from a backup`, { cause: err });
  }
}

async function writeIndex(dir: string, idx: KeyIndex): Promise<void> {
  await writeAtomic(path.join(dir, INDEX_NAME), JSON.stringify(idx, null, 2) + '\n', 0o600);
}

/** Create the signing key if there is none. Never overwrites. */
export async function initTokenKeys(stateDir: string, alg: JwtAlgorithm): Promise<string[]> {
  const dir = keysDir(stateDir);
  if (readIndex(dir)) return [];
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const k = await generateKey(alg);
  const file = keyFile(dir, k.kid);
  await writeAtomic(file, k.pem, 0o600);
  await writeIndex(dir, { version: 1, current: k.kid, keys: [{ kid: k.kid, alg, created_at: new Date().toISOString() }] });
  return [file, path.join(dir, INDEX_NAME)];
}

function tokenError(message: string): AuthenticationError {
  return new AuthenticationError('ECONN_AUTH_TOKEN', message);
}

export class TokenService implements Component {
  readonly name = 'tokens';
  private readonly dir: string;
  private config: JwtConfig;
  private readonly registry: DeviceRegistry;
  private readonly log: Logger;
  private readonly now: () => number;
  private keys = new Map<string, LoadedKey>();
  private currentKid: string | undefined;
  private started: Promise<void> | undefined;
  private index: KeyIndex | undefined;

  constructor(opts: { stateDir: string; config: JwtConfig; registry: DeviceRegistry; logger: Logger; now?: () => number }) {
    this.dir = keysDir(opts.stateDir);
    this.config = opts.config;
    this.registry = opts.registry;
    this.log = opts.logger.child({ component: 'tokens' });
    this.now = opts.now ?? Date.now;
  }

  static initStep(): InitStep {
    return {
      name: 'device token signing key',
      run: (config) => initTokenKeys(config.daemon.state_dir, config.identity.jwt.algorithm),
    };
  }

  start(): Promise<void> {
    this.started ??= this.load().catch((err: unknown) => {
      this.started = undefined;
      throw err;
    });
    return this.started;
  }

  private async load(): Promise<void> {
    const idx = readIndex(this.dir);
    if (!idx) throw new StorageError('ECONN_STATE_DIR', `no token signing key in ${this.dir}; run "connector init" to create it`);
    this.index = idx;
    this.keys.clear();
    for (const e of idx.keys) {
      const file = keyFile(this.dir, e.kid);
      try {
        const privateKey = createPrivateKey(readFileSync(file, 'utf8'));
        this.keys.set(e.kid, { ...e, privateKey, publicKey: createPublicKey(privateKey) });
      } catch (err) {
        if (e.kid === idx.current) {
          throw new StorageError('ECONN_STATE_DIR', `token signing key ${file} cannot be loaded (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`, { cause: err });
        }
        this.log.warn({ kid: e.kid, file }, 'previous token key cannot be loaded; tokens it signed will be refused');
      }
    }
    this.currentKid = idx.current;
    await this.prune();
    if (this.keys.get(idx.current)!.alg !== this.config.algorithm) {
      this.log.info({ from: this.keys.get(idx.current)!.alg, to: this.config.algorithm }, 'identity.jwt.algorithm changed: rotating the signing key');
      await this.rotateKey();
    }
  }

  /** Drop rotated-out keys whose every token is past expiry and renewal grace. */
  private async prune(): Promise<void> {
    if (!this.index) return;
    const nowS = Math.floor(this.now() / 1000);
    const drop = this.index.keys.filter((k) => k.kid !== this.index!.current && k.retire_after !== undefined && k.retire_after < nowS);
    if (drop.length === 0) return;
    this.index = { ...this.index, keys: this.index.keys.filter((k) => !drop.includes(k)) };
    await writeIndex(this.dir, this.index);
    for (const k of drop) this.keys.delete(k.kid);
    // the key files stay on disk (harmless, already unused); an operator may delete them
    this.log.info({ kids: drop.map((k) => k.kid) }, 'retired token keys dropped');
  }

  async close(): Promise<void> {}

  async reload(next: Config): Promise<string[]> {
    const before = this.config;
    this.config = next.identity.jwt;
    const changed: string[] = [];
    for (const k of Object.keys(before) as (keyof JwtConfig)[]) {
      if (before[k] !== this.config[k]) changed.push(`identity.jwt.${k}`);
    }
    if (this.currentKid && this.keys.get(this.currentKid)?.alg !== this.config.algorithm) await this.rotateKey();
    return changed.length ? [`device tokens: ${changed.join(', ')} changed`] : [];
  }

  status(): Record<string, unknown> {
    return { kid: this.currentKid, keys: this.keys.size };
  }

  private current(): LoadedKey {
    const k = this.currentKid ? this.keys.get(this.currentKid) : undefined;
    if (!k) throw new ConnectorError('ECONN_CLOSED', 'token service is not started');
    return k;
  }

  /** The public keys that verify tokens (current first), e.g. for a JWKS document. */
  async publicJwks(): Promise<{ keys: Record<string, unknown>[] }> {
    const out: Record<string, unknown>[] = [];
    const cur = this.current();
    for (const k of [cur, ...[...this.keys.values()].filter((k) => k !== cur)]) {
      out.push({ ...(await exportJWK(k.publicKey)), kid: k.kid, alg: k.alg, use: 'sig' });
    }
    return { keys: out };
  }

  async issue(deviceId: string): Promise<{ token: string; jti: string; expiresAt: Date }> {
    const rec = this.registry.get(deviceId);
    if (!rec) throw new ConnectorError('ECONN_DEVICE_UNKNOWN', `device "${deviceId}" is not registered`);
    if (rec.status !== 'active') throw new ConnectorError('ECONN_DEVICE_REVOKED', `device "${deviceId}" is revoked`);
    const key = this.current();
    const iat = Math.floor(this.now() / 1000);
    const exp = iat + this.config.ttl_s;
    const jti = randomUUID();
    const token = await new SignJWT({ device_id: deviceId, metadata: rec.metadata as Record<string, unknown> })
      .setProtectedHeader({ alg: key.alg, kid: key.kid, typ: 'JWT' })
      .setSubject(deviceId)
      .setIssuer(this.config.issuer)
      .setAudience(this.config.audience)
      .setIssuedAt(iat)
      .setNotBefore(iat)
      .setExpirationTime(exp)
      .setJti(jti)
      .sign(key.privateKey);
    await this.registry.addToken(deviceId, { jti, exp });
    this.log.info({ deviceId, jti, exp }, 'device token issued');
    return { token, jti, expiresAt: new Date(exp * 1000) };
  }

  /** Header checks and key choice: nothing from the token is trusted before this. */
  private pickKey(token: unknown): LoadedKey {
    if (typeof token !== 'string' || token.length === 0) throw tokenError('token missing');
    if (token.length > MAX_TOKEN_LENGTH) throw tokenError('token too long');
    if (!/^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$/.test(token)) throw tokenError('token is not a signed compact JWT');
    let header: ReturnType<typeof decodeProtectedHeader>;
    try {
      header = decodeProtectedHeader(token);
    } catch {
      throw tokenError('token header cannot be decoded');
    }
    const alg = header.alg;
    if (typeof alg !== 'string' || !(ALLOWED_ALGORITHMS as readonly string[]).includes(alg)) {
      throw tokenError(`token algorithm ${JSON.stringify(String(alg)).slice(0, 20)} is not allowed (allowed: ${ALLOWED_ALGORITHMS.join(', ')})`);
    }
    if (typeof header.kid !== 'string') throw tokenError('token has no kid header');
    const key = this.keys.get(header.kid);
    const nowS = Math.floor(this.now() / 1000);
    if (!key || (key.retire_after !== undefined && key.retire_after < nowS)) throw tokenError('token signed by an unknown or retired key');
    if (key.alg !== alg) throw tokenError('token algorithm does not match its key');
    return key;
  }

  private async verifySignedClaims(token: string, key: LoadedKey, at: Date): Promise<JWTPayload> {
    try {
      const { payload } = await jwtVerify(token, key.publicKey, {
        algorithms: [key.alg],
        issuer: this.config.issuer,
        audience: this.config.audience,
        clockTolerance: this.config.clock_skew_s,
        currentDate: at,
        requiredClaims: ['sub', 'jti', 'iat', 'exp'],
      });
      return payload;
    } catch (err) {
      if (err instanceof joseErrors.JWTExpired) throw tokenError('token expired');
      if (err instanceof joseErrors.JWTClaimValidationFailed) throw tokenError(`token claim check failed: ${err.claim} ${err.reason}`);
      if (err instanceof joseErrors.JWSSignatureVerificationFailed) throw tokenError('token signature is invalid');
      throw tokenError(`token refused (${err instanceof joseErrors.JOSEError ? err.code : 'malformed'})`);
    }
  }

  /** Claims beyond jose's checks, then the registry (device exists and active, jti not revoked). */
  private checkClaims(payload: JWTPayload): DeviceClaims {
    const { sub, jti, iat, exp } = payload;
    const deviceId = (payload as { device_id?: unknown }).device_id;
    if (typeof sub !== 'string' || !DEVICE_ID_RE.test(sub)) throw tokenError('token sub is not a valid device id');
    if (deviceId !== sub) throw tokenError('token device_id does not equal sub');
    if (typeof jti !== 'string' || jti.length === 0 || jti.length > 128) throw tokenError('token jti missing');
    if (typeof iat !== 'number' || typeof exp !== 'number') throw tokenError('token iat/exp missing');
    if (iat > Math.floor(this.now() / 1000) + this.config.clock_skew_s) throw tokenError('token issued in the future');
    const rec = this.registry.get(sub);
    if (!rec) throw new AuthenticationError('ECONN_DEVICE_UNKNOWN', `device "${sub}" is not registered`);
    if (rec.status !== 'active') throw new AuthenticationError('ECONN_DEVICE_REVOKED', `device "${sub}" is revoked`);
    if (this.registry.isTokenRevoked(jti)) throw tokenError('token revoked');
    const md = (payload as { metadata?: unknown }).metadata;
    const claims: DeviceClaims = { deviceId: sub, jti, iat, exp };
    if (md && typeof md === 'object' && !Array.isArray(md)) claims.metadata = md as Record<string, unknown>;
    return claims;
  }

  async verify(token: string): Promise<DeviceClaims> {
    const key = this.pickKey(token);
    const payload = await this.verifySignedClaims(token, key, new Date(this.now()));
    return this.checkClaims(payload);
  }

  async renew(token: string): Promise<{ token: string; jti: string; expiresAt: Date; deviceId: string }> {
    const key = this.pickKey(token);
    let exp: unknown;
    try {
      exp = decodeJwt(token).exp;
    } catch {
      throw tokenError('token payload cannot be decoded');
    }
    if (typeof exp !== 'number' || !Number.isFinite(exp)) throw tokenError('token exp missing');
    const nowMs = this.now();
    if (nowMs > (exp + this.config.renew_grace_s + this.config.clock_skew_s) * 1000) {
      throw tokenError('token expired longer ago than the renewal grace period; register the device again');
    }
    // inside the grace period, check everything else as of the token's own expiry
    // (exp itself is covered by the signature check)
    // (jose treats exp <= now as expired, so check at the last millisecond before exp)
    const at = new Date(Math.min(nowMs, exp * 1000 - 1));
    const payload = await this.verifySignedClaims(token, key, at);
    const claims = this.checkClaims(payload);
    // the renewed token retires the old one (refused from now on; a concurrent second
    // renewal of it fails checkClaims: retireToken marks it before its first await)
    const retired = this.registry.retireToken(claims.jti);
    let fresh: Awaited<ReturnType<TokenService['issue']>>;
    try {
      await retired;
      fresh = await this.issue(claims.deviceId);
    } catch (err) {
      this.log.error({ deviceId: claims.deviceId, old_jti: claims.jti, err }, 'token renewal failed after the old token was retired');
      throw err;
    }
    this.log.info({ deviceId: claims.deviceId, old_jti: claims.jti, jti: fresh.jti }, 'device token renewed; the old token is retired');
    return { ...fresh, deviceId: claims.deviceId };
  }

  async revoke(jti: string): Promise<void> {
    await this.registry.revokeToken(jti);
    this.log.info({ jti }, 'device token revoked');
  }

  /**
   * New signing key (identity.jwt.algorithm). The previous key keeps verifying
   * until every token it signed is past exp + renew_grace_s (+ clock skew).
   */
  async rotateKey(): Promise<{ kid: string }> {
    if (!this.index) throw new ConnectorError('ECONN_CLOSED', 'token service is not started');
    const alg = this.config.algorithm;
    const k = await generateKey(alg);
    mkdirSync(this.dir, { recursive: true, mode: 0o700 });
    const file = keyFile(this.dir, k.kid);
    if (!existsSync(file)) await writeAtomic(file, k.pem, 0o600);
    const nowS = Math.floor(this.now() / 1000);
    const retireAfter = nowS + this.config.ttl_s + this.config.renew_grace_s + this.config.clock_skew_s;
    const keys = this.index.keys.map((e) =>
      e.kid === this.index!.current ? { ...e, retire_after: Math.max(e.retire_after ?? 0, retireAfter) } : e,
    );
    keys.push({ kid: k.kid, alg, created_at: new Date(this.now()).toISOString() });
    const next: KeyIndex = { version: 1, current: k.kid, keys };
    await writeIndex(this.dir, next);
    this.index = next;
    const privateKey = createPrivateKey(k.pem);
    for (const e of keys) {
      const loaded = this.keys.get(e.kid);
      if (loaded) this.keys.set(e.kid, { ...loaded, ...e });
    }
    this.keys.set(k.kid, { ...keys[keys.length - 1]!, privateKey, publicKey: createPublicKey(privateKey) });
    this.currentKid = k.kid;
    this.log.info({ kid: k.kid, alg }, 'token signing key rotated');
    await this.prune();
    return { kid: k.kid };
  }
}
