/**
 * The Kubernetes API proxy with the whole local cluster (issue 13): kubectl's streaming and upgrade
 * paths through the broker, to containers that are local processes on the node. `logs -f`, `exec -i`
 * over WebSocket (the SPDY fallback refused, as docs/proxy.md says), `attach`, `port-forward` with a
 * request through it, `cp` both ways; an exec session's recording holds what was typed and what came
 * back; an upstream that never answers times out with 504 while other requests go on.
 *
 * The task is gated (create pods/exec), so it starts with an approval by another identity, as in
 * production. The API server's audit webhook is off: the recording is the gateway's.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { freePort, kubectlPath } from '../../src/cluster/local-cluster.ts';
import { EXIT } from '../../src/cli/exit-codes.ts';
import { BrokerEnv, type BrokerProcess } from '../helpers/broker.ts';
import { kubectl as adminKubectl, run, type RunResult } from '../helpers/kube.ts';
import { until } from '../helpers/wait.ts';

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
  - name: debug-shop
    description: look into the pods of shop, and run commands in them
    namespaces: [shop]
    rules:
      - { apiGroups: [""], resources: [pods], verbs: [get, list, watch] }
      - { apiGroups: [""], resources: [pods/log], verbs: [get] }
      - { apiGroups: [""], resources: [pods/exec, pods/attach, pods/portforward], verbs: [get, create] }
      - { apiGroups: [""], resources: [configmaps], verbs: [create] }
    ttl: { default: 20m, max: 30m }
    agents: [alpha]
    approval: { approvers: [sre], required: 1 }
approvers:
  - name: sre
    members:
      - serviceAccount: approvers/alice
`;

type Rec = Record<string, any>;


describe('Kubernetes API proxy on the whole cluster: logs, exec, attach, port-forward, cp, recorded', () => {
  let env: BrokerEnv;
  let broker: BrokerProcess;
  let agentEnv: NodeJS.ProcessEnv;
  let kc: string;
  let taskId: string;
  let scratch: string;
  const hangPort = { port: 0 };
  const webPort = { port: 0 };

  before(async () => {
    env = await BrokerEnv.start({ policyText: POLICY, cluster: { full: true } });
    broker = await env.startBroker({ tls: env.cluster.servingCert, extraArgs: ['--proxy-listen', '127.0.0.1:0', '--proxy-upstream-timeout', '3s'] });
    scratch = join(env.dir, 'scratch');
    mkdirSync(scratch);
    const base = { PATH: `${join(ROOT, '.node/node_modules/node/bin')}:${process.env['PATH']}`, HOME: env.dir, NO_COLOR: '1', BROKER_URL: broker.url, BROKER_CA: env.cluster.caFile };
    agentEnv = { ...base, BROKER_IDENTITY_TOKEN: await env.agentToken('alpha') };
    const approverEnv = { ...base, BROKER_IDENTITY_TOKEN: await env.agentToken('alice', 'approvers') };

    // The pods, as the administrator: processes on the node.
    const admin = env.cluster.kubeconfig;
    webPort.port = await freePort();
    hangPort.port = await freePort();
    const pods = [
      { name: 'shell', command: ['sh', '-c', 'sleep 3600'] },
      { name: 'talker', command: ['sh', '-c', 'i=0; while true; do i=$((i+1)); echo "line-$i"; sleep 0.2; done'] },
      { name: 'echo', command: ['sh', '-c', 'while read l; do echo "echo: $l"; done; echo bye'], stdin: true },
      { name: 'web', command: [process.execPath, '-e', `require('http').createServer((q, s) => s.end('hello through the proxy')).listen(${webPort.port}, '127.0.0.1')`] },
    ];
    await until('the namespace\'s default ServiceAccount', 30_000, async () => (await adminKubectl(admin, 'get', 'serviceaccount', 'default', '-n', 'shop')).code === 0);
    for (const p of pods) {
      const manifest = join(scratch, `${p.name}.json`);
      writeFileSync(
        manifest,
        JSON.stringify({
          apiVersion: 'v1',
          kind: 'Pod',
          metadata: { name: p.name, namespace: 'shop' },
          spec: { restartPolicy: 'Never', containers: [{ name: p.name, image: 'local', command: p.command, ...(p.stdin ? { stdin: true, stdinOnce: true } : {}) }] },
        }),
      );
      const res = await adminKubectl(admin, 'apply', '-f', manifest);
      assert.equal(res.code, 0, res.stderr);
    }
    for (const p of pods) {
      await until(`pod ${p.name} Running`, 60_000, async () => (await adminKubectl(admin, 'get', 'pod', p.name, '-n', 'shop', '-o', 'jsonpath={.status.phase}')).stdout === 'Running');
    }

    // The gated task: refused, approved by another identity, started.
    const cli = (args: string[], as: NodeJS.ProcessEnv) => run(BROKER, args, as);
    const refused = await cli(['task', 'start', 'debug-shop', '--namespace', 'shop', '--reason', 'debug checkout'], agentEnv);
    assert.equal(refused.code, EXIT.approval_required, refused.stderr);
    const requestId = /request (\S+);/.exec(refused.stderr)?.[1];
    assert.ok(requestId, refused.stderr);
    const approve = await cli(['approve', requestId, '--reason', 'on call'], approverEnv);
    assert.equal(approve.code, 0, approve.stderr);
    const start = await cli(['task', 'start', 'debug-shop', '--namespace', 'shop', '--reason', 'debug checkout', '--wait', '-o', 'json'], agentEnv);
    assert.equal(start.code, 0, start.stderr);
    taskId = (JSON.parse(start.stdout) as { id: string }).id;
    kc = join(env.dir, 'agent.kubeconfig');
    const kcRes = await cli(['kubeconfig', '--task', 'debug-shop', '--via', 'proxy', '-n', 'shop', '--output', kc], agentEnv);
    assert.equal(kcRes.code, 0, kcRes.stderr);
  });
  after(async () => {
    await broker?.stop();
    await env?.stop();
  });

  const k = (args: string[], options: { input?: string; env?: NodeJS.ProcessEnv } = {}): Promise<RunResult> =>
    run(kubectlPath(), ['--kubeconfig', kc, ...args], { ...agentEnv, ...options.env }, 60_000, options.input);
  const records = (): Rec[] => broker.auditRecords().filter((r) => r.task === taskId && r.type === 'k8s.request');
  /** Starts a long-running kubectl and resolves once its stdout matches `pattern`. */
  const kUntil = (args: string[], pattern: RegExp) =>
    new Promise<{ match: RegExpMatchArray; output: () => string; stop: () => void }>((resolve, reject) => {
      const child = spawn(kubectlPath(), ['--kubeconfig', kc, ...args], { env: agentEnv, stdio: ['ignore', 'pipe', 'pipe'] });
      let out = '';
      let err = '';
      const stop = () => child.kill('SIGKILL');
      const timer = setTimeout(() => {
        stop();
        reject(new Error(`kubectl ${args.join(' ')}: no ${pattern} in 30 s; stdout ${out}; stderr ${err}`));
      }, 30_000);
      child.stdout.on('data', (d: Buffer) => {
        out += d.toString();
        const m = pattern.exec(out);
        if (m) {
          clearTimeout(timer);
          resolve({ match: m, output: () => out, stop });
        }
      });
      child.stderr.on('data', (d: Buffer) => (err += d.toString()));
    });

  test('kubectl logs -f streams new lines through the proxy; the stream is recorded at its start and end', async () => {
    const follow = await kUntil(['logs', '-f', 'talker'], /line-(\d+)\n/);
    const first = Number(follow.match[1]);
    await until('more lines', 10_000, async () => new RegExp(`line-${first + 5}\\n`).test(follow.output()));
    follow.stop();
    await until('the end record of logs -f', 10_000, async () => records().some((r) => r.details.subresource === 'log' && r.details.phase === 'end'));
    const start = records().find((r) => r.details.subresource === 'log' && r.details.phase === 'start');
    assert.ok(start);
    assert.equal(start.details.kubectlCommand, 'kubectl logs');
  });

  test('kubectl exec -i over WebSocket: works, and the recording holds what was typed and what came back', async () => {
    const res = await k(['exec', '-i', 'shell', '--', 'sh', '-c', 'read x; echo "got $x"; echo oops >&2'], { input: 'secret-free-input-42\n' });
    assert.equal(res.code, 0, res.stderr);
    assert.equal(res.stdout, 'got secret-free-input-42\n');
    assert.match(res.stderr, /oops/);
    const end = await until('the exec session\'s end record', 10_000, async () => records().find((r) => r.details.subresource === 'exec' && r.details.phase === 'end'));
    assert.deepEqual(end.details.stream.command, ['sh', '-c', 'read x; echo "got $x"; echo oops >&2']);
    assert.equal(end.details.stream.protocol, 'v5.channel.k8s.io');
    assert.equal(end.details.stdinBytes, 'secret-free-input-42\n'.length);
    const rec = end.details.recording as { file: string; sha256: string; bytes: number };
    const raw = readFileSync(join(`${broker.auditLog}.sessions`, rec.file));
    assert.equal(createHash('sha256').update(raw).digest('hex'), rec.sha256, 'the hash on the chain is the recording\'s');
    const lines = raw.toString('utf8').trim().split('\n').map((l) => JSON.parse(l) as Rec);
    const sent = lines.filter((l) => l['ch'] === 'stdin').map((l) => Buffer.from(l['b64'], 'base64').toString()).join('');
    const back = lines.filter((l) => l['ch'] === 'stdout').map((l) => Buffer.from(l['b64'], 'base64').toString()).join('');
    assert.equal(sent, 'secret-free-input-42\n');
    assert.equal(back, 'got secret-free-input-42\n');

    // What a reviewer reads: the command, then the session inline.
    const show = await run(BROKER, ['audit', 'show', '--task', taskId, broker.auditLog], agentEnv);
    assert.equal(show.code, 0, show.stderr);
    assert.match(show.stdout, /\$ kubectl exec\n(.*\n)*?.*ALLOW get pods\/shell\/exec -n shop \[opened: sh -c read x; echo "got \$x"; echo oops >&2\]/);
    assert.match(show.stdout, /> secret-free-input-42\n(\s+[<!] .*\n)*?\s+< got secret-free-input-42\n/);
    assert.match(show.stdout, /\s+! oops\n/);
  });

  test('an exec the task\'s role does not allow: the API server\'s 403 relayed to the WebSocket client as it gave it, and recorded as denied', async () => {
    const { WebSocket } = await import('ws');
    const session = JSON.parse((await run(BROKER, ['credential', '--task', 'debug-shop', '--via', 'proxy'], agentEnv)).stdout).status.token as string;
    const proxy = readFileSync(kc, 'utf8').match(/server: (\S+)/)![1]!.replace(/^https/, 'wss');
    const refused = await new Promise<{ status: number; body: string }>((resolve, reject) => {
      const ws = new WebSocket(`${proxy}/api/v1/namespaces/default/pods/nothing/exec?command=ls&stdout=true`, ['v5.channel.k8s.io'], {
        headers: { authorization: `Bearer ${session}` },
        ca: readFileSync(env.cluster.caFile),
      });
      ws.on('open', () => reject(new Error('the upgrade was accepted')));
      ws.on('unexpected-response', (_req, res) => {
        let body = '';
        res.on('data', (d: Buffer) => (body += d.toString()));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
      });
      ws.on('error', () => undefined);
    });
    assert.equal(refused.status, 403);
    assert.match(refused.body, /"reason":"Forbidden"/);
    const denied = await until('the denial\'s record', 5_000, async () => records().find((r) => r.namespace === 'default' && r.details.subresource === 'exec'));
    assert.equal(denied.outcome, 'denied');
    assert.equal(denied.details.code, 403);
    assert.match(denied.reason, /cannot (get|create) resource "pods\/exec"/);
  });

  test('the SPDY fallback (KUBECTL_REMOTE_COMMAND_WEBSOCKETS=false) is refused with the kubectl that works named, and recorded', async () => {
    const res = await k(['exec', 'shell', '--', 'echo', 'hi'], { env: { KUBECTL_REMOTE_COMMAND_WEBSOCKETS: 'false' } });
    assert.notEqual(res.code, 0);
    assert.match(res.stderr, /kubectl 1\.30 or newer/);
    assert.doesNotMatch(res.stdout, /hi/);
    const refused = records().find((r) => r.details.refused === true && r.details.subresource === 'exec');
    assert.ok(refused, 'the refusal is recorded');
    assert.match(refused.reason, /SPDY/);
  });

  test('kubectl attach -i joins the container\'s stdin and stdout, recorded', async () => {
    const res = await k(['attach', '-i', 'echo'], { input: 'one\ntwo\n' });
    assert.equal(res.code, 0, res.stderr);
    assert.match(res.stdout, /echo: one\necho: two\nbye\n/);
    const end = await until('the attach end record', 10_000, async () => records().find((r) => r.details.subresource === 'attach' && r.details.phase === 'end'));
    assert.equal(end.details.stdinBytes, 'one\ntwo\n'.length);
  });

  test('kubectl port-forward through the proxy, and a request through it', async () => {
    const forward = await kUntil(['port-forward', 'pod/web', `:${webPort.port}`, '--address', '127.0.0.1'], /Forwarding from 127\.0\.0\.1:(\d+) ->/);
    try {
      const local = forward.match[1];
      const body = await until('an answer through the forward', 20_000, async () => {
        const res = await fetch(`http://127.0.0.1:${local}/`).catch(() => undefined);
        return res?.ok ? res.text() : undefined;
      });
      assert.equal(body, 'hello through the proxy');
    } finally {
      forward.stop();
    }
    const end = await until('the port-forward end record', 10_000, async () => records().find((r) => r.details.subresource === 'portforward' && r.details.phase === 'end'));
    assert.ok(end.details.bytesOut > 0);
  });

  test('kubectl cp both ways through the proxy', async () => {
    const local = join(scratch, 'in.txt');
    writeFileSync(local, 'from the host\n');
    const into = await k(['cp', local, 'shop/shell:in.txt']);
    assert.equal(into.code, 0, into.stderr);
    const cat = await k(['exec', 'shell', '--', 'cat', 'in.txt']);
    assert.equal(cat.stdout, 'from the host\n', `${cat.code} ${cat.stderr} ${into.stdout} ${into.stderr}`);
    const made = await k(['exec', 'shell', '--', 'sh', '-c', 'echo "from the pod" > out.txt']);
    assert.equal(made.code, 0, made.stderr);
    const back = join(scratch, 'out.txt');
    const out = await k(['cp', 'shop/shell:out.txt', back]);
    assert.equal(out.code, 0, out.stderr);
    assert.equal(readFileSync(back, 'utf8'), 'from the pod\n');
  });

  test('an upstream that never answers: that request gets a clear 504 in time; others are unaffected', async () => {
    // The API server waits on a validating admission webhook that accepts the connection and never
    // answers (10 s); the proxy gives up on the API server after 3 s (--proxy-upstream-timeout).
    const { createServer } = await import('node:https');
    const held = new Set<import('node:net').Socket>();
    const hook = createServer({ cert: readFileSync(env.cluster.servingCert.cert), key: readFileSync(env.cluster.servingCert.key) }, () => undefined);
    hook.on('secureConnection', (s) => held.add(s));
    await new Promise<void>((r) => hook.listen(hangPort.port, '127.0.0.1', r));
    const config = join(scratch, 'hang-webhook.json');
    writeFileSync(
      config,
      JSON.stringify({
        apiVersion: 'admissionregistration.k8s.io/v1',
        kind: 'ValidatingWebhookConfiguration',
        metadata: { name: 'hang' },
        webhooks: [
          {
            name: 'hang.task-broker.test',
            clientConfig: { url: `https://127.0.0.1:${hangPort.port}/hang`, caBundle: readFileSync(env.cluster.caFile).toString('base64') },
            rules: [{ operations: ['CREATE'], apiGroups: [''], apiVersions: ['v1'], resources: ['configmaps'] }],
            objectSelector: { matchLabels: { hang: 'yes' } },
            failurePolicy: 'Ignore',
            sideEffects: 'None',
            admissionReviewVersions: ['v1'],
            timeoutSeconds: 10,
          },
        ],
      }),
    );
    try {
      const applied = await adminKubectl(env.cluster.kubeconfig, 'apply', '-f', config);
      assert.equal(applied.code, 0, applied.stderr);
      const manifest = join(scratch, 'hang-cm.json');
      writeFileSync(manifest, JSON.stringify({ apiVersion: 'v1', kind: 'ConfigMap', metadata: { name: 'slow', namespace: 'shop', labels: { hang: 'yes' } } }));
      const t0 = performance.now();
      const hung = k(['create', '-f', manifest]);
      await until('the API server to call the webhook', 10_000, async () => held.size > 0);
      const t1 = performance.now();
      const other = await k(['get', 'pods', '-o', 'name']);
      const otherMs = performance.now() - t1;
      assert.equal(other.code, 0, other.stderr);
      assert.match(other.stdout, /pod\/shell/);
      const res = await hung;
      const hungMs = performance.now() - t0;
      assert.notEqual(res.code, 0);
      assert.match(res.stderr, /Timeout.*did not answer within 3 s/);
      assert.ok(hungMs < 8_000, `the hung request took ${hungMs.toFixed(0)} ms`);
      const timedOut = records().find((r) => r.details.resource === 'configmaps' && r.details.code === 504);
      assert.ok(timedOut, 'the timeout is recorded');
      assert.equal(timedOut.outcome, 'error');
      console.log(`# a hung request answered 504 after ${hungMs.toFixed(0)} ms; meanwhile \`kubectl get pods\` took ${otherMs.toFixed(0)} ms`);
    } finally {
      await adminKubectl(env.cluster.kubeconfig, 'delete', 'validatingwebhookconfiguration', 'hang');
      for (const sock of held) sock.destroy();
      hook.close();
    }
  });

  test('task end: the exec session open at the time is closed, and nothing more gets through', async () => {
    const { spawn: spawnChild } = await import('node:child_process');
    const child = spawnChild(kubectlPath(), ['--kubeconfig', kc, 'exec', '-i', 'shell', '--', 'sh', '-c', 'while read l; do echo "seen $l"; done'], { env: agentEnv, stdio: ['pipe', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stdin.write('first\n');
    await until('the session to answer', 10_000, async () => out.includes('seen first'));
    const exited = new Promise<number | null>((resolve) => child.once('exit', resolve));
    const end = await run(BROKER, ['task', 'end', taskId], agentEnv);
    assert.equal(end.code, 0, end.stderr);
    const code = await Promise.race([exited, sleep(5_000).then(() => 'still running')]);
    assert.notEqual(code, 'still running', 'the session was closed when its task ended');
    child.kill('SIGKILL');
    const after = await k(['get', 'pods']);
    assert.notEqual(after.code, 0);
    const closed = records().find((r) => r.details.subresource === 'exec' && r.details.phase === 'end' && /has ended/.test(r.reason ?? ''));
    assert.ok(closed, 'the session\'s end is recorded with why');
  });

  test('audit verify checks each session recording against the hash on the chain; a changed one fails it', async () => {
    const ok = await run(BROKER, ['audit', 'verify', broker.auditLog], agentEnv);
    assert.equal(ok.code, 0, ok.stderr);
    const checked = Number(/session recordings: (\d+) checked against their hashes in the log, all match/.exec(ok.stdout)?.[1]);
    assert.ok(checked >= 1, ok.stdout);
    const end = records().find((r) => r.details.subresource === 'exec' && r.details.phase === 'end' && r.details.recording);
    const file = join(`${broker.auditLog}.sessions`, end!.details.recording.file as string);
    // What was typed, made to look different (the recording holds it in base64).
    const typed = Buffer.from('secret-free-input-42\n').toString('base64');
    const text = readFileSync(file, 'utf8');
    assert.ok(text.includes(typed));
    writeFileSync(file, text.replace(typed, Buffer.from('innocent-input-0042\n').toString('base64')));
    const bad = await run(BROKER, ['audit', 'verify', broker.auditLog], agentEnv);
    assert.equal(bad.code, 1);
    assert.match(bad.stderr, new RegExp(`the chain holds, but 1 of the ${checked} session recordings? it names .* do(es)? not match: ${end!.details.recording.file.replace('.', '\\.')} \\(changed\\)`));
    const show = await run(BROKER, ['audit', 'show', '--task', taskId, broker.auditLog], agentEnv);
    assert.match(show.stdout, /its SHA-256 does not match the audit log: it was changed/);
  });
});
