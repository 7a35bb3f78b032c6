/**
 * `broker policy apply` against a real kube-apiserver: what it creates, idempotence, updates and
 * removals, dry run, and that the broker's own ServiceAccount is bounded by what it was given
 * (DESIGN.md §1 property 6): it can bind the policy's ClusterRoles where the policy allows them and
 * nothing else, and cannot escalate.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as k8s from '@kubernetes/client-node';
import { LocalCluster } from '../../src/cluster/local-cluster.ts';
import { kubeApis, type KubeApis } from '../../src/kube/config.ts';
import { applyPolicy, BROKER_ROLE, desiredObjects, POLICY_SELECTOR, type Change } from '../../src/policy/apply.ts';
import { parsePolicy } from '../../src/policy/parse.ts';
import type { Policy } from '../../src/policy/types.ts';
import { EXIT } from '../../src/cli/exit-codes.ts';
import { adminConfig, run, writeTokenKubeconfig } from '../helpers/kube.ts';

const TASK_NS = 'tb-system';
const SA = 'task-broker';
const BROKER_USER = `system:serviceaccount:${TASK_NS}:${SA}`;

interface TemplateSpec {
  name: string;
  namespaces: string[];
  rules?: { apiGroups: string[]; resources: string[]; verbs: string[] }[];
  clusterRole?: string;
}

const READ_PODS: TemplateSpec = {
  name: 'read-pods',
  namespaces: ['app-a', 'app-b'],
  rules: [{ apiGroups: [''], resources: ['pods', 'pods/log'], verbs: ['get', 'list', 'watch'] }],
};
const DEPLOYER: TemplateSpec = {
  name: 'deployer',
  namespaces: ['app-b', 'app-c'],
  rules: [{ apiGroups: ['apps'], resources: ['deployments'], verbs: ['get', 'list', 'update', 'patch'] }],
};
const VIEWER: TemplateSpec = { name: 'viewer', namespaces: ['app-a'], clusterRole: 'view' };
const BASE = [READ_PODS, DEPLOYER, VIEWER];

function policyYaml(templates: TemplateSpec[], taskNamespace = TASK_NS): string {
  return JSON.stringify({
    apiVersion: 'task-broker/v1alpha1',
    kind: 'Policy',
    broker: { taskNamespace, serviceAccount: SA },
    agents: [{ name: 'agent-1' }],
    templates: templates.map((t) => ({
      name: t.name,
      namespaces: t.namespaces,
      ...(t.rules ? { rules: t.rules } : { clusterRole: t.clusterRole }),
      ttl: { default: '15m', max: '1h' },
      agents: ['agent-1'],
    })),
  });
}

function policyOf(templates: TemplateSpec[], taskNamespace = TASK_NS): Policy {
  return parsePolicy(policyYaml(templates, taskNamespace), 'test-policy.yaml');
}

const key = (c: { kind: string; namespace?: string; name: string }) => `${c.kind} ${c.namespace ? `${c.namespace}/` : ''}${c.name}`;
const keysOf = (changes: Change[], action?: Change['action']) =>
  changes.filter((c) => action === undefined || c.action === action).map(key).sort();

const EXPECTED_BASE = [
  `Namespace ${TASK_NS}`,
  `ServiceAccount ${TASK_NS}/${SA}`,
  `ClusterRole ${BROKER_ROLE}`,
  'ClusterRole task-broker:template:deployer',
  'ClusterRole task-broker:template:read-pods',
  `ClusterRoleBinding ${BROKER_ROLE}`,
  ...[TASK_NS, 'app-a', 'app-b', 'app-c'].flatMap((ns) => [`Role ${ns}/${BROKER_ROLE}`, `RoleBinding ${ns}/${BROKER_ROLE}`]),
].sort();

const TASK_NS_RULES = [
  { apiGroups: [''], resources: ['serviceaccounts'], verbs: ['create', 'delete', 'get', 'list', 'watch'] },
  { apiGroups: [''], resources: ['serviceaccounts/token'], verbs: ['create'] },
  { apiGroups: [''], resources: ['secrets'], verbs: ['create', 'delete', 'get', 'list', 'watch', 'patch'] },
  { apiGroups: [''], resources: ['configmaps'], verbs: ['create', 'delete', 'get', 'list', 'watch', 'update'] },
  { apiGroups: ['coordination.k8s.io'], resources: ['leases'], verbs: ['get', 'create', 'update'] },
];
function targetRules(clusterRoles: string[]) {
  return [
    { apiGroups: ['rbac.authorization.k8s.io'], resources: ['rolebindings'], verbs: ['create', 'delete', 'get', 'list', 'watch'] },
    { apiGroups: ['rbac.authorization.k8s.io'], resources: ['clusterroles'], resourceNames: clusterRoles, verbs: ['bind'] },
  ];
}

/** A rule as plain JSON without the keys the API server omits when empty. */
function plainRules(rules: k8s.V1PolicyRule[] | undefined) {
  return (rules ?? []).map((r) => JSON.parse(JSON.stringify(r)) as Record<string, unknown>);
}

/** Every managed RBAC object (and whether the task namespace exists), as `Kind ns/name` keys. */
async function clusterSnapshot(kube: KubeApis): Promise<Record<string, string>> {
  const labelSelector = POLICY_SELECTOR;
  const out: Record<string, string> = {};
  const add = (kind: string, list: { items: { metadata?: k8s.V1ObjectMeta }[] }) => {
    for (const o of list.items) out[key({ kind, ...(o.metadata?.namespace ? { namespace: o.metadata.namespace } : {}), name: o.metadata!.name! })] = o.metadata!.resourceVersion!;
  };
  add('ClusterRole', await kube.rbac.listClusterRole({ labelSelector }));
  add('ClusterRoleBinding', await kube.rbac.listClusterRoleBinding({ labelSelector }));
  add('Role', await kube.rbac.listRoleForAllNamespaces({ labelSelector }));
  add('RoleBinding', await kube.rbac.listRoleBindingForAllNamespaces({ labelSelector }));
  return out;
}

async function status(p: Promise<unknown>): Promise<{ code: number; body: string }> {
  try {
    await p;
    return { code: 200, body: '' };
  } catch (err) {
    if (err instanceof k8s.ApiException) return { code: err.code, body: String(err.body) };
    throw err;
  }
}

let cluster: LocalCluster;
let kube: KubeApis;
let scratch: string;

before(async () => {
  cluster = await LocalCluster.start();
  kube = kubeApis(adminConfig(cluster));
  for (const name of ['app-a', 'app-b', 'app-c']) await kube.core.createNamespace({ body: { metadata: { name } } });
  scratch = mkdtempSync(join(tmpdir(), 'tb-policy-apply-'));
});
after(async () => {
  await cluster?.stop();
  if (scratch) rmSync(scratch, { recursive: true, force: true });
});

test('desiredObjects: no escalate and no "*" in the broker\'s own roles; bind only on the templates\' ClusterRoles', () => {
  const objects = desiredObjects(policyOf(BASE));
  assert.deepEqual(objects.map(key).sort(), EXPECTED_BASE);
  for (const o of objects) {
    if ((o.kind === 'Role' || o.kind === 'ClusterRole') && o.name === BROKER_ROLE) {
      const flat = o.rules.flatMap((r) => [...(r.apiGroups ?? []), ...(r.resources ?? []), ...r.verbs, ...(r.resourceNames ?? [])]);
      assert.ok(!flat.includes('*'), `${key(o)} has no "*"`);
      assert.ok(!flat.includes('escalate'), `${key(o)} has no escalate`);
    }
  }
  // A template that allows the task namespace itself: one Role there, holding both sets of rules.
  const own = desiredObjects(policyOf([{ ...READ_PODS, namespaces: [TASK_NS] }])).filter((o) => o.kind === 'Role');
  assert.equal(own.length, 1);
  assert.deepEqual(own[0]!.kind === 'Role' ? own[0]!.rules : null, [...TASK_NS_RULES, ...targetRules(['task-broker:template:read-pods'])]);
});

describe('policy apply', () => {
  test('the first apply creates exactly the expected objects, with the broker roles as specified', async () => {
    const changes = await applyPolicy(kube, policyOf(BASE), {});
    assert.deepEqual(keysOf(changes), EXPECTED_BASE);
    assert.ok(changes.every((c) => c.action === 'create'), JSON.stringify(changes));

    const ns = await kube.core.readNamespace({ name: TASK_NS });
    assert.equal(ns.metadata?.labels?.['app.kubernetes.io/managed-by'], 'task-broker');
    await kube.core.readNamespacedServiceAccount({ name: SA, namespace: TASK_NS });

    const taskRole = await kube.rbac.readNamespacedRole({ name: BROKER_ROLE, namespace: TASK_NS });
    assert.deepEqual(plainRules(taskRole.rules), TASK_NS_RULES);
    const expectedBind: Record<string, string[]> = {
      'app-a': ['task-broker:template:read-pods', 'view'],
      'app-b': ['task-broker:template:deployer', 'task-broker:template:read-pods'],
      'app-c': ['task-broker:template:deployer'],
    };
    for (const [namespace, roles] of Object.entries(expectedBind)) {
      const role = await kube.rbac.readNamespacedRole({ name: BROKER_ROLE, namespace });
      assert.deepEqual(plainRules(role.rules), targetRules(roles), namespace);
      const rb = await kube.rbac.readNamespacedRoleBinding({ name: BROKER_ROLE, namespace });
      assert.deepEqual({ ...rb.roleRef }, { apiGroup: 'rbac.authorization.k8s.io', kind: 'Role', name: BROKER_ROLE });
      assert.deepEqual(rb.subjects?.map((s) => [s.kind, s.namespace, s.name]), [['ServiceAccount', TASK_NS, SA]]);
    }
    const cr = await kube.rbac.readClusterRole({ name: BROKER_ROLE });
    assert.deepEqual(plainRules(cr.rules), [{ apiGroups: ['authentication.k8s.io'], resources: ['tokenreviews'], verbs: ['create'] }]);
    const crb = await kube.rbac.readClusterRoleBinding({ name: BROKER_ROLE });
    assert.deepEqual({ ...crb.roleRef }, { apiGroup: 'rbac.authorization.k8s.io', kind: 'ClusterRole', name: BROKER_ROLE });
    assert.deepEqual(crb.subjects?.map((s) => [s.kind, s.namespace, s.name]), [['ServiceAccount', TASK_NS, SA]]);

    const tpl = await kube.rbac.readClusterRole({ name: 'task-broker:template:read-pods' });
    assert.deepEqual(plainRules(tpl.rules), READ_PODS.rules);
    // A clusterRole template creates no ClusterRole of its own.
    assert.equal((await status(kube.rbac.readClusterRole({ name: 'task-broker:template:viewer' }))).code, 404);
  });

  test('a second apply changes nothing', async () => {
    const before = await clusterSnapshot(kube);
    const changes = await applyPolicy(kube, policyOf(BASE), {});
    assert.deepEqual(keysOf(changes), EXPECTED_BASE);
    assert.deepEqual(keysOf(changes, 'unchanged'), EXPECTED_BASE);
    assert.deepEqual(await clusterSnapshot(kube), before, 'no resourceVersion moved');
  });

  test('--dry-run reports the changes and writes nothing', async () => {
    const before = await clusterSnapshot(kube);
    const changed: TemplateSpec[] = [
      { ...READ_PODS, rules: [{ apiGroups: [''], resources: ['pods'], verbs: ['get'] }] },
      { name: 'logs', namespaces: ['app-c'], rules: [{ apiGroups: [''], resources: ['pods/log'], verbs: ['get'] }] },
    ];
    const changes = await applyPolicy(kube, policyOf(changed), { dryRun: true });
    assert.deepEqual(keysOf(changes, 'create'), ['ClusterRole task-broker:template:logs']);
    assert.deepEqual(keysOf(changes, 'update'), [
      'ClusterRole task-broker:template:read-pods',
      `Role app-a/${BROKER_ROLE}`,
      `Role app-b/${BROKER_ROLE}`,
      `Role app-c/${BROKER_ROLE}`,
    ]);
    assert.deepEqual(keysOf(changes, 'delete'), ['ClusterRole task-broker:template:deployer']);
    assert.deepEqual(await clusterSnapshot(kube), before, 'the cluster is untouched');
    const tpl = await kube.rbac.readClusterRole({ name: 'task-broker:template:read-pods' });
    assert.deepEqual(plainRules(tpl.rules), READ_PODS.rules);
  });

  test("changing a template's rules updates its ClusterRole and nothing else", async () => {
    const rules = [{ apiGroups: [''], resources: ['pods'], verbs: ['get'] }];
    const changes = await applyPolicy(kube, policyOf([{ ...READ_PODS, rules }, DEPLOYER, VIEWER]), {});
    assert.deepEqual(keysOf(changes, 'update'), ['ClusterRole task-broker:template:read-pods']);
    assert.equal(changes.filter((c) => c.action !== 'unchanged').length, 1);
    const tpl = await kube.rbac.readClusterRole({ name: 'task-broker:template:read-pods' });
    assert.deepEqual(plainRules(tpl.rules), rules);
    assert.equal(tpl.metadata?.labels?.['task-broker.dev/component'], 'policy');
  });

  test('removing a template deletes its ClusterRole and takes it out of the broker\'s bind list', async () => {
    const changes = await applyPolicy(kube, policyOf([READ_PODS, VIEWER]), {});
    assert.deepEqual(keysOf(changes, 'delete'), [
      'ClusterRole task-broker:template:deployer',
      `Role app-c/${BROKER_ROLE}`,
      `RoleBinding app-c/${BROKER_ROLE}`,
    ]);
    // Bindings go before roles, and nothing is created.
    const deletions = changes.filter((c) => c.action === 'delete').map((c) => c.kind);
    assert.deepEqual(deletions, ['RoleBinding', 'Role', 'ClusterRole']);
    assert.deepEqual(keysOf(changes, 'update'), ['ClusterRole task-broker:template:read-pods', `Role app-b/${BROKER_ROLE}`]);
    assert.deepEqual(keysOf(changes, 'create'), []);
    assert.equal((await status(kube.rbac.readClusterRole({ name: 'task-broker:template:deployer' }))).code, 404);
    assert.equal((await status(kube.rbac.readNamespacedRole({ name: BROKER_ROLE, namespace: 'app-c' }))).code, 404);
    const appB = await kube.rbac.readNamespacedRole({ name: BROKER_ROLE, namespace: 'app-b' });
    assert.deepEqual(plainRules(appB.rules), targetRules(['task-broker:template:read-pods']));
    // The task namespace is never deleted.
    await kube.core.readNamespace({ name: TASK_NS });
  });

  test('a missing template namespace fails before anything is written, naming the field', async () => {
    const before = await clusterSnapshot(kube);
    const templates: TemplateSpec[] = [
      READ_PODS,
      { name: 'ghost', namespaces: ['app-a', 'no-such-ns'], rules: [{ apiGroups: [''], resources: ['configmaps'], verbs: ['get'] }] },
    ];
    await assert.rejects(applyPolicy(kube, policyOf(templates, 'tb-other'), {}), (err: Error & { code?: string; field?: string }) => {
      assert.equal(err.code, 'invalid_argument');
      assert.equal(err.field, 'templates[1].namespaces');
      assert.match(err.message, /namespace "no-such-ns" \(allowed by template "ghost"\) does not exist/);
      return true;
    });
    assert.equal((await status(kube.core.readNamespace({ name: 'tb-other' }))).code, 404, 'the task namespace was not created');
    assert.equal((await status(kube.rbac.readClusterRole({ name: 'task-broker:template:ghost' }))).code, 404);
    assert.deepEqual(await clusterSnapshot(kube), before);
  });
});

describe("the broker's own ServiceAccount is bounded by the policy", () => {
  let broker: KubeApis;

  before(async () => {
    await applyPolicy(kube, policyOf(BASE), {});
    const tr = await kube.core.createNamespacedServiceAccountToken({
      name: SA,
      namespace: TASK_NS,
      body: { spec: { audiences: [], expirationSeconds: 3600 } },
    });
    const token = tr.status?.token;
    assert.ok(token, 'a token for the broker ServiceAccount');
    const kc = new k8s.KubeConfig();
    kc.loadFromFile(writeTokenKubeconfig(join(scratch, 'broker.kubeconfig'), cluster, token));
    broker = kubeApis(kc);
  });

  const taskBinding = (name: string, clusterRole: string): k8s.V1RoleBinding => ({
    metadata: { name },
    roleRef: { apiGroup: 'rbac.authorization.k8s.io', kind: 'ClusterRole', name: clusterRole },
    subjects: [{ kind: 'ServiceAccount', name: 'task-abc', namespace: TASK_NS }],
  });

  test('it can do its job: task ServiceAccounts, Secrets, tokens and leases in the task namespace; TokenReview', async () => {
    await broker.core.createNamespacedServiceAccount({ namespace: TASK_NS, body: { metadata: { name: 'task-abc' } } });
    await broker.core.createNamespacedSecret({ namespace: TASK_NS, body: { metadata: { name: 'task-abc' }, stringData: { a: 'b' } } });
    await broker.core.listNamespacedSecret({ namespace: TASK_NS });
    const tr = await broker.core.createNamespacedServiceAccountToken({
      name: 'task-abc',
      namespace: TASK_NS,
      body: { spec: { audiences: [], expirationSeconds: 600 } },
    });
    const token = tr.status?.token;
    assert.ok(token);
    const review = await broker.authn.createTokenReview({ body: { spec: { token } } });
    assert.equal(review.status?.user?.username, `system:serviceaccount:${TASK_NS}:task-abc`);
    await broker.coordination.createNamespacedLease({ namespace: TASK_NS, body: { metadata: { name: 'sweeper' }, spec: {} } });
  });

  test("it can bind a template's ClusterRole (and a clusterRole template's role) where the template allows it", async () => {
    await broker.rbac.createNamespacedRoleBinding({ namespace: 'app-a', body: taskBinding('task-broker-ok', 'task-broker:template:read-pods') });
    await broker.rbac.createNamespacedRoleBinding({ namespace: 'app-a', body: taskBinding('task-broker-view', 'view') });
    await broker.rbac.createNamespacedRoleBinding({ namespace: 'app-c', body: taskBinding('task-broker-dep', 'task-broker:template:deployer') });
    await broker.rbac.deleteNamespacedRoleBinding({ name: 'task-broker-ok', namespace: 'app-a' });
  });

  test('it cannot bind cluster-admin: the API server refuses with 403 (escalation check)', async () => {
    const res = await status(broker.rbac.createNamespacedRoleBinding({ namespace: 'app-a', body: taskBinding('evil', 'cluster-admin') }));
    assert.equal(res.code, 403, res.body);
    assert.match(res.body, /escalat|bind/);
    assert.match(res.body, new RegExp(BROKER_USER));
  });

  test("it cannot bind a template's ClusterRole in a namespace that template does not allow", async () => {
    // deployer allows app-b and app-c, not app-a; read-pods does not allow app-c.
    const a = await status(broker.rbac.createNamespacedRoleBinding({ namespace: 'app-a', body: taskBinding('x', 'task-broker:template:deployer') }));
    assert.equal(a.code, 403, a.body);
    const c = await status(broker.rbac.createNamespacedRoleBinding({ namespace: 'app-c', body: taskBinding('y', 'task-broker:template:read-pods') }));
    assert.equal(c.code, 403, c.body);
    // And nowhere outside the policy's namespaces, not even its own ClusterRoles.
    const d = await status(broker.rbac.createNamespacedRoleBinding({ namespace: 'default', body: taskBinding('z', 'task-broker:template:read-pods') }));
    assert.equal(d.code, 403, d.body);
  });

  test('it cannot create a ClusterRoleBinding', async () => {
    const res = await status(
      broker.rbac.createClusterRoleBinding({
        body: {
          metadata: { name: 'evil' },
          roleRef: { apiGroup: 'rbac.authorization.k8s.io', kind: 'ClusterRole', name: 'task-broker:template:read-pods' },
          subjects: [{ kind: 'ServiceAccount', name: 'task-abc', namespace: TASK_NS }],
        },
      }),
    );
    assert.equal(res.code, 403, res.body);
  });

  test('it cannot create or update ClusterRoles, nor create Roles (no escalate)', async () => {
    const create = await status(
      broker.rbac.createClusterRole({ body: { metadata: { name: 'evil' }, rules: [{ apiGroups: ['*'], resources: ['*'], verbs: ['*'] }] } }),
    );
    assert.equal(create.code, 403, create.body);
    const admins = await kube.rbac.readClusterRole({ name: 'task-broker:template:read-pods' });
    const update = await status(
      broker.rbac.replaceClusterRole({
        name: 'task-broker:template:read-pods',
        body: { ...admins, rules: [{ apiGroups: ['*'], resources: ['*'], verbs: ['*'] }] },
      }),
    );
    assert.equal(update.code, 403, update.body);
    const role = await status(
      broker.rbac.createNamespacedRole({ namespace: 'app-a', body: { metadata: { name: 'evil' }, rules: [{ apiGroups: [''], resources: ['secrets'], verbs: ['get'] }] } }),
    );
    assert.equal(role.code, 403, role.body);
    // Nor widen its own Role.
    const own = await kube.rbac.readNamespacedRole({ name: BROKER_ROLE, namespace: 'app-a' });
    const widen = await status(
      broker.rbac.replaceNamespacedRole({ name: BROKER_ROLE, namespace: 'app-a', body: { ...own, rules: [{ apiGroups: ['*'], resources: ['*'], verbs: ['*'] }] } }),
    );
    assert.equal(widen.code, 403, widen.body);
  });

  test('it cannot read Secrets outside the task namespace', async () => {
    await kube.core.createNamespacedSecret({ namespace: 'app-a', body: { metadata: { name: 'db' }, stringData: { password: 'x' } } });
    assert.equal((await status(broker.core.readNamespacedSecret({ name: 'db', namespace: 'app-a' }))).code, 403);
    assert.equal((await status(broker.core.listNamespacedSecret({ namespace: 'app-a' }))).code, 403);
    assert.equal((await status(broker.core.listSecretForAllNamespaces({}))).code, 403);
  });
});

describe('broker policy apply (the command line)', () => {
  // bin/broker runs the compiled dist/; fall back to the sources when dist/ has not been built with apply.
  const root = new URL('../../', import.meta.url).pathname;
  const useDist = existsSync(join(root, 'dist/policy/apply.js'));
  const cli = (...args: string[]) =>
    useDist ? run(join(root, 'bin/broker'), args) : run(process.execPath, [join(root, 'src/cli/main.ts'), ...args]);

  test('applies a policy file, prints each change, and -o json gives {dryRun, changes}', async () => {
    const file = join(scratch, 'policy.yaml');
    writeFileSync(file, policyYaml([...BASE, { name: 'cli-only', namespaces: ['app-c'], rules: [{ apiGroups: [''], resources: ['configmaps'], verbs: ['get'] }] }]));

    const dry = await cli('policy', 'apply', file, '--kubeconfig', cluster.kubeconfig, '--dry-run', '-o', 'json');
    assert.equal(dry.code, EXIT.ok, dry.stderr);
    const planned = JSON.parse(dry.stdout) as { dryRun: boolean; changes: Change[] };
    assert.equal(planned.dryRun, true);
    assert.deepEqual(keysOf(planned.changes, 'create'), ['ClusterRole task-broker:template:cli-only']);
    assert.equal((await status(kube.rbac.readClusterRole({ name: 'task-broker:template:cli-only' }))).code, 404, 'dry run wrote nothing');

    const res = await cli('policy', 'apply', file, '--kubeconfig', cluster.kubeconfig);
    assert.equal(res.code, EXIT.ok, res.stderr);
    assert.match(res.stdout, /^created ClusterRole task-broker:template:cli-only$/m);
    assert.match(res.stdout, /^updated Role task-broker:broker \(namespace app-c\)$/m);
    assert.match(res.stdout, /^2 changes, 13 unchanged$/m);
    await kube.rbac.readClusterRole({ name: 'task-broker:template:cli-only' });

    const auditLog = join(scratch, 'apply-audit.jsonl');
    const again = await cli('policy', 'apply', file, '--kubeconfig', cluster.kubeconfig, '-o', 'json', '--audit-log', auditLog);
    assert.equal(again.code, EXIT.ok, again.stderr);
    const result = JSON.parse(again.stdout) as { dryRun: boolean; changes: Change[] };
    assert.equal(result.dryRun, false);
    assert.ok(result.changes.length > 0 && result.changes.every((c) => c.action === 'unchanged'));
    // --audit-log records the apply: what changed, against which cluster, from which policy.
    const records = readFileSync(auditLog, 'utf8').trim().split('\n').map((l) => JSON.parse(l) as { type: string; details: Record<string, unknown> });
    assert.equal(records.length, 1);
    assert.equal(records[0]!.type, 'policy.applied');
    assert.equal(records[0]!.details['unchanged'], result.changes.length);
    assert.equal(records[0]!.details['cluster'], cluster.server);
    assert.match(String(records[0]!.details['policySha256']), /^[0-9a-f]{64}$/);
  });

  test('--kubeconfig is required; a missing template namespace exits with the usage code and names the field', async () => {
    const file = join(scratch, 'bad.yaml');
    writeFileSync(file, policyYaml([{ name: 'ghost', namespaces: ['nowhere'], rules: [{ apiGroups: [''], resources: ['pods'], verbs: ['get'] }] }]));
    const noKube = await cli('policy', 'apply', file);
    assert.equal(noKube.code, EXIT.usage);
    assert.match(noKube.stderr, /required option '--kubeconfig <path>' not specified/);

    const res = await cli('policy', 'apply', file, '--kubeconfig', cluster.kubeconfig);
    assert.equal(res.code, EXIT.usage, res.stderr);
    assert.match(res.stderr, /namespace "nowhere" \(allowed by template "ghost"\) does not exist \(templates\[0\]\.namespaces\) \[invalid_argument\]/);

    const help = await cli('policy', 'apply', '--help');
    assert.equal(help.code, EXIT.ok);
    assert.match(help.stdout, /Example:\n/);
  });
});
