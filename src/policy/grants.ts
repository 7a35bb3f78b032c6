/**
 * What a template's rules can do, measured against the gated set: which verb/resource pairs a set of
 * RBAC rules reaches (wildcards included), the default gated set and why each of its pairs is gated,
 * and how a pair is written in messages. Pure: no I/O, no policy parsing. Used by the policy checks (parse.ts), `policy apply`
 * (apply.ts, for `clusterRole` templates), `policy check` (src/cli/policy.ts) and the broker at every
 * task start (src/tasks/service.ts).
 */
import type { GatedPair, PolicyRule } from './types.ts';

const RBAC = 'rbac.authorization.k8s.io';
const RUNS_POD = 'can run a pod as any ServiceAccount of the namespace';

function pairs(verbs: readonly string[], resource: string, apiGroup: string, reason: string): GatedReason[] {
  return verbs.map((verb) => ({ pair: { verb, resource, apiGroup }, reason }));
}

/** A pair of the default gated set and why it is gated, in words an administrator or approver reads. */
export interface GatedReason {
  pair: GatedPair;
  reason: string;
}

/**
 * The default gated set with the reason for each pair (docs/policy.md lists the same table). First
 * what acts at once (exec, secret reads, escalation); then what lets a holder create access that
 * outlives the task: tokens, accounts, bindings, roles, certificates, admission webhooks, and pods,
 * which run with any ServiceAccount of their namespace (so do the workloads that create them).
 */
export const DEFAULT_GATED_REASONS: readonly GatedReason[] = [
  ...pairs(['delete'], 'namespaces', '', 'deletes a namespace and everything in it'),
  // `get` too: kubectl's WebSocket exec, attach and port-forward are GET requests, which API servers
  // before 1.30 authorize with `get` alone (1.30 and later also ask for `create`).
  ...pairs(['create', 'get'], 'pods/exec', '', 'can run commands inside a running container'),
  ...pairs(['create', 'get'], 'pods/attach', '', "can take over a running container's terminal"),
  ...pairs(['create', 'get'], 'pods/portforward', '', "can connect to a pod's ports from outside the cluster"),
  ...pairs(['get', 'list', 'watch'], 'secrets', '', 'can read Secrets: passwords, keys and ServiceAccount tokens'),
  ...pairs(['escalate'], '*', '*', 'can write roles that grant more than it holds'),
  ...pairs(['bind'], '*', '*', 'can bind roles it does not hold'),
  ...pairs(['impersonate'], '*', '*', 'can act as another user, group or ServiceAccount'),
  ...pairs(['create'], 'serviceaccounts/token', '', 'can mint tokens that outlive the task'),
  ...pairs(['create'], 'serviceaccounts', '', 'can create a ServiceAccount that outlives the task'),
  ...pairs(['create', 'update', 'patch'], 'secrets', '', 'can write a ServiceAccount token Secret: a standing token that outlives the task'),
  ...pairs(['create', 'update', 'patch'], 'rolebindings', RBAC, 'can bind roles to any account'),
  ...pairs(['create', 'update', 'patch'], 'roles', RBAC, 'can give roles, and every account bound to them, access that outlives the task'),
  ...pairs(['create', 'update', 'patch'], 'clusterrolebindings', RBAC, 'can bind cluster roles to any account, in every namespace'),
  ...pairs(['create', 'update', 'patch'], 'clusterroles', RBAC, 'can give cluster roles, and every account bound to them, access that outlives the task'),
  ...pairs(['create'], 'certificatesigningrequests', 'certificates.k8s.io', 'can request a client certificate that outlives the task'),
  ...pairs(
    ['create', 'update', 'patch'],
    'validatingwebhookconfigurations',
    'admissionregistration.k8s.io',
    'can send API requests, with the objects in them, to a server of its choosing, after the task ends',
  ),
  ...pairs(
    ['create', 'update', 'patch'],
    'mutatingwebhookconfigurations',
    'admissionregistration.k8s.io',
    "can rewrite objects as they are created (a pod's ServiceAccount, its image), after the task ends",
  ),
  ...pairs(['create'], 'pods', '', RUNS_POD),
  ...['deployments', 'statefulsets', 'daemonsets', 'replicasets'].flatMap((r) => pairs(['create'], r, 'apps', RUNS_POD)),
  ...['jobs', 'cronjobs'].flatMap((r) => pairs(['create'], r, 'batch', RUNS_POD)),
];

/**
 * The gated set used when the policy has no `gated` key. `resource: '*'` with `apiGroup: '*'`
 * means the verb on any resource of any API group.
 */
export const DEFAULT_GATED: GatedPair[] = DEFAULT_GATED_REASONS.map((r) => ({ ...r.pair }));

const pairKey = (p: GatedPair) => `${p.verb} ${p.resource} ${p.apiGroup}`;
const REASONS = new Map(DEFAULT_GATED_REASONS.map((r) => [pairKey(r.pair), r.reason]));

/** What is said of a pair a policy's own `gated` list adds, which has no reason of ours. */
export const LISTED_REASON = "listed in the policy's gated set";

/** Why a pair is gated: the words of the default set for one of its pairs (also when a policy lists it), else LISTED_REASON. */
export function gatedReason(pair: GatedPair): string {
  return REASONS.get(pairKey(pair)) ?? LISTED_REASON;
}

/** `create pods/exec`, `delete deployments.apps`. */
export function describePair(p: GatedPair): string {
  return `${p.verb} ${p.resource}${p.apiGroup && p.apiGroup !== '*' ? `.${p.apiGroup}` : ''}`;
}

/** Whether an RBAC `resources` entry covers `resource` ("*", exact, "pods/*", "*\/scale"). */
export function resourceCovers(entry: string, resource: string): boolean {
  if (entry === '*' || resource === '*' || entry === resource) return true;
  if (entry.endsWith('/*')) return resource.startsWith(entry.slice(0, -1));
  if (entry.startsWith('*/')) return resource.includes('/') && resource.endsWith(entry.slice(1));
  return false;
}

/** The gated pairs that the rules grant (wholly or partly), in the order of `gated`. */
export function gatedPairsHitBy(rules: readonly PolicyRule[], gated: readonly GatedPair[]): GatedPair[] {
  return gated.filter((pair) =>
    rules.some(
      (rule) =>
        rule.verbs.some((v) => v === '*' || pair.verb === '*' || v === pair.verb) &&
        (rule.apiGroups ?? ['']).some((g) => g === '*' || pair.apiGroup === '*' || g === pair.apiGroup) &&
        (rule.resources ?? []).some((r) => resourceCovers(r, pair.resource)),
    ),
  );
}

/**
 * The pairs of the policy's `gated` entries: each entry stands for every verb × resource it lists
 * (`verb`/`verbs`, `resource`/`resources`, `apiGroup` default ""), first occurrence kept. Entries come
 * from YAML: malformed parts (reported by the schema) are skipped.
 */
export function expandGated(entries: ReadonlyArray<Record<string, unknown>>): GatedPair[] {
  const out: GatedPair[] = [];
  const seen = new Set<string>();
  for (const e of entries) {
    const verbs = typeof e['verb'] === 'string' ? [e['verb']] : strings(e['verbs']);
    const resources = typeof e['resource'] === 'string' ? [e['resource']] : strings(e['resources']);
    const apiGroup = typeof e['apiGroup'] === 'string' ? e['apiGroup'] : '';
    for (const verb of verbs) {
      for (const resource of resources) {
        const key = `${verb} ${resource} ${apiGroup}`;
        if (!seen.has(key)) out.push({ verb, resource, apiGroup });
        seen.add(key);
      }
    }
  }
  return out;
}

function strings(v: unknown): string[] {
  return Array.isArray(v) ? v.filter((x): x is string => typeof x === 'string') : [];
}
