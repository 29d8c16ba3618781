/**
 * The reference cloud's OAuth2 token endpoint (RFC 6749) and access token
 * verification.
 *
 * POST /oauth/token, application/x-www-form-urlencoded; grants
 * client_credentials, password and refresh_token; client authentication by HTTP
 * Basic (client_secret_basic) or client_id/client_secret form fields
 * (client_secret_post). Access tokens are short-lived HS256 JWTs signed with a
 * key kept in STORE_DIR/token.key (so they survive a restart of the cloud);
 * refresh tokens are opaque, single use (rotated) and kept in memory only.
 * Errors are RFC 6749 JSON {error, error_description}.
 *
 * Secrets are resolved on every use (a rotated secret file is picked up) and
 * compared in constant time; they never reach a log line.
 */
import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { SignJWT, jwtVerify } from 'jose';
import { resolveSecret } from '../core/secrets.js';
import { AuthenticationError } from '../core/errors.js';
import type { Logger } from '../core/logger.js';
import type { CloudConfig, Grant, Scope } from './config.js';

export const TOKEN_ISSUER = 'edge-connector-cloud';
const MAX_FORM_BYTES = 16 * 1024;

export interface VerifiedToken {
  /** Client id, or user name for the password grant. */
  sub: string;
  clientId: string;
  scopes: Scope[];
  /** Expiry, ms since the epoch. */
  expiresAt: number;
}

interface RefreshEntry {
  clientId: string;
  sub: string;
  scopes: Scope[];
  expiresAt: number;
}

class OAuthError extends Error {
  constructor(
    readonly status: number,
    readonly error: string,
    readonly description: string,
  ) {
    super(description);
  }
}

function secretEquals(a: string, b: string): boolean {
  // hash first: constant time whatever the lengths
  return timingSafeEqual(createHash('sha256').update(a).digest(), createHash('sha256').update(b).digest());
}

export class TokenService {
  private readonly refresh = new Map<string, RefreshEntry>();
  private readonly key: Uint8Array;

  constructor(
    private readonly cfg: Pick<CloudConfig, 'clients' | 'users' | 'token_ttl_s' | 'refresh_ttl_s'>,
    key: Uint8Array,
    private readonly log: Logger,
    private readonly now: () => number = Date.now,
  ) {
    this.key = key;
  }

  /** Issue an access token directly (tests, the CLI helpers). */
  async issue(clientId: string, sub: string, scopes: Scope[], ttlS = this.cfg.token_ttl_s): Promise<{ access_token: string; expires_in: number }> {
    const iat = Math.floor(this.now() / 1000);
    const token = await new SignJWT({ client_id: clientId, scope: scopes.join(' ') })
      .setProtectedHeader({ alg: 'HS256', typ: 'at+jwt' })
      .setIssuer(TOKEN_ISSUER)
      .setSubject(sub)
      .setIssuedAt(iat)
      .setExpirationTime(iat + ttlS)
      .setJti(randomBytes(12).toString('base64url'))
      .sign(this.key);
    return { access_token: token, expires_in: ttlS };
  }

  /** Verify an access token; throws AuthenticationError ECONN_AUTH_TOKEN (message names no secret). */
  async verify(token: string, needScope?: Scope): Promise<VerifiedToken> {
    let payload;
    try {
      ({ payload } = await jwtVerify(token, this.key, { issuer: TOKEN_ISSUER, algorithms: ['HS256'], currentDate: new Date(this.now()) }));
    } catch (err) {
      const code = (err as { code?: string }).code;
      throw new AuthenticationError('ECONN_AUTH_TOKEN', code === 'ERR_JWT_EXPIRED' ? 'access token expired' : 'access token invalid');
    }
    const clientId = typeof payload.client_id === 'string' ? payload.client_id : '';
    const client = this.cfg.clients.find((c) => c.id === clientId);
    if (!client || typeof payload.sub !== 'string' || typeof payload.exp !== 'number') throw new AuthenticationError('ECONN_AUTH_TOKEN', 'access token invalid (unknown client)');
    const scopes = (typeof payload.scope === 'string' ? payload.scope.split(' ') : []).filter((s): s is Scope => (client.scopes as string[]).includes(s));
    if (needScope && !scopes.includes(needScope)) throw new AuthenticationError('ECONN_NOT_AUTHORIZED', `access token lacks the "${needScope}" scope`);
    return { sub: payload.sub, clientId, scopes, expiresAt: payload.exp * 1000 };
  }

  /** The HTTP handler of POST /oauth/token. */
  async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const reply = (status: number, body: Record<string, unknown>, headers: Record<string, string> = {}): void => {
      const text = JSON.stringify(body);
      res.writeHead(status, { 'content-type': 'application/json', 'cache-control': 'no-store', pragma: 'no-cache', 'content-length': Buffer.byteLength(text), ...headers });
      res.end(text);
    };
    try {
      if (req.method !== 'POST') throw new OAuthError(405, 'invalid_request', 'use POST');
      const ct = (req.headers['content-type'] ?? '').split(';')[0]!.trim().toLowerCase();
      if (ct !== 'application/x-www-form-urlencoded') throw new OAuthError(400, 'invalid_request', 'Content-Type must be application/x-www-form-urlencoded');
      const form = new URLSearchParams(await readBody(req));
      for (const [k] of form) if (form.getAll(k).length > 1) throw new OAuthError(400, 'invalid_request', `parameter ${k} repeated`);
      const result = await this.grant(form, req.headers.authorization);
      reply(200, result);
    } catch (err) {
      if (err instanceof OAuthError) {
        this.log.info({ status: err.status, error: err.error }, 'token request refused');
        reply(err.status, { error: err.error, error_description: err.description }, err.status === 401 ? { 'www-authenticate': 'Basic realm="edge-connector-cloud"' } : {});
      } else {
        this.log.error({ err }, 'token endpoint failed');
        reply(500, { error: 'server_error', error_description: 'internal error' });
      }
    }
  }

  private authenticateClient(form: URLSearchParams, authorization: string | undefined): CloudConfig['clients'][number] {
    let id: string | undefined;
    let secret: string | undefined;
    if (authorization && /^basic /i.test(authorization)) {
      const decoded = Buffer.from(authorization.slice(6).trim(), 'base64').toString('utf8');
      const colon = decoded.indexOf(':');
      if (colon < 0) throw new OAuthError(401, 'invalid_client', 'malformed Basic credentials');
      try {
        id = decodeURIComponent(decoded.slice(0, colon).replace(/\+/g, ' '));
        secret = decodeURIComponent(decoded.slice(colon + 1).replace(/\+/g, ' '));
      } catch {
        throw new OAuthError(401, 'invalid_client', 'malformed Basic credentials');
      }
      if (form.has('client_secret')) throw new OAuthError(400, 'invalid_request', 'use one client authentication method');
    } else {
      id = form.get('client_id') ?? undefined;
      secret = form.get('client_secret') ?? undefined;
    }
    if (!id || secret === undefined) throw new OAuthError(401, 'invalid_client', 'client authentication required');
    const client = this.cfg.clients.find((c) => c.id === id);
    let expected: string | undefined;
    if (client) {
      try {
        expected = resolveSecret(client.secret);
      } catch (err) {
        this.log.error({ err, client: id }, 'client secret cannot be resolved');
      }
    }
    // compare even for an unknown client, so timing does not reveal which ids exist
    const ok = secretEquals(secret, expected ?? randomBytes(16).toString('hex')) && client !== undefined && expected !== undefined;
    if (!ok || !client) throw new OAuthError(401, 'invalid_client', 'client authentication failed');
    return client;
  }

  private scopesFor(requested: string | null, allowed: readonly Scope[]): Scope[] {
    if (requested === null || requested.trim() === '') return [...allowed];
    const want = requested.split(' ').filter(Boolean);
    for (const s of want) if (!(allowed as string[]).includes(s)) throw new OAuthError(400, 'invalid_scope', `scope "${s.slice(0, 40)}" not allowed`);
    return want as Scope[];
  }

  private async grant(form: URLSearchParams, authorization: string | undefined): Promise<Record<string, unknown>> {
    const grantType = form.get('grant_type');
    if (!grantType) throw new OAuthError(400, 'invalid_request', 'grant_type missing');
    if (!(['client_credentials', 'password', 'refresh_token'] as string[]).includes(grantType)) throw new OAuthError(400, 'unsupported_grant_type', 'grant_type not supported');
    const client = this.authenticateClient(form, authorization);
    if (!client.grants.includes(grantType as Grant)) throw new OAuthError(400, 'unauthorized_client', `client may not use ${grantType}`);
    let sub = client.id;
    let scopes: Scope[];
    if (grantType === 'client_credentials') {
      scopes = this.scopesFor(form.get('scope'), client.scopes);
    } else if (grantType === 'password') {
      const username = form.get('username');
      const password = form.get('password');
      if (!username || password === null) throw new OAuthError(400, 'invalid_request', 'username and password required');
      const user = this.cfg.users.find((u) => u.username === username);
      let expected: string | undefined;
      if (user) {
        try {
          expected = resolveSecret(user.password);
        } catch (err) {
          this.log.error({ err, user: username }, 'user password cannot be resolved');
        }
      }
      const ok = secretEquals(password, expected ?? randomBytes(16).toString('hex')) && user !== undefined && expected !== undefined;
      if (!ok || !user) throw new OAuthError(400, 'invalid_grant', 'resource owner credentials invalid');
      sub = user.username;
      scopes = this.scopesFor(form.get('scope'), user.scopes.filter((s) => client.scopes.includes(s)));
    } else {
      const rt = form.get('refresh_token');
      if (!rt) throw new OAuthError(400, 'invalid_request', 'refresh_token missing');
      const entry = this.refresh.get(rt);
      this.refresh.delete(rt); // single use, even when refused below
      if (!entry || entry.clientId !== client.id || entry.expiresAt <= this.now()) throw new OAuthError(400, 'invalid_grant', 'refresh token invalid or expired');
      sub = entry.sub;
      scopes = this.scopesFor(form.get('scope'), entry.scopes);
    }
    const { access_token, expires_in } = await this.issue(client.id, sub, scopes);
    const out: Record<string, unknown> = { access_token, token_type: 'Bearer', expires_in, scope: scopes.join(' ') };
    if (client.grants.includes('refresh_token')) {
      this.pruneRefresh();
      const refresh = randomBytes(32).toString('base64url');
      this.refresh.set(refresh, { clientId: client.id, sub, scopes, expiresAt: this.now() + this.cfg.refresh_ttl_s * 1000 });
      out.refresh_token = refresh;
    }
    this.log.info({ client: client.id, sub, grant: grantType, expires_in }, 'token issued');
    return out;
  }

  private pruneRefresh(): void {
    if (this.refresh.size < 10_000) return;
    const now = this.now();
    for (const [k, v] of this.refresh) if (v.expiresAt <= now) this.refresh.delete(k);
    // still too many: drop the oldest (insertion order)
    for (const k of this.refresh.keys()) {
      if (this.refresh.size < 10_000) break;
      this.refresh.delete(k);
    }
  }
}

function readBody(req: IncomingMessage): Promise<string> {
  return new Promise((resolve, reject) => {
    const parts: Buffer[] = [];
    let n = 0;
    req.on('data', (d: Buffer) => {
      n += d.length;
      if (n > MAX_FORM_BYTES) {
        // keep draining (so the 413 can be written) but stop collecting
        if (parts.length > 0) parts.length = 0;
        reject(new OAuthError(413, 'invalid_request', 'request body too large'));
        return;
      }
      parts.push(d);
    });
    req.on('end', () => resolve(Buffer.concat(parts).toString('utf8')));
    req.on('error', reject);
  });
}
