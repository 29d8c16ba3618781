/**
 * The cloud end of one uplink connection (WSS /ingest, protocol version 2 —
 * version 1 is refused, see server.ts): HELLO/WELCOME with the
 * partial messages held, chunk reassembly straight to disk with digests
 * checked, durable store BEFORE ACK, duplicate suppression by message id,
 * REJECT (permanent / retry) for bad messages, heartbeats, in-band token
 * refresh and expiry (close 4001), and downstream COMMANDs.
 *
 * Frames of one connection are handled strictly in order (one async queue);
 * the socket is paused while too many bytes wait, which pushes back on the
 * sender through TCP. A complete message is handed to the store's group commit
 * without holding up the queue (its ACK is sent when it is durable), so the
 * messages of one connection share fsync rounds. Order per device across a
 * retry-REJECT: see `blocked`.
 *
 * Acknowledgement (v2): every message's last chunk carries a position; the
 * session settles it when the message is stored (durable), recognised as a
 * duplicate, ignored after a REJECT, or REJECTed — and sends ONE cumulative
 * ACK `{upto}` per turn of the event loop for everything settled, always after
 * the REJECTs it covers.
 *
 * HELLO's gateway_id is bound to the authenticated client (GatewayBindings):
 * a client may only use the gateway ids its configuration allows, and never
 * one already bound to another client; a mismatch is refused with close 4007.
 */
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import type { WebSocket, RawData } from 'ws';
import { writeAtomic } from '../core/fs.js';
import { STREAM_RECLAIM_EVERY_BYTES, reclaimer } from '../core/reclaim.js';
import type { Logger } from '../core/logger.js';
import { RequestError } from '../core/errors.js';
import { CLOSE_CODES, MessageAssembly, WireError, errorFrameFor, type ChunkFrame, type HelloFrame, type QueryEntry } from '../protocol/codec.js';
import { AckFrontier, CLIENT_FRAMES_V2, FEATURE_STREAM, PROTOCOL_VERSION_2, SUBPROTOCOL_V2, decodeFrameV2, encodeFrameV2, toChunkFrame, type FrameV2 } from '../protocol/v2.js';
import type { CloudStore, Partial, StoredEntry } from './store.js';
import type { TokenService, VerifiedToken } from './token-endpoint.js';
import type { CloudConfig } from './config.js';

const PAUSE_ABOVE_BYTES = 64 * 1024 * 1024;
const RESUME_BELOW_BYTES = 16 * 1024 * 1024;
/** Frames handled on every connection: one scavenge per STREAM_RECLAIM_EVERY_BYTES of them (core/reclaim.ts). */
const reclaimFrames = reclaimer(STREAM_RECLAIM_EVERY_BYTES);

export interface IngestContext {
  cfg: CloudConfig;
  store: CloudStore;
  tokens: TokenService;
  registry: GatewayRegistry;
  bindings: GatewayBindings;
  log: Logger;
}

/** Who a token speaks for: the OAuth client, and the resource owner when it is not the client itself. */
export function principalOf(auth: Pick<VerifiedToken, 'clientId' | 'sub'>): string {
  return auth.sub === auth.clientId ? auth.clientId : `${auth.clientId}:${auth.sub}`;
}

/**
 * Which authenticated client may speak for which gateway id. A client whose
 * configuration lists `gateway_ids` may use those only; any client may use a
 * gateway id no other client is bound to. The first use binds the id to the
 * client, durably (store_dir/gateways.json), so a second client can never
 * take over a gateway's connection, partial messages or duplicate scope.
 */
export class GatewayBindings {
  private readonly bound = new Map<string, string>();
  private readonly file: string;
  private saving: Promise<void> = Promise.resolve();

  constructor(
    storeDir: string,
    private readonly cfg: Pick<CloudConfig, 'clients'>,
  ) {
    this.file = path.join(storeDir, 'gateways.json');
  }

  /** Read the bindings made before (a missing file is an empty table; a corrupt one is an error). */
  load(): void {
    let text: string;
    try {
      text = readFileSync(this.file, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
      throw err;
    }
    const data = JSON.parse(text) as unknown;
    if (typeof data !== 'object' || data === null || Array.isArray(data)) throw new Error(`${this.file}: not a JSON object`);
    for (const [gw, who] of Object.entries(data)) if (typeof who === 'string') this.bound.set(gw, who);
  }

  /** Why `principal` (of OAuth client `clientId`) may not use `gatewayId`, or undefined when it may (and is now bound). */
  async bind(gatewayId: string, clientId: string, principal: string): Promise<string | undefined> {
    const allowed = this.cfg.clients.find((c) => c.id === clientId)?.gateway_ids ?? [];
    if (allowed.length > 0 && !allowed.includes(gatewayId)) return `client ${clientId} may use gateway ids ${allowed.slice(0, 8).join(', ')}${allowed.length > 8 ? ', …' : ''} only`;
    const owner = this.bound.get(gatewayId);
    if (owner !== undefined && owner !== principal) return `gateway id ${gatewayId} belongs to another client`;
    if (owner === undefined) {
      this.bound.set(gatewayId, principal);
      const snapshot = JSON.stringify(Object.fromEntries(this.bound));
      this.saving = this.saving.then(() => writeAtomic(this.file, snapshot, 0o600));
      await this.saving;
    }
    return undefined;
  }
}

/** Connected gateways by id, and which gateway last forwarded each device (for commands). */
export class GatewayRegistry {
  readonly sessions = new Map<string, IngestSession>();
  private readonly deviceGateway = new Map<string, string>();

  noteDevice(deviceId: string, gatewayId: string): void {
    if (this.deviceGateway.size > 100_000 && !this.deviceGateway.has(deviceId)) this.deviceGateway.clear();
    this.deviceGateway.set(deviceId, gatewayId);
  }

  /** The session a command for this device goes to. */
  route(deviceId: string, gatewayId?: string): IngestSession | undefined {
    if (gatewayId) return this.sessions.get(gatewayId);
    const gw = this.deviceGateway.get(deviceId);
    const viaDevice = gw ? this.sessions.get(gw) : undefined;
    if (viaDevice) return viaDevice;
    if (this.sessions.size === 1) return this.sessions.values().next().value;
    return undefined;
  }
}

interface PendingCommand {
  resolve: (r: { delivered: boolean; reason?: string }) => void;
  reject: (e: Error) => void;
  timer: NodeJS.Timeout;
}

export class IngestSession {
  readonly sessionId = randomBytes(8).toString('hex');
  gatewayId: string | undefined;
  private state: 'hello' | 'open' | 'closed' = 'hello';
  private chain: Promise<void> = Promise.resolve();
  private queuedBytes = 0;
  private paused = false;
  private lastSeen = Date.now();
  private tokenExpiresAt: number;
  private readonly timers: NodeJS.Timeout[] = [];
  private tokenTimer?: NodeJS.Timeout;
  private heartbeat?: NodeJS.Timeout;
  private deadAfterMs: number;
  /** HELLO offered the `stream` feature (§13.10) and WELCOME confirmed it: DISCARD is allowed. */
  private streamFeature = false;
  /** Messages REJECTed on this connection: chunks are ignored until the client restarts them. */
  private readonly rejected = new Map<string, { offset: number; nextSeq: number }>();
  /** Stored ids already re-acknowledged on this connection (duplicates of a resend). */
  private readonly dupAcked = new Set<string>();
  private readonly touched = new Set<Partial>();
  /**
   * Order per device: device id → the message of it REJECTed for retry on this connection.
   * Until that message is complete and queued for commit ahead of them (or rejected
   * permanently), every later message of the device is REJECTed for retry too, so none is
   * stored before it. If its commit fails, the device is blocked again (store onFail).
   */
  private readonly blocked = new Map<string, string>();
  /** Commits in flight (group commit: the frame queue does not wait for them; close does). */
  private readonly inflight = new Set<Promise<unknown>>();
  /** Positions of this connection: settled when stored / duplicate / ignored / REJECTed; ACKed cumulatively. */
  private readonly frontier = new AckFrontier();
  private ackedUpto = 0;
  private ackQueued = false;
  /** The position of the chunk being handled, and whether a commit took it over (it settles it when done). */
  private currentPos: number | undefined;
  private posClaimed = false;
  private readonly commands = new Map<string, PendingCommand>();
  private finishedResolve!: () => void;
  /** Resolves when the connection is closed and every frame it received has been handled. */
  readonly finished = new Promise<void>((r) => (this.finishedResolve = r));
  private readonly log: Logger;

  constructor(
    private readonly ws: WebSocket,
    private readonly ctx: IngestContext,
    private auth: VerifiedToken,
    remote: string,
  ) {
    this.log = ctx.log.child({ session: this.sessionId, remote, client: auth.clientId });
    this.tokenExpiresAt = auth.expiresAt;
    this.deadAfterMs = 3 * ctx.cfg.heartbeat_ms;
  }

  start(): void {
    const { ws, ctx } = this;
    this.timers.push(
      setTimeout(() => {
        if (this.state === 'hello') this.close(CLOSE_CODES.HELLO_TIMEOUT, 'no HELLO in time');
      }, ctx.cfg.hello_timeout_ms),
    );
    this.armTokenTimer();
    this.heartbeat = setInterval(() => this.tick(), ctx.cfg.heartbeat_ms);
    ws.on('message', (data: RawData, isBinary: boolean) => this.onMessage(data, isBinary));
    ws.on('close', (code, reason) => void this.onClose(code, reason.toString()));
    ws.on('error', (err) => this.log.info({ err: err.message }, 'ingest socket error'));
    this.log.info('ingest connection open');
  }

  private isClosed(): boolean {
    return this.state === 'closed';
  }

  private tick(): void {
    // before WELCOME the hello timeout applies, and the client may send nothing but HELLO
    if (this.state !== 'open') return;
    if (Date.now() - this.lastSeen > this.deadAfterMs) {
      this.log.warn({ silent_ms: Date.now() - this.lastSeen }, 'ingest link dead: no frame within the heartbeat timeout');
      this.close(CLOSE_CODES.HEARTBEAT_TIMEOUT, 'heartbeat timeout');
      return;
    }
    this.send({ type: 'PING', t: Date.now() });
  }

  private armTokenTimer(): void {
    if (this.tokenTimer) clearTimeout(this.tokenTimer);
    const ms = Math.max(0, this.tokenExpiresAt - Date.now());
    this.tokenTimer = setTimeout(() => {
      this.log.info('access token expired on the live connection: closing');
      this.close(CLOSE_CODES.TOKEN_EXPIRED, 'access token expired');
    }, Math.min(ms, 2 ** 31 - 1));
  }

  private onMessage(data: RawData, isBinary: boolean): void {
    this.lastSeen = Date.now();
    if (this.state === 'closed') return;
    if (!isBinary) {
      this.log.warn('text frame on ingest: closing');
      this.close(CLOSE_CODES.UNSUPPORTED_DATA, 'binary frames only');
      return;
    }
    const buf = Array.isArray(data) ? Buffer.concat(data) : Buffer.isBuffer(data) ? data : Buffer.from(data);
    this.queuedBytes += buf.length;
    if (!this.paused && this.queuedBytes > PAUSE_ABOVE_BYTES) {
      this.paused = true;
      this.ws.pause();
    }
    this.chain = this.chain
      .then(() => this.onFrame(buf))
      .catch((err: unknown) => {
        this.log.error({ err }, 'ingest: internal error');
        this.sendError(new WireError('internal', 'internal error'), true);
        this.close(CLOSE_CODES.INTERNAL_ERROR, 'internal error');
      })
      .finally(() => {
        this.queuedBytes -= buf.length;
        // the frame (and the TLS reads it was gathered from) is garbage now: reclaimed by a scavenge every
        // few MiB instead of piling up outside the heap until V8 runs a full collection (core/reclaim.ts)
        reclaimFrames(buf.length);
        this.lastSeen = Math.max(this.lastSeen, Date.now());
        if (this.paused && this.queuedBytes < RESUME_BELOW_BYTES) {
          this.paused = false;
          this.ws.resume();
        }
      });
  }

  private async onFrame(buf: Buffer): Promise<void> {
    if (this.state === 'closed') return;
    let frame: FrameV2;
    try {
      frame = decodeFrameV2(buf, { maxChunkBytes: this.ctx.cfg.max_chunk_bytes, maxFrameBytes: maxFrameBytes(this.ctx.cfg) });
    } catch (err) {
      if (err instanceof WireError) return this.protocolViolation(err);
      throw err;
    }
    if (!CLIENT_FRAMES_V2.has(frame.type)) return this.protocolViolation(new WireError('unexpected', `${frame.type} is sent by the cloud, not the connector`));
    if (this.state === 'hello') {
      if (frame.type !== 'HELLO') return this.protocolViolation(new WireError('unexpected', `first frame must be HELLO, got ${frame.type}`));
      return this.onHello(frame);
    }
    switch (frame.type) {
      case 'HELLO':
        return this.protocolViolation(new WireError('unexpected', 'HELLO twice'));
      case 'BATCH':
        for (const c of frame.chunks) {
          if (this.isClosed()) return;
          if (c.pos !== undefined) {
            try {
              this.frontier.expect(c.pos, c.id);
            } catch (err) {
              return this.protocolViolation(err as WireError);
            }
          }
          this.currentPos = c.pos;
          this.posClaimed = false;
          await this.onChunk(toChunkFrame(c));
          if (c.pos !== undefined && !this.posClaimed) this.settle(c.pos);
        }
        this.currentPos = undefined;
        return;
      case 'PING':
        this.send({ type: 'PONG', t: frame.t, t_reply: Date.now() });
        return;
      case 'PONG':
        return;
      case 'TOKEN':
        return this.onToken(frame.access_token);
      case 'COMMAND_RESULT': {
        const p = this.commands.get(frame.id);
        if (!p) {
          this.log.info({ command: frame.id }, 'COMMAND_RESULT for an unknown or timed-out command');
          return;
        }
        this.commands.delete(frame.id);
        clearTimeout(p.timer);
        p.resolve(frame.reason !== undefined ? { delivered: frame.delivered, reason: frame.reason } : { delivered: frame.delivered });
        return;
      }
      case 'QUERY': {
        const gw = this.gatewayId as string;
        const entries: QueryEntry[] = await Promise.all(frame.ids.map(async (id): Promise<QueryEntry> => {
          if (await this.ctx.store.isStored(gw, id)) return { id, status: 'stored' };
          const p = this.ctx.store.getPartial(id);
          if (p && p.gatewayId === this.gatewayId && p.durableOffset > 0) return { id, status: 'partial', offset: p.durableOffset, next_seq: p.durableNextSeq, total: p.total };
          return { id, status: 'unknown' };
        }));
        this.send({ type: 'QUERY_RESULT', entries });
        return;
      }
      case 'DISCARD':
        if (!this.streamFeature) return this.protocolViolation(new WireError('unexpected', 'DISCARD without the "stream" feature (HELLO features)', frame.id));
        return this.onDiscard(frame.id);
      case 'ERROR':
        this.log.warn({ code: frame.code, message: frame.message, fatal: frame.fatal }, 'connector reported a protocol error');
        if (frame.fatal) this.close(CLOSE_CODES.PROTOCOL_ERROR, 'peer reported a fatal error');
        return;
    }
  }

  private async onHello(h: HelloFrame): Promise<void> {
    if (h.version !== PROTOCOL_VERSION_2) {
      this.sendError(new WireError('unsupported_version', `protocol version ${h.version} is not supported; this cloud speaks ${PROTOCOL_VERSION_2} (${SUBPROTOCOL_V2})`), true);
      this.close(CLOSE_CODES.UNSUPPORTED_VERSION, `unsupported version ${h.version}; supported: ${PROTOCOL_VERSION_2} (${SUBPROTOCOL_V2})`);
      return;
    }
    const refused = await this.ctx.bindings.bind(h.gateway_id, this.auth.clientId, principalOf(this.auth));
    if (refused !== undefined) {
      this.log.warn({ gateway: h.gateway_id, client: this.auth.clientId, sub: this.auth.sub }, `HELLO refused: ${refused}`);
      this.sendError(new WireError('unexpected', `gateway_id refused: ${refused}`), true);
      this.close(CLOSE_CODES.GATEWAY_REFUSED, `gateway_id refused: ${refused}`);
      return;
    }
    if (this.isClosed()) return;
    this.gatewayId = h.gateway_id;
    this.log.info({ gateway: h.gateway_id, software: h.software }, 'HELLO');
    if (h.heartbeat_ms) this.deadAfterMs = 3 * Math.max(this.ctx.cfg.heartbeat_ms, h.heartbeat_ms);
    const reg = this.ctx.registry;
    const old = reg.sessions.get(h.gateway_id);
    reg.sessions.set(h.gateway_id, this);
    if (old && old !== this) {
      old.close(CLOSE_CODES.REPLACED, 'replaced by a newer connection');
      await old.finished; // its partials are persisted before we report them
    }
    if (this.state === 'closed') return;
    this.state = 'open';
    const cfg = this.ctx.cfg;
    this.streamFeature = h.features?.includes(FEATURE_STREAM) ?? false;
    this.send({
      type: 'WELCOME',
      version: PROTOCOL_VERSION_2,
      session_id: this.sessionId,
      max_frame_bytes: maxFrameBytes(cfg),
      max_chunk_bytes: cfg.max_chunk_bytes,
      max_message_bytes: cfg.max_message_bytes,
      max_partials: cfg.max_partials,
      heartbeat_ms: cfg.heartbeat_ms,
      token_expires_at: this.tokenExpiresAt,
      partials: this.ctx.store.partialsOf(h.gateway_id, cfg.max_partials),
      ...(this.streamFeature ? { features: [FEATURE_STREAM] } : {}),
    });
  }

  /**
   * DISCARD (§13.10): the connector will never complete this message (its upload was aborted before the
   * connector acknowledged it). What is held of it goes — in memory, on disk, and a REJECT or per-device
   * block it caused on this connection — so nothing of it can ever be stored or delivered. A stored
   * message is not touched (the connector acknowledged it; a DISCARD cannot take that back), nor is an
   * unknown id (already expired, evicted, or never received).
   */
  private async onDiscard(id: string): Promise<void> {
    const { store } = this.ctx;
    const gw = this.gatewayId as string;
    if (store.isCommitting(id)) await store.whenSettled(id);
    this.rejected.delete(id);
    this.unblock(id);
    if (await store.isStored(gw, id)) {
      this.log.warn({ id }, 'DISCARD of a stored message: ignored (it was complete)');
      return;
    }
    const p = store.getPartial(id);
    if (!p || p.gatewayId !== gw) return;
    this.touched.delete(p);
    await store.discard(id);
    this.log.info({ id, offset: p.asm?.offset ?? p.durableOffset, total: p.total }, 'partial message discarded by the connector');
  }

  private async onToken(token: string): Promise<void> {
    let v: VerifiedToken;
    try {
      v = await this.ctx.tokens.verify(token, 'ingest');
    } catch (err) {
      this.send({ type: 'TOKEN_REJECTED', reason: (err as Error).message, expires_at: this.tokenExpiresAt });
      return;
    }
    if (v.clientId !== this.auth.clientId || v.sub !== this.auth.sub) {
      this.send({ type: 'TOKEN_REJECTED', reason: 'token belongs to another client', expires_at: this.tokenExpiresAt });
      return;
    }
    this.auth = v;
    this.tokenExpiresAt = v.expiresAt;
    this.armTokenTimer();
    this.log.info({ expires_at: v.expiresAt }, 'access token refreshed in band');
    this.send({ type: 'TOKEN_OK', expires_at: v.expiresAt });
  }

  private reject(id: string, kind: 'permanent' | 'retry', reason: string, resume?: { offset: number; nextSeq: number }, deviceId?: string): void {
    this.rejected.set(id, kind === 'permanent' ? { offset: -1, nextSeq: -1 } : (resume ?? { offset: 0, nextSeq: 0 }));
    if (kind === 'retry' && deviceId !== undefined && !this.blocked.has(deviceId)) this.blocked.set(deviceId, id);
    if (kind === 'permanent') this.unblock(id); // the connector quarantines it and goes on with the next
    this.log.warn({ id, kind, reason }, 'message rejected');
    this.send(
      kind === 'permanent'
        ? { type: 'REJECT', id, kind, reason }
        : { type: 'REJECT', id, kind, reason, retry_after_ms: 1000, offset: resume?.offset ?? 0, next_seq: resume?.nextSeq ?? 0 },
    );
  }

  /** The message a device waited for is stored or will never be: its later messages may be stored again. */
  private unblock(id: string): void {
    for (const [device, blocker] of this.blocked) if (blocker === id) this.blocked.delete(device);
  }

  private async onChunk(c: ChunkFrame): Promise<void> {
    const { store, cfg } = this.ctx;
    const gw = this.gatewayId as string;
    const id = c.id;
    // a chunk of a message whose commit is in flight (a resend crossing its ACK): decide once it is settled
    if (store.isCommitting(id)) await store.whenSettled(id);
    if (await store.isStored(gw, id)) {
      this.unblock(id);
      // a resend of a stored message: acknowledge again (its position settles on the last chunk), store nothing
      if (c.offset + c.data.length === c.total) return;
      if (c.seq === 0 || !this.dupAcked.has(id)) {
        this.dupAcked.add(id);
        this.log.debug({ id }, 'duplicate of a stored message: acknowledged again');
        this.send({ type: 'ACK', ids: [id] });
      }
      return;
    }
    const rej = this.rejected.get(id);
    if (rej) {
      if (c.seq === 0 || (c.seq === rej.nextSeq && c.offset === rej.offset)) this.rejected.delete(id);
      else return; // chunks the connector sent before it saw the REJECT
    }
    const deviceId = c.seq === 0 ? c.meta!.device_id : store.getPartial(id)?.meta.device_id;
    const blocker = deviceId === undefined ? undefined : this.blocked.get(deviceId);
    if (blocker !== undefined && blocker !== id) {
      // an earlier message of this device waits for its resend: storing this one now would break the order per device
      const held = c.seq === 0 ? undefined : store.getPartial(id);
      if (held?.asm) await store.persist(held);
      const resume = held && held.gatewayId === gw ? { offset: held.durableOffset, nextSeq: held.durableNextSeq } : undefined;
      return this.reject(id, 'retry', `an earlier message of device ${deviceId} (${blocker}) was rejected for retry and is not stored yet`, resume);
    }
    if (c.seq === 0 && c.total === c.data.length && c.total <= cfg.max_message_bytes && !store.getPartial(id)) {
      // a whole message in one chunk: verified here, written straight to its payload file in the commit round
      const asm = MessageAssembly.begin(c);
      let ok = false;
      try {
        asm.accept(c);
        ok = asm.complete;
      } catch (err) {
        if (!(err instanceof WireError)) throw err; // digest errors: handled (REJECT) by the general path below
      }
      if (ok) {
        const meta = c.meta!;
        this.commit(id, meta.device_id, (onFail) => store.commitData(id, gw, meta, c.data, (c.payload_sha256 as Buffer).toString('hex'), undefined, onFail));
        return;
      }
    }
    let p: Partial | undefined;
    if (c.seq === 0) {
      if (c.total > cfg.max_message_bytes) return this.reject(id, 'permanent', `message of ${c.total} bytes exceeds max_message_bytes ${cfg.max_message_bytes}`);
      if (!store.getPartial(id) && store.partialCount(gw) >= cfg.max_partials) {
        // abandoned partials (the connector dropped them: TTL, quarantine) must not block the gateway forever:
        // evict the least recently used one that is not in progress on this connection
        const victim = store.partialsByAge(gw).find((q) => !this.touched.has(q));
        if (!victim) return this.reject(id, 'retry', `more than ${cfg.max_partials} messages in progress`, undefined, c.meta!.device_id);
        this.log.warn({ id: victim.id, offset: victim.durableOffset }, 'partial message evicted (max_partials)');
        await store.discard(victim.id);
      }
      p = await store.begin(id, gw, c.meta!, c.total, MessageAssembly.begin(c));
    } else {
      p = store.getPartial(id);
      if (!p || p.gatewayId !== gw) return this.protocolViolation(new WireError('out_of_order', `chunk seq ${c.seq} of message ${id}, which is not in progress`, id));
      await store.load(p);
    }
    this.touched.add(p);
    p.lastTouched = Date.now();
    try {
      p.asm!.accept(c);
    } catch (err) {
      if (!(err instanceof WireError)) throw err;
      if (err.reason === 'bad_digest' && !p.asm!.complete) {
        await store.persist(p);
        return this.reject(id, 'retry', 'chunk data does not match chunk_sha256', { offset: p.asm!.offset, nextSeq: p.asm!.nextSeq }, p.meta.device_id);
      }
      if (err.reason === 'bad_digest') {
        await store.discard(id);
        return this.reject(id, 'permanent', 'payload does not match payload_sha256');
      }
      return this.protocolViolation(err);
    }
    try {
      await store.write(p, c.offset, c.data);
      if (p.asm!.complete) {
        const done = p;
        this.touched.delete(done); // no longer in progress: its file belongs to the commit now
        this.commit(id, done.meta.device_id, (onFail) => store.commit(done, (c.payload_sha256 as Buffer).toString('hex'), undefined, onFail));
      } else if (p.dirty >= cfg.progress_bytes && !p.persisting) {
        // in the background: the next chunks are received and written while the fsync runs (the frame
        // queue stood still for every persist: ~20 ms per 4 MiB on the bench, a quarter of a large upload)
        this.persistInBackground(p);
      }
    } catch (err) {
      this.log.error({ err, id }, 'cloud store failed: asking for a resend');
      await store.discard(id).catch(() => undefined);
      this.touched.delete(p);
      this.reject(id, 'retry', 'storage error', undefined, p.meta.device_id);
    }
  }

  /**
   * Persist a partial without holding up the frame queue; its progress ACK goes out when it is durable, if
   * the message is still in progress then. A failure is handled in the frame queue, in order, like a
   * failed write: the partial is dropped and the message REJECTed for retry.
   */
  private persistInBackground(p: Partial): void {
    const { store } = this.ctx;
    const id = p.id;
    const current = (): boolean => store.getPartial(id) === p && p.asm !== undefined && !p.asm.complete;
    store.persist(p).then(
      () => {
        if (current() && !this.isClosed()) this.send({ type: 'ACK', ids: [], progress: [{ id, offset: p.durableOffset, next_seq: p.durableNextSeq }] });
      },
      (err: unknown) => {
        this.chain = this.chain.then(async () => {
          if (!current()) return;
          this.log.error({ err, id }, 'cloud store failed: asking for a resend');
          await store.discard(id).catch(() => undefined);
          this.touched.delete(p);
          this.reject(id, 'retry', 'storage error', undefined, p.meta.device_id);
        }).catch((e: unknown) => this.log.error({ err: e, id }, 'ingest: handling a failed persist failed'));
      },
    );
  }

  /** A position is settled: the cumulative ACK covering it goes out on the next turn of the event loop. */
  private settle(pos: number): void {
    if (this.frontier.settle(pos) && !this.ackQueued) {
      this.ackQueued = true;
      setImmediate(() => this.flushAcks());
    }
  }

  /** One ACK for everything settled: the messages of one group commit round share it. */
  private flushAcks(): void {
    this.ackQueued = false;
    const upto = this.frontier.upto;
    if (upto <= this.ackedUpto) return;
    this.ackedUpto = upto;
    this.send({ type: 'ACK', upto, ids: [] });
  }

  /** Hand a complete message to the store's group commit; ACK when durable, REJECT retry if the round fails. */
  private commit(id: string, deviceId: string, start: (onFail: () => void) => Promise<StoredEntry>): void {
    const { store, registry } = this.ctx;
    const gw = this.gatewayId as string;
    // the commit settles the message's position when it is durable (or REJECTed)
    const pos = this.currentPos;
    this.posClaimed = true;
    // queued for commit = ordered before anything of this device queued later (a failed round fails everything
    // behind it, and onFail blocks the device again), so its later messages may go on
    this.unblock(id);
    const done = start(() => {
      // synchronous, before any later message can be queued: refuse what follows of this device
      if (!this.blocked.has(deviceId)) this.blocked.set(deviceId, id);
    }).then(
      (entry) => {
        registry.noteDevice(entry.device_id, gw);
        this.log.debug({ id, size: entry.size, seq: entry.seq }, 'message stored');
        if (pos !== undefined) this.settle(pos);
      },
      async (err: unknown) => {
        this.log.error({ err, id }, 'cloud store failed: asking for a resend');
        await store.discard(id).catch(() => undefined);
        this.reject(id, 'retry', 'storage error', undefined, deviceId);
        if (pos !== undefined) this.settle(pos);
      },
    ).catch((err: unknown) => this.log.error({ err, id }, 'ingest: commit bookkeeping failed'));
    this.inflight.add(done);
    void done.finally(() => this.inflight.delete(done));
  }

  /** Send a COMMAND and wait for its COMMAND_RESULT. */
  command(deviceId: string, name: string, payload: Buffer, timeoutMs: number): Promise<{ id: string; delivered: boolean; reason?: string }> {
    if (this.state !== 'open') return Promise.reject(new RequestError(404, 'ECONN_NOT_FOUND', 'gateway not connected'));
    const id = `cmd-${randomBytes(8).toString('hex')}`;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.commands.delete(id);
        reject(new RequestError(504, 'ECONN_UPLINK', `no COMMAND_RESULT within ${timeoutMs} ms`));
      }, timeoutMs);
      this.commands.set(id, { resolve: (r) => resolve({ id, ...r }), reject, timer });
      this.send({ type: 'COMMAND', id, device_id: deviceId, name, payload: payload.toString('base64') });
    });
  }

  private protocolViolation(err: WireError): void {
    this.log.warn({ reason: err.reason, message: err.message }, 'protocol violation from the connector: closing');
    this.sendError(err, true);
    this.close(err.reason === 'unsupported_version' ? CLOSE_CODES.UNSUPPORTED_VERSION : CLOSE_CODES.PROTOCOL_ERROR, err.reason);
  }

  private sendError(err: WireError, fatal: boolean): void {
    this.send(errorFrameFor(err, fatal));
  }

  send(frame: FrameV2): void {
    if (this.state === 'closed' || this.ws.readyState !== this.ws.OPEN) return;
    this.ws.send(encodeFrameV2(frame), { binary: true });
  }

  /** Close with a protocol close code (idempotent). Frames already queued are still handled (partials persisted). */
  close(code: number, reason: string): void {
    if (this.state === 'closed') return;
    this.state = 'closed';
    try {
      this.ws.close(code, reason.slice(0, 120));
    } catch {
      this.ws.terminate();
    }
    const t = setTimeout(() => this.ws.terminate(), 2000);
    t.unref();
  }

  private async onClose(code: number, reason: string): Promise<void> {
    this.state = 'closed';
    for (const t of this.timers) clearTimeout(t);
    if (this.tokenTimer) clearTimeout(this.tokenTimer);
    if (this.heartbeat) clearInterval(this.heartbeat);
    for (const [id, p] of this.commands) {
      clearTimeout(p.timer);
      p.reject(new RequestError(504, 'ECONN_UPLINK', `gateway disconnected before answering command ${id}`));
    }
    this.commands.clear();
    this.log.info({ code, reason }, 'ingest connection closed');
    try {
      await this.chain;
      while (this.inflight.size > 0) await Promise.all([...this.inflight]);
      for (const p of this.touched) {
        if (this.ctx.store.getPartial(p.id) === p) await this.ctx.store.persist(p);
      }
    } catch (err) {
      this.log.warn({ err }, 'could not persist partial messages of a closed connection');
    } finally {
      // stay registered until our partials are persisted: a reconnect of this gateway waits for that before its WELCOME
      if (this.gatewayId && this.ctx.registry.sessions.get(this.gatewayId) === this) this.ctx.registry.sessions.delete(this.gatewayId);
      this.finishedResolve();
    }
  }
}

export function maxFrameBytes(cfg: Pick<CloudConfig, 'max_chunk_bytes'>): number {
  return cfg.max_chunk_bytes + 64 * 1024;
}
