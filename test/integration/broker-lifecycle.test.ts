/**
 * The broker across time and failure: expiry by the sweeper (also across a restart), crashes part-way
 * through a start, an unwritable audit log, and two replicas sharing one sweeper Lease.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { verifyAuditFile } from '../../src/audit/verify.ts';
import { BrokerEnv } from '../helpers/broker.ts';
import { kubectl, writeTokenKubeconfig } from '../helpers/kube.ts';
import { until } from '../helpers/wait.ts';


describe('broker lifecycle', () => {
  let env: BrokerEnv;
  let alpha: string;

  before(async () => {
    env = await BrokerEnv.start();
    alpha = await env.agentToken('alpha');
  });
  after(async () => {
    await env?.stop();
  });

  const empty = async () => {
    const o = await env.taskObjects();
    return o.secrets.length + o.serviceAccounts.length + o.roleBindings.length === 0 ? o : undefined;
  };

  test('a task with a 20 s TTL is ended by the sweeper, and its token stops working', async () => {
    const broker = await env.startBroker();
    try {
      const start = await broker.request('POST', '/v1/tasks', alpha, { template: 'read-pods', namespace: 'team-a', name: 'short', ttl: '20s' });
      assert.equal(start.status, 201, JSON.stringify(start.body));
      const cred = await broker.request('POST', '/v1/tasks/short/credential', alpha);
      const kc = writeTokenKubeconfig(join(env.dir, 'short.kubeconfig'), env.cluster, cred.body.token);
      assert.equal((await kubectl(kc, 'get', 'pods', '-n', 'team-a')).code, 0);
      await until('the sweeper to end the task', 35_000, empty);
      const ended = Date.now();
      assert.ok(ended >= new Date(start.body.expiresAt).getTime(), 'not before its time');
      assert.ok(ended - new Date(start.body.expiresAt).getTime() < 5_000, 'within a few seconds of expiry');
      assert.notEqual((await kubectl(kc, 'get', 'pods', '-n', 'team-a')).code, 0);
      const expired = broker.auditRecords().filter((r) => r.type === 'task.expired' && r.task === start.body.id);
      assert.equal(expired.length, 1);
      assert.equal(expired[0]!.actor, 'system:sweeper');
      assert.equal((await broker.request('POST', '/v1/tasks/short/credential', alpha)).status, 404);
    } finally {
      await broker.stop();
    }
  });

  test('expiry is enforced across a broker restart in the middle of the task', async () => {
    const auditLog = join(env.dir, 'restart-audit.jsonl');
    const first = await env.startBroker({ auditLog });
    const start = await first.request('POST', '/v1/tasks', alpha, { template: 'read-pods', namespace: 'team-a', name: 'restart', ttl: '20s' });
    assert.equal(start.status, 201);
    await first.stop('SIGKILL');
    await sleep(2_000);
    const second = await env.startBroker({ auditLog });
    try {
      // The restarted broker adopted the task from the cluster: it is listed and serves credentials.
      const listed = await second.request('GET', '/v1/tasks', alpha);
      assert.deepEqual(
        listed.body.tasks.map((t: { id: string }) => t.id),
        [start.body.id],
      );
      assert.equal((await second.request('POST', '/v1/tasks/restart/credential', alpha)).status, 200);
      await until('the restarted broker to expire the task', 40_000, empty);
      const records = second.auditRecords();
      assert.equal(records.filter((r) => r.type === 'task.expired' && r.task === start.body.id).length, 1);
      assert.ok(records.some((r) => r.type === 'broker.started' && r.details.adoptedTasks.includes(start.body.id)));
      assert.equal((await verifyAuditFile(auditLog)).ok, true, 'one chain across both processes');
    } finally {
      await second.stop();
    }
  });

  for (const point of ['start-after-secret', 'start-after-serviceaccount', 'start-after-rolebinding', 'start-after-activate']) {
    test(`SIGKILL at ${point}: after restart nothing is left without a live task`, async () => {
      const auditLog = join(env.dir, `${point}.jsonl`);
      const doomed = await env.startBroker({ auditLog, env: { TASK_BROKER_FAILPOINTS: point } });
      await assert.rejects(doomed.request('POST', '/v1/tasks', alpha, { template: 'read-pods', namespace: 'team-b', name: 'crash' }));
      await doomed.exited();
      assert.equal(doomed.child.signalCode, 'SIGKILL');
      const leftovers = await env.taskObjects();
      assert.ok(leftovers.secrets.length === 1, `the crash left the task record behind: ${JSON.stringify(leftovers)}`);

      const broker = await env.startBroker({ auditLog });
      try {
        if (point === 'start-after-activate') {
          // Every object exists and the record is active: the restarted broker adopts a live task.
          const listed = await broker.request('GET', '/v1/tasks', alpha);
          assert.equal(listed.body.tasks.length, 1);
          const cred = await broker.request('POST', '/v1/tasks/crash/credential', alpha);
          const kc = writeTokenKubeconfig(join(env.dir, 'crash.kubeconfig'), env.cluster, cred.body.token);
          assert.equal((await kubectl(kc, 'get', 'pods', '-n', 'team-b')).code, 0);
          assert.equal((await broker.request('DELETE', '/v1/tasks/crash', alpha)).status, 200);
          await until('the task objects to be gone', 5_000, empty);
        } else {
          await until('the orphaned objects to be removed', 20_000, empty);
          assert.equal((await broker.request('GET', '/v1/tasks', alpha)).body.tasks.length, 0);
          assert.ok(broker.auditRecords().some((r) => r.type === 'task.cleaned' || r.type === 'task.orphans_removed'));
        }
        // The name is free again.
        const again = await broker.request('POST', '/v1/tasks', alpha, { template: 'read-pods', namespace: 'team-b', name: 'crash' });
        assert.equal(again.status, 201, JSON.stringify(again.body));
        assert.equal((await broker.request('DELETE', '/v1/tasks/crash', alpha)).status, 200);
      } finally {
        await broker.stop();
      }
    });
  }

  test('audit log unwritable: start refused with a clear error, nothing created, not ready', async () => {
    // A 1 KiB file size limit: the start-up record fits, the request record does not (EFBIG).
    const broker = await env.startBroker({ auditLog: join(env.dir, 'full.jsonl'), shellPrefix: 'ulimit -f 2;' });
    try {
      const res = await broker.request('POST', '/v1/tasks', alpha, { template: 'read-pods', namespace: 'team-a', name: 'unrecorded', reason: 'r'.repeat(900) });
      assert.equal(res.status, 503, JSON.stringify(res.body));
      assert.equal(res.body.error.code, 'audit_unavailable');
      assert.match(res.body.error.message, /audit log cannot be written/);
      assert.ok(await empty(), 'nothing was created in the cluster');
      // Fail closed from then on: no start, no credential, and the replica reports not ready.
      const next = await broker.request('POST', '/v1/tasks', alpha, { template: 'read-pods', namespace: 'team-a', name: 'tiny' });
      assert.equal(next.status, 503);
      assert.ok(await empty());
      assert.equal((await broker.request('GET', '/readyz', undefined)).status, 503);
    } finally {
      await broker.stop();
    }
  });

  test('two replicas: one sweeper at a time, and the task expires exactly once', async () => {
    const a = await env.startBroker({ auditLog: join(env.dir, 'replica-a.jsonl') });
    const b = await env.startBroker({ auditLog: join(env.dir, 'replica-b.jsonl') });
    try {
      // Started on one replica, visible on the other through the watch.
      const start = await a.request('POST', '/v1/tasks', alpha, { template: 'read-pods', namespace: 'team-a', name: 'twin', ttl: '10s' });
      assert.equal(start.status, 201);
      await until('replica b to see the task', 5_000, async () => (await b.request('GET', '/v1/tasks', alpha)).body.tasks.length === 1);
      assert.equal((await b.request('POST', '/v1/tasks/twin/credential', alpha)).status, 200);
      await until('the task to expire', 30_000, empty);
      await sleep(2_000);
      const expired = [...a.auditRecords(), ...b.auditRecords()].filter((r) => r.type === 'task.expired' && r.task === start.body.id);
      assert.equal(expired.length, 1, 'only the Lease holder ends it');
      assert.equal((await a.request('GET', '/v1/tasks', alpha)).body.tasks.length, 0);
      assert.equal((await b.request('GET', '/v1/tasks', alpha)).body.tasks.length, 0);
    } finally {
      await a.stop();
      await b.stop();
    }
  });
});
