/**
 * The broker API against a real API server: scope, revocation, ownership, bad input, concurrency.
 * Tokens are judged by the real kube-apiserver (kubectl), never by the broker's own word.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { verifyAuditFile } from '../../src/audit/verify.ts';
import { BrokerEnv, type BrokerProcess } from '../helpers/broker.ts';
import { kubectl, writeTokenKubeconfig } from '../helpers/kube.ts';

describe('broker API', () => {
  let env: BrokerEnv;
  let broker: BrokerProcess;
  let alpha: string;
  let beta: string;

  before(async () => {
    env = await BrokerEnv.start();
    // Refused callers are summarised in the audit log per interval (docs/operations.md): 1 s here.
    broker = await env.startBroker({ extraArgs: ['--auth-failure-log-interval', '1s'] });
    alpha = await env.agentToken('alpha');
    beta = await env.agentToken('beta');
  });
  after(async () => {
    await broker?.stop();
    await env?.stop();
  });

  const kubeconfigFor = (name: string, token: string) => writeTokenKubeconfig(join(env.dir, `${name}.kubeconfig`), env.cluster, token);

  test('a task token can do exactly its template: its verbs, its resources, its namespace', async (t) => {
    const start = await broker.request('POST', '/v1/tasks', alpha, { template: 'read-pods', namespace: 'team-a', name: 'scope', ttl: '10m' });
    t.after(() => broker.request('DELETE', '/v1/tasks/scope', alpha));
    assert.equal(start.status, 201, JSON.stringify(start.body));
    assert.equal(start.body.namespace, 'team-a');
    const cred = await broker.request('POST', '/v1/tasks/scope/credential', alpha);
    assert.equal(cred.status, 200, JSON.stringify(cred.body));
    const kc = kubeconfigFor('scope', cred.body.token);

    const allowed = await kubectl(kc, 'get', 'pods', '-n', 'team-a');
    assert.equal(allowed.code, 0, allowed.stderr);
    const sa = `system:serviceaccount:task-broker:task-${start.body.id}`;
    for (const args of [
      ['get', 'pods', '-n', 'team-b'], // other namespace (allowed by the template, but not this task's)
      ['get', 'pods', '-n', 'default'], // namespace outside the template
      ['delete', 'pod', 'some-pod', '-n', 'team-a'], // other verb
      ['get', 'configmaps', '-n', 'team-a'], // other resource
      ['get', 'secrets', '-n', 'team-a'],
      ['get', 'namespaces'], // cluster scope
    ]) {
      const res = await kubectl(kc, ...args);
      assert.notEqual(res.code, 0, `${args.join(' ')} must be refused`);
      assert.match(res.stderr, new RegExp(`forbidden: User "${sa}"`), args.join(' '));
    }
  });

  test('after DELETE the old token is Forbidden at once and refused outright within 15 s; the objects are gone', async () => {
    const start = await broker.request('POST', '/v1/tasks', alpha, { template: 'read-pods', namespace: 'team-a', name: 'revoke' });
    assert.equal(start.status, 201);
    const cred = await broker.request('POST', `/v1/tasks/${start.body.id}/credential`, alpha);
    const kc = kubeconfigFor('revoke', cred.body.token);
    assert.equal((await kubectl(kc, 'get', 'pods', '-n', 'team-a')).code, 0);

    const end = await broker.request('DELETE', '/v1/tasks/revoke', alpha);
    assert.equal(end.status, 200, JSON.stringify(end.body));
    const next = await kubectl(kc, 'get', 'pods', '-n', 'team-a');
    assert.notEqual(next.code, 0);
    assert.match(next.stderr, /forbidden|Unauthorized/);

    // Deleting the bound Secret invalidates the token itself; the API server may have cached its
    // authentication for up to 10 s.
    const t0 = Date.now();
    let whoami = await kubectl(kc, 'auth', 'whoami');
    while (whoami.code === 0 && Date.now() - t0 < 15_000) {
      await sleep(250);
      whoami = await kubectl(kc, 'auth', 'whoami');
    }
    assert.notEqual(whoami.code, 0, 'the token is refused outright within 15 s');
    assert.match(whoami.stderr, /Unauthorized|provide credentials/);
    const objects = await env.taskObjects();
    for (const list of Object.values(objects)) assert.ok(!list.some((n) => n.includes(start.body.id)), JSON.stringify(objects));
  });

  test('another agent cannot read, end or get a credential for a task it does not own (403, audited)', async () => {
    const start = await broker.request('POST', '/v1/tasks', alpha, { template: 'read-pods', namespace: 'team-b', name: 'mine' });
    assert.equal(start.status, 201);
    for (const [method, path] of [
      ['GET', `/v1/tasks/${start.body.id}`],
      ['DELETE', `/v1/tasks/${start.body.id}`],
      ['POST', `/v1/tasks/${start.body.id}/credential`],
    ] as const) {
      const res = await broker.request(method, path, beta);
      assert.equal(res.status, 403, `${method} ${path}`);
      assert.equal(res.body.error.code, 'forbidden');
    }
    // By name, beta only ever sees its own tasks: it has none called "mine".
    assert.equal((await broker.request('POST', '/v1/tasks/mine/credential', beta)).status, 404);
    const refusals = broker.auditRecords().filter((r) => r.type === 'task.refused' && r.agent === 'beta' && r.task === start.body.id);
    assert.equal(refusals.length, 3);
    assert.equal((await broker.request('GET', '/v1/tasks/mine', alpha)).status, 200, 'still there for its owner');
    assert.equal((await broker.request('DELETE', '/v1/tasks/mine', alpha)).status, 200);
  });

  test('unknown or missing callers get 401 with a generic message, and it is audited', async () => {
    const none = await broker.request('GET', '/v1/tasks', undefined);
    assert.equal(none.status, 401);
    assert.equal(none.body.error.code, 'unauthenticated');
    // A token for the API server (not the broker's audience) is refused.
    const wrongAudience = await broker.request('GET', '/v1/tasks', await env.agentToken('alpha').then(() => mintApiserverToken()));
    assert.equal(wrongAudience.status, 401);
    // The message says nothing of why; only the hint names what the broker takes (the policy's audience).
    assert.doesNotMatch(wrongAudience.body.error.message, /audience|TokenReview/);
    assert.match(wrongAudience.body.error.hint, /with the audience "task-broker"/);
    assert.doesNotMatch(wrongAudience.body.error.hint, /TokenReview|\bexpired|revoked/);
    // A real ServiceAccount with the right audience that is not an agent in the policy.
    await env.admin.core.createNamespacedServiceAccount({ namespace: 'agents', body: { metadata: { name: 'stranger' } } });
    const stranger = await broker.request('GET', '/v1/tasks', await env.agentToken('stranger'));
    assert.equal(stranger.status, 401);
    let failures: Array<Record<string, any>> = [];
    const stranger_ = (r: Record<string, any>) => (r.details?.reasons ?? []).some((x: string) => /system:serviceaccount:agents:stranger is not an agent/.test(x));
    for (let i = 0; i < 40 && !failures.some(stranger_); i++) {
      await sleep(100);
      failures = broker.auditRecords().filter((r) => r.type === 'auth.failed');
    }
    assert.ok(failures.some(stranger_), JSON.stringify(failures));
    assert.ok(failures.every((r) => !JSON.stringify(r).includes('/v1/tasks')), 'summaries never hold the path');
  });

  async function mintApiserverToken(): Promise<string> {
    const res = await env.admin.core.createNamespacedServiceAccountToken({ name: 'alpha', namespace: 'agents', body: { spec: { audiences: [], expirationSeconds: 600 } } });
    return res.status!.token!;
  }

  test('bad input: 400 naming the field, nothing created, audit says why', async () => {
    const before = await env.taskObjects();
    const cases: Array<{ body?: unknown; raw?: string; status: number; code: string; field?: string }> = [
      { raw: '{"template": "read-pods", ', status: 400, code: 'bad_request' },
      { raw: JSON.stringify({ template: 'read-pods', namespace: 'team-a', reason: 'x'.repeat(20_000) }), status: 413, code: 'body_too_large' },
      { body: { template: 'read-pods', namespace: 'team-a', colour: 'blue' }, status: 400, code: 'invalid_argument', field: 'colour' },
      { body: { template: 'read-pods' }, status: 400, code: 'invalid_argument', field: 'namespace' },
      { body: { template: 'read-pods', namespace: 'team-a', name: 'Not_A_Name' }, status: 400, code: 'invalid_argument', field: 'name' },
      { body: { template: 'read-pods', namespace: 'team-a', ttl: '2h' }, status: 400, code: 'ttl_out_of_range', field: 'ttl' },
      { body: { template: 'read-pods', namespace: 'team-a', ttl: '5s' }, status: 400, code: 'ttl_out_of_range', field: 'ttl' },
      { body: { template: 'read-pods', namespace: 'team-a', ttl: 'soon' }, status: 400, code: 'invalid_argument', field: 'ttl' },
      { body: { template: 'read-pods', namespace: 'team-a', ttl: true }, status: 400, code: 'invalid_argument', field: 'ttl' },
      { body: { template: 'no-such', namespace: 'team-a' }, status: 400, code: 'unknown_template', field: 'template' },
      { body: { template: 'read-pods', namespace: 'kube-system' }, status: 400, code: 'namespace_not_allowed', field: 'namespace' },
      { body: ['read-pods'], status: 400, code: 'invalid_argument' },
    ];
    for (const c of cases) {
      const auditBefore = broker.auditRecords().length;
      const res = await broker.request('POST', '/v1/tasks', alpha, c.body, c.raw);
      const label = JSON.stringify(c.body ?? c.raw).slice(0, 80);
      assert.equal(res.status, c.status, label + ' ' + JSON.stringify(res.body));
      assert.equal(res.body.error.code, c.code, label);
      if (c.field) assert.equal(res.body.error.field, c.field, label);
      const records = broker.auditRecords().slice(auditBefore);
      assert.ok(
        records.some((r) => r.type === 'task.refused' && r.agent === 'alpha' && r.reason.startsWith(c.code)),
        `${label}: audited as refused with its code: ${JSON.stringify(records)}`,
      );
    }
    assert.deepEqual(await env.taskObjects(), before, 'nothing was created');
  });

  test('a known agent starting a template the policy does not give it: 403, audited, nothing created', async () => {
    const before = await env.taskObjects();
    const res = await broker.request('POST', '/v1/tasks', beta, { template: 'configmap-writer', namespace: 'team-a' });
    assert.equal(res.status, 403, JSON.stringify(res.body));
    assert.equal(res.body.error.code, 'forbidden');
    assert.equal(res.body.error.field, 'template');
    assert.match(res.body.error.message, /agent "beta" may not start template "configmap-writer"/);
    assert.deepEqual(await env.taskObjects(), before);
    assert.ok(broker.auditRecords().some((r) => r.type === 'task.refused' && r.agent === 'beta' && r.reason.startsWith('forbidden (template)')));
  });

  test('20 concurrent starts of one task name by one agent: exactly one succeeds', async () => {
    const before = await env.taskObjects();
    const results = await Promise.all(
      Array.from({ length: 20 }, () => broker.request('POST', '/v1/tasks', alpha, { template: 'read-pods', namespace: 'team-a', name: 'race' })),
    );
    const statuses = results.map((r) => r.status).sort();
    assert.equal(statuses.filter((s) => s === 201).length, 1, JSON.stringify(statuses));
    assert.ok(results.every((r) => r.status === 201 || r.body.error.code === 'task_exists'), JSON.stringify(results.map((r) => r.body)));
    const objects = await env.taskObjects();
    assert.equal(objects.serviceAccounts.length, before.serviceAccounts.length + 1, JSON.stringify(objects));
    assert.equal(objects.roleBindings.length, before.roleBindings.length + 1);
    assert.equal(objects.secrets.length, before.secrets.length + 1);
    assert.equal((await broker.request('DELETE', '/v1/tasks/race', alpha)).status, 200);
  });

  test('the credential is served again from memory, with one minted JTI, and expirationTimestamp <= task end', async () => {
    const start = await broker.request('POST', '/v1/tasks', alpha, { template: 'read-pods', namespace: 'team-a', name: 'cache', ttl: '2m' });
    const a = await broker.request('POST', '/v1/tasks/cache/credential', alpha);
    const b = await broker.request('POST', '/v1/tasks/cache/credential', alpha);
    assert.equal(a.body.token, b.body.token);
    assert.equal(a.body.jti, b.body.jti);
    assert.equal(a.body.expirationTimestamp, start.body.expiresAt, 'a 2m task ends before its 10m token');
    const records = broker.auditRecords().filter((r) => r.task === start.body.id);
    assert.deepEqual(
      records.map((r) => r.type),
      ['task.requested', 'task.started', 'credential.minted', 'credential.served'],
    );
    assert.equal(records[2]!.jti, a.body.jti);
    assert.ok(!JSON.stringify(broker.auditRecords()).includes(a.body.token), 'the token itself is never recorded');
    assert.equal((await broker.request('DELETE', '/v1/tasks/cache', alpha)).status, 200);
  });

  test('list, show, health, readiness and metrics', async () => {
    await broker.request('POST', '/v1/tasks', beta, { template: 'read-pods', namespace: 'team-b', name: 'listed' });
    const list = await broker.request('GET', '/v1/tasks', beta);
    assert.deepEqual(
      list.body.tasks.map((t: { name: string }) => t.name),
      ['listed'],
    );
    assert.equal((await broker.request('GET', '/v1/tasks', alpha)).body.tasks.some((t: { name: string }) => t.name === 'listed'), false);
    assert.equal((await broker.request('GET', '/healthz', undefined)).status, 200);
    assert.equal((await broker.request('GET', '/readyz', undefined)).status, 200);
    const metrics = await broker.request('GET', '/metrics', undefined);
    assert.match(metrics.body, /broker_tasks_started_total \d+/);
    const active = Number(/broker_active_tasks (\d+)/.exec(metrics.body)?.[1]);
    assert.ok(active >= 1, `active tasks ${active}`);
    await broker.request('DELETE', '/v1/tasks/listed', beta);
  });

  test('the audit log verifies', async () => {
    const result = await verifyAuditFile(broker.auditLog);
    assert.equal(result.ok, true, JSON.stringify(result));
  });
});
