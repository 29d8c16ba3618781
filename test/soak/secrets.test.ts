/**
 * Fault suite — secrets: a whole site carries traffic with every kind of
 * secret in play (the cloud client secret, device tokens over MQTT, device
 * private keys, an enrollment token, the JWT signing key), the CA and signing
 * key are rotated, and then nothing any process printed contains any of them;
 * key files are 0600 and the state directory 0700, after init and after the
 * rotations. `npm audit --omit=dev` runs in the full level only (it needs the
 * registry, which a fault test must not depend on).
 */
import t from 'tap';
import { execFile } from 'node:child_process';
import { readFileSync, readdirSync, statSync } from 'node:fs';
import path from 'node:path';
import mqtt from 'mqtt';
import { runCli, tempDir, REPO, type CliResult } from '../helpers/daemon.js';
import { addDevice, startSite, tail, Publisher, sentinelsIn, CLIENT_SECRET } from '../helpers/fleet.js';
import { FULL } from '../helpers/soak.js';

t.setTimeout(180_000);

/** Every file below dir, with its mode. */
function walk(dir: string, out: { file: string; mode: number }[] = []): { file: string; mode: number }[] {
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) walk(p, out);
    else if (e.isFile()) out.push({ file: p, mode: statSync(p).mode & 0o777 });
  }
  return out;
}

/** Lines of a PEM private key body long enough to be unmistakable. */
function keyLines(pem: string): string[] {
  return pem.split('\n').filter((l) => l.length >= 40 && !l.startsWith('-----'));
}

function checkModes(t: Tap, stateDir: string, when: string): void {
  t.equal(statSync(stateDir).mode & 0o777, 0o700, `${when}: state directory 0700`);
  const loose = walk(stateDir).filter((f) => (/\.key$|secret|\.pem$/.test(path.basename(f.file)) || readFileSync(f.file, 'utf8').includes('PRIVATE KEY')) && (f.mode & 0o077) !== 0);
  t.same(
    loose.map((f) => `${path.relative(stateDir, f.file)} ${f.mode.toString(8)}`),
    [],
    `${when}: every private key and secret file is 0600`,
  );
}

interface Tap {
  equal(a: unknown, b: unknown, m: string): unknown;
  same(a: unknown, b: unknown, m: string): unknown;
}

t.test('no secret in anything any process printed; key files 0600 after init and rotations', async (t) => {
  const dir = tempDir(t, 'ec-soak-secrets-');
  const site = await startSite(t, dir, { over: { log: { level: 'trace' } } });
  const d = site.d;
  checkModes(t, d.stateDir, 'after init');
  const cli: CliResult[] = [];
  const run = async (args: string[]): Promise<CliResult> => {
    const r = await runCli([...args, '-c', d.configFile], { cwd: dir });
    cli.push(r);
    return r;
  };
  const devs = [await addDevice(d, 'sec-a'), await addDevice(d, 'sec-b')];
  const enroll = await run(['enroll', 'create', '--uses', '1']);
  t.equal(enroll.code, 0, `enroll create: ${enroll.stderr}`);
  const enrollToken = /[A-Za-z0-9_-]{20,}/.exec(enroll.stdout)?.[0] ?? '';
  t.ok(enrollToken.length >= 20, 'an enrollment token was printed to its requester');
  // traffic: one device by certificate, one by JWT as the MQTT password
  const pub = new Publisher(devs[0]!);
  await pub.run(d);
  await pub.waitAcked(50);
  const jwtDev = devs[1]!;
  const c = mqtt.connect(`mqtts://127.0.0.1:${d.ports.mqtt_tls}`, { clientId: jwtDev.id, username: jwtDev.id, password: jwtDev.token, ca: readFileSync(jwtDev.ca), protocolVersion: 4, reconnectPeriod: 0 });
  await new Promise<void>((resolve, reject) => (c.once('connect', () => resolve()), c.once('error', reject)));
  await c.publishAsync(`devices/${jwtDev.id}/t`, 'via-jwt', { qos: 1 });
  // a wrong password carrying most of a real token must not be echoed either
  const bad = mqtt.connect(`mqtts://127.0.0.1:${d.ports.mqtt_tls}`, { clientId: jwtDev.id, username: jwtDev.id, password: jwtDev.token.slice(0, -3) + 'AAA', ca: readFileSync(jwtDev.ca), protocolVersion: 4, reconnectPeriod: 0 });
  await new Promise<void>((resolve) => (bad.once('error', () => resolve()), bad.once('close', () => resolve())));
  bad.end(true);
  c.end(true);
  // rotations: the device CA and the JWT signing key
  t.equal((await run(['ca', 'rotate'])).code, 0, 'ca rotate');
  t.equal((await run(['keys', 'rotate'])).code, 0, 'keys rotate');
  checkModes(t, d.stateDir, 'after ca rotate and keys rotate');
  await pub.finish();
  await tail(t, site.cloud, sentinelsIn([pub]), 'the traffic in the cloud', 60_000);
  await d.stop('SIGTERM');
  await site.cloud.proc.stop('SIGTERM');

  const secrets: [string, string][] = [
    ['cloud client secret', CLIENT_SECRET],
    ['enrollment token', enrollToken],
    ...devs.map((x): [string, string] => [`${x.id} token`, x.token]),
    ...devs.map((x): [string, string] => [`${x.id} token signature`, x.token.split('.')[2]!]),
  ];
  for (const f of walk(d.stateDir)) {
    const text = readFileSync(f.file, 'utf8');
    if (text.includes('PRIVATE KEY')) for (const l of keyLines(text)) secrets.push([`private key ${path.relative(d.stateDir, f.file)}`, l]);
  }
  for (const x of devs) for (const l of keyLines(readFileSync(x.key, 'utf8'))) secrets.push([`${x.id} private key`, l]);
  const printed = [d.output(), site.cloud.proc.output(), ...cli.filter((r) => r !== enroll)].map((o) => ('stdout' in o ? o.stdout + o.stderr : '')).join('\n');
  t.ok(printed.length > 5000, `the processes printed plenty (${printed.length} characters at trace level)`);
  const leaked = secrets.filter(([, s]) => s && printed.includes(s)).map(([n]) => n);
  t.same(leaked, [], `none of ${secrets.length} secrets appears in any output`);
});

t.test('npm audit --omit=dev: no high or critical advisory', { skip: FULL ? false : 'full level only (npm run soak): needs the registry' }, async (t) => {
  const r = await new Promise<{ code: number; stdout: string }>((resolve) =>
    execFile('npm', ['audit', '--omit=dev', '--json'], { cwd: REPO, timeout: 120_000, maxBuffer: 16 * 1024 * 1024 }, (err, stdout) => resolve({ code: err ? 1 : 0, stdout })),
  );
  let counts: Record<string, number>;
  try {
    counts = (JSON.parse(r.stdout) as { metadata?: { vulnerabilities?: Record<string, number> } }).metadata?.vulnerabilities ?? {};
  } catch {
    t.fail(`npm audit did not answer JSON: ${r.stdout.slice(0, 300)}`);
    return;
  }
  t.comment(`npm audit --omit=dev: ${JSON.stringify(counts)}`);
  t.equal((counts.high ?? 0) + (counts.critical ?? 0), 0, 'no high or critical advisory in production dependencies');
});
