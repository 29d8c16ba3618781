/**
 * The one root logger and its redaction. Two renderings of the same lines:
 *  - JSON, one object per line (journald, log shippers): when stdout is not a
 *    terminal, or with `log.format: json`;
 *  - pretty, one readable line per event (time, level, [component] device,
 *    message, then the fields) through pino-pretty: when stdout is a terminal,
 *    or with `log.format: pretty` (`npm start` sets it).
 * Redaction runs before either rendering (formatters + hooks below), so both
 * show exactly the same redacted content. An optional LogRing keeps the last
 * warnings and errors (as written, so redacted) for the local status page.
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
import { createRequire } from 'node:module';
import type PinoPretty from 'pino-pretty';

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

export const LOG_FORMATS = ['auto', 'pretty', 'json'] as const;
export type LogFormat = (typeof LOG_FORMATS)[number];

/** One warning or error as the status page shows it (taken from the written, redacted line). */
export interface LogEntry {
  time: string;
  level: string;
  component?: string;
  deviceId?: string;
  code?: string;
  msg: string;
}

const MAX_ENTRY_MSG = 500;

/**
 * The last N warnings and errors, fed by the root logger as one more pino
 * destination (warn and above only): it sees each line after redaction, costs
 * nothing for info/debug lines, and holds at most `size` entries.
 */
export class LogRing {
  private readonly buf: (LogEntry | undefined)[];
  private next = 0;
  private count = 0;

  constructor(readonly size = 20) {
    this.buf = new Array<LogEntry | undefined>(size);
  }

  /** The pino destination (used by createLogger with level 'warn'). */
  readonly stream: DestinationStream = {
    write: (line: string): void => {
      let o: Record<string, unknown>;
      try {
        o = JSON.parse(line) as Record<string, unknown>;
      } catch {
        return;
      }
      this.add(o);
    },
  };

  private add(o: Record<string, unknown>): void {
    const s = (v: unknown): string | undefined => (typeof v === 'string' && v !== '' ? v : undefined);
    const err = typeof o.err === 'object' && o.err !== null ? (o.err as Record<string, unknown>) : undefined;
    let msg = s(o.msg) ?? s(err?.message) ?? '';
    if (msg.length > MAX_ENTRY_MSG) msg = `${msg.slice(0, MAX_ENTRY_MSG)}…`;
    const e: LogEntry = { time: s(o.time) ?? new Date().toISOString(), level: s(o.level) ?? 'warn', msg: redactString(msg) };
    const component = s(o.component);
    const deviceId = s(o.deviceId) ?? s(o.device_id);
    const code = s(o.code) ?? s(err?.code);
    if (component) e.component = component;
    if (deviceId) e.deviceId = deviceId;
    if (code) e.code = code;
    this.buf[this.next] = e;
    this.next = (this.next + 1) % this.size;
    this.count = Math.min(this.count + 1, this.size);
  }

  /** Newest first. */
  entries(): LogEntry[] {
    const out: LogEntry[] = [];
    for (let i = 1; i <= this.count; i++) {
      const e = this.buf[(this.next - i + this.size) % this.size];
      if (e) out.push({ ...e });
    }
    return out;
  }
}

export interface LoggerOptions {
  level?: LevelWithSilent;
  /** Where lines go; stdout when absent. Tests pass a stream to inspect output. */
  destination?: DestinationStream;
  base?: Record<string, unknown>;
  /**
   * `json`: one JSON object per line. `pretty`: one readable line per event (pino-pretty).
   * `auto` (default): pretty when writing to stdout and stdout is a terminal, else JSON.
   */
  format?: LogFormat;
  /** Whether stdout is a terminal (for `auto`); process.stdout.isTTY when absent. */
  isTTY?: boolean;
  /** Also keep the last warnings and errors here (for the status page). */
  ring?: LogRing;
}

/** Whether `format` renders pretty lines: `auto` means a terminal on stdout (never for an explicit destination). */
export function usesPretty(opts: Pick<LoggerOptions, 'format' | 'destination' | 'isTTY'>): boolean {
  const format = opts.format ?? 'auto';
  if (format !== 'auto') return format === 'pretty';
  return !opts.destination && (opts.isTTY ?? process.stdout.isTTY === true);
}

function prettyStream(destination: DestinationStream | undefined, colorize: boolean): DestinationStream {
  // Handed to pino as a plain { write }: pino would otherwise tell pino-pretty its errorKey,
  // which turns `err` back into a multi-line block. Labels and message key are pino's defaults.
  // loaded only for pretty output (a terminal, or log.format: pretty): a daemon logging JSON to
  // journald never needs pino-pretty and its dependencies. createRequire: createLogger is
  // synchronous, and pino-pretty is CommonJS.
  const pinoPretty = createRequire(import.meta.url)('pino-pretty') as typeof PinoPretty;
  const pretty = pinoPretty({
    destination: destination ?? 1,
    sync: destination !== undefined,
    colorize,
    singleLine: true,
    // an error stays on its line too: code and message inline, the stack only in JSON
    errorLikeObjectKeys: [],
    translateTime: 'SYS:yyyy-mm-dd HH:MM:ss.l',
    ignore: 'pid,hostname,component,deviceId,err.stack',
    messageFormat: '{if component}[{component}] {end}{if deviceId}{deviceId}: {end}{msg}',
  });
  return { write: (line: string) => void pretty.write(line) };
}

export function createLogger(opts: LoggerOptions = {}): Logger {
  const pretty = usesPretty(opts);
  const main: DestinationStream = pretty
    ? prettyStream(opts.destination, !opts.destination && (opts.isTTY ?? process.stdout.isTTY === true))
    : (opts.destination ?? pino.destination({ dest: 1, sync: false }));
  const stream = opts.ring
    ? pino.multistream([
        { level: 'trace', stream: main },
        { level: 'warn', stream: opts.ring.stream },
      ])
    : main;
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
    stream,
  );
}

/** A logger that writes nothing, for components built in unit tests that do not inspect logs. */
export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}
