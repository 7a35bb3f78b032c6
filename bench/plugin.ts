/**
 * The exec plugin's cost, measured against baselines in the same run:
 *  1. whole-process wall time of the plugin (the native build, the Node build, and `broker credential`
 *     through the bin/broker sh launcher) against `node -e 0` on the same Node, with the broker
 *     holding a valid token. Goals: the native build <= 0.2x, the Node build <= 1.3x.
 *     Where the native build's time goes: the same binary against a stand-in broker (the bare fastify
 *     route of bench/bare-server.ts: an answer of the same size, no authentication, no audit), and the
 *     broker's own handling of each request as it logged it (the request log's `ms`: from the request's
 *     arrival to its answer, the credential.served record's fdatasync included).
 *  2. `kubectl get pods` through the exec entry against the same kubectl with a kubeconfig that holds the
 *     same token directly. Goal: <= 1.25x. (The task grants pods in one namespace; a cluster-scoped
 *     `get namespaces` would be refused either way, so pods are the read that both can do.)
 * Runs alternate between the two sides so that machine noise falls on both.
 *
 *   bin/bench plugin [RUNS=30] [--baseline-plugin PATH]
 *
 * --baseline-plugin PATH times another build of the native plugin (an earlier commit's, say) in the
 * same runs, against the same broker.
 */
import { spawn, spawnSync } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { loadavg } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { kubectlPath } from '../src/cluster/local-cluster.ts';
import { execKubeconfig } from '../src/client/kubeconfig.ts';
import { writeTokenKubeconfig } from '../test/helpers/kube.ts';
import { median, percentile, spawnListening, table, withEnv } from './_common.ts';

const { values: flags, positionals } = parseArgs({ options: { 'baseline-plugin': { type: 'string' } }, allowPositionals: true });
const runs = Number(positionals[0] ?? 30);
const baselinePlugin = flags['baseline-plugin'];
const loadAtStart = loadavg().map((l) => l.toFixed(2)).join(' ');
const root = new URL('../', import.meta.url).pathname;

/**
 * The processes are started and timed by a small Go program, as kubectl (Go) starts the plugin: from
 * this Node process, whose heap is some hundred MB, every spawn would first pay for fork(2) copying
 * its page tables (7.6 ms from a 380 MB parent, 1.7 ms from a 50 MB one, for /bin/true; Go's
 * os/exec uses a vfork-style clone), and that, added to both sides, would make every ratio wrong.
 * Runs alternate between the variants; the first 3 rounds are not counted (they warm the page cache).
 */
const SPAWNER = `package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"time"
)

func main() {
	var spec struct {
		Rounds, Warmup int
		Variants       []struct {
			Name string
			Cmd  []string
			Env  []string
		}
	}
	if err := json.NewDecoder(os.Stdin).Decode(&spec); err != nil {
		panic(err)
	}
	out := map[string][]float64{}
	for i := 0; i < spec.Warmup+spec.Rounds; i++ {
		for _, v := range spec.Variants {
			c := exec.Command(v.Cmd[0], v.Cmd[1:]...)
			c.Env = v.Env
			var stdout, stderr bytes.Buffer
			c.Stdout, c.Stderr = &stdout, &stderr
			t0 := time.Now()
			err := c.Run()
			ms := float64(time.Since(t0).Nanoseconds()) / 1e6
			if err != nil {
				fmt.Fprintf(os.Stderr, "%s: %v: %s", v.Name, err, stderr.String())
				os.Exit(1)
			}
			if i >= spec.Warmup {
				out[v.Name] = append(out[v.Name], ms)
			}
		}
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
`;

/** Builds the spawner into `dir` (go build; Go is what builds the native plugin too). */
function buildSpawner(dir: string): string {
  mkdirSync(join(dir, 'spawner'));
  writeFileSync(join(dir, 'spawner', 'main.go'), SPAWNER);
  writeFileSync(join(dir, 'spawner', 'go.mod'), 'module spawner\n\ngo 1.26\n');
  const built = spawnSync('go', ['build', '-o', 'spawner', '.'], { cwd: join(dir, 'spawner'), env: { ...process.env, GOFLAGS: '-mod=mod', GOTOOLCHAIN: 'local' }, encoding: 'utf8' });
  if (built.status !== 0) throw new Error(`building the spawner: ${built.stderr}`);
  return join(dir, 'spawner', 'spawner');
}

type Variant = { name: string; cmd: string[]; env: NodeJS.ProcessEnv };

/** Each variant's wall times (ms), `rounds` of each, alternating, through the spawner; the event loop stays free meanwhile (the broker's stderr is read). */
function timeAll(spawner: string, variants: Variant[]): Promise<Record<string, number[]>> {
  const spec = {
    Rounds: runs,
    Warmup: 3,
    Variants: variants.map((v) => ({ Name: v.name, Cmd: v.cmd, Env: Object.entries(v.env).filter(([, x]) => x !== undefined).map(([k, x]) => `${k}=${x}`) })),
  };
  return new Promise((done, fail) => {
    const child = spawn(spawner, [], { stdio: ['pipe', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (err += d.toString()));
    child.once('exit', (code) => (code === 0 ? done(JSON.parse(out) as Record<string, number[]>) : fail(new Error(`spawner: ${err}`))));
    child.stdin.end(JSON.stringify(spec));
  });
}

await withEnv(async (env) => {
  const broker = await env.startBroker();
  const token = await env.agentToken('alpha');
  const start = await broker.request('POST', '/v1/tasks', token, { template: 'read-pods', namespace: 'team-a', name: 'bench', ttl: '1h' });
  if (start.status !== 201) throw new Error(JSON.stringify(start.body));
  const cred = await broker.request('POST', '/v1/tasks/bench/credential', token);
  const dir = join(env.dir, 'bench');
  mkdirSync(dir);
  const identityFile = join(dir, 'identity');
  writeFileSync(identityFile, token, { mode: 0o600 });
  const agentEnv: NodeJS.ProcessEnv = {
    PATH: process.env['PATH'],
    HOME: dir,
    BROKER_URL: broker.url,
    BROKER_IDENTITY_TOKEN_FILE: identityFile,
    KUBERNETES_EXEC_INFO: JSON.stringify({ apiVersion: 'client.authentication.k8s.io/v1', kind: 'ExecCredential', spec: { interactive: false } }),
  };

  // A stand-in broker: a bare fastify route answering the same number of bytes, at once.
  const standIn = await spawnListening(new URL('./bare-server.ts', import.meta.url).pathname, [String(cred.body.token.length)]);
  const standInEnv = { ...agentEnv, BROKER_URL: standIn.url };
  const spawner = buildSpawner(dir);
  const loggedBefore = serverTimes(broker.stderr).length;

  // 1. Start-up.
  const plugin = join(root, '.cache/bin/broker-credential');
  const t1 = await timeAll(spawner, [
    { name: 'node', cmd: [process.execPath, '-e', '0'], env: agentEnv },
    { name: 'launcher', cmd: [join(root, 'bin/broker'), 'credential', '--task', 'bench'], env: agentEnv },
    { name: 'entry', cmd: [process.execPath, join(root, 'dist/credential/main.cjs'), '--task', 'bench'], env: agentEnv },
    { name: 'native', cmd: [plugin, '--task', 'bench'], env: agentEnv },
    { name: 'standIn', cmd: [plugin, '--task', 'bench'], env: standInEnv },
    { name: 'help', cmd: [plugin, '--help'], env: agentEnv },
    ...(baselinePlugin ? [{ name: 'other', cmd: [baselinePlugin, '--task', 'bench'], env: agentEnv }] : []),
  ]);
  const times = (k: string): number[] => t1[k] ?? [];
  const [node, launcher, entry, native, nativeStandIn, help, other] = [times('node'), times('launcher'), times('entry'), times('native'), times('standIn'), times('help'), times('other')];
  standIn.child.kill('SIGKILL');
  await new Promise((done) => setTimeout(done, 200)); // the broker's last log lines
  // The broker's own time for each request of the runs above (its request log), warm-up rounds left out.
  const brokerMs = serverTimes(broker.stderr).slice(loggedBefore);
  const served = brokerMs.slice(3 * (3 + (baselinePlugin ? 1 : 0))); // 3 or 4 requests a round: launcher, Node, native (, baseline)

  // 2. kubectl through the exec entry vs the same token held directly.
  const execKc = join(dir, 'exec.kubeconfig');
  const caData = Buffer.from(env.cluster.caPem).toString('base64');
  writeFileSync(execKc, execKubeconfig({ task: 'bench', server: env.cluster.server, certificateAuthorityData: caData, broker: broker.url }), { mode: 0o600 });
  const tokenKc = writeTokenKubeconfig(join(dir, 'token.kubeconfig'), env.cluster, cred.body.token);
  const kubectlEnv = { ...agentEnv, KUBERNETES_EXEC_INFO: undefined };
  const nodeKc = join(dir, 'exec-node.kubeconfig');
  writeFileSync(nodeKc, execKubeconfig({ task: 'bench', server: env.cluster.server, certificateAuthorityData: caData, broker: broker.url, plugin: 'node' }), { mode: 0o600 });
  const kubectl = (kc: string) => [kubectlPath(), '--kubeconfig', kc, 'get', 'pods', '-n', 'team-a'];
  const t2 = await timeAll(spawner, [
    { name: 'direct', cmd: kubectl(tokenKc), env: kubectlEnv },
    { name: 'viaExec', cmd: kubectl(execKc), env: kubectlEnv },
    { name: 'viaNode', cmd: kubectl(nodeKc), env: kubectlEnv },
  ]);
  const [direct, viaExec, viaNode] = [t2['direct']!, t2['viaExec']!, t2['viaNode']!];

  const f = (ms: number) => `${ms.toFixed(1)} ms`;
  const row = (what: string, xs: number[], base: number[], goal?: number) => {
    const ratio = median(xs) / median(base);
    return [what, f(median(xs)), f(percentile(xs, 90)), `${ratio.toFixed(2)}x`, goal ? `<= ${goal}x ${ratio <= goal ? 'met' : 'NOT met'}` : ''];
  };
  console.log(`runs: ${runs} each, alternating; Node ${process.version}; load average at the start ${loadAtStart}, at the end ${loadavg().map((l) => l.toFixed(2)).join(' ')}\n`);
  console.log(
    table(
      ['what', 'p50', 'p90', 'vs baseline', 'goal'],
      [
        ['node -e 0 (baseline)', f(median(node)), f(percentile(node, 90)), '1.00x', ''],
        row('native plugin (as kubeconfigs run it when built)', native, node, 0.2),
        row('  the same against a stand-in broker (bare fastify route, same answer size)', nativeStandIn, node),
        row('  the same binary, --help (no request: process start-up, runtime and package init)', help, node),
        ...(baselinePlugin ? [row(`  baseline build ${baselinePlugin}`, other, node, 0.2)] : []),
        row('Node plugin, node dist/credential/main.cjs', entry, node, 1.3),
        row('broker credential (bin/broker sh launcher -> native)', launcher, node),
        ['kubectl get pods, token in kubeconfig (baseline)', f(median(direct)), f(percentile(direct, 90)), '1.00x', ''],
        row('kubectl get pods through the exec entry (native)', viaExec, direct, 1.25),
        row('kubectl get pods through the exec entry (Node)', viaNode, direct, 1.25),
      ],
    ),
  );
  console.log(
    `\nthe broker's own handling of a credential request (its request log: arrival to answer, the credential.served fdatasync included), over the runs above: p50 ${f(median(served))}, p90 ${f(percentile(served, 90))} (${served.length} requests)`,
  );
  await broker.stop();
});

/** The `ms` of each credential request in a broker's request log (JSON lines on its stderr). */
function serverTimes(stderr: string): number[] {
  const out: number[] = [];
  for (const line of stderr.split('\n')) {
    if (!line.startsWith('{')) continue;
    try {
      const o = JSON.parse(line) as { msg?: string; route?: string; ms?: number };
      if (o.msg === 'request' && o.route === '/v1/tasks/:ref/credential' && typeof o.ms === 'number') out.push(o.ms);
    } catch {
      // not a log line
    }
  }
  return out;
}
