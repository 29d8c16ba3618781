/**
 * Connection and token: opening the WSS link (TLS, subprotocol, bearer token,
 * X-Signature), HELLO/WELCOME, heartbeats and the dead-link judgement, the
 * in-band token renewal (rate-bounded, clamped timers, cloud clock offset),
 * and closing / reconnecting with backoff.
 */
import type { IncomingMessage, ClientRequest } from 'node:http';
import { WebSocket, type RawData } from 'ws';
import { redactString } from '../../core/logger.js';
import { SIGNATURE_HEADER, signRequest } from '../../protocol/signature.js';
import { ConnectorError } from '../../core/errors.js';
import { resolveSecret } from '../../core/secrets.js';
import { CLOSE_CODES, LIMITS, WireError } from '../../protocol/codec.js';
import { FEATURE_STREAM, PROTOCOL_VERSION_2, SUBPROTOCOL_V2, type FrameV2 } from '../../protocol/v2.js';
import { parseRetryAfter } from '../backoff.js';
import { cloudTlsOptions } from '../cloud-token.js';
import type { UplinkCore } from './core.js';
import { clampDelay, minRenewalIntervalMs } from './timers.js';
import type { CloseReason, OutMsg, Session } from './types.js';

/** Largest body of a refused upgrade read for the log line. */
const MAX_REFUSAL_BODY = 2048;

export class Connection {
  constructor(private readonly up: UplinkCore) {}

  connect(): void {
    const up = this.up;
    if (up.closed || up.connecting || up.session) return;
    const p = this.doConnect()
      .catch((err: unknown) => {
        up.noteError(err);
        this.scheduleReconnect((err as { retryInMs?: number; retryAfterMs?: number }).retryInMs ?? (err as { retryAfterMs?: number }).retryAfterMs);
      })
      .finally(() => {
        if (up.connecting === p) up.connecting = undefined;
      });
    up.connecting = p;
  }

  private async doConnect(): Promise<void> {
    const up = this.up;
    up.setState('connecting');
    if (up.sessionCount > 0) {
      up.counts.reconnects++;
      up.m.reconnects.inc();
    }
    const token = await up.tokens.getToken();
    if (up.closed) return;
    const u = up.settings.uplink;
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
        secret = resolveSecret(u.signing_secret, up.env);
      } catch (err) {
        throw new ConnectorError('ECONN_UPLINK', `cannot read bridge.uplink.signing_secret: ${(err as Error).message}`, { cause: err });
      }
      headers[SIGNATURE_HEADER] = signRequest(secret, 'GET', url.pathname + url.search, Math.floor(Date.now() / 1000));
    }
    const ws = new WebSocket(url, [SUBPROTOCOL_V2], {
      ...tlsOpts,
      headers,
      perMessageDeflate: false,
      // a frame larger than any the protocol allows is refused by ws (close 1009) before it is buffered whole
      maxPayload: LIMITS.maxFrameBytes,
      handshakeTimeout: Math.max(1000, u.dead_after_ms),
      followRedirects: false,
      // An all-zero masking key: ws then sends each frame without XOR-ing and copying the payload (a full pass
      // over every byte we upload). Masking (RFC 6455 §10.3) protects intermediaries that read the stream as
      // HTTP from attacker-chosen bytes; this stream is always TLS (the schema requires wss://), so no
      // intermediary reads it, and the server accepts any key.
      generateMask: (mask: Buffer) => void mask.fill(0),
    });
    const n = ++up.sessionCount;
    const now = Date.now();
    const s: Session = {
      ws,
      n,
      openedAt: now,
      welcomed: false,
      closing: false,
      epoch: 0,
      inflight: new Map(),
      unackedBytes: 0,
      resume: new Map(),
      streamFeature: false,
      streams: new Map(),
      chunkSize: u.chunk_size,
      maxFrameBytes: LIMITS.maxFrameBytes,
      maxMessageBytes: Number.MAX_SAFE_INTEGER,
      lastPos: 0,
      batch: [],
      batchBytes: 0,
      tokenExpiresAt: 0,
      tokenSetAt: 0,
      tokenSentAt: 0,
      cloudOffsetMs: 0,
      lastRenewalAt: 0,
      ackLatencyMs: 0,
      ackLatencyAt: 0,
      presentedToken: token,
      tokenInFlight: undefined,
      pausedUntil: 0,
      lastRx: now,
      lastAckOrProgress: now,
      timers: [],
      tokenTimer: undefined,
      lastQueryAt: 0,
    };
    up.session = s;
    up.setState('handshake');
    ws.on('upgrade', (res: IncomingMessage) => {
      const sock = res.socket as { setNoDelay?: (b: boolean) => void };
      sock.setNoDelay?.(true);
    });
    ws.on('unexpected-response', (req: ClientRequest, res: IncomingMessage) => this.onUnexpectedResponse(s, req, res));
    ws.on('open', () => this.onOpen(s));
    ws.on('message', (data: RawData, isBinary: boolean) => up.handlers.onMessage(s, data, isBinary));
    ws.on('ping', () => (s.lastRx = Date.now()));
    ws.on('error', (err: Error) => {
      if (up.session !== s) return;
      // e.g. a frame over maxPayload (ws closes with 1009): say so plainly, the close handler reconnects
      up.noteError(new ConnectorError('ECONN_UPLINK', `uplink to ${u.url}: ${redactString(err.message)}`, { cause: err }));
    });
    ws.on('close', (code: number, reason: Buffer) => this.onClose(s, code, reason.toString('utf8')));
  }

  private onUnexpectedResponse(s: Session, req: ClientRequest, res: IncomingMessage): void {
    const up = this.up;
    const status = res.statusCode ?? 0;
    const retryAfterMs = parseRetryAfter(res.headers['retry-after']);
    const hint =
      status === 401
        ? 'the cloud refused the access token or the request signature (check bridge.token and bridge.uplink.signing_secret)'
        : status === 403
          ? 'the access token lacks the ingest scope (check bridge.token.scope)'
          : status === 400
            ? `the cloud does not speak ${SUBPROTOCOL_V2}`
            : status === 404
              ? 'wrong path in bridge.uplink.url'
              : 'the cloud is unavailable';
    s.closeReason = { code: 0, reason: `upgrade refused with HTTP ${status}`, retryAfterMs, invalidateToken: status === 401 };
    // the cloud's own words (e.g. which protocol versions it speaks), bounded and printable only
    let body = '';
    const done = (): void => {
      const said = body.replace(/[^\x20-\x7e]/g, '?').slice(0, 300);
      up.noteError(new ConnectorError('ECONN_UPLINK', `uplink upgrade refused: HTTP ${status}: ${hint}${said ? ` (cloud: ${said})` : ''}`));
      req.destroy();
      s.ws.terminate();
    };
    const timer = setTimeout(done, 1000);
    timer.unref();
    res.setEncoding('utf8');
    res.on('data', (d: string) => {
      if (body.length < MAX_REFUSAL_BODY) body += d.slice(0, MAX_REFUSAL_BODY - body.length);
    });
    res.once('end', () => {
      clearTimeout(timer);
      done();
    });
    res.once('error', () => {
      clearTimeout(timer);
      done();
    });
  }

  private onOpen(s: Session): void {
    const up = this.up;
    if (up.session !== s || up.closed) return;
    const u = up.settings.uplink;
    if (s.ws.protocol !== SUBPROTOCOL_V2) {
      up.handlers.protocolError(s, new WireError('unexpected', `the cloud did not select the subprotocol ${SUBPROTOCOL_V2}`));
      return;
    }
    s.lastRx = Date.now();
    // the `stream` feature (§13.10) is offered: a cloud without it ignores the field, and uploads are then sent once stored, as before
    up.sendControl(s, {
      type: 'HELLO',
      version: PROTOCOL_VERSION_2,
      gateway_id: up.settings.gatewayId,
      software: up.software,
      chunk_size: u.chunk_size,
      heartbeat_ms: u.heartbeat_ms,
      features: [FEATURE_STREAM],
    });
    // no WELCOME within the dead-link timeout: give up on this connection
    const t = setTimeout(() => {
      if (up.session === s && !s.welcomed) this.dropSession(s, { code: CLOSE_CODES.HEARTBEAT_TIMEOUT, reason: `no WELCOME within ${u.dead_after_ms} ms` });
    }, clampDelay(u.dead_after_ms));
    t.unref();
    s.timers.push(t);
  }

  onWelcome(s: Session, f: Extract<FrameV2, { type: 'WELCOME' }>): void {
    const up = this.up;
    s.welcomed = true;
    s.maxFrameBytes = Math.min(f.max_frame_bytes, LIMITS.maxFrameBytes);
    s.chunkSize = Math.min(up.settings.uplink.chunk_size, f.max_chunk_bytes, f.max_frame_bytes - 64 * 1024 > 0 ? f.max_frame_bytes - 64 * 1024 : f.max_chunk_bytes);
    s.maxMessageBytes = f.max_message_bytes;
    s.tokenExpiresAt = f.token_expires_at;
    s.tokenSetAt = Date.now();
    for (const p of f.partials) s.resume.set(p.id, { offset: p.offset, next_seq: p.next_seq, total: p.total });
    s.streamFeature = f.features?.includes(FEATURE_STREAM) ?? false;
    up.streamer.onWelcome(s, f.partials);
    s.lastAckOrProgress = Date.now();
    up.setState('connected');
    up.log.info({ session: f.session_id, partials: f.partials.length, chunkSize: s.chunkSize, tokenExpiresInS: Math.round((f.token_expires_at - Date.now()) / 1000) }, 'uplink connected');
    up.emit('connected', { sessionId: f.session_id });
    this.armTimers(s);
    void up.sender.pump(s, s.epoch);
    // a token renewed while we were connecting is presented at once
    void this.presentNewToken();
  }

  armTimers(s: Session): void {
    const up = this.up;
    for (const t of s.timers) clearTimeout(t);
    s.timers = [];
    const u = up.settings.uplink;
    const hb = setInterval(
      () => {
        if (up.session !== s || s.closing) return;
        const now = Date.now();
        if (now - s.lastRx > u.dead_after_ms) {
          up.log.warn({ silentForMs: now - s.lastRx, deadAfterMs: u.dead_after_ms }, 'uplink: nothing arrived from the cloud within dead_after_ms: link dead, reconnecting');
          this.dropSession(s, { code: CLOSE_CODES.HEARTBEAT_TIMEOUT, reason: 'dead link' }, true);
          return;
        }
        // a message we sent completely with no ACK/progress for dead_after_ms: the link is not doing its job
        if (s.inflight.size > 0 && now - s.lastAckOrProgress > u.dead_after_ms * 2) {
          const oldest = s.inflight.values().next().value as OutMsg;
          if (oldest.doneAt > 0) {
            up.log.warn({ id: oldest.rec.id, waitedMs: now - s.lastAckOrProgress }, 'uplink: no acknowledgement from the cloud: link judged dead, reconnecting');
            this.dropSession(s, { code: CLOSE_CODES.HEARTBEAT_TIMEOUT, reason: 'no acknowledgement' }, true);
            return;
          }
        }
        up.sendControl(s, { type: 'PING', t: now });
        // stalled on the byte window by one big message: ask the cloud where it stands (a cloud without progress ACKs)
        let cur: OutMsg | undefined;
        for (const o of s.inflight.values()) if (o.doneAt === 0) cur = o;
        if (cur && s.unackedBytes >= u.window_bytes - s.chunkSize && now - s.lastAckOrProgress > u.heartbeat_ms && now - s.lastQueryAt > u.heartbeat_ms) {
          s.lastQueryAt = now;
          up.sendControl(s, { type: 'QUERY', ids: [cur.rec.id] });
        }
      },
      clampDelay(Math.max(50, Math.min(u.heartbeat_ms, Math.floor(u.dead_after_ms / 3)))),
    );
    hb.unref();
    s.timers.push(hb);
    this.armTokenTimer(s);
  }

  /**
   * Present a renewed token `tokenMargin` before the cloud's expiry of the one in force (converted to the
   * local clock with the offset PONGs measured). If the token client renewed already (its 'token' event
   * presents it at once) there is nothing to do; otherwise renew now. The timer is clamped (a token living
   * for months does not overflow it) and renewals are at least minRenewalIntervalMs apart (a gateway clock
   * ahead of the cloud's makes every token look expired: that must not become a tight loop).
   */
  armTokenTimer(s: Session): void {
    const up = this.up;
    if (s.tokenTimer) clearTimeout(s.tokenTimer);
    s.tokenTimer = undefined;
    if (s.tokenExpiresAt <= 0 || s.closing) return;
    const now = Date.now();
    const expiresLocal = s.tokenExpiresAt - s.cloudOffsetMs;
    const lifetime = Math.max(0, expiresLocal - s.tokenSetAt);
    let at = expiresLocal - this.tokenMargin(s);
    if (s.lastRenewalAt > 0) at = Math.max(at, s.lastRenewalAt + minRenewalIntervalMs(lifetime));
    s.tokenTimer = setTimeout(() => {
      s.tokenTimer = undefined;
      if (up.session !== s || s.closing) return;
      // a deadline beyond the longest timer (a token living for months) is reached by re-arming
      if (Date.now() < at - 5) return this.armTokenTimer(s);
      if (s.tokenInFlight) return;
      s.lastRenewalAt = Date.now();
      const current = up.tokens.peek();
      if (current && current !== s.presentedToken) {
        void this.presentNewToken();
        return;
      }
      up.log.info({ expiresInMs: expiresLocal - Date.now() }, 'uplink: renewing the cloud token before it expires on the link');
      up.tokens.renew().catch(() => {
        /* logged by the token client; the cloud closes with 4001 at expiry and we reconnect */
      });
      // if the renewal fails or yields the token we hold, nothing else re-arms the timer: try again later, rate-bounded
      this.armTokenTimer(s);
    }, clampDelay(at - now));
    s.tokenTimer.unref();
  }

  /**
   * How long before the cloud's expiry a renewed token should be on its way: renew_before_s (at most half
   * the lifetime), but at least half the lifetime up to 10 s, and at least twice the recent ACK latency:
   * the TOKEN frame queues behind the data already sent (up to window_bytes), which a slow cloud may
   * take a while to work through.
   */
  tokenMargin(s: Session): number {
    const lifetime = Math.max(0, s.tokenExpiresAt - s.cloudOffsetMs - s.tokenSetAt);
    const before = this.up.settings.token.renew_before_s * 1000;
    const base = Math.max(Math.min(before, lifetime / 2), Math.min(lifetime / 2, 10_000));
    return Math.max(base, Math.min(lifetime * 0.8, 2 * this.queueEstimate(s) + 250));
  }

  /**
   * Hold new data while a renewed token is on its way and the token in force is close to its expiry
   * (closer than twice the cloud's queue plus a second): nothing more queues in front of the cloud's answer.
   */
  holdForToken(s: Session): boolean {
    if (s.tokenInFlight === undefined) return false;
    const left = s.tokenExpiresAt - s.cloudOffsetMs - Date.now();
    return left > 0 && left < 2 * this.queueEstimate(s) + 1000;
  }

  /** The recent ACK latency (ms): a maximum decaying with a 5 s time constant. */
  queueEstimate(s: Session): number {
    return s.ackLatencyMs * Math.exp(-(Date.now() - s.ackLatencyAt) / 5000);
  }

  /** A PONG: estimate the cloud's clock offset (re-arms the token timer when it moved by more than a second). */
  onPong(s: Session, t: number, tReply: number): void {
    const now = Date.now();
    const rtt = now - t;
    if (rtt < 0 || rtt > 60_000) return; // not our PING, or useless for timing
    const offset = Math.round(tReply - (t + rtt / 2));
    if (Math.abs(offset - s.cloudOffsetMs) > 1000) {
      s.cloudOffsetMs = offset;
      this.armTokenTimer(s);
    }
  }

  async presentNewToken(): Promise<void> {
    const up = this.up;
    const s = up.session;
    if (!s || !s.welcomed || s.closing || s.tokenInFlight) return;
    let token: string;
    try {
      token = await up.tokens.getToken();
    } catch {
      return; // logged by the token client
    }
    if (up.session !== s || s.closing || token === s.presentedToken || s.tokenInFlight) return;
    s.tokenInFlight = token;
    s.tokenSentAt = Date.now();
    up.sendControl(s, { type: 'TOKEN', access_token: token });
  }

  onTokenOk(s: Session, expiresAt: number): void {
    const up = this.up;
    if (s.tokenInFlight) {
      s.presentedToken = s.tokenInFlight;
      s.tokenInFlight = undefined;
      up.counts.tokensInBand++;
    }
    s.tokenExpiresAt = expiresAt;
    s.tokenSetAt = s.tokenSentAt || Date.now(); // the lifetime counts from when the token was sent, not from this answer
    up.log.info({ expiresInS: Math.round((expiresAt - s.cloudOffsetMs - Date.now()) / 1000) }, 'uplink: renewed token accepted in band');
    up.wake();
    this.armTokenTimer(s);
    up.emit('token-renewed', { expiresAt });
    // the token client may have renewed again meanwhile
    void this.presentNewToken();
  }

  private onClose(s: Session, code: number, reason: string): void {
    const up = this.up;
    if (up.session !== s) return;
    this.endSession(s);
    if (up.closed) return;
    const why = s.closeReason;
    const u = up.settings.uplink;
    const text = `${why?.reason ?? reason ?? ''}`.slice(0, 200);
    let retryAfterMs = why?.retryAfterMs;
    let immediate = why?.immediate ?? false;
    if (why?.invalidateToken || code === CLOSE_CODES.TOKEN_INVALID) up.tokens.invalidate();
    if (code === CLOSE_CODES.TOKEN_EXPIRED) {
      up.tokens.invalidate(s.presentedToken);
      up.log.warn('uplink: the cloud closed the link because the access token expired (renewal was not in time); reconnecting with a new token');
      immediate = true;
    } else if (code === CLOSE_CODES.REPLACED) {
      up.noteError(new ConnectorError('ECONN_UPLINK', `another connector with gateway id ${up.settings.gatewayId} replaced this connection (daemon.server_name must be unique per gateway)`));
      retryAfterMs = u.reconnect_max_ms;
    } else if (code === CLOSE_CODES.UNSUPPORTED_VERSION) {
      up.noteError(new ConnectorError('ECONN_PROTOCOL', `the cloud does not speak protocol version ${PROTOCOL_VERSION_2}${reason ? ` (cloud: ${reason.replace(/[^\x20-\x7e]/g, '?').slice(0, 120)})` : ''}`));
      retryAfterMs = u.reconnect_max_ms;
    } else if (code === CLOSE_CODES.MESSAGE_TOO_BIG && !why) {
      up.noteError(new ConnectorError('ECONN_PROTOCOL', `the cloud sent a frame larger than ${LIMITS.maxFrameBytes} bytes: link closed (1009), reconnecting`));
    } else if (code === 4007) {
      // the reference cloud: HELLO's gateway_id is not the authenticated client's
      up.noteError(new ConnectorError('ECONN_UPLINK', `the cloud refused gateway id ${up.settings.gatewayId} for this client${reason ? ` (cloud: ${reason.replace(/[^\x20-\x7e]/g, '?').slice(0, 120)})` : ''}`));
      retryAfterMs = u.reconnect_max_ms;
    }
    // a link that worked for a while starts over at the shortest delay
    const worked = s.welcomed && (up.lastAckAt > s.openedAt || Date.now() - s.openedAt > Math.max(5000, u.dead_after_ms));
    if (worked) up.backoff.reset();
    up.log.info({ code, reason: text, wasConnectedMs: s.welcomed ? Date.now() - s.openedAt : 0, inflight: s.inflight.size }, 'uplink disconnected');
    up.emit('disconnected', { code, reason: text });
    if (immediate) this.scheduleReconnect(0, true);
    else this.scheduleReconnect(retryAfterMs);
  }

  endSession(s: Session): void {
    const up = this.up;
    for (const t of s.timers) clearTimeout(t);
    s.timers = [];
    if (s.tokenTimer) clearTimeout(s.tokenTimer);
    s.tokenTimer = undefined;
    s.closing = true;
    s.epoch++;
    s.batch = [];
    s.batchBytes = 0;
    if (up.session === s) up.session = undefined;
    up.wake();
  }

  /** Drop a session: close (or terminate when `hard`), and let onClose schedule the reconnect. */
  dropSession(s: Session, why: CloseReason, hard = false): void {
    if (s.closing) return;
    s.closeReason = why;
    s.closing = true;
    s.epoch++;
    this.up.wake();
    if (hard || s.ws.readyState !== WebSocket.OPEN) {
      s.ws.terminate();
      return;
    }
    s.ws.close(why.code || CLOSE_CODES.NORMAL, why.reason.slice(0, 120));
    const t = setTimeout(() => s.ws.terminate(), 1000);
    t.unref();
  }

  scheduleReconnect(floorMs?: number, immediate = false): void {
    const up = this.up;
    if (up.closed) return;
    if (up.reconnectTimer) clearTimeout(up.reconnectTimer);
    const delay = immediate ? 0 : up.backoff.next(floorMs);
    up.setState('backoff');
    if (!immediate) up.log.info({ delayMs: delay, attempt: up.backoff.attempts }, `uplink: reconnecting in ${(delay / 1000).toFixed(2)} s`);
    up.reconnectTimer = setTimeout(() => {
      up.reconnectTimer = undefined;
      this.connect();
    }, clampDelay(delay));
    up.reconnectTimer.unref();
  }
}
