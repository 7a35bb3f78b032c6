/**
 * The console's browser sessions, kept server-side in this broker process's memory: the cookie holds
 * only a random id (256 bits), so signing out (or a restart) ends a session at once, and a copied
 * cookie is worthless after that. Each session has its own CSRF token. Sessions are short-lived
 * (absolute lifetime, no sliding renewal) and capped in number, oldest dropped first.
 *
 * In memory means per replica: several replicas behind one address need session affinity for the
 * console (docs/console.md). Sign-ins in progress (PKCE verifier, state) are kept the same way, bound
 * to the browser by a cookie of their own.
 */
import { randomBytes, timingSafeEqual } from 'node:crypto';
import type { Caller } from '../identity/types.ts';

/** How long a console session lasts from sign-in. */
export const SESSION_SECONDS = 15 * 60;
/** How long a sign-in at the identity provider may take. */
export const LOGIN_SECONDS = 10 * 60;

export interface Session {
  id: string;
  caller: Caller;
  csrf: string;
  issuer: string;
  createdAt: number;
  expiresAt: number;
}

export interface PendingLogin {
  id: string;
  issuer: string;
  clientId: string;
  verifier: string;
  state: string;
  nonce: string;
  redirectUri: string;
  expiresAt: number;
}

const token = () => randomBytes(32).toString('base64url');

export function sameToken(a: string | undefined, b: string): boolean {
  if (typeof a !== 'string') return false;
  const x = Buffer.from(a);
  const y = Buffer.from(b);
  return x.length === y.length && timingSafeEqual(x, y);
}

/** A bounded map whose entries expire. */
class Expiring<T extends { id: string; expiresAt: number }> {
  readonly #items = new Map<string, T>();
  readonly #max: number;
  readonly #now: () => number;

  constructor(max: number, now: () => number) {
    this.#max = max;
    this.#now = now;
  }

  add(item: T): void {
    this.#prune();
    while (this.#items.size >= this.#max) this.#items.delete(this.#items.keys().next().value!);
    this.#items.set(item.id, item);
  }

  get(id: string | undefined): T | undefined {
    if (typeof id !== 'string' || id.length > 128) return undefined;
    const item = this.#items.get(id);
    if (item && item.expiresAt <= this.#now()) {
      this.#items.delete(id);
      return undefined;
    }
    return item;
  }

  delete(id: string): boolean {
    return this.#items.delete(id);
  }

  #prune(): void {
    const now = this.#now();
    for (const [id, item] of this.#items) if (item.expiresAt <= now) this.#items.delete(id);
  }
}

export class SessionStore {
  readonly #sessions: Expiring<Session>;
  readonly #logins: Expiring<PendingLogin>;
  readonly #now: () => number;
  readonly #ended = new Set<(id: string) => void>();

  constructor(options: { maxSessions?: number; maxLogins?: number; now?: () => number } = {}) {
    this.#now = options.now ?? Date.now;
    this.#sessions = new Expiring(options.maxSessions ?? 10_000, this.#now);
    this.#logins = new Expiring(options.maxLogins ?? 10_000, this.#now);
  }

  create(caller: Caller, issuer: string, seconds = SESSION_SECONDS): Session {
    const now = this.#now();
    const session: Session = { id: token(), caller, csrf: token(), issuer, createdAt: now, expiresAt: now + seconds * 1000 };
    this.#sessions.add(session);
    return session;
  }

  get(id: string | undefined): Session | undefined {
    return this.#sessions.get(id);
  }

  end(id: string): void {
    if (this.#sessions.delete(id)) for (const cb of this.#ended) cb(id);
  }

  /** Called with a session's id when it is signed out (live update streams close). */
  onEnded(cb: (id: string) => void): () => void {
    this.#ended.add(cb);
    return () => this.#ended.delete(cb);
  }

  startLogin(login: Omit<PendingLogin, 'id' | 'expiresAt'>): PendingLogin {
    const pending: PendingLogin = { ...login, id: token(), expiresAt: this.#now() + LOGIN_SECONDS * 1000 };
    this.#logins.add(pending);
    return pending;
  }

  /** The sign-in in progress `id` names; used once. */
  takeLogin(id: string | undefined): PendingLogin | undefined {
    const login = this.#logins.get(id);
    if (login) this.#logins.delete(login.id);
    return login;
  }
}
