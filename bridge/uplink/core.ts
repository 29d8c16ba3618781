/**
 * The state every part of the uplink shares (one object, owned by the Uplink
 * facade): settings, journal, token client, logger, counters and metrics, the
 * current Session, and the small helpers the parts call on each other
 * (wake/waitWake, live, sendControl, noteError, setState).
 */
import type { EventEmitter } from 'node:events';
import { WebSocket } from 'ws';
import type { Counter, Gauge, Histogram } from 'prom-client';
import type { Logger } from '../../core/logger.js';
import { redactString } from '../../core/logger.js';
import { errorCode } from '../../core/errors.js';
import type { CommandTarget } from '../../core/ports.js';
import { encodeFrameV2, type FrameV2 } from '../../protocol/v2.js';
import type { Backoff } from '../backoff.js';
import type { CloudTokenClient } from '../cloud-token.js';
import { clampDelay } from './timers.js';
import { STATES, type Session, type UplinkJournal, type UplinkSettings, type UplinkState } from './types.js';
import type { Connection } from './connection.js';
import type { Sender } from './sender.js';
import type { FrameHandlers } from './handlers.js';
import type { Streamer } from './streamer.js';

export interface UplinkMetrics {
  state: Gauge;
  reconnects: Counter;
  messagesSent: Counter;
  bytesSent: Counter;
  messagesAcked: Counter;
  bytesAcked: Counter;
  rejected: Counter;
  quarantined: Counter;
  protocolErrors: Counter;
  commands: Counter;
  bestEffort: Counter;
  batches: Counter;
  ackLatency: Histogram;
  tokenExpiry: Gauge;
  lastAckAge: Gauge;
  inflight: Gauge;
}

export interface UplinkCounts {
  reconnects: number;
  messagesSent: number;
  bytesSent: number;
  messagesAcked: number;
  bytesAcked: number;
  rejected: number;
  quarantined: number;
  protocolErrors: number;
  tokensInBand: number;
  commands: number;
  bestEffortSent: number;
  bestEffortDropped: number;
  batches: number;
}

export class UplinkCore {
  settings: UplinkSettings;
  readonly journal: UplinkJournal;
  readonly tokens: CloudTokenClient;
  readonly commands: CommandTarget | undefined;
  readonly log: Logger;
  readonly env: NodeJS.ProcessEnv;
  readonly software: string;
  readonly commandTimeoutMs: number;
  readonly random: (() => number) | undefined;
  backoff: Backoff;
  readonly m: UplinkMetrics;
  readonly counts: UplinkCounts = {
    reconnects: 0,
    messagesSent: 0,
    bytesSent: 0,
    messagesAcked: 0,
    bytesAcked: 0,
    rejected: 0,
    quarantined: 0,
    protocolErrors: 0,
    tokensInBand: 0,
    commands: 0,
    bestEffortSent: 0,
    bestEffortDropped: 0,
    batches: 0,
  };

  stateValue: UplinkState = 'stopped';
  started = false;
  closed = false;
  session: Session | undefined;
  sessionCount = 0;
  reconnectTimer: NodeJS.Timeout | undefined;
  connecting: Promise<void> | undefined;
  commandsInFlight = 0;
  lastAckAt = 0;
  startedAt = 0;
  lastError: { code: string; message: string; at: number } | undefined;
  private readonly waiters = new Set<() => void>();

  // the parts (set by the facade right after construction)
  conn!: Connection;
  sender!: Sender;
  handlers!: FrameHandlers;
  streamer!: Streamer;

  constructor(
    args: {
      settings: UplinkSettings;
      journal: UplinkJournal;
      tokens: CloudTokenClient;
      commands: CommandTarget | undefined;
      log: Logger;
      env: NodeJS.ProcessEnv;
      software: string;
      commandTimeoutMs: number;
      random: (() => number) | undefined;
      backoff: Backoff;
      metrics: UplinkMetrics;
    },
    private readonly events: EventEmitter,
  ) {
    this.settings = args.settings;
    this.journal = args.journal;
    this.tokens = args.tokens;
    this.commands = args.commands;
    this.log = args.log;
    this.env = args.env;
    this.software = args.software;
    this.commandTimeoutMs = args.commandTimeoutMs;
    this.random = args.random;
    this.backoff = args.backoff;
    this.m = args.metrics;
  }

  emit(event: string, payload?: unknown): void {
    this.events.emit(event, payload);
  }

  setState(s: UplinkState): void {
    if (s === this.stateValue && this.started) return;
    this.stateValue = s;
    for (const st of STATES) this.m.state.set({ state: st }, st === s ? 1 : 0);
    this.emit('state', s);
  }

  /** Wake every waiter (the pump, byte-window waits). */
  wake(): void {
    const w = [...this.waiters];
    this.waiters.clear();
    for (const f of w) f();
  }

  waitWake(ms?: number): Promise<void> {
    return new Promise((resolve) => {
      let t: NodeJS.Timeout | undefined;
      const done = (): void => {
        if (t) clearTimeout(t);
        this.waiters.delete(done);
        resolve();
      };
      this.waiters.add(done);
      if (ms !== undefined) {
        t = setTimeout(done, clampDelay(ms));
        t.unref();
      }
    });
  }

  live(s: Session, epoch: number): boolean {
    return !this.closed && this.session === s && !s.closing && s.epoch === epoch;
  }

  sendControl(s: Session, f: FrameV2): void {
    if (s.ws.readyState !== WebSocket.OPEN) return;
    try {
      s.ws.send(encodeFrameV2(f));
    } catch (err) {
      this.log.error({ err, type: f.type }, 'uplink: cannot encode a frame');
    }
  }

  noteError(err: unknown): void {
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

  /** Hand a record the uplink can never send to the journal's quarantine (counted, logged by the caller). */
  quarantine(id: string, reason: string): void {
    this.counts.quarantined++;
    this.m.quarantined.inc();
    try {
      const r = this.journal.quarantine(id, reason);
      if (r instanceof Promise) r.catch((err: unknown) => this.log.error({ err, id }, 'uplink: journal quarantine failed'));
    } catch (err) {
      this.log.error({ err, id }, 'uplink: journal quarantine failed');
    }
  }
}
