/**
 * The credential endpoint (token in memory: every answer is one credential.served record, durable
 * before the reply) with the PostgreSQL audit store against the same broker with the file log, in
 * the same run: autocannon, alternating slices, both brokers with every limit off (what is measured
 * is the store). A third broker, with a file log, takes the sweeper Lease and starts the task. After
 * the run, each store must hold at least as many credential.served records as there were 2xx answers,
 * and its chain must verify. Goal (issue 16): PostgreSQL >= 0.8x the file log.
 *
 * Besides requests/s it prints each broker's CPU per request (user + system, all threads, from /proc),
 * the database server's (the postmaster and its backends, the WAL writer included) and the store's
 * transactions (pg_stat_database xact_commit): records per transaction is its group commit.
 *
 *   bin/bench credential-postgres [--connections 50] [--duration 8] [--warmup 2] [--rounds 4] [--profile DIR]
 *
 * --profile DIR runs the broker with the store under `--cpu-prof --cpu-prof-dir=DIR`.
 *
 * --baseline-checkout DIR adds a third broker: another checkout's (DIR/src/cli/main.ts, e.g. a `git
 * archive` of the parent commit with a node_modules symlink) with the store, on a database of its
 * own on the same server, in the same alternating slices: a before/after of a store change in one run.
 */
import { readdirSync } from 'node:fs';
import { loadavg } from 'node:os';
import { join, resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs } from 'node:util';
import { migrate, PostgresAuditReader } from '../src/audit/postgres.ts';
import { verifyAuditFile } from '../src/audit/verify.ts';
import { TestPostgres } from '../test/helpers/postgres.ts';
import { autocannon, type CannonResult, cpuMs, DEFAULT_TIMINGS, procStat, reapedChildrenCpuMs, startCheckoutBroker, table, withEnv } from './_common.ts';


const { values: flags } = parseArgs({
  options: {
    connections: { type: 'string', default: '50' },
    duration: { type: 'string', default: '8' },
    warmup: { type: 'string', default: '2' },
    rounds: { type: 'string', default: '4' },
    profile: { type: 'string' },
    'baseline-checkout': { type: 'string' },
  },
});
const connections = Number(flags.connections);
const duration = Number(flags.duration);
const warmup = Number(flags.warmup);
const rounds = Number(flags.rounds);
const baselineCheckout = flags['baseline-checkout'] ? resolve(flags['baseline-checkout']) : undefined;
const LIMITS_OFF = [
  ...['--rate-limit-source', 'off', '--auth-failure-limit', 'off', '--rate-limit-identity', 'off', '--max-token-reviews', '0'],
  ...['--max-connections', '0', '--max-connections-per-source', '0', '--request-timeout', 'off', '--headers-timeout', 'off', '--connection-timeout', 'off'],
];
const loadAtStart = loadavg().map((l) => l.toFixed(2)).join(' ');

/** CPU time (ms) of a process and its live children, with what its exited children used (the database server: postmaster, backends, WAL writer). */
function treeCpuMs(root: number): number {
  let total = 0;
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    let f: string[];
    try {
      f = procStat(`/proc/${entry}/stat`);
    } catch {
      continue; // gone meanwhile
    }
    const pid = Number(entry);
    if (pid === root) total += cpuMs(pid) + reapedChildrenCpuMs(pid);
    else if (Number(f[1]) === root) total += cpuMs(pid);
  }
  return total;
}

const pg = await TestPostgres.start();
try {
  await migrate(pg.url('postgres'), ['task_broker']);
  if (baselineCheckout) {
    const admin = pg.client('postgres', 'postgres');
    await admin.connect();
    await admin.query('CREATE DATABASE audit_base').finally(() => admin.end());
    await migrate(pg.url('postgres', 'audit_base'), ['task_broker']);
  }
  await withEnv(async (env) => {
    const leader = await env.startBroker({ auditLog: join(env.dir, 'audit-leader.jsonl'), extraArgs: DEFAULT_TIMINGS });
    // The request log into a FIFO drained by cat (as bench/credential.ts does, and for the same reason).
    const logTo = (name: string) => {
      const fifo = join(env.dir, `${name}.fifo`);
      return { shellPrefix: `mkfifo '${fifo}' && { cat '${fifo}' >/dev/null & } && exec 2>'${fifo}';` };
    };
    const file = await env.startBroker({ auditLog: join(env.dir, 'audit-file.jsonl'), extraArgs: [...DEFAULT_TIMINGS, ...LIMITS_OFF], ...logTo('file') });
    const store = await env.startBroker({
      auditStore: pg.url('task_broker'),
      extraArgs: [...DEFAULT_TIMINGS, ...LIMITS_OFF],
      ...(flags.profile ? { env: { NODE_OPTIONS: `--cpu-prof --cpu-prof-dir=${resolve(flags.profile)}` } } : {}),
      ...logTo('store'),
    });
    const base = baselineCheckout
      ? await startCheckoutBroker(env, baselineCheckout, { auditStore: pg.url('task_broker', 'audit_base'), extraArgs: [...DEFAULT_TIMINGS, ...LIMITS_OFF], ...logTo('base') })
      : undefined;
    const token = await env.agentToken('alpha');
    const start = await leader.request('POST', '/v1/tasks', token, { template: 'read-pods', namespace: 'team-a', name: 'bench', ttl: '1h' });
    if (start.status !== 201) throw new Error(`task start: ${start.status} ${JSON.stringify(start.body)}`);
    interface Measured {
      name: string;
      broker: typeof file;
      database?: string;
      runs: CannonResult[];
      warm?: CannonResult;
      cpu: number;
      db: number;
      commits: number;
      before: number;
      /** Its measured slices on the monotonic clock (us), for profile-summary --windows. */
      windows: string[];
    }
    const brokers: Measured[] = [
      { name: 'file log', broker: file, runs: [], cpu: 0, db: 0, commits: 0, before: 0, windows: [] },
      { name: 'PostgreSQL store', broker: store, database: 'audit', runs: [], cpu: 0, db: 0, commits: 0, before: 0, windows: [] },
      ...(base ? [{ name: 'PostgreSQL store, baseline checkout', broker: base, database: 'audit_base', runs: [], cpu: 0, db: 0, commits: 0, before: 0, windows: [] }] : []),
    ];
    for (const { broker: b } of brokers) {
      for (let i = 0; ; i++) {
        const res = await b.request('POST', '/v1/tasks/bench/credential', token);
        if (res.status === 200) break;
        if (i === 50) throw new Error(`credential: ${res.status} ${JSON.stringify(res.body)}`);
        await sleep(100);
      }
    }
    const servedIn = async (database: string) => {
      const reader = new PostgresAuditReader(pg.url('task_broker', database));
      const records = await reader.read();
      return { served: records.filter((r) => r.type === 'credential.served').length, chain: reader.result(true) };
    };
    const served = async (m: Measured) => (m.database ? await servedIn(m.database) : { served: m.broker.auditRecords().filter((r) => r.type === 'credential.served').length, chain: await verifyAuditFile(m.broker.auditLog) });
    for (const m of brokers) m.before = (await served(m)).served;

    const target = (url: string) => ({ url: `${url}/v1/tasks/bench/credential`, method: 'POST', headers: { authorization: `Bearer ${token}` }, connections, pipelining: 1 });
    for (const m of brokers) m.warm = await autocannon({ ...target(m.broker.url), duration: warmup });
    const commits = async (database: string) => Number((await pg.query<{ n: string }>('postgres', `SELECT xact_commit::text AS n FROM pg_stat_database WHERE datname = '${database}'`)).rows[0]!.n);
    // CPU (ms) of each broker and of the database server over its measured slices; its store's commits.
    for (let r = 0; r < rounds; r++) {
      // Each round in another order (rotated), so that none always takes the same place.
      for (let k = 0; k < brokers.length; k++) {
        const m = brokers[(k + r) % brokers.length]!;
        const c0 = cpuMs(m.broker.pid);
        const d0 = treeCpuMs(pg.pid!);
        const x0 = m.database ? await commits(m.database) : 0;
        const w0 = process.hrtime.bigint() / 1000n;
        m.runs.push(await autocannon({ ...target(m.broker.url), duration: duration / rounds }));
        m.windows.push(`${w0}-${process.hrtime.bigint() / 1000n}`);
        m.db += treeCpuMs(pg.pid!) - d0;
        m.cpu += cpuMs(m.broker.pid) - c0;
        if (m.database) m.commits += (await commits(m.database)) - x0;
      }
    }
    for (const m of brokers) await m.broker.stop();
    const ok = (runs: CannonResult[]) => runs.reduce((a, r) => a + r['2xx'], 0);
    const rps = (runs: CannonResult[]) => runs.reduce((a, r) => a + r.requests.average, 0) / runs.length;
    const row = (m: Measured) => [
      `broker, ${m.name}`,
      Math.round(rps(m.runs)),
      `${Math.max(...m.runs.map((r) => r.latency.p50))} ms`,
      `${Math.max(...m.runs.map((r) => r.latency.p99))} ms`,
      ok(m.runs),
      m.runs.reduce((a, r) => a + r.non2xx, 0),
      m.runs.reduce((a, r) => a + r.errors + r.timeouts, 0),
    ];
    console.log(`credential endpoint, token in memory: autocannon ${connections} connections, ${warmup} s warm-up, then ${duration} s measured each in ${rounds} alternating slices; limits off`);
    console.log(table(['', 'requests/s', 'p50', 'p99', '2xx', 'non-2xx', 'errors'], brokers.map(row)));
    console.log(`requests/s by slice: ${brokers.map((m) => `${m.name} ${m.runs.map((r) => Math.round(r.requests.average)).join(' ')}`).join('; ')}`);
    const total = (runs: CannonResult[]) => runs.reduce((a, r) => a + r.requests.total, 0);
    const us = (ms: number, runs: CannonResult[]) => `${((1000 * ms) / total(runs)).toFixed(1)} us`;
    console.log(`CPU per request (user + system, all threads), the broker; the database server (postmaster, backends, WAL writer) in the same slices:`);
    for (const m of brokers) {
      const tx = m.database ? `; ${m.commits} transactions, ${(total(m.runs) / Math.max(1, m.commits)).toFixed(1)} records each, ${(m.commits / duration).toFixed(0)}/s` : '';
      console.log(`  ${m.name}: ${us(m.cpu, m.runs)}; database ${us(m.db, m.runs)}${tx}`);
    }
    const ratio = rps(brokers[1]!.runs) / rps(brokers[0]!.runs);
    console.log(`PostgreSQL store / file log: ${ratio.toFixed(2)}x (goal >= 0.8x: ${ratio >= 0.8 ? 'met' : 'not met'})`);
    if (base) {
      const b = brokers[2]!;
      const paired = brokers[1]!.runs.map((r, i) => r.requests.average / b.runs[i]!.requests.average).sort((x, y) => x - y);
      const median = (paired[Math.floor((paired.length - 1) / 2)]! + paired[Math.ceil((paired.length - 1) / 2)]!) / 2;
      console.log(`baseline checkout's store / file log: ${(rps(b.runs) / rps(brokers[0]!.runs)).toFixed(2)}x; this tree's store / the baseline's: ${(rps(brokers[1]!.runs) / rps(b.runs)).toFixed(2)}x (median of paired slices ${median.toFixed(2)}x)`);
    }
    let failed = false;
    const recorded: string[] = [];
    for (const m of brokers) {
      const after = await served(m);
      const answers = ok(m.runs) + m.warm!['2xx'];
      recorded.push(`${m.name} ${after.served - m.before} credential.served for ${answers} answers, chain ${after.chain.ok ? 'holds' : 'BROKEN'}`);
      if (after.served - m.before < answers || !after.chain.ok) failed = true;
    }
    console.log(`recorded: ${recorded.join('; ')}`);
    if (flags.profile) {
      const m = brokers[1]!;
      console.log(`profile of the broker with the store, its measured slices only: bin/bench profile-summary ${resolve(flags.profile)}/CPU.*.${m.broker.pid}.*.cpuprofile 30 --windows ${m.windows.join(',')} --requests ${total(m.runs)}`);
    }
    console.log(`load average at the start: ${loadAtStart}; at the end: ${loadavg().map((l) => l.toFixed(2)).join(' ')}`);
    if (failed) {
      process.exitCode = 1;
      console.log('FAILED: an answered credential is not on its store, or a chain does not hold');
    }
  });
} finally {
  await pg.remove();
}
