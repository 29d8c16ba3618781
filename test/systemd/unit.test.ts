/**
 * The systemd unit, the production configuration template and install.sh.
 * systemd-analyze runs offline (no systemd as PID 1 is needed); install.sh runs
 * into a temporary --root, so nothing on the machine is touched.
 */
import t from 'tap';
import { spawnSync } from 'node:child_process';
import { chmodSync, existsSync, lstatSync, mkdirSync, readdirSync, readFileSync, readlinkSync, rmSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { REPO, tempDir, runCli } from '../helpers/daemon.js';

const UNIT = path.join(REPO, 'systemd/edge-connector.service');
const TEMPLATE = path.join(REPO, 'systemd/connector.production.yaml');
const INSTALL = path.join(REPO, 'systemd/install.sh');

const hasAnalyze = spawnSync('systemd-analyze', ['--version'], { encoding: 'utf8' }).status === 0;
const noAnalyze = hasAnalyze ? false : 'systemd-analyze is not installed here (apt install systemd); the unit was not analysed';

t.test('systemd-analyze security: exposure score 2.0 or lower', { skip: noAnalyze }, async (t) => {
  const r = spawnSync('systemd-analyze', ['security', '--offline=yes', '--no-pager', UNIT], { encoding: 'utf8' });
  const out = `${r.stdout}${r.stderr}`;
  const m = /Overall exposure level for \S+: (\d+(?:\.\d+)?) (\S+)/.exec(out);
  t.ok(m, `score line found in: ${out.slice(-500)}`);
  const score = Number(m![1]);
  t.comment(`systemd-analyze security --offline=yes systemd/edge-connector.service: ${score} ${m![2]}`);
  t.ok(score <= 2.0, `exposure ${score} <= 2.0`);
  // the findings we accept on purpose, each explained in the unit
  const open = out
    .split('\n')
    .filter((l) => l.startsWith('✗'))
    .map((l) => l.slice(2).trim().split(/\s+/)[0]);
  t.comment(`accepted findings: ${open.join(', ')}`);
  const unitText = readFileSync(UNIT, 'utf8');
  t.match(unitText, /MemoryDenyWriteExecute=yes is NOT set: V8's JIT/, 'MemoryDenyWriteExecute is explained, not set');
  t.notMatch(unitText, /^MemoryDenyWriteExecute=/m);
});

t.test('the unit has the required settings', async (t) => {
  const text = readFileSync(UNIT, 'utf8');
  const has = (line: RegExp, what: string): void => void t.match(text, line, what);
  has(/^Type=notify$/m, 'Type=notify');
  has(/^NotifyAccess=main$/m, 'NotifyAccess=main');
  has(/^WatchdogSec=\d+s?$/m, 'WatchdogSec');
  has(/^ExecReload=\/bin\/kill -HUP \$MAINPID$/m, 'ExecReload sends SIGHUP');
  has(/^Restart=on-failure$/m, 'Restart=on-failure');
  has(/^RestartPreventExitStatus=78$/m, 'no restart loop on an invalid config');
  has(/^DynamicUser=yes$/m, 'dedicated user');
  has(/^StateDirectory=edge-connector$/m, 'StateDirectory');
  has(/^StateDirectoryMode=0700$/m, 'state 0700');
  has(/^ConfigurationDirectory=edge-connector$/m, 'ConfigurationDirectory');
  has(/^LoadCredential=cloud-client-secret:\/etc\/edge-connector\/cloud-client.secret$/m, 'LoadCredential');
  has(/^CapabilityBoundingSet=$/m, 'no capabilities');
  has(/^RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6$/m, 'address families');
  has(/^SystemCallFilter=@system-service$/m, 'syscall filter');
  for (const k of ['NoNewPrivileges', 'ProtectHome', 'PrivateTmp', 'PrivateDevices', 'ProtectKernelTunables', 'ProtectKernelModules', 'ProtectControlGroups', 'ProtectClock', 'RestrictNamespaces', 'LockPersonality']) {
    has(new RegExp(`^${k}=yes$`, 'm'), k);
  }
  has(/^ProtectSystem=strict$/m, 'ProtectSystem=strict');
  // daemon.shutdown_timeout_ms of the template must fit into TimeoutStopSec
  const stop = Number(/^TimeoutStopSec=(\d+)s$/m.exec(text)?.[1]);
  const shutdownMs = Number(/shutdown_timeout_ms: (\d+)/.exec(readFileSync(TEMPLATE, 'utf8'))?.[1]);
  t.ok(shutdownMs < stop * 1000, `shutdown_timeout_ms ${shutdownMs} < TimeoutStopSec ${stop}s`);
});

t.test('systemd-analyze verify is clean (ExecStart pointed at an existing binary)', { skip: noAnalyze }, async (t) => {
  // verify checks that ExecStart is executable; /opt/edge-connector is not installed on a build
  // machine, so verify the shipped unit for that one complaint only, and a copy pointing at node for the rest
  const shipped = spawnSync('systemd-analyze', ['verify', UNIT], { encoding: 'utf8' });
  const complaints = `${shipped.stdout}${shipped.stderr}`.split('\n').filter((l) => l.trim());
  for (const c of complaints) t.match(c, /\/opt\/edge-connector\/bin\/connector is not executable/, `only the missing install is reported: ${c}`);

  const dir = tempDir(t);
  const copy = path.join(dir, 'edge-connector.service');
  writeFileSync(copy, readFileSync(UNIT, 'utf8').replace(/^ExecStart=\S+/m, `ExecStart=${process.execPath}`));
  const r = spawnSync('systemd-analyze', ['verify', copy], { encoding: 'utf8' });
  const out = `${r.stdout}${r.stderr}`.trim();
  t.equal(out, '', `no warnings: ${out}`);
  t.equal(r.status, 0);
});

t.test('the production template passes check-config (with the systemd credential provided)', async (t) => {
  const dir = tempDir(t);
  const creds = path.join(dir, 'creds');
  mkdirSync(creds, { mode: 0o700 });
  writeFileSync(path.join(creds, 'cloud-client-secret'), 'test-secret\n', { mode: 0o600 });
  const ok = await runCli(['check-config', '-c', TEMPLATE], { env: { CREDENTIALS_DIRECTORY: creds } });
  t.equal(ok.code, 0, ok.stderr);
  t.equal(ok.stdout, 'ok\n');
  const text = readFileSync(TEMPLATE, 'utf8');
  t.match(text, /state_dir: \/var\/lib\/edge-connector/);
  t.match(text, /client_secret: credential:cloud-client-secret/);
  t.match(text, /local:[^\n]*\n\s+enabled: false/, 'the plain local listener is off');
  t.match(text, /cloud\.example\.invalid/, 'placeholder cloud host (never resolves)');
  // without the credential the error says what to do
  const bad = await runCli(['check-config', '-c', TEMPLATE], { env: { CREDENTIALS_DIRECTORY: '' } });
  t.equal(bad.code, 78);
  t.match(bad.stderr, /LoadCredential=cloud-client-secret/);
});

function sh(args: string[]): { code: number | null; out: string } {
  const r = spawnSync('sh', [INSTALL, ...args], { encoding: 'utf8', env: { ...process.env, TMPDIR: process.env.TMPDIR ?? '/tmp' } });
  return { code: r.status, out: `${r.stdout}${r.stderr}` };
}

t.test('install.sh into a temp root: idempotent, keeps an edited config, --uninstall removes what it installed', async (t) => {
  const dir = tempDir(t);
  const pack = spawnSync('npm', ['pack', '--ignore-scripts', '--silent', '--pack-destination', dir], { cwd: REPO, encoding: 'utf8' });
  t.equal(pack.status, 0, pack.stderr);
  const tarball = path.join(dir, pack.stdout.trim().split('\n').pop()!);
  const root = path.join(dir, 'root');
  const args = ['--root', root, '--tarball', tarball, '--deps-from', REPO];

  const first = sh(args);
  t.equal(first.code, 0, first.out);
  t.comment(first.out.split('\n').slice(0, 4).join('\n'));
  const opt = path.join(root, 'opt/edge-connector');
  const conf = path.join(root, 'etc/edge-connector/connector.yaml');
  const unit = path.join(root, 'etc/systemd/system/edge-connector.service');
  const link = path.join(root, 'usr/local/bin/connector');
  t.ok(existsSync(path.join(opt, 'dist/daemon/cli.js')), 'package installed');
  t.ok(existsSync(path.join(opt, 'node_modules/aedes/package.json')), 'production dependencies installed');
  t.notOk(existsSync(path.join(opt, 'node_modules/typescript')), 'dev dependencies are not');
  t.equal(readFileSync(unit, 'utf8'), readFileSync(UNIT, 'utf8'), 'unit installed');
  t.equal(readFileSync(conf, 'utf8'), readFileSync(TEMPLATE, 'utf8'), 'config from the production template');
  t.equal(statSync(conf).mode & 0o777, 0o644);
  t.equal(readlinkSync(link), '/opt/edge-connector/bin/connector');
  const wrapper = readFileSync(path.join(opt, 'bin/connector'), 'utf8');
  t.match(wrapper, /exec "[^"]+" "\/opt\/edge-connector\/dist\/daemon\/cli\.js" "\$@"/);
  t.ok(statSync(path.join(opt, 'bin/connector')).mode & 0o100, 'wrapper executable');
  t.match(first.out, /next steps:/);

  // the installed package runs on its own (production dependencies complete)
  const version = spawnSync(process.execPath, [path.join(opt, 'dist/daemon/cli.js'), '--version'], { encoding: 'utf8' });
  t.equal(version.status, 0, version.stderr);
  t.equal(version.stdout.trim(), (JSON.parse(readFileSync(path.join(REPO, 'package.json'), 'utf8')) as { version: string }).version);
  const creds = path.join(dir, 'creds');
  mkdirSync(creds, { mode: 0o700 });
  writeFileSync(path.join(creds, 'cloud-client-secret'), 'x\n', { mode: 0o600 });
  const check = spawnSync(process.execPath, [path.join(opt, 'dist/daemon/cli.js'), 'check-config', '-c', conf], { encoding: 'utf8', env: { ...process.env, CREDENTIALS_DIRECTORY: creds } });
  t.equal(check.status, 0, `installed CLI accepts the installed config: ${check.stderr}`);

  // again: nothing changes
  const second = sh(args);
  t.equal(second.code, 0, second.out);
  t.match(second.out, /unchanged: .*opt\/edge-connector/);
  t.match(second.out, /unchanged: .*edge-connector\.service/);
  t.match(second.out, /unchanged: .*connector\.yaml/);
  t.notOk(existsSync(`${opt}.previous`), 'an unchanged reinstall does not rotate the previous version');

  // an edited config is never overwritten
  const edited = readFileSync(conf, 'utf8').replace('cloud.example.invalid/ingest', 'cloud.acme.test/ingest');
  writeFileSync(conf, edited);
  const third = sh(args);
  t.equal(third.code, 0, third.out);
  t.match(third.out, /NOT overwriting .*connector\.yaml/);
  t.equal(readFileSync(conf, 'utf8'), edited, 'edited config kept');
  t.equal(readFileSync(`${conf}.new`, 'utf8'), readFileSync(TEMPLATE, 'utf8'), 'the new template is next to it');

  // uninstall: everything it installed goes, the edited config and the state stay
  const state = path.join(root, 'var/lib/private/edge-connector');
  mkdirSync(state, { recursive: true });
  writeFileSync(path.join(state, 'registry.json'), '{}');
  const un = sh(['--root', root, '--uninstall']);
  t.equal(un.code, 0, un.out);
  t.notOk(existsSync(opt), 'package removed');
  t.notOk(existsSync(unit), 'unit removed');
  t.throws(() => lstatSync(link), 'symlink removed');
  t.ok(existsSync(conf), 'edited config kept');
  t.match(un.out, /kept .*connector\.yaml \(you edited it/);
  t.ok(existsSync(path.join(state, 'registry.json')), 'state kept without --purge');

  // a config nobody edited is removed by a plain --uninstall (the recorded template checksum matches)
  writeFileSync(conf, readFileSync(TEMPLATE, 'utf8'));
  const un2 = sh(['--root', root, '--uninstall']);
  t.equal(un2.code, 0, un2.out);
  t.notOk(existsSync(conf), 'unedited config removed');
  t.match(un2.out, /removed .*connector\.yaml \(unedited template\)/);

  // --purge removes the state and an edited config too
  mkdirSync(path.dirname(conf), { recursive: true });
  writeFileSync(conf, edited);
  const purge = sh(['--root', root, '--uninstall', '--purge']);
  t.equal(purge.code, 0, purge.out);
  t.notOk(existsSync(path.join(root, 'etc/edge-connector')), 'config removed by --purge');
  t.notOk(existsSync(state), 'state removed by --purge');
  t.same(readdirSync(path.join(root, 'opt')), [], 'no staging leftovers');
});

t.test('install.sh: bad input gets a clear error', async (t) => {
  const r1 = sh(['--bogus']);
  t.equal(r1.code, 1);
  t.match(r1.out, /unknown option --bogus/);
  const root = tempDir(t);
  const r2 = sh(['--root', root, '--tarball', path.join(root, 'missing.tgz')]);
  t.equal(r2.code, 1);
  t.match(r2.out, /missing\.tgz not found/);
  const notgz = path.join(root, 'bad.tgz');
  writeFileSync(notgz, 'not a tarball');
  chmodSync(notgz, 0o644);
  const r3 = sh(['--root', root, '--tarball', notgz, '--deps-from', REPO]);
  t.equal(r3.code, 1);
  t.match(r3.out, /cannot extract/);
  const help = sh(['--help']);
  t.equal(help.code, 0);
  t.match(help.out, /--uninstall/);
});

const DROPIN = path.join(REPO, 'systemd/encrypted-credentials.conf.example');

t.test('encrypted credentials: the unit shows how, the drop-in example is consistent with the config reference', async (t) => {
  const unit = readFileSync(UNIT, 'utf8');
  t.match(unit, /^# .*LoadCredentialEncrypted=cloud-client-secret:\/etc\/edge-connector\/cloud-client-secret\.cred$/m, 'the unit shows LoadCredentialEncrypted= (commented)');
  t.match(unit, /systemd-creds encrypt --name=cloud-client-secret --with-key=auto/, 'and how to seal it (host key + TPM2 when present)');
  const dropin = readFileSync(DROPIN, 'utf8');
  t.match(dropin, /^\[Service\]$/m);
  t.match(dropin, /^LoadCredential=$/m, 'the drop-in resets the plain-text LoadCredential= of the unit');
  const enc = /^LoadCredentialEncrypted=([a-z0-9-]+):(\S+)$/m.exec(dropin);
  t.ok(enc, 'the drop-in loads an encrypted credential');
  t.match(readFileSync(TEMPLATE, 'utf8'), new RegExp(`credential:${enc![1]}\\b`), 'under the name the production config references');
  t.match(dropin, new RegExp(`systemd-creds encrypt --name=${enc![1]} `), 'sealed under the same name (systemd checks it)');
  const ops = readFileSync(path.join(REPO, 'docs/operations.md'), 'utf8');
  t.match(ops, /## Credential storage/, 'docs/operations.md has the guide');
  t.match(ops, /LoadCredentialEncrypted=/);
  t.match(ops, /systemd-creds encrypt/);
});

t.test('systemd-analyze verify accepts the unit with the encrypted-credentials drop-in applied', { skip: noAnalyze }, async (t) => {
  const dir = tempDir(t);
  const copy = path.join(dir, 'edge-connector.service');
  writeFileSync(copy, readFileSync(UNIT, 'utf8').replace(/^ExecStart=\S+/m, `ExecStart=${process.execPath}`));
  mkdirSync(path.join(dir, 'edge-connector.service.d'));
  writeFileSync(path.join(dir, 'edge-connector.service.d', 'encrypted-credentials.conf'), readFileSync(DROPIN, 'utf8'));
  // the drop-in is really read: a deliberate typo in a second one is reported
  writeFileSync(path.join(dir, 'edge-connector.service.d', 'zz-probe.conf'), '[Service]\nLoadCredentialEncryptedTypo=x:/y\n');
  const probe = spawnSync('systemd-analyze', ['verify', copy], { encoding: 'utf8' });
  t.match(`${probe.stdout}${probe.stderr}`, /zz-probe\.conf.*LoadCredentialEncryptedTypo/, 'verify reads the drop-in directory');
  rmSync(path.join(dir, 'edge-connector.service.d', 'zz-probe.conf'));
  const r = spawnSync('systemd-analyze', ['verify', copy], { encoding: 'utf8' });
  const out = `${r.stdout}${r.stderr}`.trim();
  t.equal(out, '', `no warnings: ${out}`);
  t.equal(r.status, 0);
  // and the security score does not get worse with it
  const sec = spawnSync('systemd-analyze', ['security', '--offline=yes', '--no-pager', copy], { encoding: 'utf8' });
  const m = /Overall exposure level for \S+: (\d+(?:\.\d+)?)/.exec(`${sec.stdout}${sec.stderr}`);
  t.ok(m && Number(m[1]) <= 2.0, `exposure with the drop-in ${m?.[1]} <= 2.0`);
});
