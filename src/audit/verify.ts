/**
 * The audit chain rule, in one place: how a record is serialized for hashing, and how a file of
 * records is walked and checked. AuditLog (log.ts) writes with the same functions it verifies with.
 *
 * Canonical JSON of a record (the text that is hashed): the record without `hash`, serialized with no
 * whitespace by JSON.stringify rules, top-level keys in RECORD_FIELD_ORDER (absent optional fields
 * left out), then any unlisted keys in UTF-16 code-unit order, then `prev`; nested object keys in
 * code-unit order, arrays in their order. The line on disk is that text with `,"hash":"<hex>"`
 * inserted before the closing brace, then "\n" — so `hash` is SHA-256 over the line minus its hash
 * member. docs/audit.md gives a shell recipe.
 */
import { hash } from 'node:crypto';
import { open, type FileHandle } from 'node:fs/promises';
import { BrokerError } from '../errors.ts';
import {
  AUDIT_OUTCOMES,
  GENESIS_HASH,
  OPTIONAL_STRING_FIELDS,
  RECORD_FIELD_ORDER,
  type VerifyResult,
} from './types.ts';

export type { VerifyResult } from './types.ts';

export interface VerifyOptions {
  /**
   * The hash the last record must have (kept outside the log, e.g. from an earlier `verify`). The
   * chain alone cannot show that records were cut from the end; this can.
   */
  expectLast?: string | undefined;
}

/** A line longer than this is not a record (records are a few hundred bytes, details at most 8 KiB). */
const MAX_LINE_BYTES = 1 << 20;
const HEX64 = /^[0-9a-f]{64}$/;

/** Canonical JSON of a record without its `hash` member: the text `hash` is computed over. */
export function canonicalRecordJson(value: object): string {
  // Hot path (every audit append): one pass over the listed fields, no intermediate arrays.
  const record = value as Readonly<Record<string, unknown>>;
  let out = '{';
  for (const k of RECORD_FIELD_ORDER) {
    const v = record[k];
    if (v !== undefined) out += (out.length > 1 ? ',' : '') + QUOTED_FIELD[k] + ':' + canonicalValue(v);
  }
  let extra: string[] | undefined;
  for (const k of Object.keys(record)) {
    if (!LISTED_FIELDS.has(k) && k !== 'prev' && k !== 'hash' && record[k] !== undefined) (extra ??= []).push(k);
  }
  if (extra) for (const k of extra.sort()) out += (out.length > 1 ? ',' : '') + JSON.stringify(k) + ':' + canonicalValue(record[k]);
  return out + (out.length > 1 ? ',' : '') + '"prev":' + canonicalValue(record['prev']) + '}';
}

const LISTED_FIELDS: ReadonlySet<string> = new Set(RECORD_FIELD_ORDER);
const QUOTED_FIELD = Object.fromEntries(RECORD_FIELD_ORDER.map((k) => [k, JSON.stringify(k)])) as Record<(typeof RECORD_FIELD_ORDER)[number], string>;

function canonicalValue(value: unknown): string {
  if (value === null || typeof value !== 'object') {
    const text = JSON.stringify(value) as string | undefined;
    if (text === undefined) throw new TypeError(`not a JSON value: ${typeof value}`);
    return text;
  }
  if (Array.isArray(value)) return '[' + value.map((v) => canonicalValue(v ?? null)).join(',') + ']';
  const obj = value as Record<string, unknown>;
  const keys = Object.keys(obj)
    .filter((k) => obj[k] !== undefined)
    .sort();
  return '{' + keys.map((k) => JSON.stringify(k) + ':' + canonicalValue(obj[k])).join(',') + '}';
}

export function sha256Hex(text: string): string {
  return hash('sha256', text, 'hex'); // one-shot: cheaper than createHash for a record-sized text
}

/** The line as written (without its "\n") for a record whose canonical JSON and hash are given. */
export function recordLine(canonical: string, hash: string): string {
  return `${canonical.slice(0, -1)},"hash":"${hash}"}`;
}

/**
 * Walks a chain one line at a time and remembers the first break. Used by verifyAuditText,
 * verifyAuditFile and AuditLog.open.
 */
export class ChainVerifier {
  #records = 0;
  #lastHash = GENESIS_HASH;
  #line = 0;
  #failure: Extract<VerifyResult, { ok: false }> | undefined;
  readonly #onRecord: ((seq: number, hash: string) => void) | undefined;

  /** `onRecord` is called for every record that holds, in order (AuditLog.open looks up its checkpoint with it). */
  constructor(onRecord?: (seq: number, hash: string) => void) {
    this.#onRecord = onRecord;
  }

  get broken(): boolean {
    return this.#failure !== undefined;
  }

  /** One line, without its terminating "\n". Does nothing once the chain is broken. */
  push(line: string): void {
    if (this.#failure) return;
    this.#line++;
    const expectedSeq = this.#records;
    if (line === '') return this.#fail('empty line');
    let parsed: unknown;
    try {
      parsed = JSON.parse(line);
    } catch {
      return this.#fail('not valid JSON (a garbled or cut line)');
    }
    if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) return this.#fail('not a JSON object');
    const rec = parsed as Record<string, unknown>;
    const seq = Number.isSafeInteger(rec['seq']) && (rec['seq'] as number) >= 0 ? (rec['seq'] as number) : undefined;
    const bad = shapeProblem(rec);
    if (bad) return this.#fail(bad, seq);
    const canonical = canonicalRecordJson(rec);
    const hash = sha256Hex(canonical);
    if (hash !== rec['hash']) return this.#fail('hash does not match the record\'s contents (the record was altered)', seq);
    if (recordLine(canonical, hash) !== line) return this.#fail('the line is not in canonical form (it was rewritten)', seq);
    if (seq !== expectedSeq) {
      return this.#fail(`seq ${seq} where ${expectedSeq} was expected (a record was removed, inserted or moved)`, seq);
    }
    if (rec['prev'] !== this.#lastHash) {
      return this.#fail(
        expectedSeq === 0
          ? 'prev of the first record is not 64 zeros (records before it were removed)'
          : 'prev does not match the hash of the previous record (the previous record was altered, removed or moved)',
        seq,
      );
    }
    this.#records++;
    this.#lastHash = hash;
    this.#onRecord?.(expectedSeq, hash);
  }

  /** A line that could not even be read as text. */
  pushUnreadable(reason: string): void {
    if (this.#failure) return;
    this.#line++;
    this.#fail(reason);
  }

  /**
   * The result. `incompleteTail`: bytes after the last "\n", if any (a broker-written file always
   * ends with "\n", so these are a torn write or a cut file).
   */
  finish(incompleteTail: boolean, options: VerifyOptions = {}): VerifyResult {
    if (!this.#failure && incompleteTail) {
      this.#line++;
      this.#fail('the last line is incomplete (no trailing newline): a torn write or a cut file');
    }
    if (this.#failure) return this.#failure;
    if (options.expectLast !== undefined && options.expectLast !== this.#lastHash) {
      return {
        ok: false,
        records: this.#records,
        line: Math.max(this.#records, 1),
        ...(this.#records > 0 ? { seq: this.#records - 1 } : {}),
        reason: `the last record's hash ${this.#lastHash} is not the expected ${options.expectLast} (records were cut from the end, or added)`,
      };
    }
    return { ok: true, records: this.#records, lastHash: this.#lastHash };
  }

  #fail(reason: string, seq?: number): void {
    this.#failure = { ok: false, records: this.#records, line: this.#line, ...(seq === undefined ? {} : { seq }), reason };
  }
}

function shapeProblem(rec: Record<string, unknown>): string | undefined {
  const { seq, time, type, actor, prev, hash, outcome, details } = rec;
  if (!Number.isSafeInteger(seq) || (seq as number) < 0) return 'field seq is missing or not a non-negative integer';
  if (typeof time !== 'string' || Number.isNaN(Date.parse(time))) return 'field time is missing or not a timestamp';
  if (typeof type !== 'string' || type === '') return 'field type is missing or empty';
  if (typeof actor !== 'string' || actor === '') return 'field actor is missing or empty';
  if (typeof prev !== 'string' || !HEX64.test(prev)) return 'field prev is missing or not 64 hex digits';
  if (typeof hash !== 'string' || !HEX64.test(hash)) return 'field hash is missing or not 64 hex digits';
  for (const k of OPTIONAL_STRING_FIELDS) {
    if (rec[k] !== undefined && typeof rec[k] !== 'string') return `field ${k} is not a string`;
  }
  if (outcome !== undefined && !(AUDIT_OUTCOMES as readonly unknown[]).includes(outcome)) return `field outcome is not one of ${AUDIT_OUTCOMES.join(', ')}`;
  if (details !== undefined && (details === null || typeof details !== 'object' || Array.isArray(details))) return 'field details is not an object';
  return undefined;
}

/** Verify the chain in a string holding a whole audit file. */
export function verifyAuditText(text: string, options: VerifyOptions = {}): VerifyResult {
  const v = new ChainVerifier();
  const lines = text.split('\n');
  const tail = lines.pop() ?? '';
  for (const line of lines) {
    v.push(line);
    if (v.broken) break;
  }
  return v.finish(tail !== '', options);
}

/** Verify the chain of an audit file, streaming it (the file may be large). */
export async function verifyAuditFile(path: string, options: VerifyOptions = {}): Promise<VerifyResult> {
  const fh = await open(path, 'r');
  try {
    return await verifyHandle(fh, options);
  } finally {
    await fh.close();
  }
}

/**
 * @internal Verify from an open handle, reading from offset 0 (AuditLog.open uses the handle it appends
 * to). `onRecord` sees each record that holds.
 */
export async function verifyHandle(
  fh: Pick<FileHandle, 'read'>,
  options: VerifyOptions = {},
  onRecord?: (seq: number, hash: string) => void,
): Promise<VerifyResult> {
  const v = new ChainVerifier(onRecord);
  const scan = await scanChain(fh, v);
  return v.finish(!v.broken && scan.tailBytes > 0, options);
}

/** Where a scan of a chain stopped (scanChain): byte offsets in the file. */
export interface ChainScan {
  /** Just past the "\n" of the last line that holds: the end of the last good record (0 for none). */
  end: number;
  /**
   * The line that broke the chain, if any: where it starts (= `end`) and where its "\n" is
   * (`newline`; undefined when it was cut off as longer than 1 MiB before a newline was seen).
   */
  broken?: { start: number; newline: number | undefined };
  /** Bytes after the last "\n" when the chain held (an incomplete last line), starting at `end`. */
  tailBytes: number;
}

/**
 * @internal Feeds every complete line of the file (up to `limit` bytes, default all of it) to `v`,
 * stopping at the first line that breaks the chain, and says where it stopped. A line longer than
 * MAX_LINE_BYTES is a break. verifyHandle, verifyLiveFile and repair-tail (repair.ts) read with it.
 */
export async function scanChain(fh: Pick<FileHandle, 'read'>, v: ChainVerifier, limit = Number.POSITIVE_INFINITY): Promise<ChainScan> {
  const decoder = new TextDecoder('utf-8', { fatal: true });
  const buf = Buffer.allocUnsafe(1 << 20);
  let carry: Buffer[] = [];
  let carryBytes = 0;
  /** Offset of the line being assembled (= end of the last line pushed). */
  let lineStart = 0;
  let position = 0;
  const pushLine = (bytes: Uint8Array) => {
    let text: string;
    try {
      text = decoder.decode(bytes);
    } catch {
      v.pushUnreadable('not valid UTF-8 (a garbled line)');
      return;
    }
    v.push(text);
  };
  while (position < limit) {
    const { bytesRead } = await fh.read(buf, 0, Math.min(buf.length, limit - position), position);
    if (bytesRead === 0) break;
    const base = position;
    position += bytesRead;
    const chunk = buf.subarray(0, bytesRead);
    let start = 0;
    for (;;) {
      const nl = chunk.indexOf(0x0a, start);
      if (nl === -1) {
        if (start < bytesRead) {
          carry.push(Buffer.from(chunk.subarray(start)));
          carryBytes += bytesRead - start;
        }
        break;
      }
      pushLine(carry.length > 0 ? Buffer.concat([...carry, chunk.subarray(start, nl)]) : chunk.subarray(start, nl));
      carry = [];
      carryBytes = 0;
      if (v.broken) return { end: lineStart, broken: { start: lineStart, newline: base + nl }, tailBytes: 0 };
      lineStart = base + nl + 1;
      start = nl + 1;
    }
    if (carryBytes > MAX_LINE_BYTES) {
      v.pushUnreadable(`longer than ${MAX_LINE_BYTES} bytes without a newline: not a record`);
      return { end: lineStart, broken: { start: lineStart, newline: undefined }, tailBytes: 0 };
    }
  }
  return { end: lineStart, tailBytes: carryBytes };
}

export interface LiveVerifyOptions extends VerifyOptions {
  /**
   * A hash some record must have, anywhere in the chain (kept elsewhere, e.g. from an earlier
   * verify): shows that nothing up to that record was cut or changed, however far the log has grown.
   */
  expect?: string | undefined;
  /** An incomplete last line is a break at once, without waiting to see whether it is being written. */
  strict?: boolean | undefined;
  /** How long an incomplete last line may take to get its newline before it counts as torn (default 1000 ms). */
  settleMs?: number | undefined;
}

/** verifyLiveFile's result: VerifyResult, plus what it found of `expect` and at the end of the file. */
export type LiveVerifyResult = VerifyResult & {
  /** The record with the `expect` hash, when the chain holds up to it. */
  expected?: { hash: string; seq: number; line: number };
  /** An incomplete last line that got its newline while verify watched: a record being appended, not checked. */
  inProgress?: { line: number; bytes: number };
  /**
   * When not ok, a failure of its own kind: `torn-tail` (an incomplete last line that stayed so),
   * `expect-not-found` (the chain holds but has no record with the `expect` hash), `in-progress-after-last`
   * (`expectLast` on a log being appended to). Absent for the other breaks of the chain.
   */
  problem?: 'torn-tail' | 'expect-not-found' | 'in-progress-after-last';
};

/**
 * Verifies a log that may be in use: the file as it was when opened (its size then), up to its last
 * complete line. A last line without its newline is either a record being appended (a writer's one
 * write(2) per batch is under way) or a torn write that nothing will finish. It is told apart by
 * waiting: if the newline arrives within `settleMs`, the line is in progress (reported in
 * `inProgress`, not checked, not a break; with `expectLast` it is a record after the last one, so it
 * is); if not, it is torn and breaks the chain as in verifyAuditFile. `strict` does not wait.
 */
export async function verifyLiveFile(path: string, options: LiveVerifyOptions = {}): Promise<LiveVerifyResult> {
  const fh = await open(path, 'r');
  try {
    const size = (await fh.stat()).size;
    let expected: LiveVerifyResult['expected'];
    const v = new ChainVerifier((seq, hash) => {
      if (expected === undefined && hash === options.expect) expected = { hash, seq, line: seq + 1 };
    });
    const scan = await scanChain(fh, v, size);
    let inProgress: LiveVerifyResult['inProgress'];
    let records = 0;
    if (!v.broken && scan.tailBytes > 0) {
      records = v.finish(false).records;
      if (!options.strict && (await newlineArrives(fh, size, options.settleMs ?? 1000))) inProgress = { line: records + 1, bytes: scan.tailBytes };
    }
    const torn = !v.broken && scan.tailBytes > 0 && inProgress === undefined;
    const result = v.finish(torn, { expectLast: options.expectLast });
    const extra = { ...(expected ? { expected } : {}), ...(inProgress ? { inProgress } : {}) };
    if (!result.ok) return { ...result, ...extra, ...(torn ? { problem: 'torn-tail' as const } : {}) };
    if (inProgress && options.expectLast !== undefined) {
      return {
        ok: false,
        records,
        line: inProgress.line,
        reason: `a record is being appended after the last one (line ${inProgress.line}): the log is in use, so its last record is not final; compare with --expect (any record) instead`,
        ...extra,
        problem: 'in-progress-after-last',
      };
    }
    if (options.expect !== undefined && !expected) {
      return {
        ok: false,
        records: result.records,
        line: Math.max(result.records, 1),
        ...(result.records > 0 ? { seq: result.records - 1 } : {}),
        reason: `no record has hash ${options.expect} (${result.records} records hold, the last with hash ${result.lastHash}): records up to it were cut or changed and the rest rewritten, or it is from another log`,
        ...extra,
        problem: 'expect-not-found',
      };
    }
    return { ...result, ...extra };
  } finally {
    await fh.close();
  }
}

/** Whether a "\n" appears at or after `from` within `ms` (the file growing as a writer finishes its line). */
async function newlineArrives(fh: Pick<FileHandle, 'read'>, from: number, ms: number): Promise<boolean> {
  const deadline = Date.now() + ms;
  const buf = Buffer.allocUnsafe(64 * 1024);
  let position = from;
  for (;;) {
    const { bytesRead } = await fh.read(buf, 0, buf.length, position);
    if (bytesRead > 0 && buf.subarray(0, bytesRead).includes(0x0a)) return true;
    position += bytesRead;
    if (Date.now() >= deadline) return false;
    if (bytesRead === 0) await new Promise((done) => setTimeout(done, 20));
  }
}

/** A broken result as the one-line message `broker audit verify` prints. */
export function describeBreak(result: Extract<VerifyResult, { ok: false }>): string {
  const seq = result.seq === undefined ? '' : ` (seq ${result.seq})`;
  return `broken at line ${result.line}${seq}: ${result.reason}`;
}

/** Throws audit_chain_broken for a broken result. */
export function assertChainOk(result: VerifyResult, what: string): asserts result is Extract<VerifyResult, { ok: true }> {
  if (!result.ok) throw new BrokerError('audit_chain_broken', `${what}: ${describeBreak(result)}`);
}
