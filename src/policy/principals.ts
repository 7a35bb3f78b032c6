/**
 * Who stands behind an identity. Approvals count per principal, never per identity (DESIGN.md §6):
 * a requester's other identities can never approve, and one person with two identities counts once.
 *
 *   an identity of agent A            → agent:A   (the caller acts as agent A)
 *   an identity of person P           → person:P  (an approver when P is in an approver group)
 *   an identity named only in a group → identity:SUBJECT
 *
 * `policy check` refuses an identity that belongs to both an agent and a person or approver group, so
 * each identity has exactly one principal.
 */
import type { Identity, Policy, Principal } from './types.ts';

export interface KnownIdentity {
  /** The agent name, or '' for a caller who is only a person or approver. */
  agent: string;
  principal: Principal;
}

/** The subject a caller proves with this identity: the ServiceAccount username, or `ISSUER#SUB`. */
export function subjectOf(identity: Identity): string | undefined {
  switch (identity.kind) {
    case 'serviceAccount':
      return identity.username;
    case 'oidc':
      return `${identity.issuer}#${identity.subject}`;
    case 'oidcGroup':
      return undefined; // a group names no single subject
  }
}

/** Every subject the policy names, with its agent and principal. */
export function principalIndex(policy: Policy): Map<string, KnownIdentity> {
  const index = new Map<string, KnownIdentity>();
  const add = (identity: Identity, known: KnownIdentity) => {
    const subject = subjectOf(identity);
    if (subject !== undefined && !index.has(subject)) index.set(subject, known);
  };
  for (const agent of policy.agents) for (const id of agent.identities) add(id, { agent: agent.name, principal: `agent:${agent.name}` });
  for (const person of policy.people) for (const id of person.identities) add(id, { agent: '', principal: `person:${person.name}` });
  for (const group of policy.approverGroups) {
    for (const member of group.members) {
      if (member.kind === 'person') continue;
      const subject = subjectOf(member);
      if (subject !== undefined) add(member, { agent: '', principal: `identity:${subject}` });
    }
  }
  return index;
}

/** The principal of a subject the index does not name (an OIDC group member): the identity itself. */
export function principalOf(index: ReadonlyMap<string, KnownIdentity>, subject: string): KnownIdentity {
  return index.get(subject) ?? { agent: '', principal: `identity:${subject}` };
}
