/**
 * A start writes its `task.started` record while the activating patch is in flight (src/tasks/service.ts,
 * #createObjects). A crash after the patch and before the record is the state the failpoint
 * start-after-activate of broker-lifecycle.test.ts leaves (an active task, adopted). This is the
 * other order: the record durable, the patch not sent (failpoint start-after-started-record, which
 * makes the start await its record first). After a restart the pending task grants nothing and the
 * orphan sweep removes it: the log tells task.requested, task.started, task.cleaned for it, nothing
 * is left standing, the name is free, the chain holds.
 *
 * The task record's signature: the pending record is signed with the key the broker holds, the key
 * Secret read afresh meanwhile, and the activating patch carries a new signature when the key changed
 * (src/state-signature.ts, startPendingSigning). A rotation just before a start: the record becomes
 * active signed by the new key, so removing `previous` at once revokes nothing, on any replica.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import * as k8s from '@kubernetes/client-node';
import { verifyAuditFile } from '../../src/audit/verify.ts';
import { SIGNATURE_ANNOTATION } from '../../src/state-signature.ts';
import { LABEL, TASK_SELECTOR } from '../../src/tasks/model.ts';
import { BrokerEnv } from '../helpers/broker.ts';
import { until } from '../helpers/wait.ts';

describe('task start: task.started written beside the activation', () => {
  let env: BrokerEnv;
  let alpha: string;

  before(async () => {
    env = await BrokerEnv.start();
    alpha = await env.agentToken('alpha');
  });
  after(async () => {
    await env?.stop();
  });

  test('SIGKILL once task.started is durable, before the activation: after restart the pending task is cleaned up, and the log says so', async () => {
    const auditLog = join(env.dir, 'started-record.jsonl');
    const doomed = await env.startBroker({ auditLog, env: { TASK_BROKER_FAILPOINTS: 'start-after-started-record' } });
    await assert.rejects(doomed.request('POST', '/v1/tasks', alpha, { template: 'read-pods', namespace: 'team-b', name: 'crash' }));
    await doomed.exited();
    assert.equal(doomed.child.signalCode, 'SIGKILL');
    const records = doomed.auditRecords();
    const started = records.find((r) => r.type === 'task.started');
    assert.ok(started, 'task.started is on the log before the crash');
    const left = await env.taskObjects();
    assert.equal(left.secrets.length, 1, `the record is there: ${JSON.stringify(left)}`);
    assert.equal(left.roleBindings.length, 1, 'the RoleBinding was made before the record');

    const broker = await env.startBroker({ auditLog });
    try {
      // Still pending: nothing lists it, it grants nothing (no credential), and the orphan sweep removes it.
      assert.equal((await broker.request('GET', '/v1/tasks', alpha)).body.tasks.length, 0);
      const cred = await broker.request('POST', '/v1/tasks/crash/credential', alpha);
      assert.equal(cred.status, 404, JSON.stringify(cred.body));
      assert.equal(cred.body.error.code, 'no_active_task');
      await until('the orphan sweep to remove the task objects', 20_000, async () => {
        const o = await env.taskObjects();
        return o.secrets.length + o.serviceAccounts.length + o.roleBindings.length === 0;
      });
      const story = broker.auditRecords().filter((r) => r.task === started.task).map((r) => r.type);
      assert.deepEqual(story, ['task.requested', 'task.started', 'task.cleaned']);
      const o = await env.taskObjects();
      assert.equal(o.secrets.length + o.serviceAccounts.length + o.roleBindings.length, 0, JSON.stringify(o));
      const again = await broker.request('POST', '/v1/tasks', alpha, { template: 'read-pods', namespace: 'team-b', name: 'crash' });
      assert.equal(again.status, 201, JSON.stringify(again.body));
      assert.equal((await broker.request('DELETE', '/v1/tasks/crash', alpha)).status, 200);
      assert.equal((await verifyAuditFile(auditLog)).ok, true, 'one chain across both processes');
    } finally {
      await broker.stop();
    }
  });

  test('a key rotated just before a start: the active record is signed by the new key; removing previous at once revokes nothing', async () => {
    const auditLog = join(env.dir, 'rotation.jsonl');
    const broker = await env.startBroker({ auditLog });
    const taskNs = env.policy.broker.taskNamespace;
    const stop: Array<() => void> = [];
    try {
      // A start now: the broker then holds the key (read by that start) for the next 5 s.
      const warm = await broker.request('POST', '/v1/tasks', alpha, { template: 'read-pods', namespace: 'team-a', name: 'warm' });
      const held = Date.now();
      assert.equal(warm.status, 201, JSON.stringify(warm.body));
      assert.equal((await broker.request('DELETE', '/v1/tasks/warm', alpha)).status, 200);
      // Every signature the record 'rotated' carries in the cluster, in order (pending, then active).
      const seen: Array<{ state: string | undefined; kid: string | undefined }> = [];
      const watch = await new k8s.Watch(env.admin.config).watch(`/api/v1/namespaces/${taskNs}/secrets`, { labelSelector: TASK_SELECTOR }, (_type, obj: k8s.V1Secret) => {
        if (obj.metadata?.labels?.[LABEL.taskName] !== 'rotated') return;
        const entry = { state: obj.metadata.labels[LABEL.state], kid: obj.metadata.annotations?.[SIGNATURE_ANNOTATION]?.split('.')[0] };
        const last = seen.at(-1);
        if (!last || last.state !== entry.state || last.kid !== entry.kid) seen.push(entry);
      }, () => undefined);
      stop.push(() => watch.abort());

      const { old, current, dropPrevious } = await env.rotateSigningKey();
      const heldFor = Date.now() - held;
      const start = await broker.request('POST', '/v1/tasks', alpha, { template: 'read-pods', namespace: 'team-a', name: 'rotated' });
      assert.equal(start.status, 201, JSON.stringify(start.body));
      const record = (await env.admin.core.listNamespacedSecret({ namespace: taskNs, labelSelector: TASK_SELECTOR })).items.find((x) => x.metadata?.labels?.[LABEL.taskName] === 'rotated');
      assert.equal(record?.metadata?.labels?.[LABEL.state], 'active');
      assert.equal(record?.metadata?.annotations?.[SIGNATURE_ANNOTATION]?.split('.')[0], current.kid, 'the active record: signed by the key current at activation');
      await until('the watch to see the record active', 5_000, async () => seen.some((e) => e.state === 'active'));
      // The pending record was signed with the key held (the old one, read by the first start), then
      // re-signed in the activating patch (unless the machine was so slow that the key was no longer held).
      if (heldFor < 4_000) assert.deepEqual(seen, [{ state: 'pending', kid: old.kid }, { state: 'active', kid: current.kid }], JSON.stringify(seen));
      else console.log(`the key was read ${heldFor} ms before the start: not held any more, the re-signing is not exercised`);

      // previous removed at once: a replica started now trusts the task, and it still serves credentials.
      await dropPrevious();
      const replica = await env.startBroker({ auditLog: join(env.dir, 'rotation-replica.jsonl') });
      try {
        const listed = await replica.request('GET', '/v1/tasks', alpha);
        assert.deepEqual(listed.body.tasks.map((t: { name: string }) => t.name), ['rotated']);
        assert.equal((await replica.request('POST', '/v1/tasks/rotated/credential', alpha)).status, 200);
        assert.ok(!replica.auditRecords().some((r) => r.type === 'task.forged' && r.task === start.body.id), 'no task.forged for the task started across the rotation');
      } finally {
        await replica.stop();
      }
      assert.equal((await broker.request('DELETE', '/v1/tasks/rotated', alpha)).status, 200);
    } finally {
      for (const s of stop) s();
      await broker.stop();
    }
  });
});
