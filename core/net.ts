import type { Server } from 'node:net';
import { StartupError } from './errors.js';

/** Bind a server (`backlog`: the kernel's accept queue, capped by net.core.somaxconn; Node's default 511 without it), turning bind errors into a clear ECONN_LISTEN error that names the listener and the port. */
export function listen(server: Server, host: string, port: number, listenerName: string, configKey: string, backlog?: number): Promise<number> {
  return new Promise((resolve, reject) => {
    const onError = (err: NodeJS.ErrnoException): void => {
      server.off('listening', onListening);
      const why =
        err.code === 'EADDRINUSE'
          ? 'address already in use (another process holds it); stop it or choose another port'
          : err.code === 'EACCES'
            ? 'permission denied (ports below 1024 need CAP_NET_BIND_SERVICE)'
            : err.code === 'EADDRNOTAVAIL'
              ? 'address not available on this host'
              : `${err.code ?? 'error'}: ${err.message}`;
      reject(new StartupError('ECONN_LISTEN', `${listenerName} listener cannot bind ${host}:${port}: ${why} (${configKey})`, { cause: err }));
    };
    const onListening = (): void => {
      server.off('error', onError);
      const addr = server.address();
      resolve(typeof addr === 'object' && addr ? addr.port : port);
    };
    server.once('error', onError);
    server.once('listening', onListening);
    server.listen({ host, port, exclusive: true, ...(backlog !== undefined ? { backlog } : {}) });
  });
}

/** Close a server and destroy its remaining connections after `graceMs`. Resolves once closed; idempotent. */
export function closeServer(server: Server, graceMs = 2000): Promise<void> {
  return new Promise((resolve) => {
    if (!server.listening) return resolve();
    const timer = setTimeout(() => {
      const s = server as Server & { closeAllConnections?: () => void };
      s.closeAllConnections?.();
    }, graceMs);
    timer.unref();
    server.close(() => {
      clearTimeout(timer);
      resolve();
    });
    const s = server as Server & { closeIdleConnections?: () => void };
    s.closeIdleConnections?.();
  });
}

const corkedForTick = new WeakSet<object>();

/**
 * Hold a socket's writes until the next tick, so that everything written to it in this turn of the
 * event loop leaves in one writev (one TLS record, one syscall): the PUBACKs or subscriber frames of
 * one group commit are all written in the same turn. Idempotent within a turn.
 */
export function corkUntilNextTick(socket: { cork(): void; uncork(): void }): void {
  if (corkedForTick.has(socket)) return;
  corkedForTick.add(socket);
  socket.cork();
  process.nextTick(() => {
    corkedForTick.delete(socket);
    socket.uncork();
  });
}
