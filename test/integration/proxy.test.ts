/**
 * The Kubernetes API proxy (issue 13) against the real API server, with real kubectl through the exec
 * plugin in proxy mode and the broker as a separate process. The recording here is the gateway's
 * alone: the API server's audit webhook is off. The API server's own audit log (a file of the local
 * cluster) shows what reached it.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { connect } from 'node:tls';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import * as k8s from '@kubernetes/client-node';
import { decodeJwt, decodeProtectedHeader } from 'jose';
import { Agent, fetch as ufetch } from 'undici';
import { kubectlPath } from '../../src/cluster/local-cluster.ts';
import { BrokerEnv, type BrokerProcess } from '../helpers/broker.ts';
import { run, type RunResult } from '../helpers/kube.ts';
import { until } from '../helpers/wait.ts';

const BROKER = new URL('../../bin/broker', import.meta.url).pathname;
const ROOT = new URL('../..', import.meta.url).pathname;
const NODE_BIN = new URL('../../.node/node_modules/node/bin', import.meta.url).pathname;

const POLICY = `apiVersion: task-broker/v1alpha1
kind: Policy
broker:
  taskNamespace: task-broker
  serviceAccount: task-broker
  tokenTTL: 10m
  identityAudience: task-broker
agents:
  - name: alpha
    identities:
      - serviceAccount: agents/alpha
templates:
  - name: config-editor
    description: read and change ConfigMaps
    namespaces: [web]
    rules:
      - apiGroups: [""]
        resources: [configmaps]
        verbs: [get, list, watch, create, update, patch, delete]
      - apiGroups: [""]
        resources: [pods]
        verbs: [get, list]
    ttl: { default: 15m, max: 1h }
    agents: [alpha]
`;

type Rec = Record<string, any>;


/** One raw HTTP/1.1 exchange on a fresh TLS connection: what the proxy answers to bytes no client library would send. */
function rawExchange(url: string, ca: Buffer, request: string): Promise<string> {
  const u = new URL(url);
  return new Promise((resolve, reject) => {
    const socket = connect({ port: Number(u.port), host: u.hostname, ca });
    let out = '';
    socket.on('data', (d) => (out += d.toString('latin1')));
    socket.on('end', () => resolve(out));
    socket.on('error', reject);
    socket.setTimeout(10_000, () => {
      socket.destroy();
      resolve(out);
    });
    socket.write(request);
  });
}

describe('Kubernetes API proxy: the agent connects to the broker, the broker to the cluster', () => {
  let env: BrokerEnv;
  let broker: BrokerProcess;
  let proxyUrl: string;
  let agentEnv: NodeJS.ProcessEnv;
  let alphaToken: string;
  let ca: Buffer;
  let dispatcher: Agent;
  /** fetch trusting the cluster's CA (the broker serves with the API server's loopback certificate). */
  const pfetch = (url: string, init: { method?: string; headers?: Record<string, string>; body?: string } = {}) => ufetch(url, { ...init, dispatcher });
  /** A broker API call over TLS (BrokerProcess.request has no way to trust the CA). */
  const call = async (b: BrokerProcess, method: string, path: string, token?: string, body?: unknown) => {
    const res = await pfetch(b.url + path, {
      method,
      headers: { ...(token ? { authorization: `Bearer ${token}` } : {}), ...(body === undefined ? {} : { 'content-type': 'application/json' }) },
      ...(body === undefined ? {} : { body: JSON.stringify(body) }),
    });
    const text = await res.text();
    return { status: res.status, body: (text.startsWith('{') ? JSON.parse(text) : text) as any };
  };

  before(async () => {
    env = await BrokerEnv.start({ policyText: POLICY, namespaces: ['web', 'vault'] });
    // TLS: client-go sends no credentials to a plain-http server. The API server's loopback certificate serves.
    ca = readFileSync(env.cluster.caFile);
    dispatcher = new Agent({ connect: { ca } });
    broker = await env.startBroker({ tls: env.cluster.servingCert, extraArgs: ['--proxy-listen', '127.0.0.1:0'] });
    alphaToken = await env.agentToken('alpha');
    const cluster = await call(broker, 'GET', '/v1/cluster', alphaToken);
    assert.equal(cluster.status, 200);
    proxyUrl = cluster.body.proxy.server;
    assert.match(proxyUrl, /^https:\/\/127\.0\.0\.1:\d+$/);
    const home = join(env.dir, 'agent-home');
    mkdirSync(home);
    const identityFile = join(env.dir, 'alpha.token');
    writeFileSync(identityFile, alphaToken, { mode: 0o600 });
    agentEnv = { PATH: `${NODE_BIN}:${process.env['PATH']}`, HOME: home, BROKER_URL: broker.url, BROKER_IDENTITY_TOKEN_FILE: identityFile, BROKER_CA: env.cluster.caFile, NO_COLOR: '1' };
    await env.admin.core.createNamespacedConfigMap({ namespace: 'vault', body: { metadata: { name: 'root-key' }, data: { k: 'v' } } });
  });
  after(async () => {
    await broker?.stop();
    await env?.stop();
  });

  const cli = (args: string[]) => run(BROKER, args, agentEnv);
  const kubectl = (kc: string, args: string[], extraEnv: NodeJS.ProcessEnv = {}, input?: string): Promise<RunResult> =>
    run(kubectlPath(), ['--kubeconfig', kc, ...args], { ...agentEnv, ...extraEnv }, 60_000, input);
  const startTask = async (name: string) => {
    const res = await cli(['task', 'start', 'config-editor', '--namespace', 'web', '--name', name, '--reason', 'proxy test', '-o', 'json']);
    assert.equal(res.code, 0, res.stderr);
    return JSON.parse(res.stdout) as { id: string };
  };
  const kubeconfigFor = async (name: string, extra: string[] = []) => {
    const path = join(env.dir, `${name}.kubeconfig`);
    const res = await cli(['kubeconfig', '--task', name, '--output', path, '-n', 'web', ...extra]);
    assert.equal(res.code, 0, res.stderr);
    return path;
  };
  /** The session token the plugin hands kubectl, by running it as kubectl would. */
  const sessionToken = async (name: string) => {
    const res = await run(BROKER, ['credential', '--task', name, '--via', 'proxy'], agentEnv);
    assert.equal(res.code, 0, res.stderr);
    return JSON.parse(res.stdout).status.token as string;
  };
  const apiServerEvents = (): Rec[] =>
    readFileSync(env.cluster.auditLog, 'utf8')
      .split('\n')
      .filter(Boolean)
      .map((l) => JSON.parse(l) as Rec);
  const recordsOf = (task: string) => broker.auditRecords().filter((r) => r.task === task);

  test('the kubeconfig points at the proxy; the session token is refused by the API server; no task token reaches the agent', async () => {
    const task = await startTask('session-check');
    const kc = await kubeconfigFor('session-check');
    const text = readFileSync(kc, 'utf8');
    assert.ok(text.includes(`server: ${proxyUrl}`), text);
    assert.match(text, /- --via\n\s+- proxy/);
    assert.doesNotMatch(text, /token:/);

    const get = await kubectl(kc, ['get', 'configmaps']);
    assert.equal(get.code, 0, get.stderr);
    assert.match(get.stdout + get.stderr, /kube-root-ca\.crt|No resources found/);

    const plugin = await run(BROKER, ['credential', '--task', 'session-check', '--via', 'proxy'], agentEnv);
    assert.equal(plugin.code, 0, plugin.stderr);
    const token = JSON.parse(plugin.stdout).status.token as string;
    assert.equal(decodeProtectedHeader(token).typ, 'task-broker-session+jwt');
    const claims = decodeJwt(token);
    assert.equal(claims.iss, 'task-broker');
    assert.equal(claims.aud, proxyUrl);
    assert.equal(claims['task'], task.id);
    assert.ok(claims.exp! - claims.iat! <= 600);
    // No TokenRequest token (the API server's issuer, the task's ServiceAccount) anywhere the agent sees.
    const seen = plugin.stdout + plugin.stderr + get.stdout + get.stderr + JSON.stringify(agentEnv);
    for (const jwt of seen.match(/eyJ[\w-]+\.eyJ[\w-]+\.[\w-]+/g) ?? []) {
      assert.notEqual(decodeJwt(jwt).sub, `system:serviceaccount:task-broker:task-${task.id}`, 'a task token reached the agent');
      assert.ok(!String(decodeJwt(jwt).sub ?? '').includes(`task-${task.id}`));
    }
    // The session token straight to the API server: 401.
    const direct = await pfetch(`${env.cluster.server}/api/v1/namespaces/web/configmaps`, { headers: { authorization: `Bearer ${token}` } });
    assert.equal(direct.status, 401);
    assert.equal((await cli(['task', 'end', 'session-check'])).code, 0);
  });

  test('the three checks from the gateway alone: the command sequence in order, an out-of-scope delete denied and recorded, nothing between tasks', async () => {
    const task = await startTask('three-checks');
    const kc = await kubeconfigFor('three-checks');
    const steps: Array<[string[], number]> = [
      [['create', 'configmap', 'app-config', '--from-literal', 'mode=blue'], 0],
      [['get', 'configmap', 'app-config', '-o', 'jsonpath={.data.mode}'], 0],
      [['patch', 'configmap', 'app-config', '--type', 'merge', '-p', '{"data":{"mode":"green"}}'], 0],
      [['delete', 'configmap', 'root-key', '-n', 'vault'], 1],
    ];
    for (const [args, code] of steps) {
      const res = await kubectl(kc, args);
      assert.equal(res.code, code, `kubectl ${args.join(' ')}: ${res.stderr}`);
      if (code !== 0) assert.match(res.stderr, /Forbidden/);
    }
    const requests = recordsOf(task.id).filter((r) => r.type === 'k8s.request' && r.details?.via === 'proxy' && r.details?.resource === 'configmaps');
    const seq = requests.map((r) => `${r.details.verb} ${r.namespace}/${r.details.name ?? ''} ${r.outcome}`);
    assert.deepEqual(
      seq.filter((s) => !s.startsWith('list')),
      // kubectl patch reads the object first.
      ['create web/ allowed', 'get web/app-config allowed', 'get web/app-config allowed', 'patch web/app-config allowed', 'delete vault/root-key denied'],
      seq.join('\n'),
    );
    const denied = requests.at(-1)!;
    assert.equal(denied.details.code, 403);
    assert.match(denied.reason, /forbidden/i);
    assert.equal(denied.details.kubectlCommand, 'kubectl delete');
    assert.ok(denied.details.auditID, 'the API server\'s Audit-Id is recorded');
    assert.equal((await env.admin.core.readNamespacedConfigMap({ name: 'root-key', namespace: 'vault' })).data?.['k'], 'v');

    // What `audit show --task` prints: kubectl's commands, each with its requests, the denial visible.
    const show = await cli(['audit', 'show', '--task', task.id, broker.auditLog]);
    assert.equal(show.code, 0, show.stderr);
    assert.match(show.stdout, /\$ kubectl create configmap\n.*ALLOW create configmaps -n web/);
    assert.match(show.stdout, /\$ kubectl delete\n.*DENY delete configmaps\/root-key -n vault \(403: /);
    assert.match(show.stdout, /DENY delete configmaps\/root-key -n vault \(403/);

    // Between tasks: the same kubeconfig gets nothing through, and nothing reaches the API server.
    assert.equal((await cli(['task', 'end', 'three-checks'])).code, 0);
    const before = apiServerEvents().length;
    const after = await kubectl(kc, ['get', 'configmaps']);
    assert.notEqual(after.code, 0);
    assert.match(after.stderr, /no active task|has ended|not active/i);
    await sleep(1500);
    const reached = apiServerEvents()
      .slice(before)
      .filter((e) => String(e.user?.username ?? '').includes(`task-${task.id}`));
    assert.deepEqual(reached, [], 'no request of the ended task reached the API server');
  });

  test('task end: the next proxied request is refused within 100 ms, and it never reaches the API server', async () => {
    const task = await startTask('end-timing');
    const token = await sessionToken('end-timing');
    const get = () => pfetch(`${proxyUrl}/api/v1/namespaces/web/configmaps`, { headers: { authorization: `Bearer ${token}` } });
    assert.equal((await get()).status, 200);
    // A watch open at the time: cut when the task ends.
    const watch = await pfetch(`${proxyUrl}/api/v1/namespaces/web/configmaps?watch=1`, { headers: { authorization: `Bearer ${token}` } });
    assert.equal(watch.status, 200);
    const watchEnded = (async () => {
      for await (const _ of watch.body!) {
        // events until the cut
      }
      return performance.now();
    })();
    const end = await cli(['task', 'end', 'end-timing']);
    assert.equal(end.code, 0, end.stderr);
    const t0 = performance.now();
    const res = await get();
    const ms = performance.now() - t0;
    assert.equal(res.status, 401);
    assert.match(((await res.json()) as { message: string }).message, /not active/);
    assert.ok(ms < 100, `refused after ${ms.toFixed(1)} ms`);
    const cutMs = (await watchEnded) - t0;
    assert.ok(cutMs < 1000, `the open watch was cut ${cutMs.toFixed(0)} ms after the end`);
    const watchEnd = await until('the watch\'s end record', 5_000, async () => recordsOf(task.id).find((r) => r.details?.verb === 'watch' && r.details?.phase === 'end'));
    assert.match(watchEnd.reason ?? '', /has ended/);
    console.log(`# task end -> refused: the first request after \`task end\` answered 401 in ${ms.toFixed(1)} ms`);
    await sleep(1500);
    const after = apiServerEvents().filter((e) => String(e.user?.username ?? '').includes(`task-${task.id}`) && Date.parse(e.requestReceivedTimestamp) > Date.now() - 1400);
    assert.deepEqual(after, []);
  });

  test('smuggling refused and recorded: Impersonate-*, a second Authorization, path escapes, absolute URIs, CONNECT', async () => {
    const task = await startTask('smuggle');
    const token = await sessionToken('smuggle');
    const u = new URL(proxyUrl);
    const ask = (first: string, headers: string[] = []) =>
      rawExchange(proxyUrl, ca, `${first}\r\nHost: ${u.host}\r\nAuthorization: Bearer ${token}\r\n${headers.map((h) => `${h}\r\n`).join('')}Connection: close\r\n\r\n`);
    const cases: Array<[string, string, string[], RegExp]> = [
      ['impersonation', 'GET /api/v1/namespaces/vault/configmaps HTTP/1.1', ['Impersonate-User: system:admin'], /^HTTP\/1\.1 403/],
      ['impersonate group', 'GET /api/v1/namespaces/vault/configmaps HTTP/1.1', ['Impersonate-Group: system:masters'], /^HTTP\/1\.1 403/],
      ['front-proxy user header', 'GET /api/v1/namespaces/vault/configmaps HTTP/1.1', ['X-Remote-User: system:admin'], /^HTTP\/1\.1 403/],
      ['second Authorization', 'GET /api/v1/namespaces/vault/configmaps HTTP/1.1', ['Authorization: Bearer something-else'], /^HTTP\/1\.1 400/],
      ['encoded slash', 'GET /api/v1/namespaces/web/configmaps/..%2f..%2fvault HTTP/1.1', [], /^HTTP\/1\.1 400/],
      ['dot segments', 'GET /api/v1/namespaces/web/../vault/configmaps HTTP/1.1', [], /^HTTP\/1\.1 400/],
      ['absolute URI', `GET ${env.cluster.server}/api/v1/namespaces/vault/configmaps HTTP/1.1`, [], /^HTTP\/1\.1 400/],
      ['CONNECT', `CONNECT ${new URL(env.cluster.server).host} HTTP/1.1`, [], /^HTTP\/1\.1 405/],
    ];
    const before = apiServerEvents().length;
    for (const [what, first, headers, expected] of cases) {
      const answer = await ask(first, headers);
      assert.match(answer, expected, `${what}: ${answer.slice(0, 300)}`);
    }
    const refused = recordsOf(task.id).filter((r) => r.type === 'k8s.request' && r.details?.refused === true);
    assert.equal(refused.length, cases.length, JSON.stringify(refused, null, 1));
    assert.ok(refused.every((r) => r.outcome === 'denied'));
    assert.match(refused[0]!.reason, /Impersonate-User/);
    assert.match(refused[2]!.reason, /X-Remote-User/);
    assert.match(refused[3]!.reason, /more than one Authorization/);
    assert.match(refused[7]!.reason, /CONNECT/);
    await sleep(1000);
    const reached = apiServerEvents()
      .slice(before)
      .filter((e) => String(e.user?.username ?? '').includes(`task-${task.id}`));
    assert.deepEqual(reached, [], 'nothing refused reached the API server');
    const metrics = await (await pfetch(`${broker.url}/metrics`)).text();
    const refusedCount = Number(/broker_proxy_request_duration_seconds_count\{outcome="refused"\} (\d+)/.exec(metrics)?.[1]);
    assert.ok(refusedCount >= cases.length, metrics.split('\n').filter((l) => l.includes('proxy')).join('\n'));
    // Oversized headers: 431, and no task record needed to say so.
    const big = await ask('GET /api/v1/namespaces/web/configmaps HTTP/1.1', [`X-Padding: ${'a'.repeat(20_000)}`]);
    assert.match(big, /^HTTP\/1\.1 431/);
    assert.equal((await cli(['task', 'end', 'smuggle'])).code, 0);
  });

  test('kubectl get -w held open for 30 s with events streamed through; server-side apply; a paginated list', async () => {
    const task = await startTask('streams');
    const kc = await kubeconfigFor('streams');
    const { spawn } = await import('node:child_process');
    const watch = spawn(kubectlPath(), ['--kubeconfig', kc, 'get', 'configmaps', '-w', '--output-watch-events', '-o', 'name'], { env: agentEnv, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    watch.stdout.on('data', (d: Buffer) => (out += d.toString()));
    watch.stderr.on('data', (d: Buffer) => (err += d.toString()));
    try {
      await until('the watch to list', 20_000, async () => out.includes('configmap/'));
      const t0 = Date.now();
      let n = 0;
      while (Date.now() - t0 < 30_000) {
        const name = `tick-${n++}`;
        await env.admin.core.createNamespacedConfigMap({ namespace: 'web', body: { metadata: { name } } });
        await until(`the watch to show ${name}`, 5_000, async () => out.includes(`ADDED configmap/${name}`) || out.includes(`configmap/${name}`));
        await sleep(2_500);
      }
      assert.equal(watch.exitCode, null, `the watch ended early: ${err}`);
      assert.ok(n >= 10);
    } finally {
      watch.kill('SIGTERM');
    }
    const watchRecords = recordsOf(task.id).filter((r) => r.details?.verb === 'watch');
    await until('the watch\'s end record', 10_000, async () => recordsOf(task.id).some((r) => r.details?.verb === 'watch' && r.details?.phase === 'end'));
    assert.ok(watchRecords.some((r) => r.details.phase === 'start'));

    const manifest = join(env.dir, 'ssa.yaml');
    writeFileSync(manifest, 'apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ssa-config\n  namespace: web\ndata:\n  owner: agent\n');
    const apply = await kubectl(kc, ['apply', '--server-side', '--field-manager', 'agent', '-f', manifest]);
    assert.equal(apply.code, 0, apply.stderr);
    assert.match(apply.stdout, /serverside-applied/);
    const patchRecord = recordsOf(task.id).find((r) => r.details?.verb === 'patch' && r.details?.name === 'ssa-config');
    assert.ok(patchRecord, 'server-side apply recorded as a patch');

    const list = await kubectl(kc, ['get', 'configmaps', '--chunk-size', '3', '-o', 'name']);
    assert.equal(list.code, 0, list.stderr);
    assert.ok(list.stdout.split('\n').filter(Boolean).length >= 10);
    const pages = recordsOf(task.id).filter((r) => r.details?.verb === 'list' && /limit=3/.test(r.details.requestURI));
    assert.ok(pages.length >= 4, `${pages.length} pages recorded`);
    assert.equal((await cli(['task', 'end', 'streams'])).code, 0);
  });

  test('@kubernetes/client-node through the proxy with the session token', async () => {
    await startTask('client-node');
    const token = await sessionToken('client-node');
    const kc = new k8s.KubeConfig();
    kc.loadFromOptions({
      clusters: [{ name: 'proxy', server: proxyUrl, caData: ca.toString('base64'), skipTLSVerify: false }],
      users: [{ name: 'agent', token }],
      contexts: [{ name: 'proxy', cluster: 'proxy', user: 'agent' }],
      currentContext: 'proxy',
    });
    const core = kc.makeApiClient(k8s.CoreV1Api);
    const name = `from-client-${randomBytes(3).toString('hex')}`;
    await core.createNamespacedConfigMap({ namespace: 'web', body: { metadata: { name }, data: { a: '1' } } });
    const read = await core.readNamespacedConfigMap({ name, namespace: 'web' });
    assert.equal(read.data?.['a'], '1');
    await assert.rejects(core.listNamespacedConfigMap({ namespace: 'vault' }), (e: unknown) => (e as { code?: number }).code === 403);
    assert.equal((await cli(['task', 'end', 'client-node'])).code, 0);
  });

  test('audit log unwritable: 503, nothing forwarded', async () => {
    const auditLog = join(env.dir, 'doomed-audit.jsonl');
    const doomed = await env.startBroker({ auditLog, tls: env.cluster.servingCert, extraArgs: ['--proxy-listen', '127.0.0.1:0'] });
    try {
      const proxy = (await call(doomed, 'GET', '/v1/cluster', alphaToken)).body.proxy.server as string;
      const start = await call(doomed, 'POST', '/v1/tasks', alphaToken, { template: 'config-editor', namespace: 'web', name: 'doomed' });
      assert.equal(start.status, 201, JSON.stringify(start.body));
      const session = await call(doomed, 'POST', '/v1/tasks/doomed/credential?via=proxy', alphaToken);
      assert.equal(session.status, 200);
      const token = session.body.token as string;
      const get = () => pfetch(`${proxy}/api/v1/namespaces/web/configmaps/app-config`, { headers: { authorization: `Bearer ${token}` } });
      assert.notEqual((await get()).status, 503);
      rmSync(auditLog);
      await until('the broker to notice its log is gone', 5_000, async () => (await call(doomed, 'GET', '/readyz')).status === 503);
      const before = apiServerEvents().length;
      const res = await get();
      assert.equal(res.status, 503);
      assert.match(((await res.json()) as { message: string }).message, /cannot record/);
      await sleep(1500);
      const taskId = start.body.id as string;
      assert.deepEqual(
        apiServerEvents()
          .slice(before)
          .filter((e) => String(e.user?.username ?? '').includes(`task-${taskId}`)),
        [],
      );
    } finally {
      await doomed.stop('SIGKILL');
    }
  });

  test('broker.proxyOnly: only session tokens leave the broker; --via direct is refused and recorded; no start without --proxy-listen', async () => {
    const policyFile = join(env.dir, 'proxy-only.yaml');
    writeFileSync(policyFile, POLICY.replace('  identityAudience: task-broker\n', '  identityAudience: task-broker\n  proxyOnly: true\n'));
    const auditLog = join(env.dir, 'proxy-only-audit.jsonl');
    // Without its proxy the broker does not start, naming the flag.
    const refused = await run(process.execPath, [join(ROOT, 'src/cli/main.ts'), 'serve', '--config', policyFile, '--audit-log', auditLog, '--kubeconfig', env.brokerKubeconfig, '--listen', '127.0.0.1:0', '--insecure-http'], agentEnv);
    assert.equal(refused.code, 2, refused.stderr);
    assert.match(refused.stderr, /broker\.proxyOnly.*add --proxy-listen HOST:PORT/);
    const strict = await env.startBroker({ auditLog, tls: env.cluster.servingCert, extraArgs: ['--config', policyFile, '--proxy-listen', '127.0.0.1:0'] });
    try {
      const strictEnv = { ...agentEnv, BROKER_URL: strict.url };
      const started = await run(BROKER, ['task', 'start', 'config-editor', '--namespace', 'web', '--name', 'strict', '-o', 'json'], strictEnv);
      assert.equal(started.code, 0, started.stderr);
      const direct = await run(BROKER, ['credential', '--task', 'strict', '--via', 'direct'], strictEnv);
      assert.notEqual(direct.code, 0);
      assert.match(direct.stderr, /proxy session tokens only \(broker\.proxyOnly\)/);
      assert.doesNotMatch(direct.stdout, /token/);
      const session = await run(BROKER, ['credential', '--task', 'strict', '--via', 'proxy'], strictEnv);
      assert.equal(session.code, 0, session.stderr);
      const kc = join(env.dir, 'strict.kubeconfig');
      assert.equal((await run(BROKER, ['kubeconfig', '--task', 'strict', '-n', 'web', '--output', kc], strictEnv)).code, 0);
      const get = await kubectl(kc, ['get', 'configmaps', '-o', 'name'], { BROKER_URL: strict.url });
      assert.equal(get.code, 0, get.stderr);
      const records = strict.auditRecords();
      assert.ok(records.some((r) => r.type === 'credential.refused' && r.outcome === 'denied' && /proxyOnly/.test(r.reason)));
      assert.ok(!records.some((r) => r.type === 'credential.minted' && r.actor !== 'system:proxy'), 'only the proxy minted');
      assert.equal((await run(BROKER, ['task', 'end', 'strict'], strictEnv)).code, 0);
    } finally {
      await strict.stop();
    }
  });

  test('an agent over the proxy\'s request budget gets 429 with Retry-After, summarised in the log, not one record each', async () => {
    const auditLog = join(env.dir, 'budget-audit.jsonl');
    const tight = await env.startBroker({ auditLog, tls: env.cluster.servingCert, extraArgs: ['--proxy-listen', '127.0.0.1:0', '--proxy-rate-limit-agent', '5/10s', '--auth-failure-log-interval', '1s'] });
    try {
      const proxy = (await call(tight, 'GET', '/v1/cluster', alphaToken)).body.proxy.server as string;
      const started = await call(tight, 'POST', '/v1/tasks', alphaToken, { template: 'config-editor', namespace: 'web', name: 'budget' });
      assert.equal(started.status, 201);
      const token = (await call(tight, 'POST', '/v1/tasks/budget/credential?via=proxy', alphaToken)).body.token as string;
      const statuses: number[] = [];
      let retryAfter: string | null = null;
      for (let i = 0; i < 8; i++) {
        const res = await pfetch(`${proxy}/api/v1/namespaces/web/configmaps`, { headers: { authorization: `Bearer ${token}` } });
        await res.text();
        statuses.push(res.status);
        if (res.status === 429) retryAfter = res.headers.get('retry-after');
      }
      assert.deepEqual(statuses, [200, 200, 200, 200, 200, 429, 429, 429]);
      assert.ok(Number(retryAfter) >= 1 && Number(retryAfter) <= 10, `Retry-After ${retryAfter}`);
      const summary = await until('the throttling summary', 5_000, async () => tight.auditRecords().find((r) => r.type === 'request.throttled' && r.agent === 'alpha'));
      assert.equal(summary.details.count, 3);
      assert.equal(tight.auditRecords().filter((r) => r.type === 'k8s.request' && r.task === started.body.id).length, 5, 'one record per forwarded request, none per refusal');
      await call(tight, 'DELETE', '/v1/tasks/budget', alphaToken);
    } finally {
      await tight.stop();
    }
  });

  test('broker run goes through the proxy too: the command\'s kubectl is recorded at the gateway, and its task is ended after it', async () => {
    await env.admin.core.createNamespacedConfigMap({ namespace: 'web', body: { metadata: { name: 'run-target' } } });
    const res = await run(BROKER, ['run', 'config-editor', '--namespace', 'web', '--name', 'one-off', '--', kubectlPath(), 'get', 'configmap', 'run-target', '-n', 'web', '-o', 'name'], agentEnv);
    assert.equal(res.code, 0, res.stderr);
    assert.equal(res.stdout, 'configmap/run-target\n');
    const started = broker.auditRecords().find((r) => r.type === 'task.started' && r.taskName === 'one-off');
    assert.ok(started);
    const via = recordsOf(started.task).filter((r) => r.type === 'k8s.request' && r.details?.name === 'run-target');
    assert.equal(via.length, 1);
    assert.equal(via[0]!.details.via, 'proxy');
    assert.ok(recordsOf(started.task).some((r) => r.type === 'task.ended'));
  });
});
