/** How a failed command explains itself: a clear, stack-free line on stderr and a documented exit code. */
import { ConfigError, ConnectorError, EXIT, errorCode } from '../core/errors.js';

export function exitCodeFor(err: unknown): number {
  switch (errorCode(err)) {
    case 'ECONN_CONFIG_NOT_FOUND':
    case 'ECONN_CONFIG_INVALID':
    case 'ECONN_CONFIG_SECRET':
      return EXIT.CONFIG;
    case 'ECONN_STATE_DIR':
    case 'ECONN_LISTEN':
      return EXIT.CANTCREAT;
    case 'ECONN_REGISTRY_CORRUPT':
    case 'ECONN_JOURNAL_CORRUPT':
      return EXIT.SOFTWARE;
    default:
      return EXIT.FAILURE;
  }
}

/** Print a clear, stack-free explanation to stderr (the JSON log has the details). */
export function explain(err: unknown): void {
  if (err instanceof ConfigError) {
    for (const p of err.problems) process.stderr.write(`${p}\n`);
    process.stderr.write(`connector: configuration invalid (${err.problems.length} problem${err.problems.length === 1 ? '' : 's'}); nothing was started\n`);
  } else if (err instanceof ConnectorError) {
    process.stderr.write(`connector: ${err.code}: ${err.message}\n`);
  } else {
    process.stderr.write(`connector: unexpected error: ${(err as Error)?.message ?? String(err)}\n`);
  }
}

