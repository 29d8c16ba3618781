import t from 'tap';
import path from 'node:path';
import { parseCloudConfig, defaultCloudConfig, loadCloudConfig } from '../../cloud/config.js';

t.test('defaults without a file point at the bundled connector.yaml', async (t) => {
  const c = defaultCloudConfig('/srv/x');
  t.same(c.listen, { host: '127.0.0.1', port: 9443 });
  t.equal(c.store_dir, '/srv/x/cloud-data');
  t.same(c.clients, [{ id: 'edge-connector', secret: 'file:/srv/x/state/cloud-client.secret', grants: ['client_credentials', 'password', 'refresh_token'], scopes: ['ingest', 'subscribe', 'commands'], gateway_ids: [] }]);
  t.equal(c.token_ttl_s, 300);
  t.equal(c.signing_secret, undefined);
});

t.test('a file: relative paths resolved against its directory, defaults filled', async (t) => {
  const c = parseCloudConfig('store_dir: data\nclients:\n  - id: a\n    secret: file:./a.secret\n    grants: [client_credentials]\nsigning_secret: env:SIGN\n', '/etc/cloud/cloud.yaml');
  t.equal(c.store_dir, '/etc/cloud/data');
  t.equal(c.clients[0]!.secret, 'file:/etc/cloud/a.secret');
  t.same(c.clients[0]!.scopes, ['ingest', 'subscribe', 'commands']);
  t.equal(c.signing_secret, 'env:SIGN');
  t.equal(c.listen.port, 9443);
});

t.test('every problem is listed with its line; unknown keys and plain secrets are errors', async (t) => {
  const text = 'listen:\n  port: 70000\n  hots: x\nclients:\n  - id: a\n    secret: plaintext\ntoken_ttl_s: 0\nbogus: 1\n';
  try {
    parseCloudConfig(text, '/c.yaml');
    t.fail('should throw');
  } catch (err) {
    const e = err as { code: string; problems: string[] };
    t.equal(e.code, 'ECONN_CONFIG_INVALID');
    const all = e.problems.join('\n');
    t.match(all, /\/c\.yaml:2:\d+ listen\.port/);
    t.match(all, /\/c\.yaml:3:\d+ listen\.hots: unknown key/);
    t.match(all, /clients\[0\]\.secret: must be a secret reference/);
    t.match(all, /token_ttl_s/);
    t.match(all, /\/c\.yaml:8:1 bogus: unknown key/);
    t.notMatch(all, /plaintext/, 'the secret value is not echoed');
  }
  t.throws(() => parseCloudConfig('clients:\n  - {id: a, secret: env:A}\n  - {id: a, secret: env:B}\n', '/c.yaml'), { code: 'ECONN_CONFIG_INVALID', message: /duplicate client id/ });
  t.throws(() => parseCloudConfig('tls: {cert_file: a.pem}\n', '/c.yaml'), { message: /go together/ });
  t.throws(() => parseCloudConfig('a: [\n', '/c.yaml'), { code: 'ECONN_CONFIG_INVALID', message: /YAML syntax/ });
  t.throws(() => loadCloudConfig(path.join('/nonexistent', 'cloud.yaml')), { code: 'ECONN_CONFIG_NOT_FOUND' });
});
