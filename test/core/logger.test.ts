import t from 'tap';
import { Writable } from 'node:stream';
import { createLogger, redactValue, redactString, REDACTED } from '../../core/logger.js';

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
