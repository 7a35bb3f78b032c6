import { Command } from 'commander';
import { BrokerError } from '../errors.ts';
import { describeBreak, verifyAuditFile } from '../audit/verify.ts';
import type { VerifyResult } from '../audit/types.ts';
import { outputOption, printJson, style, type OutputFormat } from './output.ts';

interface VerifyCommandOptions {
  expectLast?: string;
  output: OutputFormat;
}

export function auditCommand(): Command {
  const cmd = new Command('audit').description('inspect the broker\'s hash-chained audit log (see docs/audit.md)');
  cmd
    .command('verify')
    .description('walk the hash chain of an audit log file and name the first record that does not hold')
    .argument('<file>', 'the audit log (JSON Lines)')
    .option(
      '--expect-last <hash>',
      'the hash the last record must have (kept elsewhere, e.g. from an earlier verify): detects records cut from the end',
    )
    .addOption(outputOption())
    .addHelpText(
      'after',
      [
        '',
        'Exit status 0 if the chain holds, 1 if it is broken.',
        '',
        'Example:',
        '  broker audit verify /var/lib/task-broker/audit.jsonl',
        '  # keep a checkpoint somewhere else, later check nothing was cut from the end:',
        '  broker audit verify audit.jsonl -o json | jq -r .lastHash > /safe/audit.last',
        '  broker audit verify audit.jsonl --expect-last "$(cat /safe/audit.last)"',
      ].join('\n'),
    )
    .action((file: string, opts: VerifyCommandOptions) => verify(file, opts));
  // `show` (a task's events, including the API server's view of its requests) comes later.
  return cmd;
}

async function verify(file: string, opts: VerifyCommandOptions): Promise<void> {
  if (opts.expectLast !== undefined && !/^[0-9a-f]{64}$/.test(opts.expectLast)) {
    throw new BrokerError('invalid_argument', 'expected 64 lowercase hex digits (a SHA-256 hash)', { field: '--expect-last' });
  }
  let result: VerifyResult;
  try {
    result = await verifyAuditFile(file, { expectLast: opts.expectLast });
  } catch (err) {
    throw new BrokerError('invalid_argument', `cannot read ${file}: ${err instanceof Error ? err.message : String(err)}`, {
      field: 'FILE',
      cause: err,
    });
  }
  if (opts.output === 'json') printJson(result);
  if (result.ok) {
    if (opts.output !== 'json') process.stdout.write(`${style.ok('ok')}: ${result.records} records, last hash ${result.lastHash}\n`);
    return;
  }
  // Also after -o json: main.ts turns the BrokerError into exit status 1 (stdout holds only the JSON).
  throw new BrokerError('audit_chain_broken', describeBreak(result));
}
