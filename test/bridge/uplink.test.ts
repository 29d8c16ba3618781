/**
 * The uplink against a controllable cloud (test/helpers/mini-cloud.ts: real
 * HTTPS/WSS, real codec) with the real journal and the real token client.
 */
import t from 'tap';
import path from 'node:path';
import { writeFileSync } from 'node:fs';
import { createHash, createHmac, randomBytes } from 'node:crypto';
import { stringify } from 'yaml';
import { Registry } from 'prom-client';
import { WebSocket } from 'ws';
import { parseConfigText } from '../../core/config/load.js';
import type { Config } from '../../core/config/schema.js';
import { createLogger } from '../../core/logger.js';
import { Journal, type IncomingUpload } from '../../bridge/journal.js';
import { CloudTokenClient } from '../../bridge/cloud-token.js';
import { Uplink, uplinkSettings } from '../../bridge/uplink.js';
import { signRequest } from '../../protocol/signature.js';
import type { CommandTarget, UplinkMessageMeta } from '../../core/ports.js';
import { encodeFrame, FRAME_MAGIC, LIMITS } from '../../protocol/codec.js';
import { MiniCloud, type MiniCloudOptions } from '../helpers/mini-cloud.js';
import { TestCA } from '../helpers/certs.js';
import { tempDir, deepMerge, type Json, type TestLike } from '../helpers/daemon.js';

const SECRET = 'uplink-test-client-secret';

interface Setup {
  cloud: MiniCloud;
  journal: Journal;
  tokens: CloudTokenClient;
  uplink: Uplink;
  registry: Registry;
  logs: Json[];
  config: Config;
  dir: string;
  append(deviceId: string, payload: Buffer, topic?: string): Promise<string>;
}

async function setup(t: TestLike, cloudOpts: MiniCloudOptions = {}, over: Json = {}, extra: { commands?: CommandTarget; noStart?: boolean; cloud?: MiniCloud } = {}): Promise<Setup> {
  const cloud = extra.cloud ?? (await MiniCloud.start(t, cloudOpts));
  const dir = tempDir(t);
  const secretFile = path.join(dir, 'client.secret');
  writeFileSync(secretFile, SECRET, { mode: 0o600 });
  const raw = deepMerge(
    {
      daemon: { state_dir: dir, server_name: 'gw-test' },
      bridge: {
        uplink: {
          url: cloud.url,
          ca_file: cloud.caFile,
          heartbeat_ms: 200,
          dead_after_ms: 1500,
          reconnect_min_ms: 20,
          reconnect_max_ms: 300,
          chunk_size: 65536,
        },
        token: { url: cloud.tokenUrl, client_secret: `file:${secretFile}`, renew_before_s: 1 },
      },
    },
    over,
  );
  const config = parseConfigText(stringify(raw), path.join(dir, 'connector.yaml'), { checkSecrets: false }).config;
  const logs: Json[] = [];
  const logger = createLogger({ level: 'debug', destination: { write: (s: string) => void logs.push(JSON.parse(s) as Json) } });
  const registry = new Registry();
  const journal = new Journal({ dir: path.join(dir, 'journal'), config: config.bridge.journal, logger, metrics: registry });
  await journal.start();
  t.teardown(() => journal.close());
  const tokens = new CloudTokenClient({ token: config.bridge.token, uplink: config.bridge.uplink, logger, retryMinMs: 20, retryMaxMs: 300 });
  t.teardown(() => tokens.close());
  const uplink = new Uplink({ settings: uplinkSettings(config), journal, tokens, commands: extra.commands, logger, metrics: registry });
  t.teardown(() => uplink.close());
  if (!extra.noStart) await uplink.start();
  let n = 0;
  const append = async (deviceId: string, payload: Buffer, topic?: string): Promise<string> => {
    const meta: UplinkMessageMeta = { deviceId, topic: topic ?? `devices/${deviceId}/data/${n++}`, qos: 1, receivedAt: Date.now() };
    return (await journal.append(meta, payload)).id;
  };
  return { cloud, journal, tokens, uplink, registry, logs, config, dir, append };
}

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');
const pendingOf = (j: Journal): number => j.stats().pendingMessages;

t.test('delivers 0 B, small and multi-chunk messages in order; acks empty the journal; metrics', async (t) => {
  const s = await setup(t);
  const payloads = [Buffer.alloc(0), Buffer.from('hello'), randomBytes(1024 * 1024 + 17), randomBytes(3000)];
  const ids: string[] = [];
  for (const p of payloads) ids.push(await s.append('dev-1', p));
  await s.cloud.until(() => s.cloud.order.length === 4, 'four stored');
  t.same(s.cloud.order, ids, 'stored in journal order');
  for (let i = 0; i < ids.length; i++) {
    const m = s.cloud.stored.get(ids[i]!)!;
    t.equal(m.sha256, sha(payloads[i]!), `payload ${i} intact`);
    t.equal(m.meta.device_id, 'dev-1');
  }
  await s.cloud.until(() => pendingOf(s.journal) === 0, 'journal drained');
  const chunks = s.cloud.conns[0]!.frames.filter((f) => f.type === 'CHUNK');
  t.equal(chunks.length, 1 + 1 + 17 + 1, '1 MiB + 17 B in 64 KiB chunks = 17 chunks');
  t.equal(s.cloud.conns[0]!.headers.authorization, `Bearer ${[...s.cloud.tokens.keys()][0]}`, 'token on the upgrade');
  t.equal(s.cloud.conns[0]!.ws.protocol, 'edge-connector.v2');
  const hello = s.cloud.conns[0]!.frames[0]!;
  t.match(hello, { type: 'HELLO', version: 2, gateway_id: 'gw-test', chunk_size: 65536 });
  const metrics = await s.registry.metrics();
  t.match(metrics, /connector_uplink_messages_acked_total 4/);
  t.match(metrics, /connector_uplink_state\{state="connected"\} 1/);
  t.match(metrics, /connector_uplink_ack_latency_seconds_count 4/);
  t.match(metrics, /connector_uplink_token_expires_in_seconds \d+/);
  t.equal(s.uplink.status().state, 'connected');
  t.ok(s.uplink.readiness().ok);
});

t.test('X-Signature on the upgrade when a signing secret is configured', async (t) => {
  const dir = tempDir(t);
  const f = path.join(dir, 'sig.secret');
  writeFileSync(f, 'sig-secret-1', { mode: 0o600 });
  const s = await setup(t, { signingSecret: 'sig-secret-1' }, { bridge: { uplink: { signing_secret: `file:${f}` } } });
  await s.append('d', Buffer.from('x'));
  await s.cloud.until(() => s.cloud.order.length === 1, 'stored (the cloud verified the signature)');
  t.match(String(s.cloud.upgradeHeaders[0]!['x-signature']), /^t=\d+,v1=[0-9a-f]{64}$/);
  const expected = createHmac('sha256', 'k').update('GET\n/ingest\n1700000000').digest('hex');
  t.equal(signRequest('k', 'GET', '/ingest', 1700000000), `t=1700000000,v1=${expected}`);
});

t.test('bounded window: stops at window_messages while the cloud withholds ACKs, continues after', async (t) => {
  const s = await setup(t, { withholdAcks: true }, { bridge: { uplink: { window_messages: 5, dead_after_ms: 60000 } } });
  for (let i = 0; i < 12; i++) await s.append('d', Buffer.from(`m${i}`));
  await s.cloud.until(() => s.cloud.order.length === 5, 'five sent');
  // barrier: two more heartbeats from the uplink (200 ms each) prove it is alive and waiting on the window
  const pings = (): number => s.cloud.conns[0]!.frames.filter((f) => f.type === 'PING').length;
  const p0 = pings();
  await s.cloud.until(() => pings() >= p0 + 2, 'two more heartbeats from the uplink');
  t.equal(s.cloud.completions.length, 5, 'no sixth message while five are unacknowledged');
  s.cloud.opts.withholdAcks = false;
  s.cloud.ackAll(s.cloud.conns[0]!);
  await s.cloud.until(() => s.cloud.order.length === 12, 'all stored');
  await s.cloud.until(() => pendingOf(s.journal) === 0, 'all acked');
  t.equal(s.cloud.conns.length, 1, 'same connection');
});

t.test('byte window with one big message: progress ACKs open it; QUERY when the cloud sends none', async (t) => {
  const big = randomBytes(2 * 1024 * 1024);
  const s = await setup(t, { progressEvery: 256 * 1024 }, { bridge: { uplink: { window_bytes: 524288, chunk_size: 65536 } } });
  const id = await s.append('d', big);
  await s.cloud.until(() => s.cloud.order.length === 1, 'big stored through a 512 KiB window', 15000);
  t.equal(s.cloud.stored.get(id)!.sha256, sha(big));

  const s2 = await setup(t, {}, { bridge: { uplink: { window_bytes: 262144, chunk_size: 65536, heartbeat_ms: 100 } } });
  await s2.append('d', big);
  await s2.cloud.until(() => s2.cloud.order.length === 1, 'big stored through QUERY progress', 15000);
  t.ok(s2.cloud.conns[0]!.frames.some((f) => f.type === 'QUERY'), 'the uplink asked where the cloud stands');
});

t.test('resume: a link cut in the middle of a large message resumes at the offset WELCOME reports', async (t) => {
  let cut = false;
  const cloudOpts: MiniCloudOptions = {
    onFrame: (c, f) => {
      if (!cut && f.type === 'CHUNK' && f.seq === 8) {
        cut = true;
        c.ws.terminate();
        return true;
      }
    },
  };
  const s = await setup(t, cloudOpts);
  const big = randomBytes(1024 * 1024);
  const before = await s.append('d', Buffer.from('before'));
  const id = await s.append('d', big);
  const after = await s.append('d', Buffer.from('after'));
  await s.cloud.until(() => s.cloud.order.length === 3, 'all three stored');
  t.same(s.cloud.order, [before, id, after]);
  t.equal(s.cloud.stored.get(id)!.sha256, sha(big));
  t.equal(s.cloud.conns.length, 2, 'one reconnect');
  const resumed = s.cloud.conns[1]!.frames.filter((f) => f.type === 'CHUNK' && f.id === id);
  t.match(resumed[0], { seq: 8, offset: 8 * 65536 }, 'resumed at the held offset, not from zero');
  t.equal(s.uplink.counts.reconnects, 1);
});

t.test('restart: a new uplink on the same journal resumes from the first unacknowledged record and the cloud partial', async (t) => {
  let stopAt = 5;
  const cloud = await MiniCloud.start(t, {
    onFrame: (c, f) => {
      if (stopAt && f.type === 'CHUNK' && f.seq === stopAt) {
        stopAt = 0;
        c.ws.terminate();
        return true;
      }
    },
  });
  const s = await setup(t, {}, { bridge: { uplink: { reconnect_min_ms: 5000, reconnect_max_ms: 5000 } } }, { cloud });
  const big = randomBytes(600 * 1024);
  const id = await s.append('d', big);
  await cloud.until(() => cloud.conns.length === 1 && cloud.conns[0]!.ws.readyState !== WebSocket.OPEN, 'cut');
  await s.uplink.close();
  // same journal, new uplink (a process restart keeps journal + cloud partials)
  const registry = new Registry();
  const up2 = new Uplink({ settings: uplinkSettings({ ...s.config, bridge: { ...s.config.bridge, uplink: { ...s.config.bridge.uplink, reconnect_min_ms: 20 } } } as Config), journal: s.journal, tokens: s.tokens, logger: createLogger({ level: 'silent' }), metrics: registry });
  t.teardown(() => up2.close());
  await up2.start();
  await cloud.until(() => cloud.order.length === 1, 'stored after restart');
  t.equal(cloud.stored.get(id)!.sha256, sha(big));
  const first = cloud.conns[1]!.frames.find((f) => f.type === 'CHUNK');
  t.match(first, { seq: 5, offset: 5 * 65536 });
});

t.test('duplicates: a message the cloud already stored but whose ACK was lost is acked again, stored once', async (t) => {
  let dropAck = true;
  const s = await setup(t, {
    onFrame: (c, f) => {
      if (dropAck && f.type === 'CHUNK') {
        // store it (default handling) but cut the link before the ACK goes out
        dropAck = false;
        setImmediate(() => c.ws.terminate());
        c.ws.send = (() => undefined) as typeof c.ws.send;
        return false;
      }
    },
  });
  const id = await s.append('d', Buffer.from('once'));
  await s.cloud.until(() => pendingOf(s.journal) === 0, 'acked after reconnect');
  t.same(s.cloud.order, [id], 'stored once');
  t.equal(s.cloud.completions.filter((x) => x === id).length, 2, 'sent twice, deduplicated by id');
});

t.test('REJECT permanent quarantines without blocking; REJECT retry resends in order after the delay', async (t) => {
  const rejectedOnce = new Set<string>();
  let poison = '';
  let retryMe = '';
  // the cloud keeps order per device as docs/PROTOCOL.md requires of it: after the retry-REJECT, every later
  // message of the device is REJECTed (retry) too until the rejected one comes again (all messages are of device `d`)
  let blockedBy: string | undefined;
  const refusedWhileBlocked: string[] = [];
  const s = await setup(t, {
    onFrame: (c, f) => {
      if (f.type !== 'CHUNK') return;
      if (f.id === poison) {
        c.send({ type: 'REJECT', id: f.id, kind: 'permanent', reason: 'bad metadata' });
        return true;
      }
      if (f.id === retryMe && !rejectedOnce.has(f.id)) {
        rejectedOnce.add(f.id);
        blockedBy = f.id;
        c.send({ type: 'REJECT', id: f.id, kind: 'retry', reason: 'busy', retry_after_ms: 150 });
        return true;
      }
      if (blockedBy !== undefined && f.id !== blockedBy) {
        refusedWhileBlocked.push(f.id);
        c.send({ type: 'REJECT', id: f.id, kind: 'retry', reason: 'an earlier message of the device is rejected for retry', retry_after_ms: 150 });
        return true;
      }
      if (f.id === blockedBy) blockedBy = undefined; // its resend: stored now (single chunk), ahead of what follows
    },
  }, {}, { noStart: true });
  // all in the journal before the uplink starts: `z` goes out right behind `retryMe`, before its REJECT arrives
  const a = await s.append('d', Buffer.from('a'));
  poison = await s.append('d', Buffer.from('poison'));
  retryMe = await s.append('d', Buffer.from('retry'));
  const z = await s.append('d', Buffer.from('z'));
  await s.uplink.start();
  await s.cloud.until(() => s.cloud.order.includes(z) && pendingOf(s.journal) === 0, 'everything but the poison stored');
  t.same(s.cloud.order, [a, retryMe, z], 'everything but the poison stored, in order per device');
  t.equal(s.cloud.completions.filter((x) => x === retryMe).length, 1, 'the retried message stored once');
  t.equal(s.cloud.completions.filter((x) => x === z).length, 1, 'the message after it stored once');
  t.equal(s.journal.stats().quarantined, 1, 'poison quarantined');
  t.comment(`refused while ${retryMe} was rejected: ${refusedWhileBlocked.join(',') || 'none'}`);
  // a REJECT of `z` that arrives after the rewind finds it no longer in flight and is not counted
  t.ok(s.uplink.counts.rejected >= 2 && s.uplink.counts.rejected <= 2 + refusedWhileBlocked.length, 'poison + retry (+ what followed, if still in flight)');
  t.equal(s.cloud.conns.length, 1, 'no reconnect for rejects');
});

t.test('dead link: a cloud that goes silent (no frame at all) is dropped and reconnected', async (t) => {
  let silent = true;
  const s = await setup(
    t,
    {
      heartbeatMs: 0,
      onFrame: (c, f) => {
        if (silent && c.n === 1) return true; // swallow everything, answer nothing
        void f;
      },
    },
    { bridge: { uplink: { heartbeat_ms: 100, dead_after_ms: 500 } } },
  );
  const id = await s.append('d', Buffer.from('x'));
  await s.cloud.until(() => s.cloud.conns.length >= 2, 'reconnected after the dead link', 5000);
  silent = false;
  await s.cloud.until(() => s.cloud.order.includes(id), 'delivered on the new link');
  t.ok(s.logs.some((l) => /link dead/.test(String(l.msg))), 'logged');
});

t.test('token renewed in band before expiry: no reconnect, no loss, no duplicate', async (t) => {
  const s = await setup(t, { tokenTtlS: 2 }, { bridge: { token: { renew_before_s: 1 } } });
  const ids: string[] = [];
  let renewed = 0;
  s.uplink.on('token-renewed', () => renewed++);
  // keep sending, each message after the previous one's ACK, across two in-band renewals (event paced, no sleeps)
  for (let i = 0; renewed < 2 && i < 100_000; i++) {
    const id = await s.append('d', randomBytes(2000));
    ids.push(id);
    await ackOf(s.uplink, id);
  }
  await s.cloud.until(() => pendingOf(s.journal) === 0, 'drained');
  t.same(s.cloud.order, ids, 'all stored, in order');
  t.equal(s.cloud.completions.length, ids.length, 'no duplicates');
  t.equal(s.cloud.conns.length, 1, 'one connection for the whole run');
  t.ok(s.uplink.counts.tokensInBand >= 2, `renewed in band ${s.uplink.counts.tokensInBand} times`);
  t.ok(s.cloud.conns[0]!.frames.filter((f) => f.type === 'TOKEN').length >= 2);
});

t.test('token refused in band: reconnects with the new token, nothing lost', async (t) => {
  const s = await setup(t, { tokenTtlS: 2, rejectInBandToken: true }, { bridge: { token: { renew_before_s: 1 } } });
  const ids: string[] = [];
  // send (each after the previous ACK) until the refused renewal made the uplink reconnect, and a few more after
  let after = 0;
  for (let i = 0; after < 5 && i < 100_000; i++) {
    const id = await s.append('d', Buffer.from(String(ids.length)));
    ids.push(id);
    await ackOf(s.uplink, id);
    if (s.cloud.conns.length >= 2) after++;
  }
  await s.cloud.until(() => pendingOf(s.journal) === 0, 'drained');
  t.same(s.cloud.order, ids);
  t.ok(s.cloud.conns.length >= 2 && s.cloud.conns.length <= 4, `reconnected for the new token (${s.cloud.conns.length} connections), no storm`);
});

t.test('commands: COMMAND goes to the CommandTarget and COMMAND_RESULT comes back', async (t) => {
  const got: Array<[string, string, string]> = [];
  const commands: CommandTarget = {
    publishCommand: async (deviceId, name, payload) => {
      got.push([deviceId, name, payload.toString()]);
      return deviceId === 'dev-ok' ? { delivered: true } : { delivered: false, reason: 'not connected' };
    },
  };
  const s = await setup(t, {}, {}, { commands });
  await s.cloud.until(() => s.cloud.conns.length === 1 && s.uplink.state === 'connected', 'connected');
  const c = s.cloud.conns[0]!;
  c.send({ type: 'COMMAND', id: 'c1', device_id: 'dev-ok', name: 'reboot', payload: Buffer.from('now').toString('base64') });
  c.send({ type: 'COMMAND', id: 'c2', device_id: 'dev-off', name: 'reboot', payload: '' });
  c.send({ type: 'COMMAND', id: 'c3', device_id: 'dev-ok', name: 'bad/name', payload: '' });
  await s.cloud.until(() => c.frames.filter((f) => f.type === 'COMMAND_RESULT').length === 3, 'three results');
  const results = c.frames.filter((f) => f.type === 'COMMAND_RESULT');
  t.same(results.find((r) => r.type === 'COMMAND_RESULT' && r.id === 'c1'), { type: 'COMMAND_RESULT', id: 'c1', delivered: true });
  t.match(results.find((r) => r.type === 'COMMAND_RESULT' && r.id === 'c2'), { delivered: false, reason: 'not connected' });
  t.match(results.find((r) => r.type === 'COMMAND_RESULT' && r.id === 'c3'), { delivered: false, reason: /invalid command name/ });
  t.same(got, [['dev-ok', 'reboot', 'now'], ['dev-off', 'reboot', '']]);
});

t.test('hostile cloud: garbage, text, unknown type, wrong direction → ECONN_PROTOCOL, link dropped and resumed', async (t) => {
  const attacks: Array<(ws: WebSocket) => void> = [
    (ws) => ws.send(randomBytes(100)),
    (ws) => ws.send('hello'),
    (ws) => ws.send(Buffer.from([FRAME_MAGIC, 1, 0x77, 0, 0, 0, 0, 0])),
    (ws) => ws.send(encodeFrame({ type: 'HELLO', version: 1, gateway_id: 'x' })),
    (ws) => ws.send(Buffer.from([FRAME_MAGIC, 1, 0x04, 0, 0, 0, 0, 5, 0x7b, 0x7b, 0x7b, 0x7b, 0x7b])),
    (ws) => ws.send(encodeFrame({ type: 'WELCOME', version: 1, session_id: 'again', max_frame_bytes: 1, max_chunk_bytes: 1, max_message_bytes: 1, max_partials: 1, heartbeat_ms: 1, token_expires_at: 1, partials: [] })),
  ];
  const s = await setup(t, {
    onWelcome: (c) => {
      const attack = attacks[c.n - 1];
      if (attack) setTimeout(() => attack(c.ws), 30);
    },
  });
  const id = await s.append('d', Buffer.from('survives'));
  await s.cloud.until(() => s.cloud.conns.length === attacks.length + 1, 'reconnected after every attack', 15000);
  await s.cloud.until(() => s.cloud.order.includes(id) && pendingOf(s.journal) === 0, 'delivered in the end');
  const protoLogs = s.logs.filter((l) => l.code === 'ECONN_PROTOCOL');
  t.ok(protoLogs.length >= attacks.length, `${protoLogs.length} ECONN_PROTOCOL log lines`);
  t.equal(s.uplink.counts.protocolErrors, attacks.length);
});

t.test('upgrade refused: 401 renews the token, 503 Retry-After is honoured', async (t) => {
  const s = await setup(t, { refuseUpgrade: { status: 503, retryAfterS: 1 } });
  await s.cloud.until(() => s.cloud.upgradeTimes.length === 2, 'a second attempt');
  const [first, second] = s.cloud.upgradeTimes as [number, number];
  t.ok(second - first >= 950, `no second attempt before Retry-After (1 s) although reconnect_max_ms is 300 (${second - first} ms)`);
  s.cloud.opts.refuseUpgrade = undefined;
  const id = await s.append('d', Buffer.from('after 503'));
  await s.cloud.until(() => s.cloud.order.includes(id), 'delivered');
  t.ok(s.logs.some((l) => l.code === 'ECONN_UPLINK' && /HTTP 503/.test(String(l.msg))));

  // 401: the cloud forgot our token (e.g. key rotation) → a new token is fetched
  const s2 = await setup(t);
  await s2.cloud.until(() => s2.uplink.state === 'connected', 'connected');
  const before = s2.cloud.tokenRequests.length;
  s2.cloud.tokens.clear();
  s2.cloud.conns[0]!.ws.terminate();
  const id2 = await s2.append('d', Buffer.from('after 401'));
  await s2.cloud.until(() => s2.cloud.order.includes(id2), 'delivered with a new token');
  t.ok(s2.cloud.tokenRequests.length > before, 'a new token was requested');
});

t.test('cloud down at start, then up: delivered; readiness follows acks, not the socket', async (t) => {
  const cloud = new MiniCloud();
  // reserve a port: listen, note it, stop
  await cloud.listen(t);
  const port = cloud.port;
  await cloud.stop();
  const s = await setup(t, {}, { bridge: { uplink: { url: `wss://127.0.0.1:${port}/ingest` }, token: { url: `https://127.0.0.1:${port}/oauth/token` } } }, { cloud });
  const id = await s.append('d', Buffer.from('waiting'));
  await until(() => s.uplink.status().last_error, 'a failed connection attempt');
  t.not(s.uplink.state, 'connected');
  t.ok(s.uplink.readiness(60_000).ok, 'a fresh backlog is not stale');
  const r = s.uplink.readiness(0);
  t.notOk(r.ok, 'a backlog older than the stale limit with no ack is not ready');
  t.match(r.reason, /1 messages wait for the cloud.*last cloud ack never/);
  const cloud2 = new MiniCloud();
  await cloud2.listen(t, port, cloud.ca);
  await cloud2.until(() => cloud2.order.includes(id), 'delivered once the cloud is up', 10000);
  await cloud2.until(() => pendingOf(s.journal) === 0, 'acked');
  t.ok(s.uplink.readiness(0).ok, 'empty backlog: ready');
});

t.test('close() is bounded and idempotent even when the cloud never answers the close', async (t) => {
  const s = await setup(t, { onFrame: () => true, heartbeatMs: 0 }, { bridge: { uplink: { dead_after_ms: 60000 } } });
  await s.cloud.until(() => s.uplink.state === 'connected', 'connected');
  s.cloud.conns[0]!.ws.close = () => undefined; // the server ignores the closing handshake
  const t0 = Date.now();
  await s.uplink.close();
  await s.uplink.close();
  t.ok(Date.now() - t0 < 5000, 'bounded');
  t.equal(s.uplink.state, 'stopped');
});

t.test('reload: new limits apply without dropping the link; a new URL reconnects', async (t) => {
  const s = await setup(t);
  await s.cloud.until(() => s.uplink.state === 'connected', 'connected');
  const next = parseConfigText(
    stringify(deepMerge(JSON.parse(JSON.stringify(s.config)) as Json, { bridge: { uplink: { window_messages: 7, heartbeat_ms: 300 } } })),
    path.join(s.dir, 'connector.yaml'),
    { checkSecrets: false },
  ).config;
  const changes = await s.uplink.reconfigure(uplinkSettings(next));
  t.match(changes.join('\n'), /window_messages 4096 -> 7/);
  t.equal(s.cloud.conns.length, 1, 'link kept');
  const other = await MiniCloud.start(t, {}, 0);
  const moved = parseConfigText(
    stringify(deepMerge(JSON.parse(JSON.stringify(next)) as Json, { bridge: { uplink: { url: other.url, ca_file: other.caFile }, token: { url: other.tokenUrl } } })),
    path.join(s.dir, 'connector.yaml'),
    { checkSecrets: false },
  ).config;
  await s.uplink.reconfigure(uplinkSettings(moved));
  const id = await s.append('d', Buffer.from('moved'));
  await other.until(() => other.order.includes(id), 'delivered to the new cloud');
});

t.test('QoS 0 best effort: sent while the link is up, dropped (counted) while it is down, never journaled', async (t) => {
  const s = await setup(t);
  const meta: UplinkMessageMeta = { deviceId: 'd0', topic: 'devices/d0/t', qos: 0, receivedAt: Date.now() };
  await s.cloud.until(() => s.uplink.state === 'connected', 'connected');
  t.ok(s.uplink.sendBestEffort(meta, Buffer.from('q0')));
  await s.cloud.until(() => s.cloud.order.length === 1, 'stored');
  const m = s.cloud.stored.get(s.cloud.order[0]!)!;
  t.equal(m.payload.toString(), 'q0');
  t.equal(m.meta.qos, 0);
  t.equal(pendingOf(s.journal), 0, 'never in the journal');
  await s.uplink.close();
  t.notOk(s.uplink.sendBestEffort(meta, Buffer.from('lost')), 'dropped while down');
  t.match(s.uplink.status(), { best_effort_sent: 1, best_effort_dropped: 1 });
});

t.test('TLS: mTLS client certificate, certificate validation always on, minimum TLS version', async (t) => {
  // mTLS: the cloud requires a client certificate from its own CA
  const clientCa = await TestCA.create();
  const client = await clientCa.client({ cn: 'gw-test' });
  const dir = tempDir(t);
  writeFileSync(path.join(dir, 'gw.crt'), client.cert);
  writeFileSync(path.join(dir, 'gw.key'), client.key, { mode: 0o600 });
  const m = await setup(t, { clientCa: clientCa.cert }, { bridge: { uplink: { cert_file: path.join(dir, 'gw.crt'), key_file: path.join(dir, 'gw.key') } } });
  const id = await m.append('d', Buffer.from('mtls'));
  await m.cloud.until(() => m.cloud.order.includes(id), 'delivered over mTLS');
  const tlsSock = m.cloud.conns[0]!.ws as unknown as { _socket: { getPeerCertificate(): { subject?: { CN?: string } } } };
  t.equal(tlsSock._socket.getPeerCertificate().subject?.CN, 'gw-test', 'the cloud saw the client certificate');

  // a cloud whose certificate does not chain to the configured CA is refused (no option turns that off)
  const other = await MiniCloud.start(t);
  const v = await setup(t, {}, { bridge: { uplink: { url: other.url }, token: { url: other.tokenUrl } } }, { cloud: await MiniCloud.start(t) });
  await v.append('d', Buffer.from('never'));
  const denied = await until(() => v.logs.find((l) => l.code === 'ECONN_CLOUD_TOKEN' || l.code === 'ECONN_UPLINK'), 'a TLS error');
  t.match(String(denied.msg), /certificate|verify|issuer/i);
  t.equal(other.conns.length, 0, 'never connected');

  // min_tls_version TLSv1.3 against a TLS 1.2-only cloud fails cleanly
  const old = await setup(t, { maxTlsVersion: 'TLSv1.2' }, { bridge: { uplink: { min_tls_version: 'TLSv1.3' } } });
  const e = await until(() => old.logs.find((l) => l.code === 'ECONN_CLOUD_TOKEN' || l.code === 'ECONN_UPLINK'), 'a protocol version error');
  t.match(String(e.msg), /version|protocol/i);
  t.equal(old.cloud.conns.length, 0);
});

/** Resolves when the uplink reports the cloud's ACK of `id` (register right after the append resolves). */
function ackOf(uplink: Uplink, id: string, ms = 15_000): Promise<void> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      uplink.off('ack', on);
      reject(new Error(`no ACK of ${id} within ${ms} ms`));
    }, ms);
    const on = (x: string): void => {
      if (x !== id) return;
      clearTimeout(timer);
      uplink.off('ack', on);
      resolve();
    };
    uplink.on('ack', on);
  });
}

/**
 * Bounded polling, kept on purpose for the three waits that use it: the uplink's status().last_error
 * and lines in a captured log have no event of their own (the ack waits above use the 'ack' event).
 */
async function until<T>(f: () => T | undefined, what: string, ms = 10_000): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = f();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

t.test('protocol v2: small messages go many per BATCH frame and are acknowledged cumulatively', async (t) => {
  const s = await setup(t, {}, {}, { noStart: true });
  const ids: string[] = [];
  for (let i = 0; i < 300; i++) ids.push(await s.append(`d${i % 4}`, randomBytes(64)));
  await s.uplink.start();
  await s.cloud.until(() => s.cloud.order.length === 300 && pendingOf(s.journal) === 0, 'all stored and acknowledged');
  t.same(s.cloud.order, ids, 'journal order');
  const c = s.cloud.conns[0]!;
  t.ok(c.batches * 4 <= 300, `300 messages in ${c.batches} BATCH frames`);
  t.equal(s.uplink.counts.messagesAcked, 300);
  const chunks = c.frames.filter((f) => f.type === 'CHUNK');
  t.same(
    chunks.map((f) => (f as { pos?: number }).pos),
    ids.map((_, i) => i + 1),
    'positions 1, 2, 3, … in send order',
  );
});

t.test('a failed ack-log write is the journal\'s to log once and retry: the uplink logs nothing per acknowledged message', async (t) => {
  const s = await setup(t, {}, {}, { noStart: true });
  const ids: string[] = [];
  for (let i = 0; i < 40; i++) ids.push(await s.append(`d${i % 4}`, randomBytes(64)));
  // the journal's ack() hands back the promise of the ack-log write its acks share; here every write "fails"
  const journal = s.journal;
  const view: typeof journal = Object.create(journal) as typeof journal;
  const failed = Promise.reject(new Error('ack log write failed (test)'));
  failed.catch(() => {}); // as the journal's own: nobody has to handle it
  let acks = 0;
  view.ack = (id: string) => {
    acks++;
    void journal.ack(id);
    return failed;
  };
  const logs: Json[] = [];
  const up = new Uplink({ settings: uplinkSettings(s.config), journal: view, tokens: s.tokens, logger: createLogger({ level: 'debug', destination: { write: (l: string) => void logs.push(JSON.parse(l) as Json) } }), metrics: new Registry() });
  t.teardown(() => up.close());
  await up.start();
  await s.cloud.until(() => s.cloud.order.length === 40 && acks === 40, 'all stored and acknowledged');
  t.same(s.cloud.order, ids);
  t.equal(up.counts.messagesAcked, 40, 'every message counted as acknowledged');
  t.same(
    logs.filter((l) => l.level === 'error' || l.level === 'warn').map((l) => l.msg),
    [],
    'no error or warning from the uplink (one line per message of a failed batch before)',
  );
});

for (const fromMemory of [false, true]) t.test(`issue 9: a record the encoder refuses (metadata over the protocol limits) is quarantined, never retried, and does not block what is behind it (payload ${fromMemory ? 'from the memory cache: the one-chunk fast path falls back' : 'read'})`, async (t) => {
  const s = await setup(t, {}, {}, { noStart: true });
  const before = await s.append('d', Buffer.from('before'));
  const bad = await s.append('d', Buffer.from('bad metadata'));
  const after = await s.append('d', Buffer.from('after'));
  // a record written before its limits were checked at append time (an older version's journal on disk): its
  // content type is one byte over the protocol's 255 — the journal hands it to the uplink as it is
  const journal = s.journal;
  const view: typeof journal = Object.create(journal) as typeof journal;
  view.pending = (afterSeq?: number, limit?: number) =>
    journal.pending(afterSeq, limit).map((r) => (r.id === bad ? { ...r, meta: { ...r.meta, contentType: 'x'.repeat(256) } } : r));
  // the copy handed out for the bad record is not the journal's cached object: serve its payload anyway
  if (fromMemory) view.cachedPayload = (r) => journal.cachedPayload(journal.pending().find((x) => x.seq === r.seq) ?? r);
  else view.cachedPayload = () => undefined;
  const quarantined: string[] = [];
  view.quarantine = async (id: string, reason: string) => {
    quarantined.push(`${id}: ${reason}`);
    return journal.quarantine(id, reason);
  };
  const up = new Uplink({ settings: uplinkSettings(s.config), journal: view, tokens: s.tokens, logger: createLogger({ level: 'silent' }), metrics: new Registry() });
  t.teardown(() => up.close());
  await up.start();
  await s.cloud.until(() => s.cloud.order.includes(after), 'the message behind it delivered');
  t.same(s.cloud.order, [before, after], 'delivered in order without the unencodable record');
  t.equal(quarantined.length, 1, 'quarantined once');
  t.match(quarantined[0], /content_type of 256 bytes/);
  t.equal(up.counts.quarantined, 1);
  t.equal(s.cloud.conns.length, 1, 'no reconnect: the link was never at fault');
});

t.test('issue 9: a token living 40 days does not renew in a loop (timer overflow)', async (t) => {
  const s = await setup(t, { tokenTtlS: 40 * 86400 });
  const id = await s.append('d', Buffer.from('x'));
  await s.cloud.until(() => s.cloud.order.includes(id), 'delivered');
  // barrier: 6 heartbeats from the uplink (200 ms each); a renewal loop would fetch a token every few ms meanwhile
  const pings = (): number => s.cloud.conns[0]!.frames.filter((f) => f.type === 'PING').length;
  await s.cloud.until(() => pings() >= 6, 'six heartbeats');
  t.equal(s.cloud.tokenRequests.length, 1, 'one token, no renewal');
  t.equal(s.uplink.counts.tokensInBand, 0);
});

t.test('issue 9: a gateway clock ahead of the cloud (every token looks expired) does not renew in a loop', async (t) => {
  // the cloud's clock is 2 h behind ours; its tokens live 1 h: by our clock they expired an hour ago
  const s = await setup(t, { tokenTtlS: 3600, clockOffsetMs: -2 * 3600_000, heartbeatMs: 100 }, { bridge: { uplink: { heartbeat_ms: 100 } } });
  const id = await s.append('d', Buffer.from('x'));
  await s.cloud.until(() => s.cloud.order.includes(id), 'delivered');
  const pings = (): number => s.cloud.conns[0]!.frames.filter((f) => f.type === 'PING').length;
  await s.cloud.until(() => pings() >= 10, 'ten heartbeats (1 s)');
  t.ok(s.cloud.tokenRequests.length <= 3, `${s.cloud.tokenRequests.length} token requests in 1 s (bounded, no loop)`);
  t.equal(s.cloud.conns.length, 1, 'the link stays up');
  t.equal(pendingOf(s.journal), 0);
});

t.test('issue 9: hostile cloud — an ACK for positions never sent, ACKs of unknown ids, an enormous frame: link dropped with a clear log line, nothing lost, no crash', async (t) => {
  let ackedEarly = false;
  const s = await setup(t, {
    onFrame: (c, f) => {
      if (c.n === 1 && f.type === 'CHUNK' && !ackedEarly) {
        // claims everything up to a position far beyond what was sent, without storing anything
        ackedEarly = true;
        c.send({ type: 'ACK', upto: ((f as { pos?: number }).pos ?? 0) + 1000, ids: [] });
        return true;
      }
      if (c.n === 2 && f.type === 'CHUNK') {
        c.send({ type: 'ACK', ids: ['never-sent-1', 'never-sent-2'] });
        // a frame larger than any the protocol allows (the uplink's ws maxPayload)
        c.ws.send(Buffer.alloc(LIMITS.maxFrameBytes + 1));
        return true;
      }
    },
  });
  const id = await s.append('d', Buffer.from('precious'));
  await s.cloud.until(() => s.cloud.order.includes(id) && pendingOf(s.journal) === 0, 'delivered in the end', 20_000);
  t.equal(s.cloud.completions.filter((x) => x === id).length, 1, 'stored once');
  t.ok(s.cloud.conns.length >= 3, 'dropped twice, resumed each time');
  t.ok(
    s.logs.some((l) => l.code === 'ECONN_PROTOCOL' && /ACK up to position \d+, but the last position sent on this link is \d+/.test(String(l.msg))),
    'the impossible ACK is named in the log',
  );
  t.ok(
    s.logs.some((l) => /larger than \d+ bytes|Max payload size exceeded/i.test(String(l.msg))),
    'the enormous frame is named in the log',
  );
  t.equal(s.uplink.counts.messagesAcked, 1, 'acknowledged once, by the cloud that stored it');
});

t.test('feature "stream": offered in HELLO; a cloud that does not confirm it gets an upload of known length only once it is committed, as before', async (t) => {
  const s = await setup(t);
  const total = 3 * 1024 * 1024 + 5;
  const data = randomBytes(total);
  let release!: () => void;
  const held = new Promise<void>((r) => (release = r));
  async function* body(): AsyncGenerator<Buffer> {
    yield data.subarray(0, 2 * 1024 * 1024); // the journal writes in 1 MiB runs
    await held;
    yield data.subarray(2 * 1024 * 1024);
  }
  await s.cloud.until(() => s.uplink.status().state === 'connected', 'connected');
  t.match(s.cloud.conns[0]!.frames[0], { type: 'HELLO', features: ['stream'] }, 'the connector offers the feature');
  const started = new Promise<IncomingUpload>((resolve) => s.journal.once('upload', resolve));
  const done = s.journal.appendStream({ deviceId: 'cam', topic: 'devices/cam/upload', qos: 1, receivedAt: Date.now() }, body(), { maxBytes: 4 * total, declaredBytes: total });
  const u = await started;
  if (u.written < 1024 * 1024) await new Promise<void>((resolve) => u.on('progress', (n: number) => n >= 1024 * 1024 && resolve()));
  // a message journaled now goes through the link after anything the uplink had handed to it before
  const probe = await s.append('cam', Buffer.from('probe'));
  await ackOf(s.uplink, probe);
  const early = s.cloud.conns[0]!.frames.filter((f) => f.type === 'CHUNK' && f.id === u.id).length;
  t.equal(early, 0, 'nothing of the upload was sent while it arrived');
  release();
  const r = await done;
  await ackOf(s.uplink, r.id);
  t.equal(s.cloud.stored.get(r.id)?.sha256, sha(data), 'sent whole once committed, under its id');
});
