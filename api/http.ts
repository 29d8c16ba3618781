/**
 * HTTP plumbing of the HTTPS API: security headers, JSON answers, the error
 * answer (status and client-safe flag from core/errors.ts ERROR_HTTP — nothing
 * is mapped by hand here), JSON body reading with size and time limits, the
 * Bearer header, the verified TLS client chain, and the answer to malformed
 * HTTP. No routes, no business logic.
 */
import type http from 'node:http';
import type { TLSSocket, DetailedPeerCertificate } from 'node:tls';
import type { Duplex } from 'node:stream';
import type { Logger } from '../core/logger.js';
import { redactString } from '../core/logger.js';
import { ConnectorError, errorCode, httpErrorOf, type ErrorCode } from '../core/errors.js';
import type { RefusalLog, SourceBudget } from '../core/refusals.js';

/**
 * Sent on every response, errors and malformed-request answers included. The first
 * four are the documented set (docs/devices.md); CSP, referrer and cache policy are ours.
 */
export const SECURITY_HEADERS: Readonly<Record<string, string>> = Object.freeze({
  'x-content-type-options': 'nosniff',
  'x-frame-options': 'DENY',
  'x-xss-protection': '1; mode=block',
  'strict-transport-security': 'max-age=31536000; includeSubDomains',
  'content-security-policy': "default-src 'none'; frame-ancestors 'none'",
  'referrer-policy': 'no-referrer',
  'cache-control': 'no-store',
});

/** Reason word of the `error` field of an error answer, by HTTP status. */
const REASONS: Readonly<Record<number, string>> = {
  400: 'bad_request',
  401: 'unauthorized',
  403: 'forbidden',
  404: 'not_found',
  405: 'method_not_allowed',
  408: 'request_timeout',
  409: 'conflict',
  413: 'payload_too_large',
  415: 'unsupported_media_type',
  429: 'too_many_requests',
  431: 'request_header_fields_too_large',
  500: 'internal_error',
  503: 'service_unavailable',
};

const STATUS_LINES: Readonly<Record<number, string>> = { 400: 'Bad Request', 408: 'Request Timeout', 431: 'Request Header Fields Too Large' };

const GENERIC_MESSAGES: Readonly<Record<number, string>> = {
  500: 'internal error; the gateway log has the details',
  503: 'the service is not available right now; retry later',
};

/** 405: the route exists, the method does not; carries the Allow list. */
export class MethodNotAllowedError extends ConnectorError {
  constructor(
    readonly route: string,
    readonly allow: readonly string[],
  ) {
    super('ECONN_METHOD_NOT_ALLOWED', `${route} accepts ${allow.join(', ')} only`);
  }
}

export interface RequestContext {
  req: http.IncomingMessage;
  res: http.ServerResponse;
  url: URL;
  /** Route template for logs (`/api/publish/{device_id}`), or the raw path when none matched. */
  route: string;
  /** The `{device_id}` path parameter, checked against DEVICE_ID_RE. */
  deviceId?: string;
  /** The client sent `Expect: 100-continue`; 100 is sent only once the request passed its checks. */
  expectContinue: boolean;
  /** Set once the body is being (or was) consumed. */
  bodyStarted: boolean;
  /** The authenticated device, for the log line. */
  actor?: string;
}

export interface HttpTimeouts {
  /** Time to receive a JSON body. */
  jsonBodyMs: number;
  /** After an early refusal (413, 401 on an upload), how long the unread body is drained before the socket is closed. */
  lingerMs: number;
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
    if (!m) throw new ConnectorError('ECONN_BAD_REQUEST', 'Content-Digest must be a list of ALG=:BASE64: (RFC 9530), e.g. sha-256=:…:');
    if (m[1] !== 'sha-256') continue;
    const digest = Buffer.from(m[2]!, 'base64');
    if (digest.length !== 32) throw new ConnectorError('ECONN_BAD_REQUEST', 'Content-Digest sha-256 must be the 32-byte digest in base64');
    found = digest;
  }
  return found;
}

/** The media type of a Content-Type header, lower case, without parameters. */
export function mediaType(ct: string | undefined): string | undefined {
  if (!ct) return undefined;
  return ct.split(';')[0]!.trim().toLowerCase();
}

/** Whether a Content-Type names JSON (application/json or application/*+json, any parameters). */
export function isJsonType(ct: string | undefined): boolean {
  const type = mediaType(ct);
  if (!type) return false;
  return type === 'application/json' || /^application\/[a-z0-9.+-]+\+json$/.test(type);
}

export function hasBody(req: http.IncomingMessage): boolean {
  const len = req.headers['content-length'];
  if (req.headers['transfer-encoding'] !== undefined) return true;
  return len !== undefined && len !== '0';
}

/** One header value (the first when repeated). */
export function header(req: http.IncomingMessage, name: string): string | undefined {
  const v = req.headers[name];
  return Array.isArray(v) ? v[0] : v;
}

/** The message an error answer shows: the error's own (redacted, capped) when its code is client-safe, else a generic text. */
export function clientMessage(err: unknown, status: number): string {
  if (err instanceof ConnectorError && httpErrorOf(err.code).clientSafe) {
    const m = redactString(err.message);
    return m.length > 400 ? `${m.slice(0, 400)}…` : m;
  }
  return GENERIC_MESSAGES[status] ?? 'request refused';
}

export class HttpIo {
  constructor(
    private readonly log: Logger,
    private readonly timeouts: HttpTimeouts,
    private readonly counters: { refused: number },
    /** 4xx refusals are logged through it: the first ones of an interval in full, then one summary line (core/refusals.ts). */
    private readonly refusals: RefusalLog,
    /** Charged by every 401 (bad credentials) and malformed request, per source address (api.refused_per_source_*). */
    private readonly budget: SourceBudget,
  ) {}

  setSecurityHeaders(res: http.ServerResponse): void {
    for (const [k, v] of Object.entries(SECURITY_HEADERS)) res.setHeader(k, v);
  }

  sendJson(res: http.ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
    if (res.headersSent || res.destroyed) return;
    // an answer other than 401 gives a limited source back the token its connection paid on admission
    if (status !== 401) this.budget.succeeded(res.req.socket.remoteAddress ?? 'unknown');
    const text = JSON.stringify(body);
    this.setSecurityHeaders(res);
    res.writeHead(status, { ...headers, 'content-type': 'application/json; charset=utf-8', 'content-length': Buffer.byteLength(text) });
    res.end(text);
  }

  /** Answer an error: status and message visibility from ERROR_HTTP, one log line, and the socket closed when a body is still unread. */
  refuse(ctx: RequestContext, err: unknown): void {
    const code = errorCode(err);
    const mapping = httpErrorOf(code);
    const status = mapping.status;
    const publicCode: ErrorCode = status === 500 || !code ? 'ECONN_INTERNAL' : (code as ErrorCode);
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
    const source = ctx.req.socket.remoteAddress ?? 'unknown';
    if (status >= 500) this.log.error({ ...fields, err }, 'request failed');
    else this.refusals.refused(publicCode, source, { ...fields, reason: message });
    if (status === 401) this.budget.refused(source);

    const headers: Record<string, string> = {};
    if (status === 401) {
      headers['www-authenticate'] =
        code === 'ECONN_AUTH_TOKEN' || code === 'ECONN_DEVICE_REVOKED' || code === 'ECONN_DEVICE_UNKNOWN'
          ? 'Bearer realm="edge-connector", error="invalid_token"'
          : 'Bearer realm="edge-connector"';
    }
    if (err instanceof MethodNotAllowedError) headers.allow = err.allow.join(', ');
    if (status === 503) headers['retry-after'] = '5';
    if (status === 429 && code === 'ECONN_RATE_LIMITED') headers['retry-after'] = String(this.retryAfterS());
    // a body the client is still sending is not read: close the connection after the answer
    const unread = !ctx.req.complete && (hasBody(ctx.req) || ctx.bodyStarted);
    if (unread) headers.connection = 'close';
    this.sendJson(ctx.res, status, { error: REASONS[status] ?? 'error', code: publicCode, message }, headers);
    if (unread) this.linger(ctx);
  }

  /** A success answer given without reading the body (e.g. a repeated upload): the unread body is drained briefly, then the socket is closed. */
  answerWithoutBody(ctx: RequestContext, status: number, body: unknown): void {
    const unread = !ctx.req.complete && (hasBody(ctx.req) || ctx.bodyStarted);
    this.sendJson(ctx.res, status, body, unread ? { connection: 'close' } : {});
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

  /** Malformed HTTP (the parser refused it): a JSON error with the security headers, then close. */
  onClientError(err: NodeJS.ErrnoException, socket: Duplex): void {
    if (err.code === 'ECONNRESET' || !socket.writable) {
      socket.destroy();
      return;
    }
    const code: ErrorCode =
      err.code === 'HPE_HEADER_OVERFLOW' ? 'ECONN_HEADERS_TOO_LARGE' : err.code === 'ERR_HTTP_REQUEST_TIMEOUT' ? 'ECONN_REQUEST_TIMEOUT' : 'ECONN_BAD_REQUEST';
    const { status } = httpErrorOf(code);
    const message =
      code === 'ECONN_REQUEST_TIMEOUT' ? 'the request was not received in time' : code === 'ECONN_HEADERS_TOO_LARGE' ? 'request headers are too large' : 'malformed HTTP request';
    this.counters.refused++;
    const source = (socket as Duplex & { remoteAddress?: string }).remoteAddress ?? 'unknown';
    this.refusals.refused(code, source, { status, reason: err.code, remote: source });
    this.budget.refused(source);
    const body = JSON.stringify({ error: REASONS[status], code, message });
    const head = [
      `HTTP/1.1 ${status} ${STATUS_LINES[status] ?? 'Bad Request'}`,
      'content-type: application/json; charset=utf-8',
      `content-length: ${Buffer.byteLength(body)}`,
      'connection: close',
      ...Object.entries(SECURITY_HEADERS).map(([k, v]) => `${k}: ${v}`),
    ].join('\r\n');
    socket.end(`${head}\r\n\r\n${body}`);
  }

  /** Seconds until a source that spent its budget may try again (one token at api.refused_per_source_per_s). */
  private retryAfterS(): number {
    const perS = this.budget.limitsNow().perS;
    return perS > 0 ? Math.max(1, Math.ceil(1 / perS)) : 1;
  }

  continueIfAsked(ctx: RequestContext): void {
    if (ctx.expectContinue && !ctx.bodyStarted && !ctx.res.headersSent) ctx.res.writeContinue();
    ctx.bodyStarted = true;
  }

  /** Read a whole body up to `limit` bytes within the JSON body timeout. */
  async readBody(ctx: RequestContext, limit: number, what: string, limitKey: string): Promise<Buffer> {
    const { req } = ctx;
    const declared = Number(req.headers['content-length'] ?? NaN);
    if (Number.isFinite(declared) && declared > limit) {
      throw new ConnectorError('ECONN_PAYLOAD_TOO_LARGE', `the ${what} is larger than ${limit} bytes (${limitKey})`);
    }
    this.continueIfAsked(ctx);
    const chunks: Buffer[] = [];
    let size = 0;
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        cleanup();
        reject(new ConnectorError('ECONN_REQUEST_TIMEOUT', `the body was not received within ${Math.round(this.timeouts.jsonBodyMs / 1000)} s`));
      }, this.timeouts.jsonBodyMs);
      const onData = (c: Buffer): void => {
        size += c.length;
        if (size > limit) {
          cleanup();
          req.pause();
          reject(new ConnectorError('ECONN_PAYLOAD_TOO_LARGE', `the ${what} is larger than ${limit} bytes (${limitKey})`));
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
    return Buffer.concat(chunks, size);
  }

  /** Read and parse a JSON body (size-limited, time-limited). Empty bodies give `undefined` when allowed. */
  async readJson(ctx: RequestContext, required: boolean, limit: number): Promise<unknown> {
    const { req } = ctx;
    if (!hasBody(req)) {
      if (required) throw new ConnectorError('ECONN_BAD_REQUEST', 'a JSON body is required (Content-Type: application/json)');
      return undefined;
    }
    if (!isJsonType(req.headers['content-type'])) {
      throw new ConnectorError('ECONN_UNSUPPORTED_MEDIA_TYPE', 'the body must be JSON: send Content-Type: application/json');
    }
    const body = await this.readBody(ctx, limit, 'JSON body', 'api.max_body_bytes');
    if (body.length === 0) {
      if (required) throw new ConnectorError('ECONN_BAD_REQUEST', 'a JSON body is required');
      return undefined;
    }
    return parseJson(body);
  }
}

export function parseJson(body: Buffer): unknown {
  try {
    return JSON.parse(body.toString('utf8')) as unknown;
  } catch {
    throw new ConnectorError('ECONN_BAD_REQUEST', 'the body is not valid JSON');
  }
}

/** The Bearer token of the Authorization header; undefined when there is none; throws when it is malformed. */
export function bearer(req: http.IncomingMessage): string | undefined {
  const h = req.headers.authorization;
  if (h === undefined) return undefined;
  const m = /^Bearer[ \t]+([A-Za-z0-9\-._~+/]+=*)[ \t]*$/i.exec(h);
  if (!m) throw new ConnectorError('ECONN_AUTH_FAILED', 'the Authorization header must be "Bearer TOKEN"');
  return m[1];
}

/** The verified TLS client certificate chain (fingerprints, leaf first), or undefined when none or not trusted. */
export function peerChain(req: http.IncomingMessage): { leaf: DetailedPeerCertificate; fingerprints: string[] } | undefined {
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
