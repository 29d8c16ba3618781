/**
 * Import of a store written by the earlier reference cloud (one file per
 * message): `index.jsonl` (one JSON line per message) + `payloads/ID.bin`.
 *
 * The import streams index.jsonl (never read as one string) into segments
 * built in `segments.import/`, fsyncs them, renames that directory to
 * `segments/` (with a marker file), then renames index.jsonl to
 * index.jsonl.imported. A crash at any point leaves either the old store
 * (the import runs again) or the new one (the rename is finished). The old
 * payload files are left in place (payloads larger than 1 MiB are hard-linked
 * into blobs/ instead of copied); the operator deletes payloads/ and
 * index.jsonl.imported once satisfied.
 */
import { createReadStream, existsSync } from 'node:fs';
import { link, mkdir, open, readFile, readdir, rename, rm, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { StorageError } from '../../core/errors.js';
import type { Logger } from '../../core/logger.js';
import { syncDir } from '../../core/fs.js';
import { encodeRecord, segmentName, type StoredEntry } from './format.js';

const MARKER = 'IMPORTED-FROM-INDEX-JSONL';
const INLINE_MAX = 1024 * 1024;
const SEGMENT_BYTES = 64 * 1024 * 1024;
const WRITE_BYTES = 4 * 1024 * 1024;

export async function importLegacyStore(dir: string, segDir: string, blobDir: string, log: Logger): Promise<void> {
  const index = path.join(dir, 'index.jsonl');
  if (!existsSync(index)) return;
  const segNames = existsSync(segDir) ? (await readdir(segDir)).filter((n) => n.endsWith('.seg') || n === MARKER) : [];
  if (segNames.includes(MARKER)) {
    // the import finished but the old index was not renamed yet
    await rename(index, `${index}.imported`);
    await syncDir(dir);
    return;
  }
  if (segNames.length > 0) {
    throw new StorageError(
      'ECONN_JOURNAL_CORRUPT',
      `cloud store ${dir} holds both the old format (index.jsonl) and the new one (segments/): move index.jsonl and payloads/ to another directory and start the cloud there once to import them, or remove them if segments/ already holds those messages`,
    );
  }
  const work = path.join(dir, 'segments.import');
  await rm(work, { recursive: true, force: true });
  await mkdir(work, { recursive: true, mode: 0o700 });
  const t0 = Date.now();
  let seq = 0;
  let fh: FileHandle | undefined;
  let segSize = 0;
  let pendingBufs: Buffer[] = [];
  let pendingBytes = 0;
  const flush = async (): Promise<void> => {
    if (!fh || pendingBufs.length === 0) return;
    const all = Buffer.concat(pendingBufs);
    let w = 0;
    while (w < all.length) w += (await fh.write(all, w, all.length - w, segSize - pendingBytes + w)).bytesWritten;
    pendingBufs = [];
    pendingBytes = 0;
  };
  const closeSegment = async (): Promise<void> => {
    if (!fh) return;
    await flush();
    await fh.datasync();
    await fh.close();
    fh = undefined;
  };
  const rl = createInterface({ input: createReadStream(index, 'utf8'), crlfDelay: Infinity });
  try {
    for await (const line of rl) {
      if (!line) continue;
      let old: StoredEntry & { payload_file?: string };
      try {
        old = JSON.parse(line) as StoredEntry & { payload_file?: string };
        if (typeof old.id !== 'string' || typeof old.payload_file !== 'string') throw new Error('not an entry');
      } catch {
        log.warn({ file: index, after_seq: seq }, 'cloud store import: torn or unreadable line in index.jsonl: the rest is ignored (the old store cut it off the same way)');
        break;
      }
      seq++;
      const entry: StoredEntry = { seq, id: old.id, gateway_id: old.gateway_id, device_id: old.device_id, topic: old.topic, qos: old.qos, size: old.size, sha256: old.sha256, received_at: old.received_at, stored_at: old.stored_at };
      if (old.content_type !== undefined) entry.content_type = old.content_type;
      const src = path.join(dir, old.payload_file);
      let payload: Buffer | undefined;
      if (old.size > INLINE_MAX) {
        const blob = path.join('blobs', `${seq}.bin`);
        await rm(path.join(dir, blob), { force: true });
        try {
          await link(src, path.join(dir, blob));
        } catch (err) {
          throw new StorageError('ECONN_JOURNAL_IO', `cloud store import: cannot link ${src} into blobs/ (${(err as Error).message}); restore the file or remove its line from index.jsonl`, { cause: err });
        }
        entry.payload_file = blob;
      } else {
        try {
          payload = await readFile(src);
        } catch (err) {
          throw new StorageError('ECONN_JOURNAL_IO', `cloud store import: payload of message ${old.id} (${src}) cannot be read (${(err as Error).message}); restore the file or remove its line from index.jsonl`, { cause: err });
        }
        if (payload.length !== old.size) throw new StorageError('ECONN_JOURNAL_CORRUPT', `cloud store import: ${src} holds ${payload.length} bytes, index.jsonl says ${old.size}`);
      }
      if (!fh || segSize >= SEGMENT_BYTES) {
        await closeSegment();
        fh = await open(path.join(work, segmentName(seq)), 'w', 0o600);
        segSize = 0;
      }
      const r = encodeRecord(entry, payload);
      pendingBufs.push(r);
      pendingBytes += r.length;
      segSize += r.length;
      if (pendingBytes >= WRITE_BYTES) await flush();
    }
    await closeSegment();
  } finally {
    rl.close();
    await fh?.close().catch(() => undefined);
  }
  if (seq > 0) await syncDir(blobDir);
  const marker = await open(path.join(work, MARKER), 'w', 0o600);
  await marker.close();
  await syncDir(work);
  await rm(segDir, { recursive: true, force: true }); // empty (checked above)
  await rename(work, segDir);
  await syncDir(dir);
  await rename(index, `${index}.imported`);
  await syncDir(dir);
  log.warn({ dir, messages: seq, ms: Date.now() - t0 }, 'cloud store: imported a store of the old format (index.jsonl + payloads/); index.jsonl.imported and payloads/ are kept — delete them once you have checked the import');
}
