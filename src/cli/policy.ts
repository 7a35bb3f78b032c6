import { Command } from 'commander';
import { PolicyError, loadPolicy } from '../policy/parse.ts';
import type { Policy, PolicyIssue } from '../policy/types.ts';
import { outputOption, printJson, style, type OutputFormat } from './output.ts';

interface CheckOptions {
  output: OutputFormat;
}

export interface PolicySummary {
  agents: number;
  templates: number;
  gated: number;
  approverGroups: number;
}

/** What `policy check` prints with `-o json`. */
export interface PolicyCheckResult {
  valid: boolean;
  issues: PolicyIssue[];
  summary: PolicySummary | null;
}

/**
 * `broker policy`: `check FILE` validates a policy file. Further subcommands (`apply`) are added to
 * the returned command by their own modules: `policyCommand().addCommand(...)`.
 */
export function policyCommand(): Command {
  const cmd = new Command('policy').description('work with the policy file (agents, templates, gated set, approvers)');
  cmd
    .command('check')
    .description('validate a policy file and report every problem with its line')
    .argument('<file>', 'the policy YAML file')
    .addOption(outputOption())
    .addHelpText('after', '\nExample:\n  broker policy check policy.yaml')
    .action((file: string, opts: CheckOptions) => check(file, opts));
  return cmd;
}

export function policySummary(policy: Policy): PolicySummary {
  return {
    agents: policy.agents.length,
    templates: policy.templates.length,
    gated: policy.gated.length,
    approverGroups: policy.approverGroups.length,
  };
}

async function check(file: string, opts: CheckOptions): Promise<void> {
  let policy: Policy;
  try {
    policy = await loadPolicy(file);
  } catch (err) {
    // Issues go to stderr through main's error report (exit 1); with -o json, stdout also gets the result.
    if (err instanceof PolicyError && opts.output === 'json') printJson({ valid: false, issues: err.issues, summary: null } satisfies PolicyCheckResult);
    throw err;
  }
  const summary = policySummary(policy);
  if (opts.output === 'json') {
    printJson({ valid: true, issues: [], summary } satisfies PolicyCheckResult);
    return;
  }
  const n = (count: number, noun: string) => `${count} ${noun}${count === 1 ? '' : 's'}`;
  process.stdout.write(
    `${file}: ${style.ok('valid')}: ${n(summary.agents, 'agent')}, ${n(summary.templates, 'template')}, ` +
      `${n(summary.gated, 'gated pair')}, ${n(summary.approverGroups, 'approver group')}\n`,
  );
}
