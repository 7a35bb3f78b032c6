/**
 * Approval requests for gated templates. Each is a ConfigMap `approval-<id>` in the broker's task
 * namespace, so it survives restarts and every replica sees it; updates use the object's
 * resourceVersion, so two replicas never both count a decision or both consume an approval.
 */
import { createHash, randomBytes } from 'node:crypto';
import type { V1ConfigMap } from '@kubernetes/client-node';
import type { PolicyRule, Principal, Template } from '../policy/types.ts';
import { SIGNATURE_ANNOTATION, canonicalJson, type Facts } from '../state-signature.ts';
import { GROUP, LABEL, MANAGED_BY } from '../tasks/model.ts';

export const APPROVAL_KIND = 'approval-request';
export const APPROVAL_SELECTOR = `${LABEL.managedBy}=${MANAGED_BY},${LABEL.kind}=${APPROVAL_KIND}`;
export const APPROVAL_STATE_LABEL = `${GROUP}/approval-state`;

/** pending → approved → used; pending → denied. `expired` is derived from expiresAt. */
export type ApprovalState = 'pending' | 'approved' | 'denied' | 'used' | 'expired';

export interface Decision {
  /** Who decided (the approver's proven subject). */
  subject: string;
  /** The person (or identity) behind it: decisions count once per principal. */
  principal: Principal;
  decision: 'approve' | 'deny';
  reason?: string;
  at: string;
}

export interface ApprovalRequest {
  id: string;
  requester: { agent: string; subject: string; principal: Principal };
  template: string;
  namespace: string;
  /** The task name the approval is for. */
  name: string;
  /** Seconds the task may last. */
  ttl: number;
  reason?: string;
  /** Hash of the template's grant at request time; a changed template voids the approval. */
  rulesHash: string;
  /** Approver groups whose members may decide, and how many approvals are needed. */
  approvers: string[];
  required: number;
  createdAt: string;
  expiresAt: string;
  state: ApprovalState;
  decisions: Decision[];
  /** The ConfigMap's resourceVersion, for compare-and-swap updates. */
  resourceVersion?: string;
  /** The broker's signature over approvalFacts() (src/state-signature.ts). */
  signature?: string;
}

/** What the API shows of a request. */
export interface ApprovalView {
  id: string;
  requester: string;
  agent: string;
  template: string;
  namespace: string;
  name: string;
  ttl: number;
  reason?: string;
  state: ApprovalState;
  required: number;
  approvals: number;
  approvers: string[];
  decisions: Decision[];
  createdAt: string;
  expiresAt: string;
}

export function newRequestId(): string {
  return `ar-${randomBytes(6).toString('hex')}`;
}

export function configMapName(id: string): string {
  return `approval-${id}`;
}

/**
 * The grant a template makes, hashed: its rules, or the ClusterRole it binds together with that
 * role's rules as read at the start (so an approval is void once the role changes).
 */
export function rulesHash(template: Template, clusterRoleRules?: readonly PolicyRule[]): string {
  const grant = template.clusterRole ? { clusterRole: template.clusterRole, rules: clusterRoleRules ?? [] } : { rules: template.rules ?? [] };
  return createHash('sha256').update(canonicalJson(grant)).digest('hex');
}

/** Distinct principals that approved (one person with two identities counts once). */
export function approvalCount(req: ApprovalRequest): number {
  return new Set(req.decisions.filter((d) => d.decision === 'approve').map((d) => d.principal)).size;
}

/** The state now: a pending or approved request past its expiry is expired. */
export function effectiveState(req: ApprovalRequest, now: Date): ApprovalState {
  if ((req.state === 'pending' || req.state === 'approved') && new Date(req.expiresAt) <= now) return 'expired';
  return req.state;
}

export function toView(req: ApprovalRequest, now: Date): ApprovalView {
  return {
    id: req.id,
    requester: req.requester.subject,
    agent: req.requester.agent,
    template: req.template,
    namespace: req.namespace,
    name: req.name,
    ttl: req.ttl,
    ...(req.reason === undefined ? {} : { reason: req.reason }),
    state: effectiveState(req, now),
    required: req.required,
    approvals: approvalCount(req),
    approvers: req.approvers,
    decisions: req.decisions,
    createdAt: req.createdAt,
    expiresAt: req.expiresAt,
  };
}

/** What the broker signs of a request: its object name and the stored data, exactly as stored. */
export function approvalFacts(name: string, data: Record<string, string>): Facts {
  return { name, request: data['request'] ?? '', decisions: data['decisions'] ?? '', state: data['state'] ?? '' };
}

/** The ConfigMap's data for a request (what approvalFacts signs). */
export function approvalData(req: ApprovalRequest): Record<string, string> {
  const { decisions, state, resourceVersion: _rv, signature: _sig, ...request } = req;
  return { request: JSON.stringify(request), decisions: JSON.stringify(decisions), state };
}

export function toConfigMap(req: ApprovalRequest, signature: string): V1ConfigMap {
  const { state, resourceVersion } = req;
  return {
    metadata: {
      name: configMapName(req.id),
      labels: {
        [LABEL.managedBy]: MANAGED_BY,
        [LABEL.kind]: APPROVAL_KIND,
        [LABEL.agent]: req.requester.agent,
        [LABEL.template]: req.template,
        [LABEL.taskName]: req.name,
        [APPROVAL_STATE_LABEL]: state,
      },
      annotations: { [SIGNATURE_ANNOTATION]: signature },
      ...(resourceVersion ? { resourceVersion } : {}),
    },
    data: approvalData(req),
  };
}

export function fromConfigMap(cm: V1ConfigMap): ApprovalRequest | undefined {
  try {
    const request = JSON.parse(cm.data?.['request'] ?? '') as Omit<ApprovalRequest, 'decisions' | 'state' | 'resourceVersion'>;
    const decisions = JSON.parse(cm.data?.['decisions'] ?? '[]') as Decision[];
    const state = (cm.data?.['state'] ?? 'pending') as ApprovalState;
    const signature = cm.metadata?.annotations?.[SIGNATURE_ANNOTATION];
    return {
      ...request,
      decisions,
      state,
      ...(cm.metadata?.resourceVersion ? { resourceVersion: cm.metadata.resourceVersion } : {}),
      ...(signature ? { signature } : {}),
    };
  } catch {
    return undefined;
  }
}
