/**
 * What the used-proof table (src/identity/proof-replay.ts: an agent proof used once across replicas on
 * one PostgreSQL audit store) costs the credential endpoint. Two brokers on one store: this tree's, and
 * `--baseline-checkout DIR`'s (an earlier commit, a `git archive` with a node_modules symlink: no
 * table, its proofs checked in memory only). Both answer POST /v1/tasks/bench/credential for an agent
 * that proves its enrolled key, a fresh proof per request, from CLIENTS keep-alive clients in this
 * process (signing costs the same for both); alternating slices. Also, in process: one INSERT into the
 * table, sequential, and 8 at once.
 *
 *   bin/bench proof-replay --baseline-checkout DIR [--clients 8] [--seconds 4] [--rounds 4]
 */
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { Agent, request } from 'node:http';
import { loadavg } from 'node:os';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { migrate, PostgresAuditStore } from '../src/audit/postgres.ts';
import { parseAgentKey, proofHeader, type AgentKey } from '../src/identity/agent-proof.ts';
import { SharedUsedProofs } from '../src/identity/proof-replay.ts';
import { BrokerProcess, POLICY_FILE } from '../test/helpers/broker.ts';
import { TestPostgres } from '../test/helpers/postgres.ts';
import { BrokerEnv, cpuMs, median, percentile, table } from './_common.ts';

const { values: flags } = parseArgs({
  options: {
    'baseline-checkout': { type: 'string' },
    clients: { type: 'string', default: '8' },
    seconds: { type: 'string', default: '4' },
    rounds: { type: 'string', default: '4' },
  },
});
const baseline = flags['baseline-checkout'] ? resolve(flags['baseline-checkout']) : undefined;
if (!baseline) throw new Error('--baseline-checkout DIR is required (a checkout without the used-proof table)');
const clients = Number(flags.clients);
const seconds = Number(flags.seconds);
const rounds = Number(flags.rounds);
const MAIN = new URL('../src/cli/main.ts', import.meta.url).pathname;
const POLICY =
  readFileSync(POLICY_FILE, 'utf8').replace('agents:\n', 'agents:\n  - name: keyed\n').replace('agents: [alpha, beta]', 'agents: [alpha, beta, keyed]') +
  'people:\n  - name: root\n    identities: [{ serviceAccount: agents/admin }]\napprovers:\n  - name: admins\n    members: [{ person: root }]\nadministrators: [admins]\n';
const LIMITS_OFF = [
  ...['--rate-limit-source', 'off', '--auth-failure-limit', 'off', '--rate-limit-identity', 'off', '--max-token-reviews', '0'],
  ...['--max-connections', '0', '--max-connections-per-source', '0', '--request-timeout', 'off', '--headers-timeout', 'off', '--connection-timeout', 'off'],
  ...['--sweep-interval', '1s', '--orphan-grace', '30s', '--lease-duration', '15s'],
];

function cli(args: string[], env: NodeJS.ProcessEnv): string {
  const r = spawnSync(process.execPath, [MAIN, ...args], { encoding: 'utf8', env: { PATH: process.env['PATH'] ?? '/usr/bin:/bin', NO_COLOR: '1', ...env } });
  if (r.status !== 0) throw new Error(`broker ${args[0]} ${args[1]}: ${r.stderr}`);
  return r.stdout;
}

/** CLIENTS loops, each a fresh proof per request on a keep-alive connection, for `ms`: answers and latencies. */
async function load(url: string, key: AgentKey, ms: number): Promise<{ ok: number; other: number; latencies: number[] }> {
  const u = new URL(`${url}/v1/tasks/bench/credential`);
  const agent = new Agent({ keepAlive: true, maxSockets: clients });
  const latencies: number[] = [];
  let ok = 0;
  let other = 0;
  const end = Date.now() + ms;
  const one = () =>
    new Promise<number>((done, fail) => {
      const req = request({ host: u.hostname, port: u.port, path: u.pathname, method: 'POST', agent, headers: { authorization: proofHeader(key, 'POST', u.href), 'content-length': 0 } }, (res) => {
        res.resume();
        res.on('end', () => done(res.statusCode ?? 0));
      });
      req.on('error', fail);
      req.end();
    });
  await Promise.all(
    Array.from({ length: clients }, async () => {
      while (Date.now() < end) {
        const t = process.hrtime.bigint();
        const status = await one();
        latencies.push(Number(process.hrtime.bigint() - t) / 1e6);
        if (status === 200) ok++;
        else other++;
      }
    }),
  );
  agent.destroy();
  return { ok, other, latencies };
}

const pg = await TestPostgres.start();
const env = await BrokerEnv.start({
  policyText: POLICY,
  beforeApply: async (kube) => {
    await kube.core.createNamespacedServiceAccount({ namespace: 'agents', body: { metadata: { name: 'admin' } } }).catch(() => undefined);
  },
});
const brokers: BrokerProcess[] = [];
try {
  await migrate(pg.url('postgres'), ['task_broker']);
  const store = pg.url('task_broker');
  const serveArgs = (main: string) => [main, 'serve', '--config', env.policyFile, '--audit-store', store, '--kubeconfig', env.brokerKubeconfig, '--listen', '127.0.0.1:0', '--insecure-http', ...LIMITS_OFF];
  const ours = await BrokerProcess.spawn(serveArgs(MAIN), store);
  brokers.push(ours);
  const theirs = await BrokerProcess.spawn(serveArgs(join(baseline, 'src/cli/main.ts')), store);
  brokers.push(theirs);
  const admin = await env.agentToken('admin');
  const code = JSON.parse(cli(['agent', 'register', 'keyed', '-o', 'json'], { BROKER_URL: ours.url, BROKER_IDENTITY_TOKEN: admin })).code as string;
  const text = /^BROKER_AGENT_KEY=(\S+)\n$/.exec(cli(['agent', 'enroll', code, '--print-key'], { BROKER_URL: ours.url }))![1]!;
  const key = parseAgentKey(text);
  cli(['task', 'start', 'read-pods', '--namespace', 'team-a', '--name', 'bench', '--ttl', '30m'], { BROKER_URL: ours.url, BROKER_AGENT_KEY: text });
  for (const b of [ours, theirs]) {
    const warm = await load(b.url, key, 1500); // the baseline's watch sees the key; both warm up
    if (warm.ok === 0) throw new Error(`no 200 from ${b.url} in the warm-up`);
  }
  const arms = [
    { name: 'this tree (used-proof table)', broker: ours, rps: [] as number[], lat: [] as number[], cpu: [] as number[], other: 0 },
    { name: 'baseline (memory only)', broker: theirs, rps: [] as number[], lat: [] as number[], cpu: [] as number[], other: 0 },
  ];
  for (let r = 0; r < rounds; r++) {
    for (const arm of r % 2 === 0 ? arms : [...arms].reverse()) {
      const cpu0 = cpuMs(arm.broker.pid);
      const res = await load(arm.broker.url, key, seconds * 1000);
      arm.cpu.push(((cpuMs(arm.broker.pid) - cpu0) * 1000) / Math.max(1, res.ok));
      arm.rps.push(res.ok / seconds);
      arm.lat.push(...res.latencies);
      arm.other += res.other;
    }
  }
  // In process: the INSERT alone, against the same database.
  const db = await PostgresAuditStore.open(store);
  const used = new SharedUsedProofs(db);
  const seq: number[] = [];
  for (let i = 0; i < 1000; i++) {
    const t = process.hrtime.bigint();
    await used.firstUse('bench', `seq-${i}-${Math.random()}`, Math.floor(Date.now() / 1000) + 30);
    seq.push(Number(process.hrtime.bigint() - t) / 1e6);
  }
  const par: number[] = [];
  for (let i = 0; i < 200; i++) {
    await Promise.all(
      Array.from({ length: 8 }, async (_, j) => {
        const t = process.hrtime.bigint();
        await used.firstUse('bench', `par-${i}-${j}-${Math.random()}`, Math.floor(Date.now() / 1000) + 30);
        par.push(Number(process.hrtime.bigint() - t) / 1e6);
      }),
    );
  }
  await db.close();
  const [a, b] = arms as [(typeof arms)[0], (typeof arms)[0]];
  console.log(`load average ${loadavg().map((x) => x.toFixed(1)).join(' ')}; ${clients} clients, ${rounds} rounds of ${seconds} s each, alternating`);
  console.log(
    table(
      ['', 'requests/s (median of slices)', 'p50', 'p99', 'broker CPU per answer', 'non-200'],
      arms.map((x) => [x.name, median(x.rps).toFixed(0), `${percentile(x.lat, 50).toFixed(2)} ms`, `${percentile(x.lat, 99).toFixed(2)} ms`, `${median(x.cpu).toFixed(0)} us`, x.other]),
    ),
  );
  console.log(`this tree / baseline: ${(median(a.rps) / median(b.rps)).toFixed(3)}x requests/s; p50 ${(percentile(a.lat, 50) - percentile(b.lat, 50)).toFixed(2)} ms more`);
  console.log(`one INSERT into ${'task_broker.used_proofs'} in process: sequential p50 ${percentile(seq, 50).toFixed(2)} ms, p99 ${percentile(seq, 99).toFixed(2)} ms; 8 at once p50 ${percentile(par, 50).toFixed(2)} ms, p99 ${percentile(par, 99).toFixed(2)} ms`);
} finally {
  for (const b of brokers) await b.stop().catch(() => undefined);
  await env.stop();
  await pg.remove();
}
