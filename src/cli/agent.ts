import { Command } from 'commander';
import type { AgentView } from '../client/broker-client.ts';
import { clientFor, withClient, type BrokerFlags } from './broker-options.ts';
import { columns, fields, outputOption, printJson, relativeTime, safe, style, when, type OutputFormat } from './output.ts';

/** `broker agent register|enroll|list|revoke`: agent keys (docs/identity.md). */
export function agentCommand(): Command {
  const agent = new Command('agent').description('agent keys: enrol an agent host with a one-time code, list and revoke keys');
  agent
    .command('register')
    .description('(administrators) make a one-time enrolment code for an agent of the policy: valid 15 minutes, used once')
    .argument('<name>', 'the agent, as the policy names it')
    .addOption(outputOption())
    .addHelpText('after', '\nGive the code to the agent\'s host over a channel you trust; there: broker agent enroll CODE\n\nExample:\n  broker agent register code-agent')
    .action(async (name: string, flags: { output: OutputFormat }, cmd: Command) => {
      await withClient(cmd, async (client) => {
        const r = await client.registerAgent(name);
        if (flags.output === 'json') return printJson(r);
        process.stdout.write(`${r.code}\n`);
        process.stderr.write(style.dim(`enrolment code for agent ${safe(r.agent)}, valid until ${when(r.expiresAt)}, once; on the agent's host: broker agent enroll CODE\n`));
      });
    });
  agent
    .command('enroll')
    .description("on the agent's host: make an Ed25519 key pair, keep the private key in the OS keychain, register the public key with the code")
    .argument('<code>', 'the enrolment code from `broker agent register`')
    .option('--print-key', 'no keychain (a container): print the private key once on stdout, as BROKER_AGENT_KEY=..., for your secret store; nothing is stored')
    .addOption(outputOption())
    .addHelpText(
      'after',
      '\nWithout --print-key the key goes into the OS keychain (service "task-broker"); with no keychain the command fails before the code is used, naming the alternatives. No file is written either way.\n\nExample:\n  broker agent enroll tbe1.Xb4...\n  broker agent enroll tbe1.Xb4... --print-key   # in a container; then run it with BROKER_AGENT_KEY set',
    )
    .action(async (code: string, flags: { printKey?: boolean; output: OutputFormat }, cmd: Command) => {
      const { enroll } = await import('../identity/enroll.ts');
      const client = await clientFor(cmd, null);
      try {
        const r = await enroll(client, code.trim(), { printKey: flags.printKey ?? false });
        if (flags.output === 'json') return printJson({ agent: r.agent, fingerprint: r.fingerprint, enrolledAt: r.enrolledAt, keptIn: r.keptIn, ...(r.printed ? { agentKey: r.printed } : {}) });
        if (r.printed) process.stdout.write(`BROKER_AGENT_KEY=${r.printed}\n`);
        process.stderr.write(`enrolled agent ${safe(r.agent)}: key ${safe(r.fingerprint)}, private key ${r.keptIn === 'keychain' ? 'in the OS keychain' : 'printed above (shown once: keep it in your secret store)'}\n`);
      } finally {
        await client.close();
      }
    });
  agent
    .command('list')
    .description('(administrators) agents with an enrolled key or an open enrolment code')
    .addOption(outputOption())
    .addHelpText('after', '\nExample:\n  broker agent list -o json')
    .action(async (flags: { output: OutputFormat }, cmd: Command) => {
      await withClient(cmd, async (client) => {
        const { agents } = await client.listAgents();
        if (flags.output === 'json') return printJson({ agents });
        process.stdout.write(table(agents));
      });
    });
  agent
    .command('revoke')
    .description("(administrators) remove an agent's key at once and end all of its active tasks")
    .argument('<name>', 'the agent')
    .addOption(outputOption())
    .addHelpText('after', '\nExample:\n  broker agent revoke code-agent')
    .action(async (name: string, flags: { output: OutputFormat }, cmd: Command) => {
      await withClient(cmd, async (client) => {
        const r = await client.revokeAgent(name);
        if (flags.output === 'json') return printJson(r);
        process.stdout.write(
          fields([
            ['revoked', `agent ${safe(r.agent)}, key ${safe(r.fingerprint)}`],
            ['tasks ended', r.tasksEnded.length ? r.tasksEnded.map((t) => `${safe(t.name)} (${safe(t.id)})`).join(', ') : 'none'],
          ]),
        );
      });
    });
  return agent;
}

function table(agents: AgentView[]): string {
  return columns(
    ['AGENT', 'KEY', 'ENROLLED', 'ENROLMENT CODE', 'ACTIVE TASKS'],
    agents.map((a) => [
      safe(a.name),
      a.key ? safe(a.key.fingerprint) : '-',
      a.key ? relativeTime(a.key.enrolledAt) : '-',
      a.enrolment ? `open, expires ${relativeTime(a.enrolment.expiresAt)}` : '-',
      String(a.activeTasks),
    ]),
    'no agent keys and no open enrolments',
  );
}

export type { BrokerFlags };
