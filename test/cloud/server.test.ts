import t, { type Test } from 'tap';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { WebSocket } from 'ws';
import {
  CLOSE_CODES,
  FRAME_TYPES,
  chunkMessage,
  encodeFrame,
  sha256,
  sha256Hex,
  type ChunkFrame,
  type MessageMeta,
} from '../../protocol/codec.js';
import { encodeFrameV2 } from '../../protocol/v2.js';
import { signRequest, verifySignature } from '../../protocol/signature.js';
import { startCloud, getToken, httpsRequest, TestGateway, type CloudHandle } from './helpers.js';
import { readStoreSync, storedEntries } from './store-files.js';

const meta = (device = 'dev-1', topic = `devices/${device}/telemetry`): MessageMeta => ({ device_id: device, topic, qos: 1, received_at: Date.now(), content_type: 'application/octet-stream' });

function indexOf(c: CloudHandle): Record<string, unknown>[] {
  return storedEntries(c.cfg.store_dir);
}

/** Send all chunks, wait for the ACK of the id; checks the message is durable at ACK time. */
async function sendMessage(t: Test, c: CloudHandle, gw: TestGateway, id: string, payload: Buffer, chunkSize = 64 * 1024, m = meta()): Promise<void> {
  for (const ch of chunkMessage(id, m, payload, chunkSize)) gw.send(ch);
  await gw.next('ACK', (a) => a.ids.includes(id));
  const entry = indexOf(c).find((e) => e.id === id);
  t.ok(entry, `${id} is in the store when its ACK arrives`);
  t.equal(entry?.sha256, sha256Hex(payload), `${id}: sha256 in the index`);
  t.equal(entry?.size, payload.length, `${id}: size`);
  const stored = readStoreSync(c.cfg.store_dir).find((r) => r.entry.id === id)!.payload;
  t.equal(sha256Hex(stored), sha256Hex(payload), `${id}: payload file matches`);
}

t.test('upgrade is refused without a valid token, scope, subprotocol or path', async (t) => {
  const c = await startCloud(t);
  const token = await getToken(c);
  const noIngest = await getToken(c, 'subscribe');
  const cases: [string, Parameters<typeof TestGateway.connect>[1], number][] = [
    ['no token', {}, 401],
    ['garbage token', { token: 'not-a-jwt' }, 401],
    ['token signed by someone else', { token: token.slice(0, -4) + (token.endsWith('AAAA') ? 'BBBB' : 'AAAA') }, 401],
    ['token without the ingest scope', { token: noIngest }, 403],
    ['wrong subprotocol', { token, protocol: 'mqtt' }, 400],
    ['no subprotocol', { token, protocol: null }, 400],
    ['unknown path', { token, path: '/nope' }, 404],
  ];
  for (const [name, opts, status] of cases) {
    const gw = TestGateway.connect(c, opts);
    t.equal(await gw.refused, status, `${name}: HTTP ${status}`);
  }
  const ok = TestGateway.connect(c, { token });
  await ok.opened;
  t.equal(ok.ws.protocol, 'edge-connector.v2', 'the subprotocol is selected');
  ok.close();
  // a connector that speaks only version 1: a clear refusal naming the versions this cloud speaks
  const old = await httpsRequest(c, 'GET', '/ingest', {
    connection: 'Upgrade',
    upgrade: 'websocket',
    'sec-websocket-version': '13',
    'sec-websocket-key': randomBytes(16).toString('base64'),
    'sec-websocket-protocol': 'edge-connector.v1',
    authorization: `Bearer ${token}`,
  });
  t.equal(old.status, 400, 'v1 only: HTTP 400');
  t.equal(old.json.error, 'ECONN_PROTOCOL');
  t.match(String(old.json.message), /offered edge-connector\.v1; this cloud speaks edge-connector\.v2 only/);
  t.same(old.json.supported, ['edge-connector.v2']);
  t.equal(old.headers['x-supported-subprotocols'], 'edge-connector.v2');
  // offering both: v2 is selected
  const both = TestGateway.connect(c, { token, protocol: ['edge-connector.v1', 'edge-connector.v2'] });
  await both.opened;
  t.equal(both.ws.protocol, 'edge-connector.v2', 'v2 selected among the offered versions');
  both.close();
});

t.test('HELLO / WELCOME; first frame must be HELLO; unknown version closes 4006', async (t) => {
  const c = await startCloud(t, { max_chunk_bytes: 1 << 20, max_partials: 8 });
  const token = await getToken(c);
  const { gw, welcome } = await TestGateway.open(c, token);
  t.equal(welcome.version, 2);
  t.equal(welcome.max_chunk_bytes, 1 << 20);
  t.equal(welcome.max_partials, 8);
  t.same(welcome.partials, []);
  t.ok(welcome.token_expires_at > Date.now());
  gw.send({ type: 'PING', t: 42 });
  const pong = await gw.next('PONG');
  t.equal(pong.t, 42);
  gw.close();

  const g2 = TestGateway.connect(c, { token });
  await g2.opened;
  g2.send({ type: 'PING', t: 1 });
  const err = await g2.next('ERROR');
  t.equal(err.code, 'unexpected');
  t.equal(err.fatal, true);
  t.equal((await g2.closed).code, CLOSE_CODES.PROTOCOL_ERROR);

  const g3 = TestGateway.connect(c, { token });
  await g3.opened;
  g3.send({ type: 'HELLO', version: 1, gateway_id: 'gw' });
  t.equal((await g3.next('ERROR')).code, 'unsupported_version');
  const closed = await g3.closed;
  t.equal(closed.code, CLOSE_CODES.UNSUPPORTED_VERSION);
  t.match(closed.reason, /unsupported version 1; supported: 2 \(edge-connector\.v2\)/, 'the close reason names the supported versions');
  // a version-1 frame header on a v2 link: unsupported_version, closed 4006
  const g4 = TestGateway.connect(c, { token });
  await g4.opened;
  g4.sendRaw(encodeFrame({ type: 'HELLO', version: 1, gateway_id: 'gw' }));
  t.equal((await g4.next('ERROR')).code, 'unsupported_version');
  t.equal((await g4.closed).code, CLOSE_CODES.UNSUPPORTED_VERSION);
});

t.test('messages of 0 bytes, small and 5 MiB in 256 KiB chunks are stored durably before the ACK', async (t) => {
  const c = await startCloud(t, { progress_bytes: 1 << 20 });
  const { gw } = await TestGateway.open(c, await getToken(c));
  await sendMessage(t, c, gw, 'empty', Buffer.alloc(0));
  await sendMessage(t, c, gw, 'small', Buffer.from('{"temp":21.5}'));
  const big = randomBytes(5 << 20);
  const chunks = chunkMessage('big', meta(), big, 256 << 10);
  t.equal(chunks.length, 20);
  // the first 2 MiB, then the progress ACK, then the rest: a progress ACK is only sent while the message is
  // still in progress, and on a loaded machine the whole message could arrive before the first persist ends
  for (const ch of chunks.slice(0, 8)) gw.send(ch);
  const progress = await gw.next('ACK', (a) => (a.progress ?? []).some((p) => p.id === 'big'));
  for (const ch of chunks.slice(8)) gw.send(ch);
  t.ok(progress.progress![0]!.offset >= 1 << 20, 'a progress ACK reports the durable offset of the big message');
  t.equal(progress.progress![0]!.offset % (256 << 10), 0, 'at a chunk boundary');
  await gw.next('ACK', (a) => a.ids.includes('big'));
  const e = indexOf(c).find((x) => x.id === 'big')!;
  t.equal(e.sha256, sha256Hex(big));
  t.equal(e.size, 5 << 20);
  t.equal(e.device_id, 'dev-1');
  t.equal(e.topic, 'devices/dev-1/telemetry');
  t.equal(e.qos, 1);
  t.equal(e.content_type, 'application/octet-stream');
  t.type(e.stored_at, 'number');
  t.same(indexOf(c).map((x) => x.seq), [1, 2, 3], 'index in store order');
  gw.close();
});

t.test('a resend of a stored message is acknowledged again but stored once', async (t) => {
  const c = await startCloud(t);
  const { gw } = await TestGateway.open(c, await getToken(c));
  const p = randomBytes(300_000);
  await sendMessage(t, c, gw, 'dup-1', p, 100_000);
  for (const ch of chunkMessage('dup-1', meta(), p, 100_000)) gw.send(ch);
  await gw.next('ACK', (a) => a.ids.includes('dup-1'));
  // and after a reconnect, too
  gw.close();
  await gw.closed;
  const { gw: g2 } = await TestGateway.open(c, await getToken(c));
  for (const ch of chunkMessage('dup-1', meta(), p, 100_000)) g2.send(ch);
  await g2.next('ACK', (a) => a.ids.includes('dup-1'));
  await sendMessage(t, c, g2, 'after-dup', Buffer.from('x'));
  t.same(indexOf(c).map((e) => e.id), ['dup-1', 'after-dup'], 'stored once');
  t.equal(g2.frames.filter((f) => f.type === 'ACK' && f.ids.includes('dup-1')).length, 0, 'one ACK per resend');
  g2.close();
});

t.test('a partly sent message resumes at the offset the cloud holds: after a reconnect and after a cloud restart', async (t) => {
  let c = await startCloud(t, { progress_bytes: 1 << 30 });
  const payload = randomBytes(2 << 20);
  const cs = 256 << 10;
  const chunks = chunkMessage('resume-1', meta(), payload, cs);
  {
    const { gw } = await TestGateway.open(c, await getToken(c));
    for (const ch of chunks.slice(0, 3)) gw.send(ch);
    gw.send({ type: 'QUERY', ids: ['resume-1', 'nope'] });
    const q = await gw.next('QUERY_RESULT');
    t.equal(q.entries[1]!.status, 'unknown');
    t.equal(q.entries[0]!.id, 'resume-1');
    gw.close();
    await gw.closed;
  }
  // the cloud persists the partial when it handles the close; the reconnect's WELCOME waits for that
  const { gw, welcome } = await TestGateway.open(c, await getToken(c));
  t.same(welcome.partials, [{ id: 'resume-1', offset: 3 * cs, next_seq: 3, total: 2 << 20 }], 'WELCOME lists the partial with its durable offset');
  gw.send({ type: 'QUERY', ids: ['resume-1'] });
  t.same((await gw.next('QUERY_RESULT')).entries, [{ id: 'resume-1', status: 'partial', offset: 3 * cs, next_seq: 3, total: 2 << 20 }]);
  // two more chunks, then the cloud restarts
  for (const ch of chunks.slice(3, 5)) gw.send(ch);
  gw.send({ type: 'PING', t: 7 });
  await gw.next('PONG', (p) => p.t === 7);
  c = await c.restart();
  const { gw: g3, welcome: w3 } = await TestGateway.open(c, await getToken(c));
  t.same(w3.partials, [{ id: 'resume-1', offset: 5 * cs, next_seq: 5, total: 2 << 20 }], 'the partial survived a cloud restart');
  for (const ch of chunkMessage('resume-1', meta(), payload, cs, 5 * cs, 5)) g3.send(ch);
  await g3.next('ACK', (a) => a.ids.includes('resume-1'));
  const e = indexOf(c).find((x) => x.id === 'resume-1')!;
  t.equal(e.sha256, sha256Hex(payload), 'resumed payload is complete and correct');
  t.notOk(existsSync(path.join(c.cfg.store_dir, 'partials', 'resume-1.part')), 'partial files removed');
  // other gateways do not see it
  g3.close();
});

t.test('bad chunk digest → REJECT retry at the held offset, connection survives; bad payload digest / too large → REJECT permanent', async (t) => {
  const c = await startCloud(t, { max_message_bytes: 1 << 20 });
  const { gw } = await TestGateway.open(c, await getToken(c));
  const payload = randomBytes(300_000);
  const chunks = chunkMessage('bd-1', meta(), payload, 100_000);
  gw.send(chunks[0]!);
  const corrupt: ChunkFrame = { ...chunks[1]!, data: Buffer.from(chunks[1]!.data).fill(7) };
  gw.send(corrupt);
  gw.send(chunks[2]!); // in flight before the REJECT: ignored
  const rej = await gw.next('REJECT');
  t.same({ id: rej.id, kind: rej.kind, offset: rej.offset, next_seq: rej.next_seq }, { id: 'bd-1', kind: 'retry', offset: 100_000, next_seq: 1 });
  t.ok(rej.retry_after_ms! >= 0);
  for (const ch of chunks.slice(1)) gw.send(ch);
  await gw.next('ACK', (a) => a.ids.includes('bd-1'));
  t.equal(indexOf(c).find((e) => e.id === 'bd-1')?.sha256, sha256Hex(payload));

  const [one] = chunkMessage('bd-2', meta(), Buffer.from('abc'), 1024);
  gw.send({ ...one!, payload_sha256: sha256(Buffer.from('abd')) });
  const r2 = await gw.next('REJECT', (r) => r.id === 'bd-2');
  t.equal(r2.kind, 'permanent');

  const [huge] = chunkMessage('bd-3', meta(), Buffer.alloc(1024), 1024);
  gw.send({ ...huge!, total: 2 << 20, payload_sha256: undefined });
  const r3 = await gw.next('REJECT', (r) => r.id === 'bd-3');
  t.equal(r3.kind, 'permanent');
  t.match(r3.reason, /max_message_bytes/);

  await sendMessage(t, c, gw, 'bd-ok', Buffer.from('still fine'));
  t.same(indexOf(c).map((e) => e.id), ['bd-1', 'bd-ok']);
  gw.close();
});

t.test('order per device: after a REJECT retry of X, later messages of its device are REJECTed (retry) until X is stored', async (t) => {
  const c = await startCloud(t);
  const { gw } = await TestGateway.open(c, await getToken(c));
  const px = randomBytes(200_000);
  const xs = chunkMessage('ord-x', meta('dev-a'), px, 100_000);
  gw.send(xs[0]!);
  gw.send({ ...xs[1]!, data: Buffer.from(xs[1]!.data).fill(1) });
  // sent before the connector saw the REJECT: a later message of the same device, and one of another device
  for (const ch of chunkMessage('ord-y', meta('dev-a'), Buffer.from('y'), 1024)) gw.send(ch);
  for (const ch of chunkMessage('ord-z', meta('dev-b'), Buffer.from('z'), 1024)) gw.send(ch);
  const rx = await gw.next('REJECT', (r) => r.id === 'ord-x');
  t.same({ kind: rx.kind, offset: rx.offset }, { kind: 'retry', offset: 100_000 });
  const ry = await gw.next('REJECT', (r) => r.id === 'ord-y');
  t.equal(ry.kind, 'retry', 'the later message of the same device is refused for retry');
  t.match(ry.reason, /earlier message of device dev-a/);
  await gw.next('ACK', (a) => a.ids.includes('ord-z'));
  t.same(indexOf(c).map((e) => e.id), ['ord-z'], 'another device is not held up; Y is not stored before X');
  // a resend of Y alone is still refused while X is not stored
  for (const ch of chunkMessage('ord-y', meta('dev-a'), Buffer.from('y'), 1024)) gw.send(ch);
  await gw.next('REJECT', (r) => r.id === 'ord-y');
  // the connector resends from its first unacknowledged record: X (from the held offset), then Y
  for (const ch of xs.slice(1)) gw.send(ch);
  for (const ch of chunkMessage('ord-y', meta('dev-a'), Buffer.from('y'), 1024)) gw.send(ch);
  await gw.next('ACK', (a) => a.ids.includes('ord-y'));
  t.same(indexOf(c).map((e) => e.id), ['ord-z', 'ord-x', 'ord-y'], 'X stored before Y');
  t.equal(indexOf(c).find((e) => e.id === 'ord-x')?.sha256, sha256Hex(px));
  gw.close();
});

t.test('malformed frames from a hostile client: ERROR + close, the cloud stays up', async (t) => {
  const c = await startCloud(t, { max_chunk_bytes: 65536 });
  const token = await getToken(c);
  const chunks = chunkMessage('h-1', meta(), randomBytes(3000), 1024);
  const attacks: [string, (gw: TestGateway) => void, number, string | undefined][] = [
    ['garbage bytes', (gw) => gw.sendRaw(randomBytes(100)), CLOSE_CODES.PROTOCOL_ERROR, 'malformed'],
    ['truncated header', (gw) => gw.sendRaw(Buffer.from([0xec, 2, 0x10])), CLOSE_CODES.PROTOCOL_ERROR, 'malformed'],
    ['wrong body length', (gw) => {
      const b = encodeFrameV2({ type: 'PING', t: 1 });
      b.writeUInt32BE(999, 4);
      gw.sendRaw(b);
    }, CLOSE_CODES.PROTOCOL_ERROR, 'malformed'],
    ['unknown type', (gw) => gw.sendRaw(Buffer.from([0xec, 2, 0x55, 0, 0, 0, 0, 2, 0x7b, 0x7d])), CLOSE_CODES.PROTOCOL_ERROR, 'unknown_type'],
    ['garbage JSON', (gw) => gw.sendRaw(Buffer.from([0xec, 2, FRAME_TYPES.PING, 0, 0, 0, 0, 3, 0x7b, 0x7b, 0x7b])), CLOSE_CODES.PROTOCOL_ERROR, 'malformed'],
    ['out-of-order chunk', (gw) => {
      gw.send(chunks[0]!);
      gw.send(chunks[2]!);
    }, CLOSE_CODES.PROTOCOL_ERROR, 'out_of_order'],
    ['duplicate chunk', (gw) => {
      gw.send(chunks[0]!);
      gw.send(chunks[1]!);
      gw.send(chunks[1]!);
    }, CLOSE_CODES.PROTOCOL_ERROR, 'duplicate_chunk'],
    ['chunk of a message never started', (gw) => gw.send(chunkMessage('never', meta(), randomBytes(3000), 1024)[1]!), CLOSE_CODES.PROTOCOL_ERROR, 'out_of_order'],
    ['chunk over max_chunk_bytes', (gw) => gw.send(chunkMessage('h-big', meta(), randomBytes(70_000), 70_000)[0]!), CLOSE_CODES.PROTOCOL_ERROR, 'oversized'],
    ['a cloud-only frame', (gw) => gw.send({ type: 'ACK', ids: ['x'] }), CLOSE_CODES.PROTOCOL_ERROR, 'unexpected'],
    ['HELLO twice', (gw) => gw.send({ type: 'HELLO', version: 2, gateway_id: 'gw-1' }), CLOSE_CODES.PROTOCOL_ERROR, 'unexpected'],
    ['text frame', (gw) => gw.sendRaw('hello'), CLOSE_CODES.UNSUPPORTED_DATA, undefined],
    ['frame over maxPayload', (gw) => gw.sendRaw(Buffer.alloc(65536 + 64 * 1024 + 1)), 1009, undefined],
  ];
  for (const [name, attack, code, reason] of attacks) {
    const { gw } = await TestGateway.open(c, token);
    attack(gw);
    if (reason) {
      const err = await gw.next('ERROR');
      t.equal(err.code, reason, `${name}: ERROR ${reason}`);
      t.equal(err.fatal, true);
    }
    t.equal((await gw.closed).code, code, `${name}: closed with ${code}`);
  }
  const { gw } = await TestGateway.open(c, token);
  await sendMessage(t, c, gw, 'after-attacks', Buffer.from('ok'));
  gw.close();
});

t.test('heartbeats: a silent link is closed 4008; no HELLO → 4005; a second connection of a gateway replaces the first (4009)', async (t) => {
  const c = await startCloud(t, { heartbeat_ms: 100, hello_timeout_ms: 300 });
  const token = await getToken(c);
  const { gw } = await TestGateway.open(c, token);
  const ping = await gw.next('PING');
  t.ok(ping.t > 0, 'the cloud sends PINGs');
  gw.autoPong = false;
  t.equal((await gw.closed).code, CLOSE_CODES.HEARTBEAT_TIMEOUT);

  const silent = TestGateway.connect(c, { token });
  await silent.opened;
  t.equal((await silent.closed).code, CLOSE_CODES.HELLO_TIMEOUT);

  const { gw: a } = await TestGateway.open(c, token, { gateway_id: 'same' });
  const { gw: b } = await TestGateway.open(c, token, { gateway_id: 'same' });
  t.equal((await a.closed).code, CLOSE_CODES.REPLACED);
  b.send({ type: 'PING', t: 5 });
  t.equal((await b.next('PONG', (p) => p.t === 5)).t, 5, 'the new connection works');
  b.close();
});

t.test('in-band token refresh: TOKEN_OK keeps the link past the old expiry; TOKEN_REJECTED for a bad token; expiry closes 4001', async (t) => {
  const c = await startCloud(t, { heartbeat_ms: 100, token_ttl_s: 2 });
  const short = await getToken(c);
  const { gw, welcome } = await TestGateway.open(c, short);
  gw.send({ type: 'TOKEN', access_token: 'garbage' });
  const bad = await gw.next('TOKEN_REJECTED');
  t.equal(bad.expires_at, welcome.token_expires_at, 'the old token stays in force');
  const other = (await c.server.tokenService.issue('cc-only', 'cc-only', ['ingest'], 60)).access_token;
  gw.send({ type: 'TOKEN', access_token: other });
  t.match((await gw.next('TOKEN_REJECTED')).reason, /another client/);
  const long = (await c.server.tokenService.issue('gw-client', 'gw-client', ['ingest'], 60)).access_token;
  gw.send({ type: 'TOKEN', access_token: long });
  const ok = await gw.next('TOKEN_OK');
  t.ok(ok.expires_at > welcome.token_expires_at + 30_000, 'new expiry');
  // stay connected until well past the old expiry (event-driven: the cloud's PINGs)
  while (Date.now() < welcome.token_expires_at + 500) await gw.next('PING');
  gw.send({ type: 'PING', t: 9 });
  t.equal((await gw.next('PONG', (p) => p.t === 9)).t, 9, 'still open after the first token expired');
  gw.close();

  const { gw: g2 } = await TestGateway.open(c, await getToken(c));
  const closed = await g2.closed;
  t.equal(closed.code, CLOSE_CODES.TOKEN_EXPIRED, 'closed with 4001 when the token expires without refresh');
});

t.test('X-Signature on the upgrade when a signing secret is configured', async (t) => {
  const c = await startCloud(t, { signing_secret: 'env:EC_TEST_SIGNING' });
  process.env.EC_TEST_SIGNING = 'sign-me-please';
  t.teardown(() => delete process.env.EC_TEST_SIGNING);
  const token = await getToken(c);
  t.equal(await TestGateway.connect(c, { token }).refused, 401, 'missing signature');
  t.equal(await TestGateway.connect(c, { token, headers: { 'x-signature': signRequest('wrong', 'GET', '/ingest') } }).refused, 401, 'wrong key');
  const old = Math.floor(Date.now() / 1000) - 1000;
  t.equal(await TestGateway.connect(c, { token, headers: { 'x-signature': signRequest('sign-me-please', 'GET', '/ingest', old) } }).refused, 401, 'too old');
  const gw = TestGateway.connect(c, { token, headers: { 'x-signature': signRequest('sign-me-please', 'GET', '/ingest') } });
  await gw.opened;
  gw.close();
  const now = 1_700_000_000;
  const good = signRequest('k', 'GET', '/ingest', now);
  t.ok(verifySignature(good, 'k', 'GET', '/ingest', now));
  t.ok(verifySignature(`t=${now},v1=${'0'.repeat(64)},${good.split(',')[1]}`, 'k', 'GET', '/ingest', now), 'one of several v1 values');
  t.notOk(verifySignature(good, 'k', 'GET', '/other', now), 'path is signed');
  t.notOk(verifySignature('garbage', 'k', 'GET', '/ingest', now));
});

t.test('subscribers get stored messages matching their filters; from_start replays', async (t) => {
  const c = await startCloud(t);
  const token = await getToken(c);
  const sub = (query: string): { msgs: Record<string, unknown>[]; ws: WebSocket; opened: Promise<void>; until: (n: number) => Promise<void> } => {
    const ws = new WebSocket(`wss://127.0.0.1:${c.port}/subscribe?${query}`, { ca: c.ca, headers: { authorization: `Bearer ${token}` } });
    const msgs: Record<string, unknown>[] = [];
    const waiters: (() => void)[] = [];
    ws.on('message', (d) => {
      msgs.push(JSON.parse(d.toString()) as Record<string, unknown>);
      for (const w of waiters.splice(0)) w();
    });
    t.teardown(() => ws.terminate());
    return {
      msgs,
      ws,
      opened: new Promise((r) => ws.once('open', () => r())),
      until: async (n) => {
        while (msgs.length < n) await new Promise<void>((r) => waiters.push(r));
      },
    };
  };
  const { gw } = await TestGateway.open(c, token);
  await sendMessage(t, c, gw, 'before', Buffer.from('old'), 1024, meta('dev-1'));
  const tele = sub(`filter=${encodeURIComponent('devices/+/telemetry')}`);
  const all = sub('from_start=1');
  await Promise.all([tele.opened, all.opened]);
  await all.until(2);
  t.same(all.msgs[1], { type: 'replayed', count: 1 });
  await sendMessage(t, c, gw, 'm-tele', Buffer.from('hot'), 1024, meta('dev-2'));
  await sendMessage(t, c, gw, 'm-status', Buffer.from('up'), 1024, meta('dev-2', 'devices/dev-2/status'));
  const big = randomBytes(70_000);
  await sendMessage(t, c, gw, 'm-big', big, 65536, meta('dev-3'));
  await tele.until(2);
  await all.until(5);
  t.same(tele.msgs.map((m) => m.id), ['m-tele', 'm-big'], 'filter applied, live only');
  t.equal(tele.msgs[0]!.payload, Buffer.from('hot').toString('base64'));
  t.equal(tele.msgs[0]!.device_id, 'dev-2');
  t.equal(tele.msgs[1]!.payload, undefined, 'no inline payload above 64 KiB');
  t.equal(tele.msgs[1]!.sha256, sha256Hex(big));
  t.equal(tele.msgs[1]!.size, 70_000);
  t.same(all.msgs.filter((m) => m.type === 'message').map((m) => m.id), ['before', 'm-tele', 'm-status', 'm-big'], 'replay then live, no gap, no duplicate');
  const bad = new WebSocket(`wss://127.0.0.1:${c.port}/subscribe?filter=a/%23/b`, { ca: c.ca, headers: { authorization: `Bearer ${token}` } });
  t.equal(await new Promise((r) => bad.once('unexpected-response', (_q, res) => r(res.statusCode))), 400, 'invalid filter refused');
  const anon = new WebSocket(`wss://127.0.0.1:${c.port}/subscribe`, { ca: c.ca });
  t.equal(await new Promise((r) => anon.once('unexpected-response', (_q, res) => r(res.statusCode))), 401, 'token required');
  gw.close();
});

t.test('commands: POST /api/commands → COMMAND → COMMAND_RESULT; 504 without an answer; 404 without a gateway', async (t) => {
  const c = await startCloud(t, { command_timeout_ms: 300 });
  const token = await getToken(c);
  const post = (body: unknown, auth = token) => httpsRequest(c, 'POST', '/api/commands', { authorization: `Bearer ${auth}`, 'content-type': 'application/json' }, JSON.stringify(body));
  t.equal((await post({ device_id: 'dev-1', name: 'reboot', payload: 'now' })).status, 404, 'no gateway connected');
  const { gw } = await TestGateway.open(c, token);
  const answered = (async () => {
    const cmd = await gw.next('COMMAND');
    t.equal(cmd.device_id, 'dev-1');
    t.equal(cmd.name, 'reboot');
    t.equal(Buffer.from(cmd.payload, 'base64').toString(), 'now');
    gw.send({ type: 'COMMAND_RESULT', id: cmd.id, delivered: true });
  })();
  const r = await post({ device_id: 'dev-1', name: 'reboot', payload: 'now' });
  await answered;
  t.equal(r.status, 200);
  t.equal(r.json.delivered, true);
  t.equal(r.json.gateway_id, 'gw-1');
  const r2p = post({ device_id: 'dev-9', name: 'x', payload_base64: Buffer.from([0, 1, 2]).toString('base64') });
  const cmd2 = await gw.next('COMMAND');
  t.same([...Buffer.from(cmd2.payload, 'base64')], [0, 1, 2], 'binary payload');
  gw.send({ type: 'COMMAND_RESULT', id: cmd2.id, delivered: false, reason: 'not connected' });
  const r2 = await r2p;
  t.same([r2.status, r2.json.delivered, r2.json.reason], [200, false, 'not connected']);
  const r3 = await post({ device_id: 'dev-1', name: 'slow' });
  t.equal(r3.status, 504, 'no COMMAND_RESULT in time');
  t.equal((await post({ device_id: 'dev-1', name: 'bad name!' })).status, 400);
  t.equal((await post({ name: 'x' })).status, 400);
  t.equal((await post({ device_id: 'd', name: 'x' }, 'nope')).status, 401);
  t.equal((await post({ device_id: 'd', name: 'x' }, await getToken(c, 'ingest'))).status, 403, 'needs the commands scope');
  const notJson = await httpsRequest(c, 'POST', '/api/commands', { authorization: `Bearer ${token}`, 'content-type': 'application/json' }, '{nope');
  t.equal(notJson.status, 400);
  gw.close();
});

t.test('feature "stream" (§13.10): confirmed in WELCOME when offered; DISCARD drops a partial and the retry block it caused, never a stored message; without the feature DISCARD is refused', async (t) => {
  const c = await startCloud(t, { progress_bytes: 1 << 30 });
  {
    const { gw, welcome } = await TestGateway.open(c, await getToken(c));
    t.equal(welcome.features, undefined, 'no features unless the connector offers them');
    gw.send({ type: 'DISCARD', id: 'x-1' });
    t.equal((await gw.next('ERROR')).code, 'unexpected', 'DISCARD without the feature: ERROR unexpected');
    t.equal((await gw.closed).code, CLOSE_CODES.PROTOCOL_ERROR);
  }
  const { gw, welcome } = await TestGateway.open(c, await getToken(c), { features: ['stream', 'from-a-newer-connector'] });
  t.same(welcome.features, ['stream'], 'confirms the features it speaks, and only those');
  const sync = async (n: number): Promise<void> => {
    gw.send({ type: 'PING', t: n });
    await gw.next('PONG', (p) => p.t === n);
  };
  const cs = 256 << 10;
  const payload = randomBytes(1 << 20);
  const chunks = chunkMessage('up-1', meta(), payload, cs);
  for (const ch of chunks.slice(0, 3)) gw.send(ch);
  await sync(1);
  t.ok(existsSync(path.join(c.cfg.store_dir, 'partials', 'up-1.part')), 'held in progress');
  gw.send({ type: 'DISCARD', id: 'up-1' });
  await sync(2);
  t.notOk(existsSync(path.join(c.cfg.store_dir, 'partials', 'up-1.part')), 'DISCARD: its bytes are gone');
  gw.send({ type: 'QUERY', ids: ['up-1'] });
  t.same((await gw.next('QUERY_RESULT')).entries, [{ id: 'up-1', status: 'unknown' }], 'and the cloud no longer knows it');
  t.notOk(indexOf(c).some((e) => e.id === 'up-1'), 'nothing stored');
  // sent again from its first chunk, it is stored whole; a DISCARD then changes nothing
  await sendMessage(t, c, gw, 'up-1', payload, cs);
  gw.send({ type: 'DISCARD', id: 'up-1' });
  await sync(3);
  t.ok(indexOf(c).some((e) => e.id === 'up-1'), 'a stored message is not discarded');
  // a REJECT retry (bad chunk digest) blocks the device's later messages; a DISCARD of that message lifts it
  const blk = chunkMessage('blk-1', meta(), randomBytes(1 << 20), cs);
  gw.send(blk[0]!);
  gw.send({ ...blk[1]!, chunk_sha256: Buffer.alloc(32) });
  t.equal((await gw.next('REJECT', (r) => r.id === 'blk-1')).kind, 'retry');
  gw.send({ type: 'DISCARD', id: 'blk-1' });
  await sendMessage(t, c, gw, 'after-1', Buffer.from('next message of the device'));
  t.notOk(existsSync(path.join(c.cfg.store_dir, 'partials', 'blk-1.part')), 'the refused message is gone too');
  gw.close();
});

t.test('partial_ttl_s: a partial no chunk reached for that long is dropped and no longer listed in WELCOME', async (t) => {
  const c = await startCloud(t, { progress_bytes: 1 << 30, partial_ttl_s: 1 });
  {
    const { gw } = await TestGateway.open(c, await getToken(c));
    for (const ch of chunkMessage('stale-1', meta(), randomBytes(1 << 20), 256 << 10).slice(0, 2)) gw.send(ch);
    gw.close();
    await gw.closed;
  }
  const { gw, welcome } = await TestGateway.open(c, await getToken(c));
  t.same(welcome.partials.map((p) => p.id), ['stale-1'], 'held (and persisted) after the connection went');
  gw.close();
  // the expiry runs on a timer (a tenth of the TTL): wait for its effect, bounded
  const file = path.join(c.cfg.store_dir, 'partials', 'stale-1.part');
  for (const end = Date.now() + 10_000; existsSync(file) && Date.now() < end; ) await new Promise((r) => setTimeout(r, 25));
  const { gw: g2, welcome: w2 } = await TestGateway.open(c, await getToken(c));
  t.same(w2.partials, [], 'expired: no longer listed');
  t.notOk(existsSync(path.join(c.cfg.store_dir, 'partials', 'stale-1.part')), 'its files are gone');
  g2.close();
});

t.test('max_partials: REJECT retry while all are in progress here; abandoned partials are evicted, oldest first', async (t) => {
  const c = await startCloud(t, { max_partials: 2, progress_bytes: 1 });
  const token = await getToken(c);
  const first = (id: string): ChunkFrame => chunkMessage(id, meta(), randomBytes(4096), 1024)[0]!;
  const { gw: a } = await TestGateway.open(c, token);
  a.send(first('p1'));
  await a.next('ACK', (x) => (x.progress ?? []).some((p) => p.id === 'p1'));
  a.send(first('p2'));
  await a.next('ACK', (x) => (x.progress ?? []).some((p) => p.id === 'p2'));
  a.send(first('p3'));
  const rej = await a.next('REJECT', (r) => r.id === 'p3');
  t.same([rej.kind, rej.offset, rej.next_seq], ['retry', 0, 0]);
  a.close();
  await a.closed;
  const { gw: b, welcome } = await TestGateway.open(c, token);
  t.same(welcome.partials.map((p) => p.id).sort(), ['p1', 'p2']);
  b.send(first('p4'));
  await b.next('ACK', (x) => (x.progress ?? []).some((p) => p.id === 'p4'));
  b.send({ type: 'QUERY', ids: ['p1', 'p2', 'p4'] });
  t.same((await b.next('QUERY_RESULT')).entries.map((e) => e.status), ['unknown', 'partial', 'partial'], 'the oldest abandoned partial was evicted');
  b.close();
});

t.test('v2 batching: many messages in one BATCH frame are stored in order and acknowledged by ONE cumulative ACK', async (t) => {
  const c = await startCloud(t);
  const { gw } = await TestGateway.open(c, await getToken(c));
  const ids = Array.from({ length: 200 }, (_, i) => `batch-${i}`);
  const chunks = ids.map((id, i) => chunkMessage(id, meta(`dev-${i % 3}`), randomBytes(64), 1024)[0]!);
  gw.sendBatch(chunks);
  const ack = await gw.next('ACK', (a) => a.ids.includes(ids[ids.length - 1]!));
  t.ok(ack.ids.length > 1, `one ACK covered ${ack.ids.length} messages`);
  t.same(
    indexOf(c).map((e) => e.id),
    ids,
    'all stored, in the order of the batch',
  );
  // a position that skips one is a protocol violation
  const bad = chunkMessage('gap', meta(), Buffer.from('x'), 1024)[0]!;
  gw.lastPos += 1;
  gw.send(bad);
  t.equal((await gw.next('ERROR')).code, 'malformed');
  t.equal((await gw.closed).code, CLOSE_CODES.PROTOCOL_ERROR);
});

t.test("issue 9: HELLO's gateway_id is bound to the authenticated client; a mismatch is refused (4007)", async (t) => {
  const c = await startCloud(t, {
    clients: [
      { id: 'gw-client', secret: 'file:./client.secret' },
      { id: 'cc-only', secret: 'file:./client.secret', grants: ['client_credentials'], scopes: ['ingest'] },
      { id: 'pinned', secret: 'file:./client.secret', gateway_ids: ['pinned-gw'] },
    ],
  });
  const mine = await getToken(c, 'ingest', 'gw-client');
  const other = await getToken(c, 'ingest', 'cc-only');
  const { gw: a } = await TestGateway.open(c, mine, { gateway_id: 'gw-A' });
  await sendMessage(t, c, a, 'bound-1', Buffer.from('x'));
  // another client claiming gw-A: refused, and gw-A's link is NOT replaced
  const b = TestGateway.connect(c, { token: other });
  await b.opened;
  b.send({ type: 'HELLO', version: 2, gateway_id: 'gw-A' });
  const err = await b.next('ERROR');
  t.match(err.message, /gateway_id refused: gateway id gw-A belongs to another client/);
  const closed = await b.closed;
  t.equal(closed.code, CLOSE_CODES.GATEWAY_REFUSED, 'closed 4007');
  t.match(closed.reason, /gateway_id refused/);
  a.send({ type: 'PING', t: 7 });
  t.equal((await a.next('PONG', (p) => p.t === 7)).t, 7, 'the rightful gateway keeps its link');
  // a client pinned to its gateway ids may not use another one
  const pinned = await getToken(c, 'ingest', 'pinned');
  const p = TestGateway.connect(c, { token: pinned });
  await p.opened;
  p.send({ type: 'HELLO', version: 2, gateway_id: 'elsewhere' });
  t.match((await p.next('ERROR')).message, /client pinned may use gateway ids pinned-gw only/);
  t.equal((await p.closed).code, CLOSE_CODES.GATEWAY_REFUSED);
  const { gw: ok } = await TestGateway.open(c, pinned, { gateway_id: 'pinned-gw' });
  ok.close();
  a.close();
  await a.closed;
  // the binding is durable: after a restart the other client still cannot take gw-A
  const c2 = await c.restart();
  const b2 = TestGateway.connect(c2, { token: await getToken(c2, 'ingest', 'cc-only') });
  await b2.opened;
  b2.send({ type: 'HELLO', version: 2, gateway_id: 'gw-A' });
  t.equal((await b2.closed).code, CLOSE_CODES.GATEWAY_REFUSED, 'still refused after a cloud restart');
  const { gw: a2 } = await TestGateway.open(c2, await getToken(c2, 'ingest', 'gw-client'), { gateway_id: 'gw-A' });
  a2.close();
});
