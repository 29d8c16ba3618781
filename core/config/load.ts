/**
 * Loading connector.yaml: a real YAML parser (with line and column for every
 * node), environment overrides CONNECTOR_<SECTION>_<KEY>, validation against the
 * one schema with every error reported at once as
 * `FILE:LINE:COL key.path: what is wrong and what is allowed`, relative paths
 * resolved against the config file's directory, and a deep-frozen result.
 */
import { readFileSync, existsSync } from 'node:fs';
import path from 'node:path';
import { isIP } from 'node:net';
import { parseDocument, LineCounter, isMap, isScalar, visit, parse as parseYamlValue, type Document, type Node as YamlNode } from 'yaml';
import { Ajv, type ErrorObject, type ValidateFunction } from 'ajv';
import { configSchema, type Config } from './schema.js';
import { ConfigError } from '../errors.js';
import { resolveSecret } from '../secrets.js';
import { deepFreeze, matchSchemaPath, walkConfig, type SchemaNode } from './walk.js';

const DEFAULT_SYSTEM_CONFIG = '/etc/edge-connector/connector.yaml';

/** Default config path: ./connector.yaml, else $CONNECTOR_CONFIG, else /etc/edge-connector/connector.yaml. */
export function defaultConfigPath(env: NodeJS.ProcessEnv = process.env, cwd = process.cwd()): string {
  const local = path.join(cwd, 'connector.yaml');
  if (existsSync(local)) return local;
  if (env.CONNECTOR_CONFIG) return path.resolve(cwd, env.CONNECTOR_CONFIG);
  return DEFAULT_SYSTEM_CONFIG;
}

export interface LoadOptions {
  env?: NodeJS.ProcessEnv;
  /** Resolve secret references now (default true). `false` only checks their syntax. */
  checkSecrets?: boolean;
}

export interface LoadedConfig {
  config: Config;
  file: string;
  /** Valid but worth a look (`FILE:LINE:COL key.path: message`); check-config prints them, the daemon logs them. */
  warnings: string[];
}

let compiled: ValidateFunction | undefined;
/** Compiled on first use: commands that never read the config (--help, --version) stay fast. */
function validator(): ValidateFunction {
  compiled ??= new Ajv({ allErrors: true, useDefaults: true, strict: false, verbose: true }).compile(configSchema);
  return compiled;
}

/** Parse, override, validate and freeze. Throws ConfigError listing every problem. */
export function loadConfig(file: string, opts: LoadOptions = {}): LoadedConfig {
  const env = opts.env ?? process.env;
  const abs = path.resolve(file);
  let text: string;
  try {
    text = readFileSync(abs, 'utf8');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    const why = code === 'ENOENT' ? 'file not found' : `cannot read (${code})`;
    throw new ConfigError('ECONN_CONFIG_NOT_FOUND', [
      `${abs}: ${why}; pass -c FILE, set CONNECTOR_CONFIG, or create ./connector.yaml (see connector.yaml in the repository)`,
    ]);
  }
  return parseConfigText(text, abs, { ...opts, env });
}

/** A parsed YAML document with the positions of its nodes, for `FILE:LINE:COL key.path: …` messages. */
export interface YamlSource {
  file: string;
  doc: Document;
  data: Record<string, unknown>;
  at(offset: number | undefined): string;
  /** Position of the value at a JSON pointer (or of `key` inside it); env overrides are named instead. */
  where(instancePath: string, key?: string, fromEnv?: ReadonlyMap<string, string>): string;
}

/** Parse YAML keeping positions; syntax errors and a non-mapping root throw ConfigError with every problem. */
export function parseYamlSource(text: string, file: string): YamlSource {
  const lc = new LineCounter();
  const doc = parseDocument(text, { lineCounter: lc, prettyErrors: false, uniqueKeys: true });
  const at = (offset: number | undefined): string => {
    if (offset === undefined) return `${file}:1:1`;
    const { line, col } = lc.linePos(offset);
    return `${file}:${line}:${col}`;
  };
  if (doc.errors.length > 0) {
    throw new ConfigError(
      'ECONN_CONFIG_INVALID',
      doc.errors.map((e) => `${at(e.pos[0])} YAML syntax error: ${e.message.split('\n')[0]}`),
    );
  }
  // An alias inside its own anchor (`&a [*a]`) makes a cyclic value that no
  // later step can walk or print (JSON.stringify throws a TypeError); no
  // configuration key takes a recursive value, so refuse it here with its place.
  const cycles: string[] = [];
  visit(doc, {
    Alias(_key, node, ancestors) {
      const target = node.resolve(doc);
      if (target && ancestors.includes(target)) {
        cycles.push(`${at(node.range?.[0])} YAML alias *${node.source} refers to its own anchor &${node.source} (a recursive value); no configuration key takes one`);
      }
    },
  });
  if (cycles.length > 0) throw new ConfigError('ECONN_CONFIG_INVALID', cycles);
  let data: unknown;
  try {
    data = doc.toJS({ maxAliasCount: 100 });
  } catch (err) {
    // yaml refuses an alias explosion ("billion laughs") or an unresolvable alias
    throw new ConfigError('ECONN_CONFIG_INVALID', [`${at(doc.contents?.range?.[0])} YAML: ${(err as Error).message.split('\n')[0]}`]);
  }
  if (data === null || data === undefined) data = {};
  if (typeof data !== 'object' || Array.isArray(data)) {
    throw new ConfigError('ECONN_CONFIG_INVALID', [`${at(doc.contents?.range?.[0])} (root): must be a mapping of sections`]);
  }
  const where = (instancePath: string, key?: string, fromEnv?: ReadonlyMap<string, string>): string => {
    const segs = pointerToPath(instancePath);
    for (let i = segs.length; i >= 1 && fromEnv; i--) {
      const envName = fromEnv.get('/' + segs.slice(0, i).join('/'));
      if (envName) return `env ${envName}`;
    }
    if (key !== undefined) {
      const parent = segs.length ? doc.getIn(segs, true) : doc.contents;
      if (isMap(parent)) {
        const pair = parent.items.find((it) => isScalar(it.key) && String(it.key.value) === key);
        const k = pair?.key as YamlNode | undefined;
        if (k?.range) return at(k.range[0]);
      }
    }
    return at(nearestRange(doc, segs));
  };
  return { file, doc, data: data as Record<string, unknown>, at, where };
}

/** Validate `src.data` (defaults applied in place by ajv) and describe every error with its position. */
export function schemaProblems(src: YamlSource, validate: ValidateFunction, fromEnv?: ReadonlyMap<string, string>): string[] {
  if (validate(src.data)) return [];
  return (validate.errors ?? []).map((e) => {
    const extraKey = e.keyword === 'additionalProperties' ? String((e.params as { additionalProperty: string }).additionalProperty) : undefined;
    return `${src.where(e.instancePath, extraKey, fromEnv)} ${dottedPath(e.instancePath, extraKey)}: ${describeError(e)}`;
  });
}

export function parseConfigText(text: string, file: string, opts: LoadOptions = {}): LoadedConfig {
  const env = opts.env ?? process.env;
  const src = parseYamlSource(text, file);
  const data = src.data;
  const problems: string[] = [];
  const fromEnv = new Map<string, string>(); // json pointer -> env var name
  applyEnvOverrides(data, env, fromEnv, problems);
  const where = (ptr: string): string => src.where(ptr, undefined, fromEnv);
  problems.push(...schemaProblems(src, validator(), fromEnv));
  const cfg = data as Config;
  try {
    // cross-key rules; run even when the schema found problems so that every error is listed at once
    semanticChecks(cfg, problems, (p) => where(p));
  } catch {
    // a section has the wrong shape: the schema errors above already say so
  }
  if (problems.length === 0) {
    resolvePaths(cfg as unknown as Record<string, unknown>, path.dirname(file));
    if (opts.checkSecrets !== false) {
      checkSecrets(cfg as unknown as Record<string, unknown>, env, problems, (p) => where(p), cfg.daemon.state_dir);
    }
  }
  if (problems.length > 0) throw new ConfigError('ECONN_CONFIG_INVALID', problems);
  return { config: deepFreeze(data as Config), file, warnings: configWarnings(cfg, (p) => where(p)) };
}

function pointerToPath(p: string): string[] {
  if (!p) return [];
  return p.slice(1).split('/').map((s) => s.replace(/~1/g, '/').replace(/~0/g, '~'));
}

function dottedPath(instancePath: string, extra?: string): string {
  const segs = pointerToPath(instancePath);
  if (extra !== undefined) segs.push(extra);
  return segs.length ? segs.map((s) => (/^\d+$/.test(s) ? `[${s}]` : s)).join('.').replace(/\.\[/g, '[') : '(root)';
}

function nearestRange(doc: Document, segs: string[]): number | undefined {
  for (let i = segs.length; i >= 0; i--) {
    const node = (i === 0 ? doc.contents : doc.getIn(segs.slice(0, i).map((s) => (/^\d+$/.test(s) ? Number(s) : s)), true)) as YamlNode | undefined;
    if (node && typeof node === 'object' && 'range' in node && node.range) return node.range[0];
  }
  return undefined;
}

function describeError(e: ErrorObject): string {
  const ps = (e.parentSchema ?? {}) as SchemaNode;
  const got = e.data === undefined ? '' : `, got ${JSON.stringify(e.data)?.slice(0, 60)}`;
  switch (e.keyword) {
    case 'additionalProperties': {
      const allowed = Object.keys(ps.properties ?? {});
      const name = String((e.params as { additionalProperty: string }).additionalProperty);
      const hint = closest(name, allowed);
      return `unknown key${hint ? ` (did you mean "${hint}"?)` : ''}; allowed keys: ${allowed.join(', ')}`;
    }
    case 'type':
      return `must be ${(e.params as { type: string }).type}${got}${ps.description ? ` (${ps.description})` : ''}`;
    case 'minimum':
    case 'maximum':
      return `out of range${got}; allowed: ${ps.minimum ?? '-∞'} to ${ps.maximum ?? '∞'}`;
    case 'enum':
      return `not allowed${got}; allowed: ${(ps.enum ?? []).map((v) => JSON.stringify(v)).join(', ')}`;
    case 'pattern':
      if (ps['x-secret'] || (e.params as { pattern: string }).pattern.startsWith('^(env:')) {
        return 'must be a secret reference env:NAME, file:/path or credential:NAME (plain-text secrets are not accepted)';
      }
      return `must match ${(e.params as { pattern: string }).pattern}${got}${ps.description ? ` (${ps.description})` : ''}`;
    case 'minLength':
      return 'must not be empty';
    case 'required':
      return `missing required key "${(e.params as { missingProperty: string }).missingProperty}"`;
    case 'anyOf':
    case 'oneOf':
      return `does not match any allowed form${got}`;
    default:
      return `${e.message ?? 'invalid'}${got}`;
  }
}

function closest(name: string, options: string[]): string | undefined {
  let best: string | undefined;
  let bestD = Infinity;
  for (const o of options) {
    const d = levenshtein(name, o);
    if (d < bestD) {
      bestD = d;
      best = o;
    }
  }
  return bestD <= Math.max(2, Math.floor(name.length / 3)) ? best : undefined;
}

function levenshtein(a: string, b: string): number {
  const dp = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    let prev = dp[0]!;
    dp[0] = i;
    for (let j = 1; j <= b.length; j++) {
      const tmp = dp[j]!;
      dp[j] = Math.min(dp[j]! + 1, dp[j - 1]! + 1, prev + (a[i - 1] === b[j - 1] ? 0 : 1));
      prev = tmp;
    }
  }
  return dp[b.length]!;
}

/**
 * CONNECTOR_<SECTION>_<KEY>=value, e.g. CONNECTOR_LOG_LEVEL=debug or
 * CONNECTOR_BRIDGE_JOURNAL_MAX_BYTES=1048576. Segments are matched against the
 * schema (keys may contain underscores). The value is parsed as a YAML scalar or
 * flow collection. CONNECTOR_CONFIG is the config path, not an override.
 */
function applyEnvOverrides(data: Record<string, unknown>, env: NodeJS.ProcessEnv, fromEnv: Map<string, string>, problems: string[]): void {
  for (const [name, raw] of Object.entries(env)) {
    if (!name.startsWith('CONNECTOR_') || name === 'CONNECTOR_CONFIG' || raw === undefined) continue;
    const tokens = name.slice('CONNECTOR_'.length).toLowerCase().split('_');
    const keys = matchSchemaPath(tokens);
    if (!keys) {
      problems.push(`env ${name}: no such configuration key (CONNECTOR_<SECTION>_<KEY>, e.g. CONNECTOR_LOG_LEVEL)`);
      continue;
    }
    let value: unknown;
    try {
      value = parseYamlValue(raw);
    } catch {
      value = raw;
    }
    let node = data;
    for (const k of keys.slice(0, -1)) {
      if (typeof node[k] !== 'object' || node[k] === null || Array.isArray(node[k])) node[k] = {};
      node = node[k] as Record<string, unknown>;
    }
    node[keys[keys.length - 1]!] = value;
    fromEnv.set('/' + keys.join('/'), name);
  }
}

const LOOPBACK = (h: string): boolean => h === 'localhost' || h === '::1' || (isIP(h) === 4 && h.startsWith('127.'));

/** Valid settings an operator should know the consequence of. */
function configWarnings(cfg: Config, where: (ptr: string) => string): string[] {
  const warnings: string[] = [];
  if (cfg.metrics.enabled && !LOOPBACK(cfg.metrics.host)) {
    warnings.push(
      `${where('/metrics/host')} metrics.host: "${cfg.metrics.host}" is not a loopback address: /metrics, /readyz and the status page (no authentication) are reachable from the network; keep 127.0.0.1 and reach them through an SSH tunnel or a local agent (docs/operations.md)`,
    );
  }
  return warnings;
}

function semanticChecks(cfg: Config, problems: string[], where: (ptr: string) => string): void {
  const local = cfg.broker.listeners.local;
  if (local.enabled && !LOOPBACK(local.host)) {
    problems.push(
      `${where('/broker/listeners/local/host')} broker.listeners.local.host: the plain MQTT listener may bind to loopback only, got "${local.host}"; allowed: 127.0.0.1, ::1, localhost (devices on the network must use the TLS or WSS listener)`,
    );
  }
  const lim = cfg.broker.limits;
  if (lim.keepalive_max_s !== 0 && lim.keepalive_min_s > lim.keepalive_max_s) {
    problems.push(`${where('/broker/limits/keepalive_min_s')} broker.limits.keepalive_min_s: must not exceed keepalive_max_s (${lim.keepalive_max_s})`);
  }
  if (cfg.bridge.uplink.dead_after_ms <= cfg.bridge.uplink.heartbeat_ms) {
    problems.push(`${where('/bridge/uplink/dead_after_ms')} bridge.uplink.dead_after_ms: must be larger than heartbeat_ms (${cfg.bridge.uplink.heartbeat_ms})`);
  }
  if (cfg.bridge.uplink.reconnect_min_ms > cfg.bridge.uplink.reconnect_max_ms) {
    problems.push(`${where('/bridge/uplink/reconnect_min_ms')} bridge.uplink.reconnect_min_ms: must not exceed reconnect_max_ms`);
  }
  const tok = cfg.bridge.token;
  if (cfg.bridge.enabled && tok.grant === 'password' && (!tok.username || !tok.password)) {
    problems.push(`${where('/bridge/token/grant')} bridge.token.grant: "password" needs bridge.token.username and bridge.token.password`);
  }
  if (Boolean(cfg.bridge.uplink.cert_file) !== Boolean(cfg.bridge.uplink.key_file)) {
    problems.push(`${where('/bridge/uplink/cert_file')} bridge.uplink.cert_file: cert_file and key_file must be given together`);
  }
  if (Boolean(cfg.broker.tls.cert_file) !== Boolean(cfg.broker.tls.key_file)) {
    problems.push(`${where('/broker/tls/cert_file')} broker.tls.cert_file: cert_file and key_file must be given together`);
  }
  // two enabled listeners on the same fixed address:port
  const seen = new Map<string, string>();
  const listeners: Array<[string, { enabled: boolean; host: string; port: number }]> = [
    ['broker.listeners.tls', cfg.broker.listeners.tls],
    ['broker.listeners.wss', cfg.broker.listeners.wss],
    ['broker.listeners.local', cfg.broker.listeners.local],
    ['api', cfg.api],
    ['metrics', cfg.metrics],
  ];
  for (const [name, l] of listeners) {
    if (!l.enabled || l.port === 0) continue;
    const key = `${l.host}:${l.port}`;
    const other = seen.get(key);
    if (other) {
      problems.push(`${where('/' + name.replace(/\./g, '/') + '/port')} ${name}.port: ${key} is already used by ${other}; give each listener its own port`);
    } else seen.set(key, name);
  }
}

function resolvePaths(data: Record<string, unknown>, baseDir: string): void {
  walkConfig(data, ({ node }, holder, key) => {
    const v = holder[key];
    if (node['x-path']) {
      if (typeof v === 'string' && v !== '') holder[key] = path.resolve(baseDir, v);
      else if (Array.isArray(v)) holder[key] = v.map((s) => (typeof s === 'string' ? path.resolve(baseDir, s) : s));
    } else if (node['x-secret'] && typeof v === 'string' && v.startsWith('file:')) {
      holder[key] = 'file:' + path.resolve(baseDir, v.slice(5));
    }
  });
}

/**
 * Every secret reference must resolve now, except a `file:` inside the state
 * directory that does not exist yet: `connector init` (run by `connector start`)
 * generates those, so a fresh install works on its bundled defaults.
 */
function checkSecrets(data: Record<string, unknown>, env: NodeJS.ProcessEnv, problems: string[], where: (ptr: string) => string, stateDir: string): void {
  walkConfig(data, ({ node, path: keys, dotted }, holder, key) => {
    const v = holder[key];
    if (!node['x-secret'] || typeof v !== 'string') return;
    if (isGeneratedSecret(v, stateDir) && !existsSync(v.slice(5))) return;
    try {
      resolveSecret(v, env);
    } catch (err) {
      problems.push(`${where('/' + keys.join('/'))} ${dotted}: ${(err as Error).message}`);
    }
  });
}

/** A `file:` secret inside the state directory: generated by `connector init` when missing. */
export function isGeneratedSecret(ref: string | undefined, stateDir: string): ref is string {
  if (!ref || !ref.startsWith('file:')) return false;
  const rel = path.relative(stateDir, ref.slice(5));
  return rel !== '' && !rel.startsWith('..') && !path.isAbsolute(rel);
}
