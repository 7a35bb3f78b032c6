import { readFileSync, writeFileSync } from 'node:fs';
import { Command, Option } from 'commander';
import { BrokerError } from '../errors.ts';
import type { ClusterInfo } from '../client/broker-client.ts';
import type { ExecApiVersion, PluginKind } from '../client/kubeconfig.ts';
import { withClient, type BrokerFlags } from './broker-options.ts';

interface Flags {
  task: string;
  server?: string;
  certificateAuthority?: string;
  namespace?: string;
  output?: string;
  interactive?: boolean;
  execApiVersion: ExecApiVersion;
  command?: string;
  plugin: 'auto' | PluginKind;
  via?: 'direct' | 'proxy';
}

export function kubeconfigCommand(): Command {
  return new Command('kubeconfig')
    .description("write a kubeconfig whose user is the `broker credential` exec entry for a task (it holds no secret)")
    .requiredOption('--task <name>', 'the task kubectl should act as')
    .option('--server <url>', 'API server URL (default: what the broker publishes at /v1/cluster)')
    .option('--certificate-authority <file>', 'CA of the API server, PEM (default: the broker\'s)')
    .option('-n, --namespace <ns>', 'default namespace of the context')
    .option('--output <file>', 'write it to FILE (mode 0600) instead of stdout')
    .option('--interactive', 'interactiveMode IfAvailable instead of Never')
    .addOption(new Option('--exec-api-version <v>', 'client.authentication.k8s.io version').choices(['v1', 'v1beta1']).default('v1'))
    .addOption(
      new Option('--plugin <kind>', 'which plugin build the exec entry runs: native (Go, starts in ~2 ms; built by install.sh), node, or auto')
        .choices(['auto', 'native', 'node'])
        .default('auto'),
    )
    .addOption(
      new Option('--via <mode>', 'proxy: kubectl talks to the broker\'s Kubernetes API proxy with session tokens (the task token stays in the broker); direct: to the API server with the task token (default: proxy when the broker has one)').choices([
        'proxy',
        'direct',
      ]),
    )
    .option('--command <cmd>', 'run `CMD credential ...` instead (e.g. a `broker` found on PATH)')
    .addHelpText('after', '\nExample:\n  broker kubeconfig --task read-pods --output ~/.kube/task-broker\n  KUBECONFIG=~/.kube/task-broker kubectl get pods')
    .action(async (flags: Flags, cmd: Command) => {
      const globals = cmd.optsWithGlobals<BrokerFlags>();
      const { server, caData, via } = await kubeconfigTarget(flags, () => withClient(cmd, (client) => client.cluster()), globals.brokerCa ?? process.env['BROKER_CA']);
      const { execKubeconfig, defaultPlugin } = await import('../client/kubeconfig.ts');
      if (flags.plugin === 'native' && defaultPlugin() !== 'native') {
        throw new BrokerError('invalid_argument', 'the native plugin is not built: run ./install.sh with Go installed, or use --plugin node', { field: '--plugin' });
      }
      const text = execKubeconfig({
        plugin: flags.plugin === 'auto' ? undefined : flags.plugin,
        task: flags.task,
        server,
        certificateAuthorityData: caData,
        namespace: flags.namespace,
        broker: globals.broker ?? process.env['BROKER_URL'],
        brokerCa: globals.brokerCa ?? process.env['BROKER_CA'],
        command: flags.command,
        apiVersion: flags.execApiVersion,
        interactive: flags.interactive ?? false,
        via,
      });
      if (flags.output) writeFileSync(flags.output, text, { mode: 0o600 });
      else process.stdout.write(text);
    });
}

/**
 * Where a task kubeconfig points kubectl, and how its exec entry asks for credentials: `--server` as
 * given (direct); else what the broker publishes at `GET /v1/cluster`, through its Kubernetes API proxy
 * when it has one (or `via` says so: the CA that verifies the broker verifies the proxy, which serves
 * with the broker's certificate), straight to the API server otherwise. Shared by `broker kubeconfig`
 * and `broker run`.
 */
export async function kubeconfigTarget(
  flags: { server?: string | undefined; certificateAuthority?: string | undefined; via?: 'direct' | 'proxy' | undefined },
  cluster: () => Promise<ClusterInfo>,
  brokerCa: string | undefined,
): Promise<{ server: string; caData: string | undefined; via: 'direct' | 'proxy' }> {
  let caData = flags.certificateAuthority ? readCa(flags.certificateAuthority) : undefined;
  if (flags.server) return { server: flags.server, caData, via: flags.via ?? 'direct' };
  const info = await cluster();
  const via = flags.via ?? (info.proxy ? 'proxy' : 'direct');
  if (via === 'direct') return { server: info.server, caData: caData ?? info.certificateAuthorityData, via };
  if (!info.proxy) throw new BrokerError('invalid_argument', 'the broker has no Kubernetes API proxy (`broker serve --proxy-listen`): use --via direct', { field: '--via' });
  caData ??= brokerCa ? readCa(brokerCa, '--broker-ca') : undefined;
  return { server: info.proxy.server, caData, via };
}

export function readCa(path: string, field = '--certificate-authority'): string {
  try {
    return readFileSync(path).toString('base64');
  } catch (err) {
    throw new BrokerError('invalid_argument', `cannot read ${path}: ${(err as NodeJS.ErrnoException).code}`, { field });
  }
}
