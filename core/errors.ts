/**
 * One module of error classes with stable string codes.
 *
 * Callers branch on `err.code`, never on the message. Every code is listed in
 * ERROR_CODES with a one-line meaning, and docs/errors.md documents each one with
 * what the operator should do; test/core/errors.test.ts fails when the two
 * disagree or when source code uses a code that is not registered here.
 *
 * ERROR_HTTP carries, for the codes an HTTP client can see, the HTTP status and
 * whether the error's message is written for that client ("client-safe"). The
 * HTTPS API (api/) and any other HTTP surface answer from this table and map
 * nothing by hand; a code not in it answers 500 with a generic message and the
 * public code ECONN_INTERNAL. docs/errors.md holds the same table (tested).
 *
 * Messages must never contain secrets (tokens, passwords, keys).
 */

export const ERROR_CODES = {
  // configuration and start-up
  ECONN_CONFIG_NOT_FOUND: 'configuration file not found',
  ECONN_CONFIG_INVALID: 'configuration failed validation (every error is listed)',
  ECONN_CONFIG_SECRET: 'a secret reference (env:, file:, credential:) could not be resolved or is unsafe',
  ECONN_STATE_DIR: 'the state directory cannot be created, is not writable or has unsafe permissions',
  ECONN_LISTEN: 'a listener could not bind its address (port in use, permission denied)',
  ECONN_SHUTDOWN_TIMEOUT: 'graceful shutdown did not finish within the configured timeout',
  ECONN_USAGE: 'the command line was not understood',
  ECONN_ADMIN: 'the admin socket could not be reached or refused the request',
  ECONN_INTERNAL: 'an unexpected internal error',
  // device identity and access
  ECONN_AUTH_FAILED: 'a device presented missing or invalid credentials',
  ECONN_RATE_LIMITED: 'a source address caused too many refused attempts and is turned away until its budget refills',
  ECONN_TLS_HANDSHAKE: 'a TLS handshake with a client failed (protocol, version, aborted handshake)',
  ECONN_AUTH_CERT: 'a client certificate was refused (chain, validity, revocation, identity)',
  ECONN_AUTH_TOKEN: 'a device token was refused (algorithm, signature, expiry, claims, revocation)',
  ECONN_AUTH_CLIENT_ID: 'the MQTT client id does not equal the authenticated device id',
  ECONN_NOT_AUTHORIZED: 'an authenticated device tried something its identity does not allow',
  ECONN_DEVICE_UNKNOWN: 'the device is not registered',
  ECONN_DEVICE_REVOKED: 'the device is revoked',
  ECONN_DEVICE_EXISTS: 'a device with this id is already registered',
  ECONN_ENROLL_TOKEN: 'the enrollment token is missing, unknown, used up or expired',
  ECONN_REGISTRY_CORRUPT: 'the device registry file is corrupt and was not replaced',
  ECONN_PKI: 'a certificate or CSR could not be parsed, verified or signed',
  ECONN_BAD_REQUEST: 'a request body or parameter failed validation',
  ECONN_PAYLOAD_TOO_LARGE: 'a request body or message is larger than the configured limit',
  ECONN_NOT_FOUND: 'the requested resource does not exist',
  ECONN_METHOD_NOT_ALLOWED: 'the HTTP method is not allowed on this path',
  ECONN_UNSUPPORTED_MEDIA_TYPE: 'the request body has a content type the endpoint does not accept',
  ECONN_REQUEST_TIMEOUT: 'a client took too long to send its request headers or body',
  ECONN_HEADERS_TOO_LARGE: 'the HTTP request headers are larger than the server accepts',
  ECONN_IDEMPOTENCY_CONFLICT: 'an Idempotency-Key is still in use by a request in progress, or was used for another target',
  ECONN_UNAVAILABLE: 'a service the request needs is not available (bridge disabled, journal closed)',
  ECONN_MQTT_PROTOCOL: 'an MQTT client violated the MQTT 3.1.1 specification',
  ECONN_BROKER_LIMIT: 'an MQTT connection exceeded a broker limit (connections, keepalive, packet size)',
  ECONN_CRL: 'a configured CRL file could not be read or parsed',
  // bridge
  ECONN_JOURNAL_FULL: 'the journal reached its byte cap under the reject policy',
  ECONN_JOURNAL_CORRUPT: 'a journal segment has a corrupt record (the tail is truncated at the last good record)',
  ECONN_JOURNAL_IO: 'a journal read, write or fsync failed',
  ECONN_TOO_MANY_UPLOADS: 'a device has too many uploads in progress at once (bridge.journal.max_uploads_per_device)',
  ECONN_DIGEST_MISMATCH: 'a payload did not match its SHA-256 digest',
  ECONN_PROTOCOL: 'a peer sent a malformed or unexpected protocol frame',
  ECONN_UPLINK: 'the uplink to the cloud failed',
  ECONN_CLOUD_TOKEN: 'the cloud token endpoint refused or failed to issue an access token',
  ECONN_CLOSED: 'the component is closed',
} as const;

export type ErrorCode = keyof typeof ERROR_CODES;

/** How an error code is answered over HTTP. */
export interface HttpErrorMapping {
  /** HTTP status code. */
  readonly status: number;
  /** The error's message is written for the client (no internals, no secrets) and is sent as is (redacted, capped). */
  readonly clientSafe: boolean;
}

/**
 * HTTP status and client-safe flag per code. Codes absent here are internal:
 * answered 500, code ECONN_INTERNAL, generic message.
 */
export const ERROR_HTTP: Readonly<Partial<Record<ErrorCode, HttpErrorMapping>>> = Object.freeze({
  ECONN_BAD_REQUEST: { status: 400, clientSafe: true },
  ECONN_PKI: { status: 400, clientSafe: true },
  ECONN_DIGEST_MISMATCH: { status: 400, clientSafe: true },
  ECONN_AUTH_FAILED: { status: 401, clientSafe: true },
  ECONN_AUTH_TOKEN: { status: 401, clientSafe: true },
  ECONN_AUTH_CERT: { status: 401, clientSafe: true },
  ECONN_DEVICE_UNKNOWN: { status: 401, clientSafe: true },
  ECONN_DEVICE_REVOKED: { status: 401, clientSafe: true },
  ECONN_ENROLL_TOKEN: { status: 401, clientSafe: true },
  ECONN_NOT_AUTHORIZED: { status: 403, clientSafe: true },
  ECONN_NOT_FOUND: { status: 404, clientSafe: true },
  ECONN_METHOD_NOT_ALLOWED: { status: 405, clientSafe: true },
  ECONN_REQUEST_TIMEOUT: { status: 408, clientSafe: true },
  ECONN_DEVICE_EXISTS: { status: 409, clientSafe: true },
  ECONN_IDEMPOTENCY_CONFLICT: { status: 409, clientSafe: true },
  ECONN_PAYLOAD_TOO_LARGE: { status: 413, clientSafe: true },
  ECONN_UNSUPPORTED_MEDIA_TYPE: { status: 415, clientSafe: true },
  ECONN_RATE_LIMITED: { status: 429, clientSafe: true },
  ECONN_HEADERS_TOO_LARGE: { status: 431, clientSafe: true },
  ECONN_JOURNAL_FULL: { status: 503, clientSafe: true },
  ECONN_UNAVAILABLE: { status: 503, clientSafe: true },
  ECONN_CLOSED: { status: 503, clientSafe: false },
  ECONN_JOURNAL_IO: { status: 503, clientSafe: false },
});

const INTERNAL_HTTP: HttpErrorMapping = Object.freeze({ status: 500, clientSafe: false });

/** The HTTP mapping of a code (500 / not client-safe for a code that is unknown or internal). */
export function httpErrorOf(code: string | undefined): HttpErrorMapping {
  if (code === undefined || !Object.hasOwn(ERROR_HTTP, code)) return INTERNAL_HTTP;
  return ERROR_HTTP[code as ErrorCode] ?? INTERNAL_HTTP;
}

export class ConnectorError extends Error {
  readonly code: ErrorCode;
  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.code = code;
    this.name = new.target.name;
  }
}

export class ConfigError extends ConnectorError {
  /** Every problem found, each already formatted as `FILE:LINE:COL key.path: message`. */
  readonly problems: readonly string[];
  constructor(code: ErrorCode, problems: readonly string[], options?: { cause?: unknown }) {
    super(code, problems.join('\n'), options);
    this.problems = problems;
  }
}
export class StartupError extends ConnectorError {}
export class AuthenticationError extends ConnectorError {}
export class AuthorizationError extends ConnectorError {}
export class SecurityError extends ConnectorError {}
export class ProtocolError extends ConnectorError {}
export class StorageError extends ConnectorError {}
export class RequestError extends ConnectorError {
  readonly status: number;
  constructor(status: number, code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(code, message, options);
    this.status = status;
  }
}

/** Narrow an unknown thrown value to a ConnectorError code, if it has one. */
export function errorCode(err: unknown): string | undefined {
  if (err && typeof err === 'object' && 'code' in err && typeof (err as { code: unknown }).code === 'string') {
    return (err as { code: string }).code;
  }
  return undefined;
}

/** Exit codes of the `connector` process (documented in docs/operations.md and README). */
export const EXIT = {
  OK: 0,
  FAILURE: 1,
  USAGE: 64, // EX_USAGE
  UNAVAILABLE: 69, // EX_UNAVAILABLE: admin socket not reachable
  SOFTWARE: 70, // EX_SOFTWARE: unhandled error
  CANTCREAT: 73, // EX_CANTCREAT: state directory / listener cannot be created
  CONFIG: 78, // EX_CONFIG
} as const;
