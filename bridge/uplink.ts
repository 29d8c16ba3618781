/**
 * The uplink: ONE outbound WebSocket-over-TLS connection to the cloud ingest
 * (docs/PROTOCOL.md), fed from the journal.
 *
 *  - wss:// only, TLS >= bridge.uplink.min_tls_version, certificate validation
 *    always on (system store + optional CA file), optional client certificate
 *    (mTLS), TCP_NODELAY; the OAuth2 access token from CloudTokenClient in the
 *    upgrade's Authorization header; optional X-Signature (HMAC-SHA256, §1).
 *  - Sends journal records in journal order, each message's chunks contiguously
 *    (so order per device is kept at the cloud), every chunk read from disk
 *    (memory stays flat for any payload size), within a bounded window of
 *    unacknowledged messages and bytes, and waiting on WebSocket back-pressure.
 *  - ACK → journal.ack(id); REJECT permanent → journal.quarantine(id, reason);
 *    REJECT retry → resend from the first unacknowledged message after the delay.
 *  - Resume: every connection (and every restart) starts at the first
 *    unacknowledged record; a message the cloud holds partially resumes at the
 *    offset WELCOME reports. Duplicates are dropped by the cloud (id).
 *  - Heartbeats every heartbeat_ms; the link is judged dead when no frame at
 *    all arrived for dead_after_ms (terminate + reconnect with backoff), not by
 *    the socket state.
 *  - The token is renewed in band (TOKEN → TOKEN_OK) before it expires; if the
 *    cloud refuses the new token in band, the uplink reconnects with it
 *    (resume makes that lossless).
 *  - COMMAND frames go to the CommandTarget (the broker) and are answered with
 *    COMMAND_RESULT, exactly once each.
 */
import { EventEmitter } from 'node:events';
import { randomBytes } from 'node:crypto';
import type { IncomingMessage, ClientRequest } from 'node:http';
import { WebSocket, type RawData } from 'ws';
import { Counter, Gauge, Histogram, type Registry } from 'prom-client';
import type { Config } from '../core/config/schema.js';
import type { Logger } from '../core/logger.js';
import { redactString } from '../core/logger.js';
import type { Component } from '../core/component.js';
import { SIGNATURE_HEADER, signRequest } from '../protocol/signature.js';
import { ConnectorError, errorCode } from '../core/errors.js';
import { resolveSecret } from '../core/secrets.js';
import type { CommandTarget, UplinkMessageMeta } from '../core/ports.js';
import { Backoff, parseRetryAfter } from './backoff.js';
import { cloudTlsOptions, type CloudTokenClient } from './cloud-token.js';
import {
  SUBPROTOCOL,
  PROTOCOL_VERSION,
  CLOSE_CODES,
  LIMITS,
  SERVER_FRAMES,
  WireError,
  chunkRanges,
  chunkMessage,
  decodeFrame,
  encodeFrame,
  errorFrameFor,
  makeChunk,
  type ChunkRange,
  type Frame,
  type MessageMeta,
  type PartialInfo,
  type CommandResultFrame,
} from '../protocol/codec.js';

// ─── what the uplink needs from the journal ─────────────────────────────────

/** One journal record as the uplink sees it (bridge/journal.ts JournalRecord). */
export interface OutboundRecord {
  readonly id: string;
  /** Position in the journal (strictly increasing). */
  readonly seq: number;
  readonly meta: UplinkMessageMeta;
  readonly size: number;
  /** SHA-256 of the payload, lowercase hex. */
  readonly sha256: string;
  readonly createdAt: number;
}

/** The consumer side of the journal, as bridge/journal.ts implements it. */
export interface UplinkJournal {
  /** Unacknowledged records with seq > afterSeq, in order. */
  pending(afterSeq?: number, limit?: number): readonly OutboundRecord[];
  /** Bytes [start, end) of the payload, from disk; rejects ECONN_NOT_FOUND once the record left the queue. */
  readPayload(rec: OutboundRecord, start?: number, end?: number): Promise<Buffer>;
  /** Selective ack; unknown ids are ignored. */
  ack(id: string): Promise<void>;
  quarantine(id: string, reason: string): Promise<void>;
  on(event: 'append', fn: () => void): unknown;
  off(event: 'append', fn: () => void): unknown;
  stats(): { pendingMessages: number; pendingBytes: number; oldestPendingAgeMs: number };
}

// ─── component ───────────────────────────────────────────────────────────────

export type UplinkState = 'stopped' | 'connecting' | 'handshake' | 'connected' | 'backoff' | 'closing';
const STATES: UplinkState[] = ['stopped', 'connecting', 'handshake', 'connected', 'backoff', 'closing'];

export interface UplinkOptions {
  config: Config;
  journal: UplinkJournal;
  tokens: CloudTokenClient;
  commands?: CommandTarget;
  logger: Logger;
  metrics: Registry;
  /** Software string sent in HELLO. */
  software?: string;
  env?: NodeJS.ProcessEnv;
  random?: () => number;
  /** How long a device gets to acknowledge a command (default 30 s). */
  commandTimeoutMs?: number;
}

interface OutMsg {
  rec: OutboundRecord;
  /** Bytes handed to the socket on this connection (an offset into the payload). */
  sentOffset: number;
  /** Bytes the cloud holds durably (from the resume point or ACK progress). */
  ackedOffset: number;
  /** When the last chunk was handed to the socket (performance.now()), 0 while sending. */
  doneAt: number;
}

interface Session {
  ws: WebSocket;
  n: number;
  openedAt: number;
  welcomed: boolean;
  closing: boolean;
  /** Increments when the pump must restart from the first unacknowledged record. */
  epoch: number;
  inflight: Map<string, OutMsg>;
  unackedBytes: number;
  /** Resume points the cloud told us (WELCOME partials, ACK progress, REJECT retry, QUERY_RESULT). */
  resume: Map<string, { offset: number; next_seq: number; total: number }>;
  chunkSize: number;
  maxMessageBytes: number;
  tokenExpiresAt: number;
  /** When tokenExpiresAt was last set (WELCOME or TOKEN_OK): with it, the lifetime of the token in force. */
  tokenSetAt: number;
  tokenSentAt: number;
  /** Recent ACK latency (ms), a maximum that decays with a 5 s time constant: how long the cloud's queue is. */
  ackLatencyMs: number;
  ackLatencyAt: number;
  presentedToken: string;
  tokenInFlight: string | undefined;
  pausedUntil: number;
  lastRx: number;
  lastAckOrProgress: number;
  timers: NodeJS.Timeout[];
  closeReason?: { code: number; reason: string; retryAfterMs?: number; invalidateToken?: boolean; immediate?: boolean };
  lastQueryAt: number;
}

const EMPTY = Buffer.alloc(0);
/** Small messages read ahead of the socket, and their byte budget. */
const PREFETCH_MSGS = 64;
const PREFETCH_BYTES = 4 * 1024 * 1024;
/** Bytes of a large message read ahead of the socket. */
const READ_AHEAD_BYTES = 1024 * 1024;
type ChunkRead = Promise<{ data?: Buffer; err?: unknown }>;
const MAX_COMMANDS_IN_FLIGHT = 256;

export class Uplink extends EventEmitter implements Component {
  readonly name = 'uplink';
  private cfg: Config;
  private readonly journal: UplinkJournal;
  private readonly tokens: CloudTokenClient;
  private readonly commands: CommandTarget | undefined;
  private readonly log: Logger;
  private readonly env: NodeJS.ProcessEnv;
  private readonly software: string;
  private readonly commandTimeoutMs: number;
  private backoff: Backoff;

  private stateValue: UplinkState = 'stopped';
  private started = false;
  private closed = false;
  private session: Session | undefined;
  private sessionCount = 0;
  private reconnectTimer: NodeJS.Timeout | undefined;
  private waiters = new Set<() => void>();
  private connecting: Promise<void> | undefined;
  private commandsInFlight = 0;
  private lastAckAt = 0;
  private startedAt = 0;
  private lastError: { code: string; message: string; at: number } | undefined;
  private readonly onAppend = (): void => this.wake();
  private readonly onToken = (): void => void this.presentNewToken();
  /** Counters also exposed through status() (and used by tests). */
  readonly counts = { reconnects: 0, messagesSent: 0, bytesSent: 0, messagesAcked: 0, bytesAcked: 0, rejected: 0, protocolErrors: 0, tokensInBand: 0, commands: 0, bestEffortSent: 0, bestEffortDropped: 0 };

  private readonly m: {
    state: Gauge;
    reconnects: Counter;
    messagesSent: Counter;
    bytesSent: Counter;
    messagesAcked: Counter;
    bytesAcked: Counter;
    rejected: Counter;
    protocolErrors: Counter;
    commands: Counter;
    bestEffort: Counter;
    ackLatency: Histogram;
    tokenExpiry: Gauge;
    lastAckAge: Gauge;
    inflight: Gauge;
  };

  constructor(opts: UplinkOptions) {
    super();
    this.cfg = opts.config;
    this.journal = opts.journal;
    this.tokens = opts.tokens;
    this.commands = opts.commands;
    this.log = opts.logger.child({ component: 'uplink' });
    this.env = opts.env ?? process.env;
    this.software = opts.software ?? 'edge-connector';
    this.commandTimeoutMs = opts.commandTimeoutMs ?? 30_000;
    const u = this.cfg.bridge.uplink;
    this.backoff = new Backoff({ minMs: u.reconnect_min_ms, maxMs: u.reconnect_max_ms, random: opts.random });
    const registers = [opts.metrics];
    // eslint-disable-next-line @typescript-eslint/no-this-alias
    const self = this;
    this.m = {
      state: new Gauge({ name: 'connector_uplink_state', help: 'uplink state (1 for the current state)', labelNames: ['state'], registers }),
      reconnects: new Counter({ name: 'connector_uplink_reconnects_total', help: 'connection attempts after the first one', registers }),
      messagesSent: new Counter({ name: 'connector_uplink_messages_sent_total', help: 'messages whose last chunk was sent (resends included)', registers }),
      bytesSent: new Counter({ name: 'connector_uplink_bytes_sent_total', help: 'payload bytes sent in chunks (resends included)', registers }),
      messagesAcked: new Counter({ name: 'connector_uplink_messages_acked_total', help: 'messages the cloud acknowledged as stored', registers }),
      bytesAcked: new Counter({ name: 'connector_uplink_bytes_acked_total', help: 'payload bytes of messages the cloud acknowledged', registers }),
      rejected: new Counter({ name: 'connector_uplink_rejected_total', help: 'messages the cloud rejected', labelNames: ['kind'], registers }),
      protocolErrors: new Counter({ name: 'connector_uplink_protocol_errors_total', help: 'malformed or unexpected frames from the cloud', registers }),
      commands: new Counter({ name: 'connector_uplink_commands_total', help: 'cloud commands by result', labelNames: ['result'], registers }),
      bestEffort: new Counter({ name: 'connector_uplink_best_effort_total', help: 'QoS 0 best-effort messages (bridge.qos0=best_effort), sent or dropped', labelNames: ['result'], registers }),
      ackLatency: new Histogram({
        name: 'connector_uplink_ack_latency_seconds',
        help: 'time from the last chunk of a message sent to its ACK',
        buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
        registers,
      }),
      tokenExpiry: new Gauge({
        name: 'connector_uplink_token_expires_in_seconds',
        help: 'seconds until the cloud access token in force expires (0 without one)',
        registers,
        collect() {
          const at = self.session?.welcomed ? self.session.tokenExpiresAt : self.tokens.expiresAt;
          this.set(at ? Math.max(0, (at - Date.now()) / 1000) : 0);
        },
      }),
      lastAckAge: new Gauge({
        name: 'connector_uplink_last_ack_age_seconds',
        help: 'seconds since the cloud last acknowledged a message (since start when none yet)',
        registers,
        collect() {
          this.set(self.started ? (Date.now() - (self.lastAckAt || self.startedAt)) / 1000 : 0);
        },
      }),
      inflight: new Gauge({
        name: 'connector_uplink_inflight_messages',
        help: 'messages sent and not yet acknowledged',
        registers,
        collect() {
          this.set(self.session?.inflight.size ?? 0);
        },
      }),
    };
    this.setState('stopped');
  }

  get state(): UplinkState {
    return this.stateValue;
  }

  private setState(s: UplinkState): void {
    if (s === this.stateValue && this.started) return;
    this.stateValue = s;
    for (const st of STATES) this.m.state.set({ state: st }, st === s ? 1 : 0);
    this.emit('state', s);
  }

  async start(): Promise<void> {
    if (this.started || this.closed) return;
    this.started = true;
    this.startedAt = Date.now();
    this.journal.on('append', this.onAppend);
    this.tokens.on('token', this.onToken);
    this.connect();
  }

  /** Graceful: stop sending, close the connection (1000), bounded. Unacknowledged messages stay in the journal. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.journal.off('append', this.onAppend);
    this.tokens.off('token', this.onToken);
    if (this.reconnectTimer) clearTimeout(this.reconnectTimer);
    this.reconnectTimer = undefined;
    const s = this.session;
    this.wake();
    if (s) {
      this.setState('closing');
      await new Promise<void>((resolve) => {
        const t = setTimeout(() => {
          s.ws.terminate();
          resolve();
        }, 1000);
        t.unref();
        s.ws.once('close', () => {
          clearTimeout(t);
          resolve();
        });
        if (s.ws.readyState === WebSocket.OPEN) s.ws.close(CLOSE_CODES.NORMAL, 'connector shutting down');
        else s.ws.terminate();
      });
      this.endSession(s);
    }
    this.setState('stopped');
  }

  async reload(next: Config): Promise<string[]> {
    const before = this.cfg.bridge;
    const after = next.bridge;
    const changed: string[] = [];
    const u0 = before.uplink;
    const u1 = after.uplink;
    for (const k of ['chunk_size', 'window_messages', 'window_bytes', 'heartbeat_ms', 'dead_after_ms', 'reconnect_min_ms', 'reconnect_max_ms'] as const) {
      if (u0[k] !== u1[k]) changed.push(`bridge.uplink.${k} ${u0[k]} -> ${u1[k]}`);
    }
    const tlsChanged = u0.ca_file !== u1.ca_file || u0.cert_file !== u1.cert_file || u0.key_file !== u1.key_file || u0.min_tls_version !== u1.min_tls_version;
    const urlChanged = u0.url !== u1.url;
    this.cfg = next;
    if (u0.reconnect_min_ms !== u1.reconnect_min_ms || u0.reconnect_max_ms !== u1.reconnect_max_ms) {
      this.backoff = new Backoff({ minMs: u1.reconnect_min_ms, maxMs: u1.reconnect_max_ms });
    }
    changed.push(...this.tokens.reload(after.token, u1));
    if (urlChanged) {
      changed.push(`bridge.uplink.url changed: reconnecting to ${u1.url}`);
      const s = this.session;
      if (s) this.dropSession(s, { code: CLOSE_CODES.NORMAL, reason: 'configuration changed', immediate: true });
    } else if (tlsChanged) {
      // the link in place was verified with the old settings and stays up; the next connection uses the new ones
      changed.push('bridge.uplink TLS settings changed: applied to the next connection (the current link stays up)');
    }
    // a new heartbeat interval needs the timers re-armed
    if (this.session?.welcomed && (u0.heartbeat_ms !== u1.heartbeat_ms || u0.dead_after_ms !== u1.dead_after_ms)) this.armTimers(this.session);
    this.wake();
    return changed;
  }

  /** Facts for `connector status` (names read by daemon/status.ts: state, last_ack_age_s, reconnects, token_expires_at). */
  status(): Record<string, unknown> {
    const now = Date.now();
    const st = this.safeStats();
    const s = this.session;
    const tokenAt = s?.welcomed ? s.tokenExpiresAt : this.tokens.expiresAt;
    const c = this.counts;
    return {
      state: this.stateValue,
      url: this.cfg.bridge.uplink.url,
      connected_for_s: s?.welcomed ? Math.round((now - s.openedAt) / 1000) : 0,
      last_ack_age_s: this.lastAckAt ? Math.round((now - this.lastAckAt) / 1000) : null,
      oldest_unacked_age_s: st ? Math.round(st.oldestAgeMs / 1000) : null,
      backlog_messages: st?.records ?? null,
      backlog_bytes: st?.bytes ?? null,
      inflight: s?.inflight.size ?? 0,
      token_expires_at: tokenAt || null,
      reconnects: c.reconnects,
      messages_sent: c.messagesSent,
      messages_acked: c.messagesAcked,
      bytes_sent: c.bytesSent,
      bytes_acked: c.bytesAcked,
      rejected: c.rejected,
      protocol_errors: c.protocolErrors,
      tokens_in_band: c.tokensInBand,
      best_effort_sent: c.bestEffortSent,
      best_effort_dropped: c.bestEffortDropped,
      last_error: this.lastError ? { code: this.lastError.code, message: this.lastError.message, at: new Date(this.lastError.at).toISOString() } : null,
    };
  }

  /**
   * Readiness: judged by acknowledgements, not by the socket. Ready when the
   * backlog is empty, or its oldest message is younger than staleAfterMs, or
   * the cloud acknowledged something within staleAfterMs (a big backlog that
   * is draining).
   */
  readiness(staleAfterMs = this.cfg.metrics.uplink_stale_after_s * 1000): { ok: boolean; reason?: string } {
    const st = this.safeStats();
    if (!st || st.records === 0) return { ok: true };
    const now = Date.now();
    const oldestAge = st.oldestAgeMs;
    if (oldestAge <= staleAfterMs) return { ok: true };
    if (this.lastAckAt && now - this.lastAckAt <= staleAfterMs) return { ok: true };
    const lastAck = this.lastAckAt ? `${Math.round((now - this.lastAckAt) / 1000)} s ago` : 'never since start';
    return {
      ok: false,
      reason: `${st.records} messages wait for the cloud, the oldest for ${Math.round(oldestAge / 1000)} s; last cloud ack ${lastAck} (uplink ${this.stateValue}${this.lastError ? `: ${this.lastError.message}` : ''})`,
    };
  }

  private safeStats(): { records: number; bytes: number; oldestAgeMs: number } | undefined {
    try {
      const st = this.journal.stats();
      return { records: st.pendingMessages, bytes: st.pendingBytes, oldestAgeMs: st.oldestPendingAgeMs };
    } catch {
      return undefined;
    }
  }

  // ─── connection ────────────────────────────────────────────────────────────

  private connect(): void {
    if (this.closed || this.connecting || this.session) return;
    const p = this.doConnect()
      .catch((err: unknown) => {
        this.noteError(err);
        this.scheduleReconnect((err as { retryInMs?: number; retryAfterMs?: number }).retryInMs ?? (err as { retryAfterMs?: number }).retryAfterMs);
      })
      .finally(() => {
        if (this.connecting === p) this.connecting = undefined;
      });
    this.connecting = p;
  }

  private async doConnect(): Promise<void> {
    this.setState('connecting');
    if (this.sessionCount > 0) {
      this.counts.reconnects++;
      this.m.reconnects.inc();
    }
    const token = await this.tokens.getToken();
    if (this.closed) return;
    const u = this.cfg.bridge.uplink;
    let url: URL;
    try {
      url = new URL(u.url);
    } catch {
      throw new ConnectorError('ECONN_UPLINK', `bridge.uplink.url ${JSON.stringify(u.url)} is not a valid URL`);
    }
    if (url.protocol !== 'wss:') throw new ConnectorError('ECONN_UPLINK', `bridge.uplink.url must be wss:// (got ${url.protocol}//)`);
    const tlsOpts = cloudTlsOptions(u);
    const headers: Record<string, string> = { authorization: `Bearer ${token}` };
    if (u.signing_secret) {
      let secret: string;
      try {
        secret = resolveSecret(u.signing_secret, this.env);
      } catch (err) {
        throw new ConnectorError('ECONN_UPLINK', `cannot read bridge.uplink.signing_secret: ${(err as Error).message}`, { cause: err });
      }
      headers[SIGNATURE_HEADER] = signRequest(secret, 'GET', url.pathname + url.search, Math.floor(Date.now() / 1000));
    }
    const ws = new WebSocket(url, [SUBPROTOCOL], {
      ...tlsOpts,
      headers,
      perMessageDeflate: false,
      maxPayload: LIMITS.maxFrameBytes,
      handshakeTimeout: Math.max(1000, u.dead_after_ms),
      followRedirects: false,
    });
    const n = ++this.sessionCount;
    const s: Session = {
      ws,
      n,
      openedAt: Date.now(),
      welcomed: false,
      closing: false,
      epoch: 0,
      inflight: new Map(),
      unackedBytes: 0,
      resume: new Map(),
      chunkSize: u.chunk_size,
      maxMessageBytes: Number.MAX_SAFE_INTEGER,
      tokenExpiresAt: 0,
      tokenSetAt: 0,
      tokenSentAt: 0,
      ackLatencyMs: 0,
      ackLatencyAt: 0,
      presentedToken: token,
      tokenInFlight: undefined,
      pausedUntil: 0,
      lastRx: Date.now(),
      lastAckOrProgress: Date.now(),
      timers: [],
      lastQueryAt: 0,
    };
    this.session = s;
    this.setState('handshake');
    ws.on('upgrade', (res: IncomingMessage) => {
      const sock = res.socket as { setNoDelay?: (b: boolean) => void };
      sock.setNoDelay?.(true);
    });
    ws.on('unexpected-response', (req: ClientRequest, res: IncomingMessage) => this.onUnexpectedResponse(s, req, res));
    ws.on('open', () => this.onOpen(s));
    ws.on('message', (data: RawData, isBinary: boolean) => this.onMessage(s, data, isBinary));
    ws.on('ping', () => (s.lastRx = Date.now()));
    ws.on('error', (err: Error) => {
      if (this.session !== s) return;
      this.noteError(new ConnectorError('ECONN_UPLINK', `uplink to ${u.url}: ${redactString(err.message)}`, { cause: err }));
    });
    ws.on('close', (code: number, reason: Buffer) => this.onClose(s, code, reason.toString('utf8')));
  }

  private onUnexpectedResponse(s: Session, req: ClientRequest, res: IncomingMessage): void {
    const status = res.statusCode ?? 0;
    const retryAfterMs = parseRetryAfter(res.headers['retry-after']);
    const hint =
      status === 401
        ? 'the cloud refused the access token or the request signature (check bridge.token and bridge.uplink.signing_secret)'
        : status === 403
          ? 'the access token lacks the ingest scope (check bridge.token.scope)'
          : status === 400
            ? `the cloud does not speak ${SUBPROTOCOL}`
            : status === 404
              ? 'wrong path in bridge.uplink.url'
              : 'the cloud is unavailable';
    s.closeReason = { code: 0, reason: `upgrade refused with HTTP ${status}`, retryAfterMs, invalidateToken: status === 401 };
    this.noteError(new ConnectorError('ECONN_UPLINK', `uplink upgrade refused: HTTP ${status}: ${hint}`));
    res.resume();
    req.destroy();
    s.ws.terminate();
  }

  private onOpen(s: Session): void {
    if (this.session !== s || this.closed) return;
    const u = this.cfg.bridge.uplink;
    if (s.ws.protocol !== SUBPROTOCOL) {
      this.protocolError(s, new WireError('unexpected', `the cloud did not select the subprotocol ${SUBPROTOCOL}`));
      return;
    }
    s.lastRx = Date.now();
    this.sendControl(s, { type: 'HELLO', version: PROTOCOL_VERSION, gateway_id: this.cfg.daemon.server_name, software: this.software, chunk_size: u.chunk_size, heartbeat_ms: u.heartbeat_ms });
    // no WELCOME within the dead-link timeout: give up on this connection
    const t = setTimeout(() => {
      if (this.session === s && !s.welcomed) this.dropSession(s, { code: CLOSE_CODES.HEARTBEAT_TIMEOUT, reason: `no WELCOME within ${u.dead_after_ms} ms` });
    }, u.dead_after_ms);
    t.unref();
    s.timers.push(t);
  }

  private onWelcome(s: Session, f: Extract<Frame, { type: 'WELCOME' }>): void {
    s.welcomed = true;
    s.chunkSize = Math.min(this.cfg.bridge.uplink.chunk_size, f.max_chunk_bytes, f.max_frame_bytes - 64 * 1024 > 0 ? f.max_frame_bytes - 64 * 1024 : f.max_chunk_bytes);
    s.maxMessageBytes = f.max_message_bytes;
    s.tokenExpiresAt = f.token_expires_at;
    s.tokenSetAt = Date.now();
    for (const p of f.partials) s.resume.set(p.id, { offset: p.offset, next_seq: p.next_seq, total: p.total });
    s.lastAckOrProgress = Date.now();
    this.setState('connected');
    this.log.info({ session: f.session_id, partials: f.partials.length, chunkSize: s.chunkSize, tokenExpiresInS: Math.round((f.token_expires_at - Date.now()) / 1000) }, 'uplink connected');
    this.emit('connected', { sessionId: f.session_id });
    this.armTimers(s);
    void this.pump(s, s.epoch);
    // a token renewed while we were connecting is presented at once
    void this.presentNewToken();
  }

  private armTimers(s: Session): void {
    for (const t of s.timers) clearTimeout(t);
    s.timers = [];
    const u = this.cfg.bridge.uplink;
    const hb = setInterval(() => {
      if (this.session !== s || s.closing) return;
      const now = Date.now();
      if (now - s.lastRx > u.dead_after_ms) {
        this.log.warn({ silentForMs: now - s.lastRx, deadAfterMs: u.dead_after_ms }, 'uplink: nothing arrived from the cloud within dead_after_ms: link dead, reconnecting');
        this.dropSession(s, { code: CLOSE_CODES.HEARTBEAT_TIMEOUT, reason: 'dead link' }, true);
        return;
      }
      // a message we sent completely with no ACK/progress for dead_after_ms: the link is not doing its job
      if (s.inflight.size > 0 && now - s.lastAckOrProgress > u.dead_after_ms * 2) {
        const oldest = s.inflight.values().next().value as OutMsg;
        if (oldest.doneAt > 0) {
          this.log.warn({ id: oldest.rec.id, waitedMs: now - s.lastAckOrProgress }, 'uplink: no acknowledgement from the cloud: link judged dead, reconnecting');
          this.dropSession(s, { code: CLOSE_CODES.HEARTBEAT_TIMEOUT, reason: 'no acknowledgement' }, true);
          return;
        }
      }
      this.sendControl(s, { type: 'PING', t: now });
      // stalled on the byte window by one big message: ask the cloud where it stands (a cloud without progress ACKs)
      const cur = [...s.inflight.values()].find((o) => o.doneAt === 0);
      if (cur && s.unackedBytes >= u.window_bytes - s.chunkSize && now - s.lastAckOrProgress > u.heartbeat_ms && now - s.lastQueryAt > u.heartbeat_ms) {
        s.lastQueryAt = now;
        this.sendControl(s, { type: 'QUERY', ids: [cur.rec.id] });
      }
    }, Math.max(50, Math.min(u.heartbeat_ms, Math.floor(u.dead_after_ms / 3))));
    hb.unref();
    s.timers.push(hb);
    // present a renewed token `tokenMargin` before the cloud's expiry of the one in force: if the token client
    // renewed already (its 'token' event presents it at once) there is nothing to do; otherwise renew now
    if (s.tokenExpiresAt > 0) {
      const t = setTimeout(() => {
        if (this.session !== s || s.closing || s.tokenInFlight) return;
        const current = this.tokens.peek();
        if (current && current !== s.presentedToken) {
          void this.presentNewToken();
          return;
        }
        this.log.info({ expiresInMs: s.tokenExpiresAt - Date.now() }, 'uplink: renewing the cloud token before it expires on the link');
        this.tokens.renew().catch(() => {
          /* logged by the token client; the cloud closes with 4001 at expiry and we reconnect */
        });
      }, Math.max(0, s.tokenExpiresAt - this.tokenMargin(s) - Date.now()));
      t.unref();
      s.timers.push(t);
    }
  }

  /**
   * How long before the cloud's expiry a renewed token should be on its way: renew_before_s (at most half
   * the lifetime), but at least half the lifetime up to 10 s, and at least twice the recent ACK latency:
   * the TOKEN frame queues behind the chunks already sent (up to window_bytes), which a slow cloud may
   * take a while to work through.
   */
  private tokenMargin(s: Session): number {
    const lifetime = Math.max(0, s.tokenExpiresAt - s.tokenSetAt);
    const before = this.cfg.bridge.token.renew_before_s * 1000;
    const base = Math.max(Math.min(before, lifetime / 2), Math.min(lifetime / 2, 10_000));
    // and twice the recent ACK latency (the cloud's queue), as far as the lifetime allows
    return Math.max(base, Math.min(lifetime * 0.8, 2 * this.queueEstimate(s) + 250));
  }

  /**
   * Hold new chunks while a renewed token is on its way and the token in force is close to its expiry
   * (closer than twice the cloud's queue plus a second): nothing more queues in front of the cloud's answer.
   * With tokens of minutes and a prompt cloud this never holds anything.
   */
  private holdForToken(s: Session): boolean {
    if (s.tokenInFlight === undefined) return false;
    const left = s.tokenExpiresAt - Date.now();
    return left > 0 && left < 2 * this.queueEstimate(s) + 1000;
  }

  /** The recent ACK latency (ms): a maximum decaying with a 5 s time constant. */
  private queueEstimate(s: Session): number {
    return s.ackLatencyMs * Math.exp(-(Date.now() - s.ackLatencyAt) / 5000);
  }

  private async presentNewToken(): Promise<void> {
    const s = this.session;
    if (!s || !s.welcomed || s.closing || s.tokenInFlight) return;
    let token: string;
    try {
      token = await this.tokens.getToken();
    } catch {
      return; // logged by the token client
    }
    if (this.session !== s || s.closing || token === s.presentedToken || s.tokenInFlight) return;
    s.tokenInFlight = token;
    s.tokenSentAt = Date.now();
    this.sendControl(s, { type: 'TOKEN', access_token: token });
  }

  private onClose(s: Session, code: number, reason: string): void {
    if (this.session !== s) return;
    this.endSession(s);
    if (this.closed) return;
    const why = s.closeReason;
    const u = this.cfg.bridge.uplink;
    const text = `${why?.reason ?? reason ?? ''}`.slice(0, 200);
    let retryAfterMs = why?.retryAfterMs;
    let immediate = why?.immediate ?? false;
    if (why?.invalidateToken || code === CLOSE_CODES.TOKEN_INVALID) this.tokens.invalidate();
    if (code === CLOSE_CODES.TOKEN_EXPIRED) {
      this.tokens.invalidate(s.presentedToken);
      this.log.warn('uplink: the cloud closed the link because the access token expired (renewal was not in time); reconnecting with a new token');
      immediate = true;
    } else if (code === CLOSE_CODES.REPLACED) {
      this.noteError(new ConnectorError('ECONN_UPLINK', `another connector with gateway id ${this.cfg.daemon.server_name} replaced this connection (daemon.server_name must be unique per gateway)`));
      retryAfterMs = u.reconnect_max_ms;
    } else if (code === CLOSE_CODES.UNSUPPORTED_VERSION) {
      this.noteError(new ConnectorError('ECONN_PROTOCOL', `the cloud does not speak protocol version ${PROTOCOL_VERSION}`));
      retryAfterMs = u.reconnect_max_ms;
    }
    // a link that worked for a while starts over at the shortest delay
    const worked = s.welcomed && (this.lastAckAt > s.openedAt || Date.now() - s.openedAt > Math.max(5000, u.dead_after_ms));
    if (worked) this.backoff.reset();
    this.log.info({ code, reason: text, wasConnectedMs: s.welcomed ? Date.now() - s.openedAt : 0, inflight: s.inflight.size }, 'uplink disconnected');
    this.emit('disconnected', { code, reason: text });
    if (immediate) this.scheduleReconnect(0, true);
    else this.scheduleReconnect(retryAfterMs);
  }

  private endSession(s: Session): void {
    for (const t of s.timers) clearTimeout(t);
    s.timers = [];
    s.closing = true;
    s.epoch++;
    if (this.session === s) this.session = undefined;
    this.wake();
  }

  /** Drop a session: close (or terminate when `hard`), and let onClose schedule the reconnect. */
  private dropSession(s: Session, why: NonNullable<Session['closeReason']>, hard = false): void {
    if (s.closing) return;
    s.closeReason = why;
    s.closing = true;
    s.epoch++;
    this.wake();
    if (hard || s.ws.readyState !== WebSocket.OPEN) {
      s.ws.terminate();
      return;
    }
    s.ws.close(why.code || CLOSE_CODES.NORMAL, why.reason.slice(0, 120));
    const t = setTimeout(() => s.ws.terminate(), 1000);
    t.unref();
  }

  private scheduleReconnect(floorMs?: number, immediate = false): void {
    if (this.closed) return;
    if (this.reconnectTimer) clearTimeout(this.reconnectTimer);
    const delay = immediate ? 0 : this.backoff.next(floorMs);
    this.setState('backoff');
    if (!immediate) this.log.info({ delayMs: delay, attempt: this.backoff.attempts }, `uplink: reconnecting in ${(delay / 1000).toFixed(2)} s`);
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = undefined;
      this.connect();
    }, delay);
    this.reconnectTimer.unref();
  }

  private noteError(err: unknown): void {
    const code = errorCode(err) ?? 'ECONN_UPLINK';
    const message = redactString((err as Error)?.message ?? String(err));
    const prev = this.lastError;
    this.lastError = { code, message, at: Date.now() };
    // the same failure over and over is logged at most every 30 s
    if (prev && prev.message === message && Date.now() - prev.at < 30_000) {
      this.lastError.at = prev.at;
      this.log.debug({ code }, message);
      return;
    }
    this.log.warn({ code }, message);
  }

  // ─── receiving ─────────────────────────────────────────────────────────────

  private onMessage(s: Session, data: RawData, isBinary: boolean): void {
    if (this.session !== s || s.closing) return;
    s.lastRx = Date.now();
    if (!isBinary) {
      this.protocolError(s, new WireError('unexpected', 'the cloud sent a text WebSocket message; only binary frames are allowed'), CLOSE_CODES.UNSUPPORTED_DATA);
      return;
    }
    const buf = Array.isArray(data) ? Buffer.concat(data) : Buffer.isBuffer(data) ? data : Buffer.from(data);
    let f: Frame;
    try {
      f = decodeFrame(buf);
      if (!SERVER_FRAMES.has(f.type)) throw new WireError('unexpected', `${f.type} is not a frame the cloud may send`);
      if (!s.welcomed && f.type !== 'WELCOME' && f.type !== 'ERROR' && f.type !== 'PING') throw new WireError('unexpected', `${f.type} before WELCOME`);
      if (s.welcomed && f.type === 'WELCOME') throw new WireError('unexpected', 'a second WELCOME');
    } catch (err) {
      if (err instanceof WireError) this.protocolError(s, err);
      else this.protocolError(s, new WireError('internal', `cannot decode a frame: ${(err as Error).message}`));
      return;
    }
    try {
      this.handleFrame(s, f);
    } catch (err) {
      if (err instanceof WireError) this.protocolError(s, err);
      else {
        this.log.error({ err }, 'uplink: failed to handle a frame from the cloud');
        this.dropSession(s, { code: CLOSE_CODES.INTERNAL_ERROR, reason: 'internal error' });
      }
    }
  }

  private handleFrame(s: Session, f: Frame): void {
    switch (f.type) {
      case 'WELCOME':
        if (f.version !== PROTOCOL_VERSION) throw new WireError('unsupported_version', `WELCOME version ${f.version}`);
        this.onWelcome(s, f);
        return;
      case 'ACK':
        this.onAck(s, f.ids, f.progress ?? []);
        return;
      case 'REJECT':
        this.onReject(s, f);
        return;
      case 'PING':
        this.sendControl(s, { type: 'PONG', t: f.t, t_reply: Date.now() });
        return;
      case 'PONG':
        return;
      case 'TOKEN_OK':
        if (s.tokenInFlight) {
          s.presentedToken = s.tokenInFlight;
          s.tokenInFlight = undefined;
          this.counts.tokensInBand++;
        }
        s.tokenExpiresAt = f.expires_at;
        s.tokenSetAt = s.tokenSentAt || Date.now(); // the lifetime counts from when the token was sent, not from this answer
        this.log.info({ expiresInS: Math.round((f.expires_at - Date.now()) / 1000) }, 'uplink: renewed token accepted in band');
        this.wake();
        this.armTimers(s);
        this.emit('token-renewed', { expiresAt: f.expires_at });
        // the token client may have renewed again meanwhile
        void this.presentNewToken();
        return;
      case 'TOKEN_REJECTED':
        s.tokenInFlight = undefined;
        s.tokenExpiresAt = f.expires_at;
        this.log.warn({ reason: f.reason.slice(0, 200) }, 'uplink: the cloud refused the renewed token in band; reconnecting with it');
        this.dropSession(s, { code: CLOSE_CODES.NORMAL, reason: 'token rollover', immediate: true });
        return;
      case 'COMMAND':
        void this.onCommand(s, f);
        return;
      case 'QUERY_RESULT':
        for (const e of f.entries) {
          const o = s.inflight.get(e.id);
          if (!o) continue;
          if (e.status === 'stored') this.onAck(s, [e.id], []);
          else if (e.status === 'partial' && e.offset !== undefined && e.next_seq !== undefined) this.onAck(s, [], [{ id: e.id, offset: e.offset, next_seq: e.next_seq }]);
        }
        return;
      case 'ERROR':
        this.counts.protocolErrors++;
        this.m.protocolErrors.inc();
        this.log.warn({ code: 'ECONN_PROTOCOL', wireCode: f.code, fatal: f.fatal, id: f.id }, `uplink: the cloud reported a protocol error: ${redactString(f.message).slice(0, 300)}`);
        if (f.fatal) this.dropSession(s, { code: CLOSE_CODES.PROTOCOL_ERROR, reason: `cloud error ${f.code}` });
        return;
      default:
        throw new WireError('unexpected', `${f.type} is not a frame the cloud may send`);
    }
  }

  private onAck(s: Session, ids: string[], progress: { id: string; offset: number; next_seq: number }[]): void {
    const now = Date.now();
    const t = performance.now();
    for (const p of progress) {
      const o = s.inflight.get(p.id);
      if (!o) continue;
      s.lastAckOrProgress = now;
      s.resume.set(p.id, { offset: p.offset, next_seq: p.next_seq, total: o.rec.size });
      const upTo = Math.min(p.offset, o.sentOffset);
      if (upTo > o.ackedOffset) {
        s.unackedBytes -= upTo - o.ackedOffset;
        o.ackedOffset = upTo;
      }
    }
    for (const id of ids) {
      const o = s.inflight.get(id);
      if (!o) {
        this.log.debug({ id }, 'uplink: ACK for a message not in flight (already acknowledged or resent)');
        continue;
      }
      s.inflight.delete(id);
      s.resume.delete(id);
      s.unackedBytes -= o.sentOffset - o.ackedOffset;
      s.lastAckOrProgress = now;
      this.lastAckAt = now;
      if (o.doneAt > 0) {
        const lat = t - o.doneAt;
        this.m.ackLatency.observe(lat / 1000);
        s.ackLatencyMs = Math.max(lat, s.ackLatencyMs * Math.exp(-(now - s.ackLatencyAt) / 5000));
        s.ackLatencyAt = now;
      }
      this.counts.messagesAcked++;
      this.counts.bytesAcked += o.rec.size;
      this.m.messagesAcked.inc();
      this.m.bytesAcked.inc(o.rec.size);
      try {
        const r = this.journal.ack(id);
        if (r instanceof Promise) r.catch((err: unknown) => this.log.error({ err, id }, 'uplink: journal ack failed (the message will be sent again)'));
      } catch (err) {
        this.log.error({ err, id }, 'uplink: journal ack failed (the message will be sent again)');
      }
      this.emit('ack', id);
    }
    if (s.unackedBytes < 0) s.unackedBytes = 0;
    this.wake();
  }

  private onReject(s: Session, f: Extract<Frame, { type: 'REJECT' }>): void {
    const o = s.inflight.get(f.id);
    if (!o) {
      this.log.debug({ id: f.id }, 'uplink: REJECT for a message not in flight');
      return;
    }
    this.counts.rejected++;
    this.m.rejected.inc({ kind: f.kind });
    const reason = f.reason.replace(/[^\x20-\x7e]/g, '?').slice(0, 300);
    if (f.kind === 'permanent') {
      s.inflight.delete(f.id);
      s.resume.delete(f.id);
      s.unackedBytes = Math.max(0, s.unackedBytes - (o.sentOffset - o.ackedOffset));
      this.log.warn({ id: f.id, deviceId: o.rec.meta.deviceId, topic: o.rec.meta.topic, size: o.rec.size, reason }, 'uplink: the cloud rejected a message permanently: quarantined');
      try {
        const r = this.journal.quarantine(f.id, `cloud: ${reason}`);
        if (r instanceof Promise) r.catch((err: unknown) => this.log.error({ err, id: f.id }, 'uplink: journal quarantine failed'));
      } catch (err) {
        this.log.error({ err, id: f.id }, 'uplink: journal quarantine failed');
      }
      this.emit('rejected', { id: f.id, kind: f.kind, reason });
      this.wake();
      return;
    }
    // retry later: keep order: everything from the first unacknowledged message is sent again after the delay
    const delay = f.retry_after_ms ?? 1000;
    if (f.offset !== undefined && f.next_seq !== undefined && f.offset <= o.rec.size) s.resume.set(f.id, { offset: f.offset, next_seq: f.next_seq, total: o.rec.size });
    else s.resume.delete(f.id);
    this.log.info({ id: f.id, reason, retryInMs: delay }, 'uplink: the cloud asked to resend a message later');
    this.emit('rejected', { id: f.id, kind: f.kind, reason });
    this.rewind(s, delay);
  }

  /** Restart sending from the first unacknowledged record (same connection), after `delayMs`. */
  private rewind(s: Session, delayMs: number): void {
    s.epoch++;
    s.pausedUntil = Date.now() + delayMs;
    // messages in flight are sent again (the cloud drops duplicates); partly stored ones resume at their last progress
    s.inflight.clear();
    s.unackedBytes = 0;
    this.wake();
    const epoch = s.epoch;
    const t = setTimeout(() => {
      if (this.session === s && s.epoch === epoch && !s.closing) void this.pump(s, epoch);
    }, delayMs);
    t.unref();
    s.timers.push(t);
  }

  private async onCommand(s: Session, f: Extract<Frame, { type: 'COMMAND' }>): Promise<void> {
    this.counts.commands++;
    const reply = (delivered: boolean, reason?: string): void => {
      this.m.commands.inc({ result: delivered ? 'delivered' : 'not_delivered' });
      const r: CommandResultFrame = { type: 'COMMAND_RESULT', id: f.id, delivered };
      if (reason) r.reason = reason.slice(0, 1000);
      if (this.session === s && !s.closing) this.sendControl(s, r);
    };
    const payload = Buffer.from(f.payload, 'base64');
    if (!this.commands) return reply(false, 'this connector does not deliver commands');
    if (payload.length > 512 * 1024) return reply(false, 'payload larger than 512 KiB');
    if (!/^[A-Za-z0-9_.:-]{1,128}$/.test(f.name)) return reply(false, 'invalid command name (allowed: 1..128 of [A-Za-z0-9_.:-])');
    if (this.commandsInFlight >= MAX_COMMANDS_IN_FLIGHT) return reply(false, 'busy: too many commands in flight');
    this.commandsInFlight++;
    try {
      const r = await this.commands.publishCommand(f.device_id, f.name, payload, this.commandTimeoutMs);
      this.log.info({ commandId: f.id, deviceId: f.device_id, name: f.name, delivered: r.delivered, reason: r.reason }, 'uplink: command from the cloud');
      reply(r.delivered, r.delivered ? undefined : (r.reason ?? 'not delivered'));
    } catch (err) {
      this.log.warn({ err, commandId: f.id, deviceId: f.device_id }, 'uplink: command delivery failed');
      reply(false, `error: ${errorCode(err) ?? 'internal'}`);
    } finally {
      this.commandsInFlight--;
    }
  }

  private protocolError(s: Session, err: WireError, closeCode: number = CLOSE_CODES.PROTOCOL_ERROR): void {
    this.counts.protocolErrors++;
    this.m.protocolErrors.inc();
    this.log.warn({ code: err.code, reason: err.reason }, `uplink: malformed or unexpected frame from the cloud: ${err.message}; dropping the link and resuming`);
    this.lastError = { code: err.code, message: err.message, at: Date.now() };
    if (s.ws.readyState === WebSocket.OPEN) {
      try {
        s.ws.send(encodeFrame(errorFrameFor(err, true)));
      } catch {
        /* best effort */
      }
    }
    this.dropSession(s, { code: closeCode, reason: err.reason });
  }

  // ─── sending ───────────────────────────────────────────────────────────────

  private wake(): void {
    const w = [...this.waiters];
    this.waiters.clear();
    for (const f of w) f();
  }

  private waitWake(ms?: number): Promise<void> {
    return new Promise((resolve) => {
      let t: NodeJS.Timeout | undefined;
      const done = (): void => {
        if (t) clearTimeout(t);
        this.waiters.delete(done);
        resolve();
      };
      this.waiters.add(done);
      if (ms !== undefined) {
        t = setTimeout(done, Math.max(0, ms));
        t.unref();
      }
    });
  }

  private live(s: Session, epoch: number): boolean {
    return !this.closed && this.session === s && !s.closing && s.epoch === epoch;
  }

  private sendControl(s: Session, f: Frame): void {
    if (s.ws.readyState !== WebSocket.OPEN) return;
    try {
      s.ws.send(encodeFrame(f));
    } catch (err) {
      this.log.error({ err, type: f.type }, 'uplink: cannot encode a frame');
    }
  }

  /** Send a frame; resolves at once unless the socket buffer is above the high-water mark, then once it drained. */
  private sendData(s: Session, buf: Buffer): Promise<void> {
    return new Promise((resolve) => {
      if (s.ws.readyState !== WebSocket.OPEN) return resolve();
      const hwm = Math.max(4 * 1024 * 1024, 4 * s.chunkSize);
      let waited = false;
      s.ws.send(buf, { binary: true }, () => {
        if (waited) resolve();
      });
      if (s.ws.bufferedAmount > hwm) waited = true;
      else resolve();
    });
  }

  /**
   * Send journal records in order, one message after the other. Reads are issued ahead of the socket: up
   * to PREFETCH_MSGS small messages (at most PREFETCH_BYTES) and one chunk ahead within a large one, so
   * disk latency overlaps the network instead of adding to it; memory stays bounded by those constants.
   */
  private async pump(s: Session, epoch: number): Promise<void> {
    const queue: Array<{ rec: OutboundRecord; first?: ChunkRead; bytes: number }> = [];
    let queuedBytes = 0;
    let lastSeq = -1;
    try {
      while (this.live(s, epoch)) {
        const now = Date.now();
        if (s.pausedUntil > now) {
          await this.waitWake(s.pausedUntil - now);
          continue;
        }
        if (queue.length < PREFETCH_MSGS / 2) {
          for (const rec of this.journal.pending(lastSeq, PREFETCH_MSGS - queue.length)) {
            lastSeq = rec.seq;
            const e: { rec: OutboundRecord; first?: ChunkRead; bytes: number } = { rec, bytes: 0 };
            if (rec.size <= s.chunkSize && !s.resume.has(rec.id) && queuedBytes + rec.size <= PREFETCH_BYTES) {
              e.first = this.startRead(rec, 0, rec.size);
              e.bytes = rec.size;
              queuedBytes += rec.size;
            }
            queue.push(e);
          }
        }
        if (queue.length === 0) {
          await this.waitWake(1000);
          continue;
        }
        if (s.inflight.size >= this.cfg.bridge.uplink.window_messages) {
          await this.waitWake(1000);
          continue;
        }
        const e = queue.shift()!;
        queuedBytes -= e.bytes;
        if (s.inflight.has(e.rec.id)) continue;
        await this.sendMessage(s, epoch, e.rec, e.first);
      }
    } catch (err) {
      if (!this.live(s, epoch)) return;
      // a journal read failure: the message is not lost; try again on a fresh connection after a backoff
      this.noteError(err);
      this.dropSession(s, { code: CLOSE_CODES.NORMAL, reason: 'journal read failed' });
    }
  }

  /** Start reading a payload range; never rejects (errors are returned), so an abandoned read cannot go unhandled. */
  private startRead(rec: OutboundRecord, offset: number, length: number): ChunkRead {
    if (length === 0) return Promise.resolve({ data: EMPTY });
    return this.readChunk(rec, offset, length).then(
      (data) => ({ data }),
      (err: unknown) => ({ err }),
    );
  }

  private async sendMessage(s: Session, epoch: number, rec: OutboundRecord, firstRead?: ChunkRead): Promise<void> {
    const u = this.cfg.bridge.uplink;
    if (rec.size > s.maxMessageBytes) {
      // the cloud announced it would refuse it: quarantine without sending gigabytes for nothing
      this.log.warn({ id: rec.id, size: rec.size, limit: s.maxMessageBytes }, 'uplink: message larger than the cloud accepts: quarantined');
      this.counts.rejected++;
      this.m.rejected.inc({ kind: 'permanent' });
      await this.journal.quarantine(rec.id, `larger than the cloud's max_message_bytes (${s.maxMessageBytes})`);
      return;
    }
    let startOffset = 0;
    let startSeq = 0;
    const r = s.resume.get(rec.id);
    if (r && r.total === rec.size && r.offset > 0 && r.offset <= rec.size && r.next_seq > 0) {
      startOffset = r.offset;
      startSeq = r.next_seq;
      this.log.info({ id: rec.id, offset: r.offset, total: rec.size }, 'uplink: resuming a partially sent message');
    }
    s.resume.delete(rec.id);
    const o: OutMsg = { rec, sentOffset: startOffset, ackedOffset: startOffset, doneAt: 0 };
    s.inflight.set(rec.id, o);
    const meta: MessageMeta = { device_id: rec.meta.deviceId, topic: rec.meta.topic, qos: rec.meta.qos, received_at: Math.floor(rec.meta.receivedAt) };
    if (rec.meta.contentType) meta.content_type = rec.meta.contentType;
    const payloadSha = Buffer.from(rec.sha256, 'hex');
    // reads in flight ahead of the socket: READ_AHEAD_BYTES worth of chunks (at least two)
    const depth = Math.max(2, Math.min(16, Math.ceil(READ_AHEAD_BYTES / s.chunkSize)));
    const ranges = chunkRanges(rec.size, s.chunkSize, startOffset, startSeq);
    const ahead: Array<{ range: ChunkRange; read: ChunkRead }> = [];
    const fill = (): void => {
      while (ahead.length < depth) {
        const step = ranges.next();
        if (step.done) return;
        const read = ahead.length === 0 && step.value.offset === 0 && firstRead ? firstRead : this.startRead(rec, step.value.offset, step.value.length);
        ahead.push({ range: step.value, read });
      }
    };
    fill();
    while (ahead.length > 0) {
      const { range, read } = ahead[0]!;
      // byte window: wait while the unacknowledged bytes would exceed it (one chunk always fits into an empty window)
      while (
        this.live(s, epoch) &&
        s.inflight.get(rec.id) === o &&
        ((s.unackedBytes > 0 && s.unackedBytes + range.length > this.cfg.bridge.uplink.window_bytes) || this.holdForToken(s))
      ) {
        await this.waitWake(this.holdForToken(s) ? 50 : u.heartbeat_ms);
      }
      if (!this.live(s, epoch) || s.inflight.get(rec.id) !== o) return; // dropped, rewound, or acknowledged early (duplicate)
      const got = await read;
      ahead.shift();
      fill();
      if (!this.live(s, epoch) || s.inflight.get(rec.id) !== o) return;
      if (got.err !== undefined) throw got.err;
      const data = got.data;
      if (!data) {
        // the record left the journal meanwhile (TTL, overflow, quarantine): nothing to send
        s.inflight.delete(rec.id);
        s.unackedBytes = Math.max(0, s.unackedBytes - (o.sentOffset - o.ackedOffset));
        return;
      }
      if (data.length !== range.length) throw new ConnectorError('ECONN_JOURNAL_IO', `journal returned ${data.length} bytes of message ${rec.id} at ${range.offset}, expected ${range.length}`);
      const frame = encodeFrame(makeChunk({ id: rec.id, range, total: rec.size, data, meta: range.first ? meta : undefined, payloadSha256: range.last ? payloadSha : undefined }));
      s.unackedBytes += range.length;
      o.sentOffset = range.offset + range.length;
      this.counts.bytesSent += range.length;
      this.m.bytesSent.inc(range.length);
      if (range.last) {
        o.doneAt = performance.now();
        this.counts.messagesSent++;
        this.m.messagesSent.inc();
      }
      await this.sendData(s, frame);
    }
  }

  /**
   * QoS 0 with bridge.qos0=best_effort (the broker's hook): forwarded at once while the link is up and not
   * congested, never journaled, dropped (counted) otherwise. Not acknowledged to anyone; the cloud's ACK is ignored.
   */
  sendBestEffort(meta: UplinkMessageMeta, payload: Buffer): boolean {
    const s = this.session;
    const hwm = Math.max(1024 * 1024, 2 * (s?.chunkSize ?? 0));
    if (!s || !s.welcomed || s.closing || s.ws.readyState !== WebSocket.OPEN || s.ws.bufferedAmount > hwm || payload.length > 4 * s.chunkSize) {
      this.counts.bestEffortDropped++;
      this.m.bestEffort.inc({ result: 'dropped' });
      return false;
    }
    const m: MessageMeta = { device_id: meta.deviceId, topic: meta.topic, qos: meta.qos, received_at: Math.floor(meta.receivedAt) };
    if (meta.contentType) m.content_type = meta.contentType;
    try {
      for (const f of chunkMessage(`be-${randomBytes(16).toString('hex')}`, m, payload, s.chunkSize)) s.ws.send(encodeFrame(f));
    } catch (err) {
      this.log.warn({ err, deviceId: meta.deviceId }, 'uplink: a best-effort message could not be sent');
      this.counts.bestEffortDropped++;
      this.m.bestEffort.inc({ result: 'dropped' });
      return false;
    }
    this.counts.bestEffortSent++;
    this.m.bestEffort.inc({ result: 'sent' });
    return true;
  }

  /** A payload range from the journal; undefined when the record is gone; an unreadable record is quarantined (it must not block the queue). */
  private async readChunk(rec: OutboundRecord, offset: number, length: number): Promise<Buffer | undefined> {
    try {
      return await this.journal.readPayload(rec, offset, offset + length);
    } catch (err) {
      const code = errorCode(err);
      if (code === 'ECONN_NOT_FOUND') return undefined;
      if (code === 'ECONN_JOURNAL_CORRUPT') {
        this.log.error({ err, id: rec.id }, 'uplink: a journal record cannot be read back: quarantined');
        await this.journal.quarantine(rec.id, `unreadable in the journal: ${(err as Error).message}`).catch(() => undefined);
        return undefined;
      }
      throw err;
    }
  }
}


export type { PartialInfo };
