/** `broker dev-cluster up/down`, as a user runs it: a background control plane that kubectl reaches. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { alive, KUBERNETES_VERSION } from '../../src/cluster/local-cluster.ts';
import { kubectl, run } from '../helpers/kube.ts';

const broker = new URL('../../bin/broker', import.meta.url).pathname;

test('dev-cluster up starts a v1.36 server that kubectl reaches; down stops it and removes its dir', async (t) => {
  const parent = mkdtempSync(join(tmpdir(), 'tb-devcluster-'));
  const dir = join(parent, 'cluster');
  let pid = 0;
  t.after(async () => {
    if (pid && alive(pid)) process.kill(pid, 'SIGKILL');
    rmSync(parent, { recursive: true, force: true });
  });

  const up = await run(broker, ['dev-cluster', 'up', '--dir', dir, '-o', 'json']);
  assert.equal(up.code, 0, up.stderr);
  const info = JSON.parse(up.stdout) as { dir: string; server: string; kubeconfig: string; pid: number; version: string };
  pid = info.pid;
  assert.equal(info.dir, dir);
  assert.match(info.server, /^https:\/\/127\.0\.0\.1:\d+$/);
  assert.equal(info.version, KUBERNETES_VERSION);
  assert.ok(alive(pid), 'the server runs in the background after `up` returned');

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

test('dev-cluster up prints shell exports by default', async (t) => {
  const up = await run(broker, ['dev-cluster', 'up']);
  assert.equal(up.code, 0, up.stderr);
  const dir = /export TASK_BROKER_CLUSTER_DIR=(\S+)/.exec(up.stdout)?.[1];
  const kubeconfig = /export KUBECONFIG=(\S+)/.exec(up.stdout)?.[1];
  assert.ok(dir && kubeconfig, up.stdout);
  t.after(() => run(broker, ['dev-cluster', 'down', '--dir', dir]));
  const res = await kubectl(kubeconfig, 'auth', 'can-i', 'create', 'serviceaccounts/token', '-n', 'default');
  assert.equal(res.stdout.trim(), 'yes');
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
