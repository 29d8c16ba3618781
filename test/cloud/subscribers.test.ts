import t from 'tap';
import path from 'node:path';
import type { AddressInfo } from 'node:net';
import { WebSocket, WebSocketServer } from 'ws';
import { filterError, SubscriberHub, messageText } from '../../cloud/subscribers.js';
import { recordMeta } from '../../cloud/store/format.js';
import { CloudStore } from '../../cloud/store.js';
import { silentLogger } from '../../core/logger.js';
import { sha256Hex } from '../../protocol/codec.js';
import { tempDir } from '../helpers/daemon.js';

t.test('filter validation', async (t) => {
  for (const ok of ['#', 'a/+/b', 'a/#', '+', 'a/b']) t.equal(filterError(ok), undefined, `${ok} is valid`);
  for (const bad of ['', 'a/#/b', 'a#', 'a/b+', '+a', 'x'.repeat(5000), 'a\u0000b']) t.type(filterError(bad), 'string', `${JSON.stringify(bad.slice(0, 10))} is invalid`);
});

t.test('subscribers: replay streams every segment, live messages follow with no gap and no duplicate; payloads from memory or disk', async (t) => {
  const dir = path.join(tempDir(t), 'store');
  // a tiny ring and tiny segments: most payloads must come back from disk, across segments
  const store = new CloudStore(dir, silentLogger(), { segmentRecords: 50, ringMessages: 3 });
  await store.open();
  const payload = (i: number): Buffer => Buffer.from(`payload-${i}-`.repeat((i % 5) + 1));
  const commit = (i: number): Promise<unknown> => {
    const p = payload(i);
    return store.commitData(`m-${i}`, 'gw', { device_id: 'd', topic: i % 2 ? 'a/odd' : 'a/even', qos: 1, received_at: i }, p, sha256Hex(p));
  };
  for (let i = 0; i < 120; i++) await commit(i);
  const hub = new SubscriberHub(store, silentLogger());
  const wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
  await new Promise<void>((r) => wss.once('listening', () => r()));
  const port = (wss.address() as AddressInfo).port;
  wss.on('connection', (ws, req) => {
    const u = new URL(req.url ?? '/', 'http://x');
    hub.attach(ws, u.searchParams.getAll('filter'), u.searchParams.get('from_start') === '1', 'test');
  });
  t.teardown(async () => {
    hub.close();
    wss.close();
    await store.close();
  });
  const sub = (q: string): { msgs: Record<string, unknown>[]; until: (n: number) => Promise<void>; opened: Promise<void> } => {
    const ws = new WebSocket(`ws://127.0.0.1:${port}/?${q}`);
    const msgs: Record<string, unknown>[] = [];
    const waiters: (() => void)[] = [];
    ws.on('message', (d) => {
      msgs.push(JSON.parse(d.toString()) as Record<string, unknown>);
      for (const w of waiters.splice(0)) w();
    });
    t.teardown(() => ws.terminate());
    return {
      msgs,
      opened: new Promise((r) => ws.once('open', () => r())),
      until: async (n) => {
        while (msgs.length < n) await new Promise<void>((r) => waiters.push(r));
      },
    };
  };
  const all = sub('filter=%23&from_start=1');
  const odd = sub('filter=a/odd');
  await Promise.all([all.opened, odd.opened]);
  // live messages arrive while the replay is still streaming
  for (let i = 120; i < 220; i++) await commit(i);
  await all.until(221);
  await odd.until(50);
  const replayedAt = all.msgs.findIndex((m) => m.type === 'replayed');
  t.same(all.msgs[replayedAt], { type: 'replayed', count: 120 });
  const got = all.msgs.filter((m) => m.type === 'message');
  t.same(got.map((m) => m.seq), Array.from({ length: 220 }, (_, i) => i + 1), 'every message once, in store order');
  t.ok(got.every((m, i) => Buffer.from(m.payload as string, 'base64').equals(payload(i))), 'payloads right (ring, segment reads, replay)');
  t.same(Object.keys(got[0]!), ['type', 'seq', 'id', 'gateway_id', 'device_id', 'topic', 'qos', 'size', 'sha256', 'received_at', 'stored_at', 'payload'], 'the fields subscribers always got, no store internals');
  t.same(odd.msgs.map((m) => m.id), Array.from({ length: 50 }, (_, i) => `m-${121 + 2 * i}`), 'live only, filtered');
});

t.test('subscribers: the messages of one group commit leave in few socket writes, all of them, in order', async (t) => {
  const dir = path.join(tempDir(t), 'store');
  const store = new CloudStore(dir, silentLogger());
  await store.open();
  const hub = new SubscriberHub(store, silentLogger());
  const wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
  await new Promise<void>((r) => wss.once('listening', () => r()));
  const port = (wss.address() as AddressInfo).port;
  let writes = 0;
  wss.on('connection', (ws) => {
    // ws keeps its socket as `_socket`: the hub corks it for a turn of the event loop
    const sock = (ws as unknown as { _socket: { cork: unknown; _write: (...a: unknown[]) => unknown; _writev: (...a: unknown[]) => unknown } })._socket;
    t.type(sock.cork, 'function', 'ws exposes its socket as _socket');
    const w = sock._write.bind(sock);
    const wv = sock._writev.bind(sock);
    sock._write = (...a: unknown[]) => (writes++, w(...a));
    sock._writev = (...a: unknown[]) => (writes++, wv(...a));
    hub.attach(ws, ['#'], false, 'test');
  });
  t.teardown(async () => {
    hub.close();
    wss.close();
    await store.close();
  });
  const ws = new WebSocket(`ws://127.0.0.1:${port}/`);
  t.teardown(() => ws.terminate());
  const msgs: Record<string, unknown>[] = [];
  const N = 300;
  const done = new Promise<void>((r) =>
    ws.on('message', (d) => {
      msgs.push(JSON.parse(d.toString()) as Record<string, unknown>);
      if (msgs.length === N) r();
    }),
  );
  await new Promise((r) => ws.once('open', r));
  for (let i = 0; i < 100 && hub.size === 0; i++) await new Promise((r) => setImmediate(r)); // attach runs on the server's connection event
  writes = 0;
  // one burst: the store commits them in a few rounds
  await Promise.all(Array.from({ length: N }, (_, i) => {
    const p = Buffer.from(`p${i}`);
    return store.commitData(`m-${i}`, 'gw', { device_id: 'd', topic: 'a/b', qos: 1, received_at: i }, p, sha256Hex(p));
  }));
  await done;
  t.same(msgs.map((m) => m.id), Array.from({ length: N }, (_, i) => `m-${i}`), 'every message once, in order');
  t.ok(writes > 0 && writes <= N / 10, `${N} messages in ${writes} socket writes`);
});

t.test('messageText: the JSON a subscriber gets, payload last, as JSON.stringify would write it', async (t) => {
  // the fields in the order subscribers always got them (storedFields)
  const entry = (topic: string, size: number) => ({ seq: 7, id: 'gw-1-7', gateway_id: 'gw "1"', device_id: 'dév\\1', topic, qos: 1 as const, size, sha256: 'ab'.repeat(32), received_at: 1, stored_at: 2 });
  for (const [topic, payload] of [
    ['a/b', Buffer.from('hello')],
    ['ü/"quoted"/\u2028/\n', Buffer.alloc(4096, 0xff)],
    ['empty', Buffer.alloc(0)],
  ] as const) {
    const e = entry(topic, payload.length);
    const want = JSON.stringify({ type: 'message', ...e, payload: payload.toString('base64') });
    const text = messageText(e, payload);
    t.equal(text, want, `topic of ${topic.length} characters, ${payload.length} B payload: same text`);
  }
  const big = entry('big', 70 * 1024);
  t.equal(messageText(big, Buffer.alloc(70 * 1024)), JSON.stringify({ type: 'message', ...big }), 'above INLINE_PAYLOAD_MAX: no payload field');
  const none = entry('t', 3);
  t.equal(messageText(none, undefined), JSON.stringify({ type: 'message', ...none }), 'no payload: no payload field');
});

t.test('messageText from the record meta the store wrote: the same text; a blob entry does not use it', async (t) => {
  const e = { seq: 9, id: 'gw-1-9', gateway_id: 'gw', device_id: 'd"1', topic: 'a/\u2028/b', qos: 1 as const, size: 5, sha256: 'cd'.repeat(32), received_at: 3, stored_at: 4, content_type: 'text/plain' };
  const payload = Buffer.from('hello');
  t.equal(messageText(e, payload, recordMeta(e)), messageText(e, payload), 'inline: same text with and without the meta');
  t.equal(messageText(e, payload, recordMeta(e)), JSON.stringify({ type: 'message', ...e, payload: payload.toString('base64') }));
  const blob = { ...e, size: 70 * 1024, payload_file: 'blobs/9.bin' };
  t.match(recordMeta(blob), /"blob"/, 'a blob entry\'s record meta names its file');
  t.equal(messageText(blob, undefined, recordMeta(blob)), JSON.stringify({ type: 'message', ...e, size: 70 * 1024 }), 'blob: the fields subscribers get, not the file');
});

t.test('subscribers: one that falls behind (its socket not read) queues while another is served at once; both get every message once, in order, also while it catches up', async (t) => {
  const dir = path.join(tempDir(t), 'store');
  const store = new CloudStore(dir, silentLogger(), { ringMessages: 16 });
  await store.open();
  const hub = new SubscriberHub(store, silentLogger());
  const wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
  await new Promise<void>((r) => wss.once('listening', () => r()));
  const port = (wss.address() as AddressInfo).port;
  wss.on('connection', (ws) => hub.attach(ws, ['#'], false, 'test'));
  t.teardown(async () => {
    hub.close();
    wss.close();
    await store.close();
  });
  const N = 240;
  const M = 200;
  const open = (): { ws: WebSocket; ids: string[]; until: (n: number) => Promise<void> } => {
    const ws = new WebSocket(`ws://127.0.0.1:${port}/`);
    t.teardown(() => ws.terminate());
    const ids: string[] = [];
    const waiters: (() => void)[] = [];
    ws.on('message', (d) => {
      const m = JSON.parse(d.toString()) as { id: string; payload: string; size: number };
      ids.push(Buffer.from(m.payload, 'base64').length === m.size ? m.id : `${m.id}: bad payload`);
      for (const w of waiters.splice(0)) w();
    });
    return {
      ws,
      ids,
      until: async (n) => {
        while (ids.length < n) await new Promise<void>((r) => waiters.push(r));
      },
    };
  };
  const commit = (i: number, size: number): Promise<unknown> => {
    const p = Buffer.alloc(size, i % 256);
    return store.commitData(`m-${i}`, 'gw', { device_id: 'd', topic: 'a/b', qos: 1, received_at: i }, p, sha256Hex(p));
  };
  const slow = open();
  const fast = open();
  await Promise.all([slow.ws, fast.ws].map((ws) => new Promise((r) => ws.once('open', r))));
  for (let i = 0; i < 100 && hub.size < 2; i++) await new Promise((r) => setImmediate(r));
  // the slow one stops reading: its TCP buffers fill, then ws buffers above the hub's high-water mark (4 MiB)
  const sock = (slow.ws as unknown as { _socket: { pause(): void; resume(): void } })._socket;
  sock.pause();
  for (let i = 0; i < N; i++) await commit(i, 60 * 1024);
  await fast.until(N);
  t.ok(slow.ids.length < N, `the paused one has ${slow.ids.length} of ${N} so far`);
  // it reads again; more messages are stored while it works through its queue
  sock.resume();
  for (let i = N; i < N + M; i++) await commit(i, 100);
  await Promise.all([fast.until(N + M), slow.until(N + M)]);
  const want = Array.from({ length: N + M }, (_, i) => `m-${i}`);
  t.same(fast.ids, want, 'the subscriber that keeps up: every message once, in order');
  t.same(slow.ids, want, 'the one that fell behind: every message once, in order (payloads beyond the ring read from disk)');
});
