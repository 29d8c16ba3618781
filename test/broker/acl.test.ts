import t from 'tap';
import {
  authorizeDelivery,
  authorizePublish,
  authorizeSubscribe,
  checkTopicLimits,
  couldReachOtherDevice,
  deviceOfTopic,
  deviceRules,
  expandRules,
  filterCovers,
  isBridgedTopic,
  isCommandTopic,
  isValidTopicFilter,
  isValidTopicName,
  type AclRule,
  type Principal,
} from '../../broker/acl.js';

const limits = { maxDepth: 16, maxBytes: 1024 };
const dev = (id: string, rules: AclRule[] = []): Principal => ({
  kind: 'device',
  deviceId: id,
  rules,
});
const A = dev('A');

t.test('filterCovers: every topic of inner is matched by outer', async (t) => {
  const cases: [string, string, boolean][] = [
    ['devices/A/#', 'devices/A/#', true],
    ['devices/A/#', 'devices/A', true],
    ['devices/A/#', 'devices/A/x/+', true],
    ['devices/A/#', 'devices/A/commands/#', true],
    ['devices/A/#', 'devices/+/x', false],
    ['devices/A/#', 'devices/#', false],
    ['devices/A/#', '#', false],
    ['devices/A/#', '+/A/x', false],
    ['a/+/c', 'a/b/c', true],
    ['a/+/c', 'a/+/c', true],
    ['a/b/c', 'a/+/c', false],
    ['a/+', 'a/#', false],
    ['a/+', 'a', false],
    ['a/#', 'a/b/#', true],
    ['#', 'anything/at/all', true],
    ['#', '$SYS/x', false],
    ['+/x', '$SYS/x', false],
    ['a/b', 'a/b/c', false],
    ['a/b/c', 'a/b', false],
  ];
  for (const [o, i, want] of cases) t.equal(filterCovers(o, i), want, `${o} covers ${i}`);
});

t.test('couldReachOtherDevice', async (t) => {
  const cases: [string, boolean][] = [
    ['#', true],
    ['devices/#', true],
    ['devices/+', true],
    ['devices/+/x', true],
    ['+/+/x', true],
    ['+/#', true],
    ['devices/B/x', true],
    ['+/B/x', true],
    ['devices/A/#', false],
    ['devices/A', false],
    ['+/A/x', false],
    ['devices', false],
    ['+', false],
    ['other/#', false],
    ['x/+/y', false],
  ];
  for (const [f, want] of cases) t.equal(couldReachOtherDevice(f, 'A'), want, f);
});

t.test('topic name and filter validation', async (t) => {
  t.ok(isValidTopicName('a/b'));
  t.ok(isValidTopicName('/'));
  t.notOk(isValidTopicName(''));
  t.notOk(isValidTopicName('a/+'));
  t.notOk(isValidTopicName('a/#'));
  t.notOk(isValidTopicName('a\u0000b'));
  t.ok(isValidTopicFilter('a/+/b/#'));
  t.ok(isValidTopicFilter('#'));
  t.ok(isValidTopicFilter('+'));
  t.notOk(isValidTopicFilter(''));
  t.notOk(isValidTopicFilter('a/#/b'));
  t.notOk(isValidTopicFilter('a/b#'));
  t.notOk(isValidTopicFilter('a/b+/c'));
  t.notOk(isValidTopicFilter('a\u0000'));
});

t.test('topic limits: depth and bytes', async (t) => {
  t.ok(checkTopicLimits('a/b/c', { maxDepth: 3, maxBytes: 5 }).ok);
  t.notOk(checkTopicLimits('a/b/c/d', { maxDepth: 3, maxBytes: 100 }).ok);
  t.notOk(checkTopicLimits('abcdef', { maxDepth: 3, maxBytes: 5 }).ok);
  t.notOk(checkTopicLimits('ééé', { maxDepth: 3, maxBytes: 5 }).ok, 'bytes, not characters');
  const d = checkTopicLimits('a/b/c/d', { maxDepth: 3, maxBytes: 100 });
  t.match(!d.ok && d.reason, /max_topic_depth/);
  t.notOk(authorizePublish(A, 'devices/A/' + 'x/'.repeat(20) + 'y', limits).ok, 'publish refused past max depth');
  t.notOk(authorizeSubscribe(A, 'devices/A/' + 'x'.repeat(2000), limits).ok, 'subscribe refused past max bytes');
});

t.test('device publish', async (t) => {
  const allowed = ['devices/A/telemetry', 'devices/A/x/y/z', 'devices/A/status', 'devices/A/', 'devices/A/commandsx', 'devices/A/x/commands'];
  const refused = [
    'devices/B/telemetry', // another device
    'devices/AB/telemetry',
    'devices//telemetry',
    'devices/A', // not under the namespace
    'devices',
    'devices/A/commands', // own commands
    'devices/A/commands/reboot',
    'devices/B/commands/reboot',
    'other/topic',
    '$SYS/x',
    'devices/A/+', // wildcard in a topic name
    'devices/A/#',
    '',
  ];
  for (const topic of allowed) t.ok(authorizePublish(A, topic, limits).ok, `allowed: ${topic}`);
  for (const topic of refused) t.notOk(authorizePublish(A, topic, limits).ok, `refused: ${JSON.stringify(topic)}`);
});

t.test('device subscribe', async (t) => {
  const allowed = ['devices/A/#', 'devices/A/commands/#', 'devices/A/commands/+', 'devices/A/+/x', 'devices/A/telemetry', 'devices/A'];
  const refused = [
    '#',
    '+',
    '+/#',
    'devices/#',
    'devices/+',
    'devices/+/x',
    'devices/+/commands/#',
    '+/A/x',
    '+/+/x',
    'devices/B/#',
    'devices/B/commands/#',
    '$SYS/#',
    '$SYS/broker/uptime',
    'other/#',
    'devices/A/#/x',
    '',
  ];
  for (const f of allowed) t.ok(authorizeSubscribe(A, f, limits).ok, `allowed: ${f}`);
  for (const f of refused) t.notOk(authorizeSubscribe(A, f, limits).ok, `refused: ${JSON.stringify(f)}`);
});

t.test('delivery guard (authorizeForward)', async (t) => {
  t.ok(authorizeDelivery(A, 'devices/A/commands/reboot'));
  t.ok(authorizeDelivery(A, 'devices/A/x'));
  t.notOk(authorizeDelivery(A, 'devices/B/x'));
  t.notOk(authorizeDelivery(A, 'devices/B/commands/reboot'));
  t.notOk(authorizeDelivery(A, '$SYS/abc/new/clients'));
  t.notOk(authorizeDelivery(A, 'broadcast/all'));
  const withRules = dev('A', [{ allow: 'subscribe', topic: 'broadcast/#' }]);
  t.ok(authorizeDelivery(withRules, 'broadcast/all'));
  t.notOk(authorizeDelivery(withRules, 'devices/B/x'), 'rules never open other devices');
});

t.test('group rules with {device}', async (t) => {
  const groups = {
    cams: [
      { allow: 'publish' as const, topic: 'site/{device}/alarm' },
      { allow: 'subscribe' as const, topic: 'broadcast/#' },
      { allow: 'both' as const, topic: 'shared/{device}/+' },
      { allow: 'both' as const, topic: 'devices/+/x' }, // cannot lift the hard limits
      { allow: 'publish' as const, topic: 'devices/{device}/commands/ack' },
    ],
  };
  t.same(deviceRules(groups, undefined, 'A'), []);
  t.same(deviceRules(groups, 'nope', 'A'), []);
  t.same(deviceRules(groups, 'constructor', 'A'), [], 'no prototype keys');
  const p = dev('A', deviceRules(groups, 'cams', 'A'));
  t.ok(authorizePublish(p, 'site/A/alarm', limits).ok);
  t.notOk(authorizePublish(p, 'site/B/alarm', limits).ok);
  t.notOk(authorizeSubscribe(p, 'site/A/alarm', limits).ok, 'publish-only rule');
  t.ok(authorizeSubscribe(p, 'broadcast/#', limits).ok);
  t.ok(authorizeSubscribe(p, 'broadcast/news', limits).ok);
  t.notOk(authorizePublish(p, 'broadcast/news', limits).ok, 'subscribe-only rule');
  t.ok(authorizePublish(p, 'shared/A/x', limits).ok);
  t.ok(authorizeSubscribe(p, 'shared/A/+', limits).ok);
  t.notOk(authorizeSubscribe(p, 'shared/A/#', limits).ok, 'wider than the rule');
  t.notOk(authorizeSubscribe(p, 'shared/+/x', limits).ok);
  t.notOk(authorizeSubscribe(p, 'devices/+/x', limits).ok, 'a rule cannot open other devices');
  t.notOk(authorizePublish(p, 'devices/B/x', limits).ok);
  t.notOk(authorizePublish(p, 'devices/A/commands/ack', limits).ok, 'a rule cannot open the commands topic');
  t.same(expandRules([{ allow: 'both', topic: 'a/{device}/{device}' }], 'D'), [{ allow: 'both', topic: 'a/D/D' }]);
  t.same(expandRules([{ allow: 'both', topic: 'a/{device}' }, { allow: 'both', topic: 'b' }], undefined), [{ allow: 'both', topic: 'b' }]);
});

t.test('local anonymous principal', async (t) => {
  const open: Principal = { kind: 'local', rules: null };
  t.ok(authorizePublish(open, 'anything/at/all', limits).ok);
  t.ok(authorizePublish(open, 'devices/A/commands/x', limits).ok, 'everything allowed when no rules are given');
  t.notOk(authorizePublish(open, '$SYS/x', limits).ok, '$-topics are never published to');
  t.ok(authorizeSubscribe(open, '#', limits).ok);
  t.ok(authorizeDelivery(open, 'devices/B/x'));
  t.notOk(authorizeSubscribe(open, 'a/#/b', limits).ok, 'still validated');
  const ruled: Principal = { kind: 'local', rules: [{ allow: 'subscribe', topic: 'devices/+/telemetry' }, { allow: 'publish', topic: 'apps/me/#' }] };
  t.ok(authorizeSubscribe(ruled, 'devices/+/telemetry', limits).ok);
  t.ok(authorizeSubscribe(ruled, 'devices/A/telemetry', limits).ok);
  t.notOk(authorizeSubscribe(ruled, 'devices/#', limits).ok);
  t.ok(authorizePublish(ruled, 'apps/me/x', limits).ok);
  t.notOk(authorizePublish(ruled, 'devices/A/commands/x', limits).ok);
  t.ok(authorizeDelivery(ruled, 'devices/A/telemetry'));
  t.notOk(authorizeDelivery(ruled, 'devices/A/other'));
  const none: Principal = { kind: 'local', rules: [] };
  t.notOk(authorizePublish(none, 'a', limits).ok, 'an empty rule list allows nothing');
});

t.test('bridge topics and helpers', async (t) => {
  t.ok(isBridgedTopic('devices/A/telemetry', ['devices/+/#']));
  t.notOk(isBridgedTopic('devices/A/commands/x', ['devices/+/#']), 'never a command topic');
  t.notOk(isBridgedTopic('other/x', ['devices/+/#']));
  t.ok(isBridgedTopic('site/A/alarm', ['devices/+/#', 'site/#']));
  t.ok(isCommandTopic('devices/A/commands'));
  t.ok(isCommandTopic('devices/A/commands/x', 'A'));
  t.notOk(isCommandTopic('devices/A/commands/x', 'B'));
  t.notOk(isCommandTopic('devices/A/telemetry'));
  t.equal(deviceOfTopic('devices/A/x'), 'A');
  t.equal(deviceOfTopic('other/A/x'), undefined);
});
