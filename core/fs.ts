/**
 * Durable file primitives: the one place that knows how to replace a small
 * file so that after a crash or power cut it holds either the old or the new
 * content, never a mix and never nothing (registry, PKI material, tokens,
 * journal identity, cloud store metadata, cloud TLS material).
 *
 * The recipe: write a temporary file in the same directory, fsync it, rename
 * it over the target (atomic on POSIX), then fsync the directory so the rename
 * itself survives a power cut.
 */
import { mkdirSync, openSync, writeSync, fsyncSync, closeSync, renameSync, unlinkSync, fchmodSync } from 'node:fs';
import { mkdir, open, rename, unlink, type FileHandle } from 'node:fs/promises';
import path from 'node:path';

function tmpName(file: string): string {
  return path.join(path.dirname(file), `.${path.basename(file)}.${process.pid}.tmp`);
}

/** Errors of filesystems that cannot fsync a directory at all (the rename is still atomic there). */
function unsupported(err: unknown): boolean {
  const code = (err as NodeJS.ErrnoException).code;
  return code === 'EINVAL' || code === 'ENOTSUP' || code === 'EOPNOTSUPP' || code === 'EISDIR';
}

/**
 * fsync a directory (makes creates, renames and unlinks inside it durable).
 * A filesystem that cannot fsync directories is tolerated; a real I/O error is thrown.
 */
export async function syncDir(dir: string): Promise<void> {
  const d = await open(dir, 'r');
  try {
    await d.sync();
  } catch (err) {
    if (!unsupported(err)) throw err;
  } finally {
    await d.close().catch(() => {});
  }
}

/** Synchronous syncDir, for start-up paths that are synchronous. */
function syncDirSync(dir: string): void {
  const fd = openSync(dir, 'r');
  try {
    fsyncSync(fd);
  } catch (err) {
    if (!unsupported(err)) throw err;
  } finally {
    closeSync(fd);
  }
}

/** Replace `file` atomically and durably with `data` (mode applied even when the file existed). */
export async function writeAtomic(file: string, data: string | Uint8Array, mode = 0o600): Promise<void> {
  const dir = path.dirname(file);
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const tmp = tmpName(file);
  const fh = await open(tmp, 'w', mode);
  try {
    await fh.writeFile(data);
    await fh.chmod(mode);
    await fh.sync();
  } finally {
    await fh.close();
  }
  try {
    await rename(tmp, file);
  } catch (err) {
    await unlink(tmp).catch(() => {});
    throw err;
  }
  await syncDir(dir);
}

/** Synchronous writeAtomic, same guarantees. */
export function writeAtomicSync(file: string, data: string | Uint8Array, mode = 0o600): void {
  const dir = path.dirname(file);
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const tmp = tmpName(file);
  const fd = openSync(tmp, 'w', mode);
  try {
    const buf = typeof data === 'string' ? Buffer.from(data, 'utf8') : data;
    let off = 0;
    while (off < buf.length) off += writeSync(fd, buf, off, buf.length - off);
    fchmodSync(fd, mode);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
  try {
    renameSync(tmp, file);
  } catch (err) {
    try {
      unlinkSync(tmp);
    } catch {}
    throw err;
  }
  syncDirSync(dir);
}

/** Write all of `buf` at explicit position `pos` (never at the file's current offset: issue 9 #3). */
export function pwriteAllSync(fd: number, buf: Buffer, pos: number): void {
  let off = 0;
  while (off < buf.length) {
    const n = writeSync(fd, buf, off, buf.length - off, pos + off);
    if (n <= 0) throw Object.assign(new Error('write returned 0 bytes'), { code: 'EIO' });
    off += n;
  }
}

/**
 * Read `length` bytes at explicit position `pos` of an open file into `target` at `targetOffset`,
 * as many reads as it takes; stops early only at the end of the file. Returns the bytes read, so
 * the caller says what a short file means for it.
 */
export async function preadFully(fh: FileHandle, target: Buffer, targetOffset: number, length: number, pos: number): Promise<number> {
  let got = 0;
  while (got < length) {
    const { bytesRead } = await fh.read(target, targetOffset + got, length - got, pos + got);
    if (bytesRead === 0) break;
    got += bytesRead;
  }
  return got;
}
