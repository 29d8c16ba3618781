import t, { type Test } from 'tap';
import { createHash, randomBytes } from 'node:crypto';
import {
  PROTOCOL_VERSION,
  SUBPROTOCOL,
  FRAME_TYPES,
  HEADER_BYTES,
  LIMITS,
  WireError,
  encodeFrame,
  decodeFrame,
  peekFrameType,
  chunkPlan,
  chunkRanges,
  chunkCount,
  chunkMessage,
  makeChunk,
  sha256,
  sha256Hex,
  verifyChunkDigest,
  assertChunkDigest,
  MessageAssembly,
  Reassembler,
  errorFrameFor,
  expectFrame,
  isValidMessageId,
  type ChunkFrame,
  type Frame,
  type MessageMeta,
  type WireErrorReason,
} from '../../protocol/codec.js';
import { ProtocolError } from '../../core/errors.js';

const META: MessageMeta = { device_id: 'dev-1', topic: 'devices/dev-1/telemetry', qos: 1, received_at: 1_700_000_000_000, content_type: 'application/json' };

/** Assert fn throws a WireError (ECONN_PROTOCOL) with the given reason. */
function throwsWire(tt: Test, fn: () => unknown, reason: WireErrorReason, msg: string): void {
  try {
    fn();
    tt.fail(`${msg}: did not throw`);
  } catch (err) {
    tt.ok(err instanceof WireError && err instanceof ProtocolError, `${msg}: a ProtocolError`);
    tt.equal((err as WireError).code, 'ECONN_PROTOCOL', `${msg}: code`);
    tt.equal((err as WireError).reason, reason, `${msg}: reason ${reason} (${(err as Error).message})`);
  }
}

/** Rewrite the body length field of an encoded frame. */
function withBodyLength(buf: Buffer, n: number): Buffer {
  const b = Buffer.from(buf);
  b.writeUInt32BE(n, 4);
  return b;
}

/** A control frame with an arbitrary raw body. */
function rawControl(type: number, body: Buffer | string): Buffer {
  const b = Buffer.isBuffer(body) ? body : Buffer.from(body, 'utf8');
  const h = Buffer.from([0xec, PROTOCOL_VERSION, type, 0, 0, 0, 0, 0]);
  h.writeUInt32BE(b.length, 4);
  return Buffer.concat([h, b]);
}

t.test('constants', async (t) => {
  t.equal(PROTOCOL_VERSION, 1);
  t.equal(SUBPROTOCOL, 'edge-connector.v1');
  t.equal(HEADER_BYTES, 8);
  t.equal(new Set(Object.values(FRAME_TYPES)).size, Object.keys(FRAME_TYPES).length, 'type codes are unique');
});

t.test('every control frame round-trips', async (t) => {
  const frames: Frame[] = [
    { type: 'HELLO', version: 1, gateway_id: 'gw-1', software: 'edge-connector/0.1.0', chunk_size: 262144, heartbeat_ms: 5000 },
    { type: 'HELLO', version: 1, gateway_id: 'gw-1' },
    {
      type: 'WELCOME',
      version: 1,
      session_id: 's-1',
      max_frame_bytes: 1 << 20,
      max_chunk_bytes: 1 << 18,
      max_message_bytes: 1 << 30,
      max_partials: 64,
      heartbeat_ms: 5000,
      token_expires_at: 1_700_000_060_000,
      partials: [{ id: 'm-9', offset: 262144, next_seq: 1, total: 1 << 20 }],
    },
    { type: 'ACK', ids: ['a', 'b.c:d-e_f'] },
    { type: 'ACK', ids: [], progress: [{ id: 'big', offset: 4 << 20, next_seq: 16 }] },
    { type: 'REJECT', id: 'm1', kind: 'permanent', reason: 'too large' },
    { type: 'REJECT', id: 'm1', kind: 'retry', reason: 'chunk digest', retry_after_ms: 500, offset: 1024, next_seq: 1 },
    { type: 'PING', t: 123 },
    { type: 'PONG', t: 123, t_reply: 456 },
    { type: 'TOKEN', access_token: 'eyJhbGciOi.abc.def' },
    { type: 'TOKEN_OK', expires_at: 99 },
    { type: 'TOKEN_REJECTED', reason: 'bad signature', expires_at: 98 },
    { type: 'COMMAND', id: 'c1', device_id: 'dev-1', name: 'reboot', payload: Buffer.from('now').toString('base64') },
    { type: 'COMMAND', id: 'c2', device_id: 'dev-1', name: 'empty', payload: '' },
    { type: 'COMMAND_RESULT', id: 'c1', delivered: true },
    { type: 'COMMAND_RESULT', id: 'c1', delivered: false, reason: 'not connected' },
    { type: 'QUERY', ids: ['m1', 'm2'] },
    { type: 'QUERY_RESULT', entries: [{ id: 'm1', status: 'stored' }, { id: 'm2', status: 'partial', offset: 10, next_seq: 1, total: 20 }, { id: 'm3', status: 'unknown' }] },
    { type: 'ERROR', code: 'out_of_order', message: 'seq 3 expected 2', fatal: true, id: 'm1' },
    { type: 'ERROR', code: 'internal', message: '', fatal: false },
  ];
  for (const f of frames) {
    const buf = encodeFrame(f);
    t.equal(buf[0], 0xec, `${f.type}: magic`);
    t.equal(buf[2], FRAME_TYPES[f.type], `${f.type}: type code`);
    t.equal(buf.readUInt32BE(4), buf.length - HEADER_BYTES, `${f.type}: body length`);
    t.equal(peekFrameType(buf), f.type);
    t.same(decodeFrame(buf), f, `${f.type} round-trips`);
  }
});

t.test('unknown JSON fields are ignored (forward compatibility)', async (t) => {
  const f = decodeFrame(rawControl(FRAME_TYPES.PING, JSON.stringify({ t: 5, extra: { nested: true } })));
  t.same(f, { type: 'PING', t: 5 });
});

t.test('an ERROR code from a newer peer decodes as internal', async (t) => {
  const f = decodeFrame(rawControl(FRAME_TYPES.ERROR, JSON.stringify({ code: 'from_the_future', message: 'x', fatal: false })));
  t.same(f, { type: 'ERROR', code: 'internal', message: 'x', fatal: false });
});

t.test('chunk planning', async (t) => {
  t.same(chunkPlan(0, 4), [{ seq: 0, offset: 0, length: 0, first: true, last: true }], 'empty message is one empty chunk');
  t.same(chunkPlan(4, 4), [{ seq: 0, offset: 0, length: 4, first: true, last: true }]);
  t.same(chunkPlan(5, 4), [
    { seq: 0, offset: 0, length: 4, first: true, last: false },
    { seq: 1, offset: 4, length: 1, first: false, last: true },
  ]);
  t.same(chunkPlan(10, 4, 4, 1).map((r) => [r.seq, r.offset, r.length, r.first, r.last]), [
    [1, 4, 4, false, false],
    [2, 8, 2, false, true],
  ], 'resume from an offset');
  t.same(chunkPlan(8, 4, 8, 2), [{ seq: 2, offset: 8, length: 0, first: false, last: true }], 'resume when the cloud holds every byte: one empty last chunk');
  t.equal(chunkCount(5 << 20, 256 << 10), 20);
  t.equal(chunkCount(0, 1024), 1);
  t.equal(chunkCount((5 << 20) + 1, 256 << 10), 21);
  t.equal(chunkCount(10, 4, 4), 2);
  let n = 0;
  for (const r of chunkRanges(2 ** 40, 16 << 20)) {
    if (++n > 3) break;
    t.equal(r.length, 16 << 20);
  }
  t.throws(() => chunkPlan(-1, 4), RangeError);
  t.throws(() => chunkPlan(4, 0), RangeError);
  t.throws(() => chunkPlan(4, LIMITS.maxChunkBytes + 1), RangeError);
  t.throws(() => chunkPlan(4, 2, 5, 1), RangeError, 'offset past the end');
  t.throws(() => chunkPlan(4, 2, 2, 0), RangeError, 'seq 0 only at offset 0');
  t.throws(() => chunkPlan(4, 2, 0, 1), RangeError);
  t.throws(() => chunkPlan(1.5, 2), RangeError);
});

t.test('digest helpers', async (t) => {
  t.equal(sha256Hex(Buffer.from('abc')), 'ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad');
  t.equal(sha256(Buffer.alloc(0)).toString('hex'), 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855');
  const [c] = chunkMessage('m1', META, Buffer.from('abc'), 4);
  t.ok(verifyChunkDigest(c!));
  assertChunkDigest(c!);
  const bad = { ...c!, data: Buffer.from('abd') };
  t.notOk(verifyChunkDigest(bad));
  throwsWire(t, () => assertChunkDigest(bad), 'bad_digest', 'chunk digest mismatch');
});

t.test('CHUNK layout matches the worked example in docs/PROTOCOL.md', async (t) => {
  const [c] = chunkMessage('m1', { device_id: 'd', topic: 't', qos: 0, received_at: 1 }, Buffer.from('abc'), 1024);
  const buf = encodeFrame(c!);
  const metaJson = Buffer.from(JSON.stringify({ device_id: 'd', topic: 't', qos: 0, received_at: 1 }));
  const abcSha = sha256(Buffer.from('abc'));
  const body = Buffer.concat([
    Buffer.from([2, 0x6d, 0x31]),
    Buffer.from([0, 0, 0, 0]),
    Buffer.alloc(8),
    Buffer.from([0, 0, 0, 0, 0, 0, 0, 3]),
    Buffer.from([0, 0, 0, 3]),
    abcSha,
    Buffer.from([0, 0, 0, metaJson.length]),
    metaJson,
    abcSha,
    Buffer.from('abc'),
  ]);
  const expected = Buffer.concat([Buffer.from([0xec, 1, 3, 0, 0, 0, 0, body.length]), body]);
  t.equal(buf.toString('hex'), expected.toString('hex'));
  t.equal(encodeFrame({ type: 'ACK', ids: ['m1'] }).toString('hex'), Buffer.concat([Buffer.from([0xec, 1, 4, 0, 0, 0, 0, 0x0e]), Buffer.from('{"ids":["m1"]}')]).toString('hex'));
});

t.test('chunks round-trip: first carries metadata, last carries the payload digest, middle neither', async (t) => {
  const payload = randomBytes(10_000);
  const chunks = chunkMessage('msg-1', META, payload, 4096);
  t.equal(chunks.length, 3);
  const decoded = chunks.map((c) => decodeFrame(encodeFrame(c)) as ChunkFrame);
  t.same(decoded[0]!.meta, META);
  t.equal(decoded[0]!.payload_sha256, undefined);
  t.equal(decoded[1]!.meta, undefined);
  t.equal(decoded[1]!.payload_sha256, undefined);
  t.equal(decoded[2]!.meta, undefined);
  t.equal(decoded[2]!.payload_sha256!.toString('hex'), sha256Hex(payload));
  t.same(decoded.map((c) => [c.seq, c.offset, c.total, c.data.length]), [
    [0, 0, 10_000, 4096],
    [1, 4096, 10_000, 4096],
    [2, 8192, 10_000, 1808],
  ]);
  t.ok(decoded.every((c) => verifyChunkDigest(c)));
  t.equal(Buffer.concat(decoded.map((c) => c.data)).toString('hex'), payload.toString('hex'));
});

t.test('encodeFrame refuses what a peer would refuse', async (t) => {
  const [c] = chunkMessage('m1', META, Buffer.from('hello'), 4);
  throwsWire(t, () => encodeFrame({ ...c!, id: 'bad id with spaces' }), 'malformed', 'bad id');
  throwsWire(t, () => encodeFrame({ ...c!, meta: undefined }), 'malformed', 'first chunk without metadata');
  throwsWire(t, () => encodeFrame({ ...c!, chunk_sha256: Buffer.alloc(3) }), 'malformed', 'short digest');
  throwsWire(t, () => encodeFrame({ type: 'PING', t: -1 }), 'malformed', 'negative timestamp');
  throwsWire(t, () => encodeFrame({ type: 'ACK', ids: ['ok', ''] }), 'malformed', 'empty id in ACK');
  throwsWire(t, () => encodeFrame({ ...c!, meta: { ...META, topic: 'x'.repeat(LIMITS.maxMetadataBytes) } }), 'malformed', 'topic too long');
  throwsWire(t, () => encodeFrame({ type: 'COMMAND', id: 'c', device_id: 'd', name: 'n', payload: 'x'.repeat(LIMITS.maxControlBytes + 1) }), 'oversized', 'oversized control');
  throwsWire(t, () => encodeFrame({ type: 'COMMAND', id: 'c', device_id: 'd', name: 'n', payload: 'not base64!' }), 'malformed', 'bad base64');
  t.throws(() => makeChunk({ id: 'm', range: { seq: 0, offset: 0, length: 2, first: true, last: true }, total: 2, data: Buffer.from('abc'), meta: META, payloadSha256: sha256(Buffer.from('ab')) }), RangeError);
});

t.test('malformed frames are refused with ECONN_PROTOCOL and a precise reason', async (t) => {
  const chunks = chunkMessage('m1', META, randomBytes(100), 64);
  const first = encodeFrame(chunks[0]!);
  const last = encodeFrame(chunks[1]!);
  const ping = encodeFrame({ type: 'PING', t: 1 });

  throwsWire(t, () => decodeFrame(Buffer.alloc(0)), 'malformed', 'empty frame');
  throwsWire(t, () => decodeFrame(first.subarray(0, 5)), 'malformed', 'truncated header');
  throwsWire(t, () => decodeFrame(Buffer.concat([Buffer.from([0x00]), ping.subarray(1)])), 'malformed', 'bad magic');
  throwsWire(t, () => decodeFrame(Buffer.concat([Buffer.from([0xec, 2]), ping.subarray(2)])), 'unsupported_version', 'frame version 2');
  throwsWire(t, () => decodeFrame(Buffer.concat([ping.subarray(0, 2), Buffer.from([0x7f]), ping.subarray(3)])), 'unknown_type', 'unknown type');
  throwsWire(t, () => decodeFrame(Buffer.concat([ping.subarray(0, 2), Buffer.from([0x00]), ping.subarray(3)])), 'unknown_type', 'type 0');
  throwsWire(t, () => decodeFrame(Buffer.concat([ping.subarray(0, 3), Buffer.from([0x01]), ping.subarray(4)])), 'malformed', 'reserved flags set');

  // wrong length: header body_length disagrees with the frame
  throwsWire(t, () => decodeFrame(withBodyLength(ping, ping.length - HEADER_BYTES + 1)), 'malformed', 'body_length too big');
  throwsWire(t, () => decodeFrame(withBodyLength(ping, ping.length - HEADER_BYTES - 1)), 'malformed', 'body_length too small');
  throwsWire(t, () => decodeFrame(first.subarray(0, first.length - 1)), 'malformed', 'frame cut short');
  throwsWire(t, () => decodeFrame(Buffer.concat([first, Buffer.from([0])])), 'malformed', 'trailing byte');
  // CHUNK data_length disagrees with the data carried (header length consistent)
  {
    const b = Buffer.from(first);
    const dataLenAt = HEADER_BYTES + 1 + 2 + 4 + 8 + 8;
    b.writeUInt32BE(63, dataLenAt);
    throwsWire(t, () => decodeFrame(b), 'malformed', 'data_length field wrong');
  }
  // truncated inside the chunk fixed fields (consistent header length)
  {
    const body = first.subarray(HEADER_BYTES, HEADER_BYTES + 10);
    throwsWire(t, () => decodeFrame(rawControl(FRAME_TYPES.CHUNK, body)), 'malformed', 'chunk fixed fields truncated');
    throwsWire(t, () => decodeFrame(rawControl(FRAME_TYPES.CHUNK, Buffer.alloc(0))), 'malformed', 'empty chunk body');
    throwsWire(t, () => decodeFrame(rawControl(FRAME_TYPES.CHUNK, Buffer.from([0]))), 'malformed', 'id length 0');
    throwsWire(t, () => decodeFrame(rawControl(FRAME_TYPES.CHUNK, Buffer.from([200]))), 'malformed', 'id length 200');
    throwsWire(t, () => decodeFrame(rawControl(FRAME_TYPES.CHUNK, Buffer.from([5, 0x61]))), 'malformed', 'id truncated');
  }
  // last-chunk digest missing: cut the frame before payload_sha256 (fix header)
  {
    const c = chunks[1]!;
    const b = encodeFrame(c);
    const noDigest = Buffer.concat([b.subarray(0, b.length - c.data.length - 32), b.subarray(b.length - c.data.length)]);
    throwsWire(t, () => decodeFrame(withBodyLength(noDigest, noDigest.length - HEADER_BYTES)), 'malformed', 'last chunk without payload digest');
  }
  // seq/offset inconsistencies
  {
    const b = Buffer.from(last);
    b.writeUInt32BE(0, HEADER_BYTES + 3); // seq 0 at offset 64
    throwsWire(t, () => decodeFrame(b), 'malformed', 'seq 0 at non-zero offset');
    const b2 = Buffer.from(first);
    b2.writeUInt32BE(1, HEADER_BYTES + 3); // seq 1 at offset 0
    throwsWire(t, () => decodeFrame(b2), 'malformed', 'non-zero seq at offset 0');
    const b3 = Buffer.from(last);
    b3.writeBigUInt64BE(50n, HEADER_BYTES + 3 + 4 + 8); // total 50 < offset+len
    throwsWire(t, () => decodeFrame(b3), 'malformed', 'offset + length beyond total');
    const b4 = Buffer.from(last);
    b4.writeBigUInt64BE(2n ** 60n, HEADER_BYTES + 3 + 4 + 8);
    throwsWire(t, () => decodeFrame(b4), 'oversized', 'total beyond 2^53');
  }
  // garbage JSON in metadata
  {
    const c = chunks[0]!;
    const enc = encodeFrame(c);
    const metaLenAt = HEADER_BYTES + 1 + 2 + 4 + 8 + 8 + 4 + 32;
    const metaLen = enc.readUInt32BE(metaLenAt);
    const garbage = Buffer.from(enc);
    garbage.fill(0x7b, metaLenAt + 4, metaLenAt + 4 + metaLen); // "{{{{…"
    throwsWire(t, () => decodeFrame(garbage), 'malformed', 'garbage JSON metadata');
    const notUtf8 = Buffer.from(enc);
    notUtf8.fill(0xff, metaLenAt + 4, metaLenAt + 4 + metaLen);
    throwsWire(t, () => decodeFrame(notUtf8), 'malformed', 'metadata not UTF-8');
    const metaBody = (m: unknown): ChunkFrame => ({ ...c, meta: m as MessageMeta });
    const rebuild = (meta: string): Buffer => {
      const mb = Buffer.from(meta);
      const before = enc.subarray(HEADER_BYTES, metaLenAt);
      const len = Buffer.alloc(4);
      len.writeUInt32BE(mb.length);
      const after = enc.subarray(metaLenAt + 4 + metaLen);
      return rawControl(FRAME_TYPES.CHUNK, Buffer.concat([before, len, mb, after]));
    };
    t.same((decodeFrame(rebuild(JSON.stringify(META))) as ChunkFrame).meta, META, 'rebuild helper is faithful');
    throwsWire(t, () => decodeFrame(rebuild('[1,2]')), 'malformed', 'metadata is an array');
    throwsWire(t, () => decodeFrame(rebuild('null')), 'malformed', 'metadata is null');
    throwsWire(t, () => decodeFrame(rebuild(JSON.stringify({ ...META, qos: 2 }))), 'malformed', 'qos 2');
    throwsWire(t, () => decodeFrame(rebuild(JSON.stringify({ ...META, device_id: '' }))), 'malformed', 'empty device id');
    throwsWire(t, () => decodeFrame(rebuild(JSON.stringify({ ...META, received_at: 1.5 }))), 'malformed', 'fractional timestamp');
    throwsWire(t, () => decodeFrame(rebuild(JSON.stringify({ topic: 't', qos: 1, received_at: 1 }))), 'malformed', 'device id missing');
    throwsWire(t, () => decodeFrame(rebuild(JSON.stringify({ ...META, content_type: 7 }))), 'malformed', 'content type not a string');
    const big = Buffer.from(enc);
    big.writeUInt32BE(LIMITS.maxMetadataBytes + 1, metaLenAt);
    throwsWire(t, () => decodeFrame(big), 'oversized', 'metadata over the limit');
    throwsWire(t, () => encodeFrame(metaBody({ ...META, qos: 2 })), 'malformed', 'encoder checks metadata too');
  }
  // control frames
  throwsWire(t, () => decodeFrame(rawControl(FRAME_TYPES.PING, '{"t":')), 'malformed', 'garbage JSON');
  throwsWire(t, () => decodeFrame(rawControl(FRAME_TYPES.PING, '')), 'malformed', 'empty JSON body');
  throwsWire(t, () => decodeFrame(rawControl(FRAME_TYPES.PING, '[]')), 'malformed', 'JSON array');
  throwsWire(t, () => decodeFrame(rawControl(FRAME_TYPES.PING, '{"t":"1"}')), 'malformed', 'string instead of int');
  throwsWire(t, () => decodeFrame(rawControl(FRAME_TYPES.PING, Buffer.from([0x7b, 0xff, 0x7d]))), 'malformed', 'invalid UTF-8');
  throwsWire(t, () => decodeFrame(rawControl(FRAME_TYPES.HELLO, '{"version":1}')), 'malformed', 'HELLO without gateway id');
  throwsWire(t, () => decodeFrame(rawControl(FRAME_TYPES.ACK, '{"ids":"m1"}')), 'malformed', 'ACK ids not an array');
  throwsWire(t, () => decodeFrame(rawControl(FRAME_TYPES.ACK, '{"ids":["../etc"]}')), 'malformed', 'ACK id with a slash');
  throwsWire(t, () => decodeFrame(rawControl(FRAME_TYPES.REJECT, '{"id":"m","kind":"maybe","reason":""}')), 'malformed', 'REJECT bad kind');
  throwsWire(t, () => decodeFrame(rawControl(FRAME_TYPES.COMMAND_RESULT, '{"id":"c","delivered":"yes"}')), 'malformed', 'delivered not a boolean');
  throwsWire(t, () => decodeFrame(rawControl(FRAME_TYPES.QUERY_RESULT, '{"entries":[{"id":"m","status":"lost"}]}')), 'malformed', 'bad query status');
  throwsWire(t, () => decodeFrame(rawControl(FRAME_TYPES.WELCOME, JSON.stringify({ version: 1, session_id: 's', max_frame_bytes: 1, max_chunk_bytes: 1, max_message_bytes: 1, max_partials: 1, heartbeat_ms: 1, token_expires_at: 1, partials: [{ id: 'm', offset: 5, next_seq: 0, total: 9 }] }))), 'malformed', 'inconsistent partial');
  throwsWire(t, () => decodeFrame(rawControl(FRAME_TYPES.ACK, JSON.stringify({ ids: Array.from({ length: LIMITS.maxIdsPerFrame + 1 }, (_, i) => `m${i}`) }))), 'malformed', 'too many ids');
  throwsWire(t, () => decodeFrame(rawControl(FRAME_TYPES.COMMAND, Buffer.alloc(LIMITS.maxControlBytes + 1, 0x20))), 'oversized', 'control body over 1 MiB');
});

t.test('oversized frames and chunks', async (t) => {
  const payload = randomBytes(5000);
  const [c] = chunkMessage('m1', META, payload, 5000);
  const buf = encodeFrame(c!);
  throwsWire(t, () => decodeFrame(buf, { maxFrameBytes: buf.length - 1 }), 'oversized', 'frame over maxFrameBytes');
  t.ok(decodeFrame(buf, { maxFrameBytes: buf.length }), 'exactly at the limit is fine');
  throwsWire(t, () => decodeFrame(buf, { maxChunkBytes: 4999 }), 'oversized', 'chunk over maxChunkBytes');
  throwsWire(t, () => decodeFrame(Buffer.alloc(LIMITS.maxFrameBytes + 1)), 'oversized', 'over the protocol maximum');
});

t.test('MessageAssembly: in-order, digests, resume', async (t) => {
  const payload = randomBytes(1000);
  const chunks = chunkMessage('m1', META, payload, 300);
  const asm = MessageAssembly.begin(chunks[0]!);
  t.equal(asm.accept(chunks[0]!), false);
  t.equal(asm.offset, 300);
  t.equal(asm.nextSeq, 1);
  throwsWire(t, () => asm.accept(chunks[0]!), 'duplicate_chunk', 'same chunk twice');
  throwsWire(t, () => asm.accept(chunks[2]!), 'out_of_order', 'skip a chunk');
  throwsWire(t, () => asm.accept({ ...chunks[1]!, total: 999 }), 'malformed', 'total changed');
  throwsWire(t, () => asm.accept({ ...chunks[1]!, data: Buffer.alloc(300) }), 'bad_digest', 'bad chunk data');
  t.equal(asm.offset, 300, 'state unchanged by refused chunks');
  t.equal(asm.accept(chunks[1]!), false);
  t.equal(asm.accept(chunks[2]!), false);
  t.equal(asm.accept(chunks[3]!), true);
  t.ok(asm.complete);
  throwsWire(t, () => asm.accept(chunks[3]!), 'duplicate_chunk', 'after completion');
  throwsWire(t, () => MessageAssembly.begin(chunks[1]!), 'out_of_order', 'begin needs seq 0');

  // resume from a held prefix (as the cloud does after reading its partial file)
  const held = createHash('sha256').update(payload.subarray(0, 600));
  const r = MessageAssembly.resume({ id: 'm1', total: 1000, meta: META, offset: 600, nextSeq: 2, heldHash: held });
  t.equal(r.accept(chunks[2]!), false);
  t.equal(r.accept(chunks[3]!), true);
  t.throws(() => MessageAssembly.resume({ id: 'm1', total: 10, meta: META, offset: 11, nextSeq: 1, heldHash: createHash('sha256') }), RangeError);

  // whole-payload digest mismatch on the last chunk
  const wrong = chunkMessage('m2', META, payload, 600);
  const a2 = MessageAssembly.begin(wrong[0]!);
  a2.accept(wrong[0]!);
  throwsWire(t, () => a2.accept({ ...wrong[1]!, payload_sha256: sha256(Buffer.from('other')) }), 'bad_digest', 'payload digest mismatch');
});

t.test('Reassembler', async (t) => {
  t.test('interleaved messages complete independently', async (t) => {
    const r = new Reassembler();
    const a = chunkMessage('a', META, randomBytes(700), 256);
    const b = chunkMessage('b', { ...META, device_id: 'dev-2' }, randomBytes(300), 256);
    t.equal(r.push(a[0]!), null);
    t.equal(r.push(b[0]!), null);
    t.same(r.partial('a'), { id: 'a', offset: 256, next_seq: 1, total: 700 });
    t.equal(r.partialCount, 2);
    t.equal(r.push(a[1]!), null);
    const mb = r.push(b[1]!);
    t.equal(mb!.id, 'b');
    t.equal(mb!.meta.device_id, 'dev-2');
    const ma = r.push(a[2]!);
    t.equal(ma!.payload.length, 700);
    t.equal(r.partialCount, 0);
  });
  t.test('violations', async (t) => {
    const r = new Reassembler({ maxPartials: 2, maxMessageBytes: 1000 });
    const a = chunkMessage('a', META, randomBytes(700), 256);
    throwsWire(t, () => r.push(a[1]!), 'out_of_order', 'middle chunk without the first');
    r.push(a[0]!);
    throwsWire(t, () => r.push(a[2]!), 'out_of_order', 'gap');
    r.push(a[1]!);
    throwsWire(t, () => r.push(a[1]!), 'duplicate_chunk', 'duplicate chunk');
    throwsWire(t, () => r.push({ ...a[2]!, data: Buffer.from(a[2]!.data).fill(1) }), 'bad_digest', 'bad digest');
    t.ok(r.push(a[2]!), 'still completes after refused chunks');
    throwsWire(t, () => r.push(chunkMessage('big', META, Buffer.alloc(1001), 2000)[0]!), 'oversized', 'message over maxMessageBytes');
    r.push(chunkMessage('p1', META, Buffer.alloc(500), 100)[0]!);
    r.push(chunkMessage('p2', META, Buffer.alloc(500), 100)[0]!);
    throwsWire(t, () => r.push(chunkMessage('p3', META, Buffer.alloc(500), 100)[0]!), 'too_many_partials', 'too many partials');
    r.discard('p1');
    t.equal(r.push(chunkMessage('p3', META, Buffer.alloc(500), 100)[0]!), null, 'room again after discard');
  });
  t.test('seq 0 again restarts a message', async (t) => {
    const r = new Reassembler();
    const p1 = randomBytes(500);
    const p2 = randomBytes(450);
    const first = chunkMessage('m', META, p1, 200);
    r.push(first[0]!);
    r.push(first[1]!);
    const again = chunkMessage('m', META, p2, 200);
    t.equal(r.push(again[0]!), null);
    t.same(r.partial('m'), { id: 'm', offset: 200, next_seq: 1, total: 450 });
    r.push(again[1]!);
    const m = r.push(again[2]!);
    t.equal(m!.sha256, sha256Hex(p2));
  });
  t.test('payload digest mismatch drops the message', async (t) => {
    const r = new Reassembler();
    const [c] = chunkMessage('m', META, Buffer.from('abc'), 10);
    throwsWire(t, () => r.push({ ...c!, payload_sha256: sha256(Buffer.from('abd')) }), 'bad_digest', 'payload digest');
    t.equal(r.partialCount, 0);
  });
});

t.test('property: random sizes and chunk sizes round-trip through encode/decode/reassemble', async (t) => {
  const r = new Reassembler({ maxPartials: 4 });
  let checked = 0;
  const sizes = [0, 1, 2, 1023, 1024, 1025, 4096, 65535, 65536, 65537];
  for (let i = 0; i < 60; i++) sizes.push(Math.floor(Math.random() * 200_000));
  for (const [i, size] of sizes.entries()) {
    const chunkSize = [1024, 1500, 4096, 65536][i % 4]!;
    const payload = randomBytes(size);
    const id = `p-${i}`;
    const chunks = chunkMessage(id, { ...META, received_at: i }, payload, chunkSize);
    if (chunks.length !== chunkCount(size, chunkSize)) t.fail(`chunk count for ${size}/${chunkSize}`);
    let done = null;
    for (const [k, c] of chunks.entries()) {
      const d = decodeFrame(encodeFrame(c)) as ChunkFrame;
      if (d.data.length > chunkSize) t.fail('chunk over the chunk size');
      done = r.push(d);
      if ((done !== null) !== (k === chunks.length - 1)) t.fail(`completion only on the last chunk (${size}/${chunkSize})`);
    }
    if (!done || !done.payload.equals(payload) || done.sha256 !== sha256Hex(payload) || done.meta.received_at !== i) t.fail(`message of ${size} bytes`);
    else checked++;
  }
  t.equal(checked, sizes.length, `${checked} messages of random sizes round-tripped`);
  t.equal(r.partialCount, 0);
});

t.test('property: random corruption of a frame never escapes as a non-protocol error', async (t) => {
  const frames = [
    ...chunkMessage('c1', META, randomBytes(3000), 1024).map((c) => encodeFrame(c)),
    encodeFrame({ type: 'ACK', ids: ['a', 'b'], progress: [{ id: 'x', offset: 5, next_seq: 1 }] }),
    encodeFrame({ type: 'HELLO', version: 1, gateway_id: 'gw' }),
  ];
  let refused = 0;
  for (let i = 0; i < 2000; i++) {
    const src = frames[i % frames.length]!;
    const b = Buffer.from(src);
    const mode = i % 3;
    let mutated: Buffer = b;
    if (mode === 0) b[Math.floor(Math.random() * b.length)] ^= 1 << Math.floor(Math.random() * 8);
    else if (mode === 1) mutated = b.subarray(0, Math.floor(Math.random() * b.length));
    else mutated = Buffer.concat([b, randomBytes(1 + Math.floor(Math.random() * 8))]);
    try {
      const f = decodeFrame(mutated);
      if (f.type === 'CHUNK' && !verifyChunkDigest(f)) refused++; // caught by the digest check instead
    } catch (err) {
      if (!(err instanceof WireError)) {
        t.fail(`non-protocol error: ${String(err)}`);
        break;
      }
      refused++;
    }
  }
  t.ok(refused > 1000, `${refused} of 2000 corrupted frames refused, none crashed`);
});

t.test('helpers', async (t) => {
  t.ok(isValidMessageId('gw-1:00000042'));
  t.notOk(isValidMessageId(''));
  t.notOk(isValidMessageId('a/b'));
  t.notOk(isValidMessageId('x'.repeat(129)));
  t.notOk(isValidMessageId(5));
  const ping: Frame = { type: 'PING', t: 1 };
  t.equal(expectFrame(ping, 'PING').t, 1);
  throwsWire(t, () => expectFrame(ping, 'WELCOME'), 'unexpected', 'expectFrame');
  const e = new WireError('out_of_order', 'gap', 'm1');
  t.same(errorFrameFor(e, true), { type: 'ERROR', code: 'out_of_order', message: 'gap (out_of_order)', fatal: true, id: 'm1' });
  t.same(decodeFrame(encodeFrame(errorFrameFor(e, false))), { type: 'ERROR', code: 'out_of_order', message: 'gap (out_of_order)', fatal: false, id: 'm1' });
});
