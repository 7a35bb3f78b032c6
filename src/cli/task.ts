import { Command } from 'commander';
import type { BrokerClient, StartTask } from '../client/broker-client.ts';
import { BrokerError } from '../errors.ts';
import type { TaskView } from '../tasks/model.ts';
import { withClient } from './broker-options.ts';
import { columns, outputOption, printJson, style, type OutputFormat } from './output.ts';

interface StartFlags {
  namespace: string;
  name?: string;
  ttl?: string;
  reason?: string;
  approval?: string;
  wait?: boolean;
  timeout: string;
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
    .option('--approval <token>', 'approval token for a gated template (default: $BROKER_APPROVAL_TOKEN)')
    .option('--wait', 'for a gated template: wait until the request is approved, then start')
    .option('--timeout <duration>', 'with --wait: give up after this long', '10m')
    .addOption(outputOption())
    .addHelpText(
      'after',
      '\nExamples:\n  broker task start read-pods --namespace shop-dev --ttl 15m --reason "debug checkout latency"\n  broker task start debug-exec --namespace shop-staging --reason "incident 4711" --wait',
    )
    .action(async (template: string, flags: StartFlags, cmd: Command) => {
      await withClient(cmd, async (client) => {
        const request = { template, namespace: flags.namespace, name: flags.name, ttl: flags.ttl, reason: flags.reason };
        const token = flags.approval ?? process.env['BROKER_APPROVAL_TOKEN'];
        const started = flags.wait && !token ? await startWaiting(client, request, flags.timeout) : await client.startTask(request, token);
        if (flags.output === 'json') printJson(started);
        else {
          process.stdout.write(`${style.ok('started')} task ${started.name} (${started.id}): ${started.template} in ${started.namespace} until ${started.expiresAt}\n`);
          process.stderr.write(style.dim(`kubectl through it: broker kubeconfig --task ${started.name} --output task.kubeconfig\n`));
        }
      });
    });
  task
    .command('end')
    .description('end a task now: its access is revoked')
    .argument('<task>', 'task name or id')
    .addOption(outputOption())
    .addHelpText('after', '\nExample:\n  broker task end read-pods')
    .action(async (ref: string, flags: { output: OutputFormat }, cmd: Command) => {
      await withClient(cmd, async (client) => {
        const ended = await client.endTask(ref);
        if (flags.output === 'json') printJson({ ...ended, ended: true });
        else process.stdout.write(`ended task ${ended.name} (${ended.id})\n`);
      });
    });
  task
    .command('list')
    .description('list your active tasks')
    .addOption(outputOption())
    .addHelpText('after', '\nExample:\n  broker task list -o json')
    .action(async (flags: { output: OutputFormat }, cmd: Command) => {
      await withClient(cmd, async (client) => {
        const tasks = await client.listTasks();
        if (flags.output === 'json') printJson({ tasks });
        else process.stdout.write(table(tasks));
      });
    });
  task
    .command('show')
    .description('show one of your tasks')
    .argument('<task>', 'task name or id')
    .addOption(outputOption())
    .addHelpText('after', '\nExample:\n  broker task show read-pods')
    .action(async (ref: string, flags: { output: OutputFormat }, cmd: Command) => {
      await withClient(cmd, async (client) => {
        const t = await client.getTask(ref);
        if (flags.output === 'json') printJson(t);
        else process.stdout.write(Object.entries(t).map(([k, v]) => `${k}: ${String(v)}`).join('\n') + '\n');
      });
    });
  return task;
}

/**
 * Starts a gated task: asks, shows that it waits (a spinner on a terminal, a line per change
 * otherwise), collects the approval token once approved, and starts with it.
 */
async function startWaiting(client: BrokerClient, request: StartTask, timeout: string): Promise<TaskView> {
  const { parseDuration } = await import('../policy/duration.ts');
  let deadline: number;
  try {
    deadline = Date.now() + parseDuration(timeout) * 1000;
  } catch (err) {
    throw new BrokerError('invalid_argument', `--timeout: ${(err as Error).message}`, { field: '--timeout' });
  }
  try {
    return await client.startTask(request);
  } catch (err) {
    const id = err instanceof BrokerError && err.code === 'approval_required' ? (err as BrokerError & { requestId?: string }).requestId : undefined;
    if (!id) throw err;
    const progress = new Progress(`waiting for approval of ${id}: ${(err as Error).message}`);
    try {
      for (;;) {
        const approval = await client.getApproval(id);
        progress.update(`${id}: ${approval.approvals}/${approval.required} approvals, ${approval.state}`);
        if (approval.state === 'approved' && approval.approvalToken) {
          progress.done(`${id} approved`);
          return await client.startTask(request, approval.approvalToken);
        }
        if (approval.state !== 'pending') throw new BrokerError('approval_closed', `approval request ${id} was ${approval.state}`);
        if (Date.now() > deadline) throw new BrokerError('approval_required', `approval request ${id} is still pending after ${timeout}; it stays open until ${approval.expiresAt}`);
        await new Promise((done) => setTimeout(done, 1000));
      }
    } finally {
      progress.stop();
    }
  }
}

/** A spinner on a terminal; elsewhere one plain line each time the status changes. */
class Progress {
  readonly #tty = process.stderr.isTTY === true;
  #text: string;
  #frame = 0;
  #timer: NodeJS.Timeout | undefined;

  constructor(text: string) {
    this.#text = text;
    if (this.#tty) this.#timer = setInterval(() => this.#draw(), 100);
    else process.stderr.write(`${text}\n`);
  }

  update(text: string): void {
    if (text === this.#text) return;
    this.#text = text;
    if (!this.#tty) process.stderr.write(`${text}\n`);
  }

  done(text: string): void {
    this.stop();
    process.stderr.write(`${text}\n`);
  }

  stop(): void {
    if (this.#timer === undefined) return;
    clearInterval(this.#timer);
    this.#timer = undefined;
    process.stderr.write('\r\x1b[K');
  }

  #draw(): void {
    const frames = '⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏';
    process.stderr.write(`\r\x1b[K${style.dim(frames[this.#frame++ % frames.length]!)} ${this.#text}`);
  }
}

function table(tasks: TaskView[]): string {
  return columns(['NAME', 'ID', 'TEMPLATE', 'NAMESPACE', 'EXPIRES'], tasks.map((t) => [t.name, t.id, t.template, t.namespace, t.expiresAt]), 'no active tasks');
}
