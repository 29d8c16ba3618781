/**
 * `kill -9` of the reference cloud (a real child process, dist/) while a
 * gateway streams messages: every message it acknowledged is in the store
 * after the crash, exactly once, in order per device; a resend of everything
 * to the restarted cloud stores nothing twice.
 */
import t from 'tap';
import path from 'node:path';
import { readFileSync, writeFileSync } from 'node:fs';
import { stringify } from 'yaml';
import { silentLogger } from '../../core/logger.js';
import { CloudStore, type StoredEntry } from '../../cloud/store.js';
import { chunkMessage, type MessageMeta } from '../../protocol/codec.js';
import { startDaemon, tempDir } from '../helpers/daemon.js';
import { TestGateway, getToken, SECRET } from './helpers.js';

const DEVICES = 4;
const WINDOW = 200;

interface Sent {
  id: string;
  device: string;
  chunks: ReturnType<typeof chunkMessage>;
}

function message(i: number): Sent {
  const device = `dev-${i % DEVICES}`;
  const m: MessageMeta = { device_id: device, topic: `devices/${device}/t`, qos: 1, received_at: 1_700_000_000_000 + i };
  const id = `crash-${i}`;
  // every 7th message arrives in several chunks (partial file → blob), the rest in one
  const payload = i % 7 === 0 ? Buffer.alloc(3000, i & 0xff) : Buffer.from(`m${i}`);
  return { id, device, chunks: chunkMessage(id, m, payload, i % 7 === 0 ? 1000 : 65536) };
}

async function readAll(dir: string): Promise<StoredEntry[]> {
  const s = new CloudStore(dir, silentLogger());
  await s.open();
  const out: StoredEntry[] = [];
  for await (const e of s.replay(s.count)) out.push(e);
  await s.close();
  return out;
}

t.test('kill -9 while storing: nothing acknowledged is lost, nothing stored twice, order per device kept', async (t) => {
  const dir = tempDir(t);
  writeFileSync(path.join(dir, 'client.secret'), SECRET + '\n', { mode: 0o600 });
  const cfgFile = path.join(dir, 'cloud.yaml');
  writeFileSync(cfgFile, stringify({ listen: { host: '127.0.0.1', port: 0 }, store_dir: './store', clients: [{ id: 'gw-client', secret: 'file:./client.secret' }], log_level: 'info' }));
  const storeDir = path.join(dir, 'store');
  const cloud = await startDaemon(t, { dir, args: ['cloud', '-c', cfgFile] });
  const c = { port: cloud.ports.cloud!, ca: readFileSync(path.join(storeDir, 'tls', 'ca.crt'), 'utf8') };
  const { gw } = await TestGateway.open(c, await getToken(c), { gateway_id: 'gw-crash' });

  const sent: Sent[] = [];
  const acked = new Set<string>();
  let next = 0;
  const sendOne = (): void => {
    const m = message(next++);
    sent.push(m);
    for (const ch of m.chunks) gw.send(ch);
  };
  for (let i = 0; i < WINDOW; i++) sendOne();
  // keep WINDOW messages in flight; kill once 600 are acknowledged (bounded: at most 5 000 sent)
  while (acked.size < 600 && next < 5000) {
    const a = await gw.next('ACK', () => true, 30000);
    for (const id of a.ids) acked.add(id);
    while (next - acked.size < WINDOW && next < 5000) sendOne();
  }
  cloud.proc.kill('SIGKILL');
  const exit = await cloud.exited;
  t.equal(exit.signal, 'SIGKILL');
  // ACKs that were already on the wire count as acknowledged too
  await new Promise((r) => setImmediate(r));
  for (const f of gw.frames) if (f.type === 'ACK') for (const id of f.ids) acked.add(id);
  t.ok(acked.size >= 600, `${acked.size} acknowledged before the kill, ${sent.length} sent`);

  const stored = await readAll(storeDir);
  const ids = stored.map((e) => e.id);
  t.equal(new Set(ids).size, ids.length, 'no message stored twice');
  const missing = [...acked].filter((id) => !ids.includes(id));
  t.same(missing, [], 'every acknowledged message is stored');
  t.same(stored.map((e) => e.seq), stored.map((_, i) => i + 1), 'seqs gap-free');
  const order = new Map(sent.map((m, i) => [m.id, i]));
  for (let d = 0; d < DEVICES; d++) {
    const seqOfDevice = stored.filter((e) => e.device_id === `dev-${d}`).map((e) => order.get(e.id)!);
    t.same(seqOfDevice, [...seqOfDevice].sort((a, b) => a - b), `dev-${d}: store order = send order`);
  }

  // the gateway resends everything it has not seen acknowledged (and, to be sure, everything) to the restarted cloud
  const again = await startDaemon(t, { dir, args: ['cloud', '-c', cfgFile] });
  const c2 = { port: again.ports.cloud!, ca: c.ca };
  const { gw: gw2 } = await TestGateway.open(c2, await getToken(c2), { gateway_id: 'gw-crash' });
  const ackedAgain = new Set<string>();
  for (const m of sent) for (const ch of m.chunks) gw2.send(ch);
  while (ackedAgain.size < sent.length) {
    const a = await gw2.next('ACK', () => true, 30000);
    for (const id of a.ids) ackedAgain.add(id);
  }
  gw2.close();
  await again.stop();
  const after = await readAll(storeDir);
  t.equal(after.length, sent.length, 'every message stored exactly once after the resend');
  t.equal(new Set(after.map((e) => e.id)).size, sent.length);
  for (let d = 0; d < DEVICES; d++) {
    const order2 = after.filter((e) => e.device_id === `dev-${d}`).map((e) => order.get(e.id)!);
    t.same(order2, [...order2].sort((a, b) => a - b), `dev-${d}: still in send order after the resend`);
  }
});
