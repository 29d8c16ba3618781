/**
 * What the uplink's parts share: the journal it consumes, its configuration
 * sections, and the state of one connection (Session).
 */
import type { WebSocket } from 'ws';
import type { Config } from '../../core/config/schema.js';
import type { IncomingUpload, JournalRecord, PayloadReader } from '../journal.js';

export type { PayloadReader };

// ─── what the uplink needs from the journal ─────────────────────────────────

/** One journal record as the uplink sees it: the journal's own record type (one definition). */
export type OutboundRecord = JournalRecord;

/** The consumer side of the journal, as bridge/journal.ts implements it. */
export interface UplinkJournal {
  /** Unacknowledged records with seq > afterSeq, in order. */
  pending(afterSeq?: number, limit?: number): readonly OutboundRecord[];
  /** Bytes [start, end) of the payload; rejects ECONN_NOT_FOUND once the record left the queue. */
  readPayload(rec: OutboundRecord, start?: number, end?: number): Promise<Buffer>;
  /** The whole payload when it is still in memory (written recently, not acknowledged); undefined otherwise. Never reads the disk. */
  cachedPayload?(rec: OutboundRecord): Buffer | undefined;
  /** A reader for a large payload read chunk by chunk into buffers the caller owns (no open per chunk, no copy). */
  openPayload?(rec: OutboundRecord): PayloadReader;
  /**
   * Selective ack; unknown ids are ignored. Making it durable is the journal's business: it writes the acks
   * of ACK_FLUSH_MS in one ack-log write, and a failed write is logged once and retried by the journal (the
   * messages stay acknowledged in memory). The uplink neither waits for it nor hears of it, so an
   * implementation that returns a promise must not let it reject unhandled (the journal's carry a no-op handler).
   */
  ack(id: string): void;
  quarantine(id: string, reason: string): Promise<void> | void;
  /** Whether a pending record has this id (a WELCOME partial of another id is one the connector will never complete). */
  has?(id: string): boolean;
  on(event: 'append', fn: () => void): unknown;
  off(event: 'append', fn: () => void): unknown;
  /** Uploads of known length while they arrive (bridge/journal/upload.ts), for streaming upstream. */
  on(event: 'upload', fn: (u: IncomingUpload) => void): unknown;
  off(event: 'upload', fn: (u: IncomingUpload) => void): unknown;
  stats(): { pendingMessages: number; pendingBytes: number; oldestPendingAgeMs: number };
}

// ─── configuration ───────────────────────────────────────────────────────────

/** The configuration the uplink reads: its own sections, not the whole Config. */
export interface UplinkSettings {
  /** bridge.uplink */
  uplink: Config['bridge']['uplink'];
  /** bridge.token (renew_before_s; the token client gets it on reload) */
  token: Config['bridge']['token'];
  /** daemon.server_name: the gateway id sent in HELLO. */
  gatewayId: string;
  /** metrics.uplink_stale_after_s: readiness threshold. */
  staleAfterS: number;
}

/** The uplink's sections of a full configuration (what daemon/app.ts or cloud-link.ts hands over). */
export function uplinkSettings(config: Pick<Config, 'bridge' | 'daemon' | 'metrics'>): UplinkSettings {
  return { uplink: config.bridge.uplink, token: config.bridge.token, gatewayId: config.daemon.server_name, staleAfterS: config.metrics.uplink_stale_after_s };
}

// ─── one connection ──────────────────────────────────────────────────────────

export type UplinkState = 'stopped' | 'connecting' | 'handshake' | 'connected' | 'backoff' | 'closing';
export const STATES: readonly UplinkState[] = ['stopped', 'connecting', 'handshake', 'connected', 'backoff', 'closing'];

export interface OutMsg {
  rec: OutboundRecord;
  /** Bytes handed to the socket on this connection (an offset into the payload). */
  sentOffset: number;
  /** Bytes the cloud holds durably (from the resume point or ACK progress). */
  ackedOffset: number;
  /** When the last chunk was handed to the socket (performance.now()), 0 while sending. */
  doneAt: number;
  /** Position its last chunk carried (protocol v2 cumulative ACK), 0 while sending. */
  pos: number;
}

/** An upload being sent while it arrives (bridge/uplink/streamer.ts), on one connection. */
export interface StreamState {
  id: string;
  total: number;
  /** Bytes handed to the socket, and the seq of the next chunk. */
  sentOffset: number;
  nextSeq: number;
  /** Set when the sender took it over, a REJECT stopped it or the upload was aborted. */
  stop: boolean;
}

export interface CloseReason {
  code: number;
  reason: string;
  retryAfterMs?: number;
  invalidateToken?: boolean;
  immediate?: boolean;
}

export interface Session {
  ws: WebSocket;
  n: number;
  openedAt: number;
  welcomed: boolean;
  closing: boolean;
  /** Increments when the pump must restart from the first unacknowledged record. */
  epoch: number;
  inflight: Map<string, OutMsg>;
  unackedBytes: number;
  /** The cloud confirmed the `stream` feature in WELCOME (§13.10): uploads may be sent while they arrive, DISCARD is understood. */
  streamFeature: boolean;
  /** Uploads being streamed on this connection, by message id. */
  streams: Map<string, StreamState>;
  /** Resume points the cloud told us (WELCOME partials, ACK progress, REJECT retry, QUERY_RESULT). */
  resume: Map<string, { offset: number; next_seq: number; total: number }>;
  chunkSize: number;
  maxFrameBytes: number;
  maxMessageBytes: number;
  /** The last position given to a last chunk on this connection (positions start at 1). */
  lastPos: number;
  /** Encoded BATCH entries not yet handed to the socket, and their bytes. */
  batch: Buffer[];
  batchBytes: number;
  /** Token expiry as the cloud stated it (cloud clock). */
  tokenExpiresAt: number;
  /** When tokenExpiresAt was last set (WELCOME or TOKEN_OK, local clock): with it, the lifetime of the token in force. */
  tokenSetAt: number;
  tokenSentAt: number;
  /** Cloud clock minus local clock, estimated from PONGs (0 until the first one). */
  cloudOffsetMs: number;
  /** When the last in-band renewal was started (local clock): renewals are rate-bounded. */
  lastRenewalAt: number;
  /** Recent ACK latency (ms), a maximum that decays with a 5 s time constant: how long the cloud's queue is. */
  ackLatencyMs: number;
  ackLatencyAt: number;
  presentedToken: string;
  tokenInFlight: string | undefined;
  pausedUntil: number;
  lastRx: number;
  lastAckOrProgress: number;
  timers: NodeJS.Timeout[];
  tokenTimer: NodeJS.Timeout | undefined;
  closeReason?: CloseReason;
  lastQueryAt: number;
}
