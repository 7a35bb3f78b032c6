/**
 * Scale (issue 16): three `broker serve` replicas on one local control plane (the API server alone),
 * sharing one task store (task records are signed Secrets in the task namespace, each replica's view
 * kept by its watch) and one PostgreSQL audit store (the configuration shipped for replicas: one
 * chain, docs/audit.md; `--audit file` gives each replica a file log instead), filled with active
 * tasks in parallel batches until --tasks N are held (default 10 000).
 *
 * At 0 (the baseline, same run), N/10, N/2 and N tasks held:
 *   - start latency: --probe P starts (default 150), one client per replica, each one start after
 *     the other (so what is measured is a start, not the queue of the fill); p50/p99 over all P;
 *   - each replica's RSS (VmRSS from /proc; VmHWM, the peak, beside it) and the API server's;
 *   - how long until every replica's view holds them all (broker_active_tasks of each /metrics).
 *   - CPU a start (user + system from /proc) of the replicas together and of the API server, from
 *     the checkpoint before;
 *   - then --idle S seconds (30: one orphan sweep) with no requests: each replica's and the API
 *     server's CPU a second while they only hold the tasks.
 * The fill's own latencies (--concurrency C starts in flight over the three replicas) are printed by
 * segment too, for the parallel case.
 * At 0 and at N: the credential endpoint under load (autocannon, 50 connections, --cannon S seconds
 * after a 1 s warm-up, one replica), the task named as kubeconfigs name it, and by its id; and one
 * replica restarted (SIGTERM, then the same command again): the time from spawn to `listening on`
 * and to /readyz answering 200, and whether its view then holds every task.
 *
 * Goals (issue 16): start p99 <= 100 ms and RSS <= 300 MB per replica at 10 000 tasks.
 *
 *   bin/bench scale [--tasks 10000] [--agents 50] [--concurrency 24] [--probe 150] [--cannon 4] [--idle 30]
 *                   [--audit postgres|file] [--from dist|src] [--node-options="..."] [--checkout DIR] [--profile DIR]
 *
 * --checkout DIR runs the replicas from another checkout (DIR/dist, built there; a `git archive` of an
 * earlier commit with a node_modules symlink), for before/after figures of a change.
 *
 * The replicas run dist/ (`npx tsc -p tsconfig.json` first; the bench refuses a dist/ older than src/),
 * as `bin/broker` does: run from src/ (--from src), Node's type stripping adds 30 to 40 MB to each RSS.
 *
 * --node-options="..." is the replicas' NODE_OPTIONS (e.g. "--max-semi-space-size=16": V8 sizes the
 * young generation from the heap limit, which it takes from the machine's memory unless told).
 * --profile DIR runs replica 1 with `--cpu-prof --cpu-prof-dir=DIR` (written when it stops, at the end).
 * Everything (the replicas, the control plane, the database, the temporary directories) is removed at
 * the end, also on failure and on Ctrl-C. Agents: --agents A agents in the policy (ServiceAccounts
 * agents/scale-0 ...), broker.limits.activeTasksPerAgent raised to hold N over them.
 */
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { loadavg } from 'node:os';
import { join, resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs } from 'node:util';
import { migrate } from '../src/audit/postgres.ts';
import { BrokerEnv, BrokerProcess } from '../test/helpers/broker.ts';
import { postgresAvailable, TestPostgres } from '../test/helpers/postgres.ts';
import { autocannon, type CannonResult, cpuMs, DEFAULT_TIMINGS, median, met, ms, percentile, table } from './_common.ts';

const { values: flags } = parseArgs({
  options: {
    tasks: { type: 'string', default: '10000' },
    agents: { type: 'string', default: '50' },
    concurrency: { type: 'string', default: '24' },
    probe: { type: 'string', default: '150' },
    cannon: { type: 'string', default: '4' },
    idle: { type: 'string', default: '30' },
    audit: { type: 'string', default: 'postgres' },
    profile: { type: 'string' },
    from: { type: 'string', default: 'dist' },
    'node-options': { type: 'string' },
    checkout: { type: 'string' },
  },
});
const N = Number(flags.tasks);
const AGENTS = Number(flags.agents);
const CONCURRENCY = Number(flags.concurrency);
const PROBE = Number(flags.probe);
const CANNON_S = Number(flags.cannon);
const IDLE_S = Number(flags.idle);
const REPLICAS = 3;
if (flags.from !== 'dist' && flags.from !== 'src') throw new Error('--from: dist or src');
// The replicas run the build as shipped (`bin/broker` runs dist/): Node's type stripping, which runs
// src/*.ts as the tests do, costs 30 to 40 MB of RSS of its own, which a deployed broker does not have.
const ROOT = flags.checkout ? resolve(flags.checkout) : fileURLToPath(new URL('..', import.meta.url));
const MAIN = join(ROOT, flags.from === 'dist' ? 'dist/cli/main.js' : 'src/cli/main.ts');
if (flags.from === 'dist') {
  // Each src/**/*.ts against its dist/**/*.js: a stale build would be measured in place of this tree.
  const src = join(ROOT, 'src');
  const stale = (dir: string): string[] =>
    readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
      const path = join(dir, e.name);
      if (e.isDirectory()) return stale(path);
      if (!e.name.endsWith('.ts') || e.name.endsWith('.d.ts')) return [];
      const built = path.replace(src, src.replace(/src$/, 'dist')).replace(/\.ts$/, '.js');
      return !existsSync(built) || statSync(built).mtimeMs < statSync(path).mtimeMs ? [path] : [];
    });
  const old = stale(src);
  if (old.length) throw new Error(`dist/ is older than ${old.slice(0, 3).join(', ')}${old.length > 3 ? ' ...' : ''}: build it first (npx tsc -p tsconfig.json), or run with --from src`);
}
if (flags.audit !== 'postgres' && flags.audit !== 'file') throw new Error('--audit: postgres or file');
const usePostgres = flags.audit === 'postgres';
if (usePostgres && !postgresAvailable()) throw new Error('--audit postgres needs Debian\'s postgresql 15 (or run with --audit file)');
const CHECKPOINTS = [...new Set([0, Math.round(N / 10), Math.round(N / 2), N])];
// Every task, the probes' and the credential's included, must fit under the per-agent cap.
const PER_AGENT = Math.ceil((N + PROBE * CHECKPOINTS.length + 10) / AGENTS) + 5;

const agentNames = Array.from({ length: AGENTS }, (_, i) => `scale-${i}`);
const policyText = [
  'apiVersion: task-broker/v1alpha1',
  'kind: Policy',
  'broker:',
  '  taskNamespace: task-broker',
  '  serviceAccount: task-broker',
  '  tokenTTL: 10m',
  '  identityAudience: task-broker',
  '  limits:',
  `    activeTasksPerAgent: ${PER_AGENT}`,
  'agents:',
  ...agentNames.flatMap((n) => [`  - name: ${n}`, '    identities:', `      - serviceAccount: agents/${n}`]),
  'templates:',
  '  - name: read-pods',
  '    namespaces: [team-a, team-b]',
  '    rules:',
  '      - apiGroups: [""]',
  '        resources: [pods]',
  '        verbs: [get, list]',
  '    ttl: { default: 2h, max: 4h }',
  `    agents: [${agentNames.join(', ')}]`,
  '',
].join('\n');

/**
 * The limits on, the per-source ones out of reach: one address makes all of this load, where a
 * deployment's agents come from many (in a first run, TokenReviews that waited over a second on the
 * overloaded machine counted as failed authentications of that one address, which then got 429).
 */
const LIMITS = ['--rate-limit-source', '100000000/1s', '--rate-limit-identity', '100000000/1s', '--max-connections-per-source', '1000', '--auth-failure-limit', 'off'];

function procStatus(pid: number): { rss: number; hwm: number } {
  const text = readFileSync(`/proc/${pid}/status`, 'utf8');
  const kb = (key: string) => Number(new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(text)?.[1] ?? NaN);
  return { rss: kb('VmRSS') / 1024, hwm: kb('VmHWM') / 1024 };
}
const mb = (x: number) => `${x.toFixed(0)} MB`;

/** What a replica's /metrics says of its tasks and its memory (prom-client's default metrics). */
async function metricsOf(b: BrokerProcess): Promise<{ active: number; heapUsed: number; newSpace: number }> {
  const text = await (await fetch(`${b.url}/metrics`)).text();
  const value = (re: RegExp) => Number(re.exec(text)?.[1] ?? NaN);
  return {
    active: value(/^broker_active_tasks (\d+)/m),
    heapUsed: value(/^nodejs_heap_size_used_bytes (\d+)/m) / 2 ** 20,
    newSpace: value(/^nodejs_heap_space_size_total_bytes\{space="new"\} (\d+)/m) / 2 ** 20,
  };
}
const activeCount = async (b: BrokerProcess) => (await metricsOf(b)).active;

const loadAtStart = loadavg().map((l) => l.toFixed(2)).join(' ');
const pg = usePostgres ? await TestPostgres.start() : undefined;
const onSignal = () => void pg?.remove();
process.once('SIGINT', onSignal);
process.once('SIGTERM', onSignal);
let env: BrokerEnv | undefined;
let killReplicas = () => {};
const onSignalEnv = (sig: NodeJS.Signals) => {
  killReplicas();
  void Promise.resolve(env?.stop()).finally(() => process.exit(sig === 'SIGINT' ? 130 : 143));
};
process.once('SIGINT', onSignalEnv);
process.once('SIGTERM', onSignalEnv);
try {
  if (pg) await migrate(pg.url('postgres'), ['task_broker']);
  const t0 = performance.now();
  env = await BrokerEnv.start({ policyText, namespaces: ['team-a', 'team-b'] });
  console.error(`scale: control plane and policy ready in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  await run(env);
} finally {
  killReplicas();
  await env?.stop();
  await pg?.remove();
  process.off('SIGINT', onSignal);
  process.off('SIGTERM', onSignal);
  process.off('SIGINT', onSignalEnv);
  process.off('SIGTERM', onSignalEnv);
}

async function run(env: BrokerEnv): Promise<void> {
  /** `broker serve` as BrokerEnv.startBroker runs it (its flags), from MAIN; killed with the environment. */
  const spawned: BrokerProcess[] = [];
  const startReplica = async (i: number, profile: boolean): Promise<BrokerProcess> => {
    const audit = pg ? ['--audit-store', pg.url('task_broker')] : ['--audit-log', join(env.dir, `audit-${i}.jsonl`)];
    const args = [MAIN, 'serve', '--config', env.policyFile, ...audit, '--kubeconfig', env.brokerKubeconfig, '--listen', '127.0.0.1:0', '--insecure-http', ...DEFAULT_TIMINGS, ...LIMITS];
    // stderr (the request log, a line a request) into a file: 10 000 lines, diagnostics on failure.
    const shellPrefix = `exec 2>>'${join(env.dir, `replica-${i}.log`)}';`;
    const nodeOptions = [flags['node-options'] ?? '', profile ? `--cpu-prof --cpu-prof-dir=${resolve(flags.profile!)}` : ''].join(' ').trim();
    const b = await BrokerProcess.spawn(args, audit[1]!, nodeOptions ? { NODE_OPTIONS: nodeOptions } : undefined, shellPrefix);
    spawned.push(b);
    return b;
  };
  killReplicas = () => spawned.forEach((b) => b.kill('SIGKILL'));
  const replicas: BrokerProcess[] = [];
  for (let i = 0; i < REPLICAS; i++) replicas.push(await startReplica(i, i === 0 && flags.profile !== undefined));
  const tokens = new Map<string, string>();
  for (const a of agentNames) tokens.set(a, await env.agentToken(a));

  let next = 0; // the next task's number
  let held = 1; // active tasks (the credential endpoint's task first)
  /** Refused starts by status and code (each logged once): a few under overload are reported, not fatal. */
  const refused = new Map<string, number>();
  const start = async (k: number, replica: BrokerProcess): Promise<number | undefined> => {
    const agent = agentNames[k % AGENTS]!;
    const t = performance.now();
    const res = await replica.request('POST', '/v1/tasks', tokens.get(agent), { template: 'read-pods', namespace: k % 2 ? 'team-b' : 'team-a', name: `s-${k}` });
    const took = performance.now() - t;
    if (res.status === 201) {
      held++;
      return took;
    }
    const key = `${res.status} ${res.body?.error?.code ?? ''}`;
    if (!refused.has(key)) console.error(`scale: task start s-${k} on replica ${replicas.indexOf(replica) + 1}: ${res.status} ${JSON.stringify(res.body)}`);
    refused.set(key, (refused.get(key) ?? 0) + 1);
    if ([...refused.values()].reduce((a, b) => a + b, 0) > 20 + N / 100) throw new Error(`more than 1 % of the starts refused: ${JSON.stringify([...refused])}`);
    return undefined;
  };
  /** Starts tasks until `target` are held, `concurrency` at a time over the replicas. */
  const fill = async (target: number, concurrency: number): Promise<number[]> => {
    const took: number[] = [];
    await Promise.all(
      Array.from({ length: concurrency }, async (_, w) => {
        while (held - 1 < target) {
          const k = next++;
          const ms = await start(k, replicas[(k + w) % REPLICAS]!);
          if (ms !== undefined) took.push(ms);
        }
      }),
    );
    return took;
  };
  /** PROBE starts, one client per replica, each start after the other. */
  const probe = async (): Promise<number[]> => {
    const took: number[] = [];
    await Promise.all(
      replicas.map(async (r) => {
        for (let j = 0; j < Math.ceil(PROBE / REPLICAS); j++) {
          const ms = await start(next++, r);
          if (ms !== undefined) took.push(ms);
        }
      }),
    );
    return took;
  };
  /** Until every replica's view holds `count` active tasks: ms after the call. */
  const converged = async (count: number): Promise<number> => {
    const t = performance.now();
    for (;;) {
      const counts = await Promise.all(replicas.map(activeCount));
      if (counts.every((c) => c >= count)) return performance.now() - t;
      if (performance.now() - t > 120_000) throw new Error(`replicas' views hold ${counts.join(', ')} tasks, not ${count}, after 120 s`);
      await sleep(50);
    }
  };

  // The credential endpoint's task (agent scale-0), started first: held at every checkpoint.
  const credAgent = agentNames[0]!;
  const credToken = tokens.get(credAgent)!;
  const cred = await replicas[0]!.request('POST', '/v1/tasks', credToken, { template: 'read-pods', namespace: 'team-a', name: 'cred' });
  if (cred.status !== 201) throw new Error(`credential task: ${cred.status} ${JSON.stringify(cred.body)}`);
  const credentialLoad = async (b: BrokerProcess, ref: string): Promise<CannonResult> => {
    const target = { url: `${b.url}/v1/tasks/${ref}/credential`, method: 'POST', headers: { authorization: `Bearer ${credToken}` }, connections: 50, pipelining: 1 };
    const first = await b.request('POST', `/v1/tasks/${ref}/credential`, credToken);
    if (first.status !== 200) throw new Error(`credential: ${first.status} ${JSON.stringify(first.body)}`);
    await autocannon({ ...target, duration: 1 });
    const r = await autocannon({ ...target, duration: CANNON_S });
    if (r.non2xx || r.errors) throw new Error(`credential load: ${r.non2xx} non-2xx, ${r.errors} errors`);
    return r;
  };
  /** Restarts the last replica: ms from spawn to `listening on` and to /readyz 200, and its view's count. */
  const restart = async (): Promise<{ listening: number; ready: number; held: number }> => {
    const i = REPLICAS - 1;
    await replicas[i]!.stop();
    const t = performance.now();
    const b = await startReplica(i, false);
    const listening = performance.now() - t;
    for (;;) {
      const res = await fetch(`${b.url}/readyz`).catch(() => undefined);
      if (res?.status === 200) break;
      await sleep(10);
    }
    const ready = performance.now() - t;
    replicas[i] = b;
    return { listening, ready, held: await activeCount(b) };
  };

  interface Checkpoint {
    held: number;
    probe: number[];
    fill: number[];
    fillSeconds: number;
    /** CPU (user + system) per start from the last checkpoint to this one, ms: the replicas together, and the API server. */
    cpuPerStart: { replicas: number; apiserver: number };
    /** CPU ms a second while holding the tasks with no requests: each replica, and the API server. */
    idle: { replicas: number[]; apiserver: number };
    convergeMs: number;
    rss: Array<{ rss: number; hwm: number }>;
    heap: Array<{ heapUsed: number; newSpace: number }>;
    apiserver: { rss: number; hwm: number };
  }
  const points: Checkpoint[] = [];
  const credential: Array<{ held: number; byName: CannonResult; byId: CannonResult }> = [];
  const restarts: Array<{ held: number; listening: number; ready: number; seen: number }> = [];
  for (const target of CHECKPOINTS) {
    const t = performance.now();
    const cpuBefore = { replicas: replicas.reduce((a, r) => a + cpuMs(r.pid), 0), apiserver: cpuMs(env.cluster.pid) };
    const heldBefore = held;
    const fillTook = await fill(target, CONCURRENCY);
    const fillSeconds = (performance.now() - t) / 1000;
    const before = held;
    const convergeMs = await converged(held);
    const probeTook = await probe();
    await converged(held);
    const started = held - heldBefore;
    const cpuPerStart = {
      replicas: (replicas.reduce((a, r) => a + cpuMs(r.pid), 0) - cpuBefore.replicas) / started,
      apiserver: (cpuMs(env.cluster.pid) - cpuBefore.apiserver) / started,
    };
    // Holding the tasks, no requests: what the replicas and the API server spend a second (the sweeps:
    // expiry every second, orphans every 30 s on the Lease holder; the watches), over IDLE_S seconds.
    const idleFrom = { replicas: replicas.map((r) => cpuMs(r.pid)), apiserver: cpuMs(env.cluster.pid), t: performance.now() };
    await sleep(IDLE_S * 1000);
    const idleS = (performance.now() - idleFrom.t) / 1000;
    const idle = { replicas: replicas.map((r, i) => (cpuMs(r.pid) - idleFrom.replicas[i]!) / idleS), apiserver: (cpuMs(env.cluster.pid) - idleFrom.apiserver) / idleS };
    points.push({ held: before, probe: probeTook, fill: fillTook, fillSeconds, cpuPerStart, idle, convergeMs, rss: replicas.map((r) => procStatus(r.pid)), heap: await Promise.all(replicas.map(metricsOf)), apiserver: procStatus(env.cluster.pid) });
    console.error(`scale: ${before} tasks held; probe p50 ${ms(median(probeTook))} p99 ${ms(percentile(probeTook, 99))}; fill ${fillTook.length} in ${fillSeconds.toFixed(1)} s`);
    if (target === 0 || target === N) {
      credential.push({ held, byName: await credentialLoad(replicas[0]!, 'cred'), byId: await credentialLoad(replicas[0]!, cred.body.id) });
      const r = await restart();
      restarts.push({ ...r, seen: r.held, held });
      console.error(`scale: restart with ${held} tasks: ready in ${ms(r.ready)}`);
    }
  }
  const finalRss = replicas.map((r) => procStatus(r.pid));
  for (const r of replicas) await r.stop();

  console.log(
    `scale: ${REPLICAS} replicas (${flags.checkout ? `${ROOT}/` : ''}${flags.from}/${flags['node-options'] ? `, NODE_OPTIONS ${flags['node-options']}` : ''}), one local API server, ${usePostgres ? 'one PostgreSQL audit store (one chain)' : 'a file audit log each'}; ${AGENTS} agents, ` +
      `fill ${CONCURRENCY} starts in flight over the replicas; probe ${PROBE} starts, one client per replica, sequential; load average at the start ${loadAtStart}, at the end ${loadavg().map((l) => l.toFixed(2)).join(' ')}`,
  );
  console.log(
    table(
      ['tasks held (before the probe)', 'probe start p50', 'p90', 'p99', 'max', `fill to here (${CONCURRENCY} in flight) p50`, 'p99', 'starts/s', 'CPU a start: replicas, API server', `at rest (${IDLE_S} s): CPU ms/s replica 1 / 2 / 3, API server`, 'views converged', 'RSS replica 1 / 2 / 3 (peak)', 'V8 heap used (young generation reserved)', 'API server RSS'],
      points.map((p) => [
        p.held,
        ms(median(p.probe)),
        ms(percentile(p.probe, 90)),
        ms(percentile(p.probe, 99)),
        ms(Math.max(...p.probe)),
        p.fill.length ? ms(median(p.fill)) : '-',
        p.fill.length ? ms(percentile(p.fill, 99)) : '-',
        p.fill.length ? (p.fill.length / p.fillSeconds).toFixed(0) : '-',
        `${ms(p.cpuPerStart.replicas)}, ${ms(p.cpuPerStart.apiserver)}`,
        `${p.idle.replicas.map((c) => c.toFixed(0)).join(' / ')}, ${p.idle.apiserver.toFixed(0)}`,
        ms(p.convergeMs, 0),
        `${p.rss.map((r) => mb(r.rss)).join(' / ')} (${p.rss.map((r) => mb(r.hwm)).join(' / ')})`,
        `${p.heap.map((h) => mb(h.heapUsed)).join(' / ')} (${p.heap.map((h) => mb(h.newSpace)).join(' / ')})`,
        mb(p.apiserver.rss),
      ]),
    ),
  );
  console.log('');
  console.log(
    table(
      ['credential endpoint (replica 1, 50 connections)', 'tasks held', 'requests/s', 'p50', 'p99', 'max'],
      credential.flatMap((c) => [
        ['by name (as kubeconfigs name it)', c.held, Math.round(c.byName.requests.average), `${c.byName.latency.p50} ms`, `${c.byName.latency.p99} ms`, `${c.byName.latency.max} ms`],
        ['by id', c.held, Math.round(c.byId.requests.average), `${c.byId.latency.p50} ms`, `${c.byId.latency.p99} ms`, `${c.byId.latency.max} ms`],
      ]),
    ),
  );
  console.log('');
  console.log(
    table(
      ['restart of replica 3 (SIGTERM, same command)', 'tasks held', 'spawn -> listening', 'spawn -> /readyz 200', 'tasks in its view'],
      restarts.map((r) => ['', r.held, ms(r.listening, 0), ms(r.ready, 0), r.seen]),
    ),
  );
  const last = points.at(-1)!;
  const worstRss = Math.max(...last.rss.map((r) => r.rss), ...finalRss.map((r) => r.rss));
  console.log('');
  console.log(
    table(
      ['goal (at the most tasks held)', 'figure', 'result'],
      [
        [`probe start p99 <= 100 ms at ${last.held}`, ms(percentile(last.probe, 99)), met(percentile(last.probe, 99) <= 100)],
        [`RSS <= 300 MB per replica at ${last.held}`, `${mb(worstRss)} (largest; after the restart ${finalRss.map((r) => mb(r.rss)).join(' / ')})`, met(worstRss <= 300)],
        ['(info) probe start p50, most held / 0 held', `${(median(last.probe) / median(points[0]!.probe)).toFixed(2)}x`, ''],
        ['(info) credential p99 by name, most held / 0 held', `${credential.at(-1)!.byName.latency.p99} / ${credential[0]!.byName.latency.p99} ms`, ''],
        ['(info) credential requests/s by name, most held / 0 held', `${(credential.at(-1)!.byName.requests.average / credential[0]!.byName.requests.average).toFixed(2)}x`, ''],
      ],
    ),
  );
  if (refused.size) console.log(`refused starts (not counted as held): ${[...refused].map(([k, n]) => `${n} x ${k}`).join(', ')}`);
  if (restarts.some((r) => r.seen < r.held)) {
    process.exitCode = 1;
    console.log('FAILED: a restarted replica did not see every task');
  }
}
