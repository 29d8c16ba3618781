/**
 * The monitoring files we ship work as shipped:
 *  - every metric name used by contrib/grafana/edge-connector.json and
 *    contrib/prometheus/alerts.yml is exported on /metrics of a running daemon
 *    (a child process with the bridge on);
 *  - `promtool check rules` accepts the rules and `promtool test rules` runs
 *    their unit tests (contrib/prometheus/alerts.test.yml): each alert fires
 *    at its threshold and not below it.
 * promtool comes from Debian's `prometheus` package: skipped locally without
 * it, a failure under CI (CI set; .ci/run installs it).
 */
import t from 'tap';
import { execFile } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { parse } from 'yaml';
import { startDaemon, REPO } from '../helpers/daemon.js';

const DASHBOARD = path.join(REPO, 'contrib/grafana/edge-connector.json');
const RULES = path.join(REPO, 'contrib/prometheus/alerts.yml');
const RULE_TESTS = path.join(REPO, 'contrib/prometheus/alerts.test.yml');
const PROMTOOL = ['/usr/bin/promtool', '/usr/local/bin/promtool'].find((p) => existsSync(p));

const KEYWORDS = new Set(['by', 'without', 'on', 'ignoring', 'group_left', 'group_right', 'bool', 'and', 'or', 'unless', 'offset', 'inf', 'nan']);

/** The metric names a PromQL expression reads (functions, keywords, labels, ranges and Grafana variables removed). */
function metricNames(expr: string): string[] {
  const e = expr
    .replace(/"(?:[^"\\]|\\.)*"/g, '""')
    .replace(/\{[^}]*\}/g, ' ')
    .replace(/\[[^\]]*\]/g, ' ')
    .replace(/\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)/g, ' ')
    .replace(/\$\{?\w+\}?/g, ' ');
  const out: string[] = [];
  for (const m of e.matchAll(/[A-Za-z_:][A-Za-z0-9_:]*/g)) {
    const id = m[0];
    if (KEYWORDS.has(id.toLowerCase())) continue;
    if (e.slice(m.index + id.length).trimStart().startsWith('(')) continue; // a function
    if (/^[0-9]/.test(id)) continue;
    out.push(id);
  }
  return out;
}

function dashboardExprs(node: unknown, out: string[] = []): string[] {
  if (Array.isArray(node)) for (const n of node) dashboardExprs(n, out);
  else if (node && typeof node === 'object') {
    for (const [k, v] of Object.entries(node)) {
      if (k === 'expr' && typeof v === 'string') out.push(v);
      else if (k === 'definition' && typeof v === 'string') {
        // template variable: label_values(metric, label)
        const m = /label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)/.exec(v);
        if (m) out.push(m[1]!);
      } else dashboardExprs(v, out);
    }
  }
  return out;
}

function run(cmd: string, args: string[]): Promise<{ code: number; out: string }> {
  return new Promise((resolve) => {
    execFile(cmd, args, { timeout: 60000 }, (err, stdout, stderr) => {
      resolve({ code: err ? (typeof err.code === 'number' ? err.code : 1) : 0, out: `${stdout}${stderr}` });
    });
  });
}

t.test('the extractor finds metric names and nothing else', async (t) => {
  t.same(metricNames('sum by (instance, le) (rate(connector_a_bucket{instance=~"$instance",x="y(z)"}[$__rate_interval]))'), ['connector_a_bucket']);
  t.same(metricNames('connector_a > 0 and connector_b > 300'), ['connector_a', 'connector_b']);
  t.same(metricNames('changes(connector_c[1h]) > 2'), ['connector_c']);
  t.same(metricNames('time() - max(connector_d)'), ['connector_d']);
  t.same(metricNames('connector_e < 14 * 86400'), ['connector_e']);
});

t.test('every metric the dashboard and the alert rules use is on /metrics of a running daemon', async (t) => {
  const d = await startDaemon(t, {
    config: {
      bridge: {
        enabled: true,
        uplink: { url: 'wss://127.0.0.1:1/ingest', reconnect_min_ms: 1000 },
        token: { url: 'https://127.0.0.1:1/oauth/token', client_secret: 'file:./state/cloud-client.secret' },
      },
    },
  });
  const text = await (await fetch(`http://127.0.0.1:${d.ports.metrics}/metrics`)).text();
  const types = new Map<string, string>();
  for (const m of text.matchAll(/^# TYPE (\S+) (\S+)$/gm)) types.set(m[1]!, m[2]!);
  t.ok(types.size > 30, `${types.size} metrics exported`);
  const exported = (name: string): boolean => {
    if (types.has(name)) return true;
    const base = name.replace(/_(bucket|sum|count)$/, '');
    return base !== name && (types.get(base) === 'histogram' || types.get(base) === 'summary');
  };

  const dash = JSON.parse(readFileSync(DASHBOARD, 'utf8')) as { panels: { id: number; title: string; type: string; targets?: { expr: string }[] }[]; uid: string };
  t.equal(dash.uid, 'edge-connector');
  const ids = dash.panels.map((p) => p.id);
  t.equal(new Set(ids).size, ids.length, 'panel ids are unique');
  for (const p of dash.panels.filter((p) => p.type !== 'row')) t.ok(p.targets && p.targets.length > 0, `panel "${p.title}" has queries`);
  const rules = (parse(readFileSync(RULES, 'utf8')) as { groups: { rules: { alert: string; expr: string; annotations: Record<string, string> }[] }[] }).groups.flatMap((g) => g.rules);
  t.ok(rules.length >= 6, `${rules.length} alert rules`);
  for (const r of rules) {
    t.ok(r.annotations.summary && r.annotations.runbook, `${r.alert} has a summary and runbook text`);
  }

  const sources: [string, string][] = [...dashboardExprs(dash).map((e): [string, string] => ['dashboard', e]), ...rules.map((r): [string, string] => [`alert ${r.alert}`, r.expr])];
  const used = new Set<string>();
  for (const [where, expr] of sources) {
    const names = metricNames(expr);
    t.ok(names.length > 0, `${where}: reads a metric (${expr})`);
    for (const n of names) {
      used.add(n);
      if (!exported(n)) t.fail(`${where}: ${n} is not exported on /metrics (${expr})`);
    }
  }
  t.pass(`${used.size} distinct metric names checked`);
  // the areas the issue names are covered
  for (const n of ['connector_messages_total', 'connector_uplink_messages_acked_total', 'connector_journal_depth_messages', 'connector_journal_oldest_age_seconds', 'connector_uplink_last_ack_age_seconds', 'connector_broker_refusals_total', 'connector_certificate_expiry_seconds', 'connector_process_process_resident_memory_bytes']) {
    t.ok(used.has(n), `uses ${n}`);
  }
});

t.test('promtool accepts the rules and their unit tests pass', async (t) => {
  if (!PROMTOOL) {
    if (process.env.CI) t.fail('promtool is not installed (.ci/run installs Debian\'s prometheus package)');
    else t.ok(true, 'promtool checks', { skip: 'promtool not installed: apt-get install prometheus (CI installs it and fails without it)' });
    return;
  }
  const check = await run(PROMTOOL, ['check', 'rules', RULES]);
  t.equal(check.code, 0, `promtool check rules: ${check.out.trim()}`);
  const test = await run(PROMTOOL, ['test', 'rules', RULE_TESTS]);
  t.equal(test.code, 0, `promtool test rules: ${test.out.trim()}`);
});
