/**
 * Metrics and readiness on a real daemon child: every fact the operations issue
 * lists is exported (or marked as a todo of the component that owns it), values
 * follow what happens, and /readyz turns 503 when the uplink backlog goes stale.
 */
import t from 'tap';
import { EventEmitter } from 'node:events';
import { Registry, Gauge } from 'prom-client';
import { startDaemon, uploadText, type AdminBundle, type DaemonHandle } from '../helpers/daemon.js';
import { adminRequest, adminSocketPath } from '../../daemon/admin.js';
import { DaemonMetrics } from '../../daemon/metrics.js';



/** Parse the Prometheus text format into name{labels} -> value. */
async function scrape(d: DaemonHandle): Promise<Map<string, number>> {
  const text = await (await fetch(`http://127.0.0.1:${d.ports.metrics}/metrics`)).text();
  const out = new Map<string, number>();
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const i = line.lastIndexOf(' ');
    out.set(line.slice(0, i), Number(line.slice(i + 1)));
  }
  return out;
}
const has = (m: Map<string, number>, name: string): boolean => [...m.keys()].some((k) => k === name || k.startsWith(`${name}{`));
const value = (m: Map<string, number>, key: string): number | undefined => m.get(key);

t.test('metrics cover the operations list; values follow events; /readyz judges the uplink by ack age', async (t) => {
  const d = await startDaemon(t, {
    config: {
      bridge: {
        enabled: true,
        uplink: { url: 'wss://127.0.0.1:1/ingest', reconnect_min_ms: 1000 },
        token: { url: 'https://127.0.0.1:1/oauth/token', client_secret: 'file:./state/cloud-client.secret' },
      },
      metrics: { uplink_stale_after_s: 1 },
    },
  });
  const sock = adminSocketPath(d.stateDir);
  const dev = (await adminRequest(sock, 'device.add', { id: 'meter-1' })) as AdminBundle;
  t.equal(await uploadText(d.ports.api!, dev, 'hello'), 202, 'upload accepted into the journal');
  const acceptedAt = Date.now(); // the message was journaled before the 202

  // one device session, one refused connection (client id is not the device id)
  const { default: mqtt } = await import('mqtt');
  const full = dev as AdminBundle & { key: string; cert: string };
  const ok = mqtt.connect(`mqtts://127.0.0.1:${d.ports.mqtt_tls}`, { key: full.key, cert: full.cert, ca: full.ca, clientId: 'meter-1', protocolVersion: 4, reconnectPeriod: 0 });
  t.teardown(() => void ok.end(true));
  await new Promise<void>((resolve, reject) => {
    ok.once('connect', () => resolve());
    ok.once('error', reject);
  });
  const bad = mqtt.connect(`mqtts://127.0.0.1:${d.ports.mqtt_tls}`, { key: full.key, cert: full.cert, ca: full.ca, clientId: 'someone-else', protocolVersion: 4, reconnectPeriod: 0 });
  t.teardown(() => void bad.end(true));
  await new Promise<void>((resolve) => {
    bad.once('error', () => resolve());
    bad.once('close', () => resolve());
  });

  const m = await scrape(d);
  // the list: fact -> metric names (any one present is enough)
  const required: [string, string[], string?][] = [
    ['connected devices', ['connector_devices_connected']],
    ['connects by listener and credential', ['connector_broker_connects_total']],
    ['refusals by reason', ['connector_broker_refusals_total']],
    ['messages in', ['connector_messages_total']],
    ['bytes in', ['connector_message_bytes_total']],
    ['messages out', ['connector_uplink_messages_acked_total']],
    ['bytes out', ['connector_uplink_bytes_acked_total']],
    ['journal depth messages', ['connector_journal_depth_messages']],
    ['journal depth bytes', ['connector_journal_depth_bytes']],
    ['age of the oldest unacknowledged message', ['connector_journal_oldest_age_seconds']],
    ['drops by reason', ['connector_journal_dropped_total']],
    ['quarantines', ['connector_journal_quarantined_total']],
    ['uplink state', ['connector_uplink_state']],
    ['uplink reconnects', ['connector_uplink_reconnects_total']],
    ['ack latency histogram', ['connector_uplink_ack_latency_seconds_bucket']],
    ['cloud token expiry', ['connector_uplink_token_expires_in_seconds']],
    ['server certificate expiry', ['connector_certificate_expiry_seconds']],
    ['device certificate expiry', ['connector_device_certificate_expiry_seconds']],
    ['event-loop lag', ['connector_process_nodejs_eventloop_lag_seconds']],
    ['process memory', ['connector_process_process_resident_memory_bytes']],
    ['readiness', ['connector_ready']],
  ];
  for (const [fact, names, todo] of required) {
    const found = names.filter((n) => has(m, n));
    if (todo) t.ok(found.length > 0, `${fact}: ${names.join(' | ')}`, { todo });
    else t.ok(found.length > 0, `${fact}: ${found[0] ?? names.join(' | ')}`);
  }

  t.equal(value(m, 'connector_devices_connected'), 1, 'one device connected');
  t.ok([...m.keys()].some((k) => k.startsWith('connector_broker_refusals_total{') && m.get(k)! >= 1), 'the refusal is counted');
  t.equal(value(m, 'connector_messages_total{direction="in"}'), 1, 'one message in');
  t.equal(value(m, 'connector_message_bytes_total{direction="in"}'), 5, 'five bytes in');
  t.equal(value(m, 'connector_journal_depth_messages'), 1, 'it waits in the journal');
  t.equal(value(m, 'connector_devices_registered{status="active"}'), 1);
  const dev1 = value(m, 'connector_device_certificate_expiry_seconds{device_id="meter-1"}');
  t.ok(dev1 !== undefined && dev1 > 360 * 86400, `device certificate ~365 days (${dev1})`);
  const server = value(m, 'connector_certificate_expiry_seconds{cert="server"}');
  t.ok(server !== undefined && server > 80 * 86400 && server < 91 * 86400, `server certificate ~90 days (${server})`);
  t.ok((value(m, 'connector_certificate_expiry_seconds{cert="device_ca"}') ?? 0) > 3000 * 86400, 'device CA ~10 years');
  t.equal(value(m, 'connector_up'), 1);

  // revoked devices are counted as such and drop out of the certificate expiry list
  await adminRequest(sock, 'device.revoke', { id: 'meter-1' });
  const m2 = await scrape(d);
  t.equal(value(m2, 'connector_devices_registered{status="revoked"}'), 1);
  t.notOk(has(m2, 'connector_device_certificate_expiry_seconds{device_id="meter-1"}'), 'no expiry for a revoked device');

  // the backlog is never acknowledged (no cloud): after uplink_stale_after_s the daemon is not ready
  // the event that proves the backlog is stale: a daemon log line stamped more than uplink_stale_after_s after the
  // message was accepted (the token client keeps logging its refused attempts, the system clock is shared)
  await d.waitForLog((l) => Date.parse(String(l.time)) > acceptedAt + 1100, 30_000, 'a log line stamped after the backlog went stale');
  const ready = await fetch(`http://127.0.0.1:${d.ports.metrics}/readyz`);
  t.equal(ready.status, 503, 'not ready with a stale backlog');
  const body = (await ready.json()) as { reasons: string[] };
  t.ok(body.reasons.some((r) => /uplink/.test(r)), `the reason names the uplink: ${JSON.stringify(body.reasons)}`);
  t.equal(value(await scrape(d), 'connector_ready'), 0, 'connector_ready follows');
  t.equal((await fetch(`http://127.0.0.1:${d.ports.metrics}/healthz`)).status, 200, 'still alive');
});

t.test('DaemonMetrics: names another component registered are left alone; bad status never breaks a scrape', async (t) => {
  const registry = new Registry();
  new Gauge({ name: 'connector_devices_connected', help: 'the broker owns this one', registers: [registry] }).set(7);
  const journal = new EventEmitter();
  const dm = new DaemonMetrics({
    registry,
    componentStatus: () => {
      throw new Error('status exploded');
    },
    ready: () => true,
    devices: () => ({
      list: () => {
        throw new Error('registry not started');
      },
    }),
    journal: () => journal,
  });
  await dm.start();
  await dm.start();
  t.notOk(dm.names.includes('connector_devices_connected'), 'not registered twice');
  journal.emit('append', { size: 10 });
  journal.emit('append', {});
  const text = await registry.metrics();
  t.match(text, /connector_devices_connected 7/);
  t.match(text, /connector_messages_total\{direction="in"\} 2/);
  t.match(text, /connector_message_bytes_total\{direction="in"\} 10/);
  await dm.close();
  journal.emit('append', { size: 10 });
  t.match(await registry.metrics(), /connector_messages_total\{direction="in"\} 2/, 'no counting after close');
});
