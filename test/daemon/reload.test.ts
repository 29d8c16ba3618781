/**
 * Reload without downtime (SIGHUP and `connector reload`) on a real daemon child:
 * log level applied, invalid config rejected as a whole while the old one keeps
 * serving, restart-only keys logged and not applied, the server certificate
 * renewed before expiry and served to new handshakes.
 */
import t from 'tap';
import net from 'node:net';
import tls from 'node:tls';
import { readFileSync, writeFileSync } from 'node:fs';
import { parse, stringify } from 'yaml';
import { startDaemon, runCli, type DaemonHandle, type Json } from '../helpers/daemon.js';
import { adminRequest, adminSocketPath } from '../../daemon/admin.js';

const isMsg = (prefix: string) => (l: Json) => typeof l.msg === 'string' && l.msg.startsWith(prefix);

/** Rewrite the daemon's config file with a change applied to the parsed YAML. */
function editConfig(d: DaemonHandle, edit: (c: Json) => void): void {
  const c = parse(readFileSync(d.configFile, 'utf8')) as Json;
  edit(c);
  writeFileSync(d.configFile, stringify(c));
}

/** Wait for the next log line matching pred that comes after `from` lines. */
async function nextLog(d: DaemonHandle, from: number, pred: (l: Json) => boolean, what: string): Promise<Json> {
  return d.waitForLog((l) => d.logs.indexOf(l) >= from && pred(l), 15000, what);
}

async function metricsUp(port: number): Promise<number> {
  return (await fetch(`http://127.0.0.1:${port}/metrics`)).status;
}

/** A TLS handshake that fails on purpose (plain bytes to the TLS port): the API logs it at debug. */
function badHandshake(port: number): Promise<void> {
  return new Promise((resolve) => {
    const s = net.connect(port, '127.0.0.1', () => s.end('this is not TLS\r\n\r\n'));
    s.on('error', () => resolve());
    s.on('close', () => resolve());
  });
}

function servedCert(port: number): Promise<{ serial: string; validTo: string; san: string }> {
  return new Promise((resolve, reject) => {
    const s = tls.connect({ host: '127.0.0.1', port, rejectUnauthorized: false, servername: 'localhost' }, () => {
      const c = s.getPeerX509Certificate();
      s.destroy();
      if (!c) return reject(new Error('no server certificate'));
      resolve({ serial: c.serialNumber, validTo: c.validTo, san: c.subjectAltName ?? '' });
    });
    s.on('error', reject);
  });
}

t.test('log level: info -> debug is applied at once; debug -> warn silences info lines', async (t) => {
  const d = await startDaemon(t);
  const api = d.ports.api!;
  await badHandshake(api);
  await adminRequest(adminSocketPath(d.stateDir), 'status'); // a round trip after the handshake attempt
  t.notOk(
    d.logs.some((l) => l.msg === 'TLS handshake failed'),
    'at info, a failed handshake is not logged',
  );

  editConfig(d, (c) => ((c.log as Json).level = 'debug'));
  let mark = d.logs.length;
  d.proc.kill('SIGHUP');
  const changed = await nextLog(d, mark, isMsg('log level changed'), 'log level changed');
  t.equal(changed.new_level, 'debug');
  await nextLog(d, mark, isMsg('configuration reloaded'), 'reloaded');
  mark = d.logs.length;
  await badHandshake(api);
  const dbg = await nextLog(d, mark, (l) => l.msg === 'TLS handshake failed', 'a debug line after the change');
  t.equal(dbg.level, 'debug');

  // warn: the info line "configuration reloaded" of the next reload is not written, a warning is
  editConfig(d, (c) => {
    (c.log as Json).level = 'warn';
    (c.metrics as Json).port = 1; // restart-only key: produces a warning we can wait for
  });
  mark = d.logs.length;
  const r = await runCli(['reload', '-c', d.configFile]);
  t.equal(r.code, 0, r.stderr);
  await nextLog(d, mark, (l) => l.level === 'warn' && typeof l.msg === 'string' && l.msg.includes('needs a restart'), 'restart warning');
  await adminRequest(adminSocketPath(d.stateDir), 'status');
  t.notOk(
    d.logs.slice(mark).some((l) => l.level === 'info'),
    'no info lines after the level went to warn',
  );
  t.same(await d.stop(), { code: 0, signal: null });
});

t.test('an invalid new config is rejected as a whole; the running one keeps serving', async (t) => {
  const d = await startDaemon(t);
  const metrics = d.ports.metrics!;
  const before = readFileSync(d.configFile, 'utf8');
  // two problems: a bad enum and an unknown key; plus a valid change that must NOT be applied alone
  editConfig(d, (c) => {
    (c.log as Json).level = 'loud';
    (c.daemon as Json).shutdown_timeout_ms = 1234;
    (c as Json).surprise = true;
  });
  // `connector reload` reads the config to find the admin socket: it reports every problem itself
  const r = await runCli(['reload', '-c', d.configFile]);
  t.not(r.code, 0, `the CLI refuses an invalid config (exit ${r.code})`);
  t.match(r.stderr, /log\.level/);
  t.match(r.stderr, /surprise/);
  // SIGHUP (systemctl reload) reaches the daemon, which refuses the config as a whole
  const mark = d.logs.length;
  d.proc.kill('SIGHUP');
  const refused = await nextLog(d, mark, isMsg('reload refused'), 'reload refused');
  t.equal(refused.level, 'error');
  const problems = refused.problems as string[];
  t.ok(problems.some((p) => /log\.level/.test(p)), `log.level named: ${JSON.stringify(problems)}`);
  t.ok(problems.some((p) => /surprise/.test(p)), 'the unknown key named');
  t.notOk(d.logs.slice(mark).some(isMsg('configuration reloaded')), 'nothing applied');
  t.equal(await metricsUp(metrics), 200, 'metrics endpoint still answers');
  t.equal((await fetch(`http://127.0.0.1:${metrics}/readyz`)).status, 200, 'still ready');

  // a good config afterwards is applied normally
  writeFileSync(d.configFile, before);
  const mark2 = d.logs.length;
  d.proc.kill('SIGHUP');
  await nextLog(d, mark2, isMsg('configuration reloaded'), 'reloaded');
  t.same(await d.stop(), { code: 0, signal: null });
});

t.test('a port change is logged as needing a restart and not applied; other changes in the same file are', async (t) => {
  const d = await startDaemon(t);
  const metrics = d.ports.metrics!;
  const api = d.ports.api!;
  editConfig(d, (c) => {
    (c.metrics as Json).port = metrics === 65000 ? 65001 : 65000;
    ((c.api as Json) ?? {}).port = 1;
    (c.log as Json).level = 'debug';
  });
  const mark = d.logs.length;
  d.proc.kill('SIGHUP');
  const done = await nextLog(d, mark, isMsg('configuration reloaded'), 'reloaded');
  const needs = done.needs_restart as string[];
  t.ok(needs.some((k) => k.startsWith('metrics.port')), `metrics.port needs a restart: ${JSON.stringify(needs)}`);
  t.ok(needs.some((k) => k.startsWith('api.port')), 'api.port needs a restart');
  const warns = d.logs.slice(mark).filter((l) => l.level === 'warn' && typeof l.msg === 'string' && l.msg.includes('needs a restart'));
  t.equal(warns.length, 2, 'one warning per key');
  t.ok(d.logs.slice(mark).some(isMsg('log level changed')), 'the log level in the same file was applied');
  t.equal(await metricsUp(metrics), 200, 'the old metrics port still serves');
  const s = (await adminRequest(adminSocketPath(d.stateDir), 'status')) as { ports: Record<string, number> };
  t.equal(s.ports.metrics, metrics);
  t.equal(s.ports.api, api);
  t.same(await d.stop(), { code: 0, signal: null });
});

t.test('the server certificate is renewed before expiry on reload and served to new handshakes', async (t) => {
  const d = await startDaemon(t);
  const api = d.ports.api!;
  const first = await servedCert(api);
  const daysLeft = (Date.parse(first.validTo) - Date.now()) / 86400_000;
  t.ok(daysLeft > 80 && daysLeft < 91, `a fresh 90-day certificate (${daysLeft.toFixed(1)} days left)`);

  // renew_before_days larger than what is left: the certificate is "near expiry" now
  editConfig(d, (c) => {
    const identity = (c.identity ??= {}) as Json;
    identity.pki = { ...((identity.pki as Json) ?? {}), server_cert_renew_before_days: 100 };
  });
  const mark = d.logs.length;
  d.proc.kill('SIGHUP');
  const renewed = await nextLog(d, mark, isMsg('server certificate renewed'), 'server certificate renewed');
  t.equal(renewed.reason, 'near expiry');
  // the reload is logged once every component applied it (the API's TLS context swap included)
  const reloaded = await nextLog(d, mark, isMsg('configuration reloaded'), 'configuration reloaded');
  t.ok((reloaded.changes as string[]).some((c) => /^api: .*TLS context reloaded/.test(c)), 'the API reloaded its TLS context');
  const now = await servedCert(api);
  t.not(now.serial, first.serial, 'new handshakes get the renewed certificate');
  t.match(now.san, /IP Address:127\.0\.0\.1/);
  t.equal(d.proc.exitCode, null, 'no restart');

  // SAN change (identity.pki.server_names) also renews
  editConfig(d, (c) => (((c.identity as Json).pki as Json).server_names = ['localhost', '127.0.0.1', '::1', 'gw.site.test']));
  const mark2 = d.logs.length;
  d.proc.kill('SIGHUP');
  const renewed2 = await nextLog(d, mark2, (l) => isMsg('server certificate renewed')(l) && l.reason === 'server_names changed', 'renewed for the new names');
  t.ok(renewed2, 'renewed because server_names changed');
  await nextLog(d, mark2, isMsg('configuration reloaded'), 'configuration reloaded');
  const third = await servedCert(api);
  t.match(third.san, /DNS:gw\.site\.test/);
});

t.test('a live MQTT/TLS device session survives a server certificate renewal and a device CA rotation', async (t) => {
  const { default: mqtt } = await import('mqtt');
  const d = await startDaemon(t);
  const port = d.ports.mqtt_tls!;
  t.ok(port, 'the broker listens');
  const sock = adminSocketPath(d.stateDir);
  const dev = (await adminRequest(sock, 'device.add', { id: 'live-1' })) as { key: string; cert: string; ca: string };
  const client = mqtt.connect(`mqtts://127.0.0.1:${port}`, { key: dev.key, cert: dev.cert, ca: dev.ca, clientId: 'live-1', protocolVersion: 4, reconnectPeriod: 0, connectTimeout: 10000 });
  t.teardown(() => void client.end(true));
  let closed = 0;
  await new Promise<void>((resolve, reject) => {
    client.once('connect', () => resolve());
    client.once('error', reject);
  });
  client.on('close', () => closed++);
  const publish = (): Promise<void> =>
    new Promise((resolve, reject) => client.publish('devices/live-1/telemetry', 'x', { qos: 1 }, (err) => (err ? reject(err) : resolve())));
  await publish();
  const first = await servedCert(port);

  editConfig(d, (c) => {
    const identity = (c.identity ??= {}) as Json;
    identity.pki = { ...((identity.pki as Json) ?? {}), server_cert_renew_before_days: 100 };
  });
  const mark = d.logs.length;
  d.proc.kill('SIGHUP');
  await nextLog(d, mark, isMsg('server certificate renewed'), 'server certificate renewed');
  // the reload is logged once every component applied it (the broker's TLS context swap included)
  const reloaded = await nextLog(d, mark, isMsg('configuration reloaded'), 'configuration reloaded');
  // the broker swaps its context either on the PKI's renewal event or in its reload step, whichever reads the files
  // first (the other then finds nothing changed); both are done before 'configuration reloaded' is logged
  const byEvent = d.logs.slice(mark).some(isMsg('server certificate renewed by the local PKI; new TLS handshakes use it'));
  t.ok(byEvent || (reloaded.changes as string[]).some((c) => /^broker: .*TLS context reloaded/.test(c)), 'the broker reloaded its TLS context');
  const now = await servedCert(port);
  t.not(now.serial, first.serial, 'new MQTT/TLS handshakes get the renewed certificate');
  await publish();
  t.equal(closed, 0, 'the live session was not dropped by the renewal');
  t.equal(client.connected, true);

  const rot = await runCli(['ca', 'rotate', '-c', d.configFile]);
  t.equal(rot.code, 0, rot.stderr);
  await publish();
  t.equal(closed, 0, 'the live session was not dropped by the CA rotation');
  // a device certified by the new CA connects too (the server certificate is still the old CA's)
  const dev2 = (await adminRequest(sock, 'device.add', { id: 'live-2' })) as { key: string; cert: string };
  const c2 = mqtt.connect(`mqtts://127.0.0.1:${port}`, { key: dev2.key, cert: dev2.cert, ca: dev.ca, clientId: 'live-2', protocolVersion: 4, reconnectPeriod: 0, connectTimeout: 10000 });
  t.teardown(() => void c2.end(true));
  await new Promise<void>((resolve, reject) => {
    c2.once('connect', () => resolve());
    c2.once('error', reject);
    c2.once('close', () => reject(new Error('new-CA device refused')));
  });
  t.pass('a new-CA device connects');
  await client.endAsync();
  await c2.endAsync();
});
