/**
 * Device registry: one lowdb JSON document in `<state_dir>/registry.json`.
 *
 * - Writes are atomic and durable: a temp file is written, fsynced and renamed
 *   over the old one, then the directory is fsynced (our lowdb adapter; lowdb's
 *   own steno writer renames but never fsyncs). The file is mode 0600.
 * - A corrupt file (not JSON, or JSON of the wrong shape) stops start() with
 *   StorageError ECONN_REGISTRY_CORRUPT. It is never replaced or "repaired":
 *   the operator restores a backup or moves it away.
 * - Revoked certificate serials and token ids are indexed in memory so the
 *   broker's per-connection checks are O(1).
 * - A revoked device id comes back only by an operator's explicit action
 *   (`create(id, meta, { reinstate: true })`, the CLI's `connector device add ID
 *   --reinstate`); a registration through the API or a plain `device add` is
 *   refused with ECONN_DEVICE_EXISTS. On reinstatement its revoked certificates
 *   and tokens stay in the record (and stay revoked), so it never revives an old
 *   credential.
 */
import { EventEmitter } from 'node:events';
import { readFile, open, stat, unlink, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { Low, type Adapter } from 'lowdb';
import type { Logger } from '../core/logger.js';
import { writeAtomic, syncDir } from '../core/fs.js';
import type { Component } from '../core/component.js';
import { ConnectorError, StorageError } from '../core/errors.js';

/** A device id is safe as one MQTT topic level and as a file name: no '/', '+', '#', '$'. */
export const DEVICE_ID_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;

/** Canonical certificate serial: lowercase hex, no colons or spaces, no leading zeros ("0" for zero). */
export function normalizeSerial(hexOrColonHex: string): string {
  const hex = hexOrColonHex.replace(/[:\s]/g, '').toLowerCase().replace(/^0x/, '');
  const stripped = hex.replace(/^0+/, '');
  return stripped === '' ? '0' : stripped;
}

export type DeviceStatus = 'active' | 'revoked';
export interface DeviceMetadata {
  url?: string;
  description?: string;
  capabilities?: string[];
  group?: string;
}
export interface DeviceCertificate {
  serial: string;
  fingerprint256: string;
  not_after: string;
  revoked: boolean;
}
export interface DeviceToken {
  jti: string;
  exp: number;
  revoked: boolean;
}
export interface DeviceRecord {
  id: string;
  status: DeviceStatus;
  metadata: DeviceMetadata;
  certificates: DeviceCertificate[];
  tokens: DeviceToken[];
  created_at: string;
  last_seen_at: string | null;
  revoked_at?: string;
  /** Set when an operator brought a revoked id back (create with reinstate). */
  reinstated_at?: string;
}

/** Stored enrollment token (only its SHA-256 is kept). Used by identity/enrollment.ts. */
export interface StoredEnrollment {
  hash: string;
  created_at: string;
  expires_at: string;
  uses_left: number;
  uses: number;
}

export interface RegistryData {
  version: 1;
  devices: Record<string, DeviceRecord>;
  enrollments: StoredEnrollment[];
  /**
   * Which change log belongs to this file: `<file>.wal` is replayed over it only
   * when its first line names this generation (absent: 0). Raised by every full write.
   */
  wal_generation?: number;
}

const MAX_METADATA_STRING = 2048;
const MAX_CAPABILITIES = 64;
/** Token entries are kept this long after their exp (longer than the largest renew_grace_s), then pruned. */
const TOKEN_RETENTION_S = 31 * 86400;
const TOUCH_FLUSH_MS = 5000;
/**
 * Below this size the whole file is rewritten on every commit (cheap, and no
 * second file). Above it, commits append to the change log and the file is
 * rewritten only once the log has grown as large as the file.
 */
const WAL_MIN_FILE_BYTES = 64 * 1024;

function isObj(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** Validate device metadata from an untrusted source (API body, admin params). Throws ECONN_BAD_REQUEST. */
export function validateMetadata(input: unknown): DeviceMetadata {
  if (input === undefined || input === null) return {};
  if (!isObj(input)) throw new ConnectorError('ECONN_BAD_REQUEST', 'metadata must be an object with url, description, capabilities, group');
  const out: DeviceMetadata = {};
  for (const [k, v] of Object.entries(input)) {
    switch (k) {
      case 'url':
      case 'description':
      case 'group':
        if (typeof v !== 'string' || v.length > MAX_METADATA_STRING) {
          throw new ConnectorError('ECONN_BAD_REQUEST', `metadata.${k} must be a string of at most ${MAX_METADATA_STRING} characters`);
        }
        if (k === 'group' && !/^[A-Za-z0-9_.-]+$/.test(v)) {
          throw new ConnectorError('ECONN_BAD_REQUEST', 'metadata.group may contain only letters, digits, "_", "." and "-"');
        }
        out[k] = v;
        break;
      case 'capabilities':
        if (!Array.isArray(v) || v.length > MAX_CAPABILITIES || !v.every((c) => typeof c === 'string' && c.length <= 256)) {
          throw new ConnectorError('ECONN_BAD_REQUEST', `metadata.capabilities must be a list of at most ${MAX_CAPABILITIES} strings`);
        }
        out.capabilities = [...(v as string[])];
        break;
      default:
        throw new ConnectorError('ECONN_BAD_REQUEST', `metadata.${k} is not a known field (allowed: url, description, capabilities, group)`);
    }
  }
  return out;
}

export function assertDeviceId(id: unknown): asserts id is string {
  if (typeof id !== 'string' || !DEVICE_ID_RE.test(id)) {
    throw new ConnectorError(
      'ECONN_BAD_REQUEST',
      'device id must be 1-128 characters: letters, digits, ".", "_" and "-", starting with a letter or digit',
    );
  }
}

/**
 * lowdb adapter: read returns null when the file is missing and throws on bad
 * JSON (the registry turns that into ECONN_REGISTRY_CORRUPT); write is
 * tmp + fsync + rename + directory fsync, mode 0600, group-committed.
 *
 * Group commit: the file is the whole registry (pretty JSON, ~500 B per
 * device, so ~5 MB at 10 000 devices), and one durable write of it costs a
 * full rewrite plus two fsyncs. Writing it once per change capped
 * registration at ~40/s. Instead, changes made while a write is in flight
 * share the next one: every caller's promise resolves only after a write that
 * serialised the state *including its change* is durable (the state is
 * serialised when that write starts, after the change was applied), so the
 * guarantee per change is unchanged and at most one write is queued behind
 * the one in flight, however many changes arrive.
 */
export class AtomicJsonFile<T> implements Adapter<T> {
  private next: { data: T; waiters: Array<{ resolve: () => void; reject: (err: unknown) => void }> } | undefined;
  private writing = false;
  constructor(readonly file: string) {}

  async read(): Promise<T | null> {
    let text: string;
    try {
      text = await readFile(this.file, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
      throw err;
    }
    return JSON.parse(text) as T;
  }

  write(data: T): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      // lowdb hands over its live data object: the latest one holds every earlier change too
      if (this.next) this.next.data = data;
      else this.next = { data, waiters: [] };
      this.next.waiters.push({ resolve, reject });
      if (!this.writing) this.flush();
    });
  }

  private flush(): void {
    const batch = this.next;
    if (!batch) return;
    this.next = undefined;
    this.writing = true;
    let text: string;
    try {
      text = JSON.stringify(batch.data, null, 2) + '\n';
    } catch (err) {
      this.writing = false;
      for (const w of batch.waiters) w.reject(err);
      this.flush();
      return;
    }
    writeAtomic(this.file, text).then(
      () => this.settle(batch.waiters, undefined),
      (err: unknown) => this.settle(batch.waiters, err ?? new Error('registry write failed')),
    );
  }

  private settle(waiters: Array<{ resolve: () => void; reject: (err: unknown) => void }>, err: unknown): void {
    this.writing = false;
    for (const w of waiters) if (err === undefined) w.resolve(); else w.reject(err);
    this.flush();
  }
}


function checkShape(data: unknown): string | undefined {
  if (!isObj(data)) return 'the top level is not an object';
  if (data.version !== 1) return `unknown version ${JSON.stringify(data.version)}`;
  if (!isObj(data.devices)) return '"devices" is not an object';
  if (data.enrollments !== undefined && !Array.isArray(data.enrollments)) return '"enrollments" is not a list';
  for (const [id, r] of Object.entries(data.devices)) {
    if (!isObj(r)) return `device ${JSON.stringify(id)} is not an object`;
    if (r.id !== id) return `device ${JSON.stringify(id)} has a different id inside`;
    if (r.status !== 'active' && r.status !== 'revoked') return `device ${JSON.stringify(id)} has an invalid status`;
    if (!Array.isArray(r.certificates) || !Array.isArray(r.tokens) || !isObj(r.metadata)) {
      return `device ${JSON.stringify(id)} lacks certificates, tokens or metadata`;
    }
    for (const c of r.certificates as unknown[]) {
      if (!isObj(c) || typeof c.serial !== 'string' || typeof c.revoked !== 'boolean') return `device ${JSON.stringify(id)} has an invalid certificate entry`;
    }
    for (const tk of r.tokens as unknown[]) {
      if (!isObj(tk) || typeof tk.jti !== 'string' || typeof tk.exp !== 'number' || typeof tk.revoked !== 'boolean') {
        return `device ${JSON.stringify(id)} has an invalid token entry`;
      }
    }
  }
  return undefined;
}

async function fileSize(file: string): Promise<number> {
  try {
    return (await stat(file)).size;
  } catch {
    return 0;
  }
}

function clone<T>(v: T): T {
  return structuredClone(v);
}

export interface DeviceRegistryEvents {
  revoked: [deviceId: string];
  'token-revoked': [deviceId: string, jti: string];
  created: [deviceId: string];
}

export class DeviceRegistry extends EventEmitter implements Component {
  readonly name = 'registry';
  readonly file: string;
  private readonly log: Logger;
  private readonly now: () => number;
  private db: Low<RegistryData> | undefined;
  private started: Promise<void> | undefined;
  private revokedSerials = new Set<string>();
  /** every known serial -> device id */
  private serialOwner = new Map<string, string>();
  /** every known jti -> device id */
  private jtiOwner = new Map<string, string>();
  private revokedJtis = new Set<string>();
  private touchTimer: NodeJS.Timeout | undefined;
  private touchDirty = false;
  /** the change log next to the file: `<file>.wal` */
  readonly walFile: string;
  // group commit state: ids (and the enrollment list) changed since the last commit started
  private dirtyIds = new Set<string>();
  private enrollmentsDirty = false;
  private waiters: Array<{ resolve: () => void; reject: (err: unknown) => void }> = [];
  private writing = false;
  /** the next commit rewrites the whole file (start-up after a log replay, close, after a failed append) */
  private compactNext = false;
  private wal: FileHandle | undefined;
  private walBytes = 0;
  /** bytes of the last full write (or of the file loaded) */
  private fileBytes = 0;
  private generation = 0;

  constructor(opts: { file: string; logger: Logger; now?: () => number }) {
    super();
    this.file = opts.file;
    this.walFile = `${opts.file}.wal`;
    this.log = opts.logger.child({ component: 'registry' });
    this.now = opts.now ?? Date.now;
  }

  start(): Promise<void> {
    this.started ??= this.load();
    return this.started;
  }

  private async load(): Promise<void> {
    const db = new Low<RegistryData>(new AtomicJsonFile<RegistryData>(this.file), { version: 1, devices: {}, enrollments: [] });
    try {
      await db.read();
    } catch (err) {
      if (err instanceof SyntaxError) {
        throw new StorageError(
          'ECONN_REGISTRY_CORRUPT',
          `device registry ${this.file} is not valid JSON (${err.message}); it was left untouched: restore it from a backup or move it away to start with an empty registry`,
          { cause: err },
        );
      }
      throw new StorageError('ECONN_REGISTRY_CORRUPT', `device registry ${this.file} cannot be read (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`, {
        cause: err,
      });
    }
    let problem = checkShape(db.data);
    if (problem) {
      throw new StorageError(
        'ECONN_REGISTRY_CORRUPT',
        `device registry ${this.file} is corrupt: ${problem}; it was left untouched: restore it from a backup or move it away to start with an empty registry`,
      );
    }
    db.data.enrollments ??= [];
    const gen = db.data.wal_generation;
    this.generation = typeof gen === 'number' && Number.isSafeInteger(gen) && gen >= 0 ? gen : 0;
    this.fileBytes = await fileSize(this.file);
    const replayed = await this.replayWal(db.data);
    if (replayed > 0) {
      problem = checkShape(db.data);
      if (problem) {
        throw new StorageError(
          'ECONN_REGISTRY_CORRUPT',
          `device registry change log ${this.walFile} is corrupt: ${problem}; both files were left untouched: restore them from a backup or move them away`,
        );
      }
    }
    this.db = db;
    this.reindex();
    this.log.info({ file: this.file, devices: Object.keys(db.data.devices).length, replayed }, 'registry loaded');
    // a log that was there (replayed, torn or stale) is folded into the file now, so appends start clean
    if (this.compactNext) await this.persist();
  }

  /**
   * Apply `<file>.wal` over the loaded document. Its first line names the file
   * generation it continues; each further line is one change: a device's whole
   * record (`{"device":ID,"record":{…}|null}`) or the enrollment list
   * (`{"enrollments":[…]}`), newest last. A last line without its newline is a
   * write that never completed (never acknowledged): dropped. A log of another
   * generation is older than the file (the file was rewritten after it): ignored.
   * Returns how many changes were applied.
   */
  private async replayWal(data: RegistryData): Promise<number> {
    let text: string;
    try {
      text = await readFile(this.walFile, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return 0;
      throw new StorageError('ECONN_REGISTRY_CORRUPT', `device registry change log ${this.walFile} cannot be read (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`, {
        cause: err,
      });
    }
    this.compactNext = true;
    const lines = text.split('\n');
    lines.pop(); // '' after the last newline, or a torn last line
    const corrupt = (why: string): StorageError =>
      new StorageError('ECONN_REGISTRY_CORRUPT', `device registry change log ${this.walFile} is corrupt (${why}); both files were left untouched: restore them from a backup or move them away`);
    const parse = (line: string, n: number): Record<string, unknown> => {
      let v: unknown;
      try {
        v = JSON.parse(line);
      } catch {
        throw corrupt(`line ${n} is not JSON`);
      }
      if (!isObj(v)) throw corrupt(`line ${n} is not an object`);
      return v;
    };
    if (lines.length === 0) return 0;
    const head = parse(lines[0]!, 1);
    if (head.wal_generation !== this.generation) {
      this.log.warn({ file: this.walFile, log: head.wal_generation, registry: this.generation }, 'registry change log is of another generation than the registry file: ignored');
      return 0;
    }
    let applied = 0;
    for (let i = 1; i < lines.length; i++) {
      const e = parse(lines[i]!, i + 1);
      if (typeof e.device === 'string' && 'record' in e) {
        if (e.record === null) delete data.devices[e.device];
        else if (isObj(e.record)) data.devices[e.device] = e.record as unknown as DeviceRecord;
        else throw corrupt(`line ${i + 1}: record is not an object`);
      } else if (Array.isArray(e.enrollments)) {
        data.enrollments = e.enrollments as StoredEnrollment[];
      } else {
        throw corrupt(`line ${i + 1} is not a known change`);
      }
      applied++;
    }
    return applied;
  }

  private reindex(): void {
    this.revokedSerials.clear();
    this.serialOwner.clear();
    this.jtiOwner.clear();
    this.revokedJtis.clear();
    for (const r of Object.values(this.data().devices)) this.indexRecord(r);
  }

  private indexRecord(r: DeviceRecord): void {
    for (const c of r.certificates) {
      const s = normalizeSerial(c.serial);
      this.serialOwner.set(s, r.id);
      if (c.revoked || r.status === 'revoked') this.revokedSerials.add(s);
    }
    for (const tk of r.tokens) {
      this.jtiOwner.set(tk.jti, r.id);
      if (tk.revoked || r.status === 'revoked') this.revokedJtis.add(tk.jti);
    }
  }

  private data(): RegistryData {
    if (!this.db) throw new ConnectorError('ECONN_CLOSED', 'device registry is not started');
    return this.db.data;
  }

  /**
   * Make the changes to the given devices (and the enrollment list) durable.
   *
   * Group commit: changes made while a commit is in flight share the next one,
   * and every caller resolves only after a commit that holds its change is on
   * disk (what a commit holds is taken when it starts, after the change).
   * A commit is either one append of the changed records to `<file>.wal` and
   * one fdatasync — its cost does not grow with the registry — or, when the
   * file is small or the log has grown as large as the file, a full atomic
   * rewrite of the file (tmp + fsync + rename + directory fsync) with a new
   * generation, after which the log is deleted. The file stays lowdb's
   * human-readable JSON; at most a file's worth of recent changes live only
   * in the log, which close() and the next start() fold back in.
   */
  private async persist(ids: readonly string[] = [], enrollments = false): Promise<void> {
    if (!this.db) throw new ConnectorError('ECONN_CLOSED', 'device registry is not started');
    for (const id of ids) this.dirtyIds.add(id);
    if (enrollments) this.enrollmentsDirty = true;
    try {
      await new Promise<void>((resolve, reject) => {
        this.waiters.push({ resolve, reject });
        this.flush();
      });
    } catch (err) {
      this.log.error({ err, file: this.file }, 'registry write failed');
      throw new StorageError('ECONN_STATE_DIR', `device registry ${this.file} could not be written (${(err as NodeJS.ErrnoException).code ?? 'error'}); check free space and permissions of the state directory`, { cause: err });
    }
  }

  private flush(): void {
    if (this.writing || this.waiters.length === 0) return;
    const data = this.data();
    const waiters = this.waiters;
    const ids = this.dirtyIds;
    const enrollments = this.enrollmentsDirty;
    this.waiters = [];
    this.dirtyIds = new Set();
    this.enrollmentsDirty = false;
    this.touchDirty = false;
    let job: () => Promise<void>;
    try {
      let lines = '';
      for (const id of ids) lines += JSON.stringify({ device: id, record: Object.hasOwn(data.devices, id) ? data.devices[id] : null }) + '\n';
      if (enrollments) lines += JSON.stringify({ enrollments: data.enrollments }) + '\n';
      const bytes = Buffer.byteLength(lines);
      if (this.compactNext || this.fileBytes < WAL_MIN_FILE_BYTES || this.walBytes + bytes > this.fileBytes) {
        // everything in memory, serialised now (so it holds every change of this batch)
        const generation = this.generation + 1;
        const text = JSON.stringify({ ...data, wal_generation: generation }, null, 2) + '\n';
        job = () => this.rewrite(text, generation);
      } else if (bytes > 0) {
        job = () => this.append(lines, bytes);
      } else {
        job = () => Promise.resolve();
      }
    } catch (err) {
      for (const w of waiters) w.reject(err);
      this.flush();
      return;
    }
    this.writing = true;
    job().then(
      () => this.settle(waiters, undefined),
      (err: unknown) => {
        // the changes are still in memory: the next commit rewrites the whole file
        this.compactNext = true;
        for (const id of ids) this.dirtyIds.add(id);
        if (enrollments) this.enrollmentsDirty = true;
        this.settle(waiters, err ?? new Error('registry write failed'));
      },
    );
  }

  private settle(waiters: Array<{ resolve: () => void; reject: (err: unknown) => void }>, err: unknown): void {
    this.writing = false;
    for (const w of waiters) if (err === undefined) w.resolve(); else w.reject(err);
    this.flush();
  }

  private async append(lines: string, bytes: number): Promise<void> {
    if (!this.wal) {
      const fh = await open(this.walFile, 'w', 0o600);
      try {
        const head = JSON.stringify({ wal_generation: this.generation }) + '\n';
        await fh.write(head);
        await fh.write(lines);
        await fh.datasync();
        await syncDir(path.dirname(this.walFile)); // the new log's name is durable too
      } catch (err) {
        await fh.close().catch(() => {});
        throw err;
      }
      this.wal = fh;
      this.walBytes = Buffer.byteLength(lines);
      return;
    }
    await this.wal.write(lines);
    await this.wal.datasync();
    this.walBytes += bytes;
  }

  private async rewrite(text: string, generation: number): Promise<void> {
    await writeAtomic(this.file, text);
    // from here the log (of the previous generation) is ignored by a start-up: remove it
    this.generation = generation;
    this.fileBytes = Buffer.byteLength(text);
    this.compactNext = false;
    this.walBytes = 0;
    const wal = this.wal;
    this.wal = undefined;
    if (wal) await wal.close().catch(() => {});
    try {
      await unlink(this.walFile);
      await syncDir(path.dirname(this.walFile));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') this.log.warn({ err, file: this.walFile }, 'stale registry change log could not be removed (it is ignored)');
    }
  }

  private record(id: string): DeviceRecord {
    const r = Object.hasOwn(this.data().devices, id) ? this.data().devices[id] : undefined;
    if (!r) throw new ConnectorError('ECONN_DEVICE_UNKNOWN', `device "${id}" is not registered`);
    return r;
  }

  async close(): Promise<void> {
    if (this.touchTimer) clearTimeout(this.touchTimer);
    this.touchTimer = undefined;
    if (this.db && (this.touchDirty || this.wal)) {
      // last_seen values, and the change log folded back into the file so it alone is the registry
      this.compactNext = true;
      try {
        await this.persist();
      } catch {
        // logged in persist; last_seen is best effort, and a log left behind is replayed by the next start
      }
    }
    const wal = this.wal;
    this.wal = undefined;
    if (wal) await wal.close().catch(() => {});
  }

  status(): Record<string, unknown> {
    if (!this.db) return { started: false };
    const devices = Object.values(this.db.data.devices);
    return { devices: devices.length, active: devices.filter((d) => d.status === 'active').length };
  }

  get(id: string): DeviceRecord | undefined {
    const devices = this.data().devices;
    return Object.hasOwn(devices, id) ? clone(devices[id]) : undefined;
  }

  list(): DeviceRecord[] {
    return Object.values(this.data().devices)
      .map(clone)
      .sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
  }

  isActive(id: string): boolean {
    const devices = this.data().devices;
    return Object.hasOwn(devices, id) && devices[id]!.status === 'active';
  }

  /**
   * Register a device. An active id is refused (ECONN_DEVICE_EXISTS); so is a revoked id
   * unless `reinstate` is set (an operator's explicit action: revocation is never undone
   * by a device or an enrollment token).
   */
  async create(id: string, metadata: DeviceMetadata, opts: { reinstate?: boolean } = {}): Promise<DeviceRecord> {
    assertDeviceId(id);
    const meta = validateMetadata(metadata);
    const devices = this.data().devices;
    const existing = Object.hasOwn(devices, id) ? devices[id] : undefined;
    this.assertCreatable(id, opts);
    const nowIso = new Date(this.now()).toISOString();
    const rec: DeviceRecord = {
      id,
      status: 'active',
      metadata: meta,
      // a re-registration keeps the old, revoked credentials so they stay refused
      certificates: existing ? existing.certificates.map((c) => ({ ...c, revoked: true })) : [],
      tokens: existing ? existing.tokens.map((tk) => ({ ...tk, revoked: true })) : [],
      created_at: nowIso,
      last_seen_at: null,
      ...(existing ? { reinstated_at: nowIso } : {}),
    };
    devices[id] = rec;
    this.indexRecord(rec);
    await this.persist([id]);
    this.log.info({ deviceId: id, reinstated: Boolean(existing) }, existing ? 'revoked device reinstated by the operator' : 'device registered');
    this.emit('created', id);
    return clone(rec);
  }

  /** Throws ECONN_DEVICE_EXISTS when create(id, …, opts) would be refused (check before spending anything). */
  assertCreatable(id: string, opts: { reinstate?: boolean } = {}): void {
    const devices = this.data().devices;
    const existing = Object.hasOwn(devices, id) ? devices[id] : undefined;
    if (existing?.status === 'active') {
      throw new ConnectorError('ECONN_DEVICE_EXISTS', `device "${id}" is already registered; revoke it first to register it again`);
    }
    if (existing && !opts.reinstate) {
      throw new ConnectorError(
        'ECONN_DEVICE_EXISTS',
        `device "${id}" was revoked; only an operator can bring it back ("connector device add ${id} --reinstate")`,
      );
    }
  }

  /**
   * Remove a record that a failed registration created a moment ago, before any
   * credential of it was handed out (so the id stays free instead of revoked).
   * Refuses a record that existed before (has a revoked_at or revoked credentials).
   */
  async discard(id: string): Promise<void> {
    const devices = this.data().devices;
    const r = Object.hasOwn(devices, id) ? devices[id] : undefined;
    if (!r) return;
    if (r.revoked_at !== undefined || r.reinstated_at !== undefined || r.certificates.some((c) => c.revoked) || r.tokens.some((tk) => tk.revoked)) {
      throw new ConnectorError('ECONN_INTERNAL', `device "${id}" has a history and cannot be discarded`);
    }
    delete devices[id];
    for (const c of r.certificates) this.serialOwner.delete(normalizeSerial(c.serial));
    for (const tk of r.tokens) this.jtiOwner.delete(tk.jti);
    await this.persist([id]);
    this.log.info({ deviceId: id }, 'half-registered device discarded');
  }

  async updateMetadata(id: string, metadata: DeviceMetadata): Promise<DeviceRecord> {
    const r = this.record(id);
    r.metadata = validateMetadata(metadata);
    await this.persist([id]);
    return clone(r);
  }

  async revoke(id: string): Promise<DeviceRecord> {
    const r = this.record(id);
    const already = r.status === 'revoked';
    r.status = 'revoked';
    r.revoked_at ??= new Date(this.now()).toISOString();
    for (const c of r.certificates) c.revoked = true;
    for (const tk of r.tokens) tk.revoked = true;
    this.indexRecord(r);
    await this.persist([id]);
    if (!already) this.log.info({ deviceId: id }, 'device revoked');
    // emitted even when already revoked: listeners drop any session that slipped in
    this.emit('revoked', id);
    return clone(r);
  }

  async addCertificate(id: string, cert: Omit<DeviceCertificate, 'revoked'>): Promise<void> {
    const r = this.record(id);
    if (r.status !== 'active') throw new ConnectorError('ECONN_DEVICE_REVOKED', `device "${id}" is revoked`);
    const serial = normalizeSerial(cert.serial);
    const owner = this.serialOwner.get(serial);
    if (owner !== undefined && owner !== id) {
      throw new ConnectorError('ECONN_PKI', `certificate serial ${serial} is already recorded for another device`);
    }
    if (r.certificates.some((c) => normalizeSerial(c.serial) === serial)) return;
    r.certificates.push({ serial, fingerprint256: cert.fingerprint256, not_after: cert.not_after, revoked: false });
    this.serialOwner.set(serial, id);
    await this.persist([id]);
  }

  /** Revoke one certificate of a device (the device stays active). */
  async revokeCertificate(serial: string): Promise<void> {
    const s = normalizeSerial(serial);
    const owner = this.serialOwner.get(s);
    if (owner === undefined) throw new ConnectorError('ECONN_NOT_FOUND', `no device certificate with serial ${s}`);
    const r = this.record(owner);
    for (const c of r.certificates) if (normalizeSerial(c.serial) === s) c.revoked = true;
    this.revokedSerials.add(s);
    await this.persist([owner]);
    this.emit('certificate-revoked', owner, s);
  }

  async addToken(id: string, t: { jti: string; exp: number }): Promise<void> {
    const r = this.record(id);
    if (r.status !== 'active') throw new ConnectorError('ECONN_DEVICE_REVOKED', `device "${id}" is revoked`);
    const nowS = Math.floor(this.now() / 1000);
    // prune entries long past their expiry (a revoked one can no longer verify either: exp is checked)
    const keep = r.tokens.filter((tk) => tk.exp + TOKEN_RETENTION_S > nowS);
    for (const tk of r.tokens) {
      if (!keep.includes(tk)) {
        this.jtiOwner.delete(tk.jti);
        this.revokedJtis.delete(tk.jti);
      }
    }
    r.tokens = keep;
    if (!r.tokens.some((tk) => tk.jti === t.jti)) r.tokens.push({ jti: t.jti, exp: t.exp, revoked: false });
    this.jtiOwner.set(t.jti, id);
    await this.persist([id]);
  }

  async revokeToken(jti: string): Promise<void> {
    const owner = this.jtiOwner.get(jti);
    if (owner === undefined) throw new ConnectorError('ECONN_NOT_FOUND', 'no token with this id is recorded');
    const r = this.record(owner);
    for (const tk of r.tokens) if (tk.jti === jti) tk.revoked = true;
    this.revokedJtis.add(jti);
    await this.persist([owner]);
    this.emit('token-revoked', owner, jti);
  }

  isSerialRevoked(serial: string): boolean {
    return this.revokedSerials.has(normalizeSerial(serial));
  }

  /** The device a certificate serial was issued to (any format), if it was recorded. */
  deviceForSerial(serial: string): string | undefined {
    return this.serialOwner.get(normalizeSerial(serial));
  }

  /** Every revoked serial (normalised), e.g. to write a CRL. */
  revokedSerialList(): string[] {
    return [...this.revokedSerials].sort();
  }

  /**
   * Retire a token that was replaced by a renewal: refused from now on like a revoked
   * one, but without the 'token-revoked' event, so an MQTT session already
   * authenticated with it is not cut (it ends at the token's own expiry).
   * Synchronous in memory before the write, so a concurrent second renewal of the
   * same token is refused.
   */
  async retireToken(jti: string): Promise<void> {
    this.revokedJtis.add(jti);
    const owner = this.jtiOwner.get(jti);
    if (owner === undefined) return; // not recorded (older than the retention): refused in memory, nothing to write
    const r = this.record(owner);
    for (const tk of r.tokens) if (tk.jti === jti) tk.revoked = true;
    await this.persist([owner]);
  }

  isTokenRevoked(jti: string): boolean {
    return this.revokedJtis.has(jti);
  }

  /** The device a token id was issued to, if recorded. */
  deviceForToken(jti: string): string | undefined {
    return this.jtiOwner.get(jti);
  }

  touch(id: string): void {
    const devices = this.db?.data.devices;
    if (!devices || !Object.hasOwn(devices, id)) return;
    devices[id]!.last_seen_at = new Date(this.now()).toISOString();
    this.dirtyIds.add(id);
    this.touchDirty = true;
    if (this.touchTimer) return;
    this.touchTimer = setTimeout(() => {
      this.touchTimer = undefined;
      if (this.touchDirty) this.persist().catch(() => {});
    }, TOUCH_FLUSH_MS);
    this.touchTimer.unref();
  }

  // ---- enrollment storage (used by identity/enrollment.ts) ----

  /** Run a synchronous mutation of the enrollment list and persist it. The mutation is atomic (no await inside). */
  async mutateEnrollments<R>(fn: (list: StoredEnrollment[]) => { list: StoredEnrollment[]; result: R }): Promise<R> {
    const data = this.data();
    const { list, result } = fn(data.enrollments);
    if (list === data.enrollments) return result; // unchanged: no write (an unknown token costs no disk I/O)
    data.enrollments = list;
    await this.persist([], true);
    return result;
  }
}
