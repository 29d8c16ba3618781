/**
 * Child-process entry of initPkiInChild (identity/pki.ts): receives one job over IPC,
 * creates the device CA and the server certificate, replies, and exits — @peculiar/x509
 * and everything the creation allocated go with the process.
 */
import { errorCode } from '../core/errors.js';
import { initPki, type PkiInitJob } from './pki.js';

process.once('message', (job: PkiInitJob) => {
  void (async () => {
    let reply: unknown;
    try {
      reply = { created: await initPki(job.stateDir, job.cfg, job.serverName) };
    } catch (err) {
      const e = err as Error;
      reply = { error: { name: e.name, code: errorCode(err), message: e.message } };
    }
    process.send!(reply, () => process.disconnect());
  })();
});
