/**
 * The approval workflow: a gated start becomes a request; approvers (never the requester, each once)
 * approve or deny it; once enough approve, the broker signs an approval token that the requester uses
 * exactly once to start exactly that task. Every step is audited before it is acknowledged.
 */
import type { AuditLog } from '../audit/log.ts';
import { BrokerError } from '../errors.ts';
import { actorOf, type Caller } from '../identity/types.ts';
import { clusterError, isConflict, isNotFound, type KubeApis } from '../kube/config.ts';
import type { Identity, Policy, Template } from '../policy/types.ts';
import {
  APPROVAL_SELECTOR,
  approvalCount,
  configMapName,
  effectiveState,
  fromConfigMap,
  newRequestId,
  rulesHash,
  toConfigMap,
  type ApprovalRequest,
} from './model.ts';
import { Notifier } from './notify.ts';
import { ApprovalKeys, signApproval, verifyApproval, type ApprovalClaims } from './token.ts';

/** How long a signed approval token is valid. */
export const APPROVAL_TOKEN_SECONDS = 10 * 60;

export interface GatedStart {
  template: Template;
  namespace: string;
  name: string;
  ttl: number;
  reason?: string | undefined;
}

export class ApprovalRequiredError extends BrokerError {
  readonly requestId: string;
  constructor(requestId: string, message: string) {
    super('approval_required', message);
    this.requestId = requestId;
  }
}

export class ApprovalService {
  readonly #kube: KubeApis;
  readonly #policy: Policy;
  readonly #audit: AuditLog;
  readonly #keys: ApprovalKeys;
  readonly #notifier: Notifier | undefined;
  readonly #now: () => Date;

  constructor(kube: KubeApis, policy: Policy, audit: AuditLog, options: { now?: () => Date; notifier?: Notifier } = {}) {
    this.#kube = kube;
    this.#policy = policy;
    this.#audit = audit;
    this.#keys = new ApprovalKeys(kube, policy.broker.taskNamespace);
    this.#now = options.now ?? (() => new Date());
    this.#notifier = options.notifier ?? (policy.broker.notifyWebhook ? new Notifier(policy.broker.notifyWebhook) : undefined);
  }

  get #ns(): string {
    return this.#policy.broker.taskNamespace;
  }

  /** Approver groups a caller belongs to. */
  groupsOf(caller: Caller): string[] {
    return this.#policy.approverGroups.filter((g) => g.members.some((m) => matches(m, caller))).map((g) => g.name);
  }

  /**
   * A gated start without a token: records (or finds) the pending request and refuses with its id.
   * With a token: checks it against exactly this start and consumes it. Returns the approval id.
   */
  async authorize(caller: Caller, start: GatedStart, approvalToken: string | undefined, requestId?: string): Promise<string> {
    if (approvalToken === undefined) {
      const request = await this.#requestFor(caller, start, requestId);
      throw new ApprovalRequiredError(
        request.id,
        `template "${start.template.name}" is gated: ${request.required} approval(s) needed from ${request.approvers.join(', ')}; request ${request.id}`,
      );
    }
    return this.#consume(caller, start, approvalToken, requestId);
  }

  /** The open request for this exact start by this caller, or a new one. */
  async #requestFor(caller: Caller, start: GatedStart, requestId?: string): Promise<ApprovalRequest> {
    const now = this.#now();
    const hash = rulesHash(start.template);
    const open = (await this.list()).find(
      (r) =>
        r.requester.subject === caller.subject &&
        r.template === start.template.name &&
        r.namespace === start.namespace &&
        r.name === start.name &&
        r.ttl === start.ttl &&
        r.rulesHash === hash &&
        ['pending', 'approved'].includes(effectiveState(r, now)),
    );
    if (open) return open;
    const requirement = start.template.approval ?? this.#policy.defaultApproval;
    const request: ApprovalRequest = {
      id: newRequestId(),
      requester: { agent: caller.agent, subject: caller.subject },
      template: start.template.name,
      namespace: start.namespace,
      name: start.name,
      ttl: start.ttl,
      ...(start.reason === undefined ? {} : { reason: start.reason }),
      rulesHash: hash,
      approvers: requirement.approvers,
      required: requirement.required,
      createdAt: now.toISOString(),
      expiresAt: new Date(now.getTime() + this.#policy.broker.approvalRequestTtl * 1000).toISOString(),
      state: 'pending',
      decisions: [],
    };
    await this.#audit.append({
      type: 'approval.requested',
      actor: actorOf(caller),
      agent: caller.agent,
      taskName: start.name,
      template: start.template.name,
      namespace: start.namespace,
      outcome: 'ok',
      expiresAt: request.expiresAt,
      requestId,
      ...(start.reason ? { reason: start.reason } : {}),
      details: { approvalRequest: request.id, required: request.required, approvers: request.approvers },
    });
    try {
      await this.#kube.core.createNamespacedConfigMap({ namespace: this.#ns, body: toConfigMap(request) });
    } catch (err) {
      throw clusterError('storing the approval request', err);
    }
    this.#notifier?.notify(request);
    return request;
  }

  async list(): Promise<ApprovalRequest[]> {
    try {
      const list = await this.#kube.core.listNamespacedConfigMap({ namespace: this.#ns, labelSelector: APPROVAL_SELECTOR });
      return list.items.map(fromConfigMap).filter((r): r is ApprovalRequest => r !== undefined).sort((a, b) => a.createdAt.localeCompare(b.createdAt));
    } catch (err) {
      throw clusterError('listing approval requests', err);
    }
  }

  async get(id: string): Promise<ApprovalRequest> {
    if (!/^ar-[0-9a-f]{12}$/.test(id)) throw new BrokerError('not_found', `no approval request "${id}"`);
    let cm;
    try {
      cm = await this.#kube.core.readNamespacedConfigMap({ name: configMapName(id), namespace: this.#ns });
    } catch (err) {
      if (isNotFound(err)) throw new BrokerError('not_found', `no approval request "${id}"`);
      throw clusterError('reading the approval request', err);
    }
    const request = fromConfigMap(cm);
    if (!request) throw new BrokerError('internal', `approval request ${id} is unreadable`);
    return request;
  }

  /** Requests the caller may see: its own, and those it may decide. */
  async visibleTo(caller: Caller): Promise<ApprovalRequest[]> {
    const groups = new Set(this.groupsOf(caller));
    return (await this.list()).filter((r) => r.requester.subject === caller.subject || r.approvers.some((g) => groups.has(g)));
  }

  async view(caller: Caller, id: string): Promise<ApprovalRequest> {
    const request = await this.get(id);
    const groups = this.groupsOf(caller);
    if (request.requester.subject !== caller.subject && !request.approvers.some((g) => groups.includes(g))) {
      throw new BrokerError('forbidden', `approval request ${id} is neither yours nor one you may decide`);
    }
    return request;
  }

  /**
   * Records an approver's decision. Refused (and audited): the requester itself, anyone outside the
   * request's approver groups, a second decision by the same approver, a request no longer pending.
   */
  async decide(caller: Caller, id: string, decision: 'approve' | 'deny', reason: string | undefined, requestId?: string): Promise<{ request: ApprovalRequest; token?: string }> {
    const actor = actorOf(caller);
    const refuse = async (code: 'forbidden' | 'approval_closed', why: string): Promise<never> => {
      await this.#audit.append({ type: 'approval.refused', actor, outcome: 'denied', reason: `${code}: ${why}`, requestId, details: { approvalRequest: id, decision } });
      throw new BrokerError(code, why);
    };
    for (let attempt = 0; ; attempt++) {
      const request = await this.get(id);
      const now = this.#now();
      if (request.requester.subject === caller.subject) await refuse('forbidden', `${caller.subject} requested ${id} and cannot decide it`);
      const groups = this.groupsOf(caller).filter((g) => request.approvers.includes(g));
      if (groups.length === 0) await refuse('forbidden', `${caller.subject} is not an approver of ${id} (approvers: ${request.approvers.join(', ')})`);
      const state = effectiveState(request, now);
      if (state !== 'pending') await refuse('approval_closed', `approval request ${id} is ${state}`);
      if (request.decisions.some((d) => d.subject === caller.subject)) await refuse('forbidden', `${caller.subject} has already decided ${id}`);

      request.decisions.push({ subject: caller.subject, decision, ...(reason ? { reason } : {}), at: now.toISOString() });
      if (decision === 'deny') request.state = 'denied';
      else if (approvalCount(request) >= request.required) request.state = 'approved';
      try {
        await this.#kube.core.replaceNamespacedConfigMap({ name: configMapName(id), namespace: this.#ns, body: toConfigMap(request) });
      } catch (err) {
        if (isConflict(err) && attempt < 5) continue; // another decision landed first: re-read and re-check
        throw clusterError('recording the decision', err);
      }
      await this.#audit.append({
        type: decision === 'deny' ? 'approval.denied' : 'approval.granted',
        actor,
        agent: request.requester.agent,
        taskName: request.name,
        template: request.template,
        namespace: request.namespace,
        outcome: 'ok',
        requestId,
        ...(reason ? { reason } : {}),
        details: { approvalRequest: id, approver: caller.subject, groups, approvals: approvalCount(request), required: request.required, state: request.state },
      });
      if (request.state !== 'approved') return { request };
      return { request, token: await this.tokenFor(request, requestId) };
    }
  }

  /** A fresh approval token for an approved request (each has its own id; the request is used once). */
  async tokenFor(request: ApprovalRequest, requestId?: string): Promise<string> {
    const seconds = Math.min(APPROVAL_TOKEN_SECONDS, Math.max(1, Math.floor((new Date(request.expiresAt).getTime() - this.#now().getTime()) / 1000)));
    const signed = await signApproval(
      this.#keys,
      {
        rid: request.id,
        sub: request.requester.subject,
        agent: request.requester.agent,
        template: request.template,
        namespace: request.namespace,
        name: request.name,
        ttl: request.ttl,
        rulesHash: request.rulesHash,
      },
      seconds,
    );
    await this.#audit.append({
      type: 'approval.token_issued',
      actor: 'system:broker',
      agent: request.requester.agent,
      template: request.template,
      namespace: request.namespace,
      outcome: 'ok',
      jti: signed.jti,
      expiresAt: new Date(signed.exp * 1000).toISOString(),
      requestId,
      details: { approvalRequest: request.id },
    });
    return signed.token;
  }

  /** Checks a token against exactly this start by exactly this caller, then marks the request used. */
  async #consume(caller: Caller, start: GatedStart, token: string, requestId?: string): Promise<string> {
    const base = { actor: actorOf(caller), agent: caller.agent, template: start.template.name, namespace: start.namespace, taskName: start.name, requestId };
    const refuse = async (why: string, claims?: ApprovalClaims): Promise<never> => {
      await this.#audit.append({
        ...base,
        type: 'approval.refused',
        outcome: 'denied',
        reason: `approval_invalid: ${why}`,
        ...(claims ? { jti: claims.jti, details: { approvalRequest: claims.rid } } : {}),
      });
      throw new BrokerError('approval_invalid', why, { field: 'approvalToken' });
    };
    let claims: ApprovalClaims;
    try {
      claims = await verifyApproval(this.#keys, token);
    } catch (err) {
      return refuse(err instanceof BrokerError ? err.message : 'the approval token is not valid');
    }
    if (claims.sub !== caller.subject) return refuse(`the approval token was issued to ${claims.sub}, not ${caller.subject}`, claims);
    if (claims.template !== start.template.name) return refuse(`the approval token is for template "${claims.template}", not "${start.template.name}"`, claims);
    if (claims.namespace !== start.namespace) return refuse(`the approval token is for namespace "${claims.namespace}", not "${start.namespace}"`, claims);
    if (claims.name !== start.name) return refuse(`the approval token is for task "${claims.name}", not "${start.name}"`, claims);
    if (start.ttl > claims.ttl) return refuse(`the approval token grants at most ${claims.ttl} s, not ${start.ttl} s`, claims);
    if (claims.rulesHash !== rulesHash(start.template)) return refuse(`template "${start.template.name}" changed since it was approved`, claims);

    for (let attempt = 0; ; attempt++) {
      let request: ApprovalRequest;
      try {
        request = await this.get(claims.rid);
      } catch (err) {
        if (err instanceof BrokerError && err.code === 'not_found') return refuse(`approval request ${claims.rid} does not exist`, claims);
        throw err;
      }
      const state = effectiveState(request, this.#now());
      if (state === 'used') return refuse(`approval request ${claims.rid} was already used (replay)`, claims);
      if (state !== 'approved') return refuse(`approval request ${claims.rid} is ${state}`, claims);
      request.state = 'used';
      try {
        // Compare-and-swap on resourceVersion: of two replicas consuming at once, one wins.
        await this.#kube.core.replaceNamespacedConfigMap({ name: configMapName(request.id), namespace: this.#ns, body: toConfigMap(request) });
      } catch (err) {
        if (isConflict(err) && attempt < 5) continue;
        throw clusterError('consuming the approval', err);
      }
      await this.#audit.append({ ...base, type: 'approval.used', outcome: 'ok', jti: claims.jti, details: { approvalRequest: request.id } });
      return request.id;
    }
  }

  /** A pending request for the caller's task NAME, if any (for the exec plugin's message). */
  async pendingFor(caller: Caller, name: string): Promise<ApprovalRequest | undefined> {
    const now = this.#now();
    return (await this.list()).find((r) => r.requester.subject === caller.subject && r.name === name && effectiveState(r, now) === 'pending');
  }

  /** Deletes requests that ended (denied, used, expired) more than `keepMs` ago. */
  async sweep(keepMs: number): Promise<number> {
    const cutoff = this.#now().getTime() - keepMs;
    let removed = 0;
    for (const r of await this.list()) {
      const state = effectiveState(r, this.#now());
      const endedAt = new Date(state === 'expired' ? r.expiresAt : (r.decisions.at(-1)?.at ?? r.expiresAt)).getTime();
      if ((state === 'denied' || state === 'used' || state === 'expired') && endedAt < cutoff) {
        await this.#kube.core.deleteNamespacedConfigMap({ name: configMapName(r.id), namespace: this.#ns }).then(() => removed++, () => undefined);
      }
    }
    return removed;
  }
}

function matches(identity: Identity, caller: Caller): boolean {
  switch (identity.kind) {
    case 'serviceAccount':
      return caller.method === 'serviceAccount' && identity.username === caller.subject;
    case 'oidc':
      return caller.method === 'oidc' && `${identity.issuer}#${identity.subject}` === caller.subject;
    case 'oidcGroup':
      return caller.method === 'oidc' && caller.subject.startsWith(`${identity.issuer}#`) && (caller.groups ?? []).includes(identity.group);
  }
}
