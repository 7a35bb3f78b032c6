/**
 * What a request grants, in words an approver reads on a phone: verbs x resources x namespace, one
 * line per rule, and the gated pairs it reaches with the policy's reason for each; those that let a
 * task leave access behind (tokens, bindings, roles, pods running as any ServiceAccount, webhooks)
 * are flagged as persistence-capable (src/policy/grants.ts holds the reasons).
 */
import { describePair, gatedPairsHitBy, gatedReason } from '../policy/grants.ts';
import type { Policy, PolicyRule, Template } from '../policy/types.ts';

export interface GrantLine {
  verbs: string[];
  resources: string[];
  namespaces: string[];
}

export interface GatedLine {
  pair: string;
  reason: string;
  /** It can create access that outlives the task. */
  persistent: boolean;
}

export interface GrantWords {
  lines: GrantLine[];
  /** A ClusterRole whose rules could not be read: its name only. */
  clusterRole?: string;
  gated: GatedLine[];
}

const PERSISTENT = /outliv|after the task ends|run a pod as any ServiceAccount|bind roles|bind cluster roles/;

export function isPersistent(reason: string): boolean {
  return PERSISTENT.test(reason);
}

function resourceName(r: string, group: string): string {
  return group && group !== '*' ? `${r}.${group}` : r;
}

/** The grant of `template` in `namespace`; `rules` are a ClusterRole template's rules when the broker could read them. */
export function grantWords(policy: Policy, template: Template, namespace: string, rules: readonly PolicyRule[] | undefined): GrantWords {
  const effective = template.rules ?? rules;
  const lines: GrantLine[] = (effective ?? []).map((rule) => ({
    verbs: [...rule.verbs],
    resources: (rule.resources ?? []).flatMap((r) => (rule.apiGroups ?? ['']).map((g) => resourceName(r, g))),
    namespaces: [namespace],
  }));
  const gated = effective
    ? gatedPairsHitBy(effective, policy.gated).map((pair) => {
        const reason = gatedReason(pair);
        return { pair: describePair(pair), reason, persistent: isPersistent(reason) };
      })
    : [];
  return { lines, ...(effective ? {} : { clusterRole: template.clusterRole ?? '?' }), gated };
}

/** A TTL in seconds as people say it: `15 min`, `2 h`, `1 h 30 min`, `45 s`. */
export function ttlWords(seconds: number): string {
  if (seconds < 60) return `${seconds} s`;
  const h = Math.floor(seconds / 3600);
  const m = Math.round((seconds % 3600) / 60);
  return [h ? `${h} h` : '', m ? `${m} min` : ''].filter(Boolean).join(' ') || '0 min';
}
