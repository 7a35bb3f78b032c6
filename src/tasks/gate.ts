/**
 * What the task service asks before a gated start may proceed, and what it tells the exec plugin of a
 * task still waiting: an interface the task service owns and the approval workflow implements
 * (src/approvals/service.ts), so the dependency runs one way: approvals → tasks.
 */
import { BrokerError } from '../errors.ts';
import type { Caller } from '../identity/types.ts';
import type { PolicyRule, Template } from '../policy/types.ts';

/** A start of a gated template, as the gate sees it. */
export interface GatedStart {
  template: Template;
  namespace: string;
  name: string;
  ttl: number;
  reason?: string | undefined;
  /** A `clusterRole` template's rules as read at this start (the approval is bound to them). */
  clusterRoleRules?: readonly PolicyRule[];
}

/** A gated start without a valid approval: the error carries the approval request's id. */
export class ApprovalRequiredError extends BrokerError {
  readonly requestId: string;
  constructor(requestId: string, message: string) {
    super('approval_required', message);
    this.requestId = requestId;
  }
}

export interface StartGate {
  /**
   * Without a token: records (or finds) the request and throws ApprovalRequiredError with its id. With
   * one: checks it against exactly this start by this caller and consumes it; resolves with the
   * approval id. Refusals throw BrokerError.
   */
  authorize(caller: Caller, start: GatedStart, approvalToken: string | undefined, requestId?: string): Promise<string>;
  /** The caller's request for task `name` that still waits for approvals, if any. */
  waitingFor(caller: Caller, name: string): Promise<{ id: string; approvals: number; required: number } | undefined>;
}
