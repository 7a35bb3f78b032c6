/**
 * What a caller may read about itself: who it is (`GET /v1/whoami`), which templates it may start
 * (`GET /v1/templates`), and its tasks, active and ended (`GET /v1/tasks[?all=true]`,
 * `GET /v1/tasks/{ref}`, which falls back to the history). Nothing here changes any state.
 */
import type { FastifyInstance } from 'fastify';
import type { BrokerError } from '../errors.ts';
import type { GatedPair } from '../policy/types.ts';
import { AgentKeyAuthenticator } from '../identity/agent-key-authenticator.ts';
import { OidcAuthenticator } from '../identity/oidc.ts';
import { toView } from '../tasks/model.ts';
import type { AppDeps } from './app.ts';

/** A template as `GET /v1/templates` shows it to a caller who may start it. TTLs in seconds. */
export interface TemplateView {
  name: string;
  description?: string;
  namespaces: string[];
  ttl: { default: number; max: number };
  /** Whether a start needs an approval: its rules (or its ClusterRole's, read now) hit the gated set. */
  gated: boolean;
  /** What makes it gated: `create pods/exec`, `get secrets`, ... */
  gatedBecause?: string[];
  approval?: { approvers: string[]; required: number };
}

export interface WhoamiView {
  subject: string;
  method: string;
  agent: string | null;
  principal: string;
  approverGroups: string[];
}

const taskRef = { type: 'string', minLength: 1, maxLength: 63 } as const;

function pairText(p: GatedPair): string {
  return `${p.verb} ${p.apiGroup && p.apiGroup !== '*' ? `${p.apiGroup}/` : ''}${p.resource}`;
}

export function registerInfoRoutes(app: FastifyInstance, deps: AppDeps): void {
  app.get('/v1/whoami', async (req): Promise<WhoamiView> => {
    const caller = req.caller!;
    return {
      subject: caller.subject,
      method: caller.method,
      agent: caller.agent || null,
      principal: caller.principal,
      approverGroups: deps.approvals?.groupsOf(caller) ?? [],
    };
  });

  app.get('/v1/templates', async (req): Promise<{ templates: TemplateView[] }> => {
    const templates = await Promise.all(
      deps.tasks.templatesFor(req.caller!).map(async (t): Promise<TemplateView> => {
        let because: string[];
        try {
          because = (await deps.tasks.gatedHits(t)).hits.map(pairText);
        } catch {
          // A start reads the ClusterRole too and refuses while it cannot (fail closed).
          because = ['unknown: ClusterRole unreadable'];
        }
        return {
          name: t.name,
          ...(t.description === undefined ? {} : { description: t.description }),
          namespaces: t.namespaces,
          ttl: { default: t.defaultTtl, max: t.maxTtl },
          gated: because.length > 0,
          ...(because.length > 0 ? { gatedBecause: because, approval: deps.tasks.approvalOf(t) } : {}),
        };
      }),
    );
    return { templates };
  });

  app.get<{ Querystring: { all?: 'true' | 'false' } }>(
    '/v1/tasks',
    { schema: { querystring: { type: 'object', additionalProperties: false, properties: { all: { type: 'string', enum: ['true', 'false'] } } } } },
    async (req) => ({ tasks: req.query.all === 'true' ? await deps.tasks.listAll(req.caller!) : deps.tasks.list(req.caller!).map(toView) }),
  );

  app.get<{ Params: { ref: string } }>('/v1/tasks/:ref', { schema: { params: { type: 'object', properties: { ref: taskRef } } } }, async (req) =>
    deps.tasks.show(req.caller!, req.params.ref, req.id),
  );
}

/**
 * What a refused identity should try: the audience the broker expects. The 401's message stays
 * fixed; this names nothing of the token that was sent.
 */
export function errorHint(err: BrokerError, deps: AppDeps): { hint?: string } {
  if (err.code !== 'unauthenticated') return {};
  const audience = (deps.tasks as { identityAudience?: string }).identityAudience;
  if (typeof audience !== 'string') return {};
  // The other identities this broker takes, when the policy has them (src/identity/authenticators.ts).
  const issuers = deps.authenticators.flatMap((a) => (a instanceof OidcAuthenticator ? a.issuers : []));
  const keys = deps.authenticators.some((a) => a instanceof AgentKeyAuthenticator);
  return {
    hint:
      `the broker takes a Kubernetes ServiceAccount token with the audience "${audience}", unexpired, of a ServiceAccount the policy names (for example: kubectl create token NAME --namespace NS --audience ${audience})` +
      (issuers.length ? `; an OIDC token of ${issuers.join(', ')} for a subject the policy names (broker login, or a CI system's token)` : '') +
      (keys ? '; or a proof signed with an enrolled agent key (broker agent enroll)' : ''),
  };
}
