/**
 * V8's young generation during `connector start`. Imported first by cli.ts, for its side effect.
 *
 * V8 doubles the young generation (two semi-spaces, 1 MiB each at first, up to 16 MiB each on
 * Node 20) while many allocated objects survive, and an idle process does not give it back: no
 * allocation, no GC, no shrink. Start-up is exactly such a phase (module code, configuration,
 * schemas, TLS contexts, journal replay all survive), so every daemon idled with a 2 x 16 MiB
 * young generation grown by work that was over: ~13 MiB of idle RSS. The growth factor is held
 * at 1 until the daemon is ready (releaseYoungGeneration, called by runDaemon), then put back to
 * V8's default 2, so traffic grows it again exactly as before. The maximum is untouched.
 * Only `start` holds it (the other commands are short or, like `cloud`, not ours to tune), and
 * an operator who tunes the young generation (a semi-space flag in execArgv or NODE_OPTIONS)
 * keeps their setting.
 */
import v8 from 'node:v8';

const operatorTuned = (): boolean => [...process.execArgv, process.env.NODE_OPTIONS ?? ''].some((a) => a.includes('semi-space'));

let held = false;

export function holdYoungGeneration(): void {
  if (held || operatorTuned()) return;
  v8.setFlagsFromString('--semi-space-growth-factor=1');
  held = true;
}

/** Back to V8's default growth (2, see `node --v8-options`); a no-op unless held. */
export function releaseYoungGeneration(): void {
  if (!held) return;
  v8.setFlagsFromString('--semi-space-growth-factor=2');
  held = false;
}

if (process.argv[2] === 'start') holdYoungGeneration();
