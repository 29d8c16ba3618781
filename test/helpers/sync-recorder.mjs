/**
 * Records what the daemon made durable, for the power-cut case of the fault
 * suite (test/soak/power-cut.test.ts): loaded by test/helpers/daemon-hooks.mjs
 * with `--record-syncs DIR`, never part of dist/.
 *
 * Every fsync/fdatasync the process issues — fs.fsync, fs.fdatasync, their
 * Sync forms and FileHandle.sync/datasync — is wrapped: the file's size is
 * taken when the sync is CALLED (bytes written after that call are not covered
 * by it), and once the sync SUCCEEDS one line "KEY SIZE" is appended
 * synchronously to DIR/syncs.log (KEY = device:inode:birth time, so a reused
 * inode is a different file). Small files other than segments (≤ SNAPSHOT_MAX,
 * e.g. the ack log that is rewritten in place) also get their whole content at that moment
 * saved as DIR/KEY.snap, so in-place writes that were never synced can be
 * undone too. The record is written before the daemon's callback runs, i.e.
 * before any PUBACK that depends on the sync; a SIGKILL between the sync and
 * the record only makes the simulated power cut harsher, never kinder.
 */
import fs from 'node:fs';
import { syncBuiltinESMExports } from 'node:module';
import path from 'node:path';

/**
 * Files other than segments (seg-*.log, written append-only at explicit
 * positions, so their durable state is a length) are snapshotted whole at each
 * sync when at most this big: the ack log (512 KiB, rewritten in place),
 * journal.json, indexes. Bigger ones are treated as append-only.
 */
const SNAPSHOT_MAX = 1024 * 1024;
const appendOnly = (fd) => {
  try {
    return /^seg-\d+\.log$/.test(path.basename(fs.readlinkSync(`/proc/self/fd/${fd}`)));
  } catch {
    return false;
  }
};

export const fileKey = (st) => `${st.dev}:${st.ino}:${st.birthtimeNs}`;

/**
 * `latencyMs` > 0 plays a slow disk (an SD card's fsync takes tens of ms): an
 * asynchronous sync reports success that much later, so a SIGKILL more often
 * lands while written data is not yet durable — what the power cut then cuts.
 */
export async function recordSyncs(dir, latencyMs = 0) {
  const later = (fn) => (latencyMs > 0 ? setTimeout(fn, latencyMs) : fn());
  fs.mkdirSync(dir, { recursive: true });
  const logFd = fs.openSync(path.join(dir, 'syncs.log'), 'a');
  const { openSync, writeSync, closeSync, renameSync, fstatSync } = fs;

  /** What a sync of `fd` would make durable, taken before the sync is issued. */
  const capture = (fd) => {
    let st;
    try {
      st = fstatSync(fd, { bigint: true });
    } catch {
      return undefined;
    }
    if (!st.isFile()) return undefined;
    const size = Number(st.size);
    let snap;
    if (size <= SNAPSHOT_MAX && !appendOnly(fd)) {
      // through /proc: the daemon's fd may be write-only
      try {
        snap = fs.readFileSync(`/proc/self/fd/${fd}`).subarray(0, size);
      } catch {
        snap = undefined;
      }
    }
    return { key: fileKey(st), size, snap };
  };
  /** The sync succeeded: make the record (process-death safe: plain writes, rename for the snapshot). */
  const commit = (c) => {
    if (!c) return;
    if (c.snap) {
      const tmp = path.join(dir, `${c.key}.snap.tmp`);
      const fd = openSync(tmp, 'w');
      try {
        writeSync(fd, c.snap, 0, c.snap.length, 0);
      } finally {
        closeSync(fd);
      }
      renameSync(tmp, path.join(dir, `${c.key}.snap`));
    }
    writeSync(logFd, `${c.key} ${c.size}${c.snap ? ' snap' : ''}\n`);
  };

  for (const name of ['fsyncSync', 'fdatasyncSync']) {
    const orig = fs[name];
    fs[name] = function (fd) {
      const c = capture(fd);
      const r = orig.call(this, fd);
      commit(c);
      return r;
    };
  }
  for (const name of ['fsync', 'fdatasync']) {
    const orig = fs[name];
    fs[name] = function (fd, cb) {
      const c = capture(fd);
      return orig.call(this, fd, (err) =>
        later(() => {
          if (!err) commit(c);
          cb(err);
        }),
      );
    };
  }
  const probe = await fs.promises.open(process.execPath, 'r');
  const proto = Object.getPrototypeOf(probe);
  await probe.close();
  for (const name of ['sync', 'datasync']) {
    const orig = proto[name];
    proto[name] = async function () {
      const c = capture(this.fd);
      const r = await orig.call(this);
      if (latencyMs > 0) await new Promise((resolve) => later(resolve));
      commit(c);
      return r;
    };
  }
  // named imports (import { fsyncSync } from 'node:fs') see the wrappers too
  syncBuiltinESMExports();
}
