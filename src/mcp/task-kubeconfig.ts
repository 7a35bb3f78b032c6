/**
 * The kubeconfig `start_task` hands the agent: DIR/NAME.kubeconfig, whose user is the `broker
 * credential` exec entry for task NAME (src/client/kubeconfig.ts). It holds no secret; but kubectl
 * runs the command it names, so the directory must be the user's alone: created 0700, refused when
 * it is a symlink, someone else's, or writable by group or others. Each file is 0600 and replaced
 * atomically (a Kubernetes MCP server watching it never reads half a file).
 */
import { lstatSync, mkdirSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { BrokerError } from '../errors.ts';

// A task name as the broker takes it (DNS-1123 label): safe as a file name.
const NAME = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/;

/** `--kubeconfig-dir`, else ~/.kube/task-broker: the same path every session, so a Kubernetes MCP server can be pointed at it beforehand. */
export function defaultKubeconfigDir(env: NodeJS.ProcessEnv = process.env): string {
  return join(env['HOME'] || homedir(), '.kube', 'task-broker');
}

export function kubeconfigPath(dir: string, taskName: string): string {
  if (!NAME.test(taskName) || taskName.length > 63) {
    throw new BrokerError('internal', 'the broker answered a task name that is no DNS-1123 label; no kubeconfig was written');
  }
  return join(dir, `${taskName}.kubeconfig`);
}

/** Makes `dir` (0700) when missing, and checks it is a directory of this user that nobody else may write. */
export function ensureDir(dir: string): void {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const st = lstatSync(dir);
  const problem = !st.isDirectory()
    ? 'is not a directory (a symlink?)'
    : typeof process.getuid === 'function' && st.uid !== process.getuid()
      ? 'belongs to another user'
      : (st.mode & 0o022) !== 0
        ? `is writable by group or others (mode ${(st.mode & 0o777).toString(8)}): chmod 700 it`
        : undefined;
  if (problem) {
    throw new BrokerError('invalid_argument', `the kubeconfig directory ${dir} ${problem}; kubectl runs the command a kubeconfig names, so only you may write there`, {
      field: '--kubeconfig-dir',
    });
  }
}

/** Writes `text` to DIR/NAME.kubeconfig (0600, atomically) and returns the path. */
export function writeTaskKubeconfig(dir: string, taskName: string, text: string): string {
  const path = kubeconfigPath(dir, taskName);
  ensureDir(dir);
  const tmp = `${path}.${process.pid}.tmp`;
  rmSync(tmp, { force: true });
  writeFileSync(tmp, text, { mode: 0o600, flag: 'wx' });
  renameSync(tmp, path);
  return path;
}
