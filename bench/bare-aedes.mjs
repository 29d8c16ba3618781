#!/usr/bin/env node
/**
 * Bare aedes for `npm run bench` (the broker-only baseline): MQTT over TLS with
 * client certificates required (mTLS) and nothing else — no authenticate or
 * authorizePublish hooks, no ACL, no journal, no bridge; TCP_NODELAY on every
 * accepted socket (as the connector does).
 *
 *   node bench/bare-aedes.mjs SERVER_CERT SERVER_KEY CLIENT_CA [--tls-only]   → prints {"msg":"ready","port":N}
 *
 * --tls-only: no broker at all, the floor of an idle connection's memory in Node: the same TLS
 * server (mTLS), answering every chunk a device sends with a fixed CONNACK (accepted), so that an
 * MQTT client connects and then idles as it does on a broker.
 */
import tls from 'node:tls';
import { readFileSync } from 'node:fs';
import { Aedes } from 'aedes';

const [cert, key, ca] = process.argv.slice(2, 5).map((f) => readFileSync(f));
const tlsOnly = process.argv.includes('--tls-only');
const CONNACK = Buffer.from([0x20, 0x02, 0x00, 0x00]);
const broker = tlsOnly ? undefined : await Aedes.createBroker();
const server = tls.createServer({ cert, key, ca, requestCert: true, rejectUnauthorized: true, minVersion: 'TLSv1.2' }, (socket) => {
  socket.setNoDelay(true);
  if (broker) return broker.handle(socket);
  socket.on('data', () => socket.write(CONNACK));
  socket.on('error', () => socket.destroy());
});
server.listen(0, '127.0.0.1', () => console.log(JSON.stringify({ msg: 'ready', port: server.address().port })));
process.on('SIGTERM', () => server.close(() => (broker ? broker.close(() => process.exit(0)) : process.exit(0))));
