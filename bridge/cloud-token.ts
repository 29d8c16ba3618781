/**
 * OAuth2 client for the cloud's token endpoint (RFC 6749): the access token the
 * uplink presents on its WebSocket upgrade and renews in-band.
 *
 *  - grants: client_credentials or password (config `bridge.token.grant`), and
 *    refresh_token when the endpoint issued one: a renewal tries the refresh
 *    first and falls back to the full grant when the refresh is refused
 *    (400 invalid_grant / 401);
 *  - client authentication: HTTP Basic (client_secret_basic, RFC 6749 §2.3.1,
 *    which every server must support) when a client secret is configured,
 *    otherwise `client_id` in the body (public client);
 *  - secrets (client secret, password) are resolved through core/secrets.ts
 *    on every request, so a rotated or fixed secret file is picked up on the
 *    next attempt; they never reach a log line or an error message;
 *  - HTTPS only, with the same trust as the uplink (system store plus
 *    `bridge.uplink.ca_file`, optional client certificate), TLS >= 1.2,
 *    certificate validation always on;
 *  - the token is renewed ahead of expiry: `renew_before_s` before it expires,
 *    or at 80 % of its lifetime when the lifetime is too short for that; never
 *    sooner than MIN_RENEWAL_INTERVAL_MS after the last issue (a token the
 *    endpoint says lives a millisecond must not become a request loop), and
 *    through a clamped timer (a token living longer than ~24.9 days would
 *    overflow setTimeout, which then fires after 1 ms);
 *  - one renewal in flight at a time; concurrent getToken() callers share it;
 *  - a failure (endpoint down, 5xx, 429, refused credentials) is retried with
 *    exponential backoff and full jitter, never sooner than a `Retry-After`;
 *    while backing off, getToken() without a valid token fails fast with an
 *    ECONN_CLOUD_TOKEN error carrying `retryInMs` instead of hammering the endpoint.
 *
 * Events: 'token' ({ expiresAt, via }) after every successful issue or renewal,
 * 'error' is NOT emitted (failures are returned and logged).
 */
import { EventEmitter } from 'node:events';
import https from 'node:https';
import tls from 'node:tls';
import { readFileSync } from 'node:fs';
import type { Config } from '../core/config/schema.js';
import type { Logger } from '../core/logger.js';
import { redactString } from '../core/logger.js';
import { resolveSecret } from '../core/secrets.js';
import { ConnectorError, errorCode } from '../core/errors.js';
import { Backoff, parseRetryAfter } from './backoff.js';
import { clampDelay } from './uplink/timers.js';

/** Scheduled renewals of a token just issued are at least this far apart. */
export const MIN_RENEWAL_INTERVAL_MS = 1000;

export type TokenConfig = Config['bridge']['token'];
export type UplinkConfig = Config['bridge']['uplink'];

/** Timers and time, injectable so tests can drive renewals and backoff without sleeping. */
export interface Clock {
  now(): number;
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
}

export const systemClock: Clock = {
  now: () => Date.now(),
  setTimeout: (fn, ms) => {
    const h = setTimeout(fn, ms);
    h.unref();
    return h;
  },
  clearTimeout: (h) => clearTimeout(h as NodeJS.Timeout),
};

/** The TLS options both cloud connections use: system roots plus the configured CA, TLS >= min, validation always on. */
export interface CloudTlsOptions {
  /** Built from the files below (system roots + ca_file, client certificate, minimum version); shared while they are unchanged. */
  secureContext: tls.SecureContext;
  minVersion: tls.SecureVersion;
  rejectUnauthorized: true;
}

/**
 * The last secure context built, by the exact inputs it was built from. Building one with the ~140 system
 * roots costs tens of milliseconds of CPU; a cloud outage retries the token endpoint and the uplink every
 * few hundred ms, so a context per attempt burnt most of a core (measured: 64 % of the connector's CPU
 * during an outage with reconnect_max_ms 100). A pure memo of a derived value, not shared state.
 */
let contextMemo: { key: string; ctx: tls.SecureContext } | undefined;

/** Read the uplink's CA / client certificate files (at use time, so a reload or rotation is picked up). */
export function cloudTlsOptions(uplink: Pick<UplinkConfig, 'ca_file' | 'cert_file' | 'key_file' | 'min_tls_version'>, what = 'uplink'): CloudTlsOptions {
  const read = (file: string, key: string): string => {
    try {
      return readFileSync(file, 'utf8');
    } catch (err) {
      throw new ConnectorError('ECONN_UPLINK', `${what}: cannot read ${file} (bridge.uplink.${key}): ${(err as NodeJS.ErrnoException).code ?? 'error'}`, { cause: err });
    }
  };
  const parts: { ca?: string; cert?: string; key?: string } = {};
  if (uplink.ca_file) parts.ca = read(uplink.ca_file, 'ca_file');
  if (uplink.cert_file || uplink.key_file) {
    if (!uplink.cert_file || !uplink.key_file) throw new ConnectorError('ECONN_UPLINK', `${what}: bridge.uplink.cert_file and key_file must be set together`);
    parts.cert = read(uplink.cert_file, 'cert_file');
    parts.key = read(uplink.key_file, 'key_file');
  }
  const memoKey = [uplink.min_tls_version, parts.ca ?? '', parts.cert ?? '', parts.key ?? ''].join('\0');
  const ctxOpts: tls.SecureContextOptions = { minVersion: uplink.min_tls_version };
  // Node's `ca` replaces the default store: keep the system roots and add ours ("besides the system store")
  if (parts.ca !== undefined) ctxOpts.ca = [...tls.rootCertificates, parts.ca];
  if (parts.cert !== undefined) {
    ctxOpts.cert = parts.cert;
    ctxOpts.key = parts.key;
  }
  if (contextMemo?.key !== memoKey) {
    try {
      contextMemo = { key: memoKey, ctx: tls.createSecureContext(ctxOpts) };
    } catch (err) {
      throw new ConnectorError('ECONN_UPLINK', `${what}: unusable TLS material in bridge.uplink ca_file/cert_file/key_file: ${(err as Error).message}`, { cause: err });
    }
  }
  // only the context: given ca/cert/key too, a TLS client would build (and pay for) a context of its own
  return { secureContext: contextMemo.ctx, minVersion: uplink.min_tls_version, rejectUnauthorized: true };
}

export class CloudTokenError extends ConnectorError {
  /** HTTP status, when the endpoint answered. */
  readonly status?: number;
  /** OAuth2 `error` field, when the endpoint sent one. */
  readonly oauthError?: string;
  /** When the client will try again (ms from now), when it is backing off. */
  retryInMs?: number;
  constructor(message: string, opts: { status?: number; oauthError?: string; cause?: unknown } = {}) {
    super('ECONN_CLOUD_TOKEN', message, { cause: opts.cause });
    this.status = opts.status;
    this.oauthError = opts.oauthError;
  }
}

export interface TokenEvent {
  expiresAt: number;
  via: 'client_credentials' | 'password' | 'refresh_token';
}

export interface CloudTokenClientOptions {
  token: TokenConfig;
  uplink: Pick<UplinkConfig, 'ca_file' | 'cert_file' | 'key_file' | 'min_tls_version'>;
  logger: Logger;
  clock?: Clock;
  env?: NodeJS.ProcessEnv;
  /** Backoff after failures (defaults: 500 ms … 60 s). */
  retryMinMs?: number;
  retryMaxMs?: number;
  random?: () => number;
  /** Per-request timeout (default 15 s). */
  requestTimeoutMs?: number;
  /** Lifetime assumed when the endpoint omits expires_in (default 300 s). */
  defaultLifetimeS?: number;
}

interface TokenResponse {
  accessToken: string;
  refreshToken?: string;
  lifetimeMs: number;
}

const MAX_BODY = 64 * 1024;
const OAUTH_ERROR_RE = /^[\x20-\x21\x23-\x5b\x5d-\x7e]{1,64}$/; // RFC 6749 error codes are a restricted ASCII set

export class CloudTokenClient extends EventEmitter {
  private cfg: TokenConfig;
  private uplinkCfg: CloudTokenClientOptions['uplink'];
  private readonly log: Logger;
  private readonly clock: Clock;
  private readonly env: NodeJS.ProcessEnv;
  private readonly backoff: Backoff;
  private readonly requestTimeoutMs: number;
  private readonly defaultLifetimeMs: number;

  private accessToken: string | undefined;
  private refreshToken: string | undefined;
  private obtainedAt = 0;
  private expiresAtMs = 0;
  private inflight: Promise<string> | undefined;
  private timer: unknown;
  private nextAttemptAt = 0;
  private lastError: CloudTokenError | undefined;
  private closed = false;
  private active = false;
  private readonly pending = new Set<{ destroy(): void }>();
  /** Requests sent to the endpoint (for status and tests). */
  requests = 0;
  renewals = 0;
  failures = 0;

  constructor(opts: CloudTokenClientOptions) {
    super();
    this.cfg = opts.token;
    this.uplinkCfg = opts.uplink;
    this.log = opts.logger.child({ component: 'cloud-token' });
    this.clock = opts.clock ?? systemClock;
    this.env = opts.env ?? process.env;
    this.backoff = new Backoff({ minMs: opts.retryMinMs ?? 500, maxMs: opts.retryMaxMs ?? 60_000, random: opts.random });
    this.requestTimeoutMs = opts.requestTimeoutMs ?? 15_000;
    this.defaultLifetimeMs = (opts.defaultLifetimeS ?? 300) * 1000;
  }

  /** When the current access token expires (ms since the epoch), 0 if there is none. */
  get expiresAt(): number {
    return this.accessToken ? this.expiresAtMs : 0;
  }

  /** True while a usable (unexpired) access token is held. */
  hasValidToken(): boolean {
    return this.accessToken !== undefined && this.clock.now() < this.expiresAtMs;
  }

  /** When the client plans to renew the current token (ms since the epoch). */
  renewAt(): number {
    if (!this.accessToken) return 0;
    const lifetime = this.expiresAtMs - this.obtainedAt;
    const before = this.cfg.renew_before_s * 1000;
    // renew_before_s ahead of expiry, unless that is earlier than 80 % of the lifetime (a short-lived token)
    return this.obtainedAt + Math.max(lifetime - before, Math.floor(lifetime * 0.8));
  }

  /**
   * A valid access token: the current one, or a fresh one (shared with every
   * concurrent caller). Rejects with CloudTokenError (ECONN_CLOUD_TOKEN) —
   * immediately while backing off after a failure (see `retryInMs`) — or ECONN_CLOSED.
   */
  async getToken(): Promise<string> {
    if (this.closed) throw new ConnectorError('ECONN_CLOSED', 'cloud token client is closed');
    this.active = true;
    if (this.accessToken && this.clock.now() < this.expiresAtMs) return this.accessToken;
    if (this.inflight) return this.inflight;
    const now = this.clock.now();
    if (now < this.nextAttemptAt && this.lastError) {
      this.lastError.retryInMs = this.nextAttemptAt - now;
      throw this.lastError;
    }
    return this.renew();
  }

  /**
   * Renew now (or join the renewal in flight), even if the current token is
   * still valid. Used by the scheduler and by the uplink when the cloud refused
   * the current token.
   */
  renew(): Promise<string> {
    if (this.closed) return Promise.reject(new ConnectorError('ECONN_CLOSED', 'cloud token client is closed'));
    if (this.inflight) return this.inflight;
    const p = this.doRenew().finally(() => {
      if (this.inflight === p) this.inflight = undefined;
    });
    this.inflight = p;
    return p;
  }

  /**
   * The cloud refused our access token: forget it, so the next getToken() renews (refresh first).
   * With `token`, only if that is still the current one (a newer token is kept).
   */
  invalidate(token?: string): void {
    if (token !== undefined && token !== this.accessToken) return;
    this.accessToken = undefined;
    this.expiresAtMs = 0;
  }

  /** The current access token if it is still valid, without renewing anything. */
  peek(): string | undefined {
    return this.hasValidToken() ? this.accessToken : undefined;
  }

  /** Apply a new configuration (new endpoint, client, CA); the current token stays valid until it expires. */
  reload(token: TokenConfig, uplink: CloudTokenClientOptions['uplink']): string[] {
    const changed: string[] = [];
    const identity = (c: TokenConfig) => JSON.stringify([c.url, c.grant, c.client_id, c.username, c.scope]);
    if (identity(token) !== identity(this.cfg)) {
      changed.push('cloud token endpoint/client changed: the next renewal uses a full grant');
      this.refreshToken = undefined; // a refresh token belongs to the old client
    }
    if (token.renew_before_s !== this.cfg.renew_before_s) changed.push(`bridge.token.renew_before_s ${this.cfg.renew_before_s} -> ${token.renew_before_s}`);
    this.cfg = token;
    this.uplinkCfg = uplink;
    // a fixed secret should be tried without waiting out a long backoff
    this.nextAttemptAt = 0;
    this.backoff.reset();
    if (this.accessToken) this.schedule(this.renewAt());
    return changed;
  }

  status(): Record<string, unknown> {
    const now = this.clock.now();
    return {
      hasToken: this.hasValidToken(),
      expiresInS: this.accessToken ? Math.round((this.expiresAtMs - now) / 1000) : null,
      renewals: this.renewals,
      failures: this.failures,
      lastError: this.lastError ? { code: this.lastError.code, message: this.lastError.message } : null,
      retryInMs: now < this.nextAttemptAt ? this.nextAttemptAt - now : 0,
    };
  }

  async close(): Promise<void> {
    this.closed = true;
    if (this.timer !== undefined) this.clock.clearTimeout(this.timer);
    this.timer = undefined;
    for (const r of this.pending) r.destroy();
    this.pending.clear();
    this.accessToken = undefined;
    this.refreshToken = undefined;
  }

  // --- internals -----------------------------------------------------------

  private schedule(at: number): void {
    if (this.closed) return;
    if (this.timer !== undefined) this.clock.clearTimeout(this.timer);
    // clamped: a deadline beyond the longest timer (2^31-1 ms) is reached by re-arming
    this.timer = this.clock.setTimeout(() => {
      this.timer = undefined;
      if (this.closed || !this.active) return;
      if (this.clock.now() < at) return this.schedule(at);
      this.renew().catch(() => {
        /* logged and rescheduled in doRenew */
      });
    }, clampDelay(at - this.clock.now()));
  }

  private async doRenew(): Promise<string> {
    let via: TokenEvent['via'] = this.cfg.grant;
    try {
      let res: TokenResponse | undefined;
      if (this.refreshToken) {
        via = 'refresh_token';
        try {
          res = await this.request({ grant_type: 'refresh_token', refresh_token: this.refreshToken });
        } catch (err) {
          // the refresh token is dead (expired, revoked, rotated): fall back to the full grant; any other failure is an outage
          if (err instanceof CloudTokenError && (err.oauthError === 'invalid_grant' || err.status === 401 || err.status === 400)) {
            this.log.info({ status: err.status, oauthError: err.oauthError }, 'cloud token: refresh refused, using the full grant');
            this.refreshToken = undefined;
            via = this.cfg.grant;
          } else {
            throw err;
          }
        }
      }
      if (!res) res = await this.request(this.grantParams());
      if (this.closed) throw new ConnectorError('ECONN_CLOSED', 'cloud token client is closed');
      const now = this.clock.now();
      this.accessToken = res.accessToken;
      if (res.refreshToken) this.refreshToken = res.refreshToken; // RFC 6749 §6: keep the old one when none is returned
      this.obtainedAt = now;
      // the endpoint counts in whole seconds from when it issued the token, before the answer reached us:
      // treat the token as expiring up to a second (at most a tenth of its lifetime) early
      this.expiresAtMs = now + res.lifetimeMs - Math.min(1000, Math.floor(res.lifetimeMs / 10));
      this.renewals++;
      this.lastError = undefined;
      this.nextAttemptAt = 0;
      this.backoff.reset();
      this.schedule(Math.max(this.renewAt(), now + MIN_RENEWAL_INTERVAL_MS));
      this.log.info({ via, expiresInS: Math.round(res.lifetimeMs / 1000), renewInS: Math.round((this.renewAt() - now) / 1000) }, 'cloud token issued');
      const ev: TokenEvent = { expiresAt: this.expiresAtMs, via };
      this.emit('token', ev);
      return res.accessToken;
    } catch (err) {
      if (this.closed || errorCode(err) === 'ECONN_CLOSED') throw new ConnectorError('ECONN_CLOSED', 'cloud token client is closed');
      const e = err instanceof CloudTokenError ? err : new CloudTokenError(`cloud token: ${redactString((err as Error).message)}`, { cause: err });
      this.failures++;
      const retryAfter = (err as { retryAfterMs?: number }).retryAfterMs;
      const delay = this.backoff.next(retryAfter);
      e.retryInMs = delay;
      this.lastError = e;
      this.nextAttemptAt = this.clock.now() + delay;
      // keep trying in the background while the daemon wants a token
      this.schedule(this.nextAttemptAt);
      this.log.warn(
        { code: e.code, status: e.status, oauthError: e.oauthError, via, retryInMs: delay, attempt: this.backoff.attempts, tokenValidForS: this.hasValidToken() ? Math.round((this.expiresAtMs - this.clock.now()) / 1000) : 0 },
        `cloud token request failed: ${e.message}; retrying in ${(delay / 1000).toFixed(1)} s`,
      );
      throw e;
    }
  }

  private grantParams(): Record<string, string> {
    const p: Record<string, string> = { grant_type: this.cfg.grant };
    if (this.cfg.grant === 'password') {
      if (!this.cfg.username) throw new CloudTokenError('grant=password needs bridge.token.username');
      if (!this.cfg.password) throw new CloudTokenError('grant=password needs bridge.token.password (a secret reference)');
      p.username = this.cfg.username;
      p.password = this.secret(this.cfg.password, 'bridge.token.password');
    }
    if (this.cfg.scope) p.scope = this.cfg.scope;
    return p;
  }

  private secret(ref: string, key: string): string {
    try {
      return resolveSecret(ref, this.env);
    } catch (err) {
      // resolveSecret's message names the reference, never the value
      throw new CloudTokenError(`cannot read ${key}: ${(err as Error).message}`, { cause: err });
    }
  }

  private request(params: Record<string, string>): Promise<TokenResponse> {
    let url: URL;
    try {
      url = new URL(this.cfg.url);
    } catch {
      return Promise.reject(new CloudTokenError(`bridge.token.url is not a valid URL`));
    }
    if (url.protocol !== 'https:') return Promise.reject(new CloudTokenError(`bridge.token.url must be https:// (got ${url.protocol})`));
    const where = `${url.origin}${url.pathname}`;
    const headers: Record<string, string> = {
      'content-type': 'application/x-www-form-urlencoded',
      accept: 'application/json',
    };
    const body = new URLSearchParams(params);
    try {
      if (this.cfg.client_secret) {
        const secret = this.secret(this.cfg.client_secret, 'bridge.token.client_secret');
        // RFC 6749 §2.3.1: both parts form-urlencoded before Basic encoding
        const enc = (s: string) => encodeURIComponent(s).replace(/%20/g, '+');
        headers.authorization = 'Basic ' + Buffer.from(`${enc(this.cfg.client_id)}:${enc(secret)}`).toString('base64');
      } else {
        body.set('client_id', this.cfg.client_id);
      }
    } catch (err) {
      return Promise.reject(err);
    }
    let tlsOpts: CloudTlsOptions;
    try {
      tlsOpts = cloudTlsOptions(this.uplinkCfg, 'cloud token');
    } catch (err) {
      return Promise.reject(new CloudTokenError((err as Error).message, { cause: err }));
    }
    const payload = Buffer.from(body.toString());
    headers['content-length'] = String(payload.length);
    this.requests++;
    return new Promise<TokenResponse>((resolve, reject) => {
      const req = https.request(url, { method: 'POST', headers, ...tlsOpts, agent: false, timeout: this.requestTimeoutMs }, (res) => {
        const chunks: Buffer[] = [];
        let size = 0;
        res.on('data', (d: Buffer) => {
          size += d.length;
          if (size > MAX_BODY) {
            req.destroy(new CloudTokenError(`token endpoint ${where} sent a response larger than ${MAX_BODY} bytes`, { status: res.statusCode }));
            return;
          }
          chunks.push(d);
        });
        res.on('error', (err) => fail(err));
        res.on('end', () => {
          this.pending.delete(req);
          try {
            resolve(this.parse(res.statusCode ?? 0, res.headers, Buffer.concat(chunks).toString('utf8'), where));
          } catch (err) {
            reject(err);
          }
        });
      });
      this.pending.add(req);
      const fail = (err: Error): void => {
        this.pending.delete(req);
        if (err instanceof CloudTokenError) return reject(err);
        const code = (err as NodeJS.ErrnoException).code;
        reject(new CloudTokenError(`cannot reach token endpoint ${where}: ${code ?? ''} ${redactString(err.message)}`.replace(/\s+/g, ' ').trim(), { cause: err }));
      };
      req.on('timeout', () => req.destroy(new CloudTokenError(`token endpoint ${where} did not answer within ${this.requestTimeoutMs} ms`)));
      req.on('error', fail);
      req.end(payload);
    });
  }

  private parse(status: number, headers: Record<string, string | string[] | undefined>, text: string, where: string): TokenResponse {
    let json: Record<string, unknown> | undefined;
    try {
      const v: unknown = JSON.parse(text);
      if (v && typeof v === 'object' && !Array.isArray(v)) json = v as Record<string, unknown>;
    } catch {
      json = undefined;
    }
    if (status !== 200) {
      const oauthError = typeof json?.error === 'string' && OAUTH_ERROR_RE.test(json.error) ? json.error : undefined;
      const desc = typeof json?.error_description === 'string' ? redactString(json.error_description).slice(0, 200).replace(/[^\x20-\x7e]/g, '?') : '';
      const hint =
        oauthError === 'invalid_client' || status === 401
          ? ' (check bridge.token.client_id and the client secret)'
          : oauthError === 'invalid_grant' && this.cfg.grant === 'password'
            ? ' (check bridge.token.username and password)'
            : oauthError === 'invalid_scope'
              ? ' (check bridge.token.scope)'
              : status === 429 || status >= 500
                ? ' (the endpoint is overloaded or down)'
                : '';
      const err = new CloudTokenError(`token endpoint ${where} answered ${status}${oauthError ? ` ${oauthError}` : ''}${desc ? `: ${desc}` : ''}${hint}`, { status, oauthError });
      const ra = parseRetryAfter(headers['retry-after'], this.clock.now());
      if (ra !== undefined) (err as { retryAfterMs?: number }).retryAfterMs = ra;
      throw err;
    }
    if (!json) throw new CloudTokenError(`token endpoint ${where} answered 200 without a JSON object`, { status });
    const accessToken = json.access_token;
    if (typeof accessToken !== 'string' || accessToken.length === 0 || accessToken.length > 16384 || !/^[\x21-\x7e]+$/.test(accessToken)) {
      throw new CloudTokenError(`token endpoint ${where} answered without a usable access_token`, { status });
    }
    const type = json.token_type;
    if (type !== undefined && (typeof type !== 'string' || type.toLowerCase() !== 'bearer')) {
      throw new CloudTokenError(`token endpoint ${where} issued a token of type ${JSON.stringify(String(type)).slice(0, 40)}; only Bearer is supported`, { status });
    }
    const exp = json.expires_in;
    let lifetimeMs = this.defaultLifetimeMs;
    if (exp !== undefined) {
      const n = typeof exp === 'string' && /^\d+$/.test(exp) ? Number(exp) : exp;
      if (typeof n !== 'number' || !Number.isFinite(n) || n <= 0) throw new CloudTokenError(`token endpoint ${where} answered with an invalid expires_in`, { status });
      lifetimeMs = Math.min(n, 366 * 86400) * 1000;
    }
    const refresh = typeof json.refresh_token === 'string' && json.refresh_token.length > 0 && json.refresh_token.length <= 16384 ? json.refresh_token : undefined;
    return { accessToken, refreshToken: refresh, lifetimeMs };
  }
}
