/**
 * The request signature (protocol/signature.ts) held to docs/PROTOCOL.md §1:
 * string to sign METHOD \n PATH \n TIMESTAMP, HMAC-SHA256, lowercase hex, and the
 * worked example in the docs checked three ways (our code, node:crypto by hand,
 * and the openssl command line a third party would use).
 */
import t from 'tap';
import { createHmac } from 'node:crypto';
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { stringToSign, signRequest, verifySignature, SIGNATURE_MAX_SKEW_S } from '../../protocol/signature.js';
import { REPO } from '../helpers/daemon.js';

const doc = readFileSync(path.join(REPO, 'docs/PROTOCOL.md'), 'utf8');
const section1 = doc.slice(doc.indexOf('## 1.'), doc.indexOf('## 2.'));

/** The vector as the docs print it (so the test fails when docs and code drift apart). */
function docVector(): { secret: string; method: string; path: string; ts: number; hex: string } {
  const row = (name: string): string => {
    const m = new RegExp(`^\\s*\\| ${name} \\| \`([^\`]+)\` \\|`, 'm').exec(section1);
    if (!m) throw new Error(`docs/PROTOCOL.md §1 has no "${name}" row in its worked example`);
    return m[1]!;
  };
  return { secret: row('secret'), method: row('METHOD'), path: row('PATH'), ts: Number(row('TIMESTAMP')), hex: row('HEX') };
}

t.test('the string to sign is METHOD\\nPATH\\nTIMESTAMP (documented order), no trailing newline', async (t) => {
  t.equal(stringToSign('GET', '/ingest', 1700000000), 'GET\n/ingest\n1700000000');
  t.match(section1, /METHOD \+ "\\n" \+ PATH \+ "\\n" \+ TIMESTAMP/, 'the docs state the same order');
});

t.test('the worked example of docs/PROTOCOL.md §1 verifies with our code and by hand', async (t) => {
  const v = docVector();
  const byHand = createHmac('sha256', Buffer.from(v.secret, 'utf8')).update(`${v.method}\n${v.path}\n${v.ts}`).digest('hex');
  t.equal(byHand, v.hex, 'HMAC-SHA256 by hand equals the documented HEX');
  t.equal(signRequest(v.secret, v.method, v.path, v.ts), `t=${v.ts},v1=${v.hex}`, 'signRequest gives the documented header value');
  t.ok(section1.includes(`X-Signature: t=${v.ts},v1=${v.hex}`), 'the documented header line matches');
  t.ok(verifySignature(`t=${v.ts},v1=${v.hex}`, v.secret, v.method, v.path, v.ts), 'the cloud side accepts it');
  // the old order (TIMESTAMP\nMETHOD\nPATH) is not accepted any more
  const old = createHmac('sha256', v.secret).update(`${v.ts}\n${v.method}\n${v.path}`).digest('hex');
  t.notOk(verifySignature(`t=${v.ts},v1=${old}`, v.secret, v.method, v.path, v.ts), 'a signature in the old order is refused');
});

const probe = spawnSync('openssl', ['version'], { encoding: 'utf8' });
const noOpenssl = probe.error !== undefined || probe.status !== 0 ? 'openssl is not installed' : false;

t.test('openssl dgst -sha256 -hmac reproduces the documented vector', { skip: noOpenssl }, async (t) => {
  const v = docVector();
  const r = spawnSync('openssl', ['dgst', '-sha256', '-hmac', v.secret], { input: `${v.method}\n${v.path}\n${v.ts}`, encoding: 'utf8' });
  t.equal(r.status, 0, r.stderr);
  const hex = /([0-9a-f]{64})\s*$/.exec(r.stdout.trim())?.[1];
  t.equal(hex, v.hex, 'openssl agrees with the docs');
  const q = /`GET\\n(\/ingest\?[^`\\]+)\\n1700000000`\s+gives `([0-9a-f]{64})`/.exec(section1);
  t.ok(q, 'the docs give a vector with a query string');
  if (q) {
    const r2 = spawnSync('openssl', ['dgst', '-sha256', '-hmac', v.secret], { input: `GET\n${q[1]}\n1700000000`, encoding: 'utf8' });
    t.equal(/([0-9a-f]{64})\s*$/.exec(r2.stdout.trim())?.[1], q[2], 'the query vector too');
    t.equal(signRequest(v.secret, 'GET', q[1]!, 1700000000), `t=1700000000,v1=${q[2]}`);
  }
});

t.test('verification: path and query are signed, skew bounded, several v1 values, malformed headers', async (t) => {
  const now = 1_700_000_000;
  const good = signRequest('k', 'GET', '/ingest', now);
  t.ok(verifySignature(good, 'k', 'GET', '/ingest', now));
  t.ok(verifySignature(`t=${now},v1=${'0'.repeat(64)},${good.split(',')[1]}`, 'k', 'GET', '/ingest', now), 'one of several v1 values');
  t.notOk(verifySignature(good, 'k', 'GET', '/other', now), 'path is signed');
  t.notOk(verifySignature(good, 'k', 'GET', '/ingest?x=1', now), 'query is signed');
  t.notOk(verifySignature(good, 'k', 'POST', '/ingest', now), 'method is signed');
  t.notOk(verifySignature(good, 'other', 'GET', '/ingest', now), 'secret');
  t.ok(verifySignature(good, 'k', 'GET', '/ingest', now + SIGNATURE_MAX_SKEW_S), 'at the skew limit');
  t.notOk(verifySignature(good, 'k', 'GET', '/ingest', now + SIGNATURE_MAX_SKEW_S + 1), 'past the skew limit');
  t.notOk(verifySignature(good, 'k', 'GET', '/ingest', now - SIGNATURE_MAX_SKEW_S - 1), 'from the future');
  for (const bad of [undefined, '', 'garbage', `t=${now}`, `v1=${'a'.repeat(64)}`, `t=abc,${good.split(',')[1]}`, `t=${now},v1=${'A'.repeat(64)}`, `t=${now},v1=abc`]) {
    t.notOk(verifySignature(bad, 'k', 'GET', '/ingest', now), `refused: ${String(bad).slice(0, 30)}`);
  }
});
