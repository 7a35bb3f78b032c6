/**
 * The credential endpoint with a token in memory, under load (autocannon: 50 connections, 2 s warm-up,
 * then 10 s measured), against two baselines measured in the same run: a bare fastify route in its own
 * Node process answering a JSON body of the same size (bench/bare-server.ts), and a second broker with
 * every limit of src/server/limits.ts turned off. The broker under test runs with its limits on: the
 * defaults, except the per-source and per-identity budgets raised out of reach (one address and one
 * identity make all the load here), so what is measured is what the checks cost, not their refusals.
 * The measured seconds of all three are taken in alternating slices (--rounds, default 4 x 2.5 s each),
 * so a drift of the machine during the run weighs on all alike.
 *
 * Goals: broker >= 0.5x the bare route's requests/s; limits on >= 0.9x limits off; broker p99 <= 10 ms;
 * every served credential is on the audit log (fdatasync'd before its reply: AuditLog.append), so after
 * the run each log holds at least as many credential.served records as there were 2xx answers, and
 * its chain verifies.
 *
 *   bin/bench credential [--connections 50] [--duration 10] [--warmup 2] [--rounds 4] [--profile DIR]
 *
 * BENCH_AA=1 runs both brokers with their limits off: the ratio then shows the noise of the comparison.
 *
 * --profile DIR runs the broker with `--cpu-prof --cpu-prof-dir=DIR` (the profile is written when it
 * stops at the end of the run).
 */
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
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
    rounds: { type: 'string', default: '4' },
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

/** Limits on, out of reach of this load (what is measured is their cost). */
const LIMITS_ON = ['--rate-limit-source', '100000000/1s', '--rate-limit-identity', '100000000/1s', '--max-connections-per-source', String(Math.max(64, connections + 16))];
/** Every limit off. */
const LIMITS_OFF = [
  ...['--rate-limit-source', 'off', '--auth-failure-limit', 'off', '--rate-limit-identity', 'off', '--max-token-reviews', '0'],
  ...['--max-connections', '0', '--max-connections-per-source', '0', '--request-timeout', 'off', '--headers-timeout', 'off', '--connection-timeout', 'off'],
];

await withEnv(async (env) => {
  // A third broker, started first, takes the sweeper Lease and starts the task: whichever broker
  // does that measured 4 to 7 % slower than an identical one in an A/A run of this benchmark, so it
  // is neither of the two compared.
  const leader = await env.startBroker({ auditLog: join(env.dir, 'audit-leader.jsonl'), extraArgs: DEFAULT_TIMINGS });
  const broker = await env.startBroker({
    auditLog: join(env.dir, 'audit-limits-on.jsonl'),
    extraArgs: [...DEFAULT_TIMINGS, ...(process.env['BENCH_AA'] ? LIMITS_OFF : LIMITS_ON)],
    ...(flags.profile ? { env: { NODE_OPTIONS: `--cpu-prof --cpu-prof-dir=${flags.profile}` } } : {}),
  });
  const unlimited = await env.startBroker({ auditLog: join(env.dir, 'audit-limits-off.jsonl'), extraArgs: [...DEFAULT_TIMINGS, ...LIMITS_OFF] });
  const token = await env.agentToken('alpha');
  const start = await leader.request('POST', '/v1/tasks', token, { template: 'read-pods', namespace: 'team-a', name: 'bench', ttl: '1h' });
  if (start.status !== 201) throw new Error(`task start: ${start.status} ${JSON.stringify(start.body)}`);
  // Each measured broker learns of the task from its watch and mints its token once: every request
  // under load is then served from memory (credential.served).
  const mintOnce = async (b: typeof broker) => {
    for (let i = 0; ; i++) {
      const res = await b.request('POST', '/v1/tasks/bench/credential', token);
      if (res.status === 200 || i === 50) return res;
      await sleep(100);
    }
  };
  const first = await mintOnce(broker);
  if (first.status !== 200) throw new Error(`credential: ${first.status} ${JSON.stringify(first.body)}`);
  const firstOff = await mintOnce(unlimited);
  if (firstOff.status !== 200) throw new Error(`credential (limits off): ${firstOff.status} ${JSON.stringify(firstOff.body)}`);
  const answerBytes = JSON.stringify(first.body).length;
  const bare = await spawnListening(new URL('./bare-server.ts', import.meta.url).pathname, [String(first.body.token.length)]);
  try {
    const servedBefore = broker.auditRecords().filter((r) => r.type === 'credential.served').length;
    const servedBeforeOff = unlimited.auditRecords().filter((r) => r.type === 'credential.served').length;

    // Warm-up of all three, then the measured time in alternating slices (bare, limits on, limits
    // off, bare, ...) so that drift of the machine during the run affects all alike.
    const target = (url: string) => ({ url: `${url}/v1/tasks/bench/credential`, method: 'POST', headers: { authorization: `Bearer ${token}` }, connections, pipelining: 1 });
    const warm = [bare.url, broker.url, unlimited.url];
    const warmRuns: CannonResult[] = [];
    for (const url of warm) warmRuns.push(await autocannon({ ...target(url), duration: warmup }));
    const baseRuns: CannonResult[] = [];
    const ourRuns: CannonResult[] = [];
    const offRuns: CannonResult[] = [];
    for (let r = 0; r < rounds; r++) {
      baseRuns.push(await autocannon({ ...target(bare.url), duration: duration / rounds }));
      // The two brokers in turn first (on, off; then off, on; ...), so neither always takes the same place.
      for (const which of r % 2 ? ['off', 'on'] : ['on', 'off']) {
        if (which === 'on') ourRuns.push(await autocannon({ ...target(broker.url), duration: duration / rounds }));
        else offRuns.push(await autocannon({ ...target(unlimited.url), duration: duration / rounds }));
      }
    }
    const base = combine(baseRuns);
    const ours = combine(ourRuns);
    const off = combine(offRuns);
    const brokerWarm = combine([warmRuns[1]!]);
    const offWarm = combine([warmRuns[2]!]);

    await broker.stop(); // graceful: closes the audit log (and writes the profile when asked)
    await unlimited.stop();
    const served = broker.auditRecords().filter((r) => r.type === 'credential.served').length - servedBefore;
    const servedOff = unlimited.auditRecords().filter((r) => r.type === 'credential.served').length - servedBeforeOff;
    const ok2xx = brokerWarm.ok + ours.ok;
    const ok2xxOff = offWarm.ok + off.ok;
    const chain = await verifyAuditFile(broker.auditLog);
    const chainOff = await verifyAuditFile(unlimited.auditLog);
    const non2xx = brokerWarm.non2xx + ours.non2xx + offWarm.non2xx + off.non2xx;
    const errors = brokerWarm.errors + ours.errors + offWarm.errors + off.errors;

    const ratio = ours.rps / base.rps;
    // Limits on against off: the median of the ratios of adjacent slices, so one slice disturbed by
    // whatever else runs on the machine does not decide it (the ratio of the means is printed too).
    const ratios = ourRuns.map((r, i) => r.requests.average / offRuns[i]!.requests.average).sort((a, b) => a - b);
    const limitsRatio = (ratios[Math.floor((ratios.length - 1) / 2)]! + ratios[Math.ceil((ratios.length - 1) / 2)]!) / 2;
    const row = (what: string, m: Measured) => [what, Math.round(m.rps), `${m.p50} ms`, `${m.p99} ms`, `${m.max} ms`, m.ok, m.non2xx, m.errors];
    console.log(`credential endpoint, token in memory: autocannon ${connections} connections, ${warmup} s warm-up, then ${duration} s measured each in ${rounds} alternating slices; loopback; answer ${answerBytes} bytes`);
    console.log(
      table(['', 'requests/s', 'p50', 'p99', 'max', '2xx', 'non-2xx', 'errors'], [row('bare fastify route (baseline)', base), row('broker credential, limits on', ours), row('broker credential, limits off', off)]),
    );
    console.log('(latency: the worse slice; autocannon reports whole milliseconds)');
    const slices = (runs: CannonResult[]) => runs.map((r) => Math.round(r.requests.average)).join(' ');
    console.log(`requests/s by slice: bare ${slices(baseRuns)}; limits on ${slices(ourRuns)}; limits off ${slices(offRuns)}`);
    console.log('');
    console.log(
      table(
        ['goal', 'figure', 'result'],
        [
          ['throughput >= 0.5x bare route', `${ratio.toFixed(2)}x`, met(ratio >= 0.5)],
          ['limits on >= 0.9x limits off', `${limitsRatio.toFixed(3)}x (median of ${rounds} paired slices; ratio of means ${(ours.rps / off.rps).toFixed(3)}x)`, met(limitsRatio >= 0.9)],
          ['p99 <= 10 ms', `${ours.p99} ms`, met(ours.p99 <= 10)],
          ['credential.served records >= 2xx answers', `on: ${served} records / ${ok2xx} 2xx; off: ${servedOff} / ${ok2xxOff} (warm-up included)`, met(served >= ok2xx && ok2xx > 0 && servedOff >= ok2xxOff && ok2xxOff > 0)],
          ['audit chains verify', chain.ok && chainOff.ok ? `ok, ${chain.records} and ${chainOff.records} records` : JSON.stringify([chain, chainOff]), met(chain.ok && chainOff.ok)],
          ['no errors, no non-2xx', `${non2xx} non-2xx, ${errors} errors`, met(non2xx + errors === 0)],
        ],
      ),
    );
  } finally {
    bare.child.kill('SIGKILL');
  }
});
