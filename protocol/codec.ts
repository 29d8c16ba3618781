/**
 * The edge-connector uplink wire protocol, version 1 (docs/PROTOCOL.md is the
 * normative description; this module is its reference codec).
 *
 * PURE: no sockets, no files, no timers. Everything here turns bytes into typed
 * frames and back, plans chunks, computes and checks SHA-256 digests, and
 * tracks the reassembly of chunked messages. Both ends (bridge/uplink.ts and
 * the reference cloud in cloud/) use it, so they cannot drift.
 *
 * Every malformed input throws a WireError (a ProtocolError with code
 * ECONN_PROTOCOL) whose `reason` is one of WIRE_ERROR_REASONS; that reason is
 * also what goes into an ERROR frame's `code`.
 */
import { createHash, hash, timingSafeEqual, type Hash } from 'node:crypto';
import { ProtocolError } from '../core/errors.js';

// ─── constants ───────────────────────────────────────────────────────────────

/** Protocol version carried in every frame header and in HELLO/WELCOME. */
export const PROTOCOL_VERSION = 1;
/** The WebSocket subprotocol (Sec-WebSocket-Protocol) of this version. */
export const SUBPROTOCOL = 'edge-connector.v1';
/** First byte of every frame. */
export const FRAME_MAGIC = 0xec;
/** Common header: magic u8, version u8, type u8, flags u8, body length u32 BE. */
export const HEADER_BYTES = 8;
/** SHA-256 digest length. */
export const DIGEST_BYTES = 32;

/** Hard limits of protocol version 1 (a peer may announce smaller ones in HELLO/WELCOME). */
export const LIMITS = {
  /** Largest message id, in bytes (ids are ASCII [A-Za-z0-9._:-]). */
  maxIdBytes: 128,
  /** Largest JSON metadata of the first chunk. */
  maxMetadataBytes: 8192,
  /** Largest chunk data in one CHUNK frame. */
  maxChunkBytes: 16 * 1024 * 1024,
  /** Largest JSON body of a control frame (COMMAND payloads are base64 inside it). */
  maxControlBytes: 1024 * 1024,
  /** Largest frame of any type: the largest chunk plus headers. */
  maxFrameBytes: 16 * 1024 * 1024 + 64 * 1024,
  /** Largest total message length the encoding can carry (2^53 - 1). */
  maxMessageBytes: Number.MAX_SAFE_INTEGER,
  /** Most ids in one ACK / QUERY frame. */
  maxIdsPerFrame: 4096,
  /** Largest device id / topic / content type in metadata (bytes of UTF-8). */
  maxDeviceIdBytes: 256,
  maxTopicBytes: 4096,
  maxContentTypeBytes: 255,
} as const;

/** Frame type codes (byte 2 of the header). */
export const FRAME_TYPES = {
  HELLO: 0x01,
  WELCOME: 0x02,
  CHUNK: 0x03,
  ACK: 0x04,
  REJECT: 0x05,
  PING: 0x06,
  PONG: 0x07,
  TOKEN: 0x08,
  TOKEN_OK: 0x09,
  TOKEN_REJECTED: 0x0a,
  COMMAND: 0x0b,
  COMMAND_RESULT: 0x0c,
  QUERY: 0x0d,
  QUERY_RESULT: 0x0e,
  ERROR: 0x0f,
} as const;
export type FrameTypeName = keyof typeof FRAME_TYPES;
const TYPE_BY_CODE = new Map<number, FrameTypeName>(Object.entries(FRAME_TYPES).map(([k, v]) => [v, k as FrameTypeName]));

/** WebSocket close codes used by this protocol. */
export const CLOSE_CODES = {
  /** Normal closure (either side, e.g. shutdown of the connector). */
  NORMAL: 1000,
  /** The cloud is shutting down; reconnect with backoff. */
  GOING_AWAY: 1001,
  /** A malformed or unexpected frame (after an ERROR frame naming it). */
  PROTOCOL_ERROR: 1002,
  /** A text frame was received; only binary frames are allowed. */
  UNSUPPORTED_DATA: 1003,
  /** A frame larger than the receiver's max frame size. */
  MESSAGE_TOO_BIG: 1009,
  /** The cloud failed internally; reconnect with backoff. */
  INTERNAL_ERROR: 1011,
  /** The access token expired on the live connection without a TOKEN refresh. */
  TOKEN_EXPIRED: 4001,
  /** The access token was revoked or is no longer acceptable. */
  TOKEN_INVALID: 4003,
  /** No HELLO within the hello timeout after the upgrade. */
  HELLO_TIMEOUT: 4005,
  /** HELLO asked for a protocol version the cloud does not speak (the reason names the versions it speaks). */
  UNSUPPORTED_VERSION: 4006,
  /** HELLO's gateway_id is not one the authenticated client may use. */
  GATEWAY_REFUSED: 4007,
  /** Nothing (frame, heartbeat) arrived within the dead-link timeout. */
  HEARTBEAT_TIMEOUT: 4008,
  /** Another connection with the same gateway id replaced this one. */
  REPLACED: 4009,
} as const;

/** Why a frame was refused: WireError.reason, and the `code` of an ERROR frame. */
export const WIRE_ERROR_REASONS = [
  'malformed', // wrong length, truncated, bad field, garbage JSON
  'unknown_type',
  'unsupported_version',
  'oversized',
  'bad_digest',
  'out_of_order',
  'duplicate_chunk',
  'unexpected', // a valid frame that is not allowed in this state or direction
  'too_many_partials',
  'internal',
] as const;
export type WireErrorReason = (typeof WIRE_ERROR_REASONS)[number];

/** A protocol violation. `code` is always ECONN_PROTOCOL; branch on `reason`. */
export class WireError extends ProtocolError {
  readonly reason: WireErrorReason;
  /** Message id concerned, when the violation is about one message. */
  readonly messageId?: string;
  constructor(reason: WireErrorReason, message: string, messageId?: string) {
    super('ECONN_PROTOCOL', `${message} (${reason})`);
    this.reason = reason;
    if (messageId !== undefined) this.messageId = messageId;
  }
}

function fail(reason: WireErrorReason, message: string, messageId?: string): never {
  throw new WireError(reason, message, messageId);
}

// ─── frame types ─────────────────────────────────────────────────────────────

/** Metadata carried by the first chunk (seq 0) of a message. */
export interface MessageMeta {
  device_id: string;
  topic: string;
  qos: 0 | 1;
  /** When the gateway received the message, ms since the epoch (integer). */
  received_at: number;
  content_type?: string;
}

export interface PartialInfo {
  id: string;
  /** Bytes of the payload the cloud holds durably (a chunk boundary). */
  offset: number;
  /** Sequence number the next chunk must carry. */
  next_seq: number;
  total: number;
}

export interface HelloFrame {
  type: 'HELLO';
  version: number;
  gateway_id: string;
  /** Free text, e.g. "edge-connector/0.1.0". */
  software?: string;
  /** Largest chunk the client will send. */
  chunk_size?: number;
  /** Client heartbeat interval. */
  heartbeat_ms?: number;
  /**
   * Optional extensions the client speaks (version 2: `stream`, docs/PROTOCOL.md §13.10). Additive: a
   * server that knows none of them ignores the field and the client uses none.
   */
  features?: string[];
}
export interface WelcomeFrame {
  type: 'WELCOME';
  version: number;
  session_id: string;
  /** Largest frame the cloud accepts. */
  max_frame_bytes: number;
  /** Largest chunk data the cloud accepts. */
  max_chunk_bytes: number;
  /** Largest message (total length) the cloud accepts; bigger ones are REJECTed permanent. */
  max_message_bytes: number;
  /** Most messages in progress (first chunk sent, not complete) at once. */
  max_partials: number;
  /** The cloud sends PING at this interval. */
  heartbeat_ms: number;
  /** When the token presented on the upgrade expires (ms since the epoch). */
  token_expires_at: number;
  /** Messages of this gateway the cloud holds partially. */
  partials: PartialInfo[];
  /** The client's `features` (HELLO) the server speaks too; absent = none. */
  features?: string[];
}
export interface ChunkFrame {
  type: 'CHUNK';
  id: string;
  seq: number;
  offset: number;
  total: number;
  /** SHA-256 of `data`. */
  chunk_sha256: Buffer;
  /** Present iff seq === 0. */
  meta?: MessageMeta;
  /** SHA-256 of the whole payload; present iff this is the last chunk (offset + data.length === total). */
  payload_sha256?: Buffer;
  data: Buffer;
}
export interface AckProgress {
  id: string;
  /** Bytes held durably. */
  offset: number;
  next_seq: number;
}
export interface AckFrame {
  type: 'ACK';
  /** Messages stored durably (or already stored before: duplicates are acked again). */
  ids: string[];
  /** Durable progress of large messages still in progress. */
  progress?: AckProgress[];
}
export interface RejectFrame {
  type: 'REJECT';
  id: string;
  /** permanent: never resend (the connector quarantines it); retry: resend after retry_after_ms. */
  kind: 'permanent' | 'retry';
  reason: string;
  retry_after_ms?: number;
  /** With kind=retry: where to resume (0 = from the start). */
  offset?: number;
  next_seq?: number;
}
export interface PingFrame {
  type: 'PING';
  /** Sender's clock, ms since the epoch. */
  t: number;
}
export interface PongFrame {
  type: 'PONG';
  /** The `t` of the PING answered. */
  t: number;
  /** Responder's clock, ms since the epoch. */
  t_reply: number;
}
export interface TokenFrame {
  type: 'TOKEN';
  access_token: string;
}
export interface TokenOkFrame {
  type: 'TOKEN_OK';
  /** When the new token expires (ms since the epoch); the cloud closes with 4001 then. */
  expires_at: number;
}
export interface TokenRejectedFrame {
  type: 'TOKEN_REJECTED';
  reason: string;
  /** The token in force (the previous one) still expires then. */
  expires_at: number;
}
export interface CommandFrame {
  type: 'COMMAND';
  id: string;
  device_id: string;
  name: string;
  /** Base64 of the command payload. */
  payload: string;
}
export interface CommandResultFrame {
  type: 'COMMAND_RESULT';
  id: string;
  delivered: boolean;
  reason?: string;
}
export interface QueryFrame {
  type: 'QUERY';
  ids: string[];
}
export interface QueryEntry {
  id: string;
  status: 'unknown' | 'partial' | 'stored';
  /** With status=partial: durable offset and next sequence number. */
  offset?: number;
  next_seq?: number;
  total?: number;
}
export interface QueryResultFrame {
  type: 'QUERY_RESULT';
  entries: QueryEntry[];
}
export interface ErrorFrame {
  type: 'ERROR';
  code: WireErrorReason;
  message: string;
  /** true: the sender closes the connection right after this frame. */
  fatal: boolean;
  /** The message concerned, if any. */
  id?: string;
}

export type Frame =
  | HelloFrame
  | WelcomeFrame
  | ChunkFrame
  | AckFrame
  | RejectFrame
  | PingFrame
  | PongFrame
  | TokenFrame
  | TokenOkFrame
  | TokenRejectedFrame
  | CommandFrame
  | CommandResultFrame
  | QueryFrame
  | QueryResultFrame
  | ErrorFrame;
export type ControlFrame = Exclude<Frame, ChunkFrame>;

/** Which side may send which frame. */
export const CLIENT_FRAMES: ReadonlySet<FrameTypeName> = new Set(['HELLO', 'CHUNK', 'PING', 'PONG', 'TOKEN', 'COMMAND_RESULT', 'QUERY', 'ERROR']);
export const SERVER_FRAMES: ReadonlySet<FrameTypeName> = new Set([
  'WELCOME',
  'ACK',
  'REJECT',
  'PING',
  'PONG',
  'TOKEN_OK',
  'TOKEN_REJECTED',
  'COMMAND',
  'QUERY_RESULT',
  'ERROR',
]);

// ─── digests ─────────────────────────────────────────────────────────────────

/**
 * One-shot SHA-256. Every message is hashed once at each end (journal append, cloud ingest):
 * crypto.hash() skips the Hash object and stream machinery of createHash() — measured 0.7 vs
 * 1.2 µs for a 150 B payload on Node 20.
 */
export function sha256(data: Uint8Array): Buffer {
  return hash('sha256', data, 'buffer');
}
export function sha256Hex(data: Uint8Array): string {
  return hash('sha256', data, 'hex');
}
/** Constant-time digest comparison (false when lengths differ). */
export function digestEquals(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && timingSafeEqual(a, b);
}
/** True when the chunk's data matches its chunk_sha256. */
export function verifyChunkDigest(chunk: ChunkFrame): boolean {
  return digestEquals(sha256(chunk.data), chunk.chunk_sha256);
}
/** Throws WireError bad_digest when the chunk's data does not match its chunk_sha256. */
export function assertChunkDigest(chunk: ChunkFrame): void {
  if (!verifyChunkDigest(chunk)) fail('bad_digest', `chunk ${chunk.seq} of message ${chunk.id}: data does not match chunk_sha256`, chunk.id);
}

// ─── chunk planning ──────────────────────────────────────────────────────────

export interface ChunkRange {
  seq: number;
  offset: number;
  length: number;
  first: boolean;
  last: boolean;
}

function checkPlanArgs(totalLength: number, chunkSize: number, startOffset: number, startSeq: number): void {
  if (!Number.isSafeInteger(totalLength) || totalLength < 0) throw new RangeError(`totalLength must be a non-negative safe integer, got ${totalLength}`);
  if (!Number.isSafeInteger(chunkSize) || chunkSize < 1 || chunkSize > LIMITS.maxChunkBytes) {
    throw new RangeError(`chunkSize must be an integer in 1..${LIMITS.maxChunkBytes}, got ${chunkSize}`);
  }
  if (!Number.isSafeInteger(startOffset) || startOffset < 0 || startOffset > totalLength) {
    throw new RangeError(`startOffset must be an integer in 0..${totalLength}, got ${startOffset}`);
  }
  if (!Number.isSafeInteger(startSeq) || startSeq < 0 || startSeq > 0xffffffff) throw new RangeError(`startSeq must be a u32, got ${startSeq}`);
  if ((startOffset === 0) !== (startSeq === 0)) throw new RangeError('startSeq must be 0 exactly when startOffset is 0');
}

/** Number of chunks needed to send bytes [startOffset, totalLength) (at least 1: an empty remainder is one empty last chunk). */
export function chunkCount(totalLength: number, chunkSize: number, startOffset = 0): number {
  checkPlanArgs(totalLength, chunkSize, startOffset, startOffset === 0 ? 0 : 1);
  return Math.max(1, Math.ceil((totalLength - startOffset) / chunkSize));
}

/**
 * The chunks that send bytes [startOffset, totalLength) in pieces of at most
 * chunkSize, numbered from startSeq. A resume uses the offset and next_seq the
 * cloud reported. Lazy, so a 1 TiB message does not build a huge array.
 */
export function* chunkRanges(totalLength: number, chunkSize: number, startOffset = 0, startSeq = 0): Generator<ChunkRange> {
  checkPlanArgs(totalLength, chunkSize, startOffset, startSeq);
  let offset = startOffset;
  let seq = startSeq;
  for (;;) {
    const length = Math.min(chunkSize, totalLength - offset);
    const last = offset + length === totalLength;
    yield { seq, offset, length, first: seq === 0, last };
    if (last) return;
    offset += length;
    seq += 1;
  }
}

/** chunkRanges as an array (for small messages and tests). */
export function chunkPlan(totalLength: number, chunkSize: number, startOffset = 0, startSeq = 0): ChunkRange[] {
  return [...chunkRanges(totalLength, chunkSize, startOffset, startSeq)];
}

/**
 * Build the CHUNK frames of a payload held in memory (small messages, tests).
 * Large payloads are read range by range from disk with chunkRanges() and makeChunk().
 */
export function chunkMessage(id: string, meta: MessageMeta, payload: Buffer, chunkSize: number, startOffset = 0, startSeq = 0): ChunkFrame[] {
  const payloadSha = sha256(payload);
  return chunkPlan(payload.length, chunkSize, startOffset, startSeq).map((r) =>
    makeChunk({ id, range: r, total: payload.length, data: payload.subarray(r.offset, r.offset + r.length), meta, payloadSha256: payloadSha }),
  );
}

/** One CHUNK frame for a planned range: adds the chunk digest, metadata on the first and the payload digest on the last. */
export function makeChunk(args: { id: string; range: ChunkRange; total: number; data: Buffer; meta?: MessageMeta; payloadSha256?: Buffer }): ChunkFrame {
  const { id, range, total, data } = args;
  if (data.length !== range.length) throw new RangeError(`chunk data is ${data.length} bytes, the range says ${range.length}`);
  const frame: ChunkFrame = { type: 'CHUNK', id, seq: range.seq, offset: range.offset, total, chunk_sha256: sha256(data), data };
  if (range.first) {
    if (!args.meta) throw new RangeError('the first chunk needs the message metadata');
    frame.meta = args.meta;
  }
  if (range.last) {
    if (!args.payloadSha256) throw new RangeError('the last chunk needs the payload SHA-256');
    frame.payload_sha256 = args.payloadSha256;
  }
  return frame;
}

// ─── field validation ────────────────────────────────────────────────────────

const ID_RE = /^[A-Za-z0-9._:-]+$/;

export function isValidMessageId(id: unknown): id is string {
  return typeof id === 'string' && id.length >= 1 && id.length <= LIMITS.maxIdBytes && ID_RE.test(id);
}

type Json = Record<string, unknown>;

export function isObj(v: unknown): v is Json {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}
function str(o: Json, k: string, what: string, opts: { optional?: boolean; max?: number; min?: number } = {}): string | undefined {
  const v = o[k];
  if (v === undefined && opts.optional) return undefined;
  if (typeof v !== 'string') fail('malformed', `${what}: "${k}" must be a string`);
  const len = Buffer.byteLength(v);
  if (len < (opts.min ?? 0)) fail('malformed', `${what}: "${k}" must not be empty`);
  if (opts.max !== undefined && len > opts.max) fail('malformed', `${what}: "${k}" is longer than ${opts.max} bytes`);
  return v;
}
function reqStr(o: Json, k: string, what: string, max = 65536, min = 1): string {
  return str(o, k, what, { max, min }) as string;
}
function int(o: Json, k: string, what: string, opts: { optional?: boolean; min?: number; max?: number } = {}): number | undefined {
  const v = o[k];
  if (v === undefined && opts.optional) return undefined;
  if (typeof v !== 'number' || !Number.isSafeInteger(v)) fail('malformed', `${what}: "${k}" must be an integer`);
  if (v < (opts.min ?? 0) || v > (opts.max ?? Number.MAX_SAFE_INTEGER)) fail('malformed', `${what}: "${k}" is out of range`);
  return v;
}
function reqInt(o: Json, k: string, what: string, min = 0, max = Number.MAX_SAFE_INTEGER): number {
  return int(o, k, what, { min, max }) as number;
}
function msgId(o: Json, k: string, what: string): string {
  const v = o[k];
  if (!isValidMessageId(v)) fail('malformed', `${what}: "${k}" must be a message id (1..${LIMITS.maxIdBytes} of [A-Za-z0-9._:-])`);
  return v;
}
function idList(o: Json, k: string, what: string): string[] {
  const v = o[k];
  if (!Array.isArray(v) || v.length > LIMITS.maxIdsPerFrame) fail('malformed', `${what}: "${k}" must be an array of at most ${LIMITS.maxIdsPerFrame} ids`);
  for (const id of v) if (!isValidMessageId(id)) fail('malformed', `${what}: "${k}" holds an invalid message id`);
  return v as string[];
}
/** Most entries of HELLO's / WELCOME's `features`, and the longest name. */
export const MAX_FEATURES = 32;
const FEATURE_RE = /^[a-z0-9_.-]{1,64}$/;
/** Optional `features`: at most MAX_FEATURES names of [a-z0-9_.-]{1,64}. Names a peer does not know are kept (and ignored by it). */
function featureList(o: Json, what: string): string[] | undefined {
  const v = o.features;
  if (v === undefined) return undefined;
  if (!Array.isArray(v) || v.length > MAX_FEATURES) fail('malformed', `${what}: "features" must be an array of at most ${MAX_FEATURES} names`);
  for (const n of v) if (typeof n !== 'string' || !FEATURE_RE.test(n)) fail('malformed', `${what}: "features" holds an invalid name (1..64 of [a-z0-9_.-])`);
  return v as string[];
}
function list<T>(o: Json, k: string, what: string, item: (v: Json) => T, optional = false): T[] | undefined {
  const v = o[k];
  if (v === undefined && optional) return undefined;
  if (!Array.isArray(v) || v.length > LIMITS.maxIdsPerFrame) fail('malformed', `${what}: "${k}" must be an array of at most ${LIMITS.maxIdsPerFrame} entries`);
  return v.map((e) => {
    if (!isObj(e)) fail('malformed', `${what}: "${k}" entries must be objects`);
    return item(e);
  });
}
function bool(o: Json, k: string, what: string): boolean {
  const v = o[k];
  if (typeof v !== 'boolean') fail('malformed', `${what}: "${k}" must be a boolean`);
  return v;
}

/** Validate metadata (the JSON of a first chunk). Unknown keys are ignored. */
export function parseMeta(v: unknown): MessageMeta {
  const what = 'chunk metadata';
  if (!isObj(v)) fail('malformed', `${what} must be a JSON object`);
  const qos = v.qos;
  if (qos !== 0 && qos !== 1) fail('malformed', `${what}: "qos" must be 0 or 1`);
  const meta: MessageMeta = {
    device_id: reqStr(v, 'device_id', what, LIMITS.maxDeviceIdBytes),
    topic: reqStr(v, 'topic', what, LIMITS.maxTopicBytes),
    qos,
    received_at: reqInt(v, 'received_at', what),
  };
  const ct = str(v, 'content_type', what, { optional: true, max: LIMITS.maxContentTypeBytes });
  if (ct !== undefined) meta.content_type = ct;
  return meta;
}

function partial(e: Json, what: string): PartialInfo {
  const p = { id: msgId(e, 'id', what), offset: reqInt(e, 'offset', what), next_seq: reqInt(e, 'next_seq', what, 0, 0xffffffff), total: reqInt(e, 'total', what) };
  if (p.offset > p.total || (p.offset === 0) !== (p.next_seq === 0)) fail('malformed', `${what}: inconsistent partial ${p.id}`);
  return p;
}

/** Validate the JSON body of a control frame (shared with protocol/v2.ts, whose control frames are v1's). */
export function parseControl(type: Exclude<FrameTypeName, 'CHUNK'>, o: Record<string, unknown>): ControlFrame {
  const what = `${type} frame`;
  switch (type) {
    case 'HELLO': {
      const f: HelloFrame = { type, version: reqInt(o, 'version', what, 1, 65535), gateway_id: reqStr(o, 'gateway_id', what, 256) };
      const software = str(o, 'software', what, { optional: true, max: 256 });
      if (software !== undefined) f.software = software;
      const cs = int(o, 'chunk_size', what, { optional: true, min: 1, max: LIMITS.maxChunkBytes });
      if (cs !== undefined) f.chunk_size = cs;
      const hb = int(o, 'heartbeat_ms', what, { optional: true, min: 1 });
      if (hb !== undefined) f.heartbeat_ms = hb;
      const features = featureList(o, what);
      if (features !== undefined) f.features = features;
      return f;
    }
    case 'WELCOME': {
      const f: WelcomeFrame = {
        type,
        version: reqInt(o, 'version', what, 1, 65535),
        session_id: reqStr(o, 'session_id', what, 256),
        max_frame_bytes: reqInt(o, 'max_frame_bytes', what, 1),
        max_chunk_bytes: reqInt(o, 'max_chunk_bytes', what, 1, LIMITS.maxChunkBytes),
        max_message_bytes: reqInt(o, 'max_message_bytes', what),
        max_partials: reqInt(o, 'max_partials', what, 1),
        heartbeat_ms: reqInt(o, 'heartbeat_ms', what, 1),
        token_expires_at: reqInt(o, 'token_expires_at', what),
        partials: list(o, 'partials', what, (e) => partial(e, what)) as PartialInfo[],
      };
      const features = featureList(o, what);
      if (features !== undefined) f.features = features;
      return f;
    }
    case 'ACK': {
      const f: AckFrame = { type, ids: idList(o, 'ids', what) };
      const progress = list(o, 'progress', what, (e) => ({ id: msgId(e, 'id', what), offset: reqInt(e, 'offset', what), next_seq: reqInt(e, 'next_seq', what, 0, 0xffffffff) }), true);
      if (progress !== undefined) f.progress = progress;
      return f;
    }
    case 'REJECT': {
      const kind = o.kind;
      if (kind !== 'permanent' && kind !== 'retry') fail('malformed', `${what}: "kind" must be "permanent" or "retry"`);
      const f: RejectFrame = { type, id: msgId(o, 'id', what), kind, reason: reqStr(o, 'reason', what, 1024, 0) };
      const ra = int(o, 'retry_after_ms', what, { optional: true });
      if (ra !== undefined) f.retry_after_ms = ra;
      const off = int(o, 'offset', what, { optional: true });
      if (off !== undefined) f.offset = off;
      const ns = int(o, 'next_seq', what, { optional: true, max: 0xffffffff });
      if (ns !== undefined) f.next_seq = ns;
      return f;
    }
    case 'PING':
      return { type, t: reqInt(o, 't', what) };
    case 'PONG':
      return { type, t: reqInt(o, 't', what), t_reply: reqInt(o, 't_reply', what) };
    case 'TOKEN':
      return { type, access_token: reqStr(o, 'access_token', what, 16384) };
    case 'TOKEN_OK':
      return { type, expires_at: reqInt(o, 'expires_at', what) };
    case 'TOKEN_REJECTED':
      return { type, reason: reqStr(o, 'reason', what, 1024, 0), expires_at: reqInt(o, 'expires_at', what) };
    case 'COMMAND': {
      const payload = reqStr(o, 'payload', what, LIMITS.maxControlBytes, 0);
      if (!/^[A-Za-z0-9+/]*={0,2}$/.test(payload) || payload.length % 4 !== 0) fail('malformed', `${what}: "payload" must be base64`);
      return { type, id: msgId(o, 'id', what), device_id: reqStr(o, 'device_id', what, LIMITS.maxDeviceIdBytes), name: reqStr(o, 'name', what, 256), payload };
    }
    case 'COMMAND_RESULT': {
      const f: CommandResultFrame = { type, id: msgId(o, 'id', what), delivered: bool(o, 'delivered', what) };
      const reason = str(o, 'reason', what, { optional: true, max: 1024 });
      if (reason !== undefined) f.reason = reason;
      return f;
    }
    case 'QUERY':
      return { type, ids: idList(o, 'ids', what) };
    case 'QUERY_RESULT':
      return {
        type,
        entries: list(o, 'entries', what, (e) => {
          const status = e.status;
          if (status !== 'unknown' && status !== 'partial' && status !== 'stored') fail('malformed', `${what}: bad status`);
          const q: QueryEntry = { id: msgId(e, 'id', what), status };
          const off = int(e, 'offset', what, { optional: true });
          if (off !== undefined) q.offset = off;
          const ns = int(e, 'next_seq', what, { optional: true, max: 0xffffffff });
          if (ns !== undefined) q.next_seq = ns;
          const tot = int(e, 'total', what, { optional: true });
          if (tot !== undefined) q.total = tot;
          return q;
        }) as QueryEntry[],
      };
    case 'ERROR': {
      const code = o.code;
      const known = (WIRE_ERROR_REASONS as readonly string[]).includes(code as string);
      // an unknown error code from a newer peer is kept readable as 'internal'
      if (typeof code !== 'string') fail('malformed', `${what}: "code" must be a string`);
      const f: ErrorFrame = { type, code: known ? (code as WireErrorReason) : 'internal', message: reqStr(o, 'message', what, 4096, 0), fatal: bool(o, 'fatal', what) };
      if (o.id !== undefined) f.id = msgId(o, 'id', what);
      return f;
    }
  }
}

// ─── encoding ────────────────────────────────────────────────────────────────

function header(type: FrameTypeName, bodyLength: number): Buffer {
  return frameHeader(PROTOCOL_VERSION, FRAME_TYPES[type], bodyLength);
}

/** The 8-byte frame header of any version (shared with protocol/v2.ts). */
export function frameHeader(version: number, typeCode: number, bodyLength: number): Buffer {
  const h = Buffer.allocUnsafe(HEADER_BYTES);
  h.writeUInt8(FRAME_MAGIC, 0);
  h.writeUInt8(version, 1);
  h.writeUInt8(typeCode, 2);
  h.writeUInt8(0, 3);
  h.writeUInt32BE(bodyLength, 4);
  return h;
}

/** Fields written into the JSON body of a control frame (everything but `type`; undefined fields dropped). */
function controlBody(frame: ControlFrame): Buffer {
  const { type: _type, ...rest } = frame;
  return Buffer.from(JSON.stringify(rest), 'utf8');
}

/**
 * Encode one frame (one WebSocket binary message). Validates what it encodes
 * with the same rules as decodeFrame, so an invalid frame is never sent.
 */
export function encodeFrame(frame: Frame): Buffer {
  if (frame.type !== 'CHUNK') {
    const body = controlBody(frame);
    if (body.length > LIMITS.maxControlBytes) fail('oversized', `${frame.type} frame body is ${body.length} bytes, the limit is ${LIMITS.maxControlBytes}`);
    // round-trip validation: never emit what a peer must refuse
    parseControl(frame.type, JSON.parse(body.toString('utf8')) as Json);
    return Buffer.concat([header(frame.type, body.length), body]);
  }
  return encodeChunk(frame);
}

function encodeChunk(c: ChunkFrame): Buffer {
  if (!isValidMessageId(c.id)) fail('malformed', 'CHUNK: invalid message id');
  checkChunkNumbers(c.id, c.seq, c.offset, c.total, c.data.length, LIMITS.maxChunkBytes);
  if (c.chunk_sha256.length !== DIGEST_BYTES) fail('malformed', 'CHUNK: chunk_sha256 must be 32 bytes', c.id);
  const first = c.seq === 0;
  const last = c.offset + c.data.length === c.total;
  let metaBuf: Buffer | undefined;
  if (first) {
    if (!c.meta) fail('malformed', 'CHUNK: the first chunk (seq 0) must carry metadata', c.id);
    parseMeta(c.meta);
    metaBuf = Buffer.from(JSON.stringify(c.meta), 'utf8');
    if (metaBuf.length > LIMITS.maxMetadataBytes) fail('oversized', `CHUNK: metadata is ${metaBuf.length} bytes, the limit is ${LIMITS.maxMetadataBytes}`, c.id);
  } else if (c.meta) fail('malformed', 'CHUNK: only the first chunk (seq 0) carries metadata', c.id);
  if (last) {
    if (!c.payload_sha256 || c.payload_sha256.length !== DIGEST_BYTES) fail('malformed', 'CHUNK: the last chunk must carry a 32-byte payload_sha256', c.id);
  } else if (c.payload_sha256) fail('malformed', 'CHUNK: only the last chunk carries payload_sha256', c.id);
  const idBuf = Buffer.from(c.id, 'ascii');
  const fixed = Buffer.allocUnsafe(1 + idBuf.length + 4 + 8 + 8 + 4);
  let p = fixed.writeUInt8(idBuf.length, 0);
  p += idBuf.copy(fixed, p);
  p = fixed.writeUInt32BE(c.seq, p);
  p = fixed.writeBigUInt64BE(BigInt(c.offset), p);
  p = fixed.writeBigUInt64BE(BigInt(c.total), p);
  fixed.writeUInt32BE(c.data.length, p);
  const parts: Buffer[] = [fixed, c.chunk_sha256];
  if (metaBuf) {
    const ml = Buffer.allocUnsafe(4);
    ml.writeUInt32BE(metaBuf.length, 0);
    parts.push(ml, metaBuf);
  }
  if (last) parts.push(c.payload_sha256 as Buffer);
  parts.push(c.data);
  const bodyLength = parts.reduce((n, b) => n + b.length, 0);
  return Buffer.concat([header('CHUNK', bodyLength), ...parts], HEADER_BYTES + bodyLength);
}

function checkChunkNumbers(id: string, seq: number, offset: number, total: number, len: number, maxChunk: number): void {
  if (!Number.isSafeInteger(seq) || seq < 0 || seq > 0xffffffff) fail('malformed', 'CHUNK: seq must be a u32', id);
  if (!Number.isSafeInteger(total) || total < 0) fail('malformed', 'CHUNK: total must be a non-negative safe integer', id);
  if (!Number.isSafeInteger(offset) || offset < 0 || offset + len > total) fail('malformed', `CHUNK: offset ${offset} + length ${len} exceeds total ${total}`, id);
  if (len > maxChunk) fail('oversized', `CHUNK: ${len} bytes of data, the limit is ${maxChunk}`, id);
  if ((seq === 0) !== (offset === 0)) fail('malformed', 'CHUNK: seq is 0 exactly for the chunk at offset 0', id);
  if (len === 0 && offset !== total) fail('malformed', 'CHUNK: only the last chunk may be empty', id);
}

// ─── decoding ────────────────────────────────────────────────────────────────

/**
 * The checks of a frame's header both protocol versions share, in their order: size, magic and
 * version here; the type (each version has its own table), then frameBody for flags and length.
 */
export function frameBuffer(input: Uint8Array, version: number, maxFrame: number): Buffer {
  const buf = Buffer.isBuffer(input) ? input : Buffer.from(input.buffer, input.byteOffset, input.byteLength);
  if (buf.length > maxFrame) fail('oversized', `frame of ${buf.length} bytes, the limit is ${maxFrame}`);
  if (buf.length < HEADER_BYTES) fail('malformed', `truncated header: ${buf.length} of ${HEADER_BYTES} bytes`);
  if (buf[0] !== FRAME_MAGIC) fail('malformed', `bad magic byte 0x${(buf[0] as number).toString(16)}`);
  if (buf[1] !== version) fail('unsupported_version', `frame version ${buf[1]}, this codec speaks ${version}`);
  return buf;
}

/** A frame's body, after its reserved flags byte and body length are checked (see frameBuffer). */
export function frameBody(buf: Buffer, type: string): Buffer {
  if (buf[3] !== 0) fail('malformed', `reserved flags byte is 0x${(buf[3] as number).toString(16)}, must be 0`);
  const bodyLength = buf.readUInt32BE(4);
  if (bodyLength !== buf.length - HEADER_BYTES) fail('malformed', `${type} frame: header says ${bodyLength} body bytes, the frame has ${buf.length - HEADER_BYTES}`);
  return buf.subarray(HEADER_BYTES);
}

export interface DecodeOptions {
  /** Refuse frames larger than this (default LIMITS.maxFrameBytes). */
  maxFrameBytes?: number;
  /** Refuse chunks with more data than this (default LIMITS.maxChunkBytes). */
  maxChunkBytes?: number;
}

/** The type of a frame without decoding it (undefined if the header is unreadable). */
export function peekFrameType(buf: Uint8Array): FrameTypeName | undefined {
  return buf.length >= HEADER_BYTES && buf[0] === FRAME_MAGIC ? TYPE_BY_CODE.get(buf[2] as number) : undefined;
}

/**
 * Decode one frame (one WebSocket binary message). Throws WireError on
 * anything malformed. CHUNK digests are NOT checked here (use
 * verifyChunkDigest / MessageAssembly) so that the receiver can answer a bad
 * digest with REJECT instead of tearing the link down. CHUNK data is a view
 * into `input` (no copy).
 */
export function decodeFrame(input: Uint8Array, opts: DecodeOptions = {}): Frame {
  const maxFrame = opts.maxFrameBytes ?? LIMITS.maxFrameBytes;
  const maxChunk = Math.min(opts.maxChunkBytes ?? LIMITS.maxChunkBytes, LIMITS.maxChunkBytes);
  const buf = frameBuffer(input, PROTOCOL_VERSION, maxFrame);
  const type = TYPE_BY_CODE.get(buf[2] as number);
  if (!type) fail('unknown_type', `unknown frame type 0x${(buf[2] as number).toString(16)}`);
  const body = frameBody(buf, type);
  if (type === 'CHUNK') return decodeChunk(body, maxChunk);
  if (body.length > LIMITS.maxControlBytes) fail('oversized', `${type} frame body of ${body.length} bytes, the limit is ${LIMITS.maxControlBytes}`);
  let json: unknown;
  try {
    json = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(body));
  } catch {
    fail('malformed', `${type} frame: body is not UTF-8 JSON`);
  }
  if (!isObj(json)) fail('malformed', `${type} frame: body must be a JSON object`);
  return parseControl(type, json);
}

function decodeChunk(body: Buffer, maxChunk: number): ChunkFrame {
  let p = 0;
  const need = (n: number, what: string): void => {
    if (body.length - p < n) fail('malformed', `CHUNK frame truncated in ${what}`);
  };
  need(1, 'id length');
  const idLen = body.readUInt8(p);
  p += 1;
  if (idLen < 1 || idLen > LIMITS.maxIdBytes) fail('malformed', `CHUNK: id length ${idLen} is not in 1..${LIMITS.maxIdBytes}`);
  need(idLen, 'id');
  const id = body.toString('latin1', p, p + idLen);
  p += idLen;
  if (!isValidMessageId(id)) fail('malformed', 'CHUNK: invalid message id');
  need(4 + 8 + 8 + 4 + DIGEST_BYTES, 'fixed fields');
  const seq = body.readUInt32BE(p);
  p += 4;
  const offsetBig = body.readBigUInt64BE(p);
  p += 8;
  const totalBig = body.readBigUInt64BE(p);
  p += 8;
  const len = body.readUInt32BE(p);
  p += 4;
  if (offsetBig > BigInt(Number.MAX_SAFE_INTEGER) || totalBig > BigInt(Number.MAX_SAFE_INTEGER)) fail('oversized', 'CHUNK: offset or total beyond 2^53-1', id);
  const offset = Number(offsetBig);
  const total = Number(totalBig);
  checkChunkNumbers(id, seq, offset, total, len, maxChunk);
  const chunkSha = body.subarray(p, p + DIGEST_BYTES);
  p += DIGEST_BYTES;
  const frame: ChunkFrame = { type: 'CHUNK', id, seq, offset, total, chunk_sha256: chunkSha, data: body.subarray(0, 0) };
  if (seq === 0) {
    need(4, 'metadata length');
    const metaLen = body.readUInt32BE(p);
    p += 4;
    if (metaLen > LIMITS.maxMetadataBytes) fail('oversized', `CHUNK: metadata of ${metaLen} bytes, the limit is ${LIMITS.maxMetadataBytes}`, id);
    need(metaLen, 'metadata');
    let json: unknown;
    try {
      json = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(body.subarray(p, p + metaLen)));
    } catch {
      fail('malformed', 'CHUNK: metadata is not UTF-8 JSON', id);
    }
    p += metaLen;
    try {
      frame.meta = parseMeta(json);
    } catch (err) {
      if (err instanceof WireError) fail(err.reason, err.message, id);
      throw err;
    }
  }
  if (offset + len === total) {
    need(DIGEST_BYTES, 'payload digest');
    frame.payload_sha256 = body.subarray(p, p + DIGEST_BYTES);
    p += DIGEST_BYTES;
  }
  if (body.length - p !== len) fail('malformed', `CHUNK: data length field says ${len}, the frame carries ${body.length - p}`, id);
  frame.data = body.subarray(p);
  return frame;
}

// ─── reassembly ──────────────────────────────────────────────────────────────

/**
 * The receive state of ONE message: checks that its chunks arrive in order
 * (contiguous offsets, consecutive sequence numbers, same total), verifies each
 * chunk digest and, at the end, the payload digest, hashing incrementally. It
 * does not keep the data: the cloud streams it to disk, the Reassembler below
 * keeps it in memory.
 */
export class MessageAssembly {
  readonly id: string;
  readonly total: number;
  readonly meta: MessageMeta;
  private nextSeqValue: number;
  private nextOffsetValue: number;
  /** Created on the first chunk that needs it: a whole message in one chunk is hashed one-shot instead. */
  private hashState: Hash | undefined;
  private done = false;

  private constructor(id: string, total: number, meta: MessageMeta, nextSeq: number, nextOffset: number, hash: Hash | undefined) {
    this.id = id;
    this.total = total;
    this.meta = meta;
    this.nextSeqValue = nextSeq;
    this.nextOffsetValue = nextOffset;
    this.hashState = hash;
  }

  private get hash(): Hash {
    return (this.hashState ??= createHash('sha256'));
  }

  /** Start from a first chunk (seq 0). Does not consume it: call accept(first) next. */
  static begin(first: ChunkFrame): MessageAssembly {
    if (first.seq !== 0 || !first.meta) fail('out_of_order', `message ${first.id}: first chunk seen has seq ${first.seq}, expected 0`, first.id);
    return new MessageAssembly(first.id, first.total, first.meta, 0, 0, undefined);
  }

  /**
   * Continue a message whose first `offset` bytes are held (e.g. on disk after a
   * reconnect); `heldHash` must already have been fed exactly those bytes.
   */
  static resume(args: { id: string; total: number; meta: MessageMeta; offset: number; nextSeq: number; heldHash: Hash }): MessageAssembly {
    if (args.offset > args.total || (args.offset === 0) !== (args.nextSeq === 0)) throw new RangeError('inconsistent resume point');
    return new MessageAssembly(args.id, args.total, args.meta, args.nextSeq, args.offset, args.heldHash);
  }

  get nextSeq(): number {
    return this.nextSeqValue;
  }
  /** Bytes received and verified so far. */
  get offset(): number {
    return this.nextOffsetValue;
  }
  get complete(): boolean {
    return this.done;
  }

  /**
   * Check one chunk against the expected position and its digest, and feed it to
   * the payload hash. Returns true when it was the last chunk and the payload
   * digest matched. Throws WireError (out_of_order, duplicate_chunk, malformed,
   * bad_digest); on a throw the state is unchanged, except after a bad payload
   * digest (the message is then unusable).
   */
  accept(c: ChunkFrame): boolean {
    if (c.id !== this.id) throw new RangeError(`chunk of ${c.id} given to the assembly of ${this.id}`);
    if (this.done) fail('duplicate_chunk', `message ${c.id} is already complete`, c.id);
    if (c.seq < this.nextSeqValue || (c.seq === this.nextSeqValue && c.offset < this.nextOffsetValue)) {
      fail('duplicate_chunk', `message ${c.id}: chunk seq ${c.seq} again (expected ${this.nextSeqValue})`, c.id);
    }
    if (c.seq !== this.nextSeqValue || c.offset !== this.nextOffsetValue) {
      fail('out_of_order', `message ${c.id}: got seq ${c.seq} at offset ${c.offset}, expected seq ${this.nextSeqValue} at offset ${this.nextOffsetValue}`, c.id);
    }
    if (c.total !== this.total) fail('malformed', `message ${c.id}: total changed from ${this.total} to ${c.total}`, c.id);
    if (c.offset === 0 && c.data.length === c.total && c.payload_sha256 && digestEquals(c.chunk_sha256, c.payload_sha256)) {
      // a whole message in one chunk whose chunk digest is its payload digest (always so in protocol v2): hash once
      this.nextSeqValue = 1;
      this.nextOffsetValue = c.total;
      this.done = true;
      if (!digestEquals(sha256(c.data), c.payload_sha256)) fail('bad_digest', `message ${c.id}: payload does not match payload_sha256`, c.id);
      return true;
    }
    assertChunkDigest(c);
    this.hash.update(c.data);
    this.nextSeqValue += 1;
    this.nextOffsetValue += c.data.length;
    if (this.nextOffsetValue < this.total) return false;
    this.done = true;
    const got = this.hash.digest();
    if (!c.payload_sha256 || !digestEquals(got, c.payload_sha256)) fail('bad_digest', `message ${c.id}: payload does not match payload_sha256`, c.id);
    return true;
  }
}

export interface AssembledMessage {
  id: string;
  meta: MessageMeta;
  payload: Buffer;
  /** Lowercase hex SHA-256 of payload (verified). */
  sha256: string;
}

export interface ReassemblerOptions {
  /** Most messages in progress at once (default 64). */
  maxPartials?: number;
  /** Largest message total accepted (default 64 MiB: this class buffers in memory). */
  maxMessageBytes?: number;
}

/**
 * Reassemble chunked messages in memory. Pure and stateful: push() chunks in
 * the order received; it returns the completed message on its last chunk and
 * null otherwise, and throws WireError on any violation. A chunk with seq 0
 * for a message in progress restarts that message (the protocol's rule).
 */
export class Reassembler {
  private readonly inProgress = new Map<string, { asm: MessageAssembly; parts: Buffer[] }>();
  private readonly maxPartials: number;
  private readonly maxMessageBytes: number;

  constructor(opts: ReassemblerOptions = {}) {
    this.maxPartials = opts.maxPartials ?? 64;
    this.maxMessageBytes = opts.maxMessageBytes ?? 64 * 1024 * 1024;
  }

  /** Messages in progress. */
  get partialCount(): number {
    return this.inProgress.size;
  }

  /** Where a message in progress stands (for WELCOME/QUERY answers). */
  partial(id: string): PartialInfo | undefined {
    const e = this.inProgress.get(id);
    return e && { id, offset: e.asm.offset, next_seq: e.asm.nextSeq, total: e.asm.total };
  }

  /** Forget a message in progress (e.g. after REJECT). */
  discard(id: string): void {
    this.inProgress.delete(id);
  }

  push(c: ChunkFrame): AssembledMessage | null {
    let entry = this.inProgress.get(c.id);
    if (c.seq === 0) {
      if (c.total > this.maxMessageBytes) fail('oversized', `message ${c.id} of ${c.total} bytes, the limit is ${this.maxMessageBytes}`, c.id);
      if (!entry && this.inProgress.size >= this.maxPartials) fail('too_many_partials', `more than ${this.maxPartials} messages in progress`, c.id);
      entry = { asm: MessageAssembly.begin(c), parts: [] };
    } else if (!entry) {
      fail('out_of_order', `message ${c.id}: chunk seq ${c.seq} without its first chunk`, c.id);
    }
    let last: boolean;
    try {
      last = entry.asm.accept(c);
    } catch (err) {
      if (err instanceof WireError && err.reason === 'bad_digest' && entry.asm.complete) this.inProgress.delete(c.id);
      throw err;
    }
    entry.parts.push(Buffer.from(c.data)); // copy: c.data is a view into a frame buffer
    if (!last) {
      this.inProgress.set(c.id, entry);
      return null;
    }
    this.inProgress.delete(c.id);
    const payload = Buffer.concat(entry.parts);
    return { id: c.id, meta: entry.asm.meta, payload, sha256: sha256Hex(payload) };
  }
}

/** Convenience: decode a frame and require a given type (throws WireError unexpected otherwise). */
export function expectFrame<T extends FrameTypeName>(frame: Frame, type: T): Extract<Frame, { type: T }> {
  if (frame.type !== type) fail('unexpected', `expected ${type}, got ${frame.type}`);
  return frame as Extract<Frame, { type: T }>;
}

/** The ERROR frame that reports a WireError to the peer. */
export function errorFrameFor(err: WireError, fatal: boolean): ErrorFrame {
  const f: ErrorFrame = { type: 'ERROR', code: err.reason, message: err.message.slice(0, 1024), fatal };
  if (err.messageId !== undefined) f.id = err.messageId;
  return f;
}
