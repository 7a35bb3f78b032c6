import { Command } from 'commander';
import { LocalCluster, kubectlPath, KUBERNETES_VERSION } from '../cluster/local-cluster.ts';
import { outputOption, printJson, style, type OutputFormat } from './output.ts';

interface UpOptions {
  dir?: string;
  output: OutputFormat;
}

interface DownOptions {
  dir: string;
  output: OutputFormat;
}

export function devClusterCommand(): Command {
  const cmd = new Command('dev-cluster').description(
    `a real local Kubernetes control plane (kube-apiserver ${KUBERNETES_VERSION} with RBAC, TokenRequest and audit) for trying task-broker`,
  );
  cmd
    .command('up')
    .description('start a local control plane in the background and print how to reach it')
    .option('--dir <dir>', 'directory for its state (must be missing or empty); default: a new temporary directory')
    .addOption(outputOption())
    .addHelpText('after', '\nExample:\n  eval "$(broker dev-cluster up)"\n  kubectl get namespaces\n  broker dev-cluster down --dir "$TASK_BROKER_CLUSTER_DIR"')
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
  const cluster = await LocalCluster.start({ ...(opts.dir === undefined ? {} : { dir: opts.dir }), detached: true });
  const info = { dir: cluster.dir, ...cluster.state, kubectl: kubectlPath() };
  if (opts.output === 'json') {
    printJson(info);
    return;
  }
  process.stdout.write(
    [
      `export KUBECONFIG=${shellQuote(info.kubeconfig)}`,
      `export TASK_BROKER_CLUSTER_DIR=${shellQuote(info.dir)}`,
      `# ${style.ok('ready')}: kube-apiserver ${info.version} at ${info.server} (pid ${info.pid})`,
      `# kubectl: ${info.kubectl}`,
      `# stop it with: broker dev-cluster down --dir ${shellQuote(info.dir)}`,
      '',
    ].join('\n'),
  );
}

async function down(opts: DownOptions): Promise<void> {
  const state = await LocalCluster.stopDir(opts.dir);
  if (opts.output === 'json') printJson({ stopped: true, dir: opts.dir, pid: state.pid });
  else process.stdout.write(`stopped kube-apiserver (pid ${state.pid}) and removed ${opts.dir}\n`);
}

function shellQuote(s: string): string {
  return /^[\w@%+=:,./-]+$/.test(s) ? s : `'${s.replaceAll("'", `'\\''`)}'`;
}
