/**
 * Admin socket: a Unix socket in the state directory (mode 0600, owner only)
 * speaking newline-delimited JSON: request `{"id":1,"method":"device.list","params":{}}`,
 * response `{"id":1,"result":…}` or `{"id":1,"error":{"code":"ECONN_…","message":"…"}}`.
 * Components register their methods; the CLI (`connector device …`, `status`,
 * `reload`) is a client.
 */
import net from 'node:net';
import { chmodSync, existsSync, unlinkSync } from 'node:fs';
import path from 'node:path';
import type { Logger } from '../core/logger.js';
import type { AdminHandler, AdminRegistry, Component } from '../core/component.js';
import { ConnectorError, errorCode, StartupError } from '../core/errors.js';

export type { AdminHandler };

const ADMIN_SOCKET_NAME = 'admin.sock';
const MAX_REQUEST_BYTES = 1024 * 1024;

export function adminSocketPath(stateDir: string): string {
  return path.join(stateDir, ADMIN_SOCKET_NAME);
}

export class AdminServer implements Component, AdminRegistry {
  readonly name = 'admin';
  private readonly handlers = new Map<string, AdminHandler>();
  private server: net.Server | undefined;
  private readonly sockets = new Set<net.Socket>();
  private readonly log: Logger;

  constructor(
    private readonly socketPath: string,
    logger: Logger,
  ) {
    this.log = logger.child({ component: 'admin' });
  }

  /** Register a method; later registrations of the same name replace earlier ones. */
  register(method: string, handler: AdminHandler): void {
    this.handlers.set(method, handler);
  }

  methods(): string[] {
    return [...this.handlers.keys()].sort();
  }

  async start(): Promise<void> {
    if (this.server) return;
    // a stale socket from a crashed run: remove it only if nobody answers on it
    if (existsSync(this.socketPath)) {
      const alive = await new Promise<boolean>((resolve) => {
        const c = net.connect(this.socketPath);
        c.once('connect', () => {
          c.destroy();
          resolve(true);
        });
        c.once('error', () => resolve(false));
      });
      if (alive) {
        throw new StartupError('ECONN_LISTEN', `admin socket ${this.socketPath} is in use: is another connector running on this state directory?`);
      }
      unlinkSync(this.socketPath);
    }
    const server = net.createServer((sock) => this.onConnection(sock));
    const oldMask = process.umask(0o177);
    try {
      await new Promise<void>((resolve, reject) => {
        server.once('error', (err) => reject(new StartupError('ECONN_LISTEN', `admin socket ${this.socketPath} cannot be created: ${(err as Error).message}`, { cause: err })));
        server.listen(this.socketPath, () => resolve());
      });
    } finally {
      process.umask(oldMask);
    }
    chmodSync(this.socketPath, 0o600);
    this.server = server;
  }

  private onConnection(sock: net.Socket): void {
    this.sockets.add(sock);
    sock.on('close', () => this.sockets.delete(sock));
    sock.on('error', () => sock.destroy());
    let buf = '';
    sock.setEncoding('utf8');
    sock.on('data', (chunk: string) => {
      buf += chunk;
      if (buf.length > MAX_REQUEST_BYTES) {
        sock.end(JSON.stringify({ id: null, error: { code: 'ECONN_BAD_REQUEST', message: 'request too large' } }) + '\n');
        return;
      }
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        if (line.trim()) void this.handle(sock, line);
      }
    });
  }

  private async handle(sock: net.Socket, line: string): Promise<void> {
    let id: unknown = null;
    try {
      const req = JSON.parse(line) as { id?: unknown; method?: unknown; params?: unknown };
      id = req.id ?? null;
      if (typeof req.method !== 'string') throw new ConnectorError('ECONN_BAD_REQUEST', 'method must be a string');
      const h = this.handlers.get(req.method);
      if (!h) throw new ConnectorError('ECONN_BAD_REQUEST', `unknown method "${req.method}"; known: ${this.methods().join(', ')}`);
      const params = req.params && typeof req.params === 'object' ? (req.params as Record<string, unknown>) : {};
      const result = await h(params);
      if (!sock.destroyed) sock.write(JSON.stringify({ id, result: result ?? null }) + '\n');
    } catch (err) {
      const code = errorCode(err)?.startsWith('ECONN_') ? errorCode(err) : err instanceof SyntaxError ? 'ECONN_BAD_REQUEST' : 'ECONN_INTERNAL';
      if (code === 'ECONN_INTERNAL') this.log.error({ err }, 'admin request failed');
      const message = code === 'ECONN_INTERNAL' ? 'internal error (see the daemon log)' : (err as Error).message;
      if (!sock.destroyed) sock.write(JSON.stringify({ id, error: { code, message } }) + '\n');
    }
  }

  async close(): Promise<void> {
    const server = this.server;
    if (!server) return;
    this.server = undefined;
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }
}

/** One request to the running daemon's admin socket. */
export function adminRequest(socketPath: string, method: string, params: Record<string, unknown> = {}, timeoutMs = 15000): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const sock = net.connect(socketPath);
    let buf = '';
    const timer = setTimeout(() => {
      sock.destroy();
      reject(new ConnectorError('ECONN_ADMIN', `no answer from the daemon on ${socketPath} within ${timeoutMs} ms`));
    }, timeoutMs);
    sock.setEncoding('utf8');
    sock.on('connect', () => sock.write(JSON.stringify({ id: 1, method, params }) + '\n'));
    sock.on('data', (d: string) => {
      buf += d;
      const nl = buf.indexOf('\n');
      if (nl < 0) return;
      clearTimeout(timer);
      sock.end();
      try {
        const res = JSON.parse(buf.slice(0, nl)) as { result?: unknown; error?: { code: string; message: string } };
        if (res.error) {
          const e = new ConnectorError(res.error.code.startsWith('ECONN_') ? (res.error.code as 'ECONN_ADMIN') : 'ECONN_ADMIN', res.error.message);
          reject(e);
        } else resolve(res.result);
      } catch (err) {
        reject(new ConnectorError('ECONN_ADMIN', `malformed answer from the daemon: ${(err as Error).message}`));
      }
    });
    sock.on('error', (err: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      const why =
        err.code === 'ENOENT' || err.code === 'ECONNREFUSED'
          ? 'the daemon is not running (start it with `connector start`, or pass the -c FILE it runs with)'
          : err.code === 'EACCES'
            ? 'permission denied (run as the daemon user or root)'
            : err.message;
      reject(new ConnectorError('ECONN_ADMIN', `cannot reach the admin socket ${socketPath}: ${why}`));
    });
  });
}
