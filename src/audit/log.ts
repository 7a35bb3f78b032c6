/**
 * The audit log (DESIGN.md section 7): an append-only JSON Lines file whose records are chained by
 * SHA-256 (`prev`/`hash`, rule in verify.ts and docs/audit.md).
 *
 * - Durable: `append` resolves only once its record has been written and fdatasync'd.
 * - Group commit: records appended while a write+fdatasync is in flight go out together in the next
 *   one, so many concurrent callers share each fsync; file order is seq order.
 * - Fail closed: the first failed write or fsync rejects every pending append with audit_unavailable
 *   and leaves the log unhealthy for good: every later append is refused the same way, and the
 *   broker, which mints only after its record is durable, mints nothing more.
 * - Never a secret: events carrying a JWT or bearer-looking value, or a secret-named key, are refused
 *   (BrokerError 'internal') before anything is hashed or written.
 */
import { dirname } from 'node:path';
import { open as fsOpen, type FileHandle } from 'node:fs/promises';
import { BrokerError } from '../errors.ts';
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

/** Largest `details` object accepted, serialized. */
export const MAX_DETAILS_BYTES = 8192;
const MAX_DETAILS_DEPTH = 8;
/** Three base64url segments, the first starting with `eyJ` (`{"`): a JWS/JWE compact token. */
const JWT_LIKE = /eyJ[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*/;
/** `Bearer` followed by a token-shaped run (an Authorization header pasted into a message). */
const BEARER_LIKE = /\bbearer\s+[A-Za-z0-9._~+/=-]{16,}/i;
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
  readonly #now: () => Date;

  private constructor(path: string, fh: FileHandle, records: number, lastHash: string, options: AuditLogOptions) {
    this.path = path;
    this.#fh = fh;
    this.#nextSeq = records;
    this.#lastHash = lastHash;
    this.#flushIntervalMs = Math.max(0, options.flushIntervalMs ?? 0);
    this.#now = options.now ?? (() => new Date());
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
    let fh: FileHandle;
    let created = true;
    try {
      try {
        fh = await openFile(path, 'ax+', 0o600);
      } catch (err) {
        if (errCode(err) !== 'EEXIST') throw err;
        created = false;
        fh = await openFile(path, 'a+', 0o600);
      }
    } catch (err) {
      throw unavailable(err);
    }
    try {
      if (!(await fh.stat()).isFile()) throw unavailable(new Error('not a regular file'));
      if (created) await syncDirectory(dirname(path));
      let result;
      try {
        result = await verifyHandle(fh);
      } catch (err) {
        throw unavailable(err);
      }
      if (!result.ok) throw new BrokerError('audit_chain_broken', `the audit log ${path} is ${describeBreak(result)}`);
      return new AuditLog(path, fh, result.records, result.lastHash, options);
    } catch (err) {
      await fh.close().catch(() => {});
      throw err instanceof BrokerError ? err : unavailable(err);
    }
  }

  /** False once a write or fsync has failed (for good), or after close. */
  get healthy(): boolean {
    return this.#failure === undefined && !this.#closed;
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
   * Appends one record and resolves with it once it is on stable storage. Rejects with
   * audit_unavailable if the log has failed or is closed, and with internal if the event is malformed
   * or carries something that looks like a secret (nothing is written then, and no seq is used).
   */
  async append(event: AuditEventInput): Promise<AuditRecord> {
    if (this.#failure) throw this.#failure;
    if (this.#closed) throw new BrokerError('audit_unavailable', `the audit log ${this.path} is closed`);
    checkEvent(event);
    const record: Record<string, unknown> = { seq: this.#nextSeq, time: this.#now().toISOString(), type: event.type, actor: event.actor };
    for (const k of OPTIONAL_STRING_FIELDS) if (event[k] !== undefined) record[k] = event[k];
    if (event.details !== undefined) record['details'] = JSON.parse(JSON.stringify(event.details)) as JsonValue;
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

  /** Waits for pending appends to be durable (or fail), then closes the file. Idempotent. */
  close(): Promise<void> {
    this.#closing ??= this.#close();
    return this.#closing;
  }

  async #close(): Promise<void> {
    this.#closed = true;
    while (this.#timer || this.#flushing || (this.#queue.length > 0 && !this.#failure)) {
      if (this.#timer && !this.#flushing) {
        this.#timer.cancel();
        this.#timer = undefined;
        await this.#run();
      } else {
        await new Promise<void>((resolve) => this.#idle.push(resolve));
      }
    }
    await this.#fh.close();
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
        try {
          await writeAll(this.#fh, data);
          await this.#fh.datasync();
        } catch (err) {
          this.#fail(err, batch);
          return;
        }
        this.#stats.flushes++;
        this.#stats.records += batch.length;
        this.#stats.bytes += data.length;
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
 * Refuses malformed events and, as a guard against programming mistakes, anything that looks like a
 * secret. The message names the field, never the value.
 */
function checkEvent(event: AuditEventInput): void {
  const refuse = (what: string) => new BrokerError('internal', `audit event refused: ${what}`);
  if (event === null || typeof event !== 'object') throw refuse('not an object');
  for (const key of Object.keys(event)) {
    if (!EVENT_KEYS.has(key) && (event as unknown as Record<string, unknown>)[key] !== undefined) throw refuse(`unknown field ${key}`);
  }
  if (typeof event.type !== 'string' || event.type === '') throw refuse('type must be a non-empty string');
  if (typeof event.actor !== 'string' || event.actor === '') throw refuse('actor must be a non-empty string');
  checkSecretFree(event.type, 'type');
  checkSecretFree(event.actor, 'actor');
  for (const k of OPTIONAL_STRING_FIELDS) {
    const v = event[k];
    if (v === undefined) continue;
    if (typeof v !== 'string') throw refuse(`${k} must be a string`);
    checkSecretFree(v, k);
  }
  if (event.outcome !== undefined && !AUDIT_OUTCOMES.includes(event.outcome)) throw refuse(`outcome must be one of ${AUDIT_OUTCOMES.join(', ')}`);
  if (event.details !== undefined) {
    if (!isPlainObject(event.details)) throw refuse('details must be a plain JSON object');
    checkJson(event.details, 'details', 0);
    if (Buffer.byteLength(JSON.stringify(event.details)) > MAX_DETAILS_BYTES) throw refuse(`details is larger than ${MAX_DETAILS_BYTES} bytes`);
  }
}

function checkJson(value: unknown, path: string, depth: number): void {
  const refuse = (what: string) => new BrokerError('internal', `audit event refused: ${path} ${what}`);
  if (depth > MAX_DETAILS_DEPTH) throw refuse(`is nested deeper than ${MAX_DETAILS_DEPTH}`);
  if (value === null || typeof value === 'boolean') return;
  if (typeof value === 'string') return checkSecretFree(value, path);
  if (typeof value === 'number') {
    if (!Number.isFinite(value)) throw refuse('is not a finite number');
    return;
  }
  if (Array.isArray(value)) {
    value.forEach((v, i) => checkJson(v, `${path}[${i}]`, depth + 1));
    return;
  }
  if (!isPlainObject(value)) throw refuse('is not a JSON value');
  for (const [k, v] of Object.entries(value)) {
    if (isSecretKey(k)) throw new BrokerError('internal', `audit event refused: ${path}.${k} is named like a secret`);
    checkJson(v, `${path}.${k}`, depth + 1);
  }
}

function checkSecretFree(value: string, path: string): void {
  if (JWT_LIKE.test(value) || BEARER_LIKE.test(value)) {
    throw new BrokerError('internal', `audit event refused: ${path} looks like a token (record its jti, never the token)`);
  }
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

function errCode(err: unknown): string | undefined {
  return typeof err === 'object' && err !== null && 'code' in err && typeof err.code === 'string' ? err.code : undefined;
}

function errText(err: unknown): string {
  const code = errCode(err);
  const msg = err instanceof Error ? err.message : String(err);
  return code && !msg.includes(code) ? `${code}: ${msg}` : msg;
}

export { GENESIS_HASH };
