/**
 * Fault suite — state-dir restore and cloned images (issue 9, defect 1): after
 * the restore procedure of docs/operations.md (stop, replace the state
 * directory with a backup, start), every new message must reach the cloud; so
 * must the messages of two gateways started from one image. Message ids must
 * never repeat, or the cloud drops new messages as duplicates of old ones.
 */
import t from 'tap';
import { cpSync, rmSync } from 'node:fs';
import path from 'node:path';
import { startDaemon, tempDir } from '../helpers/daemon.js';
import { addDevice, startSite, tail, Publisher, sentinelsIn, deliveryFigures, formatFigures } from '../helpers/fleet.js';

t.setTimeout(150_000);

t.test('restore of a state-dir backup taken mid-run: every message published after the restore arrives', async (t) => {
  const dir = tempDir(t, 'ec-soak-restore-');
  const site = await startSite(t, dir);
  let d = site.d;
  const pub = new Publisher(await addDevice(d, 'restore-1'));
  await pub.run(d);
  await pub.waitAcked(50);
  // the documented consistent backup: a short stop, copy, start
  await pub.disconnect();
  await d.stop('SIGTERM');
  const backup = path.join(dir, 'state-backup');
  cpSync(d.stateDir, backup, { recursive: true });
  d = await startDaemon(t, { dir, configFile: d.configFile });
  await pub.run(d);
  await pub.waitAcked(pub.acked.length + 50);
  await pub.disconnect();
  await d.stop('SIGTERM');
  // restore the backup: the journal, its counters and everything else go back in time
  rmSync(d.stateDir, { recursive: true, force: true });
  cpSync(backup, d.stateDir, { recursive: true });
  d = await startDaemon(t, { dir, configFile: d.configFile });
  const afterRestore = pub.sent;
  await pub.run(d);
  await pub.waitAcked(pub.acked.length + 20);
  await pub.finish();
  const got = await tail(t, site.cloud, sentinelsIn([pub]), 'the sentinel after the restore', 30_000, true);
  const f = deliveryFigures(got, new Map([[pub.dev.id, pub.sent]]), new Map([[pub.dev.id, pub.acked]]));
  t.comment(formatFigures('state-dir restore', f));
  const lostAfter = pub.acked.filter((n) => n >= afterRestore && !got.some((m) => Buffer.from(m.payload ?? '', 'base64').toString().endsWith(`:${String(n).padStart(6, '0')}`)));
  t.equal(lostAfter.length, 0, `every message acknowledged after the restore arrived (missing ${lostAfter.length})`);
  t.equal(f.lost, 0, 'no acknowledged message lost');
  t.equal(f.duplicated, 0, 'no duplicate delivered');
  t.equal(f.outOfOrder, 0, 'order kept');
});

t.test('two gateways cloned from one used image: both deliver all their messages', async (t) => {
  const dir = tempDir(t, 'ec-soak-clone-');
  const site = await startSite(t, dir);
  const d = site.d;
  const dev = await addDevice(d, 'clone-dev');
  const warm = new Publisher(dev);
  await warm.run(d);
  await warm.waitAcked(30);
  await warm.disconnect();
  await d.stop('SIGTERM');
  // the "image": the used state directory, copied for a second gateway with the same configuration
  const cloneDir = tempDir(t, 'ec-soak-clone2-');
  cpSync(d.stateDir, path.join(cloneDir, 'state'), { recursive: true });
  cpSync(path.join(dir, 'connector-client.secret'), path.join(cloneDir, 'connector-client.secret'));
  const { readFileSync, writeFileSync } = await import('node:fs');
  writeFileSync(path.join(cloneDir, 'connector.yaml'), readFileSync(d.configFile, 'utf8').replaceAll(d.stateDir, path.join(cloneDir, 'state')).replaceAll(path.join(dir, 'connector-client.secret'), path.join(cloneDir, 'connector-client.secret')), { mode: 0o600 });
  const a = await startDaemon(t, { dir, configFile: d.configFile });
  const b = await startDaemon(t, { dir: cloneDir, configFile: path.join(cloneDir, 'connector.yaml') });
  // the same device id behind both gateways is the worst case for id collisions; sequence numbers tell them apart
  const pa = new Publisher(dev);
  await pa.run(a);
  await pa.waitAcked(20);
  await pa.finish();
  const pb = new Publisher({ ...dev });
  pb.sent = 500_000; // the clone's messages carry other numbers
  await pb.run(b);
  await pb.waitAcked(20);
  await pb.finish();
  const got = await tail(t, site.cloud, (m) => m.filter((x) => x.device_id === dev.id).length >= 30 + 40 + 2, 'both gateways\' messages', 30_000, true);
  const texts = new Set(got.map((m) => Buffer.from(m.payload ?? '', 'base64').toString()));
  const missA = pa.acked.filter((n) => !texts.has(`${dev.id}:${String(n).padStart(6, '0')}`));
  const missB = pb.acked.filter((n) => !texts.has(`${dev.id}:${String(n).padStart(6, '0')}`));
  t.comment(`cloned gateways: A acknowledged ${pa.acked.length}, missing ${missA.length}; B acknowledged ${pb.acked.length}, missing ${missB.length}`);
  t.equal(missA.length, 0, 'gateway A: nothing lost');
  t.equal(missB.length, 0, 'gateway B (the clone): nothing lost');
});
