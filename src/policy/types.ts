/**
 * The policy, as the broker uses it after parsing and validation (src/policy/parse.ts).
 * The YAML form is documented in docs/policy.md; durations there are strings ("15m", "1h", "600s"),
 * here they are whole seconds.
 */

/** One way a caller proves who it is. Exactly one kind per entry. */
export type Identity =
  /** A Kubernetes ServiceAccount, checked with TokenReview; YAML: `serviceAccount: NAMESPACE/NAME`. */
  | { kind: 'serviceAccount'; namespace: string; name: string; username: string }
  /**
   * An OIDC subject (people, CI); YAML: `oidc: { issuer: URL, subject: SUB, claims?: {...} }`. The
   * subject is the value of the issuer's `subjectClaim`; `claims`, when given, must all hold too
   * (a token of that subject whose claims do not is refused 403).
   */
  | { kind: 'oidc'; issuer: string; subject: string; claims?: ClaimConditions }
  /** Everyone in an OIDC group claim (approvers only); YAML: `oidcGroup: { issuer: URL, group: NAME }`. */
  | { kind: 'oidcGroup'; issuer: string; group: string };

/** Claim conditions: each named claim must be a string equal to one of the values listed. */
export type ClaimConditions = Record<string, string[]>;

/**
 * An OIDC issuer whose tokens the broker accepts (YAML `issuers:`): ID tokens of people, tokens a CI
 * system hands its jobs, JWT access tokens of the client credentials grant.
 */
export interface OidcIssuer {
  /** The `iss` claim, and where `/.well-known/openid-configuration` is found. */
  issuer: string;
  /** Accepted `aud` values: a token must carry at least one of them. */
  audiences: string[];
  /** The claim that names the subject (default `sub`): GitHub Actions' `sub`, or `email`, ... */
  subjectClaim: string;
  /** The claim that lists groups (an array of strings), for `oidcGroup` approvers; none by default. */
  groupsClaim?: string;
  /** Signing algorithms accepted: asymmetric only, never `none` nor HMAC. */
  algorithms: string[];
  /** Conditions every token of this issuer must meet (for a CI issuer: `repository_owner`, ...). */
  claims: ClaimConditions;
  /** People sign in here with `broker login` (YAML `login.clientId`: the CLI's public client); `GET /v1/login` lists such issuers. */
  login?: { clientId: string };
}

export interface Agent {
  name: string;
  identities: Identity[];
}

/**
 * A person (an approver, an on-call engineer): one principal behind one or more identities, so that
 * approvals count once per person however many identities they sign in with. YAML: `people:`.
 */
export interface Person {
  name: string;
  identities: Identity[];
}

/**
 * Who stands behind a caller, for approvals: the agent or person an identity belongs to, or the
 * identity itself when the policy names it only in an approver group. `agent:NAME`, `person:NAME`,
 * or `identity:SUBJECT`.
 */
export type Principal = `agent:${string}` | `person:${string}` | `identity:${string}`;

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

/** An approver group member: an identity, or a person (YAML `person: NAME`) with all of their identities. */
export type ApproverMember = Identity | { kind: 'person'; name: string };

export interface ApproverGroup {
  name: string;
  members: ApproverMember[];
}

export interface ApprovalRequirement {
  /** Names of approver groups whose members may approve. */
  approvers: string[];
  /** How many distinct approvers must approve (N of M). */
  required: number;
}

export interface BrokerSettings {
  /**
   * The broker's own namespace: its ServiceAccount, the approval signing key, approval requests, the
   * sweeper Lease and the audit log's checkpoint. Never the task namespace (where the broker may mint
   * tokens), so the broker cannot mint one for itself; no template may allow it. Default
   * `task-broker-system`.
   */
  namespace: string;
  /** Namespace holding each task's ServiceAccount and Secret (and nothing else). */
  taskNamespace: string;
  /** The broker's own ServiceAccount name, in `namespace`. */
  serviceAccount: string;
  /** Lifetime of minted tokens, seconds; at least 600 (TokenRequest's minimum). */
  tokenTtl: number;
  /** Audience callers' ServiceAccount tokens must carry for the broker to accept them. */
  identityAudience: string;
  /** How long an approval request stays open, seconds. Default 3600. */
  approvalRequestTtl: number;
  /** How long ended, expired and revoked tasks stay in the history (`task list --all`), seconds. Default 7 days. */
  taskHistory: number;
  /** Optional webhook notified of new approval requests. */
  notifyWebhook?: string;
  /** Per-agent caps (YAML `broker.limits`), so one agent cannot flood the cluster with objects. */
  limits: AgentLimits;
  /**
   * Only proxy session tokens are handed out (docs/proxy.md): a task's own token never leaves the
   * broker, and the broker needs `--proxy-listen`. Default false.
   */
  proxyOnly: boolean;
}

export interface AgentLimits {
  /** Active tasks one agent may hold at once. Default 10. */
  activeTasksPerAgent: number;
  /** Pending approval requests one agent may have open at once. Default 5. */
  openApprovalsPerAgent: number;
}

export interface Policy {
  broker: BrokerSettings;
  agents: Agent[];
  /** People (approvers); their identities never belong to an agent. */
  people: Person[];
  templates: Template[];
  /** The gated set; the defaults of docs/policy.md when the policy has none. */
  gated: GatedPair[];
  approverGroups: ApproverGroup[];
  /**
   * Approver groups whose members administer agent keys (`broker agent register`, `list`, `revoke`);
   * YAML `administrators:`. Empty: nobody can.
   */
  administrators: string[];
  /** OIDC issuers whose tokens prove `oidc` and `oidcGroup` identities (YAML `issuers:`). */
  issuers: OidcIssuer[];
  /** Default approval requirement for gated templates that name none. */
  defaultApproval: ApprovalRequirement;
}

/** One validation problem: a JSON-path-like location, its line (1-based) in the file, and what is wrong. */
export interface PolicyIssue {
  path: string;
  line: number;
  message: string;
}
