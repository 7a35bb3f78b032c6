/**
 * The PostgreSQL audit store (src/audit/postgres.ts) against a real PostgreSQL 15 (test/helpers/postgres.ts):
 * the migration, one chain from concurrent writers, durability and fail-closed behaviour across a
 * database restart, webhook events recorded once whichever writer gets them, role separation, and
 * tampering named by the verifier. The broker processes on one store: audit-postgres.test.ts.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { migrate, PostgresAuditReader, PostgresAuditStore, redactUrl } from '../../src/audit/postgres.ts';
import { isBrokerError } from '../../src/errors.ts';
import { brokerCli as broker } from '../helpers/broker.ts';
import { TestPostgres } from '../helpers/postgres.ts';

let pg: TestPostgres;
const open: PostgresAuditStore[] = [];

before(async () => {
  pg = await TestPostgres.start();
});

after(async () => {
  for (const s of open) await s.close().catch(() => undefined);
  await pg?.remove();
});

async function store(): Promise<PostgresAuditStore> {
  const s = await PostgresAuditStore.open(pg.url('task_broker'), { connectTimeoutMs: 1000, statementTimeoutMs: 2000 });
  open.push(s);
  return s;
}

async function readAll(): Promise<{ records: number; chain: ReturnType<PostgresAuditReader['result']> }> {
  const reader = new PostgresAuditReader(pg.url('task_broker'));
  const records = await reader.read();
  return { records: records.length, chain: reader.result(true) };
}

test('before the migration the store refuses to open, naming the command; migrate is safe to run twice', async () => {
  await assert.rejects(store(), (err: unknown) => isBrokerError(err) && err.code === 'audit_unavailable' && /broker audit migrate/.test(err.message) && !err.message.includes(pg.brokerPassword));
  const first = broker(['audit', 'migrate', pg.url('postgres'), '--grant', 'task_broker']);
  assert.equal(first.status, 0, first.stderr);
  assert.match(first.stdout, /table task_broker\.audit created; used_proofs, console_sessions, console_signouts and indexes up to date; SELECT, INSERT \(only\) granted to task_broker/);
  assert.ok(!first.stdout.includes(pg.superPassword), 'no password in the output');
  const again = broker(['audit', 'migrate', pg.url('postgres'), '--grant', 'task_broker', '-o', 'json']);
  assert.equal(again.status, 0, again.stderr);
  assert.equal(JSON.parse(again.stdout).created, false);
  const missing = await migrate(pg.url('postgres'), ['no_such_role']).catch((e: unknown) => e);
  assert.ok(isBrokerError(missing) && missing.code === 'invalid_argument', String(missing));
  // The append function, once after two runs: the caller's rights (SECURITY INVOKER), EXECUTE for the brokers' role and not for PUBLIC.
  const fn = await pg.query<{ prosecdef: boolean; acl: string }>('postgres', `SELECT prosecdef, proacl::text AS acl FROM pg_proc WHERE proname = 'append_audit'`);
  assert.equal(fn.rows.length, 1, JSON.stringify(fn.rows));
  assert.equal(fn.rows[0]!.prosecdef, false);
  assert.match(fn.rows[0]!.acl, /task_broker=X\/postgres/);
  assert.doesNotMatch(fn.rows[0]!.acl, /[{,]=X\//, 'PUBLIC may not execute it');
});

test('three writers append concurrently: one chain, seq order = commit order, every append acknowledged is there', async () => {
  const writers = [await store(), await store(), await store()];
  // 10 500 records: more than one chunk (10 000 rows) for the readers.
  const acked = await Promise.all(
    writers.flatMap((w, i) => Array.from({ length: 3500 }, (_, j) => w.append({ type: 'test.append', actor: `writer-${i}`, task: `t-${j % 7}` }))),
  );
  const seqs = new Set(acked.map((r) => r.seq));
  assert.equal(seqs.size, 10_500, 'every acknowledged record has its own seq');
  const { records, chain } = await readAll();
  assert.equal(records, 10_500);
  assert.ok(chain.ok, JSON.stringify(chain));
  assert.ok(writers.every((w) => w.stats.flushes < 3500), `group commit: ${writers.map((w) => w.stats.flushes).join(', ')} transactions for 3500 appends each`);
  const verified = broker(['audit', 'verify', pg.url('task_broker'), '-o', 'json']);
  assert.equal(verified.status, 0, verified.stderr);
  assert.equal(JSON.parse(verified.stdout).records, 10_500);
});

test('a database whose default isolation is repeatable read: the writers still chain (each connection reads committed), every append acknowledged', async () => {
  const admin = pg.client('postgres', 'postgres');
  await admin.connect();
  await admin.query('CREATE DATABASE audit_rr').finally(() => admin.end());
  await pg.query('postgres', `ALTER DATABASE audit_rr SET default_transaction_isolation = 'repeatable read'`);
  await migrate(pg.url('postgres', 'audit_rr'), ['task_broker']);
  const writers: PostgresAuditStore[] = [];
  for (let i = 0; i < 3; i++) {
    const w = await PostgresAuditStore.open(pg.url('task_broker', 'audit_rr'), { connectTimeoutMs: 1000, statementTimeoutMs: 2000 });
    open.push(w);
    writers.push(w);
  }
  const acked = await Promise.all(writers.flatMap((w, i) => Array.from({ length: 600 }, (_, j) => w.append({ type: 'test.rr', actor: `writer-${i}`, task: `t-${j % 5}` }))));
  assert.equal(new Set(acked.map((r) => r.seq)).size, 1800);
  const reader = new PostgresAuditReader(pg.url('task_broker', 'audit_rr'));
  assert.equal((await reader.read()).length, 1800);
  assert.ok(reader.result(true).ok);
});

test('one writer under load goes the fast way throughout; after another writer appends, the careful way until the head is its own again', async () => {
  const a = await store();
  let next = 0;
  // 50 callers in a closed loop, as a broker's credential endpoint under load: each comes back after
  // a moment (its answer, its next request), so appends keep arriving while a batch is in flight.
  await Promise.all(
    Array.from({ length: 50 }, async () => {
      while (next < 2000) {
        next++;
        await a.append({ type: 'test.load', actor: 'writer-a' });
        await new Promise((r) => setTimeout(r, Math.random() * 2));
      }
    }),
  );
  const { fast, fastMissed, flushes } = a.stats;
  assert.equal(fastMissed, 0, `no fast transaction inserted nothing: ${JSON.stringify(a.stats)}`);
  assert.ok(fast >= flushes - 2 && flushes < 2000, `all but the first transactions the fast way, in batches: ${JSON.stringify(a.stats)}`);
  const b = await store();
  await b.append({ type: 'test.other', actor: 'writer-b' });
  for (let i = 0; i < 4; i++) await a.append({ type: 'test.after-other', actor: 'writer-a' });
  assert.equal(a.stats.fastMissed, 1, `the first after the other writer's record missed, then the careful way: ${JSON.stringify(a.stats)}`);
  assert.equal(a.stats.fast, fast + 2, `the careful way found its own record, and the fast way resumed: ${JSON.stringify(a.stats)}`);
  assert.ok((await readAll()).chain.ok);
});

test('what an agent chose reaches the row as written: quotes, backslashes, NUL, non-ASCII', async () => {
  const s = await store();
  const odd = `it's \\ "quoted" \0 é 🙂 '); DROP TABLE task_broker.audit; --`;
  const r = await s.append({ type: 'test.odd', actor: 'me', task: `t-odd\0x`, reason: odd, details: { uri: odd } });
  const row = await pg.query<{ line: string; task: string }>('postgres', 'SELECT line, task FROM task_broker.audit WHERE seq = $1', [r.seq]);
  const back = JSON.parse(row.rows[0]!.line);
  assert.equal(back.reason, odd);
  assert.equal(back.details.uri, odd);
  assert.equal(back.task, 't-odd\0x');
  assert.equal(row.rows[0]!.task, 't-oddx');
  assert.ok((await readAll()).chain.ok);
});

test('an API server audit event is recorded once, whichever writer gets it', async () => {
  const [a, b] = [await store(), await store()];
  const event = {
    type: 'k8s.request',
    actor: 'system:apiserver',
    task: 't-dup',
    details: { auditID: 'aid-1', stage: 'ResponseComplete', requestReceivedTimestamp: '2026-01-01T00:00:00.000001Z', stageTimestamp: '2026-01-01T00:00:00.000002Z' },
  };
  const [r1, r2] = await Promise.all([a.append(event), b.append(event)]);
  const r3 = await a.append(event);
  assert.equal(r1.seq, r2.seq);
  assert.equal(r1.seq, r3.seq);
  const other = await b.append({ ...event, details: { ...event.details, stageTimestamp: '2026-01-01T00:00:00.000003Z' } });
  assert.notEqual(other.seq, r1.seq, 'another event with the same auditID (other timestamps) is recorded');
  // A writer going the fast way (one round trip: it appended the last records itself) finds it too.
  const c = await store();
  for (let i = 0; i < 3; i++) await c.append({ type: 'test.warm', actor: 'me' });
  assert.ok(c.stats.fast > 0, 'the writer went the fast way');
  const r4 = await c.append(event);
  assert.equal(r4.seq, r1.seq);
  assert.equal(c.stats.fastMissed, 1, 'the fast way inserted nothing: the key is recorded');
  const rows = await pg.query<{ n: string }>('postgres', `SELECT count(*) AS n FROM task_broker.audit WHERE task = 't-dup'`);
  assert.equal(rows.rows[0]!.n, '2');
});

test("the broker's role may insert and select, never update or delete", async () => {
  await assert.rejects(pg.query('task_broker', `UPDATE task_broker.audit SET line = line WHERE seq = 0`), /permission denied for table audit/);
  await assert.rejects(pg.query('task_broker', `DELETE FROM task_broker.audit WHERE seq = 0`), /permission denied for table audit/);
  await assert.rejects(pg.query('task_broker', `TRUNCATE task_broker.audit`), /permission denied for table audit/);
});

test('the append function checks its arguments: arrays of different lengths are refused and nothing is inserted', async () => {
  const before = (await readAll()).records;
  await assert.rejects(
    pg.query('task_broker', `SELECT * FROM task_broker.append_audit(NULL, NULL, now(), ARRAY['test.a', 'test.b'], ARRAY[NULL, NULL]::text[], NULL, '{"seq":0}')`),
    /append_audit: 1 lines, 2 types, 2 tasks/,
  );
  assert.equal((await readAll()).records, before);
});

test('a store migrated without the append function (an older version): the store names `broker audit migrate` and the function, and takes up again once migrated', async () => {
  const fn = 'task_broker.append_audit(bigint, text, timestamptz, text[], text[], text[], text)';
  const s = await store();
  await s.append({ type: 'test.before-drop', actor: 'me' });
  await pg.query('postgres', `DROP FUNCTION ${fn}`);
  // Opening refuses (a broker does not start) ...
  await assert.rejects(store(), (err: unknown) => isBrokerError(err) && err.code === 'audit_unavailable' && /has no function task_broker\.append_audit, which this version of the broker appends with: run `broker audit migrate postgres:\/\/task_broker:\*\*\*@/.test(err.message));
  // ... and a store already open fails closed, naming it too.
  const during = await s.append({ type: 'test.during-drop', actor: 'me' }).catch((e: unknown) => e);
  assert.ok(isBrokerError(during) && during.code === 'audit_unavailable' && /has no function task_broker\.append_audit: run `broker audit migrate/.test(during.message), String(during));
  assert.equal(s.healthy, false);
  const again = broker(['audit', 'migrate', pg.url('postgres'), '--grant', 'task_broker']);
  assert.equal(again.status, 0, again.stderr);
  const deadline = Date.now() + 10_000;
  while (!s.healthy && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
  await s.append({ type: 'test.after-migrate', actor: 'me' });
  // Without EXECUTE the role is told to be granted it.
  await pg.query('postgres', `REVOKE EXECUTE ON FUNCTION ${fn} FROM task_broker`);
  await assert.rejects(store(), (err: unknown) => isBrokerError(err) && /this role may not execute task_broker\.append_audit \(`broker audit migrate --grant ROLE`\)/.test(err.message));
  assert.equal(broker(['audit', 'migrate', pg.url('postgres'), '--grant', 'task_broker']).status, 0);
  await (await store()).append({ type: 'test.after-grant', actor: 'me' });
  const { chain } = await readAll();
  assert.ok(chain.ok, JSON.stringify(chain));
  assert.equal((await pg.query('postgres', `SELECT 1 FROM task_broker.audit WHERE type = 'test.during-drop'`)).rowCount, 0);
});

test('the database stopped: appends fail closed (audit_unavailable, unhealthy), and the store takes up again when it returns', async () => {
  const s = await store();
  const before = await s.append({ type: 'test.before', actor: 'me' });
  await pg.pause();
  const err = await s.append({ type: 'test.during', actor: 'me' }).catch((e: unknown) => e);
  assert.ok(isBrokerError(err) && err.code === 'audit_unavailable', String(err));
  assert.ok(!err.message.includes(pg.brokerPassword), 'the password is not in the message');
  assert.ok(err.message.includes(redactUrl(pg.url('task_broker'))));
  assert.equal(s.healthy, false);
  await assert.rejects(s.append({ type: 'test.during', actor: 'me' }), /audit store/);
  await pg.resume();
  const deadline = Date.now() + 10_000;
  while (!s.healthy && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
  assert.equal(s.healthy, true, 'healthy again once the database answers');
  const after = await s.append({ type: 'test.after', actor: 'me' });
  assert.ok(after.seq > before.seq);
  const { chain } = await readAll();
  assert.ok(chain.ok, JSON.stringify(chain));
  const during = await pg.query('postgres', `SELECT 1 FROM task_broker.audit WHERE type = 'test.during'`);
  assert.equal(during.rowCount, 0, 'nothing refused was recorded');
});

test('tampering by the superuser: audit verify names the record; an altered last record stops appends', async () => {
  const ok = broker(['audit', 'verify', pg.url('task_broker')]);
  assert.equal(ok.status, 0, ok.stderr);
  assert.match(ok.stdout, /^ok: \d+ records, last hash [0-9a-f]{64}\n$/);
  // --expect-last, as for a file: the last hash kept elsewhere matches, and any other is refused.
  const last = /last hash ([0-9a-f]{64})/.exec(ok.stdout)![1]!;
  assert.equal(broker(['audit', 'verify', pg.url('task_broker'), '--expect-last', last]).status, 0);
  const cut = broker(['audit', 'verify', pg.url('task_broker'), '--expect-last', '0'.repeat(64)]);
  assert.equal(cut.status, 1);
  assert.match(cut.stderr, new RegExp(`the last record's hash ${last} is not the expected 0{64} \\(records were cut from the end, or added\\)`));

  await pg.query('postgres', `UPDATE task_broker.audit SET line = replace(line, '"actor":"writer-1"', '"actor":"writer-9"') WHERE seq = (SELECT min(seq) FROM task_broker.audit WHERE line LIKE '%"actor":"writer-1"%')`);
  const edited = broker(['audit', 'verify', pg.url('task_broker')]);
  assert.equal(edited.status, 1);
  assert.match(edited.stderr, /broken at line \d+ \(seq \d+\): hash does not match the record's contents \(the record was altered\) \[audit_chain_broken\]/);
  assert.ok(!edited.stderr.includes(pg.brokerPassword));
  await pg.query('postgres', `UPDATE task_broker.audit SET line = replace(line, '"actor":"writer-9"', '"actor":"writer-1"')`);
  assert.equal(broker(['audit', 'verify', pg.url('task_broker')]).status, 0, 'put back, it holds again');

  await pg.query('postgres', `DELETE FROM task_broker.audit WHERE seq = 100`);
  const removed = broker(['audit', 'verify', pg.url('task_broker')]);
  assert.equal(removed.status, 1);
  assert.match(removed.stderr, /broken at line 101 \(seq 101\): seq 101 where 100 was expected \(a record was removed, inserted or moved\)/);

  // The head altered: nothing more is chained onto it, also by a writer that appended the head itself.
  const s = await store();
  for (let i = 0; i < 3; i++) await s.append({ type: 'test.before-tamper', actor: 'me' });
  assert.ok(s.stats.fast > 0, 'the writer went the fast way');
  await pg.query('postgres', `UPDATE task_broker.audit SET line = replace(line, '"actor":"me"', '"actor":"mE"') WHERE seq = (SELECT max(seq) FROM task_broker.audit)`);
  const refused = await s.append({ type: 'test.after-tamper', actor: 'me' }).catch((e: unknown) => e);
  assert.ok(isBrokerError(refused) && refused.code === 'audit_chain_broken', String(refused));
  assert.equal(s.healthy, false);
});
