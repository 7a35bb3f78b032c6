/**
 * Starting, ending and serving credentials for tasks: the broker's core use cases. Every decision is
 * written to the audit log before the caller hears of it; objects are created and removed in the order
 * that keeps a failure (or a crash) from leaving access standing.
 */
import type { V1Secret } from '@kubernetes/client-node';
import { decodeJwt } from 'jose';
import type { AuditSink } from '../audit/sink.ts';
import type { AuditEventInput } from '../audit/types.ts';
import { BrokerError } from '../errors.ts';
import { failpoint } from '../failpoint.ts';
import { actorOf, type Caller } from '../identity/types.ts';
import { clusterError, isConflict, isNotFound, type KubeApis } from '../kube/config.ts';
import { ApprovalRequiredError, type StartGate } from './gate.ts';
import { formatDuration, parseDuration } from '../policy/duration.ts';
import { gatedPairsHitBy } from '../policy/grants.ts';
import type { GatedPair, Policy, PolicyRule, Template } from '../policy/types.ts';
import { SIGNATURE_ANNOTATION, type StateSigner } from '../state-signature.ts';
import { checkFreeText } from '../text.ts';
import {
  LABEL,
  newTaskId,
  roleBindingNameFor,
  secretNameFor,
  serviceAccountNameFor,
  taskAnnotations,
  taskFacts,
  taskFromSecret,
  taskLabels,
  templateClusterRole,
  toView,
  type Task,
} from './model.ts';
import type { TaskStore } from './store.ts';
import { historyView, TaskHistory, type EndedState, type TaskStateView } from './history.ts';

/** Below this a task is not worth its objects; the policy's maxTtl bounds it from above. */
export const MIN_TASK_TTL_SECONDS = 10;
const DNS_LABEL = /^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$/;

export interface StartRequest {
  template: string;
  namespace: string;
  name?: string | undefined;
  /** Seconds, or a duration such as "15m". */
  ttl?: number | string | undefined;
  reason?: string | undefined;
  /** For gated templates: the approval token issued for exactly this start. */
  approvalToken?: string | undefined;
}

export interface Credential {
  token: string;
  /** The earlier of the token's expiry and the task's end. */
  expirationTimestamp: string;
  taskId: string;
  jti: string;
}

interface MintedToken {
  token: string;
  jti: string;
  expiresAt: Date;
  mintedAt: Date;
  /** `expiresAt` in ISO 8601, for the record of every serve. */
  expiresIso: string;
  /** The answer served with it, made once (for the task expiry it was made with). */
  answer?: { credential: Credential; taskExpiresMs: number } | undefined;
}

export interface TaskServiceOptions {
  now?: () => Date;
  /** Gated templates need it; without it they cannot be started at all. */
  approvals?: StartGate;
  /** Signs each task record (the store verifies them); without it records are unsigned (unit tests only). */
  signer?: StateSigner;
  /** Told of each token minted, once its record is durable (the audit webhook maps JTIs to tasks: src/tasks/recent.ts). */
  onMinted?: ((task: Task, jti: string, expiresAt: Date) => void) | undefined;
  /** Where ended tasks are kept for `task list --all` (default: ConfigMaps in the broker's namespace, src/tasks/history.ts). */
  history?: TaskHistory;
  /** Where best-effort failures (a history entry not written) are logged. Default stderr. */
  log?: (line: string) => void;
  /** Issues proxy session tokens (src/proxy/session.ts); without it `via: proxy` is refused. */
  sessions?: SessionIssuer | undefined;
}

/** What the task service needs of the proxy's session tokens (src/proxy/session.ts implements it). */
export interface SessionIssuer {
  readonly audience: string;
  issue(s: { task: string; agent: string; subject: string; taskExpiresAt: Date }): Promise<{ token: string; sid: string; expiresAt: Date }>;
}

/** A session token served for a task, reused like a minted token. */
interface ServedSession {
  subject: string;
  sid: string;
  issuedAt: Date;
  expiresAt: Date;
  credential: Credential;
}

/** How many task objects the orphan sweep reads a page (kubectl's chunk size). */
const ORPHAN_PAGE = 500;

/** Failpoint `start-after-started-record` armed (src/failpoint.ts): the start then awaits its record before activating. */
const RECORD_FIRST_FAILPOINT = (process.env['TASK_BROKER_FAILPOINTS'] ?? '').split(',').includes('start-after-started-record');

/** TokenRequest's floor for `expirationSeconds`. */
export const MIN_TOKEN_SECONDS = 600;

/**
 * The lifetime to ask TokenRequest for: the lesser of the policy's tokenTTL and the task's remaining
 * time, raised to the API's 600 s floor only when that is shorter. A task with less than 600 s left
 * relies on the broker deleting its RoleBinding on time (docs/architecture.md).
 */
export function tokenSeconds(tokenTtl: number, remainingSeconds: number): number {
  return Math.max(MIN_TOKEN_SECONDS, Math.min(tokenTtl, Math.ceil(remainingSeconds)));
}

export type EndCause = 'ended' | 'expired' | 'orphaned';

export class TaskService {
  readonly #kube: KubeApis;
  readonly #policy: Policy;
  readonly #audit: AuditSink;
  readonly #store: TaskStore;
  readonly #now: () => Date;
  readonly #tokens = new Map<string, MintedToken>();
  readonly #minting = new Map<string, Promise<MintedToken>>();
  readonly #sessions: SessionIssuer | undefined;
  readonly #served = new Map<string, ServedSession>();
  readonly #templates: Map<string, Template>;
  readonly #approvals: StartGate | undefined;
  /** Per template with `rules`, the gated pairs they hit: non-empty ones start only with an approval token. */
  readonly #gated: Map<string, GatedPair[]>;
  readonly #signer: StateSigner | undefined;
  readonly #onMinted: TaskServiceOptions['onMinted'];
  readonly #log: (line: string) => void;
  /** Ended, expired and revoked tasks, kept for `broker.taskHistory`. */
  readonly history: TaskHistory;

  constructor(kube: KubeApis, policy: Policy, audit: AuditSink, store: TaskStore, options: TaskServiceOptions = {}) {
    this.#kube = kube;
    this.#policy = policy;
    this.#audit = audit;
    this.#store = store;
    this.#now = options.now ?? (() => new Date());
    this.#templates = new Map(policy.templates.map((t) => [t.name, t]));
    this.#approvals = options.approvals;
    this.#gated = new Map(policy.templates.map((t) => [t.name, gatedPairsHitBy(t.rules ?? [], policy.gated)]));
    this.#signer = options.signer;
    this.#onMinted = options.onMinted;
    this.#log = options.log ?? ((line) => process.stderr.write(`broker: ${line}\n`));
    this.history = options.history ?? new TaskHistory(kube, policy.broker.namespace, policy.broker.taskHistory, { signer: options.signer, now: this.#now });
    this.#sessions = options.sessions;
    store.onRemoved((id) => {
      this.#tokens.delete(id);
      this.#served.delete(id);
    });
    store.onForged((task) => void this.#revokeForged(task));
  }

  /** A task record whose signature fails: it grants nothing more, and what it names is removed. */
  async #revokeForged(task: Task): Promise<void> {
    this.#tokens.delete(task.id);
    await this.#audit
      .append({
        type: 'task.forged',
        actor: 'system:broker',
        agent: task.agent,
        task: task.id,
        taskName: task.name,
        template: task.template,
        namespace: task.namespace,
        outcome: 'denied',
        reason: 'the task record in the cluster does not carry a valid broker signature: it was changed outside the broker; revoking it',
      })
      .catch(() => undefined);
    await this.#deleteObjects(task).catch(() => undefined);
    await this.#remember(task, 'revoked', 'its record in the cluster was changed outside the broker (forged signature)', 'system:broker');
  }

  /**
   * Writes the history entry of a task that has ended, after its audit record. Best effort: a failure
   * is logged, and a slow API server delays the answer by at most 5 s (the write goes on meanwhile).
   */
  async #remember(task: Task, state: EndedState, cause: string, actor: string): Promise<void> {
    const write = this.history.record(task, state, cause, actor).then(
      () => undefined,
      (err: unknown) => this.#log(`the history entry of task ${task.id} was not written: ${(err as Error).message}`),
    );
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([write, new Promise((done) => (timer = setTimeout(done, 5_000)))]);
    clearTimeout(timer);
  }

  /**
   * The gated pairs a template hits. A `clusterRole` template's rules live in the cluster and can
   * change, so its ClusterRole is read at every start (fail closed: unreadable means no start).
   */
  async gatedHits(template: Template): Promise<{ hits: GatedPair[]; rules: PolicyRule[] | undefined }> {
    if (!template.clusterRole) return { hits: this.#gated.get(template.name) ?? [], rules: undefined };
    let role;
    try {
      role = await this.#kube.rbac.readClusterRole({ name: template.clusterRole });
    } catch (err) {
      throw clusterError(`reading ClusterRole ${template.clusterRole} of template "${template.name}"`, err);
    }
    const rules: PolicyRule[] = (role.rules ?? []).map((r) => ({
      ...(r.apiGroups ? { apiGroups: r.apiGroups } : {}),
      ...(r.resources ? { resources: r.resources } : {}),
      ...(r.resourceNames ? { resourceNames: r.resourceNames } : {}),
      ...(r.nonResourceURLs ? { nonResourceURLs: r.nonResourceURLs } : {}),
      verbs: r.verbs,
    }));
    // An aggregated role whose rules the controller has not filled in yet could become anything: gated.
    if (role.aggregationRule && rules.length === 0) return { hits: [{ verb: '*', resource: '*', apiGroup: '*' }], rules };
    return { hits: gatedPairsHitBy(rules, this.#policy.gated), rules };
  }

  get taskNamespace(): string {
    return this.#policy.broker.taskNamespace;
  }

  /** The broker's own namespace (its Lease, approval records, signing key). */
  get brokerNamespace(): string {
    return this.#policy.broker.namespace;
  }

  /** The audience callers' ServiceAccount tokens must carry (for the hint of a refused identity). */
  get identityAudience(): string {
    return this.#policy.broker.identityAudience;
  }

  /** The templates the caller may start (none for a caller who is not an agent), in policy order. */
  templatesFor(caller: Caller): Template[] {
    return caller.agent ? this.#policy.templates.filter((t) => t.agents.includes(caller.agent)) : [];
  }

  /** Who approves a gated template's tasks, and how many approvals it needs. */
  approvalOf(template: Template): { approvers: string[]; required: number } {
    return template.approval ?? this.#policy.defaultApproval;
  }

  /** Checks a start request against the policy; throws the first problem, naming its field. */
  validateStart(caller: Caller, req: StartRequest): { template: Template; name: string; ttl: number } {
    checkFreeText('template', req.template);
    checkFreeText('reason', req.reason);
    const template = this.#templates.get(req.template);
    const mayStart = this.templatesFor(caller).map((t) => t.name);
    const startable = mayStart.length ? `; templates agent "${caller.agent}" may start: ${mayStart.join(', ')}` : '';
    if (!template) {
      const near = didYouMean(req.template, mayStart);
      throw new BrokerError('unknown_template', `no template "${req.template}" in the policy${near ? `; did you mean "${near}"?` : ''}${startable}`, { field: 'template' });
    }
    if (!caller.agent) throw new BrokerError('forbidden', `${caller.subject} is not an agent in the policy`);
    if (!template.agents.includes(caller.agent)) {
      throw new BrokerError('forbidden', `agent "${caller.agent}" may not start template "${template.name}"${startable}`, { field: 'template' });
    }
    if (!DNS_LABEL.test(req.namespace)) {
      throw new BrokerError('invalid_argument', '"namespace" must be a DNS-1123 label', { field: 'namespace' });
    }
    if (!template.namespaces.includes(req.namespace)) {
      const near = didYouMean(req.namespace, template.namespaces);
      throw new BrokerError(
        'namespace_not_allowed',
        `template "${template.name}" does not allow namespace "${req.namespace}"${near ? `; did you mean "${near}"?` : ''}; allowed: ${template.namespaces.join(', ')}`,
        { field: 'namespace' },
      );
    }
    const name = req.name ?? template.name;
    if (!DNS_LABEL.test(name)) {
      throw new BrokerError('invalid_argument', '"name" must be a DNS-1123 label (lowercase letters, digits and "-", at most 63)', { field: 'name' });
    }
    let ttl = template.defaultTtl;
    if (typeof req.ttl === 'string') {
      try {
        ttl = parseDuration(req.ttl);
      } catch (err) {
        throw new BrokerError('invalid_argument', `"ttl": ${(err as Error).message}`, { field: 'ttl' });
      }
    } else if (req.ttl !== undefined) ttl = req.ttl;
    if (!Number.isInteger(ttl) || ttl < MIN_TASK_TTL_SECONDS || ttl > template.maxTtl) {
      const typed = typeof req.ttl === 'string' ? req.ttl : undefined;
      throw new BrokerError(
        'ttl_out_of_range',
        `"ttl" ${typed?.trim() ?? `${ttl}s`} is ${ttl > template.maxTtl ? 'above' : 'below'} the range of template "${template.name}": ` +
          `from ${inUnitOf(MIN_TASK_TTL_SECONDS, typed)} to ${inUnitOf(template.maxTtl, typed)} (default ${inUnitOf(template.defaultTtl, typed)})`,
        { field: 'ttl' },
      );
    }
    if (req.reason !== undefined && req.reason.length > 1024) {
      throw new BrokerError('invalid_argument', '"reason" must be at most 1024 characters', { field: 'reason' });
    }
    return { template, name, ttl };
  }

  async start(caller: Caller, req: StartRequest, requestId?: string): Promise<Task> {
    const base = { actor: actorOf(caller), agent: caller.agent, template: req.template, namespace: req.namespace, requestId } as const;
    let checked: ReturnType<TaskService['validateStart']>;
    try {
      checked = this.validateStart(caller, req);
      if (this.#store.findByName(caller.agent, checked.name)) throw taskExists(caller.agent, checked.name);
      const limit = this.#policy.broker.limits.activeTasksPerAgent;
      const held = this.#store.countOf(caller.agent);
      if (held >= limit) {
        throw new BrokerError('quota_exceeded', `agent "${caller.agent}" already holds ${held} tasks, the most the policy allows (broker.limits.activeTasksPerAgent: ${limit}); end one first`);
      }
    } catch (err) {
      await this.#refuse(base, req.name, err);
      throw err;
    }
    const { template, name, ttl } = checked;
    // The task record's signature: made with the key held (read at most 5 s ago) when there is one,
    // else after a read of the key Secret, which then starts now (overlapping the checks below: the
    // ClusterRole read, the approval). The key Secret is read afresh in either case, and that read is
    // awaited before the record is activated (#createObjects): what is active carries a signature by
    // the key current then (src/state-signature.ts, startPendingSigning).
    const signTask = this.#signer?.startPendingSigning('task');
    let approvalId: string | undefined;
    let gate: Awaited<ReturnType<TaskService['gatedHits']>>;
    try {
      gate = await this.gatedHits(template);
    } catch (err) {
      await this.#refuse(base, name, err);
      throw err;
    }
    if (gate.hits.length > 0) {
      if (!this.#approvals) throw new BrokerError('forbidden', `template "${template.name}" is gated and this broker takes no approvals`);
      try {
        approvalId = await this.#approvals.authorize(
          caller,
          { template, namespace: req.namespace, name, ttl, reason: req.reason, ...(gate.rules ? { clusterRoleRules: gate.rules } : {}) },
          req.approvalToken,
          requestId,
        );
      } catch (err) {
        await this.#refuse(base, name, err);
        if (err instanceof ApprovalRequiredError) {
          // The next step, for the requester and for an approver (every part is a policy name, a DNS label or a checked duration).
          const again = `broker task start ${template.name} --namespace ${req.namespace}${name === template.name ? '' : ` --name ${name}`}${req.ttl === undefined ? '' : ` --ttl ${typeof req.ttl === 'number' ? `${req.ttl}s` : req.ttl.trim()}`}`;
          throw new ApprovalRequiredError(err.requestId, `${err.message}; wait for it with: ${again} --wait (an approver runs: broker approve ${err.requestId})`);
        }
        throw err;
      }
    } else if (req.approvalToken !== undefined) {
      const err = new BrokerError('invalid_argument', `template "${template.name}" is not gated: it takes no approval token`, { field: 'approvalToken' });
      await this.#refuse(base, name, err);
      throw err;
    }
    const now = this.#now();
    const id = newTaskId();
    const task: Task = {
      id,
      name,
      agent: caller.agent,
      template: template.name,
      namespace: req.namespace,
      createdAt: now,
      expiresAt: new Date(now.getTime() + ttl * 1000),
      ...(req.reason === undefined ? {} : { reason: req.reason }),
      ...(approvalId === undefined ? {} : { approvalId }),
      state: 'pending',
      secretName: secretNameFor(caller.agent, name),
      serviceAccount: serviceAccountNameFor(id),
      roleBinding: roleBindingNameFor(id),
    };
    const facts = { ...base, task: task.id, taskName: name, expiresAt: task.expiresAt.toISOString() };

    // Write-ahead: the attempt is on record before anything exists; an unwritable log stops it here.
    // The record is signed meanwhile (with no key held, the key Secret's read overlaps the fsync).
    const signing = signTask?.sign(taskFacts(task));
    signing?.catch(() => undefined); // observed below, after the record
    const requested = this.#audit.append({ ...facts, type: 'task.requested', outcome: 'ok', ...(req.reason ? { reason: req.reason } : {}) });
    // With a key held, its fresh read starts once the record's write is under way: the file log hands
    // the write to the thread pool from the setImmediate its append queued, before this one. Sending
    // the GET first delayed the write's start by 0.6 to 0.8 ms of the event loop's time; now it
    // overlaps the write (docs/benchmarks.md, "Task start", fourth pass).
    if (signTask) setImmediate(signTask.read);
    await requested;
    try {
      if (signing) task.signature = await signing;
    } catch (err) {
      await this.#refuse({ ...base, task: task.id }, name, err);
      throw err;
    }
    try {
      // `task.started` is written while the record is being activated (the last round trip): the
      // answer waits for both, so it is durable before the caller hears of the task. If either fails,
      // what was created is removed and the refusal recorded (after a `task.started` that was
      // written, the refusal says the start did not complete).
      await this.#createObjects(task, template, () => this.#audit.append({ ...facts, type: 'task.started', outcome: 'allowed' }), signTask?.confirm);
    } catch (err) {
      await this.#refuse({ ...base, task: task.id }, name, err);
      throw err;
    }
    this.#store.upsert(task);
    return task;
  }

  /**
   * The Secret first (the task record, `pending`, and the per-agent name lock); then the ServiceAccount
   * and the RoleBinding at once, as neither needs the other (a RoleBinding may name a ServiceAccount
   * that does not exist yet; it grants nothing until a token of it exists, and none is minted before
   * the record is active); then the Secret is marked active. Three round trips on the start's path
   * instead of four. What a crash leaves is what it left with the two made one after the other: a
   * pending record, with any of the other two; never a RoleBinding without its record (it is created
   * only once the record exists, and removed first), never an active record without both.
   *
   * `record` (the `task.started` append) runs beside the activating patch; both must succeed, or
   * everything is rolled back and the first failure (the record's first) thrown. A crash between the
   * two leaves either an active record whose `task.started` is missing (as a crash after the patch
   * always could: a replica adopts it, `broker.started` names it) or a pending one after a
   * `task.started` (the orphan sweep removes it and records `task.cleaned`).
   *
   * `confirm` (the signature's fresh key read, StateSigner.startPendingSigning) is awaited beside the
   * ServiceAccount and the RoleBinding, before `task.started` and the patch: a failed read rolls back
   * like a failed create. When the key current now differs from the one the pending record was signed
   * with, the activating patch also replaces the signature annotation (one write: the record never
   * acts under the older signature). The ServiceAccount and the RoleBinding keep the first signature
   * as created: nothing verifies theirs, the record's is the one trusted.
   */
  async #createObjects(task: Task, template: Template, record: () => Promise<unknown>, confirm?: () => Promise<string | undefined>): Promise<void> {
    const ns = this.taskNamespace;
    const labels = taskLabels(task);
    const annotations = taskAnnotations(task);
    // What exists, for the rollback: the RoleBinding (which grants) goes first, the record last.
    const made = { secret: false, serviceAccount: false, roleBinding: false };
    try {
      let secret: V1Secret;
      try {
        secret = await this.#kube.core.createNamespacedSecret({
          namespace: ns,
          body: { metadata: { name: task.secretName, labels: { ...labels, [LABEL.state]: 'pending' }, annotations }, type: 'Opaque' },
        });
      } catch (err) {
        if (isConflict(err)) throw taskExists(task.agent, task.name);
        throw clusterError('creating the task Secret', err);
      }
      made.secret = true;
      if (secret.metadata?.uid) task.secretUid = secret.metadata.uid;
      failpoint('start-after-secret');

      const account = this.#kube.core.createNamespacedServiceAccount({ namespace: ns, body: { metadata: { name: task.serviceAccount, labels, annotations } } }).then(
        () => {
          made.serviceAccount = true;
          failpoint('start-after-serviceaccount');
        },
        (err: unknown) => Promise.reject(clusterError('creating the task ServiceAccount', err)),
      );
      const binding = this.#kube.rbac
        .createNamespacedRoleBinding({
          namespace: task.namespace,
          body: {
            metadata: { name: task.roleBinding, labels, annotations },
            roleRef: { apiGroup: 'rbac.authorization.k8s.io', kind: 'ClusterRole', name: template.clusterRole ?? templateClusterRole(template.name) },
            subjects: [{ kind: 'ServiceAccount', name: task.serviceAccount, namespace: ns }],
          },
        })
        .then(
          () => {
            made.roleBinding = true;
            failpoint('start-after-rolebinding');
          },
          (err: unknown) => Promise.reject(clusterError('creating the task RoleBinding', err)),
        );
      // All settled before anything is rolled back, so a RoleBinding still in flight is not missed.
      const [a, b, c] = await Promise.allSettled([account, binding, confirm?.()]);
      if (a.status === 'rejected') throw a.reason;
      if (b.status === 'rejected') throw b.reason;
      if (c.status === 'rejected') throw c.reason;
      const resigned = c.value;
      const activate = [{ op: 'replace', path: `/metadata/labels/${LABEL.state.replace('/', '~1')}`, value: 'active' }];
      if (resigned !== undefined) activate.push({ op: 'replace', path: `/metadata/annotations/${SIGNATURE_ANNOTATION.replace('/', '~1')}`, value: resigned });

      const recorded = record();
      // Tests only: the crash once the record is durable and before the patch is sent (the state a
      // crash between the two leaves when the record wins; the patch usually does, on loopback).
      if (RECORD_FIRST_FAILPOINT) await recorded.then(() => failpoint('start-after-started-record'));
      const activated = this.#kube.core
        .patchNamespacedSecret({ name: task.secretName, namespace: ns, body: activate })
        .catch((err) => Promise.reject(clusterError('activating the task', err)));
      const [p, r] = await Promise.allSettled([activated, recorded]);
      if (r.status === 'rejected') throw r.reason;
      if (p.status === 'rejected') throw p.reason;
      if (resigned !== undefined) task.signature = resigned;
      task.state = 'active';
      failpoint('start-after-activate');
    } catch (err) {
      // Roll back what was created: the RoleBinding (which grants) first, the record last.
      if (made.roleBinding) await this.#kube.rbac.deleteNamespacedRoleBinding({ name: task.roleBinding, namespace: task.namespace }).catch(() => undefined);
      if (made.serviceAccount) await this.#kube.core.deleteNamespacedServiceAccount({ name: task.serviceAccount, namespace: ns }).catch(() => undefined);
      if (made.secret) await this.#kube.core.deleteNamespacedSecret({ name: task.secretName, namespace: ns }).catch(() => undefined);
      throw err;
    }
  }

  /** RoleBinding (denies at once), then Secret (refuses its tokens), then ServiceAccount. */
  async #deleteObjects(task: Pick<Task, 'roleBinding' | 'namespace' | 'secretName' | 'serviceAccount'>): Promise<void> {
    const ns = this.taskNamespace;
    const gone = (err: unknown) => {
      if (!isNotFound(err)) throw err;
    };
    try {
      if (task.roleBinding) await this.#kube.rbac.deleteNamespacedRoleBinding({ name: task.roleBinding, namespace: task.namespace }).catch(gone);
      if (task.secretName) await this.#kube.core.deleteNamespacedSecret({ name: task.secretName, namespace: ns }).catch(gone);
      if (task.serviceAccount) await this.#kube.core.deleteNamespacedServiceAccount({ name: task.serviceAccount, namespace: ns }).catch(gone);
    } catch (err) {
      throw clusterError('revoking the task', err);
    }
  }

  async #refuse(base: Omit<AuditEventInput, 'type'>, taskName: string | undefined, err: unknown): Promise<void> {
    const code = err instanceof BrokerError ? err.code : 'internal';
    const field = err instanceof BrokerError && err.field ? ` (${err.field})` : '';
    await this.#audit
      .append({
        ...base,
        ...(taskName === undefined ? {} : { taskName }),
        type: 'task.refused',
        outcome: 'denied',
        reason: `${code}${field}: ${err instanceof Error ? err.message : String(err)}`,
      })
      .catch(() => undefined); // the refusal stands either way; an unwritable log fails the next step
  }

  /** The task `ref` (id, or name among the caller's tasks) if the caller may act on it. */
  async resolve(caller: Caller, ref: string, action: string, requestId?: string): Promise<Task> {
    const task = this.#store.get(ref) ?? this.#store.findByName(caller.agent, ref);
    if (!task || task.state !== 'active') {
      // A gated task waiting for approval: say so, with the request id (the exec plugin shows it).
      const pending = action === 'credential' && caller.agent ? await this.#approvals?.waitingFor(caller, ref) : undefined;
      if (pending) throw new ApprovalRequiredError(pending.id, `task "${ref}" waits for approval: ${pending.approvals} of ${pending.required} so far`);
      throw new BrokerError('no_active_task', `agent "${caller.agent}" has no active task "${ref}"${await this.#startHint(caller, ref)}`);
    }
    if (task.agent !== caller.agent) {
      await this.#audit.append({
        type: 'task.refused',
        actor: actorOf(caller),
        agent: caller.agent,
        task: task.id,
        template: task.template,
        namespace: task.namespace,
        outcome: 'denied',
        reason: `forbidden: ${action} of another agent's task (owner ${task.agent})`,
        requestId,
      });
      throw new BrokerError('forbidden', `task "${ref}" belongs to another agent`);
    }
    return task;
  }

  /**
   * What to do about a task that is not active: from the history, when and how it ended and the
   * command that starts it again (its real template and namespace); else how to start one.
   */
  async #startHint(caller: Caller, ref: string): Promise<string> {
    const entry = caller.agent ? await this.history.find(caller.agent, ref).catch(() => undefined) : undefined;
    if (entry) {
      const t = entry.task;
      const how = { ended: 'ended', expired: 'expired', revoked: 'was revoked', cleaned: 'was cleaned up' }[entry.state];
      return `: it ${how} at ${entry.endedAt}; start it again with: broker task start ${t.template} --namespace ${t.namespace} --name ${t.name}`;
    }
    const template = this.templatesFor(caller).find((t) => t.name === ref);
    if (template) {
      const ns = template.namespaces.length === 1 ? template.namespaces[0]! : `NAMESPACE (one of ${template.namespaces.join(', ')})`;
      return `; start one with: broker task start ${template.name} --namespace ${ns}`;
    }
    return DNS_LABEL.test(ref) ? `; start one with: broker task start TEMPLATE --namespace NAMESPACE --name ${ref} (broker templates lists what you may start)` : '';
  }

  list(caller: Caller): Task[] {
    return this.#store.ofAgent(caller.agent).filter((t) => t.state === 'active');
  }

  /** The caller's active tasks, then those in the history (newest first), each with its state. */
  async listAll(caller: Caller): Promise<TaskStateView[]> {
    const active = this.list(caller).map((t): TaskStateView => ({ ...toView(t), state: 'active' }));
    const ended = (await this.history.list(caller.agent)).filter((e) => !active.some((a) => a.id === e.task.id)).map(historyView);
    return [...active, ...ended];
  }

  /** The task `ref` if active (as resolve), else the caller's ended task of that id or name from the history. */
  async show(caller: Caller, ref: string, requestId?: string): Promise<TaskStateView> {
    try {
      return { ...toView(await this.resolve(caller, ref, 'read', requestId)), state: 'active' };
    } catch (err) {
      if (!(err instanceof BrokerError) || err.code !== 'no_active_task' || !caller.agent) throw err;
      const entry = await this.history.find(caller.agent, ref);
      if (!entry) throw err;
      return historyView(entry);
    }
  }

  async end(caller: Caller, ref: string, requestId?: string): Promise<Task> {
    const task = await this.resolve(caller, ref, 'end', requestId);
    await this.endTask(task, 'ended', actorOf(caller), requestId);
    return task;
  }

  /** Revokes a task for any cause. The access goes first; the record follows before any reply. */
  async endTask(task: Task, cause: EndCause, actor: string, requestId?: string): Promise<void> {
    this.#tokens.delete(task.id);
    await this.#deleteObjects(task);
    this.#store.remove(task.id);
    await this.#audit.append({
      type: cause === 'ended' ? 'task.ended' : cause === 'expired' ? 'task.expired' : 'task.cleaned',
      actor,
      agent: task.agent,
      task: task.id,
      taskName: task.name,
      template: task.template,
      namespace: task.namespace,
      outcome: 'ok',
      requestId,
    });
    if (cause === 'ended') await this.#remember(task, 'ended', `ended by ${actor}`, actor);
    else if (cause === 'expired') await this.#remember(task, 'expired', `its TTL ran out at ${task.expiresAt.toISOString()}`, actor);
    else await this.#remember(task, 'cleaned', 'its start never completed; what it had created was removed', actor);
  }

  /** A token for the caller's task: the one in memory while enough of its life remains, else a new one. */
  async credential(caller: Caller, ref: string, requestId?: string): Promise<Credential> {
    const task = await this.resolve(caller, ref, 'credential', requestId);
    if (this.#policy.broker.proxyOnly) {
      await this.#audit.append({
        type: 'credential.refused',
        actor: actorOf(caller),
        agent: caller.agent,
        task: task.id,
        outcome: 'denied',
        reason: 'broker.proxyOnly: only proxy session tokens are handed out',
        requestId,
      });
      throw new BrokerError(
        'forbidden',
        'this broker hands out proxy session tokens only (broker.proxyOnly): a task\'s own token never leaves it; use a kubeconfig from `broker kubeconfig --via proxy` (or `broker credential --via proxy`)',
        { field: 'via' },
      );
    }
    const now = this.#now();
    if (task.expiresAt <= now) throw new BrokerError('no_active_task', `task "${ref}" has expired`);
    let minted = this.#tokens.get(task.id);
    const fresh = minted && this.#hasEnoughLife(minted, now);
    if (!minted || !fresh) minted = await this.#mintOnce(caller, task, requestId);
    else {
      await this.#audit.append({
        type: 'credential.served',
        actor: actorOf(caller),
        agent: caller.agent,
        task: task.id,
        outcome: 'allowed',
        jti: minted.jti,
        expiresAt: minted.expiresIso,
        requestId,
      });
    }
    // The same answer for every serve of this token (made once: no date formatting per request).
    const taskExpiresMs = task.expiresAt.getTime();
    if (minted.answer?.taskExpiresMs !== taskExpiresMs) {
      const until = minted.expiresAt < task.expiresAt ? minted.expiresAt : task.expiresAt;
      const credential = Object.freeze({ token: minted.token, expirationTimestamp: until.toISOString(), taskId: task.id, jti: minted.jti });
      minted.answer = { credential, taskExpiresMs };
    }
    return minted.answer.credential;
  }

  /**
   * Proxy mode: a session token for the caller's task instead of its TokenRequest token, which stays
   * in broker memory (src/proxy/server.ts forwards with it). Recorded (`session.issued`, the session id,
   * never the token) before it leaves; reused for the same identity while more than a third of its life
   * is left, without a record of its own.
   */
  async sessionCredential(caller: Caller, ref: string, requestId?: string): Promise<Credential> {
    if (!this.#sessions) throw new BrokerError('invalid_argument', 'this broker has no proxy listener (`broker serve --proxy-listen`): use `--via direct`', { field: 'via' });
    const task = await this.resolve(caller, ref, 'credential', requestId);
    const now = this.#now();
    if (task.expiresAt <= now) throw new BrokerError('no_active_task', `task "${ref}" has expired`);
    const served = this.#served.get(task.id);
    if (served && served.subject === caller.subject && (served.expiresAt.getTime() - now.getTime()) * 3 > served.expiresAt.getTime() - served.issuedAt.getTime()) {
      // The same token to the same identity: nothing new is issued, so nothing is recorded (its
      // issuance is, and so is every request made with it, at the proxy). A durable record here cost
      // kubectl through the proxy about 0.1x of its time (docs/benchmarks.md).
      return served.credential;
    }
    if (!this.#audit.healthy) throw new BrokerError('audit_unavailable', 'the audit log cannot be written: refusing to issue a session');
    const issued = await this.#sessions.issue({ task: task.id, agent: task.agent, subject: caller.subject, taskExpiresAt: task.expiresAt });
    const expirationTimestamp = issued.expiresAt.toISOString();
    await this.#audit.append({
      type: 'session.issued',
      actor: actorOf(caller),
      agent: caller.agent,
      task: task.id,
      taskName: task.name,
      template: task.template,
      namespace: task.namespace,
      outcome: 'allowed',
      jti: issued.sid,
      expiresAt: expirationTimestamp,
      requestId,
      details: { via: 'proxy', audience: this.#sessions.audience },
    });
    const credential = Object.freeze({ token: issued.token, expirationTimestamp, taskId: task.id, jti: issued.sid });
    this.#served.set(task.id, { subject: caller.subject, sid: issued.sid, issuedAt: now, expiresAt: issued.expiresAt, credential });
    return credential;
  }

  /**
   * The task's TokenRequest token, for the proxy to forward a session's requests with (minted and
   * recorded as for the exec plugin when there is none with enough life). undefined when the task is
   * not active here: the request is refused.
   */
  async upstreamToken(taskId: string): Promise<string | undefined> {
    const now = this.#now();
    const task = this.active(taskId, now);
    if (!task) return undefined;
    const minted = this.#tokens.get(task.id);
    if (minted && this.#hasEnoughLife(minted, now)) return minted.token;
    const caller: Caller = { agent: task.agent, subject: 'system:proxy', method: 'serviceAccount', principal: `agent:${task.agent}` };
    return (await this.#mintOnce(caller, task, undefined, 'system:proxy')).token;
  }

  /** The task `id` if it is active and not past its end (the proxy asks on every request); else undefined. */
  active(id: string, now: Date = this.#now()): Task | undefined {
    const task = this.#store.get(id);
    return task && task.state === 'active' && task.expiresAt > now ? task : undefined;
  }

  /** Reuse while more than a third of the token's life is left (200 s of a 600 s token). */
  #hasEnoughLife(minted: MintedToken, now: Date): boolean {
    const life = minted.expiresAt.getTime() - minted.mintedAt.getTime();
    return minted.expiresAt.getTime() - now.getTime() > life / 3;
  }

  /** `actor`: who the record names as minting (default: the caller; `system:proxy` for the proxy's own). */
  #mintOnce(caller: Caller, task: Task, requestId?: string, actor?: string): Promise<MintedToken> {
    let pending = this.#minting.get(task.id);
    if (!pending) {
      pending = this.#mint(caller, task, requestId, actor).finally(() => this.#minting.delete(task.id));
      this.#minting.set(task.id, pending);
    }
    return pending;
  }

  async #mint(caller: Caller, task: Task, requestId?: string, actor?: string): Promise<MintedToken> {
    if (!this.#audit.healthy) throw new BrokerError('audit_unavailable', 'the audit log cannot be written: refusing to mint');
    const mintedAt = this.#now();
    let token: string;
    let expiresAt: Date;
    try {
      const res = await this.#kube.core.createNamespacedServiceAccountToken({
        name: task.serviceAccount,
        namespace: this.taskNamespace,
        body: {
          spec: {
            audiences: [],
            expirationSeconds: tokenSeconds(this.#policy.broker.tokenTtl, (task.expiresAt.getTime() - mintedAt.getTime()) / 1000),
            boundObjectRef: { apiVersion: 'v1', kind: 'Secret', name: task.secretName, ...(task.secretUid ? { uid: task.secretUid } : {}) },
          },
        },
      });
      token = res.status?.token ?? '';
      expiresAt = res.status?.expirationTimestamp ? new Date(res.status.expirationTimestamp) : new Date(NaN);
    } catch (err) {
      throw clusterError('TokenRequest', err);
    }
    const jti = String(decodeJwt(token).jti ?? '');
    if (!token || !jti || Number.isNaN(expiresAt.getTime())) throw new BrokerError('internal', 'TokenRequest returned no usable token');
    const minted: MintedToken = { token, jti, expiresAt, mintedAt, expiresIso: expiresAt.toISOString() };
    // Recorded (JTI, never the token) before it leaves the broker; the token is forgotten if that fails.
    await this.#audit.append({
      type: 'credential.minted',
      actor: actor ?? actorOf(caller),
      agent: caller.agent,
      task: task.id,
      taskName: task.name,
      template: task.template,
      namespace: task.namespace,
      outcome: 'allowed',
      jti,
      expiresAt: minted.expiresIso,
      requestId,
    });
    this.#onMinted?.(task, jti, expiresAt);
    // The task may have ended while the token was being minted: do not keep or serve it then.
    if (!this.#store.get(task.id)) throw new BrokerError('no_active_task', `task "${task.name}" has ended`);
    this.#tokens.set(task.id, minted);
    return minted;
  }

  /** Ends every active task whose time is up. Run by the replica that holds the sweeper Lease. */
  async sweepExpired(): Promise<number> {
    // Run every second over every task: numbers compared, no copy of the store (with 10 000 tasks
    // the copy and the Date comparisons were 2.6 % of the sweeping replica's busy time).
    const now = this.#now().getTime();
    const due: Task[] = [];
    for (const task of this.#store.values()) if (task.state === 'active' && task.expiresAt.getTime() <= now) due.push(task);
    let ended = 0;
    for (const task of due) {
      try {
        await this.endTask(task, 'expired', 'system:sweeper');
        ended++;
      } catch {
        // retried on the next sweep
      }
    }
    return ended;
  }

  /**
   * Removes objects that belong to no live task: what a crash part-way through a start (or an end)
   * left behind. Only objects older than `graceMs` are touched, so another replica's start in flight
   * is left alone.
   *
   * The task objects are read in pages of ORPHAN_PAGE, and only what the sweep needs is kept of each:
   * with 10 000 tasks held, the three lists in one piece each (some 30 MB of JSON) held the event
   * loop for a second or more at every sweep, and every request of the replica waited (docs/benchmarks.md,
   * "Scale").
   */
  async sweepOrphans(graceMs: number): Promise<number> {
    const ns = this.taskNamespace;
    const cutoff = this.#now().getTime() - graceMs;
    const old = (meta: { creationTimestamp?: Date } | undefined) => (meta?.creationTimestamp ? new Date(meta.creationTimestamp).getTime() < cutoff : false);
    const selector = `${LABEL.taskId}`;
    const idOf = (meta: { labels?: Record<string, string> } | undefined) => meta?.labels?.[LABEL.taskId] ?? '';
    /** Every page of a list, one after the other (the pages of one list are one snapshot). */
    const eachPage = async <T>(list: (page: { limit: number; _continue?: string }) => Promise<{ items: T[]; metadata?: { _continue?: string } }>, take: (item: T) => void) => {
      let next: string | undefined;
      do {
        const page = await list({ limit: ORPHAN_PAGE, ...(next ? { _continue: next } : {}) });
        for (const item of page.items) take(item);
        next = page.metadata?._continue || undefined;
      } while (next);
    };

    const live = new Set<string>();
    const records = new Map<string, Task>();
    const pendingOld: Task[] = [];
    const accounts: Array<{ name: string; id: string }> = [];
    const bindings: Array<{ name: string; namespace: string; id: string }> = [];
    await Promise.all([
      eachPage((p) => this.#kube.core.listNamespacedSecret({ namespace: ns, labelSelector: selector, ...p }), (s: V1Secret) => {
        const task = taskFromSecret(s);
        if (!task) return;
        records.set(task.id, task);
        if (task.state === 'active') live.add(task.id);
        else if (old(s.metadata)) pendingOld.push(task);
      }),
      eachPage((p) => this.#kube.core.listNamespacedServiceAccount({ namespace: ns, labelSelector: selector, ...p }), (a) => {
        if (old(a.metadata)) accounts.push({ name: a.metadata!.name!, id: idOf(a.metadata) });
      }),
    ]).catch((err) => Promise.reject(clusterError('listing task objects', err)));
    const namespaces = [...new Set(this.#policy.templates.flatMap((t) => t.namespaces))];
    await Promise.all(
      namespaces.map((namespace) =>
        eachPage((p) => this.#kube.rbac.listNamespacedRoleBinding({ namespace, labelSelector: selector, ...p }), (b) => {
          if (old(b.metadata)) bindings.push({ name: b.metadata!.name!, namespace: b.metadata!.namespace!, id: idOf(b.metadata) });
        }).catch((err) => (isNotFound(err) ? undefined : Promise.reject(clusterError('listing task RoleBindings', err)))),
      ),
    );

    let cleaned = 0;
    // Pending records older than the grace: a start that never finished.
    for (const task of pendingOld) {
      await this.endTask(task, 'orphaned', 'system:sweeper').then(() => cleaned++, () => undefined);
    }
    for (const b of bindings) {
      if (!live.has(b.id) && !records.has(b.id)) {
        await this.#kube.rbac.deleteNamespacedRoleBinding({ name: b.name, namespace: b.namespace }).then(() => cleaned++, () => undefined);
      }
    }
    for (const a of accounts) {
      if (!live.has(a.id) && !records.has(a.id)) {
        await this.#kube.core.deleteNamespacedServiceAccount({ name: a.name, namespace: ns }).then(() => cleaned++, () => undefined);
      }
    }
    if (cleaned > 0) {
      await this.#audit.append({ type: 'task.orphans_removed', actor: 'system:sweeper', outcome: 'ok', details: { objects: cleaned } }).catch(() => undefined);
    }
    return cleaned;
  }
}

function taskExists(agent: string, name: string): BrokerError {
  // `name` is a DNS label (checked in validateStart), so the command is safe to copy.
  return new BrokerError('task_exists', `agent "${agent}" already has an active task "${name}": end it with: broker task end ${name} (or choose another --name)`, { field: 'name' });
}

/**
 * The candidate `typed` most likely meant: one it is a prefix of, or one within Levenshtein distance 2
 * (the closest; ties go to the first). Undefined when none is near.
 */
export function didYouMean(typed: string, candidates: readonly string[]): string | undefined {
  if (typed === '') return undefined;
  const prefixed = candidates.find((c) => c !== typed && c.startsWith(typed));
  if (prefixed) return prefixed;
  let best: { name: string; d: number } | undefined;
  for (const c of candidates) {
    const d = levenshtein(typed, c);
    if (d > 0 && d <= 2 && (!best || d < best.d)) best = { name: c, d };
  }
  return best?.name;
}

function levenshtein(a: string, b: string): number {
  if (Math.abs(a.length - b.length) > 2) return 3; // more than 2 apart whatever the letters
  let prev = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const row = [i];
    for (let j = 1; j <= b.length; j++) row[j] = Math.min(prev[j]! + 1, row[j - 1]! + 1, prev[j - 1]! + (a[i - 1] === b[j - 1] ? 0 : 1));
    prev = row;
  }
  return prev[b.length]!;
}

/**
 * `seconds` in the unit of what the user typed ("90m" → minutes, "2h" → hours, "600s" → seconds),
 * exactly when it divides evenly, else as the shortest duration ("1h30m"); seconds when nothing was typed.
 */
export function inUnitOf(seconds: number, typed: string | undefined): string {
  const unit = typed?.trim().at(-1);
  const size = unit === 'h' ? 3600 : unit === 'm' ? 60 : unit === 's' || unit === undefined ? 1 : 0;
  if (size === 0) return formatDuration(seconds);
  return seconds % size === 0 ? `${seconds / size}${unit ?? 's'}` : formatDuration(seconds);
}
