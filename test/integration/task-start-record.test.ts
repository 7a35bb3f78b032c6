/**
 * A start writes its `task.started` record while the activating patch is in flight (src/tasks/service.ts,
 * #createObjects). A crash after the patch and before the record is the state the failpoint
 * start-after-activate of broker-lifecycle.test.ts leaves (an active task, adopted). This is the
 * other order: the record durable, the patch not sent (failpoint start-after-started-record, which
 * makes the start await its record first). After a restart the pending task grants nothing and the
 * orphan sweep removes it: the log tells task.requested, task.started, task.cleaned for it, nothing
 * is left standing, the name is free, the chain holds.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { verifyAuditFile } from '../../src/audit/verify.ts';
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
    await new Promise((done) => (doomed.child.exitCode !== null || doomed.child.signalCode !== null ? done(null) : doomed.child.once('exit', done)));
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
});
