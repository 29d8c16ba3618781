/**
 * POST /api/publish/{device_id}: JSON data points (issue 13), the protocol limits
 * checked before anything is journaled (issue 9 defect 2), and Idempotency-Key
 * (issue 9: a lost 202 must not duplicate an upload). Real HTTPS on 127.0.0.1,
 * real identity components, a file-backed sink and the real Journal.
 */
import t, { type Test } from 'tap';
import { readFileSync } from 'node:fs';
import { once } from 'node:events';
import path from 'node:path';
import { Journal } from '../../bridge/journal.js';
import { silentLogger } from '../../core/logger.js';
import { LIMITS, chunkMessage, encodeFrame } from '../../protocol/codec.js';
import { SECURITY_HEADERS } from '../../api/api.js';
import { UPLINK_LIMITS, uplinkMetadataBytes } from '../../api/limits.js';
import { IdempotencyCache } from '../../api/idempotency.js';
import { apiEnv, buildConfig, FileSink, type ApiEnv, type Response } from './api-fixtures.js';

function checkError(t: Test, r: Response, status: number, code: string, field?: RegExp): void {
  t.equal(r.status, status, `status ${status} (${r.text.slice(0, 200)})`);
  t.equal(r.json.code, code, `code ${code}`);
  t.type(r.json.message, 'string');
  if (field) t.match(String(r.json.message), field, 'the message names the field');
  for (const [k, v] of Object.entries(SECURITY_HEADERS)) t.equal(r.headers[k], v, `${k} header`);
}

async function device(env: ApiEnv, id: string): Promise<string> {
  return String((await env.register(id)).token);
}

const point = { data_type: 'telemetry', payload: { temperature: 21.5, unit: 'C' }, timestamp: '2026-11-22T10:59:58Z' };

t.test('JSON data point: validated, published on devices/ID/DATA_TYPE, body journaled unchanged', async (t) => {
  const env = await apiEnv(t);
  const sink = env.sink as FileSink;
  const token = await device(env, 'th-1');
  const text = JSON.stringify(point);
  const r = await env.request({ path: '/api/publish/th-1', bearer: token, body: text, headers: { 'content-type': 'application/json; charset=utf-8' } });
  t.equal(r.status, 202, r.text);
  const m = sink.messages.find((x) => x.result.id === r.json.message_id)!;
  t.ok(m, 'stored');
  t.equal(m.meta.topic, 'devices/th-1/telemetry', 'topic from data_type');
  t.equal(m.meta.contentType, 'application/json; charset=utf-8');
  t.equal(readFileSync(m.file, 'utf8'), text, 'the body as sent');

  const q = await env.request({ path: '/api/publish/th-1?topic=devices/th-1/room/3', bearer: token, json: { ...point, data_type: 'humidity' } });
  t.equal(q.status, 202, q.text);
  t.equal(sink.messages.find((x) => x.result.id === q.json.message_id)?.meta.topic, 'devices/th-1/room/3', '?topic= overrides data_type');
  const dotted = await env.request({ path: '/api/publish/th-1', bearer: token, json: { ...point, data_type: 'power.v2' } });
  t.equal(dotted.status, 202);
  t.equal(sink.messages.find((x) => x.result.id === dotted.json.message_id)?.meta.topic, 'devices/th-1/power.v2');
});

t.test('JSON data point: every missing or mistyped field is a 400 naming it; nothing is stored', async (t) => {
  const env = await apiEnv(t);
  const sink = env.sink as FileSink;
  const token = await device(env, 'th-2');
  const send = (body: unknown): Promise<Response> => env.request({ path: '/api/publish/th-2', bearer: token, json: body });
  const { data_type, payload, timestamp } = point;
  checkError(t, await send({ payload, timestamp }), 400, 'ECONN_BAD_REQUEST', /data_type is required/);
  checkError(t, await send({ data_type, timestamp }), 400, 'ECONN_BAD_REQUEST', /payload is required/);
  checkError(t, await send({ data_type, payload }), 400, 'ECONN_BAD_REQUEST', /timestamp is required/);
  checkError(t, await send({ data_type: 7, payload, timestamp }), 400, 'ECONN_BAD_REQUEST', /data_type must be of type string/);
  checkError(t, await send({ data_type, payload: [1, 2], timestamp }), 400, 'ECONN_BAD_REQUEST', /payload must be of type object/);
  checkError(t, await send({ data_type, payload: 'hot', timestamp }), 400, 'ECONN_BAD_REQUEST', /payload must be of type object/);
  checkError(t, await send({ data_type, payload: null, timestamp }), 400, 'ECONN_BAD_REQUEST', /payload must be of type object/);
  checkError(t, await send({ data_type, payload, timestamp: 1763805598 }), 400, 'ECONN_BAD_REQUEST', /timestamp must be of type string/);
  checkError(t, await send({ data_type, payload, timestamp: '' }), 400, 'ECONN_BAD_REQUEST', /timestamp must not be empty/);
  checkError(t, await send({ data_type, payload, timestamp, extra: 1 }), 400, 'ECONN_BAD_REQUEST', /extra is not a known field/);
  for (const bad of ['a/b', '+', '#', 'x#', '', 'tab\there', 'a'.repeat(129)]) {
    checkError(t, await send({ data_type: bad, payload, timestamp }), 400, 'ECONN_BAD_REQUEST', /data_type/);
  }
  checkError(t, await send({ data_type: 'commands', payload, timestamp }), 403, 'ECONN_NOT_AUTHORIZED', /reserved/);
  checkError(t, await send([point]), 400, 'ECONN_BAD_REQUEST', /must be of type object/);
  checkError(t, await env.request({ path: '/api/publish/th-2', bearer: token, body: '{"data_type":', headers: { 'content-type': 'application/json' } }), 400, 'ECONN_BAD_REQUEST', /not valid JSON/);
  checkError(t, await env.request({ path: '/api/publish/th-2', bearer: token, body: '', headers: { 'content-type': 'application/json' } }), 400, 'ECONN_BAD_REQUEST', /required/);
  const big = { ...point, payload: { blob: 'x'.repeat(70_000) } };
  checkError(t, await send(big), 413, 'ECONN_PAYLOAD_TOO_LARGE', /api\.max_body_bytes/);
  t.equal(sink.messages.length, 0, 'nothing stored from the refused requests');
  // the API is still up and other content types stay opaque bytes (no JSON validation)
  const raw = await env.request({ path: '/api/publish/th-2', bearer: token, body: '[1,2,3', headers: { 'content-type': 'text/plain' } });
  t.equal(raw.status, 202, raw.text);
  t.equal(sink.messages.at(-1)?.meta.topic, 'devices/th-2/upload');
});

t.test('UPLINK_LIMITS mirror protocol/codec.ts LIMITS, and uplinkMetadataBytes is what the encoder measures', async (t) => {
  t.equal(UPLINK_LIMITS.maxContentTypeBytes, LIMITS.maxContentTypeBytes);
  t.equal(UPLINK_LIMITS.maxTopicBytes, LIMITS.maxTopicBytes);
  t.equal(UPLINK_LIMITS.maxDeviceIdBytes, LIMITS.maxDeviceIdBytes);
  t.equal(UPLINK_LIMITS.maxMetadataBytes, LIMITS.maxMetadataBytes);
  // find the topic length where the encoder starts refusing the metadata, and check our measure agrees there
  const base = { deviceId: 'm', qos: 1 as const, receivedAt: 1_763_805_598_123, contentType: 'text/plain' };
  const encodes = (topic: string): boolean => {
    try {
      const [first] = chunkMessage('id-1', { device_id: 'm', topic, qos: 1, received_at: base.receivedAt, content_type: base.contentType }, Buffer.from('x'), 1024);
      encodeFrame(first!);
      return true;
    } catch {
      return false;
    }
  };
  const quoted = (n: number): string => `devices/m/${'"'.repeat(n)}`; // each " is 2 bytes in JSON: metadata outgrows its limit before the topic does
  let n = 0;
  while (encodes(quoted(n + 1)) && n < 5000) n++;
  t.ok(n > 3000 && n < 4096, `the encoder refuses from ${n + 1} quotes on`);
  t.ok(uplinkMetadataBytes({ ...base, topic: quoted(n) }) <= UPLINK_LIMITS.maxMetadataBytes, 'last accepted: within our limit');
  t.ok(uplinkMetadataBytes({ ...base, topic: quoted(n + 1) }) > UPLINK_LIMITS.maxMetadataBytes, 'first refused: over our limit');
});

t.test('metadata over the protocol limits is refused at the API, before anything is journaled (real Journal)', async (t) => {
  const dir = t.testdir();
  const cfg = buildConfig(dir);
  const journal = new Journal({ dir: path.join(dir, 'journal'), config: cfg.bridge.journal, logger: silentLogger() });
  await journal.start();
  t.teardown(() => journal.close());
  // an operator raised the broker's topic limit above the protocol's
  const env = await apiEnv(t, { sink: journal, config: { broker: { limits: { max_topic_bytes: 20000, max_topic_depth: 128 } } } });
  const token = await device(env, 'lim-1');
  const before = journal.pending().length;

  // issue 9 defect 2: a 256-byte Content-Type was answered 202 and then blocked the uplink forever
  const ct256 = `application/x-${'a'.repeat(256 - 'application/x-'.length)}`;
  t.equal(ct256.length, 256);
  checkError(t, await env.request({ path: '/api/publish/lim-1', bearer: token, body: 'x', headers: { 'content-type': ct256 } }), 400, 'ECONN_BAD_REQUEST', /Content-Type is longer than 255 bytes/);
  checkError(t, await env.request({ path: '/api/publish/lim-1', bearer: token, body: 'x', headers: { 'content-type': 'text/plain; name="caf\u00e9"' } }), 400, 'ECONN_BAD_REQUEST', /printable ASCII/);
  // the Content-Type travels to subscribers: free text is not a media type
  for (const ct of ['not a type', 'application/', '/json', 'text/plain; x', 'a/b c']) {
    checkError(t, await env.request({ path: '/api/publish/lim-1', bearer: token, body: 'x', headers: { 'content-type': ct } }), 400, 'ECONN_BAD_REQUEST', /must be a media type/);
  }
  const longTopic = `devices/lim-1/${'t'.repeat(LIMITS.maxTopicBytes)}`;
  checkError(t, await env.request({ path: `/api/publish/lim-1?topic=${encodeURIComponent(longTopic)}`, bearer: token, body: 'x' }), 400, 'ECONN_BAD_REQUEST', /topic is longer than 4096 bytes/);
  const escaped = `devices/lim-1/${'"'.repeat(4080)}`; // 4094 bytes: within the topic limit, but 8160+ bytes once JSON-escaped
  checkError(t, await env.request({ path: `/api/publish/lim-1?topic=${encodeURIComponent(escaped)}`, bearer: token, body: 'x' }), 400, 'ECONN_BAD_REQUEST', /metadata .* uplink protocol allows 8192/);
  t.equal(journal.pending().length, before, 'nothing journaled from the refused uploads');

  // at the limit: accepted, and the record really encodes as a protocol frame
  const ct255 = ct256.slice(0, 255);
  const ok = await env.request({ path: '/api/publish/lim-1', bearer: token, body: 'payload', headers: { 'content-type': ct255 } });
  t.equal(ok.status, 202, ok.text);
  const rec = journal.get(String(ok.json.message_id))!;
  t.equal(rec.meta.contentType, ct255);
  const [first] = chunkMessage(rec.id, { device_id: rec.meta.deviceId, topic: rec.meta.topic, qos: rec.meta.qos, received_at: rec.meta.receivedAt, content_type: ct255 }, Buffer.from('payload'), 1024);
  t.doesNotThrow(() => encodeFrame(first!), 'the uplink encoder accepts what the API accepted');
});

t.test('Idempotency-Key: a repeat answers the same 202 without journaling again', async (t) => {
  const env = await apiEnv(t);
  const sink = env.sink as FileSink;
  const token = await device(env, 'idem-1');
  const other = await device(env, 'idem-2');
  const send = (key: string | undefined, body = 'reading-1', tok = token, id = 'idem-1', topic?: string): Promise<Response> =>
    env.request({
      path: `/api/publish/${id}${topic ? `?topic=${topic}` : ''}`,
      bearer: tok,
      body,
      headers: { 'content-type': 'text/plain', ...(key !== undefined ? { 'idempotency-key': key } : {}) },
    });
  const a = await send('k-1');
  t.equal(a.status, 202, a.text);
  const b = await send('k-1');
  t.equal(b.status, 202, b.text);
  t.equal(b.json.message_id, a.json.message_id, 'same message id');
  t.equal(b.json.sha256, a.json.sha256);
  t.equal(sink.messages.length, 1, 'journaled once');
  const json1 = await env.request({ path: '/api/publish/idem-1', bearer: token, json: point, headers: { 'idempotency-key': 'k-json' } });
  const json2 = await env.request({ path: '/api/publish/idem-1', bearer: token, json: point, headers: { 'idempotency-key': 'k-json' } });
  t.equal(json2.json.message_id, json1.json.message_id, 'JSON data points too');
  t.equal(sink.messages.length, 2);

  t.not((await send('k-2')).json.message_id, a.json.message_id, 'another key: a new message');
  t.not((await send(undefined)).json.message_id, a.json.message_id, 'no key: a new message');
  const o = await send('k-1', 'reading-1', other, 'idem-2');
  t.equal(o.status, 202);
  t.not(o.json.message_id, a.json.message_id, 'keys are per device');
  checkError(t, await send('k-1', 'x', token, 'idem-1', 'devices/idem-1/elsewhere'), 409, 'ECONN_IDEMPOTENCY_CONFLICT', /another topic/);
  checkError(t, await send('has space'), 400, 'ECONN_BAD_REQUEST', /Idempotency-Key/);
  checkError(t, await send('k'.repeat(256)), 400, 'ECONN_BAD_REQUEST', /Idempotency-Key/);

  // a failed request does not keep its key
  const bad = await env.request({ path: '/api/publish/idem-1', bearer: token, body: 'abc', headers: { 'idempotency-key': 'k-fail', 'content-digest': `sha-256=:${Buffer.alloc(32).toString('base64')}:` } });
  checkError(t, bad, 400, 'ECONN_DIGEST_MISMATCH');
  const retry = await send('k-fail', 'abc');
  t.equal(retry.status, 202, 'the retry runs normally');
  t.equal((await send('k-fail', 'abc')).json.message_id, retry.json.message_id);
  t.equal(env.api.status().idempotentRepeats, 3);
});

t.test('Idempotency-Key while the first upload is still streaming: 409, then the stored answer', async (t) => {
  const env = await apiEnv(t);
  const sink = env.sink as FileSink;
  const token = await device(env, 'idem-3');
  let release!: () => void;
  const gate = new Promise<void>((r) => (release = r));
  let started!: () => void;
  const streaming = new Promise<void>((r) => (started = r));
  async function* slow(): AsyncGenerator<Buffer> {
    yield Buffer.from('first half,');
    started();
    await gate;
    yield Buffer.from('second half');
  }
  const inSink = once(sink, 'stream-start');
  const first = env.request({ path: '/api/publish/idem-3', bearer: token, body: slow(), headers: { 'idempotency-key': 'k-slow' } });
  await streaming;
  // barrier: the first upload is inside the sink (its key was taken before the sink was called)
  await inSink;
  t.equal(sink.inFlight.size, 1, 'the first upload is streaming');
  const dup = await env.request({ path: '/api/publish/idem-3', bearer: token, body: 'dup', headers: { 'idempotency-key': 'k-slow' } });
  checkError(t, dup, 409, 'ECONN_IDEMPOTENCY_CONFLICT', /still in progress/);
  release();
  const done = await first;
  t.equal(done.status, 202, done.text);
  const again = await env.request({ path: '/api/publish/idem-3', bearer: token, body: 'first half,second half', headers: { 'idempotency-key': 'k-slow' } });
  t.equal(again.json.message_id, done.json.message_id);
  t.equal(sink.messages.length, 1);
});

t.test('IdempotencyCache stays bounded: oldest forgotten past maxEntries, answers expire after the window', async (t) => {
  const clock = { t: 1000 };
  const c = new IdempotencyCache({ maxEntries: 3, windowMs: 60_000, now: () => clock.t });
  const ans = (id: string) => ({ message_id: id, size: 1, sha256: 'x' });
  for (const k of ['a', 'b', 'c', 'd']) {
    t.equal(c.begin('dev', k, 'topic'), undefined);
    c.finish('dev', k, ans(k));
  }
  t.equal(c.size, 3, 'never more than maxEntries');
  t.equal(c.begin('dev', 'a', 'topic'), undefined, 'the oldest key was forgotten');
  c.abandon('dev', 'a');
  t.same(c.begin('dev', 'd', 'topic'), ans('d'));
  clock.t += 60_001;
  t.equal(c.begin('dev', 'd', 'topic'), undefined, 'forgotten after the window');
  t.throws(() => c.begin('dev', 'd', 'topic'), { code: 'ECONN_IDEMPOTENCY_CONFLICT' }, 'in progress');
  c.abandon('dev', 'd');
  t.equal(c.begin('dev', 'd', 'topic'), undefined, 'abandoned: free again');
  // a flood of distinct keys keeps the map at its bound
  const big = new IdempotencyCache({ maxEntries: 100, windowMs: 3_600_000, now: () => clock.t });
  for (let i = 0; i < 10_000; i++) {
    big.begin('dev', `k${i}`, 't');
    big.finish('dev', `k${i}`, ans(`m${i}`));
  }
  t.equal(big.size, 100);
});
