/**
 * A device token passed through the whole system — issued by `connector device
 * add`, used as the MQTT password (accepted and tampered), presented to the
 * HTTPS API for renewal and as a bad Bearer — never appears in the daemon's
 * log output, even at log level trace.
 */
import t from 'tap';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import https from 'node:https';
import mqtt from 'mqtt';
import { startDaemon, runCli, tempDir } from '../helpers/daemon.js';

function connect(port: number, ca: string, id: string, password: string): Promise<'connected' | string> {
  return new Promise((resolve) => {
    const c = mqtt.connect({ host: '127.0.0.1', port, protocol: 'mqtts', ca, clientId: id, username: id, password, reconnectPeriod: 0, connectTimeout: 10000 });
    const done = (r: string): void => {
      c.end(true);
      resolve(r);
    };
    c.once('connect', () => done('connected'));
    c.once('error', (err) => done(err.message));
    c.once('close', () => done('closed'));
  });
}

function post(port: number, ca: string, urlPath: string, bearer: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = https.request({ host: '127.0.0.1', port, path: urlPath, method: 'POST', ca, headers: { authorization: `Bearer ${bearer}`, 'content-type': 'application/json' } }, (res) => {
      let body = '';
      res.setEncoding('utf8').on('data', (d: string) => (body += d));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on('error', reject);
    req.end('{}');
  });
}

t.test('a device token never reaches the log output', async (t) => {
  const d = await startDaemon(t, { config: { log: { level: 'trace' } } });
  const out = tempDir(t);
  const add = await runCli(['device', 'add', 'meter-7', '--out', out, '-c', d.configFile]);
  t.equal(add.code, 0, add.stderr);
  const token = readFileSync(path.join(out, 'meter-7.token'), 'utf8').trim();
  const ca = readFileSync(path.join(out, 'ca.crt'), 'utf8');
  const [header, payload, signature] = token.split('.') as [string, string, string];
  const tampered = `${header}.${payload.slice(0, -2)}AA.${signature}`;

  t.equal(await connect(d.ports.mqtt_tls!, ca, 'meter-7', token), 'connected', 'the token is accepted as MQTT password');
  t.not(await connect(d.ports.mqtt_tls!, ca, 'meter-7', tampered), 'connected', 'a tampered token is refused');
  t.not(await connect(d.ports.mqtt_tls!, ca, 'other', token), 'connected', 'the token of another device is refused');

  const renew = await post(d.ports.api!, ca, '/api/token/renew', token);
  t.equal(renew.status, 200, renew.body);
  const renewed = (JSON.parse(renew.body) as { token: string }).token;
  const bad = await post(d.ports.api!, ca, '/api/token/renew', tampered);
  t.equal(bad.status, 401);
  t.notMatch(bad.body, signature, 'the error answer does not echo the token');

  await d.waitForLog((l) => l.msg !== undefined && JSON.stringify(l).includes('meter-7') && /renew/i.test(String(l.msg)), 10000, 'the renewal log line');
  const exit = await d.stop();
  t.equal(exit.code, 0);
  const { stdout, stderr } = d.output();
  t.ok(stdout.length > 1000, 'the daemon logged plenty at trace level');
  for (const [name, secret] of [
    ['token', token],
    ['token signature', signature],
    ['tampered token', tampered],
    ['renewed token', renewed],
    ['renewed signature', renewed.split('.')[2]!],
  ] as const) {
    t.notOk(stdout.includes(secret) || stderr.includes(secret), `${name} not in the log output`);
  }
  t.notMatch(stdout, /PRIVATE KEY/, 'no private key in the log output');
});
