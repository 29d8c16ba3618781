import t from 'tap';
import { spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { brokerFixture, waitFor } from '../helpers/broker.js';
import { nativeUnmask } from '../../broker/listeners.js';

const REPO = path.join(path.dirname(fileURLToPath(import.meta.url)), '../..');

/** bufferutil as this test's own require finds it (an optional dependency: npm ci installs it where it has a build). */
function bufferutilLoads(): boolean {
  try {
    createRequire(import.meta.url)('bufferutil');
    return true;
  } catch {
    return false;
  }
}

t.test('MQTT/WSS: status says whether device frames are unmasked by the native helper, and a masked 1 MiB publish arrives intact', async (t) => {
  const fx = await brokerFixture(t);
  const a = await fx.addDevice('dev-a');
  const st = fx.broker.status() as { listeners: Record<string, { native_unmask?: boolean }> };
  t.equal(st.listeners.wss!.native_unmask, bufferutilLoads(), 'listeners.wss.native_unmask: what loading bufferutil says');
  t.equal(st.listeners.tls!.native_unmask, undefined, 'only the WebSocket listener has it');
  t.equal(fx.logs.find({ listener: 'wss', native_unmask: false }).length, st.listeners.wss!.native_unmask ? 0 : 1, 'an info line only without it');

  const c = await fx.connect({ listener: 'wss', clientId: a.id, cert: a.cert, key: a.key });
  const got: Buffer[] = [];
  c.on('message', (_topic, payload) => got.push(payload));
  await c.subscribeAsync('devices/dev-a/frame', { qos: 1 });
  // mqtt.js masks every frame it sends with a random key (RFC 6455 requires it of a client)
  const payload = randomBytes(1024 * 1024);
  await c.publishAsync('devices/dev-a/frame', payload, { qos: 1 });
  await waitFor(() => got.length === 1, 10_000, 'the 1 MiB publish back to its subscriber');
  t.equal(createHash('sha256').update(got[0]!).digest('hex'), createHash('sha256').update(payload).digest('hex'), 'unmasked byte for byte');
  await c.endAsync();
});

t.test('MQTT/WSS without the native helper: one info line says so and how to add it; status says false', async (t) => {
  // read at start(), as ws reads it at load: ws in this process keeps the helper it loaded, only the report changes
  const before = process.env.WS_NO_BUFFER_UTIL;
  process.env.WS_NO_BUFFER_UTIL = '1';
  t.teardown(() => {
    if (before === undefined) delete process.env.WS_NO_BUFFER_UTIL;
    else process.env.WS_NO_BUFFER_UTIL = before;
  });
  const fx = await brokerFixture(t);
  const st = fx.broker.status() as { listeners: Record<string, { native_unmask?: boolean }> };
  t.equal(st.listeners.wss!.native_unmask, false);
  const lines = fx.logs.find({ listener: 'wss', native_unmask: false });
  t.equal(lines.length, 1, 'one line');
  t.match(String(lines[0]?.msg), /unmasked in JavaScript.*npm install bufferutil/, 'what it costs and how to add it');
  t.equal(lines[0]?.level, 'info', 'at info: an optional helper, not a fault');
});

t.test('nativeUnmask follows ws: WS_NO_BUFFER_UTIL turns the native helper off', async (t) => {
  const mod = pathToFileURL(path.join(REPO, 'dist/broker/listeners.js')).href;
  const run = (env: NodeJS.ProcessEnv): string => {
    const r = spawnSync(process.execPath, ['--input-type=module', '-e', `import { nativeUnmask } from ${JSON.stringify(mod)}; console.log(nativeUnmask());`], {
      encoding: 'utf8',
      env: { ...env, NODE_OPTIONS: '' },
      timeout: 20_000,
    });
    t.equal(r.status, 0, r.stderr);
    return r.stdout.trim();
  };
  const { WS_NO_BUFFER_UTIL: _, ...clean } = process.env;
  t.equal(run({ ...clean, WS_NO_BUFFER_UTIL: '1' }), 'false', 'off when WS_NO_BUFFER_UTIL is set');
  t.equal(run(clean), String(bufferutilLoads()), 'otherwise: whether bufferutil loads');
  t.equal(nativeUnmask(), process.env.WS_NO_BUFFER_UTIL ? false : bufferutilLoads(), 'the same in this process');
});
