/** Small helpers for tests that talk to a LocalCluster as its administrator. */
import { spawn } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import * as k8s from '@kubernetes/client-node';
import { kubectlPath, type LocalCluster } from '../../src/cluster/local-cluster.ts';

export function adminConfig(cluster: LocalCluster): k8s.KubeConfig {
  const kc = new k8s.KubeConfig();
  kc.loadFromFile(cluster.kubeconfig);
  return kc;
}

/** A kubeconfig (JSON) for the cluster whose one user is `user` (a token, an exec entry), written to `path` (0600). */
export function writeKubeconfig(path: string, cluster: LocalCluster, user: object): string {
  writeFileSync(
    path,
    JSON.stringify({
      apiVersion: 'v1',
      kind: 'Config',
      clusters: [{ name: 'local', cluster: { server: cluster.server, 'certificate-authority': cluster.caFile } }],
      users: [{ name: 'u', user }],
      contexts: [{ name: 'local', context: { cluster: 'local', user: 'u' } }],
      'current-context': 'local',
    }),
    { mode: 0o600 },
  );
  return path;
}

/** A kubeconfig (JSON) for the cluster with a bearer token user, written to `path`. */
export function writeTokenKubeconfig(path: string, cluster: LocalCluster, token: string): string {
  return writeKubeconfig(path, cluster, { token });
}

export interface RunResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/**
 * Runs a command to completion, capturing its output; never throws for a non-zero exit. With `input`,
 * that is its standard input (then closed), e.g. for `kubectl exec -i`; without, stdin is /dev/null.
 */
export function run(cmd: string, args: string[], env: NodeJS.ProcessEnv = process.env, timeoutMs = 60_000, input?: string): Promise<RunResult> {
  return new Promise((done, fail) => {
    const child = spawn(cmd, args, { env, stdio: [input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout!.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('error', fail);
    child.on('close', (code) => {
      clearTimeout(timer);
      done({ code, stdout, stderr });
    });
    // A command that exits without reading all of it closes the pipe: EPIPE is its business, not ours.
    child.stdin?.on('error', () => {});
    child.stdin?.end(input);
  });
}

export function kubectl(kubeconfig: string, ...args: string[]): Promise<RunResult> {
  return run(kubectlPath(), ['--kubeconfig', kubeconfig, ...args], { PATH: process.env['PATH'] ?? '/usr/bin:/bin', HOME: process.env['HOME'] ?? '/tmp' });
}

/** Parses the audit log (JSON Lines) of the API server. */
export interface KubeAuditEvent {
  auditID: string;
  stage: string;
  verb: string;
  requestURI: string;
  user: { username: string; uid?: string; groups?: string[]; extra?: Record<string, string[]> };
  objectRef?: { resource?: string; namespace?: string; name?: string; subresource?: string };
  responseStatus?: { code?: number };
  annotations?: Record<string, string>;
}
