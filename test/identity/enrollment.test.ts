import t, { type Test } from 'tap';
import { readFileSync, writeFileSync, statSync } from 'node:fs';
import path from 'node:path';
import { createLogger } from '../../core/logger.js';
import { DeviceRegistry } from '../../identity/registry.js';
import { EnrollmentStore, hashEnrollmentToken } from '../../identity/enrollment.js';
import { tempDir } from '../helpers/daemon.js';

const logger = createLogger({ level: 'silent' });
const T0 = Date.parse('2030-01-01T00:00:00Z');

async function fixture(t: Test): Promise<{ store: EnrollmentStore; registry: DeviceRegistry; clock: { now: number }; file: string }> {
  const file = path.join(tempDir(t), 'registry.json');
  const clock = { now: T0 };
  const registry = new DeviceRegistry({ file, logger, now: () => clock.now });
  await registry.start();
  t.teardown(() => registry.close());
  return { store: new EnrollmentStore({ registry, logger, now: () => clock.now }), registry, clock, file };
}

t.test('one-time token: first use succeeds, second is refused', async (t) => {
  const { store } = await fixture(t);
  const e = await store.create({ ttlS: 3600, uses: 1 });
  t.match(e.token, /^enr_[A-Za-z0-9_-]{43}$/);
  t.equal(e.uses, 1);
  t.equal(e.expiresAt.getTime(), T0 + 3600_000);
  t.ok(await store.check(e.token), 'check does not consume');
  t.ok(await store.check(e.token));
  await store.consume(e.token);
  t.notOk(await store.check(e.token));
  await t.rejects(store.consume(e.token), { code: 'ECONN_ENROLL_TOKEN' });
});

t.test('N uses', async (t) => {
  const { store } = await fixture(t);
  const e = await store.create({ ttlS: 60, uses: 3 });
  for (let i = 0; i < 3; i++) await store.consume(e.token);
  await t.rejects(store.consume(e.token), { code: 'ECONN_ENROLL_TOKEN' });
});

t.test('expiry (injected clock)', async (t) => {
  const { store, clock } = await fixture(t);
  const e = await store.create({ ttlS: 60, uses: 5 });
  clock.now = T0 + 59_999;
  await store.consume(e.token);
  clock.now = T0 + 60_000;
  t.notOk(await store.check(e.token));
  await t.rejects(store.consume(e.token), { code: 'ECONN_ENROLL_TOKEN', message: /expired/ });
});

t.test('concurrent use of a one-time token: exactly one wins', async (t) => {
  const { store } = await fixture(t);
  const e = await store.create({ ttlS: 60, uses: 1 });
  const results = await Promise.allSettled(Array.from({ length: 10 }, () => store.consume(e.token)));
  t.equal(results.filter((r) => r.status === 'fulfilled').length, 1);
});

t.test('stored hashed, persisted with the registry (0600), survives a restart', async (t) => {
  const { store, registry, file } = await fixture(t);
  const e = await store.create({ ttlS: 60, uses: 2 });
  const text = readFileSync(file, 'utf8');
  t.notMatch(text, e.token, 'token not stored');
  t.notMatch(text, e.token.slice(4), 'no part of it either');
  t.match(text, hashEnrollmentToken(e.token));
  t.equal(statSync(file).mode & 0o777, 0o600);
  await store.consume(e.token);
  await registry.close();

  const r2 = new DeviceRegistry({ file, logger, now: () => T0 });
  await r2.start();
  t.teardown(() => r2.close());
  const s2 = new EnrollmentStore({ registry: r2, logger, now: () => T0 });
  await s2.consume(e.token);
  await t.rejects(s2.consume(e.token), { code: 'ECONN_ENROLL_TOKEN' }, 'use count persisted');
});

t.test('bad input: unknown, malformed, bad create options', async (t) => {
  const { store } = await fixture(t);
  await t.rejects(store.consume('enr_nope'), { code: 'ECONN_ENROLL_TOKEN' });
  await t.rejects(store.consume(''), { code: 'ECONN_ENROLL_TOKEN' });
  await t.rejects(store.consume(undefined as unknown as string), { code: 'ECONN_ENROLL_TOKEN' });
  await t.rejects(store.consume('x'.repeat(10000)), { code: 'ECONN_ENROLL_TOKEN' });
  t.notOk(await store.check(42 as unknown as string));
  for (const [ttlS, uses] of [
    [0, 1],
    [60, 0],
    [1.5, 1],
    [60, -1],
    [Number.NaN, 1],
    [1e12, 1],
  ]) {
    await t.rejects(store.create({ ttlS: ttlS!, uses: uses! }), { code: 'ECONN_BAD_REQUEST' }, `ttl ${ttlS} uses ${uses}`);
  }
});

t.test('standalone file storage', async (t) => {
  const file = path.join(tempDir(t), 'enrollments.json');
  const clock = { now: T0 };
  const store = new EnrollmentStore({ registry: { file }, logger, now: () => clock.now });
  const e = await store.create({ ttlS: 10, uses: 1 });
  t.notMatch(readFileSync(file, 'utf8'), e.token);
  const other = new EnrollmentStore({ registry: { file }, logger, now: () => clock.now });
  await other.consume(e.token);
  await t.rejects(other.consume(e.token), { code: 'ECONN_ENROLL_TOKEN' });

  const bad = path.join(tempDir(t), 'bad.json');
  writeFileSync(bad, '{nope');
  const broken = new EnrollmentStore({ registry: { file: bad }, logger });
  await t.rejects(broken.consume('enr_x'), { code: 'ECONN_REGISTRY_CORRUPT' });
  t.equal(readFileSync(bad, 'utf8'), '{nope', 'corrupt file left untouched');
});

t.test('refund gives a use back (also of a one-time token already pruned), once, never past expiry or above its uses', async (t) => {
  const { store, clock } = await fixture(t);
  const e = await store.create({ ttlS: 60, uses: 1 });
  const use = await store.consume(e.token);
  t.notOk(await store.check(e.token), 'used up');
  await use.refund();
  t.ok(await store.check(e.token), 'usable again after the refund');
  await use.refund(); // a second refund of the same use is a no-op
  const again = await store.consume(e.token);
  await t.rejects(store.consume(e.token), { code: 'ECONN_ENROLL_TOKEN' }, 'one use only, not two');
  clock.now += 61_000;
  await again.refund();
  clock.now -= 61_000;
  // the refund after expiry did not bring it back
  t.notOk(await store.check(e.token), 'no refund after expiry');

  const multi = await store.create({ ttlS: 60, uses: 2 });
  const u1 = await store.consume(multi.token);
  await u1.refund();
  await store.consume(multi.token);
  await store.consume(multi.token);
  await t.rejects(store.consume(multi.token), { code: 'ECONN_ENROLL_TOKEN' }, 'never more uses than created');
});
