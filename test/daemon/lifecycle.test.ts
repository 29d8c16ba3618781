import t from 'tap';
import { Lifecycle } from '../../daemon/lifecycle.js';
import type { Component } from '../../core/component.js';
import { silentLogger } from '../../core/logger.js';
import type { Config } from '../../core/config/schema.js';

function comp(name: string, events: string[], opts: { failStart?: boolean; hangClose?: boolean; reload?: string[] } = {}): Component {
  return {
    name,
    async start() {
      events.push(`start ${name}`);
      if (opts.failStart) throw new Error(`${name} cannot start`);
    },
    close() {
      events.push(`close ${name}`);
      return opts.hangClose ? new Promise<void>(() => {}) : Promise.resolve();
    },
    ...(opts.reload ? { reload: async () => opts.reload! } : {}),
    status: () => ({ name }),
  };
}

t.test('starts in order and closes in reverse order; close is idempotent', async (t) => {
  const ev: string[] = [];
  const lc = new Lifecycle([comp('a', ev), comp('b', ev), comp('c', ev)], silentLogger(), 1000);
  await lc.start();
  t.same(lc.status(), { a: { name: 'a' }, b: { name: 'b' }, c: { name: 'c' } });
  await Promise.all([lc.close(), lc.close()]);
  await lc.close();
  t.same(ev, ['start a', 'start b', 'start c', 'close c', 'close b', 'close a']);
});

t.test('a failed start closes what already started, in reverse, and rethrows', async (t) => {
  const ev: string[] = [];
  const lc = new Lifecycle([comp('a', ev), comp('b', ev), comp('c', ev, { failStart: true }), comp('d', ev)], silentLogger(), 1000);
  await t.rejects(lc.start(), /c cannot start/);
  t.same(ev, ['start a', 'start b', 'start c', 'close b', 'close a']);
});

t.test('a component that never closes is bounded by the shutdown timeout, gets destroy(err), and the others still close in reverse order', async (t) => {
  const ev: string[] = [];
  const destroyed: Error[] = [];
  const stuck: Component = { ...comp('stuck', ev, { hangClose: true }), destroy: (err) => void destroyed.push(err) };
  const lc = new Lifecycle([comp('a', ev), stuck, comp('c', ev)], silentLogger(), 200);
  await lc.start();
  const t0 = performance.now();
  await t.rejects(lc.close(), { code: 'ECONN_SHUTDOWN_TIMEOUT', message: /stuck/ });
  // bounded: the budget (200 ms) plus one grace period for 'a' (not a speed assertion: 20× headroom for a loaded machine)
  t.ok(performance.now() - t0 < 5000, 'close is bounded');
  t.same(ev.slice(3), ['close c', 'close stuck', 'close a'], 'a closes after stuck was given up on');
  t.equal(destroyed.length, 1, 'stuck got destroy() exactly once');
  t.match(destroyed[0], { code: 'ECONN_SHUTDOWN_TIMEOUT', message: /stuck/ });
});

t.test('every component that overruns is destroyed; one without destroy() is reported and skipped; the rest close', async (t) => {
  const ev: string[] = [];
  const mk = (name: string, withDestroy: boolean): Component => ({
    ...comp(name, ev, { hangClose: true }),
    ...(withDestroy ? { destroy: async () => void ev.push(`destroy ${name}`) } : {}),
  });
  const lc = new Lifecycle([comp('a', ev), mk('x', true), mk('nodestroy', false), mk('y', true), comp('b', ev)], silentLogger(), 100);
  await lc.start();
  await t.rejects(lc.close(), { code: 'ECONN_SHUTDOWN_TIMEOUT', message: /stuck in y/ });
  t.same(ev.slice(5), ['close b', 'close y', 'destroy y', 'close nodestroy', 'close x', 'destroy x', 'close a']);
});

t.test('a destroy() that throws or hangs does not stop the shutdown', async (t) => {
  const ev: string[] = [];
  const lc = new Lifecycle(
    [
      comp('a', ev),
      { ...comp('throws', ev, { hangClose: true }), destroy: () => { throw new Error('boom'); } },
      { ...comp('hangs', ev, { hangClose: true }), destroy: () => new Promise<void>(() => {}) },
    ],
    silentLogger(),
    100,
  );
  await lc.start();
  await t.rejects(lc.close(), { code: 'ECONN_SHUTDOWN_TIMEOUT' });
  t.same(ev.slice(3), ['close hangs', 'close throws', 'close a']);
});

t.test('a component that closes in time is not destroyed', async (t) => {
  const ev: string[] = [];
  const lc = new Lifecycle([{ ...comp('a', ev), destroy: () => void ev.push('destroy a') }], silentLogger(), 1000);
  await lc.start();
  await lc.close();
  t.same(ev, ['start a', 'close a']);
});

t.test('reload collects the changes of components that support it', async (t) => {
  const ev: string[] = [];
  const lc = new Lifecycle([comp('a', ev, { reload: ['tls certificate'] }), comp('b', ev)], silentLogger(), 1000);
  await lc.start();
  t.same(await lc.reload({} as Config), ['a: tls certificate']);
  await lc.close();
});
