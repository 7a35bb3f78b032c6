/**
 * `broker audit repair-tail FILE`: removes a torn last line of an audit log, and records that it did.
 *
 * A failed write (disk full, an I/O error, power lost before the data reached the disk) can leave
 * part of a batch at the end of the file: a last line that is not a record. It was never
 * acknowledged (a record is acknowledged only after its whole line is written and fdatasync'd), so
 * nothing relied on it, but the broker refuses to open the log until it is gone. This removes it and
 * nothing else:
 *
 * - Repairable: the last line of the file, and only it, is not a complete record: it has no
 *   trailing newline, or it is not valid UTF-8 / JSON / a JSON object, or its `hash` is not the hash
 *   of its contents. Every line before it must hold as a chain.
 * - Refused (audit_chain_broken, naming the record, the file unchanged): a break anywhere before the
 *   last line, and a last line that is a whole record (its hash matches its contents) which does
 *   not fit the chain (a moved, inserted or re-serialized record, or the one after a removed record).
 * - Refused (audit_unavailable) while another writer holds the log (its lock, lock.ts), naming it,
 *   and when the last line is still growing (a writer appending without a lock).
 *
 * The repair: ftruncate to the end of the last good record, fsync; then one `audit.tail_repaired`
 * record (outcome ok), chained to that record as any other, written and fsync'd. Its details hold the
 * removed byte count and their SHA-256, never the bytes (they may hold anything), and the seq it
 * follows. The log's lock is held throughout, so no broker starts on the file half way. A crash
 * between the two steps leaves a whole log without the record of the repair.
 *
 * The cluster checkpoint (head.ts) names the last durable record; a torn line never was one, so after
 * a repair the checkpoint still matches and the broker starts. (A last line that was a durable record
 * and was then damaged is a removed record: the checkpoint, when it names it, makes the next start
 * refuse with audit_checkpoint_mismatch.)
 */
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { hostname, userInfo } from 'node:os';
import { BrokerError } from '../errors.ts';
import { acquireAuditLock, lockPathOf, parseHolder, pidAlive, staleness, type AuditLock } from './lock.ts';
import { redactTokens } from './log.ts';
import { GENESIS_HASH, type AuditRecord, type JsonValue } from './types.ts';
import { ChainVerifier, canonicalRecordJson, describeBreak, recordLine, scanChain, sha256Hex } from './verify.ts';

export const TAIL_REPAIRED = 'audit.tail_repaired';

export interface RepairOptions {
  /** Say what would be done; change nothing (not even the lock file). */
  dryRun?: boolean;
  /** How long an incomplete last line may take to get its newline before it counts as torn (default 1000 ms). */
  settleMs?: number;
  /** @internal For tests: the clock. */
  now?: () => Date;
}

/** What repair-tail found, and did. */
export interface RepairResult {
  path: string;
  dryRun: boolean;
  /** True when a line was removed and the repair recorded. */
  repaired: boolean;
  /** What is kept: the records that hold before the removed line (the whole log when nothing is to be removed). */
  kept: { records: number; lastHash: string; bytes: number };
  /** The torn last line, if there is one. */
  removed?: { line: number; bytes: number; sha256: string; reason: string };
  /** The `audit.tail_repaired` record appended (or, with dryRun, the seq it would get). */
  appended?: { seq: number; hash?: string };
  /** A stale lock (its writer gone) taken over to repair: as AuditLog records it (`staleLockTakenOver`). */
  lockTakenOver?: { [key: string]: JsonValue };
}

/** Removes a torn last line of the audit log at `path` and records the repair; see the module comment. */
export async function repairTail(path: string, options: RepairOptions = {}): Promise<RepairResult> {
  const dryRun = options.dryRun === true;
  let fh: FileHandle;
  try {
    fh = await open(path, dryRun ? 'r' : 'r+');
  } catch (err) {
    throw new BrokerError('invalid_argument', `cannot open ${path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`, { field: 'FILE', cause: err });
  }
  let lock: AuditLock | undefined;
  try {
    if (!(await fh.stat()).isFile()) throw new BrokerError('invalid_argument', `${path} is not a regular file`, { field: 'FILE' });
    if (dryRun) refuseIfHeld(path);
    else lock = await acquireAuditLock(path, { command: 'broker audit repair-tail' });

    const size = (await fh.stat()).size;
    let lastHash = GENESIS_HASH;
    const v = new ChainVerifier((_seq, hash) => (lastHash = hash));
    const scan = await scanChain(fh, v, size);
    const good = v.finish(false);
    const result: RepairResult = {
      path,
      dryRun,
      repaired: false,
      kept: { records: 0, lastHash: GENESIS_HASH, bytes: scan.end },
    };
    if (lock?.takenOver) {
      const h = lock.takenOver.holder;
      result.lockTakenOver = { lockFile: lock.path, reason: lock.takenOver.reason, ...(h ? { pid: h.pid, host: h.host, startedAt: h.startedAt, command: h.command } : {}) };
    }

    let line: number;
    let reason: string;
    if (good.ok) {
      result.kept = { records: good.records, lastHash: good.lastHash, bytes: scan.end };
      if (scan.tailBytes === 0) return result; // nothing to repair
      if (await newlineArrives(fh, size, options.settleMs ?? 1000)) {
        throw new BrokerError(
          'audit_unavailable',
          `the last line of ${path} is being written (it got its newline while repair-tail looked): a writer is appending without holding ${lockPathOf(path)}; stop it first`,
        );
      }
      line = good.records + 1;
      reason = 'incomplete: no trailing newline (a torn write)';
    } else {
      // The chain breaks at line `good.line`: repairable only when that is the file's last line and not a whole record.
      const broken = scan.broken!;
      const refuse = (why: string) =>
        new BrokerError('audit_chain_broken', `${path}: ${describeBreak(good)}; ${why}; nothing was changed (repair-tail removes only a torn last line)`);
      const last = broken.newline === undefined ? !(await hasNewline(fh, broken.start, size)) : broken.newline + 1 === size;
      if (!last) throw refuse(`line ${good.line} is not the last line of the file`);
      if (broken.newline !== undefined && isWholeRecord(await readRange(fh, broken.start, broken.newline))) {
        throw refuse(`line ${good.line} is the last line, but a whole record (its hash matches its contents) that does not fit the chain, not a torn write`);
      }
      result.kept = { records: good.records, lastHash, bytes: scan.end };
      line = good.line;
      reason = good.reason;
    }

    const start = result.kept.bytes;
    result.removed = { line, bytes: size - start, sha256: await sha256Range(fh, start, size), reason };
    result.appended = { seq: result.kept.records };
    if (dryRun) return result;

    // Nothing may have moved since the file was read (the lock keeps writers that take it away).
    if ((await fh.stat()).size !== size) {
      throw new BrokerError('audit_unavailable', `${path} changed while repair-tail read it (another writer without the lock?); nothing was changed`);
    }
    await fh.truncate(start);
    await fh.sync();

    const record = tailRepairedRecord(result, options.now?.() ?? new Date());
    const bytes = Buffer.from(recordLine(canonicalRecordJson(record), record.hash) + '\n', 'utf8');
    let offset = 0;
    while (offset < bytes.length) {
      const { bytesWritten } = await fh.write(bytes, offset, bytes.length - offset, start + offset);
      if (bytesWritten <= 0) throw new Error('write made no progress');
      offset += bytesWritten;
    }
    await fh.sync();
    result.appended = { seq: record.seq, hash: record.hash };
    result.repaired = true;
    return result;
  } finally {
    lock?.release();
    await fh.close();
  }
}

/** The `audit.tail_repaired` record for a planned repair, chained to the last kept record. */
function tailRepairedRecord(plan: RepairResult, now: Date): AuditRecord {
  const removed = plan.removed!;
  const details: { [key: string]: JsonValue } = {
    removedBytes: removed.bytes,
    removedSha256: removed.sha256,
    followsSeq: plan.kept.records > 0 ? plan.kept.records - 1 : null,
    line: removed.line,
    by: redactTokens(`${localUser()}@${hostname()}`),
  };
  if (plan.lockTakenOver) details['staleLockTakenOver'] = { ...plan.lockTakenOver };
  const record: Record<string, unknown> = {
    seq: plan.kept.records,
    time: now.toISOString(),
    type: TAIL_REPAIRED,
    actor: 'system:repair-tail',
    outcome: 'ok',
    reason: `removed a torn last line (line ${removed.line}, ${removed.bytes} bytes: ${removed.reason})`,
    details,
    prev: plan.kept.lastHash,
  };
  record['hash'] = sha256Hex(canonicalRecordJson(record));
  return record as unknown as AuditRecord;
}

/**
 * Whether a line is a whole record: a JSON object whose `hash` is the hash of its contents. A torn
 * write never is (it is a prefix of a line, or of a batch); a line that is one, yet breaks the chain,
 * was put there (moved, inserted, re-serialized) and is not repair-tail's to remove.
 */
function isWholeRecord(bytes: Buffer): boolean {
  let rec: unknown;
  try {
    rec = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(bytes));
  } catch {
    return false;
  }
  if (rec === null || typeof rec !== 'object' || Array.isArray(rec)) return false;
  const claimed = (rec as Record<string, unknown>)['hash'];
  if (typeof claimed !== 'string') return false;
  try {
    return sha256Hex(canonicalRecordJson(rec)) === claimed;
  } catch {
    return false;
  }
}

async function readRange(fh: FileHandle, from: number, to: number): Promise<Buffer> {
  const buf = Buffer.alloc(to - from);
  let got = 0;
  while (got < buf.length) {
    const { bytesRead } = await fh.read(buf, got, buf.length - got, from + got);
    if (bytesRead === 0) break;
    got += bytesRead;
  }
  return buf.subarray(0, got);
}

async function sha256Range(fh: FileHandle, from: number, to: number): Promise<string> {
  const h = createHash('sha256');
  const buf = Buffer.allocUnsafe(1 << 20);
  for (let pos = from; pos < to; ) {
    const { bytesRead } = await fh.read(buf, 0, Math.min(buf.length, to - pos), pos);
    if (bytesRead === 0) break;
    h.update(buf.subarray(0, bytesRead));
    pos += bytesRead;
  }
  return h.digest('hex');
}

async function hasNewline(fh: FileHandle, from: number, to: number): Promise<boolean> {
  const buf = Buffer.allocUnsafe(1 << 20);
  for (let pos = from; pos < to; ) {
    const { bytesRead } = await fh.read(buf, 0, Math.min(buf.length, to - pos), pos);
    if (bytesRead === 0) break;
    if (buf.subarray(0, bytesRead).includes(0x0a)) return true;
    pos += bytesRead;
  }
  return false;
}

/** Whether a "\n" appears at or after `from` within `ms`: the last line is being written. */
async function newlineArrives(fh: FileHandle, from: number, ms: number): Promise<boolean> {
  const deadline = Date.now() + ms;
  for (;;) {
    if (await hasNewline(fh, from, Number.MAX_SAFE_INTEGER)) return true;
    if (Date.now() >= deadline) return false;
    await new Promise((done) => setTimeout(done, 20));
  }
}

/**
 * --dry-run takes no lock (that would change the directory, and take over a stale one): it reads the
 * lock file and refuses as a real run would when a live writer holds it.
 */
function refuseIfHeld(path: string): void {
  const lockPath = lockPathOf(path);
  let text: string;
  try {
    text = readFileSync(lockPath, 'utf8');
  } catch {
    return; // no lock: nobody writes
  }
  const holder = parseHolder(text);
  if (!holder) return; // unreadable: a real run judges it (and may take it over)
  if (staleness(holder, hostname(), pidAlive) !== undefined) return;
  const on = holder.host === hostname() ? '' : ` on host ${holder.host}`;
  throw new BrokerError(
    'audit_unavailable',
    `the audit log ${path} is held by pid ${holder.pid} (${holder.command || 'a writer'}, started ${holder.startedAt}${on}, ${lockPath}): stop it first`,
  );
}

function localUser(): string {
  try {
    return userInfo().username;
  } catch {
    return `uid ${process.getuid?.() ?? '?'}`;
  }
}
