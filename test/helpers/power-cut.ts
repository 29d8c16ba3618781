/**
 * A simulated power cut for the fault suite (test/soak/power-cut.test.ts).
 *
 * The daemon runs under test/helpers/daemon-hooks.mjs --record-syncs REC (see
 * test/helpers/sync-recorder.mjs): every successful fsync leaves "KEY SIZE"
 * in REC/syncs.log and, for small files other than segments, a snapshot of the
 * synced content. After a SIGKILL, cutPower() puts every file under the
 * journal directory back to what had reached the disk:
 *   - a file synced during the boot: a snapshot is written back whole, a
 *     segment is truncated to its length at the last sync;
 *   - a file not synced during the boot but present before it: cut back to its
 *     length at boot (the baseline; what was there had survived the previous cut);
 *   - a file created during the boot and never synced: emptied (its data was
 *     only in the page cache).
 * Not modelled (stated so in the test): directory entries are taken as durable
 * (a create, rename or unlink is never undone), and in-place overwrites of a
 * segment below its synced length are not undone (segments are append-only).
 */
import { existsSync, readdirSync, readFileSync, rmSync, statSync, truncateSync, writeFileSync, type BigIntStats } from 'node:fs';
import path from 'node:path';

const keyOf = (st: BigIntStats): string => `${st.dev}:${st.ino}:${st.birthtimeNs}`;

function filesUnder(dir: string): string[] {
  const out: string[] = [];
  const walk = (d: string, depth: number): void => {
    if (depth > 8) return; // the journal is two levels deep; bounded anyway
    for (const e of readdirSync(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) walk(p, depth + 1);
      else if (e.isFile()) out.push(p);
    }
  };
  if (existsSync(dir)) walk(dir, 0);
  return out;
}

/** Sizes of the files under `dir` now (call it before each boot: this is what is on disk for sure). */
export function baseline(dir: string): Map<string, number> {
  const m = new Map<string, number>();
  for (const f of filesUnder(dir)) {
    const st = statSync(f, { bigint: true });
    m.set(keyOf(st), Number(st.size));
  }
  return m;
}

export interface CutFigures {
  files: number;
  /** Files whose content went back to a snapshot taken at their last sync. */
  restored: number;
  /** Files cut shorter (segments past their last sync, files never synced). */
  truncated: number;
  /** Bytes that were written but never synced, thrown away. */
  bytesLost: number;
}

/** Throw away everything under `dir` that the daemon wrote and did not sync (after a SIGKILL); clears `rec` for the next boot. */
export function cutPower(dir: string, rec: string, before: Map<string, number>): CutFigures {
  const synced = new Map<string, { size: number; snap: boolean }>();
  const log = path.join(rec, 'syncs.log');
  const text = existsSync(log) ? readFileSync(log, 'utf8') : '';
  for (const line of text.split('\n')) {
    const [key, size, snap] = line.split(' ');
    if (key && size) synced.set(key, { size: Number(size), snap: snap === 'snap' });
  }
  const f: CutFigures = { files: 0, restored: 0, truncated: 0, bytesLost: 0 };
  for (const file of filesUnder(dir)) {
    f.files++;
    const st = statSync(file, { bigint: true });
    const key = keyOf(st);
    const size = Number(st.size);
    const s = synced.get(key);
    if (s?.snap) {
      const snap = readFileSync(path.join(rec, `${key}.snap`));
      if (!snap.equals(readFileSync(file))) {
        writeFileSync(file, snap); // same inode: O_TRUNC then write
        f.restored++;
        f.bytesLost += Math.max(0, size - snap.length);
      }
      continue;
    }
    const durable = s ? s.size : (before.get(key) ?? 0);
    if (size > durable) {
      truncateSync(file, durable);
      f.truncated++;
      f.bytesLost += size - durable;
    }
  }
  rmSync(rec, { recursive: true, force: true });
  return f;
}
