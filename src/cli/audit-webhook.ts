/**
 * `broker audit webhook-config`: what a cluster administrator gives the API server so that it posts
 * its audit events to the broker (docs/recording.md): the webhook kubeconfig (the broker's URL, its
 * CA, and the bearer token `broker serve --audit-webhook-token-file` checks) and a recommended audit
 * policy (Metadata for task ServiceAccounts, None for everything else).
 */
import { randomBytes } from 'node:crypto';
import { chmodSync, existsSync, readFileSync, writeFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { Command, InvalidArgumentError } from 'commander';
import { BrokerError } from '../errors.ts';
import { KUBE_AUDIT_PATH, readWebhookToken } from '../server/kube-audit.ts';

interface WebhookConfigOptions {
  brokerUrl: string;
  ca?: string;
  tokenFile?: string;
  output: string;
  auditPolicy?: string;
  config?: string;
  taskNamespace?: string;
}

export function webhookConfigCommand(): Command {
  return new Command('webhook-config')
    .description("write the API server's audit webhook kubeconfig for this broker, and a recommended audit policy (docs/recording.md)")
    .requiredOption('--broker-url <url>', `the broker as the API server reaches it (${KUBE_AUDIT_PATH} is added unless the URL has a path)`, brokerUrl)
    .requiredOption('-o, --output <file>', 'where to write the webhook kubeconfig (mode 0600: it holds the token); for --audit-webhook-config-file')
    .option('--ca <file>', "CA (PEM) of the broker's serving certificate, embedded in the kubeconfig")
    .option('--token-file <file>', 'the token broker serve --audit-webhook-token-file reads: used if it exists, else created (mode 0600) with a fresh one; default: OUTPUT.token')
    .option('--audit-policy <file>', 'also write the recommended audit policy there (for --audit-policy-file); default: print it on stdout')
    .option('--config <file>', "the broker's policy file, for broker.taskNamespace")
    .option('--task-namespace <ns>', 'the task namespace (broker.taskNamespace), instead of --config')
    .addHelpText(
      'after',
      [
        '',
        'Example:',
        '  broker audit webhook-config --broker-url https://broker.example:8443 --ca broker-ca.crt \\',
        '    --config policy.yaml -o audit-webhook.kubeconfig --audit-policy audit-policy.yaml',
        '  # on the API server: --audit-webhook-config-file=audit-webhook.kubeconfig --audit-policy-file=audit-policy.yaml',
        '  #                    --audit-webhook-mode=batch --audit-webhook-truncate-enabled=true',
        '  # on the broker:     broker serve ... --audit-webhook-token-file audit-webhook.kubeconfig.token',
      ].join('\n'),
    )
    .action((opts: WebhookConfigOptions) => webhookConfig(opts));
}

async function webhookConfig(opts: WebhookConfigOptions): Promise<void> {
  const taskNamespace = await taskNamespaceOf(opts);
  const url = new URL(opts.brokerUrl);
  if (url.pathname === '/' || url.pathname === '') url.pathname = KUBE_AUDIT_PATH;
  const output = resolve(opts.output);
  const tokenFile = resolve(opts.tokenFile ?? `${output}.token`);
  let created = false;
  if (!existsSync(tokenFile)) {
    writeFileSync(tokenFile, `${randomBytes(32).toString('base64url')}\n`, { mode: 0o600, flag: 'wx' });
    created = true;
  }
  const token = readWebhookToken(tokenFile, '--token-file');
  let caData: string | undefined;
  if (opts.ca !== undefined) {
    try {
      caData = readFileSync(opts.ca).toString('base64');
    } catch (err) {
      throw new BrokerError('invalid_argument', `cannot read ${opts.ca}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`, { field: '--ca', cause: err });
    }
  } else if (url.protocol === 'https:') {
    process.stderr.write("note: no --ca: the API server will check the broker's certificate against its system roots\n");
  }
  writeSecret(output, webhookKubeconfig(url.toString(), token, caData));
  const policy = recommendedAuditPolicy(taskNamespace);
  const notes = [
    `wrote ${output} (the webhook kubeconfig, mode 0600)`,
    `${created ? 'created' : 'used'} ${tokenFile} (the bearer token; broker serve --audit-webhook-token-file ${tokenFile})`,
    ...(opts.auditPolicy === undefined ? [] : [`wrote ${resolve(opts.auditPolicy)} (the audit policy)`]),
    'API server flags:',
    `  --audit-webhook-config-file=${output}`,
    `  --audit-policy-file=${opts.auditPolicy === undefined ? 'AUDIT-POLICY.yaml' : resolve(opts.auditPolicy)}`,
    '  --audit-webhook-mode=batch --audit-webhook-batch-max-wait=5s --audit-webhook-truncate-enabled=true',
  ];
  if (opts.auditPolicy === undefined) {
    // The policy alone on stdout (redirect it to a file); what was done on stderr.
    process.stdout.write(policy);
    process.stderr.write(notes.map((l) => `# ${l}\n`).join(''));
  } else {
    writeFileSync(opts.auditPolicy, policy);
    process.stdout.write(notes.join('\n') + '\n');
  }
}

async function taskNamespaceOf(opts: WebhookConfigOptions): Promise<string> {
  if (opts.taskNamespace !== undefined && opts.config !== undefined) {
    throw new BrokerError('invalid_argument', '--config and --task-namespace exclude each other', { field: '--task-namespace' });
  }
  if (opts.taskNamespace !== undefined) {
    if (!/^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$/.test(opts.taskNamespace)) throw new BrokerError('invalid_argument', '--task-namespace must be a DNS-1123 label', { field: '--task-namespace' });
    return opts.taskNamespace;
  }
  if (opts.config === undefined) throw new BrokerError('invalid_argument', 'give --config POLICY (for broker.taskNamespace) or --task-namespace NS', { field: '--config' });
  const { loadPolicyFile } = await import('../policy/parse.ts');
  return (await loadPolicyFile(opts.config)).policy.broker.taskNamespace;
}

/** The kubeconfig the API server's webhook client reads (--audit-webhook-config-file). */
export function webhookKubeconfig(server: string, token: string, caData?: string): string {
  return (
    JSON.stringify(
      {
        apiVersion: 'v1',
        kind: 'Config',
        clusters: [{ name: 'task-broker', cluster: { server, ...(caData === undefined ? {} : { 'certificate-authority-data': caData }) } }],
        users: [{ name: 'kube-apiserver', user: { token } }],
        contexts: [{ name: 'task-broker', context: { cluster: 'task-broker', user: 'kube-apiserver' } }],
        'current-context': 'task-broker',
      },
      null,
      2,
    ) + '\n'
  );
}

/**
 * Metadata for the task ServiceAccounts (every ServiceAccount of the task namespace is in the group
 * `system:serviceaccounts:<ns>`; audit policy `users` takes no wildcards), None for everything else.
 * Metadata holds who, what, where and the authorization decision, which is all a record needs; bodies
 * (Request, RequestResponse) would cost the API server and the broker far more and may hold secrets.
 */
export function recommendedAuditPolicy(taskNamespace: string): string {
  return [
    '# Audit policy recommended by task-broker (broker audit webhook-config): every request made with a',
    "# task ServiceAccount's token at Metadata level (who, what, where, the authorization decision; no",
    '# request or response bodies: the record does not need them and they may hold secrets), nothing else.',
    '# The API server has ONE policy for all its audit backends: if it already writes an audit log, merge',
    '# the first rule into that policy instead (the broker ignores the events of other users).',
    'apiVersion: audit.k8s.io/v1',
    'kind: Policy',
    '# The broker records ResponseComplete and Panic only: the earlier stages of a request add nothing.',
    'omitStages: ["RequestReceived", "ResponseStarted"]',
    'rules:',
    '  - level: Metadata',
    `    userGroups: ["system:serviceaccounts:${taskNamespace}"]`,
    '  - level: None',
    '',
  ].join('\n');
}

function writeSecret(path: string, text: string): void {
  if (existsSync(path)) chmodSync(path, 0o600); // an existing file would keep its mode: narrowed before the token goes in
  writeFileSync(path, text, { mode: 0o600 });
}

function brokerUrl(value: string): string {
  let url: URL;
  try {
    url = new URL(value);
  } catch {
    throw new InvalidArgumentError(`${JSON.stringify(value)} is not a URL`);
  }
  // client-go sends credentials to https servers only: over plain http the broker would refuse every post.
  if (url.protocol !== 'https:') throw new InvalidArgumentError('must be an https:// URL (the API server sends no credentials over plain http)');
  return value;
}
