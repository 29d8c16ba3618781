/**
 * `connector device …` / `connector enroll create` against a real daemon child
 * process (needs `npm run build`: dist/daemon/cli.js).
 */
import t from 'tap';
import { execFile } from 'node:child_process';
import { statSync, readFileSync, existsSync, writeFileSync } from 'node:fs';
import { X509Certificate, createPrivateKey } from 'node:crypto';
import path from 'node:path';
import { promisify } from 'node:util';
import { startDaemon, runCli, tempDir } from '../../helpers/daemon.js';

const execFileP = promisify(execFile);

t.test('device add / list / show / token / revoke, enroll create', async (t) => {
  const d = await startDaemon(t);
  const c = ['-c', d.configFile];
  const out = path.join(tempDir(t), 'out');

  const add = await runCli(['device', 'add', 'sensor-1', '--out', out, ...c]);
  t.equal(add.code, 0, `device add: ${add.stderr}`);
  const files = ['sensor-1.key', 'sensor-1.crt', 'ca.crt', 'sensor-1.token'].map((f) => path.join(out, f));
  for (const f of files) {
    t.ok(existsSync(f), `${path.basename(f)} written`);
    t.equal(statSync(f).mode & 0o777, 0o600, `${path.basename(f)} mode 0600`);
    t.match(add.stdout, f, `prints ${path.basename(f)}`);
  }
  t.notMatch(add.stdout, /PRIVATE KEY|eyJ/, 'no secrets on stdout');
  const [keyF, crtF, caF, tokF] = files as [string, string, string, string];
  const v = await execFileP('openssl', ['verify', '-CAfile', caF, crtF]);
  t.match(v.stdout, `${crtF}: OK`, 'openssl verify -CAfile ca.crt sensor-1.crt');
  const cert = new X509Certificate(readFileSync(crtF));
  t.ok(cert.checkPrivateKey(createPrivateKey(readFileSync(keyF))));
  t.equal(cert.subject, 'CN=sensor-1');
  t.match(readFileSync(tokF, 'utf8'), /^eyJ[\w-]+\.[\w-]+\.[\w-]+\n$/);

  // default --out is the current directory
  const cwd = tempDir(t);
  const add2 = await runCli(['device', 'add', 'cam-2', '--key-type', 'rsa', '--group', 'cams', ...c], { cwd });
  t.equal(add2.code, 0, add2.stderr);
  t.ok(existsSync(path.join(cwd, 'cam-2.key')));
  t.equal(createPrivateKey(readFileSync(path.join(cwd, 'cam-2.key'))).asymmetricKeyType, 'rsa');

  // refuses to overwrite, registers nothing
  writeFileSync(path.join(cwd, 'other.key'), 'x');
  const clash = await runCli(['device', 'add', 'other', ...c], { cwd });
  t.not(clash.code, 0);
  t.match(clash.stderr, /already exists/);

  const list = await runCli(['device', 'list', ...c]);
  t.equal(list.code, 0);
  t.match(list.stdout, /^ID\s+STATUS/m);
  t.match(list.stdout, /^sensor-1\s+active/m);
  t.match(list.stdout, /^cam-2\s+active\s+cams/m);
  t.notMatch(list.stdout, /other/, 'refused add registered nothing');
  const json = await runCli(['device', 'list', '--json', ...c]);
  const devices = JSON.parse(json.stdout) as { id: string }[];
  t.same(devices.map((x) => x.id).sort(), ['cam-2', 'sensor-1']);

  const show = await runCli(['device', 'show', 'sensor-1', ...c]);
  t.equal(show.code, 0);
  const rec = JSON.parse(show.stdout) as { id: string; certificates: { serial: string }[] };
  t.equal(rec.id, 'sensor-1');
  t.equal(rec.certificates[0]!.serial, cert.serialNumber.toLowerCase().replace(/^0+/, ''));

  const tok = await runCli(['device', 'token', 'sensor-1', ...c]);
  t.equal(tok.code, 0);
  t.match(tok.stdout, /^eyJ[\w-]+\.[\w-]+\.[\w-]+\n$/, 'prints the token alone');

  for (const sub of ['show', 'revoke']) {
    const r = await runCli(['device', sub, 'ghost', ...c]);
    t.equal(r.code, 1, `${sub} unknown device: exit 1`);
    t.match(r.stderr, /ECONN_DEVICE_UNKNOWN.*"ghost" is not registered/);
  }
  const badId = await runCli(['device', 'show', 'a/b', ...c]);
  t.not(badId.code, 0);
  t.match(badId.stderr, /not a valid device id/);

  const enr = await runCli(['enroll', 'create', '--ttl', '600', '--uses', '3', ...c]);
  t.equal(enr.code, 0, enr.stderr);
  t.match(enr.stdout, /^enr_[\w-]+\nexpires \d{4}-\d\d-\d\dT[\d:.]+Z \(3 uses\)\n$/);

  const rev = await runCli(['device', 'revoke', 'sensor-1', ...c]);
  t.equal(rev.code, 0, rev.stderr);
  t.match(rev.stdout, /revoked device sensor-1/);
  const after = await runCli(['device', 'list', ...c]);
  t.match(after.stdout, /^sensor-1\s+revoked/m);

  // the daemon log never carries the private key or tokens
  const logs = d.output().stdout;
  t.notMatch(logs, /BEGIN PRIVATE KEY/);
  t.notMatch(logs, readFileSync(tokF, 'utf8').trim());
});

t.test('device list without a running daemon: clear error, exit 69', async (t) => {
  const dir = tempDir(t);
  const cfg = path.join(dir, 'c.yaml');
  writeFileSync(cfg, `daemon: { state_dir: ${JSON.stringify(path.join(dir, 'state'))} }\n`);
  const r = await runCli(['device', 'list', '-c', cfg]);
  t.equal(r.code, 69);
  t.match(r.stderr, /not running/);
});
