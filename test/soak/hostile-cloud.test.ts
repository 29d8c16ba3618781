/**
 * Fault suite — a hostile cloud, end to end: the real connector process's
 * uplink goes through a test-owned switch on 127.0.0.1 that first leads to a
 * fake cloud (TLS with the real cloud's certificate, WebSocket, protocol v2)
 * speaking garbage after a valid WELCOME — random bytes, text, unknown frame
 * types, a header lying about its length, a second WELCOME, an ACK for
 * positions never sent, ACKs of ids never sent (the gateway's next ids among
 * them, predicted from the ones seen), a frame larger than the protocol allows —
 * one attack per connection. The connector must drop the link with a clear log
 * line for every malformed frame and reconnect (an ACK of ids not in flight is
 * ignored, as a late duplicate ACK legitimately is, and frees nothing), never
 * crash, keep PUBACKing a device, and lose nothing: once the switch leads to the real cloud, every
 * acknowledged message is delivered exactly once and in order.
 * (test/bridge/uplink.test.ts holds the in-process versions of these attacks.)
 */
import t from 'tap';
import https from 'node:https';
import net from 'node:net';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { WebSocketServer, type WebSocket } from 'ws';
import { FRAME_MAGIC, LIMITS } from '../../protocol/codec.js';
import { SUBPROTOCOL_V2, decodeFrameV2, encodeFrameV2, type FrameV2 } from '../../protocol/v2.js';
import { tempDir } from '../helpers/daemon.js';
import { addDevice, deliveryFigures, formatFigures, Publisher, sentinelsIn, startSite, tail } from '../helpers/fleet.js';

t.setTimeout(240_000);

/** A TCP switch: every new connection goes to the current target; switching cuts the open ones. */
class Switch {
  target: number;
  private readonly open = new Set<net.Socket>();
  private server: net.Server | undefined;
  constructor(target: number) {
    this.target = target;
  }
  async start(t: { teardown(fn: () => unknown): void }): Promise<number> {
    this.server = net.createServer((client) => {
      const upstream = net.connect(this.target, '127.0.0.1');
      this.open.add(client).add(upstream);
      const drop = (): void => {
        client.destroy();
        upstream.destroy();
        this.open.delete(client);
        this.open.delete(upstream);
      };
      client.on('error', drop).on('close', drop).pipe(upstream);
      upstream.on('error', drop).on('close', drop).pipe(client);
    });
    await new Promise<void>((resolve) => this.server!.listen(0, '127.0.0.1', resolve));
    t.teardown(() => {
      for (const s of this.open) s.destroy();
      this.server?.close();
    });
    return (this.server.address() as net.AddressInfo).port;
  }
  to(port: number): void {
    this.target = port;
    for (const s of this.open) s.destroy();
    this.open.clear();
  }
}

/** `dropped`: the connector must drop the link for it; an ACK of ids not in flight is ignored instead (a late duplicate ACK is legitimate). */
type Attack = { name: string; dropped: boolean; run: (ws: WebSocket, firstBatch: Promise<string[]>) => void };

const send = (ws: WebSocket, f: FrameV2): void => ws.send(encodeFrameV2(f));

const ATTACKS: Attack[] = [
  { name: 'random bytes', dropped: true, run: (ws) => ws.send(randomBytes(200)) },
  { name: 'a text frame', dropped: true, run: (ws) => ws.send('{"type":"ACK","upto":1e12}') },
  { name: 'an unknown frame type', dropped: true, run: (ws) => ws.send(Buffer.from([FRAME_MAGIC, 2, 0x77, 0, 0, 0, 0, 0])) },
  // header: magic, version, type, flags, u32 body length
  { name: 'a header claiming 2 GiB of body', dropped: true, run: (ws) => ws.send(Buffer.from([FRAME_MAGIC, 2, 0x04, 0, 0x7f, 0xff, 0xff, 0xff, 0x7b])) },
  { name: 'non-zero reserved flags', dropped: true, run: (ws) => ws.send(Buffer.from([FRAME_MAGIC, 2, 0x04, 0x80, 0, 0, 0, 0])) },
  {
    name: 'a second WELCOME',
    dropped: true,
    run: (ws) => send(ws, { type: 'WELCOME', version: 2, session_id: 'again', max_frame_bytes: 1, max_chunk_bytes: 1, max_message_bytes: 1, max_partials: 1, heartbeat_ms: 1, token_expires_at: 1, partials: [] }),
  },
  // claims everything up to a position far beyond what was sent, without storing anything: must not free the journal
  { name: 'an ACK for positions never sent', dropped: true, run: (ws, firstBatch) => void firstBatch.then(() => send(ws, { type: 'ACK', upto: 2 ** 40, ids: [] })) },
  // ids never sent, including the next ids this gateway will use (predicted from the ones seen): journaled, not yet
  // sent — freeing them would lose acknowledged messages
  {
    name: 'an ACK of ids never sent (some predicted: journaled, not yet sent)',
    dropped: false,
    run: (ws, firstBatch) =>
      void firstBatch.then((ids) => {
        const last = ids[ids.length - 1] ?? 'x-0-0';
        const m = /^(.*-)(\d+)$/.exec(last);
        const next = m ? Array.from({ length: 200 }, (_, i) => `${m[1]}${Number(m[2]) + 1 + i}`) : [];
        send(ws, { type: 'ACK', ids: ['never-sent-1', 'never-sent-2', ...next] });
      }),
  },
  // a frame larger than the protocol allows (the uplink's ws maxPayload)
  { name: 'an enormous frame', dropped: true, run: (ws, firstBatch) => void firstBatch.then(() => ws.send(Buffer.alloc(LIMITS.maxFrameBytes + 1))) },
];

t.test('hostile cloud end to end: every malformed frame drops the link with a clear log line, bogus ACKs free nothing, the connector reconnects, a device keeps its PUBACKs, nothing is lost', async (t) => {
  const dir = tempDir(t, 'ec-soak-hostilecloud-');
  let sw: Switch | undefined;
  let hostilePort = 0;
  const seen: string[] = [];
  let conns = 0;
  let onConn: (() => void) | undefined;
  const site = await startSite(t, dir, {
    // the predicted ids must be journaled but NOT yet sent when their bogus ACK arrives: with a window of 32 and the
    // backlog the earlier hostile links left (none of them acknowledged anything), every link's first BATCH fills the
    // window and nothing more is sent before an ACK. With a window larger than the backlog the uplink would already
    // have sent them, and an ACK of ids the cloud received is what a cloud is trusted for.
    over: { bridge: { uplink: { window_messages: 32 } } },
    ports: async (cloud) => {
      const tls = path.join(cloud.storeDir, 'tls');
      const server = https.createServer({ cert: readFileSync(path.join(tls, 'server.crt')), key: readFileSync(path.join(tls, 'server.key')), minVersion: 'TLSv1.2' }, (_q, s) => s.writeHead(404).end());
      // the fake cloud itself accepts any frame size: it is the attacker, not the party under test
      const wss = new WebSocketServer({ noServer: true, maxPayload: 64 * 1024 * 1024, handleProtocols: (set) => (set.has(SUBPROTOCOL_V2) ? SUBPROTOCOL_V2 : false) });
      server.on('upgrade', (req, socket, head) => wss.handleUpgrade(req, socket, head, (ws) => {
        const attack = ATTACKS[conns % ATTACKS.length]!;
        conns++;
        seen.push(attack.name);
        onConn?.();
        let batch: (ids: string[]) => void = () => undefined;
        const firstBatch = new Promise<string[]>((resolve) => (batch = resolve));
        let welcomed = false;
        ws.on('error', () => undefined);
        ws.on('message', (data: Buffer) => {
          let f: FrameV2;
          try {
            f = decodeFrameV2(data);
          } catch {
            return;
          }
          if (!welcomed && f.type === 'HELLO') {
            welcomed = true;
            send(ws, { type: 'WELCOME', version: 2, session_id: `hostile-${conns}`, max_frame_bytes: 17 * 1024 * 1024, max_chunk_bytes: 1024 * 1024, max_message_bytes: 1024 * 1024 * 1024, max_partials: 64, heartbeat_ms: 1000, token_expires_at: Date.now() + 300_000, partials: [] });
            attack.run(ws, firstBatch);
          } else if (f.type === 'BATCH') batch(f.chunks.map((c) => c.id));
          else if (f.type === 'PING') send(ws, { type: 'PONG', t: f.t, t_reply: Date.now() });
        });
      }));
      await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
      hostilePort = (server.address() as net.AddressInfo).port;
      t.teardown(() => {
        for (const c of wss.clients) c.terminate();
        server.closeAllConnections();
        server.close();
      });
      sw = new Switch(hostilePort);
      return { uplink: await sw.start(t) };
    },
  });
  const { d, cloud } = site;
  const dev = await addDevice(d, 'hc-dev');
  const pub = new Publisher(dev);
  await pub.run(d);
  // every attack at least once (the attacks that wait for a BATCH get one: the device keeps publishing)
  const rounds = ATTACKS.length + 1;
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`the connector came back ${conns} times, not ${rounds}, within 120 s (attacks: ${seen.join(', ')})`)), 120_000);
    onConn = () => {
      if (conns >= rounds) {
        clearTimeout(timer);
        resolve();
      }
    };
    onConn();
  });
  onConn = undefined;
  const ackedUnderAttack = pub.acked.length;
  t.ok(ackedUnderAttack > 0, `the device got PUBACKs while the cloud was hostile (${ackedUnderAttack})`);
  t.ok(pub.running, 'the device was never disconnected');
  t.equal(d.proc.exitCode, null, 'the connector is still running');
  const proto = d.logs.filter((l) => l.code === 'ECONN_PROTOCOL' || /malformed or unexpected frame|larger than|Max payload/i.test(String(l.msg)));
  const reasons = [...new Set(proto.map((l) => `${String(l.reason ?? l.code)}: ${String(l.msg).slice(0, 160)}`))];
  t.comment(`attacks: ${seen.join(', ')}\nconnector log lines naming them (${proto.length}):\n${reasons.join('\n')}`);
  const mustDrop = ATTACKS.filter((a) => a.dropped).length;
  t.ok(proto.length >= mustDrop, `each malformed frame logged as a protocol error (${proto.length} lines for ${mustDrop} attacks)`);
  t.ok(proto.some((l) => /ACK up to position \d+, but the last position sent/.test(String(l.msg))), 'the impossible ACK is named in the log');
  t.ok(d.logs.some((l) => /larger than \d+ bytes|Max payload size exceeded/i.test(String(l.msg))), 'the enormous frame is named in the log');
  t.ok(d.logs.filter((l) => l.msg === 'uplink disconnected').length >= ATTACKS.length, 'each hostile link ends with "uplink disconnected" (the ignored ACK one: no ACK ever comes, the link is judged dead)');
  t.same(d.logs.filter((l) => Number(l.level) >= 50).map((l) => String(l.msg)).slice(0, 5), [], 'no error-level log line');

  // back to the real cloud: everything acknowledged arrives, once, in order
  const mark = d.logs.length;
  sw!.to(cloud.port);
  // the real cloud's session ids are not the fake one's "hostile-N"
  await d.waitForLog((l) => d.logs.indexOf(l) >= mark && l.msg === 'uplink connected' && !String(l.session).startsWith('hostile-'), 30_000, 'the uplink connected to the real cloud');
  await pub.waitAcked(pub.acked.length + 20, 20_000);
  await pub.finish();
  const got = await tail(t, cloud, sentinelsIn([pub]), 'the sentinel', 60_000);
  const f = deliveryFigures(got, new Map([[dev.id, pub.sent]]), new Map([[dev.id, pub.acked]]));
  t.comment(formatFigures('hostile cloud', f, `${conns} hostile connections, ${ackedUnderAttack} PUBACKs under attack`));
  t.equal(f.lost, 0, 'nothing acknowledged was lost (the bogus ACKs freed nothing)');
  t.equal(f.duplicated, 0, 'nothing delivered twice');
  t.equal(f.outOfOrder, 0, 'order kept');
  t.equal(f.unknown, 0, 'nothing the device never sent');
  t.equal(d.proc.exitCode, null, 'the connector is still running');
});
