/**
 * The Helm chart (deploy/helm/task-broker) against a real kube-apiserver, with helm v4 built from Go
 * modules (test/cluster/helm): `helm lint`; what `helm template` renders is accepted by the API server
 * (a server-side dry run, then a real apply) in a namespace that enforces the restricted Pod Security
 * profile, whose admission refuses the pod template with a single setting loosened; the RBAC the chart
 * carries is exactly what `broker policy apply` creates (both applied to the API server and read
 * back: rules, roleRefs, subjects, labels); and the chart refuses RBAC generated from another policy
 * or a release outside the policy's broker namespace.
 *
 * Skipped, saying so, only when .cache/cluster-bin/helm is missing and $CI is unset; in CI it runs.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { request } from 'node:https';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as k8s from '@kubernetes/client-node';
import { parseAllDocuments } from 'yaml';
import { clusterBinDir, LocalCluster } from '../../src/cluster/local-cluster.ts';
import { EXIT } from '../../src/cli/exit-codes.ts';
import { kubeApis, type KubeApis } from '../../src/kube/config.ts';
import { freePort } from '../../src/cluster/local-cluster.ts';
import { POLICY_SELECTOR } from '../../src/policy/apply.ts';
import { BrokerProcess, mintToken } from '../helpers/broker.ts';
import { adminConfig, kubectl, run, writeTokenKubeconfig } from '../helpers/kube.ts';
import { postgresAvailable, TestPostgres } from '../helpers/postgres.ts';

const ROOT = new URL('../../', import.meta.url).pathname;
const CHART = join(ROOT, 'deploy/helm/task-broker');
const HELM = join(clusterBinDir(), 'helm');
const helmMissing = !existsSync(HELM);
const skip = helmMissing && !process.env['CI'] ? `${HELM} is missing: ./install.sh builds it when Go is installed (in CI this test does not skip)` : false;

const BROKER_NS = 'tb-helm-system';
const TASK_NS = 'tb-helm-tasks';
const SA = 'task-broker';

const POLICY = `# a policy for the chart test: one rules template, one clusterRole template
apiVersion: task-broker/v1alpha1
kind: Policy
broker:
  namespace: ${BROKER_NS}
  taskNamespace: ${TASK_NS}
  serviceAccount: ${SA}
agents:
  - name: agent-1
people:
  - name: alice
    identities:
      - oidc: { issuer: https://idp.example.com, subject: alice }
approvers:
  - name: sre
    members: [{ person: alice }]
templates:
  - name: read-pods
    namespaces: [shop-a, shop-b]
    rules:
      - apiGroups: [""]
        resources: [pods, pods/log]
        verbs: [get, list, watch]
    ttl: { default: 15m, max: 1h }
    agents: [agent-1]
  - name: viewer
    namespaces: [shop-b]
    clusterRole: view
    ttl: { default: 15m, max: 1h }
    agents: [agent-1]
`;

const cli = (...args: string[]) => run(process.execPath, [join(ROOT, 'src/cli/main.ts'), ...args]);
const helm = (...args: string[]) => run(HELM, args, { PATH: process.env['PATH'] ?? '/usr/bin:/bin', HOME: scratch, HELM_CACHE_HOME: join(scratch, 'helm'), HELM_CONFIG_HOME: join(scratch, 'helm'), HELM_DATA_HOME: join(scratch, 'helm') });

interface Manifest {
  apiVersion: string;
  kind: string;
  metadata: { name: string; namespace?: string; labels?: Record<string, string>; annotations?: Record<string, string> };
  [field: string]: unknown;
}

const RBAC_KINDS = ['ServiceAccount', 'ClusterRole', 'Role', 'ClusterRoleBinding', 'RoleBinding'];
const keyOf = (o: { kind: string; metadata: { name: string; namespace?: string } }) => `${o.kind} ${o.metadata.namespace ? `${o.metadata.namespace}/` : ''}${o.metadata.name}`;

let cluster: LocalCluster;
let kube: KubeApis;
let scratch: string;
let policyFile: string;
let rbacFile: string;

/** `helm template` of the chart with the test's values; extra `--set`s and another namespace when asked. */
function template(extra: string[] = [], namespace = BROKER_NS) {
  return helm(
    'template', 'task-broker', CHART, '--namespace', namespace,
    '--set-file', `policy=${policyFile}`, '--set-file', `rbac=${rbacFile}`,
    '--set', 'tls.secretName=task-broker-tls', '--set', 'auditStore.secretName=task-broker-audit-store',
    '--set', 'auditWebhook.secretName=task-broker-webhook', '--set', 'publicServer=https://kube.example.com:6443',
    '--set', 'service.clusterIP=10.0.0.50',
    ...extra,
  );
}

function parseManifests(text: string): Manifest[] {
  return parseAllDocuments(text)
    .map((d) => {
      assert.deepEqual(d.errors, [], 'helm template renders valid YAML');
      return d.toJS() as Manifest | null;
    })
    .filter((o): o is Manifest => o !== null);
}

/**
 * What an RBAC object or ServiceAccount is, as the API server holds it: labels, rules, roleRef,
 * subjects; the API server's own fields (uid, resourceVersion, managedFields, kubectl's
 * last-applied annotation) left out. Keyed by `Kind ns/name`.
 */
async function readBack(keys: readonly string[]): Promise<Record<string, unknown>> {
  const out: Record<string, unknown> = {};
  for (const key of keys) {
    const [kind, path] = key.split(' ') as [string, string];
    const [namespace, name] = path.includes('/') ? (path.split('/') as [string, string]) : [undefined, path];
    let obj: { metadata?: k8s.V1ObjectMeta; rules?: unknown; roleRef?: unknown; subjects?: unknown };
    if (kind === 'ServiceAccount') obj = await kube.core.readNamespacedServiceAccount({ name, namespace: namespace! });
    else if (kind === 'ClusterRole') obj = await kube.rbac.readClusterRole({ name });
    else if (kind === 'Role') obj = await kube.rbac.readNamespacedRole({ name, namespace: namespace! });
    else if (kind === 'ClusterRoleBinding') obj = await kube.rbac.readClusterRoleBinding({ name });
    else obj = await kube.rbac.readNamespacedRoleBinding({ name, namespace: namespace! });
    out[key] = JSON.parse(JSON.stringify({ labels: obj.metadata?.labels, rules: obj.rules, roleRef: obj.roleRef, subjects: obj.subjects }));
  }
  return out;
}

/** Every object `policy apply` manages now (its label selector), Namespaces aside. */
async function policyManaged(): Promise<string[]> {
  const labelSelector = POLICY_SELECTOR;
  const names = (kind: string, list: { items: { metadata?: k8s.V1ObjectMeta }[] }) =>
    list.items.map((o) => keyOf({ kind, metadata: { name: o.metadata!.name!, ...(o.metadata?.namespace ? { namespace: o.metadata.namespace } : {}) } }));
  return [
    ...names('ServiceAccount', await kube.core.listServiceAccountForAllNamespaces({ labelSelector })),
    ...names('ClusterRole', await kube.rbac.listClusterRole({ labelSelector })),
    ...names('Role', await kube.rbac.listRoleForAllNamespaces({ labelSelector })),
    ...names('ClusterRoleBinding', await kube.rbac.listClusterRoleBinding({ labelSelector })),
    ...names('RoleBinding', await kube.rbac.listRoleBindingForAllNamespaces({ labelSelector })),
  ].sort();
}

describe('the Helm chart deploy/helm/task-broker', { skip }, () => {
  let rendered: Manifest[];
  let renderedText: string;

  before(async () => {
    assert.ok(!helmMissing, `${HELM} is missing: ./install.sh builds it (test/cluster/helm) when Go is installed`);
    scratch = mkdtempSync(join(tmpdir(), 'tb-helm-'));
    policyFile = join(scratch, 'policy.yaml');
    rbacFile = join(scratch, 'rbac.yaml');
    writeFileSync(policyFile, POLICY);
    cluster = await LocalCluster.start();
    kube = kubeApis(adminConfig(cluster));
    for (const name of ['shop-a', 'shop-b', TASK_NS]) await kube.core.createNamespace({ body: { metadata: { name } } });
    // The broker's namespace enforces the restricted Pod Security profile (and warns of it, for the Deployment).
    const restricted = { 'pod-security.kubernetes.io/enforce': 'restricted', 'pod-security.kubernetes.io/warn': 'restricted' };
    await kube.core.createNamespace({ body: { metadata: { name: BROKER_NS, labels: restricted } } });

    const generated = await cli('policy', 'apply', policyFile, '--kubeconfig', cluster.kubeconfig, '--dry-run', '-o', 'yaml');
    assert.equal(generated.code, 0, generated.stderr);
    writeFileSync(rbacFile, generated.stdout);
    const t = await template();
    assert.equal(t.code, 0, t.stderr);
    renderedText = t.stdout;
    rendered = parseManifests(renderedText);
  });
  after(async () => {
    await cluster?.stop();
    if (scratch) rmSync(scratch, { recursive: true, force: true });
  });

  test('policy apply --dry-run -o yaml: the objects apply would create, after a header naming the policy file\'s SHA-256; -o yaml alone is a usage error', async () => {
    const text = readFileSync(rbacFile, 'utf8');
    const { createHash } = await import('node:crypto');
    assert.match(text, new RegExp(`^# task-broker.dev/policy-sha256: ${createHash('sha256').update(POLICY).digest('hex')}$`, 'm'));
    const objects = parseManifests(text);
    assert.deepEqual(
      objects.map(keyOf),
      [
        `Namespace ${BROKER_NS}`, `Namespace ${TASK_NS}`, `ServiceAccount ${BROKER_NS}/${SA}`,
        'ClusterRole task-broker:broker', 'ClusterRole task-broker:template:read-pods',
        ...['shop-a', 'shop-b', BROKER_NS, TASK_NS].map((ns) => `Role ${ns}/task-broker:broker`),
        'ClusterRoleBinding task-broker:broker',
        ...['shop-a', 'shop-b', BROKER_NS, TASK_NS].map((ns) => `RoleBinding ${ns}/task-broker:broker`),
      ],
    );
    // Nothing was written: the dry run created none of them.
    assert.deepEqual(await policyManaged(), []);

    const noDryRun = await cli('policy', 'apply', policyFile, '--kubeconfig', cluster.kubeconfig, '-o', 'yaml');
    assert.equal(noDryRun.code, EXIT.usage, noDryRun.stderr);
    assert.match(noDryRun.stderr, /-o yaml .*add --dry-run/);
    assert.equal(noDryRun.stdout, '');
    assert.deepEqual(await policyManaged(), []);
  });

  test('helm lint passes with the values an install gives', async () => {
    const r = await helm('lint', CHART, '--namespace', BROKER_NS, '--set-file', `policy=${policyFile}`, '--set-file', `rbac=${rbacFile}`,
      '--set', 'tls.secretName=task-broker-tls', '--set', 'auditStore.secretName=task-broker-audit-store');
    assert.equal(r.code, 0, r.stdout + r.stderr);
    assert.match(r.stdout, /1 chart\(s\) linted, 0 chart\(s\) failed/);
  });

  test('what helm template renders: 3 replicas, PDB, Service, the policy as a ConfigMap, TLS and the store URL from Secrets, probes, the restricted profile', () => {
    const kinds = rendered.map((o) => o.kind).sort();
    for (const k of ['ConfigMap', 'Deployment', 'NetworkPolicy', 'PodDisruptionBudget', 'Service']) assert.equal(kinds.filter((x) => x === k).length, 1, `one ${k}`);
    assert.ok(!kinds.includes('Namespace'), 'the chart creates no Namespace');

    const cm = rendered.find((o) => o.kind === 'ConfigMap')!;
    assert.equal((cm['data'] as Record<string, string>)['policy.yaml'], POLICY, 'the ConfigMap holds the policy file byte for byte');
    assert.ok(!JSON.stringify(cm).includes('postgres'), 'no audit store URL in the ConfigMap');

    const deploy = rendered.find((o) => o.kind === 'Deployment') as unknown as k8s.V1Deployment;
    assert.equal(deploy.spec?.replicas, 3);
    const pod = deploy.spec!.template.spec!;
    assert.equal(pod.serviceAccountName, SA);
    assert.deepEqual(pod.securityContext?.seccompProfile, { type: 'RuntimeDefault' });
    assert.equal(pod.securityContext?.runAsNonRoot, true);
    const broker = pod.containers.find((c) => c.name === 'broker')!;
    assert.deepEqual(broker.securityContext, {
      allowPrivilegeEscalation: false,
      readOnlyRootFilesystem: true,
      runAsNonRoot: true,
      capabilities: { drop: ['ALL'] },
      seccompProfile: { type: 'RuntimeDefault' },
    });
    assert.equal(broker.livenessProbe?.httpGet?.path, '/healthz');
    assert.equal(broker.readinessProbe?.httpGet?.path, '/readyz');
    assert.equal(broker.readinessProbe?.httpGet?.scheme, 'HTTPS');
    const args = broker.args ?? [];
    assert.ok(args.includes('--config=/etc/task-broker/policy/policy.yaml'));
    assert.ok(args.includes('--tls-cert=/etc/task-broker/tls/tls.crt') && args.includes('--tls-key=/etc/task-broker/tls/tls.key'));
    assert.ok(args.includes('--audit-store=$(TASK_BROKER_AUDIT_STORE)'));
    assert.ok(args.includes('--audit-webhook-token-file=/run/task-broker/webhook/token'));
    assert.ok(args.includes('--public-server=https://kube.example.com:6443'));
    const env = Object.fromEntries((broker.env ?? []).map((e) => [e.name, e.valueFrom?.secretKeyRef]));
    assert.deepEqual(env['TASK_BROKER_AUDIT_STORE'], { name: 'task-broker-audit-store', key: 'url' });
    assert.deepEqual(env['PGPASSWORD'], { name: 'task-broker-audit-store', key: 'password', optional: true });
    // Every mount the broker may write to is an emptyDir; the policy, TLS and token mounts are read-only.
    const volumes = Object.fromEntries((pod.volumes ?? []).map((v) => [v.name, v]));
    for (const m of broker.volumeMounts ?? []) {
      if (!m.readOnly) assert.ok(volumes[m.name]?.emptyDir, `${m.mountPath} is writable, so an emptyDir`);
    }
    assert.equal(volumes['tls']?.secret?.secretName, 'task-broker-tls');
    assert.equal(volumes['policy']?.configMap?.name, 'task-broker');
    assert.equal(deploy.spec!.template.metadata?.annotations?.['checksum/config'], undefined, 'by default a new policy is reloaded, not rolled');
    const svc = rendered.find((o) => o.kind === 'Service') as unknown as k8s.V1Service;
    assert.equal(svc.spec?.clusterIP, '10.0.0.50');
    assert.deepEqual(svc.spec?.ports?.map((p) => [p.name, p.port]), [['https', 443]]);
  });

  test('the API server accepts every rendered object (server-side dry run, then a real apply) in a namespace enforcing the restricted profile', async () => {
    const file = join(scratch, 'rendered.yaml');
    writeFileSync(file, renderedText);
    const dry = await kubectl(cluster.kubeconfig, 'apply', '--dry-run=server', '-f', file);
    assert.equal(dry.code, 0, dry.stderr);
    assert.doesNotMatch(dry.stderr, /Warning/, 'no warning (a PodSecurity one would say "would violate")');
    // Nothing exists yet: the dry run wrote nothing.
    assert.deepEqual(await policyManaged(), []);

    const real = await kubectl(cluster.kubeconfig, 'apply', '-f', file);
    assert.equal(real.code, 0, real.stderr);
    assert.doesNotMatch(real.stderr, /Warning/);
    for (const o of rendered) assert.match(real.stdout, new RegExp(`${o.metadata.name.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')} (created|configured)`), keyOf(o));
    const deploy = await kubectl(cluster.kubeconfig, 'get', 'deployment', 'task-broker', '-n', BROKER_NS, '-o', 'jsonpath={.spec.replicas}');
    assert.equal(deploy.stdout, '3');
  });

  test('the restricted profile, checked by the API server: the pod template is admitted; loosened in any one way, refused', async () => {
    const deploy = rendered.find((o) => o.kind === 'Deployment') as unknown as k8s.V1Deployment;
    const podOf = (mutate: (spec: k8s.V1PodSpec) => void) => {
      const spec = structuredClone(deploy.spec!.template.spec!);
      mutate(spec);
      return { apiVersion: 'v1', kind: 'Pod', metadata: { name: 'task-broker-check', namespace: BROKER_NS }, spec };
    };
    const admit = async (pod: unknown) => {
      const file = join(scratch, 'pod.json');
      writeFileSync(file, JSON.stringify(pod));
      return kubectl(cluster.kubeconfig, 'create', '--dry-run=server', '-f', file);
    };
    const ok = await admit(podOf(() => {}));
    assert.equal(ok.code, 0, ok.stderr);

    const loosened: Record<string, (spec: k8s.V1PodSpec) => void> = {
      'allowPrivilegeEscalation: true': (s) => (s.containers[0]!.securityContext!.allowPrivilegeEscalation = true),
      'runAsNonRoot unset': (s) => {
        delete s.securityContext!.runAsNonRoot;
        delete s.containers[0]!.securityContext!.runAsNonRoot;
        for (const c of s.initContainers ?? []) delete c.securityContext!.runAsNonRoot;
      },
      'a capability kept': (s) => (s.containers[0]!.securityContext!.capabilities = { drop: ['ALL'], add: ['NET_ADMIN'] }),
      'no seccomp profile': (s) => {
        delete s.securityContext!.seccompProfile;
        delete s.containers[0]!.securityContext!.seccompProfile;
        for (const c of s.initContainers ?? []) delete c.securityContext!.seccompProfile;
      },
    };
    for (const [what, mutate] of Object.entries(loosened)) {
      const r = await admit(podOf(mutate));
      assert.notEqual(r.code, 0, `${what}: refused`);
      assert.match(r.stderr, /violates PodSecurity "restricted:latest"/, what);
    }
  });

  test("the chart's RBAC is exactly what `broker policy apply` creates, both read back from the API server", async () => {
    const chartRbac = rendered.filter((o) => RBAC_KINDS.includes(o.kind)).map(keyOf).sort();
    const fromChart = await readBack(chartRbac);
    // Remove the chart's objects, then let policy apply create its own.
    for (const key of chartRbac) {
      const [kind, path] = key.split(' ') as [string, string];
      const [ns, name] = path.includes('/') ? (path.split('/') as [string, string]) : [undefined, path];
      const del = await kubectl(cluster.kubeconfig, 'delete', kind.toLowerCase(), name, ...(ns ? ['-n', ns] : []));
      assert.equal(del.code, 0, del.stderr);
    }
    assert.deepEqual(await policyManaged(), []);
    const applied = await cli('policy', 'apply', policyFile, '--kubeconfig', cluster.kubeconfig, '-o', 'json');
    assert.equal(applied.code, 0, applied.stderr);
    const changes = (JSON.parse(applied.stdout) as { changes: { action: string; kind: string }[] }).changes.filter((c) => c.kind !== 'Namespace');
    assert.ok(changes.length > 0 && changes.every((c) => c.action === 'create'), 'policy apply created each object itself');

    // The same set of objects ...
    assert.deepEqual(await policyManaged(), chartRbac);
    // ... with the same rules, roleRefs, subjects and labels.
    const fromApply = await readBack(chartRbac);
    assert.deepEqual(fromChart, fromApply);
    // The comparison sees what matters: the broker's bind rule names exactly the templates' ClusterRoles.
    assert.deepEqual((fromApply[`Role shop-b/task-broker:broker`] as { rules: { resourceNames?: string[] }[] }).rules[1]?.resourceNames, [
      'task-broker:template:read-pods',
      'view',
    ]);
  });

  test('the broker starts, and is ready, with exactly what the chart gives its container: args, Secrets as env and files, the init container\'s token copy', {
    skip: !postgresAvailable() && !process.env['CI'] ? 'PostgreSQL 15 is not installed (apt-get install postgresql)' : false,
  }, async () => {
    // The pod's filesystem, under a directory: the chart's absolute paths are rewritten below it. The
    // cluster's objects are policy apply's (the previous test), which the chart's equal.
    const deploy = rendered.find((o) => o.kind === 'Deployment') as unknown as k8s.V1Deployment;
    const pod = deploy.spec!.template.spec!;
    const container = pod.containers.find((c) => c.name === 'broker')!;
    const fsRoot = join(scratch, 'pod');
    const at = (text: string) => text.replace(/(?<=^|=|\s)\/(etc\/task-broker|run\/task-broker|var\/lib\/task-broker|tmp)(?=\/|$|\s)/g, (path) => `${fsRoot}${path}`);
    const mount = (volume: string) => at(container.volumeMounts!.find((m) => m.name === volume)!.mountPath);
    const secretFile = (dir: string, name: string, text: string) => {
      mkdirSync(dir, { recursive: true });
      writeFileSync(join(dir, name), text);
      chmodSync(join(dir, name), 0o440); // defaultMode 0440, as the chart mounts Secrets
    };
    const cm = rendered.find((o) => o.kind === 'ConfigMap')!;
    mkdirSync(mount('policy'), { recursive: true });
    for (const [k, v] of Object.entries(cm['data'] as Record<string, string>)) writeFileSync(join(mount('policy'), k), v);
    secretFile(mount('tls'), 'tls.crt', readFileSync(cluster.servingCert.cert, 'utf8'));
    secretFile(mount('tls'), 'tls.key', readFileSync(cluster.servingCert.key, 'utf8'));
    mkdirSync(mount('tmp'), { recursive: true });
    // The init container: its own command, on the Secret's file.
    const init = pod.initContainers!.find((c) => c.name === 'webhook-token')!;
    secretFile(at(init.volumeMounts!.find((m) => m.name === 'webhook-token-secret')!.mountPath), 'token', 'a-webhook-token-of-32-characters');
    mkdirSync(mount('webhook-token'), { recursive: true });
    const [sh, ...shArgs] = [...init.command!.map(at)];
    const copied = await run(sh!, shArgs);
    assert.equal(copied.code, 0, copied.stderr);
    assert.equal(statSync(join(mount('webhook-token'), 'token')).mode & 0o777, 0o400, 'the copy is readable by its owner only');

    const pgdb = await TestPostgres.start();
    let broker: BrokerProcess | undefined;
    try {
      const migrated = await cli('audit', 'migrate', pgdb.url('postgres'), '--grant', 'task_broker');
      assert.equal(migrated.code, 0, migrated.stderr);
      // The Secret's two keys, as the kubelet gives them: env vars, $(VAR) expanded in args.
      const secret = { url: `postgres://task_broker@127.0.0.1:${pgdb.port}/audit`, password: pgdb.brokerPassword };
      const env: Record<string, string> = {};
      for (const e of container.env ?? []) env[e.name] = e.value ?? secret[e.valueFrom!.secretKeyRef!.key as 'url' | 'password'];
      const port = await freePort();
      const args = container.args!.map((a) => (a.startsWith('--listen=') ? `--listen=127.0.0.1:${port}` : at(a).replace(/\$\((\w+)\)/g, (_m, v: string) => env[v] ?? '')));
      // Not in a pod: the in-cluster ServiceAccount credential as a kubeconfig holding its token.
      const token = await mintToken(kube, BROKER_NS, SA, [], 3600);
      const kubeconfig = writeTokenKubeconfig(join(scratch, 'broker.kubeconfig'), cluster, token);
      broker = await BrokerProcess.spawn([join(ROOT, 'src/cli/main.ts'), ...args, '--kubeconfig', kubeconfig], secret.url, { ...env, TMPDIR: mount('tmp') });
      const get = (path: string, method = 'GET', headers: Record<string, string> = {}) =>
        new Promise<{ status: number; body: string }>((done, fail) => {
          const req = request(`https://127.0.0.1:${port}${path}`, { ca: cluster.caPem, method, headers }, (res) => {
            let body = '';
            res.on('data', (d: Buffer) => (body += d.toString()));
            res.on('end', () => done({ status: res.statusCode ?? 0, body }));
          });
          req.on('error', fail);
          req.end();
        });
      assert.deepEqual(await get('/healthz'), { status: 200, body: 'ok\n' });
      const ready = await (async () => {
        for (let i = 0; i < 100; i++) {
          const r = await get('/readyz');
          if (r.status === 200) return r;
          await new Promise((d) => setTimeout(d, 100));
        }
        return get('/readyz');
      })();
      assert.deepEqual(ready, { status: 200, body: 'ok\n' }, broker.stderr);
      // Started with its exact RBAC (no --allow-broad-credentials), its store, and the webhook taken.
      const started = await pgdb.query<{ line: string }>('postgres', "SELECT line FROM task_broker.audit WHERE type = 'broker.started'");
      assert.equal(started.rows.length, 1);
      assert.doesNotMatch(broker.stderr, new RegExp(pgdb.brokerPassword), 'the password is in no log line');
      // The webhook takes the token the init container copied, and no other.
      const events = { 'content-type': 'application/json' };
      const wrong = await get('/v1/audit/kubernetes', 'POST', { ...events, authorization: 'Bearer not-the-webhook-token-at-all' });
      assert.equal(wrong.status, 401, wrong.body);
      const right = await get('/v1/audit/kubernetes', 'POST', { ...events, authorization: 'Bearer a-webhook-token-of-32-characters' });
      assert.notEqual(right.status, 401, right.body);
      assert.notEqual(right.status, 404, right.body);
    } finally {
      if (broker && broker.child.exitCode === null && broker.child.signalCode === null) {
        const exited = new Promise((d) => broker!.child.once('exit', d));
        broker.kill('SIGTERM');
        const hung = setTimeout(() => broker!.kill('SIGKILL'), 10_000);
        await exited;
        clearTimeout(hung);
      }
      await pgdb.remove();
    }
  });

  test('helm install, then helm upgrade with a changed policy (RBAC follows it; the brokers reload it, or roll when asked), then helm uninstall', async () => {
    // What the previous tests left (policy apply's RBAC, the kubectl-applied rest) goes first: helm adopts nothing.
    const clean = await kubectl(cluster.kubeconfig, 'delete', '-f', join(scratch, 'rendered.yaml'), '--ignore-not-found');
    assert.equal(clean.code, 0, clean.stderr);
    assert.deepEqual(await policyManaged(), []);
    const values = ['--set', 'tls.secretName=task-broker-tls', '--set', 'auditStore.secretName=task-broker-audit-store'];
    const kc = ['--kubeconfig', cluster.kubeconfig];
    const installed = await helm('install', 'task-broker', CHART, '--namespace', BROKER_NS, ...kc, '--set-file', `policy=${policyFile}`, '--set-file', `rbac=${rbacFile}`, ...values);
    assert.equal(installed.code, 0, installed.stdout + installed.stderr);
    assert.match(installed.stdout, /STATUS: deployed/);
    const chartRbac = rendered.filter((o) => RBAC_KINDS.includes(o.kind)).map(keyOf).sort();
    // helm marks what it installed as its own (app.kubernetes.io/managed-by: Helm); rules, roleRefs and subjects are the policy's.
    const installedRbac = await readBack(chartRbac);
    for (const key of chartRbac) assert.equal((installedRbac[key] as { labels: Record<string, string> }).labels['app.kubernetes.io/managed-by'], 'Helm', key);
    const podTemplate = async () => (await kubectl(cluster.kubeconfig, 'get', 'deployment', 'task-broker', '-n', BROKER_NS, '-o', 'jsonpath={.spec.template}')).stdout;
    const template0 = await podTemplate();

    // A new policy: the `viewer` template goes, a `deployer` template comes.
    const changed = POLICY.replace(/  - name: viewer[\s\S]*$/, `  - name: deployer
    namespaces: [shop-a]
    rules:
      - apiGroups: [apps]
        resources: [deployments]
        verbs: [get, list, patch]
    ttl: { default: 15m, max: 1h }
    agents: [agent-1]
`);
    const changedFile = join(scratch, 'policy-2.yaml');
    const changedRbac = join(scratch, 'rbac-2.yaml');
    writeFileSync(changedFile, changed);
    const generated = await cli('policy', 'apply', changedFile, '--kubeconfig', cluster.kubeconfig, '--dry-run', '-o', 'yaml');
    assert.equal(generated.code, 0, generated.stderr);
    writeFileSync(changedRbac, generated.stdout);
    const upgraded = await helm('upgrade', 'task-broker', CHART, '--namespace', BROKER_NS, ...kc, '--set-file', `policy=${changedFile}`, '--set-file', `rbac=${changedRbac}`, ...values);
    assert.equal(upgraded.code, 0, upgraded.stdout + upgraded.stderr);
    const bind = async (ns: string) => (await kube.rbac.readNamespacedRole({ name: 'task-broker:broker', namespace: ns })).rules?.[1]?.resourceNames;
    assert.deepEqual(await bind('shop-a'), ['task-broker:template:deployer', 'task-broker:template:read-pods']);
    assert.deepEqual(await bind('shop-b'), ['task-broker:template:read-pods'], 'no more bind on view');
    assert.ok(await kube.rbac.readClusterRole({ name: 'task-broker:template:deployer' }));
    const cr = (await kube.rbac.readClusterRole({ name: 'task-broker:broker' })).rules ?? [];
    assert.deepEqual(cr.map((r) => r.resources), [['tokenreviews']], 'no more get on the view ClusterRole');
    // The policy reaches the running brokers through their ConfigMap volume (they reload it): no roll, no cut connections.
    const cm = await kube.core.readNamespacedConfigMap({ name: 'task-broker', namespace: BROKER_NS });
    assert.equal(cm.data?.['policy.yaml'], changed);
    assert.equal(await podTemplate(), template0, 'the pod template is unchanged: the brokers do not roll');
    // With restartOnPolicyChange, the policy's checksum is in the pod template: a change rolls them.
    const rolled = await helm('upgrade', 'task-broker', CHART, '--namespace', BROKER_NS, ...kc, '--set-file', `policy=${changedFile}`, '--set-file', `rbac=${changedRbac}`, ...values, '--set', 'restartOnPolicyChange=true');
    assert.equal(rolled.code, 0, rolled.stdout + rolled.stderr);
    assert.match(await podTemplate(), /"checksum\/config":"[0-9a-f]{64}"/);

    const uninstalled = await helm('uninstall', 'task-broker', '--namespace', BROKER_NS, ...kc);
    assert.equal(uninstalled.code, 0, uninstalled.stdout + uninstalled.stderr);
    // (policyManaged() cannot tell: helm relabelled them.) Each is gone.
    const left: string[] = [];
    for (const key of [...chartRbac, 'ClusterRole task-broker:template:deployer']) {
      try {
        await readBack([key]);
        left.push(key);
      } catch (err) {
        if (!(err instanceof k8s.ApiException && err.code === 404)) throw err;
      }
    }
    assert.deepEqual(left, [], 'uninstall removes the RBAC');
  });

  test('the chart refuses RBAC generated from another policy, and a release outside the broker namespace', async () => {
    const other = join(scratch, 'other-policy.yaml');
    writeFileSync(other, POLICY.replace('verbs: [get, list, watch]', 'verbs: [get, list, watch, delete]'));
    const mismatched = await helm('template', 'task-broker', CHART, '--namespace', BROKER_NS, '--set-file', `policy=${other}`, '--set-file', `rbac=${rbacFile}`,
      '--set', 'tls.secretName=t', '--set', 'auditStore.secretName=s');
    assert.notEqual(mismatched.code, 0);
    assert.match(mismatched.stderr, /rbac was generated from another policy \(sha256 [0-9a-f]{64}\) than the one given in policy/);

    const elsewhere = await template([], 'default');
    assert.notEqual(elsewhere.code, 0);
    assert.match(elsewhere.stderr, new RegExp(`the policy's broker.namespace is "${BROKER_NS}": install the release there`));

    const edited = join(scratch, 'edited-rbac.yaml');
    writeFileSync(edited, readFileSync(rbacFile, 'utf8').replace(/^# task-broker\.dev\/policy-sha256: .*$/m, ''));
    const unmarked = await helm('template', 'task-broker', CHART, '--namespace', BROKER_NS, '--set-file', `policy=${policyFile}`, '--set-file', `rbac=${edited}`,
      '--set', 'tls.secretName=t', '--set', 'auditStore.secretName=s');
    assert.notEqual(unmarked.code, 0);
    assert.match(unmarked.stderr, /no `# task-broker.dev\/policy-sha256: \.\.\.` line/);

    const noTls = await helm('template', 'task-broker', CHART, '--namespace', BROKER_NS, '--set-file', `policy=${policyFile}`, '--set-file', `rbac=${rbacFile}`, '--set', 'auditStore.secretName=s');
    assert.notEqual(noTls.code, 0);
    assert.match(noTls.stderr, /tls.secretName: name a Secret of type kubernetes.io\/tls/);
  });
});
