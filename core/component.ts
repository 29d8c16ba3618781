import type { Config } from './config/schema.js';
import type { Logger } from './logger.js';

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
   * Immediate, forced stop: called by the lifecycle when close() overran its
   * budget. Drop connections, cancel timers, release handles; do not wait for
   * peers. Must not throw; may be called while close() is still pending.
   */
  destroy?(err: Error): void | Promise<void>;
  /**
   * Apply a new, already validated configuration without dropping healthy
   * sessions. Returns one human line per thing it changed (logged by the
   * lifecycle). Keys that need a restart are handled by the lifecycle, not here.
   */
  reload?(next: Config): Promise<string[]>;
  /** Facts for `connector status` and /readyz. */
  status?(): Record<string, unknown>;
}

/** One step of `connector init`: creates what a component needs on disk before the daemon starts. */
export interface InitStep {
  /** Human name shown by `connector init`. */
  readonly name: string;
  /** Create what is missing; return the paths it created (empty when all existed). */
  run(config: Config, logger: Logger): Promise<string[]>;
}

/** A handler of one admin-socket method (`connector …` commands reach the running daemon through it). */
export type AdminHandler = (params: Record<string, unknown>) => Promise<unknown> | unknown;

/** Where a component registers its admin methods (implemented by daemon/admin.ts). */
export interface AdminRegistry {
  register(method: string, handler: AdminHandler): void;
}
