/**
 * The credential endpoint with a token in memory, under load (autocannon: 50 connections, 2 s warm-up,
 * then 10 s measured), against a baseline measured in the same run: a bare fastify route in its own
 * Node process answering a JSON body of the same size (bench/bare-server.ts). The measured seconds of
 * both are taken in alternating slices (--rounds, default 2 x 5 s each), so a drift of the machine
 * during the run weighs on both alike.
 *
 * Goals: broker >= 0.5x the bare route's requests/s; broker p99 <= 10 ms; every served credential is on
 * the audit log (fdatasync'd before its reply: AuditLog.append), so after the run the log holds at
 * least as many credential.served records as there were 2xx answers, and its chain verifies.
 *
 *   node bench/credential.ts [--connections 50] [--duration 10] [--warmup 2] [--rounds 2] [--profile DIR]
 *
 * --profile DIR runs the broker with `--cpu-prof --cpu-prof-dir=DIR` (the profile is written when it
 * stops at the end of the run).
 */
import { createRequire } from 'node:module';
import { parseArgs } from 'node:util';
import { verifyAuditFile } from '../src/audit/verify.ts';
import { DEFAULT_TIMINGS, met, spawnListening, table, withEnv } from './_common.ts';

interface CannonResult {
  requests: { average: number; total: number };
  latency: { p50: number; p99: number; average: number; max: number };
  '2xx': number;
  non2xx: number;
  errors: number;
  timeouts: number;
}
// autocannon is CommonJS and ships no type declarations: load it with require, typed here.
const autocannon = createRequire(import.meta.url)('autocannon') as (opts: Record<string, unknown>) => Promise<CannonResult>;

const { values: flags } = parseArgs({
  options: {
    connections: { type: 'string', default: '50' },
    duration: { type: 'string', default: '10' },
    warmup: { type: 'string', default: '2' },
    rounds: { type: 'string', default: '2' },
    profile: { type: 'string' },
  },
});
const connections = Number(flags.connections);
const duration = Number(flags.duration);
const warmup = Number(flags.warmup);
const rounds = Number(flags.rounds);

interface Measured {
  rps: number;
  p50: number;
  p99: number;
  max: number;
  ok: number;
  non2xx: number;
  errors: number;
}

/** `duration` seconds of load in `rounds` slices; figures over the slices (worst slice for latency). */
function combine(runs: CannonResult[]): Measured {
  return {
    rps: runs.reduce((a, r) => a + r.requests.average, 0) / runs.length,
    p50: Math.max(...runs.map((r) => r.latency.p50)),
    p99: Math.max(...runs.map((r) => r.latency.p99)),
    max: Math.max(...runs.map((r) => r.latency.max)),
    ok: runs.reduce((a, r) => a + r['2xx'], 0),
    non2xx: runs.reduce((a, r) => a + r.non2xx, 0),
    errors: runs.reduce((a, r) => a + r.errors + r.timeouts, 0),
  };
}

await withEnv(async (env) => {
  const broker = await env.startBroker({
    extraArgs: DEFAULT_TIMINGS,
    ...(flags.profile ? { env: { NODE_OPTIONS: `--cpu-prof --cpu-prof-dir=${flags.profile}` } } : {}),
  });
  const token = await env.agentToken('alpha');
  const start = await broker.request('POST', '/v1/tasks', token, { template: 'read-pods', namespace: 'team-a', name: 'bench', ttl: '1h' });
  if (start.status !== 201) throw new Error(`task start: ${start.status} ${JSON.stringify(start.body)}`);
  // Mint once: every request under load is then served from memory (credential.served).
  const first = await broker.request('POST', '/v1/tasks/bench/credential', token);
  if (first.status !== 200) throw new Error(`credential: ${first.status} ${JSON.stringify(first.body)}`);
  const answerBytes = JSON.stringify(first.body).length;
  const bare = await spawnListening(new URL('./bare-server.ts', import.meta.url).pathname, [String(first.body.token.length)]);
  try {
    const servedBefore = broker.auditRecords().filter((r) => r.type === 'credential.served').length;

    // Warm-up of both, then the measured time in alternating slices (bare, broker, bare, broker, ...)
    // so that drift of the machine during the run affects both alike.
    const target = (url: string) => ({ url: `${url}/v1/tasks/bench/credential`, method: 'POST', headers: { authorization: `Bearer ${token}` }, connections, pipelining: 1 });
    const warm = [await autocannon({ ...target(bare.url), duration: warmup }), await autocannon({ ...target(broker.url), duration: warmup })];
    const baseRuns: CannonResult[] = [];
    const ourRuns: CannonResult[] = [];
    for (let r = 0; r < rounds; r++) {
      baseRuns.push(await autocannon({ ...target(bare.url), duration: duration / rounds }));
      ourRuns.push(await autocannon({ ...target(broker.url), duration: duration / rounds }));
    }
    const base = combine(baseRuns);
    const ours = combine(ourRuns);
    const brokerWarm = combine([warm[1]!]);

    await broker.stop(); // graceful: closes the audit log (and writes the profile when asked)
    const records = broker.auditRecords();
    const served = records.filter((r) => r.type === 'credential.served').length - servedBefore;
    const ok2xx = brokerWarm.ok + ours.ok;
    const chain = await verifyAuditFile(broker.auditLog);

    const ratio = ours.rps / base.rps;
    const row = (what: string, m: Measured) => [what, Math.round(m.rps), `${m.p50} ms`, `${m.p99} ms`, `${m.max} ms`, m.ok, m.non2xx, m.errors];
    console.log(`credential endpoint, token in memory: autocannon ${connections} connections, ${warmup} s warm-up, then ${duration} s measured each in ${rounds} alternating slices; loopback; answer ${answerBytes} bytes`);
    console.log(table(['', 'requests/s', 'p50', 'p99', 'max', '2xx', 'non-2xx', 'errors'], [row('bare fastify route (baseline)', base), row('broker credential', ours)]));
    console.log('(latency: the worse slice; autocannon reports whole milliseconds)');
    console.log('');
    console.log(
      table(
        ['goal', 'figure', 'result'],
        [
          ['throughput >= 0.5x bare route', `${ratio.toFixed(2)}x`, met(ratio >= 0.5)],
          ['p99 <= 10 ms', `${ours.p99} ms`, met(ours.p99 <= 10)],
          ['credential.served records >= 2xx answers', `${served} records / ${ok2xx} 2xx (warm-up included)`, met(served >= ok2xx && ok2xx > 0)],
          ['audit chain verifies', chain.ok ? `ok, ${chain.records} records` : JSON.stringify(chain), met(chain.ok)],
          ['no errors, no non-2xx', `${brokerWarm.non2xx + ours.non2xx} non-2xx, ${brokerWarm.errors + ours.errors} errors`, met(brokerWarm.non2xx + ours.non2xx + brokerWarm.errors + ours.errors === 0)],
        ],
      ),
    );
  } finally {
    bare.child.kill('SIGKILL');
  }
});
