/** The journal's Prometheus metrics (connector_journal_*), documented in docs/operations.md. */
import { Counter, Gauge, Histogram, type Registry } from 'prom-client';

export interface JournalGauges {
  pendingMessages(): number;
  pendingBytes(): number;
  oldestAgeMs(): number;
  diskBytes(): number;
  writable(): boolean;
  cacheBytes(): number;
}

export type JournalMetrics = ReturnType<typeof createJournalMetrics>;

export function createJournalMetrics(registry: Registry | undefined, g: JournalGauges) {
  const registers = registry ? [registry] : [];
  const m = {
    depth: new Gauge({ name: 'connector_journal_depth_messages', help: 'unacknowledged messages in the journal', registers, collect() { this.set(g.pendingMessages()); } }),
    bytes: new Gauge({ name: 'connector_journal_depth_bytes', help: 'bytes of unacknowledged messages in the journal', registers, collect() { this.set(g.pendingBytes()); } }),
    age: new Gauge({ name: 'connector_journal_oldest_age_seconds', help: 'age of the oldest unacknowledged message (0 when empty)', registers, collect() { this.set(g.oldestAgeMs() / 1000); } }),
    disk: new Gauge({ name: 'connector_journal_disk_bytes', help: 'bytes the journal uses on disk (segments, blobs, staging, quarantine)', registers, collect() { this.set(g.diskBytes()); } }),
    writable: new Gauge({ name: 'connector_journal_writable', help: '1 while the journal accepts messages, 0 after a write or fsync error until a probe succeeds', registers, collect() { this.set(g.writable() ? 1 : 0); } }),
    cache: new Gauge({ name: 'connector_journal_cache_bytes', help: 'bytes of recent records kept in memory for the uplink', registers, collect() { this.set(g.cacheBytes()); } }),
    drops: new Counter({ name: 'connector_journal_dropped_total', help: 'messages dropped without a cloud acknowledgement, by reason (overflow, ttl, corrupt)', labelNames: ['reason'] as const, registers }),
    quarantined: new Counter({ name: 'connector_journal_quarantined_total', help: 'messages moved to the quarantine (dead-letter) area', registers }),
    quarantineEvicted: new Counter({ name: 'connector_journal_quarantine_evicted_total', help: 'quarantined messages deleted to keep the quarantine within its share of max_bytes', registers }),
    fsyncs: new Counter({ name: 'connector_journal_fsyncs_total', help: 'fsyncs issued by the journal, by kind (segment, blob, dir, ack, quarantine)', labelNames: ['kind'] as const, registers }),
    writes: new Counter({ name: 'connector_journal_write_bytes_total', help: 'bytes the journal wrote, by kind (segment, ack, index, blob)', labelNames: ['kind'] as const, registers }),
    diskReads: new Counter({ name: 'connector_journal_disk_reads_total', help: 'records read back from disk for the uplink (not served from memory)', registers }),
    corrupt: new Counter({ name: 'connector_journal_corrupt_truncations_total', help: 'corrupt or torn regions of segments cut on replay (a torn tail, or a corrupt record skipped up to the next valid one)', registers }),
    corruptBytes: new Counter({ name: 'connector_journal_corrupt_bytes_total', help: 'bytes of corrupt or torn segment data cut on replay or on read', registers }),
    writeErrors: new Counter({ name: 'connector_journal_write_errors_total', help: 'segment writes or fsyncs that failed (disk full, I/O error)', registers }),
    appendSeconds: new Histogram({
      name: 'connector_journal_append_seconds',
      help: 'time from append() to durable (under the fsync policy)',
      buckets: [0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5],
      registers,
    }),
  };
  for (const r of ['overflow', 'ttl', 'corrupt']) m.drops.inc({ reason: r }, 0);
  for (const k of ['segment', 'blob', 'dir', 'ack', 'quarantine']) m.fsyncs.inc({ kind: k }, 0);
  for (const k of ['segment', 'ack', 'index', 'blob']) m.writes.inc({ kind: k }, 0);
  return m;
}
