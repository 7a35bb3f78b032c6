import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { Command, InvalidArgumentError } from 'commander';
import { LocalCluster, kubectlPath, KUBERNETES_VERSION } from '../cluster/local-cluster.ts';
import { KUBE_AUDIT_PATH } from '../server/kube-audit.ts';
import { outputOption, printJson, style, type OutputFormat } from './output.ts';

interface UpOptions {
  dir?: string;
  apiServerOnly?: boolean;
  auditWebhook?: string;
  auditWebhookCa?: string;
  output: OutputFormat;
}

interface DownOptions {
  dir: string;
  output: OutputFormat;
}

export function devClusterCommand(): Command {
  const cmd = new Command('dev-cluster').description(
    `a real local Kubernetes cluster (kube-apiserver ${KUBERNETES_VERSION} with RBAC, TokenRequest and audit, controller-manager, scheduler, and a node whose containers are local processes) for trying task-broker`,
  );
  cmd
    .command('up')
    .description('start a local cluster in the background and print how to reach it')
    .option('--dir <dir>', 'directory for its state (must be missing or empty); default: a new temporary directory')
    .option('--api-server-only', 'start the API server alone (with its etcd): no controller-manager, scheduler or node; starts faster')
    .option(
      '--audit-webhook <url>',
      "post the API server's audit events to URL (https; a broker's /v1/audit/kubernetes, added when URL has no path) with a fresh bearer token, kept in the state directory (broker serve --audit-webhook-token-file)",
      webhookUrl,
    )
    .option('--audit-webhook-ca <file>', "CA (PEM) of the broker's serving certificate; default: the local API server's own certificate, which a broker on this machine can serve with (printed)")
    .addOption(outputOption())
    .addHelpText(
      'after',
      '\nExample:\n  eval "$(broker dev-cluster up)"\n  kubectl create deployment web --image=busybox --replicas=2 -- sh -c \'while true; do date; sleep 5; done\'\n  kubectl logs -f deploy/web\n  broker dev-cluster down --dir "$TASK_BROKER_CLUSTER_DIR"\n\n' +
        '  # the API server alone (no controller-manager, scheduler or node), faster to start:\n  eval "$(broker dev-cluster up --api-server-only)"\n\n' +
        '  # the API server records every request through a broker on port 8443:\n' +
        '  eval "$(broker dev-cluster up --audit-webhook https://127.0.0.1:8443/v1/audit/kubernetes)"\n' +
        '  broker serve --listen 127.0.0.1:8443 --tls-cert "$BROKER_WEBHOOK_TLS_CERT" --tls-key "$BROKER_WEBHOOK_TLS_KEY" \\\n' +
        '    --audit-webhook-token-file "$BROKER_AUDIT_WEBHOOK_TOKEN_FILE" ...',
    )
    .action((opts: UpOptions) => up(opts));
  cmd
    .command('down')
    .description('stop the local control plane kept in DIR and remove DIR')
    .requiredOption('--dir <dir>', 'the directory given to (or printed by) dev-cluster up')
    .addOption(outputOption())
    .addHelpText('after', '\nExample:\n  broker dev-cluster down --dir /tmp/task-broker-cluster-Ab12Cd')
    .action((opts: DownOptions) => down(opts));
  return cmd;
}

async function up(opts: UpOptions): Promise<void> {
  // A fresh token per cluster: the broker takes the webhook only from posts bearing it.
  const auditWebhook =
    opts.auditWebhook === undefined
      ? undefined
      : {
          url: opts.auditWebhook,
          token: randomBytes(32).toString('base64url'),
          ...(opts.auditWebhookCa === undefined ? {} : { caFile: resolve(opts.auditWebhookCa) }),
        };
  const cluster = await LocalCluster.start({
    ...(opts.dir === undefined ? {} : { dir: opts.dir }),
    ...(auditWebhook ? { auditWebhook } : {}),
    full: opts.apiServerOnly !== true,
    detached: true,
  });
  // Without --audit-webhook-ca the webhook trusts the API server's own loopback certificate: the broker serves with it.
  const tls = auditWebhook && opts.auditWebhookCa === undefined ? { auditWebhookTlsCert: cluster.servingCert.cert, auditWebhookTlsKey: cluster.servingCert.key } : {};
  // The broker's own kubeconfig, but for its credential: a token of its ServiceAccount, which exists
  // only once `policy apply` has made it (`kubectl config set-credentials broker --token ...`).
  const brokerKubeconfig = join(cluster.dir, 'broker.kubeconfig');
  writeFileSync(brokerKubeconfig, credentiallessKubeconfig(cluster.server, cluster.caFile), { mode: 0o600 });
  const info = { dir: cluster.dir, ...cluster.state, brokerKubeconfig, ...tls, kubectl: kubectlPath() };
  if (opts.output === 'json') {
    printJson(info);
    return;
  }
  process.stdout.write(
    [
      `export KUBECONFIG=${shellQuote(info.kubeconfig)}`,
      `export TASK_BROKER_CLUSTER_DIR=${shellQuote(info.dir)}`,
      `export BROKER_KUBECONFIG=${shellQuote(info.brokerKubeconfig)}`,
      ...(auditWebhook === undefined || info.auditWebhookTokenFile === undefined
        ? []
        : [
            `export BROKER_AUDIT_WEBHOOK_TOKEN_FILE=${shellQuote(info.auditWebhookTokenFile)}`,
            ...(tls.auditWebhookTlsCert === undefined
              ? []
              : [`export BROKER_WEBHOOK_TLS_CERT=${shellQuote(tls.auditWebhookTlsCert)}`, `export BROKER_WEBHOOK_TLS_KEY=${shellQuote(tls.auditWebhookTlsKey)}`]),
            `# audit webhook: ${auditWebhook.url}; serve it with broker serve --audit-webhook-token-file "$BROKER_AUDIT_WEBHOOK_TOKEN_FILE"` +
              (tls.auditWebhookTlsCert === undefined ? '' : ' --tls-cert "$BROKER_WEBHOOK_TLS_CERT" --tls-key "$BROKER_WEBHOOK_TLS_KEY"'),
          ]),
      `# ${style.ok('ready')}: kube-apiserver ${info.version} at ${info.server} (pid ${info.pid})`,
      ...cluster.components.slice(1).map((c) => `#   ${c.name} (pid ${c.pid})` + (c.name === 'local-node' ? ': node local-node, its containers run as local processes' : '')),
      `# kubectl: ${info.kubectl}`,
      '# the broker\'s kubeconfig, $BROKER_KUBECONFIG, has no credential yet: once policy apply has made its ServiceAccount,',
      '#   kubectl config set-credentials broker --kubeconfig "$BROKER_KUBECONFIG" --token "$(kubectl create token task-broker -n task-broker-system)"',
      `# stop it with: broker dev-cluster down --dir ${shellQuote(info.dir)}`,
      '',
    ].join('\n'),
  );
}

async function down(opts: DownOptions): Promise<void> {
  const state = await LocalCluster.stopDir(opts.dir);
  const components = state.components ?? [{ name: 'kube-apiserver', pid: state.pid }];
  if (opts.output === 'json') printJson({ stopped: true, dir: opts.dir, pid: state.pid, components });
  else process.stdout.write(`stopped ${components.map((c) => `${c.name} (pid ${c.pid})`).join(', ')} and removed ${opts.dir}\n`);
}

/** A kubeconfig for the local API server whose user, `broker`, has no credential yet. */
function credentiallessKubeconfig(server: string, caFile: string): string {
  return JSON.stringify(
    {
      apiVersion: 'v1',
      kind: 'Config',
      clusters: [{ name: 'local', cluster: { server, 'certificate-authority': caFile } }],
      users: [{ name: 'broker', user: {} }],
      contexts: [{ name: 'broker', context: { cluster: 'local', user: 'broker' } }],
      'current-context': 'broker',
    },
    null,
    2,
  ) + '\n';
}

function webhookUrl(value: string): string {
  let url: URL;
  try {
    url = new URL(value);
  } catch {
    throw new InvalidArgumentError(`${JSON.stringify(value)} is not a URL`);
  }
  // client-go sends the bearer token to https servers only: over plain http every post would be refused.
  if (url.protocol !== 'https:') throw new InvalidArgumentError('the audit webhook URL must be https:// (the API server sends no credentials over plain http)');
  if (url.pathname === '/') url.pathname = KUBE_AUDIT_PATH;
  return url.toString();
}

function shellQuote(s: string): string {
  return /^[\w@%+=:,./-]+$/.test(s) ? s : `'${s.replaceAll("'", `'\\''`)}'`;
}
