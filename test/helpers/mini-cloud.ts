/**
 * A small, controllable cloud for the uplink unit tests: a real HTTPS server
 * (certificate from a TestCA) with an OAuth2 token endpoint and the WSS ingest
 * of docs/PROTOCOL.md (version 2), built on the real codec (protocol/v2.ts). Each knob
 * lets a test make the cloud misbehave in one precise way (withhold ACKs, drop
 * the link mid-message, reject, go silent, send garbage) — things the
 * reference cloud (cloud/) is not meant to do on purpose. The
 * end-to-end tests use the reference cloud.
 */
import https from 'node:https';
import { createHash } from 'node:crypto';
import { SIGNATURE_HEADER, verifySignature } from '../../protocol/signature.js';
import { writeFileSync } from 'node:fs';
import path from 'node:path';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { WebSocketServer, WebSocket } from 'ws';
import { TestCA } from './certs.js';
import { tempDir, type TestLike } from './daemon.js';
import { sha256, digestEquals, type Frame, type ChunkFrame, type MessageMeta } from '../../protocol/codec.js';
import { AckFrontier, SUBPROTOCOL_V2, decodeFrameV2, encodeFrameV2, toChunkFrame, type FrameV2 } from '../../protocol/v2.js';

/** A frame as the mini cloud records it: BATCH frames are unpacked into their chunks (as CHUNK, with the position of a last chunk). */
export type SeenFrame = Exclude<Frame, { type: 'CHUNK' }> | (ChunkFrame & { pos?: number });

export interface Stored {
  id: string;
  meta: MessageMeta;
  payload: Buffer;
  sha256: string;
}

interface Partial {
  meta: MessageMeta;
  total: number;
  offset: number;
  nextSeq: number;
  parts: Buffer[];
  hash: ReturnType<typeof createHash>;
  sinceProgress: number;
}

export interface CloudConn {
  ws: WebSocket;
  n: number;
  token: string;
  headers: IncomingMessage['headers'];
  send(f: FrameV2): void;
  /** Frames received on this connection, BATCH frames unpacked into CHUNKs (CHUNK data not kept). */
  frames: SeenFrame[];
  /** BATCH frames received (WebSocket messages carrying data). */
  batches: number;
  /** Cumulative acknowledgement state of this connection. */
  frontier: AckFrontier;
}

export interface MiniCloudOptions {
  tokenTtlS?: number;
  /** Refuse the upgrade with this HTTP status (and Retry-After seconds). */
  refuseUpgrade?: { status: number; retryAfterS?: number } | undefined;
  /** Do not send ACKs (a stuck cloud). */
  withholdAcks?: boolean;
  /** Send progress ACKs every this many bytes of a message in progress (0 = never). */
  progressEvery?: number;
  /** Answer TOKEN with TOKEN_REJECTED. */
  rejectInBandToken?: boolean;
  /** Require this X-Signature secret on the upgrade. */
  signingSecret?: string;
  /** Heartbeat interval announced and used by the cloud (0 = the cloud never pings). */
  heartbeatMs?: number;
  maxChunkBytes?: number;
  /** Called for every frame received after HELLO; return true to suppress default handling. */
  onFrame?: (c: CloudConn, f: SeenFrame) => boolean | void;
  /** Called right after WELCOME. */
  onWelcome?: (c: CloudConn) => void;
  /** Require a client certificate from this CA (mTLS). */
  clientCa?: string;
  /** Highest TLS version the server speaks. */
  maxTlsVersion?: 'TLSv1.2' | 'TLSv1.3';
  /** The cloud's clock minus the real one (ms): shifts token expiries and PING/PONG times, like a cloud whose clock is off. */
  clockOffsetMs?: number;
}

export class MiniCloud {
  port = 0;
  caFile = '';
  ca!: TestCA;
  readonly stored = new Map<string, Stored>();
  /** Ids in the order they were stored (first time only). */
  readonly order: string[] = [];
  /** Every id whose last chunk completed, duplicates included. */
  readonly completions: string[] = [];
  readonly partials = new Map<string, Partial>();
  readonly conns: CloudConn[] = [];
  readonly tokenRequests: URLSearchParams[] = [];
  readonly tokens = new Map<string, number>();
  readonly upgradeHeaders: IncomingMessage['headers'][] = [];
  /** When each upgrade request arrived (Date.now()). */
  readonly upgradeTimes: number[] = [];
  readonly opts: MiniCloudOptions;
  private server!: https.Server;
  private wss!: WebSocketServer;
  private tokenSeq = 0;
  private waiters: Array<{ check: () => boolean; resolve: () => void }> = [];

  constructor(opts: MiniCloudOptions = {}) {
    this.opts = opts;
  }

  static async start(t: TestLike, opts: MiniCloudOptions = {}, port = 0): Promise<MiniCloud> {
    const c = new MiniCloud(opts);
    await c.listen(t, port);
    return c;
  }

  async listen(t: TestLike, port = 0, ca?: TestCA): Promise<void> {
    this.ca = ca ?? (await TestCA.create());
    const srv = await this.ca.server();
    const dir = tempDir(t);
    this.caFile = path.join(dir, 'cloud-ca.pem');
    writeFileSync(this.caFile, this.ca.cert);
    this.server = https.createServer(
      {
        cert: srv.cert,
        key: srv.key,
        minVersion: 'TLSv1.2',
        ...(this.opts.maxTlsVersion ? { maxVersion: this.opts.maxTlsVersion } : {}),
        ...(this.opts.clientCa ? { ca: this.opts.clientCa, requestCert: true, rejectUnauthorized: true } : {}),
      },
      (req, res) => this.http(req, res),
    );
    this.wss = new WebSocketServer({
      noServer: true,
      maxPayload: 17 * 1024 * 1024,
      handleProtocols: (set) => (set.has(SUBPROTOCOL_V2) ? SUBPROTOCOL_V2 : false),
    });
    this.server.on('upgrade', (req, socket, head) => {
      this.upgradeHeaders.push(req.headers);
      this.upgradeTimes.push(Date.now());
      const refuse = (status: number, extra = ''): void => {
        socket.end(`HTTP/1.1 ${status} Refused\r\nConnection: close\r\nContent-Length: 0\r\n${extra}\r\n`);
      };
      if (this.opts.refuseUpgrade) {
        const ra = this.opts.refuseUpgrade.retryAfterS;
        return refuse(this.opts.refuseUpgrade.status, ra !== undefined ? `Retry-After: ${ra}\r\n` : '');
      }
      const auth = req.headers.authorization ?? '';
      const token = auth.startsWith('Bearer ') ? auth.slice(7) : '';
      const exp = this.tokens.get(token);
      if (!exp || exp < Date.now()) return refuse(401);
      if (this.opts.signingSecret && !this.checkSignature(req)) return refuse(401);
      this.wss.handleUpgrade(req, socket, head, (ws) => this.onConnection(ws, token, req));
    });
    await new Promise<void>((resolve) => this.server.listen(port, '127.0.0.1', resolve));
    this.port = (this.server.address() as { port: number }).port;
    t.teardown(() => this.stop());
  }

  get url(): string {
    return `wss://127.0.0.1:${this.port}/ingest`;
  }
  get tokenUrl(): string {
    return `https://127.0.0.1:${this.port}/oauth/token`;
  }

  /** Close everything (like a crash: connections are cut, partials kept in memory). */
  async stop(): Promise<void> {
    for (const c of this.conns) c.ws.terminate();
    this.wss?.close();
    if (this.server?.listening) {
      this.server.closeAllConnections();
      await new Promise<void>((resolve) => this.server.close(() => resolve()));
    }
  }

  /** Wait (bounded) until cond() holds; re-checked on every cloud event and every 20 ms. */
  async until(cond: () => boolean, what: string, ms = 10_000): Promise<void> {
    const end = Date.now() + ms;
    while (!cond()) {
      if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what} (stored ${this.order.length}, conns ${this.conns.length})`);
      await new Promise<void>((resolve) => {
        const w = { check: cond, resolve };
        this.waiters.push(w);
        setTimeout(() => {
          this.waiters = this.waiters.filter((x) => x !== w);
          resolve();
        }, 20);
      });
    }
  }

  private notify(): void {
    const ws = this.waiters;
    this.waiters = [];
    for (const w of ws) w.resolve();
  }

  private checkSignature(req: IncomingMessage): boolean {
    const h = req.headers[SIGNATURE_HEADER];
    return verifySignature(typeof h === 'string' ? h : undefined, this.opts.signingSecret!, 'GET', req.url ?? '/');
  }

  private http(req: IncomingMessage, res: ServerResponse): void {
    let body = '';
    req.setEncoding('utf8');
    req.on('data', (d: string) => (body += d));
    req.on('end', () => {
      if (req.url !== '/oauth/token' || req.method !== 'POST') {
        res.writeHead(404).end();
        return;
      }
      const p = new URLSearchParams(body);
      this.tokenRequests.push(p);
      const token = `tok-${++this.tokenSeq}-${Date.now()}`;
      const ttl = this.opts.tokenTtlS ?? 3600;
      this.tokens.set(token, Date.now() + ttl * 1000);
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ access_token: token, token_type: 'Bearer', expires_in: ttl, refresh_token: `rt-${this.tokenSeq}` }));
      this.notify();
    });
  }

  private onConnection(ws: WebSocket, token: string, req: IncomingMessage): void {
    const c: CloudConn = {
      ws,
      n: this.conns.length + 1,
      token,
      headers: req.headers,
      frames: [],
      batches: 0,
      frontier: new AckFrontier(),
      send: (f) => {
        if (ws.readyState === WebSocket.OPEN) ws.send(encodeFrameV2(f));
      },
    };
    this.conns.push(c);
    let welcomed = false;
    let pinger: NodeJS.Timeout | undefined;
    ws.on('close', () => {
      if (pinger) clearInterval(pinger);
      this.notify();
    });
    ws.on('error', () => undefined);
    ws.on('message', (data: Buffer, isBinary: boolean) => {
      if (!isBinary) return ws.close(1003);
      let f: FrameV2;
      try {
        f = decodeFrameV2(data);
      } catch {
        ws.close(1002);
        return;
      }
      if (f.type === 'BATCH') {
        c.batches++;
        if (!welcomed) return ws.close(1002);
        for (const bc of f.chunks) {
          const chunk: ChunkFrame & { pos?: number } = toChunkFrame(bc);
          if (bc.pos !== undefined) {
            chunk.pos = bc.pos;
            try {
              c.frontier.expect(bc.pos, bc.id);
            } catch {
              ws.close(1002);
              return;
            }
          }
          c.frames.push({ ...chunk, data: Buffer.alloc(0) });
          // a chunk the test handled (suppressed) is settled without an ACK of its own: the next ACK covers it
          if (this.opts.onFrame?.(c, chunk)) {
            if (chunk.pos !== undefined) c.frontier.settle(chunk.pos);
            continue;
          }
          this.chunk(c, chunk);
        }
        this.notify();
        return;
      }
      c.frames.push(f as SeenFrame);
      if (!welcomed) {
        if (f.type !== 'HELLO') return ws.close(1002);
        welcomed = true;
        const hb = this.opts.heartbeatMs ?? 1000;
        c.send({
          type: 'WELCOME',
          version: 2,
          session_id: `s${c.n}`,
          max_frame_bytes: 17 * 1024 * 1024,
          max_chunk_bytes: this.opts.maxChunkBytes ?? 16 * 1024 * 1024,
          max_message_bytes: 1024 * 1024 * 1024,
          max_partials: 64,
          heartbeat_ms: hb || 1000,
          token_expires_at: (this.tokens.get(token) ?? 0) + (this.opts.clockOffsetMs ?? 0),
          partials: [...this.partials.entries()].filter(([, p]) => p.offset > 0).map(([id, p]) => ({ id, offset: p.offset, next_seq: p.nextSeq, total: p.total })),
        });
        if (hb) pinger = setInterval(() => c.send({ type: 'PING', t: Date.now() + (this.opts.clockOffsetMs ?? 0) }), hb);
        this.opts.onWelcome?.(c);
        this.notify();
        return;
      }
      if (this.opts.onFrame?.(c, f as SeenFrame)) return;
      this.handle(c, f);
      this.notify();
    });
  }

  /** Settle a message's position and acknowledge cumulatively (everything up to the frontier). */
  private settleAndAck(c: CloudConn, f: ChunkFrame & { pos?: number }): void {
    if (f.pos === undefined) return;
    c.frontier.settle(f.pos);
    if (!this.opts.withholdAcks) c.send({ type: 'ACK', upto: c.frontier.upto, ids: [] });
  }

  private handle(c: CloudConn, f: FrameV2): void {
    switch (f.type) {
      case 'PING':
        return c.send({ type: 'PONG', t: f.t, t_reply: Date.now() + (this.opts.clockOffsetMs ?? 0) });
      case 'TOKEN': {
        const exp = this.tokens.get(f.access_token);
        const off = this.opts.clockOffsetMs ?? 0;
        if (this.opts.rejectInBandToken || !exp) return c.send({ type: 'TOKEN_REJECTED', reason: 'refused', expires_at: (this.tokens.get(c.token) ?? 0) + off });
        c.token = f.access_token;
        return c.send({ type: 'TOKEN_OK', expires_at: exp + off });
      }
      case 'QUERY':
        return c.send({
          type: 'QUERY_RESULT',
          entries: f.ids.map((id) => {
            if (this.stored.has(id)) return { id, status: 'stored' as const };
            const p = this.partials.get(id);
            return p ? { id, status: 'partial' as const, offset: p.offset, next_seq: p.nextSeq, total: p.total } : { id, status: 'unknown' as const };
          }),
        });
      default:
        return;
    }
  }

  private chunk(c: CloudConn, f: ChunkFrame & { pos?: number }): void {
    if (!digestEquals(sha256(f.data), f.chunk_sha256)) {
      c.send({ type: 'REJECT', id: f.id, kind: 'retry', reason: 'chunk digest' });
      if (f.pos !== undefined) c.frontier.settle(f.pos);
      return;
    }
    let p = this.partials.get(f.id);
    if (f.seq === 0) {
      if (this.stored.has(f.id)) {
        // duplicate of a stored message: acknowledge again (by position when this is its last chunk), store nothing
        this.completions.push(f.id);
        if (f.pos !== undefined) this.settleAndAck(c, f);
        else if (!this.opts.withholdAcks) c.send({ type: 'ACK', ids: [f.id] });
        return;
      }
      p = { meta: f.meta!, total: f.total, offset: 0, nextSeq: 0, parts: [], hash: createHash('sha256'), sinceProgress: 0 };
      this.partials.set(f.id, p);
    }
    if (!p || f.seq !== p.nextSeq || f.offset !== p.offset) {
      c.send({ type: 'ERROR', code: 'out_of_order', message: `chunk ${f.seq} at ${f.offset} of ${f.id}`, fatal: true, id: f.id });
      c.ws.close(1002);
      return;
    }
    p.parts.push(Buffer.from(f.data));
    p.hash.update(f.data);
    p.offset += f.data.length;
    p.nextSeq++;
    p.sinceProgress += f.data.length;
    if (p.offset < p.total) {
      if (this.opts.progressEvery && p.sinceProgress >= this.opts.progressEvery && !this.opts.withholdAcks) {
        p.sinceProgress = 0;
        c.send({ type: 'ACK', ids: [], progress: [{ id: f.id, offset: p.offset, next_seq: p.nextSeq }] });
      }
      return;
    }
    this.partials.delete(f.id);
    const digest = p.hash.digest();
    if (!f.payload_sha256 || !digestEquals(digest, f.payload_sha256)) {
      c.send({ type: 'REJECT', id: f.id, kind: 'permanent', reason: 'payload digest' });
      if (f.pos !== undefined) c.frontier.settle(f.pos);
      return;
    }
    const payload = Buffer.concat(p.parts);
    this.completions.push(f.id);
    if (!this.stored.has(f.id)) {
      this.stored.set(f.id, { id: f.id, meta: p.meta, payload, sha256: digest.toString('hex') });
      this.order.push(f.id);
    }
    this.settleAndAck(c, f);
  }

  /** Acknowledge everything stored (after withholding). */
  ackAll(c: CloudConn): void {
    c.send({ type: 'ACK', ids: [...this.stored.keys()] });
  }
}
