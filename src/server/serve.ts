/**
 * `broker serve`: the composition root of the broker process. Every side effect (policy file, audit
 * log, cluster connection, clock, listening socket) enters here.
 */
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { isIP } from 'node:net';
import type { FastifyInstance } from 'fastify';
import { openCheckedAuditLog } from '../audit/head.ts';
import { BrokerError } from '../errors.ts';
import { ServiceAccountAuthenticator } from '../identity/service-account.ts';
import { clusterError, kubeApis, loadKubeConfig, type KubeApis } from '../kube/config.ts';
import { loadPolicyFile } from '../policy/parse.ts';
import { ApprovalService } from '../approvals/service.ts';
import { ApprovalKeys } from '../approvals/token.ts';
import { StateSigner } from '../state-signature.ts';
import { TaskService } from '../tasks/service.ts';
import { TaskStore } from '../tasks/store.ts';
import { Sweeper } from '../tasks/sweeper.ts';
import { buildApp } from './app.ts';
import { capTokenReviews, DEFAULT_LIMITS, type Limits } from './limits.ts';
import { Metrics } from './metrics.ts';
import { prepareKubeAudit, readWebhookToken } from './kube-audit.ts';

export interface ServeOptions {
  config: string;
  auditLog: string;
  kubeconfig?: string;
  host: string;
  port: number;
  tlsCert?: string;
  tlsKey?: string;
  /** Plain HTTP: only allowed on a loopback address. */
  insecureHttp?: boolean;
  sweepIntervalMs?: number;
  leaseMs?: number;
  orphanGraceMs?: number;
  orphanIntervalMs?: number;
  /** The API server URL clients should use (GET /v1/cluster); default: the broker's own. */
  publicServer?: string;
  /** Its CA (PEM file); default: the broker's own kubeconfig CA. */
  publicCa?: string;
  /** Start even if the audit log does not match its cluster checkpoint, recording audit.reset first (src/audit/head.ts). */
  acceptAuditReset?: boolean;
  /** Rate limits, connection caps and timeouts; each one not given takes its default (src/server/limits.ts). */
  limits?: Partial<Limits>;
  /** Take the API server's audit webhook, from posts bearing the token in this file (src/server/kube-audit.ts). */
  auditWebhookTokenFile?: string;
}

export interface RunningBroker {
  url: string;
  app: FastifyInstance;
  close(): Promise<void>;
}

export function isLoopback(host: string): boolean {
  if (host === 'localhost') return true;
  if (isIP(host) === 4) return host.startsWith('127.');
  return host === '::1';
}

export async function serve(opts: ServeOptions): Promise<RunningBroker> {
  let https: { key: Buffer; cert: Buffer } | undefined;
  if (opts.insecureHttp) {
    if (!isLoopback(opts.host)) {
      throw new BrokerError('invalid_argument', `plain HTTP is only allowed on a loopback address, not ${opts.host}`, { field: '--insecure-http' });
    }
    if (opts.tlsCert || opts.tlsKey) throw new BrokerError('invalid_argument', '--insecure-http and --tls-cert/--tls-key exclude each other', { field: '--insecure-http' });
  } else {
    if (!opts.tlsCert || !opts.tlsKey) {
      throw new BrokerError('invalid_argument', 'TLS needs --tls-cert and --tls-key (or --insecure-http on a loopback address)', {
        field: opts.tlsCert ? '--tls-key' : '--tls-cert',
      });
    }
    https = { cert: readFlagFile(opts.tlsCert, '--tls-cert'), key: readFlagFile(opts.tlsKey, '--tls-key') };
  }
  const webhookToken = opts.auditWebhookTokenFile === undefined ? undefined : readWebhookToken(opts.auditWebhookTokenFile);

  const { policy, text: policyText } = await loadPolicyFile(opts.config);
  const kube = kubeApis(loadKubeConfig(opts.kubeconfig));
  // The log is checked against its checkpoint in the cluster before anything is appended (src/audit/head.ts).
  const { audit, checkpoint } = await openCheckedAuditLog({
    path: opts.auditLog,
    api: kube.core,
    namespace: policy.broker.namespace,
    acceptReset: opts.acceptAuditReset === true,
  });
  const cluster = clusterInfo(kube, opts);
  // One key signs approval tokens and the state the broker trusts when it reads it back (task and
  // approval records), in the broker's own namespace.
  const keys = new ApprovalKeys(kube, policy.broker.namespace);
  const signer = new StateSigner(keys);
  const store = new TaskStore({ signer });
  try {
    // The signing key exists before anything is served: nobody can take its name first (for
    // instance as a service-account-token Secret whose token the broker could then read).
    await keys.signingKey();
    await store.watch(kube.config, policy.broker.taskNamespace);
  } catch (err) {
    await audit.close();
    await checkpoint.close();
    if (err instanceof BrokerError) throw err;
    throw clusterError(`reading the signing key in ${policy.broker.namespace} and watching tasks in ${policy.broker.taskNamespace} (was \`broker policy apply\` run?)`, err);
  }
  const approvals = new ApprovalService(kube, policy, audit, { keys, signer });
  // The webhook's view of tasks and of what the log already holds (auditIDs, JTIs), from the log's tail.
  const kubeAudit = webhookToken === undefined ? undefined : await prepareKubeAudit({ token: webhookToken, auditLogPath: opts.auditLog, taskNamespace: policy.broker.taskNamespace, store });
  const tasks = new TaskService(kube, policy, audit, store, { approvals, signer, onMinted: kubeAudit?.recent.minted });
  const sweeper = new Sweeper(kube, tasks, {
    ...(opts.sweepIntervalMs === undefined ? {} : { intervalMs: opts.sweepIntervalMs }),
    ...(opts.leaseMs === undefined ? {} : { leaseMs: opts.leaseMs }),
    ...(opts.orphanGraceMs === undefined ? {} : { orphanGraceMs: opts.orphanGraceMs }),
    ...(opts.orphanIntervalMs === undefined ? {} : { orphanIntervalMs: opts.orphanIntervalMs }),
    log: (msg) => process.stderr.write(`broker: ${msg}\n`),
    // Ended approval requests are kept a day for `broker approvals list`, then removed.
    housekeeping: () => approvals.sweep(24 * 3600 * 1000),
  });
  const metrics = new Metrics();
  metrics.watchSweeperLease(() => sweeper.leaseAgeSeconds());
  const limits: Limits = { ...DEFAULT_LIMITS, ...opts.limits };
  const app = buildApp({
    tasks,
    approvals,
    store,
    audit,
    // TokenReviews in flight are capped, so a flood of random tokens cannot pile up on the API server.
    authenticators: [new ServiceAccountAuthenticator(capTokenReviews(kube.authn, limits, metrics), policy)],
    cluster,
    metrics,
    limits,
    kubeAudit,
    ...(https ? { https } : {}),
  });

  await audit.append({
    type: 'broker.started',
    actor: 'system:broker',
    outcome: 'ok',
    details: {
      policySha256: createHash('sha256').update(policyText).digest('hex'),
      adoptedTasks: store
        .list()
        .filter((t) => t.state === 'active')
        .map((t) => t.id)
        .slice(0, 100),
      pid: process.pid,
    },
  });
  sweeper.start();
  const address = await app.listen({ host: opts.host, port: opts.port });
  let closing: Promise<void> | undefined;
  return {
    url: address,
    app,
    close: () =>
      (closing ??= (async () => {
        await app.close();
        await sweeper.stop();
        await store.stop();
        await audit.append({ type: 'broker.stopped', actor: 'system:broker', outcome: 'ok' }).catch(() => undefined);
        await audit.close();
        await checkpoint.close();
      })()),
  };
}

function clusterInfo(kube: KubeApis, opts: ServeOptions): { server: string; certificateAuthorityData?: string } {
  const own = kube.config.getCurrentCluster()!;
  const server = opts.publicServer ?? own.server;
  let ca: string | undefined;
  if (opts.publicCa) ca = readFlagFile(opts.publicCa, '--public-ca').toString('base64');
  else if (!opts.publicServer) ca = own.caData ?? (own.caFile ? readFlagFile(own.caFile, '--kubeconfig').toString('base64') : undefined);
  return { server, ...(ca ? { certificateAuthorityData: ca } : {}) };
}

function readFlagFile(path: string, flag: string): Buffer {
  try {
    return readFileSync(path);
  } catch (err) {
    throw new BrokerError('invalid_argument', `cannot read ${path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`, { field: flag, cause: err });
  }
}
