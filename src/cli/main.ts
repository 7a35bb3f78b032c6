/**
 * `broker`: the command line for people and CI. The exec credential plugin has its own lean entry
 * (bin/broker dispatches `broker credential` there before this module is loaded).
 */
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { Command, CommanderError } from 'commander';
import type { PluginModule } from '../credential/main.cts';
import { BrokerError, isBrokerError } from '../errors.ts';
import { EXIT, exitCodeFor } from './exit-codes.ts';
import { agentCommand } from './agent.ts';
import { loginCommands } from './login.ts';
import { approvalCommands } from './approvals.ts';
import { auditCommand } from './audit.ts';
import { devClusterCommand } from './dev-cluster.ts';
import { demoCommand } from './demo.ts';
import { addBrokerOptions } from './broker-options.ts';
import { kubeconfigCommand } from './kubeconfig.ts';
import { mcpCommand } from './mcp.ts';
import { policyCommand } from './policy.ts';
import { runCommand } from './run.ts';
import { taskCommand } from './task.ts';
import { serveCommand } from './serve.ts';
import { completionCommand } from './completion.ts';
import { templatesCommand } from './templates.ts';
import { whoamiCommand } from './whoami.ts';
import { safe, style } from './output.ts';

export function buildProgram(): Command {
  const program = new Command('broker')
    .description('task-broker: short-lived, per-task Kubernetes access for agents, people and CI')
    .version(packageVersion(), '-V, --version')
    .showHelpAfterError('(run with --help for usage)')
    .showSuggestionAfterError(true)
    .exitOverride()
    .addHelpText('after', '\nExample:\n  eval "$(broker dev-cluster up)"   # a local kube-apiserver to try task-broker against\n\nExit codes (docs/cli.md): 0 ok, 1 error, 2 usage, 3 approval required, 4 not authenticated, 5 unavailable.');
  addBrokerOptions(program);
  program.addCommand(whoamiCommand());
  program.addCommand(agentCommand());
  for (const cmd of loginCommands()) program.addCommand(cmd);
  program.addCommand(templatesCommand());
  program.addCommand(taskCommand());
  program.addCommand(runCommand());
  for (const cmd of approvalCommands()) program.addCommand(cmd);
  program.addCommand(kubeconfigCommand());
  program.addCommand(mcpCommand());
  program.addCommand(demoCommand());
  program.addCommand(devClusterCommand());
  program.addCommand(credentialCommand());
  program.addCommand(policyCommand());
  program.addCommand(auditCommand());
  program.addCommand(serveCommand());
  program.addCommand(completionCommand(() => program));
  // Subcommands inherit exit handling and error display.
  const inherit = (cmd: Command) => {
    cmd.exitOverride().showHelpAfterError('(run with --help for usage)').showSuggestionAfterError(true);
    unknownBeforeMissing(cmd);
    cmd.commands.forEach(inherit);
  };
  program.commands.forEach(inherit);
  return program;
}

/**
 * Commander checks required options before unknown ones, so a mistyped required flag
 * (`--namespase x`) would be reported as the required one missing. For a command with required
 * options, an unknown flag is reported first, as unknown, with commander's "did you mean".
 */
function unknownBeforeMissing(cmd: Command): void {
  if (cmd.commands.length > 0 || !cmd.options.some((o) => o.mandatory)) return;
  const parseOptions = cmd.parseOptions.bind(cmd);
  cmd.parseOptions = (argv) => {
    const parsed = parseOptions(argv);
    const flag = parsed.unknown[0];
    if (flag?.startsWith('-') && !parsed.unknown.some((a) => a === '-h' || a === '--help')) {
      // commander's own report (message, suggestion, exit code); not in its typings
      (cmd as unknown as { unknownOption(flag: string): never }).unknownOption(flag);
    }
    return parsed;
  };
}

/**
 * Listed for --help; bin/broker normally runs the plugin's own lean entry before this module loads.
 * Reached only through `node dist/cli/main.js credential ...`, which then hands over to the same code.
 */
function credentialCommand(): Command {
  return new Command('credential')
    .description('the kubectl exec credential plugin (see `broker credential --help`)')
    .helpOption(false)
    .allowUnknownOption()
    .allowExcessArguments()
    .argument('[args...]')
    .action(async (args: string[]) => {
      const { run } = loadPlugin();
      process.exitCode = await run({ argv: args, env: process.env, stdout: (s) => process.stdout.write(s), stderr: (s) => process.stderr.write(s) });
    });
}

/** The plugin is CommonJS (for start-up time): .cts in the sources, .cjs once compiled. */
function loadPlugin(): PluginModule {
  const ext = import.meta.url.endsWith('.ts') ? 'cts' : 'cjs';
  return createRequire(import.meta.url)(`../credential/main.${ext}`) as PluginModule;
}

function packageVersion(): string {
  const pkg = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string };
  return pkg.version;
}

export async function main(argv: string[]): Promise<number> {
  // Output piped into `head` (or any reader that stops early) ends the command quietly, not with a trace.
  for (const stream of [process.stdout, process.stderr]) {
    stream.on('error', (err: NodeJS.ErrnoException) => {
      if (err.code === 'EPIPE') process.exit(typeof process.exitCode === 'number' ? process.exitCode : EXIT.ok);
      throw err;
    });
  }
  const program = buildProgram();
  try {
    await program.parseAsync(argv, { from: 'user' });
    // A command may set its own exit code (`broker run` returns its command's).
    return typeof process.exitCode === 'number' ? process.exitCode : EXIT.ok;
  } catch (err) {
    return report(err);
  }
}

function report(err: unknown): number {
  if (err instanceof CommanderError) {
    // Commander has already printed its message (and help, when asked for).
    if (err.code === 'commander.helpDisplayed' || err.code === 'commander.version' || err.code === 'commander.help') return EXIT.ok;
    if (err.code === 'commander.executeSubCommandAsync') return err.exitCode;
    return err.exitCode === 0 ? EXIT.ok : EXIT.usage;
  }
  if (isBrokerError(err)) {
    // The broker's messages may quote what an agent chose (a task name): escaped before the terminal sees them.
    const remote = (text: string) => ('fromBroker' in err ? safe(text) : text);
    const field = err.field ? ` (${remote(err.field)})` : '';
    process.stderr.write(`${style.error('error')}: ${remote(err.message)}${field} [${err.code}]\n`);
    return exitCodeFor(err.code);
  }
  const internal = new BrokerError('internal', 'unexpected failure', { cause: err });
  process.stderr.write(`${style.error('error')}: ${internal.message}: ${err instanceof Error ? err.message : String(err)} [internal]\n`);
  return EXIT.error;
}

process.exitCode = await main(process.argv.slice(2));
