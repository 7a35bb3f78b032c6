/**
 * `broker policy apply` against a real kube-apiserver: what it creates, idempotence, updates and
 * removals, dry run, and that the broker's own ServiceAccount is bounded by what it was given
 * (DESIGN.md §1 property 6): it can bind the policy's ClusterRoles where the policy allows them and
 * nothing else, cannot escalate, and, living in a namespace of its own, cannot mint a token for
 * itself. Also: `clusterRole` templates checked against the gated set, templates that allow a broker
 * namespace refused, and the objects of an earlier layout cleaned up.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import * as k8s from '@kubernetes/client-node';
import { KEY_SECRET } from '../../src/approvals/token.ts';
import { LocalCluster } from '../../src/cluster/local-cluster.ts';
import { kubeApis, type KubeApis } from '../../src/kube/config.ts';
import { affectedTasks, applyPolicy, BROKER_ROLE, clusterRoleGatedHits, desiredObjects, POLICY_LABELS, POLICY_SELECTOR, type Change } from '../../src/policy/apply.ts';
import { parsePolicy } from '../../src/policy/parse.ts';
import type { Policy } from '../../src/policy/types.ts';
import { EXIT } from '../../src/cli/exit-codes.ts';
import { BrokerProcess, mintToken } from '../helpers/broker.ts';
import { adminConfig, kubectl, run, writeTokenKubeconfig } from '../helpers/kube.ts';

const BROKER_NS = 'tb-system';
const TASK_NS = 'tb-tasks';
const SA = 'task-broker';
const BROKER_USER = `system:serviceaccount:${BROKER_NS}:${SA}`;

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

interface PolicyOptions {
  taskNamespace?: string;
  namespace?: string;
  /** Declare an approver group `sre` (one person), so gated templates can be approved. */
  approvers?: boolean;
}

function policyYaml(templates: TemplateSpec[], options: PolicyOptions = {}): string {
  return JSON.stringify({
    apiVersion: 'task-broker/v1alpha1',
    kind: 'Policy',
    broker: { namespace: options.namespace ?? BROKER_NS, taskNamespace: options.taskNamespace ?? TASK_NS, serviceAccount: SA },
    agents: [{ name: 'agent-1' }],
    ...(options.approvers
      ? {
          people: [{ name: 'alice', identities: [{ oidc: { issuer: 'https://idp.example.com', subject: 'alice' } }] }],
          approvers: [{ name: 'sre', members: [{ person: 'alice' }] }],
        }
      : {}),
    templates: templates.map((t) => ({
      name: t.name,
      namespaces: t.namespaces,
      ...(t.rules ? { rules: t.rules } : { clusterRole: t.clusterRole }),
      ttl: { default: '15m', max: '1h' },
      agents: ['agent-1'],
    })),
  });
}

function policyOf(templates: TemplateSpec[], options: PolicyOptions = {}): Policy {
  return parsePolicy(policyYaml(templates, options), 'test-policy.yaml');
}

const key = (c: { kind: string; namespace?: string; name: string }) => `${c.kind} ${c.namespace ? `${c.namespace}/` : ''}${c.name}`;
const keysOf = (changes: Change[], action?: Change['action']) =>
  changes.filter((c) => action === undefined || c.action === action).map(key).sort();

const EXPECTED_BASE = [
  `Namespace ${BROKER_NS}`,
  `Namespace ${TASK_NS}`,
  `ServiceAccount ${BROKER_NS}/${SA}`,
  `ClusterRole ${BROKER_ROLE}`,
  'ClusterRole task-broker:template:deployer',
  'ClusterRole task-broker:template:read-pods',
  `ClusterRoleBinding ${BROKER_ROLE}`,
  ...[BROKER_NS, TASK_NS, 'app-a', 'app-b', 'app-c'].flatMap((ns) => [`Role ${ns}/${BROKER_ROLE}`, `RoleBinding ${ns}/${BROKER_ROLE}`]),
].sort();

const BROKER_NS_RULES = [
  { apiGroups: [''], resources: ['secrets'], verbs: ['create'] },
  { apiGroups: [''], resources: ['secrets'], resourceNames: [KEY_SECRET], verbs: ['get', 'update'] },
  { apiGroups: [''], resources: ['configmaps'], verbs: ['create', 'delete', 'get', 'list', 'watch', 'update'] },
  { apiGroups: ['coordination.k8s.io'], resources: ['leases'], verbs: ['get', 'create', 'update'] },
];
const TASK_NS_RULES = [
  { apiGroups: [''], resources: ['serviceaccounts'], verbs: ['create', 'delete', 'get', 'list', 'watch'] },
  { apiGroups: [''], resources: ['serviceaccounts/token'], verbs: ['create'] },
  { apiGroups: [''], resources: ['secrets'], verbs: ['create', 'delete', 'get', 'list', 'watch', 'patch'] },
];
function targetRules(clusterRoles: string[]) {
  return [
    { apiGroups: ['rbac.authorization.k8s.io'], resources: ['rolebindings'], verbs: ['create', 'delete', 'get', 'list', 'watch'] },
    { apiGroups: ['rbac.authorization.k8s.io'], resources: ['clusterroles'], resourceNames: clusterRoles, verbs: ['bind'] },
  ];
}
function clusterRules(clusterRoles: string[]) {
  return [
    { apiGroups: ['authentication.k8s.io'], resources: ['tokenreviews'], verbs: ['create'] },
    ...(clusterRoles.length ? [{ apiGroups: ['rbac.authorization.k8s.io'], resources: ['clusterroles'], resourceNames: clusterRoles, verbs: ['get'] }] : []),
  ];
}

/** A rule as plain JSON without the keys the API server omits when empty. */
function plainRules(rules: k8s.V1PolicyRule[] | undefined) {
  return (rules ?? []).map((r) => JSON.parse(JSON.stringify(r)) as Record<string, unknown>);
}

/** Every managed object, as `Kind ns/name` keys with their resourceVersions, and the broker namespaces' existence. */
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
  add('ServiceAccount', await kube.core.listServiceAccountForAllNamespaces({ labelSelector }));
  add('Namespace', await kube.core.listNamespace({}));
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

/** KubeApis (and a kubeconfig file) acting as `namespace/name`, with a fresh TokenRequest token. */
async function actingAs(namespace: string, name: string, file: string): Promise<{ kube: KubeApis; kubeconfig: string; token: string }> {
  const tr = await kube.core.createNamespacedServiceAccountToken({ name, namespace, body: { spec: { audiences: [], expirationSeconds: 3600 } } });
  const token = tr.status?.token;
  assert.ok(token, `a token for ${namespace}/${name}`);
  const kubeconfig = writeTokenKubeconfig(join(scratch, file), cluster, token);
  const kc = new k8s.KubeConfig();
  kc.loadFromFile(kubeconfig);
  return { kube: kubeApis(kc), kubeconfig, token };
}

// bin/broker runs the compiled dist/, which may lag behind the sources while they are edited: the
// command-line tests run the sources (the same code bin/broker runs once built).
const root = new URL('../../', import.meta.url).pathname;
const cli = (...args: string[]) => run(process.execPath, [join(root, 'src/cli/main.ts'), ...args]);

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
    // Every binding names the broker's ServiceAccount in its own namespace.
    if (o.kind === 'RoleBinding' || o.kind === 'ClusterRoleBinding') assert.deepEqual(o.subjects, [{ kind: 'ServiceAccount', name: SA, namespace: BROKER_NS }]);
  }
  // Without clusterRole templates the ClusterRole has no `get` rule (an empty resourceNames would mean every name).
  const noViewer = desiredObjects(policyOf([READ_PODS])).find((o) => o.kind === 'ClusterRole' && o.name === BROKER_ROLE);
  assert.deepEqual(noViewer?.kind === 'ClusterRole' ? noViewer.rules : null, clusterRules([]));
});

test('desiredObjects refuses a policy, built by hand, whose template allows a broker namespace or whose namespaces are one', () => {
  const base = policyOf(BASE);
  for (const [ns, why] of [
    [TASK_NS, /the broker's task namespace .* extend itself/],
    [BROKER_NS, /the broker's own namespace .* forge approvals/],
  ] as const) {
    const bad: Policy = { ...base, templates: [base.templates[0]!, { ...base.templates[1]!, namespaces: ['app-b', ns] }] };
    assert.throws(() => desiredObjects(bad), (err: Error & { code?: string; field?: string }) => {
      assert.equal(err.code, 'invalid_argument');
      assert.equal(err.field, 'templates[1].namespaces[1]');
      assert.match(err.message, why);
      return true;
    });
  }
  const same: Policy = { ...base, broker: { ...base.broker, namespace: TASK_NS } };
  assert.throws(() => desiredObjects(same), /"broker\.namespace" and "broker\.taskNamespace" must differ/);
});

describe('policy apply', () => {
  test('the first apply creates exactly the expected objects, with the broker roles as specified', async () => {
    const { changes, clusterRoles } = await applyPolicy(kube, policyOf(BASE), {});
    assert.deepEqual(keysOf(changes), EXPECTED_BASE);
    assert.ok(changes.every((c) => c.action === 'create'), JSON.stringify(changes));
    // The viewer template's ClusterRole (`view`) was read and grants nothing gated.
    assert.deepEqual(clusterRoles.map((g) => [g.template, g.clusterRole, g.hits]), [['viewer', 'view', []]]);

    for (const name of [BROKER_NS, TASK_NS]) {
      const ns = await kube.core.readNamespace({ name });
      assert.equal(ns.metadata?.labels?.['app.kubernetes.io/managed-by'], 'task-broker');
    }
    await kube.core.readNamespacedServiceAccount({ name: SA, namespace: BROKER_NS });
    assert.equal((await status(kube.core.readNamespacedServiceAccount({ name: SA, namespace: TASK_NS }))).code, 404, 'no broker ServiceAccount in the task namespace');

    const ownRole = await kube.rbac.readNamespacedRole({ name: BROKER_ROLE, namespace: BROKER_NS });
    assert.deepEqual(plainRules(ownRole.rules), BROKER_NS_RULES);
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
    }
    for (const namespace of [BROKER_NS, TASK_NS, ...Object.keys(expectedBind)]) {
      const rb = await kube.rbac.readNamespacedRoleBinding({ name: BROKER_ROLE, namespace });
      assert.deepEqual({ ...rb.roleRef }, { apiGroup: 'rbac.authorization.k8s.io', kind: 'Role', name: BROKER_ROLE });
      assert.deepEqual(rb.subjects?.map((s) => [s.kind, s.namespace, s.name]), [['ServiceAccount', BROKER_NS, SA]], namespace);
    }
    const cr = await kube.rbac.readClusterRole({ name: BROKER_ROLE });
    assert.deepEqual(plainRules(cr.rules), clusterRules(['view']));
    const crb = await kube.rbac.readClusterRoleBinding({ name: BROKER_ROLE });
    assert.deepEqual({ ...crb.roleRef }, { apiGroup: 'rbac.authorization.k8s.io', kind: 'ClusterRole', name: BROKER_ROLE });
    assert.deepEqual(crb.subjects?.map((s) => [s.kind, s.namespace, s.name]), [['ServiceAccount', BROKER_NS, SA]]);

    const tpl = await kube.rbac.readClusterRole({ name: 'task-broker:template:read-pods' });
    assert.deepEqual(plainRules(tpl.rules), READ_PODS.rules);
    // A clusterRole template creates no ClusterRole of its own.
    assert.equal((await status(kube.rbac.readClusterRole({ name: 'task-broker:template:viewer' }))).code, 404);
  });

  test('a second apply changes nothing', async () => {
    const before = await clusterSnapshot(kube);
    const { changes } = await applyPolicy(kube, policyOf(BASE), {});
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
    const { changes } = await applyPolicy(kube, policyOf(changed), { dryRun: true });
    assert.deepEqual(keysOf(changes, 'create'), ['ClusterRole task-broker:template:logs']);
    assert.deepEqual(keysOf(changes, 'update'), [
      `ClusterRole ${BROKER_ROLE}`, // no clusterRole template left: no `get` on view
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
    const { changes } = await applyPolicy(kube, policyOf([{ ...READ_PODS, rules }, DEPLOYER, VIEWER]), {});
    assert.deepEqual(keysOf(changes, 'update'), ['ClusterRole task-broker:template:read-pods']);
    assert.equal(changes.filter((c) => c.action !== 'unchanged').length, 1);
    const tpl = await kube.rbac.readClusterRole({ name: 'task-broker:template:read-pods' });
    assert.deepEqual(plainRules(tpl.rules), rules);
    assert.equal(tpl.metadata?.labels?.['task-broker.dev/component'], 'policy');
  });

  test('removing a template deletes its ClusterRole and takes it out of the broker\'s bind list', async () => {
    const { changes } = await applyPolicy(kube, policyOf([READ_PODS, VIEWER]), {});
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
    // The broker's namespaces are never deleted.
    await kube.core.readNamespace({ name: TASK_NS });
    await kube.core.readNamespace({ name: BROKER_NS });
  });

  test('a missing template namespace fails before anything is written, naming the field', async () => {
    const before = await clusterSnapshot(kube);
    const templates: TemplateSpec[] = [
      READ_PODS,
      { name: 'ghost', namespaces: ['app-a', 'no-such-ns'], rules: [{ apiGroups: [''], resources: ['configmaps'], verbs: ['get'] }] },
    ];
    await assert.rejects(applyPolicy(kube, policyOf(templates, { taskNamespace: 'tb-other', namespace: 'tb-other-system' }), {}), (err: Error & { code?: string; field?: string }) => {
      assert.equal(err.code, 'precondition_failed');
      assert.equal(err.field, 'templates[1].namespaces');
      assert.match(err.message, /namespace "no-such-ns" \(allowed by template "ghost"\) does not exist/);
      return true;
    });
    assert.equal((await status(kube.core.readNamespace({ name: 'tb-other' }))).code, 404, 'the task namespace was not created');
    assert.equal((await status(kube.core.readNamespace({ name: 'tb-other-system' }))).code, 404, "the broker's namespace was not created");
    assert.equal((await status(kube.rbac.readClusterRole({ name: 'task-broker:template:ghost' }))).code, 404);
    assert.deepEqual(await clusterSnapshot(kube), before);
  });

  test('a template that allows the task namespace (or the broker\'s) is refused, and nothing changes', async () => {
    await applyPolicy(kube, policyOf(BASE), {});
    const before = await clusterSnapshot(kube);
    const base = policyOf(BASE);
    // parsePolicy refuses such a file; a Policy built by hand reaches applyPolicy, which refuses it too.
    for (const [ns, why] of [
      [TASK_NS, /namespace "tb-tasks" is the broker's task namespace \("broker\.taskNamespace"\), which no template may allow: .*extend itself/],
      [BROKER_NS, /namespace "tb-system" is the broker's own namespace \("broker\.namespace"\), which no template may allow: a task there could forge approvals/],
    ] as const) {
      const bad: Policy = { ...base, templates: [{ ...base.templates[0]!, namespaces: [ns] }, ...base.templates.slice(1)] };
      await assert.rejects(applyPolicy(kube, bad, {}), (err: Error & { code?: string; field?: string }) => {
        assert.equal(err.code, 'invalid_argument');
        assert.equal(err.field, 'templates[0].namespaces[0]');
        assert.match(err.message, why);
        return true;
      });
      await assert.rejects(applyPolicy(kube, bad, { dryRun: true }), /which no template may allow/);
    }
    // And on the command line: the file is refused as invalid, with its line.
    const file = join(scratch, 'own-namespace.yaml');
    writeFileSync(file, policyYaml([{ ...READ_PODS, namespaces: ['app-a', TASK_NS] }]));
    const res = await cli('policy', 'apply', file, '--kubeconfig', cluster.kubeconfig);
    assert.equal(res.code, EXIT.error, res.stderr);
    assert.match(res.stderr, /templates\[0\]\.namespaces\[1\]: template "read-pods": namespace "tb-tasks" is the broker's task namespace/);
    assert.match(res.stderr, /\[policy_invalid\]/);
    assert.deepEqual(await clusterSnapshot(kube), before, 'nothing changed');
  });
});

describe('clusterRole templates are checked against the gated set', () => {
  const DEBUGGER = 'debugger';
  const DEBUG: TemplateSpec = { name: 'debug', namespaces: ['app-a'], clusterRole: DEBUGGER };

  before(async () => {
    await applyPolicy(kube, policyOf(BASE), {});
    await kube.rbac.createClusterRole({
      body: {
        metadata: { name: DEBUGGER },
        rules: [
          { apiGroups: [''], resources: ['pods'], verbs: ['get', 'list'] },
          { apiGroups: [''], resources: ['pods/exec'], verbs: ['create'] },
        ],
      },
    });
  });
  after(async () => {
    await applyPolicy(kube, policyOf(BASE), {});
  });

  test('a ClusterRole that grants pods/exec makes its template gated: apply reports it, and the broker may read it', async () => {
    const { changes, clusterRoles } = await applyPolicy(kube, policyOf([...BASE, DEBUG], { approvers: true }), {});
    assert.deepEqual(
      clusterRoles.map((g) => [g.template, g.clusterRole, g.hits.map((h) => `${h.verb} ${h.resource}`)]),
      [
        ['viewer', 'view', []],
        ['debug', DEBUGGER, ['create pods/exec']],
      ],
    );
    assert.deepEqual(keysOf(changes, 'update'), [`ClusterRole ${BROKER_ROLE}`, `Role app-a/${BROKER_ROLE}`]);
    const cr = await kube.rbac.readClusterRole({ name: BROKER_ROLE });
    assert.deepEqual(plainRules(cr.rules), clusterRules([DEBUGGER, 'view']));
  });

  test('the broker, with its own token, reads exactly those ClusterRoles and finds the same (as it does at every task start)', async () => {
    const policy = policyOf([...BASE, DEBUG], { approvers: true });
    const broker = await actingAs(BROKER_NS, SA, 'broker-gates.kubeconfig');
    const gates = await clusterRoleGatedHits(broker.kube, policy);
    assert.deepEqual(gates.map((g) => [g.template, g.hits.map((h) => `${h.verb} ${h.resource}`)]), [['viewer', []], ['debug', ['create pods/exec']]]);
    assert.equal((await status(broker.kube.rbac.readClusterRole({ name: 'cluster-admin' }))).code, 403);
    assert.equal((await status(broker.kube.rbac.listClusterRole({}))).code, 403);
  });

  test('on the command line: a gated clusterRole template is reported, in text and in -o json', async () => {
    const file = join(scratch, 'debug.yaml');
    writeFileSync(file, policyYaml([...BASE, DEBUG], { approvers: true }));
    const text = await cli('policy', 'apply', file, '--kubeconfig', cluster.kubeconfig, '--dry-run');
    assert.equal(text.code, EXIT.ok, text.stderr);
    assert.match(text.stdout, /^gated: template debug binds ClusterRole debugger, which grants gated access \(create pods\/exec\): starts need 1 approval\(s\) from sre$/m);
    assert.match(text.stdout, /^checked: template viewer binds ClusterRole view, which grants no gated access/m);
    const json = await cli('policy', 'apply', file, '--kubeconfig', cluster.kubeconfig, '--dry-run', '-o', 'json');
    assert.equal(json.code, EXIT.ok, json.stderr);
    const out = JSON.parse(json.stdout) as { clusterRoles: Array<{ template: string; hits: string[]; approvers: string[]; required: number }> };
    assert.deepEqual(
      out.clusterRoles.find((c) => c.template === 'debug'),
      { template: 'debug', clusterRole: DEBUGGER, hits: ['create pods/exec'], aggregated: false, approvers: ['sre'], required: 1 },
    );
  });

  test('a ClusterRole that grants serviceaccounts/token create is reported at apply, with the reason: it can mint tokens that outlive the task', async () => {
    await kube.rbac.createClusterRole({
      body: { metadata: { name: 'token-minter' }, rules: [{ apiGroups: [''], resources: ['serviceaccounts/token'], verbs: ['create'] }] },
    });
    const minter: TemplateSpec = { name: 'minter', namespaces: ['app-a'], clusterRole: 'token-minter' };
    const { clusterRoles } = await applyPolicy(kube, policyOf([...BASE, minter], { approvers: true }), { dryRun: true });
    assert.deepEqual(clusterRoles.find((g) => g.template === 'minter')?.hits, [{ verb: 'create', resource: 'serviceaccounts/token', apiGroup: '' }]);
    const file = join(scratch, 'minter.yaml');
    writeFileSync(file, policyYaml([...BASE, minter], { approvers: true }));
    const text = await cli('policy', 'apply', file, '--kubeconfig', cluster.kubeconfig, '--dry-run');
    assert.equal(text.code, EXIT.ok, text.stderr);
    assert.match(
      text.stdout,
      /^gated: template minter binds ClusterRole token-minter, which grants gated access \(create serviceaccounts\/token\): starts need 1 approval\(s\) from sre\n  create serviceaccounts\/token: can mint tokens that outlive the task$/m,
    );
    const json = await cli('policy', 'apply', file, '--kubeconfig', cluster.kubeconfig, '--dry-run', '-o', 'json');
    assert.equal(json.code, EXIT.ok, json.stderr);
    const out = JSON.parse(json.stdout) as { clusterRoles: Array<{ template: string; hits: string[] }>; reasons: Record<string, string> };
    assert.deepEqual(out.clusterRoles.find((c) => c.template === 'minter')?.hits, ['create serviceaccounts/token']);
    assert.equal(out.reasons['create serviceaccounts/token'], 'can mint tokens that outlive the task');
    // Without approvers it cannot be applied at all.
    await assert.rejects(applyPolicy(kube, policyOf([...BASE, minter]), { dryRun: true }), /binds ClusterRole "token-minter", which grants gated access \(create serviceaccounts\/token\), but no approver groups/);
    await kube.rbac.deleteClusterRole({ name: 'token-minter' });
  });

  test('an aggregated ClusterRole (edit) is checked with the rules it aggregates', async () => {
    const { clusterRoles } = await applyPolicy(kube, policyOf([...BASE, { name: 'editor', namespaces: ['app-b'], clusterRole: 'edit' }], { approvers: true }), { dryRun: true });
    const edit = clusterRoles.find((g) => g.template === 'editor')!;
    assert.equal(edit.aggregated, true);
    const hits = edit.hits.map((h) => `${h.verb} ${h.resource}`);
    for (const h of ['create pods/exec', 'get secrets']) assert.ok(hits.includes(h), `${h} in ${hits.join(', ')}`);
  });

  test('a gated clusterRole template without approvers fails apply, naming it, and nothing changes', async () => {
    await applyPolicy(kube, policyOf(BASE), {});
    const before = await clusterSnapshot(kube);
    await assert.rejects(applyPolicy(kube, policyOf([...BASE, DEBUG]), {}), (err: Error & { code?: string; field?: string }) => {
      assert.equal(err.code, 'invalid_argument');
      assert.equal(err.field, 'templates[3].clusterRole');
      assert.match(err.message, /^template "debug" binds ClusterRole "debugger", which grants gated access \(create pods\/exec\), but no approver groups can approve its tasks/);
      return true;
    });
    const file = join(scratch, 'debug-unapproved.yaml');
    writeFileSync(file, policyYaml([...BASE, DEBUG]));
    const res = await cli('policy', 'apply', file, '--kubeconfig', cluster.kubeconfig);
    assert.equal(res.code, EXIT.usage, res.stderr);
    assert.match(res.stderr, /template "debug" binds ClusterRole "debugger", which grants gated access \(create pods\/exec\), but no approver groups/);
    assert.deepEqual(await clusterSnapshot(kube), before, 'nothing changed');
  });

  test('a clusterRole template naming a ClusterRole that does not exist fails apply, naming it, and nothing changes', async () => {
    const before = await clusterSnapshot(kube);
    const ghost: TemplateSpec = { name: 'ghost-role', namespaces: ['app-c'], clusterRole: 'no-such-role' };
    await assert.rejects(applyPolicy(kube, policyOf([...BASE, ghost], { approvers: true }), {}), (err: Error & { code?: string; field?: string }) => {
      assert.equal(err.code, 'precondition_failed');
      assert.equal(err.field, 'templates[3].clusterRole');
      assert.match(err.message, /ClusterRole "no-such-role" \(named by template "ghost-role"\) does not exist/);
      return true;
    });
    assert.deepEqual(await clusterSnapshot(kube), before, 'nothing changed');
  });
});

describe("the broker's own ServiceAccount is bounded by the policy", () => {
  let broker: KubeApis;
  let brokerKubeconfig: string;

  before(async () => {
    await applyPolicy(kube, policyOf(BASE), {});
    // Another ServiceAccount in the broker's namespace, and a Secret the broker has no business reading.
    await kube.core.createNamespacedServiceAccount({ namespace: BROKER_NS, body: { metadata: { name: 'other' } } });
    await kube.core.createNamespacedSecret({ namespace: BROKER_NS, body: { metadata: { name: 'unrelated' }, stringData: { a: 'b' } } });
    ({ kube: broker, kubeconfig: brokerKubeconfig } = await actingAs(BROKER_NS, SA, 'broker.kubeconfig'));
  });

  const taskBinding = (name: string, clusterRole: string): k8s.V1RoleBinding => ({
    metadata: { name },
    roleRef: { apiGroup: 'rbac.authorization.k8s.io', kind: 'ClusterRole', name: clusterRole },
    subjects: [{ kind: 'ServiceAccount', name: 'task-abc', namespace: TASK_NS }],
  });

  test('it can do its job in the task namespace: task ServiceAccounts, Secrets and their tokens; and TokenReview', async () => {
    await broker.core.createNamespacedServiceAccount({ namespace: TASK_NS, body: { metadata: { name: 'task-abc' } } });
    await broker.core.createNamespacedSecret({ namespace: TASK_NS, body: { metadata: { name: 'task-abc' }, stringData: { a: 'b' } } });
    await broker.core.listNamespacedSecret({ namespace: TASK_NS });
    await broker.core.patchNamespacedSecret(
      { name: 'task-abc', namespace: TASK_NS, body: [{ op: 'add', path: '/metadata/labels', value: { x: 'y' } }] },
      k8s.setHeaderOptions('Content-Type', k8s.PatchStrategy.JsonPatch),
    );
    const tr = await broker.core.createNamespacedServiceAccountToken({
      name: 'task-abc',
      namespace: TASK_NS,
      body: { spec: { audiences: [], expirationSeconds: 600 } },
    });
    const token = tr.status?.token;
    assert.ok(token);
    const review = await broker.authn.createTokenReview({ body: { spec: { token } } });
    assert.equal(review.status?.user?.username, `system:serviceaccount:${TASK_NS}:task-abc`);
  });

  test('it can do its job in its own namespace: the signing key Secret, approval ConfigMaps, the sweeper Lease', async () => {
    await broker.core.createNamespacedSecret({ namespace: BROKER_NS, body: { metadata: { name: KEY_SECRET }, type: 'Opaque', stringData: { 'keys.json': '{}' } } });
    const key = await broker.core.readNamespacedSecret({ name: KEY_SECRET, namespace: BROKER_NS });
    await broker.core.replaceNamespacedSecret({ name: KEY_SECRET, namespace: BROKER_NS, body: { ...key, stringData: { 'keys.json': '{"rotated":true}' } } });
    await broker.core.createNamespacedConfigMap({ namespace: BROKER_NS, body: { metadata: { name: 'approval-x' }, data: { a: 'b' } } });
    const cm = await broker.core.readNamespacedConfigMap({ name: 'approval-x', namespace: BROKER_NS });
    await broker.core.replaceNamespacedConfigMap({ name: 'approval-x', namespace: BROKER_NS, body: { ...cm, data: { a: 'c' } } });
    assert.ok((await broker.core.listNamespacedConfigMap({ namespace: BROKER_NS })).items.some((c) => c.metadata?.name === 'approval-x'));
    await broker.core.deleteNamespacedConfigMap({ name: 'approval-x', namespace: BROKER_NS });
    await broker.coordination.createNamespacedLease({ namespace: BROKER_NS, body: { metadata: { name: 'sweeper' }, spec: {} } });
    const lease = await broker.coordination.readNamespacedLease({ name: 'sweeper', namespace: BROKER_NS });
    await broker.coordination.replaceNamespacedLease({ name: 'sweeper', namespace: BROKER_NS, body: { ...lease, spec: { holderIdentity: 'me' } } });
    // It may read the ClusterRole of the viewer template (to gate it at start), and no other.
    await broker.rbac.readClusterRole({ name: 'view' });
    assert.equal((await status(broker.rbac.readClusterRole({ name: 'edit' }))).code, 403);
  });

  test('it cannot mint a token for itself: TokenRequest for its own ServiceAccount is refused with 403', async () => {
    const own = await status(
      broker.core.createNamespacedServiceAccountToken({ name: SA, namespace: BROKER_NS, body: { spec: { audiences: [], expirationSeconds: 720 * 3600 } } }),
    );
    assert.equal(own.code, 403, own.body);
    assert.match(own.body, new RegExp(`User \\\\?"${BROKER_USER}\\\\?" cannot create resource \\\\?"serviceaccounts/token\\\\?"`));
    // Nor for any other account in its namespace, nor can it make one there.
    const other = await status(
      broker.core.createNamespacedServiceAccountToken({ name: 'other', namespace: BROKER_NS, body: { spec: { audiences: [], expirationSeconds: 3600 } } }),
    );
    assert.equal(other.code, 403, other.body);
    const newSa = await status(broker.core.createNamespacedServiceAccount({ namespace: BROKER_NS, body: { metadata: { name: 'mine' } } }));
    assert.equal(newSa.code, 403, newSa.body);
    // The reproduction of the review: `kubectl create token task-broker --duration 720h` with the broker's own kubeconfig.
    const res = await kubectl(brokerKubeconfig, 'create', 'token', SA, '-n', BROKER_NS, '--duration', '720h');
    assert.notEqual(res.code, 0, res.stdout);
    assert.match(res.stderr, /forbidden/i);
    assert.equal(res.stdout, '');
  });

  test('it cannot get a token for itself through a service-account-token Secret either: it can read no Secret in its namespace but the key', async () => {
    // Creating the Secret is allowed (create cannot be limited by name); the token controller would fill
    // it in, but the broker cannot read it back, nor list or watch Secrets there.
    const created = await status(
      broker.core.createNamespacedSecret({
        namespace: BROKER_NS,
        body: { metadata: { name: 'self-token', annotations: { 'kubernetes.io/service-account.name': SA } }, type: 'kubernetes.io/service-account-token' },
      }),
    );
    assert.equal(created.code, 200, created.body);
    assert.equal((await status(broker.core.readNamespacedSecret({ name: 'self-token', namespace: BROKER_NS }))).code, 403);
    assert.equal((await status(broker.core.readNamespacedSecret({ name: 'unrelated', namespace: BROKER_NS }))).code, 403);
    assert.equal((await status(broker.core.listNamespacedSecret({ namespace: BROKER_NS }))).code, 403);
    assert.equal((await status(broker.core.listNamespacedSecret({ namespace: BROKER_NS, watch: true, timeoutSeconds: 1 }))).code, 403);
    await kube.core.deleteNamespacedSecret({ name: 'self-token', namespace: BROKER_NS });
  });

  test('it cannot read or write ConfigMaps, nor Leases, in the task namespace', async () => {
    await kube.core.createNamespacedConfigMap({ namespace: TASK_NS, body: { metadata: { name: 'approval-forged' }, data: { a: 'b' } } });
    assert.equal((await status(broker.core.listNamespacedConfigMap({ namespace: TASK_NS }))).code, 403);
    assert.equal((await status(broker.core.readNamespacedConfigMap({ name: 'approval-forged', namespace: TASK_NS }))).code, 403);
    assert.equal((await status(broker.core.createNamespacedConfigMap({ namespace: TASK_NS, body: { metadata: { name: 'x' } } }))).code, 403);
    assert.equal((await status(broker.core.deleteNamespacedConfigMap({ name: 'approval-forged', namespace: TASK_NS }))).code, 403);
    assert.equal((await status(broker.coordination.createNamespacedLease({ namespace: TASK_NS, body: { metadata: { name: 'sweeper' }, spec: {} } }))).code, 403);
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

describe('objects of an earlier layout are removed or rewritten', () => {
  test('the broker ServiceAccount in the task namespace, with ConfigMap and Lease rules there, is replaced by the new layout', async () => {
    await applyPolicy(kube, policyOf(BASE), {});
    // What an earlier `policy apply` made: the broker's ServiceAccount in the task namespace, its Role
    // there with ConfigMaps and Leases, and every binding to that account.
    const labels = { ...POLICY_LABELS };
    const oldSubject = [{ kind: 'ServiceAccount', name: SA, namespace: TASK_NS }];
    await kube.core.createNamespacedServiceAccount({ namespace: TASK_NS, body: { metadata: { name: SA, labels } } });
    const role = await kube.rbac.readNamespacedRole({ name: BROKER_ROLE, namespace: TASK_NS });
    await kube.rbac.replaceNamespacedRole({
      name: BROKER_ROLE,
      namespace: TASK_NS,
      body: {
        ...role,
        rules: [
          ...TASK_NS_RULES,
          { apiGroups: [''], resources: ['configmaps'], verbs: ['create', 'delete', 'get', 'list', 'watch', 'update'] },
          { apiGroups: ['coordination.k8s.io'], resources: ['leases'], verbs: ['get', 'create', 'update'] },
        ],
      },
    });
    for (const namespace of [TASK_NS, 'app-a']) {
      const rb = await kube.rbac.readNamespacedRoleBinding({ name: BROKER_ROLE, namespace });
      await kube.rbac.replaceNamespacedRoleBinding({ name: BROKER_ROLE, namespace, body: { ...rb, subjects: oldSubject } });
    }
    const crb = await kube.rbac.readClusterRoleBinding({ name: BROKER_ROLE });
    await kube.rbac.replaceClusterRoleBinding({ name: BROKER_ROLE, body: { ...crb, subjects: oldSubject } });
    const old = await actingAs(TASK_NS, SA, 'old-broker.kubeconfig');
    await old.kube.core.listNamespacedConfigMap({ namespace: TASK_NS }); // the old layout at work
    // The old account in the task namespace can mint a token for itself: what issue 8 (7) reported.
    await old.kube.core.createNamespacedServiceAccountToken({ name: SA, namespace: TASK_NS, body: { spec: { audiences: [], expirationSeconds: 3600 } } });

    const { changes } = await applyPolicy(kube, policyOf(BASE), {});
    assert.deepEqual(keysOf(changes, 'delete'), [`ServiceAccount ${TASK_NS}/${SA}`]);
    assert.deepEqual(keysOf(changes, 'update'), [`ClusterRoleBinding ${BROKER_ROLE}`, `Role ${TASK_NS}/${BROKER_ROLE}`, `RoleBinding app-a/${BROKER_ROLE}`, `RoleBinding ${TASK_NS}/${BROKER_ROLE}`]);
    assert.equal((await status(kube.core.readNamespacedServiceAccount({ name: SA, namespace: TASK_NS }))).code, 404);
    assert.deepEqual(plainRules((await kube.rbac.readNamespacedRole({ name: BROKER_ROLE, namespace: TASK_NS })).rules), TASK_NS_RULES);
    // The old account's tokens stop working once its ServiceAccount is gone (the API server caches
    // token authentication for up to 10 s).
    let code = 0;
    for (let i = 0; i < 40 && code !== 401; i++) {
      code = (await status(old.kube.core.listNamespacedConfigMap({ namespace: TASK_NS }))).code;
      if (code !== 401) await sleep(500);
    }
    assert.equal(code, 401, 'the old broker token is refused');
    assert.deepEqual(keysOf((await applyPolicy(kube, policyOf(BASE), {})).changes, 'unchanged'), EXPECTED_BASE);
  });

  test("moving broker.namespace moves the broker's ServiceAccount and Role, and deletes the old ones (not the namespace)", async () => {
    const moved = 'tb-system-2';
    const { changes } = await applyPolicy(kube, policyOf(BASE, { namespace: moved }), {});
    assert.deepEqual(keysOf(changes, 'create'), [`Namespace ${moved}`, `Role ${moved}/${BROKER_ROLE}`, `RoleBinding ${moved}/${BROKER_ROLE}`, `ServiceAccount ${moved}/${SA}`]);
    assert.deepEqual(keysOf(changes, 'delete'), [`Role ${BROKER_NS}/${BROKER_ROLE}`, `RoleBinding ${BROKER_NS}/${BROKER_ROLE}`, `ServiceAccount ${BROKER_NS}/${SA}`]);
    // Bindings, then roles, then the ServiceAccount.
    assert.deepEqual(changes.filter((c) => c.action === 'delete').map((c) => c.kind), ['RoleBinding', 'Role', 'ServiceAccount']);
    const crb = await kube.rbac.readClusterRoleBinding({ name: BROKER_ROLE });
    assert.deepEqual(crb.subjects?.map((s) => [s.kind, s.namespace, s.name]), [['ServiceAccount', moved, SA]]);
    await kube.core.readNamespace({ name: BROKER_NS });
    // And back, for the tests that follow.
    await applyPolicy(kube, policyOf(BASE), {});
    await kube.core.readNamespacedServiceAccount({ name: SA, namespace: BROKER_NS });
    assert.equal((await status(kube.core.readNamespacedServiceAccount({ name: SA, namespace: moved }))).code, 404);
  });
});

describe('broker policy apply (the command line)', () => {
  before(async () => {
    await applyPolicy(kube, policyOf(BASE), {});
  });

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
    assert.match(res.stdout, /^2 changes, 16 unchanged$/m);
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

  test('a kubeconfig is required (--kubeconfig or $KUBECONFIG); a missing template namespace exits with the usage code and names the field', async () => {
    const file = join(scratch, 'bad.yaml');
    writeFileSync(file, policyYaml([{ name: 'ghost', namespaces: ['nowhere'], rules: [{ apiGroups: [''], resources: ['pods'], verbs: ['get'] }] }]));
    const noKube = await run(process.execPath, [join(root, 'src/cli/main.ts'), 'policy', 'apply', file], { ...process.env, KUBECONFIG: '' });
    assert.equal(noKube.code, EXIT.usage);
    assert.match(noKube.stderr, /policy apply needs an administrator's kubeconfig: pass --kubeconfig PATH or set KUBECONFIG/);

    const res = await cli('policy', 'apply', file, '--kubeconfig', cluster.kubeconfig);
    assert.equal(res.code, EXIT.error, res.stderr);
    assert.match(res.stderr, /namespace "nowhere" \(allowed by template "ghost"\) does not exist: create it first \(kubectl create namespace nowhere\) \(templates\[0\]\.namespaces\) \[precondition_failed\]/);

    const help = await cli('policy', 'apply', '--help');
    assert.equal(help.code, EXIT.ok);
    assert.match(help.stdout, /Example:\n/);
  });
});

describe('issue 11: templates that can leave access behind, and policy changes under running tasks', () => {
  const TRIAL_NS = 'web';
  // Namespaces of their own: the ones above hold what earlier tests left there (a signing key Secret they wrote, ...).
  const TRIAL_BROKER_NS = 'tb-trial';
  const TRIAL_TASK_NS = 'tb-trial-tasks';
  const MAIN = join(root, 'src/cli/main.ts');
  let broker: BrokerProcess;
  let agent: string;
  let trialFile: string;

  /** The trial's policy: `web-admin` can create accounts, tokens and bindings in `web`; `read-pods` only reads. */
  const trialPolicy = (templates: Array<'web-admin' | 'read-pods'>, readPodsNamespaces = [TRIAL_NS]) =>
    JSON.stringify({
      apiVersion: 'task-broker/v1alpha1',
      kind: 'Policy',
      broker: { namespace: TRIAL_BROKER_NS, taskNamespace: TRIAL_TASK_NS, serviceAccount: SA },
      agents: [{ name: 'bot', identities: [{ serviceAccount: 'agents/bot' }] }],
      people: [{ name: 'alice', identities: [{ oidc: { issuer: 'https://idp.example.com', subject: 'alice' } }] }],
      approvers: [{ name: 'sre', members: [{ person: 'alice' }] }],
      templates: [
        ...(templates.includes('web-admin')
          ? [
              {
                name: 'web-admin',
                namespaces: [TRIAL_NS],
                rules: [
                  { apiGroups: [''], resources: ['serviceaccounts', 'serviceaccounts/token'], verbs: ['create'] },
                  { apiGroups: ['rbac.authorization.k8s.io'], resources: ['rolebindings'], verbs: ['create'] },
                ],
                ttl: { default: '10m', max: '1h' },
                agents: ['bot'],
              },
            ]
          : []),
        ...(templates.includes('read-pods')
          ? [{ name: 'read-pods', namespaces: readPodsNamespaces, rules: [{ apiGroups: [''], resources: ['pods'], verbs: ['get', 'list'] }], ttl: { default: '10m', max: '1h' }, agents: ['bot'] }]
          : []),
      ],
    });

  before(async () => {
    for (const name of [TRIAL_NS, 'agents']) await kube.core.createNamespace({ body: { metadata: { name } } });
    await kube.core.createNamespacedServiceAccount({ namespace: 'agents', body: { metadata: { name: 'bot' } } });
    trialFile = join(scratch, 'trial.yaml');
    writeFileSync(trialFile, trialPolicy(['web-admin', 'read-pods']));
    await applyPolicy(kube, parsePolicy(readFileSync(trialFile, 'utf8'), trialFile), {});
    const { kubeconfig } = await actingAs(TRIAL_BROKER_NS, SA, 'trial-broker.kubeconfig');
    const auditLog = join(scratch, 'trial-broker-audit.jsonl');
    broker = await BrokerProcess.spawn(
      [MAIN, 'serve', '--config', trialFile, '--audit-log', auditLog, '--kubeconfig', kubeconfig, '--listen', '127.0.0.1:0', '--insecure-http', '--sweep-interval', '1s'],
      auditLog,
    );
    agent = await mintToken(kube, 'agents', 'bot', ['task-broker'], 3600);
  });
  after(async () => {
    await broker?.stop();
  });

  test('the trial: a template that can create accounts, tokens and bindings in web is reported by policy check, and a start needs approval', async () => {
    const check = await cli('policy', 'check', trialFile);
    assert.equal(check.code, EXIT.ok, check.stderr);
    assert.match(
      check.stdout,
      /^ {2}gated: web-admin \(create serviceaccounts\/token, create serviceaccounts, create rbac\.authorization\.k8s\.io\/rolebindings\): needs 1 approval\(s\) from sre$/m,
    );
    assert.match(check.stdout, /^ {4}create serviceaccounts\/token: can mint tokens that outlive the task$/m);
    assert.match(check.stdout, /^ {4}create serviceaccounts: can create a ServiceAccount that outlives the task$/m);
    assert.match(check.stdout, /^ {4}create rbac\.authorization\.k8s\.io\/rolebindings: can bind roles to any account$/m);
    assert.doesNotMatch(check.stdout, /gated: read-pods/);

    const start = await broker.request('POST', '/v1/tasks', agent, { template: 'web-admin', namespace: TRIAL_NS });
    assert.equal(start.status, 403, JSON.stringify(start.body));
    assert.equal(start.body.error.code, 'approval_required');
    assert.match(String(start.body.error.requestId), /^ar-/);
    const rbs = await kube.rbac.listNamespacedRoleBinding({ namespace: TRIAL_NS, labelSelector: 'task-broker.dev/task-id' });
    assert.deepEqual(rbs.items, [], 'no RoleBinding without an approval');
  });

  test('policy apply that removes the template of an active task: refused, naming it, and nothing changes; with --end-affected-tasks the task is ended, recorded, and the apply done', async () => {
    const started = await broker.request('POST', '/v1/tasks', agent, { template: 'read-pods', namespace: TRIAL_NS, name: 'look' });
    assert.equal(started.status, 201, JSON.stringify(started.body));
    const id = started.body.id as string;
    const objects = async () => ({
      roleBinding: (await status(kube.rbac.readNamespacedRoleBinding({ name: `task-broker-${id}`, namespace: TRIAL_NS }))).code,
      serviceAccount: (await status(kube.core.readNamespacedServiceAccount({ name: `task-${id}`, namespace: TRIAL_TASK_NS }))).code,
      secrets: (await kube.core.listNamespacedSecret({ namespace: TRIAL_TASK_NS, labelSelector: `task-broker.dev/task-id=${id}` })).items.length,
    });
    assert.deepEqual(await objects(), { roleBinding: 200, serviceAccount: 200, secrets: 1 });

    // Removing a namespace from the template affects it too.
    const narrowed = parsePolicy(trialPolicy(['web-admin', 'read-pods'], ['app-a']), 'narrowed.yaml');
    assert.deepEqual(
      (await affectedTasks(kube, narrowed)).map((t) => [t.id, t.agent, t.name, t.template, t.namespace, t.cause]),
      [[id, 'bot', 'look', 'read-pods', TRIAL_NS, 'namespace-removed']],
    );
    assert.deepEqual(await affectedTasks(kube, parsePolicy(readFileSync(trialFile, 'utf8'))), [], 'the policy in force affects nothing');

    const removed = join(scratch, 'trial-removed.yaml');
    writeFileSync(removed, trialPolicy(['web-admin']));
    const before = await clusterSnapshot(kube);
    const refused = await cli('policy', 'apply', removed, '--kubeconfig', cluster.kubeconfig);
    assert.equal(refused.code, EXIT.error, refused.stderr);
    assert.match(refused.stderr, new RegExp(`task ${id} \\(agent bot, name look, template read-pods, namespace web: template removed\\)`));
    assert.match(refused.stderr, /wait for it to end, or pass --end-affected-tasks/);
    const dryRefused = await cli('policy', 'apply', removed, '--kubeconfig', cluster.kubeconfig, '--dry-run');
    assert.equal(dryRefused.code, EXIT.error, 'a dry run refuses as the apply would');
    const dry = await cli('policy', 'apply', removed, '--kubeconfig', cluster.kubeconfig, '--dry-run', '--end-affected-tasks');
    assert.equal(dry.code, EXIT.ok, dry.stderr);
    assert.match(dry.stdout, new RegExp(`^would end task ${id} \\(agent bot, name look, template read-pods, namespace web: template removed\\)$`, 'm'));
    assert.match(dry.stdout, /^would delete ClusterRole task-broker:template:read-pods$/m);
    assert.deepEqual(await clusterSnapshot(kube), before, 'nothing changed');
    assert.deepEqual(await objects(), { roleBinding: 200, serviceAccount: 200, secrets: 1 }, 'the task still stands');

    const auditLog = join(scratch, 'trial-apply-audit.jsonl');
    const done = await cli('policy', 'apply', removed, '--kubeconfig', cluster.kubeconfig, '--end-affected-tasks', '--audit-log', auditLog);
    assert.equal(done.code, EXIT.ok, done.stderr);
    assert.match(done.stdout, new RegExp(`^ended task ${id} \\(agent bot, name look, template read-pods, namespace web: template removed\\)$`, 'm'));
    assert.match(done.stdout, /^deleted ClusterRole task-broker:template:read-pods$/m);
    assert.deepEqual(await objects(), { roleBinding: 404, serviceAccount: 404, secrets: 0 }, 'RoleBinding, Secret and ServiceAccount are gone');
    assert.equal((await status(kube.rbac.readClusterRole({ name: 'task-broker:template:read-pods' }))).code, 404);
    const records = readFileSync(auditLog, 'utf8').trim().split('\n').map((l) => JSON.parse(l) as Record<string, any>);
    assert.deepEqual(
      records.map((r) => r['type']),
      ['task.ended', 'policy.applied'],
      'the end is recorded before the apply',
    );
    assert.deepEqual(
      { actor: records[0]!['actor'], agent: records[0]!['agent'], task: records[0]!['task'], taskName: records[0]!['taskName'], template: records[0]!['template'], namespace: records[0]!['namespace'], reason: records[0]!['reason'] },
      { actor: 'user:policy-apply', agent: 'bot', task: id, taskName: 'look', template: 'read-pods', namespace: TRIAL_NS, reason: 'template removed by policy apply' },
    );
    assert.equal(records[1]!['details']['endedTasks'], 1);
    // The running broker sees the task gone (its Secret went), and nothing of it is left in the cluster.
    let listed: unknown[] = [{}];
    for (let i = 0; i < 50 && listed.length > 0; i++) {
      listed = ((await broker.request('GET', '/v1/tasks', agent)).body as { tasks?: unknown[] }).tasks ?? [];
      if (listed.length > 0) await sleep(200);
    }
    assert.deepEqual(listed, []);
    const left = await kube.rbac.listRoleBindingForAllNamespaces({ labelSelector: `task-broker.dev/task-id=${id}` });
    assert.deepEqual(left.items, []);
  });
});
