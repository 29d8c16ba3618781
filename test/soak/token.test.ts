/**
 * Fault suite — token trouble: cloud access tokens that live 3 s, and the
 * token endpoint down for longer than a token lives while devices keep
 * publishing. The cloud refuses the expired token; the uplink must get a new
 * one once the endpoint is back, by itself, and lose nothing.
 */
import t from 'tap';
import { tempDir } from '../helpers/daemon.js';
import { addDevice, startSite, tail, Publisher, sentinelsIn, deliveryFigures, formatFigures } from '../helpers/fleet.js';
import { NetProxy } from '../helpers/netproxy.js';

t.setTimeout(180_000);

t.test('token endpoint down longer than a token lives (3 s tokens): no loss, recovery by itself', async (t) => {
  let proxy: NetProxy | undefined;
  const dir = tempDir(t, 'ec-soak-token-');
  const site = await startSite(t, dir, {
    tokenTtlS: 3,
    ports: async (cloud) => {
      proxy = new NetProxy(cloud.port);
      t.teardown(() => proxy!.close());
      return { token: await proxy.start() };
    },
  });
  const { d } = site;
  const pub = new Publisher(await addDevice(d, 'tok-a'));
  await pub.run(d);
  await pub.waitAcked(100);
  const grantsBefore = proxy!.accepted;
  proxy!.set('refuse');
  // longer than a token lives: the cloud drops the link for the expired token, the endpoint refuses
  await d.waitForLog((l) => typeof l.code === 'string' && /ECONN_CLOUD_TOKEN/.test(String(l.code)), 30_000, 'a token endpoint error');
  await pub.waitAcked(pub.acked.length + 200, 30_000);
  t.pass('devices are acknowledged while the token endpoint is down (the journal holds)');
  proxy!.set('forward');
  await proxy!.waitAccepted(grantsBefore + 1, 30_000);
  await pub.waitAcked(pub.acked.length + 50);
  await pub.finish();
  const got = await tail(t, site.cloud, sentinelsIn([pub]), 'the sentinel after the token endpoint came back', 60_000, true);
  const f = deliveryFigures(got, new Map([[pub.dev.id, pub.sent]]), new Map([[pub.dev.id, pub.acked]]));
  t.comment(formatFigures('token endpoint outage (3 s tokens)', f));
  t.equal(f.lost, 0, 'no acknowledged message lost');
  t.equal(f.duplicated, 0, 'no duplicate');
  t.equal(f.outOfOrder, 0, 'order kept');
});
