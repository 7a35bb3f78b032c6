/**
 * One writer per audit log. Two processes appending to one file would interleave two chains (two
 * records with the same `seq`), which no later start can open again. So whatever writes a log (a
 * broker, `broker policy apply --audit-log`) first holds its lock: a file `FILE.lock` next to the log,
 * created with O_EXCL (`wx`: exactly one process can create it), holding the writer's pid, host,
 * start time and command. It is removed when the writer closes the log, and on any process exit
 * that runs 'exit' handlers.
 *
 * A writer killed outright (SIGKILL, a crash of the machine) leaves its lock behind. A lock whose pid
 * is no longer alive on this host (`process.kill(pid, 0)` fails with ESRCH), or whose pid now belongs
 * to a process started at another time (a reused pid, seen in /proc/PID/stat), is stale: the next
 * writer takes it over and says so (AuditLock.takenOver), and the audit log records it in that
 * writer's first record. A lock held from another host cannot be checked from here and is never
 * taken over. Node has no flock(2), and native addons are not an option: a lock file with a liveness
 * check is the portable way.
 *
 * Taking over is race-free between two newcomers: the stale file is renamed aside (atomic; only one
 * rename moves it), read back and compared with what was judged stale; a fresh lock moved by mistake
 * is linked back, and the O_EXCL create decides who holds the log.
 */
import { randomBytes } from 'node:crypto';
import { closeSync, fsyncSync, linkSync, openSync, readFileSync, renameSync, unlinkSync, writeSync } from 'node:fs';
import { hostname } from 'node:os';
import { setTimeout as sleep } from 'node:timers/promises';
import { errCode, errText, BrokerError } from '../errors.ts';

/** What a lock file holds (one JSON line). */
export interface LockHolder {
  pid: number;
  host: string;
  /** When the holding process started (ISO 8601). */
  startedAt: string;
  /** What holds it: `broker serve`, `broker policy apply`, ... */
  command: string;
  /** The process's start time in clock ticks since boot (/proc/PID/stat field 22), to tell a reused pid; Linux only. */
  procStart?: string;
  /** Random, so a writer removes only its own lock. */
  nonce: string;
}

/** The audit log is held by another writer (code audit_unavailable: retrying once it has stopped may succeed). */
export class AuditLockedError extends BrokerError {
  override name = 'AuditLockedError';
  readonly lockPath: string;
  readonly holder: LockHolder | undefined;

  constructor(logPath: string, lockPath: string, holder: LockHolder | undefined, why: string) {
    super('audit_unavailable', `the audit log ${logPath} is ${why}`);
    this.lockPath = lockPath;
    this.holder = holder;
  }
}

export interface AuditLock {
  readonly path: string;
  readonly holder: LockHolder;
  /** The stale lock this writer took over, if any (its holder as found, undefined when the file was unreadable). */
  readonly takenOver: { holder: LockHolder | undefined; reason: string } | undefined;
  /** Removes the lock file if it is still this writer's. Synchronous (also runs on process exit); idempotent. */
  release(): void;
}

export interface LockOptions {
  /** Default `process.argv`-based: `broker <subcommand>`. */
  command?: string;
  /** @internal For tests: whether a pid is alive (default: process.kill(pid, 0)). */
  isAlive?: (pid: number) => boolean;
  /** @internal For tests: the host name (default os.hostname()). */
  host?: string;
}

export function lockPathOf(logPath: string): string {
  return `${logPath}.lock`;
}

const held = new Set<AuditLock>();
let exitHook = false;

/**
 * Takes the lock of `logPath` (the file `logPath.lock`), taking over a stale one. Rejects with
 * AuditLockedError when a live writer holds it (naming its pid, host, start time and command), and
 * with audit_unavailable when the lock file cannot be created (missing or unwritable directory).
 */
export async function acquireAuditLock(logPath: string, options: LockOptions = {}): Promise<AuditLock> {
  const lockPath = lockPathOf(logPath);
  const host = options.host ?? hostname();
  const isAlive = options.isAlive ?? pidAlive;
  const me: LockHolder = {
    pid: process.pid,
    host,
    startedAt: new Date(Date.now() - process.uptime() * 1000).toISOString(),
    command: options.command ?? defaultCommand(),
    ...(procStartOf('self') === undefined ? {} : { procStart: procStartOf('self')! }),
    nonce: randomBytes(8).toString('hex'),
  };
  let takenOver: AuditLock['takenOver'];
  for (let attempt = 0; attempt < 5; attempt++) {
    let fd: number;
    try {
      fd = openSync(lockPath, 'wx', 0o600);
    } catch (err) {
      if (errCode(err) !== 'EEXIST') throw cannotLock(logPath, lockPath, err);
      const seen = readLock(lockPath);
      if (seen === undefined) continue; // released meanwhile: try again
      let holder = seen.holder;
      if (!holder) {
        // Created but not written yet (a writer between its create and its write), or garbled: look again shortly.
        await sleep(100);
        const again = readLock(lockPath);
        if (again === undefined) continue;
        if (again.holder || again.text !== seen.text) continue;
        holder = undefined;
      }
      const stale = holder ? staleness(holder, host, isAlive) : 'its lock file holds no holder (a writer died while taking it)';
      if (!stale) throw new AuditLockedError(logPath, lockPath, holder, heldBy(holder!, lockPath, host));
      if (!moveAside(lockPath, seen.text)) continue; // someone else's lock by now: look again
      takenOver = { holder, reason: stale };
      continue;
    }
    try {
      const text = JSON.stringify(me) + '\n';
      writeSync(fd, text);
      fsyncSync(fd);
    } catch (err) {
      closeSync(fd);
      try {
        unlinkSync(lockPath);
      } catch {
        // nothing to remove
      }
      throw cannotLock(logPath, lockPath, err);
    }
    closeSync(fd);
    return register(lockPath, me, takenOver);
  }
  throw new AuditLockedError(logPath, lockPath, undefined, `being locked and unlocked by other writers as this one tries (${lockPath}); try again`);
}

function register(path: string, holder: LockHolder, takenOver: AuditLock['takenOver']): AuditLock {
  let released = false;
  const lock: AuditLock = {
    path,
    holder,
    takenOver,
    release() {
      if (released) return;
      released = true;
      held.delete(lock);
      // Only our own lock: a lock someone took over from us (after we were judged dead) is theirs.
      if (readLock(path)?.holder?.nonce === holder.nonce) {
        try {
          unlinkSync(path);
        } catch {
          // already gone
        }
      }
    },
  };
  held.add(lock);
  if (!exitHook) {
    exitHook = true;
    process.once('exit', () => {
      for (const l of [...held]) l.release();
    });
  }
  return lock;
}

/** Why a holder's lock is stale, or undefined when its holder may still be writing. */
export function staleness(holder: LockHolder, host: string, isAlive: (pid: number) => boolean): string | undefined {
  if (holder.host !== host) return undefined; // cannot be checked from here
  if (!isAlive(holder.pid)) return `pid ${holder.pid} is not running`;
  if (holder.procStart !== undefined && holder.pid !== process.pid) {
    const now = procStartOf(String(holder.pid));
    if (now !== undefined && now !== holder.procStart) return `pid ${holder.pid} now belongs to another process (started at another time)`;
  }
  return undefined;
}

function heldBy(holder: LockHolder, lockPath: string, host: string): string {
  const who = `pid ${holder.pid} (${holder.command}, started ${holder.startedAt}${holder.host === host ? '' : ` on host ${holder.host}`})`;
  if (holder.host !== host) {
    return `locked by ${who}, which cannot be checked from this host: if that process is gone, remove ${lockPath}`;
  }
  return `held by ${who}: one writer per log; stop it first, or use another log`;
}

/** The lock file's text and holder; undefined when there is no file. */
function readLock(path: string): { text: string; holder: LockHolder | undefined } | undefined {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (err) {
    if (errCode(err) === 'ENOENT') return undefined;
    return { text: '', holder: undefined };
  }
  return { text, holder: parseHolder(text) };
}

export function parseHolder(text: string): LockHolder | undefined {
  try {
    const v = JSON.parse(text) as Partial<LockHolder>;
    if (typeof v.pid !== 'number' || !Number.isInteger(v.pid) || v.pid <= 0) return undefined;
    return {
      pid: v.pid,
      host: typeof v.host === 'string' ? v.host : '',
      startedAt: typeof v.startedAt === 'string' ? v.startedAt : '',
      command: typeof v.command === 'string' ? v.command : '',
      ...(typeof v.procStart === 'string' ? { procStart: v.procStart } : {}),
      nonce: typeof v.nonce === 'string' ? v.nonce : '',
    };
  } catch {
    return undefined;
  }
}

/**
 * Moves the stale lock out of the way, if it is still the one judged stale (`text`). False when the
 * file at the path is another (a newcomer's fresh lock): it is put back (or was never moved).
 */
function moveAside(lockPath: string, text: string): boolean {
  const aside = `${lockPath}.stale-${process.pid}-${randomBytes(4).toString('hex')}`;
  try {
    renameSync(lockPath, aside);
  } catch (err) {
    if (errCode(err) === 'ENOENT') return false;
    throw err;
  }
  let moved = '';
  try {
    moved = readFileSync(aside, 'utf8');
  } catch {
    // read as different
  }
  if (moved !== text) {
    try {
      linkSync(aside, lockPath); // fails if yet another writer holds the path now: it wins
    } catch {
      // the path is taken
    }
  }
  try {
    unlinkSync(aside);
  } catch {
    // gone
  }
  return moved === text;
}

export function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return errCode(err) === 'EPERM'; // exists, owned by someone else
  }
}

/** Field 22 of /proc/PID/stat (start time in clock ticks since boot); undefined where there is no /proc. */
function procStartOf(pid: string): string | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // The command (field 2) is in parentheses and may hold spaces: count from the last ')'.
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19];
  } catch {
    return undefined;
  }
}

function defaultCommand(): string {
  const sub = process.argv.slice(2).find((a) => !a.startsWith('-'));
  return sub ? `broker ${sub}` : 'broker';
}

function cannotLock(logPath: string, lockPath: string, err: unknown): BrokerError {
  return new BrokerError('audit_unavailable', `the audit log ${logPath} cannot be locked for writing: creating ${lockPath}: ${errText(err)}`, { cause: err });
}
