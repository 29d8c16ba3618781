/**
 * Kept for existing importers: the journal's pure codecs now live under bridge/journal/
 * (format-v1.ts: the legacy record and ack.json codecs still read on replay; format.ts: the
 * current record, segment header, segment index and ack log codecs).
 */
export * from './journal/format-v1.js';
