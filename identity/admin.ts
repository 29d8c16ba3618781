/**
 * Admin socket methods for device identity (the `connector device …` and
 * `connector enroll …` CLI talks to these):
 *
 *   device.add    {id, metadata?, key_type?, reinstate?}  -> {id, key, cert, ca, token, expires_at, serial}
 *                 (reinstate: true brings a revoked id back; without it a revoked id is refused)
 *   device.list   {}                          -> DeviceRecord[]
 *   device.show   {id}                        -> DeviceRecord
 *   device.revoke {id}                        -> DeviceRecord
 *   device.token  {id}                        -> {id, token, jti, expires_at}
 *   enroll.create {ttl_s?, uses?}             -> {token, expires_at, uses}
 *   token.rotate-key {}                       -> {kid}
 *
 * Params come from a local, authorised client but are still validated.
 */
import type { AdminRegistry } from '../core/component.js';
import { ConnectorError } from '../core/errors.js';
import type { Logger } from '../core/logger.js';
import { assertDeviceId, validateMetadata, type DeviceRecord, type DeviceRegistry } from './registry.js';
import type { LocalPki } from './pki.js';
import type { TokenService } from './tokens.js';
import type { EnrollmentStore } from './enrollment.js';

export interface Identity {
  registry: DeviceRegistry;
  pki: LocalPki;
  tokens: TokenService;
  enrollment: EnrollmentStore;
}

export interface DeviceBundle {
  id: string;
  key: string;
  cert: string;
  ca: string;
  token: string;
  expires_at: string;
  serial: string;
}

function idParam(params: Record<string, unknown>): string {
  assertDeviceId(params.id);
  return params.id;
}

function optionalInt(params: Record<string, unknown>, name: string): number | undefined {
  const v = params[name];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'number' || !Number.isInteger(v)) throw new ConnectorError('ECONN_BAD_REQUEST', `${name} must be a whole number`);
  return v;
}

/** Create a device with a generated key + certificate bundle and a token (operator path). */
export async function addDevice(identity: Identity, id: string, metadata: unknown, keyType: unknown, reinstate: unknown = false): Promise<DeviceBundle> {
  assertDeviceId(id);
  const meta = validateMetadata(metadata);
  const kt = keyType === undefined || keyType === null ? 'ec' : keyType;
  if (kt !== 'ec' && kt !== 'rsa') throw new ConnectorError('ECONN_BAD_REQUEST', 'key_type must be "ec" or "rsa"');
  if (reinstate !== undefined && reinstate !== null && typeof reinstate !== 'boolean') throw new ConnectorError('ECONN_BAD_REQUEST', 'reinstate must be true or false');
  const { registry, pki, tokens } = identity;
  const wasRevoked = registry.get(id)?.status === 'revoked';
  await registry.create(id, meta, { reinstate: reinstate === true });
  try {
    const bundle = await pki.issueDeviceBundle(id, kt);
    await registry.addCertificate(id, { serial: bundle.serial, fingerprint256: bundle.fingerprint256, not_after: bundle.notAfter.toISOString() });
    const tok = await tokens.issue(id);
    return { id, key: bundle.key, cert: bundle.cert, ca: pki.deviceCaBundlePem(), token: tok.token, expires_at: tok.expiresAt.toISOString(), serial: bundle.serial };
  } catch (err) {
    // do not leave a half-provisioned device behind: a new id is freed again, a reinstated one goes back to revoked
    await (wasRevoked ? registry.revoke(id) : registry.discard(id)).catch(() => {});
    throw err;
  }
}

export function registerIdentityAdmin(
  admin: AdminRegistry,
  identity: Identity,
  logger: Logger,
  opts: { enrollmentDefaultTtlS: () => number } = { enrollmentDefaultTtlS: () => 86400 },
): void {
  const log = logger.child({ component: 'identity-admin' });
  const { registry, tokens, enrollment } = identity;

  const show = (id: string): DeviceRecord => {
    const rec = registry.get(id);
    if (!rec) throw new ConnectorError('ECONN_DEVICE_UNKNOWN', `device "${id}" is not registered (see "connector device list")`);
    return rec;
  };

  admin.register('device.add', async (params) => {
    const bundle = await addDevice(identity, idParam(params), params.metadata, params.key_type, params.reinstate);
    log.info({ deviceId: bundle.id, serial: bundle.serial, reinstated: params.reinstate === true }, 'device added by the operator');
    return bundle;
  });

  admin.register('device.list', () => registry.list());

  admin.register('device.show', (params) => show(idParam(params)));

  admin.register('device.revoke', async (params) => {
    const id = idParam(params);
    show(id);
    return registry.revoke(id);
  });

  admin.register('device.token', async (params) => {
    const id = idParam(params);
    show(id);
    const t = await tokens.issue(id);
    return { id, token: t.token, jti: t.jti, expires_at: t.expiresAt.toISOString() };
  });

  admin.register('enroll.create', async (params) => {
    const ttlS = optionalInt(params, 'ttl_s') ?? opts.enrollmentDefaultTtlS();
    const uses = optionalInt(params, 'uses') ?? 1;
    const e = await enrollment.create({ ttlS, uses });
    return { token: e.token, expires_at: e.expiresAt.toISOString(), uses: e.uses };
  });

  admin.register('token.rotate-key', async () => tokens.rotateKey());
}
