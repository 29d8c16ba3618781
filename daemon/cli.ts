#!/usr/bin/env node
/**
 * The `connector` executable: holds V8's young generation (startup-heap.ts), then loads
 * the command line (cli-main.ts).
 *
 * The import is dynamic on purpose. Static imports are all fetched, parsed and compiled
 * (the whole module graph: source strings, bytecode, scopes) before the first module body
 * runs, so an `import './startup-heap.js'` first in the list set the flag only after that
 * allocation had already doubled the young generation three times (2 x 8 MiB, measured: the
 * daemon idled with 8 MiB of it resident).
 */
import './startup-heap.js';

await import('./cli-main.js');
