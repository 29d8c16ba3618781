/**
 * The one root logger (pino, JSON to stdout for journald) and its redaction.
 *
 * Secrets are removed wherever they appear, not only at known paths:
 *  - any property whose name looks like a credential (authorization, password,
 *    token, secret, *_secret, private_key, cookie …) at any depth;
 *  - any string value, including the message itself, that contains a PEM
 *    private key block or a JWT-shaped token.
 * Components get child loggers: `logger.child({ component: 'broker' })`, and
 * per-device children `{ deviceId }`.
 */
import { pino, type Logger, type DestinationStream, type LevelWithSilent } from 'pino';

export type { Logger } from 'pino';

export const REDACTED = '[redacted]';

const SECRET_KEY =
  /^(authorization|proxy-authorization|cookie|set-cookie|password|passwd|pass|token|access_token|refresh_token|id_token|secret|client_secret|private_?key|key_pem|signing_key|enrollment_token|bearer)$|_secret$|_token$|_password$/i;
const PEM_PRIVATE = /-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----[\s\S]*?(-----END [A-Z0-9 ]*PRIVATE KEY-----|$)/g;
const JWT_LIKE = /\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*/g;
const BEARER = /\b(Bearer|Basic)\s+[A-Za-z0-9._~+/=-]{8,}/gi;

export function redactString(s: string): string {
  if (s.length < 16) return s;
  return s.replace(PEM_PRIVATE, REDACTED).replace(JWT_LIKE, REDACTED).replace(BEARER, `$1 ${REDACTED}`);
}

/** Deep copy with secrets removed. Bounded depth; cycles become '[circular]'. */
export function redactValue(value: unknown, depth = 0, seen = new WeakSet<object>()): unknown {
  if (typeof value === 'string') return redactString(value);
  if (value === null || typeof value !== 'object') return value;
  if (depth > 8) return '[depth]';
  if (seen.has(value)) return '[circular]';
  seen.add(value);
  if (Buffer.isBuffer(value) || value instanceof Uint8Array) return `[${value.byteLength} bytes]`;
  if (Array.isArray(value)) return value.map((v) => redactValue(v, depth + 1, seen));
  if (value instanceof Error) {
    const out: Record<string, unknown> = { type: value.name, message: redactString(value.message) };
    const code = (value as { code?: unknown }).code;
    if (code !== undefined) out.code = code;
    if (value.stack) out.stack = redactString(value.stack);
    if (value.cause !== undefined) out.cause = redactValue(value.cause, depth + 1, seen);
    return out;
  }
  if (typeof (value as { toJSON?: unknown }).toJSON === 'function' && !(value instanceof Date)) {
    return redactValue((value as { toJSON: () => unknown }).toJSON(), depth + 1, seen);
  }
  if (value instanceof Date) return value.toISOString();
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(value)) {
    out[k] = SECRET_KEY.test(k) && v !== undefined && v !== null && v !== '' ? REDACTED : redactValue(v, depth + 1, seen);
  }
  return out;
}

export interface LoggerOptions {
  level?: LevelWithSilent;
  /** Where JSON lines go; stdout when absent. Tests pass a stream to inspect output. */
  destination?: DestinationStream;
  base?: Record<string, unknown>;
}

export function createLogger(opts: LoggerOptions = {}): Logger {
  return pino(
    {
      level: opts.level ?? 'info',
      base: opts.base ?? { pid: process.pid },
      timestamp: pino.stdTimeFunctions.isoTime,
      formatters: {
        level: (label) => ({ level: label }),
        log: (obj) => redactValue(obj) as Record<string, unknown>,
      },
      // message strings are scanned too: a token interpolated into a message must not leak
      hooks: {
        logMethod(args, method) {
          const redacted = args.map((a) => (typeof a === 'string' ? redactString(a) : a)) as Parameters<typeof method>;
          method.apply(this, redacted);
        },
      },
      // the err serializer runs after formatters.log; keep pino's standard one but redacted
      serializers: {
        err: (e: unknown) => redactValue(e),
      },
    },
    opts.destination ?? pino.destination({ dest: 1, sync: false }),
  );
}

/** A logger that writes nothing, for components built in unit tests that do not inspect logs. */
export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}
