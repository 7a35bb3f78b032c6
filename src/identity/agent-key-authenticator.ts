/**
 * Callers that prove an enrolled agent key (src/identity/agent-proof.ts): `Authorization: AgentProof
 * JWS`, signed with the agent's Ed25519 key, for exactly this method and URL, at most 60 s old, never
 * seen before. And the one request an enrolment code is good for: `Authorization: Enrolment CODE` on
 * POST /v1/agents/enroll, which uses the code up.
 */
import { BrokerError } from '../errors.ts';
import type { Policy } from '../policy/types.ts';
import type { AgentKeyStore } from './agent-keys.ts';
import { MAX_PROOF_SECONDS, parseProofHeader, PROOF_SKEW_SECONDS, publicKeyOf, verifyProofSignature } from './agent-proof.ts';
import type { Authenticator, AuthRequest, Caller } from './types.ts';

export const ENROL_PATH = '/v1/agents/enroll';
const ENROLMENT_SCHEME = 'Enrolment ';

function refused(why: string): BrokerError {
  return new BrokerError('unauthenticated', `agent proof refused: ${why}`);
}

export class AgentKeyAuthenticator implements Authenticator {
  readonly method = 'agentKey' as const;
  readonly store: AgentKeyStore;
  /** The policy's `administrators`: approver groups whose members administer agent keys. */
  readonly administrators: readonly string[];
  readonly #agents: Set<string>;
  readonly #now: () => number;

  constructor(store: AgentKeyStore, policy: Policy, options: { now?: () => number } = {}) {
    this.store = store;
    this.#agents = new Set(policy.agents.map((a) => a.name));
    this.administrators = policy.administrators;
    this.#now = options.now ?? Date.now;
  }

  isAgent(name: string): boolean {
    return this.#agents.has(name);
  }

  async authenticate(req: AuthRequest): Promise<Caller | undefined> {
    const raw = req.headers['authorization'];
    const header = Array.isArray(raw) ? raw[0] : raw;
    if (header?.startsWith(ENROLMENT_SCHEME)) return this.#enrolment(req, header.slice(ENROLMENT_SCHEME.length).trim());
    let proof;
    try {
      proof = parseProofHeader(header);
    } catch (err) {
      throw refused((err as Error).message);
    }
    if (!proof) return undefined;
    const { claims } = proof;
    // The claimed agent is the caller's word until the signature holds: quoted only when it is a policy agent.
    if (!this.#agents.has(claims.sub)) throw refused('it names no agent of the policy');
    const record = this.store.keyOf(claims.sub);
    const key = record && publicKeyOf(record.publicKey);
    if (!key) throw refused(`agent "${claims.sub}" has no enrolled key (never enrolled, or revoked)`);
    if (!verifyProofSignature(proof, key)) throw refused(`its signature does not verify with agent "${claims.sub}"'s key`);
    const now = Math.floor(this.#now() / 1000);
    if (claims.exp - claims.iat > MAX_PROOF_SECONDS) throw refused(`it lives ${claims.exp - claims.iat} s, more than ${MAX_PROOF_SECONDS} s`);
    if (claims.exp <= now) throw refused('it has expired');
    if (claims.iat > now + PROOF_SKEW_SECONDS) throw refused('it is not valid yet ("iat" in the future)');
    if (claims.htm !== req.method) throw refused(`it was made for another method (${safe(claims.htm)}, not ${req.method})`);
    if (!sameUrl(claims.htu, req)) throw refused('it was made for another URL');
    if (!(await this.store.firstUse(claims.jti, claims.exp, claims.sub))) throw refused('it was used before (a replay)');
    return { agent: claims.sub, subject: `agent-key:${claims.sub}#${record.fingerprint}`, method: 'agentKey', principal: `agent:${claims.sub}` };
  }

  async #enrolment(req: AuthRequest, code: string): Promise<Caller> {
    if (req.method !== 'POST' || req.url !== ENROL_PATH) throw new BrokerError('unauthenticated', `enrolment refused: an enrolment code is good for POST ${ENROL_PATH} only`);
    const enrolment = await this.store.consume(code);
    if (!this.#agents.has(enrolment.agent)) throw new BrokerError('unauthenticated', `enrolment refused: agent "${enrolment.agent}" is no longer in the policy`);
    return { agent: enrolment.agent, subject: `enrolment:${enrolment.agent}`, method: 'enrolmentCode', principal: `agent:${enrolment.agent}` };
  }
}

/** The proof's `htu` is this request's URL: same path and query, and the Host the request was sent to. */
function sameUrl(htu: string, req: AuthRequest): boolean {
  let url: URL;
  try {
    url = new URL(htu);
  } catch {
    return false;
  }
  const host = req.headers['host'];
  return url.pathname + url.search === req.url && typeof host === 'string' && url.host === host.toLowerCase();
}

function safe(text: string): string {
  return /^[A-Z]{1,10}$/.test(text) ? text : 'another';
}
