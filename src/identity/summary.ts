/**
 * What `broker serve` says at start-up about the identities it accepts: one line for people, and the
 * same facts for `-o json` / the structured log.
 */
import type { Policy } from '../policy/types.ts';

export interface IdentitySummary {
  text: string;
  facts: Record<string, unknown>;
}

export function identitySummary(policy: Policy): IdentitySummary {
  const ids = [...policy.agents, ...policy.people].flatMap((x) => x.identities);
  const sa = ids.filter((i) => i.kind === 'serviceAccount').length;
  const listed = new Set(policy.issuers.map((i) => i.issuer));
  const oidc = ids.filter((i) => i.kind === 'oidc');
  // An oidc identity of an issuer not in `issuers` cannot sign in: said here, not refused, so a policy can name people before their issuer is set up.
  const unlisted = [...new Set(oidc.filter((i) => !listed.has(i.issuer)).map((i) => i.issuer))];
  const plural = (n: number, one: string, many: string) => `${n} ${n === 1 ? one : many}`;
  const text =
    `identity: Kubernetes ServiceAccount tokens with audience "${policy.broker.identityAudience}", checked with TokenReview (${plural(sa, 'ServiceAccount identity', 'ServiceAccount identities')} in the policy)` +
    (policy.issuers.length > 0
      ? `; OIDC tokens of ${policy.issuers.map((i) => `${i.issuer} (audience ${i.audiences.join(' or ')})`).join(', ')} (${plural(oidc.length, 'OIDC identity', 'OIDC identities')})`
      : '') +
    (unlisted.length > 0 ? `; OIDC identities of ${unlisted.join(', ')} cannot sign in: that issuer is not in "issuers"` : '');
  return {
    text,
    facts: {
      serviceAccountTokens: { audience: policy.broker.identityAudience, identities: sa },
      ...(policy.issuers.length > 0 ? { oidc: { issuers: policy.issuers.map((i) => i.issuer), identities: oidc.length } } : {}),
      ...(unlisted.length > 0 ? { oidcIssuersNotListed: unlisted } : {}),
    },
  };
}
