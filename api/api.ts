/**
 * The registration and upload HTTPS API (component 'api', default port 8443).
 *
 *   POST /api/register                 enrollment token (Bearer) or bootstrap-CA client cert -> 201 device + token (+ cert)
 *   POST /api/token/renew              current token (Bearer, up to renew_grace_s after expiry) -> 200 new token
 *   POST /api/deregister/{device_id}   the device itself (token or device cert) -> 200 revoked
 *   GET  /api/devices/{device_id}/status  the device itself -> 200 status
 *   POST /api/publish/{device_id}      the device itself; body streamed to the journal -> 202 {message_id} once durable
 *
 * Every response, errors included, carries the security headers below; every
 * error is JSON {error, code, message} without internals, and one log line
 * names the refused request and its code (never a token).
 */
import https from 'node:https';
import type http from 'node:http';
import type { TLSSocket, DetailedPeerCertificate, SecureContextOptions } from 'node:tls';
import type { Duplex } from 'node:stream';
import { X509Certificate } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import type { Logger } from '../core/logger.js';
import { redactString } from '../core/logger.js';
import type { Component } from '../core/component.js';
import type { Config } from '../core/config/schema.js';
import { ConfigError, ConnectorError, RequestError, errorCode, type ErrorCode } from '../core/errors.js';
import { listen, closeServer } from '../core/net.js';
import type { UplinkSink, UplinkMessageMeta } from '../core/ports.js';
import { x509 } from '../core/x509.js';
import { DEVICE_ID_RE, normalizeSerial, type DeviceRegistry, type DeviceMetadata } from '../identity/registry.js';
import { CrlStore, certDeviceId, certIssuer } from '../identity/auth.js';
import type { LocalPki } from '../identity/pki.js';
import type { TokenService } from '../identity/tokens.js';
import type { EnrollmentStore } from '../identity/enrollment.js';
import { validateRegisterBody, validateEmptyBody, type RegisterBody } from './schemas.js';
import { loadServerCredentials } from '../identity/server-cert.js';

export const SECURITY_HEADERS: Readonly<Record<string, string>> = Object.freeze({
  'strict-transport-security': 'max-age=31536000; includeSubDomains',
  'x-content-type-options': 'nosniff',
  'x-frame-options': 'DENY',
  'content-security-policy': "default-src 'none'; frame-ancestors 'none'",
  'referrer-policy': 'no-referrer',
  'cache-control': 'no-store',
});

export interface IdentityServices {
  registry: DeviceRegistry;
  pki: LocalPki;
  tokens: TokenService;
  enrollment: EnrollmentStore;
}

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
   * shared (it also reloads on file change); otherwise the API loads its own at start and on reload.
   */
  crls?: () => CrlStore | undefined;
  now?: () => number;
  timeouts?: Partial<ApiTimeouts>;
}

type Method = 'GET' | 'POST';

interface RouteMatch {
  route: string;
  allow: Method[];
  deviceId?: string;
  handler: (ctx: RequestContext) => Promise<void>;
}

interface RequestContext {
  req: http.IncomingMessage;
  res: http.ServerResponse;
  url: URL;
  route: string;
  deviceId?: string;
  /** The client sent `Expect: 100-continue`; 100 is sent only once the request passed its checks. */
  expectContinue: boolean;
  /** Set once the body is being (or was) consumed. */
  bodyStarted: boolean;
  /** The authenticated device, for the log line. */
  actor?: string;
}

interface DeviceAuth {
  deviceId: string;
  via: 'token' | 'cert';
}

type RegistrationAuth = { via: 'enrollment'; token: string } | { via: 'bootstrap'; subject: string };

const REASONS: Record<number, string> = {
  400: 'bad_request',
  401: 'unauthorized',
  403: 'forbidden',
  404: 'not_found',
  405: 'method_not_allowed',
  408: 'request_timeout',
  409: 'conflict',
  413: 'payload_too_large',
  415: 'unsupported_media_type',
  431: 'request_header_fields_too_large',
  500: 'internal_error',
  503: 'service_unavailable',
};

/** HTTP status for an error code raised by a component the API calls. */
function statusOf(code: string | undefined): number {
  switch (code) {
    case 'ECONN_AUTH_FAILED':
    case 'ECONN_AUTH_TOKEN':
    case 'ECONN_AUTH_CERT':
    case 'ECONN_DEVICE_UNKNOWN':
    case 'ECONN_DEVICE_REVOKED':
    case 'ECONN_ENROLL_TOKEN':
      return 401;
    case 'ECONN_NOT_AUTHORIZED':
      return 403;
    case 'ECONN_NOT_FOUND':
      return 404;
    case 'ECONN_DEVICE_EXISTS':
      return 409;
    case 'ECONN_BAD_REQUEST':
    case 'ECONN_PKI':
    case 'ECONN_DIGEST_MISMATCH':
      return 400;
    case 'ECONN_PAYLOAD_TOO_LARGE':
      return 413;
    case 'ECONN_JOURNAL_FULL':
    case 'ECONN_CLOSED':
    case 'ECONN_UNAVAILABLE':
    case 'ECONN_JOURNAL_IO':
      return 503;
    default:
      return 500;
  }
}

/** Codes whose messages are written for clients; anything else is answered with a generic text. */
const CLIENT_MESSAGE_CODES = new Set([
  'ECONN_AUTH_FAILED',
  'ECONN_AUTH_TOKEN',
  'ECONN_AUTH_CERT',
  'ECONN_DEVICE_UNKNOWN',
  'ECONN_DEVICE_REVOKED',
  'ECONN_ENROLL_TOKEN',
  'ECONN_NOT_AUTHORIZED',
  'ECONN_NOT_FOUND',
  'ECONN_DEVICE_EXISTS',
  'ECONN_BAD_REQUEST',
  'ECONN_PKI',
  'ECONN_DIGEST_MISMATCH',
  'ECONN_PAYLOAD_TOO_LARGE',
  'ECONN_JOURNAL_FULL',
  'ECONN_UNAVAILABLE',
  'ECONN_METHOD_NOT_ALLOWED',
  'ECONN_UNSUPPORTED_MEDIA_TYPE',
  'ECONN_REQUEST_TIMEOUT',
]);

const GENERIC_MESSAGES: Record<number, string> = {
  500: 'internal error; the gateway log has the details',
  503: 'the service is not available right now; retry later',
};

function clientMessage(err: unknown, status: number): string {
  const code = errorCode(err);
  if (err instanceof ConnectorError && code && CLIENT_MESSAGE_CODES.has(code)) {
    const m = redactString(err.message);
    return m.length > 400 ? `${m.slice(0, 400)}…` : m;
  }
  return GENERIC_MESSAGES[status] ?? 'request refused';
}

function splitPem(text: string): string[] {
  return [...text.matchAll(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g)].map((m) => m[0] + '\n');
}

function parseCerts(pems: string[], what: string): X509Certificate[] {
  const out: X509Certificate[] = [];
  for (const p of pems) {
    try {
      out.push(new X509Certificate(p));
    } catch (err) {
      throw new ConnectorError('ECONN_PKI', `${what}: a certificate cannot be parsed`, { cause: err });
    }
  }
  return out;
}

/** Host part of a Host header (bracketed IPv6, IPv4 or DNS name); undefined when it is not one. */
export function hostFromHeader(h: string | undefined): string | undefined {
  if (!h) return undefined;
  const m = /^(\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}))(?::\d{1,5})?$/.exec(h.trim());
  return m?.[1];
}

/**
 * The sha-256 digest of an RFC 9530 `Content-Digest` header (a structured
 * dictionary, e.g. `sha-256=:BASE64:, sha-512=:…:`). Undefined when the header
 * is absent or names no sha-256; throws ECONN_BAD_REQUEST when it is malformed.
 */
export function parseContentDigest(header: string | undefined): Buffer | undefined {
  if (header === undefined) return undefined;
  let found: Buffer | undefined;
  for (const member of header.split(',')) {
    const m = /^\s*([a-z][a-z0-9_.*-]*)\s*=\s*:([A-Za-z0-9+/]*={0,2}):\s*(;.*)?$/.exec(member);
    if (!m) throw new RequestError(400, 'ECONN_BAD_REQUEST', 'Content-Digest must be a list of ALG=:BASE64: (RFC 9530), e.g. sha-256=:…:');
    if (m[1] !== 'sha-256') continue;
    const digest = Buffer.from(m[2]!, 'base64');
    if (digest.length !== 32) throw new RequestError(400, 'ECONN_BAD_REQUEST', 'Content-Digest sha-256 must be the 32-byte digest in base64');
    found = digest;
  }
  return found;
}

/** Whether a Content-Type names JSON (application/json or application/*+json, any parameters). */
function isJsonType(ct: string | undefined): boolean {
  if (!ct) return false;
  const type = ct.split(';')[0]!.trim().toLowerCase();
  return type === 'application/json' || /^application\/[a-z0-9.+-]+\+json$/.test(type);
}

function hasBody(req: http.IncomingMessage): boolean {
  const len = req.headers['content-length'];
  if (req.headers['transfer-encoding'] !== undefined) return true;
  return len !== undefined && len !== '0';
}

export class ApiServer implements Component {
  readonly name = 'api';
  boundPort = 0;
  private config: Config;
  private readonly identity: IdentityServices;
  private readonly log: Logger;
  private readonly ports: ReadonlyMap<string, number>;
  private readonly sinkOpt: UplinkSink | (() => UplinkSink | undefined) | undefined;
  private readonly isConnected: ((id: string) => boolean | undefined) | undefined;
  private readonly now: () => number;
  private readonly timeouts: ApiTimeouts;
  private readonly sharedCrls: (() => CrlStore | undefined) | undefined;
  private readonly ownCrls = new CrlStore();
  private server: https.Server | undefined;
  private starting: Promise<void> | undefined;
  /** fingerprint256 of the CAs a device certificate may chain to (local device CA + broker.tls.trusted_ca_files). */
  private deviceCaFingerprints = new Set<string>();
  private deviceCas: X509Certificate[] = [];
  /** fingerprint256 of the bootstrap CAs (api.bootstrap_ca_files). */
  private bootstrapFingerprints = new Set<string>();
  private readonly counters = { requests: 0, refused: 0, uploads: 0, uploadBytes: 0, registered: 0 };

  constructor(opts: ApiServerOptions) {
    this.config = opts.config;
    this.identity = opts.identity;
    this.log = opts.logger.child({ component: 'api' });
    this.ports = opts.ports;
    this.sinkOpt = opts.sink;
    this.isConnected = opts.isConnected;
    this.now = opts.now ?? Date.now;
    this.timeouts = { ...DEFAULT_TIMEOUTS, ...opts.timeouts };
    this.sharedCrls = opts.crls;
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
    });
    server.headersTimeout = this.timeouts.headersMs;
    server.requestTimeout = this.timeouts.requestMs;
    server.timeout = this.timeouts.idleMs;
    server.maxHeadersCount = 64;
    server.on('request', (req: http.IncomingMessage, res: http.ServerResponse) => void this.onRequest(req, res, false));
    server.on('checkContinue', (req: http.IncomingMessage, res: http.ServerResponse) => void this.onRequest(req, res, true));
    server.on('clientError', (err: NodeJS.ErrnoException, socket: Duplex) => this.onClientError(err, socket));
    server.on('tlsClientError', (err: NodeJS.ErrnoException) => this.log.debug({ code: err.code, reason: err.message }, 'TLS handshake failed'));
    server.on('secureConnection', (s: TLSSocket) => s.setNoDelay(true));
    this.boundPort = await listen(server, this.config.api.host, this.config.api.port, 'api', 'api.port');
    this.server = server;
    // a renewed server certificate or a rotated device CA takes effect for new connections
    this.identity.pki.on('server-cert', this.onPkiChange);
    this.identity.pki.on('ca-rotated', this.onPkiChange);
    this.log.info({ host: this.config.api.host, port: this.boundPort, bootstrapCas: this.bootstrapFingerprints.size }, 'HTTPS API listening');
  }

  async close(): Promise<void> {
    const starting = this.starting;
    this.starting = undefined;
    if (starting) await starting.catch(() => {});
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
    return { listening: Boolean(this.server), port: this.boundPort, uploadsEnabled: this.sink() !== undefined && this.config.bridge.enabled, ...this.counters };
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
    this.deviceCas = deviceCas;
    this.deviceCaFingerprints = new Set(deviceCas.map((c) => c.fingerprint256));
    this.bootstrapFingerprints = new Set(bootstrapCas.map((c) => c.fingerprint256));
    return {
      cert,
      key,
      ca: [...devicePems, ...bootstrapPems],
      minVersion: config.broker.tls.min_version === 'TLSv1.3' ? 'TLSv1.3' : 'TLSv1.2',
    };
  }

  // ---------------------------------------------------------------- plumbing

  private setSecurityHeaders(res: http.ServerResponse): void {
    for (const [k, v] of Object.entries(SECURITY_HEADERS)) res.setHeader(k, v);
  }

  private sendJson(res: http.ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
    if (res.headersSent || res.destroyed) return;
    const text = JSON.stringify(body);
    this.setSecurityHeaders(res);
    res.writeHead(status, { ...headers, 'content-type': 'application/json; charset=utf-8', 'content-length': Buffer.byteLength(text) });
    res.end(text);
  }

  private refuse(ctx: RequestContext, err: unknown): void {
    const code = (errorCode(err) ?? 'ECONN_INTERNAL') as ErrorCode;
    const status = err instanceof RequestError ? err.status : statusOf(code);
    const publicCode: string = status === 500 ? 'ECONN_INTERNAL' : code;
    const message = clientMessage(err, status);
    this.counters.refused++;
    const fields = {
      code: publicCode,
      status,
      method: ctx.req.method,
      route: ctx.route,
      remote: ctx.req.socket.remoteAddress,
      ...(ctx.actor ? { deviceId: ctx.actor } : {}),
    };
    if (status >= 500) this.log.error({ ...fields, err }, 'request failed');
    else this.log.warn({ ...fields, reason: message }, 'request refused');

    const headers: Record<string, string> = {};
    if (status === 401) {
      headers['www-authenticate'] = code === 'ECONN_AUTH_TOKEN' || code === 'ECONN_DEVICE_REVOKED' || code === 'ECONN_DEVICE_UNKNOWN'
        ? 'Bearer realm="edge-connector", error="invalid_token"'
        : 'Bearer realm="edge-connector"';
    }
    if (status === 405) {
      const allow = (err as { allow?: string[] }).allow;
      if (allow) headers.allow = allow.join(', ');
    }
    if (status === 503) headers['retry-after'] = '5';
    // a body the client is still sending is not read: close the connection after the answer
    const unread = !ctx.req.complete && (hasBody(ctx.req) || ctx.bodyStarted);
    if (unread) headers.connection = 'close';
    this.sendJson(ctx.res, status, { error: REASONS[status] ?? 'error', code: publicCode, message }, headers);
    if (unread) this.linger(ctx);
  }

  /** After an early answer: drain what the client still sends for a short while, then close (so it sees the answer, not a reset). */
  private linger(ctx: RequestContext): void {
    const { req, res } = ctx;
    const sock = req.socket;
    const finish = (): void => {
      req.resume();
      const timer = setTimeout(() => sock.destroy(), this.timeouts.lingerMs);
      timer.unref();
      sock.once('close', () => clearTimeout(timer));
    };
    if (res.writableFinished) finish();
    else res.once('finish', finish);
  }

  private onClientError(err: NodeJS.ErrnoException, socket: Duplex): void {
    if (err.code === 'ECONNRESET' || !socket.writable) {
      socket.destroy();
      return;
    }
    const status = err.code === 'HPE_HEADER_OVERFLOW' ? 431 : err.code === 'ERR_HTTP_REQUEST_TIMEOUT' ? 408 : 400;
    const code = status === 408 ? 'ECONN_REQUEST_TIMEOUT' : 'ECONN_BAD_REQUEST';
    const message = status === 408 ? 'the request was not received in time' : status === 431 ? 'request headers are too large' : 'malformed HTTP request';
    this.counters.refused++;
    this.log.warn({ code, status, reason: err.code }, 'request refused');
    const body = JSON.stringify({ error: REASONS[status], code, message });
    const head = [
      `HTTP/1.1 ${status} ${status === 408 ? 'Request Timeout' : status === 431 ? 'Request Header Fields Too Large' : 'Bad Request'}`,
      'content-type: application/json; charset=utf-8',
      `content-length: ${Buffer.byteLength(body)}`,
      'connection: close',
      ...Object.entries(SECURITY_HEADERS).map(([k, v]) => `${k}: ${v}`),
    ].join('\r\n');
    socket.end(`${head}\r\n\r\n${body}`);
  }

  private match(method: string, pathname: string): RouteMatch | undefined {
    const seg = pathname.split('/');
    // ['', 'api', ...]
    if (seg[0] !== '' || seg[1] !== 'api') return undefined;
    const id = (i: number): string | undefined => {
      try {
        return decodeURIComponent(seg[i]!);
      } catch {
        return undefined;
      }
    };
    const post = (route: string, handler: (ctx: RequestContext) => Promise<void>, deviceId?: string): RouteMatch => ({ route, allow: ['POST'], handler, deviceId });
    if (seg.length === 3 && seg[2] === 'register') return post('/api/register', (c) => this.register(c));
    if (seg.length === 4 && seg[2] === 'token' && seg[3] === 'renew') return post('/api/token/renew', (c) => this.renew(c));
    if (seg.length === 4 && seg[2] === 'deregister' && seg[3]) return post('/api/deregister/{device_id}', (c) => this.deregister(c), id(3));
    if (seg.length === 4 && seg[2] === 'publish' && seg[3]) return post('/api/publish/{device_id}', (c) => this.publish(c), id(3));
    if (seg.length === 5 && seg[2] === 'devices' && seg[3] && seg[4] === 'status') {
      return { route: '/api/devices/{device_id}/status', allow: ['GET'], handler: (c) => this.deviceStatus(c), deviceId: id(3) };
    }
    void method;
    return undefined;
  }

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
    try {
      const m = this.match(req.method ?? '', url.pathname);
      if (!m) throw new RequestError(404, 'ECONN_NOT_FOUND', `no such endpoint: ${req.method ?? ''} ${url.pathname.slice(0, 200)} (see docs/devices.md)`);
      ctx.route = m.route;
      if (!m.allow.includes(req.method as Method)) {
        const e = new RequestError(405, 'ECONN_METHOD_NOT_ALLOWED', `${m.route} accepts ${m.allow.join(', ')} only`);
        throw Object.assign(e, { allow: m.allow });
      }
      if (m.route.includes('{device_id}')) {
        if (m.deviceId === undefined || !DEVICE_ID_RE.test(m.deviceId)) {
          throw new RequestError(400, 'ECONN_BAD_REQUEST', 'the device id in the path must be 1-128 characters of A-Z a-z 0-9 . _ - starting with a letter or digit');
        }
        ctx.deviceId = m.deviceId;
      }
      await m.handler(ctx);
    } catch (err) {
      this.refuse(ctx, err);
    }
  }

  private continueIfAsked(ctx: RequestContext): void {
    if (ctx.expectContinue && !ctx.bodyStarted && !ctx.res.headersSent) ctx.res.writeContinue();
    ctx.bodyStarted = true;
  }

  /** Read and parse a JSON body (size-limited, time-limited). Empty bodies give `undefined` when allowed. */
  private async readJson(ctx: RequestContext, required: boolean): Promise<unknown> {
    const { req } = ctx;
    const limit = this.config.api.max_body_bytes;
    if (!hasBody(req)) {
      if (required) throw new RequestError(400, 'ECONN_BAD_REQUEST', 'a JSON body is required (Content-Type: application/json)');
      return undefined;
    }
    if (!isJsonType(req.headers['content-type'])) {
      throw new RequestError(415, 'ECONN_UNSUPPORTED_MEDIA_TYPE', 'the body must be JSON: send Content-Type: application/json');
    }
    const declared = Number(req.headers['content-length'] ?? NaN);
    if (Number.isFinite(declared) && declared > limit) {
      throw new RequestError(413, 'ECONN_PAYLOAD_TOO_LARGE', `the JSON body is larger than ${limit} bytes (api.max_body_bytes)`);
    }
    this.continueIfAsked(ctx);
    const chunks: Buffer[] = [];
    let size = 0;
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        cleanup();
        reject(new RequestError(408, 'ECONN_REQUEST_TIMEOUT', `the body was not received within ${Math.round(this.timeouts.jsonBodyMs / 1000)} s`));
      }, this.timeouts.jsonBodyMs);
      const onData = (c: Buffer): void => {
        size += c.length;
        if (size > limit) {
          cleanup();
          req.pause();
          reject(new RequestError(413, 'ECONN_PAYLOAD_TOO_LARGE', `the JSON body is larger than ${limit} bytes (api.max_body_bytes)`));
          return;
        }
        chunks.push(c);
      };
      const onEnd = (): void => {
        cleanup();
        resolve();
      };
      const onError = (e: Error): void => {
        cleanup();
        reject(e);
      };
      const cleanup = (): void => {
        clearTimeout(timer);
        req.off('data', onData);
        req.off('end', onEnd);
        req.off('error', onError);
      };
      req.on('data', onData);
      req.on('end', onEnd);
      req.on('error', onError);
    });
    if (size === 0) {
      if (required) throw new RequestError(400, 'ECONN_BAD_REQUEST', 'a JSON body is required');
      return undefined;
    }
    const text = Buffer.concat(chunks).toString('utf8');
    try {
      return JSON.parse(text) as unknown;
    } catch {
      throw new RequestError(400, 'ECONN_BAD_REQUEST', 'the body is not valid JSON');
    }
  }

  private bearer(req: http.IncomingMessage): string | undefined {
    const h = req.headers.authorization;
    if (h === undefined) return undefined;
    const m = /^Bearer[ \t]+([A-Za-z0-9\-._~+/]+=*)[ \t]*$/i.exec(h);
    if (!m) throw new RequestError(401, 'ECONN_AUTH_FAILED', 'the Authorization header must be "Bearer TOKEN"');
    return m[1];
  }

  /** The verified TLS client certificate chain (fingerprints, leaf first), or undefined when none or not trusted. */
  private peerChain(req: http.IncomingMessage): { leaf: DetailedPeerCertificate; fingerprints: string[] } | undefined {
    const sock = req.socket as TLSSocket;
    if (typeof sock.getPeerCertificate !== 'function' || !sock.authorized) return undefined;
    const leaf = sock.getPeerCertificate(true);
    if (!leaf || !leaf.raw) return undefined;
    const fingerprints: string[] = [];
    let c: DetailedPeerCertificate | undefined = leaf;
    for (let i = 0; c && c.raw && i < 10; i++) {
      fingerprints.push(c.fingerprint256);
      if (c.issuerCertificate === c || c.issuerCertificate?.fingerprint256 === c.fingerprint256) break;
      c = c.issuerCertificate;
    }
    return { leaf, fingerprints };
  }

  /** Authenticate a device by its token (Bearer) or its client certificate. */
  private async authenticateDevice(ctx: RequestContext): Promise<DeviceAuth> {
    const token = this.bearer(ctx.req);
    if (token !== undefined) {
      const claims = await this.identity.tokens.verify(token);
      ctx.actor = claims.deviceId;
      return { deviceId: claims.deviceId, via: 'token' };
    }
    const chain = this.peerChain(ctx.req);
    if (chain) {
      // the leaf itself is not a CA: a chain through a device CA has the CA after the leaf
      const viaDeviceCa = chain.fingerprints.slice(1).some((f) => this.deviceCaFingerprints.has(f));
      if (viaDeviceCa) {
        const x = (ctx.req.socket as TLSSocket).getPeerX509Certificate();
        if (!x) throw new RequestError(401, 'ECONN_AUTH_CERT', 'the client certificate cannot be read');
        const ident = certDeviceId(x, this.config.broker.tls);
        if ('error' in ident) throw new RequestError(401, 'ECONN_AUTH_CERT', ident.error);
        const id = ident.id;
        const serial = normalizeSerial(x.serialNumber);
        if (this.identity.registry.isSerialRevoked(serial)) throw new RequestError(401, 'ECONN_AUTH_CERT', 'the client certificate is revoked');
        const crls = this.crlStore();
        if (crls.size > 0 && crls.isRevoked(certIssuer(x.raw), serial)) {
          throw new RequestError(401, 'ECONN_AUTH_CERT', 'the client certificate is revoked by a CRL (broker.tls.crl_files)');
        }
        const owner = this.identity.registry.deviceForSerial(serial);
        if (owner !== undefined && owner !== id) throw new RequestError(401, 'ECONN_AUTH_CERT', 'the client certificate was issued to another device');
        const rec = this.identity.registry.get(id);
        if (!rec) throw new RequestError(401, 'ECONN_DEVICE_UNKNOWN', `device "${id}" is not registered`);
        if (rec.status !== 'active') throw new RequestError(401, 'ECONN_DEVICE_REVOKED', `device "${id}" is revoked`);
        ctx.actor = id;
        return { deviceId: id, via: 'cert' };
      }
    }
    throw new RequestError(401, 'ECONN_AUTH_FAILED', 'authenticate with the device token (Authorization: Bearer TOKEN) or the device certificate');
  }

  private requireSelf(ctx: RequestContext, auth: DeviceAuth): string {
    const id = ctx.deviceId!;
    if (auth.deviceId !== id) throw new RequestError(403, 'ECONN_NOT_AUTHORIZED', 'a device may act only on itself');
    return id;
  }

  private endpoints(req: http.IncomingMessage): Record<string, string> {
    const names = this.config.identity.pki.server_names;
    let host = hostFromHeader(req.headers.host);
    if (!host) {
      const first = names[0] ?? 'localhost';
      host = first.includes(':') ? `[${first}]` : first;
    }
    const listeners = this.config.broker.listeners;
    const out: Record<string, string> = {};
    const tlsPort = this.ports.get('mqtt_tls') ?? (listeners.tls.port || undefined);
    if (listeners.tls.enabled && tlsPort) out.mqtts = `mqtts://${host}:${tlsPort}`;
    const wssPort = this.ports.get('mqtt_wss') ?? (listeners.wss.port || undefined);
    if (listeners.wss.enabled && wssPort) out.wss = `wss://${host}:${wssPort}${listeners.wss.path}`;
    out.api = `https://${host}:${this.boundPort || this.ports.get('api') || this.config.api.port}`;
    return out;
  }

  // ---------------------------------------------------------------- handlers

  private registrationAuth(ctx: RequestContext): RegistrationAuth {
    const token = this.bearer(ctx.req);
    if (token !== undefined) return { via: 'enrollment', token };
    const chain = this.peerChain(ctx.req);
    if (chain && chain.fingerprints.some((f) => this.bootstrapFingerprints.has(f))) {
      const cn = Array.isArray(chain.leaf.subject?.CN) ? chain.leaf.subject.CN.join('+') : (chain.leaf.subject?.CN ?? '');
      return { via: 'bootstrap', subject: cn };
    }
    throw new RequestError(
      401,
      'ECONN_ENROLL_TOKEN',
      'registration needs an enrollment token (Authorization: Bearer TOKEN, from `connector enroll create`) or a client certificate from a bootstrap CA',
    );
  }

  /** Check a device-held certificate (PEM, leaf first, optional intermediates) before anything is consumed. */
  private checkDeviceCertificate(pem: string, deviceId: string): X509Certificate {
    const pems = splitPem(pem);
    if (pems.length === 0) throw new RequestError(400, 'ECONN_PKI', 'certificate must be a PEM certificate (-----BEGIN CERTIFICATE-----)');
    if (pems.length > 5) throw new RequestError(400, 'ECONN_PKI', 'certificate may hold at most 5 certificates (leaf and intermediates)');
    const chain = parseCerts(pems, 'certificate');
    const leaf = chain[0]!;
    const now = this.now();
    if (leaf.ca) throw new RequestError(400, 'ECONN_PKI', 'certificate is a CA certificate, not a device certificate');
    if (Date.parse(leaf.validFrom) > now || Date.parse(leaf.validTo) < now) throw new RequestError(400, 'ECONN_PKI', 'certificate is expired or not yet valid');
    const ident = certDeviceId(leaf, this.config.broker.tls);
    if (!('id' in ident) || ident.id !== deviceId) {
      throw new RequestError(
        400,
        'ECONN_PKI',
        `certificate must name the device (${this.config.broker.tls.identity_from === 'cn' ? 'subject CN' : `SAN URI ${this.config.broker.tls.san_uri_prefix}ID`} equal to device_id)`,
      );
    }
    let current = leaf;
    const intermediates = chain.slice(1);
    for (let depth = 0; depth < 6; depth++) {
      if (this.deviceCas.some((ca) => current.checkIssued(ca) && current.verify(ca.publicKey))) {
        const serial = normalizeSerial(leaf.serialNumber);
        if (this.identity.registry.isSerialRevoked(serial)) throw new RequestError(400, 'ECONN_PKI', 'certificate is revoked');
        const owner = this.identity.registry.deviceForSerial(serial);
        if (owner !== undefined && owner !== deviceId) throw new RequestError(409, 'ECONN_DEVICE_EXISTS', 'this certificate is already recorded for another device');
        return leaf;
      }
      const next = intermediates.find((i) => i.ca && current.checkIssued(i) && current.verify(i.publicKey) && Date.parse(i.validTo) >= now);
      if (!next) break;
      current = next;
    }
    throw new RequestError(400, 'ECONN_PKI', 'certificate does not chain to a CA this gateway trusts for devices');
  }

  /** Parse and verify a CSR before anything is consumed (the PKI checks again when it signs). */
  private async checkCsr(pem: string, deviceId: string): Promise<void> {
    if (!/-----BEGIN (NEW )?CERTIFICATE REQUEST-----/.test(pem)) {
      throw new RequestError(400, 'ECONN_PKI', 'csr must be a PEM PKCS#10 request (-----BEGIN CERTIFICATE REQUEST-----)');
    }
    let csr: x509.Pkcs10CertificateRequest;
    try {
      csr = new x509.Pkcs10CertificateRequest(pem);
    } catch (err) {
      throw new RequestError(400, 'ECONN_PKI', 'csr cannot be parsed as PKCS#10', { cause: err });
    }
    const alg = csr.publicKey.algorithm as Algorithm & { namedCurve?: string; modulusLength?: number };
    const isEc = alg.name === 'ECDSA' && (alg.namedCurve === 'P-256' || alg.namedCurve === 'P-384');
    const isRsa = alg.name.startsWith('RSA') && (alg.modulusLength ?? 0) >= 2048;
    if (!isEc && !isRsa) throw new RequestError(400, 'ECONN_PKI', 'csr key must be EC P-256/P-384 or RSA of at least 2048 bits');
    let ok: boolean;
    try {
      ok = await csr.verify();
    } catch (err) {
      throw new RequestError(400, 'ECONN_PKI', 'csr signature cannot be verified (unsupported signature algorithm?)', { cause: err });
    }
    if (!ok) throw new RequestError(400, 'ECONN_PKI', 'csr signature does not verify (it must be signed by the key it carries)');
    const cns = csr.subjectName.getField('CN');
    if (cns.length > 0 && !cns.includes(deviceId)) throw new RequestError(400, 'ECONN_PKI', 'csr subject CN must be the device_id (or absent)');
  }

  private async register(ctx: RequestContext): Promise<void> {
    const auth = this.registrationAuth(ctx);
    const raw = await this.readJson(ctx, true);
    const v = validateRegisterBody(raw);
    if (!v.ok) {
      const msg = v.field === 'metadata.group' ? 'metadata.group can be set only by an operator (connector device add --group)' : v.message;
      throw new RequestError(400, 'ECONN_BAD_REQUEST', msg);
    }
    const body: RegisterBody = v.value;
    const id = body.device_id;
    ctx.actor = id;
    if (body.csr !== undefined && body.certificate !== undefined) {
      throw new RequestError(400, 'ECONN_BAD_REQUEST', 'send either csr or certificate, not both');
    }
    // everything that can be checked without side effects first: a refused request does not use up the enrollment token
    let held: X509Certificate | undefined;
    if (body.csr !== undefined) await this.checkCsr(body.csr, id);
    if (body.certificate !== undefined) held = this.checkDeviceCertificate(body.certificate, id);
    if (auth.via === 'enrollment') await this.identity.enrollment.consume(auth.token);
    const metadata: DeviceMetadata = { ...(body.metadata ?? {}) };
    await this.identity.registry.create(id, metadata);
    let certificate: string | undefined;
    try {
      if (body.csr !== undefined) {
        const issued = await this.identity.pki.signCsr(body.csr, id);
        certificate = issued.cert;
        await this.identity.registry.addCertificate(id, { serial: issued.serial, fingerprint256: issued.fingerprint256, not_after: issued.notAfter.toISOString() });
      } else if (held) {
        await this.identity.registry.addCertificate(id, {
          serial: normalizeSerial(held.serialNumber),
          fingerprint256: held.fingerprint256,
          not_after: new Date(held.validTo).toISOString(),
        });
      }
    } catch (err) {
      // do not leave a half-registered device behind
      await this.identity.registry.revoke(id).catch(() => {});
      throw err;
    }
    const issued = await this.identity.tokens.issue(id);
    this.counters.registered++;
    this.log.info({ deviceId: id, via: auth.via, ...(auth.via === 'bootstrap' ? { bootstrapSubject: auth.subject } : {}), csr: body.csr !== undefined, certificate: held !== undefined }, 'device registered over the API');
    this.sendJson(ctx.res, 201, {
      status: 'registered',
      device_id: id,
      token: issued.token,
      expires_at: issued.expiresAt.toISOString(),
      ...(certificate !== undefined ? { certificate } : {}),
      ca_certificate: this.identity.pki.deviceCaBundlePem(),
      endpoints: this.endpoints(ctx.req),
    });
  }

  private async renew(ctx: RequestContext): Promise<void> {
    const token = this.bearer(ctx.req);
    if (token === undefined) throw new RequestError(401, 'ECONN_AUTH_FAILED', 'send the current token as Authorization: Bearer TOKEN');
    const raw = await this.readJson(ctx, false);
    if (raw !== undefined) {
      const v = validateEmptyBody(raw);
      if (!v.ok) throw new RequestError(400, 'ECONN_BAD_REQUEST', v.message);
    }
    const r = await this.identity.tokens.renew(token);
    ctx.actor = r.deviceId;
    this.log.info({ deviceId: r.deviceId }, 'device token renewed');
    this.sendJson(ctx.res, 200, { token: r.token, expires_at: r.expiresAt.toISOString(), device_id: r.deviceId });
  }

  private async deregister(ctx: RequestContext): Promise<void> {
    const auth = await this.authenticateDevice(ctx);
    const id = this.requireSelf(ctx, auth);
    const raw = await this.readJson(ctx, false);
    if (raw !== undefined) {
      const v = validateEmptyBody(raw);
      if (!v.ok) throw new RequestError(400, 'ECONN_BAD_REQUEST', v.message);
    }
    await this.identity.registry.revoke(id);
    this.log.info({ deviceId: id, via: auth.via }, 'device deregistered itself');
    this.sendJson(ctx.res, 200, { status: 'revoked', device_id: id });
  }

  private async deviceStatus(ctx: RequestContext): Promise<void> {
    const auth = await this.authenticateDevice(ctx);
    const id = this.requireSelf(ctx, auth);
    const rec = this.identity.registry.get(id);
    if (!rec) throw new RequestError(404, 'ECONN_NOT_FOUND', `device "${id}" is not registered`);
    this.sendJson(ctx.res, 200, {
      device_id: rec.id,
      status: rec.status,
      connected: this.isConnected?.(id) ?? null,
      last_seen: rec.last_seen_at,
      metadata: rec.metadata,
    });
  }

  /** Topic of an upload: devices/ID/upload, or ?topic= inside the device's own namespace (not its commands). */
  private uploadTopic(ctx: RequestContext, id: string): string {
    const q = ctx.url.searchParams.getAll('topic');
    if (q.length === 0) return `devices/${id}/upload`;
    if (q.length > 1) throw new RequestError(400, 'ECONN_BAD_REQUEST', 'give at most one topic parameter');
    const topic = q[0]!;
    const limits = this.config.broker.limits;
    const prefix = `devices/${id}/`;
    if (!topic.startsWith(prefix) || topic.length === prefix.length) {
      throw new RequestError(403, 'ECONN_NOT_AUTHORIZED', `topic must be under ${prefix}… (the device's own namespace)`);
    }
    const levels = topic.split('/');
    if (levels[2] === 'commands') throw new RequestError(403, 'ECONN_NOT_AUTHORIZED', `${prefix}commands/… is for commands to the device, not uploads`);
    if (/[+#\0]/.test(topic) || levels.some((l) => l === '')) {
      throw new RequestError(400, 'ECONN_BAD_REQUEST', 'topic must be a topic name: no wildcards (+, #), no empty levels, no NUL');
    }
    if (Buffer.byteLength(topic) > limits.max_topic_bytes) throw new RequestError(400, 'ECONN_BAD_REQUEST', `topic is longer than ${limits.max_topic_bytes} bytes`);
    if (levels.length > limits.max_topic_depth) throw new RequestError(400, 'ECONN_BAD_REQUEST', `topic has more than ${limits.max_topic_depth} levels`);
    return topic;
  }

  private async publish(ctx: RequestContext): Promise<void> {
    const auth = await this.authenticateDevice(ctx);
    const id = this.requireSelf(ctx, auth);
    const sink = this.sink();
    if (!sink || !this.config.bridge.enabled) {
      throw new RequestError(503, 'ECONN_UNAVAILABLE', 'uploads are not available: the bridge is disabled on this gateway');
    }
    const topic = this.uploadTopic(ctx, id);
    const cd = ctx.req.headers['content-digest'];
    const expectedSha256 = parseContentDigest(Array.isArray(cd) ? cd.join(', ') : cd);
    const limit = this.config.api.max_upload_bytes;
    const declared = Number(ctx.req.headers['content-length'] ?? NaN);
    if (Number.isFinite(declared) && declared > limit) {
      throw new RequestError(413, 'ECONN_PAYLOAD_TOO_LARGE', `the upload is larger than ${limit} bytes (api.max_upload_bytes)`);
    }
    const ct = ctx.req.headers['content-type'];
    const contentType = ct && ct.length <= 256 && /^[\x20-\x7e]+$/.test(ct) ? ct : undefined;
    const meta: UplinkMessageMeta = { deviceId: id, topic, qos: 1, receivedAt: this.now(), ...(contentType ? { contentType } : {}) };

    this.continueIfAsked(ctx);
    const req = ctx.req;
    const state = { bytes: 0, over: false, aborted: false };
    async function* body(): AsyncGenerator<Buffer> {
      // destroyOnReturn false: when the sink stops early the socket stays up, so the client still gets its answer
      for await (const chunk of req.iterator({ destroyOnReturn: false }) as AsyncIterable<Buffer>) {
        state.bytes += chunk.length;
        if (state.bytes > limit) {
          state.over = true;
          throw new RequestError(413, 'ECONN_PAYLOAD_TOO_LARGE', `the upload is larger than ${limit} bytes (api.max_upload_bytes)`);
        }
        yield chunk;
      }
      if (!req.complete) {
        state.aborted = true;
        throw new ConnectorError('ECONN_BAD_REQUEST', 'the upload was cut off before its end');
      }
    }
    let result;
    try {
      result = await sink.appendStream(meta, body(), { maxBytes: limit, ...(expectedSha256 ? { expectedSha256 } : {}) });
    } catch (err) {
      if (state.over || errorCode(err) === 'ECONN_PAYLOAD_TOO_LARGE') {
        throw new RequestError(413, 'ECONN_PAYLOAD_TOO_LARGE', `the upload is larger than ${limit} bytes (api.max_upload_bytes); nothing was kept`);
      }
      if (errorCode(err) === 'ECONN_DIGEST_MISMATCH') {
        throw new RequestError(400, 'ECONN_DIGEST_MISMATCH', 'the body does not match its Content-Digest sha-256; nothing was kept');
      }
      if (state.aborted || req.destroyed || (!req.complete && req.socket.destroyed)) {
        this.log.info({ deviceId: id, bytes: state.bytes }, 'upload cut off by the client; nothing kept');
        ctx.res.destroy();
        return;
      }
      throw err;
    }
    this.counters.uploads++;
    this.counters.uploadBytes += result.size;
    this.log.info({ deviceId: id, topic, size: result.size, messageId: result.id }, 'upload stored');
    this.sendJson(ctx.res, 202, { message_id: result.id, size: result.size, sha256: result.sha256 });
  }
}
