import t from 'tap';
import { compileFilter, topicMatches } from '../../core/topic.js';

// MQTT 3.1.1 section 4.7: the cases the ACL and the reference cloud's subscribers were tested with
const cases: [string, string, boolean][] = [
  ['a/b', 'a/b', true],
  ['a/b', 'a/c', false],
  ['a/+', 'a/b', true],
  ['a/+', 'a/b/c', false],
  ['a/+', 'a', false],
  ['a/+', 'a/', true], // empty level
  ['a/#', 'a', true], // # matches the parent
  ['a/#', 'a/b/c', true],
  ['#', 'a/b', true],
  ['#', '$SYS/x', false], // MQTT-4.7.2-1
  ['+/x', '$SYS/x', false],
  ['$SYS/#', '$SYS/x', true],
  ['+/+', '/x', true],
  ['+/+', 'a/', true],
  ['a/b/c', 'a/b', false],
  ['a/b', 'a/b/c', false],
  ['+', 'a', true],
  ['+', 'a/b', false],
  ['devices/#', 'devices', true],
  ['devices/+/telemetry', 'devices/a/telemetry', true],
  ['devices/+/telemetry', 'devices/a/status', false],
  ['devices/+/telemetry', 'devices/a/telemetry/x', false],
  ['devices/a', 'devices/ab', false],
];

t.test('topicMatches follows MQTT 3.1.1 4.7', async (t) => {
  for (const [f, topic, want] of cases) t.equal(topicMatches(f, topic), want, `${f} ~ ${topic}`);
});

t.test('compileFilter: the filter split once, the same answers; one matcher serves many topics', async (t) => {
  for (const [f, topic, want] of cases) t.equal(compileFilter(f)(topic), want, `${f} ~ ${topic}`);
  const m = compileFilter('devices/+/telemetry');
  t.same(['devices/a/telemetry', 'devices/b/telemetry', 'devices/a/status', '$x/a/telemetry'].map(m), [true, true, false, false]);
  const all = compileFilter('#');
  t.same(['a', 'a/b', '/', '$SYS/x'].map(all), [true, true, true, false], '"#" matches everything but $ topics');
});
