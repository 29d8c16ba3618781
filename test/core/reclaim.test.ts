import t from 'tap';
import { RECLAIM_EVERY_BYTES, collectNow, reclaimRuns, transientBytes } from '../../core/reclaim.js';

const MiB = 1024 * 1024;
/** a WeakRef keeps its target for the rest of the current job: checks and collections are a turn apart */
const nextTurn = (): Promise<void> => new Promise((r) => setImmediate(r));

t.test('transientBytes: one young-generation collection per RECLAIM_EVERY_BYTES counted; dead chunks do not pile up', async (t) => {
  const chunk = 16 * 1024; // a decrypted TLS record's worth, as the broker's large-publish gathering sees them
  const total = 4 * RECLAIM_EVERY_BYTES;
  const into = Buffer.allocUnsafeSlow(total);
  const base = process.memoryUsage().arrayBuffers;
  const runs0 = reclaimRuns();
  let counted = 0;
  for (let off = 0; off < total; off += chunk) {
    // a chunk is garbage once copied into the large publish's buffer, and counted then, as the broker does
    const c = Buffer.allocUnsafeSlow(chunk).fill(1);
    c.copy(into, off);
    transientBytes(chunk);
    counted += chunk;
    if (counted === RECLAIM_EVERY_BYTES - chunk) t.equal(reclaimRuns(), runs0, 'no collection below the threshold');
  }
  t.equal(reclaimRuns(), runs0 + 4, 'one young-generation collection per RECLAIM_EVERY_BYTES');
  const held = process.memoryUsage().arrayBuffers - base;
  // without the collections the 8 MiB of dead chunks stay allocated (V8 reacts to external memory only at ~64 MiB)
  t.ok(held < RECLAIM_EVERY_BYTES, `dead chunks held at the end: ${(held / MiB).toFixed(1)} MiB (< ${(RECLAIM_EVERY_BYTES / MiB).toFixed(1)} MiB)`);
  t.equal(into[0], 1, 'live data untouched');
});

t.test('collectNow: frees a dead buffer that outlived young-generation collections (only a full collection does)', async (t) => {
  const holder: { big?: Buffer } = { big: Buffer.allocUnsafeSlow(32 * MiB).fill(2) };
  const ref = new WeakRef(holder.big!);
  await nextTurn();
  // two young-generation collections while it is alive: it is promoted, as a large publish's buffer is while gathered
  transientBytes(RECLAIM_EVERY_BYTES);
  transientBytes(RECLAIM_EVERY_BYTES);
  delete holder.big;
  await nextTurn();
  transientBytes(RECLAIM_EVERY_BYTES);
  t.ok(ref.deref() !== undefined, 'old and dead: a young-generation collection leaves it');
  await nextTurn();
  const runs0 = reclaimRuns();
  collectNow();
  t.equal(reclaimRuns(), runs0 + 1);
  t.equal(ref.deref(), undefined, 'freed by the full collection');
});
