import { Command } from 'commander';
import type { ApprovalView } from '../approvals/model.ts';
import { withClient } from './broker-options.ts';
import { formatDuration } from '../policy/duration.ts';
import { columns, fields, outputOption, printJson, relativeTime, safe, style, when, type OutputFormat } from './output.ts';

/** `broker approvals list|show`, `broker approve ID`, `broker deny ID`: the approver's side. */
export function approvalCommands(): Command[] {
  const approvals = new Command('approvals').description('approval requests for gated templates: yours, and those you may decide');
  approvals
    .command('list')
    .description('list approval requests you made or may decide')
    .option('--pending', 'only those still waiting for decisions')
    .addOption(outputOption())
    .addHelpText('after', '\nExample:\n  broker approvals list --pending')
    .action(async (flags: { pending?: boolean; output: OutputFormat }, cmd: Command) => {
      await withClient(cmd, async (client) => {
        const list = await client.listApprovals(flags.pending ?? false);
        if (flags.output === 'json') printJson({ approvals: list });
        else process.stdout.write(table(list));
      });
    });
  approvals
    .command('show')
    .description('show one approval request: who asked for what and why, and who has decided so far')
    .argument('<id>', 'the approval request id (ar-...)')
    .addOption(outputOption())
    .addHelpText('after', '\nExample:\n  broker approvals show ar-1a2b3c4d5e6f')
    .action(async (id: string, flags: { output: OutputFormat }, cmd: Command) => {
      await withClient(cmd, async (client) => {
        const { approvalToken: _token, ...request } = await client.getApproval(id);
        if (flags.output === 'json') printJson(request);
        else process.stdout.write(approvalDetail(request));
      });
    });

  const decide = (decision: 'approve' | 'deny') =>
    new Command(decision)
      .description(decision === 'approve' ? 'approve a request (never your own); the last needed approval issues the approval token' : 'deny a request: it ends')
      .argument('<id>', 'the approval request id (ar-...)')
      .addOption(outputOption())
      [decision === 'deny' ? 'requiredOption' : 'option']('--reason <text>', decision === 'deny' ? 'why (required): recorded in the audit log and shown to the requester' : 'why: recorded in the audit log')
      .addHelpText('after', `\nExample:\n  broker ${decision} ar-1a2b3c4d5e6f --reason "${decision === 'approve' ? 'on-call, incident 4711' : 'use the read-only template'}"`)
      .action(async (id: string, flags: { reason?: string; output: OutputFormat }, cmd: Command) => {
        await withClient(cmd, async (client) => {
          const result = await client.decide(id, decision, flags.reason);
          if (flags.output === 'json') printJson(result);
          else {
            process.stdout.write(`${decision === 'approve' ? 'approved' : 'denied'} ${safe(result.id)}: ${result.approvals}/${result.required} approvals, now ${safe(result.state)}\n`);
            if (result.approvalToken) process.stderr.write(style.dim(`the requester's \`broker task start --wait\` picks it up; for CI: BROKER_APPROVAL_TOKEN=<the approvalToken of -o json>\n`));
          }
        });
      });
  return [approvals, decide('approve'), decide('deny')];
}

function table(list: ApprovalView[]): string {
  return columns(
    ['ID', 'STATE', 'AGENT', 'TEMPLATE', 'NAMESPACE', 'APPROVALS', 'EXPIRES', 'REASON'],
    list.map((r) => [
      safe(r.id),
      safe(r.state),
      safe(r.agent),
      safe(r.template),
      safe(r.namespace),
      `${r.approvals}/${r.required}`,
      relativeTime(r.expiresAt),
      r.reason === undefined ? '-' : clip(safe(r.reason), 48),
    ]),
    'no approval requests',
  );
}

/** At most `n` characters of an already escaped text (the full text is in `approvals show`). */
function clip(text: string, n: number): string {
  return text.length <= n ? text : `${text.slice(0, n - 3)}...`;
}

/** One request: requester, what it asks for and why, its state, and each decision so far. */
export function approvalDetail(r: ApprovalView, now = Date.now()): string {
  const decisions = r.decisions.map((d) => `${d.decision === 'approve' ? 'approved' : 'denied'} by ${safe(d.subject)} (${safe(d.principal)}) ${relativeTime(d.at, now)}${d.reason ? `: ${safe(d.reason)}` : ''}`);
  return (
    fields([
      ['request', safe(r.id)],
      ['state', `${safe(r.state)}, ${r.approvals} of ${r.required} approval(s)`],
      ['requester', safe(r.requester)],
      ['agent', safe(r.agent)],
      ['template', safe(r.template)],
      ['namespace', safe(r.namespace)],
      ['task name', safe(r.name)],
      ['ttl', formatDuration(r.ttl)],
      ['reason', r.reason === undefined ? '-' : safe(r.reason)],
      ['approvers', `${r.required} of ${r.approvers.map(safe).join(', ')}`],
      ['decisions', decisions.length ? decisions[0] : 'none yet'],
      ...decisions.slice(1).map((d): [string, string] => ['', d]),
      ['created', when(r.createdAt, now)],
      [r.state === 'expired' ? 'expired' : 'expires', when(r.expiresAt, now)],
    ]) + (r.state === 'pending' ? style.dim(`an approver decides with: broker approve ${safe(r.id)}   or: broker deny ${safe(r.id)} --reason TEXT\n`) : '')
  );
}
