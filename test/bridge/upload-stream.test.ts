/**
 * Uploads of known length stream end to end (issue 11; docs/PROTOCOL.md §13.10, feature `stream`):
 * the connector sends the chunks of an HTTP upload upstream while the body still arrives, holds the
 * last chunk until the journal committed the whole (the 202), and makes the cloud drop what it
 * received of an upload that ends without a 202 — cut off, wrong digest, or a daemon killed midway.
 * Real processes: the daemon and the reference cloud, on 127.0.0.1.
 */
import t from 'tap';
import { createHash, randomBytes } from 'node:crypto';
import { readFileSync, readdirSync, statSync, writeFileSync, existsSync } from 'node:fs';
import https from 'node:https';
import path from 'node:path';
import { startDaemon, tempDir, type DaemonHandle, type Json, type TestLike } from '../helpers/daemon.js';
import { CLIENT_SECRET, startCloud, connectorConfig, addDevice, type Cloud, type DeviceFiles, throughMarker, jsonAnswer } from '../helpers/fleet.js';

const MiB = 1024 * 1024;
const CHUNK = 256 * 1024;

async function setup(t: TestLike): Promise<{ dir: string; cloud: Cloud; d: DaemonHandle; dev: DeviceFiles; config: Json }> {
  const dir = tempDir(t, 'ec-stream-');
  const cloud = await startCloud(t, dir);
  const secretFile = path.join(dir, 'connector-client.secret');
  writeFileSync(secretFile, CLIENT_SECRET, { mode: 0o600 });
  const config = connectorConfig(cloud, secretFile, { bridge: { uplink: { chunk_size: CHUNK } } });
  const d = await startDaemon(t, { dir, config });
  const dev = await addDevice(d, 'cam-1');
  return { dir, cloud, d, dev, config };
}

/** A body whose every MiB differs (a misplaced chunk changes the digest). */
function body(bytes: number): { data: Buffer; sha256: Buffer } {
  const data = randomBytes(bytes);
  return { data, sha256: createHash('sha256').update(data).digest() };
}

interface Upload {
  write(b: Buffer): void;
  end(): void;
  abort(): void;
  answer: Promise<{ status: number; body: Json }>;
}

/** POST /api/publish/{id} with Content-Length (and Content-Digest), the body written by the test as it likes. */
function startUpload(d: DaemonHandle, dev: DeviceFiles, total: number, digest: Buffer, topic: string): Upload {
  let req!: ReturnType<typeof https.request>;
  const answer = new Promise<{ status: number; body: Json }>((resolve, reject) => {
    req = https.request(
      `https://127.0.0.1:${d.ports.api}/api/publish/${dev.id}?topic=${encodeURIComponent(topic)}`,
      {
        method: 'POST',
        ca: readFileSync(dev.ca),
        headers: {
          authorization: `Bearer ${dev.token}`,
          'content-type': 'application/octet-stream',
          'content-length': String(total),
          'content-digest': `sha-256=:${digest.toString('base64')}:`,
        },
      },
      jsonAnswer(resolve),
    );
    req.on('error', reject);
  });
  answer.catch(() => undefined);
  return { write: (b) => void req.write(b), end: () => req.end(), abort: () => req.destroy(), answer };
}

function partialsDir(cloud: Cloud): string {
  return path.join(cloud.storeDir, 'partials');
}

/** Bytes the cloud holds of messages in progress (its partials/*.part files). */
function partBytes(cloud: Cloud): number {
  const dir = partialsDir(cloud);
  if (!existsSync(dir)) return 0;
  let n = 0;
  for (const f of readdirSync(dir)) if (f.endsWith('.part')) n += statSync(path.join(dir, f)).size;
  return n;
}

/** A 6 MiB upload whose first 3 MiB are written and partly at the cloud already. */
async function halfSent(cloud: Cloud, d: DaemonHandle, dev: DeviceFiles, topic: string): Promise<{ b: ReturnType<typeof body>; up: Upload }> {
  const b = body(6 * MiB);
  const up = startUpload(d, dev, b.data.length, b.sha256, topic);
  up.write(b.data.subarray(0, 3 * MiB));
  await until('chunks of the upload at the cloud', () => partBytes(cloud) >= CHUNK);
  return { b, up };
}

/** Poll a condition on files (no event to wait for there), bounded. */
async function until(what: string, cond: () => boolean, timeoutMs = 20_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}


t.test('an upload of known length goes upstream while it arrives; the cloud stores it only after the 202', async (t) => {
  const { cloud, d, dev } = await setup(t);
  const total = 8 * MiB + 1000;
  const b = body(total);
  const up = startUpload(d, dev, total, b.sha256, `devices/${dev.id}/video`);
  up.write(b.data.subarray(0, 5 * MiB));
  // chunks reach the cloud while the rest of the body has not even been sent
  await until('the cloud to hold chunks of the upload in progress', () => partBytes(cloud) >= 2 * CHUNK);
  t.ok(readdirSync(partialsDir(cloud)).some((f) => f.endsWith('.part')), 'held as a message in progress, not stored');
  up.write(b.data.subarray(5 * MiB));
  up.end();
  const res = await up.answer;
  t.equal(res.status, 202, JSON.stringify(res.body));
  t.equal(res.body.sha256, b.sha256.toString('hex'));
  const got = await throughMarker(t, d, cloud, dev, 'the streamed upload');
  t.same(got.map((m) => [m.topic, m.size, m.sha256]), [[`devices/${dev.id}/video`, total, b.sha256.toString('hex')]], 'stored once, whole, with its digest');
  t.equal(got[0]?.id, res.body.message_id, 'under the message id the 202 named');
  await until('the cloud to drop the partial state', () => partBytes(cloud) === 0);
  t.equal(readdirSync(path.join(d.stateDir, 'journal', 'tmp')).length, 0, 'no staging file left at the connector');
});

t.test('an upload cut off midway, and one with a wrong digest: discarded at the cloud, nothing stored', async (t) => {
  const { cloud, d, dev } = await setup(t);
  const total = 6 * MiB;
  // 1. the client goes away after half of the body
  const cut = body(total);
  const a = startUpload(d, dev, total, cut.sha256, `devices/${dev.id}/cut`);
  a.write(cut.data.subarray(0, 3 * MiB));
  await until('chunks of the first upload at the cloud', () => partBytes(cloud) >= CHUNK);
  let mark = cloud.proc.logs.length;
  a.abort();
  await cloud.proc.waitForLog((l) => cloud.proc.logs.indexOf(l) >= mark && l.msg === 'partial message discarded by the connector', 20_000, 'the DISCARD of the cut-off upload');
  await until('the cloud to drop its bytes', () => partBytes(cloud) === 0);
  // 2. a whole body that does not match its Content-Digest: 400, and the cloud drops what it had
  const wrong = body(total);
  mark = cloud.proc.logs.length;
  const w = startUpload(d, dev, total, Buffer.alloc(32), `devices/${dev.id}/wrong`);
  w.write(wrong.data);
  w.end();
  t.equal((await w.answer).status, 400, 'wrong digest: 400');
  await cloud.proc.waitForLog((l) => cloud.proc.logs.indexOf(l) >= mark && l.msg === 'partial message discarded by the connector', 20_000, 'the DISCARD of the upload with a wrong digest');
  t.equal(partBytes(cloud), 0, 'nothing of it held at the cloud');
  // 3. then a good one
  const good = body(3 * MiB + 17);
  const g = startUpload(d, dev, good.data.length, good.sha256, `devices/${dev.id}/good`);
  g.write(good.data);
  g.end();
  t.equal((await g.answer).status, 202);
  const got = await throughMarker(t, d, cloud, dev, 'the good upload');
  t.same(got.map((m) => m.topic), [`devices/${dev.id}/good`], 'only the acknowledged upload reached the cloud');
  t.equal(got[0]?.sha256, good.sha256.toString('hex'));
});

t.test('daemon killed (SIGKILL) midway through an upload: after the restart the cloud drops the partial; nothing of it is delivered', async (t) => {
  const { dir, cloud, d, dev } = await setup(t);
  const { up } = await halfSent(cloud, d, dev, `devices/${dev.id}/killed`);
  const held = readdirSync(partialsDir(cloud)).filter((f) => f.endsWith('.json') || f.endsWith('.part'));
  const mark = cloud.proc.logs.length;
  await d.stop('SIGKILL');
  t.equal((await up.answer.then((r) => r.status).catch(() => 0)), 0, 'the client got no answer (no 202)');
  // the cloud persisted what it held of it when the link dropped; the restarted connector has no record of that id
  await cloud.proc.waitForLog((l) => cloud.proc.logs.indexOf(l) >= mark && l.msg === 'ingest connection closed', 20_000, 'the cloud seeing the connector go');
  const d2 = await startDaemon(t, { dir, configFile: d.configFile });
  const discarded = await cloud.proc.waitForLog(
    (l) => cloud.proc.logs.indexOf(l) >= mark && l.msg === 'partial message discarded by the connector',
    20_000,
    'the restarted connector discarding the partial',
  );
  t.ok(held.length > 0, `the cloud held the partial (${held.join(', ')})`);
  await until('the cloud to drop its bytes', () => partBytes(cloud) === 0);
  // a new upload gets a new id (the boot nonce): it cannot collide with what the cloud held
  const good = body(2 * MiB + 3);
  const g = startUpload(d2, dev, good.data.length, good.sha256, `devices/${dev.id}/after`);
  g.write(good.data);
  g.end();
  const res = await g.answer;
  t.equal(res.status, 202);
  t.not(res.body.message_id, discarded.id, 'a new message id');
  const got = await throughMarker(t, d2, cloud, dev, 'the upload after the restart');
  t.same(got.map((m) => m.topic), [`devices/${dev.id}/after`], 'nothing of the killed upload was delivered');
  t.equal(got[0]?.sha256, good.sha256.toString('hex'));
});

t.test('the link stalls mid-upload: the 202 still comes (the body is no longer held for the link); the daemon is killed before the cloud stored it; after the restart it arrives once, under its id', async (t) => {
  const { dir, cloud, d, dev } = await setup(t);
  const { b, up } = await halfSent(cloud, d, dev, `devices/${dev.id}/stalled`);
  cloud.proc.proc.kill('SIGSTOP'); // the cloud freezes: no ACK, no read; the connector judges the link dead
  t.teardown(() => void cloud.proc.proc.kill('SIGCONT'));
  up.write(b.data.subarray(3 * MiB));
  up.end();
  const res = await up.answer;
  t.equal(res.status, 202, 'acknowledged once durable in the journal, link or not');
  await d.stop('SIGKILL');
  cloud.proc.proc.kill('SIGCONT');
  const d2 = await startDaemon(t, { dir, configFile: d.configFile });
  const got = await throughMarker(t, d2, cloud, dev, 'the acknowledged upload after the restart');
  t.same(got.map((m) => [m.id, m.size, m.sha256]), [[res.body.message_id, b.data.length, b.sha256.toString('hex')]], 'stored once, whole, under the id of its 202');
  await until('the cloud to drop the partial state', () => partBytes(cloud) === 0);
});

t.test('an upload declared larger than api.max_upload_bytes: 413 before anything is read or sent', async (t) => {
  const dir = tempDir(t, 'ec-stream-');
  const cloud = await startCloud(t, dir);
  const secretFile = path.join(dir, 'connector-client.secret');
  writeFileSync(secretFile, CLIENT_SECRET, { mode: 0o600 });
  const d = await startDaemon(t, { dir, config: connectorConfig(cloud, secretFile, { api: { max_upload_bytes: 4 * MiB }, bridge: { uplink: { chunk_size: CHUNK } } }) });
  const dev = await addDevice(d, 'cam-2');
  const b = body(5 * MiB);
  const up = startUpload(d, dev, b.data.length, b.sha256, `devices/${dev.id}/big`);
  up.write(b.data.subarray(0, MiB));
  const res = await up.answer;
  t.equal(res.status, 413);
  t.equal(partBytes(cloud), 0, 'nothing of it reached the cloud');
  const got = await throughMarker(t, d, cloud, dev, 'after the refused upload');
  t.same(got, [], 'nothing delivered');
});
