/**
 * An upload while it still arrives (issue 11: large payloads stream end to end). The journal hands one
 * to its 'upload' listeners (the uplink) as soon as an upload of known length starts to be staged, so
 * that its chunks can go upstream while the rest of the body is still arriving; the journal and the link
 * overlap instead of running one after the other.
 *
 * It carries the message id the committed record will have (so the cloud assembles the chunks sent early
 * and the rest under one id), the bytes of the staging file written so far (`written`, a 'progress'
 * event each time it grows) and a reader over them. It ends ('end') either committed — the record is
 * durable in the journal and the uplink sends the rest, last chunk included, from it — or aborted (cut
 * off, too large, digest mismatch, journal error): the record never exists, and the uplink must make the
 * cloud drop what it received (DISCARD, docs/PROTOCOL.md §13.10). The last chunk is never sent from here:
 * it waits for the commit, so the cloud cannot store what the connector did not acknowledge.
 */
import { EventEmitter } from 'node:events';
import type { FileHandle } from 'node:fs/promises';
import { StorageError } from '../../core/errors.js';
import { preadFully } from '../../core/fs.js';
import type { UplinkMessageMeta } from '../../core/ports.js';

/** Blob files of uploads that were streamed are named `stream.<message id>.bin`: the record's id survives a restart in its meta. */
export const STREAM_BLOB_PREFIX = 'stream.';

/** The message id a blob name carries, if it is the blob of a streamed upload. */
export function streamIdOfBlob(name: string | undefined): string | undefined {
  if (name === undefined || !name.startsWith(STREAM_BLOB_PREFIX) || !name.endsWith('.bin')) return undefined;
  const id = name.slice(STREAM_BLOB_PREFIX.length, -4);
  return id.length > 0 ? id : undefined;
}

export type UploadState = 'receiving' | 'committed' | 'aborted';

export class IncomingUpload extends EventEmitter {
  /** Bytes [0, written) are in the staging file and can be read. */
  written = 0;
  state: UploadState = 'receiving';
  /**
   * While the uplink streams it: bytes handed to the link so far, and how far the body may run ahead of
   * them. The journal stops reading the body beyond that (linkCaughtUp), so that the two go at the pace of
   * the slower: a body received faster than the link takes it would otherwise leave most of itself to be
   * sent after the 202, one phase after the other again (and take the event loop from the link meanwhile).
   */
  streaming = false;
  sent = 0;
  window = 0;
  private reads = 0;
  private fh: FileHandle | undefined;

  constructor(
    /** The message id the committed record will carry (unique: the journal's id prefix + a per-boot counter). */
    readonly id: string,
    readonly meta: UplinkMessageMeta,
    /** The declared length of the whole body (Content-Length). */
    readonly total: number,
    /** A read-only handle on the staging file (it stays valid through the rename to a blob and an unlink). */
    fh: FileHandle,
  ) {
    super();
    this.fh = fh;
  }

  /** Read bytes [start, start + length) into target at targetOffset; they must be written already. */
  async read(target: Buffer, targetOffset: number, start: number, length: number): Promise<void> {
    if (start + length > this.written) throw new StorageError('ECONN_JOURNAL_IO', `upload ${this.id}: bytes up to ${start + length} are not written yet (${this.written})`);
    const fh = this.fh;
    if (!fh) throw new StorageError('ECONN_NOT_FOUND', `upload ${this.id} has ended`);
    this.reads++;
    try {
      const got = await preadFully(fh, target, targetOffset, length, start);
      if (got !== length) throw new StorageError('ECONN_JOURNAL_IO', `upload ${this.id}: staging file shorter than ${start + length} bytes`);
    } finally {
      this.reads--;
      if (this.state !== 'receiving' && this.reads === 0) this.closeFile();
    }
  }

  /** The uplink starts streaming it; the body may run `window` bytes ahead of what the link took. */
  startStreaming(window: number): void {
    this.streaming = true;
    this.window = window;
  }

  /** The link took the upload up to `n` bytes. */
  noteSent(n: number): void {
    this.sent = n;
    this.emit('sent');
  }

  /** The uplink stopped streaming it (committed, link gone, refused): the body is no longer held back. */
  stopStreaming(): void {
    if (!this.streaming) return;
    this.streaming = false;
    this.emit('sent');
  }

  /**
   * Resolves once the body may go on past `staged` bytes: the link is close enough behind, or no longer
   * streaming it. Once held, the body waits until the link is within half the window, not one chunk
   * less: resuming for every chunk the link takes would stop and start the device's connection (and wake
   * this loop) for every chunk.
   */
  async linkCaughtUp(staged: number): Promise<void> {
    if (!(this.streaming && staged - this.sent > this.window)) return;
    while (this.streaming && this.state === 'receiving' && staged - this.sent > this.window / 2) {
      await new Promise<void>((resolve) => this.once('sent', resolve));
    }
  }

  /** The journal wrote up to `n` bytes. */
  progress(n: number): void {
    if (this.state !== 'receiving' || n <= this.written) return;
    this.written = n;
    this.emit('progress', n);
  }

  /** The upload is committed (a durable record) or aborted (nothing kept); idempotent. */
  end(state: 'committed' | 'aborted'): void {
    if (this.state !== 'receiving') return;
    this.state = state;
    if (this.reads === 0) this.closeFile();
    this.emit('end', state);
    this.emit('sent');
  }

  private closeFile(): void {
    const fh = this.fh;
    this.fh = undefined;
    void fh?.close().catch(() => undefined);
  }
}
