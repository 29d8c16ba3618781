import t from 'tap';
import { Writable } from 'node:stream';
import { corkUntilNextTick } from '../../core/net.js';

t.test('corkUntilNextTick: the writes of one turn reach the stream in one writev; idempotent within the turn', async (t) => {
  const calls: number[] = [];
  const w = new Writable({
    write(_c, _e, cb) {
      calls.push(1);
      cb();
    },
    writev(chunks, cb) {
      calls.push(chunks.length);
      cb();
    },
  });
  for (let i = 0; i < 4; i++) {
    corkUntilNextTick(w);
    w.write(Buffer.from([i]));
  }
  t.same(calls, [], 'nothing written during the turn');
  await new Promise((r) => setImmediate(r));
  t.same(calls, [4], 'one writev of the four writes');
  t.equal(w.writableCorked, 0, 'uncorked exactly once per cork');
  calls.length = 0;
  corkUntilNextTick(w);
  w.write(Buffer.from([9]));
  await new Promise((r) => setImmediate(r));
  t.same(calls, [1], 'the next turn corks again');
});
