/**
 * The approval workflow: a gated start becomes a request; approvers (never the requester, each
 * principal once) approve or deny it; once enough approve, the broker signs an approval token that the
 * requester uses exactly once to start exactly that task. Every decision is recorded before the
 * cluster changes (write-ahead), and every request read back is verified (its signature) before it is
 * trusted: one that fails is treated as absent, and recorded.
 */
import type { AuditSink } from '../audit/sink.ts';
import { BrokerError } from '../errors.ts';
import { actorOf, type Caller } from '../identity/types.ts';
import { clusterError, isConflict, isNotFound, type KubeApis } from '../kube/config.ts';
import type { ApproverMember, Policy } from '../policy/types.ts';
import { StateSigner } from '../state-signature.ts';
import { ApprovalRequiredError, type GatedStart, type StartGate } from '../tasks/gate.ts';
import { checkFreeText } from '../text.ts';
import type { V1ConfigMap } from '@kubernetes/client-node';
import {
  APPROVAL_SELECTOR,
  approvalCount,
  approvalData,
  approvalFacts,
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


export { ApprovalRequiredError, type GatedStart };

export class ApprovalService implements StartGate {
  readonly #kube: KubeApis;
  readonly #policy: Policy;
  readonly #audit: AuditSink;
  readonly #keys: ApprovalKeys;
  readonly #notifier: Notifier | undefined;
  readonly #now: () => Date;
  readonly #signer: StateSigner;
  /** Forged records already on record (name@resourceVersion), so each is recorded once. */
  readonly #forgedSeen = new Set<string>();

  constructor(
    kube: KubeApis,
    policy: Policy,
    audit: AuditSink,
    options: { now?: () => Date; notifier?: Notifier; keys?: ApprovalKeys; signer?: StateSigner } = {},
  ) {
    this.#kube = kube;
    this.#policy = policy;
    this.#audit = audit;
    this.#keys = options.keys ?? new ApprovalKeys(kube, policy.broker.namespace);
    this.#signer = options.signer ?? new StateSigner(this.#keys);
    this.#now = options.now ?? (() => new Date());
    this.#notifier = options.notifier ?? (policy.broker.notifyWebhook ? new Notifier(policy.broker.notifyWebhook) : undefined);
  }

  get #ns(): string {
    return this.#policy.broker.namespace;
  }

  /** Approver groups a caller belongs to. Agents never approve (policy check keeps their identities out of groups). */
  groupsOf(caller: Caller): string[] {
    if (caller.agent) return [];
    return this.#policy.approverGroups.filter((g) => g.members.some((m) => matches(m, caller))).map((g) => g.name);
  }

  /** Signs and stores a request: created when new, else replaced by compare-and-swap on resourceVersion. */
  async #store(request: ApprovalRequest, create: boolean): Promise<void> {
    const name = configMapName(request.id);
    const signature = await this.#signer.sign('approval', approvalFacts(name, approvalData(request)));
    const body = toConfigMap(request, signature);
    if (create) await this.#kube.core.createNamespacedConfigMap({ namespace: this.#ns, body });
    else await this.#kube.core.replaceNamespacedConfigMap({ name, namespace: this.#ns, body });
  }

  /** The request a ConfigMap holds, if the broker's signature over it holds; else recorded and undefined. */
  async #trusted(cm: V1ConfigMap): Promise<ApprovalRequest | undefined> {
    const name = cm.metadata?.name ?? '';
    const request = fromConfigMap(cm);
    const ok = request !== undefined && configMapName(request.id) === name && (await this.#signer.verify('approval', approvalFacts(name, cm.data ?? {}), request.signature));
    if (ok) return request;
    const key = `${name}@${cm.metadata?.resourceVersion ?? ''}`;
    if (!this.#forgedSeen.has(key)) {
      this.#forgedSeen.add(key);
      await this.#audit.append({
        type: 'approval.forged',
        actor: 'system:broker',
        outcome: 'denied',
        reason: 'an approval record in the cluster does not carry a valid broker signature: it was changed outside the broker and is ignored',
        details: { object: name },
      });
    }
    return undefined;
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
    const hash = rulesHash(start.template, start.clusterRoleRules);
    const all = await this.list();
    const open = all.find(
      (r) =>
        r.requester.principal === caller.principal &&
        r.template === start.template.name &&
        r.namespace === start.namespace &&
        r.name === start.name &&
        r.ttl === start.ttl &&
        r.rulesHash === hash &&
        ['pending', 'approved'].includes(effectiveState(r, now)),
    );
    if (open) return open;
    const limit = this.#policy.broker.limits.openApprovalsPerAgent;
    const pending = all.filter((r) => r.requester.principal === caller.principal && effectiveState(r, now) === 'pending').length;
    if (pending >= limit) {
      throw new BrokerError(
        'quota_exceeded',
        `${caller.agent ? `agent "${caller.agent}"` : caller.subject} already has ${pending} approval requests open, the most the policy allows (broker.limits.openApprovalsPerAgent: ${limit})`,
      );
    }
    const requirement = start.template.approval ?? this.#policy.defaultApproval;
    const request: ApprovalRequest = {
      id: newRequestId(),
      requester: { agent: caller.agent, subject: caller.subject, principal: caller.principal },
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
      await this.#store(request, true);
    } catch (err) {
      throw clusterError('storing the approval request', err);
    }
    this.#notifier?.notify(request);
    return request;
  }

  async list(): Promise<ApprovalRequest[]> {
    let list;
    try {
      list = await this.#kube.core.listNamespacedConfigMap({ namespace: this.#ns, labelSelector: APPROVAL_SELECTOR });
    } catch (err) {
      throw clusterError('listing approval requests', err);
    }
    const trusted = await Promise.all(list.items.map((cm) => this.#trusted(cm)));
    return trusted.filter((r): r is ApprovalRequest => r !== undefined).sort((a, b) => a.createdAt.localeCompare(b.createdAt));
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
    const request = await this.#trusted(cm);
    if (!request) throw new BrokerError('not_found', `no approval request "${id}"`);
    return request;
  }

  /** Requests the caller may see: its own, and those it may decide. */
  async visibleTo(caller: Caller): Promise<ApprovalRequest[]> {
    const groups = new Set(this.groupsOf(caller));
    return (await this.list()).filter((r) => r.requester.principal === caller.principal || r.approvers.some((g) => groups.has(g)));
  }

  async view(caller: Caller, id: string): Promise<ApprovalRequest> {
    const request = await this.get(id);
    const groups = this.groupsOf(caller);
    if (request.requester.principal !== caller.principal && !request.approvers.some((g) => groups.includes(g))) {
      throw new BrokerError('forbidden', `approval request ${id} is neither yours nor one you may decide`);
    }
    return request;
  }

  /**
   * Records an approver's decision. Refused (and audited): the requester's principal (any of its
   * identities), anyone outside the request's approver groups, a second decision by the same principal,
   * a request no longer pending. The decision is on record before the cluster changes; a write that
   * then fails is recorded as such.
   */
  /**
   * `issueToken: false` (the web console, whose answer is a page, not a token to hand on): the final
   * approval signs no token; the requester collects one with `GET /v1/approvals/ID` as always.
   */
  async decide(
    caller: Caller,
    id: string,
    decision: 'approve' | 'deny',
    reason: string | undefined,
    requestId?: string,
    options: { issueToken?: boolean } = {},
  ): Promise<{ request: ApprovalRequest; token?: string }> {
    const actor = actorOf(caller);
    const refuse = async (code: 'forbidden' | 'approval_closed', why: string): Promise<never> => {
      await this.#audit.append({ type: 'approval.refused', actor, outcome: 'denied', reason: `${code}: ${why}`, requestId, details: { approvalRequest: id, decision } });
      throw new BrokerError(code, why);
    };
    try {
      checkFreeText('reason', reason);
    } catch (err) {
      await this.#audit.append({ type: 'approval.refused', actor, outcome: 'denied', reason: `invalid_argument (reason): ${(err as Error).message}`, requestId, details: { approvalRequest: id, decision } });
      throw err;
    }
    for (let attempt = 0; ; attempt++) {
      const request = await this.get(id);
      const now = this.#now();
      if (request.requester.principal === caller.principal) {
        await refuse('forbidden', `${caller.subject} is ${caller.principal}, who requested ${id}, and cannot decide it`);
      }
      if (caller.agent) await refuse('forbidden', `${caller.subject} is an identity of agent "${caller.agent}"; agents do not approve`);
      const groups = this.groupsOf(caller).filter((g) => request.approvers.includes(g));
      if (groups.length === 0) await refuse('forbidden', `${caller.subject} is not an approver of ${id} (approvers: ${request.approvers.join(', ')})`);
      const state = effectiveState(request, now);
      if (state !== 'pending') await refuse('approval_closed', `approval request ${id} is ${state}`);
      if (request.decisions.some((d) => d.principal === caller.principal)) await refuse('forbidden', `${caller.principal} has already decided ${id}`);

      request.decisions.push({ subject: caller.subject, principal: caller.principal, decision, ...(reason ? { reason } : {}), at: now.toISOString() });
      if (decision === 'deny') request.state = 'denied';
      else if (approvalCount(request) >= request.required) request.state = 'approved';
      const facts = {
        actor,
        agent: request.requester.agent,
        taskName: request.name,
        template: request.template,
        namespace: request.namespace,
        requestId,
      };
      // Write-ahead: the decision is on record before it takes effect; an unwritable log stops it here.
      await this.#audit.append({
        ...facts,
        type: decision === 'deny' ? 'approval.denied' : 'approval.granted',
        outcome: 'ok',
        ...(reason ? { reason } : {}),
        details: { approvalRequest: id, approver: caller.subject, principal: caller.principal, groups, approvals: approvalCount(request), required: request.required, state: request.state },
      });
      try {
        await this.#store(request, false);
      } catch (err) {
        const conflict = isConflict(err) && attempt < 5;
        await this.#audit.append({
          ...facts,
          type: 'approval.decision_failed',
          outcome: 'error',
          reason: conflict ? 'another decision landed first: re-reading the request and deciding again' : 'the decision could not be stored; it did not take effect',
          details: { approvalRequest: id, approver: caller.subject },
        });
        if (conflict) continue;
        throw clusterError('recording the decision', err);
      }
      if (request.state !== 'approved' || options.issueToken === false) return { request };
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
        sub: request.requester.principal,
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
    if (claims.sub !== caller.principal) return refuse(`the approval token was issued to ${claims.sub}, not ${caller.principal}`, claims);
    if (claims.template !== start.template.name) return refuse(`the approval token is for template "${claims.template}", not "${start.template.name}"`, claims);
    if (claims.namespace !== start.namespace) return refuse(`the approval token is for namespace "${claims.namespace}", not "${start.namespace}"`, claims);
    if (claims.name !== start.name) return refuse(`the approval token is for task "${claims.name}", not "${start.name}"`, claims);
    if (start.ttl > claims.ttl) return refuse(`the approval token grants at most ${claims.ttl} s, not ${start.ttl} s`, claims);
    if (claims.rulesHash !== rulesHash(start.template, start.clusterRoleRules)) return refuse(`template "${start.template.name}" changed since it was approved`, claims);

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
      // Write-ahead, then compare-and-swap on resourceVersion: of two replicas consuming at once, one wins.
      await this.#audit.append({ ...base, type: 'approval.used', outcome: 'ok', jti: claims.jti, details: { approvalRequest: request.id } });
      try {
        await this.#store(request, false);
      } catch (err) {
        const conflict = isConflict(err) && attempt < 5;
        await this.#audit.append({
          ...base,
          type: 'approval.use_failed',
          outcome: 'error',
          reason: conflict ? 'the request changed meanwhile: re-reading it' : 'the approval could not be consumed; nothing was started',
          jti: claims.jti,
          details: { approvalRequest: request.id },
        });
        if (conflict) continue;
        throw clusterError('consuming the approval', err);
      }
      return request.id;
    }
  }

  /** The caller's request for task NAME still waiting for approvals, if any (for the exec plugin's message). */
  async waitingFor(caller: Caller, name: string): Promise<{ id: string; approvals: number; required: number } | undefined> {
    const now = this.#now();
    const r = (await this.list()).find((r) => r.requester.principal === caller.principal && r.name === name && effectiveState(r, now) === 'pending');
    return r && { id: r.id, approvals: approvalCount(r), required: r.required };
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

function matches(identity: ApproverMember, caller: Caller): boolean {
  switch (identity.kind) {
    case 'person':
      return caller.principal === `person:${identity.name}`;
    case 'serviceAccount':
      return caller.method === 'serviceAccount' && identity.username === caller.subject;
    case 'oidc':
      return caller.method === 'oidc' && `${identity.issuer}#${identity.subject}` === caller.subject;
    case 'oidcGroup':
      return caller.method === 'oidc' && caller.subject.startsWith(`${identity.issuer}#`) && (caller.groups ?? []).includes(identity.group);
  }
}
