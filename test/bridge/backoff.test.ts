import t from 'tap';
import { Backoff, parseRetryAfter } from '../../bridge/backoff.js';

t.test('delays grow exponentially up to maxMs, each within [minMs, cap]', async (t) => {
  const hi = new Backoff({ minMs: 100, maxMs: 3000, random: () => 0.999999 });
  const seen = Array.from({ length: 8 }, () => hi.next());
  t.same(seen, [100, 200, 400, 800, 1600, 3000, 3000, 3000]);
  const lo = new Backoff({ minMs: 100, maxMs: 3000, random: () => 0 });
  t.same(Array.from({ length: 5 }, () => lo.next()), [100, 100, 100, 100, 100], 'full jitter reaches down to minMs');
});

t.test('full jitter spreads delays across the range', async (t) => {
  const b = new Backoff({ minMs: 10, maxMs: 10_000 });
  for (let i = 0; i < 20; i++) b.next();
  const samples = Array.from({ length: 200 }, () => {
    b.reset();
    for (let i = 0; i < 20; i++) b.next();
    return b.next();
  });
  for (const s of samples) t.ok(s >= 10 && s <= 10_000, `${s} in range`, { diagnostic: false });
  t.ok(new Set(samples).size > 50, 'delays are spread, not identical');
  t.ok(Math.min(...samples) < 3000 && Math.max(...samples) > 7000, 'covers low and high parts of the range');
});

t.test('reset starts over; attempts counts', async (t) => {
  const b = new Backoff({ minMs: 50, maxMs: 1000, random: () => 0.999999 });
  b.next();
  b.next();
  b.next();
  t.equal(b.attempts, 3);
  t.equal(b.cap(), 400);
  b.reset();
  t.equal(b.attempts, 0);
  t.equal(b.next(), 50);
});

t.test('a huge number of attempts does not overflow', async (t) => {
  const b = new Backoff({ minMs: 1, maxMs: 5000, random: () => 0.999999 });
  for (let i = 0; i < 5000; i++) b.next();
  t.equal(b.next(), 5000);
});

t.test('Retry-After is honoured as a floor, bounded by maxRetryAfterMs', async (t) => {
  const b = new Backoff({ minMs: 100, maxMs: 1000, random: () => 0, maxRetryAfterMs: 60_000 });
  t.equal(b.next(5000), 5000, 'server asked for 5 s: wait 5 s even though maxMs is 1 s');
  t.equal(b.next(10), 100, 'a shorter Retry-After does not shorten the backoff');
  t.equal(b.next(10 * 3600_000), 60_000, 'bounded');
  t.equal(b.next(Number.NaN), 100);
  t.equal(b.next(-5), 100);
});

t.test('bad options are refused; a broken random source cannot produce NaN', async (t) => {
  t.throws(() => new Backoff({ minMs: -1, maxMs: 10 }), RangeError);
  t.throws(() => new Backoff({ minMs: 1, maxMs: 10, factor: 0.5 }), RangeError);
  const b = new Backoff({ minMs: 5, maxMs: 50, random: () => Number.NaN });
  t.equal(b.next(), 5);
  const c = new Backoff({ minMs: 500, maxMs: 100 });
  t.equal(c.next(), 500, 'maxMs below minMs is raised to minMs');
});

t.test('parseRetryAfter: delta-seconds and HTTP-date', async (t) => {
  const now = Date.parse('Wed, 21 Oct 2015 07:28:00 GMT');
  t.equal(parseRetryAfter('120', now), 120_000);
  t.equal(parseRetryAfter(' 0 ', now), 0);
  t.equal(parseRetryAfter('Wed, 21 Oct 2015 07:28:30 GMT', now), 30_000);
  t.equal(parseRetryAfter('Wed, 21 Oct 2015 07:27:00 GMT', now), 0, 'a date in the past means now');
  t.equal(parseRetryAfter(['7'], now), 7000, 'array header value');
  t.equal(parseRetryAfter(3, now), 3000, 'numeric seconds');
  for (const bad of [undefined, null, '', 'soon', '-3', '1.5', '9999999999999999999999', 'Foo, 99 Bar 2015 99:99:99 GMT', []]) {
    t.equal(parseRetryAfter(bad as string | undefined, now), undefined, `${JSON.stringify(bad)} is ignored`);
  }
  t.equal(parseRetryAfter(-1, now), undefined);
});
