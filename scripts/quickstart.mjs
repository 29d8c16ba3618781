#!/usr/bin/env node
// `npm start`: the reference cloud on loopback (`connector cloud`, state in ./cloud-data)
// and the daemon on the bundled connector.yaml, side by side. Ctrl-C stops both.
// The daemon writes readable log lines here (log.format: pretty, unless
// CONNECTOR_LOG_FORMAT says otherwise); its status page is at
// http://127.0.0.1:9464/ (the metrics listener).
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const cli = path.join(root, 'dist/daemon/cli.js');
const children = [];
let stopping = false;

const env = { ...process.env, CONNECTOR_LOG_FORMAT: process.env.CONNECTOR_LOG_FORMAT ?? 'pretty' };

function run(name, args) {
  const p = spawn(process.execPath, [cli, ...args], { cwd: root, env, stdio: ['ignore', 'inherit', 'inherit'] });
  p.on('exit', (code, signal) => {
    process.stderr.write(`[quickstart] ${name} exited (${code ?? signal})\n`);
    if (!stopping) stop(code ?? 1);
  });
  children.push(p);
  return p;
}

function stop(code = 0) {
  if (stopping) return;
  stopping = true;
  for (const c of children) if (c.exitCode === null) c.kill('SIGTERM');
  let left = children.filter((c) => c.exitCode === null).length;
  if (left === 0) process.exit(code);
  for (const c of children) c.once('exit', () => --left === 0 && process.exit(code));
  setTimeout(() => process.exit(code || 1), 15000).unref();
}

process.on('SIGINT', () => stop(0));
process.on('SIGTERM', () => stop(0));

run('cloud', ['cloud']);
run('connector', ['start', '-c', path.join(root, 'connector.yaml')]);
process.stderr.write('[quickstart] status page: http://127.0.0.1:9464/  (metrics: /metrics, readiness: /readyz)\n');
