/**
 * Failures as the agent sees them: a tool error (`isError: true`) whose one text block starts with
 * the broker's stable code, names the argument at fault, and ends with the next step in the agent's
 * own terms (a tool to call, or what to ask a person), never a stack trace. Everything quoted from
 * the broker is escaped (src/text.ts): an agent's task name or reason cannot carry control characters
 * into another agent's context.
 */
import type { CallToolResult } from '@modelcontextprotocol/sdk/types.js';
import { BrokerError, isBrokerError, type ErrorCode } from '../errors.ts';
import { printable } from '../text.ts';

/** What an approval_required error adds, when the request could be read. */
export interface ApprovalFacts {
  id: string;
  approvers: string[];
  required: number;
  approvals: number;
  expiresAt?: string | undefined;
}

/** A failure of a tool, with what the agent should do next. */
export class ToolFailure extends BrokerError {
  readonly next: string | undefined;
  readonly approval: ApprovalFacts | undefined;
  constructor(code: ErrorCode, message: string, options: { field?: string | undefined; next?: string | undefined; approval?: ApprovalFacts | undefined; cause?: unknown } = {}) {
    super(code, message, { ...(options.field === undefined ? {} : { field: options.field }), ...(options.cause === undefined ? {} : { cause: options.cause }) });
    this.next = options.next;
    this.approval = options.approval;
  }
}

// The broker's messages end with the CLI command that would help; the agent gets a tool instead.
const CLI_TAIL = /[;:]? ?(?:wait for it with|end it with|start it again with): broker .*$/;

/** The next step for a code, in tool terms, when the failure names none itself. */
function nextStep(code: ErrorCode, field: string | undefined): string | undefined {
  // A flag or variable of `broker mcp` itself (--broker, --kubeconfig-dir, BROKER_URL): not the agent's to fix.
  if (field !== undefined && /^(--|BROKER_)/.test(field)) return 'this needs a person: broker mcp itself is configured wrongly (its flags or environment); retrying will not help';
  switch (code) {
    case 'unknown_template':
    case 'forbidden':
      return field === 'template' || code === 'unknown_template' ? 'call list_templates for the templates you may start' : undefined;
    case 'invalid_argument':
      return field ? `call the tool again with a valid "${field}" (its input schema describes each argument)` : undefined;
    case 'namespace_not_allowed':
      return 'call start_task again with one of the namespaces the template allows (list_templates shows them)';
    case 'ttl_out_of_range':
      return 'call start_task again with a "ttl" in that range, or leave it out for the default';
    case 'task_exists':
      return 'use that task (task_status shows it), end it with end_task, or call start_task with another "name"';
    case 'no_active_task':
    case 'not_found':
      return 'list_tasks shows your tasks; start_task starts one';
    case 'quota_exceeded':
      return 'end a task you no longer need (list_tasks, end_task), then try again';
    case 'approval_invalid':
    case 'approval_closed':
      return 'call start_task again to open a new approval request';
    case 'unauthenticated':
      return 'this needs a person: the MCP server runs with no identity the broker accepts (see docs/identity.md); retrying will not help';
    case 'rate_limited':
    case 'audit_unavailable':
    case 'cluster_unavailable':
    case 'identity_provider_unavailable':
    case 'broker_unreachable':
      return 'retry in a little while; if it persists, tell a person';
    default:
      return undefined;
  }
}

/** A failure (a BrokerError, or anything unexpected) as a tool result. */
export function toolError(err: unknown): CallToolResult {
  const known = isBrokerError(err) ? err : new BrokerError('internal', 'unexpected failure inside broker mcp (details are on its stderr)', { cause: err });
  const message = printable(known.message.replace(CLI_TAIL, ''));
  const field = known.field === undefined ? undefined : printable(known.field);
  const lines = [`${known.code}: ${message}`];
  if (field) lines.push(`argument: ${field}`);
  if (known instanceof ToolFailure && known.approval) {
    const a = known.approval;
    lines.push(
      `approval request: ${printable(a.id)} (${a.approvals} of ${a.required} approval(s) so far${a.expiresAt ? `, open until ${printable(a.expiresAt)}` : ''})`,
      `who can approve: a member of ${a.approvers.map((g) => `"${printable(g)}"`).join(' or ')} other than you, by running: broker approve ${printable(a.id)}`,
    );
  }
  const next = known instanceof ToolFailure && known.next ? known.next : nextStep(known.code, known.field);
  if (next) lines.push(`next: ${next}`);
  return { isError: true, content: [{ type: 'text', text: lines.join('\n') }] };
}

/** The code at the start of a tool error's text (for tests and clients that branch on it). */
export function errorCodeOf(result: { isError?: boolean | undefined; content?: unknown }): string | undefined {
  if (!result.isError || !Array.isArray(result.content)) return undefined;
  const first = result.content[0] as { type?: string; text?: string } | undefined;
  return first?.type === 'text' ? /^([a-z_]+):/.exec(first.text ?? '')?.[1] : undefined;
}
