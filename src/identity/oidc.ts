/**
 * Callers that present an OIDC token (`Authorization: Bearer JWT`) of an issuer the policy lists in
 * `issuers`: ID tokens of people (broker login), tokens a CI system hands its jobs, JWT access tokens
 * of the client credentials grant. Checked here, with no call to anyone but the issuer: its discovery
 * document and JWKS (openid-client, jose), keys cached and fetched again when a token names a key id
 * not seen yet (rotation), at most once per cooldown. Clock skew at most 60 s; asymmetric algorithms
 * only, from the issuer's allow-list.
 *
 * A Kubernetes ServiceAccount token (it carries a `kubernetes.io` claim) and anything that is not a
 * JWT are left to the next authenticator; every other JWT is this one's to accept or refuse.
 */
import * as jose from 'jose';
import * as oidc from 'openid-client';
import { BrokerError } from '../errors.ts';
import { principalIndex, type KnownIdentity } from '../policy/principals.ts';
import type { ClaimConditions, OidcIssuer, Policy } from '../policy/types.ts';
import { bearerToken, type Authenticator, type AuthRequest, type Caller } from './types.ts';

/** The most clock skew tolerated between the issuer and the broker, seconds (issue 14). */
export const MAX_CLOCK_SKEW_SECONDS = 60;

export interface OidcAuthenticatorOptions {
  /** How long a failed discovery is remembered before the issuer is asked again. Default 5 s. */
  retryMs?: number;
  /** Least time between two fetches of an issuer's JWKS for unknown key ids. Default 10 s. */
  jwksCooldownMs?: number;
  /** Timeout of each discovery and JWKS request. Default 5 s. */
  timeoutMs?: number;
  now?: () => number;
}

interface KnownSubject extends KnownIdentity {
  claims?: ClaimConditions;
}

type ResolvedOptions = Required<Omit<OidcAuthenticatorOptions, 'now'>> & { now: () => number };

interface Keys {
  jwks: ReturnType<typeof jose.createRemoteJWKSet>;
}

/** One issuer: its settings, and its keys once discovery has answered. */
class IssuerKeys {
  readonly settings: OidcIssuer;
  readonly #options: ResolvedOptions;
  #keys: Promise<Keys> | undefined;
  #failedAt = 0;

  constructor(settings: OidcIssuer, options: ResolvedOptions) {
    this.settings = settings;
    this.#options = options;
  }

  /** The issuer's key set, discovering it first when needed; a failure is remembered for retryMs. */
  keys(): Promise<Keys> {
    if (this.#keys === undefined && this.#options.now() - this.#failedAt >= this.#options.retryMs) {
      this.#keys = this.#discover().catch((err: unknown) => {
        this.#keys = undefined;
        this.#failedAt = this.#options.now();
        throw err;
      });
    }
    return this.#keys ?? Promise.reject(unavailable(this.settings.issuer, 'its discovery failed moments ago'));
  }

  async #discover(): Promise<Keys> {
    const url = new URL(this.settings.issuer);
    let config: oidc.Configuration;
    try {
      config = await oidc.discovery(url, this.settings.audiences[0]!, undefined, undefined, {
        timeout: Math.ceil(this.#options.timeoutMs / 1000),
        // http:// issuers are allowed by the policy on loopback only (src/policy/parse.ts)
        ...(url.protocol === 'http:' ? { execute: [oidc.allowInsecureRequests] } : {}),
      });
    } catch (err) {
      throw unavailable(this.settings.issuer, `discovery failed: ${(err as Error).message}`, err);
    }
    const jwksUri = config.serverMetadata().jwks_uri;
    if (!jwksUri) throw unavailable(this.settings.issuer, 'its discovery document names no jwks_uri');
    return {
      jwks: jose.createRemoteJWKSet(new URL(jwksUri), {
        timeoutDuration: this.#options.timeoutMs,
        cooldownDuration: this.#options.jwksCooldownMs,
        cacheMaxAge: 10 * 60_000,
      }),
    };
  }
}

function unavailable(issuer: string, why: string, cause?: unknown): BrokerError {
  return new BrokerError('identity_provider_unavailable', `the OIDC issuer ${issuer} could not be reached: ${why}`, { cause });
}

function refused(why: string): BrokerError {
  return new BrokerError('unauthenticated', `OIDC token refused: ${why}`);
}

export class OidcAuthenticator implements Authenticator {
  readonly method = 'oidc' as const;
  readonly #issuers = new Map<string, IssuerKeys>();
  /** `ISSUER#SUBJECT` of every `oidc` identity the policy names, with its agent or person and its claim conditions. */
  readonly #subjects = new Map<string, KnownSubject>();
  /** `ISSUER#GROUP` of every `oidcGroup` approver member. */
  readonly #groups = new Set<string>();
  readonly #now: () => number;

  constructor(policy: Policy, options: OidcAuthenticatorOptions = {}) {
    this.#now = options.now ?? Date.now;
    const resolved = {
      retryMs: options.retryMs ?? 5_000,
      jwksCooldownMs: options.jwksCooldownMs ?? 10_000,
      timeoutMs: options.timeoutMs ?? 5_000,
      now: this.#now,
    };
    for (const issuer of policy.issuers) this.#issuers.set(issuer.issuer, new IssuerKeys(issuer, resolved));
    const index = principalIndex(policy);
    const identities = [...policy.agents, ...policy.people].flatMap((holder) => holder.identities);
    const members = policy.approverGroups.flatMap((g) => g.members);
    for (const id of [...identities, ...members]) {
      if (id.kind === 'oidc') {
        const subject = `${id.issuer}#${id.subject}`;
        const known = index.get(subject);
        if (known && !this.#subjects.has(subject)) this.#subjects.set(subject, { ...known, ...(id.claims ? { claims: id.claims } : {}) });
      } else if (id.kind === 'oidcGroup') this.#groups.add(`${id.issuer}#${id.group}`);
    }
  }

  /** The issuers this authenticator accepts tokens of. */
  get issuers(): string[] {
    return [...this.#issuers.keys()];
  }

  /** Fetches every issuer's discovery document now (at start-up), so the first caller does not wait; failures are retried on use. */
  async warm(): Promise<Array<{ issuer: string; error?: string }>> {
    return Promise.all(
      [...this.#issuers.values()].map((i) =>
        i.keys().then(
          () => ({ issuer: i.settings.issuer }),
          (err: unknown) => ({ issuer: i.settings.issuer, error: (err as Error).message }),
        ),
      ),
    );
  }

  async authenticate(req: AuthRequest): Promise<Caller | undefined> {
    const token = bearerToken(req);
    if (!token) return undefined;
    let header: jose.ProtectedHeaderParameters;
    let claims: jose.JWTPayload;
    try {
      header = jose.decodeProtectedHeader(token);
      claims = jose.decodeJwt(token);
    } catch {
      return undefined; // not a JWT: not ours
    }
    if (Object.keys(claims).some((k) => k === 'kubernetes.io' || k.startsWith('kubernetes.io/'))) return undefined; // a ServiceAccount token
    const issuer = typeof claims.iss === 'string' ? this.#issuers.get(claims.iss) : undefined;
    // The claimed issuer is the caller's text: never quoted back.
    if (!issuer) throw refused('its issuer ("iss") is not one of the issuers the policy lists');
    const settings = issuer.settings;
    // Checked before any key is looked up: `none` and HMAC never reach jose, whatever the key set holds.
    if (typeof header.alg !== 'string' || !settings.algorithms.includes(header.alg)) {
      const shown = typeof header.alg === 'string' && /^[A-Za-z0-9]{1,8}$/.test(header.alg) ? `"${header.alg}"` : 'its';
      throw refused(`${shown} algorithm is not allowed for ${settings.issuer} (allowed: ${settings.algorithms.join(', ')})`);
    }
    const { jwks } = await issuer.keys();
    let payload: jose.JWTPayload;
    try {
      ({ payload } = await jose.jwtVerify(token, jwks, {
        issuer: settings.issuer,
        audience: settings.audiences,
        algorithms: settings.algorithms,
        clockTolerance: MAX_CLOCK_SKEW_SECONDS,
        currentDate: new Date(this.#now()),
        requiredClaims: ['exp'],
      }));
    } catch (err) {
      throw verifyError(err, settings.issuer);
    }
    const sub = payload[settings.subjectClaim];
    if (typeof sub !== 'string' || sub === '') throw refused(`its "${settings.subjectClaim}" claim (the subject) is missing or not a string`);
    const unmet = unmetCondition(payload, settings.claims);
    if (unmet) throw refused(`it does not meet the issuer's claim condition on "${unmet}"`);
    const subject = `${settings.issuer}#${sub}`;
    const groups = groupsOf(payload, settings.groupsClaim);
    const known = this.#subjects.get(subject);
    if (known) {
      const unmetOwn = known.claims && unmetCondition(payload, known.claims);
      if (unmetOwn) {
        const who = known.agent ? `agent "${known.agent}"` : known.principal;
        throw new BrokerError('forbidden', `the OIDC token of ${subject} does not meet the claim condition of ${who} on "${unmetOwn}"`);
      }
      return { agent: known.agent, subject, method: 'oidc', principal: known.principal, ...(groups.length ? { groups } : {}) };
    }
    // Not named by subject: an approver only through an `oidcGroup` of this issuer.
    if (groups.some((g) => this.#groups.has(`${settings.issuer}#${g}`))) {
      return { agent: '', subject, method: 'oidc', principal: `identity:${subject}`, groups };
    }
    throw refused(`${subject} is not an agent, person or approver in the policy`);
  }
}

/** The first claim whose condition the token does not meet, or undefined. */
function unmetCondition(payload: jose.JWTPayload, conditions: ClaimConditions): string | undefined {
  for (const [claim, allowed] of Object.entries(conditions)) {
    const value = payload[claim];
    if (typeof value !== 'string' || !allowed.includes(value)) return claim;
  }
  return undefined;
}

function groupsOf(payload: jose.JWTPayload, claim: string | undefined): string[] {
  if (claim === undefined) return [];
  const value = payload[claim];
  return Array.isArray(value) ? value.filter((g): g is string => typeof g === 'string') : [];
}

/** The one place where jose's failures become the broker's refusals (messages name the check, never the token). */
function verifyError(err: unknown, issuer: string): BrokerError {
  if (err instanceof jose.errors.JWTExpired) return refused('it has expired');
  if (err instanceof jose.errors.JWTClaimValidationFailed) {
    switch (err.claim) {
      case 'aud':
        return refused("it is not for this broker's audience");
      case 'nbf':
      case 'iat':
        return refused(`it is not valid yet ("${err.claim}" in the future)`);
      default:
        return refused(`its "${err.claim}" claim is not valid (${err.reason})`);
    }
  }
  if (err instanceof jose.errors.JWKSNoMatchingKey) return refused(`it is signed with a key ${issuer} does not publish`);
  if (err instanceof jose.errors.JWKSMultipleMatchingKeys) return refused('its key id matches more than one key of the issuer');
  if (err instanceof jose.errors.JWSSignatureVerificationFailed) return refused('its signature does not verify');
  if (err instanceof jose.errors.JOSEAlgNotAllowed) return refused('its algorithm is not allowed');
  if (err instanceof jose.errors.JWKSTimeout || err instanceof jose.errors.JWKSInvalid) return unavailable(issuer, 'its JWKS could not be read', err);
  if (err instanceof jose.errors.JOSEError) return refused(`it is malformed (${err.code})`);
  if (err instanceof TypeError) return unavailable(issuer, `its JWKS could not be fetched: ${err.message}`, err);
  return refused('it could not be verified');
}
