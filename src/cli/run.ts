/**
 * `broker run TEMPLATE --namespace NS -- CMD ARGS...`: a one-off grant around one command, for CI.
 * Starts a task, writes a temporary kubeconfig (exec entry, no secret), runs CMD with KUBECONFIG
 * pointing at it, forwards SIGINT/SIGTERM/SIGHUP, and always ends the task and removes the file.
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { constants, tmpdir } from 'node:os';
import { join } from 'node:path';
import { Command, Option } from 'commander';
import { clientFor, type BrokerFlags } from './broker-options.ts';
import { EXIT } from './exit-codes.ts';
import { kubeconfigTarget } from './kubeconfig.ts';
import { safe, style } from './output.ts';
import { requireNamespace, startWaiting } from './task.ts';
import type { LeftBehindReport } from '../audit/left-behind.ts';
import type { TaskView } from '../tasks/model.ts';
import { leftBehindText } from './task.ts';

interface RunFlags {
  namespace?: string;
  name?: string;
  ttl?: string;
  reason?: string;
  server?: string;
  certificateAuthority?: string;
  approval?: string;
  wait?: boolean;
  timeout: string;
  via?: 'direct' | 'proxy';
}

const FORWARDED = ['SIGINT', 'SIGTERM', 'SIGHUP'] as const;

export function runCommand(): Command {
  return new Command('run')
    .description('run one command with a one-off task: started before it, ended after it, whatever happens')
    .argument('<template>', 'the template to start')
    .argument('<command...>', 'the command and its arguments, after --')
    .option('-n, --namespace <ns>', 'the namespace the task grants access in (required)')
    .option('--name <name>', 'task name (default: run-<random>)')
    .option('--ttl <duration>', "upper bound on the command's access, e.g. 10m (default: the template's)")
    .option('--reason <text>', 'why: recorded in the audit log')
    .option('--approval <token>', 'approval token for a gated template (default: $BROKER_APPROVAL_TOKEN)')
    .option('--wait', 'for a gated template: wait until the request is approved, then start (as task start --wait)')
    .option('--timeout <duration>', 'with --wait: give up after this long', '10m')
    .addOption(new Option('--via <mode>', "proxy: the command's kubectl goes through the broker's Kubernetes API proxy; direct: to the API server (default: proxy when the broker has one)").choices(['proxy', 'direct']))
    .option('--server <url>', 'API server URL (default: what the broker publishes)')
    .option('--certificate-authority <file>', 'CA of the API server, PEM (default: the broker\'s)')
    .addHelpText(
      'after',
      '\nExamples:\n  broker run deployer --namespace shop-staging --ttl 10m --reason "release 1.4.2" -- kubectl rollout restart deploy/web\n' +
        '  broker run debug-exec --namespace shop-staging --wait -- kubectl exec web-1 -- ps   # gated: waits for an approver\n\nExit code: the command\'s own once it ran (128+N if killed by signal N); if its task could not be ended, 1 when the command had succeeded.',
    )
    .action(async (template: string, command: string[], flags: RunFlags, cmd: Command) => {
      requireNamespace(flags.namespace, `broker run ${template}`);
      // main() exits with process.exitCode when a command sets it.
      process.exitCode = await runOnce(template, command, flags, cmd);
    });
}

async function runOnce(template: string, command: string[], flags: RunFlags, cmd: Command): Promise<number> {
  const globals = cmd.optsWithGlobals<BrokerFlags>();
  const client = await clientFor(cmd);
  let received: NodeJS.Signals | undefined;
  let child: ReturnType<typeof spawn> | undefined;
  const onSignal = (sig: NodeJS.Signals) => {
    received ??= sig;
    child?.kill(sig);
  };
  for (const sig of FORWARDED) process.on(sig, onSignal);
  let dir: string | undefined;
  let taskId: string | undefined;
  const cleanUp = async (): Promise<boolean> => {
    for (const sig of FORWARDED) process.off(sig, onSignal);
    if (dir) rmSync(dir, { recursive: true, force: true });
    let ended = true;
    if (taskId) {
      try {
        const report: TaskView & Partial<LeftBehindReport> = await client.endTask(taskId);
        process.stderr.write(style.dim(`broker run: task ${taskId} ended\n`));
        // What the command left that can hold or grant access goes to stderr: stdout is the command's.
        const left = leftBehindText(report);
        if (left && report.recording === 'webhook' && (report.leftBehind?.length ?? 0) > 0) process.stderr.write(`broker run: ${left}`);
      } catch (err) {
        process.stderr.write(`${style.error('error')}: could not end task ${taskId}: ${(err as Error).message} (it expires at its TTL)\n`);
        ended = false;
      }
    }
    await client.close();
    return ended;
  };
  let code: number;
  try {
    code = await (async () => {
      const { server, caData, via } = await kubeconfigTarget(flags, () => client.cluster(), client.brokerCa);
      const name = flags.name ?? `run-${randomBytes(4).toString('hex')}`;
      const request = { template, namespace: flags.namespace!, name, ttl: flags.ttl, reason: flags.reason };
      const token = flags.approval ?? process.env['BROKER_APPROVAL_TOKEN'];
      const task = flags.wait && !token ? await startWaiting(client, request, flags.timeout, () => received) : await client.startTask(request, token);
      taskId = task.id;
      process.stderr.write(style.dim(`broker run: task ${safe(task.name)} (${safe(task.id)}) started: ${safe(task.template)} in ${safe(task.namespace)}\n`));
      if (received) return signalCode(received);

      const { execKubeconfig } = await import('../client/kubeconfig.ts');
      dir = mkdtempSync(join(tmpdir(), 'task-broker-run-'));
      const kubeconfig = join(dir, 'kubeconfig');
      writeFileSync(
        kubeconfig,
        execKubeconfig({ task: task.id, server, certificateAuthorityData: caData, namespace: task.namespace, broker: client.url, brokerCa: client.brokerCa, via }),
        { mode: 0o600 },
      );
      const [program, ...args] = command;
      const env: NodeJS.ProcessEnv = { ...process.env, KUBECONFIG: kubeconfig, BROKER_URL: client.url };
      if (globals.brokerCa) env['BROKER_CA'] = globals.brokerCa;
      const started = spawn(program!, args, { stdio: 'inherit', env });
      child = started;
      return await new Promise<number>((done) => {
        started.once('error', (err: NodeJS.ErrnoException) => {
          process.stderr.write(`${style.error('error')}: could not run ${program}: ${err.code ?? err.message}\n`);
          done(err.code === 'ENOENT' ? 127 : 126);
        });
        started.once('exit', (exit, signal) => done(exit ?? (signal ? signalCode(signal) : EXIT.error)));
      });
    })();
  } catch (err) {
    await cleanUp();
    throw err;
  }
  const ended = await cleanUp();
  // A command that succeeded must not hide a grant left standing.
  return !ended && code === 0 ? EXIT.error : code;
}

function signalCode(signal: NodeJS.Signals): number {
  return 128 + (constants.signals[signal] ?? 0);
}
