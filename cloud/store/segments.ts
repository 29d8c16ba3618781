/**
 * Reading segment files: a bounded streaming scanner (no whole-file reads)
 * and a positional read of one record.
 */
import { open, type FileHandle } from 'node:fs/promises';
import { HEADER_BYTES, MAX_META_BYTES, decodeRecord, type StoredEntry } from './format.js';

const READ_BYTES = 1024 * 1024;

export interface ScannedRecord {
  entry: StoredEntry;
  /** Position of the record in the segment, and just after it. */
  pos: number;
  end: number;
  /** Position of the inline payload (meaningful when the entry has no payload_file). */
  payloadPos: number;
  /** The inline payload, when asked for. */
  payload?: Buffer;
}

export interface ScanResult {
  /** Bytes of valid records from the start of the file. */
  validBytes: number;
  /** Why the scan stopped before `limit` (undefined: reached it cleanly). */
  stop?: string;
}

/**
 * Stream the records of a segment from position `start` (default 0) up to `limit` bytes (default:
 * the file size), in order, reading at most ~1 MiB plus one record at a time.
 * Stops at the first invalid record, or at a record whose seq is not `expectSeq`
 * (then +1 each) when given. `want(entry)` decides whether a record's inline
 * payload is copied out for the callback.
 */
export async function scanSegment(
  file: string,
  onRecord: (r: ScannedRecord) => boolean | void,
  opts: { start?: number; limit?: number; expectSeq?: number; verify?: boolean; payloads?: boolean } = {},
): Promise<ScanResult> {
  const fh = await open(file, 'r');
  try {
    const limit = opts.limit ?? (await fh.stat()).size;
    let expect = opts.expectSeq;
    let buf = Buffer.alloc(0);
    let bufStart = opts.start ?? 0; // file position of buf[0]
    let filePos = bufStart; // next file position to read
    let pos = bufStart; // file position of the next record
    for (;;) {
      const rel = pos - bufStart;
      const d = decodeRecord(buf, rel, opts.verify ?? true);
      if (d.kind === 'record') {
        if (expect !== undefined && d.entry.seq !== expect) return { validBytes: pos, stop: `seq ${d.entry.seq} where ${expect} was expected` };
        const r: ScannedRecord = { entry: d.entry, pos, end: pos + d.length, payloadPos: bufStart + d.payloadOffset };
        if (opts.payloads && d.entry.payload_file === undefined) r.payload = Buffer.from(buf.subarray(d.payloadOffset, d.payloadOffset + d.payloadLength));
        pos += d.length;
        if (expect !== undefined) expect++;
        if (onRecord(r) === false) return { validBytes: pos };
        continue;
      }
      if (d.kind === 'bad') return { validBytes: pos, stop: d.reason };
      // need more bytes
      if (filePos >= limit) return pos >= limit ? { validBytes: pos } : { validBytes: pos, stop: 'torn record at the end' };
      if (d.bytes > HEADER_BYTES + MAX_META_BYTES && pos + d.bytes > limit) return { validBytes: pos, stop: 'torn record at the end' };
      const want = Math.max(READ_BYTES, d.bytes - (buf.length - rel));
      const chunk = Buffer.allocUnsafe(Math.min(want, limit - filePos));
      const { bytesRead } = await fh.read(chunk, 0, chunk.length, filePos);
      if (bytesRead === 0) return { validBytes: pos, stop: 'file shorter than expected' };
      filePos += bytesRead;
      buf = rel > 0 || buf.length === 0 ? Buffer.concat([buf.subarray(rel), chunk.subarray(0, bytesRead)]) : Buffer.concat([buf, chunk.subarray(0, bytesRead)]);
      bufStart = pos;
    }
  } finally {
    await fh.close();
  }
}

/** Read and decode the record at `pos` (CRC checked), with its inline payload. */
export async function readRecordAt(fh: FileHandle, pos: number, withPayload = false): Promise<{ entry: StoredEntry; payload?: Buffer } | undefined> {
  const head = Buffer.alloc(HEADER_BYTES);
  if ((await fh.read(head, 0, HEADER_BYTES, pos)).bytesRead < HEADER_BYTES) return undefined;
  const metaLen = head.readUInt32BE(4);
  if (metaLen > MAX_META_BYTES) return undefined;
  const payloadLen = head.readUInt32BE(8);
  const full = Buffer.alloc(HEADER_BYTES + metaLen + payloadLen);
  const { bytesRead } = await fh.read(full, 0, full.length, pos);
  if (bytesRead < full.length) return undefined;
  const d = decodeRecord(full, 0, true);
  if (d.kind !== 'record') return undefined;
  return withPayload ? { entry: d.entry, payload: full.subarray(d.payloadOffset, d.payloadOffset + d.payloadLength) } : { entry: d.entry };
}
