/**
 * Callers that present a Kubernetes ServiceAccount token with the broker's audience (for example a
 * projected token), checked with TokenReview. A token meant for the API server has the wrong audience
 * and is refused.
 */
import { hash } from 'node:crypto';
import type { AuthenticationV1Api } from '@kubernetes/client-node';
import { BrokerError } from '../errors.ts';
import { clusterError } from '../kube/config.ts';
import { principalIndex, type KnownIdentity } from '../policy/principals.ts';
import type { Policy } from '../policy/types.ts';
import { bearerToken, type Authenticator, type AuthRequest, type Caller } from './types.ts';

interface CacheEntry {
  caller: Caller | BrokerError;
  until: number;
}

/** A caller accepted on a connection: its Authorization header, as it came, until its cache entry lapses. */
interface ConnectionEntry {
  header: string;
  caller: Caller;
  until: number;
}

/** A request that says which connection it came on (a fastify request does: `socket`). */
type ConnectionRequest = AuthRequest & { socket?: object };

export interface ServiceAccountAuthenticatorOptions {
  /** How long a TokenReview answer is reused (the API server itself caches for 10 s). */
  cacheMs?: number;
  now?: () => number;
}

export class ServiceAccountAuthenticator implements Authenticator {
  readonly method = 'serviceAccount' as const;
  readonly #authn: AuthenticationV1Api;
  readonly #audience: string;
  /** ServiceAccount usernames the policy names, with their agent and principal. */
  readonly #known: Map<string, KnownIdentity>;
  readonly #cacheMs: number;
  readonly #now: () => number;
  readonly #cache = new Map<string, CacheEntry>();
  readonly #inflight = new Map<string, Promise<Caller>>();
  /**
   * Per connection, the last caller accepted on it. A keep-alive client (kubectl's plugin, an agent's
   * loop, a load generator) sends the same header on every request: comparing it with the one before
   * costs a memcmp, where parsing it and hashing a ~1 KB token cost about 1.5 us a request. Held only
   * as long as the connection (a WeakMap on the socket) and never past the cache entry it came from.
   */
  readonly #connections = new WeakMap<object, ConnectionEntry>();

  constructor(authn: AuthenticationV1Api, policy: Policy, options: ServiceAccountAuthenticatorOptions = {}) {
    this.#authn = authn;
    this.#audience = policy.broker.identityAudience;
    // Agents, people and approvers; only ServiceAccount subjects can come through TokenReview.
    this.#known = new Map([...principalIndex(policy)].filter(([subject]) => subject.startsWith('system:serviceaccount:')));
    this.#cacheMs = options.cacheMs ?? 10_000;
    this.#now = options.now ?? Date.now;
  }

  async authenticate(req: ConnectionRequest): Promise<Caller | undefined> {
    const token = bearerToken(req);
    if (!token) return undefined;
    const key = hash('sha256', token, 'base64url'); // one-shot: the cheapest way, on every request
    const hit = this.#cache.get(key);
    if (hit && hit.until > this.#now()) {
      if (hit.caller instanceof BrokerError) throw hit.caller;
      this.#remember(req, hit.caller, hit.until);
      return hit.caller;
    }
    let pending = this.#inflight.get(key);
    if (!pending) {
      pending = this.#review(token, key).finally(() => this.#inflight.delete(key));
      this.#inflight.set(key, pending);
    }
    const caller = await pending;
    const entry = this.#cache.get(key);
    if (entry && entry.caller === caller) this.#remember(req, caller, entry.until);
    return caller;
  }

  /**
   * The caller this authenticator accepted for exactly this Authorization header on this connection,
   * while the cache entry it came from lasts; else undefined. Synchronous: the request hook's fast
   * path (src/server/app.ts). A refusal is never answered from here.
   */
  acceptedOnConnection(req: ConnectionRequest): Caller | undefined {
    const entry = req.socket && this.#connections.get(req.socket);
    if (entry === undefined || entry.header !== req.headers['authorization'] || entry.until <= this.#now()) return undefined;
    return entry.caller;
  }

  #remember(req: ConnectionRequest, caller: Caller, until: number): void {
    const header = req.headers['authorization'];
    if (req.socket && typeof header === 'string') this.#connections.set(req.socket, { header, caller, until });
  }

  async #review(token: string, key: string): Promise<Caller> {
    let review;
    try {
      review = await this.#authn.createTokenReview({ body: { spec: { token, audiences: [this.#audience] } } });
    } catch (err) {
      throw clusterError('TokenReview', err);
    }
    const status = review.status ?? {};
    const username = status.user?.username;
    let result: Caller | BrokerError;
    if (!status.authenticated || !username) {
      result = new BrokerError('unauthenticated', 'the ServiceAccount token was not accepted (expired, revoked, or not for this broker\'s audience)');
    } else if (!(status.audiences ?? []).includes(this.#audience)) {
      result = new BrokerError('unauthenticated', 'the ServiceAccount token is not for this broker\'s audience');
    } else {
      const known = this.#known.get(username);
      result =
        known !== undefined
          ? { agent: known.agent, subject: username, method: 'serviceAccount', principal: known.principal }
          : new BrokerError('unauthenticated', `${username} is not an agent or approver in the policy`, { field: 'subject' });
    }
    // Refusals are remembered briefly too, so a caller retrying a bad token cannot flood the API server.
    const ttl = result instanceof BrokerError ? Math.min(this.#cacheMs, 2_000) : this.#cacheMs;
    this.#cache.set(key, { caller: result, until: this.#now() + ttl });
    if (this.#cache.size > 10_000) this.#evict();
    if (result instanceof BrokerError) throw result;
    return result;
  }

  #evict(): void {
    const now = this.#now();
    for (const [k, v] of this.#cache) if (v.until <= now) this.#cache.delete(k);
  }
}

/**
 * `authenticate`'s answer when it is already known without any work: the ServiceAccount authenticator
 * accepted exactly this request's credential on its connection, and its cache entry still holds.
 * Undefined otherwise (then `authenticate` decides). Sound while every authenticator before it passes
 * on a ServiceAccount token whatever the connection (the OIDC one leaves any token with a
 * `kubernetes.io` claim to it; an agent proof is not a bearer token): a credential accepted here
 * would be accepted again.
 */
export function acceptedBefore(authenticators: readonly Authenticator[], req: ConnectionRequest): Caller | undefined {
  for (const a of authenticators) if (a instanceof ServiceAccountAuthenticator) return a.acceptedOnConnection(req);
  return undefined;
}

/** Asks each authenticator in turn; a request that none recognises is unauthenticated. */
export async function authenticate(authenticators: readonly Authenticator[], req: AuthRequest): Promise<Caller> {
  for (const a of authenticators) {
    const caller = await a.authenticate(req);
    if (caller) return caller;
  }
  throw new BrokerError('unauthenticated', `no credential: send ${authenticators.map((a) => CREDENTIAL_FORM[a.method]).join(', or ')}`);
}

const CREDENTIAL_FORM: Record<Authenticator['method'], string> = {
  serviceAccount: '"Authorization: Bearer <ServiceAccount token with the broker audience>"',
  oidc: '"Authorization: Bearer <OIDC token of an issuer in the policy>"',
  agentKey: '"Authorization: AgentProof <signed proof>" (broker agent enroll)',
  enrolmentCode: '"Authorization: Enrolment <code>" (to POST /v1/agents/enroll only)',
}
