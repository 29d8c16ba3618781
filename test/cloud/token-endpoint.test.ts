import t from 'tap';
import { decodeJwt } from 'jose';
import { startCloud, tokenRequest, httpsRequest, SECRET, USER_PASSWORD } from './helpers.js';

t.test('OAuth2 token endpoint (RFC 6749)', async (t) => {
  const c = await startCloud(t, { token_ttl_s: 120 });

  t.test('client_credentials with Basic and with form fields', async (t) => {
    const basic = await tokenRequest(c, { grant_type: 'client_credentials' }, ['gw-client', SECRET]);
    t.equal(basic.status, 200);
    t.equal(basic.json.token_type, 'Bearer');
    t.equal(basic.json.expires_in, 120);
    t.equal(basic.json.scope, 'ingest subscribe commands');
    t.type(basic.json.refresh_token, 'string');
    t.equal(basic.headers['cache-control'], 'no-store');
    const claims = decodeJwt(basic.json.access_token as string);
    t.equal(claims.sub, 'gw-client');
    t.equal(claims.client_id, 'gw-client');
    t.ok(claims.exp! - claims.iat! === 120);
    const post = await tokenRequest(c, { grant_type: 'client_credentials', client_id: 'gw-client', client_secret: SECRET, scope: 'ingest' });
    t.equal(post.status, 200);
    t.equal(post.json.scope, 'ingest');
    const v = await c.server.tokenService.verify(post.json.access_token as string, 'ingest');
    t.same(v.scopes, ['ingest']);
    await t.rejects(c.server.tokenService.verify(post.json.access_token as string, 'subscribe'), { code: 'ECONN_NOT_AUTHORIZED' });
    const noRefresh = await tokenRequest(c, { grant_type: 'client_credentials' }, ['cc-only', SECRET]);
    t.equal(noRefresh.status, 200);
    t.equal(noRefresh.json.refresh_token, undefined, 'no refresh token for a client without that grant');
  });

  t.test('bad client credentials → 401 invalid_client', async (t) => {
    for (const [name, r] of [
      ['wrong secret (Basic)', await tokenRequest(c, { grant_type: 'client_credentials' }, ['gw-client', 'wrong'])],
      ['wrong secret (form)', await tokenRequest(c, { grant_type: 'client_credentials', client_id: 'gw-client', client_secret: 'wrong' })],
      ['unknown client', await tokenRequest(c, { grant_type: 'client_credentials' }, ['nobody', SECRET])],
      ['no client authentication', await tokenRequest(c, { grant_type: 'client_credentials' })],
    ] as const) {
      t.equal(r.status, 401, `${name}: 401`);
      t.equal(r.json.error, 'invalid_client', `${name}: invalid_client`);
      t.type(r.json.error_description, 'string');
      t.match(String(r.headers['www-authenticate']), /^Basic/);
      t.notMatch(JSON.stringify(r.json), SECRET, 'no secret echoed');
    }
  });

  t.test('password grant', async (t) => {
    const ok = await tokenRequest(c, { grant_type: 'password', username: 'alice', password: USER_PASSWORD }, ['gw-client', SECRET]);
    t.equal(ok.status, 200);
    t.equal(decodeJwt(ok.json.access_token as string).sub, 'alice');
    t.equal(ok.json.scope, 'ingest', "the user's scopes");
    const bad = await tokenRequest(c, { grant_type: 'password', username: 'alice', password: 'nope' }, ['gw-client', SECRET]);
    t.same([bad.status, bad.json.error], [400, 'invalid_grant']);
    const unknown = await tokenRequest(c, { grant_type: 'password', username: 'bob', password: 'x' }, ['gw-client', SECRET]);
    t.same([unknown.status, unknown.json.error], [400, 'invalid_grant']);
    const missing = await tokenRequest(c, { grant_type: 'password', username: 'alice' }, ['gw-client', SECRET]);
    t.same([missing.status, missing.json.error], [400, 'invalid_request']);
    const notAllowed = await tokenRequest(c, { grant_type: 'password', username: 'alice', password: USER_PASSWORD }, ['cc-only', SECRET]);
    t.same([notAllowed.status, notAllowed.json.error], [400, 'unauthorized_client']);
  });

  t.test('refresh_token grant: rotated, single use, bound to the client', async (t) => {
    const first = await tokenRequest(c, { grant_type: 'client_credentials' }, ['gw-client', SECRET]);
    const rt = first.json.refresh_token as string;
    const r1 = await tokenRequest(c, { grant_type: 'refresh_token', refresh_token: rt }, ['gw-client', SECRET]);
    t.equal(r1.status, 200);
    t.type(r1.json.access_token, 'string');
    t.not(r1.json.refresh_token, rt, 'rotated');
    const again = await tokenRequest(c, { grant_type: 'refresh_token', refresh_token: rt }, ['gw-client', SECRET]);
    t.same([again.status, again.json.error], [400, 'invalid_grant'], 'single use');
    const other = await tokenRequest(c, { grant_type: 'refresh_token', refresh_token: r1.json.refresh_token as string }, ['cc-only', SECRET]);
    t.same([other.status, other.json.error], [400, 'unauthorized_client'], 'a client without the grant');
    const r2 = await tokenRequest(c, { grant_type: 'refresh_token', refresh_token: 'garbage' }, ['gw-client', SECRET]);
    t.same([r2.status, r2.json.error], [400, 'invalid_grant']);
  });

  t.test('malformed requests', async (t) => {
    const unsupported = await tokenRequest(c, { grant_type: 'authorization_code' }, ['gw-client', SECRET]);
    t.same([unsupported.status, unsupported.json.error], [400, 'unsupported_grant_type']);
    const noGrant = await tokenRequest(c, {}, ['gw-client', SECRET]);
    t.same([noGrant.status, noGrant.json.error], [400, 'invalid_request']);
    const scope = await tokenRequest(c, { grant_type: 'client_credentials', scope: 'admin' }, ['gw-client', SECRET]);
    t.same([scope.status, scope.json.error], [400, 'invalid_scope']);
    const json = await httpsRequest(c, 'POST', '/oauth/token', { 'content-type': 'application/json' }, '{"grant_type":"client_credentials"}');
    t.same([json.status, json.json.error], [400, 'invalid_request']);
    const get = await httpsRequest(c, 'GET', '/oauth/token', {});
    t.equal(get.status, 405);
    const dup = await httpsRequest(c, 'POST', '/oauth/token', { 'content-type': 'application/x-www-form-urlencoded' }, 'grant_type=client_credentials&grant_type=password');
    t.same([dup.status, dup.json.error], [400, 'invalid_request']);
    const big = await httpsRequest(c, 'POST', '/oauth/token', { 'content-type': 'application/x-www-form-urlencoded' }, 'x=' + 'a'.repeat(20_000));
    t.equal(big.status, 413);
    const health = await httpsRequest(c, 'GET', '/healthz', {});
    t.equal(health.status, 200, 'still serving');
  });

  t.test('verify refuses expired and foreign tokens', async (t) => {
    const expired = (await c.server.tokenService.issue('gw-client', 'gw-client', ['ingest'], -10)).access_token;
    await t.rejects(c.server.tokenService.verify(expired), { code: 'ECONN_AUTH_TOKEN', message: /expired/ });
    await t.rejects(c.server.tokenService.verify('a.b.c'), { code: 'ECONN_AUTH_TOKEN' });
  });
});
