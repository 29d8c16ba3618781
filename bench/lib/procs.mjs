/**
 * Child processes of a benchmark run and what /proc says about them.
 *
 * Every child started through `spawnChild` is killed (SIGKILL) when the bench
 * exits for any reason, including Ctrl-C and an uncaught error.
 */
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import net from 'node:net';
import { performance } from 'node:perf_hooks';

const children = new Set();
let hooked = false;

export function killAll() {
  for (const c of children) {
    try {
      // a child started as a process group leader (opts.group) is killed with its own children
      if (c.group) process.kill(-c.pid, 'SIGKILL');
      else c.kill('SIGKILL');
    } catch {}
  }
  children.clear();
}

/** Kill this child (and its process group when it leads one) when the bench exits. */
export function track(p, group = false) {
  hook();
  p.group = group;
  children.add(p);
  p.once('exit', () => children.delete(p));
  return p;
}

function hook() {
  if (hooked) return;
  hooked = true;
  process.on('exit', killAll);
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
    process.on(sig, () => {
      process.stderr.write(`\nbench: ${sig}: stopping every child process\n`);
      killAll();
      process.exit(130);
    });
  }
}

/**
 * Spawn a child whose stdout is parsed as JSON lines (pino) into `p.logs`;
 * stderr is kept in `p.errText` (the last 16 KiB) and echoed when BENCH_VERBOSE is set.
 * `opts.group`: start it as a process group leader and kill the whole group on exit
 * (for a child that starts children of its own).
 */
export function spawnChild(cmd, argv, opts = {}) {
  const { group = false, ...spawnOpts } = opts;
  const p = track(spawn(cmd, argv, { stdio: ['ignore', 'pipe', 'pipe'], detached: group, ...spawnOpts }), group);
  p.logs = [];
  p.errText = '';
  p.exited = new Promise((resolve) => p.once('exit', (code, signal) => resolve({ code, signal })));
  p.on('error', (err) => {
    p.errText += String(err.message);
  });
  let partial = '';
  p.stdout.setEncoding('utf8').on('data', (s) => {
    partial += s;
    let nl;
    while ((nl = partial.indexOf('\n')) >= 0) {
      const line = partial.slice(0, nl);
      partial = partial.slice(nl + 1);
      let rec;
      try {
        rec = JSON.parse(line);
      } catch {
        rec = { raw: line };
      }
      rec.at = performance.now();
      if (p.logs.length < 20000) p.logs.push(rec);
      if (process.env.BENCH_VERBOSE) process.stderr.write(`[${p.pid}] ${line}\n`);
    }
  });
  p.stderr.setEncoding('utf8').on('data', (s) => {
    p.errText = (p.errText + s).slice(-16384);
    if (process.env.BENCH_VERBOSE) process.stderr.write(`[${p.pid}] ${s}`);
  });
  return p;
}

/** Stop a child: SIGTERM, then SIGKILL after `graceMs`. Resolves when it has exited. */
export async function stopChild(p, graceMs = 10_000, signal = 'SIGTERM') {
  if (!p || p.exitCode !== null || p.signalCode !== null) return;
  p.kill(signal);
  const t = setTimeout(() => p.kill('SIGKILL'), graceMs);
  await p.exited;
  clearTimeout(t);
}

/** Poll `cond` every `every` ms until it returns a truthy value or `ms` pass. */
export async function waitFor(what, cond, ms = 60_000, every = 20) {
  const end = Date.now() + ms;
  for (;;) {
    const v = await cond();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, every));
  }
}

/** Wait for a pino log line with msg `msg` (default 'ready') from child `p`; fails early if it exits. */
export async function logLine(p, msg = 'ready', ms = 60_000, after = 0) {
  return waitFor(`"${msg}" from pid ${p.pid}`, () => {
    if (p.exitCode !== null || p.signalCode !== null) throw new Error(`pid ${p.pid} exited (${p.exitCode ?? p.signalCode}) before "${msg}": ${p.errText.slice(-2000)}`);
    return p.logs.find((l) => l.msg === msg && l.at >= after);
  }, ms, 10);
}

/** A free TCP port on 127.0.0.1 (bound to port 0, then released). */
export function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

const TICK = 100; // USER_HZ: clock ticks per second of /proc/PID/stat on Linux

/** CPU time (user + system, every thread of the process) in µs, from /proc/PID/stat. */
export function cpuUs(pid) {
  try {
    const s = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // the command name is in parentheses and may contain spaces: fields start after the last ')'
    const f = s.slice(s.lastIndexOf(')') + 2).split(' ');
    // f[0] is field 3 (state); utime is field 14, stime field 15
    return ((Number(f[11]) + Number(f[12])) * 1e6) / TICK;
  } catch {
    return NaN;
  }
}

/** write_bytes of /proc/PID/io: bytes this process caused to be sent to the storage layer. */
export function writeBytes(pid) {
  try {
    const m = /^write_bytes:\s+(\d+)$/m.exec(readFileSync(`/proc/${pid}/io`, 'utf8'));
    return m ? Number(m[1]) : NaN;
  } catch {
    return NaN;
  }
}

/** Resident set size in MiB, from /proc/PID/status. */
export function rssMiB(pid, field = 'VmRSS') {
  try {
    const m = new RegExp(`${field}:\\s+(\\d+) kB`).exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) / 1024 : NaN;
  } catch {
    return NaN;
  }
}

/** A snapshot of a set of processes (name → pid) to diff later. */
export function snapshot(pids) {
  const out = { t: performance.now() };
  for (const [name, pid] of Object.entries(pids)) out[name] = { cpu: cpuUs(pid), wb: writeBytes(pid) };
  return out;
}

/** CPU µs and write_bytes each process used between two snapshots. */
export function diff(a, b) {
  const out = { seconds: (b.t - a.t) / 1000 };
  for (const name of Object.keys(a)) {
    if (name === 't') continue;
    out[name] = { cpu: b[name].cpu - a[name].cpu, wb: b[name].wb - a[name].wb };
  }
  return out;
}
