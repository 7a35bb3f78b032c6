/**
 * Kubeconfigs whose user is the `broker credential` exec entry. They hold no secret: kubectl asks the
 * broker for the task's token on every run.
 */
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { stringify } from 'yaml';

export type ExecApiVersion = 'v1' | 'v1beta1';
/** Which build of the plugin the exec entry runs: native (Go, ~2 ms to start) or Node (~25 ms). */
export type PluginKind = 'native' | 'node';

export interface ExecKubeconfigOptions {
  task: string;
  /** The API server. */
  server: string;
  /** Its CA, base64 PEM (as in certificate-authority-data). */
  certificateAuthorityData?: string | undefined;
  namespace?: string | undefined;
  broker?: string | undefined;
  brokerCa?: string | undefined;
  /**
   * The plugin command, run as `COMMAND credential --task ...` (e.g. `broker` found on PATH). By
   * default the exec entry names this installation's plugin by absolute path (`plugin`): kubectl runs
   * it on every call, and skipping the sh launcher saves about a millisecond each time.
   */
  command?: string | undefined;
  /** Default: native when install.sh built it, else node. */
  plugin?: PluginKind | undefined;
  apiVersion?: ExecApiVersion;
  /** interactiveMode IfAvailable instead of Never. */
  interactive?: boolean;
  /** `proxy`: `server` is the broker's proxy and the plugin asks for session tokens (`--via proxy`). */
  via?: 'direct' | 'proxy' | undefined;
}

/** The plugin's compiled Node entry in this installation. */
export function pluginEntryPath(): string {
  return fileURLToPath(new URL('../../dist/credential/main.cjs', import.meta.url));
}

/** The native plugin that install.sh builds when Go is installed. */
export function nativePluginPath(): string {
  return fileURLToPath(new URL('../../.cache/bin/broker-credential', import.meta.url));
}

export function defaultPlugin(): PluginKind {
  return existsSync(nativePluginPath()) ? 'native' : 'node';
}

export function execKubeconfig(o: ExecKubeconfigOptions): string {
  const name = `task-broker-${o.task}`;
  const args = ['--task', o.task];
  if (o.broker) args.push('--broker', o.broker);
  if (o.brokerCa) args.push('--broker-ca', o.brokerCa);
  if (o.via === 'proxy') args.push('--via', 'proxy');
  const exec: Record<string, unknown> = {
    apiVersion: `client.authentication.k8s.io/${o.apiVersion ?? 'v1'}`,
    ...(o.command
      ? { command: o.command, args: ['credential', ...args] }
      : (o.plugin ?? defaultPlugin()) === 'native'
        ? { command: nativePluginPath(), args }
        : { command: process.execPath, args: [pluginEntryPath(), ...args] }),
    interactiveMode: o.interactive ? 'IfAvailable' : 'Never',
    provideClusterInfo: false,
  };
  const cluster: Record<string, string> = { server: o.server };
  if (o.certificateAuthorityData) cluster['certificate-authority-data'] = o.certificateAuthorityData;
  const context: Record<string, string> = { cluster: name, user: name };
  if (o.namespace) context['namespace'] = o.namespace;
  return stringify({
    apiVersion: 'v1',
    kind: 'Config',
    clusters: [{ name, cluster }],
    users: [{ name, user: { exec } }],
    contexts: [{ name, context }],
    'current-context': name,
  });
}
