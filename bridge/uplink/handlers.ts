/**
 * Frame handlers: decoding what the cloud sends (protocol v2), ACK (cumulative
 * `upto`, selective `ids`, `progress`) → journal.ack, REJECT → quarantine or
 * rewind, TOKEN_OK/REJECTED, QUERY_RESULT, COMMAND → CommandTarget →
 * COMMAND_RESULT, ERROR. A malformed or impossible frame (including an ACK for
 * a position never sent) drops the link with a clear log line; nothing is lost,
 * the next connection resumes from the first unacknowledged record.
 */
import { WebSocket, type RawData } from 'ws';
import { redactString } from '../../core/logger.js';
import { errorCode } from '../../core/errors.js';
import { CLOSE_CODES, WireError, errorFrameFor, type CommandResultFrame } from '../../protocol/codec.js';
import { PROTOCOL_VERSION_2, SERVER_FRAMES_V2, decodeFrameV2, encodeFrameV2, type FrameV2 } from '../../protocol/v2.js';
import type { UplinkCore } from './core.js';
import type { OutMsg, Session } from './types.js';

const MAX_COMMANDS_IN_FLIGHT = 256;

export class FrameHandlers {
  constructor(private readonly up: UplinkCore) {}

  onMessage(s: Session, data: RawData, isBinary: boolean): void {
    const up = this.up;
    if (up.session !== s || s.closing) return;
    s.lastRx = Date.now();
    if (!isBinary) {
      this.protocolError(s, new WireError('unexpected', 'the cloud sent a text WebSocket message; only binary frames are allowed'), CLOSE_CODES.UNSUPPORTED_DATA);
      return;
    }
    const buf = Array.isArray(data) ? Buffer.concat(data) : Buffer.isBuffer(data) ? data : Buffer.from(data);
    let f: FrameV2;
    try {
      f = decodeFrameV2(buf);
      if (!SERVER_FRAMES_V2.has(f.type)) throw new WireError('unexpected', `${f.type} is not a frame the cloud may send`);
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
        up.log.error({ err }, 'uplink: failed to handle a frame from the cloud');
        up.conn.dropSession(s, { code: CLOSE_CODES.INTERNAL_ERROR, reason: 'internal error' });
      }
    }
  }

  private handleFrame(s: Session, f: FrameV2): void {
    const up = this.up;
    switch (f.type) {
      case 'WELCOME':
        if (f.version !== PROTOCOL_VERSION_2) throw new WireError('unsupported_version', `WELCOME version ${f.version}`);
        up.conn.onWelcome(s, f);
        return;
      case 'ACK':
        if (f.upto !== undefined && f.upto > s.lastPos) throw new WireError('malformed', `ACK up to position ${f.upto}, but the last position sent on this link is ${s.lastPos}`);
        this.onAck(s, f.ids, f.progress ?? [], f.upto);
        return;
      case 'REJECT':
        this.onReject(s, f);
        return;
      case 'PING':
        up.sendControl(s, { type: 'PONG', t: f.t, t_reply: Date.now() });
        return;
      case 'PONG':
        up.conn.onPong(s, f.t, f.t_reply);
        return;
      case 'TOKEN_OK':
        up.conn.onTokenOk(s, f.expires_at);
        return;
      case 'TOKEN_REJECTED':
        s.tokenInFlight = undefined;
        s.tokenExpiresAt = f.expires_at;
        up.log.warn({ reason: f.reason.slice(0, 200) }, 'uplink: the cloud refused the renewed token in band; reconnecting with it');
        up.conn.dropSession(s, { code: CLOSE_CODES.NORMAL, reason: 'token rollover', immediate: true });
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
        up.counts.protocolErrors++;
        up.m.protocolErrors.inc();
        up.log.warn({ code: 'ECONN_PROTOCOL', wireCode: f.code, fatal: f.fatal, id: f.id }, `uplink: the cloud reported a protocol error: ${redactString(f.message).slice(0, 300)}`);
        if (f.fatal) up.conn.dropSession(s, { code: CLOSE_CODES.PROTOCOL_ERROR, reason: `cloud error ${f.code}` });
        return;
      default:
        throw new WireError('unexpected', `${f.type} is not a frame the cloud may send`);
    }
  }

  onAck(s: Session, ids: readonly string[], progress: ReadonlyArray<{ id: string; offset: number; next_seq: number }>, upto?: number): void {
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
    if (upto !== undefined) {
      // cumulative: every message whose last chunk carried a position ≤ upto (positions grow in send order)
      for (const o of s.inflight.values()) {
        if (o.pos === 0) continue; // still being sent
        if (o.pos > upto) break;
        this.acked(s, o, now, t);
      }
    }
    for (const id of ids) {
      const o = s.inflight.get(id);
      if (!o) {
        this.up.log.debug({ id }, 'uplink: ACK for a message not in flight (already acknowledged or resent)');
        continue;
      }
      this.acked(s, o, now, t);
    }
    if (s.unackedBytes < 0) s.unackedBytes = 0;
    this.up.wake();
  }

  private acked(s: Session, o: OutMsg, now: number, t: number): void {
    const up = this.up;
    const id = o.rec.id;
    s.inflight.delete(id);
    s.resume.delete(id);
    s.unackedBytes -= o.sentOffset - o.ackedOffset;
    s.lastAckOrProgress = now;
    up.lastAckAt = now;
    if (o.doneAt > 0) {
      const lat = t - o.doneAt;
      up.m.ackLatency.observe(lat / 1000);
      s.ackLatencyMs = Math.max(lat, s.ackLatencyMs * Math.exp(-(now - s.ackLatencyAt) / 5000));
      s.ackLatencyAt = now;
    }
    up.counts.messagesAcked++;
    up.counts.bytesAcked += o.rec.size;
    up.m.messagesAcked.inc();
    up.m.bytesAcked.inc(o.rec.size);
    // Nothing is attached to the journal's ack promise: it is one promise shared by every ack of the batch
    // written together, so a handler here cost a reaction and a closure per acknowledged message, and a
    // failed ack-log write logged one error line per message of the batch (thousands a second at full
    // rate), each saying the message would be sent again, which it is not (the journal retries the write).
    try {
      up.journal.ack(id);
    } catch (err) {
      up.log.error({ err, id }, 'uplink: journal ack failed (the message will be sent again)');
    }
    up.emit('ack', id);
  }

  private onReject(s: Session, f: Extract<FrameV2, { type: 'REJECT' }>): void {
    const up = this.up;
    const o = s.inflight.get(f.id);
    if (!o && up.streamer.onReject(s, f.id, f.reason.replace(/[^\x20-\x7e]/g, '?').slice(0, 300))) {
      up.counts.rejected++;
      up.m.rejected.inc({ kind: f.kind });
      return;
    }
    if (!o) {
      up.log.debug({ id: f.id }, 'uplink: REJECT for a message not in flight');
      return;
    }
    up.counts.rejected++;
    up.m.rejected.inc({ kind: f.kind });
    const reason = f.reason.replace(/[^\x20-\x7e]/g, '?').slice(0, 300);
    if (f.kind === 'permanent') {
      s.inflight.delete(f.id);
      s.resume.delete(f.id);
      s.unackedBytes = Math.max(0, s.unackedBytes - (o.sentOffset - o.ackedOffset));
      up.log.warn({ id: f.id, deviceId: o.rec.meta.deviceId, topic: o.rec.meta.topic, size: o.rec.size, reason }, 'uplink: the cloud rejected a message permanently: quarantined');
      up.quarantine(f.id, `cloud: ${reason}`);
      up.emit('rejected', { id: f.id, kind: f.kind, reason });
      up.wake();
      return;
    }
    // retry later: keep order: everything from the first unacknowledged message is sent again after the delay
    const delay = f.retry_after_ms ?? 1000;
    if (f.offset !== undefined && f.next_seq !== undefined && f.offset <= o.rec.size) s.resume.set(f.id, { offset: f.offset, next_seq: f.next_seq, total: o.rec.size });
    else s.resume.delete(f.id);
    up.log.info({ id: f.id, reason, retryInMs: delay }, 'uplink: the cloud asked to resend a message later');
    up.emit('rejected', { id: f.id, kind: f.kind, reason });
    up.sender.rewind(s, delay);
  }

  private async onCommand(s: Session, f: Extract<FrameV2, { type: 'COMMAND' }>): Promise<void> {
    const up = this.up;
    up.counts.commands++;
    const reply = (delivered: boolean, reason?: string): void => {
      up.m.commands.inc({ result: delivered ? 'delivered' : 'not_delivered' });
      const r: CommandResultFrame = { type: 'COMMAND_RESULT', id: f.id, delivered };
      if (reason) r.reason = reason.slice(0, 1000);
      if (up.session === s && !s.closing) up.sendControl(s, r);
    };
    const payload = Buffer.from(f.payload, 'base64');
    if (!up.commands) return reply(false, 'this connector does not deliver commands');
    if (payload.length > 512 * 1024) return reply(false, 'payload larger than 512 KiB');
    if (!/^[A-Za-z0-9_.:-]{1,128}$/.test(f.name)) return reply(false, 'invalid command name (allowed: 1..128 of [A-Za-z0-9_.:-])');
    if (up.commandsInFlight >= MAX_COMMANDS_IN_FLIGHT) return reply(false, 'busy: too many commands in flight');
    up.commandsInFlight++;
    try {
      const r = await up.commands.publishCommand(f.device_id, f.name, payload, up.commandTimeoutMs);
      up.log.info({ commandId: f.id, deviceId: f.device_id, name: f.name, delivered: r.delivered, reason: r.reason }, 'uplink: command from the cloud');
      reply(r.delivered, r.delivered ? undefined : (r.reason ?? 'not delivered'));
    } catch (err) {
      up.log.warn({ err, commandId: f.id, deviceId: f.device_id }, 'uplink: command delivery failed');
      reply(false, `error: ${errorCode(err) ?? 'internal'}`);
    } finally {
      up.commandsInFlight--;
    }
  }

  protocolError(s: Session, err: WireError, closeCode: number = CLOSE_CODES.PROTOCOL_ERROR): void {
    const up = this.up;
    up.counts.protocolErrors++;
    up.m.protocolErrors.inc();
    up.log.warn({ code: err.code, reason: err.reason }, `uplink: malformed or unexpected frame from the cloud: ${err.message}; dropping the link and resuming`);
    up.lastError = { code: err.code, message: err.message, at: Date.now() };
    if (s.ws.readyState === WebSocket.OPEN) {
      try {
        s.ws.send(encodeFrameV2(errorFrameFor(err, true)));
      } catch {
        /* best effort */
      }
    }
    up.conn.dropSession(s, { code: closeCode, reason: err.reason });
  }
}
