import t from 'tap';
import { ActiveIndex } from '../../../cloud/store/active-index.js';
import { dedupKey, fingerprint } from '../../../cloud/store/format.js';

t.test('ActiveIndex: every added fingerprint is found with its position; others are not', async (t) => {
  const idx = new ActiveIndex(10); // grows past its first table
  const n = 5000;
  for (let i = 0; i < n; i++) {
    const [hi, lo] = fingerprint(dedupKey('gw-1', `m${i}`));
    idx.add(hi, lo, i * 100);
  }
  t.equal(idx.size, n);
  let found = 0;
  for (let i = 0; i < n; i++) {
    const [hi, lo] = fingerprint(dedupKey('gw-1', `m${i}`));
    if (idx.positions(hi, lo).includes(i * 100)) found++;
  }
  t.equal(found, n, 'all found after the table grew');
  let strays = 0;
  for (let i = 0; i < n; i++) {
    const [hi, lo] = fingerprint(dedupKey('gw-2', `m${i}`));
    strays += idx.positions(hi, lo).length;
  }
  t.equal(strays, 0, 'keys of another gateway are not there');
  t.equal(idx.fps.length, 3 * n, 'the flat fingerprints, in record order, for the sidecar');
  t.same(idx.fps.slice(0, 3), [...fingerprint(dedupKey('gw-1', 'm0')), 0]);
});

t.test('ActiveIndex: records sharing a fingerprint are all returned (the store confirms each on disk)', async (t) => {
  const idx = new ActiveIndex(4);
  idx.add(7, 9, 10);
  idx.add(1, 2, 20);
  idx.add(7, 9, 30);
  t.same(idx.positions(7, 9).sort((a, b) => a - b), [10, 30]);
  t.same(idx.positions(1, 2), [20]);
  t.same(idx.positions(9, 7), []);
});
