/**
 * The credential endpoint (token in memory: every answer is one credential.served record, durable
 * before the reply) with the PostgreSQL audit store against the same broker with the file log, in
 * the same run: autocannon, alternating slices, both brokers with every limit off (what is measured
 * is the store). A third broker, with a file log, takes the sweeper Lease and starts the task. After
 * the run, each store must hold at least as many credential.served records as there were 2xx answers,
 * and its chain must verify. Goal (issue 16): PostgreSQL >= 0.8x the file log.
 *
 *   bin/bench credential-postgres [--connections 50] [--duration 8] [--warmup 2] [--rounds 4]
 */
import { loadavg } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs } from 'node:util';
import { migrate, PostgresAuditReader } from '../src/audit/postgres.ts';
import { verifyAuditFile } from '../src/audit/verify.ts';
import { TestPostgres } from '../test/helpers/postgres.ts';
import { autocannon, type CannonResult, DEFAULT_TIMINGS, table, withEnv } from './_common.ts';


const { values: flags } = parseArgs({
  options: {
    connections: { type: 'string', default: '50' },
    duration: { type: 'string', default: '8' },
    warmup: { type: 'string', default: '2' },
    rounds: { type: 'string', default: '4' },
  },
});
const connections = Number(flags.connections);
const duration = Number(flags.duration);
const warmup = Number(flags.warmup);
const rounds = Number(flags.rounds);
const LIMITS_OFF = [
  ...['--rate-limit-source', 'off', '--auth-failure-limit', 'off', '--rate-limit-identity', 'off', '--max-token-reviews', '0'],
  ...['--max-connections', '0', '--max-connections-per-source', '0', '--request-timeout', 'off', '--headers-timeout', 'off', '--connection-timeout', 'off'],
];
const loadAtStart = loadavg().map((l) => l.toFixed(2)).join(' ');

const pg = await TestPostgres.start();
try {
  await migrate(pg.url('postgres'), ['task_broker']);
  await withEnv(async (env) => {
    const leader = await env.startBroker({ auditLog: join(env.dir, 'audit-leader.jsonl'), extraArgs: DEFAULT_TIMINGS });
    // The request log into a FIFO drained by cat (as bench/credential.ts does, and for the same reason).
    const logTo = (name: string) => {
      const fifo = join(env.dir, `${name}.fifo`);
      return { shellPrefix: `mkfifo '${fifo}' && { cat '${fifo}' >/dev/null & } && exec 2>'${fifo}';` };
    };
    const file = await env.startBroker({ auditLog: join(env.dir, 'audit-file.jsonl'), extraArgs: [...DEFAULT_TIMINGS, ...LIMITS_OFF], ...logTo('file') });
    const store = await env.startBroker({ auditStore: pg.url('task_broker'), extraArgs: [...DEFAULT_TIMINGS, ...LIMITS_OFF], ...logTo('store') });
    const token = await env.agentToken('alpha');
    const start = await leader.request('POST', '/v1/tasks', token, { template: 'read-pods', namespace: 'team-a', name: 'bench', ttl: '1h' });
    if (start.status !== 201) throw new Error(`task start: ${start.status} ${JSON.stringify(start.body)}`);
    for (const b of [file, store]) {
      for (let i = 0; ; i++) {
        const res = await b.request('POST', '/v1/tasks/bench/credential', token);
        if (res.status === 200) break;
        if (i === 50) throw new Error(`credential: ${res.status} ${JSON.stringify(res.body)}`);
        await sleep(100);
      }
    }
    const servedIn = async () => {
      const reader = new PostgresAuditReader(pg.url('task_broker'));
      const records = await reader.read();
      return { served: records.filter((r) => r.type === 'credential.served').length, chain: reader.result(true) };
    };
    const fileBefore = file.auditRecords().filter((r) => r.type === 'credential.served').length;
    const storeBefore = (await servedIn()).served;

    const target = (url: string) => ({ url: `${url}/v1/tasks/bench/credential`, method: 'POST', headers: { authorization: `Bearer ${token}` }, connections, pipelining: 1 });
    const warm = [await autocannon({ ...target(file.url), duration: warmup }), await autocannon({ ...target(store.url), duration: warmup })];
    const fileRuns: CannonResult[] = [];
    const storeRuns: CannonResult[] = [];
    for (let r = 0; r < rounds; r++) {
      for (const which of r % 2 ? ['store', 'file'] : ['file', 'store']) {
        if (which === 'file') fileRuns.push(await autocannon({ ...target(file.url), duration: duration / rounds }));
        else storeRuns.push(await autocannon({ ...target(store.url), duration: duration / rounds }));
      }
    }
    await file.stop();
    await store.stop();
    const ok = (runs: CannonResult[]) => runs.reduce((a, r) => a + r['2xx'], 0);
    const fileServed = file.auditRecords().filter((r) => r.type === 'credential.served').length - fileBefore;
    const fileChain = await verifyAuditFile(file.auditLog);
    const after = await servedIn();
    const storeServed = after.served - storeBefore;
    const rps = (runs: CannonResult[]) => runs.reduce((a, r) => a + r.requests.average, 0) / runs.length;
    const row = (what: string, runs: CannonResult[]) => [
      what,
      Math.round(rps(runs)),
      `${Math.max(...runs.map((r) => r.latency.p50))} ms`,
      `${Math.max(...runs.map((r) => r.latency.p99))} ms`,
      ok(runs),
      runs.reduce((a, r) => a + r.non2xx, 0),
      runs.reduce((a, r) => a + r.errors + r.timeouts, 0),
    ];
    console.log(`credential endpoint, token in memory: autocannon ${connections} connections, ${warmup} s warm-up, then ${duration} s measured each in ${rounds} alternating slices; limits off`);
    console.log(table(['', 'requests/s', 'p50', 'p99', '2xx', 'non-2xx', 'errors'], [row('broker, file log', fileRuns), row('broker, PostgreSQL store', storeRuns)]));
    console.log(`requests/s by slice: file ${fileRuns.map((r) => Math.round(r.requests.average)).join(' ')}; postgres ${storeRuns.map((r) => Math.round(r.requests.average)).join(' ')}`);
    const ratio = rps(storeRuns) / rps(fileRuns);
    console.log(`PostgreSQL store / file log: ${ratio.toFixed(2)}x (goal >= 0.8x: ${ratio >= 0.8 ? 'met' : 'not met'})`);
    const fileOk = ok(fileRuns) + warm[0]!['2xx'];
    const storeOk = ok(storeRuns) + warm[1]!['2xx'];
    console.log(`recorded: file log ${fileServed} credential.served for ${fileOk} answers, chain ${fileChain.ok ? 'holds' : 'BROKEN'}; store ${storeServed} for ${storeOk} answers, chain ${after.chain.ok ? 'holds' : 'BROKEN'}`);
    console.log(`load average at the start: ${loadAtStart}; at the end: ${loadavg().map((l) => l.toFixed(2)).join(' ')}`);
    if (fileServed < fileOk || storeServed < storeOk || !fileChain.ok || !after.chain.ok) {
      process.exitCode = 1;
      console.log('FAILED: an answered credential is not on its store, or a chain does not hold');
    }
  });
} finally {
  await pg.remove();
}
