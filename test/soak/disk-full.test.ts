/**
 * Fault suite — a real full filesystem: the state directory lives on a
 * size-limited tmpfs this test mounts (root only; elsewhere the case is
 * skipped and says why). With the cloud down, devices publish until the disk
 * is full: the daemon says so, stops acknowledging (no PUBACK for what it could
 * not store), stays up and loses nothing; when space returns (remount larger)
 * and the cloud is back, it recovers by itself and everything acknowledged
 * arrives once, in order.
 */
import t from 'tap';
import { execFileSync } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import path from 'node:path';
import { startDaemon, tempDir } from '../helpers/daemon.js';
import { addDevice, connectorConfig, startCloud, tail, Publisher, sentinelsIn, deliveryFigures, formatFigures, CLIENT_SECRET } from '../helpers/fleet.js';
import { writeFileSync } from 'node:fs';

t.setTimeout(240_000);

function tryMount(dir: string, sizeMiB: number): string | undefined {
  if (process.getuid?.() !== 0) return 'needs root to mount a size-limited tmpfs';
  try {
    execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${sizeMiB}m,mode=0700`, 'tmpfs', dir], { stdio: 'pipe' });
    return undefined;
  } catch (err) {
    return `mount failed: ${(err as Error).message.split('\n')[0]}`;
  }
}

const dir = tempDir(t, 'ec-soak-disk-');
const stateDir = path.join(dir, 'state');
mkdirSync(stateDir, { mode: 0o700 });
const cannot = tryMount(stateDir, 6);

t.test('disk full under load: stops acknowledging, stays up, loses nothing, recovers when space returns', { skip: cannot ?? false }, async (t) => {
  t.teardown(() => {
    try {
      execFileSync('umount', ['-l', stateDir], { stdio: 'pipe' });
    } catch {}
  });
  const cloud = await startCloud(t, dir);
  const secretFile = path.join(dir, 'connector-client.secret');
  writeFileSync(secretFile, CLIENT_SECRET, { mode: 0o600 });
  const d = await startDaemon(t, { dir, config: { daemon: { state_dir: stateDir }, ...connectorConfig(cloud, secretFile) } });
  const dev = await addDevice(d, 'disk-a');
  await cloud.proc.stop('SIGTERM');
  const pub = new Publisher(dev, 2048);
  await pub.run(d);
  // fill the disk: the daemon must say so with a code, and stop acknowledging
  const full = await d.waitForLog((l) => typeof l.code === 'string' && /ECONN_JOURNAL_(IO|FULL)|ENOSPC/.test(`${l.code} ${l.err ? JSON.stringify(l.err) : ''}`), 120_000, 'a journal error for the full disk');
  t.pass(`the daemon reported the full disk: ${String(full.code)} — ${String(full.msg)}`);
  const ackedAtFull = pub.acked.length;
  t.ok(ackedAtFull > 100, `${ackedAtFull} messages acknowledged before the disk filled`);
  t.equal(d.proc.exitCode, null, 'the daemon is still running');
  // space returns, the cloud comes back
  execFileSync('mount', ['-o', 'remount,size=256m', stateDir]);
  const cloud2 = await startCloud(t, dir, { port: cloud.port });
  await pub.publishUntil(d, pub.acked.length + 50, 60_000).catch((err: Error) => {
    const recent = d.logs.filter((l) => ['warn', 'error', 'fatal'].includes(String(l.level))).slice(-8);
    const last = d.logs.slice(-25).map((l) => `${String(l.level)} ${String(l.component ?? '')} ${String(l.msg)} ${String(l.code ?? '')}`);
    throw new Error(`${err.message}; the daemon's last warnings: ${JSON.stringify(recent).slice(0, 600)}; last lines: ${last.join(' | ')}`);
  });
  t.pass('acknowledging again once space returned');
  await pub.finish();
  const got = await tail(t, cloud2, sentinelsIn([pub]), 'the sentinel after recovery', 120_000, true);
  const f = deliveryFigures(got, new Map([[dev.id, pub.sent]]), new Map([[dev.id, pub.acked]]));
  t.comment(formatFigures('disk full', f, `${ackedAtFull} acknowledged before the disk filled`));
  t.equal(f.lost, 0, 'no acknowledged message lost');
  t.equal(f.duplicated, 0, 'no duplicate');
  t.equal(f.outOfOrder, 0, 'order kept');
});
