/**
 * Prometheus metrics and health endpoints on one loopback HTTP listener:
 *  GET /metrics  Prometheus text format (prom-client registry shared by every component)
 *  GET /healthz  200 while the process is alive and its event loop turns
 *  GET /readyz   200 once every component started (listeners bound, journal
 *                replayed) and every readiness check passes; 503 with reasons otherwise
 *  GET /         the status page (daemon/status-page.ts), once the daemon set one
 *  GET /status.json  its data
 * Only GET and HEAD (405 with Allow otherwise). Every response carries the API's
 * security headers; the page's Content-Security-Policy allows only its own
 * inline style and script (by hash) and requests to this listener.
 */
import http from 'node:http';
import { collectDefaultMetrics, Registry } from 'prom-client';
import type { Logger } from '../core/logger.js';
import type { Component } from '../core/component.js';
import { listen, closeServer } from '../core/net.js';
import { SECURITY_HEADERS } from '../api/api.js';

/** What the status page routes serve: the page (fixed) and its data (built per request). */
export interface StatusPageSource {
  html: string;
  csp: string;
  json(): unknown;
}

export type ReadinessCheck = () => { ok: boolean; reason?: string };

export function createMetricsRegistry(): Registry {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry, prefix: 'connector_process_' });
  return registry;
}

export class HealthServer implements Component {
  readonly name = 'metrics';
  private server: http.Server | undefined;
  private ready = false;
  private readonly checks = new Map<string, ReadinessCheck>();
  private readonly log: Logger;
  private page: StatusPageSource | undefined;
  boundPort = 0;

  constructor(
    private readonly opts: { host: string; port: number; enabled: boolean },
    private readonly registry: Registry,
    logger: Logger,
  ) {
    this.log = logger.child({ component: 'metrics' });
  }

  addReadinessCheck(name: string, check: ReadinessCheck): void {
    this.checks.set(name, check);
  }

  /** Serve the status page at / and its data at /status.json. */
  setStatusPage(page: StatusPageSource): void {
    this.page = page;
  }

  setReady(ready: boolean): void {
    this.ready = ready;
  }

  readiness(): { ready: boolean; reasons: string[] } {
    const reasons: string[] = [];
    if (!this.ready) reasons.push('starting or stopping');
    for (const [name, check] of this.checks) {
      try {
        const r = check();
        if (!r.ok) reasons.push(`${name}: ${r.reason ?? 'not ready'}`);
      } catch (err) {
        reasons.push(`${name}: check failed (${(err as Error).message})`);
      }
    }
    return { ready: reasons.length === 0, reasons };
  }

  async start(): Promise<void> {
    if (!this.opts.enabled || this.server) return;
    const server = http.createServer((req, res) => void this.handle(req, res));
    server.headersTimeout = 10000;
    server.requestTimeout = 10000;
    this.boundPort = await listen(server, this.opts.host, this.opts.port, 'metrics', 'metrics.port');
    this.server = server;
  }

  private async handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const url = (req.url ?? '/').split('?')[0];
    const json = (status: number, body: unknown, extra: Record<string, string> = {}): void => {
      res.writeHead(status, { ...SECURITY_HEADERS, 'content-type': 'application/json', 'cache-control': 'no-store', ...extra });
      res.end(JSON.stringify(body));
    };
    try {
      if (req.method !== 'GET' && req.method !== 'HEAD') {
        return json(405, { error: 'method not allowed', code: 'ECONN_BAD_REQUEST', message: 'this listener is read-only: GET or HEAD' }, { allow: 'GET, HEAD' });
      }
      if (url === '/healthz') return json(200, { status: 'alive' });
      if (url === '/readyz') {
        const r = this.readiness();
        return json(r.ready ? 200 : 503, { ready: r.ready, reasons: r.reasons });
      }
      if (url === '/metrics') {
        const body = await this.registry.metrics();
        res.writeHead(200, { ...SECURITY_HEADERS, 'content-type': this.registry.contentType });
        res.end(body);
        return;
      }
      if (this.page && (url === '/' || url === '/index.html')) {
        res.writeHead(200, { ...SECURITY_HEADERS, 'content-type': 'text/html; charset=utf-8', 'content-security-policy': this.page.csp });
        res.end(this.page.html);
        return;
      }
      if (this.page && url === '/status.json') return json(200, this.page.json());
      json(404, { error: 'not found', code: 'ECONN_NOT_FOUND', message: `try ${this.page ? '/ (status page), /status.json, ' : ''}/metrics, /healthz or /readyz` });
    } catch (err) {
      this.log.error({ err }, 'metrics request failed');
      if (!res.headersSent) json(500, { error: 'internal error', code: 'ECONN_INTERNAL' });
      else res.destroy();
    }
  }

  async close(): Promise<void> {
    this.ready = false;
    const s = this.server;
    this.server = undefined;
    if (s) await closeServer(s, 500);
  }
}
