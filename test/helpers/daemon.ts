/**
 * Start the real daemon as a child process (dist/daemon/cli.js, built by
 * `npm test`) with a temp config and state directory on free ports, wait for
 * its `ready` log line, and tear everything down when the test ends.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import net from 'node:net';
import https from 'node:https';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { stringify } from 'yaml';

export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const CLI = path.join(REPO, 'dist/daemon/cli.js');
/** The daemon plus fault-injection hooks (test.block_loop, test.starve_loop, test.crash, a close that hangs): test code, never in dist/. */
export const HOOKED_DAEMON = path.join(REPO, 'test/helpers/daemon-hooks.mjs');

/** The minimal interface of a tap Test these helpers need. */
export interface TestLike {
  teardown(fn: () => unknown): void;
}

export type Json = Record<string, unknown>;

/** The environment for child processes. */
export function childEnv(extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
  return { ...process.env, ...extra };
}

/**
 * Command and arguments to run `node dist/daemon/cli.js ARGS`. tap injects its
 * loaders (ts-node, processinfo) into every node child through NODE_OPTIONS,
 * whatever env we pass; they are not needed to run dist/, slow every start, and
 * break a child running as another user. `env -u NODE_OPTIONS` drops them.
 */
export function nodeCommand(args: string[]): [string, string[]] {
  return ['/usr/bin/env', ['-u', 'NODE_OPTIONS', process.execPath, ...args]];
}

export function tempDir(t: TestLike, prefix = 'ec-test-'): string {
  const dir = mkdtempSync(path.join(tmpdir(), prefix));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

function isObj(v: unknown): v is Json {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

export function deepMerge(base: Json, over: Json): Json {
  const out: Json = { ...base };
  for (const [k, v] of Object.entries(over)) out[k] = isObj(v) && isObj(out[k]) ? deepMerge(out[k] as Json, v) : v;
  return out;
}

/** A test configuration: everything on 127.0.0.1 port 0, bridge off unless the test turns it on. */
export function testConfig(stateDir: string, overrides: Json = {}): Json {
  return deepMerge(
    {
      daemon: { state_dir: stateDir, shutdown_timeout_ms: 5000, server_name: 'test-gateway' },
      log: { level: 'info' },
      broker: {
        listeners: {
          tls: { host: '127.0.0.1', port: 0 },
          wss: { host: '127.0.0.1', port: 0 },
          local: { enabled: false, host: '127.0.0.1', port: 0 },
        },
      },
      api: { host: '127.0.0.1', port: 0 },
      bridge: { enabled: false },
      metrics: { host: '127.0.0.1', port: 0 },
    },
    overrides,
  );
}

export function writeConfig(dir: string, config: Json, name = 'connector.yaml'): string {
  const file = path.join(dir, name);
  writeFileSync(file, stringify(config), { mode: 0o600 });
  return file;
}

export interface Exit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

export interface DaemonHandle {
  proc: ChildProcess;
  dir: string;
  stateDir: string;
  configFile: string;
  /** Ports from the `ready` line: mqtt_tls, mqtt_wss, mqtt_local, api, metrics … */
  ports: Record<string, number>;
  /** Parsed JSON log lines so far (stdout). */
  logs: Json[];
  /** Raw stdout and stderr so far. */
  output(): { stdout: string; stderr: string };
  waitForLog(pred: (line: Json) => boolean, timeoutMs?: number, what?: string): Promise<Json>;
  /** Send a signal and wait for the exit (SIGKILL after killAfterMs). */
  stop(signal?: NodeJS.Signals, killAfterMs?: number): Promise<Exit>;
  exited: Promise<Exit>;
}

export interface StartOptions {
  config?: Json;
  /** Use this exact config file instead of writing one. */
  configFile?: string;
  /** Reuse a directory (e.g. to restart on the same state). */
  dir?: string;
  env?: NodeJS.ProcessEnv;
  args?: string[];
  readyTimeoutMs?: number;
  /** Resolve as soon as the process is spawned instead of waiting for ready. */
  noWait?: boolean;
  uid?: number;
  gid?: number;
  /**
   * Run test/helpers/daemon-hooks.mjs (the daemon with test-only admin methods)
   * instead of `connector start`; `hangClose` adds a component whose close() never finishes;
   * `recordSyncs` records every successful fsync in that directory (for a simulated power cut),
   * `syncLatencyMs` makes each asynchronous fsync report success that much later (a slow disk).
   */
  hooks?: boolean | { hangClose?: boolean; recordSyncs?: string; syncLatencyMs?: number };
}

export function spawnDaemon(t: TestLike, opts: StartOptions = {}): DaemonHandle {
  const dir = opts.dir ?? tempDir(t);
  const stateDir = path.join(dir, 'state');
  const configFile = opts.configFile ?? writeConfig(dir, testConfig(stateDir, opts.config ?? {}));
  const hooks = opts.hooks === true ? {} : opts.hooks || undefined;
  const [cmd, argv] = nodeCommand(
    hooks
      ? [HOOKED_DAEMON, configFile, ...(hooks.hangClose ? ['--hang-close'] : []), ...(hooks.recordSyncs ? ['--record-syncs', hooks.recordSyncs] : []),
          ...(hooks.syncLatencyMs ? ['--sync-latency-ms', String(hooks.syncLatencyMs)] : []),
        ] : [CLI, ...(opts.args ?? ['start', '-c', configFile])],
  );
  const proc = spawn(cmd, argv, {
    cwd: dir,
    env: childEnv(opts.env),
    stdio: ['ignore', 'pipe', 'pipe'],
    uid: opts.uid,
    gid: opts.gid,
  });
  let stdout = '';
  let stderr = '';
  let partial = '';
  const logs: Json[] = [];
  const waiters = new Set<{ pred: (l: Json) => boolean; resolve: (l: Json) => void }>();
  proc.stdout!.setEncoding('utf8');
  proc.stderr!.setEncoding('utf8');
  proc.stdout!.on('data', (d: string) => {
    stdout += d;
    partial += d;
    let nl: number;
    while ((nl = partial.indexOf('\n')) >= 0) {
      const line = partial.slice(0, nl);
      partial = partial.slice(nl + 1);
      let obj: Json;
      try {
        obj = JSON.parse(line) as Json;
      } catch {
        continue;
      }
      logs.push(obj);
      for (const w of waiters) {
        if (w.pred(obj)) {
          waiters.delete(w);
          w.resolve(obj);
        }
      }
    }
  });
  proc.stderr!.on('data', (d: string) => {
    stderr += d;
  });
  const exited = new Promise<Exit>((resolve) => proc.once('exit', (code, signal) => resolve({ code, signal })));

  const handle: DaemonHandle = {
    proc,
    dir,
    stateDir,
    configFile,
    ports: {},
    logs,
    output: () => ({ stdout, stderr }),
    exited,
    waitForLog(pred, timeoutMs = 20000, what = 'log line') {
      const found = logs.find(pred);
      if (found) return Promise.resolve(found);
      return new Promise((resolve, reject) => {
        const w = { pred, resolve: (l: Json) => (clearTimeout(timer), resolve(l)) };
        const timer = setTimeout(() => {
          waiters.delete(w);
          reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}; stderr: ${stderr.slice(-2000)}; stdout tail: ${stdout.slice(-2000)}`));
        }, timeoutMs);
        waiters.add(w);
        void exited.then((e) => {
          if (waiters.has(w)) {
            waiters.delete(w);
            clearTimeout(timer);
            reject(new Error(`daemon exited (${e.code ?? e.signal}) while waiting for ${what}; stderr: ${stderr.slice(-2000)}; stdout tail: ${stdout.slice(-2000)}`));
          }
        });
      });
    },
    async stop(signal = 'SIGTERM', killAfterMs = 15000) {
      if (proc.exitCode !== null || proc.signalCode !== null) return exited;
      proc.kill(signal);
      const timer = setTimeout(() => proc.kill('SIGKILL'), killAfterMs);
      const e = await exited;
      clearTimeout(timer);
      return e;
    },
  };
  t.teardown(() => handle.stop('SIGTERM', 5000));
  return handle;
}

/** Start the daemon and wait until it logs `ready`; fills `ports`. */
export async function startDaemon(t: TestLike, opts: StartOptions = {}): Promise<DaemonHandle> {
  const d = spawnDaemon(t, opts);
  const ready = await d.waitForLog((l) => l.msg === 'ready', opts.readyTimeoutMs ?? 30000, 'the ready line');
  Object.assign(d.ports, (ready.ports ?? {}) as Record<string, number>);
  return d;
}

export interface CliResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Run `connector ARGS…` to completion. */
export function runCli(args: string[], opts: { cwd?: string; env?: NodeJS.ProcessEnv; input?: string; timeoutMs?: number; uid?: number; gid?: number } = {}): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const [cmd, argv] = nodeCommand([CLI, ...args]);
    const p = spawn(cmd, argv, {
      cwd: opts.cwd ?? REPO,
      env: childEnv(opts.env),
      stdio: ['pipe', 'pipe', 'pipe'],
      uid: opts.uid,
      gid: opts.gid,
    });
    let stdout = '';
    let stderr = '';
    p.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    p.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const timer = setTimeout(() => {
      p.kill('SIGKILL');
      reject(new Error(`connector ${args.join(' ')} did not finish within ${opts.timeoutMs ?? 30000} ms; stderr: ${stderr}`));
    }, opts.timeoutMs ?? 30000);
    p.on('error', reject);
    p.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
    p.stdin.end(opts.input ?? '');
  });
}

/** A free TCP port on 127.0.0.1 (for "nothing listens there" cases). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const p = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(p));
    });
  });
}

/** What the admin socket's device.add answers (the device's credentials, PEM). */
export interface AdminBundle {
  id: string;
  token: string;
  ca: string;
  key: string;
  cert: string;
}

/** POST a text body to the API's upload route with the device's bearer token; resolves with the HTTP status. */
export function uploadText(port: number, b: AdminBundle, body: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const req = https.request(
      { host: '127.0.0.1', port, path: `/api/publish/${b.id}`, method: 'POST', ca: b.ca, headers: { authorization: `Bearer ${b.token}`, 'content-type': 'text/plain' }, agent: false },
      (res) => {
        res.resume();
        res.on('end', () => resolve(res.statusCode ?? 0));
      },
    );
    req.on('error', reject);
    req.end(body);
  });
}
