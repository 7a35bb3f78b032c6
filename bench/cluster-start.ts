/**
 * Control plane cold start: LocalCluster.start() (key generation, process start, etcd, API server,
 * until /readyz answers 200) against a baseline measured in the same run: starting the kubectl binary
 * of the same build (`kubectl version --client`), i.e. what loading a Go binary of this size costs.
 *
 *   bin/bench cluster-start [RUNS=5]
 */
import { spawnSync } from 'node:child_process';
import { LocalCluster, kubectlPath } from '../src/cluster/local-cluster.ts';

const runs = Number(process.argv[2] ?? 5);
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

const baseline: number[] = [];
for (let i = 0; i < runs; i++) {
  const t0 = performance.now();
  spawnSync(kubectlPath(), ['version', '--client'], { stdio: 'ignore' });
  baseline.push(performance.now() - t0);
}

const starts: number[] = [];
for (let i = 0; i < runs; i++) {
  const t0 = performance.now();
  const cluster = await LocalCluster.start();
  starts.push(performance.now() - t0);
  await cluster.stop();
}

const fmt = (ms: number) => `${(ms / 1000).toFixed(2)} s`;
console.log(`runs: ${runs}`);
console.log(`baseline  kubectl version --client   median ${median(baseline).toFixed(0)} ms`);
console.log(`cluster   start to /readyz            median ${fmt(median(starts))}  min ${fmt(Math.min(...starts))}  max ${fmt(Math.max(...starts))}`);
console.log(`ratio     cluster start / baseline    ${(median(starts) / median(baseline)).toFixed(1)}x`);
console.log(`goal      <= 10 s: ${median(starts) <= 10_000 ? 'met' : 'NOT met'}`);
