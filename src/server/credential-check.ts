/**
 * Whether the broker's own credential can do more than `broker policy apply` grants it (DESIGN.md
 * property 6: a compromised broker is bounded only if it runs with exactly that). Checked at start,
 * with the credential itself:
 *
 * - a few SelfSubjectAccessReviews for cluster-wide tell-tales of a broad credential: anything on
 *   everything (cluster-admin), `escalate` on ClusterRoles, creating ClusterRoleBindings, binding
 *   `cluster-admin`, impersonating users, minting tokens in the broker's own namespace, reading
 *   Secrets in every namespace. Any of these is *broad*: `broker serve` refuses it unless started
 *   with `--allow-broad-credentials`.
 * - a SelfSubjectRulesReview in the task namespace, the broker's namespace and each template
 *   namespace, compared with the rules `policy apply` gives the broker there (desiredObjects in
 *   src/policy/apply.ts), its ClusterRole, and what every authenticated user may do (self reviews).
 *   Anything else is *extra*: a warning, recorded with broker.started.
 *
 * Non-resource rules (discovery URLs such as /api, /healthz) are not compared: every identity has
 * some, and they grant no access to objects. A review the API server could not complete (an
 * `incomplete` rules review, a failed call) is reported as unchecked, never as fine.
 */
import * as k8s from '@kubernetes/client-node';
import { brokerClusterRules, desiredObjects, namedClusterRoles } from '../policy/apply.ts';
import type { Policy, PolicyRule } from '../policy/types.ts';

/** What every authenticated user may do (system:basic-user): reviewing its own access and identity. */
export const EVERYONE_RULES: readonly PolicyRule[] = [
  { apiGroups: ['authorization.k8s.io'], resources: ['selfsubjectaccessreviews', 'selfsubjectrulesreviews'], verbs: ['create'] },
  { apiGroups: ['authentication.k8s.io'], resources: ['selfsubjectreviews'], verbs: ['create'] },
];

export interface CredentialReport {
  /** Who the credential is (SelfSubjectReview), when the API server said. */
  subject: string | undefined;
  /** Cluster-wide tell-tales the credential holds: refused without --allow-broad-credentials. */
  broad: string[];
  /** Rules beyond what policy apply grants, per namespace (`NS: verbs resource`). */
  extra: string[];
  /** What could not be checked, and why. */
  unchecked: string[];
}

interface Telltale {
  what: string;
  attributes: k8s.V1ResourceAttributes;
}

function telltales(policy: Policy): Telltale[] {
  const rbac = 'rbac.authorization.k8s.io';
  return [
    { what: 'every verb on every resource (cluster-admin)', attributes: { verb: '*', group: '*', resource: '*' } },
    { what: 'escalate on ClusterRoles (grant itself any permission)', attributes: { verb: 'escalate', group: rbac, resource: 'clusterroles' } },
    { what: 'create ClusterRoleBindings (bind any ClusterRole cluster-wide)', attributes: { verb: 'create', group: rbac, resource: 'clusterrolebindings' } },
    { what: 'bind the ClusterRole cluster-admin', attributes: { verb: 'bind', group: rbac, resource: 'clusterroles', name: 'cluster-admin' } },
    { what: 'impersonate users', attributes: { verb: 'impersonate', group: '', resource: 'users' } },
    {
      what: `create serviceaccounts/token in its own namespace ${policy.broker.namespace} (mint tokens for itself)`,
      attributes: { verb: 'create', group: '', resource: 'serviceaccounts', subresource: 'token', namespace: policy.broker.namespace },
    },
    { what: 'read Secrets in every namespace', attributes: { verb: 'get', group: '', resource: 'secrets' } },
  ];
}

/** The rules `policy apply` gives the broker in each namespace it touches (besides its ClusterRole). */
export function grantedByApply(policy: Policy): Map<string, PolicyRule[]> {
  const out = new Map<string, PolicyRule[]>();
  for (const o of desiredObjects(policy)) if (o.kind === 'Role') out.set(o.namespace, o.rules);
  return out;
}

/** A rule as the API server returns it in a rules review, as a PolicyRule. */
function ruleOf(r: k8s.V1ResourceRule): PolicyRule {
  return {
    verbs: r.verbs ?? [],
    ...(r.apiGroups ? { apiGroups: r.apiGroups } : {}),
    ...(r.resources ? { resources: r.resources } : {}),
    ...(r.resourceNames && r.resourceNames.length > 0 ? { resourceNames: r.resourceNames } : {}),
  };
}

const has = (list: readonly string[] | undefined, v: string) => (list ?? []).includes(v) || (list ?? []).includes('*');

/** Whether `allowed` lets one (verb, group, resource) on `names` (empty: every name). A `*` in `granted` is covered only by a `*`. */
function covered(allowed: readonly PolicyRule[], verb: string, group: string, resource: string, names: readonly string[]): boolean {
  return allowed.some((a) => {
    if (!has(a.verbs, verb) || !has(a.apiGroups, group) || !has(a.resources, resource)) return false;
    if (!a.resourceNames || a.resourceNames.length === 0) return true;
    return names.length > 0 && names.every((n) => a.resourceNames!.includes(n));
  });
}

/**
 * What `granted` (the rules a review returned) holds beyond `allowed`, one entry per resource:
 * `get,list secrets`, `bind rbac.authorization.k8s.io/clusterroles (cluster-admin)`. Pure.
 */
export function excessRules(granted: readonly PolicyRule[], allowed: readonly PolicyRule[]): string[] {
  const out = new Map<string, Set<string>>();
  for (const g of granted) {
    const names = g.resourceNames ?? [];
    for (const group of g.apiGroups ?? ['']) {
      for (const resource of g.resources ?? []) {
        for (const verb of g.verbs) {
          if (covered(allowed, verb, group, resource, names)) continue;
          const key = `${group ? `${group}/` : ''}${resource}${names.length > 0 ? ` (${names.join(', ')})` : ''}`;
          let verbs = out.get(key);
          if (!verbs) out.set(key, (verbs = new Set()));
          verbs.add(verb);
        }
      }
    }
  }
  return [...out].map(([what, verbs]) => `${[...verbs].join(',')} ${what}`);
}

/** Checks the credential behind `config` against what `policy apply` grants for `policy`. Never throws. */
export async function checkOwnCredential(config: k8s.KubeConfig, policy: Policy): Promise<CredentialReport> {
  const authz = config.makeApiClient(k8s.AuthorizationV1Api);
  const authn = config.makeApiClient(k8s.AuthenticationV1Api);
  const report: CredentialReport = { subject: undefined, broad: [], extra: [], unchecked: [] };
  const why = (err: unknown) => (err instanceof k8s.ApiException ? `HTTP ${err.code}` : err instanceof Error ? err.message : String(err));

  const subject = authn.createSelfSubjectReview({ body: {} }).then(
    (r) => (report.subject = r.status?.userInfo?.username),
    () => undefined, // reported as unknown; the reviews below say what matters
  );
  const tells = Promise.all(
    telltales(policy).map(async (t) => {
      try {
        const r = await authz.createSelfSubjectAccessReview({ body: { spec: { resourceAttributes: t.attributes } } });
        return { what: t.what, allowed: r.status?.allowed === true };
      } catch (err) {
        return { what: t.what, unchecked: why(err) };
      }
    }),
  );
  const clusterRules = [...brokerClusterRules(namedClusterRoles(policy)), ...EVERYONE_RULES];
  const perNamespace = [...grantedByApply(policy)].sort(([a], [b]) => a.localeCompare(b));
  const reviews = Promise.all(
    perNamespace.map(async ([namespace, rules]) => {
      try {
        const r = await authz.createSelfSubjectRulesReview({ body: { spec: { namespace } } });
        const granted = (r.status?.resourceRules ?? []).map(ruleOf);
        return { namespace, extra: excessRules(granted, [...rules, ...clusterRules]), incomplete: r.status?.incomplete ? (r.status.evaluationError ?? 'incomplete') : undefined };
      } catch (err) {
        return { namespace, extra: [], incomplete: why(err) };
      }
    }),
  );
  const [, told, results] = await Promise.all([subject, tells, reviews]);
  for (const t of told) {
    if ('unchecked' in t) report.unchecked.push(`${t.what}: ${t.unchecked}`);
    else if (t.allowed) report.broad.push(t.what);
  }
  for (const r of results) {
    for (const e of r.extra) report.extra.push(`${r.namespace}: ${e}`);
    if (r.incomplete) report.unchecked.push(`rules in namespace ${r.namespace}: ${r.incomplete}`);
  }
  return report;
}
