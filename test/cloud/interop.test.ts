/**
 * Both ends of the protocol as shipped: the real uplink (bridge/uplink.ts) with
 * the real journal and token client, against the real reference cloud
 * (cloud/server.ts), in process, over real TLS on loopback.
 */
import t from 'tap';
import path from 'node:path';
import { writeFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { stringify } from 'yaml';
import { Registry } from 'prom-client';
import { parseConfigText } from '../../core/config/load.js';
import { silentLogger } from '../../core/logger.js';
import { Journal } from '../../bridge/journal.js';
import { CloudTokenClient } from '../../bridge/cloud-token.js';
import { Uplink, uplinkSettings } from '../../bridge/uplink.js';
import type { CommandTarget } from '../../core/ports.js';
import { sha256Hex } from '../../protocol/codec.js';
import { tempDir, type TestLike } from '../helpers/daemon.js';
import { startCloud, httpsRequest, getToken, SECRET, type CloudHandle } from './helpers.js';
import { storedEntries } from './store-files.js';

function index(c: CloudHandle): Record<string, unknown>[] {
  return storedEntries(c.cfg.store_dir);
}

/**
 * Bounded polling, kept on purpose: the conditions read the store's files on disk (what a restart
 * would find, not the in-memory state that emits events), a partial's durable offset, and the
 * journal's counters, none of which has an event of its own. Bounded in time (timeoutMs).
 */
async function until(cond: () => boolean, what: string, timeoutMs = 30000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

async function connector(t: TestLike, c: CloudHandle, opts: { commands?: CommandTarget; chunk?: number } = {}) {
  const dir = tempDir(t);
  writeFileSync(path.join(dir, 'client.secret'), SECRET, { mode: 0o600 });
  const raw = {
    daemon: { state_dir: dir, server_name: 'gw-interop' },
    bridge: {
      uplink: { url: `wss://127.0.0.1:${c.port}/ingest`, ca_file: c.server.caFile, chunk_size: opts.chunk ?? 65536, heartbeat_ms: 200, dead_after_ms: 2000, reconnect_min_ms: 20, reconnect_max_ms: 200 },
      token: { url: `https://127.0.0.1:${c.port}/oauth/token`, client_id: 'gw-client', client_secret: `file:${path.join(dir, 'client.secret')}`, renew_before_s: 1 },
    },
  };
  const config = parseConfigText(stringify(raw), path.join(dir, 'connector.yaml'), { checkSecrets: false }).config;
  const logger = silentLogger();
  const metrics = new Registry();
  const journal = new Journal({ dir: path.join(dir, 'journal'), config: config.bridge.journal, logger, metrics });
  await journal.start();
  t.teardown(() => journal.close());
  const tokens = new CloudTokenClient({ token: config.bridge.token, uplink: config.bridge.uplink, logger, retryMinMs: 20, retryMaxMs: 200 });
  t.teardown(() => tokens.close());
  const uplink = new Uplink({ settings: uplinkSettings(config), journal, tokens, commands: opts.commands, logger, metrics });
  t.teardown(() => uplink.close());
  await uplink.start();
  let n = 0;
  const append = async (payload: Buffer, device = 'dev-1'): Promise<string> =>
    (await journal.append({ deviceId: device, topic: `devices/${device}/data/${n++}`, qos: 1, receivedAt: Date.now() }, payload)).id;
  return { journal, uplink, append, metrics };
}

t.test('uplink → reference cloud: 0 B, small, multi-chunk, in order, stored once', async (t) => {
  const c = await startCloud(t);
  const k = await connector(t, c);
  const payloads = [Buffer.alloc(0), Buffer.from('hello'), randomBytes(3 * 1024 * 1024 + 5), randomBytes(1000)];
  const ids: string[] = [];
  for (const p of payloads) ids.push(await k.append(p));
  await until(() => index(c).length === 4, 'four messages stored');
  const idx = index(c);
  t.same(idx.map((e) => e.id), ids, 'stored in journal order');
  for (const [i, p] of payloads.entries()) t.equal(idx[i]!.sha256, sha256Hex(p), `payload ${i} digest`);
  t.equal(idx[0]!.gateway_id, 'gw-interop');
  await until(() => k.journal.stats().pendingMessages === 0, 'journal drained by the ACKs');
});

t.test('cloud restarted mid-stream: the large message resumes, every message stored exactly once', async (t) => {
  let c = await startCloud(t, { progress_bytes: 256 * 1024 });
  // the first cloud takes its time over each chunk (10 ms), so the big message is still in progress when it
  // restarts: it does not wait for its periodic persists any more, and could take all 16 MiB before the restart
  const first = c.server.cloudStore;
  const write = first.write.bind(first);
  first.write = async (...args: Parameters<typeof first.write>) => {
    await new Promise((r) => setTimeout(r, 10));
    return write(...args);
  };
  const k = await connector(t, c);
  const big = randomBytes(16 * 1024 * 1024);
  const bigId = await k.append(big);
  const after = await k.append(Buffer.from('after'));
  // restart once some of the big message is durably held
  await until(() => {
    const p = c.server.cloudStore.getPartial(bigId);
    return p !== undefined && p.durableOffset >= 1024 * 1024;
  }, 'progress on the big message', 30000);
  const held = c.server.cloudStore.getPartial(bigId)!.durableOffset;
  c = await c.restart();
  // spy (synchronously after start, before the uplink's reconnect): which messages start again at seq 0?
  const store = c.server.cloudStore;
  const begun: string[] = [];
  const origBegin = store.begin.bind(store);
  store.begin = (...args: Parameters<typeof store.begin>) => {
    begun.push(args[0]);
    return origBegin(...args);
  };
  t.ok(c.server.cloudStore.getPartial(bigId)!.durableOffset >= held, `the restarted cloud holds ${held}+ bytes of it`);
  await until(() => index(c).some((e) => e.id === after), 'both stored after the restart', 60000);
  const idx = index(c);
  t.same(idx.map((e) => e.id), [bigId, after], 'once each, in order');
  t.equal(idx[0]!.sha256, sha256Hex(big));
  t.notOk(begun.includes(bigId), 'the big message resumed at the held offset, not from zero');
  await until(() => k.journal.stats().pendingMessages === 0, 'journal drained');
});

t.test('short-lived tokens are renewed in band: no 4001, no loss, no duplicate', async (t) => {
  const c = await startCloud(t, { token_ttl_s: 2 });
  const k = await connector(t, c);
  const ids: string[] = [];
  // keep sending, each message once the previous one was acknowledged (the round trip paces the
  // loop, no sleep), until the uplink renewed its token in band twice: messages cross both renewals
  let renewed = 0;
  k.uplink.on('token-renewed', () => renewed++);
  const acked = new Set<string>();
  let onAck: () => void = () => {};
  k.uplink.on('ack', (id: string) => {
    acked.add(id);
    onAck();
  });
  const ackOf = (id: string): Promise<void> =>
    new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no ACK for ${id} within 10 s (renewals so far: ${renewed})`)), 10_000);
      onAck = () => {
        if (acked.has(id)) {
          clearTimeout(timer);
          resolve();
        }
      };
      onAck();
    });
  const deadline = Date.now() + 30_000;
  while (renewed < 2) {
    if (Date.now() > deadline || ids.length >= 50_000) throw new Error(`only ${renewed} token renewals after ${ids.length} messages`);
    const id = await k.append(randomBytes(2000));
    ids.push(id);
    await ackOf(id);
  }
  t.ok(renewed >= 2, `${ids.length} messages sent across ${renewed} in-band renewals`);
  await until(() => index(c).length === ids.length, 'all stored');
  t.same(index(c).map((e) => e.id), ids, 'each once, in order');
  const m = await k.metrics.metrics();
  const reconnects = /connector_uplink_reconnects_total (\d+)/.exec(m);
  t.equal(reconnects?.[1] ?? '0', '0', 'never reconnected: the token was renewed on the live connection');
});

t.test('command round trip: POST /api/commands → uplink → device → result', async (t) => {
  const c = await startCloud(t);
  const seen: [string, string, string][] = [];
  const commands: CommandTarget = {
    publishCommand: async (deviceId, name, payload) => {
      seen.push([deviceId, name, payload.toString()]);
      return deviceId === 'dev-1' ? { delivered: true } : { delivered: false, reason: 'not connected' };
    },
  };
  const k = await connector(t, c, { commands });
  await k.append(Buffer.from('hi'), 'dev-1');
  await until(() => index(c).length === 1, 'stored');
  const token = await getToken(c);
  const post = (body: unknown) => httpsRequest(c, 'POST', '/api/commands', { authorization: `Bearer ${token}`, 'content-type': 'application/json' }, JSON.stringify(body));
  const r = await post({ device_id: 'dev-1', name: 'reboot', payload: 'now' });
  t.same([r.status, r.json.delivered, r.json.gateway_id], [200, true, 'gw-interop']);
  const r2 = await post({ device_id: 'dev-2', name: 'x', payload: '' });
  t.same([r2.status, r2.json.delivered, r2.json.reason], [200, false, 'not connected']);
  t.same(seen, [['dev-1', 'reboot', 'now'], ['dev-2', 'x', '']]);
});
