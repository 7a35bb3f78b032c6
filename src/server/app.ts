/**
 * The broker's HTTP API (fastify). Routes declare strict request schemas (unknown fields are errors,
 * never silently dropped); every error leaves as {"error": {"code", "message", "field"?}} with a
 * status from one table; server and authentication failures never echo internals.
 */
import { randomUUID } from 'node:crypto';
import Fastify, { type FastifyError, type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';
import type { AuditSink } from '../audit/sink.ts';
import { BrokerError, describeCause, isBrokerError, statusOf, type ErrorCode } from '../errors.ts';
import { acceptedBefore, authenticate } from '../identity/service-account.ts';
import { actorOf, type Authenticator, type Caller } from '../identity/types.ts';
import { toView as approvalView } from '../approvals/model.ts';
import type { ApprovalService } from '../approvals/service.ts';
import { ApprovalRequiredError } from '../tasks/gate.ts';
import { toView } from '../tasks/model.ts';
import type { Credential, TaskService } from '../tasks/service.ts';
import type { TaskStore } from '../tasks/store.ts';
import { AuthFailureLog } from './auth-failures.ts';
import { DEFAULT_LIMITS, guardConnections, httpServerOptions, RateLimitedError, RequestGuard, type Limits } from './limits.ts';
import { Metrics } from './metrics.ts';
import { KUBE_AUDIT_PATH, leftBehindReport, registerKubeAuditRoute, type KubeAuditConfig } from './kube-audit.ts';
import { errorHint, registerInfoRoutes } from './routes-info.ts';
import { registerAgentRoutes } from './routes-agents.ts';


export interface AppDeps {
  tasks: TaskService;
  approvals?: ApprovalService;
  store: TaskStore;
  audit: AuditSink;
  authenticators: readonly Authenticator[];
  metrics?: Metrics;
  /** Bytes. Default 16 KiB: no request the API takes is anywhere near that. */
  bodyLimit?: number;
  https?: { key: Buffer; cert: Buffer };
  /** What `GET /v1/cluster` tells clients: the API server their kubeconfigs should point at. */
  cluster?: { server: string; certificateAuthorityData?: string; proxy?: { server: string } };
  /** Where server-side failures are logged (never to the client). Default stderr. */
  log?: (line: string) => void;
  /** Rate limits, connection caps and timeouts (src/server/limits.ts); each one not given takes its default. */
  limits?: Partial<Limits>;
  /** The API server's audit webhook (src/server/kube-audit.ts); without it POST /v1/audit/kubernetes answers 404. */
  kubeAudit?: KubeAuditConfig | undefined;
  /** The issuers people sign in at with `broker login` (GET /v1/login), from the running policy. */
  loginIssuers?: (() => Array<{ issuer: string; clientId: string }>) | undefined;
  /** fastify's `logger`, `logController` and `childLoggerFactory` options (pino and the request log, src/server/request-log.ts); default no logging. */
  logging?: { logger: Record<string, unknown>; logController: unknown; childLoggerFactory?: unknown } | undefined;
  /**
   * The start-up gate: while it returns a promise, every request waits for it after authentication
   * (`broker serve` holds requests until `broker.started` is durable); undefined once open.
   */
  held?: () => Promise<void> | undefined;
  /** Registers the web console's routes under /ui (`broker serve --ui`, src/console/plugin.ts); they authenticate by their own session. */
  console?: ((app: FastifyInstance) => void) | undefined;
}

declare module 'fastify' {
  interface FastifyRequest {
    caller: Caller | undefined;
  }
}

const taskRef = { type: 'string', minLength: 1, maxLength: 63 } as const;
/** Answered without a credential: where to get one. */
export const LOGIN_PATH = '/v1/login';

const startSchema = {
  body: {
    type: 'object',
    additionalProperties: false,
    required: ['template', 'namespace'],
    properties: {
      template: { type: 'string', minLength: 1, maxLength: 63 },
      namespace: { type: 'string', minLength: 1, maxLength: 63 },
      name: { type: 'string', minLength: 1, maxLength: 63 },
      ttl: { anyOf: [{ type: 'integer', minimum: 1 }, { type: 'string', minLength: 1, maxLength: 32 }] },
      reason: { type: 'string', maxLength: 1024 },
      approvalToken: { type: 'string', minLength: 1, maxLength: 8192 },
    },
  },
} as const;

/**
 * The credential answer as JSON, made once per answer: the task service serves one (frozen) answer
 * object for as long as its token is served, so the ~1 KB of it is serialized once, not per request
 * (JSON.stringify of it costs about 1.5 us a request; a response schema, fast-json-stringify, more:
 * 2.7 us, its escape check of the long token string; docs/benchmarks.md).
 */
const credentialJson = new WeakMap<Credential, string>();
function credentialAnswer(credential: Credential): string {
  let json = credentialJson.get(credential);
  if (json === undefined) credentialJson.set(credential, (json = JSON.stringify(credential)));
  return json;
}

const decisionSchema = (reasonRequired: boolean) =>
  ({
    params: { type: 'object', properties: { id: { type: 'string', minLength: 1, maxLength: 64 } } },
    body: {
      type: ['object', 'null'],
      additionalProperties: false,
      ...(reasonRequired ? { required: ['reason'] } : {}),
      properties: { reason: { type: 'string', minLength: 1, maxLength: 1024 } },
    },
  }) as const;

interface StartBody {
  template: string;
  namespace: string;
  name?: string;
  ttl?: number | string;
  reason?: string;
  approvalToken?: string;
}

export function buildApp(deps: AppDeps): FastifyInstance {
  const log = deps.log ?? ((line: string) => process.stderr.write(line + '\n'));
  const metrics = deps.metrics ?? new Metrics();
  const limits: Limits = { ...DEFAULT_LIMITS, ...deps.limits };
  const serverOptions = httpServerOptions(limits);
  const app = Fastify({
    ...(deps.logging ?? { logger: false }),
    bodyLimit: deps.bodyLimit ?? 16 * 1024,
    genReqId: () => randomUUID(),
    // Strict: reject unknown fields and wrong types instead of dropping or coercing them.
    ajv: { customOptions: { removeAdditional: false, coerceTypes: false, useDefaults: false, allErrors: false } },
    connectionTimeout: limits.connectionTimeoutMs,
    requestTimeout: limits.requestTimeoutMs,
    keepAliveTimeout: limits.keepAliveTimeoutMs,
    ...(deps.https ? { https: { ...deps.https, ...serverOptions } } : { http: serverOptions }),
  } as Parameters<typeof Fastify>[0]) as unknown as FastifyInstance;

  app.decorateRequest('caller', undefined);
  app.decorateRequest('taskId', undefined);
  const guard = registerLimits(app, deps, limits, metrics);

  // One onRequest hook, callback-style, does what every request needs before its route: the
  // per-source budget, authentication, the per-identity budget, then the start-up gate. fastify pays
  // for each hook it runs, and a promise per request for what usually needs no I/O costs too
  // (docs/benchmarks.md, "Speed margins").
  const held = deps.held ?? (() => undefined);
  app.addHook('onRequest', (req, reply, done) => {
    const proceed = (): void => {
      try {
        guard.checkIdentity(req);
      } catch (err) {
        return done(err as Error);
      }
      const gate = held();
      if (gate === undefined) return done();
      gate.then(() => done(), done);
    };
    try {
      guard.checkSource(req);
    } catch (err) {
      return done(err as Error);
    }
    reply.header('x-request-id', req.id);
    // The API server's webhook checks its own token (kube-audit.ts); where to sign in is asked before one has any identity.
    if (!req.url.startsWith('/v1/') || isKubeAuditPath(req.url) || req.url === LOGIN_PATH) return proceed();
    const authenticators = deps.authenticators;
    // The same credential as the request before on this keep-alive connection: known without any work.
    const known = acceptedBefore(authenticators, req);
    if (known) {
      try {
        req.caller = guard.known(req, known);
      } catch (err) {
        return done(err as Error);
      }
      return proceed();
    }
    guard.authenticate(req, () => authenticate(authenticators, req)).then((caller) => {
      req.caller = caller;
      proceed();
    }, done);
  });

  app.addHook('onResponse', (req, reply, done) => {
    metrics.observeRequest(req.routeOptions.url ?? 'unmatched', req.method, reply.statusCode, reply.elapsedTime / 1000);
    done();
  });

  app.setErrorHandler(async (error: FastifyError | BrokerError, req: FastifyRequest, reply: FastifyReply) => {
    const err = toBrokerError(error);
    const status = statusOf(err.code);
    // Refusals the use cases did not already record (schema and body errors) are recorded here.
    if (!isBrokerError(error) && req.caller && status < 500) {
      await deps.audit
        .append({
          type: req.method === 'POST' && routePath(req) === '/v1/tasks' ? 'task.refused' : 'request.refused',
          actor: actorOf(req.caller),
          agent: req.caller.agent,
          outcome: 'denied',
          reason: `${err.code}${err.field ? ` (${err.field})` : ''}: ${err.message}`,
          requestId: req.id,
        })
        .catch(() => undefined);
    }
    if (status >= 500) log(`broker: ${req.method} ${routePath(req)} ${req.id}: ${err.code}: ${describeCause(error)}`);
    if (err instanceof RateLimitedError) reply.header('retry-after', String(err.retryAfterSeconds)).header('x-request-id', req.id);
    return reply.code(status).send({ error: { ...publicError(err, status), ...errorHint(err, deps) } });
  });

  app.setNotFoundHandler(async (_req, reply) => reply.code(404).send({ error: { code: 'not_found', message: 'no such endpoint' } }));

  app.get('/healthz', async () => 'ok\n');

  // Where people sign in (`broker login` with no --issuer): the policy's issuers that name a login client. Public, as an identity provider's discovery is.
  app.get(LOGIN_PATH, async () => ({ issuers: deps.loginIssuers?.() ?? [] }));
  app.get('/readyz', async (_req, reply) => {
    const problems = [!deps.store.synced && 'task watch not synced', !deps.audit.healthy && 'audit log unwritable'].filter(Boolean);
    if (problems.length) return reply.code(503).send(`not ready: ${problems.join(', ')}\n`);
    return 'ok\n';
  });
  app.get('/metrics', async (_req, reply) => {
    metrics.activeTasks.set(deps.store.list().filter((t) => t.state === 'active').length);
    const auditBytes = (deps.audit as { sizeBytes?: number }).sizeBytes;
    if (typeof auditBytes === 'number') metrics.auditLogBytes.set(auditBytes);
    reply.header('content-type', metrics.registry.contentType);
    return metrics.registry.metrics();
  });

  app.post<{ Body: StartBody }>('/v1/tasks', { schema: startSchema }, async (req, reply) => {
    const body = req.body;
    const task = await deps.tasks.start(
      req.caller!,
      { template: body.template, namespace: body.namespace, name: body.name, ttl: body.ttl, reason: body.reason, approvalToken: body.approvalToken },
      req.id,
    );
    metrics.tasksStarted.inc();
    req.taskId = task.id;
    return reply.code(201).send(toView(task));
  });

  // Read at each request: a policy reload swaps the service (src/server/reload.ts).
  if (deps.approvals) registerApprovalRoutes(app, () => deps.approvals!);
  registerKubeAuditRoute(app, { audit: deps.audit, metrics, guard, config: deps.kubeAudit });

  app.get('/v1/cluster', async (_req, reply) => {
    if (!deps.cluster) return reply.code(404).send({ error: { code: 'not_found', message: 'this broker does not publish its cluster' } });
    return deps.cluster;
  });

  registerAgentRoutes(app, deps); // /v1/agents: enrolment codes, enrolment, list, revoke (src/server/routes-agents.ts)
  registerInfoRoutes(app, deps); // GET /v1/whoami, /v1/templates, /v1/tasks[/:ref] (src/server/routes-info.ts)
  deps.console?.(app); // /ui: the web console (src/console/plugin.ts)

  // The ended task, and what it left behind as far as this broker's audit webhook recorded (kube-audit.ts).
  app.delete<{ Params: { ref: string } }>('/v1/tasks/:ref', { schema: { params: { type: 'object', properties: { ref: taskRef } } } }, async (req) => {
    const task = await deps.tasks.end(req.caller!, req.params.ref, req.id);
    req.taskId = task.id;
    return { ...toView(task), ...leftBehindReport(deps.kubeAudit, task.id) };
  });

  app.post<{ Params: { ref: string }; Querystring: { via?: 'direct' | 'proxy' } }>(
    '/v1/tasks/:ref/credential',
    {
      schema: {
        params: { type: 'object', properties: { ref: taskRef } },
        querystring: { type: 'object', properties: { via: { type: 'string', enum: ['direct', 'proxy'] } }, additionalProperties: false },
      },
    },
    async (req, reply) => {
      const credential =
        req.query.via === 'proxy' ? await deps.tasks.sessionCredential(req.caller!, req.params.ref, req.id) : await deps.tasks.credential(req.caller!, req.params.ref, req.id);
      metrics.credentials.inc();
      req.taskId = credential.taskId;
      return reply.type('application/json; charset=utf-8').send(credentialAnswer(credential));
    },
  );

  return app;
}

/**
 * Limits before work (src/server/limits.ts): connection caps on the server, and the aggregated record
 * of refused callers (flushed on a timer and on close). The per-source and per-identity budgets are
 * checked by the app's onRequest hook, before and after authentication.
 */
function registerLimits(app: FastifyInstance, deps: AppDeps, limits: Limits, metrics: Metrics): RequestGuard {
  guardConnections(app.server, limits, metrics);
  const failureLog = new AuthFailureLog({
    append: (event) => deps.audit.append(event),
    intervalMs: limits.failureLogIntervalMs,
    maxSources: limits.failureLogMaxSources,
  });
  const guard = new RequestGuard(limits, metrics, failureLog);
  app.addHook('onReady', async () => failureLog.start());
  app.addHook('onClose', async () => failureLog.close());
  return guard;
}

function registerApprovalRoutes(app: FastifyInstance, current: () => ApprovalService): void {
  const now = () => new Date();
  app.get<{ Querystring: { pending?: string } }>(
    '/v1/approvals',
    { schema: { querystring: { type: 'object', additionalProperties: false, properties: { pending: { type: 'string', enum: ['true', 'false'] } } } } },
    async (req) => {
      const all = (await current().visibleTo(req.caller!)).map((r) => approvalView(r, now()));
      return { approvals: req.query.pending === 'true' ? all.filter((r) => r.state === 'pending') : all };
    },
  );
  app.get<{ Params: { id: string } }>('/v1/approvals/:id', { schema: { params: { type: 'object', properties: { id: { type: 'string', maxLength: 64 } } } } }, async (req) => {
    const request = await current().view(req.caller!, req.params.id);
    const view = approvalView(request, now());
    // The requester collects its approval token here once the request is approved.
    if (view.state === 'approved' && request.requester.principal === req.caller!.principal) {
      return { ...view, approvalToken: await current().tokenFor(request, req.id) };
    }
    return view;
  });
  for (const decision of ['approve', 'deny'] as const) {
    app.post<{ Params: { id: string }; Body: { reason?: string } | null }>(
      `/v1/approvals/:id/${decision}`,
      { schema: decisionSchema(decision === 'deny') },
      async (req) => {
        const { request, token } = await current().decide(req.caller!, req.params.id, decision, req.body?.reason, req.id);
        return { ...approvalView(request, now()), ...(token ? { approvalToken: token } : {}) };
      },
    );
  }
}

/** The webhook's path, with or without a query string. */
function isKubeAuditPath(url: string): boolean {
  return url.startsWith(KUBE_AUDIT_PATH) && (url.length === KUBE_AUDIT_PATH.length || url[KUBE_AUDIT_PATH.length] === '?');
}

function routePath(req: FastifyRequest): string {
  return req.routeOptions.url ?? req.url.split('?')[0] ?? req.url;
}

/** The one place where framework errors become BrokerErrors. */
function toBrokerError(error: FastifyError | BrokerError): BrokerError {
  if (isBrokerError(error)) return error;
  const e = error as FastifyError & { validation?: Array<{ instancePath: string; keyword: string; params: Record<string, unknown>; message?: string }> };
  if (e.validation && e.validation.length > 0) {
    const v = e.validation[0]!;
    const base = v.instancePath.replace(/^\//, '').replaceAll('/', '.');
    const extra = (v.params['additionalProperty'] ?? v.params['missingProperty']) as string | undefined;
    const field = [base, extra].filter(Boolean).join('.') || (e.validationContext ?? 'body');
    const message =
      v.keyword === 'additionalProperties'
        ? `unknown field "${field}"`
        : v.keyword === 'required'
          ? `"${field}" is required`
          : `"${field}" ${v.message ?? 'is not valid'}`;
    return new BrokerError('invalid_argument', message, { field });
  }
  switch (e.code) {
    case 'FST_ERR_CTP_BODY_TOO_LARGE':
      return new BrokerError('body_too_large', 'the request body is too large');
    case 'FST_ERR_CTP_INVALID_JSON_BODY':
    case 'FST_ERR_CTP_EMPTY_JSON_BODY':
      return new BrokerError('bad_request', 'the request body is not valid JSON');
    case 'FST_ERR_CTP_INVALID_MEDIA_TYPE':
      return new BrokerError('bad_request', 'the request body must be application/json');
  }
  if (e.statusCode === 400 && e instanceof SyntaxError) return new BrokerError('bad_request', 'the request body is not valid JSON');
  return new BrokerError('internal', 'internal error', { cause: error });
}

/** What the client sees: for 5xx and 401 a fixed message per code, never the underlying error. */
function publicError(err: BrokerError, status: number): { code: ErrorCode; message: string; field?: string; requestId?: string } {
  if (err instanceof ApprovalRequiredError) return { code: err.code, message: err.message, requestId: err.requestId };
  if (err.code === 'unauthenticated') return { code: err.code, message: 'authentication failed: the broker did not accept the caller\'s credential' };
  if (err.code === 'audit_unavailable') return { code: err.code, message: 'the audit log cannot be written; the broker refuses to act without recording' };
  if (err.code === 'identity_provider_unavailable') return { code: err.code, message: 'the identity provider could not be reached to check the caller\'s token' };
  if (err.code === 'cluster_unavailable') return { code: err.code, message: 'the Kubernetes API server could not complete the broker\'s request' };
  if (status >= 500) return { code: err.code, message: 'internal error' };
  return { code: err.code, message: err.message, ...(err.field ? { field: err.field } : {}) };
}
