/**
 * The device CRLs (broker.tls.crl_files): loaded at start, polled for changes (fs.watchFile,
 * interval `pollMs`) and reloaded on change and on reload(). Reloads run one at a time; a
 * failed reload keeps the previous CRLs in force. After every successful load `afterLoad` runs
 * (the broker drops the sessions whose certificate is now revoked) and its result is reported.
 */
import { watchFile, unwatchFile, type Stats } from 'node:fs';
import type { Logger } from '../core/logger.js';
import { errorCode } from '../core/errors.js';
import type { CrlStore } from '../identity/auth.js';

export interface CrlWatchOptions {
  crls: CrlStore;
  log: Logger;
  pollMs: number;
  /** the configured CRL files (they change on reload) */
  files: () => readonly string[];
  /** after a successful load: returns how many sessions were dropped */
  afterLoad: () => number;
  /** a reload finished: `{ entries, dropped }` or `{ error }` */
  onReloaded: (r: { entries: number; dropped: number } | { error: unknown }) => void;
  closing: () => boolean;
}

export class CrlWatch {
  private watched: string[] = [];
  private queue: Promise<void> = Promise.resolve();

  constructor(private readonly o: CrlWatchOptions) {}

  /** First load (throws: the broker does not start with unreadable CRLs). */
  async load(): Promise<void> {
    const files = this.o.files();
    const r = await this.o.crls.load(files);
    if (files.length) this.o.log.info({ crls: r.crls, entries: r.entries }, 'CRLs loaded');
    for (const f of r.stale) this.o.log.warn({ file: f }, 'CRL is past its nextUpdate; publish a fresh one');
  }

  watch(): void {
    this.unwatch();
    this.watched = [...this.o.files()];
    for (const f of this.watched) watchFile(f, { interval: this.o.pollMs, persistent: false }, this.onChange);
  }

  unwatch(): void {
    for (const f of this.watched) unwatchFile(f, this.onChange);
    this.watched = [];
  }

  /** Watch the configured files again if the list changed. */
  rewatchIfChanged(): void {
    if (JSON.stringify(this.watched) !== JSON.stringify(this.o.files())) this.watch();
  }

  private readonly onChange = (cur: Stats, prev: Stats): void => {
    if (cur.mtimeMs === prev.mtimeMs && cur.size === prev.size && cur.ino === prev.ino) return;
    void this.reload('file change');
  };

  /** Reload, keeping the previous CRLs on error; resolves with a line for the reload report. */
  reload(why: string): Promise<string | undefined> {
    const run = this.queue.then(async () => {
      if (this.o.closing()) return undefined;
      try {
        const files = this.o.files();
        const r = await this.o.crls.load(files);
        for (const f of r.stale) this.o.log.warn({ file: f }, 'CRL is past its nextUpdate; publish a fresh one');
        this.o.log.info({ why, crls: r.crls, entries: r.entries }, 'CRLs reloaded');
        const dropped = this.o.afterLoad();
        this.o.onReloaded({ entries: r.entries, dropped });
        return files.length ? `broker: CRLs reloaded (${r.entries} revoked serials)` : undefined;
      } catch (err) {
        this.o.log.error({ err, code: errorCode(err), why }, 'CRL reload failed; the previous CRLs stay in force');
        this.o.onReloaded({ error: err });
        return `broker: CRL reload failed (${(err as Error).message}); previous CRLs kept`;
      }
    });
    this.queue = run.then(
      () => {},
      () => {},
    );
    return run;
  }
}
