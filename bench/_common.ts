/**
 * Shared pieces of the broker benchmarks: a BrokerEnv that is always torn down (also on failure and
 * on Ctrl-C), percentiles, and a plain-text table.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createRequire } from 'node:module';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { BrokerEnv, BrokerProcess } from '../test/helpers/broker.ts';

export { BrokerEnv };

/**
 * BrokerEnv starts brokers with the integration tests' fast sweeper timings (orphan sweep every 2 s,
 * 3 s Lease); benchmarks put back the defaults of `broker serve` (orphan sweep every 30 s, 15 s Lease),
 * so the figures are those of a broker as deployed. The expiry sweep stays at its default, 1 s.
 */
export const DEFAULT_TIMINGS = ['--sweep-interval', '1s', '--orphan-grace', '30s', '--lease-duration', '15s'];

/** Processes a benchmark spawned besides the brokers (killed with the environment). */
const children = new Set<ChildProcess>();

/** Runs `body` with a fresh environment (real control plane, policy applied) and stops it afterwards. */
export async function withEnv<T>(body: (env: BrokerEnv) => Promise<T>): Promise<T> {
  const env = await BrokerEnv.start();
  const onSignal = (sig: NodeJS.Signals) => {
    for (const c of children) c.kill('SIGKILL');
    for (const b of checkoutBrokers) b.kill('SIGKILL');
    void env.stop().finally(() => process.exit(sig === 'SIGINT' ? 130 : 143));
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  try {
    return await body(env);
  } finally {
    for (const c of children) c.kill('SIGKILL');
    for (const b of checkoutBrokers) b.kill('SIGKILL');
    await env.stop();
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
}

/** Brokers run from another checkout (startCheckoutBroker): killed with the environment. */
const checkoutBrokers = new Set<BrokerProcess>();

/**
 * `broker serve` of another checkout of the project (DIR/src/cli/main.ts: a `git worktree` or `git
 * archive` of an earlier commit, with a node_modules symlink), on the environment's cluster and policy,
 * as BrokerEnv.startBroker starts this tree's: the benchmarks' `--baseline-checkout DIR` compares the
 * two in the same run.
 */
export async function startCheckoutBroker(
  env: BrokerEnv,
  checkout: string,
  options: ({ auditLog: string; auditStore?: undefined } | { auditStore: string; auditLog?: undefined }) & { extraArgs?: string[]; shellPrefix?: string },
): Promise<BrokerProcess> {
  const audit = options.auditStore === undefined ? ['--audit-log', options.auditLog] : ['--audit-store', options.auditStore];
  const args = [
    ...[join(checkout, 'src/cli/main.ts'), 'serve', '--config', env.policyFile, ...audit, '--kubeconfig', env.brokerKubeconfig],
    ...['--listen', '127.0.0.1:0', '--insecure-http', '--sweep-interval', '1s', '--orphan-grace', '2s', '--lease-duration', '3s', ...(options.extraArgs ?? [])],
  ];
  const broker = await BrokerProcess.spawn(args, options.auditStore ?? options.auditLog, undefined, options.shellPrefix);
  checkoutBrokers.add(broker);
  return broker;
}

/** Spawns `node SCRIPT ...args` and resolves with its URL once it prints "listening on URL". */
export function spawnListening(script: string, args: string[], env?: NodeJS.ProcessEnv): Promise<{ url: string; child: ChildProcess }> {
  const child = spawn(process.execPath, [script, ...args], { stdio: ['ignore', 'pipe', 'inherit'], ...(env ? { env: { ...process.env, ...env } } : {}) });
  children.add(child);
  return new Promise((done, fail) => {
    let out = '';
    child.stdout!.on('data', (d: Buffer) => {
      out += d.toString();
      const m = /listening on (\S+)/.exec(out);
      if (m) done({ url: m[1]!, child });
    });
    child.once('exit', (code) => fail(new Error(`${script} exited with ${code} before listening`)));
  });
}

/** Milliseconds in a clock tick, the unit of /proc's CPU times. */
const TICK_MS = 1000 / (Number(spawnSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).stdout.trim()) || 100);

/** The fields of a /proc `stat` file after the command name: [0] the state, [1] the parent's pid, [11] utime, ... */
export function procStat(path: string): string[] {
  const stat = readFileSync(path, 'utf8');
  return stat.slice(stat.lastIndexOf(')') + 2).split(' ');
}

/** CPU time (user + system) a process (or one of its threads) has used so far, ms (/proc). */
export function cpuMs(pid: number, thread?: number): number {
  const fields = procStat(thread === undefined ? `/proc/${pid}/stat` : `/proc/${pid}/task/${thread}/stat`);
  return (Number(fields[11]) + Number(fields[12])) * TICK_MS;
}

/** CPU time (user + system) a process's children used that have ended and been reaped, ms (/proc cutime, cstime). */
export function reapedChildrenCpuMs(pid: number | 'self'): number {
  const fields = procStat(`/proc/${pid}/stat`);
  return (Number(fields[13]) + Number(fields[14])) * TICK_MS;
}

export function percentile(xs: readonly number[], p: number): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))]!;
}

export const median = (xs: readonly number[]) => percentile(xs, 50);

export function table(header: string[], rows: Array<Array<string | number>>): string {
  const cells = [header, ...rows.map((r) => r.map(String))];
  const widths = header.map((_, i) => Math.max(...cells.map((r) => (r[i] ?? '').length)));
  const line = (r: string[]) => r.map((c, i) => c.padEnd(widths[i]!)).join('  ').trimEnd();
  return [line(header), line(widths.map((w) => '-'.repeat(w))), ...cells.slice(1).map(line)].join('\n');
}

export const ms = (x: number, digits = 1) => `${x.toFixed(digits)} ms`;
export const met = (ok: boolean) => (ok ? 'met' : 'NOT met');

/** What autocannon reports of a run (the fields the benchmarks read). */
export interface CannonResult {
  requests: { average: number; total: number };
  latency: { p50: number; p99: number; average: number; max: number };
  '2xx': number;
  non2xx: number;
  errors: number;
  timeouts: number;
}
// autocannon is CommonJS and ships no type declarations: load it with require, typed here.
export const autocannon = createRequire(import.meta.url)('autocannon') as (opts: Record<string, unknown>) => Promise<CannonResult>;
