/**
 * Limits of the uplink protocol (protocol/codec.ts LIMITS) that an HTTP upload's
 * metadata must respect, checked at the API before anything is journaled: a
 * record the encoder would refuse must never be acknowledged (issue 9, defect 2).
 *
 * The api/ layer may not import protocol/ (eslint local/layers), so the values
 * are mirrored here; test/api/api-limits.test.ts fails when they drift apart.
 */
export const UPLINK_LIMITS = Object.freeze({
  /** protocol LIMITS.maxContentTypeBytes */
  maxContentTypeBytes: 255,
  /** protocol LIMITS.maxTopicBytes */
  maxTopicBytes: 4096,
  /** protocol LIMITS.maxDeviceIdBytes */
  maxDeviceIdBytes: 256,
  /** protocol LIMITS.maxMetadataBytes: the JSON metadata of a message's first chunk */
  maxMetadataBytes: 8192,
});

/**
 * Size in bytes of a message's chunk metadata as the uplink encodes it
 * (`JSON.stringify({device_id, topic, qos, received_at, content_type?})`).
 */
export function uplinkMetadataBytes(meta: { deviceId: string; topic: string; qos: 0 | 1; receivedAt: number; contentType?: string }): number {
  return Buffer.byteLength(
    JSON.stringify({
      device_id: meta.deviceId,
      topic: meta.topic,
      qos: meta.qos,
      received_at: Math.floor(meta.receivedAt),
      ...(meta.contentType !== undefined ? { content_type: meta.contentType } : {}),
    }),
  );
}
