/**
 * Approval tokens: Ed25519 JWS (jose) signed by the broker when a request has its approvals. The key
 * lives in a Secret in the broker's namespace so every replica signs and verifies with the same one.
 * It is read on each use (approvals are rare), so replacing the Secret rotates the key at once; the
 * `previous` key keeps verifying tokens signed just before a rotation.
 */
import { randomUUID } from 'node:crypto';
import { SignJWT, calculateJwkThumbprint, exportJWK, generateKeyPair, importJWK, jwtVerify, type JWK, type JWTPayload } from 'jose';
import { BrokerError } from '../errors.ts';
import { clusterError, isConflict, isNotFound, type KubeApis } from '../kube/config.ts';
import { LABEL, MANAGED_BY } from '../tasks/model.ts';

export const KEY_SECRET = 'task-broker-approval-key';
export const ISSUER = 'task-broker';
/** Approval tokens live at most this long. */
export const MAX_TOKEN_SECONDS = 15 * 60;

export interface ApprovalClaims {
  /** Request id. */
  rid: string;
  /** The requester's proven subject, and its agent. */
  sub: string;
  agent: string;
  template: string;
  namespace: string;
  /** Task name. */
  name: string;
  /** Granted TTL, seconds. */
  ttl: number;
  rulesHash: string;
  jti: string;
  exp: number;
}

export interface KeySet {
  current: JWK & { kid: string };
  previous?: JWK & { kid: string };
}

export class ApprovalKeys {
  readonly #kube: KubeApis;
  readonly #namespace: string;

  constructor(kube: KubeApis, namespace: string) {
    this.#kube = kube;
    this.#namespace = namespace;
  }

  async #read(): Promise<KeySet | undefined> {
    try {
      const secret = await this.#kube.core.readNamespacedSecret({ name: KEY_SECRET, namespace: this.#namespace });
      if (secret.type !== 'Opaque') {
        throw new BrokerError('internal', `Secret ${this.#namespace}/${KEY_SECRET} is not the broker's signing key (type ${secret.type ?? 'none'}): an administrator must remove it`);
      }
      const raw = secret.data?.['keys.json'];
      return raw ? (JSON.parse(Buffer.from(raw, 'base64').toString('utf8')) as KeySet) : undefined;
    } catch (err) {
      if (isNotFound(err)) return undefined;
      if (err instanceof BrokerError) throw err;
      throw clusterError('reading the approval signing key', err);
    }
  }

  /** The signing key, created on first use (two replicas racing: the loser reads the winner's). */
  async signingKey(): Promise<KeySet['current']> {
    return (await this.keySet()).current;
  }

  /** The whole key set, in one read: the signing key (created on first use) and `previous`, if any. */
  async keySet(): Promise<KeySet> {
    const existing = await this.#read();
    if (existing) return existing;
    const { privateKey } = await generateKeyPair('EdDSA', { crv: 'Ed25519', extractable: true });
    const jwk = await exportJWK(privateKey);
    const current = { ...jwk, kid: await calculateJwkThumbprint(jwk) };
    try {
      await this.#kube.core.createNamespacedSecret({
        namespace: this.#namespace,
        body: {
          metadata: { name: KEY_SECRET, labels: { [LABEL.managedBy]: MANAGED_BY, [LABEL.kind]: 'approval-key' } },
          type: 'Opaque',
          data: { 'keys.json': Buffer.from(JSON.stringify({ current } satisfies KeySet)).toString('base64') },
        },
      });
      return { current };
    } catch (err) {
      if (!isConflict(err)) throw clusterError('creating the approval signing key', err);
      const winner = await this.#read();
      if (!winner) throw new BrokerError('internal', 'the approval signing key vanished while being created');
      return winner;
    }
  }

  /** Public keys that verify tokens: current and previous. */
  async verificationKeys(): Promise<Array<JWK & { kid: string }>> {
    const set = await this.#read();
    return set ? publicKeysOf(set) : [];
  }
}

/** The public halves of a key set: current and previous. */
export function publicKeysOf(set: KeySet): Array<JWK & { kid: string }> {
  return [set.current, ...(set.previous ? [set.previous] : [])].map(({ d: _d, ...pub }) => pub as JWK & { kid: string });
}

export async function signApproval(keys: ApprovalKeys, claims: Omit<ApprovalClaims, 'jti' | 'exp'>, seconds: number): Promise<{ token: string; jti: string; exp: number }> {
  const jwk = await keys.signingKey();
  const key = await importJWK(jwk, 'EdDSA');
  const jti = randomUUID();
  const exp = Math.floor(Date.now() / 1000) + Math.min(seconds, MAX_TOKEN_SECONDS);
  const token = await new SignJWT({ ...claims } as unknown as JWTPayload)
    .setProtectedHeader({ alg: 'EdDSA', kid: jwk.kid, typ: 'task-broker-approval+jwt' })
    .setIssuer(ISSUER)
    .setIssuedAt()
    .setExpirationTime(exp)
    .setJti(jti)
    .sign(key);
  return { token, jti, exp };
}

/** Verifies signature, issuer and expiry; the caller checks the claims against the request. */
export async function verifyApproval(keys: ApprovalKeys, token: string): Promise<ApprovalClaims> {
  const candidates = await keys.verificationKeys();
  try {
    const { payload } = await jwtVerify(
      token,
      async (header) => {
        const jwk = candidates.find((k) => k.kid === header.kid);
        if (!jwk) throw new Error('signed with a key this broker does not have');
        return importJWK(jwk, 'EdDSA');
      },
      { issuer: ISSUER, algorithms: ['EdDSA'], typ: 'task-broker-approval+jwt' },
    );
    const c = payload as unknown as ApprovalClaims;
    for (const field of ['rid', 'sub', 'agent', 'template', 'namespace', 'name', 'rulesHash', 'jti'] as const) {
      if (typeof c[field] !== 'string') throw new Error(`claim "${field}" is missing`);
    }
    if (typeof c.ttl !== 'number') throw new Error('claim "ttl" is missing');
    return c;
  } catch (err) {
    const why = (err as { code?: string }).code === 'ERR_JWT_EXPIRED' ? 'the approval token has expired' : `the approval token is not valid: ${(err as Error).message}`;
    throw new BrokerError('approval_invalid', why, { field: 'approvalToken', cause: err });
  }
}
