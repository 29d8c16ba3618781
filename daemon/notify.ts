/**
 * systemd notify protocol (sd_notify(3)) and the service watchdog.
 *
 * The service manager passes $NOTIFY_SOCKET, the path of an AF_UNIX
 * SOCK_DGRAM socket; the daemon sends newline-separated KEY=VALUE datagrams:
 *   READY=1 + STATUS=…            once config loaded, journal replayed, every listener bound
 *   STATUS=…                      what the daemon is doing ("12 devices, uplink connected, backlog 0")
 *   RELOADING=1 + MONOTONIC_USEC  when a SIGHUP/`connector reload` starts (systemd ≥ 253 wants both)
 *   READY=1                       when that reload is done
 *   STOPPING=1                    when a graceful shutdown starts
 *   WATCHDOG=1                    every WATCHDOG_USEC/2, ONLY while the event loop is responsive
 *
 * Transport — why `unix-dgram`: Node has no AF_UNIX datagram sockets (`dgram`
 * does UDP only, `net` does streams only; libuv has no unix-dgram handle). The
 * choices were (a) spawning `systemd-notify` per message — it sends from its own
 * PID, which `NotifyAccess=main` rejects, and costs a fork per watchdog ping;
 * (b) `sd-notify`-style bindings to libsystemd — need libsystemd headers at
 * build time and pull in the whole library; (c) `unix-dgram` (Ben Noordhuis, a
 * Node core maintainer; tiny NAN addon: socket/bind/connect/sendto), which is
 * maintained and builds everywhere Node builds. We use (c) as an optional
 * dependency: if the native addon is missing or fails to load, the daemon logs
 * one warning and runs without notifications (under `Type=notify` systemd then
 * times the start out — use a drop-in with `Type=simple`, see docs/operations.md).
 *
 * Limitation: `unix-dgram` copies the address with strncpy, so it cannot reach a
 * Linux abstract socket (`@name`, sun_path starting with NUL). systemd as PID 1
 * always uses a filesystem path (/run/systemd/notify); a manager that hands out
 * an abstract `@…` address gets one warning and no notifications.
 *
 * With no NOTIFY_SOCKET every method is a no-op (no timers, no socket).
 *
 * Watchdog: when WATCHDOG_USEC is set (and WATCHDOG_PID is unset or equals our
 * PID), one timer ticks every min(interval/4, 1 s) and measures its own drift
 * (how late it fired = event-loop lag). Every interval (= WATCHDOG_USEC/2) it
 * sends WATCHDOG=1 if the largest lag seen since the last ping is below
 * interval/2; otherwise it withholds the ping and logs why. A loop blocked for
 * longer than the watchdog timeout therefore sends nothing, and a loop that
 * turns but is starved (each turn blocked for seconds) is not kept alive by a
 * lucky timer either: systemd kills and restarts the daemon (Restart=on-failure).
 */
import { createRequire } from 'node:module';
import type { Logger } from '../core/logger.js';

/** What we use of unix-dgram's socket. */
interface DgramSocket {
  on(event: 'error', cb: (err: Error) => void): void;
  send(buf: Buffer, offset: number, length: number, path: string, cb: (err?: Error) => void): void;
  close(): void;
}
interface UnixDgramModule {
  createSocket(type: 'unix_dgram'): DgramSocket;
}

/** Sends one datagram; injectable for unit tests of the protocol logic. */
export interface NotifyTransport {
  send(message: string): Promise<void>;
  close(): void;
}

/** Load unix-dgram (optional dependency). Returns the module or the load error. */
function loadUnixDgram(): UnixDgramModule | Error {
  try {
    const require = createRequire(import.meta.url);
    return require('unix-dgram') as UnixDgramModule;
  } catch (err) {
    return err as Error;
  }
}

/** A transport to a filesystem-path NOTIFY_SOCKET through unix-dgram. */
function unixDgramTransport(mod: UnixDgramModule, socketPath: string): NotifyTransport {
  const sock = mod.createSocket('unix_dgram');
  // errors are reported through the send callback; keep a listener so an emitted one cannot crash us
  sock.on('error', () => {});
  let closed = false;
  return {
    send(message: string): Promise<void> {
      if (closed) return Promise.resolve();
      const buf = Buffer.from(message, 'utf8');
      return new Promise((resolve, reject) => {
        try {
          sock.send(buf, 0, buf.length, socketPath, (err?: Error) => (err ? reject(err) : resolve()));
        } catch (err) {
          reject(err as Error);
        }
      });
    },
    close(): void {
      if (closed) return;
      closed = true;
      try {
        sock.close();
      } catch {}
    },
  };
}

export interface NotifierOptions {
  logger: Logger;
  env?: NodeJS.ProcessEnv;
  /** Builds the current STATUS= text (called every statusIntervalMs while running). */
  statusText?: () => string;
  /** How often STATUS= is refreshed (only sent when the text changed). Default 5000. */
  statusIntervalMs?: number;
  /** Override the transport (tests). Default: unix-dgram to $NOTIFY_SOCKET. */
  transport?: NotifyTransport;
  /** Current CLOCK_MONOTONIC in µs (default process.hrtime, which is CLOCK_MONOTONIC on Linux). */
  monotonicUsec?: () => bigint;
}

export interface WatchdogState {
  enabled: boolean;
  interval_ms: number;
  lag_threshold_ms: number;
  pings: number;
  withheld: number;
  last_lag_ms: number;
}

/** Parse WATCHDOG_USEC / WATCHDOG_PID. Returns the timeout in ms, or 0 when the watchdog is off for us. */
export function watchdogTimeoutMs(env: NodeJS.ProcessEnv, pid = process.pid): number {
  const usec = env.WATCHDOG_USEC;
  if (!usec || !/^\d+$/.test(usec)) return 0;
  const wpid = env.WATCHDOG_PID;
  if (wpid && wpid !== String(pid)) return 0;
  const ms = Number(BigInt(usec) / 1000n);
  return ms > 0 ? ms : 0;
}

/** Make a STATUS= value safe: one line, bounded. */
export function oneLine(text: string): string {
  return text.replace(/[\r\n]+/g, ' ').slice(0, 400);
}

export class SystemdNotifier {
  private readonly log: Logger;
  private readonly env: NodeJS.ProcessEnv;
  private transport: NotifyTransport | undefined;
  private readonly socketPath: string | undefined;
  private statusTimer: NodeJS.Timeout | undefined;
  private watchdogTimer: NodeJS.Timeout | undefined;
  private lastStatus = '';
  private sendErrorLogged = false;
  private closed = false;
  private readonly wd: WatchdogState = { enabled: false, interval_ms: 0, lag_threshold_ms: 0, pings: 0, withheld: 0, last_lag_ms: 0 };
  private withholding = false;

  constructor(private readonly opts: NotifierOptions) {
    this.log = opts.logger.child({ component: 'notify' });
    this.env = opts.env ?? process.env;
    const sp = this.env.NOTIFY_SOCKET;
    this.socketPath = sp && sp.length > 0 ? sp : undefined;
  }

  /** True when a NOTIFY_SOCKET is set and usable. */
  get active(): boolean {
    return this.transport !== undefined;
  }

  watchdog(): WatchdogState {
    return { ...this.wd };
  }

  /** Open the socket (no I/O beyond socket(2)) and start the watchdog and status timers. Idempotent. */
  start(): void {
    if (this.transport || this.closed || !this.socketPath) return;
    if (this.opts.transport) {
      this.transport = this.opts.transport;
    } else if (this.socketPath.startsWith('@')) {
      this.log.warn(
        { notify_socket: this.socketPath },
        'NOTIFY_SOCKET is an abstract socket, which unix-dgram cannot address; running without systemd notifications (systemd itself uses /run/systemd/notify)',
      );
      return;
    } else {
      const mod = loadUnixDgram();
      if (mod instanceof Error) {
        this.log.warn(
          { err: mod, notify_socket: this.socketPath },
          'NOTIFY_SOCKET is set but the optional unix-dgram module cannot be loaded; running without systemd notifications (under Type=notify systemd will time the start out: reinstall with npm ci, or use a Type=simple drop-in)',
        );
        return;
      }
      try {
        this.transport = unixDgramTransport(mod, this.socketPath);
      } catch (err) {
        this.log.warn({ err, notify_socket: this.socketPath }, 'cannot create the systemd notify socket; running without systemd notifications');
        return;
      }
    }
    this.startWatchdog();
    if (this.opts.statusText) {
      this.statusTimer = setInterval(() => this.refreshStatus(), this.opts.statusIntervalMs ?? 5000);
      this.statusTimer.unref();
    }
  }

  private startWatchdog(): void {
    const timeout = watchdogTimeoutMs(this.env);
    if (timeout === 0) return;
    const interval = Math.max(1, Math.floor(timeout / 2));
    const threshold = Math.max(1, Math.floor(interval / 2));
    const tick = Math.max(10, Math.min(1000, Math.floor(interval / 4)));
    Object.assign(this.wd, { enabled: true, interval_ms: interval, lag_threshold_ms: threshold });
    this.log.info({ watchdog_timeout_ms: timeout, ping_interval_ms: interval, lag_threshold_ms: threshold }, 'systemd watchdog enabled');
    let expected = performanceNow() + tick;
    let lastPing = performanceNow();
    let maxLag = 0;
    const onTick = (): void => {
      const now = performanceNow();
      const lag = Math.max(0, now - expected);
      maxLag = Math.max(maxLag, lag);
      this.wd.last_lag_ms = Math.round(lag);
      if (now - lastPing >= interval - tick / 2) {
        if (maxLag < threshold) {
          if (this.withholding) this.log.info({ lag_ms: Math.round(maxLag) }, 'event loop responsive again: watchdog pings resumed');
          this.withholding = false;
          this.wd.pings++;
          this.send('WATCHDOG=1');
        } else {
          this.wd.withheld++;
          if (!this.withholding) {
            this.log.warn(
              { lag_ms: Math.round(maxLag), lag_threshold_ms: threshold },
              `event loop blocked for ${Math.round(maxLag)} ms (limit ${threshold} ms): withholding the watchdog ping; systemd restarts the daemon if this lasts beyond WatchdogSec`,
            );
          }
          this.withholding = true;
        }
        lastPing = now;
        maxLag = 0;
      }
      expected = performanceNow() + tick;
      this.watchdogTimer = setTimeout(onTick, tick);
      this.watchdogTimer.unref();
    };
    // the first ping right away tells systemd the watchdog is being served
    this.wd.pings++;
    this.send('WATCHDOG=1');
    this.watchdogTimer = setTimeout(onTick, tick);
    this.watchdogTimer.unref();
  }

  private refreshStatus(): void {
    if (!this.opts.statusText) return;
    let text: string;
    try {
      text = oneLine(this.opts.statusText());
    } catch (err) {
      this.log.debug({ err }, 'status text failed');
      return;
    }
    if (text === this.lastStatus) return;
    this.lastStatus = text;
    this.send(`STATUS=${text}`);
  }

  private currentStatus(fallback: string): string {
    if (!this.opts.statusText) return fallback;
    try {
      return oneLine(this.opts.statusText());
    } catch {
      return fallback;
    }
  }

  /** Send raw KEY=VALUE lines. Never throws; a failure is logged once. */
  send(message: string): Promise<void> {
    const t = this.transport;
    if (!t) return Promise.resolve();
    return t.send(message).then(
      () => {
        this.sendErrorLogged = false;
      },
      (err: unknown) => {
        if (!this.sendErrorLogged) this.log.warn({ err, notify_socket: this.socketPath }, 'cannot send to the systemd notify socket');
        this.sendErrorLogged = true;
      },
    );
  }

  /** READY=1 with the current status. */
  ready(status?: string): Promise<void> {
    const text = oneLine(status ?? this.currentStatus('ready'));
    this.lastStatus = text;
    return this.send(`READY=1\nSTATUS=${text}`);
  }

  status(text: string): Promise<void> {
    this.lastStatus = oneLine(text);
    return this.send(`STATUS=${this.lastStatus}`);
  }

  /** RELOADING=1 with MONOTONIC_USEC (systemd ≥ 253 requires it to match the reload to its start). */
  reloading(): Promise<void> {
    const usec = (this.opts.monotonicUsec ?? (() => process.hrtime.bigint() / 1000n))();
    return this.send(`RELOADING=1\nMONOTONIC_USEC=${usec}\nSTATUS=reloading configuration`);
  }

  /** The reload finished (applied or refused): READY=1 again. */
  reloaded(status?: string): Promise<void> {
    return this.ready(status);
  }

  /** STOPPING=1. Watchdog pings continue until close(): a shutdown that hangs the event loop is still caught. */
  stopping(): Promise<void> {
    if (this.statusTimer) clearInterval(this.statusTimer);
    this.statusTimer = undefined;
    return this.send('STOPPING=1\nSTATUS=stopping');
  }

  private stopTimers(): void {
    if (this.statusTimer) clearInterval(this.statusTimer);
    if (this.watchdogTimer) clearTimeout(this.watchdogTimer);
    this.statusTimer = undefined;
    this.watchdogTimer = undefined;
  }

  /** Stop timers and close the socket. Idempotent. */
  close(): void {
    this.closed = true;
    this.stopTimers();
    const t = this.transport;
    this.transport = undefined;
    t?.close();
  }
}

function performanceNow(): number {
  return performance.now();
}
