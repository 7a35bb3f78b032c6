/**
 * The local control plane is a real API server: RBAC denies, TokenRequest validates, audit records.
 * Each test here fails if one of those were faked or disabled.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import * as k8s from '@kubernetes/client-node';
import { alive, LocalCluster, KUBERNETES_VERSION } from '../../src/cluster/local-cluster.ts';
import { adminConfig, kubectl, writeTokenKubeconfig, type KubeAuditEvent } from '../helpers/kube.ts';

describe('local control plane', () => {
  let cluster: LocalCluster;
  let core: k8s.CoreV1Api;
  let rbac: k8s.RbacAuthorizationV1Api;
  let scratch: string;

  before(async () => {
    cluster = await LocalCluster.start();
    const kc = adminConfig(cluster);
    core = kc.makeApiClient(k8s.CoreV1Api);
    rbac = kc.makeApiClient(k8s.RbacAuthorizationV1Api);
    scratch = mkdtempSync(join(tmpdir(), 'tb-cp-test-'));
  });
  after(async () => {
    await cluster?.stop();
    if (scratch) rmSync(scratch, { recursive: true, force: true });
  });

  test('reports the real Kubernetes version to kubectl', async () => {
    const res = await kubectl(cluster.kubeconfig, 'version', '-o', 'json');
    assert.equal(res.code, 0, res.stderr);
    const v = JSON.parse(res.stdout) as { clientVersion: { gitVersion: string }; serverVersion: { gitVersion: string } };
    assert.equal(v.serverVersion.gitVersion, KUBERNETES_VERSION);
    assert.equal(v.clientVersion.gitVersion, KUBERNETES_VERSION);
  });

  test('TokenRequest refuses expirationSeconds 599 and accepts 600', async () => {
    await core.createNamespace({ body: { metadata: { name: 'tokens' } } });
    await core.createNamespacedServiceAccount({ namespace: 'tokens', body: { metadata: { name: 'sa' } } });
    await assert.rejects(
      core.createNamespacedServiceAccountToken({ name: 'sa', namespace: 'tokens', body: { spec: { audiences: [], expirationSeconds: 599 } } }),
      (err: k8s.ApiException<string>) => {
        assert.equal(err.code, 422);
        assert.match(String(err.body), /may not specify a duration less than 10 minutes/);
        return true;
      },
    );
    const ok = await core.createNamespacedServiceAccountToken({
      name: 'sa',
      namespace: 'tokens',
      body: { spec: { audiences: [], expirationSeconds: 600 } },
    });
    assert.ok(ok.status?.token && ok.status.token.split('.').length === 3, 'a JWT is returned');
    const lifetime = (ok.status.expirationTimestamp!.getTime() - Date.now()) / 1000;
    assert.ok(lifetime > 590 && lifetime <= 601, `token lives ~600 s, got ${lifetime}`);
  });

  test('RBAC: a fresh ServiceAccount is Forbidden, then allowed once a RoleBinding exists; audit records both', async () => {
    const ns = 'rbac-demo';
    const user = `system:serviceaccount:${ns}:agent`;
    await core.createNamespace({ body: { metadata: { name: ns } } });
    await core.createNamespacedServiceAccount({ namespace: ns, body: { metadata: { name: 'agent' } } });
    const tr = await core.createNamespacedServiceAccountToken({
      name: 'agent',
      namespace: ns,
      body: { spec: { audiences: [], expirationSeconds: 600 } },
    });
    const kubeconfig = writeTokenKubeconfig(join(scratch, 'agent.kubeconfig'), cluster, tr.status!.token!);

    const denied = await kubectl(kubeconfig, 'get', 'pods', '-n', ns);
    assert.notEqual(denied.code, 0);
    assert.match(denied.stderr, new RegExp(`pods is forbidden: User "${user}" cannot list resource "pods"`));

    await rbac.createNamespacedRole({
      namespace: ns,
      body: {
        metadata: { name: 'pod-reader' },
        rules: [{ apiGroups: [''], resources: ['pods'], verbs: ['get', 'list'] }],
      },
    });
    await rbac.createNamespacedRoleBinding({
      namespace: ns,
      body: {
        metadata: { name: 'agent-reads-pods' },
        roleRef: { apiGroup: 'rbac.authorization.k8s.io', kind: 'Role', name: 'pod-reader' },
        subjects: [{ kind: 'ServiceAccount', name: 'agent', namespace: ns }],
      },
    });
    const allowed = await kubectl(kubeconfig, 'get', 'pods', '-n', ns);
    assert.equal(allowed.code, 0, allowed.stderr);
    assert.match(allowed.stderr + allowed.stdout, /No resources found/);
    // Another namespace stays Forbidden: the binding is namespaced.
    const elsewhere = await kubectl(kubeconfig, 'get', 'pods', '-n', 'tokens');
    assert.notEqual(elsewhere.code, 0);

    // The audit log has the denied and the allowed list of pods, made by the ServiceAccount.
    let events: KubeAuditEvent[] = [];
    for (let i = 0; i < 50; i++) {
      events = readFileSync(cluster.auditLog, 'utf8')
        .split('\n')
        .filter(Boolean)
        .map((l) => JSON.parse(l) as KubeAuditEvent)
        .filter((e) => e.user.username === user && e.objectRef?.resource === 'pods' && e.stage === 'ResponseComplete');
      if (events.some((e) => e.responseStatus?.code === 200)) break;
      await sleep(100);
    }
    const codes = events.filter((e) => e.objectRef?.namespace === ns && e.verb === 'list').map((e) => e.responseStatus?.code);
    assert.deepEqual(codes, [403, 200]);
    // Each recorded request is tied to the exact credential (its JTI).
    assert.ok(events.every((e) => e.user.extra?.['authentication.kubernetes.io/credential-id']?.[0]?.startsWith('JTI=')));
  });

  test('the API server authenticates: an unknown bearer token is refused', async () => {
    const kubeconfig = writeTokenKubeconfig(join(scratch, 'bogus.kubeconfig'), cluster, 'not-a-real-token');
    const res = await kubectl(kubeconfig, 'get', 'namespaces');
    assert.notEqual(res.code, 0);
    assert.match(res.stderr, /Unauthorized|provide credentials/);
  });
});

test('stop() leaves no process and no directory', async () => {
  const cluster = await LocalCluster.start();
  assert.ok(alive(cluster.pid));
  assert.ok(existsSync(cluster.dir));
  await cluster.stop();
  assert.equal(alive(cluster.pid), false, 'the API server process is gone');
  assert.equal(existsSync(cluster.dir), false, 'its directory is removed');
});

test('a control plane outlives nothing: when its parent is SIGKILLed it exits and removes its directory', async () => {
  // A child Node process starts a cluster, prints its pid and dir, then is killed with SIGKILL.
  const { spawn } = await import('node:child_process');
  const script = `
    import { LocalCluster } from ${JSON.stringify(new URL('../../src/cluster/local-cluster.ts', import.meta.url).href)};
    const c = await LocalCluster.start();
    process.stdout.write(JSON.stringify({ pid: c.pid, dir: c.dir }) + '\\n');
    setInterval(() => {}, 1000);
  `;
  const child = spawn(process.execPath, ['--input-type=module', '-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
  const line = await new Promise<string>((done) => child.stdout.once('data', (d: Buffer) => done(d.toString())));
  const { pid, dir } = JSON.parse(line) as { pid: number; dir: string };
  assert.ok(alive(pid));
  child.kill('SIGKILL');
  for (let i = 0; i < 100 && (alive(pid) || existsSync(dir)); i++) await sleep(100);
  assert.equal(alive(pid), false, 'the API server exited with its parent');
  assert.equal(existsSync(dir), false, 'and removed its directory');
});
