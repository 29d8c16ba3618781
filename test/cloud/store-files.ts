/**
 * Test helper: what a cloud store directory holds on disk, read synchronously
 * with the product's own record decoder (cloud/store/format.ts), so tests can
 * check durability at the moment an ACK arrives without going through the store.
 */
import { existsSync, readFileSync, readdirSync } from 'node:fs';
import path from 'node:path';
import { decodeSegment, parseSegmentName, type StoredEntry } from '../../cloud/store/format.js';

export interface OnDisk {
  entry: StoredEntry;
  /** The payload bytes (inline in the segment, or its blob file). */
  payload: Buffer;
}

/** Every durable record of the store in `dir`, in store order. */
export function readStoreSync(dir: string): OnDisk[] {
  const segDir = path.join(dir, 'segments');
  if (!existsSync(segDir)) return [];
  const names = readdirSync(segDir).filter((n) => parseSegmentName(n) !== undefined).sort();
  const out: OnDisk[] = [];
  for (const n of names) {
    for (const r of decodeSegment(readFileSync(path.join(segDir, n)))) {
      out.push({ entry: r.entry, payload: r.payload ?? readFileSync(path.join(dir, r.entry.payload_file!)) });
    }
  }
  return out;
}

/** The stored entries as plain JSON records (what the old index.jsonl held, without payload_file). */
export function storedEntries(dir: string): Record<string, unknown>[] {
  return readStoreSync(dir).map((r) => ({ ...r.entry }) as unknown as Record<string, unknown>);
}
