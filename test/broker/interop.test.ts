/**
 * Interop: the broker exercised by clients nobody on the team wrote — Debian's
 * mosquitto_pub / mosquitto_sub 2.0 (mTLS with --cafile/--cert/--key, JWT as
 * -u ID -P TOKEN) — next to mqtt.js. No WebSocket here: mosquitto 2.0 clients have none.
 */
import t from 'tap';
import path from 'node:path';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { brokerFixture, waitFor, type BrokerFixture, type Device } from '../helpers/broker.js';
import { TestCA } from '../helpers/certs.js';
import type { TestLike } from '../helpers/daemon.js';

const have = spawnSync('mosquitto_pub', ['--help']).status !== null;
const haveStdbuf = spawnSync('stdbuf', ['--version']).status === 0;

interface Proc {
  child: ChildProcess;
  out: string;
  err: string;
  exit: Promise<number | null>;
}

function run(t: TestLike, cmd: string, args: string[]): Proc {
  // line-buffered stdout (mosquitto_sub prints with stdio, fully buffered into a pipe)
  const child = haveStdbuf ? spawn('stdbuf', ['-oL', '-eL', cmd, ...args], { stdio: ['ignore', 'pipe', 'pipe'] }) : spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  const p: Proc = { child, out: '', err: '', exit: Promise.resolve(null) };
  child.stdout!.on('data', (b: Buffer) => (p.out += b.toString()));
  child.stderr!.on('data', (b: Buffer) => (p.err += b.toString()));
  p.exit = new Promise((resolve) => child.once('close', (code) => resolve(code)));
  t.teardown(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  });
  return p;
}

/** Wait for exit, bounded; kills the process on timeout. */
async function exited(p: Proc, ms = 15_000): Promise<number | null> {
  let timer: NodeJS.Timeout | undefined;
  const r = await Promise.race([p.exit, new Promise<'timeout'>((res) => (timer = setTimeout(() => res('timeout'), ms)))]);
  clearTimeout(timer);
  if (r === 'timeout') {
    p.child.kill('SIGKILL');
    throw new Error(`process did not exit within ${ms} ms; stdout: ${p.out} stderr: ${p.err}`);
  }
  return r;
}

function files(fx: BrokerFixture, d: { id: string; cert: string; key: string }): { ca: string; cert: string; key: string } {
  const ca = path.join(fx.dir, 'ca.pem');
  writeFileSync(ca, fx.ca);
  const cert = path.join(fx.dir, `${d.id}.crt`);
  const key = path.join(fx.dir, `${d.id}.key`);
  writeFileSync(cert, d.cert);
  writeFileSync(key, d.key, { mode: 0o600 });
  return { ca, cert, key };
}

const tlsArgs = (fx: BrokerFixture, f: { ca: string; cert?: string; key?: string }, id: string): string[] => [
  '-h',
  '127.0.0.1',
  '-p',
  String(fx.port('tls')),
  '--cafile',
  f.ca,
  ...(f.cert && f.key ? ['--cert', f.cert, '--key', f.key] : []),
  '-i',
  id,
  '-V',
  'mqttv311',
];

const tokenArgs = (fx: BrokerFixture, d: Device, token = d.token): string[] => [
  '-h',
  '127.0.0.1',
  '-p',
  String(fx.port('tls')),
  '--cafile',
  path.join(fx.dir, 'ca.pem'),
  '-i',
  d.id,
  '-u',
  d.id,
  '-P',
  token,
  '-V',
  'mqttv311',
];

/** A local anonymous mosquitto_sub on `filter`, resolved once its SUBACK arrived. */
async function localSub(t: TestLike, fx: BrokerFixture, filter: string): Promise<Proc> {
  const p = run(t, 'mosquitto_sub', ['-h', '127.0.0.1', '-p', String(fx.port('local')), '-i', 'watcher', '-t', filter, '-q', '1', '-v', '-d', '-V', 'mqttv311']);
  await waitFor(() => p.out.includes('SUBACK'), 10_000, 'watcher SUBACK');
  return p;
}

t.test('mosquitto clients against the broker', { skip: have ? false : 'mosquitto-clients not installed' }, async (t) => {
  const other = await TestCA.create();
  const fx = await brokerFixture(t, { overrides: { broker: { listeners: { local: { enabled: true } } } } });
  const a = await fx.addDevice('dev-a');
  const b = await fx.addDevice('dev-b');
  const c = await fx.addDevice('dev-c');
  const fa = files(fx, a);
  const fb = files(fx, b);
  const fc = files(fx, c);
  const foreign = await other.client({ cn: 'dev-a' });
  const ff = files(fx, { id: 'foreign', cert: foreign.cert, key: foreign.key });
  const watcher = await localSub(t, fx, 'devices/#');

  t.test('mosquitto_pub with a client certificate (mTLS)', async (t) => {
    const p = run(t, 'mosquitto_pub', [...tlsArgs(fx, fa, 'dev-a'), '-t', 'devices/dev-a/telemetry', '-m', 'mtls-hello', '-q', '1']);
    t.equal(await exited(p), 0, `exit 0 (${p.err.trim()})`);
    await waitFor(() => watcher.out.includes('devices/dev-a/telemetry mtls-hello'), 10_000, 'delivery');
  });

  t.test('mosquitto_pub with a JWT as password', async (t) => {
    const p = run(t, 'mosquitto_pub', [...tokenArgs(fx, b), '-t', 'devices/dev-b/telemetry', '-m', 'jwt-hello', '-q', '1']);
    t.equal(await exited(p), 0, `exit 0 (${p.err.trim()})`);
    await waitFor(() => watcher.out.includes('devices/dev-b/telemetry jwt-hello'), 10_000, 'delivery');
  });

  t.test('refused: bad token, token of another device, no credentials, foreign CA', async (t) => {
    const bad = run(t, 'mosquitto_pub', [...tokenArgs(fx, a, a.token.slice(0, -4) + 'AAAA'), '-t', 'devices/dev-a/x', '-m', 'x']);
    t.not(await exited(bad), 0, 'tampered token: non-zero exit');
    t.match(bad.err, /bad user name or password/i, 'CONNACK 4');
    const swap = run(t, 'mosquitto_pub', [...tokenArgs(fx, b, a.token), '-t', 'devices/dev-b/x', '-m', 'x']);
    t.not(await exited(swap), 0);
    t.match(swap.err, /bad user name or password/i, "A's token as B: CONNACK 4");
    const none = run(t, 'mosquitto_pub', [...tlsArgs(fx, { ca: fa.ca }, 'dev-a'), '-t', 'devices/dev-a/x', '-m', 'x']);
    t.not(await exited(none), 0);
    t.match(none.err, /bad user name or password/i, 'no credentials: CONNACK 4');
    const foreignCa = run(t, 'mosquitto_pub', [...tlsArgs(fx, { ca: fa.ca, cert: ff.cert, key: ff.key }, 'dev-a'), '-t', 'devices/dev-a/x', '-m', 'x']);
    t.not(await exited(foreignCa), 0);
    t.match(foreignCa.err, /bad user name or password/i, 'certificate from another CA: CONNACK 4');
    const wrongId = run(t, 'mosquitto_pub', [...tlsArgs(fx, fa, 'dev-b'), '-t', 'devices/dev-a/x', '-m', 'x']);
    t.not(await exited(wrongId), 0);
    t.match(wrongId.err, /identifier rejected/i, 'client id != device id: CONNACK 2');
    t.notMatch(watcher.out, /devices\/dev-a\/x /, 'nothing delivered');
  });

  t.test("device A cannot publish to B's topics or its own commands; cannot subscribe to B's", async (t) => {
    const intoB = run(t, 'mosquitto_pub', [...tlsArgs(fx, fa, 'dev-a'), '-t', 'devices/dev-b/telemetry', '-m', 'evil', '-q', '1']);
    t.not(await exited(intoB), 0, 'QoS 1 publish into B: connection closed, no PUBACK');
    const cmd = run(t, 'mosquitto_pub', [...tlsArgs(fx, fa, 'dev-a'), '-t', 'devices/dev-a/commands/x', '-m', 'evil', '-q', '1']);
    t.not(await exited(cmd), 0, 'publish to its own commands topic: closed');
    const subB = run(t, 'mosquitto_sub', [...tlsArgs(fx, fa, 'dev-a'), '-t', 'devices/dev-b/#', '-q', '1', '-E', '-d']);
    await exited(subB);
    t.match(subB.out + subB.err, /SUBACK|denied/i);
    t.comment(JSON.stringify(subB.out + subB.err));
    t.match(subB.out + subB.err, /denied|128|0x80/i, 'SUBACK refuses the filter');
    // marker from B after A's attempts: everything before it was processed
    const mark = run(t, 'mosquitto_pub', [...tlsArgs(fx, fb, 'dev-b'), '-t', 'devices/dev-b/marker', '-m', 'm', '-q', '1']);
    t.equal(await exited(mark), 0);
    await waitFor(() => watcher.out.includes('devices/dev-b/marker m'), 10_000, 'marker');
    t.notMatch(watcher.out, /evil/, "A's forbidden publishes were not delivered");
  });

  t.test('mosquitto_sub receives a command and acknowledges it; revocation drops it', async (t) => {
    const sub = run(t, 'mosquitto_sub', [...tlsArgs(fx, fc, 'dev-c'), '-t', 'devices/dev-c/commands/#', '-q', '1', '-v', '-d']);
    await waitFor(() => sub.out.includes('SUBACK'), 10_000, 'device SUBACK');
    await waitFor(() => fx.broker.isConnected('dev-c'), 5000, 'registered');
    const r = await fx.broker.publishCommand('dev-c', 'reboot', Buffer.from('now'), 10_000);
    t.same(r, { delivered: true }, 'delivered: PUBACK from mosquitto_sub');
    await waitFor(() => sub.out.includes('devices/dev-c/commands/reboot now'), 5000, 'printed');
    await fx.registry.revoke('dev-c');
    const code = await exited(sub, 20_000);
    t.not(code, 0, 'mosquitto_sub ends: dropped, and its reconnect is refused');
  });
});
