/**
 * The first hour (issue 10, items 1 and 5), as a user sees it through the `broker` CLI against real
 * broker processes and a real API server: whoami, templates, the history of ended and expired tasks,
 * approvals show, errors that name the next step, escaped agent text, plain HTTP versus TLS, and the
 * exit codes of docs/cli.md.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, type Server } from 'node:http';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { EXIT } from '../../src/cli/exit-codes.ts';
import { TaskHistory } from '../../src/tasks/history.ts';
import { BrokerEnv, mintToken, type BrokerProcess } from '../helpers/broker.ts';
import { run, type RunResult } from '../helpers/kube.ts';

const MAIN = new URL('../../src/cli/main.ts', import.meta.url).pathname;

const POLICY = `
apiVersion: task-broker/v1alpha1
kind: Policy
broker:
  taskNamespace: task-broker
  tokenTTL: 10m
  identityAudience: task-broker
  approvalRequestTTL: 10m
agents:
  - name: alpha
    identities: [{ serviceAccount: agents/alpha }]
  - name: beta
    identities: [{ serviceAccount: agents/beta }]
templates:
  - name: read-pods
    description: list and get pods
    namespaces: [team-a, team-b]
    rules:
      - { apiGroups: [""], resources: [pods], verbs: [get, list] }
    ttl: { default: 15m, max: 1h }
    agents: [alpha, beta]
  - name: configmap-writer
    namespaces: [team-a]
    rules:
      - { apiGroups: [""], resources: [configmaps], verbs: [get, create] }
    ttl: { default: 15m, max: 1h }
    agents: [beta]
  - name: exec-pods
    namespaces: [team-a]
    rules:
      - { apiGroups: [""], resources: [pods], verbs: [get] }
      - { apiGroups: [""], resources: [pods/exec], verbs: [create] }
    ttl: { default: 10m, max: 30m }
    agents: [alpha]
    approval: { approvers: [sre], required: 1 }
  - name: view-pods
    namespaces: [team-b]
    clusterRole: cli-ux-view-pods
    ttl: { default: 5m, max: 10m }
    agents: [alpha]
approvers:
  - name: sre
    members: [{ serviceAccount: approvers/alice }]
`;

/** What an agent could put in a reason: a colour change, a screen clear, a bidi override, a bell. */
const EVIL = 'fix \x1b[31mred\x1b[2J \u202egnp.exe\u0007 done, and a few words more';
const EVIL_ESCAPED = 'fix \\x1b[31mred\\x1b[2J \\u202egnp.exe\\x07 done, and a few words more';
const PLAIN = 'rotate the signing keys of the shop, and a few words more';

describe('the first hour through the CLI', () => {
  let env: BrokerEnv;
  let broker: BrokerProcess;
  const tokens: Record<string, string> = {};

  before(async () => {
    env = await BrokerEnv.start({
      policyText: POLICY,
      beforeApply: async (admin) => {
        await admin.rbac.createClusterRole({
          body: { metadata: { name: 'cli-ux-view-pods' }, rules: [{ apiGroups: [''], resources: ['pods'], verbs: ['get', 'list'] }] },
        });
      },
    });
    broker = await env.startBroker();
    for (const [name, ns] of [['alpha', 'agents'], ['beta', 'agents'], ['alice', 'approvers']] as const) tokens[name] = await env.agentToken(name, ns);
  });
  after(async () => {
    await broker?.stop();
    await env?.stop();
  });

  const cli = (who: string, args: string[], extra: NodeJS.ProcessEnv = {}): Promise<RunResult> =>
    run(process.execPath, [MAIN, ...args], { PATH: process.env['PATH'], HOME: env.dir, BROKER_URL: broker.url, BROKER_IDENTITY_TOKEN: tokens[who], NO_COLOR: '1', ...extra });
  const json = (res: RunResult) => {
    assert.equal(res.code, EXIT.ok, res.stderr);
    return JSON.parse(res.stdout);
  };

  test('whoami: an agent, and an approver who is no agent', async () => {
    assert.deepEqual(json(await cli('alpha', ['whoami', '-o', 'json'])), {
      subject: 'system:serviceaccount:agents:alpha',
      method: 'serviceAccount',
      agent: 'alpha',
      principal: 'agent:alpha',
      approverGroups: [],
      identitySource: 'BROKER_IDENTITY_TOKEN',
      broker: broker.url,
    });
    const text = await cli('alpha', ['whoami']);
    assert.equal(text.code, EXIT.ok, text.stderr);
    assert.match(text.stdout, /^subject +system:serviceaccount:agents:alpha$/m);
    assert.match(text.stdout, /^agent +alpha$/m);
    assert.match(text.stdout, /^identity +BROKER_IDENTITY_TOKEN$/m);

    const alice = json(await cli('alice', ['whoami', '-o', 'json']));
    assert.equal(alice.agent, null);
    assert.equal(alice.principal, 'identity:system:serviceaccount:approvers:alice');
    assert.deepEqual(alice.approverGroups, ['sre']);
    assert.match((await cli('alice', ['whoami'])).stdout, /^approver of +sre$/m);
  });

  test('templates: exactly what the caller may start, gated ones with what gates them and who approves', async () => {
    const { templates } = json(await cli('alpha', ['templates', '-o', 'json']));
    assert.deepEqual(templates, [
      { name: 'read-pods', description: 'list and get pods', namespaces: ['team-a', 'team-b'], ttl: { default: 900, max: 3600 }, gated: false },
      {
        name: 'exec-pods',
        namespaces: ['team-a'],
        ttl: { default: 600, max: 1800 },
        gated: true,
        gatedBecause: ['create pods/exec'],
        approval: { approvers: ['sre'], required: 1 },
      },
      { name: 'view-pods', namespaces: ['team-b'], ttl: { default: 300, max: 600 }, gated: false },
    ]);
    const text = await cli('alpha', ['templates']);
    assert.equal(text.code, EXIT.ok, text.stderr);
    const lines = text.stdout.trim().split('\n');
    assert.match(lines[0]!, /^NAME +NAMESPACES +TTL +GATED +APPROVERS$/);
    assert.match(lines[1]!, /^read-pods +team-a,team-b +15m \(max 1h\) +no +-$/);
    assert.match(lines[2]!, /^exec-pods +team-a +10m \(max 30m\) +yes: create pods\/exec +1 of sre$/);
    assert.equal(lines.length, 4);
    assert.deepEqual(json(await cli('beta', ['templates', '-o', 'json'])).templates.map((t: { name: string }) => t.name), ['read-pods', 'configmap-writer']);
    assert.deepEqual(json(await cli('alice', ['templates', '-o', 'json'])).templates, [], 'an approver who is no agent may start nothing');
    assert.match((await cli('alice', ['templates'])).stdout, /no templates you may start/);
  });

  test('an ended task stays in the history: task list --all, task show, and what to do next', async () => {
    json(await cli('alpha', ['task', 'start', 'read-pods', '--namespace', 'team-b', '--name', 'hist', '--reason', 'look', '-o', 'json']));
    const ended = json(await cli('alpha', ['task', 'end', 'hist', '-o', 'json']));

    const active = json(await cli('alpha', ['task', 'list', '-o', 'json'])).tasks;
    assert.ok(!active.some((t: { name: string }) => t.name === 'hist'), 'task list shows active tasks only');
    const all = json(await cli('alpha', ['task', 'list', '--all', '-o', 'json'])).tasks;
    const entry = all.find((t: { id: string }) => t.id === ended.id);
    assert.equal(entry.state, 'ended');
    assert.equal(entry.template, 'read-pods');
    assert.equal(entry.namespace, 'team-b');
    assert.equal(entry.endedBy, 'agent:alpha');
    assert.ok(Math.abs(Date.parse(entry.endedAt) - Date.now()) < 60_000, 'endedAt is an absolute time in JSON');

    const table = await cli('alpha', ['task', 'list', '--all']);
    assert.match(table.stdout, /^NAME +ID +TEMPLATE +NAMESPACE +STATE +EXPIRES +ENDED$/m);
    assert.match(table.stdout, new RegExp(`^hist +${ended.id} +read-pods +team-b +ended +- +(now|\\d+s ago)$`, 'm'));

    const show = await cli('alpha', ['task', 'show', 'hist']);
    assert.equal(show.code, EXIT.ok, show.stderr);
    assert.match(show.stdout, /^state +ended$/m);
    assert.match(show.stdout, /^ended +(now|\d+s ago) \(\d{4}-\d\d-\d\dT[^)]+Z\) by agent:alpha$/m);
    assert.match(show.stdout, /^reason +look$/m);
    assert.equal(json(await cli('alpha', ['task', 'show', ended.id, '-o', 'json'])).state, 'ended');
    // Another agent sees none of it.
    assert.equal((await cli('beta', ['task', 'show', ended.id])).code, EXIT.error);
    assert.ok(!json(await cli('beta', ['task', 'list', '--all', '-o', 'json'])).tasks.some((t: { id: string }) => t.id === ended.id));

    // No active task: when it ended, and the command with the real template and namespace.
    const again = await cli('alpha', ['task', 'end', 'hist']);
    assert.equal(again.code, EXIT.error);
    assert.match(
      again.stderr,
      /error: agent "alpha" has no active task "hist": it ended at \S+Z; start it again with: broker task start read-pods --namespace team-b --name hist \[no_active_task\]/,
    );
  });

  test('an expired task (TTL 10 s, ended by the sweeper) shows as expired', async () => {
    const started = json(await cli('alpha', ['task', 'start', 'read-pods', '--namespace', 'team-a', '--name', 'short', '--ttl', '10s', '-o', 'json']));
    let shown: { state: string; endedBy?: string; cause?: string } | undefined;
    for (const until = Date.now() + 40_000; Date.now() < until; await sleep(1000)) {
      shown = json(await cli('alpha', ['task', 'show', 'short', '-o', 'json']));
      if (shown!.state !== 'active') break;
    }
    assert.equal(shown?.state, 'expired');
    assert.equal(shown?.endedBy, 'system:sweeper');
    assert.match(shown?.cause ?? '', /TTL ran out/);
    const text = await cli('alpha', ['task', 'show', started.id]);
    assert.match(text.stdout, /^state +expired$/m);
    const cred = await cli('alpha', ['task', 'end', 'short']);
    assert.match(cred.stderr, /it expired at \S+Z; start it again with: broker task start read-pods --namespace team-a --name short/);
  });

  test('errors name the next step: did you mean, the allowed namespaces, the end command, the unit typed', async () => {
    const typo = await cli('alpha', ['task', 'start', 'read-pod', '--namespace', 'team-a']);
    assert.equal(typo.code, EXIT.error);
    assert.match(typo.stderr, /no template "read-pod" in the policy; did you mean "read-pods"\?; templates agent "alpha" may start: read-pods, exec-pods, view-pods \(template\) \[unknown_template\]/);
    const far = await cli('alpha', ['task', 'start', 'configmap-writer', '--namespace', 'team-a']);
    assert.match(far.stderr, /agent "alpha" may not start template "configmap-writer"; templates agent "alpha" may start: read-pods, exec-pods, view-pods/);

    const ns = await cli('alpha', ['task', 'start', 'read-pods', '--namespace', 'team-c']);
    assert.equal(ns.code, EXIT.error);
    assert.match(ns.stderr, /template "read-pods" does not allow namespace "team-c"; did you mean "team-a"\?; allowed: team-a, team-b \(namespace\) \[namespace_not_allowed\]/);

    json(await cli('alpha', ['task', 'start', 'read-pods', '--namespace', 'team-a', '--name', 'dup', '-o', 'json']));
    const dup = await cli('alpha', ['task', 'start', 'read-pods', '--namespace', 'team-a', '--name', 'dup']);
    assert.equal(dup.code, EXIT.error);
    assert.match(dup.stderr, /already has an active task "dup": end it with: broker task end dup \(or choose another --name\) \(name\) \[task_exists\]/);
    json(await cli('alpha', ['task', 'end', 'dup', '-o', 'json']));

    const ttl = await cli('alpha', ['task', 'start', 'read-pods', '--namespace', 'team-a', '--ttl', '90m']);
    assert.equal(ttl.code, EXIT.error);
    assert.match(ttl.stderr, /"ttl" 90m is above the range of template "read-pods": from 10s to 60m \(default 15m\) \(ttl\) \[ttl_out_of_range\]/);
    const hours = await cli('alpha', ['task', 'start', 'read-pods', '--namespace', 'team-a', '--ttl', '2h']);
    assert.match(hours.stderr, /"ttl" 2h is above the range .*: from 10s to 1h \(default 15m\)/);

    const never = await cli('alpha', ['task', 'show', 'read-pods']);
    assert.match(never.stderr, /no active task "read-pods"; start one with: broker task start read-pods --namespace NAMESPACE \(one of team-a, team-b\)/);
  });

  test('a gated template without --wait says how to wait and how an approver approves; approvals show and list tell the whole request, escaped', async () => {
    const res = await cli('alpha', ['task', 'start', 'exec-pods', '--namespace', 'team-a', '--name', 'dbg', '--ttl', '5m', '--reason', PLAIN]);
    assert.equal(res.code, EXIT.approval_required);
    const id = /request (ar-[0-9a-f]{12})/.exec(res.stderr)?.[1];
    assert.ok(id, res.stderr);
    assert.match(res.stderr, new RegExp(`wait for it with: broker task start exec-pods --namespace team-a --name dbg --ttl 5m --wait \\(an approver runs: broker approve ${id}\\)`));

    const show = await cli('alpha', ['approvals', 'show', id]);
    assert.equal(show.code, EXIT.ok, show.stderr);
    for (const line of [
      `request +${id}`,
      'state +pending, 0 of 1 approval\\(s\\)',
      'requester +system:serviceaccount:agents:alpha',
      'agent +alpha',
      'template +exec-pods',
      'namespace +team-a',
      'task name +dbg',
      'ttl +5m',
      'approvers +1 of sre',
      'decisions +none yet',
      'expires +in (9m|10m) \\(\\S+Z\\)',
    ]) {
      assert.match(show.stdout, new RegExp(`^${line}$`, 'm'), line);
    }
    assert.ok(show.stdout.includes(`reason     ${PLAIN}\n`), show.stdout);

    const list = await cli('alice', ['approvals', 'list']);
    assert.equal(list.code, EXIT.ok, list.stderr);
    assert.match(list.stdout, /^ID +STATE +AGENT +TEMPLATE +NAMESPACE +APPROVALS +EXPIRES +REASON$/m);
    assert.ok(list.stdout.includes(`${PLAIN.slice(0, 45)}...`), list.stdout);

    assert.equal((await cli('alice', ['approve', id, '--reason', 'ok'])).code, EXIT.ok);
    const approved = await cli('alice', ['approvals', 'show', id]);
    assert.match(approved.stdout, /^state +approved, 1 of 1 approval\(s\)$/m);
    assert.match(approved.stdout, /^decisions +approved by system:serviceaccount:approvers:alice \(identity:system:serviceaccount:approvers:alice\) (now|\d+s ago): ok$/m);
    const asJson = json(await cli('alice', ['approvals', 'show', id, '-o', 'json']));
    assert.equal(asJson.reason, PLAIN);
    assert.match(asJson.expiresAt, /^\d{4}-\d\d-\d\dT.*Z$/);
    assert.equal(asJson.approvalToken, undefined, 'show never prints an approval token');
  });

  test('control characters in free text: the broker refuses them; every view escapes them in what a broker answers', async () => {
    const refused = await cli('alpha', ['task', 'start', 'read-pods', '--namespace', 'team-a', '--name', 'ctl', '--reason', EVIL]);
    assert.equal(refused.code, EXIT.usage, refused.stderr);
    assert.match(refused.stderr, /"reason" must not contain control or bidirectional-override characters \(found U\+001B at position 4\) \(reason\) \[invalid_argument\]/);
    assert.notEqual((await cli('alpha', ['task', 'show', 'ctl'])).code, EXIT.ok, 'nothing was started');

    // A broker that still answers such text (an older one, or one whose records predate the check): a
    // stand-in on loopback, since the real broker no longer stores it.
    const now = Date.now();
    const task = { id: 'abc123abc123', name: 'ctl', agent: 'alpha', template: 'read-pods', namespace: 'team-a', createdAt: new Date(now).toISOString(), expiresAt: new Date(now + 600_000).toISOString(), reason: EVIL, state: 'active' };
    const approval = {
      id: 'ar-000000000001', requester: 'system:serviceaccount:agents:alpha', agent: 'alpha', template: 'exec-pods', namespace: 'team-a', name: 'dbg', ttl: 300,
      reason: EVIL, state: 'pending', required: 1, approvals: 0, approvers: ['sre'], decisions: [], createdAt: new Date(now).toISOString(), expiresAt: new Date(now + 600_000).toISOString(),
    };
    const stand = createServer((req, res) => {
      const body = req.url === '/v1/tasks/ctl' ? task : req.url === `/v1/approvals/${approval.id}` ? approval : req.url?.startsWith('/v1/approvals') ? { approvals: [approval] } : undefined;
      res.writeHead(body ? 200 : 404, { 'content-type': 'application/json' }).end(JSON.stringify(body ?? { error: { code: 'not_found', message: 'no' } }));
    });
    await new Promise<void>((done) => stand.listen(0, '127.0.0.1', done));
    try {
      const url = `http://127.0.0.1:${(stand.address() as { port: number }).port}`;
      const show = await cli('alpha', ['task', 'show', 'ctl'], { BROKER_URL: url });
      assert.equal(show.code, EXIT.ok, show.stderr);
      assert.ok(show.stdout.includes(`reason     ${EVIL_ESCAPED}\n`), show.stdout);
      const approvalShow = await cli('alpha', ['approvals', 'show', approval.id], { BROKER_URL: url });
      assert.ok(approvalShow.stdout.includes(`reason     ${EVIL_ESCAPED}\n`), approvalShow.stdout);
      const list = await cli('alice', ['approvals', 'list'], { BROKER_URL: url });
      assert.ok(list.stdout.includes(`${EVIL_ESCAPED.slice(0, 45)}...`), list.stdout);
      for (const out of [show.stdout, approvalShow.stdout, list.stdout]) assert.doesNotMatch(out, /[\x1b\u202e\x07]/, 'no control character reaches the terminal');
      const raw = json(await cli('alpha', ['task', 'show', 'ctl', '-o', 'json'], { BROKER_URL: url }));
      assert.equal(raw.reason, EVIL, 'JSON keeps the text (as JSON escapes)');
    } finally {
      await new Promise((done) => stand.close(done));
    }
  });

  test('broker run --wait waits for the approval of a gated template, runs the command, ends the task', async () => {
    const running = cli('alpha', ['run', 'exec-pods', '--namespace', 'team-a', '--name', 'runw', '--wait', '--timeout', '60s', '--', process.execPath, '-e', 'process.exit(7)']);
    let id: string | undefined;
    for (const until = Date.now() + 20_000; !id && Date.now() < until; await sleep(500)) {
      const { approvals } = json(await cli('alpha', ['approvals', 'list', '--pending', '-o', 'json']));
      id = approvals.find((a: { name: string }) => a.name === 'runw')?.id;
    }
    assert.ok(id, 'the run asked for an approval');
    assert.equal((await cli('alice', ['approve', id!])).code, EXIT.ok);
    const res = await running;
    assert.equal(res.code, 7, res.stderr);
    assert.match(res.stderr, new RegExp(`waiting for approval of ${id}`));
    assert.match(res.stderr, /broker run: task runw \(\w+\) started/);
    assert.match(res.stderr, /broker run: task \w+ ended/);
    assert.equal(json(await cli('alpha', ['task', 'show', 'runw', '-o', 'json'])).state, 'ended');
  });

  test('a token for the wrong audience: exit 4, the message stays generic, the hint names the audience expected', async () => {
    const wrong = await mintToken(env.admin, 'agents', 'alpha', [], 600);
    const res = await cli('alpha', ['whoami'], { BROKER_IDENTITY_TOKEN: wrong });
    assert.equal(res.code, EXIT.unauthenticated);
    assert.match(res.stderr, /authentication failed: .*\(identity from BROKER_IDENTITY_TOKEN\); the broker takes a Kubernetes ServiceAccount token with the audience "task-broker"/);
    const raw = await broker.request('GET', '/v1/whoami', wrong);
    assert.equal(raw.status, 401);
    assert.equal(raw.body.error.message, "authentication failed: the broker did not accept the caller's credential");
    assert.match(raw.body.error.hint, /audience "task-broker"/);
    assert.ok(!JSON.stringify(raw.body).includes(wrong.split('.')[1]!), 'nothing of the token is echoed');
  });

  test('https:// against a plain-HTTP broker, and http:// against TLS, are recognised and say what to use', async () => {
    const https = await cli('alpha', ['whoami'], { BROKER_URL: broker.url.replace('http://', 'https://') });
    assert.equal(https.code, EXIT.unavailable);
    assert.match(https.stderr, new RegExp(`the broker at ${broker.url.replace('http://', 'https://')} speaks plain HTTP: use http:// \\(loopback only\\)`));

    const tls = await env.startBroker({ auditLog: join(env.dir, 'tls.jsonl'), tls: env.cluster.servingCert });
    try {
      assert.match(tls.url, /^https:/);
      const plain = tls.url.replace('https://', 'http://');
      const res = await cli('alpha', ['whoami'], { BROKER_URL: plain });
      assert.equal(res.code, EXIT.unavailable);
      assert.match(res.stderr, new RegExp(`the broker at ${plain} speaks TLS: use ${tls.url}`));
      // And with https:// and its CA, it answers.
      assert.equal(json(await cli('alpha', ['whoami', '-o', 'json'], { BROKER_URL: tls.url, BROKER_CA: env.cluster.caFile })).agent, 'alpha');
    } finally {
      await tls.stop();
    }
  });

  test('no redirect is followed, and plain http:// to a host that is not loopback is refused before connecting', async () => {
    let hits = 0;
    const redirector: Server = createServer((req, res) => {
      hits++;
      res.writeHead(307, { location: `${broker.url}${req.url}` }).end();
    });
    await new Promise<void>((done) => redirector.listen(0, '127.0.0.1', done));
    try {
      const url = `http://127.0.0.1:${(redirector.address() as { port: number }).port}`;
      const res = await cli('alpha', ['whoami'], { BROKER_URL: url });
      assert.notEqual(res.code, EXIT.ok);
      assert.match(res.stderr, /answered 307, a redirect: redirects are refused/);
      assert.equal(hits, 1);
    } finally {
      await new Promise((done) => redirector.close(done));
    }
    const far = await cli('alpha', ['whoami'], { BROKER_URL: 'http://broker.invalid:8080' });
    assert.equal(far.code, EXIT.usage);
    assert.match(far.stderr, /the broker URL from BROKER_URL is plain http:\/\/ to broker\.invalid:8080, which is not loopback: use https:\/\//);
  });

  test('exit codes as docs/cli.md defines them', async () => {
    assert.equal((await cli('alpha', ['task', 'list'])).code, EXIT.ok);
    assert.equal((await cli('alpha', ['task', 'end', 'nothing-here'])).code, EXIT.error);
    assert.equal((await cli('alpha', ['task', 'start', 'read-pods'])).code, EXIT.usage);
    assert.equal((await cli('alpha', ['task', 'lst'])).code, EXIT.usage);
    assert.equal((await cli('alpha', ['task', 'start', 'exec-pods', '--namespace', 'team-a', '--name', 'codes'])).code, EXIT.approval_required);
    assert.equal((await cli('alpha', ['whoami'], { BROKER_IDENTITY_TOKEN: '', BROKER_IDENTITY_TOKEN_FILE: join(env.dir, 'missing') })).code, EXIT.unauthenticated);
    assert.equal((await cli('alpha', ['whoami'], { BROKER_URL: 'http://127.0.0.1:1' })).code, EXIT.unavailable);
  });

  test('a history entry changed outside the broker is ignored; entries past the retention are swept', async () => {
    json(await cli('beta', ['task', 'start', 'read-pods', '--namespace', 'team-a', '--name', 'forge', '-o', 'json']));
    const ended = json(await cli('beta', ['task', 'end', 'forge', '-o', 'json']));
    const ns = env.policy.broker.namespace;
    const name = `task-history-${ended.id}`;
    const cm = await env.admin.core.readNamespacedConfigMap({ name, namespace: ns });
    const entry = JSON.parse(cm.data!['entry']!);
    entry.task.namespace = 'team-b'; // a forger rewrites where it ran
    await env.admin.core.replaceNamespacedConfigMap({ name, namespace: ns, body: { ...cm, data: { entry: JSON.stringify(entry) } } });
    await sleep(3500); // the broker reuses one agent's history list for 3 s
    assert.ok(!json(await cli('beta', ['task', 'list', '--all', '-o', 'json'])).tasks.some((t: { id: string }) => t.id === ended.id), 'the forged entry is not shown');
    assert.equal((await cli('beta', ['task', 'show', 'forge'])).code, EXIT.error);

    // The sweeper's clean-up, with a retention of 0: every entry goes.
    const removed = await new TaskHistory(env.admin, ns, 0).sweep();
    assert.ok(removed >= 1);
    const left = await env.admin.core.listNamespacedConfigMap({ namespace: ns, labelSelector: 'task-broker.dev/kind=task-history' });
    assert.equal(left.items.length, 0);
  });
});
