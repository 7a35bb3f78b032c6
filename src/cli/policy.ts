import { delimiter } from 'node:path';
import { Command, Option } from 'commander';
import { BrokerError } from '../errors.ts';
import { isPostgresUrl } from '../audit/store-schema.ts';
// The policy parser (yaml, ajv) and the Kubernetes client load only when a command needs them.
import type { AffectedTask, Change, ClusterRoleGate } from '../policy/apply.ts';
import type { GatedPair, Identity, Policy, PolicyIssue } from '../policy/types.ts';
import { outputOption, printJson, style, type OutputFormat } from './output.ts';

interface CheckOptions {
  output: OutputFormat;
}

interface ApplyOptions {
  kubeconfig?: string;
  dryRun: boolean;
  auditLog?: string;
  auditStore?: string;
  endAffectedTasks: boolean;
  /** yaml: the objects themselves, as manifests (with --dry-run only; for the Helm chart or kubectl apply). */
  output: OutputFormat | 'yaml';
}

/** What `policy apply` prints with `-o json`. */
export interface PolicyApplyResult {
  dryRun: boolean;
  changes: Change[];
  /**
   * Each `clusterRole` template, checked against the gated set with its ClusterRole's rules as the
   * cluster holds them; `hits` non-empty means its tasks need approval (`approvers`, `required`).
   */
  clusterRoles: Array<{ template: string; clusterRole: string; hits: string[]; aggregated: boolean; approvers: string[]; required: number }>;
  /** Why each pair in `clusterRoles[].hits` is gated, keyed by the pair as written there. */
  reasons: Record<string, string>;
  /** The active tasks ended before the apply (`--end-affected-tasks`; with `--dry-run`, those it would end). */
  endedTasks: Array<Pick<AffectedTask, 'id' | 'agent' | 'name' | 'template' | 'namespace' | 'cause'>>;
}

export interface PolicySummary {
  agents: number;
  /** People (approvers), each with their identities (`serviceAccount NS/NAME`, `oidc ISSUER SUB`). */
  people: Array<{ name: string; identities: string[] }>;
  templates: number;
  gated: number;
  approverGroups: number;
  /** Templates whose rules intersect the gated set, with what they hit: they need approval to start. */
  gatedTemplates: Array<{ template: string; hits: string[]; approvers: string[]; required: number }>;
  /**
   * Templates that bind an existing ClusterRole: its rules live in the cluster, so `policy check`
   * cannot see them; `policy apply` and the broker, at every task start, check them against the gated set.
   */
  clusterRoleTemplates: Array<{ template: string; clusterRole: string }>;
  /** Why each pair in `gatedTemplates[].hits` is gated, keyed by the pair as written there ("can mint tokens that outlive the task"). */
  reasons: Record<string, string>;
}

/** A gated pair as `policy check` shows it: `create pods/exec`, `delete apps/deployments`. */
function pairText(h: GatedPair): string {
  return `${h.verb} ${h.apiGroup ? `${h.apiGroup}/` : ''}${h.resource}`;
}

function identityText(id: Identity): string {
  if (id.kind === 'serviceAccount') return `serviceAccount ${id.namespace}/${id.name}`;
  if (id.kind === 'oidc') return `oidc ${id.issuer} ${id.subject}`;
  return `oidcGroup ${id.issuer} ${id.group}`;
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
  cmd
    .command('apply')
    .description("create or update the cluster's RBAC for the policy: template ClusterRoles and the broker's own, bounded, roles")
    .argument('<file>', 'the policy YAML file')
    .option('--kubeconfig <path>', "an administrator's kubeconfig (policy apply creates RBAC objects; default: $KUBECONFIG)")
    .option('--dry-run', 'show what would change without changing anything', false)
    .option('--audit-log <file>', "record a policy.applied event in this audit log (e.g. the broker's)")
    .option('--audit-store <url>', 'record the apply, and each task it ends, in the PostgreSQL audit store the brokers share (in place of --audit-log): postgres://ROLE@HOST:PORT/DB, the password in PGPASSWORD, a role that may append to it')
    .option('--end-affected-tasks', 'end the active tasks whose template, or namespace, the policy removes (each recorded in --audit-log or --audit-store), then apply', false)
    .addOption(
      new Option('-o, --output <format>', 'output format; yaml (with --dry-run): the objects apply would make exist, as manifests (for the Helm chart)')
        .choices(['text', 'json', 'yaml'])
        .default('text'),
    )
    .addHelpText(
      'after',
      '\nExample:\n  broker policy apply policy.yaml --kubeconfig admin.kubeconfig --dry-run   # see what would change\n' +
        '  broker policy apply policy.yaml --kubeconfig admin.kubeconfig\n' +
        '  broker policy apply policy.yaml --kubeconfig admin.kubeconfig --dry-run -o yaml > rbac.yaml   # for the Helm chart (docs/deploy.md)',
    )
    .action((file: string, opts: ApplyOptions) => apply(file, opts));
  return cmd;
}

export async function policySummary(policy: Policy): Promise<PolicySummary> {
  const { gatedPairsHitBy, gatedReason } = await import('../policy/grants.ts');
  const reasons: Record<string, string> = {};
  const gatedTemplates = policy.templates.flatMap((t) => {
    const hits = gatedPairsHitBy(t.rules ?? [], policy.gated);
    if (hits.length === 0) return [];
    for (const h of hits) reasons[pairText(h)] = gatedReason(h);
    const approval = t.approval ?? policy.defaultApproval;
    return [{ template: t.name, hits: hits.map(pairText), approvers: approval.approvers, required: approval.required }];
  });
  return {
    agents: policy.agents.length,
    people: policy.people.map((p) => ({ name: p.name, identities: p.identities.map(identityText) })),
    templates: policy.templates.length,
    gated: policy.gated.length,
    approverGroups: policy.approverGroups.length,
    gatedTemplates,
    clusterRoleTemplates: policy.templates.flatMap((t) => (t.clusterRole === undefined ? [] : [{ template: t.name, clusterRole: t.clusterRole }])),
    reasons,
  };
}

/** One line per reason under a gated template: `    create pods, create apps/deployments: can run a pod as any ServiceAccount of the namespace`. */
function reasonLines(hits: readonly string[], reasons: Readonly<Record<string, string>>, indent: string): string {
  const groups = new Map<string, string[]>();
  for (const h of hits) {
    const why = reasons[h] ?? '';
    groups.set(why, [...(groups.get(why) ?? []), h]);
  }
  return [...groups].map(([why, pairs]) => `${indent}${pairs.join(', ')}: ${why}\n`).join('');
}

async function check(file: string, opts: CheckOptions): Promise<void> {
  let policy: Policy;
  try {
    const { loadPolicy } = await import('../policy/parse.ts');
    policy = await loadPolicy(file);
  } catch (err) {
    // Issues go to stderr through main's error report (exit 1); with -o json, stdout also gets the result.
    if (err instanceof BrokerError && err.code === 'policy_invalid' && opts.output === 'json') printJson({ valid: false, issues: (err as BrokerError & { issues: PolicyIssue[] }).issues, summary: null } satisfies PolicyCheckResult);
    throw err;
  }
  const summary = await policySummary(policy);
  if (opts.output === 'json') {
    printJson({ valid: true, issues: [], summary } satisfies PolicyCheckResult);
    return;
  }
  const n = (count: number, noun: string, plural = `${noun}s`) => `${count} ${count === 1 ? noun : plural}`;
  process.stdout.write(
    `${file}: ${style.ok('valid')}: ${n(summary.agents, 'agent')}, ${n(summary.people.length, 'person', 'people')}, ${n(summary.templates, 'template')}, ` +
      `${n(summary.gated, 'gated pair')}, ${n(summary.approverGroups, 'approver group')}\n`,
  );
  for (const p of summary.people) process.stdout.write(`  person: ${p.name} (${p.identities.join('; ')})\n`);
  for (const g of summary.gatedTemplates) {
    process.stdout.write(`  gated: ${g.template} (${g.hits.join(', ')}): needs ${g.required} approval(s) from ${g.approvers.join(', ')}\n`);
    process.stdout.write(reasonLines(g.hits, summary.reasons, '    '));
  }
  for (const c of summary.clusterRoleTemplates) {
    process.stdout.write(`  clusterRole: ${c.template} binds ClusterRole ${c.clusterRole}: checked against the gated set by policy apply and at every task start, not here\n`);
  }
}

const PAST: Record<Exclude<Change['action'], 'unchanged'>, [done: string, would: string]> = {
  create: ['created', 'would create'],
  update: ['updated', 'would update'],
  delete: ['deleted', 'would delete'],
};

async function apply(file: string, opts: ApplyOptions): Promise<void> {
  const [{ loadPolicyFile }, { kubeApis, loadKubeConfig }, { applyPolicy }] = await Promise.all([
    import('../policy/parse.ts'),
    import('../kube/config.ts'),
    import('../policy/apply.ts'),
  ]);
  if (opts.output === 'yaml' && !opts.dryRun) {
    throw new BrokerError('usage', '-o yaml prints the objects for another tool to create (the Helm chart, kubectl apply) and writes nothing: add --dry-run', {
      field: '--output',
    });
  }
  // An administrator's kubeconfig, never an implicit one (~/.kube/config or in-cluster): --kubeconfig, else $KUBECONFIG, said which.
  if (opts.auditLog !== undefined && opts.auditStore !== undefined) {
    throw new BrokerError('usage', 'give one of --audit-log FILE and --audit-store postgres://...: the apply records in one place, the one the brokers record in', { field: '--audit-store' });
  }
  const fromEnv = opts.kubeconfig === undefined ? process.env['KUBECONFIG'] || undefined : undefined;
  const kubeconfig = opts.kubeconfig ?? fromEnv;
  if (kubeconfig === undefined) {
    throw new BrokerError('usage', "policy apply needs an administrator's kubeconfig: pass --kubeconfig PATH or set KUBECONFIG", { field: '--kubeconfig' });
  }
  if (fromEnv?.includes(delimiter)) {
    throw new BrokerError('usage', `KUBECONFIG lists several files (${fromEnv}): pass the administrator's one with --kubeconfig PATH`, { field: '--kubeconfig' });
  }
  const { policy, text } = await loadPolicyFile(file);
  process.stderr.write(style.dim(`policy apply: kubeconfig ${fromEnv === undefined ? `from --kubeconfig: ${kubeconfig}` : `from $KUBECONFIG: ${kubeconfig}`}\n`));
  const kube = kubeApis(loadKubeConfig(kubeconfig));
  // Opened first: an unwritable log or store stops the apply before anything changes.
  const audit = opts.dryRun ? undefined : opts.auditStore !== undefined ? await openApplyStore(opts.auditStore) : opts.auditLog ? await openApplyLog(opts.auditLog) : undefined;
  let changes: Change[];
  let gates: ClusterRoleGate[];
  let ended: AffectedTask[];
  try {
    // Each task ended for the apply is recorded as the broker records an end, before anything else changes.
    const onTaskEnded = async (t: AffectedTask): Promise<void> => {
      if (opts.output !== 'json') process.stdout.write(`ended ${(await import('../policy/apply.ts')).describeAffectedTask(t)}\n`);
      await audit?.append({
        type: 'task.ended',
        actor: 'user:policy-apply',
        agent: t.agent,
        task: t.id,
        taskName: t.name,
        template: t.template,
        namespace: t.namespace,
        outcome: 'ok',
        reason: t.cause === 'template-removed' ? 'template removed by policy apply' : 'namespace removed from the template by policy apply',
      });
    };
    ({ changes, clusterRoles: gates, endedTasks: ended } = await applyPolicy(kube, policy, { dryRun: opts.dryRun, endAffectedTasks: opts.endAffectedTasks, onTaskEnded }));
    if (audit) {
      const count = (a: Change['action']) => changes.filter((c) => c.action === a).length;
      const { createHash } = await import('node:crypto');
      const { userInfo } = await import('node:os');
      await audit.append({
        type: 'policy.applied',
        actor: `admin:${userInfo().username}`,
        outcome: 'ok',
        details: {
          policySha256: createHash('sha256').update(text).digest('hex'),
          cluster: kube.config.getCurrentCluster()?.server ?? '',
          created: count('create'),
          updated: count('update'),
          deleted: count('delete'),
          unchanged: count('unchanged'),
          endedTasks: ended.length,
        },
      });
    }
  } finally {
    await audit?.close();
  }
  const clusterRoles = gates.map((g) => {
    const approval = policy.templates.find((t) => t.name === g.template)?.approval ?? policy.defaultApproval;
    return { template: g.template, clusterRole: g.clusterRole, hits: g.hits.map(pairText), aggregated: g.aggregated, approvers: approval.approvers, required: approval.required };
  });
  const { gatedReason } = await import('../policy/grants.ts');
  const reasons: Record<string, string> = {};
  for (const g of gates) for (const h of g.hits) reasons[pairText(h)] = gatedReason(h);
  if (opts.output === 'yaml') {
    // stdout holds only the manifests; what the text output would also say goes to stderr.
    const [{ describeAffectedTask, desiredObjects }, { manifestsYaml }, { createHash }] = await Promise.all([
      import('../policy/apply.ts'),
      import('../policy/manifests.ts'),
      import('node:crypto'),
    ]);
    for (const t of ended) process.stderr.write(`would end ${describeAffectedTask(t)}\n`);
    for (const c of changes) {
      if (c.action === 'delete') process.stderr.write(`would delete ${c.kind} ${c.namespace ? `${c.namespace}/` : ''}${c.name} (left by an earlier apply; the manifests carry no deletions)\n`);
    }
    for (const c of clusterRoles) if (c.hits.length > 0) process.stderr.write(`gated: template ${c.template} binds ClusterRole ${c.clusterRole}, which grants gated access (${c.hits.join(', ')})\n`);
    process.stdout.write(manifestsYaml(desiredObjects(policy), createHash('sha256').update(text).digest('hex')));
    return;
  }
  if (opts.output === 'json') {
    const endedTasks = ended.map(({ id, agent, name, template, namespace, cause }) => ({ id, agent, name, template, namespace, cause }));
    printJson({ dryRun: opts.dryRun, changes, clusterRoles, reasons, endedTasks } satisfies PolicyApplyResult);
    return;
  }
  if (opts.dryRun) {
    const { describeAffectedTask } = await import('../policy/apply.ts');
    for (const t of ended) process.stdout.write(`would end ${describeAffectedTask(t)}\n`);
  }
  for (const c of clusterRoles) {
    const grows = c.aggregated ? ` (it aggregates other ClusterRoles, so it can grow: the broker checks it again at every task start)` : '';
    process.stdout.write(
      c.hits.length > 0
        ? `gated: template ${c.template} binds ClusterRole ${c.clusterRole}, which grants gated access (${c.hits.join(', ')}): starts need ${c.required} approval(s) from ${c.approvers.join(', ')}${grows}\n`
        : `checked: template ${c.template} binds ClusterRole ${c.clusterRole}, which grants no gated access${grows}\n`,
    );
    process.stdout.write(reasonLines(c.hits, reasons, '  '));
  }
  let unchanged = 0;
  for (const c of changes) {
    if (c.action === 'unchanged') {
      unchanged++;
      continue;
    }
    const verb = PAST[c.action][opts.dryRun ? 1 : 0];
    process.stdout.write(`${verb} ${c.kind} ${c.name}${c.namespace ? ` ${style.dim(`(namespace ${c.namespace})`)}` : ''}\n`);
  }
  const changed = changes.length - unchanged;
  const summary = [changed === 0 ? 'no changes' : `${changed} change${changed === 1 ? '' : 's'}`, `${unchanged} unchanged`].join(', ');
  process.stdout.write(`${summary}${opts.dryRun ? ' (dry run: nothing was written)' : ''}\n`);
  if (!opts.dryRun) process.stdout.write(`${RELOAD_NOTE}\n`);
}

/** What a running broker does about an apply (docs/operations.md): it reads the policy file itself. */
export const RELOAD_NOTE =
  "note: policy apply changes the cluster's RBAC only; running brokers reload the policy file themselves when it changes and on SIGHUP (each reload recorded in the broker's own audit log as policy.reloaded)";

/**
 * The PostgreSQL audit store `--audit-store` names: the one chain every replica appends to, so the
 * tasks an apply ends and the apply itself are in the trail `broker audit show` reads for all of
 * them. Any number of writers may append (src/audit/postgres.ts), so a running broker is no obstacle.
 */
async function openApplyStore(url: string): Promise<import('../audit/postgres.ts').PostgresAuditStore> {
  if (!isPostgresUrl(url)) {
    throw new BrokerError('invalid_argument', 'the audit store is a PostgreSQL URL, postgres://ROLE@HOST:PORT/DB (a file goes to --audit-log)', { field: '--audit-store' });
  }
  const { PostgresAuditStore } = await import('../audit/postgres.ts');
  return PostgresAuditStore.open(url);
}

/**
 * The audit log `--audit-log` names, locked for this apply (src/audit/lock.ts). A log a running broker
 * writes is refused: two writers would break its chain, and the broker records the policy changes it
 * picks up in that log itself.
 */
async function openApplyLog(path: string): Promise<import('../audit/log.ts').AuditLog> {
  const [{ AuditLog }, { AuditLockedError }] = await Promise.all([import('../audit/log.ts'), import('../audit/lock.ts')]);
  try {
    return await AuditLog.open(path, { lockCommand: 'broker policy apply' });
  } catch (err) {
    if (!(err instanceof AuditLockedError) || !err.holder?.command.includes('serve')) throw err;
    throw new BrokerError(
      'audit_unavailable',
      `${err.message}. A running broker writes this log and records there, as policy.reloaded, each policy change it picks up from its policy file: ` +
        'run policy apply without --audit-log (it changes the cluster\'s RBAC; the broker reloads the file on change or SIGHUP). ' +
        '--audit-log is for a log no broker writes',
      { field: '--audit-log', cause: err },
    );
  }
}
