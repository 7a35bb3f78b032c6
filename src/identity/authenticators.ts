/**
 * The authenticators a broker asks, in order, for one policy (rebuilt when the policy is reloaded).
 * Agent keys first (their own Authorization scheme), then OIDC: it decides from the token itself, without a call to anyone, whether a bearer token is
 * its own (a JWT that is not a ServiceAccount token); ServiceAccount tokens go on to TokenReview.
 */
import type { AuthenticationV1Api } from '@kubernetes/client-node';
import type { Policy } from '../policy/types.ts';
import { AgentKeyAuthenticator } from './agent-key-authenticator.ts';
import type { AgentKeyStore } from './agent-keys.ts';
import { OidcAuthenticator } from './oidc.ts';
import { ServiceAccountAuthenticator } from './service-account.ts';
import type { Authenticator } from './types.ts';

export function authenticatorsFor(policy: Policy, authn: AuthenticationV1Api, agentKeys?: AgentKeyStore): Authenticator[] {
  // Agent proofs and enrolment codes are not bearer tokens: this one passes on everything else at once.
  const list: Authenticator[] = agentKeys ? [new AgentKeyAuthenticator(agentKeys, policy)] : [];
  if (policy.issuers.length > 0) {
    const oidc = new OidcAuthenticator(policy);
    void oidc.warm(); // discovery now, so the first caller does not wait; a failure is retried on use
    list.push(oidc);
  }
  list.push(new ServiceAccountAuthenticator(authn, policy));
  return list;
}
