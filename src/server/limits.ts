/**
 * Limits before work (DESIGN.md section 1, property 7): whoever reaches the broker, identified or not,
 * cannot stop it, exhaust it or grow its log faster than a bounded rate.
 *
 * - Per source address, before anything else: a request budget (every route, /healthz included), and
 *   a budget of failed authentications checked before any authentication work, so a source that has
 *   spent it is refused 429 without a TokenReview.
 * - Per identity, after authentication: a request budget keyed on the caller's principal (the agent
 *   or person behind it), so a second identity does not double a budget.
 * - For the whole broker: TokenReviews in flight at once, connections open at once (globally and per
 *   source), and timeouts on every connection (docs/operations.md).
 *
 * Request budgets are fixed windows counted in the in-memory store of @fastify/rate-limit: fastify's
 * own rate limiter, maintained with fastify; its store is an LRU map of bounded size (no unbounded
 * growth under a flood of addresses) and can read a budget without spending it (the failure budget
 * needs that).
 */
import { createRequire } from 'node:module';
import { isIPv6, type Server } from 'node:net';
import type { AuthenticationV1Api } from '@kubernetes/client-node';
import type { FastifyRequest } from 'fastify';
import { BrokerError, isBrokerError } from '../errors.ts';
import { formatDuration, parseDuration } from '../policy/duration.ts';
import { actorOf, type Caller } from '../identity/types.ts';
import type { AuthFailureLog, FailureCategory } from './auth-failures.ts';
import type { Metrics, RateLimitName } from './metrics.ts';

/** `max` requests per fixed window of `windowMs`. */
export interface Rate {
  max: number;
  windowMs: number;
}

export interface Limits {
  /** Every request from one source address, counted before authentication. undefined: no limit. */
  perSource: Rate | undefined;
  /** Failed authentications from one source address. undefined: no limit. */
  authFailures: Rate | undefined;
  /** Requests of one authenticated principal (agent or person). undefined: no limit. */
  perIdentity: Rate | undefined;
  /** TokenReviews in flight at once (0: no cap). */
  maxTokenReviews: number;
  /** How long a TokenReview waits for a free slot before its request is refused 429. */
  tokenReviewWaitMs: number;
  /** Connections open at once (server.maxConnections; 0: no cap). */
  maxConnections: number;
  /** Connections open at once from one source address (0: no cap). */
  maxConnectionsPerSource: number;
  /**
   * A connection with no byte in either direction for this long is closed (0: never): bounds a request
   * stuck in its handler. Silent and dripping clients are cut by the request and header timeouts.
   */
  connectionTimeoutMs: number;
  /** The whole request, headers and body, must arrive within this (0: no limit). */
  requestTimeoutMs: number;
  /** The headers must arrive within this (at most requestTimeoutMs). */
  headersTimeoutMs: number;
  /** An idle keep-alive connection is closed after this. */
  keepAliveTimeoutMs: number;
  /** auth.failed summaries are written once per this interval (src/server/auth-failures.ts). */
  failureLogIntervalMs: number;
  /** Distinct (source, category) records per interval; the rest are summed into one `other` record. */
  failureLogMaxSources: number;
}

export const DEFAULT_LIMITS: Readonly<Limits> = Object.freeze({
  perSource: { max: 1000, windowMs: 1000 },
  authFailures: { max: 10, windowMs: 10_000 },
  perIdentity: { max: 100, windowMs: 1000 },
  maxTokenReviews: 16,
  tokenReviewWaitMs: 1000,
  maxConnections: 4096,
  maxConnectionsPerSource: 64,
  connectionTimeoutMs: 30_000,
  requestTimeoutMs: 10_000,
  headersTimeoutMs: 10_000,
  keepAliveTimeoutMs: 5_000,
  failureLogIntervalMs: 10_000,
  failureLogMaxSources: 100,
});

/** Entries each rate-limit store keeps (LRU): the memory bound under a flood of addresses. */
const STORE_ENTRIES = 10_000;

/** A 429: `Retry-After` carries retryAfterSeconds. */
export class RateLimitedError extends BrokerError {
  override name = 'RateLimitedError';
  readonly retryAfterSeconds: number;

  constructor(message: string, retryAfterSeconds: number) {
    super('rate_limited', message);
    this.retryAfterSeconds = Math.max(1, Math.ceil(retryAfterSeconds));
  }
}

/** "100/1s", "10/10s", "600/1m" (requests per duration) → Rate; "off" → undefined. */
export function parseRate(text: string): Rate | undefined {
  if (text.trim() === 'off') return undefined;
  const m = /^\s*(\d+)\s*\/\s*(\S+)\s*$/.exec(text);
  if (!m || Number(m[1]) < 1) throw new BrokerError('invalid_argument', `${JSON.stringify(text)} is not a rate like "100/1s" or "10/10s" (at least 1 request per duration), or "off"`);
  return { max: Number(m[1]), windowMs: parseDuration(m[2]!) * 1000 };
}

export function formatRate(rate: Rate | undefined): string {
  return rate ? `${rate.max}/${formatDuration(rate.windowMs / 1000)}` : 'off';
}

/**
 * The key a source address is counted under: IPv4 as is, IPv6 by its /64 (one host is usually given a
 * whole /64, so counting single IPv6 addresses would let it pick a fresh one per request).
 */
export function sourceOf(address: string | undefined): string {
  if (!address) return 'unknown';
  if (!address.includes(':') || !isIPv6(address)) return address; // IPv4 (no colon) needs no parsing
  if (address.startsWith('::ffff:') && address.includes('.')) return address.slice(7);
  const [head = '', tail] = address.toLowerCase().split('%')[0]!.split('::');
  const left = head ? head.split(':') : [];
  const right = tail ? tail.split(':') : [];
  const groups = tail === undefined ? left : [...left, ...Array<string>(Math.max(0, 8 - left.length - right.length)).fill('0'), ...right];
  return `${groups.slice(0, 4).map((g) => (parseInt(g, 16) || 0).toString(16)).join(':')}::/64`;
}

/** The category of an authentication failure, for the metric and the audit summary. */
export function categorize(err: unknown, req: FastifyRequest): FailureCategory {
  if (!isBrokerError(err)) return 'error';
  if (err.code === 'rate_limited') return 'rate_limited';
  if (err.code === 'unauthenticated') return req.headers.authorization === undefined ? 'no_credential' : 'rejected';
  if (err.code === 'forbidden') return 'rejected'; // a valid OIDC token whose claims do not meet its identity's conditions
  return 'error';
}

/** The custom-store contract of @fastify/rate-limit (README, "Custom store"): its LocalStore calls back at once. */
interface WindowStore {
  incr(key: string, cb: (err: Error | null, res: { current: number; ttl: number }) => void, timeWindow: number, max: number): void;
  read(key: string, cb: (err: Error | null, res: { current: number; ttl: number }) => void, timeWindow: number, max: number): void;
}
type WindowStoreClass = new (continueExceeding: boolean, exponentialBackoff: boolean, cache: number) => WindowStore;
let LocalStore: WindowStoreClass | undefined;

/**
 * One budget: `max` per fixed window, per key, in @fastify/rate-limit's own in-memory store (an LRU
 * map of STORE_ENTRIES keys). Used directly rather than through the plugin's createRateLimit: that
 * wraps each check in promises and a route lookup, 1.2 us a call against 0.17 us for the store
 * itself, and three checks a request through it measured 0.81x to 0.89x on the credential endpoint
 * (docs/benchmarks.md). The store's incr and read are its documented custom-store contract.
 */
export class Budget {
  readonly rate: Rate;
  readonly #store: WindowStore;

  constructor(rate: Rate) {
    this.rate = rate;
    // CommonJS, required when first needed (not by every CLI command that imports this module).
    LocalStore ??= createRequire(import.meta.url)('@fastify/rate-limit/store/LocalStore.js') as WindowStoreClass;
    this.#store = new LocalStore(false, false, STORE_ENTRIES);
  }

  /** Counts one for `key`; whether that went over the budget, and the seconds until its window ends. */
  spend(key: string): { over: boolean; retryAfter: number } {
    let state = { current: 0, ttl: 0 };
    this.#store.incr(key, (_err, res) => (state = res), this.rate.windowMs, this.rate.max);
    return { over: state.current > this.rate.max, retryAfter: state.ttl / 1000 };
  }

  /** What `key` has left in its window, without spending any. */
  left(key: string): { left: number; retryAfter: number } {
    let state = { current: 0, ttl: 0 };
    this.#store.read(key, (_err, res) => (state = res), this.rate.windowMs, this.rate.max);
    return { left: Math.max(0, this.rate.max - state.current), retryAfter: state.ttl / 1000 };
  }
}

/** How many distinct credentials other than `credential` are in `pending`, counting no further than `enough`. */
function distinctOthers(pending: readonly string[], credential: string, enough: number): number {
  const seen: string[] = [];
  for (const c of pending) {
    if (c === credential || seen.includes(c)) continue;
    seen.push(c);
    if (seen.length >= enough) break;
  }
  return seen.length;
}

const per = (rate: Rate) => `at most ${rate.max} per ${formatDuration(rate.windowMs / 1000)}`;

/**
 * The request-path limits of one app: `checkSource` and `checkIdentity` run in the app's one onRequest
 * hook (before and after authentication) and throw RateLimitedError, `authenticate` wraps the
 * authentication itself with the failure budget. The checks are synchronous: no promise per request
 * for a check that does no I/O.
 */
export class RequestGuard {
  readonly #metrics: Metrics;
  readonly #failureLog: AuthFailureLog;
  readonly #source: Budget | undefined;
  readonly #failures: Budget | undefined;
  readonly #identity: Budget | undefined;
  /**
   * Per source, the credentials being authenticated now (each distinct one may cost a TokenReview).
   * A list, not a set: most requests find it empty, and a set would hash each ~1 KB token again.
   */
  readonly #pending = new Map<string, string[]>();

  constructor(limits: Limits, metrics: Metrics, failureLog: AuthFailureLog) {
    this.#metrics = metrics;
    this.#failureLog = failureLog;
    this.#source = limits.perSource && new Budget(limits.perSource);
    this.#failures = limits.authFailures && new Budget(limits.authFailures);
    this.#identity = limits.perIdentity && new Budget(limits.perIdentity);
  }

  /** Before authentication: the per-source request budget, on every route. Throws RateLimitedError. */
  checkSource(req: FastifyRequest): void {
    if (!this.#source) return;
    const source = sourceOf(req.ip);
    const r = this.#source.spend(source);
    if (!r.over) return;
    this.#refused('source', { source, category: 'rate_limited' });
    throw new RateLimitedError(`too many requests from this address: ${per(this.#source.rate)}`, r.retryAfter);
  }

  /**
   * Runs `authenticate` unless the source has spent its failure budget (counting the distinct
   * credentials it is having checked right now, so a burst of concurrent bad tokens cannot overshoot
   * it); records a failure in the metric, the audit summary and the budget.
   */
  async authenticate(req: FastifyRequest, authenticate: () => Promise<Caller>): Promise<Caller> {
    const source = sourceOf(req.ip);
    const credential = req.headers.authorization ?? '';
    let pending: string[] | undefined;
    if (this.#failures) {
      pending = this.#pending.get(source);
      this.#checkFailures(this.#failures, source, pending, credential);
      if (pending) pending.push(credential);
      else this.#pending.set(source, (pending = [credential]));
    }
    try {
      return await authenticate();
    } catch (err) {
      const category = categorize(err, req);
      this.#metrics.authFailures.inc({ reason: category });
      if (category === 'rate_limited') this.#metrics.rateLimited.inc({ limit: 'token_reviews' });
      this.#failureLog.note({ source, category }, err instanceof Error ? err.message : String(err));
      if (category === 'no_credential' || category === 'rejected') this.#failures?.spend(source);
      throw err;
    } finally {
      if (pending) {
        if (pending.length === 1) this.#pending.delete(source);
        else pending.splice(pending.indexOf(credential), 1);
      }
    }
  }

  /**
   * `authenticate` for a request whose caller is already known without any work (accepted on its
   * connection moments ago: src/identity/service-account.ts, acceptedBefore). Synchronous; the
   * source's failure budget applies as it does to every authentication.
   */
  known(req: FastifyRequest, caller: Caller): Caller {
    if (this.#failures) {
      const source = sourceOf(req.ip);
      this.#checkFailures(this.#failures, source, this.#pending.get(source), req.headers.authorization ?? '');
    }
    return caller;
  }

  /** Refuses (429) a source that has spent its failure budget, counting the other credentials it is having checked now. */
  #checkFailures(failures: Budget, source: string, pending: readonly string[] | undefined, credential: string): void {
    const r = failures.left(source);
    if (r.left <= (pending ? distinctOthers(pending, credential, r.left) : 0)) {
      this.#refused('auth_failures', { source, category: 'rate_limited' });
      throw new RateLimitedError(`too many failed authentications from this address: ${per(failures.rate)}`, r.retryAfter || 1);
    }
  }

  /** After authentication: the per-identity budget (requests with no caller are not counted). Throws RateLimitedError. */
  checkIdentity(req: FastifyRequest): void {
    if (!this.#identity || !req.caller) return;
    const r = this.#identity.spend(req.caller.principal);
    if (!r.over) return;
    this.#metrics.rateLimited.inc({ limit: 'identity' });
    this.#failureLog.note({ source: sourceOf(req.ip), category: 'rate_limited', actor: actorOf(req.caller), agent: req.caller.agent || undefined });
    throw new RateLimitedError(`too many requests from ${actorOf(req.caller)}: ${per(this.#identity.rate)}`, r.retryAfter);
  }

  #refused(limit: RateLimitName, key: { source: string; category: FailureCategory }): void {
    this.#metrics.rateLimited.inc({ limit });
    this.#metrics.authFailures.inc({ reason: 'rate_limited' });
    this.#failureLog.note(key);
  }
}

/**
 * Caps on open connections: all of them (server.maxConnections: the kernel accepts, Node closes at
 * once) and those of one source address, so one address holding connections cannot starve the rest.
 * Counted on 'connection' (for TLS, before the handshake is paid for).
 */
export function guardConnections(server: Server, limits: Pick<Limits, 'maxConnections' | 'maxConnectionsPerSource'>, metrics: Metrics): void {
  if (limits.maxConnections > 0) server.maxConnections = limits.maxConnections;
  server.on('drop', () => metrics.connectionsRefused.inc({ reason: 'global' }));
  const open = new Map<string, number>();
  server.on('connection', (socket) => {
    const source = sourceOf(socket.remoteAddress);
    const n = (open.get(source) ?? 0) + 1;
    open.set(source, n);
    metrics.openConnections.inc();
    socket.once('close', () => {
      metrics.openConnections.dec();
      const left = (open.get(source) ?? 1) - 1;
      if (left > 0) open.set(source, left);
      else open.delete(source);
    });
    if (limits.maxConnectionsPerSource > 0 && n > limits.maxConnectionsPerSource) {
      metrics.connectionsRefused.inc({ reason: 'per_source' });
      socket.destroy();
    }
  });
}

/**
 * The node:http server options behind the timeouts (fastify takes connectionTimeout, requestTimeout
 * and keepAliveTimeout itself). Node checks request and header deadlines every
 * connectionsCheckingInterval (default 30 s): 1 s here, so a dripped request is cut close to its deadline.
 */
export function httpServerOptions(limits: Pick<Limits, 'requestTimeoutMs' | 'headersTimeoutMs'>): { requestTimeout: number; headersTimeout: number; connectionsCheckingInterval: number } {
  const request = limits.requestTimeoutMs;
  const headers = request > 0 ? Math.min(limits.headersTimeoutMs || request, request) : limits.headersTimeoutMs;
  const shortest = Math.min(...[request, headers].filter((t) => t > 0), 30_000);
  return { requestTimeout: request, headersTimeout: headers, connectionsCheckingInterval: Math.max(250, Math.min(1000, Math.floor(shortest / 4))) };
}

/**
 * At most `max` TokenReviews in flight; the next ones wait in turn up to `waitMs`, then their requests
 * are refused 429 (rate_limited, Retry-After 1). A flood of random tokens from many addresses thus
 * costs the API server at most `max` concurrent reviews, and a legitimate new token waits at most
 * `waitMs` behind it. Wraps the client, so the authenticator itself is unchanged.
 */
export function capTokenReviews(authn: AuthenticationV1Api, limits: Pick<Limits, 'maxTokenReviews' | 'tokenReviewWaitMs'>, metrics: Metrics): AuthenticationV1Api {
  const gate = new Gate(limits.maxTokenReviews, limits.tokenReviewWaitMs);
  const review: AuthenticationV1Api['createTokenReview'] = async (...args) => {
    await gate.enter();
    metrics.tokenReviews.inc();
    metrics.tokenReviewsInFlight.inc();
    try {
      return await authn.createTokenReview(...args);
    } finally {
      metrics.tokenReviewsInFlight.dec();
      gate.leave();
    }
  };
  return new Proxy(authn, { get: (target, prop, receiver) => (prop === 'createTokenReview' ? review : Reflect.get(target, prop, receiver)) });
}

/** A counting semaphore whose waiters give up after waitMs (FIFO). max 0: never waits. */
export class Gate {
  readonly #max: number;
  readonly #waitMs: number;
  #active = 0;
  readonly #waiting: Array<{ admit: () => void }> = [];

  constructor(max: number, waitMs: number) {
    this.#max = max;
    this.#waitMs = waitMs;
  }

  enter(): Promise<void> {
    if (this.#max <= 0 || this.#active < this.#max) {
      this.#active++;
      return Promise.resolve();
    }
    return new Promise<void>((resolve, reject) => {
      const waiter = {
        admit: () => {
          clearTimeout(timer);
          this.#active++;
          resolve();
        },
      };
      const timer = setTimeout(() => {
        this.#waiting.splice(this.#waiting.indexOf(waiter), 1);
        reject(new RateLimitedError('too many authentications in progress: retry shortly', 1));
      }, this.#waitMs);
      this.#waiting.push(waiter);
    });
  }

  leave(): void {
    this.#active--;
    this.#waiting.shift()?.admit();
  }

  get active(): number {
    return this.#active;
  }
}
