/**
 * Fault suite — power cut: devices publish QoS 1 continuously while the
 * connector is killed with SIGKILL, and then everything the journal wrote but
 * had not fsynced is thrown away, as a power cut throws away the page cache;
 * the connector restarts on what is left. Afterwards every PUBACKed message is
 * in the cloud exactly once and in order per device.
 *
 * Method (feasible without a block-device fault target, honest about what the
 * disk held): the connector runs under test/helpers/daemon-hooks.mjs
 * --record-syncs, which wraps every fsync/fdatasync of the process and, when
 * one succeeds, records the file's size as it was when the sync was issued
 * (plus a snapshot of the whole content for small files rewritten in place,
 * such as ack.log) before the daemon's code sees the success — i.e. before any
 * PUBACK that depends on it. Asynchronous syncs report success 20 ms late (a
 * slow disk), so kills land on unsynced data. Every other boot the uplink
 * cannot reach the cloud, so the journal alone holds what was acknowledged.
 * The method was checked against bridge.journal.fsync=never (PUBACK before
 * the data is durable): the cuts then lose hundreds of acknowledged messages. After the SIGKILL, test/helpers/power-cut.ts cuts
 * each file under <state_dir>/journal back to that: segments to their last
 * synced length, small files to their synced snapshot, files never synced to
 * their length at boot (empty if created during the boot).
 * Not modelled: directory entries are taken as durable (a create, rename or
 * unlink is never undone), and the rest of the state dir (registry, PKI) is
 * left as is. Fast level in `npm test`, ≥ 20 cycles in `npm run soak`.
 */
import t from 'tap';
import { writeFileSync } from 'node:fs';
import path from 'node:path';
import { freePort, startDaemon, tempDir, type DaemonHandle } from '../helpers/daemon.js';
import { addDevice, startCloud, connectorConfig, CLIENT_SECRET, tail, Publisher, sentinelsIn, deliveryFigures, formatFigures } from '../helpers/fleet.js';
import { baseline, cutPower } from '../helpers/power-cut.js';
import { cycles, seeded, FULL } from '../helpers/soak.js';

const CYCLES = cycles(3);
const DEVICES = FULL ? 5 : 3;
/**
 * A slow disk's fsync (an SD card takes tens of ms): while a sync is pending
 * the written records are only in the page cache, so with this latency most
 * SIGKILLs land on unsynced data and the cut has something to throw away.
 */
const SYNC_LATENCY_MS = 20;

t.setTimeout((FULL ? 540 : 150) * 1000);

t.test(`power cut: ${CYCLES} SIGKILLs with the journal's unsynced writes thrown away`, async (t) => {
  const rnd = seeded();
  const dir = tempDir(t, 'ec-soak-power-');
  const rec = path.join(dir, 'syncs');
  const cloud = await startCloud(t, dir);
  const secretFile = path.join(dir, 'connector-client.secret');
  writeFileSync(secretFile, CLIENT_SECRET, { mode: 0o600 });
  const journalDir = path.join(dir, 'state', 'journal');
  let before = baseline(journalDir);
  // every other boot the uplink points at a port where nothing listens: the journal then holds everything
  // acknowledged during that boot (nothing is on its way to the cloud yet), which the cut must not lose
  const deadPort = await freePort();
  const boot = (cycle: number): Promise<DaemonHandle> =>
    startDaemon(t, {
      dir,
      config: connectorConfig(cloud, secretFile, {}, cycle % 2 === 0 && cycle < CYCLES ? { uplink: deadPort } : {}),
      hooks: { recordSyncs: rec, syncLatencyMs: SYNC_LATENCY_MS },
    });
  let d: DaemonHandle = await boot(0);
  const pubs: Publisher[] = [];
  for (let k = 0; k < DEVICES; k++) pubs.push(new Publisher(await addDevice(d, `power-${k}`)));
  const started = Date.now();
  const cut = { files: 0, restored: 0, truncated: 0, bytesLost: 0 };
  for (let cycle = 0; cycle < CYCLES; cycle++) {
    await Promise.all(pubs.map((p) => p.run(d)));
    // a random moment: after 20…220 more acknowledgements of the first device (20…80 at the fast level: every
    // acknowledgement waits for a 20 ms sync here, and npm test runs files side by side)
    const target = pubs[0]!.acked.length + 20 + Math.floor(rnd.next() * (FULL ? 200 : 60));
    await pubs[0]!.waitAcked(target, 30_000);
    // then 0…2·SYNC_LATENCY_MS later: right at an acknowledgement every device's next record is not yet
    // written (the batch waits fsync_max_delay_ms); a random offset into the next batch's write and sync
    // is the moment a power cut hurts. A fault's timing, not a wait for a condition.
    await new Promise((resolve) => setTimeout(resolve, Math.floor(rnd.next() * 2 * SYNC_LATENCY_MS)));
    await d.stop('SIGKILL');
    await Promise.all(pubs.map((p) => p.disconnect()));
    const c = cutPower(journalDir, rec, before);
    for (const k of ['files', 'restored', 'truncated', 'bytesLost'] as const) cut[k] += c[k];
    before = baseline(journalDir);
    d = await boot(cycle + 1);
  }
  await Promise.all(pubs.map((p) => p.run(d)));
  await Promise.all(pubs.map((p) => p.waitAcked(p.acked.length + 10)));
  await Promise.all(pubs.map((p) => p.finish()));
  const got = await tail(t, cloud, sentinelsIn(pubs), 'every device sentinel', 90_000);
  const f = deliveryFigures(got, new Map(pubs.map((p) => [p.dev.id, p.sent])), new Map(pubs.map((p) => [p.dev.id, p.acked])));
  t.comment(
    formatFigures(
      `power cut (${CYCLES} cycles, ${DEVICES} devices, seed ${rnd.seed})`,
      f,
      `${cut.truncated} files cut back and ${cut.restored} restored to their synced snapshot, ${cut.bytesLost} unsynced bytes thrown away; ${((Date.now() - started) / 1000).toFixed(1)} s`,
    ),
  );
  // whether a kill lands on unsynced data is chance; over ≥ 20 cycles it always happens, over 3 usually
  if (FULL) t.ok(cut.bytesLost > 0, `the cuts threw away unsynced data (${cut.bytesLost} bytes)`);
  t.ok(f.acked > CYCLES * 20, `devices kept publishing between cuts (${f.acked} acknowledged)`);
  t.equal(f.lost, 0, 'no acknowledged message lost');
  t.equal(f.duplicated, 0, 'no message delivered twice');
  t.equal(f.outOfOrder, 0, 'order per device kept');
  t.equal(f.unknown, 0, 'nothing delivered that no device sent');
});
