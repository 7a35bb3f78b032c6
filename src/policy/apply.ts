/**
 * `broker policy apply`: turns the policy into the RBAC objects the broker runs with (DESIGN.md §4).
 * Run once by an administrator with an admin kubeconfig; idempotent; removes what the policy no
 * longer asks for. What it creates is documented, rule by rule, in docs/policy.md ("What `broker
 * policy apply` creates"; test/unit/policy-apply-doc.test.ts keeps the two in sync):
 *
 *   Namespace           BROKER_NS, TASK_NS                created when missing, never deleted
 *   ServiceAccount      BROKER_NS/SA                      the broker's own identity
 *   Role + RoleBinding  BROKER_NS/task-broker:broker      the approval signing key (Secret), approval requests and
 *                                                         the audit checkpoint (ConfigMaps), the sweeper Lease
 *   Role + RoleBinding  TASK_NS/task-broker:broker        task ServiceAccounts, their tokens, task Secrets
 *   Role + RoleBinding  N/task-broker:broker              per namespace N a template allows: rolebindings, and
 *                                                         `bind` on exactly the ClusterRoles of the templates allowing N
 *   ClusterRole + CRB   task-broker:broker                tokenreviews create; `get` on the ClusterRoles that
 *                                                         `clusterRole` templates name (re-checked at every task start)
 *   ClusterRole         task-broker:template:NAME         per template with `rules`: exactly those rules
 *
 * The broker's own roles hold no `escalate` and no `*`: a compromised broker can bind only the roles an
 * administrator applied from the policy, only in the namespaces the policy names. Its ServiceAccount
 * lives apart from the task namespace (where it may mint tokens), and in its own namespace it can read
 * no Secret but the signing key, so it cannot mint a token for itself, neither with TokenRequest nor
 * through a `kubernetes.io/service-account-token` Secret.
 */
import type * as k8s from '@kubernetes/client-node';
import { KEY_SECRET } from '../approvals/token.ts';
import { BrokerError } from '../errors.ts';
import { clusterError, isNotFound, type KubeApis } from '../kube/config.ts';
import { LABEL, MANAGED_BY, TASK_SELECTOR, taskFromSecret, templateClusterRole } from '../tasks/model.ts';
import { describePair, gatedPairsHitBy } from './grants.ts';
import { reservedNamespaceProblem, SAME_NAMESPACES_REASON } from './parse.ts';
import type { GatedPair, Policy, PolicyRule, Template } from './types.ts';

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
 * What the broker needs in its own namespace (`broker.namespace`, where its ServiceAccount lives):
 * the approval signing key (a Secret it creates on first use, then reads and may replace; no other
 * Secret there can be read, so a `kubernetes.io/service-account-token` Secret it might create for
 * itself stays out of its reach), approval requests and the audit log's checkpoint (ConfigMaps), the
 * sweeper's Lease. Nothing that mints tokens: no `serviceaccounts/token`, no ServiceAccounts.
 */
export function brokerOwnNamespaceRules(): PolicyRule[] {
  return [
    { apiGroups: [''], resources: ['secrets'], verbs: ['create'] },
    { apiGroups: [''], resources: ['secrets'], resourceNames: [KEY_SECRET], verbs: ['get', 'update'] },
    { apiGroups: [''], resources: ['configmaps'], verbs: ['create', 'delete', 'get', 'list', 'watch', 'update'] },
    { apiGroups: ['coordination.k8s.io'], resources: ['leases'], verbs: ['get', 'create', 'update'] },
  ];
}

/** What the broker needs in its task namespace: per-task ServiceAccounts, their tokens, task Secrets. Nothing else. */
export function brokerTaskNamespaceRules(): PolicyRule[] {
  return [
    { apiGroups: [''], resources: ['serviceaccounts'], verbs: ['create', 'delete', 'get', 'list', 'watch'] },
    { apiGroups: [''], resources: ['serviceaccounts/token'], verbs: ['create'] },
    { apiGroups: [''], resources: ['secrets'], verbs: ['create', 'delete', 'get', 'list', 'watch', 'patch'] },
  ];
}

/** What the broker needs in a namespace tasks run in: manage RoleBindings, and bind exactly `clusterRoles`. */
export function brokerTargetNamespaceRules(clusterRoles: readonly string[]): PolicyRule[] {
  return [
    { apiGroups: [RBAC_GROUP], resources: ['rolebindings'], verbs: ['create', 'delete', 'get', 'list', 'watch'] },
    { apiGroups: [RBAC_GROUP], resources: ['clusterroles'], resourceNames: [...clusterRoles], verbs: ['bind'] },
  ];
}

/**
 * Cluster-wide, the broker reviews callers' ServiceAccount tokens, and reads the ClusterRoles that
 * `clusterRole` templates bind (to check them against the gated set at every task start). The `get` rule is
 * left out when no template names a ClusterRole: a rule with no `resourceNames` would allow every name.
 */
export function brokerClusterRules(templateClusterRoles: readonly string[]): PolicyRule[] {
  return [
    { apiGroups: ['authentication.k8s.io'], resources: ['tokenreviews'], verbs: ['create'] },
    ...(templateClusterRoles.length > 0
      ? [{ apiGroups: [RBAC_GROUP], resources: ['clusterroles'], resourceNames: [...templateClusterRoles], verbs: ['get'] }]
      : []),
  ];
}

/** The ClusterRole a task of this template is bound to. */
export function boundClusterRole(template: Policy['templates'][number]): string {
  return template.clusterRole ?? templateClusterRole(template.name);
}

/** The distinct ClusterRoles that `clusterRole` templates name, sorted. */
export function namedClusterRoles(policy: Policy): string[] {
  return [...new Set(policy.templates.flatMap((t) => (t.clusterRole === undefined ? [] : [t.clusterRole])))].sort();
}

/**
 * Refuses a policy (built by hand: parsePolicy already refuses these) whose broker namespaces are one,
 * or where a template allows one of them. Throws BrokerError 'invalid_argument' naming the field.
 */
export function assertBrokerNamespacesApart(policy: Policy): void {
  const { namespace, taskNamespace } = policy.broker;
  if (namespace === taskNamespace) {
    throw new BrokerError('invalid_argument', `"broker.namespace" and "broker.taskNamespace" must differ, both are "${namespace}": ${SAME_NAMESPACES_REASON}`, {
      field: 'broker.namespace',
    });
  }
  const problems: { field: string; message: string }[] = [];
  policy.templates.forEach((t, i) =>
    t.namespaces.forEach((ns, j) => {
      const problem = reservedNamespaceProblem(ns, policy.broker);
      if (problem) problems.push({ field: `templates[${i}].namespaces[${j}]`, message: `template "${t.name}": ${problem}` });
    }),
  );
  const [first, ...rest] = problems;
  if (first) {
    const more = rest.length > 0 ? `; also ${rest.map((p) => p.field).join(', ')}` : '';
    throw new BrokerError('invalid_argument', `${first.message}${more}`, { field: first.field });
  }
}

const KIND_ORDER: readonly ObjectKind[] = ['Namespace', 'ServiceAccount', 'ClusterRole', 'Role', 'ClusterRoleBinding', 'RoleBinding'];

function compareObjects(a: { kind: string; namespace?: string; name: string }, b: { kind: string; namespace?: string; name: string }): number {
  const k = KIND_ORDER.indexOf(a.kind as ObjectKind) - KIND_ORDER.indexOf(b.kind as ObjectKind);
  if (k !== 0) return k;
  const ns = (a.namespace ?? '').localeCompare(b.namespace ?? '');
  return ns !== 0 ? ns : a.name.localeCompare(b.name);
}

/**
 * Every object the policy asks for, in the order they are applied: Namespaces, ServiceAccount,
 * ClusterRoles, Roles, ClusterRoleBinding, RoleBindings (each sorted by namespace, then name). Pure;
 * throws (assertBrokerNamespacesApart) for a policy whose templates allow a broker namespace.
 */
export function desiredObjects(policy: Policy): DesiredObject[] {
  assertBrokerNamespacesApart(policy);
  const labels = () => ({ ...POLICY_LABELS });
  const brokerNs = policy.broker.namespace;
  const taskNs = policy.broker.taskNamespace;
  const sa = policy.broker.serviceAccount;
  const subjects = (): Subject[] => [{ kind: 'ServiceAccount', name: sa, namespace: brokerNs }];

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
    { kind: 'Namespace', name: brokerNs, labels: labels() },
    { kind: 'Namespace', name: taskNs, labels: labels() },
    { kind: 'ServiceAccount', namespace: brokerNs, name: sa, labels: labels() },
    { kind: 'ClusterRole', name: BROKER_ROLE, labels: labels(), rules: brokerClusterRules(namedClusterRoles(policy)) },
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
  // One Role per namespace; no template allows the two broker namespaces (checked above), so each Role has one purpose.
  const roles: [string, PolicyRule[]][] = [
    [brokerNs, brokerOwnNamespaceRules()],
    [taskNs, brokerTaskNamespaceRules()],
    ...[...bindable].map(([ns, set]): [string, PolicyRule[]] => [ns, brokerTargetNamespaceRules([...set].sort())]),
  ];
  for (const [ns, rules] of roles) {
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

// ---------------------------------------------------------------------------------------------
// `clusterRole` templates: their rules live in the cluster, so they are checked against the gated set
// here (by `policy apply`) and again by the broker at every task start.

/** A `clusterRole` template and what its ClusterRole grants of the gated set. */
export interface ClusterRoleGate {
  template: string;
  clusterRole: string;
  /** The gated pairs the ClusterRole's rules grant, in the order of `policy.gated`; empty when none. */
  hits: GatedPair[];
  /** The ClusterRole aggregates others (`aggregationRule`): its rules grow when a matching ClusterRole appears. */
  aggregated: boolean;
}

export interface ClusterRoleGateOptions {
  /**
   * For an aggregated ClusterRole, also read the ClusterRoles its selectors match (needs `list` on
   * clusterroles, which an administrator has and the broker has not), in case the aggregation
   * controller has not filled its rules yet. Default false: the role's own `rules` only.
   */
  resolveAggregation?: boolean;
}

function toPolicyRule(r: k8s.V1PolicyRule): PolicyRule {
  return {
    ...(r.apiGroups === undefined ? {} : { apiGroups: [...r.apiGroups] }),
    ...(r.resources === undefined ? {} : { resources: [...r.resources] }),
    ...(r.resourceNames === undefined ? {} : { resourceNames: [...r.resourceNames] }),
    ...(r.nonResourceURLs === undefined ? {} : { nonResourceURLs: [...r.nonResourceURLs] }),
    verbs: [...(r.verbs ?? [])],
  };
}

/** A LabelSelector as the `labelSelector` query string. */
function selectorString(sel: k8s.V1LabelSelector): string {
  const parts = Object.entries(sel.matchLabels ?? {}).map(([k, v]) => `${k}=${v}`);
  for (const e of sel.matchExpressions ?? []) {
    const values = `(${(e.values ?? []).join(',')})`;
    if (e.operator === 'In') parts.push(`${e.key} in ${values}`);
    else if (e.operator === 'NotIn') parts.push(`${e.key} notin ${values}`);
    else if (e.operator === 'Exists') parts.push(e.key);
    else if (e.operator === 'DoesNotExist') parts.push(`!${e.key}`);
  }
  return parts.join(',');
}

/**
 * Reads the ClusterRole of each `clusterRole` template and intersects its rules with the gated set.
 * One entry per `clusterRole` template, in policy order. A ClusterRole that does not exist is
 * BrokerError 'precondition_failed' naming it (and every other missing one): its rules cannot be checked,
 * and whoever creates it later would decide what tasks get. Works with the broker's own credentials
 * (`get` on exactly those names) as with an administrator's.
 */
export async function clusterRoleGatedHits(kube: KubeApis, policy: Policy, options: ClusterRoleGateOptions = {}): Promise<ClusterRoleGate[]> {
  const rulesOf = new Map<string, { rules: PolicyRule[]; aggregated: boolean } | undefined>();
  for (const name of namedClusterRoles(policy)) {
    let role: k8s.V1ClusterRole | undefined;
    try {
      role = await readOrUndefined(() => kube.rbac.readClusterRole({ name }));
    } catch (err) {
      throw clusterError(`reading ClusterRole ${name}`, err);
    }
    if (!role) {
      rulesOf.set(name, undefined);
      continue;
    }
    const rules = (role.rules ?? []).map(toPolicyRule);
    const selectors = role.aggregationRule?.clusterRoleSelectors ?? [];
    if (options.resolveAggregation && selectors.length > 0) {
      for (const sel of selectors) {
        try {
          const matched = await kube.rbac.listClusterRole({ labelSelector: selectorString(sel) });
          for (const m of matched.items) if (m.metadata?.name !== name) rules.push(...(m.rules ?? []).map(toPolicyRule));
        } catch (err) {
          throw clusterError(`listing the ClusterRoles that ClusterRole ${name} aggregates`, err);
        }
      }
    }
    rulesOf.set(name, { rules, aggregated: role.aggregationRule !== undefined });
  }
  const missing: { index: number; template: Template }[] = [];
  const out: ClusterRoleGate[] = [];
  policy.templates.forEach((t, index) => {
    if (t.clusterRole === undefined) return;
    const role = rulesOf.get(t.clusterRole);
    if (!role) missing.push({ index, template: t });
    else out.push({ template: t.name, clusterRole: t.clusterRole, hits: gatedPairsHitBy(role.rules, policy.gated), aggregated: role.aggregated });
  });
  const [first, ...rest] = missing;
  if (first) {
    const more = rest.length > 0 ? `; also missing: ${rest.map((m) => `"${m.template.clusterRole}" (template "${m.template.name}")`).join(', ')}` : '';
    throw new BrokerError(
      'precondition_failed',
      `ClusterRole "${first.template.clusterRole}" (named by template "${first.template.name}") does not exist, so its rules cannot be checked against the gated set${more}: create it first (kubectl apply -f ...), or bind rules of the template's own`,
      { field: `templates[${first.index}].clusterRole` },
    );
  }
  return out;
}

/** `template X binds ClusterRole Y, which grants gated access (create pods/exec, ...): starts need approval`. */
export function describeClusterRoleGate(g: ClusterRoleGate): string {
  return `template "${g.template}" binds ClusterRole "${g.clusterRole}", which grants gated access (${g.hits.map(describePair).join(', ')}): starts need approval`;
}

/**
 * Throws BrokerError 'invalid_argument' when a `clusterRole` template whose ClusterRole grants gated
 * access has no approver groups (nobody could ever approve its tasks).
 */
export function assertGatedClusterRolesApprovable(policy: Policy, gates: readonly ClusterRoleGate[]): void {
  const unapprovable = gates.filter((g) => {
    if (g.hits.length === 0) return false;
    const t = policy.templates.find((x) => x.name === g.template)!;
    return (t.approval ?? policy.defaultApproval).approvers.length === 0;
  });
  const [first, ...rest] = unapprovable;
  if (!first) return;
  const index = policy.templates.findIndex((t) => t.name === first.template);
  const more = rest.length > 0 ? `; so do templates ${rest.map((g) => `"${g.template}"`).join(', ')}` : '';
  throw new BrokerError(
    'invalid_argument',
    `template "${first.template}" binds ClusterRole "${first.clusterRole}", which grants gated access (${first.hits.map(describePair).join(', ')}), ` +
      `but no approver groups can approve its tasks: declare "approvers" (or give the template an "approval"), or bind a ClusterRole without gated access${more}`,
    { field: `templates[${index}].clusterRole` },
  );
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
  /**
   * End the active tasks the policy no longer allows (affectedTasks) before applying, instead of
   * refusing. In a dry run they are only listed.
   */
  endAffectedTasks?: boolean;
  /** Called after each affected task has been ended (to record it), before the next one and before anything else changes. */
  onTaskEnded?: (task: AffectedTask) => Promise<void>;
}

// ---------------------------------------------------------------------------------------------
// Tasks under a changing policy. Removing a template, or a namespace from a template, also removes the
// broker's right to delete the RoleBindings of tasks still running there (its Role in that namespace
// loses the bind, or goes): such tasks are ended first, with the administrator's rights, or the apply
// is refused.

/** An active task that the policy being applied no longer allows. */
export interface AffectedTask {
  id: string;
  agent: string;
  name: string;
  template: string;
  namespace: string;
  /** The template is not in the policy any more, or no longer allows the task's namespace. */
  cause: 'template-removed' | 'namespace-removed';
  secretName: string;
  serviceAccount: string;
  roleBinding: string;
}

/** `task ID (agent A, name N, template T, namespace NS: template removed)`. */
export function describeAffectedTask(t: AffectedTask): string {
  const why = t.cause === 'template-removed' ? 'template removed' : 'namespace removed from the template';
  return `task ${t.id} (agent ${t.agent}, name ${t.name}, template ${t.template}, namespace ${t.namespace}: ${why})`;
}

/**
 * The active tasks (task Secrets with the task labels in `broker.taskNamespace`, state active) whose
 * template the policy no longer has, or no longer allows in the task's namespace; sorted by template,
 * namespace, agent, name. Pending tasks are left to the broker, which rolls them back or sweeps them.
 */
export async function affectedTasks(kube: KubeApis, policy: Policy): Promise<AffectedTask[]> {
  const namespace = policy.broker.taskNamespace;
  let secrets: k8s.V1Secret[];
  try {
    secrets = (await kube.core.listNamespacedSecret({ namespace, labelSelector: TASK_SELECTOR })).items;
  } catch (err) {
    if (isNotFound(err)) return []; // no task namespace yet: no tasks
    throw clusterError(`listing the tasks in namespace ${namespace}`, err);
  }
  const templates = new Map(policy.templates.map((t) => [t.name, t]));
  const out: AffectedTask[] = [];
  for (const secret of secrets) {
    const task = taskFromSecret(secret);
    if (!task || task.state !== 'active') continue;
    const template = templates.get(task.template);
    if (template?.namespaces.includes(task.namespace)) continue;
    const { id, agent, name, namespace: ns, secretName, serviceAccount, roleBinding } = task;
    out.push({ id, agent, name, template: task.template, namespace: ns, cause: template ? 'namespace-removed' : 'template-removed', secretName, serviceAccount, roleBinding });
  }
  return out.sort((a, b) => a.template.localeCompare(b.template) || a.namespace.localeCompare(b.namespace) || a.agent.localeCompare(b.agent) || a.name.localeCompare(b.name));
}

/**
 * Ends a task as the broker does (src/tasks/service.ts): its RoleBinding (the access goes at once),
 * then its Secret (its tokens are bound to it, so they stop working), then its ServiceAccount. The
 * RoleBinding and ServiceAccount are deleted only when they carry this task's id label, so a task
 * record edited outside the broker cannot make the administrator delete anything else. Objects
 * already gone are fine.
 */
export async function endAffectedTask(kube: KubeApis, taskNamespace: string, task: AffectedTask): Promise<void> {
  const ours = (meta: k8s.V1ObjectMeta | undefined) => meta?.labels?.[LABEL.taskId] === task.id;
  try {
    const rb = await readOrUndefined(() => kube.rbac.readNamespacedRoleBinding({ name: task.roleBinding, namespace: task.namespace }));
    if (rb && ours(rb.metadata)) await ignoreNotFound(kube.rbac.deleteNamespacedRoleBinding({ name: task.roleBinding, namespace: task.namespace }));
    await ignoreNotFound(kube.core.deleteNamespacedSecret({ name: task.secretName, namespace: taskNamespace }));
    const sa = await readOrUndefined(() => kube.core.readNamespacedServiceAccount({ name: task.serviceAccount, namespace: taskNamespace }));
    if (sa && ours(sa.metadata)) await ignoreNotFound(kube.core.deleteNamespacedServiceAccount({ name: task.serviceAccount, namespace: taskNamespace }));
  } catch (err) {
    throw clusterError(`ending task ${task.id}`, err);
  }
}

async function ignoreNotFound(p: Promise<unknown>): Promise<void> {
  try {
    await p;
  } catch (err) {
    if (!isNotFound(err)) throw err;
  }
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

/** What `applyPolicy` did (or, in a dry run, would do). */
export interface ApplyResult {
  /** Every change, unchanged objects included: first the desired objects in apply order, then the deletions. */
  changes: Change[];
  /** Each `clusterRole` template, with what its ClusterRole grants of the gated set. */
  clusterRoles: ClusterRoleGate[];
  /** The active tasks ended before applying (with `endAffectedTasks`; in a dry run, those it would end). */
  endedTasks: AffectedTask[];
}

/**
 * Makes the cluster hold exactly the objects of desiredObjects(policy): creates what is missing,
 * replaces what differs (rules, roleRef, subjects, our labels), deletes managed RBAC objects and
 * ServiceAccounts the policy no longer asks for (bindings before roles, ServiceAccounts last).
 * Before anything is written it checks that no template allows a broker namespace, that every
 * template namespace exists, and that every `clusterRole` template's ClusterRole exists and, when it
 * grants gated access, that the template has approvers. Active tasks whose template, or whose namespace
 * in it, the policy removes make it refuse (BrokerError 'precondition_failed' naming them), unless
 * `endAffectedTasks`: then they are ended first, each reported to `onTaskEnded`.
 */
export async function applyPolicy(kube: KubeApis, policy: Policy, options: ApplyOptions = {}): Promise<ApplyResult> {
  const dryRun = options.dryRun ?? false;

  // 1. Nothing is written for a policy that puts tasks in a broker namespace.
  assertBrokerNamespacesApart(policy);

  // 2. Every namespace a template allows must exist (the broker's two are created below).
  const missing: { ns: string; template: string; index: number }[] = [];
  const checked = new Map<string, boolean>();
  for (const [index, t] of policy.templates.entries()) {
    for (const ns of t.namespaces) {
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
    throw new BrokerError('precondition_failed', `namespace "${first.ns}" (allowed by template "${first.template}") does not exist${more}: create it first (kubectl create namespace ${first.ns})`, {
      field: `templates[${first.index}].namespaces`,
    });
  }

  // 3. `clusterRole` templates: their ClusterRoles exist, and the gated ones can be approved.
  const clusterRoles = await clusterRoleGatedHits(kube, policy, { resolveAggregation: true });
  assertGatedClusterRolesApprovable(policy, clusterRoles);

  // 4. Active tasks whose template (or its namespace) goes: refused, or ended first (recorded by onTaskEnded),
  //    since afterwards the broker could no longer delete their RoleBindings.
  const endedTasks = await affectedTasks(kube, policy);
  if (endedTasks.length > 0 && !options.endAffectedTasks) {
    const n = endedTasks.length;
    throw new BrokerError(
      'precondition_failed',
      `the policy removes the template, or the namespace, of ${n} active task${n === 1 ? '' : 's'}: ${endedTasks.map(describeAffectedTask).join('; ')}. ` +
        `The broker could not delete ${n === 1 ? 'its RoleBinding' : 'their RoleBindings'} afterwards: wait for ${n === 1 ? 'it' : 'them'} to end, ` +
        `or pass --end-affected-tasks to end ${n === 1 ? 'it' : 'them'} first`,
    );
  }
  if (!dryRun) {
    for (const t of endedTasks) {
      await endAffectedTask(kube, policy.broker.taskNamespace, t);
      await options.onTaskEnded?.(t);
    }
  }

  // 5. Create or update each desired object, in order (roles before the bindings that refer to them).
  const desired = desiredObjects(policy);
  const changes: Change[] = [];
  for (const obj of desired) {
    try {
      changes.push(await upsert(kube, obj, dryRun));
    } catch (err) {
      throw clusterError(`applying ${describe(obj)}`, err);
    }
  }

  // 6. Delete managed objects that are no longer desired: bindings first, then roles, then ServiceAccounts
  //    (the broker's ServiceAccount of a previous layout or name: deleting it also voids its tokens).
  const wanted = new Set(desired.map((o) => describe(o)));
  const stale: { kind: ObjectKind; namespace?: string; name: string; remove: () => Promise<unknown> }[] = [];
  try {
    const labelSelector = POLICY_SELECTOR;
    const [crbs, rbs, crs, roles, sas] = await Promise.all([
      kube.rbac.listClusterRoleBinding({ labelSelector }),
      kube.rbac.listRoleBindingForAllNamespaces({ labelSelector }),
      kube.rbac.listClusterRole({ labelSelector }),
      kube.rbac.listRoleForAllNamespaces({ labelSelector }),
      kube.core.listServiceAccountForAllNamespaces({ labelSelector }),
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
    for (const o of sas.items) {
      const name = o.metadata!.name!;
      const namespace = o.metadata!.namespace!;
      stale.push({ kind: 'ServiceAccount', namespace, name, remove: () => kube.core.deleteNamespacedServiceAccount({ name, namespace }) });
    }
  } catch (err) {
    throw clusterError('listing the objects of a previous policy apply', err);
  }
  const deleteOrder: ObjectKind[] = ['RoleBinding', 'ClusterRoleBinding', 'Role', 'ClusterRole', 'ServiceAccount'];
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
  return { changes, clusterRoles, endedTasks };
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
