/**
 * What the broker reads from the configuration: its own `broker:` section, and from the bridge
 * section only which device topics go upstream (and how QoS 0 does). The composition root
 * passes these, at start and on reload; the broker never sees the rest of the configuration.
 */
import type { Config } from '../core/config/schema.js';

/** The broker's own configuration section (`broker:` in connector.yaml). */
export type BrokerConfig = Config['broker'];

/** What the broker needs from the bridge section: which device topics go upstream, and how QoS 0 does. */
export interface BridgeRouting {
  topics: readonly string[];
  qos0: Config['bridge']['qos0'];
}

/** What the broker reads from the configuration, at start and on reload. */
export interface BrokerSettings {
  broker: BrokerConfig;
  bridge: BridgeRouting;
}

/** The broker's sections of a whole configuration (the composition root passes nothing else). */
export function brokerSettings(c: Pick<Config, 'broker' | 'bridge'>): BrokerSettings {
  return { broker: c.broker, bridge: { topics: c.bridge.topics, qos0: c.bridge.qos0 } };
}
