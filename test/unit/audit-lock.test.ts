/**
 * One writer per audit log (src/audit/lock.ts and its hook in src/audit/log.ts): the lock file next to
 * the log, a second writer refused naming the holder, a stale lock taken over and recorded, and a
 * failed start's empty log removed.
 */
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { hostname, tmpdir } from 'node:os';
import { join } from 'node:path';
import { AuditLog } from '../../src/audit/log.ts';
import { acquireAuditLock, AuditLockedError, lockPathOf, parseHolder, staleness, type LockHolder } from '../../src/audit/lock.ts';
import { verifyAuditFile } from '../../src/audit/verify.ts';

const dir = mkdtempSync(join(tmpdir(), 'tb-lock-'));
after(() => rmSync(dir, { recursive: true, force: true }));
let n = 0;
const fresh = () => join(dir, `log-${++n}.jsonl`);

/** The pid of a process that has exited (and was reaped): nobody runs under it now. */
async function deadPid(): Promise<number> {
  const child = spawn(process.execPath, ['-e', '0'], { stdio: 'ignore' });
  await new Promise((done) => child.once('exit', done));
  return child.pid!;
}

function holder(fields: Partial<LockHolder>): string {
  return JSON.stringify({ pid: 1, host: hostname(), startedAt: '2025-01-01T00:00:00.000Z', command: 'broker serve', nonce: 'abc', ...fields }) + '\n';
}

const lockedBy = (pid: number) => (err: unknown) => {
  assert.ok(err instanceof AuditLockedError, String(err));
  assert.equal(err.code, 'audit_unavailable');
  assert.equal(err.holder?.pid, pid);
  assert.match(err.message, new RegExp(`held by pid ${pid} \\(`));
  return true;
};

describe('the audit log lock', () => {
  test('an open log holds FILE.lock (pid, host, command); a second writer is refused naming the pid; close releases it', async () => {
    const path = fresh();
    const log = await AuditLog.open(path, { lockCommand: 'broker serve' });
    const held = parseHolder(readFileSync(lockPathOf(path), 'utf8'))!;
    assert.equal(held.pid, process.pid);
    assert.equal(held.host, hostname());
    assert.equal(held.command, 'broker serve');
    await assert.rejects(AuditLog.open(path), lockedBy(process.pid));
    await log.append({ type: 'test.event', actor: 'system:test' });
    await log.close();
    assert.equal(existsSync(lockPathOf(path)), false, 'the lock is removed on close');
    const again = await AuditLog.open(path);
    assert.equal(again.nextSeq, 1);
    await again.close();
  });

  test('a writer in another process is refused while it runs, and its lock is taken over once it was killed (recorded in the first record)', async () => {
    const path = fresh();
    const logModule = new URL('../../src/audit/log.ts', import.meta.url).href;
    const script = `const { AuditLog } = await import(${JSON.stringify(logModule)});
      await AuditLog.open(process.argv[1], { lockCommand: 'broker serve' });
      console.log('open'); setInterval(() => {}, 1000);`;
    const child = spawn(process.execPath, ['--input-type=module', '-e', script, path], { stdio: ['ignore', 'pipe', 'inherit'] });
    await new Promise<void>((done) => child.stdout.on('data', (d: Buffer) => d.toString().includes('open') && done()));
    try {
      await assert.rejects(AuditLog.open(path), (err: unknown) => {
        lockedBy(child.pid!)(err);
        assert.match((err as Error).message, /broker serve, started \d{4}-/);
        assert.match((err as Error).message, /one writer per log; stop it first, or use another log/);
        return true;
      });
    } finally {
      child.kill('SIGKILL');
      await new Promise((done) => child.once('exit', done));
    }
    assert.ok(existsSync(lockPathOf(path)), 'SIGKILL leaves the lock behind');
    const log = await AuditLog.open(path);
    assert.equal(log.lock?.takenOver?.holder?.pid, child.pid);
    assert.equal(parseHolder(readFileSync(lockPathOf(path), 'utf8'))!.pid, process.pid, 'the lock is ours now');
    const first = await log.append({ type: 'broker.started', actor: 'system:broker', outcome: 'ok', details: { pid: process.pid } });
    const second = await log.append({ type: 'test.event', actor: 'system:test' });
    await log.close();
    const note = first.details!['staleLockTakenOver'] as Record<string, unknown>;
    assert.equal(note['pid'], child.pid);
    assert.equal(note['command'], 'broker serve');
    assert.equal(note['lockFile'], lockPathOf(path));
    assert.match(String(note['reason']), new RegExp(`pid ${child.pid} is not running`));
    assert.equal(first.details!['pid'], process.pid, 'the record keeps its own details');
    assert.equal(second.details, undefined, 'only the first record carries it');
    assert.equal((await verifyAuditFile(path)).ok, true);
  });

  test('a stale lock of a dead pid is taken over; an empty or garbled lock file too', async () => {
    for (const content of [async () => holder({ pid: await deadPid() }), async () => '', async () => '{"pid":']) {
      const path = fresh();
      writeFileSync(lockPathOf(path), await content());
      const lock = await acquireAuditLock(path);
      assert.ok(lock.takenOver, 'taken over');
      assert.equal(parseHolder(readFileSync(lockPathOf(path), 'utf8'))!.nonce, lock.holder.nonce);
      lock.release();
      assert.equal(existsSync(lockPathOf(path)), false);
    }
  });

  test('a lock from another host is never taken over: the message says how to clear it', async () => {
    const path = fresh();
    writeFileSync(lockPathOf(path), holder({ pid: await deadPid(), host: 'another-host' }));
    await assert.rejects(acquireAuditLock(path), (err: unknown) => {
      assert.ok(err instanceof AuditLockedError);
      assert.match(err.message, /on host another-host\), which cannot be checked from this host: if that process is gone, remove .*\.lock/);
      return true;
    });
  });

  test('staleness: alive and same start time is held; dead, or a reused pid (another start time), is stale', () => {
    const h = parseHolder(holder({ pid: 4242, procStart: '100' }))!;
    assert.equal(staleness(h, hostname(), () => false), 'pid 4242 is not running');
    assert.equal(staleness({ ...h, host: 'elsewhere' }, hostname(), () => false), undefined, 'another host: not judged');
    const self = parseHolder(holder({ pid: process.pid }))!;
    assert.equal(staleness(self, hostname(), () => true), undefined);
    if (existsSync('/proc/self/stat')) {
      // This process is alive, but not the one that started at tick 1.
      assert.match(staleness({ ...self, pid: process.ppid, procStart: '1' }, hostname(), () => true) ?? '', /now belongs to another process/);
    }
  });

  test('two newcomers on one stale lock: exactly one takes it', async () => {
    const path = fresh();
    writeFileSync(lockPathOf(path), holder({ pid: await deadPid() }));
    const results = await Promise.allSettled([acquireAuditLock(path), acquireAuditLock(path), acquireAuditLock(path)]);
    const won = results.filter((r) => r.status === 'fulfilled');
    assert.equal(won.length, 1, JSON.stringify(results.map((r) => r.status)));
    for (const r of results) if (r.status === 'rejected') assert.ok(r.reason instanceof AuditLockedError);
    (won[0] as PromiseFulfilledResult<{ release(): void }>).value.release();
  });

  test('release removes only its own lock', async () => {
    const path = fresh();
    const lock = await acquireAuditLock(path);
    writeFileSync(lockPathOf(path), holder({ pid: 99999, nonce: 'someone-else' }));
    lock.release();
    assert.ok(existsSync(lockPathOf(path)), "another writer's lock is left alone");
  });

  test('a lock file that cannot be created is audit_unavailable; a non-regular file is refused before any lock is made', async () => {
    await assert.rejects(AuditLog.open(join(dir, 'missing-dir', 'audit.jsonl')), (err: Error & { code?: string }) => err.code === 'audit_unavailable' && /cannot be locked/.test(err.message));
    await assert.rejects(AuditLog.open(dir), (err: Error & { code?: string }) => err.code === 'audit_unavailable' && /not a regular file/.test(err.message));
    assert.equal(existsSync(`${dir}.lock`), false);
  });

  test('discard removes a log this open created and nothing was appended to; an existing or written log is kept', async () => {
    const created = fresh();
    await (await AuditLog.open(created)).discard();
    assert.equal(existsSync(created), false, 'an empty log made by this open is removed');
    assert.equal(existsSync(lockPathOf(created)), false);

    const existing = fresh();
    writeFileSync(existing, '');
    await (await AuditLog.open(existing)).discard();
    assert.equal(existsSync(existing), true, 'a log that was there is never touched');

    const written = fresh();
    const log = await AuditLog.open(written);
    await log.append({ type: 'test.event', actor: 'system:test' });
    await log.discard();
    assert.equal(readFileSync(written, 'utf8').split('\n').filter(Boolean).length, 1, 'a log with a record is kept');
  });
});
