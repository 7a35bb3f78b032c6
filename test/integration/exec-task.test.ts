/**
 * Production exec, gated and recorded, end to end (issue 12): the full local cluster (a node whose
 * containers are local processes), its API server's audit webhook posting to a real broker process,
 * real kubectl through the exec credential plugin (the native build and the Node one), and the
 * `broker` CLI as the agent and as an approver (another identity) run it.
 *
 * The webhook's URL must be known when the API server starts, so the broker's port is chosen first
 * and the broker listens on exactly that one (as in kube-audit.test.ts), over TLS with the API
 * server's own loopback certificate, which the webhook trusts.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { existsSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { alive, freePort, groupAlive, kubectlPath, readProcessGroups } from '../../src/cluster/local-cluster.ts';
import { EXIT } from '../../src/cli/exit-codes.ts';
import { BrokerEnv, type BrokerProcess } from '../helpers/broker.ts';
import { kubectl, run, type RunResult } from '../helpers/kube.ts';
import { until } from '../helpers/wait.ts';

const ROOT = new URL('../..', import.meta.url).pathname;
const BROKER = join(ROOT, 'bin/broker');
const POLICY = join(ROOT, 'test/fixtures/exec-policy.yaml');
const NATIVE_PLUGIN = join(ROOT, '.cache/bin/broker-credential');
/** The exec plugin builds to try: the Node one always, the native one when install.sh built it. */
const PLUGINS = existsSync(NATIVE_PLUGIN) ? ['native', 'node'] : ['node'];

type Rec = Record<string, any>;


describe('pods/exec in a gated task on the full cluster: refused, approved by another identity, run through the exec plugin, recorded', () => {
  let env: BrokerEnv;
  let broker: BrokerProcess;
  /** Every process that must be gone at the end: the cluster's, the broker's, the pod's. */
  const pids = new Map<number, string>();
  let nodeDir = '';
  let containerPid = 0;
  let agentEnv: NodeJS.ProcessEnv;
  let approverEnv: NodeJS.ProcessEnv;
  /** The approved task, once started. */
  let task: { id: string; approvalId: string };
  const kubeconfigs = new Map<string, string>();

  before(async () => {
    const port = await freePort();
    env = await BrokerEnv.start({
      policyText: readFileSync(POLICY, 'utf8'),
      // A short webhook retry back-off: at the end the API server's shutdown retries its last batch to
      // the stopped broker (from 1 s: about 8 s).
      cluster: { full: true, auditWebhook: { url: `https://127.0.0.1:${port}/v1/audit/kubernetes`, token: randomBytes(32).toString('base64url'), initialBackoff: '200ms' } },
    });
    for (const c of env.cluster.components) pids.set(c.pid, c.name);
    nodeDir = env.cluster.nodeDir!;
    broker = await env.startBroker({
      listen: `127.0.0.1:${port}`,
      tls: env.cluster.servingCert,
      extraArgs: ['--audit-webhook-token-file', env.cluster.auditWebhookTokenFile!],
    });
    pids.set(broker.pid, 'broker serve');

    // The identities, kept in the environment only (no token on disk): the agent, and an approver.
    const base = { PATH: `${join(ROOT, '.node/node_modules/node/bin')}:${process.env['PATH']}`, HOME: env.dir, NO_COLOR: '1', BROKER_URL: broker.url, BROKER_CA: env.cluster.caFile };
    agentEnv = { ...base, BROKER_IDENTITY_TOKEN: await env.agentToken('alpha') };
    approverEnv = { ...base, BROKER_IDENTITY_TOKEN: await env.agentToken('alice', 'approvers') };

    // A pod to exec into, as the administrator: a process on the node. The namespace's default
    // ServiceAccount comes from the controller-manager a moment after the namespace.
    const admin = env.cluster.kubeconfig;
    await until('the pod created (the namespace\'s default ServiceAccount)', 30_000, async () => {
      const res = await kubectl(admin, 'run', 'web', '-n', 'shop', '--image=busybox', '--restart=Never', '--command', '--', 'sh', '-c', 'sleep 3600');
      if (res.code === 0) return true;
      assert.match(res.stderr, /serviceaccount "default" not found/, 'the only failure worth waiting out');
      return false;
    });
    containerPid = await until('the pod Running', 60_000, async () => {
      const id = await kubectl(admin, 'get', 'pod', 'web', '-n', 'shop', '-o', 'jsonpath={.status.phase} {.status.containerStatuses[0].containerID}');
      const m = /^Running process:\/\/(\d+)$/.exec(id.stdout);
      return m ? Number(m[1]) : undefined;
    });
    pids.set(containerPid, 'the pod\'s container');
  });

  after(async () => {
    // Also when a test failed: every process by pid, the directories.
    await env?.stop();
  });

  const cli = (args: string[], as: NodeJS.ProcessEnv) => run(BROKER, args, as);
  /** kubectl as the agent, through the kubeconfig `broker kubeconfig` wrote; `input` is its stdin. */
  const agentKubectl = (kubeconfig: string, args: string[], options: { input?: string; env?: NodeJS.ProcessEnv } = {}): Promise<RunResult> =>
    run(kubectlPath(), ['--kubeconfig', kubeconfig, ...args], { ...agentEnv, ...options.env }, 60_000, options.input);
  const kubeconfigFor = async (template: string, plugin: string) => {
    const path = join(env.dir, `${template}-${plugin}.kubeconfig`);
    const res = await cli(['kubeconfig', '--task', template, '--plugin', plugin, '--output', path], agentEnv);
    assert.equal(res.code, 0, res.stderr);
    assert.doesNotMatch(readFileSync(path, 'utf8'), /token/i, 'the kubeconfig holds no secret');
    return path;
  };
  const exec = (kubeconfig: string, options: { input?: string; env?: NodeJS.ProcessEnv } = {}) =>
    agentKubectl(kubeconfig, ['exec', ...(options.input === undefined ? [] : ['-i']), 'web', '-n', 'shop', '--', 'sh', '-c', options.input === undefined ? 'echo hello-$((1+1))' : 'read x; echo got $x'], options);
  /** The task's records once `complete` holds them (the webhook posts in batches, a second apart). */
  const story = (taskId: string, complete: (records: Rec[]) => boolean) =>
    until(`the recording of task ${taskId}`, 20_000, async () => {
      let recs: Rec[];
      try {
        recs = broker.auditRecords().filter((r) => r.task === taskId);
      } catch {
        return undefined; // a line being written
      }
      return complete(recs) ? recs : undefined;
    });
  const isExec = (r: Rec) => r.type === 'k8s.request' && r.details?.subresource === 'exec' && r.details?.name === 'web' && r.namespace === 'shop';

  test('without an approval the agent\'s task start is refused (exit 3, the request to approve named), and kubectl exec through the plugin is refused too', async () => {
    const refused = await cli(['task', 'start', 'exec-web', '--namespace', 'shop', '--reason', 'look inside web'], agentEnv);
    assert.equal(refused.code, EXIT.approval_required, refused.stderr);
    assert.equal(refused.stdout, '');
    const id = /request (ar-[0-9a-f]{12})/.exec(refused.stderr)?.[1];
    assert.ok(id, refused.stderr);
    task = { id: '', approvalId: id };
    assert.equal(
      refused.stderr,
      `error: template "exec-web" is gated: 1 approval(s) needed from sre; request ${id}; wait for it with: broker task start exec-web --namespace shop --wait (an approver runs: broker approve ${id}) [approval_required]\n`,
    );
    assert.deepEqual(await env.taskObjects(), { secrets: [], serviceAccounts: [], roleBindings: [] }, 'nothing was created in the cluster');

    // The plugin, asked for a credential of the task that waits, names the request; kubectl gets no token.
    for (const plugin of PLUGINS) {
      const res = await exec(await kubeconfigFor('exec-web', plugin));
      assert.equal(res.code, 1, `${plugin}: ${res.stderr}`);
      assert.equal(res.stdout, '');
      assert.match(res.stderr, new RegExp(`^broker credential: task "exec-web" needs approval \\(request ${id}\\): task "exec-web" waits for approval: 0 of 1 so far\nask an approver to run: broker approve ${id}\n`), plugin);
      assert.match(res.stderr, /^Unable to connect to the server: getting credentials: exec: executable \S+ failed with exit code 3$/m, plugin);
    }
  });

  test('the agent cannot approve its own request; another identity (an approver) approves; the agent starts the task with the approval', async () => {
    const id = task.approvalId;
    const self = await cli(['approve', id], agentEnv);
    assert.equal(self.code, EXIT.error);
    assert.equal(self.stderr, `error: system:serviceaccount:agents:alpha is agent:alpha, who requested ${id}, and cannot decide it [forbidden]\n`);

    const approve = await cli(['approve', id, '--reason', 'incident 4711: look at web'], approverEnv);
    assert.equal(approve.code, 0, approve.stderr);
    assert.match(approve.stdout, new RegExp(`^approved ${id}: 1/1 approvals, now approved`, 'm'));

    const start = await cli(['task', 'start', 'exec-web', '--namespace', 'shop', '--reason', 'look inside web', '--wait', '-o', 'json'], agentEnv);
    assert.equal(start.code, 0, start.stderr);
    assert.match(start.stderr, new RegExp(`${id} approved`));
    const started = JSON.parse(start.stdout) as { id: string; approvalId: string; template: string; namespace: string };
    assert.equal(started.approvalId, id);
    assert.equal(started.template, 'exec-web');
    task = { id: started.id, approvalId: id };
  });

  for (const plugin of PLUGINS) {
    test(`kubectl exec through the ${plugin} exec plugin runs in the pod and prints hello-2; exec -i with stdin, over WebSocket and SPDY`, async () => {
      const kc = await kubeconfigFor('exec-web', plugin);
      kubeconfigs.set(plugin, kc);
      const hello = await exec(kc);
      assert.equal(hello.code, 0, hello.stderr);
      assert.equal(hello.stdout, 'hello-2\n');
      for (const transport of [{}, { KUBECTL_REMOTE_COMMAND_WEBSOCKETS: 'false' }]) {
        const res = await exec(kc, { input: 'world\n', env: transport });
        assert.equal(res.code, 0, `${JSON.stringify(transport)}: ${res.stderr}`);
        assert.equal(res.stdout, 'got world\n', JSON.stringify(transport));
      }
      // The grant is exactly the template's: no delete, no other namespace.
      const del = await agentKubectl(kc, ['delete', 'pod', 'web', '-n', 'shop']);
      assert.equal(del.code, 1);
      assert.match(del.stderr, /Error from server \(Forbidden\): pods "web" is forbidden: User "system:serviceaccount:task-broker:task-[a-z0-9]+" cannot delete resource "pods"/);
    });
  }

  test('a task without the exec grant (read-pods): kubectl exec is refused by RBAC, with the API server\'s message', async () => {
    const start = await cli(['task', 'start', 'read-pods', '--namespace', 'shop', '-o', 'json'], agentEnv);
    assert.equal(start.code, 0, start.stderr);
    const reader = JSON.parse(start.stdout) as { id: string };
    const kc = await kubeconfigFor('read-pods', PLUGINS[0]!);
    assert.equal((await agentKubectl(kc, ['get', 'pod', 'web', '-n', 'shop'])).code, 0, 'the pod is readable');
    const res = await exec(kc);
    assert.equal(res.code, 1);
    assert.equal(res.stdout, '');
    assert.match(
      res.stderr,
      new RegExp(`^error: unable to upgrade connection: pods "web" is forbidden: User "system:serviceaccount:task-broker:task-${reader.id}" cannot create resource "pods/exec" in API group "" in the namespace "shop"`),
    );
    assert.equal((await cli(['task', 'end', reader.id], agentEnv)).code, 0);
    // Recorded as denied, from the API server's side.
    // Both refusals: WebSocket's `get`, then SPDY's `create` (they may reach the broker in different webhook batches).
    await story(reader.id, (recs) => recs.some((r) => isExec(r) && r.outcome === 'denied' && r.details?.verb === 'create'));
    const shown = await cli(['audit', 'show', '--task', reader.id, broker.auditLog], agentEnv);
    assert.equal(shown.code, 0, shown.stderr);
    assert.match(shown.stdout, /DENY create pods\/web\/exec -n shop \(403: /);
  });

  test('broker audit show --task prints the exec requests as the API server recorded them (text and -o json)', async () => {
    // Per plugin: an exec and an exec -i over WebSocket, an exec -i over SPDY. kubectl's WebSocket
    // transport asks first with `get pods/exec`, which the template does not grant: the API server
    // refuses that upgrade (403) and kubectl falls back to SPDY, which asks with `create`. So each
    // WebSocket exec is recorded as a denied `get`, then an allowed `create`.
    const allowed = PLUGINS.length * 3;
    const denied = PLUGINS.length * 2;
    const recs = await story(task.id, (r) => r.filter((x) => isExec(x) && x.outcome === 'allowed').length >= allowed && r.filter((x) => isExec(x) && x.outcome === 'denied').length >= denied);
    const minted = new Set(recs.filter((r) => r.type === 'credential.minted').map((r) => r.jti));
    const execs = recs.filter(isExec);
    assert.deepEqual(
      execs.map((r) => `${r.outcome} ${r.details.verb} ${r.details.code}`).sort(),
      [...Array<string>(allowed).fill('allowed create 101'), ...Array<string>(denied).fill('denied get 403')],
      JSON.stringify(execs),
    );
    for (const r of execs) {
      assert.equal(r.agent, 'alpha');
      assert.equal(r.template, 'exec-web');
      assert.equal(r.details.resource, 'pods');
      assert.match(r.details.requestURI, /^\/api\/v1\/namespaces\/shop\/pods\/web\/exec\?command=sh&command=-c&command=/);
      assert.ok(minted.has(r.jti), 'made with a credential the broker minted for the task');
    }

    const shown = await cli(['audit', 'show', '--task', task.id, broker.auditLog], agentEnv);
    assert.equal(shown.code, 0, shown.stderr);
    assert.match(shown.stdout, new RegExp(`^task exec-web \\(${task.id}\\): template exec-web, in shop, agent alpha$`, 'm'));
    // Who approved, before the task started; then the requests (an allowed exec is answered 101 Switching Protocols).
    assert.match(shown.stdout, new RegExp(`approval granted ${task.approvalId} by user:system:serviceaccount:approvers:alice, .*1 of 1, reason: incident 4711: look at web\n[\\s\\S]*approval used ${task.approvalId}\n[\\s\\S]*task started`));
    assert.equal(shown.stdout.match(/^ +\S+ +ALLOW create pods\/web\/exec -n shop( \(101\))?$/gm)?.length, allowed, shown.stdout);
    const refusal = `DENY get pods/web/exec -n shop (403: pods "web" is forbidden: User "system:serviceaccount:task-broker:task-${task.id}" cannot get resource "pods/exec" in API group "" in the namespace "shop")`;
    assert.equal(shown.stdout.split('\n').filter((l) => l.endsWith(refusal)).length, denied, shown.stdout);
    const json = await cli(['audit', 'show', '--task', task.id, '-o', 'json', broker.auditLog], agentEnv);
    assert.equal(json.code, 0, json.stderr);
    const doc = JSON.parse(json.stdout) as { chain: { ok: boolean }; records: Rec[] };
    assert.equal(doc.chain.ok, true);
    assert.deepEqual(
      doc.records.filter(isExec).map((r) => r.details.auditID).sort(),
      execs.map((r) => r.details.auditID).sort(),
      'the same requests, by the API server\'s audit ids',
    );
  });

  test('after task end the same kubeconfigs are refused by the plugin, and no exec reaches the API server', async () => {
    const end = await cli(['task', 'end', task.id], agentEnv);
    assert.equal(end.code, 0, end.stderr);
    const mark = statSync(env.cluster.auditLog).size;
    for (const [plugin, kc] of kubeconfigs) {
      const res = await exec(kc);
      assert.equal(res.code, 1, `${plugin}: ${res.stderr}`);
      assert.equal(res.stdout, '');
      assert.match(res.stderr, /no active task "exec-web"/, plugin);
    }
    const since = readFileSync(env.cluster.auditLog).subarray(mark).toString('utf8');
    assert.doesNotMatch(since, /"subresource":"exec"/, 'no exec request reached the API server');
    const shown = await cli(['audit', 'show', '--task', task.id, broker.auditLog], agentEnv);
    assert.match(shown.stdout, /^ +\S+ +task ended$/m, shown.stdout);
  });

  test('stopping the cluster and the broker leaves no process (by pid) and no directory', async () => {
    const groups = readProcessGroups(nodeDir);
    assert.ok(groups.includes(containerPid), 'the pod\'s process group is one the node lists');
    for (const [pid, name] of pids) assert.ok(alive(pid), `${name} (pid ${pid}) runs before the stop`);
    const dirs = [env.dir, env.cluster.dir];
    await broker.stop();
    await env.stop();
    for (const [pid, name] of pids) assert.equal(alive(pid), false, `${name} (pid ${pid}) is gone`);
    // Gone, or (a member killed after the node reaped its group's first process) only a zombie that init has not reaped yet.
    for (const pgid of groups) assert.equal(groupAlive(pgid), false, `process group ${pgid} is gone`);
    for (const d of dirs) assert.equal(existsSync(d), false, `${d} is removed`);
  });
});
