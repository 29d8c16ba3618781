/**
 * The one source of truth for configuration: every key's type, default and
 * description. docs/configuration.md is generated from this (`node
 * dist/daemon/config/docgen.js`) and a test checks it is current; connector.yaml
 * is the commented reference and a test checks that it loads.
 *
 * Conventions:
 *  - keys are snake_case; durations say their unit in the name (`_ms`, `_s`, `_days`);
 *  - relative paths are resolved against the directory of the config file;
 *  - a key marked `x-secret` must be a reference (`env:NAME`, `file:/path`,
 *    `credential:NAME`), never the secret itself;
 *  - a key marked `x-restart` needs a restart to change; SIGHUP logs that and
 *    keeps the running value.
 */

import { Type, type Static, type TSchema, type TProperties } from '@sinclair/typebox';

type Opts = Record<string, unknown>;
const SECRET_REF = '^(env:[A-Za-z_][A-Za-z0-9_]*|file:.+|credential:[A-Za-z0-9_.@-]+)$';

function obj<T extends TProperties>(description: string, properties: T, extra: Opts = {}) {
  return Type.Object(properties, { description, additionalProperties: false, default: {}, ...extra });
}
function int(def: number, min: number, max: number, description: string, extra: Opts = {}) {
  return Type.Integer({ default: def, minimum: min, maximum: max, description, ...extra });
}
function str(def: string, description: string, extra: Opts = {}) {
  return Type.String({ default: def, description, ...extra });
}
function bool(def: boolean, description: string, extra: Opts = {}) {
  return Type.Boolean({ default: def, description, ...extra });
}
function oneOf<const V extends readonly string[]>(def: V[number], values: V, description: string, extra: Opts = {}) {
  return Type.Unsafe<V[number]>({ type: 'string', enum: [...values], default: def, description, ...extra });
}
function secret(description: string) {
  return Type.Optional(Type.String({ pattern: SECRET_REF, description, 'x-secret': true }));
}
function strList(description: string, def: string[] = [], extra: Opts = {}) {
  return Type.Array(Type.String({ minLength: 1 }), { default: def, description, ...extra });
}
const port = (def: number, what: string) =>
  int(def, 0, 65535, `TCP port of ${what} (1-65535; 0 picks a free port, for tests)`, { 'x-restart': true });
const host = (def: string, what: string) => str(def, `address ${what} binds to`, { minLength: 1, 'x-restart': true });

const AUTH_MODES = ['cert', 'jwt', 'cert+jwt', 'cert|jwt'] as const;

const aclRule = Type.Object(
  {
    allow: Type.Union([Type.Literal('publish'), Type.Literal('subscribe'), Type.Literal('both')], { description: 'what the rule allows' }),
    topic: Type.String({ minLength: 1, description: 'MQTT topic filter (+ and # allowed)' }),
  },
  { additionalProperties: false },
);
export type AclRule = Static<typeof aclRule>;
const aclRules = Type.Array(aclRule, {
  default: [],
  description: 'extra topic rules; each {allow: publish|subscribe|both, topic: FILTER}; `{device}` in a topic is replaced by the device id',
});

export const configSchema = obj('edge-connector configuration', {
  daemon: obj('process-wide settings', {
    state_dir: str('/var/lib/edge-connector', 'directory for the registry, PKI, keys, journal and admin socket (created 0700)', { minLength: 1, 'x-restart': true, 'x-path': true }),
    shutdown_timeout_ms: int(10000, 100, 600000, 'how long a graceful shutdown may take before it is forced'),
    server_name: str('edge-connector', 'name of this gateway, used in logs and as default JWT issuer', { minLength: 1 }),
  }),
  log: obj('logging', {
    level: oneOf('info', ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'], 'minimum level written to stdout'),
    format: oneOf('auto', ['auto', 'pretty', 'json'], 'how lines are written: json = one JSON object per line (journald, log shippers), pretty = one readable line per event (time, level, component, device, message, fields), auto = pretty when stdout is a terminal, else json; redaction applies to both', { 'x-restart': true }),
  }),
  broker: obj('the embedded MQTT 3.1.1 broker (aedes) devices connect to', {
    listeners: obj('device-facing listeners', {
      tls: obj('MQTT over TLS', {
        enabled: bool(true, 'serve MQTT over TLS', { 'x-restart': true }),
        host: host('0.0.0.0', 'the MQTT/TLS listener'),
        port: port(8883, 'the MQTT/TLS listener'),
        auth: oneOf('cert|jwt', [...AUTH_MODES], 'how devices authenticate: client certificate, JWT as password, both, or either'),
      }),
      wss: obj('MQTT over secure WebSocket', {
        enabled: bool(true, 'serve MQTT over WSS', { 'x-restart': true }),
        host: host('0.0.0.0', 'the MQTT/WSS listener'),
        port: port(8884, 'the MQTT/WSS listener'),
        path: str('/mqtt', 'HTTP path of the WebSocket endpoint', { pattern: '^/', 'x-restart': true }),
        auth: oneOf('cert|jwt', [...AUTH_MODES], 'how devices authenticate'),
      }),
      local: obj('plain MQTT for applications on the gateway itself (loopback only)', {
        enabled: bool(false, 'serve plain MQTT on a loopback address', { 'x-restart': true }),
        host: host('127.0.0.1', 'the local listener (must be a loopback address)'),
        port: port(1883, 'the local plain MQTT listener'),
        auth: oneOf('none', ['none', 'jwt'], 'none = anonymous local applications (logged as a warning), jwt = device tokens'),
        acl: aclRules,
      }),
    }),
    tls: obj('TLS of the device listeners', {
      cert_file: str('', 'server certificate (PEM); empty = the one the local PKI issued', { 'x-path': true }),
      key_file: str('', 'server private key (PEM, mode 0600); empty = the local PKI one', { 'x-path': true }),
      min_version: oneOf('TLSv1.2', ['TLSv1.2', 'TLSv1.3'], 'lowest TLS version accepted'),
      trusted_ca_files: strList('extra CA certificates (PEM) trusted for device certificates, besides the local device CA', [], { 'x-path': true }),
      crl_files: strList('CRL files (PEM or DER) checked for device certificates; reloaded on SIGHUP and on change', [], { 'x-path': true }),
      identity_from: oneOf('cn', ['cn', 'san_uri'], 'where the device id is read from a client certificate'),
      san_uri_prefix: str('urn:device:', 'with identity_from=san_uri: the SAN URI prefix before the device id'),
    }),
    limits: obj('limits with safe defaults', {
      max_payload_bytes: int(16777216, 1, 268435455, 'largest MQTT publish payload accepted (up to the MQTT maximum 268435455); a payload over 1 MiB is journaled as a blob and sent upstream in chunks; a device announcing a larger packet is disconnected'),
      large_publish_bytes: int(262144, 1024, 268435455, 'a PUBLISH whose remaining length is above this is a large publish: it needs room in large_inflight_budget_bytes before the broker reads its body'),
      large_inflight_budget_bytes: int(67108864, 1048576, 4294967296, 'bytes of large publishes held in memory at once, across all devices (aedes holds a whole packet); when spent, the broker stops reading from the sockets sending large publishes until room frees (they wait, they do not fail); one publish larger than the budget is read alone; 2 MiB of it is kept for the decrypted chunks being copied into those publishes'),
      max_connections: int(10000, 1, 1000000, 'concurrent device connections across all listeners'),
      max_topic_depth: int(16, 1, 128, 'most topic levels in a topic name or filter'),
      max_topic_bytes: int(1024, 16, 65535, 'longest topic name or filter in bytes'),
      queue_limit: int(100, 1, 100000, 'per-client queue of messages waiting to be written (aedes queueLimit)'),
      keepalive_min_s: int(0, 0, 65535, 'smallest keepalive accepted (0 = any)'),
      keepalive_max_s: int(1200, 0, 65535, 'largest keepalive accepted (0 disables the check)'),
      connect_timeout_ms: int(10000, 100, 600000, 'time a new connection has to send CONNECT'),
      max_handshakes: int(
        256,
        1,
        100000,
        'TLS handshakes in progress at once (MQTT/TLS and MQTT/WSS together); further new connections are accepted and wait their turn in arrival order, so a reconnect storm is paced instead of timing out (each handshake costs ~1-3 ms of CPU); their handshake timeout (connect_timeout_ms) starts when their turn comes. A handshake holds its slot for its round trips too: on slow links (cellular) fewer slots leave the CPU idle, so keep it above the handshakes per second the gateway can do times the round-trip time',
      ),
      handshake_queue_timeout_ms: int(60000, 1000, 600000, 'longest a new TLS connection waits for its handshake to start (max_handshakes); after it the connection is closed (not counted as a refusal of its source)'),
      max_retained_per_device: int(100, 0, 1000000, 'retained messages one device may hold; a retained PUBLISH over it is refused (connection closed, logged); 0 = devices may not retain'),
      max_retained_bytes_per_device: int(1048576, 0, 268435455, 'bytes (payload + topic) of the retained messages one device may hold; a retained PUBLISH over it is refused (connection closed, logged)'),
      refused_per_source_per_s: int(
        2,
        0,
        100000,
        'refused connection attempts (failed TLS handshake, refused credentials) one source address may cause per second on average; past its burst, its new connections are closed before the TLS handshake until the budget refills (0 = no limit)',
      ),
      refused_per_source_burst: int(30, 1, 1000000, 'refused connection attempts one source address may cause in a burst before refused_per_source_per_s applies'),
    }),
    acl: obj('topic authorization beyond the built-in devices/{id}/... namespace', {
      groups: Type.Record(Type.String({ pattern: '^[A-Za-z0-9_.-]+$' }), aclRules, {
        default: {},
        description: 'extra rules per device group (a device joins a group through metadata.group)',
      }),
    }),
  }),
  identity: obj('device identity: PKI, tokens, registry', {
    jwt: obj('device JWTs issued by this connector', {
      algorithm: oneOf('ES256', ['ES256', 'EdDSA'], 'signing algorithm of new tokens (verification accepts only ES256 and EdDSA)'),
      issuer: str('edge-connector', 'iss claim of issued tokens, required on verification'),
      audience: str('edge-devices', 'aud claim of issued tokens, required on verification'),
      ttl_s: int(86400, 60, 31536000, 'lifetime of an issued device token'),
      clock_skew_s: int(30, 0, 600, 'tolerance for exp/nbf/iat'),
      renew_grace_s: int(3600, 0, 2592000, 'how long after expiry a token may still be renewed'),
    }),
    pki: obj('local PKI (device CA and server certificate)', {
      device_cert_validity_days: int(365, 1, 3650, 'validity of device certificates signed by the device CA'),
      server_cert_validity_days: int(90, 1, 825, 'validity of the broker/API server certificate'),
      server_cert_renew_before_days: int(30, 1, 365, 'renew the server certificate this long before it expires'),
      ca_validity_days: int(3650, 30, 36500, 'validity of a new device CA'),
      server_names: strList('DNS names and IP addresses in the server certificate SAN', ['localhost', '127.0.0.1', '::1']),
    }),
    enrollment_default_ttl_s: int(86400, 60, 31536000, 'default lifetime of an enrollment token'),
  }),
  api: obj('registration and upload HTTPS API', {
    enabled: bool(true, 'serve the HTTPS API', { 'x-restart': true }),
    host: host('0.0.0.0', 'the HTTPS API'),
    port: port(8443, 'the HTTPS API'),
    max_body_bytes: int(65536, 1024, 16777216, 'largest JSON request body'),
    max_upload_bytes: int(1073741824, 1, 1099511627776, 'largest HTTP upload (POST /api/publish/{device_id})'),
    bootstrap_ca_files: strList('CA certificates whose client certificates may register devices without an enrollment token', [], { 'x-path': true }),
    refused_per_source_per_s: int(
      2,
      0,
      100000,
      'requests refused for bad credentials (401: enrollment token, device token, certificate) or malformed HTTP one source address may cause per second on average; past its burst, its requests are answered 429 ECONN_RATE_LIMITED before any check until the budget refills (0 = no limit)',
    ),
    refused_per_source_burst: int(30, 1, 1000000, 'requests refused for bad credentials one source address may cause in a burst before refused_per_source_per_s applies'),
  }),
  bridge: obj('the durable uplink of device messages to the cloud', {
    enabled: bool(true, 'forward device messages to the cloud', { 'x-restart': true }),
    topics: strList('topic filters of device publishes that go upstream', ['devices/+/#']),
    qos0: oneOf('journal', ['journal', 'best_effort'], 'QoS 0 uplink messages: journal them like QoS 1, or forward only while the link is up'),
    journal: obj('on-disk journal (outbox)', {
      max_bytes: int(1073741824, 1048576, 1099511627776, 'byte cap of the journal on disk'),
      overflow: oneOf('reject', ['reject', 'drop-oldest'], 'when full: reject new messages (devices are back-pressured) or drop the oldest (counted and logged)'),
      ttl_s: int(604800, 0, 31536000, 'drop messages older than this that the cloud has not acknowledged (0 = never)'),
      max_message_bytes: int(1073741824, 1, 1099511627776, 'largest single message'),
      segment_bytes: int(67108864, 65536, 4294967295, 'size at which a journal segment is closed and a new one started'),
      fsync: oneOf('batch', ['batch', 'always', 'never'], 'batch = group commit (one fsync for all writers within max delay), always = one fsync per record, never = OS decides (loses data on power cut)'),
      fsync_max_delay_ms: int(2, 0, 1000, 'with fsync=batch: longest a record waits for its fsync; longer = fewer fsyncs and less flash wear per message (each fsync rewrites a 4 KiB page), shorter = lower latency'),
      memory_cache_bytes: int(8388608, 0, 1073741824, 'recent records kept in memory so the uplink sends them without reading the disk back (0 = always read from disk)'),
      max_uploads_per_device: int(4, 1, 1024, 'HTTP uploads one device may have in progress at once (more get 429 ECONN_TOO_MANY_UPLOADS)'),
    }),
    uplink: obj('outbound WSS connection to the cloud ingest', {
      url: str('wss://127.0.0.1:9443/ingest', 'cloud ingest URL; must be wss://', { pattern: '^wss://' }),
      ca_file: str('', 'CA (PEM) to verify the cloud with, besides the system store; empty = system store only', { 'x-path': true }),
      cert_file: str('', 'client certificate for mTLS to the cloud (optional)', { 'x-path': true }),
      key_file: str('', 'client key for mTLS to the cloud (optional)', { 'x-path': true }),
      min_tls_version: oneOf('TLSv1.2', ['TLSv1.2', 'TLSv1.3'], 'lowest TLS version'),
      chunk_size: int(262144, 1024, 16777216, 'largest chunk of a message payload in one frame'),
      // throughput ≤ window / the cloud's ack round trip (its group commit: 15–50 ms under load); 256 capped a
      // closed loop at 5 644 msg/s where 2 048 reached 16 964 (bench/probe.mjs --closed 100, same machine, back to
      // back); window_bytes still bounds the memory of large messages
      window_messages: int(4096, 1, 65536, 'most messages sent and not yet acknowledged'),
      window_bytes: int(16777216, 65536, 1073741824, 'most payload bytes sent and not yet acknowledged'),
      heartbeat_ms: int(5000, 100, 300000, 'interval of heartbeats in both directions'),
      dead_after_ms: int(15000, 300, 900000, 'link is dead when nothing (ack, heartbeat) arrived for this long'),
      reconnect_min_ms: int(250, 10, 60000, 'first reconnect delay (exponential backoff with jitter)'),
      reconnect_max_ms: int(30000, 100, 3600000, 'largest reconnect delay'),
      signing_secret: secret('optional HMAC-SHA256 key to sign the upgrade request (X-Signature)'),
    }),
    token: obj('OAuth2 access token for the uplink', {
      url: str('https://127.0.0.1:9443/oauth/token', 'token endpoint', { pattern: '^https://' }),
      grant: oneOf('client_credentials', ['client_credentials', 'password'], 'OAuth2 grant type'),
      client_id: str('edge-connector', 'OAuth2 client id', { minLength: 1 }),
      client_secret: secret('OAuth2 client secret'),
      username: str('', 'resource owner, with grant=password'),
      password: secret('resource owner password, with grant=password'),
      scope: str('ingest', 'requested scope'),
      renew_before_s: int(60, 1, 86400, 'renew the access token this long before it expires (or at 80 % of its lifetime if shorter)'),
    }),
  }),
  metrics: obj('Prometheus metrics and health endpoints', {
    enabled: bool(true, 'serve /metrics, /healthz, /readyz and the status page (/ and /status.json)', { 'x-restart': true }),
    host: str('127.0.0.1', 'address the metrics endpoint and the status page bind to; keep it on loopback (they have no authentication; check-config warns about any other address)', { minLength: 1, 'x-restart': true }),
    port: port(9464, 'the metrics endpoint'),
    uplink_stale_after_s: int(120, 1, 86400, 'not ready when the oldest unacknowledged message is older than this'),
  }),
});

/** The validated, defaulted, frozen configuration every component receives (or a slice of it). */
export type Config = Static<typeof configSchema>;
export type { TSchema };
