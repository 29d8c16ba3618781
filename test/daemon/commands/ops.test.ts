/**
 * `connector status`, `connector ca rotate|retire`, `connector keys rotate` against a
 * real daemon child process.
 */
import t from 'tap';
import https from 'node:https';
import { X509Certificate } from 'node:crypto';
import { startDaemon, runCli, tempDir, testConfig, writeConfig, type Json } from '../../helpers/daemon.js';
import { addDevice, mqttConnect, startSite } from '../../helpers/fleet.js';
import { adminRequest, adminSocketPath } from '../../../daemon/admin.js';
import { formatStatus } from '../../../daemon/commands/ops.js';
import { normalizeSerial } from '../../../identity/registry.js';
import type { DaemonStatus } from '../../../daemon/status.js';

interface Bundle {
  id: string;
  key: string;
  cert: string;
  ca: string;
  token: string;
}

/** GET /api/devices/ID/status over HTTPS with a client certificate or a bearer token. */
function deviceStatus(port: number, id: string, auth: { cert?: string; key?: string; token?: string }, ca: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const req = https.request(
      {
        host: '127.0.0.1',
        port,
        path: `/api/devices/${id}/status`,
        method: 'GET',
        ca,
        cert: auth.cert,
        key: auth.key,
        headers: auth.token ? { authorization: `Bearer ${auth.token}` } : {},
        agent: false,
      },
      (res) => {
        res.resume();
        res.on('end', () => resolve(res.statusCode ?? 0));
      },
    );
    req.on('error', reject);
    req.end();
  });
}

t.test('connector status: human table and --json from a running daemon', async (t) => {
  const d = await startDaemon(t);
  const cfg = ['-c', d.configFile];
  const human = await runCli(['status', ...cfg]);
  t.equal(human.code, 0, human.stderr);
  t.match(human.stdout, /^daemon +edge-connector \S+, pid \d+, up \S+, READY$/m);
  t.match(human.stdout, new RegExp(`^listeners .*metrics:${d.ports.metrics}`, 'm'));
  t.match(human.stdout, /^journal +off \(bridge\.enabled: false\)$/m);
  t.match(human.stdout, /^uplink +off$/m);
  t.match(human.stdout, /^expiries +server certificate +\S+ +\(in \d+d/m, 'server certificate expiry');
  t.match(human.stdout, /device CA/);

  const json = await runCli(['status', '--json', ...cfg]);
  t.equal(json.code, 0);
  const s = JSON.parse(json.stdout) as DaemonStatus;
  t.equal(s.pid, d.proc.pid);
  t.equal(s.ready.ready, true);
  t.equal(s.summary.listeners.metrics, d.ports.metrics);
  t.equal(s.summary.uplink, null);
  t.ok(s.summary.expiries.some((e) => e.what === 'server certificate' && e.seconds_left > 80 * 86400), 'server cert ~90 days');
  t.ok(s.components.pki, 'component status included');

  // a device certificate shows up in the expiries
  await adminRequest(adminSocketPath(d.stateDir), 'device.add', { id: 'sensor-1' });
  const after = JSON.parse((await runCli(['status', '--json', ...cfg])).stdout) as DaemonStatus;
  t.equal(after.device_certificates?.count, 1);
  t.equal(after.device_certificates?.soonest[0]?.device_id, 'sensor-1');
  t.match((await runCli(['status', ...cfg])).stdout, /device sensor-1 certificate/);
});

t.test('connector status with the bridge on: journal backlog and uplink state', async (t) => {
  const d = await startDaemon(t, {
    config: {
      bridge: {
        enabled: true,
        uplink: { url: 'wss://127.0.0.1:1/ingest', reconnect_min_ms: 1000 },
        token: { url: 'https://127.0.0.1:1/oauth/token', client_secret: 'file:./state/cloud-client.secret' },
      },
    },
  });
  const r = await runCli(['status', '--json', '-c', d.configFile]);
  const s = JSON.parse(r.stdout) as DaemonStatus;
  t.ok(s.summary.journal, 'journal facts');
  t.equal(s.summary.journal?.messages, 0);
  t.equal(s.summary.journal?.bytes, 0);
  t.ok(s.summary.uplink, 'uplink facts');
  t.not(s.summary.uplink?.state, 'connected', `uplink state ${s.summary.uplink?.state} (the cloud does not exist)`);
  t.equal(s.summary.uplink?.last_ack_age_s, null);
  // nothing was acknowledged: 0 msg/s once the status page sampled an interval, unknown (null, "—") before
  t.ok(s.summary.journal?.drain_rate_msg_s === null || s.summary.journal?.drain_rate_msg_s === 0, `drain rate ${s.summary.journal?.drain_rate_msg_s}`);
  const human = formatStatus(s);
  t.match(human, new RegExp(`^journal +backlog 0 messages \\(0 B\\), nothing waiting, draining ${s.summary.journal?.drain_rate_msg_s === null ? '—' : '0\\.0 msg/s'}$`, 'm'));
  t.match(human, /^uplink +\S+, no ack yet, \d+ reconnects$/m);
});

t.test('connector status with messages acknowledged by the cloud: the drain rate of the status page, text and --json', async (t) => {
  const { d } = await startSite(t, tempDir(t));
  const dev = await addDevice(d, 'sensor-1');
  const c = await mqttConnect(d, dev);
  t.teardown(() => c.end(true));
  const N = 50;
  await Promise.all(Array.from({ length: N }, (_, i) => c.publishAsync(`devices/sensor-1/telemetry`, `m${i}`, { qos: 1 })));
  // polling on purpose: the rate is a sample of the status page's timer (every 5 s) in the daemon child
  // process; no event reaches the test when it changes. Bounded in time.
  const sock = adminSocketPath(d.stateDir);
  const until = Date.now() + 30_000;
  let s = (await adminRequest(sock, 'status')) as DaemonStatus;
  while (!(s.summary.journal?.drain_rate_msg_s && s.summary.journal.messages === 0) && Date.now() < until) {
    await new Promise((r) => setTimeout(r, 250));
    s = (await adminRequest(sock, 'status')) as DaemonStatus;
  }
  const rate = s.summary.journal?.drain_rate_msg_s;
  t.ok(typeof rate === 'number' && rate > 0, `drain rate ${rate} msg/s after ${N} messages were acknowledged`);
  // the status page shows the same figure (one computation)
  const page = (await (await fetch(`http://127.0.0.1:${d.ports.metrics}/status.json`)).json()) as { journal: { drain_per_s: number | null } };
  t.ok(typeof page.journal.drain_per_s === 'number' && page.journal.drain_per_s > 0, `status page drain rate ${page.journal.drain_per_s}`);

  const json = JSON.parse((await runCli(['status', '--json', '-c', d.configFile])).stdout) as DaemonStatus;
  t.ok(typeof json.summary.journal?.drain_rate_msg_s === 'number' && json.summary.journal.drain_rate_msg_s > 0, '--json: summary.journal.drain_rate_msg_s');
  const human = await runCli(['status', '-c', d.configFile]);
  t.match(human.stdout, /^journal +backlog \d+ messages \([^)]*\), [^,]+, draining (?!0\.0 )\d+(\.\d)? msg\/s$/m, 'text: draining N msg/s');
});

t.test('connector status without a daemon: exit 69 and what to do', async (t) => {
  const dir = tempDir(t);
  const file = writeConfig(dir, testConfig(`${dir}/state`));
  const r = await runCli(['status', '-c', file]);
  t.equal(r.code, 69);
  t.match(r.stderr, /daemon is not running/);
});

t.test('formatStatus: not ready reasons, expired certificates, watchdog', async (t) => {
  const s: DaemonStatus = {
    pid: 1,
    version: '0.0.0',
    uptime_s: 90061,
    config: '/etc/edge-connector/connector.yaml',
    state_dir: '/var/lib/edge-connector',
    ready: { ready: false, reasons: ['uplink: oldest unacknowledged message is 300 s old'] },
    ports: {},
    summary: {
      devices_connected: 12,
      devices_registered: 40,
      listeners: { mqtt_tls: 8883 },
      journal: { messages: 5, bytes: 5 * 1024 * 1024, oldest_unacked_age_s: 300, drain_rate_msg_s: 15234.5 },
      uplink: { state: 'connecting', last_ack_age_s: 400, reconnects: 7 },
      expiries: [{ what: 'server certificate', expires_at: '2020-01-01T00:00:00.000Z', seconds_left: -86400 * 3 }],
    },
    watchdog: { enabled: true, interval_ms: 15000, lag_threshold_ms: 7500, pings: 10, withheld: 1, last_lag_ms: 2 },
    components: {},
  };
  const out = formatStatus(s);
  t.match(out, /up 1d1h, NOT READY/);
  t.match(out, /not ready: uplink: oldest unacknowledged message is 300 s old/);
  t.match(out, /12 connected, 40 registered/);
  t.match(out, /backlog 5 messages \(5\.0 MiB\), oldest unacknowledged 5m old, draining 15235 msg\/s$/m);
  const slow = formatStatus({ ...s, summary: { ...s.summary, journal: { ...s.summary.journal!, drain_rate_msg_s: 2.5 } } });
  t.match(slow, /, draining 2\.5 msg\/s$/m, 'under 10 msg/s: one decimal');
  const unknown = formatStatus({ ...s, summary: { ...s.summary, journal: { ...s.summary.journal!, drain_rate_msg_s: null } } });
  t.match(unknown, /, draining —$/m, 'unknown drain rate: a dash, never 0');
  t.match(out, /connecting, last ack 6m ago, 7 reconnects/);
  t.match(out, /EXPIRED 3d ago/);
  t.match(out, /ping every 15s, 10 sent, 1 withheld/);
});

t.test('connector ca rotate: certificates from the old and the new CA both work; connector keys rotate keeps old tokens valid', async (t) => {
  const d = await startDaemon(t);
  const sock = adminSocketPath(d.stateDir);
  const cfg = ['-c', d.configFile];
  const before = (await adminRequest(sock, 'device.add', { id: 'old-ca-dev' })) as Bundle;
  t.equal(await deviceStatus(d.ports.api!, 'old-ca-dev', { cert: before.cert, key: before.key }, before.ca), 200, 'device cert works before the rotation');
  const oldCaSerial = normalizeSerial(new X509Certificate(before.ca).serialNumber);

  const rot = await runCli(['ca', 'rotate', '--json', ...cfg]);
  t.equal(rot.code, 0, rot.stderr);
  const r = JSON.parse(rot.stdout) as { serial: string; trusted: { serial: string }[]; reloaded: string[] };
  t.not(r.serial, oldCaSerial, 'a new CA');
  t.same(
    r.trusted.map((x) => x.serial),
    [r.serial, oldCaSerial],
    'both CAs are trusted, the new one first',
  );
  t.ok(r.reloaded.some((l) => /api/.test(l)), `TLS contexts reloaded: ${JSON.stringify(r.reloaded)}`);

  const after = (await adminRequest(sock, 'device.add', { id: 'new-ca-dev' })) as Bundle;
  t.equal(new X509Certificate(after.cert).checkIssued(new X509Certificate(after.ca)), true, 'new devices get certificates from the new CA');
  t.equal(normalizeSerial(new X509Certificate(after.ca).serialNumber), r.serial);
  // the server certificate is still the old CA's until its normal renewal: verify it with the old CA
  t.equal(await deviceStatus(d.ports.api!, 'new-ca-dev', { cert: after.cert, key: after.key }, before.ca), 200, 'a new-CA device certificate is accepted');
  t.equal(await deviceStatus(d.ports.api!, 'old-ca-dev', { cert: before.cert, key: before.key }, before.ca), 200, 'an old-CA device certificate is still accepted');

  const human = await runCli(['ca', 'rotate', ...cfg]);
  t.equal(human.code, 0, human.stderr);
  t.match(human.stdout, /^new device CA: serial [0-9a-f]+, valid until /m);
  t.match(human.stdout, /trusted for device certificates now:\n( {2}[0-9a-f]+ +until .*\n){3}/, 'three CAs after two rotations');

  // JWT key rotation: the previous key keeps verifying tokens it signed
  const status0 = (await adminRequest(sock, 'status')) as { components: { tokens: { kid: string } } };
  const keys = await runCli(['keys', 'rotate', ...cfg]);
  t.equal(keys.code, 0, keys.stderr);
  const kid = /^new signing key: kid (\S+)$/m.exec(keys.stdout)?.[1];
  t.ok(kid, keys.stdout);
  t.not(kid, status0.components.tokens.kid);
  const status1 = (await adminRequest(sock, 'status')) as { components: { tokens: { kid: string; keys: number } } };
  t.equal(status1.components.tokens.kid, kid);
  t.ok(status1.components.tokens.keys >= 2, 'the previous key is kept');
  t.equal(await deviceStatus(d.ports.api!, 'old-ca-dev', { token: before.token }, before.ca), 200, 'a token signed before the rotation is still accepted');
  const fresh = (await adminRequest(sock, 'device.token', { id: 'old-ca-dev' })) as { token: string };
  const header = JSON.parse(Buffer.from(fresh.token.split('.')[0]!, 'base64url').toString()) as Json;
  t.equal(header.kid, kid, 'new tokens are signed with the new key');
  t.equal(await deviceStatus(d.ports.api!, 'old-ca-dev', { token: fresh.token }, before.ca), 200);

  // during the rotation devices are handed a bundle of every trusted CA, current first
  const caPems = (pem: string): string[] => pem.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? [];
  t.equal(caPems(after.ca).length, 2, 'device.add during the rotation: ca bundle of both CAs');
  const late = (await adminRequest(sock, 'device.add', { id: 'late-dev' })) as Bundle;
  t.equal(caPems(late.ca).length, 3, 'after two rotations: all three CAs');
  t.equal(await deviceStatus(d.ports.api!, 'late-dev', { cert: late.cert, key: late.key }, late.ca), 200, 'the bundle verifies the server');

  // connector ca retire: only the newest CA is trusted and issues the server certificate
  const ret = await runCli(['ca', 'retire', '--json', ...cfg]);
  t.equal(ret.code, 0, ret.stderr);
  const rr = JSON.parse(ret.stdout) as { serial: string; retired: string[]; trusted: { serial: string }[]; reloaded: string[] };
  t.equal(rr.retired.length, 2, 'both previous CAs retired');
  t.ok(rr.retired.includes(oldCaSerial));
  t.same(rr.trusted.map((x) => x.serial), [rr.serial], 'only the current CA is trusted');
  t.ok(rr.reloaded.some((l) => /api/.test(l)), `TLS contexts reloaded: ${JSON.stringify(rr.reloaded)}`);
  const newest = caPems(late.ca)[0]!;
  t.equal(await deviceStatus(d.ports.api!, 'late-dev', { cert: late.cert, key: late.key }, newest), 200, 'the server certificate now verifies with the newest CA alone');
  await t.rejects(deviceStatus(d.ports.api!, 'old-ca-dev', { token: fresh.token }, before.ca), 'the old CA alone no longer verifies the server');
  const oldCert = await deviceStatus(d.ports.api!, 'old-ca-dev', { cert: before.cert, key: before.key }, newest).catch(() => 0);
  t.not(oldCert, 200, 'an old-CA device certificate is no longer accepted');
  const again = await runCli(['ca', 'retire', ...cfg]);
  t.equal(again.code, 0, again.stderr);
  t.match(again.stdout, /^no CA rotation to retire/m);
});

t.test('ca rotate / keys rotate without a daemon: exit 69', async (t) => {
  const dir = tempDir(t);
  const file = writeConfig(dir, testConfig(`${dir}/state`));
  t.equal((await runCli(['ca', 'rotate', '-c', file])).code, 69);
  t.equal((await runCli(['ca', 'retire', '-c', file])).code, 69);
  t.equal((await runCli(['keys', 'rotate', '-c', file])).code, 69);
});
