import type { Config } from './config/schema.js';

/**
 * Every long-lived part of the daemon. Constructors do no I/O; work starts in
 * start(). close() is graceful, idempotent and bounded; the lifecycle closes
 * components in reverse start order.
 */
export interface Component {
  readonly name: string;
  start(): Promise<void>;
  close(): Promise<void>;
  /**
   * Apply a new, already validated configuration without dropping healthy
   * sessions. Returns one human line per thing it changed (logged by the
   * lifecycle). Keys that need a restart are handled by the lifecycle, not here.
   */
  reload?(next: Config): Promise<string[]>;
  /** Facts for `connector status` and /readyz. */
  status?(): Record<string, unknown>;
}
