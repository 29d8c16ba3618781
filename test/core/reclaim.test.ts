import t, { type Test } from 'tap';
import { readFileSync } from 'node:fs';
import { OWN_MAPPING_MIN_BYTES, RECLAIM_EVERY_BYTES, STREAM_RECLAIM_EVERY_BYTES, collectNow, largeBuffer, reclaimRuns, reclaimer, transientBytes } from '../../core/reclaim.js';

const MiB = 1024 * 1024;
/** a WeakRef keeps its target for the rest of the current job: checks and collections are a turn apart */
const nextTurn = (): Promise<void> => new Promise((r) => setImmediate(r));
/**
 * V8 frees dead backing stores on its sweeper thread after a collection, and that thread may wait
 * for a core (a CI machine running test files side by side): poll until `freed` holds, bounded in
 * time (5 s) and count, rather than in event-loop turns (1000 turns passed in ~50 ms, too short once).
 */
async function untilFreed(freed: () => boolean): Promise<void> {
  const deadline = Date.now() + 5000;
  for (let i = 0; i < 2000 && !freed() && Date.now() < deadline; i++) await new Promise((r) => setTimeout(r, 2));
}

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
  // V8 frees the dead backing stores on a sweeper thread right after the collection: wait for it
  await untilFreed(() => process.memoryUsage().arrayBuffers - base < chunk);
  const held = process.memoryUsage().arrayBuffers - base;
  t.ok(held < chunk, `dead frames held after it: ${(held / MiB).toFixed(2)} MiB (< one frame)`);
  b(chunk);
  t.equal(reclaimRuns(), runs0 + 2, 'the other counter reaches its own');
  a(every - 1);
  t.equal(reclaimRuns(), runs0 + 2, 'a counter starts again from zero after its collection');
});

/** Address space mapped by the process (VmSize), in MiB: malloc's mapped blocks appear in it and leave it when unmapped. */
const vmSizeMiB = (): number => Number(/^VmSize:\s+(\d+) kB/m.exec(readFileSync('/proc/self/status', 'utf8'))![1]) / 1024;

/** The sizes largeBuffer hands out; in a function of its own, so nothing of it stays referenced after. */
function checkSizes(t: Test): void {
  const small = largeBuffer(OWN_MAPPING_MIN_BYTES - 1);
  t.equal(small.length, OWN_MAPPING_MIN_BYTES - 1);
  t.equal(small.buffer.byteLength, OWN_MAPPING_MIN_BYTES - 1, 'below the minimum: allocated as usual');
  const huge = largeBuffer(40 * MiB);
  t.equal(huge.length, 40 * MiB);
  t.equal(huge.buffer.byteLength, 40 * MiB, 'above 32 MiB: mapped by malloc anyway, allocated as usual');
  const one = largeBuffer(16 * MiB);
  t.equal(one.length, 16 * MiB, 'the size asked');
  t.equal(one.byteOffset, 0);
  t.ok(one.buffer.byteLength > 32 * MiB, "the first bytes of a block above glibc's largest mmap threshold");
}

t.test('largeBuffer: exactly the size asked; a large payload in a mapping of its own, unmapped (given back to the system) once freed', async (t) => {
  checkSizes(t);
  // four 16 MiB payloads written whole, then dropped, twice: each burst is mapped as blocks of their own
  // (above glibc's largest mmap threshold) and unmapped when freed — not kept in malloc's heap, where the
  // second burst would have gone (the threshold rises to 16 MiB once the first is freed) and stayed
  // resident. Measured as address space (VmSize), which only mappings move: RSS in a test process also
  // moves with whatever V8 and tap free meanwhile (it failed a CI run that way). The daemon-level RSS
  // figure is the bench's 4 x 16 MiB row.
  // Each payload is followed by a small allocation that stays, as the daemon's other memory does.
  const holder: { bufs: Buffer[] } = { bufs: [] };
  const pins: Buffer[] = [];
  // what is dead already is freed now, not while a round is measured: the second collection finishes
  // the sweep the first one started
  collectNow();
  collectNow();
  const blocks = 4 * 32; // MiB: four blocks of 32 MiB + 4 KiB
  for (let round = 0; round < 2; round++) {
    const before = vmSizeMiB();
    for (let i = 0; i < 4; i++) {
      holder.bufs.push(largeBuffer(16 * MiB).fill(i + 1));
      pins.push(Buffer.allocUnsafeSlow(64 * 1024).fill(9));
    }
    const full = vmSizeMiB();
    // 8 MiB of slack for what V8 maps or unmaps for its own heap meanwhile; 4 x 16 MiB allocated the usual way map 64
    t.ok(full - before >= blocks - 8, `round ${round + 1}: four blocks of their own mapped (+${(full - before).toFixed(0)} MiB of address space)`);
    holder.bufs = [];
    await nextTurn();
    collectNow();
    // freed by V8's sweeper thread right after the collection: wait for it
    await untilFreed(() => vmSizeMiB() <= full - (blocks - 8));
    const after = vmSizeMiB();
    t.ok(full - after >= blocks - 8, `round ${round + 1}: ${(full - after).toFixed(0)} MiB unmapped once the payloads were freed`);
  }
  t.equal(pins.length, 8);
});
