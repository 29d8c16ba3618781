/**
 * Contracts between the device side (broker/, the HTTPS upload) and the cloud
 * side (journal, uplink). Implemented by bridge/journal.ts (UplinkSink) and
 * broker/broker.ts (CommandTarget).
 */

export interface UplinkMessageMeta {
  deviceId: string;
  topic: string;
  qos: 0 | 1;
  /** MIME type when known (HTTP upload Content-Type); MQTT 3.1.1 has none. */
  contentType?: string;
  /** When the gateway received the message, ms since the epoch. */
  receivedAt: number;
  /**
   * MQTT packet id of a QoS 1 publish. Kept in the journal (not sent upstream) so that a
   * device's redelivery after a lost PUBACK is recognised even across a daemon restart.
   */
  packetId?: number;
}

/** An unacknowledged QoS 1 record that carries its MQTT packet id, as the broker's redelivery table needs it. */
export interface JournaledPublish {
  id: string;
  deviceId: string;
  packetId: number;
  topic: string;
  /** payload bytes */
  size: number;
  /** SHA-256 of the payload, lowercase hex */
  sha256: string;
}

/**
 * A journal's unacknowledged records, read by the broker at start to rebuild its redelivery
 * table (broker/redelivery.ts).
 */
export interface PendingRecords {
  /**
   * Unacknowledged QoS 1 records with a packet id, NEWEST FIRST, passed to `visit` until it
   * returns false. Only records journaled at most `maxAgeMs` before the newest pending one
   * and among the newest `maxRecords` pending ones are visited: an older record could not be
   * matched by the table anyway (age) or is beyond the stated bound (count). Nothing read here
   * is kept in memory. `wanted`, when given, is asked first with the device and packet id: a
   * record it refuses is skipped without being checked and decoded in full. Returns how many
   * records were examined.
   */
  recentPublishes(
    opts: { maxAgeMs: number; maxRecords: number; wanted?: (deviceId: string, packetId: number) => boolean },
    visit: (p: JournaledPublish) => boolean,
  ): number;
}

export interface AppendResult {
  /** Stable message id: the cloud deduplicates on it; unique across restarts. */
  id: string;
  size: number;
  /** SHA-256 of the payload, lowercase hex. */
  sha256: string;
}

export interface UplinkSink {
  /**
   * Append one message; resolves only once it is durable under the journal's
   * fsync policy (the broker sends PUBACK after this). Rejects with
   * ECONN_JOURNAL_FULL (reject policy), ECONN_PAYLOAD_TOO_LARGE, ECONN_JOURNAL_IO, ECONN_CLOSED.
   */
  append(meta: UplinkMessageMeta, payload: Buffer): Promise<AppendResult>;
  /**
   * Stream a payload of any size into the journal without holding it in
   * memory. When expectedSha256 is given and does not match, nothing is kept
   * and it rejects with ECONN_DIGEST_MISMATCH. More than maxBytes rejects with
   * ECONN_PAYLOAD_TOO_LARGE (nothing kept). `declaredBytes` (an HTTP Content-Length) lets the journal hand
   * the body to the uplink while it still arrives (streamed upstream, committed as one message); a body of
   * another length is refused (ECONN_BAD_REQUEST, nothing kept).
   */
  appendStream(meta: UplinkMessageMeta, body: AsyncIterable<Buffer | Uint8Array>, opts: { maxBytes: number; expectedSha256?: Buffer; declaredBytes?: number }): Promise<AppendResult>;
}

/** Delivering cloud commands to devices (implemented by the broker). */
export interface CommandTarget {
  /**
   * Publish `payload` to devices/{deviceId}/commands/{name} with QoS 1.
   * Resolves with `delivered: true` once the device acknowledged it (PUBACK), or
   * `delivered: false` with a reason (not connected, not subscribed, timeout).
   */
  publishCommand(deviceId: string, name: string, payload: Buffer, timeoutMs?: number): Promise<{ delivered: boolean; reason?: string }>;
}
