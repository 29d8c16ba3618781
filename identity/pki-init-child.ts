/**
 * Worker thread entry of initPkiInWorker (identity/pki.ts): creates the device CA and the
 * server certificate, then the thread ends and @peculiar/x509 goes with it.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { errorCode } from '../core/errors.js';
import { initPki, type PkiInitJob } from './pki.js';

const job = workerData as PkiInitJob;
try {
  parentPort!.postMessage({ created: await initPki(job.stateDir, job.cfg, job.serverName) });
} catch (err) {
  const e = err as Error;
  parentPort!.postMessage({ error: { name: e.name, code: errorCode(err), message: e.message } });
}
