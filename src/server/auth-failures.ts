/**
 * Refusals of callers the broker could not identify (and 429s to identified ones), recorded in the
 * audit log as a bounded summary instead of one record per request: a flood of bad requests must not
 * grow the log faster than a fixed rate (DESIGN.md section 1, property 7).
 *
 * Per interval, one record per (source address, category, actor) with the count and the first and last
 * time; at most `maxSources` such records, everything beyond summed into one `other` record. A record
 * never holds the request path or the credential: only the source address, the category and up to
 * MAX_REASONS of the broker's own refusal messages, each cut to MAX_REASON_CHARS.
 */
import type { AuditEventInput } from '../audit/log.ts';

export type FailureCategory = 'no_credential' | 'rejected' | 'rate_limited' | 'error';

export interface FailureKey {
  /** The source address, normalised (IPv6 to its /64), or `unknown`. */
  source: string;
  category: FailureCategory;
  /** Set for an identified caller that was refused (per-identity rate limit): `agent:NAME`. */
  actor?: string | undefined;
  agent?: string | undefined;
}

export interface AuthFailureLogOptions {
  /** Writes one record (AuditLog.append). Failures to write are ignored: the log fails closed on its own. */
  append: (event: AuditEventInput) => Promise<unknown>;
  intervalMs: number;
  maxSources: number;
  now?: () => number;
}

/** Refusal messages kept per record, and their length: enough to tell an expired token from an unknown subject. */
export const MAX_REASONS = 2;
export const MAX_REASON_CHARS = 160;

interface Entry extends FailureKey {
  count: number;
  first: number;
  last: number;
  reasons: string[];
}

interface Other {
  count: number;
  first: number;
  last: number;
  byCategory: Partial<Record<FailureCategory, number>>;
}

export class AuthFailureLog {
  readonly #append: AuthFailureLogOptions['append'];
  readonly #intervalMs: number;
  readonly #maxSources: number;
  readonly #now: () => number;
  #entries = new Map<string, Entry>();
  #other: Other | undefined;
  #timer: NodeJS.Timeout | undefined;
  #flushing: Promise<void> = Promise.resolve();

  constructor(options: AuthFailureLogOptions) {
    this.#append = options.append;
    this.#intervalMs = options.intervalMs;
    this.#maxSources = Math.max(0, options.maxSources);
    this.#now = options.now ?? Date.now;
  }

  /** Flushes every interval from now on (the timer does not keep the process alive). */
  start(): void {
    this.#timer ??= setInterval(() => void this.flush(), this.#intervalMs).unref();
  }

  /** Counts one refusal. O(1), no I/O: safe to call on every refused request of a flood. */
  note(key: FailureKey, reason?: string): void {
    const now = this.#now();
    const id = `${key.source}\0${key.category}\0${key.actor ?? ''}`;
    const entry = this.#entries.get(id);
    if (entry) {
      entry.count++;
      entry.last = now;
      if (reason !== undefined && entry.reasons.length < MAX_REASONS) {
        const r = clip(reason);
        if (!entry.reasons.includes(r)) entry.reasons.push(r);
      }
      return;
    }
    if (this.#entries.size < this.#maxSources) {
      this.#entries.set(id, { ...key, count: 1, first: now, last: now, reasons: reason === undefined ? [] : [clip(reason)] });
      return;
    }
    const other = (this.#other ??= { count: 0, first: now, last: now, byCategory: {} });
    other.count++;
    other.last = now;
    other.byCategory[key.category] = (other.byCategory[key.category] ?? 0) + 1;
  }

  /** Writes what was counted since the last flush (one record per key, plus `other`) and starts afresh. */
  flush(): Promise<void> {
    const entries = [...this.#entries.values()];
    const other = this.#other;
    this.#entries = new Map();
    this.#other = undefined;
    const events = entries.map((e) => this.#event(e));
    if (other) events.push(this.#otherEvent(other));
    // Appended together, so they share one write and fdatasync; in order after any earlier flush.
    this.#flushing = this.#flushing.then(() => Promise.all(events.map((e) => this.#write(e)))).then(() => undefined);
    return this.#flushing;
  }

  /** Stops the timer and writes what is left. */
  async close(): Promise<void> {
    if (this.#timer) clearInterval(this.#timer);
    this.#timer = undefined;
    await this.flush();
  }

  /** A record the log refuses (a refusal message that looks like a secret) goes again without its messages. */
  async #write(event: AuditEventInput): Promise<void> {
    try {
      await this.#append(event);
    } catch {
      const details = event.details as Record<string, unknown> | undefined;
      if (!details?.['reasons']) return;
      const { reasons: _dropped, ...rest } = details;
      await this.#append({ ...event, details: { ...rest, reasonsDropped: true } as AuditEventInput['details'] }).catch(() => undefined);
    }
  }

  #event(e: Entry): AuditEventInput {
    return {
      type: e.actor ? 'request.throttled' : 'auth.failed',
      actor: e.actor ?? 'anonymous',
      ...(e.agent ? { agent: e.agent } : {}),
      outcome: 'denied',
      reason: e.category,
      details: {
        source: e.source,
        category: e.category,
        count: e.count,
        first: new Date(e.first).toISOString(),
        last: new Date(e.last).toISOString(),
        intervalSeconds: this.#intervalMs / 1000,
        ...(e.reasons.length ? { reasons: e.reasons } : {}),
      },
    };
  }

  #otherEvent(o: Other): AuditEventInput {
    return {
      type: 'auth.failed',
      actor: 'anonymous',
      outcome: 'denied',
      reason: 'other',
      details: {
        source: 'other',
        count: o.count,
        byCategory: o.byCategory,
        first: new Date(o.first).toISOString(),
        last: new Date(o.last).toISOString(),
        intervalSeconds: this.#intervalMs / 1000,
        note: `sources beyond the first ${this.#maxSources} of the interval`,
      },
    };
  }
}

/** Printable ASCII only (at most 2 bytes each once JSON-escaped), MAX_REASON_CHARS at most: the record size stays bounded. */
function clip(reason: string): string {
  return reason.slice(0, MAX_REASON_CHARS).replace(/[^\x20-\x7e]/g, '?');
}
