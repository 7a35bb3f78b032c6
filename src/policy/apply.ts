/**
 * `broker policy apply`: turns the policy into the RBAC objects the broker runs with (DESIGN.md §4).
 * Run once by an administrator with an admin kubeconfig; idempotent; removes what the policy no
 * longer asks for. What it creates is documented in docs/policy.md ("What `broker policy apply`
 * creates"):
 *
 *   Namespace           TASK_NS                      created when missing, never deleted
 *   ServiceAccount      TASK_NS/SA                   the broker's own identity
 *   Role + RoleBinding  TASK_NS/task-broker:broker   serviceaccounts, serviceaccounts/token, secrets, leases
 *   Role + RoleBinding  N/task-broker:broker         per namespace N a template allows: rolebindings, and
 *                                                    `bind` on exactly the ClusterRoles of the templates allowing N
 *   ClusterRole + CRB   task-broker:broker           tokenreviews create
 *   ClusterRole         task-broker:template:NAME    per template with `rules`: exactly those rules
 *
 * The broker's own roles hold no `escalate` and no `*`: a compromised broker can bind only the roles an
 * administrator applied from the policy, only in the namespaces the policy names.
 */
import type * as k8s from '@kubernetes/client-node';
import { BrokerError } from '../errors.ts';
import { clusterError, isNotFound, type KubeApis } from '../kube/config.ts';
import { LABEL, MANAGED_BY, templateClusterRole } from '../tasks/model.ts';
import type { Policy, PolicyRule } from './types.ts';

/** The label that marks the objects of `policy apply` (next to `app.kubernetes.io/managed-by`). */
export const COMPONENT_LABEL = 'task-broker.dev/component';
export const POLICY_LABELS: Readonly<Record<string, string>> = {
  [LABEL.managedBy]: MANAGED_BY,
  [COMPONENT_LABEL]: 'policy',
};
/** Selects every object `policy apply` manages. */
export const POLICY_SELECTOR = `${LABEL.managedBy}=${MANAGED_BY},${COMPONENT_LABEL}=policy`;
/** The name of the broker's own Roles, RoleBindings, ClusterRole and ClusterRoleBinding. */
export const BROKER_ROLE = 'task-broker:broker';

const RBAC_GROUP = 'rbac.authorization.k8s.io';

export type ObjectKind = 'Namespace' | 'ServiceAccount' | 'ClusterRole' | 'Role' | 'ClusterRoleBinding' | 'RoleBinding';

export interface Change {
  action: 'create' | 'update' | 'delete' | 'unchanged';
  kind: string;
  namespace?: string;
  name: string;
}

export interface RoleRef {
  apiGroup: string;
  kind: 'ClusterRole' | 'Role';
  name: string;
}

export interface Subject {
  kind: 'ServiceAccount';
  name: string;
  namespace: string;
}

/** One object `policy apply` wants to exist. `namespace` is set exactly for namespaced kinds. */
export type DesiredObject =
  | { kind: 'Namespace'; name: string; labels: Record<string, string> }
  | { kind: 'ServiceAccount'; namespace: string; name: string; labels: Record<string, string> }
  | { kind: 'ClusterRole'; name: string; labels: Record<string, string>; rules: PolicyRule[] }
  | { kind: 'Role'; namespace: string; name: string; labels: Record<string, string>; rules: PolicyRule[] }
  | { kind: 'ClusterRoleBinding'; name: string; labels: Record<string, string>; roleRef: RoleRef; subjects: Subject[] }
  | { kind: 'RoleBinding'; namespace: string; name: string; labels: Record<string, string>; roleRef: RoleRef; subjects: Subject[] };

/**
 * What the broker needs in its task namespace: per-task ServiceAccounts, their tokens, task Secrets
 * (and the approval signing key), approval requests (ConfigMaps), the sweeper's Lease.
 */
export function brokerTaskNamespaceRules(): PolicyRule[] {
  return [
    { apiGroups: [''], resources: ['serviceaccounts'], verbs: ['create', 'delete', 'get', 'list', 'watch'] },
    { apiGroups: [''], resources: ['serviceaccounts/token'], verbs: ['create'] },
    { apiGroups: [''], resources: ['secrets'], verbs: ['create', 'delete', 'get', 'list', 'watch', 'patch'] },
    { apiGroups: [''], resources: ['configmaps'], verbs: ['create', 'delete', 'get', 'list', 'watch', 'update'] },
    { apiGroups: ['coordination.k8s.io'], resources: ['leases'], verbs: ['get', 'create', 'update'] },
  ];
}

/** What the broker needs in a namespace tasks run in: manage RoleBindings, and bind exactly `clusterRoles`. */
export function brokerTargetNamespaceRules(clusterRoles: readonly string[]): PolicyRule[] {
  return [
    { apiGroups: [RBAC_GROUP], resources: ['rolebindings'], verbs: ['create', 'delete', 'get', 'list', 'watch'] },
    { apiGroups: [RBAC_GROUP], resources: ['clusterroles'], resourceNames: [...clusterRoles], verbs: ['bind'] },
  ];
}

/** Cluster-wide, the broker only reviews callers' ServiceAccount tokens. */
export function brokerClusterRules(): PolicyRule[] {
  return [{ apiGroups: ['authentication.k8s.io'], resources: ['tokenreviews'], verbs: ['create'] }];
}

/** The ClusterRole a task of this template is bound to. */
export function boundClusterRole(template: Policy['templates'][number]): string {
  return template.clusterRole ?? templateClusterRole(template.name);
}

const KIND_ORDER: readonly ObjectKind[] = ['Namespace', 'ServiceAccount', 'ClusterRole', 'Role', 'ClusterRoleBinding', 'RoleBinding'];

function compareObjects(a: { kind: string; namespace?: string; name: string }, b: { kind: string; namespace?: string; name: string }): number {
  const k = KIND_ORDER.indexOf(a.kind as ObjectKind) - KIND_ORDER.indexOf(b.kind as ObjectKind);
  if (k !== 0) return k;
  const ns = (a.namespace ?? '').localeCompare(b.namespace ?? '');
  return ns !== 0 ? ns : a.name.localeCompare(b.name);
}

/**
 * Every object the policy asks for, in the order they are applied: Namespace, ServiceAccount,
 * ClusterRoles, Roles, ClusterRoleBinding, RoleBindings (each sorted by namespace, then name). Pure.
 */
export function desiredObjects(policy: Policy): DesiredObject[] {
  const labels = () => ({ ...POLICY_LABELS });
  const taskNs = policy.broker.taskNamespace;
  const sa = policy.broker.serviceAccount;
  const subjects = (): Subject[] => [{ kind: 'ServiceAccount', name: sa, namespace: taskNs }];

  // Namespace → the ClusterRoles the broker may bind there.
  const bindable = new Map<string, Set<string>>();
  for (const t of policy.templates) {
    for (const ns of t.namespaces) {
      let set = bindable.get(ns);
      if (!set) bindable.set(ns, (set = new Set()));
      set.add(boundClusterRole(t));
    }
  }

  const out: DesiredObject[] = [
    { kind: 'Namespace', name: taskNs, labels: labels() },
    { kind: 'ServiceAccount', namespace: taskNs, name: sa, labels: labels() },
    { kind: 'ClusterRole', name: BROKER_ROLE, labels: labels(), rules: brokerClusterRules() },
    {
      kind: 'ClusterRoleBinding',
      name: BROKER_ROLE,
      labels: labels(),
      roleRef: { apiGroup: RBAC_GROUP, kind: 'ClusterRole', name: BROKER_ROLE },
      subjects: subjects(),
    },
  ];
  for (const t of policy.templates) {
    if (t.rules) out.push({ kind: 'ClusterRole', name: templateClusterRole(t.name), labels: labels(), rules: t.rules.map(copyRule) });
  }
  // One Role per namespace; when a template allows the task namespace itself, that Role holds both sets of rules.
  const roleNamespaces = new Set([taskNs, ...bindable.keys()]);
  for (const ns of roleNamespaces) {
    const roles = bindable.get(ns);
    const rules = [
      ...(ns === taskNs ? brokerTaskNamespaceRules() : []),
      ...(roles ? brokerTargetNamespaceRules([...roles].sort()) : []),
    ];
    out.push({ kind: 'Role', namespace: ns, name: BROKER_ROLE, labels: labels(), rules });
    out.push({
      kind: 'RoleBinding',
      namespace: ns,
      name: BROKER_ROLE,
      labels: labels(),
      roleRef: { apiGroup: RBAC_GROUP, kind: 'Role', name: BROKER_ROLE },
      subjects: subjects(),
    });
  }
  return out.sort(compareObjects);
}

function copyRule(r: PolicyRule): PolicyRule {
  return {
    ...(r.apiGroups === undefined ? {} : { apiGroups: [...r.apiGroups] }),
    ...(r.resources === undefined ? {} : { resources: [...r.resources] }),
    ...(r.resourceNames === undefined ? {} : { resourceNames: [...r.resourceNames] }),
    ...(r.nonResourceURLs === undefined ? {} : { nonResourceURLs: [...r.nonResourceURLs] }),
    verbs: [...r.verbs],
  };
}

// ---------------------------------------------------------------------------------------------
// Comparing with what the cluster holds. The API server omits empty lists, so missing == [].

function sameList(a: readonly string[] | undefined, b: readonly string[] | undefined): boolean {
  const x = a ?? [];
  const y = b ?? [];
  return x.length === y.length && x.every((v, i) => v === y[i]);
}

function sameRules(have: readonly k8s.V1PolicyRule[] | undefined, want: readonly PolicyRule[]): boolean {
  const h = have ?? [];
  return (
    h.length === want.length &&
    h.every((r, i) => {
      const w = want[i]!;
      return (
        sameList(r.apiGroups, w.apiGroups) &&
        sameList(r.resources, w.resources) &&
        sameList(r.resourceNames, w.resourceNames) &&
        sameList(r.nonResourceURLs, w.nonResourceURLs) &&
        sameList(r.verbs, w.verbs)
      );
    })
  );
}

function sameRoleRef(have: k8s.V1RoleRef | undefined, want: RoleRef): boolean {
  return have?.apiGroup === want.apiGroup && have.kind === want.kind && have.name === want.name;
}

function sameSubjects(have: readonly k8s.RbacV1Subject[] | undefined, want: readonly Subject[]): boolean {
  const h = have ?? [];
  return (
    h.length === want.length &&
    h.every((s, i) => {
      const w = want[i]!;
      return s.kind === w.kind && s.name === w.name && (s.namespace ?? '') === w.namespace && (s.apiGroup ?? '') === '';
    })
  );
}

/** Our labels are present (other labels an administrator added are kept). */
function hasLabels(meta: k8s.V1ObjectMeta | undefined, want: Record<string, string>): boolean {
  return Object.entries(want).every(([k, v]) => meta?.labels?.[k] === v);
}

function withLabels(meta: k8s.V1ObjectMeta | undefined, want: Record<string, string>): k8s.V1ObjectMeta {
  return { ...meta, labels: { ...meta?.labels, ...want } };
}

// ---------------------------------------------------------------------------------------------
// Applying

export interface ApplyOptions {
  /** Compute the changes without writing anything. */
  dryRun?: boolean;
}

/** Reads one object; undefined when it does not exist. */
async function readOrUndefined<T>(read: () => Promise<T>): Promise<T | undefined> {
  try {
    return await read();
  } catch (err) {
    if (isNotFound(err)) return undefined;
    throw err;
  }
}

function describe(o: { kind: string; namespace?: string; name: string }): string {
  return `${o.kind} ${o.namespace ? `${o.namespace}/` : ''}${o.name}`;
}

function change(action: Change['action'], o: { kind: string; namespace?: string | undefined; name: string }): Change {
  return { action, kind: o.kind, ...(o.namespace === undefined ? {} : { namespace: o.namespace }), name: o.name };
}

/**
 * Makes the cluster hold exactly the objects of desiredObjects(policy): creates what is missing,
 * replaces what differs (rules, roleRef, subjects, our labels), deletes managed RBAC objects the
 * policy no longer asks for (bindings before roles). Template namespaces must exist; all are checked
 * before anything is written. Returns every change (unchanged objects included): first the desired
 * objects in apply order, then the deletions.
 */
export async function applyPolicy(kube: KubeApis, policy: Policy, options: ApplyOptions = {}): Promise<Change[]> {
  const dryRun = options.dryRun ?? false;
  const taskNs = policy.broker.taskNamespace;

  // 1. Every namespace a template allows must exist (the task namespace is created below).
  const missing: { ns: string; template: string; index: number }[] = [];
  const checked = new Map<string, boolean>();
  for (const [index, t] of policy.templates.entries()) {
    for (const ns of t.namespaces) {
      if (ns === taskNs) continue;
      let exists = checked.get(ns);
      if (exists === undefined) {
        exists = (await readOrUndefined(() => kube.core.readNamespace({ name: ns })).catch((err: unknown) => {
          throw clusterError(`reading namespace ${ns}`, err);
        })) !== undefined;
        checked.set(ns, exists);
      }
      if (!exists) missing.push({ ns, template: t.name, index });
    }
  }
  if (missing.length > 0) {
    const [first, ...rest] = missing as [(typeof missing)[number], ...typeof missing];
    const more = rest.length > 0 ? `; also missing: ${rest.map((m) => `"${m.ns}" (template "${m.template}")`).join(', ')}` : '';
    throw new BrokerError('invalid_argument', `namespace "${first.ns}" (allowed by template "${first.template}") does not exist${more}`, {
      field: `templates[${first.index}].namespaces`,
    });
  }

  // 2. Create or update each desired object, in order (roles before the bindings that refer to them).
  const desired = desiredObjects(policy);
  const changes: Change[] = [];
  for (const obj of desired) {
    try {
      changes.push(await upsert(kube, obj, dryRun));
    } catch (err) {
      throw clusterError(`applying ${describe(obj)}`, err);
    }
  }

  // 3. Delete managed RBAC objects that are no longer desired: bindings first, then roles.
  const wanted = new Set(desired.map((o) => describe(o)));
  const stale: { kind: ObjectKind; namespace?: string; name: string; remove: () => Promise<unknown> }[] = [];
  try {
    const labelSelector = POLICY_SELECTOR;
    const [crbs, rbs, crs, roles] = await Promise.all([
      kube.rbac.listClusterRoleBinding({ labelSelector }),
      kube.rbac.listRoleBindingForAllNamespaces({ labelSelector }),
      kube.rbac.listClusterRole({ labelSelector }),
      kube.rbac.listRoleForAllNamespaces({ labelSelector }),
    ]);
    for (const o of crbs.items) {
      const name = o.metadata!.name!;
      stale.push({ kind: 'ClusterRoleBinding', name, remove: () => kube.rbac.deleteClusterRoleBinding({ name }) });
    }
    for (const o of rbs.items) {
      const name = o.metadata!.name!;
      const namespace = o.metadata!.namespace!;
      stale.push({ kind: 'RoleBinding', namespace, name, remove: () => kube.rbac.deleteNamespacedRoleBinding({ name, namespace }) });
    }
    for (const o of crs.items) {
      const name = o.metadata!.name!;
      stale.push({ kind: 'ClusterRole', name, remove: () => kube.rbac.deleteClusterRole({ name }) });
    }
    for (const o of roles.items) {
      const name = o.metadata!.name!;
      const namespace = o.metadata!.namespace!;
      stale.push({ kind: 'Role', namespace, name, remove: () => kube.rbac.deleteNamespacedRole({ name, namespace }) });
    }
  } catch (err) {
    throw clusterError('listing the objects of a previous policy apply', err);
  }
  const deleteOrder: ObjectKind[] = ['RoleBinding', 'ClusterRoleBinding', 'Role', 'ClusterRole'];
  const toDelete = stale
    .filter((o) => !wanted.has(describe(o)))
    .sort((a, b) => deleteOrder.indexOf(a.kind) - deleteOrder.indexOf(b.kind) || (a.namespace ?? '').localeCompare(b.namespace ?? '') || a.name.localeCompare(b.name));
  for (const o of toDelete) {
    if (!dryRun) {
      try {
        await o.remove();
      } catch (err) {
        if (!isNotFound(err)) throw clusterError(`deleting ${describe(o)}`, err);
      }
    }
    changes.push(change('delete', o));
  }
  return changes;
}

async function upsert(kube: KubeApis, obj: DesiredObject, dryRun: boolean): Promise<Change> {
  const { rbac, core } = kube;
  switch (obj.kind) {
    case 'Namespace': {
      // An existing namespace is left as it is (it may be an administrator's); one is never deleted.
      const have = await readOrUndefined(() => core.readNamespace({ name: obj.name }));
      if (have) return change('unchanged', obj);
      if (!dryRun) await core.createNamespace({ body: { metadata: { name: obj.name, labels: obj.labels } } });
      return change('create', obj);
    }
    case 'ServiceAccount': {
      const { name, namespace } = obj;
      const have = await readOrUndefined(() => core.readNamespacedServiceAccount({ name, namespace }));
      if (!have) {
        if (!dryRun) await core.createNamespacedServiceAccount({ namespace, body: { metadata: { name, namespace, labels: obj.labels } } });
        return change('create', obj);
      }
      if (hasLabels(have.metadata, obj.labels)) return change('unchanged', obj);
      if (!dryRun) await core.replaceNamespacedServiceAccount({ name, namespace, body: { ...have, metadata: withLabels(have.metadata, obj.labels) } });
      return change('update', obj);
    }
    case 'ClusterRole': {
      const { name } = obj;
      const have = await readOrUndefined(() => rbac.readClusterRole({ name }));
      if (!have) {
        if (!dryRun) await rbac.createClusterRole({ body: { metadata: { name, labels: obj.labels }, rules: obj.rules } });
        return change('create', obj);
      }
      if (hasLabels(have.metadata, obj.labels) && sameRules(have.rules, obj.rules) && !have.aggregationRule) return change('unchanged', obj);
      if (!dryRun) {
        const { aggregationRule: _dropped, ...rest } = have;
        await rbac.replaceClusterRole({ name, body: { ...rest, metadata: withLabels(have.metadata, obj.labels), rules: obj.rules } });
      }
      return change('update', obj);
    }
    case 'Role': {
      const { name, namespace } = obj;
      const have = await readOrUndefined(() => rbac.readNamespacedRole({ name, namespace }));
      if (!have) {
        if (!dryRun) await rbac.createNamespacedRole({ namespace, body: { metadata: { name, namespace, labels: obj.labels }, rules: obj.rules } });
        return change('create', obj);
      }
      if (hasLabels(have.metadata, obj.labels) && sameRules(have.rules, obj.rules)) return change('unchanged', obj);
      if (!dryRun) await rbac.replaceNamespacedRole({ name, namespace, body: { ...have, metadata: withLabels(have.metadata, obj.labels), rules: obj.rules } });
      return change('update', obj);
    }
    case 'ClusterRoleBinding': {
      const { name } = obj;
      const body = (meta: k8s.V1ObjectMeta): k8s.V1ClusterRoleBinding => ({ metadata: meta, roleRef: obj.roleRef, subjects: obj.subjects });
      const have = await readOrUndefined(() => rbac.readClusterRoleBinding({ name }));
      if (!have) {
        if (!dryRun) await rbac.createClusterRoleBinding({ body: body({ name, labels: obj.labels }) });
        return change('create', obj);
      }
      if (hasLabels(have.metadata, obj.labels) && sameRoleRef(have.roleRef, obj.roleRef) && sameSubjects(have.subjects, obj.subjects)) {
        return change('unchanged', obj);
      }
      if (!dryRun) {
        if (sameRoleRef(have.roleRef, obj.roleRef)) {
          await rbac.replaceClusterRoleBinding({ name, body: body(withLabels(have.metadata, obj.labels)) });
        } else {
          // roleRef is immutable: replace the binding by deleting and creating it.
          await rbac.deleteClusterRoleBinding({ name });
          await rbac.createClusterRoleBinding({ body: body({ name, labels: { ...have.metadata?.labels, ...obj.labels } }) });
        }
      }
      return change('update', obj);
    }
    case 'RoleBinding': {
      const { name, namespace } = obj;
      const body = (meta: k8s.V1ObjectMeta): k8s.V1RoleBinding => ({ metadata: meta, roleRef: obj.roleRef, subjects: obj.subjects });
      const have = await readOrUndefined(() => rbac.readNamespacedRoleBinding({ name, namespace }));
      if (!have) {
        if (!dryRun) await rbac.createNamespacedRoleBinding({ namespace, body: body({ name, namespace, labels: obj.labels }) });
        return change('create', obj);
      }
      if (hasLabels(have.metadata, obj.labels) && sameRoleRef(have.roleRef, obj.roleRef) && sameSubjects(have.subjects, obj.subjects)) {
        return change('unchanged', obj);
      }
      if (!dryRun) {
        if (sameRoleRef(have.roleRef, obj.roleRef)) {
          await rbac.replaceNamespacedRoleBinding({ name, namespace, body: body(withLabels(have.metadata, obj.labels)) });
        } else {
          await rbac.deleteNamespacedRoleBinding({ name, namespace });
          await rbac.createNamespacedRoleBinding({ namespace, body: body({ name, namespace, labels: { ...have.metadata?.labels, ...obj.labels } }) });
        }
      }
      return change('update', obj);
    }
  }
}
