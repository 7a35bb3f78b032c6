import { Command } from 'commander';
import { withClient } from './broker-options.ts';
import { fields, outputOption, printJson, safe, type OutputFormat } from './output.ts';

/** `broker whoami`: who the broker takes the caller for, and where that identity came from. */
export function whoamiCommand(): Command {
  return new Command('whoami')
    .description('show who the broker takes you for: subject, agent, principal, approver groups, and where the identity came from')
    .addOption(outputOption())
    .addHelpText('after', '\nExample:\n  broker whoami\n  broker whoami -o json | jq -r .agent')
    .action(async (flags: { output: OutputFormat }, cmd: Command) => {
      await withClient(cmd, async (client) => {
        const me = await client.whoami();
        if (flags.output === 'json') return printJson({ ...me, identitySource: client.identitySource, broker: client.url });
        process.stdout.write(
          fields([
            ['subject', safe(me.subject)],
            ['method', safe(me.method)],
            ['agent', me.agent === null ? '(none: not an agent, cannot start tasks)' : safe(me.agent)],
            ['principal', safe(me.principal)],
            ['approver of', me.approverGroups.length ? me.approverGroups.map(safe).join(', ') : '(no approver group)'],
            ['identity', safe(client.identitySource)],
            ['broker', safe(client.url)],
          ]),
        );
      });
    });
}
