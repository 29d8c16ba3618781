/**
 * The registration and upload HTTPS API (component 'api', default port 8443):
 * the server, its lifecycle, TLS material and CRL watching. The routes are in
 * api/routes.ts, the handlers in api/handlers.ts, the HTTP plumbing (security
 * headers, JSON answers, errors from core/errors.ts ERROR_HTTP) in api/http.ts.
 * docs/devices.md documents every route and answer.
 *
 * Every response, errors included, carries the security headers; every error
 * is JSON {error, code, message} without internals, and one log line names the
 * refused request and its code (never a token).
 */
import https from 'node:https';
import type http from 'node:http';
import type { TLSSocket, SecureContextOptions } from 'node:tls';
import type { Duplex } from 'node:stream';
import type { X509Certificate } from 'node:crypto';
import { watchFile, unwatchFile, type Stats } from 'node:fs';
import { readFile } from 'node:fs/promises';
import type { Logger } from '../core/logger.js';
import type { Component } from '../core/component.js';
import type { Config } from '../core/config/schema.js';
import { ConfigError, ConnectorError, errorCode } from '../core/errors.js';
import { RefusalLog, SourceBudget } from '../core/refusals.js';
import { listen, closeServer } from '../core/net.js';
import type { UplinkSink } from '../core/ports.js';
import { CrlStore } from '../identity/auth.js';
import { loadServerCredentials } from '../identity/server-cert.js';
import { HttpIo, MethodNotAllowedError, type RequestContext } from './http.js';
import { matchRoute } from './routes.js';
import { ApiHandlers, parseCerts, splitPem, type IdentityServices } from './handlers.js';
import { IdempotencyCache } from './idempotency.js';

/** Headers kept per request (server.maxHeadersCount); later ones are dropped. Real clients send about ten. */
const MAX_HEADERS = 64;

export { SECURITY_HEADERS, hostFromHeader, parseContentDigest } from './http.js';
export type { IdentityServices } from './handlers.js';

export interface ApiTimeouts {
  /** Time to receive the request headers (server.headersTimeout). */
  headersMs: number;
  /** Time for a whole request, body included (server.requestTimeout); long enough for a large upload. */
  requestMs: number;
  /** A connection with no traffic for this long is closed (server.timeout). */
  idleMs: number;
  /** Time to receive a JSON body. */
  jsonBodyMs: number;
  /** After an early refusal (413, 401 on an upload), how long the unread body is drained before the socket is closed. */
  lingerMs: number;
}

export const DEFAULT_TIMEOUTS: ApiTimeouts = { headersMs: 15_000, requestMs: 3_600_000, idleMs: 60_000, jsonBodyMs: 30_000, lingerMs: 2_000 };

/** Upload answers remembered by Idempotency-Key: at most this many, each for this long (docs/devices.md). */
export const IDEMPOTENCY_DEFAULTS = { maxEntries: 10_000, windowMs: 3_600_000 };

export interface ApiServerOptions {
  config: Config;
  identity: IdentityServices;
  logger: Logger;
  /** Bound ports of the other listeners (mqtt_tls, mqtt_wss), read at request time for the endpoints in a registration answer. */
  ports: ReadonlyMap<string, number>;
  /** Where HTTP uploads go (the journal), or a getter read per request; absent = uploads answer 503. */
  sink?: UplinkSink | (() => UplinkSink | undefined);
  /** Whether a device has a live MQTT session (the broker); absent or undefined = `connected: null`. */
  isConnected?: (deviceId: string) => boolean | undefined;
  /**
   * CRLs (broker.tls.crl_files) checked for device certificates: the broker's store when it is
   * shared (it also reloads on file change); otherwise the API loads its own at start, on
   * reload and whenever a CRL file changes (polled every crlPollMs).
   */
  crls?: () => CrlStore | undefined;
  /** How often the API's own CRL files are polled for changes (ms, default 2000). */
  crlPollMs?: number;
  now?: () => number;
  timeouts?: Partial<ApiTimeouts>;
  idempotency?: Partial<typeof IDEMPOTENCY_DEFAULTS>;
}

export class ApiServer implements Component {
  readonly name = 'api';
  boundPort = 0;
  private config: Config;
  private readonly identity: IdentityServices;
  private readonly log: Logger;
  private readonly now: () => number;
  private readonly timeouts: ApiTimeouts;
  private readonly sinkOpt: UplinkSink | (() => UplinkSink | undefined) | undefined;
  private readonly sharedCrls: (() => CrlStore | undefined) | undefined;
  private readonly ownCrls = new CrlStore();
  private readonly crlPollMs: number;
  private watchedCrls: string[] = [];
  private crlReload: Promise<void> = Promise.resolve();
  private server: https.Server | undefined;
  private starting: Promise<void> | undefined;
  private closing = false;
  /** CAs a device certificate may chain to (local device CA + broker.tls.trusted_ca_files). */
  private deviceCas: { certs: X509Certificate[]; fingerprints: Set<string> } = { certs: [], fingerprints: new Set() };
  /** fingerprint256 of the bootstrap CAs (api.bootstrap_ca_files). */
  private bootstrapFingerprints = new Set<string>();
  private readonly counters = { requests: 0, refused: 0, uploads: 0, uploadBytes: 0, registered: 0, publishedJson: 0, idempotentRepeats: 0, crlReloads: 0 };
  private readonly http: HttpIo;
  /** Refused requests: logged in full for the first few of an interval, then summarised (a flood is a few lines, not one per request). */
  private readonly refusals: RefusalLog;
  /** Per source address, charged by 401s: a source that spent it is turned away before its TLS handshake (api.refused_per_source_*). */
  private readonly budget: SourceBudget;
  /** Connections admitted whose first request has not come yet (that request was paid for on admission). */
  private readonly fresh = new WeakSet<object>();
  private readonly handlers: ApiHandlers;
  private readonly idempotency: IdempotencyCache;

  constructor(opts: ApiServerOptions) {
    this.config = opts.config;
    this.identity = opts.identity;
    this.log = opts.logger.child({ component: 'api' });
    this.now = opts.now ?? Date.now;
    this.timeouts = { ...DEFAULT_TIMEOUTS, ...opts.timeouts };
    this.sinkOpt = opts.sink;
    this.sharedCrls = opts.crls;
    this.crlPollMs = opts.crlPollMs ?? 2000;
    this.refusals = new RefusalLog({ log: this.log, msg: 'request refused', what: 'HTTP requests and connections' });
    this.budget = new SourceBudget(() => ({ perS: this.config.api.refused_per_source_per_s, burst: this.config.api.refused_per_source_burst }), this.now);
    this.http = new HttpIo(this.log, this.timeouts, this.counters, this.refusals, this.budget);
    this.idempotency = new IdempotencyCache({ ...IDEMPOTENCY_DEFAULTS, ...opts.idempotency, now: this.now });
    this.handlers = new ApiHandlers({
      config: () => this.config,
      identity: this.identity,
      log: this.log,
      http: this.http,
      ports: opts.ports,
      boundPort: () => this.boundPort,
      sink: () => this.sink(),
      isConnected: opts.isConnected,
      now: this.now,
      deviceCas: () => this.deviceCas,
      bootstrapFingerprints: () => this.bootstrapFingerprints,
      crls: () => this.crlStore(),
      idempotency: this.idempotency,
      counters: this.counters,
    });
  }

  private crlStore(): CrlStore {
    return this.sharedCrls?.() ?? this.ownCrls;
  }

  private sink(): UplinkSink | undefined {
    return typeof this.sinkOpt === 'function' ? this.sinkOpt() : this.sinkOpt;
  }

  // ---------------------------------------------------------------- lifecycle

  start(): Promise<void> {
    if (!this.config.api.enabled) return Promise.resolve();
    this.starting ??= this.doStart().catch((err: unknown) => {
      this.starting = undefined;
      throw err;
    });
    return this.starting;
  }

  private async doStart(): Promise<void> {
    const tlsOpts = await this.tlsOptions(this.config);
    const server = https.createServer({
      ...tlsOpts,
      requestCert: true,
      rejectUnauthorized: false,
      // the API answers quickly; keep-alive connections do not linger
      keepAliveTimeout: 5_000,
      // Node's own check answers a bare 400 (no code, no security headers, no log line); onRequest refuses a
      // missing Host itself. With maxHeadersCount a Host sent after the 64th header is dropped, so this happens.
      requireHostHeader: false,
    });
    server.headersTimeout = this.timeouts.headersMs;
    server.requestTimeout = this.timeouts.requestMs;
    server.timeout = this.timeouts.idleMs;
    server.maxHeadersCount = MAX_HEADERS;
    server.on('request', (req: http.IncomingMessage, res: http.ServerResponse) => void this.onRequest(req, res, false));
    server.on('checkContinue', (req: http.IncomingMessage, res: http.ServerResponse) => void this.onRequest(req, res, true));
    server.on('clientError', (err: NodeJS.ErrnoException, socket: Duplex) => this.http.onClientError(err, socket));
    // a source that spent its budget of refusals is turned away before the TLS handshake (the expensive part of a flood)
    server.on('connection', (s: Duplex & { remoteAddress?: string }) => {
      const source = s.remoteAddress ?? 'unknown';
      if (this.budget.admit(source)) return;
      this.counters.refused++;
      this.refusals.refused('ECONN_RATE_LIMITED', source, { remote: source, reason: 'too many refused requests from this address; connection closed before the TLS handshake' });
      s.destroy();
    });
    server.on('tlsClientError', (err: NodeJS.ErrnoException, s: TLSSocket) => {
      const source = s.remoteAddress ?? 'unknown';
      // a socket turned away at accept fails its handshake too: that refusal is already counted
      if (s.destroyed && this.budget.spent(source)) return;
      this.budget.refused(source);
      // one debug line per attempt (scanners make them all day); at info they show in the interval's summary line
      this.log.debug({ code: err.code, reason: err.message }, 'TLS handshake failed');
      this.refusals.count('ECONN_TLS_HANDSHAKE', source);
    });
    server.on('secureConnection', (s: TLSSocket) => {
      s.setNoDelay(true);
      this.fresh.add(s);
    });
    this.boundPort = await listen(server, this.config.api.host, this.config.api.port, 'api', 'api.port');
    this.server = server;
    this.closing = false;
    this.watchCrls();
    // a renewed server certificate or a rotated device CA takes effect for new connections
    this.identity.pki.on('server-cert', this.onPkiChange);
    this.identity.pki.on('ca-rotated', this.onPkiChange);
    this.log.info({ host: this.config.api.host, port: this.boundPort, bootstrapCas: this.bootstrapFingerprints.size }, 'HTTPS API listening');
  }

  async close(): Promise<void> {
    this.refusals.close();
    const starting = this.starting;
    this.starting = undefined;
    if (starting) await starting.catch(() => {});
    this.closing = true;
    this.unwatchCrls();
    this.identity.pki.off('server-cert', this.onPkiChange);
    this.identity.pki.off('ca-rotated', this.onPkiChange);
    const s = this.server;
    this.server = undefined;
    if (s) await closeServer(s, 2_000);
  }

  async reload(next: Config): Promise<string[]> {
    const changes: string[] = [];
    const prev = this.config.api;
    if (prev.max_body_bytes !== next.api.max_body_bytes) changes.push(`api.max_body_bytes ${prev.max_body_bytes} -> ${next.api.max_body_bytes}`);
    if (prev.max_upload_bytes !== next.api.max_upload_bytes) changes.push(`api.max_upload_bytes ${prev.max_upload_bytes} -> ${next.api.max_upload_bytes}`);
    const tlsOpts = await this.tlsOptions(next); // throws (keeping the old config) when a CA file is unreadable
    this.config = next;
    if (this.server) {
      this.watchCrls(); // crl_files may have changed
      this.server.setSecureContext(tlsOpts);
      changes.push('api TLS context reloaded (server certificate, device and bootstrap CAs)');
    }
    return changes;
  }

  private readonly onPkiChange = (): void => {
    this.refreshTls().then(
      () => this.log.info('TLS context reloaded after a PKI change'),
      (err: unknown) => this.log.error({ err }, 'TLS context could not be reloaded after a PKI change; the previous one stays in use'),
    );
  };

  /** Re-read the server certificate and CAs from the PKI (call after a server certificate renewal or CA rotation). */
  async refreshTls(): Promise<void> {
    const tlsOpts = await this.tlsOptions(this.config);
    this.server?.setSecureContext(tlsOpts);
  }

  status(): Record<string, unknown> {
    return {
      listening: Boolean(this.server),
      port: this.boundPort,
      uploadsEnabled: this.sink() !== undefined && this.config.bridge.enabled,
      idempotencyKeys: this.idempotency.size,
      ...this.counters,
    };
  }

  private async readCaFiles(files: readonly string[], key: string): Promise<string[]> {
    const out: string[] = [];
    const problems: string[] = [];
    for (const f of files) {
      try {
        const pems = splitPem(await readFile(f, 'utf8'));
        if (pems.length === 0) problems.push(`${key}: ${f} contains no PEM certificate`);
        parseCerts(pems, f);
        out.push(...pems);
      } catch (err) {
        const c = (err as NodeJS.ErrnoException).code;
        problems.push(`${key}: ${f} cannot be used (${c === 'ECONN_PKI' ? 'not a valid certificate' : (c ?? (err as Error).message)})`);
      }
    }
    if (problems.length) throw new ConfigError('ECONN_CONFIG_INVALID', problems);
    return out;
  }

  private async tlsOptions(config: Config): Promise<SecureContextOptions & { minVersion: 'TLSv1.2' | 'TLSv1.3' }> {
    const { cert, key } = await loadServerCredentials(config.broker.tls, this.identity.pki);
    const devicePems = [...this.identity.pki.trustedDeviceCaPems().flatMap(splitPem), ...(await this.readCaFiles(config.broker.tls.trusted_ca_files, 'broker.tls.trusted_ca_files'))];
    const bootstrapPems = await this.readCaFiles(config.api.bootstrap_ca_files, 'api.bootstrap_ca_files');
    if (!this.sharedCrls?.()) await this.ownCrls.load(config.broker.tls.crl_files);
    const deviceCas = parseCerts(devicePems, 'device CA');
    const bootstrapCas = parseCerts(bootstrapPems, 'bootstrap CA');
    this.deviceCas = { certs: deviceCas, fingerprints: new Set(deviceCas.map((c) => c.fingerprint256)) };
    this.bootstrapFingerprints = new Set(bootstrapCas.map((c) => c.fingerprint256));
    return {
      cert,
      key,
      ca: [...devicePems, ...bootstrapPems],
      minVersion: config.broker.tls.min_version === 'TLSv1.3' ? 'TLSv1.3' : 'TLSv1.2',
    };
  }

  // ---------------------------------------------------------------- CRL files (when not shared with the broker)

  /** Poll this API's own CRL files (broker.tls.crl_files) so a new CRL takes effect without SIGHUP, as in the broker. */
  private watchCrls(): void {
    this.unwatchCrls();
    if (this.sharedCrls?.()) return; // the broker's store reloads itself
    this.watchedCrls = [...this.config.broker.tls.crl_files];
    for (const f of this.watchedCrls) watchFile(f, { interval: this.crlPollMs, persistent: false }, this.onCrlFileChange);
  }

  private unwatchCrls(): void {
    for (const f of this.watchedCrls) unwatchFile(f, this.onCrlFileChange);
    this.watchedCrls = [];
  }

  private readonly onCrlFileChange = (cur: Stats, prev: Stats): void => {
    if (cur.mtimeMs === prev.mtimeMs && cur.size === prev.size && cur.ino === prev.ino) return;
    void this.reloadCrls();
  };

  /** Reload the API's own CRLs (serialised); on error the previous set stays in force. */
  reloadCrls(): Promise<void> {
    const run = this.crlReload.then(async () => {
      if (this.closing || this.sharedCrls?.()) return;
      try {
        const r = await this.ownCrls.load(this.config.broker.tls.crl_files);
        this.counters.crlReloads++;
        for (const f of r.stale) this.log.warn({ file: f }, 'CRL is past its nextUpdate; publish a fresh one');
        this.log.info({ why: 'file change', crls: r.crls, entries: r.entries }, 'API CRLs reloaded');
      } catch (err) {
        this.log.error({ err, code: errorCode(err) }, 'API CRL reload failed; the previous CRLs stay in force');
      }
    });
    this.crlReload = run.catch(() => {});
    return run;
  }

  // ---------------------------------------------------------------- dispatch

  private async onRequest(req: http.IncomingMessage, res: http.ServerResponse, expectContinue: boolean): Promise<void> {
    this.counters.requests++;
    let url: URL;
    try {
      url = new URL(req.url ?? '/', 'https://api.invalid');
    } catch {
      url = new URL('https://api.invalid/');
    }
    const ctx: RequestContext = { req, res, url, route: url.pathname.slice(0, 200), expectContinue, bodyStarted: false };
    res.on('error', () => {});
    // a later request on a keep-alive connection of a source that spent its budget: refused before any route
    // runs (the first request of a connection was paid for when the connection was admitted)
    if (!this.fresh.delete(req.socket) && this.budget.spent(req.socket.remoteAddress ?? 'unknown')) {
      this.http.refuse(ctx, new ConnectorError('ECONN_RATE_LIMITED', 'too many refused requests from this address; retry later'));
      return;
    }
    try {
      // RFC 9112 §3.2: an HTTP/1.1 request without Host is a 400 (headers past maxHeadersCount are dropped, Host too)
      if (req.httpVersion === '1.1' && !req.headers.host) {
        throw new ConnectorError('ECONN_BAD_REQUEST', `an HTTP/1.1 request needs a Host header among its first ${MAX_HEADERS} headers`);
      }
      const m = matchRoute(req.method ?? '', url.pathname);
      ctx.route = m.route.template;
      if (m.deviceId !== undefined) ctx.deviceId = m.deviceId;
      await this.handlers.run(m.route.handler, ctx);
    } catch (err) {
      if (err instanceof MethodNotAllowedError) ctx.route = err.route;
      this.http.refuse(ctx, err);
    }
  }
}
