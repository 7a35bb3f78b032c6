/**
 * `broker demo` on this machine (install.sh built the control plane): the three checks hold, the
 * output names each, and nothing is left behind, with or without `--keep` + `demo down`.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { alive } from '../../src/cluster/local-cluster.ts';
import { run } from '../helpers/kube.ts';

const ROOT = new URL('../..', import.meta.url).pathname;

/** bin/broker runs dist/: use it when dist/ holds this demo, else the sources. */
function cli(): [string, string[]] {
  const built = (src: string, out: string) => existsSync(join(ROOT, out)) && statSync(join(ROOT, out)).mtimeMs >= statSync(join(ROOT, src)).mtimeMs;
  return built('src/cli/demo.ts', 'dist/cli/demo.js') && built('src/audit/show.ts', 'dist/audit/show.js')
    ? [join(ROOT, 'bin/broker'), []]
    : [process.execPath, [join(ROOT, 'src/cli/main.ts')]];
}

const env = { PATH: process.env['PATH'], HOME: process.env['HOME'], TMPDIR: process.env['TMPDIR'] ?? '/tmp' };

function broker(args: string[]) {
  const [cmd, pre] = cli();
  return run(cmd, [...pre, ...args], env, 180_000);
}

test('broker demo: all three checks hold, each named in the output, and it stops and removes everything it started', async (t) => {
  const res = await broker(['demo']);
  const out = res.stdout + res.stderr;
  const pids = [...res.stdout.matchAll(/\(pid (\d+)\)/g)].map((m) => Number(m[1]));
  t.after(() => pids.filter(alive).forEach((pid) => process.kill(pid, 'SIGKILL')));
  assert.equal(res.code, 0, out);
  assert.match(res.stdout, /^PASS check 1, allowed path: the recording holds the task's 3 kubectl commands, in order/m);
  assert.match(res.stdout, /^PASS check 2, denied path: the API server refused `kubectl delete pod web-1 -n other` \(403, decision forbid\)/m);
  assert.match(res.stdout, /^PASS check 3, no resting access: /m);
  assert.match(res.stdout, /^all 3 checks hold/m);
  // The recording, as `audit show` printed it.
  assert.match(res.stdout, /ALLOW list pods -n demo[\s\S]*ALLOW get pods\/web-1 -n demo[\s\S]*ALLOW list configmaps -n demo[\s\S]*task ended/);
  assert.match(res.stdout, /DENY delete pods\/web-1 -n other \(403: pods "web-1" is forbidden/);
  assert.match(res.stdout, /no active task "read-pods"/);
  assert.doesNotMatch(res.stdout, /eyJ[A-Za-z0-9_-]{10,}\./, 'no token is printed');
  const dir = /DEMO=(\S+)/.exec(res.stdout)?.[1];
  assert.ok(dir, out);
  assert.equal(existsSync(dir), false, `${dir} is removed`);
  const stopped = /stopped broker \(pid (\d+)\), kube-apiserver \(pid (\d+)\)/.exec(res.stdout);
  assert.ok(stopped, out);
  for (const pid of [Number(stopped[1]), Number(stopped[2])]) assert.equal(alive(pid), false, `pid ${pid} is gone`);
});

test('broker demo --keep leaves the broker and kube-apiserver running; demo down stops the pids it reported and removes the directory', async (t) => {
  const res = await broker(['demo', '--keep']);
  const kept = /kube-apiserver pid (\d+), broker pid (\d+) at (\S+); everything is in (\S+)/.exec(res.stdout);
  const pids = kept ? [Number(kept[1]), Number(kept[2])] : [];
  t.after(() => pids.filter(alive).forEach((pid) => process.kill(pid, 'SIGKILL')));
  assert.equal(res.code, 0, res.stdout + res.stderr);
  assert.ok(kept, res.stdout);
  const dir = kept[4]!;
  assert.match(res.stdout, /^PASS check 3, no resting access/m);
  for (const pid of pids) assert.ok(alive(pid), `pid ${pid} still runs after demo --keep returned`);
  assert.ok(existsSync(dir));
  assert.match(res.stdout, new RegExp(`broker demo down --dir ${dir.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}`));
  assert.match(res.stdout, /export BROKER_URL=https:\/\/127\.0\.0\.1:\d+ BROKER_CA=\S+ BROKER_IDENTITY_TOKEN_FILE=\S+ KUBECONFIG=\S+/);

  const down = await broker(['demo', 'down', '--dir', dir]);
  assert.equal(down.code, 0, down.stderr);
  assert.match(down.stdout, new RegExp(`stopped broker \\(pid ${pids[1]}\\), kube-apiserver \\(pid ${pids[0]}\\); removed `));
  for (const pid of pids) assert.equal(alive(pid), false, `pid ${pid} is gone after demo down`);
  assert.equal(existsSync(dir), false, `${dir} is removed`);
  const again = await broker(['demo', 'down', '--dir', dir]);
  assert.equal(again.code, 1);
  assert.match(again.stderr, /no demo in .*\[not_found\]/);
});
