/**
 * `broker serve`: the composition root of the broker process. Every side effect (policy file, audit
 * log, cluster connection, clock, listening socket) enters here.
 *
 * Start-up, in an order where a failure leaves nothing behind:
 * 1. what needs no cluster and writes nothing: flags, TLS files, the policy, the kubeconfig, and a
 *    probe of the listen address (a port in use is refused here, at once);
 * 2. the audit log, locked (src/audit/lock.ts) and checked against its checkpoint in the cluster;
 *    or the PostgreSQL audit store (--audit-store), checked for its table and this role's rights;
 * 3. the broker's own credential, checked against what `policy apply` grants it (a broad one, such
 *    as cluster-admin, is refused and the refusal recorded, unless --allow-broad-credentials);
 * 4. the signing key and the task watch; the services, built from the policy in a PolicyHolder that
 *    a reload swaps (src/server/reload.ts);
 * 5. listen, with every request held at a gate until `broker.started` is durable: it is recorded
 *    only once the broker listens, and no request is served before it is on the log.
 * A failure at any step closes what was opened; an audit log this start created is removed if
 * nothing was recorded in it, and a log that existed is never touched.
 */
import { readFileSync } from 'node:fs';
import { isIP } from 'node:net';
import type { FastifyInstance } from 'fastify';
import { openCheckedAuditLog, type AuditCheckpointer } from '../audit/head.ts';
import type { AuditLog } from '../audit/log.ts';
import type { PostgresAuditStore } from '../audit/postgres.ts';
import { BrokerError, isBrokerError } from '../errors.ts';
import { AgentKeyStore } from '../identity/agent-keys.ts';
import { sharedUsedProofs } from '../identity/proof-replay.ts';
import { authenticatorsFor } from '../identity/authenticators.ts';
import { identitySummary } from '../identity/summary.ts';
import { clusterError, kubeApis, loadKubeConfig, type KubeApis } from '../kube/config.ts';
import { loadPolicyFile } from '../policy/parse.ts';
import type { Policy } from '../policy/types.ts';
import { ApprovalService } from '../approvals/service.ts';
import { ApprovalKeys } from '../approvals/token.ts';
import { StateSigner } from '../state-signature.ts';
import { TaskService } from '../tasks/service.ts';
import { TaskStore } from '../tasks/store.ts';
import { Sweeper } from '../tasks/sweeper.ts';
import { KubeProxy, PROXY_CONNECTIONS_PER_SOURCE, PROXY_PER_AGENT } from '../proxy/server.ts';
import { SessionTokens } from '../proxy/session.ts';
import { buildApp, type AppDeps } from './app.ts';
import { checkOwnCredential, type CredentialReport } from './credential-check.ts';
import { capTokenReviews, DEFAULT_LIMITS, formatRate, guardConnections, type Limits, type Rate } from './limits.ts';
import { Metrics } from './metrics.ts';
import { prepareKubeAudit, readWebhookToken } from './kube-audit.ts';
import { listenError, probeListen } from './listen.ts';
import { PolicyHolder, StoreListeners, type ReloadResult, type ReloadTrigger } from './reload.ts';
import { defaultLogFormat, fastifyLogging, stderrLines, type LogFormat, type LogLevel } from './request-log.ts';

export interface ServeOptions {
  config: string;
  /** The audit log file (the default store) ... */
  auditLog?: string | undefined;
  /**
   * ... or a PostgreSQL audit store shared by replicas (postgres://...; src/audit/postgres.ts). Exactly
   * one of the two. No cluster checkpoint for it: the database is the shared record.
   */
  auditStore?: string | undefined;
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
  /** Start with a credential that can do far more than `policy apply` grants (recorded). Default false: refused. */
  allowBroadCredentials?: boolean;
  /** The request log and start-up summary: `json` (pino) or `text`; default text on a terminal, else json. */
  logFormat?: LogFormat;
  /** Default `info` (every request). */
  logLevel?: LogLevel;
  /** Reload the policy when its file changes (default true; SIGHUP always works through `reload`). */
  watchPolicy?: boolean;
  /** Where the request log and summary go; default stderr. */
  write?: (line: string) => void;
  /** The Kubernetes API proxy (src/proxy/server.ts): where it listens, with the broker's TLS (or plain HTTP on loopback). */
  proxy?: ProxyServeOptions | undefined;
  /** Serve the web console under /ui (src/console/plugin.ts); `url`: the origin browsers reach it at (default: the listen address). */
  ui?: { url?: string | undefined } | undefined;
}

export interface ProxyServeOptions {
  host: string;
  port: number;
  /** The URL agents reach it at (the session tokens' audience); default: its listen address. */
  publicUrl?: string | undefined;
  /** Where exec and attach recordings go; default: the audit log's path + `.sessions`. */
  recordings?: string | undefined;
  /** How long an upstream answer's headers may take; default 60 s. */
  upstreamTimeoutMs?: number | undefined;
  /** Requests one agent may make through the proxy (default PROXY_PER_AGENT, 1000/1s); undefined in a given object: none. */
  perAgent?: Rate | undefined;
}

export interface RunningBroker {
  url: string;
  app: FastifyInstance;
  /** The running policy and its services. */
  policy: PolicyHolder;
  /** Reads the policy file again and swaps it in if it changed and is valid (SIGHUP). */
  reload(trigger?: ReloadTrigger): Promise<ReloadResult>;
  close(): Promise<void>;
}

export function isLoopback(host: string): boolean {
  if (host === 'localhost') return true;
  if (isIP(host) === 4) return host.startsWith('127.');
  return host === '::1';
}

export async function serve(opts: ServeOptions): Promise<RunningBroker> {
  // 1. Nothing written, nothing in the cluster.
  let https: { key: Buffer; cert: Buffer } | undefined;
  if (opts.insecureHttp) {
    if (!isLoopback(opts.host)) {
      throw new BrokerError('invalid_argument', `plain HTTP is only allowed on a loopback address, not ${opts.host}`, { field: '--insecure-http' });
    }
    if (opts.tlsCert || opts.tlsKey) throw new BrokerError('invalid_argument', '--insecure-http and --tls-cert/--tls-key exclude each other', { field: '--insecure-http' });
    if (opts.proxy && !isLoopback(opts.proxy.host)) {
      throw new BrokerError('invalid_argument', `plain HTTP is only allowed on a loopback address, not ${opts.proxy.host} (the proxy shares the broker's TLS: give --tls-cert and --tls-key)`, { field: '--proxy-listen' });
    }
  } else {
    if (!opts.tlsCert || !opts.tlsKey) {
      throw new BrokerError('invalid_argument', 'TLS needs --tls-cert and --tls-key (or --insecure-http on a loopback address)', {
        field: opts.tlsCert ? '--tls-key' : '--tls-cert',
      });
    }
    https = { cert: readFlagFile(opts.tlsCert, '--tls-cert'), key: readFlagFile(opts.tlsKey, '--tls-key') };
  }
  const webhookToken = opts.auditWebhookTokenFile === undefined ? undefined : readWebhookToken(opts.auditWebhookTokenFile);
  const { policy, text: policyText } = await readPolicy(opts.config);
  const kube = kubeApis(readKubeconfig(opts.kubeconfig, policy));
  const cluster = clusterInfo(kube, opts);
  await probeListen(opts.host, opts.port);
  if (policy.broker.proxyOnly && !opts.proxy) {
    throw new BrokerError('invalid_argument', `the policy sets broker.proxyOnly (only proxy session tokens are handed out), so the broker needs its proxy: add --proxy-listen HOST:PORT (docs/proxy.md)`, {
      field: '--proxy-listen',
    });
  }
  if (opts.proxy) await probeListen(opts.proxy.host, opts.proxy.port);
  if (opts.ui && !opts.ui.url && (opts.host === '0.0.0.0' || opts.host === '::')) {
    throw new BrokerError('invalid_argument', `the web console needs the URL browsers reach the broker at (its sign-in redirect and origin): add --ui-url https://HOST:PORT`, { field: '--ui-url' });
  }
  const format = opts.logFormat ?? defaultLogFormat();
  const write = opts.write ?? stderrLines.write;

  if ((opts.auditLog === undefined) === (opts.auditStore === undefined)) {
    throw new BrokerError('invalid_argument', 'give exactly one of --audit-log FILE and --audit-store postgres://...', { field: '--audit-log' });
  }
  if (opts.auditStore !== undefined && opts.proxy && opts.proxy.recordings === undefined) {
    throw new BrokerError('invalid_argument', 'with --audit-store the proxy needs --session-recordings DIR (there is no audit log file to keep them beside)', { field: '--session-recordings' });
  }

  // 2. The audit log: locked, and checked against its checkpoint before anything is appended.
  const { audit, checkpoint } =
    opts.auditStore !== undefined
      ? { audit: await (await import('../audit/postgres.ts')).PostgresAuditStore.open(opts.auditStore), checkpoint: undefined }
      : await openCheckedAuditLog({
          path: opts.auditLog!,
          api: kube.core,
          namespace: policy.broker.namespace,
          acceptReset: opts.acceptAuditReset === true,
          auditOptions: { lockCommand: 'broker serve' },
        });
  const opened: Opened = { audit, checkpoint };
  try {
    return await start(opts, { policy, policyText, kube, cluster, https, webhookToken, format, write }, opened);
  } catch (err) {
    await opened.holder?.close().catch(() => undefined);
    await opened.proxy?.close().catch(() => undefined);
    await opened.app?.close().catch(() => undefined);
    await opened.sweeper?.stop().catch(() => undefined);
    await opened.store?.stop().catch(() => undefined);
    await audit.discard().catch(() => undefined); // an empty log this start created is removed
    await checkpoint?.close();
    throw err;
  }
}

/** What a start has opened so far, for the clean-up of a failed one. */
interface Opened {
  audit: AuditLog | PostgresAuditStore;
  /** The file log's checkpoint in the cluster (none for the PostgreSQL store). */
  checkpoint: AuditCheckpointer | undefined;
  store?: TaskStore;
  app?: FastifyInstance;
  proxy?: KubeProxy;
  sweeper?: Sweeper;
  holder?: PolicyHolder;
}

interface Prepared {
  policy: Policy;
  policyText: string;
  kube: KubeApis;
  cluster: { server: string; certificateAuthorityData?: string; proxy?: { server: string } };
  https: { key: Buffer; cert: Buffer } | undefined;
  webhookToken: string | undefined;
  format: LogFormat;
  write: (line: string) => void;
}

async function start(opts: ServeOptions, p: Prepared, opened: Opened): Promise<RunningBroker> {
  const { policy, kube, format, write } = p;
  const { audit, checkpoint } = opened;

  // 3. The broker's own credential: no more than `policy apply` grants it.
  const credential = await checkOwnCredential(kube.config, policy);
  if (credential.broad.length > 0 && !opts.allowBroadCredentials) {
    const message = broadMessage(credential, policy, opts.kubeconfig);
    await audit
      .append({
        type: 'broker.start_refused',
        actor: 'system:broker',
        outcome: 'denied',
        reason: `the broker's credential can do far more than \`broker policy apply\` grants it: ${credential.broad.join('; ')}`,
        details: { subject: credential.subject ?? 'unknown', broad: credential.broad, pid: process.pid },
      })
      .catch(() => undefined);
    throw new BrokerError('forbidden', message, { field: '--kubeconfig' });
  }

  // 4. The signing key exists before anything is served: nobody can take its name first (for
  // instance as a service-account-token Secret whose token the broker could then read).
  // One key signs approval tokens and the state the broker trusts when it reads it back (task and
  // approval records), in the broker's own namespace.
  const keys = new ApprovalKeys(kube, policy.broker.namespace);
  const signer = new StateSigner(keys);
  const store = (opened.store = new TaskStore({ signer }));
  // On a PostgreSQL audit store, an agent proof is used once across every replica on it.
  const agentKeys = new AgentKeyStore(kube, policy.broker.namespace, signer, { usedProofs: sharedUsedProofs(opened.audit) });
  try {
    await keys.signingKey();
    await store.watch(kube.config, policy.broker.taskNamespace);
    await agentKeys.watch(kube.config);
  } catch (err) {
    if (err instanceof BrokerError) throw err;
    throw clusterError(`reading the signing key in ${policy.broker.namespace} and watching tasks in ${policy.broker.taskNamespace} (was \`broker policy apply\` run?)`, err);
  }
  // The webhook's view of tasks and of what the log already holds (auditIDs, JTIs), from the log's tail.
  const kubeAudit =
    p.webhookToken === undefined
      ? undefined
      : await prepareKubeAudit({
          token: p.webhookToken,
          ...('tailLines' in audit ? { tail: (max: number) => audit.tailLines(max) } : { auditLogPath: audit.path }),
          taskNamespace: policy.broker.taskNamespace,
          store,
        });
  const metrics = new Metrics();
  const limits: Limits = { ...DEFAULT_LIMITS, ...opts.limits };
  // TokenReviews in flight are capped, so a flood of random tokens cannot pile up on the API server.
  const authn = capTokenReviews(kube.authn, limits, metrics);
  // Proxy session tokens name the proxy's URL as audience: known once it listens, before anything is served.
  const sessions = opts.proxy ? new SessionTokens(signer, opts.proxy.publicUrl ?? '') : undefined;
  const listeners = new StoreListeners(store);
  const holder = (opened.holder = new PolicyHolder({
    path: opts.config,
    policy,
    text: p.policyText,
    audit,
    build: (next) => {
      const view = listeners.view(store);
      const approvals = new ApprovalService(kube, next, audit, { keys, signer });
      const tasks = new TaskService(kube, next, audit, view.store, { approvals, signer, onMinted: kubeAudit?.recent.minted, sessions });
      return { tasks, approvals, authenticators: authenticatorsFor(next, authn, agentKeys), activate: view.activate };
    },
  }));
  // The sweeper and the routes read the services through the holder at each use.
  const currentTasks = {
    get brokerNamespace() {
      return holder.tasks.brokerNamespace;
    },
    get history() {
      return holder.tasks.history;
    },
    sweepExpired: () => holder.tasks.sweepExpired(),
    sweepOrphans: (graceMs: number) => holder.tasks.sweepOrphans(graceMs),
  } as unknown as TaskService;
  const sweeper = (opened.sweeper = new Sweeper(kube, currentTasks, {
    ...(opts.sweepIntervalMs === undefined ? {} : { intervalMs: opts.sweepIntervalMs }),
    ...(opts.leaseMs === undefined ? {} : { leaseMs: opts.leaseMs }),
    ...(opts.orphanGraceMs === undefined ? {} : { orphanGraceMs: opts.orphanGraceMs }),
    ...(opts.orphanIntervalMs === undefined ? {} : { orphanIntervalMs: opts.orphanIntervalMs }),
    log: (msg) => process.stderr.write(`broker: ${msg}\n`),
    // Ended approval requests are kept a day for `broker approvals list`, then removed.
    housekeeping: () => holder.approvals.sweep(24 * 3600 * 1000),
  }));
  metrics.watchSweeperLease(() => sweeper.leaseAgeSeconds());
  const logging = fastifyLogging({ format, level: opts.logLevel ?? 'info', write }, store);
  // The gate of step 5: every request waits here (after authentication) until broker.started is durable.
  let gateOpen = false;
  let openGate!: () => void;
  let failGate!: (err: Error) => void;
  const started = new Promise<void>((resolve, reject) => {
    openGate = resolve;
    failGate = reject;
  });
  started.catch(() => undefined);
  const deps: AppDeps = {
    get tasks() {
      return holder.tasks;
    },
    get approvals() {
      return holder.approvals;
    },
    get authenticators() {
      return holder.authenticators;
    },
    store,
    audit,
    cluster: p.cluster,
    metrics,
    limits,
    kubeAudit,
    logging,
    loginIssuers: () => holder.policy.issuers.flatMap((i) => (i.login ? [{ issuer: i.issuer, clientId: i.login.clientId }] : [])),
    // Checked in the app's one onRequest hook: no hook of its own left installed after start-up.
    held: () => (gateOpen ? undefined : started),
    ...(p.https ? { https: p.https } : {}),
  };
  let consoleOrigin = opts.ui?.url?.replace(/\/+$/, '') ?? '';
  if (opts.ui) {
    const { registerConsole } = await import('../console/plugin.ts');
    deps.console = (app) =>
      registerConsole(app, {
        approvals: () => holder.approvals,
        tasks: () => holder.tasks,
        policy: () => holder.policy,
        authenticators: () => holder.authenticators,
        store,
        audit,
        auditLogPath: opts.auditLog,
        auditStore: opts.auditStore,
        recordings: opts.proxy ? (opts.proxy.recordings ?? `${opts.auditLog!}.sessions`) : undefined,
        origin: () => consoleOrigin,
        secure: p.https !== undefined,
        signer,
      });
  }
  const app = (opened.app = buildApp(deps));

  // 5. Listen, holding every request at the gate until broker.started is durable.
  let url: string;
  try {
    // fastify logs this line (the first of the summary), once per address when listening on all of them.
    url = await app.listen({ host: opts.host, port: opts.port, listenTextResolver: (address) => `listening on ${address} (${p.https ? 'TLS' : 'plain HTTP, loopback only'})` });
  } catch (err) {
    throw listenError(opts.host, opts.port, err);
  }
  consoleOrigin ||= url;
  if (opts.ui) app.log.info(`web console on ${consoleOrigin}/ui (sign-in redirect ${consoleOrigin}/ui/callback)`);
  let proxyUrl: string | undefined;
  if (opts.proxy && sessions) {
    const own = kube.config.getCurrentCluster()!;
    const proxy = (opened.proxy = new KubeProxy({
      upstream: { server: own.server, ca: own.caData ? Buffer.from(own.caData, 'base64') : own.caFile ? readFlagFile(own.caFile, '--kubeconfig') : undefined },
      https: p.https,
      sessions,
      tasks: {
        active: (id) => holder.tasks.active(id),
        upstreamToken: (id) => holder.tasks.upstreamToken(id),
      },
      audit,
      recordings: opts.proxy.recordings ?? `${opts.auditLog!}.sessions`,
      upstreamTimeoutMs: opts.proxy.upstreamTimeoutMs,
      ready: started,
      metrics,
      limits: { perSource: limits.perSource, perAgent: 'perAgent' in opts.proxy ? opts.proxy.perAgent : PROXY_PER_AGENT, failureLogIntervalMs: limits.failureLogIntervalMs },
    }));
    guardConnections(proxy.server, { maxConnections: limits.maxConnections, maxConnectionsPerSource: PROXY_CONNECTIONS_PER_SOURCE }, metrics);
    try {
      proxyUrl = await proxy.listen(opts.proxy.host, opts.proxy.port);
    } catch (err) {
      throw listenError(opts.proxy.host, opts.proxy.port, err);
    }
    sessions.audience ||= proxyUrl;
    p.cluster.proxy = { server: sessions.audience };
    app.log.info(`Kubernetes API proxy listening on ${proxyUrl} (${p.https ? 'TLS' : 'plain HTTP, loopback only'}); session audience ${sessions.audience}; forwarding to ${own.server}`);
  }
  try {
    await audit.append({
      type: 'broker.started',
      actor: 'system:broker',
      outcome: 'ok',
      ...(credential.broad.length > 0 ? { reason: `started with --allow-broad-credentials: the broker's credential can ${credential.broad.join('; ')}` } : {}),
      details: {
        policySha256: holder.sha256,
        templates: policy.templates.length,
        adoptedTasks: store
          .list()
          .filter((t) => t.state === 'active')
          .map((t) => t.id)
          .slice(0, 100),
        pid: process.pid,
        listen: url,
        ...(proxyUrl ? { proxy: { listen: proxyUrl, audience: sessions!.audience } } : {}),
        credential: {
          subject: credential.subject ?? 'unknown',
          ...(credential.broad.length > 0 ? { broad: credential.broad, allowedBy: '--allow-broad-credentials' } : {}),
          ...(credential.extra.length > 0 ? { extra: credential.extra.slice(0, 20), extraCount: credential.extra.length } : {}),
          ...(credential.unchecked.length > 0 ? { unchecked: credential.unchecked.slice(0, 10) } : {}),
        },
      },
    });
  } catch (err) {
    failGate(new BrokerError('audit_unavailable', 'the broker is stopping: its start could not be recorded'));
    throw err;
  }
  gateOpen = true;
  openGate();
  sweeper.start();
  if (opts.watchPolicy !== false) holder.watch();

  report(app, format, summary(opts, { url, policy, holder, audit, credential, limits, webhook: kubeAudit !== undefined, format, level: opts.logLevel ?? 'info' }));

  let closing: Promise<void> | undefined;
  return {
    url,
    app,
    policy: holder,
    reload: (trigger = 'SIGHUP') => holder.reload(trigger),
    close: () =>
      (closing ??= (async () => {
        await holder.close();
        await opened.proxy?.close();
        await app.close();
        await sweeper.stop();
        await store.stop();
        await agentKeys.stop();
        await audit.append({ type: 'broker.stopped', actor: 'system:broker', outcome: 'ok' }).catch(() => undefined);
        await audit.close();
        await checkpoint?.close();
      })()),
  };
}

/** A line of the summary: its text, and the same facts for the JSON form. */
interface SummaryLine {
  level: 'info' | 'warn';
  text: string;
}

function summary(
  opts: ServeOptions,
  s: { url: string; policy: Policy; holder: PolicyHolder; audit: AuditLog | PostgresAuditStore; credential: CredentialReport; limits: Limits; webhook: boolean; format: LogFormat; level: LogLevel },
): { lines: SummaryLine[]; facts: Record<string, unknown> } {
  const { policy, credential, limits } = s;
  const names = policy.templates.map((t) => t.name);
  const shown = names.length > 8 ? `${names.slice(0, 8).join(', ')}, ...` : names.join(', ');
  const identity = identitySummary(policy);
  const ms = (v: number) => (v > 0 ? `${v / 1000}s` : 'off');
  const count = (v: number) => (v > 0 ? String(v) : 'no cap');
  const credentialLine =
    credential.broad.length > 0
      ? `credential: ${credential.subject ?? 'unknown'} can ${credential.broad.join('; ')}: started anyway (--allow-broad-credentials), recorded with broker.started`
      : credential.extra.length > 0
        ? `credential: ${credential.subject ?? 'unknown'} can do more than \`broker policy apply\` grants: ${credential.extra.slice(0, 5).join('; ')}${credential.extra.length > 5 ? `; and ${credential.extra.length - 5} more` : ''}`
        : `credential: ${credential.subject ?? 'unknown'}, no more than \`broker policy apply\` grants`;
  const lines: SummaryLine[] = [
    { level: 'info', text: `policy ${opts.config}: sha256 ${s.holder.sha256}, ${names.length} template${names.length === 1 ? '' : 's'} (${shown}); reloaded when the file changes and on SIGHUP` },
    {
      level: 'info',
      text:
        'where' in s.audit
          ? `audit store ${s.audit.where}: ${s.audit.nextSeq} record${s.audit.nextSeq === 1 ? '' : 's'} so far, one hash chain shared with every replica on it`
          : `audit log ${s.audit.path}: ${s.audit.nextSeq} record${s.audit.nextSeq === 1 ? '' : 's'}${s.audit.created ? ' (a new file)' : ''}, locked by this process (pid ${process.pid}, ${s.audit.lock?.path ?? 'no lock'})`,
    },
    { level: 'info', text: identity.text },
    { level: credential.broad.length + credential.extra.length > 0 ? 'warn' : 'info', text: credentialLine },
    ...(credential.unchecked.length > 0 ? [{ level: 'warn' as const, text: `credential: not checked: ${credential.unchecked.join('; ')}` }] : []),
    { level: 'info', text: `namespaces: tasks in ${policy.broker.taskNamespace}, the broker's own state in ${policy.broker.namespace}` },
    { level: 'info', text: `audit webhook: ${s.webhook ? 'on (POST /v1/audit/kubernetes)' : 'off'}` },
    {
      level: 'info',
      text:
        `limits: ${formatRate(limits.perSource)} per source, ${formatRate(limits.authFailures)} failed authentications per source, ${formatRate(limits.perIdentity)} per identity, ` +
        `${count(limits.maxTokenReviews)} TokenReviews in flight, ${count(limits.maxConnections)} connections (${count(limits.maxConnectionsPerSource)} per source); ` +
        `timeouts: request ${ms(limits.requestTimeoutMs)}, headers ${ms(limits.headersTimeoutMs)}, connection ${ms(limits.connectionTimeoutMs)}, keep-alive ${ms(limits.keepAliveTimeoutMs)}`,
    },
    { level: 'info', text: `request log: ${s.format} on stderr, level ${s.level} (--log-format, --log-level)` },
  ];
  const facts = {
    listen: s.url,
    tls: !opts.insecureHttp,
    policy: { path: opts.config, sha256: s.holder.sha256, templates: names },
    ...('where' in s.audit
      ? { auditStore: { url: s.audit.where, records: s.audit.nextSeq } }
      : { auditLog: { path: s.audit.path, records: s.audit.nextSeq, created: s.audit.created, lock: s.audit.lock?.path } }),
    identity: identity.facts,
    credential,
    namespaces: { tasks: policy.broker.taskNamespace, broker: policy.broker.namespace },
    auditWebhook: s.webhook,
    limits: {
      perSource: formatRate(limits.perSource),
      authFailures: formatRate(limits.authFailures),
      perIdentity: formatRate(limits.perIdentity),
      maxTokenReviews: limits.maxTokenReviews,
      maxConnections: limits.maxConnections,
      maxConnectionsPerSource: limits.maxConnectionsPerSource,
      requestTimeoutMs: limits.requestTimeoutMs,
      headersTimeoutMs: limits.headersTimeoutMs,
      connectionTimeoutMs: limits.connectionTimeoutMs,
      keepAliveTimeoutMs: limits.keepAliveTimeoutMs,
    },
  };
  return { lines, facts };
}

/**
 * The summary on stderr, through the broker's logger (so --log-format and --log-level apply): one
 * line per fact in the text form; one `broker started` record with every fact in the JSON form. Warnings
 * are lines of their own at `warn` in both.
 */
function report(app: FastifyInstance, format: LogFormat, s: { lines: SummaryLine[]; facts: Record<string, unknown> }): void {
  if (format === 'json') app.log.info(s.facts, 'broker started');
  for (const l of s.lines) {
    if (l.level === 'warn') app.log.warn(l.text);
    else if (format === 'text') app.log.info(l.text);
  }
}

function broadMessage(credential: CredentialReport, policy: Policy, kubeconfig: string | undefined): string {
  const { namespace, serviceAccount } = policy.broker;
  return (
    `the broker's credential (${credential.subject ?? 'unknown identity'}${kubeconfig ? `, from ${kubeconfig}` : ', in-cluster'}) can do far more than \`broker policy apply\` grants the broker: ` +
    `${credential.broad.join('; ')}. A broker holding it is bounded by nothing (docs/architecture.md). ` +
    `Run it with the ServiceAccount policy apply made, ${namespace}/${serviceAccount}: in a cluster, as that ServiceAccount without --kubeconfig; ` +
    `elsewhere with a kubeconfig holding its token, e.g. kubectl config set-credentials broker --kubeconfig broker.kubeconfig --token "$(kubectl create token ${serviceAccount} -n ${namespace} --duration 24h)" ` +
    `(as docs/examples/quickstart.sh does). Or pass --allow-broad-credentials to start anyway (recorded in the audit log)`
  );
}

/** The policy file, with a message naming --config and what to do when it cannot be read. */
async function readPolicy(path: string): Promise<{ policy: Policy; text: string }> {
  try {
    return await loadPolicyFile(path);
  } catch (err) {
    if (isBrokerError(err) && err.code === 'invalid_argument' && err.field === path) {
      throw new BrokerError('invalid_argument', `${err.message}: check the path given to --config (\`broker policy check FILE\` validates a policy file; docs/policy.md describes one)`, {
        field: '--config',
        cause: err,
      });
    }
    throw err;
  }
}

/** The broker's kubeconfig, with a message naming --kubeconfig and how to make one. */
function readKubeconfig(path: string | undefined, policy: Policy): ReturnType<typeof loadKubeConfig> {
  try {
    return loadKubeConfig(path);
  } catch (err) {
    if (!isBrokerError(err)) throw err;
    const { namespace, serviceAccount } = policy.broker;
    throw new BrokerError(
      err.code,
      `${err.message}. --kubeconfig names the broker's own kubeconfig: a token of the ServiceAccount \`broker policy apply\` made, ${namespace}/${serviceAccount} ` +
        `(kubectl config set-credentials broker --kubeconfig FILE --token "$(kubectl create token ${serviceAccount} -n ${namespace})"); ` +
        `without --kubeconfig the broker uses its in-cluster ServiceAccount`,
      { field: '--kubeconfig', cause: err },
    );
  }
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
