/**
 * V8's young generation and optimizing compiler during `connector start`. Imported first by
 * cli.ts, for its side effect, before the command line's modules are loaded.
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

/*
 * V8's optimizing compiler (TurboFan) while the daemon loads its modules and configuration.
 *
 * Loading ~680 modules and compiling the config schemas runs a few functions hot enough for
 * TurboFan (the module loader's path and lexer helpers, ajv's code generator, the YAML
 * parser): ~60 optimized compiles of code that never runs again. TurboFan compiles on a
 * background thread whose malloc arena keeps the compiler's zone memory mapped afterwards,
 * and its own machine code in the node binary gets paged in: measured on the bundled config,
 * idle RSS 82-85 MiB with it, 75 MiB when it is held until the components start (RssAnon
 * -8 MiB, RssFile -1 MiB). It is released before the components start, so the journal
 * replay (the start-up work that is hot: up to millions of records) and all traffic get it
 * as before. Only `start` holds it, and not when the operator set a compiler flag.
 */
const operatorTunedCompiler = (): boolean =>
  [...process.execArgv, process.env.NODE_OPTIONS ?? ''].some((a) => /--(no-)?(opt|turbofan|jitless|max-opt|maglev)\b/.test(a));

let compilerHeld = false;

export function holdOptimizingCompiler(): void {
  if (compilerHeld || operatorTunedCompiler()) return;
  v8.setFlagsFromString('--no-opt');
  compilerHeld = true;
}

/** TurboFan back on (V8's default); a no-op unless held. */
export function releaseOptimizingCompiler(): void {
  if (!compilerHeld) return;
  v8.setFlagsFromString('--opt');
  compilerHeld = false;
}

if (process.argv[2] === 'start') {
  holdYoungGeneration();
  holdOptimizingCompiler();
}
