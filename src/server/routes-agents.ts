/**
 * Agent keys over the API (docs/api.md): an administrator registers an agent (a one-time enrolment
 * code), the agent enrols its public key with that code, an administrator lists and revokes keys.
 * Revoking forgets the key at once and ends every active task of the agent.
 */
import type { FastifyInstance, FastifyRequest } from 'fastify';
import { BrokerError } from '../errors.ts';
import { AgentKeyAuthenticator, ENROL_PATH } from '../identity/agent-key-authenticator.ts';
import { publicKeyOf } from '../identity/agent-proof.ts';
import { actorOf, type Caller } from '../identity/types.ts';
import { DNS_LABEL_PATTERN } from '../policy/schema.ts';
import { toView } from '../tasks/model.ts';
import type { AppDeps } from './app.ts';

// An agent name is a DNS label (the policy's own rule): nothing else of the caller's text reaches a message or record.
const agentParam = { params: { type: 'object', properties: { name: { type: 'string', pattern: DNS_LABEL_PATTERN } } } } as const;

export function registerAgentRoutes(app: FastifyInstance, deps: AppDeps): void {
  const keys = (): AgentKeyAuthenticator => {
    const a = deps.authenticators.find((x): x is AgentKeyAuthenticator => x instanceof AgentKeyAuthenticator);
    if (!a) throw new BrokerError('not_found', 'this broker does not take agent keys');
    return a;
  };
  /** The caller, when it is a member of one of the policy's `administrators` groups; else 403. */
  const admin = (req: FastifyRequest): Caller => {
    const caller = req.caller!;
    const groups = deps.approvals?.groupsOf(caller) ?? [];
    const administrators = keys().administrators;
    if (caller.method === 'enrolmentCode' || !groups.some((g) => administrators.includes(g))) {
      throw new BrokerError('forbidden', `${caller.subject} is not an administrator (members of the policy's "administrators" groups: ${administrators.join(', ') || 'none'})`);
    }
    return caller;
  };
  const refuse = async (req: FastifyRequest, type: string, err: unknown, agent?: string): Promise<never> => {
    if (err instanceof BrokerError && req.caller) {
      await deps.audit.append({ type, actor: actorOf(req.caller), ...(agent ? { agent } : {}), outcome: 'denied', reason: `${err.code}: ${err.message}`, requestId: req.id });
    }
    throw err;
  };

  app.post<{ Params: { name: string } }>('/v1/agents/:name/enrolment', { schema: agentParam }, async (req, reply) => {
    const name = req.params.name;
    let caller: Caller;
    try {
      caller = admin(req);
      if (!keys().isAgent(name)) throw new BrokerError('not_found', `agent "${name}" is not in the policy`, { field: 'name' });
    } catch (err) {
      return refuse(req, 'agent.register_refused', err, name);
    }
    const { code, expiresAt } = await keys().store.register(name, actorOf(caller));
    // Recorded before the code leaves; the code itself is never recorded.
    await deps.audit.append({ type: 'agent.registered', actor: actorOf(caller), agent: name, outcome: 'ok', requestId: req.id, details: { expiresAt } });
    return reply.code(201).send({ agent: name, code, expiresAt });
  });

  app.post<{ Body: { publicKey: string } }>(
    ENROL_PATH,
    { schema: { body: { type: 'object', additionalProperties: false, required: ['publicKey'], properties: { publicKey: { type: 'string', minLength: 43, maxLength: 43 } } } } },
    async (req, reply) => {
      const caller = req.caller!;
      if (caller.method !== 'enrolmentCode') throw new BrokerError('forbidden', `enrolment takes an enrolment code ("Authorization: Enrolment CODE"), not ${caller.method}`);
      if (!publicKeyOf(req.body.publicKey)) throw new BrokerError('invalid_argument', '"publicKey" must be a raw Ed25519 public key, 32 bytes base64url', { field: 'publicKey' });
      const record = await keys().store.enrol(caller.agent, req.body.publicKey);
      await deps.audit.append({
        type: 'agent.enrolled',
        actor: `agent:${caller.agent}`,
        agent: caller.agent,
        outcome: 'ok',
        requestId: req.id,
        details: { fingerprint: record.fingerprint },
      });
      return reply.code(201).send({ agent: record.agent, fingerprint: record.fingerprint, enrolledAt: record.enrolledAt });
    },
  );

  app.get('/v1/agents', async (req) => {
    admin(req);
    const active = deps.store.list().filter((t) => t.state === 'active');
    return {
      agents: keys()
        .store.list()
        .map((a) => ({
          name: a.agent,
          key: a.key ? { fingerprint: a.key.fingerprint, enrolledAt: a.key.enrolledAt } : null,
          enrolment: a.enrolment ? { expiresAt: a.enrolment.expiresAt, createdBy: a.enrolment.createdBy } : null,
          activeTasks: active.filter((t) => t.agent === a.agent).length,
        })),
    };
  });

  app.delete<{ Params: { name: string } }>('/v1/agents/:name/key', { schema: agentParam }, async (req) => {
    const name = req.params.name;
    let caller: Caller;
    try {
      caller = admin(req);
    } catch (err) {
      return refuse(req, 'agent.revoke_refused', err, name);
    }
    const had = await keys().store.revoke(name);
    if (!had) throw new BrokerError('not_found', `agent "${name}" has no enrolled key`, { field: 'name' });
    await deps.audit.append({ type: 'agent.revoked', actor: actorOf(caller), agent: name, outcome: 'ok', requestId: req.id, details: { fingerprint: had.fingerprint } });
    // Then every task of the agent ends, whichever identity started it: access goes with the agent.
    const ended = [];
    for (const task of deps.store.list().filter((t) => t.agent === name && t.state === 'active')) {
      await deps.tasks.endTask(task, 'ended', actorOf(caller), req.id);
      ended.push(toView(task));
    }
    return { agent: name, fingerprint: had.fingerprint, tasksEnded: ended };
  });
}
