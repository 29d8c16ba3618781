import t from 'tap';
import { PayloadRing, RING_BLOCK_BYTES, RING_PAYLOAD_MAX } from '../../../cloud/store/ring.js';

const payload = (seq: number, len: number): Buffer => Buffer.alloc(len, seq % 251);

t.test('PayloadRing: payloads come back by seq; the message bound forgets the oldest', async (t) => {
  const r = new PayloadRing(4, 32 * RING_BLOCK_BYTES);
  for (let s = 1; s <= 6; s++) r.put(s, payload(s, 10 + s));
  t.equal(r.get(1), undefined, 'slot reused by seq 5');
  t.equal(r.get(2), undefined, 'slot reused by seq 6');
  for (let s = 3; s <= 6; s++) t.same(r.get(s), payload(s, 10 + s), `seq ${s}`);
  t.equal(r.get(7), undefined, 'not stored yet');
  t.same(r.stats(), { messages: 4, bytes: 13 + 14 + 15 + 16 });
});

t.test('PayloadRing: the byte bound forgets every payload of a block written again; a payload never spans blocks', async (t) => {
  const len = 40_000; // 26 per 1 MiB block
  const perBlock = Math.floor(RING_BLOCK_BYTES / len);
  const r = new PayloadRing(10_000, 2 * RING_BLOCK_BYTES);
  const n = 3 * perBlock; // the third block's worth goes into the first block again
  for (let s = 0; s < n; s++) r.put(s, payload(s, len));
  for (let s = 0; s < perBlock; s++) t.equal(r.get(s), undefined, `seq ${s} was in the block written again`);
  let ok = 0;
  for (let s = perBlock; s < n; s++) if (r.get(s)?.equals(payload(s, len))) ok++;
  t.equal(ok, n - perBlock, 'the two newest blocks are intact');
  t.equal(r.stats().messages, n - perBlock);
  t.ok(r.stats().bytes <= 2 * RING_BLOCK_BYTES);
});

t.test('PayloadRing: larger payloads and an empty ring keep nothing', async (t) => {
  const r = new PayloadRing(8, RING_BLOCK_BYTES);
  r.put(1, payload(1, RING_PAYLOAD_MAX + 1));
  t.equal(r.get(1), undefined, 'over RING_PAYLOAD_MAX: read from disk instead');
  r.put(2, Buffer.alloc(0));
  t.same(r.get(2), Buffer.alloc(0), 'an empty payload is kept');
  const none = new PayloadRing(0, RING_BLOCK_BYTES);
  none.put(1, payload(1, 5));
  t.equal(none.get(1), undefined);
  t.same(none.stats(), { messages: 0, bytes: 0 });
});
