/**
 * What a task leaves behind (issue 11, item 2), the trial of issue 11 as a test: a real API server
 * whose audit webhook posts to a real broker process, real kubectl through the task's kubeconfig (the
 * exec plugin). A template granting `create` on serviceaccounts, serviceaccounts/token and
 * rolebindings in `web` is reported by `policy check` and gated; an approver approves; the agent
 * creates a ServiceAccount, binds it to the template's ClusterRole and mints it a day-long token; then
 * `broker task end` and `broker audit show --task` list all three as left behind. A broker without the
 * webhook says it recorded nothing rather than that nothing was left.
 *
 * Set up as test/integration/kube-audit.test.ts: the webhook's port is chosen first, the API server
 * started with its webhook there, and the broker listens on exactly that port over TLS (with the API
 * server's own loopback certificate, which the webhook trusts).
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as k8s from '@kubernetes/client-node';
import { freePort, kubectlPath, LocalCluster } from '../../src/cluster/local-cluster.ts';
import { EXIT } from '../../src/cli/exit-codes.ts';
import { kubeApis, type KubeApis } from '../../src/kube/config.ts';
import { applyPolicy } from '../../src/policy/apply.ts';
import { parsePolicy } from '../../src/policy/parse.ts';
import { BrokerProcess, mintToken } from '../helpers/broker.ts';
import { adminConfig, run, writeTokenKubeconfig, type RunResult } from '../helpers/kube.ts';
import { until } from '../helpers/wait.ts';

const MAIN = new URL('../../src/cli/main.ts', import.meta.url).pathname;
const NODE_BIN = new URL('../../.node/node_modules/node/bin', import.meta.url).pathname;
const PATH = '/v1/audit/kubernetes';

const POLICY = `apiVersion: task-broker/v1alpha1
kind: Policy
broker:
  taskNamespace: task-broker
  serviceAccount: task-broker
  tokenTTL: 10m
  identityAudience: task-broker
agents:
  - name: alpha
    identities: [{ serviceAccount: agents/alpha }]
templates:
  - name: web-admin
    description: the trial of issue 11, written from docs/policy.md
    namespaces: [web]
    rules:
      - { apiGroups: [""], resources: [serviceaccounts], verbs: [create, get, list] }
      - { apiGroups: [""], resources: [serviceaccounts/token], verbs: [create] }
      - { apiGroups: [rbac.authorization.k8s.io], resources: [rolebindings], verbs: [create, get, list] }
    ttl: { default: 15m, max: 1h }
    agents: [alpha]
  - name: deployer
    namespaces: [web]
    rules:
      - { apiGroups: [apps], resources: [deployments], verbs: [get, list, patch] }
    ttl: { default: 15m, max: 1h }
    agents: [alpha]
  - name: read-pods
    namespaces: [web]
    rules:
      - { apiGroups: [""], resources: [pods], verbs: [get, list] }
    ttl: { default: 15m, max: 1h }
    agents: [alpha]
approvers:
  - name: sre
    members:
      - serviceAccount: approvers/alice
`;



const EXPECTED = [
  'ServiceAccount web/ci-bot created: can hold tokens',
  'RoleBinding web/ci-bot-admin created: grants access to any subject it names',
  'token minted for ServiceAccount web/ci-bot: valid until its own expiry, outlives the task',
];

describe('what a task leaves behind: the trial of issue 11, through the audit webhook', () => {
  let dir: string;
  let cluster: LocalCluster;
  let admin: KubeApis;
  let policyFile: string;
  let withHook: BrokerProcess | undefined;
  let without: BrokerProcess | undefined;
  const tokens: Record<string, string> = {};
  const files: Record<string, string> = {};
  const auditA = () => join(dir, 'a.jsonl');

  /** The CLI from the sources (so this tree's, whatever dist/ holds), as `who`, against `broker`. */
  const cli = (who: string, args: string[], broker: BrokerProcess = withHook!): Promise<RunResult> =>
    run(process.execPath, [MAIN, ...args], {
      PATH: `${NODE_BIN}:${process.env['PATH']}`,
      HOME: dir,
      BROKER_URL: broker.url,
      ...(broker.url.startsWith('https:') ? { BROKER_CA: cluster.caFile } : {}),
      BROKER_IDENTITY_TOKEN_FILE: files[who]!,
      NO_COLOR: '1',
    });
  const kubectl = (kubeconfig: string, ...args: string[]) =>
    run(kubectlPath(), ['--kubeconfig', kubeconfig, ...args], {
      PATH: `${NODE_BIN}:${process.env['PATH']}`,
      HOME: dir,
      BROKER_IDENTITY_TOKEN_FILE: files['alpha']!,
    });

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'tb-left-behind-'));
    const port = await freePort();
    const webhookToken = randomBytes(32).toString('base64url');
    cluster = await LocalCluster.start({ auditWebhook: { url: `https://127.0.0.1:${port}${PATH}`, token: webhookToken } });
    try {
      admin = kubeApis(adminConfig(cluster));
      policyFile = join(dir, 'policy.yaml');
      writeFileSync(policyFile, POLICY);
      const policy = parsePolicy(POLICY, policyFile);
      for (const ns of ['web', 'agents', 'approvers', policy.broker.namespace, policy.broker.taskNamespace]) {
        await admin.core.createNamespace({ body: { metadata: { name: ns } } }).catch((err) => {
          if (!(err instanceof k8s.ApiException && err.code === 409)) throw err;
        });
      }
      await applyPolicy(admin, policy, {});
      const brokerKubeconfig = writeTokenKubeconfig(join(dir, 'broker.kubeconfig'), cluster, await mintToken(admin, policy.broker.namespace, policy.broker.serviceAccount, [], 3600));
      for (const [name, ns] of [['alpha', 'agents'], ['alice', 'approvers']] as const) {
        await admin.core.createNamespacedServiceAccount({ namespace: ns, body: { metadata: { name } } });
        tokens[name] = await mintToken(admin, ns, name, [policy.broker.identityAudience], 3600);
        files[name] = join(dir, `${name}.token`);
        writeFileSync(files[name], tokens[name], { mode: 0o600 });
      }
      // A Deployment the administrator made: the deployer task only patches it.
      await admin.config.makeApiClient(k8s.AppsV1Api).createNamespacedDeployment({
        namespace: 'web',
        body: {
          metadata: { name: 'web' },
          spec: {
            selector: { matchLabels: { app: 'web' } },
            template: { metadata: { labels: { app: 'web' } }, spec: { containers: [{ name: 'web', image: 'example.invalid/web:1' }] } },
          },
        },
      });
      const serve = (name: string, listen: string, extra: string[]) =>
        BrokerProcess.spawn(
          [MAIN, 'serve', '--config', policyFile, '--audit-log', join(dir, `${name}.jsonl`), '--kubeconfig', brokerKubeconfig, '--listen', listen, ...extra],
          join(dir, `${name}.jsonl`),
        );
      withHook = await serve('a', `127.0.0.1:${port}`, [
        '--tls-cert',
        cluster.servingCert.cert,
        '--tls-key',
        cluster.servingCert.key,
        '--audit-webhook-token-file',
        cluster.auditWebhookTokenFile!,
      ]);
      without = await serve('b', '127.0.0.1:0', ['--insecure-http']);
    } catch (err) {
      withHook?.kill('SIGKILL');
      without?.kill('SIGKILL');
      await cluster.stop();
      rmSync(dir, { recursive: true, force: true });
      throw err;
    }
  });
  after(async () => {
    await withHook?.stop();
    await without?.stop();
    await cluster?.stop();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  test('the template is reported by policy check, needs an approval; after task end the ServiceAccount, RoleBinding and token are listed as left behind', async () => {
    const check = await cli('alpha', ['policy', 'check', policyFile]);
    assert.equal(check.code, 0, check.stderr);
    assert.match(check.stdout + check.stderr, /web-admin[^\n]*create serviceaccounts\/token/);
    assert.match(check.stdout + check.stderr, /can mint tokens that outlive the task/);

    // Gated: a plain start is refused with the request id; --wait waits until alice approves.
    const refused = await cli('alpha', ['task', 'start', 'web-admin', '-n', 'web', '--name', 'admin']);
    assert.equal(refused.code, EXIT.approval_required, refused.stderr);
    assert.match(refused.stderr, /ar-[0-9a-f]{12}/);
    const waiting = spawn(process.execPath, [MAIN, 'task', 'start', 'web-admin', '-n', 'web', '--name', 'admin', '--reason', 'the trial of issue 11', '--wait', '-o', 'json'], {
      env: { PATH: `${NODE_BIN}:${process.env['PATH']}`, HOME: dir, BROKER_URL: withHook!.url, BROKER_CA: cluster.caFile, BROKER_IDENTITY_TOKEN_FILE: files['alpha'], NO_COLOR: '1' },
    });
    let stdout = '';
    let stderr = '';
    waiting.stdout.on('data', (d: Buffer) => (stdout += d));
    waiting.stderr.on('data', (d: Buffer) => (stderr += d));
    const closed = new Promise<number | null>((done) => waiting.on('close', done));
    const id = await until('the --wait start to name its request', 30_000, () => /waiting for approval of (ar-[0-9a-f]{12})/.exec(stderr)?.[1]);
    const approve = await cli('alice', ['approve', id, '--reason', 'the trial']);
    assert.equal(approve.code, 0, approve.stderr);
    assert.equal(await closed, 0, stderr);
    const task = JSON.parse(stdout) as { id: string; name: string; approvalId: string };
    assert.equal(task.approvalId, id);

    // The agent, through its task kubeconfig (the exec plugin: no token in the file).
    const kc = join(dir, 'admin.kubeconfig');
    const written = await cli('alpha', ['kubeconfig', '--task', 'admin', '--output', kc]);
    assert.equal(written.code, 0, written.stderr);
    for (const args of [
      ['create', 'serviceaccount', 'ci-bot', '-n', 'web'],
      ['create', 'rolebinding', 'ci-bot-admin', '--clusterrole', 'task-broker:template:web-admin', '--serviceaccount', 'web:ci-bot', '-n', 'web'],
    ]) {
      const res = await kubectl(kc, ...args);
      assert.equal(res.code, 0, `kubectl ${args.join(' ')}: ${res.stderr}`);
    }
    const minted = await kubectl(kc, 'create', 'token', 'ci-bot', '-n', 'web', '--duration', '24h');
    assert.equal(minted.code, 0, minted.stderr);
    const standing = writeTokenKubeconfig(join(dir, 'ci-bot.kubeconfig'), cluster, minted.stdout.trim());

    // Wait for the webhook's batches (the API server's batch wait is 1 s here): until the three
    // requests are in the log, audit show lists them.
    const showJson = async () => {
      const res = await cli('alpha', ['audit', 'show', '--task', task.id, '-o', 'json', auditA()]);
      assert.equal(res.code, 0, res.stderr);
      return JSON.parse(res.stdout) as { tasks: Array<{ id: string; leftBehind: Array<Record<string, string>> }> };
    };
    await until('the three requests to be recorded', 30_000, async () => (await showJson()).tasks[0]!.leftBehind.length >= 3);

    // broker task end lists them: what this broker had recorded when the task ended.
    const end = await cli('alpha', ['task', 'end', 'admin']);
    assert.equal(end.code, 0, end.stderr);
    const lines = end.stdout.split('\n');
    assert.equal(lines[0], `ended task admin (${task.id})`);
    assert.equal(lines[1], 'left behind, recorded so far: 3 objects that can hold or grant access, outliving the task');
    assert.deepEqual(lines.slice(2, 5), EXPECTED.map((l) => `  ${l}`));
    assert.match(end.stderr, new RegExp(`broker audit show --task ${task.id} `), 'where the final list is');

    // The token the task minted still works after the end: exactly why it is reported.
    const after = await kubectl(standing, 'get', 'serviceaccounts', '-n', 'web');
    assert.equal(after.code, 0, after.stderr);

    // audit show --task: the story, then the section; JSON: leftBehind with every field.
    const text = await cli('alpha', ['audit', 'show', '--task', task.id, auditA()]);
    assert.equal(text.code, 0, text.stderr);
    const section = text.stdout.slice(text.stdout.indexOf('  left behind:'));
    assert.match(section, /^ {2}left behind: 3 objects that can hold or grant access, outliving the task\n/);
    assert.deepEqual(
      section.split('\n').slice(1, 4).map((l) => l.replace(/^ {4}\d{4}-\d\d-\d\dT[\d:.]+Z {2}/, '')),
      EXPECTED,
    );
    assert.ok(text.stdout.indexOf('task ended') < text.stdout.indexOf('  left behind:'), 'after the story');
    const doc = await showJson();
    const items = doc.tasks[0]!.leftBehind;
    assert.deepEqual(
      items.map((e) => [e['verb'], e['resource'], e['kind'], e['namespace'], e['name']]),
      [
        ['create', 'serviceaccounts', 'ServiceAccount', 'web', 'ci-bot'],
        ['create', 'rolebindings', 'RoleBinding', 'web', 'ci-bot-admin'],
        ['create', 'serviceaccounts/token', 'ServiceAccount', 'web', 'ci-bot'],
      ],
    );
    for (const e of items) {
      assert.match(e['at']!, /^\d{4}-\d\d-\d\dT[\d:.]+Z$/);
      assert.match(e['auditID']!, /^[0-9a-f-]{36}$/);
      assert.ok(e['why']!.length > 0);
    }
  });

  test('task end -o json: leftBehind and recording "webhook", never complete (a patched Deployment)', async () => {
    const start = await cli('alpha', ['task', 'start', 'deployer', '-n', 'web', '--name', 'deploy', '-o', 'json']);
    assert.equal(start.code, 0, start.stderr);
    const task = JSON.parse(start.stdout) as { id: string };
    const kc = join(dir, 'deploy.kubeconfig');
    assert.equal((await cli('alpha', ['kubeconfig', '--task', 'deploy', '--output', kc])).code, 0);
    const patch = await kubectl(kc, 'patch', 'deployment', 'web', '-n', 'web', '-p', '{"spec":{"template":{"spec":{"serviceAccountName":"ci-bot"}}}}');
    assert.equal(patch.code, 0, patch.stderr);
    await until('the patch to be recorded', 30_000, async () => {
      const res = await cli('alpha', ['audit', 'show', '--task', task.id, '-o', 'json', auditA()]);
      return res.code === 0 && (JSON.parse(res.stdout) as { tasks: Array<{ leftBehind: unknown[] }> }).tasks[0]!.leftBehind.length > 0;
    });
    const end = await cli('alpha', ['task', 'end', 'deploy', '-o', 'json']);
    assert.equal(end.code, 0, end.stderr);
    const doc = JSON.parse(end.stdout) as Record<string, any>;
    assert.equal(doc['ended'], true);
    assert.equal(doc['id'], task.id);
    assert.equal(doc['recording'], 'webhook');
    assert.equal(doc['complete'], false);
    assert.match(doc['hint'], /batch/);
    assert.equal(doc['leftBehind'].length, 1);
    const [e] = doc['leftBehind'] as Array<Record<string, string>>;
    assert.deepEqual(
      { verb: e!['verb'], resource: e!['resource'], kind: e!['kind'], namespace: e!['namespace'], name: e!['name'], why: e!['why'] },
      { verb: 'patch', resource: 'deployments', kind: 'Deployment', namespace: 'web', name: 'web', why: 'runs pods as any ServiceAccount of its namespace, after the task ends' },
    );
    assert.match(e!['auditID']!, /^[0-9a-f-]{36}$/);
  });

  test('a broker without the webhook says it recorded nothing, rather than that nothing was left', async () => {
    for (const [name, json] of [['plain', false], ['plain-json', true]] as const) {
      const start = await cli('alpha', ['task', 'start', 'read-pods', '-n', 'web', '--name', name], without!);
      assert.equal(start.code, 0, start.stderr);
      const end = await cli('alpha', ['task', 'end', name, ...(json ? ['-o', 'json'] : [])], without!);
      assert.equal(end.code, 0, end.stderr);
      if (json) {
        const doc = JSON.parse(end.stdout) as Record<string, unknown>;
        assert.equal(doc['recording'], 'none');
        assert.equal(doc['complete'], false);
        assert.deepEqual(doc['leftBehind'], []);
        assert.equal(doc['hint'], 'not recorded: this broker receives no API server audit events; see docs/recording.md');
      } else {
        assert.match(end.stdout, /^ended task plain \(\S+\)\nleft behind: not recorded: this broker receives no API server audit events; see docs\/recording\.md\n$/);
        assert.doesNotMatch(end.stdout, /nothing/);
      }
    }
  });
});
