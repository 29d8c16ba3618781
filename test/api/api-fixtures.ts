/**
 * Fixtures for the HTTPS API tests: real identity components (registry, PKI,
 * tokens, enrollment) in a temp state dir, a real ApiServer on 127.0.0.1:0, a
 * file-backed UplinkSink test double that really streams to disk, and an
 * HTTPS client helper.
 *
 * The FileSink stands in for bridge/journal.ts where a test wants to see the
 * bytes on disk without the journal's segment format; test/broker/api-upload.test.ts
 * also runs against the real Journal.
 */
import https from 'node:https';
import type { IncomingHttpHeaders } from 'node:http';
import { createHash, randomUUID } from 'node:crypto';
import { createWriteStream } from 'node:fs';
import { open, rename, unlink, readFile } from 'node:fs/promises';
import path from 'node:path';
import { EventEmitter, once } from 'node:events';
import { stringify } from 'yaml';
import { parseConfigText } from '../../core/config/load.js';
import type { Config } from '../../core/config/schema.js';
import { ConnectorError } from '../../core/errors.js';
import { silentLogger, type Logger } from '../../core/logger.js';
import type { AppendResult, UplinkMessageMeta, UplinkSink } from '../../core/ports.js';
import { DeviceRegistry } from '../../identity/registry.js';
import { LocalPki, initPki } from '../../identity/pki.js';
import { TokenService, initTokenKeys } from '../../identity/tokens.js';
import { EnrollmentStore } from '../../identity/enrollment.js';
import { ApiServer, type ApiServerOptions, type ApiTimeouts } from '../../api/api.js';
import { tempDir, testConfig, deepMerge, type Json, type TestLike } from '../helpers/daemon.js';

export interface StoredMessage {
  meta: UplinkMessageMeta;
  result: AppendResult;
  file: string;
}

/**
 * UplinkSink test double: streams each payload to a temp file, fsyncs, then renames it into place.
 * Emits 'stream-start' (the temp file) when an append starts, so a test can wait for it.
 */
export class FileSink extends EventEmitter implements UplinkSink {
  readonly messages: StoredMessage[] = [];
  /** Temp files currently being written (to check nothing is left behind). */
  readonly inFlight = new Set<string>();
  constructor(readonly dir: string) {
    super();
  }

  async append(meta: UplinkMessageMeta, payload: Buffer): Promise<AppendResult> {
    return this.appendStream(meta, (async function* () {
      yield payload;
    })(), { maxBytes: Number.MAX_SAFE_INTEGER });
  }

  async appendStream(meta: UplinkMessageMeta, body: AsyncIterable<Buffer | Uint8Array>, opts: { maxBytes: number; expectedSha256?: Buffer }): Promise<AppendResult> {
    const id = randomUUID();
    const tmp = path.join(this.dir, `.${id}.tmp`);
    const out = createWriteStream(tmp, { flags: 'wx', mode: 0o600 });
    this.inFlight.add(tmp);
    this.emit('stream-start', tmp);
    const hash = createHash('sha256');
    let size = 0;
    try {
      for await (const chunk of body) {
        size += chunk.length;
        if (size > opts.maxBytes) throw new ConnectorError('ECONN_PAYLOAD_TOO_LARGE', `payload larger than ${opts.maxBytes} bytes`);
        hash.update(chunk);
        if (!out.write(chunk)) await once(out, 'drain');
      }
      out.end();
      await once(out, 'finish');
      const digest = hash.digest();
      if (opts.expectedSha256 && !digest.equals(opts.expectedSha256)) throw new ConnectorError('ECONN_DIGEST_MISMATCH', 'payload does not match its sha-256');
      const fh = await open(tmp, 'r');
      await fh.sync();
      await fh.close();
      const file = path.join(this.dir, `${id}.bin`);
      await rename(tmp, file);
      const result: AppendResult = { id, size, sha256: digest.toString('hex') };
      this.messages.push({ meta, result, file });
      return result;
    } catch (err) {
      out.destroy();
      await unlink(tmp).catch(() => {});
      throw err;
    } finally {
      this.inFlight.delete(tmp);
    }
  }
}

export interface Clock {
  t: number;
}

export interface ApiEnv {
  dir: string;
  stateDir: string;
  config: Config;
  clock: Clock;
  registry: DeviceRegistry;
  pki: LocalPki;
  tokens: TokenService;
  enrollment: EnrollmentStore;
  api: ApiServer;
  port: number;
  ports: Map<string, number>;
  sink: UplinkSink | undefined;
  /** CA to verify the server with (the local device CA issues the server certificate). */
  ca: string;
  enroll(opts?: { ttlS?: number; uses?: number }): Promise<string>;
  /** Register a device through the API with a fresh enrollment token; returns the 201 body. */
  register(deviceId: string, extra?: Json): Promise<Json>;
  request(opts: RequestOptions): Promise<Response>;
}

export interface EnvOptions {
  config?: Json;
  sink?: UplinkSink | 'file' | 'none';
  isConnected?: (id: string) => boolean;
  timeouts?: Partial<ApiTimeouts>;
  logger?: Logger;
  /** Extra options for the ApiServer (override what the fixture builds). */
  api?: Partial<ApiServerOptions>;
}

export interface RequestOptions {
  method?: string;
  path: string;
  headers?: Record<string, string>;
  /** string/Buffer = sent with Content-Length; an iterable = streamed with Transfer-Encoding: chunked. */
  body?: string | Buffer | AsyncIterable<Buffer>;
  json?: unknown;
  bearer?: string;
  cert?: string;
  key?: string;
}

export interface Response {
  status: number;
  headers: IncomingHttpHeaders;
  text: string;
  json: Json;
}

export function buildConfig(stateDir: string, overrides: Json = {}): Config {
  const data = deepMerge(testConfig(stateDir), deepMerge({ bridge: { enabled: true } }, overrides));
  return parseConfigText(stringify(data), path.join(stateDir, 'connector.yaml'), { checkSecrets: false }).config;
}

export async function apiEnv(t: TestLike, opts: EnvOptions = {}): Promise<ApiEnv> {
  const dir = tempDir(t, 'ec-api-');
  const stateDir = path.join(dir, 'state');
  const config = buildConfig(stateDir, opts.config ?? {});
  const logger = opts.logger ?? silentLogger();
  const clock: Clock = { t: Date.now() };
  const now = (): number => clock.t;
  await initPki(stateDir, config.identity.pki, config.daemon.server_name);
  await initTokenKeys(stateDir, config.identity.jwt.algorithm);
  const registry = new DeviceRegistry({ file: path.join(stateDir, 'registry.json'), logger, now });
  const pki = new LocalPki({ stateDir, config: config.identity.pki, logger });
  const tokens = new TokenService({ stateDir, config: config.identity.jwt, registry, logger, now });
  const enrollment = new EnrollmentStore({ registry, logger, now });
  await registry.start();
  t.teardown(() => registry.close());
  await pki.start();
  t.teardown(() => pki.close());
  await tokens.start();
  t.teardown(() => tokens.close());
  let sink: UplinkSink | undefined;
  if (opts.sink === undefined || opts.sink === 'file') sink = new FileSink(dir);
  else if (opts.sink !== 'none') sink = opts.sink;
  const ports = new Map<string, number>([
    ['mqtt_tls', 18883],
    ['mqtt_wss', 18884],
  ]);
  const api = new ApiServer({
    config,
    identity: { registry, pki, tokens, enrollment },
    logger,
    ports,
    ...(sink ? { sink } : {}),
    ...(opts.isConnected ? { isConnected: opts.isConnected } : {}),
    now,
    ...(opts.timeouts ? { timeouts: opts.timeouts } : {}),
    ...opts.api,
  });
  await api.start();
  t.teardown(() => api.close());
  const port = api.boundPort;
  const ca = pki.caCertificatePem();

  const request = (r: RequestOptions): Promise<Response> =>
    new Promise((resolve, reject) => {
      const headers: Record<string, string> = { ...(r.headers ?? {}) };
      let payload: string | Buffer | AsyncIterable<Buffer> | undefined = r.body;
      if (r.json !== undefined) {
        payload = JSON.stringify(r.json);
        headers['content-type'] ??= 'application/json';
      }
      if (r.bearer !== undefined) headers.authorization = `Bearer ${r.bearer}`;
      const req = https.request(
        {
          host: '127.0.0.1',
          port,
          method: r.method ?? 'POST',
          path: r.path,
          headers,
          ca,
          servername: 'localhost',
          agent: false,
          ...(r.cert ? { cert: r.cert, key: r.key } : {}),
        },
        (res) => {
          const chunks: Buffer[] = [];
          res.on('data', (c: Buffer) => chunks.push(c));
          res.on('end', () => {
            const text = Buffer.concat(chunks).toString('utf8');
            let json: Json = {};
            try {
              json = JSON.parse(text) as Json;
            } catch {
              // not JSON: the test looks at text
            }
            resolve({ status: res.statusCode ?? 0, headers: res.headers, text, json });
          });
          res.on('error', reject);
        },
      );
      // the server may answer early (413, 401) and close while we still send: the answer is what counts
      let answered = false;
      req.on('response', () => (answered = true));
      req.on('error', (err) => {
        if (!answered) reject(err);
      });
      if (payload === undefined) req.end();
      else if (typeof payload === 'string' || Buffer.isBuffer(payload)) req.end(payload);
      else {
        const it = payload;
        void (async () => {
          try {
            for await (const chunk of it) {
              if (req.destroyed || answered) break;
              if (!req.write(chunk)) await once(req, 'drain');
            }
            req.end();
          } catch {
            req.destroy();
          }
        })();
      }
    });

  const enroll = async (o: { ttlS?: number; uses?: number } = {}): Promise<string> =>
    (await enrollment.create({ ttlS: o.ttlS ?? 600, uses: o.uses ?? 1 })).token;

  const register = async (deviceId: string, extra: Json = {}): Promise<Json> => {
    const token = await enroll();
    const r = await request({ path: '/api/register', bearer: token, json: { device_id: deviceId, ...extra } });
    if (r.status !== 201) throw new Error(`register ${deviceId}: ${r.status} ${r.text}`);
    return r.json;
  };

  return { dir, stateDir, config, clock, registry, pki, tokens, enrollment, api, port, ports, sink, ca, enroll, register, request };
}

/** A deterministic pseudo-random payload generator: `total` bytes in `chunk`-sized pieces, and its sha-256. */
export function payload(total: number, chunk = 65536, seed = 1): { gen: () => AsyncGenerator<Buffer>; sha256: Buffer } {
  const block = Buffer.alloc(chunk);
  let x = seed;
  for (let i = 0; i < chunk; i++) {
    x = (x * 1103515245 + 12345) & 0x7fffffff;
    block[i] = x & 0xff;
  }
  const hash = createHash('sha256');
  for (let sent = 0; sent < total; sent += chunk) hash.update(block.subarray(0, Math.min(chunk, total - sent)));
  const sha256 = hash.digest();
  async function* gen(): AsyncGenerator<Buffer> {
    for (let sent = 0; sent < total; sent += chunk) yield block.subarray(0, Math.min(chunk, total - sent));
  }
  return { gen, sha256 };
}

export async function fileSha256(file: string): Promise<string> {
  return createHash('sha256').update(await readFile(file)).digest('hex');
}
