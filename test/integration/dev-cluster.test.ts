/**
 * `broker dev-cluster up/down`, as a user runs it: a background cluster that kubectl reaches. The
 * whole cluster by default; the tests that need only the API server ask for it alone (faster).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { alive, KUBERNETES_VERSION, LocalCluster, readProcessGroups, type ClusterComponent } from '../../src/cluster/local-cluster.ts';
import { kubectl, run } from '../helpers/kube.ts';

const broker = new URL('../../bin/broker', import.meta.url).pathname;

test('dev-cluster up --api-server-only starts a v1.36 server that kubectl reaches; down stops it and removes its dir', async (t) => {
  const parent = mkdtempSync(join(tmpdir(), 'tb-devcluster-'));
  const dir = join(parent, 'cluster');
  let pid = 0;
  t.after(async () => {
    if (pid && alive(pid)) process.kill(pid, 'SIGKILL');
    rmSync(parent, { recursive: true, force: true });
  });

  const up = await run(broker, ['dev-cluster', 'up', '--api-server-only', '--dir', dir, '-o', 'json']);
  assert.equal(up.code, 0, up.stderr);
  const info = JSON.parse(up.stdout) as { dir: string; server: string; kubeconfig: string; pid: number; version: string; mode: string; components: ClusterComponent[] };
  pid = info.pid;
  assert.equal(info.dir, dir);
  assert.match(info.server, /^https:\/\/127\.0\.0\.1:\d+$/);
  assert.equal(info.version, KUBERNETES_VERSION);
  assert.ok(alive(pid), 'the server runs in the background after `up` returned');
  assert.equal(info.mode, 'api-server-only');
  assert.deepEqual(info.components.map((c) => [c.name, c.pid]), [['kube-apiserver', pid]]);

  const version = await kubectl(info.kubeconfig, 'version', '-o', 'json');
  assert.equal(version.code, 0, version.stderr);
  assert.equal((JSON.parse(version.stdout) as { serverVersion: { gitVersion: string } }).serverVersion.gitVersion, KUBERNETES_VERSION);
  const ns = await kubectl(info.kubeconfig, 'get', 'namespaces', '-o', 'name');
  assert.equal(ns.code, 0, ns.stderr);
  assert.match(ns.stdout, /namespace\/kube-system/);

  // A second `up` into the same directory is refused and changes nothing.
  const again = await run(broker, ['dev-cluster', 'up', '--dir', dir]);
  assert.equal(again.code, 1);
  assert.match(again.stderr, /is not empty \(--dir\) \[cluster_dir_not_empty\]/);
  assert.ok(alive(pid));

  const down = await run(broker, ['dev-cluster', 'down', '--dir', dir]);
  assert.equal(down.code, 0, down.stderr);
  assert.match(down.stdout, new RegExp(`stopped kube-apiserver \\(pid ${pid}\\)`));
  assert.equal(alive(pid), false);
  assert.equal(existsSync(dir), false);
  assert.deepEqual(readdirSync(parent), []);
});

test('dev-cluster up prints shell exports by default; down leaves no process of it', async (t) => {
  const up = await run(broker, ['dev-cluster', 'up', '--api-server-only']);
  assert.equal(up.code, 0, up.stderr);
  const dir = /export TASK_BROKER_CLUSTER_DIR=(\S+)/.exec(up.stdout)?.[1];
  const kubeconfig = /export KUBECONFIG=(\S+)/.exec(up.stdout)?.[1];
  assert.ok(dir && kubeconfig, up.stdout);
  const pids = (LocalCluster.readState(dir).components ?? []).map((c) => c.pid);
  t.after(async () => {
    if (existsSync(dir)) await run(broker, ['dev-cluster', 'down', '--dir', dir]);
    for (const pid of pids) if (alive(pid)) process.kill(pid, 'SIGKILL');
  });
  const res = await kubectl(kubeconfig, 'auth', 'can-i', 'create', 'serviceaccounts/token', '-n', 'default');
  assert.equal(res.stdout.trim(), 'yes');
  assert.equal(pids.length, 1, 'the API server alone');
  const down = await run(broker, ['dev-cluster', 'down', '--dir', dir]);
  assert.equal(down.code, 0, down.stderr);
  for (const pid of pids) assert.equal(alive(pid), false, `process ${pid} is gone`);
});

test('dev-cluster down on a directory without a cluster fails with cluster_not_found and exit 1', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'tb-empty-'));
  try {
    const res = await run(broker, ['dev-cluster', 'down', '--dir', dir]);
    assert.equal(res.code, 1);
    assert.match(res.stderr, /\[cluster_not_found\]/);
    assert.ok(existsSync(dir), 'a directory that holds no cluster is left alone');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('dev-cluster up starts the whole cluster by default: -o json lists each process; a pod runs; down leaves no process', async (t) => {
  const parent = mkdtempSync(join(tmpdir(), 'tb-devcluster-full-'));
  const dir = join(parent, 'cluster');
  let pids: number[] = [];
  t.after(async () => {
    for (const pid of pids) if (alive(pid)) process.kill(pid, 'SIGKILL');
    rmSync(parent, { recursive: true, force: true });
  });

  const up = await run(broker, ['dev-cluster', 'up', '--dir', dir, '-o', 'json']);
  assert.equal(up.code, 0, up.stderr);
  const info = JSON.parse(up.stdout) as { kubeconfig: string; pid: number; mode: string; components: ClusterComponent[]; nodeDir: string };
  pids = info.components.map((c) => c.pid);
  assert.equal(info.mode, 'full');
  assert.deepEqual(
    info.components.map((c) => c.name),
    ['kube-apiserver', 'kube-controller-manager', 'kube-scheduler', 'local-node'],
  );
  assert.equal(info.components[0]!.pid, info.pid);
  for (const c of info.components) assert.ok(alive(c.pid), `${c.name} (pid ${c.pid}) runs in the background`);

  const nodes = await kubectl(info.kubeconfig, 'get', 'nodes', '-o', 'jsonpath={.items[*].metadata.name}');
  assert.equal(nodes.stdout, 'local-node', nodes.stderr);
  const created = await kubectl(info.kubeconfig, 'run', 'sleeper', '--image=busybox', '--command', '--', 'sleep', '1000');
  assert.equal(created.code, 0, created.stderr);
  let containerPid = 0;
  for (let i = 0; i < 300 && !containerPid; i++) {
    const id = await kubectl(info.kubeconfig, 'get', 'pod', 'sleeper', '-o', 'jsonpath={.status.containerStatuses[0].containerID}');
    containerPid = Number(/^process:\/\/(\d+)$/.exec(id.stdout)?.[1] ?? 0);
    if (!containerPid) await sleep(100);
  }
  assert.ok(containerPid > 0 && alive(containerPid), 'the pod runs as a local process');
  assert.ok(readProcessGroups(info.nodeDir).includes(containerPid), 'in a process group the node lists');

  const down = await run(broker, ['dev-cluster', 'down', '--dir', dir]);
  assert.equal(down.code, 0, down.stderr);
  assert.match(down.stdout, new RegExp(`stopped kube-apiserver \\(pid ${info.pid}\\), kube-controller-manager \\(pid \\d+\\), kube-scheduler \\(pid \\d+\\), local-node \\(pid \\d+\\) and removed`));
  for (const pid of [...pids, containerPid]) assert.equal(alive(pid), false, `process ${pid} is gone`);
  assert.equal(existsSync(dir), false);
});
