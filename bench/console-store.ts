/**
 * The web console's task page on a PostgreSQL audit store (src/console/store-timeline.ts): the time
 * to read one task's story through the store's indexes, against reading the whole table and building
 * every story (what `broker audit show --task` does, less its verification: the baseline any
 * whole-table reading would pay), both in the same run on the same table.
 *
 *   node bench/console-store.ts [--tasks 2000] [--per-task 100] [--rounds 5]
 *
 * The table: `tasks` tasks of agent alpha, their names reused (50 names), each a refused start
 * (no id), a start, `per-task` - 3 API requests and an end, in seq order one task after another. Rows
 * are made in the database (generate_series), not chained: the story read does not verify (the
 * chain's verdict is a separate, incremental pass). Migrated by `broker audit migrate` (its indexes).
 * Reported: the median of `rounds` cold reads (a new reader each time) of one task in the middle of
 * the table, and of the whole-table baseline.
 */
import { buildStories } from '../src/audit/show.ts';
import pg from 'pg';
import { migrate } from '../src/audit/postgres.ts';
import type { AuditRecord } from '../src/audit/types.ts';
import { ConsoleDatabase } from '../src/console/db.ts';
import { StoreStories } from '../src/console/store-timeline.ts';
import { TestPostgres } from '../test/helpers/postgres.ts';

const arg = (name: string, fallback: number) => {
  const i = process.argv.indexOf(`--${name}`);
  return i === -1 ? fallback : Number(process.argv[i + 1]);
};
const TASKS = arg('tasks', 2000);
const PER = arg('per-task', 100);
const ROUNDS = arg('rounds', 5);

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

/** Every row in seq order, 10 000 at a time (as PostgresAuditReader reads, without verifying: these rows are not chained). */
async function readAll(url: string): Promise<AuditRecord[]> {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    const out: AuditRecord[] = [];
    for (let after = -1; ; ) {
      const rows = (await client.query<{ seq: string; line: string }>('SELECT seq, line FROM task_broker.audit WHERE seq > $1 ORDER BY seq LIMIT 10000', [after])).rows;
      for (const r of rows) out.push(JSON.parse(r.line) as AuditRecord);
      if (rows.length < 10_000) return out;
      after = Number(rows.at(-1)!.seq);
    }
  } finally {
    await client.end();
  }
}

const db = await TestPostgres.start();
try {
  await migrate(db.url('postgres'), ['task_broker']);
  const made = Date.now();
  // Row k of task i (seq i*PER + k): 0 refused (no id), 1 started, 2..PER-2 requests, PER-1 ended.
  await db.query(
    'postgres',
    `INSERT INTO task_broker.audit (seq, time, type, task, line)
     SELECT g, t::timestamptz, ty, CASE WHEN ty = 'task.refused' THEN NULL ELSE 't' || i END,
            json_build_object('seq', g, 'time', t, 'type', ty, 'actor', 'agent:alpha', 'agent', 'alpha',
                              'taskName', 'name-' || (i % 50), 'template', 'read-pods', 'namespace', 'team-a')::jsonb
              || CASE WHEN ty = 'task.refused' THEN '{}'::jsonb ELSE jsonb_build_object('task', 't' || i) END
              || CASE WHEN ty = 'k8s.request' THEN jsonb_build_object('details', jsonb_build_object('verb', 'get', 'resource', 'pods', 'namespace', 'team-a', 'decision', 'allow', 'requestReceivedTimestamp', t)) ELSE '{}'::jsonb END
     FROM (SELECT g, g / ${PER} AS i, g % ${PER} AS k, to_char(timestamptz '2026-01-01' + g * interval '1 ms', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') AS t FROM generate_series(0, ${TASKS * PER - 1}) g) s,
          LATERAL (SELECT CASE WHEN k = 0 THEN 'task.refused' WHEN k = 1 THEN 'task.started' WHEN k = ${PER - 1} THEN 'task.ended' ELSE 'k8s.request' END AS ty) x`,
  );
  await db.query('postgres', 'ANALYZE task_broker.audit');
  const size = (await db.query<{ s: string }>('postgres', `SELECT pg_size_pretty(pg_total_relation_size('task_broker.audit')) AS s`)).rows[0]!.s;
  console.log(`table: ${TASKS * PER} rows (${TASKS} tasks x ${PER}), ${size}, made in ${Date.now() - made} ms`);
  const id = `t${Math.floor(TASKS / 2)}`;
  const url = db.url('task_broker');

  const indexed: number[] = [];
  const whole: number[] = [];
  let shown = 0;
  for (let r = 0; r < ROUNDS; r++) {
    const consoleDb = new ConsoleDatabase(url);
    await consoleDb.query('SELECT 1'); // connected: the page's pool is warm in a running broker
    let t = performance.now();
    const found = await new StoreStories(consoleDb).taskStory(id);
    indexed.push(performance.now() - t);
    shown = found?.story.records.length ?? 0;
    await consoleDb.close();
    t = performance.now();
    const records = await readAll(url);
    const story = buildStories(records).stories.find((s) => s.id === id);
    whole.push(performance.now() - t);
    if ((story?.records.length ?? -1) !== shown) throw new Error(`the stories differ: ${story?.records.length} whole-table, ${shown} indexed`);
  }
  console.log(`task ${id}: ${shown} records (the refused start before it included)`);
  console.log(`indexed read (the console): median ${median(indexed).toFixed(1)} ms  [${indexed.map((x) => x.toFixed(0)).join(' ')}]`);
  console.log(`whole table (baseline):     median ${median(whole).toFixed(1)} ms  [${whole.map((x) => x.toFixed(0)).join(' ')}]`);
  console.log(`ratio: ${(median(whole) / median(indexed)).toFixed(0)}x faster`);
} finally {
  await db.remove();
}
