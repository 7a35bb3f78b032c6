/**
 * The network boundary of proxy mode (issue 13): the agent runs on a host of its own, a network
 * namespace joined to this one by a veth pair, from which the broker (its API and its Kubernetes API
 * proxy) is reachable and nothing else. From there, kubectl through the proxy works and is recorded;
 * kubectl with any credential the agent can get (even a task's own TokenRequest token, asked for with
 * `--via direct`) cannot open a connection to the API server. docs/proxy.md shows the same boundary
 * for a real cluster (NetworkPolicy, firewall).
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { kubectlPath } from '../../src/cluster/local-cluster.ts';
import { BrokerEnv, type BrokerProcess } from '../helpers/broker.ts';
import { run, type RunResult } from '../helpers/kube.ts';
import { canMakeNetns, makeNetnsHost, netnsExists, type NetnsHost } from '../helpers/netns.ts';

const ROOT = new URL('../..', import.meta.url).pathname;
const BROKER = join(ROOT, 'bin/broker');

const POLICY = `apiVersion: task-broker/v1alpha1
kind: Policy
broker:
  taskNamespace: task-broker
  tokenTTL: 10m
  identityAudience: task-broker
agents:
  - name: alpha
    identities: [{ serviceAccount: agents/alpha }]
templates:
  - name: config-editor
    namespaces: [web]
    rules:
      - { apiGroups: [""], resources: [configmaps], verbs: [get, list, create] }
    ttl: { default: 15m, max: 1h }
    agents: [alpha]
`;

type Rec = Record<string, any>;

describe('proxy mode behind a network boundary: the agent\'s host reaches the broker and nothing else', () => {
  let host: NetnsHost | undefined;
  let env: BrokerEnv;
  let broker: BrokerProcess;
  let agentEnv: NodeJS.ProcessEnv;
  let cert: string;

  before(async () => {
    assert.ok(canMakeNetns(), 'this test makes a network namespace: it needs root and iproute2 (ip)');
    host = makeNetnsHost();
    env = await BrokerEnv.start({ policyText: POLICY });
    // The broker's certificate names the address the agent reaches it at.
    cert = join(env.dir, 'broker.crt');
    const key = join(env.dir, 'broker.key');
    const made = await run('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-days', '1',
      '-subj', '/CN=task-broker', '-addext', `subjectAltName=IP:${host.hostAddress}`, '-keyout', key, '-out', cert]);
    assert.equal(made.code, 0, made.stderr);
    broker = await env.startBroker({ listen: `${host.hostAddress}:0`, tls: { cert, key }, extraArgs: ['--proxy-listen', `${host.hostAddress}:0`] });
    agentEnv = {
      PATH: `${join(ROOT, '.node/node_modules/node/bin')}:${process.env['PATH']}`,
      HOME: env.dir,
      NO_COLOR: '1',
      BROKER_URL: broker.url,
      BROKER_CA: cert,
      BROKER_IDENTITY_TOKEN: await env.agentToken('alpha'),
    };
  });
  after(async () => {
    await broker?.stop();
    await env?.stop();
    const name = host?.name;
    host?.remove();
    if (name) assert.equal(netnsExists(name), false, 'the namespace is removed');
  });

  /** A command on the agent's host (inside the namespace). */
  const onAgentHost = (cmd: string, args: string[], timeoutMs = 60_000): Promise<RunResult> => run('ip', ['netns', 'exec', host!.name, cmd, ...args], agentEnv, timeoutMs);

  test('through the proxy everything works and is recorded; the API server cannot be reached with any credential', async () => {
    const start = await onAgentHost(BROKER, ['task', 'start', 'config-editor', '--namespace', 'web', '--name', 'fenced', '-o', 'json']);
    assert.equal(start.code, 0, start.stderr);
    const taskId = (JSON.parse(start.stdout) as { id: string }).id;
    const kc = join(env.dir, 'fenced.kubeconfig');
    const made = await onAgentHost(BROKER, ['kubeconfig', '--task', 'fenced', '-n', 'web', '--output', kc]);
    assert.equal(made.code, 0, made.stderr);
    assert.match(readFileSync(kc, 'utf8'), new RegExp(`server: https://${host!.hostAddress.replaceAll('.', '\\.')}:\\d+`));

    const create = await onAgentHost(kubectlPath(), ['--kubeconfig', kc, 'create', 'configmap', 'fenced-config', '--from-literal', 'a=1']);
    assert.equal(create.code, 0, create.stderr);
    const get = await onAgentHost(kubectlPath(), ['--kubeconfig', kc, 'get', 'configmap', 'fenced-config', '-o', 'jsonpath={.data.a}']);
    assert.equal(get.code, 0, get.stderr);
    assert.equal(get.stdout, '1');
    const recorded = broker.auditRecords().filter((r: Rec) => r.task === taskId && r.type === 'k8s.request' && r.details?.name === 'fenced-config');
    assert.ok(recorded.length >= 1, 'the requests are recorded at the gateway');
    assert.deepEqual(recorded[0]!.details.sourceIPs, [host!.address], 'from the agent\'s host');

    // Every credential the agent can get: the session token, and the task's own token (--via direct).
    const session = JSON.parse((await onAgentHost(BROKER, ['credential', '--task', 'fenced', '--via', 'proxy'])).stdout).status.token as string;
    const direct = await onAgentHost(BROKER, ['credential', '--task', 'fenced', '--via', 'direct']);
    assert.equal(direct.code, 0, direct.stderr);
    const taskToken = JSON.parse(direct.stdout).status.token as string;
    const apiPort = new URL(env.cluster.server).port;
    for (const server of [`https://127.0.0.1:${apiPort}`, `https://${host!.hostAddress}:${apiPort}`]) {
      for (const token of [taskToken, session]) {
        const res = await onAgentHost(kubectlPath(), ['--server', server, '--token', token, '--insecure-skip-tls-verify', '--request-timeout', '5s', 'get', 'configmaps', '-n', 'web'], 30_000);
        assert.notEqual(res.code, 0, `reached ${server}`);
        assert.match(res.stderr, /connection refused|unreachable|timeout|i\/o timeout/i, res.stderr);
      }
    }
    // The same task token works from the broker's side of the boundary: only the network keeps it out.
    const fromHost = await run(kubectlPath(), ['--server', env.cluster.server, '--token', taskToken, '--certificate-authority', env.cluster.caFile, 'get', 'configmap', 'fenced-config', '-n', 'web', '-o', 'name'], agentEnv);
    assert.equal(fromHost.code, 0, fromHost.stderr);
    assert.equal((await onAgentHost(BROKER, ['task', 'end', 'fenced'])).code, 0);
  });
});
