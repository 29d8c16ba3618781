import t, { type Test } from 'tap';
import { readFileSync, writeFileSync, statSync, readdirSync, mkdirSync, existsSync, copyFileSync, appendFileSync } from 'node:fs';
import path from 'node:path';
import { createLogger } from '../../core/logger.js';
import { DeviceRegistry, normalizeSerial, validateMetadata, DEVICE_ID_RE, type RegistryData } from '../../identity/registry.js';
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

t.test('group commit: concurrent changes share durable writes; each resolves only once a write holding it is on disk', async (t) => {
  const writes: string[] = [];
  const { DeviceRegistry: Reg } = await t.mockImport<typeof import('../../identity/registry.js')>('../../identity/registry.js', {
    '../../core/fs.js': {
      ...(await import('../../core/fs.js')),
      writeAtomic: async (file: string, text: string) => {
        writes.push(text);
        const { writeAtomic } = await import('../../core/fs.js');
        await writeAtomic(file, text);
      },
    },
  });
  const file = path.join(tempDir(t), 'registry.json');
  const r = new Reg({ file, logger });
  t.teardown(() => r.close());
  await r.start();
  const before = writes.length;
  const ids = Array.from({ length: 50 }, (_, i) => `grp-${i}`);
  // each create resolves only after its device is durable: the file read right then holds it
  await Promise.all(
    ids.map(async (id) => {
      await r.create(id, {});
      const onDisk = JSON.parse(readFileSync(file, 'utf8')) as RegistryData;
      if (!onDisk.devices[id]) t.fail(`${id} resolved before a write holding it was durable`);
    }),
  );
  const used = writes.length - before;
  t.ok(used >= 1 && used < ids.length / 5, `50 concurrent creates took ${used} durable writes (group commit)`);
  const onDisk = JSON.parse(readFileSync(file, 'utf8')) as RegistryData;
  t.same(Object.keys(onDisk.devices).filter((k) => k.startsWith('grp-')).sort(), [...ids].sort(), 'every device on disk');
  // a failed write rejects the changes it carried, and the next change writes again
  const failing = await t.mockImport<typeof import('../../identity/registry.js')>('../../identity/registry.js', {
    '../../core/fs.js': { ...(await import('../../core/fs.js')), writeAtomic: async () => Promise.reject(Object.assign(new Error('disk gone'), { code: 'EIO' })) },
  });
  const adapter = new failing.AtomicJsonFile<{ n: number }>(path.join(tempDir(t), 'x.json'));
  await t.rejects(Promise.all([adapter.write({ n: 1 }), adapter.write({ n: 2 })]), /disk gone/);
  await t.rejects(adapter.write({ n: 3 }), /disk gone/, 'a later write is attempted (and fails) on its own');
});

t.test('a large registry commits by appending to its change log; a copy taken at any resolved change holds it; close folds the log in', async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'registry.json');
  const wal = `${file}.wal`;
  const r = await open(t, file);
  // > 64 KiB of file: from here commits append instead of rewriting the whole file
  await Promise.all(Array.from({ length: 150 }, (_, i) => r.create(`big-${i}`, { description: 'x'.repeat(600) })));
  const fileBefore = readFileSync(file, 'utf8');
  t.ok(fileBefore.length > 64 * 1024, 'file is past the full-rewrite size');
  t.notOk(existsSync(wal), 'no change log yet');

  // what a power cut right after each resolved change leaves: a copy of the state directory
  const snapshot = (): string => {
    const copy = tempDir(t);
    for (const f of readdirSync(dir)) copyFileSync(path.join(dir, f), path.join(copy, f));
    return path.join(copy, 'registry.json');
  };
  await r.create('late', { description: 'after' });
  await r.addToken('late', { jti: 'j-late', exp: Math.floor(Date.now() / 1000) + 3600 });
  await r.revoke('big-3');
  await r.discard('big-4');
  t.equal(readFileSync(file, 'utf8'), fileBefore, 'the file itself was not rewritten');
  t.ok(existsSync(wal), 'the changes went to the change log');
  t.equal(statSync(wal).mode & 0o777, 0o600, 'change log mode 0600');
  const crashed = snapshot();
  // a torn last line (a write that never completed) is dropped
  appendFileSync(`${crashed}.wal`, '{"device":"torn","rec');
  const back = await open(t, crashed);
  t.equal(back.get('late')?.metadata.description, 'after', 'created device replayed');
  t.equal(back.deviceForToken('j-late'), 'late', 'token replayed and indexed');
  t.equal(back.get('big-3')?.status, 'revoked', 'revocation replayed');
  t.ok(back.isTokenRevoked('j-late') === false && back.get('big-4') === undefined, 'discard replayed');
  t.equal(back.get('torn'), undefined);
  t.equal(back.list().length, 150, '150 - 1 discarded + 1 created');
  t.notOk(existsSync(`${crashed}.wal`), 'start-up folded the log into the file');
  t.ok((JSON.parse(readFileSync(crashed, 'utf8')) as RegistryData).devices.late, 'and the file holds the replayed change');

  await r.close();
  t.notOk(existsSync(wal), 'close folded the log into the file');
  const data = JSON.parse(readFileSync(file, 'utf8')) as RegistryData;
  t.equal(data.devices['big-3']!.status, 'revoked');
  t.ok(data.devices.late && !data.devices['big-4']);
});

t.test('the change log: a bad line in the middle refuses start-up; a log of an older generation is ignored', async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'registry.json');
  writeFileSync(file, JSON.stringify({ version: 1, devices: {}, enrollments: [], wal_generation: 4 }), { mode: 0o600 });
  const rec = { id: 'a', status: 'active', metadata: {}, certificates: [], tokens: [], created_at: '2030-01-01T00:00:00.000Z', last_seen_at: null };
  const bad = `{"wal_generation":4}\n{"device":"a","rec\n${JSON.stringify({ device: 'a', record: rec })}\n`;
  writeFileSync(`${file}.wal`, bad);
  const r = new DeviceRegistry({ file, logger });
  await t.rejects(r.start(), { code: 'ECONN_REGISTRY_CORRUPT', message: /left untouched/ });
  t.equal(readFileSync(`${file}.wal`, 'utf8'), bad, 'log left untouched');
  await r.close();

  writeFileSync(`${file}.wal`, `{"wal_generation":3}\n${JSON.stringify({ device: 'a', record: rec })}\n`);
  const r2 = await open(t, file);
  t.equal(r2.get('a'), undefined, 'an older log is not replayed over a newer file');
  t.notOk(existsSync(`${file}.wal`), 'and removed');
});

t.test('change log group commit: concurrent changes share one append + fdatasync; a failed append rejects its changes and the next commit rewrites the file', async (t) => {
  const fsp = await import('node:fs/promises');
  let syncs = 0;
  let failNext = false;
  const { DeviceRegistry: Reg } = await t.mockImport<typeof import('../../identity/registry.js')>('../../identity/registry.js', {
    'node:fs/promises': {
      ...fsp,
      open: async (...a: Parameters<typeof fsp.open>) => {
        const fh = await fsp.open(...a);
        if (!String(a[0]).endsWith('.wal')) return fh;
        const datasync = fh.datasync.bind(fh);
        fh.datasync = async () => {
          syncs++;
          if (failNext) {
            failNext = false;
            throw Object.assign(new Error('disk gone'), { code: 'EIO' });
          }
          return datasync();
        };
        return fh;
      },
    },
  });
  const dir = tempDir(t);
  const file = path.join(dir, 'registry.json');
  const r = new Reg({ file, logger });
  t.teardown(() => r.close());
  await r.start();
  await Promise.all(Array.from({ length: 150 }, (_, i) => r.create(`big-${i}`, { description: 'x'.repeat(600) })));
  await r.create('first', {}); // opens the log
  const before = syncs;
  const ids = Array.from({ length: 50 }, (_, i) => `wal-${i}`);
  await Promise.all(ids.map((id) => r.create(id, {})));
  const used = syncs - before;
  t.ok(used >= 1 && used < ids.length / 5, `50 concurrent creates took ${used} log syncs`);
  t.equal(readFileSync(`${file}.wal`, 'utf8').split('\n').filter((l) => l.includes('"wal-')).length, 50, 'each in the log once');

  failNext = true;
  const fileBefore = readFileSync(file, 'utf8');
  await t.rejects(r.create('lost', {}), { code: 'ECONN_STATE_DIR' }, 'the failed commit rejects its change');
  await r.create('after', {});
  const onDisk = JSON.parse(readFileSync(file, 'utf8')) as RegistryData;
  t.not(readFileSync(file, 'utf8'), fileBefore, 'the next commit rewrote the whole file');
  t.ok(onDisk.devices.after && onDisk.devices.lost && onDisk.devices['wal-49'], 'with every change in memory, the rejected one included');
  t.notOk(existsSync(`${file}.wal`), 'and dropped the log');
});
