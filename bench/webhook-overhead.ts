/**
 * What the audit webhook costs an API request: `kubectl get pods` (whole process, wall time) against an
 * API server whose audit webhook posts, in batch mode, to a real broker that records every event
 * durably, and against an API server of the same build without a webhook (the baseline), in the same
 * run. Two API servers side by side, the runs alternating between them, so whatever else the machine
 * does falls on both alike. The user is a ServiceAccount of the task namespace, so on the first server
 * every request's event is kept and fdatasync'd by the broker (checked at the end).
 *
 * Goal: p50 with the webhook <= 1.05x the p50 without.
 *
 *   bin/bench webhook-overhead [--runs 40]
 */
import { randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs } from 'node:util';
import * as k8s from '@kubernetes/client-node';
import { freePort, kubectlPath, LocalCluster } from '../src/cluster/local-cluster.ts';
import { kubeApis, type KubeApis } from '../src/kube/config.ts';
import { applyPolicy } from '../src/policy/apply.ts';
import { parsePolicy } from '../src/policy/parse.ts';
import { BrokerProcess, mintToken, POLICY_FILE } from '../test/helpers/broker.ts';
import { adminConfig, run, writeTokenKubeconfig } from '../test/helpers/kube.ts';
import { DEFAULT_TIMINGS, median, met, ms, percentile, table } from './_common.ts';

const { values: flags } = parseArgs({ options: { runs: { type: 'string', default: '40' } } });
const RUNS = Number(flags.runs);
const WARMUP = 3;
const MAIN = new URL('../src/cli/main.ts', import.meta.url).pathname;
const PATH = '/v1/audit/kubernetes';


const dir = mkdtempSync(join(tmpdir(), 'tb-webhook-bench-'));
const clusters: LocalCluster[] = [];
let broker: BrokerProcess | undefined;
const cleanup = async () => {
  broker?.kill('SIGKILL');
  for (const c of clusters) await c.stop().catch(() => undefined);
  rmSync(dir, { recursive: true, force: true });
};
for (const sig of ['SIGINT', 'SIGTERM'] as const) process.once(sig, () => void cleanup().finally(() => process.exit(sig === 'SIGINT' ? 130 : 143)));

/** A ServiceAccount `task-bench` in the task namespace that may list pods in team-a; its kubeconfig. */
async function benchUser(cluster: LocalCluster, admin: KubeApis, taskNamespace: string, name: string): Promise<string> {
  const ignoreExists = (err: unknown) => {
    if (!(err instanceof k8s.ApiException && err.code === 409)) throw err;
  };
  for (const ns of ['team-a', taskNamespace]) await admin.core.createNamespace({ body: { metadata: { name: ns } } }).catch(ignoreExists);
  await admin.core.createNamespacedServiceAccount({ namespace: taskNamespace, body: { metadata: { name: 'task-bench' } } });
  await admin.rbac.createClusterRole({ body: { metadata: { name: 'bench-pods' }, rules: [{ apiGroups: [''], resources: ['pods'], verbs: ['get', 'list'] }] } });
  await admin.rbac.createNamespacedRoleBinding({
    namespace: 'team-a',
    body: {
      metadata: { name: 'bench-pods' },
      roleRef: { apiGroup: 'rbac.authorization.k8s.io', kind: 'ClusterRole', name: 'bench-pods' },
      subjects: [{ kind: 'ServiceAccount', name: 'task-bench', namespace: taskNamespace }],
    },
  });
  const token = await mintToken(admin, taskNamespace, 'task-bench', [], 3600);
  return writeTokenKubeconfig(join(dir, `${name}.kubeconfig`), cluster, token);
}

try {
  const text = readFileSync(POLICY_FILE, 'utf8');
  const policyFile = join(dir, 'policy.yaml');
  writeFileSync(policyFile, text);
  const policy = parsePolicy(text, policyFile);
  const taskNs = policy.broker.taskNamespace;

  // With the webhook: batch mode (1 s batches), https to a broker on a port chosen first.
  const port = await freePort();
  const webhookToken = randomBytes(32).toString('base64url');
  const withHook = await LocalCluster.start({ auditWebhook: { url: `https://127.0.0.1:${port}${PATH}`, token: webhookToken } });
  clusters.push(withHook);
  const without = await LocalCluster.start();
  clusters.push(without);

  const admin = kubeApis(adminConfig(withHook));
  for (const ns of ['team-a', 'team-b', 'agents', policy.broker.namespace, taskNs]) {
    await admin.core.createNamespace({ body: { metadata: { name: ns } } }).catch(() => undefined);
  }
  await applyPolicy(admin, policy, {});
  const brokerKubeconfig = writeTokenKubeconfig(join(dir, 'broker.kubeconfig'), withHook, await mintToken(admin, policy.broker.namespace, policy.broker.serviceAccount, [], 3600));
  const auditLog = join(dir, 'audit.jsonl');
  broker = await BrokerProcess.spawn(
    [MAIN, 'serve', '--config', policyFile, '--audit-log', auditLog, '--kubeconfig', brokerKubeconfig, '--listen', `127.0.0.1:${port}`,
      '--tls-cert', withHook.servingCert.cert, '--tls-key', withHook.servingCert.key, '--audit-webhook-token-file', withHook.auditWebhookTokenFile!, ...DEFAULT_TIMINGS],
    auditLog,
  );

  const kcWith = await benchUser(withHook, admin, taskNs, 'with');
  const kcWithout = await benchUser(without, kubeApis(adminConfig(without)), taskNs, 'without');
  // Each kubectl in a HOME of its own (its discovery cache), the same for every run.
  const home = join(dir, 'home');
  mkdirSync(home);
  const env = { PATH: process.env['PATH'] ?? '/usr/bin:/bin', HOME: home };
  const kubectl = async (kc: string) => {
    const t0 = performance.now();
    const res = await run(kubectlPath(), ['--kubeconfig', kc, 'get', 'pods', '-n', 'team-a'], env);
    if (res.code !== 0) throw new Error(`kubectl: ${res.stderr}`);
    return performance.now() - t0;
  };

  for (let i = 0; i < WARMUP; i++) {
    await kubectl(kcWith);
    await kubectl(kcWithout);
  }
  const times = { with: [] as number[], without: [] as number[] };
  for (let i = 0; i < RUNS; i++) {
    // Alternating which goes first, so neither always follows the other.
    if (i % 2 === 0) {
      times.with.push(await kubectl(kcWith));
      times.without.push(await kubectl(kcWithout));
    } else {
      times.without.push(await kubectl(kcWithout));
      times.with.push(await kubectl(kcWith));
    }
  }
  // Every request of the bench user was recorded by the broker (batches leave within 1 s).
  const expected = WARMUP + RUNS;
  let recorded = 0;
  for (let i = 0; i < 50 && recorded < expected; i++) {
    await sleep(200);
    recorded = readFileSync(auditLog, 'utf8').split('\n').filter((l) => l.includes('"type":"k8s.request"') && l.includes('"resource":"pods"')).length;
  }

  const ratio = median(times.with) / median(times.without);
  console.log(`\nkubectl get pods -n team-a, ${RUNS} runs each, alternating, after ${WARMUP} warm-up runs each\n`);
  console.log(
    table(
      ['API server', 'p50', 'p90', 'ratio (p50)', 'goal <= 1.05x'],
      [
        ['without audit webhook (baseline)', ms(median(times.without)), ms(percentile(times.without, 90)), '1.00x', ''],
        ['with audit webhook, batch mode, to a broker', ms(median(times.with)), ms(percentile(times.with, 90)), `${ratio.toFixed(3)}x`, met(ratio <= 1.05)],
      ],
    ),
  );
  console.log(`\nrequests of the bench user recorded by the broker: ${recorded} of ${expected}`);
  if (recorded < expected) process.exitCode = 1;
} finally {
  await cleanup();
}
