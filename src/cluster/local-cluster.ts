/**
 * LocalCluster: a real kube-apiserver (with an embedded etcd) on random loopback ports in a fresh
 * directory, built from Go modules by test/cluster. Used by the tests and by `broker dev-cluster`.
 *
 * What it sets up: RBAC (never allow-all authorization), service-account token issuance (an ECDSA signing key),
 * an admin identity in `system:masters` (a static token, kept only in this directory), a Metadata-level
 * audit policy with a log file, and, when asked, an audit webhook pointing at a given URL.
 */
import { spawn, type ChildProcess } from 'node:child_process';
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
  readonly #child: ChildProcess | undefined;
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
  }) {
    this.dir = fields.dir;
    this.server = fields.server;
    this.caFile = fields.caFile;
    this.kubeconfig = fields.kubeconfig;
    this.auditLog = fields.auditLog;
    this.adminToken = fields.adminToken;
    this.pid = fields.pid;
    this.auditWebhookTokenFile = fields.auditWebhookTokenFile;
    this.#child = fields.child;
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
    };
  }

  static async start(options: LocalClusterOptions = {}): Promise<LocalCluster> {
    const binDir = options.binDir ?? clusterBinDir();
    const apiserver = requireBinary(binDir, 'kube-apiserver');
    const dir = prepareDir(options.dir);
    try {
      return await startIn(dir, apiserver, options);
    } catch (err) {
      rmSync(dir, { recursive: true, force: true });
      throw err;
    }
  }

  /** Stop a cluster started by another process, from the state file in `dir`, and remove `dir`. */
  static async stopDir(dir: string, timeoutMs = 15_000): Promise<LocalClusterState> {
    const state = readState(dir);
    await killAndWait(state.pid, timeoutMs);
    rmSync(dir, { recursive: true, force: true });
    return state;
  }

  static readState(dir: string): LocalClusterState {
    return readState(dir);
  }

  /** Stops the API server (SIGTERM, then SIGKILL after `timeoutMs`) and removes its directory. */
  async stop(timeoutMs = 15_000): Promise<void> {
    if (this.#stopped) return;
    this.#stopped = true;
    attached.delete(this);
    const child = this.#child;
    if (child && child.exitCode === null && child.signalCode === null) {
      const exited = new Promise<void>((done) => child.once('exit', () => done()));
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
      await exited;
      clearTimeout(timer);
    } else if (!child) {
      await killAndWait(this.pid, timeoutMs);
    }
    rmSync(this.dir, { recursive: true, force: true });
  }

  /** Synchronous last resort, for process exit. */
  killNow(): void {
    if (this.#stopped) return;
    this.#stopped = true;
    try {
      process.kill(this.pid, 'SIGKILL');
    } catch {
      // already gone
    }
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

async function startIn(dir: string, apiserver: string, options: LocalClusterOptions): Promise<LocalCluster> {
  const pki = join(dir, 'pki');
  mkdirSync(pki, { mode: 0o700 });

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
    // No controller-manager runs: nothing would create the objects these plugins wait for.
    '--disable-admission-plugins=ServiceAccount',
    '--enable-garbage-collector=false',
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
    });
    if (!options.detached) attached.add(partial);
    const outcome = await Promise.race([waitReady(server, caFile, adminToken, readyTimeoutMs), exited]);
    if (outcome === 'ready') {
      writeFileSync(partial.kubeconfig, adminKubeconfig(server, caFile, adminToken), { mode: 0o600 });
      writeFileSync(join(dir, STATE_FILE), JSON.stringify(partial.state, null, 2) + '\n', { mode: 0o600 });
      if (options.detached) {
        child.unref();
      } else {
        child.unref();
        (child.stdin as unknown as { unref?: () => void } | null)?.unref?.();
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

function freePort(): Promise<number> {
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

export function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
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
