/**
 * systemd notify protocol and watchdog. No systemd runs as PID 1 here, so the
 * test owns the NOTIFY_SOCKET: a unix-dgram socket bound to a temp path, and
 * the real daemon runs as a child process with NOTIFY_SOCKET / WATCHDOG_USEC.
 */
import t from 'tap';
import net from 'node:net';
import path from 'node:path';
import { createRequire } from 'node:module';
import { spawnDaemon, tempDir, type TestLike, type DaemonHandle, freePort } from '../helpers/daemon.js';
import { adminRequest, adminSocketPath } from '../../daemon/admin.js';
import { SystemdNotifier, watchdogTimeoutMs, oneLine, type NotifyTransport } from '../../daemon/notify.js';
import { createLogger } from '../../core/logger.js';

interface RecvSocket {
  on(event: 'message', cb: (buf: Buffer) => void): void;
  on(event: 'error' | 'listening', cb: (err?: Error) => void): void;
  bind(p: string): void;
  close(): void;
}
const unixDgram = createRequire(import.meta.url)('unix-dgram') as { createSocket(type: 'unix_dgram'): RecvSocket };

interface Datagram {
  text: string;
  at: number;
}

/** A test-owned NOTIFY_SOCKET collecting every datagram in arrival order. */
function notifySocket(t: TestLike) {
  const dir = tempDir(t, 'ec-notify-');
  const file = path.join(dir, 'notify.sock');
  const sock = unixDgram.createSocket('unix_dgram');
  const messages: Datagram[] = [];
  const waiters = new Set<{ pred: (m: Datagram) => boolean; resolve: (m: Datagram) => void }>();
  sock.on('message', (buf: Buffer) => {
    const m = { text: buf.toString('utf8'), at: performance.now() };
    messages.push(m);
    for (const w of waiters) {
      if (w.pred(m)) {
        waiters.delete(w);
        w.resolve(m);
      }
    }
  });
  sock.on('error', (err) => {
    throw err;
  });
  sock.bind(file);
  t.teardown(() => sock.close());
  return {
    file,
    messages,
    /** Wait for a datagram matching pred that arrives after index `from` (default: any so far). */
    waitFor(pred: (m: Datagram) => boolean, what: string, timeoutMs = 20000, from = 0): Promise<Datagram> {
      const found = messages.slice(from).find(pred);
      if (found) return Promise.resolve(found);
      return new Promise((resolve, reject) => {
        const w = {
          pred,
          resolve: (m: Datagram) => {
            clearTimeout(timer);
            resolve(m);
          },
        };
        const timer = setTimeout(() => {
          waiters.delete(w);
          reject(new Error(`no ${what} datagram within ${timeoutMs} ms; got: ${JSON.stringify(messages.map((x) => x.text))}`));
        }, timeoutMs);
        waiters.add(w);
      });
    },
  };
}

const fields = (text: string): Record<string, string> =>
  Object.fromEntries(text.split('\n').filter(Boolean).map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]));


function connectable(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const c = net.connect(port, '127.0.0.1');
    c.once('connect', () => {
      c.destroy();
      resolve(true);
    });
    c.once('error', () => resolve(false));
  });
}

function startWithNotify(t: TestLike, env: NodeJS.ProcessEnv, config: Record<string, unknown> = {}, hooks = false): { d: DaemonHandle; ns: ReturnType<typeof notifySocket> } {
  const ns = notifySocket(t);
  const d = spawnDaemon(t, { env: { NOTIFY_SOCKET: ns.file, ...env }, config, hooks });
  return { d, ns };
}

// ---------------------------------------------------------------- unit level

t.test('WATCHDOG_USEC / WATCHDOG_PID parsing', async (t) => {
  t.equal(watchdogTimeoutMs({}), 0, 'unset: off');
  t.equal(watchdogTimeoutMs({ WATCHDOG_USEC: '30000000' }), 30000);
  t.equal(watchdogTimeoutMs({ WATCHDOG_USEC: '30000000', WATCHDOG_PID: String(process.pid) }), 30000, 'our pid');
  t.equal(watchdogTimeoutMs({ WATCHDOG_USEC: '30000000', WATCHDOG_PID: '1' }, 4242), 0, 'another pid: not for us');
  t.equal(watchdogTimeoutMs({ WATCHDOG_USEC: 'abc' }), 0, 'garbage: off');
  t.equal(watchdogTimeoutMs({ WATCHDOG_USEC: '-5' }), 0, 'negative: off');
  t.equal(watchdogTimeoutMs({ WATCHDOG_USEC: '999' }), 0, 'below 1 ms: off');
  t.equal(oneLine('a\nb\r\nc'), 'a b c');
  t.equal(oneLine('x'.repeat(1000)).length, 400);
});

function fakeTransport(): NotifyTransport & { sent: string[]; closed: boolean } {
  const tr = {
    sent: [] as string[],
    closed: false,
    send(m: string) {
      tr.sent.push(m);
      return Promise.resolve();
    },
    close() {
      tr.closed = true;
    },
  };
  return tr;
}

t.test('without NOTIFY_SOCKET every call is a no-op', async (t) => {
  const tr = fakeTransport();
  const n = new SystemdNotifier({ logger: createLogger({ level: 'silent' }), env: {}, transport: tr });
  n.start();
  t.equal(n.active, false);
  await n.ready('x');
  await n.status('y');
  await n.reloading();
  await n.stopping();
  n.close();
  t.same(tr.sent, []);
});

t.test('message formats: READY, STATUS, RELOADING with MONOTONIC_USEC, STOPPING', async (t) => {
  const tr = fakeTransport();
  const n = new SystemdNotifier({
    logger: createLogger({ level: 'silent' }),
    env: { NOTIFY_SOCKET: '/nonexistent' },
    transport: tr,
    statusText: () => '3 devices,\nuplink connected',
    monotonicUsec: () => 123456789n,
  });
  n.start();
  t.equal(n.active, true);
  await n.ready();
  await n.status('busy');
  await n.reloading();
  await n.reloaded();
  await n.stopping();
  n.close();
  n.close();
  t.same(tr.sent, [
    'READY=1\nSTATUS=3 devices, uplink connected',
    'STATUS=busy',
    'RELOADING=1\nMONOTONIC_USEC=123456789\nSTATUS=reloading configuration',
    'READY=1\nSTATUS=3 devices, uplink connected',
    'STOPPING=1\nSTATUS=stopping',
  ]);
  t.equal(tr.closed, true);
});

t.test('an abstract NOTIFY_SOCKET (@name) is reported, not silently ignored', async (t) => {
  const lines: string[] = [];
  const logger = createLogger({ level: 'info', destination: { write: (s: string) => void lines.push(s) } });
  const n = new SystemdNotifier({ logger, env: { NOTIFY_SOCKET: '@abstract-test' } });
  n.start();
  t.equal(n.active, false);
  await n.ready();
  n.close();
  t.match(lines.join(''), /abstract socket/);
});

t.test('a send error is logged once and never thrown', async (t) => {
  const lines: string[] = [];
  const logger = createLogger({ level: 'info', destination: { write: (s: string) => void lines.push(s) } });
  const ns = notifySocket(t);
  // a path where nobody listens: ECONNREFUSED / ENOENT from sendto
  const n = new SystemdNotifier({ logger, env: { NOTIFY_SOCKET: ns.file + '.missing' } });
  n.start();
  t.equal(n.active, true);
  await n.ready();
  await n.status('again');
  n.close();
  t.equal(lines.filter((l) => l.includes('cannot send to the systemd notify socket')).length, 1);
});

// ---------------------------------------------------------------- the real daemon

t.test('READY=1 arrives once every listener is bound, with a STATUS line', async (t) => {
  const metricsPort = await freePort();
  const ns = notifySocket(t);
  let boundAtReady: Promise<boolean> | undefined;
  const readyP = ns.waitFor((m) => m.text.startsWith('READY=1'), 'READY=1').then((m) => {
    boundAtReady ??= connectable(metricsPort);
    return m;
  });
  const d = spawnDaemon(t, { env: { NOTIFY_SOCKET: ns.file }, config: { metrics: { port: metricsPort } } });
  const ready = await readyP;
  t.equal(await boundAtReady, true, 'the metrics listener accepted a connection as soon as READY=1 arrived');
  const line = await d.waitForLog((l) => l.msg === 'ready', 5000, 'the ready log line');
  const ports = line.ports as Record<string, number>;
  t.ok(Object.keys(ports).length >= 1, `ports reported: ${JSON.stringify(ports)}`);
  for (const [name, port] of Object.entries(ports)) t.equal(await connectable(port), true, `${name} (${port}) is bound`);
  const f = fields(ready.text);
  t.equal(f.READY, '1');
  t.ok(f.STATUS && f.STATUS.length > 0, `STATUS with READY: ${f.STATUS}`);
  t.match(f.STATUS, /uplink off|listening on/, 'the bridge is off in the test config and the status says so');
  t.equal(ns.messages.filter((m) => m.text.startsWith('READY=1')).length, 1, 'exactly one READY=1');
  const s = (await adminRequest(adminSocketPath(d.stateDir), 'status')) as { summary: unknown; pid: number };
  t.equal(s.pid, d.proc.pid);
  t.ok(s.summary, 'status carries a summary');

  // STATUS= follows what happens (refreshed every 5 s when it changed): a device connects
  if (ports.mqtt_tls) {
    const { default: mqtt } = await import('mqtt');
    const dev = (await adminRequest(adminSocketPath(d.stateDir), 'device.add', { id: 'status-dev' })) as { key: string; cert: string; ca: string };
    const c = mqtt.connect(`mqtts://127.0.0.1:${ports.mqtt_tls}`, { key: dev.key, cert: dev.cert, ca: dev.ca, clientId: 'status-dev', protocolVersion: 4, reconnectPeriod: 0 });
    t.teardown(() => void c.end(true));
    const mark = ns.messages.length;
    const st = await ns.waitFor((m) => /^STATUS=1 device, /.test(m.text), 'STATUS with one device', 20000, mark);
    t.match(st.text, /^STATUS=1 device, uplink off$/);
  }
});

t.test('watchdog: WATCHDOG=1 pings while the loop is responsive; RELOADING/READY around SIGHUP; STOPPING on SIGTERM', async (t) => {
  const { d, ns } = startWithNotify(t, { WATCHDOG_USEC: '2000000' });
  await ns.waitFor((m) => m.text.startsWith('READY=1'), 'READY=1');
  const wd = await d.waitForLog((l) => l.msg === 'systemd watchdog enabled', 5000);
  t.equal(wd.ping_interval_ms, 1000);
  const pings = (): number => ns.messages.filter((m) => m.text === 'WATCHDOG=1').length;
  const before = ns.messages.length;
  await ns.waitFor(() => pings() >= 3, 'three WATCHDOG=1', 20000);
  t.ok(pings() >= 3, `${pings()} watchdog pings`);

  const mark = ns.messages.length;
  d.proc.kill('SIGHUP');
  const reloading = await ns.waitFor((m) => m.text.startsWith('RELOADING=1'), 'RELOADING=1', 10000, mark);
  const f = fields(reloading.text);
  t.match(f.MONOTONIC_USEC, /^\d+$/, 'MONOTONIC_USEC sent with RELOADING=1 (systemd >= 253)');
  const idx = ns.messages.indexOf(reloading);
  await ns.waitFor((m) => m.text.startsWith('READY=1'), 'READY=1 after the reload', 10000, idx + 1);
  await d.waitForLog((l) => typeof l.msg === 'string' && l.msg.startsWith('configuration reloaded'), 5000);
  t.ok(ns.messages.length > before);

  const mark2 = ns.messages.length;
  d.proc.kill('SIGTERM');
  await ns.waitFor((m) => m.text.startsWith('STOPPING=1'), 'STOPPING=1', 10000, mark2);
  t.same(await d.exited, { code: 0, signal: null });
});

t.test('an invalid config on SIGHUP still ends the reload with READY=1 (the old config keeps serving)', async (t) => {
  const { d, ns } = startWithNotify(t, {});
  await ns.waitFor((m) => m.text.startsWith('READY=1'), 'READY=1');
  const { writeFileSync } = await import('node:fs');
  writeFileSync(d.configFile, 'log: {level: [\n');
  const mark = ns.messages.length;
  d.proc.kill('SIGHUP');
  const r = await ns.waitFor((m) => m.text.startsWith('RELOADING=1'), 'RELOADING=1', 10000, mark);
  const again = await ns.waitFor((m) => m.text.startsWith('READY=1'), 'READY=1', 10000, ns.messages.indexOf(r) + 1);
  t.ok(ns.messages.indexOf(again) > ns.messages.indexOf(r), 'READY=1 follows RELOADING=1');
  const refused = await d.waitForLog((l) => typeof l.msg === 'string' && l.msg.startsWith('reload refused'), 5000);
  t.ok(refused, 'the refusal is logged');
  t.equal(d.proc.exitCode, null, 'still running');
});

t.test('a blocked event loop sends no WATCHDOG=1 (systemd would restart us)', async (t) => {
  const { d, ns } = startWithNotify(t, { WATCHDOG_USEC: '2000000' }, {}, true);
  await ns.waitFor((m) => m.text.startsWith('READY=1'), 'READY=1');
  await ns.waitFor((m) => m.text === 'WATCHDOG=1', 'a first WATCHDOG=1');
  const sock = adminSocketPath(d.stateDir);

  // 1. blocked outright for longer than the whole watchdog timeout
  t.same(await adminRequest(sock, 'test.block_loop', { ms: 3000 }), { blocked_ms: 3000 });
  const between = (start: string, end: string): Datagram[] => {
    const a = ns.messages.findIndex((m) => m.text === `STATUS=${start}`);
    const b = ns.messages.findIndex((m, i) => i > a && m.text === `STATUS=${end}`);
    t.ok(a >= 0 && b > a, `markers "${start}" … "${end}" found`);
    return ns.messages.slice(a + 1, b);
  };
  t.same(between('test: event loop blocked', 'test: event loop free').filter((m) => m.text === 'WATCHDOG=1'), [], 'no ping while blocked');
  const withheld = await d.waitForLog((l) => typeof l.msg === 'string' && l.msg.includes('withholding the watchdog ping'), 5000);
  t.ok((withheld.lag_ms as number) >= 2000, `the lag that was measured: ${String(withheld.lag_ms)} ms`);
  await d.waitForLog((l) => typeof l.msg === 'string' && l.msg.includes('pings resumed'), 10000);
  const afterFree = ns.messages.findIndex((m) => m.text === 'STATUS=test: event loop free');
  await ns.waitFor((m) => m.text === 'WATCHDOG=1', 'pings after the loop is free again', 10000, afterFree + 1);

  // 2. a loop that still turns between long blocks must not be kept alive by a lucky timer
  const mark = ns.messages.length;
  t.same(await adminRequest(sock, 'test.starve_loop', { block_ms: 1500, every_ms: 20, for_ms: 5000 }), { starved_ms: 5000 });
  const starved = ns.messages.slice(mark);
  const a = starved.findIndex((m) => m.text === 'STATUS=test: event loop starved');
  const b = starved.findIndex((m) => m.text === 'STATUS=test: event loop free');
  t.ok(a >= 0 && b > a, 'starve markers found');
  t.same(starved.slice(a + 1, b).filter((m) => m.text === 'WATCHDOG=1'), [], 'no ping while the loop is starved');
  const s = (await adminRequest(sock, 'status')) as { watchdog: { withheld: number; pings: number } };
  t.ok(s.watchdog.withheld >= 2, `withheld pings counted: ${s.watchdog.withheld}`);
  t.same(await d.stop(), { code: 0, signal: null });
});

t.test('`connector start` has no test hooks, whatever its environment says', async (t) => {
  const { d, ns } = startWithNotify(t, { EDGE_CONNECTOR_TEST_HOOKS: '1', EDGE_CONNECTOR_TEST_HANG_CLOSE: '1' });
  await ns.waitFor((m) => m.text.startsWith('READY=1'), 'READY=1');
  for (const method of ['test.block_loop', 'test.starve_loop', 'test.crash']) {
    await t.rejects(adminRequest(adminSocketPath(d.stateDir), method, { ms: 1 }), { code: 'ECONN_BAD_REQUEST' }, `${method} is unknown`);
  }
  t.same(await d.stop(), { code: 0, signal: null }, 'no component hangs its close');
});

t.test('WATCHDOG_PID of another process: no pings', async (t) => {
  const { d, ns } = startWithNotify(t, { WATCHDOG_USEC: '200000', WATCHDOG_PID: '1' });
  await ns.waitFor((m) => m.text.startsWith('READY=1'), 'READY=1');
  // run through several would-be ping intervals (100 ms each) until the daemon is 1 s old. The
  // watchdog is (rightly) off, so no event marks "ten intervals later": the daemon's own uptime is
  // the clock, polled over the admin socket (bounded: 100 polls, 50 ms apart).
  let uptime = 0;
  for (let i = 0; i < 100 && uptime < 1; i++) {
    uptime = ((await adminRequest(adminSocketPath(d.stateDir), 'status')) as { uptime_s: number }).uptime_s;
    if (uptime < 1) await new Promise((r) => setTimeout(r, 50));
  }
  t.ok(uptime >= 1, `the daemon ran through ten would-be ping intervals (uptime ${uptime} s)`);
  // a later datagram from the daemon (RELOADING=1 on SIGHUP) proves every datagram sent before it arrived
  const mark = ns.messages.length;
  d.proc.kill('SIGHUP');
  const reloading = await ns.waitFor((m) => m.text.startsWith('RELOADING=1'), 'RELOADING=1', 10000, mark);
  t.equal(ns.messages.filter((m) => m.text === 'WATCHDOG=1').length, 0);
  t.notOk(d.logs.some((l) => l.msg === 'systemd watchdog enabled'));
  await ns.waitFor((m) => m.text.startsWith('READY=1'), 'READY=1 after the reload', 10000, ns.messages.indexOf(reloading) + 1);
});
