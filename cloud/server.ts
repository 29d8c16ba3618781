/**
 * The reference cloud endpoint (`connector cloud`): one HTTPS listener with
 *   POST /oauth/token     OAuth2 token endpoint (token-endpoint.ts)
 *   GET  /ingest          WSS, subprotocol edge-connector.v2 (ingest.ts, docs/PROTOCOL.md); a client
 *                         offering only other versions gets HTTP 400 naming the versions spoken
 *   GET  /subscribe       WSS, stored messages as JSON (subscribers.ts)
 *   POST /api/commands    {device_id, name, payload | payload_base64, gateway_id?, timeout_ms?}
 *                         → COMMAND to the gateway, answers its COMMAND_RESULT (504 on timeout)
 *   GET  /healthz
 * Every API and WSS request needs `Authorization: Bearer TOKEN` with the
 * scope of the route (ingest, subscribe, commands).
 */
import https from 'node:https';
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Duplex } from 'node:stream';
import { mkdirSync, readFileSync, chmodSync } from 'node:fs';
import path from 'node:path';
import { WebSocketServer } from 'ws';
import type { Logger } from '../core/logger.js';
import type { Component } from '../core/component.js';
import { listen, closeServer } from '../core/net.js';
import { ensureSecretFile, resolveSecret } from '../core/secrets.js';
import { RequestError, errorCode } from '../core/errors.js';
import { CLOSE_CODES } from '../protocol/codec.js';
import { SUBPROTOCOL_V2 } from '../protocol/v2.js';
import type { CloudConfig, Scope } from './config.js';
import { loadOrCreateTls } from './tls.js';
import { CloudStore } from './store.js';
import { TokenService, type VerifiedToken } from './token-endpoint.js';
import { GatewayBindings, GatewayRegistry, IngestSession, maxFrameBytes } from './ingest.js';
import { SubscriberHub, filterError } from './subscribers.js';
import { SIGNATURE_HEADER, verifySignature } from '../protocol/signature.js';

const MAX_JSON_BODY = 1024 * 1024;

function httpReject(socket: Duplex, status: number, text: string, body: Record<string, unknown>, headers: Record<string, string> = {}): void {
  const json = JSON.stringify(body);
  const head = [`HTTP/1.1 ${status} ${text}`, 'Content-Type: application/json', `Content-Length: ${Buffer.byteLength(json)}`, 'Connection: close', ...Object.entries(headers).map(([k, v]) => `${k}: ${v}`)];
  if (socket.writable) socket.end(`${head.join('\r\n')}\r\n\r\n${json}`);
  socket.destroy();
}

export class CloudServer implements Component {
  readonly name = 'cloud';
  private server?: https.Server;
  private store?: CloudStore;
  private tokens?: TokenService;
  private hub?: SubscriberHub;
  private readonly registry = new GatewayRegistry();
  private bindings?: GatewayBindings;
  private ingestWss?: WebSocketServer;
  private subscribeWss?: WebSocketServer;
  private boundPort = 0;
  private started = false;
  private closing?: Promise<void>;
  private expiryTimer?: NodeJS.Timeout;
  /** CA file the connector should trust (when the cloud generated its TLS). */
  caFile?: string;

  constructor(
    private readonly cfg: CloudConfig,
    private readonly log: Logger,
  ) {}

  get port(): number {
    return this.boundPort;
  }
  get tokenService(): TokenService {
    if (!this.tokens) throw new Error('cloud not started');
    return this.tokens;
  }
  get cloudStore(): CloudStore {
    if (!this.store) throw new Error('cloud not started');
    return this.store;
  }
  get gateways(): GatewayRegistry {
    return this.registry;
  }

  async start(): Promise<void> {
    if (this.started) return;
    this.started = true;
    const cfg = this.cfg;
    mkdirSync(cfg.store_dir, { recursive: true, mode: 0o700 });
    chmodSync(cfg.store_dir, 0o700);
    const tls = await loadOrCreateTls({ storeDir: cfg.store_dir, certFile: cfg.tls.cert_file, keyFile: cfg.tls.key_file, hostnames: [cfg.listen.host] });
    if (tls.caFile) this.caFile = tls.caFile;
    for (const f of tls.created) this.log.info({ file: f }, 'created');
    const keyFile = path.join(cfg.store_dir, 'token.key');
    if (ensureSecretFile(keyFile, 32)) this.log.info({ file: keyFile }, 'created');
    const key = Buffer.from(readFileSync(keyFile, 'utf8').trim(), 'utf8');
    this.tokens = new TokenService(cfg, key, this.log.child({ part: 'oauth' }));
    this.store = new CloudStore(cfg.store_dir, this.log.child({ part: 'store' }));
    await this.store.open();
    this.bindings = new GatewayBindings(cfg.store_dir, cfg);
    this.bindings.load();
    this.startPartialExpiry(cfg.partial_ttl_s * 1000);
    this.hub = new SubscriberHub(this.store, this.log.child({ part: 'subscribe' }));
    this.ingestWss = new WebSocketServer({
      noServer: true,
      maxPayload: maxFrameBytes(cfg),
      perMessageDeflate: false,
      handleProtocols: (protocols) => (protocols.has(SUBPROTOCOL_V2) ? SUBPROTOCOL_V2 : false),
    });
    this.subscribeWss = new WebSocketServer({ noServer: true, maxPayload: 64 * 1024, perMessageDeflate: false });
    this.server = https.createServer({ cert: tls.cert, key: tls.key, minVersion: 'TLSv1.2' }, (req, res) => void this.onRequest(req, res));
    this.server.on('upgrade', (req: IncomingMessage, socket: Duplex, head: Buffer) => void this.onUpgrade(req, socket, head));
    this.server.on('tlsClientError', (err) => this.log.debug({ err: err.message }, 'TLS handshake failed'));
    this.boundPort = await listen(this.server, cfg.listen.host, cfg.listen.port, 'cloud', 'listen.port');
  }

  private async bearer(req: IncomingMessage, scope: Scope): Promise<VerifiedToken> {
    const h = req.headers.authorization;
    const m = h ? /^Bearer\s+(\S+)$/i.exec(h) : null;
    if (!m) throw new RequestError(401, 'ECONN_AUTH_TOKEN', 'Authorization: Bearer TOKEN required');
    try {
      return await this.tokens!.verify(m[1]!, scope);
    } catch (err) {
      if (errorCode(err) === 'ECONN_NOT_AUTHORIZED') throw new RequestError(403, 'ECONN_NOT_AUTHORIZED', (err as Error).message);
      throw new RequestError(401, 'ECONN_AUTH_TOKEN', (err as Error).message);
    }
  }

  private async onUpgrade(req: IncomingMessage, socket: Duplex, head: Buffer): Promise<void> {
    socket.on('error', () => undefined);
    const remote = `${req.socket.remoteAddress}:${req.socket.remotePort}`;
    const url = new URL(req.url ?? '/', 'https://cloud');
    try {
      if (this.closing) throw new RequestError(503, 'ECONN_CLOSED', 'shutting down');
      if (url.pathname === '/ingest') {
        const offered = (req.headers['sec-websocket-protocol'] ?? '').split(',').map((s) => s.trim()).filter(Boolean);
        if (!offered.includes(SUBPROTOCOL_V2)) {
          // an older (v1-only) connector: a clear refusal naming what this cloud speaks, before any token work
          throw new RequestError(
            400,
            'ECONN_PROTOCOL',
            `unsupported protocol version: offered ${offered.length ? offered.join(', ').slice(0, 200) : 'no subprotocol'}; this cloud speaks ${SUBPROTOCOL_V2} only (upgrade the connector)`,
          );
        }
        const auth = await this.bearer(req, 'ingest');
        if (this.cfg.signing_secret) {
          const secret = resolveSecret(this.cfg.signing_secret);
          const sig = req.headers[SIGNATURE_HEADER];
          if (!verifySignature(typeof sig === 'string' ? sig : undefined, secret, req.method ?? 'GET', req.url ?? '/')) {
            throw new RequestError(401, 'ECONN_AUTH_FAILED', 'X-Signature missing, expired or wrong');
          }
        }
        this.ingestWss!.handleUpgrade(req, socket, head, (ws) => {
          const s = (socket as { setNoDelay?: (b: boolean) => void }).setNoDelay;
          if (s) s.call(socket, true);
          new IngestSession(ws, { cfg: this.cfg, store: this.store!, tokens: this.tokens!, registry: this.registry, bindings: this.bindings!, log: this.log.child({ part: 'ingest' }) }, auth, remote).start();
        });
        return;
      }
      if (url.pathname === '/subscribe') {
        await this.bearer(req, 'subscribe');
        const filters = url.searchParams.getAll('filter');
        if (filters.length === 0) filters.push('#');
        for (const f of filters) {
          const e = filterError(f);
          if (e) throw new RequestError(400, 'ECONN_BAD_REQUEST', `filter ${JSON.stringify(f.slice(0, 100))}: ${e}`);
        }
        const fromStart = ['1', 'true', 'yes'].includes(url.searchParams.get('from_start') ?? '');
        this.subscribeWss!.handleUpgrade(req, socket, head, (ws) => this.hub!.attach(ws, filters, fromStart, remote));
        return;
      }
      throw new RequestError(404, 'ECONN_NOT_FOUND', `no WebSocket endpoint at ${url.pathname}`);
    } catch (err) {
      const status = err instanceof RequestError ? err.status : 500;
      const code = errorCode(err) ?? 'ECONN_INTERNAL';
      const message = err instanceof RequestError ? err.message : 'internal error';
      if (status === 500) this.log.error({ err }, 'upgrade failed');
      else this.log.info({ remote, path: url.pathname, status, code, message }, 'upgrade refused');
      const headers: Record<string, string> = status === 401 ? { 'WWW-Authenticate': 'Bearer realm="edge-connector-cloud", error="invalid_token"' } : {};
      const body: Record<string, unknown> = { error: code, message };
      if (code === 'ECONN_PROTOCOL') {
        // RFC 6455 §4.4-style hint: which versions (subprotocols) this endpoint speaks
        headers['Sec-WebSocket-Version'] = '13';
        headers['X-Supported-Subprotocols'] = SUBPROTOCOL_V2;
        body.supported = [SUBPROTOCOL_V2];
      }
      httpReject(socket, status, STATUS_TEXT[status] ?? 'Error', body, headers);
    }
  }

  private async onRequest(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const url = new URL(req.url ?? '/', 'https://cloud');
    const json = (status: number, body: unknown): void => {
      const text = JSON.stringify(body);
      res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text), 'cache-control': 'no-store' });
      res.end(text);
    };
    try {
      if (url.pathname === '/oauth/token') return await this.tokens!.handle(req, res);
      if (url.pathname === '/healthz' && req.method === 'GET') return json(200, { status: 'ok', stored: this.store!.count, gateways: [...this.registry.sessions.keys()] });
      if (url.pathname === '/api/commands') {
        if (req.method !== 'POST') throw new RequestError(405, 'ECONN_BAD_REQUEST', 'use POST');
        await this.bearer(req, 'commands');
        const body = await readJson(req);
        return json(200, await this.command(body));
      }
      throw new RequestError(404, 'ECONN_NOT_FOUND', `nothing at ${url.pathname}`);
    } catch (err) {
      const status = err instanceof RequestError ? err.status : 500;
      if (status === 500) this.log.error({ err }, 'request failed');
      json(status, { error: errorCode(err) ?? 'ECONN_INTERNAL', message: err instanceof RequestError ? err.message : 'internal error' });
    }
  }

  /** Send a command to the gateway serving a device; resolves with its COMMAND_RESULT. */
  async command(body: Record<string, unknown>): Promise<{ id: string; delivered: boolean; reason?: string; gateway_id: string }> {
    const bad = (m: string): never => {
      throw new RequestError(400, 'ECONN_BAD_REQUEST', m);
    };
    const deviceId = typeof body.device_id === 'string' && body.device_id.length > 0 && body.device_id.length <= 256 ? body.device_id : bad('device_id: a string of 1..256 characters');
    const name = typeof body.name === 'string' && /^[A-Za-z0-9._-]{1,128}$/.test(body.name) ? body.name : bad('name: 1..128 of [A-Za-z0-9._-]');
    let payload: Buffer;
    if (typeof body.payload_base64 === 'string') {
      if (!/^[A-Za-z0-9+/]*={0,2}$/.test(body.payload_base64) || body.payload_base64.length % 4 !== 0) bad('payload_base64: not base64');
      payload = Buffer.from(body.payload_base64, 'base64');
    } else if (typeof body.payload === 'string') payload = Buffer.from(body.payload, 'utf8');
    else if (body.payload === undefined) payload = Buffer.alloc(0);
    else return bad('payload: a string (or payload_base64)');
    if (payload.length > 512 * 1024) throw new RequestError(413, 'ECONN_PAYLOAD_TOO_LARGE', 'command payload over 512 KiB');
    const gatewayId = typeof body.gateway_id === 'string' ? body.gateway_id : undefined;
    const timeoutMs = typeof body.timeout_ms === 'number' && Number.isInteger(body.timeout_ms) && body.timeout_ms > 0 ? Math.min(body.timeout_ms, 600_000) : this.cfg.command_timeout_ms;
    const session = this.registry.route(deviceId, gatewayId);
    if (!session || !session.gatewayId) throw new RequestError(404, 'ECONN_NOT_FOUND', gatewayId ? `gateway ${gatewayId} is not connected` : `no connected gateway serves device ${deviceId}`);
    const r = await session.command(deviceId, name, payload, timeoutMs);
    this.log.info({ device: deviceId, name, command: r.id, delivered: r.delivered, reason: r.reason }, 'command result');
    return { ...r, gateway_id: session.gatewayId };
  }

  /** Partial messages no chunk reached for partial_ttl_s are dropped: at start, then at a tenth of the TTL (at most every minute). */
  private startPartialExpiry(ttlMs: number): void {
    let running = false;
    const run = (): void => {
      if (running || this.closing) return;
      running = true;
      this.store!.expirePartials(ttlMs)
        .catch((err: unknown) => this.log.warn({ err }, 'cloud store: partial expiry failed (tried again later)'))
        .finally(() => (running = false));
    };
    run();
    this.expiryTimer = setInterval(run, Math.min(60_000, Math.max(100, Math.floor(ttlMs / 10))));
    this.expiryTimer.unref();
  }

  async close(): Promise<void> {
    if (!this.started) return;
    if (this.expiryTimer) clearInterval(this.expiryTimer);
    this.closing ??= (async () => {
      const sessions = [...this.registry.sessions.values()];
      for (const s of sessions) s.close(CLOSE_CODES.GOING_AWAY, 'cloud shutting down');
      this.hub?.close();
      for (const wss of [this.ingestWss, this.subscribeWss]) {
        for (const c of wss?.clients ?? []) c.close(CLOSE_CODES.GOING_AWAY, 'cloud shutting down');
      }
      await Promise.race([Promise.all(sessions.map((s) => s.finished)), new Promise((r) => setTimeout(r, 3000).unref())]);
      for (const wss of [this.ingestWss, this.subscribeWss]) for (const c of wss?.clients ?? []) c.terminate();
      this.ingestWss?.close();
      this.subscribeWss?.close();
      if (this.server) await closeServer(this.server, 1000);
      await this.store?.close();
    })();
    return this.closing;
  }
}

const STATUS_TEXT: Record<number, string> = { 400: 'Bad Request', 401: 'Unauthorized', 403: 'Forbidden', 404: 'Not Found', 500: 'Internal Server Error', 503: 'Service Unavailable' };

function readJson(req: IncomingMessage): Promise<Record<string, unknown>> {
  return new Promise((resolve, reject) => {
    const ct = (req.headers['content-type'] ?? '').split(';')[0]!.trim().toLowerCase();
    if (ct !== 'application/json') {
      req.resume();
      return reject(new RequestError(415, 'ECONN_BAD_REQUEST', 'Content-Type must be application/json'));
    }
    const parts: Buffer[] = [];
    let n = 0;
    let failed = false;
    req.on('data', (d: Buffer) => {
      n += d.length;
      if (n > MAX_JSON_BODY) {
        if (!failed) reject(new RequestError(413, 'ECONN_PAYLOAD_TOO_LARGE', 'request body over 1 MiB'));
        failed = true;
        return;
      }
      parts.push(d);
    });
    req.on('end', () => {
      if (failed) return;
      try {
        const v = JSON.parse(Buffer.concat(parts).toString('utf8')) as unknown;
        if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new Error('not an object');
        resolve(v as Record<string, unknown>);
      } catch {
        reject(new RequestError(400, 'ECONN_BAD_REQUEST', 'body must be a JSON object'));
      }
    });
    req.on('error', reject);
  });
}
