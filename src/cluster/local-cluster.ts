/**
 * LocalCluster: a real kube-apiserver (with an embedded etcd) on random loopback ports in a fresh
 * directory, built from Go modules by test/cluster. Used by the tests and by `broker dev-cluster`.
 *
 * What it sets up: RBAC (never allow-all authorization), service-account token issuance (an ECDSA signing key),
 * an admin identity in `system:masters` (a static token, kept only in this directory), a Metadata-level
 * audit policy with a log file, and, when asked, an audit webhook pointing at a given URL.
 *
 * With `full: true` it is a whole cluster: also kube-controller-manager and kube-scheduler (same
 * Kubernetes version) and a node, `local-node`, whose containers are local processes
 * (test/cluster/node), each with a client certificate from the cluster's CA (docs/local-control-plane.md).
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, openSync, closeSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { request } from 'node:https';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import { BrokerError } from '../errors.ts';

/** The Kubernetes version test/cluster builds; /version and `kubectl version` report it. */
export const KUBERNETES_VERSION = 'v1.36.3';
/** The issuer and default audience of service-account tokens on the local control plane. */
export const SERVICE_ACCOUNT_ISSUER = 'https://kubernetes.default.svc.cluster.local';

const STATE_FILE = 'cluster.json';
const ADMIN_USER = 'local-admin';
/** The name of the full cluster's node. */
export const NODE_NAME = 'local-node';

export interface AuditWebhook {
  /** Where the API server POSTs audit event batches (EventList JSON). */
  url: string;
  /**
   * CA bundle (PEM file) that signs the webhook's serving certificate, for https URLs. Default: the
   * local API server's own serving certificate (pki/apiserver.crt, for 127.0.0.1 and localhost), so a
   * broker on this machine can serve the webhook with it (LocalCluster.servingCert).
   */
  caFile?: string;
  /**
   * Bearer token the API server sends (kept in DIR/audit-webhook.token, mode 0600, and in the webhook
   * kubeconfig). Needs an https URL: client-go sends no credentials to a plain-http server.
   */
  token?: string;
  /** The API server's --audit-webhook-initial-backoff (default 1s; it retries 4 times, each wait 1.5x the last). */
  initialBackoff?: string;
}

export interface LocalClusterOptions {
  /** Use this directory (it must be missing or empty); by default a fresh temporary directory. */
  dir?: string;
  /** Keep running after this process exits (`broker dev-cluster up`). Default: die with this process. */
  detached?: boolean;
  auditWebhook?: AuditWebhook;
  /** How long to wait for /readyz. Default 90 s (a cold start on 2 cores takes a few seconds). */
  readyTimeoutMs?: number;
  /** Folder holding the kube-apiserver and kubectl binaries. Default: see clusterBinDir(). */
  binDir?: string;
  /**
   * A whole cluster: also kube-controller-manager, kube-scheduler and a node whose containers run as
   * local processes; start() returns once the node is Ready and the `default` ServiceAccount exists.
   * Default false: the API server alone, which starts faster (tests that need only it stay so).
   */
  full?: boolean;
}

/** A process of the cluster. */
export interface ClusterComponent {
  name: 'kube-apiserver' | 'kube-controller-manager' | 'kube-scheduler' | 'local-node';
  pid: number;
  /** Its stdout and stderr. */
  log: string;
}

/** What is written to DIR/cluster.json, so that another process (dev-cluster down) can find it. */
export interface LocalClusterState {
  pid: number;
  server: string;
  caFile: string;
  kubeconfig: string;
  auditLog: string;
  version: string;
  /** The audit webhook's bearer token file, when the webhook was given a token. */
  auditWebhookTokenFile?: string;
  /** 'full' (API server, controller-manager, scheduler, node) or 'api-server-only'. Missing: api-server-only. */
  mode?: 'full' | 'api-server-only';
  /** Every process of the cluster, the API server first. */
  components?: ClusterComponent[];
  /** Full mode: the node's directory (pods, their working directories and logs). */
  nodeDir?: string;
}

/** Where install.sh puts the test/cluster binaries, unless TASK_BROKER_CLUSTER_BIN says otherwise. */
export function clusterBinDir(): string {
  const fromEnv = process.env['TASK_BROKER_CLUSTER_BIN'];
  if (fromEnv) return resolve(fromEnv);
  // src/cluster/x.ts and dist/cluster/x.js are both two levels below the project root.
  return fileURLToPath(new URL('../../.cache/cluster-bin/', import.meta.url));
}

export function kubectlPath(binDir = clusterBinDir()): string {
  return requireBinary(binDir, 'kubectl');
}

function requireBinary(binDir: string, name: string): string {
  const path = join(binDir, name);
  if (!existsSync(path)) {
    throw new BrokerError(
      'cluster_binaries_missing',
      `${path} does not exist: the local control plane is built by ./install.sh when Go is installed`,
    );
  }
  return path;
}

// Clusters started by this process without `detached`: killed and removed if the process exits
// without stopping them. (A SIGKILLed process is covered by the server's --exit-with-stdin.)
const attached = new Set<LocalCluster>();
process.once('exit', () => {
  for (const cluster of attached) cluster.killNow();
});

export class LocalCluster {
  readonly dir: string;
  readonly server: string;
  readonly caFile: string;
  readonly kubeconfig: string;
  readonly auditLog: string;
  readonly adminToken: string;
  readonly pid: number;
  readonly auditWebhookTokenFile: string | undefined;
  /** Every process of the cluster, the API server first (full mode: then controller-manager, scheduler, node). */
  readonly components: ClusterComponent[];
  /** Full mode: the node's directory; its `process-groups` file lists the container processes alive. */
  readonly nodeDir: string | undefined;
  readonly #child: ChildProcess | undefined;
  /** The other components' processes, when this process started them attached. */
  readonly #others: ChildProcess[] = [];
  #stopped = false;

  /** Use LocalCluster.start(). */
  constructor(fields: {
    dir: string;
    server: string;
    caFile: string;
    kubeconfig: string;
    auditLog: string;
    adminToken: string;
    pid: number;
    child: ChildProcess | undefined;
    auditWebhookTokenFile?: string | undefined;
    nodeDir?: string | undefined;
  }) {
    this.dir = fields.dir;
    this.server = fields.server;
    this.caFile = fields.caFile;
    this.kubeconfig = fields.kubeconfig;
    this.auditLog = fields.auditLog;
    this.adminToken = fields.adminToken;
    this.pid = fields.pid;
    this.auditWebhookTokenFile = fields.auditWebhookTokenFile;
    this.nodeDir = fields.nodeDir;
    this.components = [{ name: 'kube-apiserver', pid: fields.pid, log: join(fields.dir, 'apiserver.log') }];
    this.#child = fields.child;
  }

  /** Whether kube-controller-manager, kube-scheduler and the node run too. */
  get full(): boolean {
    return this.nodeDir !== undefined;
  }

  /** Records a process started after the API server (full mode). */
  addComponent(component: ClusterComponent, child: ChildProcess | undefined): void {
    this.components.push(component);
    if (child) this.#others.push(child);
  }

  /**
   * The API server's own serving certificate and key (self-signed by it at start, for 127.0.0.1 and
   * localhost): what a broker on this machine can serve the audit webhook with (the webhook trusts it).
   */
  get servingCert(): { cert: string; key: string } {
    return { cert: this.caFile, key: join(this.dir, 'pki', 'apiserver.key') };
  }

  /** The API server's serving CA, PEM. */
  get caPem(): string {
    return readFileSync(this.caFile, 'utf8');
  }

  get state(): LocalClusterState {
    return {
      pid: this.pid,
      server: this.server,
      caFile: this.caFile,
      kubeconfig: this.kubeconfig,
      auditLog: this.auditLog,
      version: KUBERNETES_VERSION,
      ...(this.auditWebhookTokenFile === undefined ? {} : { auditWebhookTokenFile: this.auditWebhookTokenFile }),
      mode: this.full ? 'full' : 'api-server-only',
      components: this.components.map((c) => ({ ...c })),
      ...(this.nodeDir === undefined ? {} : { nodeDir: this.nodeDir }),
    };
  }

  static async start(options: LocalClusterOptions = {}): Promise<LocalCluster> {
    const binDir = options.binDir ?? clusterBinDir();
    const apiserver = requireBinary(binDir, 'kube-apiserver');
    const full = options.full === true ? { components: requireBinary(binDir, 'kube-components'), node: requireBinary(binDir, 'local-node') } : undefined;
    const dir = prepareDir(options.dir);
    try {
      return await startIn(dir, apiserver, options, full);
    } catch (err) {
      rmSync(dir, { recursive: true, force: true });
      throw err;
    }
  }

  /** Stop a cluster started by another process, from the state file in `dir`, and remove `dir`. */
  static async stopDir(dir: string, timeoutMs = 15_000): Promise<LocalClusterState> {
    const state = readState(dir);
    // The node first (it ends its containers' process groups), with the controllers; the API server last.
    const others = (state.components ?? []).filter((c) => c.name !== 'kube-apiserver');
    const groups = state.nodeDir ? readProcessGroups(state.nodeDir) : [];
    await Promise.all(others.map((c) => killAndWait(c.pid, timeoutMs)));
    if (state.nodeDir) killProcessGroups(state.nodeDir);
    await groupsGone(groups, timeoutMs);
    await killAndWait(state.pid, timeoutMs);
    rmSync(dir, { recursive: true, force: true });
    return state;
  }

  static readState(dir: string): LocalClusterState {
    return readState(dir);
  }

  /**
   * Stops the cluster (each process SIGTERM, then SIGKILL after `timeoutMs`: the node, controller-manager
   * and scheduler, then any container process group the node left, then the API server) and removes its directory.
   */
  async stop(timeoutMs = 15_000): Promise<void> {
    if (this.#stopped) return;
    this.#stopped = true;
    attached.delete(this);
    const others = this.components.slice(1);
    const groups = this.nodeDir ? readProcessGroups(this.nodeDir) : [];
    await Promise.all(
      others.map((c) => {
        const child = this.#others.find((p) => p.pid === c.pid);
        return child ? stopChild(child, timeoutMs) : killAndWait(c.pid, timeoutMs);
      }),
    );
    if (this.nodeDir) killProcessGroups(this.nodeDir);
    await groupsGone(groups, timeoutMs);
    if (this.#child) await stopChild(this.#child, timeoutMs);
    else await killAndWait(this.pid, timeoutMs);
    rmSync(this.dir, { recursive: true, force: true });
  }

  /** Synchronous last resort, for process exit. */
  killNow(): void {
    if (this.#stopped) return;
    this.#stopped = true;
    for (const c of [...this.components].reverse()) {
      try {
        process.kill(c.pid, 'SIGKILL');
      } catch {
        // already gone
      }
    }
    if (this.nodeDir) killProcessGroups(this.nodeDir);
    rmSync(this.dir, { recursive: true, force: true });
  }
}

function prepareDir(dir: string | undefined): string {
  if (dir === undefined) return mkdtempSync(join(tmpdir(), 'task-broker-cluster-'));
  const abs = resolve(dir);
  if (existsSync(abs) && readdirSync(abs).length > 0) {
    throw new BrokerError('cluster_dir_not_empty', `${abs} exists and is not empty`, { field: '--dir' });
  }
  mkdirSync(abs, { recursive: true, mode: 0o700 });
  return abs;
}

interface FullBinaries {
  /** test/cluster's multi-call program: `certs`, kube-scheduler, kube-controller-manager. */
  components: string;
  node: string;
}

async function startIn(dir: string, apiserver: string, options: LocalClusterOptions, full: FullBinaries | undefined): Promise<LocalCluster> {
  const pki = join(dir, 'pki');
  mkdirSync(pki, { mode: 0o700 });
  // Full mode: the cluster's CA and a certificate for each component (Node cannot issue X.509).
  if (full) await execFileAsync(full.components, ['certs', '--dir', pki, '--node-name', NODE_NAME]);

  const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const saKey = join(pki, 'sa.key');
  const saPub = join(pki, 'sa.pub');
  writeFileSync(saKey, privateKey.export({ type: 'pkcs8', format: 'pem' }), { mode: 0o600 });
  writeFileSync(saPub, publicKey.export({ type: 'spki', format: 'pem' }), { mode: 0o600 });

  const adminToken = randomBytes(32).toString('base64url');
  const tokenFile = join(pki, 'tokens.csv');
  writeFileSync(tokenFile, `${adminToken},${ADMIN_USER},${ADMIN_USER},"system:masters"\n`, { mode: 0o600 });

  const auditPolicy = join(dir, 'audit-policy.yaml');
  writeFileSync(
    auditPolicy,
    ['apiVersion: audit.k8s.io/v1', 'kind: Policy', 'omitStages: ["RequestReceived"]', 'rules:', '  - level: Metadata', ''].join('\n'),
  );
  const auditLog = join(dir, 'audit.log');

  const flags = [
    '--bind-address=127.0.0.1',
    '--advertise-address=127.0.0.1',
    `--cert-dir=${pki}`,
    `--token-auth-file=${tokenFile}`,
    '--authorization-mode=RBAC',
    `--service-account-issuer=${SERVICE_ACCOUNT_ISSUER}`,
    `--service-account-signing-key-file=${saKey}`,
    `--service-account-key-file=${saPub}`,
    `--api-audiences=${SERVICE_ACCOUNT_ISSUER}`,
    `--audit-policy-file=${auditPolicy}`,
    `--audit-log-path=${auditLog}`,
    '--audit-log-mode=blocking',
    '--service-cluster-ip-range=10.0.0.0/24',
    ...(full
      ? [
          // Client certificates of the controllers and the node; the node's serving certificate and the
          // API server's own client certificate towards it, all from the cluster's CA.
          `--client-ca-file=${join(pki, 'ca.crt')}`,
          `--kubelet-certificate-authority=${join(pki, 'ca.crt')}`,
          `--kubelet-client-certificate=${join(pki, 'apiserver-kubelet-client.crt')}`,
          `--kubelet-client-key=${join(pki, 'apiserver-kubelet-client.key')}`,
          '--kubelet-preferred-address-types=InternalIP',
        ]
      : [
          // No controller-manager runs: nothing would create the objects these plugins wait for.
          '--disable-admission-plugins=ServiceAccount',
          '--enable-garbage-collector=false',
        ]),
    '--enable-priority-and-fairness=false',
    '--profiling=false',
  ];
  let auditWebhookTokenFile: string | undefined;
  if (options.auditWebhook) {
    const https = options.auditWebhook.url.startsWith('https://');
    if (options.auditWebhook.token !== undefined && !https) {
      throw new BrokerError('invalid_argument', 'an audit webhook with a token needs an https:// URL: the API server sends no credentials to a plain-http server', {
        field: '--audit-webhook',
      });
    }
    // The API server writes its own serving certificate before it loads the webhook's kubeconfig.
    const webhook = https && options.auditWebhook.caFile === undefined ? { ...options.auditWebhook, caFile: join(pki, 'apiserver.crt') } : options.auditWebhook;
    if (webhook.token !== undefined) {
      auditWebhookTokenFile = join(dir, 'audit-webhook.token');
      writeFileSync(auditWebhookTokenFile, `${webhook.token}\n`, { mode: 0o600 });
    }
    const webhookConfig = join(dir, 'audit-webhook.kubeconfig');
    writeFileSync(webhookConfig, auditWebhookKubeconfig(webhook), { mode: 0o600 });
    flags.push(
      `--audit-webhook-config-file=${webhookConfig}`,
      '--audit-webhook-mode=batch',
      '--audit-webhook-batch-max-wait=1s',
      // Batches of at most 10 MB, events of at most 100 KB (larger ones are dropped and counted in
      // apiserver_audit_error_total): no request URI an agent makes long can get a whole batch refused.
      '--audit-webhook-truncate-enabled=true',
      `--audit-webhook-initial-backoff=${webhook.initialBackoff ?? '1s'}`,
    );
  }

  const readyTimeoutMs = options.readyTimeoutMs ?? 90_000;
  // The port is chosen here and handed over, so another process may take it in between: retry.
  for (let attempt = 1; ; attempt++) {
    const port = await freePort();
    const logPath = join(dir, 'apiserver.log');
    const log = openSync(logPath, 'w', 0o600);
    const own = ['--etcd-dir', join(dir, 'etcd')];
    if (!options.detached) own.push('--exit-with-stdin', '--remove-on-exit', dir);
    const child = spawn(apiserver, [...own, '--', ...flags, `--secure-port=${port}`], {
      cwd: dir,
      detached: options.detached ?? false,
      stdio: [options.detached ? 'ignore' : 'pipe', log, log],
    });
    closeSync(log);
    const pid = child.pid;
    if (pid === undefined) {
      throw new BrokerError('cluster_start_failed', `could not start ${apiserver}`);
    }
    const server = `https://127.0.0.1:${port}`;
    const caFile = join(pki, 'apiserver.crt');
    const exited = new Promise<string>((done) => child.once('exit', (code, signal) => done(`exited with ${signal ?? code}`)));
    const partial = new LocalCluster({
      dir,
      server,
      caFile,
      kubeconfig: join(dir, 'admin.kubeconfig'),
      auditLog,
      adminToken,
      pid,
      child: options.detached ? undefined : child,
      auditWebhookTokenFile,
      nodeDir: full ? join(dir, 'node') : undefined,
    });
    if (!options.detached) attached.add(partial);
    const outcome = await Promise.race([waitReady(server, caFile, adminToken, readyTimeoutMs), exited]);
    if (outcome === 'ready') {
      writeFileSync(partial.kubeconfig, adminKubeconfig(server, caFile, adminToken), { mode: 0o600 });
      // The state is written before the other components start, so that `dev-cluster down` finds
      // whatever did start; then again with all of them.
      writeFileSync(join(dir, STATE_FILE), JSON.stringify(partial.state, null, 2) + '\n', { mode: 0o600 });
      unrefChild(child);
      if (full) {
        try {
          await startComponents(partial, full, options, readyTimeoutMs);
        } catch (err) {
          await partial.stop(5000);
          throw err;
        }
        writeFileSync(join(dir, STATE_FILE), JSON.stringify(partial.state, null, 2) + '\n', { mode: 0o600 });
      }
      return partial;
    }
    const logTail = tail(readFileSync(logPath, 'utf8'), 15);
    attached.delete(partial);
    if (outcome === 'timeout') {
      child.kill('SIGKILL');
      await exited;
      throw new BrokerError('cluster_start_failed', `kube-apiserver was not ready within ${readyTimeoutMs} ms:\n${logTail}`);
    }
    if (attempt < 3 && /address already in use/.test(logTail)) {
      rmSync(join(dir, 'etcd'), { recursive: true, force: true });
      continue;
    }
    throw new BrokerError('cluster_start_failed', `kube-apiserver ${outcome}:\n${logTail}`);
  }
}

/**
 * Full mode, once the API server is ready: the node's RBAC, then kube-controller-manager,
 * kube-scheduler and the node, each with its own client certificate; returns when the node is Ready
 * and the `default` ServiceAccount exists (the controllers run).
 */
async function startComponents(cluster: LocalCluster, bins: FullBinaries, options: LocalClusterOptions, timeoutMs: number): Promise<void> {
  const { dir, server, caFile } = cluster;
  const pki = join(dir, 'pki');
  const kubeconfigFor = (name: string, cert: string): string => {
    const path = join(dir, `${name}.kubeconfig`);
    writeFileSync(path, clientCertKubeconfig(server, caFile, join(pki, `${cert}.crt`), join(pki, `${cert}.key`)), { mode: 0o600 });
    return path;
  };
  // The node's identity, system:node:local-node, gets what the node needs and no more: RBAC alone
  // authorizes here (no Node authorizer), and the built-in system:node role lacks list/watch of the
  // secrets and config maps its pods' env may name.
  const api = (method: string, path: string, body: unknown) => apiRequest(server, caFile, cluster.adminToken, method, path, body);
  await api('POST', '/apis/rbac.authorization.k8s.io/v1/clusterroles', NODE_CLUSTER_ROLE);
  await api('POST', '/apis/rbac.authorization.k8s.io/v1/clusterrolebindings', {
    apiVersion: 'rbac.authorization.k8s.io/v1',
    kind: 'ClusterRoleBinding',
    metadata: { name: NODE_CLUSTER_ROLE.metadata.name },
    roleRef: { apiGroup: 'rbac.authorization.k8s.io', kind: 'ClusterRole', name: NODE_CLUSTER_ROLE.metadata.name },
    subjects: [{ apiGroup: 'rbac.authorization.k8s.io', kind: 'User', name: `system:node:${NODE_NAME}` }],
  });

  const nodeDir = cluster.nodeDir!;
  mkdirSync(nodeDir, { mode: 0o700 });
  const started: Array<{ component: ClusterComponent; exited: Promise<string> }> = [];
  const launch = (name: ClusterComponent['name'], file: string, args: string[]) => {
    const logPath = join(dir, `${name}.log`);
    const log = openSync(logPath, 'w', 0o600);
    const child = spawn(file, [...(options.detached ? [] : ['--exit-with-stdin']), ...args], {
      cwd: dir,
      argv0: name,
      detached: options.detached ?? false,
      stdio: [options.detached ? 'ignore' : 'pipe', log, log],
    });
    closeSync(log);
    if (child.pid === undefined) throw new BrokerError('cluster_start_failed', `could not start ${file}`);
    const component: ClusterComponent = { name, pid: child.pid, log: logPath };
    cluster.addComponent(component, options.detached ? undefined : child);
    started.push({ component, exited: new Promise((done) => child.once('exit', (code, signal) => done(`${name} exited with ${signal ?? code}`))) });
    unrefChild(child);
  };
  launch('kube-controller-manager', bins.components, [
    `--kubeconfig=${kubeconfigFor('controller-manager', 'controller-manager')}`,
    '--secure-port=0',
    '--leader-elect=false',
    '--use-service-account-credentials=true',
    `--service-account-private-key-file=${join(pki, 'sa.key')}`,
    `--root-ca-file=${caFile}`,
    // It makes a ServiceAccount and a token for each of its ~40 controllers before starting any:
    // with the default client rate limit (20/s) that alone took 4 s.
    '--kube-api-qps=200',
    '--kube-api-burst=400',
    '--profiling=false',
  ]);
  launch('kube-scheduler', bins.components, [`--kubeconfig=${kubeconfigFor('scheduler', 'scheduler')}`, '--secure-port=0', '--leader-elect=false', '--profiling=false']);
  launch('local-node', bins.node, [
    `--kubeconfig=${kubeconfigFor('node', 'node')}`,
    `--name=${NODE_NAME}`,
    `--dir=${nodeDir}`,
    `--tls-cert=${join(pki, 'node-serving.crt')}`,
    `--tls-key=${join(pki, 'node-serving.key')}`,
    `--client-ca=${join(pki, 'ca.crt')}`,
  ]);

  const deadline = Date.now() + timeoutMs;
  const ready = (async () => {
    while (Date.now() < deadline) {
      const [node, sa] = await Promise.all([
        api('GET', `/api/v1/nodes/${NODE_NAME}`, undefined).catch(() => undefined),
        api('GET', '/api/v1/namespaces/default/serviceaccounts/default', undefined).catch(() => undefined),
      ]);
      const conditions = (node as { status?: { conditions?: Array<{ type: string; status: string }> } } | undefined)?.status?.conditions ?? [];
      if (sa !== undefined && conditions.some((c) => c.type === 'Ready' && c.status === 'True')) return 'ready';
      await sleep(100);
    }
    return 'timeout';
  })();
  const outcome = await Promise.race([ready, ...started.map((s) => s.exited)]);
  if (outcome === 'ready') return;
  const logs = started.map((s) => `--- ${s.component.name} (${s.component.log}):\n${tail(safeRead(s.component.log), 10)}`).join('\n');
  throw new BrokerError(
    'cluster_start_failed',
    outcome === 'timeout' ? `the node was not Ready (or no default ServiceAccount) within ${timeoutMs} ms:\n${logs}` : `${outcome}:\n${logs}`,
  );
}

/** What the node's client identity may do: register and renew itself, run and report its pods. */
const NODE_CLUSTER_ROLE = {
  apiVersion: 'rbac.authorization.k8s.io/v1',
  kind: 'ClusterRole',
  metadata: { name: 'task-broker:local-node' },
  rules: [
    { apiGroups: [''], resources: ['nodes'], verbs: ['get', 'list', 'watch', 'create', 'update', 'patch'] },
    { apiGroups: [''], resources: ['nodes/status'], verbs: ['get', 'update', 'patch'] },
    { apiGroups: [''], resources: ['pods'], verbs: ['get', 'list', 'watch', 'delete'] },
    { apiGroups: [''], resources: ['pods/status'], verbs: ['get', 'update', 'patch'] },
    { apiGroups: [''], resources: ['secrets', 'configmaps', 'services'], verbs: ['get', 'list', 'watch'] },
    { apiGroups: ['', 'events.k8s.io'], resources: ['events'], verbs: ['create', 'update', 'patch'] },
    { apiGroups: ['coordination.k8s.io'], resources: ['leases'], verbs: ['get', 'create', 'update', 'patch'] },
  ],
};

function execFileAsync(file: string, args: string[]): Promise<void> {
  return new Promise((done, fail) =>
    execFile(file, args, (err, _stdout, stderr) =>
      err ? fail(new BrokerError('cluster_start_failed', `${file} ${args.join(' ')}: ${stderr.trim() || err.message}`)) : done(),
    ),
  );
}

/** Let this process exit with the child still running; an attached child still dies with it (its stdin closes). */
function unrefChild(child: ChildProcess): void {
  child.unref();
  (child.stdin as unknown as { unref?: () => void } | null)?.unref?.();
}

/** SIGTERM, SIGKILL after timeoutMs; resolves once the child has exited. */
async function stopChild(child: ChildProcess, timeoutMs: number): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise<void>((done) => child.once('exit', () => done()));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
  await exited;
  clearTimeout(timer);
}

/**
 * SIGKILL to every process group the node lists as alive in NODE_DIR/process-groups: empty after the
 * node's own clean exit, so this matters only when the node itself was killed.
 */
function killProcessGroups(nodeDir: string): void {
  killGroups(readProcessGroups(nodeDir));
}

function killGroups(pgids: number[]): void {
  for (const pgid of pgids) {
    try {
      process.kill(-pgid, 'SIGKILL');
    } catch {
      // gone
    }
  }
}

/**
 * Waits (up to `timeoutMs`) until none of `groups` has a live member. The node reaps a container's first process and
 * SIGKILLs its group, but does not wait for the rest of the group: a child of the container's shell is
 * still dying, or a zombie waiting for init, when the node has exited. A zombie is not alive (it holds
 * nothing and runs nothing), but it keeps its group in the kernel's tables until it is reaped.
 */
async function groupsGone(groups: number[], timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let left = groups.filter(groupAlive);
  while (left.length > 0 && Date.now() < deadline) {
    await sleep(20);
    left = left.filter(groupAlive);
  }
  // Past the deadline: SIGKILL what is left and go on stopping the rest (the API server, the
  // directory); whoever checks the groups afterwards still sees one that outlived this.
  killGroups(left);
}

/** Whether process group `pgid` has a member that is not a zombie (Linux: /proc/PID/stat). */
export function groupAlive(pgid: number): boolean {
  try {
    process.kill(-pgid, 0);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EPERM') return false;
  }
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    const [state, , pgrp] = statFields(entry);
    if (Number(pgrp) === pgid && state !== 'Z') return true;
  }
  return false;
}

/** The fields of /proc/PID/stat after the command's closing parenthesis: state, ppid, pgrp, ... (none once it is gone). */
function statFields(pid: number | string): string[] {
  const stat = safeRead(`/proc/${pid}/stat`);
  return stat ? stat.slice(stat.lastIndexOf(')') + 2).split(' ') : [];
}

/** The process groups of containers and execs the node lists as alive. */
export function readProcessGroups(nodeDir: string): number[] {
  return safeRead(join(nodeDir, 'process-groups'))
    .split('\n')
    .map((l) => Number(l.trim()))
    .filter((n) => Number.isInteger(n) && n > 1);
}

function safeRead(path: string): string {
  try {
    return readFileSync(path, 'utf8');
  } catch {
    return '';
  }
}

/** One JSON request to the API server as its administrator; resolves the parsed body of a 2xx (409 on create: undefined). */
function apiRequest(server: string, caFile: string, token: string, method: string, path: string, body: unknown): Promise<unknown> {
  const payload = body === undefined ? undefined : JSON.stringify(body);
  return new Promise((done, fail) => {
    const req = request(
      `${server}${path}`,
      {
        method,
        ca: readFileSync(caFile),
        headers: { authorization: `Bearer ${token}`, accept: 'application/json', ...(payload ? { 'content-type': 'application/json' } : {}) },
        timeout: 5000,
      },
      (res) => {
        let text = '';
        res.setEncoding('utf8');
        res.on('data', (d: string) => (text += d));
        res.on('end', () => {
          const status = res.statusCode ?? 0;
          if (status >= 200 && status < 300) done(text ? (JSON.parse(text) as unknown) : undefined);
          else if (status === 409 && method === 'POST') done(undefined);
          else fail(new BrokerError('cluster_start_failed', `${method} ${path}: ${status} ${text.slice(0, 300)}`));
        });
      },
    );
    req.on('timeout', () => req.destroy(new Error('timeout')));
    req.on('error', fail);
    req.end(payload);
  });
}

function clientCertKubeconfig(server: string, caFile: string, cert: string, key: string): string {
  return JSON.stringify(
    {
      apiVersion: 'v1',
      kind: 'Config',
      clusters: [{ name: 'local', cluster: { server, 'certificate-authority': caFile } }],
      users: [{ name: 'component', user: { 'client-certificate': cert, 'client-key': key } }],
      contexts: [{ name: 'local', context: { cluster: 'local', user: 'component' } }],
      'current-context': 'local',
    },
    null,
    2,
  );
}

async function waitReady(server: string, caFile: string, token: string, timeoutMs: number): Promise<'ready' | 'timeout'> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (existsSync(caFile)) {
      const status = await getStatus(`${server}/readyz`, readFileSync(caFile), token).catch(() => 0);
      if (status === 200) return 'ready';
    }
    await sleep(100);
  }
  return 'timeout';
}

function getStatus(url: string, ca: Buffer, token: string): Promise<number> {
  return new Promise((done, fail) => {
    const req = request(url, { ca, headers: { authorization: `Bearer ${token}` }, timeout: 2000 }, (res) => {
      res.resume();
      res.on('end', () => done(res.statusCode ?? 0));
    });
    req.on('timeout', () => req.destroy(new Error('timeout')));
    req.on('error', fail);
    req.end();
  });
}

/** A TCP port free on 127.0.0.1 right now (the kernel's choice). */
export function freePort(): Promise<number> {
  return new Promise((done, fail) => {
    const srv = createServer();
    srv.once('error', fail);
    srv.listen(0, '127.0.0.1', () => {
      const address = srv.address();
      srv.close(() => (typeof address === 'object' && address ? done(address.port) : fail(new Error('no port'))));
    });
  });
}

async function killAndWait(pid: number, timeoutMs: number): Promise<void> {
  if (!alive(pid)) return;
  process.kill(pid, 'SIGTERM');
  const deadline = Date.now() + timeoutMs;
  while (alive(pid)) {
    if (Date.now() > deadline) {
      process.kill(pid, 'SIGKILL');
      await sleep(100);
      if (alive(pid)) throw new BrokerError('internal', `process ${pid} did not exit after SIGKILL`);
      return;
    }
    await sleep(50);
  }
}

/** Whether a process runs (a zombie, exited but not yet reaped by its parent, does not). */
export function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
  return statFields(pid)[0] !== 'Z';
}

function readState(dir: string): LocalClusterState {
  const path = join(resolve(dir), STATE_FILE);
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch {
    throw new BrokerError('cluster_not_found', `no local control plane in ${resolve(dir)} (${STATE_FILE} is missing)`, {
      field: '--dir',
    });
  }
  return JSON.parse(text) as LocalClusterState;
}

function tail(text: string, lines: number): string {
  return text.trimEnd().split('\n').slice(-lines).join('\n');
}

function adminKubeconfig(server: string, caFile: string, token: string): string {
  return JSON.stringify(
    {
      apiVersion: 'v1',
      kind: 'Config',
      clusters: [{ name: 'local', cluster: { server, 'certificate-authority': caFile } }],
      users: [{ name: ADMIN_USER, user: { token } }],
      contexts: [{ name: 'local', context: { cluster: 'local', user: ADMIN_USER } }],
      'current-context': 'local',
    },
    null,
    2,
  );
}

function auditWebhookKubeconfig(webhook: AuditWebhook): string {
  const cluster: Record<string, string> = { server: webhook.url };
  if (webhook.caFile) cluster['certificate-authority'] = webhook.caFile;
  return JSON.stringify({
    apiVersion: 'v1',
    kind: 'Config',
    clusters: [{ name: 'audit', cluster }],
    users: [{ name: 'apiserver', user: webhook.token === undefined ? {} : { token: webhook.token } }],
    contexts: [{ name: 'audit', context: { cluster: 'audit', user: 'apiserver' } }],
    'current-context': 'audit',
  });
}
