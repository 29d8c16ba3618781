import t, { type Test } from 'tap';
import { readFileSync, writeFileSync, statSync, readdirSync, mkdirSync } from 'node:fs';
import path from 'node:path';
import { createLogger } from '../../core/logger.js';
import { AtomicJsonFile, DeviceRegistry, normalizeSerial, validateMetadata, DEVICE_ID_RE, type RegistryData } from '../../identity/registry.js';
import { tempDir, spawnDaemon } from '../helpers/daemon.js';

const logger = createLogger({ level: 'silent' });

async function open(t: Test, file?: string, now?: () => number): Promise<DeviceRegistry> {
  const f = file ?? path.join(tempDir(t), 'registry.json');
  const r = new DeviceRegistry({ file: f, logger, now });
  t.teardown(() => r.close());
  await r.start();
  return r;
}

t.test('normalizeSerial: any notation, one canonical form', async (t) => {
  t.equal(normalizeSerial('0A:1b:FF'), 'a1bff');
  t.equal(normalizeSerial('00ab'), 'ab');
  t.equal(normalizeSerial('AB CD'), 'abcd');
  t.equal(normalizeSerial('0x00FF'), 'ff');
  t.equal(normalizeSerial('00'), '0');
});

t.test('DEVICE_ID_RE refuses MQTT wildcards, separators and $', async (t) => {
  for (const ok of ['a', 'dev-1', 'Sensor.42_x', 'A'.repeat(128)]) t.ok(DEVICE_ID_RE.test(ok), ok);
  for (const bad of ['', '-a', '.a', 'a/b', 'a+', 'a#', '$SYS', 'a b', 'A'.repeat(129), 'é']) t.notOk(DEVICE_ID_RE.test(bad), JSON.stringify(bad));
});

t.test('validateMetadata keeps known fields and refuses the rest', async (t) => {
  t.same(validateMetadata({ url: 'http://x', description: 'd', capabilities: ['a'], group: 'g-1' }), {
    url: 'http://x',
    description: 'd',
    capabilities: ['a'],
    group: 'g-1',
  });
  t.same(validateMetadata(undefined), {});
  t.throws(() => validateMetadata({ evil: 1 }), { code: 'ECONN_BAD_REQUEST' });
  t.throws(() => validateMetadata({ capabilities: 'x' }), { code: 'ECONN_BAD_REQUEST' });
  t.throws(() => validateMetadata({ group: 'a/b' }), { code: 'ECONN_BAD_REQUEST' });
  t.throws(() => validateMetadata([1]), { code: 'ECONN_BAD_REQUEST' });
});

t.test('create, get, list; persisted atomically with mode 0600 and reloaded', async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'registry.json');
  const r = await open(t, file);
  const rec = await r.create('dev-1', { description: 'first', group: 'g' });
  t.equal(rec.status, 'active');
  t.equal(rec.last_seen_at, null);
  t.ok(Date.parse(rec.created_at) > 0);
  await r.create('a-dev', {});
  t.same(
    r.list().map((d) => d.id),
    ['a-dev', 'dev-1'],
  );
  t.equal(statSync(file).mode & 0o777, 0o600);
  t.same(readdirSync(dir), ['registry.json'], 'no temp file left');
  // a returned record is a copy
  r.get('dev-1')!.metadata.description = 'changed';
  t.equal(r.get('dev-1')!.metadata.description, 'first');
  await r.close();

  const again = await open(t, file);
  t.equal(again.get('dev-1')?.metadata.description, 'first');
  t.equal(again.list().length, 2);
});

t.test('bad ids and duplicates are refused with codes', async (t) => {
  const r = await open(t);
  await t.rejects(r.create('a/b', {}), { code: 'ECONN_BAD_REQUEST' });
  await t.rejects(r.create('$SYS', {}), { code: 'ECONN_BAD_REQUEST' });
  await r.create('d', {});
  await t.rejects(r.create('d', {}), { code: 'ECONN_DEVICE_EXISTS' });
  await t.rejects(r.revoke('nope'), { code: 'ECONN_DEVICE_UNKNOWN' });
  await t.rejects(r.addCertificate('nope', { serial: '01', fingerprint256: 'x', not_after: '' }), { code: 'ECONN_DEVICE_UNKNOWN' });
  t.equal(r.get('__proto__'), undefined, 'prototype keys are not devices');
  t.equal(r.get('constructor'), undefined);
});

t.test('revoke: status, certificates and tokens revoked, event emitted', async (t) => {
  const r = await open(t);
  await r.create('d1', {});
  await r.create('d2', {});
  await r.addCertificate('d1', { serial: '0A:BC', fingerprint256: 'FP', not_after: '2030-01-01T00:00:00.000Z' });
  await r.addCertificate('d1', { serial: 'abc', fingerprint256: 'FP', not_after: '2030-01-01T00:00:00.000Z' }); // same serial: no duplicate
  await r.addToken('d1', { jti: 'j1', exp: Math.floor(Date.now() / 1000) + 60 });
  await r.addCertificate('d2', { serial: 'ff', fingerprint256: 'FP2', not_after: '2030-01-01T00:00:00.000Z' });
  t.equal(r.get('d1')!.certificates.length, 1);
  t.equal(r.deviceForSerial('00:0a:bc'), 'd1');
  await t.rejects(r.addCertificate('d2', { serial: 'abc', fingerprint256: 'x', not_after: '' }), { code: 'ECONN_PKI' }, 'a serial belongs to one device');
  t.notOk(r.isSerialRevoked('abc'));
  const events: string[] = [];
  r.on('revoked', (id: string) => events.push(id));
  const rec = await r.revoke('d1');
  t.equal(rec.status, 'revoked');
  t.ok(rec.revoked_at);
  t.same(events, ['d1']);
  t.ok(rec.certificates.every((c) => c.revoked));
  t.ok(rec.tokens.every((tk) => tk.revoked));
  t.ok(r.isSerialRevoked('0A:BC'), 'colon/uppercase notation');
  t.ok(r.isSerialRevoked('00abc'), 'leading zeros');
  t.ok(r.isTokenRevoked('j1'));
  t.notOk(r.isSerialRevoked('ff'), 'other device untouched');
  t.same(r.revokedSerialList(), ['abc']);
  await t.rejects(r.addToken('d1', { jti: 'j2', exp: 1 }), { code: 'ECONN_DEVICE_REVOKED' });
  await t.rejects(r.addCertificate('d1', { serial: '99', fingerprint256: 'x', not_after: '' }), { code: 'ECONN_DEVICE_REVOKED' });

  // revocations survive a restart
  await r.close();
  const again = await open(t, r.file);
  t.ok(again.isSerialRevoked('abc'));
  t.ok(again.isTokenRevoked('j1'));
});

t.test('a revoked id comes back only when reinstated (operator action); its old credentials stay revoked', async (t) => {
  const r = await open(t);
  await r.create('d', {});
  await r.addCertificate('d', { serial: '11', fingerprint256: 'x', not_after: '' });
  await r.addToken('d', { jti: 'old', exp: Math.floor(Date.now() / 1000) + 60 });
  await r.revoke('d');
  // issue 9 #4: a plain create (what the API and an enrollment token do) must not undo a revocation
  await t.rejects(r.create('d', { description: 'again' }), { code: 'ECONN_DEVICE_EXISTS', message: /--reinstate/ });
  t.throws(() => r.assertCreatable('d'), { code: 'ECONN_DEVICE_EXISTS' });
  t.equal(r.get('d')?.status, 'revoked', 'still revoked');
  t.doesNotThrow(() => r.assertCreatable('d', { reinstate: true }));
  const rec = await r.create('d', { description: 'again' }, { reinstate: true });
  t.equal(rec.status, 'active');
  t.ok(r.isSerialRevoked('11'));
  t.ok(r.isTokenRevoked('old'));
  await r.addCertificate('d', { serial: '22', fingerprint256: 'y', not_after: '' });
  t.notOk(r.isSerialRevoked('22'));
});

t.test('discard removes a record a failed registration just created; refuses one with a history', async (t) => {
  const r = await open(t);
  await r.create('fresh', {});
  await r.addCertificate('fresh', { serial: '33', fingerprint256: 'z', not_after: '' });
  await r.discard('fresh');
  t.equal(r.get('fresh'), undefined, 'gone');
  t.equal(r.deviceForSerial('33'), undefined, 'its serial is free again');
  await r.create('fresh', {}); // the id is free: no reinstatement needed
  await r.create('old', {});
  await r.revoke('old');
  await r.create('old', {}, { reinstate: true });
  await t.rejects(r.discard('old'), { code: 'ECONN_INTERNAL' }, 'a reinstated record is not discarded');
  await r.discard('never-there');
});

t.test('retireToken: refused from then on, persisted, without the token-revoked event', async (t) => {
  const r = await open(t);
  await r.create('d', {});
  await r.addToken('d', { jti: 'a', exp: Math.floor(Date.now() / 1000) + 60 });
  const seen: string[] = [];
  r.on('token-revoked', (_id: string, jti: string) => seen.push(jti));
  const p = r.retireToken('a');
  t.ok(r.isTokenRevoked('a'), 'refused at once, before the write finishes');
  await p;
  t.same(seen, [], 'no token-revoked event: a live session is not cut');
  t.equal(r.get('d')?.tokens[0]?.revoked, true, 'recorded');
  await r.retireToken('unknown-jti');
  t.ok(r.isTokenRevoked('unknown-jti'));
});

t.test('revokeToken revokes one token and emits token-revoked', async (t) => {
  const r = await open(t);
  await r.create('d', {});
  const exp = Math.floor(Date.now() / 1000) + 60;
  await r.addToken('d', { jti: 'a', exp });
  await r.addToken('d', { jti: 'b', exp });
  const seen: [string, string][] = [];
  r.on('token-revoked', (id: string, jti: string) => seen.push([id, jti]));
  await r.revokeToken('a');
  t.ok(r.isTokenRevoked('a'));
  t.notOk(r.isTokenRevoked('b'));
  t.same(seen, [['d', 'a']]);
  t.equal(r.get('d')!.status, 'active');
  await t.rejects(r.revokeToken('nope'), { code: 'ECONN_NOT_FOUND' });
});

t.test('addToken prunes entries long past their expiry', async (t) => {
  let now = Date.parse('2030-01-01T00:00:00Z');
  const r = await open(t, undefined, () => now);
  await r.create('d', {});
  const s = Math.floor(now / 1000);
  await r.addToken('d', { jti: 'old', exp: s + 60 });
  now += 40 * 86400_000;
  await r.addToken('d', { jti: 'new', exp: Math.floor(now / 1000) + 60 });
  t.same(
    r.get('d')!.tokens.map((x) => x.jti),
    ['new'],
  );
  t.equal(r.deviceForToken('old'), undefined);
});

t.test('touch sets last_seen_at and is persisted by close()', async (t) => {
  const file = path.join(tempDir(t), 'registry.json');
  const now = Date.parse('2031-05-05T05:05:05Z');
  const r = await open(t, file, () => now);
  await r.create('d', {});
  r.touch('d');
  r.touch('unknown'); // ignored
  t.equal(r.get('d')!.last_seen_at, '2031-05-05T05:05:05.000Z');
  await r.close();
  const data = JSON.parse(readFileSync(file, 'utf8')) as RegistryData;
  t.equal(data.devices.d!.last_seen_at, '2031-05-05T05:05:05.000Z');
});

t.test('a corrupt registry file stops start() with ECONN_REGISTRY_CORRUPT and is left untouched', async (t) => {
  const dir = tempDir(t);
  const cases: [string, string][] = [
    ['not json', '{"version":1,"devices":{"a":'],
    ['wrong shape', '{"version":1,"devices":[]}'],
    ['unknown version', '{"version":7,"devices":{}}'],
    ['bad record', '{"version":1,"devices":{"a":{"id":"b","status":"active","metadata":{},"certificates":[],"tokens":[]}}}'],
    ['bad status', '{"version":1,"devices":{"a":{"id":"a","status":"zombie","metadata":{},"certificates":[],"tokens":[]}}}'],
    ['bad token entry', '{"version":1,"devices":{"a":{"id":"a","status":"active","metadata":{},"certificates":[],"tokens":[{"jti":1}]}}}'],
    ['empty file', ''],
  ];
  for (const [name, text] of cases) {
    const file = path.join(dir, `${name.replace(/ /g, '-')}.json`);
    writeFileSync(file, text);
    const r = new DeviceRegistry({ file, logger });
    await t.rejects(r.start(), { code: 'ECONN_REGISTRY_CORRUPT', message: /left untouched/ }, name);
    t.equal(readFileSync(file, 'utf8'), text, `${name}: file not replaced`);
    t.throws(() => r.list(), { code: 'ECONN_CLOSED' }, `${name}: not usable`);
    await r.close();
  }
});

t.test('concurrent writes all land (serialized atomic writes)', async (t) => {
  const file = path.join(tempDir(t), 'registry.json');
  const r = await open(t, file);
  await Promise.all(Array.from({ length: 30 }, (_, i) => r.create(`d${i}`, {})));
  await r.close();
  const again = await open(t, file);
  t.equal(again.list().length, 30);
});

t.test('AtomicJsonFile: concurrent writes share one rewrite (group commit); each resolves after its data is on disk', async (t) => {
  const file = path.join(tempDir(t), 'doc.json');
  const f = new AtomicJsonFile<{ n: number }>(file);
  const onDisk = (): number => (JSON.parse(readFileSync(file, 'utf8')) as { n: number }).n;
  let ok = true;
  await Promise.all(Array.from({ length: 51 }, (_, i) => f.write({ n: i }).then(() => (ok &&= onDisk() === 50))));
  t.ok(ok, 'every caller resolves once the newest document (with its change) is written');
  t.equal(f.writes, 1, '51 writes at once cost 1 rewrite, not 51');
  const inProgress = f.write({ n: 100 });
  for (let i = 0; i < 100 && f.writes === 1; i++) await new Promise((r) => setImmediate(r));
  t.equal(f.writes, 2, 'that write has started');
  const later = Array.from({ length: 20 }, (_, i) => f.write({ n: 101 + i }));
  await inProgress;
  t.equal(onDisk(), 100, 'the write in progress carries its own document');
  await Promise.all(later);
  t.equal(onDisk(), 120, 'the callers that came during it share the next write, with the newest document');
  t.equal(f.writes, 3, '22 writes, 3 rewrites');
});

t.test('the daemon refuses to start on a corrupt registry and says why (child process)', async (t) => {
  const dir = tempDir(t);
  mkdirSync(path.join(dir, 'state'), { mode: 0o700 });
  const file = path.join(dir, 'state', 'registry.json');
  writeFileSync(file, '{"version":1,"devices":', { mode: 0o600 });
  const d = spawnDaemon(t, { dir });
  const exit = await d.exited;
  t.equal(exit.code, 70, 'exit code EX_SOFTWARE');
  const { stdout, stderr } = d.output();
  t.match(stdout + stderr, /ECONN_REGISTRY_CORRUPT/);
  t.match(stdout + stderr, /registry\.json/);
  t.equal(readFileSync(file, 'utf8'), '{"version":1,"devices":', 'left untouched');
});
