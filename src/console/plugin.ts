/**
 * `broker serve --ui`: the web console for approvers and reviewers, served by the broker itself under
 * /ui (fastify routes; server-rendered HTML, one ES module script and one stylesheet, both local).
 *
 * - Sign-in at the policy's OIDC issuers that name a `login.clientId` (authorization code + PKCE, the
 *   code exchanged by the broker, the ID token checked by the broker's own OIDC authenticator, so a
 *   person is exactly who the API would take them for). With the audit log file the session lives in
 *   this process (src/console/session.ts); with a PostgreSQL audit store in the store, shared by every
 *   replica (src/console/shared-sessions.ts). Its cookie is HttpOnly, SameSite=Strict, Secure whenever
 *   the broker serves TLS (plain HTTP is allowed on loopback only), 15 minutes.
 * - The task page's story and chain verdict come from the log file (timeline.ts) or the store
 *   (store-timeline.ts, through indexes: the task's rows, not the table).
 * - Every state-changing request is a POST carrying the session's CSRF token, from this origin.
 * - Decisions and task ends go through the same services as the API (ApprovalService.decide,
 *   TaskService.end): the rules (never one's own request, N-of-M, who may end a task) are theirs.
 * - Live updates: server-sent events say when the approvals or tasks a page shows have changed; the
 *   page fetches the new list (the same server-rendered HTML).
 * - A strict Content-Security-Policy on every answer: no inline script or style, nothing from another origin.
 */
import { readFileSync } from 'node:fs';
import type { ServerResponse } from 'node:http';
import cookie from '@fastify/cookie';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import * as oidc from 'openid-client';
import type { ApprovalService } from '../approvals/service.ts';
import type { AuditSink } from '../audit/sink.ts';
import { BrokerError, describeCause, isBrokerError, statusOf } from '../errors.ts';
import { actorOf, type Authenticator, type Caller } from '../identity/types.ts';
import type { Policy } from '../policy/types.ts';
import { historyView, type TaskStateView } from '../tasks/history.ts';
import { toView } from '../tasks/model.ts';
import type { TaskService } from '../tasks/service.ts';
import type { TaskStore } from '../tasks/store.ts';
import { grantWords } from './grants.ts';
import { approvalsList, approvalsPage, chainLine, errorPage, signedInPage, signInPage, taskPage, tasksList, tasksPage, type ApprovalCard, type TaskFilter } from './pages.ts';
import { ConsoleDatabase } from './db.ts';
import { sameToken, SESSION_SECONDS, SessionStore, type Session } from './session.ts';
import { SharedSessions, type ConsoleSessions, type LoginSigner } from './shared-sessions.ts';
import { storeChainStatus, StoreStories } from './store-timeline.ts';
import { ChainStatus, readRecording, recordingOf, taskStory } from './timeline.ts';

export interface ConsoleDeps {
  approvals: () => ApprovalService;
  tasks: () => TaskService;
  policy: () => Policy;
  authenticators: () => readonly Authenticator[];
  store: TaskStore;
  audit: AuditSink;
  /** The audit log file the task pages read (one broker: sessions in this process's memory). */
  auditLogPath?: string | undefined;
  /** Or the PostgreSQL audit store's URL: the task pages read it through its indexes, and sessions are kept there, shared by every replica (src/console/shared-sessions.ts). */
  auditStore?: string | undefined;
  /** Where the proxy keeps exec and attach recordings. */
  recordings?: string | undefined;
  /** The console's origin as browsers reach it (`https://broker.example:8443`): the OIDC redirect and the Origin check. Read at each use (known once listening). */
  origin: () => string;
  /** Cookies carry `Secure` (the broker serves TLS). */
  secure: boolean;
  sessions?: ConsoleSessions;
  /** With a shared audit store: signs the login cookie that carries a sign-in in progress (the brokers' StateSigner). */
  signer?: LoginSigner;
  /** How often the live updates look for changes. Default 1 s. */
  pollMs?: number;
  log?: (line: string) => void;
}

export const SESSION_COOKIE = 'broker-session';
/** With TLS the cookie takes the `__Host-` prefix: the browser keeps it only if Secure, for this host, path /. */
export const SECURE_SESSION_COOKIE = '__Host-broker-session';
const LOGIN_COOKIE = 'broker-login';
const PAGE_SIZE = 200;

/** The Content-Security-Policy of every console answer. */
export const CSP = [
  "default-src 'none'",
  "script-src 'self'",
  "style-src 'self'",
  "img-src 'self'",
  "connect-src 'self'",
  "form-action 'self'",
  "frame-ancestors 'none'",
  "base-uri 'none'",
].join('; ');

/** The script and stylesheet: beside this module when run from src/, in src/console/assets when run from dist/ (tsc copies no assets). */
function asset(name: string): Buffer {
  try {
    return readFileSync(new URL(`./assets/${name}`, import.meta.url));
  } catch {
    return readFileSync(new URL(`../../src/console/assets/${name}`, import.meta.url));
  }
}
const ASSETS: Record<string, { type: string; body: Buffer }> = {
  'console.js': { type: 'text/javascript; charset=utf-8', body: asset('console.js') },
  'console.css': { type: 'text/css; charset=utf-8', body: asset('console.css') },
  'favicon.svg': { type: 'image/svg+xml', body: asset('favicon.svg') },
};

declare module 'fastify' {
  interface FastifyRequest {
    consoleSession: Session | undefined;
  }
}

/** The session cookie's name and attributes: HttpOnly, SameSite=Strict, 15 minutes; with TLS `__Host-` and Secure. */
export function sessionCookie(secure: boolean): { name: string; options: { path: string; httpOnly: true; secure: boolean; sameSite: 'strict'; maxAge: number } } {
  return { name: secure ? SECURE_SESSION_COOKIE : SESSION_COOKIE, options: { path: '/', httpOnly: true, secure, sameSite: 'strict', maxAge: SESSION_SECONDS } };
}

export function registerConsole(app: FastifyInstance, deps: ConsoleDeps): ConsoleSessions {
  const db = deps.auditStore ? new ConsoleDatabase(deps.auditStore) : undefined;
  if (db && !deps.signer && !deps.sessions) throw new Error('the console on a shared audit store needs the brokers\' state signer (its login cookies are signed)');
  const sessions = deps.sessions ?? (db ? new SharedSessions(db, deps.signer!) : new SessionStore());
  void app.register(async (ui) => consoleRoutes(ui, deps, sessions, db), { prefix: '/ui' });
  return sessions;
}

async function consoleRoutes(ui: FastifyInstance, deps: ConsoleDeps, sessions: ConsoleSessions, db: ConsoleDatabase | undefined): Promise<void> {
  await ui.register(cookie);
  const { name: cookieName, options: cookieOptions } = sessionCookie(deps.secure);
  const chain = deps.auditLogPath ? ChainStatus.ofFile(deps.auditLogPath) : deps.auditStore ? storeChainStatus(deps.auditStore) : undefined;
  const stories = db ? new StoreStories(db) : undefined;
  /** The task's story from the log file or the store (undefined: no record of it, or neither to read). */
  const storyOf = (id: string) => (deps.auditLogPath ? taskStory(deps.auditLogPath, id) : stories ? stories.taskStory(id) : Promise.resolve(undefined));
  ui.addHook('onClose', async () => {
    sessions.close?.();
    await db?.close();
  });
  // The first pass over the whole log starts with the broker, not with the first page asked for.
  ui.addHook('onReady', async () => void chain?.check().catch(() => undefined));
  const live = new LiveUpdates(deps, sessions);
  ui.addHook('preClose', async () => live.close());
  ui.decorateRequest('consoleSession', undefined);

  // Forms post urlencoded bodies (this context only; the API stays JSON).
  ui.addContentTypeParser('application/x-www-form-urlencoded', { parseAs: 'string' }, (_req, body, done) => {
    done(null, Object.fromEntries(new URLSearchParams(body as string)));
  });

  ui.addHook('onRequest', async (req) => {
    // The script, stylesheet and icon need no session (with shared sessions: no query for them).
    if (req.url.startsWith('/ui/assets/')) return;
    req.consoleSession = await sessions.get(req.cookies[cookieName]);
  });
  ui.addHook('onSend', async (_req, reply, payload) => {
    reply.header('content-security-policy', CSP);
    reply.header('x-content-type-options', 'nosniff');
    // same-origin, not no-referrer: with no-referrer a browser's form posts carry `Origin: null`, which the origin check refuses.
    reply.header('referrer-policy', 'same-origin');
    reply.header('x-frame-options', 'DENY');
    reply.header('cross-origin-opener-policy', 'same-origin');
    reply.header('cross-origin-resource-policy', 'same-origin');
    if (!reply.hasHeader('cache-control')) reply.header('cache-control', 'no-store');
    return payload;
  });

  ui.setErrorHandler(async (error: Error, req: FastifyRequest, reply: FastifyReply) => {
    const err = isBrokerError(error) ? error : new BrokerError('internal', 'internal error', { cause: error });
    const status = statusOf(err.code);
    if (status >= 500) (deps.log ?? ((l: string) => process.stderr.write(l + '\n')))(`broker: console ${req.method} ${req.url.split('?')[0]}: ${err.code}: ${describeCause(error)}`);
    const message = status >= 500 ? 'internal error' : err.message;
    if (wantsJson(req)) return reply.code(status).send({ error: { code: err.code, message } });
    return reply.code(status).type('text/html; charset=utf-8').send(errorPage(status, message, req.consoleSession));
  });

  const signedIn = (req: FastifyRequest): Session => {
    const s = req.consoleSession;
    if (!s) throw new BrokerError('unauthenticated', 'you are not signed in (or your session has ended): sign in again');
    return s;
  };
  /** A state-changing request: a session, its own CSRF token, and from this origin (or no Origin at all). */
  const checked = (req: FastifyRequest): Session => {
    const origin = req.headers['origin'];
    const site = req.headers['sec-fetch-site'];
    if ((origin !== undefined && origin !== deps.origin()) || (site !== undefined && site !== 'same-origin')) {
      throw new BrokerError('forbidden', 'refused: this request came from another site');
    }
    const s = signedIn(req);
    const body = (req.body ?? {}) as Record<string, unknown>;
    const token = typeof body['csrf'] === 'string' ? body['csrf'] : (req.headers['x-csrf-token'] as string | undefined);
    if (!sameToken(token, s.csrf)) throw new BrokerError('forbidden', 'refused: the form is stale or not from this console (CSRF token missing or wrong); reload the page and try again');
    return s;
  };
  const html200 = (reply: FastifyReply, body: string) => reply.type('text/html; charset=utf-8').send(body);
  const toSignIn = (reply: FastifyReply) => reply.redirect('/ui/signin', 303);

  ui.get('/', async (req, reply) => reply.redirect(req.consoleSession ? '/ui/approvals' : '/ui/signin', 303));

  ui.get<{ Params: { name: string } }>('/assets/:name', async (req, reply) => {
    const asset = ASSETS[req.params.name];
    if (!asset) throw new BrokerError('not_found', 'no such asset');
    return reply.type(asset.type).header('cache-control', 'no-cache').send(asset.body);
  });

  // ---------------------------------------------------------------------------------------------
  // Sign-in and sign-out

  const loginIssuers = () => deps.policy().issuers.flatMap((i) => (i.login ? [{ issuer: i.issuer, clientId: i.login.clientId }] : []));

  ui.get<{ Querystring: { signedout?: string } }>('/signin', async (req, reply) => {
    if (req.consoleSession) return reply.redirect('/ui/approvals', 303);
    return html200(reply, signInPage(loginIssuers(), req.query.signedout !== undefined ? { kind: 'ok', text: 'You are signed out.' } : undefined));
  });

  ui.get<{ Querystring: { issuer?: string } }>('/signin/start', async (req, reply) => {
    const issuers = loginIssuers();
    const chosen = issuers[Number(req.query.issuer ?? '0')];
    if (!chosen || !/^\d{1,3}$/.test(req.query.issuer ?? '0')) throw new BrokerError('invalid_argument', 'no such identity provider: choose one on the sign-in page', { field: 'issuer' });
    const config = await discover(chosen.issuer, chosen.clientId);
    const verifier = oidc.randomPKCECodeVerifier();
    const login = await sessions.startLogin({
      issuer: chosen.issuer,
      clientId: chosen.clientId,
      verifier,
      state: oidc.randomState(),
      nonce: oidc.randomNonce(),
      redirectUri: `${deps.origin()}/ui/callback`,
    });
    const url = oidc.buildAuthorizationUrl(config, {
      redirect_uri: login.redirectUri,
      scope: 'openid profile',
      code_challenge: await oidc.calculatePKCECodeChallenge(verifier),
      code_challenge_method: 'S256',
      state: login.state,
      nonce: login.nonce,
    });
    // Lax, not Strict: it must come back with the identity provider's redirect (a cross-site navigation).
    reply.setCookie(LOGIN_COOKIE, login.id, { path: '/ui/callback', httpOnly: true, secure: deps.secure, sameSite: 'lax', maxAge: 600 });
    return reply.redirect(url.href, 303);
  });

  ui.get('/callback', async (req, reply) => {
    const login = await sessions.takeLogin(req.cookies[LOGIN_COOKIE]);
    reply.clearCookie(LOGIN_COOKIE, { path: '/ui/callback', httpOnly: true, secure: deps.secure, sameSite: 'lax' });
    if (!login) throw new BrokerError('unauthenticated', 'this sign-in was not started in this browser, or took too long: sign in again');
    // Only an issuer and client the policy names, and this console's own redirect (with shared sessions the login cookie carries them).
    if (!loginIssuers().some((i) => i.issuer === login.issuer && i.clientId === login.clientId) || login.redirectUri !== `${deps.origin()}/ui/callback`) {
      throw new BrokerError('unauthenticated', 'this sign-in names an identity provider the policy no longer offers: sign in again');
    }
    const config = await discover(login.issuer, login.clientId);
    let idToken: string | undefined;
    try {
      const tokens = await oidc.authorizationCodeGrant(config, new URL(req.url, deps.origin()), {
        pkceCodeVerifier: login.verifier,
        expectedState: login.state,
        expectedNonce: login.nonce,
        idTokenExpected: true,
      });
      idToken = tokens.id_token;
    } catch (err) {
      await deps.audit.append({ type: 'console.signin_refused', actor: 'system:console', outcome: 'denied', reason: `the identity provider's answer did not hold: ${(err as Error).message}`.slice(0, 500), requestId: req.id });
      throw new BrokerError('unauthenticated', 'the sign-in failed at the identity provider: sign in again', { cause: err });
    }
    let caller: Caller | undefined;
    try {
      const authenticator = deps.authenticators().find((a) => a.method === 'oidc');
      caller = await authenticator?.authenticate({ headers: { authorization: `Bearer ${idToken}` }, method: 'GET', url: '/ui/callback' });
    } catch (err) {
      await deps.audit.append({ type: 'console.signin_refused', actor: 'system:console', outcome: 'denied', reason: (err as Error).message.slice(0, 500), requestId: req.id });
      throw err;
    }
    if (!caller) throw new BrokerError('unauthenticated', 'the identity provider gave no ID token the broker accepts');
    // Recorded before the session exists.
    await deps.audit.append({ type: 'console.signed_in', actor: actorOf(caller), ...(caller.agent ? { agent: caller.agent } : {}), outcome: 'ok', requestId: req.id, details: { issuer: login.issuer, principal: caller.principal } });
    const session = await sessions.create(caller, login.issuer);
    reply.setCookie(cookieName, session.id, cookieOptions);
    return html200(reply, signedInPage('/ui/approvals'));
  });

  ui.post('/signout', async (req, reply) => {
    const session = checked(req);
    await deps.audit.append({ type: 'console.signed_out', actor: actorOf(session.caller), ...(session.caller.agent ? { agent: session.caller.agent } : {}), outcome: 'ok', requestId: req.id });
    await sessions.end(session.id);
    reply.clearCookie(cookieName, { ...cookieOptions, maxAge: 0 });
    return reply.redirect('/ui/signin?signedout', 303);
  });

  // ---------------------------------------------------------------------------------------------
  // Approvals

  const cardsFor = async (caller: Caller): Promise<ApprovalCard[]> => {
    const service = deps.approvals();
    const policy = deps.policy();
    const now = new Date();
    const groups = service.groupsOf(caller);
    const visible = (await service.visibleTo(caller)).filter((r) => r.state === 'pending' && new Date(r.expiresAt) > now);
    return Promise.all(
      visible.map(async (request): Promise<ApprovalCard> => {
        const template = policy.templates.find((t) => t.name === request.template);
        const rules = template && !template.rules ? await deps.tasks().gatedHits(template).then((h) => h.rules, () => undefined) : undefined;
        const grant = template ? grantWords(policy, template, request.namespace, rules) : { lines: [], clusterRole: `${request.template} (no longer in the policy)`, gated: [] };
        const mine = request.requester.principal === caller.principal;
        // What the page offers; ApprovalService.decide enforces the same rules whatever is posted.
        const cannot = mine
          ? 'This is your own request: someone else must decide it.'
          : caller.agent
            ? 'Agents do not approve.'
            : !request.approvers.some((g) => groups.includes(g))
              ? 'You are not one of its approvers.'
              : request.decisions.some((d) => d.principal === caller.principal)
                ? 'You have already decided it; it waits for other approvers.'
                : undefined;
        return { request, grant, cannot, mine };
      }),
    );
  };

  ui.get<{ Querystring: { done?: string } }>('/approvals', async (req, reply) => {
    if (!req.consoleSession) return toSignIn(reply);
    const s = req.consoleSession;
    const flash = req.query.done === 'approve' ? { kind: 'ok' as const, text: 'Approved.' } : req.query.done === 'deny' ? { kind: 'ok' as const, text: 'Denied.' } : undefined;
    return html200(reply, approvalsPage(s, await cardsFor(s.caller), new Date(), flash));
  });
  ui.get('/approvals/list', async (req, reply) => {
    const s = signedIn(req);
    return html200(reply, approvalsList(s, await cardsFor(s.caller), new Date()).value);
  });

  ui.post<{ Params: { id: string } }>('/approvals/:id/decide', async (req, reply) => {
    const s = checked(req);
    const body = req.body as Record<string, unknown>;
    const decision = body['decision'];
    if (decision !== 'approve' && decision !== 'deny') throw new BrokerError('invalid_argument', '"decision" must be approve or deny', { field: 'decision' });
    const comment = typeof body['comment'] === 'string' && body['comment'].trim() !== '' ? body['comment'].trim() : undefined;
    if (comment !== undefined && comment.length > 1024) throw new BrokerError('invalid_argument', '"comment" must be at most 1024 characters', { field: 'comment' });
    if (decision === 'deny' && comment === undefined) throw new BrokerError('invalid_argument', 'a denial needs a comment: say why', { field: 'comment' });
    // No approval token here: a page cannot hand one on, and a signed token nobody holds is one more to audit.
    await deps.approvals().decide(s.caller, req.params.id, decision, comment, req.id, { issueToken: false });
    live.poke();
    if (wantsJson(req)) return { ok: true };
    return reply.redirect(`/ui/approvals?done=${decision}`, 303);
  });

  // ---------------------------------------------------------------------------------------------
  // Tasks

  const mayReview = (caller: Caller) => deps.approvals().groupsOf(caller).length > 0;
  const tasksFor = async (caller: Caller): Promise<TaskStateView[]> => {
    const reviewer = mayReview(caller);
    const own = (agent: string) => reviewer || (caller.agent !== '' && agent === caller.agent);
    const active = deps.store
      .list()
      .filter((t) => t.state === 'active' && own(t.agent))
      .map((t): TaskStateView => ({ ...toView(t), state: 'active' }))
      .sort((a, b) => b.createdAt.localeCompare(a.createdAt));
    const agents = reviewer ? deps.policy().agents.map((a) => a.name) : caller.agent ? [caller.agent] : [];
    const history = deps.tasks().history;
    const ended = (await Promise.all(agents.map((a) => history.list(a).catch(() => [])))).flat().map(historyView);
    ended.sort((a, b) => (b.endedAt ?? '').localeCompare(a.endedAt ?? ''));
    return [...active, ...ended.filter((e) => !active.some((a) => a.id === e.id))].slice(0, 500);
  };
  const filterOf = (q: Record<string, unknown>): TaskFilter => {
    const pick = (k: string) => (typeof q[k] === 'string' && q[k] !== '' && (q[k] as string).length <= 253 ? (q[k] as string) : undefined);
    return { agent: pick('agent'), template: pick('template'), namespace: pick('namespace'), state: pick('state') };
  };
  const applyFilter = (tasks: TaskStateView[], f: TaskFilter) =>
    tasks.filter((t) => (!f.agent || t.agent === f.agent) && (!f.template || t.template === f.template) && (!f.namespace || t.namespace === f.namespace) && (!f.state || t.state === f.state));

  ui.get('/tasks', async (req, reply) => {
    if (!req.consoleSession) return toSignIn(reply);
    const s = req.consoleSession;
    const all = await tasksFor(s.caller);
    const f = filterOf(req.query as Record<string, unknown>);
    const policy = deps.policy();
    const uniq = (xs: string[]) => [...new Set(xs)].sort();
    const choices = {
      agents: uniq([...(mayReview(s.caller) ? policy.agents.map((a) => a.name) : [s.caller.agent].filter(Boolean)), ...all.map((t) => t.agent)]),
      templates: uniq([...policy.templates.map((t) => t.name), ...all.map((t) => t.template)]),
      namespaces: uniq([...policy.templates.flatMap((t) => t.namespaces), ...all.map((t) => t.namespace)]),
    };
    return html200(reply, tasksPage(s, applyFilter(all, f), f, choices));
  });
  ui.get('/tasks/list', async (req, reply) => {
    const s = signedIn(req);
    const f = filterOf(req.query as Record<string, unknown>);
    return html200(reply, tasksList(applyFilter(await tasksFor(s.caller), f), f).value);
  });

  /** The task `id` as this person may see it: its facts (active or from the history), or refused. */
  const taskFor = async (caller: Caller, id: string): Promise<{ task: TaskStateView | undefined; agent: string | undefined }> => {
    if (!/^[a-z0-9][a-z0-9-]{0,62}$/.test(id)) throw new BrokerError('not_found', 'no such task');
    const active = deps.store.get(id);
    let task: TaskStateView | undefined = active && active.state === 'active' ? { ...toView(active), state: 'active' } : undefined;
    if (!task) {
      const agents = mayReview(caller) ? deps.policy().agents.map((a) => a.name) : caller.agent ? [caller.agent] : [];
      for (const a of agents) {
        const entry = (await deps.tasks().history.list(a).catch(() => [])).find((e) => e.task.id === id);
        if (entry) {
          task = historyView(entry);
          break;
        }
      }
    }
    return { task, agent: task?.agent };
  };

  ui.get<{ Params: { id: string }; Querystring: { offset?: string } }>('/tasks/:id', async (req, reply) => {
    if (!req.consoleSession) return toSignIn(reply);
    const s = req.consoleSession;
    const id = req.params.id;
    const { task } = await taskFor(s.caller, id);
    const reviewer = mayReview(s.caller);
    const found = await storyOf(id);
    const agent = task?.agent ?? found?.story.agent;
    if ((!task && !found) || !(reviewer || (s.caller.agent !== '' && agent === s.caller.agent))) throw new BrokerError('not_found', `no task "${id}" that you may see`);
    const records = found?.story.records ?? [];
    const offset = Math.max(0, Math.min(Number.parseInt(req.query.offset ?? '0', 10) || 0, Math.max(0, records.length - 1)));
    // The page does not wait long for the chain's verdict: if the first pass is still running, the script asks again (/ui/chain).
    const chainResult = chain
      ? ((await chain.within(300)) ?? { pending: true as const })
      : { unavailable: 'not known (this broker reads no audit log)' };
    return html200(
      reply,
      taskPage(s, {
        task,
        id,
        records: records.slice(offset, offset + PAGE_SIZE),
        total: records.length,
        summary: found?.summary,
        offset,
        pageSize: PAGE_SIZE,
        chain: chainResult,
        canEnd: task?.state === 'active' && s.caller.agent !== '' && task.agent === s.caller.agent,
      }),
    );
  });

  ui.get('/chain', async (req, reply) => {
    const s = signedIn(req);
    if (!mayReview(s.caller) && !s.caller.agent) throw new BrokerError('forbidden', 'only reviewers and agents see the audit chain');
    const result = chain ? await chain.check() : { unavailable: 'not known (this broker reads no audit log)' };
    return html200(reply, chainLine(result).value);
  });

  ui.post<{ Params: { id: string } }>('/tasks/:id/end', async (req, reply) => {
    const s = checked(req);
    await deps.tasks().end(s.caller, req.params.id, req.id);
    live.poke();
    return reply.redirect(`/ui/tasks/${encodeURIComponent(req.params.id)}`, 303);
  });

  ui.get<{ Params: { id: string; file: string } }>('/tasks/:id/recordings/:file', async (req) => {
    const s = signedIn(req);
    const { task } = await taskFor(s.caller, req.params.id);
    const found = await storyOf(req.params.id);
    const agent = task?.agent ?? found?.story.agent;
    if (!found || !(mayReview(s.caller) || (s.caller.agent !== '' && agent === s.caller.agent))) throw new BrokerError('not_found', 'no such task that you may see');
    const rec = found.story.records.map(recordingOf).find((r) => r?.file === req.params.file);
    if (!rec) throw new BrokerError('not_found', 'this task has no such session recording');
    if (!deps.recordings) throw new BrokerError('not_found', 'this broker keeps no session recordings (no --proxy-listen)');
    const result = await readRecording(deps.recordings, rec.file, rec.sha256);
    if (!result.ok) return { problem: `session recording ${rec.file}: ${result.problem}` };
    return { events: result.events };
  });

  // ---------------------------------------------------------------------------------------------
  // Live updates

  ui.get('/events', async (req, reply) => {
    const s = signedIn(req);
    reply.hijack();
    live.open(s, reply.raw);
  });

  ui.setNotFoundHandler(async (req, reply) => {
    const message = 'no such page';
    if (wantsJson(req)) return reply.code(404).send({ error: { code: 'not_found', message } });
    return reply.code(404).type('text/html; charset=utf-8').send(errorPage(404, message, req.consoleSession));
  });
}

/**
 * Server-sent events: `approvals` when the pending requests change, `tasks` when the tasks change.
 * One look every pollMs while anyone listens (one list of approval requests from the cluster, the
 * task store in memory), whatever the number of listeners. A stream ends with its session.
 */
class LiveUpdates {
  readonly #deps: ConsoleDeps;
  readonly #streams = new Map<ServerResponse, Session>();
  #timer: NodeJS.Timeout | undefined;
  #heartbeat: NodeJS.Timeout | undefined;
  #approvals = '';
  #tasks = '';
  #looking = false;
  readonly #stopEnded: () => void;

  readonly #sessions: ConsoleSessions;

  constructor(deps: ConsoleDeps, sessions: ConsoleSessions) {
    this.#deps = deps;
    this.#sessions = sessions;
    this.#stopEnded = sessions.onEnded((id) => {
      for (const [res, s] of this.#streams) if (s.id === id) this.#end(res);
    });
  }

  open(session: Session, res: ServerResponse): void {
    res.writeHead(200, {
      'content-type': 'text/event-stream; charset=utf-8',
      'cache-control': 'no-store',
      'x-accel-buffering': 'no',
      'content-security-policy': CSP,
      'x-content-type-options': 'nosniff',
    });
    res.write('retry: 3000\n\n');
    this.#streams.set(res, session);
    res.on('close', () => this.#end(res));
    if (!this.#timer) {
      void this.#look(true);
      this.#timer = setInterval(() => void this.#look(false), this.#deps.pollMs ?? 1000);
      this.#heartbeat = setInterval(() => this.#send(': ping\n\n'), 15_000);
    }
  }

  /** Something changed here (a decision, a task ended): look now. */
  poke(): void {
    if (this.#timer) void this.#look(false);
  }

  async #look(first: boolean): Promise<void> {
    if (this.#looking) return;
    this.#looking = true;
    try {
      const now = Date.now();
      for (const [res, s] of this.#streams) if (s.expiresAt <= now) this.#end(res);
      // Signed out at another replica (shared sessions): the stream ends within one look.
      if (this.#sessions.signedOutElsewhere && this.#streams.size > 0) {
        const gone = await this.#sessions.signedOutElsewhere([...new Set([...this.#streams.values()].map((s) => s.id))]).catch(() => undefined);
        for (const [res, s] of this.#streams) if (gone?.has(s.id)) this.#end(res);
      }
      const tasks = JSON.stringify(this.#deps.store.list().map((t) => [t.id, t.state]));
      let approvals = this.#approvals;
      try {
        approvals = JSON.stringify((await this.#deps.approvals().list()).map((r) => [r.id, r.state, r.decisions.length, r.resourceVersion]));
      } catch {
        // the cluster did not answer: look again next time
      }
      if (!first && approvals !== this.#approvals) this.#send('event: approvals\ndata: changed\n\n');
      if (!first && tasks !== this.#tasks) this.#send('event: tasks\ndata: changed\n\n');
      this.#approvals = approvals;
      this.#tasks = tasks;
    } finally {
      this.#looking = false;
    }
  }

  #send(text: string): void {
    for (const res of this.#streams.keys()) res.write(text);
  }

  #end(res: ServerResponse): void {
    if (!this.#streams.delete(res)) return;
    res.end();
    if (this.#streams.size === 0) this.#stop();
  }

  #stop(): void {
    clearInterval(this.#timer);
    clearInterval(this.#heartbeat);
    this.#timer = this.#heartbeat = undefined;
  }

  close(): void {
    this.#stopEnded();
    for (const res of [...this.#streams.keys()]) this.#end(res);
    this.#stop();
  }
}

function wantsJson(req: FastifyRequest): boolean {
  const accept = req.headers['accept'] ?? '';
  return accept.includes('application/json') && !accept.includes('text/html');
}

async function discover(issuer: string, clientId: string): Promise<oidc.Configuration> {
  const url = new URL(issuer);
  try {
    // http:// issuers are allowed by the policy on loopback only (src/policy/parse.ts)
    return await oidc.discovery(url, clientId, undefined, oidc.None(), url.protocol === 'http:' ? { execute: [oidc.allowInsecureRequests] } : {});
  } catch (err) {
    throw new BrokerError('identity_provider_unavailable', `the identity provider ${issuer} could not be reached`, { cause: err });
  }
}
