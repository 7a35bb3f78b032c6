/**
 * The pure parts of `broker serve`'s start-up and reload (issue 10, items 2-3): the request log's
 * lines (never a token, header, query or body), the comparison of the broker's credential with what
 * `policy apply` grants, and what a policy reload reports as changed or refuses.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import Fastify from 'fastify';
import { excessRules, EVERYONE_RULES, grantedByApply } from '../../src/server/credential-check.ts';
import { diffPolicies, restartNeeded } from '../../src/server/reload.ts';
import { fastifyLogging, formatLogLine } from '../../src/server/request-log.ts';
import { brokerClusterRules, brokerTargetNamespaceRules, brokerTaskNamespaceRules } from '../../src/policy/apply.ts';
import { parsePolicy } from '../../src/policy/parse.ts';
import type { PolicyRule } from '../../src/policy/types.ts';

const POLICY = `apiVersion: task-broker/v1alpha1
kind: Policy
broker:
  taskNamespace: task-broker
agents:
  - name: alpha
    identities: [{ serviceAccount: agents/alpha }]
templates:
  - name: read-pods
    namespaces: [team-a]
    rules: [{ apiGroups: [""], resources: [pods], verbs: [get, list] }]
    ttl: { default: 15m, max: 1h }
    agents: [alpha]
`;

describe('the request log', () => {
  test('a request line in the text form: time, level, method, route, status, duration, caller, task, request id', () => {
    const line = JSON.stringify({
      level: 30,
      time: Date.UTC(2025, 4, 1, 9, 30, 12, 345),
      pid: 1,
      hostname: 'h',
      reqId: '5c1e2f3a-0000-4000-8000-000000000000',
      method: 'POST',
      route: '/v1/tasks/:ref/credential',
      status: 200,
      ms: 3.2,
      subject: 'system:serviceaccount:agents:alpha',
      actor: 'agent:alpha',
      agent: 'alpha',
      task: 't8f3a',
      msg: 'request',
    });
    assert.equal(formatLogLine(line), '09:30:12.345 INFO  POST /v1/tasks/:ref/credential 200 3.2ms agent:alpha task t8f3a req 5c1e2f3a');
    const anonymous = JSON.parse(line) as Record<string, unknown>;
    for (const k of ['subject', 'actor', 'agent', 'task']) delete anonymous[k];
    anonymous['level'] = 50;
    anonymous['status'] = 503;
    assert.equal(formatLogLine(anonymous), '09:30:12.345 ERROR POST /v1/tasks/:ref/credential 503 3.2ms req 5c1e2f3a');
  });

  test('other records: the message, then their fields; control characters escaped; a line that is not JSON passed through', () => {
    const time = Date.UTC(2025, 4, 1, 9, 30, 12, 345);
    assert.equal(formatLogLine({ level: 40, time, msg: 'credential: broad', count: 2 }), '09:30:12.345 WARN  credential: broad count=2');
    assert.equal(formatLogLine({ level: 30, time, msg: 'evil \u001b[2J name\n' }), '09:30:12.345 INFO  evil \\x1b[2J name\\x0a');
    assert.equal(formatLogLine('not json\n'), 'not json');
  });

  test('through fastify: one line per request with the route pattern, never a token, header, query string or body', async () => {
    const lines: string[] = [];
    const store = { get: (id: string) => (id === 'abc123' ? ({ id } as never) : undefined), findByName: () => undefined };
    const logging = fastifyLogging({ format: 'json', level: 'info', write: (l) => lines.push(l) }, store);
    const app = Fastify({ ...logging } as Parameters<typeof Fastify>[0]);
    app.decorateRequest('caller', undefined);
    app.addHook('onRequest', (req, _reply, done) => {
      (req as unknown as { caller: unknown }).caller = { subject: 'system:serviceaccount:agents:alpha', agent: 'alpha', principal: 'agent:alpha', method: 'serviceAccount' };
      done();
    });
    app.post('/v1/tasks/:ref/credential', async () => ({ token: 'eyJsecret.token.value' }));
    app.get('/boom', async () => {
      throw new Error('kaput');
    });
    const secret = 'Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln';
    const res = await app.inject({ method: 'POST', url: '/v1/tasks/abc123/credential?token=q-secret', headers: { authorization: secret, 'x-custom': 'h-secret' }, payload: { body: 'b-secret' } });
    assert.equal(res.statusCode, 200);
    await app.inject({ method: 'GET', url: '/boom' });
    await app.inject({ method: 'GET', url: '/nowhere?token=q2-secret' });
    await app.close();
    const all = lines.join('');
    for (const leak of ['eyJ', 'q-secret', 'h-secret', 'b-secret', 'q2-secret', 'x-custom', 'authorization']) assert.ok(!all.toLowerCase().includes(leak.toLowerCase()), `${leak} in ${all}`);
    const records = lines.map((l) => JSON.parse(l) as Record<string, unknown>).filter((r) => r['msg'] === 'request');
    assert.deepEqual(
      records.map((r) => [r['method'], r['route'], r['status'], r['agent'], r['task'] ?? null]),
      [
        ['POST', '/v1/tasks/:ref/credential', 200, 'alpha', 'abc123'],
        ['GET', '/boom', 500, 'alpha', null],
        ['GET', 'unmatched', 404, 'alpha', null],
      ],
    );
    assert.equal(records[1]!['level'], 50, '5xx at error');
    assert.equal(lines.length, records.length + lines.filter((l) => !l.includes('"msg":"request"')).length);
  });
});

describe("the broker's credential against what policy apply grants", () => {
  const policy = parsePolicy(POLICY);
  const granted = grantedByApply(policy);

  test('what apply grants, namespace by namespace, is no excess', () => {
    const cluster = [...brokerClusterRules([]), ...EVERYONE_RULES];
    assert.deepEqual(excessRules(brokerTaskNamespaceRules(), [...granted.get('task-broker')!, ...cluster]), []);
    assert.deepEqual(excessRules(brokerTargetNamespaceRules(['task-broker:template:read-pods']), [...granted.get('team-a')!, ...cluster]), []);
    assert.deepEqual(excessRules([...EVERYONE_RULES], cluster), []);
  });

  test('anything more is named: a verb, a resource, a wildcard, a name outside the allowed ones', () => {
    const allowed: PolicyRule[] = [
      { apiGroups: [''], resources: ['secrets'], verbs: ['get'], resourceNames: ['key'] },
      { apiGroups: ['rbac.authorization.k8s.io'], resources: ['rolebindings'], verbs: ['create', 'delete'] },
    ];
    assert.deepEqual(
      excessRules(
        [
          { apiGroups: [''], resources: ['secrets'], verbs: ['get'], resourceNames: ['key'] },
          { apiGroups: [''], resources: ['secrets'], verbs: ['get', 'list'] },
          { apiGroups: ['rbac.authorization.k8s.io'], resources: ['rolebindings'], verbs: ['create', 'escalate'] },
          { apiGroups: ['*'], resources: ['*'], verbs: ['*'] },
        ],
        allowed,
      ),
      ['get,list secrets', 'escalate rbac.authorization.k8s.io/rolebindings', '* */*'],
    );
    assert.deepEqual(excessRules([{ apiGroups: [''], resources: ['secrets'], verbs: ['get'], resourceNames: ['key', 'other'] }], allowed), ['get secrets (key, other)']);
  });
});

describe('policy reload', () => {
  const before = parsePolicy(POLICY);

  test('what changed: templates added, removed and changed, and other sections', () => {
    const after = parsePolicy(
      POLICY.replace('max: 1h', 'max: 3h').replace('broker:\n', 'broker:\n  tokenTTL: 20m\n') +
        `  - name: write-cm
    namespaces: [team-a]
    rules: [{ apiGroups: [""], resources: [configmaps], verbs: [create] }]
    ttl: { default: 15m, max: 1h }
    agents: [alpha]
`,
    );
    assert.deepEqual(diffPolicies(before, after), { templatesAdded: ['write-cm'], templatesRemoved: [], templatesChanged: ['read-pods'], changed: ['broker.tokenTtl'] });
    assert.deepEqual(diffPolicies(after, before), { templatesAdded: [], templatesRemoved: ['write-cm'], templatesChanged: ['read-pods'], changed: ['broker.tokenTtl'] });
    assert.deepEqual(diffPolicies(before, parsePolicy(`# a comment\n${POLICY}`)), { templatesAdded: [], templatesRemoved: [], templatesChanged: [], changed: [] });
  });

  test("the broker's namespaces need a restart; anything else does not", () => {
    assert.deepEqual(restartNeeded(before, parsePolicy(POLICY.replace('max: 1h', 'max: 2h'))), []);
    const moved = restartNeeded(before, parsePolicy(POLICY.replace('taskNamespace: task-broker', 'taskNamespace: tasks-2\n  namespace: broker-2')));
    assert.equal(moved.length, 2);
    assert.match(moved[0]!, /^broker\.namespace: "task-broker-system" -> "broker-2" needs a restart/);
    assert.match(moved[1]!, /^broker\.taskNamespace: "task-broker" -> "tasks-2" needs a restart/);
  });
});
