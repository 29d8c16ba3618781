/**
 * Topic authorization: pure functions, no I/O.
 *
 * The built-in namespace of device D is `devices/D/…`:
 *  - D may publish under `devices/D/<at least one level>`, never to `devices/D/commands` or below it
 *    (commands flow from the cloud to the device only);
 *  - D may subscribe to any filter that stays inside `devices/D/…` (its commands included).
 *
 * Hard limits no configured rule can lift (a group rule only adds topics outside them):
 *  - a device never publishes into, subscribes to or receives from another device's namespace
 *    (`devices/X/…`, X ≠ D); a filter that *could* match such a topic (`#`, `devices/#`,
 *    `devices/+/x`, `+/+/x`) is refused as a whole;
 *  - a device never publishes to any `devices/…/commands…` topic;
 *  - a device never publishes to or subscribes to `$`-topics (`$SYS/…`);
 *  - topic names and filters obey max depth and max bytes.
 *
 * Extra rules (`broker.acl.groups.<group>` for devices whose metadata.group names the group,
 * `broker.listeners.local.acl` for anonymous local applications) are `{allow, topic}` with a filter;
 * `{device}` in a rule is replaced by the device id. A subscription is allowed by a rule when every
 * topic the subscription can match is also matched by the rule's filter.
 *
 * Anonymous local applications with no rules configured may do everything except publish to `$`-topics.
 */
import type { AclRule } from '../core/config/schema.js';
import { topicMatches } from '../core/topic.js';

export type { AclRule };

export interface TopicLimits {
  /** most levels in a topic name or filter */
  maxDepth: number;
  /** most UTF-8 bytes in a topic name or filter */
  maxBytes: number;
}

/** Who is asking: a device (authenticated by cert or token) or an anonymous local application. */
export type Principal =
  | { kind: 'device'; deviceId: string; rules: readonly AclRule[] }
  | { kind: 'local'; rules: readonly AclRule[] | null };

export type Decision = { ok: true } | { ok: false; reason: string };

const OK: Decision = Object.freeze({ ok: true });
const no = (reason: string): Decision => ({ ok: false, reason });

export const DEVICES_PREFIX = 'devices';
export const COMMANDS_LEVEL = 'commands';

/** Rules with `{device}` replaced. Rules still holding a placeholder when no device is known are dropped. */
export function expandRules(rules: readonly AclRule[], deviceId: string | undefined): AclRule[] {
  const out: AclRule[] = [];
  for (const r of rules) {
    if (!r.topic.includes('{device}')) {
      out.push(r);
    } else if (deviceId !== undefined) {
      out.push({ allow: r.allow, topic: r.topic.split('{device}').join(deviceId) });
    }
  }
  return out;
}

/** The extra rules of a device: those of its group (metadata.group), expanded for the device. */
export function deviceRules(groups: Readonly<Record<string, readonly AclRule[]>>, group: string | undefined, deviceId: string): AclRule[] {
  if (group === undefined || !Object.prototype.hasOwnProperty.call(groups, group)) return [];
  return expandRules(groups[group] ?? [], deviceId);
}

/** Topic name (PUBLISH): non-empty, no wildcard characters, no U+0000. */
export function isValidTopicName(topic: string): boolean {
  return typeof topic === 'string' && topic.length > 0 && !topic.includes('+') && !topic.includes('#') && !topic.includes('\u0000');
}

/** Topic filter (SUBSCRIBE): non-empty, `+` alone in a level, `#` alone in the last level, no U+0000. */
export function isValidTopicFilter(filter: string): boolean {
  if (typeof filter !== 'string' || filter.length === 0 || filter.includes('\u0000')) return false;
  const levels = filter.split('/');
  for (let i = 0; i < levels.length; i++) {
    const l = levels[i]!;
    if (l === '+') continue;
    if (l === '#') {
      if (i !== levels.length - 1) return false;
      continue;
    }
    if (l.includes('+') || l.includes('#')) return false;
  }
  return true;
}

export function checkTopicLimits(topic: string, limits: TopicLimits): Decision {
  const bytes = Buffer.byteLength(topic, 'utf8');
  if (bytes > limits.maxBytes) return no(`topic is ${bytes} bytes, more than the limit of ${limits.maxBytes} (broker.limits.max_topic_bytes)`);
  let depth = 1;
  for (let i = 0; i < topic.length; i++) if (topic.charCodeAt(i) === 47) depth++;
  if (depth > limits.maxDepth) return no(`topic has ${depth} levels, more than the limit of ${limits.maxDepth} (broker.limits.max_topic_depth)`);
  return OK;
}

/** True when every topic that `inner` can match is also matched by `outer` (both valid filters). */
export function filterCovers(outer: string, inner: string): boolean {
  const o = outer.split('/');
  const i = inner.split('/');
  if (i[0]!.startsWith('$') && (o[0] === '+' || o[0] === '#')) return false;
  for (let k = 0; ; k++) {
    if (k === o.length) return k === i.length;
    const ol = o[k]!;
    if (ol === '#') return true; // covers the rest, and the parent level
    if (k === i.length) return false;
    const il = i[k]!;
    if (il === '#') return false;
    if (ol === '+') continue;
    if (il === '+') return false;
    if (ol !== il) return false;
  }
}

/**
 * Could `filter` match a topic in the namespace of a device other than `deviceId`
 * (`devices/X` or `devices/X/…` with X ≠ deviceId)?
 */
export function couldReachOtherDevice(filter: string, deviceId: string): boolean {
  const f = filter.split('/');
  const l0 = f[0]!;
  if (l0 === '#') return true;
  if (l0 !== '+' && l0 !== DEVICES_PREFIX) return false;
  if (f.length === 1) return false; // matches one-level topics only
  const l1 = f[1]!;
  if (l1 === '#' || l1 === '+') return true;
  return l1 !== deviceId;
}

/** `devices/X/commands` or below, for any X (or for `deviceId` when given). */
export function isCommandTopic(topic: string, deviceId?: string): boolean {
  const t = topic.split('/');
  return t.length >= 3 && t[0] === DEVICES_PREFIX && t[2] === COMMANDS_LEVEL && (deviceId === undefined || t[1] === deviceId);
}

/** The device a `devices/X/…` topic belongs to, if any. */
export function deviceOfTopic(topic: string): string | undefined {
  const t = topic.split('/');
  return t.length >= 2 && t[0] === DEVICES_PREFIX ? t[1] : undefined;
}

const allowsPublish = (r: AclRule): boolean => r.allow === 'publish' || r.allow === 'both';
const allowsSubscribe = (r: AclRule): boolean => r.allow === 'subscribe' || r.allow === 'both';

export function authorizePublish(p: Principal, topic: string, limits: TopicLimits): Decision {
  if (!isValidTopicName(topic)) return no('invalid topic name (empty, wildcard or U+0000)');
  const lim = checkTopicLimits(topic, limits);
  if (!lim.ok) return lim;
  if (topic.startsWith('$')) return no('publishing to $-topics is not allowed');
  if (p.kind === 'local') {
    if (p.rules === null) return OK;
    return p.rules.some((r) => allowsPublish(r) && topicMatches(r.topic, topic)) ? OK : no('no local ACL rule allows publishing to this topic');
  }
  const t = topic.split('/');
  if (t[0] === DEVICES_PREFIX) {
    if (t.length < 2 || t[1] !== p.deviceId) return no("publishing into another device's namespace is not allowed");
    if (t.length < 3) return no('devices publish under devices/ID/<subtopic>, not to devices/ID itself');
    if (t[2] === COMMANDS_LEVEL) return no('devices may not publish to their commands topic (devices/ID/commands/…)');
    return OK;
  }
  return p.rules.some((r) => allowsPublish(r) && topicMatches(r.topic, topic)) ? OK : no('outside the device namespace devices/ID/… and no group rule allows it');
}

export function authorizeSubscribe(p: Principal, filter: string, limits: TopicLimits): Decision {
  if (!isValidTopicFilter(filter)) return no('invalid topic filter');
  const lim = checkTopicLimits(filter, limits);
  if (!lim.ok) return lim;
  if (p.kind === 'local') {
    if (p.rules === null) return OK;
    return p.rules.some((r) => allowsSubscribe(r) && isValidTopicFilter(r.topic) && filterCovers(r.topic, filter))
      ? OK
      : no('no local ACL rule allows this subscription');
  }
  if (filter.startsWith('$')) return no('$-topics are not visible to devices');
  if (couldReachOtherDevice(filter, p.deviceId)) return no("the filter could match another device's topics");
  if (filterCovers(`${DEVICES_PREFIX}/${p.deviceId}/#`, filter)) return OK;
  return p.rules.some((r) => allowsSubscribe(r) && isValidTopicFilter(r.topic) && filterCovers(r.topic, filter))
    ? OK
    : no('outside the device namespace devices/ID/… and no group rule allows it');
}

/** Second guard at delivery time (aedes authorizeForward): may this principal receive a message on `topic`? */
export function authorizeDelivery(p: Principal, topic: string): boolean {
  if (p.kind === 'local') {
    if (p.rules === null) return true;
    return p.rules.some((r) => allowsSubscribe(r) && topicMatches(r.topic, topic));
  }
  if (topic.startsWith('$')) return false;
  const t = topic.split('/');
  if (t[0] === DEVICES_PREFIX) return t.length >= 2 && t[1] === p.deviceId;
  return p.rules.some((r) => allowsSubscribe(r) && topicMatches(r.topic, topic));
}

/** Does a device publish go upstream: it matches one of the bridge topic filters and is not a command topic. */
export function isBridgedTopic(topic: string, bridgeTopics: readonly string[]): boolean {
  if (isCommandTopic(topic)) return false;
  return bridgeTopics.some((f) => topicMatches(f, topic));
}
