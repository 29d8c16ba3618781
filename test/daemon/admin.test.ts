import t from 'tap';
import net from 'node:net';
import path from 'node:path';
import { statSync, writeFileSync } from 'node:fs';
import { AdminServer, adminRequest } from '../../daemon/admin.js';
import { ConnectorError } from '../../core/errors.js';
import { silentLogger } from '../../core/logger.js';
import { tempDir } from '../helpers/daemon.js';

function raw(sock: string, data: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const c = net.connect(sock);
    let buf = '';
    c.setEncoding('utf8');
    c.on('connect', () => c.write(data));
    c.on('data', (d: string) => {
      buf += d;
      if (buf.includes('\n')) {
        c.end();
        resolve(buf);
      }
    });
    c.on('error', reject);
    c.on('close', () => resolve(buf));
  });
}

async function server(t: { teardown(fn: () => unknown): void }): Promise<{ admin: AdminServer; sock: string }> {
  const sock = path.join(tempDir(t), 'admin.sock');
  const admin = new AdminServer(sock, silentLogger());
  admin.register('echo', (p) => p);
  admin.register('fail', () => {
    throw new ConnectorError('ECONN_DEVICE_UNKNOWN', 'no device "x"');
  });
  admin.register('boom', () => {
    throw new Error('secret internals');
  });
  await admin.start();
  t.teardown(() => admin.close());
  return { admin, sock };
}

t.test('request/response, mode 0600, errors carry codes, internals are hidden', async (t) => {
  const { sock } = await server(t);
  t.equal(statSync(sock).mode & 0o777, 0o600);
  t.same(await adminRequest(sock, 'echo', { a: 1 }), { a: 1 });
  await t.rejects(adminRequest(sock, 'fail'), { code: 'ECONN_DEVICE_UNKNOWN', message: 'no device "x"' });
  await t.rejects(adminRequest(sock, 'boom'), { code: 'ECONN_INTERNAL', message: /internal error/ });
  await t.rejects(adminRequest(sock, 'nope'), { code: 'ECONN_BAD_REQUEST', message: /unknown method "nope"; known: boom, echo, fail/ });
});

t.test('malformed requests get a JSON error and the server stays up', async (t) => {
  const { sock } = await server(t);
  t.match(JSON.parse(await raw(sock, 'not json\n')), { id: null, error: { code: 'ECONN_BAD_REQUEST' } });
  t.match(JSON.parse(await raw(sock, '{"id":7}\n')), { id: 7, error: { code: 'ECONN_BAD_REQUEST', message: /method must be a string/ } });
  t.match(JSON.parse(await raw(sock, 'x'.repeat(1024 * 1024 + 10))), { error: { code: 'ECONN_BAD_REQUEST', message: 'request too large' } });
  t.same(await adminRequest(sock, 'echo', { still: 'up' }), { still: 'up' });
});

t.test('a stale socket file is replaced; a live one refuses a second server; close is idempotent', async (t) => {
  const dir = tempDir(t);
  const sock = path.join(dir, 'admin.sock');
  writeFileSync(sock, '');
  const a = new AdminServer(sock, silentLogger());
  await a.start();
  t.teardown(() => a.close());
  const b = new AdminServer(sock, silentLogger());
  await t.rejects(b.start(), { code: 'ECONN_LISTEN', message: /is in use/ });
  await a.close();
  await a.close();
});

t.test('the client explains a daemon that is not running', async (t) => {
  const sock = path.join(tempDir(t), 'none.sock');
  await t.rejects(adminRequest(sock, 'status'), { code: 'ECONN_ADMIN', message: /the daemon is not running/ });
});
