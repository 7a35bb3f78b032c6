import { Command } from 'commander';
import type { TaskView } from '../tasks/model.ts';
import { clientFor } from './broker-options.ts';
import { outputOption, printJson, style, type OutputFormat } from './output.ts';

interface StartFlags {
  namespace: string;
  name?: string;
  ttl?: string;
  reason?: string;
  output: OutputFormat;
}

export function taskCommand(): Command {
  const task = new Command('task').description('start, end and inspect your tasks (each one a short-lived, narrowly scoped grant)');
  task
    .command('start')
    .description('start a task from a policy template')
    .argument('<template>', 'the template (see the policy)')
    .requiredOption('-n, --namespace <ns>', 'the namespace the task grants access in')
    .option('--name <name>', 'task name, unique among your active tasks (default: the template name)')
    .option('--ttl <duration>', "how long it lasts, e.g. 15m (default: the template's)")
    .option('--reason <text>', 'why: recorded in the audit log')
    .addOption(outputOption())
    .addHelpText('after', '\nExample:\n  broker task start read-pods --namespace shop-dev --ttl 15m --reason "debug checkout latency"')
    .action(async (template: string, flags: StartFlags, cmd: Command) => {
      const client = await clientFor(cmd);
      try {
        const started = await client.startTask({ template, namespace: flags.namespace, name: flags.name, ttl: flags.ttl, reason: flags.reason });
        if (flags.output === 'json') printJson(started);
        else {
          process.stdout.write(`${style.ok('started')} task ${started.name} (${started.id}): ${started.template} in ${started.namespace} until ${started.expiresAt}\n`);
          process.stderr.write(style.dim(`kubectl through it: broker kubeconfig --task ${started.name} --output task.kubeconfig\n`));
        }
      } finally {
        await client.close();
      }
    });
  task
    .command('end')
    .description('end a task now: its access is revoked')
    .argument('<task>', 'task name or id')
    .addOption(outputOption())
    .addHelpText('after', '\nExample:\n  broker task end read-pods')
    .action(async (ref: string, flags: { output: OutputFormat }, cmd: Command) => {
      const client = await clientFor(cmd);
      try {
        const ended = await client.endTask(ref);
        if (flags.output === 'json') printJson({ ...ended, ended: true });
        else process.stdout.write(`ended task ${ended.name} (${ended.id})\n`);
      } finally {
        await client.close();
      }
    });
  task
    .command('list')
    .description('list your active tasks')
    .addOption(outputOption())
    .addHelpText('after', '\nExample:\n  broker task list -o json')
    .action(async (flags: { output: OutputFormat }, cmd: Command) => {
      const client = await clientFor(cmd);
      try {
        const tasks = await client.listTasks();
        if (flags.output === 'json') printJson({ tasks });
        else process.stdout.write(table(tasks));
      } finally {
        await client.close();
      }
    });
  task
    .command('show')
    .description('show one of your tasks')
    .argument('<task>', 'task name or id')
    .addOption(outputOption())
    .addHelpText('after', '\nExample:\n  broker task show read-pods')
    .action(async (ref: string, flags: { output: OutputFormat }, cmd: Command) => {
      const client = await clientFor(cmd);
      try {
        const t = await client.getTask(ref);
        if (flags.output === 'json') printJson(t);
        else process.stdout.write(Object.entries(t).map(([k, v]) => `${k}: ${String(v)}`).join('\n') + '\n');
      } finally {
        await client.close();
      }
    });
  return task;
}

function table(tasks: TaskView[]): string {
  if (tasks.length === 0) return 'no active tasks\n';
  const rows = [['NAME', 'ID', 'TEMPLATE', 'NAMESPACE', 'EXPIRES'], ...tasks.map((t) => [t.name, t.id, t.template, t.namespace, t.expiresAt])];
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
  return rows.map((r) => r.map((c, i) => c.padEnd(widths[i]!)).join('  ').trimEnd()).join('\n') + '\n';
}
