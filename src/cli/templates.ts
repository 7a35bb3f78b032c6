import { Command } from 'commander';
import { formatDuration } from '../policy/duration.ts';
import type { TemplateView } from '../server/routes-info.ts';
import { withClient } from './broker-options.ts';
import { columns, outputOption, printJson, safe, type OutputFormat } from './output.ts';

/** `broker templates`: what the caller may start, where, for how long, and whether it needs approval. */
export function templatesCommand(): Command {
  return new Command('templates')
    .description('list the templates you may start: namespaces, TTLs, whether they are gated and who approves')
    .addOption(outputOption())
    .addHelpText('after', '\nExample:\n  broker templates\n  broker task start read-pods --namespace team-a   # one of them')
    .action(async (flags: { output: OutputFormat }, cmd: Command) => {
      await withClient(cmd, async (client) => {
        const templates = await client.templates();
        if (flags.output === 'json') printJson({ templates });
        else process.stdout.write(templatesTable(templates));
      });
    });
}

export function templatesTable(templates: TemplateView[]): string {
  return columns(
    ['NAME', 'NAMESPACES', 'TTL', 'GATED', 'APPROVERS'],
    templates.map((t) => [
      safe(t.name),
      t.namespaces.map(safe).join(','),
      `${formatDuration(t.ttl.default)} (max ${formatDuration(t.ttl.max)})`,
      t.gated ? `yes: ${(t.gatedBecause ?? []).map(safe).join(', ')}` : 'no',
      t.approval ? `${t.approval.required} of ${t.approval.approvers.map(safe).join(', ')}` : '-',
    ]),
    'no templates you may start (broker whoami shows who the broker takes you for)',
  );
}
