/**
 * Enrollment tokens: random bearer secrets that let a device register itself
 * (POST /api/register). Each has an expiry and a number of uses (1 = one-time).
 * Only the SHA-256 of a token is stored — in the registry file (registry mode)
 * or in a JSON file of its own ({ file } mode) — so reading the state directory
 * does not reveal a usable token. consume() checks and decrements in one
 * synchronous step before persisting, so two concurrent requests with a
 * one-time token cannot both succeed. A use is given back (refund) when the
 * registration it paid for is refused afterwards: only a registration that
 * succeeds spends a use.
 */
import { createHash, randomBytes } from 'node:crypto';
import type { Logger } from '../core/logger.js';
import { ConnectorError, StorageError } from '../core/errors.js';
import { AtomicJsonFile, DeviceRegistry, type StoredEnrollment } from './registry.js';

export const ENROLLMENT_TOKEN_PREFIX = 'enr_';
const MAX_USES = 100000;
const MAX_TTL_S = 31536000;

export function hashEnrollmentToken(token: string): string {
  return createHash('sha256').update(token, 'utf8').digest('hex');
}

interface Storage {
  mutate<R>(fn: (list: StoredEnrollment[]) => { list: StoredEnrollment[]; result: R }): Promise<R>;
}

/** Standalone storage: a JSON file `{ "enrollments": [...] }`, atomic writes. */
class FileStorage implements Storage {
  private list: StoredEnrollment[] | undefined;
  private readonly file: AtomicJsonFile<{ enrollments: StoredEnrollment[] }>;
  private loading: Promise<StoredEnrollment[]> | undefined;
  constructor(readonly path: string) {
    this.file = new AtomicJsonFile(path);
  }
  private async load(): Promise<StoredEnrollment[]> {
    if (this.list) return this.list;
    this.loading ??= (async () => {
      try {
        const data = await this.file.read();
        if (data !== null && !Array.isArray(data.enrollments)) throw new Error('"enrollments" is not a list');
        return data?.enrollments ?? [];
      } catch (err) {
        this.loading = undefined;
        throw new StorageError('ECONN_REGISTRY_CORRUPT', `enrollment file ${this.path} is corrupt (${(err as Error).message}); it was left untouched`, { cause: err });
      }
    })();
    this.list = await this.loading;
    return this.list;
  }
  async mutate<R>(fn: (list: StoredEnrollment[]) => { list: StoredEnrollment[]; result: R }): Promise<R> {
    const current = await this.load();
    const { list, result } = fn(current);
    if (list === current) return result;
    this.list = list;
    await this.file.write({ enrollments: list });
    return result;
  }
}

export class EnrollmentStore {
  private readonly storage: Storage;
  private readonly log: Logger;
  private readonly now: () => number;

  constructor(opts: { registry: DeviceRegistry | { file: string }; logger: Logger; now?: () => number }) {
    this.log = opts.logger.child({ component: 'enrollment' });
    this.now = opts.now ?? Date.now;
    const reg = opts.registry;
    this.storage = reg instanceof DeviceRegistry ? { mutate: (fn) => reg.mutateEnrollments(fn) } : new FileStorage(reg.file);
  }

  private prune(list: StoredEnrollment[]): StoredEnrollment[] {
    const now = this.now();
    return list.filter((e) => e.uses_left > 0 && Date.parse(e.expires_at) > now);
  }

  async create(opts: { ttlS: number; uses: number }): Promise<{ token: string; expiresAt: Date; uses: number }> {
    const { ttlS, uses } = opts;
    if (!Number.isInteger(ttlS) || ttlS < 1 || ttlS > MAX_TTL_S) {
      throw new ConnectorError('ECONN_BAD_REQUEST', `enrollment ttl must be a whole number of seconds between 1 and ${MAX_TTL_S}`);
    }
    if (!Number.isInteger(uses) || uses < 1 || uses > MAX_USES) {
      throw new ConnectorError('ECONN_BAD_REQUEST', `enrollment uses must be a whole number between 1 and ${MAX_USES}`);
    }
    const token = ENROLLMENT_TOKEN_PREFIX + randomBytes(32).toString('base64url');
    const now = this.now();
    const expiresAt = new Date(now + ttlS * 1000);
    const entry: StoredEnrollment = {
      hash: hashEnrollmentToken(token),
      created_at: new Date(now).toISOString(),
      expires_at: expiresAt.toISOString(),
      uses_left: uses,
      uses,
    };
    await this.storage.mutate((list) => ({ list: [...this.prune(list), entry], result: undefined }));
    this.log.info({ expires_at: entry.expires_at, uses, id: entry.hash.slice(0, 12) }, 'enrollment token created');
    return { token, expiresAt, uses };
  }

  /** Whether a token would currently be accepted, without using it (validate a request before consume()). */
  async check(token: string): Promise<boolean> {
    if (typeof token !== 'string' || token.length === 0 || token.length > 512) return false;
    const hash = hashEnrollmentToken(token);
    const now = this.now();
    return this.storage.mutate((list) => {
      const e = list.find((x) => x.hash === hash);
      return { list, result: Boolean(e && e.uses_left > 0 && Date.parse(e.expires_at) > now) };
    });
  }

  /** Give back one use of a token consumed by a registration that then failed (the entry comes back if it was pruned, unless expired). */
  private async refund(hash: string, entry: StoredEnrollment): Promise<void> {
    const now = this.now();
    if (Date.parse(entry.expires_at) <= now) return;
    await this.storage.mutate((list) => {
      const i = list.findIndex((e) => e.hash === hash);
      const next = list.slice();
      if (i >= 0) next[i] = { ...list[i]!, uses_left: Math.min(list[i]!.uses_left + 1, list[i]!.uses) };
      else next.push({ ...entry, uses_left: 1 });
      return { list: next, result: undefined };
    });
    this.log.info({ id: hash.slice(0, 12) }, 'enrollment token use given back (the registration was refused)');
  }

  /**
   * Use one use of a token. Returns a handle whose refund() gives the use back when
   * the registration it paid for fails afterwards (call it at most once).
   */
  async consume(token: string): Promise<{ refund(): Promise<void> }> {
    if (typeof token !== 'string' || token.length === 0 || token.length > 512) {
      throw new ConnectorError('ECONN_ENROLL_TOKEN', 'enrollment token missing or malformed');
    }
    const hash = hashEnrollmentToken(token);
    const now = this.now();
    let used: StoredEnrollment | undefined;
    const outcome = await this.storage.mutate((list) => {
      const i = list.findIndex((e) => e.hash === hash);
      const e = i >= 0 ? list[i] : undefined;
      if (!e) return { list, result: 'unknown' as const };
      if (Date.parse(e.expires_at) <= now) return { list: this.prune(list), result: 'expired' as const };
      if (e.uses_left <= 0) return { list: this.prune(list), result: 'used' as const };
      const next = list.slice();
      next[i] = { ...e, uses_left: e.uses_left - 1 };
      used = next[i];
      return { list: this.prune(next), result: 'ok' as const };
    });
    if (outcome !== 'ok' || !used) {
      this.log.info({ reason: outcome, id: hash.slice(0, 12) }, 'enrollment token refused');
      // expired and used-up tokens are pruned, so later attempts say "unknown": one message for all three
      throw new ConnectorError('ECONN_ENROLL_TOKEN', 'enrollment token is unknown, used up or expired; create a new one with "connector enroll create"');
    }
    this.log.info({ id: hash.slice(0, 12) }, 'enrollment token used');
    const entry = used;
    let refunded = false;
    return {
      refund: async () => {
        if (refunded) return;
        refunded = true;
        await this.refund(hash, entry);
      },
    };
  }
}
