/**
 * `broker demo` on this machine (install.sh built the whole local cluster): the four checks hold, the
 * output names each, and nothing is left behind (no process, by pid and by what runs in its
 * directory), with or without `--keep` + `demo down`.
 */
import { test } from 'node:test';
import { spawnSync } from 'node:child_process';
import assert from 'node:assert/strict';
import { existsSync, readdirSync, readFileSync, readlinkSync, statSync } from 'node:fs';
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

/**
 * Processes that run in `dir` or name it: the demo's broker and cluster (their command lines) and the
 * pods' containers, which run in directories below it (their working directory, " (deleted)" once
 * the directory is removed). Zombies, already exited, do not count.
 */
function processesIn(dir: string): number[] {
  const found: number[] = [];
  for (const entry of readdirSync('/proc')) {
    const pid = Number(entry);
    if (!Number.isInteger(pid) || pid === process.pid) continue;
    try {
      const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
      if (stat.slice(stat.lastIndexOf(')') + 2).startsWith('Z')) continue;
      const cwd = readlinkSync(`/proc/${pid}/cwd`);
      const cmdline = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
      if (cwd === dir || cwd.startsWith(`${dir}/`) || cmdline.includes(dir)) found.push(pid);
    } catch {
      // gone meanwhile, or not ours to read
    }
  }
  return found;
}

const CLUSTER = ['kube-apiserver', 'kube-controller-manager', 'kube-scheduler', 'local-node'];

function broker(args: string[]) {
  const [cmd, pre] = cli();
  return run(cmd, [...pre, ...args], env, 180_000);
}

test('broker demo: all four checks hold, each named in the output, and it stops and removes everything it started', async (t) => {
  const res = await broker(['demo']);
  const out = res.stdout + res.stderr;
  const pids = [...res.stdout.matchAll(/\(pid (\d+)\)/g)].map((m) => Number(m[1]));
  t.after(() => pids.filter(alive).forEach((pid) => process.kill(pid, 'SIGKILL')));
  assert.equal(res.code, 0, out);
  assert.match(res.stdout, /^PASS check 1, allowed path: the recording holds the task's 3 kubectl commands, in order/m);
  assert.match(res.stdout, /^PASS check 2, denied path: the API server refused `kubectl delete pod web-1 -n other` \(403, decision forbid\)/m);
  assert.match(res.stdout, /^PASS check 3, no resting access: /m);
  assert.match(
    res.stdout,
    /^PASS check 4, gated exec: without an approval `task start` was refused \(exit 3, request ar-[0-9a-f]+\) and kubectl exec got no credential; the agent could not approve it, user:system:serviceaccount:approvers:demo-approver did; `kubectl exec web-1` printed hello-2; the recording holds the approval and the exec \(get pods\/web-1\/exec, 101\)/m,
  );
  assert.match(res.stdout, /^all 4 checks hold/m);
  // Check 4 as the user sees it: refused with the request to approve, the exec refused by the plugin,
  // the agent's own approval refused, the approver's taken, the exec's output, the recording.
  assert.match(res.stdout, /\$ broker task start exec-web --namespace demo .*\n +error: template "exec-web" is gated: 1 approval\(s\) needed from sre; request (ar-[0-9a-f]+); .*\[approval_required\]\n +\(exit 3\)/);
  assert.match(res.stdout, /\$ kubectl --kubeconfig \$DEMO\/exec\.kubeconfig exec web-1 -n demo -- sh -c 'echo hello-\$\(\(1\+1\)\)'\n +broker credential: task "exec-web" needs approval \(request ar-[0-9a-f]+\)/);
  assert.match(res.stdout, /\$ broker approve (ar-[0-9a-f]+)\n +error: .* is agent:demo-agent, who requested \1, and cannot decide it \[forbidden\]/);
  assert.match(res.stdout, /\$ broker approve (ar-[0-9a-f]+) --reason .*\n +approved \1: 1\/1 approvals, now approved/);
  assert.match(res.stdout, /exec web-1 -n demo -- sh -c 'echo hello-\$\(\(1\+1\)\)'\n +hello-2\n/);
  assert.match(res.stdout, /approval granted ar-[0-9a-f]+ by user:system:serviceaccount:approvers:demo-approver[\s\S]*approval used[\s\S]*task started[\s\S]*ALLOW get pods\/web-1\/exec -n demo( \(101\))?\n[\s\S]*task ended/);
  // The recording, as `audit show` printed it.
  assert.match(res.stdout, /ALLOW list pods -n demo[\s\S]*ALLOW get pods\/web-1 -n demo[\s\S]*ALLOW list configmaps -n demo[\s\S]*task ended/);
  assert.match(res.stdout, /DENY delete pods\/web-1 -n other \(403: pods "web-1" is forbidden/);
  assert.match(res.stdout, /no active task "read-pods"/);
  assert.doesNotMatch(res.stdout, /eyJ[A-Za-z0-9_-]{10,}\./, 'no token is printed');
  const dir = /DEMO=(\S+)/.exec(res.stdout)?.[1];
  assert.ok(dir, out);
  assert.equal(existsSync(dir), false, `${dir} is removed`);
  const stopped = new RegExp(`stopped broker \\(pid (\\d+)\\), ${CLUSTER.map((name) => `${name} \\(pid (\\d+)\\)`).join(', ')}; removed `).exec(res.stdout);
  assert.ok(stopped, out);
  for (const pid of stopped.slice(1).map(Number)) assert.equal(alive(pid), false, `pid ${pid} is gone`);
  assert.deepEqual(processesIn(dir), [], 'no process runs in the demo directory or names it (the pods\' containers included)');
});

test('broker demo --keep leaves the broker and the cluster running; demo down stops the pids it reported and removes the directory', async (t) => {
  const res = await broker(['demo', '--keep']);
  const kept = new RegExp(`${CLUSTER.map((name) => `${name} pid (\\d+)`).join(', ')}, broker pid (\\d+) at (\\S+); everything is in (\\S+)`).exec(res.stdout);
  // The cluster's, then the broker's.
  const pids = kept ? kept.slice(1, 6).map(Number) : [];
  let inDir: number[] = [];
  t.after(() => [...pids, ...inDir].filter(alive).forEach((pid) => process.kill(pid, 'SIGKILL')));
  assert.equal(res.code, 0, res.stdout + res.stderr);
  assert.ok(kept, res.stdout);
  const dir = kept[7]!;
  assert.match(res.stdout, /^PASS check 3, no resting access/m);
  assert.match(res.stdout, /^PASS check 4, gated exec/m);
  for (const pid of pids) assert.ok(alive(pid), `pid ${pid} still runs after demo --keep returned`);
  inDir = processesIn(dir);
  assert.ok(inDir.length > pids.length, `the pods' containers run in ${dir} too: ${inDir.join(', ')}`);
  assert.ok(existsSync(dir));
  assert.match(res.stdout, new RegExp(`broker demo down --dir ${dir.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}`));
  assert.match(res.stdout, /export BROKER_URL=https:\/\/127\.0\.0\.1:\d+ BROKER_CA=\S+ KUBECONFIG=\S+/);
  // The explore lines work as printed: the administrator registers, a new key is enrolled, and the
  // broker takes its holder for the agent (the demo's own key never left the demo's memory).
  const exports = res.stdout.slice(res.stdout.indexOf('To explore, as the agent:')).split('\n').filter((l) => /^ {2}export /.test(l)).map((l) => l.trim());
  assert.equal(exports.length, 3, res.stdout);
  assert.match(exports[2]!, /^export BROKER_AGENT_KEY=\$\(broker agent enroll "\$\(BROKER_IDENTITY_TOKEN_FILE=\S+ broker agent register demo-agent\)" --print-key/);
  const explored = spawnSync('bash', ['-c', [...exports, 'broker whoami -o json'].join('\n')], { encoding: 'utf8', env: { PATH: process.env['PATH'], HOME: dir } });
  assert.equal(explored.status, 0, explored.stderr);
  assert.equal((JSON.parse(explored.stdout) as { agent: string }).agent, 'demo-agent');

  const down = await broker(['demo', 'down', '--dir', dir]);
  assert.equal(down.code, 0, down.stderr);
  assert.match(down.stdout, new RegExp(`stopped broker \\(pid ${pids[4]}\\), ${CLUSTER.map((name, i) => `${name} \\(pid ${pids[i]}\\)`).join(', ')}; removed `));
  for (const pid of inDir) assert.equal(alive(pid), false, `pid ${pid} is gone after demo down`);
  assert.deepEqual(processesIn(dir), [], 'no process runs in the demo directory or names it');
  assert.equal(existsSync(dir), false, `${dir} is removed`);
  const again = await broker(['demo', 'down', '--dir', dir]);
  assert.equal(again.code, 1);
  assert.match(again.stderr, /no demo in .*\[not_found\]/);
});
