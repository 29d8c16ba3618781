import t, { type Test } from 'tap';
import { readFileSync, statSync, readdirSync } from 'node:fs';
import { createPrivateKey, createPublicKey, generateKeyPairSync, type KeyObject } from 'node:crypto';
import path from 'node:path';
import { SignJWT, decodeProtectedHeader, decodeJwt, base64url } from 'jose';
import { createLogger } from '../../core/logger.js';
import { parseConfigText } from '../../core/config/load.js';
import type { Config } from '../../core/config/schema.js';
import { DeviceRegistry } from '../../identity/registry.js';
import { TokenService, keysDir } from '../../identity/tokens.js';
import { tempDir } from '../helpers/daemon.js';

const logger = createLogger({ level: 'silent' });
const T0 = Date.parse('2030-06-01T12:00:00Z');

function config(stateDir: string, extra = ''): Config {
  return parseConfigText(`daemon: { state_dir: ${JSON.stringify(stateDir)} }\n${extra}`, 'test.yaml', { checkSecrets: false }).config;
}

interface Fixture {
  tokens: TokenService;
  registry: DeviceRegistry;
  clock: { now: number };
  cfg: Config;
  stateDir: string;
  /** The current signing key, read from the state directory (to forge tokens with precise claims). */
  signingKey(): { key: KeyObject; kid: string; alg: string };
}

async function fixture(t: Test, extra = ''): Promise<Fixture> {
  const stateDir = tempDir(t);
  const cfg = config(stateDir, extra);
  const clock = { now: T0 };
  const now = (): number => clock.now;
  await TokenService.initStep().run(cfg, logger);
  const registry = new DeviceRegistry({ file: path.join(stateDir, 'registry.json'), logger, now });
  await registry.start();
  t.teardown(() => registry.close());
  const tokens = new TokenService({ stateDir, config: cfg.identity.jwt, registry, logger, now });
  await tokens.start();
  t.teardown(() => tokens.close());
  await registry.create('dev-a', { group: 'g1', description: 'A' });
  await registry.create('dev-b', {});
  const signingKey = (): { key: KeyObject; kid: string; alg: string } => {
    const idx = JSON.parse(readFileSync(path.join(keysDir(stateDir), 'jwt-keys.json'), 'utf8')) as { current: string; keys: { kid: string; alg: string }[] };
    const key = createPrivateKey(readFileSync(path.join(keysDir(stateDir), `jwt-${idx.current}.key`), 'utf8'));
    return { key, kid: idx.current, alg: idx.keys.find((k) => k.kid === idx.current)!.alg };
  };
  return { tokens, registry, clock, cfg, stateDir, signingKey };
}

/** A token signed with the real key but with chosen claims (what an attacker with the key could NOT do; here to test claim checks). */
async function forge(f: Fixture, claims: Record<string, unknown>, header: Record<string, unknown> = {}): Promise<string> {
  const { key, kid, alg } = f.signingKey();
  const iat = Math.floor(f.clock.now / 1000);
  const payload = { sub: 'dev-a', device_id: 'dev-a', iss: 'edge-connector', aud: 'edge-devices', iat, exp: iat + 600, jti: `j-${Math.random()}`, ...claims };
  for (const [k, v] of Object.entries(payload)) if (v === undefined) delete (payload as Record<string, unknown>)[k];
  return new SignJWT(payload).setProtectedHeader({ alg, kid, ...header }).sign(key);
}

function unsigned(header: Record<string, unknown>, payload: Record<string, unknown>, sig = ''): string {
  const enc = (o: unknown): string => base64url.encode(JSON.stringify(o));
  return `${enc(header)}.${enc(payload)}.${sig}`;
}

t.test('signing key: created by init (0600), never overwritten', async (t) => {
  const stateDir = tempDir(t);
  const cfg = config(stateDir);
  const created = await TokenService.initStep().run(cfg, logger);
  t.equal(created.length, 2);
  for (const f of created) t.equal(statSync(f).mode & 0o777, 0o600, path.basename(f));
  t.same(await TokenService.initStep().run(cfg, logger), []);
  t.equal(readdirSync(keysDir(stateDir)).length, 2);
  const registry = new DeviceRegistry({ file: path.join(stateDir, 'r.json'), logger });
  const noKeys = new TokenService({ stateDir: tempDir(t), config: cfg.identity.jwt, registry, logger });
  await t.rejects(noKeys.start(), { code: 'ECONN_STATE_DIR', message: /connector init/ });
});

t.test('issue + verify: claims, kid header, jti recorded', async (t) => {
  const f = await fixture(t);
  const { token, jti, expiresAt } = await f.tokens.issue('dev-a');
  const header = decodeProtectedHeader(token);
  t.equal(header.alg, 'ES256');
  t.equal(header.kid, f.signingKey().kid);
  const p = decodeJwt(token);
  t.equal(p.sub, 'dev-a');
  t.equal(p.device_id, 'dev-a');
  t.equal(p.iss, 'edge-connector');
  t.equal(p.aud, 'edge-devices');
  t.equal(p.iat, T0 / 1000);
  t.equal(p.exp, T0 / 1000 + f.cfg.identity.jwt.ttl_s);
  t.equal(p.jti, jti);
  t.same(p.metadata, { group: 'g1', description: 'A' });
  t.equal(expiresAt.getTime(), (p.exp as number) * 1000);
  t.same(
    f.registry.get('dev-a')!.tokens.map((x) => x.jti),
    [jti],
  );
  const claims = await f.tokens.verify(token);
  t.same(claims, { deviceId: 'dev-a', jti, iat: T0 / 1000, exp: T0 / 1000 + 86400, metadata: { group: 'g1', description: 'A' } });
  await t.rejects(f.tokens.issue('nobody'), { code: 'ECONN_DEVICE_UNKNOWN' });
});

t.test('refused: alg none, HS256 keyed with the public key, RS256, unknown kid', async (t) => {
  const f = await fixture(t);
  const good = await f.tokens.issue('dev-a');
  const payload = decodeJwt(good.token);
  const { kid } = f.signingKey();
  await t.rejects(f.tokens.verify(unsigned({ alg: 'none', kid }, payload)), { code: 'ECONN_AUTH_TOKEN' }, 'alg none, empty signature');
  await t.rejects(f.tokens.verify(unsigned({ alg: 'none', kid }, payload, 'xx')), { code: 'ECONN_AUTH_TOKEN', message: /not allowed/ }, 'alg none');
  await t.rejects(f.tokens.verify(unsigned({ alg: 'NONE', kid }, payload, 'xx')), { code: 'ECONN_AUTH_TOKEN', message: /not allowed/ });

  // HS256 with the connector's public key (PEM and DER) as the HMAC secret: the classic confusion attack
  const pub = createPublicKey(f.signingKey().key);
  for (const secret of [Buffer.from(pub.export({ type: 'spki', format: 'pem' }) as string), pub.export({ type: 'spki', format: 'der' })]) {
    const hs = await new SignJWT(payload).setProtectedHeader({ alg: 'HS256', kid }).sign(new Uint8Array(secret));
    await t.rejects(f.tokens.verify(hs), { code: 'ECONN_AUTH_TOKEN', message: /not allowed/ }, 'HS256 with public key');
  }
  const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey;
  const rs = await new SignJWT(payload).setProtectedHeader({ alg: 'RS256', kid }).sign(rsa);
  await t.rejects(f.tokens.verify(rs), { code: 'ECONN_AUTH_TOKEN', message: /not allowed/ }, 'RS256');
  // a foreign ES256 key claiming our kid
  const foreign = generateKeyPairSync('ec', { namedCurve: 'prime256v1' }).privateKey;
  const es = await new SignJWT(payload).setProtectedHeader({ alg: 'ES256', kid }).sign(foreign);
  await t.rejects(f.tokens.verify(es), { code: 'ECONN_AUTH_TOKEN', message: /signature/ }, 'foreign key');
  const noKid = await new SignJWT(payload).setProtectedHeader({ alg: 'ES256' }).sign(f.signingKey().key);
  await t.rejects(f.tokens.verify(noKid), { code: 'ECONN_AUTH_TOKEN', message: /kid/ });
  const otherKid = await new SignJWT(payload).setProtectedHeader({ alg: 'ES256', kid: 'nope' }).sign(f.signingKey().key);
  await t.rejects(f.tokens.verify(otherKid), { code: 'ECONN_AUTH_TOKEN', message: /unknown/ });
  // EdDSA header on an ES256 key
  await t.rejects(f.tokens.verify(unsigned({ alg: 'EdDSA', kid }, payload, 'xx')), { code: 'ECONN_AUTH_TOKEN', message: /does not match/ });
});

t.test('refused: tampered payload, malformed input', async (t) => {
  const f = await fixture(t);
  const { token } = await f.tokens.issue('dev-a');
  const [h, , s] = token.split('.');
  const p = decodeJwt(token);
  const tampered = `${h}.${base64url.encode(JSON.stringify({ ...p, sub: 'dev-b', device_id: 'dev-b' }))}.${s}`;
  await t.rejects(f.tokens.verify(tampered), { code: 'ECONN_AUTH_TOKEN', message: /signature/ });
  const longer = `${h}.${base64url.encode(JSON.stringify({ ...p, exp: (p.exp as number) + 1e6 }))}.${s}`;
  await t.rejects(f.tokens.verify(longer), { code: 'ECONN_AUTH_TOKEN' });
  for (const bad of ['', 'x', 'a.b', 'a.b.c', '...', `${h}.${s}`, 'é.é.é', 'x'.repeat(10000), `${token}.x`]) {
    const err = await f.tokens.verify(bad).then(
      () => undefined,
      (e: unknown) => e as { code?: string; message: string },
    );
    t.equal(err?.code, 'ECONN_AUTH_TOKEN', `malformed ${JSON.stringify(bad.slice(0, 20))}`);
    t.notMatch(err?.message ?? '', token, 'never echoes the token');
  }
  await t.rejects(f.tokens.verify(undefined as unknown as string), { code: 'ECONN_AUTH_TOKEN' });
  await t.rejects(f.tokens.verify({} as unknown as string), { code: 'ECONN_AUTH_TOKEN' });
});

t.test('exp and nbf with clock skew (injected clock)', async (t) => {
  const f = await fixture(t, 'identity: { jwt: { ttl_s: 600, clock_skew_s: 30 } }');
  const { token } = await f.tokens.issue('dev-a');
  f.clock.now = T0 + 600_000 + 29_000; // after exp but inside the skew
  t.ok(await f.tokens.verify(token));
  f.clock.now = T0 + 600_000 + 31_000;
  await t.rejects(f.tokens.verify(token), { code: 'ECONN_AUTH_TOKEN', message: /expired/ });

  f.clock.now = T0;
  const nbfFuture = await forge(f, { nbf: T0 / 1000 + 120 });
  await t.rejects(f.tokens.verify(nbfFuture), { code: 'ECONN_AUTH_TOKEN', message: /nbf/ });
  const nbfSkew = await forge(f, { nbf: T0 / 1000 + 20 });
  t.ok(await f.tokens.verify(nbfSkew), 'nbf inside the skew');
  const iatFuture = await forge(f, { iat: T0 / 1000 + 3600, exp: T0 / 1000 + 7200 });
  await t.rejects(f.tokens.verify(iatFuture), { code: 'ECONN_AUTH_TOKEN' });
  const noExp = await forge(f, { exp: undefined });
  await t.rejects(f.tokens.verify(noExp), { code: 'ECONN_AUTH_TOKEN', message: /exp/ });
});

t.test('refused: wrong iss, wrong aud, sub/device_id mismatch, missing jti', async (t) => {
  const f = await fixture(t);
  t.ok(await f.tokens.verify(await forge(f, {})), 'baseline forged token verifies');
  await t.rejects(f.tokens.verify(await forge(f, { iss: 'someone-else' })), { code: 'ECONN_AUTH_TOKEN', message: /iss/ });
  await t.rejects(f.tokens.verify(await forge(f, { aud: 'other-audience' })), { code: 'ECONN_AUTH_TOKEN', message: /aud/ });
  await t.rejects(f.tokens.verify(await forge(f, { iss: undefined })), { code: 'ECONN_AUTH_TOKEN' });
  await t.rejects(f.tokens.verify(await forge(f, { device_id: 'dev-b' })), { code: 'ECONN_AUTH_TOKEN', message: /device_id/ });
  await t.rejects(f.tokens.verify(await forge(f, { sub: 'a/b', device_id: 'a/b' })), { code: 'ECONN_AUTH_TOKEN' });
  await t.rejects(f.tokens.verify(await forge(f, { jti: undefined })), { code: 'ECONN_AUTH_TOKEN', message: /jti/ });
});

t.test('refused: unknown device, revoked device, revoked jti', async (t) => {
  const f = await fixture(t);
  await t.rejects(f.tokens.verify(await forge(f, { sub: 'ghost', device_id: 'ghost' })), { code: 'ECONN_DEVICE_UNKNOWN' });
  const a = await f.tokens.issue('dev-a');
  const b1 = await f.tokens.issue('dev-b');
  const b2 = await f.tokens.issue('dev-b');
  await f.tokens.revoke(b1.jti);
  await t.rejects(f.tokens.verify(b1.token), { code: 'ECONN_AUTH_TOKEN', message: /revoked/ });
  t.ok(await f.tokens.verify(b2.token), 'other token of the same device still valid');
  await f.registry.revoke('dev-a');
  await t.rejects(f.tokens.verify(a.token), { code: 'ECONN_DEVICE_REVOKED' });
  await t.rejects(f.tokens.issue('dev-a'), { code: 'ECONN_DEVICE_REVOKED' });
  await t.rejects(f.tokens.renew(a.token), { code: 'ECONN_DEVICE_REVOKED' });
});

t.test('renew: valid and expired-within-grace tokens renew; a renewed token retires the old one; refused after grace', async (t) => {
  const f = await fixture(t, 'identity: { jwt: { ttl_s: 600, clock_skew_s: 10, renew_grace_s: 300 } }');
  const first = await f.tokens.issue('dev-a');
  f.clock.now = T0 + 100_000;
  const second = await f.tokens.renew(first.token);
  t.equal(second.deviceId, 'dev-a');
  t.not(second.jti, first.jti);
  t.equal(second.expiresAt.getTime(), T0 + 100_000 + 600_000);
  // issue 9: the renewed token retires the old one (refused afterwards, also for another renewal)
  await t.rejects(f.tokens.verify(first.token), { code: 'ECONN_AUTH_TOKEN', message: /revoked/ }, 'old token refused after its renewal');
  await t.rejects(f.tokens.renew(first.token), { code: 'ECONN_AUTH_TOKEN', message: /revoked/ }, 'old token cannot be renewed twice');
  t.ok(await f.tokens.verify(second.token));
  f.clock.now = T0 + 600_000 + 11_000;
  await t.rejects(f.tokens.verify(first.token), { code: 'ECONN_AUTH_TOKEN' }, 'old token not extended');

  // second expired 200 s ago: inside the 300 s grace
  f.clock.now = T0 + 100_000 + 600_000 + 200_000;
  const third = await f.tokens.renew(second.token);
  t.ok(await f.tokens.verify(third.token));
  // two concurrent renewals of one token: exactly one succeeds
  const race = await Promise.allSettled([f.tokens.renew(third.token), f.tokens.renew(third.token)]);
  t.equal(race.filter((r) => r.status === 'fulfilled').length, 1, 'one concurrent renewal wins');
  // first expired 320 s + ago: grace (300) + skew (10) passed
  f.clock.now = T0 + 600_000 + 320_000;
  await t.rejects(f.tokens.renew(first.token), { code: 'ECONN_AUTH_TOKEN' });
  // a live, never-renewed token that expired 320 s ago: grace (300) + skew (10) passed
  const late = await f.tokens.issue('dev-a');
  f.clock.now += 600_000 + 320_000;
  await t.rejects(f.tokens.renew(late.token), { code: 'ECONN_AUTH_TOKEN', message: /grace/ });

  // renewal checks everything else: tampered, revoked jti, alg none
  const live = await f.tokens.issue('dev-a');
  const [h, , s] = live.token.split('.');
  const p = decodeJwt(live.token);
  await t.rejects(f.tokens.renew(`${h}.${base64url.encode(JSON.stringify({ ...p, sub: 'dev-b', device_id: 'dev-b' }))}.${s}`), { code: 'ECONN_AUTH_TOKEN' });
  await f.tokens.revoke(live.jti);
  await t.rejects(f.tokens.renew(live.token), { code: 'ECONN_AUTH_TOKEN', message: /revoked/ });
  await t.rejects(f.tokens.renew(unsigned({ alg: 'none', kid: f.signingKey().kid }, p, 'x')), { code: 'ECONN_AUTH_TOKEN' });
  await t.rejects(f.tokens.renew('garbage'), { code: 'ECONN_AUTH_TOKEN' });
});

t.test('key rotation: old tokens keep verifying until they expire, new tokens use the new kid', async (t) => {
  const f = await fixture(t, 'identity: { jwt: { ttl_s: 600, clock_skew_s: 10, renew_grace_s: 300 } }');
  const oldKid = f.signingKey().kid;
  const before = await f.tokens.issue('dev-a');
  const { kid } = await f.tokens.rotateKey();
  t.not(kid, oldKid);
  t.equal(f.signingKey().kid, kid, 'index on disk names the new key');
  const after = await f.tokens.issue('dev-a');
  t.equal(decodeProtectedHeader(after.token).kid, kid);
  t.equal(decodeProtectedHeader(before.token).kid, oldKid);
  t.ok(await f.tokens.verify(before.token), 'old token verifies');
  t.ok(await f.tokens.verify(after.token));
  const jwks = await f.tokens.publicJwks();
  t.same(
    jwks.keys.map((k) => k.kid),
    [kid, oldKid],
  );
  t.notOk(jwks.keys.some((k) => 'd' in k), 'no private parts in the JWKS');

  // a restart keeps both keys
  const again = new TokenService({ stateDir: f.stateDir, config: f.cfg.identity.jwt, registry: f.registry, logger, now: () => f.clock.now });
  await again.start();
  t.ok(await again.verify(before.token), 'old token verifies after restart');
  t.equal(decodeProtectedHeader((await again.issue('dev-a')).token).kid, kid);

  // renewal of an old-key token within grace still works and yields a new-key token
  f.clock.now = T0 + 700_000;
  const renewed = await f.tokens.renew(before.token);
  t.equal(decodeProtectedHeader(renewed.token).kid, kid);
  // after ttl + grace + skew the old key is gone
  f.clock.now = T0 + (600 + 300 + 10 + 1) * 1000;
  await t.rejects(f.tokens.renew(before.token), { code: 'ECONN_AUTH_TOKEN' });
  const forgedOld = await new SignJWT(decodeJwt(after.token))
    .setProtectedHeader({ alg: 'ES256', kid: oldKid })
    .sign(createPrivateKey(readFileSync(path.join(keysDir(f.stateDir), `jwt-${oldKid}.key`), 'utf8')));
  await t.rejects(f.tokens.verify(forgedOld), { code: 'ECONN_AUTH_TOKEN', message: /retired/ }, 'retired key no longer accepted');
});

t.test('EdDSA: issue, verify, and switching algorithm rotates the key', async (t) => {
  const f = await fixture(t, 'identity: { jwt: { algorithm: EdDSA } }');
  const { token } = await f.tokens.issue('dev-a');
  t.equal(decodeProtectedHeader(token).alg, 'EdDSA');
  t.ok(await f.tokens.verify(token));
  const es = new TokenService({ stateDir: f.stateDir, config: config(f.stateDir).identity.jwt, registry: f.registry, logger, now: () => f.clock.now });
  await es.start();
  const t2 = await es.issue('dev-a');
  t.equal(decodeProtectedHeader(t2.token).alg, 'ES256');
  t.ok(await es.verify(token), 'EdDSA token still verifies after the switch');
});
