/**
 * Signatures on the state the broker keeps in the cluster and trusts when it reads it back (DESIGN.md
 * §4): a task's grant and expiry, an approval request's decisions and state. Whoever can write those
 * objects (a careless RBAC grant, a stolen admin token) cannot forge what the broker acts on: a record
 * whose signature fails is treated as absent, and recorded.
 *
 * Ed25519 with the broker's approval key (src/approvals/token.ts, a Secret in the broker's own
 * namespace), over `task-broker/KIND/v1\n` + canonical JSON of the facts. Signing reads the key
 * Secret every time, so nothing that acts is signed with a key an operator has just rotated out. One
 * exception, for a record created pending and made to act by a later write (a task record:
 * startPendingSigning): it is signed at once with the key held (read at most the cache window ago),
 * and the key Secret is read afresh meanwhile; before the activating write that read is awaited and,
 * when the current key differs from the one that signed, the record is signed again and the new
 * signature goes in the activating write. So what acts always carries a signature by the key current
 * at activation, read afresh; only a pending record (never acts, rolled back on failure, swept if
 * orphaned) may carry one by a key read up to the cache window earlier. Verification uses the key set cached for a few
 * seconds, and a signature by a key not in the cache refreshes it once, so a rotation by another
 * replica is picked up on first use. Removing the `previous` key invalidates whatever it signed
 * (docs/approvals.md, "The signing key and its rotation").
 */
import { createPrivateKey, createPublicKey, sign, verify, type KeyObject } from 'node:crypto';
import type { JWK } from 'jose';
import { publicKeysOf, type ApprovalKeys } from './approvals/token.ts';

/** The annotation that carries a signature: `KID.SIGNATURE` (base64url). */
export const SIGNATURE_ANNOTATION = 'task-broker.dev/signature';

export type Facts = { [key: string]: string | number | boolean | null | Facts | Facts[] | string[] };

/** StateSigner.startPendingSigning's two steps. */
export interface PendingSigning {
  /** Starts the fresh read of the key Secret, if it has not started. */
  read(): void;
  /** The signature for the pending record: by the key held, or (none held) by the fresh read's. */
  sign(facts: Facts): Promise<string>;
  /** After sign(): the fresh read awaited; a signature by the current key when it differs from the one that signed, else undefined. */
  confirm(): Promise<string | undefined>;
}

interface KeyCache {
  kid: string;
  privateKey: KeyObject;
  publicKeys: Map<string, KeyObject>;
  until: number;
}

export class StateSigner {
  readonly #keys: ApprovalKeys;
  readonly #cacheMs: number;
  readonly #now: () => number;
  #cache: KeyCache | undefined;
  #loading: Promise<KeyCache> | undefined;

  constructor(keys: ApprovalKeys, options: { cacheMs?: number; now?: () => number } = {}) {
    this.#keys = keys;
    this.#cacheMs = options.cacheMs ?? 5_000;
    this.#now = options.now ?? Date.now;
  }

  /** A signature by the current key, read afresh: one read of the key Secret per signature, never a cached key. */
  async sign(kind: string, facts: Facts): Promise<string> {
    return signWith(kind, facts, await this.#current(true));
  }

  /**
   * A signature for a record that is created pending and acts only once a later write activates it
   * (a task record), in steps that take the key Secret's read off the path to the create:
   * - with no key held (none yet, or read more than `cacheMs` ago), the fresh read of the key Secret
   *   starts now, as sign()'s; with one held, when the caller says (`read()`), at the latest
   *   at `confirm()`;
   * - `sign(facts)` signs with the key held, when one is and it is within the cache window (read at
   *   most `cacheMs` ago, by a signature or a verification); with none, it waits for the fresh read;
   * - `confirm()`, before the activating write, waits for the fresh read: undefined when the key that
   *   signed is the current one (same kid, same key), else the same facts signed with the current key,
   *   for the activating write to carry. A failed read rejects: the record must not be activated.
   */
  startPendingSigning(kind: string): PendingSigning {
    let fresh: Promise<KeyCache> | undefined;
    const read = (): Promise<KeyCache> => {
      if (!fresh) {
        fresh = this.#current(true);
        fresh.catch(() => undefined); // observed by confirm(), or by sign() when no key is held
      }
      return fresh;
    };
    const held = (): KeyCache | undefined => (this.#cache && this.#cache.until > this.#now() ? this.#cache : undefined);
    if (!held()) void read();
    let signed: { keys: KeyCache; facts: Facts } | undefined;
    return {
      read: () => void read(),
      sign: async (facts) => {
        const keys = held() ?? (await read());
        signed = { keys, facts };
        return signWith(kind, facts, keys);
      },
      confirm: async () => {
        const keys = await read();
        if (!signed) throw new Error('StateSigner: confirm() before sign()');
        if (keys === signed.keys || (keys.kid === signed.keys.kid && keys.privateKey.equals(signed.keys.privateKey))) return undefined;
        return signWith(kind, signed.facts, keys);
      },
    };
  }

  /** Whether `signature` is this broker's over exactly these facts. Never throws for a bad signature. */
  async verify(kind: string, facts: Facts, signature: string | undefined): Promise<boolean> {
    if (!signature) return false;
    const dot = signature.indexOf('.');
    if (dot <= 0) return false;
    const kid = signature.slice(0, dot);
    const sig = Buffer.from(signature.slice(dot + 1), 'base64url');
    let keys = await this.#current();
    if (!keys.publicKeys.has(kid)) keys = await this.#current(true);
    const key = keys.publicKeys.get(kid);
    if (!key) return false;
    try {
      return verify(null, payload(kind, facts), key, sig);
    } catch {
      return false;
    }
  }

  /** The current signing key, read afresh (as sign() does), for other signed things (proxy session tokens). */
  async signingKey(): Promise<{ kid: string; privateKey: KeyObject }> {
    const keys = await this.#current(true);
    return { kid: keys.kid, privateKey: keys.privateKey };
  }

  /**
   * The public key `kid` (current or previous), from the cache; re-read once when it is not there and
   * `refresh` allows it (the caller limits how often a stranger's made-up kid can cost a read).
   */
  async publicKey(kid: string, refresh = true): Promise<KeyObject | undefined> {
    let keys = await this.#current();
    if (!keys.publicKeys.has(kid) && refresh) keys = await this.#current(true);
    return keys.publicKeys.get(kid);
  }

  #current(refresh = false): Promise<KeyCache> {
    if (!refresh && this.#cache && this.#cache.until > this.#now()) return Promise.resolve(this.#cache);
    this.#loading ??= this.#load().finally(() => (this.#loading = undefined));
    return this.#loading;
  }

  async #load(): Promise<KeyCache> {
    const set = await this.#keys.keySet(); // one read of the key Secret
    const current = set.current;
    const publicKeys = new Map<string, KeyObject>();
    for (const jwk of publicKeysOf(set)) publicKeys.set(jwk.kid, createPublicKey({ key: jwk as JWK & { kty: string }, format: 'jwk' }));
    const cache: KeyCache = {
      kid: current.kid,
      privateKey: createPrivateKey({ key: current as JWK & { kty: string }, format: 'jwk' }),
      publicKeys,
      until: this.#now() + this.#cacheMs,
    };
    this.#cache = cache;
    return cache;
  }
}

function signWith(kind: string, facts: Facts, keys: KeyCache): string {
  return `${keys.kid}.${sign(null, payload(kind, facts), keys.privateKey).toString('base64url')}`;
}

function payload(kind: string, facts: Facts): Buffer {
  return Buffer.from(`task-broker/${kind}/v1\n${canonicalJson(facts)}`, 'utf8');
}

/** JSON with object keys sorted at every level, undefined values left out. */
export function canonicalJson(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(',')}]`;
  if (value && typeof value === 'object') {
    const entries = Object.entries(value as Record<string, unknown>)
      .filter(([, v]) => v !== undefined)
      .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
    return `{${entries.map(([k, v]) => `${JSON.stringify(k)}:${canonicalJson(v)}`).join(',')}}`;
  }
  return JSON.stringify(value);
}
