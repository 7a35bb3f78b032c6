import { Command } from 'commander';
import type { ApprovalView } from '../approvals/model.ts';
import { withClient } from './broker-options.ts';
import { columns, outputOption, printJson, style, type OutputFormat } from './output.ts';

/** `broker approvals list`, `broker approve ID`, `broker deny ID`: the approver's side. */
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

  const decide = (decision: 'approve' | 'deny') =>
    new Command(decision)
      .description(decision === 'approve' ? 'approve a request (never your own); the last needed approval issues the approval token' : 'deny a request: it ends')
      .argument('<id>', 'the approval request id (ar-...)')
      .addOption(outputOption())
      [decision === 'deny' ? 'requiredOption' : 'option']('--reason <text>', 'why: recorded in the audit log')
      .addHelpText('after', `\nExample:\n  broker ${decision} ar-1a2b3c4d5e6f --reason "${decision === 'approve' ? 'on-call, incident 4711' : 'use the read-only template'}"`)
      .action(async (id: string, flags: { reason?: string; output: OutputFormat }, cmd: Command) => {
        await withClient(cmd, async (client) => {
          const result = await client.decide(id, decision, flags.reason);
          if (flags.output === 'json') printJson(result);
          else {
            process.stdout.write(`${decision === 'approve' ? 'approved' : 'denied'} ${result.id}: ${result.approvals}/${result.required} approvals, now ${result.state}\n`);
            if (result.approvalToken) process.stderr.write(style.dim(`the requester's \`broker task start --wait\` picks it up; for CI: BROKER_APPROVAL_TOKEN=<the approvalToken of -o json>\n`));
          }
        });
      });
  return [approvals, decide('approve'), decide('deny')];
}

function table(list: ApprovalView[]): string {
  return columns(
    ['ID', 'STATE', 'AGENT', 'TEMPLATE', 'NAMESPACE', 'APPROVALS', 'EXPIRES'],
    list.map((r) => [r.id, r.state, r.agent, r.template, r.namespace, `${r.approvals}/${r.required}`, r.expiresAt]),
    'no approval requests',
  );
}
