/**
 * Every aedes internal the broker reaches into, in one place. aedes is pinned to ~1.2.x in
 * package.json; test/broker/aedes-internals.test.ts exercises each of these against the
 * installed aedes, so an upgrade that renames or changes one fails loudly there instead of
 * silently breaking commands, revocation or reload.
 *
 * Used by:
 *  - `ClientInternals.closed`: a session whose socket closed during authentication is not
 *    registered (hooks.ts); a device counts as connected only while its client is open.
 *  - `ClientInternals.subscriptions` (filter → { qos }): publishCommand checks the device
 *    subscribed to the command topic (commands.ts); the conformance guard caps delivery QoS.
 *  - `ClientInternals._nextId`: publishCommand picks the packet id aedes will use for a command
 *    (QoSPacket keeps a given messageId), so the device's PUBACK can be matched (commands.ts).
 *  - `ClientInternals._parser` ('packet' events): the device's PUBACKs for commands (hooks.ts).
 *  - `AedesInternals.queueLimit` / `connectTimeout`: changed on reload (broker.ts).
 *  - `AedesInternals.persistence` (aedes-persistence 11 API): what a revoked device leaves
 *    behind is removed (hooks.ts).
 *  - `MqttPacketInternals.writeToStream` (the mqtt-packet module aedes writes with, found from
 *    aedes' own location): its 2-byte number cache is turned off (broker.ts).
 */
import { createRequire } from 'node:module';
import type { EventEmitter } from 'node:events';
import type { Aedes, Client } from 'aedes';

export interface ClientInternals {
  closed: boolean;
  subscriptions: Record<string, { qos: number }>;
  _nextId: number;
  _parser: EventEmitter;
}

export const clientInternals = (c: Client): ClientInternals => c as unknown as ClientInternals;

/** The aedes persistence calls the broker uses to forget a revoked device. */
export interface PersistenceInternals {
  subscriptionsByClient(client: { id: string }): Promise<unknown[] | null>;
  cleanSubscriptions(client: { id: string }): Promise<void>;
  cleanIncoming?(client: { id: string }): Promise<void>;
  outgoingStream(client: { id: string }): AsyncIterable<{ messageId?: number }>;
  outgoingClearMessageId(client: { id: string }, packet: { messageId?: number }): Promise<unknown>;
  delWill(client: { id: string; brokerId: string }): Promise<unknown>;
  createRetainedStream(pattern: string): AsyncIterable<{ topic: string }>;
  storeRetained(packet: { cmd: 'publish'; topic: string; payload: Buffer; qos: 0; retain: true; dup: false }): Promise<void>;
}

export interface AedesInternals {
  queueLimit: number;
  connectTimeout: number;
  persistence: PersistenceInternals;
}

export const aedesInternals = (a: Aedes): AedesInternals => a as unknown as AedesInternals;

/** The next packet id aedes would use for this client; advances it (wrapping 65535 → 1) as aedes does. */
export function takeNextPacketId(c: Client): number {
  const ci = clientInternals(c);
  const id = ci._nextId;
  ci._nextId = id >= 65535 ? 1 : id + 1;
  return id;
}

/** The mqtt-packet module aedes generates every outgoing packet with. */
export interface MqttPacketInternals {
  /** `cacheNumbers`: true (its default) writes 2-byte numbers from a cache of all 65 536 made on first use */
  writeToStream: { cacheNumbers: boolean };
}

/**
 * The very mqtt-packet instance aedes imports: resolved from aedes' own location, so a copy nested
 * under aedes (another version) is the one configured, not one hoisted next to it.
 */
export function aedesMqttPacket(): MqttPacketInternals {
  return createRequire(import.meta.resolve('aedes'))('mqtt-packet') as MqttPacketInternals;
}
