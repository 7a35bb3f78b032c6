/**
 * A whole task-broker environment for integration tests: a real control plane, the policy applied by
 * an administrator, agent identities (ServiceAccount tokens with the broker's audience), and broker
 * processes (`broker serve`) started and stopped by pid.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as k8s from '@kubernetes/client-node';
import { calculateJwkThumbprint, exportJWK, generateKeyPair } from 'jose';
import { KEY_SECRET } from '../../src/approvals/token.ts';
import { LocalCluster, type LocalClusterOptions } from '../../src/cluster/local-cluster.ts';
import { kubeApis, type KubeApis } from '../../src/kube/config.ts';
import { applyPolicy } from '../../src/policy/apply.ts';
import { parsePolicy } from '../../src/policy/parse.ts';
import type { Policy } from '../../src/policy/types.ts';
import { adminConfig, writeTokenKubeconfig } from './kube.ts';

export const POLICY_FILE = new URL('../fixtures/broker-policy.yaml', import.meta.url).pathname;
const MAIN = new URL('../../src/cli/main.ts', import.meta.url).pathname;

/**
 * `broker ARGS` from this tree's source, run to completion (a CLI step of a test: `audit migrate`,
 * `audit verify`, ...): its exit status and output. `env`, when given, is its whole environment;
 * otherwise it inherits the test's.
 */
export function brokerCli(args: string[], env?: NodeJS.ProcessEnv): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [MAIN, ...args], { encoding: 'utf8', timeout: 60_000, ...(env ? { env } : {}) });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

export interface BrokerEnvOptions {
  policyText?: string;
  /**
   * Namespaces to create before the policy is applied. Default: every template namespace. The
   * namespaces of the policy's ServiceAccount identities, and the broker's own two (`broker.namespace`,
   * `broker.taskNamespace`), are always there.
   */
  namespaces?: string[];
  /** Runs as the administrator after the namespaces exist and before the policy is applied. */
  beforeApply?: (admin: KubeApis) => Promise<void>;
  /** How to start the cluster (e.g. `full: true`, an audit webhook). Default: the API server alone. */
  cluster?: LocalClusterOptions;
}

export class BrokerEnv {
  readonly cluster: LocalCluster;
  readonly admin: KubeApis;
  readonly policy: Policy;
  readonly dir: string;
  readonly policyFile: string;
  readonly brokerKubeconfig: string;
  readonly #brokers = new Set<BrokerProcess>();

  private constructor(cluster: LocalCluster, admin: KubeApis, policy: Policy, dir: string, policyFile: string, brokerKubeconfig: string) {
    this.cluster = cluster;
    this.admin = admin;
    this.policy = policy;
    this.dir = dir;
    this.policyFile = policyFile;
    this.brokerKubeconfig = brokerKubeconfig;
  }

  static async start(options: BrokerEnvOptions = {}): Promise<BrokerEnv> {
    const dir = mkdtempSync(join(tmpdir(), 'tb-env-'));
    let cluster: LocalCluster | undefined;
    try {
      cluster = await LocalCluster.start(options.cluster);
      const admin = kubeApis(adminConfig(cluster));
      const text = options.policyText ?? readFileSync(POLICY_FILE, 'utf8');
      const policyFile = join(dir, 'policy.yaml');
      writeFileSync(policyFile, text);
      const policy = parsePolicy(text, policyFile);
      const identities = [
        ...policy.agents.flatMap((a) => a.identities),
        ...policy.people.flatMap((p) => p.identities),
        ...policy.approverGroups.flatMap((g) => g.members),
      ].flatMap((id) =>
        id.kind === 'serviceAccount' ? [id] : [],
      );
      const namespaces = options.namespaces ?? [...new Set(policy.templates.flatMap((t) => t.namespaces))];
      const brokerNamespaces = [policy.broker.namespace, policy.broker.taskNamespace];
      for (const ns of new Set([...namespaces, ...identities.map((id) => id.namespace), ...brokerNamespaces])) {
        await admin.core.createNamespace({ body: { metadata: { name: ns } } }).catch((err) => {
          if (!(err instanceof k8s.ApiException && err.code === 409)) throw err;
        });
      }
      await options.beforeApply?.(admin);
      await applyPolicy(admin, policy, {});
      // The broker runs with its own ServiceAccount's token, minted in its own namespace (broker.namespace):
      // exactly what `policy apply` granted it.
      const brokerToken = await mintToken(admin, policy.broker.namespace, policy.broker.serviceAccount, [], 3600);
      const brokerKubeconfig = writeTokenKubeconfig(join(dir, 'broker.kubeconfig'), cluster, brokerToken);
      // Agents and approvers are ServiceAccounts whose tokens carry the broker's audience.
      for (const id of identities) {
        await admin.core.createNamespacedServiceAccount({ namespace: id.namespace, body: { metadata: { name: id.name } } }).catch((err) => {
          if (!(err instanceof k8s.ApiException && err.code === 409)) throw err;
        });
      }
      return new BrokerEnv(cluster, admin, policy, dir, policyFile, brokerKubeconfig);
    } catch (err) {
      await cluster?.stop();
      rmSync(dir, { recursive: true, force: true });
      throw err;
    }
  }

  /** A ServiceAccount token for `agents/NAME` with the broker's audience: the agent's identity. */
  agentToken(name: string, namespace = 'agents'): Promise<string> {
    return mintToken(this.admin, namespace, name, [this.policy.broker.identityAudience], 3600);
  }

  async startBroker(
    options: {
      auditLog?: string;
      /** A PostgreSQL audit store (postgres://...) in place of the audit log file. */
      auditStore?: string;
      extraArgs?: string[];
      env?: NodeJS.ProcessEnv;
      shellPrefix?: string;
      tls?: { cert: string; key: string };
      listen?: string;
    } = {},
  ): Promise<BrokerProcess> {
    const auditLog = options.auditStore ?? options.auditLog ?? join(this.dir, 'audit.jsonl');
    const args = [
      MAIN,
      'serve',
      '--config',
      this.policyFile,
      options.auditStore === undefined ? '--audit-log' : '--audit-store',
      auditLog,
      '--kubeconfig',
      this.brokerKubeconfig,
      '--listen',
      options.listen ?? '127.0.0.1:0',
      ...(options.tls ? ['--tls-cert', options.tls.cert, '--tls-key', options.tls.key] : ['--insecure-http']),
      '--sweep-interval',
      '1s',
      '--orphan-grace',
      '2s',
      '--lease-duration',
      '3s',
      ...(options.extraArgs ?? []),
    ];
    const broker = await BrokerProcess.spawn(args, auditLog, options.env, options.shellPrefix);
    this.#brokers.add(broker);
    return broker;
  }

  async stop(): Promise<void> {
    for (const b of this.#brokers) b.kill('SIGKILL');
    await this.cluster.stop();
    rmSync(this.dir, { recursive: true, force: true });
  }

  /**
   * The brokers' signing key rotated as an operator rotates it (docs/approvals.md): a new Ed25519
   * `current` in the key Secret, the old one kept as `previous` (its public part). `dropPrevious()`
   * then removes `previous`, which voids whatever the old key signed.
   */
  async rotateSigningKey(): Promise<{ old: { kid: string }; current: { kid: string }; dropPrevious: () => Promise<void> }> {
    const ns = this.policy.broker.namespace;
    const write = async (keys: object) => {
      const secret = await this.admin.core.readNamespacedSecret({ name: KEY_SECRET, namespace: ns });
      await this.admin.core.replaceNamespacedSecret({ name: KEY_SECRET, namespace: ns, body: { ...secret, data: { 'keys.json': Buffer.from(JSON.stringify(keys)).toString('base64') } } });
    };
    const held = await this.admin.core.readNamespacedSecret({ name: KEY_SECRET, namespace: ns });
    const old = (JSON.parse(Buffer.from(held.data!['keys.json']!, 'base64').toString()) as { current: Record<string, string> & { kid: string } }).current;
    const { d: _private, ...previous } = old;
    const { privateKey } = await generateKeyPair('EdDSA', { crv: 'Ed25519', extractable: true });
    const jwk = await exportJWK(privateKey);
    const current = { ...jwk, kid: await calculateJwkThumbprint(jwk) };
    await write({ current, previous });
    return { old, current, dropPrevious: () => write({ current }) };
  }

  /** Task objects in the cluster, by kind, for assertions that nothing is left standing. */
  async taskObjects(): Promise<{ secrets: string[]; serviceAccounts: string[]; roleBindings: string[] }> {
    const ns = this.policy.broker.taskNamespace;
    const sel = 'task-broker.dev/task-id';
    const [s, a] = await Promise.all([
      this.admin.core.listNamespacedSecret({ namespace: ns, labelSelector: sel }),
      this.admin.core.listNamespacedServiceAccount({ namespace: ns, labelSelector: sel }),
    ]);
    const b = await this.admin.rbac.listRoleBindingForAllNamespaces({ labelSelector: sel });
    const names = (l: { items: Array<{ metadata?: { name?: string; namespace?: string } }> }) => l.items.map((i) => `${i.metadata?.namespace}/${i.metadata?.name}`).sort();
    return { secrets: names(s), serviceAccounts: names(a), roleBindings: names(b) };
  }
}

export async function mintToken(kube: KubeApis, namespace: string, name: string, audiences: string[], seconds: number): Promise<string> {
  const res = await kube.core.createNamespacedServiceAccountToken({ name, namespace, body: { spec: { audiences, expirationSeconds: seconds } } });
  const token = res.status?.token;
  if (!token) throw new Error(`no token for ${namespace}/${name}`);
  return token;
}

export class BrokerProcess {
  readonly url: string;
  readonly auditLog: string;
  readonly child: ChildProcess;
  stderr = '';

  private constructor(url: string, auditLog: string, child: ChildProcess) {
    this.url = url;
    this.auditLog = auditLog;
    this.child = child;
  }

  /** `shellPrefix` runs the broker under sh with that prefix (e.g. "ulimit -f 2;") before exec. */
  static spawn(args: string[], auditLog: string, env?: NodeJS.ProcessEnv, shellPrefix?: string): Promise<BrokerProcess> {
    const [cmd, argv] = shellPrefix
      ? ['/bin/sh', ['-c', `${shellPrefix} exec "$0" "$@"`, process.execPath, ...args]]
      : [process.execPath, args];
    const child = spawn(cmd, argv, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env } });
    let stderr = '';
    child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
    return new Promise((done, fail) => {
      let out = '';
      child.stdout!.on('data', (d: Buffer) => {
        out += d.toString();
        const m = /listening on (\S+)/.exec(out);
        if (m) {
          const b = new BrokerProcess(m[1]!, auditLog, child);
          child.stderr!.on('data', (d2: Buffer) => (b.stderr += d2.toString()));
          b.stderr = stderr;
          done(b);
        }
      });
      child.once('exit', (code) => fail(new Error(`broker exited with ${code} before listening:\n${stderr}`)));
    });
  }

  get pid(): number {
    return this.child.pid!;
  }

  kill(signal: NodeJS.Signals = 'SIGTERM'): void {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill(signal);
  }

  /** Resolves once the broker has exited (at once if it has). */
  exited(): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return Promise.resolve();
    return new Promise((done) => this.child.once('exit', () => done()));
  }

  /** Stops the broker and waits for it to exit. */
  async stop(signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    const exited = this.exited();
    this.child.kill(signal);
    await exited;
  }

  /** A JSON request to the broker as `token`'s holder. */
  async request(method: string, path: string, token: string | undefined, body?: unknown, rawBody?: string): Promise<{ status: number; body: any }> {
    const headers: Record<string, string> = {};
    if (token) headers['authorization'] = `Bearer ${token}`;
    if (body !== undefined || rawBody !== undefined) headers['content-type'] = 'application/json';
    const res = await fetch(this.url + path, { method, headers, ...(rawBody !== undefined ? { body: rawBody } : body !== undefined ? { body: JSON.stringify(body) } : {}) });
    const text = await res.text();
    let parsed: unknown = text;
    try {
      parsed = JSON.parse(text);
    } catch {
      // not JSON (e.g. /metrics)
    }
    return { status: res.status, body: parsed };
  }

  auditRecords(): Array<Record<string, any>> {
    return readFileSync(this.auditLog, 'utf8')
      .split('\n')
      .filter(Boolean)
      .map((l) => JSON.parse(l) as Record<string, any>);
  }
}
