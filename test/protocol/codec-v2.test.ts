import t, { type Test } from 'tap';
import { randomBytes } from 'node:crypto';
import { FRAME_TYPES, HEADER_BYTES, LIMITS, MessageAssembly, WireError, encodeFrame, sha256, type MessageMeta, type WireErrorReason } from '../../protocol/codec.js';
import {
  AckFrontier,
  BATCH_TYPE,
  DISCARD_TYPE,
  FEATURE_STREAM,
  batchEntryHeaderBytes,
  LIMITS_V2,
  PROTOCOL_VERSION_2,
  SUBPROTOCOL_V2,
  checkMeta,
  decodeFrameV2,
  encodeBatch,
  encodeBatchChunk,
  encodeFrameV2,
  peekVersion,
  sealBatchFrame,
  toChunkFrame,
  type BatchChunk,
  type FrameV2,
} from '../../protocol/v2.js';

const META: MessageMeta = { device_id: 'dev-1', topic: 'devices/dev-1/telemetry', qos: 1, received_at: 1_700_000_000_000, content_type: 'application/json' };

function throwsWire(tt: Test, fn: () => unknown, reason: WireErrorReason, msg: string): void {
  try {
    fn();
    tt.fail(`${msg}: did not throw`);
  } catch (err) {
    tt.ok(err instanceof WireError, `${msg}: a WireError`);
    tt.equal((err as WireError).reason, reason, `${msg}: reason ${reason} (${(err as Error).message})`);
    tt.equal((err as WireError).code, 'ECONN_PROTOCOL', `${msg}: code`);
  }
}

/** A whole message in one chunk, as the uplink sends it. */
function single(id: string, payload: Buffer, pos: number, meta: MessageMeta = META): BatchChunk {
  return { id, seq: 0, offset: 0, total: payload.length, meta, payload_sha256: sha256(payload), pos, data: payload };
}

/** The chunks of a message of several chunks. */
function multi(id: string, payload: Buffer, size: number, pos: number): BatchChunk[] {
  const out: BatchChunk[] = [];
  for (let off = 0, seq = 0; off < payload.length; off += size, seq++) {
    const data = payload.subarray(off, Math.min(payload.length, off + size));
    const c: BatchChunk = { id, seq, offset: off, total: payload.length, chunk_sha256: sha256(data), data };
    if (seq === 0) c.meta = META;
    if (off + data.length === payload.length) {
      c.payload_sha256 = sha256(payload);
      c.pos = pos;
    }
    out.push(c);
  }
  return out;
}

t.test('constants: version 2, its subprotocol and the BATCH type', async (tt) => {
  tt.equal(PROTOCOL_VERSION_2, 2);
  tt.equal(SUBPROTOCOL_V2, 'edge-connector.v2');
  tt.equal(BATCH_TYPE, 0x10);
  tt.notOk(Object.values(FRAME_TYPES).includes(BATCH_TYPE as never), 'BATCH does not reuse a v1 code');
});

t.test('BATCH round-trips many small messages and a multi-chunk one in one frame', async (tt) => {
  const chunks: BatchChunk[] = [];
  for (let i = 1; i <= 100; i++) chunks.push(single(`m${i}`, randomBytes(64), i, i % 2 ? META : { device_id: 'd', topic: 't/ü', qos: 0, received_at: i }));
  chunks.push(single('empty', Buffer.alloc(0), 101));
  const big = randomBytes(10_000);
  chunks.push(...multi('big', big, 4096, 102));
  const buf = encodeFrameV2({ type: 'BATCH', chunks });
  tt.equal(buf[0], 0xec);
  tt.equal(buf[1], 2, 'header version 2');
  tt.equal(buf[2], 0x10, 'type BATCH');
  tt.equal(peekVersion(buf), 2);
  const f = decodeFrameV2(buf);
  if (f.type !== 'BATCH') throw new Error('not a batch');
  tt.equal(f.chunks.length, chunks.length);
  for (let i = 0; i < chunks.length; i++) {
    const a = chunks[i]!;
    const b = f.chunks[i]!;
    tt.equal(b.id, a.id);
    tt.equal(b.seq, a.seq);
    tt.equal(b.offset, a.offset);
    tt.equal(b.total, a.total);
    tt.same(b.meta, a.meta);
    tt.same(b.pos, a.pos);
    tt.ok(b.data.equals(a.data));
    tt.same(b.chunk_sha256 && Buffer.from(b.chunk_sha256), a.chunk_sha256);
    tt.same(b.payload_sha256 && Buffer.from(b.payload_sha256), a.payload_sha256);
  }
  // a single-chunk message carries one digest: 24 fixed + id + meta + 32 + 8 + data
  const e = encodeBatchChunk(single('m1', Buffer.from('abc'), 1, { device_id: 'd', topic: 't', qos: 1, received_at: 0 }));
  tt.equal(e.length, 1 + 2 + 24 + (1 + 8 + 2 + 1 + 2 + 1) + 32 + 8 + 3, 'no chunk digest for a single-chunk message');
});

t.test('reassembly of v2 chunks checks the payload digest once for a single-chunk message', async (tt) => {
  const payload = randomBytes(100);
  const c = toChunkFrame(single('x', payload, 1));
  const asm = MessageAssembly.begin(c);
  tt.equal(asm.accept(c), true);
  const bad = toChunkFrame(single('y', payload, 2));
  bad.data = Buffer.from(payload);
  bad.data[0] = (bad.data[0] as number) ^ 1;
  const asm2 = MessageAssembly.begin(bad);
  throwsWire(tt, () => asm2.accept(bad), 'bad_digest', 'a corrupted single-chunk message');
  tt.ok(asm2.complete, 'a payload digest failure: the message is unusable (REJECT permanent)');
  // multi-chunk: chunk digests checked per chunk
  const parts = multi('z', randomBytes(9000), 4096, 3).map(toChunkFrame);
  const asm3 = MessageAssembly.begin(parts[0]!);
  tt.equal(asm3.accept(parts[0]!), false);
  const corrupt = { ...parts[1]!, data: Buffer.alloc(parts[1]!.data.length) };
  throwsWire(tt, () => asm3.accept(corrupt), 'bad_digest', 'a corrupted middle chunk');
  tt.notOk(asm3.complete, 'a chunk digest failure leaves the message resumable (REJECT retry)');
  tt.equal(asm3.accept(parts[1]!), false);
  tt.equal(asm3.accept(parts[2]!), true);
});

t.test('control frames: v1 bodies under a v2 header; ACK is cumulative', async (tt) => {
  const frames: FrameV2[] = [
    { type: 'HELLO', version: 2, gateway_id: 'gw-1', software: 'x', chunk_size: 1024, heartbeat_ms: 5000 },
    { type: 'WELCOME', version: 2, session_id: 's', max_frame_bytes: 1 << 20, max_chunk_bytes: 1 << 16, max_message_bytes: 1 << 30, max_partials: 8, heartbeat_ms: 1000, token_expires_at: 5, partials: [] },
    { type: 'ACK', upto: 42, ids: [] },
    { type: 'ACK', ids: ['a', 'b'], progress: [{ id: 'c', offset: 10, next_seq: 1 }] },
    { type: 'REJECT', id: 'a', kind: 'retry', reason: 'r', retry_after_ms: 10, offset: 0, next_seq: 0 },
    { type: 'PING', t: 1 },
    { type: 'PONG', t: 1, t_reply: 2 },
    { type: 'TOKEN', access_token: 'x.y.z' },
    { type: 'TOKEN_OK', expires_at: 9 },
    { type: 'ERROR', code: 'malformed', message: 'm', fatal: true },
  ];
  for (const f of frames) {
    const buf = encodeFrameV2(f);
    tt.equal(buf[1], 2, `${f.type}: version 2 header`);
    tt.same(decodeFrameV2(buf), f, `${f.type} round-trips`);
  }
  throwsWire(tt, () => encodeFrameV2({ type: 'ACK', ids: [] }), 'malformed', 'an ACK that acknowledges nothing');
  throwsWire(tt, () => encodeFrameV2({ type: 'ACK', upto: -1, ids: [] }), 'malformed', 'a negative upto');
  throwsWire(tt, () => encodeFrameV2({ type: 'ACK', upto: 1.5, ids: [] }), 'malformed', 'a fractional upto');
});

function withBody(type: number, body: Buffer, version = 2): Buffer {
  const h = Buffer.alloc(HEADER_BYTES);
  h[0] = 0xec;
  h[1] = version;
  h[2] = type;
  h.writeUInt32BE(body.length, 4);
  return Buffer.concat([h, body]);
}

t.test('malformed input: every refusal is a WireError with the right reason', async (tt) => {
  const good = encodeFrameV2({ type: 'BATCH', chunks: [single('m1', Buffer.from('hello'), 1)] });
  throwsWire(tt, () => decodeFrameV2(good.subarray(0, 5)), 'malformed', 'truncated header');
  const badMagic = Buffer.from(good);
  badMagic[0] = 0;
  throwsWire(tt, () => decodeFrameV2(badMagic), 'malformed', 'bad magic');
  throwsWire(tt, () => decodeFrameV2(encodeFrame({ type: 'PING', t: 1 })), 'unsupported_version', 'a version 1 frame');
  const flags = Buffer.from(good);
  flags[3] = 1;
  throwsWire(tt, () => decodeFrameV2(flags), 'malformed', 'flags set');
  throwsWire(tt, () => decodeFrameV2(withBody(0x7f, Buffer.alloc(0))), 'unknown_type', 'an unknown type');
  throwsWire(tt, () => decodeFrameV2(withBody(0x03, Buffer.alloc(0))), 'unexpected', 'a v1 CHUNK frame under a v2 header');
  const len = Buffer.from(good);
  len.writeUInt32BE(len.readUInt32BE(4) + 1, 4);
  throwsWire(tt, () => decodeFrameV2(len), 'malformed', 'body length mismatch');
  throwsWire(tt, () => decodeFrameV2(withBody(BATCH_TYPE, Buffer.alloc(0))), 'malformed', 'an empty batch');
  // every truncation of a valid batch body is refused, never a crash or a wrong frame
  const body = good.subarray(HEADER_BYTES);
  for (let n = 1; n < body.length; n++) {
    try {
      decodeFrameV2(withBody(BATCH_TYPE, body.subarray(0, n)));
      tt.fail(`truncated at ${n}: accepted`);
    } catch (err) {
      if (!(err instanceof WireError)) tt.fail(`truncated at ${n}: ${(err as Error).message}`);
    }
  }
  tt.pass('every truncation refused');
  // trailing garbage after the last entry
  throwsWire(tt, () => decodeFrameV2(withBody(BATCH_TYPE, Buffer.concat([body, Buffer.from([0])]))), 'malformed', 'trailing byte');
  // id length 0 and an invalid id
  throwsWire(tt, () => decodeFrameV2(withBody(BATCH_TYPE, Buffer.from([0]))), 'malformed', 'id length 0');
  const badId = Buffer.from(body);
  badId[1] = 0x20; // 'm1' → ' 1'
  throwsWire(tt, () => decodeFrameV2(withBody(BATCH_TYPE, badId)), 'malformed', 'an invalid id');
  // unknown metadata flag bit
  const meta = Buffer.from(body);
  meta[1 + 2 + 24] = 0x80;
  throwsWire(tt, () => decodeFrameV2(withBody(BATCH_TYPE, meta)), 'malformed', 'unknown metadata flags');
  // invalid UTF-8 in the topic
  const c = single('m1', Buffer.from('x'), 1, { device_id: 'd', topic: 'tt', qos: 0, received_at: 0 });
  const e = encodeBatchChunk(c);
  const topicAt = 1 + 2 + 24 + 1 + 8 + 2 + 1 + 2;
  tt.equal(e.toString('utf8', topicAt, topicAt + 2), 'tt');
  e[topicAt] = 0xff;
  throwsWire(tt, () => decodeFrameV2(encodeBatch([e])), 'malformed', 'a topic that is not UTF-8');
  // position 0
  const p0 = encodeBatchChunk(single('m1', Buffer.from('x'), 1));
  p0.writeBigUInt64BE(0n, p0.length - 1 - 8);
  throwsWire(tt, () => decodeFrameV2(encodeBatch([p0])), 'malformed', 'position 0');
  // oversized frame / chunk
  throwsWire(tt, () => decodeFrameV2(good, { maxFrameBytes: good.length - 1 }), 'oversized', 'frame over maxFrameBytes');
  const bigChunk = encodeFrameV2({ type: 'BATCH', chunks: multi('big', randomBytes(3000), 2000, 1) });
  throwsWire(tt, () => decodeFrameV2(bigChunk, { maxChunkBytes: 1000 }), 'oversized', 'chunk over maxChunkBytes');
  // offset beyond total, seq/offset mismatch
  const off = encodeBatchChunk(multi('o', randomBytes(300), 100, 1)[1]!);
  off.writeBigUInt64BE(1000n, 1 + 1 + 4);
  throwsWire(tt, () => decodeFrameV2(encodeBatch([off])), 'malformed', 'offset + length beyond total');
  const seq = encodeBatchChunk(multi('o', randomBytes(300), 100, 1)[1]!);
  seq.writeUInt32BE(0, 1 + 1);
  throwsWire(tt, () => decodeFrameV2(encodeBatch([seq])), 'malformed', 'seq 0 at a non-zero offset');
  const huge = encodeBatchChunk(multi('o', randomBytes(300), 100, 1)[1]!);
  huge.writeBigUInt64BE(2n ** 60n, 1 + 1 + 4 + 8);
  throwsWire(tt, () => decodeFrameV2(encodeBatch([huge])), 'oversized', 'total beyond 2^53-1');
  // control frame bodies
  throwsWire(tt, () => decodeFrameV2(withBody(FRAME_TYPES.PING, Buffer.from('{"t":'))), 'malformed', 'truncated JSON');
  throwsWire(tt, () => decodeFrameV2(withBody(FRAME_TYPES.PING, Buffer.from([0xff, 0xfe]))), 'malformed', 'invalid UTF-8 JSON');
  throwsWire(tt, () => decodeFrameV2(withBody(FRAME_TYPES.PING, Buffer.from('[1]'))), 'malformed', 'JSON that is not an object');
  throwsWire(tt, () => decodeFrameV2(withBody(FRAME_TYPES.ACK, Buffer.from('{"upto":"5"}'))), 'malformed', 'upto as a string');
  throwsWire(tt, () => decodeFrameV2(withBody(FRAME_TYPES.ACK, Buffer.from('{"ids":["bad id"]}'))), 'malformed', 'an invalid id in ACK');
  throwsWire(tt, () => decodeFrameV2(withBody(FRAME_TYPES.PING, Buffer.alloc(LIMITS.maxControlBytes + 1, 0x20))), 'oversized', 'a control body over 1 MiB');
});

t.test('random bytes never crash the decoder', async (tt) => {
  const base = encodeFrameV2({ type: 'BATCH', chunks: [single('m1', randomBytes(40), 1), ...multi('m2', randomBytes(300), 128, 2)] });
  let refused = 0;
  for (let i = 0; i < 2000; i++) {
    const b = Buffer.from(base);
    for (let k = 0; k < 1 + (i % 4); k++) b[HEADER_BYTES + Math.floor(Math.random() * (b.length - HEADER_BYTES))] = Math.floor(Math.random() * 256);
    try {
      decodeFrameV2(b);
    } catch (err) {
      if (!(err instanceof WireError)) throw err;
      refused++;
    }
  }
  tt.ok(refused > 0, `${refused} mutations refused with a WireError, none crashed`);
});

t.test('the encoder refuses what a peer must refuse (the uplink quarantines such a record)', async (tt) => {
  throwsWire(tt, () => encodeBatchChunk(single('m1', Buffer.from('x'), 1, { ...META, content_type: 'x'.repeat(256) })), 'oversized', 'a 256-byte content type');
  throwsWire(tt, () => encodeBatchChunk(single('m1', Buffer.from('x'), 1, { ...META, topic: 't'.repeat(LIMITS.maxTopicBytes + 1) })), 'oversized', 'a topic over the limit');
  throwsWire(tt, () => encodeBatchChunk(single('m1', Buffer.from('x'), 1, { ...META, device_id: '' })), 'oversized', 'an empty device id');
  throwsWire(tt, () => checkMeta({ ...META, received_at: -1 }), 'malformed', 'a negative received_at');
  throwsWire(tt, () => encodeBatchChunk(single('bad id', Buffer.from('x'), 1)), 'malformed', 'an invalid id');
  throwsWire(tt, () => encodeBatchChunk({ ...single('m1', Buffer.from('x'), 1), pos: 0 }), 'malformed', 'position 0');
  throwsWire(tt, () => encodeBatchChunk({ ...single('m1', Buffer.from('x'), 1), chunk_sha256: sha256(Buffer.from('x')) }), 'malformed', 'a chunk digest on a single-chunk message');
  const { pos: _pos, ...noPos } = single('m1', Buffer.from('x'), 1);
  throwsWire(tt, () => encodeBatchChunk(noPos), 'malformed', 'a last chunk without position');
  throwsWire(tt, () => encodeBatch([]), 'malformed', 'an empty batch');
  throwsWire(tt, () => encodeBatch(new Array<Buffer>(LIMITS_V2.maxChunksPerBatch + 1).fill(encodeBatchChunk(single('m', Buffer.alloc(0), 1)))), 'malformed', 'too many chunks');
});

t.test('AckFrontier: positions in order, settled in any order, upto = contiguous prefix', async (tt) => {
  const f = new AckFrontier();
  tt.equal(f.next, 1);
  tt.equal(f.upto, 0);
  for (let p = 1; p <= 5; p++) f.expect(p);
  throwsWire(tt, () => f.expect(7), 'malformed', 'a gap');
  throwsWire(tt, () => f.expect(5), 'malformed', 'a repeat');
  tt.equal(f.unsettled, 5);
  tt.equal(f.settle(3), false, 'out of order: upto stays');
  tt.equal(f.upto, 0);
  tt.equal(f.settle(1), true);
  tt.equal(f.upto, 1);
  tt.equal(f.settle(2), true, 'fills the gap up to 3');
  tt.equal(f.upto, 3);
  tt.equal(f.settle(2), false, 'settling twice is ignored');
  tt.equal(f.settle(9), false, 'a position never received is ignored');
  tt.equal(f.settle(5), false);
  tt.equal(f.settle(4), true);
  tt.equal(f.upto, 5);
  tt.equal(f.unsettled, 0);
});

t.test('sealBatchFrame: a chunk read into place frames to the same bytes as encodeBatch of encodeBatchChunk, without a copy', async (t) => {
  const payload = randomBytes(3000);
  for (const c of multi('gw-1:big', payload, 1024, 7)) {
    const { data, ...head } = c;
    const at = HEADER_BYTES + batchEntryHeaderBytes(head, data.length);
    const frame = Buffer.alloc(at + data.length, 0xaa);
    data.copy(frame, at);
    const sealed = sealBatchFrame(frame, head, data.length);
    t.equal(sealed, frame, `seq ${c.seq}: the frame itself, filled in front of the data`);
    t.ok(sealed.equals(encodeBatch([encodeBatchChunk(c)])), `seq ${c.seq}: same bytes`);
    const back = decodeFrameV2(sealed);
    t.ok(back.type === 'BATCH' && back.chunks[0]!.data.equals(data), `seq ${c.seq}: decodes to its data`);
  }
  const first = multi('gw-1:x', payload, 1024, 1)[0]!;
  const { data, ...head } = first;
  t.throws(() => sealBatchFrame(Buffer.alloc(HEADER_BYTES + data.length), head, data.length), RangeError, 'a frame of the wrong size is refused');
  const at = HEADER_BYTES + batchEntryHeaderBytes(head, data.length);
  throwsWire(t, () => sealBatchFrame(Buffer.alloc(at + data.length), { ...head, chunk_sha256: undefined }, data.length), 'malformed', 'the rules of encodeBatchChunk apply');
});

t.test('feature stream (§13.10): HELLO/WELCOME features and DISCARD round-trip; bad ones are malformed', async (tt) => {
  const hello = decodeFrameV2(encodeFrameV2({ type: 'HELLO', version: 2, gateway_id: 'gw-1', features: [FEATURE_STREAM, 'x.y_z-1'] }));
  tt.same(hello, { type: 'HELLO', version: 2, gateway_id: 'gw-1', features: ['stream', 'x.y_z-1'] }, 'HELLO features, unknown names kept');
  const welcome = { type: 'WELCOME' as const, version: 2, session_id: 's', max_frame_bytes: 1 << 20, max_chunk_bytes: 1 << 16, max_message_bytes: 1 << 30, max_partials: 8, heartbeat_ms: 1000, token_expires_at: 1, partials: [] };
  tt.same(decodeFrameV2(encodeFrameV2({ ...welcome, features: ['stream'] })), { ...welcome, features: ['stream'] }, 'WELCOME features');
  tt.same(decodeFrameV2(encodeFrameV2(welcome)), welcome, 'absent: no features');
  const d = encodeFrameV2({ type: 'DISCARD', id: 'gw-1:43' });
  tt.equal(d[2], DISCARD_TYPE);
  tt.same(decodeFrameV2(d), { type: 'DISCARD', id: 'gw-1:43' });
  const json = (type: number, o: unknown): Buffer => withBody(type, Buffer.from(JSON.stringify(o)));
  throwsWire(tt, () => decodeFrameV2(json(DISCARD_TYPE, {})), 'malformed', 'DISCARD without an id');
  throwsWire(tt, () => decodeFrameV2(json(DISCARD_TYPE, { id: 'bad id!' })), 'malformed', 'DISCARD with an invalid id');
  throwsWire(tt, () => decodeFrameV2(json(0x01, { version: 2, gateway_id: 'g', features: 'stream' })), 'malformed', 'features not an array');
  throwsWire(tt, () => decodeFrameV2(json(0x01, { version: 2, gateway_id: 'g', features: ['Stream'] })), 'malformed', 'a name with capitals');
  throwsWire(tt, () => decodeFrameV2(json(0x01, { version: 2, gateway_id: 'g', features: [''] })), 'malformed', 'an empty name');
  throwsWire(tt, () => decodeFrameV2(json(0x01, { version: 2, gateway_id: 'g', features: Array.from({ length: 33 }, (_, i) => `f${i}`) })), 'malformed', '33 names');
});
