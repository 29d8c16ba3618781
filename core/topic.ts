/**
 * MQTT 3.1.1 topic filter matching (section 4.7), the one copy the ACL (broker/acl.ts), cloud
 * commands to devices (broker/commands.ts) and the reference cloud's subscribers share:
 *  - `+` matches one level, `#` the rest, including the parent level (`a/#` matches `a`);
 *  - a filter whose first level is a wildcard does not match a topic starting with `$`.
 * (The conformance guard's forward hook keeps a variant without the `$` rule: it applies that rule
 * itself, per subscription — broker/conformance-hooks.ts.)
 */

/** `topic` against a filter already split into its levels. */
function matchLevels(f: readonly string[], topic: string): boolean {
  if ((f[0] === '+' || f[0] === '#') && topic.startsWith('$')) return false;
  const t = topic.split('/');
  for (let i = 0; i < f.length; i++) {
    const level = f[i];
    if (level === '#') return true;
    if (i >= t.length) return false;
    if (level !== '+' && level !== t[i]) return false;
  }
  return f.length === t.length;
}

/** Whether `topic` matches `filter` (compileFilter for a filter matched against many topics). */
export function topicMatches(filter: string, topic: string): boolean {
  return matchLevels(filter.split('/'), topic);
}

/**
 * A filter split once into a matcher: whoever matches many topics against the same filters (a
 * subscriber, every stored message) splits only the topic per call, and `#` splits nothing.
 */
export function compileFilter(filter: string): (topic: string) => boolean {
  if (filter === '#') return (topic) => !topic.startsWith('$');
  const f = filter.split('/');
  return (topic) => matchLevels(f, topic);
}
