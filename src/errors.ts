/**
 * The one error family of task-broker. Every failure a user can see carries a stable `code`; the
 * list below is the whole set, and docs/errors.md documents each (test/unit/errors-doc.test.ts keeps
 * the two in sync in both directions).
 */
export const ERROR_CODES = {
  // command line
  usage: 'The command line was not understood: an unknown command, flag or missing argument.',
  invalid_argument: 'A value in a request or on the command line is not valid; `field` names it.',
  // local control plane (test/cluster, broker dev-cluster)
  cluster_binaries_missing:
    'The local control plane (test/cluster) has not been built: run ./install.sh with Go installed.',
  cluster_start_failed: 'The local kube-apiserver did not become ready; the message quotes its log.',
  cluster_not_found: 'No local control plane state was found in the given directory.',
  cluster_dir_not_empty: 'dev-cluster up was given a directory that exists and is not empty.',
  // policy
  policy_invalid: 'The policy file failed validation; each problem names its path and line.',
  precondition_failed:
    'The cluster is not as the command needs it (a namespace or ClusterRole the policy names is missing, or active tasks would lose their template): the message says what to do first.',
  // broker API
  bad_request: 'The request body is not valid JSON, or not the JSON object the endpoint takes.',
  body_too_large: 'The request body is larger than the broker accepts.',
  unauthenticated: 'The caller could not be identified: no credential, or one the broker does not accept.',
  forbidden: 'The caller is known but the policy does not allow this action (for example another agent\'s task).',
  not_found: 'No such task (or other object) exists.',
  unknown_template: 'The policy has no template of that name.',
  namespace_not_allowed: 'The template does not allow tasks in that namespace.',
  ttl_out_of_range: 'The requested TTL is below the minimum or above the template\'s maximum.',
  task_exists: 'The agent already has an active task of that name.',
  quota_exceeded: 'The agent already holds as many active tasks, or open approval requests, as the policy allows (broker.limits).',
  no_active_task: 'The agent has no active task of that name: start one first.',
  rate_limited: 'Too many requests from this source address or identity, or too many failed authentications from this address: retry after the `Retry-After` seconds.',
  approval_required: 'The template is gated: the task needs an approval token; the error carries the approval request id.',
  approval_invalid: 'The approval token was refused: expired, replayed, tampered with, or issued for another request, template, namespace or requester.',
  approval_closed: 'The approval request is no longer pending (approved, denied, used or expired) and takes no more decisions.',
  audit_unavailable: 'The audit log cannot be written; the broker refuses to act without recording (fail closed).',
  audit_chain_broken: 'audit verify found a record whose hash chain does not hold; the message names it.',
  audit_checkpoint_mismatch:
    'At start the audit log does not hold the record its cluster checkpoint names (missing, replaced or cut); the message names expected and found. `broker serve --accept-audit-reset` starts anyway and records audit.reset.',
  listen_failed: 'broker serve could not listen on its address (in use, not an address of this machine, or a privileged port): the message says what to do.',
  cluster_unavailable: 'The Kubernetes API server could not be reached or refused the broker\'s request.',
  keychain_unavailable:
    'The OS keychain (Secret Service, macOS Keychain, Windows Credential Manager) cannot be used; nothing is written elsewhere instead. The message names the alternatives: BROKER_AGENT_KEY, BROKER_IDENTITY_TOKEN(_FILE).',
  identity_provider_unavailable:
    'An OIDC issuer the policy lists could not be reached (discovery or JWKS): the broker cannot check its tokens now, and refuses them (503) until it can.',
  broker_unreachable: 'The broker could not be reached at the URL given (--broker / BROKER_URL).',
  internal: 'An unexpected failure inside task-broker. The message is generic; details go to the log.',
} as const satisfies Record<string, string>;

export type ErrorCode = keyof typeof ERROR_CODES;

export interface BrokerErrorOptions {
  /** The input field (flag, JSON path, policy path) the error is about. */
  field?: string;
  cause?: unknown;
}

export class BrokerError extends Error {
  override name = 'BrokerError';
  readonly code: ErrorCode;
  readonly field: string | undefined;

  constructor(code: ErrorCode, message: string, options: BrokerErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.code = code;
    this.field = options.field;
  }
}

export function isBrokerError(err: unknown): err is BrokerError {
  return err instanceof BrokerError;
}

/** The `code` of a Node system error (`ENOENT`, `EADDRINUSE`, ...), if it has one. */
export function errCode(err: unknown): string | undefined {
  return typeof err === 'object' && err !== null && 'code' in err && typeof err.code === 'string' ? err.code : undefined;
}

/** A system error's message, with its code in front when the message does not already name it. */
export function errText(err: unknown): string {
  const code = errCode(err);
  const msg = err instanceof Error ? err.message : String(err);
  return code && !msg.includes(code) ? `${code}: ${msg}` : msg;
}

/** An error's message and those of its causes (up to four), for the server's own log. */
export function describeCause(error: unknown): string {
  const parts: string[] = [];
  let e: unknown = error;
  while (e instanceof Error && parts.length < 4) {
    parts.push(e.message);
    e = e.cause;
  }
  return parts.join(': ') || String(error);
}

/** HTTP status of each error code the API (and the web console) can answer with; any other is 500. */
const STATUS: Partial<Record<ErrorCode, number>> = {
  invalid_argument: 400,
  bad_request: 400,
  unknown_template: 400,
  namespace_not_allowed: 400,
  ttl_out_of_range: 400,
  body_too_large: 413,
  unauthenticated: 401,
  forbidden: 403,
  not_found: 404,
  no_active_task: 404,
  task_exists: 409,
  rate_limited: 429,
  quota_exceeded: 403,
  approval_required: 403,
  approval_invalid: 403,
  approval_closed: 409,
  audit_unavailable: 503,
  cluster_unavailable: 503,
  identity_provider_unavailable: 503,
  internal: 500,
};

export function statusOf(code: ErrorCode): number {
  return STATUS[code] ?? 500;
}
