/**
 * Task start latency: POST /v1/tasks through the broker (then DELETE), made with the CLI's own client
 * (src/client/broker-client.ts: undici, one pooled connection) as `broker task start` makes it, N
 * sequential, against the floor
 * measured in the same run: the same Kubernetes calls made directly by a minimal client (create Secret,
 * create ServiceAccount, create RoleBinding, JSON-patch the Secret's state label; the same objects,
 * built with the broker's own model functions, as the broker's own identity, over one reused
 * connection: PooledKubeConfig), then deleting them. Broker and floor trials alternate, after a few
 * untimed warm-up rounds of each.
 *
 * The broker also makes two audit appends per start (write-ahead task.requested, then task.started),
 * each waiting for its fdatasync; their cost is measured on its own (AuditLog on the same filesystem).
 * The second is written beside the last API call (the activating patch), so only what it takes
 * beyond that call is on the path.
 *
 * The start also signs the task record before creating its Secret: with the key the broker holds (read
 * at most 5 s earlier; always the case here, one start following another), while the signing key
 * Secret is read afresh, awaited only before the activating patch (src/state-signature.ts,
 * startPendingSigning). With no key held, the start waits for that read, overlapped with the
 * write-ahead fsync of task.requested. What a signature with a fresh read costs is measured on its
 * own too (the same StateSigner, the broker's identity), beside what a single write-ahead append
 * costs: the part of it the fsync does not hide is what a start with no key held pays.
 *
 * Goal: broker p50 <= 1.0x floor p50 (the floor is four calls one after the other; the broker makes
 * the ServiceAccount and the RoleBinding at once, so three round trips are on its path).
 *
 *   bin/bench task-start [N=30] [--profile DIR] [--baseline-checkout DIR]
 *
 * --baseline-checkout DIR also runs a broker from another checkout (DIR/src/cli/main.ts: an earlier
 * commit, say) and times its starts in the same rounds, for a before/after ratio from one run.
 *
 * --profile DIR runs the broker with `--cpu-prof --cpu-prof-dir=DIR`.
 */
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { loadavg } from 'node:os';
import { AuditLog } from '../src/audit/log.ts';
import { ApprovalKeys } from '../src/approvals/token.ts';
import { StateSigner } from '../src/state-signature.ts';
import { BrokerClient } from '../src/client/broker-client.ts';
import { kubeApis, loadKubeConfig, type KubeApis } from '../src/kube/config.ts';
import {
  LABEL,
  newTaskId,
  roleBindingNameFor,
  secretNameFor,
  serviceAccountNameFor,
  taskAnnotations,
  taskFacts,
  taskLabels,
  templateClusterRole,
  type Task,
} from '../src/tasks/model.ts';
import { DEFAULT_TIMINGS, median, met, ms, percentile, startCheckoutBroker, table, withEnv } from './_common.ts';

const { values: flags, positionals } = parseArgs({ options: { profile: { type: 'string' }, 'baseline-checkout': { type: 'string' } }, allowPositionals: true });
const baselineCheckout = flags['baseline-checkout'] ? resolve(flags['baseline-checkout']) : undefined;
const N = Number(positionals[0] ?? 30);
const WARMUP = 3;
const TEMPLATE = 'read-pods';
const NAMESPACE = 'team-a';

/**
 * The floor's task record, signed beforehand (untimed) with the broker's key as the broker signs its
 * own: an unsigned task Secret would be taken by the brokers' task watch for a forged record, and
 * revoked (deleted) under the floor's feet.
 */
async function floorTask(signer: StateSigner, name: string): Promise<Task> {
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
  task.signature = await signer.sign('task', taskFacts(task));
  return task;
}

/** The floor: what the broker asks of the API server for one start, and one end. */
async function floorStart(kube: KubeApis, taskNs: string, task: Task): Promise<Task> {
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

const loadAtStart = loadavg().map((l) => l.toFixed(2)).join(' ');

await withEnv(async (env) => {
  const taskNs = env.policy.broker.taskNamespace;
  const broker = await env.startBroker({
    extraArgs: DEFAULT_TIMINGS,
    ...(flags.profile ? { env: { NODE_OPTIONS: `--cpu-prof --cpu-prof-dir=${flags.profile}` } } : {}),
  });
  const other = baselineCheckout ? await startCheckoutBroker(env, baselineCheckout, { auditLog: join(env.dir, 'audit-baseline.jsonl'), extraArgs: DEFAULT_TIMINGS }) : undefined;
  const otherStart: number[] = [];
  const token = await env.agentToken('alpha');
  // The broker is called as `broker task start` calls it: the CLI's own client (undici, one pooled
  // connection), as the floor calls the API server with the broker's own client.
  const client = (url: string) => new BrokerClient({ env: { BROKER_URL: url, BROKER_IDENTITY_TOKEN: token } });
  const api = client(broker.url);
  const otherApi = other ? client(other.url) : undefined;
  // The broker's own identity and connection handling, for the floor.
  const kube = kubeApis(loadKubeConfig(env.brokerKubeconfig));
  const floorSigner = new StateSigner(new ApprovalKeys(kube, env.policy.broker.namespace));

  const brokerGet: number[] = [];
  const brokerStart: number[] = [];
  const brokerEnd: number[] = [];
  const floorStarts: number[] = [];
  const floorEnds: number[] = [];
  for (let i = 0; i < WARMUP + N; i++) {
    const timed = i >= WARMUP;
    // floor
    const record = await floorTask(floorSigner, `floor-${i}`);
    let t0 = performance.now();
    const task = await floorStart(kube, taskNs, record);
    let t1 = performance.now();
    await floorEnd(kube, taskNs, task);
    let t2 = performance.now();
    if (timed) {
      floorStarts.push(t1 - t0);
      floorEnds.push(t2 - t1);
    }
    // broker: a call with no cluster work (HTTP round trip, authentication from cache), then the start
    t0 = performance.now();
    await api.listTasks();
    if (timed) brokerGet.push(performance.now() - t0);
    t0 = performance.now();
    const started = await api.startTask({ template: TEMPLATE, namespace: NAMESPACE, name: `bench-${i}` });
    t1 = performance.now();
    await api.endTask(started.id);
    t2 = performance.now();
    if (timed) {
      brokerStart.push(t1 - t0);
      brokerEnd.push(t2 - t1);
    }
    if (otherApi) {
      t0 = performance.now();
      const r = await otherApi.startTask({ template: TEMPLATE, namespace: NAMESPACE, name: `base-${i}` });
      t1 = performance.now();
      await otherApi.endTask(r.id);
      if (timed) otherStart.push(t1 - t0);
    }
  }
  await api.close();
  await otherApi?.close();
  await broker.stop();
  await other?.stop();

  // The two write-ahead records of a start, each waiting for its own fdatasync, on the same filesystem.
  const audit = await AuditLog.open(join(env.dir, 'fsync-cost.jsonl'));
  const fsyncPairs: number[] = [];
  const fsyncOne: number[] = [];
  // A task record's signature as the broker makes it: its own StateSigner, its identity, no cache.
  const signer = new StateSigner(new ApprovalKeys(kube, env.policy.broker.namespace));
  const signs: number[] = [];
  for (let i = 0; i < WARMUP + N; i++) {
    const base = { actor: 'agent:alpha', agent: 'alpha', template: TEMPLATE, namespace: NAMESPACE, task: newTaskId(), taskName: `bench-${i}` } as const;
    let t0 = performance.now();
    await audit.append({ ...base, type: 'task.requested', outcome: 'ok' });
    const t1 = performance.now();
    await audit.append({ ...base, type: 'task.started', outcome: 'allowed' });
    if (i >= WARMUP) (fsyncPairs.push(performance.now() - t0), fsyncOne.push(t1 - t0));
    const now = new Date();
    const facts = taskFacts({ id: base.task, name: base.taskName, agent: 'alpha', template: TEMPLATE, namespace: NAMESPACE, createdAt: now, expiresAt: now, secretName: secretNameFor('alpha', base.taskName) });
    t0 = performance.now();
    await signer.sign('task', facts);
    if (i >= WARMUP) signs.push(performance.now() - t0);
  }
  await audit.close();

  const ratio = median(brokerStart) / median(floorStarts);
  const unhidden = Math.max(0, median(signs) - median(fsyncOne));
  const row = (what: string, xs: number[]) => [what, ms(median(xs)), ms(percentile(xs, 90)), ms(Math.min(...xs)), ms(Math.max(...xs))];
  console.log(`task start, N=${N} sequential (after ${WARMUP} warm-up rounds), template ${TEMPLATE} in ${NAMESPACE}, loopback; load average at the start ${loadAtStart}, at the end ${loadavg().map((l) => l.toFixed(2)).join(' ')}`);
  console.log(
    table(
      ['', 'p50', 'p90', 'min', 'max'],
      [
        row('floor: 4 API calls (create Secret, SA, RoleBinding; patch Secret)', floorStarts),
        row('broker: POST /v1/tasks', brokerStart),
        ...(other ? [row(`baseline checkout ${baselineCheckout}: POST /v1/tasks`, otherStart)] : []),
        row('  of which 2 audit appends + fdatasync (measured alone)', fsyncPairs),
        row('  of which HTTP round trip + auth (GET /v1/tasks, measured alone)', brokerGet),
        row('  signing with a fresh key read (StateSigner.sign, measured alone)', signs),
        row('  the write-ahead append it overlaps (measured alone)', fsyncOne),
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
        ['broker start p50 <= 1.0x floor p50', `${ms(median(brokerStart))} / ${ms(median(floorStarts))} = ${ratio.toFixed(2)}x`, met(ratio <= 1.0)],
        ['(info) a fresh-read signature not hidden by the write-ahead fsync (on the path only with no key held), p50', `${ms(median(signs), 2)} - ${ms(median(fsyncOne), 2)} = ${ms(unhidden, 2)} (${((100 * unhidden) / median(brokerStart)).toFixed(1)}% of the start)`, ''],
        ['(info) audit fsyncs, share of broker p50', `${ms(median(fsyncPairs), 2)} = ${((100 * median(fsyncPairs)) / median(brokerStart)).toFixed(1)}%`, ''],
        ...(other ? [['(info) this tree / baseline checkout, p50', `${(median(brokerStart) / median(otherStart)).toFixed(2)}x (baseline ${(median(otherStart) / median(floorStarts)).toFixed(2)}x of the floor)`, '']] : []),
        ['(info) end: broker p50 / floor p50', `${(median(brokerEnd) / median(floorEnds)).toFixed(2)}x`, ''],
      ],
    ),
  );
});
