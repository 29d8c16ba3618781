#!/usr/bin/env node
/**
 * Reference cloud store benchmark (issue 10): the store alone, in process.
 * Run after `npm run build`:
 *
 *   node bench/cloud-store.mjs                 # new store (dist/) vs the store of git rev ae3959f, same run
 *   node bench/cloud-store.mjs --old REV       # compare against another revision's cloud/store.ts
 *   node bench/cloud-store.mjs --quick         # fewer messages
 *   node bench/cloud-store.mjs --no-strace     # skip the syscall counts
 *
 * For 64 B and 4 KiB messages (one-chunk messages: `commitData`, what the
 * ingest does for every message that fits one chunk), for each store:
 *  - saturation: N commits with 2 048 in flight (many connections' messages
 *    sharing group-commit rounds) → msg/s, CPU µs per message (process user +
 *    system, libuv pool threads included), fsync rounds;
 *  - 5 000 msg/s open loop for a few seconds → achieved rate, CPU µs/msg,
 *    commit latency p50/p99 (queue → durable);
 *  - syscalls per message: the saturation run again in a child under
 *    `strace -f -c` (when /usr/bin/strace exists).
 * The old store is the previous cloud/store.ts, transpiled from git (types
 * stripped) against the same dist/ modules, so both run in the same process
 * kind, on the same disk, in the same run. Absolute figures drift on a shared
 * machine; compare the two columns.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createHash } from 'node:crypto';
import { execFileSync, spawnSync } from 'node:child_process';
import { fileURLToPath, pathToFileURL } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const repo = path.join(here, '..');
const dist = path.join(repo, 'dist');
if (!fs.existsSync(path.join(dist, 'cloud/store.js'))) {
  console.error('dist/cloud/store.js is missing: run `npm run build` first');
  process.exit(1);
}
const args = process.argv.slice(2);
const flag = (f) => args.includes(f);
const opt = (f, d) => (args.includes(f) ? args[args.indexOf(f) + 1] : d);
const QUICK = flag('--quick');
const OLD_REV = opt('--old', 'ae3959f');
const N = Number(opt('--n', QUICK ? 5000 : 20000));
const RATE_SECONDS = QUICK ? 1.5 : 4;
const WINDOW = 2048;

const { silentLogger } = await import(pathToFileURL(path.join(dist, 'core/logger.js')).href);
const root = fs.mkdtempSync(path.join(os.tmpdir(), 'bench-cloud-store-'));
process.on('exit', () => fs.rmSync(root, { recursive: true, force: true }));
let dirN = 0;
const freshDir = () => path.join(root, `s${dirN++}`);

/** The previous store: cloud/store.ts of OLD_REV with its types stripped, importing the same dist/ modules. */
async function oldStoreModule(rev) {
  const out = path.join(root, `old-${rev}`, 'store.js');
  if (!fs.existsSync(out)) {
    const src = execFileSync('git', ['-C', repo, 'show', `${rev}:cloud/store.ts`], { encoding: 'utf8' });
    const ts = (await import('typescript')).default;
    let js = ts.transpileModule(src, { compilerOptions: { module: ts.ModuleKind.ESNext, target: ts.ScriptTarget.ES2022 } }).outputText;
    js = js.replace(/from '\.\.\/([^']+)'/g, (_m, p) => `from '${pathToFileURL(path.join(dist, p)).href}'`);
    fs.mkdirSync(path.dirname(out), { recursive: true });
    fs.writeFileSync(out, js);
  }
  return import(pathToFileURL(out).href);
}

async function loadImpl(name) {
  if (name === 'new') return (await import(pathToFileURL(path.join(dist, 'cloud/store.js')).href)).CloudStore;
  return (await oldStoreModule(OLD_REV)).CloudStore;
}

function messages(size, n) {
  const payload = Buffer.alloc(size, 7);
  const sha = createHash('sha256').update(payload).digest('hex');
  return { payload, sha, meta: (i) => ({ device_id: `dev${i % 10}`, topic: `devices/dev${i % 10}/telemetry`, qos: 1, received_at: Date.now() }), n };
}

const cpuNow = () => {
  const u = process.cpuUsage();
  return u.user + u.system;
};

/** N commits, WINDOW in flight. */
async function saturation(Store, size, n) {
  const s = new Store(freshDir(), silentLogger());
  await s.open();
  const m = messages(size, n);
  let next = 0;
  const t0 = process.hrtime.bigint();
  const c0 = cpuNow();
  await new Promise((resolve, reject) => {
    let inflight = 0;
    let done = 0;
    const pump = () => {
      while (inflight < WINDOW && next < n) {
        const i = next++;
        inflight++;
        s.commitData(`bench-${i}`, 'gw-bench', m.meta(i), m.payload, m.sha).then(() => {
          inflight--;
          if (++done === n) resolve();
          else pump();
        }, reject);
      }
    };
    pump();
  });
  const secs = Number(process.hrtime.bigint() - t0) / 1e9;
  const cpu = cpuNow() - c0;
  const rounds = s.rounds;
  await s.close();
  return { rate: n / secs, cpuUs: cpu / n, rounds };
}

/** A fixed rate (open loop): `rate` msg/s in 10 ms ticks for `seconds`. */
async function fixedRate(Store, size, rate, seconds) {
  const s = new Store(freshDir(), silentLogger());
  await s.open();
  const total = Math.round(rate * seconds);
  const m = messages(size, total);
  const lat = [];
  let sent = 0;
  let done = 0;
  let failed = 0;
  const t0 = process.hrtime.bigint();
  const c0 = cpuNow();
  await new Promise((resolve) => {
    const tick = () => {
      const due = Math.min(total, Math.floor((Number(process.hrtime.bigint() - t0) / 1e9) * rate));
      while (sent < due) {
        const i = sent++;
        const q = process.hrtime.bigint();
        s.commitData(`bench-${i}`, 'gw-bench', m.meta(i), m.payload, m.sha).then(
          () => {
            lat.push(Number(process.hrtime.bigint() - q) / 1e6);
            if (++done + failed === total) resolve();
          },
          () => {
            if (done + ++failed === total) resolve();
          },
        );
      }
      if (sent < total) setTimeout(tick, 10);
    };
    tick();
  });
  const secs = Number(process.hrtime.bigint() - t0) / 1e9;
  const cpu = cpuNow() - c0;
  await s.close();
  lat.sort((a, b) => a - b);
  const pct = (p) => lat[Math.min(lat.length - 1, Math.floor(lat.length * p))] ?? NaN;
  return { rate: done / secs, cpuUs: cpu / total, p50: pct(0.5), p99: pct(0.99), failed };
}

/** Child mode for strace: one saturation run. */
if (flag('--child')) {
  const Store = await loadImpl(opt('--child'));
  const r = await saturation(Store, Number(opt('--size', '64')), N);
  process.stdout.write(JSON.stringify(r) + '\n');
  process.exit(0);
}

function straceCounts(impl, size) {
  const out = path.join(root, `strace-${impl}-${size}.txt`);
  const r = spawnSync('strace', ['-f', '-c', '-o', out, process.execPath, fileURLToPath(import.meta.url), '--child', impl, '--size', String(size), '--n', String(N), '--old', OLD_REV], { encoding: 'utf8' });
  if (r.status !== 0 || !fs.existsSync(out)) return undefined;
  const counts = {};
  for (const line of fs.readFileSync(out, 'utf8').split('\n')) {
    const f = line.trim().split(/\s+/);
    // % time  seconds  usecs/call  calls  [errors]  syscall
    if (f.length >= 5 && /^\d/.test(f[0]) && /^\d+$/.test(f[3])) counts[f[f.length - 1]] = Number(f[3]);
  }
  return counts;
}

const fmt = (x, d = 1) => (Number.isFinite(x) ? x.toFixed(d) : '-');
console.log(`cloud store bench: ${os.cpus().length} CPU ${os.cpus()[0]?.model ?? ''}, node ${process.version}, N=${N}, window ${WINDOW}, old = ${OLD_REV}:cloud/store.ts, new = dist/ (${execFileSync('git', ['-C', repo, 'rev-parse', '--short', 'HEAD'], { encoding: 'utf8' }).trim()})`);
const impls = ['old', 'new'];
const stores = Object.fromEntries(await Promise.all(impls.map(async (i) => [i, await loadImpl(i)])));
const rows = [];
for (const size of [64, 4096]) {
  // alternate old/new so drift on the shared machine hits both
  const sat = { old: [], new: [] };
  const fix = { old: [], new: [] };
  for (let rep = 0; rep < (QUICK ? 1 : 2); rep++) {
    for (const i of impls) sat[i].push(await saturation(stores[i], size, N));
    for (const i of impls) fix[i].push(await fixedRate(stores[i], size, 5000, RATE_SECONDS));
  }
  const best = (xs, k, lower = true) => xs.map((x) => x[k]).sort((a, b) => (lower ? a - b : b - a))[0];
  for (const i of impls) {
    rows.push({
      size,
      impl: i,
      satRate: best(sat[i], 'rate', false),
      satCpu: best(sat[i], 'cpuUs'),
      perRound: N / best(sat[i], 'rounds'),
      fixRate: best(fix[i], 'rate', false),
      fixCpu: best(fix[i], 'cpuUs'),
      p50: best(fix[i], 'p50'),
      p99: best(fix[i], 'p99'),
    });
  }
}
console.log('\n| size | store | saturation msg/s | CPU µs/msg | msgs per fsync round | at 5 000 msg/s: achieved | CPU µs/msg | commit p50 / p99 ms |');
console.log('|---:|---|---:|---:|---:|---:|---:|---:|');
for (const r of rows) console.log(`| ${r.size} B | ${r.impl} | ${fmt(r.satRate, 0)} | ${fmt(r.satCpu)} | ${fmt(r.perRound)} | ${fmt(r.fixRate, 0)} | ${fmt(r.fixCpu)} | ${fmt(r.p50, 2)} / ${fmt(r.p99, 2)} |`);
for (const size of [64, 4096]) {
  const o = rows.find((r) => r.size === size && r.impl === 'old');
  const n = rows.find((r) => r.size === size && r.impl === 'new');
  console.log(`${size} B: new/old saturation throughput ×${fmt(n.satRate / o.satRate, 2)}, CPU per message at 5 000 msg/s ×${fmt(n.fixCpu / o.fixCpu, 2)} (new ${fmt(n.fixCpu)} µs vs old ${fmt(o.fixCpu)} µs)`);
}

if (!flag('--no-strace') && fs.existsSync('/usr/bin/strace')) {
  console.log(`\nsyscalls per message (strace -f -c, saturation run of ${N} messages in a child, store open/close included):`);
  const keys = ['openat', 'close', 'write', 'pwrite64', 'writev', 'pwritev', 'fdatasync', 'fsync', 'rename', 'futex', 'epoll_pwait', 'epoll_wait', 'io_uring_enter'];
  console.log(`| size | store | total | ${keys.join(' | ')} |`);
  console.log(`|---:|---|---:|${keys.map(() => '---:').join('|')}|`);
  for (const size of [64, 4096]) {
    for (const i of impls) {
      const c = straceCounts(i, size);
      if (!c) {
        console.log(`| ${size} B | ${i} | strace failed | |`);
        continue;
      }
      const total = Object.values(c).reduce((a, b) => a + b, 0);
      console.log(`| ${size} B | ${i} | ${fmt(total / N, 2)} | ${keys.map((k) => fmt((c[k] ?? 0) / N, 3)).join(' | ')} |`);
    }
  }
} else console.log('\nsyscalls: skipped (strace not installed or --no-strace)');
