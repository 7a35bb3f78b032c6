/**
 * `broker mcp` (issue 15) as an MCP client sees it: the SDK's own Client over stdio spawns
 * `bin/broker mcp` with the agent's identity in its environment, against a real broker (TLS, with its
 * Kubernetes API proxy) and a real API server; an approver (another identity) runs `broker approve`.
 * Then `kubernetes-mcp-server` (0.0.67, the binary of its npm linux-amd64 package), driven by the same SDK client, uses the
 * kubeconfig start_task wrote: allowed in the task's scope, refused by the cluster outside it (and
 * recorded at the gateway), refused altogether once the task has ended.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StdioClientTransport } from '@modelcontextprotocol/sdk/client/stdio.js';
import type { CallToolResult, Progress } from '@modelcontextprotocol/sdk/types.js';
import { Agent, fetch as ufetch } from 'undici';
import { errorCodeOf } from '../../src/mcp/errors.ts';
import { BrokerEnv, type BrokerProcess } from '../helpers/broker.ts';
import { run } from '../helpers/kube.ts';

const ROOT = new URL('../..', import.meta.url).pathname;
const BROKER = join(ROOT, 'bin/broker');
const NODE_BIN = join(ROOT, '.node/node_modules/node/bin');
const KUBERNETES_MCP_SERVER = join(ROOT, 'node_modules/kubernetes-mcp-server-linux-amd64/bin/kubernetes-mcp-server-linux-amd64');
const JWT = /eyJ[\w-]{8,}\.eyJ[\w-]{8,}\.[\w-]{8,}/;

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
  - name: read-pods
    description: list and get the pods of web
    namespaces: [web]
    rules:
      - { apiGroups: [""], resources: [pods], verbs: [get, list] }
    ttl: { default: 15m, max: 1h }
    agents: [alpha]
  - name: exec-web
    description: run commands in the pods of web
    namespaces: [web]
    rules:
      - { apiGroups: [""], resources: [pods], verbs: [get, list] }
      - { apiGroups: [""], resources: [pods/exec], verbs: [create] }
    ttl: { default: 10m, max: 30m }
    agents: [alpha]
    approval: { approvers: [sre], required: 1 }
approvers:
  - name: sre
    members:
      - serviceAccount: approvers/alice
`;

type Rec = Record<string, any>;
type Result = CallToolResult & { structuredContent?: Rec };

const text = (r: CallToolResult) => r.content.map((c) => (c.type === 'text' ? c.text : '')).join('\n');

/** Every regular file under `dir`, recursively. */
function filesUnder(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    const path = join(dir, e.name);
    return e.isDirectory() ? filesUnder(path) : e.isFile() ? [path] : [];
  });
}

describe('broker mcp: an LLM agent asks for access in its own language, over MCP', () => {
  let env: BrokerEnv;
  let broker: BrokerProcess;
  let proxyUrl: string;
  let agentEnv: Record<string, string>;
  let approverEnv: NodeJS.ProcessEnv;
  let home: string;
  let tmp: string;
  let mcp: Client;
  let mcpStderr = '';
  const clients: Client[] = [];

  before(async () => {
    env = await BrokerEnv.start({ policyText: POLICY, namespaces: ['web', 'other'] });
    broker = await env.startBroker({ tls: env.cluster.servingCert, extraArgs: ['--proxy-listen', '127.0.0.1:0'] });
    const dispatcher = new Agent({ connect: { ca: readFileSync(env.cluster.caFile) } });
    const alphaToken = await env.agentToken('alpha');
    const cluster = (await (await ufetch(`${broker.url}/v1/cluster`, { dispatcher, headers: { authorization: `Bearer ${alphaToken}` } })).json()) as { proxy: { server: string } };
    proxyUrl = cluster.proxy.server;
    await dispatcher.close();
    home = join(env.dir, 'agent-home');
    tmp = join(env.dir, 'agent-tmp');
    mkdirSync(home);
    mkdirSync(tmp);
    // The identity lives in the environment only: nothing of it on disk.
    agentEnv = { PATH: `${NODE_BIN}:${process.env['PATH']}`, HOME: home, TMPDIR: tmp, NO_COLOR: '1', BROKER_URL: broker.url, BROKER_CA: env.cluster.caFile, BROKER_IDENTITY_TOKEN: alphaToken };
    approverEnv = { ...agentEnv, BROKER_IDENTITY_TOKEN: await env.agentToken('alice', 'approvers') };
    // Pods to list (the API server alone: they stay Pending, which is enough to be listed).
    for (const ns of ['web', 'other']) {
      await env.admin.core.createNamespacedPod({ namespace: ns, body: { metadata: { name: `${ns}-1` }, spec: { containers: [{ name: 'c', image: 'busybox' }] } } });
    }
    mcp = await connect(BROKER, ['mcp'], (s) => (mcpStderr += s));
  });

  after(async () => {
    for (const c of clients) await c.close().catch(() => undefined);
    await broker?.stop();
    await env?.stop();
  });

  /** An SDK client over stdio to `command` (killed by the transport on close). */
  async function connect(command: string, args: string[], onStderr: (s: string) => void): Promise<Client> {
    const transport = new StdioClientTransport({ command, args, env: agentEnv, stderr: 'pipe' });
    transport.stderr?.on('data', (d: Buffer) => onStderr(d.toString()));
    const client = new Client({ name: 'mcp-test', version: '1.0.0' });
    await client.connect(transport);
    clients.push(client);
    return client;
  }
  const call = (name: string, args: Rec = {}) => mcp.callTool({ name, arguments: args }) as Promise<Result>;
  const records = () => broker.auditRecords();

  test('the tools, each with an input schema, an output schema and honest annotations', async () => {
    const { tools } = await mcp.listTools();
    assert.deepEqual(tools.map((t) => t.name).sort(), ['end_task', 'list_tasks', 'list_templates', 'start_task', 'task_status']);
    for (const t of tools) {
      assert.equal(t.inputSchema.type, 'object', t.name);
      assert.equal(t.outputSchema?.type, 'object', t.name);
      assert.equal(typeof t.annotations?.readOnlyHint, 'boolean', t.name);
      assert.equal(typeof t.annotations?.destructiveHint, 'boolean', t.name);
      assert.equal(typeof t.annotations?.idempotentHint, 'boolean', t.name);
    }
    const by = Object.fromEntries(tools.map((t) => [t.name, t.annotations!]));
    for (const ro of ['list_templates', 'task_status', 'list_tasks']) assert.equal(by[ro]!.readOnlyHint, true, ro);
    assert.deepEqual([by['start_task']!.readOnlyHint, by['start_task']!.destructiveHint, by['start_task']!.idempotentHint], [false, false, false]);
    assert.deepEqual([by['end_task']!.readOnlyHint, by['end_task']!.destructiveHint], [false, true]);
    assert.deepEqual(tools.find((t) => t.name === 'start_task')!.inputSchema.required, ['template', 'namespace', 'reason']);
  });

  test('list_templates: what the agent may ask for, the gated one with who approves', async () => {
    const res = await call('list_templates');
    assert.ok(!res.isError, text(res));
    const templates = res.structuredContent!['templates'] as Rec[];
    assert.deepEqual(
      templates.map((t) => [t['name'], t['namespaces'], t['ttl'].default, t['ttl'].max, t['gated']]),
      [
        ['read-pods', ['web'], '15m', '1h', false],
        ['exec-web', ['web'], '10m', '30m', true],
      ],
    );
    assert.deepEqual(templates[1]!['approval'], { approvers: ['sre'], required: 1 });
    assert.match(text(res), /exec-web: .*gated \(create pods\/exec\): needs 1 approval\(s\) from sre/);
  });

  test('bad arguments are tool errors naming the argument, and nothing is started', async () => {
    const before = records().length;
    const cases: Array<[Rec, string, string, RegExp]> = [
      [{ template: 'read-podz', namespace: 'web', reason: 'r' }, 'unknown_template', 'template', /did you mean "read-pods"\?/],
      [{ template: 'read-pods', namespace: 'kube-system', reason: 'r' }, 'namespace_not_allowed', 'namespace', /web/],
      [{ template: 'read-pods', namespace: 'web', reason: 'r', ttl: '5h' }, 'ttl_out_of_range', 'ttl', /1h/],
      [{ template: 'read-pods', namespace: 'web', reason: 'r', ttl: 'forever' }, 'invalid_argument', 'ttl', /not a duration/],
      [{ template: 'read-pods', namespace: 'web', reason: 'look\u001b]0;pwned\u0007' }, 'invalid_argument', 'reason', /control or bidirectional-override characters \(found U\+001B at position 4\)/],
      [{ template: 'read-pods', namespace: 'we\u202eb', reason: 'r' }, 'invalid_argument', 'namespace', /U\+202E/],
      [{ template: 'read-pods', namespace: 'web' }, 'invalid_argument', 'reason', /"reason" is required/],
      [{ template: 'read-pods', namespace: 'web', reason: 'r', namespaces: ['web'] }, 'invalid_argument', 'namespaces', /takes no argument "namespaces"[^]*next: call start_task again without "namespaces"/],
      [{ template: 'read-pods', namespace: 'web', reason: 'r', wait: 'yes' }, 'invalid_argument', 'wait', /"wait" must be boolean/],
    ];
    for (const [args, code, argument, message] of cases) {
      const res = await call('start_task', args);
      const t = text(res);
      assert.equal(res.isError, true, t);
      assert.equal(errorCodeOf(res), code, t);
      assert.match(t, new RegExp(`^argument: ${argument}$`, 'm'), t);
      assert.match(t, message);
      assert.match(t, /^next: /m, t);
      assert.doesNotMatch(t, /\n\s+at |\.ts:\d+|node:internal/, 'no stack trace');
      assert.doesNotMatch(t, /[\u0000-\u0009\u000b-\u001f\u007f-\u009f\u202a-\u202e]/, 'no control character comes back');
      assert.equal(res.structuredContent, undefined);
    }
    // Nothing started: no task objects in the cluster, no task for the agent, no task.started recorded.
    assert.deepEqual(await env.taskObjects(), { secrets: [], serviceAccounts: [], roleBindings: [] });
    assert.deepEqual((await call('list_tasks')).structuredContent, { tasks: [] });
    assert.deepEqual(records().slice(before).filter((r) => r.type === 'task.started'), []);
  });

  test('start, status, list, and kubernetes-mcp-server on the task kubeconfig: allowed in scope, denied outside (recorded), refused after end_task', async () => {
    // As docs/mcp.md sets it up: the kubeconfig written once beforehand, kubernetes-mcp-server started
    // with the session, before any task: refused until the task starts.
    const path = join(home, '.kube/task-broker/read-pods.kubeconfig');
    mkdirSync(join(home, '.kube/task-broker'), { recursive: true, mode: 0o700 });
    const written = await run(BROKER, ['kubeconfig', '--task', 'read-pods', '--output', path], agentEnv);
    assert.equal(written.code, 0, written.stderr);
    let kmsStderr = '';
    const kms = await connect(KUBERNETES_MCP_SERVER, ['--kubeconfig', path, '--log-file', 'stderr', '--disable-multi-cluster'], (s) => (kmsStderr += s));
    const kmsTools = (await kms.listTools()).tools.map((t) => t.name);
    assert.ok(kmsTools.includes('pods_list_in_namespace'), kmsTools.join(' '));
    const list = (ns: string) => kms.callTool({ name: 'pods_list_in_namespace', arguments: { namespace: ns } }) as Promise<Result>;
    const beforeTask = await list('web');
    assert.equal(beforeTask.isError, true, text(beforeTask));
    assert.match(text(beforeTask), /getting credentials: exec: executable \S+ failed/); // the plugin refused: no active task

    const started = await call('start_task', { template: 'read-pods', namespace: 'web', ttl: '20m', reason: 'why are the web pods pending?' });
    assert.ok(!started.isError, text(started));
    const { task, kubeconfig, usage } = started.structuredContent as { task: Rec; kubeconfig: Rec; usage: string };
    assert.equal(task['name'], 'read-pods');
    assert.equal(task['namespace'], 'web');
    assert.equal(task['agent'], 'alpha');
    assert.equal(task['reason'], 'why are the web pods pending?');
    assert.ok(Math.abs(Date.parse(task['expiresAt']) - Date.parse(task['createdAt']) - 20 * 60_000) < 2000);
    // The kubeconfig: ~/.kube/task-broker/NAME.kubeconfig, 0600 in a 0700 directory, through the proxy, no secret.
    assert.equal(kubeconfig['path'], join(home, '.kube/task-broker/read-pods.kubeconfig'));
    assert.deepEqual([kubeconfig['via'], kubeconfig['server'], kubeconfig['namespace'], kubeconfig['context']], ['proxy', proxyUrl, 'web', 'task-broker-read-pods']);
    assert.equal(statSync(kubeconfig['path']).mode & 0o777, 0o600);
    assert.equal(statSync(join(home, '.kube/task-broker')).mode & 0o777, 0o700);
    const kc = readFileSync(kubeconfig['path'], 'utf8');
    assert.match(kc, /- --via\n\s+- proxy/);
    assert.match(kc, new RegExp(`server: ${proxyUrl}`));
    assert.doesNotMatch(kc, /token/i);
    assert.doesNotMatch(kc, JWT);
    assert.match(usage, /end_task/);
    assert.equal((await env.taskObjects()).roleBindings.length, 1);
    assert.ok(records().some((r) => r.type === 'task.started' && r.task === task['id'] && r.agent === 'alpha'));

    const status = await call('task_status', { task: 'read-pods' });
    assert.ok(!status.isError, text(status));
    assert.equal(status.structuredContent!['task'].id, task['id']);
    assert.equal(status.structuredContent!['task'].state, 'active');
    assert.equal(status.structuredContent!['kubeconfig'], kubeconfig['path']);
    const listed = await call('list_tasks');
    assert.deepEqual((listed.structuredContent!['tasks'] as Rec[]).map((t) => t['id']), [task['id']]);
    const again = await call('start_task', { template: 'read-pods', namespace: 'web', reason: 'again' });
    assert.equal(errorCodeOf(again), 'task_exists', text(again));
    assert.match(text(again), /^argument: name$/m);
    assert.match(text(again), /^task_exists: agent "alpha" already has an active task "read-pods"$/m);
    assert.match(text(again), /end_task/);
    assert.doesNotMatch(text(again), /broker task end/, 'the next step is a tool, not a command line');

    // kubernetes-mcp-server, running since before the task, on the file start_task has just rewritten.
    assert.equal(kubeconfig['path'], path);
    const inScope = await list('web');
    assert.ok(!inScope.isError, `${text(inScope)}\n${kmsStderr}`);
    assert.match(text(inScope), /web-1/);
    const outside = await list('other');
    assert.equal(outside.isError, true, text(outside));
    assert.match(text(outside), /forbidden/i);
    assert.doesNotMatch(text(outside), /other-1/);
    // Refused by the API server (RBAC), and recorded at the gateway with the task and agent.
    const denied = records().filter((r) => r.type === 'k8s.request' && r.task === task['id'] && r.namespace === 'other' && r.details?.resource === 'pods');
    assert.ok(denied.length >= 1, JSON.stringify(records().filter((r) => r.type === 'k8s.request').slice(-5)));
    assert.ok(denied.every((r) => r.outcome === 'denied' && r.agent === 'alpha' && r.details?.via === 'proxy'), JSON.stringify(denied));
    assert.ok(records().some((r) => r.type === 'k8s.request' && r.task === task['id'] && r.namespace === 'web' && r.outcome === 'allowed' && r.details?.verb === 'list'));

    const ended = await call('end_task', { task: 'read-pods' });
    assert.ok(!ended.isError, text(ended));
    assert.equal(ended.structuredContent!['ended'], true);
    assert.equal(ended.structuredContent!['task'].id, task['id']);
    assert.deepEqual(await env.taskObjects(), { secrets: [], serviceAccounts: [], roleBindings: [] });
    // Every call now fails: the same process, its cached credential included.
    for (const ns of ['web', 'other']) {
      const res = await list(ns);
      assert.equal(res.isError, true, `${ns}: ${text(res)}`);
      assert.doesNotMatch(text(res), /web-1|other-1/);
    }
    const afterEnd = await kms.callTool({ name: 'pods_get', arguments: { namespace: 'web', name: 'web-1' } });
    assert.equal(afterEnd.isError, true);
    const status2 = await call('task_status', { task: 'read-pods' });
    assert.equal(status2.structuredContent!['task'].state, 'ended');
    assert.equal(status2.structuredContent!['kubeconfig'], undefined);
    const endAgain = await call('end_task', { task: 'read-pods' });
    assert.equal(errorCodeOf(endAgain), 'no_active_task', text(endAgain));
    assert.match(text(endAgain), /start_task/);

    // The same kubernetes-mcp-server, untouched, works again for the next task of that name, and not after it.
    const next = await call('start_task', { template: 'read-pods', namespace: 'web', reason: 'one more look' });
    assert.ok(!next.isError, text(next));
    assert.equal(next.structuredContent!['kubeconfig'].path, kubeconfig['path']);
    // client-go keeps the ended task's session token until a 401 makes it ask the plugin again, and does
    // not retry the request that got the 401: the first call may fail once (saying the old task is not
    // active); the next one carries the new task's token. kubernetes-mcp-server is never restarted.
    let again2 = await list('web');
    if (again2.isError) {
      assert.match(text(again2), /is not active|provide credentials/, text(again2));
      again2 = await list('web');
    }
    assert.ok(!again2.isError, `${text(again2)}\n${kmsStderr}`);
    assert.match(text(again2), /web-1/);
    assert.ok(!(await call('end_task', { task: 'read-pods' })).isError);
    assert.equal((await list('web')).isError, true);
  });

  test('--via direct: the kubeconfig points at the API server; kubernetes-mcp-server works with the task token, and not after end_task', async () => {
    const direct = await connect(BROKER, ['mcp', '--via', 'direct', '--kubeconfig-dir', join(home, 'direct')], (s) => (mcpStderr += s));
    const started = (await direct.callTool({ name: 'start_task', arguments: { template: 'read-pods', namespace: 'web', name: 'direct', reason: 'the API server itself' } })) as Result;
    assert.ok(!started.isError, text(started));
    const kubeconfig = started.structuredContent!['kubeconfig'] as Rec;
    assert.deepEqual([kubeconfig['path'], kubeconfig['via'], kubeconfig['server']], [join(home, 'direct/direct.kubeconfig'), 'direct', env.cluster.server]);
    assert.doesNotMatch(readFileSync(kubeconfig['path'], 'utf8'), /token|--via/i);
    const kms = await connect(KUBERNETES_MCP_SERVER, ['--kubeconfig', kubeconfig['path'], '--log-file', 'stderr', '--disable-multi-cluster'], () => undefined);
    const list = () => kms.callTool({ name: 'pods_list_in_namespace', arguments: { namespace: 'web' } }) as Promise<Result>;
    const allowed = await list();
    assert.ok(!allowed.isError, text(allowed));
    assert.match(text(allowed), /web-1/);
    assert.ok(!((await direct.callTool({ name: 'end_task', arguments: { task: 'direct' } })) as Result).isError);
    // The task token it holds in memory is refused at once: its RoleBinding went first.
    const refused = await list();
    assert.equal(refused.isError, true, text(refused));
    assert.match(text(refused), /forbidden/i);
  });

  test('a gated template: approval_required naming the request and who approves; approved by another identity; then wait returns the task', async () => {
    const args = { template: 'exec-web', namespace: 'web', reason: 'restart the stuck worker' };
    const refused = await call('start_task', args);
    const t = text(refused);
    assert.equal(errorCodeOf(refused), 'approval_required', t);
    const id = /approval request: (ar-[0-9a-f]{12})/.exec(t)?.[1];
    assert.ok(id, t);
    assert.match(t, new RegExp(`who can approve: a member of "sre" other than you, by running: broker approve ${id}$`, 'm'));
    assert.match(t, /^next: .*"wait": true/m);
    assert.doesNotMatch(t, /broker task start/);
    assert.deepEqual(await env.taskObjects(), { secrets: [], serviceAccounts: [], roleBindings: [] });

    // The agent cannot approve its own request; the approver can.
    const self = await run(BROKER, ['approve', id], agentEnv);
    assert.notEqual(self.code, 0, self.stderr);
    const approved = await run(BROKER, ['approve', id, '--reason', 'ok for the incident'], approverEnv);
    assert.equal(approved.code, 0, approved.stderr);

    const started = await call('start_task', { ...args, wait: true });
    assert.ok(!started.isError, text(started));
    const task = started.structuredContent!['task'] as Rec;
    assert.equal(task['approvalId'], id);
    assert.equal(task['template'], 'exec-web');
    assert.equal((await env.taskObjects()).roleBindings.length, 1);
    assert.ok(!(await call('end_task', { task: 'exec-web' })).isError);
  });

  test('waiting for an approval reports progress, and a cancelled wait starts nothing, even once approved', async () => {
    const startedBefore = records().filter((r) => r.type === 'task.started').length;
    const progress: Progress[] = [];
    const abort = new AbortController();
    const waiting = mcp.callTool({ name: 'start_task', arguments: { template: 'exec-web', namespace: 'web', name: 'exec-cancel', reason: 'maybe later', wait: true } }, undefined, {
      signal: abort.signal,
      resetTimeoutOnProgress: true,
      onprogress: (p) => {
        progress.push(p);
        if (progress.length === 1) setTimeout(() => abort.abort('the user changed their mind'), 300);
      },
    });
    await assert.rejects(waiting, (err: Error) => /changed their mind|abort/i.test(String(err.message ?? err)));
    assert.ok(progress.length >= 1);
    assert.match(progress[0]!.message ?? '', /^waiting for approval of ar-[0-9a-f]{12}: 0 of 1; a member of sre runs: broker approve ar-[0-9a-f]{12}$/);
    const id = /ar-[0-9a-f]{12}/.exec(progress[0]!.message!)![0];

    // The server goes on serving; the request stays open; approving it now starts nothing.
    assert.deepEqual((await call('list_tasks')).structuredContent, { tasks: [] });
    const approved = await run(BROKER, ['approve', id], approverEnv);
    assert.equal(approved.code, 0, approved.stderr);
    await sleep(2500);
    assert.deepEqual((await call('list_tasks')).structuredContent, { tasks: [] });
    assert.deepEqual(await env.taskObjects(), { secrets: [], serviceAccounts: [], roleBindings: [] });
    assert.equal(records().filter((r) => r.type === 'task.started').length, startedBefore);
  });

  test('a client that goes away while a start waits for its approval leaves nothing started behind', async () => {
    const startedBefore = records().filter((r) => r.type === 'task.started').length;
    const gone = await connect(BROKER, ['mcp'], () => undefined);
    let id = '';
    const waiting = gone
      .callTool({ name: 'start_task', arguments: { template: 'exec-web', namespace: 'web', name: 'exec-gone', reason: 'then the session ended', wait: true } }, undefined, {
        onprogress: (p) => (id ||= /ar-[0-9a-f]{12}/.exec(p.message ?? '')?.[0] ?? ''),
      })
      .catch((err: Error) => err);
    while (!id) await sleep(50);
    await gone.close(); // stdin closed: broker mcp stops, its waits with it
    assert.match(String(await waiting), /closed/i);
    const approved = await run(BROKER, ['approve', id], approverEnv);
    assert.equal(approved.code, 0, approved.stderr);
    await sleep(2500);
    assert.equal(records().filter((r) => r.type === 'task.started').length, startedBefore);
    assert.deepEqual(await env.taskObjects(), { secrets: [], serviceAccounts: [], roleBindings: [] });
  });

  test('no file under the agent\'s HOME or TMPDIR holds a token; broker mcp printed no stack trace', () => {
    const files = [...filesUnder(home), ...filesUnder(tmp)];
    assert.ok(files.some((f) => f.endsWith('read-pods.kubeconfig')), files.join('\n'));
    for (const f of files) assert.doesNotMatch(readFileSync(f, 'latin1'), JWT, f);
    assert.doesNotMatch(mcpStderr, /\n\s+at /);
  });
});
