/**
 * The exec plugin's cost, measured against baselines in the same run:
 *  1. whole-process wall time of the plugin (the native build, the Node build, and `broker credential`
 *     through the bin/broker sh launcher) against `node -e 0` on the same Node, with the broker
 *     holding a valid token. Goal: <= 1.3x.
 *  2. `kubectl get pods` through the exec entry against the same kubectl with a kubeconfig that holds the
 *     same token directly. Goal: <= 1.25x. (The task grants pods in one namespace; a cluster-scoped
 *     `get namespaces` would be refused either way, so pods are the read that both can do.)
 * Runs alternate between the two sides so that machine noise falls on both.
 *
 *   bin/bench plugin [RUNS=30]
 */
import { spawnSync } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { kubectlPath } from '../src/cluster/local-cluster.ts';
import { execKubeconfig } from '../src/client/kubeconfig.ts';
import { writeTokenKubeconfig } from '../test/helpers/kube.ts';
import { median, percentile, table, withEnv } from './_common.ts';

const runs = Number(process.argv[2] ?? 30);
const root = new URL('../', import.meta.url).pathname;

function time(cmd: string, args: string[], env: NodeJS.ProcessEnv): number {
  const t0 = process.hrtime.bigint();
  const res = spawnSync(cmd, args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
  const ms = Number(process.hrtime.bigint() - t0) / 1e6;
  if (res.status !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${res.status}: ${res.stderr}`);
  return ms;
}

await withEnv(async (env) => {
  const broker = await env.startBroker();
  const token = await env.agentToken('alpha');
  const start = await broker.request('POST', '/v1/tasks', token, { template: 'read-pods', namespace: 'team-a', name: 'bench', ttl: '1h' });
  if (start.status !== 201) throw new Error(JSON.stringify(start.body));
  const cred = await broker.request('POST', '/v1/tasks/bench/credential', token);
  const dir = join(env.dir, 'bench');
  mkdirSync(dir);
  const identityFile = join(dir, 'identity');
  writeFileSync(identityFile, token, { mode: 0o600 });
  const agentEnv: NodeJS.ProcessEnv = {
    PATH: process.env['PATH'],
    HOME: dir,
    BROKER_URL: broker.url,
    BROKER_IDENTITY_TOKEN_FILE: identityFile,
    KUBERNETES_EXEC_INFO: JSON.stringify({ apiVersion: 'client.authentication.k8s.io/v1', kind: 'ExecCredential', spec: { interactive: false } }),
  };

  // 1. Start-up.
  const node: number[] = [];
  const launcher: number[] = [];
  const entry: number[] = [];
  const native: number[] = [];
  for (let i = 0; i < runs + 3; i++) {
    const a = time(process.execPath, ['-e', '0'], agentEnv);
    const b = time(join(root, 'bin/broker'), ['credential', '--task', 'bench'], agentEnv);
    const c = time(process.execPath, [join(root, 'dist/credential/main.cjs'), '--task', 'bench'], agentEnv);
    const d = time(join(root, '.cache/bin/broker-credential'), ['--task', 'bench'], agentEnv);
    if (i >= 3) (node.push(a), launcher.push(b), entry.push(c), native.push(d)); // the first runs warm the page cache
  }

  // 2. kubectl through the exec entry vs the same token held directly.
  const execKc = join(dir, 'exec.kubeconfig');
  const caData = Buffer.from(env.cluster.caPem).toString('base64');
  writeFileSync(execKc, execKubeconfig({ task: 'bench', server: env.cluster.server, certificateAuthorityData: caData, broker: broker.url }), { mode: 0o600 });
  const tokenKc = writeTokenKubeconfig(join(dir, 'token.kubeconfig'), env.cluster, cred.body.token);
  const kubectlEnv = { ...agentEnv, KUBERNETES_EXEC_INFO: undefined };
  const nodeKc = join(dir, 'exec-node.kubeconfig');
  writeFileSync(nodeKc, execKubeconfig({ task: 'bench', server: env.cluster.server, certificateAuthorityData: caData, broker: broker.url, plugin: 'node' }), { mode: 0o600 });
  const direct: number[] = [];
  const viaExec: number[] = [];
  const viaNode: number[] = [];
  for (let i = 0; i < runs + 3; i++) {
    const a = time(kubectlPath(), ['--kubeconfig', tokenKc, 'get', 'pods', '-n', 'team-a'], kubectlEnv);
    const b = time(kubectlPath(), ['--kubeconfig', execKc, 'get', 'pods', '-n', 'team-a'], kubectlEnv);
    const c = time(kubectlPath(), ['--kubeconfig', nodeKc, 'get', 'pods', '-n', 'team-a'], kubectlEnv);
    if (i >= 3) (direct.push(a), viaExec.push(b), viaNode.push(c));
  }

  const f = (ms: number) => `${ms.toFixed(1)} ms`;
  const row = (what: string, xs: number[], base: number[], goal?: number) => {
    const ratio = median(xs) / median(base);
    return [what, f(median(xs)), f(percentile(xs, 90)), `${ratio.toFixed(2)}x`, goal ? `<= ${goal}x ${ratio <= goal ? 'met' : 'NOT met'}` : ''];
  };
  console.log(`runs: ${runs} each, alternating; Node ${process.version}\n`);
  console.log(
    table(
      ['what', 'p50', 'p90', 'vs baseline', 'goal'],
      [
        ['node -e 0 (baseline)', f(median(node)), f(percentile(node, 90)), '1.00x', ''],
        row('native plugin (as kubeconfigs run it when built)', native, node, 1.3),
        row('Node plugin, node dist/credential/main.cjs', entry, node, 1.3),
        row('broker credential (bin/broker sh launcher -> native)', launcher, node),
        ['kubectl get pods, token in kubeconfig (baseline)', f(median(direct)), f(percentile(direct, 90)), '1.00x', ''],
        row('kubectl get pods through the exec entry (native)', viaExec, direct, 1.25),
        row('kubectl get pods through the exec entry (Node)', viaNode, direct, 1.25),
      ],
    ),
  );
  await broker.stop();
});
