import t from 'tap';
import { RECLAIM_EVERY_BYTES, STREAM_RECLAIM_EVERY_BYTES, collectNow, reclaimRuns, reclaimer, transientBytes } from '../../core/reclaim.js';

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

t.test('reclaimer: a counter of its own per kind of transfer, one young-generation collection per its threshold', async (t) => {
  t.ok(STREAM_RECLAIM_EVERY_BYTES > RECLAIM_EVERY_BYTES, 'long transfers collect less often than large publishes (CPU, not peak)');
  const every = 4 * MiB;
  const a = reclaimer(every);
  const b = reclaimer(every);
  const runs0 = reclaimRuns();
  const base = process.memoryUsage().arrayBuffers;
  const chunk = 256 * 1024; // a chunk frame's worth, as the reference cloud's ingest sees them
  for (let off = 0; off < every - chunk; off += chunk) {
    Buffer.allocUnsafeSlow(chunk).fill(3);
    a(chunk);
  }
  b(every - chunk);
  t.equal(reclaimRuns(), runs0, 'the counters do not add up: each is below its threshold');
  t.ok(process.memoryUsage().arrayBuffers - base >= every - chunk, 'the dead frames are still allocated before the collection');
  a(chunk);
  t.equal(reclaimRuns(), runs0 + 1, 'one collection when a counter reaches its threshold');
  // V8 frees the dead backing stores on a sweeper thread right after the collection: wait for it, bounded in turns
  for (let i = 0; i < 1000 && process.memoryUsage().arrayBuffers - base >= chunk; i++) await nextTurn();
  const held = process.memoryUsage().arrayBuffers - base;
  t.ok(held < chunk, `dead frames held after it: ${(held / MiB).toFixed(2)} MiB (< one frame)`);
  b(chunk);
  t.equal(reclaimRuns(), runs0 + 2, 'the other counter reaches its own');
  a(every - 1);
  t.equal(reclaimRuns(), runs0 + 2, 'a counter starts again from zero after its collection');
});
