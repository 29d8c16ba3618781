/**
 * CloudTokenClient against a tiny real HTTPS token endpoint (certificates made
 * at test time). Time is a manual clock: renewals and backoff timers are fired
 * by the test, so nothing sleeps.
 */
import t from 'tap';
import https from 'node:https';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { writeFileSync, chmodSync } from 'node:fs';
import path from 'node:path';
import { TestCA } from '../helpers/certs.js';
import { tempDir, type TestLike } from '../helpers/daemon.js';
import { createLogger, type Logger } from '../../core/logger.js';
import { CloudTokenClient, CloudTokenError, type Clock, type TokenConfig } from '../../bridge/cloud-token.js';

interface Timer {
  at: number;
  fn: () => void;
  id: number;
}
class ManualClock implements Clock {
  t = 1_700_000_000_000;
  timers: Timer[] = [];
  private seq = 0;
  now(): number {
    return this.t;
  }
  setTimeout(fn: () => void, ms: number): unknown {
    const timer = { at: this.t + ms, fn, id: ++this.seq };
    this.timers.push(timer);
    return timer.id;
  }
  clearTimeout(h: unknown): void {
    this.timers = this.timers.filter((x) => x.id !== h);
  }
  /** Move time forward and fire due timers; returns how many fired. */
  advance(ms: number): number {
    this.t += ms;
    const due = this.timers.filter((x) => x.at <= this.t);
    this.timers = this.timers.filter((x) => x.at > this.t);
    for (const d of due) d.fn();
    return due.length;
  }
  nextTimer(): number | undefined {
    return this.timers.length ? Math.min(...this.timers.map((x) => x.at)) - this.t : undefined;
  }
}

interface Req {
  params: URLSearchParams;
  authorization?: string;
}
type Handler = (req: Req, res: ServerResponse) => void;

const SECRET = 'S3cr3t-client-secret-value';
const PASSWORD = 'hunter2-resource-owner-pw';

async function setup(t: TestLike, handler: Handler, tokenOver: Partial<TokenConfig> = {}) {
  const ca = await TestCA.create();
  const srv = await ca.server();
  const dir = tempDir(t);
  const caFile = path.join(dir, 'ca.pem');
  writeFileSync(caFile, ca.cert);
  const secretFile = path.join(dir, 'client_secret');
  writeFileSync(secretFile, SECRET + '\n', { mode: 0o600 });
  const requests: Req[] = [];
  const state = { handler };
  const server = https.createServer({ cert: srv.cert, key: srv.key }, (req: IncomingMessage, res: ServerResponse) => {
    let body = '';
    req.setEncoding('utf8');
    req.on('data', (d: string) => (body += d));
    req.on('end', () => {
      const r: Req = { params: new URLSearchParams(body), authorization: req.headers.authorization };
      requests.push(r);
      state.handler(r, res);
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.teardown(() => new Promise<void>((resolve) => { server.closeAllConnections(); server.close(() => resolve()); }));
  const port = (server.address() as { port: number }).port;
  const logLines: string[] = [];
  const logger: Logger = createLogger({ level: 'debug', destination: { write: (s: string) => void logLines.push(s) } });
  const clock = new ManualClock();
  const token: TokenConfig = {
    url: `https://127.0.0.1:${port}/oauth/token`,
    grant: 'client_credentials',
    client_id: 'edge-1',
    client_secret: `file:${secretFile}`,
    username: '',
    scope: 'ingest',
    renew_before_s: 60,
    ...tokenOver,
  };
  const client = new CloudTokenClient({
    token,
    uplink: { ca_file: caFile, cert_file: '', key_file: '', min_tls_version: 'TLSv1.2' },
    logger,
    clock,
    env: { CLOUD_PW: PASSWORD },
    random: () => 0.5,
    retryMinMs: 1000,
    retryMaxMs: 60_000,
  });
  t.teardown(() => client.close());
  return { client, clock, requests, state, logLines, secretFile, caFile, token, port, ca };
}

const json = (res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void => {
  res.writeHead(status, { 'content-type': 'application/json', ...headers });
  res.end(JSON.stringify(body));
};

function basic(r: Req): [string, string] | undefined {
  if (!r.authorization?.startsWith('Basic ')) return undefined;
  const s = Buffer.from(r.authorization.slice(6), 'base64').toString();
  const i = s.indexOf(':');
  return [decodeURIComponent(s.slice(0, i)), decodeURIComponent(s.slice(i + 1))];
}

let issued = 0;
const goodToken = (extra: Record<string, unknown> = {}) => ({ access_token: `at-${++issued}`, token_type: 'Bearer', expires_in: 3600, ...extra });

/**
 * Wait (bounded) for a condition that depends on real I/O. Polling on purpose: the conditions are
 * the client's token state (hasValidToken, no event) and what the test endpoint has received so far.
 */
async function until(cond: () => boolean, what: string, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

t.test('client_credentials: Basic client auth, scope, cached until renewal', async (t) => {
  const { client, requests, logLines } = await setup(t, (r, res) => {
    const cred = basic(r);
    if (!cred || cred[0] !== 'edge-1' || cred[1] !== SECRET) return json(res, 401, { error: 'invalid_client' });
    if (r.params.get('grant_type') !== 'client_credentials' || r.params.get('scope') !== 'ingest') return json(res, 400, { error: 'invalid_request' });
    json(res, 200, goodToken());
  });
  const tok = await client.getToken();
  t.match(tok, /^at-\d+$/);
  t.equal(await client.getToken(), tok, 'cached');
  t.equal(requests.length, 1);
  t.ok(client.hasValidToken());
  const all = logLines.join('');
  t.notOk(all.includes(SECRET), 'secret never logged');
  t.notOk(all.includes(tok), 'access token never logged');
  t.match(all, /cloud token issued/);
});

t.test('password grant sends username and the password resolved from its secret reference', async (t) => {
  const { client, requests } = await setup(
    t,
    (r, res) => {
      if (r.params.get('grant_type') !== 'password' || r.params.get('username') !== 'gw-user' || r.params.get('password') !== PASSWORD) {
        return json(res, 400, { error: 'invalid_grant' });
      }
      json(res, 200, goodToken());
    },
    { grant: 'password', username: 'gw-user', password: 'env:CLOUD_PW' },
  );
  t.match(await client.getToken(), /^at-/);
  t.equal(requests.length, 1);
});

t.test('grant=password without username: clear error before any request', async (t) => {
  const { client, requests } = await setup(t, (_r, res) => json(res, 200, goodToken()), { grant: 'password', username: '' });
  await t.rejects(client.getToken(), { code: 'ECONN_CLOUD_TOKEN', message: /bridge\.token\.username/ });
  t.equal(requests.length, 0);
});

t.test('a public client (no secret) sends client_id in the body', async (t) => {
  const { client, requests } = await setup(t, (r, res) => json(res, r.params.get('client_id') === 'edge-1' && !r.authorization ? 200 : 401, goodToken()), {
    client_secret: undefined,
  });
  await client.getToken();
  t.equal(requests[0]!.params.get('client_id'), 'edge-1');
});

t.test('renews before expiry with the refresh token; emits token', async (t) => {
  const { client, clock, requests } = await setup(t, (r, res) => {
    if (r.params.get('grant_type') === 'refresh_token') {
      if (r.params.get('refresh_token') !== 'rt-1') return json(res, 400, { error: 'invalid_grant' });
      return json(res, 200, goodToken({ expires_in: 3600 })); // no new refresh token: keep the old one
    }
    json(res, 200, goodToken({ refresh_token: 'rt-1', expires_in: 3600 }));
  });
  const events: { via: string; expiresAt: number }[] = [];
  client.on('token', (e: { via: string; expiresAt: number }) => events.push(e));
  const first = await client.getToken();
  // expiry counted 1 s early (the endpoint's whole-second clock), renewal renew_before_s (60 s) ahead of it
  t.equal(clock.nextTimer(), 3539_000, 'renewal scheduled renew_before_s ahead of a 1 h expiry');
  t.equal(clock.advance(3539_000), 1, 'renewal fired');
  await until(() => events.length === 2, 'the refresh');
  t.equal(events[1]!.via, 'refresh_token');
  const second = await client.getToken();
  t.not(second, first, 'new token');
  t.equal(requests[1]!.params.get('grant_type'), 'refresh_token');
  // the next renewal refreshes with the kept refresh token again
  clock.advance(3539_000);
  await until(() => events.length === 3, 'the second refresh');
  t.equal(requests[2]!.params.get('refresh_token'), 'rt-1', 'the old refresh token is kept when none is returned');
});

t.test('short-lived token: renewal at 80 % of its lifetime', async (t) => {
  const { client, clock } = await setup(t, (_r, res) => json(res, 200, goodToken({ expires_in: 10 })));
  await client.getToken();
  t.equal(clock.nextTimer(), 7200, 'renew_before_s=60 exceeds the lifetime: 80 % of 10 s (counted as 9 s: a tenth off for the endpoint clock)');
});

t.test('refresh refused: falls back to the full grant', async (t) => {
  const { client, clock, requests } = await setup(t, (r, res) => {
    if (r.params.get('grant_type') === 'refresh_token') return json(res, 400, { error: 'invalid_grant', error_description: 'refresh token revoked' });
    json(res, 200, goodToken({ refresh_token: `rt-${issued}` }));
  });
  const events: string[] = [];
  client.on('token', (e: { via: string }) => events.push(e.via));
  await client.getToken();
  clock.advance(3539_000);
  await until(() => events.length === 2, 'renewal');
  t.same(
    requests.map((r) => r.params.get('grant_type')),
    ['client_credentials', 'refresh_token', 'client_credentials'],
  );
  t.same(events, ['client_credentials', 'client_credentials']);
});

t.test('refresh failing with 503 is an outage, not a refusal: no full grant, backoff, old token still served', async (t) => {
  let down = false;
  const { client, clock, requests } = await setup(t, (r, res) => {
    if (down) return json(res, 503, { error: 'temporarily_unavailable' });
    json(res, 200, goodToken({ refresh_token: 'rt' }));
  });
  const tok = await client.getToken();
  down = true;
  clock.advance(3539_000);
  await until(() => requests.length === 2, 'the refresh attempt');
  await until(() => client.status().failures === 1, 'failure recorded');
  t.equal(requests[1]!.params.get('grant_type'), 'refresh_token');
  t.equal(await client.getToken(), tok, 'the still-valid token is served while renewal backs off');
  t.ok(clock.nextTimer()! >= 1000, 'a retry is scheduled');
  down = false;
  clock.advance(clock.nextTimer()!);
  await until(() => requests.length === 3 && client.status().failures === 1 && client.status().renewals === 2, 'retry succeeded');
  t.not(await client.getToken(), tok);
});

t.test('503 with Retry-After: waits at least that long, no request meanwhile', async (t) => {
  let down = true;
  const { client, clock, requests, logLines } = await setup(t, (_r, res) => {
    if (down) return json(res, 503, { error: 'temporarily_unavailable' }, { 'retry-after': '120' });
    json(res, 200, goodToken());
  });
  const err = (await client.getToken().catch((e: unknown) => e)) as CloudTokenError;
  t.type(err, CloudTokenError);
  t.equal(err.code, 'ECONN_CLOUD_TOKEN');
  t.equal(err.status, 503);
  t.equal(err.retryInMs, 120_000, 'Retry-After 120 s is the floor (jittered backoff would be ~1 s)');
  t.match(err.message, /answered 503/);
  t.equal(clock.nextTimer(), 120_000, 'background retry scheduled at Retry-After');
  // a caller asking meanwhile fails fast without a request
  const again = (await client.getToken().catch((e: unknown) => e)) as CloudTokenError;
  t.equal(again.code, 'ECONN_CLOUD_TOKEN');
  t.ok(again.retryInMs! <= 120_000 && again.retryInMs! > 0);
  t.equal(requests.length, 1, 'no request while backing off');
  clock.advance(60_000);
  await t.rejects(client.getToken(), { code: 'ECONN_CLOUD_TOKEN' });
  t.equal(requests.length, 1);
  down = false;
  clock.advance(60_000); // background retry fires
  await until(() => client.hasValidToken(), 'recovery');
  t.equal(requests.length, 2);
  t.match(logLines.join(''), /retrying in 120\.0 s/);
});

t.test('401 invalid_client: clear error without the secret, growing backoff, recovery after the secret file is fixed', async (t) => {
  const { client, clock, requests, logLines, secretFile } = await setup(t, (r, res) => {
    const cred = basic(r);
    if (!cred || cred[1] !== SECRET) return json(res, 401, { error: 'invalid_client', error_description: 'client authentication failed' });
    json(res, 200, goodToken());
  });
  writeFileSync(secretFile, 'wrong-secret-value-xyz\n');
  chmodSync(secretFile, 0o600);
  const e1 = (await client.getToken().catch((e: unknown) => e)) as CloudTokenError;
  t.equal(e1.code, 'ECONN_CLOUD_TOKEN');
  t.equal(e1.oauthError, 'invalid_client');
  t.match(e1.message, /401 invalid_client.*check bridge\.token\.client_id and the client secret/);
  t.notOk(e1.message.includes('wrong-secret-value-xyz'));
  const d1 = e1.retryInMs!;
  clock.advance(d1);
  await until(() => requests.length === 2 && client.status().failures === 2, 'second attempt');
  const d2 = clock.nextTimer()!;
  t.ok(d2 > d1, `backoff grows (${d1} -> ${d2})`);
  writeFileSync(secretFile, SECRET + '\n');
  clock.advance(d2);
  await until(() => client.hasValidToken(), 'recovery after the fix');
  const all = logLines.join('');
  t.notOk(all.includes('wrong-secret-value-xyz') || all.includes(SECRET), 'no secret in logs');
  t.match(all, /"code":"ECONN_CLOUD_TOKEN"/);
});

t.test('a missing or unsafe secret file is a clear ECONN_CLOUD_TOKEN error naming the key', async (t) => {
  const { client, requests, secretFile } = await setup(t, (_r, res) => json(res, 200, goodToken()));
  chmodSync(secretFile, 0o644);
  await t.rejects(client.getToken(), { code: 'ECONN_CLOUD_TOKEN', message: /bridge\.token\.client_secret.*chmod 600/ });
  t.equal(requests.length, 0);
});

t.test('concurrent getToken(): one request shared by every caller', async (t) => {
  const held: ServerResponse[] = [];
  const { client, requests } = await setup(t, (_r, res) => held.push(res));
  const calls = Array.from({ length: 20 }, () => client.getToken());
  await until(() => held.length === 1, 'the request');
  json(held[0]!, 200, goodToken());
  // no sleep to see whether more requests come: the endpoint answers only the first one, so if any
  // caller had made its own request it would still be waiting for that answer and this would fail
  let timer: NodeJS.Timeout | undefined;
  const tokens = await Promise.race([
    Promise.all(calls),
    new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`callers still waiting after the one answer: ${held.length} requests`)), 5000))),
  ]).finally(() => clearTimeout(timer));
  t.equal(new Set(tokens).size, 1, 'everybody got the same token');
  t.equal(requests.length, 1, 'from one request');
  t.equal(held.length, 1);
});

t.test('malformed endpoint answers are clear errors', async (t) => {
  const answers: [number, string][] = [
    [200, 'not json'],
    [200, '[]'],
    [200, JSON.stringify({ token_type: 'Bearer' })],
    [200, JSON.stringify({ access_token: 'a b', token_type: 'Bearer' })],
    [200, JSON.stringify({ access_token: 'x', token_type: 'MAC' })],
    [200, JSON.stringify({ access_token: 'x', expires_in: -4 })],
    [500, '<html>oops</html>'],
  ];
  let i = 0;
  const { client, clock } = await setup(t, (_r, res) => {
    const [s, b] = answers[i++]!;
    res.writeHead(s, { 'content-type': 'application/json' });
    res.end(b);
  });
  for (let k = 0; k < answers.length; k++) {
    clock.advance(3600_000); // past any backoff
    const e = (await client.getToken().catch((x: unknown) => x)) as CloudTokenError;
    t.equal(e.code, 'ECONN_CLOUD_TOKEN', `answer ${k}: ${e.message}`);
  }
});

t.test('TLS: a server certificate from an unknown CA is refused; endpoint down is a clear error', async (t) => {
  const { client, caFile, port } = await setup(t, (_r, res) => json(res, 200, goodToken()));
  const other = await TestCA.create();
  writeFileSync(caFile, other.cert); // the CA file is read at use time
  const e = (await client.getToken().catch((x: unknown) => x)) as CloudTokenError;
  t.equal(e.code, 'ECONN_CLOUD_TOKEN');
  t.match(e.message, /cannot reach token endpoint .*(certificate|verify|issuer)/i);

  const down = await setup(t, (_r, res) => json(res, 200, goodToken()), { url: `https://127.0.0.1:1/oauth/token` });
  void port;
  const e2 = (await down.client.getToken().catch((x: unknown) => x)) as CloudTokenError;
  t.match(e2.message, /cannot reach token endpoint https:\/\/127\.0\.0\.1:1\/oauth\/token: ECONNREFUSED/);
});

t.test('close() stops timers and refuses further use', async (t) => {
  const { client, clock } = await setup(t, (_r, res) => json(res, 200, goodToken()));
  await client.getToken();
  t.equal(clock.timers.length, 1);
  await client.close();
  await client.close();
  t.equal(clock.timers.length, 0, 'renewal timer cleared');
  await t.rejects(client.getToken(), { code: 'ECONN_CLOSED' });
});

t.test('invalidate() makes the next getToken renew; reload resets backoff', async (t) => {
  let fail = true;
  const { client, requests, token, caFile } = await setup(t, (_r, res) => (fail ? json(res, 401, { error: 'invalid_client' }) : json(res, 200, goodToken())));
  await t.rejects(client.getToken());
  await t.rejects(client.getToken(), { code: 'ECONN_CLOUD_TOKEN' });
  t.equal(requests.length, 1, 'second call failed fast');
  fail = false;
  t.same(client.reload({ ...token, client_id: 'edge-1' }, { ca_file: caFile, cert_file: '', key_file: '', min_tls_version: 'TLSv1.2' }), []);
  const a = await client.getToken();
  t.equal(requests.length, 2, 'reload let it try at once');
  client.invalidate();
  const b = await client.getToken();
  t.not(a, b);
  t.equal(requests.length, 3);
});

t.test('issue 9: a token living 40 days arms no timer beyond 2^31-1 ms (Node would fire it after 1 ms) and renews once, when due', async (t) => {
  const MAX = 2 ** 31 - 1;
  const { client, clock, requests } = await setup(t, (_r, res) => json(res, 200, goodToken({ expires_in: 40 * 86400 })));
  await client.getToken();
  t.equal(requests.length, 1);
  const due = client.renewAt();
  t.ok(due - clock.now() > MAX, 'the renewal is further away than setTimeout can wait');
  t.ok(clock.timers.length > 0 && clock.timers.every((x) => x.at - clock.now() <= MAX), 'every timer within what setTimeout honours');
  t.equal(clock.advance(MAX), 1, 'the clamped timer fires');
  t.equal(requests.length, 1, 'no renewal before it is due: the timer re-armed');
  t.ok(clock.timers.length === 1 && clock.timers.every((x) => x.at - clock.now() <= MAX), 're-armed within the limit');
  clock.advance(due - clock.now());
  await until(() => requests.length === 2, 'the renewal when due');
  t.equal(requests.length, 2, 'exactly one renewal');
});

t.test('issue 9: a token the endpoint says lives 1 ms is not renewed in a loop (at most once a second)', async (t) => {
  const { client, clock, requests } = await setup(t, (_r, res) => json(res, 200, goodToken({ expires_in: 0.001 })));
  await client.getToken();
  t.equal(requests.length, 1);
  t.ok((clock.nextTimer() ?? 0) >= 1000, `next renewal in ${clock.nextTimer()} ms, not at once`);
  t.equal(clock.advance(999), 0, 'nothing fires within the first second');
  t.equal(requests.length, 1);
});
