/**
 * The one walker over the configuration schema (core/config/schema.ts), with
 * its one node type. The loader (env overrides, relative paths, secret checks),
 * the README reference generator (daemon/config/docgen.ts) and reload's
 * restart-needed keys (daemon/main.ts) all read the schema through it.
 */
import { configSchema } from './schema.js';

/** The JSON-Schema subset the config schema uses, with its x- annotations. */
export interface SchemaNode {
  type?: string;
  description?: string;
  default?: unknown;
  properties?: Record<string, SchemaNode>;
  patternProperties?: Record<string, SchemaNode>;
  items?: SchemaNode;
  enum?: unknown[];
  minimum?: number;
  maximum?: number;
  pattern?: string;
  /** The value is a secret reference (env:, file:, credential:), never a plain secret. */
  'x-secret'?: boolean;
  /** Changing it needs a restart: reload keeps the running value. */
  'x-restart'?: boolean;
  /** A file path (or list of them), resolved against the config file's directory. */
  'x-path'?: boolean;
}

/** The configuration schema as a SchemaNode tree. */
export const rootSchema: SchemaNode = configSchema as unknown as SchemaNode;

/** One key of the schema, met in declaration order, a section before its keys. */
export interface SchemaEntry {
  /** The key's path from the root, e.g. ['bridge', 'uplink', 'url']. */
  readonly path: readonly string[];
  /** The path joined with dots ('bridge.uplink.url'). */
  readonly dotted: string;
  readonly node: SchemaNode;
  /** A section: a mapping with named keys (the walk goes into it). */
  readonly section: boolean;
}

/** True for a mapping with named keys: the walk descends into it. */
function isSection(node: SchemaNode): boolean {
  return node.type === 'object' && node.properties !== undefined;
}

/**
 * Every key of the schema, depth-first in declaration order, each section
 * before its keys. Bounded by the schema's (finite, acyclic) depth.
 */
export function* schemaEntries(schema: SchemaNode = rootSchema, prefix: readonly string[] = []): Generator<SchemaEntry> {
  for (const [key, node] of Object.entries(schema.properties ?? {})) {
    const path = [...prefix, key];
    const section = isSection(node);
    yield { path, dotted: path.join('.'), node, section };
    if (section) yield* schemaEntries(node, path);
  }
}

type Obj = Record<string, unknown>;
const isObj = (v: unknown): v is Obj => typeof v === 'object' && v !== null && !Array.isArray(v);

/**
 * Walk a configuration value along the schema: `visit` gets every schema key
 * whose holder exists in `data`, with the holder (so it may replace the value).
 * It descends into a section only where the data holds a mapping there.
 */
export function walkConfig(data: Obj, visit: (entry: SchemaEntry, holder: Obj, key: string) => void, schema: SchemaNode = rootSchema): void {
  const step = (node: SchemaNode, holder: Obj, prefix: readonly string[]): void => {
    for (const [key, sub] of Object.entries(node.properties ?? {})) {
      const path = [...prefix, key];
      const section = isSection(sub);
      visit({ path, dotted: path.join('.'), node: sub, section }, holder, key);
      const v = holder[key];
      if (section && isObj(v)) step(sub, v, path);
    }
  };
  step(schema, data, []);
}

/** The value at `path` in a plain object tree (undefined where a step is missing). */
export function valueAt(data: unknown, path: readonly string[]): unknown {
  let v = data;
  for (const k of path) v = isObj(v) ? v[k] : undefined;
  return v;
}

/**
 * The schema path that CONNECTOR_<SECTION>_<KEY> names, given its lowercased
 * underscore-separated tokens (keys may themselves contain underscores); the
 * longest key wins at each level. Undefined when no key matches.
 */
export function matchSchemaPath(tokens: readonly string[], schema: SchemaNode = rootSchema): string[] | undefined {
  const want = tokens.join('_');
  let best: readonly string[] | undefined;
  for (const e of schemaEntries(schema)) {
    if (e.path.join('_') === want && (!best || longerKeysFirst(e.path, best))) best = e.path;
  }
  return best && [...best];
}

/** Of two paths naming the same variable, the one whose first differing key is longer. */
function longerKeysFirst(a: readonly string[], b: readonly string[]): boolean {
  for (let i = 0; i < Math.min(a.length, b.length); i++) {
    if (a[i]!.length !== b[i]!.length) return a[i]!.length > b[i]!.length;
  }
  return false;
}

/** Freeze an object tree in place (the loaded configuration is read-only). */
export function deepFreeze<T>(o: T): T {
  if (o && typeof o === 'object' && !Object.isFrozen(o)) {
    Object.freeze(o);
    for (const v of Object.values(o as Obj)) deepFreeze(v);
  }
  return o;
}
