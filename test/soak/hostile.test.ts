/**
 * Fault suite — hostile input against a running daemon, from outside: a JWT
 * corpus as MQTT passwords (algorithm confusion, kid/jku/x5u tricks, huge and
 * non-JSON tokens, odd claim types — signed with the gateway's real key where
 * that makes the attack sharper), hostile HTTP (malformed JSON, wrong content
 * types, oversized bodies and headers, path tricks, malformed digests, broken
 * chunked encoding) and a fuzzed connector.yaml for `check-config`. Each is
 * refused with a clear answer; the daemon stays up; a valid device keeps
 * getting PUBACKs throughout. The rest of the hostile-input suite:
 * hostile-mqtt.test.ts (MQTT fuzzer), hostile-certs.test.ts (client
 * certificates), hostile-cloud.test.ts (a cloud speaking garbage).
 */
import t from 'tap';
import { createHash, createPrivateKey, createPublicKey, createHmac, generateKeyPairSync, randomBytes } from 'node:crypto';
import { readFileSync, readdirSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import tls from 'node:tls';
import path from 'node:path';
import mqtt from 'mqtt';
import { SignJWT } from 'jose';
import { parse, stringify } from 'yaml';
import { startDaemon, runCli, tempDir, REPO, type DaemonHandle } from '../helpers/daemon.js';
import { addDevice, Publisher, type DeviceFiles } from '../helpers/fleet.js';
import { FULL, seeded } from '../helpers/soak.js';
import { REFUSAL_DETAIL_LINES, REFUSAL_LOG_INTERVAL_MS } from '../../core/refusals.js';

t.setTimeout(240_000);

const b64 = (v: unknown): string => Buffer.from(typeof v === 'string' ? v : JSON.stringify(v)).toString('base64url');

/** Connect with a password; 'connected' or why not. */
function tryConnect(d: DaemonHandle, dev: DeviceFiles, password: string | Buffer, clientId = dev.id): Promise<string> {
  return new Promise((resolve) => {
    const c = mqtt.connect(`mqtts://127.0.0.1:${d.ports.mqtt_tls}`, { clientId, username: dev.id, password: password as string, ca: readFileSync(dev.ca), protocolVersion: 4, reconnectPeriod: 0, connectTimeout: 10_000 });
    const done = (r: string): void => {
      c.end(true);
      resolve(r);
    };
    c.once('connect', () => done('connected'));
    c.once('error', (err) => done(`refused: ${err.message}`));
    c.once('close', () => done('closed'));
  });
}

function signingKey(stateDir: string): { pem: string; kid: string } {
  const dir = path.join(stateDir, 'keys');
  const idx = JSON.parse(readFileSync(path.join(dir, 'jwt-keys.json'), 'utf8')) as { current?: string };
  const file = readdirSync(dir).find((f) => f === `jwt-${idx.current}.key`) ?? readdirSync(dir).find((f) => f.endsWith('.key'))!;
  return { pem: readFileSync(path.join(dir, file), 'utf8'), kid: idx.current ?? file.slice(4, -4) };
}

t.test('hostile JWTs as MQTT passwords: every one refused, daemon up, valid device served', async (t) => {
  const d = await startDaemon(t, { dir: tempDir(t, 'ec-soak-jwt-') });
  const dev = await addDevice(d, 'jwt-victim');
  const other = await addDevice(d, 'jwt-other');
  const [h, p] = dev.token.split('.') as [string, string, string];
  const header = JSON.parse(Buffer.from(h, 'base64url').toString()) as Record<string, unknown>;
  const claims = JSON.parse(Buffer.from(p, 'base64url').toString()) as Record<string, unknown>;
  const key = signingKey(d.stateDir);
  const priv = createPrivateKey(key.pem);
  const pubPem = createPublicKey(priv).export({ type: 'spki', format: 'pem' }).toString();
  const alg = String(header.alg);
  // a server that must never be contacted (jku / x5u point here)
  let fetched = 0;
  const lure = http.createServer((_q, s) => (fetched++, s.end('{}')));
  await new Promise<void>((r) => lure.listen(0, '127.0.0.1', r));
  t.teardown(() => lure.close());
  const lureUrl = `http://127.0.0.1:${(lure.address() as { port: number }).port}/jwks.json`;
  const signed = (hdr: Record<string, unknown>, body: Record<string, unknown>): Promise<string> => new SignJWT(body).setProtectedHeader({ alg, ...hdr } as { alg: string }).sign(priv);
  const attacker = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const attackerJwk = attacker.publicKey.export({ format: 'jwk' });
  const evil = (hdr: Record<string, unknown>, body: Record<string, unknown>): Promise<string> => new SignJWT(body).setProtectedHeader({ alg: 'ES256', ...hdr } as { alg: string }).sign(attacker.privateKey);
  const now = Math.floor(Date.now() / 1000);
  const corpus: [string, string | Promise<string>][] = [
    ['alg none', `${b64({ ...header, alg: 'none' })}.${p}.`],
    ['alg None, signature kept', `${b64({ ...header, alg: 'None' })}.${p}.${dev.token.split('.')[2]}`],
    ['HS256 keyed with the public key (algorithm confusion)', (() => {
      const hh = b64({ ...header, alg: 'HS256' });
      return `${hh}.${p}.${createHmac('sha256', pubPem).update(`${hh}.${p}`).digest('base64url')}`;
    })()],
    ['RS256 header on an EC signature', `${b64({ ...header, alg: 'RS256' })}.${p}.${dev.token.split('.')[2]}`],
    ['kid path traversal', signed({ kid: '../../../../etc/passwd' }, claims)],
    ['kid of another key', signed({ kid: 'A'.repeat(43) }, claims)],
    // the attacker signs with its own key and points the verifier at it
    ['jku to the attacker\'s key set', evil({ kid: key.kid, jku: lureUrl }, claims)],
    ['x5u to the attacker\'s certificate', evil({ kid: key.kid, x5u: lureUrl }, claims)],
    ['embedded jwk of the attacker', evil({ kid: key.kid, jwk: attackerJwk }, claims)],
    ['attacker key, no kid', evil({}, claims)],
    ['expired (real key)', signed({ kid: key.kid }, { ...claims, iat: now - 7200, exp: now - 3600 })],
    ['exp as a string', signed({ kid: key.kid }, { ...claims, exp: String(now + 3600) })],
    ['exp far beyond any sane lifetime, issued in the future', signed({ kid: key.kid }, { ...claims, iat: now + 86400 * 365, exp: now + 86400 * 3650 })],
    ['device_id of another device (real key)', signed({ kid: key.kid }, { ...claims, device_id: other.id, sub: other.id })],
    ['device_id as an object', signed({ kid: key.kid }, { ...claims, device_id: { $ne: null } })],
    ['sub as an array', signed({ kid: key.kid }, { ...claims, sub: [dev.id, other.id] })],
    ['wrong issuer (real key)', signed({ kid: key.kid }, { ...claims, iss: 'someone-else' })],
    ['tampered payload', `${h}.${b64({ ...claims, device_id: other.id })}.${dev.token.split('.')[2]}`],
    ['non-JSON header', `${b64('not json')}.${p}.${dev.token.split('.')[2]}`],
    ['non-JSON payload', `${h}.${b64('{"device_id":')}.${dev.token.split('.')[2]}`],
    ['two segments', `${h}.${p}`],
    ['five segments (JWE shape)', `${h}.${p}.a.b.c`],
    ['binary garbage', randomBytes(300).toString('latin1')],
    ['huge token (60 KiB)', `${h}.${'A'.repeat(60 * 1024)}.${dev.token.split('.')[2]}`],
    ['empty', ''],
  ];
  // a valid device (certificate) publishes QoS 1 throughout and must keep getting PUBACKs
  const bystander = await addDevice(d, 'jwt-bystander');
  const pub = new Publisher(bystander);
  await pub.run(d);
  await pub.waitAcked(5, 20_000);
  const results: string[] = [];
  for (const [name, tok] of corpus) {
    const ackedBefore = pub.acked.length;
    const r = await tryConnect(d, dev, await tok);
    results.push(`${name}: ${r}`);
    t.not(r, 'connected', `refused: ${name}`);
    await pub.waitAcked(ackedBefore + 3, 10_000);
  }
  t.ok(pub.running, 'the valid device was never disconnected and kept getting PUBACKs');
  await pub.finish();
  t.equal(fetched, 0, 'jku / x5u URLs were never fetched');
  t.equal(await tryConnect(d, dev, dev.token), 'connected', 'the genuine token still works after the corpus');
  t.equal(d.proc.exitCode, null, 'the daemon is still running');
  const refusals = d.logs.filter((l) => typeof l.code === 'string' && /ECONN_AUTH/.test(String(l.code))).length;
  // the first REFUSAL_DETAIL_LINES refusals of an interval are logged in full, the rest counted in one summary line at its end
  t.ok(refusals >= Math.min(corpus.length, REFUSAL_DETAIL_LINES), `refusals logged with a code (${refusals} lines for ${corpus.length} attempts)`);
  if (refusals < corpus.length) {
    const sum = await d.waitForLog((l) => l.code === 'ECONN_RATE_LIMITED' && typeof l.not_logged === 'number', REFUSAL_LOG_INTERVAL_MS + 5000, 'the refusal summary line');
    t.ok(refusals + (sum.not_logged as number) >= corpus.length, `the rest are counted in the summary line (${String(sum.msg)})`);
  }
  t.notOk(JSON.stringify(d.logs).includes(dev.token.split('.')[2]!), 'no token signature in the logs');
});

/** One raw HTTPS request (for inputs a well-behaved client library refuses to send). */
function rawHttps(port: number, ca: string, request: string | Buffer): Promise<string> {
  return new Promise((resolve) => {
    const s = tls.connect({ host: '127.0.0.1', port, ca, servername: 'localhost' }, () => s.end(request));
    let out = '';
    s.setEncoding('utf8');
    s.on('data', (d: string) => (out += d));
    s.on('close', () => resolve(out));
    s.on('error', () => resolve(out || 'error'));
    s.setTimeout(15_000, () => s.destroy());
  });
}

function req(d: DaemonHandle, ca: string, method: string, urlPath: string, headers: Record<string, string>, body?: string | Buffer): Promise<{ status: number; body: string }> {
  return new Promise((resolve) => {
    const r = https.request({ host: '127.0.0.1', port: d.ports.api, method, path: urlPath, ca, headers, servername: 'localhost' }, (res) => {
      let text = '';
      res.setEncoding('utf8').on('data', (c: string) => (text += c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: text }));
    });
    r.on('error', (err) => resolve({ status: 0, body: err.message }));
    r.end(body);
  });
}

t.test('hostile HTTP against the API: each refused with a 4xx and a code (never 5xx), daemon up, a valid device keeps its PUBACKs', async (t) => {
  const d = await startDaemon(t, {
    dir: tempDir(t, 'ec-soak-http-'),
    // a small upload cap so an oversized upload is cheap to send
    config: { api: { max_upload_bytes: 1024 * 1024 }, bridge: { enabled: true, uplink: { url: 'wss://127.0.0.1:9/ingest' }, token: { url: 'https://127.0.0.1:9/oauth/token', client_secret: 'env:EC_SOAK_UNUSED' } } },
    env: { EC_SOAK_UNUSED: 'x'.repeat(32) },
  });
  const dev = await addDevice(d, 'http-victim');
  const mq = await addDevice(d, 'http-mqtt');
  const enr = await runCli(['enroll', 'create', '--uses', '100', '-c', d.configFile], { cwd: d.dir });
  t.equal(enr.code, 0, 'an enrollment token (so register requests reach the body parser)');
  const enrollment = enr.stdout.split('\n')[0]!.trim();
  const ca = readFileSync(dev.ca, 'utf8');
  const auth = { authorization: `Bearer ${dev.token}` };
  const enrAuth = { authorization: `Bearer ${enrollment}` };
  const octet = { ...auth, 'content-type': 'application/octet-stream' };
  const json = { ...enrAuth, 'content-type': 'application/json' };
  const digest = (b: Buffer | string, alg = 'sha-256'): string => `${alg}=:${createHash(alg.replace('-', '')).update(b).digest('base64')}:`;
  const pub = new Publisher(mq);
  await pub.run(d);
  await pub.waitAcked(10, 20_000);
  type Case = [string, () => Promise<{ status: number; body: string }>];
  const cases: Case[] = [
    // malformed JSON and hostile JSON shapes, with a valid enrollment token
    ['malformed JSON to register', () => req(d, ca, 'POST', '/api/register', json, '{"device_id": "x",')],
    ['JSON nested 10 000 deep', () => req(d, ca, 'POST', '/api/register', json, '['.repeat(10_000) + ']'.repeat(10_000))],
    ['JSON with a NUL and a lone surrogate', () => req(d, ca, 'POST', '/api/register', json, '{"device_id":"a\\u0000b","metadata":{"x":"\\ud800"}}')],
    ['JSON device_id as an object', () => req(d, ca, 'POST', '/api/register', json, '{"device_id":{"$ne":null}}')],
    ['JSON __proto__ pollution', () => req(d, ca, 'POST', '/api/register', json, '{"device_id":"proto-1","__proto__":{"admin":true},"metadata":{"constructor":{"prototype":{"x":1}}}}')],
    ['JSON top-level array', () => req(d, ca, 'POST', '/api/register', json, '[{"device_id":"x"}]')],
    ['JSON with a UTF-8 BOM and invalid UTF-8', () => req(d, ca, 'POST', '/api/register', json, Buffer.concat([Buffer.from([0xef, 0xbb, 0xbf]), Buffer.from('{"device_id":"'), Buffer.from([0xc0, 0xae, 0xff]), Buffer.from('"}')]))],
    ['empty JSON body', () => req(d, ca, 'POST', '/api/register', json, '')],
    // wrong content types
    ['register as text/plain', () => req(d, ca, 'POST', '/api/register', { ...enrAuth, 'content-type': 'text/plain' }, '{"device_id":"ct-1"}')],
    ['register as multipart/form-data', () => req(d, ca, 'POST', '/api/register', { ...enrAuth, 'content-type': 'multipart/form-data; boundary=x' }, '--x\r\n\r\n--x--')],
    ['register without a content type', () => req(d, ca, 'POST', '/api/register', enrAuth, '{"device_id":"ct-2"}')],
    ['Content-Type over the protocol limit (300 bytes)', () => req(d, ca, 'POST', '/api/publish/http-victim', { ...auth, 'content-type': `application/${'x'.repeat(300)}` }, 'payload')],
    ['Content-Type not a media type', () => req(d, ca, 'POST', '/api/publish/http-victim', { ...auth, 'content-type': 'not a type' }, 'payload')],
    // oversized bodies and headers
    ['oversized register body (8 MiB, over api.max_body_bytes)', () => req(d, ca, 'POST', '/api/register', json, Buffer.alloc(8 * 1024 * 1024, 0x20))],
    ['oversized upload (2 MiB over a 1 MiB api.max_upload_bytes)', () => req(d, ca, 'POST', '/api/publish/http-victim', octet, Buffer.alloc(2 * 1024 * 1024, 0x61))],
    ['oversized upload announced by Content-Length only', () => req(d, ca, 'POST', '/api/publish/http-victim', { ...octet, 'content-length': String(1024 * 1024 * 1024) }, 'x')],
    ['oversized header (64 KiB)', () => req(d, ca, 'GET', '/api/devices/http-victim/status', { ...auth, 'x-junk': 'a'.repeat(64 * 1024) })],
    ['2 000 headers (Node\'s client puts Host last: past the 64 headers kept)', () => req(d, ca, 'GET', '/api/devices/http-victim/status', { ...auth, ...Object.fromEntries(Array.from({ length: 2000 }, (_, i) => [`x-h${i}`, 'v'])) })],
    ['100 KiB URL', () => req(d, ca, 'GET', `/api/devices/${'a'.repeat(100 * 1024)}/status`, auth)],
    // path tricks in device_id
    ['encoded ../ in device_id', () => req(d, ca, 'GET', '/api/devices/..%2F..%2Fregistry.json/status', auth)],
    ['%2e%2e as device_id', () => req(d, ca, 'POST', '/api/publish/%2e%2e', octet, 'x')],
    ['%2e%2e%2f prefix on the own id', () => req(d, ca, 'POST', '/api/publish/%2e%2e%2fhttp-victim', octet, 'x')],
    ['literal ../ from the own path to another device', () => req(d, ca, 'POST', '/api/publish/http-victim/../someone-else', octet, 'x')],
    ['encoded slash inside the own id', () => req(d, ca, 'POST', '/api/publish/http-victim%2Fx', octet, 'x')],
    ['double-encoded ../', () => req(d, ca, 'POST', '/api/publish/%252e%252e%252fhttp-victim', octet, 'x')],
    ['overlong UTF-8 dots (%c0%ae)', () => req(d, ca, 'POST', '/api/publish/%c0%ae%c0%ae', octet, 'x')],
    ['backslash traversal', () => req(d, ca, 'POST', '/api/publish/..%5C..%5Chttp-victim', octet, 'x')],
    ['invalid percent escape', () => req(d, ca, 'POST', '/api/publish/http-victim%zz', octet, 'x')],
    ['NUL in device_id', () => req(d, ca, 'POST', '/api/publish/http-victim%00x', octet, 'x')],
    ['trailing slash', () => req(d, ca, 'POST', '/api/publish/http-victim/', octet, 'x')],
    ['another device\'s publish path', () => req(d, ca, 'POST', '/api/publish/someone-else', octet, 'x')],
    ['another device\'s status', () => req(d, ca, 'GET', '/api/devices/http-mqtt/status', auth)],
    // malformed digests
    ['malformed Content-Digest (not base64)', () => req(d, ca, 'POST', '/api/publish/http-victim', { ...octet, 'content-digest': 'sha-256=:not base64!:' }, 'x')],
    ['wrong Content-Digest', () => req(d, ca, 'POST', '/api/publish/http-victim', { ...octet, 'content-digest': `sha-256=:${Buffer.alloc(32).toString('base64')}:` }, 'payload')],
    ['Content-Digest of the wrong length', () => req(d, ca, 'POST', '/api/publish/http-victim', { ...octet, 'content-digest': `sha-256=:${Buffer.alloc(31).toString('base64')}:` }, 'payload')],
    ['Content-Digest without the colons', () => req(d, ca, 'POST', '/api/publish/http-victim', { ...octet, 'content-digest': digest('payload').replace(/:/g, '') }, 'payload')],
    ['Content-Digest of another body', () => req(d, ca, 'POST', '/api/publish/http-victim', { ...octet, 'content-digest': digest('other') }, 'payload')],
    ['empty Content-Digest', () => req(d, ca, 'POST', '/api/publish/http-victim', { ...octet, 'content-digest': '' }, 'payload')],
    // method and credentials
    ['unknown method', () => req(d, ca, 'PATCH', '/api/register', json, '{}')],
    ['TRACE', () => req(d, ca, 'TRACE', '/api/register', {})],
    ['no credentials', () => req(d, ca, 'POST', '/api/publish/http-victim', { 'content-type': 'application/octet-stream' }, 'x')],
    ['Bearer with 100 KiB of garbage', () => req(d, ca, 'POST', '/api/publish/http-victim', { authorization: `Bearer ${'A'.repeat(100 * 1024)}`, 'content-type': 'application/octet-stream' }, 'x')],
    ['Basic instead of Bearer', () => req(d, ca, 'POST', '/api/publish/http-victim', { authorization: `Basic ${Buffer.from('http-victim:x').toString('base64')}`, 'content-type': 'application/octet-stream' }, 'x')],
  ];
  // tolerated by design, yet never a 5xx: dot segments are resolved like any URL (then the device's own path
  // is the only one it may use), a Content-Digest naming
  // only algorithms the API does not check is ignored (RFC 9530; tested in test/api/api.test.ts), and JSON is
  // read as UTF-8 whatever charset is declared (RFC 8259)
  const tolerated: Case[] = [
    ['literal ../ back to the own path', () => req(d, ca, 'POST', '/api/publish/someone/../http-victim', octet, 'x')],
    ['Content-Digest naming only md5', () => req(d, ca, 'POST', '/api/publish/http-victim', { ...octet, 'content-digest': 'md5=:AAAAAAAAAAAAAAAAAAAAAA==:' }, 'payload')],
    ['register as application/json; charset=utf-16', () => req(d, ca, 'POST', '/api/register', { ...enrAuth, 'content-type': 'application/json; charset=utf-16' }, '{"device_id":"ct-3"}')],
  ];
  const answers: string[] = [];
  for (const [name, run] of tolerated) {
    const r = await run();
    answers.push(`${name} (tolerated): ${r.status}`);
    t.ok(r.status > 0 && r.status < 500, `${name}: tolerated, never a 5xx (${r.status})`);
  }
  for (const [name, run] of cases) {
    const ackedBefore = pub.acked.length;
    const logsBefore = d.logs.length;
    let r = await run();
    if (r.status === 0 && /EPIPE|ECONNRESET/.test(r.body)) {
      // the server answered and closed while the client was still writing a body it had refused: the client
      // lost the answer, the daemon's log line has it
      const line = await d
        .waitForLog((l) => d.logs.indexOf(l) >= logsBefore && l.msg === 'request refused', 5000, `the refusal of ${name}`)
        .catch(() => undefined);
      if (line) r = { status: Number(line.status), body: JSON.stringify({ code: line.code }) };
    }
    const code = /"code":"(ECONN_[A-Z_]+)"/.exec(r.body)?.[1];
    answers.push(`${name}: ${r.status} ${code ?? r.body.slice(0, 80)}`);
    t.ok(r.status >= 400 && r.status < 500, `${name}: a 4xx (${r.status} ${code ?? r.body.slice(0, 120)})`);
    // 431 and 414 come from Node's HTTP parser before any handler runs: a bare status line is the answer there
    if (r.status !== 431 && r.status !== 414) t.ok(code, `${name}: the answer carries an error code`);
    if (r.status >= 400) t.notMatch(r.body, dev.token, `${name}: the answer does not echo the token`);
    await pub.waitAcked(ackedBefore + 3, 10_000);
  }
  // broken HTTP framing, sent raw (a client library would not produce it): a 4xx or a closed connection, never a 5xx
  const head = `Host: localhost\r\nAuthorization: Bearer ${dev.token}\r\nContent-Type: application/octet-stream\r\n`;
  const raw: [string, string][] = [
    ['chunk size not hex', `POST /api/publish/http-victim HTTP/1.1\r\n${head}Transfer-Encoding: chunked\r\n\r\nZZZ\r\nabc\r\n0\r\n\r\n`],
    ['chunk size overflowing 64 bits', `POST /api/publish/http-victim HTTP/1.1\r\n${head}Transfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFFF\r\nabc\r\n0\r\n\r\n`],
    ['chunk data longer than its size', `POST /api/publish/http-victim HTTP/1.1\r\n${head}Transfer-Encoding: chunked\r\n\r\n3\r\nabcdef\r\n0\r\n\r\n`],
    ['chunked and Content-Length together (smuggling)', `POST /api/publish/http-victim HTTP/1.1\r\n${head}Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n`],
    ['Transfer-Encoding gzip, chunked', `POST /api/publish/http-victim HTTP/1.1\r\n${head}Transfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n`],
    ['two Content-Length headers that disagree', `POST /api/publish/http-victim HTTP/1.1\r\n${head}Content-Length: 3\r\nContent-Length: 5\r\n\r\nabcde`],
    ['negative Content-Length', `POST /api/publish/http-victim HTTP/1.1\r\n${head}Content-Length: -1\r\n\r\nabc`],
    ['control character in a header value', `POST /api/publish/http-victim HTTP/1.1\r\n${head.replace('application/octet-stream', 'application/oc\x01tet')}Content-Length: 3\r\n\r\nabc`],
    ['bare LF line endings', `POST /api/publish/http-victim HTTP/1.1\n${head.replace(/\r\n/g, '\n')}Content-Length: 3\n\nabc`],
    ['HTTP/0.9 style request', 'GET /api/devices/http-victim/status\r\n\r\n'],
    ['garbage request line', `\x16\x03\x01${'\xff'.repeat(200)}\r\n\r\n`],
  ];
  for (const [name, request] of raw) {
    const ackedBefore = pub.acked.length;
    const out = await rawHttps(d.ports.api!, ca, Buffer.from(request, 'latin1'));
    const status = /^HTTP\/1\.1 (\d{3})/.exec(out)?.[1];
    answers.push(`${name}: ${status ?? 'connection closed'}`);
    t.ok(status === undefined ? out === '' || out === 'error' : status.startsWith('4'), `${name}: ${status ?? 'connection closed'} (a 4xx or closed, never 5xx)`);
    await pub.waitAcked(ackedBefore + 3, 10_000);
  }
  t.comment(answers.join('\n'));
  const body = 'a valid upload after the hostile ones';
  const ok = await req(d, ca, 'POST', '/api/publish/http-victim', { ...octet, 'content-digest': digest(body) }, body);
  t.equal(ok.status, 202, `a valid upload is still accepted (${ok.body.slice(0, 200)})`);
  t.ok(pub.running, 'the MQTT device was never disconnected');
  const fiveXX = d.logs.filter((l) => Number(l.status) >= 500 || Number(l.statusCode) >= 500 || l.code === 'ECONN_INTERNAL');
  t.same(fiveXX.slice(0, 3), [], 'no 5xx or internal error logged');
  t.equal(d.proc.exitCode, null, 'the daemon is still running');
  await pub.finish();
});

/** Mutations of a YAML text: deletions, duplications, type flips, random bytes. */
function mutate(text: string, rnd: () => number): string {
  const lines = text.split('\n');
  const i = Math.floor(rnd() * lines.length);
  switch (Math.floor(rnd() * 7)) {
    case 0:
      lines.splice(i, 1);
      break;
    case 1:
      lines.splice(i, 0, lines[Math.floor(rnd() * lines.length)] ?? '');
      break;
    case 2:
      lines[i] = (lines[i] ?? '').replace(/: .*/, `: ${['[]', '{}', '-1', '1e309', 'null', '~', '"\\u0000"', '!!binary AAAA', '*alias', '&a [*a]', '0x7fffffffffffffff', 'yes'][Math.floor(rnd() * 12)]}`);
      break;
    case 3:
      lines[i] = ' '.repeat(Math.floor(rnd() * 9)) + (lines[i] ?? '').trimStart();
      break;
    case 4: {
      const s = lines[i] ?? '';
      const at = Math.floor(rnd() * (s.length + 1));
      lines[i] = s.slice(0, at) + String.fromCharCode(Math.floor(rnd() * 0x3000)) + s.slice(at);
      break;
    }
    case 5:
      return text.slice(0, Math.floor(rnd() * text.length));
    default:
      lines[i] = `${lines[i] ?? ''}\n${'  '.repeat(Math.floor(rnd() * 4))}unknown_key_${Math.floor(rnd() * 100)}: 1`;
  }
  return lines.join('\n');
}

t.test('a fuzzed connector.yaml never crashes check-config (ok or exit 78 with FILE:LINE:COL errors)', async (t) => {
  const rnd = seeded();
  const { parseConfigText } = await import('../../core/config/load.js');
  const base = readFileSync(path.join(REPO, 'connector.yaml'), 'utf8');
  // in process: thousands of mutants, each either loads or fails with a ConfigError
  const N = FULL ? 20_000 : 2_000;
  const crashes: string[] = [];
  for (let i = 0; i < N; i++) {
    let text = base;
    for (let k = 0, n = 1 + Math.floor(rnd.next() * 4); k < n; k++) text = mutate(text, rnd.next);
    try {
      parseConfigText(text, '/fuzz/connector.yaml', { checkSecrets: false, env: {} });
    } catch (err) {
      if ((err as { code?: string }).code !== 'ECONN_CONFIG_INVALID' || !(err instanceof Error)) {
        if (crashes.length < 5) crashes.push(`${(err as Error).name}: ${(err as Error).message.slice(0, 200)}\n${text.slice(0, 400)}`);
      }
    }
  }
  t.same(crashes, [], `${N} mutants (seed ${rnd.seed}): every failure is a ConfigError`);
  // through the CLI: a few, for the exit code and the message shape
  const dir = tempDir(t, 'ec-soak-yaml-');
  for (let i = 0; i < (FULL ? 40 : 8); i++) {
    let text = base;
    for (let k = 0; k < 3; k++) text = mutate(text, rnd.next);
    const file = path.join(dir, `c${i}.yaml`);
    writeFileSync(file, text, { mode: 0o600 });
    const r = await runCli(['check-config', '-c', file], { cwd: dir });
    t.ok(r.code === 0 || r.code === 78, `mutant ${i}: exit ${r.code} (0 or 78)`);
    if (r.code === 78) t.match(r.stderr + r.stdout, /c\d+\.yaml(:\d+:\d+)? /, `mutant ${i}: errors name the file (and line)`);
  }
  // an intact copy still passes, so the mutants were the only thing wrong
  const valid = stringify(parse(base));
  writeFileSync(path.join(dir, 'valid.yaml'), valid, { mode: 0o600 });
  t.equal((await runCli(['check-config', '-c', path.join(dir, 'valid.yaml')], { cwd: dir })).code, 0, 'the bundled configuration passes');
});
