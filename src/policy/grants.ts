/**
 * What a template's rules can do, measured against the gated set: which verb/resource pairs a set of
 * RBAC rules reaches (wildcards included), the default gated set, and how a pair is written in
 * messages. Pure: no I/O, no policy parsing. Used by the policy checks (parse.ts), `policy apply`
 * (apply.ts, for `clusterRole` templates), `policy check` (src/cli/policy.ts) and the broker at every
 * task start (src/tasks/service.ts).
 */
import type { GatedPair, PolicyRule } from './types.ts';

/**
 * The gated set used when the policy has no `gated` key. `resource: '*'` with `apiGroup: '*'`
 * means the verb on any resource of any API group.
 */
export const DEFAULT_GATED: GatedPair[] = [
  { verb: 'delete', resource: 'namespaces', apiGroup: '' },
  { verb: 'create', resource: 'pods/exec', apiGroup: '' },
  { verb: 'create', resource: 'pods/attach', apiGroup: '' },
  { verb: 'create', resource: 'pods/portforward', apiGroup: '' },
  { verb: 'get', resource: 'secrets', apiGroup: '' },
  { verb: 'list', resource: 'secrets', apiGroup: '' },
  { verb: 'watch', resource: 'secrets', apiGroup: '' },
  { verb: 'escalate', resource: '*', apiGroup: '*' },
  { verb: 'bind', resource: '*', apiGroup: '*' },
  { verb: 'impersonate', resource: '*', apiGroup: '*' },
];

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
