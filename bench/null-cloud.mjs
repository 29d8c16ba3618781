#!/usr/bin/env node
/**
 * A "null" cloud for bench/uplink.mjs: the ingest protocol (docs/PROTOCOL.md)
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
import { SUBPROTOCOL, decodeFrame, encodeFrame, sha256, digestEquals } from '../dist/protocol/codec.js';

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
const wss = new WebSocketServer({ server, maxPayload: 17 * 1024 * 1024, perMessageDeflate: false, handleProtocols: (p) => (p.has(SUBPROTOCOL) ? SUBPROTOCOL : false) });
wss.on('connection', (ws, req) => {
  req.socket.setNoDelay(true);
  const partial = new Map();
  let acks = [];
  let flushQueued = false;
  const ack = (id) => {
    acks.push(id);
    if (!flushQueued) {
      flushQueued = true;
      setImmediate(() => {
        flushQueued = false;
        for (let i = 0; i < acks.length; i += 4096) ws.send(encodeFrame({ type: 'ACK', ids: acks.slice(i, i + 4096) }));
        acks = [];
      });
    }
  };
  let welcomed = false;
  ws.on('message', (data) => {
    const f = decodeFrame(data);
    if (!welcomed) {
      welcomed = true;
      ws.send(
        encodeFrame({ type: 'WELCOME', version: 1, session_id: 'null', max_frame_bytes: 17 * 1024 * 1024, max_chunk_bytes: 16 * 1024 * 1024, max_message_bytes: Number.MAX_SAFE_INTEGER, max_partials: 64, heartbeat_ms: 5000, token_expires_at: Date.now() + 3600_000, partials: [] }),
      );
      return;
    }
    if (f.type === 'PING') return void ws.send(encodeFrame({ type: 'PONG', t: f.t, t_reply: Date.now() }));
    if (f.type !== 'CHUNK') return;
    if (!digestEquals(sha256(f.data), f.chunk_sha256)) return void ws.send(encodeFrame({ type: 'REJECT', id: f.id, kind: 'retry', reason: 'chunk digest' }));
    let h = partial.get(f.id);
    if (f.seq === 0) partial.set(f.id, (h = createHash('sha256')));
    if (!h) return;
    h.update(f.data);
    if (f.offset + f.data.length < f.total) {
      // progress every 4 MiB, like the reference cloud
      if (Math.floor((f.offset + f.data.length) / 4194304) > Math.floor(f.offset / 4194304)) {
        ws.send(encodeFrame({ type: 'ACK', ids: [], progress: [{ id: f.id, offset: f.offset + f.data.length, next_seq: f.seq + 1 }] }));
      }
      return;
    }
    partial.delete(f.id);
    if (!digestEquals(h.digest(), f.payload_sha256)) return void ws.send(encodeFrame({ type: 'REJECT', id: f.id, kind: 'permanent', reason: 'payload digest' }));
    ack(f.id);
  });
});
server.listen(Number(process.argv[4] ?? 0), '127.0.0.1', () => console.log(JSON.stringify({ msg: 'ready', ports: { cloud: server.address().port } })));
