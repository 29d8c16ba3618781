import t from 'tap';
import { writeFileSync, chmodSync, readFileSync, statSync, mkdirSync, readdirSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import https from 'node:https';
import type { IncomingMessage, ServerResponse } from 'node:http';
import path from 'node:path';
import { resolveSecret, ensureSecretFile } from '../../core/secrets.js';
import { createLogger } from '../../core/logger.js';
import { CloudTokenClient } from '../../bridge/cloud-token.js';
import { TestCA } from '../helpers/certs.js';
import { tempDir } from '../helpers/daemon.js';

t.test('env:, file: and credential: references', async (t) => {
  const dir = tempDir(t);
  t.equal(resolveSecret('env:S', { S: 'v1' }), 'v1');
  t.throws(() => resolveSecret('env:S', {}), { code: 'ECONN_CONFIG_SECRET', message: 'secret env:S: environment variable S is not set' });
  const f = path.join(dir, 's');
  writeFileSync(f, 'v2\n', { mode: 0o600 });
  t.equal(resolveSecret(`file:${f}`), 'v2', 'one trailing newline is dropped');
  chmodSync(f, 0o640);
  t.throws(() => resolveSecret(`file:${f}`), { message: /readable by group or others \(mode 0640\); run: chmod 600/ });
  writeFileSync(path.join(dir, 'empty'), '', { mode: 0o600 });
  t.throws(() => resolveSecret(`file:${path.join(dir, 'empty')}`), { message: /is empty/ });
  t.throws(() => resolveSecret(`file:${dir}`), { message: /not a regular file/ });
  const creds = path.join(dir, 'creds');
  mkdirSync(creds);
  writeFileSync(path.join(creds, 'cloud'), 'v3', { mode: 0o600 });
  t.equal(resolveSecret('credential:cloud', { CREDENTIALS_DIRECTORY: creds }), 'v3');
  t.throws(() => resolveSecret('credential:../s', { CREDENTIALS_DIRECTORY: creds }), { message: /must not contain "\/"/ });
  t.throws(() => resolveSecret('plain-secret'), { message: /must be given as env:NAME, file:\/path or credential:NAME, not in plain text/ });
  try {
    resolveSecret('hunter2');
  } catch (err) {
    t.notMatch((err as Error).message, 'hunter2', 'a plain-text value is not echoed');
  }
});

t.test('ensureSecretFile creates a 0600 random secret once and never overwrites', async (t) => {
  const f = path.join(tempDir(t), 'gen.secret');
  t.equal(ensureSecretFile(f), true);
  t.equal(statSync(f).mode & 0o777, 0o600);
  const v = readFileSync(f, 'utf8');
  t.ok(v.trim().length >= 40);
  t.equal(ensureSecretFile(f), false);
  t.equal(readFileSync(f, 'utf8'), v);
  t.equal(resolveSecret(`file:${f}`), v.trim());
});

t.test('credential: names what the unit needs when the credential or $CREDENTIALS_DIRECTORY is missing; binary files get a hint', async (t) => {
  const dir = tempDir(t);
  t.throws(() => resolveSecret('credential:cloud', {}), { message: /LoadCredential=cloud:\/path or LoadCredentialEncrypted=cloud:\/path\.cred/ });
  t.throws(() => resolveSecret('credential:cloud', { CREDENTIALS_DIRECTORY: dir }), { message: /no credential "cloud" in \$CREDENTIALS_DIRECTORY .*LoadCredentialEncrypted=cloud:/ });
  const bin = path.join(dir, 'sealed.cred');
  writeFileSync(bin, Buffer.from([0x11, 0x00, 0x42, 0x00, 0x01]), { mode: 0o600 });
  t.throws(() => resolveSecret(`file:${bin}`), { code: 'ECONN_CONFIG_SECRET', message: /binary data.*LoadCredentialEncrypted=NAME:/ });
});

const hasCreds = spawnSync('systemd-creds', ['--version'], { encoding: 'utf8' }).status === 0;

t.test(
  'an encrypted systemd credential (systemd-creds encrypt) reads back through credential:NAME once decrypted into $CREDENTIALS_DIRECTORY',
  { skip: hasCreds ? false : 'systemd-creds is not installed here (apt install systemd)' },
  async (t) => {
    // No systemd as PID 1 here, so systemd's own decryption at service start is emulated with
    // `systemd-creds decrypt` into a 0500 directory of 0400 files (what systemd gives a service).
    // --with-key=tpm2-absent seals with the null key: the round trip is real, and no host key
    // (/var/lib/systemd/credential.secret) is created on this machine.
    const dir = tempDir(t);
    const plain = path.join(dir, 'cloud-client.secret');
    writeFileSync(plain, 'cloud-secret-v1\n', { mode: 0o600 });
    const sealed = path.join(dir, 'cloud-client-secret.cred');
    const enc = spawnSync('systemd-creds', ['encrypt', '--name=cloud-client-secret', '--with-key=tpm2-absent', plain, sealed], { encoding: 'utf8' });
    t.equal(enc.status, 0, enc.stderr);
    t.notOk(readFileSync(sealed).includes(Buffer.from('cloud-secret-v1')), 'the sealed file does not hold the secret in clear');
    t.throws(() => resolveSecret(`file:${sealed}`), { message: /binary data|readable by group/ }, 'the sealed file itself is not a usable file: secret');
    const creds = path.join(dir, 'credentials');
    mkdirSync(creds, { mode: 0o700 });
    const dec = spawnSync('systemd-creds', ['decrypt', '--name=cloud-client-secret', sealed, path.join(creds, 'cloud-client-secret')], { encoding: 'utf8' });
    t.equal(dec.status, 0, dec.stderr);
    chmodSync(path.join(creds, 'cloud-client-secret'), 0o400);
    chmodSync(creds, 0o500);
    t.teardown(() => chmodSync(creds, 0o700));
    t.equal(resolveSecret('credential:cloud-client-secret', { CREDENTIALS_DIRECTORY: creds }), 'cloud-secret-v1');
    const wrongName = spawnSync('systemd-creds', ['decrypt', '--name=other-name', sealed, '-'], { encoding: 'utf8' });
    t.not(wrongName.status, 0, 'systemd refuses a credential loaded under another name than it was sealed for');
  },
);

t.test('the cloud refresh token: kept in memory only (a restart re-grants), never in a log line', async (t) => {
  // Decision (docs/operations.md, "Credential storage"): the connector does NOT persist the
  // refresh token. Its client secret (or password) can always do a full grant, so storing the
  // refresh token would only add one more secret to the disk; after a restart it re-grants.
  const ca = await TestCA.create();
  const srv = await ca.server();
  const dir = tempDir(t);
  const caFile = path.join(dir, 'ca.pem');
  writeFileSync(caFile, ca.cert);
  const SECRET = 'client-secret-never-logged-1';
  writeFileSync(path.join(dir, 'client.secret'), SECRET, { mode: 0o600 });
  let n = 0;
  const grants: string[] = [];
  const refreshTokens: string[] = [];
  const accessTokens: string[] = [];
  let refuseRefresh = false;
  const server = https.createServer({ cert: srv.cert, key: srv.key }, (req: IncomingMessage, res: ServerResponse) => {
    let body = '';
    req.setEncoding('utf8');
    req.on('data', (d: string) => (body += d));
    req.on('end', () => {
      const p = new URLSearchParams(body);
      grants.push(p.get('grant_type') ?? '');
      res.setHeader('content-type', 'application/json');
      if (p.get('grant_type') === 'refresh_token' && refuseRefresh) {
        res.statusCode = 400;
        res.end(JSON.stringify({ error: 'invalid_grant' }));
        return;
      }
      n++;
      const rt = `rt-SECRET-refresh-${n}-${'r'.repeat(20)}`;
      const at = `at-SECRET-access-${n}-${'a'.repeat(20)}`;
      refreshTokens.push(rt);
      accessTokens.push(at);
      res.end(JSON.stringify({ access_token: at, token_type: 'Bearer', expires_in: 3600, refresh_token: rt }));
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.teardown(() => new Promise<void>((resolve) => server.close(() => resolve())));
  const port = (server.address() as { port: number }).port;
  const lines: string[] = [];
  const logger = createLogger({ level: 'trace', destination: { write: (l: string) => void lines.push(l) } });
  const make = (): CloudTokenClient =>
    new CloudTokenClient({
      token: {
        url: `https://127.0.0.1:${port}/oauth/token`,
        grant: 'client_credentials',
        client_id: 'edge-1',
        client_secret: `file:${path.join(dir, 'client.secret')}`,
        username: '',
        scope: 'ingest',
        renew_before_s: 60,
      },
      uplink: { ca_file: caFile, cert_file: '', key_file: '', min_tls_version: 'TLSv1.2' },
      logger,
      retryMinMs: 1,
      retryMaxMs: 10,
    });
  const a = make();
  await a.getToken();
  await a.renew(); // with the refresh token
  refuseRefresh = true;
  await a.renew(); // refresh refused -> full grant
  await a.close();
  t.same(grants, ['client_credentials', 'refresh_token', 'refresh_token', 'client_credentials']);
  // "restart": a new client has no refresh token and does the full grant first
  const b = make();
  await b.getToken();
  await b.close();
  t.equal(grants.at(-1), 'client_credentials', 'after a restart the connector re-grants (the refresh token was not kept)');
  t.same(readdirSync(dir).sort(), ['ca.pem', 'client.secret'], 'nothing was written next to the secret (no stored refresh token)');
  const all = lines.join('');
  t.ok(lines.length > 3, `log lines captured (${lines.length})`);
  for (const rt of refreshTokens) t.notOk(all.includes(rt), 'a refresh token is never in a log line');
  for (const at of accessTokens) t.notOk(all.includes(at), 'an access token is never in a log line');
  t.notOk(all.includes(SECRET), 'the client secret is never in a log line');
});
