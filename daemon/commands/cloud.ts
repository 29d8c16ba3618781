/** `connector cloud`, `connector cloud tail`, `connector cloud command`: the reference cloud endpoint and its small clients. */
import https from 'node:https';
import { mkdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { WebSocket } from 'ws';
import { createLogger } from '../../core/logger.js';
import { ensureSecretFile, resolveSecret } from '../../core/secrets.js';
import { ConnectorError, EXIT, errorCode } from '../../core/errors.js';
import { explain, exitCodeFor } from '../explain.js';
import { defaultCloudConfig, loadCloudConfig, type CloudConfig, type Scope } from '../../cloud/config.js';
import { CONFIG_OPTION, type Command, type Options, type Values } from './types.js';

const CLIENT_OPTIONS: Options = {
  ...CONFIG_OPTION,
  url: { type: 'string' },
  ca: { type: 'string' },
  'client-id': { type: 'string' },
  secret: { type: 'string' },
};

const CLIENT_USAGE = `  --url URL         the cloud (default https://127.0.0.1:9443, or the listen address of -c FILE)
  --ca FILE         CA to trust (default ./cloud-data/tls/ca.crt, or STORE_DIR/tls/ca.crt of -c FILE)
  --client-id ID    OAuth2 client (default edge-connector, or the first client of -c FILE)
  --secret REF      its secret as env:NAME / file:PATH / credential:NAME (default file:./state/cloud-client.secret)
  -c FILE           read the defaults above from a cloud.yaml`;

interface ClientTarget {
  url: URL;
  ca?: string;
  clientId: string;
  secretRef: string;
}

function target(values: Values, scope: Scope): ClientTarget {
  let url = 'https://127.0.0.1:9443';
  let caFile = path.resolve('cloud-data', 'tls', 'ca.crt');
  let clientId = 'edge-connector';
  let secretRef = `file:${path.resolve('state', 'cloud-client.secret')}`;
  if (typeof values.config === 'string') {
    const cfg = loadCloudConfig(values.config);
    const host = cfg.listen.host === '0.0.0.0' || cfg.listen.host === '::' ? '127.0.0.1' : cfg.listen.host;
    url = `https://${host.includes(':') ? `[${host}]` : host}:${cfg.listen.port}`;
    caFile = path.join(cfg.store_dir, 'tls', 'ca.crt');
    const c = cfg.clients.find((k) => k.scopes.includes(scope) && k.grants.includes('client_credentials'));
    if (c) {
      clientId = c.id;
      secretRef = c.secret;
    }
  }
  if (typeof values.url === 'string') url = values.url;
  if (typeof values.ca === 'string') caFile = path.resolve(values.ca);
  if (typeof values['client-id'] === 'string') clientId = values['client-id'];
  if (typeof values.secret === 'string') secretRef = values.secret;
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    throw new ConnectorError('ECONN_USAGE', `--url ${url}: not a URL`);
  }
  if (parsed.protocol !== 'https:') throw new ConnectorError('ECONN_USAGE', '--url must be https://');
  let ca: string | undefined;
  try {
    ca = readFileSync(caFile, 'utf8');
  } catch {
    // no CA file: the system store must trust the cloud
  }
  return ca !== undefined ? { url: parsed, ca, clientId, secretRef } : { url: parsed, clientId, secretRef };
}

function request(t: ClientTarget, method: string, pathname: string, headers: Record<string, string>, body?: string): Promise<{ status: number; json: Record<string, unknown> }> {
  return new Promise((resolve, reject) => {
    const req = https.request(new URL(pathname, t.url), { method, headers, ca: t.ca, minVersion: 'TLSv1.2', agent: false, timeout: 120_000 }, (res) => {
      const parts: Buffer[] = [];
      res.on('data', (d: Buffer) => parts.push(d));
      res.on('end', () => {
        let json: Record<string, unknown> = {};
        try {
          json = JSON.parse(Buffer.concat(parts).toString('utf8')) as Record<string, unknown>;
        } catch {
          // not JSON
        }
        resolve({ status: res.statusCode ?? 0, json });
      });
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error('request timed out')));
    req.on('error', (err) => reject(new ConnectorError('ECONN_UPLINK', `cannot reach the cloud at ${t.url.origin}: ${err.message}`)));
    req.end(body);
  });
}

async function accessToken(t: ClientTarget, scope: Scope): Promise<string> {
  const secret = resolveSecret(t.secretRef);
  const form = new URLSearchParams({ grant_type: 'client_credentials', client_id: t.clientId, client_secret: secret, scope }).toString();
  const r = await request(t, 'POST', '/oauth/token', { 'content-type': 'application/x-www-form-urlencoded', 'content-length': String(Buffer.byteLength(form)) }, form);
  if (r.status !== 200 || typeof r.json.access_token !== 'string') {
    throw new ConnectorError('ECONN_CLOUD_TOKEN', `token endpoint answered ${r.status} ${String(r.json.error ?? '')}: ${String(r.json.error_description ?? '')}`);
  }
  return r.json.access_token;
}

async function runCloud(values: Values): Promise<number> {
  let cfg: CloudConfig;
  try {
    if (typeof values.config === 'string') cfg = loadCloudConfig(values.config);
    else {
      cfg = defaultCloudConfig(process.cwd());
      // the one default client's secret: the daemon generates the same file; whoever is first wins
      const stateDir = path.resolve('state');
      mkdirSync(stateDir, { recursive: true, mode: 0o700 });
      ensureSecretFile(path.join(stateDir, 'cloud-client.secret'));
    }
  } catch (err) {
    explain(err);
    return exitCodeFor(err);
  }
  const log = createLogger({ level: cfg.log_level }).child({ component: 'cloud' });
  const { CloudServer } = await import('../../cloud/server.js');
  const server = new CloudServer(cfg, log);
  try {
    await server.start();
  } catch (err) {
    log.fatal({ err }, 'cloud failed to start');
    explain(err);
    await server.close().catch(() => undefined);
    return exitCodeFor(err);
  }
  log.info({ ports: { cloud: server.port }, store_dir: cfg.store_dir, ca_file: server.caFile }, 'ready');
  const signal = await new Promise<string>((resolve) => {
    process.once('SIGTERM', () => resolve('SIGTERM'));
    process.once('SIGINT', () => resolve('SIGINT'));
  });
  log.info({ signal }, 'shutting down');
  const timer = setTimeout(() => {
    log.error('shutdown took too long: exiting');
    process.exit(EXIT.FAILURE);
  }, 10_000);
  timer.unref();
  await server.close();
  log.info('stopped');
  return EXIT.OK;
}

async function runTail(values: Values, positionals: string[]): Promise<number> {
  const t = target(values, 'subscribe');
  const token = await accessToken(t, 'subscribe');
  const u = new URL('/subscribe', t.url);
  u.protocol = 'wss:';
  u.searchParams.append('filter', positionals[0] ?? '#');
  if (values['from-start']) u.searchParams.set('from_start', '1');
  const ws = new WebSocket(u, { ca: t.ca, minVersion: 'TLSv1.2', headers: { authorization: `Bearer ${token}` }, perMessageDeflate: false });
  return new Promise<number>((resolve) => {
    const stop = (): void => ws.close(1000);
    process.once('SIGINT', stop);
    process.once('SIGTERM', stop);
    ws.on('unexpected-response', (_req, res) => {
      process.stderr.write(`connector cloud tail: the cloud refused the subscription (HTTP ${res.statusCode})\n`);
      resolve(EXIT.FAILURE);
    });
    ws.on('message', (data, isBinary) => {
      if (isBinary) return;
      let m: Record<string, unknown>;
      try {
        m = JSON.parse(data.toString()) as Record<string, unknown>;
      } catch {
        return;
      }
      if (m.type !== 'message') return;
      delete m.type;
      process.stdout.write(JSON.stringify(m) + '\n');
    });
    ws.on('error', (err) => {
      process.stderr.write(`connector cloud tail: ${err.message}\n`);
      resolve(EXIT.FAILURE);
    });
    ws.on('close', (code) => {
      process.off('SIGINT', stop);
      process.off('SIGTERM', stop);
      resolve(code === 1000 || code === 1005 ? EXIT.OK : EXIT.FAILURE);
    });
  });
}

async function runCommand(values: Values, positionals: string[]): Promise<number> {
  const [device, name, payload] = positionals as [string, string, string | undefined];
  const t = target(values, 'commands');
  const token = await accessToken(t, 'commands');
  const body: Record<string, unknown> = { device_id: device, name, payload: payload ?? '' };
  if (typeof values.gateway === 'string') body.gateway_id = values.gateway;
  if (typeof values['timeout-ms'] === 'string') body.timeout_ms = Number(values['timeout-ms']);
  const text = JSON.stringify(body);
  const r = await request(t, 'POST', '/api/commands', { authorization: `Bearer ${token}`, 'content-type': 'application/json', 'content-length': String(Buffer.byteLength(text)) }, text);
  process.stdout.write(JSON.stringify({ status: r.status, ...r.json }) + '\n');
  return r.status === 200 && r.json.delivered === true ? EXIT.OK : EXIT.FAILURE;
}

export const cloudCommands: Command[] = [
  {
    path: ['cloud'],
    summary: 'run the reference cloud endpoint (token endpoint, WSS ingest, subscribers, commands)',
    usage: `connector cloud [-c cloud.yaml]

Without -c: HTTPS/WSS on 127.0.0.1:9443, state in ./cloud-data (TLS CA written to
./cloud-data/tls/ca.crt on first start), one OAuth2 client "edge-connector" whose
secret is ./state/cloud-client.secret (created 0600 if missing) — what the bundled
connector.yaml points at. Logs JSON lines; a "ready" line with ports.cloud when listening.
Stops on SIGTERM/SIGINT. See docs/PROTOCOL.md.`,
    options: CONFIG_OPTION,
    run: ({ values }) => runCloud(values),
  },
  {
    path: ['cloud', 'tail'],
    summary: 'print messages stored by the reference cloud as JSON lines',
    usage: `connector cloud tail [--from-start] [FILTER] [options]

Prints every stored message matching FILTER (MQTT filter, default #) as one JSON line:
id, device_id, topic, qos, size, sha256, received_at, stored_at, gateway_id, seq and,
for payloads up to 64 KiB, payload (base64). --from-start replays what is stored first;
without it only new messages are printed. Stops on SIGINT/SIGTERM.
${CLIENT_USAGE}`,
    options: { ...CLIENT_OPTIONS, 'from-start': { type: 'boolean' } },
    positionals: { min: 0, max: 1 },
    run: async ({ values, positionals }) => {
      try {
        return await runTail(values, positionals);
      } catch (err) {
        explain(err);
        return errorCode(err) === 'ECONN_USAGE' ? EXIT.USAGE : EXIT.FAILURE;
      }
    },
  },
  {
    path: ['cloud', 'command'],
    summary: 'send a command to a device through its gateway and print the result',
    usage: `connector cloud command DEVICE NAME [PAYLOAD] [options]

Sends PAYLOAD (a UTF-8 string) to devices/DEVICE/commands/NAME via the connected gateway,
prints {"status", "id", "delivered", "reason"?} and exits 0 when delivered, 1 otherwise.
  --gateway ID      the gateway to use (default: the one that last forwarded DEVICE)
  --timeout-ms N    how long to wait for the result
${CLIENT_USAGE}`,
    options: { ...CLIENT_OPTIONS, gateway: { type: 'string' }, 'timeout-ms': { type: 'string' } },
    positionals: { min: 2, max: 3 },
    run: async ({ values, positionals }) => {
      try {
        return await runCommand(values, positionals);
      } catch (err) {
        explain(err);
        return errorCode(err) === 'ECONN_USAGE' ? EXIT.USAGE : EXIT.FAILURE;
      }
    },
  },
];
