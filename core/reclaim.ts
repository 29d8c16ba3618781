/**
 * Prompt reclaim of the short-lived buffers of large transfers (issue 11: a daemon receiving
 * large publishes stays within its idle RSS plus the large-publish budget).
 *
 * A large PUBLISH reaches the broker as about a thousand decrypted TLS chunks per 16 MiB, each a
 * fresh ArrayBuffer outside the JS heap, copied into the publish's one buffer and dead at once.
 * V8 frees such a buffer only when its small JS wrapper is collected, and it schedules
 * collections by the growth of the JS heap, which these wrappers hardly move; it reacts to memory
 * outside the heap only once about 64 MiB more of it exists than after the last full collection.
 * Four concurrent 16 MiB publishes thus left up to 64 MiB of dead chunks next to the 64 MiB they
 * were gathered into: measured on the bundled config, RSS peaked 82–90 MiB above the daemon's RSS
 * just before them, for a 64 MiB budget.
 *
 * `transientBytes(n)` counts such chunk bytes across all connections; after every
 * RECLAIM_EVERY_BYTES of them one young-generation collection (a scavenge, well under 1 ms: the
 * wrappers are most of what is young) frees them, so their memory is reused by the next chunks
 * instead of adding to the peak. 2 MiB: at 8 MiB the peak over the daemon's RSS for 4 x 16 MiB
 * was still 68–79 MiB; the cost is one scavenge per 2 MiB received in large publishes (~8 ms of TLS
 * and copying here), nothing on the small-message path.
 *
 * What a large publish leaves once answered is old (it outlived those collections), so only a full
 * collection frees it: `collectNow`, which the broker's in-flight budget runs before it grants the
 * bytes to a publish waiting for them (broker/inflight-budget.ts).
 *
 * V8's collection function is reached through `--expose-gc` set at run time and a new context
 * (the main context was created without it); resolved once, on first use. If the runtime refuses,
 * reclaiming is off and memory behaves as before.
 */
import v8 from 'node:v8';
import vm from 'node:vm';

/** Chunk bytes between two young-generation collections: the dead memory a burst may leave is about this much. */
export const RECLAIM_EVERY_BYTES = 2 * 1024 * 1024;

type GcFn = (options?: { type?: 'minor' }) => void;

let gcFn: GcFn | null | undefined;
let runs = 0;

function resolveGc(): GcFn | null {
  try {
    v8.setFlagsFromString('--expose-gc');
    const f: unknown = vm.runInNewContext('gc');
    return typeof f === 'function' ? (f as GcFn) : null;
  } catch {
    return null;
  }
}

/**
 * Bytes of a long transfer's buffers between two young-generation collections (uploads streamed
 * through the connector, chunk frames arriving at the reference cloud). Here what matters is the CPU
 * the collector takes per byte, not a peak: left to V8, a 1 GiB upload ran ~90 full collections in
 * the cloud (dead frames outside the heap pushed its old generation to its limit every ~12 MiB),
 * ~1 s of a 6–8 s CPU budget; one scavenge every 2 MiB took 0.8 s (~1.7 ms each: freeing the dead
 * backing stores is most of it), every 8 MiB 0.2–0.3 s with a handful of full collections left
 * (bench/uplink.mjs, 1 GiB, reference cloud).
 */
export const STREAM_RECLAIM_EVERY_BYTES = 8 * 1024 * 1024;

function minorNow(): void {
  if (gcFn === undefined) gcFn = resolveGc();
  if (gcFn === null) return;
  gcFn({ type: 'minor' });
  runs++;
}

/**
 * A counter of its own for one kind of transfer: one young-generation collection after every
 * `everyBytes` of short-lived buffers it reports dead (`n` bytes each call).
 */
export function reclaimer(everyBytes: number): (n: number) => void {
  let due = 0;
  return (n: number): void => {
    due += n;
    if (due < everyBytes) return;
    due = 0;
    minorNow();
  };
}

/** `n` bytes of short-lived buffers just became garbage (chunks copied into a large publish, across all connections). */
export const transientBytes = reclaimer(RECLAIM_EVERY_BYTES);

/**
 * A full collection now (synchronous, ~10–30 ms on the daemon's heap): for memory that is known to
 * be garbage but old — a large publish's buffer outlives several young-generation collections while
 * it is gathered, so only a full one frees it. Used where memory is what the caller waits for.
 */
export function collectNow(): void {
  if (gcFn === undefined) gcFn = resolveGc();
  if (gcFn === null) return;
  // no options: V8's full collection. ({ type: 'major' } on Node 20 returned in 0.2 ms with a dead
  // 32 MiB buffer still allocated; the plain call frees it, ~8 ms on a small heap)
  gcFn();
  runs++;
}

/** Collections run so far by this module (status and tests). */
export function reclaimRuns(): number {
  return runs;
}

/**
 * Payloads at least this large get a buffer of their own mapping (largeBuffer).
 */
export const OWN_MAPPING_MIN_BYTES = 4 * 1024 * 1024;
/** glibc's largest dynamic mmap threshold (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit) and one page. */
const ALWAYS_MAPPED_BYTES = 32 * 1024 * 1024 + 4096;

/**
 * A buffer for one large, short-lived payload (a large MQTT publish gathered whole), whose memory
 * goes back to the system when it is freed.
 *
 * glibc's malloc serves a request below its mmap threshold from its heap, and gives heap memory
 * back only from the top. The threshold starts at 128 KiB but rises to the size of every mapped
 * block freed, up to 32 MiB: after the first 16 MiB payload was freed, the next ones came from the
 * heap and stayed resident once freed, so each burst of large publishes added to the last one
 * (the daemon's smaps at the peak of bursts of 4 x 16 MiB: its [heap] mapping grew to 69 MiB by the
 * second burst). A request above 32 MiB is always mapped and unmapped when freed, and only the pages
 * written count in RSS, so a payload of OWN_MAPPING_MIN_BYTES or more is given the first bytes of a
 * 32 MiB + 4 KiB block.
 * The costs: address space (plentiful on 64-bit; where the block is refused, as under strict
 * overcommit, the payload is allocated the usual way), and V8 counts the whole block as external
 * memory, so it runs its next collection a little sooner — which is what a freed payload needs.
 * Payloads below OWN_MAPPING_MIN_BYTES are allocated as usual, so a block is at most 8 times the
 * payload it holds.
 */
export function largeBuffer(size: number): Buffer {
  if (size < OWN_MAPPING_MIN_BYTES || size >= ALWAYS_MAPPED_BYTES) return Buffer.allocUnsafeSlow(size);
  try {
    return Buffer.allocUnsafeSlow(ALWAYS_MAPPED_BYTES).subarray(0, size);
  } catch {
    // address space or commit charge refused the block (strict overcommit, a 32-bit gateway): the usual way
    return Buffer.allocUnsafeSlow(size);
  }
}
