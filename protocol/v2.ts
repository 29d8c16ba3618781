/**
 * The edge-connector uplink wire protocol, version 2 (docs/PROTOCOL.md §13 is
 * the normative description; this module is its reference codec).
 *
 * What changes against version 1 (protocol/codec.ts, whose control frames,
 * limits, reassembly and error reasons v2 keeps):
 *  - data travels in BATCH frames (type 0x10): many chunks — typically many
 *    small whole messages — per WebSocket message and per TLS write; CHUNK
 *    (0x03) is not used in v2;
 *  - a chunk's metadata is binary (no JSON per message);
 *  - a message that fits in one chunk carries ONE digest, its payload SHA-256
 *    (which is also the chunk's); a message of several chunks carries a
 *    SHA-256 per chunk plus the payload SHA-256, as in v1;
 *  - the last chunk of every message carries a position `pos` (1, 2, 3, … per
 *    connection), and ACK may acknowledge cumulatively: `upto: P` covers every
 *    message whose last chunk carried a position ≤ P, except those the cloud
 *    REJECTed before that ACK.
 *
 * PURE: no sockets, no files, no timers. Malformed input throws WireError.
 */
import { isUtf8 } from 'node:buffer';
import {
  DIGEST_BYTES,
  FRAME_MAGIC,
  FRAME_TYPES,
  SERVER_FRAMES,
  frameBody,
  frameBuffer,
  HEADER_BYTES,
  LIMITS,
  WireError,
  frameHeader,
  isObj,
  isValidMessageId,
  parseControl,
  type AckProgress,
  type ChunkFrame,
  type ControlFrame,
  type FrameTypeName,
  type MessageMeta,
  type WireErrorReason,
} from './codec.js';

/** Protocol version carried in every v2 frame header and in HELLO/WELCOME. */
export const PROTOCOL_VERSION_2 = 2;
/** The WebSocket subprotocol of version 2. */
export const SUBPROTOCOL_V2 = 'edge-connector.v2';
/** Subprotocols by version, for negotiation and for refusals that name what is supported. */
export const SUBPROTOCOLS: Readonly<Record<number, string>> = { 1: 'edge-connector.v1', 2: SUBPROTOCOL_V2 };
/** Type code of BATCH (v2 only). */
export const BATCH_TYPE = 0x10;
/** Type code of DISCARD (v2 with the `stream` feature only, docs/PROTOCOL.md §13.10). */
export const DISCARD_TYPE = 0x11;
/**
 * The feature a connector offers in HELLO and the cloud confirms in WELCOME for streamed uploads
 * (§13.10): the connector may send a message's chunks before it holds the whole message, and drops a
 * message it will never complete with DISCARD.
 */
export const FEATURE_STREAM = 'stream';

/** Limits of version 2 beyond version 1's (LIMITS). */
export const LIMITS_V2 = {
  /** Most chunks in one BATCH frame. */
  maxChunksPerBatch: 4096,
  /** Largest position (positions are per connection, from 1). */
  maxPosition: Number.MAX_SAFE_INTEGER,
} as const;

function fail(reason: WireErrorReason, message: string, messageId?: string): never {
  throw new WireError(reason, message, messageId);
}

// ─── frame types ─────────────────────────────────────────────────────────────

/** One chunk inside a BATCH. */
export interface BatchChunk {
  id: string;
  seq: number;
  offset: number;
  total: number;
  /** SHA-256 of `data`; present iff the message has more than one chunk (not first-and-last). */
  chunk_sha256?: Buffer;
  /** Present iff seq === 0. */
  meta?: MessageMeta;
  /** SHA-256 of the whole payload; present iff this is the last chunk. */
  payload_sha256?: Buffer;
  /** Position of the message on this connection; present iff this is the last chunk. */
  pos?: number;
  data: Buffer;
}
export interface BatchFrame {
  type: 'BATCH';
  chunks: BatchChunk[];
}
/** ACK in version 2: cumulative `upto`, selective `ids`, large-message `progress`. */
export interface AckFrameV2 {
  type: 'ACK';
  /** Every message whose last chunk carried a position ≤ upto is stored (or was REJECTed before this ACK). */
  upto?: number;
  /** Messages acknowledged by id (a resend of a stored message recognised before its last chunk). */
  ids: string[];
  progress?: AckProgress[];
}
/**
 * DISCARD (feature `stream`, §13.10): the connector will never complete message `id` (its upload was
 * aborted before the connector acknowledged it); the cloud drops what it holds of it unless it is stored.
 */
export interface DiscardFrame {
  type: 'DISCARD';
  id: string;
}
export type FrameV2 = Exclude<ControlFrame, { type: 'ACK' }> | AckFrameV2 | BatchFrame | DiscardFrame;
export type FrameV2TypeName = Exclude<FrameTypeName, 'CHUNK'> | 'BATCH' | 'DISCARD';

export const CLIENT_FRAMES_V2: ReadonlySet<FrameV2TypeName> = new Set(['HELLO', 'BATCH', 'PING', 'PONG', 'TOKEN', 'COMMAND_RESULT', 'QUERY', 'ERROR', 'DISCARD']);
/** The server sends the same frames in both versions (v2 changes only what the client sends and ACK's body). */
export const SERVER_FRAMES_V2: ReadonlySet<FrameV2TypeName> = new Set([...SERVER_FRAMES].filter((t): t is Exclude<FrameTypeName, 'CHUNK'> => t !== 'CHUNK'));

const TYPE_BY_CODE = new Map<number, FrameV2TypeName>([
  ...Object.entries(FRAME_TYPES)
    .filter(([k]) => k !== 'CHUNK')
    .map(([k, v]) => [v, k as FrameV2TypeName] as const),
  [BATCH_TYPE, 'BATCH'],
  [DISCARD_TYPE, 'DISCARD'],
]);
const CODE_BY_TYPE = new Map<FrameV2TypeName, number>([...TYPE_BY_CODE].map(([k, v]) => [v, k]));

// ─── binary metadata ─────────────────────────────────────────────────────────

const META_QOS1 = 0x01;
const META_CONTENT_TYPE = 0x02;

/**
 * Metadata of a first chunk, binary:
 *   u8 flags (bit 0: qos 1, bit 1: content type present; others 0)
 *   u64 received_at, u16 len + device_id (UTF-8), u16 len + topic (UTF-8),
 *   [u8 len + content_type (UTF-8)] when flag bit 1.
 */
export function metaBytes(m: MessageMeta): number {
  return 1 + 8 + 2 + Buffer.byteLength(m.device_id) + 2 + Buffer.byteLength(m.topic) + (m.content_type !== undefined ? 1 + Buffer.byteLength(m.content_type) : 0);
}

/** Throws WireError when metadata breaks the limits (the encoder's check; used to quarantine what can never be sent). */
export function checkMeta(m: MessageMeta, id?: string): void {
  const dev = Buffer.byteLength(m.device_id);
  const top = Buffer.byteLength(m.topic);
  if (dev < 1 || dev > LIMITS.maxDeviceIdBytes) fail('oversized', `metadata: device_id of ${dev} bytes, allowed 1..${LIMITS.maxDeviceIdBytes}`, id);
  if (top < 1 || top > LIMITS.maxTopicBytes) fail('oversized', `metadata: topic of ${top} bytes, allowed 1..${LIMITS.maxTopicBytes}`, id);
  if (m.content_type !== undefined && Buffer.byteLength(m.content_type) > LIMITS.maxContentTypeBytes) {
    fail('oversized', `metadata: content_type of ${Buffer.byteLength(m.content_type)} bytes, the limit is ${LIMITS.maxContentTypeBytes}`, id);
  }
  if (m.qos !== 0 && m.qos !== 1) fail('malformed', 'metadata: qos must be 0 or 1', id);
  if (!Number.isSafeInteger(m.received_at) || m.received_at < 0) fail('malformed', 'metadata: received_at must be a non-negative integer', id);
}

function writeMeta(buf: Buffer, p: number, m: MessageMeta): number {
  buf[p++] = (m.qos === 1 ? META_QOS1 : 0) | (m.content_type !== undefined ? META_CONTENT_TYPE : 0);
  p = buf.writeBigUInt64BE(BigInt(m.received_at), p);
  const dl = buf.write(m.device_id, p + 2, 'utf8');
  buf.writeUInt16BE(dl, p);
  p += 2 + dl;
  const tl = buf.write(m.topic, p + 2, 'utf8');
  buf.writeUInt16BE(tl, p);
  p += 2 + tl;
  if (m.content_type !== undefined) {
    const cl = buf.write(m.content_type, p + 1, 'utf8');
    buf[p] = cl;
    p += 1 + cl;
  }
  return p;
}

// ─── encoding ────────────────────────────────────────────────────────────────

/**
 * Encode one chunk entry of a BATCH (without the frame header). Validates it
 * with the rules the decoder applies, so nothing a peer must refuse is sent.
 */
export function encodeBatchChunk(c: BatchChunk): Buffer {
  const len = c.data.length;
  const size = batchEntryHeaderBytes(c, len) + len;
  const buf = Buffer.allocUnsafe(size);
  let p = writeBatchEntryHeader(buf, 0, c, len);
  p += c.data.copy(buf, p);
  if (p !== size) throw new RangeError(`BATCH entry encoded to ${p} bytes, expected ${size}`);
  return buf;
}

/** A BATCH entry without its data: what the fields before the data depend on. */
export type BatchChunkHead = Omit<BatchChunk, 'data'>;

/** Validate an entry of `len` data bytes (the rules of encodeBatchChunk); throws WireError. */
function checkEntry(c: BatchChunkHead, len: number): void {
  const id = c.id;
  if (!isValidMessageId(id)) fail('malformed', 'BATCH: invalid message id');
  checkNumbers(id, c.seq, c.offset, c.total, len, LIMITS.maxChunkBytes);
  const first = c.seq === 0;
  const last = c.offset + len === c.total;
  const single = first && last;
  if (single !== (c.chunk_sha256 === undefined)) fail('malformed', 'BATCH: chunk_sha256 is present exactly when the message has more than one chunk', id);
  if (c.chunk_sha256 && c.chunk_sha256.length !== DIGEST_BYTES) fail('malformed', 'BATCH: chunk_sha256 must be 32 bytes', id);
  if (first !== (c.meta !== undefined)) fail('malformed', 'BATCH: metadata is carried exactly by the first chunk (seq 0)', id);
  if (last !== (c.payload_sha256 !== undefined) || last !== (c.pos !== undefined)) fail('malformed', 'BATCH: payload_sha256 and pos are carried exactly by the last chunk', id);
  if (c.payload_sha256 && c.payload_sha256.length !== DIGEST_BYTES) fail('malformed', 'BATCH: payload_sha256 must be 32 bytes', id);
  if (c.pos !== undefined && (!Number.isSafeInteger(c.pos) || c.pos < 1)) fail('malformed', 'BATCH: pos must be an integer ≥ 1', id);
  if (c.meta) checkMeta(c.meta, id);
}

/**
 * Bytes of an entry before its `len` data bytes. Depends only on the id, whether the entry is the
 * first and/or the last chunk, and the metadata — not on the digest values — so a sender can size a
 * frame, read the data into place, and write the fields (digests included) afterwards.
 */
export function batchEntryHeaderBytes(c: Pick<BatchChunkHead, 'id' | 'seq' | 'offset' | 'total' | 'meta'>, len: number): number {
  const first = c.seq === 0;
  const last = c.offset + len === c.total;
  return 1 + c.id.length + 4 + 8 + 8 + 4 + (first && last ? 0 : DIGEST_BYTES) + (c.meta ? metaBytes(c.meta) : 0) + (last ? DIGEST_BYTES + 8 : 0);
}

/** Validate an entry of `len` data bytes and write its fields before the data at `buf[p…]`; returns the offset of its data. */
export function writeBatchEntryHeader(buf: Buffer, p: number, c: BatchChunkHead, len: number): number {
  checkEntry(c, len);
  const id = c.id;
  buf[p++] = id.length;
  p += buf.write(id, p, 'latin1');
  p = buf.writeUInt32BE(c.seq, p);
  p = buf.writeBigUInt64BE(BigInt(c.offset), p);
  p = buf.writeBigUInt64BE(BigInt(c.total), p);
  p = buf.writeUInt32BE(len, p);
  if (c.chunk_sha256) p += c.chunk_sha256.copy(buf, p);
  if (c.meta) p = writeMeta(buf, p, c.meta);
  if (c.payload_sha256) {
    p += c.payload_sha256.copy(buf, p);
    p = buf.writeBigUInt64BE(BigInt(c.pos as number), p);
  }
  return p;
}

/**
 * A BATCH frame of ONE entry whose data already sits at its end: `frame` is
 * HEADER_BYTES + batchEntryHeaderBytes(c, len) + len bytes, the last `len` of them the data (read
 * there directly by the sender: a large chunk is never copied to be framed). Writes the frame header
 * and the entry's fields in front of the data; the bytes equal encodeBatch([encodeBatchChunk(c + data)]).
 */
export function sealBatchFrame(frame: Buffer, c: BatchChunkHead, len: number): Buffer {
  const start = frame.length - len;
  const at = HEADER_BYTES + batchEntryHeaderBytes(c, len);
  if (len < 0 || start !== at) throw new RangeError(`BATCH frame of ${frame.length} bytes cannot hold an entry of ${len} data bytes at ${at}`);
  frame.writeUInt8(FRAME_MAGIC, 0);
  frame.writeUInt8(PROTOCOL_VERSION_2, 1);
  frame.writeUInt8(BATCH_TYPE, 2);
  frame.writeUInt8(0, 3);
  frame.writeUInt32BE(frame.length - HEADER_BYTES, 4);
  const p = writeBatchEntryHeader(frame, HEADER_BYTES, c, len);
  if (p !== start) throw new RangeError(`BATCH entry fields encoded to ${p - HEADER_BYTES} bytes, expected ${start - HEADER_BYTES}`);
  return frame;
}

/** A BATCH frame from entries made by encodeBatchChunk (1..maxChunksPerBatch of them). */
export function encodeBatch(entries: readonly Buffer[]): Buffer {
  if (entries.length < 1 || entries.length > LIMITS_V2.maxChunksPerBatch) fail('malformed', `BATCH: ${entries.length} chunks, allowed 1..${LIMITS_V2.maxChunksPerBatch}`);
  let body = 0;
  for (const e of entries) body += e.length;
  return Buffer.concat([frameHeader(PROTOCOL_VERSION_2, BATCH_TYPE, body), ...entries], HEADER_BYTES + body);
}

/** Encode a v2 frame (control frames as JSON, like v1; BATCH from its chunks). */
export function encodeFrameV2(frame: FrameV2): Buffer {
  if (frame.type === 'BATCH') return encodeBatch(frame.chunks.map(encodeBatchChunk));
  const { type, ...rest } = frame;
  const body = Buffer.from(JSON.stringify(rest), 'utf8');
  if (body.length > LIMITS.maxControlBytes) fail('oversized', `${type} frame body is ${body.length} bytes, the limit is ${LIMITS.maxControlBytes}`);
  parseControlV2(type, JSON.parse(body.toString('utf8')) as Record<string, unknown>); // never emit what a peer must refuse
  return Buffer.concat([frameHeader(PROTOCOL_VERSION_2, CODE_BY_TYPE.get(type) as number, body.length), body]);
}

// ─── decoding ────────────────────────────────────────────────────────────────

export interface DecodeOptionsV2 {
  /** Refuse frames larger than this (default LIMITS.maxFrameBytes). */
  maxFrameBytes?: number;
  /** Refuse chunks with more data than this (default LIMITS.maxChunkBytes). */
  maxChunkBytes?: number;
}

/** The protocol version in a frame header (undefined when the header is unreadable). */
export function peekVersion(buf: Uint8Array): number | undefined {
  return buf.length >= HEADER_BYTES && buf[0] === FRAME_MAGIC ? buf[1] : undefined;
}

/**
 * Decode one v2 frame (one WebSocket binary message). Throws WireError on
 * anything malformed. Digests are NOT checked here (MessageAssembly does, so
 * that a bad digest is answered with REJECT). Chunk data are views into `input`.
 */
export function decodeFrameV2(input: Uint8Array, opts: DecodeOptionsV2 = {}): FrameV2 {
  const maxFrame = opts.maxFrameBytes ?? LIMITS.maxFrameBytes;
  const maxChunk = Math.min(opts.maxChunkBytes ?? LIMITS.maxChunkBytes, LIMITS.maxChunkBytes);
  const buf = frameBuffer(input, PROTOCOL_VERSION_2, maxFrame);
  const code = buf[2] as number;
  const type = TYPE_BY_CODE.get(code);
  if (!type) fail(code === FRAME_TYPES.CHUNK ? 'unexpected' : 'unknown_type', code === FRAME_TYPES.CHUNK ? 'CHUNK frames are not used in version 2 (data travels in BATCH)' : `unknown frame type 0x${code.toString(16)}`);
  const body = frameBody(buf, type);
  if (type === 'BATCH') return decodeBatch(body, maxChunk);
  if (body.length > LIMITS.maxControlBytes) fail('oversized', `${type} frame body of ${body.length} bytes, the limit is ${LIMITS.maxControlBytes}`);
  if (!isUtf8(body)) fail('malformed', `${type} frame: body is not UTF-8 JSON`);
  let json: unknown;
  try {
    json = JSON.parse(body.toString('utf8'));
  } catch {
    fail('malformed', `${type} frame: body is not UTF-8 JSON`);
  }
  if (!isObj(json)) fail('malformed', `${type} frame: body must be a JSON object`);
  return parseControlV2(type, json);
}

function parseControlV2(type: Exclude<FrameV2TypeName, 'BATCH'>, o: Record<string, unknown>): FrameV2 {
  if (type === 'DISCARD') {
    if (!isValidMessageId(o.id)) fail('malformed', `DISCARD frame: "id" must be a message id (1..${LIMITS.maxIdBytes} of [A-Za-z0-9._:-])`);
    return { type, id: o.id };
  }
  if (type !== 'ACK') return parseControl(type, o) as FrameV2;
  const what = 'ACK frame';
  const f: AckFrameV2 = { type: 'ACK', ids: [] };
  if (o.upto !== undefined) {
    if (typeof o.upto !== 'number' || !Number.isSafeInteger(o.upto) || o.upto < 0) fail('malformed', `${what}: "upto" must be a non-negative integer`);
    f.upto = o.upto;
  }
  // ids and progress: v1's rules (ids optional in v2)
  const v1 = parseControl('ACK', { ids: o.ids ?? [], ...(o.progress !== undefined ? { progress: o.progress } : {}) }) as { ids: string[]; progress?: AckProgress[] };
  f.ids = v1.ids;
  if (v1.progress !== undefined) f.progress = v1.progress;
  if (f.upto === undefined && f.ids.length === 0 && (f.progress ?? []).length === 0) fail('malformed', `${what}: acknowledges nothing (no upto, ids or progress)`);
  return f;
}

function checkNumbers(id: string, seq: number, offset: number, total: number, len: number, maxChunk: number): void {
  if (!Number.isSafeInteger(seq) || seq < 0 || seq > 0xffffffff) fail('malformed', 'BATCH: seq must be a u32', id);
  if (!Number.isSafeInteger(total) || total < 0) fail('malformed', 'BATCH: total must be a non-negative safe integer', id);
  if (!Number.isSafeInteger(offset) || offset < 0 || offset + len > total) fail('malformed', `BATCH: offset ${offset} + length ${len} exceeds total ${total}`, id);
  if (len > maxChunk) fail('oversized', `BATCH: chunk of ${len} bytes of data, the limit is ${maxChunk}`, id);
  if ((seq === 0) !== (offset === 0)) fail('malformed', 'BATCH: seq is 0 exactly for the chunk at offset 0', id);
  if (len === 0 && offset !== total) fail('malformed', 'BATCH: only the last chunk may be empty', id);
}

const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);

function decodeBatch(body: Buffer, maxChunk: number): BatchFrame {
  const chunks: BatchChunk[] = [];
  let p = 0;
  let id = '';
  const need = (n: number, what: string): void => {
    if (body.length - p < n) fail('malformed', `BATCH: chunk ${chunks.length + 1} truncated in ${what}`, id || undefined);
  };
  const utf8 = (len: number, what: string): string => {
    need(len, what);
    const b = body.subarray(p, p + len);
    if (!isUtf8(b)) fail('malformed', `BATCH: ${what} is not UTF-8`, id);
    p += len;
    return b.toString('utf8');
  };
  if (body.length === 0) fail('malformed', 'BATCH: no chunks');
  while (p < body.length) {
    if (chunks.length >= LIMITS_V2.maxChunksPerBatch) fail('oversized', `BATCH: more than ${LIMITS_V2.maxChunksPerBatch} chunks`);
    id = '';
    need(1, 'id length');
    const idLen = body[p++] as number;
    if (idLen < 1 || idLen > LIMITS.maxIdBytes) fail('malformed', `BATCH: id length ${idLen} is not in 1..${LIMITS.maxIdBytes}`);
    need(idLen, 'id');
    const rawId = body.toString('latin1', p, p + idLen);
    p += idLen;
    if (!isValidMessageId(rawId)) fail('malformed', 'BATCH: invalid message id');
    id = rawId;
    need(4 + 8 + 8 + 4, 'fixed fields');
    const seq = body.readUInt32BE(p);
    const offsetBig = body.readBigUInt64BE(p + 4);
    const totalBig = body.readBigUInt64BE(p + 12);
    const len = body.readUInt32BE(p + 20);
    p += 24;
    if (offsetBig > MAX_SAFE || totalBig > MAX_SAFE) fail('oversized', 'BATCH: offset or total beyond 2^53-1', id);
    const offset = Number(offsetBig);
    const total = Number(totalBig);
    checkNumbers(id, seq, offset, total, len, maxChunk);
    const first = seq === 0;
    const last = offset + len === total;
    const c: BatchChunk = { id, seq, offset, total, data: body.subarray(0, 0) };
    if (!(first && last)) {
      need(DIGEST_BYTES, 'chunk digest');
      c.chunk_sha256 = body.subarray(p, p + DIGEST_BYTES);
      p += DIGEST_BYTES;
    }
    if (first) {
      need(1 + 8 + 2, 'metadata');
      const flags = body[p] as number;
      if ((flags & ~(META_QOS1 | META_CONTENT_TYPE)) !== 0) fail('malformed', `BATCH: unknown metadata flags 0x${flags.toString(16)}`, id);
      const recBig = body.readBigUInt64BE(p + 1);
      if (recBig > MAX_SAFE) fail('malformed', 'BATCH: received_at beyond 2^53-1', id);
      p += 9;
      const dl = body.readUInt16BE(p);
      p += 2;
      if (dl < 1 || dl > LIMITS.maxDeviceIdBytes) fail(dl > LIMITS.maxDeviceIdBytes ? 'oversized' : 'malformed', `BATCH: device_id of ${dl} bytes, allowed 1..${LIMITS.maxDeviceIdBytes}`, id);
      const device_id = utf8(dl, 'device_id');
      need(2, 'topic length');
      const tl = body.readUInt16BE(p);
      p += 2;
      if (tl < 1 || tl > LIMITS.maxTopicBytes) fail(tl > LIMITS.maxTopicBytes ? 'oversized' : 'malformed', `BATCH: topic of ${tl} bytes, allowed 1..${LIMITS.maxTopicBytes}`, id);
      const topic = utf8(tl, 'topic');
      const meta: MessageMeta = { device_id, topic, qos: flags & META_QOS1 ? 1 : 0, received_at: Number(recBig) };
      if (flags & META_CONTENT_TYPE) {
        need(1, 'content type length');
        const cl = body[p++] as number;
        meta.content_type = utf8(cl, 'content_type');
      }
      c.meta = meta;
    }
    if (last) {
      need(DIGEST_BYTES + 8, 'payload digest and position');
      c.payload_sha256 = body.subarray(p, p + DIGEST_BYTES);
      const posBig = body.readBigUInt64BE(p + DIGEST_BYTES);
      p += DIGEST_BYTES + 8;
      if (posBig < 1n || posBig > MAX_SAFE) fail('malformed', 'BATCH: pos must be in 1..2^53-1', id);
      c.pos = Number(posBig);
    }
    need(len, 'data');
    c.data = body.subarray(p, p + len);
    p += len;
    chunks.push(c);
  }
  return { type: 'BATCH', chunks };
}

/**
 * A BATCH chunk as a v1 ChunkFrame, for MessageAssembly/Reassembler. A
 * single-chunk message's chunk digest is its payload digest (MessageAssembly
 * then hashes the data once).
 */
export function toChunkFrame(c: BatchChunk): ChunkFrame {
  const f: ChunkFrame = { type: 'CHUNK', id: c.id, seq: c.seq, offset: c.offset, total: c.total, chunk_sha256: (c.chunk_sha256 ?? c.payload_sha256) as Buffer, data: c.data };
  if (c.meta) f.meta = c.meta;
  if (c.payload_sha256) f.payload_sha256 = c.payload_sha256;
  return f;
}

// ─── cumulative acknowledgement ──────────────────────────────────────────────

/**
 * The receiver's side of cumulative ACKs: positions arrive in order (1, 2, 3,
 * … — `expect` refuses anything else) and are settled in any order (stored,
 * duplicate, rejected); `upto` is the highest position up to which every
 * position is settled.
 */
export class AckFrontier {
  private last = 0;
  private done = 0;
  private readonly ahead = new Set<number>();

  /** The next position a last chunk must carry. */
  get next(): number {
    return this.last + 1;
  }
  /** Every position ≤ upto is settled. */
  get upto(): number {
    return this.done;
  }
  /** Positions received and not settled yet. */
  get unsettled(): number {
    return this.last - this.done - this.ahead.size;
  }

  /** A last chunk arrived with this position: it must be the next one. Throws WireError malformed otherwise. */
  expect(pos: number, id?: string): void {
    if (pos !== this.last + 1) fail('malformed', `BATCH: position ${pos}, expected ${this.last + 1}`, id);
    this.last = pos;
  }

  /** The message at this position is settled. Returns true when `upto` advanced. */
  settle(pos: number): boolean {
    if (!Number.isSafeInteger(pos) || pos <= this.done || pos > this.last) return false;
    if (pos !== this.done + 1) {
      this.ahead.add(pos);
      return false;
    }
    this.done = pos;
    while (this.ahead.delete(this.done + 1)) this.done++;
    return true;
  }
}
