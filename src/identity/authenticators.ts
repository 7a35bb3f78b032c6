/**
 * The authenticators a broker asks, in order, for one policy (rebuilt when the policy is reloaded).
 * OIDC first: it decides from the token itself, without a call to anyone, whether a bearer token is
 * its own (a JWT that is not a ServiceAccount token); ServiceAccount tokens go on to TokenReview.
 */
import type { AuthenticationV1Api } from '@kubernetes/client-node';
import type { Policy } from '../policy/types.ts';
import { OidcAuthenticator } from './oidc.ts';
import { ServiceAccountAuthenticator } from './service-account.ts';
import type { Authenticator } from './types.ts';

export function authenticatorsFor(policy: Policy, authn: AuthenticationV1Api): Authenticator[] {
  const list: Authenticator[] = [];
  if (policy.issuers.length > 0) {
    const oidc = new OidcAuthenticator(policy);
    void oidc.warm(); // discovery now, so the first caller does not wait; a failure is retried on use
    list.push(oidc);
  }
  list.push(new ServiceAccountAuthenticator(authn, policy));
  return list;
}
