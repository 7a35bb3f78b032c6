/**
 * kubectl through the exec plugin, either build, with the environment given (the identity source):
 * a kubeconfig whose user runs the plugin entry (what `broker credential` runs) with `--task NAME
 * --broker URL`, holding no secret.
 */
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { kubectlPath, type LocalCluster } from '../../src/cluster/local-cluster.ts';
import { run, writeKubeconfig, type RunResult } from './kube.ts';

export const PLUGIN_BUILDS = {
  node: { command: process.execPath, args: [new URL('../../src/credential/main.cts', import.meta.url).pathname] },
  native: { command: new URL('../../.cache/bin/broker-credential', import.meta.url).pathname, args: [] as string[] },
} as const;
export type PluginBuild = keyof typeof PLUGIN_BUILDS;

/** The builds present here: the native one only when install.sh built it (Go installed). */
export function pluginBuilds(): PluginBuild[] {
  return existsSync(PLUGIN_BUILDS.native.command) ? ['node', 'native'] : ['node'];
}

export function writePluginKubeconfig(dir: string, cluster: LocalCluster, brokerUrl: string, task: string, build: PluginBuild): string {
  const path = join(dir, `plugin-${build}-${task}.kubeconfig`);
  const { command, args } = PLUGIN_BUILDS[build];
  return writeKubeconfig(path, cluster, { exec: { apiVersion: 'client.authentication.k8s.io/v1', command, args: [...args, '--task', task, '--broker', brokerUrl], interactiveMode: 'Never' } });
}

/**
 * kubectl with exactly `env` (plus PATH): the plugin it runs sees only that identity. HOME, unless
 * `env` sets one, is the kubeconfig's directory (a test's temporary one), so kubectl's discovery
 * cache does not land in the working directory.
 */
export function kubectlWith(kubeconfig: string, env: NodeJS.ProcessEnv, ...args: string[]): Promise<RunResult> {
  return run(kubectlPath(), ['--kubeconfig', kubeconfig, ...args], { PATH: process.env['PATH'] ?? '/usr/bin:/bin', HOME: dirname(kubeconfig), ...env });
}
