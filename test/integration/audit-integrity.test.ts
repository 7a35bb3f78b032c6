/**
 * The audit log cannot vanish unnoticed (security review, issue 8), against a real API server and
 * real broker processes: a log removed under a running broker fails it closed within the check
 * interval, and a restart on a log that is missing or cut is refused against the checkpoint the
 * broker keeps in the cluster, unless `--accept-audit-reset` is given (then the reset is the first
 * record).
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, rmSync, writeFileSync } from 'node:fs';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { auditHeadName } from '../../src/audit/head.ts';
import { verifyAuditFile } from '../../src/audit/verify.ts';
import { BrokerEnv, type BrokerProcess } from '../helpers/broker.ts';
import { until } from '../helpers/wait.ts';


describe('audit log integrity', () => {
  let env: BrokerEnv;
  let alpha: string;

  before(async () => {
    env = await BrokerEnv.start();
    alpha = await env.agentToken('alpha');
  });
  after(async () => {
    await env?.stop();
  });

  /** The checkpoint ConfigMap's data for a log (the brokers run on this host), or undefined. */
  const checkpointOf = async (auditLog: string): Promise<Record<string, string> | undefined> => {
    try {
      const cm = await env.admin.core.readNamespacedConfigMap({ name: auditHeadName(hostname(), auditLog), namespace: env.policy.broker.namespace });
      return cm.data;
    } catch {
      return undefined;
    }
  };

  /** A broker that started and ended one task on `auditLog`, then stopped cleanly: the checkpoint holds its last record. */
  async function runOnce(auditLog: string, name: string): Promise<{ lastSeq: number; lastHash: string }> {
    const broker = await env.startBroker({ auditLog });
    try {
      const start = await broker.request('POST', '/v1/tasks', alpha, { template: 'read-pods', namespace: 'team-a', name });
      assert.equal(start.status, 201, JSON.stringify(start.body));
      assert.equal((await broker.request('DELETE', `/v1/tasks/${name}`, alpha)).status, 200);
    } finally {
      await broker.stop();
    }
    const records = readRecords(auditLog);
    const last = records.at(-1)!;
    assert.equal(last.type, 'broker.stopped');
    const cp = await checkpointOf(auditLog);
    assert.deepEqual(cp && { seq: cp['seq'], hash: cp['hash'], path: cp['path'], host: cp['host'] }, {
      seq: String(last.seq),
      hash: last.hash,
      path: auditLog,
      host: hostname(),
    }, 'the checkpoint holds the last record once the broker stopped');
    return { lastSeq: last.seq, lastHash: last.hash };
  }

  const readRecords = (path: string) =>
    readFileSync(path, 'utf8')
      .split('\n')
      .filter(Boolean)
      .map((l) => JSON.parse(l) as Record<string, any>);

  /** `broker serve` on `auditLog` must exit non-zero before listening; returns what it printed. */
  async function refusedStart(auditLog: string): Promise<string> {
    let message = '';
    await assert.rejects(env.startBroker({ auditLog }), (err: Error) => {
      message = err.message;
      return /exited with [1-9]\d* before listening/.test(err.message);
    });
    return message;
  }

  test('rm of a running broker\'s log: not ready within 2 s, task start and credentials refused (503 audit_unavailable), nothing created', async () => {
    const auditLog = join(env.dir, 'removed.jsonl');
    let broker: BrokerProcess | undefined = await env.startBroker({ auditLog });
    let cleanup: BrokerProcess | undefined;
    try {
      const start = await broker.request('POST', '/v1/tasks', alpha, { template: 'read-pods', namespace: 'team-a', name: 'before-rm' });
      assert.equal(start.status, 201, JSON.stringify(start.body));
      assert.equal((await broker.request('POST', '/v1/tasks/before-rm/credential', alpha)).status, 200);
      assert.equal((await broker.request('GET', '/readyz', undefined)).status, 200);
      const objects = await env.taskObjects();

      rmSync(auditLog);
      const t0 = Date.now();
      const b = broker;
      await until('/readyz to answer 503', 2_000, async () => (await b.request('GET', '/readyz', undefined)).status === 503);
      assert.ok(Date.now() - t0 <= 2_000);
      assert.match((await broker.request('GET', '/readyz', undefined)).body, /audit log/);

      const refused = await broker.request('POST', '/v1/tasks', alpha, { template: 'read-pods', namespace: 'team-a', name: 'after-rm' });
      assert.equal(refused.status, 503, JSON.stringify(refused.body));
      assert.equal(refused.body.error.code, 'audit_unavailable');
      const cred = await broker.request('POST', '/v1/tasks/before-rm/credential', alpha);
      assert.equal(cred.status, 503, JSON.stringify(cred.body));
      assert.equal(cred.body.error.code, 'audit_unavailable');
      assert.deepEqual(await env.taskObjects(), objects, 'no task objects were created');
      await broker.stop();
      broker = undefined;

      // Clean up through the front door: a broker on a new log ends the task left behind.
      cleanup = await env.startBroker({ auditLog: join(env.dir, 'removed-cleanup.jsonl') });
      assert.equal((await cleanup.request('DELETE', '/v1/tasks/before-rm', alpha)).status, 200);
    } finally {
      await broker?.stop();
      await cleanup?.stop();
    }
  });

  test('restart on a missing log: refused naming the checkpoint; with --accept-audit-reset it starts and records audit.reset first', async () => {
    const auditLog = join(env.dir, 'missing.jsonl');
    const { lastSeq, lastHash } = await runOnce(auditLog, 'missing');
    rmSync(auditLog);

    const message = await refusedStart(auditLog);
    assert.match(message, /audit_checkpoint_mismatch/);
    assert.match(message, new RegExp(`checkpoint ConfigMap ${env.policy.broker.namespace}/task-broker-audit-head-[0-9a-f]{16}`));
    assert.match(message, new RegExp(`expected record seq ${lastSeq} with hash ${lastHash}, found no log at all`));
    assert.match(message, /--accept-audit-reset/);
    assert.throws(() => readFileSync(auditLog), /ENOENT/, 'a refused start creates no file');

    const broker = await env.startBroker({ auditLog, extraArgs: ['--accept-audit-reset'] });
    try {
      const records = readRecords(auditLog);
      assert.equal(records[0]!.type, 'audit.reset');
      assert.equal(records[0]!.seq, 0);
      assert.equal(records[0]!.outcome, 'ok');
      assert.equal(records[0]!.details.checkpoint.seq, lastSeq);
      assert.equal(records[0]!.details.checkpoint.hash, lastHash);
      assert.equal(records[0]!.details.found.records, 0);
      assert.equal(records[1]!.type, 'broker.started');
      assert.equal((await broker.request('GET', '/readyz', undefined)).status, 200);
      // The checkpoint follows the new log (at once after the reset, then within a second).
      await until('the checkpoint to follow the new log', 3_000, async () => {
        const cp = await checkpointOf(auditLog);
        const last = readRecords(auditLog).at(-1)!;
        return cp?.['seq'] === String(last.seq) && cp['hash'] === last.hash;
      });
    } finally {
      await broker.stop();
    }
    assert.equal((await verifyAuditFile(auditLog)).ok, true);
    // And the next start is an ordinary one.
    const again = await env.startBroker({ auditLog });
    await again.stop();
  });

  test('restart on a log cut to its first line: refused likewise', async () => {
    const auditLog = join(env.dir, 'cut.jsonl');
    const { lastSeq, lastHash } = await runOnce(auditLog, 'cut');
    const first = readFileSync(auditLog, 'utf8').split('\n')[0]!;
    writeFileSync(auditLog, first + '\n');
    assert.equal((await verifyAuditFile(auditLog)).ok, true, 'the chain alone cannot show the cut');

    const message = await refusedStart(auditLog);
    assert.match(message, /audit_checkpoint_mismatch/);
    assert.match(message, /checkpoint ConfigMap/);
    assert.match(message, new RegExp(`expected record seq ${lastSeq} with hash ${lastHash}, found a log of 1 records ending at seq 0`));
    assert.equal(readFileSync(auditLog, 'utf8'), first + '\n', 'nothing was appended');
  });

  test('restart on an intact log starts normally, also when the checkpoint lags behind a killed broker', async () => {
    const auditLog = join(env.dir, 'intact.jsonl');
    await runOnce(auditLog, 'intact');
    const second = await env.startBroker({ auditLog });
    let third: BrokerProcess | undefined;
    try {
      const start = await second.request('POST', '/v1/tasks', alpha, { template: 'read-pods', namespace: 'team-a', name: 'intact-2' });
      assert.equal(start.status, 201);
      assert.equal((await second.request('DELETE', '/v1/tasks/intact-2', alpha)).status, 200);
      // Killed at once: the checkpoint may not have caught up with the last records; that is fine.
      await second.stop('SIGKILL');
      third = await env.startBroker({ auditLog });
      const records = readRecords(auditLog);
      assert.ok(!records.some((r) => r.type === 'audit.reset'));
      assert.equal(records.at(-1)!.type, 'broker.started');
      assert.equal((await third.request('GET', '/readyz', undefined)).status, 200);
      assert.equal((await verifyAuditFile(auditLog)).ok, true);
    } finally {
      await second.stop();
      await third?.stop();
    }
  });
});
