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

t.test('a component that never closes is bounded by the shutdown timeout; the others still close', async (t) => {
  const ev: string[] = [];
  const lc = new Lifecycle([comp('a', ev), comp('stuck', ev, { hangClose: true }), comp('c', ev)], silentLogger(), 200);
  await lc.start();
  await t.rejects(lc.close(), { code: 'ECONN_SHUTDOWN_TIMEOUT', message: /stuck/ });
  t.same(ev.slice(3), ['close c', 'close stuck']);
});

t.test('reload collects the changes of components that support it', async (t) => {
  const ev: string[] = [];
  const lc = new Lifecycle([comp('a', ev, { reload: ['tls certificate'] }), comp('b', ev)], silentLogger(), 1000);
  await lc.start();
  t.same(await lc.reload({} as Config), ['a: tls certificate']);
  await lc.close();
});
