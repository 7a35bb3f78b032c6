import { existsSync } from 'node:fs';
import { Command } from 'commander';
import { BrokerError } from '../errors.ts';
import { checkRecordings } from '../audit/recordings.ts';
// Imports nothing: the PostgreSQL driver loads only when a store is named.
import { isPostgresUrl } from '../audit/store-schema.ts';
import { describeBreak, verifyLiveFile, type LiveVerifyResult } from '../audit/verify.ts';
import type { AuditRecord, VerifyResult } from '../audit/types.ts';
import { outputOption, printJson, style, type OutputFormat } from './output.ts';
import { webhookConfigCommand } from './audit-webhook.ts';

interface VerifyCommandOptions {
  expect?: string;
  expectLast?: string;
  strict?: boolean;
  recordings?: string;
  output: OutputFormat;
}

interface RepairTailCommandOptions {
  dryRun?: boolean;
  output: OutputFormat;
}

export function auditCommand(): Command {
  const cmd = new Command('audit').description('inspect the broker\'s hash-chained audit log (see docs/audit.md)');
  cmd
    .command('verify')
    .description('walk the hash chain of an audit log file (or a PostgreSQL audit store) and name the first record that does not hold')
    .argument('<file>', 'the audit log (JSON Lines), or a PostgreSQL audit store (postgres://...)')
    .option(
      '--expect <hash>',
      'a record with this hash must be in the chain, anywhere (kept elsewhere): nothing up to it was cut or changed; for a live log that has grown since',
    )
    .option(
      '--expect-last <hash>',
      'the hash the last record must have (kept elsewhere, e.g. from an earlier verify): detects records cut from the end; for a closed log',
    )
    .option('--strict', 'an incomplete last line is torn at once (without: it is "in progress" if its newline arrives within 1 s)')
    .option('--recordings <dir>', "the proxy's exec and attach session recordings, each checked against the SHA-256 its end record holds (default: FILE.sessions, when it exists)")
    .addOption(outputOption())
    .addHelpText(
      'after',
      [
        '',
        'Exit status 0 if the chain holds, 1 if it is broken. Works on a live log: it checks the file as it was when',
        'opened, up to its last complete line; a last line being written is reported as in progress, not checked.',
        '',
        'Example:',
        '  broker audit verify /var/lib/task-broker/audit.jsonl',
        '  # keep a checkpoint somewhere else, later check nothing up to it was cut or changed:',
        '  broker audit verify audit.jsonl -o json | jq -r .lastHash > /safe/audit.last',
        '  broker audit verify audit.jsonl --expect "$(cat /safe/audit.last)"       # the log may have grown',
        '  broker audit verify audit.jsonl --expect-last "$(cat /safe/audit.last)"  # a closed log: nothing after it',
        '  PGPASSWORD=... broker audit verify postgres://auditor@db.example:5432/broker  # the store all replicas share',
      ].join('\n'),
    )
    .action((file: string, opts: VerifyCommandOptions) => verify(file, opts));
  cmd
    .command('repair-tail')
    .description('remove a torn last line (a write that never completed) and record the repair; never anything else')
    .argument('<file>', 'the audit log (JSON Lines)')
    .option('--dry-run', 'say what would be removed and appended; change nothing')
    .addOption(outputOption())
    .addHelpText(
      'after',
      [
        '',
        'Removes the last line only when it is not a complete record (no trailing newline, not JSON, or a hash that does',
        'not match its contents) and every line before it holds; then appends an audit.tail_repaired record (the removed',
        'byte count and their SHA-256, never the bytes). A log broken anywhere else is refused (audit_chain_broken, exit 1)',
        'and left as it is; a log held by a writer (FILE.lock) is refused naming it (exit 5). Nothing to repair: exit 0.',
        '',
        'Example:',
        '  broker audit repair-tail --dry-run /var/lib/task-broker/audit.jsonl',
        '  cp audit.jsonl audit.jsonl.before-repair && broker audit repair-tail audit.jsonl',
      ].join('\n'),
    )
    .action((file: string, opts: RepairTailCommandOptions) => repairTailCommand(file, opts));
  cmd.addCommand(showCommand());
  cmd.addCommand(migrateCommand());
  cmd.addCommand(webhookConfigCommand());
  return cmd;
}

async function verify(file: string, opts: VerifyCommandOptions): Promise<void> {
  for (const [flag, value] of [['--expect', opts.expect], ['--expect-last', opts.expectLast]] as const) {
    if (value !== undefined && !/^[0-9a-f]{64}$/.test(value)) {
      throw new BrokerError('invalid_argument', 'expected 64 lowercase hex digits (a SHA-256 hash)', { field: flag });
    }
  }
  let result: LiveVerifyResult;
  if (isPostgresUrl(file)) return verifyStore(file, opts);
  try {
    result = await verifyLiveFile(file, { expect: opts.expect, expectLast: opts.expectLast, strict: opts.strict });
  } catch (err) {
    throw new BrokerError('invalid_argument', `cannot read ${file}: ${err instanceof Error ? err.message : String(err)}`, {
      field: 'FILE',
      cause: err,
    });
  }
  // The session recordings the log vouches for (src/audit/recordings.ts): only once the chain holds.
  const recordingsDir = opts.recordings ?? `${file}.sessions`;
  const recordings = result.ok && (opts.recordings !== undefined || existsSync(recordingsDir)) ? await checkRecordings(file, recordingsDir) : undefined;
  if (opts.output === 'json') printJson(recordings ? { ...result, recordings } : result);
  if (recordings && recordings.missing.length + recordings.changed.length > 0) {
    const named = [...recordings.changed.map((f) => `${f} (changed)`), ...recordings.missing.map((f) => `${f} (missing)`)];
    throw new BrokerError(
      'audit_chain_broken',
      `${file}: the chain holds, but ${named.length} of the ${recordings.checked} session recording${recordings.checked === 1 ? '' : 's'} it names in ${recordingsDir} do${named.length === 1 ? 'es' : ''} not match: ${named.slice(0, 10).join(', ')}${named.length > 10 ? ', ...' : ''}`,
      { field: '--recordings' },
    );
  }
  const hint = result.problem === 'torn-tail' ? `; if that is the only problem, \`broker audit repair-tail ${file}\` removes it and records that it did` : '';
  const recordingsLine = recordings && `session recordings: ${recordings.checked} checked against their hashes in the log, all match\n`;
  reportVerdict(result, file, opts.output, recordingsLine, hint);
}

/**
 * verify's answer, for a file or the store: the summary when the chain holds (text output), else
 * audit_chain_broken naming `where` (also after -o json: main.ts turns it into exit status 1, and
 * stdout holds only the JSON).
 */
function reportVerdict(result: LiveVerifyResult, where: string, output: OutputFormat, recordingsLine?: string, hint = ''): void {
  if (result.ok) {
    if (output !== 'json') {
      let text = `${style.ok('ok')}: ${result.records} records, last hash ${result.lastHash}\n`;
      if (result.expected) {
        const after = result.records - result.expected.seq - 1;
        text += `expected record found: seq ${result.expected.seq} (line ${result.expected.line}), ${after} record${after === 1 ? '' : 's'} after it\n`;
      }
      if (recordingsLine) text += recordingsLine;
      if (result.inProgress) {
        text += `in progress: line ${result.inProgress.line} (${result.inProgress.bytes} bytes so far) was being written when read; not checked\n`;
      }
      process.stdout.write(text);
    }
    return;
  }
  if (result.problem === 'expect-not-found') throw new BrokerError('audit_chain_broken', `${where}: ${result.reason}`, { field: '--expect' });
  throw new BrokerError('audit_chain_broken', describeBreak(result) + hint);
}


/** `audit verify postgres://...`: the same checks and output as for a file; a row is a line. */
async function verifyStore(url: string, opts: VerifyCommandOptions): Promise<void> {
  const { PostgresAuditReader } = await import('../audit/postgres.ts');
  let expected: LiveVerifyResult['expected'];
  const reader = new PostgresAuditReader(url, (seq, hash) => {
    if (expected === undefined && hash === opts.expect) expected = { hash, seq, line: seq + 1 };
  });
  await reader.read({ keep: false });
  const chain = reader.result(true, { expectLast: opts.expectLast });
  let result: LiveVerifyResult = chain;
  if (chain.ok && opts.expect !== undefined) {
    result = expected ? { ...chain, expected } : { ok: false, records: chain.records, line: chain.records, reason: `no record has the hash ${opts.expect} (records up to it were cut or changed)`, problem: 'expect-not-found' };
  }
  if (opts.output === 'json') printJson(result);
  reportVerdict(result, reader.where, opts.output);
}

interface MigrateCommandOptions {
  grant: string[];
  output: OutputFormat;
}

function migrateCommand(): Command {
  return new Command('migrate')
    .description("create the PostgreSQL audit store's schema (safe to run again) and grant the broker's role SELECT and INSERT on it, nothing more")
    .argument('<url>', "the database, as its owner: postgres://OWNER@HOST:PORT/DB (the password in PGPASSWORD or ~/.pgpass, not in the URL)")
    .option('--grant <role>', "a role that may read and append (the brokers' role); repeat for more", (v: string, prev: string[]) => [...prev, v], [] as string[])
    .addOption(outputOption())
    .addHelpText(
      'after',
      [
        '',
        'Creates schema task_broker and table task_broker.audit if missing (one row per record: seq, time, type, task,',
        'event_key, and the record\'s canonical line) with its indexes (the web console\'s task pages among them), and the',
        'tables task_broker.used_proofs (agent proofs used once across replicas) and task_broker.console_sessions and',
        'console_signouts (web console sessions shared by replicas), each with a prune function that deletes only rows',
        'expired five minutes or more, and the function task_broker.append_audit the brokers append with (SECURITY',
        'INVOKER: their own rights). Revokes everything from PUBLIC, and grants each --grant role USAGE on the schema,',
        'SELECT, INSERT on the tables and EXECUTE on those functions: it can never UPDATE, DELETE or TRUNCATE.',
        'Running it again changes nothing (except pruning expired rows). Run it again before upgrading the brokers.',
        '',
        'Example:',
        '  PGPASSWORD=... broker audit migrate postgres://owner@db.example:5432/broker --grant task_broker',
        '  broker serve --audit-store postgres://task_broker@db.example:5432/broker ...   # PGPASSWORD for the broker role',
      ].join('\n'),
    )
    .action(async (url: string, opts: MigrateCommandOptions) => {
      if (!isPostgresUrl(url)) throw new BrokerError('invalid_argument', 'expected a postgres:// or postgresql:// URL', { field: 'URL' });
      const { migrate, redactUrl } = await import('../audit/postgres.ts');
      const r = await migrate(url, opts.grant);
      if (opts.output === 'json') return printJson({ store: redactUrl(url), created: r.created, granted: r.granted });
      process.stdout.write(
        `${style.ok('ok')}: ${redactUrl(url)}: table task_broker.audit ${r.created ? 'created' : 'already there'}; used_proofs, console_sessions, console_signouts and indexes up to date` +
          `${r.granted.length > 0 ? `; SELECT, INSERT (only) granted to ${r.granted.join(', ')}` : ''}\n`,
      );
    });
}

async function repairTailCommand(file: string, opts: RepairTailCommandOptions): Promise<void> {
  const { repairTail } = await import('../audit/repair.ts');
  const r = await repairTail(file, { dryRun: opts.dryRun === true });
  if (opts.output === 'json') {
    printJson({ repaired: r.repaired, dryRun: r.dryRun, file: r.path, kept: r.kept, removed: r.removed ?? null, appended: r.appended ?? null, ...(r.lockTakenOver ? { lockTakenOver: r.lockTakenOver } : {}) });
    return;
  }
  if (!r.removed) {
    process.stdout.write(`nothing to repair: ${file} ends with a complete record (${r.kept.records} records, last hash ${r.kept.lastHash})\n`);
    return;
  }
  const what = `line ${r.removed.line} (${r.removed.bytes} bytes, sha256 ${r.removed.sha256}): ${r.removed.reason}`;
  const follows = r.kept.records > 0 ? `following seq ${r.kept.records - 1}` : 'as the first record';
  if (r.dryRun) {
    process.stdout.write(`would remove ${what}\nwould keep ${r.kept.records} records (${r.kept.bytes} bytes) and append audit.tail_repaired as seq ${r.appended!.seq}, ${follows}\nnothing was changed (--dry-run)\n`);
    return;
  }
  if (r.lockTakenOver) process.stderr.write(`took over a stale lock${r.lockTakenOver['pid'] === undefined ? '' : ` of pid ${String(r.lockTakenOver['pid'])}`}: ${String(r.lockTakenOver['reason'])}\n`);
  process.stdout.write(`${style.ok('repaired')}: removed ${what}\nappended audit.tail_repaired as seq ${r.appended!.seq} (${follows}), hash ${r.appended!.hash}\n`);
}

interface ShowCommandOptions {
  task?: string;
  agent?: string;
  since?: string;
  follow?: boolean;
  output: OutputFormat;
  recordings?: string;
}

function showCommand(): Command {
  return new Command('show')
    .description('the story of tasks in time order: requested, approvals, started, credentials, every API request allowed and denied, ended')
    .argument('<file>', 'the audit log (JSON Lines), or a PostgreSQL audit store (postgres://...)')
    .option('--task <task>', 'a task id, or a task name (every task of that name); each story then ends with what the task left behind')
    .option('--agent <name>', "only this agent's tasks and records")
    .option('--since <when>', 'only events this long ago or later (e.g. 10m, 2h) or since an ISO 8601 time')
    .option('-f, --follow', 'keep reading the log and print matching records as they are appended (until Ctrl-C)')
    .option('--recordings <dir>', "where the proxy's exec and attach session recordings are, to print what was typed and what came back (default: FILE.sessions)")
    .addOption(outputOption())
    .addHelpText(
      'after',
      [
        '',
        'The chain of what is read is verified: a broken chain is reported, naming the record, and the exit status is 1.',
        'With -o json: one document {chain, tasks, records, summary}; with --follow -o json: JSON Lines, one record per line.',
        '',
        'Example:',
        '  broker audit show --task read-pods /var/lib/task-broker/audit.jsonl',
        '  broker audit show --agent deployer --since 1h -o json audit.jsonl | jq \'.records[] | select(.outcome == "denied")\'',
        '  broker audit show --follow audit.jsonl',
      ].join('\n'),
    )
    .action((file: string, opts: ShowCommandOptions) => show(file, opts));
}

async function show(file: string, opts: ShowCommandOptions): Promise<void> {
  const { AuditReader, FollowSelector, NO_PAINT, formatHeader, formatRecord, formatSelection, safeJson, select, selectionJson, storyOfRecord, summarize, summaryLine } =
    await import('../audit/show.ts');
  const filter = { task: opts.task, agent: opts.agent, since: opts.since === undefined ? undefined : await sinceTime(opts.since) };
  // `audit show FILE | head`: a reader that went away is not an error worth a stack trace.
  process.stdout.on('error', (err: NodeJS.ErrnoException) => {
    if (err.code === 'EPIPE') process.exit(0);
    throw err;
  });
  // chalk alone does not look at NO_COLOR; stdout must be a terminal too.
  const colour = process.stdout.isTTY === true && !process.env['NO_COLOR'];
  const paint = colour ? { denied: style.error, dim: style.dim, ok: style.ok } : NO_PAINT;
  const store = isPostgresUrl(file);
  const reader = store ? new (await import('../audit/postgres.ts')).PostgresAuditReader(file) : new AuditReader(file);
  if (store) file = (reader as { where: string }).where; // never a password in a message
  const readOrFail = async () => {
    try {
      return await reader.read();
    } catch (err) {
      if (store) throw err; // the store's own message (audit_unavailable), already without the password
      throw new BrokerError('invalid_argument', `cannot read ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`, { field: 'FILE', cause: err });
    }
  };
  const broken = (result: Extract<VerifyResult, { ok: false }>) =>
    new BrokerError('audit_chain_broken', `${file}: ${describeBreak(result)}; records from there on are not shown`);

  const records = await readOrFail();
  if (!opts.follow) {
    const chain = reader.result(true);
    const selection = select(records, filter);
    if (opts.output === 'json') process.stdout.write(safeJson(selectionJson(selection, chain), 2) + '\n');
    else process.stdout.write(formatSelection(selection, paint, { leftBehind: opts.task !== undefined, recordings: opts.recordings ?? (store ? undefined : `${file}.sessions`) }));
    if (!chain.ok) throw broken(chain);
    if (opts.task !== undefined && selection.stories.length === 0) {
      throw new BrokerError('not_found', `no task with id or name "${opts.task}"${opts.agent ? ` of agent "${opts.agent}"` : ''} in ${file}`, { field: '--task' });
    }
    return;
  }

  // --follow: what is there, then each matching record as it is appended.
  const selector = new FollowSelector(filter);
  const shown: AuditRecord[] = [];
  let header: string | undefined;
  const emit = (r: AuditRecord) => {
    shown.push(r);
    if (opts.output === 'json') return void process.stdout.write(safeJson(r) + '\n');
    const stub = storyOfRecord(r);
    const key = r.task ?? r.taskName ?? '';
    if (key !== header) {
      header = key;
      process.stdout.write((key === '' ? 'not about a task:' : formatHeader(stub)) + '\n');
    }
    process.stdout.write(formatRecord(r, paint) + '\n');
  };
  for (const r of records) if (selector.matches(r)) emit(r);
  let stop: () => void = () => {};
  const stopped = new Promise<void>((done) => (stop = done));
  const onSignal = () => stop();
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  try {
    for (;;) {
      if (reader.broken) throw broken(reader.broken);
      const more = await Promise.race([new Promise<'tick'>((done) => setTimeout(() => done('tick'), 250)), stopped.then(() => 'stop' as const)]);
      if (more === 'stop') break;
      for (const r of await readOrFail()) if (selector.matches(r)) emit(r);
    }
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
  if (opts.output !== 'json') {
    const sum = summarize(shown);
    process.stderr.write(style.dim(`${summaryLine(sum)}\n`));
  }
}

/** `--since`: a duration back from now (10m, 2h) or an ISO 8601 time. */
async function sinceTime(text: string): Promise<Date> {
  if (/^\d{4}-\d{2}-\d{2}/.test(text)) {
    const t = Date.parse(text);
    if (Number.isNaN(t)) throw new BrokerError('invalid_argument', `${JSON.stringify(text)} is not a time`, { field: '--since' });
    return new Date(t);
  }
  const { parseDuration } = await import('../policy/duration.ts');
  try {
    return new Date(Date.now() - parseDuration(text) * 1000);
  } catch (err) {
    throw new BrokerError('invalid_argument', `${(err as Error).message}, or an ISO 8601 time`, { field: '--since' });
  }
}
