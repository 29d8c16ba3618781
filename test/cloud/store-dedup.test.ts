/**
 * Duplicates are dropped by (gateway, message id) — issue 9 #1: the cloud used
 * to de-duplicate on the id alone, so a cloned gateway's messages were ACKed
 * as duplicates and silently dropped. And the dedup index is bounded: exact
 * keys only for the active segment, Bloom + fingerprint file for sealed ones.
 */
import t from 'tap';
import path from 'node:path';
import { rmSync, existsSync, readdirSync } from 'node:fs';
import { silentLogger } from '../../core/logger.js';
import { CloudStore } from '../../cloud/store.js';
import { chunkMessage, sha256Hex, type MessageMeta } from '../../protocol/codec.js';
import { tempDir } from '../helpers/daemon.js';
import { startCloud, getToken, TestGateway } from './helpers.js';
import { storedEntries } from './store-files.js';

const META: MessageMeta = { device_id: 'd1', topic: 'devices/d1/x', qos: 1, received_at: 1 };
const data = (s: string): [Buffer, string] => [Buffer.from(s), sha256Hex(Buffer.from(s))];

t.test('ingest: the same id from two gateways is stored for each; a resend from the same gateway is not', async (t) => {
  const c = await startCloud(t);
  const token = await getToken(c);
  const { gw: a } = await TestGateway.open(c, token, { gateway_id: 'gw-A' });
  const { gw: b } = await TestGateway.open(c, token, { gateway_id: 'gw-B' });
  const m = (dev: string): MessageMeta => ({ device_id: dev, topic: `devices/${dev}/t`, qos: 1, received_at: Date.now() });
  const send = async (gw: TestGateway, id: string, payload: Buffer, dev: string, chunk = 65536): Promise<void> => {
    for (const ch of chunkMessage(id, m(dev), payload, chunk)) gw.send(ch);
    await gw.next('ACK', (x) => x.ids.includes(id));
  };
  await send(a, 'boot1-1', Buffer.from('from A'), 'dev-a');
  await send(b, 'boot1-1', Buffer.from('from B'), 'dev-b'); // a cloned gateway: same id, another gateway
  await send(a, 'big-1', Buffer.alloc(3000, 1), 'dev-a', 1000); // multi-chunk (partial files) too
  await send(b, 'big-1', Buffer.alloc(3000, 2), 'dev-b', 1000);
  let idx = storedEntries(c.cfg.store_dir);
  t.same(idx.map((e) => [e.gateway_id, e.id]), [['gw-A', 'boot1-1'], ['gw-B', 'boot1-1'], ['gw-A', 'big-1'], ['gw-B', 'big-1']], 'each gateway has its message stored');
  // a resend from the same gateway: ACKed again, stored once
  await send(a, 'boot1-1', Buffer.from('from A'), 'dev-a');
  await send(b, 'big-1', Buffer.alloc(3000, 2), 'dev-b', 1000);
  idx = storedEntries(c.cfg.store_dir);
  t.equal(idx.length, 4, 'resends are not stored again');
  // QUERY answers per gateway
  a.send({ type: 'QUERY', ids: ['boot1-1', 'only-b'] });
  await send(b, 'only-b', Buffer.from('x'), 'dev-b');
  a.send({ type: 'QUERY', ids: ['boot1-1', 'only-b'] });
  const q = await a.next('QUERY_RESULT', (r) => r.entries.length === 2);
  t.same(q.entries.map((e) => e.status), ['stored', 'unknown']);
  a.close();
  b.close();
});

t.test('store: dedup key is (gateway, id); concurrent commits of one key in a round store it once', async (t) => {
  const s = new CloudStore(path.join(tempDir(t), 'store'), silentLogger());
  await s.open();
  t.teardown(() => s.close());
  const [p, h] = data('x');
  const r = await Promise.all([s.commitData('m', 'gw-1', META, p, h), s.commitData('m', 'gw-2', META, p, h), s.commitData('m', 'gw-1', META, p, h)]);
  t.same(r.map((e) => e.seq), [1, 2, 0], 'the third (same gateway and id) is not stored');
  t.equal(s.count, 2);
  t.ok(await s.isStored('gw-1', 'm'));
  t.ok(await s.isStored('gw-2', 'm'));
  t.notOk(await s.isStored('gw-3', 'm'));
  t.notOk(await s.isStored('gw-1', 'n'));
});

t.test('store: dedup holds across rolled segments and a reopen, with bounded exact keys; a lost fingerprint file is rebuilt', async (t) => {
  const dir = path.join(tempDir(t), 'store');
  const opts = { segmentRecords: 10 };
  const ids = Array.from({ length: 45 }, (_, i) => `id-${i}`);
  {
    const s = new CloudStore(dir, silentLogger(), opts);
    await s.open();
    for (const id of ids) {
      const [p, h] = data(id);
      await s.commitData(id, 'gw-1', META, p, h);
    }
    t.ok(s.stats().activeKeys <= 10, 'exact keys only for the active segment');
    for (const id of ids) t.ok(await s.isStored('gw-1', id), `${id} found`);
    await s.close();
  }
  const segs = readdirSync(path.join(dir, 'segments')).filter((n) => n.endsWith('.seg'));
  t.equal(segs.length, 5, 'rolled every 10 records');
  const fp = path.join(dir, 'segments', `${segs[1]}.fp`);
  t.ok(existsSync(fp));
  rmSync(fp);
  const s = new CloudStore(dir, silentLogger(), opts);
  await s.open();
  t.teardown(() => s.close());
  t.ok(existsSync(fp), 'fingerprint file rebuilt');
  t.equal(s.count, 45);
  let found = 0;
  for (const id of ids) if (await s.isStored('gw-1', id)) found++;
  t.equal(found, 45, 'every stored id is found after the reopen');
  let wrong = 0;
  for (const id of ids) if (await s.isStored('gw-2', id)) wrong++;
  for (let i = 0; i < 2000; i++) if (await s.isStored('gw-1', `new-${i}`)) wrong++;
  t.equal(wrong, 0, 'no false positive: a Bloom hit is confirmed on disk');
  const st = s.stats();
  t.equal(st.sealedSegments, 4);
  t.ok(st.bloomBytes > 0 && st.bloomBytes < 4 * 1024, `Bloom filters: ${st.bloomBytes} bytes for 40 sealed records`);
  // a resend of an old message is recognised: committing it again stores nothing
  const [p, h] = data('id-3');
  const e = await s.commitData('id-3', 'gw-1', META, p, h);
  t.equal(e.seq, 0, 'not stored again');
  t.equal(s.count, 45);
});
