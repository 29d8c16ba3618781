import t, { type Test } from 'tap';
import { X509Certificate, createPrivateKey } from 'node:crypto';
import path from 'node:path';
import { createLogger } from '../../core/logger.js';
import { parseConfigText } from '../../core/config/load.js';
import { AdminServer, adminRequest, adminSocketPath } from '../../daemon/admin.js';
import { DeviceRegistry, type DeviceRecord } from '../../identity/registry.js';
import { LocalPki } from '../../identity/pki.js';
import { TokenService } from '../../identity/tokens.js';
import { EnrollmentStore } from '../../identity/enrollment.js';
import { registerIdentityAdmin, type DeviceBundle, type Identity } from '../../identity/admin.js';
import { tempDir } from '../helpers/daemon.js';

const logger = createLogger({ level: 'silent' });

async function fixture(t: Test): Promise<{ call: (m: string, p?: Record<string, unknown>) => Promise<unknown>; identity: Identity }> {
  const stateDir = tempDir(t);
  const cfg = parseConfigText(`daemon: { state_dir: ${JSON.stringify(stateDir)} }\nidentity: { enrollment_default_ttl_s: 120 }\n`, 'test.yaml', {
    checkSecrets: false,
  }).config;
  await LocalPki.initStep().run(cfg, logger);
  await TokenService.initStep().run(cfg, logger);
  const registry = new DeviceRegistry({ file: path.join(stateDir, 'registry.json'), logger });
  const pki = new LocalPki({ stateDir, config: cfg.identity.pki, logger });
  const tokens = new TokenService({ stateDir, config: cfg.identity.jwt, registry, logger });
  const enrollment = new EnrollmentStore({ registry, logger });
  const admin = new AdminServer(adminSocketPath(stateDir), logger);
  const identity = { registry, pki, tokens, enrollment };
  registerIdentityAdmin(admin, identity, logger, { enrollmentDefaultTtlS: () => cfg.identity.enrollment_default_ttl_s });
  for (const c of [registry, pki, tokens, admin]) {
    await c.start();
    t.teardown(() => c.close());
  }
  return { call: (m, p = {}) => adminRequest(adminSocketPath(stateDir), m, p), identity };
}

t.test('device.add returns a working bundle and records the certificate and token', async (t) => {
  const { call, identity } = await fixture(t);
  const b = (await call('device.add', { id: 'dev-1', metadata: { group: 'line-1' } })) as DeviceBundle;
  const cert = new X509Certificate(b.cert);
  t.ok(cert.checkPrivateKey(createPrivateKey(b.key)));
  t.ok(cert.verify(new X509Certificate(b.ca).publicKey));
  t.equal(cert.subject, 'CN=dev-1');
  t.equal(b.ca, identity.pki.caCertificatePem());
  const claims = await identity.tokens.verify(b.token);
  t.equal(claims.deviceId, 'dev-1');
  t.equal(new Date(b.expires_at).getTime(), claims.exp * 1000);
  const rec = identity.registry.get('dev-1')!;
  t.same(rec.metadata, { group: 'line-1' });
  t.equal(rec.certificates[0]!.serial, b.serial);
  t.equal(rec.certificates[0]!.fingerprint256, cert.fingerprint256);
  t.equal(identity.registry.deviceForSerial(cert.serialNumber), 'dev-1');
  t.equal(rec.tokens.length, 1);

  const rsa = (await call('device.add', { id: 'dev-rsa', key_type: 'rsa' })) as DeviceBundle;
  t.equal(createPrivateKey(rsa.key).asymmetricKeyType, 'rsa');

  await t.rejects(call('device.add', { id: 'dev-1' }), { code: 'ECONN_DEVICE_EXISTS' });
  await t.rejects(call('device.add', { id: 'a/b' }), { code: 'ECONN_BAD_REQUEST' });
  await t.rejects(call('device.add', {}), { code: 'ECONN_BAD_REQUEST' });
  await t.rejects(call('device.add', { id: 'x', key_type: 'dsa' }), { code: 'ECONN_BAD_REQUEST' });
  await t.rejects(call('device.add', { id: 'x', metadata: { secret: 1 } }), { code: 'ECONN_BAD_REQUEST' });
  t.equal(identity.registry.get('x'), undefined, 'nothing registered by refused requests');
});

t.test('device.list, show, token, revoke', async (t) => {
  const { call, identity } = await fixture(t);
  await call('device.add', { id: 'b' });
  await call('device.add', { id: 'a' });
  const list = (await call('device.list')) as DeviceRecord[];
  t.same(
    list.map((d) => d.id),
    ['a', 'b'],
  );
  const shown = (await call('device.show', { id: 'a' })) as DeviceRecord;
  t.equal(shown.status, 'active');
  await t.rejects(call('device.show', { id: 'nope' }), { code: 'ECONN_DEVICE_UNKNOWN', message: /not registered/ });

  const tok = (await call('device.token', { id: 'a' })) as { token: string; jti: string; expires_at: string };
  t.equal((await identity.tokens.verify(tok.token)).jti, tok.jti);
  await t.rejects(call('device.token', { id: 'nope' }), { code: 'ECONN_DEVICE_UNKNOWN' });

  const revoked: string[] = [];
  identity.registry.on('revoked', (id: string) => revoked.push(id));
  const rec = (await call('device.revoke', { id: 'a' })) as DeviceRecord;
  t.equal(rec.status, 'revoked');
  t.same(revoked, ['a']);
  await t.rejects(identity.tokens.verify(tok.token), { code: 'ECONN_DEVICE_REVOKED' });
  t.ok(identity.registry.isSerialRevoked(rec.certificates[0]!.serial));
  await t.rejects(call('device.revoke', { id: 'nope' }), { code: 'ECONN_DEVICE_UNKNOWN' });
  await t.rejects(call('device.token', { id: 'a' }), { code: 'ECONN_DEVICE_REVOKED' });
});

t.test('enroll.create: defaults from config, explicit ttl and uses, bad input', async (t) => {
  const { call, identity } = await fixture(t);
  const before = Date.now();
  const d = (await call('enroll.create')) as { token: string; expires_at: string; uses: number };
  t.equal(d.uses, 1);
  const ttl = Date.parse(d.expires_at) - before;
  t.ok(ttl > 110_000 && ttl <= 121_000, 'enrollment_default_ttl_s');
  const e = (await call('enroll.create', { ttl_s: 3600, uses: 5 })) as { token: string; expires_at: string; uses: number };
  t.equal(e.uses, 5);
  await identity.enrollment.consume(e.token);
  await t.rejects(call('enroll.create', { ttl_s: 'soon' }), { code: 'ECONN_BAD_REQUEST' });
  await t.rejects(call('enroll.create', { uses: 0 }), { code: 'ECONN_BAD_REQUEST' });
});

t.test('device.add: a revoked id comes back only with reinstate (the operator action); its old credentials stay revoked', async (t) => {
  const { call, identity } = await fixture(t);
  const first = (await call('device.add', { id: 'back-1' })) as DeviceBundle;
  await call('device.revoke', { id: 'back-1' });
  await t.rejects(call('device.add', { id: 'back-1' }), { code: 'ECONN_DEVICE_EXISTS', message: /--reinstate/ });
  await t.rejects(call('device.add', { id: 'back-1', reinstate: 'yes' }), { code: 'ECONN_BAD_REQUEST' });
  const again = (await call('device.add', { id: 'back-1', reinstate: true })) as DeviceBundle;
  t.equal(identity.registry.get('back-1')?.status, 'active');
  t.type(identity.registry.get('back-1')?.reinstated_at, 'string', 'the reinstatement is recorded');
  t.ok(identity.registry.isSerialRevoked(first.serial), 'the old certificate stays revoked');
  await t.rejects(identity.tokens.verify(first.token), { code: 'ECONN_AUTH_TOKEN' }, 'the old token stays revoked');
  t.equal((await identity.tokens.verify(again.token)).deviceId, 'back-1');
  await t.rejects(call('device.add', { id: 'back-1', reinstate: true }), { code: 'ECONN_DEVICE_EXISTS' }, 'reinstate does not override an active device');
});
