/**
 * Task start latency: POST /v1/tasks through the broker (then DELETE), N sequential, against the floor
 * measured in the same run: the same Kubernetes calls made directly by a minimal client (create Secret,
 * create ServiceAccount, create RoleBinding, JSON-patch the Secret's state label; the same objects,
 * built with the broker's own model functions, as the broker's own identity, over one reused
 * connection: PooledKubeConfig), then deleting them. Broker and floor trials alternate, after a few
 * untimed warm-up rounds of each.
 *
 * The broker also makes two audit appends per start (write-ahead task.requested, then task.started),
 * each waiting for its fdatasync; their cost is measured on its own (AuditLog on the same filesystem).
 *
 * Goal: broker p50 <= 1.3x floor p50.
 *
 *   bin/bench task-start [N=30] [--profile DIR]
 *
 * --profile DIR runs the broker with `--cpu-prof --cpu-prof-dir=DIR`.
 */
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { AuditLog } from '../src/audit/log.ts';
import { kubeApis, loadKubeConfig, type KubeApis } from '../src/kube/config.ts';
import {
  LABEL,
  newTaskId,
  roleBindingNameFor,
  secretNameFor,
  serviceAccountNameFor,
  taskAnnotations,
  taskLabels,
  templateClusterRole,
  type Task,
} from '../src/tasks/model.ts';
import { DEFAULT_TIMINGS, median, met, ms, percentile, table, withEnv } from './_common.ts';

const { values: flags, positionals } = parseArgs({ options: { profile: { type: 'string' } }, allowPositionals: true });
const N = Number(positionals[0] ?? 30);
const WARMUP = 3;
const TEMPLATE = 'read-pods';
const NAMESPACE = 'team-a';

/** The floor: what the broker asks of the API server for one start, and one end. */
async function floorStart(kube: KubeApis, taskNs: string, name: string): Promise<Task> {
  const now = new Date();
  const id = newTaskId();
  const task: Task = {
    id,
    name,
    agent: 'alpha',
    template: TEMPLATE,
    namespace: NAMESPACE,
    createdAt: now,
    expiresAt: new Date(now.getTime() + 900_000),
    state: 'pending',
    secretName: secretNameFor('alpha', name),
    serviceAccount: serviceAccountNameFor(id),
    roleBinding: roleBindingNameFor(id),
  };
  const labels = taskLabels(task);
  const annotations = taskAnnotations(task);
  await kube.core.createNamespacedSecret({
    namespace: taskNs,
    body: { metadata: { name: task.secretName, labels: { ...labels, [LABEL.state]: 'pending' }, annotations }, type: 'Opaque' },
  });
  await kube.core.createNamespacedServiceAccount({ namespace: taskNs, body: { metadata: { name: task.serviceAccount, labels, annotations } } });
  await kube.rbac.createNamespacedRoleBinding({
    namespace: NAMESPACE,
    body: {
      metadata: { name: task.roleBinding, labels, annotations },
      roleRef: { apiGroup: 'rbac.authorization.k8s.io', kind: 'ClusterRole', name: templateClusterRole(TEMPLATE) },
      subjects: [{ kind: 'ServiceAccount', name: task.serviceAccount, namespace: taskNs }],
    },
  });
  await kube.core.patchNamespacedSecret({
    name: task.secretName,
    namespace: taskNs,
    body: [{ op: 'replace', path: `/metadata/labels/${LABEL.state.replace('/', '~1')}`, value: 'active' }],
  });
  return task;
}

async function floorEnd(kube: KubeApis, taskNs: string, task: Task): Promise<void> {
  await kube.rbac.deleteNamespacedRoleBinding({ name: task.roleBinding, namespace: task.namespace });
  await kube.core.deleteNamespacedSecret({ name: task.secretName, namespace: taskNs });
  await kube.core.deleteNamespacedServiceAccount({ name: task.serviceAccount, namespace: taskNs });
}

await withEnv(async (env) => {
  const taskNs = env.policy.broker.taskNamespace;
  const broker = await env.startBroker({
    extraArgs: DEFAULT_TIMINGS,
    ...(flags.profile ? { env: { NODE_OPTIONS: `--cpu-prof --cpu-prof-dir=${flags.profile}` } } : {}),
  });
  const token = await env.agentToken('alpha');
  // The broker's own identity and connection handling, for the floor.
  const kube = kubeApis(loadKubeConfig(env.brokerKubeconfig));

  const brokerGet: number[] = [];
  const brokerStart: number[] = [];
  const brokerEnd: number[] = [];
  const floorStarts: number[] = [];
  const floorEnds: number[] = [];
  for (let i = 0; i < WARMUP + N; i++) {
    const timed = i >= WARMUP;
    // floor
    let t0 = performance.now();
    const task = await floorStart(kube, taskNs, `floor-${i}`);
    let t1 = performance.now();
    await floorEnd(kube, taskNs, task);
    let t2 = performance.now();
    if (timed) {
      floorStarts.push(t1 - t0);
      floorEnds.push(t2 - t1);
    }
    // broker: a call with no cluster work (HTTP round trip, authentication from cache), then the start
    t0 = performance.now();
    await broker.request('GET', '/v1/tasks', token);
    if (timed) brokerGet.push(performance.now() - t0);
    t0 = performance.now();
    const res = await broker.request('POST', '/v1/tasks', token, { template: TEMPLATE, namespace: NAMESPACE, name: `bench-${i}` });
    t1 = performance.now();
    if (res.status !== 201) throw new Error(`task start: ${res.status} ${JSON.stringify(res.body)}`);
    const del = await broker.request('DELETE', `/v1/tasks/${res.body.id}`, token);
    t2 = performance.now();
    if (del.status !== 200) throw new Error(`task end: ${del.status} ${JSON.stringify(del.body)}`);
    if (timed) {
      brokerStart.push(t1 - t0);
      brokerEnd.push(t2 - t1);
    }
  }
  await broker.stop();

  // The two write-ahead records of a start, each waiting for its own fdatasync, on the same filesystem.
  const audit = await AuditLog.open(join(env.dir, 'fsync-cost.jsonl'));
  const fsyncPairs: number[] = [];
  for (let i = 0; i < WARMUP + N; i++) {
    const base = { actor: 'agent:alpha', agent: 'alpha', template: TEMPLATE, namespace: NAMESPACE, task: newTaskId(), taskName: `bench-${i}` } as const;
    const t0 = performance.now();
    await audit.append({ ...base, type: 'task.requested', outcome: 'ok' });
    await audit.append({ ...base, type: 'task.started', outcome: 'allowed' });
    if (i >= WARMUP) fsyncPairs.push(performance.now() - t0);
  }
  await audit.close();

  const ratio = median(brokerStart) / median(floorStarts);
  const row = (what: string, xs: number[]) => [what, ms(median(xs)), ms(percentile(xs, 90)), ms(Math.min(...xs)), ms(Math.max(...xs))];
  console.log(`task start, N=${N} sequential (after ${WARMUP} warm-up rounds), template ${TEMPLATE} in ${NAMESPACE}, loopback`);
  console.log(
    table(
      ['', 'p50', 'p90', 'min', 'max'],
      [
        row('floor: 4 API calls (create Secret, SA, RoleBinding; patch Secret)', floorStarts),
        row('broker: POST /v1/tasks', brokerStart),
        row('  of which 2 audit appends + fdatasync (measured alone)', fsyncPairs),
        row('  of which HTTP round trip + auth (GET /v1/tasks, measured alone)', brokerGet),
        row('floor: 3 deletes (RoleBinding, Secret, SA)', floorEnds),
        row('broker: DELETE /v1/tasks/{id}', brokerEnd),
      ],
    ),
  );
  console.log('');
  console.log(
    table(
      ['goal', 'figure', 'result'],
      [
        ['broker start p50 <= 1.3x floor p50', `${ms(median(brokerStart))} / ${ms(median(floorStarts))} = ${ratio.toFixed(2)}x`, met(ratio <= 1.3)],
        ['(info) audit fsyncs, share of broker p50', `${ms(median(fsyncPairs), 2)} = ${((100 * median(fsyncPairs)) / median(brokerStart)).toFixed(1)}%`, ''],
        ['(info) end: broker p50 / floor p50', `${(median(brokerEnd) / median(floorEnds)).toFixed(2)}x`, ''],
      ],
    ),
  );
});
