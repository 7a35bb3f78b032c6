/**
 * Audit webhook ingest: API server audit events into the broker's durable log through
 * `POST /v1/audit/kubernetes`, in batches of 400 (the API server's default batch size), posted one
 * after another as the API server's batch sender does when it keeps up, then 4 at a time (it sends each
 * batch from its own goroutine, so batches overlap when the broker is slower than the event rate).
 * Every event is a distinct request of a real task (its ServiceAccount and JTI), so every one becomes a
 * k8s.request record, fdatasync'd before the answer.
 *
 * Baseline, same run, same filesystem: the same records appended straight to an AuditLog in this
 * process, 400 at a time, each batch awaited (what the log alone can take; no HTTP, no JSON parsing,
 * no classification).
 *
 * Goal: >= 5,000 events/s; the p99 of a batch's answer is reported.
 *
 *   bin/bench kube-audit-ingest [--batches 100] [--size 400]
 */
import { randomBytes, randomUUID } from 'node:crypto';
import { rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { Agent, request } from 'undici';
import { classify, inRequestOrder, toRecord, type KubeAuditEvent } from '../src/audit/kube-events.ts';
import { AuditLog } from '../src/audit/log.ts';
import { verifyAuditFile } from '../src/audit/verify.ts';
import { DEFAULT_TIMINGS, median, met, ms, percentile, table, withEnv } from './_common.ts';

const { values: flags } = parseArgs({ options: { batches: { type: 'string', default: '100' }, size: { type: 'string', default: '400' } } });
const BATCHES = Number(flags.batches);
const SIZE = Number(flags.size);
const CONCURRENT = 4;
const GOAL = 5000;

/** One Metadata-level event of a `kubectl get pod` by the task, shaped as the API server sends it. */
function event(user: string, jti: string, i: number): Record<string, unknown> {
  const t = new Date().toISOString().replace('Z', '000Z');
  return {
    kind: 'Event',
    apiVersion: 'audit.k8s.io/v1',
    level: 'Metadata',
    auditID: randomUUID(),
    stage: 'ResponseComplete',
    requestURI: `/api/v1/namespaces/team-a/pods/web-${i}`,
    verb: 'get',
    user: { username: user, uid: randomUUID(), groups: ['system:serviceaccounts', 'system:serviceaccounts:task-broker', 'system:authenticated'], extra: { 'authentication.kubernetes.io/credential-id': [`JTI=${jti}`] } },
    sourceIPs: ['127.0.0.1'],
    userAgent: 'kubectl/v1.36.3 (linux/amd64) kubernetes/0000000',
    objectRef: { resource: 'pods', namespace: 'team-a', name: `web-${i}`, apiVersion: 'v1' },
    responseStatus: { metadata: {}, code: 200 },
    requestReceivedTimestamp: t,
    stageTimestamp: t,
    annotations: {
      'authorization.k8s.io/decision': 'allow',
      'authorization.k8s.io/reason': 'RBAC: allowed by RoleBinding "task-broker-x/team-a" of ClusterRole "task-broker:template:read-pods" to ServiceAccount "task-x/task-broker"',
    },
  };
}

const batchOf = (user: string, jti: string, n: number) => ({ kind: 'EventList', apiVersion: 'audit.k8s.io/v1', metadata: {}, items: Array.from({ length: n }, (_, i) => event(user, jti, i)) });

interface Run {
  eventsPerSecond: number;
  latencies: number[];
}

await withEnv(async (env) => {
  const tokenFile = join(env.dir, 'webhook.token');
  const token = randomBytes(32).toString('base64url');
  writeFileSync(tokenFile, `${token}\n`, { mode: 0o600 });
  const broker = await env.startBroker({ extraArgs: [...DEFAULT_TIMINGS, '--audit-webhook-token-file', tokenFile] });
  const agent = await env.agentToken('alpha');
  const start = await broker.request('POST', '/v1/tasks', agent, { template: 'read-pods', namespace: 'team-a', name: 'ingest' });
  const cred = await broker.request('POST', '/v1/tasks/ingest/credential', agent);
  if (start.status !== 201 || cred.status !== 200) throw new Error(`task: ${start.status} ${cred.status}`);
  const user = `system:serviceaccount:${env.policy.broker.taskNamespace}:task-${start.body.id}`;
  const task = { id: start.body.id as string, agent: 'alpha', name: 'ingest', template: 'read-pods', namespace: 'team-a' };
  const dispatcher = new Agent({ connections: CONCURRENT, keepAliveTimeout: 30_000 });

  const post = async (body: string): Promise<number> => {
    const t0 = performance.now();
    const res = await request(`${broker.url}/v1/audit/kubernetes`, {
      method: 'POST',
      dispatcher,
      headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
      body,
    });
    const answer = (await res.body.json()) as { recorded?: number };
    if (res.statusCode !== 200 || answer.recorded !== SIZE) throw new Error(`batch answered ${res.statusCode}: ${JSON.stringify(answer)}`);
    return performance.now() - t0;
  };

  /** Bodies made up front (fresh auditIDs each), so the clock covers the broker only. */
  const bodies = (n: number) => Array.from({ length: n }, () => JSON.stringify(batchOf(user, cred.body.jti, SIZE)));

  const webhook = async (concurrency: number): Promise<Run> => {
    const queue = bodies(BATCHES);
    const latencies: number[] = [];
    const t0 = performance.now();
    await Promise.all(
      Array.from({ length: concurrency }, async () => {
        for (let b = queue.shift(); b !== undefined; b = queue.shift()) latencies.push(await post(b));
      }),
    );
    return { eventsPerSecond: (BATCHES * SIZE) / ((performance.now() - t0) / 1000), latencies };
  };

  /** The same records straight into an AuditLog on the same filesystem, a batch at a time. */
  const baseline = async (): Promise<Run> => {
    const path = join(env.dir, 'baseline.jsonl');
    const log = await AuditLog.open(path);
    const batches = Array.from({ length: BATCHES }, () => {
      const { kept } = classify(batchOf(user, cred.body.jti, SIZE).items as unknown as KubeAuditEvent[], env.policy.broker.taskNamespace, () => undefined);
      return inRequestOrder(kept).map((c) => toRecord(c, task));
    });
    const latencies: number[] = [];
    const t0 = performance.now();
    for (const records of batches) {
      const b0 = performance.now();
      await Promise.all(records.map((r) => log.append(r)));
      latencies.push(performance.now() - b0);
    }
    const run = { eventsPerSecond: (BATCHES * SIZE) / ((performance.now() - t0) / 1000), latencies };
    await log.close();
    rmSync(path);
    return run;
  };

  await post(bodies(1)[0]!); // warm-up: connection, JIT
  const base = await baseline();
  const sequential = await webhook(1);
  const overlapping = await webhook(CONCURRENT);
  await dispatcher.close();
  await broker.stop();
  const verified = await verifyAuditFile(broker.auditLog);
  const recorded = broker.auditRecords().filter((r) => r.type === 'k8s.request').length;

  const rate = (r: Run) => `${Math.round(r.eventsPerSecond).toLocaleString('en-US')} events/s`;
  const lat = (r: Run) => `p50 ${ms(median(r.latencies))}, p99 ${ms(percentile(r.latencies, 99))}`;
  console.log(`\n${BATCHES} batches of ${SIZE} events each run; broker ${broker.url}, log ${broker.auditLog}\n`);
  console.log(
    table(
      ['run', 'throughput', 'batch answer', 'ratio to baseline', `goal >= ${GOAL} events/s`],
      [
        ['baseline: AuditLog.append, 400 at a time, in process', rate(base), lat(base), '1.00x', ''],
        ['webhook, batches one after another', rate(sequential), lat(sequential), `${(sequential.eventsPerSecond / base.eventsPerSecond).toFixed(2)}x`, met(sequential.eventsPerSecond >= GOAL)],
        [`webhook, ${CONCURRENT} batches in flight`, rate(overlapping), lat(overlapping), `${(overlapping.eventsPerSecond / base.eventsPerSecond).toFixed(2)}x`, met(overlapping.eventsPerSecond >= GOAL)],
      ],
    ),
  );
  console.log(`\nrecords in the broker's log: ${recorded} k8s.request (expected ${(2 * BATCHES + 1) * SIZE}); chain ${verified.ok ? 'verifies' : `BROKEN: ${JSON.stringify(verified)}`}`);
  if (!verified.ok || recorded !== (2 * BATCHES + 1) * SIZE) process.exitCode = 1;
});
