/**
 * The active segment's dedup index: which records it holds, by the 64-bit fingerprint of their
 * dedup key (store/format.ts `fingerprint`), and where.
 *
 * Why not a Map of the keys: every key string and Map entry lived as long as the segment (up to
 * 131 072 records, ~26 s at 5 000 msg/s), so each message promoted ~90 B into the old generation
 * and the Map's rehashes copied it all again as it grew. Here the fingerprints are the flat array
 * the segment's sidecar file is made from anyway (hi, lo, position per record) and an
 * open-addressing table of indexes into it: nothing per message on the JS heap but numbers.
 *
 * A fingerprint match is a candidate, not a proof: the store confirms it against the record on
 * disk, as it does for sealed segments (two keys sharing 64 bits are possible, if unlikely).
 */
export class ActiveIndex {
  /** hi, lo, position of every record, in record order (the sidecar's input when the segment is sealed) */
  readonly fps: number[] = [];
  /** 1 + the record's index in `fps` / 3; 0: empty slot. Kept at most half full. */
  private table: Int32Array;
  private count = 0;

  constructor(expected: number) {
    let cap = 64;
    while (cap < 2 * expected) cap *= 2;
    this.table = new Int32Array(cap);
  }

  get size(): number {
    return this.count;
  }

  add(hi: number, lo: number, pos: number): void {
    this.fps.push(hi, lo, pos);
    this.count++;
    if (2 * this.count > this.table.length) this.grow();
    else this.insert(this.count - 1);
  }

  /** Whether any record has this fingerprint (no allocation: the per-message check). */
  has(hi: number, lo: number): boolean {
    const t = this.table;
    const mask = t.length - 1;
    for (let s = (lo ^ Math.imul(hi, 0x9e3779b1)) & mask; ; s = (s + 1) & mask) {
      const e = t[s]!;
      if (e === 0) return false;
      const i = 3 * (e - 1);
      if (this.fps[i] === hi && this.fps[i + 1] === lo) return true;
    }
  }

  /** Positions of the records whose key has this fingerprint (usually none, almost never more than one). */
  positions(hi: number, lo: number): number[] {
    const t = this.table;
    const mask = t.length - 1;
    const out: number[] = [];
    for (let s = (lo ^ Math.imul(hi, 0x9e3779b1)) & mask; ; s = (s + 1) & mask) {
      const e = t[s]!;
      if (e === 0) return out;
      const i = 3 * (e - 1);
      if (this.fps[i] === hi && this.fps[i + 1] === lo) out.push(this.fps[i + 2]!);
    }
  }

  private insert(k: number): void {
    const t = this.table;
    const mask = t.length - 1;
    let s = (this.fps[3 * k + 1]! ^ Math.imul(this.fps[3 * k]!, 0x9e3779b1)) & mask;
    while (t[s] !== 0) s = (s + 1) & mask;
    t[s] = k + 1;
  }

  private grow(): void {
    this.table = new Int32Array(2 * this.table.length);
    for (let k = 0; k < this.count; k++) this.insert(k);
  }
}
