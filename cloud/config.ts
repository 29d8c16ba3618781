/**
 * Configuration of the reference cloud (`connector cloud [-c cloud.yaml]`): its
 * own small schema (unknown keys are errors), validated with every problem
 * listed as `FILE:LINE:COL key.path: message`.
 *
 * Without a file, `defaultCloudConfig(cwd)` gives the loopback defaults the
 * bundled connector.yaml points at: HTTPS+WSS on 127.0.0.1:9443, state in
 * ./cloud-data, one OAuth client `edge-connector` whose secret is
 * ./state/cloud-client.secret (the daemon generates the same file).
 *
 * Relative paths (and `file:` secret references) in a file are resolved against
 * the file's directory.
 */
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { Type, type Static } from '@sinclair/typebox';
import { Ajv, type ValidateFunction } from 'ajv';
import { parseYamlSource, schemaProblems } from '../core/config/load.js';
import { ConfigError } from '../core/errors.js';

const SECRET_REF = '^(env:[A-Za-z_][A-Za-z0-9_]*|file:.+|credential:[A-Za-z0-9_.@-]+)$';
const secretRef = (description: string) => Type.String({ pattern: SECRET_REF, description });

export const GRANTS = ['client_credentials', 'password', 'refresh_token'] as const;
export const SCOPES = ['ingest', 'subscribe', 'commands'] as const;
export type Grant = (typeof GRANTS)[number];
export type Scope = (typeof SCOPES)[number];

const grantList = Type.Array(Type.Unsafe<Grant>({ type: 'string', enum: [...GRANTS] }), {
  default: [...GRANTS],
  description: 'OAuth2 grants this client may use',
});
const scopeList = Type.Array(Type.Unsafe<Scope>({ type: 'string', enum: [...SCOPES] }), {
  default: [...SCOPES],
  description: 'scopes it may get: ingest (WSS /ingest), subscribe (WSS /subscribe), commands (POST /api/commands)',
});

export const cloudConfigSchema = Type.Object(
  {
    listen: Type.Object(
      {
        host: Type.String({ default: '127.0.0.1', minLength: 1, description: 'address of the HTTPS/WSS listener' }),
        port: Type.Integer({ default: 9443, minimum: 0, maximum: 65535, description: 'port (0 = pick a free one, for tests)' }),
      },
      { additionalProperties: false, default: {} },
    ),
    store_dir: Type.String({ default: './cloud-data', minLength: 1, description: 'stored messages (segments/, blobs/; docs/PROTOCOL.md §10), partial messages, token key, generated TLS (created 0700)' }),
    tls: Type.Object(
      {
        cert_file: Type.String({ default: '', description: 'server certificate (PEM); empty = generate a CA and server cert under store_dir/tls' }),
        key_file: Type.String({ default: '', description: 'server key (PEM)' }),
      },
      { additionalProperties: false, default: {} },
    ),
    clients: Type.Array(
      Type.Object(
        {
          id: Type.String({ minLength: 1, maxLength: 256 }),
          secret: secretRef('client secret reference (env:/file:/credential:)'),
          grants: grantList,
          scopes: scopeList,
          gateway_ids: Type.Array(Type.String({ minLength: 1, maxLength: 256 }), {
            default: [],
            maxItems: 100000,
            description: 'gateway ids (HELLO gateway_id, the connector daemon.server_name) this client may use; empty = any id not already bound to another client (the first use binds it, store_dir/gateways.json)',
          }),
        },
        { additionalProperties: false },
      ),
      { default: [], description: 'OAuth2 clients (confidential: every client has a secret)' },
    ),
    users: Type.Array(
      Type.Object(
        {
          username: Type.String({ minLength: 1, maxLength: 256 }),
          password: secretRef('password reference'),
          scopes: scopeList,
        },
        { additionalProperties: false },
      ),
      { default: [], description: 'resource owners for the password grant' },
    ),
    token_ttl_s: Type.Integer({ default: 300, minimum: 1, maximum: 86400, description: 'access token lifetime' }),
    refresh_ttl_s: Type.Integer({ default: 86400, minimum: 1, maximum: 31536000, description: 'refresh token lifetime' }),
    signing_secret: Type.Optional(secretRef('when set, the WSS upgrade must carry a valid X-Signature (docs/PROTOCOL.md §1)')),
    max_message_bytes: Type.Integer({ default: 1073741824, minimum: 0, maximum: Number.MAX_SAFE_INTEGER, description: 'largest message accepted (REJECT permanent above)' }),
    max_chunk_bytes: Type.Integer({ default: 16777216, minimum: 1024, maximum: 16777216, description: 'largest chunk accepted' }),
    max_partials: Type.Integer({ default: 64, minimum: 1, maximum: 4096, description: 'most messages in progress per gateway' }),
    partial_ttl_s: Type.Integer({
      default: 86400,
      minimum: 1,
      maximum: 31536000,
      description: 'a message in progress that no chunk reached for this long is dropped (a connector that crashed mid-upload never completes nor discards it; docs/PROTOCOL.md §13.10)',
    }),
    progress_bytes: Type.Integer({ default: 4194304, minimum: 1, description: 'send a progress ACK (durable offset) at least every this many bytes of a large message' }),
    heartbeat_ms: Type.Integer({ default: 5000, minimum: 50, maximum: 300000, description: 'PING interval; a link silent for 3 heartbeats is closed (4008)' }),
    hello_timeout_ms: Type.Integer({ default: 10000, minimum: 50, maximum: 300000, description: 'close (4005) when no HELLO arrives in time' }),
    command_timeout_ms: Type.Integer({ default: 10000, minimum: 100, maximum: 600000, description: 'POST /api/commands answers 504 when no COMMAND_RESULT arrives in time' }),
    log_level: Type.Unsafe<'fatal' | 'error' | 'warn' | 'info' | 'debug' | 'trace' | 'silent'>({
      type: 'string',
      enum: ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'],
      default: 'info',
    }),
  },
  { additionalProperties: false, default: {} },
);

export type CloudConfig = Static<typeof cloudConfigSchema>;

/**
 * Compiled on first use, not at import: the daemon imports this module for the CLI's
 * `connector cloud` command table, and a compiled validator (generated code and its
 * closures) held ~0.7 MiB of every daemon's heap for a command it never runs.
 */
let compiled: ValidateFunction | undefined;
function validator(): ValidateFunction {
  compiled ??= new Ajv({ allErrors: true, useDefaults: true, strict: false, verbose: true }).compile(cloudConfigSchema);
  return compiled;
}

/** The loopback defaults used when `connector cloud` runs without -c. */
export function defaultCloudConfig(cwd = process.cwd()): CloudConfig {
  const data: Record<string, unknown> = {
    store_dir: path.join(cwd, 'cloud-data'),
    clients: [{ id: 'edge-connector', secret: `file:${path.join(cwd, 'state', 'cloud-client.secret')}` }],
  };
  if (!validator()(data)) throw new Error('internal: default cloud config is invalid');
  return data as CloudConfig;
}

/** Parse and validate a cloud.yaml. Throws ConfigError ECONN_CONFIG_NOT_FOUND / ECONN_CONFIG_INVALID. */
export function loadCloudConfig(file: string): CloudConfig {
  const abs = path.resolve(file);
  let text: string;
  try {
    text = readFileSync(abs, 'utf8');
  } catch (err) {
    throw new ConfigError('ECONN_CONFIG_NOT_FOUND', [`${abs}: cannot read (${(err as NodeJS.ErrnoException).code}); pass -c FILE, or run without -c for the loopback defaults`]);
  }
  return parseCloudConfig(text, abs);
}

export function parseCloudConfig(text: string, file: string): CloudConfig {
  const src = parseYamlSource(text, file);
  const schemaErrors = schemaProblems(src, validator());
  if (schemaErrors.length > 0) throw new ConfigError('ECONN_CONFIG_INVALID', schemaErrors);
  const data = src.data;
  const cfg = data as CloudConfig;
  const base = path.dirname(file);
  const problems: string[] = [];
  cfg.store_dir = path.resolve(base, cfg.store_dir);
  if (cfg.tls.cert_file) cfg.tls.cert_file = path.resolve(base, cfg.tls.cert_file);
  if (cfg.tls.key_file) cfg.tls.key_file = path.resolve(base, cfg.tls.key_file);
  if (Boolean(cfg.tls.cert_file) !== Boolean(cfg.tls.key_file)) problems.push(`${file} tls: cert_file and key_file go together`);
  const fileRef = (ref: string): string => (ref.startsWith('file:') ? `file:${path.resolve(base, ref.slice(5))}` : ref);
  for (const c of cfg.clients) c.secret = fileRef(c.secret);
  for (const u of cfg.users) u.password = fileRef(u.password);
  if (cfg.signing_secret) cfg.signing_secret = fileRef(cfg.signing_secret);
  const ids = new Set<string>();
  for (const c of cfg.clients) {
    if (ids.has(c.id)) problems.push(`${file} clients: duplicate client id "${c.id}"`);
    ids.add(c.id);
  }
  if (problems.length > 0) throw new ConfigError('ECONN_CONFIG_INVALID', problems);
  return cfg;
}
