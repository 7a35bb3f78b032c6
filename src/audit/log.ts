/**
 * The audit log (DESIGN.md section 7): an append-only JSON Lines file whose records are chained by
 * SHA-256 (`prev`/`hash`, rule in verify.ts and docs/audit.md).
 *
 * - Durable: `append` resolves only once its record has been written and fdatasync'd (the file is open
 *   with O_DSYNC where the platform has it, which makes each write an fdatasync'd one).
 * - Group commit: records appended while a write+fdatasync is in flight go out together in the next
 *   one, so many concurrent callers share each fsync; file order is seq order.
 * - Fail closed: the first failed write or fsync rejects every pending append with audit_unavailable
 *   and leaves the log unhealthy for good: every later append is refused the same way, and the
 *   broker, which mints only after its record is durable, mints nothing more.
 * - Watched: a log removed, replaced (another file renamed over its path) or changed by another
 *   writer while open fails the same way. The file at the path is compared with the open handle
 *   (device and inode, link count, size) every second and after every write+fdatasync, before the
 *   batch is acknowledged; otherwise records would go on "succeeding" into a deleted inode.
 * - One writer: while open, the log holds its lock file `PATH.lock` (src/audit/lock.ts); a second
 *   writer is refused, naming the holder's pid, and a stale lock is taken over and recorded.
 * - Never a secret, never a lost decision: a JWT- or bearer-looking run inside any string value is
 *   replaced by `[redacted]` and the record is written; only what is a programming mistake (a
 *   secret-named details key, a malformed event) is refused (BrokerError 'internal').
 */
import { dirname, resolve } from 'node:path';
import { open as fsOpen, stat as fsStat, type FileHandle } from 'node:fs/promises';
import { constants as fsConstants, fstatSync, statSync, unlinkSync, type Stats } from 'node:fs';
import { errCode, errText, BrokerError } from '../errors.ts';
import { acquireAuditLock, type AuditLock } from './lock.ts';
import { AUDIT_OUTCOMES, GENESIS_HASH, OPTIONAL_STRING_FIELDS, type AuditEventInput, type AuditRecord, type JsonValue } from './types.ts';
import { canonicalRecordJson, describeBreak, recordLine, sha256Hex, verifyHandle } from './verify.ts';

export type { AuditEventInput, AuditRecord } from './types.ts';

export interface AuditLogOptions {
  /**
   * How long the first record of a batch waits for others to join it before the write starts
   * (default 0: at once; records arriving during a write+fsync join the next batch regardless).
   */
  flushIntervalMs?: number;
  /** @internal For tests: opens the file instead of node:fs/promises `open` (to inject failing writes). */
  openFile?: (path: string, flags: string, mode: number) => Promise<FileHandle>;
  /** @internal For tests: the clock. */
  now?: () => Date;
  /**
   * How often the file at the path is compared with the open handle (removal, replacement, outside
   * writes). Default 1000 ms; the same check also runs after every write+fdatasync.
   */
  checkIntervalMs?: number;
  /**
   * A seq whose record's hash `open` should note while it verifies the file (`hashAtCheckpoint`):
   * the start-up check against the cluster checkpoint (head.ts) reads the file only once.
   */
  checkpointSeq?: number;
  /**
   * Hold the log's lock file (`PATH.lock`, src/audit/lock.ts) while it is open: one writer per log.
   * Default true; false only for tests that build two logs on one file on purpose.
   */
  lock?: boolean;
  /** What the lock names as its holder (`broker serve`, `broker policy apply`). */
  lockCommand?: string;
}

export interface AuditLogStats {
  /** Records made durable by this AuditLog since open. */
  records: number;
  /** write+fdatasync batches done. */
  flushes: number;
  bytes: number;
}

interface Pending {
  line: string;
  record: AuditRecord;
  resolve: (record: AuditRecord) => void;
  reject: (err: unknown) => void;
}

const { O_RDWR, O_APPEND, O_CREAT, O_EXCL } = fsConstants;
/** Undefined where the platform has none (Windows): then each write is followed by an fdatasync. */
const O_DSYNC = (fsConstants as { O_DSYNC?: number }).O_DSYNC;

/** Largest `details` object accepted, serialized. */
export const MAX_DETAILS_BYTES = 8192;
const MAX_DETAILS_DEPTH = 8;
/** Three base64url segments, the first starting with `eyJ` (`{"`): a JWS/JWE compact token. */
const JWT_LIKE = /eyJ[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*/;
/** `Bearer` followed by a token-shaped run (an Authorization header pasted into a message). */
const BEARER_LIKE = /\bbearer\s+[A-Za-z0-9._~+/=-]{16,}/i;
/** The runs redaction replaces: a JWS (3 segments) or JWE (5), and a bearer value (the word kept). */
const JWT_RUNS = /eyJ[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]*){0,2}/g;
const BEARER_RUNS = /\b(bearer\s+)[A-Za-z0-9._~+/=-]{16,}/gi;
/**
 * What either pattern needs: `eyJ` (JWT_LIKE), or `bearer` in any case and a space (BEARER_LIKE); and
 * at least 9 characters (`eyJaa.aa.`). A string without them cannot match either.
 */
const MAY_HOLD_TOKEN = /eyJ|bearer\s/i;
const MIN_TOKEN_RUN = 9;
/** What a token-looking run is replaced with in a record. */
export const REDACTED = '[redacted]';
/** Keys (compared lowercased without `_`/`-`) that are refused outright ... */
const SECRET_KEYS = new Set(['key', 'token', 'password', 'passwd', 'secret', 'privatekey', 'apikey']);
/** ... or as a suffix (accessToken, client_secret, private-key, dbPassword). */
const SECRET_KEY_SUFFIXES = ['token', 'password', 'secret', 'privatekey', 'apikey'];
const EVENT_KEYS = new Set<string>(['type', 'actor', 'details', ...OPTIONAL_STRING_FIELDS]);

export class AuditLog {
  readonly path: string;
  #fh: FileHandle;
  #nextSeq: number;
  #lastHash: string;
  #queue: Pending[] = [];
  #flushing = false;
  #timer: { cancel(): void } | undefined;
  #idle: (() => void)[] = [];
  #failure: BrokerError | undefined;
  #closed = false;
  #closing: Promise<void> | undefined;
  #stats: AuditLogStats = { records: 0, flushes: 0, bytes: 0 };
  readonly #flushIntervalMs: number;
  /**
   * The file is open with O_DSYNC: a write returns once its data is on stable storage, as a write
   * then an fdatasync would, in one request to the thread pool instead of two. Each such request
   * costs the event loop 25 to 40 us on this machine kind (waking a worker thread), about a fifth of
   * what a batch costs the broker in all (docs/benchmarks.md, "Broker core").
   */
  readonly #dsync: boolean;
  readonly #now: () => Date;
  /** Absolute path, for the checks (the process's cwd must not matter). */
  readonly #absPath: string;
  /** The open file's identity. */
  readonly #dev: number;
  readonly #ino: number;
  /** Bytes in the file as far as this log knows: the size at open plus every completed write. */
  #sizeBytes: number;
  /** Bytes of the write in flight (the file may hold any part of them while it runs). */
  #inflightBytes = 0;
  #checkTimer: ReturnType<typeof setInterval> | undefined;
  #checking = false;
  /** The last record known to be on stable storage in the file at the path. */
  #durable: { seq: number; hash: string } | undefined;
  readonly #created: boolean;
  readonly #hashAtCheckpoint: string | undefined;
  /** The log's lock file, released on close. */
  readonly #lock: AuditLock | undefined;
  /** A stale lock this writer took over: recorded in the details of the first record it appends. */
  #lockNote: { [key: string]: JsonValue } | undefined;
  /** close() removes the file: it was created by this open and nothing was appended. */
  #discard = false;

  private constructor(
    path: string,
    fh: FileHandle,
    st: Stats,
    opened: { records: number; lastHash: string; created: boolean; hashAtCheckpoint: string | undefined; lock: AuditLock | undefined; dsync: boolean },
    options: AuditLogOptions,
  ) {
    this.path = path;
    this.#fh = fh;
    this.#dsync = opened.dsync;
    this.#lock = opened.lock;
    const stale = opened.lock?.takenOver;
    if (opened.lock && stale) {
      const h = stale.holder;
      this.#lockNote = { lockFile: opened.lock.path, reason: stale.reason, ...(h ? { pid: h.pid, host: h.host, startedAt: h.startedAt, command: h.command } : {}) };
    }
    this.#nextSeq = opened.records;
    this.#lastHash = opened.lastHash;
    this.#durable = opened.records > 0 ? { seq: opened.records - 1, hash: opened.lastHash } : undefined;
    this.#created = opened.created;
    this.#hashAtCheckpoint = opened.hashAtCheckpoint;
    this.#flushIntervalMs = Math.max(0, options.flushIntervalMs ?? 0);
    this.#now = options.now ?? (() => new Date());
    this.#absPath = resolve(path);
    this.#dev = st.dev;
    this.#ino = st.ino;
    this.#sizeBytes = st.size;
    const every = options.checkIntervalMs ?? 1000;
    if (every > 0) {
      this.#checkTimer = setInterval(() => void this.#checkNow(), every);
      this.#checkTimer.unref();
    }
  }

  /**
   * Opens (creating it with mode 0600 if missing; the directory must exist) and verifies the log,
   * continuing its chain. Rejects with audit_chain_broken if the existing chain does not hold, and
   * with audit_unavailable if the path cannot be opened for appending or is not a regular file.
   */
  static async open(path: string, options: AuditLogOptions = {}): Promise<AuditLog> {
    const openFile = options.openFile ?? fsOpen;
    const unavailable = (err: unknown) =>
      new BrokerError('audit_unavailable', `the audit log ${path} cannot be opened for appending: ${errText(err)}`, { cause: err });
    let lock: AuditLock | undefined;
    if (options.lock !== false) {
      // Not a regular file (a directory, /dev/null): refused before a lock file is made beside it.
      const st = await fsStat(path).catch(() => undefined);
      if (st && !st.isFile()) throw unavailable(new Error('not a regular file'));
      lock = await acquireAuditLock(path, options.lockCommand === undefined ? {} : { command: options.lockCommand });
    }
    let fh: FileHandle;
    let created = true;
    // O_DSYNC unless a test brings its own file (it injects failures into the write or the fdatasync).
    const dsync = options.openFile === undefined && O_DSYNC !== undefined;
    try {
      try {
        fh = dsync ? await fsOpen(path, O_RDWR | O_APPEND | O_CREAT | O_EXCL | O_DSYNC, 0o600) : await openFile(path, 'ax+', 0o600);
      } catch (err) {
        if (errCode(err) !== 'EEXIST') throw err;
        created = false;
        fh = dsync ? await fsOpen(path, O_RDWR | O_APPEND | O_CREAT | O_DSYNC, 0o600) : await openFile(path, 'a+', 0o600);
      }
    } catch (err) {
      lock?.release();
      throw unavailable(err);
    }
    try {
      if (!(await fh.stat()).isFile()) throw unavailable(new Error('not a regular file'));
      if (created) await syncDirectory(dirname(path));
      let result;
      let hashAtCheckpoint: string | undefined;
      const wanted = options.checkpointSeq;
      try {
        result = await verifyHandle(fh, {}, wanted === undefined ? undefined : (seq, hash) => {
          if (seq === wanted) hashAtCheckpoint = hash;
        });
      } catch (err) {
        throw unavailable(err);
      }
      if (!result.ok) throw new BrokerError('audit_chain_broken', `the audit log ${path} is ${describeBreak(result)}`);
      // The size the chain was read at; nothing else may write the file from now on.
      const st = await fh.stat();
      return new AuditLog(path, fh, st, { records: result.records, lastHash: result.lastHash, created, hashAtCheckpoint, lock, dsync }, options);
    } catch (err) {
      await fh.close().catch(() => {});
      lock?.release();
      throw err instanceof BrokerError ? err : unavailable(err);
    }
  }

  /** False once a write or fsync has failed or the file was removed or replaced (for good), or after close. */
  get healthy(): boolean {
    return this.#failure === undefined && !this.#closed;
  }

  /** True once close() was called. */
  get closed(): boolean {
    return this.#closed;
  }

  /**
   * The file's size in bytes as this log knows it (the size at open plus every completed write; no
   * system call), for a disk-use metric (`broker_audit_log_bytes`).
   */
  get sizeBytes(): number {
    return this.#sizeBytes;
  }

  /**
   * The last record known to be on stable storage in the file at the path (undefined for an empty
   * log): what the cluster checkpoint (head.ts) may record. Never ahead of the file.
   */
  get durableHead(): { seq: number; hash: string } | undefined {
    return this.#durable;
  }

  /** Whether `open` created the file (there was none at the path). */
  get created(): boolean {
    return this.#created;
  }

  /** The log's lock file (undefined when opened with `lock: false`), and the stale lock it took over, if any. */
  get lock(): Pick<AuditLock, 'path' | 'takenOver'> | undefined {
    return this.#lock;
  }

  /** The hash of record `options.checkpointSeq` as `open` found it, or undefined if the file has no such record. */
  get hashAtCheckpoint(): string | undefined {
    return this.#hashAtCheckpoint;
  }

  /** Hash of the last record appended (GENESIS_HASH for an empty log): a checkpoint for `verify --expect-last`. */
  get lastHash(): string {
    return this.#lastHash;
  }

  /** The seq the next record will get (= records in the file). */
  get nextSeq(): number {
    return this.#nextSeq;
  }

  get stats(): Readonly<AuditLogStats> {
    return { ...this.#stats };
  }

  /**
   * Appends one record and resolves with it once it is on stable storage. Token-looking runs in string
   * values are written as `[redacted]`. Rejects with audit_unavailable if the log has failed, was
   * removed or replaced, or is closed, and with internal if the event is malformed or has a
   * secret-named details key (nothing is written then, and no seq is used).
   */
  async append(event: AuditEventInput): Promise<AuditRecord> {
    if (this.#failure) throw this.#failure;
    if (this.#closed) throw new BrokerError('audit_unavailable', `the audit log ${this.path} is closed`);
    const clean = checkEvent(event);
    const record: Record<string, unknown> = { seq: this.#nextSeq, time: this.#now().toISOString(), type: clean.type, actor: clean.actor };
    for (const k of OPTIONAL_STRING_FIELDS) if (clean[k] !== undefined) record[k] = clean[k];
    if (this.#lockNote) {
      // The first record of a writer that took over a stale lock says so (src/audit/lock.ts).
      clean.details = { ...clean.details, staleLockTakenOver: this.#lockNote };
      this.#lockNote = undefined;
    }
    if (clean.details !== undefined) record['details'] = clean.details;
    record['prev'] = this.#lastHash;
    const canonical = canonicalRecordJson(record);
    const hash = sha256Hex(canonical);
    record['hash'] = hash;
    this.#nextSeq++;
    this.#lastHash = hash;
    const done = Object.freeze(record) as unknown as AuditRecord;
    return new Promise<AuditRecord>((resolve, reject) => {
      this.#queue.push({ line: recordLine(canonical, hash) + '\n', record: done, resolve, reject });
      this.#schedule();
    });
  }

  /** Waits for pending appends to be durable (or fail), then closes the file and releases its lock. Idempotent. */
  close(): Promise<void> {
    this.#closing ??= this.#close();
    return this.#closing;
  }

  /**
   * Closes the log, and removes the file when this open created it and nothing was appended (a
   * start that failed leaves no empty log behind); a file that existed, or holds a record, is kept.
   */
  discard(): Promise<void> {
    if (this.#created && this.#nextSeq === 0) this.#discard = true;
    return this.close();
  }

  async #close(): Promise<void> {
    this.#closed = true;
    if (this.#checkTimer) clearInterval(this.#checkTimer);
    this.#checkTimer = undefined;
    while (this.#timer || this.#flushing || (this.#queue.length > 0 && !this.#failure)) {
      if (this.#timer && !this.#flushing) {
        this.#timer.cancel();
        this.#timer = undefined;
        await this.#run();
      } else {
        await new Promise<void>((resolve) => this.#idle.push(resolve));
      }
    }
    try {
      // Only the very file this open created (same inode, still empty), removed while still locked.
      const remove = this.#discard && this.#nextSeq === 0 && this.#fileProblem(true) === undefined;
      await this.#fh.close();
      if (remove) unlinkSync(this.#absPath);
    } finally {
      this.#lock?.release();
    }
  }

  #schedule(): void {
    if (this.#flushing || this.#timer) return;
    const run = () => {
      this.#timer = undefined;
      void this.#run();
    };
    if (this.#flushIntervalMs > 0) {
      const t = setTimeout(run, this.#flushIntervalMs);
      this.#timer = { cancel: () => clearTimeout(t) };
    } else {
      const t = setImmediate(run);
      this.#timer = { cancel: () => clearImmediate(t) };
    }
  }

  async #run(): Promise<void> {
    this.#flushing = true;
    try {
      while (this.#queue.length > 0 && !this.#failure) {
        const batch = this.#queue.splice(0, this.#queue.length);
        const data = Buffer.from(batch.map((p) => p.line).join(''), 'utf8');
        this.#inflightBytes = data.length;
        try {
          await writeAll(this.#fh, data);
          if (!this.#dsync) await this.#fh.datasync();
        } catch (err) {
          this.#fail(err, batch);
          return;
        } finally {
          this.#inflightBytes = 0;
        }
        this.#sizeBytes += data.length;
        this.#stats.flushes++;
        this.#stats.bytes += data.length;
        // Acknowledge only records that are in the file at the path: not in a removed or replaced one.
        const problem = this.#failure ? undefined : this.#fileProblem(true);
        if (problem) this.#failGone(problem);
        if (this.#failure) {
          for (const p of batch) p.reject(this.#failure);
          return;
        }
        this.#stats.records += batch.length;
        const last = batch.at(-1)!.record;
        this.#durable = { seq: last.seq, hash: last.hash };
        for (const p of batch) p.resolve(p.record);
      }
    } finally {
      this.#flushing = false;
      for (const wake of this.#idle.splice(0)) wake();
    }
  }

  #fail(err: unknown, batch: Pending[]): void {
    this.#failure = new BrokerError('audit_unavailable', `the audit log ${this.path} cannot be written: ${errText(err)}`, { cause: err });
    for (const p of [...batch, ...this.#queue.splice(0)]) p.reject(this.#failure);
  }

  /** The file was removed, replaced or changed behind the log's back: unhealthy for good. */
  #failGone(problem: string): void {
    if (this.#failure) return;
    this.#failure = new BrokerError('audit_unavailable', `the audit log ${this.path} ${problem}; the broker records (and mints) nothing more until it is restarted`);
    for (const p of this.#queue.splice(0)) p.reject(this.#failure);
  }

  /** The periodic check (an unref'd timer): one at a time, none once failed or closed. */
  async #checkNow(): Promise<void> {
    if (this.#checking || this.#failure || this.#closed) return;
    this.#checking = true;
    try {
      const problem = await this.#fileProblem(false);
      if (problem && !this.#closed) this.#failGone(problem);
    } finally {
      this.#checking = false;
    }
  }

  /**
   * Whether the file at the path is still the one this log writes, whole: same device and inode, still
   * linked, and exactly the bytes this log accounts for (a write in flight may have landed in part).
   * Undefined when all holds; otherwise what is wrong. Two system calls: on the timer through the
   * thread pool; after a write (`sync`) directly, about 4 µs together on ext4 against a few hundred
   * for the fdatasync, where two thread-pool round trips would add to every batch's latency.
   */
  #fileProblem(sync: true): string | undefined;
  #fileProblem(sync: false): Promise<string | undefined>;
  #fileProblem(sync: boolean): string | undefined | Promise<string | undefined> {
    const low = this.#sizeBytes;
    if (!sync) {
      return Promise.allSettled([fsStat(this.#absPath), this.#fh.stat()]).then(([atPath, own]) => this.#judge(low, atPath, own));
    }
    const settle = <T>(f: () => T): PromiseSettledResult<T> => {
      try {
        return { status: 'fulfilled', value: f() };
      } catch (reason) {
        return { status: 'rejected', reason };
      }
    };
    return this.#judge(low, settle(() => statSync(this.#absPath)), settle(() => fstatSync(this.#fh.fd)));
  }

  #judge(low: number, atPath: PromiseSettledResult<Stats>, own: PromiseSettledResult<Stats>): string | undefined {
    if (own.status === 'rejected') return `was removed or replaced: the open file cannot be checked (${errText(own.reason)})`;
    const linked = own.value.nlink > 0;
    if (atPath.status === 'rejected') {
      const code = errCode(atPath.reason);
      if (code === 'ENOENT' || code === 'ENOTDIR') return `was removed or replaced: there is no file at ${this.#absPath} any more${linked ? '' : ' (the open file was deleted)'}`;
      return `was removed or replaced: ${this.#absPath} cannot be checked (${errText(atPath.reason)})`;
    }
    if (atPath.value.dev !== this.#dev || atPath.value.ino !== this.#ino) {
      return `was removed or replaced: ${this.#absPath} is now another file (inode ${atPath.value.ino}, not ${this.#ino})${linked ? '' : ' and the open file was deleted'}`;
    }
    if (!linked) return 'was removed or replaced: the open file has no links left';
    const high = this.#sizeBytes + this.#inflightBytes;
    const size = own.value.size;
    if (size < low || size > high) {
      return `was changed outside the broker: it holds ${size} bytes where ${low === high ? low : `${low} to ${high}`} were written (cut, truncated, or written by another process)`;
    }
    return undefined;
  }
}

async function writeAll(fh: FileHandle, data: Buffer): Promise<void> {
  let offset = 0;
  while (offset < data.length) {
    const { bytesWritten } = await fh.write(data, offset, data.length - offset);
    if (bytesWritten <= 0) throw new Error('write made no progress');
    offset += bytesWritten;
  }
}

/** fsync a new file's directory so its entry survives a crash too. */
async function syncDirectory(dir: string): Promise<void> {
  const fh = await fsOpen(dir, 'r');
  try {
    await fh.sync();
  } catch (err) {
    // Some filesystems cannot fsync a directory; the file's own fdatasync still holds.
    if (errCode(err) !== 'EINVAL' && errCode(err) !== 'ENOTSUP') throw err;
  } finally {
    await fh.close();
  }
}

/**
 * Refuses malformed events and, as a guard against programming mistakes, details keys named like
 * secrets; the message names the field, never the value. Returns the event to record: a copy whose
 * string values (and details keys) have every token-looking run replaced by `[redacted]`, so that a
 * decision is never lost because someone pasted a token into a reason or a name. The PostgreSQL store
 * (postgres.ts) checks with it too.
 */
export function checkEvent(event: AuditEventInput): AuditEventInput {
  const refuse = (what: string) => new BrokerError('internal', `audit event refused: ${what}`);
  if (event === null || typeof event !== 'object') throw refuse('not an object');
  for (const key of Object.keys(event)) {
    if (!EVENT_KEYS.has(key) && (event as unknown as Record<string, unknown>)[key] !== undefined) throw refuse(`unknown field ${key}`);
  }
  if (typeof event.type !== 'string' || event.type === '') throw refuse('type must be a non-empty string');
  if (typeof event.actor !== 'string' || event.actor === '') throw refuse('actor must be a non-empty string');
  // The type is the broker's own constant: a token there is a bug, not input.
  if (redactTokens(event.type) !== event.type) throw refuse('type looks like a token');
  const clean: AuditEventInput = { type: event.type, actor: redactTokens(event.actor) };
  for (const k of OPTIONAL_STRING_FIELDS) {
    const v = event[k];
    if (v === undefined) continue;
    if (typeof v !== 'string') throw refuse(`${k} must be a string`);
    (clean as unknown as Record<string, string>)[k] = redactTokens(v);
  }
  if (event.outcome !== undefined && !AUDIT_OUTCOMES.includes(event.outcome)) throw refuse(`outcome must be one of ${AUDIT_OUTCOMES.join(', ')}`);
  if (event.details !== undefined) {
    if (!isPlainObject(event.details)) throw refuse('details must be a plain JSON object');
    const details = cleanJson(event.details, 'details', 0) as { [key: string]: JsonValue };
    if (Buffer.byteLength(JSON.stringify(details)) > MAX_DETAILS_BYTES) throw refuse(`details is larger than ${MAX_DETAILS_BYTES} bytes`);
    clean.details = details;
  }
  return clean;
}

/** A checked, redacted deep copy of a details value. */
function cleanJson(value: unknown, path: string, depth: number): JsonValue {
  const refuse = (what: string) => new BrokerError('internal', `audit event refused: ${path} ${what}`);
  if (depth > MAX_DETAILS_DEPTH) throw refuse(`is nested deeper than ${MAX_DETAILS_DEPTH}`);
  if (value === null || typeof value === 'boolean') return value;
  if (typeof value === 'string') return redactTokens(value);
  if (typeof value === 'number') {
    if (!Number.isFinite(value)) throw refuse('is not a finite number');
    return value;
  }
  if (Array.isArray(value)) return value.map((v, i) => cleanJson(v, `${path}[${i}]`, depth + 1));
  if (!isPlainObject(value)) throw refuse('is not a JSON value');
  const out: { [key: string]: JsonValue } = {};
  for (const [k, v] of Object.entries(value)) {
    if (isSecretKey(k)) throw new BrokerError('internal', `audit event refused: ${path}.${k} is named like a secret`);
    if (v === undefined) continue; // as JSON.stringify does
    const redacted = redactTokens(k);
    let key = redacted;
    for (let i = 2; Object.hasOwn(out, key); i++) key = `${redacted}#${i}`;
    out[key] = cleanJson(v, `${path}.${key}`, depth + 1);
  }
  return out;
}

/**
 * `value` with every JWT-looking run (three or five base64url segments, the first starting with
 * `eyJ`) replaced by `[redacted]`, and every `Bearer <16+ token characters>` by `Bearer [redacted]`.
 * The same string when there is none (the common case costs two regex tests).
 */
export function redactTokens(value: string): string {
  // Every string of every record passes here: one scan rules out the common case (no `eyJ`, no `bearer`).
  if (value.length < MIN_TOKEN_RUN || !MAY_HOLD_TOKEN.test(value)) return value;
  if (!JWT_LIKE.test(value) && !BEARER_LIKE.test(value)) return value;
  const out = value.replace(JWT_RUNS, REDACTED).replace(BEARER_RUNS, `$1${REDACTED}`);
  // The replacement cannot form a new match; should it ever, nothing of the value is kept.
  return JWT_LIKE.test(out) || BEARER_LIKE.test(out) ? REDACTED : out;
}

/** Whether a key name is one a secret would be stored under (exported for the tests and docs). */
export function isSecretKey(key: string): boolean {
  const k = key.toLowerCase().replaceAll(/[-_]/g, '');
  return SECRET_KEYS.has(k) || SECRET_KEY_SUFFIXES.some((s) => k.endsWith(s));
}

function isPlainObject(value: unknown): value is Record<string, unknown> {
  if (value === null || typeof value !== 'object') return false;
  const proto = Object.getPrototypeOf(value) as unknown;
  return proto === Object.prototype || proto === null;
}

export { GENESIS_HASH };
