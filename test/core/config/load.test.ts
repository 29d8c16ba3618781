import t from 'tap';
import { writeFileSync, chmodSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { stringify } from 'yaml';
import { loadConfig, parseConfigText, defaultConfigPath } from '../../../core/config/load.js';
import { ConfigError } from '../../../core/errors.js';
import { REPO, tempDir } from '../../helpers/daemon.js';

function problemsOf(fn: () => unknown): string[] {
  try {
    fn();
  } catch (err) {
    if (err instanceof ConfigError) return [...err.problems];
    throw err;
  }
  throw new Error('expected a ConfigError');
}

t.test('the bundled connector.yaml loads, with defaults filled and the result frozen', async (t) => {
  const { config } = loadConfig(path.join(REPO, 'connector.yaml'), { env: {} });
  t.equal(config.broker.listeners.tls.port, 8883);
  t.equal(config.broker.listeners.wss.port, 8884);
  t.equal(config.broker.listeners.wss.path, '/mqtt');
  t.equal(config.broker.listeners.tls.auth, 'cert|jwt');
  t.equal(config.broker.listeners.wss.auth, 'cert|jwt');
  t.equal(config.api.port, 8443);
  t.equal(config.daemon.state_dir, path.join(REPO, 'state'), 'relative paths resolve against the config file directory');
  t.equal(config.bridge.token.client_secret, `file:${path.join(REPO, 'state/cloud-client.secret')}`);
  t.ok(Object.isFrozen(config) && Object.isFrozen(config.broker.listeners.tls), 'deep frozen');
  t.throws(() => {
    (config.log as { level: string }).level = 'debug';
  });
});

t.test('an empty file gives every default', async (t) => {
  const { config } = parseConfigText('', '/x/connector.yaml', { env: {} });
  t.equal(config.log.level, 'info');
  t.equal(config.daemon.state_dir, '/var/lib/edge-connector');
  t.equal(config.broker.limits.max_payload_bytes, 16777216);
  t.equal(config.bridge.journal.fsync, 'batch');
});

t.test('missing config file: clear error naming the file and what to do', async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'nope.yaml');
  try {
    loadConfig(file, { env: {} });
    t.fail('should throw');
  } catch (err) {
    t.equal((err as ConfigError).code, 'ECONN_CONFIG_NOT_FOUND');
    t.match((err as Error).message, file);
    t.match((err as Error).message, /not found.*-c FILE/);
  }
});

t.test('YAML syntax error reports line and column', async (t) => {
  const p = problemsOf(() => parseConfigText('daemon:\n  state_dir: /tmp\n log: [\n', '/c.yaml', { env: {} }));
  t.ok(p.length >= 1);
  t.match(p[0], /^\/c\.yaml:\d+:\d+ YAML syntax error: /);
});

t.test('every schema error is reported at once with FILE:LINE:COL key.path', async (t) => {
  const text = [
    'daemon:',
    '  state_dir: 5', // line 2: wrong type
    '  shutdown_timout_ms: 10', // line 3: unknown key (typo)
    'broker:',
    '  listeners:',
    '    tls:',
    '      port: 70000', // line 7: out of range
    '      auth: password', // line 8: enum
    'log:',
    '  level: loud', // line 10: enum
    'bridge:',
    '  token:',
    '    client_secret: hunter2', // line 13: plain-text secret
    'bogus: 1', // line 14: unknown section
  ].join('\n');
  const p = problemsOf(() => parseConfigText(text, '/etc/c.yaml', { env: {} }));
  const find = (re: RegExp): string | undefined => p.find((l) => re.test(l));
  t.match(find(/daemon\.state_dir/), /^\/etc\/c\.yaml:2:\d+ daemon\.state_dir: must be string, got 5/);
  t.match(find(/shutdown_timout_ms/), /^\/etc\/c\.yaml:3:3 daemon\.shutdown_timout_ms: unknown key \(did you mean "shutdown_timeout_ms"\?\); allowed keys: /);
  t.match(find(/tls\.port/), /^\/etc\/c\.yaml:7:\d+ broker\.listeners\.tls\.port: out of range, got 70000; allowed: 0 to 65535/);
  t.match(find(/tls\.auth/), /^\/etc\/c\.yaml:8:\d+ broker\.listeners\.tls\.auth: not allowed, got "password"; allowed: "cert", "jwt", "cert\+jwt", "cert\|jwt"/);
  t.match(find(/log\.level/), /^\/etc\/c\.yaml:10:\d+ log\.level: not allowed/);
  t.match(find(/client_secret/), /^\/etc\/c\.yaml:13:\d+ bridge\.token\.client_secret: must be a secret reference env:NAME, file:\/path or credential:NAME/);
  t.notMatch(find(/client_secret/), /hunter2/, 'the plain-text secret is not echoed');
  t.match(find(/bogus/), /^\/etc\/c\.yaml:14:1 bogus: unknown key/);
  t.equal(p.length, 7, 'exactly the seven problems');
});

t.test('wrong types are named with what is allowed', async (t) => {
  const p = problemsOf(() => parseConfigText('broker:\n  limits:\n    max_connections: lots\n', '/c.yaml', { env: {} }));
  t.match(p[0], /broker\.limits\.max_connections: must be integer, got "lots"/);
});

t.test('a non-loopback local plain listener is refused', async (t) => {
  const p = problemsOf(() => parseConfigText('broker:\n  listeners:\n    local: {enabled: true, host: 0.0.0.0}\n', '/c.yaml', { env: {} }));
  t.match(p[0], /broker\.listeners\.local\.host: the plain MQTT listener may bind to loopback only, got "0\.0\.0\.0"/);
  t.doesNotThrow(() => parseConfigText('broker:\n  listeners:\n    local: {enabled: true, host: "::1"}\n', '/c.yaml', { env: {} }));
});

t.test('a ws:// uplink URL is a config error', async (t) => {
  const p = problemsOf(() => parseConfigText('bridge:\n  uplink:\n    url: ws://cloud.example/ingest\n', '/c.yaml', { env: {} }));
  t.match(p[0], /bridge\.uplink\.url: must match \^wss:\/\//);
});

t.test('two listeners on the same port are refused', async (t) => {
  const p = problemsOf(() => parseConfigText('api: {host: 0.0.0.0, port: 8883}\n', '/c.yaml', { env: {} }));
  t.match(p[0], /api\.port: 0\.0\.0\.0:8883 is already used by broker\.listeners\.tls/);
});

t.test('environment overrides CONNECTOR_<SECTION>_<KEY>', async (t) => {
  const env = {
    CONNECTOR_LOG_LEVEL: 'debug',
    CONNECTOR_BRIDGE_JOURNAL_MAX_BYTES: '2097152',
    CONNECTOR_BROKER_LISTENERS_TLS_PORT: '18883',
    CONNECTOR_BRIDGE_TOPICS: '[devices/+/telemetry/#]',
    CONNECTOR_CONFIG: '/ignored/for/overrides',
  };
  const { config } = parseConfigText('log: {level: warn}\n', '/c.yaml', { env });
  t.equal(config.log.level, 'debug', 'env beats the file');
  t.equal(config.bridge.journal.max_bytes, 2097152);
  t.equal(config.broker.listeners.tls.port, 18883);
  t.same(config.bridge.topics, ['devices/+/telemetry/#']);
});

t.test('bad environment overrides are errors naming the variable', async (t) => {
  const p = problemsOf(() => parseConfigText('', '/c.yaml', { env: { CONNECTOR_LOG_LEVL: 'x', CONNECTOR_METRICS_PORT: '99999' } }));
  t.ok(p.some((l) => /^env CONNECTOR_LOG_LEVL: no such configuration key/.test(l)));
  t.ok(p.some((l) => /^env CONNECTOR_METRICS_PORT metrics\.port: out of range, got 99999/.test(l)));
});

t.test('secret references', async (t) => {
  const dir = tempDir(t);
  const good = path.join(dir, 'good.secret');
  writeFileSync(good, 's3cret-value\n', { mode: 0o600 });
  const open = path.join(dir, 'open.secret');
  writeFileSync(open, 'leaky\n');
  chmodSync(open, 0o644);
  const yaml = (ref: string): string => stringify({ daemon: { state_dir: path.join(dir, 'state') }, bridge: { token: { client_secret: ref } } });

  t.doesNotThrow(() => parseConfigText(yaml(`file:${good}`), path.join(dir, 'c.yaml'), { env: {} }), 'file: with mode 0600');
  t.doesNotThrow(() => parseConfigText(yaml('file:good.secret'), path.join(dir, 'c.yaml'), { env: {} }), 'relative file: resolves against the config dir');

  const p = problemsOf(() => parseConfigText(yaml(`file:${open}`), path.join(dir, 'c.yaml'), { env: {} }));
  t.match(p[0], /bridge\.token\.client_secret: secret file:.*open\.secret: file .* is readable by group or others \(mode 0644\); run: chmod 600/);
  t.notMatch(p[0], /leaky/);

  const pe = problemsOf(() => parseConfigText(yaml('env:CLOUD_SECRET'), path.join(dir, 'c.yaml'), { env: {} }));
  t.match(pe[0], /environment variable CLOUD_SECRET is not set/);
  t.doesNotThrow(() => parseConfigText(yaml('env:CLOUD_SECRET'), path.join(dir, 'c.yaml'), { env: { CLOUD_SECRET: 'x' } }));

  const pc = problemsOf(() => parseConfigText(yaml('credential:cloud'), path.join(dir, 'c.yaml'), { env: {} }));
  t.match(pc[0], /\$CREDENTIALS_DIRECTORY is not set/);
  writeFileSync(path.join(dir, 'cloud'), 'cred\n', { mode: 0o600 });
  t.doesNotThrow(() => parseConfigText(yaml('credential:cloud'), path.join(dir, 'c.yaml'), { env: { CREDENTIALS_DIRECTORY: dir } }));

  const pm = problemsOf(() => parseConfigText(yaml(`file:${path.join(dir, 'missing')}`), path.join(dir, 'c.yaml'), { env: {} }));
  t.match(pm[0], /does not exist/);
  // inside the state directory a missing file is fine: `connector init` generates it
  t.doesNotThrow(() => parseConfigText(yaml('file:state/cloud.secret'), path.join(dir, 'c.yaml'), { env: {} }));
});

t.test('default config path: ./connector.yaml, else $CONNECTOR_CONFIG, else /etc', async (t) => {
  const dir = tempDir(t);
  t.equal(defaultConfigPath({}, dir), '/etc/edge-connector/connector.yaml');
  t.equal(defaultConfigPath({ CONNECTOR_CONFIG: 'x.yaml' }, dir), path.join(dir, 'x.yaml'));
  writeFileSync(path.join(dir, 'connector.yaml'), readFileSync(path.join(REPO, 'connector.yaml')));
  t.equal(defaultConfigPath({ CONNECTOR_CONFIG: 'x.yaml' }, dir), path.join(dir, 'connector.yaml'));
});

t.test('a recursive YAML alias (&a [*a]) is a ConfigError with its place, not a TypeError', async (t) => {
  for (const text of ['daemon:\n  state_dir: &a [*a]\n', 'log: &a\n  level: *a\n', 'broker: &b\n  limits:\n    x: [1, *b]\n']) {
    const p = problemsOf(() => parseConfigText(text, '/c.yaml', { env: {} }));
    t.equal(p.length, 1, JSON.stringify(text));
    t.match(p[0], /^\/c\.yaml:\d+:\d+ YAML alias \*[ab] refers to its own anchor/);
  }
  // a plain, non-recursive alias is still fine
  const { config } = parseConfigText('log: &l\n  level: debug\n', '/c.yaml', { env: {} });
  t.equal(config.log.level, 'debug');
});

t.test('an alias explosion (billion laughs) is a ConfigError', async (t) => {
  const lines = ['a0: &a0 [x, x, x, x, x, x, x, x, x, x]'];
  for (let i = 1; i < 12; i++) lines.push(`a${i}: &a${i} [${Array(10).fill(`*a${i - 1}`).join(', ')}]`);
  const p = problemsOf(() => parseConfigText(lines.join('\n') + '\n', '/c.yaml', { env: {} }));
  t.match(p.join('\n'), /^\/c\.yaml:\d+:\d+ YAML/);
});
