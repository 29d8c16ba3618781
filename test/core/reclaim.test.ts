import t from 'tap';
import { RECLAIM_EVERY_BYTES, reclaimRuns, transientBytes } from '../../core/reclaim.js';

const MiB = 1024 * 1024;
const arrayBuffers = (): number => process.memoryUsage().arrayBuffers;

t.test('transientBytes: dead chunk buffers are freed once RECLAIM_EVERY_BYTES of them were counted, not before', async (t) => {
  const chunk = 16 * 1024; // a decrypted TLS record's worth, as the broker's large-publish gathering sees them
  const base = arrayBuffers();
  const runs0 = reclaimRuns();
  // chunks that become garbage at once, as each is copied into a large publish's buffer
  let copied = 0;
  const into = Buffer.allocUnsafeSlow(RECLAIM_EVERY_BYTES);
  while (copied + chunk < RECLAIM_EVERY_BYTES) {
    const c = Buffer.allocUnsafeSlow(chunk).fill(1);
    c.copy(into, copied);
    copied += chunk;
    transientBytes(chunk);
  }
  t.equal(reclaimRuns(), runs0, 'no collection below the threshold');
  t.ok(arrayBuffers() - base >= RECLAIM_EVERY_BYTES + copied - 2 * MiB, `dead chunks still held before the threshold (${((arrayBuffers() - base) / MiB).toFixed(1)} MiB over the start)`);
  transientBytes(RECLAIM_EVERY_BYTES - copied);
  t.equal(reclaimRuns(), runs0 + 1, 'one young-generation collection at the threshold');
  t.ok(arrayBuffers() - base < RECLAIM_EVERY_BYTES + 2 * MiB, `the dead chunks are freed, the live buffer kept (${((arrayBuffers() - base) / MiB).toFixed(1)} MiB over the start)`);
  t.equal(into[0], 1, 'live data untouched');
});
