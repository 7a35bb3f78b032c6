/**
 * Durable audit appends/s: the PostgreSQL store (src/audit/postgres.ts) written by 3 broker-like
 * processes at once, against the file log of one process, in the same run on the same disk.
 *
 * - file log, 1 process: AuditLog, 64 concurrent callers (group commit by fdatasync).
 * - postgres, 1 process: one PostgresAuditStore, 64 concurrent callers.
 * - postgres, 3 processes, one chain: three processes on one table (the shipped design: every batch
 *   takes the chain's advisory lock).
 * - postgres, 3 processes, a chain each: three processes, each on a database of its own on the same
 *   server (what one chain per replica would cost: no lock shared between them).
 *
 * A throwaway PostgreSQL 15 (test/helpers/postgres.ts), synchronous_commit and fsync on. Every append
 * counted has returned, so is committed. Run: bin/bench audit-postgres [records per process] [callers]
 */
import { fork } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { AuditLog } from '../src/audit/log.ts';
import { migrate, PostgresAuditReader, PostgresAuditStore } from '../src/audit/postgres.ts';
import type { AuditEventInput } from '../src/audit/types.ts';
import { TestPostgres } from '../test/helpers/postgres.ts';

const total = Number(process.argv[2] ?? 5000);
const callers = Number(process.argv[3] ?? 64);

const event = (i: number, who: string): AuditEventInput => ({
  type: 'credential.minted',
  actor: `agent:${who}`,
  agent: who,
  task: `task-${i}`,
  namespace: 'shop',
  outcome: 'allowed',
  jti: `0b7e5a4e-0000-4000-8000-${String(i).padStart(12, '0')}`,
});

async function drive(append: (e: AuditEventInput) => Promise<unknown>, who: string): Promise<number> {
  let next = 0;
  const start = performance.now();
  await Promise.all(
    Array.from({ length: callers }, async () => {
      while (next < total) await append(event(next++, who));
    }),
  );
  return (performance.now() - start) / 1000;
}

// A replica: opens the store, waits for "go", appends, reports.
if (process.argv[4] === '--worker') {
  const url = process.argv[5]!;
  const store = await PostgresAuditStore.open(url);
  process.send!({ ready: true });
  await new Promise<void>((go) => process.once('message', () => go()));
  const seconds = await drive((e) => store.append(e), `replica-${process.pid}`);
  const { flushes, fast, fastMissed } = store.stats;
  await store.close();
  process.send!({ seconds, flushes, fast, missed: fastMissed });
  process.exit(0);
}

async function replicas(urls: string[]): Promise<{ seconds: number; flushes: number; fast: number; missed: number; each: number[] }> {
  const children = urls.map((url) => fork(new URL(import.meta.url).pathname, [String(total), String(callers), '--worker', url], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] }));
  const next = (c: (typeof children)[number]) => new Promise<{ seconds: number; flushes: number; fast: number; ready?: boolean }>((done, fail) => {
    c.once('message', (m) => done(m as { seconds: number; flushes: number; fast: number }));
    c.once('exit', (code) => fail(new Error(`a replica exited with ${code}`)));
  });
  await Promise.all(children.map(next));
  const t0 = performance.now();
  const results = children.map(next);
  for (const c of children) c.send('go');
  const done = await Promise.all(results);
  const seconds = (performance.now() - t0) / 1000;
  return { seconds, flushes: done.reduce((n, d) => n + d.flushes, 0), fast: done.reduce((n, d) => n + d.fast, 0), missed: done.reduce((n, d) => n + (d as { missed?: number }).missed!, 0), each: done.map((d) => d.seconds) };
}

const line = (name: string, records: number, seconds: number, flushes: number, what: string) =>
  console.log(`${name.padEnd(38)} ${String(records).padStart(6)} appends in ${seconds.toFixed(2).padStart(5)} s: ${String(Math.round(records / seconds)).padStart(6)} appends/s, ${flushes} ${what} (${(records / flushes).toFixed(1)} records each)`);

const dir = await mkdtemp(join(tmpdir(), 'task-broker-audit-pg-bench-'));
const pg = await TestPostgres.start();
try {
  for (const db of ['one', 'a', 'b', 'c', 'solo']) await pg.query('postgres', `CREATE DATABASE ${db}`);
  const url = (db: string) => pg.url('task_broker', db);
  for (const db of ['one', 'a', 'b', 'c', 'solo']) await migrate(pg.url('postgres', db), ['task_broker']);
  console.log(`PostgreSQL 15 (fsync, synchronous_commit on) and the file log in ${tmpdir()}; ${total} appends per process, ${callers} concurrent callers in each`);

  const log = await AuditLog.open(join(dir, 'file.jsonl'));
  const fileSeconds = await drive((e) => log.append(e), 'file');
  const fileFlushes = log.stats.flushes;
  await log.close();
  line('file log, 1 process', total, fileSeconds, fileFlushes, 'fdatasyncs');

  const solo = await PostgresAuditStore.open(url('solo'));
  const soloSeconds = await drive((e) => solo.append(e), 'solo');
  const soloFlushes = solo.stats.flushes;
  const soloFast = solo.stats.fast;
  await solo.close();
  line('postgres, 1 process', total, soloSeconds, soloFlushes, `commits, ${soloFast} in one round trip`);

  const shared = await replicas([url('one'), url('one'), url('one')]);
  line('postgres, 3 processes, one chain', 3 * total, shared.seconds, shared.flushes, `commits, ${shared.fast} in one round trip, ${shared.missed} tried that in vain`);
  const reader = new PostgresAuditReader(url('one'));
  await reader.read();
  const chain = reader.result(true);
  if (!chain.ok || chain.records !== 3 * total) throw new Error(`the shared chain does not hold: ${JSON.stringify(chain)}`);

  const own = await replicas([url('a'), url('b'), url('c')]);
  line('postgres, 3 processes, a chain each', 3 * total, own.seconds, own.flushes, `commits, ${own.fast} in one round trip`);
  console.log(`one chain against a chain each: ${((3 * total) / shared.seconds / ((3 * total) / own.seconds)).toFixed(2)}x; 3 processes on one chain against the file log of one: ${((3 * total) / shared.seconds / (total / fileSeconds)).toFixed(2)}x`);
} finally {
  await pg.remove();
  await rm(dir, { recursive: true, force: true });
}
