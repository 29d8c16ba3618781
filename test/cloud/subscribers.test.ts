import t from 'tap';
import { topicMatches, filterError } from '../../cloud/subscribers.js';

t.test('MQTT topic filter matching', async (t) => {
  const cases: [string, string, boolean][] = [
    ['#', 'devices/a/t', true],
    ['devices/#', 'devices', true],
    ['devices/#', 'devices/a/b/c', true],
    ['devices/+/telemetry', 'devices/a/telemetry', true],
    ['devices/+/telemetry', 'devices/a/status', false],
    ['devices/+/telemetry', 'devices/a/telemetry/x', false],
    ['devices/+', 'devices/a/b', false],
    ['devices/a', 'devices/a', true],
    ['devices/a', 'devices/ab', false],
    ['+/+', 'a/', true],
    ['#', '$SYS/x', false],
    ['+/x', '$SYS/x', false],
    ['$SYS/#', '$SYS/x', true],
  ];
  for (const [f, topic, want] of cases) t.equal(topicMatches(f, topic), want, `${f} ${want ? 'matches' : 'does not match'} ${topic}`);
});

t.test('filter validation', async (t) => {
  for (const ok of ['#', 'a/+/b', 'a/#', '+', 'a/b']) t.equal(filterError(ok), undefined, `${ok} is valid`);
  for (const bad of ['', 'a/#/b', 'a#', 'a/b+', '+a', 'x'.repeat(5000), 'a\u0000b']) t.type(filterError(bad), 'string', `${JSON.stringify(bad.slice(0, 10))} is invalid`);
});
