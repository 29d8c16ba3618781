import t from 'tap';
import type { Logger } from '../../core/logger.js';
import { RefusalLog, SourceBudget, sourceOf, REFUSAL_MAX_SOURCES } from '../../core/refusals.js';

function fakeLog(): { log: Logger; lines: { obj: Record<string, unknown>; msg: string }[] } {
  const lines: { obj: Record<string, unknown>; msg: string }[] = [];
  const log = { warn: (obj: Record<string, unknown>, msg: string) => lines.push({ obj, msg }) } as unknown as Logger;
  return { log, lines };
}

/** Timers the test fires by hand. */
function manualTimers(): { set: (fn: () => void, ms: number) => { unref: () => void }; fire: () => void; pending: () => number } {
  let fns: (() => void)[] = [];
  return {
    set: (fn) => {
      fns.push(fn);
      return { unref: () => {} };
    },
    fire: () => {
      const now = fns;
      fns = [];
      for (const f of now) f();
    },
    pending: () => fns.length,
  };
}

t.test('RefusalLog: the first refusals of an interval in full, the rest as one summary line', async (t) => {
  const { log, lines } = fakeLog();
  const timers = manualTimers();
  const r = new RefusalLog({ log, msg: 'MQTT connection refused', what: 'MQTT connections', detailLines: 3, intervalMs: 10_000, setTimer: timers.set, clearTimer: () => {} });
  t.equal(timers.pending(), 0, 'no timer while nothing is refused');
  for (let i = 0; i < 1000; i++) r.refused(i % 2 ? 'ECONN_AUTH_TOKEN' : 'ECONN_AUTH_CERT', `10.0.0.${i % 7}`, { remote: `10.0.0.${i % 7}:1234` });
  t.equal(lines.length, 3, 'a flood of 1000 writes only the detail lines during the interval');
  t.same(lines.map((l) => l.msg), Array(3).fill('MQTT connection refused'));
  t.equal(lines[0]!.obj.code, 'ECONN_AUTH_CERT', 'a detail line carries the code and fields');
  t.equal(lines[0]!.obj.remote, '10.0.0.0:1234');
  t.equal(timers.pending(), 1, 'one timer for the interval');
  timers.fire();
  t.equal(lines.length, 4, 'the interval ends with one summary line');
  const sum = lines[3]!;
  t.match(sum.msg, /^997 more MQTT connections refused in the last 10 s \(not logged one by one\)$/);
  t.equal(sum.obj.code, 'ECONN_RATE_LIMITED');
  t.same(sum.obj.codes, { ECONN_AUTH_TOKEN: 499, ECONN_AUTH_CERT: 498 });
  t.equal((sum.obj.top_sources as unknown[]).length, 5, 'the busiest sources are named');
  t.equal(sum.obj.sources, 7);
  t.equal(r.total, 1000);
  t.equal(timers.pending(), 0, 'quiet again: no timer');
  r.refused('ECONN_AUTH_TOKEN', '10.0.0.1');
  t.equal(lines.length, 5, 'the next interval starts with a detail line again');
  timers.fire();
  t.equal(lines.length, 5, 'no summary when nothing was left out');
});

t.test('RefusalLog: count() never writes a line of its own, only adds to the summary', async (t) => {
  const { log, lines } = fakeLog();
  const timers = manualTimers();
  const r = new RefusalLog({ log, msg: 'refused', what: 'MQTT connections', detailLines: 3, setTimer: timers.set, clearTimer: () => {} });
  for (let i = 0; i < 50; i++) r.count('ECONN_TLS_HANDSHAKE', '10.1.1.1');
  r.refused('ECONN_AUTH_TOKEN', '10.1.1.1');
  t.equal(lines.length, 1, 'only the refusal is logged in full');
  timers.fire();
  t.equal(lines.length, 2);
  t.same(lines[1]!.obj.codes, { ECONN_TLS_HANDSHAKE: 50 });
  t.equal(r.total, 51);
});

t.test('RefusalLog: sources counted per interval are bounded', async (t) => {
  const { log, lines } = fakeLog();
  const timers = manualTimers();
  const r = new RefusalLog({ log, msg: 'refused', what: 'requests', detailLines: 0, setTimer: timers.set, clearTimer: () => {} });
  for (let i = 0; i < REFUSAL_MAX_SOURCES * 3; i++) r.refused('ECONN_AUTH_TOKEN', `src-${i}`);
  r.close();
  t.equal(lines.length, 1);
  t.equal(lines[0]!.obj.sources, REFUSAL_MAX_SOURCES + 1, 'at most REFUSAL_MAX_SOURCES sources plus "other"');
  t.same((lines[0]!.obj.top_sources as { source: string; count: number }[])[0], { source: 'other', count: REFUSAL_MAX_SOURCES * 2 });
});

t.test('SourceBudget: refusals spend a source budget, time refills it, other sources are unaffected', async (t) => {
  let now = 1_000_000;
  const limits = { perS: 2, burst: 5 };
  const b = new SourceBudget(() => limits, () => now);
  t.ok(b.admit('1.2.3.4'), 'a source never refused is admitted');
  t.equal(b.tracked, 0, 'and not even tracked');
  for (let i = 0; i < 5; i++) {
    t.ok(b.admit('1.2.3.4'), `attempt ${i + 1} within the burst`);
    b.refused('1.2.3.4');
  }
  t.notOk(b.admit('1.2.3.4'), 'the burst is spent: turned away');
  t.equal(b.turnedAway, 1);
  t.ok(b.spent('1.2.3.4'), 'spent() says so');
  t.equal(b.turnedAway, 1, 'without counting an attempt');
  t.ok(b.admit('5.6.7.8'), 'another source is not affected');
  t.notOk(b.spent('5.6.7.8'), 'an unknown source has its budget');
  now += 400;
  t.notOk(b.admit('1.2.3.4'), '0.8 of a token after 400 ms: still turned away');
  now += 100;
  t.ok(b.admit('1.2.3.4'), 'one token after 500 ms at 2/s');
  t.notOk(b.admit('1.2.3.4'), 'attempts in flight pay on admission: the next one is turned away before the first is refused');
  b.refused('1.2.3.4');
  t.notOk(b.admit('1.2.3.4'), 'the refusal of an admitted attempt costs nothing more, and nothing is left');
  now += 500;
  t.ok(b.admit('1.2.3.4'), 'a token later');
  b.succeeded('1.2.3.4');
  t.ok(b.admit('1.2.3.4'), 'an attempt that authenticated gives its token back');
  b.succeeded('1.2.3.4');
  now += 10_000;
  t.ok(b.admit('1.2.3.4'), 'refilled');
  t.equal(b.tracked, 0, 'a full bucket with nothing in flight is forgotten');
  limits.perS = 0;
  for (let i = 0; i < 100; i++) b.refused('9.9.9.9');
  t.ok(b.admit('9.9.9.9'), 'perS 0 = no limit');
});

t.test('SourceBudget: tryAdmit() waits while attempts in flight may give tokens back; turnAway() only when nothing is in flight', async (t) => {
  let now = 1_000_000;
  const b = new SourceBudget(() => ({ perS: 1, burst: 2 }), () => now);
  t.equal(b.tryAdmit('9.9.9.9'), 'admit', 'a source never refused is admitted');
  t.notOk(b.turnAway('9.9.9.9'), 'and never turned away at accept');
  b.refused('9.9.9.9'); // one refusal: a bucket with 1 token left
  t.equal(b.tryAdmit('9.9.9.9'), 'admit', 'the last token, paid on admission');
  t.equal(b.tryAdmit('9.9.9.9'), 'wait', 'no token, but one attempt in flight: wait for its outcome');
  t.notOk(b.turnAway('9.9.9.9'), 'not turned away at accept while an attempt is in flight');
  t.equal(b.turnedAway, 0, 'waiting is not turning away');
  b.succeeded('9.9.9.9');
  t.equal(b.tryAdmit('9.9.9.9'), 'admit', 'the attempt authenticated: its token came back');
  b.refused('9.9.9.9');
  t.equal(b.tryAdmit('9.9.9.9'), 'refuse', 'the attempt in flight was refused: budget spent, nothing in flight');
  t.ok(b.turnAway('9.9.9.9'), 'turned away at accept too');
  t.equal(b.turnedAway, 2);
  now += 1000;
  t.equal(b.tryAdmit('9.9.9.9'), 'admit', 'refilled');
});

t.test('SourceBudget: the number of tracked sources is bounded (least recently charged goes)', async (t) => {
  const b = new SourceBudget(() => ({ perS: 1, burst: 1 }), () => 0, 100);
  for (let i = 0; i < 1000; i++) b.refused(`s${i}`);
  t.equal(b.tracked, 100);
  t.notOk(b.admit('s999'), 'a recent source is still limited');
  t.ok(b.admit('s0'), 'the oldest was forgotten');
});

t.test('sourceOf: the address of ADDRESS:PORT', async (t) => {
  t.equal(sourceOf('127.0.0.1:5000'), '127.0.0.1');
  t.equal(sourceOf('::ffff:127.0.0.1:5000'), '::ffff:127.0.0.1');
  t.equal(sourceOf(undefined), 'unknown');
  t.equal(sourceOf('noport'), 'noport');
});
