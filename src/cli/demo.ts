/**
 * `broker demo`: the checks task-broker exists for, end to end on the whole local cluster (API
 * server, controllers, scheduler, a node whose containers are local processes; DESIGN.md sections 1,
 * 6, 7, 8), with real kubectl and real broker commands, each printed with its result:
 *   1. allowed path: a task's kubectl commands are in the recording, from the API server's side;
 *   2. denied path: a command outside the task's scope is denied and still recorded, as DENY;
 *   3. no resting access: once the task has ended kubectl is refused by the exec plugin, and the API
 *      server's own audit log shows that no request of a task identity reached it;
 *   4. gated exec: a task granting pods/exec is refused without an approval, approved by another
 *      identity, then `kubectl exec` runs in a pod and the recording holds it.
 * `broker demo down` stops what `--keep` left running (processes by pid, then the directory).
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { closeSync, existsSync, mkdirSync, mkdtempSync, openSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import { Command } from 'commander';
import { BrokerError } from '../errors.ts';
import type { AuditRecord } from '../audit/types.ts';
import type { ClusterComponent } from '../cluster/local-cluster.ts';
import { outputOption, printJson, style, type OutputFormat } from './output.ts';

interface DemoOptions {
  keep?: boolean;
  dir?: string;
  output: OutputFormat;
}

interface DownOptions {
  dir?: string | undefined;
  output: OutputFormat;
}

/** What a kept demo leaves in DIR/demo.json, so that `demo down` (another process) can stop it. */
interface DemoState {
  dir: string;
  clusterDir: string;
  apiserverPid?: number;
  /** The cluster's processes (API server, controller-manager, scheduler, node), once started. */
  components?: ClusterComponent[];
  brokerPid?: number;
  brokerUrl?: string;
}

const STATE_FILE = 'demo.json';
const DIR_PREFIX = 'task-broker-demo-';
/** The project root: src/cli/x.ts and dist/cli/x.js are both two levels below it. */
const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const POLICY = join(ROOT, 'docs/examples/demo-policy.yaml');
const AGENT = 'demo-agent';
const TEMPLATE = 'read-pods';
/** The gated template of check 4 (create pods/exec), and who approves it. */
const EXEC_TEMPLATE = 'exec-web';
const APPROVER = 'demo-approver';
/** The administrator who registers the agent's key. */
const ADMIN = 'demo-admin';
/** What check 4 runs in the pod, and what it must print. */
const EXEC_COMMAND = ['sh', '-c', 'echo hello-$((1+1))'];
const EXEC_OUTPUT = 'hello-2';

export function demoCommand(): Command {
  const cmd = new Command('demo')
    .description('the four checks end to end on a local cluster: allowed commands recorded, a denied one recorded as DENY, no access once the task ends, exec only once approved by someone else')
    .option('--keep', 'leave the control plane and the broker running, and print how to explore them (stop with: broker demo down)')
    .option('--dir <dir>', 'directory for everything the demo creates (must be missing or empty); default: a new temporary directory')
    .addOption(outputOption())
    .addHelpText(
      'after',
      [
        '',
        'Needs the local cluster that ./install.sh builds when Go is installed. Exit status 0 only when all four checks hold.',
        'With -o json the walk-through goes to stderr and stdout gets {"ok", "checks": [{"name", "ok", "detail"}], "dir"?, "pids"?}.',
        '',
        'Example:',
        '  broker demo',
        '  broker demo --keep      # then explore; afterwards: broker demo down',
      ].join('\n'),
    )
    .action((opts: DemoOptions) => runDemo(opts));
  cmd
    .command('down')
    .description('stop what `broker demo --keep` left running (the broker and the cluster\'s processes, by pid) and remove its directory')
    .option('--dir <dir>', 'the directory `demo --keep` printed (default: $TASK_BROKER_DEMO_DIR, else the only demo directory in the temporary directory)')
    .addOption(outputOption())
    .addHelpText('after', '\nExample:\n  broker demo down --dir /tmp/task-broker-demo-Ab12Cd')
    // `demo` has a --dir of its own, which commander fills even when the flag follows `down`.
    .action((opts: DownOptions, down: Command) => demoDown({ ...opts, dir: opts.dir ?? (down.parent?.opts() as { dir?: string } | undefined)?.dir }));
  return cmd;
}

// ---------------------------------------------------------------------------------------------
// The walk-through

interface Check {
  name: string;
  ok: boolean;
  detail: string;
}

async function runDemo(opts: DemoOptions): Promise<void> {
  const { LocalCluster, kubectlPath, freePort } = await import('../cluster/local-cluster.ts');
  const kubectl = kubectlPath(); // cluster_binaries_missing when install.sh did not build the control plane
  const json = opts.output === 'json';
  const say = new Narrator(json ? process.stderr : process.stdout);
  const dir = prepareDir(opts.dir);
  const state: DemoState = { dir, clusterDir: join(dir, 'cluster') };
  const saveState = () => writeFileSync(join(dir, STATE_FILE), JSON.stringify(state, null, 2) + '\n', { mode: 0o600 });
  saveState();
  let keep = false;
  let cluster: Awaited<ReturnType<typeof LocalCluster.start>> | undefined;
  let interrupted = false;
  let tearingDown = false;
  const onSignal = () => {
    if (tearingDown || interrupted) return; // already stopping: let it finish
    interrupted = true;
    say.stopSpinner();
    process.stderr.write('\ninterrupted: stopping the demo\n');
    void teardown(state, keep ? undefined : cluster).finally(() => process.exit(130));
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  const started = Date.now();
  const checks: Check[] = [];
  try {
    const paths = {
      adminKubeconfig: join(state.clusterDir, 'admin.kubeconfig'),
      audit: join(dir, 'audit.jsonl'),
      brokerKubeconfig: join(dir, 'broker.kubeconfig'),
      adminToken: join(dir, 'admin.token'),
      agentKubeconfig: join(dir, 'agent.kubeconfig'),
      approverToken: join(dir, 'approver.token'),
      execKubeconfig: join(dir, 'exec.kubeconfig'),
    };
    const home = join(dir, 'home');
    mkdirSync(home, { mode: 0o700 });
    say.note(`everything the demo creates goes in DEMO=${dir}`);
    say.setDir(dir);
    const broker = [process.execPath, ...brokerEntry()];
    const baseEnv = { PATH: process.env['PATH'] ?? '/usr/bin:/bin', HOME: home, ...(process.env['TMPDIR'] ? { TMPDIR: process.env['TMPDIR'] } : {}) };
    const admin = { ...baseEnv, KUBECONFIG: paths.adminKubeconfig };
    const exe = (argv: string[]) => (argv[0] === 'broker' ? [...broker, ...argv.slice(1)] : argv[0] === 'kubectl' ? [kubectl, ...argv.slice(1)] : argv);

    // ---- set-up, as an administrator
    say.section('an administrator: a local cluster that reports every request to the broker');
    const port = await freePort();
    const brokerUrl = `https://127.0.0.1:${port}`;
    const webhookUrl = `${brokerUrl}/v1/audit/kubernetes`;
    say.step(`kube-apiserver with an embedded etcd, its audit webhook pointed at the broker (${webhookUrl}); controllers, scheduler, and a node whose containers are local processes`);
    say.note(`as \`broker dev-cluster up --dir $DEMO/cluster --audit-webhook ${webhookUrl}\` would:`);
    // Attached unless kept: it then dies with this process, however this process ends. A short retry
    // back-off for the webhook: at the end the broker stops first, and the API server's shutdown waits
    // until its last batch is sent or its 4 retries are spent (from 1 s, each 1.5 times longer: about
    // 8 s in all, measured; from 0.2 s: under 2 s).
    cluster = await say.waiting('starting the cluster', () =>
      LocalCluster.start({
        dir: state.clusterDir,
        detached: opts.keep === true,
        full: true,
        auditWebhook: { url: webhookUrl, token: randomBytes(32).toString('base64url'), initialBackoff: '200ms' },
      }),
    );
    state.apiserverPid = cluster.pid;
    state.components = cluster.components.map((c) => ({ ...c }));
    saveState();
    const webhookTokenFile = cluster.auditWebhookTokenFile;
    if (webhookTokenFile === undefined) throw new BrokerError('internal', 'the local control plane wrote no audit webhook token');
    say.result(`kube-apiserver ${cluster.state.version} at ${cluster.server}; its own audit log: $DEMO/cluster/audit.log`);
    say.result(cluster.components.map((c) => `${c.name} (pid ${c.pid})`).join(', '));

    const run = async (argv: string[], env: NodeJS.ProcessEnv, options: { maxLines?: number; secret?: boolean } = {}) => {
      say.command(shellLine(argv));
      const res = await say.waiting(shellLine(argv), () => capture(exe(argv), env));
      show(res, options);
      return res;
    };
    const show = (res: Captured, options: { maxLines?: number; secret?: boolean }) => {
      if (options.secret) say.result(`(${res.stdout.trim().length} characters, not shown)${res.code === 0 ? '' : ` ${res.stderr.trim()}`}`);
      else say.output(res, options.maxLines);
    };
    const must = async (argv: string[], env: NodeJS.ProcessEnv, options: { maxLines?: number; secret?: boolean } = {}) => {
      const res = await run(argv, env, options);
      if (res.code !== 0) throw new BrokerError('internal', `${shellLine(argv)} failed (exit ${res.code}): ${lastLine(res.stderr || res.stdout)}`);
      return res;
    };
    /** `must`, tried again (quietly, for up to 30 s) while it fails with `transient`; printed once. */
    const mustSoon = async (argv: string[], env: NodeJS.ProcessEnv, transient: RegExp) => {
      say.command(shellLine(argv));
      const res = await say.waiting(shellLine(argv), async () => {
        for (let i = 0; ; i++) {
          const r = await capture(exe(argv), env);
          if (r.code === 0 || !transient.test(r.stderr) || i >= 150) return r;
          await sleep(200);
        }
      });
      show(res, {});
      if (res.code !== 0) throw new BrokerError('internal', `${shellLine(argv)} failed (exit ${res.code}): ${lastLine(res.stderr || res.stdout)}`);
      return res;
    };

    say.step('namespaces: demo (where the task may act), other (where it may not), the agent\'s, the approver\'s, the broker\'s two');
    for (const ns of ['demo', 'other', 'admins', 'approvers', 'task-broker', 'task-broker-system']) await must(['kubectl', 'create', 'namespace', ns], admin);
    say.step('something to look at in demo, and in other: a pod in each, running on the node');
    const pod = (ns: string) => ['kubectl', 'run', 'web-1', '--image=busybox', '--restart=Never', '-n', ns, '--command', '--', 'sh', '-c', 'sleep 3600'];
    // The controller-manager gives a new namespace its default ServiceAccount a moment later; until
    // then the ServiceAccount admission plugin refuses pods there.
    for (const ns of ['demo', 'other']) await mustSoon(pod(ns), admin, /serviceaccount "default" not found/);
    await must(['kubectl', 'create', 'configmap', 'web-config', '--from-literal=color=blue', '-n', 'demo'], admin);
    await must(['kubectl', 'wait', '--for=jsonpath={.status.phase}=Running', 'pod/web-1', '-n', 'demo', '--timeout=60s'], admin);
    say.note("(the image is only a name here: the node runs each container's command as a process on this machine)");
    say.step('the policy: templates become ClusterRoles; the broker may bind exactly those (docs/examples/demo-policy.yaml)');
    await must(['broker', 'policy', 'apply', POLICY, '--kubeconfig', paths.adminKubeconfig], admin, { maxLines: 3 });
    // The API server's RBAC authorizer learns new roles from its informers, a moment later.
    const canI = ['kubectl', 'auth', 'can-i', 'get', 'configmaps', '-n', 'task-broker-system', '--as', 'system:serviceaccount:task-broker-system:task-broker'];
    say.command(shellLine(canI));
    const rbac = await say.waiting('waiting for RBAC to take the new roles', async () => {
      for (let i = 0; ; i++) {
        const res = await capture(exe(canI), admin);
        if (res.code === 0 || i >= 50) return res;
        await sleep(100);
      }
    });
    say.output(rbac);

    say.section('the broker: its own identity, its audit log, the API server\'s webhook');
    say.step("the broker's kubeconfig: a token of its own ServiceAccount, and nothing more");
    const brokerToken = await must(['kubectl', 'create', 'token', 'task-broker', '-n', 'task-broker-system', '--duration', '1h'], admin, { secret: true });
    writeFileSync(paths.brokerKubeconfig, tokenKubeconfig(cluster.server, cluster.caFile, brokerToken.stdout.trim()), { mode: 0o600 });
    say.result('-> $DEMO/broker.kubeconfig');
    // TLS: the API server sends the webhook's bearer token only over https. The broker serves with the
    // API server's own self-signed certificate (for 127.0.0.1), which the webhook already trusts.
    const tls = cluster.servingCert;
    const serveArgs = [
      'serve',
      '--config',
      POLICY,
      '--audit-log',
      paths.audit,
      '--kubeconfig',
      paths.brokerKubeconfig,
      '--listen',
      `127.0.0.1:${port}`,
      '--tls-cert',
      tls.cert,
      '--tls-key',
      tls.key,
      '--audit-webhook-token-file',
      webhookTokenFile,
    ];
    say.step('broker serve, in the background, over TLS, taking the webhook only from posts bearing its token');
    say.command(`${shellLine(['broker', ...serveArgs])} &`);
    const brokerPid = await say.waiting('starting the broker', () => startBroker(broker, serveArgs, dir, baseEnv));
    state.brokerPid = brokerPid;
    state.brokerUrl = brokerUrl;
    saveState();
    say.result(`listening on ${brokerUrl} (pid ${brokerPid})`);

    say.section('the agent: an identity, and a kubeconfig that holds no secret');
    say.step('an administrator (the policy\'s administrators: a ServiceAccount token with the broker\'s audience here) registers the agent: a one-time enrolment code, 15 minutes, good once');
    await must(['kubectl', 'create', 'serviceaccount', ADMIN, '-n', 'admins'], admin);
    const adminToken = await must(['kubectl', 'create', 'token', ADMIN, '-n', 'admins', '--audience', 'task-broker', '--duration', '1h'], admin, { secret: true });
    writeFileSync(paths.adminToken, adminToken.stdout.trim() + '\n', { mode: 0o600 });
    say.result('-> $DEMO/admin.token');
    const asBrokerUser = { ...baseEnv, BROKER_URL: brokerUrl, BROKER_CA: tls.cert };
    const code = await must(['broker', 'agent', 'register', AGENT], { ...asBrokerUser, BROKER_IDENTITY_TOKEN_FILE: paths.adminToken }, { secret: true });
    say.step("on the agent's host: an Ed25519 key pair; the public half goes to the broker with the code, the private half stays (no OS keychain here: it is printed once and kept in this process's memory, never in a file)");
    const enrolled = await must(['broker', 'agent', 'enroll', code.stdout.trim(), '--print-key'], asBrokerUser, { secret: true });
    const agentKey = /^BROKER_AGENT_KEY=(\S+)$/m.exec(enrolled.stdout)?.[1];
    if (!agentKey) throw new BrokerError('internal', '`broker agent enroll --print-key` printed no BROKER_AGENT_KEY');
    const agent = { ...asBrokerUser, BROKER_AGENT_KEY: agentKey, KUBECONFIG: paths.agentKubeconfig };
    say.note(`export BROKER_URL=${brokerUrl} BROKER_CA=${tls.cert} BROKER_AGENT_KEY=... KUBECONFIG=$DEMO/agent.kubeconfig`);
    await must(['broker', 'kubeconfig', '--task', TEMPLATE, '--output', paths.agentKubeconfig], agent);
    say.result(`-> $DEMO/agent.kubeconfig (user: the exec plugin \`broker credential --task ${TEMPLATE}\`; no token in it)`);

    // ---- check 1
    say.section('check 1, allowed path: what the agent ran, recorded from the API server\'s side');
    say.step('the agent starts a task: read-pods in demo, for 10 minutes at most');
    const first = await startTask(must, agent, 'check 1: read the pods in demo');
    const allowed = [
      ['kubectl', 'get', 'pods', '-n', 'demo'],
      ['kubectl', 'get', 'pod', 'web-1', '-n', 'demo'],
      ['kubectl', 'get', 'configmaps', '-n', 'demo'],
    ];
    say.step('kubectl, in the task\'s namespace');
    const allowedRuns = [];
    for (const argv of allowed) allowedRuns.push(await run(argv, agent));
    say.step('the agent ends the task: its access is revoked');
    await must(['broker', 'task', 'end', first.id], agent);
    const expected1 = [
      { verb: 'list', resource: 'pods', name: undefined, namespace: 'demo' },
      { verb: 'get', resource: 'pods', name: 'web-1', namespace: 'demo' },
      { verb: 'list', resource: 'configmaps', name: undefined, namespace: 'demo' },
    ];
    const kubectlOk = allowedRuns.every((r) => r.code === 0);
    const story1 = await say.waiting("the API server's audit webhook delivering the task's requests", () =>
      waitForStory(paths.audit, first.id, (story) => checkAllowed(story, expected1, kubectlOk).ok),
    );
    say.step('the recording of the task, from the broker\'s audit log');
    await run(['broker', 'audit', 'show', '--task', first.id, paths.audit], baseEnv);
    checks.push(checkAllowed(story1, expected1, kubectlOk));

    // ---- check 2
    say.section('check 2, denied path: a command outside the task\'s scope is refused, and recorded');
    say.step('another task, the same template');
    const second = await startTask(must, agent, 'check 2: try to delete a pod elsewhere');
    say.step('kubectl, outside the task: delete, in a namespace the template does not grant');
    const denied = await run(['kubectl', 'delete', 'pod', 'web-1', '-n', 'other'], agent);
    say.step('the agent ends the task');
    await must(['broker', 'task', 'end', second.id], agent);
    const story2 = await say.waiting("the API server's audit webhook delivering the denied request", () =>
      waitForStory(paths.audit, second.id, (story) => story.some(isDeniedDelete)),
    );
    say.step('the recording of the task');
    const shown2 = await run(['broker', 'audit', 'show', '--task', second.id, paths.audit], baseEnv);
    checks.push(checkDenied(story2, denied, shown2.stdout));

    // ---- check 3
    say.section('check 3, no resting access: with no task, nothing on the agent\'s side reaches the cluster');
    const mark = statSync(cluster.auditLog).size;
    const before = taskRequests(readFileSync(cluster.auditLog, 'utf8'), 'task-broker');
    say.step('the same kubeconfig, the same command, after the tasks ended');
    const after = await run(['kubectl', 'get', 'pods', '-n', 'demo'], agent);
    say.step('what the cluster still holds for tasks (as the administrator)');
    const leftovers = await run(['kubectl', 'get', 'serviceaccounts,secrets', '-n', 'task-broker', '-l', 'task-broker.dev/task-id'], admin);
    const bindings = await run(['kubectl', 'get', 'rolebindings', '-A', '-l', 'task-broker.dev/task-id'], admin);
    const since = readFileSync(cluster.auditLog).subarray(mark).toString('utf8');
    say.step("the API server's own audit log since then ($DEMO/cluster/audit.log)");
    const reached = taskRequests(since, 'task-broker', AGENT);
    say.result(`${reached.length} request${reached.length === 1 ? '' : 's'} from a task or agent identity (${before.length} while the tasks were active)`);
    checks.push(checkNoResting(after, reached.length, before.length, leftovers, bindings));

    // ---- check 4
    say.section('check 4, gated exec: refused without an approval, approved by someone else, run, recorded');
    say.step(`an approver: another identity, in the policy's approver group sre (a ServiceAccount here; a person's OIDC login elsewhere)`);
    await must(['kubectl', 'create', 'serviceaccount', APPROVER, '-n', 'approvers'], admin);
    const approverToken = await must(['kubectl', 'create', 'token', APPROVER, '-n', 'approvers', '--audience', 'task-broker', '--duration', '1h'], admin, { secret: true });
    writeFileSync(paths.approverToken, approverToken.stdout.trim() + '\n', { mode: 0o600 });
    say.result('-> $DEMO/approver.token');
    const approver = { ...asBrokerUser, BROKER_IDENTITY_TOKEN_FILE: paths.approverToken };
    say.step(`the agent asks for ${EXEC_TEMPLATE} (kubectl exec in demo's pods: create pods/exec is gated), without an approval`);
    await must(['broker', 'kubeconfig', '--task', EXEC_TEMPLATE, '--output', paths.execKubeconfig], agent);
    const execStart = ['broker', 'task', 'start', EXEC_TEMPLATE, '--namespace', 'demo', '--ttl', '10m', '--reason', 'check 4: look inside web-1'];
    const refused = await run(execStart, agent);
    const requestId = /request (ar-[0-9a-f]+)/.exec(refused.stderr)?.[1];
    const execArgv = ['kubectl', '--kubeconfig', paths.execKubeconfig, 'exec', 'web-1', '-n', 'demo', '--', ...EXEC_COMMAND];
    say.step('kubectl exec meanwhile: the exec plugin gets no credential for a task that waits for approval');
    const early = await run(execArgv, agent, { maxLines: 2 });
    say.step('the agent approving its own request is refused; the approver approves it');
    const selfApproved = requestId === undefined ? undefined : await run(['broker', 'approve', requestId], agent);
    const approved = requestId === undefined ? undefined : await run(['broker', 'approve', requestId, '--reason', 'check 4: the demo approves'], approver);
    say.step('the agent starts the task with the approval (--wait collects it), runs kubectl exec in web-1, ends the task');
    const execTask = await startTask(must, agent, [...execStart, '--wait']);
    const ran = await run(execArgv, agent);
    await must(['broker', 'task', 'end', execTask.id], agent);
    const story4 = await say.waiting("the API server's audit webhook delivering the exec", () =>
      waitForStory(paths.audit, execTask.id, (story) => story.some(isExecRecord) && story.some((r) => r.type === 'approval.granted')),
    );
    say.step('the recording of the task: who asked, who approved, the exec as the API server saw it');
    const shown4 = await run(['broker', 'audit', 'show', '--task', execTask.id, paths.audit], baseEnv);
    checks.push(checkExec({ refused, requestId, early, selfApproved, approved, ran, story: story4, shown: shown4.stdout }));

    if (interrupted) return;
    // ---- verdict
    say.section('result');
    for (const c of checks) say.verdict(c);
    const ok = checks.every((c) => c.ok);
    const seconds = ((Date.now() - started) / 1000).toFixed(1);
    say.summary(ok, ok ? `all ${checks.length} checks hold (${seconds} s)` : `${checks.filter((c) => !c.ok).length} of ${checks.length} checks failed (${seconds} s)`);
    if (!ok) process.exitCode = 1;
    if (opts.keep) {
      keep = true;
      say.explore(state, { ...paths, brokerCa: cluster.caFile }, kubectl);
    }
    if (json) printJson({ ok, checks, ...(keep ? { dir, pids: { broker: state.brokerPid, ...Object.fromEntries(cluster.components.map((c) => [c.name, c.pid])) } } : {}) });
  } catch (err) {
    // Interrupted: a step failed because the processes are being stopped; the handler exits (130).
    if (interrupted) return new Promise<void>(() => {});
    throw err;
  } finally {
    say.stopSpinner();
    if (!keep && !interrupted) {
      tearingDown = true;
      const stopped = await teardown(state, cluster);
      say.note(`stopped ${stopped.join(', ') || 'nothing'}; removed ${dir}`);
    }
    if (!interrupted) {
      process.off('SIGINT', onSignal);
      process.off('SIGTERM', onSignal);
    }
  }
}

/** `broker task start` (text output; by default the read-pods task, with this reason), parsed for the task id. */
async function startTask(
  must: (argv: string[], env: NodeJS.ProcessEnv) => Promise<Captured>,
  agent: NodeJS.ProcessEnv,
  reasonOrArgv: string | string[],
): Promise<{ id: string }> {
  const argv = typeof reasonOrArgv === 'string' ? ['broker', 'task', 'start', TEMPLATE, '--namespace', 'demo', '--ttl', '10m', '--reason', reasonOrArgv] : reasonOrArgv;
  const res = await must(argv, agent);
  const id = /\(([a-z0-9-]+)\)/.exec(res.stdout)?.[1];
  if (!id) throw new BrokerError('internal', `broker task start printed no task id: ${res.stdout}`);
  return { id };
}

/**
 * The broker's records of one task, once `complete` says they hold what is expected, or after
 * `timeoutMs` (the webhook delivers in batches, at most a second apart, and retries what failed).
 */
async function waitForStory(auditLog: string, taskId: string, complete: (story: AuditRecord[]) => boolean, timeoutMs = 20_000): Promise<AuditRecord[]> {
  const { readAuditFile, select } = await import('../audit/show.ts');
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const { records, chain } = await readAuditFile(auditLog);
    if (!chain.ok) throw new BrokerError('audit_chain_broken', `${auditLog}: broken at line ${chain.line}: ${chain.reason}`);
    const story = select(records, { task: taskId }).stories[0]?.records ?? [];
    if (complete(story) || Date.now() > deadline) return story;
    await sleep(200);
  }
}

const isExecRecord = (r: AuditRecord) =>
  r.type === 'k8s.request' && r.outcome === 'allowed' && r.details?.['subresource'] === 'exec' && r.details?.['name'] === 'web-1' && r.namespace === 'demo';

const isDeniedDelete = (r: AuditRecord) => r.type === 'k8s.request' && r.outcome === 'denied' && r.details?.['verb'] === 'delete' && r.namespace === 'other';

interface ExpectedRequest {
  verb: string;
  resource: string;
  name: string | undefined;
  namespace: string;
}

function checkAllowed(story: AuditRecord[], expected: ExpectedRequest[], kubectlOk: boolean): Check {
  const name = '1, allowed path';
  if (!kubectlOk) return { name, ok: false, detail: 'a kubectl command inside the task failed' };
  const requests = story.filter((r) => r.type === 'k8s.request');
  const minted = new Set(story.filter((r) => r.type === 'credential.minted' && r.jti).map((r) => r.jti));
  let i = 0;
  for (const r of requests) {
    const e = expected[i];
    if (!e) break;
    const d = r.details ?? {};
    if (r.outcome === 'allowed' && d['verb'] === e.verb && d['resource'] === e.resource && (d['name'] ?? undefined) === e.name && r.namespace === e.namespace) {
      if (r.agent !== AGENT) return { name, ok: false, detail: `the request "${e.verb} ${e.resource}" is recorded for agent ${r.agent ?? '(none)'}, not ${AGENT}` };
      if (!r.jti || !minted.has(r.jti)) return { name, ok: false, detail: `the request "${e.verb} ${e.resource}" carries no credential JTI the broker minted for the task` };
      i++;
    }
  }
  if (i < expected.length) {
    return { name, ok: false, detail: `the recording holds ${i} of the ${expected.length} kubectl requests in order (missing: ${expected[i]!.verb} ${expected[i]!.resource})` };
  }
  const types = story.map((r) => r.type);
  if (!types.includes('task.started') || !types.includes('task.ended')) return { name, ok: false, detail: 'the recording lacks the start or the end of the task' };
  return { name, ok: true, detail: `the recording holds the task's ${expected.length} kubectl commands, in order, as the API server saw them, each with agent ${AGENT} and the credential JTI the broker minted` };
}

function checkDenied(story: AuditRecord[], kubectl: Captured, shown: string): Check {
  const name = '2, denied path';
  if (kubectl.code === 0) return { name, ok: false, detail: '`kubectl delete pod web-1 -n other` succeeded' };
  if (!/forbidden/i.test(kubectl.stderr)) return { name, ok: false, detail: `kubectl failed, but not with Forbidden: ${lastLine(kubectl.stderr)}` };
  const denial = story.find(isDeniedDelete);
  if (!denial) return { name, ok: false, detail: 'the API server denied the delete, but the recording does not hold it' };
  if (denial.details?.['decision'] !== 'forbid') return { name, ok: false, detail: `the recorded denial has decision ${String(denial.details?.['decision'])}, not forbid` };
  if (!/DENY delete pods\/web-1 -n other/.test(shown)) return { name, ok: false, detail: '`broker audit show` does not print the denial as DENY' };
  return { name, ok: true, detail: `the API server refused \`kubectl delete pod web-1 -n other\` (${String(denial.details?.['code'] ?? '403')}, decision forbid), and the recording holds it as DENY, with agent ${denial.agent} and JTI ${denial.jti}` };
}

function checkNoResting(kubectl: Captured, reached: number, before: number, leftovers: Captured, bindings: Captured): Check {
  const name = '3, no resting access';
  if (kubectl.code === 0) return { name, ok: false, detail: 'kubectl still worked after the tasks ended' };
  if (!/no active task/.test(kubectl.stderr)) return { name, ok: false, detail: `kubectl failed, but not with the plugin's "no active task": ${lastLine(kubectl.stderr)}` };
  if (before === 0) return { name, ok: false, detail: "the API server's audit log shows no request of the tasks at all: it cannot show that none came later" };
  if (reached > 0) return { name, ok: false, detail: `${reached} request(s) of a task or agent identity reached the API server after the tasks ended` };
  const none = (r: Captured) => r.code === 0 && /No resources found/.test(r.stdout + r.stderr);
  if (!none(leftovers) || !none(bindings)) return { name, ok: false, detail: 'ServiceAccounts, Secrets or RoleBindings of the ended tasks are still in the cluster' };
  return { name, ok: true, detail: `after the tasks ended kubectl got the plugin's "no active task", and the API server's own audit log shows no request of a task or agent identity since (${before} while the tasks were active); no task object is left` };
}

function checkExec(o: {
  refused: Captured;
  requestId: string | undefined;
  early: Captured;
  selfApproved: Captured | undefined;
  approved: Captured | undefined;
  ran: Captured;
  story: AuditRecord[];
  shown: string;
}): Check {
  const name = '4, gated exec';
  if (o.refused.code !== 3 || !/\[approval_required\]/.test(o.refused.stderr) || o.requestId === undefined) {
    return { name, ok: false, detail: `\`broker task start ${EXEC_TEMPLATE}\` without an approval was not refused with approval_required (exit ${o.refused.code})` };
  }
  if (o.early.code === 0) return { name, ok: false, detail: 'kubectl exec worked before the approval' };
  if (!o.early.stderr.includes(`needs approval (request ${o.requestId})`)) return { name, ok: false, detail: `kubectl exec failed before the approval, but not with the plugin's "needs approval": ${lastLine(o.early.stderr)}` };
  if (o.selfApproved?.code === 0 || !/\[forbidden\]/.test(o.selfApproved?.stderr ?? '')) return { name, ok: false, detail: 'the agent approving its own request was not refused' };
  if (o.approved?.code !== 0) return { name, ok: false, detail: `the approver could not approve ${o.requestId}: ${lastLine(o.approved?.stderr ?? '')}` };
  if (o.ran.code !== 0 || o.ran.stdout.trim() !== EXEC_OUTPUT) return { name, ok: false, detail: `kubectl exec in the approved task did not print ${EXEC_OUTPUT} (exit ${o.ran.code}): ${lastLine(o.ran.stderr || o.ran.stdout)}` };
  const granted = o.story.find((r) => r.type === 'approval.granted');
  if (!granted || granted.actor === `agent:${AGENT}`) return { name, ok: false, detail: 'the recording does not hold the approval by another identity' };
  if (!o.story.some((r) => r.type === 'approval.used')) return { name, ok: false, detail: 'the recording does not show the approval used to start the task' };
  const minted = new Set(o.story.filter((r) => r.type === 'credential.minted' && r.jti).map((r) => r.jti));
  const exec = o.story.find(isExecRecord);
  if (!exec) return { name, ok: false, detail: 'kubectl exec ran, but the recording does not hold it' };
  if (exec.agent !== AGENT || !exec.jti || !minted.has(exec.jti)) return { name, ok: false, detail: 'the recorded exec is not tied to the agent and a credential the broker minted for the task' };
  const line = new RegExp(`ALLOW ${String(exec.details?.['verb'])} pods/web-1/exec -n demo`);
  if (!line.test(o.shown)) return { name, ok: false, detail: '`broker audit show` does not print the exec' };
  return {
    name,
    ok: true,
    detail: `without an approval \`task start\` was refused (exit 3, request ${o.requestId}) and kubectl exec got no credential; the agent could not approve it, ${granted.actor} did; \`kubectl exec web-1\` printed ${EXEC_OUTPUT}; the recording holds the approval and the exec (${String(exec.details?.['verb'])} pods/web-1/exec, ${String(exec.details?.['code'])}) with agent ${AGENT} and JTI ${exec.jti}`,
  };
}

/** Events in an API server audit log (JSON Lines) made by task ServiceAccounts, or by the agent's own identity. */
function taskRequests(text: string, taskNamespace: string, agent?: string): unknown[] {
  const out: unknown[] = [];
  for (const line of text.split('\n')) {
    if (!line) continue;
    let event: { user?: { username?: string } };
    try {
      event = JSON.parse(line) as typeof event;
    } catch {
      continue; // a line being written
    }
    const user = event.user?.username ?? '';
    if (user.startsWith(`system:serviceaccount:${taskNamespace}:`) || (agent !== undefined && user === `system:serviceaccount:agents:${agent}`)) out.push(event);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Processes and files

/** The CLI entry this process runs (dist/cli/main.js under bin/broker, or src/cli/main.ts). */
function brokerEntry(): string[] {
  const entry = process.argv[1];
  if (!entry) throw new BrokerError('internal', 'cannot tell which broker entry point is running');
  return [resolve(entry)];
}

interface Captured {
  code: number | null;
  stdout: string;
  stderr: string;
}

function capture(argv: string[], env: NodeJS.ProcessEnv, timeoutMs = 60_000): Promise<Captured> {
  return new Promise((done, fail) => {
    const child = spawn(argv[0]!, argv.slice(1), { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.once('error', fail);
    child.once('close', (code) => {
      clearTimeout(timer);
      done({ code, stdout, stderr });
    });
  });
}

/** Starts `broker serve` in its own process group (it outlives this process with --keep); resolves with its pid once it listens. */
async function startBroker(broker: string[], args: string[], dir: string, env: NodeJS.ProcessEnv): Promise<number> {
  const logPath = join(dir, 'broker.log');
  const log = openSync(logPath, 'a', 0o600);
  const child = spawn(broker[0]!, [...broker.slice(1), ...args], { env, detached: true, stdio: ['ignore', log, log] });
  closeSync(log);
  const pid = child.pid;
  if (pid === undefined) throw new BrokerError('internal', 'could not start broker serve');
  let exited: string | undefined;
  child.once('exit', (code, signal) => (exited = `exited with ${signal ?? code}`));
  child.unref();
  const deadline = Date.now() + 30_000;
  for (;;) {
    const text = readFileSync(logPath, 'utf8');
    if (/^listening on /m.test(text)) return pid;
    if (exited || Date.now() > deadline) {
      if (!exited) killQuietly(pid, 'SIGKILL');
      throw new BrokerError('internal', `broker serve ${exited ?? 'did not listen within 30 s'}:\n${text.trimEnd().split('\n').slice(-10).join('\n')}`);
    }
    await sleep(100);
  }
}

/**
 * Stops the broker (first: it hands its Lease back to the API server), then the cluster (the node,
 * which ends its containers, the controllers, then the API server), by pid; removes the directory.
 */
async function teardown(state: DemoState, cluster?: { components: ClusterComponent[]; stop(): Promise<void> }): Promise<string[]> {
  const stopped: string[] = [];
  if (state.brokerPid !== undefined && ownedBy(state.brokerPid, state.dir)) {
    await stopPid(state.brokerPid, 10_000);
    stopped.push(`broker (pid ${state.brokerPid})`);
  }
  const named = (c: { name: string; pid: number }) => `${c.name} (pid ${c.pid})`;
  if (cluster) {
    await cluster.stop();
    stopped.push(...cluster.components.map(named));
  } else if (existsSync(join(state.clusterDir, 'cluster.json'))) {
    const { LocalCluster } = await import('../cluster/local-cluster.ts');
    const cs = LocalCluster.readState(state.clusterDir);
    const running = (cs.components ?? [{ name: 'kube-apiserver', pid: cs.pid }]).filter((c) => ownedBy(c.pid, state.clusterDir));
    if (running.length > 0) {
      await LocalCluster.stopDir(state.clusterDir);
      stopped.push(...running.map(named));
    }
  } else if (state.apiserverPid !== undefined && ownedBy(state.apiserverPid, state.clusterDir)) {
    await stopPid(state.apiserverPid, 15_000);
    stopped.push(`kube-apiserver (pid ${state.apiserverPid})`);
  }
  rmSync(state.dir, { recursive: true, force: true });
  return stopped;
}

/**
 * Whether `pid` is alive and still the process the demo started: its command line names the demo's
 * directory (so a pid reused by another process is never signalled). Without /proc, alive is enough.
 */
function ownedBy(pid: number, dir: string): boolean {
  try {
    process.kill(pid, 0);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EPERM') return false;
  }
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes(dir);
  } catch {
    return !existsSync('/proc/self');
  }
}

async function stopPid(pid: number, timeoutMs: number): Promise<void> {
  killQuietly(pid, 'SIGTERM');
  const deadline = Date.now() + timeoutMs;
  while (alive(pid)) {
    if (Date.now() > deadline) {
      killQuietly(pid, 'SIGKILL');
      await sleep(100);
      return;
    }
    await sleep(50);
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

function killQuietly(pid: number, signal: NodeJS.Signals): void {
  try {
    process.kill(pid, signal);
  } catch {
    // already gone
  }
}

function prepareDir(dir: string | undefined): string {
  if (dir === undefined) return mkdtempSync(join(tmpdir(), DIR_PREFIX));
  const abs = resolve(dir);
  if (existsSync(abs) && readdirSync(abs).length > 0) throw new BrokerError('invalid_argument', `${abs} exists and is not empty`, { field: '--dir' });
  mkdirSync(abs, { recursive: true, mode: 0o700 });
  return abs;
}


/** A kubeconfig (mode 0600) with a bearer token user. */
function tokenKubeconfig(server: string, caFile: string, token: string): string {
  return JSON.stringify(
    {
      apiVersion: 'v1',
      kind: 'Config',
      clusters: [{ name: 'local', cluster: { server, 'certificate-authority': caFile } }],
      users: [{ name: 'broker', user: { token } }],
      contexts: [{ name: 'local', context: { cluster: 'local', user: 'broker' } }],
      'current-context': 'local',
    },
    null,
    2,
  );
}

// ---------------------------------------------------------------------------------------------
// `broker demo down`

async function demoDown(opts: DownOptions): Promise<void> {
  const dir = resolve(opts.dir ?? process.env['TASK_BROKER_DEMO_DIR'] ?? onlyDemoDir());
  let state: DemoState;
  try {
    state = JSON.parse(readFileSync(join(dir, STATE_FILE), 'utf8')) as DemoState;
  } catch {
    throw new BrokerError('not_found', `no demo in ${dir} (${STATE_FILE} is missing)`, { field: '--dir' });
  }
  // The directory given, whatever the file says: never remove another one.
  const stopped = await teardown({ ...state, dir, clusterDir: join(dir, 'cluster') });
  if (opts.output === 'json') printJson({ stopped, removed: dir });
  else process.stdout.write(`stopped ${stopped.join(', ') || 'nothing (no process was left running)'}; removed ${dir}\n`);
}

function onlyDemoDir(): string {
  const found = readdirSync(tmpdir())
    .filter((name) => name.startsWith(DIR_PREFIX))
    .map((name) => join(tmpdir(), name))
    .filter((path) => existsSync(join(path, STATE_FILE)));
  if (found.length === 1) return found[0]!;
  throw new BrokerError(
    'not_found',
    found.length === 0 ? `no demo directory in ${tmpdir()}: give --dir` : `several demo directories (${found.join(', ')}): give --dir`,
    { field: '--dir' },
  );
}

// ---------------------------------------------------------------------------------------------
// Output

/** Prints the walk-through: sections, numbered steps, each command and its result; a spinner while waiting (terminal only). */
class Narrator {
  readonly #out: NodeJS.WriteStream;
  readonly #tty = process.stderr.isTTY === true;
  readonly #colour: boolean;
  #step = 0;
  #dir = '';
  #spinner: NodeJS.Timeout | undefined;

  constructor(out: NodeJS.WriteStream) {
    this.#out = out;
    this.#colour = out.isTTY === true && !process.env['NO_COLOR'];
  }

  setDir(dir: string): void {
    this.#dir = dir;
  }

  line(text: string): void {
    this.#out.write(`${this.#short(text)}\n`);
  }

  section(title: string): void {
    this.line('');
    this.line(this.#paint(style.ok, `== ${title}`));
  }

  step(title: string): void {
    this.line(`[${++this.#step}] ${title}`);
  }

  command(text: string): void {
    this.line(`  $ ${text}`);
  }

  result(text: string): void {
    this.line(`    ${text}`);
  }

  note(text: string): void {
    this.line(this.#paint(style.dim, `  ${text}`));
  }

  output(res: Captured, maxLines = 20): void {
    const lines = [...res.stdout.split('\n'), ...res.stderr.split('\n')].filter((l) => l.trim() !== '');
    const shown = lines.length > maxLines ? [...lines.slice(0, maxLines - 1), `... (${lines.length - maxLines + 1} more lines)`] : lines;
    for (const l of shown) this.result(printableLine(l));
    if (res.code !== 0) this.result(this.#paint(style.error, `(exit ${res.code})`));
  }

  summary(ok: boolean, text: string): void {
    this.line(this.#paint(ok ? style.ok : style.error, text));
  }

  verdict(c: Check): void {
    const mark = c.ok ? this.#paint(style.ok, 'PASS') : this.#paint(style.error, 'FAIL');
    this.line(`${mark} check ${c.name}: ${c.detail}`);
  }

  /** Runs `work` with a spinner and the elapsed time on a terminal (stderr); nothing elsewhere. */
  async waiting<T>(text: string, work: () => Promise<T>): Promise<T> {
    if (!this.#tty) return work();
    const started = Date.now();
    const frames = '⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏';
    let frame = 0;
    const label = this.#short(text).slice(0, Math.max(20, (process.stderr.columns || 80) - 16));
    const draw = () => process.stderr.write(`\r\x1b[K${frames[frame++ % frames.length]} ${label} (${((Date.now() - started) / 1000).toFixed(1)} s)`);
    this.#spinner = setInterval(draw, 100);
    try {
      return await work();
    } finally {
      this.stopSpinner();
    }
  }

  stopSpinner(): void {
    if (this.#spinner === undefined) return;
    clearInterval(this.#spinner);
    this.#spinner = undefined;
    process.stderr.write('\r\x1b[K');
  }

  /** After --keep: what is running and how to explore it. */
  explore(
    state: DemoState,
    paths: { adminKubeconfig: string; audit: string; adminToken: string; agentKubeconfig: string; approverToken: string; execKubeconfig: string; brokerCa: string },
    kubectl: string,
  ): void {
    const q = shellQuote;
    const bin = join(ROOT, 'bin');
    this.section('still running (--keep)');
    this.#out.write(
      [
        `${(state.components ?? []).map((c) => `${c.name} pid ${c.pid}`).join(', ')}, broker pid ${state.brokerPid} at ${state.brokerUrl}; everything is in ${state.dir}`,
        'the tokens last one hour. To explore, as the agent:',
        '',
        `  export PATH=${q(bin)}:${q(dirname(kubectl))}:"$PATH" TASK_BROKER_DEMO_DIR=${q(state.dir)}`,
        `  export BROKER_URL=${state.brokerUrl} BROKER_CA=${q(paths.brokerCa)} KUBECONFIG=${q(paths.agentKubeconfig)}`,
        `  # a key of your own for the agent (the demo's stayed in its memory): the administrator registers, you enrol`,
        `  export BROKER_AGENT_KEY=$(broker agent enroll "$(BROKER_IDENTITY_TOKEN_FILE=${q(paths.adminToken)} broker agent register ${AGENT})" --print-key | sed -n 's/^BROKER_AGENT_KEY=//p')`,
        `  broker task start ${TEMPLATE} --namespace demo --ttl 10m --reason "exploring"`,
        '  kubectl get pods -n demo',
        '  kubectl get secrets -n demo                  # denied: not in the template',
        `  broker task end ${TEMPLATE}`,
        `  broker audit show --task ${TEMPLATE} ${q(paths.audit)}    # or --follow in another shell`,
        '',
        'a gated exec: the agent waits, the approver (another shell, the same exports) approves:',
        '',
        `  broker task start ${EXEC_TEMPLATE} --namespace demo --reason "exploring" --wait    # prints the request id`,
        `  BROKER_IDENTITY_TOKEN_FILE=${q(paths.approverToken)} broker approve ar-...    # the approver`,
        `  kubectl --kubeconfig ${q(paths.execKubeconfig)} exec web-1 -n demo -- sh -c 'echo hello from $HOSTNAME'`,
        `  broker task end ${EXEC_TEMPLATE}`,
        '',
        'as the administrator:',
        '',
        `  kubectl --kubeconfig ${q(paths.adminKubeconfig)} get rolebindings -A -l task-broker.dev/task-id`,
        `  tail -f ${q(join(state.clusterDir, 'audit.log'))}    # the API server's own audit log`,
        '',
        'and to stop it all:',
        '',
        `  broker demo down --dir ${q(state.dir)}`,
        '',
      ].join('\n'),
    );
  }

  #paint(f: (s: string) => string, s: string): string {
    return this.#colour ? f(s) : s;
  }

  /** Paths under the demo directory as $DEMO/..., so the lines stay short. */
  #short(text: string): string {
    const local = process.cwd() === resolve(ROOT) ? text.replaceAll(ROOT, '') : text;
    return this.#dir ? local.replaceAll(this.#dir, '$DEMO') : local;
  }
}

/** Output of a command, with control characters escaped (it may echo agent-chosen text). */
function printableLine(s: string): string {
  return s.replace(/[\u0000-\u0008\u000b-\u001f\u007f-\u009f]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`);
}

function lastLine(s: string): string {
  return s.trim().split('\n').at(-1) ?? '';
}

function shellLine(argv: string[]): string {
  return argv.map(shellQuote).join(' ');
}

function shellQuote(s: string): string {
  return /^[\w@%+=:,./-]+$/.test(s) ? s : `'${s.replaceAll("'", `'\\''`)}'`;
}
