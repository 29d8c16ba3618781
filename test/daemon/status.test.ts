/**
 * daemon/status.ts: the summary `connector status` and the status page read, built from
 * component status() shapes. Pure functions, no daemon.
 */
import t from 'tap';
import { statusLine, summarize } from '../../daemon/status.js';

const components = {
  broker: { connected: 3 },
  registry: { active: 5 },
  journal: { pendingMessages: 1234, pendingBytes: 99_000, oldestPendingAgeMs: 180_400 },
  uplink: { state: 'connected', last_ack_at: 1_000_000 - 2000, reconnects: 1 },
};

t.test('summarize: the drain rate comes from the rates given (the status page sampler), null without them', async (t) => {
  const s = summarize(components, { mqtt_tls: 8883 }, 1_000_000, { drain_per_s: 15000 });
  t.same(s.journal, { messages: 1234, bytes: 99_000, oldest_unacked_age_s: 180, drain_rate_msg_s: 15000 });
  t.equal(s.uplink?.last_ack_age_s, 2);
  t.equal(summarize(components, {}, 1_000_000).journal?.drain_rate_msg_s, null, 'no sampler: unknown, not 0');
  t.equal(summarize(components, {}, 1_000_000, { drain_per_s: 0 }).journal?.drain_rate_msg_s, 0, 'nothing acknowledged in the last minute: 0');
  t.equal(summarize({ broker: {} }, {}, 1_000_000, { drain_per_s: 5 }).journal, null, 'no journal (bridge off): no journal facts at all');
});

t.test('statusLine: unchanged by the drain rate', async (t) => {
  t.equal(statusLine(summarize(components, {}, 1_000_000, { drain_per_s: 7 }), true), '3 devices, uplink connected (ack 2s ago), backlog 1234, oldest 180s');
});
