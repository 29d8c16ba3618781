/**
 * Test helpers for the reference cloud: an in-process CloudServer on port 0
 * with a temp store, an OAuth2 request helper, and a minimal gateway client
 * that speaks the wire protocol (version 2) through protocol/v2.ts: CHUNK frames
 * given to send() go out as a BATCH of one (positions assigned), and a
 * cumulative ACK {upto} is delivered with `ids` filled in from the positions
 * it covers (minus those REJECTed before it), so tests can wait for an id.
 */
import https from 'node:https';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { WebSocket } from 'ws';
import { silentLogger } from '../../core/logger.js';
import { CloudServer } from '../../cloud/server.js';
import { parseCloudConfig, type CloudConfig } from '../../cloud/config.js';
import { stringify } from 'yaml';
import type { ChunkFrame, Frame, FrameTypeName, HelloFrame } from '../../protocol/codec.js';
import { SUBPROTOCOL_V2, decodeFrameV2, encodeBatch, encodeBatchChunk, encodeFrameV2, type BatchChunk, type FrameV2 } from '../../protocol/v2.js';
import type { TestLike } from '../helpers/daemon.js';

export const SECRET = 'test-client-secret-0123456789';
export const USER_PASSWORD = 'alice-password-123';

export interface CloudHandle {
  server: CloudServer;
  cfg: CloudConfig;
  dir: string;
  port: number;
  ca: string;
  /** Stop the server (idempotent). */
  stop(): Promise<void>;
  /** Start a new server on the same store (and the same port). */
  restart(): Promise<CloudHandle>;
}

export function cloudConfig(dir: string, over: Record<string, unknown> = {}): CloudConfig {
  writeFileSync(path.join(dir, 'client.secret'), SECRET + '\n', { mode: 0o600 });
  writeFileSync(path.join(dir, 'alice.pw'), USER_PASSWORD + '\n', { mode: 0o600 });
  const doc = {
    listen: { host: '127.0.0.1', port: 0 },
    store_dir: './store',
    clients: [
      { id: 'gw-client', secret: 'file:./client.secret' },
      { id: 'cc-only', secret: 'file:./client.secret', grants: ['client_credentials'], scopes: ['ingest'] },
    ],
    users: [{ username: 'alice', password: 'file:./alice.pw', scopes: ['ingest'] }],
    ...over,
  };
  const file = path.join(dir, 'cloud.yaml');
  writeFileSync(file, stringify(doc));
  return parseCloudConfig(stringify(doc), file);
}

export async function startCloud(t: TestLike, over: Record<string, unknown> = {}, existing?: { dir: string; port: number }): Promise<CloudHandle> {
  let dir: string;
  if (existing) dir = existing.dir;
  else {
    dir = mkdtempSync(path.join(tmpdir(), 'ec-cloud-'));
    t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  }
  const cfg = cloudConfig(dir, existing ? { ...over, listen: { host: '127.0.0.1', port: existing.port } } : over);
  const server = new CloudServer(cfg, silentLogger());
  let stopped = false;
  const stop = async (): Promise<void> => {
    if (stopped) return;
    stopped = true;
    await server.close();
  };
  t.teardown(stop);
  await server.start();
  const { readFileSync } = await import('node:fs');
  const h: CloudHandle = {
    server,
    cfg,
    dir,
    port: server.port,
    ca: readFileSync(server.caFile as string, 'utf8'),
    stop,
    restart: async () => {
      await stop();
      return startCloud(t, over, { dir, port: h.port });
    },
  };
  return h;
}

export function httpsRequest(
  c: Pick<CloudHandle, 'port' | 'ca'>,
  method: string,
  pathname: string,
  headers: Record<string, string>,
  body?: string,
): Promise<{ status: number; headers: Record<string, string | string[] | undefined>; json: Record<string, unknown> }> {
  return new Promise((resolve, reject) => {
    const req = https.request({ host: '127.0.0.1', port: c.port, method, path: pathname, headers, ca: c.ca, agent: false }, (res) => {
      const parts: Buffer[] = [];
      res.on('data', (d: Buffer) => parts.push(d));
      res.on('end', () => {
        let json: Record<string, unknown> = {};
        try {
          json = JSON.parse(Buffer.concat(parts).toString('utf8')) as Record<string, unknown>;
        } catch {
          // not JSON
        }
        resolve({ status: res.statusCode ?? 0, headers: res.headers, json });
      });
    });
    req.on('error', reject);
    req.end(body);
  });
}

export function tokenRequest(c: Pick<CloudHandle, 'port' | 'ca'>, form: Record<string, string>, basic?: [string, string]) {
  const body = new URLSearchParams(form).toString();
  const headers: Record<string, string> = { 'content-type': 'application/x-www-form-urlencoded' };
  if (basic) headers.authorization = 'Basic ' + Buffer.from(`${encodeURIComponent(basic[0])}:${encodeURIComponent(basic[1])}`).toString('base64');
  return httpsRequest(c, 'POST', '/oauth/token', headers, body);
}

export async function getToken(c: Pick<CloudHandle, 'port' | 'ca'>, scope = 'ingest subscribe commands', clientId = 'gw-client'): Promise<string> {
  const r = await tokenRequest(c, { grant_type: 'client_credentials', client_id: clientId, client_secret: SECRET, scope });
  if (r.status !== 200) throw new Error(`token: ${r.status} ${JSON.stringify(r.json)}`);
  return r.json.access_token as string;
}

export interface Closed {
  code: number;
  reason: string;
}

/** A minimal gateway: WSS to /ingest, frames in a queue, awaitable. */
export class TestGateway {
  readonly frames: Frame[] = [];
  private waiters: { pred: (f: Frame) => boolean; resolve: (f: Frame) => void; reject: (e: Error) => void; timer: NodeJS.Timeout }[] = [];
  readonly closed: Promise<Closed>;
  readonly opened: Promise<void>;
  /** HTTP status when the upgrade was refused. */
  readonly refused: Promise<number>;
  /** Answer PINGs (default true; false simulates a silent peer). */
  autoPong = true;
  /** Last position sent, the id at each position, and positions REJECTed (not covered by a later upto). */
  lastPos = 0;
  private readonly idAt = new Map<number, string>();
  private ackedUpto = 0;
  private constructor(readonly ws: WebSocket) {
    this.opened = new Promise((resolve, reject) => {
      ws.once('open', () => resolve());
      ws.once('error', reject);
    });
    this.opened.catch(() => undefined);
    this.refused = new Promise((resolve) => ws.once('unexpected-response', (_req, res) => resolve(res.statusCode ?? 0)));
    this.closed = new Promise((resolve) => ws.once('close', (code, reason) => resolve({ code, reason: reason.toString() })));
    ws.on('error', () => undefined);
    ws.on('message', (data, isBinary) => {
      if (!isBinary) return;
      const v2 = decodeFrameV2(data as Buffer);
      if (v2.type === 'BATCH') return;
      let f: Frame;
      if (v2.type === 'ACK') {
        const ids = [...v2.ids];
        // acknowledged by id (a resend recognised early): its position is not reported again
        for (const [p, id] of this.idAt) if (v2.ids.includes(id)) this.idAt.delete(p);
        if (v2.upto !== undefined) {
          for (let p = this.ackedUpto + 1; p <= v2.upto; p++) {
            const id = this.idAt.get(p);
            this.idAt.delete(p);
            if (id !== undefined) ids.push(id);
          }
          this.ackedUpto = Math.max(this.ackedUpto, v2.upto);
        }
        f = v2.progress ? { type: 'ACK', ids, progress: v2.progress } : { type: 'ACK', ids };
      } else if (v2.type === 'DISCARD') return; // the cloud never sends it (a client-only frame)
      else f = v2;
      if (f.type === 'REJECT') {
        // positions of the rejected message sent so far are not acknowledged by a later upto
        for (const [p, id] of this.idAt) if (id === f.id) this.idAt.delete(p);
      }
      if (f.type === 'PING' && this.autoPong) {
        this.send({ type: 'PONG', t: f.t, t_reply: Date.now() });
      }
      const i = this.waiters.findIndex((w) => w.pred(f));
      if (i >= 0) {
        const [w] = this.waiters.splice(i, 1);
        clearTimeout(w!.timer);
        w!.resolve(f);
      } else this.frames.push(f);
    });
  }

  static connect(c: Pick<CloudHandle, 'port' | 'ca'>, opts: { token?: string; protocol?: string | string[] | null; headers?: Record<string, string>; path?: string } = {}): TestGateway {
    const headers: Record<string, string> = { ...(opts.headers ?? {}) };
    if (opts.token) headers.authorization = `Bearer ${opts.token}`;
    const protocols = opts.protocol === null ? [] : Array.isArray(opts.protocol) ? opts.protocol : [opts.protocol ?? SUBPROTOCOL_V2];
    const ws = new WebSocket(`wss://127.0.0.1:${c.port}${opts.path ?? '/ingest'}`, protocols, { ca: c.ca, headers, perMessageDeflate: false });
    return new TestGateway(ws);
  }

  /** Connect, HELLO, and wait for WELCOME. */
  static async open(c: Pick<CloudHandle, 'port' | 'ca'>, token: string, hello: Partial<HelloFrame> = {}): Promise<{ gw: TestGateway; welcome: Extract<Frame, { type: 'WELCOME' }> }> {
    const gw = TestGateway.connect(c, { token });
    await gw.opened;
    gw.send({ type: 'HELLO', version: 2, gateway_id: 'gw-1', ...hello });
    const welcome = (await gw.next('WELCOME')) as Extract<Frame, { type: 'WELCOME' }>;
    return { gw, welcome };
  }

  /** Send a frame; a CHUNK goes out as a BATCH of one (with the next position when it is a last chunk). */
  send(f: Frame | FrameV2): void {
    if (f.type === 'CHUNK') return this.sendBatch([f]);
    this.sendRaw(encodeFrameV2(f as FrameV2));
  }

  /** Several chunks in one BATCH frame. */
  sendBatch(chunks: ChunkFrame[]): void {
    this.sendRaw(encodeBatch(chunks.map((c) => encodeBatchChunk(this.toBatchChunk(c)))));
  }

  /** A v1-shaped chunk as a v2 BATCH entry: one digest for a single-chunk message, a position on a last chunk. */
  toBatchChunk(c: ChunkFrame): BatchChunk {
    const last = c.offset + c.data.length === c.total;
    const b: BatchChunk = { id: c.id, seq: c.seq, offset: c.offset, total: c.total, data: c.data };
    if (!(c.seq === 0 && last)) b.chunk_sha256 = c.chunk_sha256;
    if (c.meta) b.meta = c.meta;
    if (last) {
      b.payload_sha256 = c.payload_sha256 as Buffer;
      b.pos = ++this.lastPos;
      this.idAt.set(b.pos, c.id);
    }
    return b;
  }

  sendRaw(buf: Buffer | string): void {
    if (this.ws.readyState === this.ws.OPEN) this.ws.send(buf, { binary: typeof buf !== 'string' });
  }

  /** The next frame of a type (or matching a predicate), skipping PINGs unless asked for. */
  next<T extends FrameTypeName>(type?: T, pred: (f: Extract<Frame, { type: T }>) => boolean = () => true, timeoutMs = 15000): Promise<Extract<Frame, { type: T }>> {
    const match = (f: Frame): boolean => (type ? f.type === type && pred(f as Extract<Frame, { type: T }>) : f.type !== 'PING' && f.type !== 'PONG');
    const i = this.frames.findIndex(match);
    if (i >= 0) return Promise.resolve(this.frames.splice(i, 1)[0] as Extract<Frame, { type: T }>);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiters = this.waiters.filter((w) => w.timer !== timer);
        reject(new Error(`no ${type ?? 'frame'} within ${timeoutMs} ms; got ${this.frames.map((f) => f.type).join(',')}`));
      }, timeoutMs);
      this.waiters.push({ pred: match, resolve: resolve as (f: Frame) => void, reject, timer });
    });
  }

  close(): void {
    this.ws.close(1000);
  }
}
