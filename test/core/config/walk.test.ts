import t from 'tap';
import { parseConfigText } from '../../../core/config/load.js';
import { deepFreeze, matchSchemaPath, rootSchema, schemaEntries, valueAt, walkConfig, type SchemaNode } from '../../../core/config/walk.js';
import { mergeRestartKeys } from '../../../daemon/main.js';
import type { Config } from '../../../core/config/schema.js';

const load = (yaml: string): Config => parseConfigText(yaml, '/etc/ec/connector.yaml', { env: {}, checkSecrets: false }).config;

t.test('schemaEntries: every key in declaration order, each section before its keys', async (t) => {
  const dotted = [...schemaEntries()].map((e) => e.dotted);
  t.equal(new Set(dotted).size, dotted.length, 'no key twice');
  t.equal(dotted[0], Object.keys(rootSchema.properties!)[0], 'starts with the first section');
  for (const d of dotted) {
    const parent = d.split('.').slice(0, -1).join('.');
    if (parent) t.ok(dotted.indexOf(parent) >= 0 && dotted.indexOf(parent) < dotted.indexOf(d), `${parent} comes before ${d}`);
  }
  const byKey = new Map([...schemaEntries()].map((e) => [e.dotted, e]));
  t.equal(byKey.get('bridge.uplink')?.section, true);
  t.equal(byKey.get('bridge.uplink.url')?.section, false);
  t.equal(byKey.get('broker.listeners.tls.port')?.node['x-restart'], true);
  t.equal(byKey.get('broker.acl.groups')?.section, false, 'a map of named groups (patternProperties) is a leaf');
});

t.test('schemaEntries on a small schema', async (t) => {
  const s: SchemaNode = { type: 'object', properties: { a: { type: 'object', properties: { b: { type: 'integer' }, c_d: { type: 'string' } } }, e: { type: 'object' } } };
  t.same(
    [...schemaEntries(s)].map((e) => [e.dotted, e.section]),
    [
      ['a', true],
      ['a.b', false],
      ['a.c_d', false],
      ['e', false],
    ],
  );
});

t.test('walkConfig visits every key whose holder exists and may replace values', async (t) => {
  const s: SchemaNode = { type: 'object', properties: { a: { type: 'object', properties: { b: { type: 'integer' } } }, x: { type: 'object', properties: { y: { type: 'string' } } } } };
  const data: Record<string, unknown> = { a: { b: 1 }, x: 'not a mapping' };
  const seen: string[] = [];
  walkConfig(
    data,
    (e, holder, key) => {
      seen.push(e.dotted);
      if (e.dotted === 'a.b') holder[key] = 2;
    },
    s,
  );
  t.same(seen, ['a', 'a.b', 'x'], 'does not descend where the data holds no mapping');
  t.same(data, { a: { b: 2 }, x: 'not a mapping' });
});

t.test('matchSchemaPath: env variable tokens to a key path (keys may hold underscores)', async (t) => {
  t.same(matchSchemaPath(['log', 'level']), ['log', 'level']);
  t.same(matchSchemaPath('bridge_journal_max_bytes'.split('_')), ['bridge', 'journal', 'max_bytes']);
  t.same(matchSchemaPath('broker_listeners_tls_port'.split('_')), ['broker', 'listeners', 'tls', 'port']);
  t.same(matchSchemaPath(['bridge', 'uplink']), ['bridge', 'uplink'], 'a section is named too');
  t.equal(matchSchemaPath(['log', 'nope']), undefined);
  t.equal(matchSchemaPath(['']), undefined);
  const s: SchemaNode = { type: 'object', properties: { a_b: { type: 'object', properties: { c: {} } }, a: { type: 'object', properties: { b_c: {} } } } };
  t.same(matchSchemaPath(['a', 'b', 'c'], s), ['a_b', 'c'], 'the longer key wins, as the loader always did');
});

t.test('valueAt and deepFreeze', async (t) => {
  const o = deepFreeze({ a: { b: [1, { c: 2 }] } });
  t.equal(valueAt(o, ['a', 'b']), o.a.b);
  t.equal(valueAt(o, ['a', 'x', 'y']), undefined);
  t.ok(Object.isFrozen(o.a.b[1]));
});

t.test('mergeRestartKeys keeps x-restart keys, applies the rest, freezes the result', async (t) => {
  const running = load('broker: {listeners: {tls: {port: 8883}}}\nlog: {level: info}\n');
  const next = load('broker: {listeners: {tls: {port: 9999}, wss: {path: /other}}}\nlog: {level: debug}\nbridge: {uplink: {heartbeat_ms: 7000}}\n');
  const { merged, needsRestart } = mergeRestartKeys(running, next);
  t.same(needsRestart, ['broker.listeners.tls.port (8883 → 9999)', 'broker.listeners.wss.path ("/mqtt" → "/other")']);
  t.equal(merged.broker.listeners.tls.port, 8883, 'kept');
  t.equal(merged.broker.listeners.wss.path, '/mqtt', 'kept');
  t.equal(merged.log.level, 'debug', 'applied');
  t.equal(merged.bridge.uplink.heartbeat_ms, 7000, 'applied');
  t.ok(Object.isFrozen(merged) && Object.isFrozen(merged.broker.listeners.tls), 'frozen');
  t.equal(next.broker.listeners.tls.port, 9999, 'the new config is not changed');
  t.same(mergeRestartKeys(running, running).needsRestart, [], 'nothing to keep when nothing changed');
});
