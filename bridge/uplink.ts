/**
 * The uplink: ONE outbound WebSocket-over-TLS connection to the cloud ingest
 * (docs/PROTOCOL.md, protocol version 2), fed from the journal. This module is
 * the facade (the `Uplink` component); the parts live in bridge/uplink/:
 *
 *  - connection.ts — connection and token: wss:// only, TLS >= min_tls_version,
 *    certificate validation always on, optional mTLS, TCP_NODELAY, the OAuth2
 *    token on the upgrade, optional X-Signature; HELLO/WELCOME; heartbeats and
 *    the dead-link judgement (no frame for dead_after_ms); in-band token
 *    renewal (TOKEN → TOKEN_OK) with clamped timers and a bounded rate;
 *    reconnect with backoff; resume from the first unacknowledged record.
 *  - sender.ts — sender and window: journal order, each message's chunks
 *    contiguously, many per BATCH frame, bounded window of messages and bytes,
 *    WebSocket back-pressure; a record the encoder refuses is quarantined.
 *  - handlers.ts — frame handlers: cumulative/selective ACK → journal.ack,
 *    REJECT permanent → quarantine, REJECT retry → rewind, COMMAND →
 *    CommandTarget → COMMAND_RESULT, hostile frames → drop and resume.
 *  - timers.ts — every delay clamped to what setTimeout honours.
 *  - core.ts / types.ts — the shared state.
 */
import { EventEmitter } from 'node:events';
import { WebSocket } from 'ws';
import { Counter, Gauge, Histogram } from 'prom-client';
import type { Component } from '../core/component.js';
import { CLOSE_CODES } from '../protocol/codec.js';
import { Backoff } from './backoff.js';
import { UplinkCore } from './uplink/core.js';
import { Connection } from './uplink/connection.js';
import { Sender } from './uplink/sender.js';
import { FrameHandlers } from './uplink/handlers.js';
import { Streamer } from './uplink/streamer.js';
import { uplinkSettings, type UplinkSettings, type UplinkJournal, type OutboundRecord, type UplinkState } from './uplink/types.js';
import type { Logger } from '../core/logger.js';
import type { Registry } from 'prom-client';
import type { CommandTarget, UplinkMessageMeta } from '../core/ports.js';
import type { CloudTokenClient } from './cloud-token.js';
import type { UplinkCounts } from './uplink/core.js';

export { uplinkSettings };
export type { UplinkSettings, UplinkJournal, OutboundRecord, UplinkState, UplinkCounts };
export type { PartialInfo } from '../protocol/codec.js';

export interface UplinkOptions {
  /** The uplink's configuration sections (uplinkSettings(config) builds them from a full Config). */
  settings: UplinkSettings;
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

export class Uplink extends EventEmitter implements Component {
  readonly name = 'uplink';
  private readonly up: UplinkCore;
  private readonly onAppend = (): void => this.up.wake();
  private readonly onToken = (): void => void this.up.conn.presentNewToken();

  constructor(opts: UplinkOptions) {
    super();
    const u = opts.settings.uplink;
    const registers = [opts.metrics];
    const get = (): UplinkCore => this.up;
    const metrics = {
      state: new Gauge({ name: 'connector_uplink_state', help: 'uplink state (1 for the current state)', labelNames: ['state'], registers }),
      reconnects: new Counter({ name: 'connector_uplink_reconnects_total', help: 'connection attempts after the first one', registers }),
      messagesSent: new Counter({ name: 'connector_uplink_messages_sent_total', help: 'messages whose last chunk was sent (resends included)', registers }),
      bytesSent: new Counter({ name: 'connector_uplink_bytes_sent_total', help: 'payload bytes sent in chunks (resends included)', registers }),
      messagesAcked: new Counter({ name: 'connector_uplink_messages_acked_total', help: 'messages the cloud acknowledged as stored', registers }),
      bytesAcked: new Counter({ name: 'connector_uplink_bytes_acked_total', help: 'payload bytes of messages the cloud acknowledged', registers }),
      rejected: new Counter({ name: 'connector_uplink_rejected_total', help: 'messages the cloud rejected', labelNames: ['kind'], registers }),
      quarantined: new Counter({ name: 'connector_uplink_quarantined_total', help: 'records the uplink moved to quarantine (cloud REJECT permanent, unencodable, unreadable, too large)', registers }),
      protocolErrors: new Counter({ name: 'connector_uplink_protocol_errors_total', help: 'malformed or unexpected frames from the cloud', registers }),
      commands: new Counter({ name: 'connector_uplink_commands_total', help: 'cloud commands by result', labelNames: ['result'], registers }),
      bestEffort: new Counter({ name: 'connector_uplink_best_effort_total', help: 'QoS 0 best-effort messages (bridge.qos0=best_effort), sent or dropped', labelNames: ['result'], registers }),
      batches: new Counter({ name: 'connector_uplink_batches_total', help: 'BATCH frames sent (messages per batch = messages_sent / batches)', registers }),
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
          const s = get().session;
          const at = s?.welcomed ? s.tokenExpiresAt - s.cloudOffsetMs : get().tokens.expiresAt;
          this.set(at ? Math.max(0, (at - Date.now()) / 1000) : 0);
        },
      }),
      lastAckAge: new Gauge({
        name: 'connector_uplink_last_ack_age_seconds',
        help: 'seconds since the cloud last acknowledged a message (since start when none yet)',
        registers,
        collect() {
          const up = get();
          this.set(up.started ? (Date.now() - (up.lastAckAt || up.startedAt)) / 1000 : 0);
        },
      }),
      inflight: new Gauge({
        name: 'connector_uplink_inflight_messages',
        help: 'messages sent and not yet acknowledged',
        registers,
        collect() {
          this.set(get().session?.inflight.size ?? 0);
        },
      }),
    };
    this.up = new UplinkCore(
      {
        settings: opts.settings,
        journal: opts.journal,
        tokens: opts.tokens,
        commands: opts.commands,
        log: opts.logger.child({ component: 'uplink' }),
        env: opts.env ?? process.env,
        software: opts.software ?? 'edge-connector',
        commandTimeoutMs: opts.commandTimeoutMs ?? 30_000,
        random: opts.random,
        backoff: new Backoff({ minMs: u.reconnect_min_ms, maxMs: u.reconnect_max_ms, random: opts.random }),
        metrics,
      },
      this,
    );
    this.up.conn = new Connection(this.up);
    this.up.sender = new Sender(this.up);
    this.up.handlers = new FrameHandlers(this.up);
    this.up.streamer = new Streamer(this.up);
    this.up.setState('stopped');
  }

  get state(): UplinkState {
    return this.up.stateValue;
  }

  /** Counters also exposed through status() (and used by tests). */
  get counts(): Readonly<UplinkCounts> {
    return this.up.counts;
  }

  async start(): Promise<void> {
    const up = this.up;
    if (up.started || up.closed) return;
    up.started = true;
    up.startedAt = Date.now();
    up.journal.on('append', this.onAppend);
    up.journal.on('upload', up.streamer.onUpload);
    up.tokens.on('token', this.onToken);
    up.conn.connect();
  }

  /** Graceful: stop sending, close the connection (1000), bounded. Unacknowledged messages stay in the journal. */
  async close(): Promise<void> {
    const up = this.up;
    if (up.closed) return;
    up.closed = true;
    up.journal.off('append', this.onAppend);
    up.journal.off('upload', up.streamer.onUpload);
    up.tokens.off('token', this.onToken);
    if (up.reconnectTimer) clearTimeout(up.reconnectTimer);
    up.reconnectTimer = undefined;
    const s = up.session;
    up.wake();
    if (s) {
      up.setState('closing');
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
      up.conn.endSession(s);
    }
    up.setState('stopped');
  }

  /**
   * Apply new configuration sections (the owner's reload hands over uplinkSettings(next)); returns what
   * changed. Not Component.reload: the uplink never sees the whole Config.
   */
  async reconfigure(next: UplinkSettings): Promise<string[]> {
    const up = this.up;
    const changed: string[] = [];
    const u0 = up.settings.uplink;
    const u1 = next.uplink;
    for (const k of ['chunk_size', 'window_messages', 'window_bytes', 'heartbeat_ms', 'dead_after_ms', 'reconnect_min_ms', 'reconnect_max_ms'] as const) {
      if (u0[k] !== u1[k]) changed.push(`bridge.uplink.${k} ${u0[k]} -> ${u1[k]}`);
    }
    const tlsChanged = u0.ca_file !== u1.ca_file || u0.cert_file !== u1.cert_file || u0.key_file !== u1.key_file || u0.min_tls_version !== u1.min_tls_version;
    const urlChanged = u0.url !== u1.url;
    up.settings = next;
    if (u0.reconnect_min_ms !== u1.reconnect_min_ms || u0.reconnect_max_ms !== u1.reconnect_max_ms) {
      up.backoff = new Backoff({ minMs: u1.reconnect_min_ms, maxMs: u1.reconnect_max_ms, random: up.random });
    }
    changed.push(...up.tokens.reload(next.token, u1));
    if (urlChanged) {
      changed.push(`bridge.uplink.url changed: reconnecting to ${u1.url}`);
      const s = up.session;
      if (s) up.conn.dropSession(s, { code: CLOSE_CODES.NORMAL, reason: 'configuration changed', immediate: true });
    } else if (tlsChanged) {
      // the link in place was verified with the old settings and stays up; the next connection uses the new ones
      changed.push('bridge.uplink TLS settings changed: applied to the next connection (the current link stays up)');
    }
    // a new heartbeat interval needs the timers re-armed
    if (up.session?.welcomed && (u0.heartbeat_ms !== u1.heartbeat_ms || u0.dead_after_ms !== u1.dead_after_ms)) up.conn.armTimers(up.session);
    up.wake();
    return changed;
  }

  /** Facts for `connector status` (names read by daemon/status.ts: state, last_ack_age_s, reconnects, token_expires_at). */
  status(): Record<string, unknown> {
    const up = this.up;
    const now = Date.now();
    const st = this.safeStats();
    const s = up.session;
    const tokenAt = s?.welcomed ? s.tokenExpiresAt - s.cloudOffsetMs : up.tokens.expiresAt;
    const c = up.counts;
    return {
      state: up.stateValue,
      url: up.settings.uplink.url,
      connected_for_s: s?.welcomed ? Math.round((now - s.openedAt) / 1000) : 0,
      last_ack_age_s: up.lastAckAt ? Math.round((now - up.lastAckAt) / 1000) : null,
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
      batches_sent: c.batches,
      rejected: c.rejected,
      quarantined: c.quarantined,
      protocol_errors: c.protocolErrors,
      tokens_in_band: c.tokensInBand,
      best_effort_sent: c.bestEffortSent,
      best_effort_dropped: c.bestEffortDropped,
      last_error: up.lastError ? { code: up.lastError.code, message: up.lastError.message, at: new Date(up.lastError.at).toISOString() } : null,
    };
  }

  /**
   * Readiness: judged by acknowledgements, not by the socket. Ready when the
   * backlog is empty, or its oldest message is younger than staleAfterMs, or
   * the cloud acknowledged something within staleAfterMs (a big backlog that
   * is draining).
   */
  readiness(staleAfterMs = this.up.settings.staleAfterS * 1000): { ok: boolean; reason?: string } {
    const up = this.up;
    const st = this.safeStats();
    if (!st || st.records === 0) return { ok: true };
    const now = Date.now();
    const oldestAge = st.oldestAgeMs;
    if (oldestAge <= staleAfterMs) return { ok: true };
    if (up.lastAckAt && now - up.lastAckAt <= staleAfterMs) return { ok: true };
    const lastAck = up.lastAckAt ? `${Math.round((now - up.lastAckAt) / 1000)} s ago` : 'never since start';
    return {
      ok: false,
      reason: `${st.records} messages wait for the cloud, the oldest for ${Math.round(oldestAge / 1000)} s; last cloud ack ${lastAck} (uplink ${up.stateValue}${up.lastError ? `: ${up.lastError.message}` : ''})`,
    };
  }

  /**
   * QoS 0 with bridge.qos0=best_effort (the broker's hook): forwarded at once while the link is up and not
   * congested, never journaled, dropped (counted) otherwise.
   */
  sendBestEffort(meta: UplinkMessageMeta, payload: Buffer): boolean {
    return this.up.sender.sendBestEffort(meta, payload);
  }

  private safeStats(): { records: number; bytes: number; oldestAgeMs: number } | undefined {
    try {
      const st = this.up.journal.stats();
      return { records: st.pendingMessages, bytes: st.pendingBytes, oldestAgeMs: st.oldestPendingAgeMs };
    } catch {
      return undefined;
    }
  }
}
