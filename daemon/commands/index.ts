import type { Command } from './types.js';
import { baseCommands } from './base.js';
import { deviceCommands } from './device.js';
import { cloudCommands } from './cloud.js';
import { opsCommands } from './ops.js';

/** Every command of the `connector` CLI, in the order `connector help` lists them. */
export const commands: Command[] = [...baseCommands, ...deviceCommands, ...cloudCommands, ...opsCommands];
