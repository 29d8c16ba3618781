/**
 * Rotation admin methods that need the whole daemon, not just one component:
 *
 *   ca.rotate {}  a new device CA signs device certificates from now on; the previous one
 *                 stays trusted (identity/pki.ts LocalPki.rotateCa keeps it in pki/trusted/)
 *                 and keeps issuing the server certificate until ca.retire, so a fleet moves
 *                 over without an outage (devices get a bundle of both CAs meanwhile). Then
 *                 every component reloads its TLS context with the current config (no
 *                 re-read of the config file), so the broker and the API trust
 *                 certificates from both CAs for new handshakes; live sessions stay.
 *   ca.retire {}  finish the rotation: the server certificate is re-issued by the current CA
 *                 and the previous CAs are no longer trusted (LocalPki.retireCa); TLS
 *                 contexts reload the same way. Result: { serial, retired, trusted, reloaded }.
 *
 * The server certificate is renewed by LocalPki itself (at start, every 12 h, and on
 * reload when identity.pki.server_names / server_cert_renew_before_days change),
 * which emits 'server-cert' to the broker and the API. The JWT signing key rotates
 * with the admin method token.rotate-key (identity/admin.ts).
 */
import { X509Certificate } from 'node:crypto';
import type { AdminServer } from './admin.js';
import type { Logger } from '../core/logger.js';
import { normalizeSerial } from '../identity/registry.js';

/** What ca.rotate needs of identity/pki.ts LocalPki. */
export interface CaRotator {
  rotateCa(serverName?: string): Promise<{ serial: string }>;
  retireCa(): Promise<{ serial: string; retired: string[] }>;
  caCertificatePem(): string;
  trustedDeviceCaPems(): string[];
}

export interface CaRotateResult {
  serial: string;
  not_after: string;
  /** Every CA trusted for device certificates after the rotation (current first). */
  trusted: { serial: string; not_after: string; subject: string }[];
  reloaded: string[];
}

export interface CaRetireResult {
  /** the current CA, now the only one (it also issues the server certificate) */
  serial: string;
  /** serials of the CAs no longer trusted (empty: no rotation was open) */
  retired: string[];
  trusted: { serial: string; not_after: string; subject: string }[];
  reloaded: string[];
}

function describe(pem: string): { serial: string; not_after: string; subject: string } {
  const c = new X509Certificate(pem);
  return { serial: normalizeSerial(c.serialNumber), not_after: new Date(c.validTo).toISOString(), subject: c.subject.replace(/\n/g, ', ') };
}

export function registerRotation(
  admin: AdminServer,
  opts: { pki: CaRotator; serverName: () => string; reloadTls: () => Promise<string[]>; logger: Logger },
): void {
  const log = opts.logger.child({ component: 'rotation' });
  // one CA operation at a time (rotate or retire): a second request while one runs waits for it
  let busy: Promise<CaRotateResult> | undefined;
  let lock: Promise<unknown> = Promise.resolve();
  const exclusive = <T>(fn: () => Promise<T>): Promise<T> => {
    const run = lock.then(fn, fn);
    lock = run.catch(() => {});
    return run;
  };
  admin.register('ca.retire', () =>
    exclusive(async (): Promise<CaRetireResult> => {
      const { serial, retired } = await opts.pki.retireCa();
      const reloaded = retired.length ? await opts.reloadTls() : [];
      const trusted = opts.pki.trustedDeviceCaPems().map(describe);
      if (retired.length) log.info({ serial, retired, reloaded }, 'device CA rotation retired; only the current CA is trusted');
      return { serial, retired, trusted, reloaded };
    }),
  );
  admin.register('ca.rotate', () => {
    // one rotation at a time: a second request while one runs gets the same result
    busy ??= exclusive(async () => {
      try {
        const { serial } = await opts.pki.rotateCa(opts.serverName());
        const reloaded = await opts.reloadTls();
        const trusted = opts.pki.trustedDeviceCaPems().map(describe);
        const current = describe(opts.pki.caCertificatePem());
        log.info({ serial, trusted: trusted.map((t) => t.serial), reloaded }, 'device CA rotated; the previous CA stays trusted');
        return { serial, not_after: current.not_after, trusted, reloaded };
      } finally {
        busy = undefined;
      }
    });
    return busy;
  });
}
