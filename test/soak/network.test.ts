/**
 * Fault suite — the network between the gateway and the cloud: a silent cut
 * (no FIN, no RST) under load, then recovery; a slow, throttled link. The
 * uplink must notice the dead link by its own heartbeat (bridge.uplink.dead_after_ms),
 * reconnect, and lose nothing; devices keep getting PUBACKs meanwhile (the journal).
 */
import t from 'tap';
import { tempDir } from '../helpers/daemon.js';
import { addDevice, startSite, tail, Publisher, sentinelsIn, deliveryFigures, formatFigures } from '../helpers/fleet.js';
import { NetProxy } from '../helpers/netproxy.js';
import { cycles } from '../helpers/soak.js';

const CUTS = cycles(1, 5);
t.setTimeout(240_000);

t.test(`silent network cut under load (${CUTS}×): detected, reconnected, nothing lost`, async (t) => {
  let proxy: NetProxy | undefined;
  const dir = tempDir(t, 'ec-soak-cut-');
  const site = await startSite(t, dir, {
    ports: async (cloud) => {
      proxy = new NetProxy(cloud.port);
      t.teardown(() => proxy!.close());
      return { uplink: await proxy.start() };
    },
  });
  const d = site.d;
  const pubs = [new Publisher(await addDevice(d, 'cut-a')), new Publisher(await addDevice(d, 'cut-b'))];
  await Promise.all(pubs.map((p) => p.run(d)));
  for (let i = 0; i < CUTS; i++) {
    await pubs[0]!.waitAcked(pubs[0]!.acked.length + 100);
    const before = proxy!.accepted;
    proxy!.set('blackhole');
    // the journal keeps acknowledging while the link is silently dead
    await Promise.all(pubs.map((p) => p.waitAcked(p.acked.length + 100)));
    proxy!.set('forward');
    // the uplink must give up on the dead connection by itself and open a new one
    await proxy!.waitAccepted(before + 1, 30_000);
    t.ok(proxy!.accepted > before, `cut ${i + 1}: the uplink noticed the dead link by itself and opened a new connection`);
  }
  await Promise.all(pubs.map((p) => p.finish()));
  const got = await tail(t, site.cloud, sentinelsIn(pubs), 'every device sentinel', 60_000, true);
  const f = deliveryFigures(got, new Map(pubs.map((p) => [p.dev.id, p.sent])), new Map(pubs.map((p) => [p.dev.id, p.acked])));
  t.comment(formatFigures(`silent cut (${CUTS}×)`, f));
  t.equal(f.lost, 0, 'no acknowledged message lost');
  t.equal(f.duplicated, 0, 'no duplicate');
  t.equal(f.outOfOrder, 0, 'order per device kept');
});

t.test('slow, throttled link: everything arrives, in order, once', async (t) => {
  let proxy: NetProxy | undefined;
  const dir = tempDir(t, 'ec-soak-slow-');
  const site = await startSite(t, dir, {
    ports: async (cloud) => {
      proxy = new NetProxy(cloud.port);
      proxy.mode = 'slow';
      proxy.delayMs = 40;
      proxy.bytesPerSecond = 64 * 1024;
      t.teardown(() => proxy!.close());
      return { uplink: await proxy.start() };
    },
  });
  const pub = new Publisher(await addDevice(site.d, 'slow-a'));
  await pub.run(site.d);
  await pub.waitAcked(300);
  await pub.finish();
  const got = await tail(t, site.cloud, sentinelsIn([pub]), 'the sentinel over the slow link', 90_000, true);
  const f = deliveryFigures(got, new Map([[pub.dev.id, pub.sent]]), new Map([[pub.dev.id, pub.acked]]));
  t.comment(formatFigures('slow link (40 ms, 64 KiB/s)', f));
  t.equal(f.lost, 0, 'no acknowledged message lost');
  t.equal(f.duplicated, 0, 'no duplicate');
  t.equal(f.outOfOrder, 0, 'order kept');
});
