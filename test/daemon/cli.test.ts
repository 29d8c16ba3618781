import t from 'tap';
import { readFileSync, statSync, readdirSync } from 'node:fs';
import path from 'node:path';
import { runCli, REPO, tempDir, testConfig, writeConfig } from '../helpers/daemon.js';
import { commands } from '../../daemon/commands/index.js';

t.test('--version prints the package version', async (t) => {
  const pkg = JSON.parse(readFileSync(path.join(REPO, 'package.json'), 'utf8')) as { version: string };
  const r = await runCli(['--version']);
  t.equal(r.code, 0);
  t.equal(r.stdout.trim(), pkg.version);
});

t.test('help lists every command; --help works on every command', async (t) => {
  for (const args of [['help'], ['--help'], ['-h']]) {
    const r = await runCli(args);
    t.equal(r.code, 0, args.join(' '));
    for (const c of commands) t.match(r.stdout, c.path.join(' '), `${c.path.join(' ')} listed`);
  }
  for (const c of commands) {
    const r = await runCli([...c.path, '--help']);
    t.equal(r.code, 0, `${c.path.join(' ')} --help exits 0`);
    t.match(r.stdout, `connector ${c.path.join(' ')}`, `${c.path.join(' ')} --help shows its usage`);
    const h = await runCli(['help', ...c.path]);
    t.equal(h.stdout, r.stdout, `help ${c.path.join(' ')} is the same`);
  }
});

t.test('bad command lines exit 64 with a hint', async (t) => {
  const unknown = await runCli(['frobnicate']);
  t.equal(unknown.code, 64);
  t.match(unknown.stderr, /unknown command "frobnicate".*connector help/);
  const badOpt = await runCli(['check-config', '--nope']);
  t.equal(badOpt.code, 64);
  t.match(badOpt.stderr, /Unknown option '--nope'/);
  t.match(badOpt.stderr, /connector check-config \[-c FILE\]/);
  const extra = await runCli(['check-config', 'extra']);
  t.equal(extra.code, 64);
  t.match(extra.stderr, /expected 0 argument/);
  const none = await runCli([]);
  t.equal(none.code, 64);
  t.match(none.stdout, /usage: connector COMMAND/);
});

t.test('check-config: ok on the bundled file (default path ./connector.yaml)', async (t) => {
  const r = await runCli(['check-config'], { cwd: REPO, env: { CONNECTOR_CONFIG: '' } });
  t.equal(r.stdout, 'ok\n');
  t.equal(r.code, 0);
  const explicit = await runCli(['check-config', '-c', path.join(REPO, 'connector.yaml')], { cwd: '/' });
  t.equal(explicit.stdout, 'ok\n');
});

t.test('check-config: $CONNECTOR_CONFIG when there is no ./connector.yaml', async (t) => {
  const dir = tempDir(t);
  const file = writeConfig(dir, { log: { level: 'nope' } }, 'other.yaml');
  const r = await runCli(['check-config'], { cwd: dir, env: { CONNECTOR_CONFIG: file } });
  t.equal(r.code, 78);
  t.match(r.stderr, /other\.yaml:\d+:\d+ log\.level: not allowed/);
});

t.test('check-config: errors and exit 78', async (t) => {
  const dir = tempDir(t);
  const file = writeConfig(dir, { api: { port: -1 }, extra: true });
  const r = await runCli(['check-config', '-c', file]);
  t.equal(r.code, 78);
  t.equal(r.stdout, '');
  t.match(r.stderr, /connector\.yaml:\d+:\d+ api\.port: out of range, got -1; allowed: 0 to 65535/);
  t.match(r.stderr, /connector\.yaml:\d+:\d+ extra: unknown key/);
  t.match(r.stderr, /2 problems/);
});

t.test('init creates the state dir 0700, is idempotent and never overwrites', async (t) => {
  const dir = tempDir(t);
  const state = path.join(dir, 'state');
  const file = writeConfig(dir, testConfig(state, { bridge: { enabled: true, token: { client_secret: 'file:state/cloud.secret' } } }));
  const first = await runCli(['init', '-c', file]);
  t.equal(first.code, 0, first.stderr);
  t.match(first.stdout, `created ${state}`);
  t.equal(statSync(state).mode & 0o777, 0o700);
  const secret = path.join(state, 'cloud.secret');
  t.equal(statSync(secret).mode & 0o777, 0o600, 'generated secret is 0600');
  const files = readdirSync(state, { recursive: true }).map(String).filter((f) => statSync(path.join(state, f)).isFile());
  const before = new Map(files.map((f) => [f, readFileSync(path.join(state, f)).toString('base64')] as const));
  const second = await runCli(['init', '-c', file]);
  t.equal(second.code, 0);
  t.match(second.stdout, /nothing to do/);
  for (const [f, content] of before) t.equal(readFileSync(path.join(state, f)).toString('base64'), content, `${f} unchanged`);
});
