/**
 * `start_task` through `broker mcp` (issue 15) against `broker task start` for the same template, in
 * the same run, trials alternating, on a real API server and a real broker process (TLS, with its
 * Kubernetes API proxy, so start_task writes the proxy kubeconfig as deployed):
 *
 * - mcp: a `tools/call start_task` on a `broker mcp` that is already running (an MCP client starts it
 *   once per session), timed from the SDK client's call to its answer: validation, the broker's
 *   POST /v1/tasks, the kubeconfig written (0600, atomically), stdio both ways.
 * - cli: `bin/broker task start read-pods --namespace team-a --reason ... -o json`, the whole process,
 *   as an agent with a shell runs it.
 * - api: POST /v1/tasks from this process with the CLI's own BrokerClient (the floor both share).
 * - mcp cold: spawn `bin/broker mcp`, initialize, call start_task (what the first call of a session
 *   costs, start-up included).
 *
 * Each start is followed by an untimed end (DELETE). Goal: mcp p50 <= 1.2x cli p50.
 *
 *   bin/bench mcp [N=20]
 */
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { loadavg } from 'node:os';
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StdioClientTransport } from '@modelcontextprotocol/sdk/client/stdio.js';
import { BrokerClient } from '../src/client/broker-client.ts';
import { run } from '../test/helpers/kube.ts';
import { DEFAULT_TIMINGS, median, met, ms, percentile, table, withEnv } from './_common.ts';

const N = Number(process.argv[2] ?? 20);
const WARMUP = 3;
const ROOT = new URL('..', import.meta.url).pathname;
const BROKER = join(ROOT, 'bin/broker');
const NODE_BIN = join(ROOT, '.node/node_modules/node/bin');
const START = { template: 'read-pods', namespace: 'team-a', reason: 'benchmark' };

const loadAtStart = loadavg().map((l) => l.toFixed(2)).join(' ');

await withEnv(async (env) => {
  const broker = await env.startBroker({ tls: env.cluster.servingCert, extraArgs: [...DEFAULT_TIMINGS, '--proxy-listen', '127.0.0.1:0'] });
  const home = join(env.dir, 'agent-home');
  mkdirSync(home);
  const agentEnv: Record<string, string> = {
    PATH: `${NODE_BIN}:${process.env['PATH']}`,
    HOME: home,
    NO_COLOR: '1',
    BROKER_URL: broker.url,
    BROKER_CA: env.cluster.caFile,
    BROKER_IDENTITY_TOKEN: await env.agentToken('alpha'),
  };
  const api = new BrokerClient({ env: agentEnv });
  const connect = async () => {
    const client = new Client({ name: 'bench', version: '1.0.0' });
    await client.connect(new StdioClientTransport({ command: BROKER, args: ['mcp'], env: agentEnv, stderr: 'inherit' }));
    return client;
  };
  const mcp = await connect();
  const startMcp = async (client: Client) => {
    const res = await client.callTool({ name: 'start_task', arguments: START });
    if (res.isError) throw new Error(`start_task: ${JSON.stringify(res.content)}`);
  };
  const startCli = async () => {
    const res = await run(BROKER, ['task', 'start', START.template, '--namespace', START.namespace, '--reason', START.reason, '-o', 'json'], agentEnv);
    if (res.code !== 0) throw new Error(`broker task start: ${res.stderr}`);
  };
  const startApi = () => api.startTask(START);
  const end = () => api.endTask(START.template);
  const timed = async (body: () => Promise<unknown>) => {
    const t0 = performance.now();
    await body();
    const took = performance.now() - t0;
    await end();
    return took;
  };

  const times = { mcp: [] as number[], cli: [] as number[], api: [] as number[], cold: [] as number[] };
  for (let i = 0; i < WARMUP + N; i++) {
    // The order rotates each round, so none always follows another.
    const trials: Array<[keyof typeof times, () => Promise<number>]> = [
      ['mcp', () => timed(() => startMcp(mcp))],
      ['cli', () => timed(startCli)],
      ['api', () => timed(startApi)],
      [
        'cold',
        async () => {
          let client: Client | undefined;
          const took = await timed(async () => {
            client = await connect();
            await startMcp(client);
          });
          await client?.close();
          return took;
        },
      ],
    ];
    for (let k = 0; k < trials.length; k++) {
      const [name, trial] = trials[(i + k) % trials.length]!;
      const took = await trial();
      if (i >= WARMUP) times[name].push(took);
    }
  }
  await mcp.close();
  await api.close();

  const row = (what: string, xs: number[]) => [what, ms(median(xs)), ms(percentile(xs, 90)), `${(median(xs) / median(times.cli)).toFixed(2)}x`];
  const ratio = median(times.mcp) / median(times.cli);
  console.log(`start_task through broker mcp vs broker task start, N=${N} each (after ${WARMUP} warm-up rounds), alternating; template ${START.template} in ${START.namespace}, TLS broker with its proxy, loopback; load average at the start ${loadAtStart}, at the end ${loadavg().map((l) => l.toFixed(2)).join(' ')}`);
  console.log(
    table(
      ['what', 'p50', 'p90', 'vs cli p50'],
      [
        row('mcp: tools/call start_task, broker mcp running', times.mcp),
        row('cli: bin/broker task start (whole process)', times.cli),
        row('api: POST /v1/tasks in-process (BrokerClient)', times.api),
        row('mcp cold: spawn broker mcp + initialize + start_task', times.cold),
      ],
    ),
  );
  console.log(`ratio mcp/cli p50: ${ratio.toFixed(2)}x (goal <= 1.2x: ${met(ratio <= 1.2)}); mcp over the api floor: +${ms(median(times.mcp) - median(times.api))} p50`);
});
