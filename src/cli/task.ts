import { Command } from 'commander';
import type { BrokerClient, StartTask } from '../client/broker-client.ts';
import { BrokerError } from '../errors.ts';
import type { TaskStateView } from '../tasks/history.ts';
import type { TaskView } from '../tasks/model.ts';
import { leftBehindLine, type LeftBehindReport } from '../audit/left-behind.ts';
import { withClient } from './broker-options.ts';
import { columns, fields, outputOption, printJson, relativeTime, safe, style, when, type OutputFormat } from './output.ts';

interface StartFlags {
  namespace?: string;
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
    .option('-n, --namespace <ns>', 'the namespace the task grants access in (required; `broker templates` lists each template\'s)')
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
      const namespace = requireNamespace(flags.namespace, `broker task start ${template}`);
      await withClient(cmd, async (client) => {
        const request = { template, namespace, name: flags.name, ttl: flags.ttl, reason: flags.reason };
        const token = flags.approval ?? process.env['BROKER_APPROVAL_TOKEN'];
        const started = flags.wait && !token ? await startWaiting(client, request, flags.timeout) : await client.startTask(request, token);
        if (flags.output === 'json') printJson(started);
        else {
          process.stdout.write(
            `${style.ok('started')} task ${safe(started.name)} (${safe(started.id)}): ${safe(started.template)} in ${safe(started.namespace)} until ${started.expiresAt} (${relativeTime(started.expiresAt)})\n`,
          );
          process.stderr.write(style.dim(`kubectl through it: broker kubeconfig --task ${safe(started.name)} --output task.kubeconfig\n`));
        }
      });
    });
  task
    .command('end')
    .description('end a task now: its access is revoked; lists what it left behind (objects it created that can hold or grant access)')
    .argument('<task>', 'task name or id')
    .addOption(outputOption())
    .addHelpText('after', '\nExample:\n  broker task end read-pods')
    .action(async (ref: string, flags: { output: OutputFormat }, cmd: Command) => {
      await withClient(cmd, async (client) => {
        const ended: TaskView & Partial<LeftBehindReport> = await client.endTask(ref);
        if (flags.output === 'json') printJson({ ...ended, ended: true });
        else {
          process.stdout.write(`ended task ${safe(ended.name)} (${safe(ended.id)})\n${leftBehindText(ended)}`);
          if (ended.recording === 'webhook' && ended.hint) process.stderr.write(style.dim(`${safe(ended.hint)}\n`));
        }
      });
    });
  task
    .command('list')
    .description('list your active tasks (with --all, also those that ended, expired or were revoked)')
    .option('--all', 'also the tasks that ended, kept for the policy\'s broker.taskHistory (default 7 days)')
    .addOption(outputOption())
    .addHelpText('after', '\nExamples:\n  broker task list\n  broker task list --all -o json')
    .action(async (flags: { all?: boolean; output: OutputFormat }, cmd: Command) => {
      await withClient(cmd, async (client) => {
        const tasks = await client.listTasks(flags.all ?? false);
        if (flags.output === 'json') printJson({ tasks });
        else process.stdout.write(flags.all ? tableAll(tasks) : table(tasks));
      });
    });
  task
    .command('show')
    .description('show one of your tasks, active or ended')
    .argument('<task>', 'task name or id (a name that has ended shows its latest task)')
    .addOption(outputOption())
    .addHelpText('after', '\nExample:\n  broker task show read-pods')
    .action(async (ref: string, flags: { output: OutputFormat }, cmd: Command) => {
      await withClient(cmd, async (client) => {
        const t = await client.getTask(ref);
        if (flags.output === 'json') printJson(t);
        else process.stdout.write(taskDetail(t));
      });
    });
  return task;
}

/**
 * --namespace, which commander leaves optional so that a mistyped flag is reported as unknown
 * (with its "did you mean") rather than as this one missing; a missing one is a usage error.
 */
export function requireNamespace(namespace: string | undefined, command: string): string {
  if (namespace) return namespace;
  throw new BrokerError(
    'usage',
    `--namespace is required: the namespace the task grants access in, e.g. ${command} --namespace team-a (\`broker templates\` lists the namespaces of each template you may start)`,
  );
}

/**
 * What an ended task left behind (docs/recording.md): one line per object, or that nothing is known
 * (a broker without the audit webhook), or nothing recorded so far. Nothing from a broker that does not
 * report it.
 */
export function leftBehindText(r: Partial<LeftBehindReport>): string {
  if (r.recording === 'none') return 'left behind: not recorded: this broker receives no API server audit events; see docs/recording.md\n';
  if (r.recording !== 'webhook' || !Array.isArray(r.leftBehind)) return '';
  if (r.leftBehind.length === 0) return 'left behind: nothing recorded so far that can hold or grant access\n';
  const n = r.leftBehind.length;
  const lines = r.leftBehind.map((e) => `  ${safe(leftBehindLine(e))}\n`);
  return `left behind, recorded so far: ${n} object${n === 1 ? '' : 's'} that can hold or grant access, outliving the task\n${lines.join('')}`;
}

/** One task, active or from the history, with relative times (the absolute time in parentheses). */
export function taskDetail(t: TaskStateView, now = Date.now()): string {
  const state = t.state ?? 'active';
  return fields([
    ['name', safe(t.name)],
    ['id', safe(t.id)],
    ['state', state === 'active' ? style.ok(state) : safe(state)],
    ['template', safe(t.template)],
    ['namespace', safe(t.namespace)],
    ['agent', safe(t.agent)],
    ['created', when(t.createdAt, now)],
    [state === 'active' ? 'expires' : 'expiry', when(t.expiresAt, now)],
    ['ended', t.endedAt ? `${when(t.endedAt, now)}${t.endedBy ? ` by ${safe(t.endedBy)}` : ''}` : undefined],
    ['cause', t.cause === undefined ? undefined : safe(t.cause)],
    ['reason', t.reason === undefined ? undefined : safe(t.reason)],
    ['approval', t.approvalId === undefined ? undefined : safe(t.approvalId)],
  ]);
}

/**
 * Starts a gated task: asks, shows that it waits (a spinner on a terminal, a line per change
 * otherwise), collects the approval token once approved, and starts with it.
 */
export async function startWaiting(client: BrokerClient, request: StartTask, timeout: string, stopped?: () => string | undefined): Promise<TaskView> {
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
    const progress = new Progress(`waiting for approval of ${id} (an approver runs: broker approve ${id})`);
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
        const signal = stopped?.();
        if (signal) throw new BrokerError('approval_required', `stopped waiting for approval request ${id} (${signal}); it stays open until ${approval.expiresAt}`);
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
  return columns(
    ['NAME', 'ID', 'TEMPLATE', 'NAMESPACE', 'EXPIRES'],
    tasks.map((t) => [safe(t.name), safe(t.id), safe(t.template), safe(t.namespace), relativeTime(t.expiresAt)]),
    'no active tasks (broker task list --all shows those that ended)',
  );
}

function tableAll(tasks: TaskStateView[]): string {
  return columns(
    ['NAME', 'ID', 'TEMPLATE', 'NAMESPACE', 'STATE', 'EXPIRES', 'ENDED'],
    tasks.map((t) => [
      safe(t.name),
      safe(t.id),
      safe(t.template),
      safe(t.namespace),
      safe(t.state ?? 'active'),
      t.state === 'active' ? relativeTime(t.expiresAt) : '-',
      t.endedAt ? relativeTime(t.endedAt) : '-',
    ]),
    'no tasks, active or ended',
  );
}
