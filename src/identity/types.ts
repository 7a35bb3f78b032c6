/**
 * Who is calling the broker. Every way of proving identity (ServiceAccount tokens now; OIDC and
 * agent keys later) is an Authenticator, and the policy maps what it proves onto a named agent.
 */

import type { Principal } from '../policy/types.ts';

/** `enrolmentCode`: a one-time code that proves nothing but the right to enrol a key for one agent (POST /v1/agents/enroll only). */
export type IdentityMethod = 'serviceAccount' | 'oidc' | 'agentKey' | 'enrolmentCode';

export interface Caller {
  /** The policy's agent name; empty for a caller who is only an approver. */
  agent: string;
  /** What was proven, e.g. `system:serviceaccount:ci:deployer`, or `ISSUER#SUB` for OIDC. */
  subject: string;
  method: IdentityMethod;
  /**
   * The agent or person behind the identity (src/policy/principals.ts). Approvals count per principal:
   * a requester's other identities never approve, and one person with two identities counts once.
   */
  principal: Principal;
  /** Group claims (OIDC), for approver groups. */
  groups?: string[];
}

/** The parts of an HTTP request an authenticator may look at. */
export interface AuthRequest {
  headers: Record<string, string | string[] | undefined>;
  method: string;
  url: string;
}

export interface Authenticator {
  readonly method: IdentityMethod;
  /**
   * undefined: the request carries no credential of this kind (the next authenticator is asked).
   * Throws BrokerError `unauthenticated` when it carries one that does not prove an agent.
   */
  authenticate(req: AuthRequest): Promise<Caller | undefined>;
}

/** How a caller appears as `actor` in the audit log: `agent:NAME`, or `user:SUBJECT` for an approver. */
export function actorOf(caller: Caller): string {
  return caller.agent ? `agent:${caller.agent}` : `user:${caller.subject}`;
}

export function bearerToken(req: AuthRequest): string | undefined {
  const header = req.headers['authorization'];
  const value = Array.isArray(header) ? header[0] : header;
  if (!value) return undefined;
  const match = /^Bearer\s+(\S+)\s*$/i.exec(value);
  return match?.[1];
}
