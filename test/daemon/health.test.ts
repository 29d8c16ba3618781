/**
 * The metrics/health listener's status page routes, in process on 127.0.0.1
 * port 0: read-only (GET/HEAD, 405 otherwise), security headers and a strict
 * CSP whose hashes match the page's only inline style and script, a
 * self-contained page, the sampled throughput ring (bounded, from counters), and
 * check-config's warning when the listener leaves loopback.
 */
import t from 'tap';
import http from 'node:http';
import { createHash } from 'node:crypto';
import path from 'node:path';
import { Counter, Registry } from 'prom-client';
import { HealthServer } from '../../daemon/health.js';
import { StatusPage, SampleRing, statusPageHtml, counterValue } from '../../daemon/status-page.js';
import type { DaemonStatus } from '../../daemon/status.js';
import { silentLogger, LogRing, createLogger } from '../../core/logger.js';
import { SECURITY_HEADERS } from '../../api/api.js';
import { parseConfigText } from '../../core/config/load.js';
import { runCli, tempDir, writeConfig, testConfig, type TestLike } from '../helpers/daemon.js';

function fakeStatus(over: Partial<DaemonStatus['summary']> = {}, now = Date.now()): DaemonStatus {
  return {
    pid: 1,
    version: '0.1.0',
    uptime_s: 10,
    config: '/etc/edge-connector/connector.yaml',
    state_dir: '/var/lib/edge-connector',
    ready: { ready: false, reasons: ['uplink: oldest message 300s old'] },
    ports: {},
    summary: {
      devices_connected: 4,
      devices_registered: 7,
      listeners: {},
      journal: { messages: 12, bytes: 3456, oldest_unacked_age_s: 300, drain_rate_msg_s: null },
      uplink: { state: 'backoff', last_ack_age_s: 310, reconnects: 5 },
      expiries: [
        { what: 'server certificate', expires_at: new Date(now + 5 * 86400e3).toISOString(), seconds_left: 5 * 86400 },
        { what: 'device CA', expires_at: new Date(now + 3000 * 86400e3).toISOString(), seconds_left: 3000 * 86400 },
        { what: 'cloud token', expires_at: new Date(now + 120e3).toISOString(), seconds_left: 120 },
      ],
      ...over,
    },
    components: { uplink: { url: 'wss://user:hunter2@cloud.example/ingest', secret: 'should-never-show' } },
  };
}

function request(port: number, method: string, p: string): Promise<{ status: number; headers: http.IncomingHttpHeaders; body: string }> {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port, method, path: p, agent: false }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => (body += d));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body }));
    });
    req.on('error', reject);
    req.end(method === 'GET' || method === 'HEAD' ? undefined : '{}');
  });
}

async function server(t: TestLike, page?: StatusPage): Promise<HealthServer> {
  const registry = new Registry();
  const h = new HealthServer({ host: '127.0.0.1', port: 0, enabled: true }, registry, silentLogger());
  if (page) h.setStatusPage({ ...statusPageHtml(), json: () => page.json() });
  await h.start();
  t.teardown(() => h.close());
  return h;
}

t.test('only GET and HEAD; the page and its JSON carry the API security headers and a strict CSP', async (t) => {
  const registry = new Registry();
  const page = new StatusPage({ registry, status: () => fakeStatus() });
  const h = await server(t, page);
  for (const p of ['/', '/status.json', '/metrics', '/readyz']) {
    for (const m of ['POST', 'PUT', 'DELETE', 'PATCH', 'OPTIONS']) {
      const r = await request(h.boundPort, m, p);
      t.equal(r.status, 405, `${m} ${p} → 405`);
      t.equal(r.headers.allow, 'GET, HEAD');
    }
  }
  const html = await request(h.boundPort, 'GET', '/');
  t.equal(html.status, 200);
  t.match(html.headers['content-type'], /^text\/html/);
  const json = await request(h.boundPort, 'GET', '/status.json');
  t.equal(json.status, 200);
  t.match(json.headers['content-type'], /^application\/json/);
  for (const r of [html, json]) {
    for (const [k, v] of Object.entries(SECURITY_HEADERS)) if (k !== 'content-security-policy') t.equal(r.headers[k], v, `${k}`);
  }
  t.equal(json.headers['content-security-policy'], SECURITY_HEADERS['content-security-policy']);

  // the CSP allows exactly the page's one inline style and one inline script, by hash
  const csp = String(html.headers['content-security-policy']);
  t.notMatch(csp, /unsafe-inline|unsafe-eval|\*|http/, 'no wildcard, no unsafe-*');
  t.match(csp, /default-src 'none'/);
  t.match(csp, /frame-ancestors 'none'/);
  t.match(csp, /connect-src 'self'/);
  const script = /<script>([\s\S]*?)<\/script>/.exec(html.body)![1]!;
  const style = /<style>([\s\S]*?)<\/style>/.exec(html.body)![1]!;
  const hash = (s: string): string => `'sha256-${createHash('sha256').update(s).digest('base64')}'`;
  t.match(csp, `script-src ${hash(script)}`, 'script hash matches');
  t.match(csp, `style-src ${hash(style)}`, 'style hash matches');
  t.equal(html.body.match(/<script/g)!.length, 1, 'one script');
  t.notMatch(html.body, /\s(src|href)="(https?:)?\/\//, 'no external resource');
  t.notMatch(html.body, /\sstyle="|\son[a-z]+="/, 'no inline style or handler attributes (the CSP would block them)');
  t.notMatch(script, /innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(/, 'text is rendered with textContent only');

  const head = await request(h.boundPort, 'HEAD', '/status.json');
  t.equal(head.status, 200);
  t.equal(head.body, '', 'HEAD has no body');
  const headPage = await request(h.boundPort, 'HEAD', '/');
  t.equal(headPage.status, 200);
  t.equal(headPage.body, '');
});

t.test('without a status page the routes are 404 (metrics only)', async (t) => {
  const h = await server(t);
  t.equal((await request(h.boundPort, 'GET', '/')).status, 404);
  t.equal((await request(h.boundPort, 'GET', '/status.json')).status, 404);
  t.equal((await request(h.boundPort, 'GET', '/healthz')).status, 200);
});

t.test('status.json: named facts only, expiry warning under 14 days, token under uplink, redacted logs', async (t) => {
  const ring = new LogRing(20);
  const log = createLogger({ level: 'info', destination: { write: () => {} }, ring });
  log.child({ component: 'uplink' }).warn({ authorization: 'Bearer abcdefghijklmnopqrstuvwxyz' }, 'token eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlc2ln refused');
  const page = new StatusPage({ registry: new Registry(), status: () => fakeStatus(), logs: ring });
  const s = page.json();
  t.same(s.ready, { ready: false, reasons: ['uplink: oldest message 300s old'] });
  t.same(s.devices, { connected: 4, registered: 7 });
  t.same(s.journal, { messages: 12, bytes: 3456, oldest_age_s: 300, drain_per_s: null, in_per_s: null });
  t.same({ ...s.uplink, token_expires_at: undefined }, { state: 'backoff', connected: false, last_ack_age_s: 310, reconnects: 5, token_expires_in_s: 120, token_expires_at: undefined });
  t.same(
    s.certificates.map((c) => [c.what, c.warn]),
    [
      ['server certificate', true],
      ['device CA', false],
    ],
    'certificates only (the token is under uplink); warn under 14 days',
  );
  t.equal(s.logs.length, 1);
  t.equal(s.logs[0]!.msg, 'token [redacted] refused');
  const text = JSON.stringify(s);
  for (const secret of ['hunter2', 'should-never-show', 'c2lnbmF0dXJl', 'abcdefghijklmnop', '/var/lib/edge-connector']) t.notMatch(text, secret, `${secret} not exposed`);
});

t.test('throughput: rates from counter deltas on a clock, a bounded 15-minute ring, resets count from zero', async (t) => {
  const registry = new Registry();
  const inC = new Counter({ name: 'connector_messages_total', help: 'in', labelNames: ['direction'], registers: [registry] });
  const outC = new Counter({ name: 'connector_uplink_messages_acked_total', help: 'out', registers: [registry] });
  let now = 1_000_000;
  const page = new StatusPage({ registry, status: () => fakeStatus(), now: () => now, intervalMs: 5000 });
  await page.sample();
  t.same(page.throughput().in_per_s, [], 'one sample is no rate yet');
  t.same(page.rates(), { drain_per_s: null, in_per_s: null }, 'rates unknown until one interval was sampled');
  inC.inc({ direction: 'in' }, 50);
  outC.inc(25);
  now += 5000;
  await page.sample();
  inC.inc({ direction: 'in' }, 10);
  now += 5000;
  await page.sample();
  const tp = page.throughput();
  t.same(tp.in_per_s, [10, 2]);
  t.same(tp.delivered_per_s, [5, 0]);
  t.same(tp.t, [1_005_000, 1_010_000]);
  t.equal(tp.window_s, 900);
  t.equal(tp.interval_s, 5);
  const s = page.json();
  t.equal(s.journal!.drain_per_s, 2.5, 'drain rate: mean delivered/s over the last minute');
  t.equal(s.journal!.in_per_s, 6);
  t.same(page.rates(), { drain_per_s: 2.5, in_per_s: 6 }, 'rates(): the same figures, for `connector status`');

  for (let i = 0; i < 500; i++) {
    now += 5000;
    inC.inc({ direction: 'in' }, 5);
    await page.sample();
  }
  t.equal(page.throughput().in_per_s.length, 180, '15 min / 5 s samples, no more');
  t.ok(page.throughput().in_per_s.every((v) => v === 1));

  // the ring itself
  const r = new SampleRing(3);
  for (let i = 1; i <= 5; i++) r.push(i, i * 10);
  t.same(r.toArray(), [
    { t: 3, v: 30 },
    { t: 4, v: 40 },
    { t: 5, v: 50 },
  ]);
  t.equal(await counterValue(registry, 'connector_messages_total', { direction: 'out' }), 0);
  t.equal(await counterValue(registry, 'nope'), null);
});

/**
 * `p`, or a failure after `ms`. The bound also keeps the event loop alive while the awaited
 * event can only come from an unref'd timer (the sampler's).
 */
async function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([p, new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms)))]);
  } finally {
    clearTimeout(timer);
  }
}

t.test('the sampler is a timer that stops with close(); nothing else runs between requests', async (t) => {
  const registry = new Registry();
  let reads = 0;
  const page = new StatusPage({ registry, status: () => fakeStatus(), intervalMs: 20 });
  const orig = registry.getSingleMetric.bind(registry);
  // barrier on the reads themselves: the hook resolves the waiter once the count is reached
  let target = Infinity;
  let reached: () => void = () => {};
  registry.getSingleMetric = ((name: string) => {
    reads++;
    if (reads >= target) reached();
    return orig(name);
  }) as typeof registry.getSingleMetric;
  await page.start();
  await page.start();
  const first = reads;
  await within(
    new Promise<void>((resolve) => {
      target = first + 6;
      reached = resolve;
    }),
    5000,
    'six reads by the sampler',
  );
  await page.close();
  await page.close();
  const after = reads;
  // proof that time passed without a fixed sleep: a second page with the same interval samples
  // three more times (its injected clock counts the samples); the closed page would have sampled too
  let witnessSamples = 0;
  let witnessed: () => void = () => {};
  const witness = new StatusPage({
    registry: new Registry(),
    status: () => fakeStatus(),
    intervalMs: 20,
    now: () => {
      if (++witnessSamples >= 4) witnessed();
      return Date.now();
    },
  });
  const threeIntervals = new Promise<void>((resolve) => (witnessed = resolve));
  await witness.start(); // first sample at start, then one per interval
  await within(threeIntervals, 5000, 'three samples of the witness page');
  await witness.close();
  t.equal(reads, after, 'no sampling after close (three sampling intervals later)');
});

t.test('check-config warns (and still says ok) when the metrics listener leaves loopback', async (t) => {
  const yaml = (host: string): string => `metrics:\n  host: ${host}\n`;
  for (const host of ['127.0.0.1', '::1', 'localhost', '127.0.0.2']) {
    t.same(parseConfigText(yaml(`"${host}"`), '/x/connector.yaml', { env: {}, checkSecrets: false }).warnings, [], `${host}: no warning`);
  }
  for (const host of ['0.0.0.0', '::', '192.168.1.10']) {
    const w = parseConfigText(yaml(`"${host}"`), '/x/connector.yaml', { env: {}, checkSecrets: false }).warnings;
    t.equal(w.length, 1, `${host}: one warning`);
    t.match(w[0], /^\/x\/connector\.yaml:2:\d+ metrics\.host: .* not a loopback address/);
  }
  t.same(parseConfigText('metrics:\n  enabled: false\n  host: 0.0.0.0\n', '/x/connector.yaml', { env: {}, checkSecrets: false }).warnings, [], 'listener off: nothing exposed');
  const viaEnv = parseConfigText('', '/x/connector.yaml', { env: { CONNECTOR_METRICS_HOST: '0.0.0.0' }, checkSecrets: false }).warnings;
  t.match(viaEnv[0], /env CONNECTOR_METRICS_HOST metrics\.host/, 'an env override is named');

  const dir = tempDir(t);
  const file = writeConfig(dir, testConfig(path.join(dir, 'state'), { metrics: { host: '0.0.0.0' } }));
  const r = await runCli(['check-config', '-c', file]);
  t.equal(r.code, 0, 'still valid');
  t.equal(r.stdout, 'ok\n');
  t.match(r.stderr, /^warning: .*connector\.yaml:\d+:\d+ metrics\.host: "0\.0\.0\.0" is not a loopback address/);
  const ok = await runCli(['check-config', '-c', writeConfig(dir, testConfig(path.join(dir, 'state')), 'loop.yaml')]);
  t.equal(ok.stderr, '', 'no warning on loopback');
});
