/**
 * Agent keys: the key an enrolled agent holds, and the proof it sends with each request.
 *
 * The key is an Ed25519 seed, kept by the agent in the OS keychain or, in a container with none,
 * in `BROKER_AGENT_KEY`, as `tbak1.AGENT.SEED` (SEED: 32 bytes, base64url). The broker holds only
 * the public key (src/identity/agent-keys.ts).
 *
 * A proof is a compact JWS (EdDSA, `typ: agent-proof+jwt`, shaped like DPoP, RFC 9449) over
 * `{sub: AGENT, htm: METHOD, htu: URL, iat, exp, jti}`: it names the agent, binds the request's
 * method and URL, lives at most MAX_PROOF_SECONDS and is accepted once. Sent as
 * `Authorization: AgentProof JWS`. Nothing here but node:crypto, so the exec plugin can load it cheaply.
 */
import { createPrivateKey, createPublicKey, randomBytes, sign, verify, type KeyObject } from 'node:crypto';

export const AGENT_KEY_PREFIX = 'tbak1';
export const PROOF_SCHEME = 'AgentProof';
export const PROOF_TYPE = 'agent-proof+jwt';
/** A proof's whole life, `exp - iat`, at most. */
export const MAX_PROOF_SECONDS = 60;
/** How far in the future a proof's `iat` may be (the agent's clock ahead of the broker's). */
export const PROOF_SKEW_SECONDS = 5;

// DER of a PKCS#8 Ed25519 private key, up to the 32-byte seed.
const PKCS8_ED25519_PREFIX = Buffer.from('302e020100300506032b657004220420', 'hex');
// DER of an SPKI Ed25519 public key, up to the 32-byte key.
const SPKI_ED25519_PREFIX = Buffer.from('302a300506032b6570032100', 'hex');

export interface AgentKey {
  agent: string;
  privateKey: KeyObject;
  /** The raw 32-byte public key, base64url: what the broker stores. */
  publicKey: string;
}

/**
 * A new key pair: its public key (what enrolment sends), and its text form once the broker has said
 * which agent it is for (`forAgent`: for the keychain or BROKER_AGENT_KEY).
 */
export function newAgentKey(): { publicKey: string; forAgent(agent: string): string } {
  const seed = randomBytes(32).toString('base64url');
  const { publicKey } = parseAgentKey(`${AGENT_KEY_PREFIX}.pending.${seed}`);
  return { publicKey, forAgent: (agent) => `${AGENT_KEY_PREFIX}.${agent}.${seed}` };
}

/** Reads `tbak1.AGENT.SEED`; throws an Error naming what is wrong (never quoting the value). */
export function parseAgentKey(text: string): AgentKey {
  const parts = text.trim().split('.');
  if (parts.length !== 3 || parts[0] !== AGENT_KEY_PREFIX || !parts[1]) throw new Error(`an agent key has the form ${AGENT_KEY_PREFIX}.AGENT.SEED`);
  const seed = Buffer.from(parts[2]!, 'base64url');
  if (seed.length !== 32) throw new Error('an agent key\'s seed is 32 bytes, base64url');
  const privateKey = createPrivateKey({ key: Buffer.concat([PKCS8_ED25519_PREFIX, seed]), format: 'der', type: 'pkcs8' });
  seed.fill(0);
  const spki = createPublicKey(privateKey).export({ format: 'der', type: 'spki' });
  return { agent: parts[1], privateKey, publicKey: spki.subarray(SPKI_ED25519_PREFIX.length).toString('base64url') };
}

/** The public key object of a stored raw key (base64url, 32 bytes); undefined when malformed. */
export function publicKeyOf(raw: string): KeyObject | undefined {
  const bytes = Buffer.from(raw, 'base64url');
  if (bytes.length !== 32) return undefined;
  try {
    return createPublicKey({ key: Buffer.concat([SPKI_ED25519_PREFIX, bytes]), format: 'der', type: 'spki' });
  } catch {
    return undefined;
  }
}

export interface ProofClaims {
  sub: string;
  htm: string;
  htu: string;
  iat: number;
  exp: number;
  jti: string;
}

/** A proof for one request, `Authorization` header value included: `AgentProof JWS`. */
export function proofHeader(key: AgentKey, method: string, url: string, now = Date.now(), lifeSeconds = 30): string {
  const iat = Math.floor(now / 1000);
  const claims: ProofClaims = { sub: key.agent, htm: method.toUpperCase(), htu: url, iat, exp: iat + Math.min(lifeSeconds, MAX_PROOF_SECONDS), jti: randomBytes(16).toString('base64url') };
  const input = `${b64(JSON.stringify({ alg: 'EdDSA', typ: PROOF_TYPE }))}.${b64(JSON.stringify(claims))}`;
  return `${PROOF_SCHEME} ${input}.${sign(null, Buffer.from(input), key.privateKey).toString('base64url')}`;
}

const b64 = (s: string) => Buffer.from(s).toString('base64url');

/** A proof taken apart, not yet verified: its claims are the caller's word until `verifyProofSignature`. */
export interface ParsedProof {
  claims: ProofClaims;
  signingInput: Buffer;
  signature: Buffer;
}

/** The proof in an Authorization header value, or undefined when the header is not `AgentProof ...`; throws an Error when it is one but malformed. */
export function parseProofHeader(header: string | undefined): ParsedProof | undefined {
  if (!header || !header.startsWith(`${PROOF_SCHEME} `)) return undefined;
  const jws = header.slice(PROOF_SCHEME.length + 1).trim();
  const parts = jws.split('.');
  if (parts.length !== 3 || jws.length > 4096) throw new Error('the proof is not a compact JWS');
  let head: unknown;
  let claims: unknown;
  try {
    head = JSON.parse(Buffer.from(parts[0]!, 'base64url').toString());
    claims = JSON.parse(Buffer.from(parts[1]!, 'base64url').toString());
  } catch {
    throw new Error('the proof is not a compact JWS');
  }
  const h = head as Record<string, unknown>;
  if (h['alg'] !== 'EdDSA' || h['typ'] !== PROOF_TYPE || Object.keys(h).length !== 2) throw new Error(`the proof's header must be exactly {"alg":"EdDSA","typ":"${PROOF_TYPE}"}`);
  const c = claims as Record<string, unknown>;
  for (const k of ['sub', 'htm', 'htu', 'jti'] as const) if (typeof c[k] !== 'string' || c[k] === '') throw new Error(`the proof's "${k}" claim is missing`);
  for (const k of ['iat', 'exp'] as const) if (!Number.isInteger(c[k])) throw new Error(`the proof's "${k}" claim is missing`);
  return { claims: c as unknown as ProofClaims, signingInput: Buffer.from(`${parts[0]}.${parts[1]}`), signature: Buffer.from(parts[2]!, 'base64url') };
}

export function verifyProofSignature(proof: ParsedProof, key: KeyObject): boolean {
  try {
    return verify(null, proof.signingInput, key, proof.signature);
  } catch {
    return false;
  }
}
