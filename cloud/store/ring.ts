/**
 * The reference cloud's ring of recent payloads: what live subscribers are fed from, without a
 * disk read (issue 10: "subscribers fed from memory").
 *
 * Why bytes in a few blocks and typed arrays rather than a Map of Buffers: a Map entry and a
 * Buffer view per message live for the ring's whole span (65 536 messages, ~13 s at 5 000 msg/s),
 * so every one of them outlived two young-generation collections and was promoted — with the
 * active segment's dedup keys, ~200 B of old generation per message, ~1 MB/s at 5 000 msg/s, and
 * the cloud's scavenges (4–8 ms each) spent their time copying them. Here a payload is copied
 * (it is at most RING_PAYLOAD_MAX bytes) into 1 MiB blocks allocated on demand up to the byte
 * bound, and found through three typed arrays indexed by seq modulo the message bound: nothing
 * per message on the JS heap.
 *
 * Eviction is implicit: a slot reused by a newer seq forgets the older one (the message bound),
 * and a block written again forgets every payload it held (the byte bound).
 */

/** Block size: a payload never spans two blocks. */
export const RING_BLOCK_BYTES = 1024 * 1024;
/** Larger payloads are not kept (subscribers get payloads up to 64 KiB inline; the rest is read from disk). */
export const RING_PAYLOAD_MAX = 64 * 1024;

export class PayloadRing {
  private readonly blocks: Buffer[] = [];
  private readonly maxBlocks: number;
  /** seq held by each slot (slot = seq % slots); -1 when empty */
  private readonly seqs: Float64Array;
  /** its position: block * RING_BLOCK_BYTES + offset */
  private readonly pos: Float64Array;
  private readonly lens: Int32Array;
  /** the newest seq written into each block (-1: none) */
  private readonly blockLast: Float64Array;
  /** seqs below this were in a block written again since */
  private oldestValid = 0;
  private block = -1;
  private off = 0;
  private bytesKept = 0;
  private kept = 0;

  constructor(
    private readonly slots: number,
    maxBytes: number,
  ) {
    this.maxBlocks = Math.max(1, Math.floor(maxBytes / RING_BLOCK_BYTES));
    this.seqs = new Float64Array(Math.max(1, slots)).fill(-1);
    this.pos = new Float64Array(Math.max(1, slots));
    this.lens = new Int32Array(Math.max(1, slots));
    this.blockLast = new Float64Array(this.maxBlocks).fill(-1);
  }

  /** Keep `data` as the payload of `seq` (seqs come in increasing order). */
  put(seq: number, data: Buffer): void {
    if (this.slots <= 0 || data.length > RING_PAYLOAD_MAX) return;
    if (this.block < 0 || this.off + data.length > RING_BLOCK_BYTES) this.nextBlock();
    const slot = seq % this.slots;
    if (this.seqs[slot]! >= this.oldestValid && this.seqs[slot]! >= 0) {
      this.kept--;
      this.bytesKept -= this.lens[slot]!;
    }
    data.copy(this.blocks[this.block]!, this.off);
    this.seqs[slot] = seq;
    this.pos[slot] = this.block * RING_BLOCK_BYTES + this.off;
    this.lens[slot] = data.length;
    this.blockLast[this.block] = seq;
    this.off += data.length;
    this.kept++;
    this.bytesKept += data.length;
  }

  /**
   * The payload of `seq`, or undefined when it is not kept. A VIEW into the ring: valid until the
   * next put(), so it is consumed synchronously (or copied).
   */
  get(seq: number): Buffer | undefined {
    if (this.slots <= 0 || seq < this.oldestValid) return undefined;
    const slot = seq % this.slots;
    if (this.seqs[slot] !== seq) return undefined;
    const p = this.pos[slot]!;
    const b = Math.floor(p / RING_BLOCK_BYTES);
    const o = p - b * RING_BLOCK_BYTES;
    return this.blocks[b]!.subarray(o, o + this.lens[slot]!);
  }

  /** Payloads kept and their bytes (approximate after a block is written again: for stats). */
  stats(): { messages: number; bytes: number } {
    return { messages: Math.max(0, this.kept), bytes: Math.max(0, this.bytesKept) };
  }

  private nextBlock(): void {
    this.block = (this.block + 1) % this.maxBlocks;
    if (this.blocks.length <= this.block) this.blocks.push(Buffer.allocUnsafe(RING_BLOCK_BYTES));
    const last = this.blockLast[this.block]!;
    if (last >= 0) {
      // everything this block held is forgotten: no seq up to its newest one is valid any more
      this.oldestValid = Math.max(this.oldestValid, last + 1);
      this.recount();
    }
    this.blockLast[this.block] = -1;
    this.off = 0;
  }

  /** Recount after a block is dropped (once per 1 MiB of payloads: cheap next to the copies). */
  private recount(): void {
    let kept = 0;
    let bytes = 0;
    for (let i = 0; i < this.slots; i++) {
      if (this.seqs[i]! >= this.oldestValid) {
        kept++;
        bytes += this.lens[i]!;
      }
    }
    this.kept = kept;
    this.bytesKept = bytes;
  }
}
