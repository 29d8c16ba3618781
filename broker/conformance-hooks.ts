/**
 * The conformance fix-ups that live in aedes hooks rather than on the wire: `conformanceHooks`
 * decorates the broker's own `authorizeForward` / `authorizeSubscribe` (the ACL), which run
 * first; then
 *  - `authorizeForward` caps the delivery QoS at the granted QoS of the matching subscriptions
 *    (aedes only caps for exact-match filters, MQTT-3.8.4-6) and keeps `$` topics away from
 *    filters that start with a wildcard (aedes leaks retained ones, MQTT-4.7.2-1);
 *  - `authorizeSubscribe` turns a hook error (which makes aedes drop the connection) into a
 *    refused subscription, SUBACK 0x80 (MQTT-3.8.4-1).
 * Both catch everything: a throw inside an aedes hook would take the process down.
 */
import type { AedesOptions, AedesPublishPacket, Client, Subscription } from 'aedes';
import { PLUS, HASH } from './conformance-state.js';
import { clientInternals } from './aedes-internals.js';

/** MQTT topic matching (3.1.1 section 4.7), without the $ rule. */
export function topicMatches(filter: string, topic: string): boolean {
  const f = filter.split('/');
  const t = topic.split('/');
  for (let i = 0; i < f.length; i++) {
    const level = f[i];
    if (level === '#') return true; // also matches the parent level ("a/#" matches "a")
    if (i >= t.length) return false;
    if (level !== '+' && level !== t[i]) return false;
  }
  return f.length === t.length;
}

type ForwardHook = NonNullable<AedesOptions['authorizeForward']>;
type SubscribeHook = NonNullable<AedesOptions['authorizeSubscribe']>;

/** aedes keeps the client's subscriptions (filter → { qos }) on the client object; not in its typings (aedes-internals.ts). */
function subscriptionsOf(client: Client): Record<string, { qos: number }> | undefined {
  const subs: unknown = clientInternals(client).subscriptions;
  return subs && typeof subs === 'object' ? (subs as Record<string, { qos: number }>) : undefined;
}

/**
 * The conformance fix-ups of `authorizeForward`, applied to what the inner hook
 * (the broker's ACL) returned:
 * - MQTT-4.7.2-1: a topic starting with `$` is delivered only through a filter
 *   that does not start with a wildcard (aedes lets retained and offline-queued
 *   `$` messages through `#` and `+/…`);
 * - MQTT-3.8.4-6 / MQTT-3.3.5-1: the delivery QoS is capped at the highest
 *   granted QoS of the client's matching subscriptions (aedes caps only when the
 *   filter equals the topic, so a QoS 1 `a/#` subscriber received QoS 2).
 * The packet handed to this hook is aedes's per-client copy, so capping it in
 * place also fixes the offline-queue path, which ignores a returned packet.
 */
function forwardFixups(client: Client, packet: AedesPublishPacket): AedesPublishPacket | null {
  const subs = subscriptionsOf(client);
  if (!subs) return packet;
  const topic = packet.topic;
  if (topic.charCodeAt(0) === 36 /* $ */) {
    let allowed = false;
    for (const f in subs) {
      const c = f.charCodeAt(0);
      if (c !== PLUS && c !== HASH && topicMatches(f, topic)) {
        allowed = true;
        break;
      }
    }
    if (!allowed) return null;
  }
  const qos = packet.qos;
  if (qos === 0) return packet;
  let lower = false;
  for (const f in subs) {
    if (subs[f]!.qos < qos) {
      lower = true;
      break;
    }
  }
  if (!lower) return packet; // fast path: no subscription could cap it
  let max = -1;
  for (const f in subs) {
    const q = subs[f]!.qos;
    if (q > max && topicMatches(f, topic)) {
      max = q;
      if (max >= qos) return packet;
    }
  }
  if (max < 0) return packet; // not delivered through a subscription (e.g. client.publish())
  // a message already in the offline queue has its id; capping it to 0 there would leave it in flight forever
  if (max === 0 && packet.messageId !== undefined) return packet;
  packet.qos = max as 0 | 1 | 2;
  return packet;
}

/**
 * aedes hooks with the conformance fix-ups, composed around the broker's own
 * hooks (`inner`), which run first. Spread the result into the aedes options.
 */
export function conformanceHooks(inner: Pick<AedesOptions, 'authorizeForward' | 'authorizeSubscribe'> = {}): Required<Pick<AedesOptions, 'authorizeForward' | 'authorizeSubscribe'>> {
  const innerForward: ForwardHook | undefined = inner.authorizeForward;
  const innerSubscribe: SubscribeHook | undefined = inner.authorizeSubscribe;
  const authorizeForward: ForwardHook = (client, packet) => {
    try {
      const r = innerForward ? innerForward(client, packet) : packet;
      if (!r) return null;
      return forwardFixups(client, r);
    } catch {
      return null; // a throw here would take the process down
    }
  };
  const authorizeSubscribe: SubscribeHook = (client, sub, done) => {
    let called = false;
    const once = (err: Error | null, granted?: Subscription | null): void => {
      if (called) return;
      called = true;
      // MQTT-3.8.4-1: aedes closes the connection on a hook error; refuse the filter (SUBACK 0x80) instead
      if (err) done(null, null);
      else done(null, granted === undefined ? sub : granted);
    };
    try {
      if (innerSubscribe) innerSubscribe(client, sub, once);
      else once(null, sub);
    } catch {
      once(null, null);
    }
  };
  return { authorizeForward, authorizeSubscribe };
}
