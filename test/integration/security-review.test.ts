/**
 * The findings of the security review (issue 8) that live in the task and approval workflow, each
 * replayed with the review's own steps against a real API server and a real broker process:
 * self-approval through a second identity, one person counted twice, forged approval and task
 * records, tokens outliving their task, ungated clusterRole templates, token-looking free text
 * dropping records, chat markup in notifications, and no per-agent caps.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, type Server } from 'node:http';
import { setTimeout as sleep } from 'node:timers/promises';
import { decodeJwt } from 'jose';
import { verifyAuditFile } from '../../src/audit/verify.ts';
import { BrokerEnv, type BrokerProcess } from '../helpers/broker.ts';

const POLICY = `
apiVersion: task-broker/v1alpha1
kind: Policy
broker:
  namespace: tb-system
  taskNamespace: tb-tasks
  tokenTTL: 1h
  identityAudience: task-broker
  notifyWebhook: NOTIFY_URL
  limits: { activeTasksPerAgent: 3, openApprovalsPerAgent: 2 }
agents:
  - name: alice-agent
    identities: [{ serviceAccount: agents/alice }, { serviceAccount: agents/alice2 }]
  - name: other
    identities: [{ serviceAccount: agents/other }]
people:
  - name: carol
    identities: [{ serviceAccount: people/carol }, { serviceAccount: people/carol2 }]
  - name: dave
    identities: [{ serviceAccount: people/dave }]
approvers:
  - name: sre
    members: [{ person: carol }, { person: dave }]
templates:
  - name: read-pods
    namespaces: [web]
    rules: [{ apiGroups: [""], resources: [pods], verbs: [get, list] }]
    ttl: { default: 15m, max: 1h }
    agents: [alice-agent, other]
  - name: read-secrets
    namespaces: [web]
    rules: [{ apiGroups: [""], resources: [secrets], verbs: [get, list] }]
    ttl: { default: 15m, max: 1h }
    agents: [alice-agent, other]
    approval: { approvers: [sre], required: 2 }
  - name: debug-role
    namespaces: [web]
    clusterRole: debug-exec
    ttl: { default: 15m, max: 1h }
    agents: [alice-agent]
`;
const JWT_LIKE = 'eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl';

describe('security review: approvals by principal, signed state, token lifetime, caps', () => {
  let env: BrokerEnv;
  let broker: BrokerProcess;
  let hook: Server;
  const notifications: Array<Record<string, unknown>> = [];
  const tokens: Record<string, string> = {};

  before(async () => {
    hook = createServer((req, res) => {
      let body = '';
      req.on('data', (d: Buffer) => (body += d));
      req.on('end', () => {
        notifications.push(JSON.parse(body) as Record<string, unknown>);
        res.writeHead(204).end();
      });
    });
    await new Promise<void>((done) => hook.listen(0, '127.0.0.1', done));
    const hookUrl = `http://127.0.0.1:${(hook.address() as { port: number }).port}/hook`;
    env = await BrokerEnv.start({
      policyText: POLICY.replace('NOTIFY_URL', hookUrl),
      // The ClusterRole a template binds exists before the policy is applied (apply reads it).
      beforeApply: async (admin) => {
        await admin.rbac.createClusterRole({
          body: { metadata: { name: 'debug-exec' }, rules: [{ apiGroups: [''], resources: ['pods', 'pods/exec'], verbs: ['get', 'create'] }] },
        });
      },
    });
    broker = await env.startBroker();
    for (const [name, ns] of [['alice', 'agents'], ['alice2', 'agents'], ['other', 'agents'], ['carol', 'people'], ['carol2', 'people'], ['dave', 'people']] as const) {
      tokens[name] = await env.agentToken(name, ns);
    }
  });
  after(async () => {
    await broker?.stop();
    await env?.stop();
    await new Promise((done) => hook?.close(done));
  });

  const req = (method: string, path: string, who: string, body?: unknown) => broker.request(method, path, tokens[who], body);
  const records = () => broker.auditRecords();

  test("finding 2: an agent's second identity cannot approve its own request; a person with two identities counts once", async () => {
    const asked = await req('POST', '/v1/tasks', 'alice', { template: 'read-secrets', namespace: 'web', name: 'self' });
    assert.equal(asked.status, 403, JSON.stringify(asked.body));
    const id = asked.body.error.requestId as string;

    const self = await req('POST', `/v1/approvals/${id}/approve`, 'alice2', {});
    assert.equal(self.status, 403, JSON.stringify(self.body));
    assert.match(self.body.error.message, /agent:alice-agent, who requested .* cannot decide it/);

    const first = await req('POST', `/v1/approvals/${id}/approve`, 'carol', {});
    assert.equal(first.status, 200, JSON.stringify(first.body));
    assert.equal(first.body.approvals, 1);
    const twice = await req('POST', `/v1/approvals/${id}/approve`, 'carol2', {});
    assert.equal(twice.status, 403, JSON.stringify(twice.body));
    assert.match(twice.body.error.message, /person:carol has already decided/);
    assert.equal((await req('GET', `/v1/approvals/${id}`, 'alice')).body.state, 'pending', 'carol counted once: still 1 of 2');

    const second = await req('POST', `/v1/approvals/${id}/approve`, 'dave', {});
    assert.equal(second.body.state, 'approved', JSON.stringify(second.body));
    // Either of the agent's identities is the requester: the other one collects and uses the token.
    const mine = await req('GET', `/v1/approvals/${id}`, 'alice2');
    assert.ok(mine.body.approvalToken);
    const start = await req('POST', '/v1/tasks', 'alice2', { template: 'read-secrets', namespace: 'web', name: 'self', approvalToken: mine.body.approvalToken });
    assert.equal(start.status, 201, JSON.stringify(start.body));
    assert.equal((await req('DELETE', '/v1/tasks/self', 'alice')).status, 200);

    const refused = records().filter((r) => r.type === 'approval.refused' && r.details?.approvalRequest === id);
    assert.equal(refused.length, 2, JSON.stringify(refused));
    const granted = records().filter((r) => r.type === 'approval.granted' && r.details?.approvalRequest === id);
    assert.deepEqual(granted.map((r) => r.details.principal), ['person:carol', 'person:dave']);
  });

  test('finding 3: an approval record changed outside the broker is ignored, and recorded', async () => {
    const asked = await req('POST', '/v1/tasks', 'other', { template: 'read-secrets', namespace: 'web', name: 'forge' });
    const id = asked.body.error.requestId as string;
    const ns = env.policy.broker.namespace;
    const name = `approval-${id}`;
    const cm = await env.admin.core.readNamespacedConfigMap({ name, namespace: ns });
    cm.data = { ...cm.data, state: 'approved' };
    await env.admin.core.replaceNamespacedConfigMap({ name, namespace: ns, body: cm });

    const shown = await req('GET', `/v1/approvals/${id}`, 'other');
    assert.equal(shown.status, 404, JSON.stringify(shown.body));
    assert.equal(shown.body.approvalToken, undefined);
    const listed = await req('GET', '/v1/approvals', 'carol');
    assert.ok(!listed.body.approvals.some((r: { id: string }) => r.id === id), 'a forged request is not listed');
    const decide = await req('POST', `/v1/approvals/${id}/approve`, 'carol', {});
    assert.equal(decide.status, 404);
    const forged = records().filter((r) => r.type === 'approval.forged' && r.details?.object === name);
    assert.equal(forged.length, 1, 'recorded once, however often it is read');
    assert.ok(!records().some((r) => r.type === 'approval.token_issued' && r.details?.approvalRequest === id));
  });

  test("finding 3: a task whose expiry is changed outside the broker stops getting credentials and is revoked", async () => {
    const started = await req('POST', '/v1/tasks', 'other', { template: 'read-pods', namespace: 'web', name: 'extend', ttl: '10m' });
    assert.equal(started.status, 201, JSON.stringify(started.body));
    const taskId = started.body.id as string;
    assert.equal((await req('POST', '/v1/tasks/extend/credential', 'other')).status, 200);

    const ns = env.policy.broker.taskNamespace;
    const secrets = await env.admin.core.listNamespacedSecret({ namespace: ns, labelSelector: `task-broker.dev/task-id=${taskId}` });
    const secret = secrets.items[0]!;
    secret.metadata!.annotations = { ...secret.metadata!.annotations, 'task-broker.dev/expires-at': '2030-01-01T00:00:00.000Z' };
    await env.admin.core.replaceNamespacedSecret({ name: secret.metadata!.name!, namespace: ns, body: secret });

    let status = 200;
    for (let i = 0; i < 50 && status === 200; i++) {
      status = (await req('POST', '/v1/tasks/extend/credential', 'other')).status;
      if (status === 200) await sleep(100);
    }
    assert.equal(status, 404, 'no credential for a forged task');
    let left = await env.taskObjects();
    for (let i = 0; i < 50 && left.roleBindings.some((b) => b.includes(taskId)); i++) {
      await sleep(100);
      left = await env.taskObjects();
    }
    assert.ok(!left.roleBindings.some((b) => b.includes(taskId)), `its RoleBinding is gone: ${JSON.stringify(left)}`);
    const forged = records().find((r) => r.type === 'task.forged' && r.task === taskId);
    assert.ok(forged, 'recorded');
    assert.equal(forged.agent, 'other');
  });

  test('finding 4: a token lives no longer than its task (tokenTTL 1h, task 15m), and never below the API floor', async () => {
    const started = await req('POST', '/v1/tasks', 'alice', { template: 'read-pods', namespace: 'web', name: 'short', ttl: '15m' });
    assert.equal(started.status, 201, JSON.stringify(started.body));
    const cred = await req('POST', '/v1/tasks/short/credential', 'alice');
    const claims = decodeJwt(cred.body.token as string);
    const life = (claims.exp ?? 0) - (claims.iat ?? 0);
    assert.ok(life >= 895 && life <= 905, `token life ${life} s, the task's 900 s rather than tokenTTL's 3600`);
    assert.equal((await req('DELETE', '/v1/tasks/short', 'alice')).status, 200);

    const tiny = await req('POST', '/v1/tasks', 'alice', { template: 'read-pods', namespace: 'web', name: 'tiny', ttl: '20s' });
    const c2 = decodeJwt((await req('POST', '/v1/tasks/tiny/credential', 'alice')).body.token as string);
    assert.equal((c2.exp ?? 0) - (c2.iat ?? 0), 600, 'raised to the API server floor of 600 s');
    assert.equal(tiny.status, 201);
    assert.equal((await req('DELETE', '/v1/tasks/tiny', 'alice')).status, 200);

    // Such a task ends only when a replica deletes its RoleBinding: the Lease's freshness is a metric.
    const metrics = await broker.request('GET', '/metrics', undefined);
    const age = Number(/^broker_sweeper_lease_age_seconds (\S+)$/m.exec(String(metrics.body))?.[1]);
    assert.ok(age >= 0 && age < 5, `sweeper lease age ${age} s`);
  });

  test('finding 9: a clusterRole template whose ClusterRole grants pods/exec is gated', async () => {
    const res = await req('POST', '/v1/tasks', 'alice', { template: 'debug-role', namespace: 'web', name: 'debug' });
    assert.equal(res.status, 403, JSON.stringify(res.body));
    assert.equal(res.body.error.code, 'approval_required');
    assert.deepEqual((await env.taskObjects()).roleBindings.filter((b) => b.includes('debug')), []);
  });

  test('finding 8: free text that looks like a token is recorded redacted, never dropped', async () => {
    const before = records().length;
    const refused = await req('POST', '/v1/tasks', 'alice', { template: JWT_LIKE, namespace: 'web' });
    assert.equal(refused.status, 400);
    const rec = records().slice(before).find((r) => r.type === 'task.refused');
    assert.ok(rec, 'the refusal is on record');
    assert.ok(!JSON.stringify(rec).includes(JWT_LIKE));

    const asked = await req('POST', '/v1/tasks', 'alice', { template: 'read-secrets', namespace: 'web', name: 'redact' });
    const id = asked.body.error.requestId as string;
    const deny = await req('POST', `/v1/approvals/${id}/deny`, 'dave', { reason: `token was ${JWT_LIKE}` });
    assert.equal(deny.status, 200, JSON.stringify(deny.body));
    const denied = records().find((r) => r.type === 'approval.denied' && r.details?.approvalRequest === id);
    assert.ok(denied, 'the decision is on record');
    assert.ok(!JSON.stringify(denied).includes(JWT_LIKE));
    assert.ok(!JSON.stringify(records()).includes(JWT_LIKE));
    assert.equal((await verifyAuditFile(broker.auditLog)).ok, true);
  });

  test("finding 10: the agent's reason never reaches the notification's chat text", async () => {
    const reason = '<!channel> security already approved, approve here: <http://evil.example/approve|approve> *now*';
    const asked = await req('POST', '/v1/tasks', 'alice', { template: 'read-secrets', namespace: 'web', name: 'notify', reason });
    const id = asked.body.error.requestId as string;
    let n: Record<string, unknown> | undefined;
    for (let i = 0; i < 50 && !n; i++) {
      n = notifications.find((x) => x['requestId'] === id);
      if (!n) await sleep(100);
    }
    assert.ok(n, 'notified');
    const text = String(n['text']);
    for (const bad of ['<!channel>', 'evil.example', '*now*', 'already approved']) assert.ok(!text.includes(bad), `${bad} not in ${text}`);
    assert.match(text, new RegExp(`agent alice-agent asks for template "read-secrets" in namespace web .* broker approve ${id}`));
    assert.equal(n['reason'], reason, 'the reason travels as data, in its own field');
  });

  test('issue 11: control and bidi characters in free text are refused with the field named, and nothing changes', async () => {
    const before = await env.taskObjects();
    for (const [body, field] of [
      [{ template: 'read-pods', namespace: 'web', name: 'ctl', reason: '\u0000\u001b[31mall clear' }, 'reason'],
      [{ template: 'read-pods', namespace: 'web', name: 'ctl', reason: 'approve \u202eevil' }, 'reason'],
      [{ template: 'read\u009bpods', namespace: 'web', name: 'ctl' }, 'template'],
    ] as const) {
      const res = await req('POST', '/v1/tasks', 'alice', body);
      assert.equal(res.status, 400, JSON.stringify(res.body));
      assert.equal(res.body.error.field, field);
      assert.match(res.body.error.message, /must not contain control or bidirectional-override characters \(found U\+[0-9A-F]{4} at position \d+\)/);
    }
    assert.deepEqual(await env.taskObjects(), before);
    // "other": alice-agent already has as many requests open as its cap allows.
    const asked = await req('POST', '/v1/tasks', 'other', { template: 'read-secrets', namespace: 'web', name: 'ctl-deny' });
    const id = asked.body.error.requestId as string;
    const deny = await req('POST', `/v1/approvals/${id}/deny`, 'dave', { reason: 'no\u001b]0;pwned\u0007' });
    assert.equal(deny.status, 400, JSON.stringify(deny.body));
    assert.equal(deny.body.error.field, 'reason');
    assert.equal((await req('GET', `/v1/approvals/${id}`, 'other')).body.state, 'pending', 'the refused decision changed nothing');
    assert.ok(records().some((r) => r.type === 'approval.refused' && r.details?.approvalRequest === id && /invalid_argument \(reason\)/.test(r.reason)));
  });

  test('finding 1: per-agent caps on active tasks and open approval requests', async () => {
    for (const name of ['c1', 'c2', 'c3']) {
      const res = await req('POST', '/v1/tasks', 'other', { template: 'read-pods', namespace: 'web', name });
      assert.equal(res.status, 201, JSON.stringify(res.body));
    }
    const fourth = await req('POST', '/v1/tasks', 'other', { template: 'read-pods', namespace: 'web', name: 'c4' });
    assert.equal(fourth.status, 403);
    assert.equal(fourth.body.error.code, 'quota_exceeded');
    assert.match(fourth.body.error.message, /activeTasksPerAgent: 3/);
    for (const name of ['c1', 'c2', 'c3']) assert.equal((await req('DELETE', `/v1/tasks/${name}`, 'other')).status, 200);

    // The forged request of "other" is ignored, so it does not count; ctl-deny does: one more may be open, not a second.
    const open = [];
    for (const name of ['q1']) open.push(await req('POST', '/v1/tasks', 'other', { template: 'read-secrets', namespace: 'web', name }));
    assert.deepEqual(open.map((r) => r.body.error.code), ['approval_required']);
    const third = await req('POST', '/v1/tasks', 'other', { template: 'read-secrets', namespace: 'web', name: 'q3' });
    assert.equal(third.status, 403);
    assert.equal(third.body.error.code, 'quota_exceeded');
    const again = await req('POST', '/v1/tasks', 'other', { template: 'read-secrets', namespace: 'web', name: 'q1' });
    assert.equal(again.body.error.code, 'approval_required', 'asking again for an open request is not a new one');
    assert.ok(records().some((r) => r.type === 'task.refused' && r.agent === 'other' && String(r.reason).startsWith('quota_exceeded')));
  });
});
