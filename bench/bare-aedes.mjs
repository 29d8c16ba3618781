#!/usr/bin/env node
/**
 * Bare aedes for `npm run bench` (the broker-only baseline): MQTT over TLS with
 * client certificates required (mTLS) and nothing else — no authenticate or
 * authorizePublish hooks, no ACL, no journal, no bridge; TCP_NODELAY on every
 * accepted socket (as the connector does).
 *
 *   node bench/bare-aedes.mjs SERVER_CERT SERVER_KEY CLIENT_CA   → prints {"msg":"ready","port":N}
 */
import tls from 'node:tls';
import { readFileSync } from 'node:fs';
import { Aedes } from 'aedes';

const [cert, key, ca] = process.argv.slice(2).map((f) => readFileSync(f));
const broker = await Aedes.createBroker();
const server = tls.createServer({ cert, key, ca, requestCert: true, rejectUnauthorized: true, minVersion: 'TLSv1.2' }, (socket) => {
  socket.setNoDelay(true);
  broker.handle(socket);
});
server.listen(0, '127.0.0.1', () => console.log(JSON.stringify({ msg: 'ready', port: server.address().port })));
process.on('SIGTERM', () => server.close(() => broker.close(() => process.exit(0))));
