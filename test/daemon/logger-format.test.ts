/**
 * log.format end to end on the real daemon (dist/daemon/cli.js):
 *  - auto under a terminal (a pseudo-terminal from util-linux `script`) → readable lines;
 *  - auto into a pipe (journald's case) → JSON lines (every other daemon test relies on it too);
 *  - json under a terminal → JSON lines;
 *  - pretty into a pipe (what `npm start` asks for) → readable lines, and a
 *    forged token refused by the broker does not appear in them.
 */
import t from 'tap';
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import mqtt from 'mqtt';
import { CLI, childEnv, tempDir, testConfig, writeConfig, type TestLike } from '../helpers/daemon.js';

const SCRIPT = ['/usr/bin/script', '/bin/script'].find((p) => existsSync(p));
// an ANSI colour sequence (ESC [ … m), built from the code point so no control character sits in a regex literal
const ANSI_SGR = new RegExp(`${String.fromCharCode(27)}\\[[0-9;]*m`, 'g');
const READY_PRETTY = /\] INFO: \[daemon\] ready (\{.*\})/;
const READY_JSON = /^\{.*"msg":"ready".*\}$/m;

const q = (s: string): string => `'${s.replace(/'/g, `'\\''`)}'`;

interface Run {
  proc: ChildProcess;
  out: () => string;
  colored: () => boolean;
  waitFor(re: RegExp, ms?: number): Promise<RegExpExecArray>;
}

/** Start the daemon, in a pseudo-terminal when `tty`, in its own process group; SIGTERM to the group at teardown. */
function run(t: TestLike, configFile: string, opts: { tty: boolean; env?: NodeJS.ProcessEnv }): Run {
  const node = `/usr/bin/env -u NODE_OPTIONS ${q(process.execPath)} ${q(CLI)} start -c ${q(configFile)}`;
  const proc = opts.tty
    ? spawn(SCRIPT!, ['-qefc', node, '/dev/null'], { env: childEnv(opts.env), stdio: ['pipe', 'pipe', 'pipe'], detached: true })
    : spawn('/bin/sh', ['-c', `exec ${node}`], { env: childEnv(opts.env), stdio: ['ignore', 'pipe', 'pipe'], detached: true });
  // a terminal gets colours (and CR LF): compare the text without them
  let out = '';
  let colored = false;
  const add = (d: string): void => {
    if (d.includes('\x1b[')) colored = true;
    out += d.replace(ANSI_SGR, '').replace(/\r/g, '');
  };
  proc.stdout!.setEncoding('utf8').on('data', add);
  proc.stderr!.setEncoding('utf8').on('data', add);
  const exited = new Promise<void>((resolve) => proc.once('exit', () => resolve()));
  t.teardown(async () => {
    if (proc.exitCode === null && proc.signalCode === null) {
      try {
        process.kill(-proc.pid!, 'SIGTERM');
      } catch {
        // already gone
      }
      const timer = setTimeout(() => {
        try {
          process.kill(-proc.pid!, 'SIGKILL');
        } catch {
          // already gone
        }
      }, 10000);
      await exited;
      clearTimeout(timer);
    }
  });
  return {
    proc,
    out: () => out,
    colored: () => colored,
    waitFor: (re, ms = 30000) =>
      new Promise((resolve, reject) => {
        const check = (): boolean => {
          const m = re.exec(out);
          if (m) {
            cleanup();
            resolve(m);
          }
          return Boolean(m);
        };
        const timer = setTimeout(() => {
          cleanup();
          reject(new Error(`timed out waiting for ${re}; output so far:\n${out}`));
        }, ms);
        const onData = (): void => void check();
        const onExit = (): void => {
          if (!check()) {
            cleanup();
            reject(new Error(`daemon exited before ${re}; output:\n${out}`));
          }
        };
        const cleanup = (): void => {
          clearTimeout(timer);
          proc.stdout!.off('data', onData);
          proc.off('exit', onExit);
        };
        proc.stdout!.on('data', onData);
        proc.once('exit', onExit);
        check();
      }),
  };
}

function config(t: TestLike, over: Record<string, unknown> = {}): string {
  const dir = tempDir(t);
  return writeConfig(dir, testConfig(path.join(dir, 'state'), over));
}

t.test('auto: readable lines in a terminal, JSON lines into a pipe; json wins in a terminal', async (t) => {
  if (!SCRIPT) {
    t.ok(true, 'terminal checks', { skip: 'util-linux script(1) is not installed' });
    return;
  }
  const tty = run(t, config(t), { tty: true });
  const m = await tty.waitFor(READY_PRETTY);
  t.ok(JSON.parse(m[1]!).ports, 'the fields follow the message as JSON on the same line');
  t.ok(tty.colored(), 'coloured in a terminal');
  t.notMatch(tty.out(), /^\{"level"/m, 'no JSON line in the terminal');
  t.match(tty.out(), /^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}\] INFO: \[journal\]|\] INFO: \[registry\] registry loaded/m, 'time, level, component, message');

  const pipe = run(t, config(t), { tty: false });
  await pipe.waitFor(READY_JSON);
  t.notMatch(pipe.out(), READY_PRETTY, 'a pipe gets JSON');

  const json = run(t, config(t, { log: { format: 'json' } }), { tty: true });
  await json.waitFor(/\{"level":"info".*"msg":"ready"/);
  t.notMatch(json.out(), READY_PRETTY, 'log.format: json in a terminal');
});

t.test('pretty into a pipe (npm start): readable lines, redacted like JSON', async (t) => {
  const p = run(t, config(t), { tty: false, env: { CONNECTOR_LOG_FORMAT: 'pretty' } });
  const m = await p.waitFor(READY_PRETTY);
  const ports = (JSON.parse(m[1]!) as { ports: Record<string, number> }).ports;
  const forged = `eyJhbGciOiJFUzI1NiJ9.${Buffer.from('{"sub":"ghost"}').toString('base64url')}.${randomBytes(48).toString('base64url')}`;
  const c = mqtt.connect(`mqtts://127.0.0.1:${ports.mqtt_tls}`, { clientId: 'ghost', username: 'ghost', password: forged, rejectUnauthorized: false, reconnectPeriod: 0, protocolVersion: 4 });
  await new Promise<void>((resolve) => {
    c.once('error', () => resolve());
    c.once('close', () => resolve());
  });
  c.end(true);
  await p.waitFor(/WARN: \[broker\] MQTT connection refused .*ECONN_AUTH/);
  t.notOk(p.out().includes(forged.split('.')[2]!), 'the token signature is not in the output');
  t.notMatch(p.out(), /eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\./, 'nothing JWT-shaped');
  t.notMatch(p.out(), /^\{"level"/m, 'no JSON line');
  t.notOk(p.colored(), 'no colour codes into a pipe');
});
