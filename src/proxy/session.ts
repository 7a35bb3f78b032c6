/**
 * Proxy session tokens: what the exec plugin hands kubectl in proxy mode instead of the task's
 * TokenRequest token. A short Ed25519 JWS (jose), signed with the broker's key (the one every replica
 * shares, src/state-signature.ts), naming the task, its agent, a unique session id and the proxy as
 * audience, valid until the task's end and at most 10 minutes. The API server has never seen the key:
 * it refuses the token (401), so a session token is worth nothing away from the proxy.
 *
 * The proxy checks the signature, audience and expiry once per token (the verdict is remembered, in a
 * bounded map) and the task's state on every request (src/proxy/server.ts).
 */
import { randomUUID } from 'node:crypto';
import { SignJWT, decodeProtectedHeader, jwtVerify } from 'jose';
import { BrokerError } from '../errors.ts';
import type { StateSigner } from '../state-signature.ts';

export const SESSION_TYP = 'task-broker-session+jwt';
export const SESSION_ISSUER = 'task-broker';
export const MAX_SESSION_SECONDS = 600;
/** A kid the broker does not know re-reads the key Secret at most this often. */
const UNKNOWN_KID_REFRESH_MS = 5_000;
const MAX_REMEMBERED = 10_000;

export interface SessionClaims {
  /** Task id. */
  task: string;
  agent: string;
  /** The caller's proven subject. */
  sub: string;
  /** Session id (the JWT ID). */
  sid: string;
  /** Expiry, seconds since the epoch. */
  exp: number;
}

export interface IssuedSession {
  token: string;
  sid: string;
  expiresAt: Date;
}

export class SessionTokens {
  readonly #signer: StateSigner;
  readonly #now: () => number;
  /** The proxy's public URL: set once it listens (before the broker serves), then fixed. */
  audience: string;
  readonly #verified = new Map<string, SessionClaims>();
  #lastRefresh = 0;

  constructor(signer: StateSigner, audience: string, options: { now?: () => number } = {}) {
    this.#signer = signer;
    this.audience = audience;
    this.#now = options.now ?? Date.now;
  }

  async issue(s: { task: string; agent: string; subject: string; taskExpiresAt: Date }): Promise<IssuedSession> {
    const now = this.#now();
    const exp = Math.floor(Math.min(s.taskExpiresAt.getTime(), now + MAX_SESSION_SECONDS * 1000) / 1000);
    if (exp * 1000 <= now) throw new BrokerError('no_active_task', `task "${s.task}" has expired`);
    const { kid, privateKey } = await this.#signer.signingKey();
    const sid = randomUUID();
    const token = await new SignJWT({ task: s.task, agent: s.agent })
      .setProtectedHeader({ alg: 'EdDSA', kid, typ: SESSION_TYP })
      .setIssuer(SESSION_ISSUER)
      .setSubject(s.subject)
      .setAudience(this.audience)
      .setIssuedAt(Math.floor(now / 1000))
      .setExpirationTime(exp)
      .setJti(sid)
      .sign(privateKey);
    return { token, sid, expiresAt: new Date(exp * 1000) };
  }

  /** The remembered claims of a token verified before and not expired yet (no promise); else undefined: verify() it. */
  known(token: string): SessionClaims | undefined {
    const known = this.#verified.get(token);
    return known && known.exp > this.#now() / 1000 ? known : undefined;
  }

  /** The claims of a valid session token; throws BrokerError `unauthenticated` naming why not. */
  async verify(token: string): Promise<SessionClaims> {
    const nowS = this.#now() / 1000;
    const known = this.#verified.get(token);
    if (known) {
      if (known.exp > nowS) return known;
      this.#verified.delete(token);
      throw new BrokerError('unauthenticated', 'the session token has expired');
    }
    let kid: string | undefined;
    try {
      const header = decodeProtectedHeader(token);
      if (header.typ !== SESSION_TYP || header.alg !== 'EdDSA' || typeof header.kid !== 'string') throw new Error('not a session token');
      kid = header.kid;
    } catch {
      throw new BrokerError('unauthenticated', 'not a task-broker session token (the proxy takes only what `broker credential --via proxy` hands out)');
    }
    const refresh = this.#now() - this.#lastRefresh > UNKNOWN_KID_REFRESH_MS;
    const key = await this.#signer.publicKey(kid, refresh);
    if (refresh) this.#lastRefresh = this.#now();
    if (!key) throw new BrokerError('unauthenticated', 'the session token is signed with a key this broker does not have');
    let claims: SessionClaims;
    try {
      const { payload } = await jwtVerify(token, key, {
        issuer: SESSION_ISSUER,
        audience: this.audience,
        algorithms: ['EdDSA'],
        typ: SESSION_TYP,
        currentDate: new Date(this.#now()),
        requiredClaims: ['exp', 'jti', 'sub'],
      });
      if (typeof payload['task'] !== 'string' || typeof payload['agent'] !== 'string') throw new Error('claims "task" and "agent" are missing');
      claims = { task: payload['task'], agent: payload['agent'], sub: payload.sub!, sid: payload.jti!, exp: payload.exp! };
    } catch (err) {
      const code = (err as { code?: string }).code;
      const why =
        code === 'ERR_JWT_EXPIRED'
          ? 'the session token has expired'
          : code === 'ERR_JWT_CLAIM_VALIDATION_FAILED'
            ? `the session token is not for this proxy (${(err as Error).message})`
            : 'the session token\'s signature or form is not valid';
      throw new BrokerError('unauthenticated', why);
    }
    if (this.#verified.size >= MAX_REMEMBERED) this.#verified.delete(this.#verified.keys().next().value!);
    this.#verified.set(token, claims);
    return claims;
  }

  /** Forgets every remembered verdict of a task's tokens (its end). */
  forgetTask(task: string): void {
    for (const [token, c] of this.#verified) if (c.task === task) this.#verified.delete(token);
  }
}
