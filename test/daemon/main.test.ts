/**
 * The daemon as a real child process: start until SIGTERM/SIGINT, clear start-up
 * errors with documented exit codes, SIGHUP reload, forced shutdown, crashes.
 */
import t from 'tap';
import net from 'node:net';
import { chmodSync, existsSync, writeFileSync, readFileSync, statSync } from 'node:fs';
import path from 'node:path';
import { stringify, parse } from 'yaml';
import { startDaemon, spawnDaemon, tempDir, testConfig, writeConfig, type Json } from '../helpers/daemon.js';
import { adminRequest, adminSocketPath } from '../../daemon/admin.js';

async function occupyPort(t: { teardown(fn: () => unknown): void }): Promise<number> {
  const srv = net.createServer();
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  t.teardown(() => new Promise<void>((r) => srv.close(() => r())));
  return (srv.address() as net.AddressInfo).port;
}

t.test('start runs until SIGTERM and exits 0; the ready line reports bound ports', async (t) => {
  const d = await startDaemon(t);
  t.type(d.ports.metrics, 'number');
  t.ok(d.ports.metrics > 0);
  const st = statSync(d.stateDir);
  t.equal(st.mode & 0o777, 0o700, 'state dir is 0700');
  t.equal(statSync(adminSocketPath(d.stateDir)).mode & 0o777, 0o600, 'admin socket is 0600');
  const res = await fetch(`http://127.0.0.1:${d.ports.metrics}/readyz`);
  t.equal(res.status, 200);
  const exit = await d.stop('SIGTERM');
  t.same(exit, { code: 0, signal: null });
  t.ok(d.logs.some((l) => l.msg === 'stopped'));
  t.notOk(existsSync(adminSocketPath(d.stateDir)), 'admin socket removed on close');
});

t.test('SIGINT also shuts down gracefully', async (t) => {
  const d = await startDaemon(t);
  t.same(await d.stop('SIGINT'), { code: 0, signal: null });
});

t.test('invalid config: every error on stderr, exit 78, nothing started', async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'c.yaml');
  writeFileSync(file, stringify({ daemon: { state_dir: path.join(dir, 'state') }, broker: { listeners: { tls: { port: 99999 } } }, lgo: {} }));
  const d = spawnDaemon(t, { configFile: file });
  const exit = await d.exited;
  t.equal(exit.code, 78);
  const { stderr } = d.output();
  t.match(stderr, /c\.yaml:\d+:\d+ broker\.listeners\.tls\.port: out of range/);
  t.match(stderr, /c\.yaml:\d+:\d+ lgo: unknown key/);
  t.match(stderr, /nothing was started/);
  t.notMatch(stderr, /\n\s+at /, 'no stack trace');
  t.notOk(existsSync(path.join(dir, 'state')), 'state dir not created');
});

t.test('missing config file: exit 78 with a clear message', async (t) => {
  const dir = tempDir(t);
  const d = spawnDaemon(t, { configFile: path.join(dir, 'missing.yaml') });
  t.equal((await d.exited).code, 78);
  t.match(d.output().stderr, /missing\.yaml: file not found/);
});

t.test('a port already in use names the listener and the port, exit 73', async (t) => {
  const port = await occupyPort(t);
  const d = spawnDaemon(t, { config: { metrics: { port } } });
  const exit = await d.exited;
  t.equal(exit.code, 73);
  const { stderr } = d.output();
  t.match(stderr, new RegExp(`ECONN_LISTEN: metrics listener cannot bind 127\\.0\\.0\\.1:${port}: address already in use.*\\(metrics\\.port\\)`));
  t.notMatch(stderr, /\n\s+at /, 'no stack trace');
});

t.test('a state directory that cannot be created: exit 73', async (t) => {
  const dir = tempDir(t);
  const blocker = path.join(dir, 'not-a-dir');
  writeFileSync(blocker, 'x');
  const d = spawnDaemon(t, { dir, configFile: writeConfig(dir, testConfig(path.join(blocker, 'state'))) });
  t.equal((await d.exited).code, 73);
  t.match(d.output().stderr, /ECONN_STATE_DIR: state directory .*not-a-dir\/state cannot be created \(ENOTDIR\)/);
});

t.test('a state directory that is not writable: exit 73', { skip: process.getuid?.() !== 0 ? 'needs root to run the daemon as nobody' : false }, async (t) => {
  // root ignores permissions, so run the daemon as nobody against a root-owned 0700 state dir
  const dir = tempDir(t);
  chmodSync(dir, 0o755);
  const stateDir = path.join(dir, 'state');
  const cfg = testConfig(stateDir);
  const file = writeConfig(dir, cfg);
  chmodSync(file, 0o644);
  const { mkdirSync } = await import('node:fs');
  mkdirSync(stateDir, { mode: 0o700 });
  const d = spawnDaemon(t, { dir, configFile: file, uid: 65534, gid: 65534 });
  t.equal((await d.exited).code, 73);
  t.match(d.output().stderr, /ECONN_STATE_DIR: state directory .*state (is not writable|cannot be inspected) \((EACCES|EPERM)\)/);
});

t.test('a secret file readable by others: exit 78, file named, secret not shown', async (t) => {
  const dir = tempDir(t);
  const secret = path.join(dir, 'client.secret');
  writeFileSync(secret, 'do-not-print-me\n');
  chmodSync(secret, 0o644);
  const file = writeConfig(dir, testConfig(path.join(dir, 'state'), { bridge: { token: { client_secret: `file:${secret}` } } }));
  const d = spawnDaemon(t, { dir, configFile: file });
  t.equal((await d.exited).code, 78);
  const { stderr, stdout } = d.output();
  t.match(stderr, /bridge\.token\.client_secret: secret file:.*client\.secret: file .* is readable by group or others \(mode 0644\)/);
  t.notMatch(stderr + stdout, /do-not-print-me/);
});

t.test('SIGHUP reloads: log level applied, port change needs a restart, invalid config keeps the old one', async (t) => {
  const d = await startDaemon(t);
  const cfg = parse(readFileSync(d.configFile, 'utf8')) as Json;
  (cfg.log as Json).level = 'debug';
  (cfg.metrics as Json).port = 1; // x-restart: kept
  writeFileSync(d.configFile, stringify(cfg));
  d.proc.kill('SIGHUP');
  const line = await d.waitForLog((l) => typeof l.msg === 'string' && l.msg.startsWith('configuration reloaded'), 10000, 'reload line');
  t.match(line.needs_restart, [/metrics\.port/]);
  await d.waitForLog((l) => l.msg === 'log level changed' && l.new_level === 'debug');
  // the metrics port is unchanged and still serving
  t.equal((await fetch(`http://127.0.0.1:${d.ports.metrics}/healthz`)).status, 200);

  writeFileSync(d.configFile, 'log: {level: [\n');
  d.proc.kill('SIGHUP');
  const refused = await d.waitForLog((l) => typeof l.msg === 'string' && l.msg.startsWith('reload refused'), 10000, 'reload refused');
  t.match((refused.problems as string[])[0], /YAML syntax error/);
  t.equal((await fetch(`http://127.0.0.1:${d.ports.metrics}/healthz`)).status, 200, 'still serving');
  t.same(await d.stop(), { code: 0, signal: null });
});

t.test('`connector reload` over the admin socket does the same as SIGHUP', async (t) => {
  const d = await startDaemon(t);
  t.same(await adminRequest(adminSocketPath(d.stateDir), 'reload'), { ok: true });
  await d.waitForLog((l) => typeof l.msg === 'string' && l.msg.startsWith('configuration reloaded'));
});

t.test('a stuck shutdown is forced after shutdown_timeout_ms: exit 1', async (t) => {
  const d = await startDaemon(t, { config: { daemon: { shutdown_timeout_ms: 300 } }, hooks: { hangClose: true } });
  const exit = await d.stop('SIGTERM');
  t.equal(exit.code, 1);
  const forced = d.logs.find((l) => l.msg === 'shutdown was forced');
  t.match((forced?.err as Json | undefined)?.code, 'ECONN_SHUTDOWN_TIMEOUT');
});

t.test('a second signal forces the exit at once', async (t) => {
  const d = await startDaemon(t, { config: { daemon: { shutdown_timeout_ms: 600000 } }, hooks: { hangClose: true } });
  d.proc.kill('SIGTERM');
  await d.waitForLog((l) => l.msg === 'shutting down');
  d.proc.kill('SIGTERM');
  const exit = await d.exited;
  t.equal(exit.code, 1);
  t.ok(d.logs.some((l) => l.msg === 'second signal: forcing exit'));
});

t.test('an uncaught exception is logged and exits 70 (systemd restarts us)', async (t) => {
  const d = await startDaemon(t, { hooks: true });
  await adminRequest(adminSocketPath(d.stateDir), 'test.crash');
  const exit = await d.exited;
  t.equal(exit.code, 70);
  const fatal = d.logs.find((l) => l.level === 'fatal');
  t.match(fatal?.msg, /uncaught exception/);
});

t.test('two daemons on one state directory: the second refuses to start', async (t) => {
  const d = await startDaemon(t);
  const second = spawnDaemon(t, { dir: d.dir, configFile: d.configFile });
  t.equal((await second.exited).code, 73);
  t.match(second.output().stderr, /admin socket .* is in use/);
  t.equal((await fetch(`http://127.0.0.1:${d.ports.metrics}/healthz`)).status, 200, 'the first keeps running');
});
