import t from 'tap';
import { Writable } from 'node:stream';
import { createLogger, redactValue, redactString, REDACTED, LogRing, usesPretty } from '../../core/logger.js';

function capture(): { stream: Writable; lines: () => Record<string, unknown>[]; text: () => string } {
  let buf = '';
  const stream = new Writable({
    write(chunk: Buffer, _enc, cb) {
      buf += chunk.toString();
      cb();
    },
  });
  return { stream, text: () => buf, lines: () => buf.trim().split('\n').filter(Boolean).map((l) => JSON.parse(l) as Record<string, unknown>) };
}

const JWT = 'eyJhbGciOiJFUzI1NiIsImtpZCI6ImsxIn0.eyJzdWIiOiJkZXZpY2UtMSIsImV4cCI6MTk5OTk5OTk5OX0.c2lnbmF0dXJlLXNpZ25hdHVyZS1zaWduYXR1cmU';
const PEM = '-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END PRIVATE KEY-----\n';

t.test('credential-named keys are redacted at any depth', async (t) => {
  const c = capture();
  const log = createLogger({ level: 'info', destination: c.stream });
  log.info(
    {
      authorization: 'Bearer abcdefghijkl',
      headers: { Authorization: 'Basic dXNlcjpwYXNz' },
      password: 'pw-123',
      nested: { deep: { token: 't-456', client_secret: 'cs-789', refresh_token: 'r-1', api_secret: 's-2' } },
      list: [{ access_token: 'a-3' }],
      device_id: 'device-1',
    },
    'request',
  );
  log.flush();
  const text = c.text();
  for (const s of ['abcdefghijkl', 'dXNlcjpwYXNz', 'pw-123', 't-456', 'cs-789', 'r-1', 's-2', 'a-3']) t.notMatch(text, s, `${s} not logged`);
  t.match(text, 'device-1', 'ordinary fields stay');
  const line = c.lines()[0]!;
  t.equal((line.nested as { deep: { token: string } }).deep.token, REDACTED);
});

t.test('JWTs and private key PEMs are removed from any string, including the message and errors', async (t) => {
  const c = capture();
  const log = createLogger({ level: 'info', destination: c.stream });
  log.info({ detail: `got token ${JWT} from device` }, `verifying ${JWT}`);
  log.warn({ cfg: { note: PEM } }, 'key loaded');
  const err = new Error(`bad token ${JWT}`) as Error & { code: string };
  err.code = 'ECONN_AUTH_TOKEN';
  log.error({ err }, 'refused');
  log.child({ component: 'x', deviceId: 'd1' }).info(`pem ${PEM}`);
  log.flush();
  const text = c.text();
  t.notMatch(text, 'c2lnbmF0dXJl', 'no JWT signature');
  t.notMatch(text, 'eyJzdWIi', 'no JWT payload');
  t.notMatch(text, 'MIGHAgEAMBMG', 'no key material');
  t.match(text, 'ECONN_AUTH_TOKEN', 'error code kept');
  const lines = c.lines();
  t.equal(lines[3]!.component, 'x');
  t.equal(lines[3]!.deviceId, 'd1');
});

t.test('redactValue handles cycles, buffers, dates and depth', async (t) => {
  const a: Record<string, unknown> = { n: 1, when: new Date(0), buf: Buffer.alloc(3) };
  a.self = a;
  const out = redactValue(a) as Record<string, unknown>;
  t.equal(out.self, '[circular]');
  t.equal(out.buf, '[3 bytes]');
  t.equal(out.when, '1970-01-01T00:00:00.000Z');
  t.equal(redactString('short'), 'short');
  t.equal(redactString(`Bearer ${'x'.repeat(20)}`), `Bearer ${REDACTED}`);
});

/** Wait until the pretty stream (asynchronous parsing) wrote `n` lines. */
async function lines(c: ReturnType<typeof capture>, n: number): Promise<string[]> {
  for (let i = 0; i < 200; i++) {
    const got = c.text().split('\n').filter(Boolean);
    if (got.length >= n) return got;
    await new Promise((r) => setImmediate(r));
  }
  throw new Error(`expected ${n} lines, got: ${c.text()}`);
}

t.test('format: pretty writes one readable line per event, with the same redaction as JSON', async (t) => {
  const c = capture();
  const log = createLogger({ level: 'info', destination: c.stream, format: 'pretty' });
  const dev = log.child({ component: 'broker' }).child({ deviceId: 'sensor-1' });
  dev.info({ topic: 'devices/sensor-1/t', password: 'pw-123', auth: `Bearer ${JWT}` }, 'publish accepted');
  const err = new Error(`bad token ${JWT}`) as Error & { code: string };
  err.code = 'ECONN_AUTH_TOKEN';
  dev.warn({ err, cfg: { note: PEM } }, `refused ${JWT}`);
  log.info('plain');
  const [a, b, c3] = await lines(c, 3);
  t.notOk(c.text().trim().startsWith('{'), 'not JSON');
  t.match(a, /^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}\] INFO: \[broker\] sensor-1: publish accepted \{.*"topic":"devices\/sensor-1\/t"/, 'time, level, component, device, message, then the fields');
  t.match(b!, /WARN: \[broker\] sensor-1: refused \[redacted\].*ECONN_AUTH_TOKEN/, 'an error stays on its line, code kept');
  t.match(c3!, /INFO: plain$/);
  t.equal(c.text().trim().split('\n').length, 3, 'one line per event');
  for (const secret of ['pw-123', 'c2lnbmF0dXJl', 'eyJzdWIi', 'MIGHAgEAMBMG']) t.notMatch(c.text(), secret, `${secret} not in the pretty output`);
});

t.test('format: auto is pretty only for a terminal on stdout; json and explicit destinations stay JSON', async (t) => {
  t.equal(usesPretty({ format: 'auto', isTTY: true }), true, 'terminal');
  t.equal(usesPretty({ format: 'auto', isTTY: false }), false, 'journald / pipe');
  t.equal(usesPretty({ isTTY: true }), true, 'auto is the default');
  t.equal(usesPretty({ format: 'json', isTTY: true }), false, 'json even on a terminal');
  t.equal(usesPretty({ format: 'pretty', isTTY: false }), true, 'pretty even into a pipe (npm start | tee)');
  const c = capture();
  const log = createLogger({ level: 'info', destination: c.stream, format: 'auto', isTTY: true });
  log.info({ a: 1 }, 'x');
  log.flush();
  t.equal(c.lines()[0]!.msg, 'x', 'a stream given by the caller gets JSON lines');
});

t.test('LogRing keeps the last warnings and errors, redacted, newest first, bounded', async (t) => {
  const ring = new LogRing(3);
  const c = capture();
  const log = createLogger({ level: 'info', destination: c.stream, ring });
  log.info('not kept');
  log.child({ component: 'uplink' }).warn({ token: 'secret-token-123' }, `token ${JWT} refused`);
  const err = new Error('disk full') as Error & { code: string };
  err.code = 'ECONN_JOURNAL_IO';
  log.child({ component: 'journal', deviceId: 'd1' }).error({ err }, 'append failed');
  t.same(
    ring.entries().map((e) => [e.level, e.component, e.deviceId, e.code, e.msg]),
    [
      ['error', 'journal', 'd1', 'ECONN_JOURNAL_IO', 'append failed'],
      ['warn', 'uplink', undefined, undefined, `token ${REDACTED} refused`],
    ],
  );
  for (let i = 0; i < 10; i++) log.warn(`w${i}`);
  t.same(ring.entries().map((e) => e.msg), ['w9', 'w8', 'w7'], 'only the last 3');
  t.notMatch(JSON.stringify(ring.entries()), 'c2lnbmF0dXJl');
  log.flush();
  t.equal(c.lines().length, 13, 'every line still reaches the main destination');

  // pretty output feeds the ring the same way
  const ring2 = new LogRing(5);
  const c2 = capture();
  createLogger({ level: 'info', destination: c2.stream, format: 'pretty', ring: ring2 }).error(`x ${JWT}`);
  t.same(ring2.entries().map((e) => e.msg), [`x ${REDACTED}`]);
  t.notMatch((await lines(c2, 1))[0]!, 'c2lnbmF0dXJl');
});
