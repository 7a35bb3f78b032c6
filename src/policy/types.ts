/**
 * The policy, as the broker uses it after parsing and validation (src/policy/parse.ts).
 * The YAML form is documented in docs/policy.md; durations there are strings ("15m", "1h", "600s"),
 * here they are whole seconds.
 */

/** One way a caller proves who it is. Exactly one kind per entry. */
export type Identity =
  /** A Kubernetes ServiceAccount, checked with TokenReview; YAML: `serviceAccount: NAMESPACE/NAME`. */
  | { kind: 'serviceAccount'; namespace: string; name: string; username: string }
  /** An OIDC subject (people, CI); YAML: `oidc: { issuer: URL, subject: SUB }`. */
  | { kind: 'oidc'; issuer: string; subject: string }
  /** Everyone in an OIDC group claim (approvers only); YAML: `oidcGroup: { issuer: URL, group: NAME }`. */
  | { kind: 'oidcGroup'; issuer: string; group: string };

export interface Agent {
  name: string;
  identities: Identity[];
}

/** A Kubernetes RBAC PolicyRule, as in rbac.authorization.k8s.io/v1. */
export interface PolicyRule {
  apiGroups?: string[];
  resources?: string[];
  resourceNames?: string[];
  nonResourceURLs?: string[];
  verbs: string[];
}

export interface Template {
  name: string;
  description?: string;
  /** Namespaces a task of this template may be started in (exact names). */
  namespaces: string[];
  /** Exactly one of rules and clusterRole is set. */
  rules?: PolicyRule[];
  /** An existing ClusterRole to bind instead of rules. */
  clusterRole?: string;
  /** Seconds. */
  defaultTtl: number;
  /** Seconds; >= defaultTtl. */
  maxTtl: number;
  /** Names of agents (from `agents`) allowed to start it. */
  agents: string[];
  /** Approval requirement for this template when it is gated; defaults from `approvals`. */
  approval?: ApprovalRequirement;
}

/** A verb on a resource that needs an approval token (`resource` may be `pods/exec` style). */
export interface GatedPair {
  verb: string;
  resource: string;
  /** API group; "" is the core group. Default "". */
  apiGroup: string;
}

export interface ApproverGroup {
  name: string;
  members: Identity[];
}

export interface ApprovalRequirement {
  /** Names of approver groups whose members may approve. */
  approvers: string[];
  /** How many distinct approvers must approve (N of M). */
  required: number;
}

export interface BrokerSettings {
  /** Namespace holding each task's ServiceAccount and Secret, approval records and the broker's own SA. */
  taskNamespace: string;
  /** The broker's own ServiceAccount name, in taskNamespace. */
  serviceAccount: string;
  /** Lifetime of minted tokens, seconds; at least 600 (TokenRequest's minimum). */
  tokenTtl: number;
  /** Audience callers' ServiceAccount tokens must carry for the broker to accept them. */
  identityAudience: string;
  /** How long an approval request stays open, seconds. Default 3600. */
  approvalRequestTtl: number;
  /** Optional webhook notified of new approval requests. */
  notifyWebhook?: string;
}

export interface Policy {
  broker: BrokerSettings;
  agents: Agent[];
  templates: Template[];
  /** The gated set; the defaults of docs/policy.md when the policy has none. */
  gated: GatedPair[];
  approverGroups: ApproverGroup[];
  /** Default approval requirement for gated templates that name none. */
  defaultApproval: ApprovalRequirement;
}

/** One validation problem: a JSON-path-like location, its line (1-based) in the file, and what is wrong. */
export interface PolicyIssue {
  path: string;
  line: number;
  message: string;
}
