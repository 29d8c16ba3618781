/**
 * POST /api/publish/{device_id}: streamed uploads over real HTTPS, into a
 * file-backed UplinkSink double (bytes checked on disk) and into the real
 * Journal (bridge/journal.ts).
 */
import t, { type Test } from 'tap';
import { readdirSync } from 'node:fs';
import path from 'node:path';
import { createHash } from 'node:crypto';
import { Journal } from '../../bridge/journal.js';
import { silentLogger } from '../../core/logger.js';
import { buildConfig, apiEnv, payload, fileSha256, FileSink, type ApiEnv, type Response } from './api-fixtures.js';
import { SECURITY_HEADERS } from '../../api/api.js';

const MiB = 1024 * 1024;

function checkError(t: Test, r: Response, status: number, code: string): void {
  t.equal(r.status, status, `status ${status} (${r.text.slice(0, 200)})`);
  t.equal(r.json.code, code, `code ${code}`);
  t.type(r.json.message, 'string');
  for (const [k, v] of Object.entries(SECURITY_HEADERS)) t.equal(r.headers[k], v, `${k} header`);
}

const digestHeader = (sha: Buffer): string => `sha-256=:${sha.toString('base64')}:`;

async function device(env: ApiEnv, id: string): Promise<string> {
  return String((await env.register(id)).token);
}

t.test('uploads into a file-backed sink', async (t) => {
  const env = await apiEnv(t, { config: { api: { max_upload_bytes: 32 * MiB } } });
  const sink = env.sink as FileSink;
  const token = await device(env, 'cam-1');

  t.test('small upload with Content-Length: 202 once stored, topic and content type kept', async (t) => {
    const body = Buffer.from('hello, cloud');
    const r = await env.request({ path: '/api/publish/cam-1', bearer: token, body, headers: { 'content-type': 'text/plain' } });
    t.equal(r.status, 202, r.text);
    t.type(r.json.message_id, 'string');
    const m = sink.messages.find((x) => x.result.id === r.json.message_id)!;
    t.ok(m, 'the sink holds it');
    t.equal(m.meta.topic, 'devices/cam-1/upload');
    t.equal(m.meta.deviceId, 'cam-1');
    t.equal(m.meta.contentType, 'text/plain');
    t.equal(m.meta.qos, 1);
    t.equal(await fileSha256(m.file), createHash('sha256').update(body).digest('hex'));
  });

  t.test('20 MiB chunked upload streamed from a generator, with a good Content-Digest', async (t) => {
    const p = payload(20 * MiB, 64 * 1024, 7);
    const r = await env.request({
      path: '/api/publish/cam-1?topic=devices/cam-1/video/clip-1',
      bearer: token,
      body: p.gen(),
      headers: { 'content-type': 'video/mp4', 'content-digest': digestHeader(p.sha256) },
    });
    t.equal(r.status, 202, r.text);
    t.equal(r.json.size, 20 * MiB);
    t.equal(r.json.sha256, p.sha256.toString('hex'));
    const m = sink.messages.find((x) => x.result.id === r.json.message_id)!;
    t.equal(m.meta.topic, 'devices/cam-1/video/clip-1');
    t.equal(await fileSha256(m.file), p.sha256.toString('hex'), 'bytes on disk are the bytes sent');
  });

  t.test('bad Content-Digest: 400, nothing kept', async (t) => {
    const before = sink.messages.length;
    const p = payload(3 * MiB, 32 * 1024, 9);
    const wrong = createHash('sha256').update('something else').digest();
    const r = await env.request({ path: '/api/publish/cam-1', bearer: token, body: p.gen(), headers: { 'content-digest': digestHeader(wrong) } });
    checkError(t, r, 400, 'ECONN_DIGEST_MISMATCH');
    t.equal(sink.messages.length, before, 'nothing stored');
    t.same(readdirSync(env.dir).filter((f) => f.endsWith('.tmp')), [], 'no temp file left behind');
    checkError(t, await env.request({ path: '/api/publish/cam-1', bearer: token, body: 'x', headers: { 'content-digest': 'sha-256=nope' } }), 400, 'ECONN_BAD_REQUEST');
  });

  t.test('over the limit: 413 (declared length and streamed), nothing kept', async (t) => {
    const before = sink.messages.length;
    const declared = await env.request({ path: '/api/publish/cam-1', bearer: token, body: Buffer.alloc(10), headers: { 'content-length': String(40 * MiB) } }).catch(
      (err: unknown) => err as Error,
    );
    // the server answers 413 before reading; the client may or may not see it before its write fails
    if (!(declared instanceof Error)) checkError(t, declared, 413, 'ECONN_PAYLOAD_TOO_LARGE');
    const p = payload(40 * MiB, 64 * 1024, 3);
    const r = await env.request({ path: '/api/publish/cam-1', bearer: token, body: p.gen() });
    checkError(t, r, 413, 'ECONN_PAYLOAD_TOO_LARGE');
    t.equal(r.headers.connection, 'close');
    t.equal(sink.messages.length, before, 'nothing stored');
    t.same(readdirSync(env.dir).filter((f) => f.endsWith('.tmp')), [], 'no temp file left behind');
    // the API keeps serving
    t.equal((await env.request({ path: '/api/publish/cam-1', bearer: token, body: 'ok' })).status, 202);
  });

  t.test('authorization: wrong device 403, no token 401, topic outside the namespace or to commands 403', async (t) => {
    const other = await device(env, 'cam-2');
    const before = sink.messages.length;
    checkError(t, await env.request({ path: '/api/publish/cam-1', bearer: other, body: 'x' }), 403, 'ECONN_NOT_AUTHORIZED');
    const noauth = await env.request({ path: '/api/publish/cam-1', body: 'x' });
    checkError(t, noauth, 401, 'ECONN_AUTH_FAILED');
    t.match(String(noauth.headers['www-authenticate']), /^Bearer/);
    checkError(t, await env.request({ path: '/api/publish/cam-1', bearer: 'garbage.token.here', body: 'x' }), 401, 'ECONN_AUTH_TOKEN');
    checkError(t, await env.request({ path: '/api/publish/cam-1?topic=devices/cam-2/upload', bearer: token, body: 'x' }), 403, 'ECONN_NOT_AUTHORIZED');
    checkError(t, await env.request({ path: '/api/publish/cam-1?topic=devices/cam-1/commands/reboot', bearer: token, body: 'x' }), 403, 'ECONN_NOT_AUTHORIZED');
    checkError(t, await env.request({ path: '/api/publish/cam-1?topic=devices/cam-1/%23', bearer: token, body: 'x' }), 400, 'ECONN_BAD_REQUEST');
    checkError(t, await env.request({ path: '/api/publish/cam-1?topic=devices/cam-1//x', bearer: token, body: 'x' }), 400, 'ECONN_BAD_REQUEST');
    checkError(t, await env.request({ path: '/api/publish/cam-1?topic=%24SYS/x', bearer: token, body: 'x' }), 403, 'ECONN_NOT_AUTHORIZED');
    checkError(t, await env.request({ method: 'GET', path: '/api/publish/cam-1', bearer: token }), 405, 'ECONN_METHOD_NOT_ALLOWED');
    // a large body refused early by authorization: the client gets the 403, not a reset
    const big = payload(8 * MiB, 64 * 1024, 5);
    checkError(t, await env.request({ path: '/api/publish/cam-1', bearer: other, body: big.gen() }), 403, 'ECONN_NOT_AUTHORIZED');
    t.equal(sink.messages.length, before, 'nothing stored');
  });

  t.test('zero-byte upload is a valid message', async (t) => {
    const r = await env.request({ path: '/api/publish/cam-1', bearer: token, body: '' });
    t.equal(r.status, 202, r.text);
    t.equal(r.json.size, 0);
  });
});

t.test('no sink or bridge disabled: 503', async (t) => {
  const none = await apiEnv(t, { sink: 'none' });
  const tok = String((await none.register('d1')).token);
  const r = await none.request({ path: '/api/publish/d1', bearer: tok, body: 'x' });
  checkError(t, r, 503, 'ECONN_UNAVAILABLE');
  t.ok(r.headers['retry-after']);
  const off = await apiEnv(t, { config: { bridge: { enabled: false } } });
  const tok2 = String((await off.register('d2')).token);
  checkError(t, await off.request({ path: '/api/publish/d2', bearer: tok2, body: 'x' }), 503, 'ECONN_UNAVAILABLE');
});

t.test('uploads into the real Journal', async (t) => {
  const dir = t.testdir();
  const cfg = buildConfig(dir);
  const journal = new Journal({ dir: path.join(dir, 'journal'), config: cfg.bridge.journal, logger: silentLogger() });
  await journal.start();
  t.teardown(() => journal.close());
  const env = await apiEnv(t, { sink: journal, config: { api: { max_upload_bytes: 16 * MiB } } });
  const token = await device(env, 'jdev');

  const p = payload(5 * MiB + 123, 50_000, 11);
  const r = await env.request({ path: '/api/publish/jdev?topic=devices/jdev/logs', bearer: token, body: p.gen(), headers: { 'content-digest': digestHeader(p.sha256), 'content-type': 'application/octet-stream' } });
  t.equal(r.status, 202, r.text);
  const rec = journal.get(String(r.json.message_id));
  t.ok(rec, 'in the journal once 202 was answered');
  t.equal(rec!.size, 5 * MiB + 123);
  t.equal(rec!.sha256, p.sha256.toString('hex'));
  t.equal(rec!.meta.topic, 'devices/jdev/logs');
  t.equal(rec!.meta.contentType, 'application/octet-stream');
  const back = await journal.readPayload(rec!);
  t.equal(createHash('sha256').update(back).digest('hex'), p.sha256.toString('hex'), 'payload read back intact');

  const small = await env.request({ path: '/api/publish/jdev', bearer: token, body: 'tiny' });
  t.equal(small.status, 202);
  t.equal(journal.get(String(small.json.message_id))?.size, 4);

  const count = journal.pending().length;
  const bad = payload(2 * MiB, 64 * 1024, 12);
  checkError(t, await env.request({ path: '/api/publish/jdev', bearer: token, body: bad.gen(), headers: { 'content-digest': digestHeader(p.sha256) } }), 400, 'ECONN_DIGEST_MISMATCH');
  const big = payload(17 * MiB, 64 * 1024, 13);
  checkError(t, await env.request({ path: '/api/publish/jdev', bearer: token, body: big.gen() }), 413, 'ECONN_PAYLOAD_TOO_LARGE');
  t.equal(journal.pending().length, count, 'nothing kept from the refused uploads');
});
