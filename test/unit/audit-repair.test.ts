/**
 * `broker audit repair-tail` and `broker audit verify --expect` (issue 11, item 5), through the real
 * command line (a child process: exit codes and messages as a user sees them), on logs written by
 * the real AuditLog and then damaged.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { appendFile, mkdtemp, open, readdir, readFile, readlink, rm, truncate, writeFile } from 'node:fs/promises';
import { hostname, tmpdir } from 'node:os';
import { join } from 'node:path';
import { AuditLog, type AuditEventInput, type AuditRecord } from '../../src/audit/log.ts';
import { headMismatch } from '../../src/audit/head.ts';
import { lockPathOf } from '../../src/audit/lock.ts';
import { verifyAuditFile, verifyLiveFile } from '../../src/audit/verify.ts';

const MAIN = new URL('../../src/cli/main.ts', import.meta.url).pathname;
const LOG_TS = new URL('../../src/audit/log.ts', import.meta.url).href;

let dir: string;
let n = 0;
const fresh = () => join(dir, `audit-${++n}.jsonl`);

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'task-broker-repair-'));
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});

const event = (i: number): AuditEventInput => ({
  type: 'task.started',
  actor: 'agent:deployer',
  agent: 'deployer',
  task: `task-${i}`,
  template: 'deploy-app',
  namespace: 'shop',
  outcome: 'allowed',
  details: { i, note: 'é' },
});

/** A log of `count` records written by AuditLog; its path, lines (without "\n") and records. */
async function makeLog(count: number): Promise<{ path: string; lines: string[]; records: AuditRecord[]; head: { seq: number; hash: string } | undefined }> {
  const path = fresh();
  const log = await AuditLog.open(path);
  const records: AuditRecord[] = [];
  for (let i = 0; i < count; i++) records.push(await log.append(event(i)));
  const head = log.durableHead;
  await log.close();
  const lines = (await readFile(path, 'utf8')).split('\n').slice(0, -1);
  return { path, lines, records, head };
}

const sha256 = (data: Buffer | string) => createHash('sha256').update(data).digest('hex');
const fileSha = async (path: string) => sha256(await readFile(path));
const joinLines = (lines: string[]) => lines.map((l) => l + '\n').join('');

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** `broker ARGS...` as a child process (src/cli/main.ts on this Node). */
function broker(args: string[], onSpawn?: (child: ChildProcess) => void): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [MAIN, ...args], { env: { PATH: process.env['PATH'], HOME: process.env['HOME'], NO_COLOR: '1' }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, stdout, stderr }));
    onSpawn?.(child);
  });
}

describe('broker audit repair-tail', () => {
  test('a torn tail (a record cut mid-line) is removed, the repair recorded and chained; the broker continues the chain and its checkpoint still matches', async () => {
    const { path, lines, head } = await makeLog(5);
    // The checkpoint the broker would have written: the last record it made durable before the torn write.
    const checkpoint = { seq: 3, hash: (JSON.parse(lines[3]!) as AuditRecord).hash };
    assert.equal(head?.seq, 4);
    const full = await readFile(path);
    const keep = Buffer.byteLength(joinLines(lines.slice(0, 4)));
    const cut = keep + 57; // mid-way through the fifth record
    await truncate(path, cut);
    const removed = full.subarray(keep, cut);

    const before = await broker(['audit', 'verify', path]);
    assert.equal(before.code, 1);
    assert.match(before.stderr, /broken at line 5: the last line is incomplete .*broker audit repair-tail .*\[audit_chain_broken\]/);

    const r = await broker(['audit', 'repair-tail', path]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, new RegExp(`^repaired: removed line 5 \\(57 bytes, sha256 ${sha256(removed)}\\): incomplete: no trailing newline`));
    assert.match(r.stdout, /appended audit\.tail_repaired as seq 4 \(following seq 3\), hash [0-9a-f]{64}\n$/);
    assert.equal(existsSync(lockPathOf(path)), false, 'the lock is released');

    const after = await readFile(path, 'utf8');
    assert.ok(after.startsWith(joinLines(lines.slice(0, 4))), 'the good records are untouched');
    const rec = JSON.parse(after.split('\n').at(-2)!) as AuditRecord;
    assert.equal(rec.type, 'audit.tail_repaired');
    assert.equal(rec.outcome, 'ok');
    assert.equal(rec.seq, 4);
    assert.equal(rec.prev, checkpoint.hash);
    assert.equal(rec.details?.['removedBytes'], 57);
    assert.equal(rec.details?.['removedSha256'], sha256(removed));
    assert.equal(rec.details?.['followsSeq'], 3);
    assert.ok(!after.includes(removed.toString('utf8')), 'the removed bytes are not in the record');
    assert.deepEqual(await verifyAuditFile(path), { ok: true, records: 5, lastHash: rec.hash });

    // The broker opens it, checks it against its checkpoint and continues the chain.
    const log = await AuditLog.open(path, { checkpointSeq: checkpoint.seq, checkIntervalMs: 0 });
    assert.equal(headMismatch(checkpoint, log), undefined, 'a torn tail was never durable: the checkpoint still matches');
    const next = await log.append(event(99));
    await log.close();
    assert.equal(next.seq, 5);
    assert.equal(next.prev, rec.hash);
    assert.deepEqual(await verifyAuditFile(path), { ok: true, records: 6, lastHash: next.hash });
  });

  test('a garbage final line (with its newline) is removed; -o json says what was done', async () => {
    const { path, lines } = await makeLog(3);
    const garbage = '\u0000\u0000{"seq":3,"ti\u0000garbage\n';
    await appendFile(path, garbage);
    const r = await broker(['audit', 'repair-tail', path, '-o', 'json']);
    assert.equal(r.code, 0, r.stderr);
    const out = JSON.parse(r.stdout) as { repaired: boolean; kept: { records: number; bytes: number }; removed: { line: number; bytes: number; sha256: string; reason: string }; appended: { seq: number; hash: string } };
    assert.equal(out.repaired, true);
    assert.deepEqual(out.kept.records, 3);
    assert.equal(out.removed.line, 4);
    assert.equal(out.removed.bytes, Buffer.byteLength(garbage));
    assert.equal(out.removed.sha256, sha256(garbage));
    assert.match(out.removed.reason, /not valid JSON/);
    assert.equal(out.appended.seq, 3);
    const result = await verifyAuditFile(path);
    assert.deepEqual(result, { ok: true, records: 4, lastHash: out.appended.hash });
    assert.ok((await readFile(path, 'utf8')).startsWith(joinLines(lines)));
  });

  test('a record edited in the middle: refused naming it, the file unchanged', async () => {
    const { path, lines } = await makeLog(6);
    lines[2] = lines[2]!.replace('"namespace":"shop"', '"namespace":"shoq"');
    await writeFile(path, joinLines(lines) + lines[0]!.slice(0, 20)); // and a torn tail too: still refused
    const shaBefore = await fileSha(path);
    const r = await broker(['audit', 'repair-tail', path]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /broken at line 3 \(seq 2\): hash does not match the record's contents.*line 3 is not the last line of the file; nothing was changed .*\[audit_chain_broken\]/);
    assert.equal(await fileSha(path), shaBefore);
    assert.equal(existsSync(lockPathOf(path)), false);
  });

  test('a record deleted in the middle, or just before the last line: refused, the file unchanged', async () => {
    const { path, lines } = await makeLog(6);
    await writeFile(path, joinLines([...lines.slice(0, 2), ...lines.slice(3)]));
    let shaBefore = await fileSha(path);
    let r = await broker(['audit', 'repair-tail', path]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /broken at line 3 \(seq 3\): seq 3 where 2 was expected .*\[audit_chain_broken\]/);
    assert.equal(await fileSha(path), shaBefore);

    // The break is then on the last line, but that line is a whole record: not a torn write.
    await writeFile(path, joinLines([...lines.slice(0, 4), lines[5]!]));
    shaBefore = await fileSha(path);
    r = await broker(['audit', 'repair-tail', path]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /broken at line 5 \(seq 5\): seq 5 where 4 was expected .*line 5 is the last line, but a whole record .*not a torn write; nothing was changed/);
    assert.equal(await fileSha(path), shaBefore);
  });

  test('nothing to repair: exit 0, nothing appended', async () => {
    const { path, records } = await makeLog(3);
    const shaBefore = await fileSha(path);
    const r = await broker(['audit', 'repair-tail', path]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, `nothing to repair: ${path} ends with a complete record (3 records, last hash ${records[2]!.hash})\n`);
    assert.equal(await fileSha(path), shaBefore);
  });

  test('--dry-run says what it would do and changes nothing', async () => {
    const { path, lines } = await makeLog(4);
    await truncate(path, Buffer.byteLength(joinLines(lines)) - 10);
    const shaBefore = await fileSha(path);
    const r = await broker(['audit', 'repair-tail', '--dry-run', path]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /^would remove line 4 \(\d+ bytes, sha256 [0-9a-f]{64}\): incomplete: no trailing newline/);
    assert.match(r.stdout, /would keep 3 records \(\d+ bytes\) and append audit\.tail_repaired as seq 3, following seq 2\nnothing was changed \(--dry-run\)\n$/);
    assert.equal(await fileSha(path), shaBefore);
    assert.equal(existsSync(lockPathOf(path)), false, 'not even a lock file');
  });

  test('held by a live writer: refused naming its pid (also with --dry-run), the file unchanged; a stale lock is taken over and that recorded', async () => {
    const { path, lines } = await makeLog(3);
    // The broker's own AuditLog holds the log's lock while it is open; the file is torn under it (what a
    // failed write leaves behind while its broker still runs).
    const live = await AuditLog.open(path, { lockCommand: 'broker serve', checkIntervalMs: 0 });
    await appendFile(path, lines[0]!.slice(0, 30));
    const shaBefore = await fileSha(path);
    try {
      for (const args of [['audit', 'repair-tail', path], ['audit', 'repair-tail', '--dry-run', path]]) {
        const r = await broker(args);
        assert.equal(r.code, 5, r.stderr);
        assert.match(r.stderr, new RegExp(`held by pid ${process.pid} \\(broker serve, .*\\[audit_unavailable\\]`));
        assert.equal(await fileSha(path), shaBefore);
      }
    } finally {
      await live.close();
    }

    // A writer killed outright leaves its lock: a dead pid's lock is taken over, and the record says so.
    const dead = spawn(process.execPath, ['-e', '0']);
    await new Promise((done) => dead.on('exit', done));
    const deadStarted = new Date().toISOString();
    await writeFile(lockPathOf(path), JSON.stringify({ pid: dead.pid, host: hostname(), startedAt: deadStarted, command: 'broker serve', nonce: 'x' }) + '\n');
    const r = await broker(['audit', 'repair-tail', path]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stderr, new RegExp(`took over a stale lock of pid ${dead.pid}: pid ${dead.pid} is not running`));
    const rec = JSON.parse((await readFile(path, 'utf8')).split('\n').at(-2)!) as AuditRecord;
    assert.deepEqual(rec.details?.['staleLockTakenOver'], {
      lockFile: lockPathOf(path),
      reason: `pid ${dead.pid} is not running`,
      pid: dead.pid!,
      host: hostname(),
      startedAt: deadStarted,
      command: 'broker serve',
    });
    assert.equal(existsSync(lockPathOf(path)), false);
    assert.equal((await verifyAuditFile(path)).ok, true);
  });
});

/** Resolves once process `pid` has `path` open (Linux: /proc/PID/fd). */
async function opened(pid: number, path: string): Promise<void> {
  for (let i = 0; i < 1000; i++) {
    const fds = await readdir(`/proc/${pid}/fd`).catch(() => [] as string[]);
    for (const fd of fds) if ((await readlink(`/proc/${pid}/fd/${fd}`).catch(() => '')) === path) return;
    await new Promise((r) => setTimeout(r, 5));
  }
  throw new Error(`pid ${pid} never opened ${path}`);
}

describe('broker audit verify on a live log', () => {
  /** A child process appending to `path` with AuditLog (one record every few ms) until killed. */
  function writer(path: string): ChildProcess {
    const code = `
      const { AuditLog } = await import(${JSON.stringify(LOG_TS)});
      const log = await AuditLog.open(${JSON.stringify(path)});
      process.on('SIGTERM', async () => { await log.close(); process.exit(0); });
      for (let i = 0; ; i++) {
        await log.append({ type: 'k8s.request', actor: 'system:kube-apiserver', task: 't-' + i, details: { verb: 'get', i } });
        await new Promise((r) => setTimeout(r, 3));
      }`;
    return spawn(process.execPath, ['--input-type=module', '-e', code], { stdio: ['ignore', 'ignore', 'inherit'] });
  }

  async function waitForLines(path: string, count: number): Promise<string[]> {
    for (let i = 0; i < 500; i++) {
      const text = existsSync(path) ? await readFile(path, 'utf8') : '';
      const lines = text.split('\n').slice(0, -1);
      if (lines.length >= count) return lines;
      await new Promise((r) => setTimeout(r, 20));
    }
    throw new Error(`${path} never reached ${count} lines`);
  }

  test('--expect finds an early record while a child appends (exit 0); an unknown hash exits 1; a record edited before it exits 1 naming it', async () => {
    const path = fresh();
    const child = writer(path);
    try {
      const lines = await waitForLines(path, 20);
      const early = JSON.parse(lines[3]!) as AuditRecord;

      let r = await broker(['audit', 'verify', '--expect', early.hash, path]);
      assert.equal(r.code, 0, r.stderr);
      assert.match(r.stdout, /^ok: \d+ records, last hash [0-9a-f]{64}\nexpected record found: seq 3 \(line 4\), \d+ records after it\n/);
      const records = Number(/^ok: (\d+) records/.exec(r.stdout)![1]);
      assert.ok(records >= 20);

      r = await broker(['audit', 'verify', '--expect', early.hash, '-o', 'json', path]);
      assert.equal(r.code, 0, r.stderr);
      assert.deepEqual((JSON.parse(r.stdout) as { expected: unknown }).expected, { hash: early.hash, seq: 3, line: 4 });

      // --expect-last wants the log to end at that record: a live log has grown past it.
      r = await broker(['audit', 'verify', '--expect-last', early.hash, path]);
      assert.equal(r.code, 1);
      assert.match(r.stderr, /is not the expected .*\[audit_chain_broken\]/);

      const unknown = sha256('not a record');
      r = await broker(['audit', 'verify', '--expect', unknown, path]);
      assert.equal(r.code, 1);
      assert.match(r.stderr, new RegExp(`: no record has hash ${unknown} \\(\\d+ records hold, .*\\(--expect\\) \\[audit_chain_broken\\]`));

      // Edit record 1 in place (same length, so the writer goes on appending), then look for record 3.
      const offset = Buffer.byteLength(lines[0]! + '\n') + lines[1]!.indexOf('"t-1"') + 1;
      const fh = await open(path, 'r+');
      await fh.write('X', offset);
      await fh.close();
      await waitForLines(path, records + 5);
      r = await broker(['audit', 'verify', '--expect', early.hash, path]);
      assert.equal(r.code, 1);
      assert.match(r.stderr, /broken at line 2 \(seq 1\): hash does not match the record's contents .*\[audit_chain_broken\]/);
      assert.ok(child.exitCode === null, 'the writer was appending all along');
    } finally {
      child.kill('SIGTERM');
      await new Promise((done) => (child.exitCode === null ? child.on('exit', done) : done(undefined)));
    }
  });

  test('an incomplete last line: "in progress" when its newline arrives, torn when it does not, torn at once with --strict', async () => {
    const made = await makeLog(4);
    const { path, records } = made;
    const lines = made.lines.slice(0, 3);
    const fourth = made.lines[3]!;
    const full = joinLines(lines);
    await writeFile(path, full + fourth.slice(0, 40));

    // A writer finishes the line once verify has the file open and has read it (well within its 1 s).
    let finishing: Promise<void> | undefined;
    const r = await broker(['audit', 'verify', '--expect', records[1]!.hash, path], (child) => {
      finishing = opened(child.pid!, path).then(() => new Promise((done) => setTimeout(done, 150))).then(() => appendFile(path, fourth.slice(40) + '\n'));
    });
    await finishing;
    assert.equal(r.code, 0, r.stderr);
    assert.equal(
      r.stdout,
      `ok: 3 records, last hash ${records[2]!.hash}\nexpected record found: seq 1 (line 2), 1 record after it\nin progress: line 4 (40 bytes so far) was being written when read; not checked\n`,
    );

    await writeFile(path, full + fourth.slice(0, 40));
    const torn = await broker(['audit', 'verify', path]);
    assert.equal(torn.code, 1);
    assert.match(torn.stderr, /broken at line 4: the last line is incomplete .*repair-tail/);

    // --strict does not wait: a line its writer finishes a moment later is torn to it.
    await writeFile(path, full + fourth.slice(0, 40));
    const strict = await broker(['audit', 'verify', '--strict', path]);
    assert.equal(strict.code, 1);
    assert.match(strict.stderr, /broken at line 4: the last line is incomplete/);
    const later = new Promise((done) => setTimeout(done, 300)).then(() => appendFile(path, fourth.slice(40) + '\n'));
    const strictResult = await verifyLiveFile(path, { strict: true });
    await later;
    assert.equal(strictResult.ok, false);
    assert.equal(strictResult.problem, 'torn-tail');
    // The same in the library (no process start to race with the writer): in progress, when not strict.
    await writeFile(path, full + fourth.slice(0, 40));
    const finish = new Promise((done) => setTimeout(done, 300)).then(() => appendFile(path, fourth.slice(40) + '\n'));
    const live = await verifyLiveFile(path);
    await finish;
    assert.deepEqual(live, { ok: true, records: 3, lastHash: records[2]!.hash, inProgress: { line: 4, bytes: 40 } });
  });
});
