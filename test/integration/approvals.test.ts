/**
 * Approvals for gated templates, against a real API server and real broker processes (two where it
 * matters): requests, N-of-M approvers, denial, expiry, single-use tokens, and every refusal audited.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createServer, type Server } from 'node:http';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { SignJWT, calculateJwkThumbprint, decodeJwt, decodeProtectedHeader, exportJWK, generateKeyPair } from 'jose';
import { EXIT } from '../../src/cli/exit-codes.ts';
import { verifyAuditFile } from '../../src/audit/verify.ts';
import { BrokerEnv, type BrokerProcess } from '../helpers/broker.ts';
import { kubectl, run, writeTokenKubeconfig } from '../helpers/kube.ts';

const BROKER = new URL('../../bin/broker', import.meta.url).pathname;
const POLICY = new URL('../fixtures/approvals-policy.yaml', import.meta.url).pathname;

describe('approvals', () => {
  let env: BrokerEnv;
  let a: BrokerProcess;
  let b: BrokerProcess;
  let hook: Server;
  const notifications: Array<Record<string, unknown>> = [];
  let hookFailures = 2;
  const tokens: Record<string, string> = {};

  before(async () => {
    // The notification webhook fails twice, then accepts: the broker must retry, and never wait for it.
    hook = createServer((req, res) => {
      let body = '';
      req.on('data', (d: Buffer) => (body += d));
      req.on('end', () => {
        if (hookFailures-- > 0) return void res.writeHead(500).end();
        notifications.push(JSON.parse(body) as Record<string, unknown>);
        res.writeHead(204).end();
      });
    });
    await new Promise<void>((done) => hook.listen(0, '127.0.0.1', done));
    const hookUrl = `http://127.0.0.1:${(hook.address() as { port: number }).port}/hook`;
    env = await BrokerEnv.start({ policyText: readFileSync(POLICY, 'utf8').replaceAll('NOTIFY_URL', hookUrl) });
    a = await env.startBroker({ auditLog: join(env.dir, 'a.jsonl') });
    b = await env.startBroker({ auditLog: join(env.dir, 'b.jsonl') });
    for (const [name, ns] of [['alpha', 'agents'], ['beta', 'agents'], ['alice', 'approvers'], ['bob', 'approvers'], ['carol', 'approvers']] as const) {
      tokens[name] = await env.agentToken(name, ns);
    }
  });
  after(async () => {
    await a?.stop();
    await b?.stop();
    await env?.stop();
    await new Promise((done) => hook?.close(done));
  });

  const cli = (who: string, args: string[], broker: BrokerProcess = a) =>
    run(BROKER, args, { PATH: process.env['PATH'], HOME: env.dir, BROKER_URL: broker.url, BROKER_IDENTITY_TOKEN: tokens[who], NO_COLOR: '1' });
  const records = () => [...a.auditRecords(), ...b.auditRecords()];
  /** Asks for a gated start and returns the request id from the refusal. */
  async function request(who: string, body: Record<string, unknown>, broker = a): Promise<string> {
    const res = await broker.request('POST', '/v1/tasks', tokens[who], body);
    assert.equal(res.status, 403, JSON.stringify(res.body));
    assert.equal(res.body.error.code, 'approval_required');
    assert.match(res.body.error.requestId, /^ar-[0-9a-f]{12}$/);
    return res.body.error.requestId as string;
  }
  async function approvedToken(who: string, body: Record<string, unknown>, approvers: string[]): Promise<{ id: string; token: string }> {
    const id = await request(who, body);
    let last: any;
    for (const approver of approvers) last = await a.request('POST', `/v1/approvals/${id}/approve`, tokens[approver], {});
    assert.equal(last.status, 200, JSON.stringify(last.body));
    assert.equal(last.body.state, 'approved');
    return { id, token: last.body.approvalToken as string };
  }

  test('a non-gated template starts with no approval at all', async () => {
    const res = await a.request('POST', '/v1/tasks', tokens['alpha'], { template: 'read-pods', namespace: 'team-a', name: 'plain' });
    assert.equal(res.status, 201, JSON.stringify(res.body));
    assert.equal(res.body.approvalId, undefined);
    assert.equal((await a.request('DELETE', '/v1/tasks/plain', tokens['alpha'])).status, 200);
  });

  test('happy path with --wait: the request waits, an approver approves, the task starts and its token reads secrets', async () => {
    const waiting = spawn(BROKER, ['task', 'start', 'read-secrets', '-n', 'team-a', '--name', 'waited', '--reason', 'rotate keys', '--wait', '-o', 'json'], {
      env: { PATH: process.env['PATH'], HOME: env.dir, BROKER_URL: a.url, BROKER_IDENTITY_TOKEN: tokens['alpha'], NO_COLOR: '1' },
    });
    let stdout = '';
    let stderr = '';
    waiting.stdout.on('data', (d: Buffer) => (stdout += d));
    waiting.stderr.on('data', (d: Buffer) => (stderr += d));
    for (let i = 0; i < 100 && !/waiting for approval of (ar-\w+)/.test(stderr); i++) await sleep(100);
    const id = /waiting for approval of (ar-\w+)/.exec(stderr)?.[1];
    assert.ok(id, stderr);

    const listed = await cli('bob', ['approvals', 'list', '--pending', '-o', 'json']);
    assert.ok(JSON.parse(listed.stdout).approvals.some((r: { id: string }) => r.id === id), listed.stdout);
    const approve = await cli('bob', ['approve', id, '--reason', 'looks right']);
    assert.equal(approve.code, 0, approve.stderr);
    assert.match(approve.stdout, new RegExp(`approved ${id}: 1/1 approvals, now approved`));

    const code = await new Promise<number | null>((done) => waiting.on('close', done));
    assert.equal(code, 0, stderr);
    assert.match(stderr, new RegExp(`${id} approved`));
    const task = JSON.parse(stdout) as { id: string; approvalId: string };
    assert.equal(task.approvalId, id);

    const cred = await a.request('POST', '/v1/tasks/waited/credential', tokens['alpha']);
    const kc = writeTokenKubeconfig(join(env.dir, 'waited.kubeconfig'), env.cluster, cred.body.token);
    assert.equal((await kubectl(kc, 'get', 'secrets', '-n', 'team-a')).code, 0, 'the approved grant is real');
    assert.notEqual((await kubectl(kc, 'get', 'secrets', '-n', 'team-b')).code, 0, 'and only where it was approved');

    const types = records().filter((r) => r.details?.approvalRequest === id || r.task === task.id).map((r) => r.type);
    for (const t of ['approval.requested', 'approval.granted', 'approval.token_issued', 'approval.used', 'task.started']) assert.ok(types.includes(t), `${t} in ${types}`);
    assert.equal((await a.request('DELETE', '/v1/tasks/waited', tokens['alpha'])).status, 200);
  });

  test('--wait on a terminal shows a spinner, and clears it when approved', async () => {
    // script(1) gives the command a pseudo-terminal, as a person's shell would.
    const command = `${BROKER} task start read-secrets -n team-b --name on-tty --wait`;
    const waiting = spawn('script', ['-q', '-e', '-c', command, '/dev/null'], {
      env: { PATH: process.env['PATH'], HOME: env.dir, BROKER_URL: a.url, BROKER_IDENTITY_TOKEN: tokens['alpha'], TERM: 'xterm' },
    });
    let out = '';
    waiting.stdout.on('data', (d: Buffer) => (out += d));
    for (let i = 0; i < 100 && !/ar-[0-9a-f]{12}/.test(out); i++) await sleep(100);
    await sleep(500);
    const id = /(ar-[0-9a-f]{12})/.exec(out)?.[1];
    assert.ok(id, out);
    assert.match(out, /\r\x1b\[K(\x1b\[2m)?[⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏](\x1b\[22m)? ar-[0-9a-f]{12}: 0\/1 approvals, pending/, 'spinner frames on the terminal');
    assert.equal((await a.request('POST', `/v1/approvals/${id}/approve`, tokens['alice'], {})).status, 200);
    const code = await new Promise<number | null>((done) => waiting.on('close', done));
    assert.equal(code, 0, out);
    assert.match(out, new RegExp(`\\r\\x1b\\[K${id} approved`));
    assert.match(out, /started(\x1b\[39m)? task on-tty/, "colour on a terminal");
    assert.equal((await a.request('DELETE', '/v1/tasks/on-tty', tokens['alpha'])).status, 200);
  });

  test('N of M: each approver counts once; the second distinct approval completes it', async () => {
    const id = await request('beta', { template: 'exec-pods', namespace: 'team-a', name: 'two-of-m' });
    const first = await a.request('POST', `/v1/approvals/${id}/approve`, tokens['alice'], { reason: 'ok' });
    assert.equal(first.status, 200);
    assert.equal(first.body.state, 'pending');
    assert.equal(first.body.approvals, 1);
    assert.equal(first.body.approvalToken, undefined);
    const again = await a.request('POST', `/v1/approvals/${id}/approve`, tokens['alice'], {});
    assert.equal(again.status, 403);
    assert.match(again.body.error.message, /has already decided/);
    // The second approval arrives at the other replica: the count is shared through the cluster.
    const second = await b.request('POST', `/v1/approvals/${id}/approve`, tokens['carol'], {});
    assert.equal(second.status, 200, JSON.stringify(second.body));
    assert.equal(second.body.state, 'approved');
    assert.equal(second.body.approvals, 2);
    const start = await a.request('POST', '/v1/tasks', tokens['beta'], { template: 'exec-pods', namespace: 'team-a', name: 'two-of-m', approvalToken: second.body.approvalToken });
    assert.equal(start.status, 201, JSON.stringify(start.body));
    assert.equal((await a.request('DELETE', '/v1/tasks/two-of-m', tokens['beta'])).status, 200);
  });

  test('deny ends the request; --wait reports it; the requester cannot approve its own; outsiders cannot decide', async () => {
    const id = await request('alpha', { template: 'read-secrets', namespace: 'team-b', name: 'denied' });
    const self = await cli('alpha', ['approve', id]);
    assert.equal(self.code, EXIT.error);
    assert.match(self.stderr, /who requested .* and cannot decide it \[forbidden\]/);
    const outsider = await cli('carol', ['approve', id]);
    assert.equal(outsider.code, EXIT.error);
    assert.match(outsider.stderr, /is not an approver of/);
    const nobody = await cli('beta', ['approve', id]);
    assert.equal(nobody.code, EXIT.error);
    const noReason = await cli('alice', ['deny', id]);
    assert.equal(noReason.code, EXIT.usage);
    const deny = await cli('alice', ['deny', id, '--reason', 'use read-pods']);
    assert.equal(deny.code, 0, deny.stderr);
    assert.match(deny.stdout, /now denied/);
    const late = await cli('bob', ['approve', id]);
    assert.match(late.stderr, /is denied \[approval_closed\]/);
    const shown = await a.request('GET', `/v1/approvals/${id}`, tokens['alpha']);
    assert.equal(shown.body.state, 'denied');
    assert.equal(shown.body.approvalToken, undefined);
    const refused = records().filter((r) => r.type === 'approval.refused' && r.details?.approvalRequest === id);
    assert.ok(refused.length >= 4, JSON.stringify(refused));
    assert.ok(records().some((r) => r.type === 'approval.denied' && r.reason === 'use read-pods'));
  });

  test('refused and audited: a replayed token, another requester, template, namespace or name, a changed claim, another key', async () => {
    const body = { template: 'read-secrets', namespace: 'team-a', name: 'single-use' };
    const { token } = await approvedToken('alpha', body, ['alice']);
    const attempt = (who: string, over: Record<string, unknown>, t = token, broker = a) =>
      broker.request('POST', '/v1/tasks', tokens[who], { ...body, ...over, approvalToken: t });

    const wrongRequester = await attempt('beta', {});
    assert.equal(wrongRequester.status, 403, JSON.stringify(wrongRequester.body));
    assert.match(wrongRequester.body.error.message, /issued to agent:alpha, not agent:beta/);
    assert.match((await attempt('alpha', { namespace: 'team-b' })).body.error.message, /for namespace "team-a", not "team-b"/);
    assert.match((await attempt('alpha', { template: 'exec-pods' })).body.error.message, /for template "read-secrets", not "exec-pods"/);
    assert.match((await attempt('alpha', { name: 'other' })).body.error.message, /for task "single-use", not "other"/);
    const [h, p, s] = token.split('.') as [string, string, string];
    const claims = decodeJwt(token);
    const tampered = `${h}.${Buffer.from(JSON.stringify({ ...claims, namespace: 'team-b' })).toString('base64url')}.${s}`;
    assert.match((await attempt('alpha', { namespace: 'team-b' }, tampered)).body.error.message, /signature verification failed/);
    const { privateKey } = await generateKeyPair('EdDSA', { crv: 'Ed25519', extractable: true });
    const forged = await new SignJWT(claims)
      .setProtectedHeader({ alg: 'EdDSA', kid: decodeProtectedHeader(token).kid!, typ: 'task-broker-approval+jwt' })
      .sign(privateKey);
    assert.match((await attempt('alpha', {}, forged)).body.error.message, /signature verification failed/);
    const ownKid = await generateKeyPair('EdDSA', { crv: 'Ed25519', extractable: true }).then(async (k) =>
      new SignJWT(claims).setProtectedHeader({ alg: 'EdDSA', kid: await calculateJwkThumbprint(await exportJWK(k.publicKey)), typ: 'task-broker-approval+jwt' }).sign(k.privateKey),
    );
    assert.match((await attempt('alpha', {}, ownKid)).body.error.message, /a key this broker does not have/);
    assert.equal(p.length > 0, true);

    // Used once (on replica b), then replayed (on replica a): refused.
    const used = await attempt('alpha', {}, token, b);
    assert.equal(used.status, 201, JSON.stringify(used.body));
    assert.equal((await b.request('DELETE', '/v1/tasks/single-use', tokens['alpha'])).status, 200);
    const replay = await attempt('alpha', {}, token, a);
    assert.equal(replay.status, 403, JSON.stringify(replay.body));
    assert.match(replay.body.error.message, /already used \(replay\)/);

    const refusals = records().filter((r) => r.type === 'approval.refused' && r.template !== undefined);
    for (const why of ['issued to', 'namespace', 'template', 'for task', 'signature', 'does not have', 'replay']) {
      assert.ok(refusals.some((r) => r.reason.includes(why)), `an approval.refused record for "${why}"`);
    }
    assert.ok(!JSON.stringify(records()).includes(token), 'approval tokens are never recorded, only their ids');
  });

  test('key rotation: tokens signed before keep working through "previous"; once it is removed, they are refused', async () => {
    const body = { template: 'read-secrets', namespace: 'team-a', name: 'rotated' };
    // Two tokens signed with the key in use now.
    const first = await approvedToken('beta', body, ['bob']);
    const second = await approvedToken('alpha', body, ['bob']);
    const { current, dropPrevious } = await env.rotateSigningKey();
    const start = await a.request('POST', '/v1/tasks', tokens['beta'], { ...body, approvalToken: first.token });
    assert.equal(start.status, 201, JSON.stringify(start.body));
    assert.equal((await a.request('DELETE', '/v1/tasks/rotated', tokens['beta'])).status, 200);
    const fresh = await approvedToken('beta', { ...body, name: 'rotated-2' }, ['bob']);
    assert.equal(decodeProtectedHeader(fresh.token).kid, current.kid, 'new tokens are signed with the new key');

    await dropPrevious();
    const refused = await a.request('POST', '/v1/tasks', tokens['alpha'], { ...body, approvalToken: second.token });
    assert.equal(refused.status, 403, JSON.stringify(refused.body));
    assert.match(refused.body.error.message, /a key this broker does not have/);
    const stillGood = await b.request('POST', '/v1/tasks', tokens['beta'], { ...body, name: 'rotated-2', approvalToken: fresh.token });
    assert.equal(stillGood.status, 201, JSON.stringify(stillGood.body));
    assert.equal((await b.request('DELETE', '/v1/tasks/rotated-2', tokens['beta'])).status, 200);
  });

  test('two replicas consuming the same token at once: exactly one start succeeds', async () => {
    const body = { template: 'read-secrets', namespace: 'team-b', name: 'race' };
    const { token } = await approvedToken('beta', body, ['bob']);
    const results = await Promise.all([a, b, a, b].map((broker) => broker.request('POST', '/v1/tasks', tokens['beta'], { ...body, approvalToken: token })));
    assert.deepEqual(results.map((r) => r.status).sort(), [201, 403, 403, 403].sort(), JSON.stringify(results.map((r) => r.body)));
    assert.equal((await a.request('DELETE', '/v1/tasks/race', tokens['beta'])).status, 200);
  });

  test('the exec plugin names the pending request of a gated task', async () => {
    const id = await request('alpha', { template: 'exec-pods', namespace: 'team-a', name: 'shell' });
    // Under a parent that has run no other child, as kubectl is on its first call (a long-lived parent
    // that ran children before looks like kubectl retrying, and gets the one-line form: docs/cli.md).
    const res = await run('/bin/sh', ['-c', '"$0" "$@"; exit $?', BROKER, 'credential', '--task', 'shell'], {
      PATH: process.env['PATH'],
      HOME: env.dir,
      BROKER_URL: a.url,
      BROKER_IDENTITY_TOKEN: tokens['alpha'],
      NO_COLOR: '1',
    });
    assert.equal(res.code, EXIT.approval_required);
    assert.match(res.stderr, new RegExp(`task "shell" needs approval \\(request ${id}\\)`));
    assert.match(res.stderr, new RegExp(`broker approve ${id}`));
    const start = await cli('alpha', ['task', 'start', 'exec-pods', '-n', 'team-a', '--name', 'shell']);
    assert.equal(start.code, EXIT.approval_required, 'the same request, and exit code 3');
    assert.match(start.stderr, new RegExp(`request ${id}; wait for it with: broker task start exec-pods --namespace team-a --name shell --wait \\(an approver runs: broker approve ${id}\\) \\[approval_required\\]`));
  });

  test('a pending request survives a broker restart and is approvable afterwards', async () => {
    const id = await request('beta', { template: 'read-secrets', namespace: 'team-a', name: 'survivor' }, b);
    await b.stop('SIGKILL');
    b = await env.startBroker({ auditLog: join(env.dir, 'b.jsonl') });
    const approve = await b.request('POST', `/v1/approvals/${id}/approve`, tokens['alice'], {});
    assert.equal(approve.status, 200, JSON.stringify(approve.body));
    assert.equal(approve.body.state, 'approved');
    // The requester collects its token from the request.
    const mine = await b.request('GET', `/v1/approvals/${id}`, tokens['beta']);
    assert.ok(mine.body.approvalToken);
    const theirs = await b.request('GET', `/v1/approvals/${id}`, tokens['bob']);
    assert.equal(theirs.body.approvalToken, undefined, 'only the requester collects it');
    const start = await b.request('POST', '/v1/tasks', tokens['beta'], { template: 'read-secrets', namespace: 'team-a', name: 'survivor', approvalToken: mine.body.approvalToken });
    assert.equal(start.status, 201, JSON.stringify(start.body));
    assert.equal((await b.request('DELETE', '/v1/tasks/survivor', tokens['beta'])).status, 200);
  });

  test('requests expire (15 s in this policy): no more decisions, and their tokens are refused', async () => {
    const body = { template: 'read-secrets', namespace: 'team-b', name: 'late' };
    const { id, token } = await approvedToken('alpha', body, ['alice']);
    assert.ok((decodeJwt(token).exp ?? 0) * 1000 <= Date.now() + 16_000, 'the token lives no longer than its request');
    const pendingId = await request('beta', { template: 'read-secrets', namespace: 'team-b', name: 'late' });
    await sleep(16_000);
    const expired = await a.request('POST', '/v1/tasks', tokens['alpha'], { ...body, approvalToken: token });
    assert.equal(expired.status, 403);
    assert.match(expired.body.error.message, /expired/);
    assert.equal((await a.request('GET', `/v1/approvals/${id}`, tokens['alpha'])).body.state, 'expired');
    const tooLate = await a.request('POST', `/v1/approvals/${pendingId}/approve`, tokens['bob'], {});
    assert.equal(tooLate.status, 409);
    assert.equal(tooLate.body.error.code, 'approval_closed');
  });

  test('each new request was announced on the webhook (after retries), and the audit chains verify', async () => {
    // Two deliveries failed (500) and were retried: every request made here arrives, in any order.
    const happy = (x: Record<string, unknown>) =>
      /^task-broker: agent alpha asks for template "read-secrets" in namespace team-a for 15 min\. 1 approval\(s\) needed: broker approve ar-\w+ \(the agent's reason: broker approvals list\)$/.test(String(x['text'])) &&
      x['reason'] === 'rotate keys';
    for (let i = 0; i < 100 && !notifications.some(happy); i++) await sleep(200);
    const n = notifications.find(happy);
    assert.ok(n, JSON.stringify(notifications.map((x) => x['text'])));
    assert.match(String(n['requestId']), /^ar-[0-9a-f]{12}$/);
    assert.equal(n['template'], 'read-secrets');
    assert.equal((await verifyAuditFile(a.auditLog)).ok, true);
    assert.equal((await verifyAuditFile(b.auditLog)).ok, true);
  });
});

