/**
 * Three broker processes on one PostgreSQL audit store (src/audit/postgres.ts) and one real API server:
 * one task's story told by all three in one chain, webhook batches recorded once whichever replica
 * gets them, the brokers failing closed while the database is away and taking up again when it
 * returns, and tampering in the database named by `broker audit verify`.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { freePort } from '../../src/cluster/local-cluster.ts';
import { brokerCli as cli, BrokerEnv, type BrokerProcess } from '../helpers/broker.ts';
import { kubectl, writeTokenKubeconfig } from '../helpers/kube.ts';
import { TestPostgres } from '../helpers/postgres.ts';
import { auditTime, eventList, podEvent, taskUser } from '../helpers/kube-audit-events.ts';
import { until } from '../helpers/wait.ts';

const WEBHOOK = '/v1/audit/kubernetes';

describe('three brokers on one PostgreSQL audit store', () => {
  let pg: TestPostgres | undefined;
  let env: BrokerEnv | undefined;
  let brokers: BrokerProcess[] = [];
  let alpha: string;
  let store: string;
  let webhookToken: string;

  before(async () => {
    pg = await TestPostgres.start();
    const migrated = cli(['audit', 'migrate', pg.url('postgres'), '--grant', 'task_broker']);
    assert.equal(migrated.status, 0, migrated.stderr);
    env = await BrokerEnv.start();
    alpha = await env.agentToken('alpha');
    webhookToken = randomBytes(24).toString('base64url');
    const tokenFile = join(env.dir, 'webhook.token');
    writeFileSync(tokenFile, webhookToken + '\n', { mode: 0o600 });
    store = pg.url('task_broker');
    brokers = await Promise.all([0, 1, 2].map(() => env!.startBroker({ auditStore: store, extraArgs: ['--audit-webhook-token-file', tokenFile] })));
  });

  after(async () => {
    for (const b of brokers) await b.stop().catch(() => undefined);
    await env?.stop();
    await pg?.remove();
  });

  const post = (b: BrokerProcess, body: unknown) =>
    fetch(b.url + WEBHOOK, { method: 'POST', headers: { authorization: `Bearer ${webhookToken}`, 'content-type': 'application/json' }, body: JSON.stringify(body) });

  test('a task started on one, its credential from another, ended on the third: one story, in order, on one chain', async () => {
    const [one, two, three] = brokers as [BrokerProcess, BrokerProcess, BrokerProcess];
    const start = await one.request('POST', '/v1/tasks', alpha, { template: 'read-pods', namespace: 'team-a', name: 'shared', ttl: '10m', reason: 'three replicas' });
    assert.equal(start.status, 201, JSON.stringify(start.body));
    const id = start.body.id as string;
    // The second broker sees the task through the cluster (its watch), then mints for it.
    const cred = await until('the second broker to serve the task', 15_000, async () => {
      const r = await two.request('POST', '/v1/tasks/shared/credential', alpha);
      return r.status === 200 ? r : undefined;
    });
    const kc = writeTokenKubeconfig(join(env!.dir, 'shared.kubeconfig'), env!.cluster, cred.body.token);
    assert.equal((await kubectl(kc, 'get', 'pods', '-n', 'team-a')).code, 0);
    const asked = new Date();
    const ended = await until('the third broker to end the task', 15_000, async () => {
      const r = await three.request('DELETE', '/v1/tasks/shared', alpha);
      return r.status === 200 ? r : undefined;
    });
    assert.equal(ended.status, 200);

    // The API server's batch, retried to every replica (after the end; placed by when it was received).
    const batch = eventList([podEvent({ username: taskUser(env!.policy.broker.taskNamespace, id), name: null, time: auditTime(asked) })]);
    const answers = await Promise.all(brokers.map(async (b) => (await post(b, batch)).json() as Promise<{ recorded: number; duplicates: number }>));
    assert.deepEqual(answers.map((a) => a.recorded + a.duplicates), [1, 1, 1]);
    const requests = await pg!.query<{ n: string }>('postgres', `SELECT count(*) AS n FROM task_broker.audit WHERE type = 'k8s.request' AND task = $1`, [id]);
    assert.equal(requests.rows[0]!.n, '1', 'recorded once, whichever replicas got the batch');

    const shown = cli(['audit', 'show', '--task', id, store]);
    assert.equal(shown.status, 0, shown.stderr);
    const story = shown.stdout;
    const order = [/task requested: read-pods in team-a/, /task started/, /credential minted jti/, /ALLOW list pods -n team-a/, /task ended/];
    let at = 0;
    for (const re of order) {
      const m = re.exec(story.slice(at));
      assert.ok(m, `${re} after position ${at} in:\n${story}`);
      at += m.index + m[0].length;
    }
    assert.ok(!story.includes(pg!.brokerPassword) && !shown.stderr.includes(pg!.brokerPassword));

    // Each step was recorded by the broker that served it: three writers, one chain.
    const pids = await pg!.query<{ line: string }>('postgres', `SELECT line FROM task_broker.audit WHERE type = 'broker.started' ORDER BY seq`);
    assert.deepEqual(new Set(pids.rows.map((r) => JSON.parse(r.line).details.pid as number)), new Set(brokers.map((b) => b.pid)));
    const verified = cli(['audit', 'verify', store]);
    assert.equal(verified.status, 0, verified.stderr);
    assert.match(verified.stdout, /^ok: \d+ records, last hash [0-9a-f]{64}\n$/);
    for (const b of brokers) assert.ok(!b.stderr.includes(pg!.brokerPassword), 'no broker prints the password');
    const leaked = await pg!.query('postgres', `SELECT 1 FROM task_broker.audit WHERE line LIKE $1`, [`%${pg!.brokerPassword}%`]);
    assert.equal(leaked.rowCount, 0, 'no record holds the password');
  });

  test('the database stopped: every broker fails closed (503, nothing minted, nothing started) and takes up again when it returns', async () => {
    const [one, two, three] = brokers as [BrokerProcess, BrokerProcess, BrokerProcess];
    const start = await one.request('POST', '/v1/tasks', alpha, { template: 'read-pods', namespace: 'team-a', name: 'outage', ttl: '10m' });
    assert.equal(start.status, 201, JSON.stringify(start.body));
    await until('the third broker to see the task', 15_000, async () => (await three.request('GET', '/v1/tasks', alpha)).body.tasks?.some((t: { name: string }) => t.name === 'outage'));
    const objects = await env!.taskObjects();
    await pg!.pause();
    try {
      for (const b of brokers) {
        const cred = await b.request('POST', '/v1/tasks/outage/credential', alpha);
        assert.equal(cred.status, 503, JSON.stringify(cred.body));
        assert.equal(cred.body.token, undefined, 'no token in a refusal');
        assert.equal(cred.body.error?.code, 'audit_unavailable');
      }
      const refused = await two.request('POST', '/v1/tasks', alpha, { template: 'read-pods', namespace: 'team-a', name: 'during-outage', ttl: '10m' });
      assert.equal(refused.status, 503, JSON.stringify(refused.body));
      assert.deepEqual(await env!.taskObjects(), objects, 'nothing started while the store is away');
      for (const b of brokers) assert.equal((await b.request('GET', '/readyz', undefined)).status, 503);
    } finally {
      await pg!.resume();
    }
    for (const b of brokers) await until('the broker to be ready again', 15_000, async () => (await b.request('GET', '/readyz', undefined)).status === 200);
    for (const b of brokers) assert.equal((await b.request('POST', '/v1/tasks/outage/credential', alpha)).status, 200);
    assert.equal((await two.request('DELETE', '/v1/tasks/outage', alpha)).status, 200);
    const none = await pg!.query('postgres', `SELECT 1 FROM task_broker.audit WHERE line LIKE '%during-outage%'`);
    assert.equal(none.rowCount, 0);
    assert.equal(cli(['audit', 'verify', store]).status, 0);
  });

  test('kill -9 of one replica under load: the others carry on, and every credential answered is on the chain', async () => {
    const [one, two] = brokers as [BrokerProcess, BrokerProcess, BrokerProcess];
    const start = await one.request('POST', '/v1/tasks', alpha, { template: 'read-pods', namespace: 'team-a', name: 'load', ttl: '10m' });
    assert.equal(start.status, 201, JSON.stringify(start.body));
    const id = start.body.id as string;
    for (const b of brokers) await until('every broker to see the task', 15_000, async () => (await b.request('GET', '/v1/tasks', alpha)).body.tasks?.some((t: { name: string }) => t.name === 'load'));
    // One mint per broker first: concurrent first requests share one mint (tasks/service.ts #mintOnce),
    // recorded once under the first request's id; every later answer is a credential.served of its own.
    for (const b of brokers) assert.equal((await b.request('POST', '/v1/tasks/load/credential', alpha)).status, 200);
    const acked: Array<{ broker: number; requestId: string; afterKill: boolean }> = [];
    let killed = false;
    let stop = false;
    const loop = async (i: number) => {
      const b = brokers[i]!;
      while (!stop) {
        try {
          const res = await fetch(`${b.url}/v1/tasks/load/credential`, { method: 'POST', headers: { authorization: `Bearer ${alpha}` } });
          const body = (await res.json()) as { token?: string };
          if (res.status === 200 && body.token) acked.push({ broker: i, requestId: res.headers.get('x-request-id')!, afterKill: killed });
          if (res.status === 429) await new Promise((r) => setTimeout(r, 20));
        } catch {
          if (i === 1 && killed) return; // the killed replica's connections fail: expected
          await new Promise((r) => setTimeout(r, 20));
        }
      }
    };
    const loops = [0, 1, 2].flatMap((i) => [loop(i), loop(i), loop(i), loop(i)]);
    await new Promise((r) => setTimeout(r, 1500));
    killed = true;
    two.kill('SIGKILL');
    await new Promise((r) => setTimeout(r, 1500));
    stop = true;
    await Promise.all(loops);
    assert.ok(acked.some((a) => a.broker === 1), 'the killed replica answered before it was killed');
    for (const i of [0, 2]) assert.ok(acked.some((a) => a.broker === i && a.afterKill), `replica ${i} carried on after the kill`);
    const rows = await pg!.query<{ line: string }>('postgres', `SELECT line FROM task_broker.audit WHERE task = $1 AND type LIKE 'credential.%'`, [id]);
    const recorded = new Set(rows.rows.map((r) => JSON.parse(r.line).requestId as string));
    const lost = acked.filter((a) => !recorded.has(a.requestId));
    assert.deepEqual(lost, [], `${acked.length} credentials answered, ${recorded.size} recorded`);
    const verified = cli(['audit', 'verify', store]);
    assert.equal(verified.status, 0, verified.stderr);
    // A replacement replica, as a Deployment would start.
    brokers[1] = await env!.startBroker({ auditStore: store });
    assert.equal((await brokers[1].request('DELETE', '/v1/tasks/load', alpha)).status, 200);
  });

  test('a store migrated by an older version (no append function): a broker refuses to start, naming `broker audit migrate`; migrated, it starts', async () => {
    await pg!.query('postgres', 'CREATE DATABASE audit_old');
    const owner = pg!.url('postgres', 'audit_old');
    assert.equal(cli(['audit', 'migrate', owner, '--grant', 'task_broker']).status, 0);
    const admin = pg!.client('postgres', 'audit_old');
    await admin.connect();
    await admin.query('DROP FUNCTION task_broker.append_audit(bigint, text, timestamptz, text[], text[], text[], text)').finally(() => admin.end());
    const old = pg!.url('task_broker', 'audit_old');
    const serve = ['serve', '--config', env!.policyFile, '--audit-store', old, '--kubeconfig', env!.brokerKubeconfig, '--listen', '127.0.0.1:0', '--insecure-http'];
    const refused = cli(serve);
    assert.equal(refused.status, 5, refused.stderr);
    assert.match(refused.stderr, /has no function task_broker\.append_audit, which this version of the broker appends with: run `broker audit migrate postgres:\/\/task_broker:\*\*\*@127\.0\.0\.1:\d+\/audit_old` of this version first/);
    assert.ok(!refused.stderr.includes(pg!.brokerPassword), 'no password in the message');
    assert.equal(cli(['audit', 'migrate', owner, '--grant', 'task_broker']).status, 0);
    const started = await env!.startBroker({ auditStore: old });
    try {
      assert.equal((await started.request('GET', '/readyz', undefined)).status, 200);
    } finally {
      await started.stop();
    }
    const verified = cli(['audit', 'verify', old, '-o', 'json']);
    assert.equal(verified.status, 0, verified.stderr);
    assert.ok(JSON.parse(verified.stdout).records >= 1, 'the broker recorded its start through the function');
  });

  test('policy apply --end-affected-tasks --audit-store: the task it ends and the apply are on the brokers\' chain; a store it cannot use stops it before anything changes', async () => {
    const [one, two] = brokers as [BrokerProcess, BrokerProcess, BrokerProcess];
    const start = await one.request('POST', '/v1/tasks', alpha, { template: 'configmap-writer', namespace: 'team-a', name: 'writer', ttl: '10m' });
    assert.equal(start.status, 201, JSON.stringify(start.body));
    const id = start.body.id as string;
    await until('the second broker to see the task', 15_000, async () => (await two.request('GET', '/v1/tasks', alpha)).body.tasks?.some((t: { id: string }) => t.id === id));
    // The policy without the task's template (the brokers keep reading their own file).
    const full = readFileSync(env!.policyFile, 'utf8');
    const cut = full.indexOf('  - name: configmap-writer');
    assert.ok(cut > 0, 'the fixture has the template');
    const removed = join(env!.dir, 'without-writer.yaml');
    writeFileSync(removed, full.slice(0, cut));
    const apply = (...more: string[]) => cli(['policy', 'apply', removed, '--kubeconfig', env!.cluster.kubeconfig, '--end-affected-tasks', ...more]);
    const clusterRole = async () => (await kubectl(env!.cluster.kubeconfig, 'get', 'clusterrole', 'task-broker:template:configmap-writer', '-o', 'name')).code;
    const objects = await env!.taskObjects();
    assert.ok(objects.secrets.length > 0 && (await clusterRole()) === 0);

    const both = apply('--audit-log', join(env!.dir, 'apply.jsonl'), '--audit-store', store);
    assert.equal(both.status, 2, both.stderr);
    assert.match(both.stderr, /give one of --audit-log FILE and --audit-store postgres:\/\/\.\.\./);
    const notStore = apply('--audit-store', 'mysql://task_broker@127.0.0.1:3306/audit');
    assert.equal(notStore.status, 2, notStore.stderr);
    assert.match(notStore.stderr, /--audit-store.*PostgreSQL URL|PostgreSQL URL.*--audit-store/);
    const away = apply('--audit-store', `postgres://task_broker@127.0.0.1:${await freePort()}/audit`);
    assert.equal(away.status, 5, away.stderr);
    assert.match(away.stderr, /audit store postgres:\/\/task_broker@127\.0\.0\.1:\d+\/audit cannot/);
    assert.deepEqual(await env!.taskObjects(), objects, 'no refusal ended anything');
    assert.equal(await clusterRole(), 0, 'no refusal applied anything');

    const seqBefore = Number((await pg!.query<{ n: string }>('postgres', 'SELECT max(seq) AS n FROM task_broker.audit')).rows[0]!.n);
    const done = apply('--audit-store', store);
    assert.equal(done.status, 0, done.stderr);
    assert.match(done.stdout, new RegExp(`^ended task ${id} \\(agent alpha, name writer, template configmap-writer, namespace team-a: template removed\\)$`, 'm'));
    assert.ok(!done.stdout.includes(pg!.brokerPassword) && !done.stderr.includes(pg!.brokerPassword), 'no password printed');
    assert.notEqual(await clusterRole(), 0, 'the template\'s ClusterRole is gone');
    assert.deepEqual((await env!.taskObjects()).secrets.filter((n) => n.includes(id)), [], 'the task record is gone');

    // Its records, on the one chain, after everything before the apply: the end, then the apply.
    const after = await pg!.query<{ type: string; line: string }>('postgres', 'SELECT type, line FROM task_broker.audit WHERE seq > $1 AND type IN ($2, $3) ORDER BY seq', [seqBefore, 'task.ended', 'policy.applied']);
    assert.deepEqual(after.rows.map((r) => r.type), ['task.ended', 'policy.applied']);
    const ended = JSON.parse(after.rows[0]!.line);
    assert.deepEqual(
      { actor: ended.actor, agent: ended.agent, task: ended.task, template: ended.template, namespace: ended.namespace, reason: ended.reason },
      { actor: 'user:policy-apply', agent: 'alpha', task: id, template: 'configmap-writer', namespace: 'team-a', reason: 'template removed by policy apply' },
    );
    assert.equal(JSON.parse(after.rows[1]!.line).details.endedTasks, 1);
    const shown = cli(['audit', 'show', '--task', id, store]);
    assert.equal(shown.status, 0, shown.stderr);
    assert.match(shown.stdout, /task started[\s\S]*task ended/);
    const verified = cli(['audit', 'verify', store]);
    assert.equal(verified.status, 0, verified.stderr);
    for (const b of brokers) await until('every broker to see the task gone', 15_000, async () => !(await b.request('GET', '/v1/tasks', alpha)).body.tasks?.some((t: { id: string }) => t.id === id));
  });

  test("tampering in the database is named by audit verify; the brokers' role cannot update", async () => {
    await assert.rejects(pg!.query('task_broker', `UPDATE task_broker.audit SET line = line WHERE type = 'task.started'`), /permission denied for table audit/);
    const target = await pg!.query<{ seq: string }>('postgres', `SELECT seq FROM task_broker.audit WHERE type = 'task.started' ORDER BY seq LIMIT 1`);
    const seq = Number(target.rows[0]!.seq);
    await pg!.query('postgres', `UPDATE task_broker.audit SET line = replace(line, '"outcome":"allowed"', '"outcome":"denied"') WHERE seq = $1`, [seq]);
    const edited = cli(['audit', 'verify', store]);
    assert.equal(edited.status, 1, edited.stdout);
    assert.match(edited.stderr, new RegExp(`broken at line ${seq + 1} \\(seq ${seq}\\): hash does not match the record's contents \\(the record was altered\\) \\[audit_chain_broken\\]`));
    const shown = cli(['audit', 'show', store]);
    assert.equal(shown.status, 1);
    assert.match(shown.stderr, new RegExp(`broken at line ${seq + 1} \\(seq ${seq}\\)`));
    await pg!.query('postgres', `UPDATE task_broker.audit SET line = replace(line, '"outcome":"denied"', '"outcome":"allowed"') WHERE seq = $1`, [seq]);
    assert.equal(cli(['audit', 'verify', store]).status, 0);

    await pg!.query('postgres', `DELETE FROM task_broker.audit WHERE seq = $1`, [seq]);
    const removed = cli(['audit', 'verify', store, '-o', 'json']);
    assert.equal(removed.status, 1);
    const result = JSON.parse(removed.stdout);
    assert.equal(result.ok, false);
    assert.equal(result.seq, seq + 1);
    assert.match(result.reason, new RegExp(`seq ${seq + 1} where ${seq} was expected \\(a record was removed, inserted or moved\\)`));
  });
});
