/**
 * The Kubernetes API proxy (issue 13) against the same requests straight to the API server, in the
 * same run, on a real API server and a real broker process (TLS on both):
 *
 * 1. kubectl: `kubectl get pods -n team-a` through the proxy (kubeconfig from `broker kubeconfig
 *    --via proxy`, the native exec plugin asking for a session token on every run) against kubectl with
 *    the task's own token straight to the API server; runs alternating. Goal: p50 <= 1.15x.
 * 2. load: autocannon GETs one ConfigMap through the proxy (session token) and straight (task token),
 *    alternating slices. Goals: >= 0.8x the throughput, added p50 <= 1 ms, added p99 <= 10 ms; every 2xx
 *    through the proxy is on the audit log (fdatasync'd before its answer was relayed).
 * 3. list: 10,000 ConfigMaps (2 KiB each) listed through the proxy in one request; the broker's RSS
 *    sampled every 10 ms. Goal: growth < 50 MB (streamed, not buffered).
 * 4. watch: 500 watches through the proxy held for 60 s while a ConfigMap changes every 500 ms; events
 *    received per watch, and the broker's RSS.
 *
 *   bin/bench proxy [--only kubectl,load,list,watch] [--runs 30] [--duration 10] [--rounds 4]
 *                   [--configmaps 10000] [--watches 500] [--watch-seconds 60] [--profile DIR] [--audit-log PATH]
 *                   [--bare dispatch,request,node,dispatch-h2,request-h2] [--perf FILE] [--baseline-checkout DIR]
 *                   [--node-options STR]
 *
 * --bare: the load also through bare Node TLS pass-throughs (bench/bare-proxy.ts: no check, no record),
 * in the same alternating slices, with their CPU per request: what any Node proxy costs here.
 * --perf FILE: `perf record` (on-CPU samples, call graphs, JIT frames named by --perf-basic-prof) of
 * the broker through the load's slices: where its CPU goes even on a machine too busy for a V8
 * profile's wall-clock samples (`perf report -i FILE --no-children --sort symbol`).
 * --baseline-checkout DIR: a second broker from another checkout of the project (DIR/src/cli/main.ts,
 * e.g. `git archive` of an earlier commit with a node_modules symlink), same flags and its own audit
 * log on the same disk; the load then also goes through its proxy, in the same slices: a change's
 * effect measured in one run.
 */
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { readdirSync, readFileSync, writeFileSync, mkdirSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs } from 'node:util';
import * as k8s from '@kubernetes/client-node';
import { Agent, request } from 'undici';
import { kubectlPath } from '../src/cluster/local-cluster.ts';
import { BrokerEnv, BrokerProcess } from '../test/helpers/broker.ts';
import { run } from '../test/helpers/kube.ts';
import { autocannon, type CannonResult, cpuMs, DEFAULT_TIMINGS, median, met, ms, percentile, spawnListening, table } from './_common.ts';


const { values: flags } = parseArgs({
  options: {
    only: { type: 'string', default: 'kubectl,load,list,watch' },
    runs: { type: 'string', default: '30' },
    duration: { type: 'string', default: '10' },
    rounds: { type: 'string', default: '4' },
    connections: { type: 'string', default: '10' },
    configmaps: { type: 'string', default: '10000' },
    watches: { type: 'string', default: '500' },
    'watch-seconds': { type: 'string', default: '60' },
    profile: { type: 'string' },
    perf: { type: 'string' },
    'baseline-checkout': { type: 'string' },
    'node-options': { type: 'string' },
    'audit-log': { type: 'string' },
    bare: { type: 'string', default: '' },
  },
});
const only = new Set(flags.only.split(','));
const ROOT = new URL('..', import.meta.url).pathname;
const BROKER = join(ROOT, 'bin/broker');

const POLICY = `apiVersion: task-broker/v1alpha1
kind: Policy
broker:
  taskNamespace: task-broker
  tokenTTL: 1h
  identityAudience: task-broker
agents:
  - name: alpha
    identities: [{ serviceAccount: agents/alpha }]
templates:
  - name: bench
    namespaces: [team-a]
    rules:
      - { apiGroups: [""], resources: [pods, configmaps], verbs: [get, list, watch] }
    ttl: { default: 1h, max: 2h }
    agents: [alpha]
`;

/**
 * Write system calls made by a process's libuv thread-pool threads so far (/proc/PID/task/TID/io): the
 * audit log's durable writes (one per group-commit batch, O_DSYNC) and any other file writes.
 */
function poolWrites(pid: number): number {
  let n = 0;
  for (const tid of readdirSync(`/proc/${pid}/task`)) {
    try {
      if (readFileSync(`/proc/${pid}/task/${tid}/comm`, 'utf8').trim() !== 'libuv-worker') continue;
      n += Number(/syscw: (\d+)/.exec(readFileSync(`/proc/${pid}/task/${tid}/io`, 'utf8'))?.[1] ?? 0);
    } catch {
      // the thread ended
    }
  }
  return n;
}

function rssMb(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) / 1024 : NaN;
}

/** Samples a process's RSS every `everyMs` until stopped: the peak. */
function rssPeak(pid: number, everyMs = 10): { stop: () => number } {
  let peak = rssMb(pid);
  const timer = setInterval(() => (peak = Math.max(peak, rssMb(pid))), everyMs);
  return {
    stop: () => {
      clearInterval(timer);
      return Math.max(peak, rssMb(pid));
    },
  };
}

const env = await BrokerEnv.start({ policyText: POLICY, namespaces: ['team-a'] });
let broker: BrokerProcess | undefined;
/** Bare pass-throughs (--bare) running. */
const bareChildren = new Set<number>();
/** The broker of --baseline-checkout. */
let baseline: BrokerProcess | undefined;
const stop = async () => {
  for (const pid of bareChildren) process.kill(pid, 'SIGTERM');
  await baseline?.stop('SIGTERM');
  await broker?.stop('SIGTERM'); // a clean stop: --profile's profile is written then
  await env.stop();
};
for (const sig of ['SIGINT', 'SIGTERM'] as const) process.once(sig, () => void stop().finally(() => process.exit(130)));

const BROKER_ARGS = ['--proxy-listen', '127.0.0.1:0', ...DEFAULT_TIMINGS, '--log-level', 'warn', '--proxy-rate-limit-agent', 'off', '--rate-limit-source', 'off'];
try {
  broker = await env.startBroker({
    // --audit-log PATH: the broker's log elsewhere (e.g. on tmpfs, to see what the disk's fdatasync costs).
    ...(flags['audit-log'] ? { auditLog: flags['audit-log'] } : {}),
    tls: env.cluster.servingCert,
    // The budgets raised out of reach: one agent and one address make all the load here, and what is
    // measured is the proxy's work, not its refusals (as bench/credential.ts does).
    extraArgs: BROKER_ARGS,
    // --profile DIR: a V8 CPU profile of the broker, written when it stops (bin/bench profile-summary).
    // --node-options STR: Node flags for this broker only (not the --baseline-checkout one): an A/B of a flag.
    ...(flags.profile || flags.perf || flags['node-options']
      ? { env: { NODE_OPTIONS: [flags.profile ? `--cpu-prof --cpu-prof-dir=${flags.profile}` : '', flags.perf ? '--perf-basic-prof' : '', flags['node-options'] ?? ''].join(' ').trim() } }
      : {}),
  });
  const ca = readFileSync(env.cluster.caFile);
  const dispatcher = new Agent({ connect: { ca }, connections: 2048 });
  const home = join(env.dir, 'home');
  mkdirSync(home);
  const agentEnv = {
    PATH: `${join(ROOT, '.node/node_modules/node/bin')}:${process.env['PATH']}`,
    HOME: home,
    BROKER_URL: broker.url,
    BROKER_CA: env.cluster.caFile,
    BROKER_IDENTITY_TOKEN: await env.agentToken('alpha'),
  };
  const cli = async (args: string[]) => {
    const res = await run(BROKER, args, agentEnv);
    if (res.code !== 0) throw new Error(`broker ${args.join(' ')}: ${res.stderr}`);
    return res.stdout;
  };
  await cli(['task', 'start', 'bench', '--namespace', 'team-a', '--ttl', '1h']);
  const viaProxy = join(env.dir, 'proxy.kubeconfig');
  await cli(['kubeconfig', '--task', 'bench', '--via', 'proxy', '--plugin', 'native', '-n', 'team-a', '--output', viaProxy]);
  const session = JSON.parse(await cli(['credential', '--task', 'bench', '--via', 'proxy'])).status.token as string;
  const taskToken = JSON.parse(await cli(['credential', '--task', 'bench', '--via', 'direct'])).status.token as string;
  const proxyUrl = new URL(readFileSync(viaProxy, 'utf8').match(/server: (\S+)/)![1]!);
  // --baseline-checkout: the other build's broker on the same cluster, its session token and proxy URL.
  let baselineProxy: { url: URL; session: string; kubeconfig: string } | undefined;
  if (flags['baseline-checkout']) {
    const checkout = resolve(flags['baseline-checkout']);
    const log = join(env.dir, 'baseline-audit.jsonl');
    const { cert, key } = env.cluster.servingCert;
    baseline = await BrokerProcess.spawn(
      [join(checkout, 'src/cli/main.ts'), 'serve', '--config', env.policyFile, '--audit-log', log, '--kubeconfig', env.brokerKubeconfig, '--listen', '127.0.0.1:0', '--tls-cert', cert, '--tls-key', key, ...BROKER_ARGS],
      log,
    );
    const baselineEnv = { ...agentEnv, BROKER_URL: baseline.url };
    const kc = join(env.dir, 'baseline-proxy.kubeconfig');
    let res;
    // The task reaches the second broker by its watch of the task store: asked until it has.
    for (let i = 0; i < 50; i++) {
      res = await run(BROKER, ['credential', '--task', 'bench', '--via', 'proxy'], baselineEnv);
      if (res.code === 0) break;
      await sleep(200);
    }
    if (res?.code !== 0) throw new Error(`the baseline broker gave no session token: ${res?.stderr}`);
    const token = JSON.parse(res.stdout).status.token as string;
    const k = await run(BROKER, ['kubeconfig', '--task', 'bench', '--via', 'proxy', '--plugin', 'native', '-n', 'team-a', '--output', kc], baselineEnv);
    if (k.code !== 0) throw new Error(`baseline kubeconfig: ${k.stderr}`);
    baselineProxy = { url: new URL(readFileSync(kc, 'utf8').match(/server: (\S+)/)![1]!), session: token, kubeconfig: kc };
    console.log(`baseline broker (${checkout}) pid ${baseline.pid}, proxy ${baselineProxy.url.origin}`);
  }
  const apiUrl = new URL(env.cluster.server);
  const direct = join(env.dir, 'direct.kubeconfig');
  writeFileSync(
    direct,
    `apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: "${apiUrl.origin}", certificate-authority: "${env.cluster.caFile}"}}]\n` +
      `users: [{name: u, user: {token: "${taskToken}"}}]\ncontexts: [{name: c, context: {cluster: c, user: u, namespace: team-a}}]\ncurrent-context: c\n`,
    { mode: 0o600 },
  );
  await env.admin.core.createNamespacedConfigMap({ namespace: 'team-a', body: { metadata: { name: 'target' }, data: { k: 'v'.repeat(512) } } });
  console.log(`proxy ${proxyUrl.origin}, API server ${apiUrl.origin}, broker pid ${broker.pid}`);

  if (only.has('kubectl')) {
    const RUNS = Number(flags.runs);
    const kubectl = async (kc: string) => {
      const t0 = performance.now();
      const res = await run(kubectlPath(), ['--kubeconfig', kc, 'get', 'pods'], agentEnv);
      if (res.code !== 0) throw new Error(`kubectl: ${res.stderr}`);
      return performance.now() - t0;
    };
    const kubeconfigs: Record<string, string> = { proxy: viaProxy, direct, ...(baselineProxy ? { baseline: baselineProxy.kubeconfig } : {}) };
    const order0 = Object.keys(kubeconfigs);
    for (let i = 0; i < 3; i++) for (const which of order0) await kubectl(kubeconfigs[which]!);
    const t = Object.fromEntries(order0.map((w) => [w, [] as number[]])) as Record<string, number[]>;
    for (let i = 0; i < RUNS; i++) {
      for (const which of i % 2 === 0 ? order0 : [...order0].reverse()) t[which]!.push(await kubectl(kubeconfigs[which]!));
    }
    const ratio = median(t['proxy']!) / median(t['direct']!);
    console.log(`\n1. kubectl get pods -n team-a, ${RUNS} runs each, alternating, after 3 warm-up runs each\n`);
    console.log(
      table(
        ['path', 'p50', 'p90', 'ratio (p50)', 'goal <= 1.15x'],
        [
          ['task token straight to the API server (baseline)', ms(median(t['direct']!)), ms(percentile(t['direct']!, 90)), '1.00x', ''],
          ['through the proxy (native plugin, session token)', ms(median(t['proxy']!)), ms(percentile(t['proxy']!, 90)), `${ratio.toFixed(3)}x`, met(ratio <= 1.15)],
          ...(t['baseline']
            ? [['through the --baseline-checkout broker\'s proxy', ms(median(t['baseline'])), ms(percentile(t['baseline'], 90)), `${(median(t['baseline']) / median(t['direct']!)).toFixed(3)}x`, '']]
            : []),
        ],
      ),
    );
  }

  if (only.has('load')) {
    const duration = Number(flags.duration);
    const rounds = Number(flags.rounds);
    const path = '/api/v1/namespaces/team-a/configmaps/target';
    const target = (origin: URL, token: string) => ({ url: `${origin.origin}${path}`, connections: Number(flags.connections), headers: { authorization: `Bearer ${token}` } });
    // Bare pass-throughs (--bare), each a process of its own: name -> URL and pid.
    const bares = new Map<string, { url: URL; pid: number }>();
    for (const name of flags.bare.split(',').filter(Boolean)) {
      const [client, h2] = name.split('-');
      const args = [apiUrl.origin, env.cluster.caFile, env.cluster.servingCert.cert, env.cluster.servingCert.key, '--client', client!, ...(h2 === 'h2' ? ['--h2'] : [])];
      process.env['BARE_PROXY_TOKEN'] = taskToken;
      const { url, child } = await spawnListening(new URL('./bare-proxy.ts', import.meta.url).pathname, args);
      delete process.env['BARE_PROXY_TOKEN'];
      bares.set(name, { url: new URL(url), pid: child.pid! });
      bareChildren.add(child.pid!);
    }
    const paths = ['proxy', 'direct', ...(baselineProxy ? ['baseline'] : []), ...bares.keys()];
    const targetOf = (which: string) =>
      which === 'proxy'
        ? target(proxyUrl, session)
        : which === 'direct'
          ? target(apiUrl, taskToken)
          : which === 'baseline'
            ? target(baselineProxy!.url, baselineProxy!.session)
            : target(bares.get(which)!.url, taskToken);
    const pidOf = (which: string) => (which === 'proxy' ? broker!.pid : which === 'direct' ? undefined : which === 'baseline' ? baseline!.pid : bares.get(which)!.pid);
    for (const which of paths) await autocannon({ ...targetOf(which), duration: 2 });
    // What the broker spends with no request at all (its sweeps, Lease, watches, log checks): per second.
    const idle0 = cpuMs(broker.pid);
    const idleT0 = performance.now();
    await sleep(3000);
    const idlePerSecond = (cpuMs(broker.pid) - idle0) / ((performance.now() - idleT0) / 1000);
    const before = broker.auditRecords().filter((r) => r.type === 'k8s.request' && r.details?.name === 'target').length;
    const rssBeforeLoad = rssMb(broker.pid);
    const perf = flags.perf ? spawn('perf', ['record', '-F', '999', '-g', '-p', String(broker.pid), '-o', flags.perf], { stdio: 'ignore' }) : undefined;
    const runs = Object.fromEntries(paths.map((w) => [w, [] as CannonResult[]])) as Record<string, CannonResult[]>;
    // The proxies' CPU time during their slices: per request, a figure the machine's noise moves little.
    const cpu = Object.fromEntries(paths.map((w) => [w, 0])) as Record<string, number>;
    let flushes = 0;
    for (let i = 0; i < rounds; i++) {
      const order = i % 2 === 0 ? paths : [...paths].reverse();
      for (const which of order) {
        const pid = pidOf(which);
        const before = pid === undefined ? 0 : cpuMs(pid);
        const writesBefore = which === 'proxy' ? poolWrites(broker.pid) : 0;
        runs[which]!.push(await autocannon({ ...targetOf(which), duration: duration / rounds }));
        if (pid !== undefined) cpu[which]! += cpuMs(pid) - before;
        if (which === 'proxy') flushes += poolWrites(broker.pid) - writesBefore;
      }
    }
    if (perf) {
      perf.kill('SIGINT');
      await once(perf, 'exit');
    }
    for (const { pid } of bares.values()) {
      process.kill(pid, 'SIGTERM');
      bareChildren.delete(pid);
    }
    await sleep(500);
    const recorded = broker.auditRecords().filter((r) => r.type === 'k8s.request' && r.details?.name === 'target').length - before;
    const sum = (rs: CannonResult[]) => ({
      rps: rs.reduce((a, r) => a + r.requests.total, 0) / duration,
      p50: median(rs.map((r) => r.latency.p50)),
      p99: median(rs.map((r) => r.latency.p99)),
      ok: rs.reduce((a, r) => a + r['2xx'], 0),
      bad: rs.reduce((a, r) => a + r.non2xx + r.errors, 0),
    });
    const p = sum(runs['proxy']!);
    const d = sum(runs['direct']!);
    const perRequest = (which: string) => {
      const r = sum(runs[which]!);
      return `${((cpu[which]! * 1000) / (r.ok + r.bad)).toFixed(0)} us`;
    };
    console.log(`\n2. GET one ConfigMap, autocannon, ${flags.connections} connections, ${duration} s each in ${rounds} alternating slices\n`);
    console.log(
      table(
        ['path', 'requests/s', 'ratio', 'p50', 'p99', '2xx', 'other', 'proxy CPU/request'],
        [
          ['straight to the API server (baseline)', d.rps.toFixed(0), '1.00x', ms(d.p50), ms(d.p99), d.ok, d.bad, ''],
          ['through the proxy', p.rps.toFixed(0), `${(p.rps / d.rps).toFixed(3)}x`, ms(p.p50), ms(p.p99), p.ok, p.bad, perRequest('proxy')],
          ...(baselineProxy
            ? [
                (() => {
                  const b = sum(runs['baseline']!);
                  return ['through the --baseline-checkout broker\'s proxy', b.rps.toFixed(0), `${(b.rps / d.rps).toFixed(3)}x`, ms(b.p50), ms(b.p99), b.ok, b.bad, perRequest('baseline')];
                })(),
              ]
            : []),
          ...[...bares.keys()].map((name) => {
            const b = sum(runs[name]!);
            return [`bare pass-through (${name})`, b.rps.toFixed(0), `${(b.rps / d.rps).toFixed(3)}x`, ms(b.p50), ms(b.p99), b.ok, b.bad, perRequest(name)];
          }),
        ],
      ),
    );
    const ratio = p.rps / d.rps;
    console.log(
      `\nthroughput ${ratio.toFixed(3)}x (goal >= 0.8x: ${met(ratio >= 0.8)}); added p50 ${ms(p.p50 - d.p50)} (goal <= 1 ms: ${met(p.p50 - d.p50 <= 1)}); ` +
        `added p99 ${ms(p.p99 - d.p99)} (goal <= 10 ms: ${met(p.p99 - d.p99 <= 10)})`,
    );
    console.log(`2xx through the proxy: ${p.ok}; k8s.request records of them on the audit log: ${recorded} (${met(recorded >= p.ok)}), in ${flushes} durable writes (${(recorded / flushes).toFixed(2)} records each)`);
    console.log(`broker CPU per proxied request: ${perRequest('proxy')} (user + system, all threads); idle, the broker spends ${idlePerSecond.toFixed(1)} ms/s; its RSS ${rssBeforeLoad.toFixed(1)} -> ${rssMb(broker.pid).toFixed(1)} MB`);
  }

  if (only.has('list')) {
    const n = Number(flags.configmaps);
    const payload = 'x'.repeat(2048);
    const t0 = performance.now();
    let next = 0;
    await Promise.all(
      Array.from({ length: 32 }, async () => {
        for (let i = next++; i < n; i = next++) {
          await env.admin.core.createNamespacedConfigMap({ namespace: 'team-a', body: { metadata: { name: `cm-${i}` }, data: { payload } } });
        }
      }),
    );
    console.log(`\n3. made ${n} ConfigMaps of 2 KiB in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
    const list = async (origin: URL, token: string) => {
      const start = performance.now();
      const res = await request(`${origin.origin}/api/v1/namespaces/team-a/configmaps`, { headers: { authorization: `Bearer ${token}`, accept: 'application/json' }, dispatcher });
      let bytes = 0;
      for await (const chunk of res.body) bytes += (chunk as Buffer).length;
      return { status: res.statusCode, bytes, ms: performance.now() - start };
    };
    const directList = await list(apiUrl, taskToken);
    await sleep(500);
    const base = rssMb(broker.pid);
    const sampler = rssPeak(broker.pid);
    const proxied = await list(proxyUrl, session);
    const peak = sampler.stop();
    console.log(
      table(
        ['path', 'status', 'bytes', 'time', 'broker RSS before', 'peak', 'growth (goal < 50 MB)'],
        [
          ['straight to the API server', directList.status, directList.bytes, ms(directList.ms, 0), '', '', ''],
          ['through the proxy', proxied.status, proxied.bytes, ms(proxied.ms, 0), `${base.toFixed(1)} MB`, `${peak.toFixed(1)} MB`, `${(peak - base).toFixed(1)} MB ${met(peak - base < 50)}`],
        ],
      ),
    );
  }

  if (only.has('watch')) {
    const count = Number(flags.watches);
    const seconds = Number(flags['watch-seconds']);
    const rssBefore = rssMb(broker.pid);
    const received = new Array<number>(count).fill(0);
    const aborts = new AbortController();
    const opened: Array<Promise<void>> = [];
    const t0 = performance.now();
    for (let i = 0; i < count; i++) {
      opened.push(
        (async () => {
          const res = await request(`${proxyUrl.origin}/api/v1/namespaces/team-a/configmaps?watch=1&fieldSelector=metadata.name%3Dticker`, {
            headers: { authorization: `Bearer ${session}` },
            dispatcher,
            signal: aborts.signal,
            bodyTimeout: 0,
          });
          if (res.statusCode !== 200) throw new Error(`watch ${i}: ${res.statusCode}`);
          void (async () => {
            try {
              for await (const chunk of res.body) received[i]! += (chunk as Buffer).toString().split('\n').filter(Boolean).length;
            } catch {
              // aborted at the end
            }
          })();
        })(),
      );
    }
    await Promise.all(opened);
    const openMs = performance.now() - t0;
    const sampler = rssPeak(broker.pid, 200);
    await env.admin.core.createNamespacedConfigMap({ namespace: 'team-a', body: { metadata: { name: 'ticker' }, data: { n: '0' } } });
    const end = Date.now() + seconds * 1000;
    let changes = 1;
    while (Date.now() < end) {
      await sleep(500);
      await env.admin.core.patchNamespacedConfigMap({ name: 'ticker', namespace: 'team-a', body: { data: { n: String(changes) } } }, k8s.setHeaderOptions('Content-Type', k8s.PatchStrategy.MergePatch));
      changes++;
    }
    await sleep(1000);
    const peak = sampler.stop();
    aborts.abort();
    const sorted = [...received].sort((a, b) => a - b);
    console.log(`\n4. ${count} watches through the proxy, opened in ${(openMs / 1000).toFixed(1)} s, held ${seconds} s, ${changes} changes of the watched ConfigMap\n`);
    console.log(
      table(
        ['events per watch: min', 'median', 'max', 'watches with every event', 'broker RSS before', 'peak'],
        [[sorted[0]!, median(sorted), sorted.at(-1)!, received.filter((r) => r >= changes).length, `${rssBefore.toFixed(1)} MB`, `${peak.toFixed(1)} MB`]],
      ),
    );
  }
} finally {
  await stop();
}
