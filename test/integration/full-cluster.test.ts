/**
 * The full local cluster (LocalCluster.start({ full: true })): kube-apiserver, kube-controller-manager,
 * kube-scheduler and local-node, whose containers are local processes. Everything here goes through
 * the real kubectl and the real API server, which reaches the node's kubelet API over TLS.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { alive, freePort, groupAlive, kubectlPath, LocalCluster, NODE_NAME, readProcessGroups } from '../../src/cluster/local-cluster.ts';
import { kubectl, run } from '../helpers/kube.ts';

interface PodJson {
  metadata: { name: string; uid: string };
  spec: { nodeName?: string };
  status: {
    phase?: string;
    containerStatuses?: Array<{
      name: string;
      containerID?: string;
      restartCount: number;
      state: { running?: object; terminated?: { exitCode: number }; waiting?: { reason?: string } };
      lastState: { terminated?: { exitCode: number } };
    }>;
  };
}

/** Starts a long-running kubectl (logs -f, port-forward) and resolves once its stdout matches `pattern`. */
function kubectlUntil(kubeconfig: string, args: string[], pattern: RegExp, timeoutMs = 30_000): Promise<{ match: RegExpMatchArray; output: () => string; stop: () => void }> {
  return new Promise((done, fail) => {
    const child = spawn(kubectlPath(), ['--kubeconfig', kubeconfig, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    const stop = () => child.kill('SIGKILL');
    const timer = setTimeout(() => {
      stop();
      fail(new Error(`kubectl ${args.join(' ')}: no ${pattern} within ${timeoutMs} ms; stdout: ${out}; stderr: ${err}`));
    }, timeoutMs);
    child.stderr.on('data', (d: Buffer) => (err += d.toString()));
    child.stdout.on('data', (d: Buffer) => {
      out += d.toString();
      const match = pattern.exec(out);
      if (match) {
        clearTimeout(timer);
        done({ match, output: () => out, stop });
      }
    });
    child.on('exit', () => {
      clearTimeout(timer);
      fail(new Error(`kubectl ${args.join(' ')} exited; stdout: ${out}; stderr: ${err}`));
    });
  });
}

/** The process of a container, from its status (containerID process://PID). */
function pidOf(pod: PodJson, container?: string): number {
  const status = pod.status.containerStatuses?.find((c) => container === undefined || c.name === container);
  const pid = Number(/^process:\/\/(\d+)$/.exec(status?.containerID ?? '')?.[1]);
  assert.ok(pid > 0, `no pid in ${JSON.stringify(pod.status)}`);
  return pid;
}

describe('full local cluster', () => {
  let cluster: LocalCluster;
  let kc: string;
  let scratch: string;

  /** kubectl with standard input, e.g. for `exec -i` and `attach -i`. */
  const kubectlWithInput = (input: string, args: string[], env: NodeJS.ProcessEnv = {}) =>
    run(kubectlPath(), ['--kubeconfig', kc, ...args], { PATH: process.env['PATH'] ?? '/usr/bin:/bin', HOME: process.env['HOME'] ?? '/tmp', ...env }, 60_000, input);
  const k = async (...args: string[]) => {
    const res = await kubectl(kc, ...args);
    assert.equal(res.code, 0, `kubectl ${args.join(' ')}: ${res.stderr}`);
    return res.stdout;
  };
  const pods = async (ns: string, selector: string): Promise<PodJson[]> =>
    (JSON.parse(await k('get', 'pods', '-n', ns, '-l', selector, '-o', 'json')) as { items: PodJson[] }).items;
  const pod = async (ns: string, name: string): Promise<PodJson> => JSON.parse(await k('get', 'pod', name, '-n', ns, '-o', 'json')) as PodJson;
  /** Polls `check` every 200 ms until it returns a value (not undefined), or fails after timeoutMs. */
  const until = async <T>(what: string, check: () => Promise<T | undefined>, timeoutMs = 60_000): Promise<T> => {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const value = await check();
      if (value !== undefined) return value;
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
      await sleep(200);
    }
  };
  const runningPod = (ns: string, name: string) =>
    until(`pod ${ns}/${name} Running`, async () => {
      const p = await pod(ns, name).catch(() => undefined);
      return p?.status.phase === 'Running' ? p : undefined;
    });

  before(async () => {
    cluster = await LocalCluster.start({ full: true });
    kc = cluster.kubeconfig;
    scratch = mkdtempSync(join(tmpdir(), 'tb-full-'));
    for (const ns of ['apps', 'io']) await k('create', 'namespace', ns);
    // The namespace's default ServiceAccount comes from the controller-manager (the ServiceAccount
    // admission plugin refuses pods until it exists).
    for (const ns of ['apps', 'io']) await until(`${ns}/default ServiceAccount`, async () => ((await kubectl(kc, 'get', 'sa', 'default', '-n', ns)).code === 0 ? true : undefined));
  });
  after(async () => {
    await cluster?.stop();
    if (scratch) rmSync(scratch, { recursive: true, force: true });
  });

  test('runs the controllers, the scheduler and a Ready node, each process listed with its pid', async () => {
    assert.deepEqual(
      cluster.components.map((c) => c.name),
      ['kube-apiserver', 'kube-controller-manager', 'kube-scheduler', 'local-node'],
    );
    for (const c of cluster.components) assert.ok(alive(c.pid), `${c.name} runs`);
    const node = JSON.parse(await k('get', 'node', NODE_NAME, '-o', 'json')) as {
      status: { conditions: Array<{ type: string; status: string }>; nodeInfo: { kubeletVersion: string } };
    };
    assert.equal(node.status.conditions.find((c) => c.type === 'Ready')?.status, 'True');
    // The node renews its Lease.
    const lease = JSON.parse(await k('get', 'lease', NODE_NAME, '-n', 'kube-node-lease', '-o', 'json')) as { spec: { holderIdentity: string } };
    assert.equal(lease.spec.holderIdentity, NODE_NAME);
  });

  test('a Deployment of 2 replicas gets 2 Running pods on the node; rollout restart replaces them; scale --replicas 0 leaves no process', async () => {
    await k('create', 'deployment', 'web', '-n', 'apps', '--image=busybox', '--replicas=2', '--', 'sh', '-c', 'echo up; while true; do sleep 1; done');
    await k('rollout', 'status', 'deploy/web', '-n', 'apps', '--timeout=60s');
    const first = await until('2 Running pods', async () => {
      const items = await pods('apps', 'app=web');
      return items.length === 2 && items.every((p) => p.status.phase === 'Running') ? items : undefined;
    });
    for (const p of first) assert.equal(p.spec.nodeName, NODE_NAME);
    const firstPids = first.map((p) => pidOf(p));
    for (const pid of firstPids) assert.ok(alive(pid), `container process ${pid} runs`);
    // The ReplicaSet is the controller-manager's work, the binding the scheduler's.
    const rs = JSON.parse(await k('get', 'rs', '-n', 'apps', '-l', 'app=web', '-o', 'json')) as { items: unknown[] };
    assert.equal(rs.items.length, 1);

    await k('rollout', 'restart', 'deploy/web', '-n', 'apps');
    await k('rollout', 'status', 'deploy/web', '-n', 'apps', '--timeout=90s');
    const second = await until('2 new Running pods, the old ones gone', async () => {
      const items = await pods('apps', 'app=web');
      const names = items.map((p) => p.metadata.name);
      return items.length === 2 && items.every((p) => p.status.phase === 'Running') && !first.some((p) => names.includes(p.metadata.name)) ? items : undefined;
    });
    const secondPids = second.map((p) => pidOf(p));
    await until('the old processes to end', async () => (firstPids.some(alive) ? undefined : true), 15_000);

    await k('scale', 'deploy/web', '-n', 'apps', '--replicas', '0');
    await until('no pod left', async () => ((await pods('apps', 'app=web')).length === 0 ? true : undefined));
    for (const pid of [...firstPids, ...secondPids]) {
      assert.equal(alive(pid), false, `process ${pid} is gone`);
      assert.equal(groupAlive(pid), false, `nothing of its process group ${pid} is left`);
    }
    const groups = readProcessGroups(cluster.nodeDir!);
    assert.ok(![...firstPids, ...secondPids].some((pid) => groups.includes(pid)), `the node lists none of them: ${groups.join(',')}`);
  });

  test('pod status follows the process: Succeeded, Failed with its exit code, restarts with `logs --previous`', async () => {
    await k('run', 'ok', '-n', 'apps', '--image=busybox', '--restart=Never', '--command', '--', 'sh', '-c', 'echo done');
    await k('run', 'bad', '-n', 'apps', '--image=busybox', '--restart=Never', '--command', '--', 'sh', '-c', 'echo failing; exit 7');
    await k('run', 'again', '-n', 'apps', '--image=busybox', '--restart=Always', '--command', '--', 'sh', '-c', 'echo "run $(date +%s%N)"; sleep 0.3; exit 1');
    const ok = await until('ok Succeeded', async () => ((p) => (p.status.phase === 'Succeeded' ? p : undefined))(await pod('apps', 'ok')));
    assert.equal(ok.status.containerStatuses?.[0]?.state.terminated?.exitCode, 0);
    assert.equal(await k('logs', 'ok', '-n', 'apps'), 'done\n');
    const bad = await until('bad Failed', async () => ((p) => (p.status.phase === 'Failed' ? p : undefined))(await pod('apps', 'bad')));
    assert.equal(bad.status.containerStatuses?.[0]?.state.terminated?.exitCode, 7);

    const again = await until('again restarted', async () => ((p) => ((p.status.containerStatuses?.[0]?.restartCount ?? 0) >= 1 ? p : undefined))(await pod('apps', 'again')));
    assert.equal(again.status.phase, 'Running');
    assert.equal(again.status.containerStatuses?.[0]?.lastState.terminated?.exitCode, 1);
    const previous = await kubectl(kc, 'logs', 'again', '-n', 'apps', '--previous');
    assert.equal(previous.code, 0, previous.stderr);
    assert.match(previous.stdout, /^run \d+\n$/);
    await k('delete', 'pod', 'ok', 'bad', 'again', '-n', 'apps', '--wait=true');
  });

  test('kubectl logs -f streams lines as they are written', async () => {
    await k('run', 'ticker', '-n', 'io', '--image=busybox', '--command', '--', 'sh', '-c', 'i=0; while true; do i=$((i+1)); echo "tick $i"; sleep 0.2; done');
    await runningPod('io', 'ticker');
    const follow = await kubectlUntil(kc, ['logs', '-f', 'ticker', '-n', 'io'], /tick (\d+)\n/);
    try {
      const first = Number(follow.match[1]);
      // Later lines arrive on the same stream, written after the command started.
      const later = new RegExp(`tick ${first + 5}\\n`);
      await until('5 more lines on the stream', async () => (later.test(follow.output()) ? true : undefined), 20_000);
    } finally {
      follow.stop();
    }
  });

  test('kubectl exec -i with stdin, over WebSocket and over SPDY; in the container directory, with its env; exit codes', async () => {
    await k('run', 'shell', '-n', 'io', '--image=busybox', '--env=GREETING=hello from the pod', '--command', '--', 'sleep', '3600');
    await runningPod('io', 'shell');
    for (const env of [{}, { KUBECTL_REMOTE_COMMAND_WEBSOCKETS: 'false' }]) {
      const res = await kubectlWithInput('world\n', ['exec', '-i', 'shell', '-n', 'io', '--', 'sh', '-c', 'read x; echo got $x'], env);
      assert.equal(res.code, 0, `${JSON.stringify(env)}: ${res.stderr}`);
      assert.equal(res.stdout, 'got world\n', JSON.stringify(env));
    }
    const where = await k('exec', 'shell', '-n', 'io', '--', 'sh', '-c', 'pwd; echo "$GREETING"');
    const [cwd, greeting] = where.trimEnd().split('\n');
    assert.ok(cwd?.startsWith(join(cluster.nodeDir!, 'pods')), `runs in the container's directory: ${cwd}`);
    assert.equal(greeting, 'hello from the pod');
    const failed = await kubectl(kc, 'exec', 'shell', '-n', 'io', '--', 'sh', '-c', 'echo oops >&2; exit 3');
    assert.equal(failed.code, 3);
    assert.match(failed.stderr, /oops/);
  });

  test('kubectl attach -i joins the container\'s stdin and stdout', async () => {
    writeFileSync(
      join(scratch, 'echo.json'),
      JSON.stringify({
        apiVersion: 'v1',
        kind: 'Pod',
        metadata: { name: 'echo', namespace: 'io' },
        spec: {
          restartPolicy: 'Never',
          containers: [{ name: 'echo', image: 'busybox', stdin: true, stdinOnce: true, command: ['sh', '-c', 'while read l; do echo "echo: $l"; done; echo bye'] }],
        },
      }),
    );
    await k('apply', '-f', join(scratch, 'echo.json'));
    await runningPod('io', 'echo');
    const res = await kubectlWithInput('one\ntwo\n', ['attach', '-i', 'echo', '-n', 'io']);
    assert.equal(res.code, 0, res.stderr);
    assert.match(res.stdout, /echo: one\necho: two\nbye\n/);
    await until('echo Succeeded', async () => ((await pod('io', 'echo')).status.phase === 'Succeeded' ? true : undefined));
  });

  test('kubectl port-forward reaches a process listening on loopback in the pod', async () => {
    const port = await freePort();
    const server = `require('http').createServer((q, s) => s.end('hello through port-forward')).listen(${port}, '127.0.0.1')`;
    await k('run', 'web', '-n', 'io', '--image=node', '--command', '--', process.execPath, '-e', server);
    await runningPod('io', 'web');
    const forward = await kubectlUntil(kc, ['port-forward', 'pod/web', '-n', 'io', `:${port}`, '--address', '127.0.0.1'], /Forwarding from 127\.0\.0\.1:(\d+) ->/);
    try {
      const local = forward.match[1];
      const body = await until('an answer through the forward', async () => {
        const res = await fetch(`http://127.0.0.1:${local}/`).catch(() => undefined);
        return res?.ok ? res.text() : undefined;
      }, 20_000);
      assert.equal(body, 'hello through port-forward');
    } finally {
      forward.stop();
    }
  });

  test('kubectl cp copies into the container and out of it', async () => {
    await runningPod('io', 'shell');
    const local = join(scratch, 'in.txt');
    writeFileSync(local, 'from the host\n');
    await k('cp', local, 'io/shell:in.txt');
    assert.equal(await k('exec', 'shell', '-n', 'io', '--', 'cat', 'in.txt'), 'from the host\n');
    await k('exec', 'shell', '-n', 'io', '--', 'sh', '-c', 'echo "from the pod" > out.txt');
    const back = join(scratch, 'out.txt');
    await k('cp', 'io/shell:out.txt', back);
    assert.equal(readFileSync(back, 'utf8'), 'from the pod\n');
  });

  test('stop() leaves no process of the cluster: components, containers and what they started, even with the node SIGKILLed first', async () => {
    // A container whose shell leaves a child (sleep) in its process group.
    await k('run', 'parent', '-n', 'apps', '--image=busybox', '--command', '--', 'sh', '-c', 'sleep 1000 & echo $! > child.pid; wait');
    const running = await runningPod('apps', 'parent');
    const shellPid = pidOf(running);
    const childPid = Number(await until('child.pid', async () => ((r) => (r.code === 0 && r.stdout.trim() ? r.stdout.trim() : undefined))(await kubectl(kc, 'exec', 'parent', '-n', 'apps', '--', 'cat', 'child.pid'))));
    const others = (await pods('io', 'run')).map((p) => pidOf(p));
    assert.ok(alive(childPid) && alive(shellPid));
    const components = cluster.components.map((c) => c.pid);

    // The node is killed without a chance to clean up: its direct children die with it
    // (PR_SET_PDEATHSIG), the rest of their groups is killed by stop() from the node's list.
    const node = cluster.components.find((c) => c.name === 'local-node')!;
    process.kill(node.pid, 'SIGKILL');
    await until('the node to die', async () => (alive(node.pid) ? undefined : true), 10_000);
    const dir = cluster.dir;
    await cluster.stop();
    for (const pid of [...components, shellPid, childPid, ...others]) assert.equal(alive(pid), false, `process ${pid} is gone`);
    assert.equal(groupAlive(shellPid), false, 'its process group is empty');
    assert.equal(existsSync(dir), false, 'the directory is removed');
  });
});

test('a full cluster outlives nothing: when its parent is SIGKILLed, every component and container exits', async () => {
  const script = `
    import { LocalCluster } from ${JSON.stringify(new URL('../../src/cluster/local-cluster.ts', import.meta.url).href)};
    import { execFileSync } from 'node:child_process';
    const c = await LocalCluster.start({ full: true });
    const kubectl = (...args) => execFileSync(${JSON.stringify(kubectlPath())}, ['--kubeconfig', c.kubeconfig, ...args], { encoding: 'utf8' });
    kubectl('run', 'sleeper', '--image=busybox', '--command', '--', 'sh', '-c', 'sleep 1000 & wait');
    let pid = 0;
    for (let i = 0; i < 300 && !pid; i++) {
      const id = kubectl('get', 'pod', 'sleeper', '-o', 'jsonpath={.status.containerStatuses[0].containerID}');
      pid = Number(/process:\\/\\/(\\d+)/.exec(id)?.[1] ?? 0);
      if (!pid) await new Promise((r) => setTimeout(r, 200));
    }
    process.stdout.write(JSON.stringify({ pids: c.components.map((x) => x.pid), container: pid, dir: c.dir }) + '\\n');
    setInterval(() => {}, 1000);
  `;
  const child = spawn(process.execPath, ['--input-type=module', '-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
  const line = await new Promise<string>((done, fail) => {
    let out = '';
    child.stdout.on('data', (d: Buffer) => {
      out += d.toString();
      if (out.includes('\n')) done(out);
    });
    child.once('exit', (code) => fail(new Error(`the child exited with ${code}: ${out}`)));
  });
  const { pids, container, dir } = JSON.parse(line) as { pids: number[]; container: number; dir: string };
  assert.ok(container > 0, 'the pod runs');
  assert.ok([...pids, container].every(alive));
  child.kill('SIGKILL');
  const deadline = Date.now() + 20_000;
  while (Date.now() < deadline && ([...pids, container].some(alive) || groupAlive(container) || existsSync(dir))) await sleep(100);
  for (const pid of [...pids, container]) assert.equal(alive(pid), false, `process ${pid} exited with its parent`);
  assert.equal(groupAlive(container), false, 'and so did the rest of the container\'s process group');
  assert.equal(existsSync(dir), false, 'the directory is removed');
});
