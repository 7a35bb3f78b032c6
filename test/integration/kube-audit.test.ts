/**
 * Recording from the cluster's side: a real kube-apiserver whose audit webhook posts to a real broker
 * process (`broker serve --audit-webhook-token-file`), real kubectl with the task's token.
 *
 * The API server must know the webhook's URL when it starts, and the broker needs the cluster first
 * (its kubeconfig, the policy applied). So the port is chosen first: bound on port 0 and closed, then
 * the API server is started with its webhook at https://127.0.0.1:PORT/v1/audit/kubernetes, and every
 * broker of this file listens on exactly that port (restarts included: the API server retries what a
 * dead broker did not answer). Simpler than a forwarder, and the only race (another process taking
 * the port in between) is the one LocalCluster already lives with for its own port.
 *
 * Over TLS: client-go sends the webhook's bearer token to https servers only. The brokers serve with
 * the local API server's own loopback certificate, which LocalCluster's webhook trusts by default.
 */
import { after, before, describe, test } from 'node:test';
import { request as httpsRequest } from 'node:https';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import * as k8s from '@kubernetes/client-node';
import { freePort, LocalCluster } from '../../src/cluster/local-cluster.ts';
import { verifyAuditFile } from '../../src/audit/verify.ts';
import { kubeApis, type KubeApis } from '../../src/kube/config.ts';
import { applyPolicy } from '../../src/policy/apply.ts';
import { parsePolicy } from '../../src/policy/parse.ts';
import type { Policy } from '../../src/policy/types.ts';
import { outcomeOf, type KubeAuditEvent } from '../../src/audit/kube-events.ts';
import { readTailLines, SeenEvents } from '../../src/server/kube-audit.ts';
import type { Task } from '../../src/tasks/model.ts';
import { RecentTasks } from '../../src/tasks/recent.ts';
import type { TaskStore } from '../../src/tasks/store.ts';
import { BrokerProcess, mintToken, POLICY_FILE } from '../helpers/broker.ts';
import { adminConfig, kubectl, run, writeTokenKubeconfig } from '../helpers/kube.ts';
import { eventList, podEvent } from '../helpers/kube-audit-events.ts';
import { until } from '../helpers/wait.ts';

const MAIN = new URL('../../src/cli/main.ts', import.meta.url).pathname;
const PATH = '/v1/audit/kubernetes';
/** What every k8s.request record's details hold (some keys only when the event has them). */
const DETAIL_KEYS = ['auditID', 'verb', 'resource', 'subresource', 'apiGroup', 'apiVersion', 'name', 'requestURI', 'userAgent', 'sourceIPs', 'code', 'decision', 'stage', 'requestReceivedTimestamp', 'stageTimestamp', 'username'];

type Rec = Record<string, any>;



/** The complete records of a log (a torn last line is skipped). */
function records(path: string): Rec[] {
  return readFileSync(path, 'utf8')
    .split('\n')
    .filter(Boolean)
    .flatMap((l) => {
      try {
        return [JSON.parse(l) as Rec];
      } catch {
        return [];
      }
    });
}

const k8sRequests = (path: string) => records(path).filter((r) => r.type === 'k8s.request');


describe('audit webhook: the API server records task requests through the broker', () => {
  let dir: string;
  let port: number;
  let cluster: LocalCluster;
  let admin: KubeApis;
  let policy: Policy;
  let policyFile: string;
  let brokerKubeconfig: string;
  let tokenFile: string;
  let webhookToken: string;
  let alpha: string;
  let broker: BrokerProcess | undefined;
  const auditLog = () => join(dir, 'audit.jsonl');
  /** The running task of the tests: started once, on the first broker. */
  let task: { id: string; jti: string; token: string; kubeconfig: string };

  /** A request to a broker over TLS (its certificate is the API server's: trusted through cluster.caPem). */
  const call = (b: BrokerProcess, method: string, path: string, token?: string, body?: unknown, raw?: string) =>
    new Promise<{ status: number; body: any }>((done, fail) => {
      const data = raw ?? (body === undefined ? undefined : JSON.stringify(body));
      const headers: Record<string, string> = {};
      if (token) headers['authorization'] = `Bearer ${token}`;
      if (data !== undefined) headers['content-type'] = 'application/json';
      const req = httpsRequest(b.url + path, { method, headers, ca: cluster.caPem, timeout: 60_000 }, (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => {
          const text = Buffer.concat(chunks).toString();
          let parsed: unknown = text;
          try {
            parsed = JSON.parse(text);
          } catch {
            // not JSON (/metrics, /readyz)
          }
          done({ status: res.statusCode ?? 0, body: parsed });
        });
      });
      req.on('timeout', () => req.destroy(new Error('timeout')));
      req.on('error', fail);
      req.end(data);
    });

  const startBroker = async (options: { env?: NodeJS.ProcessEnv; shellPrefix?: string; webhook?: boolean; listen?: string; extra?: string[] } = {}) => {
    const args = [
      MAIN,
      'serve',
      '--config',
      policyFile,
      '--audit-log',
      auditLog(),
      '--kubeconfig',
      brokerKubeconfig,
      '--listen',
      options.listen ?? `127.0.0.1:${port}`,
      '--tls-cert',
      cluster.servingCert.cert,
      '--tls-key',
      cluster.servingCert.key,
      '--auth-failure-log-interval',
      '1s',
      ...(options.webhook === false ? [] : ['--audit-webhook-token-file', tokenFile]),
      ...(options.extra ?? []),
    ];
    return BrokerProcess.spawn(args, auditLog(), options.env, options.shellPrefix);
  };
  const post = (body: unknown, token: string | undefined = webhookToken, raw?: string) => call(broker!, 'POST', PATH, token, body, raw);
  const metric = async (b: BrokerProcess, name: string, labels: string) => {
    const text = (await call(b, 'GET', '/metrics')).body as string;
    const m = new RegExp(`^${name}\\{${labels}\\} (\\S+)$`, 'm').exec(text);
    return m ? Number(m[1]) : 0;
  };

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'tb-kube-audit-'));
    port = await freePort();
    webhookToken = randomBytes(32).toString('base64url');
    // initialBackoff 2s: the API server tries a batch 5 times over about 16 s (2, 3, 4.5, 6.75 s apart),
    // long enough for a test to restart a broker in between.
    cluster = await LocalCluster.start({ auditWebhook: { url: `https://127.0.0.1:${port}${PATH}`, token: webhookToken, initialBackoff: '2s' } });
    try {
      tokenFile = cluster.auditWebhookTokenFile!;
      assert.equal(statSync(tokenFile).mode & 0o777, 0o600);
      admin = kubeApis(adminConfig(cluster));
      const text = readFileSync(POLICY_FILE, 'utf8');
      policyFile = join(dir, 'policy.yaml');
      writeFileSync(policyFile, text);
      policy = parsePolicy(text, policyFile);
      for (const ns of ['team-a', 'team-b', 'other-ns', 'agents', policy.broker.namespace, policy.broker.taskNamespace]) {
        await admin.core.createNamespace({ body: { metadata: { name: ns } } }).catch((err) => {
          if (!(err instanceof k8s.ApiException && err.code === 409)) throw err;
        });
      }
      await applyPolicy(admin, policy, {});
      brokerKubeconfig = writeTokenKubeconfig(join(dir, 'broker.kubeconfig'), cluster, await mintToken(admin, policy.broker.namespace, policy.broker.serviceAccount, [], 3600));
      await admin.core.createNamespacedServiceAccount({ namespace: 'agents', body: { metadata: { name: 'alpha' } } });
      alpha = await mintToken(admin, 'agents', 'alpha', [policy.broker.identityAudience], 3600);

      broker = await startBroker();
      const start = await call(broker, 'POST', '/v1/tasks', alpha, { template: 'read-pods', namespace: 'team-a', name: 'inspect', reason: 'recorded' });
      assert.equal(start.status, 201, JSON.stringify(start.body));
      const cred = await call(broker, 'POST', '/v1/tasks/inspect/credential', alpha);
      assert.equal(cred.status, 200, JSON.stringify(cred.body));
      task = { id: start.body.id, jti: cred.body.jti, token: cred.body.token, kubeconfig: writeTokenKubeconfig(join(dir, 'task.kubeconfig'), cluster, cred.body.token) };
    } catch (err) {
      broker?.kill('SIGKILL');
      await cluster.stop();
      rmSync(dir, { recursive: true, force: true });
      throw err;
    }
  });
  after(async () => {
    await broker?.stop('SIGKILL');
    await cluster?.stop();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  const ofTask = () => k8sRequests(auditLog()).filter((r) => r.task === task.id);

  test('allowed kubectl requests of a task are recorded in order, each with its agent and the JTI minted for it', async () => {
    const minted = records(auditLog()).filter((r) => r.type === 'credential.minted' && r.task === task.id);
    assert.equal(minted.length, 1);
    assert.equal(minted[0]!.jti, task.jti);
    const before = ofTask().length;
    const commands = [
      ['get', 'pods', '-n', 'team-a'],
      ['get', 'pod', 'web-1', '-n', 'team-a', '--ignore-not-found'],
      ['get', 'pods', '-n', 'team-a', '-l', 'app=web'],
    ];
    for (const c of commands) {
      const res = await kubectl(task.kubeconfig, ...c);
      assert.equal(res.code, 0, res.stderr);
    }
    const recorded = await until('the three pod requests to be recorded', 30_000, () => {
      const pods = ofTask().slice(before).filter((r) => r.details.resource === 'pods');
      return pods.length >= 3 ? pods : undefined;
    });
    assert.deepEqual(
      recorded.map((r) => [r.details.verb, r.namespace, r.details.name ?? null]),
      [
        ['list', 'team-a', null],
        ['get', 'team-a', 'web-1'],
        ['list', 'team-a', null],
      ],
      'in the order kubectl made them',
    );
    for (const r of ofTask().slice(before)) {
      assert.equal(r.actor, 'agent:alpha');
      assert.equal(r.agent, 'alpha');
      assert.equal(r.taskName, 'inspect');
      assert.equal(r.template, 'read-pods');
      assert.equal(r.jti, task.jti, 'the credential the broker recorded at mint');
      assert.equal(r.details.username, `system:serviceaccount:${policy.broker.taskNamespace}:task-${task.id}`);
      assert.ok(Object.keys(r.details).every((k) => DETAIL_KEYS.includes(k)), Object.keys(r.details).join());
    }
    const [list, get, other] = recorded;
    assert.equal(list!.outcome, 'allowed');
    assert.equal(list!.details.decision, 'allow');
    assert.equal(list!.details.code, 200);
    assert.equal(list!.details.stage, 'ResponseComplete');
    assert.equal(list!.details.resource, 'pods');
    assert.equal(list!.details.apiVersion, 'v1');
    assert.match(list!.details.requestURI, /^\/api\/v1\/namespaces\/team-a\/pods/);
    assert.match(list!.details.userAgent, /^kubectl\//);
    assert.deepEqual(list!.details.sourceIPs, ['127.0.0.1']);
    assert.match(list!.details.auditID, /^[0-9a-f-]{36}$/);
    assert.ok(list!.details.requestReceivedTimestamp <= list!.details.stageTimestamp);
    assert.equal(get!.details.code, 404, 'allowed, and not found');
    assert.equal(get!.outcome, 'allowed');
    assert.match(other!.details.requestURI, /labelSelector=app%3Dweb/);
    // The whole log still verifies.
    const verified = await verifyAuditFile(auditLog());
    assert.equal(verified.ok, true, JSON.stringify(verified));
  });

  test('a Forbidden delete in another namespace is recorded: outcome denied, decision forbid', async () => {
    const res = await kubectl(task.kubeconfig, 'delete', 'pod', 'x', '-n', 'other-ns');
    assert.notEqual(res.code, 0);
    assert.match(res.stderr, /Forbidden/);
    const denied = await until('the denied delete to be recorded', 30_000, () => ofTask().find((r) => r.details.verb === 'delete'));
    assert.equal(denied.outcome, 'denied');
    assert.equal(denied.details.decision, 'forbid');
    assert.equal(denied.details.code, 403);
    assert.equal(denied.namespace, 'other-ns');
    assert.equal(denied.details.resource, 'pods');
    assert.equal(denied.details.name, 'x');
    assert.equal(denied.agent, 'alpha');
    assert.equal(denied.jti, task.jti);
    // RBAC gives no reason annotation on a denial: the API server's message stands in.
    assert.match(denied.reason, /cannot delete resource "pods" in API group "" in the namespace "other-ns"/);
  });

  test("other users' events are ignored: the administrator's requests are not recorded", async () => {
    const marker = `admin-marker-${randomBytes(4).toString('hex')}`;
    const res = await kubectl(cluster.kubeconfig, 'get', 'configmaps', '-n', 'team-b', '-l', `marker=${marker}`);
    assert.equal(res.code, 0, res.stderr);
    // The API server's own log has it; once the task's next request is recorded, the batch that held
    // the administrator's request has been through the broker too.
    await until('the API server to log the admin request', 10_000, () => readFileSync(cluster.auditLog, 'utf8').includes(marker));
    const before = ofTask().length;
    assert.equal((await kubectl(task.kubeconfig, 'get', 'pods', '-n', 'team-a')).code, 0);
    await until('the next task request', 30_000, () => ofTask().length > before);
    await until('ignored events counted', 10_000, async () => (await metric(broker!, 'broker_kube_audit_events_total', 'outcome="other_user"')) > 0);
    const all = k8sRequests(auditLog());
    assert.ok(!all.some((r) => JSON.stringify(r).includes(marker)), 'the admin request is not in the log');
    assert.ok(all.every((r) => r.details.username.startsWith(`system:serviceaccount:${policy.broker.taskNamespace}:task-`)), 'only task ServiceAccounts');
  });

  test('unauthenticated posts are refused 401 and summarised as failed authentications; nothing is appended', async () => {
    const batch = eventList([podEvent({ username: `system:serviceaccount:${policy.broker.taskNamespace}:task-${task.id}` })]);
    const id = batch.items[0]!.auditID;
    const none = await post(batch, ''); // no Authorization header
    assert.equal(none.status, 401);
    assert.equal(none.body.error.code, 'unauthenticated');
    const wrong = await post(batch, randomBytes(32).toString('base64url'));
    assert.equal(wrong.status, 401);
    // An agent's identity is no webhook credential either.
    assert.equal((await post(batch, alpha)).status, 401);
    // Summarised once a second (--auth-failure-log-interval 1s): the two kinds may land in two summaries.
    const failures = await until('auth.failed summaries of both kinds', 10_000, () => {
      const f = records(auditLog()).filter((r) => r.type === 'auth.failed');
      const has = (category: string) => f.some((r) => r.details.category === category);
      return has('no_credential') && has('rejected') ? f : undefined;
    });
    assert.ok(!JSON.stringify(failures).includes(PATH), 'no path in the summary');
    assert.ok(!k8sRequests(auditLog()).some((r) => r.details.auditID === id));
  });

  test('malformed JSON, a wrong apiVersion or kind, or a malformed event: 400, nothing appended', async () => {
    const size = statSync(auditLog()).size;
    const good = podEvent({ username: `system:serviceaccount:${policy.broker.taskNamespace}:task-${task.id}` });
    const cases: Array<[string, unknown, string?]> = [
      ['not JSON', undefined, '{"kind":"EventList",'],
      ['wrong kind', { ...eventList([good]), kind: 'Event' }],
      ['wrong apiVersion', { ...eventList([good]), apiVersion: 'audit.k8s.io/v1beta1' }],
      ['items not an array', { ...eventList([]), items: {} }],
      ['an event without auditID', eventList([good, { ...good, auditID: undefined }])],
    ];
    for (const [what, body, raw] of cases) {
      const res = await post(body, webhookToken, raw);
      assert.equal(res.status, 400, `${what}: ${JSON.stringify(res.body)}`);
      assert.equal(res.body.error.code, 'bad_request', what);
    }
    await sleep(300);
    assert.ok(!k8sRequests(auditLog()).some((r) => r.details.auditID === good.auditID), 'not even the good event of a bad batch');
    // Only the API server's own (unrelated) batches may have grown the log meanwhile.
    assert.ok(records(auditLog()).filter((r) => r.type !== 'k8s.request').every((r) => r.type !== 'request.refused'));
    assert.ok(statSync(auditLog()).size >= size);
  });

  test('the same batch posted twice is recorded once; RequestReceived and other stages are not recorded', async () => {
    const user = `system:serviceaccount:${policy.broker.taskNamespace}:task-${task.id}`;
    const items = [
      podEvent({ username: user, verb: 'list' }),
      podEvent({ username: user, verb: 'get', name: 'a' }),
      podEvent({ username: user, stage: 'RequestReceived' }),
      podEvent({ username: user, stage: 'ResponseStarted' }),
      podEvent({ username: 'system:serviceaccount:kube-system:someone' }),
    ];
    const first = await post(eventList(items));
    assert.equal(first.status, 200, JSON.stringify(first.body));
    assert.deepEqual(first.body, { recorded: 2, duplicates: 0, ignored: 3 });
    const second = await post(eventList(items));
    assert.equal(second.status, 200);
    assert.deepEqual(second.body, { recorded: 0, duplicates: 2, ignored: 3 });
    for (const e of items) {
      const n = k8sRequests(auditLog()).filter((r) => r.details.auditID === e.auditID).length;
      assert.equal(n, e.stage === 'ResponseComplete' && e.user.username === user ? 1 : 0, `${e.stage} ${e.user.username}`);
    }
    // Known by its JTI alone (a user outside the task namespace): kept, and tied to the task.
    const byJti = podEvent({ username: 'system:serviceaccount:elsewhere:x', jti: task.jti });
    assert.deepEqual((await post(eventList([byJti]))).body, { recorded: 1, duplicates: 0, ignored: 0 });
    const r = k8sRequests(auditLog()).find((x) => x.details.auditID === byJti.auditID)!;
    assert.equal(r.task, task.id);
    assert.equal(r.agent, 'alpha');
  });

  test('a request given the Audit-ID of a recorded one, or a huge one, is recorded all the same (a client chooses its Audit-ID)', async () => {
    // Straight to the API server with the task's token: kubectl sets no Audit-ID, any client may.
    const get = (auditId: string, marker: string) =>
      new Promise<number>((done, fail) => {
        const req = httpsRequest(`${cluster.server}/api/v1/namespaces/team-a/pods?labelSelector=m%3D${marker}`, {
          ca: cluster.caPem,
          headers: { authorization: `Bearer ${task.token}`, 'audit-id': auditId },
          maxHeaderSize: 1 << 20, // the API server echoes the Audit-ID
        }, (res) => {
          res.resume();
          res.on('end', () => done(res.statusCode ?? 0));
        });
        req.on('error', fail);
        req.end();
      });
    const recorded = k8sRequests(auditLog()).find((r) => r.task === task.id)!;
    const reused = `reuse-${randomBytes(4).toString('hex')}`;
    const huge = `huge-${randomBytes(4).toString('hex')}`;
    assert.equal(await get(recorded.details.auditID, reused), 200);
    assert.equal(await get('x'.repeat(20_000), huge), 200);
    const got = await until('both requests to be recorded', 30_000, () => {
      const all = k8sRequests(auditLog());
      const a = all.filter((r) => r.details.requestURI.includes(reused));
      const b = all.filter((r) => r.details.requestURI.includes(huge));
      return a.length && b.length ? { a, b } : undefined;
    });
    assert.equal(got.a.length, 1);
    assert.equal(got.a[0]!.details.auditID, recorded.details.auditID, 'the same auditID, recorded again: another request');
    assert.equal(got.b.length, 1);
    assert.ok(Buffer.byteLength(got.b[0]!.details.auditID) <= 128, 'cut in the record');
  });

  test('a 1,000-event batch is accepted and recorded whole, in one answer', async () => {
    const user = `system:serviceaccount:${policy.broker.taskNamespace}:task-${task.id}`;
    const items = Array.from({ length: 1000 }, (_, i) => podEvent({ username: user, jti: task.jti, name: `pod-${i}` }));
    const body = JSON.stringify(eventList(items));
    assert.ok(body.length > 16 * 1024, 'far above the API body limit of the other routes');
    const t0 = Date.now();
    const res = await post(undefined, webhookToken, body);
    assert.equal(res.status, 200, JSON.stringify(res.body));
    assert.equal(res.body.recorded, 1000);
    const ids = new Set(items.map((e) => e.auditID));
    const got = k8sRequests(auditLog()).filter((r) => ids.has(r.details.auditID));
    assert.equal(got.length, 1000, `durable before the answer (${Date.now() - t0} ms)`);
    assert.deepEqual(got.map((r) => r.details.name), items.map((e) => e.objectRef.name), 'in the batch order');
  });

  test('a broker SIGKILLed after recording a batch, before answering, gets it again from the API server and records it once', async () => {
    await broker!.stop();
    broker = await startBroker({ env: { TASK_BROKER_FAILPOINTS: 'kube-audit-before-reply' } });
    const dying = broker;
    const exited = new Promise<string | null>((done) => dying.child.once('exit', (_code, signal) => done(signal)));
    const marker = `crash-${randomBytes(4).toString('hex')}`;
    const res = await kubectl(task.kubeconfig, 'get', 'pods', '-n', 'team-a', '-l', `marker=${marker}`);
    assert.equal(res.code, 0, res.stderr);
    const signal = await Promise.race([exited, sleep(30_000).then(() => 'still running after 30 s')]);
    assert.equal(signal, 'SIGKILL', `killed at the failpoint\n${dying.stderr}`);
    const mine = () => k8sRequests(auditLog()).filter((r) => r.details.requestURI.includes(marker));
    assert.equal(mine().length, 1, 'recorded (durable) before the kill');
    // The API server saw no answer: it retries the batch (2 s, then 3 s, ... later) at the same port.
    broker = await startBroker();
    await until('the retried batch to reach the new broker', 30_000, async () => (await metric(broker!, 'broker_kube_audit_events_total', 'outcome="duplicate"')) > 0);
    assert.equal(mine().length, 1, 'recorded once');
    const verified = await verifyAuditFile(auditLog());
    assert.equal(verified.ok, true, JSON.stringify(verified));
  });

  test('audit log unwritable: 503, the API server retries, and the records appear once the broker is back with a writable log', async () => {
    await broker!.stop();
    // A file size limit (sh's ulimit -f counts 512-byte blocks) 1 to 1.5 KiB above the log as it is:
    // room for the broker's start-up record, not for a record of the long request below (EFBIG).
    const blocks = Math.ceil((statSync(auditLog()).size + 1024) / 512);
    broker = await startBroker({ shellPrefix: `ulimit -f ${blocks};` });
    const full = broker;
    const marker = `full-${randomBytes(4).toString('hex')}`;
    // A long label selector makes the request's record (its URI) larger than the room left.
    const selector = `marker=${marker},` + Array.from({ length: 20 }, (_, i) => `k${i} notin (${'v'.repeat(60)})`).join(',');
    const res = await kubectl(task.kubeconfig, 'get', 'pods', '-n', 'team-a', '-l', selector);
    assert.equal(res.code, 0, res.stderr);
    await until('the broker to fail its log', 20_000, async () => (await call(full, 'GET', '/readyz')).status === 503);
    await until('the webhook to be answered 503', 10_000, async () => (await metric(full, 'broker_http_request_duration_seconds_count', `route="${PATH}",method="POST",status="503"`)) > 0);
    assert.match(full.stderr, /audit_unavailable/);
    await full.stop();
    // What an operator does with the torn last line (docs/audit.md): the unacknowledged part goes.
    const text = readFileSync(auditLog(), 'utf8');
    truncateSync(auditLog(), Buffer.byteLength(text.slice(0, text.lastIndexOf('\n') + 1)));
    assert.ok(!k8sRequests(auditLog()).some((r) => r.details.requestURI.includes(marker)), 'nothing of it acknowledged');
    broker = await startBroker();
    const got = await until('the retried batch to be recorded', 30_000, () => {
      const m = k8sRequests(auditLog()).filter((r) => r.details.requestURI.includes(marker));
      return m.length ? m : undefined;
    });
    assert.equal(got.length, 1);
    assert.equal(got[0]!.agent, 'alpha');
    assert.equal(got[0]!.jti, task.jti);
    const verified = await verifyAuditFile(auditLog());
    assert.equal(verified.ok, true, JSON.stringify(verified));
  });

  test('a task that has ended still resolves: its late events carry its agent and name, also after a restart', async () => {
    const start = await call(broker!, 'POST', '/v1/tasks', alpha, { template: 'read-pods', namespace: 'team-a', name: 'brief' });
    assert.equal(start.status, 201, JSON.stringify(start.body));
    const cred = await call(broker!, 'POST', '/v1/tasks/brief/credential', alpha);
    const kc = writeTokenKubeconfig(join(dir, 'brief.kubeconfig'), cluster, cred.body.token);
    assert.equal((await kubectl(kc, 'get', 'pods', '-n', 'team-a')).code, 0);
    // Ended at once: the API server sends the event up to a second later, after the task left the store.
    assert.equal((await call(broker!, 'DELETE', '/v1/tasks/brief', alpha)).status, 200);
    const late = await until('the brief task\'s request', 30_000, () => k8sRequests(auditLog()).find((r) => r.task === start.body.id && r.details.resource === 'pods'));
    assert.equal(late.agent, 'alpha');
    assert.equal(late.taskName, 'brief');
    assert.equal(late.jti, cred.body.jti);
    // After a restart the broker knows it from the log's tail (task.started, credential.minted).
    await broker!.stop();
    broker = await startBroker();
    const user = `system:serviceaccount:${policy.broker.taskNamespace}:task-${start.body.id}`;
    const later = podEvent({ username: user, jti: cred.body.jti });
    const byJtiOnly = podEvent({ username: 'system:serviceaccount:elsewhere:x', jti: cred.body.jti });
    const unknown = podEvent({ username: `system:serviceaccount:${policy.broker.taskNamespace}:task-zzzzzzzzzzzz` });
    assert.deepEqual((await post(eventList([later, byJtiOnly, unknown]))).body, { recorded: 3, duplicates: 0, ignored: 0 });
    const byId = (e: Rec) => k8sRequests(auditLog()).find((r) => r.details.auditID === e.auditID)!;
    for (const e of [later, byJtiOnly]) {
      assert.equal(byId(e).actor, 'agent:alpha');
      assert.equal(byId(e).task, start.body.id);
      assert.equal(byId(e).taskName, 'brief');
      assert.equal(byId(e).template, 'read-pods');
    }
    // Nothing known: the task id from the username, no agent, the API server as actor.
    assert.equal(byId(unknown).task, 'zzzzzzzzzzzz');
    assert.equal(byId(unknown).actor, 'system:apiserver');
    assert.equal(byId(unknown).agent, undefined);
  });

  test('without --audit-webhook-token-file the route answers 404; a token file others can read is refused at start', async () => {
    // A log of its own: the suite's broker still writes audit.jsonl (one writer per log, src/audit/lock.ts).
    const plain = await startBroker({ webhook: false, listen: '127.0.0.1:0', extra: ['--audit-log', join(dir, 'plain.jsonl')] });
    try {
      const res = await call(plain, 'POST', PATH, webhookToken, eventList([]));
      assert.equal(res.status, 404);
    } finally {
      await plain.stop();
    }
    const loose = join(dir, 'loose.token');
    writeFileSync(loose, `${webhookToken}\n`, { mode: 0o644 });
    const args = [MAIN, 'serve', '--config', policyFile, '--audit-log', join(dir, 'loose.jsonl'), '--kubeconfig', brokerKubeconfig, '--listen', '127.0.0.1:0', '--insecure-http', '--audit-webhook-token-file', loose];
    const refused = await run(process.execPath, args, process.env, 30_000);
    assert.notEqual(refused.code, 0);
    assert.match(refused.stderr, /group or others/);
  });
});

describe('broker audit webhook-config', () => {
  test('writes the webhook kubeconfig (0600, with the token broker serve reads) and prints the audit policy', async () => {
    const d = mkdtempSync(join(tmpdir(), 'tb-webhook-config-'));
    try {
      const ca = join(d, 'ca.crt');
      writeFileSync(ca, '-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n');
      const out = join(d, 'webhook.kubeconfig');
      const res = await run(process.execPath, [MAIN, 'audit', 'webhook-config', '--broker-url', 'https://broker.example:8443', '--ca', ca, '--config', POLICY_FILE, '-o', out]);
      assert.equal(res.code, 0, res.stderr);
      assert.equal(statSync(out).mode & 0o777, 0o600);
      const kc = JSON.parse(readFileSync(out, 'utf8'));
      assert.equal(kc.clusters[0].cluster.server, `https://broker.example:8443${PATH}`);
      assert.equal(Buffer.from(kc.clusters[0].cluster['certificate-authority-data'], 'base64').toString(), readFileSync(ca, 'utf8'));
      const tokenFile = `${out}.token`;
      assert.equal(statSync(tokenFile).mode & 0o777, 0o600);
      assert.equal(kc.users[0].user.token, readFileSync(tokenFile, 'utf8').trim());
      assert.match(res.stdout, /^apiVersion: audit\.k8s\.io\/v1$/m);
      assert.match(res.stdout, /- level: Metadata\n {4}userGroups: \["system:serviceaccounts:task-broker"\]\n {2}- level: None\n/);
      assert.match(res.stderr, /--audit-webhook-config-file=/);
      // Run again with the same token file: the token is kept, not replaced.
      const again = await run(process.execPath, [MAIN, 'audit', 'webhook-config', '--broker-url', 'https://127.0.0.1:8443/custom/path', '--task-namespace', 'tasks', '--token-file', tokenFile, '-o', out, '--audit-policy', join(d, 'policy.yaml')]);
      assert.equal(again.code, 0, again.stderr);
      const kc2 = JSON.parse(readFileSync(out, 'utf8'));
      assert.equal(kc2.users[0].user.token, kc.users[0].user.token);
      assert.equal(kc2.clusters[0].cluster.server, 'https://127.0.0.1:8443/custom/path', 'a path given is kept');
      // Plain http is refused: the API server would send the token nowhere.
      const plain = await run(process.execPath, [MAIN, 'audit', 'webhook-config', '--broker-url', 'http://127.0.0.1:8080', '--task-namespace', 'tasks', '-o', join(d, 'x')]);
      assert.notEqual(plain.code, 0);
      assert.match(plain.stderr, /https/);
      assert.match(readFileSync(join(d, 'policy.yaml'), 'utf8'), /system:serviceaccounts:tasks/);
    } finally {
      rmSync(d, { recursive: true, force: true });
    }
  });
});

describe('webhook pieces without a cluster: outcomes, the log tail, the dedup bound, recent tasks', () => {
  test('outcome: forbid is denied, 5xx and panics are errors, allow is allowed whatever came after', () => {
    const e = (decision: string | undefined, code: number, stage = 'ResponseComplete') => ({
      ...(podEvent({ username: 'u', code, stage }) as unknown as KubeAuditEvent),
      annotations: decision === undefined ? {} : { 'authorization.k8s.io/decision': decision },
    });
    assert.equal(outcomeOf(e('allow', 200)), 'allowed');
    assert.equal(outcomeOf(e('allow', 404)), 'allowed');
    assert.equal(outcomeOf(e('allow', 422)), 'allowed');
    assert.equal(outcomeOf(e('forbid', 403)), 'denied');
    assert.equal(outcomeOf(e(undefined, 403)), 'denied');
    assert.equal(outcomeOf(e(undefined, 401)), 'denied');
    assert.equal(outcomeOf(e('allow', 500)), 'error');
    assert.equal(outcomeOf(e('allow', 200, 'Panic')), 'error');
    assert.equal(outcomeOf(e(undefined, 429)), 'error');
  });

  test('the log tail is read backwards in chunks: the last N complete lines, oldest first, a torn line left out', async () => {
    const d = mkdtempSync(join(tmpdir(), 'tb-tail-'));
    try {
      const path = join(d, 'log');
      // Lines of varying size around the 1 MiB chunk, some multi-byte, then a torn (unterminated) line.
      const lines = Array.from({ length: 300 }, (_, i) => `${i}:${'é'.repeat((i * 7919) % 9000)}`);
      writeFileSync(path, lines.join('\n') + '\n' + '{"torn":');
      assert.deepEqual(await readTailLines(path, 1000), lines);
      assert.deepEqual(await readTailLines(path, 7), lines.slice(-7));
      assert.deepEqual(await readTailLines(join(d, 'missing'), 5), []);
      writeFileSync(path, 'only\n');
      assert.deepEqual(await readTailLines(path, 5), ['only']);
    } finally {
      rmSync(d, { recursive: true, force: true });
    }
  });

  test('the set of recorded events is bounded (oldest forgotten) and a failed append is forgotten at once', async () => {
    const set = new SeenEvents(3);
    for (const id of ['a', 'b', 'c', 'd']) set.add(id);
    assert.equal(set.state('a'), undefined);
    assert.equal(set.state('d'), 'done');
    assert.equal(set.size, 3);
    const failing = Promise.reject(new Error('EFBIG'));
    set.pending('x', failing);
    await failing.catch(() => undefined);
    assert.equal(set.state('x'), undefined, 'so the API server\'s retry records it');
  });

  test('recent tasks: found while in the store, an hour after it left, then forgotten; JTIs while the token lives plus that hour', () => {
    let now = 1_000_000;
    const removed: Array<(id: string) => void> = [];
    const tasks = new Map<string, any>();
    const store = { list: () => [...tasks.values()], get: (id: string) => tasks.get(id), onRemoved: (cb: (id: string) => void) => removed.push(cb) };
    const recent = new RecentTasks(store as unknown as TaskStore, { retentionMs: 3600_000, now: () => now });
    tasks.set('t1', { id: 't1', agent: 'alpha', name: 'n', template: 'tpl', namespace: 'ns' });
    recent.snapshot();
    tasks.delete('t1');
    for (const cb of removed) cb('t1');
    now += 3599_000;
    assert.equal(recent.get('t1')?.agent, 'alpha');
    now += 2_000;
    recent.snapshot();
    assert.equal(recent.get('t1'), undefined);
    recent.minted({ id: 't2', agent: 'beta', name: 'm', template: 'tpl', namespace: 'ns' } as Task, 'jti-2', new Date(now + 600_000));
    assert.equal(recent.taskOfJti('jti-2'), 't2');
    now += 600_000 + 3600_000 + 1;
    assert.equal(recent.taskOfJti('jti-2'), undefined);
  });
});
