/**
 * Console sessions shared by every broker replica on one PostgreSQL audit store (src/console/db.ts
 * makes the tables): a sign-in at one replica holds at all of them, and a sign-out at any ends it at
 * all of them at once.
 *
 * - The cookie holds a random id (256 bits), as with the in-memory sessions; the database holds only
 *   its SHA-256, so a copy of the table signs nobody in. A session row: that hash, the person as the
 *   broker's authenticator took them at sign-in, the issuer, the SHA-256 of the CSRF token, expiry
 *   (the database's clock: 15 minutes from sign-in, no renewal).
 * - The CSRF token is derived from the cookie's id (HMAC-SHA256 keyed by the id): every replica that
 *   gets the cookie computes the same token, and the token does not reveal the id.
 * - Sign-out inserts a row into console_signouts (the brokers' role may only SELECT and INSERT).
 * - No cache: every console request reads its session in one query (its row, unexpired, and no
 *   sign-out row), so a sign-out at one replica refuses the cookie at the next request to any other.
 *   Live update streams at other replicas end within one look (1 s by default): each look asks
 *   which of its streams' sessions were signed out.
 * - Fails closed: the database away, console requests get 503 (audit_unavailable), never a guess.
 * - Sign-ins in progress: the login cookie itself carries the PKCE verifier, state and nonce (HttpOnly,
 *   sent only to /ui/callback, Secure with TLS, 10 minutes), so the identity provider's redirect may
 *   come back to any replica; the callback takes only an issuer and client the policy names. The
 *   cookie is signed with the brokers' shared state key (src/state-signature.ts), so a login cookie
 *   planted in a browser (a sibling host can set cookies for this one) is refused: only a sign-in
 *   this console started can finish.
 */
import { createHash, createHmac, randomBytes } from 'node:crypto';
import type { Caller } from '../identity/types.ts';
import type { Facts } from '../state-signature.ts';
import type { ConsoleDatabase } from './db.ts';
import { PRUNE_SESSIONS, SESSIONS_TABLE, SIGNOUTS_TABLE } from './migration.ts';
import { LOGIN_SECONDS, SESSION_SECONDS, type PendingLogin, type Session } from './session.ts';

/** What the console needs of a session store: the in-memory SessionStore (session.ts) or SharedSessions. */
export interface ConsoleSessions {
  get(id: string | undefined): Session | undefined | Promise<Session | undefined>;
  create(caller: Caller, issuer: string): Session | Promise<Session>;
  end(id: string): void | Promise<void>;
  onEnded(cb: (id: string) => void): () => void;
  /** Of these sessions' ids, those signed out elsewhere (another replica). */
  signedOutElsewhere?(ids: string[]): Promise<Set<string>>;
  startLogin(login: Omit<PendingLogin, 'id' | 'expiresAt'>): PendingLogin | Promise<PendingLogin>;
  takeLogin(id: string | undefined): PendingLogin | undefined | Promise<PendingLogin | undefined>;
  close?(): void;
}

const PRUNE_EVERY_MS = 10 * 60 * 1000;
const ID_FORMAT = /^[A-Za-z0-9_-]{43}$/;

const sha256 = (s: string) => createHash('sha256').update(s).digest();
/** The CSRF token of the session whose cookie holds `id`. */
export function csrfOf(id: string): string {
  return createHmac('sha256', id).update('task-broker console csrf').digest('base64url');
}

/** Signs and checks the login cookie: the brokers' StateSigner (every replica holds the same key). */
export interface LoginSigner {
  sign(kind: string, facts: Facts): Promise<string>;
  verify(kind: string, facts: Facts, signature: string | undefined): Promise<boolean>;
}
const LOGIN_KIND = 'console-login';

export class SharedSessions implements ConsoleSessions {
  readonly #db: ConsoleDatabase;
  readonly #signer: LoginSigner;
  readonly #ended = new Set<(id: string) => void>();
  #timer: NodeJS.Timeout | undefined;

  constructor(db: ConsoleDatabase, signer: LoginSigner) {
    this.#db = db;
    this.#signer = signer;
    this.#timer = setInterval(() => void this.#db.query(`SELECT ${PRUNE_SESSIONS}`).catch(() => undefined), PRUNE_EVERY_MS).unref();
  }

  async create(caller: Caller, issuer: string): Promise<Session> {
    const id = randomBytes(32).toString('base64url');
    const csrf = csrfOf(id);
    const r = await this.#db.query<{ created: string; expires: string }>(
      `INSERT INTO ${SESSIONS_TABLE} (id, caller, issuer, csrf, expires) VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))
       RETURNING (extract(epoch FROM created) * 1000)::bigint AS created, (extract(epoch FROM expires) * 1000)::bigint AS expires`,
      [sha256(id), JSON.stringify(caller), issuer, sha256(csrf), SESSION_SECONDS],
    );
    const row = r.rows[0]!;
    return { id, caller, csrf, issuer, createdAt: Number(row.created), expiresAt: Number(row.expires) };
  }

  async get(id: string | undefined): Promise<Session | undefined> {
    if (typeof id !== 'string' || !ID_FORMAT.test(id)) return undefined;
    const hash = sha256(id);
    const r = await this.#db.query<{ caller: Caller; issuer: string; csrf: Buffer; created: string; expires: string }>(
      `SELECT caller, issuer, csrf, (extract(epoch FROM created) * 1000)::bigint AS created, (extract(epoch FROM expires) * 1000)::bigint AS expires
       FROM ${SESSIONS_TABLE} s WHERE id = $1 AND expires > now() AND NOT EXISTS (SELECT 1 FROM ${SIGNOUTS_TABLE} o WHERE o.id = $1)`,
      [hash],
    );
    const row = r.rows[0];
    if (!row) return undefined;
    const csrf = csrfOf(id);
    if (!sha256(csrf).equals(row.csrf)) return undefined;
    return { id, caller: row.caller, csrf, issuer: row.issuer, createdAt: Number(row.created), expiresAt: Number(row.expires) };
  }

  /** Recorded in the database before it resolves: then no replica takes the cookie any more. */
  async end(id: string): Promise<void> {
    if (!ID_FORMAT.test(id)) return;
    await this.#db.query(
      `INSERT INTO ${SIGNOUTS_TABLE} (id, expires) SELECT id, expires FROM ${SESSIONS_TABLE} WHERE id = $1 ON CONFLICT (id) DO NOTHING`,
      [sha256(id)],
    );
    for (const cb of this.#ended) cb(id);
  }

  onEnded(cb: (id: string) => void): () => void {
    this.#ended.add(cb);
    return () => this.#ended.delete(cb);
  }

  async signedOutElsewhere(ids: string[]): Promise<Set<string>> {
    if (ids.length === 0) return new Set();
    const byHash = new Map(ids.map((id) => [sha256(id).toString('hex'), id]));
    const r = await this.#db.query<{ id: Buffer }>(`SELECT id FROM ${SIGNOUTS_TABLE} WHERE id = ANY($1::bytea[])`, [[...byHash.keys()].map((h) => Buffer.from(h, 'hex'))]);
    return new Set(r.rows.map((row) => byHash.get(row.id.toString('hex'))!).filter(Boolean));
  }

  /** The sign-in's state travels in its own cookie (any replica may get the identity provider's redirect). */
  async startLogin(login: Omit<PendingLogin, 'id' | 'expiresAt'>): Promise<PendingLogin> {
    const expiresAt = Date.now() + LOGIN_SECONDS * 1000;
    const facts = { ...login, expiresAt };
    // `BODY.KID.SIGNATURE`: base64url holds no dot.
    const id = `${Buffer.from(JSON.stringify(facts)).toString('base64url')}.${await this.#signer.sign(LOGIN_KIND, facts)}`;
    return { ...login, id, expiresAt };
  }

  async takeLogin(id: string | undefined): Promise<PendingLogin | undefined> {
    if (typeof id !== 'string' || id.length > 4096 || !/^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$/.test(id)) return undefined;
    const dot = id.indexOf('.');
    let v: Record<string, unknown>;
    try {
      v = JSON.parse(Buffer.from(id.slice(0, dot), 'base64url').toString('utf8')) as Record<string, unknown>;
    } catch {
      return undefined;
    }
    const keys = ['issuer', 'clientId', 'verifier', 'state', 'nonce', 'redirectUri'] as const;
    if (!v || typeof v !== 'object' || keys.some((k) => typeof v[k] !== 'string') || typeof v['expiresAt'] !== 'number') return undefined;
    if ((v['expiresAt'] as number) <= Date.now() || (v['expiresAt'] as number) > Date.now() + LOGIN_SECONDS * 1000) return undefined;
    const login = Object.fromEntries(keys.map((k) => [k, v[k] as string])) as Omit<PendingLogin, 'id' | 'expiresAt'>;
    if (!(await this.#signer.verify(LOGIN_KIND, { ...login, expiresAt: v['expiresAt'] as number }, id.slice(dot + 1)))) return undefined;
    return { ...login, id, expiresAt: v['expiresAt'] as number };
  }

  close(): void {
    clearInterval(this.#timer);
    this.#timer = undefined;
  }
}
