#!/usr/bin/env node
/**
 * A "null" cloud for bench/uplink.mjs: the ingest protocol v2 (docs/PROTOCOL.md)
 * with the real codec (dist/protocol/codec.js), chunk and payload digests
 * verified, but nothing stored: every complete message is acknowledged at once.
 * It isolates the connector's own throughput from the reference cloud's
 * storage (which fsyncs every message before acknowledging it).
 *
 *   node bench/null-cloud.mjs CERT KEY [PORT]   → prints {"msg":"ready","ports":{"cloud":N}}
 */
import https from 'node:https';
import { readFileSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { WebSocketServer } from 'ws';
import { sha256, digestEquals } from '../dist/protocol/codec.js';
import { AckFrontier, SUBPROTOCOL_V2, decodeFrameV2, encodeFrameV2 } from '../dist/protocol/v2.js';

const [cert, key] = [readFileSync(process.argv[2]), readFileSync(process.argv[3])];
const server = https.createServer({ cert, key }, (req, res) => {
  let body = '';
  req.on('data', (d) => (body += d));
  req.on('end', () => {
    if (req.url !== '/oauth/token') return void res.writeHead(404).end();
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ access_token: `bench-${Date.now()}`, token_type: 'Bearer', expires_in: 3600 }));
  });
});
const wss = new WebSocketServer({ server, maxPayload: 17 * 1024 * 1024, perMessageDeflate: false, handleProtocols: (p) => (p.has(SUBPROTOCOL_V2) ? SUBPROTOCOL_V2 : false) });
wss.on('connection', (ws, req) => {
  req.socket.setNoDelay(true);
  const partial = new Map();
  const frontier = new AckFrontier();
  let flushQueued = false;
  // protocol v2: one cumulative ACK per turn of the event loop for every position settled
  const settle = (pos) => {
    frontier.settle(pos);
    if (!flushQueued) {
      flushQueued = true;
      setImmediate(() => {
        flushQueued = false;
        ws.send(encodeFrameV2({ type: 'ACK', upto: frontier.upto, ids: [] }));
      });
    }
  };
  let welcomed = false;
  ws.on('message', (data) => {
    const f = decodeFrameV2(data);
    if (!welcomed) {
      welcomed = true;
      ws.send(
        encodeFrameV2({ type: 'WELCOME', version: 2, session_id: 'null', max_frame_bytes: 17 * 1024 * 1024, max_chunk_bytes: 16 * 1024 * 1024, max_message_bytes: Number.MAX_SAFE_INTEGER, max_partials: 64, heartbeat_ms: 5000, token_expires_at: Date.now() + 3600_000, partials: [] }),
      );
      return;
    }
    if (f.type === 'PING') return void ws.send(encodeFrameV2({ type: 'PONG', t: f.t, t_reply: Date.now() }));
    if (f.type !== 'BATCH') return;
    for (const c of f.chunks) {
      if (c.pos !== undefined) frontier.expect(c.pos, c.id);
      if (c.seq === 0 && c.pos !== undefined) {
        // a whole message in one chunk: one digest
        if (!digestEquals(sha256(c.data), c.payload_sha256)) ws.send(encodeFrameV2({ type: 'REJECT', id: c.id, kind: 'permanent', reason: 'payload digest' }));
        settle(c.pos);
        continue;
      }
      if (!digestEquals(sha256(c.data), c.chunk_sha256)) {
        ws.send(encodeFrameV2({ type: 'REJECT', id: c.id, kind: 'retry', reason: 'chunk digest' }));
        if (c.pos !== undefined) settle(c.pos);
        continue;
      }
      let h = partial.get(c.id);
      if (c.seq === 0) partial.set(c.id, (h = createHash('sha256')));
      if (!h) {
        if (c.pos !== undefined) settle(c.pos);
        continue;
      }
      h.update(c.data);
      if (c.pos === undefined) {
        // progress every 4 MiB, like the reference cloud
        if (Math.floor((c.offset + c.data.length) / 4194304) > Math.floor(c.offset / 4194304)) {
          ws.send(encodeFrameV2({ type: 'ACK', ids: [], progress: [{ id: c.id, offset: c.offset + c.data.length, next_seq: c.seq + 1 }] }));
        }
        continue;
      }
      partial.delete(c.id);
      if (!digestEquals(h.digest(), c.payload_sha256)) ws.send(encodeFrameV2({ type: 'REJECT', id: c.id, kind: 'permanent', reason: 'payload digest' }));
      settle(c.pos);
    }
  });
});
server.listen(Number(process.argv[4] ?? 0), '127.0.0.1', () => console.log(JSON.stringify({ msg: 'ready', ports: { cloud: server.address().port } })));
