/**
 * Fault suite — the cloud goes away under load: killed with SIGKILL at random
 * moments (so some messages are stored but their ACK never leaves), down for
 * a while as devices keep publishing (the journal holds everything), then back
 * on the same port. Every acknowledged message arrives once, in order.
 */
import t from 'tap';
import { tempDir } from '../helpers/daemon.js';
import { addDevice, startSite, startCloud, tail, Publisher, sentinelsIn, deliveryFigures, formatFigures, type Cloud } from '../helpers/fleet.js';
import { cycles, seeded, FULL } from '../helpers/soak.js';

const OUTAGES = cycles(2, 10);
t.setTimeout(300_000);

t.test(`cloud killed ${OUTAGES}× under load and restarted: nothing lost, nothing twice`, async (t) => {
  const rnd = seeded();
  const dir = tempDir(t, 'ec-soak-outage-');
  const site = await startSite(t, dir);
  const d = site.d;
  let cloud: Cloud = site.cloud;
  const pubs = [new Publisher(await addDevice(d, 'out-a')), new Publisher(await addDevice(d, 'out-b')), new Publisher(await addDevice(d, 'out-c'))];
  await Promise.all(pubs.map((p) => p.run(d)));
  for (let i = 0; i < OUTAGES; i++) {
    await pubs[0]!.waitAcked(pubs[0]!.acked.length + (FULL ? 30 + Math.floor(rnd.next() * 150) : 20 + Math.floor(rnd.next() * 40)));
    await cloud.proc.stop('SIGKILL');
    // devices keep publishing while the cloud is down: the journal acknowledges
    await Promise.all(pubs.map((p) => p.waitAcked(p.acked.length + (FULL ? 50 + Math.floor(rnd.next() * 200) : 30 + Math.floor(rnd.next() * 50)))));
    cloud = await startCloud(t, dir, { port: cloud.port });
  }
  await Promise.all(pubs.map((p) => p.finish()));
  const got = await tail(t, cloud, sentinelsIn(pubs), 'every device sentinel', 90_000, true);
  const f = deliveryFigures(got, new Map(pubs.map((p) => [p.dev.id, p.sent])), new Map(pubs.map((p) => [p.dev.id, p.acked])));
  t.comment(formatFigures(`cloud outage (${OUTAGES}×, seed ${rnd.seed})`, f));
  t.equal(f.lost, 0, 'no acknowledged message lost');
  t.equal(f.duplicated, 0, 'no message delivered twice (stored-but-unacknowledged resends dropped by id)');
  t.equal(f.outOfOrder, 0, 'order per device kept');
  t.equal(f.unknown, 0, 'nothing delivered that no device sent');
});
