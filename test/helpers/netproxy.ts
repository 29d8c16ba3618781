/**
 * A TCP proxy on 127.0.0.1 that a fault test puts between the uplink and the
 * cloud, to make the network misbehave the ways real ones do:
 * - `forward`: pass bytes both ways;
 * - `blackhole`: a silent cut — bytes are swallowed in both directions, no FIN,
 *   no RST; connections opened meanwhile are accepted and then hear nothing.
 *   A connection that was cut stays cut (its stream has a gap); new ones
 *   forward again once the mode is back to `forward`;
 * - `refuse`: new connections are reset at once (a service that is down);
 * - `slow`: every chunk is delayed by `delayMs` and the rate is held near
 *   `bytesPerSecond` in each direction.
 */
import net from 'node:net';

export type ProxyMode = 'forward' | 'blackhole' | 'slow' | 'refuse';

interface Pair {
  client: net.Socket;
  server: net.Socket;
  cut: boolean;
}

export class NetProxy {
  mode: ProxyMode = 'forward';
  delayMs = 50;
  bytesPerSecond = 256 * 1024;
  /** Connections accepted so far. */
  accepted = 0;
  private readonly pairs = new Set<Pair>();
  private waiters: { n: number; resolve: () => void }[] = [];
  private server: net.Server | undefined;

  constructor(private readonly targetPort: number) {}

  async start(): Promise<number> {
    this.server = net.createServer((client) => this.accept(client));
    await new Promise<void>((resolve) => this.server!.listen(0, '127.0.0.1', resolve));
    return (this.server.address() as net.AddressInfo).port;
  }

  /** Switch mode; a blackhole cuts every open connection for good. */
  set(mode: ProxyMode): void {
    this.mode = mode;
    if (mode === 'blackhole') for (const p of this.pairs) p.cut = true;
  }

  /** Resolve once `n` connections in total were accepted (bounded). */
  waitAccepted(n: number, timeoutMs = 30_000): Promise<void> {
    if (this.accepted >= n) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const w = { n, resolve: () => (clearTimeout(timer), resolve()) };
      const timer = setTimeout(() => {
        this.waiters = this.waiters.filter((x) => x !== w);
        reject(new Error(`${this.accepted} of ${n} connections through the proxy within ${timeoutMs} ms`));
      }, timeoutMs);
      this.waiters.push(w);
    });
  }

  private accept(client: net.Socket): void {
    if (this.mode === 'refuse') {
      client.resetAndDestroy();
      return;
    }
    this.accepted++;
    this.waiters = this.waiters.filter((w) => (this.accepted >= w.n ? (w.resolve(), false) : true));
    const server = net.connect(this.targetPort, '127.0.0.1');
    const pair: Pair = { client, server, cut: this.mode === 'blackhole' };
    this.pairs.add(pair);
    const drop = (): void => {
      this.pairs.delete(pair);
      client.destroy();
      server.destroy();
    };
    client.on('error', drop);
    server.on('error', drop);
    // a cut connection never closes by itself: only the peers' own timeouts end it
    client.on('close', () => (pair.cut ? undefined : drop()));
    server.on('close', () => (pair.cut ? undefined : drop()));
    this.pipe(pair, client, server);
    this.pipe(pair, server, client);
  }

  private pipe(pair: Pair, from: net.Socket, to: net.Socket): void {
    let nextAt = 0;
    from.on('data', (chunk: Buffer) => {
      if (pair.cut) return;
      if (this.mode !== 'slow') {
        to.write(chunk);
        return;
      }
      // hold the rate: each chunk leaves no earlier than the previous one plus its transmission time
      const now = Date.now();
      nextAt = Math.max(nextAt, now + this.delayMs) + Math.ceil((chunk.length * 1000) / this.bytesPerSecond);
      from.pause();
      setTimeout(() => {
        if (!pair.cut && !to.destroyed) to.write(chunk);
        from.resume();
      }, nextAt - now);
    });
  }

  async close(): Promise<void> {
    for (const p of this.pairs) {
      p.client.destroy();
      p.server.destroy();
    }
    this.pairs.clear();
    await new Promise<void>((resolve) => (this.server ? this.server.close(() => resolve()) : resolve()));
  }
}
