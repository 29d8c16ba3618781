/**
 * Fault suite — crash loop: devices publish QoS 1 continuously while the
 * connector is killed with SIGKILL at random moments and restarted on the same
 * state. Afterwards every PUBACKed message is in the cloud exactly once and in
 * order per device. Fast level in `npm test`, ≥ 20 cycles in `npm run soak`.
 */
import t from 'tap';
import { startDaemon, tempDir, type DaemonHandle } from '../helpers/daemon.js';
import { addDevice, startSite, tail, Publisher, sentinelsIn, deliveryFigures, formatFigures } from '../helpers/fleet.js';
import { cycles, seeded, FULL } from '../helpers/soak.js';

const CYCLES = cycles(3);
const DEVICES = FULL ? 5 : 3;

t.setTimeout((FULL ? 540 : 150) * 1000);

t.test(`crash loop: ${CYCLES} SIGKILLs of the connector under QoS 1 load`, async (t) => {
  const rnd = seeded();
  const dir = tempDir(t, 'ec-soak-crash-');
  const site = await startSite(t, dir);
  let d: DaemonHandle = site.d;
  const pubs: Publisher[] = [];
  for (let k = 0; k < DEVICES; k++) pubs.push(new Publisher(await addDevice(d, `crash-${k}`)));
  const started = Date.now();
  for (let cycle = 0; cycle < CYCLES; cycle++) {
    await Promise.all(pubs.map((p) => p.run(d)));
    // a random moment: after 20…220 more acknowledgements of the first device
    const target = pubs[0]!.acked.length + 20 + Math.floor(rnd.next() * 200);
    await pubs[0]!.waitAcked(target, 30_000);
    await d.stop('SIGKILL');
    await Promise.all(pubs.map((p) => p.disconnect()));
    d = await startDaemon(t, { dir, configFile: d.configFile });
  }
  await Promise.all(pubs.map((p) => p.run(d)));
  await Promise.all(pubs.map((p) => p.waitAcked(p.acked.length + 10)));
  await Promise.all(pubs.map((p) => p.finish()));
  const got = await tail(t, site.cloud, sentinelsIn(pubs), 'every device sentinel', 90_000);
  const f = deliveryFigures(got, new Map(pubs.map((p) => [p.dev.id, p.sent])), new Map(pubs.map((p) => [p.dev.id, p.acked])));
  t.comment(formatFigures(`crash loop (${CYCLES} cycles, ${DEVICES} devices, seed ${rnd.seed})`, f, `${((Date.now() - started) / 1000).toFixed(1)} s`));
  t.ok(f.acked > CYCLES * 20, `devices kept publishing between kills (${f.acked} acknowledged)`);
  t.equal(f.lost, 0, 'no acknowledged message lost');
  t.equal(f.duplicated, 0, 'no message delivered twice');
  t.equal(f.outOfOrder, 0, 'order per device kept');
  t.equal(f.unknown, 0, 'nothing delivered that no device sent');
});
